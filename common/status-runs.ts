/**
 * Statuses in runs (docs/fan-out.md, "Statuses in runs"): on the link from a
 * proxy to the controller, the statuses that say no more than a state — a
 * proxy's QUEUED and DISPATCHED, a ping's answer, a copy cancelled or expired
 * before it left — go as runs of task ids that share everything else, and
 * their acknowledgements come back the same way. A fleet-wide job then costs
 * the link a task id and a host id per status instead of a message each.
 *
 * Order is kept per task: a receiver applies the runs in the order they
 * come, then the frame's other statuses, so a builder puts a task's status
 * in a run after every run that already holds that task, and sends it as a
 * whole status once the task has one of those in the frame.
 */
import { timestampMs } from "@bufbuild/protobuf/wkt";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import type { StatusAckRun, StatusRun } from "../gen/rexmesh/v1/proxy_link_pb.js";
import type { StatusAck, TaskState, TaskStatus } from "../gen/rexmesh/v1/task_pb.js";
import { LIMITS } from "./limits.js";

/** The feature a proxy's hello and a controller's welcome list when they take runs. */
export const STATUS_RUNS = "status-runs";

const EMPTY = new Uint8Array(0);

/**
 * Characters of message and signal the runs of one frame may stand for in
 * all (a run's text counts once per task it names). A run repeats its text
 * for every task, so without a bound a proxy could make the controller store
 * a frame-sized message once per task it holds; with it, runs carry no more
 * text than the same statuses sent whole. The builder keeps to it (what does
 * not fit goes whole), and a receiver refuses a run past it.
 */
export const RUN_TEXT_CHARS = LIMITS.statusRunTextChars;

/** The text a run repeats per task. */
const textOf = (s: { signal: string; message: string }): number => s.signal.length + s.message.length;

/**
 * A status a run can carry: nothing but its task, host, state, source, exit
 * code, signal and message — no fields this release does not know either (a
 * newer daemon's, which a run would drop).
 */
export function isPlainStatus(s: TaskStatus): boolean {
  return s.signature.length === 0 && s.endMac.length === 0 && s.endMacKeyId === "" && s.keyId === "" && s.outputSha256.length === 0 && s.outputChunks === 0n && s.outputBytes === 0n && !s.outputTruncated && !s.$unknown?.length;
}

/** Builds a frame's runs (of statuses, or of acknowledgements), keeping each task's order. */
class RunSet<R extends { taskIds: string[] }> {
  readonly runs: R[] = [];
  /** The newest run of each key: a status joins it unless its task is already in that run or a later one. */
  private readonly newest = new Map<string, number>();
  /** The index of the last run each task is in. */
  private readonly lastOf = new Map<string, number>();

  /** The run a task's item of this key goes to, made by `make` when none may take it. */
  runFor(key: string, taskId: string, make: () => R): R {
    const at = this.newest.get(key);
    const last = this.lastOf.get(taskId);
    let index: number;
    if (at !== undefined && (last === undefined || last < at)) index = at;
    else {
      index = this.runs.push(make()) - 1;
      this.newest.set(key, index);
    }
    this.lastOf.set(taskId, index);
    return this.runs[index]!;
  }
}

/**
 * Sorts a proxy's outgoing statuses into runs and whole statuses, in the
 * order they are added.
 */
export class StatusRunBuilder {
  private readonly set = new RunSet<StatusRun>();
  /** Tasks with a whole status in the frame: their later statuses follow as whole ones. */
  private readonly whole = new Set<string>();
  readonly statuses: TaskStatus[] = [];
  /** Text the runs stand for so far (see RUN_TEXT_CHARS). */
  private text = 0;

  add(s: TaskStatus): void {
    if (this.whole.has(s.taskId) || !isPlainStatus(s) || this.text + textOf(s) > RUN_TEXT_CHARS) {
      this.whole.add(s.taskId);
      this.statuses.push(s);
      return;
    }
    this.text += textOf(s);
    // The signal's length keeps the key one-to-one: a signal and message may hold any character, \0 included.
    const key = `${s.state}\0${s.atProxy ? 1 : 0}\0${s.exitCode ?? ""}\0${s.signal.length}\0${s.signal}\0${s.message}`;
    const run = this.set.runFor(key, s.taskId, () => ({
      $typeName: "rexmesh.v1.StatusRun",
      state: s.state,
      atProxy: s.atProxy,
      exitCode: s.exitCode,
      signal: s.signal,
      message: s.message,
      time: s.time,
      taskIds: [],
      hostIds: [],
    }));
    run.taskIds.push(s.taskId);
    run.hostIds.push(s.hostId);
    if (s.time && (!run.time || timestampMs(s.time) < timestampMs(run.time))) run.time = s.time;
  }

  get runs(): StatusRun[] {
    return this.set.runs;
  }
}

/**
 * The statuses a frame's runs stand for, in the order they are applied
 * (before the frame's whole statuses). A run whose lists differ in length,
 * or whose text would take the frame's runs past RUN_TEXT_CHARS, is refused
 * whole: `refused` counts it.
 */
export function statusesOfRuns(runs: readonly StatusRun[], refused?: (why: string) => void): TaskStatus[] {
  const out: TaskStatus[] = [];
  let text = 0;
  for (const run of runs) {
    if (run.hostIds.length !== run.taskIds.length) {
      refused?.(`a status run names ${run.taskIds.length} tasks but ${run.hostIds.length} hosts`);
      continue;
    }
    const cost = textOf(run) * run.taskIds.length;
    if (text + cost > RUN_TEXT_CHARS) {
      refused?.(`status runs stand for more than ${RUN_TEXT_CHARS} characters of message and signal in one frame`);
      continue;
    }
    text += cost;
    const time: Timestamp | undefined = run.time;
    for (let i = 0; i < run.taskIds.length; i++) {
      out.push({
        $typeName: "rexmesh.v1.TaskStatus",
        taskId: run.taskIds[i]!,
        hostId: run.hostIds[i]!,
        state: run.state,
        time,
        exitCode: run.exitCode,
        signal: run.signal,
        message: run.message,
        outputChunks: 0n,
        outputTruncated: false,
        atProxy: run.atProxy,
        signature: EMPTY,
        keyId: "",
        outputSha256: EMPTY,
        outputBytes: 0n,
        endMac: EMPTY,
        endMacKeyId: "",
      });
    }
  }
  return out;
}

/** Acknowledgements in runs of the same state and source, each task's kept in order. */
export function ackRunsOf(acks: readonly { taskId: string; state: TaskState; atProxy: boolean }[]): StatusAckRun[] {
  const set = new RunSet<StatusAckRun>();
  for (const a of acks) {
    set.runFor(`${a.state}\0${a.atProxy ? 1 : 0}`, a.taskId, () => ({ $typeName: "rexmesh.v1.StatusAckRun", state: a.state, atProxy: a.atProxy, taskIds: [] })).taskIds.push(a.taskId);
  }
  return set.runs;
}

/** The acknowledgements runs stand for, in order. */
export function acksOfRuns(runs: readonly StatusAckRun[]): StatusAck[] {
  const out: StatusAck[] = [];
  for (const run of runs) for (const taskId of run.taskIds) out.push({ $typeName: "rexmesh.v1.StatusAck", taskId, state: run.state, atProxy: run.atProxy });
  return out;
}
