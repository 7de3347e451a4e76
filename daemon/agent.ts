import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { Backoff, type BackoffOptions } from "../common/backoff.js";
import { itemBytes, MemoryBacklog, type Backlog, type UpwardItem } from "../common/backlog.js";
import type { Clock } from "../common/clock.js";
import { Coalescer } from "../common/coalescer.js";
import type { FrameLink } from "../common/frame-link.js";
import { Heartbeat } from "../common/heartbeat.js";
import type { Logger } from "../common/logger.js";
import { isTerminal } from "../common/task-state.js";
import {
  AgentStreamRequestSchema,
  type AgentStreamRequest,
  type AgentStreamResponse,
} from "../gen/rexmesh/v1/agent_link_pb.js";
import type { HostFacts } from "../gen/rexmesh/v1/host_pb.js";
import {
  OutputChunkSchema,
  TaskState,
  TaskStatusSchema,
  type TaskSpec,
  type TaskStatus,
} from "../gen/rexmesh/v1/task_pb.js";
import type { Executor, TaskOutcome } from "./executor.js";
import type { Ledger, LedgerEntry } from "./ledger.js";

export type ProxyLinkToAgent = FrameLink<AgentStreamRequest, AgentStreamResponse>;

/** Opens a stream to the proxy at an address; rejects when it cannot. */
export type Dialer = (address: string, signal: AbortSignal) => Promise<ProxyLinkToAgent>;

export interface AgentOptions {
  hostId: string;
  tenant: string;
  /** Proxies of this host's region, tried in order; the next one after a failure. */
  proxies: readonly string[];
  dial: Dialer;
  executor: Executor;
  ledger: Ledger;
  /** Results not yet acknowledged by the proxy; durable in a real daemon. Default: in memory. */
  outbox?: Backlog;
  facts: HostFacts;
  clock: Clock;
  log: Logger;
  /** Tasks run at once. Default 4. */
  capacity?: number;
  /** Default 10 s. */
  heartbeatMs?: number;
  backoff?: BackoffOptions;
  /** Connection time after which the backoff starts over. Default 10 s. */
  healthyAfterMs?: number;
}

/**
 * One host: it keeps a stream to a proxy of its region, accepts tasks into
 * its ledger before it starts them, runs them, and keeps every status and
 * output chunk until the proxy acknowledges it, sending them again after a
 * reconnect.
 */
export class Agent {
  private readonly opts: Required<Omit<AgentOptions, "backoff" | "outbox">> & { backoff: BackoffOptions };
  private readonly outbox: Backlog;
  private readonly waiting: TaskSpec[] = [];
  private readonly running = new Map<string, AbortController>();
  private link: ProxyLinkToAgent | undefined;
  private out: Coalescer<AgentStreamRequest> | undefined;
  private heartbeat: Heartbeat | undefined;
  private readonly stopController = new AbortController();
  private loop: Promise<void> | undefined;
  private lastCredits = -1;
  private connectedListeners = new Set<(proxy: string) => void>();

  constructor(opts: AgentOptions) {
    this.opts = {
      capacity: 4,
      heartbeatMs: 10_000,
      healthyAfterMs: 10_000,
      backoff: {},
      ...opts,
    };
    if (!(this.opts.capacity >= 1)) throw new Error("capacity must be at least 1");
    this.outbox = opts.outbox ?? new MemoryBacklog();
  }

  get hostId(): string {
    return this.opts.hostId;
  }

  get connected(): boolean {
    return this.link !== undefined;
  }

  /** Calls fn each time a stream to a proxy is established. */
  onConnected(fn: (proxy: string) => void): () => void {
    this.connectedListeners.add(fn);
    return () => this.connectedListeners.delete(fn);
  }

  /** Recovers the ledger and starts the connect loop. */
  async start(): Promise<void> {
    await this.recover();
    this.loop = this.connectLoop();
  }

  /**
   * Stops taking work; running tasks get graceMs to finish and are then
   * cancelled (their process groups killed), so nothing outlives the daemon
   * unaccounted. Their final statuses go out if the stream is still open.
   */
  async stop(graceMs = 0): Promise<void> {
    this.stopController.abort(new Error("daemon stopping"));
    if (this.running.size > 0) {
      const finished = new Promise<void>((resolve) => (this.idle = resolve));
      const timer = this.opts.clock.setTimeout(() => {
        for (const abort of this.running.values()) abort.abort(new Error("daemon stopping"));
      }, graceMs);
      await finished;
      timer.cancel();
      this.out?.flush();
    }
    // Cancel rather than half-close: nothing is gained by waiting for the proxy to end the stream.
    this.link?.close(new Error("daemon stopping"));
    await this.loop;
  }

  private idle: (() => void) | undefined;

  /** Tasks the daemon can take now: what it reports as credits. */
  private credits(): number {
    return Math.max(0, this.opts.capacity - this.running.size - this.waiting.length);
  }

  // ---- recovery --------------------------------------------------------------

  /**
   * After a restart: a task that was RUNNING may have had its process killed
   * with the daemon, so it is reported INTERRUPTED and not run again, unless
   * the job said it is idempotent. Accepted tasks that never started run now.
   */
  private async recover(): Promise<void> {
    // Final statuses the proxy never acknowledged are reported again.
    await this.outbox.push(this.opts.ledger.unreported().map((e) => ({ kind: "status" as const, status: e.final! })));
    for (const entry of this.opts.ledger.unfinished()) {
      if (entry.state === TaskState.RUNNING && !entry.spec.idempotent) {
        await this.finishTask(entry, { state: TaskState.INTERRUPTED, message: "the daemon stopped while the task ran; not run again", outputChunks: 0, outputTruncated: false });
      } else {
        this.waiting.push(entry.spec);
      }
    }
  }

  // ---- connection ------------------------------------------------------------

  private async connectLoop(): Promise<void> {
    const backoff = new Backoff(this.opts.backoff);
    const stop = this.stopController.signal;
    let index = 0;
    while (!stop.aborted) {
      const address = this.opts.proxies[index % this.opts.proxies.length]!;
      const startedAt = this.opts.clock.now();
      try {
        const link = await this.opts.dial(address, stop);
        try {
          await this.serve(link, address);
        } finally {
          link.close();
        }
      } catch (err) {
        if (stop.aborted) break;
        this.opts.log.warn("proxy link failed", { proxy: address, err });
      }
      if (stop.aborted) break;
      if (this.opts.clock.now() - startedAt > this.opts.healthyAfterMs) {
        backoff.reset();
      } else {
        index++;
      }
      try {
        await this.opts.clock.sleep(backoff.next(), stop);
      } catch {
        break;
      }
    }
  }

  private async serve(link: ProxyLinkToAgent, address: string): Promise<void> {
    const log = this.opts.log;
    const out = new Coalescer(
      () => create(AgentStreamRequestSchema),
      (frame) => {
        heartbeat.sent();
        link.send(frame);
      },
    );
    const heartbeat = new Heartbeat(
      this.opts.clock,
      this.opts.heartbeatMs,
      () => link.send(create(AgentStreamRequestSchema)),
      () => link.close(new Error("proxy heartbeat lost")),
    );
    // The hello, the credits and everything not yet acknowledged, in order.
    const hello = out.frame;
    hello.hello = { $typeName: "rexmesh.v1.AgentHello", hostId: this.opts.hostId, facts: this.opts.facts, heartbeatMs: this.opts.heartbeatMs };
    hello.credits = this.credits();
    this.lastCredits = hello.credits;
    this.addToFrame(out, this.outbox.all());
    this.link = link;
    this.out = out;
    this.heartbeat = heartbeat;
    let welcomed = false;
    try {
      for await (const frame of link.incoming) {
        heartbeat.received();
        if (frame.welcome && !welcomed) {
          welcomed = true;
          log.info("connected to proxy", { proxy: frame.welcome.proxy, region: frame.welcome.region, address });
          for (const fn of this.connectedListeners) fn(frame.welcome.proxy);
        }
        await this.handleFrame(frame);
      }
    } finally {
      heartbeat.stop();
      out.discard();
      if (this.link === link) {
        this.link = undefined;
        this.out = undefined;
        this.heartbeat = undefined;
      }
    }
  }

  private addToFrame(out: Coalescer<AgentStreamRequest>, items: readonly UpwardItem[]): void {
    for (const item of items) {
      const frame = out.frameFor(itemBytes(item));
      if (item.kind === "output") frame.output.push(item.chunk);
      else frame.statuses.push(item.status);
    }
  }

  /** Keeps items until acknowledged and sends them now if a stream is open. */
  private emit(items: UpwardItem[]): void {
    this.outbox.push(items).catch((err) => this.opts.log.error("spooling results failed", { err }));
    if (this.out) this.addToFrame(this.out, items);
    this.reportCredits();
  }

  private reportCredits(): void {
    const credits = this.credits();
    if (credits !== this.lastCredits && this.out) {
      this.lastCredits = credits;
      this.out.frame.credits = credits;
    }
  }

  private async handleFrame(frame: AgentStreamResponse): Promise<void> {
    for (const ack of frame.outputAcks) void this.outbox.ackOutput(ack.taskId, Number(ack.seq));
    for (const ack of frame.statusAcks) {
      void this.outbox.ackStatus(ack.taskId, ack.state);
      if (isTerminal(ack.state)) await this.markReported(ack.taskId);
    }
    for (const spec of frame.tasks) await this.accept(spec);
    for (const taskId of frame.cancelTaskIds) this.cancel(taskId);
    this.pump();
  }

  // ---- tasks -----------------------------------------------------------------

  private status(spec: TaskSpec, state: TaskState, extra: Omit<MessageInitShape<typeof TaskStatusSchema>, "$typeName"> = {}): TaskStatus {
    return create(TaskStatusSchema, {
      taskId: spec.taskId,
      hostId: this.opts.hostId,
      state,
      time: timestampFromMs(this.opts.clock.now()),
      ...extra,
    });
  }

  /** Takes a task into the ledger, or answers from the ledger if it was taken before. */
  private async accept(spec: TaskSpec): Promise<void> {
    const known = this.opts.ledger.get(spec.taskId);
    if (known) {
      this.emit([{ kind: "status", status: known.final ?? this.status(known.spec, known.state) }]);
      return;
    }
    const entry: LedgerEntry = { spec, state: TaskState.DELIVERED };
    if (spec.hostId !== this.opts.hostId || spec.tenant !== this.opts.tenant) {
      await this.finishTask(entry, { state: TaskState.REJECTED, message: `the task is addressed to host ${spec.tenant}/${spec.hostId}, not to this host`, outputChunks: 0, outputTruncated: false });
      return;
    }
    if (this.pastDeadline(spec)) {
      await this.finishTask(entry, { state: TaskState.EXPIRED, message: "the delivery deadline passed before the task reached the host", outputChunks: 0, outputTruncated: false });
      return;
    }
    await this.opts.ledger.put(entry);
    this.waiting.push(spec);
    this.emit([{ kind: "status", status: this.status(spec, TaskState.DELIVERED) }]);
  }

  private pastDeadline(spec: TaskSpec): boolean {
    return spec.deliverBy !== undefined && timestampMs(spec.deliverBy) <= this.opts.clock.now();
  }

  private cancel(taskId: string): void {
    const running = this.running.get(taskId);
    if (running) {
      running.abort(new Error("cancelled"));
      return;
    }
    const i = this.waiting.findIndex((s) => s.taskId === taskId);
    if (i < 0) return;
    const [spec] = this.waiting.splice(i, 1);
    const entry = this.opts.ledger.get(taskId) ?? { spec: spec!, state: TaskState.DELIVERED };
    void this.finishTask(entry, { state: TaskState.CANCELLED, message: "cancelled before it started", outputChunks: 0, outputTruncated: false });
  }

  private pump(): void {
    while (this.running.size < this.opts.capacity && this.waiting.length > 0 && !this.stopController.signal.aborted) {
      const spec = this.waiting.shift()!;
      const abort = new AbortController();
      this.running.set(spec.taskId, abort);
      void this.run(spec, abort).catch((err) => this.opts.log.error("task failed in the daemon", { task: spec.taskId, err }));
    }
    this.reportCredits();
  }

  private async run(spec: TaskSpec, abort: AbortController): Promise<void> {
    const entry = this.opts.ledger.get(spec.taskId) ?? { spec, state: TaskState.DELIVERED };
    try {
      if (this.pastDeadline(spec)) {
        await this.finishTask(entry, { state: TaskState.EXPIRED, message: "the delivery deadline passed before the task could start", outputChunks: 0, outputTruncated: false });
        return;
      }
      // Written before the process exists: after a crash this entry means "may have run".
      entry.state = TaskState.RUNNING;
      await this.opts.ledger.put(entry);
      this.emit([{ kind: "status", status: this.status(spec, TaskState.RUNNING) }]);
      // The task learns who and what it is; these names cannot be overridden by the job.
      const env = { ...spec.env, REXMESH_HOST_ID: this.opts.hostId, REXMESH_TASK_ID: spec.taskId, REXMESH_JOB_ID: spec.jobId };
      const outcome = await this.opts.executor.run({ ...spec, env }, {
        signal: abort.signal,
        onOutput: (stream, data, seq) => {
          const chunk = create(OutputChunkSchema, { taskId: spec.taskId, seq: BigInt(seq), stream, data: Uint8Array.prototype.slice.call(data) });
          this.emit([{ kind: "output", chunk }]);
        },
      });
      await this.finishTask(entry, outcome);
    } finally {
      this.running.delete(spec.taskId);
      this.pump();
      if (this.running.size === 0) this.idle?.();
    }
  }

  private async markReported(taskId: string): Promise<void> {
    const entry = this.opts.ledger.get(taskId);
    if (!entry?.final || entry.finalAcked) return;
    entry.finalAcked = true;
    await this.opts.ledger.put(entry);
  }

  private async finishTask(entry: LedgerEntry, outcome: TaskOutcome): Promise<void> {
    if (entry.final) return;
    const final = this.status(entry.spec, outcome.state, {
      exitCode: outcome.exitCode,
      signal: outcome.signal ?? "",
      message: outcome.message,
      outputChunks: BigInt(outcome.outputChunks),
      outputTruncated: outcome.outputTruncated,
    });
    entry.state = outcome.state;
    entry.final = final;
    await this.opts.ledger.put(entry);
    if (!isTerminal(final.state)) throw new Error(`executor returned a non-terminal state ${final.state}`);
    this.emit([{ kind: "status", status: final }]);
  }
}
