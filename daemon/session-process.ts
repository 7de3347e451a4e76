/**
 * The process of a session on the host (docs/sessions.md): the program, or
 * the login shell of the daemon's user, in a pseudo-terminal of its own
 * (@lydell/node-pty: a new session and process group, the pty its
 * controlling terminal) or, without a tty, with plain pipes in a process
 * group of its own. Either way it is ended as a group.
 */
import { spawn as spawnChild } from "node:child_process";
import { accessSync, constants as fsConstants, statSync } from "node:fs";
import { constants as osConstants, homedir, userInfo } from "node:os";
import { delimiter, join } from "node:path";
import { createRequire } from "node:module";
import type { IPty } from "@lydell/node-pty";

/** node-pty, loaded with the first terminal session: most daemons never open one, and it costs memory. */
let nodePty: typeof import("@lydell/node-pty") | undefined;
const spawnPty: typeof import("@lydell/node-pty").spawn = (...args) => (nodePty ??= createRequire(import.meta.url)("@lydell/node-pty") as typeof import("@lydell/node-pty")).spawn(...args);
import { FailedPreconditionError } from "../common/errors.js";
import { SessionChannel, SessionExitSchema, type SessionExit, type SessionSpec } from "../gen/rexmesh/v1/session_pb.js";
import { create } from "@bufbuild/protobuf";
import type { Clock } from "../common/clock.js";
import { inheritedEnv } from "./inherited-env.js";

export interface SessionProcess {
  readonly pid: number;
  /** Output as it is read: stdout (all of a tty's output) and stderr. */
  onOutput(fn: (channel: SessionChannel, data: Uint8Array) => void): void;
  /** Writes input; `done` once it is handed to the process (or dropped because input is closed). */
  write(data: Uint8Array, done: () => void): void;
  /** No more input: EOF on a pipe; the terminal's EOF character on a tty. */
  endInput(): void;
  resize(cols: number, rows: number): void;
  /** Sends a signal ("INT", ...) to the process group. */
  signal(name: string): void;
  pauseOutput(): void;
  resumeOutput(): void;
  /** Resolves once the process has exited and all of its output was read. */
  readonly exited: Promise<SessionExit>;
  /** Ends the process group: SIGHUP now, SIGKILL after `graceMs` if it is still there. */
  kill(graceMs: number, clock: Clock): void;
}

/** What the session's process starts with: the daemon's own environment without rexmesh's, plus the session's. */
export function sessionEnv(spec: SessionSpec, extra: Record<string, string>, base: NodeJS.ProcessEnv = process.env): Record<string, string> {
  const env = inheritedEnv(base);
  const user = userInfo();
  env.HOME ??= user.homedir;
  env.USER ??= user.username;
  env.LOGNAME ??= user.username;
  env.SHELL = loginShell();
  if (spec.tty) env.TERM = spec.term || "xterm";
  return Object.assign(env, extra);
}

/** The daemon user's login shell (its passwd entry), or /bin/sh. */
export function loginShell(): string {
  const shell = userInfo().shell;
  return shell && shell !== "" ? shell : "/bin/sh";
}

/** The program and arguments a session runs: its argv, or the login shell as a login shell. */
export function sessionArgv(spec: SessionSpec): string[] {
  return spec.argv.length > 0 ? [...spec.argv] : [loginShell(), "-l"];
}

/** The program's path, looked up on PATH like execvp does; FAILED_PRECONDITION naming it when there is none to run. */
export function resolveProgram(program: string, path = process.env.PATH ?? ""): string {
  const runnable = (p: string) => {
    try {
      accessSync(p, fsConstants.X_OK);
      return statSync(p).isFile();
    } catch {
      return false;
    }
  };
  if (program.includes("/")) {
    if (runnable(program)) return program;
    throw new FailedPreconditionError(`${program}: no such program on the host (or it is not executable)`);
  }
  for (const dir of path.split(delimiter)) {
    const p = join(dir || ".", program);
    if (runnable(p)) return p;
  }
  throw new FailedPreconditionError(`${program}: not found on the host's PATH`);
}

function signalName(n: number | undefined): string {
  if (!n) return "";
  const found = Object.entries(osConstants.signals).find(([, v]) => v === n);
  return found ? found[0] : `signal ${n}`;
}

/** Sends a signal to a process group; false when the group is gone. */
function signalGroup(pgid: number, signal: NodeJS.Signals): boolean {
  try {
    process.kill(-pgid, signal);
    return true;
  } catch {
    return false;
  }
}

/** SIGHUP to the group now, SIGKILL after the grace unless it exited meanwhile. */
function endGroup(pgid: number, exited: Promise<unknown>, graceMs: number, clock: Clock): void {
  if (!signalGroup(pgid, "SIGHUP")) return;
  let done = false;
  exited.then(
    () => (done = true),
    () => (done = true),
  );
  clock.setTimeout(() => {
    if (!done) signalGroup(pgid, "SIGKILL");
  }, graceMs);
}

/** Starts a session's process: a pty with `spec.tty`, pipes without. */
export function startSessionProcess(spec: SessionSpec, env: Record<string, string>): SessionProcess {
  const [program, ...args] = sessionArgv(spec);
  // Looked up first to say clearly when it is missing; started by its own name, so that argv[0] is what was asked for.
  resolveProgram(program!, env.PATH);
  const file = program!;
  const cwd = env.HOME && isDir(env.HOME) ? env.HOME : isDir(homedir()) ? homedir() : "/";
  return spec.tty ? new PtyProcess(file, args, spec, env, cwd) : new PipeProcess(file, args, env, cwd);
}

function isDir(p: string): boolean {
  try {
    return statSync(p).isDirectory();
  } catch {
    return false;
  }
}

class PtyProcess implements SessionProcess {
  private readonly pty: IPty;
  readonly exited: Promise<SessionExit>;
  private inputClosed = false;

  constructor(file: string, args: string[], spec: SessionSpec, env: Record<string, string>, cwd: string) {
    this.pty = spawnPty(file, args, {
      name: env.TERM ?? "xterm",
      cols: spec.window?.cols || 80,
      rows: spec.window?.rows || 24,
      cwd,
      env,
      // Bytes as they are: a session is binary-safe, and a UTF-8 character cut between two reads stays whole.
      encoding: null,
    });
    this.exited = new Promise((resolve) => {
      this.pty.onExit(({ exitCode, signal }) => {
        resolve(signal ? create(SessionExitSchema, { signal: signalName(signal) }) : create(SessionExitSchema, { code: exitCode }));
      });
    });
  }

  get pid(): number {
    return this.pty.pid;
  }

  onOutput(fn: (channel: SessionChannel, data: Uint8Array) => void): void {
    // With encoding null node-pty hands Buffers, though it types them as strings.
    this.pty.onData((d) => fn(SessionChannel.STDOUT, d as unknown as Buffer));
  }

  write(data: Uint8Array, done: () => void): void {
    // node-pty writes to the pty's master socket, which tells when it took the bytes; its own write() does not.
    const socket = (this.pty as unknown as { _socket?: { write(d: Uint8Array, cb: () => void): boolean; destroyed?: boolean } })._socket;
    if (this.inputClosed || !socket || socket.destroyed) {
      done();
      return;
    }
    socket.write(data, () => done());
  }

  endInput(): void {
    // A terminal has no end of input but its EOF character (^D at the start of a line).
    this.write(Buffer.from([4]), () => undefined);
  }

  resize(cols: number, rows: number): void {
    try {
      this.pty.resize(cols, rows);
    } catch {
      // The pty is closing: the size no longer matters.
    }
  }

  signal(name: string): void {
    signalGroup(this.pty.pid, `SIG${name}` as NodeJS.Signals);
  }

  pauseOutput(): void {
    this.pty.pause();
  }

  resumeOutput(): void {
    this.pty.resume();
  }

  kill(graceMs: number, clock: Clock): void {
    this.inputClosed = true;
    endGroup(this.pty.pid, this.exited, graceMs, clock);
  }
}

class PipeProcess implements SessionProcess {
  private readonly child: ReturnType<typeof spawnChild>;
  readonly exited: Promise<SessionExit>;

  constructor(file: string, args: string[], env: Record<string, string>, cwd: string) {
    this.child = spawnChild(file, args, { env, cwd, detached: true, stdio: ["pipe", "pipe", "pipe"] });
    this.exited = new Promise((resolve) => {
      this.child.once("error", () => resolve(create(SessionExitSchema, { code: 127 })));
      // 'close': the process exited and its pipes are read to their end.
      this.child.once("close", (code, signal) => resolve(signal ? create(SessionExitSchema, { signal }) : create(SessionExitSchema, { code: code ?? 0 })));
    });
    // Writes to a process that closed its stdin fail with EPIPE: input it will never read.
    this.child.stdin!.on("error", () => undefined);
  }

  get pid(): number {
    return this.child.pid ?? 0;
  }

  onOutput(fn: (channel: SessionChannel, data: Uint8Array) => void): void {
    this.child.stdout!.on("data", (d: Buffer) => fn(SessionChannel.STDOUT, d));
    this.child.stderr!.on("data", (d: Buffer) => fn(SessionChannel.STDERR, d));
  }

  write(data: Uint8Array, done: () => void): void {
    const stdin = this.child.stdin!;
    if (stdin.destroyed || stdin.writableEnded) {
      done();
      return;
    }
    stdin.write(data, () => done());
  }

  endInput(): void {
    this.child.stdin!.end();
  }

  resize(): void {
    // Pipes have no window.
  }

  signal(name: string): void {
    if (this.child.pid) signalGroup(this.child.pid, `SIG${name}` as NodeJS.Signals);
  }

  pauseOutput(): void {
    this.child.stdout!.pause();
    this.child.stderr!.pause();
  }

  resumeOutput(): void {
    this.child.stdout!.resume();
    this.child.stderr!.resume();
  }

  kill(graceMs: number, clock: Clock): void {
    this.child.stdin!.destroy();
    if (this.child.pid) endGroup(this.child.pid, this.exited, graceMs, clock);
  }
}
