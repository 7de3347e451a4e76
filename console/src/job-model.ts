import type { Job, Task, WatchJobResponse } from "../../gen/rexmesh/v1/controller_pb.js";
import { OutputStream, type TaskState } from "../../gen/rexmesh/v1/task_pb.js";

/**
 * A job as the watch has shown it so far: its tasks by id and each task's
 * output as text. The maps are changed in place, batch by batch (copying
 * them per batch made a 50,000-host job quadratic); `rev` counts the
 * batches, so a new view object with a new `rev` is what tells the page to
 * look again.
 */
export interface JobView {
  job: Job | undefined;
  tasks: Map<string, Task>;
  /** By task id: what the process wrote, stdout and stderr apart (decoded as UTF-8 as it arrives). */
  output: Map<string, { out: string; err: string }>;
  rev: number;
}

/** Bytes of output per task kept in the page; past it the rest is not shown (the CLI and export have it all). */
export const MAX_SHOWN_OUTPUT = 256 * 1024;

export function emptyView(): JobView {
  return { job: undefined, tasks: new Map(), output: new Map(), rev: 0 };
}

/** What a TextDecoder is to the view (a type the browser and Node both have). */
export interface StreamDecoder {
  decode(input: Uint8Array, options: { stream: boolean }): string;
}

/**
 * Applies one watch batch to the view's maps, in place, and returns the
 * view under a new `rev`. Decoders are kept per task and stream so that a
 * character split across two chunks is shown whole.
 */
export function applyBatch(view: JobView, batch: Pick<WatchJobResponse, "job" | "tasks" | "output">, decoders: Map<string, StreamDecoder>): JobView {
  const { tasks, output } = view;
  for (const t of batch.tasks) tasks.set(t.id, t);
  for (const c of batch.output) {
    const key = `${c.taskId}:${c.stream}`;
    let d = decoders.get(key);
    if (!d) decoders.set(key, (d = new TextDecoder("utf-8")));
    const text = d.decode(c.data, { stream: true });
    const prev = output.get(c.taskId) ?? { out: "", err: "" };
    const err = c.stream === OutputStream.STDERR;
    const cur = err ? prev.err : prev.out;
    const next = cur.length >= MAX_SHOWN_OUTPUT ? cur : (cur + text).slice(0, MAX_SHOWN_OUTPUT);
    output.set(c.taskId, err ? { ...prev, err: next } : { ...prev, out: next });
  }
  return { job: batch.job ?? view.job, tasks, output, rev: view.rev + 1 };
}

/** Hosts that ended the same way with the same output, shown once. */
export interface OutputGroup {
  state: TaskState;
  exitCode: number | undefined;
  out: string;
  err: string;
  hosts: string[];
}

/** Groups tasks by state, exit code and output; biggest group first (the others are what differs). */
export function groupOutput(view: JobView, tasks: readonly Task[]): OutputGroup[] {
  const groups = new Map<string, OutputGroup>();
  for (const t of tasks) {
    const o = view.output.get(t.id) ?? { out: "", err: "" };
    const key = JSON.stringify([t.state, t.exitCode ?? null, o.out, o.err]);
    let g = groups.get(key);
    if (!g) groups.set(key, (g = { state: t.state, exitCode: t.exitCode, out: o.out, err: o.err, hosts: [] }));
    g.hosts.push(t.hostId);
  }
  return [...groups.values()].sort((a, b) => b.hosts.length - a.hosts.length || a.hosts[0]!.localeCompare(b.hosts[0]!));
}

/** Count of tasks per state, for the histogram. */
export function histogram(tasks: readonly Task[]): Map<TaskState, number> {
  const counts = new Map<TaskState, number>();
  for (const t of tasks) counts.set(t.state, (counts.get(t.state) ?? 0) + 1);
  return counts;
}

/** One row per task for export. */
export function exportRows(view: JobView, tasks: readonly Task[], stateName: (s: TaskState) => string) {
  return tasks.map((t) => ({
    host: t.hostId,
    region: t.region,
    proxy: t.proxy,
    state: stateName(t.state),
    exitCode: t.exitCode ?? "",
    message: t.message,
    taskId: t.id,
    stdout: view.output.get(t.id)?.out ?? "",
    stderr: view.output.get(t.id)?.err ?? "",
  }));
}

/** RFC 4180 CSV: every field quoted, quotes doubled; a leading = + - @ is prefixed so spreadsheets do not run it. */
export function toCsv(rows: readonly Record<string, string | number>[]): string {
  if (rows.length === 0) return "";
  const cols = Object.keys(rows[0]!);
  const cell = (v: string | number) => {
    let s = String(v);
    if (/^[=+\-@]/.test(s)) s = `'${s}`;
    return `"${s.replace(/"/g, '""')}"`;
  };
  return [cols.map(cell).join(","), ...rows.map((r) => cols.map((c) => cell(r[c] ?? "")).join(","))].join("\r\n") + "\r\n";
}
