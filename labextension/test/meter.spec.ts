import { describe, expect, it } from 'vitest';

import { capLevel, spentToday, startOfDay } from '../src/caps';
import { endReasonText, meterReading } from '../src/meter';
import { session } from './fixtures';

const started = 1_000_000_000_000; // µs
const at = (seconds: number) => started / 1000 + seconds * 1000; // local ms

describe('meterReading', () => {
  it('ticks every second from the ready time at the session price', () => {
    const s = session({ started_us: started, price_per_second_micro: 1000 });
    expect(meterReading(s, at(0)).costMicro).toBe(0);
    expect(meterReading(s, at(0.2)).costMicro).toBe(1000); // a started second is billed
    expect(meterReading(s, at(1)).costMicro).toBe(1000);
    expect(meterReading(s, at(1.5)).costMicro).toBe(2000);
    expect(meterReading(s, at(61)).elapsedSeconds).toBe(61);
    expect(meterReading(s, at(61)).costMicro).toBe(61_000);
  });
  it('never shows less than the broker said at the last poll', () => {
    const s = session({ started_us: started, cost_so_far_micro: 5000 });
    expect(meterReading(s, at(2)).costMicro).toBe(5000);
  });
  it('takes the ticking cost off the credit available at the last poll', () => {
    const s = session({ started_us: started, cost_so_far_micro: 3000 });
    // At the poll (3 s) 3000 had been taken off already; 2 s later 2000 more.
    expect(meterReading(s, at(5), 100_000).remainingMicro).toBe(98_000);
    expect(meterReading(s, at(5)).remainingMicro).toBeNull();
  });
  it('costs nothing while starting', () => {
    const s = session({ state: 'starting', started_us: null });
    expect(meterReading(s, at(100))).toEqual({
      live: true,
      elapsedSeconds: 0,
      costMicro: 0,
      remainingMicro: null
    });
  });
  it('shows the bill once ended, whatever the clock says', () => {
    const s = session({
      state: 'ended',
      ended_us: started + 10_500_000,
      billed_seconds: 11,
      amount_micro: 11_000,
      end_reason: 'stopped'
    });
    expect(meterReading(s, at(1000))).toEqual({
      live: false,
      elapsedSeconds: 11,
      costMicro: 11_000,
      remainingMicro: null
    });
  });
  it('explains end reasons', () => {
    expect(endReasonText('host lost')).toContain('host was lost');
    expect(endReasonText('credit exhausted')).toContain('credit ran out');
    expect(endReasonText(null)).toBe('ended');
  });
});

describe('spending caps', () => {
  it('warns at the warning percentage and stops at 100 %', () => {
    expect(capLevel(79, 100)).toBe('ok');
    expect(capLevel(80, 100)).toBe('warn');
    expect(capLevel(99, 100)).toBe('warn');
    expect(capLevel(100, 100)).toBe('over');
    expect(capLevel(50, 100, 50)).toBe('warn');
  });
  it('has no cap at 0', () => {
    expect(capLevel(1e12, 0)).toBe('ok');
  });
  it('adds up today’s sessions, running ones ticking, earlier days left out', () => {
    const now = at(3600);
    const midnightUs = startOfDay(now) * 1000;
    const sessions = [
      session({
        id: 'a',
        started_us: now * 1000 - 10_000_000,
        price_per_second_micro: 1000
      }),
      session({
        id: 'b',
        state: 'ended',
        started_us: midnightUs + 1,
        amount_micro: 7000,
        billed_seconds: 7
      }),
      session({
        id: 'c',
        state: 'ended',
        started_us: midnightUs - 1,
        amount_micro: 99_999,
        billed_seconds: 99
      }),
      session({ id: 'd', state: 'starting', started_us: null })
    ];
    expect(spentToday(sessions, now)).toBe(10_000 + 7000);
  });
});
