/**
 * Starting a process with posix_spawn(3) instead of Node's fork-based
 * spawn(), for the spawner (daemon/spawner-main.ts) and the daemon's own
 * launcher (daemon/launcher.ts), both through {@link startChild}: see
 * native/spawn/spawn.c for why and for what the child gets (the same as
 * spawn() with `detached: true` and three pipes).
 *
 * The addon is built by `npm ci` (scripts/build-native.mjs). Where it could
 * not be built or loaded, `loadPosixSpawn` says why and both use Node's
 * spawn(), which starts the same processes at the cost of a fork of the
 * starting process per process.
 */
import { spawn } from "node:child_process";
import { EventEmitter } from "node:events";
import { closeSync, existsSync } from "node:fs";
import { createRequire } from "node:module";
import { Socket } from "node:net";
import { constants } from "node:os";
import type { Readable, Writable } from "node:stream";
import { fileURLToPath } from "node:url";
import type { SpawnFailure } from "./spawner-frames.js";

/** The addon's one function: [pid, stdin fd, stdout fd, stderr fd]. `args[0]` is the process's argv[0]. */
export type PosixSpawnFn = (
  file: string,
  args: string[],
  env: string[],
  cwd: string | null,
  onExit: (code: number | null, signal: number | null) => void,
) => [number, number, number, number];

const ADDON = "native/spawn/build/Release/rexmesh_spawn.node";
/** Linux's first real-time signal as glibc numbers them (32 and 33 are its own). */
const SIGRTMIN = 34;
/** Each signal's name; where Node lists two for a number (SIGABRT/SIGIOT, SIGIO/SIGPOLL), the first, as Node reports it. */
const signalNames = new Map<number, string>();
for (const [name, n] of Object.entries(constants.signals)) if (!signalNames.has(n)) signalNames.set(n, name);

/**
 * A signal's name. A real-time one is named as kill -l does (SIGRTMIN+6):
 * Node's spawn() has no name for those and reports such a death as exit code 0.
 */
export function signalName(n: number): string {
  return signalNames.get(n) ?? (n >= SIGRTMIN ? `SIGRTMIN+${n - SIGRTMIN}` : `SIG${n}`);
}

/**
 * The addon's function, or why there is none. Looked for at the package's
 * root, which is one directory above this module's in the sources and two
 * above in dist/.
 */
export function loadPosixSpawn(): { spawn: PosixSpawnFn } | { reason: string } {
  if (process.platform !== "linux") return { reason: `posix_spawn with pidfds is used on Linux only (this is ${process.platform})` };
  const require = createRequire(import.meta.url);
  for (const up of ["../", "../../"]) {
    const path = fileURLToPath(new URL(up + ADDON, import.meta.url));
    if (!existsSync(path)) continue;
    try {
      const addon = require(path) as { posixSpawn?: PosixSpawnFn };
      if (typeof addon.posixSpawn === "function") return { spawn: addon.posixSpawn };
      return { reason: "the kernel has no pidfd_open (Linux 5.3 or later)" };
    } catch (err) {
      return { reason: `${path} could not be loaded: ${err instanceof Error ? err.message : String(err)}` };
    }
  }
  return { reason: `${ADDON} was not built (npm ci builds it with node-gyp; a C compiler is needed)` };
}

/**
 * A process started by posix_spawn, with the part of ChildProcess the
 * spawner uses: its pid, its three pipes as sockets, `exitCode` and
 * `signalCode` once it exited, and the events `exit` (code, signal) and
 * `close` (after `exit` and both output pipes' close), in that order.
 */
export class PosixChild extends EventEmitter {
  readonly pid: number;
  readonly stdin: Socket;
  readonly stdout: Socket;
  readonly stderr: Socket;
  exitCode: number | null = null;
  signalCode: NodeJS.Signals | null = null;
  private closesNeeded = 3; // stdout, stderr, the exit

  constructor(spawnFn: PosixSpawnFn, program: string, args: readonly string[], options: { cwd?: string; env: Record<string, string> }) {
    super();
    // As spawn() refuses it.
    if (program.length === 0) throw Object.assign(new TypeError("The argument 'file' cannot be empty"), { code: "ERR_INVALID_ARG_VALUE" });
    const env: string[] = [];
    for (const [key, value] of Object.entries(options.env)) {
      if (value !== undefined) env.push(`${key}=${value}`);
    }
    let started = false;
    const [pid, stdin, stdout, stderr] = spawnFn(program, [program, ...args], env, options.cwd ?? null, (code, signal) => {
      // The start failed after the process existed (below): it was killed, and nobody listens for it.
      if (!started) return;
      this.exitCode = code;
      // A real-time signal's name is not one of NodeJS.Signals; the spawner passes it on as a string all the same.
      this.signalCode = signal === null ? null : (signalName(signal) as NodeJS.Signals);
      // As spawn() does: what the process did not read is not kept (nor written to a process that inherited its stdin).
      this.stdin.destroy();
      this.emit("exit", this.exitCode, this.signalCode);
      this.closed();
    });
    this.pid = pid;
    const sockets: Socket[] = [];
    try {
      for (const [fd, writable] of [[stdin, true], [stdout, false], [stderr, false]] as const) sockets.push(new Socket({ fd, readable: !writable, writable }));
    } catch (err) {
      // Not expected (the fds are fresh socket ends); the process must not run on unwatched: it is killed, and the start fails.
      for (const s of sockets) s.destroy();
      for (const fd of [stdin, stdout, stderr].slice(sockets.length)) closeSync(fd);
      try {
        process.kill(-pid, "SIGKILL");
      } catch {
        // Gone.
      }
      throw err;
    }
    [this.stdin, this.stdout, this.stderr] = sockets as [Socket, Socket, Socket];
    started = true;
    this.stdout.once("close", () => this.closed());
    this.stderr.once("close", () => this.closed());
  }

  private closed(): void {
    if (--this.closesNeeded === 0) this.emit("close", this.exitCode, this.signalCode);
  }
}

/** What startChild makes: Node's ChildProcess, or a PosixChild with the same members. */
export interface Child {
  readonly pid?: number;
  readonly stdin: Writable | null;
  readonly stdout: Readable | null;
  readonly stderr: Readable | null;
  readonly exitCode: number | null;
  readonly signalCode: NodeJS.Signals | null;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any -- the events' arguments differ (exit: code, signal; error: Error)
  on(event: "exit" | "close" | "error", listener: (...args: any[]) => void): unknown;
}

/** An error's `code` (ENOENT, ERR_INVALID_ARG_VALUE, …), if it has one. */
function codeOf(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === "string" ? code : undefined;
}

/** The errors Node's spawn() emits as 'error' rather than throwing (lib/internal/child_process.js). */
const ASYNC_SPAWN_ERRORS = new Set(["EACCES", "EAGAIN", "EMFILE", "ENFILE", "ENOENT"]);

/**
 * Starts a step's process in a session and group of its own with three
 * pipes: by posix_spawn when `posixSpawn` is given, else by Node's spawn().
 * Returns the running child; or undefined once `failed` was called, or will
 * be (spawn() emits some failures later, as 'error'). Either way a failure
 * is told and worded as spawn() would: `sync` when spawn() throws it (the
 * arguments refused, no process made), "spawn ENOTDIR" for a thrown errno.
 */
export function startChild(
  posixSpawn: PosixSpawnFn | undefined,
  request: { program: string; args: readonly string[]; cwd?: string; env: Record<string, string> },
  failed: (failure: SpawnFailure) => void,
): (Child & { readonly pid: number }) | undefined {
  let child: Child;
  try {
    child = posixSpawn
      ? new PosixChild(posixSpawn, request.program, request.args, { cwd: request.cwd, env: request.env })
      : spawn(request.program, [...request.args], { cwd: request.cwd, env: request.env, detached: true, stdio: ["pipe", "pipe", "pipe"] });
  } catch (err) {
    // posix_spawn reports every failure at once; spawn() throws some and emits others as 'error' later (below).
    const code = codeOf(err);
    const sync = !posixSpawn || !ASYNC_SPAWN_ERRORS.has(code ?? "");
    // An errno (ENOTDIR, …), not Node's ERR_INVALID_ARG_VALUE and the like, whose own message says what was wrong.
    const message = posixSpawn && sync && /^E[A-Z0-9]+$/.test(code ?? "") ? `spawn ${code}` : err instanceof Error ? err.message : String(err);
    failed({ sync, code, message });
    return undefined;
  }
  if (child.pid === undefined) {
    // Not started (Node's spawn() only): 'error' follows (ENOENT, EACCES, …); nothing else of it will.
    child.on("error", (err: Error) => {
      for (const s of [child.stdin, child.stdout, child.stderr]) s?.destroy();
      failed({ sync: false, code: codeOf(err), message: err.message });
    });
    return undefined;
  }
  return child as Child & { readonly pid: number };
}

