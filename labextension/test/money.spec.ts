import { describe, expect, it } from 'vitest';

import {
  creditsToMicro,
  formatCredits,
  formatDuration,
  formatMemory,
  formatPricePerHour,
  parseCredits
} from '../src/money';

describe('formatCredits', () => {
  it('shows at least two decimals', () => {
    expect(formatCredits(3_600_000)).toBe('3.60');
    expect(formatCredits(0)).toBe('0.00');
    expect(formatCredits(12_000_000)).toBe('12.00');
  });
  it('keeps significant micro-credits up to six decimals', () => {
    expect(formatCredits(1_234_567)).toBe('1.234567');
    expect(formatCredits(1_500)).toBe('0.0015');
    expect(formatCredits(1)).toBe('0.000001');
  });
  it('truncates rather than rounds when decimals are capped', () => {
    expect(formatCredits(1_999_999, 2, 2)).toBe('1.99');
    expect(formatCredits(42_000, 4, 4)).toBe('0.0420');
  });
  it('groups thousands and keeps the sign', () => {
    expect(formatCredits(1_234_000_000)).toBe('1,234.00');
    expect(formatCredits(-2_500_000)).toBe('-2.50');
  });
  it('says so when the number is not finite', () => {
    expect(formatCredits(Number.NaN)).toBe('–');
  });
  it('formats prices per hour', () => {
    expect(formatPricePerHour(600_000)).toBe('0.60 cr/h');
  });
});

describe('parseCredits', () => {
  it('parses decimals into integer micro-credits without floats', () => {
    expect(parseCredits('12')).toBe(12_000_000);
    expect(parseCredits('0.5')).toBe(500_000);
    expect(parseCredits('.25')).toBe(250_000);
    expect(parseCredits('1,000.000001')).toBe(1_000_000_001);
    expect(parseCredits(' 3.6 ')).toBe(3_600_000);
  });
  it('refuses what is not an amount', () => {
    for (const bad of ['', '.', '-1', 'abc', '1.2345678', '1e3']) {
      expect(parseCredits(bad)).toBeNull();
    }
  });
  it('converts settings numbers', () => {
    expect(creditsToMicro(0.6)).toBe(600_000);
    expect(creditsToMicro(0)).toBe(0);
    expect(creditsToMicro(-1)).toBe(0);
  });
});

describe('durations and memory', () => {
  it('formats durations', () => {
    expect(formatDuration(0)).toBe('0:00');
    expect(formatDuration(61.9)).toBe('1:01');
    expect(formatDuration(3723)).toBe('1:02:03');
  });
  it('formats memory', () => {
    expect(formatMemory(81920)).toBe('80 GiB');
    expect(formatMemory(12288 + 512)).toBe('12.5 GiB');
    expect(formatMemory(512)).toBe('512 MiB');
    expect(formatMemory(0)).toBe('–');
  });
});
