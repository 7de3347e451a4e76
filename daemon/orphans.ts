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

/** The entries (`NAME=value`) of a process's environment; empty when it is gone or not ours to read. */
function environEntries(pid: number): Set<string> {
  try {
    return new Set(readFileSync(`/proc/${pid}/environ`, "latin1").split("\0"));
  } catch {
    return new Set();
  }
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

/** A marker as an environment read as latin1 holds it: its UTF-8 bytes, one character each. */
function latin1Of(marker: string): string {
  return Buffer.from(marker).toString("latin1");
}

/** One question to a scan: a marker (latin1, see latin1Of; empty: none) and the noted groups taken to be the task's. */
interface MarkedQuery {
  marker: string;
  trusted: ReadonlySet<number>;
}

/**
 * A question as it stands when asked. A noted group is the task's when its
 * leader is the one noted (same start time) and alive now; decided now, not
 * at the scan: a leader that exits in between leaves its members in the
 * group, whose number Linux gives to no other process while they are there.
 */
function question(marker: string, groups: readonly GroupRef[]): MarkedQuery {
  const trusted = new Set<number>();
  for (const g of groups) {
    const leader = readStat(g.pgid);
    // A leader that is alive but started at another time is another process that reused the pid.
    if (alive(leader) && (g.startTicks === undefined || leader.startTicks === g.startTicks)) trusted.add(g.pgid);
  }
  return { marker: latin1Of(marker), trusted };
}

/**
 * The live processes of each query, by one pass over /proc: members of its
 * trusted groups and any process whose environment carries its marker. A
 * process's environment is read once, whatever the number of queries.
 */
function findMarkedProcesses(queries: readonly MarkedQuery[], self: number): number[][] {
  const found = queries.map((): number[] => []);
  for (const pid of listPids()) {
    if (pid === self) continue;
    const s = readStat(pid);
    if (!alive(s)) continue;
    let env: Set<string> | undefined;
    for (const [i, q] of queries.entries()) {
      if (q.trusted.has(s.pgid)) found[i]!.push(pid);
      // An empty marker names nothing: only the groups count.
      else if (q.marker !== "" && (env ??= environEntries(pid)).has(q.marker)) found[i]!.push(pid);
    }
  }
  return found;
}

/** A scan of /proc shared by several askers is taken at most once per this many times its own duration: scans take at most 1/SCAN_SHARE of the time. */
export const SCAN_SHARE = 20;
/** ... and a question to MarkedScans waits at most this long for its scan. */
const MAX_SCAN_WAIT_MS = 1000;

/**
 * The scans for marked processes of one daemon process (per clock): every
 * question asked before a scan starts is answered by it. A scan reads the
 * stat of every process on the host and the environment of most: one per
 * question, 36 tasks stopped before their spawner reported their starts
 * (a burst on a loaded 2-core VM) took a daemon's CPU for seconds, which
 * made the next stops later still. Each scan starts after every question it
 * answers was asked (a process started before the question is seen), and
 * the next waits until scans take at most 1/SCAN_SHARE of the time, but
 * never more than MAX_SCAN_WAIT_MS (so once a scan takes over 50 ms they
 * run once a second): a leftover is signalled that much later. A daemon
 * that exits runs what is waiting first ({@link flush}).
 */
export class MarkedScans {
  private waiting: Array<MarkedQuery & { resolve: (pids: number[]) => void }> = [];
  /** The scan to come, while one is scheduled. */
  private next: { cancel(): void } | undefined;
  private last: { at: number; tookMs: number } | undefined;
  /** Scans taken so far (a test tells sharing by it). */
  scans = 0;

  constructor(
    private readonly clock: Clock,
    private readonly self: number = process.pid,
  ) {}

  /** The live processes carrying `marker`, or members of `groups`, as a scan taken after this call finds them. */
  find(marker: string, groups: readonly GroupRef[]): Promise<number[]> {
    return new Promise((resolve) => {
      this.waiting.push({ ...question(marker, groups), resolve });
      this.schedule();
    });
  }

  private schedule(): void {
    if (this.next !== undefined || this.waiting.length === 0) return;
    const last = this.last;
    const wait = last === undefined ? 0 : Math.min(MAX_SCAN_WAIT_MS, last.at + SCAN_SHARE * last.tookMs - this.clock.now());
    if (wait > 0) {
      this.next = this.clock.setTimeout(() => this.run(), wait);
      return;
    }
    // A turn at least: the questions of the same turn (timers due together) share the scan.
    const turn = setImmediate(() => this.run());
    this.next = { cancel: () => clearImmediate(turn) };
  }

  /** Answers the questions waiting now, at once (a daemon about to exit): their askers' signals go out in this turn's microtasks. */
  flush(): void {
    if (this.waiting.length > 0) this.run();
  }

  private run(): void {
    this.next?.cancel();
    this.next = undefined;
    const batch = this.waiting;
    if (batch.length === 0) return;
    this.waiting = [];
    const at = this.clock.now();
    const found = findMarkedProcesses(batch, this.self);
    this.scans += 1;
    this.last = { at, tookMs: this.clock.now() - at };
    for (const [i, q] of batch.entries()) q.resolve(found[i]!);
    this.schedule();
  }
}

const perClock = new WeakMap<Clock, MarkedScans>();

/** The MarkedScans of a clock: every executor, session and restart cleanup of a daemon process (one clock) shares its scans. */
export function markedScansOf(clock: Clock): MarkedScans {
  let s = perClock.get(clock);
  if (s === undefined) perClock.set(clock, (s = new MarkedScans(clock)));
  return s;
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

/**
 * Ends every process whose environment carries `marker` (and the members of
 * `groups`), as endTaskProcesses. `now`: scanned and sent SIGTERM before this
 * returns (a daemon about to exit cannot wait for a shared scan), not
 * through the clock's shared scans.
 */
export async function endMarkedProcesses(marker: string, groups: readonly GroupRef[], clock: Clock, graceMs: number, opts: { now?: boolean } = {}): Promise<Cleanup> {
  const pids = opts.now ? findMarkedProcesses([question(marker, groups)], process.pid)[0]! : await markedScansOf(clock).find(marker, groups);
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
