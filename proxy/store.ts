import type { SignedTask, TaskSigningKey, TaskSpec } from "../gen/rexmesh/v1/task_pb.js";
import type { SignedDenyList } from "../gen/rexmesh/v1/revocation_pb.js";
import { TaskState } from "../gen/rexmesh/v1/task_pb.js";
import { MemoryBacklog, type UpwardItem } from "../common/backlog.js";

export type { UpwardItem };

/** A task the proxy holds for one of its hosts. */
export interface QueuedTask {
  /** The task as the controller signed it: what the daemon receives, unchanged. */
  signed: SignedTask;
  /** Its spec, decoded (untrusted here: the proxy only routes by it). */
  spec: TaskSpec;
  state: TaskState;
  /** A cancel arrived; tell the daemon (or never hand the task out). */
  cancelRequested: boolean;
  /** Output chunks held, contiguous from seq 1. */
  outputSeq: number;
}

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
  /** Appends to the upward backlog; resolves when stored. */
  pushUpward(items: readonly UpwardItem[]): Promise<void>;
  /** Drops a task's output chunks with seq ≤ seq from the backlog. */
  ackOutput(taskId: string, seq: number): Promise<void>;
  /** Drops a task's statuses at or before state from the backlog. */
  ackStatus(taskId: string, state: TaskState): Promise<void>;
  /** The whole backlog in the order it was pushed. */
  upward(): UpwardItem[];
  /** Backlog items after a position, oldest first, about maxBytes: what a paced sender reads next. */
  upwardAfter(after: number, maxBytes: number): { n: number; item: UpwardItem }[];
  upwardSize(): number;
  /** Throws RESOURCE_EXHAUSTED when the store is too full for new work. */
  checkRoomForWork?(what: string): void;
  /** The controller's task-signing keys, passed on to daemons (they verify them). */
  signingKeys(): TaskSigningKey[];
  addSigningKeys(keys: readonly TaskSigningKey[]): Promise<void>;
  /** The newest signed deny-list received, kept so that a restarted proxy enforces it before it reaches the controller. */
  denyList(): SignedDenyList | undefined;
  setDenyList(list: SignedDenyList): Promise<void>;
}

export class MemoryProxyStore implements ProxyStore {
  private readonly tasks = new Map<string, QueuedTask>();
  private readonly byHost = new Map<string, Set<string>>();
  private readonly backlog = new MemoryBacklog();
  private readonly keys = new Map<string, TaskSigningKey>();
  private deny: SignedDenyList | undefined;

  denyList(): SignedDenyList | undefined {
    return this.deny;
  }

  async setDenyList(list: SignedDenyList): Promise<void> {
    this.deny = list;
  }

  signingKeys(): TaskSigningKey[] {
    return [...this.keys.values()];
  }

  async addSigningKeys(keys: readonly TaskSigningKey[]): Promise<void> {
    for (const k of keys) this.keys.set(k.keyId, k);
  }

  getTask(taskId: string): QueuedTask | undefined {
    return this.tasks.get(taskId);
  }

  async putTask(task: QueuedTask): Promise<void> {
    this.tasks.set(task.spec.taskId, task);
    let set = this.byHost.get(task.spec.hostId);
    if (!set) this.byHost.set(task.spec.hostId, (set = new Set()));
    set.add(task.spec.taskId);
  }

  async removeTask(taskId: string): Promise<void> {
    const task = this.tasks.get(taskId);
    if (!task) return;
    this.tasks.delete(taskId);
    const set = this.byHost.get(task.spec.hostId);
    set?.delete(taskId);
    if (set?.size === 0) this.byHost.delete(task.spec.hostId);
  }

  tasksFor(hostId: string): QueuedTask[] {
    return [...(this.byHost.get(hostId) ?? [])].map((id) => this.tasks.get(id)!).filter(Boolean);
  }

  allTasks(): QueuedTask[] {
    return [...this.tasks.values()];
  }

  async pushUpward(items: readonly UpwardItem[]): Promise<void> {
    this.backlog.push(items);
  }

  async ackOutput(taskId: string, seq: number): Promise<void> {
    this.backlog.ackOutput(taskId, seq);
  }

  async ackStatus(taskId: string, state: TaskState): Promise<void> {
    this.backlog.ackStatus(taskId, state);
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
