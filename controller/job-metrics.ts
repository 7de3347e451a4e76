import { DURATION_BUCKETS, type Metrics } from "../common/metrics.js";
import { TaskState } from "../gen/rexmesh/v1/task_pb.js";

/**
 * What the job manager tells about the times its clients wait. Durations
 * count from the job's submission, as a client sees them: a task that
 * waited an hour for an offline host took an hour.
 */
export interface JobObserver {
  /** A job's last task ended. */
  jobFinished(seconds: number): void;
  /** A task reached its terminal state. */
  taskEnded(state: TaskState, seconds: number): void;
  /** A task's first output chunk was stored at the controller. */
  firstOutput(seconds: number): void;
}

/** The controller's histograms of job and task times, on its registry. */
export function jobMetrics(metrics: Metrics): JobObserver {
  const job = metrics.histogram("job_duration_seconds", "from a job's submission until its last task ended", DURATION_BUCKETS);
  const task = metrics.histogram("task_duration_seconds", "from a job's submission until one of its tasks reached a terminal state, by that state", DURATION_BUCKETS, ["state"]);
  const first = metrics.histogram("task_first_output_seconds", "from a job's submission until the first output chunk of one of its tasks was stored", DURATION_BUCKETS);
  return {
    jobFinished: (s) => job.observe(s),
    taskEnded: (state, s) => task.observe({ state: TaskState[state] ?? String(state) }, s),
    firstOutput: (s) => first.observe(s),
  };
}
