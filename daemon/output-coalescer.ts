import type { OutputStream } from "../gen/rexmesh/v1/task_pb.js";

/** Arms a one-shot flush; returns what cancels it. */
export type FlushScheduler = (fn: () => void, ms: number) => () => void;

/**
 * The default scheduler: a real, unref'd timer. The delay batches pipe
 * reads for a few milliseconds; it is I/O pacing, not logic time, so it does
 * not follow the task's injected clock (a test driving that clock by hand
 * would otherwise never see output before it moves time on). Tests of the
 * coalescing pass their own.
 */
export const timerScheduler: FlushScheduler = (fn, ms) => {
  const t = setTimeout(fn, ms);
  t.unref();
  return () => clearTimeout(t);
};

export interface OutputCoalescerOptions {
  /** Largest chunk emitted. */
  maxBytes: number;
  /** How long the first byte of a chunk may wait for more before the chunk goes out. */
  delayMs: number;
  schedule?: FlushScheduler;
}

/**
 * Gathers a process's pipe reads (≤ 64 KiB each, the pipe's capacity) into
 * larger chunks: a chunk goes out once it holds `maxBytes`, `delayMs` after
 * its first byte arrived, when the other stream has something to say, or on
 * {@link flush}. A fast producer therefore costs one chunk per `maxBytes`
 * on every hop instead of one per read, and a slow one still streams within
 * `delayMs`.
 *
 * One chunk holds one stream's bytes; a read of the other stream first sends
 * what is gathered, so the order of chunks is the order the reads arrived in
 * (seq runs across both streams). Bytes are never reordered, dropped or
 * altered; a chunk made of one read is that read's buffer (no copy), one
 * made of several is one new buffer. Emitted data is the receiver's to keep:
 * the coalescer never writes to it again.
 */
export class OutputCoalescer {
  private stream: OutputStream | undefined;
  private parts: Uint8Array[] = [];
  private bytes = 0;
  private cancelTimer: (() => void) | undefined;
  private readonly schedule: FlushScheduler;

  constructor(
    private readonly emit: (stream: OutputStream, data: Uint8Array) => void,
    private readonly opts: OutputCoalescerOptions,
  ) {
    if (!(opts.maxBytes >= 1)) throw new RangeError(`maxBytes must be at least 1, got ${opts.maxBytes}`);
    this.schedule = opts.schedule ?? timerScheduler;
  }

  /** Bytes gathered and not yet emitted. */
  get pending(): number {
    return this.bytes;
  }

  /** Adds one read of `stream`; emits every chunk it fills. */
  add(stream: OutputStream, data: Uint8Array): void {
    if (data.length === 0) return;
    if (this.bytes > 0 && this.stream !== stream) this.flush();
    this.stream = stream;
    for (let off = 0; off < data.length; ) {
      const take = Math.min(data.length - off, this.opts.maxBytes - this.bytes);
      this.parts.push(off === 0 && take === data.length ? data : data.subarray(off, off + take));
      this.bytes += take;
      off += take;
      if (this.bytes >= this.opts.maxBytes) this.flush();
    }
    if (this.bytes > 0 && this.cancelTimer === undefined) {
      this.cancelTimer = this.schedule(() => {
        this.cancelTimer = undefined;
        this.flush();
      }, this.opts.delayMs);
    }
  }

  /** Emits what is gathered now (a step's pipes closed, the task ends). */
  flush(): void {
    this.cancelTimer?.();
    this.cancelTimer = undefined;
    if (this.bytes === 0) return;
    const parts = this.parts;
    const bytes = this.bytes;
    this.parts = [];
    this.bytes = 0;
    this.emit(this.stream!, parts.length === 1 ? parts[0]! : Buffer.concat(parts, bytes));
  }
}
