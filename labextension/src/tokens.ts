import { IDisposable } from '@lumino/disposable';
import { Token } from '@lumino/coreutils';
import { ISignal } from '@lumino/signaling';

/**
 * The wire types of the user-side server extension (`/gpu-share/user/...`), which forwards
 * to the broker; field names are the broker's (see docs/protocol.md).
 */
export namespace GPUShare {
  /** One GPU offer of an online host. */
  export interface IOffer {
    id: number;
    host_id: string;
    gpu_model: string;
    gpu_count: number;
    gpu_memory_mib: number;
    price_per_second_micro: number;
    price_per_hour_micro: number;
    state: 'free' | 'busy';
    telemetry: ITelemetry;
    /** The host's share of sessions that ended well (0..1), or null for a new host. */
    reliability?: number | null;
    /** The host's measured speed (its self-test), or null until measured. */
    speed?: ISpeed | null;
  }

  /**
   * A host's self-test of one offer. `score` is one number to sort by: fp16 TFLOPS for a
   * GPU, fp32 GFLOPS / 1000 (i.e. fp32 TFLOPS) for a CPU.
   */
  export interface ISpeed {
    score: number | null;
    kind: 'gpu' | 'cpu';
    fp32_tflops?: number | null;
    fp16_tflops?: number | null;
    bf16_tflops?: number | null;
    memory_bandwidth_gbs?: number | null;
    flagged?: boolean;
    flag_reason?: string | null;
    /** Why nothing was measured (e.g. numpy missing on a CPU host), when so. */
    not_measured?: string | null;
    measured_at?: string | null;
    [key: string]: unknown;
  }

  /** What a host reports in its heartbeats. */
  export interface ITelemetry {
    source?: 'nvml' | 'cpu';
    gpus?: Array<{
      index: number;
      utilization_pct?: number | null;
      memory_used_mib?: number;
      memory_total_mib?: number;
      error?: string;
    }>;
    cpu?: {
      cpu_count?: number;
      load_1m?: number;
      memory_total_mib?: number;
      memory_used_mib?: number;
    };
    kernels?: number;
    [key: string]: unknown;
  }

  export type SessionState = 'starting' | 'running' | 'ended' | string;

  /** A rented session (one remote kernel). */
  export interface ISession {
    id: string;
    state: SessionState;
    renter: string;
    payer: string;
    host_id: string;
    offer_id: number | null;
    gpu_indices: number[];
    price_per_second_micro: number;
    price_per_hour_micro: number;
    created_at: string | null;
    started_at: string | null;
    ended_at: string | null;
    started_us: number | null;
    ended_us: number | null;
    end_reason: string | null;
    billed_seconds: number | null;
    amount_micro: number | null;
    cost_so_far_micro: number;
    /** The class the session is charged to (payer "<class>@class"), or null. */
    class?: string | null;
    /** The host's last heartbeat telemetry (the rented GPUs only) while live, else null. */
    host_telemetry?: ITelemetry | null;
    /** When the broker will stop this session (quota or credit) if nothing changes. */
    stops_at_us?: number | null;
    /** When the broker stops it for being idle, once it warned (ISO time). */
    idle_stop_at?: string | null;
  }

  /** A class the user teaches or is a student of (GET /classes). */
  export interface IClass {
    name: string;
    teacher: string;
    your_role: 'teacher' | 'student' | 'admin' | string;
    budget_micro: number;
    quota_seconds: number | null;
    quota_micro: number | null;
    weekly_quota_seconds: number | null;
    gpu_model: string | null;
    max_price_per_hour_micro: number | null;
    starts_at: string | null;
    ends_at: string | null;
    kernel_name: string;
  }

  /** One student's use of a class (GET /classes/NAME/usage). */
  export interface IClassUsageRow {
    student: string;
    seconds: number;
    credits_micro: number;
    sessions: number;
    /** Ids of the student's running sessions in the class. */
    running: string[];
    /** null: no limit of that kind. */
    remaining_seconds: number | null;
    remaining_micro: number | null;
  }

  /** A class's usage: every student for its teacher, one's own row for a student. */
  export interface IClassUsage {
    class: string;
    /** The class budget left (null for students). */
    budget_micro: number | null;
    students: IClassUsageRow[];
    at: string;
  }

  /** A published class notebook. */
  export interface IClassNotebook {
    name: string;
    updated_at: string | null;
    size: number;
  }

  /** What fetching a class's notebooks did (POST /gpu-share/user/classes/NAME/fetch). */
  export interface IClassFetch {
    class: string;
    folder: string;
    kernel_name: string;
    fetched: string[];
    kept: string[];
  }

  /** The renter's account. */
  export interface IMe {
    name: string;
    role: string;
    balance_micro: number;
    running_sessions?: number;
    available_micro?: number;
  }

  /** Which session backs a kernel of this server. */
  export interface IKernelInfo {
    kernel_id: string;
    kernel_name: string;
    remote: boolean;
    session: ISession | null;
    /** The server's idle culler shut this kernel down. */
    culled?: boolean;
  }

  /** "Use this GPU": the offer the next gpu-share kernel of a notebook rents. */
  export interface IPreference {
    path: string;
    offer_id: number;
    gpu_model?: string;
  }

  /** User settings of the extension (schema/plugin.json). */
  export interface ISettings {
    pollInterval: number;
    sessionCapCredits: number;
    dailyCapCredits: number;
    warnAtPercent: number;
  }
}

/** The kernelspec name of remote GPU kernels. */
export const KERNEL_NAME = 'gpu-share';

/** Class kernelspecs are named `gpu-share-<class>` (installed when fetching a class). */
export const CLASS_KERNEL_PREFIX = `${KERNEL_NAME}-`;

/** A kernelspec that starts remote GPU kernels: `gpu-share` or a class's. */
export function isRemoteKernelName(name: string | null | undefined): boolean {
  return (
    !!name && (name === KERNEL_NAME || name.startsWith(CLASS_KERNEL_PREFIX))
  );
}

/** The front end's view of the marketplace and of the user's sessions, kept fresh by polling. */
export interface IGPUShareModel extends IDisposable {
  /** Online offers, as last polled. */
  readonly offers: ReadonlyArray<GPUShare.IOffer>;
  /** The user's account, as last polled (null before the first answer). */
  readonly me: GPUShare.IMe | null;
  /** The user's sessions, newest first. */
  readonly sessions: ReadonlyArray<GPUShare.ISession>;
  /** Why the last poll failed (e.g. no broker configured), or null. */
  readonly error: string | null;
  /** Local time (ms) of the last successful poll. */
  readonly polledAt: number;
  /** The current settings. */
  readonly settings: GPUShare.ISettings;

  readonly offersChanged: ISignal<
    IGPUShareModel,
    ReadonlyArray<GPUShare.IOffer>
  >;
  readonly accountChanged: ISignal<IGPUShareModel, GPUShare.IMe | null>;
  readonly sessionsChanged: ISignal<
    IGPUShareModel,
    ReadonlyArray<GPUShare.ISession>
  >;
  readonly errorChanged: ISignal<IGPUShareModel, string | null>;
  readonly settingsChanged: ISignal<IGPUShareModel, GPUShare.ISettings>;
  /** A watched kernel got a (new) session. */
  readonly kernelSessionChanged: ISignal<
    IGPUShareModel,
    { kernelId: string; sessionId: string }
  >;

  /** The server's idle culler shut a kernel down (its id). */
  readonly kernelCulled: ISignal<IGPUShareModel, string>;

  /** Poll now. */
  refresh(): Promise<void>;
  /** Whether the server said it culled this kernel for being idle. */
  isCulled(kernelId: string): boolean;
  /** Follow which session backs this kernel while the returned disposable lives. */
  watchKernel(kernelId: string): IDisposable;
  /** Ask the server now which session backs a kernel (and remember it). */
  refreshKernel(kernelId: string): Promise<void>;
  /** The sessions a kernel has had, newest first (a kernel keeps its id across restarts). */
  sessionsOfKernel(kernelId: string): GPUShare.ISession[];
  /** One session by id, from the last poll. */
  session(id: string): GPUShare.ISession | null;
  /** Stop a session (and its bill); answers the ended, settled session. */
  stopSession(id: string): Promise<GPUShare.ISession>;
  /** Make the next gpu-share kernel of a notebook rent this offer. */
  choose(preference: GPUShare.IPreference): Promise<void>;
}

export const IGPUShareModel = new Token<IGPUShareModel>(
  'jupyter-gpu-share:IGPUShareModel',
  'The marketplace offers, the account and the sessions of jupyter-gpu-share.'
);

/** A point of a class's use over time, kept client-side from the polls. */
export interface IClassUsagePoint {
  /** Local time, ms. */
  t: number;
  /** GPU seconds used by all students so far. */
  seconds: number;
  /** Micro-credits used by all students so far. */
  micro: number;
  /** Running kernels. */
  running: number;
}

/** The user's classes (as teacher or student), their usage and notebooks, kept fresh by polling. */
export interface IGPUShareClasses extends IDisposable {
  /** The user's classes, as last polled. */
  readonly classes: ReadonlyArray<GPUShare.IClass>;
  /** Why the last poll failed, or null. */
  readonly error: string | null;
  /** Emitted after every poll that changed something. */
  readonly changed: ISignal<IGPUShareClasses, void>;
  /** Poll every class's usage (a panel showing them is visible). */
  active: boolean;

  /** The last usage answer of a class (a student's has their own row only). */
  usage(name: string): GPUShare.IClassUsage | null;
  /** Local time (ms) of that answer. */
  usagePolledAt(name: string): number;
  /** The class's total use over time since this page polled it. */
  series(name: string): ReadonlyArray<IClassUsagePoint>;
  /** The class's published notebooks. */
  notebooks(name: string): ReadonlyArray<GPUShare.IClassNotebook>;
  /** Keep polling this class's usage while the returned disposable lives (the meter). */
  watch(name: string): IDisposable;
  /** Poll now (the list too). */
  refresh(): Promise<void>;
  /** Put the class notebooks in `<class>/` (keeping any you have) and install its kernel. */
  fetchNotebooks(name: string): Promise<GPUShare.IClassFetch>;
  /** Teacher: stop a student's running kernel(s) in the class. */
  stopStudent(name: string, student: string): Promise<string[]>;
}

export const IGPUShareClasses = new Token<IGPUShareClasses>(
  'jupyter-gpu-share:IGPUShareClasses',
  'The classes of the user in jupyter-gpu-share: quotas, usage, notebooks.'
);
