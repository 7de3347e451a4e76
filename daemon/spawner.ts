/**
 * The daemon's end of its spawner (daemon/spawner-main.ts): a small Node
 * process that starts the steps' processes, so that the daemon, large when
 * it serves many hosts, is not forked once per step.
 *
 * One spawner serves every executor of a daemon process. It is started with
 * the first step, and again with the first step after it died. When it dies
 * (or stops answering: see `answerTimeoutMs`, then it is killed), what it
 * wrote is read to the end of its pipe (for at most `eofWaitMs` once it
 * exited), then every step it still held is `lost`: what it had not passed on
 * is unknown, so the executor ends what is left of them and says so
 * (daemon/executor.ts). A step the executor gives up on sooner (a stop the
 * spawner did not confirm in time) is abandoned: forgotten here, and the
 * spawner is told (CANCEL) never to start it, or to kill it if it did.
 * Nothing is written to a spawner before its READY frame (of this protocol
 * version) was read, so a spawner that dies before that was sent no
 * request: the steps waiting for it are started in the daemon instead
 * (directLauncher),
 * and so is every step for `fallbackMs` after such a failure, so a daemon
 * whose spawner cannot start at all still runs its tasks.
 *
 * Frames go over fds 3 (to the spawner) and 4 (from it), never its stdout,
 * and it starts with a minimal environment (no NODE_OPTIONS: every request
 * carries its step's whole environment), so that nothing else it writes can
 * be taken for a frame. A frame that breaks the protocol (unknown kind, over
 * the size cap, a malformed body, anything but READY first: so nothing it
 * writes before READY is kept) gets the spawner killed and its steps lost:
 * they end INTERRUPTED and are never started again.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";
import { setTimeoutAfterPending, type Clock, type Timer } from "../common/clock.js";
import type { Logger } from "../common/logger.js";
import { OutputStream } from "../gen/rexmesh/v1/task_pb.js";
import { directLauncher, type LaunchedStep, type Launcher, type LaunchRequest, type StepEvents } from "./launcher.js";
import { FrameKind, FrameReader, MAX_BODY_TO_DAEMON, PROTOCOL_VERSION, TO_DAEMON, frame, jsonFrame, readSpawned, u32Frame, type SpawnFailure } from "./spawner-frames.js";

/** Options of {@link Spawner}; all but clock and log have defaults. */
export interface SpawnerOptions {
  clock: Clock;
  log: Logger;
  /** Node flags of the spawner process. Default: a small heap (see DEFAULT_NODE_ARGS). */
  nodeArgs?: readonly string[];
  /** The spawner's script. Default: spawner-main.js beside this module. */
  mainPath?: string;
  /**
   * How the spawner starts a process: "posix_spawn" (default; through the
   * addon native/spawn, or Node's spawn() where it was not built) or "fork"
   * (Node's spawn() always: a fork of the spawner per process; kept for
   * comparisons and to test that path).
   */
  processStart?: "posix_spawn" | "fork";
  /** While it holds steps, the spawner is asked every this often whether it is alive. Default 5 s. */
  pingMs?: number;
  /** A spawner that leaves a question unanswered this long is killed, its steps lost. Default 30 s. */
  answerTimeoutMs?: number;
  /** After a spawner that could not start, steps start in the daemon for this long. Default 60 s. */
  fallbackMs?: number;
  /**
   * Once a spawner exited, the end of its pipe is waited for this long after
   * the last bytes read (a process that inherited the pipe could hold it open
   * for ever); then its steps are lost. Default 5 s.
   */
  eofWaitMs?: number;
}

/** A young generation of 1 MiB and a bounded old one: the spawner's every fork copies what it has touched. */
const DEFAULT_NODE_ARGS = ["--max-semi-space-size=1", "--max-old-space-size=64"];
/** A spawner that ran at least this long is replaced as soon as it dies; one that died sooner, with the next step. */
const RESTART_AFTER_MS = 1000;

interface Held {
  events: StepEvents;
  started: boolean;
  /** True while the reader holds the step's output. */
  holding: boolean;
  /**
   * Output and pipe ends received while held, handed on in order when the
   * reader lets go (and only then acknowledged, so the spawner stops reading
   * at its window): as with the daemon's own pipes, a held step's output
   * stays where it is.
   */
  queue: { kind: number; body: Buffer }[];
  /** Kept until the spawner said it is ready (see onDeath). */
  request?: LaunchRequest;
  /** The step as the daemon's own spawn runs it, when the spawner never started. */
  real?: LaunchedStep;
  /** EXIT and CLOSED frames seen: the step is forgotten after its three. */
  ends: number;
  /** The executor gave up on it: nothing more of it is handed on. */
  abandoned: boolean;
}

/** The spawner's environment: the little Node itself may want, nothing that changes what it runs. */
function spawnerEnv(): Record<string, string> {
  const env: Record<string, string> = {};
  for (const k of ["PATH", "TZ", "LANG", "LC_ALL"]) {
    const v = process.env[k];
    if (v !== undefined) env[k] = v;
  }
  return env;
}

/** One run of the spawner process. */
class Instance {
  ready = false;
  /** The process exited: no new step goes to it, though what it wrote is still being read (then `dead`). */
  exited = false;
  dead = false;
  readonly startedAt: number;
  /** Why this end killed it, said instead of the signal. */
  killedFor: string | undefined;
  /** It broke the protocol: nothing more it wrote is read. */
  violated = false;
  readonly steps = new Map<number, Held>();
  private out: Buffer[] = [];
  private corked = false;

  constructor(readonly child: ChildProcess, now: number) {
    this.startedAt = now;
  }

  /** The pipe to the spawner (its fd 3). */
  get input(): NodeJS.WritableStream & { end(): void; destroy(): void } {
    return this.child.stdio[3] as unknown as NodeJS.WritableStream & { end(): void; destroy(): void };
  }

  /** Frames are held until the spawner is ready: one that dies before READY was sent nothing. */
  write(buf: Buffer): void {
    if (this.dead) return;
    this.out.push(buf);
    if (this.corked || !this.ready) return;
    this.corked = true;
    process.nextTick(() => {
      this.corked = false;
      const bufs = this.out;
      this.out = [];
      if (this.dead || bufs.length === 0) return;
      this.input.write(bufs.length === 1 ? bufs[0]! : Buffer.concat(bufs));
    });
  }

  /** Takes back a frame held until READY (see write). */
  unwrite(buf: Buffer): void {
    this.out = this.out.filter((b) => b !== buf);
  }

  /** READY was read: what was held goes. */
  becomeReady(): void {
    this.ready = true;
    const held = this.out;
    this.out = [];
    for (const buf of held) this.write(buf);
  }
}

/** Starts steps through a spawner process; a {@link Launcher}. */
export class Spawner implements Launcher {
  private instance: Instance | undefined;
  private nextId = 1;
  private fallbackUntil = 0;
  private pingTimer: Timer | undefined;
  private pingSentAt: number | undefined;
  private stopped = false;
  private readonly nodeArgs: readonly string[];
  private readonly mainPath: string;
  private readonly pingMs: number;
  private readonly answerTimeoutMs: number;
  private readonly fallbackMs: number;
  private readonly eofWaitMs: number;
  /** Spawner processes started so far (a test and the log tell restarts by it). */
  starts = 0;

  constructor(private readonly opts: SpawnerOptions) {
    this.nodeArgs = opts.nodeArgs ?? DEFAULT_NODE_ARGS;
    this.mainPath = opts.mainPath ?? fileURLToPath(new URL("./spawner-main.js", import.meta.url));
    this.pingMs = opts.pingMs ?? 5000;
    this.answerTimeoutMs = opts.answerTimeoutMs ?? 30_000;
    this.fallbackMs = opts.fallbackMs ?? 60_000;
    this.eofWaitMs = opts.eofWaitMs ?? 5000;
  }

  /** False but while steps start in the daemon (stopped, or after a spawner that could not start). */
  get startsInCaller(): boolean {
    return this.stopped || this.opts.clock.now() < this.fallbackUntil;
  }

  /** True once a spawner runs and has said it reads requests. */
  get ready(): boolean {
    const i = this.instance;
    return i !== undefined && !i.exited && !i.dead && i.ready;
  }

  /** The running spawner's pid, if one runs. */
  get pid(): number | undefined {
    const i = this.instance;
    return i && !i.exited && !i.dead ? i.child.pid : undefined;
  }

  launch(request: LaunchRequest, events: StepEvents): LaunchedStep {
    if (this.stopped || this.opts.clock.now() < this.fallbackUntil) return directLauncher.launch(request, events);
    const inst = this.ensure();
    if (inst === undefined) return directLauncher.launch(request, events);
    const id = this.nextId;
    this.nextId = this.nextId >= 0xffff_ffff ? 1 : this.nextId + 1;
    const held: Held = { events, started: false, holding: false, queue: [], ends: 0, abandoned: false };
    // Kept until the spawner is ready, so that a spawner that never starts leaves the step to the daemon.
    if (!inst.ready) held.request = request;
    inst.steps.set(id, held);
    const { program, args, cwd, env, stdin } = request;
    const spawnFrame = jsonFrame(FrameKind.SPAWN, id, cwd === undefined ? { program, args, env } : { program, args, cwd, env }, stdin);
    inst.write(spawnFrame);
    this.armPing();
    return {
      hold: (on) => {
        if (held.real) return held.real.hold(on);
        if (held.holding === on) return;
        held.holding = on;
        if (!on) this.release(inst, id, held);
      },
      destroyOutput: () => {
        if (held.real) return held.real.destroyOutput();
        inst.write(frame(FrameKind.DESTROY, id));
      },
      abandon: () => {
        if (held.abandoned) return;
        held.abandoned = true;
        held.queue = [];
        if (held.real) return held.real.abandon();
        if (inst.steps.get(id) !== held) return;
        inst.steps.delete(id);
        // Sent after its SPAWN: a spawner that had not read the request yet reads both at once and never starts it.
        inst.write(frame(FrameKind.CANCEL, id));
      },
      withdraw: () => {
        // Not ready: the request is still held here, and the daemon would start it itself only at the spawner's death.
        if (held.real !== undefined || held.abandoned || inst.ready || inst.dead || inst.steps.get(id) !== held) return false;
        held.abandoned = true;
        inst.steps.delete(id);
        inst.unwrite(spawnFrame);
        return true;
      },
    };
  }

  /**
   * Starts the spawner now rather than with the first step: Node takes 50 ms
   * to start (seconds on a loaded machine), a wait the first task would
   * otherwise spend RUNNING with no process yet.
   */
  start(): void {
    if (!this.stopped) this.ensure();
  }

  /** Ends the spawner: its fd 3 closes and it exits; steps it still holds are lost. */
  stop(): void {
    this.stopped = true;
    this.pingTimer?.cancel();
    const inst = this.instance;
    if (inst && !inst.dead) inst.input.end();
  }

  private ensure(): Instance | undefined {
    // One that exited is not handed steps while its pipe is read to the end (up to eofWaitMs): they would be lost unrun.
    if (this.instance && !this.instance.dead && !this.instance.exited) return this.instance;
    let child: ChildProcess;
    try {
      child = spawn(process.execPath, [...this.nodeArgs, this.mainPath, String(process.pid), this.opts.processStart ?? "posix_spawn"], {
        // Frames on fds 3 and 4; its stdout is /dev/null and its stderr the daemon's log, so that nothing else written there is read as a frame.
        stdio: ["ignore", "ignore", "inherit", "pipe", "pipe"],
        // Nothing of the daemon's environment (NODE_OPTIONS could load a preload that writes or changes Node): each request carries its step's whole environment.
        env: spawnerEnv(),
        // Its own process group: a terminal's Ctrl-C reaches the daemon, which drains, not the spawner under it.
        detached: true,
      });
    } catch (err) {
      this.opts.log.error("cannot start the spawner; steps start in the daemon", { err });
      this.fallbackUntil = this.opts.clock.now() + this.fallbackMs;
      return undefined;
    }
    this.starts += 1;
    const inst = new Instance(child, this.opts.clock.now());
    this.instance = inst;
    // READY first: a spawner that writes anything else before it breaks the protocol at that frame's header, so nothing it sends before READY is kept.
    const reader = new FrameReader((kind, id, body) => this.onFrame(inst, kind, id, body), { kinds: TO_DAEMON, maxBody: MAX_BODY_TO_DAEMON, first: FrameKind.READY });
    const output = child.stdio[4]!;
    /** Armed once it exited: the end of the pipe is not waited for longer than eofWaitMs after the last read. */
    let eofWait: (() => void) | undefined;
    output.on("data", (chunk: Buffer) => {
      eofWait?.();
      if (inst.violated) return;
      try {
        reader.push(chunk);
      } catch (err) {
        this.violation(inst, err);
      }
    });
    output.on("error", () => {});
    inst.input.on("error", () => {});
    const why = (code: number | null, signal: NodeJS.Signals | null) => inst.killedFor ?? (signal ? `the spawner was killed by ${signal}` : `the spawner exited with code ${code}`);
    child.on("error", (err) => this.onDeath(inst, `the spawner could not be run: ${err.message}`));
    // Once it exited and everything it wrote was read ('close', not 'exit'): a step whose end or output was still in the pipe is not lost.
    child.on("close", (code, signal) => this.onDeath(inst, why(code, signal)));
    child.on("exit", (code, signal) => {
      inst.exited = true;
      eofWait = this.afterQuiet(() => {
        if (inst.dead) return;
        output.destroy();
        inst.input.destroy();
        this.onDeath(inst, `${why(code, signal)} (its pipe was still held open ${this.eofWaitMs / 1000} s later)`);
      });
    });
    // The daemon's exit is not held up by its spawner.
    child.unref();
    (output as unknown as { unref?: () => void }).unref?.();
    (inst.input as unknown as { unref?: () => void }).unref?.();
    return inst;
  }

  /**
   * The spawner broke the protocol: nothing it says can be trusted. It is
   * killed; its steps are lost (ended INTERRUPTED at 'close', never run again),
   * or, if it never said READY, were sent nothing and start in the daemon.
   */
  private violation(inst: Instance, err: unknown): void {
    if (inst.dead || inst.violated) return;
    inst.violated = true;
    const why = err instanceof Error ? err.message : String(err);
    inst.killedFor ??= `the spawner broke the frame protocol (${why}) and was killed`;
    this.opts.log.error("the spawner broke the frame protocol; killing it", { err: why, ready: inst.ready });
    try {
      process.kill(-inst.child.pid!, "SIGKILL");
    } catch {
      inst.child.kill("SIGKILL");
    }
  }

  private onFrame(inst: Instance, kind: number, id: number, body: Buffer): void {
    if (inst.violated) return;
    try {
      this.handle(inst, kind, id, body);
    } catch (err) {
      this.violation(inst, err);
    }
  }

  private handle(inst: Instance, kind: number, id: number, body: Buffer): void {
    if (kind === FrameKind.READY) {
      if (inst.ready) throw new Error("a second READY");
      const version = body.readUInt32BE(0);
      if (version !== PROTOCOL_VERSION) throw new Error(`protocol version ${version}, not ${PROTOCOL_VERSION}`);
      for (const held of inst.steps.values()) held.request = undefined;
      inst.becomeReady();
      return;
    }
    if (kind === FrameKind.PONG) {
      this.pingSentAt = undefined;
      return;
    }
    const held = inst.steps.get(id);
    if (held === undefined) return;
    const ev = held.events;
    switch (kind) {
      case FrameKind.SPAWNED: {
        held.started = true;
        const { pid, startTicks } = readSpawned(body);
        ev.spawned(pid, startTicks);
        break;
      }
      case FrameKind.FAILED:
        inst.steps.delete(id);
        ev.failed(JSON.parse(body.toString("utf8")) as SpawnFailure);
        break;
      case FrameKind.STDOUT:
      case FrameKind.STDERR:
      case FrameKind.CLOSED:
        if (held.holding || held.queue.length > 0) held.queue.push({ kind, body });
        else this.deliver(inst, id, held, kind, body);
        break;
      case FrameKind.EXIT: {
        // Not queued: an exit lets the reader go (what is left is read whatever the flow says).
        const { code, signal } = JSON.parse(body.toString("utf8")) as { code: number | null; signal: string | null };
        if (++held.ends === 3) inst.steps.delete(id);
        ev.exited(code, signal);
        break;
      }
    }
  }

  /** Hands on one output or pipe-end frame of a step the reader does not hold. */
  private deliver(inst: Instance, id: number, held: Held, kind: number, body: Buffer): void {
    if (kind === FrameKind.CLOSED) {
      // The spawner forgets a step once its process exited and both pipes closed; so does this end.
      if (++held.ends === 3) inst.steps.delete(id);
      held.events.closed(body.readUInt32BE(0) === 1 ? OutputStream.STDOUT : OutputStream.STDERR);
      return;
    }
    inst.write(u32Frame(FrameKind.ACK, id, body.length));
    held.events.data(kind === FrameKind.STDOUT ? OutputStream.STDOUT : OutputStream.STDERR, body);
  }

  /** The reader let go: what was queued goes on, until it holds again. */
  private release(inst: Instance, id: number, held: Held): void {
    while (!held.holding && !held.abandoned && held.queue.length > 0) {
      const { kind, body } = held.queue.shift()!;
      this.deliver(inst, id, held, kind, body);
    }
  }

  private onDeath(inst: Instance, reason: string): void {
    if (inst.dead) return;
    inst.dead = true;
    if (this.instance === inst) this.instance = undefined;
    this.pingSentAt = undefined;
    const steps = [...inst.steps.values()];
    inst.steps.clear();
    if (!inst.ready) {
      // It never read a request: nothing of these steps was started. They start in the daemon.
      this.fallbackUntil = this.opts.clock.now() + this.fallbackMs;
      this.opts.log.error("the spawner did not start; steps start in the daemon for a while", { reason, steps: steps.length, fallbackMs: this.fallbackMs });
      for (const held of steps) {
        held.real = directLauncher.launch(held.request!, held.events);
        if (held.holding) held.real.hold(true);
      }
      return;
    }
    if (steps.length > 0 || !this.stopped) this.opts.log.warn("the spawner stopped; the steps it held are lost", { reason, steps: steps.length });
    // A new one at once, unless this one died young (then with the next step: no loop of restarts).
    if (!this.stopped && this.opts.clock.now() - inst.startedAt >= RESTART_AFTER_MS) this.ensure();
    for (const held of steps) {
      // What arrived is handed on (every byte received), then the loss.
      for (const { kind, body } of held.queue) {
        if (kind === FrameKind.CLOSED) held.events.closed(body.readUInt32BE(0) === 1 ? OutputStream.STDOUT : OutputStream.STDERR);
        else held.events.data(kind === FrameKind.STDOUT ? OutputStream.STDOUT : OutputStream.STDERR, body);
      }
      held.queue = [];
      held.events.lost(reason);
    }
  }

  /** Runs fn once eofWaitMs passed without a call of the returned function, which starts the wait again. */
  private afterQuiet(fn: () => void): () => void {
    let timer: Timer | undefined;
    const arm = () => {
      timer?.cancel();
      timer = setTimeoutAfterPending(this.opts.clock, fn, this.eofWaitMs);
    };
    arm();
    return arm;
  }

  /** While steps are held, asks the spawner every pingMs; one that does not answer within answerTimeoutMs is killed. */
  private armPing(): void {
    if (this.pingTimer !== undefined) return;
    const delay = Math.min(this.pingMs, this.answerTimeoutMs);
    const due = this.opts.clock.now() + delay;
    this.pingTimer = this.opts.clock.setTimeout(() => {
      this.pingTimer = undefined;
      const inst = this.instance;
      if (inst === undefined || inst.dead || inst.exited || inst.steps.size === 0) return;
      const now = this.opts.clock.now();
      // This timer itself late: the answer may be sitting unread behind it, so the wait is not the spawner's. Ask again.
      if (now - due > delay) this.pingSentAt = undefined;
      if (this.pingSentAt !== undefined && now - this.pingSentAt >= this.answerTimeoutMs) {
        inst.killedFor = `the spawner did not answer for ${((now - this.pingSentAt) / 1000).toFixed(1)} s and was killed`;
        this.opts.log.error("the spawner stopped answering; killing it", { waitedMs: now - this.pingSentAt });
        inst.child.kill("SIGKILL");
        return;
      }
      if (this.pingSentAt === undefined) {
        this.pingSentAt = now;
        inst.write(frame(FrameKind.PING, 0));
      }
      this.armPing();
    }, delay);
  }
}
