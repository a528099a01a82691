import { describe, expect, it } from 'vitest';

import {
  NO_FILTER,
  filterOffers,
  gpuModels,
  offerLoad,
  sortOffers
} from '../src/offers';
import { offer } from './fixtures';

const a100 = offer({
  id: 1,
  gpu_model: 'A100',
  gpu_memory_mib: 81920,
  price_per_second_micro: 1000
});
const t4 = offer({
  id: 2,
  gpu_model: 'T4',
  gpu_memory_mib: 16384,
  price_per_second_micro: 100
});
const h100 = offer({
  id: 3,
  gpu_model: 'H100',
  gpu_count: 2,
  gpu_memory_mib: 81920,
  price_per_second_micro: 3000,
  state: 'busy'
});
const cpu = offer({
  id: 4,
  gpu_model: 'CPU',
  gpu_count: 0,
  gpu_memory_mib: 0,
  price_per_second_micro: 10
});
const all = [a100, t4, h100, cpu];
const ids = (list: { id: number }[]) => list.map(o => o.id);

describe('filterOffers', () => {
  it('keeps everything without a filter', () => {
    expect(ids(filterOffers(all, NO_FILTER))).toEqual([1, 2, 3, 4]);
  });
  it('filters by model, memory, price and freeness', () => {
    expect(ids(filterOffers(all, { ...NO_FILTER, gpuModel: 'T4' }))).toEqual([
      2
    ]);
    expect(
      ids(filterOffers(all, { ...NO_FILTER, minMemoryMib: 40 * 1024 }))
    ).toEqual([1, 3]);
    expect(
      ids(filterOffers(all, { ...NO_FILTER, maxPricePerHourMicro: 3_600_000 }))
    ).toEqual([1, 2, 4]);
    expect(ids(filterOffers(all, { ...NO_FILTER, freeOnly: true }))).toEqual([
      1, 2, 4
    ]);
  });
  it('combines filters', () => {
    const filter = {
      ...NO_FILTER,
      minMemoryMib: 1024,
      maxPricePerHourMicro: 1_000_000
    };
    expect(ids(filterOffers(all, filter))).toEqual([2]);
  });
});

describe('sortOffers', () => {
  it('sorts by price, lowest first', () => {
    expect(ids(sortOffers(all, 'price'))).toEqual([4, 2, 1, 3]);
  });
  it('sorts by total memory, then free before busy', () => {
    const busyA100 = offer({ ...a100, id: 9, state: 'busy' });
    expect(ids(sortOffers([busyA100, ...all], 'memory'))).toEqual([
      3, 1, 9, 2, 4
    ]);
  });
  it('sorts by GPU count', () => {
    expect(ids(sortOffers(all, 'gpus'))[0]).toBe(3);
  });
  it('does not change its input', () => {
    const copy = [...all];
    sortOffers(all, 'price');
    expect(all).toEqual(copy);
  });
});

describe('models and load', () => {
  it('lists models once, sorted', () => {
    expect(gpuModels([...all, a100])).toEqual(['A100', 'CPU', 'H100', 'T4']);
  });
  it('averages GPU utilisation, else shows CPU load', () => {
    expect(
      offerLoad(
        offer({
          telemetry: {
            gpus: [
              { index: 0, utilization_pct: 30 },
              { index: 1, utilization_pct: 51 }
            ]
          }
        })
      )
    ).toBe('41 % GPU');
    expect(
      offerLoad(offer({ telemetry: { gpus: [], cpu: { load_1m: 0.5 } } }))
    ).toBe('load 0.50');
    expect(offerLoad(offer({}))).toBe('');
  });
});
