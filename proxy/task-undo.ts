import type { SignedTask, TaskSpec, TaskState } from "../gen/rexmesh/v1/task_pb.js";
import type { ProxyStore, QueuedTask } from "./store.js";

/** The fields of a task record that a host's reports, a hand-over, an expiry or a controller's frame move. */
interface Progress {
  state: TaskState;
  endedHere: boolean | undefined;
  outputSeq: number;
  cancelRequested: boolean;
  withdraw: boolean | undefined;
  signed: SignedTask | undefined;
  spec: TaskSpec | undefined;
}

const FIELDS = ["state", "endedHere", "outputSeq", "cancelRequested", "withdraw", "signed", "spec"] as const;

const progressOf = (t: QueuedTask): Progress => ({
  state: t.state,
  endedHere: t.endedHere,
  outputSeq: t.outputSeq,
  cancelRequested: t.cancelRequested,
  withdraw: t.withdraw,
  signed: t.signed,
  spec: t.spec,
});

/** How a record came into the write: changed, created from a host's reports, or created by the write (a new task). */
type Origin = "touched" | "taken" | "added";

/**
 * What one write's worth of changes (a host's frame, a hand-over, a sweep,
 * a controller's frame) did to the proxy's task records. The records change before the write
 * commits (later items of a frame, and other paths, read them), so when the
 * write fails they are put back. A host is not acknowledged then and sends
 * the same reports again: they must count as new, else they would be
 * acknowledged and never kept. A task not handed over, or not expired,
 * waits again.
 */
export class TaskUndo {
  // Made on first use: most frames (a ping's answer, a hand-over of nothing) touch one task or none.
  private before: Map<QueuedTask, { was: Progress; origin: Origin }> | undefined;
  private set: Map<QueuedTask, Progress> | undefined;
  private anyTaken = false;

  /** Call before changing a task. */
  touch(task: QueuedTask): void {
    const before = (this.before ??= new Map());
    if (!before.has(task)) before.set(task, { was: progressOf(task), origin: "touched" });
  }

  /** A record the frame creates from a host's reports (a task the host brought from another proxy). */
  taken(task: QueuedTask): void {
    (this.before ??= new Map()).set(task, { was: progressOf(task), origin: "taken" });
    this.anyTaken = true;
  }

  /** A record the write creates for a task the controller sent: removed if the write fails. */
  added(task: QueuedTask): void {
    (this.before ??= new Map()).set(task, { was: progressOf(task), origin: "added" });
  }

  /** The records the frame took on from a host's reports. */
  created(): QueuedTask[] {
    if (!this.anyTaken || !this.before) return [];
    return [...this.before].filter(([, b]) => b.origin === "taken").map(([task]) => task);
  }

  /** The writes are issued: what they set is noted, so that undo leaves alone what other paths changed since. */
  issued(): void {
    if (!this.before) return;
    const set = (this.set ??= new Map());
    for (const task of this.before.keys()) set.set(task, progressOf(task));
  }

  /**
   * Puts the records back in memory and rewrites them (or removes the ones
   * the frame created), so that the store agrees whatever part of the
   * failed commit went through. Resolves once those writes settle; a failed
   * one is passed to `failed`.
   */
  async undo(store: ProxyStore, failed: (err: unknown, taskId: string) => void): Promise<void> {
    if (!this.before) return;
    const writes: Promise<void>[] = [];
    for (const [task, { was, origin }] of this.before) {
      if (store.getTask(task.id) !== task) continue; // settled or replaced meanwhile
      const set = this.set?.get(task) ?? progressOf(task);
      const record = task as unknown as Record<string, unknown>;
      for (const f of FIELDS) if (task[f] === set[f]) record[f] = was[f];
      // A record created by the write goes; one taken on from a host's reports stays if the controller has since sent the task itself.
      const gone = origin === "added" || (origin === "taken" && !task.signed);
      const write = gone ? store.removeTask(task.id) : store.putTask(task);
      writes.push(write.catch((err: unknown) => failed(err, task.id)));
    }
    await Promise.all(writes);
  }
}
