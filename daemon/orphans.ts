/**
 * Finding and ending what a task left running when its daemon died.
 *
 * Every step of a task runs as the leader of its own process group, and
 * every process of a task carries REXMESH_TASK_ID in its environment. The
 * daemon notes each group (its leader's pid and start time) in the ledger as
 * it starts; a daemon killed with SIGKILL cannot stop them, and they are
 * re-parented to init. On restart, for each task it finds RUNNING in its
 * ledger, the daemon looks for the task's processes — members of a noted
 * group whose leader is still the same process (same start time: a pid may
 * have been reused), and any process whose environment names the task (a
 * group leader that exited leaves its children behind) — and ends them:
 * SIGTERM, then SIGKILL after a grace.
 *
 * Linux only (/proc); elsewhere nothing is found and the message says so.
 */
import { readdirSync, readFileSync } from "node:fs";
import type { Clock } from "../common/clock.js";
import { readStat, type ProcStat } from "./proc-stat.js";

/** A process group a step of a task started, as the ledger notes it. */
export interface GroupRef {
  pgid: number;
  /** Start time of the group's leader in clock ticks since boot (field 22 of /proc/<pid>/stat). */
  startTicks?: number;
}

/** The group a process leads now, for the ledger: its pgid and its start time. */
export function groupRef(pid: number): GroupRef {
  const s = readStat(pid);
  return s ? { pgid: pid, startTicks: s.startTicks } : { pgid: pid };
}

/**
 * False when the group's number is another process's now: a process holds
 * its leader's pid but started at another time. Linux gives a number out
 * again only once no process has it as its pid or its process group, so a
 * leader still there with its start time (alive, or a zombie not yet
 * reaped), or gone with members left, means the noted group; no leader and
 * no member means none at all. Between this look and a signal the number
 * could only be taken if the group was already empty and reaped, and the
 * kernel handed that very number to a new process that made itself a group
 * leader in those microseconds.
 */
export function sameGroup(g: GroupRef): boolean {
  if (g.startTicks === undefined) return true;
  const leader = readStat(g.pgid);
  return leader === undefined || leader.startTicks === g.startTicks;
}

function alive(s: ProcStat | undefined): s is ProcStat {
  return s !== undefined && s.state !== "Z" && s.state !== "X";
}

function environMentions(pid: number, marker: Buffer): boolean {
  try {
    const env = readFileSync(`/proc/${pid}/environ`);
    for (let i = 0; i < env.length; ) {
      const end = env.indexOf(0, i);
      const stop = end < 0 ? env.length : end;
      if (stop - i === marker.length && env.subarray(i, stop).equals(marker)) return true;
      i = stop + 1;
    }
  } catch {
    // Gone, or not ours to read.
  }
  return false;
}

function listPids(): number[] {
  try {
    return readdirSync("/proc")
      .filter((n) => /^\d+$/.test(n))
      .map(Number);
  } catch {
    return [];
  }
}

/**
 * The live processes of a task or a session: members of its noted groups
 * (when the group leader is the one noted, or is gone and the member
 * carries the marker) and any process whose environment carries the
 * marker (`NAME=value`).
 */
function findMarkedProcesses(markerText: string, groups: readonly GroupRef[], self: number = process.pid): number[] {
  const marker = Buffer.from(markerText);
  const trusted = new Set<number>();
  for (const g of groups) {
    const leader = readStat(g.pgid);
    // A leader that is alive but started at another time is another process that reused the pid.
    if (alive(leader) && (g.startTicks === undefined || leader.startTicks === g.startTicks)) trusted.add(g.pgid);
  }
  const found: number[] = [];
  for (const pid of listPids()) {
    if (pid === self) continue;
    const s = readStat(pid);
    if (!alive(s)) continue;
    // An empty marker names nothing: only the groups count.
    if (trusted.has(s.pgid) || (marker.length > 0 && environMentions(pid, marker))) found.push(pid);
  }
  return found;
}

/** What ending a task's leftovers did, in words for the task's message. */
export interface Cleanup {
  killed: number[];
  failed: string[];
}

/**
 * Ends a task's leftover processes: SIGTERM to each, then SIGKILL to those
 * still alive after `graceMs`. Resolves once they are gone or the second
 * signal was sent.
 */
export function endTaskProcesses(taskId: string, groups: readonly GroupRef[], clock: Clock, graceMs: number): Promise<Cleanup> {
  return endMarkedProcesses(`REXMESH_TASK_ID=${taskId}`, groups, clock, graceMs);
}

/** Ends every process whose environment carries `marker` (and the members of `groups`), as endTaskProcesses. */
export async function endMarkedProcesses(marker: string, groups: readonly GroupRef[], clock: Clock, graceMs: number): Promise<Cleanup> {
  const pids = findMarkedProcesses(marker, groups);
  const failed: string[] = [];
  const signal = (pid: number, sig: NodeJS.Signals) => {
    try {
      process.kill(pid, sig);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code !== "ESRCH") failed.push(`pid ${pid}: ${code ?? String(err)}`);
    }
  };
  for (const pid of pids) signal(pid, "SIGTERM");
  const deadline = clock.now() + graceMs;
  while (pids.some((p) => alive(readStat(p))) && clock.now() < deadline) await clock.sleep(25);
  for (const pid of pids) if (alive(readStat(pid))) signal(pid, "SIGKILL");
  return { killed: pids, failed };
}

/** Says what the cleanup did, for the INTERRUPTED message. */
export function describeCleanup(c: Cleanup): string {
  if (c.killed.length === 0 && c.failed.length === 0) return "no process of it was left running";
  const parts: string[] = [];
  if (c.killed.length > 0) parts.push(`${c.killed.length} leftover process${c.killed.length > 1 ? "es" : ""} ended (pid ${c.killed.slice(0, 10).join(", ")})`);
  if (c.failed.length > 0) parts.push(`could not end ${c.failed.join("; ")}`);
  return parts.join("; ");
}
