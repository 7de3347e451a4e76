import { mkdirSync } from "node:fs";
import { open, type Database, type RootDatabase } from "lmdb";
import { ResourceExhaustedError } from "./errors.js";

export interface LmdbOptions {
  /** Directory of the environment (data.mdb, lock.mdb). */
  path: string;
  /**
   * Bytes the store may hold. New work is refused with RESOURCE_EXHAUSTED
   * above `workLimit` of it; results of work already accepted are still
   * stored up to the limit, so that nothing accepted is lost.
   */
  maxBytes: number;
  /** Share of maxBytes above which new work is refused. Default 0.9. */
  workLimit?: number;
}

/**
 * One LMDB environment per process (DESIGN §6): durable commits (no noSync,
 * no writemap), writes batched per event-loop turn into one transaction by
 * lmdb-js, and a size limit enforced here because lmdb-js would otherwise
 * grow the map until the disk is full.
 */
export class LmdbEnv {
  readonly root: RootDatabase;
  private readonly maxBytes: number;
  private readonly workLimit: number;
  /** Write jobs lmdb-js started on the thread pool, and those of them not finished yet (see {@link close}). */
  private writes = { started: 0, running: 0 };
  private writesDone: Array<() => void> = [];

  constructor(opts: LmdbOptions) {
    mkdirSync(opts.path, { recursive: true, mode: 0o700 });
    this.maxBytes = opts.maxBytes;
    this.workLimit = opts.workLimit ?? 0.9;
    this.root = open({ path: opts.path, maxDbs: 32, mapSize: Math.max(opts.maxBytes, 1 << 20) * 2, noSync: false, useWritemap: false });
    this.countWrites();
  }

  /**
   * lmdb-js 3.5.6 commits on thread-pool jobs, several of which may be under
   * way at once, and its close() waits only for the newest: an older job
   * that has committed but not yet finished still reads the environment's
   * native state, which close() frees. Depending on what the freed memory
   * then holds, the process dies of SIGFPE (a hash map with no buckets: the
   * crash of a CI run, `divq` at node.abi115.glibc.node+0x5ac39 in
   * ExtendedEnv::notifyUserCallbacks), SIGSEGV, or a write thread hangs on a
   * freed mutex. Reproduced here: 11 of 124 processes that wrote over a few
   * turns and closed and reopened; 30 of 30 with the window widened by a
   * delay, none of 30 with this guard. So every job's start is counted here
   * and its end (the completion callback, which runs on this thread after the
   * job returned), and close() waits for them all. It wraps a method of
   * lmdb-js's native environment object; test/unit/lmdb-close.test.ts fails
   * if a new lmdb-js no longer calls it.
   */
  private countWrites(): void {
    type StartWriting = (address: number, callback: (status: number) => unknown) => unknown;
    const native = (this.root as unknown as { env?: { startWriting?: StartWriting } }).env;
    const start = native?.startWriting;
    if (native === undefined || typeof start !== "function") return;
    Object.defineProperty(native, "startWriting", {
      configurable: true,
      writable: true,
      value: (address: number, callback: (status: number) => unknown) => {
        this.writes.started += 1;
        this.writes.running += 1;
        try {
          return start.call(native, address, (status: number) => {
            try {
              return callback(status);
            } finally {
              // 1 and 2 report progress (a commit done, callbacks to run); anything else is the job's end (0, or an error).
              if (status !== 1 && status !== 2) this.writeEnded();
            }
          });
        } catch (err) {
          this.writeEnded(); // no job was started
          throw err;
        }
      },
    });
  }

  private writeEnded(): void {
    if (--this.writes.running === 0) for (const done of this.writesDone.splice(0)) done();
  }

  /** Write jobs started so far, and those not ended yet (tests check that they are counted: see countWrites). */
  get writeJobs(): { started: number; running: number } {
    return { ...this.writes };
  }

  db<V = unknown>(name: string, encoding: "msgpack" | "binary" | "string" = "msgpack"): Database<V, any> {
    return this.root.openDB<V, any>(name, { encoding });
  }

  /** Bytes in use: the high-water mark of the data file (freed pages are reused first). */
  usedBytes(): number {
    const stats = this.root.getStats() as { pageSize: number; lastPageNumber: number };
    return (stats.lastPageNumber + 1) * stats.pageSize;
  }

  /** Throws RESOURCE_EXHAUSTED when the store is too full to take new work. */
  checkRoomForWork(what: string): void {
    const used = this.usedBytes();
    if (used > this.maxBytes * this.workLimit) {
      throw new ResourceExhaustedError(
        `${what} refused: the store holds ${mib(used)} of its ${mib(this.maxBytes)} limit; finish or clean up work, or raise the store size`,
      );
    }
  }

  /** Throws RESOURCE_EXHAUSTED when even results cannot be stored any more. */
  checkRoomForResults(): void {
    const used = this.usedBytes();
    if (used > this.maxBytes) throw new ResourceExhaustedError(`the store is full (${mib(used)} of ${mib(this.maxBytes)})`);
  }

  /** Closes the environment once every write job has ended (see countWrites). */
  async close(): Promise<void> {
    await this.root.flushed;
    while (this.writes.running > 0) await new Promise<void>((resolve) => this.writesDone.push(resolve));
    await this.root.close();
  }
}

function mib(n: number): string {
  return `${(n / 1048576).toFixed(1)} MiB`;
}

/** A write that failed for lack of space becomes RESOURCE_EXHAUSTED; anything else stays as it is. */
export function storageError(err: unknown): unknown {
  const e = err as { code?: string; message?: string };
  if (e?.code === "ENOSPC" || /MDB_MAP_FULL|ENOSPC|No space left/i.test(e?.message ?? "")) {
    return new ResourceExhaustedError("the disk or store is full: new work is refused until space is freed", { cause: err });
  }
  return err;
}
