import type { RoleCore } from "../common/lifecycle.js";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { Backoff, type BackoffOptions } from "../common/backoff.js";
import { itemBytes, MemoryBacklog, upwardKey, type Backlog, type UpwardItem } from "../common/backlog.js";
import type { Clock, Timer } from "../common/clock.js";
import type { Coalescer } from "../common/coalescer.js";
import type { FrameLink } from "../common/frame-link.js";
import { LinkSession } from "../common/link-session.js";
import { reconnectLoop } from "../common/reconnect.js";
import type { Logger } from "../common/logger.js";
import { isTerminal } from "../common/task-state.js";
import {
  AgentStreamRequestSchema,
  type AgentStreamRequest,
  type AgentStreamResponse,
} from "../gen/rexmesh/v1/agent_link_pb.js";
import type { HostFacts } from "../gen/rexmesh/v1/host_pb.js";
import { HostEventSchema, type HostEvent } from "../gen/rexmesh/v1/event_pb.js";
import { timeOrderedIds, type IdGenerator } from "../common/ids.js";
import { LIMITS } from "../common/limits.js";
import type { SignedSessionOrder } from "../gen/rexmesh/v1/session_pb.js";
import {
  OutputChunkSchema,
  TaskSpecSchema,
  TaskState,
  TaskStatusSchema,
  type SignedTask,
  type TaskSpec,
  type TaskStatus,
} from "../gen/rexmesh/v1/task_pb.js";
import { isPingOnly, peekSpec, TaskRejected, type TaskVerifier } from "../common/task-signing.js";
import type { Executor, OutputFlow, TaskOutcome } from "./executor.js";
import type { Ledger, LedgerEntry } from "./ledger.js";
import { describeCleanup, endTaskProcesses, type Cleanup, type GroupRef } from "./orphans.js";
import { RunOutput } from "./run-output.js";
import type { UpdateRequest } from "./install.js";
import type { Settled } from "./updates.js";
import { OutputDigest, type HostReporter } from "../common/host-signing.js";
import { screenAcks } from "../common/link-limits.js";
import { missingTool } from "../common/step-tool.js";

export type ProxyLinkToAgent = FrameLink<AgentStreamRequest, AgentStreamResponse>;

/** Opens a stream to the proxy at an address; rejects when it cannot. */
export type Dialer = (address: string, signal: AbortSignal) => Promise<ProxyLinkToAgent>;

/** The agent's part in an update (daemon/updates.ts). */
export interface AgentUpdates {
  /** Leaves the hand-over for the supervisor. */
  request(req: UpdateRequest): void;
  /** After a restart: how the update the ledger recorded ended. */
  settle(taskId: string, update: { from: string; to: string }, signal: AbortSignal): Promise<Settled>;
  /** The settled update's end is stored. */
  forget(taskId: string): void;
  /** A prepared update will not be handed over: another may be prepared. */
  abandoned(): void;
  /** Why this daemon takes no update, or undefined when it does. */
  unable(): string | undefined;
}

export interface AgentOptions {
  /** Updates of this daemon; absent, an update recorded before a restart ends FAILED. */
  updates?: AgentUpdates;
  /** Asks the process to stop and restart (into a new version); called once an update is handed over. */
  onRestart?: (reason: string) => void;
  hostId: string;
  tenant: string;
  /** Proxies of this host's region, tried in order; the next one after a failure. */
  proxies: readonly string[];
  dial: Dialer;
  executor: Executor;
  ledger: Ledger;
  /** Checks every task's signature before anything else happens to it. */
  verifier: TaskVerifier;
  /** Results not yet acknowledged by the proxy; durable in a real daemon. Default: in memory. */
  outbox?: Backlog;
  facts: HostFacts;
  /**
   * The tools this host runs (daemon/tools.ts): a task with a step of any
   * other tool is REJECTED with the reason. Absent: no check (the executor
   * still fails a step it cannot run).
   */
  tools?: readonly string[];
  clock: Clock;
  log: Logger;
  /** Tasks run at once. Default 4. */
  capacity?: number;
  /** Default 10 s. */
  heartbeatMs?: number;
  /**
   * How often the dialler's connection PINGs the proxy (HTTP/2), said in
   * the hello so that the proxy watches for those PINGs instead of asking
   * back (AgentHello.ping_ms). Default 0: the connection does not PING.
   */
  pingMs?: number;
  backoff?: BackoffOptions;
  /** Connection time after which the backoff starts over. Default 10 s. */
  healthyAfterMs?: number;
  /**
   * Back-pressure: when the results this host holds unacknowledged (the
   * outbox's bytes, output and statuses of all tasks, also while no proxy is
   * connected) pass this many bytes, running tasks stop being read, so their
   * processes block in write(); they are read again once acks bring the
   * outbox down to half of it. Output is paused as well while the link has
   * more than {@link LINK_BACKLOG_HIGH_FRAMES} frames queued and not yet
   * written, until it is down to {@link LINK_BACKLOG_LOW_FRAMES}. The outbox
   * may pass the mark by about one read (64 KiB) per pipe of each running
   * task. Default 16 MiB; Infinity turns the byte mark off.
   */
  maxUnackedOutputBytes?: number;
  /** How long a proxy has to answer the hello (TLS handshake included). Default 20 s. */
  connectTimeoutMs?: number;
  /** Time between SIGTERM and SIGKILL for what an interrupted task left running. Default 2 s. */
  killGraceMs?: number;
  /** Ends what an interrupted task left running (orphans.ts); injectable for tests. */
  endLeftovers?: (taskId: string, groups: readonly GroupRef[]) => Promise<Cleanup>;
  /**
   * A ledger entry of an ended task is dropped this long after the task's
   * delivery deadline (no proxy hands it out past it), or this long after
   * the task ended when it had none. Default 1 hour.
   */
  ledgerMarginMs?: number;
  /** How often the ledger is pruned. Default 10 minutes. */
  pruneEveryMs?: number;
  /** Random source of the reconnect jitter. */
  random?: () => number;
  /**
   * The host's report key: presence proofs for the controller and a
   * signature on every task end (common/host-signing.ts); asked for at every
   * connection, so that a renewed certificate endorses a new key. Absent:
   * the host proves nothing and signs nothing (a controller that requires
   * proofs does not count it as connected).
   */
  reporter?: () => HostReporter;
  /** Told each round trip measured on the link to the proxy, in seconds (the daemon's histogram); absent: none is measured. */
  linkRoundTrip?: (seconds: number) => void;
  /** Takes the session orders a proxy passes on, with the address of that proxy and the report key of the connection (daemon/sessions.ts); absent: they are dropped. */
  onSessionOrders?: (orders: readonly SignedSessionOrder[], proxyAddress: string, reporter: HostReporter | undefined) => void;
}

/** Default of {@link AgentOptions.maxUnackedOutputBytes}. */
const DEFAULT_MAX_UNACKED_OUTPUT_BYTES = 16 * 1024 * 1024;
/** Frames queued on the link, not yet written, above which output is paused (frames hold up to 4 MiB). */
export const LINK_BACKLOG_HIGH_FRAMES = 8;
/** Frames queued on the link at or below which paused output may resume. */
export const LINK_BACKLOG_LOW_FRAMES = 2;
/**
 * While paused, how often the link's backlog is looked at again: it drains
 * without an event. Acks and every frame from the proxy look at once.
 */
const FLOW_CHECK_MS = 50;

/**
 * A ledger write that a task cannot go on without (its start, its end, the
 * seq of output about to leave) and that the store refused (a full map or
 * disk) is tried again after this backoff, until it is stored or the daemon
 * stops: the task holds its slot meanwhile, and nothing is answered from a
 * state that is not stored.
 */
const STORE_RETRY: BackoffOptions = { initialMs: 1000, multiplier: 1.6, maxMs: 30_000, jitter: 0.2 };

/**
 * What a new stream resends, task by task: a task's statuses before its end,
 * then its chunks in seq order, then its end. A proxy takes a chunk only
 * above the highest seq it holds for the task and forgets a task once its
 * end is acknowledged, so a chunk whose outbox write was retried (pushed
 * after later ones) must not follow them, nor the end.
 */
export function resendOrder(items: readonly UpwardItem[]): UpwardItem[] {
  const byTask = new Map<string, { before: UpwardItem[]; chunks: UpwardItem[]; ends: UpwardItem[] }>();
  // Events belong to no task and depend on none: they go first, in the order noticed.
  const events = items.filter((i) => i.kind === "event");
  for (const item of items) {
    if (item.kind === "event") continue;
    const taskId = item.kind === "output" ? item.chunk.taskId : item.status.taskId;
    let t = byTask.get(taskId);
    if (!t) byTask.set(taskId, (t = { before: [], chunks: [], ends: [] }));
    if (item.kind === "output") t.chunks.push(item);
    else (isTerminal(item.status.state) ? t.ends : t.before).push(item);
  }
  const seq = (i: UpwardItem) => (i.kind === "output" ? i.chunk.seq : 0n);
  return [...events, ...[...byTask.values()].flatMap((t) => [...t.before, ...t.chunks.sort((a, b) => (seq(a) < seq(b) ? -1 : seq(a) > seq(b) ? 1 : 0)), ...t.ends])];
}

/** What a drain keeps at the end of its grace for the ends of the tasks it had to end to be acknowledged. */
const DRAIN_ACK_MS = 1000;
/** How long an update waits for the other running tasks to end before the restart's drain interrupts them. */
const UPDATE_QUIET_WAIT_MS = 10 * 60_000;
/**
 * The abort reason of a task a drain ends: it ends INTERRUPTED, not CANCELLED (no one cancelled it). Urgent
 * (executor.ts isUrgentAbort): the task must end within the kill grace left, not wait for a late spawner's report.
 */
const DRAIN_OVERRUN = Object.assign(new Error("the daemon stopped and its grace time ran out"), { urgent: true });

/** The end of the queue of tasks waiting for their turn to spawn (see spawnTurn). */
let lastTurn: Promise<void> = Promise.resolve();

/**
 * Waits for this task's turn to start its process: one start per turn of the
 * event loop, across every host this process serves, when processes start
 * on the daemon's own thread (no spawner): a fork of the daemon takes
 * milliseconds, and posix_spawn still waits for the child's exec (~2.5 ms a
 * launch in a 120 MiB process: 200 at once held the loop for ~490 ms in a
 * review's measurement). Unpaced, a burst would hold the event loop that
 * long, and with it every status, heartbeat and ack of every host's stream.
 * Not needed through the spawner (a frame written).
 */
function spawnTurn(): Promise<void> {
  const turn = lastTurn.then(() => new Promise<void>((resolve) => setImmediate(resolve)));
  lastTurn = turn;
  return turn;
}

/**
 * One host: it keeps a stream to a proxy of its region, accepts tasks into
 * its ledger before it starts them, runs them, and keeps every status and
 * output chunk until the proxy acknowledges it, sending them again after a
 * reconnect.
 */
export class Agent implements RoleCore {
  private readonly opts: Required<Omit<AgentOptions, "backoff" | "outbox" | "endLeftovers" | "random" | "reporter" | "tools" | "linkRoundTrip" | "onSessionOrders" | "updates" | "onRestart">> & {
    backoff: BackoffOptions;
    tools?: readonly string[];
    random?: () => number;
    reporter?: () => HostReporter;
    linkRoundTrip?: (seconds: number) => void;
    onSessionOrders?: AgentOptions["onSessionOrders"];
    updates?: AgentUpdates;
    onRestart?: AgentOptions["onRestart"];
  };
  private readonly endLeftovers: (taskId: string, groups: readonly GroupRef[]) => Promise<Cleanup>;
  private readonly outbox: Backlog;
  private readonly waiting: TaskSpec[] = [];
  private readonly running = new Map<string, AbortController>();
  /** Output of the running tasks, some of which may be held back until its seq is recorded (run-output.ts). */
  private readonly outputs = new Map<string, RunOutput>();
  /** Items whose outbox write was refused and is being tried again, by identity: a new stream resends them too. */
  private readonly unkept = new Map<string, UpwardItem>();
  private link: ProxyLinkToAgent | undefined;
  /** The address of the proxy the link in use was dialled to: session legs are dialled there. */
  private linkAddress = "";
  private out: Coalescer<AgentStreamRequest> | undefined;
  private pruneTimer: Timer | undefined;
  /** The report key of the current connection (see AgentOptions.reporter). */
  private reporter: HostReporter | undefined;
  private readonly stopController = new AbortController();
  private loop: Promise<void> | undefined;
  private lastCredits = -1;
  /** Set by drain: no task starts and no credit is granted any more. */
  private draining = false;
  /** Events kept in the outbox and not yet acknowledged (ids), bounded by LIMITS.eventsQueuedPerHost. */
  private readonly queuedEvents = new Set<string>();
  /** Events dropped because that queue was full, since when; reported as one `events.dropped` event once it drains. */
  private droppedEvents = { count: 0, since: 0 };
  private readonly eventIds: IdGenerator;
  private connectedListeners = new Set<(proxy: string, address: string) => void>();
  /** Back-pressure state shared by all running tasks; see maxUnackedOutputBytes. */
  private flowPaused = false;
  private readonly resumeListeners = new Set<() => void>();
  private flowTimer: Timer | undefined;
  private readonly outputFlow: OutputFlow = {
    paused: () => this.flowPaused,
    onResume: (cb) => {
      // Wrapped, so that each subscription is its own entry even for the same function.
      const entry = () => cb();
      this.resumeListeners.add(entry);
      return () => this.resumeListeners.delete(entry);
    },
  };

  constructor(opts: AgentOptions) {
    this.opts = {
      capacity: 4,
      heartbeatMs: 10_000,
      pingMs: 0,
      healthyAfterMs: 10_000,
      backoff: {},
      killGraceMs: 2000,
      connectTimeoutMs: 20_000,
      ledgerMarginMs: 3_600_000,
      pruneEveryMs: 600_000,
      ...opts,
      maxUnackedOutputBytes: opts.maxUnackedOutputBytes ?? DEFAULT_MAX_UNACKED_OUTPUT_BYTES,
    };
    this.eventIds = timeOrderedIds(this.opts.clock);
    this.endLeftovers = opts.endLeftovers ?? ((taskId, groups) => endTaskProcesses(taskId, groups, this.opts.clock, this.opts.killGraceMs));
    if (!(this.opts.capacity >= 1)) throw new Error("capacity must be at least 1");
    if (!(this.opts.maxUnackedOutputBytes >= 0)) throw new Error(`maxUnackedOutputBytes must be a non-negative number, got ${this.opts.maxUnackedOutputBytes}`);
    this.outbox = opts.outbox ?? new MemoryBacklog();
  }

  get hostId(): string {
    return this.opts.hostId;
  }

  get connected(): boolean {
    return this.link !== undefined;
  }

  /** True while running tasks' output is not being read (back-pressure; see maxUnackedOutputBytes). */
  get outputPaused(): boolean {
    return this.flowPaused;
  }

  /** Calls fn each time a stream to a proxy is established. */
  onConnected(fn: (proxy: string, address: string) => void): () => void {
    this.connectedListeners.add(fn);
    return () => this.connectedListeners.delete(fn);
  }

  /** Recovers the ledger and starts the connect loop. */
  async start(): Promise<void> {
    await this.recover();
    this.schedulePrune();
    this.loop = reconnectLoop<ProxyLinkToAgent>({
      targets: this.opts.proxies,
      what: "proxy link",
      clock: this.opts.clock,
      log: this.opts.log,
      signal: this.stopController.signal,
      backoff: this.opts.backoff,
      healthyAfterMs: this.opts.healthyAfterMs,
      random: this.opts.random,
      dial: (address, signal) => this.opts.dial(address, signal),
      serve: (link, address, up) => this.serve(link, address, up),
      close: (link) => link.close(),
    });
  }

  /**
   * Stops taking work and lets what is in flight end while the stream stays
   * open: the proxy is told that this host has no free slots (a task it sent
   * before it heard is kept in the ledger and runs after the next start),
   * running tasks get what the grace leaves after the kill grace and a
   * second for acks, and are then ended INTERRUPTED (their process groups
   * killed, so nothing outlives the daemon unaccounted), and results are sent
   * until the proxy acknowledges them. All of it within graceMs; what is
   * still unacknowledged then stays in the outbox for the next start.
   */
  async drain(graceMs: number): Promise<void> {
    const clock = this.opts.clock;
    const deadline = clock.now() + graceMs;
    this.draining = true;
    this.reportCredits();
    this.out?.flush();
    const cancelAfter = Math.max(0, graceMs - this.opts.killGraceMs - DRAIN_ACK_MS);
    const cancelRunning = () => {
      for (const abort of this.running.values()) abort.abort(DRAIN_OVERRUN);
    };
    const overrun = cancelAfter > 0 ? clock.setTimeout(cancelRunning, cancelAfter) : (cancelRunning(), undefined);
    // A task whose end cannot be stored (a failing store) ends when stop() gives up on the store.
    await this.whenSettled(() => this.running.size === 0, Math.max(0, deadline - clock.now()));
    overrun?.cancel();
    this.out?.flush();
    await this.whenSettled(() => this.outbox.size === 0 && this.unkept.size === 0, Math.max(0, deadline - clock.now()));
  }

  /** Drains (see drain) and then releases everything: the stream, the connect loop, the timers. */
  async stop(graceMs = 0): Promise<void> {
    await this.drain(graceMs);
    this.stopController.abort(new Error("daemon stopping"));
    // Cancel rather than half-close: nothing is gained by waiting for the proxy to end the stream.
    this.link?.close(new Error("daemon stopping"));
    await this.loop;
    this.pruneTimer?.cancel();
    this.flowTimer?.cancel();
    this.flowTimer = undefined;
  }

  /**
   * Resolves once `done()` holds, looked at again whenever a task ends or a
   * frame (acks) or a link change comes; after `timeoutMs` regardless.
   */
  private whenSettled(done: () => boolean, timeoutMs?: number): Promise<void> {
    if (done() || timeoutMs === 0) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = timeoutMs === undefined ? undefined : this.opts.clock.setTimeout(() => finish(), timeoutMs);
      const check = () => done() && finish();
      const finish = () => {
        timer?.cancel();
        this.settleChecks.delete(check);
        resolve();
      };
      this.settleChecks.add(check);
    });
  }

  private readonly settleChecks = new Set<() => void>();

  private checkSettled(): void {
    for (const check of [...this.settleChecks]) check();
  }

  /** Tasks the daemon can take now: what it reports as credits. None while it drains. */
  private credits(): number {
    if (this.draining) return 0;
    return Math.max(0, this.opts.capacity - this.running.size - this.waiting.length);
  }

  // ---- recovery --------------------------------------------------------------

  /**
   * After a restart: a task that was RUNNING may have had its process killed
   * with the daemon, so it is reported INTERRUPTED and not run again, unless
   * the job said it is idempotent. Accepted tasks that never started run now.
   */
  private async recover(): Promise<void> {
    // Events still waiting for their ack count towards the queue's bound.
    for (const item of this.outbox.all()) if (item.kind === "event") this.queuedEvents.add(item.event.id);
    // Final statuses the proxy never acknowledged are reported again.
    await this.outbox.push(this.opts.ledger.unreported().map((e) => ({ kind: "status" as const, status: e.final! })));
    const unfinished = this.opts.ledger.unfinished();
    // Whatever the interrupted tasks left running (re-parented to init when the daemon died) is ended first:
    // asked for all at once, so that one scan of /proc serves them all.
    const cleanups = new Map(
      unfinished
        .filter((e) => e.state === TaskState.RUNNING && !e.update)
        .map((e) => [e.spec.taskId, this.endLeftovers(e.spec.taskId, e.groups ?? []).catch((err: unknown): Cleanup => ({ killed: [], failed: [String(err)] }))]),
    );
    for (const entry of unfinished) {
      if (entry.state !== TaskState.RUNNING) {
        this.waiting.push(entry.spec);
        continue;
      }
      if (entry.update) {
        // Handed over to the supervisor before the restart: its end is what the supervisor decided.
        this.settleUpdate(entry, entry.update);
        continue;
      }
      const cleanup = await cleanups.get(entry.spec.taskId)!;
      const what = describeCleanup(cleanup);
      if (cleanup.killed.length > 0 || cleanup.failed.length > 0) this.opts.log.warn("ended what an interrupted task left running", { task: entry.spec.taskId, what });
      if (entry.spec.idempotent) {
        // Run again: its entry stays RUNNING until then, which tells run() that an earlier run's output may be out.
        this.waiting.push(entry.spec);
      } else {
        await this.finishTask(entry, { state: TaskState.INTERRUPTED, message: `the daemon stopped while the task ran; not run again (${what})`, outputChunks: 0, outputTruncated: false }, "unknown");
      }
    }
    await this.pruneLedger();
  }

  private schedulePrune(): void {
    if (this.stopController.signal.aborted) return;
    this.pruneTimer = this.opts.clock.setTimeout(() => {
      void this.pruneLedger()
        .catch((err) => this.opts.log.error("pruning the ledger failed", { err }))
        .finally(() => this.schedulePrune());
    }, this.opts.pruneEveryMs);
  }

  /**
   * Drops ledger entries no proxy can hand out again: ended, acknowledged,
   * and past the task's delivery deadline (or its end, without one) by the
   * margin. Resolves to how many were dropped.
   */
  async pruneLedger(): Promise<number> {
    const now = this.opts.clock.now();
    const margin = this.opts.ledgerMarginMs;
    const gone: string[] = [];
    for (const e of this.opts.ledger.all()) {
      if (!e.final || !e.finalAcked) continue;
      const from = e.spec.deliverBy ? timestampMs(e.spec.deliverBy) : (e.endedAt ?? now);
      if (now >= from + margin) gone.push(e.spec.taskId);
    }
    await Promise.all(gone.map((id) => this.opts.ledger.remove(id)));
    return gone.length;
  }

  // ---- connection ------------------------------------------------------------

  private async serve(link: ProxyLinkToAgent, address: string, up: (peer?: string) => void): Promise<void> {
    const log = this.opts.log;
    const ls = new LinkSession<AgentStreamRequest, AgentStreamResponse>(link, {
      clock: this.opts.clock,
      empty: () => create(AgentStreamRequestSchema),
      peer: "proxy",
      afterSend: () => this.updateFlow(),
      onRoundTrip: this.opts.linkRoundTrip && ((ms) => this.opts.linkRoundTrip!(ms / 1000)),
    });
    // The hello and the credits first; everything not yet acknowledged follows the proxy's welcome, after
    // the proof of presence it asks for, so that the controller knows this proxy holds the host before its
    // results arrive through it.
    const hello = ls.out.frame;
    this.reporter = this.opts.reporter?.();
    hello.hello = { $typeName: "rexmesh.v1.AgentHello", hostId: this.opts.hostId, facts: this.opts.facts, heartbeatMs: this.opts.heartbeatMs, reportKey: this.reporter?.key, pingMs: this.opts.pingMs };
    hello.credits = this.credits();
    this.lastCredits = hello.credits;
    ls.out.flush();
    this.link = link;
    this.linkAddress = address;
    this.updateFlow();
    try {
      const first = await ls.first(this.opts.connectTimeoutMs);
      if (!first) return;
      ls.startHeartbeat(this.opts.heartbeatMs);
      this.out = ls.out;
      this.prove(first, link);
      this.addToFrame(ls.out, this.releasable(resendOrder([...this.outbox.all(), ...this.unkept.values()])));
      if (first.welcome) {
        up(first.welcome.proxy);
        log.debug("welcomed by proxy", { proxy: first.welcome.proxy, region: first.welcome.region, address });
        for (const fn of this.connectedListeners) fn(first.welcome.proxy, address);
      }
      await this.handleFrame(first, link);
      await ls.forEach((frame) => this.handleFrame(frame, link));
    } finally {
      ls.end("discard");
      if (this.link === link) {
        this.link = undefined;
        this.out = undefined;
        // Frames queued on the closed link no longer hold output back.
        this.updateFlow();
      }
    }
  }

  private addToFrame(out: Coalescer<AgentStreamRequest>, items: readonly UpwardItem[]): void {
    for (const item of items) {
      const frame = out.frameFor(itemBytes(item));
      if (item.kind === "output") frame.output.push(item.chunk);
      else if (item.kind === "event") frame.events.push(item.event);
      else frame.statuses.push(item.status);
    }
  }

  /**
   * Reports an event a watcher noticed (daemon/watchers.ts): signed with
   * the report key, then kept in the outbox like a task's end until the
   * proxy acknowledges it, and sent again on every new stream until then.
   * Resolves once it is durable.
   */
  reportEvent(event: HostEvent): Promise<void> {
    // A bounded queue: a watcher flapping through a long cut-off must not fill the store that task results need.
    if (this.queuedEvents.size >= LIMITS.eventsQueuedPerHost) {
      if (this.droppedEvents.count++ === 0) {
        this.droppedEvents.since = this.opts.clock.now();
        this.opts.log.warn("events not yet acknowledged fill their queue: new ones are dropped until it drains", { queued: this.queuedEvents.size });
      }
      return Promise.resolve();
    }
    this.queuedEvents.add(event.id);
    const reporter = this.reporter ?? this.opts.reporter?.();
    if (reporter) {
      reporter.signEvent(event);
      // A key the controller never saw (this process started while cut off) is endorsed by the certificate it carries.
      event.reportKey = reporter.key;
    }
    const items: UpwardItem[] = [{ kind: "event", event }];
    const kept = this.keep(items);
    this.send(items);
    return kept;
  }

  /** Keeps items until acknowledged and sends them now if a stream is open. */
  private report(items: UpwardItem[]): void {
    this.keep(items).catch(this.spoolFailed);
    this.send(items);
  }

  /**
   * Keeps items in the outbox until acknowledged; resolves once they are
   * durable. A write the store refuses is tried again (STORE_RETRY) until it
   * is stored, and rejects only when the daemon stops: an item already on
   * the stream but not in the outbox would be lost with the stream, since a
   * new stream resends only what the outbox holds.
   */
  private keep(items: UpwardItem[]): Promise<void> {
    const first = items[0];
    const taskId = !first ? "" : first.kind === "output" ? first.chunk.taskId : first.kind === "event" ? `event ${first.event.id}` : first.status.taskId;
    let refused = false;
    const kept = this.untilStored("spooling results", taskId, async () => {
      try {
        await this.outbox.push(items);
      } catch (err) {
        // Until stored, a new stream sends them from here (they may be on the stream already).
        if (!refused) for (const item of items) this.unkept.set(upwardKey(item), item);
        refused = true;
        throw err;
      }
    }).finally(() => {
      if (!refused) return;
      for (const item of items) this.unkept.delete(upwardKey(item));
      // Acknowledged while its write was tried again, an item would stay in the outbox until the next stream:
      // sent again, it is acknowledged again (the proxy takes it for a duplicate).
      this.send(this.releasable(items));
    });
    this.updateFlow();
    return kept;
  }

  /** Items without the chunks a task's RunOutput still holds back (their seq is not recorded yet). */
  private releasable(items: UpwardItem[]): UpwardItem[] {
    return items.filter((item) => item.kind !== "output" || !this.outputs.get(item.chunk.taskId)?.holds(Number(item.chunk.seq)));
  }

  private readonly spoolFailed = (err: unknown): void => this.opts.log.error("spooling results stopped with the daemon", { err });

  /** Sends kept items now if a stream is open (a new stream sends what the outbox holds). */
  private send(items: UpwardItem[]): void {
    if (this.out) this.addToFrame(this.out, items);
    this.reportCredits();
    this.updateFlow();
  }

  // ---- back-pressure ---------------------------------------------------------

  /**
   * Pauses the output of all running tasks when the unacknowledged results
   * pass maxUnackedOutputBytes or the link's unwritten frames pass
   * LINK_BACKLOG_HIGH_FRAMES; resumes it once the results are down to half
   * the mark and the frames to LINK_BACKLOG_LOW_FRAMES. Called whenever one
   * of them may have changed: results kept, frames sent, frames (acks)
   * received, a link opened or closed. Backlog sizes change synchronously
   * with push and ack, also for the durable outbox.
   */
  private updateFlow(): void {
    const bytes = this.outbox.bytes;
    const frames = this.link?.backlog ?? 0;
    const max = this.opts.maxUnackedOutputBytes;
    if (!this.flowPaused) {
      if (bytes <= max && frames <= LINK_BACKLOG_HIGH_FRAMES) return;
      this.flowPaused = true;
      this.opts.log.debug("output paused", { unackedBytes: bytes, linkBacklog: frames });
    } else if (bytes <= max / 2 && frames <= LINK_BACKLOG_LOW_FRAMES) {
      this.flowPaused = false;
      this.flowTimer?.cancel();
      this.flowTimer = undefined;
      this.opts.log.debug("output resumed", { unackedBytes: bytes, linkBacklog: frames });
      for (const fn of [...this.resumeListeners]) {
        try {
          fn();
        } catch (err) {
          this.opts.log.error("resuming output failed", { err });
        }
      }
      return;
    }
    // Acks and link changes call again; only the link's backlog drains
    // without an event, so look at it again while it holds the pause.
    if (this.flowTimer === undefined && this.link !== undefined && frames > LINK_BACKLOG_LOW_FRAMES) {
      this.flowTimer = this.opts.clock.setTimeout(() => {
        this.flowTimer = undefined;
        if (this.flowPaused) this.updateFlow();
      }, FLOW_CHECK_MS);
    }
  }

  private reportCredits(): void {
    const credits = this.credits();
    if (credits !== this.lastCredits && this.out) {
      this.lastCredits = credits;
      this.out.frame.credits = credits;
    }
  }

  /** The controller asks, through the proxy, for proof that this host holds this stream. */
  private prove(frame: AgentStreamResponse, link: ProxyLinkToAgent | undefined): void {
    if (frame.presenceNonce.length === 0 || !this.reporter || !this.out) return;
    const f = this.out.frame;
    f.presenceNonce = frame.presenceNonce;
    const { proof, salt } = this.reporter.prove(frame.presenceNonce, link?.peer);
    f.presenceProof = proof;
    f.presenceSalt = salt;
  }

  private async handleFrame(frame: AgentStreamResponse, link?: ProxyLinkToAgent): Promise<void> {
    this.prove(frame, link);
    const dropFailed = (err: unknown) => this.opts.log.error("dropping acknowledged results failed", { err });
    screenAcks(frame).warn(this.opts.log, "acknowledgements no proxy sends were ignored");
    for (const ack of frame.outputAcks) this.outbox.ackOutput(ack.taskId, Number(ack.seq)).catch(dropFailed);
    for (const ack of frame.eventAcks) {
      this.queuedEvents.delete(ack.eventId);
      this.outbox.ackEvent(this.opts.hostId, ack.eventId).catch(dropFailed);
    }
    // Drained enough: say how many were dropped meanwhile, as an event of its own.
    if (this.droppedEvents.count > 0 && this.queuedEvents.size <= LIMITS.eventsQueuedPerHost / 2) {
      const { count, since } = this.droppedEvents;
      this.droppedEvents = { count: 0, since: 0 };
      this.opts.log.warn("events were dropped while their queue was full", { dropped: count });
      void this.reportEvent(
        create(HostEventSchema, {
          id: this.eventIds("e"),
          hostId: this.opts.hostId,
          tenant: this.opts.tenant,
          kind: "events.dropped",
          details: { count: String(count), since: new Date(since).toISOString() },
          time: timestampFromMs(this.opts.clock.now()),
          watcher: "daemon",
        }),
      ).catch(this.spoolFailed);
    }
    for (const ack of frame.statusAcks) {
      this.outbox.ackStatus(ack.taskId, ack.state).catch(dropFailed);
      if (isTerminal(ack.state)) await this.markReported(ack.taskId);
    }
    if (frame.signingKeys.length > 0) this.opts.verifier.addKeys(frame.signingKeys);
    for (const signed of frame.tasks) await this.acceptSigned(signed);
    // The proxy spent a credit on every task it sent; tasks that took no slot here (a ping, a refusal,
    // a duplicate) would leave its count too low for good, so the true count always goes back.
    if (frame.tasks.length > 0) this.lastCredits = -1;
    for (const taskId of frame.cancelTaskIds) this.cancel(taskId, false);
    for (const taskId of frame.withdrawTaskIds) this.cancel(taskId, true);
    // The report key presented on this connection (the controller accepted it) signs the host's half of each session's key.
    if (frame.sessions.length > 0) this.opts.onSessionOrders?.(frame.sessions, this.linkAddress, this.reporter);
    this.updateFlow();
    this.startWaiting();
    this.checkSettled();
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

  /**
   * Verifies a task before anything else: one that is unsigned, signed with
   * an unknown key, or altered is refused (REJECTED, with the reason) and
   * never reaches the ledger, so a forged copy cannot shadow the real task.
   */
  private async acceptSigned(signed: SignedTask): Promise<void> {
    let spec: TaskSpec;
    try {
      spec = this.opts.verifier.verify(signed);
    } catch (err) {
      const claimed = peekSpec(signed);
      const reason = err instanceof TaskRejected ? err.message : "the task cannot be read";
      this.opts.log.warn("task refused", { task: claimed?.taskId, reason });
      if (claimed?.taskId && !this.opts.ledger.get(claimed.taskId)) {
        this.report([{ kind: "status", status: this.status(claimed, TaskState.REJECTED, { message: reason }) }]);
      }
      return;
    }
    await this.accept(spec);
  }

  /** Takes a verified task into the ledger, or answers from the ledger if it was taken before. */
  private async accept(spec: TaskSpec): Promise<void> {
    const known = this.opts.ledger.get(spec.taskId);
    if (known) {
      this.report([{ kind: "status", status: known.final ?? this.status(known.spec, known.state) }]);
      return;
    }
    const entry: LedgerEntry = { spec, state: TaskState.DELIVERED };
    if (spec.hostId !== this.opts.hostId || spec.tenant !== this.opts.tenant) {
      await this.finishTask(entry, { state: TaskState.REJECTED, message: `the task is addressed to host ${spec.tenant}/${spec.hostId}, not to this host`, outputChunks: 0, outputTruncated: false });
      return;
    }
    const missing = this.opts.tools && missingTool(spec.steps, this.opts.tools);
    if (missing) {
      // Why this daemon takes no update is its own to say: no supervisor, no release key, several hosts in one process.
      const why = spec.steps.some((s) => s.tool.case === "update") ? this.opts.updates?.unable() : undefined;
      await this.finishTask(entry, { state: TaskState.REJECTED, message: why ? `${missing}: ${why}` : missing, outputChunks: 0, outputTruncated: false });
      return;
    }
    if (this.pastDeadline(spec)) {
      await this.finishTask(entry, { state: TaskState.EXPIRED, message: "the delivery deadline passed before the task reached the host", outputChunks: 0, outputTruncated: false });
      return;
    }
    if (isPingOnly(spec)) {
      // A ping runs nothing, so answering it twice is harmless: answered at once, with no ledger
      // write and nothing kept for an ack (the proxy sends none: if this answer is lost with the
      // link, the proxy hands the ping out again on the next one).
      if (this.out) this.addToFrame(this.out, [{ kind: "status", status: this.status(spec, TaskState.SUCCEEDED, { exitCode: 0, message: "pong" }) }]);
      return;
    }
    await this.opts.ledger.put(entry);
    this.waiting.push(spec);
    this.report([{ kind: "status", status: this.status(spec, TaskState.DELIVERED) }]);
  }

  private pastDeadline(spec: TaskSpec): boolean {
    return spec.deliverBy !== undefined && timestampMs(spec.deliverBy) <= this.opts.clock.now();
  }

  /**
   * Cancels a task: a running one has its process group terminated, a
   * waiting one ends at once. A withdrawal (the controller gave up on this
   * host) only drops a task that has not started.
   */
  private cancel(taskId: string, withdraw: boolean): void {
    const running = this.running.get(taskId);
    if (running) {
      if (!withdraw) running.abort(new Error("cancelled"));
      return;
    }
    const i = this.waiting.findIndex((s) => s.taskId === taskId);
    if (i < 0) return;
    const [spec] = this.waiting.splice(i, 1);
    const entry = this.opts.ledger.get(taskId) ?? { spec: spec!, state: TaskState.DELIVERED };
    const message = withdraw ? "withdrawn before it started: the controller had given up waiting for this host" : "cancelled before it started";
    void this.finishTask(entry, { state: TaskState.CANCELLED, message, outputChunks: 0, outputTruncated: false }, undefined, { retry: true }).catch((err) => this.opts.log.error("recording a cancel failed", { task: taskId, err }));
    this.reportCredits();
  }

  private startWaiting(): void {
    while (this.running.size < this.opts.capacity && this.waiting.length > 0 && !this.draining) {
      const spec = this.waiting.shift()!;
      const abort = new AbortController();
      this.running.set(spec.taskId, abort);
      void this.run(spec, abort).catch((err) => this.opts.log.error("task failed in the daemon", { task: spec.taskId, err }));
    }
    this.reportCredits();
  }

  private async run(spec: TaskSpec, abort: AbortController): Promise<void> {
    const taskId = spec.taskId;
    let entry = this.opts.ledger.get(taskId) ?? { spec, state: TaskState.DELIVERED };
    // Found RUNNING: an idempotent task run again after a crash (recover), whose earlier run's output may be out.
    const again = entry.state === TaskState.RUNNING;
    try {
      if (this.pastDeadline(spec)) {
        await this.finishTask(entry, { state: TaskState.EXPIRED, message: "the delivery deadline passed before the task could start", outputChunks: 0, outputTruncated: false }, undefined, { retry: true });
        return;
      }
      // This run's output is numbered after every chunk an earlier run may have handed out: those recorded, and those
      // kept in the outbox (sent again from there) whose record the crash cut off.
      const from = spec.idempotent && again ? Math.max(this.opts.ledger.outputSeq(taskId), this.outbox.topOutputSeq(taskId)) : 0;
      // Written before the process exists: after a crash this entry means "may have run".
      const started: LedgerEntry = { ...entry, state: TaskState.RUNNING, groups: undefined };
      await this.untilStored("recording a task's start", taskId, () => this.opts.ledger.put(started));
      entry = started;
      if (from > 0) await this.untilStored("recording a task's output seq", taskId, () => this.opts.ledger.putOutputSeq(taskId, from));
      this.report([{ kind: "status", status: this.status(spec, TaskState.RUNNING, from > 0 ? { message: rerunNote(from) } : {}) }]);
      const output = new RunOutput(from, spec.idempotent, {
        keep: (chunks) => this.keep(chunks.map((chunk) => ({ kind: "output" as const, chunk }))).catch(this.spoolFailed),
        send: (chunks) => this.send(chunks.map((chunk) => ({ kind: "output" as const, chunk }))),
        record: (seq) => this.untilStored("recording a task's output seq", taskId, () => this.opts.ledger.putOutputSeq(taskId, seq)),
      });
      this.outputs.set(taskId, output);
      if (this.opts.executor.startsInDaemon !== false) await spawnTurn();
      // The task learns who and what it is; these names cannot be overridden by the job.
      const env = { ...spec.env, REXMESH_HOST_ID: this.opts.hostId, REXMESH_TASK_ID: taskId, REXMESH_JOB_ID: spec.jobId };
      const digest = new OutputDigest();
      const outcome = await this.opts.executor.run({ ...spec, env }, {
        signal: abort.signal,
        flow: this.outputFlow,
        // Each step's process group is noted, so that a restarted daemon can end what a crash left running.
        onStart: (_pid, group) => {
          const noted: LedgerEntry = { ...entry, groups: [...(entry.groups ?? []), group] };
          entry = noted;
          this.opts.ledger.put(noted).catch((err) => this.opts.log.error("noting a process group failed", { task: taskId, err }));
        },
        onOutput: (stream, data, seq) => {
          // The executor hands over chunks it never writes to again: kept as they are, not copied.
          const chunk = create(OutputChunkSchema, { taskId, seq: BigInt(output.seqOf(seq)), stream, data });
          digest.add(chunk.data);
          output.add(chunk);
        },
      });
      // Every chunk goes out before the end that counts it.
      await output.settled();
      const ended =
        abort.signal.reason === DRAIN_OVERRUN && outcome.state === TaskState.CANCELLED
          ? { ...outcome, state: TaskState.INTERRUPTED, message: `${DRAIN_OVERRUN.message}: the task was ended (its process group killed) and is not run again` }
          : outcome;
      if (ended.restart) await this.handOver(entry, ended.restart);
      else await this.finishTask(entry, ended, digest, { from, retry: true });
    } finally {
      this.outputs.delete(taskId);
      this.running.delete(taskId);
      this.startWaiting();
      this.checkSettled();
    }
  }

  /**
   * An update step unpacked a new version: lets the other running tasks end
   * (taking no new ones), records the update in the ledger, leaves the
   * request for the supervisor and asks the process to restart. The task
   * stays RUNNING; the version that runs after the restart ends it.
   */
  private async handOver(entry: LedgerEntry, restart: NonNullable<TaskOutcome["restart"]>): Promise<void> {
    const taskId = entry.spec.taskId;
    const updates = this.opts.updates;
    const fail = (message: string) => this.finishTask(entry, { state: TaskState.FAILED, message, outputChunks: 0, outputTruncated: false }, undefined, { retry: true });
    if (!updates || !this.opts.onRestart) {
      updates?.abandoned();
      return fail("this daemon cannot restart itself into a new version");
    }
    this.draining = true;
    this.reportCredits();
    const others = this.running.size - 1;
    if (others > 0) this.report([{ kind: "status", status: this.status(entry.spec, TaskState.RUNNING, { message: `version ${restart.to} unpacked; waiting for ${others} running task(s) to end before the restart` }) }]);
    await this.whenSettled(() => this.running.size <= 1, UPDATE_QUIET_WAIT_MS);
    const at = this.opts.clock.now();
    const marked: LedgerEntry = { ...entry, update: { from: restart.from, to: restart.to, at } };
    try {
      await this.untilStored("recording an update", taskId, () => this.opts.ledger.put(marked));
      updates.request({ taskId, hostId: this.opts.hostId, from: restart.from, to: restart.to, at });
    } catch (err) {
      updates.abandoned();
      this.draining = false;
      this.startWaiting();
      await this.finishTask(this.opts.ledger.get(taskId) ?? entry, { state: TaskState.FAILED, message: `cannot hand the update over to the supervisor: ${err instanceof Error ? err.message : String(err)}`, outputChunks: 0, outputTruncated: false }, undefined, { retry: true });
      return;
    }
    this.report([{ kind: "status", status: this.status(entry.spec, TaskState.RUNNING, { message: `release ${restart.to} (${restart.digest}, key ${restart.keyId}) checked and unpacked; restarting into it` }) }]);
    this.opts.log.info("restarting into a new version", { task: taskId, from: restart.from, to: restart.to });
    this.opts.onRestart(`update ${restart.from} → ${restart.to} (task ${taskId})`);
  }

  /** Ends an update handed over before the restart, with what the supervisor decided (waiting for it while on trial). */
  private settleUpdate(entry: LedgerEntry, update: { from: string; to: string }): void {
    const taskId = entry.spec.taskId;
    const updates = this.opts.updates;
    void (async () => {
      const settled: Settled = updates ? await updates.settle(taskId, update, this.stopController.signal) : { ok: false, message: `the daemon restarted without update support; the update to ${update.to} is not known to have happened` };
      await this.finishTask(entry, { state: settled.ok ? TaskState.SUCCEEDED : TaskState.FAILED, message: settled.message, outputChunks: 0, outputTruncated: false }, undefined, { retry: true });
      updates?.forget(taskId);
    })().catch((err) => {
      if (!this.stopController.signal.aborted) this.opts.log.error("settling an update failed", { task: taskId, err });
    });
  }

  /**
   * Writes to the ledger or the outbox until the write is stored (see
   * STORE_RETRY); the store answers what is stored meanwhile. Rejects once
   * the daemon stops.
   */
  private async untilStored(what: string, taskId: string, write: () => Promise<void>): Promise<void> {
    let backoff: Backoff | undefined;
    for (;;) {
      try {
        await write();
        return;
      } catch (err) {
        if (this.stopController.signal.aborted) throw err;
        backoff ??= new Backoff(STORE_RETRY, this.opts.random);
        const inMs = backoff.next();
        this.opts.log.error(`${what} failed; trying again`, { task: taskId, inMs, err });
        await this.opts.clock.sleep(inMs, this.stopController.signal);
      }
    }
  }

  private async markReported(taskId: string): Promise<void> {
    const entry = this.opts.ledger.get(taskId);
    if (!entry?.final || entry.finalAcked) return;
    await this.opts.ledger.put({ ...entry, finalAcked: true });
  }

  /**
   * Records a task's end in the ledger, then reports it, signed with the
   * report key over its state and output (`digest`: the output it emitted;
   * absent: none; "unknown": the daemon cannot know it, after a crash).
   * `from`: the chunks before this run's (a run again after a crash); they
   * are counted, but the host does not know their bytes, so it signs no
   * digest. With `retry`, a write the store refuses is tried again (the
   * task's process has ended: its end must not be lost); without, it rejects.
   */
  private async finishTask(entry: LedgerEntry, outcome: TaskOutcome, digest?: OutputDigest | "unknown", opts: { from?: number; retry?: boolean } = {}): Promise<void> {
    const taskId = entry.spec.taskId;
    if (entry.final || this.opts.ledger.get(taskId)?.final) return;
    const from = opts.from ?? 0;
    const final = this.status(entry.spec, outcome.state, {
      exitCode: outcome.exitCode,
      signal: outcome.signal ?? "",
      message: from > 0 ? [outcome.message, rerunNote(from)].filter((m) => m !== "").join("; ") : outcome.message,
      outputChunks: BigInt(from + outcome.outputChunks),
      outputTruncated: outcome.outputTruncated,
    });
    if (digest !== "unknown" && from === 0) {
      const d = digest ?? new OutputDigest();
      final.outputBytes = BigInt(d.bytes);
      final.outputSha256 = d.digest();
    }
    // A MAC when the daemon holds a checked controller X25519 key, a signature otherwise (common/end-mac.ts).
    (this.reporter ?? this.opts.reporter?.())?.signEnd(final, this.opts.verifier.endKey());
    const ended: LedgerEntry = {
      state: outcome.state,
      final,
      endedAt: this.opts.clock.now(),
      // What identifies the task is all that is kept: its environment, stdin and steps may hold secrets.
      spec: create(TaskSpecSchema, { taskId, jobId: entry.spec.jobId, tenant: entry.spec.tenant, hostId: entry.spec.hostId, deliverBy: entry.spec.deliverBy, idempotent: entry.spec.idempotent }),
    };
    if (opts.retry) await this.untilStored("recording a task's end", taskId, () => this.opts.ledger.put(ended));
    else await this.opts.ledger.put(ended);
    if (!isTerminal(final.state)) throw new Error(`executor returned a non-terminal state ${final.state}`);
    this.report([{ kind: "status", status: final }]);
  }
}

/** Says which chunks of a task's output are this run's, for a task run again after a crash. */
function rerunNote(from: number): string {
  return `run again after the daemon stopped while it ran (the job is idempotent): output chunks 1-${from} are from the interrupted run, this run's output starts at chunk ${from + 1}`;
}
