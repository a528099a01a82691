import { describe, expect, it } from 'vitest';

import { telemetryText } from '../src/meter';
import {
  cheapestFreeOffer,
  formatReliability,
  formatSpeed,
  isCpuOffer,
  launcherLabel,
  pricePerSpeed,
  sortOffers,
  speedScore,
  speedWarning,
  unmeasuredSpeed,
  useLabel
} from '../src/offers';
import type { GPUShare } from '../src/tokens';
import { offer } from './fixtures';

function speed(overrides: Partial<GPUShare.ISpeed>): GPUShare.ISpeed {
  return {
    score: 100,
    kind: 'gpu',
    fp32_tflops: 19.5,
    fp16_tflops: 100,
    memory_bandwidth_gbs: 1500,
    flagged: false,
    flag_reason: null,
    measured_at: '2030-01-01T00:00:00Z',
    ...overrides
  };
}

// price per hour / score: 36 / 100 = 0.36, 3.6 / 10 = 0.36 (tie -> id), 7.2 / 160 = 0.045.
const fast = offer({
  id: 1,
  price_per_second_micro: 10_000,
  speed: speed({ score: 100 })
});
const slow = offer({
  id: 2,
  price_per_second_micro: 1_000,
  speed: speed({ score: 10 })
});
const value = offer({
  id: 3,
  price_per_second_micro: 2_000,
  speed: speed({ score: 160 })
});
const unmeasured = offer({ id: 4, price_per_second_micro: 100, speed: null });
const zero = offer({
  id: 5,
  price_per_second_micro: 50,
  speed: speed({ score: 0 })
});
const all = [unmeasured, fast, slow, zero, value];
const ids = (list: { id: number }[]) => list.map(o => o.id);

describe('speed and price per speed', () => {
  it('reads only positive scores', () => {
    expect(speedScore(fast)).toBe(100);
    expect(speedScore(unmeasured)).toBeNull();
    expect(speedScore(zero)).toBeNull();
    expect(speedScore(offer({}))).toBeNull();
  });
  it('divides the price per hour by the score', () => {
    expect(pricePerSpeed(fast)).toBe(360_000);
    expect(pricePerSpeed(value)).toBe(45_000);
    expect(pricePerSpeed(unmeasured)).toBeNull();
  });
  it('sorts by speed, fastest first, unmeasured last', () => {
    expect(ids(sortOffers(all, 'speed'))).toEqual([3, 1, 2, 4, 5]);
  });
  it('sorts by price per speed, lowest first, unmeasured last', () => {
    expect(ids(sortOffers(all, 'value'))).toEqual([3, 1, 2, 4, 5]);
  });
  it('puts free before busy among equals', () => {
    const busyValue = offer({ ...value, id: 0, state: 'busy' });
    expect(ids(sortOffers([busyValue, value], 'value'))).toEqual([3, 0]);
  });
});

describe('offer card texts', () => {
  it('formats reliability, a new host has none', () => {
    expect(formatReliability(0.98)).toBe('98 % reliable');
    expect(formatReliability(1)).toBe('100 % reliable');
    expect(formatReliability(0.999)).toBe('99 % reliable');
    expect(formatReliability(0.29)).toBe('29 % reliable');
    expect(formatReliability(0)).toBe('0 % reliable');
    expect(formatReliability(null)).toBe('new host');
    expect(formatReliability(undefined)).toBe('new host');
  });
  it('formats the measured speed with its unit', () => {
    expect(formatSpeed(speed({ score: 165.4 }))).toBe('165 TFLOPS fp16');
    expect(formatSpeed(speed({ score: 31.25 }))).toBe('31.3 TFLOPS fp16');
    expect(formatSpeed(speed({ score: 8.1 }))).toBe('8.10 TFLOPS fp16');
    expect(formatSpeed(speed({ kind: 'cpu', score: 0.0853 }))).toBe(
      '85.3 GFLOPS fp32'
    );
    expect(formatSpeed(speed({ kind: 'cpu', score: 1.5 }))).toBe(
      '1.50 TFLOPS fp32'
    );
    expect(formatSpeed(speed({ score: null }))).toBe('');
    expect(formatSpeed(null)).toBe('');
  });
  it('says why a speed was not measured, or that it is not measured yet', () => {
    const reason = 'numpy is not installed';
    expect(
      unmeasuredSpeed(speed({ score: null, kind: 'cpu', not_measured: reason }))
    ).toEqual({
      text: 'not measured',
      title: `The host could not run its self-test: ${reason}`
    });
    expect(unmeasuredSpeed(null).text).toBe('not measured yet');
    expect(unmeasuredSpeed(speed({ score: null })).text).toBe(
      'not measured yet'
    );
  });
  it('warns about a flagged self-test', () => {
    expect(
      speedWarning(speed({ flagged: true, flag_reason: 'fp16 12 TFLOPS < 50' }))
    ).toBe('flagged: fp16 12 TFLOPS < 50');
    expect(speedWarning(speed({ flagged: true, flag_reason: null }))).toMatch(
      /^flagged: /
    );
    expect(speedWarning(speed({}))).toBe('');
    expect(speedWarning(null)).toBe('');
  });
  it('says "Use this host" for a CPU offer', () => {
    const cpu = offer({ gpu_count: 0, gpu_memory_mib: 0, gpu_model: 'CPU' });
    expect(isCpuOffer(cpu)).toBe(true);
    expect(useLabel(cpu)).toBe('Use this host');
    expect(useLabel(offer({ speed: speed({ kind: 'cpu' }) }))).toBe(
      'Use this host'
    );
    expect(useLabel(fast)).toBe('Use this GPU');
  });
});

describe('launcher label', () => {
  it('shows the cheapest free offer', () => {
    const busyCheap = offer({
      id: 9,
      price_per_second_micro: 1,
      state: 'busy'
    });
    expect(cheapestFreeOffer([fast, busyCheap, slow])?.id).toBe(2);
    expect(launcherLabel([fast, busyCheap, slow])).toBe(
      'Shared GPU · from 3.60 cr/h'
    );
    expect(launcherLabel([offer({ price_per_second_micro: 167 })])).toBe(
      'Shared GPU · from 0.6012 cr/h'
    );
  });
  it('says when no host is online or all are busy', () => {
    expect(launcherLabel([])).toBe('Shared GPU · no host online');
    expect(cheapestFreeOffer([])).toBeNull();
    expect(launcherLabel([offer({ state: 'busy' })])).toBe(
      'Shared GPU · all hosts busy'
    );
  });
});

describe('meter telemetry', () => {
  it('shows GPU use and memory', () => {
    expect(
      telemetryText({
        source: 'nvml',
        gpus: [
          {
            index: 0,
            utilization_pct: 87,
            memory_used_mib: 12390,
            memory_total_mib: 81920
          }
        ]
      })
    ).toBe('GPU 87 % · 12.1/80 GiB');
  });
  it('averages use and sums memory over several GPUs', () => {
    expect(
      telemetryText({
        gpus: [
          {
            index: 0,
            utilization_pct: 50,
            memory_used_mib: 1024,
            memory_total_mib: 16384
          },
          {
            index: 1,
            utilization_pct: 100,
            memory_used_mib: 2048,
            memory_total_mib: 16384
          }
        ]
      })
    ).toBe('GPU 75 % · 3/32 GiB');
  });
  it('copes with missing figures', () => {
    expect(
      telemetryText({
        gpus: [
          {
            index: 0,
            utilization_pct: null,
            memory_used_mib: 512,
            memory_total_mib: 8192
          }
        ]
      })
    ).toBe('GPU 0.5/8 GiB');
    expect(telemetryText({ gpus: [{ index: 0, utilization_pct: 3 }] })).toBe(
      'GPU 3 %'
    );
    expect(telemetryText({ gpus: [{ index: 0, error: 'GPU is lost' }] })).toBe(
      ''
    );
    expect(telemetryText(null)).toBe('');
    expect(telemetryText({})).toBe('');
  });
  it('shows the load of a CPU host', () => {
    expect(
      telemetryText({
        source: 'cpu',
        gpus: [],
        cpu: { cpu_count: 8, load_1m: 1.23 }
      })
    ).toBe('CPU load 1.2');
  });
});
