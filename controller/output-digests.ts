import { createHash, type Hash } from "node:crypto";

/** Default of the number of tasks whose output is hashed as it is stored. */
const DEFAULT_MAX_TASKS = 10_000;

/**
 * SHA-256 of each task's output as its chunks are stored, while they are
 * stored in seq order from 1 (as they are unless a failover reorders
 * them), so that checking a host's signed digest need not read the whole
 * output back from the store: that read cost as much again as storing it
 * (1 GiB read and copied for 1 GiB of output). A task whose chunks come out
 * of order, or that was pushed out (at most `maxTasks` are followed, the
 * oldest first to go), or whose chunks were stored before a restart, is
 * hashed from the store as before.
 */
export class OutputDigests {
  private readonly byTask = new Map<string, { hash: Hash; next: number; bytes: number }>();

  constructor(private readonly maxTasks = DEFAULT_MAX_TASKS) {}

  /** Chunk `seq` of the task was stored (its write committed). */
  stored(taskId: string, seq: number, data: Uint8Array): void {
    let d = this.byTask.get(taskId);
    if (!d) {
      if (seq !== 1) return;
      if (this.byTask.size >= this.maxTasks) this.byTask.delete(this.byTask.keys().next().value!);
      d = { hash: createHash("sha256"), next: 1, bytes: 0 };
      this.byTask.set(taskId, d);
    }
    if (seq !== d.next) {
      this.byTask.delete(taskId);
      return;
    }
    d.hash.update(data);
    d.next++;
    d.bytes += data.length;
  }

  /** The digest and length of chunks 1..`chunks` if exactly those were stored in order here; forgets the task either way. */
  take(taskId: string, chunks: number): { sha256: Uint8Array; bytes: number } | undefined {
    const d = this.byTask.get(taskId);
    this.byTask.delete(taskId);
    if (!d || d.next !== chunks + 1) return undefined;
    return { sha256: d.hash.digest(), bytes: d.bytes };
  }

  /** Stops following a task whose output will not be checked (it ended at the controller, or its host signed no digest). */
  forget(taskId: string): void {
    this.byTask.delete(taskId);
  }

  /** Tasks followed now. */
  get size(): number {
    return this.byTask.size;
  }
}
