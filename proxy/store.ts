import type { SignedTask, TaskSigningKey, TaskSpec } from "../gen/rexmesh/v1/task_pb.js";
import type { SignedDenyList } from "../gen/rexmesh/v1/revocation_pb.js";
import { TaskState } from "../gen/rexmesh/v1/task_pb.js";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { MemoryBacklog, type Backlog, type UpwardItem } from "../common/backlog.js";

export type { UpwardItem };

/** A task the proxy holds for one of its hosts. */
export interface QueuedTask {
  id: string;
  hostId: string;
  /**
   * The task as the controller signed it: what the daemon receives,
   * unchanged. Absent for a task learned only from its host's reports (the
   * host got it through another proxy of the region and failed over here).
   */
  signed?: SignedTask;
  /** Its spec, decoded (untrusted here: the proxy only routes by it). */
  spec?: TaskSpec;
  state: TaskState;
  /** A cancel arrived; tell the daemon (or never hand the task out). */
  cancelRequested: boolean;
  /** The cancel asks only that the task not start: a running process is left alone. */
  withdraw?: boolean;
  /** Highest output seq stored here; a chunk at or below it is a duplicate. */
  outputSeq: number;
  /**
   * The proxy ended its own copy (expired or cancelled before handing it
   * over). The host may still have the task from another proxy: its reports
   * on it are still taken.
   */
  endedHere?: boolean;
  /**
   * Held in memory only, never stored (a ping: it runs nothing, is answered
   * at once and is harmless to send again). The proxy reports no QUEUED for
   * it, so the controller sends it again after the proxy restarts.
   */
  volatile?: boolean;
}

/**
 * What a proxy remembers of a task it no longer holds, until `until`:
 * - done: the host's end was acknowledged by the controller; a replay of the
 *   task is ignored and the host's repeats are only acknowledged;
 * - dropped: its own copy ended and was acknowledged; a replay is ignored,
 *   but the host's reports (it may have the task from elsewhere) are taken;
 * - cancelled: a cancel came before the task; if the task comes, it is
 *   cancelled at once.
 */
export type TaskMark = "done" | "dropped" | "cancelled";

/**
 * What the proxy keeps: tasks per host until the daemon has them, and
 * results until the controller has them. Behind an interface so the
 * durable LMDB store and the memory store are interchangeable.
 */
export interface ProxyStore {
  getTask(taskId: string): QueuedTask | undefined;
  putTask(task: QueuedTask): Promise<void>;
  removeTask(taskId: string): Promise<void>;
  /** Tasks of a host in arrival order. */
  tasksFor(hostId: string): QueuedTask[];
  allTasks(): QueuedTask[];
  markOf(taskId: string): TaskMark | undefined;
  mark(taskId: string, kind: TaskMark, until: number): Promise<void>;
  unmark(taskId: string): Promise<void>;
  /** Forgets marks whose time has passed; resolves to how many. */
  pruneMarks(now: number): Promise<number>;
  /** Appends to the upward backlog; resolves when stored. */
  pushUpward(items: readonly UpwardItem[]): Promise<void>;
  /** Drops a task's output chunks with seq ≤ seq from the backlog. */
  ackOutput(taskId: string, seq: number): Promise<void>;
  /** Drops a task's statuses at or before state, from one source, from the backlog. */
  ackStatus(taskId: string, state: TaskState, atProxy?: boolean): Promise<void>;
  /** Drops a host's event from the backlog (docs/triggers.md). */
  ackEvent(hostId: string, eventId: string): Promise<void>;
  /** The whole backlog in the order it was pushed. */
  upward(): UpwardItem[];
  /** Backlog items after a position, oldest first, about maxBytes: what a paced sender reads next. */
  upwardAfter(after: number, maxBytes: number): { n: number; item: UpwardItem }[];
  upwardSize(): number;
  /** Throws RESOURCE_EXHAUSTED when the store is too full for new work. */
  checkRoomForWork?(what: string): void;
  /**
   * The controller's task-signing keys still in force at `now`, passed on to
   * daemons (they verify them); those past their end are forgotten here.
   */
  signingKeys(now: number): TaskSigningKey[];
  /** Keeps the keys not held yet and not past their end; resolves to those, once stored. */
  addSigningKeys(keys: readonly TaskSigningKey[], now: number): Promise<TaskSigningKey[]>;
  /** The newest signed deny-list received, kept so that a restarted proxy enforces it before it reaches the controller. */
  denyList(): SignedDenyList | undefined;
  setDenyList(list: SignedDenyList): Promise<void>;
}

/** The in-memory index both stores keep: tasks by id and by host, and marks. */
export class TaskIndex {
  readonly tasks = new Map<string, QueuedTask>();
  private readonly byHost = new Map<string, Set<string>>();
  readonly marks = new Map<string, { kind: TaskMark; until: number }>();

  put(task: QueuedTask): void {
    this.tasks.set(task.id, task);
    let set = this.byHost.get(task.hostId);
    if (!set) this.byHost.set(task.hostId, (set = new Set()));
    set.add(task.id);
  }

  remove(taskId: string): void {
    const task = this.tasks.get(taskId);
    if (!task) return;
    this.tasks.delete(taskId);
    const set = this.byHost.get(task.hostId);
    set?.delete(taskId);
    if (set?.size === 0) this.byHost.delete(task.hostId);
  }

  tasksFor(hostId: string): QueuedTask[] {
    const out: QueuedTask[] = [];
    for (const id of this.byHost.get(hostId) ?? []) {
      const t = this.tasks.get(id);
      if (t) out.push(t);
    }
    return out;
  }

  /** Marks past their time, removed from the index. */
  expiredMarks(now: number): string[] {
    const out: string[] = [];
    for (const [id, m] of this.marks) if (m.until <= now) out.push(id);
    for (const id of out) this.marks.delete(id);
    return out;
  }
}

/**
 * How long past its end a signing key is still passed on: a daemon whose
 * clock runs behind the proxy's may still take tasks signed with it. (The
 * controller signs with a key renewed at half its 30 days, so no task is
 * signed near a key's end.)
 */
export const KEY_END_GRACE_MS = 60 * 60_000;

/**
 * The task-signing keys a proxy holds, by id. The controller renews its key
 * every 15 days and each renewal reaches every proxy, so without forgetting
 * ended keys every host's welcome would grow by a key a fortnight, for good.
 * `forget` removes an ended key from the store that holds it.
 */
export class SigningKeyRing {
  private readonly keys = new Map<string, { key: TaskSigningKey; end: number }>();

  constructor(private readonly forget?: (keyId: string) => void) {}

  private static end(key: TaskSigningKey): number {
    return key.notAfter ? timestampMs(key.notAfter) + KEY_END_GRACE_MS : 0;
  }

  /** Loads a stored key as it is (forgotten at the next look if ended). */
  load(key: TaskSigningKey): void {
    this.keys.set(key.keyId, { key, end: SigningKeyRing.end(key) });
  }

  live(now: number): TaskSigningKey[] {
    const out: TaskSigningKey[] = [];
    for (const [id, k] of this.keys) {
      if (k.end > now) out.push(k.key);
      else {
        this.keys.delete(id);
        this.forget?.(id);
      }
    }
    return out;
  }

  /** The keys of `keys` not held yet and not ended, now held. */
  add(keys: readonly TaskSigningKey[], now: number): TaskSigningKey[] {
    const fresh: TaskSigningKey[] = [];
    for (const key of keys) {
      const end = SigningKeyRing.end(key);
      if (this.keys.has(key.keyId) || end <= now) continue;
      this.keys.set(key.keyId, { key, end });
      fresh.push(key);
    }
    return fresh;
  }
}

/** The upward half of a proxy store: its results backlog, held by either store. */
export abstract class BacklogHolder {
  protected abstract readonly backlog: Backlog;

  pushUpward(items: readonly UpwardItem[]): Promise<void> {
    return this.backlog.push(items);
  }

  ackOutput(taskId: string, seq: number): Promise<void> {
    return this.backlog.ackOutput(taskId, seq);
  }

  ackStatus(taskId: string, state: TaskState, atProxy = false): Promise<void> {
    return this.backlog.ackStatus(taskId, state, atProxy);
  }

  ackEvent(hostId: string, eventId: string): Promise<void> {
    return this.backlog.ackEvent(hostId, eventId);
  }

  upward(): UpwardItem[] {
    return this.backlog.all();
  }

  upwardAfter(after: number, maxBytes: number): { n: number; item: UpwardItem }[] {
    return this.backlog.after(after, maxBytes);
  }

  upwardSize(): number {
    return this.backlog.size;
  }
}

export class MemoryProxyStore extends BacklogHolder implements ProxyStore {
  private readonly index = new TaskIndex();
  protected readonly backlog = new MemoryBacklog();
  private readonly keys = new SigningKeyRing();
  private deny: SignedDenyList | undefined;

  denyList(): SignedDenyList | undefined {
    return this.deny;
  }

  async setDenyList(list: SignedDenyList): Promise<void> {
    this.deny = list;
  }

  signingKeys(now: number): TaskSigningKey[] {
    return this.keys.live(now);
  }

  async addSigningKeys(keys: readonly TaskSigningKey[], now: number): Promise<TaskSigningKey[]> {
    return this.keys.add(keys, now);
  }

  getTask(taskId: string): QueuedTask | undefined {
    return this.index.tasks.get(taskId);
  }

  async putTask(task: QueuedTask): Promise<void> {
    this.index.put(task);
  }

  async removeTask(taskId: string): Promise<void> {
    this.index.remove(taskId);
  }

  tasksFor(hostId: string): QueuedTask[] {
    return this.index.tasksFor(hostId);
  }

  allTasks(): QueuedTask[] {
    return [...this.index.tasks.values()];
  }

  markOf(taskId: string): TaskMark | undefined {
    return this.index.marks.get(taskId)?.kind;
  }

  async mark(taskId: string, kind: TaskMark, until: number): Promise<void> {
    this.index.marks.set(taskId, { kind, until });
  }

  async unmark(taskId: string): Promise<void> {
    this.index.marks.delete(taskId);
  }

  async pruneMarks(now: number): Promise<number> {
    return this.index.expiredMarks(now).length;
  }

}

/** A task's delivery deadline in epoch ms, if the proxy knows it. */
export function deliverByOf(task: QueuedTask): number | undefined {
  return task.spec?.deliverBy ? timestampMs(task.spec.deliverBy) : undefined;
}
