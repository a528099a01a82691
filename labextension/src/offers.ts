import { formatPricePerHour } from './money';
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

export type OfferSort = 'price' | 'speed' | 'value' | 'memory' | 'gpus';

export const SORT_LABELS: Record<OfferSort, string> = {
  price: 'Price (lowest first)',
  speed: 'Speed (fastest first)',
  value: 'Price per speed (lowest first)',
  memory: 'Memory (most first)',
  gpus: 'GPU count (most first)'
};

/** The offer's measured speed score, or null when not measured (or not positive). */
export function speedScore(offer: GPUShare.IOffer): number | null {
  const score = offer.speed?.score;
  return typeof score === 'number' && Number.isFinite(score) && score > 0
    ? score
    : null;
}

/** Price per hour (micro-credits) per unit of speed score, or null without a score. */
export function pricePerSpeed(offer: GPUShare.IOffer): number | null {
  const score = speedScore(offer);
  return score === null ? null : offer.price_per_hour_micro / score;
}

/** The offer runs on a CPU (no GPU offered, or measured as a CPU). */
export function isCpuOffer(offer: GPUShare.IOffer): boolean {
  return offer.gpu_count <= 0 || offer.speed?.kind === 'cpu';
}

/** "98 % reliable", or "new host" while the broker has no record of the host. */
export function formatReliability(
  reliability: number | null | undefined
): string {
  if (typeof reliability !== 'number' || !Number.isFinite(reliability)) {
    return 'new host';
  }
  // Rounded down: 99.9 % is not yet "100 % reliable".
  const pct = Math.floor(Math.min(1, Math.max(0, reliability)) * 100 + 1e-9);
  return `${pct} % reliable`;
}

/** A number with about three significant digits: 312, 31.2, 3.12, 0.312. */
function threeDigits(value: number): string {
  const abs = Math.abs(value);
  if (abs >= 100) {
    return String(Math.round(value));
  }
  if (abs >= 10) {
    return value.toFixed(1);
  }
  if (abs >= 1) {
    return value.toFixed(2);
  }
  return value.toFixed(3);
}

/**
 * The measured speed with its unit: "165 TFLOPS fp16" for a GPU, "85.3 GFLOPS fp32" for a
 * CPU (its score is fp32 GFLOPS / 1000), or '' until measured.
 */
export function formatSpeed(speed: GPUShare.ISpeed | null | undefined): string {
  const score = speed?.score;
  if (!speed || typeof score !== 'number' || !Number.isFinite(score)) {
    return '';
  }
  if (speed.kind === 'cpu') {
    return score * 1000 >= 1000
      ? `${threeDigits(score)} TFLOPS fp32`
      : `${threeDigits(score * 1000)} GFLOPS fp32`;
  }
  return `${threeDigits(score)} TFLOPS fp16`;
}

/**
 * What the Speed cell says without a score, and its tooltip: the host had nothing to
 * measure with (its reason), or its self-test has not reported yet.
 */
export function unmeasuredSpeed(speed: GPUShare.ISpeed | null | undefined): {
  text: string;
  title: string;
} {
  if (speed?.not_measured) {
    return {
      text: 'not measured',
      title: `The host could not run its self-test: ${speed.not_measured}`
    };
  }
  return {
    text: 'not measured yet',
    title: "The host's self-test has not reported yet"
  };
}

/** "flagged: <reason>" when the self-test flagged the offer, else ''. */
export function speedWarning(
  speed: GPUShare.ISpeed | null | undefined
): string {
  if (!speed?.flagged) {
    return '';
  }
  return `flagged: ${speed.flag_reason || 'the self-test found a problem'}`;
}

/** The label of the button that rents an offer. */
export function useLabel(offer: GPUShare.IOffer): string {
  return isCpuOffer(offer) ? 'Use this host' : 'Use this GPU';
}

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

/**
 * Offers in order; ties go to free offers, then to the lower id (stable across polls).
 * Sorting by speed or price per speed puts offers without a measured speed last.
 */
export function sortOffers(
  offers: ReadonlyArray<GPUShare.IOffer>,
  sort: OfferSort
): GPUShare.IOffer[] {
  const key = (offer: GPUShare.IOffer): number => {
    switch (sort) {
      case 'speed': {
        const score = speedScore(offer);
        return score === null ? Infinity : -score;
      }
      case 'value':
        return pricePerSpeed(offer) ?? Infinity;
      case 'memory':
        return -offer.gpu_memory_mib * Math.max(1, offer.gpu_count);
      case 'gpus':
        return -offer.gpu_count;
      default:
        return offer.price_per_second_micro;
    }
  };
  const compare = (a: number, b: number): number =>
    a === b ? 0 : a < b ? -1 : 1;
  return [...offers].sort(
    (a, b) =>
      compare(key(a), key(b)) ||
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

/** The cheapest free offer, or null when none is free. */
export function cheapestFreeOffer(
  offers: ReadonlyArray<GPUShare.IOffer>
): GPUShare.IOffer | null {
  const free = offers.filter(offer => offer.state === 'free');
  return sortOffers(free, 'price')[0] ?? null;
}

/**
 * The launcher card's label: "Shared GPU · from 0.60 cr/h" (the cheapest free offer),
 * "Shared GPU · all hosts busy", or "Shared GPU · no host online".
 */
export function launcherLabel(offers: ReadonlyArray<GPUShare.IOffer>): string {
  const cheapest = cheapestFreeOffer(offers);
  if (cheapest) {
    return `Shared GPU · from ${formatPricePerHour(cheapest.price_per_hour_micro)}`;
  }
  return offers.length > 0
    ? 'Shared GPU · all hosts busy'
    : 'Shared GPU · no host online';
}
