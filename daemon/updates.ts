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
import { existsSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { chmod, mkdir, mkdtemp, open, readdir, rename, rm } from "node:fs/promises";
import type { KeyObject } from "node:crypto";
import { join } from "node:path";
import { promisify } from "node:util";
import type { Database } from "lmdb";
import type { Clock } from "../common/clock.js";
import { digestOfFile } from "../common/digest.js";
import type { Logger } from "../common/logger.js";
import { verifyRelease } from "../common/release.js";
import { ReleaseManifestSchema, type ReleaseManifest, type SignedRelease } from "../gen/rexmesh/v1/release_pb.js";
import { fromBinary } from "@bufbuild/protobuf";
import { installPaths, linkedVersion, readJson, removeFile, writeDurable, type InstallPaths, type ProbationRollback, type Running, type UpdateRequest, type UpdateResult } from "./install.js";

const run = promisify(execFile);

/** A version this host rolled back, kept so that it is not tried again. */
export interface BadVersion {
  reason: string;
  at: number;
}

/** What an update step allows beyond the defaults (UpdateTool). */
export interface UpdateOptions {
  retryRolledBack: boolean;
  allowDowngrade: boolean;
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
  /** The version an update step is preparing or has handed over (one at a time). */
  private inProgress: string | undefined;

  constructor(private readonly opts: UpdaterOptions) {
    this.paths = opts.root ? installPaths(opts.root) : undefined;
    // Unpacks a crash cut short (no update is under way in a process that is starting).
    if (this.paths && existsSync(this.paths.versions)) {
      for (const name of readdirSync(this.paths.versions)) if (name.startsWith(".") && name.includes(".partial-")) rmSync(join(this.paths.versions, name), { recursive: true, force: true });
    }
  }

  /**
   * At start: a version the supervisor switched back from because it
   * crash-looped after its update (daemon/supervisor.ts, probation) is
   * marked bad here, as a rollback at the trial would be.
   */
  async checkProbation(): Promise<void> {
    if (!this.paths) return;
    const back = readJson<ProbationRollback>(this.paths.probation, ["version", "reason"]);
    if (!back) return;
    if (back.version !== this.opts.version) {
      await this.opts.bad.put(back.version, { reason: back.reason, at: back.at });
      this.opts.log.warn("the supervisor switched back from a version that kept exiting after its update; it is marked bad", { version: back.version, reason: back.reason });
    }
    removeFile(this.paths.probation);
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
  async prepare(releases: readonly SignedRelease[], options: UpdateOptions, fetch: (digest: string, maxBytes: number) => Promise<string>): Promise<Prepared> {
    const unable = this.unable();
    if (unable !== undefined) throw new Error(unable);
    const paths = this.paths!;
    // The one for this platform (as its manifest says; the signature is checked next, on the one chosen).
    const platformOf = (r: SignedRelease) => {
      try {
        return fromBinary(ReleaseManifestSchema, r.manifest).platform;
      } catch {
        return "?";
      }
    };
    const signed = releases.find((r) => platformOf(r) === this.opts.platform);
    if (!signed) throw new Error(`no release for ${this.opts.platform} in the update (it has ${releases.map(platformOf).join(", ") || "none"})`);
    const manifest = verifyRelease(signed, this.opts.releaseKeys);
    const to = manifest.version;
    if (manifest.platform !== this.opts.platform) throw new Error(`release ${to} is for ${manifest.platform}, this host is ${this.opts.platform}`);
    if (to === this.opts.version) return { already: to };
    if (!options.allowDowngrade && compareVersions(to, this.opts.version) < 0) throw new Error(`release ${to} is older than the version running, ${this.opts.version} (rexmesh update --allow-downgrade to take it)`);
    const bad = this.badReason(to);
    if (bad && !options.retryRolledBack) throw new Error(`version ${to} was rolled back on this host at ${new Date(bad.at).toISOString()} (${bad.reason}); it is not tried again (rexmesh update --retry-rolled-back to try it)`);
    // One update at a time: a second would race the first's unpack and hand-over.
    if (this.inProgress !== undefined) throw new Error(`an update to ${this.inProgress} is already under way on this host`);
    this.inProgress = to;
    let handedOver = false;
    try {
      const prepared = await this.fetchAndUnpack(paths, manifest, fetch);
      handedOver = true;
      return { restart: { from: this.opts.version, to, keyId: signed.keyId, digest: prepared } };
    } finally {
      if (!handedOver) this.inProgress = undefined;
    }
  }

  /** An update that was prepared did not go ahead (its hand-over failed): another may start. */
  abandoned(): void {
    this.inProgress = undefined;
  }

  /** Fetches the artifact (no more bytes than the manifest names), checks it and unpacks it; its digest. */
  private async fetchAndUnpack(paths: InstallPaths, manifest: ReleaseManifest, fetch: (digest: string, maxBytes: number) => Promise<string>): Promise<string> {
    const to = manifest.version;
    const file = await fetch(manifest.digest, Number(manifest.size));
    try {
      const size = statSync(file).size;
      if (BigInt(size) !== manifest.size) throw new Error(`release ${to}: the artifact has ${size} bytes, the signed manifest says ${manifest.size}`);
      const digest = await digestOfFile(file);
      if (digest !== manifest.digest) throw new Error(`release ${to}: the artifact hashes to ${digest}, the signed manifest says ${manifest.digest}`);
      await this.unpack(paths, file, to);
    } finally {
      await rm(file, { force: true });
    }
    return manifest.digest;
  }

  /** Unpacks the artifact into versions/<to> (by way of a private directory), and checks it is that version. */
  private async unpack(paths: InstallPaths, file: string, to: string): Promise<void> {
    const target = paths.version(to);
    if (linkedVersion(paths.current) === to) throw new Error(`version ${to} is already the current link but not what runs`);
    await mkdir(paths.versions, { recursive: true, mode: 0o755 });
    const partial = await mkdtemp(join(paths.versions, `.${to}.partial-`));
    await chmod(partial, 0o755);
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
      // On disk before anything names it: a power cut after the request must not leave `current` on empty files.
      await syncTree(partial);
      await rm(target, { recursive: true, force: true });
      await rename(partial, target);
      await syncTree(paths.versions, false);
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
      // The request before the result: the supervisor writes the result, then removes the request, so a request
      // seen gone means a result that is there to read (below), never a hand-over lost between two reads.
      const request = readJson<UpdateRequest>(paths.request, ["taskId", "from", "to"]);
      const result = readJson<UpdateResult>(paths.result, ["taskId", "from", "to", "outcome"]);
      if (result?.taskId === taskId) return this.settled(result);
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

/** fsyncs every file and directory under `dir` (or only `dir` itself), so that what a rename makes visible is on disk. */
async function syncTree(dir: string, deep = true): Promise<void> {
  if (deep) {
    for (const entry of await readdir(dir, { withFileTypes: true })) {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) await syncTree(path);
      else if (entry.isFile()) await syncOne(path);
    }
  }
  await syncOne(dir);
}

async function syncOne(path: string): Promise<void> {
  const fh = await open(path, "r");
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Orders two versions as semver does for what releases use: numeric
 * dot-separated parts first, then a release above its pre-releases, then
 * pre-release parts (numbers below words); build metadata (+...) ignored.
 */
export function compareVersions(a: string, b: string): number {
  const split = (v: string) => {
    const [core = "", pre] = v.split("+")[0]!.split(/-(.*)/s, 2);
    return { core: core.split("."), pre: pre === undefined ? undefined : pre.split(".") };
  };
  const part = (x: string | undefined, y: string | undefined): number => {
    if (x === y) return 0;
    if (x === undefined) return -1;
    if (y === undefined) return 1;
    const nx = /^\d+$/.test(x), ny = /^\d+$/.test(y);
    if (nx && ny) return Math.sign(Number(x) - Number(y));
    if (nx !== ny) return nx ? -1 : 1;
    return x < y ? -1 : 1;
  };
  const va = split(a), vb = split(b);
  for (let i = 0; i < Math.max(va.core.length, vb.core.length); i++) {
    const c = part(va.core[i] ?? "0", vb.core[i] ?? "0");
    if (c !== 0) return c;
  }
  if (va.pre === undefined || vb.pre === undefined) return va.pre === vb.pre ? 0 : va.pre === undefined ? 1 : -1;
  for (let i = 0; i < Math.max(va.pre.length, vb.pre.length); i++) {
    const c = part(va.pre[i], vb.pre[i]);
    if (c !== 0) return c;
  }
  return 0;
}
