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
    case 'idle':
      return 'stopped after being idle past your idle limit (its files came back first)';
    case 'session cap reached':
      return 'stopped at your spending cap per session';
    case 'daily cap reached':
      return 'stopped at your spending cap per day';
    default:
      return reason ?? 'ended';
  }
}

/** MiB as GiB with one decimal ("12.1"), or a whole number when exact ("80"). */
function gib(mib: number): string {
  const value = mib / 1024;
  const rounded = Math.round(value * 10) / 10;
  return Number.isInteger(rounded) ? String(rounded) : rounded.toFixed(1);
}

/**
 * What the host last said about the rented hardware, short: "GPU 87 % · 12.1/80 GiB"
 * (utilisation averaged and memory summed over the session's GPUs), "CPU load 1.2" for a
 * CPU host, or '' when the host reported nothing usable.
 */
export function telemetryText(
  telemetry: GPUShare.ITelemetry | null | undefined
): string {
  if (!telemetry) {
    return '';
  }
  const gpus = (telemetry.gpus ?? []).filter(gpu => !gpu.error);
  if (gpus.length > 0) {
    const parts: string[] = [];
    const utils = gpus
      .map(gpu => gpu.utilization_pct)
      .filter((v): v is number => typeof v === 'number');
    if (utils.length > 0) {
      const mean = utils.reduce((a, b) => a + b, 0) / utils.length;
      parts.push(`GPU ${Math.round(mean)} %`);
    }
    const withMemory = gpus.filter(
      gpu =>
        typeof gpu.memory_used_mib === 'number' &&
        typeof gpu.memory_total_mib === 'number' &&
        gpu.memory_total_mib > 0
    );
    if (withMemory.length > 0) {
      const used = withMemory.reduce((a, g) => a + (g.memory_used_mib ?? 0), 0);
      const total = withMemory.reduce(
        (a, g) => a + (g.memory_total_mib ?? 0),
        0
      );
      const text = `${gib(used)}/${gib(total)} GiB`;
      parts.push(parts.length ? text : `GPU ${text}`);
    }
    if (parts.length > 0) {
      return parts.join(' · ');
    }
  }
  const load = telemetry.cpu?.load_1m;
  if (typeof load === 'number' && Number.isFinite(load)) {
    return `CPU load ${load.toFixed(1)}`;
  }
  return '';
}
