import type { OutputChunk } from "../gen/rexmesh/v1/task_pb.js";

export interface RunOutputSinks {
  /** Keeps chunks until the proxy acknowledges them (the outbox); resolves once they are durable, or their write failed and was logged. */
  keep(chunks: OutputChunk[]): Promise<void>;
  /** Puts kept chunks on the stream to the proxy, if one is open (otherwise the next stream sends them from the outbox). */
  send(chunks: OutputChunk[]): void;
  /** Records in the ledger that output up to `seq` may leave the host; resolves once durable, rejects only when the daemon gives up (it stops). */
  record(seq: number): Promise<void>;
}

/**
 * The output of one run of a task on its way out, numbered after `from`:
 * chunks 1..from are earlier runs' (a run again after a crash), this run's
 * chunk n goes out as seq from+n.
 *
 * Proxies and the controller keep the first chunk of each seq and drop the
 * others as duplicates, so a run again must not reuse a seq that the run a
 * crash cut short handed out. For a task that may run again (`durable`: an
 * idempotent one) a chunk therefore leaves the host only once it is kept in
 * the outbox and its seq is recorded in the ledger, a batch at a time while
 * the previous batch's writes commit. After a crash every seq up to the
 * recorded one is then either acknowledged or still in the outbox (and sent
 * again from there): a run again starts after the higher of the recorded seq
 * and the outbox's highest, and no seq is used twice or left out. Other
 * tasks never run twice; their chunks go out at once, as before.
 */
export class RunOutput {
  /** The highest seq of this run given to the stream; above it, chunks are kept but held back. */
  private released: number;
  private readonly held: { chunk: OutputChunk; kept: Promise<void> }[] = [];
  private writing = false;
  private failure: unknown;
  private readonly waiters: { resolve: () => void; reject: (err: unknown) => void }[] = [];

  constructor(
    readonly from: number,
    private readonly durable: boolean,
    private readonly sinks: RunOutputSinks,
  ) {
    this.released = from;
  }

  /** The chunk's seq on the wire, for the executor's nth chunk of this run. */
  seqOf(n: number): number {
    return this.from + n;
  }

  /** Whether a chunk of the task with this seq is kept but may not leave the host yet (a new stream resends the outbox without it). */
  holds(seq: number): boolean {
    return seq > this.released;
  }

  add(chunk: OutputChunk): void {
    const kept = this.sinks.keep([chunk]);
    if (!this.durable) {
      this.released = Math.max(this.released, Number(chunk.seq));
      this.sinks.send([chunk]);
      return;
    }
    this.held.push({ chunk, kept });
    this.writeNext();
  }

  /** Resolves once every chunk added has gone to the stream (or waits in the outbox for the next one); rejects if recording failed for good. */
  settled(): Promise<void> {
    if (this.failure !== undefined) return Promise.reject(this.failure);
    if (this.held.length === 0 && !this.writing) return Promise.resolve();
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  private writeNext(): void {
    if (this.writing || this.failure !== undefined) return;
    if (this.held.length === 0) {
      for (const w of this.waiters.splice(0)) w.resolve();
      return;
    }
    const batch = this.held.slice();
    const top = Number(batch[batch.length - 1]!.chunk.seq);
    this.writing = true;
    Promise.all([...batch.map((b) => b.kept), this.sinks.record(top)]).then(
      () => {
        this.writing = false;
        this.held.splice(0, batch.length);
        this.released = top;
        this.sinks.send(batch.map((b) => b.chunk));
        this.writeNext();
      },
      (err: unknown) => {
        this.writing = false;
        this.failure = err;
        for (const w of this.waiters.splice(0)) w.reject(err);
      },
    );
  }
}
