import { create, toBinary } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { Clock, Timer } from "../common/clock.js";
import { FailedPreconditionError, InvalidArgumentError, NotFoundError } from "../common/errors.js";
import type { IdGenerator } from "../common/ids.js";
import type { Logger } from "../common/logger.js";
import { advances, isTerminal } from "../common/task-state.js";
import type { PeerIdentity } from "../certs/identity.js";
import {
  StepSchema,
  TaskSpecSchema,
  TaskState,
  type OutputChunk,
  type Step,
  type TaskSpec,
  type TaskStatus,
} from "../gen/rexmesh/v1/task_pb.js";
import type { Inventory } from "./inventory.js";
import type { JobStore } from "./job-store.js";
import { storageError } from "../common/lmdb.js";
import type { HostRecord, JobRate, JobRecord, TaskRecord, TaskSteps } from "./model.js";
import type { DocumentStore } from "./document-store.js";
import { planHost } from "./documents.js";
import { redactParams, resolveParams, type ParamValue } from "./params.js";
import { validateSteps } from "./validate.js";
import { parseQuery, QuerySyntaxError, selectHosts, type Query } from "./query.js";

/**
 * Decides whether a request may run on the hosts it resolved to; refuses by
 * throwing. `steps` are what would run: the request's steps, or for a
 * document run every distinct step rendered for any of the hosts (with real
 * parameter values).
 */
export type SubmitAuthorizer = (hosts: readonly HostRecord[], req: SubmitRequest, steps: readonly Step[]) => void;

/** What one host would get, as a dry run shows it (sensitive parameters redacted). */
export interface PlannedHost {
  host: HostRecord;
  steps: Step[];
  /** Set when the host fits no alternative of some step: its task ends REJECTED. */
  rejected?: string;
}

/** A request checked, resolved, rendered and authorized: everything submit needs, nothing stored yet. */
interface Prepared {
  hosts: HostRecord[];
  /** Document runs: per host id, its steps or why it is rejected. */
  perHost?: Map<string, { steps?: TaskSteps; rejected?: string }>;
  document?: string;
  parameters?: Record<string, string>;
}

/** What the job manager needs of a connected proxy. */
export interface ProxyPort {
  readonly name: string;
  readonly region: string;
  sendTask(spec: TaskSpec): void;
  sendCancel(taskId: string, hostId: string): void;
}

export interface SubmitRequest {
  /** Where to run: exactly one of hostIds, allHosts and target. */
  hostIds: string[];
  allHosts: boolean;
  /** A host query (controller/query.ts); present but empty is an error. */
  target?: string;
  steps: Step[];
  env: Record<string, string>;
  workingDir: string;
  stdin: Uint8Array;
  timeoutMs: number;
  /** Zero means the controller default. */
  deliveryDeadlineMs: number;
  idempotencyKey: string;
  idempotent: boolean;
  outputLimitBytes?: number;
  rate?: RateRequest;
  /** A stored document to run instead of steps: "NAME" or "NAME@VERSION". */
  document?: string;
  /** The document's parameters as given (text; a list as a JSON array or one value). */
  parameters?: Record<string, string | string[]>;
}

/** Rate control as asked for: absolute numbers or percentages of the job's task count. */
export interface RateRequest {
  concurrency?: number;
  concurrencyPercent?: number;
  concurrencyPerRegion?: number;
  maxErrors?: number;
  maxErrorsPercent?: number;
  batch?: number;
}

/** Terminal states that spend a job's error budget. */
const ERROR_STATES = new Set([TaskState.FAILED, TaskState.TIMED_OUT, TaskState.INTERRUPTED, TaskState.REJECTED, TaskState.EXPIRED]);

/** In-memory fan-out state of a rate-controlled job. */
interface Gate {
  rate: JobRate;
  /** Unreleased task ids per region, in submission order. */
  queues: Map<string, string[]>;
  inFlight: number;
  inFlightByRegion: Map<string, number>;
  failures: number;
  canaryOpen: Set<string>;
  /** No more releases: the error budget is spent or the canary failed. */
  stopped: string | undefined;
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
  /** Stored documents, for document runs; without it a document run is refused. */
  documents?: DocumentStore;
}

/**
 * Plans jobs into tasks, routes each task to the proxy that holds its host,
 * and applies what comes back: statuses (only forward, first terminal state
 * wins), output (contiguous by seq, duplicates dropped). Every update is
 * stored before it is acknowledged and before watchers see it.
 */
/** Tasks a submit sends to proxies per turn of the event loop (see dispatchInSlices). */
const DISPATCH_SLICE = 1000;

export class JobManager {
  private readonly store: JobStore;
  private readonly inventory: Inventory;
  private readonly clock: Clock;
  private readonly ids: IdGenerator;
  private readonly log: Logger;
  private readonly defaultDeliveryDeadlineMs: number;
  private readonly maxStdinBytes: number;
  private readonly maxHostsPerJob: number;
  private readonly documents: DocumentStore | undefined;

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
  /**
   * The current record of every task of an unfinished job. Updates change it
   * synchronously and queue a store write; writes of one event-loop turn
   * commit together, in order, and peers are acknowledged once that commit
   * resolves. Nothing waits for a commit before taking the next update.
   */
  private readonly live = new Map<string, TaskRecord>();
  /** Tasks not yet terminal, per unfinished job. */
  private readonly open = new Map<string, number>();
  /** Output chunks committed per live task: what watchers may read. */
  private readonly committedChunks = new Map<string, number>();
  /** The last write queued for a task; a duplicate is acknowledged after it. */
  private readonly lastWrite = new Map<string, Promise<unknown>>();
  /** Fan-out state of unfinished rate-controlled jobs. */
  private readonly gates = new Map<string, Gate>();
  /** Per region: results received by bundle, to acknowledge in the next tasks bundle. */
  private readonly bundleAcks = new Map<string, Map<string, { state: TaskState; seq: number }>>();

  constructor(opts: JobManagerOptions) {
    this.store = opts.store;
    this.inventory = opts.inventory;
    this.clock = opts.clock;
    this.ids = opts.ids;
    this.log = opts.log;
    this.defaultDeliveryDeadlineMs = opts.defaultDeliveryDeadlineMs ?? 3_600_000;
    this.maxStdinBytes = opts.maxStdinBytes ?? 1 << 20;
    this.maxHostsPerJob = opts.maxHostsPerJob ?? 200_000;
    this.documents = opts.documents;
  }

  /** Rebuilds in-memory indexes from the store after a restart. */
  recover(): void {
    for (const job of this.store.unfinishedJobs()) this.track(job, this.store.tasksOf(job));
  }

  /** Keeps an unfinished job's tasks in memory. */
  private track(job: JobRecord, tasks: readonly TaskRecord[]): void {
    let open = 0;
    for (const task of tasks) {
      this.live.set(task.id, task);
      this.committedChunks.set(task.id, task.outputChunks);
      if (!isTerminal(task.state)) open++;
      if (task.state === TaskState.PENDING) this.addPending(task);
    }
    this.open.set(job.id, open);
    if (open === 0 && tasks.length > 0) {
      // Every task ended but the controller stopped before recording the job as finished.
      void this.finishJob(job.id).catch((err) => this.log.error("finishing a recovered job failed", { job: job.id, err }));
      return;
    }
    if (job.rate) this.gates.set(job.id, this.buildGate(job.rate, tasks));
    this.armDeadline(job);
    for (const task of tasks) {
      if (task.rejectAtSubmit !== undefined && task.state === TaskState.PENDING) {
        void this.finishHere(task, TaskState.REJECTED, task.rejectAtSubmit)?.catch(() => undefined);
      }
    }
  }

  private buildGate(rate: JobRate, tasks: readonly TaskRecord[]): Gate {
    const gate: Gate = { rate, queues: new Map(), inFlight: 0, inFlightByRegion: new Map(), failures: 0, canaryOpen: new Set(), stopped: undefined };
    const canary = new Set(rate.canary);
    for (const t of tasks) {
      if (ERROR_STATES.has(t.state)) gate.failures++;
      if (canary.has(t.id) && !isTerminal(t.state)) gate.canaryOpen.add(t.id);
      if (t.released) {
        if (!isTerminal(t.state)) this.countFlight(gate, t, 1);
      } else if (t.state === TaskState.PENDING) {
        let q = gate.queues.get(t.region);
        if (!q) gate.queues.set(t.region, (q = []));
        q.push(t.id);
      }
    }
    return gate;
  }

  private countFlight(gate: Gate, task: TaskRecord, delta: number): void {
    gate.inFlight += delta;
    gate.inFlightByRegion.set(task.region, (gate.inFlightByRegion.get(task.region) ?? 0) + delta);
  }

  /**
   * Releases as many waiting tasks of a rate-controlled job as its limits
   * allow, taking regions in turn so that one region cannot starve another.
   */
  private release(jobId: string, job?: JobRecord): void {
    const gate = this.gates.get(jobId);
    if (!gate || gate.stopped) return;
    const { rate } = gate;
    const limit = rate.concurrency || Infinity;
    const canaryPhase = gate.canaryOpen.size > 0;
    const regions = [...gate.queues.keys()];
    let progress = true;
    while (progress && gate.inFlight < limit) {
      progress = false;
      for (const region of regions) {
        if (gate.inFlight >= limit) break;
        if (rate.perRegion && (gate.inFlightByRegion.get(region) ?? 0) >= rate.perRegion) continue;
        const queue = gate.queues.get(region)!;
        let id: string | undefined;
        // During the canary phase only canary tasks leave their queues.
        const at = canaryPhase ? queue.findIndex((t) => gate.canaryOpen.has(t)) : 0;
        if (at < 0 || queue.length === 0) continue;
        [id] = queue.splice(at, 1);
        const task = id && this.live.get(id);
        if (!task || task.state !== TaskState.PENDING || task.released) continue;
        task.released = true;
        this.countFlight(gate, task, 1);
        void this.write(task).catch(() => undefined);
        this.dispatch(task, job);
        progress = true;
      }
    }
  }

  /** A task of a rate-controlled job ended: free its slot, count errors, and release or stop. */
  private gateTaskEnded(task: TaskRecord): void {
    const gate = this.gates.get(task.jobId);
    if (!gate) return;
    if (task.released) this.countFlight(gate, task, -1);
    if (ERROR_STATES.has(task.state)) gate.failures++;
    const wasCanary = gate.canaryOpen.delete(task.id);
    if (!gate.stopped) {
      if (gate.rate.maxErrors !== undefined && gate.failures > gate.rate.maxErrors) {
        gate.stopped = `skipped: the job's error budget (${gate.rate.maxErrors}) was spent`;
      } else if (wasCanary && task.state !== TaskState.SUCCEEDED) {
        gate.stopped = `skipped: canary task on ${task.hostId} ended ${TaskState[task.state]}`;
      }
      if (gate.stopped) {
        for (const queue of gate.queues.values()) {
          for (const id of queue.splice(0)) {
            const t = this.live.get(id);
            if (t && !t.released) void this.finishHere(t, TaskState.SKIPPED, gate.stopped);
          }
        }
        return;
      }
    }
    this.release(task.jobId);
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
      const task = this.live.get(taskId);
      if (task) this.dispatch(task);
    }
  }

  // ---- submit -------------------------------------------------------------

  /**
   * Plans and stores a job. `authorize` is called with the resolved hosts,
   * inside the caller's tenant and after every check of the request, and
   * refuses by throwing; nothing is stored unless it returns.
   */
  async submit(caller: PeerIdentity, req: SubmitRequest, authorize?: SubmitAuthorizer): Promise<JobRecord> {
    const tenant = caller.scope;
    if (req.idempotencyKey) {
      const existing = this.store.jobByIdempotencyKey(tenant, req.idempotencyKey);
      if (existing) return existing;
    }
    const { hosts, perHost, document, parameters } = this.prepare(caller, req, authorize);
    const now = this.clock.now();
    const job: JobRecord = {
      id: this.ids("j"),
      tenant,
      submittedBy: caller.id,
      createdAt: now,
      steps: document ? [] : req.steps,
      env: req.env,
      workingDir: req.workingDir,
      stdin: req.stdin,
      timeoutMs: req.timeoutMs,
      deliverBy: now + (req.deliveryDeadlineMs || this.defaultDeliveryDeadlineMs),
      idempotent: req.idempotent,
      idempotencyKey: req.idempotencyKey,
      cancelRequested: false,
      taskIds: [],
      outputLimitBytes: req.outputLimitBytes ?? 0,
    };
    if (document) {
      job.document = document;
      job.parameters = parameters;
    }
    const gated = req.rate !== undefined && hasLimits(req.rate);
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
      released: !gated,
    }));
    job.taskIds = tasks.map((t) => t.id);
    // Tasks of hosts that fit no alternative end REJECTED as soon as they are tracked; they never hold a canary place.
    const steps = new Map<string, TaskSteps>();
    if (perHost) {
      for (const t of tasks) {
        const p = perHost.get(t.hostId);
        if (p?.steps) steps.set(t.id, p.steps);
        else {
          t.rejectAtSubmit = p?.rejected ?? "no steps were rendered for this host";
          t.released = false;
        }
      }
    }
    const rejected = tasks.filter((t) => t.rejectAtSubmit !== undefined).length;
    if (gated) job.rate = resolveRate(req.rate!, tasks.filter((t) => t.rejectAtSubmit === undefined).map((t) => t.id));
    this.checkRoom("a new job");
    await this.store.putJob(job, tasks, steps).catch((err) => Promise.reject(storageError(err)));
    this.log.info("job submitted", { job: job.id, tenant, by: caller.id, hosts: tasks.length, ...(document ? { document, rejected } : {}) });
    this.track(job, tasks);
    if (job.rate) this.release(job.id, job);
    else this.dispatchInSlices(tasks, job);
    return job;
  }

  /**
   * Sends a big job's tasks a slice at a time, yielding to the event loop
   * between slices: each slice leaves for the proxies as its own frame, so
   * they start storing and delivering while later slices are still being
   * prepared, and heartbeats and other calls are answered meanwhile. A task
   * whose state changed in between (cancelled, say) is skipped by dispatch().
   */
  private dispatchInSlices(tasks: readonly TaskRecord[], job: JobRecord, from = 0): void {
    const end = Math.min(tasks.length, from + DISPATCH_SLICE);
    for (let i = from; i < end; i++) this.dispatch(tasks[i]!, job);
    if (end < tasks.length) setImmediate(() => this.dispatchInSlices(tasks, job, end));
  }

  /**
   * Resolves, renders and authorizes a request exactly as submit would, and
   * returns what each host would run — storing and sending nothing.
   */
  dryRun(caller: PeerIdentity, req: SubmitRequest, authorize?: SubmitAuthorizer): PlannedHost[] {
    const { hosts, perHost } = this.prepare(caller, req, authorize);
    return hosts.map((host) => {
      if (!perHost) return { host, steps: req.steps };
      const p = perHost.get(host.id);
      return p?.steps ? { host, steps: p.steps.shown } : { host, steps: [], rejected: p?.rejected ?? "no steps were rendered for this host" };
    });
  }

  /** Every check of a request, the host set, per-host rendering of a document, then authorization. */
  private prepare(caller: PeerIdentity, req: SubmitRequest, authorize?: SubmitAuthorizer): Prepared {
    const tenant = caller.scope;
    const params = req.parameters ?? {};
    let loaded: ReturnType<DocumentStore["load"]> | undefined;
    if (req.document) {
      if (req.steps.length > 0) throw new InvalidArgumentError("give either steps or a document, not both");
      if (!this.documents) throw new FailedPreconditionError("this controller does not keep documents");
      loaded = this.documents.load(tenant, req.document);
    } else {
      if (Object.keys(params).length > 0) throw new InvalidArgumentError("parameters are given to a document (--doc NAME)");
      validateSteps(req.steps);
    }
    if (req.stdin.length > this.maxStdinBytes) {
      throw new InvalidArgumentError(`stdin is ${req.stdin.length} bytes; the limit is ${this.maxStdinBytes}`);
    }
    if (req.timeoutMs < 0 || req.deliveryDeadlineMs < 0) throw new InvalidArgumentError("timeouts cannot be negative");
    for (const key of Object.keys(req.env)) {
      if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(key)) throw new InvalidArgumentError(`environment variable name ${JSON.stringify(key)} is not valid`);
    }
    if (!loaded) {
      const hosts = this.resolveHosts(tenant, req);
      authorize?.(hosts, req, req.steps);
      return { hosts };
    }
    const { stored, doc } = loaded;
    const values = resolveParams(doc.parameters, params);
    const redacted = redactParams(doc.parameters, values) as Record<string, ParamValue>;
    const hosts = this.resolveHosts(tenant, req);
    const perHost = new Map<string, { steps?: TaskSteps; rejected?: string }>();
    const distinct = new Map<string, Step>();
    for (const h of hosts) {
      const real = planHost(doc, values, h);
      if (real.rejected !== undefined) {
        perHost.set(h.id, { rejected: real.rejected });
        continue;
      }
      try {
        validateSteps(real.steps);
      } catch (err) {
        throw new InvalidArgumentError(`document ${stored.name}@${stored.version} on host ${JSON.stringify(h.id)}: ${(err as Error).message}`, { cause: err });
      }
      const shown = planHost(doc, redacted, h).steps ?? [];
      perHost.set(h.id, { steps: { run: real.steps, shown } });
      for (const step of real.steps) distinct.set(Buffer.from(toBinary(StepSchema, step)).toString("base64"), step);
    }
    authorize?.(hosts, req, [...distinct.values()]);
    const parameters = Object.fromEntries(Object.entries(redacted).map(([k, v]) => [k, typeof v === "string" ? v : JSON.stringify(v)]));
    return { hosts, perHost, document: `${stored.name}@${stored.version}`, parameters };
  }

  /** A document run's steps for one task as listings show them (sensitive values redacted). */
  shownSteps(task: TaskRecord): Step[] | undefined {
    return this.store.taskSteps(task.id)?.shown;
  }

  /**
   * The hosts a request targets, inside the caller's tenant. Never empty: an
   * empty or unmatched target is refused here, so that authorization always
   * judges the real host set.
   */
  resolveHosts(tenant: string, req: Pick<SubmitRequest, "hostIds" | "allHosts" | "target">): HostRecord[] {
    const ways = (req.allHosts ? 1 : 0) + (req.hostIds.length > 0 ? 1 : 0) + (req.target !== undefined ? 1 : 0);
    if (ways !== 1) {
      throw new InvalidArgumentError("say where to run: host ids, all hosts, or a target query (exactly one of the three)");
    }
    let hosts: HostRecord[];
    if (req.target !== undefined) {
      hosts = selectHosts(parseTarget(req.target), this.inventory.list(tenant));
      if (hosts.length === 0) throw new InvalidArgumentError(`the target ${JSON.stringify(req.target)} matches no host`);
    } else if (req.allHosts) {
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

  private checkRoom(what: string): void {
    this.store.checkRoomForWork?.(what);
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
    if (task.state !== TaskState.PENDING || task.released === false) return;
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
      steps: job.document ? (this.store.taskSteps(task.id)?.run ?? []) : job.steps,
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
   * Queues a write of a task's record; watchers hear of it once committed.
   * A terminal state also settles the job first, so that a watcher that sees
   * the last task end also sees the job finished.
   */
  private write(task: TaskRecord, chunk?: OutputChunk): Promise<void> {
    const snapshot = { ...task };
    const p = (chunk ? this.store.appendOutput(snapshot, chunk) : this.store.putTask(snapshot)).then(
      async () => {
        if (chunk && this.live.has(task.id)) this.committedChunks.set(task.id, Math.max(this.committedChunks.get(task.id) ?? 0, snapshot.outputChunks));
        if (!chunk && isTerminal(snapshot.state)) await this.taskFinished(task);
        this.notify(task.jobId, task.id);
      },
      (err) => {
        this.log.error("storing a task update failed", { task: task.id, err });
        throw storageError(err);
      },
    );
    this.lastWrite.set(task.id, p);
    void p.then(
      () => this.lastWrite.get(task.id) === p && this.lastWrite.delete(task.id),
      () => this.lastWrite.get(task.id) === p && this.lastWrite.delete(task.id),
    );
    return p;
  }

  private afterLastWrite(taskId: string): Promise<void> {
    return (this.lastWrite.get(taskId) ?? Promise.resolve()).then(
      () => undefined,
      () => undefined,
    );
  }

  /** A live task, or a finished one from the store (replays of finished tasks are acknowledged without effect). */
  private taskFor(taskId: string): TaskRecord | undefined {
    return this.live.get(taskId) ?? this.store.getTask(taskId);
  }

  /**
   * Applies a status reported through a proxy. Resolves once it is stored;
   * the caller acknowledges then. Statuses that do not move the task forward
   * (replays, stale reports) are acknowledged without effect.
   */
  applyStatus(proxy: ProxyPort, status: TaskStatus): Promise<void> {
    const task = this.live.get(status.taskId);
    if (!task) {
      if (!this.store.getTask(status.taskId)) this.log.warn("status for an unknown task dropped", { task: status.taskId, proxy: proxy.name });
      return this.afterLastWrite(status.taskId);
    }
    if (!advances(task.state, status.state)) return this.afterLastWrite(task.id);
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
    return this.write(task);
  }

  /** Stores an output chunk if it is the next one of its task; resolves, once stored, to the highest contiguous seq held. */
  applyOutput(chunk: OutputChunk): Promise<number> {
    const task = this.taskFor(chunk.taskId);
    if (!task) return Promise.resolve(Number(chunk.seq));
    const seq = Number(chunk.seq);
    if (seq === task.outputChunks + 1 && this.live.has(task.id)) {
      task.outputChunks = seq;
      return this.write(task, chunk).then(() => seq);
    }
    const held = task.outputChunks;
    return this.afterLastWrite(task.id).then(() => held);
  }

  /**
   * Marks a task terminal at the controller itself (cancelled or expired
   * before any proxy could have it). Resolves once stored.
   */
  private finishHere(task: TaskRecord, state: TaskState, message: string): Promise<void> | undefined {
    if (!advances(task.state, state)) return undefined;
    task.state = state;
    task.message = message;
    task.updatedAt = this.clock.now();
    task.expectedChunks = task.outputChunks;
    this.removePending(task);
    return this.write(task);
  }

  /** A task became terminal: the job finishes with its last task. */
  private async taskFinished(task: TaskRecord): Promise<void> {
    this.gateTaskEnded(task);
    const left = (this.open.get(task.jobId) ?? 1) - 1;
    this.open.set(task.jobId, left);
    if (left > 0) return;
    await this.finishJob(task.jobId);
  }

  /** Records a job as finished (every task terminal) and drops its in-memory state. */
  private async finishJob(jobId: string): Promise<void> {
    const job = this.store.getJob(jobId);
    if (!job || job.finishedAt !== undefined) return;
    job.finishedAt = this.clock.now();
    await this.store.putJob(job);
    this.deadlineTimers.get(job.id)?.cancel();
    this.deadlineTimers.delete(job.id);
    this.open.delete(job.id);
    this.gates.delete(job.id);
    for (const id of job.taskIds) {
      this.live.delete(id);
      this.committedChunks.delete(id);
    }
    this.log.info("job finished", { job: job.id, tasks: job.taskIds.length });
    this.notify(job.id);
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
    const writes: Promise<void>[] = [];
    for (const id of job.taskIds) {
      const task = this.live.get(id);
      if (!task || isTerminal(task.state)) continue;
      const proxies = this.proxiesHolding(task);
      if (proxies.length === 0) {
        const w = this.finishHere(task, TaskState.CANCELLED, "cancelled before delivery");
        if (w) writes.push(w);
      } else {
        // Proxies that are away get the cancel when they return (proxyReady); sites by bundle in the next one.
        for (const name of proxies) this.proxies.get(name)?.sendCancel(task.id, task.hostId);
      }
    }
    await Promise.all(writes);
    return this.store.getJob(job.id) ?? job;
  }

  /** Every proxy that holds the task or may have received it. */
  private proxiesHolding(task: TaskRecord): string[] {
    const names = new Set(this.mayHaveReached.get(task.id));
    if (task.proxy) names.add(task.proxy);
    return [...names];
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
      const task = this.live.get(taskId);
      const job = task && this.store.getJob(task.jobId);
      if (!task || !job || task.state !== TaskState.PENDING) continue;
      this.sentTo.set(taskId, port.name);
      port.sendTask(this.taskSpec(job, task));
    }
    for (const job of this.store.unfinishedJobs()) {
      if (!job.cancelRequested) continue;
      for (const id of job.taskIds) {
        const task = this.live.get(id);
        if (task && !isTerminal(task.state) && this.proxiesHolding(task).includes(port.name)) port.sendCancel(task.id, task.hostId);
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
    const writes: Promise<void>[] = [];
    for (const id of job.taskIds) {
      const task = this.live.get(id);
      // A task that may sit at a proxy is expired there (the proxy enforces the same deadline).
      if (task && task.state === TaskState.PENDING && this.proxiesHolding(task).length === 0) {
        const w = this.finishHere(task, TaskState.EXPIRED, "the delivery deadline passed before the host could be reached");
        if (w) writes.push(w);
      }
    }
    await Promise.all(writes);
  }

  // ---- reading and watching ----------------------------------------------

  /** A job of the caller's tenant; other tenants' jobs look like missing ones. */
  getJobFor(caller: PeerIdentity, jobId: string): JobRecord {
    const job = jobId ? this.store.getJob(jobId) : undefined;
    if (!job || job.tenant !== caller.scope) throw new NotFoundError(`job ${JSON.stringify(jobId)} not found`);
    return job;
  }

  tasksOf(job: JobRecord): TaskRecord[] {
    return job.taskIds.map((id) => this.taskFor(id)).filter((t): t is TaskRecord => t !== undefined);
  }

  /**
   * Everything a region with no link should receive: its released tasks not
   * yet confirmed by any proxy, cancels of cancelled jobs, and acks of the
   * results already received (so the site can drop them). Exported tasks are
   * recorded as possibly delivered, so a later cancel reaches them too.
   */
  exportForRegion(tenant: string, region: string): { tasks: TaskSpec[]; cancels: { taskId: string; hostId: string }[]; statusAcks: { taskId: string; state: TaskState }[]; outputAcks: { taskId: string; seq: number }[] } {
    const via = `bundle:${region}`;
    const out = { tasks: [] as TaskSpec[], cancels: [] as { taskId: string; hostId: string }[], statusAcks: [] as { taskId: string; state: TaskState }[], outputAcks: [] as { taskId: string; seq: number }[] };
    for (const task of this.live.values()) {
      if (task.tenant !== tenant || this.inventory.get(task.hostId)?.region !== region) continue;
      const job = this.store.getJob(task.jobId);
      if (!job) continue;
      if (task.state === TaskState.PENDING && task.released !== false && !job.cancelRequested && this.clock.now() < job.deliverBy) {
        out.tasks.push(this.taskSpec(job, task));
        let reached = this.mayHaveReached.get(task.id);
        if (!reached) this.mayHaveReached.set(task.id, (reached = new Set()));
        reached.add(via);
      } else if (job.cancelRequested && !isTerminal(task.state) && this.proxiesHolding(task).length > 0) {
        out.cancels.push({ taskId: task.id, hostId: task.hostId });
      }
    }
    const acks = this.bundleAcks.get(region);
    if (acks) {
      for (const [taskId, a] of acks) {
        out.statusAcks.push({ taskId, state: a.state });
        out.outputAcks.push({ taskId, seq: a.seq });
      }
      this.bundleAcks.delete(region);
    }
    return out;
  }

  /** Applies results carried from a site; remembers what to acknowledge in the next tasks bundle. */
  async importResults(port: ProxyPort, statuses: readonly TaskStatus[], output: readonly OutputChunk[]): Promise<{ statuses: number; chunks: number }> {
    let chunks = 0;
    let applied = 0;
    let acks = this.bundleAcks.get(port.region);
    if (!acks) this.bundleAcks.set(port.region, (acks = new Map()));
    for (const c of output) {
      const before = this.taskFor(c.taskId)?.outputChunks ?? 0;
      const held = await this.applyOutput(c);
      if (held > before) chunks++;
      const a = acks.get(c.taskId) ?? { state: TaskState.PENDING, seq: 0 };
      a.seq = Math.max(a.seq, held);
      acks.set(c.taskId, a);
    }
    for (const st of statuses) {
      const before = this.taskFor(st.taskId)?.state;
      await this.applyStatus(port, st);
      if (before !== undefined && this.taskFor(st.taskId)?.state !== before) applied++;
      const a = acks.get(st.taskId) ?? { state: TaskState.PENDING, seq: 0 };
      if (st.state > a.state) a.state = st.state;
      acks.set(st.taskId, a);
    }
    return { statuses: applied, chunks };
  }

  /** The newest jobs of the caller's tenant. */
  listJobs(caller: PeerIdentity, limit: number): JobRecord[] {
    return this.store.listJobs(caller.scope, Math.min(Math.max(limit || 50, 1), 1000));
  }

  getJobRecord(id: string): JobRecord | undefined {
    return this.store.getJob(id);
  }

  getTaskRecord(id: string): TaskRecord | undefined {
    const t = this.taskFor(id);
    return t && { ...t };
  }

  /** Output chunks of a task that are committed, so a reader finds them in the store. */
  outputCommitted(task: TaskRecord): number {
    return this.committedChunks.get(task.id) ?? task.outputChunks;
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

/** Parses a target query; a syntax error carries the position and a caret line for the client. */
export function parseTarget(text: string): Query {
  try {
    return parseQuery(text);
  } catch (err) {
    if (err instanceof QuerySyntaxError) throw new InvalidArgumentError(`target ${err.message}\n${err.pointer}`, { cause: err });
    throw err;
  }
}

function hasLimits(r: RateRequest): boolean {
  return Boolean(r.concurrency || r.concurrencyPercent || r.concurrencyPerRegion || r.batch) || r.maxErrors !== undefined || r.maxErrorsPercent !== undefined;
}

/** Turns percentages into task counts (at least 1 where a limit is asked for) and picks the canary tasks. */
export function resolveRate(r: RateRequest, taskIds: readonly string[]): JobRate {
  const n = taskIds.length;
  const pct = (p: number) => Math.max(1, Math.floor((n * p) / 100));
  for (const [name, v] of Object.entries(r)) {
    if (v !== undefined && (!Number.isInteger(v) || v < 0)) throw new InvalidArgumentError(`rate ${name} must be a whole number, got ${v}`);
  }
  if ((r.concurrencyPercent ?? 0) > 100 || (r.maxErrorsPercent ?? 0) > 100) throw new InvalidArgumentError("a percentage cannot be above 100");
  if (r.concurrency && r.concurrencyPercent) throw new InvalidArgumentError("give concurrency as a number or a percentage, not both");
  if (r.maxErrors !== undefined && r.maxErrorsPercent !== undefined) throw new InvalidArgumentError("give max errors as a number or a percentage, not both");
  const rate: JobRate = {
    concurrency: r.concurrency || (r.concurrencyPercent ? pct(r.concurrencyPercent) : 0),
    perRegion: r.concurrencyPerRegion ?? 0,
    canary: taskIds.slice(0, Math.min(r.batch ?? 0, n)),
  };
  if (r.maxErrors !== undefined) rate.maxErrors = r.maxErrors;
  else if (r.maxErrorsPercent !== undefined) rate.maxErrors = Math.floor((n * r.maxErrorsPercent) / 100);
  return rate;
}
