import type { GPUShare } from '../src/tokens';

export function offer(overrides: Partial<GPUShare.IOffer>): GPUShare.IOffer {
  const perSecond = overrides.price_per_second_micro ?? 1000;
  return {
    id: 1,
    host_id: 'host-a',
    gpu_model: 'NVIDIA A100-SXM4-80GB',
    gpu_count: 1,
    gpu_memory_mib: 81920,
    price_per_second_micro: perSecond,
    price_per_hour_micro: perSecond * 3600,
    state: 'free',
    telemetry: {},
    ...overrides
  };
}

export function session(
  overrides: Partial<GPUShare.ISession>
): GPUShare.ISession {
  return {
    id: 's-1',
    state: 'running',
    renter: 'ada',
    payer: 'ada',
    host_id: 'host-a',
    offer_id: 1,
    gpu_indices: [0],
    price_per_second_micro: 1000,
    price_per_hour_micro: 3_600_000,
    created_at: '2030-01-01T00:00:00Z',
    started_at: '2030-01-01T00:00:01Z',
    ended_at: null,
    started_us: 1_000_000_000_000,
    ended_us: null,
    end_reason: null,
    billed_seconds: null,
    amount_micro: null,
    cost_so_far_micro: 0,
    ...overrides
  };
}
