import { createHash } from "node:crypto";
import { setMaxListeners } from "node:events";
import { create } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type Client } from "@connectrpc/connect";
import { Backoff } from "../common/backoff.js";
import type { Clock } from "../common/clock.js";
import { isTerminal, stateName } from "../common/task-state.js";
import { SubmitJobRequestSchema, type ControllerService, type Task } from "../gen/rexmesh/v1/controller_pb.js";
import { OutputStream, TaskState } from "../gen/rexmesh/v1/task_pb.js";
import type { JobPlan } from "./plan.js";
import { taskEnv, taskScript } from "./workload.js";

/** One look at a task's state. `since`: the server's answer reflects its state at this time or later. */
export interface StateSeen {
  since: number;
  at: number;
  state: TaskState;
  exitCode?: number;
  proxy: string;
  message: string;
  chunks: number;
  via: "watch" | "get" | "final";
}

/** A chunk as read: its stream and a digest of its bytes. */
export interface ChunkSeen {
  stream: OutputStream;
  sha: string;
  bytes: number;
  at: number;
}

export interface TaskObs {
  taskId: string;
  jobId: string;
  hostId: string;
  /** Every distinct state seen, in the order seen. */
  history: StateSeen[];
  /** The first terminal state seen, and when. */
  terminal?: StateSeen;
  /** Every distinct version of each seq ever read (more than one is a violation). */
  chunks: Map<number, ChunkSeen[]>;
  /** The task as the final read left it. */
  last?: Task;
}

export interface JobObs {
  plan: JobPlan;
  jobId: string;
  /** When SubmitJob returned (ms from start). */
  acceptedAt: number;
  attempts: number;
  /** Task ids by host, from the first look at the job. */
  taskIds: Map<string, string>;
  cancelRequestedAt?: number;
  /** When CancelJob returned. */
  cancelledAt?: number;
  cancelError?: string;
}

/** What the final read of a job gathered: output per task and stream in arrival order, chunk seqs, tasks. */
export interface FinalRead {
  jobId: string;
  complete: boolean;
  error?: string;
  tasks: Map<string, Task>;
  stdout: Map<string, Buffer>;
  stderr: Map<string, Buffer>;
  seqs: Map<string, number[]>;
}

/** A check of acknowledged jobs against the controller (after a restart, and at the end). */
export interface JobAudit {
  at: number;
  /** Why it was made: "after controller restart (fault 4)", "final". */
  reason: string;
  jobId: string;
  found: boolean;
  error?: string;
  tasks: { id: string; hostId: string }[];
}

const FATAL = new Set([Code.InvalidArgument, Code.PermissionDenied, Code.Unauthenticated, Code.FailedPrecondition, Code.AlreadyExists, Code.NotFound, Code.ResourceExhausted]);

/** How often a job whose watch the controller refused (too many open) is looked at with GetJob instead. */
const POLL_REFUSED_MS = 1000;

function retryable(err: unknown): boolean {
  return !FATAL.has(ConnectError.from(err).code);
}

function sha256(data: Uint8Array): string {
  return createHash("sha256").update(data).digest("hex");
}

/**
 * The client side of a chaos run: submits the workload (retrying with the
 * job's idempotency key, as a careful client does), watches every job live
 * from submission to its end (reconnecting across controller restarts) and
 * records every state and every output chunk it reads, with times relative
 * to the start, for the checker. It judges nothing itself.
 */
export class Observer {
  readonly jobs = new Map<number, JobObs>();
  readonly tasks = new Map<string, TaskObs>();
  readonly audits: JobAudit[] = [];
  /** Jobs whose SubmitJob never returned, with the last error. */
  readonly unaccepted: { plan: JobPlan; error: string }[] = [];
  private readonly watchers = new Set<Promise<void>>();
  private readonly stopWatching = new AbortController();
  /** Submissions in progress, by job index: a cancel waits for its job to be accepted. */
  private readonly submitting = new Map<number, Promise<void>>();

  constructor(
    private readonly client: Client<typeof ControllerService>,
    private readonly clock: Clock,
    private readonly t0: number,
    private readonly env: { runId: string; marksDir: string; lostAfterMs: number; retryForMs: number },
  ) {
    // Every watch listens on this signal.
    setMaxListeners(0, this.stopWatching.signal);
  }

  now(): number {
    return this.clock.now() - this.t0;
  }

  /** Calls fn until it succeeds, fails for good, or retryForMs (or the given deadline) passes; counts attempts. */
  private async retry<T>(fn: (signal: AbortSignal) => Promise<T>, onAttempt?: () => void, deadline = this.clock.now() + this.env.retryForMs): Promise<T> {
    const backoff = new Backoff({ initialMs: 200, maxMs: 2000, jitter: 0 });
    for (;;) {
      onAttempt?.();
      try {
        return await fn(AbortSignal.timeout(10_000));
      } catch (err) {
        if (!retryable(err) || this.clock.now() > deadline) throw err;
      }
      await this.clock.sleep(backoff.next());
    }
  }

  submit(plan: JobPlan, seed: number): Promise<void> {
    const p = this.submitOnce(plan, seed);
    this.submitting.set(plan.index, p);
    return p;
  }

  private async submitOnce(plan: JobPlan, seed: number): Promise<void> {
    const req = create(SubmitJobRequestSchema, {
      hostIds: plan.hosts,
      steps: [{ tool: { case: "shell", value: { script: taskScript(this.env.runId) } } }],
      env: taskEnv(plan.params, this.env.marksDir),
      idempotencyKey: `chaos-${seed}-${plan.index}`,
      lostAfter: durationFromMs(this.env.lostAfterMs),
      ...(plan.timeoutMs ? { timeout: durationFromMs(plan.timeoutMs) } : {}),
      ...(plan.deliveryDeadlineMs ? { deliveryDeadline: durationFromMs(plan.deliveryDeadlineMs) } : {}),
    });
    let attempts = 0;
    try {
      const res = await this.retry((signal) => this.client.submitJob(req, { signal }), () => attempts++);
      const obs: JobObs = { plan, jobId: res.job!.id, acceptedAt: this.now(), attempts, taskIds: new Map() };
      this.jobs.set(plan.index, obs);
      this.watch(obs);
    } catch (err) {
      this.unaccepted.push({ plan, error: ConnectError.from(err).message });
    }
  }

  /** Cancels a job once it is accepted (its submission may still be retrying). */
  async cancel(index: number): Promise<void> {
    await this.submitting.get(index);
    const obs = this.jobs.get(index);
    if (!obs) return;
    obs.cancelRequestedAt = this.now();
    try {
      await this.retry((signal) => this.client.cancelJob({ jobId: obs.jobId }, { signal }));
      obs.cancelledAt = this.now();
    } catch (err) {
      obs.cancelError = ConnectError.from(err).message;
    }
  }

  private taskObs(t: Task): TaskObs {
    let o = this.tasks.get(t.id);
    if (!o) this.tasks.set(t.id, (o = { taskId: t.id, jobId: t.jobId, hostId: t.hostId, history: [], chunks: new Map() }));
    return o;
  }

  /** Records a look at a task; only changes are kept in the history. */
  private sawTask(job: JobObs | undefined, t: Task, since: number, via: StateSeen["via"]): void {
    const o = this.taskObs(t);
    if (job && !job.taskIds.has(t.hostId)) job.taskIds.set(t.hostId, t.id);
    const seen: StateSeen = { since, at: this.now(), state: t.state, exitCode: t.exitCode, proxy: t.proxy, message: t.message, chunks: Number(t.outputChunks), via };
    const prev = o.history[o.history.length - 1];
    if (!prev || prev.state !== seen.state || prev.exitCode !== seen.exitCode || prev.proxy !== seen.proxy || prev.message !== seen.message) o.history.push(seen);
    if (isTerminal(t.state) && !o.terminal) o.terminal = seen;
    o.last = t;
  }

  private sawChunk(taskId: string, seq: number, stream: OutputStream, data: Uint8Array): void {
    const o = this.tasks.get(taskId);
    if (!o) return;
    const seen = { stream, sha: sha256(data), bytes: data.length, at: this.now() };
    const versions = o.chunks.get(seq);
    if (!versions) o.chunks.set(seq, [seen]);
    else if (!versions.some((v) => v.sha === seen.sha && v.stream === seen.stream)) versions.push(seen);
  }

  /**
   * Watches a job from its start to its end, reconnecting after failures
   * until stopped. The controller holds at most 16 WatchJob streams per
   * operator (`watchesPerOperator`, docs/security.md) and the workload often
   * has more jobs open than that: a refused watch is replaced by a GetJob
   * look every POLL_REFUSED_MS until a watch is accepted, so the client
   * still sees every end within moments (I1 times what the client saw).
   */
  private watch(job: JobObs): void {
    const p = (async () => {
      const backoff = new Backoff({ initialMs: 200, maxMs: 2000, jitter: 0 });
      const signal = this.stopWatching.signal;
      while (!signal.aborted) {
        // A stream's batches come in order: each one shows the job as it was after the previous one arrived.
        let since = this.now();
        let delay: number | undefined;
        try {
          for await (const batch of this.client.watchJob({ jobId: job.jobId }, { signal })) {
            for (const t of batch.tasks) this.sawTask(job, t, since, "watch");
            for (const c of batch.output) this.sawChunk(c.taskId, Number(c.seq), c.stream, c.data);
            since = this.now();
            backoff.reset();
          }
          const ids = [...job.taskIds.values()];
          if (ids.length > 0 && ids.every((id) => this.tasks.get(id)?.terminal)) return;
        } catch (err) {
          if (signal.aborted) return;
          if (ConnectError.from(err).code === Code.ResourceExhausted) {
            if (await this.look(job, signal)) return;
            delay = POLL_REFUSED_MS;
          }
        }
        await this.clock.sleep(delay ?? backoff.next(), signal).catch(() => undefined);
      }
    })();
    this.watchers.add(p);
    const forget = () => this.watchers.delete(p);
    p.then(forget, forget);
  }

  /** One GetJob look at a job (for a refused watch); true once every task of it has been seen terminal. */
  private async look(job: JobObs, signal: AbortSignal): Promise<boolean> {
    const since = this.now();
    try {
      const res = await this.client.getJob({ jobId: job.jobId }, { signal: AbortSignal.any([signal, AbortSignal.timeout(10_000)]) });
      for (const t of res.tasks) this.sawTask(job, t, since, "get");
    } catch {
      /* the next look, or the watch, will tell */
    }
    const ids = [...job.taskIds.values()];
    return ids.length === job.plan.hosts.length && ids.every((id) => this.tasks.get(id)?.terminal);
  }

  /** Looks at every job that still has tasks not seen terminal (GetJob): a second pair of eyes beside the watches. */
  async pollOpen(budgetMs = 10_000): Promise<number> {
    let open = 0;
    const deadline = this.clock.now() + budgetMs;
    for (const job of this.jobs.values()) {
      const ids = [...job.taskIds.values()];
      if (ids.length === job.plan.hosts.length && ids.every((id) => this.tasks.get(id)?.terminal)) continue;
      const since = this.now();
      try {
        if (this.clock.now() < deadline) {
          const res = await this.client.getJob({ jobId: job.jobId }, { signal: AbortSignal.timeout(Math.max(1, deadline - this.clock.now())) });
          for (const t of res.tasks) this.sawTask(job, t, since, "get");
        }
      } catch {
        /* the watch and the next poll will tell */
      }
      open += job.plan.hosts.length - [...job.taskIds.values()].filter((id) => this.tasks.get(id)?.terminal).length;
    }
    return open;
  }

  /** Tasks running now on some of the hosts, as last seen. */
  runningOn(hosts: readonly string[]): number {
    let n = 0;
    for (const o of this.tasks.values()) {
      const last = o.history[o.history.length - 1];
      if (last?.state === TaskState.RUNNING && hosts.includes(o.hostId)) n++;
    }
    return n;
  }

  /** Checks that every acknowledged job is still there with all its tasks. */
  async audit(reason: string): Promise<void> {
    // One budget for the whole audit: a controller that never answers costs retryForMs, not that per job.
    const deadline = this.clock.now() + this.env.retryForMs;
    for (const job of this.jobs.values()) {
      const since = this.now();
      try {
        const res = await this.retry((signal) => this.client.getJob({ jobId: job.jobId }, { signal }), undefined, deadline);
        for (const t of res.tasks) this.sawTask(job, t, since, "get");
        this.audits.push({ at: this.now(), reason, jobId: job.jobId, found: res.job !== undefined, tasks: res.tasks.map((t) => ({ id: t.id, hostId: t.hostId })) });
      } catch (err) {
        const e = ConnectError.from(err);
        this.audits.push({ at: this.now(), reason, jobId: job.jobId, found: e.code !== Code.NotFound, error: `${Code[e.code]}: ${e.rawMessage}`, tasks: [] });
      }
    }
  }

  /** Stops every live watch and waits for them to end. */
  async stop(): Promise<void> {
    this.stopWatching.abort(new Error("chaos run over"));
    await Promise.allSettled([...this.watchers]);
  }

  /**
   * Reads a job from its start through WatchJob, as a client that arrives
   * after the fact would: until the stream ends, or nothing came for idleMs
   * after the first batch (a job that never finishes), or maxMs.
   */
  async finalRead(job: JobObs, idleMs = 3000, maxMs = 30_000): Promise<FinalRead> {
    const r: FinalRead = { jobId: job.jobId, complete: false, tasks: new Map(), stdout: new Map(), stderr: new Map(), seqs: new Map() };
    const parts = new Map<string, { out: Buffer[]; err: Buffer[] }>();
    const abort = new AbortController();
    const overall = this.clock.setTimeout(() => abort.abort(new Error("final read: too long")), maxMs);
    let idle = this.clock.setTimeout(() => abort.abort(new Error("final read: no first batch")), maxMs);
    const since = this.now();
    try {
      for await (const batch of this.client.watchJob({ jobId: job.jobId }, { signal: abort.signal })) {
        idle.cancel();
        idle = this.clock.setTimeout(() => abort.abort(new Error("final read: idle")), idleMs);
        for (const t of batch.tasks) {
          r.tasks.set(t.id, t);
          this.sawTask(job, t, since, "final");
        }
        for (const c of batch.output) {
          this.sawChunk(c.taskId, Number(c.seq), c.stream, c.data);
          let p = parts.get(c.taskId);
          if (!p) parts.set(c.taskId, (p = { out: [], err: [] }));
          (c.stream === OutputStream.STDERR ? p.err : p.out).push(Buffer.from(c.data));
          let seqs = r.seqs.get(c.taskId);
          if (!seqs) r.seqs.set(c.taskId, (seqs = []));
          seqs.push(Number(c.seq));
        }
      }
      r.complete = true;
    } catch (err) {
      r.error = abort.signal.aborted ? String((abort.signal.reason as Error).message) : ConnectError.from(err).message;
    } finally {
      idle.cancel();
      overall.cancel();
    }
    for (const [id, p] of parts) {
      r.stdout.set(id, Buffer.concat(p.out));
      r.stderr.set(id, Buffer.concat(p.err));
    }
    return r;
  }
}

/** "RUNNING@proxy-alpha-1 +12.3s" lines for a task's history. */
export function formatHistory(o: TaskObs): string {
  return o.history.map((h) => `+${(h.at / 1000).toFixed(1)}s ${stateName(h.state)}${h.exitCode !== undefined ? `(${h.exitCode})` : ""}@${h.proxy || "-"} chunks=${h.chunks}${h.message ? ` "${h.message}"` : ""} [${h.via}]`).join("; ");
}
