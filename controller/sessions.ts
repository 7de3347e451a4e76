/**
 * Sessions at the controller (docs/sessions.md): it orders a session from
 * the proxy holding the host (links are dialled edge-inwards, so the proxy
 * dials back with the session's leg) and joins that leg to the client's
 * stream. Authorization and the audit record are controller/access.ts's.
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { formatIdentity, type PeerIdentity } from "../certs/identity.js";
import type { Clock, Timer } from "../common/clock.js";
import { DeadlineExceededError, FailedPreconditionError, InvalidArgumentError, NotFoundError, PermissionDeniedError, ResourceExhaustedError, UnavailableError } from "../common/errors.js";
import { AsyncQueue } from "../common/async-queue.js";
import type { FrameLink } from "../common/frame-link.js";
import type { IdGenerator } from "../common/ids.js";
import { LIMITS, preview } from "../common/limits.js";
import type { Logger } from "../common/logger.js";
import { framedPort, relaySession, type RelayEnd, type SessionEnd, type SessionPort } from "../common/session-port.js";
import { formatDuration } from "../common/duration.js";
import { Code, ConnectError } from "@connectrpc/connect";
import type { KeyCheck } from "../common/host-signing.js";
import { newKeyHalf, SealedPort, sessionSecret, type KeyHalf } from "../common/session-seal.js";
import { ConcurrencyLimit } from "../common/limits.js";
import { SessionResponseSchema, type SessionRequest, type SessionResponse } from "../gen/rexmesh/v1/controller_pb.js";
import type { TaskSigner } from "../common/task-signing.js";
import type { ProxySessionRequest, ProxySessionResponse } from "../gen/rexmesh/v1/proxy_link_pb.js";
import { ProxySessionResponseSchema } from "../gen/rexmesh/v1/proxy_link_pb.js";
import { SessionOrderSchema, SessionSpecSchema, type SessionChannel, type SessionFrame, type SessionKey, type SessionSpec } from "../gen/rexmesh/v1/session_pb.js";
import { SESSION_LIMIT_MAX_MS } from "./authz.js";
import type { HostRecord } from "./model.js";
import { Recording, type RecordingStore } from "./recordings.js";
import { describeSession } from "./access.js";
import type { ProxyPort } from "./router.js";

export type ProxySessionLink = FrameLink<ProxySessionResponse, ProxySessionRequest>;

/**
 * The proxy's leg of a session, joined: its port (not started), the frame
 * that came with its opening message, and the host's half of the key
 * agreement (absent when the host refused the order).
 */
export interface ProxyLeg {
  port: SessionPort<ProxySessionResponse, ProxySessionRequest>;
  first: SessionFrame | undefined;
  proxy: string;
  key: SessionKey | undefined;
}

/** What the broker needs of common/host-signing.ts's HostKeyVerifier: the host's signature over its half of a session's key. */
/** What the role that allowed a session says of it (absent: the controller's defaults). */
export interface RoleSessionLimits {
  idleMs?: number;
  maxMs?: number;
  /** End the session when its recording cannot be stored. */
  strictRecording?: boolean;
}

/** How long a session may be idle (no input) and last in all, in ms; 0: no limit. */
export interface SessionLimits {
  idleMs: number;
  maxMs: number;
}

/** A leg sealed end to end with the host, ready to relay. */
export interface SealedLeg {
  port: SealedPort;
  first: SessionFrame | undefined;
  proxy: string;
}

export interface SessionKeyCheck {
  checkSessionKey(key: SessionKey | undefined, host: PeerIdentity, sessionId: string, controllerKey: Uint8Array): KeyCheck;
}

export interface SessionBrokerOptions {
  clock: Clock;
  ids: IdGenerator;
  signer: TaskSigner;
  log: Logger;
  /** Told the bytes relayed, by direction (metrics). */
  meter?: (direction: "to_host" | "from_host", bytes: number) => void;
  /** Where sessions are recorded (controller/recordings.ts); absent: not recorded. */
  recordings?: { store: RecordingStore; maxBytes: number; room?: () => string | undefined };
  /** Checks the host's half of each session's key (its report key's signature). */
  hostKeys: SessionKeyCheck;
  /** The link of the proxy holding the host now, if it is connected. */
  portOf: (host: HostRecord) => ProxyPort | undefined;
  /** Whether an identity is on the deny-list now: a session whose operator or host is revoked ends (see revoked()). */
  isRevoked?: (identity: PeerIdentity) => boolean;
  /** A session's limits where the role that allowed it sets none (0: none): the controller's --session-idle and --session-max. */
  idleMs: number;
  maxMs: number;
  /** How long the proxy has to come back with the session's leg. Default LIMITS.sessionOpenMs. */
  openMs?: number;
  /** How long a session whose leg was cut waits for its host to resume it (0: a cut ends it). Default LIMITS.sessionResumeMs. */
  resumeMs?: number;
  keepaliveMs?: number;
}

interface Pending {
  hostId: string;
  proxy: string;
  timer: Timer;
  resolve: (leg: ProxyLeg) => void;
  reject: (err: Error) => void;
}

/** What the broker needs of controller/access.ts: the decision and the audit of each session. */
export interface SessionAccess {
  /** The host, and the limits of the role that allowed the session (absent: the broker's defaults). */
  openSession(caller: PeerIdentity, sessionId: string, hostId: string, spec: SessionSpec): Promise<{ host: HostRecord; limits: RoleSessionLimits }>;
  sessionEnded(caller: PeerIdentity, sessionId: string, hostId: string, outcome: string): Promise<void>;
}

export type ClientSessionLink = FrameLink<SessionResponse, SessionRequest>;

/** A session relayed now: who opened it, on which host, and its client's port (to end it). */
interface Active {
  kind: "session" | "forward";
  caller: PeerIdentity;
  host: PeerIdentity;
  client: SessionPort<SessionResponse, SessionRequest>;
  startedAt: number;
  what: string;
  /** The proxy it goes through now. */
  proxy: string;
  /** Its leg to the host, sealed: a resumed leg is attached to it. */
  leg: SealedPort;
  /** Operators watching, read-only (sessions join). */
  observers: Set<Observer>;
}

/** A piece of a session's output, as a watcher gets it. */
export interface ObservedOutput {
  atMs: number;
  channel: SessionChannel;
  conn: number;
  data: Uint8Array;
}

/** A read-only watcher of a session: its output as it passes; dropped when it falls behind. */
class Observer {
  readonly queue = new AsyncQueue<ObservedOutput>();
  private held = 0;
  ended = "";

  push(o: ObservedOutput): void {
    this.held += o.data.length;
    if (this.held > OBSERVER_HELD_BYTES) {
      this.queue.close(new ResourceExhaustedError(`the watcher fell ${OBSERVER_HELD_BYTES} bytes behind the session and was dropped`));
      return;
    }
    this.queue.push(o);
  }

  taken(o: ObservedOutput): void {
    this.held -= o.data.length;
  }
}

/** Output a watcher may be behind by before it is dropped (the session never waits for a watcher). */
const OBSERVER_HELD_BYTES = 4 << 20;

export class SessionBroker {
  private readonly pending = new Map<string, Pending>();
  private readonly active = new Map<string, Active>();
  private readonly perOperator = new ConcurrencyLimit(LIMITS.sessionsPerOperator, "sessions for one operator");
  private readonly openMs: number;
  readonly keepaliveMs: number;
  private readonly resumeMs: number;
  private readonly idleMs: number;
  private readonly maxMs: number;

  constructor(private readonly opts: SessionBrokerOptions) {
    this.openMs = opts.openMs ?? LIMITS.sessionOpenMs;
    this.idleMs = Math.min(opts.idleMs, SESSION_LIMIT_MAX_MS);
    this.maxMs = Math.min(opts.maxMs, SESSION_LIMIT_MAX_MS);
    this.keepaliveMs = opts.keepaliveMs ?? LIMITS.sessionKeepaliveMs;
    this.resumeMs = Math.min(opts.resumeMs ?? LIMITS.sessionResumeMs, SESSION_LIMIT_MAX_MS);
  }

  /**
   * Orders a session on an authorized host from the proxy that holds it,
   * and waits for the proxy's leg. UNAVAILABLE when the host is not
   * connected or does not join in time; the wait ends with `signal`.
   */
  async open(caller: PeerIdentity, host: HostRecord, spec: SessionSpec, sessionId: string, signal: AbortSignal, limits: SessionLimits): Promise<SealedLeg> {
    const port = host.connected ? this.opts.portOf(host) : undefined;
    if (!port?.openSession) throw new UnavailableError(`host ${host.id} is not connected: a session needs the host online`);
    const half = newKeyHalf();
    const order = create(SessionOrderSchema, {
      sessionId,
      hostId: host.id,
      tenant: host.tenant,
      spec,
      operator: formatIdentity(caller),
      notAfter: timestampFromMs(this.opts.clock.now() + this.openMs),
      keepaliveMs: this.keepaliveMs,
      controllerKey: half.publicKey,
      idleTimeoutMs: limits.idleMs,
      maxDurationMs: limits.maxMs,
      resumeWindowMs: this.resumeMs,
    });
    const leg = new Promise<ProxyLeg>((resolve, reject) => {
      const timer = this.opts.clock.setTimeout(() => {
        this.pending.delete(sessionId);
        reject(new UnavailableError(`host ${host.id} did not join the session within ${this.openMs / 1000} s (through proxy ${port.name})`));
      }, this.openMs);
      this.pending.set(sessionId, { hostId: host.id, proxy: port.name, timer, resolve, reject });
    });
    const onAbort = () => this.drop(sessionId, new DeadlineExceededError("the client went away before the session opened"));
    signal.addEventListener("abort", onAbort, { once: true });
    port.openSession(this.opts.signer.signSession(order));
    this.opts.log.debug("session ordered", { session: sessionId, host: host.id, proxy: port.name });
    let joined: ProxyLeg;
    try {
      joined = await leg;
    } finally {
      signal.removeEventListener("abort", onAbort);
    }
    return this.seal(joined, host, sessionId, half, order.controllerKey, signal);
  }

  /**
   * The session's key, from the host's half on the leg (signed with its
   * report key) and the controller's: the leg sealed end to end. A leg
   * without a key carries the host's refusal, raised as it came; a key whose
   * signature does not hold ends the leg, PERMISSION_DENIED.
   */
  private async seal(leg: ProxyLeg, host: HostRecord, sessionId: string, half: KeyHalf, controllerKey: Uint8Array, signal: AbortSignal): Promise<SealedLeg> {
    if (!leg.key) {
      // A refusal closes at once. A leg that says nothing more is ended: a proxy must not hold the client (and
      // its operator's share of sessions) by keeping a key-less leg alive.
      leg.port.start({ data: () => undefined }, leg.first);
      const giveUp = this.opts.clock.setTimeout(() => leg.port.end({ code: Code.DeadlineExceeded, message: `host ${host.id} answered the session without a key and without a refusal` }), LIMITS.linkHelloMs);
      const onAbort = () => leg.port.end({ code: Code.Canceled, message: "the client went away before the session opened" });
      signal.addEventListener("abort", onAbort, { once: true });
      if (signal.aborted) onAbort();
      const end = await leg.port.ended.finally(() => {
        giveUp.cancel();
        signal.removeEventListener("abort", onAbort);
      });
      if (end.code !== 0) throw new ConnectError(end.message, end.code);
      throw new PermissionDeniedError(`host ${host.id} answered the session without a key`);
    }
    const check = this.opts.hostKeys.checkSessionKey(leg.key, { role: "host", scope: host.tenant, id: host.id }, sessionId, controllerKey);
    let secret: Buffer | undefined;
    let refusal = check.ok ? undefined : `host ${host.id}'s key for the session does not hold: ${check.reason}`;
    if (!refusal) {
      try {
        secret = sessionSecret(half, leg.key.publicKey, sessionId, controllerKey, leg.key.publicKey);
      } catch (err) {
        refusal = `host ${host.id}'s key for the session is not usable: ${(err as Error).message}`;
      }
    }
    if (!secret) {
      this.opts.log.warn("session refused: the host's key does not hold", { session: sessionId, host: host.id, proxy: leg.proxy, reason: refusal });
      leg.port.start({ data: () => undefined }, leg.first);
      leg.port.end({ code: Code.PermissionDenied, message: refusal! });
      throw new PermissionDeniedError(refusal!);
    }
    const resume = {
      clock: this.opts.clock,
      // A daemon from before resume keeps nothing and never says what it opened: neither does this end then.
      windowMs: leg.key.resumes ? this.resumeMs : 0,
      onCut: (end: SessionEnd) => {
        const a = this.active.get(sessionId);
        this.opts.log.warn("session leg cut: waiting for the host to resume it", { session: sessionId, host: host.id, proxy: a?.proxy, reason: end.message });
        a?.client.sendNotice(`the session's leg through proxy ${a.proxy} was cut (${end.message}); waiting up to ${formatDuration(this.resumeMs)} for it to resume`);
      },
    };
    return { port: new SealedPort(leg.port, secret, "controller", resume), first: leg.first, proxy: leg.proxy };
  }

  /**
   * Serves a client's Session stream: its first message opens the session
   * (authorized and audited by `access`), the proxy's leg is ordered and
   * joined to it, and the end is audited with how it ended.
   */
  async serveClient(link: ClientSessionLink, caller: PeerIdentity, access: SessionAccess, signal: AbortSignal, kind: "session" | "forward" = "session"): Promise<void> {
    const client = framedPort(link, SessionResponseSchema, {
      clock: this.opts.clock,
      peer: "client",
      peerSends: "input",
      errorsAsStatus: true,
      keepaliveMs: this.keepaliveMs,
    });
    const opening = await client.opening(LIMITS.linkHelloMs);
    if (!opening) return;
    if (!opening.open) throw new InvalidArgumentError("the first message of a session must open it (open)");
    const { hostId } = opening.open;
    const spec = opening.open.spec ?? create(SessionSpecSchema);
    if (kind === "forward" && !spec.forward) throw new InvalidArgumentError("a port forward names its target (spec.forward)");
    if (kind === "session" && spec.forward) throw new InvalidArgumentError("a port forward is opened with Forward, not Session");
    const release = this.perOperator.acquire(formatIdentity(caller));
    try {
      const sessionId = this.opts.ids("s");
      const { host, limits: asked } = await access.openSession(caller, sessionId, hostId, spec);
      const limits = { idleMs: asked.idleMs ?? this.idleMs, maxMs: asked.maxMs ?? this.maxMs };
      let leg: SealedLeg;
      try {
        leg = await this.open(caller, host, spec, sessionId, signal, limits);
      } catch (err) {
        await access.sessionEnded(caller, sessionId, hostId, `not opened: ${err instanceof Error ? err.message : String(err)}`);
        throw err;
      }
      let recording: Recording | undefined;
      try {
        recording = await this.record(caller, host, leg, sessionId, kind, spec, asked.strictRecording ?? false);
      } catch (err) {
        await access.sessionEnded(caller, sessionId, hostId, `not started: ${err instanceof Error ? err.message : String(err)}`);
        throw err;
      }
      let endedByRecording: string | undefined;
      link.send(create(SessionResponseSchema, { started: { sessionId, hostId, proxy: leg.proxy, keepaliveMs: this.keepaliveMs } }));
      this.opts.log.info("session started", { session: sessionId, host: hostId, proxy: leg.proxy, operator: formatIdentity(caller) });
      recording?.onFailure((reason) => {
        this.opts.log.warn("session recording stopped", { session: sessionId, reason, strict: asked.strictRecording ?? false });
        if (!asked.strictRecording) return;
        endedByRecording = `${reason}; the role records sessions strictly, so the session is ended`;
        client.end({ code: Code.FailedPrecondition, message: endedByRecording });
      });
      const meter = this.opts.meter;
      const observers = new Set<Observer>();
      const startedAt = this.opts.clock.now();
      const relayed = relaySession(client, leg.port, {
        first: { client: opening.frame, host: leg.first },
        limits: { clock: this.opts.clock, ...limits, by: "the controller", outputIsActivity: kind === "forward" },
        tap: (direction, data, channel, conn) => {
          meter?.(direction, data.length);
          recording?.add(direction === "to_host", channel, conn, data);
          // Watchers see output only: input can be what a no-echo prompt hid (a password).
          if (direction === "from_host") for (const o of observers) o.push({ atMs: this.opts.clock.now() - startedAt, channel, conn, data });
        },
      });
      this.active.set(sessionId, { kind, caller, host: { role: "host", scope: host.tenant, id: host.id }, client, startedAt, what: describeSession(spec), proxy: leg.proxy, leg: leg.port, observers });
      const r = await relayed.finally(() => this.active.delete(sessionId));
      const outcome = endedByRecording ? `ended by its recording: FailedPrecondition: ${endedByRecording}` : describeEnd(r);
      for (const o of observers) {
        o.ended = outcome;
        o.queue.close();
      }
      this.opts.log.info("session ended", { session: sessionId, host: hostId, outcome });
      await recording?.finish(outcome);
      await access.sessionEnded(caller, sessionId, hostId, outcome);
    } finally {
      release();
    }
  }

  /**
   * Starts the session's recording, if sessions are recorded here. A
   * recording that cannot start ends a strict session before it starts;
   * otherwise the session goes on unrecorded (the summary says so).
   */
  private async record(caller: PeerIdentity, host: HostRecord, leg: SealedLeg, sessionId: string, kind: "session" | "forward", spec: SessionSpec, strict: boolean): Promise<Recording | undefined> {
    const r = this.opts.recordings;
    if (!r) return undefined;
    const recording = new Recording(
      { store: r.store, clock: this.opts.clock, log: this.opts.log, maxBytes: r.maxBytes, room: r.room },
      {
        id: sessionId,
        tenant: host.tenant,
        operator: formatIdentity(caller),
        hostId: host.id,
        proxy: leg.proxy,
        kind,
        what: describeSession(spec),
        startedAt: this.opts.clock.now(),
        bytesToHost: 0,
        bytesFromHost: 0,
        outcome: "",
        recording: "recording",
      },
    );
    try {
      await recording.start();
      return recording;
    } catch (err) {
      this.opts.log.error("a session's recording could not start", { session: sessionId, strict, err });
      if (!strict) return undefined;
      leg.port.start({ data: () => undefined });
      leg.port.end({ code: Code.FailedPrecondition, message: "the session's recording could not start" });
      throw new FailedPreconditionError("the session's recording cannot be stored, and the role records sessions strictly");
    }
  }

  /**
   * The deny-list changed: every session whose operator or host is on it
   * now ends, PERMISSION_DENIED (the host's process group with it).
   */
  revoked(): void {
    const isRevoked = this.opts.isRevoked;
    if (!isRevoked) return;
    for (const [id, a] of this.active) {
      const who = isRevoked(a.caller) ? `the certificate of ${formatIdentity(a.caller)} was revoked` : isRevoked(a.host) ? `host ${a.host.id} was revoked` : undefined;
      if (!who) continue;
      this.opts.log.info("session ended by a revocation", { session: id, reason: who });
      a.client.end({ code: Code.PermissionDenied, message: who });
    }
  }

  /**
   * Watches a session of `tenant` that runs now: its summary, then its
   * output until it ends (`ended()` says how). NOT_FOUND for one that is
   * not running here, or is another tenant's.
   */
  observe(tenant: string, sessionId: string): { info: { operator: string; hostId: string; kind: "session" | "forward"; what: string; proxy: string; startedAt: number }; output: AsyncIterable<ObservedOutput>; ended: () => string; stop: () => void } {
    const a = this.active.get(sessionId);
    if (!a || a.host.scope !== tenant) throw new NotFoundError(`no session ${preview(sessionId)} runs now`);
    if (a.observers.size >= LIMITS.sessionWatchers) throw new ResourceExhaustedError(`session ${sessionId} has ${LIMITS.sessionWatchers} watchers already`);
    const o = new Observer();
    a.observers.add(o);
    const queue = o.queue;
    return {
      info: { operator: formatIdentity(a.caller), hostId: a.host.id, kind: a.kind, what: a.what, proxy: a.proxy, startedAt: a.startedAt },
      output: {
        [Symbol.asyncIterator]: () => ({
          next: async () => {
            const r = await queue.next();
            if (!r.done) o.taken(r.value);
            return r;
          },
        }),
      },
      ended: () => o.ended,
      stop: () => {
        a.observers.delete(o);
        queue.close();
      },
    };
  }

  /** Sessions relayed now, by kind. */
  openByKind(): { session: number; forward: number } {
    const n = { session: 0, forward: 0 };
    for (const a of this.active.values()) n[a.kind]++;
    return n;
  }

  private drop(sessionId: string, err: Error): void {
    const p = this.pending.get(sessionId);
    if (!p) return;
    this.pending.delete(sessionId);
    p.timer.cancel();
    p.reject(err);
  }

  /**
   * Serves a proxy's leg of a session (ProxySession): its opening message
   * names an ordered session, ordered from this proxy; anything else is
   * refused. Resolves once the session is over on this leg.
   */
  async serveLeg(link: ProxySessionLink, peer: PeerIdentity): Promise<void> {
    const port = framedPort(link, ProxySessionResponseSchema, {
      clock: this.opts.clock,
      peer: `proxy ${peer.id}`,
      peerSends: "output",
      sealed: true,
      keepaliveMs: this.keepaliveMs,
    });
    const opening = await port.opening(LIMITS.linkHelloMs);
    if (!opening) return;
    if (opening.sessionId === "" || opening.sessionId.length > LIMITS.idChars) throw new InvalidArgumentError("a session leg must name its session");
    if (opening.resume) {
      await this.resumeLeg(link, port, opening, peer);
      return;
    }
    const p = this.pending.get(opening.sessionId);
    if (!p) throw new NotFoundError(`no session ${preview(opening.sessionId)} waits for its host here: it was never ordered, or gave up`);
    if (p.proxy !== peer.id) throw new PermissionDeniedError(`session ${opening.sessionId} was ordered from another proxy`);
    this.pending.delete(opening.sessionId);
    p.timer.cancel();
    p.resolve({ port, first: opening.frame, proxy: peer.id, key: opening.key });
    await port.ended;
  }

  /**
   * A leg that resumes a session whose leg was cut: the host's request is
   * checked (made with the session's key, newer than any taken), answered,
   * and the leg attached in place of the old one; each end then sends
   * again what the other has not opened. NOT_FOUND for a session not
   * running here (it ended, or this controller restarted since).
   */
  private async resumeLeg(link: ProxySessionLink, port: SessionPort<ProxySessionResponse, ProxySessionRequest>, opening: ProxySessionRequest, peer: PeerIdentity): Promise<void> {
    const sessionId = opening.sessionId;
    const a = this.active.get(sessionId);
    if (!a) throw new NotFoundError(`no session ${preview(sessionId)} runs here to resume: it has ended, or the controller restarted since`);
    const answer = a.leg.acceptResume(opening.resume!);
    link.send(create(ProxySessionResponseSchema, { resumed: answer }));
    const from = a.proxy;
    a.leg.resume(port, opening.resume!, opening.frame);
    a.proxy = peer.id;
    this.opts.log.info("session resumed", { session: sessionId, host: a.host.id, proxy: peer.id, before: from, attempt: answer.attempt });
    a.client.sendNotice(`the session resumed through proxy ${peer.id}`);
    await port.ended;
  }
}

/** How a relayed session ended, in words for the audit log. */
export function describeEnd(r: RelayEnd): string {
  if (r.end.code === 0) {
    if (r.exit?.code !== undefined) return `exited ${r.exit.code}`;
    if (r.exit?.signal) return `killed by ${r.exit.signal}`;
    return "ended";
  }
  const by = r.from === "client" ? "closed by the client" : r.from === "relay" ? "ended by its limits" : "ended by the host's side";
  return `${by}: ${Code[r.end.code]}: ${r.end.message}`;
}
