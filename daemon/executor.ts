/**
 * The daemon's executor: runs the steps of one task as child processes and
 * streams their output as numbered chunks.
 *
 * Every process leads its own process group, so that a timeout or a cancel
 * reaches whatever the command started (pipelines, `cmd &`, daemons that
 * forgot to detach) and a finished task leaves nothing running behind it.
 */
import { chmod, mkdtemp, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { durationMs } from "@bufbuild/protobuf/wkt";
import { setTimeoutAfterPending, type Clock, type Timer } from "../common/clock.js";
import { isDigest, verifyFile } from "../common/digest.js";
import { ConfigError } from "../common/errors.js";
import type { ArtifactFetcher } from "./artifact-fetch.js";
import { baseDirProblem, putFile, relativePathProblem } from "./file-put.js";
import { ansibleStage, pythonStage, type Stage } from "./tool-steps.js";
import { PROGRAM_TOOLS } from "./tools.js";
import { OutputCoalescer, type FlushScheduler } from "./output-coalescer.js";
import { directLauncher, type LaunchedStep, type Launcher, type StepEvents } from "./launcher.js";
import { describeCleanup, endMarkedProcesses, groupRef, type GroupRef } from "./orphans.js";
import { liveGroupsOf, signalGroup } from "./process-groups.js";
import { OutputStream, TaskState, type Step, type TaskSpec } from "../gen/rexmesh/v1/task_pb.js";
import type { SignedRelease } from "../gen/rexmesh/v1/release_pb.js";
import { inheritedEnv } from "./inherited-env.js";
import type { Prepared, Updater, UpdateOptions } from "./updates.js";

/** Options of {@link Executor}; everything but the clock has a default. */
export interface ExecutorOptions {
  /** Drives the task timeout and the kill grace, so tests can move time by hand. */
  clock: Clock;
  /** Output bytes kept per task when the spec says 0. Default 64 MiB. */
  defaultOutputLimit?: number;
  /** Time between SIGTERM and SIGKILL of the process group on timeout/cancel. Default 2000 ms. */
  killGraceMs?: number;
  /**
   * After a stop, how long the launcher's report of a step's exit (once its
   * group is gone) or of its start is waited for before the step is taken as
   * lost. A spawner on a loaded host reports late, not never; a stalled one
   * is only told apart by time. Default: the kill grace, and at least 5 s
   * (see DEFAULT_REPORT_WAIT_MS); never less than the kill grace.
   */
  reportWaitMs?: number;
  /**
   * Environment every child starts from, before the task's own `env` is laid
   * over it. Default: the daemon's `process.env` without its own REXMESH_* settings (inherited-env.ts), read once, when the first task starts.
   * Injectable so that a daemon can run tasks in a reduced environment.
   */
  baseEnv?: Readonly<Record<string, string | undefined>>;
  /**
   * Fetches artifacts for the `script` and `file.put` tools (through the
   * host's proxy). Absent: those steps fail with a message saying so.
   */
  fetchArtifact?: ArtifactFetcher;
  /**
   * Programs of the program tools this host has, by tool (`python`,
   * `ansible`: daemon/tools.ts). A step of a tool without one fails saying so.
   */
  programs?: Readonly<Record<string, string>>;
  /** Carries out `update` steps (daemon/updates.ts). Absent: they fail saying so. */
  updater?: Pick<Updater, "prepare" | "abandoned">;
  /**
   * Largest output chunk: pipe reads (64 KiB at most) are gathered up to it,
   * so that a fast producer sends few large chunks. Default 1 MiB, at most
   * {@link MAX_OUTPUT_CHUNK_BYTES} (a chunk must fit a frame on every hop).
   */
  outputChunkBytes?: number;
  /** How long gathered output may wait for more before it goes out. Default 5 ms. */
  outputDelayMs?: number;
  /** Arms the output flush timer; tests of the coalescing inject it. Default: a real timer. */
  outputFlushScheduler?: FlushScheduler;
  /**
   * Starts the steps' processes. Default: in this process (directLauncher,
   * posix_spawn where the addon was built); a daemon passes its spawner
   * (daemon/spawner.ts), which keeps the starts and the output's relay off
   * its event loop, and without the addon keeps it from being forked per step.
   */
  launcher?: Launcher;
}

/**
 * Receives output as it is produced, gathered into chunks of up to
 * {@link ExecutorOptions.outputChunkBytes} (daemon/output-coalescer.ts).
 * `seq` numbers chunks 1, 2, 3, … across both streams and all steps of a
 * task, so a receiver can ack and resume by one number. `data` is the
 * sink's to keep: the executor never writes to it again (it may be a view
 * into a pipe read's buffer). A sink that throws fails the task (its output
 * could not be kept).
 */
export interface OutputSink {
  (stream: OutputStream, data: Uint8Array, seq: number): void;
}

/** How a task ended, in the terms of `TaskStatus`. */
export interface TaskOutcome {
  /** SUCCEEDED | FAILED | TIMED_OUT | CANCELLED, or INTERRUPTED when the spawner was lost while the process ran, its exit unknown (daemon/spawner.ts). */
  state: TaskState;
  /** Exit code of the last step that ran, when it exited normally. */
  exitCode?: number;
  /** Signal that ended the last step that ran, e.g. "SIGKILL". */
  signal?: string;
  /** Human readable: "exit code 3", "timed out after 2s", "spawn ENOENT: /no/such", … */
  message: string;
  /** Number of chunks emitted, equal to the last seq (0 when there was no output). */
  outputChunks: number;
  /** True when output past the limit was dropped, or some may be missing (the spawner died or stalled before passing it all on). */
  outputTruncated: boolean;
  /**
   * An update step unpacked a new version: the task is not over, the daemon
   * hands it over to its supervisor and restarts (docs/updates.md).
   */
  restart?: { from: string; to: string; keyId: string; digest: string };
}

/**
 * Back-pressure from the receiver of the output to the process. While
 * `paused()` is true the executor stops reading the task's stdout and stderr:
 * the pipes fill and the process blocks in write() until `onResume` fires.
 * Output stays byte-identical and its seqs contiguous; only its pace changes.
 *
 * `paused()` is asked after each chunk is delivered (at most one read of
 * each pipe, ≤ 64 KiB, arrives after the receiver decided to pause) and when
 * a step starts, so the receiver needs to announce only resumes. Both must
 * be cheap and must not throw.
 *
 * A step that is being terminated (timeout, cancel, sink failure, leftovers
 * of its group) or whose process has exited is read whatever the flow says:
 * a process blocked in write() must be able to act on SIGTERM, and its pipes
 * must reach EOF for the step to end. What it writes then is bounded by the
 * kill grace and by the output limit (output past the limit is read and
 * dropped, not kept).
 */
export interface OutputFlow {
  /** True while the receiver wants no more output. */
  paused(): boolean;
  /** Calls cb whenever output may flow again; returns a function that removes cb. */
  onResume(cb: () => void): () => void;
}

/** Callbacks and cancellation for one {@link Executor.run}. */
export interface RunIo {
  onOutput: OutputSink;
  /** Called with the pid of each step's process as it starts (also the process group id), and its group as noted (its leader's start time: a pid may be reused). */
  onStart?: (pid: number, group: GroupRef) => void;
  /** Aborting cancels the task: the running step's process group is terminated. */
  signal?: AbortSignal;
  /** Pauses and resumes reading the task's output; absent: output is read as fast as it comes. */
  flow?: OutputFlow;
}

const DEFAULT_OUTPUT_LIMIT = 64 * 1024 * 1024;
const DEFAULT_KILL_GRACE_MS = 2000;
/**
 * The least wait for a spawner's report after a stop (ExecutorOptions.reportWaitMs).
 * A kill grace of 1 s ended six timed-out tasks of one daemon with their
 * exit unknown in a loaded CI run (2-core VM, load 10–30): the spawner,
 * merely slow, reported their exits more than a second after their groups
 * were gone.
 */
const DEFAULT_REPORT_WAIT_MS = 5000;
/** Default of {@link ExecutorOptions.outputChunkBytes}. */
const DEFAULT_OUTPUT_CHUNK_BYTES = 1024 * 1024;
/**
 * Chunks are bounded so that one chunk always fits a frame on every hop
 * (MAX_FRAME_BYTES, 4 MiB) with room for others, and a client's watch batch
 * stays under the 4 MiB message limit that gRPC clients apply by default.
 */
export const MAX_OUTPUT_CHUNK_BYTES = 1024 * 1024;
const DEFAULT_OUTPUT_DELAY_MS = 5;
const DEFAULT_INTERPRETER: readonly string[] = ["/bin/sh", "-c"];
const DEFAULT_SCRIPT_INTERPRETER: readonly string[] = ["/bin/sh"];
const DEFAULT_PUT_MODE = 0o644;
/** How often a terminating group is looked at when no pipe or exit event will say it is gone. */
const GROUP_POLL_MS = 25;
/** The same while its leader's exit is not reported (only a stalled spawner leaves it so): a whole /proc scan each. */
const UNREPORTED_POLL_MS = 250;
/** Said when a step's pipes were closed by the daemon after its group was gone. */
const OUTSIDER_NOTE = "a process outside its process group still held its output, which was not read past this point";

interface ResolvedOptions {
  clock: Clock;
  outputChunkBytes: number;
  outputDelayMs: number;
  outputFlushScheduler: FlushScheduler | undefined;
  defaultOutputLimit: number;
  killGraceMs: number;
  reportWaitMs: number;
  baseEnv: Readonly<Record<string, string | undefined>> | undefined;
  fetchArtifact: ArtifactFetcher | undefined;
  programs: Readonly<Record<string, string>>;
  updater: Pick<Updater, "prepare" | "abandoned"> | undefined;
  launcher: Launcher;
}

/**
 * Runs tasks on this host. One executor serves any number of concurrent
 * tasks; each `run` owns its processes, timer and counters.
 */
export class Executor {
  private readonly opts: ResolvedOptions;

  /** @throws ConfigError when a limit is negative or not an integer. */
  constructor(opts: ExecutorOptions) {
    const defaultOutputLimit = opts.defaultOutputLimit ?? DEFAULT_OUTPUT_LIMIT;
    const killGraceMs = opts.killGraceMs ?? DEFAULT_KILL_GRACE_MS;
    if (!Number.isSafeInteger(defaultOutputLimit) || defaultOutputLimit < 0) {
      throw new ConfigError(`defaultOutputLimit must be a non-negative integer, got ${defaultOutputLimit}`);
    }
    if (!Number.isFinite(killGraceMs) || killGraceMs < 0) {
      throw new ConfigError(`killGraceMs must be a non-negative number, got ${killGraceMs}`);
    }
    const reportWaitMs = Math.max(killGraceMs, opts.reportWaitMs ?? DEFAULT_REPORT_WAIT_MS);
    if (!Number.isFinite(reportWaitMs)) throw new ConfigError(`reportWaitMs must be a finite number, got ${opts.reportWaitMs}`);
    const outputChunkBytes = opts.outputChunkBytes ?? DEFAULT_OUTPUT_CHUNK_BYTES;
    if (!Number.isSafeInteger(outputChunkBytes) || outputChunkBytes < 1 || outputChunkBytes > MAX_OUTPUT_CHUNK_BYTES) {
      throw new ConfigError(`outputChunkBytes must be an integer from 1 to ${MAX_OUTPUT_CHUNK_BYTES}, got ${outputChunkBytes}`);
    }
    const outputDelayMs = opts.outputDelayMs ?? DEFAULT_OUTPUT_DELAY_MS;
    if (!Number.isFinite(outputDelayMs) || outputDelayMs < 0) throw new ConfigError(`outputDelayMs must be a non-negative number, got ${outputDelayMs}`);
    this.opts = {
      clock: opts.clock,
      defaultOutputLimit,
      killGraceMs,
      reportWaitMs,
      baseEnv: opts.baseEnv,
      fetchArtifact: opts.fetchArtifact,
      programs: opts.programs ?? {},
      updater: opts.updater,
      outputChunkBytes,
      outputDelayMs,
      outputFlushScheduler: opts.outputFlushScheduler,
      launcher: opts.launcher ?? directLauncher,
    };
  }

  /** True when a step's process starts on the daemon's own thread (no spawner): the agent then starts one step per event-loop turn. */
  get startsInDaemon(): boolean {
    return this.opts.launcher.startsInCaller;
  }

  /**
   * Runs every step of `spec` in order; the first step that does not succeed
   * ends the task. Never rejects: every failure, including a malformed spec or
   * a program that cannot be started, is an outcome. Resolves only after the
   * last process exited, its output pipes closed and its process group is
   * gone, so no chunk follows the outcome and nothing of the task survives it.
   * The timeout (`spec.timeout`; absent or not positive: none) covers the
   * whole task and counts from this call. Each step gets the same `stdin`.
   */
  run(spec: TaskSpec, io: RunIo): Promise<TaskOutcome> {
    return new TaskRun(this.opts, spec, io).execute();
  }
}

/** Why a task was stopped from outside its processes. */
interface Stop {
  state: TaskState;
  message: string;
  /** Out of time (a daemon's drain): late reports are waited for a kill grace only, not the report wait. */
  urgent?: boolean;
}

/**
 * An abort reason that marks a cancel as out of time (a daemon's drain whose
 * grace is running out): the step's late reports are then waited for one
 * kill grace only, as before the report wait, so the task ends within it.
 */
function isUrgentAbort(reason: unknown): boolean {
  return (reason as { urgent?: unknown } | null)?.urgent === true;
}

interface StepExit {
  kind: "exited";
  code: number | null;
  signal: string | null;
  /** Said in the task's message: how its end was reached, when not plainly. */
  note?: string;
  /** Output may be missing (the spawner died or stalled before passing all of it on). */
  outputLost?: boolean;
}
/** `lost`: the process's exit is unknown (its spawner died or stalled); `outputLost` false when both its pipes' ends had come. */
type StepResult = StepExit | { kind: "failed"; message: string; code: string | undefined } | { kind: "lost"; message: string; outputLost: boolean };

/**
 * A step as it will run: a process; a staged process, whose files (written
 * to a private directory) and fetched artifact exist only while it runs; or
 * a file written.
 */
type PlannedStep =
  | { kind: "process"; label: string; argv: string[] }
  | { kind: "staged"; label: string; stage: Stage }
  | { kind: "put"; label: string; artifact: string; path: string; baseDir: string; mode: number }
  | { kind: "update"; label: string; releases: SignedRelease[]; options: UpdateOptions };

/** The state of one `Executor.run`. */
class TaskRun {
  private seq = 0;
  private delivered = 0;
  private truncated = false;
  private sinkBroken = false;
  private stop: Stop | undefined;
  /** Said after the task's message: how a step's end was reached, when not plainly (StepExit.note). */
  private readonly notes: string[] = [];
  /** Terminates the running step's process group; set while a step runs. */
  private terminateCurrent: (() => void) | undefined;
  /** Pauses or resumes the running step's pipes as the flow says; set while a step runs. */
  private applyFlowCurrent: (() => void) | undefined;
  private readonly limit: number;
  /** Aborted when the task is stopped, so that a fetch in progress ends too. */
  private readonly fetchAbort = new AbortController();
  /** Gathers pipe reads into chunks; flushed whenever a step ends, so no chunk follows the outcome. */
  private readonly coalescer: OutputCoalescer;

  constructor(
    private readonly opts: ResolvedOptions,
    private readonly spec: TaskSpec,
    private readonly io: RunIo,
  ) {
    const specLimit = spec.outputLimitBytes;
    this.limit =
      specLimit > 0n
        ? specLimit > BigInt(Number.MAX_SAFE_INTEGER)
          ? Number.MAX_SAFE_INTEGER
          : Number(specLimit)
        : opts.defaultOutputLimit;
    this.coalescer = new OutputCoalescer((stream, data) => this.emitChunk(stream, data), {
      maxBytes: opts.outputChunkBytes,
      delayMs: opts.outputDelayMs,
      schedule: opts.outputFlushScheduler,
    });
  }

  async execute(): Promise<TaskOutcome> {
    const plan = planSteps(this.spec.steps, this.opts.programs);
    if (typeof plan === "string") return this.outcome(TaskState.FAILED, plan);
    const signal = this.io.signal;
    if (signal?.aborted) return this.outcome(TaskState.CANCELLED, "cancelled before start");

    const timeoutMs = this.spec.timeout ? durationMs(this.spec.timeout) : 0;
    let timer: Timer | undefined;
    if (timeoutMs > 0) {
      timer = this.opts.clock.setTimeout(
        () => this.requestStop({ state: TaskState.TIMED_OUT, message: `timed out after ${formatMs(timeoutMs)}` }),
        timeoutMs,
      );
    }
    const onAbort = () => this.requestStop({ state: TaskState.CANCELLED, message: "cancelled", ...(isUrgentAbort(signal?.reason) ? { urgent: true } : {}) });
    signal?.addEventListener("abort", onAbort, { once: true });
    const stopFlow = this.io.flow?.onResume(() => this.applyFlowCurrent?.());
    try {
      return await this.runSteps(plan);
    } finally {
      timer?.cancel();
      signal?.removeEventListener("abort", onAbort);
      stopFlow?.();
    }
  }

  private async runSteps(plan: PlannedStep[]): Promise<TaskOutcome> {
    const env = buildEnv(this.opts.baseEnv ?? daemonEnv(), this.spec.env);
    const cwd = this.spec.workingDir;
    const prefix = (step: PlannedStep) => (plan.length > 1 ? `${step.label}: ` : "");
    let last: StepExit | undefined;
    for (const step of plan) {
      if (this.stopped()) break;
      const cwdProblem = await checkWorkingDir(cwd);
      if (cwdProblem !== undefined) return this.outcome(TaskState.FAILED, cwdProblem);
      if (this.stopped()) break;

      let result: StepResult;
      if (step.kind === "update") return await this.updateStep(step);
      if (step.kind === "put") {
        const problem = await this.putStep(step);
        const stop = this.stopped();
        if (stop) return this.outcome(stop.state, stop.message, last);
        if (problem !== undefined) return this.outcome(TaskState.FAILED, prefix(step) + problem, last);
        continue;
      } else if (step.kind === "staged") {
        const staged = await this.stageStep(step.stage);
        const stopNow = this.stopped();
        if ("problem" in staged) {
          if (stopNow) return this.outcome(stopNow.state, stopNow.message, last);
          return this.outcome(TaskState.FAILED, prefix(step) + staged.problem, last);
        }
        try {
          if (stopNow) break;
          result = await this.runStep(staged.argv, env, cwd);
        } finally {
          await staged.cleanup();
        }
      } else {
        result = await this.runStep(step.argv, env, cwd);
      }
      const stop = this.stopped();
      // Output may be missing: the task says so, whatever ended it.
      if (result.kind !== "failed" && result.outputLost) this.truncated = true;
      if (result.kind === "lost") {
        if (stop) return this.outcome(stop.state, `${stop.message}; ${result.message}`);
        return this.outcome(TaskState.INTERRUPTED, `${prefix(step)}${result.message}; not run again`);
      }
      if (result.kind === "failed") {
        if (stop) return this.outcome(stop.state, stop.message);
        // A directory removed after the check makes spawn report ENOENT for
        // the program; name the directory instead.
        const cwdGone = result.code === "ENOENT" ? await checkWorkingDir(cwd) : undefined;
        return this.outcome(TaskState.FAILED, cwdGone ?? prefix(step) + result.message);
      }
      last = result;
      if (result.note !== undefined) this.notes.push(prefix(step) + result.note);
      if (stop) break;
      if (result.code !== 0) return this.outcome(TaskState.FAILED, prefix(step) + describeExit(result), result);
    }
    const stop = this.stopped();
    if (stop) return this.outcome(stop.state, stop.message, last);
    return this.outcome(TaskState.SUCCEEDED, last ? describeExit(last) : "succeeded", last);
  }

  /**
   * Fetches an artifact and checks its digest again here, whoever fetched
   * it: the path of a private file the caller removes, or why it cannot be used.
   */
  private async fetchVerified(artifact: string, maxBytes?: number): Promise<string | { problem: string }> {
    const fetch = this.opts.fetchArtifact;
    if (!fetch) return { problem: `artifact ${artifact}: this daemon has no artifact source` };
    let path: string;
    try {
      path = await fetch(artifact, this.fetchAbort.signal, maxBytes);
    } catch (err) {
      const text = errorText(err);
      return { problem: text.includes(artifact) ? text : `artifact ${artifact}: ${text}` };
    }
    try {
      await verifyFile(path, artifact);
      return path;
    } catch (err) {
      await rm(path, { force: true });
      return { problem: errorText(err) };
    }
  }

  /**
   * Writes a staged step's files to a new private directory and fetches its
   * artifact: the argv to run and what removes them, or why it cannot run.
   */
  private async stageStep(stage: Stage): Promise<{ argv: string[]; cleanup: () => Promise<void> } | { problem: string }> {
    let fetched: string | undefined;
    if (stage.artifact !== undefined) {
      const got = await this.fetchVerified(stage.artifact);
      if (typeof got !== "string") return got;
      fetched = got;
    }
    let dir: string | undefined;
    const cleanup = async () => {
      if (fetched !== undefined) await rm(fetched, { force: true });
      if (dir !== undefined) await rm(dir, { recursive: true, force: true });
    };
    try {
      // Only the daemon's user may read or run them (mkdtemp makes the directory 0700; the fetcher's is 0700 too).
      if (fetched !== undefined) await chmod(fetched, 0o700);
      dir = await mkdtemp(join(tmpdir(), "rexmesh-step-"));
      for (const [name, content] of Object.entries(stage.files)) await writeFile(join(dir, name), content, { mode: 0o600 });
      return { argv: stage.argv(dir, fetched), cleanup };
    } catch (err) {
      await cleanup();
      return { problem: `cannot prepare the step's files: ${errorText(err)}` };
    }
  }

  /** Runs a file.put step; returns why it failed, or undefined. */
  private async putStep(step: Extract<PlannedStep, { kind: "put" }>): Promise<string | undefined> {
    const fetched = await this.fetchVerified(step.artifact);
    if (typeof fetched !== "string") return fetched.problem;
    try {
      if (this.stopped()) return undefined;
      await putFile(fetched, step.baseDir, step.path, step.mode);
      return undefined;
    } catch (err) {
      return `file.put ${JSON.stringify(step.path)} in ${step.baseDir} refused: ${errorText(err)}`;
    } finally {
      await rm(fetched, { force: true });
    }
  }

  /** Runs an update step (alone in its task): a restart into the new version, or why not. */
  private async updateStep(step: Extract<PlannedStep, { kind: "update" }>): Promise<TaskOutcome> {
    const updater = this.opts.updater;
    if (!updater) return this.outcome(TaskState.FAILED, `${step.label}: this daemon does not update itself`);
    let prepared: Prepared;
    try {
      prepared = await updater.prepare(step.releases, step.options, async (digest: string, maxBytes: number) => {
        const got = await this.fetchVerified(digest, maxBytes);
        if (typeof got !== "string") throw new Error(got.problem);
        return got;
      });
    } catch (err) {
      const stop = this.stopped();
      if (stop) return this.outcome(stop.state, stop.message);
      return this.outcome(TaskState.FAILED, `update refused: ${errorText(err)}`);
    }
    const stop = this.stopped();
    if (stop) {
      // Cancelled or timed out once unpacked: no restart, so another update may be prepared.
      if ("restart" in prepared) updater.abandoned();
      return this.outcome(stop.state, stop.message);
    }
    if ("already" in prepared) return this.outcome(TaskState.SUCCEEDED, `already runs version ${prepared.already}`);
    return { ...this.outcome(TaskState.SUCCEEDED, `restarting into ${prepared.restart.to}`), restart: prepared.restart };
  }

  /** Read through a method: the stop is set by timers and listeners while awaits are pending. */
  private stopped(): Stop | undefined {
    return this.stop;
  }

  /** Stops the task; the first reason wins (an urgent one after it still makes the stop urgent). */
  private requestStop(stop: Stop): void {
    if (this.stop) {
      if (stop.urgent && !this.stop.urgent) this.stop = { ...this.stop, urgent: true };
      return;
    }
    this.stop = stop;
    this.fetchAbort.abort(new Error(stop.message));
    this.terminateCurrent?.();
  }

  private outcome(state: TaskState, message: string, last?: StepExit): TaskOutcome {
    const out: TaskOutcome = {
      state,
      message: this.notes.length > 0 ? [message, ...this.notes].join("; ") : message,
      outputChunks: this.seq,
      outputTruncated: this.truncated,
    };
    if (last?.code != null) out.exitCode = last.code;
    if (last?.signal != null) out.signal = last.signal;
    return out;
  }

  /** Takes one read from a pipe, applying the output limit; the coalescer cuts and gathers it into chunks. */
  private addOutput(stream: OutputStream, buf: Buffer): void {
    if (this.sinkBroken || this.delivered >= this.limit) {
      this.truncated = true;
      return;
    }
    const room = this.limit - this.delivered;
    const piece = buf.length > room ? buf.subarray(0, room) : buf;
    if (piece.length < buf.length) this.truncated = true;
    this.delivered += piece.length;
    this.coalescer.add(stream, piece);
  }

  /** Hands one gathered chunk on; a sink that throws stops the task. Runs from a timer too, so it never throws. */
  private emitChunk(stream: OutputStream, data: Uint8Array): void {
    if (this.sinkBroken) return;
    try {
      this.io.onOutput(stream, data, this.seq + 1);
    } catch (err) {
      // Output that cannot be kept must not be silently lost while the
      // process goes on: stop the task and say why.
      this.sinkBroken = true;
      this.truncated = true;
      this.requestStop({ state: TaskState.FAILED, message: `output sink failed: ${errorText(err)}` });
      return;
    }
    this.seq += 1;
  }

  /**
   * Runs one process to completion: exit, both output pipes closed, and no
   * live member left in its process group.
   *
   * After a termination (a stop, or leftovers of its group), once no member
   * of the group is left, the launcher's word (the exit, the pipes' ends) is
   * waited for one kill grace. Pipes still open then, the exit known, are
   * held by a process outside the group (`setsid`, a daemon): they are closed
   * here and the task says so. An exit still unreported is waited for up to
   * the report wait (at least 5 s): a spawner on a loaded host reports late
   * (the daemon's own children are reaped by the daemon); one that has not
   * reported by then is taken as stalled, the step is abandoned and the task
   * says what is unknown. The report wait is one per step (a start reported
   * late leaves its exit what is left of it), and an urgent stop (a drain out
   * of time) waits a kill grace only. So a stop ends a task within the report
   * wait and two kill graces whatever the spawner does.
   */
  private runStep(argv: string[], env: Record<string, string>, cwd: string): Promise<StepResult> {
    const { clock, killGraceMs, reportWaitMs, launcher } = this.opts;
    const liveGroups = liveGroupsOf(clock);
    const program = argv[0] as string;
    return new Promise<StepResult>((resolve) => {
      /** Set once the process runs; it is also its process group id. */
      let pid: number | undefined;
      /** The group as noted when it started (leader's start time: a pid may be reused). */
      let group: GroupRef | undefined;
      /** The launched step; undefined until launch returns. */
      let proc: LaunchedStep | undefined;
      let exit: { code: number | null; signal: string | null } | undefined;
      let stdoutClosed = false;
      let stderrClosed = false;
      /** True once no live member is left in the group, or SIGKILL has been sent to it. */
      let groupSettled = false;
      let terminating = false;
      /** True once the step is being ended (its leftovers cleaned up) or has ended: nothing else acts on it. */
      let ending = false;
      let stepEnded = false;
      /** Its pipes were closed here: a process outside its group still held them once the group was gone. */
      let outsiderHeld = false;
      let killTimer: Timer | undefined;
      let pollTimer: Timer | undefined;
      /** The bounded wait for the launcher's word (the start after a stop, or the end once the group is gone); events already waiting when it ends go first. */
      let waitTimer: Timer | undefined;
      /**
       * When the step's report wait ends: set when a wait for a report (the
       * start after a stop, or the exit once the group is gone) first ran a
       * kill grace without it, one per step, so that a start reported late
       * does not give its exit a second report wait.
       */
      let reportDeadline: number | undefined;
      /** The running wait is the report wait's rest (the kill grace already passed): a report that comes ends it. */
      let extending = false;
      /** Waits the rest of the report wait once a kill grace passed without the report; false when none is left (or the stop is urgent). */
      const waitLonger = (then: () => void): boolean => {
        if (this.stop?.urgent) return false;
        reportDeadline ??= clock.now() - killGraceMs + reportWaitMs;
        const left = reportDeadline - clock.now();
        if (left <= 0) return false;
        extending = true;
        waitTimer = setTimeoutAfterPending(clock, () => ((extending = false), then()), left);
        return true;
      };

      const cancelTimers = () => {
        killTimer?.cancel();
        pollTimer?.cancel();
        waitTimer?.cancel();
        killTimer = pollTimer = waitTimer = undefined;
      };

      const endStep = (result: StepResult) => {
        if (stepEnded) return;
        stepEnded = ending = true;
        // Every chunk of the step goes out before its end is known.
        this.coalescer.flush();
        cancelTimers();
        this.terminateCurrent = undefined;
        this.applyFlowCurrent = undefined;
        resolve(result);
      };

      const exited = (): StepExit => ({ kind: "exited", code: exit!.code, signal: exit!.signal, ...(outsiderHeld ? { note: OUTSIDER_NOTE } : {}) });
      /** Whether a live member is left, looked at afresh (after an event: what it says decides what happens next). */
      const live = () => group !== undefined && liveGroups.has(group);

      const endStepIfDone = () => {
        if (ending || exit === undefined || !stdoutClosed || !stderrClosed || pid === undefined) return;
        if (!groupSettled && !live()) groupSettled = true;
        if (groupSettled) {
          endStep(exited());
          return;
        }
        // Leftovers that closed their output (e.g. `cmd >/dev/null &`) get
        // the same SIGTERM, grace, SIGKILL as on a timeout.
        terminate();
      };

      /** Looks at a group being terminated now and then: no event says when its last member is gone (nor, from a stalled spawner, that its leader exited). */
      const watchGroup = (since: number) => {
        const interval = Math.min(exit === undefined ? UNREPORTED_POLL_MS : GROUP_POLL_MS, killGraceMs);
        pollTimer = clock.setTimeout(() => {
          pollTimer = undefined;
          if (ending || groupSettled) return;
          // A scan shared with the other tasks' looks (process-groups.ts): with hundreds stopped at once, one each took the daemon's CPU.
          if (liveGroups.polled(group!, interval, since)) watchGroup(since);
          else settle();
        }, interval);
      };

      /** No live member is left (or SIGKILL went out). After a termination, the launcher's word is waited for a grace at most. */
      const settle = () => {
        if (!groupSettled) {
          groupSettled = true;
          killTimer?.cancel();
          pollTimer?.cancel();
          killTimer = pollTimer = undefined;
        }
        endStepIfDone();
        if (!ending && terminating && waitTimer === undefined) waitTimer = setTimeoutAfterPending(clock, noWord, killGraceMs);
      };

      const escalate = () => {
        killTimer = undefined;
        if (ending) return;
        // Not looked at first: a SIGKILL to a group of zombies does nothing, and a scan per task cost the daemon dearly when hundreds timed out at once.
        signalGroup(group!, "SIGKILL");
        settle();
      };

      /** The group is gone, and a grace later the launcher has not said that the step ended. */
      const noWord = () => {
        waitTimer = undefined;
        if (ending) return;
        if (exit !== undefined && !outsiderHeld) {
          // The launcher answers (the exit came): only a process outside the group can hold the pipes. Stop reading them.
          outsiderHeld = true;
          proc?.destroyOutput();
          // Their ends follow at once; should they not (the spawner stalled since), the step is abandoned a grace later.
          if (!ending) waitTimer = setTimeoutAfterPending(clock, noWord, killGraceMs);
          return;
        }
        if (exit === undefined && waitLonger(noWord)) return;
        proc?.abandon();
        const unreported = `no end of its process ${pid} was reported ${formatMs(exit === undefined && !this.stop?.urgent ? reportWaitMs : killGraceMs)} after its group was gone (the spawner did not answer)`;
        if (exit === undefined) endStep({ kind: "lost", message: `${unreported}: its exit and any output not yet received are unknown`, outputLost: true });
        else endStep({ ...exited(), note: `${OUTSIDER_NOTE}; ${unreported}: output not yet received is unknown`, outputLost: true });
      };

      /**
       * Holds both pipes while the flow is paused, so that the process blocks
       * in write(); reads them again when it resumes or the step is ending.
       */
      const applyFlow = () => {
        const flow = this.io.flow;
        if (flow === undefined || proc === undefined) return;
        // Paused, what is gathered will not grow for a while: it goes out now rather than after the delay.
        if (!terminating && exit === undefined && flow.paused()) this.coalescer.flush();
        proc.hold(!terminating && exit === undefined && flow.paused());
      };

      const terminate = () => {
        if (terminating || ending) return;
        if (pid === undefined) {
          // Stopped before its start was reported (only a spawner reports it later). Not handed on yet (the spawner not ready): it never runs, nothing of it is unknown.
          if (proc?.withdraw() === true) {
            endStep({ kind: "failed", message: "taken back before it was started", code: undefined });
            return;
          }
          // Else it is waited for a grace.
          waitTimer ??= setTimeoutAfterPending(clock, notStarted, killGraceMs);
          return;
        }
        terminating = true;
        // A process blocked in write() on a full pipe could not act on
        // SIGTERM, and its pipes could not reach EOF: read them again.
        applyFlow();
        if (groupSettled || !signalGroup(group!, "SIGTERM")) {
          settle();
          return;
        }
        killTimer = clock.setTimeout(escalate, killGraceMs);
        // The group existed now (the signal reached it): a scan taken later can tell it is gone.
        watchGroup(clock.now());
      };

      /**
       * Ends what is left of the step (its group, and any process carrying
       * the task's marker), then the step, with `result` given what was done.
       */
      const endLeftovers = (result: (cleanup: string) => StepResult) => {
        ending = true;
        cancelTimers();
        const taskId = env.REXMESH_TASK_ID;
        const groups = group === undefined ? [] : [group];
        const marker = taskId === undefined ? "" : `REXMESH_TASK_ID=${taskId}`;
        const ended = groups.length === 0 && marker === "" ? Promise.resolve(undefined) : endMarkedProcesses(marker, groups, clock, killGraceMs);
        ended
          .catch(() => undefined)
          .then((cleanup) => endStep(result(cleanup ? `; ${describeCleanup(cleanup)}` : "")), () => {});
      };

      /** Stopped, and a grace later the spawner has not said that it started the step: it is told not to. */
      const notStarted = () => {
        waitTimer = undefined;
        if (ending || pid !== undefined) return;
        if (waitLonger(notStarted)) return;
        proc?.abandon();
        endLeftovers((cleanup) => ({
          kind: "lost",
          message: `the spawner did not report its start ${formatMs(this.stop?.urgent ? killGraceMs : reportWaitMs)} after the stop and was told not to start it: whether it ran is unknown${cleanup}`,
          outputLost: true,
        }));
      };

      /**
       * The launcher lost the process (its spawner died): what it had not
       * passed on cannot be known. What is left of it is ended and the step
       * ends saying so; its output is complete if both pipes' ends came.
       */
      const lose = (reason: string) => {
        if (ending) return;
        const outputLost = !stdoutClosed || !stderrClosed;
        if (exit !== undefined) {
          endLeftovers((cleanup) => ({ ...exited(), note: `${reason} after its process ${pid} exited: output not yet received is unknown${cleanup}`, outputLost }));
          return;
        }
        const what = pid === undefined ? "before it was known to have started" : `while its process ${pid} ran`;
        const unknown = outputLost ? "its exit and any output not yet received are unknown" : "its exit is unknown (its output had all arrived)";
        endLeftovers((cleanup) => ({ kind: "lost", message: `${reason} ${what}: ${unknown}${cleanup}`, outputLost }));
      };

      const events: StepEvents = {
        spawned: (p, startTicks) => {
          if (ending) return;
          pid = p;
          // Read by the launcher when it started it, if it could; else now (the daemon's own child is not reaped before its loop turns).
          group = startTicks !== undefined ? { pgid: p, startTicks } : groupRef(p);
          waitTimer?.cancel();
          waitTimer = undefined;
          extending = false;
          this.applyFlowCurrent = applyFlow;
          if (this.stop) {
            terminate();
            return;
          }
          try {
            this.io.onStart?.(p, group);
          } catch (err) {
            this.requestStop({ state: TaskState.FAILED, message: `start callback failed: ${errorText(err)}` });
          }
        },
        failed: (f) => {
          if (f.sync) {
            // Invalid arguments (e.g. a NUL byte in argv or env).
            endStep({ kind: "failed", message: `spawn failed: ${f.message}`, code: f.code });
            return;
          }
          endStep({ kind: "failed", message: f.code ? `spawn ${f.code}: ${program}` : `spawn failed: ${program}: ${f.message}`, code: f.code });
        },
        data: (stream, buf) => {
          if (ending) return;
          this.addOutput(stream, buf);
          applyFlow();
        },
        closed: (stream) => {
          if (stream === OutputStream.STDOUT) stdoutClosed = true;
          else stderrClosed = true;
          endStepIfDone();
        },
        exited: (code, signal) => {
          if (ending) return;
          exit = { code, signal };
          if (extending) {
            // The late exit came: its pipes' ends get a kill grace from now (settle arms it), not the report wait's rest.
            extending = false;
            waitTimer?.cancel();
            waitTimer = undefined;
          }
          // What is left in the pipes was written by processes that are gone,
          // or leftovers about to be terminated: read it so the step can end.
          applyFlow();
          // Members still holding the pipes would keep the step open forever. (Settled: none is left, or SIGKILL went to them.)
          if (!groupSettled && live()) terminate();
          else settle();
          endStepIfDone();
        },
        lost: lose,
      };
      // Set before the launch: a stop may come before the start is reported.
      this.terminateCurrent = terminate;
      proc = launcher.launch({ program, args: argv.slice(1), cwd: cwd === "" ? undefined : cwd, env, stdin: this.spec.stdin }, events);
      if (stepEnded) return;
      applyFlow();
    });
  }
}

/** Turns the steps into argv lists, or returns why the spec cannot run. */
function planSteps(steps: Step[], programs: Readonly<Record<string, string>>): PlannedStep[] | string {
  if (steps.length === 0) return "task has no steps";
  const plan: PlannedStep[] = [];
  for (const [i, step] of steps.entries()) {
    const label = step.name ? `step ${i + 1} (${step.name})` : `step ${i + 1}`;
    const tool = step.tool;
    switch (tool.case) {
      case "exec": {
        const argv = tool.value.argv;
        if (argv.length === 0 || argv[0] === "") return `${label}: exec tool has an empty argv`;
        plan.push({ kind: "process", label, argv: [...argv] });
        break;
      }
      case "shell": {
        const { script, interpreter } = tool.value;
        if (script.trim() === "") return `${label}: shell tool has an empty script`;
        const prefix = interpreter.length > 0 ? interpreter : DEFAULT_INTERPRETER;
        if (prefix[0] === "") return `${label}: shell interpreter has an empty program name`;
        plan.push({ kind: "process", label, argv: [...prefix, script] });
        break;
      }
      case "script": {
        const { artifact, interpreter, args } = tool.value;
        if (!isDigest(artifact)) return `${label}: script artifact ${JSON.stringify(artifact)} is not a sha256:<hex> digest`;
        const prefix = interpreter.length > 0 ? interpreter : DEFAULT_SCRIPT_INTERPRETER;
        if (prefix[0] === "") return `${label}: script interpreter has an empty program name`;
        plan.push({ kind: "staged", label, stage: { artifact, files: {}, argv: (_dir, file) => [...prefix, file!, ...args] } });
        break;
      }
      case "python":
      case "ansible": {
        const program = programs[tool.case];
        if (program === undefined) return `${label}: this host has no ${tool.case} tool (${PROGRAM_TOOLS[tool.case]} not found, or hidden by the daemon's config)`;
        const stage = tool.case === "python" ? pythonStage(tool.value, program) : ansibleStage(tool.value, program);
        if (typeof stage === "string") return `${label}: ${stage}`;
        plan.push({ kind: "staged", label, stage });
        break;
      }
      case "filePut": {
        const { artifact, path, baseDir, mode } = tool.value;
        if (!isDigest(artifact)) return `${label}: file.put artifact ${JSON.stringify(artifact)} is not a sha256:<hex> digest`;
        const problem = baseDirProblem(baseDir) ?? relativePathProblem(path);
        if (problem !== undefined) return `${label}: file.put refused: ${problem}`;
        if (mode > 0o777) return `${label}: file.put mode ${mode.toString(8)} is more than 0777`;
        plan.push({ kind: "put", label, artifact, path, baseDir, mode: mode === 0 ? DEFAULT_PUT_MODE : mode });
        break;
      }
      case "ping":
        // Nothing to run: a liveness step.
        break;
      case "update":
        if (steps.length !== 1) return `${label}: an update step runs alone in its task`;
        if (tool.value.releases.length === 0) return `${label}: update names no release`;
        plan.push({ kind: "update", label, releases: tool.value.releases, options: { retryRolledBack: tool.value.retryRolledBack, allowDowngrade: tool.value.allowDowngrade } });
        break;
      default:
        return `${label}: no tool given`;
    }
  }
  return plan;
}

let ownEnv: Readonly<Record<string, string>> | undefined;

/**
 * The daemon's own environment, read once, the first time a task needs it:
 * enumerating `process.env` calls getenv for every variable, ~2–2.7 ms per
 * task in a profile of `hostname` on 500 hosts (a daemon process's whole
 * environment, once per spawn). The daemon never changes its environment
 * once it runs.
 */
function daemonEnv(): Readonly<Record<string, string>> {
  return (ownEnv ??= inheritedEnv(process.env));
}

function buildEnv(
  base: Readonly<Record<string, string | undefined>>,
  overlay: { [key: string]: string },
): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [key, value] of Object.entries(base)) {
    if (value !== undefined) env[key] = value;
  }
  return Object.assign(env, overlay);
}

/** Checks the working directory first, because spawn reports a missing one as a missing program. */
async function checkWorkingDir(dir: string): Promise<string | undefined> {
  if (dir === "") return undefined;
  try {
    const st = await stat(dir);
    return st.isDirectory() ? undefined : `working directory is not a directory: ${dir}`;
  } catch (err) {
    const code = errorCode(err);
    if (code === "ENOENT" || code === "ENOTDIR") return `working directory does not exist: ${dir}`;
    return `working directory is not usable: ${dir}: ${code ?? errorText(err)}`;
  }
}

function describeExit(result: StepExit): string {
  if (result.code !== null) return `exit code ${result.code}`;
  return `killed by signal ${result.signal ?? "unknown"}`;
}

function formatMs(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)}ms`;
  return `${Number((ms / 1000).toFixed(3))}s`;
}

function errorCode(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === "string" ? code : undefined;
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
