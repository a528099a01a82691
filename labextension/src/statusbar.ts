import { Dialog, showDialog } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { Widget } from '@lumino/widgets';

import { gpuIcon } from './icons';
import { endReasonText, meterReading } from './meter';
import { formatCredits, formatDuration, formatPricePerHour } from './money';
import { INotebookGPUs, NotebookGPU } from './notebook';
import { GPUShare, IGPUShareModel } from './tokens';

/** Rows describing a session (live figures computed at `nowMs`). */
export function sessionRows(
  session: GPUShare.ISession,
  model: IGPUShareModel,
  nowMs: number
): Array<[string, string]> {
  const reading = meterReading(session, nowMs, model.me?.available_micro ?? null);
  const offer = model.offers.find(o => o.id === session.offer_id);
  const rows: Array<[string, string]> = [
    ['Session', session.id],
    ['Host', session.host_id],
    ['GPU', offer ? `${offer.gpu_model}${offer.gpu_count > 1 ? ` ×${offer.gpu_count}` : ''}` : '–'],
    ['Price', formatPricePerHour(session.price_per_hour_micro)],
    ['State', session.state === 'ended' ? `ended: ${endReasonText(session.end_reason)}` : session.state]
  ];
  const gpus = offer?.telemetry?.gpus ?? [];
  const used = gpus.filter(g => session.gpu_indices.includes(g.index));
  for (const g of used) {
    const parts = [];
    if (typeof g.utilization_pct === 'number') {
      parts.push(`${g.utilization_pct} %`);
    }
    if (typeof g.memory_used_mib === 'number') {
      parts.push(`${g.memory_used_mib} MiB used`);
    }
    if (parts.length) {
      rows.push([`GPU ${g.index}`, parts.join(', ')]);
    }
  }
  if (session.state === 'ended') {
    rows.push(['Billed time', `${session.billed_seconds ?? 0} s`]);
    rows.push(['Bill', `${formatCredits(session.amount_micro ?? 0)} credits`]);
  } else {
    rows.push(['Elapsed', formatDuration(reading.elapsedSeconds)]);
    rows.push(['Cost so far', `${formatCredits(reading.costMicro, 4, 6)} credits`]);
  }
  if (reading.remainingMicro !== null) {
    rows.push(['Credit left', `${formatCredits(reading.remainingMicro)} credits`]);
  }
  return rows;
}

/** A table of a session that refreshes itself every second while shown. */
class SessionDetails extends Widget {
  constructor(model: IGPUShareModel, sessionId: string) {
    super();
    this._model = model;
    this._sessionId = sessionId;
    this.addClass('jp-GPUShare-details');
    this._render();
    this._timer = window.setInterval(() => this._render(), 1000);
  }

  dispose(): void {
    window.clearInterval(this._timer);
    super.dispose();
  }

  private _render(): void {
    const session = this._model.session(this._sessionId);
    const table = document.createElement('table');
    if (session) {
      for (const [name, value] of sessionRows(session, this._model, Date.now())) {
        const row = table.insertRow();
        const th = document.createElement('th');
        th.textContent = name;
        row.appendChild(th);
        row.insertCell().textContent = value;
      }
    }
    this.node.replaceChildren(table);
  }

  private _model: IGPUShareModel;
  private _sessionId: string;
  private _timer: number;
}

/** The status-bar meter of the active notebook's remote kernel. */
export class GPUMeter extends Widget {
  constructor(model: IGPUShareModel, notebooks: INotebookTracker, gpus: INotebookGPUs) {
    super({ node: document.createElement('button') });
    this._model = model;
    this._notebooks = notebooks;
    this._gpus = gpus;
    this.addClass('jp-GPUShare-meter');
    this.node.setAttribute('aria-label', 'Shared GPU meter');
    this.node.title = 'Shared GPU session: click for details';
    this.node.onclick = () => void this.openDetails();
    notebooks.currentChanged.connect(this.update, this);
    gpus.changed.connect(this.update, this);
    model.sessionsChanged.connect(this.update, this);
    model.accountChanged.connect(this.update, this);
    this._timer = window.setInterval(() => this.update(), 1000);
  }

  /** The state of the notebook the meter follows. */
  get current(): NotebookGPU | null {
    const panel: NotebookPanel | null = this._notebooks.currentWidget;
    return panel ? (this._gpus.get(panel) ?? null) : null;
  }

  /** Show the meter when the current notebook has a remote kernel (or had one). */
  get shown(): boolean {
    const gpu = this.current;
    return !!gpu && (gpu.isRemote || gpu.session !== null);
  }

  dispose(): void {
    window.clearInterval(this._timer);
    super.dispose();
  }

  /** Details of the session; Stop, then the bill. */
  async openDetails(): Promise<void> {
    const gpu = this.current;
    const session = gpu?.session;
    if (!gpu || !session) {
      return;
    }
    const live = session.state === 'running' || session.state === 'starting';
    const result = await showDialog({
      title: live ? 'Shared GPU session' : 'Shared GPU session: bill',
      body: new SessionDetails(this._model, session.id),
      buttons: live
        ? [Dialog.cancelButton({ label: 'Close' }), Dialog.warnButton({ label: 'Stop' })]
        : [Dialog.okButton({ label: 'Close' })]
    });
    if (!live || !result.button.accept) {
      return;
    }
    const ended = await gpu.stop();
    if (ended) {
      await showDialog({
        title: 'Shared GPU session: bill',
        body: new SessionDetails(this._model, ended.id),
        buttons: [Dialog.okButton({ label: 'Close' })]
      });
    }
  }

  protected onUpdateRequest(): void {
    const gpu = this.current;
    const session = gpu?.session ?? null;
    const node = this.node;
    node.replaceChildren();
    if (!gpu || !this.shown) {
      this.hide();
      return;
    }
    this.show();
    const icon = gpuIcon.element({ tag: 'span', className: 'jp-GPUShare-meter-icon' });
    node.appendChild(icon);
    const text = document.createElement('span');
    text.className = 'jp-GPUShare-meter-text';
    node.appendChild(text);
    if (!session || gpu.phase === 'finding' || gpu.phase === 'starting') {
      text.textContent =
        gpu.phase === 'starting'
          ? `GPU: starting on ${gpu.startingOn?.host_id ?? 'a host'}…`
          : gpu.phase === 'finding'
            ? 'GPU: finding a host…'
            : 'GPU: no session';
      node.dataset.state = 'starting';
      return;
    }
    const reading = meterReading(session, Date.now(), this._model.me?.available_micro ?? null);
    node.dataset.state = session.state;
    node.dataset.costMicro = String(reading.costMicro);
    const left =
      reading.remainingMicro !== null ? ` · ${formatCredits(reading.remainingMicro)} left` : '';
    if (reading.live) {
      text.textContent =
        `${session.host_id} · ${formatDuration(reading.elapsedSeconds)} · ` +
        `${formatCredits(reading.costMicro, 4, 4)} cr${left}`;
    } else {
      text.textContent = `${session.host_id} · ended · bill ${formatCredits(reading.costMicro, 2, 6)} cr`;
    }
  }

  private _model: IGPUShareModel;
  private _notebooks: INotebookTracker;
  private _gpus: INotebookGPUs;
  private _timer: number;
}
