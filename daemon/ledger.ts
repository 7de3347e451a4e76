import type { TaskSpec, TaskStatus } from "../gen/rexmesh/v1/task_pb.js";
import { TaskState } from "../gen/rexmesh/v1/task_pb.js";

/**
 * The daemon's record of every task it accepted. An entry is written before
 * anything is spawned, so a task delivered twice, or found RUNNING after a
 * restart, is answered from here and never started again.
 */
export interface LedgerEntry {
  spec: TaskSpec;
  /** DELIVERED (accepted, waiting), RUNNING (a process may have started), or terminal. */
  state: TaskState;
  /** The terminal status, once there is one. */
  final?: TaskStatus;
  /** The proxy acknowledged the terminal status; until then it is reported again after a restart. */
  finalAcked?: boolean;
}

export interface Ledger {
  get(taskId: string): LedgerEntry | undefined;
  put(entry: LedgerEntry): Promise<void>;
  /** Entries not yet terminal, for recovery after a restart. */
  unfinished(): LedgerEntry[];
  /** Terminal entries whose final status was never acknowledged. */
  unreported(): LedgerEntry[];
}

export class MemoryLedger implements Ledger {
  private readonly entries = new Map<string, LedgerEntry>();

  get(taskId: string): LedgerEntry | undefined {
    return this.entries.get(taskId);
  }

  async put(entry: LedgerEntry): Promise<void> {
    this.entries.set(entry.spec.taskId, entry);
  }

  unfinished(): LedgerEntry[] {
    return [...this.entries.values()].filter((e) => e.final === undefined);
  }

  unreported(): LedgerEntry[] {
    return [...this.entries.values()].filter((e) => e.final !== undefined && !e.finalAcked);
  }
}

