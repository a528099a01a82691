import { ServerConnection } from '@jupyterlab/services';
import { DisposableDelegate, IDisposable } from '@lumino/disposable';
import { ISignal, Signal } from '@lumino/signaling';

import { requestAPI } from './request';
import { GPUShare, IGPUShareModel } from './tokens';

export const DEFAULT_SETTINGS: GPUShare.ISettings = {
  pollInterval: 2000,
  sessionCapCredits: 0,
  dailyCapCredits: 0,
  warnAtPercent: 80
};

/** Polls the user-side server extension and tells its listeners what changed. */
export class GPUShareModel implements IGPUShareModel {
  constructor(
    serverSettings: ServerConnection.ISettings = ServerConnection.makeSettings()
  ) {
    this._serverSettings = serverSettings;
  }

  get offers(): ReadonlyArray<GPUShare.IOffer> {
    return this._offers;
  }
  get me(): GPUShare.IMe | null {
    return this._me;
  }
  get sessions(): ReadonlyArray<GPUShare.ISession> {
    return this._sessions;
  }
  get error(): string | null {
    return this._error;
  }
  get polledAt(): number {
    return this._polledAt;
  }
  get settings(): GPUShare.ISettings {
    return this._settings;
  }
  set settings(value: GPUShare.ISettings) {
    const restart = value.pollInterval !== this._settings.pollInterval;
    this._settings = value;
    this._settingsChanged.emit(value);
    if (restart && this._timer !== null) {
      this.start();
    }
  }

  get offersChanged(): ISignal<IGPUShareModel, ReadonlyArray<GPUShare.IOffer>> {
    return this._offersChanged;
  }
  get accountChanged(): ISignal<IGPUShareModel, GPUShare.IMe | null> {
    return this._accountChanged;
  }
  get sessionsChanged(): ISignal<
    IGPUShareModel,
    ReadonlyArray<GPUShare.ISession>
  > {
    return this._sessionsChanged;
  }
  get errorChanged(): ISignal<IGPUShareModel, string | null> {
    return this._errorChanged;
  }
  get settingsChanged(): ISignal<IGPUShareModel, GPUShare.ISettings> {
    return this._settingsChanged;
  }
  get kernelSessionChanged(): ISignal<
    IGPUShareModel,
    { kernelId: string; sessionId: string }
  > {
    return this._kernelSessionChanged;
  }
  get kernelCulled(): ISignal<IGPUShareModel, string> {
    return this._kernelCulled;
  }
  get isDisposed(): boolean {
    return this._isDisposed;
  }

  isCulled(kernelId: string): boolean {
    return this._culled.has(kernelId);
  }

  /** Poll now and then every `settings.pollInterval` ms. */
  start(): void {
    this.stop();
    const interval = Math.max(500, this._settings.pollInterval);
    this._timer = window.setInterval(() => void this.refresh(), interval);
    void this.refresh();
  }

  stop(): void {
    if (this._timer !== null) {
      window.clearInterval(this._timer);
      this._timer = null;
    }
  }

  async refresh(): Promise<void> {
    if (this._polling) {
      return this._polling;
    }
    this._polling = this._poll().finally(() => {
      this._polling = null;
    });
    return this._polling;
  }

  watchKernel(kernelId: string): IDisposable {
    this._watched.set(kernelId, (this._watched.get(kernelId) ?? 0) + 1);
    void this.refreshKernel(kernelId);
    return new DisposableDelegate(() => {
      const count = (this._watched.get(kernelId) ?? 1) - 1;
      if (count <= 0) {
        this._watched.delete(kernelId);
      } else {
        this._watched.set(kernelId, count);
      }
    });
  }

  async refreshKernel(kernelId: string): Promise<void> {
    let info: GPUShare.IKernelInfo;
    try {
      info = await this._request<GPUShare.IKernelInfo>(
        `kernels/${encodeURIComponent(kernelId)}`
      );
    } catch (error) {
      if (
        error instanceof ServerConnection.ResponseError &&
        error.response.status === 404
      ) {
        this._watched.delete(kernelId); // the kernel is gone; its sessions stay known
      }
      return;
    }
    this._noteKernelSession(kernelId, info.session);
    if (info.culled && !this._culled.has(kernelId)) {
      // Gone for good: stop asking about it; its last session stays known.
      this._culled.add(kernelId);
      this._watched.delete(kernelId);
      this._kernelCulled.emit(kernelId);
    }
  }

  /** Remember that `session` backs the kernel (newest first). */
  private _noteKernelSession(
    kernelId: string,
    session: GPUShare.ISession | null
  ): void {
    if (!session) {
      return;
    }
    const known = this._kernelSessions.get(kernelId) ?? [];
    const sessionId = session.id;
    if (!this._sessions.some(s => s.id === sessionId)) {
      this._extra.set(sessionId, session);
    }
    if (known[0] !== sessionId) {
      this._kernelSessions.set(kernelId, [
        sessionId,
        ...known.filter(id => id !== sessionId)
      ]);
      this._kernelSessionChanged.emit({ kernelId, sessionId });
    }
  }

  sessionsOfKernel(kernelId: string): GPUShare.ISession[] {
    const ids = this._kernelSessions.get(kernelId) ?? [];
    return ids
      .map(id => this.session(id))
      .filter((s): s is GPUShare.ISession => s !== null);
  }

  session(id: string): GPUShare.ISession | null {
    return this._sessions.find(s => s.id === id) ?? this._extra.get(id) ?? null;
  }

  async stopSession(id: string): Promise<GPUShare.ISession> {
    const ended = await this._request<GPUShare.ISession>(
      `sessions/${encodeURIComponent(id)}`,
      { method: 'DELETE' }
    );
    this._extra.set(id, ended);
    void this.refresh();
    return ended;
  }

  async choose(preference: GPUShare.IPreference): Promise<void> {
    await this._request('preference', {
      method: 'POST',
      body: JSON.stringify(preference)
    });
  }

  dispose(): void {
    if (this._isDisposed) {
      return;
    }
    this._isDisposed = true;
    this.stop();
    Signal.clearData(this);
  }

  private async _poll(): Promise<void> {
    try {
      const [offers, me, sessions] = await Promise.all([
        this._request<GPUShare.IOffer[]>('offers'),
        this._request<GPUShare.IMe>('me'),
        this._request<GPUShare.ISession[]>('sessions')
      ]);
      this._polledAt = Date.now();
      this._setError(null);
      if (JSON.stringify(offers) !== JSON.stringify(this._offers)) {
        this._offers = offers;
        this._offersChanged.emit(offers);
      }
      if (JSON.stringify(me) !== JSON.stringify(this._me)) {
        this._me = me;
        this._accountChanged.emit(me);
      }
      sessions.sort((a, b) =>
        (b.created_at ?? '').localeCompare(a.created_at ?? '')
      );
      for (const session of sessions) {
        this._extra.delete(session.id);
      }
      this._sessions = sessions;
      this._sessionsChanged.emit(sessions);
    } catch (error) {
      this._setError(
        error instanceof Error ? error.message : String(error ?? 'error')
      );
    }
    await Promise.all(
      [...this._watched.keys()].map(kernelId => this.refreshKernel(kernelId))
    );
  }

  private _setError(error: string | null): void {
    if (error !== this._error) {
      this._error = error;
      this._errorChanged.emit(error);
    }
  }

  private _request<T>(endPoint: string, init: RequestInit = {}): Promise<T> {
    return requestAPI<T>(endPoint, init, this._serverSettings);
  }

  private _serverSettings: ServerConnection.ISettings;
  private _settings: GPUShare.ISettings = DEFAULT_SETTINGS;
  private _offers: GPUShare.IOffer[] = [];
  private _me: GPUShare.IMe | null = null;
  private _sessions: GPUShare.ISession[] = [];
  private _extra = new Map<string, GPUShare.ISession>();
  private _error: string | null = null;
  private _polledAt = 0;
  private _polling: Promise<void> | null = null;
  private _timer: number | null = null;
  private _watched = new Map<string, number>();
  private _kernelSessions = new Map<string, string[]>();
  private _culled = new Set<string>();
  private _kernelCulled = new Signal<IGPUShareModel, string>(this);
  private _isDisposed = false;
  private _offersChanged = new Signal<IGPUShareModel, GPUShare.IOffer[]>(this);
  private _accountChanged = new Signal<IGPUShareModel, GPUShare.IMe | null>(
    this
  );
  private _sessionsChanged = new Signal<IGPUShareModel, GPUShare.ISession[]>(
    this
  );
  private _errorChanged = new Signal<IGPUShareModel, string | null>(this);
  private _settingsChanged = new Signal<IGPUShareModel, GPUShare.ISettings>(
    this
  );
  private _kernelSessionChanged = new Signal<
    IGPUShareModel,
    { kernelId: string; sessionId: string }
  >(this);
}
