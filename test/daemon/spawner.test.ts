/**
 * The spawner's own faults, with real processes (daemon/spawner.ts): one
 * that stops answering, one that cannot start, and its end with the daemon.
 * Everything else the executor guarantees is tested through the spawner in
 * executor.test.ts.
 */
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Readable, Writable } from "node:stream";
import { create } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { afterEach, describe, expect, it, vi } from "vitest";
import { systemClock } from "../../common/clock.js";
import { silentLogger } from "../../common/logger.js";
import { Executor, type OutputSink } from "../../daemon/executor.js";
import { groupRef, type GroupRef } from "../../daemon/orphans.js";
import { Spawner, type SpawnerOptions } from "../../daemon/spawner.js";
import { FrameError, FrameKind, FrameReader, MAX_BODY_TO_DAEMON, PROTOCOL_VERSION, TO_DAEMON, frame, jsonFrame, u32Frame } from "../../daemon/spawner-frames.js";
import { StepSchema, TaskSpecSchema, TaskState } from "../../gen/rexmesh/v1/task_pb.js";

const READY = u32Frame(FrameKind.READY, 0, PROTOCOL_VERSION);
const MAIN = new URL("../../dist/daemon/spawner-main.js", import.meta.url).pathname;
const shell = (script: string) => create(TaskSpecSchema, { taskId: "t-1", steps: [create(StepSchema, { tool: { case: "shell", value: { script, interpreter: [] } } })] });

function stat(pid: number): string[] | undefined {
  try {
    const s = readFileSync(`/proc/${pid}/stat`, "latin1");
    return s.slice(s.lastIndexOf(")") + 2).split(" ");
  } catch {
    return undefined;
  }
}
/** Bytes a process has written so far (/proc/<pid>/io wchar). */
const written = (pid: number) => Number(/^wchar:\s*(\d+)$/m.exec(readFileSync(`/proc/${pid}/io`, "latin1"))?.[1]);
const alive = (pid: number) => {
  const s = stat(pid)?.[0];
  return s !== undefined && s !== "Z" && s !== "X";
};

async function until(what: string, check: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

const spawners: Spawner[] = [];
function newSpawner(opts: Partial<SpawnerOptions> = {}): Spawner {
  const s = new Spawner({ clock: systemClock, log: silentLogger, mainPath: MAIN, ...opts });
  spawners.push(s);
  return s;
}
afterEach(() => {
  for (const s of spawners.splice(0)) {
    const pid = s.pid;
    s.stop();
    if (pid !== undefined && alive(pid)) process.kill(pid, "SIGKILL");
  }
});

describe("Spawner", () => {
  it("starts steps as its own children, and ends when the daemon closes its end", async () => {
    const spawner = newSpawner();
    let parent: number | undefined;
    const outcome = await new Executor({ clock: systemClock, launcher: spawner }).run(shell("exec sleep 0.3"), {
      onOutput: () => {},
      onStart: (pid) => (parent = Number(stat(pid)?.[1])),
    });
    expect(outcome).toMatchObject({ state: TaskState.SUCCEEDED, exitCode: 0 });
    const pid = spawner.pid!;
    expect(parent).toBe(pid);
    spawner.stop();
    await until("the spawner exits", () => !alive(pid));
  });

  it("kills a spawner that stops answering: its step ends INTERRUPTED and its process group is ended", async () => {
    const spawner = newSpawner({ pingMs: 50, answerTimeoutMs: 400 });
    // Ready first: one still starting when the wait runs out is killed too, but its steps go to the daemon (below).
    spawner.start();
    await until("the spawner is ready", () => spawner.ready);
    let pid = 0;
    let started!: () => void;
    const first = new Promise<void>((resolve) => (started = resolve));
    const onOutput: OutputSink = () => started();
    const run = new Executor({ clock: systemClock, launcher: spawner, killGraceMs: 200 }).run(shell("echo started; exec sleep 1000"), { onOutput, onStart: (p) => (pid = p) });
    await first;
    const frozen = spawner.pid!;
    process.kill(frozen, "SIGSTOP");
    const outcome = await run;
    expect(outcome.state, outcome.message).toBe(TaskState.INTERRUPTED);
    expect(outcome.message).toMatch(/^the spawner did not answer for [\d.]+ s and was killed while its process \d+ ran: its exit and any output not yet received are unknown; 1 leftover process ended/);
    expect(outcome.outputTruncated).toBe(true);
    expect(alive(pid)).toBe(false);
    await until("the frozen spawner is gone", () => !alive(frozen));

    // The next step gets a new spawner.
    const next = await new Executor({ clock: systemClock, launcher: spawner }).run(shell("echo again"), { onOutput: () => {} });
    expect(next.state).toBe(TaskState.SUCCEEDED);
    expect(spawner.starts).toBe(2);
  });

  it("runs steps in the daemon when the spawner cannot start, and does not try again at once", async () => {
    const spawner = newSpawner({ mainPath: "/no/such/spawner-main.js" });
    const chunks: string[] = [];
    const ex = new Executor({ clock: systemClock, launcher: spawner });
    const outcome = await ex.run(shell("echo fell back; echo err >&2; exit 3"), { onOutput: (_s, data) => chunks.push(Buffer.from(data).toString()) });
    expect(outcome).toMatchObject({ state: TaskState.FAILED, exitCode: 3 });
    expect(chunks.join("")).toContain("fell back");
    const second = await ex.run(shell("echo second"), { onOutput: () => {} });
    expect(second.state).toBe(TaskState.SUCCEEDED);
    expect(spawner.starts).toBe(1);
  });

  it("starts nothing once the daemon that started it is gone (a request still in the pipe included)", async () => {
    const dir = mkdtempSync(join(tmpdir(), "rexmesh-spawner-"));
    try {
      // Run spawner-main as a daemon would, naming `daemonPid` as its daemon, and ask it to create a file.
      const ask = async (daemonPid: number, file: string) => {
        const child = spawn(process.execPath, [MAIN, String(daemonPid)], { stdio: ["ignore", "ignore", "inherit", "pipe", "pipe"] });
        const kinds: number[] = [];
        const reader = new FrameReader((kind) => kinds.push(kind));
        child.stdio[4]!.on("data", (b: Buffer) => reader.push(b));
        // A spawner that exits at once leaves the request unread: a reset, not a failure.
        for (const fd of [3, 4]) child.stdio[fd]!.on("error", () => {});
        (child.stdio[3] as Writable).end(jsonFrame(FrameKind.SPAWN, 1, { program: "touch", args: [file], env: { PATH: process.env.PATH ?? "/usr/bin:/bin" } }, Buffer.alloc(0)));
        const code = await new Promise<number | null>((resolve) => child.on("close", resolve));
        return { code, kinds };
      };
      // Its daemon (this process) alive: it is ready and starts the process.
      const ok = await ask(process.pid, join(dir, "started"));
      expect(ok.kinds.slice(0, 2)).toEqual([FrameKind.READY, FrameKind.SPAWNED]);
      await until("the file is made", () => existsSync(join(dir, "started")));
      // Another process named as its daemon, as when the daemon died and this one was re-parented: nothing.
      const gone = await ask(1, join(dir, "orphaned"));
      expect(gone).toEqual({ code: 0, kinds: [] });
      expect(existsSync(join(dir, "orphaned"))).toBe(false);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("runs a step exactly once when a NODE_OPTIONS preload of the daemon writes to stdout", async () => {
    const dir = mkdtempSync(join(tmpdir(), "rexmesh-spawner-"));
    const saved = process.env.NODE_OPTIONS;
    try {
      const preload = join(dir, "preload.cjs");
      writeFileSync(preload, `process.stdout.write("preload: agent started\\n");\n`);
      const runs = join(dir, "runs");
      const spawner = newSpawner({ pingMs: 100, answerTimeoutMs: 1500 });
      process.env.NODE_OPTIONS = `--require ${preload}`;
      try {
        spawner.start();
      } finally {
        if (saved === undefined) delete process.env.NODE_OPTIONS;
        else process.env.NODE_OPTIONS = saved;
      }
      const outcome = await new Executor({ clock: systemClock, launcher: spawner }).run(shell(`echo ran >> ${runs}; echo hello`), { onOutput: () => {} });
      expect(outcome.state, outcome.message).toBe(TaskState.SUCCEEDED);
      // Long enough for a watchdog that would have killed a spawner it could not read, and a second run.
      await new Promise((r) => setTimeout(r, 2000));
      expect(readFileSync(runs, "utf8").trim().split("\n")).toEqual(["ran"]);
      expect(spawner.starts).toBe(1);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  /**
   * A stand-in spawner: `first` bytes written on its frame fd (READY, or
   * nothing, or anything), then, on the first request, a line in `marker`
   * and `reply` on its frame fd.
   */
  function fakeMain(dir: string, opts: { first: Buffer; reply: string }): string {
    const path = join(dir, "fake-main.mjs");
    writeFileSync(
      path,
      `import { appendFileSync, writeSync } from "node:fs";
import { Socket } from "node:net";
const first = Buffer.from(${JSON.stringify(opts.first.toString("base64"))}, "base64");
for (let at = 0; at < first.length; ) {
  try {
    at += writeSync(4, first, at);
  } catch (err) {
    if (err.code !== "EAGAIN") throw err;
  }
}
const s = new Socket({ fd: 3, readable: true, writable: false });
let once = false;
s.on("data", () => {
  if (once) return;
  once = true;
  appendFileSync(${JSON.stringify(join(dir, "marker"))}, "ran\\n");
  writeSync(4, Buffer.from(${JSON.stringify(opts.reply)}));
});
s.on("end", () => process.exit(0));
setInterval(() => {}, 1000);
`,
    );
    return path;
  }

  it("kills a spawner that sends a malformed frame after READY: its step ends INTERRUPTED and is not run again", async () => {
    const dir = mkdtempSync(join(tmpdir(), "rexmesh-spawner-"));
    try {
      const spawner = newSpawner({ mainPath: fakeMain(dir, { first: READY, reply: "not a frame\n" }) });
      const outcome = await new Executor({ clock: systemClock, launcher: spawner }).run(shell("echo hi"), { onOutput: () => {} });
      expect(outcome.state, outcome.message).toBe(TaskState.INTERRUPTED);
      expect(outcome.message).toMatch(/broke the frame protocol/);
      expect(readFileSync(join(dir, "marker"), "utf8")).toBe("ran\n");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("sends nothing to a spawner before its READY: one that never says it is killed and its step runs in the daemon, once", async () => {
    const dir = mkdtempSync(join(tmpdir(), "rexmesh-spawner-"));
    try {
      // Were the request sent, the stand-in would run it (the marker) and answer with garbage.
      const spawner = newSpawner({ pingMs: 100, answerTimeoutMs: 600, mainPath: fakeMain(dir, { first: Buffer.alloc(0), reply: "preload: agent started\n" }) });
      const chunks: string[] = [];
      const outcome = await new Executor({ clock: systemClock, launcher: spawner }).run(shell("echo in the daemon"), { onOutput: (_s, d) => chunks.push(Buffer.from(d).toString()) });
      expect(outcome.state, outcome.message).toBe(TaskState.SUCCEEDED);
      expect(chunks.join("")).toBe("in the daemon\n");
      // The stand-in never received a request.
      expect(existsSync(join(dir, "marker"))).toBe(false);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("kills a spawner that writes anything but READY first, at its header, and runs its step in the daemon, once", async () => {
    const dir = mkdtempSync(join(tmpdir(), "rexmesh-spawner-"));
    try {
      // An output frame of 8 MiB (within the cap after READY) begun before READY: 4 MiB of it, then silence.
      const head = Buffer.alloc(9);
      head.writeUInt32BE(8 << 20, 0);
      head.writeUInt8(FrameKind.STDOUT, 4);
      const main = fakeMain(dir, { first: Buffer.concat([head, Buffer.alloc(4 << 20, 0x61)]), reply: "" });
      // A watchdog far away: the end must come from the frame's header.
      const spawner = newSpawner({ answerTimeoutMs: 120_000, mainPath: main });
      const runs = join(dir, "runs");
      const t0 = Date.now();
      const outcome = await new Executor({ clock: systemClock, launcher: spawner }).run(shell(`echo ran >> ${runs}; echo in the daemon`), { onOutput: () => {} });
      expect(outcome.state, outcome.message).toBe(TaskState.SUCCEEDED);
      expect(Date.now() - t0).toBeLessThan(20_000);
      expect(readFileSync(runs, "utf8")).toBe("ran\n");
      expect(existsSync(join(dir, "marker")), "the stand-in was sent no request").toBe(false);
      expect(spawner.pid).toBeUndefined();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 40_000);
});

/** Blocks this process's event loop (as a busy daemon would) while `check` is false, for at most timeoutMs. */
function blockUntil(check: () => boolean, timeoutMs = 10_000): void {
  const deadline = Date.now() + timeoutMs;
  const cell = new Int32Array(new SharedArrayBuffer(4));
  while (!check() && Date.now() < deadline) Atomics.wait(cell, 0, 0, 20);
}

describe("Spawner stopped (SIGSTOP) while a task is stopped: the task ends within the grace, not at the watchdog", () => {
  const withTimeout = (script: string, ms: number, env: Record<string, string> = {}) => {
    const s = shell(script);
    s.timeout = durationFromMs(ms);
    s.env = env;
    return s;
  };

  /** Starts a task that says "started" and sleeps; stops its spawner; returns what it needs to end it and look. */
  async function stalledTask(stop: { timeoutMs?: number; abort?: AbortController }) {
    // The default watchdog (30 s): an end within seconds is not its doing.
    const spawner = newSpawner();
    spawner.start();
    await until("the spawner is ready", () => spawner.ready);
    let pid = 0;
    let starts = 0;
    const chunks: string[] = [];
    let started!: () => void;
    const first = new Promise<void>((resolve) => (started = resolve));
    const ex = new Executor({ clock: systemClock, launcher: spawner, killGraceMs: 1000 });
    const spec = withTimeout("echo started; exec sleep 60", stop.timeoutMs ?? 0);
    const run = ex.run(spec, {
      onOutput: (_s, d) => {
        chunks.push(Buffer.from(d).toString());
        started();
      },
      onStart: (p) => {
        pid = p;
        starts += 1;
      },
      signal: stop.abort?.signal,
    });
    await first;
    const frozen = spawner.pid!;
    process.kill(frozen, "SIGSTOP");
    return { spawner, ex, run, frozen, pid: () => pid, starts: () => starts, chunks };
  }

  /** SIGCONT, then a task through the same spawner: it runs, nothing of the first comes back, the spawner was not replaced. */
  async function resumeAndCheck(t: Awaited<ReturnType<typeof stalledTask>>, outputAtEnd: number) {
    process.kill(t.frozen, "SIGCONT");
    const next = await t.ex.run(shell("echo next"), { onOutput: () => {} });
    expect(next.state, next.message).toBe(TaskState.SUCCEEDED);
    expect(t.spawner.starts).toBe(1);
    expect(t.spawner.pid).toBe(t.frozen);
    expect(t.chunks).toHaveLength(outputAtEnd);
    expect(t.starts()).toBe(1);
    // Reaped by the spawner once it runs again.
    await until("the step's process is reaped", () => stat(t.pid()) === undefined);
  }

  it("a timeout: TIMED_OUT within seconds, its process killed by the daemon; nothing goes backwards when the spawner runs again", async () => {
    const t = await stalledTask({ timeoutMs: 1000 });
    const stoppedAt = Date.now();
    const outcome = await t.run;
    const took = Date.now() - stoppedAt;
    expect(outcome.state, outcome.message).toBe(TaskState.TIMED_OUT);
    expect(took, "ended by the daemon, not by the 30 s watchdog").toBeLessThan(15_000);
    // Waited for its report the kill grace (1 s) and then the rest of the report wait (5 s at least).
    expect(outcome.message).toMatch(/^timed out after 1s; no end of its process \d+ was reported 5s after its group was gone \(the spawner did not answer\): its exit and any output not yet received are unknown$/);
    expect(outcome.outputTruncated).toBe(true);
    expect(alive(t.pid()), "the sleep is gone (a zombie until its stopped parent reaps it)").toBe(false);
    await resumeAndCheck(t, t.chunks.length);
  }, 30_000);

  it("a spawner only late (stopped past the kill grace, not past the report wait): the task ends with its real exit, nothing unknown", async () => {
    const abort = new AbortController();
    const t = await stalledTask({ abort });
    // Cancelled once the spawner is stopped: the SIGTERM ends the group at once, the kill grace (1 s) passes without the
    // exit's report, and the spawner runs again 2.5 s after the cancel, within the report wait (5 s).
    const cancelledAt = Date.now();
    abort.abort();
    const resume = setTimeout(() => process.kill(t.frozen, "SIGCONT"), 2500);
    try {
      const outcome = await t.run;
      expect(Date.now() - cancelledAt, "ended by the late report, after the spawner ran again").toBeGreaterThanOrEqual(2400);
      expect(outcome.state, outcome.message).toBe(TaskState.CANCELLED);
      expect([outcome.exitCode, outcome.signal], outcome.message).toEqual([undefined, "SIGTERM"]);
      expect(outcome.message).not.toMatch(/unknown|did not answer/);
      expect(outcome.outputTruncated, outcome.message).toBe(false);
      expect(t.chunks.join("")).toBe("started\n");
    } finally {
      clearTimeout(resume);
      process.kill(t.frozen, "SIGCONT");
    }
  }, 30_000);

  it("an urgent cancel (a daemon's drain out of time) waits a kill grace only for a stalled spawner's report", async () => {
    const abort = new AbortController();
    const t = await stalledTask({ abort });
    const cancelledAt = Date.now();
    abort.abort(Object.assign(new Error("the daemon stopped and its grace time ran out"), { urgent: true }));
    const outcome = await t.run;
    expect(outcome.state, outcome.message).toBe(TaskState.CANCELLED);
    expect(outcome.message).toMatch(/^cancelled; no end of its process \d+ was reported 1s after its group was gone \(the spawner did not answer\)/);
    expect(Date.now() - cancelledAt, "not the report wait (5 s)").toBeLessThan(4500);
    await resumeAndCheck(t, t.chunks.length);
  }, 30_000);

  it("a cancel: CANCELLED within seconds, the same way", async () => {
    const abort = new AbortController();
    const t = await stalledTask({ abort });
    const stoppedAt = Date.now();
    abort.abort();
    const outcome = await t.run;
    expect(outcome.state, outcome.message).toBe(TaskState.CANCELLED);
    expect(Date.now() - stoppedAt).toBeLessThan(15_000);
    expect(outcome.message).toMatch(/^cancelled; no end of its process \d+ was reported/);
    expect(alive(t.pid())).toBe(false);
    await resumeAndCheck(t, t.chunks.length);
  }, 30_000);

  it("a timeout before the stopped spawner started the step: TIMED_OUT within seconds, and the step never runs", async () => {
    const dir = mkdtempSync(join(tmpdir(), "rexmesh-spawner-"));
    try {
      const spawner = newSpawner();
      spawner.start();
      await until("the spawner is ready", () => spawner.ready);
      const frozen = spawner.pid!;
      process.kill(frozen, "SIGSTOP");
      const ran = join(dir, "ran");
      const ex = new Executor({ clock: systemClock, launcher: spawner, killGraceMs: 1000 });
      let starts = 0;
      const t0 = Date.now();
      const outcome = await ex.run(withTimeout(`touch ${ran}; exec sleep 60`, 1000, { REXMESH_TASK_ID: "t-never" }), { onOutput: () => {}, onStart: () => (starts += 1) });
      expect(outcome.state, outcome.message).toBe(TaskState.TIMED_OUT);
      expect(Date.now() - t0).toBeLessThan(15_000);
      expect(outcome.message).toMatch(/^timed out after 1s; the spawner did not report its start 5s after the stop and was told not to start it: whether it ran is unknown; no process of it was left running$/);
      process.kill(frozen, "SIGCONT");
      // Frames are read in order: once the next task ran, the first request was read and refused.
      const next = await ex.run(shell("echo next"), { onOutput: () => {} });
      expect(next.state, next.message).toBe(TaskState.SUCCEEDED);
      expect(existsSync(ran), "the cancelled step was never started").toBe(false);
      expect(starts).toBe(0);
      expect(spawner.starts).toBe(1);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 30_000);

  it("a timeout before the spawner said READY: the request, never sent, is taken back; TIMED_OUT at once, nothing said unknown", async () => {
    const dir = mkdtempSync(join(tmpdir(), "rexmesh-spawner-"));
    try {
      const spawner = newSpawner();
      spawner.start();
      // Stopped as it starts (Node takes 50 ms or more to say READY): nothing is written to it before.
      const frozen = spawner.pid!;
      process.kill(frozen, "SIGSTOP");
      const ran = join(dir, "ran");
      // A long grace: the end must not wait for it.
      const ex = new Executor({ clock: systemClock, launcher: spawner, killGraceMs: 30_000 });
      const t0 = Date.now();
      const outcome = await ex.run(withTimeout(`touch ${ran}`, 500, { REXMESH_TASK_ID: "t-withdrawn" }), { onOutput: () => {} });
      expect(outcome.state, outcome.message).toBe(TaskState.TIMED_OUT);
      expect(outcome.message).toBe("timed out after 500ms");
      expect(outcome.outputTruncated).toBe(false);
      expect(Date.now() - t0).toBeLessThan(20_000);
      process.kill(frozen, "SIGCONT");
      await until("the spawner is ready", () => spawner.ready);
      const next = await ex.run(shell("echo next"), { onOutput: () => {} });
      expect(next.state, next.message).toBe(TaskState.SUCCEEDED);
      expect(existsSync(ran), "the withdrawn step never ran").toBe(false);
      expect(spawner.starts).toBe(1);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 40_000);
});

describe("Spawner: whose group a signal reaches", () => {
  it("notes the start time of a step's process reaped before the daemon read its start, as the spawner read it then", async () => {
    const spawner = newSpawner();
    spawner.start();
    await until("the spawner is ready", () => spawner.ready);
    const sp = spawner.pid!;
    const w0 = written(sp);
    const groups: GroupRef[] = [];
    let pid = 0;
    const done = new Executor({ clock: systemClock, launcher: spawner }).run(shell("exit 0"), {
      onOutput: () => {},
      onStart: (p, group?: GroupRef) => {
        pid = p;
        // (Until review the daemon noted groupRef(pid), read as it learnt of the start.)
        groups.push(group ?? groupRef(p));
      },
    });
    // The request goes out; then this process does not read until the spawner wrote the step's start, pipes' ends and exit, and reaped it.
    await new Promise((r) => setImmediate(r));
    blockUntil(() => written(sp) - w0 >= 21 + 2 * 13 + 34 && readFileSync(`/proc/${sp}/task/${sp}/children`, "latin1").trim() === "");
    const outcome = await done;
    expect(outcome.state, outcome.message).toBe(TaskState.SUCCEEDED);
    expect(stat(pid), "gone before the daemon learnt of it: /proc could not tell its start time then").toBeUndefined();
    // Its start time as the spawner read it: after the spawner's own, before now.
    const uptimeTicks = Number(readFileSync("/proc/uptime", "latin1").split(" ")[0]) * 100;
    expect(groups).toHaveLength(1);
    expect(groups[0]!.pgid).toBe(pid);
    expect(groups[0]!.startTicks).toBeGreaterThanOrEqual(Number(stat(sp)![19]));
    expect(groups[0]!.startTicks).toBeLessThanOrEqual(uptimeTicks + 1);
  });
});

describe("spawner-main whose daemon does not read its answers (fd 4)", () => {
  /** CPU time (user + system) of a process, in clock ticks. */
  const cpuTicks = (pid: number) => {
    const s = stat(pid)!;
    return Number(s[11]) + Number(s[12]);
  };

  it("waits for the daemon without spinning, and still reads its requests: a CANCEL kills the step", async () => {
    const child = spawn(process.execPath, [MAIN, String(process.pid)], { stdio: ["ignore", "ignore", "inherit", "pipe", "pipe"] });
    const toSpawner = child.stdio[3] as Writable;
    const fromSpawner = child.stdio[4] as Readable;
    for (const fd of [3, 4]) child.stdio[fd]!.on("error", () => {});
    try {
      const frames: { kind: number; id: number; body: Buffer }[] = [];
      const reader = new FrameReader((kind, id, body) => frames.push({ kind, id, body }), { kinds: TO_DAEMON, maxBody: MAX_BODY_TO_DAEMON });
      fromSpawner.on("data", (b: Buffer) => reader.push(b));
      toSpawner.write(jsonFrame(FrameKind.SPAWN, 1, { program: "yes", args: [], env: { PATH: process.env.PATH ?? "/usr/bin:/bin" } }, Buffer.alloc(0)));
      // Acknowledged in advance far beyond the window: only the daemon's not reading can hold the step back.
      toSpawner.write(u32Frame(FrameKind.ACK, 1, 0x7fff_ffff));
      await until("the step started", () => frames.some((f) => f.kind === FrameKind.SPAWNED));
      const yes = frames.find((f) => f.kind === FrameKind.SPAWNED)!.body.readUInt32BE(0);
      // The daemon stops reading: the socket fills, then the spawner has to wait.
      fromSpawner.pause();
      let last = -1;
      await until("the spawner's writes stopped", () => {
        const now = written(child.pid!);
        const still = now === last;
        last = now;
        return still && now > 0;
      }, 20_000);
      const t0 = Date.now();
      const c0 = cpuTicks(child.pid!);
      await new Promise((r) => setTimeout(r, 3000));
      const used = (cpuTicks(child.pid!) - c0) * 10; // ms at 100 ticks a second
      // Spinning takes whatever CPU it gets; waiting takes none. Generous for a loaded machine.
      expect(used, `the spawner used ${used} ms of CPU in ${Date.now() - t0} ms`).toBeLessThan((Date.now() - t0) / 4);
      // Its requests are still read while its answers wait: the step is killed (its process is a zombie until reaped).
      toSpawner.write(frame(FrameKind.CANCEL, 1));
      await until("the cancelled step's process is killed", () => !alive(yes), 20_000);
      // What waited arrives whole, in order, once read again.
      const closed = new Promise((resolve) => child.on("close", resolve));
      fromSpawner.resume();
      toSpawner.end();
      await closed;
      const out = Buffer.concat(frames.filter((f) => f.kind === FrameKind.STDOUT).map((f) => f.body)).toString("latin1");
      expect(out.length).toBeGreaterThan(100_000);
      expect(/^(y\n)*y?$/.test(out), "yes's output, every byte in order").toBe(true);
      expect(frames.filter((f) => f.kind === FrameKind.EXIT || f.kind === FrameKind.CLOSED), "nothing more of a cancelled step").toEqual([]);
    } finally {
      if (alive(child.pid!)) child.kill("SIGKILL");
    }
  }, 60_000);
});

describe("Spawner death: what was in its pipe", () => {
  it("hands on every byte it wrote before it died, and marks output truncated only when some may be missing", async () => {
    const spawner = newSpawner();
    spawner.start();
    await until("the spawner is ready", () => spawner.ready);
    const ex = new Executor({ clock: systemClock, launcher: spawner, killGraceMs: 200 });
    // 100,000 bytes, then either both pipes closed (all output sent) or held open; then a long sleep.
    const expected = Buffer.concat(Array.from({ length: 6250 }, () => Buffer.from("0123456789abcdef")));
    const run = async (closeThem: boolean) => {
      const chunks: Buffer[] = [];
      let pid = 0;
      const script = `yes 0123456789abcdef | tr -d '\\n' | head -c 100000; ${closeThem ? "exec >&- 2>&-; " : ""}exec sleep 60`;
      const done = ex.run(shell(script), { onOutput: (_s, d) => chunks.push(Buffer.from(d)), onStart: (p) => (pid = p) });
      await until("the step runs", () => pid > 0);
      const spawnerPid = spawner.pid!;
      // This process does not read while the spawner relays it all (the step is asleep, the spawner's writes stop); then the spawner dies.
      let last = -1;
      blockUntil(() => {
        const cmd = readFileSync(`/proc/${pid}/cmdline`, "latin1");
        const now = written(spawnerPid);
        const still = cmd.startsWith("sleep") && now === last && now > expected.length;
        last = now;
        return still;
      });
      process.kill(spawnerPid, "SIGKILL");
      const outcome = await done;
      expect(Buffer.concat(chunks).equals(expected), `got ${Buffer.concat(chunks).length} bytes`).toBe(true);
      return outcome;
    };
    const closed = await run(true);
    expect(closed.state, closed.message).toBe(TaskState.INTERRUPTED);
    expect(closed.message).toMatch(/^the spawner was killed by SIGKILL while its process \d+ ran: its exit is unknown \(its output had all arrived\)/);
    expect(closed.outputTruncated).toBe(false);
    const open = await run(false);
    expect(open.state, open.message).toBe(TaskState.INTERRUPTED);
    expect(open.message).toMatch(/its exit and any output not yet received are unknown/);
    expect(open.outputTruncated).toBe(true);
  }, 60_000);

  /**
   * A stand-in spawner: the first time, READY, then on the first request it
   * leaves a child holding its frame fds (pid in holderFile) and exits with
   * code 3; once holderFile exists, the real spawner.
   */
  function leakyOnceMain(dir: string, holderFile: string): string {
    const main = join(dir, "leaky-once-main.mjs");
    writeFileSync(
      main,
      `import { spawn } from "node:child_process";
import { existsSync, writeFileSync, writeSync } from "node:fs";
import { Socket } from "node:net";
if (existsSync(${JSON.stringify(holderFile)})) {
  await import(${JSON.stringify(MAIN)});
} else {
  writeSync(4, Buffer.from(${JSON.stringify([...READY])}));
  const s = new Socket({ fd: 3, readable: true, writable: false });
  s.once("data", () => {
    const c = spawn("sleep", ["60"], { stdio: ["ignore", "ignore", "ignore", 3, 4], detached: true });
    writeFileSync(${JSON.stringify(holderFile)}, String(c.pid));
    process.exit(3);
  });
}
`,
    );
    return main;
  }

  /** Runs `body` with a fresh directory and holder file, then kills the holder and removes the directory. */
  async function withHolder(body: (dir: string, holderFile: string) => Promise<void>): Promise<void> {
    const dir = mkdtempSync(join(tmpdir(), "rexmesh-spawner-"));
    const holderFile = join(dir, "holder");
    try {
      await body(dir, holderFile);
    } finally {
      if (existsSync(holderFile)) process.kill(Number(readFileSync(holderFile, "utf8")), "SIGKILL");
      rmSync(dir, { recursive: true, force: true });
    }
  }

  it("ends its steps a bounded time after it exited when something else holds its pipe open", () =>
    withHolder(async (dir, holderFile) => {
      const spawner = newSpawner({ mainPath: leakyOnceMain(dir, holderFile), eofWaitMs: 500 });
      const t0 = Date.now();
      const outcome = await new Executor({ clock: systemClock, launcher: spawner }).run(shell("echo hi"), { onOutput: () => {} });
      expect(outcome.state, outcome.message).toBe(TaskState.INTERRUPTED);
      expect(outcome.message).toMatch(/^the spawner exited with code 3 \(its pipe was still held open 0.5 s later\) before it was known to have started/);
      expect(Date.now() - t0).toBeLessThan(20_000);
    }), 40_000);

  it("starts a step launched while an exited spawner's pipe is still read in a new spawner, not in the one that exited", () =>
    withHolder(async (dir, holderFile) => {
      const spawner = newSpawner({ mainPath: leakyOnceMain(dir, holderFile), eofWaitMs: 4000 });
      const ex = new Executor({ clock: systemClock, launcher: spawner });
      spawner.start();
      await until("the spawner is ready", () => spawner.ready);
      const first = spawner.pid!;
      const lost = ex.run(shell("echo hi"), { onOutput: () => {} });
      // Reaped (gone from /proc) only as this process handles its exit.
      await until("the first spawner exited", () => stat(first) === undefined);
      const chunks: string[] = [];
      const next = await ex.run(shell("echo next"), { onOutput: (_s, d) => chunks.push(Buffer.from(d).toString()) });
      expect(next.state, next.message).toBe(TaskState.SUCCEEDED);
      expect(chunks.join("")).toBe("next\n");
      expect(spawner.starts).toBe(2);
      const outcome = await lost;
      expect(outcome.state, outcome.message).toBe(TaskState.INTERRUPTED);
      expect(outcome.message).toMatch(/^the spawner exited with code 3 \(its pipe was still held open 4 s later\) before it was known to have started/);
    }), 40_000);
});

describe("FrameReader", () => {
  const toDaemon = () => {
    const got: { kind: number; id: number; body: Buffer }[] = [];
    const reader = new FrameReader((kind, id, body) => got.push({ kind, id, body: Buffer.from(body) }), { kinds: TO_DAEMON, maxBody: MAX_BODY_TO_DAEMON });
    return { got, reader };
  };

  it("rejects stray text, an unknown kind, a wrong-size body and a frame over the cap, and takes nothing after", () => {
    let r = toDaemon();
    expect(() => r.reader.push(Buffer.from("preload: agent started\n"))).toThrow(FrameError);
    expect(() => r.reader.push(u32Frame(FrameKind.READY, 0, 1))).toThrow(FrameError);
    expect(r.got).toEqual([]);
    r = toDaemon();
    expect(() => r.reader.push(frame(FrameKind.SPAWN, 1))).toThrow(/unknown frame kind 1/);
    r = toDaemon();
    expect(() => r.reader.push(frame(99, 1))).toThrow(/unknown frame kind 99/);
    r = toDaemon();
    expect(() => r.reader.push(frame(FrameKind.SPAWNED, 1, Buffer.alloc(4)))).toThrow(/not 12/);
    r = toDaemon();
    const over = Buffer.alloc(9);
    over.writeUInt32BE(MAX_BODY_TO_DAEMON + 1, 0);
    over.writeUInt8(FrameKind.STDOUT, 4);
    expect(() => r.reader.push(over)).toThrow(/over the cap/);
  });

  it("reads a large frame delivered in many small chunks, copying it once", () => {
    const body = Buffer.alloc(1024 * 1024);
    for (let i = 0; i < body.length; i++) body[i] = i % 251;
    const wire = Buffer.concat([frame(FrameKind.STDOUT, 7, body), u32Frame(FrameKind.CLOSED, 7, 1)]);
    const { got, reader } = toDaemon();
    const concat = vi.spyOn(Buffer, "concat");
    const alloc = vi.spyOn(Buffer, "allocUnsafe");
    const from = vi.spyOn(Buffer, "from");
    try {
      for (let at = 0; at < wire.length; at += 1000) reader.push(wire.subarray(at, at + 1000));
      const bytes = (calls: unknown[][], size: (args: unknown[], r: unknown) => number, results: { value: unknown }[]) => calls.reduce((n, args, i) => n + size(args, results[i]!.value), 0);
      const copied =
        bytes(concat.mock.calls, (_a, r) => (r as Buffer).length, concat.mock.results) +
        bytes(alloc.mock.calls, (a) => a[0] as number, alloc.mock.results) +
        bytes(from.mock.calls, (_a, r) => (Buffer.isBuffer(r) ? r.length : 0), from.mock.results);
      // Once for the body, plus the test's own copy of it in onFrame and a little for headers.
      expect(copied).toBeLessThan(3 * body.length);
    } finally {
      concat.mockRestore();
      alloc.mockRestore();
      from.mockRestore();
    }
    expect(got.map((f) => [f.kind, f.id])).toEqual([[FrameKind.STDOUT, 7], [FrameKind.CLOSED, 7]]);
    expect(got[0]!.body.equals(body)).toBe(true);
  });
});
