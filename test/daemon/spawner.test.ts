/**
 * The spawner's own faults, with real processes (daemon/spawner.ts): one
 * that stops answering, one that cannot start, and its end with the daemon.
 * Everything else the executor guarantees is tested through the spawner in
 * executor.test.ts.
 */
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { afterEach, describe, expect, it } from "vitest";
import { systemClock } from "../../common/clock.js";
import { silentLogger } from "../../common/logger.js";
import { Executor, type OutputSink } from "../../daemon/executor.js";
import { Spawner, type SpawnerOptions } from "../../daemon/spawner.js";
import { FrameKind, FrameReader, jsonFrame } from "../../daemon/spawner-frames.js";
import { StepSchema, TaskSpecSchema, TaskState } from "../../gen/rexmesh/v1/task_pb.js";

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
        const child = spawn(process.execPath, [MAIN, String(daemonPid)], { stdio: ["pipe", "pipe", "inherit"] });
        const kinds: number[] = [];
        const reader = new FrameReader((kind) => kinds.push(kind));
        child.stdout.on("data", (b: Buffer) => reader.push(b));
        child.stdin.end(jsonFrame(FrameKind.SPAWN, 1, { program: "touch", args: [file], env: { PATH: process.env.PATH ?? "/usr/bin:/bin" } }, Buffer.alloc(0)));
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
});
