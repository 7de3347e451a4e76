/**
 * The spawner: a small process next to the daemon that starts the
 * processes of its tasks and relays their output and exits over a pipe.
 *
 * Why: Node's spawn() forks the calling process, and the cost of a fork
 * (page tables copied, then every page the parent writes afterwards faulted
 * and copied) grows with the process's size. A daemon serving many hosts is
 * large; this process is Node at its smallest, and stays so: it keeps no
 * state but its live steps, and imports nothing but Node's own modules, the
 * frame codec, the /proc stat reader and the posix_spawn addon's wrapper
 * (daemon/native-spawn.ts). With the addon it does not fork itself at all:
 * a start costs the same whatever its size.
 *
 * Its frames: daemon/spawner-frames.ts. fd 3 carries requests, fd 4 the
 * answers; stdin, stdout and stderr are not used for frames (stdout is
 * /dev/null, stderr the daemon's log), so that nothing else that writes to
 * them (a NODE_OPTIONS preload, a warning) can be read as a frame. Any frame
 * that breaks the protocol ends this process. The daemon ends this process
 * by closing fd 3; when the daemon dies the same happens. The processes it
 * started are left as they would be had the daemon started them: each leads
 * its own process group, and their pipes close with this process.
 *
 * Flow: each step may have at most WINDOW bytes read but not acknowledged by
 * the daemon; past it both of its pipes are paused, so a process whose
 * output the daemon does not take blocks in write(), as it would on the
 * daemon's own pipes. While the daemon does not read fd 4 at all, every
 * step's pipes are paused until it drains: this process waits, neither
 * holding output in memory nor spinning, and still reads fd 3 (a CANCEL is
 * acted on, a child reaped).
 */
import { Socket } from "node:net";
import { loadPosixSpawn, startChild, type Child } from "./native-spawn.js";
import { readStat } from "./proc-stat.js";
import { FrameKind, FrameReader, MAX_BODY_TO_SPAWNER, PROTOCOL_VERSION, TO_SPAWNER, frame, jsonFrame, readSpawn, spawnedFrame, u32Frame, type SpawnFailure } from "./spawner-frames.js";

/** Requests come in on this fd, answers leave on the other. */
const IN_FD = 3;
const OUT_FD = 4;

/** Output bytes a step may have in flight to the daemon before its pipes are paused. */
const WINDOW = 256 * 1024;

interface Step {
  child: Child;
  unacked: number;
  held: boolean;
  /** Its pipes are paused: held, or the daemon is not reading (see `blocked`). */
  paused: boolean;
  /** The daemon cancelled it: nothing more of it is sent. */
  cancelled: boolean;
}

/**
 * The daemon that started this process (its first argument). Once it is
 * gone (this process re-parented), nothing more is started: a restarted
 * daemon may already have ended the task as INTERRUPTED, and a request still
 * in the pipe must not start a process after that.
 */
const daemon = Number(process.argv[2]);
const daemonGone = () => daemon > 0 && process.ppid !== daemon;

/**
 * Processes start through posix_spawn (native/spawn/spawn.c): Node's spawn()
 * forks this process once per start, which on a machine with a slow fork cost
 * as much CPU as the started process itself. The second argument "fork"
 * keeps Node's spawn(); so does an addon that is not there (said once on
 * stderr, the daemon's log).
 */
const posix = process.argv[3] === "fork" ? undefined : loadPosixSpawn();
if (posix && "reason" in posix) process.stderr.write(`rexmesh spawner: processes start with Node's spawn() (a fork of this process each): ${posix.reason}\n`);
const posixSpawn = posix && "spawn" in posix ? posix.spawn : undefined;

const steps = new Map<number, Step>();
/**
 * SPAWN requests of the read being taken apart: they start once all of its
 * frames are read, so that a CANCEL sent after one (the daemon gave up while
 * this process was stopped) and read with it wins, and the step never runs.
 */
const toStart = new Map<number, Buffer>();
let queued: Buffer[] = [];
let flushScheduled = false;

/** Frames leave once per turn of the event loop, in the order they were made. */
function send(buf: Buffer): void {
  queued.push(buf);
  if (flushScheduled) return;
  flushScheduled = true;
  setImmediate(flush);
}

/** Answers leave through this socket (non-blocking); see `blocked`. */
const output = new Socket({ fd: OUT_FD, readable: false, writable: true });
// The daemon is gone.
output.on("error", () => process.exit(0));
/**
 * True while the daemon has not taken what was written: no step's pipes are
 * read until the socket drains. (Until review: a loop of writeSync on fd 4,
 * retried at once on EAGAIN, so that a spawner whose daemon stopped reading
 * either spun or, the fd being blocking, could not read fd 3 or reap.)
 */
let blocked = false;

function flush(): void {
  flushScheduled = false;
  const out = queued.length === 1 ? queued[0]! : Buffer.concat(queued);
  queued = [];
  if (output.write(out) || blocked) return;
  blocked = true;
  for (const step of steps.values()) pauseOrResume(step);
  output.once("drain", () => {
    blocked = false;
    for (const step of steps.values()) pauseOrResume(step);
  });
}

/** The step's window is full, or not any more. */
function hold(step: Step): void {
  step.held = step.unacked >= WINDOW;
  pauseOrResume(step);
}

/** Reads the step's pipes unless its window is full or the daemon does not read. */
function pauseOrResume(step: Step): void {
  const want = step.held || blocked;
  if (want === step.paused) return;
  step.paused = want;
  for (const s of [step.child.stdout, step.child.stderr]) {
    if (!s || s.destroyed) continue;
    if (want) s.pause();
    else s.resume();
  }
}

function start(id: number, body: Buffer): void {
  if (daemonGone()) process.exit(0);
  const { request, stdin } = readSpawn(body);
  const child = startChild(posixSpawn, request, (failure) => failed(id, failure));
  if (child === undefined) return;
  const step: Step = { child, unacked: 0, held: false, paused: false, cancelled: false };
  steps.set(id, step);
  // Its start time, read now: it cannot have been reaped yet (this process reaps only when its loop turns), so its pid is still its own.
  // The daemon, which learns of it later, checks it before each signal to the group (pid reuse).
  send(spawnedFrame(id, child.pid, readStat(child.pid)?.startTicks ?? 0));
  // Errors of a started process's pipes end in 'close'; these only keep them from being uncaught.
  child.on("error", () => {});
  const relay = (kind: number, closedTag: number) => (stream: NodeJS.ReadableStream & { destroyed: boolean }) => {
    stream.on("data", (buf: Buffer) => {
      if (step.cancelled) return;
      send(frame(kind, id, buf));
      step.unacked += buf.length;
      hold(step);
    });
    stream.on("error", () => {});
    stream.on("close", () => {
      if (!step.cancelled) send(u32Frame(FrameKind.CLOSED, id, closedTag));
    });
  };
  relay(FrameKind.STDOUT, 1)(child.stdout!);
  relay(FrameKind.STDERR, 2)(child.stderr!);
  pauseOrResume(step);
  child.on("exit", (code: number | null, signal: NodeJS.Signals | null) => {
    if (!step.cancelled) send(jsonFrame(FrameKind.EXIT, id, { code, signal }));
  });
  child.on("close", () => steps.delete(id));
  // A process may exit without reading its input (EPIPE): its business, not a failure.
  child.stdin!.on("error", () => {});
  if (stdin.length > 0) child.stdin!.end(stdin);
  else child.stdin!.end();
}

/**
 * The daemon ended the step without this process. A process not yet reaped
 * (its exit not seen) still owns its pid, so its group is the step's: SIGKILL.
 * One reaped is not signalled (its pid may be another's by now).
 */
function cancel(id: number): void {
  if (toStart.delete(id)) return;
  const step = steps.get(id);
  if (!step) return;
  step.cancelled = true;
  steps.delete(id);
  const { child } = step;
  if (child.exitCode === null && child.signalCode === null) {
    try {
      process.kill(-child.pid!, "SIGKILL");
    } catch {
      // Gone already.
    }
  }
  child.stdout?.destroy();
  child.stderr?.destroy();
}

function failed(id: number, failure: SpawnFailure): void {
  send(jsonFrame(FrameKind.FAILED, id, failure));
}

const reader = new FrameReader((kind, id, body) => {
  switch (kind) {
    case FrameKind.SPAWN:
      toStart.set(id, body);
      break;
    case FrameKind.CANCEL:
      cancel(id);
      break;
    case FrameKind.ACK: {
      const step = steps.get(id);
      if (!step) break;
      step.unacked -= body.readUInt32BE(0);
      hold(step);
      break;
    }
    case FrameKind.DESTROY: {
      const step = steps.get(id);
      step?.child.stdout?.destroy();
      step?.child.stderr?.destroy();
      break;
    }
    case FrameKind.PING:
      send(frame(FrameKind.PONG, id));
      break;
  }
}, { kinds: TO_SPAWNER, maxBody: MAX_BODY_TO_SPAWNER });

function violation(err: unknown): never {
  process.stderr.write(`rexmesh spawner: the daemon broke the frame protocol (${err instanceof Error ? err.message : String(err)}); exiting\n`);
  process.exit(70);
}

if (daemonGone()) process.exit(0);
send(u32Frame(FrameKind.READY, 0, PROTOCOL_VERSION));
const input = new Socket({ fd: IN_FD, readable: true, writable: false });
input.on("data", (chunk: Buffer) => {
  try {
    reader.push(chunk);
  } catch (err) {
    violation(err);
  }
  for (const [id, body] of toStart) {
    toStart.delete(id);
    start(id, body);
  }
});
// The daemon closed its end, or died: nothing more will be asked.
input.on("end", () => {
  if (queued.length > 0) flush();
  output.end(() => process.exit(0));
});
input.on("error", () => process.exit(0));
