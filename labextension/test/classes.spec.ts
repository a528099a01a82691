import { describe, expect, it } from 'vitest';

import {
  appendPoint,
  formatQuota,
  formatQuotaLeft,
  formatSeconds,
  niceCeil,
  quotaFraction,
  quotaLeftAt,
  scaleChart,
  sessionClass,
  usageTotals
} from '../src/classes';
import type { GPUShare } from '../src/tokens';

function klass(change: Partial<GPUShare.IClass> = {}): GPUShare.IClass {
  return {
    name: 'ml101',
    teacher: 'prof',
    your_role: 'student',
    budget_micro: 50_000_000,
    quota_seconds: 3600,
    quota_micro: null,
    weekly_quota_seconds: null,
    gpu_model: null,
    max_price_per_hour_micro: null,
    starts_at: null,
    ends_at: null,
    kernel_name: 'gpu-share-ml101',
    ...change
  };
}

function row(
  change: Partial<GPUShare.IClassUsageRow> = {}
): GPUShare.IClassUsageRow {
  return {
    student: 'ann',
    seconds: 100,
    credits_micro: 100_000,
    sessions: 1,
    running: [],
    remaining_seconds: 3500,
    remaining_micro: null,
    ...change
  };
}

describe('formatSeconds', () => {
  it('says seconds, minutes or hours', () => {
    expect(formatSeconds(0)).toBe('0 s');
    expect(formatSeconds(45.9)).toBe('45 s');
    expect(formatSeconds(725)).toBe('12 min 05 s');
    expect(formatSeconds(3 * 3600 + 7 * 60 + 59)).toBe('3 h 07 min');
    expect(formatSeconds(-5)).toBe('0 s');
    expect(formatSeconds(Number.NaN)).toBe('–');
  });
});

describe('quotaLeftAt', () => {
  it('is the polled quota while no kernel runs', () => {
    expect(quotaLeftAt(row(), 1_000, 61_000, 1000)).toEqual({
      seconds: 3500,
      micro: null
    });
  });
  it('ticks down between polls while a kernel runs, never below zero', () => {
    const live = row({ running: ['s-1'], remaining_micro: 2_000_000 });
    expect(quotaLeftAt(live, 1_000, 11_500, 1000)).toEqual({
      seconds: 3490,
      micro: 1_990_000
    });
    expect(quotaLeftAt(live, 1_000, 10_000_000, 1000)).toEqual({
      seconds: 0,
      micro: 0
    });
    // A clock behind the poll does not add quota.
    expect(quotaLeftAt(live, 5_000, 1_000, 1000).seconds).toBe(3500);
  });
});

describe('formatQuotaLeft', () => {
  it('shows time, credits, both or no limit', () => {
    expect(formatQuotaLeft({ seconds: 3500, micro: null })).toBe('58 min 20 s');
    expect(formatQuotaLeft({ seconds: null, micro: 2_500_000 })).toBe(
      '2.50 credits'
    );
    expect(formatQuotaLeft({ seconds: 60, micro: 1_000_000 })).toBe(
      '1 min 00 s · 1.00 credits'
    );
    expect(formatQuotaLeft({ seconds: null, micro: null })).toBe('no limit');
    expect(formatQuotaLeft(null)).toBe('–');
  });
});

describe('formatQuota', () => {
  it('describes the per-student quota', () => {
    expect(formatQuota(klass())).toBe('1 h 00 min per student');
    expect(
      formatQuota(
        klass({ quota_seconds: 36_000, weekly_quota_seconds: 10_800 })
      )
    ).toBe('10 h 00 min per student, 3 h 00 min a week');
    expect(
      formatQuota(klass({ quota_seconds: null, quota_micro: 5_000_000 }))
    ).toBe('5.00 credits per student');
    expect(formatQuota(klass({ quota_seconds: null }))).toBe(
      'no limit per student'
    );
  });
});

describe('quotaFraction', () => {
  it('is the share used of the tightest quota', () => {
    expect(quotaFraction({ seconds: 900, micro: null }, klass())).toBe(0.75);
    expect(
      quotaFraction(
        { seconds: 3000, micro: 1_000_000 },
        klass({ quota_micro: 4_000_000 })
      )
    ).toBe(0.75);
    expect(quotaFraction({ seconds: null, micro: null }, klass())).toBeNull();
    expect(quotaFraction({ seconds: 7200, micro: null }, klass())).toBe(0);
  });
});

describe('usage series', () => {
  it('sums the students at each poll', () => {
    const usage: GPUShare.IClassUsage = {
      class: 'ml101',
      budget_micro: 1,
      at: '',
      students: [
        row(),
        row({ student: 'ben', seconds: 20, credits_micro: 5, running: ['s-2'] })
      ]
    };
    expect(usageTotals(usage, 42)).toEqual({
      t: 42,
      seconds: 120,
      micro: 100_005,
      running: 1
    });
  });
  it('keeps at most max points, dropping the oldest', () => {
    let series: ReturnType<typeof appendPoint> = [];
    for (let t = 0; t < 5; t++) {
      series = appendPoint(series, { t, seconds: t, micro: 0, running: 0 }, 3);
    }
    expect(series.map(p => p.t)).toEqual([2, 3, 4]);
  });
});

describe('niceCeil', () => {
  it('rounds up to 1, 2 or 5 times a power of ten', () => {
    expect(niceCeil(0)).toBe(1);
    expect(niceCeil(-3)).toBe(1);
    expect(niceCeil(1)).toBe(1);
    expect(niceCeil(1.2)).toBe(2);
    expect(niceCeil(3)).toBe(5);
    expect(niceCeil(7)).toBe(10);
    expect(niceCeil(120)).toBe(200);
    expect(niceCeil(500)).toBe(500);
    expect(niceCeil(0.3)).toBeCloseTo(0.5);
    expect(niceCeil(0.1 + 0.2)).toBeCloseTo(0.5);
  });
});

describe('scaleChart', () => {
  it('maps the first and last times to the edges and values onto 0..yMax', () => {
    const chart = scaleChart([1000, 2000, 3000], [0, 50, 100], 108, 58, 4);
    expect(chart.yMax).toBe(100);
    expect(chart.tMin).toBe(1000);
    expect(chart.tMax).toBe(3000);
    expect(chart.path).toBe('M4 54 L54 29 L104 4');
  });
  it('puts a single point in the middle and draws nothing without points', () => {
    expect(scaleChart([5], [0], 108, 58, 4).path).toBe('M54 54');
    expect(scaleChart([], [], 108, 58).path).toBe('');
  });
  it('keeps negative values on the axis', () => {
    expect(scaleChart([0, 1], [-5, 10], 108, 58, 4).path).toBe('M4 54 L104 4');
  });
});

describe('sessionClass', () => {
  it('reads the class field or the class payer', () => {
    const base = { payer: 'ann' } as GPUShare.ISession;
    expect(sessionClass(base)).toBeNull();
    expect(sessionClass({ ...base, class: 'ml101' })).toBe('ml101');
    expect(sessionClass({ ...base, payer: 'ml101@class' })).toBe('ml101');
    expect(sessionClass(null)).toBeNull();
  });
});
