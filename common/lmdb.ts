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

  constructor(opts: LmdbOptions) {
    mkdirSync(opts.path, { recursive: true, mode: 0o700 });
    this.maxBytes = opts.maxBytes;
    this.workLimit = opts.workLimit ?? 0.9;
    this.root = open({ path: opts.path, maxDbs: 32, mapSize: Math.max(opts.maxBytes, 1 << 20) * 2, noSync: false, useWritemap: false });
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

  async close(): Promise<void> {
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
