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
