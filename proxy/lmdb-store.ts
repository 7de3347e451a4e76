import { fromBinary, toBinary } from "@bufbuild/protobuf";
import type { Database } from "lmdb";
import { LmdbBacklog } from "../common/lmdb-backlog.js";
import type { LmdbEnv } from "../common/lmdb.js";
import { SignedDenyListSchema, type SignedDenyList } from "../gen/rexmesh/v1/revocation_pb.js";
import { SignedTaskSchema, TaskSigningKeySchema, TaskSpecSchema, type SignedTask, type TaskSigningKey, type TaskState } from "../gen/rexmesh/v1/task_pb.js";
import type { ProxyStore, QueuedTask, UpwardItem } from "./store.js";

interface StoredTask {
  /** The SignedTask, serialized. */
  signed: Uint8Array;
  state: TaskState;
  cancelRequested: boolean;
  outputSeq: number;
}

/**
 * A task's signed form never changes while its state does: it is serialized
 * once, not at every state change (that re-encoding was the proxy's largest
 * single cost in the ping profile).
 */
const encodedSigned = new WeakMap<SignedTask, Uint8Array>();
function signedBytes(signed: SignedTask): Uint8Array {
  let bytes = encodedSigned.get(signed);
  if (!bytes) encodedSigned.set(signed, (bytes = toBinary(SignedTaskSchema, signed)));
  return bytes;
}

/**
 * The proxy's tasks and result backlog in LMDB, so that a proxy killed at
 * any moment comes back with every task it acknowledged and every result it
 * has not yet handed to the controller. Task records are cached in memory
 * (they are small and their number is bounded by the region's queue).
 */
export class LmdbProxyStore implements ProxyStore {
  private readonly db: Database<StoredTask, string>;
  private readonly backlog: LmdbBacklog;
  private readonly tasks = new Map<string, QueuedTask>();
  private readonly byHost = new Map<string, Set<string>>();
  private readonly keysDb: Database<Buffer, string>;
  private readonly keys = new Map<string, TaskSigningKey>();

  constructor(private readonly env: LmdbEnv) {
    this.db = env.db("proxy-tasks");
    this.keysDb = env.db("proxy-signing-keys", "binary");
    this.backlog = new LmdbBacklog(env.db("proxy-backlog", "binary"), "");
    for (const { key, value } of this.db.getRange()) {
      const signed = fromBinary(SignedTaskSchema, value.signed);
      const task: QueuedTask = { signed, spec: fromBinary(TaskSpecSchema, signed.spec), state: value.state, cancelRequested: value.cancelRequested, outputSeq: value.outputSeq };
      this.index(task);
      void key;
    }
    for (const { key, value } of this.keysDb.getRange()) {
      if (key === "\0deny-list") continue;
      const k = fromBinary(TaskSigningKeySchema, value);
      this.keys.set(k.keyId, k);
    }
  }

  private index(task: QueuedTask): void {
    this.tasks.set(task.spec.taskId, task);
    let set = this.byHost.get(task.spec.hostId);
    if (!set) this.byHost.set(task.spec.hostId, (set = new Set()));
    set.add(task.spec.taskId);
  }

  getTask(taskId: string): QueuedTask | undefined {
    return this.tasks.get(taskId);
  }

  putTask(task: QueuedTask): Promise<void> {
    this.index(task);
    return this.db
      .put(task.spec.taskId, { signed: signedBytes(task.signed), state: task.state, cancelRequested: task.cancelRequested, outputSeq: task.outputSeq })
      .then(() => undefined);
  }

  removeTask(taskId: string): Promise<void> {
    const task = this.tasks.get(taskId);
    if (task) {
      this.tasks.delete(taskId);
      const set = this.byHost.get(task.spec.hostId);
      set?.delete(taskId);
      if (set?.size === 0) this.byHost.delete(task.spec.hostId);
    }
    return this.db.remove(taskId).then(() => undefined);
  }

  tasksFor(hostId: string): QueuedTask[] {
    return [...(this.byHost.get(hostId) ?? [])].map((id) => this.tasks.get(id)!).filter(Boolean);
  }

  allTasks(): QueuedTask[] {
    return [...this.tasks.values()];
  }

  pushUpward(items: readonly UpwardItem[]): Promise<void> {
    return this.backlog.push(items);
  }

  ackOutput(taskId: string, seq: number): Promise<void> {
    return this.backlog.ackOutput(taskId, seq);
  }

  ackStatus(taskId: string, state: TaskState): Promise<void> {
    return this.backlog.ackStatus(taskId, state);
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

  denyList(): SignedDenyList | undefined {
    const raw = this.keysDb.get("\0deny-list");
    return raw ? fromBinary(SignedDenyListSchema, raw) : undefined;
  }

  setDenyList(list: SignedDenyList): Promise<void> {
    return this.keysDb.put("\0deny-list", Buffer.from(toBinary(SignedDenyListSchema, list))).then(() => undefined);
  }

  signingKeys(): TaskSigningKey[] {
    return [...this.keys.values()];
  }

  addSigningKeys(keys: readonly TaskSigningKey[]): Promise<void> {
    const writes: Promise<unknown>[] = [];
    for (const k of keys) {
      if (this.keys.has(k.keyId)) continue;
      this.keys.set(k.keyId, k);
      writes.push(this.keysDb.put(k.keyId, Buffer.from(toBinary(TaskSigningKeySchema, k))));
    }
    return Promise.all(writes).then(() => undefined);
  }

  checkRoomForWork(what: string): void {
    this.env.checkRoomForWork(what);
  }
}
