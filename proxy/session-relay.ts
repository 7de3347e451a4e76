/**
 * Sessions at a proxy (docs/sessions.md): an order from the controller goes
 * to its host on the host's AgentStream, unchanged (the host checks the
 * controller's signature); the host dials back with the session's leg, and
 * only then does the proxy dial the controller with the other leg and relay
 * between the two within their credit windows. A host that is not here, or
 * does not dial back in time, is reported on a leg that closes at once.
 */
import { create } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import type { PeerIdentity } from "../certs/identity.js";
import type { Clock, Timer } from "../common/clock.js";
import { InvalidArgumentError, NotFoundError, PermissionDeniedError, ResourceExhaustedError, UnavailableError } from "../common/errors.js";
import type { FrameLink } from "../common/frame-link.js";
import { LIMITS, preview } from "../common/limits.js";
import type { Logger } from "../common/logger.js";
import { framedPort, relaySession, type SessionEnd, type SessionPort } from "../common/session-port.js";
import { keepaliveOf } from "../common/session-frames.js";
import { peekSessionOrder } from "../common/task-signing.js";
import { AgentSessionResponseSchema, type AgentSessionRequest, type AgentSessionResponse } from "../gen/rexmesh/v1/agent_link_pb.js";
import { ProxySessionRequestSchema, type ProxySessionRequest, type ProxySessionResponse } from "../gen/rexmesh/v1/proxy_link_pb.js";
import type { SessionFrame, SessionOrder, SignedSessionOrder } from "../gen/rexmesh/v1/session_pb.js";

export type HostSessionLink = FrameLink<AgentSessionResponse, AgentSessionRequest>;
export type ControllerSessionLink = FrameLink<ProxySessionRequest, ProxySessionResponse>;

export interface SessionRelayOptions {
  clock: Clock;
  log: Logger;
  /** This proxy's name, for messages. */
  name: string;
  /** Puts an order on the stream of a host held here; false when none is. */
  offerToHost: (hostId: string, order: SignedSessionOrder) => boolean;
  /** Opens a session leg to the controller. */
  dialController: () => ControllerSessionLink;
  /** Told the bytes relayed, by direction (metrics). */
  meter?: (direction: "to_host" | "from_host", bytes: number) => void;
  /** How long a host has to dial back, at most (the order's own expiry may be sooner). Default LIMITS.sessionOpenMs. */
  openMs?: number;
}

interface Waiting {
  hostId: string;
  keepaliveMs: number;
  /** The order's limits, held here too (0: none). */
  idleMs: number;
  maxMs: number;
  /** A port forward: its traffic either way counts against the idle timeout. */
  forward: boolean;
  timer: Timer;
}

/** How long an up leg waits, after it closed the session, for the controller to end the stream. */
const REPORT_LINGER_MS = 5_000;

export class SessionRelays {
  private readonly waiting = new Map<string, Waiting>();
  /** Resumed legs per host, from their first message until they end. */
  private readonly resumedLegs = new Map<string, number>();
  /** Sessions relayed now. */
  relaying = 0;
  private readonly openMs: number;

  constructor(private readonly opts: SessionRelayOptions) {
    this.openMs = opts.openMs ?? LIMITS.sessionOpenMs;
  }

  /** Sessions ordered here whose host has not dialled back yet. */
  get pending(): number {
    return this.waiting.size;
  }

  /** An order from the controller: to its host, or reported back at once when the host is not here. */
  order(signed: SignedSessionOrder): void {
    const order = peekSessionOrder(signed);
    if (!order || order.sessionId === "" || order.sessionId.length > LIMITS.idChars || order.hostId === "") {
      this.opts.log.warn("a session order that cannot be decoded was dropped");
      return;
    }
    if (this.waiting.has(order.sessionId)) return;
    const { sessionId, hostId } = order;
    if (!this.opts.offerToHost(hostId, signed)) {
      this.report(sessionId, { code: Code.Unavailable, message: `host ${hostId} is not connected to proxy ${this.opts.name}` });
      return;
    }
    const left = order.notAfter ? timestampMs(order.notAfter) - this.opts.clock.now() : this.openMs;
    const timer = this.opts.clock.setTimeout(() => {
      if (!this.waiting.delete(sessionId)) return;
      this.report(sessionId, { code: Code.Unavailable, message: `host ${hostId} did not join the session at proxy ${this.opts.name}` });
    }, Math.max(0, Math.min(left, this.openMs)));
    this.waiting.set(sessionId, { hostId, keepaliveMs: order.keepaliveMs, idleMs: order.idleTimeoutMs, maxMs: order.maxDurationMs, forward: order.spec?.forward !== undefined, timer });
    this.opts.log.debug("session order passed to host", { session: sessionId, host: hostId });
  }

  /** Tells the controller why a session cannot open here, on a leg that says only that. */
  private report(sessionId: string, end: SessionEnd): void {
    this.opts.log.info("session not opened", { session: sessionId, reason: end.message });
    const link = this.opts.dialController();
    link.send(create(ProxySessionRequestSchema, { sessionId }));
    const up = this.upPort(link);
    up.start({ data: () => undefined });
    up.end(end);
  }

  private upPort(link: ControllerSessionLink): SessionPort<ProxySessionRequest, ProxySessionResponse> {
    return framedPort(link, ProxySessionRequestSchema, {
      clock: this.opts.clock,
      peer: "controller",
      peerSends: "input",
      sealed: true,
      lingerMs: REPORT_LINGER_MS,
    });
  }

  /**
   * Serves a host's leg of a session (AgentSession): its first message
   * names a session ordered for this very host; then the controller's leg
   * is dialled and the two are relayed until either ends.
   */
  async serveHost(link: HostSessionLink, peer: PeerIdentity): Promise<void> {
    const host = framedPort(link, AgentSessionResponseSchema, {
      clock: this.opts.clock,
      peer: `host ${peer.id}`,
      peerSends: "output",
      sealed: true,
      // A host silent past the keep-alive bound is gone: its session ends then, it does not wait to resume.
      silenceIsCut: false,
    });
    const opening = await host.opening(LIMITS.linkHelloMs);
    if (!opening) return;
    const { sessionId } = opening;
    if (sessionId === "" || sessionId.length > LIMITS.idChars) throw new InvalidArgumentError("a session leg must name its session");
    if (opening.resume) {
      await this.serveResumed(link, host, opening, peer);
      return;
    }
    const w = this.waiting.get(sessionId);
    if (!w) throw new NotFoundError(`no session ${preview(sessionId)} waits for this host here: it was never ordered through this proxy, or gave up`);
    if (w.hostId !== peer.id) throw new PermissionDeniedError(`session ${sessionId} was ordered for another host`);
    this.waiting.delete(sessionId);
    w.timer.cancel();
    const upLink = this.opts.dialController();
    // The host's half of the session's key goes on as it came: the controller checks the host's signature over it.
    upLink.send(create(ProxySessionRequestSchema, { sessionId, key: opening.key }));
    const up = this.upPort(upLink);
    const log = this.opts.log.child({ session: sessionId, host: peer.id });
    log.info("session relayed");
    await this.relay(up, host, { first: { host: opening.frame }, ...w }, log);
  }

  /**
   * A host's leg that resumes a session whose leg was cut (docs/sessions.md,
   * "Resume"): this proxy may never have seen the session (it restarted, or
   * the host failed over to it), so the leg carries the session's order,
   * which must be this very host's. The host's request goes on to the
   * controller, which checks it; its answer comes back, and the two legs are
   * relayed as any.
   */
  private async serveResumed(link: HostSessionLink, host: SessionPort<AgentSessionResponse, AgentSessionRequest>, opening: AgentSessionRequest, peer: PeerIdentity): Promise<void> {
    const { sessionId } = opening;
    const order = opening.order && peekSessionOrder(opening.order);
    if (!order || order.sessionId !== sessionId) throw new InvalidArgumentError("a leg that resumes a session carries the session's order");
    if (order.hostId !== peer.id || order.tenant !== peer.scope) throw new PermissionDeniedError(`session ${sessionId} is another host's`);
    // A host cannot have this proxy open controller legs at will: no more resumed legs at once than sessions it may hold.
    const held = this.resumedLegs.get(peer.id) ?? 0;
    if (held >= LIMITS.sessionsPerHost) throw new ResourceExhaustedError(`host ${peer.id} has ${held} resumed session legs here already`);
    this.resumedLegs.set(peer.id, held + 1);
    try {
      await this.resumeThrough(link, host, opening, peer, order);
    } finally {
      const n = (this.resumedLegs.get(peer.id) ?? 1) - 1;
      if (n > 0) this.resumedLegs.set(peer.id, n);
      else this.resumedLegs.delete(peer.id);
    }
  }

  private async resumeThrough(link: HostSessionLink, host: SessionPort<AgentSessionResponse, AgentSessionRequest>, opening: AgentSessionRequest, peer: PeerIdentity, order: SessionOrder): Promise<void> {
    const { sessionId } = opening;
    const upLink = this.opts.dialController();
    upLink.send(create(ProxySessionRequestSchema, { sessionId, resume: opening.resume }));
    const up = this.upPort(upLink);
    let answer: ProxySessionResponse | undefined;
    try {
      answer = await up.opening(LIMITS.linkHelloMs);
    } finally {
      if (!answer?.resumed) upLink.close();
    }
    // The controller's refusal (the session is over, the request is not the host's) reached the host as its status.
    if (!answer?.resumed) throw new UnavailableError(`the controller did not answer the resume of session ${sessionId}`);
    link.send(create(AgentSessionResponseSchema, { resumed: answer.resumed }));
    const log = this.opts.log.child({ session: sessionId, host: peer.id });
    log.info("session resumed");
    await this.relay(up, host, { first: { client: answer.frame, host: opening.frame }, hostId: peer.id, keepaliveMs: order.keepaliveMs, idleMs: order.idleTimeoutMs, maxMs: order.maxDurationMs, forward: order.spec?.forward !== undefined }, log);
  }

  /** Relays a session's two legs until either ends, holding it to the order's limits; a cut on either leg is passed on as one. */
  private async relay(
    up: SessionPort<ProxySessionRequest, ProxySessionResponse>,
    host: SessionPort<AgentSessionResponse, AgentSessionRequest>,
    w: Omit<Waiting, "timer"> & { first: { client?: SessionFrame; host?: SessionFrame } },
    log: Logger,
  ): Promise<void> {
    this.relaying++;
    const r = await relaySession(up, host, {
      first: w.first,
      keepaliveMs: keepaliveOf(w.keepaliveMs),
      limits: { clock: this.opts.clock, idleMs: w.idleMs, maxMs: w.maxMs, by: `proxy ${this.opts.name}`, outputIsActivity: w.forward },
      tap: this.opts.meter && ((direction, data) => this.opts.meter!(direction, data.length)),
      passCuts: true,
    }).finally(() => this.relaying--);
    log.info(r.end.cut ? "session leg cut" : "session ended", { from: r.from, ...(r.end.code !== 0 ? { code: Code[r.end.code], reason: r.end.message } : {}) });
  }

  /** Stops waiting for hosts (the proxy stops). */
  stop(): void {
    for (const w of this.waiting.values()) w.timer.cancel();
    this.waiting.clear();
  }
}

