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
}

/**
 * The daemon's ledger in LMDB, under the host's id (one environment serves
 * every host of a daemon process). `put` resolves once the entry is durable:
 * the daemon waits for that before it starts a process.
 */
export class LmdbLedger implements Ledger {
  private readonly cache = new Map<string, LedgerEntry>();

  constructor(
    private readonly db: Database<StoredEntry, string[]>,
    private readonly hostId: string,
  ) {
    for (const { key, value } of db.getRange({ start: [hostId, ""], end: [hostId, "\uffff"] })) {
      const entry: LedgerEntry = { spec: fromBinary(TaskSpecSchema, value.spec), state: value.state };
      if (value.final) entry.final = fromBinary(TaskStatusSchema, value.final);
      if (value.finalAcked) entry.finalAcked = true;
      if (value.groups) entry.groups = value.groups;
      if (value.endedAt !== undefined) entry.endedAt = value.endedAt;
      this.cache.set(key[1]!, entry);
    }
  }

  get(taskId: string): LedgerEntry | undefined {
    return this.cache.get(taskId);
  }

  put(entry: LedgerEntry): Promise<void> {
    this.cache.set(entry.spec.taskId, entry);
    const stored: StoredEntry = { spec: toBinary(TaskSpecSchema, entry.spec), state: entry.state };
    if (entry.final) stored.final = toBinary(TaskStatusSchema, entry.final);
    if (entry.finalAcked) stored.finalAcked = true;
    if (entry.groups?.length) stored.groups = entry.groups;
    if (entry.endedAt !== undefined) stored.endedAt = entry.endedAt;
    return this.db.put([this.hostId, entry.spec.taskId], stored).then(() => undefined);
  }

  remove(taskId: string): Promise<void> {
    this.cache.delete(taskId);
    return this.db.remove([this.hostId, taskId]).then(() => undefined);
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
