import type { GPUShare } from './tokens';
import { meterReading } from './meter';

export type CapLevel = 'ok' | 'warn' | 'over';

/** Where spending stands against a cap (0 or less: no cap). */
export function capLevel(
  spentMicro: number,
  capMicro: number,
  warnAtPercent = 80
): CapLevel {
  if (capMicro <= 0) {
    return 'ok';
  }
  if (spentMicro >= capMicro) {
    return 'over';
  }
  return spentMicro * 100 >= capMicro * warnAtPercent ? 'warn' : 'ok';
}

/** Midnight UTC of the day of `nowMs`, in ms: the broker's day for the daily cap. */
export function startOfDay(nowMs: number): number {
  const day = new Date(nowMs);
  day.setUTCHours(0, 0, 0, 0);
  return day.getTime();
}

/**
 * What the user's sessions have cost today (UTC) at `nowMs`, running ones ticking.
 * A session counts on the day it started.
 */
export function spentToday(
  sessions: ReadonlyArray<GPUShare.ISession>,
  nowMs: number
): number {
  const since = startOfDay(nowMs) * 1000;
  let total = 0;
  for (const session of sessions) {
    if (
      session.started_us === null ||
      session.started_us < since ||
      session.class
    ) {
      continue; // class sessions are charged to the class, not to you
    }
    total += meterReading(session, nowMs).costMicro;
  }
  return total;
}
