import type { GPUShare } from './tokens';

/** What the marketplace panel filters on; null or '' means "any". */
export interface IOfferFilter {
  /** Exact GPU model, or '' for any. */
  gpuModel: string;
  /** Minimum GPU memory in MiB, or null. */
  minMemoryMib: number | null;
  /** Maximum price per hour in micro-credits, or null. */
  maxPricePerHourMicro: number | null;
  /** Hide busy offers. */
  freeOnly: boolean;
}

export const NO_FILTER: IOfferFilter = {
  gpuModel: '',
  minMemoryMib: null,
  maxPricePerHourMicro: null,
  freeOnly: false
};

export type OfferSort = 'price' | 'memory' | 'gpus';

export const SORT_LABELS: Record<OfferSort, string> = {
  price: 'Price (lowest first)',
  memory: 'Memory (most first)',
  gpus: 'GPU count (most first)'
};

/** The offers that pass a filter. */
export function filterOffers(
  offers: ReadonlyArray<GPUShare.IOffer>,
  filter: IOfferFilter
): GPUShare.IOffer[] {
  return offers.filter(
    offer =>
      (!filter.gpuModel || offer.gpu_model === filter.gpuModel) &&
      (filter.minMemoryMib === null ||
        offer.gpu_memory_mib >= filter.minMemoryMib) &&
      (filter.maxPricePerHourMicro === null ||
        offer.price_per_hour_micro <= filter.maxPricePerHourMicro) &&
      (!filter.freeOnly || offer.state === 'free')
  );
}

/** Offers in order; ties go to free offers, then to the lower id (stable across polls). */
export function sortOffers(
  offers: ReadonlyArray<GPUShare.IOffer>,
  sort: OfferSort
): GPUShare.IOffer[] {
  const key = (offer: GPUShare.IOffer): number => {
    switch (sort) {
      case 'memory':
        return -offer.gpu_memory_mib * Math.max(1, offer.gpu_count);
      case 'gpus':
        return -offer.gpu_count;
      default:
        return offer.price_per_second_micro;
    }
  };
  return [...offers].sort(
    (a, b) =>
      key(a) - key(b) ||
      Number(a.state !== 'free') - Number(b.state !== 'free') ||
      a.id - b.id
  );
}

/** The GPU models on offer, sorted, each once. */
export function gpuModels(offers: ReadonlyArray<GPUShare.IOffer>): string[] {
  return [...new Set(offers.map(offer => offer.gpu_model))].sort();
}

/** GPU utilisation of an offer's GPUs as reported by its host ("37 %"), or '' if unknown. */
export function offerLoad(offer: GPUShare.IOffer): string {
  const gpus = offer.telemetry?.gpus ?? [];
  const values = gpus
    .map(gpu => gpu.utilization_pct)
    .filter((v): v is number => typeof v === 'number');
  if (values.length > 0) {
    return `${Math.round(values.reduce((a, b) => a + b, 0) / values.length)} % GPU`;
  }
  const cpu = offer.telemetry?.cpu;
  if (cpu && typeof cpu.load_1m === 'number') {
    return `load ${cpu.load_1m.toFixed(2)}`;
  }
  return '';
}
