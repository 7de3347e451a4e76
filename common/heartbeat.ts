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

  constructor(
    private readonly clock: Clock,
    private readonly intervalMs: number,
    private readonly sendEmpty: () => void,
    private readonly onDead: () => void,
    private readonly deadAfter = 3,
  ) {
    this.lastSent = this.lastReceived = clock.now();
    this.schedule();
  }

  sent(): void {
    this.lastSent = this.clock.now();
  }

  received(): void {
    this.lastReceived = this.clock.now();
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
    if (now - this.lastReceived > this.intervalMs * this.deadAfter) {
      this.stop();
      this.onDead();
      return;
    }
    if (now - this.lastSent >= this.intervalMs) {
      this.sendEmpty();
      this.lastSent = now;
    }
    this.schedule();
  }
}
