import type { GPUShare } from './tokens';

/** What the meter shows at one instant. */
export interface IMeterReading {
  /** The session is starting or running. */
  live: boolean;
  /** Seconds since the kernel became ready (0 while starting). */
  elapsedSeconds: number;
  /** Cost so far, micro-credits (the bill once ended). */
  costMicro: number;
  /** Credit left after this cost, micro-credits, or null when unknown. */
  remainingMicro: number | null;
}

/**
 * The meter at local time `nowMs`, computed between polls from the session's start and rate.
 *
 * The broker bills ceil(seconds) x price per second from the kernel's ready time; the
 * reading does the same from `started_us`, and never goes below the broker's own
 * `cost_so_far_micro` of the last poll, so it only moves forward. `availableMicro` is the
 * account's available credit at the last poll (which already had that poll's cost taken off).
 */
export function meterReading(
  session: GPUShare.ISession,
  nowMs: number,
  availableMicro: number | null = null
): IMeterReading {
  const live = session.state === 'starting' || session.state === 'running';
  if (!live) {
    const cost = session.amount_micro ?? session.cost_so_far_micro ?? 0;
    const elapsed =
      session.billed_seconds ??
      (session.started_us && session.ended_us
        ? Math.ceil((session.ended_us - session.started_us) / 1e6)
        : 0);
    return {
      live,
      elapsedSeconds: elapsed,
      costMicro: cost,
      remainingMicro: availableMicro
    };
  }
  if (session.started_us === null || session.state === 'starting') {
    return {
      live,
      elapsedSeconds: 0,
      costMicro: 0,
      remainingMicro: availableMicro
    };
  }
  const elapsed = Math.max(0, (nowMs * 1000 - session.started_us) / 1e6);
  const computed = Math.ceil(elapsed) * session.price_per_second_micro;
  const cost = Math.max(computed, session.cost_so_far_micro ?? 0);
  const remaining =
    availableMicro === null
      ? null
      : availableMicro - (cost - (session.cost_so_far_micro ?? 0));
  return {
    live,
    elapsedSeconds: Math.floor(elapsed),
    costMicro: cost,
    remainingMicro: remaining
  };
}

/** Words for why a session ended. */
export function endReasonText(reason: string | null): string {
  switch (reason) {
    case 'stopped':
      return 'stopped';
    case 'host lost':
      return 'the host was lost (billing stopped at its last heartbeat)';
    case 'credit exhausted':
      return 'stopped: your credit ran out';
    case 'kernel exited':
      return 'the kernel exited';
    case 'start failed':
      return 'the kernel failed to start';
    default:
      return reason ?? 'ended';
  }
}
