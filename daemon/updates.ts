/**
 * A daemon's side of an update (docs/updates.md). The `update` step checks
 * a release against the release keys this daemon trusts, fetches and
 * checks its artifact, and unpacks it into its own version directory; the
 * agent then records the update in the ledger, leaves the request for the
 * supervisor (daemon/install.ts) and the process exits EXIT_UPDATE. After
 * the restart, whichever version runs settles the task from what the
 * supervisor decided: the new one once it has connected and the supervisor
 * has seen it, the old one after a rollback (marking the version bad, so
 * it is not tried again).
 */
import { execFile } from "node:child_process";
import { existsSync, readFileSync, statSync } from "node:fs";
import { mkdir, rename, rm } from "node:fs/promises";
import type { KeyObject } from "node:crypto";
import { join } from "node:path";
import { promisify } from "node:util";
import type { Database } from "lmdb";
import type { Clock } from "../common/clock.js";
import { digestOfFile } from "../common/digest.js";
import type { Logger } from "../common/logger.js";
import { verifyRelease } from "../common/release.js";
import type { SignedRelease } from "../gen/rexmesh/v1/release_pb.js";
import { installPaths, linkedVersion, readJson, removeFile, writeDurable, type InstallPaths, type Running, type UpdateRequest, type UpdateResult } from "./install.js";

const run = promisify(execFile);

/** A version this host rolled back, kept so that it is not tried again. */
export interface BadVersion {
  reason: string;
  at: number;
}

/** What the update step found: a restart into `to`, or nothing to do. */
export type Prepared = { restart: { from: string; to: string; keyId: string; digest: string } } | { already: string };

/** How a hand-over ended, for the task's final status. */
export interface Settled {
  ok: boolean;
  message: string;
}

export interface UpdaterOptions {
  /** The install root when run by `rexmesh supervise` (REXMESH_INSTALL_ROOT); without it, no update. */
  root: string | undefined;
  /** Release public keys this daemon trusts (--release-keys); none: no update. */
  releaseKeys: readonly KeyObject[];
  /** The version this process runs. */
  version: string;
  /** os-arch of this process (linux-x64). */
  platform: string;
  /** Hosts this process serves: a process serving several (--identities) is not updated by one of them. */
  hosts: number;
  /** Versions rolled back here. */
  bad: Database<BadVersion, string>;
  clock: Clock;
  log: Logger;
  /** How long a new version waits for the supervisor's word once it has said it runs. */
  verdictWaitMs?: number;
}

const VERDICT_POLL_MS = 100;

export class Updater {
  private readonly paths: InstallPaths | undefined;
  private runningWritten = false;

  constructor(private readonly opts: UpdaterOptions) {
    this.paths = opts.root ? installPaths(opts.root) : undefined;
  }

  get version(): string {
    return this.opts.version;
  }

  /** Why this daemon cannot update itself, or undefined when it can (it then reports the `update` tool). */
  unable(): string | undefined {
    if (!this.paths) return "this daemon is not run by its supervisor (rexmesh supervise --root DIR), so it cannot restart into a new version";
    if (this.opts.hosts !== 1) return `this daemon process serves ${this.opts.hosts} hosts (--identities); each host's own daemon is updated, not a shared one`;
    if (this.opts.releaseKeys.length === 0) return "this daemon trusts no release key (--release-keys), so it takes no release";
    return undefined;
  }

  /** Why this version was rolled back here, if it was. */
  badReason(version: string): BadVersion | undefined {
    return this.opts.bad.get(version);
  }

  /**
   * The update step: checks the release, fetches and checks its artifact,
   * and unpacks it into versions/<V>. Throws an Error saying why it cannot.
   */
  async prepare(signed: SignedRelease, fetch: (digest: string) => Promise<string>): Promise<Prepared> {
    const unable = this.unable();
    if (unable !== undefined) throw new Error(unable);
    const paths = this.paths!;
    const manifest = verifyRelease(signed, this.opts.releaseKeys);
    const to = manifest.version;
    if (manifest.platform !== this.opts.platform) throw new Error(`release ${to} is for ${manifest.platform}, this host is ${this.opts.platform}`);
    if (to === this.opts.version) return { already: to };
    const bad = this.badReason(to);
    if (bad) throw new Error(`version ${to} was rolled back on this host at ${new Date(bad.at).toISOString()} (${bad.reason}); it is not tried again`);
    const file = await fetch(manifest.digest);
    try {
      const size = statSync(file).size;
      if (BigInt(size) !== manifest.size) throw new Error(`release ${to}: the artifact has ${size} bytes, the signed manifest says ${manifest.size}`);
      const digest = await digestOfFile(file);
      if (digest !== manifest.digest) throw new Error(`release ${to}: the artifact hashes to ${digest}, the signed manifest says ${manifest.digest}`);
      await this.unpack(paths, file, to);
    } finally {
      await rm(file, { force: true });
    }
    return { restart: { from: this.opts.version, to, keyId: signed.keyId, digest: manifest.digest } };
  }

  /** Unpacks the artifact into versions/<to> (by way of a private directory), and checks it is that version. */
  private async unpack(paths: InstallPaths, file: string, to: string): Promise<void> {
    const target = paths.version(to);
    if (linkedVersion(paths.current) === to) throw new Error(`version ${to} is already the current link but not what runs`);
    const partial = join(paths.versions, `.${to}.partial-${process.pid}`);
    await rm(partial, { recursive: true, force: true });
    await mkdir(partial, { recursive: true, mode: 0o755 });
    try {
      // The artifact is the signed bytes; tar still keeps every member inside the directory and takes no owners.
      await run("tar", ["-xzf", file, "-C", partial, "--no-same-owner", "--no-overwrite-dir"], { timeout: 300_000, maxBuffer: 1 << 20 });
      const entry = join(partial, "bin", "rexmesh.js");
      if (!existsSync(entry)) throw new Error(`release ${to} has no bin/rexmesh.js`);
      let claimed: unknown;
      try {
        claimed = (JSON.parse(readFileSync(join(partial, "package.json"), "utf8")) as { version?: unknown }).version;
      } catch {
        throw new Error(`release ${to} has no readable package.json`);
      }
      if (claimed !== to) throw new Error(`release ${to}: its package.json says version ${JSON.stringify(claimed)}, so it would not report the version its manifest names`);
      await rm(target, { recursive: true, force: true });
      await rename(partial, target);
    } catch (err) {
      await rm(partial, { recursive: true, force: true });
      throw new Error(`unpacking release ${to}: ${err instanceof Error ? err.message.split("\n")[0] : String(err)}`);
    }
  }

  /** Leaves the hand-over for the supervisor: after this, the process exits EXIT_UPDATE. */
  request(req: UpdateRequest): void {
    writeDurable(this.paths!.request, JSON.stringify(req) + "\n");
  }

  /** The daemon is connected: tells the supervisor this version runs (once per process). */
  connected(): void {
    if (!this.paths || this.runningWritten) return;
    this.runningWritten = true;
    const running: Running = { version: this.opts.version, pid: process.pid, at: this.opts.clock.now() };
    try {
      writeDurable(this.paths.running, JSON.stringify(running) + "\n");
    } catch (err) {
      this.opts.log.error("cannot tell the supervisor this version runs", { err });
    }
  }

  /**
   * After a restart, how the update `taskId` (from → to) ended: from the
   * supervisor's result, waiting for it while this process is the new
   * version on trial. Marks a rolled-back version bad.
   */
  async settle(taskId: string, update: { from: string; to: string }, signal: AbortSignal): Promise<Settled> {
    const paths = this.paths;
    if (!paths) return { ok: false, message: `the daemon restarted without its supervisor, still at ${this.opts.version}: the update to ${update.to} did not happen` };
    const deadline = this.opts.clock.now() + (this.opts.verdictWaitMs ?? 600_000);
    for (;;) {
      const result = readJson<UpdateResult>(paths.result, ["taskId", "from", "to", "outcome"]);
      if (result?.taskId === taskId) return this.settled(result);
      const request = readJson<UpdateRequest>(paths.request, ["taskId", "from", "to"]);
      const trial = request?.taskId === taskId && this.opts.version === update.to;
      if (!trial) {
        if (request?.taskId === taskId) removeFile(paths.request);
        return { ok: false, message: `the daemon restarted at ${this.opts.version} without its supervisor switching to ${update.to} (the hand-over was lost or no supervisor ran it)` };
      }
      if (this.opts.clock.now() >= deadline) return { ok: false, message: `version ${update.to} runs, but its supervisor said nothing within ${(this.opts.verdictWaitMs ?? 600_000) / 1000}s` };
      await this.opts.clock.sleep(VERDICT_POLL_MS, signal);
    }
  }

  private async settled(result: UpdateResult): Promise<Settled> {
    if (result.outcome === "updated") {
      if (result.to === this.opts.version) return { ok: true, message: `updated from ${result.from} to ${result.to}` };
      return { ok: false, message: `the supervisor reported ${result.to} up, but this daemon runs ${this.opts.version}` };
    }
    const reason = result.reason ?? "no reason given";
    await this.opts.bad.put(result.to, { reason, at: result.at });
    return { ok: false, message: `rolled back to ${this.opts.version}: ${reason}; version ${result.to} is marked bad on this host` };
  }

  /** The settled task's end is stored: the supervisor's result for it is no longer needed. */
  forget(taskId: string): void {
    if (!this.paths) return;
    const result = readJson<UpdateResult>(this.paths.result, ["taskId"]);
    if (result?.taskId === taskId) removeFile(this.paths.result);
  }
}
