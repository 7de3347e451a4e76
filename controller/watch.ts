import type { OutputChunk } from "../gen/rexmesh/v1/task_pb.js";
import { systemClock } from "../common/clock.js";
import { isTerminal } from "../common/task-state.js";
import type { JobManager } from "./jobs.js";
import { lastHeld } from "./output-ranges.js";
import type { JobRecord, TaskRecord } from "./model.js";

/** One message of a watch: what changed since the previous one. */
export interface WatchBatch {
  /** Sent with the first batch and the last one. */
  job?: JobRecord;
  /** Each as last sent: kept by the watch to compare the next state with, so not to be changed. */
  tasks: Readonly<TaskRecord>[];
  output: OutputChunk[];
}

export interface WatchOptions {
  noOutput: boolean;
  signal: AbortSignal;
  /** Output bytes per batch. Default 1 MiB. */
  maxBatchBytes?: number;
}

/**
 * Whether a task reads as it did when last sent: the fields a watcher sees
 * change (its output count does not make it go out again). Compared field by
 * field with the record sent, not through a string made per task per batch.
 */
export function sameAsSent(t: TaskRecord, sent: TaskRecord | undefined): boolean {
  return (
    sent !== undefined &&
    t.state === sent.state &&
    t.exitCode === sent.exitCode &&
    t.signal === sent.signal &&
    t.proxy === sent.proxy &&
    t.outputTruncated === sent.outputTruncated &&
    t.message === sent.message &&
    t.expectedChunks === sent.expectedChunks &&
    t.late?.state === sent.late?.state
  );
}

/** What a reader of an ended task may read: every chunk stored, but none beyond what its host signed for. */
function readable(t: TaskRecord): number {
  const held = lastHeld(t);
  return t.outputSha256 !== undefined && t.expectedChunks !== undefined ? Math.min(held, t.expectedChunks) : held;
}

/** A batch with at least this many task changes makes the next one wait COALESCE_MS. */
const COALESCE_AFTER_TASKS = 200;
const COALESCE_MS = 20;

/**
 * Streams a job from the beginning: a snapshot of every task, the output
 * stored so far, then changes as they happen, until every task is terminal
 * and all its output has been sent. The store is the buffer: a slow reader
 * only falls behind in reading it, nothing piles up in memory. A task's
 * terminal state is sent only after all of its stored output, so a client
 * can print a summary as soon as it sees it.
 */
export async function* watchJob(jobs: JobManager, job: JobRecord, opts: WatchOptions): AsyncGenerator<WatchBatch> {
  const maxBytes = opts.maxBatchBytes ?? 1 << 20;
  const changed = new Set<string>(job.taskIds);
  let jobChanged = true;
  let wake: (() => void) | undefined;
  const unsubscribe = jobs.subscribe(job.id, (taskId) => {
    if (taskId === undefined) jobChanged = true;
    else changed.add(taskId);
    wake?.();
  });
  const onAbort = () => wake?.();
  opts.signal.addEventListener("abort", onAbort);
  /** Each task as last sent (the copy handed out in a batch). */
  const sent = new Map<string, TaskRecord>();
  const cursor = new Map<string, number>();
  const ended = new Set<string>();
  let first = true;
  let open = job.taskIds.length;
  try {
    while (!opts.signal.aborted) {
      if (changed.size === 0 && !jobChanged) {
        await new Promise<void>((resolve) => (wake = resolve));
        wake = undefined;
        continue;
      }
      jobChanged = false;
      const ids = [...changed];
      changed.clear();
      const output: OutputChunk[] = [];
      const tasks: TaskRecord[] = [];
      let budget = maxBytes;
      for (const id of ids) {
        // Read in place; copied only when it goes out.
        const task = jobs.peekTaskRecord(id);
        if (!task) continue;
        const terminal = isTerminal(task.state);
        // Chunks a reader may have: the committed contiguous prefix; once the task ended, also
        // chunks above a gap (the rest is held by a proxy that is away, or lost).
        const stored = jobs.outputCommitted(task);
        const held = terminal ? readable(task) : task.outputChunks;
        let next = cursor.get(id) ?? (opts.noOutput ? held + 1 : 1);
        while (!opts.noOutput && budget > 0 && (next <= stored || (terminal && next <= held))) {
          const limit = terminal ? held : stored;
          const chunks = jobs.readOutput(id, next, budget).filter((c) => Number(c.seq) <= limit);
          if (chunks.length === 0) break;
          // A chunk names its host: a client may see it before the task's first state (the terminal
          // state of a task waits for all of its output).
          for (const c of chunks) {
            c.hostId = task.hostId;
            budget -= c.data.length;
          }
          output.push(...chunks);
          next = Number(chunks[chunks.length - 1]!.seq) + 1;
        }
        if (opts.noOutput) next = held + 1;
        cursor.set(id, next);
        // Output counted but not yet committed: its commit notifies again. Out of budget: next round.
        const caughtUp = next > held;
        if (budget <= 0 && next <= (terminal ? held : stored)) changed.add(id);
        if (sameAsSent(task, sent.get(id))) continue;
        if (terminal && !caughtUp) continue;
        if (terminal && !ended.has(id)) {
          ended.add(id);
          open--;
        }
        const copy = { ...task };
        sent.set(id, copy);
        tasks.push(copy);
      }
      // The job is recorded finished just after its last task: wait for that, so the last batch says DONE.
      // (Its record is read only for the first batch and the last: it holds every task id.)
      const last = open === 0 && changed.size === 0 && jobs.isFinished(job.id);
      if (first || last || tasks.length > 0 || output.length > 0) {
        yield { job: first || last ? (jobs.getJobRecord(job.id) ?? job) : undefined, tasks, output };
      }
      first = false;
      if (last) return;
      // A big fan-out changes thousands of tasks within milliseconds, most of them several times
      // (queued, dispatched, ended): after a large batch, let changes gather briefly so each task
      // goes out once in its latest state instead of once per state. Small jobs are not delayed.
      if (tasks.length >= COALESCE_AFTER_TASKS && !opts.signal.aborted) await systemClock.sleep(COALESCE_MS, opts.signal).catch(() => undefined);
    }
  } finally {
    unsubscribe();
    opts.signal.removeEventListener("abort", onAbort);
  }
}
