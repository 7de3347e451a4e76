/**
 * The daemon's environment as its tasks and sessions start from it: without
 * the daemon's own settings (REXMESH_*: a join token among them, given in
 * the environment to keep it out of the process list), which are the
 * daemon's, not theirs. What a task is told about itself (REXMESH_TASK_ID,
 * REXMESH_HOST_ID, …) is laid over it by whoever starts the task.
 */
export function inheritedEnv(base: Readonly<Record<string, string | undefined>>): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(base)) if (v !== undefined && !k.startsWith("REXMESH_")) env[k] = v;
  return env;
}
