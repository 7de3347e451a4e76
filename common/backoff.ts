/**
 * Capped exponential backoff with jitter for reconnect loops, shaped like
 * grpc-js's: 1 s × 1.6 per attempt, capped, ±20 % jitter so that thousands
 * of daemons cut off together do not return together.
 */
export interface BackoffOptions {
  initialMs?: number;
  multiplier?: number;
  maxMs?: number;
  jitter?: number;
}

export class Backoff {
  private readonly initialMs: number;
  private readonly multiplier: number;
  private readonly maxMs: number;
  private readonly jitter: number;
  private nextBase: number;

  constructor(opts: BackoffOptions = {}, private readonly random: () => number = Math.random) {
    this.initialMs = opts.initialMs ?? 1000;
    this.multiplier = opts.multiplier ?? 1.6;
    this.maxMs = opts.maxMs ?? 120_000;
    this.jitter = opts.jitter ?? 0.2;
    this.nextBase = this.initialMs;
  }

  /** The delay before the next attempt; each call grows the following one. */
  next(): number {
    const base = this.nextBase;
    this.nextBase = Math.min(this.maxMs, base * this.multiplier);
    const spread = base * this.jitter;
    return Math.max(0, Math.round(base - spread + this.random() * 2 * spread));
  }

  /** Call after a connection proved healthy. */
  reset(): void {
    this.nextBase = this.initialMs;
  }
}
