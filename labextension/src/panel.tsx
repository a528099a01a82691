import { ReactWidget, UseSignal } from '@jupyterlab/ui-components';
import * as React from 'react';

import {
  formatCredits,
  formatMemory,
  formatPricePerHour,
  parseCredits
} from './money';
import {
  IOfferFilter,
  OfferSort,
  SORT_LABELS,
  filterOffers,
  formatReliability,
  formatSpeed,
  gpuModels,
  isCpuOffer,
  offerLoad,
  pricePerSpeed,
  sortOffers,
  speedWarning,
  unmeasuredSpeed,
  useLabel
} from './offers';
import { GPUShare, IGPUShareModel } from './tokens';

/** What "Use this GPU" does with an offer (start the current notebook's kernel on it). */
export type UseOffer = (offer: GPUShare.IOffer) => Promise<void>;

interface IFilterText {
  gpuModel: string;
  minMemoryGiB: string;
  maxPrice: string;
  freeOnly: boolean;
}

/** The typed filter fields as a filter; invalid numbers filter nothing. */
function toFilter(text: IFilterText): IOfferFilter {
  const memory = Number(text.minMemoryGiB);
  const price = text.maxPrice.trim() ? parseCredits(text.maxPrice) : null;
  return {
    gpuModel: text.gpuModel,
    minMemoryMib:
      text.minMemoryGiB.trim() && Number.isFinite(memory) && memory >= 0
        ? Math.round(memory * 1024)
        : null,
    maxPricePerHourMicro: price,
    freeOnly: text.freeOnly
  };
}

function OfferCard(props: {
  offer: GPUShare.IOffer;
  onUse: UseOffer;
}): JSX.Element {
  const { offer } = props;
  const [busy, setBusy] = React.useState(false);
  const load = offerLoad(offer);
  const speed = formatSpeed(offer.speed);
  const warning = speedWarning(offer.speed);
  const unmeasured = unmeasuredSpeed(offer.speed);
  const perSpeed = pricePerSpeed(offer);
  const reliability = formatReliability(offer.reliability);
  const cpu = isCpuOffer(offer);
  const label = `${offer.gpu_model}${offer.gpu_count > 1 ? ` ×${offer.gpu_count}` : ''}`;
  return (
    <li
      className="jp-GPUShare-offer"
      aria-label={`Offer ${offer.id}: ${label} on ${offer.host_id}`}
      data-offer-id={offer.id}
      data-host-id={offer.host_id}
    >
      <div className="jp-GPUShare-offer-head">
        <span className="jp-GPUShare-offer-model">{label}</span>
        <span
          className={`jp-GPUShare-badge jp-GPUShare-badge-${offer.state}`}
          title={offer.state === 'free' ? 'Free to rent now' : 'In use'}
        >
          {offer.state}
        </span>
      </div>
      {warning && (
        <div
          className="jp-GPUShare-badge jp-GPUShare-badge-flagged"
          role="note"
          title="The host's self-test measured less than this hardware should do"
        >
          ⚠ {warning}
        </div>
      )}
      <div className="jp-GPUShare-offer-price">
        {formatPricePerHour(offer.price_per_hour_micro)}
      </div>
      <dl className="jp-GPUShare-offer-facts">
        <dt>GPUs</dt>
        <dd>{offer.gpu_count > 0 ? offer.gpu_count : 'none (CPU)'}</dd>
        <dt>Memory</dt>
        <dd>{formatMemory(offer.gpu_memory_mib)}</dd>
        <dt>Speed</dt>
        <dd
          className="jp-GPUShare-offer-speed"
          title={
            perSpeed !== null
              ? `${formatPricePerHour(Math.round(perSpeed))} per TFLOPS` +
                (offer.speed?.measured_at
                  ? `; measured ${offer.speed.measured_at}`
                  : '')
              : unmeasured.title
          }
        >
          {speed || unmeasured.text}
        </dd>
        <dt>Host</dt>
        <dd className="jp-GPUShare-offer-host">{offer.host_id}</dd>
        <dt>Record</dt>
        <dd
          className="jp-GPUShare-offer-reliability"
          title="Share of this host's past sessions that ended without the host being lost"
        >
          {reliability}
        </dd>
        {load && (
          <>
            <dt>Load</dt>
            <dd>{load}</dd>
          </>
        )}
      </dl>
      <button
        className="jp-mod-styled jp-mod-accept jp-GPUShare-use"
        disabled={busy || offer.state !== 'free'}
        title={`Start the current notebook's kernel on this ${cpu ? 'host' : 'GPU'} (or a new notebook)`}
        onClick={async () => {
          setBusy(true);
          try {
            await props.onUse(offer);
          } finally {
            setBusy(false);
          }
        }}
      >
        {useLabel(offer)}
      </button>
    </li>
  );
}

function Marketplace(props: {
  model: IGPUShareModel;
  onUse: UseOffer;
}): JSX.Element {
  const { model } = props;
  const [text, setText] = React.useState<IFilterText>({
    gpuModel: '',
    minMemoryGiB: '',
    maxPrice: '',
    freeOnly: false
  });
  const [sort, setSort] = React.useState<OfferSort>('price');
  const update = (change: Partial<IFilterText>) =>
    setText({ ...text, ...change });
  const priceInvalid =
    text.maxPrice.trim() !== '' && parseCredits(text.maxPrice) === null;

  return (
    <div className="jp-GPUShare-marketplace">
      <header className="jp-GPUShare-header">
        <h2>GPU marketplace</h2>
        <UseSignal signal={model.accountChanged} initialArgs={model.me}>
          {(_, me) =>
            me ? (
              <div className="jp-GPUShare-account" aria-label="Your credit">
                {me.name}:{' '}
                {formatCredits(me.available_micro ?? me.balance_micro)} credits
                available
              </div>
            ) : null
          }
        </UseSignal>
        <UseSignal signal={model.errorChanged} initialArgs={model.error}>
          {(_, error) =>
            error ? (
              <div className="jp-GPUShare-error" role="alert">
                {error}
              </div>
            ) : null
          }
        </UseSignal>
      </header>
      <UseSignal signal={model.offersChanged} initialArgs={model.offers}>
        {(_, offers) => {
          const all = offers ?? [];
          const shown = sortOffers(filterOffers(all, toFilter(text)), sort);
          return (
            <>
              <form
                className="jp-GPUShare-filters"
                aria-label="Filter offers"
                onSubmit={event => event.preventDefault()}
              >
                <label>
                  GPU model
                  <select
                    className="jp-mod-styled"
                    value={text.gpuModel}
                    onChange={e => update({ gpuModel: e.target.value })}
                  >
                    <option value="">Any</option>
                    {gpuModels(all).map(m => (
                      <option key={m} value={m}>
                        {m}
                      </option>
                    ))}
                  </select>
                </label>
                <label>
                  Min memory (GiB)
                  <input
                    className="jp-mod-styled"
                    type="number"
                    min="0"
                    step="1"
                    value={text.minMemoryGiB}
                    onChange={e => update({ minMemoryGiB: e.target.value })}
                  />
                </label>
                <label>
                  Max price (credits/h)
                  <input
                    className={`jp-mod-styled${priceInvalid ? ' jp-GPUShare-invalid' : ''}`}
                    type="text"
                    inputMode="decimal"
                    placeholder="any"
                    value={text.maxPrice}
                    onChange={e => update({ maxPrice: e.target.value })}
                  />
                </label>
                <label>
                  Sort by
                  <select
                    className="jp-mod-styled"
                    value={sort}
                    onChange={e => setSort(e.target.value as OfferSort)}
                  >
                    {(Object.keys(SORT_LABELS) as OfferSort[]).map(key => (
                      <option key={key} value={key}>
                        {SORT_LABELS[key]}
                      </option>
                    ))}
                  </select>
                </label>
                <label className="jp-GPUShare-check">
                  <input
                    type="checkbox"
                    checked={text.freeOnly}
                    onChange={e => update({ freeOnly: e.target.checked })}
                  />
                  Free only
                </label>
              </form>
              <div className="jp-GPUShare-count" aria-live="polite">
                {shown.length} of {all.length} offers
              </div>
              <ul className="jp-GPUShare-offers" aria-label="GPU offers">
                {shown.map(offer => (
                  <OfferCard key={offer.id} offer={offer} onUse={props.onUse} />
                ))}
              </ul>
              {all.length === 0 && (
                <p className="jp-GPUShare-empty">
                  No host is online right now.
                </p>
              )}
            </>
          );
        }}
      </UseSignal>
      <p className="jp-GPUShare-note">
        A host can read what runs on it; do not send it secrets you would not
        share.
      </p>
    </div>
  );
}

/** The left-sidebar marketplace panel. */
export class MarketplacePanel extends ReactWidget {
  constructor(model: IGPUShareModel, onUse: UseOffer) {
    super();
    this._model = model;
    this._onUse = onUse;
    this.addClass('jp-GPUShare-panel');
  }

  protected render(): JSX.Element {
    return <Marketplace model={this._model} onUse={this._onUse} />;
  }

  private _model: IGPUShareModel;
  private _onUse: UseOffer;
}
