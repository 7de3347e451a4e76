import { printable } from "../common/limits.js";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { formatDuration } from "../common/duration.js";
import { isTerminal, stateName } from "../common/task-state.js";
import { JobState, type Job, type Task, type WatchJobResponse } from "../gen/rexmesh/v1/controller_pb.js";
import { OutputStream, TaskState } from "../gen/rexmesh/v1/task_pb.js";

export interface PrinterOptions {
  json: boolean;
  write: (s: string) => void;
  /** Colour the host prefixes. */
  color?: boolean;
  /**
   * Collapse hosts whose output (each stream byte for byte) and outcome (state,
   * exit code, signal) are the same into one block with the host list, printed at the end.
   */
  group?: boolean;
  /** Keep a progress line (done/failed/pending) at the bottom: for terminals. */
  progress?: boolean;
}

/** Output kept per host for grouping (both streams together); beyond it the block is marked cut. */
const GROUP_LIMIT = 1 << 20;

const COLORS = [36, 33, 35, 32, 34, 91, 96, 93];
const utf8 = new TextDecoder("utf-8", { fatal: true });

function textOf(data: Uint8Array): string | undefined {
  try {
    return utf8.decode(data);
  } catch {
    return undefined;
  }
}

/**
 * Turns a job's watch stream into what an operator reads: output lines
 * prefixed by host and stream as they arrive, then a summary. In JSON mode,
 * one object per line per event (see docs/cli-json.md).
 */
export class JobPrinter {
  private readonly tasks = new Map<string, Task>();
  private readonly partial = new Map<string, Buffer>();
  /** The highest output seq taken per task: a watch started again replays a task's output from its start. */
  private readonly seen = new Map<string, bigint>();
  private job: Job | undefined;
  private width = 0;
  private readonly grouped = new Map<string, GroupedOutput>();
  private progressShown = false;
  /** The job events written (docs/cli-json.md: once first, once when done), so a watch started again repeats neither. */
  private jobAnnounced = false;
  private doneAnnounced = false;

  constructor(private readonly opts: PrinterOptions) {}

  /**
   * Prints what a batch holds that was not printed before (a watch started
   * again replays the job from its start). Returns whether there was any:
   * a task in a new state or with more output, or output not seen before.
   */
  handle(batch: WatchJobResponse): boolean {
    let news = false;
    // JSON events follow the job's life: a job that is done is announced after its last task's end,
    // and a task's end after its last output.
    const done = batch.job?.state === JobState.DONE && !this.doneAnnounced;
    if (batch.job) this.job = batch.job;
    // A job already done when first seen (a fast job, or a watch started late) is still announced first.
    if (batch.job && !this.jobAnnounced) {
      this.jobAnnounced = true;
      if (this.opts.json) this.writeJson({ type: "job", job: jobJson(batch.job) });
    }
    const ended: Task[] = [];
    for (const t of batch.tasks) {
      const prev = this.tasks.get(t.id);
      this.tasks.set(t.id, t);
      this.width = Math.max(this.width, t.hostId.length);
      const same = prev !== undefined && prev.state === t.state && sameLate(prev, t);
      if (!same || prev.outputChunks !== t.outputChunks) news = true;
      if (!this.opts.json || same) continue;
      if (isTerminal(t.state)) ended.push(t);
      else this.writeJson({ type: "task", task: taskJson(t) });
    }
    for (const c of batch.output) {
      if (c.seq <= (this.seen.get(c.taskId) ?? 0n)) continue;
      news = true;
      this.seen.set(c.taskId, c.seq);
      const task = this.tasks.get(c.taskId);
      const host = c.hostId || task?.hostId || c.taskId;
      const stream = c.stream === OutputStream.STDERR ? "stderr" : "stdout";
      if (this.opts.json) {
        const text = textOf(c.data);
        this.writeJson({ type: "output", host, task: c.taskId, stream, seq: Number(c.seq), data: Buffer.from(c.data).toString("base64"), ...(text !== undefined ? { text } : {}) });
      } else if (this.opts.group) {
        let held = this.grouped.get(c.taskId);
        if (!held) this.grouped.set(c.taskId, (held = { stdout: [], stderr: [], bytes: 0, cut: false }));
        const room = GROUP_LIMIT - held.bytes;
        if (c.data.length > room) held.cut = true;
        if (room > 0) {
          const kept = Buffer.from(c.data.subarray(0, room));
          held[stream].push(kept);
          held.bytes += kept.length;
        }
      } else {
        this.clearProgress();
        this.lines(host, c.taskId, stream, Buffer.from(c.data.buffer, c.data.byteOffset, c.data.byteLength));
      }
    }
    for (const t of ended) this.writeJson({ type: "task", task: taskJson(t) });
    if (batch.job && done) {
      this.doneAnnounced = news = true;
      if (this.opts.json) this.writeJson({ type: "job", job: jobJson(batch.job) });
    }
    if (!this.opts.json && !this.opts.group) {
      for (const t of batch.tasks) if (isTerminal(t.state)) this.flushTask(t);
    }
    this.drawProgress();
    return news;
  }

  /** Hosts whose task has not been handed to them yet (PENDING at the controller or QUEUED at a proxy). */
  pendingHosts(): Set<string> {
    return new Set([...this.tasks.values()].filter((t) => t.state === TaskState.PENDING || t.state === TaskState.QUEUED).map((t) => t.hostId));
  }

  /** The progress line: how many hosts are done, failed and pending. */
  progressLine(): string {
    const all = [...this.tasks.values()];
    const done = all.filter((t) => isTerminal(t.state)).length;
    const failed = all.filter((t) => isTerminal(t.state) && t.state !== TaskState.SUCCEEDED).length;
    const total = this.job?.taskCount ?? all.length;
    const width = 24;
    const filled = total ? Math.round((done / total) * width) : 0;
    return `[${"#".repeat(filled)}${"-".repeat(width - filled)}] ${done}/${total} done, ${failed} failed, ${total - done} pending`;
  }

  private drawProgress(): void {
    if (!this.opts.progress || this.opts.json) return;
    this.opts.write(`\r\x1b[K${this.progressLine()}`);
    this.progressShown = true;
  }

  private clearProgress(): void {
    if (!this.progressShown) return;
    this.opts.write("\r\x1b[K");
    this.progressShown = false;
  }

  /**
   * Hosts with the same outcome and the same bytes on each stream as one
   * block headed by their names. A block of hosts that did not succeed says
   * how they ended; stderr lines are marked `err|` (and stdout lines `out|`
   * when a block has both), so a failure on stderr never merges with a
   * success printing the same text on stdout.
   */
  private printGroups(): void {
    const blocks = new Map<string, { outcome: string; held: GroupedOutput | undefined; hosts: string[] }>();
    for (const t of [...this.tasks.values()].sort((a, b) => a.hostId.localeCompare(b.hostId))) {
      const held = this.grouped.get(t.id);
      const outcome = outcomeOf(t);
      const key = [outcome, ...(held ? [Buffer.concat(held.stdout).toString("base64"), Buffer.concat(held.stderr).toString("base64"), String(held.cut)] : [])].join("\n");
      const block = blocks.get(key);
      if (block) block.hosts.push(t.hostId);
      else blocks.set(key, { outcome, held, hosts: [t.hostId] });
    }
    const out: string[] = [];
    for (const b of [...blocks.values()].sort((x, y) => y.hosts.length - x.hosts.length)) {
      out.push(`==== ${b.hosts.length} host${b.hosts.length === 1 ? "" : "s"}: ${b.hosts.join(", ")}${b.outcome === SUCCESS ? "" : ` (${b.outcome})`}`);
      const stdout = Buffer.concat(b.held?.stdout ?? []).toString("utf8").replace(/\n$/, "");
      const stderr = Buffer.concat(b.held?.stderr ?? []).toString("utf8").replace(/\n$/, "");
      if (stdout === "" && stderr === "") out.push("(no output)");
      if (stdout !== "") out.push(stderr === "" ? stdout : stdout.replace(/^/gm, "out| "));
      if (stderr !== "") out.push(stderr.replace(/^/gm, "err| "));
      if (b.held?.cut) out.push(`(output beyond ${GROUP_LIMIT >> 20} MiB per host not shown)`);
    }
    this.opts.write(out.join("\n") + "\n");
  }

  private prefix(host: string, stream: string): string {
    const tag = stream === "stderr" ? "err" : "out";
    const p = `${host.padEnd(this.width)} ${tag}|`;
    if (!this.opts.color) return p;
    let h = 0;
    for (const ch of host) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
    return `\x1b[${COLORS[h % COLORS.length]}m${p}\x1b[0m`;
  }

  private lines(host: string, taskId: string, stream: string, data: Buffer): void {
    const key = `${taskId}/${stream}`;
    let buf = this.partial.get(key);
    buf = buf ? Buffer.concat([buf, data]) : data;
    let start = 0;
    let nl: number;
    const out: string[] = [];
    while ((nl = buf.indexOf(10, start)) >= 0) {
      out.push(`${this.prefix(host, stream)} ${buf.subarray(start, nl).toString("utf8")}\n`);
      start = nl + 1;
    }
    if (out.length) this.opts.write(out.join(""));
    const rest = buf.subarray(start);
    if (rest.length > 0) this.partial.set(key, Buffer.from(rest));
    else this.partial.delete(key);
  }

  private flushTask(t: Task): void {
    for (const stream of ["stdout", "stderr"]) {
      const key = `${t.id}/${stream}`;
      const rest = this.partial.get(key);
      if (rest) {
        this.opts.write(`${this.prefix(t.hostId, stream)} ${rest.toString("utf8")}\n`);
        this.partial.delete(key);
      }
    }
  }

  private writeJson(obj: unknown): void {
    this.opts.write(JSON.stringify(obj) + "\n");
  }

  /** Every task succeeded. */
  get succeeded(): boolean {
    return this.tasks.size > 0 && [...this.tasks.values()].every((t) => t.state === TaskState.SUCCEEDED);
  }

  /** The closing summary: counts per state, then every host that did not succeed. */
  summary(): void {
    this.clearProgress();
    if (this.opts.group && !this.opts.json) this.printGroups();
    const tasks = [...this.tasks.values()].sort((a, b) => a.hostId.localeCompare(b.hostId));
    const counts = new Map<string, number>();
    for (const t of tasks) counts.set(stateName(t.state), (counts.get(stateName(t.state)) ?? 0) + 1);
    const elapsed = this.job?.createdAt && this.job.finishedAt ? timestampMs(this.job.finishedAt) - timestampMs(this.job.createdAt) : undefined;
    if (this.opts.json) {
      this.writeJson({ type: "summary", job: this.job?.id, hosts: tasks.length, counts: Object.fromEntries(counts), ok: this.succeeded, elapsedMs: elapsed });
      return;
    }
    const parts = [...counts].map(([s, n]) => `${n} ${s.toLowerCase().replace("_", " ")}`);
    const lines = [`\n${tasks.length} host${tasks.length === 1 ? "" : "s"}: ${parts.join(", ")}${elapsed !== undefined ? ` in ${formatDuration(elapsed)}` : ""} (job ${this.job?.id ?? "?"})`];
    for (const t of tasks) {
      if (t.state === TaskState.SUCCEEDED && outputWhole(t)) continue;
      lines.push(`  ${t.hostId.padEnd(this.width)} ${t.region ? `[${t.region}] ` : ""}${taskLine(t)}  (task ${t.id})`);
    }
    this.opts.write(lines.join("\n") + "\n");
  }
}

/** Output held for grouping, per stream, up to GROUP_LIMIT bytes in all. */
interface GroupedOutput {
  stdout: Buffer[];
  stderr: Buffer[];
  bytes: number;
  cut: boolean;
}

/** How a task ended, as a group of hosts shares it: state, exit code, signal. */
const SUCCESS = "SUCCEEDED, exit 0";

function outcomeOf(t: Task): string {
  return [stateName(t.state), t.exitCode !== undefined ? `exit ${t.exitCode}` : "", t.signal].filter(Boolean).join(", ");
}

export function jobJson(j: Job) {
  return {
    id: j.id,
    tenant: j.tenant,
    submittedBy: j.submittedBy,
    state: j.state === 2 ? "DONE" : "RUNNING",
    createdAt: j.createdAt ? new Date(timestampMs(j.createdAt)).toISOString() : undefined,
    finishedAt: j.finishedAt ? new Date(timestampMs(j.finishedAt)).toISOString() : undefined,
    tasks: j.taskCount,
    counts: Object.fromEntries(j.counts.map((c) => [stateName(c.state), c.count])),
    ...(j.schedule ? { schedule: j.schedule } : {}),
  };
}

export function taskJson(t: Task) {
  return {
    id: t.id,
    host: t.hostId,
    region: t.region,
    proxy: t.proxy,
    state: stateName(t.state),
    exitCode: t.exitCode,
    signal: t.signal || undefined,
    message: t.message || undefined,
    outputTruncated: t.outputTruncated || undefined,
    ...(isTerminal(t.state) ? { outputComplete: t.outputComplete, outputChunks: Number(t.outputChunks), outputChunksExpected: Number(t.outputChunksExpected) } : {}),
    ...(t.lateReport ? { lateReport: { state: stateName(t.lateReport.state), exitCode: t.lateReport.exitCode, signal: t.lateReport.signal || undefined, message: t.lateReport.message || undefined } } : {}),
  };
}

/** A terminal task whose output arrived whole (or whose state says nothing of output). */
function outputWhole(t: Task): boolean {
  return !isTerminal(t.state) || t.outputComplete || t.outputChunksExpected === 0n;
}

function sameLate(a: Task, b: Task): boolean {
  return (a.lateReport?.state ?? 0) === (b.lateReport?.state ?? 0);
}

/** A task's state in one line, as summaries and `jobs show` print it: exit, signal, message, output and late report. */
export function taskLine(t: Task): string {
  // The daemon's message often says it already ("exit code 3", "killed by SIGKILL").
  const exit = t.exitCode !== undefined && !/exit code/.test(t.message) ? `exit ${t.exitCode}` : "";
  const signal = t.signal && !t.message.includes(t.signal) ? t.signal : "";
  // A host's words (its message, a signal's name) reach the operator's terminal: no escape sequence among them.
  const detail = printable([exit, signal, t.message].filter(Boolean).join(", "));
  let line = `${stateName(t.state)}${detail ? `: ${detail}` : ""}`;
  if (t.outputTruncated) line += " (output truncated at the limit)";
  if (!outputWhole(t)) line += ` (output incomplete: ${t.outputChunks} of ${t.outputChunksExpected} chunks received so far)`;
  const late = t.lateReport;
  if (late) {
    const lateDetail = printable([late.exitCode !== undefined ? `exit ${late.exitCode}` : "", late.signal, late.message].filter(Boolean).join(", "));
    line += `; the host reported later: ${stateName(late.state)}${lateDetail ? ` (${lateDetail})` : ""}`;
  }
  return line;
}
