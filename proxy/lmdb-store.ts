import { fromBinary, toBinary } from "@bufbuild/protobuf";
import type { Database } from "lmdb";
import { LmdbBacklog } from "../common/lmdb-backlog.js";
import type { LmdbEnv } from "../common/lmdb.js";
import { SignedDenyListSchema, type SignedDenyList } from "../gen/rexmesh/v1/revocation_pb.js";
import { SignedTaskSchema, TaskSigningKeySchema, TaskSpecSchema, type SignedTask, type TaskSigningKey, type TaskState } from "../gen/rexmesh/v1/task_pb.js";
import { BacklogHolder, SigningKeyRing, TaskIndex, type ProxyStore, type QueuedTask, type TaskMark } from "./store.js";

interface StoredTask {
  /** The SignedTask, serialized; absent for a task learned from its host's reports. */
  signed?: Uint8Array;
  hostId: string;
  state: TaskState;
  cancelRequested: boolean;
  withdraw?: boolean;
  outputSeq: number;
  endedHere?: boolean;
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
 * The proxy's tasks, marks and result backlog in LMDB, so that a proxy
 * killed at any moment comes back with every task it acknowledged, the
 * highest output seq it acknowledged of each, every result it has not yet
 * handed to the controller, and what it must refuse to take twice. Task
 * records and marks are cached in memory (their number is bounded by the
 * region's queue and by the marks' lifetime).
 */
export class LmdbProxyStore extends BacklogHolder implements ProxyStore {
  private readonly db: Database<StoredTask, string>;
  private readonly marksDb: Database<{ kind: TaskMark; until: number }, string>;
  protected readonly backlog: LmdbBacklog;
  private readonly index = new TaskIndex();
  private readonly keysDb: Database<Buffer, string>;
  private readonly keys: SigningKeyRing;

  constructor(private readonly env: LmdbEnv) {
    super();
    this.db = env.db("proxy-tasks");
    this.marksDb = env.db("proxy-task-marks");
    this.keysDb = env.db("proxy-signing-keys", "binary");
    // A removal that fails leaves an ended key on disk, forgotten again at the next start.
    this.keys = new SigningKeyRing((keyId) => {
      this.keysDb.remove(keyId).catch(() => undefined);
    });
    this.backlog = new LmdbBacklog(env.db("proxy-backlog", "binary"), "");
    for (const { key, value } of this.db.getRange()) {
      const task: QueuedTask = { id: key, hostId: value.hostId, state: value.state, cancelRequested: value.cancelRequested, outputSeq: value.outputSeq };
      if (value.signed) {
        task.signed = fromBinary(SignedTaskSchema, value.signed);
        task.spec = fromBinary(TaskSpecSchema, task.signed.spec);
        task.hostId ||= task.spec.hostId;
      }
      if (value.withdraw) task.withdraw = true;
      if (value.endedHere) task.endedHere = true;
      this.index.put(task);
    }
    for (const { key, value } of this.marksDb.getRange()) this.index.marks.set(key, value);
    for (const { key, value } of this.keysDb.getRange()) {
      if (key === "\0deny-list") continue;
      this.keys.load(fromBinary(TaskSigningKeySchema, value));
    }
  }

  getTask(taskId: string): QueuedTask | undefined {
    return this.index.tasks.get(taskId);
  }

  putTask(task: QueuedTask): Promise<void> {
    this.index.put(task);
    if (task.volatile) return Promise.resolve();
    const stored: StoredTask = { hostId: task.hostId, state: task.state, cancelRequested: task.cancelRequested, outputSeq: task.outputSeq };
    if (task.signed) stored.signed = signedBytes(task.signed);
    if (task.withdraw) stored.withdraw = true;
    if (task.endedHere) stored.endedHere = true;
    return this.db.put(task.id, stored).then(() => undefined);
  }

  removeTask(taskId: string): Promise<void> {
    const volatile = this.index.tasks.get(taskId)?.volatile;
    this.index.remove(taskId);
    if (volatile) return Promise.resolve();
    return this.db.remove(taskId).then(() => undefined);
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

  mark(taskId: string, kind: TaskMark, until: number): Promise<void> {
    this.index.marks.set(taskId, { kind, until });
    return this.marksDb.put(taskId, { kind, until }).then(() => undefined);
  }

  unmark(taskId: string): Promise<void> {
    this.index.marks.delete(taskId);
    return this.marksDb.remove(taskId).then(() => undefined);
  }

  pruneMarks(now: number): Promise<number> {
    const gone = this.index.expiredMarks(now);
    return Promise.all(gone.map((id) => this.marksDb.remove(id))).then(() => gone.length);
  }

  denyList(): SignedDenyList | undefined {
    const raw = this.keysDb.get("\0deny-list");
    return raw ? fromBinary(SignedDenyListSchema, raw) : undefined;
  }

  setDenyList(list: SignedDenyList): Promise<void> {
    return this.keysDb.put("\0deny-list", Buffer.from(toBinary(SignedDenyListSchema, list))).then(() => undefined);
  }

  signingKeys(now: number): TaskSigningKey[] {
    return this.keys.live(now);
  }

  addSigningKeys(keys: readonly TaskSigningKey[], now: number): Promise<TaskSigningKey[]> {
    const fresh = this.keys.add(keys, now);
    return Promise.all(fresh.map((k) => this.keysDb.put(k.keyId, Buffer.from(toBinary(TaskSigningKeySchema, k))))).then(() => fresh);
  }

  checkRoomForWork(what: string): void {
    this.env.checkRoomForWork(what);
  }
}
