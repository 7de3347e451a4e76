import { TaskState, type OutputChunk, type TaskSpec, type TaskStatus } from "../gen/rexmesh/v1/task_pb.js";
import { isTerminal } from "./task-state.js";

/** A status or an output chunk on its way up, kept until the next hop acknowledges it. */
export type UpwardItem = { kind: "status"; status: TaskStatus } | { kind: "output"; chunk: OutputChunk };

/**
 * An item's identity in a backlog: a second item with the same identity is
 * a duplicate. A proxy's own end of its copy of a task (at_proxy) and the
 * host's end of the task may share a state and both be on their way.
 */
export function upwardKey(item: UpwardItem): string {
  return item.kind === "output" ? outputKey(item.chunk.taskId, item.chunk.seq) : statusKey(item.status.taskId, item.status.state, item.status.atProxy);
}

export function outputKey(taskId: string, seq: number | bigint): string {
  return `o/${taskId}/${seq}`;
}

export function statusKey(taskId: string, state: TaskState, atProxy: boolean): string {
  return `s/${taskId}/${state}${atProxy ? "/p" : ""}`;
}

/** Rough wire size of a task spec, for frame sizing. */
export function specBytes(spec: TaskSpec): number {
  let n = 256 + spec.stdin.length;
  for (const step of spec.steps) {
    if (step.tool.case === "exec") for (const a of step.tool.value.argv) n += a.length + 4;
    else if (step.tool.case === "shell") n += step.tool.value.script.length + 8;
  }
  for (const [k, v] of Object.entries(spec.env)) n += k.length + v.length + 8;
  return n;
}

export function itemBytes(item: UpwardItem): number {
  return item.kind === "output" ? item.chunk.data.length + 32 : 64;
}

/**
 * Results not yet acknowledged by the next hop, in the order they were
 * produced; resent whole after a reconnect. Acks trim by task: all chunks up
 * to a seq, all statuses up to a state. Writes resolve once durable; a push
 * whose write failed leaves no trace, so the same items can be pushed again.
 */
export interface Backlog {
  readonly size: number;
  readonly bytes: number;
  push(items: readonly UpwardItem[]): Promise<void>;
  /**
   * Drops the task's chunks up to `seq`. Chunks held at positions up to
   * `keepUpTo` go only with an ack of their own seq: the sender cannot tell
   * whether the receiver took them or held them back (a proxy's chunks sent
   * before the controller asked for a replay). Chunk `seq` itself always goes.
   */
  ackOutput(taskId: string, seq: number, keepUpTo?: number): Promise<void>;
  /** Drops the task's statuses up to `state` from one source: the host's, or (atProxy) the proxy's own. */
  ackStatus(taskId: string, state: TaskState, atProxy?: boolean): Promise<void>;
  /** Everything held, oldest first. */
  all(): UpwardItem[];
  /** Items pushed after position `after` (0: from the start), oldest first, about maxBytes (at least one). */
  after(after: number, maxBytes: number): { n: number; item: UpwardItem }[];
}

/** Picks items after a position up to a byte budget; shared by the backlogs. */
export function takeAfter(entries: Iterable<{ n: number; item: UpwardItem }>, after: number, maxBytes: number): { n: number; item: UpwardItem }[] {
  const out: { n: number; item: UpwardItem }[] = [];
  let bytes = 0;
  for (const e of entries) {
    if (e.n <= after) continue;
    const size = itemBytes(e.item);
    if (out.length > 0 && bytes + size > maxBytes) break;
    out.push(e);
    bytes += size;
  }
  return out;
}

/**
 * Which of a task's chunks an output ack drops, shared by the backlogs. Each
 * task has a mark below which every chunk was dropped or passed over; chunks
 * passed over (kept, see Backlog.ackOutput) are remembered so that a later
 * ack still reaches them, without walking every seq from 1 again.
 */
export class OutputAcks {
  private readonly acked = new Map<string, number>();
  private readonly passed = new Map<string, Set<number>>();

  /**
   * The seqs of the task's chunks that an ack of `seq` drops. `positionOf`
   * gives a chunk's position if it is held, else undefined.
   */
  take(taskId: string, seq: number, keepUpTo: number, positionOf: (seq: number) => number | undefined): number[] {
    const out: number[] = [];
    const from = this.acked.get(taskId) ?? 0;
    let passed = this.passed.get(taskId);
    const consider = (s: number) => {
      const n = positionOf(s);
      if (n !== undefined && s !== seq && n <= keepUpTo) {
        if (!passed) this.passed.set(taskId, (passed = new Set()));
        passed.add(s);
        return;
      }
      passed?.delete(s);
      if (n !== undefined) out.push(s);
    };
    if (passed) for (const s of [...passed]) if (s <= seq) consider(s);
    for (let s = from + 1; s <= seq; s++) consider(s);
    if (seq <= from && !out.includes(seq)) consider(seq);
    if (seq > from) this.acked.set(taskId, seq);
    if (passed?.size === 0) this.passed.delete(taskId);
    return out;
  }

  /** The task ended upstream: its marks go (a later ack walks from seq 1). */
  forget(taskId: string): void {
    this.acked.delete(taskId);
    this.passed.delete(taskId);
  }
}

/** A backlog in memory: for tests and throwaway meshes. */
export class MemoryBacklog implements Backlog {
  private readonly items = new Map<string, UpwardItem>();
  private readonly numbers = new Map<string, number>();
  private next = 1;
  private readonly outputAcks = new OutputAcks();
  private bytesHeld = 0;

  get size(): number {
    return this.items.size;
  }

  get bytes(): number {
    return this.bytesHeld;
  }

  async push(items: readonly UpwardItem[]): Promise<void> {
    for (const item of items) {
      const key = upwardKey(item);
      if (this.items.has(key)) continue;
      this.items.set(key, item);
      this.numbers.set(key, this.next++);
      this.bytesHeld += itemBytes(item);
    }
  }

  private drop(key: string): void {
    const item = this.items.get(key);
    if (!item) return;
    this.items.delete(key);
    this.numbers.delete(key);
    this.bytesHeld -= itemBytes(item);
  }

  async ackOutput(taskId: string, seq: number, keepUpTo = 0): Promise<void> {
    for (const s of this.outputAcks.take(taskId, seq, keepUpTo, (s) => this.numbers.get(outputKey(taskId, s)))) this.drop(outputKey(taskId, s));
  }

  async ackStatus(taskId: string, state: TaskState, atProxy = false): Promise<void> {
    for (let s = TaskState.PENDING as number; s <= state; s++) this.drop(statusKey(taskId, s, atProxy));
    if (isTerminal(state) && !atProxy) this.outputAcks.forget(taskId);
  }

  all(): UpwardItem[] {
    return [...this.items.values()];
  }

  after(after: number, maxBytes: number): { n: number; item: UpwardItem }[] {
    const entries = [...this.items].map(([key, item]) => ({ n: this.numbers.get(key)!, item }));
    return takeAfter(entries, after, maxBytes);
  }
}
