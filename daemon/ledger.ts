import type { TaskSpec, TaskStatus } from "../gen/rexmesh/v1/task_pb.js";
import { TaskState } from "../gen/rexmesh/v1/task_pb.js";
import type { GroupRef } from "./orphans.js";

/**
 * The daemon's record of every task it accepted. An entry is written before
 * anything is spawned, so a task delivered twice, or found RUNNING after a
 * restart, is answered from here and never started again. Once a task has
 * ended its spec is cut down to what identifies it (no environment, stdin or
 * steps: they may hold secrets), and the entry is dropped once no proxy can
 * hand the task out again (past its delivery deadline and a margin) and its
 * end was acknowledged.
 *
 * Entries are replaced, never changed in place: a write the store refuses
 * is undone in memory, so that the daemon never answers from a state that
 * is not stored (a task answered DELIVERED from memory alone would never
 * run).
 */
export interface LedgerEntry {
  spec: TaskSpec;
  /** DELIVERED (accepted, waiting), RUNNING (a process may have started), or terminal. */
  state: TaskState;
  /** The terminal status, once there is one. */
  final?: TaskStatus;
  /** The proxy acknowledged the terminal status; until then it is reported again after a restart. */
  finalAcked?: boolean;
  /** Process groups the task's steps started (see orphans.ts): what to end if the daemon dies meanwhile. */
  groups?: GroupRef[];
  /** When the task ended (epoch ms), for pruning tasks without a delivery deadline. */
  endedAt?: number;
  /** An update handed over to the supervisor before a restart (docs/updates.md): settled after it. */
  update?: { from: string; to: string; at: number };
}

export interface Ledger {
  get(taskId: string): LedgerEntry | undefined;
  /**
   * Stores the entry in place of the task's previous one; resolves once
   * durable. When it rejects, get() answers what is stored again.
   */
  put(entry: LedgerEntry): Promise<void>;
  /** Drops the task's entry and its output seq; when it rejects, get() answers what is stored again. */
  remove(taskId: string): Promise<void>;
  /**
   * The highest output seq recorded for the task (0: none). Output of an
   * idempotent task leaves the host only once its seq is recorded here, so a
   * run again after a crash can number its output after every chunk the
   * cut-short run handed out (see run-output.ts).
   */
  outputSeq(taskId: string): number;
  /** Raises the task's recorded output seq to `seq` (never lowers it); resolves once durable. */
  putOutputSeq(taskId: string, seq: number): Promise<void>;
  /** Every entry (for pruning). */
  all(): LedgerEntry[];
  /** Entries not yet terminal, for recovery after a restart. */
  unfinished(): LedgerEntry[];
  /** Terminal entries whose final status was never acknowledged. */
  unreported(): LedgerEntry[];
}

export class MemoryLedger implements Ledger {
  private readonly entries = new Map<string, LedgerEntry>();
  private readonly seqs = new Map<string, number>();

  get(taskId: string): LedgerEntry | undefined {
    return this.entries.get(taskId);
  }

  async put(entry: LedgerEntry): Promise<void> {
    this.entries.set(entry.spec.taskId, entry);
  }

  async remove(taskId: string): Promise<void> {
    this.entries.delete(taskId);
    this.seqs.delete(taskId);
  }

  outputSeq(taskId: string): number {
    return this.seqs.get(taskId) ?? 0;
  }

  async putOutputSeq(taskId: string, seq: number): Promise<void> {
    if (seq > this.outputSeq(taskId)) this.seqs.set(taskId, seq);
  }

  all(): LedgerEntry[] {
    return [...this.entries.values()];
  }

  unfinished(): LedgerEntry[] {
    return [...this.entries.values()].filter((e) => e.final === undefined);
  }

  unreported(): LedgerEntry[] {
    return [...this.entries.values()].filter((e) => e.final !== undefined && !e.finalAcked);
  }
}
