import { TaskState } from "../gen/rexmesh/v1/task_pb.js";

/** States after which nothing about a task changes again. */
export function isTerminal(state: TaskState): boolean {
  return state >= TaskState.SUCCEEDED;
}

/**
 * Order of progress. Updates travel over several hops and may be replayed
 * after a reconnect, so a receiver applies one only when it moves the task
 * forward: a late DELIVERED never undoes RUNNING, and the first terminal
 * state wins.
 */
export function advances(from: TaskState, to: TaskState): boolean {
  if (isTerminal(from)) return false;
  if (to === TaskState.UNSPECIFIED) return false;
  return isTerminal(to) || to > from;
}

/** "SUCCEEDED", "TIMED_OUT", ... as users see them. */
export function stateName(state: TaskState): string {
  return TaskState[state] ?? `STATE_${state}`;
}

export function parseStateName(name: string): TaskState | undefined {
  const value = (TaskState as unknown as Record<string, number>)[name.toUpperCase()];
  return typeof value === "number" ? (value as TaskState) : undefined;
}
