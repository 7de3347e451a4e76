import type { TaskState } from "../gen/rexmesh/v1/task_pb.js";
import type { ProxyStore, QueuedTask } from "./store.js";

/** The fields of a task record that a host's reports, a hand-over or an expiry move. */
interface Progress {
  state: TaskState;
  endedHere: boolean | undefined;
  outputSeq: number;
}

const progressOf = (t: QueuedTask): Progress => ({ state: t.state, endedHere: t.endedHere, outputSeq: t.outputSeq });

/**
 * What one write's worth of changes (a host's frame, a hand-over, a sweep)
 * did to the proxy's task records. The records change before the write
 * commits (later items of a frame, and other paths, read them), so when the
 * write fails they are put back. A host is not acknowledged then and sends
 * the same reports again: they must count as new, else they would be
 * acknowledged and never kept. A task not handed over, or not expired,
 * waits again.
 */
export class TaskUndo {
  private readonly before = new Map<QueuedTask, { was: Progress; taken: boolean }>();
  private readonly set = new Map<QueuedTask, Progress>();

  /** Call before changing a task. */
  touch(task: QueuedTask): void {
    if (!this.before.has(task)) this.before.set(task, { was: progressOf(task), taken: false });
  }

  /** A record the frame creates (a task the host brought from another proxy). */
  taken(task: QueuedTask): void {
    this.before.set(task, { was: progressOf(task), taken: true });
  }

  /** The records the frame created. */
  created(): QueuedTask[] {
    return [...this.before].filter(([, b]) => b.taken).map(([task]) => task);
  }

  /** The writes are issued: what they set is noted, so that undo leaves alone what other paths changed since. */
  issued(): void {
    for (const task of this.before.keys()) this.set.set(task, progressOf(task));
  }

  /**
   * Puts the records back in memory and rewrites them (or removes the ones
   * the frame created), so that the store agrees whatever part of the
   * failed commit went through. Resolves once those writes settle; a failed
   * one is passed to `failed`.
   */
  async undo(store: ProxyStore, failed: (err: unknown, taskId: string) => void): Promise<void> {
    const writes: Promise<void>[] = [];
    for (const [task, { was, taken }] of this.before) {
      if (store.getTask(task.id) !== task) continue; // settled or replaced meanwhile
      const set = this.set.get(task) ?? progressOf(task);
      if (task.state === set.state) task.state = was.state;
      if (task.endedHere === set.endedHere) task.endedHere = was.endedHere;
      if (task.outputSeq === set.outputSeq) task.outputSeq = was.outputSeq;
      // A record created by the frame goes, unless the controller has since sent the task itself.
      const write = taken && !task.signed ? store.removeTask(task.id) : store.putTask(task);
      writes.push(write.catch((err: unknown) => failed(err, task.id)));
    }
    await Promise.all(writes);
  }
}
