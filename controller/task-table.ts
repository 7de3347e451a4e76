import { storageError } from "../common/lmdb.js";
import type { Logger } from "../common/logger.js";
import { isTerminal } from "../common/task-state.js";
import type { OutputChunk } from "../gen/rexmesh/v1/task_pb.js";
import type { JobStore } from "./job-store.js";
import type { JobRecord, TaskRecord } from "./model.js";
import { removeChunk } from "./output-ranges.js";

/**
 * The controller's current record of every task of an unfinished job, and
 * the one path by which task records reach the store.
 *
 * Updates change a live record synchronously and queue its write; writes of
 * one event-loop turn commit together (the store batches them), in order,
 * and whoever waits on a write (a proxy's ack, a watcher) hears of it only
 * once it is durable. Nothing waits for a commit before taking the next
 * update. A task's terminal transition is reported once, after its commit
 * ({@link TaskTableOptions.ended}); the job is finished with its last task.
 */
export interface TaskTableOptions {
  store: JobStore;
  log: Logger;
  /** Called once per task, after the write that made it terminal committed. */
  ended: (task: TaskRecord) => void;
  /** Called after a job's last task ended and the job was stored finished. */
  jobFinished: (job: JobRecord) => void;
  /**
   * Awaited before a job is stored finished: what must be durable first
   * (the output checks of its tasks, so that a controller killed in between
   * finds the job unfinished and checks again at start).
   */
  beforeFinish?: (job: JobRecord) => Promise<void> | undefined;
  now: () => number;
}

export class TaskTable {
  private readonly store: JobStore;
  private readonly log: Logger;
  private readonly opts: TaskTableOptions;
  private readonly live = new Map<string, TaskRecord>();
  /** Unfinished jobs' records: one object per job, changed in place (a cancel) and written by its owner. */
  private readonly jobs = new Map<string, JobRecord>();
  /** Tasks not yet terminal, per unfinished job. */
  private readonly open = new Map<string, number>();
  /** Output chunks committed (contiguous from 1) per live task: what watchers may read. */
  private readonly committed = new Map<string, number>();
  /** The last write queued for a task; a duplicate is acknowledged after it. */
  private readonly lastWrite = new Map<string, Promise<unknown>>();
  private readonly watchers = new Map<string, Set<(taskId?: string) => void>>();
  /**
   * Records of finished jobs' tasks being changed (a late report, output
   * from a proxy that was away): one record per task while its writes are in
   * flight, so that two updates in a row build on each other, not on two
   * copies read from the store.
   */
  private readonly settling = new Map<string, TaskRecord>();

  constructor(opts: TaskTableOptions) {
    this.opts = opts;
    this.store = opts.store;
    this.log = opts.log;
  }

  /** Keeps an unfinished job's tasks in memory; returns how many are still open. */
  track(job: JobRecord, tasks: readonly TaskRecord[]): number {
    this.jobs.set(job.id, job);
    let open = 0;
    for (const task of tasks) {
      this.live.set(task.id, task);
      this.committed.set(task.id, task.outputChunks);
      if (!isTerminal(task.state)) open++;
    }
    this.open.set(job.id, open);
    return open;
  }

  /** The record of an unfinished job. */
  job(jobId: string): JobRecord | undefined {
    return this.jobs.get(jobId);
  }

  /** Every unfinished job's record. */
  unfinishedJobs(): IterableIterator<JobRecord> {
    return this.jobs.values();
  }

  /** The live record (mutable) of a task of an unfinished job. */
  liveRecord(taskId: string): TaskRecord | undefined {
    return this.live.get(taskId);
  }

  /** A live task, or a finished one from the store (a copy: changes to it must be written). */
  get(taskId: string): TaskRecord | undefined {
    return this.live.get(taskId) ?? this.settling.get(taskId) ?? this.store.getTask(taskId);
  }

  /**
   * The record to change for a task, live or not: for a finished job's task
   * the same record is returned until its writes have committed.
   */
  mutable(taskId: string): TaskRecord | undefined {
    const live = this.live.get(taskId) ?? this.settling.get(taskId);
    if (live) return live;
    const stored = this.store.getTask(taskId);
    if (stored) this.settling.set(taskId, stored);
    return stored;
  }

  isLive(taskId: string): boolean {
    return this.live.has(taskId);
  }

  /** Drops a job that could not be stored. */
  untrack(job: JobRecord): void {
    this.open.delete(job.id);
    this.jobs.delete(job.id);
    for (const id of job.taskIds) {
      this.live.delete(id);
      this.committed.delete(id);
    }
  }

  liveTasks(): IterableIterator<TaskRecord> {
    return this.live.values();
  }

  /** Output chunks of a task that are committed, so a reader finds them in the store. */
  committedChunks(task: TaskRecord): number {
    return this.committed.get(task.id) ?? task.outputChunks;
  }

  /**
   * Queues a write of a task's record (with a chunk: the chunk and the record,
   * atomically). `ends`: this write carries the task's terminal transition,
   * reported once it is durable. Watchers hear of every write once it is.
   */
  write(task: TaskRecord, opts: { chunk?: OutputChunk; ends?: boolean } = {}): Promise<void> {
    const snapshot = { ...task };
    const { chunk, ends } = opts;
    const p = (chunk ? this.store.appendOutput(snapshot, chunk) : this.store.putTask(snapshot)).then(
      () => {
        // Never above what the live record counts: a chunk whose own write failed is no longer counted, though a later snapshot did.
        if (this.live.has(task.id)) this.committed.set(task.id, Math.min(Math.max(this.committed.get(task.id) ?? 0, snapshot.outputChunks), task.outputChunks));
        if (ends) this.taskEnded(task);
        this.notify(task.jobId, task.id);
      },
      (err) => {
        this.log.error("storing a task update failed", { task: task.id, err });
        this.undo(task, p, chunk);
        throw storageError(err);
      },
    );
    this.lastWrite.set(task.id, p);
    const forget = () => {
      if (this.lastWrite.get(task.id) !== p) return;
      this.lastWrite.delete(task.id);
      this.settling.delete(task.id);
    };
    p.then(forget, forget);
    return p;
  }

  /**
   * A write failed: what it changed is taken back in memory, so that the
   * update, sent again by its proxy (it was not acknowledged), is applied
   * again rather than taken for a duplicate of what never landed. With no
   * later write queued, the record goes back to what is stored. A later
   * write's snapshot already carries this one's changes and lands them —
   * except a chunk, whose bytes only this write carried: it is no longer
   * counted, and the record is written again so the store stops counting
   * it too.
   */
  private undo(task: TaskRecord, failed: Promise<void>, chunk: OutputChunk | undefined): void {
    if (this.lastWrite.get(task.id) === failed) {
      const stored = this.store.getTask(task.id);
      this.settling.delete(task.id);
      if (!stored) return;
      for (const key of Object.keys(task)) delete (task as unknown as Record<string, unknown>)[key];
      Object.assign(task, stored);
    } else if (chunk) {
      removeChunk(task, Number(chunk.seq));
      this.write(task).catch(() => undefined);
    }
  }

  /** Resolves once every write queued so far for the task has settled. */
  afterLastWrite(taskId: string): Promise<void> {
    return (this.lastWrite.get(taskId) ?? Promise.resolve()).then(
      () => undefined,
      () => undefined,
    );
  }

  private taskEnded(task: TaskRecord): void {
    try {
      this.opts.ended(task);
    } catch (err) {
      this.log.error("handling a task's end failed", { task: task.id, err });
    }
    if (!this.open.has(task.jobId)) return;
    const left = (this.open.get(task.jobId) ?? 1) - 1;
    this.open.set(task.jobId, left);
    if (left === 0) void this.finishJob(task.jobId).catch((err) => this.log.error("finishing a job failed", { job: task.jobId, err }));
  }

  /** Records a job as finished (every task terminal) and drops its in-memory state. */
  async finishJob(jobId: string): Promise<void> {
    const job = this.jobs.get(jobId) ?? this.store.getJob(jobId);
    if (!job || job.finishedAt !== undefined) return;
    const first = this.opts.beforeFinish?.(job);
    if (first) {
      await first;
      if (job.finishedAt !== undefined) return;
    }
    job.finishedAt = this.opts.now();
    await this.store.putJob(job);
    this.open.delete(job.id);
    this.jobs.delete(job.id);
    for (const id of job.taskIds) {
      this.live.delete(id);
      this.committed.delete(id);
    }
    this.log.info("job finished", { job: job.id, tasks: job.taskIds.length });
    this.opts.jobFinished(job);
    this.notify(job.id);
  }

  /** Calls fn with the task that changed (none: the job itself) whenever something of the job changes; returns the unsubscribe function. */
  subscribe(jobId: string, fn: (taskId?: string) => void): () => void {
    let set = this.watchers.get(jobId);
    if (!set) this.watchers.set(jobId, (set = new Set()));
    set.add(fn);
    return () => {
      set.delete(fn);
      if (set.size === 0) this.watchers.delete(jobId);
    };
  }

  notify(jobId: string, taskId?: string): void {
    const set = this.watchers.get(jobId);
    if (set) for (const fn of [...set]) fn(taskId);
  }
}
