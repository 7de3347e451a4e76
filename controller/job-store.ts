import type { OutputChunk } from "../gen/rexmesh/v1/task_pb.js";
import type { JobRecord, Recall, TaskRecord, TaskSteps } from "./model.js";

/**
 * Where the controller keeps jobs, tasks and output. Reads are synchronous
 * (LMDB reads are); writes resolve once durable, and the controller
 * acknowledges a peer only after that, so nothing acked is ever lost.
 * Implementations batch concurrent writes into one commit.
 */
export interface JobStore {
  /** Stores a job with its tasks and, for a document run, each task's own steps (written once, with the job). */
  putJob(job: JobRecord, tasks?: readonly TaskRecord[], steps?: ReadonlyMap<string, TaskSteps>): Promise<void>;
  /** A task's own steps (document runs only). */
  taskSteps(taskId: string): TaskSteps | undefined;
  putTask(task: TaskRecord): Promise<void>;
  /** Stores a chunk and the task record that counts it, atomically. */
  appendOutput(task: TaskRecord, chunk: OutputChunk): Promise<void>;
  getJob(id: string): JobRecord | undefined;
  getTask(id: string): TaskRecord | undefined;
  tasksOf(job: JobRecord): TaskRecord[];
  /** Ids of a host's tasks, of every job, newest first: at most `limit`, those older than `before` when given. */
  taskIdsOfHost(tenant: string, hostId: string, limit: number, before?: string): string[];
  /** Chunks of a task with seq ≥ fromSeq, oldest first, up to about maxBytes (at least one). */
  readOutput(taskId: string, fromSeq: number, maxBytes: number): OutputChunk[];
  jobByIdempotencyKey(tenant: string, key: string): JobRecord | undefined;
  /** Every job whose finishedAt is unset; used to rebuild in-memory indexes at start. */
  unfinishedJobs(): JobRecord[];
  /** A tenant's jobs, newest first. */
  listJobs(tenant: string, limit: number): JobRecord[];
  /** Throws RESOURCE_EXHAUSTED when the store is too full for new work. */
  checkRoomForWork?(what: string): void;
  /** Stores cancels owed to proxies (replacing any for the same proxy and task). */
  putRecalls(recalls: readonly Recall[]): Promise<void>;
  removeRecall(proxy: string, taskId: string): Promise<void>;
  /** The cancels owed to one proxy (or "bundle:<region>"), oldest task first. */
  recallsFor(proxy: string): Recall[];
  /** Every cancel owed to any proxy (read once at start, to index them by host). */
  allRecalls(): Recall[];
  close(): Promise<void>;
}

/** Keeps everything in memory: for logic tests and throwaway meshes. */
export class MemoryJobStore implements JobStore {
  private readonly jobs = new Map<string, JobRecord>();
  private readonly tasks = new Map<string, TaskRecord>();
  private readonly output = new Map<string, Map<number, OutputChunk>>();
  private readonly keys = new Map<string, string>();
  private readonly steps = new Map<string, TaskSteps>();
  private readonly recalls = new Map<string, Recall>();

  async putRecalls(recalls: readonly Recall[]): Promise<void> {
    for (const r of recalls) this.recalls.set(`${r.proxy}\0${r.taskId}`, { ...r });
  }

  async removeRecall(proxy: string, taskId: string): Promise<void> {
    this.recalls.delete(`${proxy}\0${taskId}`);
  }

  recallsFor(proxy: string): Recall[] {
    return [...this.recalls.values()].filter((r) => r.proxy === proxy).sort((a, b) => (a.taskId < b.taskId ? -1 : 1));
  }

  allRecalls(): Recall[] {
    return [...this.recalls.values()].map((r) => ({ ...r }));
  }

  async putJob(job: JobRecord, tasks: readonly TaskRecord[] = [], steps?: ReadonlyMap<string, TaskSteps>): Promise<void> {
    this.jobs.set(job.id, structuredClone(job));
    for (const [id, s] of steps ?? []) this.steps.set(id, s);
    if (job.idempotencyKey) this.keys.set(`${job.tenant}\0${job.idempotencyKey}`, job.id);
    for (const t of tasks) this.tasks.set(t.id, { ...t });
  }

  async putTask(task: TaskRecord): Promise<void> {
    this.tasks.set(task.id, { ...task });
  }

  async appendOutput(task: TaskRecord, chunk: OutputChunk): Promise<void> {
    let chunks = this.output.get(task.id);
    if (!chunks) this.output.set(task.id, (chunks = new Map()));
    chunks.set(Number(chunk.seq), chunk);
    this.tasks.set(task.id, { ...task });
  }

  getJob(id: string): JobRecord | undefined {
    const job = this.jobs.get(id);
    return job && structuredClone(job);
  }

  getTask(id: string): TaskRecord | undefined {
    const t = this.tasks.get(id);
    return t && { ...t };
  }

  taskSteps(taskId: string): TaskSteps | undefined {
    return this.steps.get(taskId);
  }

  tasksOf(job: JobRecord): TaskRecord[] {
    return job.taskIds.map((id) => this.getTask(id)).filter((t): t is TaskRecord => t !== undefined);
  }

  taskIdsOfHost(tenant: string, hostId: string, limit: number, before?: string): string[] {
    const ids = [...this.tasks.values()].filter((t) => t.tenant === tenant && t.hostId === hostId && (before === undefined || t.id < before)).map((t) => t.id);
    return ids.sort((a, b) => (a < b ? 1 : a > b ? -1 : 0)).slice(0, limit);
  }

  readOutput(taskId: string, fromSeq: number, maxBytes: number): OutputChunk[] {
    const chunks = this.output.get(taskId) ?? new Map<number, OutputChunk>();
    const seqs = [...chunks.keys()].filter((s) => s >= fromSeq).sort((a, b) => a - b);
    const out: OutputChunk[] = [];
    let bytes = 0;
    for (const seq of seqs) {
      const c = chunks.get(seq)!;
      if (out.length > 0 && bytes + c.data.length > maxBytes) break;
      out.push(c);
      bytes += c.data.length;
    }
    return out;
  }

  jobByIdempotencyKey(tenant: string, key: string): JobRecord | undefined {
    const id = this.keys.get(`${tenant}\0${key}`);
    return id === undefined ? undefined : this.getJob(id);
  }

  unfinishedJobs(): JobRecord[] {
    return [...this.jobs.values()].filter((j) => j.finishedAt === undefined).map((j) => structuredClone(j));
  }

  listJobs(tenant: string, limit: number): JobRecord[] {
    return [...this.jobs.values()]
      .filter((j) => j.tenant === tenant)
      .sort((a, b) => (a.id < b.id ? 1 : -1))
      .slice(0, limit)
      .map((j) => structuredClone(j));
  }

  async close(): Promise<void> {}
}
