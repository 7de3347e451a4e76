import { createHash } from "node:crypto";
import { chmodSync, existsSync, mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ManualClock, systemClock } from "../../common/clock.js";
import { Executor, MAX_OUTPUT_CHUNK_BYTES, type ExecutorOptions, type OutputFlow, type OutputSink, type TaskOutcome } from "../../daemon/executor.js";
import { directLauncher, directLauncherWith, type Launcher } from "../../daemon/launcher.js";
import { Spawner } from "../../daemon/spawner.js";
import { silentLogger } from "../../common/logger.js";
import {
  OutputStream,
  StepSchema,
  TaskSpecSchema,
  TaskState,
  type Step,
  type TaskSpec,
} from "../../gen/rexmesh/v1/task_pb.js";

const exec = (...argv: string[]): Step => create(StepSchema, { tool: { case: "exec", value: { argv } } });
const shell = (script: string, interpreter: string[] = []): Step =>
  create(StepSchema, { tool: { case: "shell", value: { script, interpreter } } });

function spec(steps: Step[], more: Partial<Omit<TaskSpec, "steps" | "$typeName">> = {}): TaskSpec {
  return create(TaskSpecSchema, { taskId: "t-1", steps, ...more });
}

interface Chunk {
  stream: OutputStream;
  data: Buffer;
  seq: number;
}

/** Records chunks and lets a test wait for output, instead of sleeping. */
class Collector {
  readonly chunks: Chunk[] = [];
  private waiters: { pred: () => boolean; resolve: () => void }[] = [];

  readonly sink: OutputSink = (stream, data, seq) => {
    this.chunks.push({ stream, data: Buffer.from(data), seq });
    this.waiters = this.waiters.filter((w) => {
      if (!w.pred()) return true;
      w.resolve();
      return false;
    });
  };

  bytes(stream?: OutputStream): Buffer {
    return Buffer.concat(this.chunks.filter((c) => stream === undefined || c.stream === stream).map((c) => c.data));
  }

  text(stream?: OutputStream): string {
    return this.bytes(stream).toString("utf8");
  }

  /** Resolves once the output so far matches re; returns the match. */
  waitFor(re: RegExp): Promise<RegExpMatchArray> {
    return new Promise((resolve) => {
      const check = () => this.text().match(re) !== null;
      const done = () => resolve(this.text().match(re) as RegExpMatchArray);
      if (check()) done();
      else this.waiters.push({ pred: check, resolve: done });
    });
  }

  expectContiguousSeqs(): void {
    expect(this.chunks.map((c) => c.seq)).toEqual(this.chunks.map((_, i) => i + 1));
  }
}

/**
 * Dead, or beyond return: gone, a zombie (the init here need not reap
 * orphans), inside exit() (PF_EXITING), or holding a pending SIGKILL. Pipe
 * EOF can be seen a moment before the kernel finishes an exit.
 */
function isDead(pid: number): boolean {
  let stat: string;
  let status: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, "latin1");
    status = readFileSync(`/proc/${pid}/status`, "latin1");
  } catch {
    return true;
  }
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  if (fields[0] === "Z" || fields[0] === "X" || (Number(fields[6]) & 0x4) !== 0) return true;
  const sigkill = 1n << 8n;
  return [...status.matchAll(/^(?:SigPnd|ShdPnd):\s*([0-9a-f]+)$/gm)].some((m) => (BigInt(`0x${m[1]}`) & sigkill) !== 0n);
}

function pidsIn(text: string, name: string): number[] {
  return [...text.matchAll(new RegExp(`${name} (\\d+)\n`, "g"))].map((m) => Number(m[1]));
}

/** Deterministic pseudo-random bytes; its source is also run in the child. */
function xorshiftBytes(total: number): Buffer {
  const buf = Buffer.alloc(total);
  let x = 0x9e3779b9;
  for (let i = 0; i + 4 <= total; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    buf.writeUInt32LE(x, i);
  }
  return buf;
}

/**
 * Every test runs four times: the daemon starting each step itself, and
 * through its spawner process (the built one: role processes run from dist/);
 * each with posix_spawn (native/spawn) and, as where that is not built, with
 * Node's spawn() (a fork of the starting process).
 */
const spawnerMain = new URL("../../dist/daemon/spawner-main.js", import.meta.url).pathname;
const spawner = new Spawner({ clock: systemClock, log: silentLogger, mainPath: spawnerMain });
const forkingSpawner = new Spawner({ clock: systemClock, log: silentLogger, mainPath: spawnerMain, processStart: "fork" });
afterAll(() => {
  spawner.stop();
  forkingSpawner.stop();
});
let launcher: Launcher = directLauncher;
const newExecutor = (opts: ExecutorOptions) => new Executor({ launcher, ...opts });

const tmp = mkdtempSync(join(tmpdir(), "rexmesh-executor-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

async function runOk(s: TaskSpec, ex = newExecutor({ clock: systemClock })): Promise<[TaskOutcome, Collector]> {
  const out = new Collector();
  const outcome = await ex.run(s, { onOutput: out.sink });
  return [outcome, out];
}

const forkingDirect = directLauncherWith(undefined);
for (const [via, using] of [
  ["in the daemon (posix_spawn)", directLauncher],
  ["in the daemon (fork)", forkingDirect],
  ["through the spawner (posix_spawn)", spawner],
  ["through the spawner (fork)", forkingSpawner],
] as const) {
describe(`Executor, steps started ${via}`, () => {
  beforeAll(() => {
    launcher = using;
  });

  describe("Executor: what runs", () => {
    it("passes exec argv as literal arguments, never through a shell", async () => {
      const args = ["a;b", "$(id)", "`id`", `'single' "double"`, "$HOME", "*", "a b", "> /tmp/x", "x\ny"];
      const [outcome, out] = await runOk(spec([exec("printf", "%s\\0", ...args)]));
      expect(outcome).toMatchObject({ state: TaskState.SUCCEEDED, exitCode: 0, message: "exit code 0" });
      expect(out.text().split("\0").slice(0, -1)).toEqual(args);
    });

    it("runs a shell script with env, working dir and stdin", async () => {
      const dir = realpathSync(mkdtempSync(join(tmp, "cwd-")));
      const script = 'printf "%s|%s|" "$GREETING" "$HOME"; pwd -P; cat';
      const [outcome, out] = await runOk(
        spec([shell(script)], {
          env: { GREETING: "hello world", HOME: "/spec-wins" },
          workingDir: dir,
          stdin: new TextEncoder().encode("from stdin\n"),
        }),
      );
      expect(outcome.state).toBe(TaskState.SUCCEEDED);
      expect(out.text(OutputStream.STDOUT)).toBe(`hello world|/spec-wins|${dir}\nfrom stdin\n`);
    });

    it("starts from the daemon's environment, or from baseEnv when given", async () => {
      const [, inherited] = await runOk(spec([shell('printf %s "$PATH"')]));
      expect(inherited.text()).toBe(process.env.PATH);

      const ex = newExecutor({ clock: systemClock, baseEnv: { PATH: process.env.PATH, ONLY_BASE: "b", BOTH: "base" } });
      const [, custom] = await runOk(spec([shell('printf "%s %s %s" "$ONLY_BASE" "$BOTH" "${HOME-unset}"')], { env: { BOTH: "spec" } }), ex);
      expect(custom.text()).toBe("b spec unset");
    });

    it("uses the given interpreter for shell steps", async () => {
      const [outcome, out] = await runOk(
        spec([shell("console.log(6 * 7)", [process.execPath, "-e"])]),
      );
      expect(outcome.state).toBe(TaskState.SUCCEEDED);
      expect(out.text()).toBe("42\n");
    });

    it("delivers binary stdin byte for byte and ignores a child that does not read it", async () => {
      const input = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
      const [echoed, out] = await runOk(spec([exec("cat")], { stdin: input }));
      expect(echoed.state).toBe(TaskState.SUCCEEDED);
      expect(out.bytes().equals(input)).toBe(true);

      const [ignored] = await runOk(spec([exec("true")], { stdin: new Uint8Array(4 * 1024 * 1024) }));
      expect(ignored).toMatchObject({ state: TaskState.SUCCEEDED, exitCode: 0 });
    });

    it("reports the pid of each step through onStart", async () => {
      const out = new Collector();
      const pids: number[] = [];
      const outcome = await newExecutor({ clock: systemClock }).run(
        spec([shell("echo pid $$"), shell("echo pid $$")]),
        { onOutput: out.sink, onStart: (pid) => pids.push(pid) },
      );
      expect(outcome.state).toBe(TaskState.SUCCEEDED);
      expect(pids).toEqual(pidsIn(out.text(), "pid"));
      expect(pids).toHaveLength(2);
    });
  });

  describe("Executor: output", () => {
    it("streams 10 MiB of binary output byte-identical in contiguous, bounded chunks", async () => {
      const size = 10 * 1024 * 1024;
      const program = `${xorshiftBytes.toString()}; process.stdout.write(xorshiftBytes(${size}));`;
      const [outcome, out] = await runOk(spec([exec(process.execPath, "-e", program)]));
      expect(outcome).toMatchObject({ state: TaskState.SUCCEEDED, outputTruncated: false });
      const got = out.bytes();
      expect(got.length).toBe(size);
      const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");
      expect(sha(got)).toBe(sha(xorshiftBytes(size)));
      out.expectContiguousSeqs();
      expect(outcome.outputChunks).toBe(out.chunks.length);
      expect(out.chunks.every((c) => c.stream === OutputStream.STDOUT && c.data.length <= MAX_OUTPUT_CHUNK_BYTES)).toBe(true);
    });

    it("numbers stdout and stderr chunks in one sequence with the right stream tags", async () => {
      const script = "for i in 1 2 3 4 5 6 7 8; do echo out$i; echo err$i >&2; done";
      const [outcome, out] = await runOk(spec([shell(script)]));
      expect(outcome.state).toBe(TaskState.SUCCEEDED);
      out.expectContiguousSeqs();
      expect(outcome.outputChunks).toBe(out.chunks.length);
      const lines = (p: string) => [1, 2, 3, 4, 5, 6, 7, 8].map((i) => `${p}${i}\n`).join("");
      expect(out.text(OutputStream.STDOUT)).toBe(lines("out"));
      expect(out.text(OutputStream.STDERR)).toBe(lines("err"));
    });

    it("continues the sequence across steps", async () => {
      const [outcome, out] = await runOk(spec([exec("echo", "a"), shell("echo b >&2"), exec("echo", "c")]));
      expect(outcome).toMatchObject({ state: TaskState.SUCCEEDED, outputChunks: 3 });
      out.expectContiguousSeqs();
      expect(out.chunks.map((c) => [c.stream, c.data.toString()])).toEqual([
        [OutputStream.STDOUT, "a\n"],
        [OutputStream.STDERR, "b\n"],
        [OutputStream.STDOUT, "c\n"],
      ]);
    });

    it("cuts output at the spec's limit and marks it truncated", async () => {
      const [outcome, out] = await runOk(
        spec([shell("head -c 300000 /dev/zero; head -c 1000 /dev/zero >&2")], { outputLimitBytes: 1000n }),
      );
      expect(outcome).toMatchObject({ state: TaskState.SUCCEEDED, outputTruncated: true });
      expect(out.bytes().length).toBe(1000);
      expect(outcome.outputChunks).toBe(out.chunks.length);
    });

    it("uses defaultOutputLimit when the spec says 0, and does not mark output that fits exactly", async () => {
      const ex = newExecutor({ clock: systemClock, defaultOutputLimit: 10 });
      const [cut, cutOut] = await runOk(spec([exec("printf", "0123456789abcdef")]), ex);
      expect(cut.outputTruncated).toBe(true);
      expect(cutOut.text()).toBe("0123456789");

      const [exact, exactOut] = await runOk(spec([exec("printf", "0123456789")]), ex);
      expect(exact.outputTruncated).toBe(false);
      expect(exactOut.text()).toBe("0123456789");
    });

    it("fails the task and kills it when the output sink throws", async () => {
      const outcome = await newExecutor({ clock: systemClock }).run(spec([shell("echo hi; exec sleep 1000")]), {
        onOutput: () => {
          throw new Error("disk full");
        },
      });
      expect(outcome).toMatchObject({
        state: TaskState.FAILED,
        message: "output sink failed: disk full",
        signal: "SIGTERM",
        outputChunks: 0,
        outputTruncated: true,
      });
    });
  });

  describe("Executor: failures", () => {
    it("reports a non-zero exit", async () => {
      const [outcome] = await runOk(spec([shell("exit 3")]));
      expect(outcome).toMatchObject({ state: TaskState.FAILED, exitCode: 3, message: "exit code 3" });
      expect(outcome.signal).toBeUndefined();
    });

    it("reports a process killed by a signal it did not get from us", async () => {
      const [outcome] = await runOk(spec([shell("kill -KILL $$")]));
      expect(outcome).toMatchObject({ state: TaskState.FAILED, signal: "SIGKILL", message: "killed by signal SIGKILL" });
      expect(outcome.exitCode).toBeUndefined();
    });

    it("reports a missing program without throwing or calling onStart", async () => {
      let started = false;
      const outcome = await newExecutor({ clock: systemClock }).run(spec([exec("/no/such/binary", "x")]), {
        onOutput: () => {},
        onStart: () => (started = true),
      });
      expect(outcome).toEqual({
        state: TaskState.FAILED,
        message: "spawn ENOENT: /no/such/binary",
        outputChunks: 0,
        outputTruncated: false,
      });
      expect(started).toBe(false);
    });

    it("reports a program that is not executable", async () => {
      const file = join(tmp, "not-executable");
      writeFileSync(file, "#!/bin/sh\necho no\n");
      chmodSync(file, 0o644);
      const [outcome] = await runOk(spec([exec(file)]));
      expect(outcome).toMatchObject({ state: TaskState.FAILED, message: `spawn EACCES: ${file}` });
    });

    it("names a missing working directory", async () => {
      const [outcome] = await runOk(spec([exec("true")], { workingDir: "/no/such/dir" }));
      expect(outcome).toMatchObject({ state: TaskState.FAILED, message: "working directory does not exist: /no/such/dir" });
    });

    it("words a start that spawn() refuses outright (arguments past the kernel's limit) the same whichever way it starts", async () => {
      const [outcome] = await runOk(spec([exec("true", ...Array.from({ length: 40 }, () => "x".repeat(100_000)))]));
      expect(outcome).toMatchObject({ state: TaskState.FAILED, message: "spawn failed: spawn E2BIG" });
    });

    it("refuses malformed steps before running any of them", async () => {
      const marker = join(tmp, "must-not-exist");
      const cases: [TaskSpec, string][] = [
        [spec([]), "task has no steps"],
        [spec([exec()]), "step 1: exec tool has an empty argv"],
        [spec([exec("touch", marker), shell("  \n")]), "step 2: shell tool has an empty script"],
        [spec([create(StepSchema, { name: "empty" })]), "step 1 (empty): no tool given"],
      ];
      for (const [s, message] of cases) {
        const [outcome] = await runOk(s);
        expect(outcome).toMatchObject({ state: TaskState.FAILED, message });
      }
      expect(existsSync(marker)).toBe(false);
    });

    it("does not run the next step when one fails", async () => {
      const pids: number[] = [];
      const out = new Collector();
      const outcome = await newExecutor({ clock: systemClock }).run(
        spec([shell("echo one; exit 4"), shell("echo two")]),
        { onOutput: out.sink, onStart: (pid) => pids.push(pid) },
      );
      expect(outcome).toMatchObject({ state: TaskState.FAILED, exitCode: 4, message: "step 1: exit code 4" });
      expect(out.text()).toBe("one\n");
      expect(pids).toHaveLength(1);
    });
  });

  describe("Executor: process groups, timeout and cancel", () => {
    it("leaves nothing of the group behind after a step that exits normally", async () => {
      const script = "sleep 1000 & echo holder $!; sleep 1000 >/dev/null 2>&1 & echo quiet $!; echo leader $$";
      const [outcome, out] = await runOk(spec([shell(script)]));
      expect(outcome).toMatchObject({ state: TaskState.SUCCEEDED, exitCode: 0 });
      const pids = [...pidsIn(out.text(), "holder"), ...pidsIn(out.text(), "quiet"), ...pidsIn(out.text(), "leader")];
      expect(pids).toHaveLength(3);
      expect(pids.filter((p) => !isDead(p))).toEqual([]);
    });

    it("times out: SIGTERM to the whole group, SIGKILL after the grace, nothing survives", async () => {
      const clock = new ManualClock();
      const ex = newExecutor({ clock, killGraceMs: 1000 });
      const script = [
        "sleep 1000 &",
        "echo bg $!",
        `sh -c 'trap "echo trapped" TERM; echo trapper $$; while :; do sleep 1; done' &`,
        "echo leader $$",
        "wait",
      ].join("\n");
      const out = new Collector();
      const done = ex.run(spec([shell(script)], { timeout: durationFromMs(5000) }), { onOutput: out.sink });
      await out.waitFor(/bg \d+\n/);
      await out.waitFor(/trapper \d+\n/);
      await out.waitFor(/leader \d+\n/);
      const pids = ["bg", "trapper", "leader"].flatMap((n) => pidsIn(out.text(), n));
      const trapper = pidsIn(out.text(), "trapper")[0] as number;

      clock.advance(4999);
      clock.advance(1); // the task's timeout: SIGTERM to the group
      await out.waitFor(/trapped\n/);
      expect(isDead(trapper)).toBe(false); // it ignored SIGTERM and is within its grace
      clock.advance(1000); // grace over: SIGKILL

      const outcome = await done;
      expect(outcome).toMatchObject({ state: TaskState.TIMED_OUT, message: "timed out after 5s" });
      expect(new Set(pids).size).toBe(3);
      expect(pids.filter((p) => !isDead(p))).toEqual([]);
    });

    it("counts the timeout from the start of the task, across steps", async () => {
      const clock = new ManualClock();
      const ex = newExecutor({ clock, killGraceMs: 1000 });
      const out = new Collector();
      let starts = 0;
      let secondStarted!: () => void;
      const second = new Promise<void>((resolve) => (secondStarted = resolve));
      const done = ex.run(spec([shell("echo one"), exec("sleep", "1000")], { timeout: durationFromMs(5000) }), {
        onOutput: out.sink,
        onStart: () => {
          if (++starts === 2) secondStarted();
        },
      });
      clock.advance(3000); // spent before / during the first step
      await second;
      clock.advance(2000);
      const outcome = await done;
      expect(outcome).toMatchObject({ state: TaskState.TIMED_OUT, signal: "SIGTERM", message: "timed out after 5s" });
      expect(out.text()).toBe("one\n");
    });

    it("looks at many stopped tasks' groups with a /proc scan shared by their polls, and not at all once SIGKILL went out", async () => {
      const clock = new ManualClock();
      const ex = newExecutor({ clock, killGraceMs: 1000 });
      const n = 30;
      const outs = Array.from({ length: n }, () => new Collector());
      // Each ignores SIGTERM: its group is looked at every 250 ms until the SIGKILL after the grace.
      const runs = outs.map((out) => ex.run(spec([shell("trap '' TERM; echo up $$; while :; do sleep 1; done")], { timeout: durationFromMs(5000) }), { onOutput: out.sink }));
      try {
        await Promise.all(outs.map((out) => out.waitFor(/up \d+\n/)));
        clock.advance(5000); // the timeouts: SIGTERM to every group
        const procs = readdirSync("/proc").filter((e) => /^\d+$/.test(e)).length;
        const reads = () => Number(/^syscr:\s*(\d+)$/m.exec(readFileSync("/proc/self/io", "latin1"))?.[1]);
        const before = reads();
        clock.advance(250); // every task's first look at its group
        const perTask = (reads() - before) / n;
        // A scan reads each process's stat: one scan per task read ~`procs` each; shared, a scan's worth in all.
        expect(perTask, `${perTask} reads per task at its look, ${procs} processes`).toBeLessThan(procs / 3);
        clock.advance(1000); // SIGKILL, then the ends: a group sent SIGKILL is not looked at again
        for (const outcome of await Promise.all(runs)) expect(outcome).toMatchObject({ state: TaskState.TIMED_OUT, message: "timed out after 5s" });
        const all = (reads() - before) / n;
        // Besides the looks during the grace (a scan each 250 ms, shared) only pipe and stat reads: when each task scanned at its SIGKILL and its exit, ~3 scans each.
        expect(all, `${all} reads per task to its end, ${procs} processes`).toBeLessThan(procs);
      } finally {
        for (const pid of outs.flatMap((out) => pidsIn(out.text(), "up"))) {
          try {
            process.kill(-pid, "SIGKILL");
          } catch {
            // ended
          }
        }
      }
    }, 60_000);

    it("cancels via the abort signal and kills a member that ignores SIGTERM after the grace", async () => {
      const ex = newExecutor({ clock: systemClock, killGraceMs: 200 });
      const script = [
        "sleep 1000 &",
        "echo bg $!",
        `sh -c 'trap "" TERM; echo termproof $$; exec sleep 1000' &`,
        "echo leader $$",
        "wait",
      ].join("\n");
      const out = new Collector();
      const abort = new AbortController();
      const done = ex.run(spec([shell(script)]), { onOutput: out.sink, signal: abort.signal });
      await out.waitFor(/bg \d+\n/);
      await out.waitFor(/termproof \d+\n/);
      await out.waitFor(/leader \d+\n/);
      abort.abort();
      const outcome = await done;
      expect(outcome).toMatchObject({ state: TaskState.CANCELLED, message: "cancelled" });
      const pids = ["bg", "termproof", "leader"].flatMap((n) => pidsIn(out.text(), n));
      expect(pids).toHaveLength(3);
      expect(pids.filter((p) => !isDead(p))).toEqual([]);
    });

    it("ends a stopped task a grace after its group is gone when a process outside the group (setsid) still holds its output", async () => {
      const holders: number[] = [];
      try {
        const ex = newExecutor({ clock: systemClock, killGraceMs: 1000 });
        // The holder says when it left the group (a leader that exits sooner has it ended with the group).
        const holder = `F=${tmp}/holder.$$; setsid sh -c "echo holder \\$\\$; touch $F; exec sleep 60" & while [ ! -e $F ]; do sleep 0.01; done;`;
        // A leader that exited once the holder left (the task waits for the holder's output until the timeout); one still running at the timeout; at a cancel.
        for (const [script, stop] of [
          [`${holder} echo leader done`, "timeout"],
          [`${holder} sleep 60`, "timeout"],
          [`${holder} sleep 60`, "cancel"],
        ] as const) {
          const out = new Collector();
          const abort = new AbortController();
          const done = ex.run(spec([shell(script)], stop === "timeout" ? { timeout: durationFromMs(1000) } : {}), { onOutput: out.sink, signal: abort.signal });
          await out.waitFor(/holder \d+\n/);
          holders.push(...pidsIn(out.text(), "holder"));
          const t0 = Date.now();
          if (stop === "cancel") abort.abort();
          const outcome = await done;
          expect(outcome.state, `${script}: ${outcome.message}`).toBe(stop === "timeout" ? TaskState.TIMED_OUT : TaskState.CANCELLED);
          expect(Date.now() - t0, `${script}: within two graces, not when the holder lets go`).toBeLessThan(10_000);
          expect(outcome.message).toMatch(/^(timed out after 1s|cancelled); a process outside its process group still held its output, which was not read past this point$/);
          expect(outcome.outputTruncated).toBe(false);
          expect(out.text()).toMatch(/holder \d+\n/);
        }
        // Outside the group, it is not the executor's to kill.
        expect(holders.filter((p) => !isDead(p))).toHaveLength(3);
      } finally {
        for (const p of holders) process.kill(p, "SIGKILL");
      }
    }, 40_000);

    it("does not start anything when the signal is already aborted", async () => {
      const abort = new AbortController();
      abort.abort();
      let started = false;
      const outcome = await newExecutor({ clock: systemClock }).run(spec([exec("true")]), {
        onOutput: () => {},
        onStart: () => (started = true),
        signal: abort.signal,
      });
      expect(outcome.state).toBe(TaskState.CANCELLED);
      expect(started).toBe(false);
    });
  });

  /** A flow the test pauses and resumes by hand. */
  class ManualFlow implements OutputFlow {
    private listeners = new Set<() => void>();
    constructor(public isPaused = false) {}
    paused(): boolean {
      return this.isPaused;
    }
    onResume(cb: () => void): () => void {
      this.listeners.add(cb);
      return () => this.listeners.delete(cb);
    }
    pause(): void {
      this.isPaused = true;
    }
    resume(): void {
      this.isPaused = false;
      for (const cb of [...this.listeners]) cb();
    }
    get subscribers(): number {
      return this.listeners.size;
    }
  }

  /** Bytes the process has written so far (completed write calls), from /proc/<pid>/io. */
  function bytesWritten(pid: number): number {
    return Number(/^wchar:\s*(\d+)$/m.exec(readFileSync(`/proc/${pid}/io`, "latin1"))?.[1]);
  }

  /** The process is asleep (state S): for a writer of a regular file or /dev/zero, in write() to a full pipe. */
  function isSleeping(pid: number): boolean {
    const stat = readFileSync(`/proc/${pid}/stat`, "latin1");
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[0] === "S";
  }

  /**
   * Resolves once pid is blocked writing: asleep, with no write completed, on
   * two looks in a row. A settled `done` ends the wait too (the process did
   * not block at all), so that a missing pause fails on the byte counts rather
   * than by a timeout. Looks at /proc every few ms: no event says "blocked".
   * Throws when the process is still writing after 10 s.
   */
  async function blockedInWrite(pid: number, done: Promise<unknown>): Promise<void> {
    let settled = false;
    done.then(
      () => (settled = true),
      () => (settled = true),
    );
    let last = -1;
    const deadline = Date.now() + 10_000;
    for (;;) {
      if (settled) return;
      if (Date.now() > deadline) throw new Error(`process ${pid} did not block in write(): its output is still being read`);
      const written = isSleeping(pid) ? bytesWritten(pid) : -1;
      if (written >= 0 && written === last) return;
      last = written;
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
  }

  const sha256 = (b: Buffer) => createHash("sha256").update(b).digest("hex");

  describe("Executor: back-pressure (flow)", () => {
    it("stops reading while paused, so the process blocks in write(); on resume the rest arrives byte-identical", async () => {
      const size = 8 * 1024 * 1024;
      const file = join(tmp, "eight-mib");
      const expected = xorshiftBytes(size);
      writeFileSync(file, expected);
      const flow = new ManualFlow();
      const out = new Collector();
      let received = 0;
      let receivedAtPause = -1;
      let pid = 0;
      let pausedAt!: () => void;
      const firstMiB = new Promise<void>((resolve) => (pausedAt = resolve));
      const sink: OutputSink = (stream, data, seq) => {
        out.sink(stream, data, seq);
        received += data.length;
        // The receiver decides to pause once it has 1 MiB.
        if (receivedAtPause < 0 && received >= 1024 * 1024) {
          receivedAtPause = received;
          flow.pause();
          pausedAt();
        }
      };
      const done = newExecutor({ clock: systemClock }).run(spec([exec("cat", file)]), { onOutput: sink, onStart: (p) => (pid = p), flow });
      await firstMiB;
      await blockedInWrite(pid, done);
      // Paused: what was gathered went out at once (a read that straddled the
      // chunk's end, and one more read), then nothing, and the process got no
      // further than what fits in the pipe and one read of it.
      expect(received - receivedAtPause).toBeLessThanOrEqual(128 * 1024);
      const atBlock = received;
      await blockedInWrite(pid, done);
      expect(received).toBe(atBlock);
      expect(bytesWritten(pid) - received).toBeLessThan(1024 * 1024);
      expect(isDead(pid)).toBe(false);

      flow.resume();
      const outcome = await done;
      expect(outcome).toMatchObject({ state: TaskState.SUCCEEDED, exitCode: 0, outputTruncated: false });
      const got = out.bytes();
      expect(got.length).toBe(size);
      expect(sha256(got)).toBe(sha256(expected));
      out.expectContiguousSeqs();
      expect(outcome.outputChunks).toBe(out.chunks.length);
      expect(flow.subscribers).toBe(0); // the run let go of the flow
    });

    it("holds stdout and stderr alike, across steps, and reads what is left once the process has exited", async () => {
      // Paused from the start: the output fits in the pipes, the process exits,
      // and the task ends without waiting for a resume.
      const flow = new ManualFlow(true);
      const out = new Collector();
      const outcome = await newExecutor({ clock: systemClock }).run(
        spec([shell("echo out1; echo err1 >&2"), shell("echo out2; echo err2 >&2")]),
        { onOutput: out.sink, flow },
      );
      expect(outcome).toMatchObject({ state: TaskState.SUCCEEDED, exitCode: 0 });
      expect(out.text(OutputStream.STDOUT)).toBe("out1\nout2\n");
      expect(out.text(OutputStream.STDERR)).toBe("err1\nerr2\n");
      out.expectContiguousSeqs();
    });

    it("times out a paused task: the blocked writer is killed and the task reported TIMED_OUT", async () => {
      const clock = new ManualClock();
      const ex = newExecutor({ clock, killGraceMs: 1000 });
      const flow = new ManualFlow();
      let pid = 0;
      let firstChunk!: () => void;
      const first = new Promise<void>((resolve) => (firstChunk = resolve));
      const onOutput: OutputSink = () => {
        flow.pause();
        firstChunk();
      };
      const done = ex.run(spec([exec("cat", "/dev/zero")], { timeout: durationFromMs(5000), outputLimitBytes: 1024n * 1024n }), {
        onOutput,
        onStart: (p) => (pid = p),
        flow,
      });
      await first;
      await blockedInWrite(pid, done);
      clock.advance(5000); // the timeout: SIGTERM to the group, which cat does not survive
      const outcome = await done;
      expect(outcome).toMatchObject({ state: TaskState.TIMED_OUT, signal: "SIGTERM", message: "timed out after 5s" });
      expect(isDead(pid)).toBe(true);
      expect(flow.isPaused).toBe(true); // it ended without a resume
    });

    it("cancels a paused task whose writer ignores SIGTERM: killed after the grace, its pipes drained", async () => {
      const ex = newExecutor({ clock: systemClock, killGraceMs: 200 });
      const flow = new ManualFlow();
      const abort = new AbortController();
      let pid = 0;
      let firstChunk!: () => void;
      const first = new Promise<void>((resolve) => (firstChunk = resolve));
      const onOutput: OutputSink = () => {
        flow.pause();
        firstChunk();
      };
      const done = ex.run(spec([shell(`trap "" TERM; exec cat /dev/zero`)], { outputLimitBytes: 1024n * 1024n }), {
        onOutput,
        onStart: (p) => (pid = p),
        signal: abort.signal,
        flow,
      });
      await first;
      await blockedInWrite(pid, done);
      abort.abort();
      const outcome = await done;
      expect(outcome).toMatchObject({ state: TaskState.CANCELLED, signal: "SIGKILL", message: "cancelled", outputTruncated: true });
      expect(isDead(pid)).toBe(true);
    });
  });
});
}
