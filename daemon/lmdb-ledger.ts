import { fromBinary, toBinary } from "@bufbuild/protobuf";
import type { Database } from "lmdb";
import { TaskSpecSchema, TaskStatusSchema, type TaskState } from "../gen/rexmesh/v1/task_pb.js";
import type { Ledger, LedgerEntry } from "./ledger.js";
import type { GroupRef } from "./orphans.js";

interface StoredEntry {
  spec: Uint8Array;
  state: TaskState;
  final?: Uint8Array;
  finalAcked?: boolean;
  groups?: GroupRef[];
  endedAt?: number;
  update?: { from: string; to: string; at: number };
}

/** A task's output seq (Ledger.putOutputSeq), a record of its own so that raising it does not rewrite the spec. */
interface StoredOutputSeq {
  outputSeq: number;
}

const OUTPUT_SEQ = "output-seq";

/**
 * The daemon's ledger in LMDB, under the host's id (one environment serves
 * every host of a daemon process): `[host, task]` holds the entry and
 * `[host, task, "output-seq"]` its output seq. `put` resolves once the entry
 * is durable: the daemon waits for that before it starts a process. What
 * get() answers is set at once, so that a second delivery arriving while the
 * first is being written is seen, and undone when the write fails: the
 * entry last stored is answered again (none, for a task never stored).
 */
export class LmdbLedger implements Ledger {
  private readonly cache = new Map<string, LedgerEntry>();
  /** The entry each task last had stored: what a failed write falls back to. */
  private readonly stored = new Map<string, LedgerEntry>();
  /** Output seqs stored. */
  private readonly seqs = new Map<string, number>();
  /** The highest output seq being written, per task. */
  private readonly seqWrites = new Map<string, { seq: number; done: Promise<void> }>();

  constructor(
    private readonly db: Database<StoredEntry | StoredOutputSeq, string[]>,
    private readonly hostId: string,
  ) {
    for (const { key, value } of db.getRange({ start: [hostId, ""], end: [hostId, "\uffff"] })) {
      if (key.length === 3 && key[2] === OUTPUT_SEQ && "outputSeq" in value) {
        this.seqs.set(key[1]!, value.outputSeq);
        continue;
      }
      if (!("spec" in value)) continue;
      const entry: LedgerEntry = { spec: fromBinary(TaskSpecSchema, value.spec), state: value.state };
      if (value.final) entry.final = fromBinary(TaskStatusSchema, value.final);
      if (value.finalAcked) entry.finalAcked = true;
      if (value.groups) entry.groups = value.groups;
      if (value.endedAt !== undefined) entry.endedAt = value.endedAt;
      if (value.update) entry.update = value.update;
      this.cache.set(key[1]!, entry);
      this.stored.set(key[1]!, entry);
    }
  }

  get(taskId: string): LedgerEntry | undefined {
    return this.cache.get(taskId);
  }

  put(entry: LedgerEntry): Promise<void> {
    const taskId = entry.spec.taskId;
    const stored: StoredEntry = { spec: toBinary(TaskSpecSchema, entry.spec), state: entry.state };
    if (entry.final) stored.final = toBinary(TaskStatusSchema, entry.final);
    if (entry.finalAcked) stored.finalAcked = true;
    if (entry.groups?.length) stored.groups = entry.groups;
    if (entry.endedAt !== undefined) stored.endedAt = entry.endedAt;
    if (entry.update) stored.update = entry.update;
    this.cache.set(taskId, entry);
    return this.db.put([this.hostId, taskId], stored).then(
      () => {
        this.stored.set(taskId, entry);
      },
      (err: unknown) => {
        // Unless a later write took its place, what is stored is answered again.
        if (this.cache.get(taskId) === entry) this.answerStored(taskId);
        throw err;
      },
    );
  }

  remove(taskId: string): Promise<void> {
    const removing = this.cache.get(taskId);
    this.cache.delete(taskId);
    const writes = [this.db.remove([this.hostId, taskId])];
    if (this.seqs.has(taskId) || this.seqWrites.has(taskId)) writes.push(this.db.remove([this.hostId, taskId, OUTPUT_SEQ]));
    return Promise.all(writes).then(
      () => {
        this.stored.delete(taskId);
        this.seqs.delete(taskId);
      },
      (err: unknown) => {
        if (!this.cache.has(taskId) && removing !== undefined) this.answerStored(taskId);
        throw err;
      },
    );
  }

  private answerStored(taskId: string): void {
    const last = this.stored.get(taskId);
    if (last) this.cache.set(taskId, last);
    else this.cache.delete(taskId);
  }

  outputSeq(taskId: string): number {
    return this.seqs.get(taskId) ?? 0;
  }

  putOutputSeq(taskId: string, seq: number): Promise<void> {
    if (seq <= this.outputSeq(taskId)) return Promise.resolve();
    const writing = this.seqWrites.get(taskId);
    if (writing && writing.seq >= seq) return writing.done;
    const done: Promise<void> = this.db.put([this.hostId, taskId, OUTPUT_SEQ], { outputSeq: seq }).then(
      () => {
        if (seq > this.outputSeq(taskId)) this.seqs.set(taskId, seq);
        if (this.seqWrites.get(taskId)?.done === done) this.seqWrites.delete(taskId);
      },
      (err: unknown) => {
        if (this.seqWrites.get(taskId)?.done === done) this.seqWrites.delete(taskId);
        throw err;
      },
    );
    this.seqWrites.set(taskId, { seq, done });
    return done;
  }

  all(): LedgerEntry[] {
    return [...this.cache.values()];
  }

  unfinished(): LedgerEntry[] {
    return [...this.cache.values()].filter((e) => e.final === undefined);
  }

  unreported(): LedgerEntry[] {
    return [...this.cache.values()].filter((e) => e.final !== undefined && !e.finalAcked);
  }
}
