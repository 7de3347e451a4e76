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
  return item.kind === "output" ? `o/${item.chunk.taskId}/${item.chunk.seq}` : statusKey(item.status.taskId, item.status.state, item.status.atProxy);
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
 * to a seq, all statuses up to a state. Writes resolve once durable.
 */
export interface Backlog {
  readonly size: number;
  readonly bytes: number;
  push(items: readonly UpwardItem[]): Promise<void>;
  ackOutput(taskId: string, seq: number): Promise<void>;
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

/** A backlog in memory: for tests and throwaway meshes. */
export class MemoryBacklog implements Backlog {
  private readonly items = new Map<string, UpwardItem>();
  private readonly numbers = new Map<string, number>();
  private next = 1;
  private readonly ackedSeq = new Map<string, number>();
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

  async ackOutput(taskId: string, seq: number): Promise<void> {
    const from = this.ackedSeq.get(taskId) ?? 0;
    for (let s = from + 1; s <= seq; s++) this.drop(`o/${taskId}/${s}`);
    if (seq > from) this.ackedSeq.set(taskId, seq);
  }

  async ackStatus(taskId: string, state: TaskState, atProxy = false): Promise<void> {
    for (let s = TaskState.PENDING as number; s <= state; s++) this.drop(statusKey(taskId, s, atProxy));
    if (isTerminal(state) && !atProxy) this.ackedSeq.delete(taskId);
  }

  all(): UpwardItem[] {
    return [...this.items.values()];
  }

  after(after: number, maxBytes: number): { n: number; item: UpwardItem }[] {
    const entries = [...this.items].map(([key, item]) => ({ n: this.numbers.get(key)!, item }));
    return takeAfter(entries, after, maxBytes);
  }
}
