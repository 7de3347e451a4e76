/**
 * Starting a process with posix_spawn(3) instead of Node's fork-based
 * spawn(), for the spawner (daemon/spawner-main.ts): see native/spawn/spawn.c
 * for why and for what the child gets (the same as spawn() with
 * `detached: true` and three pipes).
 *
 * The addon is built by `npm ci` (scripts/build-native.mjs). Where it could
 * not be built or loaded, `loadPosixSpawn` says why and the spawner uses
 * Node's spawn(), which starts the same processes at the cost of a fork of
 * the spawner per process.
 */
import { EventEmitter } from "node:events";
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { Socket } from "node:net";
import { constants } from "node:os";

/** The addon's one function: [pid, stdin fd, stdout fd, stderr fd]. `args[0]` is the process's argv[0]. */
export type PosixSpawnFn = (
  file: string,
  args: string[],
  env: string[],
  cwd: string | null,
  onExit: (code: number | null, signal: number | null) => void,
) => [number, number, number, number];

const ADDON = "native/spawn/build/Release/rexmesh_spawn.node";
const signalNames = new Map<number, NodeJS.Signals>(Object.entries(constants.signals).map(([name, n]) => [n, name as NodeJS.Signals]));

/**
 * The addon's function, or why there is none. Looked for at the package's
 * root, which is one directory above this module's in the sources and two
 * above in dist/.
 */
export function loadPosixSpawn(): { spawn: PosixSpawnFn } | { reason: string } {
  if (process.platform !== "linux") return { reason: `posix_spawn with pidfds is used on Linux only (this is ${process.platform})` };
  const require = createRequire(import.meta.url);
  for (const up of ["../", "../../"]) {
    const path = new URL(up + ADDON, import.meta.url);
    if (!existsSync(path)) continue;
    try {
      const addon = require(path.pathname) as { posixSpawn?: PosixSpawnFn };
      if (typeof addon.posixSpawn === "function") return { spawn: addon.posixSpawn };
      return { reason: "the kernel has no pidfd_open (Linux 5.3 or later)" };
    } catch (err) {
      return { reason: `${path.pathname} could not be loaded: ${err instanceof Error ? err.message : String(err)}` };
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
    const env: string[] = [];
    for (const [key, value] of Object.entries(options.env)) {
      if (value !== undefined) env.push(`${key}=${value}`);
    }
    const [pid, stdin, stdout, stderr] = spawnFn(program, [program, ...args], env, options.cwd ?? null, (code, signal) => {
      this.exitCode = code;
      this.signalCode = signal === null ? null : (signalNames.get(signal) ?? null);
      this.emit("exit", this.exitCode, this.signalCode);
      this.closed();
    });
    this.pid = pid;
    this.stdin = new Socket({ fd: stdin, readable: false, writable: true });
    this.stdout = new Socket({ fd: stdout, readable: true, writable: false });
    this.stderr = new Socket({ fd: stderr, readable: true, writable: false });
    this.stdout.once("close", () => this.closed());
    this.stderr.once("close", () => this.closed());
  }

  private closed(): void {
    if (--this.closesNeeded === 0) this.emit("close", this.exitCode, this.signalCode);
  }
}
