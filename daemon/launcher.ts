/**
 * How the executor starts a step's process: in the daemon itself
 * ({@link directLauncher}: posix_spawn, or Node's spawn() where the addon was
 * not built), or through the spawner next to it
 * (daemon/spawner.ts). Either way the process is a real child of one of
 * them, leads its own process group, and its output comes back per stream
 * in the order it was read; the executor signals the group itself.
 */
import { OutputStream } from "../gen/rexmesh/v1/task_pb.js";
import { loadPosixSpawn, startChild, type Child, type PosixSpawnFn } from "./native-spawn.js";

/** What to run. `env` is complete: nothing is inherited. */
export interface LaunchRequest {
  program: string;
  args: string[];
  /** Absent: the daemon's working directory. */
  cwd?: string;
  env: Record<string, string>;
  /** Written to the process's stdin, which is then closed. */
  stdin: Uint8Array;
}

/**
 * Events of one launched step, in this order: `spawned` or `failed` first;
 * after `spawned`, `data`/`closed` per stream and `exited` in any order, or
 * `lost` once, after which nothing else comes.
 */
export interface StepEvents {
  /**
   * The process runs; pid is also its process group id. startTicks: its
   * start time (clock ticks since boot), read while it could not have been
   * reaped (a spawner reports the start late); absent: to be read now.
   */
  spawned(pid: number, startTicks?: number): void;
  /** No process runs: `sync` when the arguments were refused before any process was made (e.g. a NUL byte). */
  failed(failure: { sync: boolean; code?: string; message: string }): void;
  /** Bytes read from one of its pipes; the receiver may keep `buf`. */
  data(stream: OutputStream, buf: Buffer): void;
  /** That pipe reached its end (or was destroyed): no more of its output follows. */
  closed(stream: OutputStream): void;
  exited(code: number | null, signal: string | null): void;
  /**
   * The launcher can no longer follow the process (the spawner died): its
   * exit and any output not yet received are unknown. `pid` is undefined when
   * it was lost before it was known to have started.
   */
  lost(reason: string): void;
}

/** A launched step, as its reader controls it. */
export interface LaunchedStep {
  /** Stops (true) or resumes (false) reading its output: held, the process blocks in write() once its pipes are full. */
  hold(on: boolean): void;
  /** Stops waiting for its output: its pipes are closed at the reading end, and each reports `closed`. */
  destroyOutput(): void;
  /**
   * The executor ended the step without the launcher's word (it did not
   * confirm a stop in time): no event of it follows, its output is no longer
   * read, and one not started yet never is (or is killed at once).
   */
  abandon(): void;
  /**
   * Takes the step back if it was not handed to anything that could start
   * it yet (a spawner not ready): true when it never runs and no event of it
   * follows; false when it may have started (its start or failure comes).
   */
  withdraw(): boolean;
}

/** A step that never ran: nothing to hold, destroy or abandon (its failure is reported). */
const NOTHING: LaunchedStep = { hold() {}, destroyOutput() {}, abandon() {}, withdraw: () => false };

/** Starts step processes. `launch` never throws: every failure is an event. */
export interface Launcher {
  launch(request: LaunchRequest, events: StepEvents): LaunchedStep;
  /**
   * True when a launch starts the process on the caller's thread, holding its
   * event loop meanwhile: a fork of it (milliseconds, growing with its size),
   * or posix_spawn waiting for the child's exec (~2 ms each measured in a
   * 120 MiB process). The agent then starts one step per turn of the loop.
   */
  readonly startsInCaller: boolean;
}

/**
 * Starts step processes from this process: by posix_spawn when given (no
 * fork of the daemon), else by Node's spawn(), a fork of the daemon per step
 * whose cost grows with the daemon's size.
 */
export function directLauncherWith(posixSpawn: PosixSpawnFn | undefined): Launcher {
  return {
    startsInCaller: true,
    launch(request, events) {
      const child = startChild(posixSpawn, request, (failure) => events.failed(failure));
      return child === undefined ? NOTHING : follow(child, request.stdin, events);
    },
  };
}

const loaded = loadPosixSpawn();
/** Why the daemon's own launcher forks the daemon (the addon could not be loaded), or undefined: it uses posix_spawn. */
export const directLauncherForks: string | undefined = "reason" in loaded ? loaded.reason : undefined;
/**
 * The daemon's own launcher (with `--no-spawner`, and while a spawner cannot
 * be had): posix_spawn where the addon was built; else Node's spawn(), a
 * fork of the daemon, which the daemon's log says once ({@link directLauncherForks}).
 */
export const directLauncher: Launcher = directLauncherWith("spawn" in loaded ? loaded.spawn : undefined);

/** Reports a started child's output and exit to `events`, and writes its stdin. */
function follow(child: Child & { readonly pid: number }, input: Uint8Array, events: StepEvents): LaunchedStep {
  const stdin = child.stdin!;
  const stdout = child.stdout!;
  const stderr = child.stderr!;
  events.spawned(child.pid);
  let abandoned = false;
  // Only spawn failures matter; a started process's pipe errors end in 'close'.
  child.on("error", () => {});
  for (const [stream, tag] of [[stdout, OutputStream.STDOUT], [stderr, OutputStream.STDERR]] as const) {
    stream.on("data", (buf: Buffer) => {
      if (!abandoned) events.data(tag, buf);
    });
    stream.on("error", () => {});
    stream.on("close", () => {
      if (!abandoned) events.closed(tag);
    });
  }
  child.on("exit", (code, signal) => {
    if (!abandoned) events.exited(code, signal);
  });
  // The child may exit without reading its input (EPIPE): that is the child's business, not a failure of the task.
  stdin.on("error", () => {});
  if (input.length > 0) stdin.end(input);
  else stdin.end();
  return {
    hold(on) {
      for (const s of [stdout, stderr]) {
        if (s.destroyed) continue;
        if (on) s.pause();
        else if (s.isPaused()) s.resume();
      }
    },
    destroyOutput() {
      stdout.destroy();
      stderr.destroy();
    },
    abandon() {
      abandoned = true;
      stdout.destroy();
      stderr.destroy();
    },
    withdraw: () => false,
  };
}
