import { ServerConnection } from '@jupyterlab/services';
import { DisposableDelegate, IDisposable } from '@lumino/disposable';
import { ISignal, Signal } from '@lumino/signaling';

import { appendPoint, usageTotals } from './classes';
import { requestAPI } from './request';
import { GPUShare, IClassUsagePoint, IGPUShareClasses } from './tokens';

/** How often the list of classes (and their notebooks) is asked again, ms. */
const LIST_EVERY_MS = 15_000;

/** Polls the user's classes through the user-side server extension. */
export class ClassesModel implements IGPUShareClasses {
  constructor(
    serverSettings: ServerConnection.ISettings = ServerConnection.makeSettings()
  ) {
    this._serverSettings = serverSettings;
  }

  get classes(): ReadonlyArray<GPUShare.IClass> {
    return this._classes;
  }
  get error(): string | null {
    return this._error;
  }
  get changed(): ISignal<IGPUShareClasses, void> {
    return this._changed;
  }
  get isDisposed(): boolean {
    return this._isDisposed;
  }

  get active(): boolean {
    return this._active;
  }
  set active(value: boolean) {
    if (value === this._active) {
      return;
    }
    this._active = value;
    if (value) {
      this._listedAt = 0; // fresh list and notebooks when the panel opens
      void this.refresh();
    }
  }

  /** Poll every `intervalMs` (at least 500). */
  start(intervalMs = 2000): void {
    this.stop();
    this._timer = window.setInterval(
      () => void this.refresh(),
      Math.max(500, intervalMs)
    );
    void this.refresh();
  }

  stop(): void {
    if (this._timer !== null) {
      window.clearInterval(this._timer);
      this._timer = null;
    }
  }

  usage(name: string): GPUShare.IClassUsage | null {
    return this._usage.get(name)?.usage ?? null;
  }
  usagePolledAt(name: string): number {
    return this._usage.get(name)?.at ?? 0;
  }
  series(name: string): ReadonlyArray<IClassUsagePoint> {
    return this._series.get(name) ?? [];
  }
  notebooks(name: string): ReadonlyArray<GPUShare.IClassNotebook> {
    return this._notebooks.get(name) ?? [];
  }

  watch(name: string): IDisposable {
    this._watched.set(name, (this._watched.get(name) ?? 0) + 1);
    if (!this._usage.has(name)) {
      void this.refresh();
    }
    return new DisposableDelegate(() => {
      const count = (this._watched.get(name) ?? 1) - 1;
      if (count <= 0) {
        this._watched.delete(name);
      } else {
        this._watched.set(name, count);
      }
    });
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

  async fetchNotebooks(name: string): Promise<GPUShare.IClassFetch> {
    return this._request<GPUShare.IClassFetch>(
      `classes/${encodeURIComponent(name)}/fetch`,
      { method: 'POST' }
    );
  }

  async stopStudent(name: string, student: string): Promise<string[]> {
    const answer = await this._request<{ stopped_sessions: string[] }>(
      `classes/${encodeURIComponent(name)}/students/${encodeURIComponent(student)}/stop`,
      { method: 'POST' }
    );
    void this._pollUsage(name).then(changed => changed && this._changed.emit());
    return answer.stopped_sessions ?? [];
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
    let changed = false;
    const now = Date.now();
    const wanted = this._active || this._watched.size > 0;
    if (
      now - this._listedAt >= LIST_EVERY_MS &&
      (wanted || this._listedAt === 0)
    ) {
      try {
        const classes = await this._request<GPUShare.IClass[]>('classes');
        this._listedAt = now;
        if (JSON.stringify(classes) !== JSON.stringify(this._classes)) {
          this._classes = classes;
          changed = true;
        }
        if (this._active) {
          const lists = await Promise.all(
            classes.map(c =>
              this._request<GPUShare.IClassNotebook[]>(
                `classes/${encodeURIComponent(c.name)}/notebooks`
              ).catch(() => null)
            )
          );
          classes.forEach((c, i) => {
            const list = lists[i];
            if (
              list &&
              JSON.stringify(list) !==
                JSON.stringify(this._notebooks.get(c.name))
            ) {
              this._notebooks.set(c.name, list);
              changed = true;
            }
          });
        }
        changed = this._setError(null) || changed;
      } catch (error) {
        changed =
          this._setError(
            error instanceof Error ? error.message : String(error ?? 'error')
          ) || changed;
      }
    }
    const names = new Set<string>(this._watched.keys());
    if (this._active) {
      for (const c of this._classes) {
        names.add(c.name);
      }
    }
    const results = await Promise.all(
      [...names].map(name => this._pollUsage(name))
    );
    if (changed || results.some(Boolean)) {
      this._changed.emit();
    }
  }

  /** Ask one class's usage; true when it was answered. */
  private async _pollUsage(name: string): Promise<boolean> {
    let usage: GPUShare.IClassUsage;
    try {
      usage = await this._request<GPUShare.IClassUsage>(
        `classes/${encodeURIComponent(name)}/usage`
      );
    } catch {
      return false;
    }
    const at = Date.now();
    this._usage.set(name, { usage, at });
    this._series.set(
      name,
      appendPoint(this._series.get(name) ?? [], usageTotals(usage, at))
    );
    return true;
  }

  private _setError(error: string | null): boolean {
    if (error === this._error) {
      return false;
    }
    this._error = error;
    return true;
  }

  private _request<T>(endPoint: string, init: RequestInit = {}): Promise<T> {
    return requestAPI<T>(endPoint, init, this._serverSettings);
  }

  private _serverSettings: ServerConnection.ISettings;
  private _classes: GPUShare.IClass[] = [];
  private _usage = new Map<
    string,
    { usage: GPUShare.IClassUsage; at: number }
  >();
  private _series = new Map<string, IClassUsagePoint[]>();
  private _notebooks = new Map<string, GPUShare.IClassNotebook[]>();
  private _watched = new Map<string, number>();
  private _error: string | null = null;
  private _active = false;
  private _listedAt = 0;
  private _polling: Promise<void> | null = null;
  private _timer: number | null = null;
  private _isDisposed = false;
  private _changed = new Signal<IGPUShareClasses, void>(this);
}
