/**
 * The chaos workload's task: a shell loop that writes numbered lines to
 * stdout (and every few lines one to stderr) with short sleeps in between,
 * so that output is in flight for seconds, then optionally a burst, then
 * exits with a chosen code. Every line carries the task id, so output that
 * lands on the wrong task is visible. Before anything else it appends
 * "<task id> <pid>" to a marker file of its own: one line per spawn.
 */
export interface TaskParams {
  /** Numbered stdout lines, one per interval. */
  lines: number;
  sleepMs: number;
  /** A stderr line after every errEvery-th stdout line. */
  errEvery: number;
  /** Characters of filler on every stdout line. */
  pad: number;
  /** Lines written at once at the end (several output chunks in one go). */
  burst: number;
  exitCode: number;
}

/** A token in the script text, so that the harness finds its own task processes in /proc (and nothing else). */
export function scriptToken(runId: string): string {
  return `chaos-run-${runId}`;
}

const SCRIPT = `
printf '%s %s\\n' "$REXMESH_TASK_ID" "$$" >> "$CHAOS_MARKS/$REXMESH_TASK_ID"
i=1
while [ "$i" -le "$CHAOS_LINES" ]; do
  printf '%s out %d %s\\n' "$REXMESH_TASK_ID" "$i" "$CHAOS_PAD"
  if [ $((i % CHAOS_ERR_EVERY)) -eq 0 ]; then printf '%s err %d\\n' "$REXMESH_TASK_ID" "$i" >&2; fi
  sleep "$CHAOS_SLEEP"
  i=$((i + 1))
done
j=1
while [ "$j" -le "$CHAOS_BURST" ]; do
  printf '%s burst %d %s\\n' "$REXMESH_TASK_ID" "$j" "$CHAOS_PAD"
  j=$((j + 1))
done
exit "$CHAOS_EXIT"
`;

/** The shell script of every chaos task (the parameters travel in the job's environment). */
export function taskScript(runId: string): string {
  return `# ${scriptToken(runId)}${SCRIPT}`;
}

function padText(n: number): string {
  const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789";
  let s = "";
  for (let i = 0; i < n; i++) s += alphabet[i % alphabet.length];
  return s;
}

/** The job environment that drives the script. */
export function taskEnv(params: TaskParams, marksDir: string): Record<string, string> {
  return {
    CHAOS_MARKS: marksDir,
    CHAOS_LINES: String(params.lines),
    CHAOS_SLEEP: (params.sleepMs / 1000).toFixed(3),
    CHAOS_ERR_EVERY: String(params.errEvery),
    CHAOS_PAD: padText(params.pad),
    CHAOS_BURST: String(params.burst),
    CHAOS_EXIT: String(params.exitCode),
  };
}

/** Exactly what a task writes to each stream when it runs to its end. */
export function expectedOutput(taskId: string, params: TaskParams): { stdout: Buffer; stderr: Buffer } {
  const pad = padText(params.pad);
  const out: string[] = [];
  const err: string[] = [];
  for (let i = 1; i <= params.lines; i++) {
    out.push(`${taskId} out ${i} ${pad}\n`);
    if (i % params.errEvery === 0) err.push(`${taskId} err ${i}\n`);
  }
  for (let j = 1; j <= params.burst; j++) out.push(`${taskId} burst ${j} ${pad}\n`);
  return { stdout: Buffer.from(out.join("")), stderr: Buffer.from(err.join("")) };
}

/** How long a task takes when nothing stops it. */
export function runtimeMs(params: TaskParams): number {
  return params.lines * params.sleepMs;
}
