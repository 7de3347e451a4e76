import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import type { Job } from "../../gen/rexmesh/v1/controller_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import type { Step } from "../../gen/rexmesh/v1/task_pb.js";

/** A task state as operators read it: "never delivered" rather than EXPIRED. */
export const STATE_LABEL: Record<number, string> = {
  [TaskState.PENDING]: "pending",
  [TaskState.QUEUED]: "queued at proxy",
  [TaskState.DISPATCHED]: "dispatched",
  [TaskState.DELIVERED]: "delivered",
  [TaskState.RUNNING]: "running",
  [TaskState.SUCCEEDED]: "succeeded",
  [TaskState.FAILED]: "failed",
  [TaskState.TIMED_OUT]: "timed out",
  [TaskState.CANCELLED]: "cancelled",
  [TaskState.INTERRUPTED]: "interrupted",
  [TaskState.EXPIRED]: "never delivered (expired)",
  [TaskState.REJECTED]: "rejected",
  [TaskState.SKIPPED]: "skipped",
  [TaskState.LOST]: "lost",
};

export const stateLabel = (s: TaskState) => STATE_LABEL[s] ?? TaskState[s] ?? String(s);

/** Which colour family a state is shown in. */
export function stateTone(s: TaskState): "ok" | "bad" | "warn" | "live" {
  if (s === TaskState.SUCCEEDED) return "ok";
  if (s === TaskState.FAILED || s === TaskState.TIMED_OUT || s === TaskState.INTERRUPTED || s === TaskState.REJECTED || s === TaskState.LOST) return "bad";
  if (s === TaskState.CANCELLED || s === TaskState.EXPIRED || s === TaskState.SKIPPED) return "warn";
  return "live";
}

/** The state groups rerun offers, as the API's states. */
export const RERUN_GROUPS = {
  failed: [TaskState.FAILED, TaskState.TIMED_OUT, TaskState.INTERRUPTED, TaskState.REJECTED],
  succeeded: [TaskState.SUCCEEDED],
  undelivered: [TaskState.EXPIRED, TaskState.SKIPPED, TaskState.LOST],
} as const;

export { isTerminal } from "../../common/task-state.js";

export function when(t: Timestamp | undefined): string {
  if (!t) return "";
  return timestampDate(t).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

export function describeStep(s: Step): string {
  const t = s.tool;
  switch (t.case) {
    case "exec":
      return t.value.argv.join(" ");
    case "shell":
      return t.value.script;
    case undefined:
      return "";
    default:
      return t.case;
  }
}

export function describeJob(j: Job): string {
  if (j.document) return `document ${j.document}`;
  return j.steps.map(describeStep).join("; ");
}

/** A label name as the host query language takes it (controller/query.ts). */
const LABEL_NAME = /^[A-Za-z0-9_][A-Za-z0-9._/-]*$/;

/**
 * The label filter as a host query: `key` is `has label.key`, `key=value`
 * is `label.key = "value"` (split at the first "=": a value may hold "="
 * itself). Undefined for no filter, null for a key no label can have.
 */
export function labelQuery(filter: string): string | null | undefined {
  if (filter.trim() === "") return undefined;
  const eq = filter.indexOf("=");
  const key = (eq < 0 ? filter : filter.slice(0, eq)).trim();
  if (!LABEL_NAME.test(key)) return null;
  if (eq < 0) return `has label.${key}`;
  return `label.${key} = "${filter.slice(eq + 1).trim().replace(/["\\]/g, (c) => `\\${c}`)}"`;
}
