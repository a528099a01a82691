/**
 * Pure logic of the Classes panel and of the meter's class line: quotas for people, the
 * client-side time series of a class's use and the scaling of its chart. No JupyterLab here
 * (unit-tested under node).
 */
import { formatCredits } from './money';
import type { GPUShare, IClassUsagePoint } from './tokens';

/** Seconds for people: "45 s", "12 min 05 s", "3 h 07 min". */
export function formatSeconds(seconds: number): string {
  if (!Number.isFinite(seconds)) {
    return '–';
  }
  const total = Math.max(0, Math.floor(seconds));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  if (h > 0) {
    return `${h} h ${String(m).padStart(2, '0')} min`;
  }
  if (m > 0) {
    return `${m} min ${String(s).padStart(2, '0')} s`;
  }
  return `${s} s`;
}

/** What is left of a student's quota: seconds and/or micro-credits (null: no limit). */
export interface IQuotaLeft {
  seconds: number | null;
  micro: number | null;
}

/**
 * A student's quota left at local time `nowMs`, from a usage row polled at `polledAtMs`.
 * While the student has a running kernel the time left goes down by the seconds since the
 * poll (and the credits by those seconds at `pricePerSecondMicro`); never below zero.
 */
export function quotaLeftAt(
  row: Pick<
    GPUShare.IClassUsageRow,
    'remaining_seconds' | 'remaining_micro' | 'running'
  >,
  polledAtMs: number,
  nowMs: number,
  pricePerSecondMicro = 0
): IQuotaLeft {
  const live = row.running.length > 0;
  const since = live ? Math.max(0, Math.floor((nowMs - polledAtMs) / 1000)) : 0;
  return {
    seconds:
      row.remaining_seconds === null
        ? null
        : Math.max(0, row.remaining_seconds - since),
    micro:
      row.remaining_micro === null
        ? null
        : Math.max(
            0,
            row.remaining_micro - since * Math.max(0, pricePerSecondMicro)
          )
  };
}

/** A quota left for people: "2 h 05 min", "3.50 credits", both, or "no limit". */
export function formatQuotaLeft(left: IQuotaLeft | null): string {
  if (!left) {
    return '–';
  }
  const parts: string[] = [];
  if (left.seconds !== null) {
    parts.push(formatSeconds(left.seconds));
  }
  if (left.micro !== null) {
    parts.push(`${formatCredits(left.micro)} credits`);
  }
  return parts.length ? parts.join(' · ') : 'no limit';
}

/** A class's per-student quota for people: "10 h 00 min per student, 3 h 00 min a week". */
export function formatQuota(klass: GPUShare.IClass): string {
  const parts: string[] = [];
  if (klass.quota_seconds !== null) {
    parts.push(formatSeconds(klass.quota_seconds));
  }
  if (klass.quota_micro !== null) {
    parts.push(`${formatCredits(klass.quota_micro)} credits`);
  }
  const weekly =
    klass.weekly_quota_seconds !== null
      ? `${formatSeconds(klass.weekly_quota_seconds)} a week`
      : '';
  if (!parts.length && !weekly) {
    return 'no limit per student';
  }
  return [parts.length ? `${parts.join(' or ')} per student` : '', weekly]
    .filter(Boolean)
    .join(', ');
}

/** The share used of a quota, 0..1, or null when the quota has no limit. */
export function quotaFraction(
  left: IQuotaLeft,
  klass: GPUShare.IClass
): number | null {
  const fractions: number[] = [];
  if (left.seconds !== null && klass.quota_seconds) {
    fractions.push(1 - left.seconds / klass.quota_seconds);
  }
  if (left.micro !== null && klass.quota_micro) {
    fractions.push(1 - left.micro / klass.quota_micro);
  }
  if (!fractions.length) {
    return null;
  }
  return Math.min(1, Math.max(0, Math.max(...fractions)));
}

/** The class's total use at one poll. */
export type IUsagePoint = IClassUsagePoint;

/** Totals of a usage answer over its students. */
export function usageTotals(
  usage: GPUShare.IClassUsage,
  t: number
): IUsagePoint {
  let seconds = 0;
  let micro = 0;
  let running = 0;
  for (const row of usage.students) {
    seconds += row.seconds;
    micro += row.credits_micro;
    running += row.running.length;
  }
  return { t, seconds, micro, running };
}

/** Append a point, keeping at most `max` points (the oldest go first). */
export function appendPoint(
  series: ReadonlyArray<IUsagePoint>,
  point: IUsagePoint,
  max = 1800
): IUsagePoint[] {
  const next = [...series, point];
  return next.length > max ? next.slice(next.length - max) : next;
}

/** The smallest 1, 2 or 5 × 10^k at or above `value` (1 for 0 or less). */
export function niceCeil(value: number): number {
  if (!Number.isFinite(value) || value <= 0) {
    return 1;
  }
  const power = Math.pow(10, Math.floor(Math.log10(value)));
  for (const step of [1, 2, 5, 10]) {
    const candidate = step * power;
    // Tolerate float noise (e.g. 0.30000000000000004).
    if (candidate >= value * (1 - 1e-9)) {
      return candidate;
    }
  }
  return 10 * power;
}

/** A line chart's geometry: the SVG path and the axes' ends. */
export interface IChart {
  /** SVG path data ("M x y L x y ..."), empty with no points. */
  path: string;
  /** The value at the top of the plot (a nice number). */
  yMax: number;
  /** Local times (ms) at the left and right ends. */
  tMin: number;
  tMax: number;
}

/**
 * Scale `values` taken at times `times` into a `width` × `height` box (y grows downwards),
 * inside `pad` pixels. The y axis starts at 0 and ends at a nice number above the largest
 * value; the x axis spans the times (one point sits in the middle).
 */
export function scaleChart(
  times: ReadonlyArray<number>,
  values: ReadonlyArray<number>,
  width: number,
  height: number,
  pad = 4
): IChart {
  const n = Math.min(times.length, values.length);
  if (n === 0) {
    return { path: '', yMax: 1, tMin: 0, tMax: 0 };
  }
  const tMin = times[0];
  const tMax = times[n - 1];
  const yMax = niceCeil(Math.max(0, ...values.slice(0, n)));
  const innerW = Math.max(1, width - 2 * pad);
  const innerH = Math.max(1, height - 2 * pad);
  const span = tMax - tMin;
  const parts: string[] = [];
  for (let i = 0; i < n; i++) {
    const x =
      span > 0 ? pad + ((times[i] - tMin) / span) * innerW : pad + innerW / 2;
    const y = pad + innerH - (Math.max(0, values[i]) / yMax) * innerH;
    parts.push(`${i === 0 ? 'M' : 'L'}${round2(x)} ${round2(y)}`);
  }
  return { path: parts.join(' '), yMax, tMin, tMax };
}

function round2(value: number): number {
  return Math.round(value * 100) / 100;
}

/** The class of a session charged to a class ("class" field, or payer "<class>@class"). */
export function sessionClass(
  session: GPUShare.ISession | null | undefined
): string | null {
  if (!session) {
    return null;
  }
  if (session.class) {
    return session.class;
  }
  const payer = session.payer ?? '';
  return payer.endsWith('@class') ? payer.slice(0, -'@class'.length) : null;
}
