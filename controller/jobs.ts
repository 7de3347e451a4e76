import { create } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { Clock, Timer } from "../common/clock.js";
import { FailedPreconditionError, InvalidArgumentError, NotFoundError } from "../common/errors.js";
import type { IdGenerator } from "../common/ids.js";
import type { Logger } from "../common/logger.js";
import { advances, isTerminal } from "../common/task-state.js";
import type { PeerIdentity } from "../certs/identity.js";
import {
  TaskSpecSchema,
  TaskState,
  type OutputChunk,
  type Step,
  type TaskSpec,
  type TaskStatus,
} from "../gen/rexmesh/v1/task_pb.js";
import type { Inventory } from "./inventory.js";
import type { JobStore } from "./job-store.js";
import type { HostRecord, JobRecord, TaskRecord } from "./model.js";
import { validateSteps } from "./validate.js";

/** What the job manager needs of a connected proxy. */
export interface ProxyPort {
  readonly name: string;
  readonly region: string;
  sendTask(spec: TaskSpec): void;
  sendCancel(taskId: string, hostId: string): void;
}

export interface SubmitRequest {
  hostIds: string[];
  allHosts: boolean;
  steps: Step[];
  env: Record<string, string>;
  workingDir: string;
  stdin: Uint8Array;
  timeoutMs: number;
  /** Zero means the controller default. */
  deliveryDeadlineMs: number;
  idempotencyKey: string;
  idempotent: boolean;
}

export interface JobManagerOptions {
  store: JobStore;
  inventory: Inventory;
  clock: Clock;
  ids: IdGenerator;
  log: Logger;
  /** Delivery deadline when a job gives none. Default 1 hour. */
  defaultDeliveryDeadlineMs?: number;
  /** Largest stdin a job may carry. Default 1 MiB. */
  maxStdinBytes?: number;
  /** Most hosts one job may target. Default 200,000. */
  maxHostsPerJob?: number;
}

/**
 * Plans jobs into tasks, routes each task to the proxy that holds its host,
 * and applies what comes back: statuses (only forward, first terminal state
 * wins), output (contiguous by seq, duplicates dropped). Every update is
 * stored before it is acknowledged and before watchers see it.
 */
export class JobManager {
  private readonly store: JobStore;
  private readonly inventory: Inventory;
  private readonly clock: Clock;
  private readonly ids: IdGenerator;
  private readonly log: Logger;
  private readonly defaultDeliveryDeadlineMs: number;
  private readonly maxStdinBytes: number;
  private readonly maxHostsPerJob: number;

  private readonly proxies = new Map<string, ProxyPort>();
  /** Tasks at the controller not yet taken by a proxy, by host. */
  private readonly pendingByHost = new Map<string, Set<string>>();
  /** Task id → proxy it was sent to on the current stream, while the proxy has not confirmed it. */
  private readonly sentTo = new Map<string, string>();
  /**
   * Task id → proxies it was ever sent to while unconfirmed. Unlike sentTo it
   * survives a lost stream: such a task may have arrived, so a cancel must go
   * through that proxy (which answers even for tasks it never got).
   */
  private readonly mayHaveReached = new Map<string, Set<string>>();
  private readonly watchers = new Map<string, Set<(taskId?: string) => void>>();
  private readonly deadlineTimers = new Map<string, Timer>();
  /** Serializes updates of one task so concurrent writes never reorder. */
  private readonly taskLocks = new Map<string, Promise<void>>();

  constructor(opts: JobManagerOptions) {
    this.store = opts.store;
    this.inventory = opts.inventory;
    this.clock = opts.clock;
    this.ids = opts.ids;
    this.log = opts.log;
    this.defaultDeliveryDeadlineMs = opts.defaultDeliveryDeadlineMs ?? 3_600_000;
    this.maxStdinBytes = opts.maxStdinBytes ?? 1 << 20;
    this.maxHostsPerJob = opts.maxHostsPerJob ?? 200_000;
  }

  /** Rebuilds in-memory indexes from the store after a restart. */
  recover(): void {
    for (const job of this.store.unfinishedJobs()) {
      for (const task of this.store.tasksOf(job)) {
        if (task.state === TaskState.PENDING) this.addPending(task);
      }
      this.armDeadline(job);
    }
  }

  // ---- proxies and hosts -------------------------------------------------

  proxyConnected(port: ProxyPort): void {
    const prev = this.proxies.get(port.name);
    this.proxies.set(port.name, port);
    if (prev && prev !== port) {
      // What was sent on the old stream may be lost; the new stream gets it again (the proxy drops duplicates).
      this.forgetSent(port.name);
      this.log.info("proxy link replaced", { proxy: port.name });
    }
  }

  private forgetSent(proxy: string): void {
    for (const [taskId, name] of this.sentTo) if (name === proxy) this.sentTo.delete(taskId);
  }

  proxyDisconnected(port: ProxyPort): void {
    if (this.proxies.get(port.name) !== port) return;
    this.proxies.delete(port.name);
    this.inventory.proxyLost(port.name, this.clock.now());
    this.forgetSent(port.name);
  }

  /** A host's stream opened at a proxy: its pending tasks can go now. */
  hostConnected(host: HostRecord): void {
    const pending = this.pendingByHost.get(host.id);
    if (!pending) return;
    for (const taskId of pending) {
      const task = this.store.getTask(taskId);
      if (task) this.dispatch(task);
    }
  }

  // ---- submit -------------------------------------------------------------

  async submit(caller: PeerIdentity, req: SubmitRequest): Promise<JobRecord> {
    const tenant = caller.scope;
    if (req.idempotencyKey) {
      const existing = this.store.jobByIdempotencyKey(tenant, req.idempotencyKey);
      if (existing) return existing;
    }
    validateSteps(req.steps);
    if (req.stdin.length > this.maxStdinBytes) {
      throw new InvalidArgumentError(`stdin is ${req.stdin.length} bytes; the limit is ${this.maxStdinBytes}`);
    }
    if (req.timeoutMs < 0 || req.deliveryDeadlineMs < 0) throw new InvalidArgumentError("timeouts cannot be negative");
    for (const key of Object.keys(req.env)) {
      if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(key)) throw new InvalidArgumentError(`environment variable name ${JSON.stringify(key)} is not valid`);
    }
    const hosts = this.resolveHosts(tenant, req);
    const now = this.clock.now();
    const job: JobRecord = {
      id: this.ids("j"),
      tenant,
      submittedBy: caller.id,
      createdAt: now,
      steps: req.steps,
      env: req.env,
      workingDir: req.workingDir,
      stdin: req.stdin,
      timeoutMs: req.timeoutMs,
      deliverBy: now + (req.deliveryDeadlineMs || this.defaultDeliveryDeadlineMs),
      idempotent: req.idempotent,
      idempotencyKey: req.idempotencyKey,
      cancelRequested: false,
      taskIds: [],
    };
    const tasks: TaskRecord[] = hosts.map((h) => ({
      id: this.ids("t"),
      jobId: job.id,
      tenant,
      hostId: h.id,
      region: h.region,
      proxy: "",
      state: TaskState.PENDING,
      signal: "",
      message: "",
      updatedAt: now,
      outputChunks: 0,
      outputTruncated: false,
    }));
    job.taskIds = tasks.map((t) => t.id);
    await this.store.putJob(job, tasks);
    this.log.info("job submitted", { job: job.id, tenant, by: caller.id, hosts: tasks.length });
    for (const task of tasks) {
      this.addPending(task);
      this.dispatch(task, job);
    }
    this.armDeadline(job);
    return job;
  }

  private resolveHosts(tenant: string, req: SubmitRequest): HostRecord[] {
    if (req.allHosts === req.hostIds.length > 0) {
      throw new InvalidArgumentError("name the hosts to run on, or ask for all hosts (exactly one of the two)");
    }
    let hosts: HostRecord[];
    if (req.allHosts) {
      hosts = this.inventory.list(tenant);
      if (hosts.length === 0) throw new FailedPreconditionError("there are no hosts in this tenant yet");
    } else {
      const ids = [...new Set(req.hostIds)];
      const unknown: string[] = [];
      hosts = [];
      for (const id of ids) {
        const h = this.inventory.get(id);
        // Hosts of other tenants are reported exactly like hosts that do not exist.
        if (!h || h.tenant !== tenant) unknown.push(id);
        else hosts.push(h);
      }
      if (unknown.length > 0) {
        const shown = unknown.slice(0, 10).join(", ") + (unknown.length > 10 ? `, and ${unknown.length - 10} more` : "");
        throw new NotFoundError(`unknown host${unknown.length > 1 ? "s" : ""}: ${shown}`);
      }
    }
    if (hosts.length > this.maxHostsPerJob) {
      throw new InvalidArgumentError(`the job targets ${hosts.length} hosts; the limit is ${this.maxHostsPerJob}`);
    }
    return hosts;
  }

  private addPending(task: TaskRecord): void {
    let set = this.pendingByHost.get(task.hostId);
    if (!set) this.pendingByHost.set(task.hostId, (set = new Set()));
    set.add(task.id);
  }

  private removePending(task: TaskRecord): void {
    const set = this.pendingByHost.get(task.hostId);
    this.sentTo.delete(task.id);
    this.mayHaveReached.delete(task.id);
    if (!set) return;
    set.delete(task.id);
    if (set.size === 0) this.pendingByHost.delete(task.hostId);
  }

  /** Sends a pending task to the proxy holding its host, if any holds it now. */
  private dispatch(task: TaskRecord, knownJob?: JobRecord): void {
    if (task.state !== TaskState.PENDING) return;
    const host = this.inventory.get(task.hostId);
    if (!host?.connected) return;
    const port = this.proxies.get(host.proxy);
    if (!port || this.sentTo.get(task.id) === port.name) return;
    const job = knownJob ?? this.store.getJob(task.jobId);
    if (!job || job.cancelRequested) return;
    if (this.clock.now() >= job.deliverBy) return;
    this.sentTo.set(task.id, port.name);
    let reached = this.mayHaveReached.get(task.id);
    if (!reached) this.mayHaveReached.set(task.id, (reached = new Set()));
    reached.add(port.name);
    port.sendTask(this.taskSpec(job, task));
  }

  taskSpec(job: JobRecord, task: TaskRecord): TaskSpec {
    return create(TaskSpecSchema, {
      taskId: task.id,
      jobId: job.id,
      tenant: job.tenant,
      hostId: task.hostId,
      steps: job.steps,
      env: job.env,
      workingDir: job.workingDir,
      stdin: job.stdin,
      timeout: job.timeoutMs > 0 ? durationFromMs(job.timeoutMs) : undefined,
      deliverBy: timestampFromMs(job.deliverBy),
      idempotent: job.idempotent,
      createdAt: timestampFromMs(job.createdAt),
    });
  }

  // ---- updates from proxies ----------------------------------------------

  /** Runs fn for one task after every earlier update of that task finished. */
  private withTask<T>(taskId: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.taskLocks.get(taskId) ?? Promise.resolve();
    const run = prev.then(fn);
    const done = run.then(
      () => undefined,
      () => undefined,
    );
    this.taskLocks.set(taskId, done);
    void done.then(() => {
      if (this.taskLocks.get(taskId) === done) this.taskLocks.delete(taskId);
    });
    return run;
  }

  /**
   * Applies a status reported through a proxy. Resolves once it is stored;
   * the caller acknowledges then. Statuses that do not move the task forward
   * (replays, stale reports) are acknowledged without effect.
   */
  applyStatus(proxy: ProxyPort, status: TaskStatus): Promise<void> {
    return this.withTask(status.taskId, async () => {
      const task = this.store.getTask(status.taskId);
      if (!task) {
        this.log.warn("status for an unknown task dropped", { task: status.taskId, proxy: proxy.name });
        return;
      }
      if (!advances(task.state, status.state)) return;
      task.state = status.state;
      task.proxy = proxy.name;
      task.region = proxy.region;
      task.updatedAt = this.clock.now();
      task.message = status.message;
      task.signal = status.signal;
      if (status.exitCode !== undefined) task.exitCode = status.exitCode;
      if (isTerminal(status.state)) {
        task.expectedChunks = Number(status.outputChunks);
        task.outputTruncated = status.outputTruncated;
      }
      if (task.state !== TaskState.PENDING) this.removePending(task);
      await this.store.putTask(task);
      if (isTerminal(task.state)) await this.maybeFinishJob(task.jobId);
      this.notify(task.jobId, task.id);
    });
  }

  /** Stores an output chunk if it is the next one of its task; returns the highest contiguous seq held. */
  applyOutput(chunk: OutputChunk): Promise<number> {
    return this.withTask(chunk.taskId, async () => {
      const task = this.store.getTask(chunk.taskId);
      if (!task) return Number(chunk.seq);
      const seq = Number(chunk.seq);
      if (seq === task.outputChunks + 1) {
        task.outputChunks = seq;
        await this.store.appendOutput(task, chunk);
        this.notify(task.jobId, task.id);
      }
      return task.outputChunks;
    });
  }

  /**
   * Marks a task terminal at the controller itself (cancelled or expired
   * before any proxy could have it). The caller notifies watchers once the
   * job record is settled too.
   */
  private async finishHere(task: TaskRecord, state: TaskState, message: string): Promise<boolean> {
    return this.withTask(task.id, async () => {
      const current = this.store.getTask(task.id);
      if (!current || !advances(current.state, state)) return false;
      current.state = state;
      current.message = message;
      current.updatedAt = this.clock.now();
      current.expectedChunks = current.outputChunks;
      this.removePending(current);
      await this.store.putTask(current);
      return true;
    });
  }

  private async maybeFinishJob(jobId: string): Promise<void> {
    const job = this.store.getJob(jobId);
    if (!job || job.finishedAt !== undefined) return;
    const tasks = this.store.tasksOf(job);
    if (!tasks.every((t) => isTerminal(t.state))) return;
    job.finishedAt = this.clock.now();
    await this.store.putJob(job);
    this.deadlineTimers.get(jobId)?.cancel();
    this.deadlineTimers.delete(jobId);
    this.log.info("job finished", { job: jobId, tasks: tasks.length });
  }

  // ---- cancel and deadlines ----------------------------------------------

  async cancel(caller: PeerIdentity, jobId: string): Promise<JobRecord> {
    const job = this.getJobFor(caller, jobId);
    if (job.finishedAt !== undefined) return job;
    if (!job.cancelRequested) {
      job.cancelRequested = true;
      await this.store.putJob(job);
    }
    this.log.info("job cancel requested", { job: job.id, by: caller.id });
    const changed: string[] = [];
    for (const task of this.store.tasksOf(job)) {
      if (isTerminal(task.state)) continue;
      const proxies = this.proxiesHolding(task);
      if (proxies.length === 0) {
        if (await this.finishHere(task, TaskState.CANCELLED, "cancelled before delivery")) changed.push(task.id);
      } else {
        // Proxies that are away get the cancel when they return (resendCancels).
        for (const name of proxies) this.proxies.get(name)?.sendCancel(task.id, task.hostId);
      }
    }
    await this.settle(job.id, changed);
    return this.store.getJob(job.id) ?? job;
  }

  /** Every proxy that holds the task or may have received it. */
  private proxiesHolding(task: TaskRecord): string[] {
    const names = new Set(this.mayHaveReached.get(task.id));
    if (task.proxy) names.add(task.proxy);
    return [...names];
  }

  /** Finishes the job if it can, then tells watchers what changed. */
  private async settle(jobId: string, changedTasks: readonly string[]): Promise<void> {
    await this.maybeFinishJob(jobId);
    for (const id of changedTasks) this.notify(jobId, id);
    this.notify(jobId);
  }

  /**
   * A proxy (re)connected and told us the hosts it holds: tasks it may have
   * received but never confirmed go to it again, even past their deadline
   * or cancelled, because only the proxy can say what became of them (it
   * drops duplicates, expires late ones and cancels cancelled ones). Then
   * cancels it may have missed.
   */
  proxyReady(port: ProxyPort): void {
    for (const [taskId, proxies] of this.mayHaveReached) {
      if (!proxies.has(port.name) || this.sentTo.get(taskId) === port.name) continue;
      const task = this.store.getTask(taskId);
      const job = task && this.store.getJob(task.jobId);
      if (!task || !job || task.state !== TaskState.PENDING) continue;
      this.sentTo.set(taskId, port.name);
      port.sendTask(this.taskSpec(job, task));
    }
    for (const job of this.store.unfinishedJobs()) {
      if (!job.cancelRequested) continue;
      for (const task of this.store.tasksOf(job)) {
        if (!isTerminal(task.state) && this.proxiesHolding(task).includes(port.name)) port.sendCancel(task.id, task.hostId);
      }
    }
  }

  private armDeadline(job: JobRecord): void {
    if (job.finishedAt !== undefined || this.deadlineTimers.has(job.id)) return;
    const delay = Math.max(0, job.deliverBy - this.clock.now());
    this.deadlineTimers.set(
      job.id,
      this.clock.setTimeout(() => {
        this.deadlineTimers.delete(job.id);
        void this.expire(job.id).catch((err) => this.log.error("expiring tasks failed", { job: job.id, err }));
      }, delay),
    );
  }

  /** Tasks still at the controller when the delivery deadline passes will never run. */
  private async expire(jobId: string): Promise<void> {
    const job = this.store.getJob(jobId);
    if (!job) return;
    const changed: string[] = [];
    for (const task of this.store.tasksOf(job)) {
      // A task that may sit at a proxy is expired there (the proxy enforces the same deadline).
      if (task.state === TaskState.PENDING && this.proxiesHolding(task).length === 0) {
        if (await this.finishHere(task, TaskState.EXPIRED, "the delivery deadline passed before the host could be reached")) changed.push(task.id);
      }
    }
    await this.settle(jobId, changed);
  }

  // ---- reading and watching ----------------------------------------------

  /** A job of the caller's tenant; other tenants' jobs look like missing ones. */
  getJobFor(caller: PeerIdentity, jobId: string): JobRecord {
    const job = jobId ? this.store.getJob(jobId) : undefined;
    if (!job || job.tenant !== caller.scope) throw new NotFoundError(`job ${JSON.stringify(jobId)} not found`);
    return job;
  }

  tasksOf(job: JobRecord): TaskRecord[] {
    return this.store.tasksOf(job);
  }

  getJobRecord(id: string): JobRecord | undefined {
    return this.store.getJob(id);
  }

  getTaskRecord(id: string): TaskRecord | undefined {
    return this.store.getTask(id);
  }

  readOutput(taskId: string, fromSeq: number, maxBytes: number): OutputChunk[] {
    return this.store.readOutput(taskId, fromSeq, maxBytes);
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

  private notify(jobId: string, taskId?: string): void {
    const set = this.watchers.get(jobId);
    if (set) for (const fn of [...set]) fn(taskId);
  }

  close(): void {
    for (const t of this.deadlineTimers.values()) t.cancel();
    this.deadlineTimers.clear();
  }
}
