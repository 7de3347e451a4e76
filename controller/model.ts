import type { Step } from "../gen/rexmesh/v1/task_pb.js";
import { TaskState } from "../gen/rexmesh/v1/task_pb.js";
import type { HostFacts } from "../gen/rexmesh/v1/host_pb.js";

/** A job as the controller stores it; tasks are stored apart, one per host. */
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
  idempotent: boolean;
  idempotencyKey: string;
  cancelRequested: boolean;
  taskIds: string[];
  /** Output bytes kept per task (0: the daemon's default). */
  outputLimitBytes: number;
  /** Fan-out limits; absent means every task is released at once. */
  rate?: JobRate;
  /** A document run: "NAME@VERSION"; its steps are rendered per host and kept per task ({@link TaskSteps}). */
  document?: string;
  /** A document run's parameters, sensitive ones redacted, each as JSON text. */
  parameters?: Record<string, string>;
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
  /** Chunks the daemon reported on the terminal status. */
  expectedChunks?: number;
  outputTruncated: boolean;
  /** Released for dispatch by rate control (absent on jobs without it: always released). */
  released?: boolean;
  /**
   * Set at submit on a task whose host fits no alternative of a document
   * step: the task ends REJECTED with this reason at the controller, stored
   * with the job so that a restart in between still rejects it.
   */
  rejectAtSubmit?: string;
}

export interface HostRecord {
  id: string;
  tenant: string;
  region: string;
  proxy: string;
  connected: boolean;
  since: number;
  facts?: HostFacts;
  labels: Record<string, string>;
}

export const NEW_TASK_STATE = TaskState.PENDING;
