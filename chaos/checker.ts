import { createHash } from "node:crypto";
import { isTerminal, stateName } from "../common/task-state.js";
import { TaskState } from "../gen/rexmesh/v1/task_pb.js";
import type { FinalRead, JobAudit, JobObs, TaskObs } from "./observer.js";
import { formatHistory } from "./observer.js";
import { expectedOutput, runtimeMs } from "./workload.js";

/**
 * The time bounds the mesh promises (issue 11), as parameters. With the
 * job's lost_after L: once every role is back up and no fault is active,
 * every task is terminal within max(runtime + timeout, L) + slack of the
 * last heal (or of its submission, if later); after CancelJob returns,
 * within cancelMs; a task never delivered, by submit + deadline + L + slack.
 * The last two are stretched by any time the controller was down in them:
 * no one can end anything while it is away.
 */
export interface Bounds {
  lostAfterMs: number;
  slackMs: number;
  cancelMs: number;
}

export const DEFAULT_BOUNDS: Bounds = { lostAfterMs: 20_000, slackMs: 30_000, cancelMs: 15_000 };

export type Invariant = "I1" | "I2" | "I3" | "I4" | "HEAL";

export interface Violation {
  invariant: Invariant;
  /** A short category for the tally: the state a late task was left in, "stdout differs", … */
  kind: string;
  summary: string;
  evidence: string[];
  task?: string;
  job?: string;
}

export interface CheckInput {
  jobs: JobObs[];
  tasks: ReadonlyMap<string, TaskObs>;
  /** Final reads by job id. */
  finals: ReadonlyMap<string, FinalRead>;
  audits: readonly JobAudit[];
  /** Pids from the spawn markers, by task id. */
  spawns: ReadonlyMap<string, readonly number[]>;
  /** When the last fault was healed (every role up, every link open). */
  lastHealAt: number;
  /** Intervals the controller was not serving. */
  controllerDown: readonly { from: number; to?: number }[];
  /** Set when the hosts did not all come back after the faults. */
  healError?: string;
  bounds: Bounds;
}

const s = (ms: number) => `+${(ms / 1000).toFixed(1)}s`;

function sha(data: Uint8Array): string {
  return createHash("sha256").update(data).digest("hex");
}

/** Controller downtime inside [from, to], stretching `to` by what it finds (a few rounds). */
function stretched(from: number, to: number, down: CheckInput["controllerDown"], now: number): number {
  let end = to;
  for (let round = 0; round < 4; round++) {
    let overlap = 0;
    for (const d of down) overlap += Math.max(0, Math.min(end, d.to ?? now) - Math.max(from, d.from));
    const next = to + overlap;
    if (next === end) break;
    end = next;
  }
  return end;
}

/** Where two buffers first differ, as the lines around it. */
export function firstDifference(expected: Buffer, got: Buffer): string {
  let i = 0;
  while (i < expected.length && i < got.length && expected[i] === got[i]) i++;
  if (i === expected.length && i === got.length) return "identical";
  const lineStart = (b: Buffer) => b.lastIndexOf(10, i - 1) + 1;
  const line = (b: Buffer) => {
    const start = lineStart(b);
    const end = b.indexOf(10, i);
    return JSON.stringify(b.subarray(start, end < 0 ? Math.min(b.length, start + 120) : Math.min(end, start + 120)).toString());
  };
  const lineNo = expected.subarray(0, i).toString().split("\n").length;
  if (i === got.length) {
    const where = i === 0 || expected[i - 1] === 10 ? `stops before line ${lineNo}` : `stops inside line ${lineNo}`;
    return `got ${got.length} of ${expected.length} bytes: ${where}; expected there ${line(expected)}`;
  }
  if (i === expected.length) return `got ${got.length - expected.length} bytes too many after the last expected line: ${line(got)}`;
  return `differs at byte ${i} (line ${lineNo}): expected ${line(expected)}, got ${line(got)}`;
}

function isPrefix(prefix: Buffer, of: Buffer): boolean {
  return prefix.length <= of.length && of.subarray(0, prefix.length).equals(prefix);
}

/**
 * Judges a chaos run from what the client saw, the spawn markers and the
 * final reads. Pure: every fact comes in the input.
 */
export function check(input: CheckInput, now: number): Violation[] {
  const out: Violation[] = [];
  const { bounds } = input;
  if (input.healError) out.push({ invariant: "HEAL", kind: "hosts away", summary: `the mesh did not heal: ${input.healError}`, evidence: [] });

  for (const job of input.jobs) {
    const plan = job.plan;
    const label = `job #${plan.index} (${plan.purpose}${plan.fault ? ` of fault ${plan.fault}` : ""}) ${job.jobId}`;
    const final = input.finals.get(job.jobId);
    for (const host of plan.hosts) {
      const taskId = job.taskIds.get(host);
      if (!taskId) {
        out.push({ invariant: "I4", kind: "task missing", job: job.jobId, summary: `${label}: no task for host ${host} was ever seen`, evidence: [`accepted at ${s(job.acceptedAt)}`] });
        continue;
      }
      const o = input.tasks.get(taskId);
      if (!o) continue;
      const last = final?.tasks.get(taskId) ?? o.last;
      const where = `${label} task ${taskId} on ${host}`;
      const spawned = input.spawns.get(taskId) ?? [];

      // I1: terminal within its bound.
      const runtime = runtimeMs(plan.params);
      const general = Math.max(input.lastHealAt, job.acceptedAt) + Math.max(runtime + (plan.timeoutMs ?? 0), bounds.lostAfterMs) + bounds.slackMs;
      const applied: { name: string; at: number }[] = [{ name: `heal ${s(input.lastHealAt)} + max(runtime+timeout, L) + slack`, at: general }];
      if (job.cancelledAt !== undefined) applied.push({ name: `CancelJob returned ${s(job.cancelledAt)} + ${bounds.cancelMs / 1000}s`, at: stretched(job.cancelledAt, job.cancelledAt + bounds.cancelMs, input.controllerDown, now) });
      const delivered = spawned.length > 0 || o.history.some((h) => h.state === TaskState.DELIVERED || h.state === TaskState.RUNNING);
      if (plan.deliveryDeadlineMs && !delivered) {
        const at = job.acceptedAt + plan.deliveryDeadlineMs + bounds.lostAfterMs + bounds.slackMs;
        applied.push({ name: `never delivered: submit ${s(job.acceptedAt)} + deadline + L + slack`, at: stretched(job.acceptedAt, at, input.controllerDown, now) });
      }
      const bound = applied.reduce((a, b) => (b.at < a.at ? b : a));
      if (!o.terminal) {
        out.push({ invariant: "I1", kind: `left ${last ? stateName(last.state) : "unseen"}`, job: job.jobId, task: taskId, summary: `${where} is still ${last ? stateName(last.state) : "unseen"} at ${s(now)}; bound ${s(bound.at)} (${bound.name})`, evidence: [`history: ${formatHistory(o)}`] });
      } else if (o.terminal.at > bound.at) {
        out.push({ invariant: "I1", kind: `late ${stateName(o.terminal.state)}`, job: job.jobId, task: taskId, summary: `${where} ended ${stateName(o.terminal.state)} only at ${s(o.terminal.at)}; bound ${s(bound.at)} (${bound.name})`, evidence: [`history: ${formatHistory(o)}`] });
      }

      // I2: at most one spawn; none for a task that says it never started.
      if (spawned.length > 1) out.push({ invariant: "I2", kind: "spawned twice", job: job.jobId, task: taskId, summary: `${where} was spawned ${spawned.length} times (pids ${spawned.join(", ")})`, evidence: [`history: ${formatHistory(o)}`] });
      if (last && (last.state === TaskState.EXPIRED || last.state === TaskState.SKIPPED) && spawned.length > 0) {
        out.push({ invariant: "I2", kind: `spawned yet ${stateName(last.state)}`, job: job.jobId, task: taskId, summary: `${where} ended ${stateName(last.state)} (never started) but was spawned (pid ${spawned.join(", ")})`, evidence: [`history: ${formatHistory(o)}`] });
      }

      // I3: a SUCCEEDED task's output is exactly what it wrote; any task's output is a prefix of it.
      if (last && isTerminal(last.state)) {
        const expected = expectedOutput(taskId, plan.params);
        const got = { stdout: final?.stdout.get(taskId) ?? Buffer.alloc(0), stderr: final?.stderr.get(taskId) ?? Buffer.alloc(0) };
        const facts = `state ${stateName(last.state)}${last.exitCode !== undefined ? ` exit ${last.exitCode}` : ""}, output_complete=${last.outputComplete}, truncated=${last.outputTruncated}, chunks stored ${last.outputChunks} of ${last.outputChunksExpected} reported, read ${final?.seqs.get(taskId)?.length ?? 0}${final?.complete ? "" : ` (final read: ${final?.error ?? "none"})`}`;
        if (last.state === TaskState.SUCCEEDED) {
          if (plan.params.exitCode !== 0) out.push({ invariant: "I3", kind: "SUCCEEDED with exit 3", job: job.jobId, task: taskId, summary: `${where} is SUCCEEDED but its script exits ${plan.params.exitCode}`, evidence: [facts] });
          if (!last.outputTruncated) {
            for (const stream of ["stdout", "stderr"] as const) {
              if (sha(expected[stream]) === sha(got[stream])) continue;
              out.push({
                invariant: "I3",
                kind: `SUCCEEDED, ${stream} differs`,
                job: job.jobId,
                task: taskId,
                summary: `${where}: SUCCEEDED but ${stream} differs: sha256 ${sha(got[stream]).slice(0, 12)} (${got[stream].length} B), expected ${sha(expected[stream]).slice(0, 12)} (${expected[stream].length} B)`,
                evidence: [firstDifference(expected[stream], got[stream]), facts, `history: ${formatHistory(o)}`],
              });
            }
          }
        } else {
          for (const stream of ["stdout", "stderr"] as const) {
            if (isPrefix(got[stream], expected[stream])) continue;
            out.push({ invariant: "I3", kind: `${stateName(last.state)}, ${stream} not a prefix`, job: job.jobId, task: taskId, summary: `${where}: ${stream} of a ${stateName(last.state)} task is not a prefix of what it writes`, evidence: [firstDifference(expected[stream], got[stream]), facts] });
          }
        }
      }

      // I4: a terminal state once seen never changes; a chunk once read never changes or disappears.
      if (o.terminal) {
        const t = o.terminal;
        // Only looks taken after the terminal one was seen count: an answer already on its way may be older.
        const changed = o.history.slice(o.history.indexOf(t) + 1).find((h) => h.since >= t.at && (h.state !== t.state || h.exitCode !== t.exitCode));
        if (changed) out.push({ invariant: "I4", kind: "terminal state changed", job: job.jobId, task: taskId, summary: `${where}: terminal ${stateName(t.state)} seen at ${s(t.at)}, then ${stateName(changed.state)} at ${s(changed.at)}`, evidence: [`history: ${formatHistory(o)}`] });
      }
      for (const [seq, versions] of o.chunks) {
        if (versions.length > 1) {
          out.push({ invariant: "I4", kind: "chunk changed", job: job.jobId, task: taskId, summary: `${where}: output chunk ${seq} read with ${versions.length} different contents`, evidence: versions.map((v) => `${s(v.at)} stream ${v.stream} ${v.bytes} B sha256 ${v.sha.slice(0, 12)}`) });
        }
      }
      const finalSeqs = final?.seqs.get(taskId);
      if (final && final.tasks.size > 0) {
        const present = new Set(finalSeqs ?? []);
        const gone = [...o.chunks.keys()].filter((seq) => !present.has(seq)).sort((a, b) => a - b);
        if (gone.length > 0) out.push({ invariant: "I4", kind: "chunks gone", job: job.jobId, task: taskId, summary: `${where}: ${gone.length} output chunk(s) read earlier are gone from the final read (seq ${gone.slice(0, 10).join(", ")}${gone.length > 10 ? ", …" : ""})`, evidence: [`first read at ${s(o.chunks.get(gone[0]!)![0]!.at)}`] });
      }
    }
  }

  // I4: every acknowledged job is still there, with the same tasks, at every audit.
  const byId = new Map(input.jobs.map((j) => [j.jobId, j]));
  for (const a of input.audits) {
    const job = byId.get(a.jobId);
    if (!job) continue;
    const label = `job #${job.plan.index} ${a.jobId} (accepted ${s(job.acceptedAt)})`;
    if (!a.found) {
      out.push({ invariant: "I4", kind: "job gone", job: a.jobId, summary: `${label} is gone at ${s(a.at)} (${a.reason})`, evidence: [a.error ?? "GetJob returned no job"] });
      continue;
    }
    if (a.error) continue;
    const hosts = a.tasks.map((t) => t.hostId).sort().join(",");
    const want = [...job.plan.hosts].sort().join(",");
    const idsChanged = a.tasks.filter((t) => job.taskIds.has(t.hostId) && job.taskIds.get(t.hostId) !== t.id);
    if (hosts !== want || idsChanged.length > 0) {
      out.push({ invariant: "I4", kind: "tasks changed", job: a.jobId, summary: `${label} has other tasks at ${s(a.at)} (${a.reason})`, evidence: [`hosts ${hosts || "(none)"}, expected ${want}`, ...idsChanged.map((t) => `${t.hostId}: ${t.id}, first seen as ${job.taskIds.get(t.hostId)}`)] });
    }
  }
  return out;
}
