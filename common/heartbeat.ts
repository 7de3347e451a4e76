import type { Clock, Timer } from "./clock.js";

/**
 * Keeps a stream honest in both directions: sends an empty frame when we have
 * been quiet for an interval, and declares the peer dead after three intervals
 * without a frame from it. Application-level, so it also proves that the
 * peer's event loop (not just its TCP stack) is alive.
 */
export class Heartbeat {
  private lastSent: number;
  private lastReceived: number;
  private timer: Timer | undefined;
  private stopped = false;
  private lastTick: number;
  /**
   * How many intervals of our silence before an empty frame goes out. A side
   * whose peer pings it every interval answers each ping at once, so its
   * pongs are its heartbeat; it waits 1.5 intervals (pinged(), below) so that
   * a check falling just before the next ping does not add a frame.
   */
  private quietIntervals = 1;

  constructor(
    private readonly clock: Clock,
    private readonly intervalMs: number,
    private readonly sendEmpty: () => void,
    private readonly onDead: () => void,
    private readonly deadAfter = 3,
    /** Called at every check; returns true when it queued a frame of its own, which then stands for the heartbeat. */
    private readonly onTick?: (now: number) => boolean,
  ) {
    this.lastSent = this.lastReceived = this.lastTick = clock.now();
    this.schedule();
  }

  sent(): void {
    this.lastSent = this.clock.now();
  }

  received(): void {
    this.lastReceived = this.clock.now();
  }

  /** The peer pings: our answers keep the link alive, an empty frame only if they stop. */
  pinged(): void {
    this.quietIntervals = 1.5;
  }

  stop(): void {
    this.stopped = true;
    this.timer?.cancel();
  }

  private schedule(): void {
    if (this.stopped) return;
    this.timer = this.clock.setTimeout(() => this.tick(), Math.max(50, Math.floor(this.intervalMs / 2)));
  }

  private tick(): void {
    if (this.stopped) return;
    const now = this.clock.now();
    // A tick far later than scheduled means this process stalled (a long
    // synchronous task, an overloaded machine): the peer's frames may be
    // sitting unread in the socket. Silence is counted from here on, not
    // through the stall, so that our own pause never kills a live link.
    const tickEvery = Math.max(50, Math.floor(this.intervalMs / 2));
    if (now - this.lastTick > tickEvery + this.intervalMs) this.lastReceived = Math.max(this.lastReceived, now - this.intervalMs);
    this.lastTick = now;
    if (now - this.lastReceived > this.intervalMs * this.deadAfter) {
      this.stop();
      this.onDead();
      return;
    }
    if (this.onTick?.(now)) this.lastSent = now;
    else if (now - this.lastSent >= this.intervalMs * this.quietIntervals) {
      this.sendEmpty();
      this.lastSent = now;
    }
    this.schedule();
  }
}
