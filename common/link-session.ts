import type { Clock } from "./clock.js";
import { Coalescer } from "./coalescer.js";
import { DeadlineExceededError, UnavailableError } from "./errors.js";
import type { FrameLink } from "./frame-link.js";
import { Heartbeat } from "./heartbeat.js";
import { LIMITS } from "./limits.js";

/** Intervals after which a link's peer counts as gone. */
export const DEAD_AFTER_INTERVALS = 3;

/**
 * A heartbeat interval held within [LIMITS.heartbeatMinMs,
 * LIMITS.heartbeatMaxMs]: a hello may ask for any uint32, and neither an
 * empty frame every millisecond nor a peer that may stay silent for weeks
 * is a link. 0 (not given) is the caller's to replace before this.
 */
export function heartbeatInterval(ms: number): number {
  return Math.min(LIMITS.heartbeatMaxMs, Math.max(LIMITS.heartbeatMinMs, ms));
}

function inWords(ms: number): string {
  return ms % 1000 === 0 ? `${ms / 1000} s` : `${ms} ms`;
}

/** What every link frame carries for measuring round trips (see LinkSession). */
export interface RoundTripFields {
  ping: number;
  pong: number;
}

export interface LinkSessionOptions<Out> {
  clock: Clock;
  /** A new empty frame: what the coalescer fills, and the heartbeat. */
  empty: () => Out;
  /** What the peer is called in the error when it falls silent ("proxy", "host", ...). */
  peer: string;
  /** Called after each coalesced frame is queued for writing (flow control looks at the link's backlog then). */
  afterSend?: () => void;
  /** Called with each coalesced frame just before it is written (the controller signs the frame's tasks together then). */
  beforeSend?: (frame: Out) => void;
  /**
   * Measures the link's round trip: this side puts a new ping in a frame
   * once per heartbeat interval and is told, in milliseconds, when the
   * peer's pong for it comes back. The dialling side sets it; every side
   * answers pings.
   */
  onRoundTrip?: (ms: number) => void;
}

/**
 * One side of one of the mesh's long-lived streams (AgentLink at the daemon
 * and the proxy, ProxyLink at the proxy and the controller): every link
 * batches what it sends into one frame per turn of the event loop, keeps
 * itself alive with heartbeats in both directions, and reads the peer's
 * frames strictly in order, one at a time, so that a frame's writes are
 * issued before the next frame is looked at.
 *
 * Both sides start their heartbeat once the peer's first frame arrived
 * (the accepting side may take the interval the hello asks for, within
 * bounds); until then the dialling side waits at most a connect timeout,
 * so that a slow TLS handshake on a busy machine is not mistaken for a
 * dead peer, and the accepting side at most LIMITS.linkHelloMs, so that a
 * peer that opens streams and says nothing cannot hold them.
 */
export class LinkSession<Out extends RoundTripFields, In extends RoundTripFields> {
  readonly out: Coalescer<Out>;
  private heartbeat: Heartbeat | undefined;
  private readonly iterator: AsyncIterator<In>;
  private readonly opts: LinkSessionOptions<Out>;
  /** Set when this side closed the link because the peer fell silent. */
  lostHeartbeat = false;
  /** The ping awaiting its pong, and when it was queued. */
  private ping: { id: number; at: number } | undefined;
  private lastPingAt = Number.NEGATIVE_INFINITY;
  private pings = 0;

  constructor(
    readonly link: FrameLink<Out, In>,
    opts: LinkSessionOptions<Out>,
  ) {
    this.opts = opts;
    this.iterator = link.incoming[Symbol.asyncIterator]();
    this.out = new Coalescer(opts.empty, (frame) => {
      this.heartbeat?.sent();
      opts.beforeSend?.(frame);
      link.send(frame);
      opts.afterSend?.();
    });
  }

  /**
   * Sends an empty frame after an interval of our silence, and declares the
   * peer dead after three intervals without a frame: the link is closed
   * with UNAVAILABLE (the peer, or the way to it, is gone; it may retry).
   * The interval is `intervalMs` held within {@link heartbeatInterval}'s
   * bounds, whoever chose it. With onRoundTrip, a ping goes out once per
   * interval, busy or idle; an idle link's ping frame is its heartbeat, and
   * the peer's pong its own, so measuring adds no frames to an idle link.
   */
  startHeartbeat(intervalMs: number): void {
    this.heartbeat?.stop();
    const interval = heartbeatInterval(intervalMs);
    this.heartbeat = new Heartbeat(
      this.opts.clock,
      interval,
      () => this.link.send(this.opts.empty()),
      () => {
        this.lostHeartbeat = true;
        this.link.close(new UnavailableError(`${this.opts.peer} heartbeat lost: no frame for ${inWords(interval * DEAD_AFTER_INTERVALS)}`));
      },
      DEAD_AFTER_INTERVALS,
      this.opts.onRoundTrip ? (now) => this.pingIfDue(now, interval) : undefined,
    );
  }

  /** Queues a new ping once an interval has passed since the last one; true when it did. */
  private pingIfDue(now: number, intervalMs: number): boolean {
    if (now - this.lastPingAt < intervalMs) return false;
    // 1 to 2^32-1: 0 means no ping on the wire.
    this.pings = (this.pings % 0xffffffff) + 1;
    this.ping = { id: this.pings, at: now };
    this.lastPingAt = now;
    this.out.frame.ping = this.pings;
    return true;
  }

  /** Answers the peer's ping, and takes the pong of ours. */
  private roundTrip(frame: In): void {
    if (frame.ping !== 0) {
      this.out.frame.pong = frame.ping;
      this.heartbeat?.pinged();
    }
    if (frame.pong !== 0 && this.ping?.id === frame.pong) {
      this.opts.onRoundTrip?.(this.opts.clock.now() - this.ping.at);
      this.ping = undefined;
    }
  }

  /**
   * The peer's first frame (its hello or welcome), or undefined if the
   * stream ended before one. A peer that has sent none within `timeoutMs`
   * is given up on: the link is closed with DEADLINE_EXCEEDED. The accepting
   * side waits {@link LIMITS.linkHelloMs} for a hello; a dialling side
   * passes its connect timeout.
   */
  async first(timeoutMs: number = LIMITS.linkHelloMs): Promise<In | undefined> {
    const timer = this.opts.clock.setTimeout(
      () => this.link.close(new DeadlineExceededError(`no frame from the ${this.opts.peer} within ${inWords(timeoutMs)} of the stream's start`)),
      timeoutMs,
    );
    try {
      const r = await this.iterator.next();
      if (r.done) return undefined;
      this.heartbeat?.received();
      this.roundTrip(r.value);
      return r.value;
    } finally {
      timer.cancel();
    }
  }

  /** Hands every following frame to `fn`, in order, awaiting each, until the stream ends (or throws when it fails). */
  async forEach(fn: (frame: In) => Promise<void> | void): Promise<void> {
    for (;;) {
      const r = await this.iterator.next();
      if (r.done) return;
      this.heartbeat?.received();
      this.roundTrip(r.value);
      await fn(r.value);
    }
  }

  /** Stops the heartbeat, and either sends what is gathered (the stream may still carry it) or drops it. */
  end(pending: "flush" | "discard"): void {
    this.heartbeat?.stop();
    if (pending === "flush") this.out.flush();
    else this.out.discard();
  }
}
