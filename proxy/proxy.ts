import { create } from "@bufbuild/protobuf";
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import type { Clock, Timer } from "../common/clock.js";
import { Coalescer } from "../common/coalescer.js";
import { PermissionDeniedError, InvalidArgumentError } from "../common/errors.js";
import type { FrameLink } from "../common/frame-link.js";
import { Heartbeat } from "../common/heartbeat.js";
import type { Logger } from "../common/logger.js";
import { requireRole, type PeerIdentity } from "../certs/identity.js";
import { advances, isTerminal } from "../common/task-state.js";
import {
  AgentStreamResponseSchema,
  type AgentStreamRequest,
  type AgentStreamResponse,
} from "../gen/rexmesh/v1/agent_link_pb.js";
import type { HostFacts } from "../gen/rexmesh/v1/host_pb.js";
import type { BundlePayload } from "../gen/rexmesh/v1/bundle_pb.js";
import {
  HostPresenceSchema,
  ProxyStreamRequestSchema,
  ProxyStreamResponseSchema,
  ProxyLoadSchema,
  type ProxyLoad,
  type HostPresence,
  type ProxyStreamRequest,
  type ProxyStreamResponse,
} from "../gen/rexmesh/v1/proxy_link_pb.js";
import {
  OutputAckSchema,
  StatusAckSchema,
  TaskState,
  TaskStatusSchema,
  type OutputChunk,
  type TaskStatus,
} from "../gen/rexmesh/v1/task_pb.js";
import type { ProxyStore, QueuedTask, UpwardItem } from "./store.js";
import { specBytes } from "../common/backlog.js";
import { MAX_FRAME_BYTES } from "../common/coalescer.js";
import { isPingOnly, peekSpec } from "../common/task-signing.js";
import { DenySet } from "../common/deny-list.js";
import type { DenyList, SignedDenyList } from "../gen/rexmesh/v1/revocation_pb.js";

export type AgentLink = FrameLink<AgentStreamResponse, AgentStreamRequest>;
export type ControllerLink = FrameLink<ProxyStreamRequest, ProxyStreamResponse>;

export interface ProxyCoreOptions {
  name: string;
  region: string;
  clock: Clock;
  store: ProxyStore;
  log: Logger;
  /** Heartbeat interval on both links. Default 10 s. */
  heartbeatMs?: number;
  /** How often queued tasks are checked against their delivery deadline. Default 1 s. */
  sweepMs?: number;
  /** Verifies a signed deny-list (it must come from a controller of this mesh); returns its content. */
  openDenyList?: (signed: SignedDenyList) => DenyList;
}

/** Frames queued toward the controller above which the pump waits for the link to drain. */
const UPLINK_HIGH_FRAMES = 4;
const UPLINK_LOW_FRAMES = 2;

interface ControllerSession {
  link: ControllerLink;
  out: Coalescer<ProxyStreamRequest>;
  heartbeat: Heartbeat;
  /** Backlog position sent on this link so far; the next frame starts after it. */
  sentUpTo: number;
  pumping: boolean;
  waiting: boolean;
}

class HostSession {
  credits = 0;
  readonly out: Coalescer<AgentStreamResponse>;
  heartbeat?: Heartbeat;

  constructor(
    readonly hostId: string,
    readonly tenant: string,
    readonly facts: HostFacts | undefined,
    readonly since: number,
    readonly link: AgentLink,
  ) {
    this.out = new Coalescer(
      () => create(AgentStreamResponseSchema),
      (frame) => {
        this.heartbeat?.sent();
        link.send(frame);
      },
    );
  }
}

/**
 * The regional relay. It holds one stream per host and one to the
 * controller; tasks wait in its store until their daemon takes them (only
 * against the daemon's credits, oldest first), results wait in its backlog
 * until the controller acknowledges them. Either side may come and go.
 */
/** Hosts named in the hello itself; the others follow in ordinary frames. */
const HELLO_HOSTS = 1000;

/** About how many bytes a host presence takes in a frame (id, tenant, facts). */
function presenceBytes(p: HostPresence): number {
  let bytes = 64 + p.hostId.length + p.tenant.length;
  const f = p.facts;
  if (f) {
    bytes += f.os.length + f.osFamily.length + f.arch.length + f.kernel.length + f.hostname.length + f.daemonVersion.length;
    for (const s of [...f.addresses, ...f.tools]) bytes += s.length + 2;
  }
  return bytes;
}

export class ProxyCore {
  readonly name: string;
  readonly region: string;
  private readonly clock: Clock;
  readonly store: ProxyStore;
  private readonly log: Logger;
  private readonly heartbeatMs: number;
  private readonly hosts = new Map<string, HostSession>();
  private controller: ControllerSession | undefined;
  private sweepTimer: Timer | undefined;
  private readonly sweepMs: number;
  private stopped = false;
  /**
   * Cancels for tasks this proxy never received. The task may still arrive
   * (it was in flight on a stream that broke); it is then cancelled at once.
   */
  private readonly cancelledUnknown = new Set<string>();
  /** Identities refused here: hosts on it are disconnected and cannot come back. */
  private readonly deny = new DenySet();
  private readonly openDenyList: ((signed: SignedDenyList) => DenyList) | undefined;

  constructor(opts: ProxyCoreOptions) {
    this.name = opts.name;
    this.region = opts.region;
    this.clock = opts.clock;
    this.store = opts.store;
    this.log = opts.log;
    this.heartbeatMs = opts.heartbeatMs ?? 10_000;
    this.sweepMs = opts.sweepMs ?? 1000;
    this.openDenyList = opts.openDenyList;
    const stored = this.store.denyList();
    if (stored) void this.applyDenyList(stored);
    this.scheduleSweep();
  }

  get connectedHosts(): number {
    return this.hosts.size;
  }

  get controllerConnected(): boolean {
    return this.controller !== undefined;
  }

  // ---- the host side -------------------------------------------------------

  /** Serves one daemon's stream until it ends. */
  async serveHost(link: AgentLink, peer: PeerIdentity): Promise<void> {
    requireRole(peer, "host");
    if (this.deny.has(peer)) throw new PermissionDeniedError("this host's identity has been revoked");
    const iterator = link.incoming[Symbol.asyncIterator]();
    const first = await iterator.next();
    if (first.done) return;
    const hello = first.value.hello;
    if (!hello) throw new InvalidArgumentError("the first frame of a host stream must be a hello");
    if (hello.hostId !== peer.id) {
      throw new PermissionDeniedError(`the stream claims host ${JSON.stringify(hello.hostId)} but the certificate is for host ${JSON.stringify(peer.id)}`);
    }
    const session = new HostSession(peer.id, peer.scope, hello.facts, this.clock.now(), link);
    const previous = this.hosts.get(session.hostId);
    if (previous) previous.link.close(new Error("replaced by a newer stream of the same host"));
    this.hosts.set(session.hostId, session);
    const log = this.log.child({ host: session.hostId });
    session.heartbeat = new Heartbeat(
      this.clock,
      hello.heartbeatMs || this.heartbeatMs,
      () => link.send(create(AgentStreamResponseSchema)),
      () => link.close(new Error("host heartbeat lost")),
    );
    session.out.frame.welcome = { $typeName: "rexmesh.v1.AgentWelcome", proxy: this.name, region: this.region, heartbeatMs: this.heartbeatMs };
    // The keys the daemon verifies task signatures with (it checks their endorsement itself).
    session.out.frame.signingKeys.push(...this.store.signingKeys());
    log.info("host connected");
    this.reportPresence(session, true);
    try {
      // Tasks handed out on an earlier stream go first; the hello's credits then hand out new ones.
      this.resendHandedOut(session);
      await this.handleHostFrame(session, first.value);
      this.deliver(session);
      for (;;) {
        const next = await iterator.next();
        if (next.done) break;
        await this.handleHostFrame(session, next.value);
      }
    } finally {
      session.heartbeat.stop();
      session.out.flush();
      if (this.hosts.get(session.hostId) === session) {
        this.hosts.delete(session.hostId);
        this.reportPresence(session, false);
        log.info("host disconnected");
      }
    }
  }

  private reportPresence(session: HostSession, connected: boolean): void {
    const p = this.presence(session, connected);
    this.controller?.out.frameFor(presenceBytes(p)).hosts.push(p);
  }

  private presence(session: HostSession, connected: boolean): HostPresence {
    return create(HostPresenceSchema, {
      hostId: session.hostId,
      tenant: session.tenant,
      connected,
      since: timestampFromMs(connected ? session.since : this.clock.now()),
      facts: connected ? session.facts : undefined,
    });
  }

  private async handleHostFrame(session: HostSession, frame: AgentStreamRequest): Promise<void> {
    session.heartbeat?.received();
    if (frame.credits !== undefined) session.credits = frame.credits;
    const items: UpwardItem[] = [];
    const outputAcks = new Map<string, number>();
    for (const chunk of frame.output) {
      const task = this.ownTask(session, chunk.taskId);
      if (!task) {
        // Already finished and acknowledged upstream: a replay; acknowledge so the daemon stops sending it.
        outputAcks.set(chunk.taskId, Math.max(outputAcks.get(chunk.taskId) ?? 0, Number(chunk.seq)));
        continue;
      }
      if (Number(chunk.seq) === task.outputSeq + 1) {
        task.outputSeq++;
        items.push({ kind: "output", chunk });
      }
      outputAcks.set(chunk.taskId, task.outputSeq);
    }
    const statusAcks: TaskStatus[] = [];
    const changed = new Set<QueuedTask>();
    for (const status of frame.statuses) {
      const task = this.ownTask(session, status.taskId);
      // A daemon keeps no ping answer for an ack (daemon/agent.ts): none is sent.
      if (!task || !isPingOnly(task.spec)) statusAcks.push(status);
      if (!task || !advances(task.state, status.state)) continue;
      task.state = status.state;
      status.hostId = session.hostId;
      items.push({ kind: "status", status });
      changed.add(task);
    }
    if (items.length > 0) {
      // One commit for the whole frame: every write is issued, then awaited together.
      await Promise.all([this.store.pushUpward(items), ...[...changed].map((task) => this.store.putTask(task))]);
      this.sendUp(items);
    }
    for (const [taskId, seq] of outputAcks) session.out.frame.outputAcks.push(create(OutputAckSchema, { taskId, seq: BigInt(seq) }));
    for (const s of statusAcks) session.out.frame.statusAcks.push(create(StatusAckSchema, { taskId: s.taskId, state: s.state }));
    if (frame.credits !== undefined || changed.size > 0) this.deliver(session);
  }

  /** The proxy's record of a task, only if it belongs to this host: a host cannot report for another. */
  private ownTask(session: HostSession, taskId: string): QueuedTask | undefined {
    const task = this.store.getTask(taskId);
    if (!task) return undefined;
    if (task.spec.hostId !== session.hostId) {
      this.log.warn("host reported on a task of another host; dropped", { host: session.hostId, task: taskId });
      return undefined;
    }
    return task;
  }

  /** After a reconnect, tasks handed out before may not have reached the daemon: send them again (its ledger drops duplicates). */
  private resendHandedOut(session: HostSession): void {
    for (const task of this.store.tasksFor(session.hostId)) {
      if (task.state === TaskState.DISPATCHED) session.out.frameFor(specBytes(task.spec)).tasks.push(task.signed);
      if (task.cancelRequested && task.state >= TaskState.DISPATCHED && !isTerminal(task.state)) {
        session.out.frame.cancelTaskIds.push(task.spec.taskId);
      }
    }
  }

  /** Hands queued tasks to a host, oldest first, as far as its credits go. */
  private deliver(session: HostSession): void {
    if (session.credits <= 0) return;
    const items: UpwardItem[] = [];
    const now = this.clock.now();
    for (const task of this.store.tasksFor(session.hostId)) {
      if (session.credits <= 0) break;
      if (task.state !== TaskState.QUEUED || task.cancelRequested) continue;
      if (task.spec.deliverBy && timestampMs(task.spec.deliverBy) <= now) {
        items.push(this.finish(task, TaskState.EXPIRED, "the delivery deadline passed while the task waited at the proxy"));
        continue;
      }
      task.state = TaskState.DISPATCHED;
      session.credits--;
      session.out.frameFor(specBytes(task.spec)).tasks.push(task.signed);
      // A ping is answered within moments and is harmless to hand out again after a restart, so
      // its hand-over is neither stored nor reported: a third fewer writes and statuses per host
      // in a fleet-wide ping.
      if (!isPingOnly(task.spec)) items.push({ kind: "status", status: this.status(task, TaskState.DISPATCHED) });
    }
    if (items.length > 0) void this.persistUp(items);
  }

  private status(task: QueuedTask, state: TaskState, message = ""): TaskStatus {
    return create(TaskStatusSchema, {
      taskId: task.spec.taskId,
      hostId: task.spec.hostId,
      state,
      time: timestampFromMs(this.clock.now()),
      message,
      outputChunks: isTerminal(state) ? BigInt(task.outputSeq) : 0n,
    });
  }

  /** Ends a task at the proxy (it never reached the daemon). */
  private finish(task: QueuedTask, state: TaskState, message: string): UpwardItem {
    task.state = state;
    return { kind: "status", status: this.status(task, state, message) };
  }

  private async persistUp(items: UpwardItem[]): Promise<void> {
    try {
      const writes: Promise<void>[] = [this.store.pushUpward(items)];
      for (const item of items) {
        if (item.kind === "status") {
          const task = this.store.getTask(item.status.taskId);
          if (task) writes.push(this.store.putTask(task));
        }
      }
      await Promise.all(writes);
      this.sendUp(items);
    } catch (err) {
      this.log.error("storing results failed", { err });
    }
  }

  /**
   * New results are in the backlog: let the pump send them, once per turn of
   * the event loop. (Pumping after every host's frame read the backlog's
   * uncommitted tail again each time: quadratic when 17,000 hosts answer a
   * ping within a moment.)
   */
  private sendUp(_items: readonly UpwardItem[]): void {
    if (this.pumpScheduled) return;
    this.pumpScheduled = true;
    setImmediate(() => {
      this.pumpScheduled = false;
      this.pump();
    });
  }

  private pumpScheduled = false;

  /**
   * Sends results to the controller from the durable backlog, past what this
   * link already carried, while the link keeps up. When it is backed up the
   * pump waits for it to drain, so a slow controller link costs disk (the
   * backlog), never memory. A new link starts again from the beginning: that
   * is the replay after a reconnect.
   */
  private pump(): void {
    const c = this.controller;
    if (!c || c.pumping || c.waiting) return;
    c.pumping = true;
    try {
      while (this.controller === c && c.link.backlog < UPLINK_HIGH_FRAMES) {
        const batch = this.store.upwardAfter(c.sentUpTo, MAX_FRAME_BYTES);
        if (batch.length === 0) return;
        const frame = create(ProxyStreamRequestSchema);
        for (const { n, item } of batch) {
          if (item.kind === "output") frame.output.push(item.chunk);
          else frame.statuses.push(item.status);
          c.sentUpTo = n;
        }
        c.heartbeat.sent();
        c.link.send(frame);
      }
      if (this.controller === c) {
        c.waiting = true;
        void c.link.whenWritable(UPLINK_LOW_FRAMES).then(() => {
          c.waiting = false;
          this.pump();
        });
      }
    } finally {
      c.pumping = false;
    }
  }

  // ---- the controller side -------------------------------------------------

  /** Serves the stream to the controller until it ends. */
  async serveController(link: ControllerLink): Promise<void> {
    const out = new Coalescer(
      () => create(ProxyStreamRequestSchema),
      (frame) => {
        heartbeat.sent();
        link.send(frame);
      },
    );
    const heartbeat = new Heartbeat(
      this.clock,
      this.heartbeatMs,
      () => link.send(create(ProxyStreamRequestSchema)),
      () => link.close(new Error("controller heartbeat lost")),
    );
    const held = [...this.hosts.values()].map((s) => this.presence(s, true));
    link.send(
      create(ProxyStreamRequestSchema, {
        hello: {
          name: this.name,
          region: this.region,
          heartbeatMs: this.heartbeatMs,
          hosts: held.slice(0, HELLO_HOSTS),
        },
      }),
    );
    // The rest of the hosts follow in frames of bounded size (20,000 hosts with facts would pass the message limit).
    for (const p of held.slice(HELLO_HOSTS)) out.frameFor(presenceBytes(p)).hosts.push(p);
    const session: ControllerSession = { link, out, heartbeat, sentUpTo: 0, pumping: false, waiting: false };
    this.controller = session;
    // The proxy's load goes up at heartbeat pace: the controller shows it per proxy.
    let loadTimer: Timer | undefined;
    const reportLoad = () => {
      if (this.controller !== session) return;
      out.frame.load = this.load();
      loadTimer = this.clock.setTimeout(reportLoad, this.heartbeatMs);
    };
    reportLoad();
    // Everything the controller has not acknowledged goes again, in order.
    this.pump();
    this.log.info("controller link up");
    try {
      for await (const frame of link.incoming) {
        heartbeat.received();
        await this.handleControllerFrame(frame);
      }
    } finally {
      loadTimer?.cancel();
      heartbeat.stop();
      out.discard();
      if (this.controller === session) this.controller = undefined;
      this.log.info("controller link down");
    }
  }

  private async handleControllerFrame(frame: ProxyStreamResponse): Promise<void> {
    const items: UpwardItem[] = [];
    const touched = new Set<string>();
    const now = this.clock.now();
    // Writes are issued as the frame is read and awaited together: one commit per frame, not one per task.
    const writes: Promise<void>[] = [];
    if (frame.denyList) await this.applyDenyList(frame.denyList);
    if (frame.signingKeys.length > 0) {
      const fresh = frame.signingKeys.filter((k) => !this.store.signingKeys().some((have) => have.keyId === k.keyId));
      await this.store.addSigningKeys(fresh);
      for (const session of this.hosts.values()) session.out.frame.signingKeys.push(...fresh);
    }
    for (const signed of frame.tasks) {
      // Decoded only to route it; the daemon verifies the signature over these exact bytes.
      const spec = peekSpec(signed);
      if (!spec?.taskId || !spec.hostId) {
        this.log.warn("a task that cannot be decoded was dropped");
        continue;
      }
      const known = this.store.getTask(spec.taskId);
      if (known) {
        // A resend: the controller missed our ack. Report where the task is (not stored: it is a reminder).
        this.controller?.out.frame.statuses.push(this.status(known, known.state));
        continue;
      }
      const task: QueuedTask = { signed, spec, state: TaskState.QUEUED, cancelRequested: false, outputSeq: 0 };
      if (this.cancelledUnknown.delete(spec.taskId)) {
        task.cancelRequested = true;
        items.push(this.finish(task, TaskState.CANCELLED, "cancelled before delivery to the host"));
      } else if (spec.deliverBy && timestampMs(spec.deliverBy) <= now) {
        items.push(this.finish(task, TaskState.EXPIRED, "the delivery deadline passed before the task reached the proxy"));
      } else {
        items.push({ kind: "status", status: this.status(task, TaskState.QUEUED) });
      }
      writes.push(this.store.putTask(task));
      touched.add(spec.hostId);
    }
    for (const cancel of frame.cancels) {
      const task = this.store.getTask(cancel.taskId);
      if (!task) {
        // Never received here: it cannot run through this proxy any more.
        this.cancelledUnknown.add(cancel.taskId);
        if (this.cancelledUnknown.size > 100_000) this.cancelledUnknown.delete(this.cancelledUnknown.values().next().value!);
        items.push({
          kind: "status",
          status: create(TaskStatusSchema, { taskId: cancel.taskId, hostId: cancel.hostId, state: TaskState.CANCELLED, time: timestampFromMs(now), message: "cancelled before it reached the proxy" }),
        });
        continue;
      }
      if (isTerminal(task.state)) continue;
      task.cancelRequested = true;
      if (task.state === TaskState.QUEUED) {
        items.push(this.finish(task, TaskState.CANCELLED, "cancelled before delivery to the host"));
      } else {
        this.hosts.get(task.spec.hostId)?.out.frame.cancelTaskIds.push(task.spec.taskId);
      }
      writes.push(this.store.putTask(task));
    }
    if (items.length > 0) writes.push(this.store.pushUpward(items));
    for (const ack of frame.outputAcks) writes.push(this.store.ackOutput(ack.taskId, Number(ack.seq)));
    for (const ack of frame.statusAcks) {
      writes.push(this.store.ackStatus(ack.taskId, ack.state));
      if (isTerminal(ack.state)) writes.push(this.store.removeTask(ack.taskId));
    }
    await Promise.all(writes);
    if (items.length > 0) this.sendUp(items);
    for (const hostId of touched) {
      const session = this.hosts.get(hostId);
      if (session) this.deliver(session);
    }
  }

  /** Hosts held, tasks waiting and tasks running here now. */
  load(): ProxyLoad {
    let queued = 0;
    let running = 0;
    for (const t of this.store.allTasks()) {
      if (t.state === TaskState.QUEUED) queued++;
      else if (t.state === TaskState.RUNNING) running++;
    }
    return create(ProxyLoadSchema, { connectedHosts: this.hosts.size, queuedTasks: queued, runningTasks: running });
  }

  // ---- revocation -------------------------------------------------------------

  /**
   * Takes a newer signed deny-list: stores it (a restart keeps enforcing it)
   * and closes the streams of hosts it names at once.
   */
  private async applyDenyList(signed: SignedDenyList): Promise<void> {
    if (!this.openDenyList) return;
    let list: DenyList;
    try {
      list = this.openDenyList(signed);
    } catch (err) {
      this.log.warn("deny-list refused", { err });
      return;
    }
    if (!this.deny.update(list)) return;
    await this.store.setDenyList(signed);
    for (const session of this.hosts.values()) {
      if (this.deny.has({ role: "host", scope: session.tenant, id: session.hostId })) {
        this.log.warn("closing the stream of a revoked host", { host: session.hostId });
        session.link.close(new PermissionDeniedError("this host's identity has been revoked"));
      }
    }
  }

  // ---- bundles (sites with no link) -------------------------------------------

  /**
   * Takes a tasks bundle (already verified) exactly as if it had come over
   * the controller link: known tasks are dropped by id, so importing the same
   * bundle twice changes nothing.
   */
  async importTasks(payload: BundlePayload): Promise<{ added: number; known: number }> {
    if (payload.region !== this.region) throw new PermissionDeniedError(`this bundle is for region ${payload.region}; this proxy serves region ${this.region}`);
    const known = payload.tasks.filter((t) => this.store.getTask(peekSpec(t)?.taskId ?? "") !== undefined).length;
    await this.handleControllerFrame(
      create(ProxyStreamResponseSchema, { tasks: payload.tasks, cancels: payload.cancels, outputAcks: payload.outputAcks, statusAcks: payload.statusAcks, signingKeys: payload.signingKeys }),
    );
    return { added: payload.tasks.length - known, known };
  }

  /** Everything the controller has not acknowledged, and the hosts held now, for a results bundle. */
  resultsForBundle(): { statuses: TaskStatus[]; output: OutputChunk[]; hosts: HostPresence[] } {
    const statuses: TaskStatus[] = [];
    const output: OutputChunk[] = [];
    for (const item of this.store.upward()) {
      if (item.kind === "status") statuses.push(item.status);
      else output.push(item.chunk);
    }
    return { statuses, output, hosts: [...this.hosts.values()].map((s) => this.presence(s, true)) };
  }

  // ---- deadlines -----------------------------------------------------------

  private scheduleSweep(): void {
    if (this.stopped) return;
    this.sweepTimer = this.clock.setTimeout(() => {
      this.sweep();
      this.scheduleSweep();
    }, this.sweepMs);
  }

  /** Queued tasks whose deadline passed while their host was away will never run. */
  private sweep(): void {
    const now = this.clock.now();
    const items: UpwardItem[] = [];
    for (const task of this.store.allTasks()) {
      if (task.state === TaskState.QUEUED && task.spec.deliverBy && timestampMs(task.spec.deliverBy) <= now) {
        items.push(this.finish(task, TaskState.EXPIRED, "the delivery deadline passed while the host was not connected"));
      }
    }
    if (items.length > 0) void this.persistUp(items);
  }

  stop(): void {
    this.stopped = true;
    this.sweepTimer?.cancel();
    for (const s of this.hosts.values()) s.link.close();
    this.controller?.link.close();
  }
}

