import { Dialog, showDialog } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { IDisposable } from '@lumino/disposable';
import { Widget } from '@lumino/widgets';

import { formatQuotaLeft, quotaLeftAt, sessionClass } from './classes';
import { gpuIcon } from './icons';
import { endReasonText, meterReading, telemetryText } from './meter';
import { formatCredits, formatDuration, formatPricePerHour } from './money';
import { INotebookGPUs, NotebookGPU } from './notebook';
import { GPUShare, IGPUShareClasses, IGPUShareModel } from './tokens';

/** "<quota> left" of the class a session is charged to, from the last usage poll, or null. */
export function classQuotaText(
  session: GPUShare.ISession,
  classes: IGPUShareClasses | null,
  nowMs: number
): string | null {
  const name = sessionClass(session);
  const row =
    name && classes ? (classes.usage(name)?.students[0] ?? null) : null;
  if (!name || !classes || !row) {
    return null;
  }
  const left = quotaLeftAt(
    row,
    classes.usagePolledAt(name),
    nowMs,
    session.price_per_second_micro
  );
  return formatQuotaLeft(left);
}

/** Rows describing a session (live figures computed at `nowMs`). */
export function sessionRows(
  session: GPUShare.ISession,
  model: IGPUShareModel,
  nowMs: number,
  classes: IGPUShareClasses | null = null
): Array<[string, string]> {
  const klass = sessionClass(session);
  const reading = meterReading(
    session,
    nowMs,
    model.me?.available_micro ?? null
  );
  const offer = model.offers.find(o => o.id === session.offer_id);
  const rows: Array<[string, string]> = [
    ['Session', session.id],
    ['Host', session.host_id],
    [
      'GPU',
      offer
        ? `${offer.gpu_model}${offer.gpu_count > 1 ? ` ×${offer.gpu_count}` : ''}`
        : '–'
    ],
    ['Price', formatPricePerHour(session.price_per_hour_micro)],
    [
      'State',
      session.state === 'ended'
        ? `ended: ${endReasonText(session.end_reason)}`
        : session.state
    ]
  ];
  // The session's own telemetry (its GPUs only) while live; else the offer's.
  const telemetry = session.host_telemetry ?? offer?.telemetry ?? null;
  const gpus = telemetry?.gpus ?? [];
  const used = gpus.filter(g => session.gpu_indices.includes(g.index));
  if (used.length === 0 && session.host_telemetry) {
    const load = telemetryText(session.host_telemetry);
    if (load) {
      rows.push(['Load', load]);
    }
  }
  for (const g of used) {
    const parts = [];
    if (typeof g.utilization_pct === 'number') {
      parts.push(`${g.utilization_pct} %`);
    }
    if (typeof g.memory_used_mib === 'number') {
      parts.push(
        typeof g.memory_total_mib === 'number'
          ? `${g.memory_used_mib} of ${g.memory_total_mib} MiB used`
          : `${g.memory_used_mib} MiB used`
      );
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
    rows.push([
      'Cost so far',
      `${formatCredits(reading.costMicro, 4, 6)} credits`
    ]);
  }
  if (klass) {
    rows.push(['Charged to', `class ${klass} (not your credit)`]);
    const quota = classQuotaText(session, classes, nowMs);
    if (quota !== null) {
      rows.push(['Quota left', quota]);
    }
  } else if (reading.remainingMicro !== null) {
    rows.push([
      'Credit left',
      `${formatCredits(reading.remainingMicro)} credits`
    ]);
  }
  return rows;
}

/** A table of a session that refreshes itself every second while shown. */
class SessionDetails extends Widget {
  constructor(
    model: IGPUShareModel,
    sessionId: string,
    classes: IGPUShareClasses | null
  ) {
    super();
    this._model = model;
    this._classes = classes;
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
      for (const [name, value] of sessionRows(
        session,
        this._model,
        Date.now(),
        this._classes
      )) {
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
  private _classes: IGPUShareClasses | null;
  private _sessionId: string;
  private _timer: number;
}

/** The status-bar meter of the active notebook's remote kernel. */
export class GPUMeter extends Widget {
  constructor(
    model: IGPUShareModel,
    notebooks: INotebookTracker,
    gpus: INotebookGPUs,
    classes: IGPUShareClasses | null = null
  ) {
    super({ node: document.createElement('button') });
    this._model = model;
    this._classes = classes;
    classes?.changed.connect(this.update, this);
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
    this._classWatch?.dispose();
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
      body: new SessionDetails(this._model, session.id, this._classes),
      buttons: live
        ? [
            Dialog.cancelButton({ label: 'Close' }),
            Dialog.warnButton({ label: 'Stop' })
          ]
        : [Dialog.okButton({ label: 'Close' })]
    });
    if (!live || !result.button.accept) {
      return;
    }
    const ended = await gpu.stop();
    if (ended) {
      await showDialog({
        title: 'Shared GPU session: bill',
        body: new SessionDetails(this._model, ended.id, this._classes),
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
      this._watchClass(null);
      this.hide();
      return;
    }
    this.show();
    const icon = gpuIcon.element({
      tag: 'span',
      className: 'jp-GPUShare-meter-icon'
    });
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
    const now = Date.now();
    const reading = meterReading(
      session,
      now,
      this._model.me?.available_micro ?? null
    );
    node.dataset.state = session.state;
    node.dataset.costMicro = String(reading.costMicro);
    const klass = sessionClass(session);
    this._watchClass(reading.live ? klass : null);
    let left =
      reading.remainingMicro !== null
        ? ` · ${formatCredits(reading.remainingMicro)} left`
        : '';
    if (klass) {
      // Charged to the class: the student's quota matters, not their own credit.
      node.dataset.class = klass;
      const quota = classQuotaText(session, this._classes, now);
      left = ` · charged to ${klass}${quota !== null ? ` · ${quota} left` : ''}`;
      if (!reading.live) {
        text.textContent = `${session.host_id} · ended · charged to ${klass}`;
        return;
      }
    } else {
      delete node.dataset.class;
    }
    if (reading.live) {
      text.textContent =
        `${session.host_id} · ${formatDuration(reading.elapsedSeconds)} · ` +
        `${formatCredits(reading.costMicro, 4, 4)} cr${left}`;
      const load = telemetryText(session.host_telemetry);
      if (load) {
        const telemetry = document.createElement('span');
        telemetry.className = 'jp-GPUShare-meter-telemetry';
        telemetry.textContent = ` · ${load}`;
        node.appendChild(telemetry);
      }
    } else {
      text.textContent = `${session.host_id} · ended · bill ${formatCredits(reading.costMicro, 2, 6)} cr`;
    }
  }

  /** Keep the usage of the class of the shown session polled (for its quota left). */
  private _watchClass(name: string | null): void {
    if (name === this._classWatched) {
      return;
    }
    this._classWatch?.dispose();
    this._classWatch = null;
    this._classWatched = name;
    if (name && this._classes) {
      this._classWatch = this._classes.watch(name);
    }
  }

  private _model: IGPUShareModel;
  private _classes: IGPUShareClasses | null;
  private _classWatch: IDisposable | null = null;
  private _classWatched: string | null = null;
  private _notebooks: INotebookTracker;
  private _gpus: INotebookGPUs;
  private _timer: number;
}
