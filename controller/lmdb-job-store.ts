import { fromBinary, toBinary } from "@bufbuild/protobuf";
import type { Database } from "lmdb";
import { FailedPreconditionError } from "../common/errors.js";
import type { LmdbEnv } from "../common/lmdb.js";
import { OutputChunkSchema, StepSchema, type OutputChunk, type OutputStream, type Step } from "../gen/rexmesh/v1/task_pb.js";
import { create } from "@bufbuild/protobuf";
import type { JobStore } from "./job-store.js";
import { LmdbTaskColumns } from "./lmdb-task-columns.js";
import type { JobRecord, Recall, TaskRecord, TaskSteps } from "./model.js";

type StoredJob = Omit<JobRecord, "steps"> & { steps: Uint8Array[] };

/**
 * The layout of the job store this release writes, recorded in the store at
 * its first open: 2, jobs' tasks as columns (controller/lmdb-task-columns.ts).
 * A store recorded with a later layout is refused at start rather than
 * misread. Releases before 2 record none and do not check: they cannot read
 * a layout-2 store and would start with its column jobs' tasks missing, so a
 * downgrade is a restore of the backup taken before the upgrade
 * (deploy/README.md, Upgrading the controller).
 */
export const JOB_STORE_LAYOUT = 2;

/**
 * Jobs, tasks and output in LMDB. Every put of one event-loop turn commits in
 * one transaction (lmdb-js batches them), so a job and all its tasks, or a
 * chunk and the task record counting it, are stored together or not at all.
 *
 * A job whose task ids name their places (controller/task-ids.ts, as the
 * controller makes them) keeps its tasks as one column
 * (controller/lmdb-task-columns.ts): no record per task at submit or at its
 * end. Any other task (a store written before, or ids of another form) has
 * a record of its own, as before.
 */
export class LmdbJobStore implements JobStore {
  private readonly jobs: Database<StoredJob, string>;
  private readonly tasks: Database<TaskRecord, string>;
  /** [taskId, seq] → stream byte + bytes. */
  private readonly output: Database<Buffer, (string | number)[]>;
  private readonly keys: Database<string, string>;
  private readonly unfinished: Database<boolean, string>;
  /** Task id → its own steps (document runs), each step as protobuf binary. */
  private readonly steps: Database<{ run: Uint8Array[]; shown: Uint8Array[] }, string>;
  /** [proxy, taskId] → cancel owed to that proxy. */
  private readonly recalls: Database<Recall, string[]>;
  /** [tenant, hostId, taskId] → nothing: a host's tasks in the order of their (time-ordered) ids. */
  private readonly hostTasks: Database<null, string[]>;
  private readonly columns: LmdbTaskColumns;

  constructor(private readonly env: LmdbEnv) {
    const layout = env.db<number>("job-store");
    const found = layout.get("layout");
    if (found !== undefined && found > JOB_STORE_LAYOUT) {
      throw new FailedPreconditionError(
        `the controller's store (--data) has layout ${found}, written by a later release; this release reads layouts up to ${JOB_STORE_LAYOUT}: run that release, or restore the backup taken before upgrading to it`,
      );
    }
    if (found !== JOB_STORE_LAYOUT) layout.putSync("layout", JOB_STORE_LAYOUT);
    this.jobs = env.db("jobs");
    this.tasks = env.db("tasks");
    this.output = env.db("output", "binary");
    this.keys = env.db("idempotency", "string");
    this.unfinished = env.db("unfinished");
    this.steps = env.db("task-steps");
    this.recalls = env.db("recalls");
    this.hostTasks = env.db("host-tasks");
    this.columns = new LmdbTaskColumns(env);
    this.indexHostTasks();
  }

  /** A store from before the host index: every task is indexed once, at the first start with it. */
  private indexHostTasks(): void {
    if (this.hostTasks.getKeysCount({ limit: 1 }) > 0 || this.tasks.getKeysCount({ limit: 1 }) === 0) return;
    this.hostTasks.transactionSync(() => {
      for (const { value } of this.tasks.getRange({})) this.hostTasks.putSync([value.tenant, value.hostId, value.id], null);
    });
  }

  taskIdsOfHost(tenant: string, hostId: string, limit: number, before?: string): string[] {
    const out: string[] = [];
    const start = before === undefined ? [tenant, hostId, "\uffff"] : [tenant, hostId, before];
    for (const key of this.hostTasks.getKeys({ start, end: [tenant, hostId, ""], reverse: true, limit: limit + 1 })) {
      const id = key[2]!;
      if (id === before) continue;
      out.push(id);
      if (out.length >= limit) break;
    }
    return out;
  }

  putRecalls(recalls: readonly Recall[]): Promise<void> {
    return Promise.all(recalls.map((r) => this.recalls.put([r.proxy, r.taskId], r))).then(() => undefined);
  }

  removeRecall(proxy: string, taskId: string): Promise<void> {
    return this.recalls.remove([proxy, taskId]).then(() => undefined);
  }

  recallsFor(proxy: string): Recall[] {
    const out: Recall[] = [];
    for (const { value } of this.recalls.getRange({ start: [proxy], end: [proxy, "\uffff"] })) out.push(value);
    return out;
  }

  allRecalls(): Recall[] {
    return [...this.recalls.getRange({}).map(({ value }) => value)];
  }

  putJob(job: JobRecord, tasks: readonly TaskRecord[] = [], steps?: ReadonlyMap<string, TaskSteps>): Promise<void> {
    const stored: StoredJob = { ...job, steps: job.steps.map((s) => toBinary(StepSchema, s)) };
    const writes: Promise<unknown>[] = [this.jobs.put(job.id, stored)];
    if (job.finishedAt === undefined) writes.push(this.unfinished.put(job.id, true));
    else writes.push(this.unfinished.remove(job.id));
    if (job.idempotencyKey) writes.push(this.keys.put(`${job.tenant}\0${job.idempotencyKey}`, job.id));
    if (this.columns.fits(job, tasks)) writes.push(...this.columns.putTasks(job, tasks));
    else for (const t of tasks) writes.push(this.tasks.put(t.id, t));
    for (const t of tasks) writes.push(this.hostTasks.put([t.tenant, t.hostId, t.id], null));
    const bin = (list: readonly Step[]) => list.map((x) => toBinary(StepSchema, x));
    for (const [id, s] of steps ?? []) writes.push(this.steps.put(id, { run: bin(s.run), shown: bin(s.shown) }));
    return Promise.all(writes).then(() => undefined);
  }

  putTask(task: TaskRecord): Promise<void> {
    return this.columns.write(task) ?? this.tasks.put(task.id, task).then(() => undefined);
  }

  appendOutput(task: TaskRecord, chunk: OutputChunk): Promise<void> {
    const value = Buffer.allocUnsafe(chunk.data.length + 1);
    value[0] = chunk.stream;
    value.set(chunk.data, 1);
    const putChunk = () => this.output.put([chunk.taskId, Number(chunk.seq)], value);
    return this.columns.write(task, putChunk) ?? Promise.all([putChunk(), this.tasks.put(task.id, task)]).then(() => undefined);
  }

  getJob(id: string): JobRecord | undefined {
    const stored = this.jobs.get(id);
    if (!stored) return undefined;
    return { ...stored, steps: stored.steps.map((b) => fromBinary(StepSchema, b)) };
  }

  getTask(id: string): TaskRecord | undefined {
    const c = this.columns.get(id);
    if (c) return c;
    const t = this.tasks.get(id);
    return t && { ...t };
  }

  taskSteps(taskId: string): TaskSteps | undefined {
    const s = this.steps.get(taskId);
    if (!s) return undefined;
    const parse = (list: readonly Uint8Array[]) => list.map((b) => fromBinary(StepSchema, b));
    return { run: parse(s.run), shown: parse(s.shown) };
  }

  tasksOf(job: JobRecord): TaskRecord[] {
    return this.columns.tasksOf(job) ?? job.taskIds.map((id) => this.getTask(id)).filter((t): t is TaskRecord => t !== undefined);
  }

  readOutput(taskId: string, fromSeq: number, maxBytes: number): OutputChunk[] {
    const out: OutputChunk[] = [];
    let bytes = 0;
    for (const { key, value } of this.output.getRange({ start: [taskId, fromSeq], end: [taskId, Number.MAX_SAFE_INTEGER] })) {
      if (out.length > 0 && bytes + value.length > maxBytes) break;
      out.push(create(OutputChunkSchema, { taskId, seq: BigInt(key[1] as number), stream: value[0] as OutputStream, data: value.subarray(1) }));
      bytes += value.length;
    }
    return out;
  }

  jobByIdempotencyKey(tenant: string, key: string): JobRecord | undefined {
    const id = this.keys.get(`${tenant}\0${key}`);
    return id === undefined ? undefined : this.getJob(id);
  }

  unfinishedJobs(): JobRecord[] {
    const out: JobRecord[] = [];
    for (const id of this.unfinished.getKeys()) {
      const job = this.getJob(id as string);
      if (job) out.push(job);
    }
    return out;
  }

  /** Job ids sort by creation time, so reading the keys backwards gives the newest first. */
  listJobs(tenant: string, limit: number): JobRecord[] {
    const out: JobRecord[] = [];
    for (const { value } of this.jobs.getRange({ reverse: true })) {
      if (value.tenant !== tenant) continue;
      out.push({ ...value, steps: value.steps.map((b) => fromBinary(StepSchema, b)) });
      if (out.length >= limit) break;
    }
    return out;
  }

  checkRoomForWork(what: string): void {
    this.env.checkRoomForWork(what);
  }

  close(): Promise<void> {
    return this.env.close();
  }
}

