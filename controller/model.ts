import type { Step } from "../gen/rexmesh/v1/task_pb.js";
import { TaskState } from "../gen/rexmesh/v1/task_pb.js";
import type { ResultCheck } from "../gen/rexmesh/v1/controller_pb.js";
import type { HostFacts } from "../gen/rexmesh/v1/host_pb.js";

/** A job as the controller stores it; its tasks (one per host) are stored apart (controller/lmdb-job-store.ts). */
export interface JobRecord {
  id: string;
  tenant: string;
  submittedBy: string;
  createdAt: number;
  finishedAt?: number;
  steps: Step[];
  env: Record<string, string>;
  workingDir: string;
  stdin: Uint8Array;
  timeoutMs: number;
  /** Epoch ms after which a task that has not started never runs. */
  deliverBy: number;
  /** A task whose host stays unreachable this long ends LOST (see task-bounds.ts). */
  lostAfterMs: number;
  idempotent: boolean;
  idempotencyKey: string;
  /** SHA-256 of the request as submitted: an idempotency key reused with another request is refused. */
  requestDigest?: string;
  cancelRequested: boolean;
  /** When the cancel was asked for: its tasks end by then plus the cancel grace, confirmed or not. */
  cancelRequestedAt?: number;
  taskIds: string[];
  /** Output bytes kept per task (0: the daemon's default). */
  outputLimitBytes: number;
  /** Fan-out limits; absent means every task is released at once. */
  rate?: JobRate;
  /** A document run: "NAME@VERSION"; its steps are rendered per host and kept per task ({@link TaskSteps}). */
  document?: string;
  /** A document run's parameters, sensitive ones redacted, each as JSON text. */
  parameters?: Record<string, string>;
  /** The schedule whose firing this job is (controller/schedules.ts). */
  schedule?: string;
}

/**
 * The steps of one task of a document run: what the host runs (with real
 * parameter values) and what listings show (sensitive values redacted).
 */
export interface TaskSteps {
  run: Step[];
  shown: Step[];
}

/** Rate control resolved to absolute numbers at submit. */
export interface JobRate {
  /** Tasks in flight at once; 0 means no limit. */
  concurrency: number;
  /** Tasks in flight at once per region; 0 means no limit. */
  perRegion: number;
  /** Failures tolerated; once exceeded, unreleased tasks end SKIPPED. Absent: no limit. */
  maxErrors?: number;
  /** Canary tasks that must all succeed before the rest are released. */
  canary: string[];
}

export interface TaskRecord {
  id: string;
  jobId: string;
  tenant: string;
  hostId: string;
  /** Region and proxy the task was routed through (empty until routed). */
  region: string;
  proxy: string;
  state: TaskState;
  exitCode?: number;
  signal: string;
  message: string;
  updatedAt: number;
  /** Output chunks stored, contiguous from seq 1. */
  outputChunks: number;
  /**
   * Chunks stored above a gap, as inclusive seq ranges in order: after a
   * failover the host's newer output can arrive through its new proxy
   * before older chunks held by the proxy it left.
   */
  outputBeyond?: [number, number][];
  /** Chunks the daemon reported on the terminal status. */
  expectedChunks?: number;
  outputTruncated: boolean;
  /**
   * Proxies (or "bundle:<region>") that may hold a copy of the task. A proxy
   * is added, and stored, before the task is sent to it; it leaves the list
   * when it reports the task ended at its end.
   */
  proxies?: string[];
  /** Holders that have reported on the task, so that a reconnect need not send it to them again. */
  confirmed?: string[];
  /** The controller ended the task itself (LOST, or a cancel the host could not confirm): what the host says later is kept as {@link late}. */
  endedHere?: boolean;
  /** The host's own terminal report, when it came after the controller had ended the task. */
  late?: LateReport;
  /** How the end checks against the host's signature (see common/host-signing.ts). */
  resultCheck?: ResultCheck;
  /** What the host signed of its output: SHA-256 and length. */
  outputSha256?: Uint8Array;
  outputBytes?: number;
  /** Released for dispatch by rate control (absent on jobs without it: always released). */
  released?: boolean;
  /**
   * Set at submit on a task whose host fits no alternative of a document
   * step: the task ends REJECTED with this reason at the controller, stored
   * with the job so that a restart in between still rejects it.
   */
  rejectAtSubmit?: string;
}

/**
 * A cancel the controller owes a proxy: it ended a task itself (LOST, or a
 * cancel the host could not confirm in time) while that proxy may still hold
 * a copy. Kept until the proxy reports the task ended at its end, and sent
 * again on every reconnect, so that a host that returns is told.
 */
export interface Recall {
  proxy: string;
  taskId: string;
  hostId: string;
  /** Stop the task only if it has not started (LOST): a running process is left to finish. */
  withdraw: boolean;
  at: number;
}

export interface LateReport {
  state: TaskState;
  exitCode?: number;
  signal: string;
  message: string;
  time: number;
}

export interface HostRecord {
  id: string;
  tenant: string;
  region: string;
  proxy: string;
  connected: boolean;
  since: number;
  /**
   * Per proxy that held the host's stream: until when (epoch ms; 0 while it
   * holds it now). A proxy may report on a task of the host only if it held
   * the host at some time since the task's job was created.
   */
  heldUntil?: Record<string, number>;
  facts?: HostFacts;
  labels: Record<string, string>;
}
