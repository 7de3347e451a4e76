import type { Clock, Timer } from "../common/clock.js";
import type { Logger } from "../common/logger.js";
import { isTerminal } from "../common/task-state.js";
import { TaskState } from "../gen/rexmesh/v1/task_pb.js";
import type { Inventory } from "./inventory.js";
import type { JobRecord, TaskRecord } from "./model.js";
import type { Router } from "./router.js";

export interface TaskBoundsOptions {
  clock: Clock;
  log: Logger;
  router: Router;
  inventory: Inventory;
  jobOf: (task: TaskRecord) => JobRecord | undefined;
  /** Every unfinished job (each open task's job is one of them). */
  unfinishedJobs: () => Iterable<JobRecord>;
  /** Ends a task at the controller; with `recall`, its holders are owed a cancel. */
  end: (task: TaskRecord, state: TaskState, message: string, recall?: { withdraw: boolean }) => Promise<void>;
  /** How often open tasks are looked at. Default 1 s. */
  sweepMs?: number;
  /** lost_after of jobs stored without one. Default 15 minutes. */
  defaultLostAfterMs?: number;
  /** After a cancel, how long a reachable host has to confirm. Default 10 s. */
  cancelGraceMs?: number;
  /**
   * After a delivery deadline, how long proxies have to report the expiry
   * of tasks they held before the controller decides for an unreachable
   * host. Default 30 s.
   */
  expiryGraceMs?: number;
}

/**
 * Every accepted task reaches a terminal state in bounded time, whatever
 * happens to its host. Once a second this looks at every open task:
 *
 * - never handed to any proxy and past its delivery deadline: EXPIRED;
 * - of a cancelled job, unconfirmed past the cancel grace: CANCELLED;
 * - not yet delivered past its delivery deadline plus the expiry grace,
 *   while its host is reachable: EXPIRED (its proxy should have said so);
 * - its host unreachable (no stream at a proxy whose link is up) for the
 *   job's lost_after — for a task not yet delivered, also past its delivery
 *   deadline plus the expiry grace: LOST. The proxies that may hold it are
 *   owed a withdrawal, so that it never starts later; what the host reports
 *   if it does come back is kept as the task's late report.
 *
 * Hosts a restarted controller has not heard of yet count as unreachable
 * from its start (see Inventory), not from before.
 */
export class TaskBounds {
  private readonly opts: Required<Omit<TaskBoundsOptions, "sweepMs" | "cancelGraceMs" | "expiryGraceMs" | "defaultLostAfterMs">>;
  private readonly sweepMs: number;
  private readonly cancelGraceMs: number;
  private readonly expiryGraceMs: number;
  private readonly defaultLostAfterMs: number;
  private timer: Timer | undefined;
  private running = false;

  constructor(opts: TaskBoundsOptions) {
    this.opts = opts;
    this.sweepMs = opts.sweepMs ?? 1000;
    this.cancelGraceMs = opts.cancelGraceMs ?? 10_000;
    this.expiryGraceMs = opts.expiryGraceMs ?? 30_000;
    this.defaultLostAfterMs = opts.defaultLostAfterMs ?? 15 * 60_000;
  }

  start(): void {
    if (this.running) return;
    this.running = true;
    this.schedule();
  }

  stop(): void {
    this.running = false;
    this.timer?.cancel();
  }

  private schedule(): void {
    if (!this.running) return;
    this.timer = this.opts.clock.setTimeout(() => {
      try {
        this.sweep();
      } catch (err) {
        this.opts.log.error("checking task bounds failed", { err });
      }
      this.schedule();
    }, this.sweepMs);
  }

  /** Ends every open task that is past its bound. */
  sweep(): void {
    const now = this.opts.clock.now();
    const { router, inventory } = this.opts;
    const due: [TaskRecord, TaskState, string, { withdraw: boolean } | undefined][] = [];
    // A task of a reachable host can be due only once its job is cancelled or past its delivery
    // deadline: while no job is, such hosts' tasks are not looked at (a fleet-wide job's hosts all
    // are reachable, and this runs every second while it lasts).
    let quiet = true;
    for (const job of this.opts.unfinishedJobs()) {
      if (job.cancelRequested || now >= job.deliverBy) {
        quiet = false;
        break;
      }
    }
    for (const [hostId, ids] of router.openByHost()) {
      const host = inventory.get(hostId);
      const reachable = router.reachable(host);
      if (quiet && reachable) continue;
      const since = host && !reachable ? (host.connected ? now : host.since) : now;
      for (const id of ids) {
        const task = router.openTask(id);
        if (!task || isTerminal(task.state)) continue;
        const job = this.opts.jobOf(task);
        if (!job) continue;
        const held = (task.proxies?.length ?? 0) > 0;
        if (!held) {
          if (task.state === TaskState.PENDING && now >= job.deliverBy) due.push([task, TaskState.EXPIRED, "the delivery deadline passed before the host could be reached", undefined]);
          continue;
        }
        if (job.cancelRequested && now >= (job.cancelRequestedAt ?? now) + this.cancelGraceMs) {
          due.push([task, TaskState.CANCELLED, `cancelled at the controller: host ${hostId} did not confirm within ${Math.round(this.cancelGraceMs / 1000)}s; it is told when it can be reached`, { withdraw: false }]);
          continue;
        }
        // Past its delivery deadline and the proxies' grace, a task no host has reported delivered ends here,
        // also when its host is reachable: a proxy that holds it back (stuck, or compromised) cannot keep it open.
        if (reachable && task.state < TaskState.DELIVERED && now >= job.deliverBy + this.expiryGraceMs) {
          due.push([task, TaskState.EXPIRED, "the delivery deadline passed and no proxy holding the task reported it delivered", { withdraw: true }]);
          continue;
        }
        if (reachable) continue;
        const lostAfterMs = job.lostAfterMs > 0 ? job.lostAfterMs : this.defaultLostAfterMs;
        let lostAt = since + lostAfterMs;
        if (task.state < TaskState.DELIVERED) lostAt = Math.max(lostAt, job.deliverBy + this.expiryGraceMs);
        if (now >= lostAt) {
          const away = host ? `unreachable since ${new Date(since).toISOString()}` : "unknown to the controller";
          due.push([task, TaskState.LOST, `host ${hostId} ${away} (lost after ${formatMs(lostAfterMs)}); the task may have run, and what the host reports if it returns is kept`, { withdraw: true }]);
        }
      }
    }
    for (const [task, state, message, recall] of due) {
      this.opts.log.warn("task ended at the controller", { task: task.id, host: task.hostId, state: TaskState[state], message });
      this.opts.end(task, state, message, recall).catch((err) => this.opts.log.error("ending a task failed", { task: task.id, err }));
    }
  }
}

function formatMs(ms: number): string {
  if (ms % 3_600_000 === 0) return `${ms / 3_600_000}h`;
  if (ms % 60_000 === 0) return `${ms / 60_000}m`;
  if (ms % 1000 === 0) return `${ms / 1000}s`;
  return `${ms}ms`;
}
