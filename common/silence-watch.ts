import type { Clock, Timer } from "./clock.js";

/** Something that counts the bytes it has received: a connection's socket. */
export interface ByteSource {
  readonly bytesRead: number;
}

interface Watched {
  source: ByteSource;
  limitMs: number;
  onSilent: () => void;
  bytes: number;
  /** No byte has arrived since this time (a sweep's time, at or before the last byte seen). */
  quietSince: number;
}

/**
 * Notices connections that have fallen silent, for many connections at the
 * cost of one timer: every `tickMs` one sweep compares each watched
 * connection's count of received bytes with the last sweep's, and calls
 * `onSilent` (once, then forgets it) for a connection that showed no new
 * byte for its limit. A peer that pings (an HTTP/2 PING every interval) is
 * heard this way without a byte of ours and without a frame reaching
 * JavaScript: a proxy watches its hosts instead of pinging each of them
 * (docs/fan-out.md, "Idle links").
 *
 * A change is credited to the sweep before the one that saw it (the byte
 * came after that one), so a connection is dropped between `limitMs -
 * tickMs` and `limitMs + tickMs` after its last byte. A sweep that runs
 * late (this process stalled, and the bytes of the stall may still sit
 * unread in the socket: reads are handled after timers) counts no silence
 * for the stall beyond one tick.
 */
export class SilenceWatch {
  private readonly watched = new Set<Watched>();
  private timer: Timer | undefined;
  private lastSweep: number;

  constructor(
    private readonly clock: Clock,
    private readonly tickMs: number,
  ) {
    this.lastSweep = clock.now();
  }

  /** Watches `source` until the returned function is called, or it falls silent for `limitMs`. */
  watch(source: ByteSource, limitMs: number, onSilent: () => void): () => void {
    const now = this.clock.now();
    const w: Watched = { source, limitMs, onSilent, bytes: source.bytesRead, quietSince: now };
    this.watched.add(w);
    if (!this.timer) {
      this.lastSweep = now;
      this.schedule();
    }
    return () => this.watched.delete(w);
  }

  /** Connections watched now. */
  get size(): number {
    return this.watched.size;
  }

  /** Stops watching everything. */
  stop(): void {
    this.watched.clear();
    this.timer?.cancel();
    this.timer = undefined;
  }

  private schedule(): void {
    this.timer = this.clock.setTimeout(() => this.sweep(), this.tickMs);
  }

  private sweep(): void {
    const now = this.clock.now();
    const previous = this.lastSweep;
    // A stall: what we could not read during it is not the peers' silence.
    const floor = now - previous > 2 * this.tickMs ? now - this.tickMs : Number.NEGATIVE_INFINITY;
    this.lastSweep = now;
    const silent: Watched[] = [];
    for (const w of this.watched) {
      const bytes = w.source.bytesRead;
      if (bytes !== w.bytes) {
        w.bytes = bytes;
        w.quietSince = Math.max(w.quietSince, previous, floor);
      } else if (w.quietSince < floor) {
        w.quietSince = floor;
      }
      if (now - w.quietSince >= w.limitMs) silent.push(w);
    }
    for (const w of silent) {
      this.watched.delete(w);
      w.onSilent();
    }
    if (this.watched.size > 0) this.schedule();
    else this.timer = undefined;
  }
}
