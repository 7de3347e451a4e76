import { spawn, type ChildProcess } from "node:child_process";
import { readFileSync } from "node:fs";
import { afterEach, describe, expect, it } from "vitest";
import { ManualClock, systemClock, type Clock } from "../../common/clock.js";
import { endMarkedProcesses, groupRef, MarkedScans, markedScansOf } from "../../daemon/orphans.js";
import { readStat } from "../../daemon/proc-stat.js";
import { isAlive as alive } from "../integration/support.js";

/**
 * Finding what a task left running, with real processes on this host's
 * /proc. Each test takes a clock of its own, so that its scans are counted
 * apart from any other's (one MarkedScans per clock).
 */

const started: ChildProcess[] = [];

afterEach(() => {
  for (const c of started.splice(0)) {
    try {
      process.kill(-c.pid!, "SIGKILL");
    } catch {
      // Gone.
    }
  }
});

/** A process group of its own running `script`, with `env` added to a bare environment. */
function run(script: string, env: Record<string, string> = {}): ChildProcess {
  const c = spawn("/bin/sh", ["-c", script], { detached: true, stdio: "ignore", env: { PATH: process.env.PATH ?? "/usr/bin:/bin", ...env } });
  started.push(c);
  return c;
}

/** Waits until the process has exec'd its script (its environment readable, its stat its own). */
async function settled(c: ChildProcess): Promise<number> {
  const pid = c.pid!;
  for (let i = 0; i < 200 && readStat(pid) === undefined; i++) await new Promise((r) => setTimeout(r, 10));
  await new Promise((r) => setTimeout(r, 50));
  return pid;
}

const freshClock = (): Clock => ({ ...systemClock });

describe("leftovers of tasks, by their marker and their noted groups", () => {
  it("questions asked in one turn share one scan of /proc, and each finds only its own task's processes", async () => {
    const clock = freshClock();
    const [a, b, c, other] = await Promise.all(["t-a", "t-b", "t-c", "t-other"].map((id) => settled(run("exec sleep 30", { REXMESH_TASK_ID: id }))));
    const ends = await Promise.all(["t-a", "t-b", "t-c"].map((id) => endMarkedProcesses(`REXMESH_TASK_ID=${id}`, [], clock, 2000)));
    expect(ends.map((e) => e.killed)).toEqual([[a], [b], [c]]);
    expect(ends.every((e) => e.failed.length === 0)).toBe(true);
    expect(markedScansOf(clock).scans, "one scan answered the three").toBe(1);
    for (const pid of [a, b, c]) expect(alive(pid!), `${pid} ended`).toBe(false);
    expect(alive(other!), "another task's process is left alone").toBe(true);
  });

  it("a marker that is only a prefix of another's, or a variable of another name, is not the task's", async () => {
    const clock = freshClock();
    const longer = await settled(run("exec sleep 30", { REXMESH_TASK_ID: "t-ab" }));
    const otherName = await settled(run("exec sleep 30", { OTHER: "REXMESH_TASK_ID=t-a" }));
    const { killed } = await endMarkedProcesses("REXMESH_TASK_ID=t-a", [], clock, 2000);
    expect(killed).toEqual([]);
    expect(alive(longer) && alive(otherName)).toBe(true);
  });

  it("finds the members of a noted group without the marker, and not the members of a group whose leader's pid was given to another process", async () => {
    const clock = freshClock();
    // A leader and its child, both without any marker.
    const leader = await settled(run("sleep 30 & wait"));
    const noted = groupRef(leader);
    expect(noted.startTicks).toBeGreaterThan(0);
    const members = () => [leader, ...childrenOf(leader)];
    expect(members()).toHaveLength(2);
    const kept = members();
    // Noted with another start time: the pid is taken to be another process's now, and its group is not the task's.
    const stale = await endMarkedProcesses("", [{ pgid: leader, startTicks: noted.startTicks! + 1 }], clock, 2000);
    expect(stale.killed).toEqual([]);
    expect(kept.every(alive)).toBe(true);
    const ended = await endMarkedProcesses("", [noted], clock, 2000);
    expect([...ended.killed].sort((x, y) => x - y)).toEqual([...kept].sort((x, y) => x - y));
    expect(kept.some(alive)).toBe(false);
    expect(markedScansOf(clock).scans).toBe(2);
  });

  it("a question asked after a scan is answered by a new scan that sees the processes started since", async () => {
    const clock = freshClock();
    const first = await endMarkedProcesses("REXMESH_TASK_ID=t-late", [], clock, 2000);
    expect(first.killed).toEqual([]);
    const late = await settled(run("exec sleep 30", { REXMESH_TASK_ID: "t-late" }));
    const second = await endMarkedProcesses("REXMESH_TASK_ID=t-late", [], clock, 2000);
    expect(second.killed).toEqual([late]);
    expect(alive(late)).toBe(false);
    expect(markedScansOf(clock).scans).toBe(2);
  });

  it("with `now`, SIGTERM goes out before the call returns (a daemon that stops exits next), not after a shared scan", async () => {
    const clock = freshClock();
    const pid = await settled(run("exec sleep 30", { REXMESH_SESSION_ID: "s-stop" }));
    const ended = endMarkedProcesses("REXMESH_SESSION_ID=s-stop", [], clock, 2000, { now: true });
    // No turn of the event loop from here: only a signal already sent can end it.
    const until = Date.now() + 3000;
    while (alive(pid) && Date.now() < until) {
      // Spinning on purpose.
    }
    expect(alive(pid), "ended without the loop turning").toBe(false);
    expect((await ended).killed).toEqual([pid]);
    expect(markedScansOf(clock).scans, "not through the shared scans").toBe(0);
  });

  it("a noted group is judged when asked: its leader exiting before the scan does not hide its members", async () => {
    const clock = freshClock();
    const leader = await settled(run("sleep 30 & wait"));
    const [member] = childrenOf(leader);
    expect(member).toBeDefined();
    const ended = endMarkedProcesses("", [groupRef(leader)], clock, 2000);
    // The leader dies (a zombie: this process cannot reap it while its loop does not turn) before the shared scan runs.
    process.kill(leader, "SIGKILL");
    const until = Date.now() + 3000;
    while (alive(leader) && Date.now() < until) {
      // Spinning on purpose: no turn of the loop, so the scan has not run yet.
    }
    expect(alive(leader)).toBe(false);
    expect((await ended).killed).toEqual([member]);
    for (let i = 0; i < 100 && alive(member!); i++) await new Promise((r) => setTimeout(r, 10));
    expect(alive(member!)).toBe(false);
  });

  it("flush answers the questions waiting at once (a daemon about to exit)", async () => {
    const scans = new MarkedScans({ ...systemClock });
    const answer = scans.find("REXMESH_TASK_ID=t-flush", []);
    scans.flush();
    expect(scans.scans, "scanned in this turn").toBe(1);
    expect(await answer).toEqual([]);
    await new Promise((r) => setImmediate(r));
    expect(scans.scans, "the scheduled scan was not run again").toBe(1);
  });

  it("paces scans to a twentieth of the time, a question waiting at most a second", async () => {
    // Every look at this clock takes 100 ms: a scan takes 100 ms, so the next may start 2 s after it, capped at 1 s.
    class SlowLooks extends ManualClock {
      private skew = 0;
      override now(): number {
        this.skew += 100;
        return super.now() + this.skew - 100;
      }
    }
    const clock = new SlowLooks();
    const scans = new MarkedScans(clock);
    await scans.find("REXMESH_TASK_ID=t-pace-1", []);
    let answered = false;
    const second = scans.find("REXMESH_TASK_ID=t-pace-2", []).then(() => (answered = true));
    for (let i = 0; i < 3; i++) await new Promise((r) => setImmediate(r));
    expect(answered, "not at once: paced").toBe(false);
    clock.advance(999);
    await new Promise((r) => setImmediate(r));
    expect(answered).toBe(false);
    clock.advance(1);
    await new Promise((r) => setImmediate(r));
    expect(answered, "within the 1 s cap (uncapped it would wait 1.8 s)").toBe(true);
    await second;
    expect(scans.scans).toBe(2);
  });

  it("a process that ignores SIGTERM gets SIGKILL after the grace", async () => {
    const clock = freshClock();
    const ignoresTerm = await settled(run("trap '' TERM; while :; do sleep 0.05; done", { REXMESH_TASK_ID: "t-ignores-term" }));
    const t0 = Date.now();
    const { killed } = await endMarkedProcesses("REXMESH_TASK_ID=t-ignores-term", [], clock, 300);
    expect(killed).toContain(ignoresTerm);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(300);
    for (let i = 0; i < 100 && alive(ignoresTerm); i++) await new Promise((r) => setTimeout(r, 10));
    expect(alive(ignoresTerm)).toBe(false);
  });
});

/** The pids whose parent is `pid`, from /proc/<pid>/task/<pid>/children. */
function childrenOf(pid: number): number[] {
  return readFileSync(`/proc/${pid}/task/${pid}/children`, "utf8").trim().split(/\s+/).filter(Boolean).map(Number);
}
