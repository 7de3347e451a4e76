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
import { EXIT_UPDATE, INSTALL_ROOT_ENV, installPaths, linkedVersion, readJson, removeFile, switchLink, writeDurable, type InstallPaths, type Running, type UpdateRequest, type UpdateResult } from "./install.js";

export interface SupervisorOptions {
  root: string;
  /** Arguments after `daemon`. */
  args: string[];
  /** How long a new version has to say it runs. */
  healthTimeoutMs: number;
  /** Time between SIGTERM and SIGKILL when a version on trial is stopped. */
  killGraceMs?: number;
  /** Lines for the supervisor's log (stderr). */
  log: (line: string) => void;
  /** The node binary that runs the daemon. */
  node?: string;
}

const POLL_MS = 100;
const RESTART_BACKOFF_MS = [1_000, 2_000, 5_000, 10_000, 30_000];
/** A daemon up this long has its crash backoff reset. */
const STEADY_MS = 60_000;

export class Supervisor {
  private readonly paths: InstallPaths;
  private child: ChildProcess | undefined;
  private stopping: NodeJS.Signals | undefined;
  private crashes = 0;
  /** Ends the wait before a restart early (a stop). */
  private wake: (() => void) | undefined;

  constructor(private readonly opts: SupervisorOptions) {
    this.paths = installPaths(opts.root);
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
    const finish = (outcome: UpdateResult["outcome"], reason?: string) => {
      const result: UpdateResult = { taskId: request.taskId, from: request.from, to: request.to, outcome, ...(reason ? { reason } : {}), at: Date.now() };
      writeDurable(paths.result, JSON.stringify(result) + "\n");
      removeFile(paths.request);
      this.opts.log(`update ${request.from} → ${request.to}: ${outcome}${reason ? ` (${reason})` : ""}`);
    };
    const fallback = existsSync(join(paths.version(request.from), "bin", "rexmesh.js"));
    if (!existsSync(join(paths.version(request.to), "bin", "rexmesh.js"))) {
      if (fallback) switchLink(paths, paths.current, request.from);
      finish("rolled-back", `versions/${request.to} is missing or incomplete`);
      return undefined;
    }
    // Nothing to fall back to would leave no daemon after a rollback: the new version then runs regardless.
    if (!fallback) this.opts.log(`versions/${request.from} is gone; ${request.to} runs without a version to fall back to`);
    this.opts.log(`switching ${request.from} → ${request.to}; it has ${this.opts.healthTimeoutMs / 1000}s to connect`);
    removeFile(paths.running);
    switchLink(paths, paths.current, request.to);
    const child = this.start();
    const up = await this.waitRunning(child, request.to);
    if (up === true || !fallback) {
      switchLink(paths, paths.previous, request.from);
      finish(up === true ? "updated" : "rolled-back", up === true ? undefined : `${up}, and versions/${request.from} is gone`);
      this.prune();
      return child;
    }
    await this.stopChild(child);
    switchLink(paths, paths.current, request.from);
    // Stopped mid-trial: the request stays, and the next start tries again from the version it came from.
    if (this.stopping) return undefined;
    finish("rolled-back", up);
    // The version rolled back is marked bad by the daemon: its directory is not needed again.
    this.prune();
    return undefined;
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

  private start(): ChildProcess {
    const entry = join(this.paths.current, "bin", "rexmesh.js");
    const child = spawn(this.opts.node ?? process.execPath, [entry, "daemon", ...this.opts.args], {
      stdio: "inherit",
      env: { ...process.env, [INSTALL_ROOT_ENV]: this.paths.root },
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
      if (keep.has(name)) continue;
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
