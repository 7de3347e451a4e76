import { InvalidArgumentError } from "../common/errors.js";
import { isTerminal } from "../common/task-state.js";
import { TaskState } from "../gen/rexmesh/v1/task_pb.js";
import type { JobRate, TaskRecord } from "./model.js";
import type { RateRequest } from "./planner.js";

/** Terminal states that spend a job's error budget. */
const ERROR_STATES: ReadonlySet<TaskState> = new Set([
  TaskState.FAILED,
  TaskState.TIMED_OUT,
  TaskState.INTERRUPTED,
  TaskState.REJECTED,
  TaskState.EXPIRED,
  TaskState.LOST,
]);

/** In-memory fan-out state of a rate-controlled job. */
interface Gate {
  rate: JobRate;
  /** Unreleased task ids per region, in submission order. */
  queues: Map<string, string[]>;
  inFlight: number;
  inFlightByRegion: Map<string, number>;
  failures: number;
  canaryOpen: Set<string>;
  /** No more releases: the error budget is spent or the canary failed. */
  stopped: string | undefined;
}

export interface RolloutOptions {
  /** A live task by id. */
  task: (id: string) => TaskRecord | undefined;
  /** A task was released (its `released` flag is set): store it and route it. */
  release: (task: TaskRecord) => void;
  /** A task will never be released: end it SKIPPED with this reason. */
  skip: (task: TaskRecord, reason: string) => void;
}

/**
 * The rate gate of jobs with rate control: how many tasks are in flight at
 * once (overall and per region), the canary batch that must succeed before
 * the rest start, and the error budget after which tasks not yet released
 * end SKIPPED. Jobs without limits never pass through here.
 */
export class Rollout {
  private readonly gates = new Map<string, Gate>();

  constructor(private readonly opts: RolloutOptions) {}

  /** Starts gating a job (at submit, or after a restart from its stored tasks). */
  add(jobId: string, rate: JobRate, tasks: readonly TaskRecord[]): void {
    const gate: Gate = { rate, queues: new Map(), inFlight: 0, inFlightByRegion: new Map(), failures: 0, canaryOpen: new Set(), stopped: undefined };
    const canary = new Set(rate.canary);
    for (const t of tasks) {
      if (ERROR_STATES.has(t.state)) gate.failures++;
      if (canary.has(t.id) && !isTerminal(t.state)) gate.canaryOpen.add(t.id);
      if (t.released) {
        if (!isTerminal(t.state)) this.countFlight(gate, t, 1);
      } else if (t.state === TaskState.PENDING && t.rejectAtSubmit === undefined) {
        let q = gate.queues.get(t.region);
        if (!q) gate.queues.set(t.region, (q = []));
        q.push(t.id);
      }
    }
    this.gates.set(jobId, gate);
  }

  forget(jobId: string): void {
    this.gates.delete(jobId);
  }

  private countFlight(gate: Gate, task: TaskRecord, delta: number): void {
    gate.inFlight += delta;
    gate.inFlightByRegion.set(task.region, (gate.inFlightByRegion.get(task.region) ?? 0) + delta);
  }

  /**
   * Releases as many waiting tasks of a job as its limits allow, taking
   * regions in turn so that one region cannot starve another.
   */
  release(jobId: string): void {
    const gate = this.gates.get(jobId);
    if (!gate || gate.stopped) return;
    const { rate } = gate;
    const limit = rate.concurrency || Infinity;
    const canaryPhase = gate.canaryOpen.size > 0;
    const regions = [...gate.queues.keys()];
    let progress = true;
    while (progress && gate.inFlight < limit) {
      progress = false;
      for (const region of regions) {
        if (gate.inFlight >= limit) break;
        if (rate.perRegion && (gate.inFlightByRegion.get(region) ?? 0) >= rate.perRegion) continue;
        const queue = gate.queues.get(region)!;
        // During the canary phase only canary tasks leave their queues.
        const at = canaryPhase ? queue.findIndex((t) => gate.canaryOpen.has(t)) : 0;
        if (at < 0 || queue.length === 0) continue;
        const [id] = queue.splice(at, 1);
        const task = id === undefined ? undefined : this.opts.task(id);
        if (!task || task.state !== TaskState.PENDING || task.released) continue;
        task.released = true;
        this.countFlight(gate, task, 1);
        this.opts.release(task);
        progress = true;
      }
    }
  }

  /** A task of a gated job ended: free its slot, count errors, and release more or stop. */
  ended(task: TaskRecord): void {
    const gate = this.gates.get(task.jobId);
    if (!gate) return;
    if (task.released) this.countFlight(gate, task, -1);
    if (ERROR_STATES.has(task.state)) gate.failures++;
    const wasCanary = gate.canaryOpen.delete(task.id);
    if (!gate.stopped) {
      if (gate.rate.maxErrors !== undefined && gate.failures > gate.rate.maxErrors) {
        gate.stopped = `skipped: the job's error budget (${gate.rate.maxErrors}) was spent`;
      } else if (wasCanary && task.state !== TaskState.SUCCEEDED) {
        gate.stopped = `skipped: canary task on ${task.hostId} ended ${TaskState[task.state]}`;
      }
      if (gate.stopped) {
        for (const queue of gate.queues.values()) {
          for (const id of queue.splice(0)) {
            const t = this.opts.task(id);
            if (t && !t.released) this.opts.skip(t, gate.stopped);
          }
        }
        return;
      }
    }
    this.release(task.jobId);
  }
}

export function hasLimits(r: RateRequest): boolean {
  return Boolean(r.concurrency || r.concurrencyPercent || r.concurrencyPerRegion || r.batch) || r.maxErrors !== undefined || r.maxErrorsPercent !== undefined;
}

/** Turns percentages into task counts (at least 1 where a limit is asked for) and picks the canary tasks. */
export function resolveRate(r: RateRequest, taskIds: readonly string[]): JobRate {
  const n = taskIds.length;
  const pct = (p: number) => Math.max(1, Math.floor((n * p) / 100));
  for (const [name, v] of Object.entries(r)) {
    if (v !== undefined && (!Number.isInteger(v) || v < 0)) throw new InvalidArgumentError(`rate ${name} must be a whole number, got ${v}`);
  }
  if ((r.concurrencyPercent ?? 0) > 100 || (r.maxErrorsPercent ?? 0) > 100) throw new InvalidArgumentError("a percentage cannot be above 100");
  if (r.concurrency && r.concurrencyPercent) throw new InvalidArgumentError("give concurrency as a number or a percentage, not both");
  if (r.maxErrors !== undefined && r.maxErrorsPercent !== undefined) throw new InvalidArgumentError("give max errors as a number or a percentage, not both");
  const rate: JobRate = {
    concurrency: r.concurrency || (r.concurrencyPercent ? pct(r.concurrencyPercent) : 0),
    perRegion: r.concurrencyPerRegion ?? 0,
    canary: taskIds.slice(0, Math.min(r.batch ?? 0, n)),
  };
  if (r.maxErrors !== undefined) rate.maxErrors = r.maxErrors;
  else if (r.maxErrorsPercent !== undefined) rate.maxErrors = Math.floor((n * r.maxErrorsPercent) / 100);
  return rate;
}
