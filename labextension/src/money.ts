/**
 * Money and other quantities for people. Money is integer micro-credits on the wire
 * (1 credit = 1,000,000 micro-credits); it is formatted here with integer arithmetic only.
 */

/** Micro-credits in one credit. */
export const MICRO = 1_000_000;

/**
 * Format micro-credits as credits with at least `minDecimals` and at most `maxDecimals`
 * decimals, truncating (never rounding up) what does not fit: 3_600_000 -> "3.60",
 * 1_234_567 -> "1.234567", 1_500 -> "0.0015".
 */
export function formatCredits(
  micro: number,
  minDecimals = 2,
  maxDecimals = 6
): string {
  if (!Number.isFinite(micro)) {
    return '–';
  }
  const value = Math.trunc(micro);
  const sign = value < 0 ? '-' : '';
  const abs = Math.abs(value);
  const whole = Math.floor(abs / MICRO);
  let fraction = String(abs % MICRO).padStart(6, '0');
  fraction = fraction.slice(0, Math.max(0, Math.min(6, maxDecimals)));
  const min = Math.max(0, Math.min(minDecimals, fraction.length));
  while (fraction.length > min && fraction.endsWith('0')) {
    fraction = fraction.slice(0, -1);
  }
  const wholeText = whole.toLocaleString('en-US');
  return `${sign}${wholeText}${fraction ? '.' + fraction : ''}`;
}

/** A price per hour, e.g. "3.60 cr/h". */
export function formatPricePerHour(microPerHour: number): string {
  return `${formatCredits(microPerHour, 2, 6)} cr/h`;
}

/**
 * Parse credits typed by a person ("12", "0.5", "1,000.25") into micro-credits;
 * null for anything that is not a non-negative amount with at most 6 decimals.
 */
export function parseCredits(text: string): number | null {
  const cleaned = text.trim().replace(/,/g, '');
  const match = /^(\d*)(?:\.(\d{0,6}))?$/.exec(cleaned);
  if (!match || (match[1] === '' && !match[2])) {
    return null;
  }
  const whole = match[1] === '' ? 0 : Number(match[1]);
  const fraction = Number((match[2] ?? '').padEnd(6, '0'));
  const micro = whole * MICRO + fraction;
  return Number.isSafeInteger(micro) ? micro : null;
}

/** Credits from a settings number (a person's decimal) to micro-credits. */
export function creditsToMicro(credits: number): number {
  if (!Number.isFinite(credits) || credits <= 0) {
    return 0;
  }
  return Math.round(credits * MICRO);
}

/** A duration in whole seconds as "m:ss" or "h:mm:ss". */
export function formatDuration(seconds: number): string {
  const total = Math.max(0, Math.floor(seconds));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  const ss = String(s).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${ss}` : `${m}:${ss}`;
}

/** GPU memory in MiB as "80 GiB", "512 MiB", or "–" when unknown (a CPU offer). */
export function formatMemory(mib: number): string {
  if (!mib || mib <= 0) {
    return '–';
  }
  if (mib >= 1024) {
    const gib = mib / 1024;
    return `${Number.isInteger(gib) ? gib : gib.toFixed(1)} GiB`;
  }
  return `${mib} MiB`;
}
