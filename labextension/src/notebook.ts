import { Notification } from '@jupyterlab/apputils';
import { NotebookPanel } from '@jupyterlab/notebook';
import { Token } from '@lumino/coreutils';
import { IDisposable } from '@lumino/disposable';
import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import { capLevel, spentToday } from './caps';
import { endReasonText, meterReading } from './meter';
import { creditsToMicro, formatCredits } from './money';
import { OutputRestorer } from './outputs';
import {
  GPUShare,
  IGPUShareModel,
  KERNEL_NAME,
  isRemoteKernelName
} from './tokens';

/** How long before a broker stop (quota or credit) the notebook is saved. */
const SAVE_BEFORE_STOP_MS = 3000;
/** Start-up phases of a remote kernel shown on its notebook. */
export type Phase = 'none' | 'finding' | 'starting' | 'ready';

/** A notice on a notebook about how its session ended. */
export interface INotice {
  sessionId: string;
  kind: 'host-lost' | 'credit' | 'cap' | 'failed' | 'culled' | 'ended' | 'idle';
  text: string;
}

const STARTING = new Set([
  'initializing',
  'starting',
  'restarting',
  'autorestarting'
]);

/** One notebook's remote kernel: its session, start-up phase and end notices. */
export class NotebookGPU implements IDisposable {
  constructor(panel: NotebookPanel, model: IGPUShareModel) {
    this.panel = panel;
    this._model = model;
    this._outputs = new OutputRestorer(panel);
    const ctx = panel.sessionContext;
    ctx.kernelChanged.connect(this._onKernelChanged, this);
    ctx.statusChanged.connect(this._update, this);
    ctx.connectionStatusChanged.connect(this._update, this);
    model.sessionsChanged.connect(this._update, this);
    model.kernelSessionChanged.connect(this._update, this);
    model.kernelCulled.connect(this._onKernelCulled, this);
    this._timer = window.setInterval(() => this._update(), 500);
    this._onKernelChanged();
  }

  readonly panel: NotebookPanel;

  /** Emitted whenever what this notebook shows may have changed. */
  get changed(): ISignal<NotebookGPU, void> {
    return this._changed;
  }

  /** The kernel's id, kept after it shuts down so its bill can still be shown. */
  get kernelId(): string | null {
    return this._kernelId;
  }

  /** The kernelspec name of the (last) remote kernel, for starting it again. */
  get kernelName(): string | null {
    return this._kernelName;
  }

  /** The notebook runs (or is starting) a gpu-share kernel. */
  get isRemote(): boolean {
    const ctx = this.panel.sessionContext;
    const name = ctx.session?.kernel?.name ?? ctx.kernelPreference.name;
    return isRemoteKernelName(name);
  }

  /** The newest session of this notebook's kernel. */
  get session(): GPUShare.ISession | null {
    return this._kernelId
      ? (this._model.sessionsOfKernel(this._kernelId)[0] ?? null)
      : null;
  }

  get phase(): Phase {
    return this._phase;
  }

  /** The host the kernel is starting on, while starting. */
  get startingOn(): GPUShare.ISession | null {
    return this._startingOn;
  }

  get notice(): INotice | null {
    return this._notice;
  }

  get isDisposed(): boolean {
    return this._isDisposed;
  }

  /** Show a notice (e.g. a spending cap stop). */
  setNotice(notice: INotice | null): void {
    if (notice === null && this._notice?.kind === 'idle') {
      this._dismissedIdle = this._shownIdle; // not shown again for the same warning
    }
    this._notice = notice;
    this._lastKey = '';
    this._changed.emit();
  }

  /** Shut the kernel down (which stops the session and its bill); answer the ended session. */
  async stop(): Promise<GPUShare.ISession | null> {
    const session = this.session;
    const ctx = this.panel.sessionContext;
    if (ctx.session?.kernel) {
      await ctx.shutdown();
    } else if (
      session &&
      (session.state === 'running' || session.state === 'starting')
    ) {
      await this._model.stopSession(session.id);
    }
    if (!session) {
      return null;
    }
    for (let attempt = 0; attempt < 20; attempt++) {
      await this._model.refresh();
      const now = this._model.session(session.id);
      if (now && now.state === 'ended') {
        return now;
      }
      await new Promise(resolve => setTimeout(resolve, 250));
    }
    return this._model.session(session.id);
  }

  dispose(): void {
    if (this._isDisposed) {
      return;
    }
    this._isDisposed = true;
    window.clearInterval(this._timer);
    this._watch?.dispose();
    this._outputs.dispose();
    Signal.clearData(this);
  }

  private _onKernelChanged(): void {
    const kernel = this.panel.sessionContext.session?.kernel;
    if (!kernel && this._watch) {
      // Shut down: learn the last session's end, then stop asking about this kernel.
      const watch = this._watch;
      this._watch = null;
      void this._model.refresh().then(() => watch.dispose());
    }
    if (kernel && kernel.id !== this._kernelId) {
      this._watch?.dispose();
      this._watch = null;
      this._kernelId = isRemoteKernelName(kernel.name) ? kernel.id : null;
      if (this._kernelId) {
        this._kernelName = kernel.name;
        if (this._notice?.kind === 'culled') {
          this.setNotice(null); // a new kernel: the old one's cull is history
        }
        this._watch = this._model.watchKernel(this._kernelId);
        // A kernel that ran cells before this page opened (a refresh): their outputs.
        void this.panel.context.ready.then(() => {
          if (!this._isDisposed) {
            void this._outputs.attach(kernel);
          }
        });
      }
    }
    this._update();
  }

  private _update(): void {
    if (this._isDisposed) {
      return;
    }
    const ctx = this.panel.sessionContext;
    const kernel = ctx.session?.kernel;
    const status = ctx.kernelDisplayStatus;
    const session = this.session;
    this._startingOn = null;
    if (!this.isRemote) {
      this._phase = 'none';
      this._startingSince = 0;
    } else if (
      STARTING.has(status) ||
      (kernel && kernel.connectionStatus === 'connecting' && !session)
    ) {
      if (!this._startingSince) {
        this._startingSince = Date.now();
      }
      // Until the server answers with the kernel, the newest starting session of ours
      // created since the start tells which host it is on.
      const since = this._startingSince - 5000;
      const starting =
        (session && session.state === 'starting' ? session : null) ??
        this._model.sessions.find(
          s => s.state === 'starting' && Date.parse(s.created_at ?? '') >= since
        ) ??
        null;
      this._startingOn = starting;
      this._phase = starting ? 'starting' : 'finding';
    } else if (
      kernel &&
      session &&
      session.state === 'running' &&
      this._startingSince
    ) {
      this._phase = 'ready';
      this._readySince = this._readySince || Date.now();
      if (Date.now() - this._readySince > 4000) {
        this._phase = 'none';
        this._startingSince = 0;
        this._readySince = 0;
      }
    } else {
      this._phase = 'none';
      this._startingSince = 0;
      this._readySince = 0;
    }
    // The broker's warning that it will stop an idle kernel (gone once a cell runs).
    const idleAt = session?.state === 'running' ? session.idle_stop_at : null;
    if (
      idleAt &&
      this._notice?.kind !== 'idle' &&
      session &&
      this._dismissedIdle !== idleAt
    ) {
      this._shownIdle = idleAt;
      const at = new Date(idleAt).toLocaleTimeString([], {
        hour: '2-digit',
        minute: '2-digit'
      });
      this.setNotice({
        sessionId: session.id,
        kind: 'idle',
        text: `This kernel is idle and will be stopped at ${at} (your idle limit); run a cell to keep it. Its files are being brought back.`
      });
    } else if (!idleAt && this._notice?.kind === 'idle') {
      this.setNotice(null);
    }
    if (!idleAt) {
      this._dismissedIdle = null;
    }
    // Notices for sessions seen live that ended for a reason worth telling.
    if (this._kernelId) {
      for (const s of this._model.sessionsOfKernel(this._kernelId)) {
        if (s.state === 'running' || s.state === 'starting') {
          this._seenLive.add(s.id);
        } else if (s.state === 'ended' && this._seenLive.has(s.id)) {
          this._seenLive.delete(s.id);
          this._announce(s);
        }
      }
    }
    const key = [
      this._kernelId,
      this._phase,
      this._startingOn?.id,
      session?.id,
      session?.state,
      session?.cost_so_far_micro,
      this._notice?.sessionId
    ].join('|');
    if (key !== this._lastKey) {
      this._lastKey = key;
      this._changed.emit();
    }
  }

  /** The server culled a kernel for being idle: say so, with its bill once known. */
  private _onKernelCulled(_: IGPUShareModel, kernelId: string): void {
    if (kernelId !== this._kernelId) {
      return;
    }
    this._showCulled(this.session);
  }

  private _showCulled(session: GPUShare.ISession | null): void {
    const bill =
      session && session.state === 'ended'
        ? ` Billed ${session.billed_seconds ?? 0} s: ${formatCredits(session.amount_micro ?? 0)} credits.`
        : '';
    this.setNotice({
      sessionId: session?.id ?? '',
      kind: 'culled',
      text: `This kernel was stopped after being idle; its bill is final.${bill}`
    });
  }

  private _announce(session: GPUShare.ISession): void {
    if (this._notice?.kind === 'cap' && this._notice.sessionId === session.id) {
      return; // we stopped it ourselves and already said why
    }
    if (
      this._notice?.kind === 'culled' ||
      (this._kernelId && this._model.isCulled(this._kernelId))
    ) {
      this._showCulled(session); // now with the bill
      return;
    }
    if (this._notice?.kind === 'idle') {
      this._notice = null; // the warning is history: say how it ended
    }
    const reason = session.end_reason;
    const bill = `Billed ${session.billed_seconds ?? 0} s: ${formatCredits(session.amount_micro ?? 0)} credits.`;
    if (reason === 'host lost') {
      this.setNotice({
        sessionId: session.id,
        kind: 'host-lost',
        text: `Host ${session.host_id} was lost: the kernel and its variables are gone (the notebook is safe here). Billing stopped at the host's last heartbeat. ${bill}`
      });
    } else if (reason === 'credit exhausted') {
      this.setNotice({
        sessionId: session.id,
        kind: 'credit',
        text: `The kernel on ${session.host_id} was stopped: your credit ran out. ${bill}`
      });
    } else if (reason === 'start failed') {
      this.setNotice({
        sessionId: session.id,
        kind: 'failed',
        text: `The kernel failed to start on ${session.host_id}.`
      });
    } else if (reason && reason !== 'stopped' && reason !== 'kernel exited') {
      this.setNotice({
        sessionId: session.id,
        kind: 'ended',
        text: `The remote kernel on ${session.host_id} ended: ${endReasonText(reason)}. ${bill}`
      });
    }
  }

  private _model: IGPUShareModel;
  private _kernelId: string | null = null;
  private _kernelName: string | null = null;
  private _watch: IDisposable | null = null;
  private _outputs: OutputRestorer;
  private _shownIdle: string | null = null;
  private _dismissedIdle: string | null = null;
  private _phase: Phase = 'none';
  private _startingOn: GPUShare.ISession | null = null;
  private _startingSince = 0;
  private _readySince = 0;
  private _notice: INotice | null = null;
  private _seenLive = new Set<string>();
  private _lastKey = '';
  private _timer: number;
  private _isDisposed = false;
  private _changed = new Signal<NotebookGPU, void>(this);
}

/** The header shown above a notebook: start-up progress and end-of-session banners. */
export class GPUHeader extends Widget {
  constructor(gpu: NotebookGPU) {
    super();
    this._gpu = gpu;
    this.addClass('jp-GPUShare-header-banner');
    this.node.setAttribute('role', 'status');
    gpu.changed.connect(this._render, this);
    this._render();
  }

  protected onResize(msg: Widget.ResizeMessage): void {
    super.onResize(msg);
    this._fit();
  }

  /**
   * Ask the notebook's header box for the height the banner needs. Lumino's BoxLayout sizes
   * a child by its CSS min-height only, so without this the banner gets no room and the
   * notebook covers it (and its buttons).
   */
  private _fit(): void {
    requestAnimationFrame(() => {
      if (this.isDisposed || this.isHidden) {
        return;
      }
      const style = getComputedStyle(this.node);
      const frame =
        parseFloat(style.paddingTop || '0') +
        parseFloat(style.paddingBottom || '0') +
        parseFloat(style.borderTopWidth || '0') +
        parseFloat(style.borderBottomWidth || '0');
      let content = 0;
      for (const child of Array.from(this.node.children)) {
        content = Math.max(content, child.getBoundingClientRect().height);
      }
      const minHeight = `${Math.ceil(content + frame)}px`;
      if (this.node.style.minHeight !== minHeight) {
        this.node.style.minHeight = minHeight;
        this.parent?.fit();
      }
    });
  }

  private _render(): void {
    const gpu = this._gpu;
    const node = this.node;
    const notice = gpu.notice;
    const phase = gpu.phase;
    let key = '';
    if (notice) {
      key = `notice:${notice.sessionId}:${notice.kind}:${notice.text}`;
    } else if (phase !== 'none') {
      key = `phase:${phase}:${gpu.startingOn?.host_id ?? ''}:${gpu.session?.host_id ?? ''}`;
    }
    if (key === this._key) {
      return;
    }
    this._key = key;
    node.replaceChildren();
    node.className = 'jp-GPUShare-header-banner';
    if (!key) {
      this.hide();
      return;
    }
    this.show();
    const text = document.createElement('span');
    text.className = 'jp-GPUShare-banner-text';
    node.appendChild(text);
    if (notice) {
      node.classList.add(
        'jp-GPUShare-banner',
        `jp-GPUShare-banner-${notice.kind}`
      );
      node.setAttribute('aria-label', 'Remote kernel notice');
      text.textContent = notice.text;
      if (notice.kind === 'culled') {
        node.appendChild(
          this._button('Restart kernel', async () => {
            gpu.setNotice(null);
            const ctx = gpu.panel.sessionContext;
            // The server dropped the culled kernel's session: forget it, then start anew.
            await ctx.sessionManager.refreshRunning();
            await ctx.changeKernel({
              name: gpu.kernelName ?? KERNEL_NAME
            });
          })
        );
      }
      if (notice.kind === 'host-lost' || notice.kind === 'failed') {
        node.appendChild(
          this._button('Restart on another GPU', async () => {
            gpu.setNotice(null);
            // The same kernel: a class notebook stays on its class's pool (and budget).
            await gpu.panel.sessionContext.changeKernel({
              name: gpu.kernelName ?? KERNEL_NAME
            });
          })
        );
      }
      node.appendChild(
        this._button('Dismiss', async () => gpu.setNotice(null))
      );
      this._fit();
      return;
    }
    node.classList.add('jp-GPUShare-progress', `jp-GPUShare-progress-${phase}`);
    node.setAttribute('aria-label', 'Remote kernel start-up');
    if (phase === 'finding') {
      text.textContent = 'Finding a host for this notebook’s GPU kernel…';
    } else if (phase === 'starting') {
      text.textContent = `Starting the kernel on ${gpu.startingOn?.host_id ?? 'a host'}…`;
    } else {
      text.textContent = `Kernel ready on ${gpu.session?.host_id ?? 'the host'}.`;
    }
    this._fit();
  }

  private _button(
    label: string,
    action: () => Promise<void>
  ): HTMLButtonElement {
    const button = document.createElement('button');
    button.className = 'jp-mod-styled jp-GPUShare-banner-button';
    button.textContent = label;
    button.onclick = () => void action();
    return button;
  }

  private _gpu: NotebookGPU;
  private _key = '';
}

/** The notebooks' remote-kernel states, for the status bar and other plugins. */
export interface INotebookGPUs {
  /** The state of a notebook panel, if it has been opened. */
  get(panel: NotebookPanel): NotebookGPU | undefined;
  /** Emitted when a notebook's state changes. */
  readonly changed: ISignal<INotebookGPUs, void>;
}

export const INotebookGPUs = new Token<INotebookGPUs>(
  'jupyter-gpu-share:INotebookGPUs',
  'The remote-kernel state of each open notebook.'
);

/** Keeps a NotebookGPU (and its header) for every notebook, and enforces spending caps. */
export class NotebookGPUs implements INotebookGPUs, IDisposable {
  constructor(model: IGPUShareModel) {
    this._model = model;
    this._timer = window.setInterval(() => this._checkCaps(), 1000);
  }

  get changed(): ISignal<INotebookGPUs, void> {
    return this._changed;
  }

  get isDisposed(): boolean {
    return this._isDisposed;
  }

  add(panel: NotebookPanel): NotebookGPU {
    let gpu = this._gpus.get(panel);
    if (gpu) {
      return gpu;
    }
    gpu = new NotebookGPU(panel, this._model);
    this._gpus.set(panel, gpu);
    const header = new GPUHeader(gpu);
    panel.contentHeader.addWidget(header);
    gpu.changed.connect(() => this._changed.emit());
    panel.disposed.connect(() => {
      this._gpus.delete(panel);
      gpu!.dispose();
    });
    return gpu;
  }

  get(panel: NotebookPanel): NotebookGPU | undefined {
    return this._gpus.get(panel);
  }

  dispose(): void {
    if (this._isDisposed) {
      return;
    }
    this._isDisposed = true;
    window.clearInterval(this._timer);
    Signal.clearData(this);
  }

  /** Warn at the warning percentage of a cap; at 100 % save the notebook and stop. */
  private _checkCaps(): void {
    const settings = this._model.settings;
    const sessionCap = creditsToMicro(settings.sessionCapCredits);
    const dailyCap = creditsToMicro(settings.dailyCapCredits);
    if (sessionCap <= 0 && dailyCap <= 0) {
      return;
    }
    const now = Date.now();
    const today = spentToday(this._model.sessions, now);
    const daily = capLevel(today, dailyCap, settings.warnAtPercent);
    const dayKey = new Date(now).toDateString();
    if (daily === 'warn' && !this._warned.has(`day:${dayKey}`)) {
      this._warned.add(`day:${dayKey}`);
      Notification.warning(
        `Shared GPUs: today's spending is ${formatCredits(today)} of your ${formatCredits(dailyCap)} credit daily cap.`,
        { autoClose: 10000 }
      );
    }
    this._saveBeforeBrokerStop(now);
    for (const gpu of this._gpus.values()) {
      const session = gpu.session;
      if (
        !session ||
        session.state !== 'running' ||
        session.class || // charged to a class, whose quota the broker enforces
        this._stopping.has(session.id)
      ) {
        continue;
      }
      const cost = meterReading(session, now).costMicro;
      const level = capLevel(cost, sessionCap, settings.warnAtPercent);
      if (level === 'warn' && !this._warned.has(session.id)) {
        this._warned.add(session.id);
        Notification.warning(
          `Shared GPUs: ${gpu.panel.context.path} has cost ${formatCredits(cost)} of its ${formatCredits(sessionCap)} credit session cap.`,
          { autoClose: 10000 }
        );
      }
      if (level === 'over' || daily === 'over') {
        const which =
          level === 'over'
            ? `the per-session cap of ${formatCredits(sessionCap)} credits`
            : `the daily cap of ${formatCredits(dailyCap)} credits`;
        void this._stopAtCap(gpu, session, which);
      }
    }
  }

  /** Save a notebook a few seconds before the broker stops its kernel (quota or credit). */
  private _saveBeforeBrokerStop(nowMs: number): void {
    for (const gpu of this._gpus.values()) {
      const session = gpu.session;
      const stopsAt = session?.stops_at_us;
      if (
        !session ||
        session.state !== 'running' ||
        !stopsAt ||
        this._savedBeforeStop.has(session.id) ||
        nowMs < stopsAt / 1000 - SAVE_BEFORE_STOP_MS
      ) {
        continue;
      }
      this._savedBeforeStop.add(session.id);
      const what = session.class ? `the ${session.class} quota` : 'your credit';
      void (async () => {
        try {
          if (gpu.panel.context.model.dirty) {
            await gpu.panel.context.save();
          }
          Notification.warning(
            `Shared GPUs: ${what} runs out in a few seconds; ${gpu.panel.context.path} was saved.`,
            { autoClose: 10000 }
          );
        } catch (error) {
          console.warn('gpu-share: saving before the stop failed', error);
        }
      })();
    }
  }

  private async _stopAtCap(
    gpu: NotebookGPU,
    session: GPUShare.ISession,
    which: string
  ): Promise<void> {
    this._stopping.add(session.id);
    gpu.setNotice({
      sessionId: session.id,
      kind: 'cap',
      text: `Stopped at ${which}: the notebook was saved and its remote kernel shut down.`
    });
    try {
      if (gpu.panel.context.model.dirty) {
        await gpu.panel.context.save();
      }
    } catch (error) {
      console.warn('gpu-share: saving before the cap stop failed', error);
    }
    const ended = await gpu.stop();
    Notification.error(
      `Shared GPUs: ${gpu.panel.context.path} reached ${which}; its kernel was stopped` +
        (ended
          ? ` (billed ${formatCredits(ended.amount_micro ?? 0)} credits).`
          : '.'),
      { autoClose: false }
    );
  }

  private _model: IGPUShareModel;
  private _gpus = new Map<NotebookPanel, NotebookGPU>();
  private _warned = new Set<string>();
  private _stopping = new Set<string>();
  private _savedBeforeStop = new Set<string>();
  private _timer: number;
  private _isDisposed = false;
  private _changed = new Signal<INotebookGPUs, void>(this);
}
