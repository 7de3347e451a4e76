import type { RoleCore } from "../common/lifecycle.js";
import { createHash } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import type { Clock, Timer } from "../common/clock.js";
import { AlreadyExistsError, NotFoundError, UnavailableError } from "../common/errors.js";
import type { IdGenerator } from "../common/ids.js";
import { storageError } from "../common/lmdb.js";
import { LIMITS } from "../common/limits.js";
import type { Logger } from "../common/logger.js";
import { advances, isTerminal } from "../common/task-state.js";
import type { PeerIdentity } from "../certs/identity.js";
import { isPingOnly } from "../common/task-signing.js";
import { vouchedFor } from "../common/host-signing.js";
import { ResultCheck } from "../gen/rexmesh/v1/controller_pb.js";
import { TaskSpecSchema, TaskState, type OutputChunk, type Step, type TaskSpec, type TaskStatus } from "../gen/rexmesh/v1/task_pb.js";
import type { DocumentStore } from "./document-store.js";
import type { Inventory } from "./inventory.js";
import type { JobStore } from "./job-store.js";
import { placeOfTaskId, taskIdOf } from "./task-ids.js";
import type { HostRecord, JobRecord, TaskRecord, TaskSteps } from "./model.js";
import { addChunk, firstMissing, hasChunk, lastHeld } from "./output-ranges.js";
import { OutputDigests } from "./output-digests.js";
import { Planner, requestDigest, type Plan, type PlannedHost, type SubmitAuthorizer, type SubmitRequest } from "./planner.js";
import { hasLimits, resolveRate, Rollout } from "./rollout.js";
import { bundleHolder, Router, type ProxyPort } from "./router.js";
import { TaskBounds } from "./task-bounds.js";
import { TaskTable } from "./task-table.js";
import type { JobObserver } from "./job-metrics.js";

export type { PlannedHost, SubmitAuthorizer, SubmitRequest, RateRequest } from "./planner.js";
export { parseTarget } from "./planner.js";
export { resolveRate } from "./rollout.js";
export type { ProxyPort } from "./router.js";

export interface JobManagerOptions {
  store: JobStore;
  inventory: Inventory;
  clock: Clock;
  ids: IdGenerator;
  log: Logger;
  /** Delivery deadline when a job gives none. Default 1 hour. */
  defaultDeliveryDeadlineMs?: number;
  /** How long a host may stay unreachable before its tasks end LOST, when a job gives none. Default 15 minutes. */
  defaultLostAfterMs?: number;
  /** After a cancel, how long a reachable host has to confirm before the controller ends the task itself. Default 10 s. */
  cancelGraceMs?: number;
  /** How often the bounds of open tasks are checked. Default 1 s. */
  boundsSweepMs?: number;
  /** Largest stdin a job may carry. Default 1 MiB. */
  maxStdinBytes?: number;
  /** Most hosts one job may target. Default 200,000. */
  maxHostsPerJob?: number;
  /** Stored documents, for document runs; without it a document run is refused. */
  documents?: DocumentStore;
  /** Why a host's identity is revoked (undefined when it is not): its tasks end REJECTED at submit. */
  revoked?: (host: HostRecord) => string | undefined;
  /** Checks a task end against its host's signature (common/host-signing.ts); absent: results are not checked. */
  checkEnd?: (status: TaskStatus, host: PeerIdentity) => "ok" | "unknown" | "bad";
  /** Told how long jobs, tasks and first output took (the controller's histograms); absent: nothing is measured. */
  observe?: JobObserver;
}

/** Tasks a submit sends to proxies per turn of the event loop (see sendInSlices). */
const DISPATCH_SLICE = 1000;

/**
 * The controller's jobs: plans a request into tasks (planner.ts), gates
 * their release (rollout.ts), routes them to the proxies holding their
 * hosts (router.ts), applies what comes back through the one write path
 * (task-table.ts), and ends every task within its bound (task-bounds.ts).
 *
 * Statuses only move a task forward and the first terminal state wins;
 * output is kept by seq, each chunk once, whatever order and path it takes;
 * every update is stored before it is acknowledged and before watchers see
 * it. A host's report that comes after the controller ended the task itself
 * is kept beside it (late) without changing it.
 */
export class JobManager implements RoleCore {
  private readonly store: JobStore;
  private readonly inventory: Inventory;
  private readonly clock: Clock;
  private readonly ids: IdGenerator;
  private readonly log: Logger;
  private readonly defaultDeliveryDeadlineMs: number;
  private readonly defaultLostAfterMs: number;
  private readonly planner: Planner;
  private readonly table: TaskTable;
  private readonly rollout: Rollout;
  private readonly router: Router;
  private readonly bounds: TaskBounds;
  /** Idempotency keys of submits being stored, so that a retry meanwhile waits for that job. */
  private readonly submittingKeys = new Map<string, Promise<JobRecord>>();
  /** Jobs being submitted: their first releases are routed with the job's first write, not one by one. */
  private readonly submitting = new Set<string>();
  /** Submits being stored now: a drain waits for them. */
  private readonly creating = new Set<Promise<JobRecord>>();
  /** Set by drain: new submits are refused. */
  private draining = false;
  private readonly checkEnd: JobManagerOptions["checkEnd"];
  private readonly observe: JobObserver | undefined;
  /** Signature checks of the status messages in hand (see checkEndOnce). */
  private readonly endChecks = new WeakMap<TaskStatus, "ok" | "unknown" | "bad">();
  /** Tasks whose stored output is being hashed against what the host signed. */
  /** Output checks in progress, by task: each resolves once its result is stored (or failed). */
  private readonly checking = new Map<string, Promise<void>>();
  /** Whether a job's steps are pings only, by the job's steps (see pingOnly). */
  private readonly pingSteps = new WeakMap<readonly Step[], boolean>();
  /** Output hashed as it is stored, so that the check need not read it back. */
  private readonly digests = new OutputDigests();
  /** Per region: results received by bundle, to acknowledge in the next tasks bundle. */
  private readonly bundleAcks = new Map<string, Map<string, { state: TaskState; own: TaskState; seq: number }>>();

  constructor(opts: JobManagerOptions) {
    this.store = opts.store;
    this.inventory = opts.inventory;
    this.clock = opts.clock;
    this.ids = opts.ids;
    this.log = opts.log;
    this.defaultDeliveryDeadlineMs = opts.defaultDeliveryDeadlineMs ?? 3_600_000;
    this.defaultLostAfterMs = opts.defaultLostAfterMs ?? 15 * 60_000;
    this.checkEnd = opts.checkEnd;
    this.observe = opts.observe;
    const now = () => this.clock.now();
    this.planner = new Planner({ inventory: opts.inventory, documents: opts.documents, revoked: opts.revoked, maxStdinBytes: opts.maxStdinBytes, maxHostsPerJob: opts.maxHostsPerJob });
    this.table = new TaskTable({
      store: this.store,
      log: this.log,
      now,
      ended: (task) => this.taskEnded(task),
      jobFinished: (job) => this.jobFinished(job),
      beforeFinish: (job) => this.checksOf(job),
    });
    this.router = new Router({
      inventory: this.inventory,
      store: this.store,
      log: this.log,
      now,
      jobOf: (task) => this.jobOf(task.jobId),
      specOf: (job, task) => this.taskSpec(job, task),
      write: (task) => this.table.write(task),
    });
    this.rollout = new Rollout({
      task: (id) => this.table.liveRecord(id),
      release: (task) => {
        if (this.submitting.has(task.jobId)) {
          const job = this.jobOf(task.jobId);
          if (job) this.router.preRoute(task, job);
          return;
        }
        // Stored as released with its first holder in one write, then sent.
        this.router.route(task);
        if (!task.proxies?.length) void this.table.write(task).catch(() => undefined);
      },
      skip: (task, reason) => {
        this.endHere(task, TaskState.SKIPPED, reason).catch((err) => this.log.error("skipping a task failed", { task: task.id, err }));
      },
    });
    this.bounds = new TaskBounds({
      clock: this.clock,
      log: this.log,
      router: this.router,
      inventory: this.inventory,
      sweepMs: opts.boundsSweepMs,
      defaultLostAfterMs: this.defaultLostAfterMs,
      cancelGraceMs: opts.cancelGraceMs,
      jobOf: (task) => this.jobOf(task.jobId),
      unfinishedJobs: () => this.table.unfinishedJobs(),
      end: (task, state, message, recall) => this.endHere(task, state, message, recall),
    });
  }

  /** Rebuilds in-memory state from the store (after a restart) and starts the task bounds' sweep. */
  start(): void {
    this.recover();
    this.bounds.start();
  }

  /**
   * Stops taking work: a new submit is refused UNAVAILABLE (a client may
   * retry it at another controller or after the restart, with its
   * idempotency key), and the submits being stored get up to graceMs to
   * finish. Everything else is durable in the store and goes on after the
   * next start.
   */
  async drain(graceMs: number): Promise<void> {
    this.draining = true;
    const inFlight = [...this.creating];
    if (inFlight.length === 0) return;
    let timer: Timer | undefined;
    await Promise.race([Promise.allSettled(inFlight), new Promise<void>((resolve) => (timer = this.clock.setTimeout(resolve, graceMs)))]);
    timer?.cancel();
  }

  /** Stops the timers; the store is the caller's to close. */
  stop(): void {
    this.bounds.stop();
  }

  /** An unfinished job's record as kept in memory (a cancel changes it there), else the stored one. */
  private jobOf(jobId: string): JobRecord | undefined {
    return this.table.job(jobId) ?? this.store.getJob(jobId);
  }

  private recover(): void {
    for (const job of this.store.unfinishedJobs()) this.track(job, this.store.tasksOf(job));
  }

  /** Keeps an unfinished job's tasks in memory. */
  private track(job: JobRecord, tasks: readonly TaskRecord[]): void {
    const open = this.table.track(job, tasks);
    if (open === 0 && tasks.length > 0) {
      // Every task ended but the controller stopped before recording the job as finished.
      void this.table.finishJob(job.id).catch((err) => this.log.error("finishing a recovered job failed", { job: job.id, err }));
      return;
    }
    for (const task of tasks) this.router.track(task);
    // An ended task whose check was not stored before a stop (see checksOf): checked now.
    for (const task of tasks) if (isTerminal(task.state)) this.startCheck(task);
    if (job.rate) this.rollout.add(job.id, job.rate, tasks);
    for (const task of tasks) {
      if (task.rejectAtSubmit !== undefined && task.state === TaskState.PENDING) {
        this.endHere(task, TaskState.REJECTED, task.rejectAtSubmit).catch((err) => this.log.error("rejecting a task failed", { task: task.id, err }));
      }
    }
  }

  /** A job's last task ended and the job is stored finished. */
  private jobFinished(job: JobRecord): void {
    this.rollout.forget(job.id);
    this.observe?.jobFinished(((job.finishedAt ?? this.clock.now()) - job.createdAt) / 1000);
  }

  /** Seconds since the task's job was submitted. */
  private sinceSubmit(task: TaskRecord): number | undefined {
    const job = this.jobOf(task.jobId);
    return job && Math.max(0, this.clock.now() - job.createdAt) / 1000;
  }

  /** A task's terminal state is stored: it leaves the open index and frees its rate slot. */
  private taskEnded(task: TaskRecord): void {
    if (this.observe) {
      const s = this.sinceSubmit(task);
      if (s !== undefined) this.observe.taskEnded(task.state, s);
    }
    this.router.untrack(task);
    this.rollout.ended(task);
    // Other proxies holding an undelivered copy can drop it now.
    if (!task.endedHere && (task.proxies?.length ?? 0) > 1) this.router.cancel(task);
  }

  // ---- proxies and hosts -------------------------------------------------

  proxyConnected(port: ProxyPort): void {
    this.router.proxyConnected(port);
  }

  proxyDisconnected(port: ProxyPort): void {
    this.router.proxyDisconnected(port);
  }

  proxyReady(port: ProxyPort): void {
    this.router.proxyReady(port);
  }

  /** The link of a connected proxy, by name (sessions are ordered on it). */
  proxyPort(name: string): ProxyPort | undefined {
    return this.router.port(name);
  }

  /** A host's stream opened at a proxy: its pending tasks can go now. */
  hostConnected(host: HostRecord): void {
    this.router.hostConnected(host);
  }

  // ---- submit -------------------------------------------------------------

  /**
   * Plans and stores a job. `authorize` is called with the resolved hosts,
   * inside the caller's tenant and after every check of the request, and
   * refuses by throwing; nothing is stored unless it returns. An idempotency
   * key names at most one request: the same request again returns its job
   * (authorized again), another one is refused with ALREADY_EXISTS.
   */
  async submit(caller: PeerIdentity, req: SubmitRequest, authorize?: SubmitAuthorizer): Promise<JobRecord> {
    const tenant = caller.scope;
    // Checked, resolved and authorized first, a replay of an idempotent submit too.
    const plan = this.planner.plan(caller, req, authorize);
    const digest = requestDigest(req);
    if (!req.idempotencyKey) return this.create(caller, req, plan, digest);
    // A key names one job: a retry that arrives while the first submit is still being stored waits for it.
    const key = `${tenant}\0${req.idempotencyKey}`;
    for (let pending = this.submittingKeys.get(key); pending; pending = this.submittingKeys.get(key)) await pending.catch(() => undefined);
    const existing = this.store.jobByIdempotencyKey(tenant, req.idempotencyKey);
    if (existing) {
      if (existing.requestDigest !== undefined && existing.requestDigest !== digest) {
        const err = new AlreadyExistsError(`idempotency key ${JSON.stringify(req.idempotencyKey)} was already used for job ${existing.id}, with a different request`);
        err.jobId = existing.id;
        throw err;
      }
      return existing;
    }
    const created = this.create(caller, req, plan, digest);
    this.submittingKeys.set(key, created);
    try {
      return await created;
    } finally {
      if (this.submittingKeys.get(key) === created) this.submittingKeys.delete(key);
    }
  }

  /**
   * Stores a planned job and sends its tasks (see submit), counted among the
   * submits a drain waits for. A drain refuses it here, after the replay of
   * a known idempotency key was answered from the store.
   */
  private create(caller: PeerIdentity, req: SubmitRequest, plan: Plan, digest: string): Promise<JobRecord> {
    if (this.draining) return Promise.reject(new UnavailableError("the controller is stopping and takes no new jobs; submit again (with the same idempotency key) once it is back"));
    const created = this.storeAndSend(caller, req, plan, digest);
    this.creating.add(created);
    void created.finally(() => this.creating.delete(created)).catch(() => undefined);
    return created;
  }

  private async storeAndSend(caller: PeerIdentity, req: SubmitRequest, plan: Plan, digest: string): Promise<JobRecord> {
    const tenant = caller.scope;
    const now = this.clock.now();
    const job: JobRecord = {
      id: this.ids("j"),
      tenant,
      submittedBy: caller.id,
      createdAt: now,
      steps: plan.document ? [] : req.steps,
      env: req.env,
      workingDir: req.workingDir,
      stdin: req.stdin,
      timeoutMs: req.timeoutMs,
      deliverBy: now + (req.deliveryDeadlineMs || this.defaultDeliveryDeadlineMs),
      lostAfterMs: req.lostAfterMs || this.defaultLostAfterMs,
      idempotent: req.idempotent,
      idempotencyKey: req.idempotencyKey,
      requestDigest: digest,
      cancelRequested: false,
      taskIds: [],
      outputLimitBytes: req.outputLimitBytes ?? 0,
      ...(req.schedule ? { schedule: req.schedule } : {}),
    };
    if (plan.document) {
      job.document = plan.document;
      job.parameters = plan.parameters;
    }
    const gated = req.rate !== undefined && hasLimits(req.rate);
    // Each task's id names the job and its place: the store keeps the job's tasks as one column (controller/task-ids.ts).
    const tasks: TaskRecord[] = plan.hosts.map((h, i) => ({
      id: taskIdOf(job.id, i),
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
      released: !gated,
    }));
    job.taskIds = tasks.map((t) => t.id);
    // Tasks of revoked hosts and of hosts that fit no alternative end REJECTED as soon as they are tracked; they never hold a canary place.
    const steps = new Map<string, TaskSteps>();
    for (const t of tasks) {
      const rejected = plan.rejected.get(t.hostId);
      if (rejected !== undefined) {
        t.rejectAtSubmit = rejected;
        t.released = false;
        continue;
      }
      const s = plan.perHost?.get(t.hostId);
      if (s) steps.set(t.id, s);
    }
    if (gated) job.rate = resolveRate(req.rate!, tasks.filter((t) => t.rejectAtSubmit === undefined).map((t) => t.id));
    this.store.checkRoomForWork?.("a new job");
    // Tracked before the first write, so that the rate gate and the router see the tasks; each task
    // leaves with its first holder in that same write (router.preRoute), and is sent once it is durable.
    this.table.track(job, tasks);
    this.submitting.add(job.id);
    try {
      if (job.rate) {
        this.rollout.add(job.id, job.rate, tasks);
        this.rollout.release(job.id);
      } else {
        for (const t of tasks) this.router.preRoute(t, job);
      }
    } finally {
      this.submitting.delete(job.id);
    }
    try {
      await this.store.putJob(job, tasks, steps);
    } catch (err) {
      this.table.untrack(job);
      this.rollout.forget(job.id);
      throw storageError(err);
    }
    const rejected = plan.rejected.size;
    this.log.info("job submitted", { job: job.id, tenant, by: caller.id, hosts: tasks.length, ...(plan.document ? { document: plan.document } : {}), ...(rejected ? { rejected } : {}) });
    for (const task of tasks) {
      this.router.track(task);
      if (task.rejectAtSubmit !== undefined) this.endHere(task, TaskState.REJECTED, task.rejectAtSubmit).catch((err) => this.log.error("rejecting a task failed", { task: task.id, err }));
      // Its host may have connected while the job was being stored: routed now, not at its next connect.
      else if (!task.proxies?.length) this.router.route(task, job);
    }
    this.sendInSlices(tasks, job);
    return job;
  }

  /**
   * Sends a big job's tasks a slice at a time, yielding to the event loop
   * between slices: each slice leaves for the proxies as its own frame, so
   * they start storing and delivering while later slices are still being
   * prepared, and heartbeats and other calls are answered meanwhile. A task
   * whose state changed in between (cancelled, say) is skipped.
   */
  private sendInSlices(tasks: readonly TaskRecord[], job: JobRecord, from = 0): void {
    const end = Math.min(tasks.length, from + DISPATCH_SLICE);
    for (let i = from; i < end; i++) this.router.sendRouted(tasks[i]!, job);
    if (end < tasks.length) setImmediate(() => this.sendInSlices(tasks, job, end));
  }

  /**
   * Resolves, renders and authorizes a request exactly as submit would, and
   * returns what each host would run — storing and sending nothing.
   */
  dryRun(caller: PeerIdentity, req: SubmitRequest, authorize?: SubmitAuthorizer): PlannedHost[] {
    return this.planner.dryRun(caller, req, authorize);
  }

  /** The hosts a request targets, inside the caller's tenant (see Planner.resolveHosts). */
  resolveHosts(tenant: string, req: Pick<SubmitRequest, "hostIds" | "allHosts" | "target">): HostRecord[] {
    return this.planner.resolveHosts(tenant, req);
  }

  /** A document run's steps for one task as listings show them (sensitive values redacted). */
  shownSteps(task: TaskRecord): Step[] | undefined {
    return this.store.taskSteps(task.id)?.shown;
  }

  /** The spec of the job last asked for, with neither task nor host: its tasks are sent one after the other. */
  private lastJobSpec: { job: JobRecord; spec: TaskSpec } | undefined;

  taskSpec(job: JobRecord, task: TaskRecord): TaskSpec {
    if (this.lastJobSpec?.job !== job) this.lastJobSpec = { job, spec: this.jobSpec(job) };
    // A copy per task that shares the job's parts (steps, env): the signer encodes those once per job.
    const spec: TaskSpec = { ...this.lastJobSpec.spec, taskId: task.id, hostId: task.hostId };
    if (job.document) spec.steps = this.store.taskSteps(task.id)?.run ?? [];
    return spec;
  }

  private jobSpec(job: JobRecord): TaskSpec {
    return create(TaskSpecSchema, {
      jobId: job.id,
      tenant: job.tenant,
      steps: job.document ? [] : job.steps,
      env: job.env,
      workingDir: job.workingDir,
      stdin: job.stdin,
      timeout: job.timeoutMs > 0 ? durationFromMs(job.timeoutMs) : undefined,
      deliverBy: timestampFromMs(job.deliverBy),
      idempotent: job.idempotent,
      outputLimitBytes: BigInt(job.outputLimitBytes ?? 0),
      createdAt: timestampFromMs(job.createdAt),
    });
  }

  // ---- updates from proxies ----------------------------------------------

  /**
   * A report a proxy sends on a task of a host it has not yet been seen to
   * hold (its presence proof is still on its way, or it reached the host
   * while cut off from the controller): it is held back — neither taken nor
   * acknowledged — so that the proxy sends it again once it is. Reports on
   * unknown tasks and from outside the host's region are not held back
   * (they are dropped by applyStatus/applyOutput).
   */
  holdsBack(proxy: { name: string; region: string }, taskId: string, hostId: string, status?: TaskStatus): boolean {
    const task = this.table.get(taskId);
    if (!task || (hostId !== "" && hostId !== task.hostId)) return false;
    if (this.router.mayReport(proxy, task) || (status !== undefined && this.signedEnd(proxy, task, status))) return false;
    return this.inventory.get(task.hostId)?.region === proxy.region;
  }

  /**
   * A task's end signed by its host, relayed by any proxy of the host's
   * region: taken even from a proxy not seen to hold the host (the host
   * failed over to it while it was cut off, and has since left it), since
   * the signature, not the proxy, vouches for it.
   */
  private signedEnd(proxy: { name: string; region: string }, task: TaskRecord, status: TaskStatus): boolean {
    if (!this.checkEnd || !isTerminal(status.state) || status.atProxy || !vouchedFor(status)) return false;
    if ((status.hostId !== "" && status.hostId !== task.hostId) || this.inventory.get(task.hostId)?.region !== proxy.region) return false;
    return this.checkEndOnce(status, task) === "ok";
  }

  /**
   * Applies a status reported through a proxy. Resolves once it is stored;
   * the caller acknowledges then. A status that does not move the task
   * forward (a replay, a stale report) is acknowledged without effect; one
   * from a proxy that may not report on the task is dropped. A proxy that
   * ended its own copy (at_proxy) ends the task only if no other proxy may
   * still hand it over. After the controller ended a task itself, the
   * host's own end is kept as its late report.
   */
  applyStatus(proxy: { name: string; region: string }, status: TaskStatus): Promise<void> {
    const seen = this.table.get(status.taskId);
    if (!seen) {
      this.log.warn("status for an unknown task dropped", { task: status.taskId, proxy: proxy.name });
      return this.table.afterLastWrite(status.taskId);
    }
    if ((!this.router.mayReport(proxy, seen) && !this.signedEnd(proxy, seen, status)) || (status.hostId !== "" && status.hostId !== seen.hostId)) {
      this.log.warn("status from a proxy that does not hold the task dropped", { task: status.taskId, proxy: proxy.name, host: status.hostId });
      return this.table.afterLastWrite(status.taskId);
    }
    const task = this.table.mutable(status.taskId)!;
    let changed = this.router.reported(proxy, task, status);
    if (isTerminal(task.state)) {
      if (task.endedHere && task.late === undefined && !status.atProxy && isTerminal(status.state)) {
        task.late = { state: status.state, exitCode: status.exitCode, signal: status.signal, message: status.message, time: status.time ? timestampMs(status.time) : this.clock.now() };
        changed = true;
      }
      return changed ? this.table.write(task) : this.table.afterLastWrite(task.id);
    }
    const ownCopyEnded = status.atProxy && isTerminal(status.state);
    if (ownCopyEnded && ((task.proxies?.length ?? 0) > 0 || task.state >= TaskState.DELIVERED)) {
      return changed ? this.table.write(task) : this.table.afterLastWrite(task.id);
    }
    if (!advances(task.state, status.state) || status.state === TaskState.LOST) {
      return changed ? this.table.write(task) : this.table.afterLastWrite(task.id);
    }
    task.state = status.state;
    task.proxy = proxy.name;
    task.region = proxy.region;
    task.updatedAt = this.clock.now();
    task.message = status.message;
    task.signal = status.signal;
    if (status.exitCode !== undefined) task.exitCode = status.exitCode;
    const ends = isTerminal(status.state);
    if (ends) {
      task.outputTruncated = status.outputTruncated;
      if (status.outputSha256.length > 0) {
        task.expectedChunks = Number(status.outputChunks);
        task.outputSha256 = status.outputSha256;
        task.outputBytes = Number(status.outputBytes);
      } else {
        // The host cannot know its output (it ended after a crash): what it counted, or the highest chunk
        // stored, whichever is more — so a gap below a chunk that came through another proxy stays a gap.
        task.expectedChunks = Math.max(Number(status.outputChunks), lastHeld(task));
      }
      task.resultCheck = this.resultCheckOf(task, status);
      // Only a pending check takes the running digest; any other end would keep it until it is pushed out.
      if (task.resultCheck !== ResultCheck.OUTPUT_PENDING) this.digests.forget(task.id);
      if (task.outputSha256 !== undefined && lastHeld(task) > task.expectedChunks) {
        // Chunks the host did not sign for were relayed (and may have been read): the output is not the host's.
        this.log.warn("output beyond what the host signed for was relayed", { task: task.id, host: task.hostId, signed: task.expectedChunks, held: lastHeld(task), proxy: proxy.name });
        if (task.resultCheck !== ResultCheck.UNSPECIFIED) task.resultCheck = ResultCheck.MISMATCH;
      }
    }
    // The check is not awaited: the status is acknowledged once stored (a job waits for its checks, see checksOf).
    return this.table.write(task, { ends }).then(() => this.startCheck(task));
  }

  /**
   * The host's signature over a reported end, checked once per status
   * message: deciding whether to take it (held back or not) and judging it
   * ask the same question of the same bytes.
   */
  private checkEndOnce(status: TaskStatus, task: TaskRecord): "ok" | "unknown" | "bad" {
    let check = this.endChecks.get(status);
    if (check === undefined) this.endChecks.set(status, (check = this.checkEnd!(status, { role: "host", scope: task.tenant, id: task.hostId })));
    return check;
  }

  /** Whether a job's steps are all pings: asked once per job's steps (a fleet-wide job asks at every host's end). */
  private pingOnly(job: JobRecord): boolean {
    let ping = this.pingSteps.get(job.steps);
    if (ping === undefined) this.pingSteps.set(job.steps, (ping = job.steps.length > 0 && isPingOnly(create(TaskSpecSchema, { steps: job.steps }))));
    return ping;
  }

  /** The first check of a host's end: its signature; the output follows once all of it is stored. */
  private resultCheckOf(task: TaskRecord, status: TaskStatus): ResultCheck {
    if (!this.checkEnd) return ResultCheck.UNSPECIFIED;
    const job = this.jobOf(task.jobId);
    // A ping runs nothing and is answered unsigned.
    if (job && this.pingOnly(job)) return ResultCheck.UNSPECIFIED;
    const check = this.checkEndOnce(status, task);
    if (check === "bad") return ResultCheck.MISMATCH;
    if (check === "unknown") return ResultCheck.UNVERIFIED;
    return status.outputSha256.length > 0 ? ResultCheck.OUTPUT_PENDING : ResultCheck.STATE_ONLY;
  }

  /**
   * Once every chunk a host signed for is stored, hashes the stored output
   * (a slice at a time) and compares it with what the host signed.
   */
  private checkOutput(task: TaskRecord): Promise<void> {
    if (task.resultCheck !== ResultCheck.OUTPUT_PENDING || !outputComplete(task)) return Promise.resolve();
    const running = this.checking.get(task.id);
    if (running) return running;
    const id = task.id;
    const expected = task.expectedChunks ?? 0;
    const check = this.table
      .afterLastWrite(id)
      .then(() => this.digests.take(id, expected) ?? digestOutput(this.store, id, expected))
      .then((got) => {
        const rec = this.table.mutable(id);
        if (!rec || rec.resultCheck !== ResultCheck.OUTPUT_PENDING) return;
        const same = rec.outputSha256 !== undefined && Buffer.from(got.sha256).equals(Buffer.from(rec.outputSha256)) && got.bytes === rec.outputBytes;
        rec.resultCheck = same ? ResultCheck.VERIFIED : ResultCheck.MISMATCH;
        if (!same) this.log.warn("stored output differs from what the host signed", { task: id, host: rec.hostId, bytes: got.bytes, signedBytes: rec.outputBytes });
        return this.table.write(rec);
      })
      .catch((err) => this.log.error("checking a task's output failed", { task: id, err }))
      .finally(() => this.checking.delete(id));
    this.checking.set(id, check);
    return check;
  }

  /** Starts a task's output check, if it owes one, without waiting for it (it logs its own failure). */
  private startCheck(task: TaskRecord): void {
    this.checkOutput(task).catch(() => undefined);
  }

  /**
   * The output checks a job's tasks still owe, started if they are not yet
   * (their output is all stored): a job is stored finished only after them,
   * so a controller killed between a task's end and its check finds the job
   * unfinished and checks at start (recover) rather than leaving the task
   * OUTPUT_PENDING for good.
   */
  private checksOf(job: JobRecord): Promise<void> | undefined {
    const checks: Promise<void>[] = [];
    for (const id of job.taskIds) {
      const task = this.table.get(id);
      if (task?.resultCheck === ResultCheck.OUTPUT_PENDING && outputComplete(task)) checks.push(this.checkOutput(task));
    }
    // Nothing owed: the job finishes in the same turn, as it always did.
    return checks.length > 0 ? Promise.all(checks).then(() => undefined) : undefined;
  }

  /**
   * Stores an output chunk the first time it arrives, whichever proxy brings
   * it and in whatever order (after a failover, newer chunks can come
   * through the new proxy before older ones held by the old). Resolves, once
   * stored, to the seq to acknowledge to that proxy: this chunk's. Chunks
   * were screened where they entered (common/link-limits.ts: the link or the
   * bundle), so their ids and seqs are within bounds.
   */
  applyOutput(proxy: { name: string; region: string }, chunk: OutputChunk): Promise<number> {
    const seq = Number(chunk.seq);
    const seen = this.table.get(chunk.taskId);
    if (!seen) return Promise.resolve(seq);
    if (!this.router.mayReport(proxy, seen) || (chunk.hostId !== "" && chunk.hostId !== seen.hostId)) {
      this.log.warn("output from a proxy that does not hold the task dropped", { task: chunk.taskId, proxy: proxy.name, host: chunk.hostId });
      return Promise.resolve(seq);
    }
    if (hasChunk(seen, seq)) return this.table.afterLastWrite(seen.id).then(() => seq);
    if (seen.outputSha256 !== undefined && seen.expectedChunks !== undefined && seq > seen.expectedChunks) {
      // The host signed for fewer chunks: this one is not its output (acknowledged, so the proxy drops it).
      this.log.warn("output beyond what the host signed for dropped", { task: chunk.taskId, proxy: proxy.name, seq, signed: seen.expectedChunks });
      return Promise.resolve(seq);
    }
    const task = this.table.mutable(chunk.taskId)!;
    const first = lastHeld(task) === 0;
    addChunk(task, seq);
    this.router.reported(proxy, task);
    return this.table.write(task, { chunk }).then(() => {
      this.digests.stored(task.id, seq, chunk.data);
      if (first && this.observe) {
        const s = this.sinceSubmit(task);
        if (s !== undefined) this.observe.firstOutput(s);
      }
      this.startCheck(task);
      return seq;
    });
  }

  /**
   * Ends a task at the controller itself (never handed over, cancelled,
   * expired, lost). With `recall`, the proxies that may hold it are owed a
   * cancel (kept until they confirm), so that a host that returns is told.
   * Resolves once stored.
   */
  private endHere(task: TaskRecord, state: TaskState, message: string, recall?: { withdraw: boolean }): Promise<void> {
    if (!advances(task.state, state)) return Promise.resolve();
    task.state = state;
    task.message = message;
    task.updatedAt = this.clock.now();
    task.endedHere = true;
    this.digests.forget(task.id);
    const writes = [this.table.write(task, { ends: true })];
    if (recall) writes.push(this.router.recall(task, recall.withdraw));
    return Promise.all(writes).then(() => undefined);
  }

  // ---- cancel ---------------------------------------------------------------

  /**
   * Cancels a job. Tasks that never left the controller, and tasks whose
   * host is unreachable, end CANCELLED at once (the proxies that may hold
   * them are owed the cancel and tell the host when it returns); the others
   * are cancelled by their host, and end here anyway if it does not confirm
   * within the cancel grace.
   */
  async cancel(caller: PeerIdentity, jobId: string): Promise<JobRecord> {
    const stored = this.getJobFor(caller, jobId);
    if (stored.finishedAt !== undefined) return stored;
    const job = this.table.job(stored.id) ?? stored;
    if (!job.cancelRequested) {
      job.cancelRequested = true;
      job.cancelRequestedAt = this.clock.now();
      await this.store.putJob(job).catch((err) => Promise.reject(storageError(err)));
    }
    this.log.info("job cancel requested", { job: job.id, by: caller.id });
    const writes: Promise<void>[] = [];
    for (const id of job.taskIds) {
      const task = this.table.liveRecord(id);
      if (!task || isTerminal(task.state)) continue;
      const host = this.inventory.get(task.hostId);
      let w: Promise<void> | undefined;
      if (!task.proxies?.length || this.router.takeBack(task)) w = this.endHere(task, TaskState.CANCELLED, "cancelled before delivery");
      else if (!this.router.reachable(host)) w = this.endHere(task, TaskState.CANCELLED, `cancelled at the controller: host ${task.hostId} is unreachable${host && !host.connected ? ` since ${new Date(host.since).toISOString()}` : ""}; it is told when it returns`, { withdraw: false });
      else this.router.cancel(task);
      if (w) writes.push(w);
    }
    await Promise.all(writes);
    return this.store.getJob(job.id) ?? job;
  }

  /**
   * Cancels a job's tasks on some of its hosts; the job goes on on the
   * others. Each task still open ends CANCELLED here at once — before
   * delivery simply so; once a proxy may hold it, with a durable recall to
   * every holder (the host is told to stop it, now or when it returns, and
   * what it reports afterwards is kept beside the task), as a whole job's
   * cancel does for a host that cannot be reached.
   */
  async cancelTasks(caller: PeerIdentity, jobId: string, hostIds: ReadonlySet<string>): Promise<JobRecord> {
    const stored = this.getJobFor(caller, jobId);
    if (stored.finishedAt !== undefined) return stored;
    const job = this.table.job(stored.id) ?? stored;
    const writes: Promise<void>[] = [];
    for (const id of job.taskIds) {
      const task = this.table.liveRecord(id);
      if (!task || isTerminal(task.state) || !hostIds.has(task.hostId)) continue;
      this.log.info("task cancel requested", { job: job.id, task: task.id, host: task.hostId, by: caller.id });
      if (!task.proxies?.length || this.router.takeBack(task)) writes.push(this.endHere(task, TaskState.CANCELLED, `cancelled by ${caller.id} before delivery`));
      else writes.push(this.endHere(task, TaskState.CANCELLED, `cancelled by ${caller.id} at the controller; host ${task.hostId} is told to stop it`, { withdraw: false }));
    }
    await Promise.all(writes);
    return this.store.getJob(job.id) ?? job;
  }

  // ---- reading and watching ----------------------------------------------

  /** A job of the caller's tenant; other tenants' jobs look like missing ones. */
  getJobFor(caller: PeerIdentity, jobId: string): JobRecord {
    const job = jobId ? this.store.getJob(jobId) : undefined;
    if (!job || job.tenant !== caller.scope) throw new NotFoundError(`job ${JSON.stringify(jobId)} not found`);
    return job;
  }

  tasksOf(job: JobRecord): TaskRecord[] {
    return job.taskIds.map((id) => this.table.get(id)).filter((t): t is TaskRecord => t !== undefined);
  }

  /**
   * One page of a host's tasks, newest first (`unfinished`: only those not
   * ended), and the token of the next page (empty on the last). A page of
   * unfinished tasks looks through at most 20 pages' worth of ids: a host
   * with a long history answers in bounded time, with a token to go on.
   */
  hostTasks(caller: PeerIdentity, hostId: string, pageSize: number, pageToken: string, unfinished: boolean): { tasks: { task: TaskRecord; job: JobRecord | undefined }[]; next: string } {
    const size = Math.min(Math.max(pageSize || 50, 1), LIMITS.hostTasksPage);
    const out: { task: TaskRecord; job: JobRecord | undefined }[] = [];
    let before = pageToken || undefined;
    let looked = 0;
    while (out.length < size && looked < 20 * size) {
      const ids = this.store.taskIdsOfHost(caller.scope, hostId, size, before);
      for (const id of ids) {
        before = id;
        looked++;
        // A task of a finished job has ended: passed over without reading it (a finished job's task stored in
        // its column costs its page's decoding, ~0.4 ms, and a host's history is one task per job).
        if (unfinished && this.jobEnded(id)) continue;
        const task = this.table.get(id) ?? this.store.getTask(id);
        if (!task || (unfinished && isTerminal(task.state))) continue;
        out.push({ task, job: this.store.getJob(task.jobId) });
        if (out.length >= size) break;
      }
      if (ids.length < size) return { tasks: out, next: "" };
    }
    const more = before !== undefined && this.store.taskIdsOfHost(caller.scope, hostId, 1, before).length > 0;
    return { tasks: out, next: more ? before! : "" };
  }

  /**
   * Whether a task's id names a job that is not live here, without reading
   * the task or the job: every unfinished job is in the table from before
   * its store write (submit) or from the start (recovery) until it is
   * stored finished, so one that is not has ended (or never was).
   */
  private jobEnded(taskId: string): boolean {
    const place = placeOfTaskId(taskId);
    return place !== undefined && this.table.job(place.jobId) === undefined;
  }

  /** The newest jobs of the caller's tenant. */
  listJobs(caller: PeerIdentity, limit: number): JobRecord[] {
    return this.store.listJobs(caller.scope, Math.min(Math.max(limit || 50, 1), 1000));
  }

  getJobRecord(id: string): JobRecord | undefined {
    return this.store.getJob(id);
  }

  /** Whether a job is recorded finished; without reading its record while it is still running (kept in memory). */
  isFinished(id: string): boolean {
    return this.table.job(id) === undefined && this.store.getJob(id)?.finishedAt !== undefined;
  }

  /** The first output seq at or above `from` that the task does not hold yet (no copy of its record). */
  firstMissingChunk(taskId: string, from: number): number | undefined {
    const t = this.table.get(taskId);
    return t && firstMissing(t, from);
  }

  getTaskRecord(id: string): TaskRecord | undefined {
    const t = this.peekTaskRecord(id);
    return t && { ...t };
  }

  /** A task's record without a copy: a live task's is the record that changes, to be read now and not kept. */
  peekTaskRecord(id: string): Readonly<TaskRecord> | undefined {
    // An id no task can have is not looked up (the store refuses keys that long with an error).
    if (id.length > LIMITS.taskIdChars) return undefined;
    return this.table.get(id);
  }

  /** Output chunks of a task that are committed, contiguous from 1, so a reader finds them in the store. */
  outputCommitted(task: TaskRecord): number {
    return this.table.committedChunks(task);
  }

  readOutput(taskId: string, fromSeq: number, maxBytes: number): OutputChunk[] {
    return this.store.readOutput(taskId, fromSeq, maxBytes);
  }

  /** Calls fn with the task that changed (none: the job itself) whenever something of the job changes; returns the unsubscribe function. */
  subscribe(jobId: string, fn: (taskId?: string) => void): () => void {
    return this.table.subscribe(jobId, fn);
  }

  // ---- bundles (sites with no link) -------------------------------------------

  /**
   * Everything a region with no link should receive: its released tasks not
   * yet confirmed by any proxy, cancels (of cancelled jobs, and those owed
   * for tasks the controller ended itself), and acks of the results already
   * received (so the site can drop them). Exported tasks are stored as held
   * by the region's bundle first, so a later cancel reaches them too.
   */
  async exportForRegion(tenant: string, region: string): Promise<{ tasks: TaskSpec[]; cancels: { taskId: string; hostId: string; withdraw: boolean }[]; statusAcks: { taskId: string; state: TaskState; atProxy: boolean }[]; outputAcks: { taskId: string; seq: number }[] }> {
    const via = bundleHolder(region);
    const out = { tasks: [] as TaskSpec[], cancels: [] as { taskId: string; hostId: string; withdraw: boolean }[], statusAcks: [] as { taskId: string; state: TaskState; atProxy: boolean }[], outputAcks: [] as { taskId: string; seq: number }[] };
    const writes: Promise<void>[] = [];
    for (const task of this.table.liveTasks()) {
      if (task.tenant !== tenant || isTerminal(task.state) || this.inventory.get(task.hostId)?.region !== region) continue;
      const job = this.jobOf(task.jobId);
      if (!job) continue;
      if (task.state < TaskState.DELIVERED && task.released !== false && task.rejectAtSubmit === undefined && !job.cancelRequested && this.clock.now() < job.deliverBy) {
        out.tasks.push(this.taskSpec(job, task));
        if (!task.proxies?.includes(via)) {
          task.proxies = [...(task.proxies ?? []), via];
          writes.push(this.table.write(task));
        }
      } else if (job.cancelRequested && task.proxies?.length) {
        out.cancels.push({ taskId: task.id, hostId: task.hostId, withdraw: false });
      }
    }
    for (const r of this.store.recallsFor(via)) out.cancels.push({ taskId: r.taskId, hostId: r.hostId, withdraw: r.withdraw });
    await Promise.all(writes);
    const acks = this.bundleAcks.get(region);
    if (acks) {
      for (const [taskId, a] of acks) {
        if (a.state !== TaskState.PENDING) out.statusAcks.push({ taskId, state: a.state, atProxy: false });
        if (a.own !== TaskState.PENDING) out.statusAcks.push({ taskId, state: a.own, atProxy: true });
        if (a.seq > 0) out.outputAcks.push({ taskId, seq: a.seq });
      }
      this.bundleAcks.delete(region);
    }
    return out;
  }

  /** Applies results carried from a site; remembers what to acknowledge in the next tasks bundle. */
  async importResults(proxy: { name: string; region: string }, statuses: readonly TaskStatus[], output: readonly OutputChunk[]): Promise<{ statuses: number; chunks: number }> {
    let chunks = 0;
    let applied = 0;
    let acks = this.bundleAcks.get(proxy.region);
    if (!acks) this.bundleAcks.set(proxy.region, (acks = new Map()));
    for (const c of output) {
      const before = this.table.get(c.taskId);
      const had = before ? hasChunk(before, Number(c.seq)) : true;
      const seq = await this.applyOutput(proxy, c);
      if (!had && this.table.get(c.taskId) && hasChunk(this.table.get(c.taskId)!, seq)) chunks++;
      const a = acks.get(c.taskId) ?? { state: TaskState.PENDING, own: TaskState.PENDING, seq: 0 };
      a.seq = Math.max(a.seq, seq);
      acks.set(c.taskId, a);
    }
    for (const st of statuses) {
      const before = this.table.get(st.taskId)?.state;
      await this.applyStatus(proxy, st);
      if (before !== undefined && this.table.get(st.taskId)?.state !== before) applied++;
      const a = acks.get(st.taskId) ?? { state: TaskState.PENDING, own: TaskState.PENDING, seq: 0 };
      if (st.atProxy) a.own = Math.max(a.own, st.state);
      else a.state = Math.max(a.state, st.state);
      acks.set(st.taskId, a);
    }
    return { statuses: applied, chunks };
  }

}

/** SHA-256 and length of a task's stored output, chunks 1..`chunks` in seq order, read a slice per turn of the event loop. */
async function digestOutput(store: JobStore, taskId: string, chunks: number): Promise<{ sha256: Uint8Array; bytes: number }> {
  const hash = createHash("sha256");
  let bytes = 0;
  for (let next = 1; next <= chunks; ) {
    const slice = store.readOutput(taskId, next, 4 << 20).filter((c) => Number(c.seq) <= chunks);
    if (slice.length === 0) break;
    for (const c of slice) {
      hash.update(c.data);
      bytes += c.data.length;
    }
    next = Number(slice[slice.length - 1]!.seq) + 1;
    await new Promise((resolve) => setImmediate(resolve));
  }
  return { sha256: hash.digest(), bytes };
}

/** A terminal task whose every reported chunk is stored. */
export function outputComplete(task: TaskRecord): boolean {
  return isTerminal(task.state) && task.expectedChunks !== undefined && task.outputChunks >= task.expectedChunks;
}
