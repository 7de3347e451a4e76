import { toBinary } from "@bufbuild/protobuf";
import { StepSchema, TaskState, type OutputChunk, type TaskSpec, type TaskStatus } from "../gen/rexmesh/v1/task_pb.js";

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
    // A python script or playbook is as large as a shell script; their maps count per entry.
    else n += toBinary(StepSchema, step).length;
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
   * An ack costs what the task holds, whatever number it names.
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

/** What a backlog's index keeps of one held item: enough to answer acks without reading the item. */
interface Held {
  /** Position in push order. */
  n: number;
  bytes: number;
  taskId: string;
  output: boolean;
  /** An output chunk's seq (unused for a status). */
  seq: number;
  /** A status's state and source (unused for a chunk). */
  state: TaskState;
  atProxy: boolean;
}

/**
 * The items a backlog holds, by identity, by position and by task: shared
 * by the backlogs. An ack looks only at its task's held items, so what it
 * costs depends on what is held, never on the number it names (a seq of
 * 10^15 or a state of 2^31-1 once walked every number up to it).
 */
export class HeldItems {
  private readonly byKey = new Map<string, Held>();
  private readonly byNumber = new Set<number>();
  private readonly byTask = new Map<string, Set<string>>();
  private bytesHeld = 0;

  get size(): number {
    return this.byKey.size;
  }

  get bytes(): number {
    return this.bytesHeld;
  }

  has(key: string): boolean {
    return this.byKey.has(key);
  }

  /** The position of the item held under `key`, if any. */
  numberOf(key: string): number | undefined {
    return this.byKey.get(key)?.n;
  }

  /** Whether an item is held at position `n` (acknowledged items are not, though their removal may be in flight). */
  holdsNumber(n: number): boolean {
    return this.byNumber.has(n);
  }

  add(key: string, n: number, item: UpwardItem): void {
    const held: Held =
      item.kind === "output"
        ? { n, bytes: itemBytes(item), taskId: item.chunk.taskId, output: true, seq: Number(item.chunk.seq), state: TaskState.UNSPECIFIED, atProxy: false }
        : { n, bytes: itemBytes(item), taskId: item.status.taskId, output: false, seq: 0, state: item.status.state, atProxy: item.status.atProxy };
    this.byKey.set(key, held);
    this.byNumber.add(n);
    let keys = this.byTask.get(held.taskId);
    if (!keys) this.byTask.set(held.taskId, (keys = new Set()));
    keys.add(key);
    this.bytesHeld += held.bytes;
  }

  /** Forgets the item held under `key`; returns its position, or undefined when none was held. */
  remove(key: string): number | undefined {
    const held = this.byKey.get(key);
    if (!held) return undefined;
    this.byKey.delete(key);
    this.byNumber.delete(held.n);
    const keys = this.byTask.get(held.taskId);
    keys?.delete(key);
    if (keys?.size === 0) this.byTask.delete(held.taskId);
    this.bytesHeld -= held.bytes;
    return held.n;
  }

  /**
   * The keys an output ack drops (Backlog.ackOutput): the task's chunks up
   * to `seq`, except those at positions up to `keepUpTo` other than chunk
   * `seq` itself.
   */
  outputAcked(taskId: string, seq: number, keepUpTo: number): string[] {
    return this.select(taskId, (h) => h.output && h.seq <= seq && (h.seq === seq || h.n > keepUpTo));
  }

  /** The keys a status ack drops: the task's statuses up to `state` from one source. */
  statusAcked(taskId: string, state: TaskState, atProxy: boolean): string[] {
    return this.select(taskId, (h) => !h.output && h.atProxy === atProxy && h.state <= state);
  }

  private select(taskId: string, drops: (h: Held) => boolean): string[] {
    const out: string[] = [];
    for (const key of this.byTask.get(taskId) ?? []) if (drops(this.byKey.get(key)!)) out.push(key);
    return out;
  }
}

/** A backlog in memory: for tests and throwaway meshes. */
export class MemoryBacklog implements Backlog {
  private readonly items = new Map<string, UpwardItem>();
  private readonly held = new HeldItems();
  private next = 1;

  get size(): number {
    return this.held.size;
  }

  get bytes(): number {
    return this.held.bytes;
  }

  async push(items: readonly UpwardItem[]): Promise<void> {
    for (const item of items) {
      const key = upwardKey(item);
      if (this.held.has(key)) continue;
      this.items.set(key, item);
      this.held.add(key, this.next++, item);
    }
  }

  private drop(key: string): void {
    this.items.delete(key);
    this.held.remove(key);
  }

  async ackOutput(taskId: string, seq: number, keepUpTo = 0): Promise<void> {
    for (const key of this.held.outputAcked(taskId, seq, keepUpTo)) this.drop(key);
  }

  async ackStatus(taskId: string, state: TaskState, atProxy = false): Promise<void> {
    for (const key of this.held.statusAcked(taskId, state, atProxy)) this.drop(key);
  }

  all(): UpwardItem[] {
    return [...this.items.values()];
  }

  after(after: number, maxBytes: number): { n: number; item: UpwardItem }[] {
    const entries = [...this.items].map(([key, item]) => ({ n: this.held.numberOf(key)!, item }));
    return takeAfter(entries, after, maxBytes);
  }
}
