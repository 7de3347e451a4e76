/**
 * Sessions on the host (docs/sessions.md). A proxy passes on the
 * controller's session orders; the daemon opens one only when the
 * controller's signature holds over it, it names this host and tenant, it
 * has not expired and was not opened before — a proxy can delay or drop an
 * order, never make one up or replay it. The daemon then dials that proxy
 * with the session's leg, starts the process and joins the two within the
 * leg's credit window; when the leg ends, however it ends, the process
 * group is ended.
 */
import { create } from "@bufbuild/protobuf";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { Code } from "@connectrpc/connect";
import type { Clock, Timer } from "../common/clock.js";
import { InvalidArgumentError, RexmeshError, UnavailableError } from "../common/errors.js";
import type { FrameLink } from "../common/frame-link.js";
import { LIMITS } from "../common/limits.js";
import type { Logger } from "../common/logger.js";
import { codeOf } from "../common/rpc-errors.js";
import { checkSessionSpec, keepaliveOf } from "../common/session-frames.js";
import { ENDED_OK, endOf, framedPort, isCutCode, type SessionEnd } from "../common/session-port.js";
import { formatDuration } from "../common/duration.js";
import { peekSessionOrder, type TaskVerifier } from "../common/task-signing.js";
import { AgentSessionRequestSchema, type AgentSessionRequest, type AgentSessionResponse } from "../gen/rexmesh/v1/agent_link_pb.js";
import { SessionChannel, type SessionForward, type SessionKey, type SessionOrder, type SignedSessionOrder } from "../gen/rexmesh/v1/session_pb.js";
import { connect, type Socket } from "node:net";
import { ForwardMux } from "../common/session-forward.js";
import type { HostReporter } from "../common/host-signing.js";
import { newKeyHalf, SealedPort, sessionSecret } from "../common/session-seal.js";
import { sessionEnv, startSessionProcess, type SessionProcess } from "./session-process.js";
import { describeCleanup, endMarkedProcesses } from "./orphans.js";

export type ProxySessionLeg = FrameLink<AgentSessionRequest, AgentSessionResponse>;

export interface SessionHostOptions {
  hostId: string;
  tenant: string;
  clock: Clock;
  log: Logger;
  /** Checks the controller's signature on orders (the agent's verifier: it holds the endorsed keys). */
  verifier: TaskVerifier;
  /** Opens a session leg to the proxy at an address. */
  dial: (address: string) => ProxySessionLeg;
  /** Starts the session's process; injectable for tests. */
  start?: (order: SessionOrder) => SessionProcess;
  /** Time between SIGHUP and SIGKILL when a session ends with its process still running. Default 2 s. */
  killGraceMs?: number;
  /** How long after a failed try to resume a cut session the next one goes (when no new proxy connection comes first). Default 1 s. */
  resumeRetryMs?: number;
}

/** A session whose leg may be cut: what its host needs to dial a new one. */
interface Resumable {
  leg: SealedPort;
  signed: SignedSessionOrder;
  order: SessionOrder;
  log: Logger;
  /** The try to resume under way: where, and its leg. */
  trying: { address: string; link: ProxySessionLeg } | undefined;
  retry: Timer | undefined;
}

export class SessionHost {
  /** Session ids opened, until their order expires: an order is good once. */
  private readonly used = new Map<string, number>();
  /** Sessions open here: their process, once the controller started them. */
  private readonly open = new Map<string, SessionProcess | undefined>();
  private readonly start: (order: SessionOrder) => SessionProcess;
  private readonly killGraceMs: number;
  private readonly resumeRetryMs: number;
  /** Sessions open here whose leg can be resumed after a cut. */
  private readonly resumable = new Map<string, Resumable>();
  /** The proxy this host is connected to now (or was last): where a cut session's new leg is dialled. */
  private proxyAddress: string | undefined;

  constructor(private readonly opts: SessionHostOptions) {
    this.start = opts.start ?? ((order) => startSessionProcess(order.spec!, sessionEnv(order.spec!, { REXMESH_HOST_ID: opts.hostId, REXMESH_SESSION_ID: order.sessionId })));
    this.killGraceMs = opts.killGraceMs ?? 2000;
    this.resumeRetryMs = opts.resumeRetryMs ?? 1000;
  }

  /**
   * The host is connected to the proxy at `address` (again, or another):
   * cut sessions try to resume through it at once; a try still waiting on
   * another proxy is given up for this one.
   */
  connected(address: string): void {
    this.proxyAddress = address;
    for (const r of this.resumable.values()) {
      if (!r.leg.paused) continue;
      if (r.trying && r.trying.address !== address) r.trying.link.close(new UnavailableError(`the host moved to proxy ${address}`));
      else this.tryResume(r);
    }
  }

  /** Sessions open now. */
  get count(): number {
    return this.open.size;
  }

  /**
   * Orders a proxy passed on; each is answered on a leg dialled to that
   * proxy. `reporter`: the report key presented on the connection they came
   * by, which signs the host's half of each session's key (none: refused).
   */
  orders(signed: readonly SignedSessionOrder[], proxyAddress: string, reporter: HostReporter | undefined): void {
    this.proxyAddress = proxyAddress;
    for (const s of signed) this.accept(s, proxyAddress, reporter);
  }

  private accept(signed: SignedSessionOrder, address: string, reporter: HostReporter | undefined): void {
    const claimed = peekSessionOrder(signed);
    if (!claimed || claimed.sessionId === "" || claimed.sessionId.length > LIMITS.idChars || claimed.hostId !== this.opts.hostId) {
      // Not ours to answer: a leg for it would be refused anyway.
      this.opts.log.warn("a session order not for this host was dropped", { session: claimed?.sessionId.slice(0, LIMITS.idChars) });
      return;
    }
    const log = this.opts.log.child({ session: claimed.sessionId });
    let order: SessionOrder | undefined;
    let secret: Buffer | undefined;
    let key: SessionKey | undefined;
    let refusal: SessionEnd | undefined;
    try {
      order = this.check(signed);
      if (!reporter) throw new SessionRefused(Code.FailedPrecondition, "the host has no report key to sign its half of the session key");
      const half = newKeyHalf();
      secret = sessionSecret(half, order.controllerKey, order.sessionId, order.controllerKey, half.publicKey);
      key = reporter.signSessionKey(order.sessionId, order.controllerKey, half.publicKey);
      key.resumes = order.resumeWindowMs > 0;
    } catch (err) {
      // A signature that does not hold (TaskRejected) is a refusal too.
      const code = err instanceof SessionRefused ? err.code : codeOf(err);
      refusal = { code: code === Code.Internal ? Code.PermissionDenied : code, message: err instanceof Error ? err.message : String(err) };
    }
    const link = this.opts.dial(address);
    link.send(create(AgentSessionRequestSchema, { sessionId: claimed.sessionId, key }));
    // The leg is closed by the proxy, once it has what this side sent: a process that ends at once would otherwise
    // close the leg (and its channel) before the connection is even up, and the proxy would never see the session.
    const port = framedPort(link, AgentSessionRequestSchema, {
      clock: this.opts.clock,
      peer: "proxy",
      peerSends: "input",
      sealed: secret !== undefined,
      keepaliveMs: keepaliveOf(claimed.keepaliveMs),
      lingerMs: LEG_LINGER_MS,
    });
    if (!order || !secret) {
      log.warn("session refused", { reason: refusal?.message });
      port.start({ data: () => undefined });
      port.end(refusal ?? { code: Code.Internal, message: "the session could not start" });
      return;
    }
    this.open.set(order.sessionId, undefined);
    const sessionId = order.sessionId;
    const leg = new SealedPort(port, secret, "host", {
      clock: this.opts.clock,
      windowMs: order.resumeWindowMs,
      onCut: (end) => {
        log.warn("session leg cut: resuming it", { reason: end.message, within: formatDuration(order.resumeWindowMs) });
        const r = this.resumable.get(sessionId);
        if (r) this.tryResume(r);
      },
    });
    const r: Resumable = { leg, signed, order, log, trying: undefined, retry: undefined };
    this.resumable.set(sessionId, r);
    leg.ended
      .then(() => {
        r.retry?.cancel();
        this.resumable.delete(sessionId);
      })
      .catch(() => undefined);
    this.join(leg, order, log);
  }

  /**
   * Dials a new leg for a cut session through the proxy this host is
   * connected to (docs/sessions.md, "Resume"): the request, made with the
   * session's key, goes to the controller, whose answer says where to go on
   * from. A leg that fails on the way is tried again, at the next proxy
   * connection or after a second, until the session's resume window ends
   * it; a refusal (the session is over at the controller) ends it now.
   */
  private tryResume(r: Resumable): void {
    const address = this.proxyAddress;
    if (r.trying || !r.leg.paused || !address) return;
    r.retry?.cancel();
    r.retry = undefined;
    const sessionId = r.order.sessionId;
    const request = r.leg.resumeRequest();
    const link = this.opts.dial(address);
    r.trying = { address, link };
    link.send(create(AgentSessionRequestSchema, { sessionId, resume: request, order: r.signed }));
    const port = framedPort(link, AgentSessionRequestSchema, {
      clock: this.opts.clock,
      peer: "proxy",
      peerSends: "input",
      sealed: true,
      keepaliveMs: keepaliveOf(r.order.keepaliveMs),
      lingerMs: LEG_LINGER_MS,
    });
    const done = () => {
      if (r.trying?.link === link) r.trying = undefined;
    };
    const again = (why: string) => {
      link.close();
      r.log.info("session not resumed yet: trying again", { proxy: address, reason: why });
      if (!r.leg.paused) return;
      // Moved to another proxy meanwhile: try there now.
      if (this.proxyAddress !== address) queueMicrotask(() => this.tryResume(r));
      else r.retry = this.opts.clock.setTimeout(() => ((r.retry = undefined), this.tryResume(r)), this.resumeRetryMs);
    };
    port
      .opening(RESUME_ANSWER_MS)
      .then(
        (answer) => {
          done();
          if (!answer?.resumed) return again("the leg ended without an answer");
          try {
            r.leg.checkResumed(answer.resumed);
          } catch (err) {
            return again((err as Error).message);
          }
          r.leg.resume(port, answer.resumed, answer.frame);
          r.log.info("session resumed", { proxy: address, attempt: request.attempt });
        },
        (err: unknown) => {
          done();
          const end = endOf(err, "proxy");
          if (isCutCode(end.code) || end.code === Code.DeadlineExceeded) return again(end.message);
          // Refused: the session is over at the controller (or the leg is not this host's to resume).
          r.log.warn("session cannot resume", { reason: end.message });
          r.leg.end(end);
        },
      )
      .catch((err: unknown) => r.log.error("resuming the session failed", { err }));
  }

  /** The order, if it may be opened: signed, for this host and tenant, in time, new, within the limits. */
  private check(signed: SignedSessionOrder): SessionOrder {
    const order = this.opts.verifier.verifySession(signed);
    const now = this.opts.clock.now();
    for (const [id, until] of this.used) if (until <= now) this.used.delete(id);
    if (order.hostId !== this.opts.hostId || order.tenant !== this.opts.tenant) throw new SessionRefused(Code.PermissionDenied, "the session order is for another host");
    const notAfter = order.notAfter ? timestampMs(order.notAfter) : 0;
    if (notAfter <= now) throw new SessionRefused(Code.DeadlineExceeded, "the session order has expired");
    if (this.used.has(order.sessionId)) throw new SessionRefused(Code.PermissionDenied, "the session order was used before");
    if (this.open.size >= LIMITS.sessionsPerHost) throw new SessionRefused(Code.ResourceExhausted, `the host has ${LIMITS.sessionsPerHost} sessions open already`);
    if (!order.spec) throw new SessionRefused(Code.InvalidArgument, "the session order says nothing to run");
    checkSessionSpec(order.spec);
    this.used.set(order.sessionId, notAfter);
    return order;
  }

  /**
   * Joins the session's leg to its process, which starts only once the
   * controller's sealed start arrives (a proxy that never joins the
   * controller gets no process). Input is written and only then consumed
   * (granted again); output waits in the port for credit, and the process
   * is no longer read while a window's worth waits. Its exit goes after its
   * output; a leg that ends first ends the process group.
   */
  private join(leg: SealedPort, order: SessionOrder, log: Logger): void {
    if (order.spec!.forward) {
      this.joinForward(leg, order, order.spec!.forward, log);
      return;
    }
    const sessionId = order.sessionId;
    let proc: SessionProcess | undefined;
    let exited = false;
    let paused = false;
    const joinBy = this.startBy(leg, order);
    const startProcess = () => {
      joinBy.cancel();
      try {
        proc = this.start(order);
      } catch (err) {
        const refusal = { code: err instanceof RexmeshError ? codeOf(err) : Code.FailedPrecondition, message: err instanceof Error ? err.message : String(err) };
        log.warn("session refused", { reason: refusal.message });
        leg.end(refusal);
        return;
      }
      log.info("session started", { operator: order.operator, pid: proc.pid, tty: order.spec!.tty, program: order.spec!.argv[0] ?? "login shell" });
      this.open.set(sessionId, proc);
      const running = proc;
      running.onOutput((channel, data) => {
        leg.sendData(channel, data);
        if (!paused && leg.queuedBytes >= LIMITS.sessionWindowBytes) {
          paused = true;
          running.pauseOutput();
          leg
            .whenQueueBelow(LIMITS.sessionWindowBytes / 2)
            .then(() => {
              paused = false;
              running.resumeOutput();
            })
            .catch(() => undefined);
        }
      });
      running.exited
        .then((exit) => {
          exited = true;
          log.info("session process exited", exit.signal ? { signal: exit.signal } : { code: exit.code });
          leg.sendExit(exit);
          leg.end(ENDED_OK);
        })
        .catch(() => undefined);
    };
    // Input, resizes and signals come only after the start (the sealed port refuses them before).
    leg.start({
      start: startProcess,
      data: (channel, data) => {
        if (channel !== SessionChannel.STDIN) throw new InvalidArgumentError(`a session's process takes stdin only, not channel ${channel}`);
        proc?.write(data, () => leg.consumed(data.length));
      },
      resize: (size) => proc?.resize(size.cols, size.rows),
      signal: (name) => proc?.signal(name),
      eof: () => proc?.endInput(),
    });
    leg.ended
      .then((end) => {
        joinBy.cancel();
        this.open.delete(sessionId);
        if (!proc) return;
        if (!exited) {
          log.info("session ended before its process: ending the process group", { code: end.code === 0 ? "OK" : Code[end.code], reason: end.message });
          proc.kill(this.killGraceMs, this.opts.clock);
        }
        this.endLeftovers(sessionId, log);
      })
      .catch(() => undefined);
  }

  /** Ends a leg whose controller has not started it by the order's expiry: a proxy that never joined gets nothing. */
  private startBy(leg: SealedPort, order: SessionOrder): Timer {
    const notAfter = order.notAfter ? timestampMs(order.notAfter) : 0;
    return this.opts.clock.setTimeout(
      () => leg.end({ code: Code.DeadlineExceeded, message: "the controller did not start the session in time: its proxy never joined it" }),
      Math.max(0, notAfter - this.opts.clock.now()),
    );
  }

  /**
   * A port forward (docs/sessions.md): once started, each connection the
   * client opens is dialled to the order's target from this host; the
   * connections end with the session.
   */
  private joinForward(leg: SealedPort, order: SessionOrder, to: SessionForward, log: Logger): void {
    const joinBy = this.startBy(leg, order);
    let mux: ForwardMux | undefined;
    const started = () => {
      if (!mux) throw new InvalidArgumentError("connections before the session started");
      return mux.handlers();
    };
    leg.start({
      start: () => {
        joinBy.cancel();
        mux = new ForwardMux({ side: leg, log, dial: () => dialTarget(to) });
        log.info("port forward started", { operator: order.operator, to: `${to.host}:${to.port}` });
      },
      data: (channel, data, conn) => started().data(channel, data, conn),
      conn: (event) => started().conn!(event),
    });
    leg.ended
      .then((end) => {
        joinBy.cancel();
        this.open.delete(order.sessionId);
        log.info("port forward ended", { connections: mux?.opened ?? 0, code: end.code === 0 ? "OK" : Code[end.code], reason: end.message });
        mux?.close();
      })
      .catch(() => undefined);
  }

  /**
   * Nothing a session started outlives it: a job the shell put in a process
   * group of its own, or a child left behind by an exited leader, still
   * carries the session's id in its environment, and is ended with it.
   */
  private endLeftovers(sessionId: string, log: Logger, now = false): void {
    endMarkedProcesses(`REXMESH_SESSION_ID=${sessionId}`, [], this.opts.clock, this.killGraceMs, { now }).then(
      (c) => {
        if (c.killed.length > 0 || c.failed.length > 0) log.info("ended what the session left running", { what: describeCleanup(c) });
      },
      (err: unknown) => log.error("ending what the session left running failed", { err }),
    );
  }

  /** Ends every session's processes (the daemon stops). */
  stop(): void {
    for (const [sessionId, proc] of this.open) {
      if (!proc) continue;
      proc.kill(this.killGraceMs, this.opts.clock);
      // SIGTERM before this returns: the daemon exits next and would not wait for a shared scan.
      this.endLeftovers(sessionId, this.opts.log, true);
    }
    this.open.clear();
  }
}

/** How long a forwarded connection may take to connect to its target before it is reset. */
const FORWARD_CONNECT_MS = 10_000;

/** A forwarded connection to its target: half-closes pass through; one that does not connect in time fails with why. */
function dialTarget(to: SessionForward): Socket {
  const socket = connect({ host: to.host, port: to.port, allowHalfOpen: true });
  socket.setTimeout(FORWARD_CONNECT_MS, () => socket.destroy(new Error(`connecting to ${to.host}:${to.port} timed out after ${FORWARD_CONNECT_MS / 1000} s`)));
  socket.once("connect", () => socket.setTimeout(0));
  return socket;
}

/** How long the host waits for the controller's answer to a resume (it comes at once from a controller that has the session). */
const RESUME_ANSWER_MS = 5_000;

/** How long a leg that ended here waits for the proxy to end its stream before it closes it. */
const LEG_LINGER_MS = 5_000;

/** A session order the host will not open, with the code the operator sees. */
class SessionRefused extends RexmeshError {
  constructor(
    readonly code: Code,
    message: string,
  ) {
    super(message);
  }
}
