import { toBinary } from "@bufbuild/protobuf";
import { StepSchema, TaskState, type OutputChunk, type TaskSpec, type TaskStatus } from "../gen/rexmesh/v1/task_pb.js";
import type { HostEvent } from "../gen/rexmesh/v1/event_pb.js";
import { eventBytes, eventKey } from "./host-event.js";

/**
 * A status, an output chunk or a host's event on its way up, kept until the
 * next hop acknowledges it. A status marked `volatile` is kept in memory
 * only, even by a backlog on disk: one whose loss with the process costs
 * nothing, since the next hop asks for it again (a ping's answer: the
 * controller sends a ping again to a proxy that comes back without having
 * confirmed it, docs/fan-out.md).
 */
export type UpwardItem = { kind: "status"; status: TaskStatus; volatile?: boolean } | { kind: "output"; chunk: OutputChunk } | { kind: "event"; event: HostEvent };

/** Whether a backlog keeps the item in memory only (see UpwardItem). */
export function isVolatile(item: UpwardItem): boolean {
  return item.kind === "status" && item.volatile === true;
}

/**
 * An item's identity in a backlog: a second item with the same identity is
 * a duplicate. A proxy's own end of its copy of a task (at_proxy) and the
 * host's end of the task may share a state and both be on their way.
 */
export function upwardKey(item: UpwardItem): string {
  if (item.kind === "event") return eventKey(item.event.hostId, item.event.id);
  return item.kind === "output" ? outputKey(item.chunk.taskId, item.chunk.seq) : statusKey(item.status.taskId, item.status.state, item.status.atProxy);
}

function outputKey(taskId: string, seq: number | bigint): string {
  return `o/${taskId}/${seq}`;
}

function statusKey(taskId: string, state: TaskState, atProxy: boolean): string {
  return `s/${taskId}/${state}${atProxy ? "/p" : ""}`;
}

/** Rough wire size of a task spec, for frame sizing. */
export function specBytes(spec: TaskSpec): number {
  let n = 256 + spec.stdin.length;
  for (const step of spec.steps) {
    if (step.tool.case === "exec") for (const a of step.tool.value.argv) n += a.length + 4;
    else if (step.tool.case === "shell") n += step.tool.value.script.length + 8;
    else if (step.tool.case === "ping") n += 4;
    // A python script or playbook is as large as a shell script; their maps count per entry.
    else n += toBinary(StepSchema, step).length;
  }
  for (const [k, v] of Object.entries(spec.env)) n += k.length + v.length + 8;
  return n;
}

/**
 * Rough wire size of an upward item, for frame sizing. A status counts its
 * message and signal: a host may make them long, and a frame sized as if
 * they were not (on the replay after a reconnect, say) could pass what a
 * message may be, be refused by the next hop, and be sent again on every
 * new link.
 */
export function itemBytes(item: UpwardItem): number {
  if (item.kind === "output") return item.chunk.data.length + 32;
  if (item.kind === "event") return eventBytes(item.event);
  const s = item.status;
  return 64 + s.signature.length + s.endMac.length + s.endMacKeyId.length + s.outputSha256.length + s.keyId.length + Buffer.byteLength(s.signal) + Buffer.byteLength(s.message);
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
   * Drops the task's chunks up to `seq`: an output ack is cumulative (the
   * receiver never acknowledges past a chunk it has not stored). An ack
   * costs what the task holds, whatever number it names.
   */
  ackOutput(taskId: string, seq: number): Promise<void>;
  /** Drops the task's statuses up to `state` from one source: the host's, or (atProxy) the proxy's own. */
  ackStatus(taskId: string, state: TaskState, atProxy?: boolean): Promise<void>;
  /** Drops a host's event (docs/triggers.md); one not held costs nothing. */
  ackEvent(hostId: string, eventId: string): Promise<void>;
  /** The highest seq of the task's chunks held (0: none); costs nothing like reading them. */
  topOutputSeq(taskId: string): number;
  /** Everything held, oldest first. */
  all(): UpwardItem[];
  /** Items pushed after position `after` (0: from the start), oldest first, about maxBytes (at least one). */
  after(after: number, maxBytes: number): { n: number; item: UpwardItem }[];
}

/** Merges sources that are each in increasing position order into one, in that order; a position seen twice is taken once. */
export function* mergeByPosition(...sources: Iterable<{ n: number; item: UpwardItem }>[]): Generator<{ n: number; item: UpwardItem }> {
  const its = sources.map((s) => s[Symbol.iterator]());
  const heads = its.map((it) => it.next());
  let last = -Infinity;
  for (;;) {
    let min = -1;
    for (let i = 0; i < heads.length; i++) {
      const h = heads[i]!;
      if (!h.done && (min < 0 || h.value.n < (heads[min]!.value as { n: number }).n)) min = i;
    }
    if (min < 0) return;
    const { value } = heads[min]! as IteratorYieldResult<{ n: number; item: UpwardItem }>;
    heads[min] = its[min]!.next();
    if (value.n === last) continue;
    last = value.n;
    yield value;
  }
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
export interface Held {
  /** The item's identity (upwardKey). */
  key: string;
  /** Position in push order. */
  n: number;
  bytes: number;
  taskId: string;
  output: boolean;
  /** A host's event: held by its key alone, in no task. */
  event: boolean;
  /** An output chunk's seq (unused for a status). */
  seq: number;
  /** A status's state and source (unused for a chunk). */
  state: TaskState;
  atProxy: boolean;
}

/**
 * One task's held items: its chunks in seq order (from `head` on; those
 * before it are acknowledged and wait to be cut off), its statuses in push
 * order (a few: one per state and source at most).
 */
class TaskHeld {
  chunks: Held[] = [];
  head = 0;
  statuses: Held[] = [];

  get empty(): boolean {
    return this.head === this.chunks.length && this.statuses.length === 0;
  }

  /** The first position at or after head whose chunk's seq is not below `seq`. */
  private seek(seq: number): number {
    return firstAtLeast(this.chunks, this.head, seq, (h) => h.seq);
  }

  addChunk(held: Held): void {
    const last = this.chunks.length > this.head ? this.chunks[this.chunks.length - 1]! : undefined;
    // Pushes come in seq order; a chunk pushed again after its write failed may come after later ones.
    if (!last || last.seq < held.seq) this.chunks.push(held);
    else this.chunks.splice(this.seek(held.seq), 0, held);
  }

  removeChunk(held: Held): void {
    // Seqs past 2^53 may share a number: the item itself is looked for among them.
    for (let i = this.seek(held.seq); i < this.chunks.length && this.chunks[i]!.seq === held.seq; i++) {
      if (this.chunks[i] === held) {
        this.chunks.splice(i, 1);
        return;
      }
    }
  }

  /** Takes the chunks up to `seq` off the front: costs what it takes. */
  takeChunksUpTo(seq: number): Held[] {
    const from = this.head;
    while (this.head < this.chunks.length && this.chunks[this.head]!.seq <= seq) this.head++;
    const taken = this.chunks.slice(from, this.head);
    ({ items: this.chunks, head: this.head } = cutFront(this.chunks, this.head));
    return taken;
  }

  topSeq(): number {
    return this.chunks.length > this.head ? this.chunks[this.chunks.length - 1]!.seq : 0;
  }
}

/**
 * The items a backlog holds, by identity, by position and by task: shared
 * by the backlogs. An ack looks only at its task's held items and costs
 * what it drops: a task's chunks are kept in seq order and an output ack
 * takes them off the front while their seq is up to the ack's, so that
 * neither the number it names (a seq of 10^15 or a state of 2^31-1 once
 * walked every number up to it) nor the chunks it leaves count.
 */
export class HeldItems {
  private readonly byKey = new Map<string, Held>();
  private readonly byNumber = new Set<number>();
  private readonly byTask = new Map<string, TaskHeld>();
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
      item.kind === "event"
        ? { key, n, bytes: itemBytes(item), taskId: "", output: false, event: true, seq: 0, state: TaskState.UNSPECIFIED, atProxy: false }
        : item.kind === "output"
          ? { key, n, bytes: itemBytes(item), taskId: item.chunk.taskId, output: true, event: false, seq: Number(item.chunk.seq), state: TaskState.UNSPECIFIED, atProxy: false }
          : { key, n, bytes: itemBytes(item), taskId: item.status.taskId, output: false, event: false, seq: 0, state: item.status.state, atProxy: item.status.atProxy };
    this.byKey.set(key, held);
    this.byNumber.add(n);
    if (held.event) {
      this.bytesHeld += held.bytes;
      return;
    }
    let task = this.byTask.get(held.taskId);
    if (!task) this.byTask.set(held.taskId, (task = new TaskHeld()));
    if (held.output) task.addChunk(held);
    else task.statuses.push(held);
    this.bytesHeld += held.bytes;
  }

  /** Forgets the item held under `key`; returns its position, or undefined when none was held. */
  remove(key: string): number | undefined {
    const held = this.byKey.get(key);
    if (!held) return undefined;
    if (held.event) {
      this.forget(held);
      return held.n;
    }
    const task = this.byTask.get(held.taskId)!;
    if (held.output) task.removeChunk(held);
    else task.statuses.splice(task.statuses.indexOf(held), 1);
    this.forget(held, task);
    return held.n;
  }

  /** Takes the items an output ack drops (Backlog.ackOutput): the task's chunks up to `seq`. */
  takeOutputAcked(taskId: string, seq: number): Held[] {
    const task = this.byTask.get(taskId);
    if (!task) return [];
    const taken = task.takeChunksUpTo(seq);
    for (const held of taken) this.forget(held, task);
    return taken;
  }

  /** Takes the items a status ack drops: the task's statuses up to `state` from one source. */
  takeStatusAcked(taskId: string, state: TaskState, atProxy: boolean): Held[] {
    const task = this.byTask.get(taskId);
    if (!task) return [];
    const taken: Held[] = [];
    const kept: Held[] = [];
    for (const held of task.statuses) (held.atProxy === atProxy && held.state <= state ? taken : kept).push(held);
    task.statuses = kept;
    for (const held of taken) this.forget(held, task);
    return taken;
  }

  /** Takes the event an event ack drops, if held. */
  takeEventAcked(hostId: string, eventId: string): Held[] {
    const held = this.byKey.get(eventKey(hostId, eventId));
    if (!held?.event) return [];
    this.forget(held);
    return [held];
  }

  /** The highest seq of the task's chunks held (0: none). */
  topOutputSeq(taskId: string): number {
    return this.byTask.get(taskId)?.topSeq() ?? 0;
  }

  /** Drops an item, already out of its task's lists (an event is in none), from the other indexes. */
  private forget(held: Held, task?: TaskHeld): void {
    this.byKey.delete(held.key);
    this.byNumber.delete(held.n);
    this.bytesHeld -= held.bytes;
    if (task?.empty) this.byTask.delete(held.taskId);
  }
}

/** An item at its position in a backlog's push order. */
export interface Positioned {
  readonly n: number;
  readonly item: UpwardItem;
}

/**
 * Items in push order (increasing positions), read from a position on
 * without walking what comes before it: what a backlog holds in memory. A
 * sender reads "after the last position it sent" once per turn while a
 * fleet's answers come in; walking every held item on each read (a Map
 * from its start) made that quadratic and allocated an entry per item per
 * read (a quarter of a proxy's allocations in a 4,000-host ping). A removed
 * item leaves a hole, found by binary search; holes are swept out once they
 * are most of the array, so each item is moved about once, amortized.
 */
export class PositionLog {
  private entries: { n: number; item: UpwardItem | undefined }[] = [];
  private holes = 0;

  get size(): number {
    return this.entries.length - this.holes;
  }

  /** Slots in use, holes included: at most about twice the items held (what removal leaves is swept). */
  get slots(): number {
    return this.entries.length;
  }

  /** Adds an item at a position above every position added before. */
  add(n: number, item: UpwardItem): void {
    const last = this.entries[this.entries.length - 1];
    if (last && last.n >= n) throw new Error(`position ${n} added after ${last.n}`);
    this.entries.push({ n, item });
  }

  /** Removes the item at `n`; whether one was held there. */
  delete(n: number): boolean {
    const i = this.seek(n);
    const e = this.entries[i];
    if (!e || e.n !== n || e.item === undefined) return false;
    e.item = undefined;
    this.holes++;
    if (this.holes === this.entries.length) {
      this.entries = [];
      this.holes = 0;
    } else if (this.holes > 64 && this.holes * 2 > this.entries.length) {
      this.entries = this.entries.filter((x) => x.item !== undefined);
      this.holes = 0;
    }
    return true;
  }

  /** The items at positions above `after`, in order. Nothing may be added or removed while this is read. */
  *after(after: number): Generator<Positioned> {
    const entries = this.entries;
    for (let i = this.seek(after + 1); i < entries.length; i++) {
      const e = entries[i]!;
      if (e.item !== undefined) yield e as Positioned;
    }
  }

  /** The first index whose position is not below `n`. */
  private seek(n: number): number {
    return firstAtLeast(this.entries, 0, n, (e) => e.n);
  }
}

/** In `items` sorted by `numberOf` from index `from` on, the first index whose number is not below `value` (binary search). */
function firstAtLeast<T>(items: readonly T[], from: number, value: number, numberOf: (item: T) => number): number {
  let lo = from;
  let hi = items.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (numberOf(items[mid]!) < value) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** A backlog in memory: for tests and throwaway meshes. */
export class MemoryBacklog implements Backlog {
  private readonly items = new PositionLog();
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
      const n = this.next++;
      this.items.add(n, item);
      this.held.add(key, n, item);
    }
  }

  async ackOutput(taskId: string, seq: number): Promise<void> {
    for (const { n } of this.held.takeOutputAcked(taskId, seq)) this.items.delete(n);
  }

  async ackStatus(taskId: string, state: TaskState, atProxy = false): Promise<void> {
    for (const { n } of this.held.takeStatusAcked(taskId, state, atProxy)) this.items.delete(n);
  }

  async ackEvent(hostId: string, eventId: string): Promise<void> {
    for (const { n } of this.held.takeEventAcked(hostId, eventId)) this.items.delete(n);
  }

  topOutputSeq(taskId: string): number {
    return this.held.topOutputSeq(taskId);
  }

  all(): UpwardItem[] {
    return Array.from(this.items.after(0), (e) => e.item);
  }

  after(after: number, maxBytes: number): { n: number; item: UpwardItem }[] {
    return takeAfter(this.items.after(after), after, maxBytes);
  }
}

/**
 * An array read from the front by an index (`head`), without a shift() per
 * item: the front already read is cut off once it is most of the array, so
 * each item is moved about once, amortized.
 */
export function cutFront<T>(items: T[], head: number): { items: T[]; head: number } {
  if (head === items.length) return { items: [], head: 0 };
  if (head > 64 && head * 2 > items.length) return { items: items.slice(head), head: 0 };
  return { items, head };
}
