import type { RoleCore } from "../common/lifecycle.js";
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { Clock, Timer } from "../common/clock.js";
import { FailedPreconditionError, PermissionDeniedError, InvalidArgumentError, UnavailableError } from "../common/errors.js";
import type { FrameLink } from "../common/frame-link.js";
import { DEAD_AFTER_INTERVALS, heartbeatInterval, LinkSession } from "../common/link-session.js";
import { SilenceWatch } from "../common/silence-watch.js";
import type { Logger } from "../common/logger.js";
import { requireRole, type PeerIdentity } from "../certs/identity.js";
import { advances, isTerminal } from "../common/task-state.js";
import type { AgentStreamRequest, AgentStreamResponse } from "../gen/rexmesh/v1/agent_link_pb.js";
import type { HostFacts, HostReportKey } from "../gen/rexmesh/v1/host_pb.js";
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
  TaskState,
  TaskStatusSchema,
  type OutputChunk,
  type TaskStatus,
} from "../gen/rexmesh/v1/task_pb.js";
import { deliverByOf, type ProxyStore, type QueuedTask, type UpwardItem } from "./store.js";
import { TaskUndo } from "./task-undo.js";
import { specBytes } from "../common/backlog.js";
import { newAgentResponse, newTaskStatus } from "../common/agent-link-wire.js";
import { newProxyRequest } from "../common/proxy-link-wire.js";
import { EventAckSchema, type EventAck, type HostEvent } from "../gen/rexmesh/v1/event_pb.js";
import { MAX_FRAME_BYTES } from "../common/coalescer.js";
import { isPingOnly, peekSpec, SpecDecoder } from "../common/task-signing.js";
import { STATUS_RUNS, StatusRunBuilder } from "../common/status-runs.js";
import { DenySet } from "../common/deny-list.js";
import { screenControllerFrame, screenHostFrame, TAKEN_ON_TASKS_PER_HOST } from "../common/link-limits.js";
import type { DenyList, SignedDenyList } from "../gen/rexmesh/v1/revocation_pb.js";
import type { SignedSessionOrder } from "../gen/rexmesh/v1/session_pb.js";

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
  /** Tasks taken on from one host's reports and held at once (see reportedTask). Default TAKEN_ON_TASKS_PER_HOST. */
  maxTakenOnPerHost?: number;
  /** Told each round trip measured on the link to the controller, in seconds (the proxy's histogram); absent: none is measured. */
  controllerRoundTrip?: (seconds: number) => void;
  /** Takes the session orders the controller sends (proxy/session-relay.ts); absent: they are dropped. */
  onSessionOrder?: (order: SignedSessionOrder) => void;
  /**
   * Told why each host stream held here ended (the proxy's counter of host
   * disconnects by reason), and each second stream of a held host refused:
   * what a reconnect storm is made of.
   */
  onHostGone?: (reason: HostGoneReason) => void;
}

/**
 * Why a host's stream ended: `silent` (its connection showed no byte for three of its PING intervals), `heartbeat`
 * (no frame for three of its link heartbeats), `ended` (the stream ended without an error), `error` (it failed: a
 * frame refused, a store write failed, the stream reset or cancelled, its connection gone), `duplicate` (a second
 * stream refused while the first is live).
 */
export type HostGoneReason = "silent" | "heartbeat" | "ended" | "error" | "duplicate";

/** Frames queued toward the controller above which sendBacklogUp waits for the link to drain. */
const UPLINK_HIGH_FRAMES = 4;
const UPLINK_LOW_FRAMES = 2;
/** How long the controller has to answer the hello (TLS handshake included). */
const CONNECT_TIMEOUT_MS = 20_000;
/**
 * How long a task that ended here is remembered past its delivery deadline
 * (or from its end, when the deadline is not known), so that a replay of it
 * (a resend, a bundle imported again) is refused. Past the deadline a replay
 * could not run anyway: it expires on arrival.
 */
const MARK_MARGIN_MS = 3_600_000;
const MARK_UNKNOWN_DEADLINE_MS = 24 * 3_600_000;

interface ControllerSession {
  session: LinkSession<ProxyStreamRequest, ProxyStreamResponse>;
  link: ControllerLink;
  /** Backlog position sent on this link so far; the next frame starts after it. */
  sentUpTo: number;
  sending: boolean;
  waiting: boolean;
  /** The controller takes statuses in runs (its welcome said so); until it has answered, they go one by one. */
  statusRuns: boolean;
}

interface HostSession {
  hostId: string;
  tenant: string;
  facts: HostFacts | undefined;
  since: number;
  link: AgentLink;
  session: LinkSession<AgentStreamResponse, AgentStreamRequest>;
  /** Free slots the daemon last reported (absolute), less the tasks handed out since. */
  credits: number;
  /** How many credit reports came on this stream: a failed hand-over gives its credits back only if none came since. */
  creditReports: number;
  reportKey: HostReportKey | undefined;
  /** The host's proof of presence over the current controller link's nonce, with its salt. */
  proof: { proof: Uint8Array; salt: Uint8Array } | undefined;
  /** Tasks taken on from this host's reports and held now; counted once per frame that takes one on. */
  takenOn: number | undefined;
}

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

/**
 * The regional relay. It holds one stream per host and one to the
 * controller; tasks wait in its store until their daemon takes them (only
 * against the daemon's credits, oldest first), results wait in its backlog
 * until the controller acknowledges them. Either side may come and go.
 *
 * What it stores before it acknowledges (docs/delivery.md has the rules per
 * hop): a task from the controller, before its QUEUED goes up; a host's
 * statuses and output, and the highest output seq per task, before the
 * host is acknowledged. A host that failed over from another proxy brings
 * its tasks along: their reports are taken here like any other.
 */
export class ProxyCore implements RoleCore {
  readonly name: string;
  readonly region: string;
  private readonly clock: Clock;
  readonly store: ProxyStore;
  private readonly log: Logger;
  private readonly heartbeatMs: number;
  private readonly controllerRoundTrip: ((seconds: number) => void) | undefined;
  private readonly hosts = new Map<string, HostSession>();
  /** Tasks whose hand-over (DISPATCHED) is on its way to the store: they go to the host once it is stored, not before. */
  private readonly handing = new Set<string>();
  /** Decodes the specs of the tasks the controller sends, each job's part once (SpecEncoder's bytes). */
  private readonly specs = new SpecDecoder();
  private controller: ControllerSession | undefined;
  private sweepTimer: Timer | undefined;
  private readonly sweepMs: number;
  private stopped = false;
  /** Set by drain: new host streams are refused and no task is handed out. */
  private draining = false;
  /** While a drain waits: looks again whether it is done (after host frames, controller acks, disconnects). */
  private drainCheck: (() => void) | undefined;
  private sendUpScheduled = false;
  /** The controller's presence nonce for the current link: hosts prove their presence over it. */
  private nonce: Uint8Array | undefined;
  /** Identities refused here: hosts on it are disconnected and cannot come back. */
  private readonly deny = new DenySet();
  private readonly openDenyList: ((signed: SignedDenyList) => DenyList) | undefined;
  private readonly maxTakenOnPerHost: number;
  private readonly onSessionOrder: ((order: SignedSessionOrder) => void) | undefined;
  /** Hosts that PING (their hello's ping_ms): their connections, watched for silence in one sweep. */
  private readonly silence: SilenceWatch;
  private readonly onHostGone: ((reason: HostGoneReason) => void) | undefined;

  constructor(opts: ProxyCoreOptions) {
    this.name = opts.name;
    this.region = opts.region;
    this.clock = opts.clock;
    this.store = opts.store;
    this.log = opts.log;
    this.heartbeatMs = opts.heartbeatMs ?? 10_000;
    this.controllerRoundTrip = opts.controllerRoundTrip;
    this.sweepMs = opts.sweepMs ?? 1000;
    this.openDenyList = opts.openDenyList;
    this.maxTakenOnPerHost = opts.maxTakenOnPerHost ?? TAKEN_ON_TASKS_PER_HOST;
    this.onSessionOrder = opts.onSessionOrder;
    this.onHostGone = opts.onHostGone;
    this.silence = new SilenceWatch(this.clock, Math.max(50, Math.floor(this.heartbeatMs / 2)));
  }

  /** Enforces the stored deny-list and starts the deadline sweep. */
  start(): void {
    const stored = this.store.denyList();
    if (stored) this.applyDenyList(stored).catch((err) => this.log.error("applying the stored deny-list failed", { err }));
    this.scheduleSweep();
  }

  /**
   * Stops taking work and lets what is in flight end: a new host stream is
   * refused UNAVAILABLE (its daemon tries the next proxy of the region), no
   * task is handed to a host any more (tasks the controller sends meanwhile
   * are stored and wait), a host with nothing handed out here running is
   * let go at once (UNAVAILABLE: it fails over now, not at the stop), and
   * the other streams stay open until no task handed out here runs on a
   * connected host and the controller has acknowledged every result, or
   * graceMs is over. Nothing is lost either way: what did not end here is
   * in the store and the daemons' outboxes.
   */
  async drain(graceMs: number): Promise<void> {
    this.draining = true;
    for (const session of [...this.hosts.values()]) this.releaseIfIdle(session);
    if (this.drainedNow() || graceMs <= 0) return;
    await new Promise<void>((resolve) => {
      const timer = this.clock.setTimeout(() => finish(), graceMs);
      const finish = () => {
        timer.cancel();
        this.drainCheck = undefined;
        resolve();
      };
      // Looked at once per turn of the event loop, not per frame: a drain must not cost O(tasks) per heartbeat.
      let scheduled = false;
      this.drainCheck = () => {
        if (scheduled) return;
        scheduled = true;
        setImmediate(() => {
          scheduled = false;
          if (this.drainedNow()) finish();
        });
      };
    });
  }

  /** True once nothing handed out here runs on a connected host and no result waits for a connected controller. */
  private drainedNow(): boolean {
    if (this.controller && this.store.upwardSize() > 0) return false;
    for (const session of this.hosts.values()) if (this.runsHere(session.hostId)) return false;
    return true;
  }

  /** Whether a task handed out through this proxy has not ended on this host yet. */
  private runsHere(hostId: string): boolean {
    for (const task of this.store.tasksFor(hostId)) if (task.state >= TaskState.DISPATCHED && !isTerminal(task.state)) return true;
    return false;
  }

  /** While draining, lets a host go that has nothing running through this proxy, after what is queued for it (acks). */
  private releaseIfIdle(session: HostSession): void {
    if (!this.draining || this.hosts.get(session.hostId) !== session || this.runsHere(session.hostId)) return;
    session.session.out.flush();
    session.link.close(new UnavailableError(`proxy ${this.name} is stopping; connect to another proxy of region ${this.region}`));
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
    if (this.draining) throw new UnavailableError(`proxy ${this.name} is stopping; connect to another proxy of region ${this.region}`);
    const ls = new LinkSession<AgentStreamResponse, AgentStreamRequest>(link, { clock: this.clock, empty: newAgentResponse, peer: "host" });
    const first = await ls.first();
    if (!first) return;
    const hello = first.hello;
    if (!hello) throw new InvalidArgumentError("the first frame of a host stream must be a hello");
    if (hello.hostId !== peer.id) {
      throw new PermissionDeniedError(`the stream claims host ${JSON.stringify(hello.hostId)} but the certificate is for host ${JSON.stringify(peer.id)}`);
    }
    const session: HostSession = { hostId: peer.id, tenant: peer.scope, facts: hello.facts, since: this.clock.now(), link, session: ls, credits: 0, creditReports: 0, reportKey: hello.reportKey, proof: undefined, takenOn: undefined };
    // A live stream is never replaced by another one of the same host id: the second could be a stolen
    // key. A daemon that restarted while its old connection stayed half-open gets in once that one is
    // declared dead by its heartbeat (three intervals), or fails over to another proxy meanwhile.
    if (this.hosts.has(session.hostId)) {
      this.log.warn("a second stream of a host was refused: its first one is still live", { host: session.hostId });
      this.onHostGone?.("duplicate");
      throw new FailedPreconditionError(`host ${session.hostId} already holds a live stream at this proxy; another is refused until that one ends`);
    }
    this.hosts.set(session.hostId, session);
    ls.startHeartbeat(hello.heartbeatMs || this.heartbeatMs);
    // A host that PINGs is not asked back: its connection is dropped when its PINGs (or anything else) stop for three
    // of its intervals, noticed by one sweep over all hosts. A host that does not say it PINGs has the link heartbeat.
    let silent = false;
    const connection = link.connection;
    const unwatch =
      hello.pingMs > 0 && connection
        ? this.silence.watch(connection, DEAD_AFTER_INTERVALS * heartbeatInterval(hello.pingMs), () => {
            silent = true;
            link.close(new UnavailableError(`host silent: no byte from it for ${DEAD_AFTER_INTERVALS} of its PING intervals`));
            connection.destroy();
          })
        : undefined;
    ls.out.frame.welcome = { $typeName: "rexmesh.v1.AgentWelcome", proxy: this.name, region: this.region, heartbeatMs: this.heartbeatMs };
    // The keys the daemon verifies task signatures with (it checks their endorsement itself).
    ls.out.frame.signingKeys.push(...this.store.signingKeys(this.clock.now()));
    // The controller counts the host as held here once it proves it (its answer goes up as its presence).
    if (this.nonce) ls.out.frame.presenceNonce = this.nonce;
    // Not a child logger per host: one would live as long as the link, for two lines.
    this.log.info("host connected", { host: session.hostId });
    let why: unknown;
    try {
      // Tasks handed out on an earlier stream go first; the hello's credits then hand out new ones.
      this.resendHandedOut(session);
      await this.handleHostFrame(session, first);
      this.deliver(session);
      await ls.forEach(async (frame) => {
        await this.handleHostFrame(session, frame);
        if (!this.draining) return;
        this.releaseIfIdle(session);
        this.drainCheck?.();
      });
    } catch (err) {
      why = err;
      throw err;
    } finally {
      unwatch?.();
      ls.end("flush");
      if (this.hosts.get(session.hostId) === session) {
        this.hosts.delete(session.hostId);
        this.reportPresence(session, false);
        this.drainCheck?.();
        const reason: HostGoneReason = ls.lostHeartbeat ? "heartbeat" : silent ? "silent" : why ? "error" : "ended";
        this.onHostGone?.(reason);
        this.log.info("host disconnected", { host: session.hostId, reason, ...(why ? { err: why } : {}) });
      }
    }
  }

  /** Passes a session order to a host held here, on its stream; false when it holds none here now. */
  offerSession(hostId: string, order: SignedSessionOrder): boolean {
    const session = this.hosts.get(hostId);
    if (!session) return false;
    session.session.out.frameFor(order.order.length + 128).sessions.push(order);
    return true;
  }

  private reportPresence(session: HostSession, connected: boolean): void {
    // A host that has not proved its presence on this link was never reported held.
    if (connected && !session.proof) return;
    const p = this.presence(session, connected);
    this.controller?.session.out.frameFor(presenceBytes(p)).hosts.push(p);
  }

  private presence(session: HostSession, connected: boolean): HostPresence {
    return create(HostPresenceSchema, {
      hostId: session.hostId,
      tenant: session.tenant,
      connected,
      since: timestampFromMs(connected ? session.since : this.clock.now()),
      facts: connected ? session.facts : undefined,
      reportKey: connected ? session.reportKey : undefined,
      proof: connected ? session.proof?.proof : undefined,
      proofSalt: connected ? session.proof?.salt : undefined,
    });
  }

  /** A new controller link: every host is asked to prove its presence over its nonce. */
  private askForPresence(nonce: Uint8Array): void {
    this.nonce = nonce;
    for (const s of this.hosts.values()) {
      s.proof = undefined;
      s.session.out.frame.presenceNonce = nonce;
    }
  }

  /**
   * Takes a frame of a host's results: stores what is new (every chunk above
   * the highest seq held, every status that moves the task forward, and the
   * task records that count them) in one commit, then acknowledges it to the
   * host and lets it go up.
   */
  private async handleHostFrame(session: HostSession, frame: AgentStreamRequest): Promise<void> {
    screenHostFrame(frame).warn(this.log, "reports no daemon sends were dropped (not acknowledged)", { host: session.hostId });
    session.takenOn = undefined;
    if (frame.credits !== undefined) {
      session.credits = frame.credits;
      session.creditReports++;
    }
    if (frame.presenceProof.length > 0 && this.nonce && Buffer.from(frame.presenceNonce).equals(this.nonce)) {
      session.proof = { proof: frame.presenceProof, salt: frame.presenceSalt };
      this.reportPresence(session, true);
    }
    const items: UpwardItem[] = [];
    // Made when a frame has output (a ping's answer has none).
    let outputAcks: Map<string, number> | undefined;
    const changed = new Set<QueuedTask>();
    const undo = new TaskUndo();
    /** Tasks not taken on (maxTakenOnPerHost): their reports are neither taken nor acknowledged. */
    let refused: Set<string> | undefined;
    for (const chunk of frame.output) {
      outputAcks ??= new Map();
      const seq = Number(chunk.seq);
      const task = this.reportedTask(session, chunk.taskId, changed, undo);
      if (task === "refused") {
        (refused ??= new Set()).add(chunk.taskId);
        continue;
      }
      if (task) {
        // A host sends a task's chunks in order and forgets only what was acknowledged, so a
        // chunk above the highest held is new even after a gap (the rest went through another proxy).
        if (seq > task.outputSeq) {
          undo.touch(task);
          task.outputSeq = seq;
          chunk.hostId = session.hostId;
          items.push({ kind: "output", chunk });
          changed.add(task);
        }
        outputAcks.set(chunk.taskId, task.outputSeq);
      } else {
        // Ended and acknowledged upstream long ago: a replay. Acknowledged so the host stops sending it.
        outputAcks.set(chunk.taskId, Math.max(outputAcks.get(chunk.taskId) ?? 0, seq));
      }
    }
    const statusAcks: TaskStatus[] = [];
    for (const status of frame.statuses) {
      const task = this.reportedTask(session, status.taskId, changed, undo);
      if (task === "refused") {
        (refused ??= new Set()).add(status.taskId);
        continue;
      }
      // A daemon keeps no ping answer for an ack (daemon/agent.ts): none is sent.
      if (!task || !task.spec || !isPingOnly(task.spec)) statusAcks.push(status);
      if (!task) continue;
      // Only a proxy speaks for its own copy: what a host says is the host's.
      status.atProxy = false;
      status.hostId = session.hostId;
      if (task.endedHere ? status.state !== TaskState.UNSPECIFIED : advances(task.state, status.state)) {
        undo.touch(task);
        task.state = status.state;
        task.endedHere = false;
        // A ping's answer is held in memory as the ping is: a proxy that restarts has lost both, and the controller,
        // never told either, sends the ping again.
        items.push(task.volatile ? { kind: "status", status, volatile: true } : { kind: "status", status });
        changed.add(task);
      }
      // A cancel that came while the host had the task elsewhere: tell it now.
      if (task.cancelRequested && !isTerminal(status.state) && status.state >= TaskState.DELIVERED) this.tellCancel(session, task);
    }
    // A host's events (docs/triggers.md) are its own: one that names another host is dropped, never relayed.
    const eventAcks: EventAck[] = [];
    for (const event of frame.events) {
      if (event.hostId !== session.hostId || event.tenant !== session.tenant) {
        this.log.warn("host reported an event of another host; dropped", { host: session.hostId, claimed: `${event.tenant}/${event.hostId}` });
        continue;
      }
      items.push({ kind: "event", event });
      eventAcks.push(create(EventAckSchema, { hostId: event.hostId, eventId: event.id }));
    }
    if (refused) {
      this.log.warn("reports on tasks this proxy never held were refused: the host holds too many such tasks here", { host: session.hostId, tasks: refused.size, max: this.maxTakenOnPerHost });
    }
    if (items.length > 0 || changed.size > 0) {
      // One commit for the whole frame: every write is issued, then awaited together.
      const pending: (Promise<void> | undefined)[] = [items.length > 0 ? this.store.pushUpward(items) : undefined];
      for (const task of changed) pending.push(this.store.putTask(task));
      const writes = Promise.all(pending);
      undo.issued();
      try {
        await writes;
      } catch (err) {
        // Nothing of this frame is acknowledged (the stream ends with the error); its changes to the
        // task records are undone, so that the host's resend is taken as new and goes up.
        await undo.undo(this.store, (e, taskId) => this.log.error("undoing a task's change after a failed write failed", { task: taskId, err: e }));
        throw err;
      }
      if (items.length > 0) this.sendUpSoon();
      // A cancel that came before the task is now on its record (cancelRequested): the mark can go.
      for (const task of undo.created()) {
        if (this.store.markOf(task.id) === "cancelled") this.store.unmark(task.id).catch((err) => this.log.error("forgetting a task's cancel mark failed", { task: task.id, err }));
      }
    }
    // Only a frame with acks in it goes back: a ping's answer needs none, and an empty frame would cost
    // both ends a write, its TLS record and a read per host.
    if ((outputAcks && outputAcks.size > 0) || statusAcks.length > 0 || eventAcks.length > 0) {
      const reply = session.session.out.frame;
      for (const [taskId, seq] of outputAcks ?? []) reply.outputAcks.push({ $typeName: "rexmesh.v1.OutputAck", taskId, seq: BigInt(seq) });
      for (const s of statusAcks) reply.statusAcks.push({ $typeName: "rexmesh.v1.StatusAck", taskId: s.taskId, state: s.state, atProxy: false });
      reply.eventAcks.push(...eventAcks);
    }
    if (frame.credits !== undefined || changed.size > 0) this.deliver(session);
  }

  /**
   * The proxy's record of a task a host reports on. A task of another host
   * is refused. A task unknown here was handed to the host by another proxy
   * of the region before it failed over to this one: it is taken on, so its
   * output and status flow on. Only a task whose end was acknowledged here
   * is not (its repeats are acknowledged and dropped: undefined). Nor is
   * one beyond maxTakenOnPerHost ("refused": not acknowledged, so the host
   * sends it again on its next stream): a host cannot fill the proxy's
   * store with tasks of invented ids.
   */
  private reportedTask(session: HostSession, taskId: string, changed: Set<QueuedTask>, undo: TaskUndo): QueuedTask | "refused" | undefined {
    const task = this.store.getTask(taskId);
    if (task) {
      if (task.hostId === session.hostId) return task;
      this.log.warn("host reported on a task of another host; dropped", { host: session.hostId, task: taskId });
      return undefined;
    }
    const mark = this.store.markOf(taskId);
    if (mark === "done") return undefined;
    session.takenOn ??= this.store.tasksFor(session.hostId).filter((t) => !t.signed).length;
    if (session.takenOn >= this.maxTakenOnPerHost) return "refused";
    session.takenOn++;
    const taken: QueuedTask = { id: taskId, hostId: session.hostId, state: TaskState.DELIVERED, cancelRequested: mark === "cancelled", outputSeq: 0 };
    undo.taken(taken);
    // Indexed now (the frame's later items find it), stored with the frame's commit.
    this.store.putTask(taken).catch((err) => this.log.error("storing a task failed", { task: taskId, err }));
    changed.add(taken);
    this.log.info("taking on a task the host brought from another proxy", { host: session.hostId, task: taskId });
    return taken;
  }

  private tellCancel(session: HostSession, task: QueuedTask): void {
    const frame = session.session.out.frame;
    if (task.withdraw) frame.withdrawTaskIds.push(task.id);
    else frame.cancelTaskIds.push(task.id);
  }

  /** After a reconnect, tasks handed out before may not have reached the daemon: send them again (its ledger drops duplicates). */
  private resendHandedOut(session: HostSession): void {
    for (const task of this.store.tasksFor(session.hostId)) {
      if (task.state === TaskState.DISPATCHED && task.signed && task.spec && !this.handing.has(task.id)) session.session.out.frameFor(specBytes(task.spec)).tasks.push(task.signed);
      if (task.cancelRequested && task.state >= TaskState.DISPATCHED && !isTerminal(task.state)) this.tellCancel(session, task);
    }
  }

  /**
   * Hands queued tasks to a host, oldest first, as far as its credits go. A
   * task goes out once its DISPATCHED is stored: a proxy restarted before
   * that would hold it as QUEUED, hand it out again, and end its own copy
   * EXPIRED at the deadline while the host runs it.
   */
  private deliver(session: HostSession): void {
    if (session.credits <= 0 || this.draining) return;
    const items: UpwardItem[] = [];
    const changed: QueuedTask[] = [];
    const handed: QueuedTask[] = [];
    const undo = new TaskUndo();
    const now = this.clock.now();
    for (const task of this.store.tasksFor(session.hostId)) {
      if (session.credits <= 0) break;
      // A task whose hand-over write failed is QUEUED again (undone) while that write's undo is still stored: it waits
      // for the next sweep, so that no second hand-over of it is left unguarded when the first one's finishes.
      if (task.state !== TaskState.QUEUED || task.cancelRequested || !task.signed || !task.spec || this.handing.has(task.id)) continue;
      const deliverBy = deliverByOf(task);
      if (deliverBy !== undefined && deliverBy <= now) {
        undo.touch(task);
        items.push(this.endOwnCopy(task, TaskState.EXPIRED, "the delivery deadline passed while the task waited at the proxy"));
        changed.push(task);
        continue;
      }
      session.credits--;
      // A volatile task (a ping) is held in memory only: its hand-over is neither stored nor reported (it goes at once).
      if (task.volatile) {
        task.state = TaskState.DISPATCHED;
        session.session.out.frameFor(specBytes(task.spec)).tasks.push(task.signed);
        continue;
      }
      undo.touch(task);
      task.state = TaskState.DISPATCHED;
      items.push({ kind: "status", status: this.ownStatus(task, TaskState.DISPATCHED) });
      changed.push(task);
      handed.push(task);
    }
    if (items.length === 0) return;
    for (const task of handed) this.handing.add(task.id);
    const reports = session.creditReports;
    this.persistUp(items, changed, undo)
      .then(
        (stored) => {
          if (stored) this.handOver(session.hostId, handed);
          // Not handed over: the tasks wait again (undone; the sweep tries again), and the host's credits are its own
          // again unless it reported its free slots since (they are absolute: those would count them twice).
          else if (this.hosts.get(session.hostId) === session && session.creditReports === reports) session.credits += handed.length;
        },
        (err) => this.log.error("handing tasks over failed", { err }),
      )
      .finally(() => {
        for (const task of handed) this.handing.delete(task.id);
      });
  }

  /**
   * Tasks whose hand-over is stored go to the host on the stream it holds
   * now, which may be a newer one than they were handed out on (its
   * resendHandedOut left them to this); with none, resendHandedOut sends
   * them when it is back.
   */
  private handOver(hostId: string, tasks: readonly QueuedTask[]): void {
    const session = this.hosts.get(hostId);
    if (!session) return;
    for (const task of tasks) {
      if (task.state !== TaskState.DISPATCHED || this.store.getTask(task.id) !== task || !task.signed || !task.spec) continue;
      session.session.out.frameFor(specBytes(task.spec)).tasks.push(task.signed);
      // A cancel that came while the hand-over was stored went out before the task: it goes again after it.
      if (task.cancelRequested) this.tellCancel(session, task);
    }
  }

  /** A status the proxy itself decides about its copy of a task (at_proxy). */
  private ownStatus(task: QueuedTask, state: TaskState, message = ""): TaskStatus {
    // What create(TaskStatusSchema, { taskId, hostId, state, time, message, atProxy }) makes, keys in its order,
    // without its reflection (two per signed task: QUEUED and DISPATCHED).
    const s = newTaskStatus();
    s.taskId = task.id;
    s.state = state;
    s.message = message;
    s.hostId = task.hostId;
    s.atProxy = true;
    s.time = timestampFromMs(this.clock.now());
    return s;
  }

  /** Ends the proxy's own copy of a task (it never reached the host through this proxy). */
  private endOwnCopy(task: QueuedTask, state: TaskState, message: string): UpwardItem {
    task.state = state;
    task.endedHere = true;
    return { kind: "status", status: this.ownStatus(task, state, message) };
  }

  /**
   * Stores results and the task records they changed in one commit, then
   * lets them go up. Resolves to whether they were stored; when not, the
   * changes are undone.
   */
  private async persistUp(items: UpwardItem[], tasks: readonly QueuedTask[], undo: TaskUndo): Promise<boolean> {
    const writes = Promise.all([this.store.pushUpward(items), ...tasks.map((t) => this.store.putTask(t))]);
    undo.issued();
    try {
      await writes;
    } catch (err) {
      this.log.error("storing results failed", { err });
      await undo.undo(this.store, (e, taskId) => this.log.error("undoing a task's change after a failed write failed", { task: taskId, err: e }));
      return false;
    }
    this.sendUpSoon();
    return true;
  }

  /**
   * New results are in the backlog: let sendBacklogUp send them, once per turn of
   * the event loop. (Pumping after every host's frame read the backlog's
   * uncommitted tail again each time: quadratic when 17,000 hosts answer a
   * ping within a moment.)
   */
  private sendUpSoon(): void {
    if (this.sendUpScheduled) return;
    this.sendUpScheduled = true;
    setImmediate(() => {
      this.sendUpScheduled = false;
      this.sendBacklogUp();
    });
  }

  /**
   * Sends results to the controller from the durable backlog, past what this
   * link already carried, while the link keeps up. When it is backed up the
   * sending waits for it to drain, so a slow controller link costs disk (the
   * backlog), never memory. A new link starts again from the beginning: that
   * is the replay after a reconnect. Presence goes first, so that the
   * controller knows which hosts this proxy holds before their results.
   */
  private sendBacklogUp(): void {
    const c = this.controller;
    if (!c || c.sending || c.waiting) return;
    c.sending = true;
    try {
      c.session.out.flush();
      while (this.controller === c && c.link.backlog < UPLINK_HIGH_FRAMES) {
        const batch = this.store.upwardAfter(c.sentUpTo, MAX_FRAME_BYTES);
        if (batch.length === 0) return;
        const frame = newProxyRequest();
        const runs = c.statusRuns ? new StatusRunBuilder() : undefined;
        for (const { n, item } of batch) {
          if (item.kind === "output") frame.output.push(item.chunk);
          else if (item.kind === "event") frame.events.push(item.event);
          else if (runs) runs.add(item.status);
          else frame.statuses.push(item.status);
          c.sentUpTo = n;
        }
        if (runs) {
          frame.statusRuns = runs.runs;
          frame.statuses = runs.statuses;
        }
        c.link.send(frame);
      }
      if (this.controller === c) {
        c.waiting = true;
        c.link.whenWritable(UPLINK_LOW_FRAMES).then(
          () => {
            c.waiting = false;
            this.sendBacklogUp();
          },
          (err) => this.log.error("waiting for the controller link to drain failed", { err }),
        );
      }
    } finally {
      c.sending = false;
    }
  }

  // ---- the controller side -------------------------------------------------

  /**
   * Serves the stream to the controller until it ends. `up` is called once
   * the controller has answered the hello.
   */
  async serveController(link: ControllerLink, up?: () => void): Promise<void> {
    const roundTrip = this.controllerRoundTrip;
    const ls = new LinkSession<ProxyStreamRequest, ProxyStreamResponse>(link, {
      clock: this.clock,
      empty: newProxyRequest,
      peer: "controller",
      onRoundTrip: roundTrip && ((ms) => roundTrip(ms / 1000)),
    });
    // The hosts held follow as they prove their presence over this link's nonce (askForPresence).
    link.send(create(ProxyStreamRequestSchema, { hello: { name: this.name, region: this.region, heartbeatMs: this.heartbeatMs, features: [STATUS_RUNS] } }));
    const c: ControllerSession = { session: ls, link, sentUpTo: 0, sending: false, waiting: false, statusRuns: false };
    this.controller = c;
    // The proxy's load goes up at heartbeat pace: the controller shows it per proxy.
    let loadTimer: Timer | undefined;
    const reportLoad = () => {
      if (this.controller !== c) return;
      ls.out.frame.load = this.load();
      loadTimer = this.clock.setTimeout(reportLoad, this.heartbeatMs);
    };
    reportLoad();
    // Everything the controller has not acknowledged goes again, in order.
    this.sendBacklogUp();
    try {
      const first = await ls.first(CONNECT_TIMEOUT_MS);
      if (!first) return;
      ls.startHeartbeat(this.heartbeatMs);
      if (first.welcome) {
        c.statusRuns = first.welcome.features.includes(STATUS_RUNS);
        this.askForPresence(first.welcome.presenceNonce);
      }
      up?.();
      await this.handleControllerFrame(first);
      await ls.forEach(async (frame) => {
        await this.handleControllerFrame(frame);
        this.drainCheck?.();
      });
    } finally {
      loadTimer?.cancel();
      ls.end("discard");
      if (this.controller === c) {
        this.controller = undefined;
        this.nonce = undefined;
        this.drainCheck?.();
      }
    }
  }

  private async handleControllerFrame(frame: ProxyStreamResponse): Promise<void> {
    screenControllerFrame(frame).warn(this.log, "acknowledgements or cancels no controller sends were dropped");
    if (frame.replay && this.controller) {
      // Reports the controller held back (it did not yet know this proxy held their host) go again. Its
      // output acks never pass a chunk it held back until that chunk is stored, so they stay cumulative.
      this.controller.sentUpTo = 0;
      this.sendUpSoon();
    }
    const items: UpwardItem[] = [];
    const touched = new Set<string>();
    const changed = new Set<QueuedTask>();
    const now = this.clock.now();
    // Writes are issued as the frame is read and awaited together: one commit per frame, not one per task.
    const writes: Promise<unknown>[] = [];
    // Records change as the frame is read; if its commit fails they are put back (the link fails, the controller sends again).
    const undo = new TaskUndo();
    const unmarked: string[] = [];
    for (const order of frame.sessions) this.onSessionOrder?.(order);
    if (frame.denyList) await this.applyDenyList(frame.denyList);
    if (frame.signingKeys.length > 0) {
      const fresh = await this.store.addSigningKeys(frame.signingKeys, this.clock.now());
      for (const session of this.hosts.values()) session.session.out.frame.signingKeys.push(...fresh);
    }
    for (const signed of frame.tasks) {
      // Decoded only to route it (a job's part once); the daemon verifies the signature over these exact bytes.
      const spec = this.specs.peek(signed);
      if (!spec?.taskId || !spec.hostId) {
        this.log.warn("a task that cannot be decoded was dropped");
        continue;
      }
      const mark = this.store.markOf(spec.taskId);
      // A replay of a task that ended here (a resend, a bundle imported again) is not taken twice.
      if (mark === "done" || mark === "dropped") continue;
      const known = this.store.getTask(spec.taskId);
      if (known) {
        if (!known.signed) {
          // Taken on from the host's reports; now the task itself has come.
          undo.touch(known);
          known.signed = signed;
          known.spec = spec;
          changed.add(known);
        } else if (!isTerminal(known.state) && !known.volatile) {
          // A resend: the controller missed our QUEUED. A reminder of where the task is (not stored).
          // A volatile task has none: the controller must keep sending it to a restarted proxy.
          const reminder = known.state <= TaskState.DISPATCHED ? this.ownStatus(known, known.state) : create(TaskStatusSchema, { taskId: known.id, hostId: known.hostId, state: known.state, time: timestampFromMs(now) });
          this.controller?.session.out.frame.statuses.push(reminder);
        }
        continue;
      }
      const task: QueuedTask = { id: spec.taskId, hostId: spec.hostId, signed, spec, state: TaskState.QUEUED, cancelRequested: false, outputSeq: 0 };
      undo.added(task);
      const deliverBy = deliverByOf(task);
      if (mark === "cancelled") {
        // The mark goes once the cancelled copy is stored: if the commit fails, the resent task is cancelled again.
        unmarked.push(task.id);
        task.cancelRequested = true;
        items.push(this.endOwnCopy(task, TaskState.CANCELLED, "cancelled before delivery to the host"));
      } else if (deliverBy !== undefined && deliverBy <= now) {
        items.push(this.endOwnCopy(task, TaskState.EXPIRED, "the delivery deadline passed before the task reached the proxy"));
      } else if (isPingOnly(spec)) {
        // A ping is held in memory only and reported by its answer alone: no record, no QUEUED, no
        // acknowledgement to store (half of what a fleet-wide ping costs each hop). A proxy that
        // restarts forgets it, and the controller, never told it was queued here, sends it again.
        task.volatile = true;
      } else {
        items.push({ kind: "status", status: this.ownStatus(task, TaskState.QUEUED) });
      }
      changed.add(task);
      touched.add(task.hostId);
    }
    for (const cancel of frame.cancels) {
      const task = this.store.getTask(cancel.taskId);
      if (!task) {
        const mark = this.store.markOf(cancel.taskId);
        if (mark !== "done" && mark !== "dropped") {
          // Never received here: it cannot run through this proxy any more, and is cancelled if it comes.
          writes.push(this.store.mark(cancel.taskId, "cancelled", now + MARK_UNKNOWN_DEADLINE_MS));
        }
        items.push({
          kind: "status",
          status: create(TaskStatusSchema, { taskId: cancel.taskId, hostId: cancel.hostId, state: TaskState.CANCELLED, time: timestampFromMs(now), message: "cancelled before it reached the proxy", atProxy: true }),
        });
        // The host may run it all the same (it brought the task from another proxy and has not reported on it here):
        // if it is connected here it is told now (a daemon ignores a cancel of a task it does not have).
        const session = mark === "done" || mark === "dropped" ? undefined : this.hosts.get(cancel.hostId);
        if (session) (cancel.withdraw ? session.session.out.frame.withdrawTaskIds : session.session.out.frame.cancelTaskIds).push(cancel.taskId);
        continue;
      }
      if (isTerminal(task.state) && !task.endedHere) continue;
      undo.touch(task);
      const first = !task.cancelRequested;
      task.cancelRequested = true;
      // A withdrawal stays one only while every cancel asks no more.
      task.withdraw = (first || task.withdraw === true) && cancel.withdraw;
      changed.add(task);
      if (task.state === TaskState.QUEUED) {
        items.push(this.endOwnCopy(task, TaskState.CANCELLED, cancel.withdraw ? "withdrawn before delivery to the host" : "cancelled before delivery to the host"));
      } else {
        const session = this.hosts.get(task.hostId);
        if (session) this.tellCancel(session, task);
      }
    }
    for (const task of changed) writes.push(this.store.putTask(task));
    if (items.length > 0) writes.push(this.store.pushUpward(items));
    for (const ack of frame.outputAcks) writes.push(this.store.ackOutput(ack.taskId, Number(ack.seq)));
    for (const ack of frame.eventAcks) writes.push(this.store.ackEvent(ack.hostId, ack.eventId));
    for (const ack of frame.statusAcks) {
      writes.push(this.store.ackStatus(ack.taskId, ack.state, ack.atProxy));
      if (isTerminal(ack.state)) writes.push(this.settled(ack.taskId, ack.atProxy));
    }
    undo.issued();
    try {
      await Promise.all(writes);
    } catch (err) {
      await undo.undo(this.store, (e, taskId) => this.log.error("undoing a task's change after a failed write failed", { task: taskId, err: e }));
      throw err;
    }
    // A mark left by a failed removal is harmless: the task's own record answers a resend.
    await Promise.all(unmarked.map((id) => this.store.unmark(id).catch((err: unknown) => this.log.warn("removing a cancel mark failed", { task: id, err }))));
    if (items.length > 0) this.sendUpSoon();
    for (const hostId of touched) {
      const session = this.hosts.get(hostId);
      if (session) this.deliver(session);
    }
  }

  /**
   * The controller has an end of a task from here: the task is dropped, and
   * remembered long enough to refuse a replay of it. An end of the host's
   * own settles the task; the end of this proxy's copy does not stop the
   * host's later reports (it may have the task from another proxy).
   */
  private async settled(taskId: string, atProxy: boolean): Promise<void> {
    const task = this.store.getTask(taskId);
    if (!task) return;
    if (atProxy && !task.endedHere) return; // the host's reports since took over the record
    if (!atProxy && !isTerminal(task.state)) return;
    // Issued together, so one commit: a crash between a removal and its mark would let a replay of the task in again.
    const writes = [this.store.removeTask(taskId)];
    // A volatile task (a ping) leaves no mark: a replay of it only asks the host again.
    if (!task.volatile) {
      const deliverBy = deliverByOf(task);
      const until = deliverBy !== undefined ? deliverBy + MARK_MARGIN_MS : this.clock.now() + MARK_UNKNOWN_DEADLINE_MS;
      writes.push(this.store.mark(taskId, atProxy ? "dropped" : "done", until));
    }
    await Promise.all(writes);
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
   * the controller link: known tasks, and tasks that ended here, are dropped
   * by id, so importing the same bundle twice — even after its results were
   * acknowledged — changes nothing.
   */
  async importTasks(payload: BundlePayload): Promise<{ added: number; known: number }> {
    if (payload.region !== this.region) throw new PermissionDeniedError(`this bundle is for region ${payload.region}; this proxy serves region ${this.region}`);
    const isKnown = (id: string) => this.store.getTask(id) !== undefined || this.store.markOf(id) === "done" || this.store.markOf(id) === "dropped";
    const known = payload.tasks.filter((t) => isKnown(peekSpec(t)?.taskId ?? "")).length;
    await this.handleControllerFrame(
      create(ProxyStreamResponseSchema, { tasks: payload.tasks, cancels: payload.cancels, outputAcks: payload.outputAcks, statusAcks: payload.statusAcks, signingKeys: payload.signingKeys, eventAcks: payload.eventAcks }),
    );
    return { added: payload.tasks.length - known, known };
  }

  /** Everything the controller has not acknowledged, and the hosts held now, for a results bundle. */
  resultsForBundle(): { statuses: TaskStatus[]; output: OutputChunk[]; events: HostEvent[]; hosts: HostPresence[] } {
    const statuses: TaskStatus[] = [];
    const output: OutputChunk[] = [];
    const events: HostEvent[] = [];
    for (const item of this.store.upward()) {
      if (item.kind === "status") statuses.push(item.status);
      else if (item.kind === "event") events.push(item.event);
      else output.push(item.chunk);
    }
    // No nonce travels with a bundle: the hosts' report keys do (their results are checked against them).
    return { statuses, output, events, hosts: [...this.hosts.values()].map((s) => ({ ...this.presence(s, true), proof: new Uint8Array(), proofSalt: new Uint8Array() })) };
  }

  // ---- deadlines -----------------------------------------------------------

  private scheduleSweep(): void {
    if (this.stopped) return;
    this.sweepTimer = this.clock.setTimeout(() => {
      this.sweep();
      this.scheduleSweep();
    }, this.sweepMs);
  }

  /** Queued tasks whose deadline passed while their host was away will never run; marks past their time are forgotten. */
  private sweep(): void {
    const now = this.clock.now();
    const items: UpwardItem[] = [];
    const changed: QueuedTask[] = [];
    const undo = new TaskUndo();
    // Hosts with a task still to hand out: looked at below (the tasks are walked anyway, idle hosts are not).
    const waiting = new Set<string>();
    for (const task of this.store.allTasks()) {
      if (task.state !== TaskState.QUEUED) continue;
      const deliverBy = deliverByOf(task);
      if (deliverBy !== undefined && deliverBy <= now) {
        undo.touch(task);
        items.push(this.endOwnCopy(task, TaskState.EXPIRED, "the delivery deadline passed while the host was not connected"));
        changed.push(task);
      } else waiting.add(task.hostId);
    }
    // Not stored: the tasks are QUEUED again (undone) and the next sweep tries again.
    if (items.length > 0) this.persistUp(items, changed, undo).catch((err) => this.log.error("storing expired tasks failed", { err }));
    // Hand-overs whose write failed are QUEUED again: they go now to a host with free slots, not only at its next report.
    for (const hostId of waiting) {
      const session = this.hosts.get(hostId);
      if (session) this.deliver(session);
    }
    void this.store.pruneMarks(now).catch((err) => this.log.error("forgetting old task marks failed", { err }));
  }

  stop(): void {
    this.stopped = true;
    this.sweepTimer?.cancel();
    this.silence.stop();
    for (const s of this.hosts.values()) s.link.close();
    this.controller?.link.close();
  }
}

