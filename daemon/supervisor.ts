/**
 * `rexmesh supervise`: the small launcher that runs a daemon from an
 * install root and carries out its updates (docs/updates.md, the file
 * protocol in daemon/install.ts). It starts `current/bin/rexmesh.js daemon
 * ARGS`; when the daemon exits having left an update request, it switches
 * `current` to the new version and starts it; if the new version does not
 * say it runs (connected to a proxy) within the health timeout, or exits
 * first, it is stopped, `current` is switched back, and the result says
 * why. Either way the result is written before the next daemon starts, so
 * the daemon that runs then reports the update task's end. A daemon that
 * exits for any other reason is started again after a backoff.
 *
 * The supervisor loads no mesh code beyond this file and install.ts, keeps
 * no state but the files, and acts on a request left before it started
 * (a crash or reboot in the middle of an update), so it needs no updating
 * itself in step with the daemon.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, readdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { EXIT_UPDATE, HEALTH_TIMEOUT_ENV, INSTALL_ROOT_ENV, installPaths, linkedVersion, readJson, removeFile, switchLink, writeDurable, type InstallPaths, type ProbationRollback, type Running, type UpdateRequest, type UpdateResult } from "./install.js";

export interface SupervisorOptions {
  root: string;
  /** Arguments after `daemon`. */
  args: string[];
  /** How long a new version has to say it runs. */
  healthTimeoutMs: number;
  /** Time between SIGTERM and SIGKILL when a version on trial is stopped. */
  killGraceMs?: number;
  /** After an update, exits of the new version within this window count towards switching back (default 10 min). */
  probationMs?: number;
  /** Lines for the supervisor's log (stderr). */
  log: (line: string) => void;
  /** The node binary that runs the daemon. */
  node?: string;
}

const POLL_MS = 100;
const RESTART_BACKOFF_MS = [1_000, 2_000, 5_000, 10_000, 30_000];
/** A daemon up this long has its crash backoff reset. */
const STEADY_MS = 60_000;
/** Exits of a newly updated version within its probation window that switch back to the version before. */
const PROBATION_CRASHES = 3;

export class Supervisor {
  private readonly paths: InstallPaths;
  private child: ChildProcess | undefined;
  private stopping: NodeJS.Signals | undefined;
  private crashes = 0;
  /** The version last updated to, while a crash loop still switches back to the one before. */
  private probation: { version: string; previous: string; until: number; crashes: number } | undefined;
  private readonly probationMs: number;
  /** Ends the wait before a restart early (a stop). */
  private wake: (() => void) | undefined;

  constructor(private readonly opts: SupervisorOptions) {
    this.paths = installPaths(opts.root);
    this.probationMs = opts.probationMs ?? 10 * 60_000;
  }

  /** Runs until a signal stops it; resolves to the exit code for the supervisor's own process. */
  async run(): Promise<number> {
    if (linkedVersion(this.paths.current) === undefined) throw new Error(`${this.paths.current} is not a link to versions/<version>: install a version first (docs/updates.md)`);
    const onSignal = (signal: NodeJS.Signals) => this.stop(signal);
    process.on("SIGTERM", onSignal);
    process.on("SIGINT", onSignal);
    try {
      let child: ChildProcess | undefined;
      for (;;) {
        const request = readJson<UpdateRequest>(this.paths.request, ["taskId", "from", "to"]);
        if (request && !this.stopping) child = await this.trial(request);
        if (this.stopping && !child) return 0;
        child ??= this.start();
        const started = Date.now();
        const exit = await exited(child);
        child = undefined;
        if (this.stopping) return exit.code ?? 0;
        if (readJson<UpdateRequest>(this.paths.request, ["taskId", "from", "to"])) continue;
        if (exit.code === EXIT_UPDATE) this.opts.log(`the daemon exited for an update but left no request; starting it again`);
        else if (this.probationFailed(exit)) continue;
        this.crashes = Date.now() - started > STEADY_MS ? 1 : this.crashes + 1;
        const wait = RESTART_BACKOFF_MS[Math.min(this.crashes - 1, RESTART_BACKOFF_MS.length - 1)]!;
        this.opts.log(`the daemon exited (${exit.signal ?? `code ${exit.code}`}); starting it again in ${wait / 1000}s`);
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, wait);
          this.wake = () => (clearTimeout(timer), resolve());
        });
        this.wake = undefined;
      }
    } finally {
      process.off("SIGTERM", onSignal);
      process.off("SIGINT", onSignal);
    }
  }

  /**
   * Switches to the requested version and waits for it to say it runs;
   * switches back to the version it came from if it does not. Ends with the
   * result written and the request removed; the version then current runs.
   */
  private async trial(request: UpdateRequest): Promise<ChildProcess | undefined> {
    const { paths } = this;
    // What runs now stays `current` until the new version is up: a supervisor that dies mid-trial (a kill, a power
    // cut) is started again from it, finds the request and tries again; it never comes back up in an untried version.
    const running = linkedVersion(paths.current);
    const finish = (outcome: UpdateResult["outcome"], reason?: string) => {
      const result: UpdateResult = { taskId: request.taskId, from: request.from, to: request.to, outcome, ...(reason ? { reason } : {}), at: Date.now() };
      writeDurable(paths.result, JSON.stringify(result) + "\n");
      removeFile(paths.request);
      this.opts.log(`update ${request.from} → ${request.to}: ${outcome}${reason ? ` (${reason})` : ""}`);
    };
    if (!existsSync(join(paths.version(request.to), "bin", "rexmesh.js"))) {
      finish("rolled-back", `versions/${request.to} is missing or incomplete`);
      return undefined;
    }
    this.opts.log(`trying ${request.to} (current stays ${running} until it connects, within ${this.opts.healthTimeoutMs / 1000}s)`);
    removeFile(paths.running);
    const child = this.start(request.to);
    const up = await this.waitRunning(child, request.to);
    if (up === true) {
      if (running !== undefined && running !== request.to) switchLink(paths, paths.previous, running);
      switchLink(paths, paths.current, request.to);
      finish("updated");
      this.probation = running !== undefined && running !== request.to ? { version: request.to, previous: running, until: Date.now() + this.probationMs, crashes: 0 } : undefined;
      this.prune();
      return child;
    }
    await this.stopChild(child);
    // Stopped mid-trial: the request stays, and the next start tries again.
    if (this.stopping) return undefined;
    finish("rolled-back", up);
    this.prune();
    return undefined;
  }

  /**
   * The version updated to exited on its own: counted while on probation;
   * the third exit within the probation window switches back to the
   * version before it (the old daemon marks it bad). True when it did.
   */
  private probationFailed(exit: { code: number | null; signal: NodeJS.Signals | null }): boolean {
    const p = this.probation;
    if (!p || Date.now() > p.until || linkedVersion(this.paths.current) !== p.version) {
      this.probation = undefined;
      return false;
    }
    p.crashes += 1;
    if (p.crashes < PROBATION_CRASHES) return false;
    this.probation = undefined;
    if (!existsSync(join(this.paths.version(p.previous), "bin", "rexmesh.js"))) return false;
    const reason = `version ${p.version} exited ${PROBATION_CRASHES} times within ${this.probationMs / 60_000} minutes of its update (last: ${exit.signal ?? `code ${exit.code}`})`;
    const record: ProbationRollback = { version: p.version, previous: p.previous, reason, at: Date.now() };
    writeDurable(this.paths.probation, JSON.stringify(record) + "\n");
    switchLink(this.paths, this.paths.current, p.previous);
    this.opts.log(`rolled back to ${p.previous}: ${reason}`);
    return true;
  }

  /** Stops the daemon with `signal` and then the supervisor (run() resolves to the daemon's exit code). */
  stop(signal: NodeJS.Signals = "SIGTERM"): void {
    this.stopping = signal;
    this.child?.kill(signal);
    this.wake?.();
  }

  /** True once `version` says it runs from this child; otherwise why not (timeout, exit, a signal to stop). */
  private async waitRunning(child: ChildProcess, version: string): Promise<true | string> {
    const deadline = Date.now() + this.opts.healthTimeoutMs;
    for (;;) {
      const running = readJson<Running>(this.paths.running, ["version"]);
      if (running?.version === version && running.pid === child.pid) return true;
      if (child.exitCode !== null || child.signalCode !== null) return `version ${version} exited (${child.signalCode ?? `code ${child.exitCode}`}) before it connected`;
      if (this.stopping) return `the supervisor was stopped (${this.stopping}) before version ${version} connected`;
      if (Date.now() >= deadline) return `version ${version} did not connect and report within ${this.opts.healthTimeoutMs / 1000}s`;
      await sleep(POLL_MS);
    }
  }

  /** Starts the daemon of `version` (on trial), or of `current`. */
  private start(version?: string): ChildProcess {
    const entry = join(version === undefined ? this.paths.current : this.paths.version(version), "bin", "rexmesh.js");
    const child = spawn(this.opts.node ?? process.execPath, [entry, "daemon", ...this.opts.args], {
      stdio: "inherit",
      env: { ...process.env, [INSTALL_ROOT_ENV]: this.paths.root, [HEALTH_TIMEOUT_ENV]: String(this.opts.healthTimeoutMs) },
    });
    this.child = child;
    return child;
  }

  private async stopChild(child: ChildProcess): Promise<void> {
    if (child.exitCode !== null || child.signalCode !== null) return;
    const done = exited(child);
    child.kill("SIGTERM");
    const timer = setTimeout(() => child.kill("SIGKILL"), this.opts.killGraceMs ?? 5_000);
    await done;
    clearTimeout(timer);
  }

  /** Removes version directories neither current nor previous names (and partial unpacks). */
  private prune(): void {
    const keep = new Set([linkedVersion(this.paths.current), linkedVersion(this.paths.previous)]);
    for (const name of readdirSync(this.paths.versions)) {
      // A dot name is a daemon's unpack in progress (daemon/updates.ts): it cleans up its own.
      if (keep.has(name) || name.startsWith(".")) continue;
      rmSync(join(this.paths.versions, name), { recursive: true, force: true });
    }
  }
}

function exited(child: ChildProcess): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve({ code: child.exitCode, signal: child.signalCode });
  return new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
