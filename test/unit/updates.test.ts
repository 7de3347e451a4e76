/**
 * The two halves of an update on a host (docs/updates.md): the daemon's
 * Updater (checks a release, unpacks it, settles the task after the
 * restart) and the supervisor (switches, waits, rolls back), with real
 * files, real tar, real child processes and a real LMDB.
 */
import { execFileSync } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readlinkSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { systemClock } from "../../common/clock.js";
import { LmdbEnv } from "../../common/lmdb.js";
import { silentLogger } from "../../common/logger.js";
import { newReleaseKeyPair, parseReleaseKeys, signRelease } from "../../common/release.js";
import { EXIT_UPDATE, installPaths, readJson, writeDurable, type ProbationRollback, type UpdateResult } from "../../daemon/install.js";
import { Supervisor } from "../../daemon/supervisor.js";
import { compareVersions, Updater, type BadVersion } from "../../daemon/updates.js";
import { Executor } from "../../daemon/executor.js";
import { create } from "@bufbuild/protobuf";
import { StepSchema, TaskSpecSchema, TaskState } from "../../gen/rexmesh/v1/task_pb.js";

const base = mkdtempSync(join(tmpdir(), "rexmesh-updates-unit-"));
let n = 0;
const fresh = (what: string) => {
  const dir = join(base, `${what}-${++n}`);
  mkdirSync(dir, { recursive: true });
  return dir;
};
const envs: LmdbEnv[] = [];
afterAll(async () => {
  for (const e of envs) await e.close();
});

const PLATFORM = `${process.platform}-${process.arch}`;
const DEFAULTS = { retryRolledBack: false, allowDowngrade: false };

/** A release artifact: a .tar.gz with bin/rexmesh.js and a package.json saying `claims`. */
function artifact(claims: string, withEntry = true): string {
  const dir = fresh("stage");
  if (withEntry) {
    mkdirSync(join(dir, "bin"));
    writeFileSync(join(dir, "bin", "rexmesh.js"), "// a daemon\n");
  }
  writeFileSync(join(dir, "package.json"), JSON.stringify({ name: "rexmesh", version: claims }));
  const out = join(fresh("art"), "release.tar.gz");
  execFileSync("tar", ["-czf", out, "-C", dir, "."]);
  return out;
}

function updater(opts: { root?: string | null; keys?: string[]; version?: string; hosts?: number; verdictWaitMs?: number } = {}) {
  const env = new LmdbEnv({ path: fresh("lmdb"), maxBytes: 1 << 24 });
  envs.push(env);
  const root = opts.root === null ? undefined : (opts.root ?? fresh("root"));
  return new Updater({
    root,
    releaseKeys: (opts.keys ?? []).flatMap((k) => parseReleaseKeys(k)),
    version: opts.version ?? "1.0.0",
    platform: PLATFORM,
    hosts: opts.hosts ?? 1,
    bad: env.db<BadVersion>("bad"),
    clock: systemClock,
    log: silentLogger,
    verdictWaitMs: opts.verdictWaitMs,
  });
}

/** A fetch that hands over a private copy of `file` (the updater removes what it is given). */
const serving = (file: string) => async () => {
  const copy = join(fresh("fetched"), "a");
  copyFileSync(file, copy);
  return copy;
};

describe("Updater.prepare: what a host takes", () => {
  const key = newReleaseKeyPair();
  const other = newReleaseKeyPair();
  const file = artifact("2.0.0");
  const signed = signRelease(readFileSync(file), "2.0.0", PLATFORM, key.privatePem, Date.now());

  it("unpacks a release signed by a trusted key into versions/<V> and asks for the restart", async () => {
    const root = fresh("root");
    const u = updater({ root, keys: [key.publicPem] });
    const got = await u.prepare([signed], DEFAULTS, serving(file));
    expect(got).toEqual({ restart: { from: "1.0.0", to: "2.0.0", keyId: key.keyId, digest: expect.stringMatching(/^sha256:[0-9a-f]{64}$/) } });
    expect(existsSync(join(root, "versions", "2.0.0", "bin", "rexmesh.js"))).toBe(true);
  });

  it("refuses without a supervisor, in a process of several hosts, and without release keys", async () => {
    await expect(updater({ root: null, keys: [key.publicPem] }).prepare([signed], DEFAULTS, serving(file))).rejects.toThrow(/not run by its supervisor/);
    await expect(updater({ hosts: 3, keys: [key.publicPem] }).prepare([signed], DEFAULTS, serving(file))).rejects.toThrow(/serves 3 hosts/);
    await expect(updater({ keys: [] }).prepare([signed], DEFAULTS, serving(file))).rejects.toThrow(/trusts no release key/);
  });

  it("refuses a key it does not trust and a signature that does not hold, before fetching anything", async () => {
    let fetched = 0;
    const counting = async () => (fetched++, serving(file)());
    await expect(updater({ keys: [other.publicPem] }).prepare([signed], DEFAULTS, counting)).rejects.toThrow(/does not trust/);
    const altered = { ...signed, signature: Uint8Array.from(signed.signature, (b, i) => (i === 0 ? b ^ 1 : b)) };
    await expect(updater({ keys: [key.publicPem] }).prepare([altered], DEFAULTS, counting)).rejects.toThrow(/signature does not hold/);
    expect(fetched).toBe(0);
  });

  it("refuses an artifact whose digest or size is not the manifest's, and leaves no version behind", async () => {
    const root = fresh("root");
    const u = updater({ root, keys: [key.publicPem] });
    const sameSize = join(fresh("evil"), "a");
    const bytes = readFileSync(file);
    bytes[bytes.length - 1]! ^= 0xff;
    writeFileSync(sameSize, bytes);
    await expect(u.prepare([signed], DEFAULTS, serving(sameSize))).rejects.toThrow(/hashes to sha256:[0-9a-f]{64}, the signed manifest says/);
    const longer = join(fresh("evil"), "b");
    writeFileSync(longer, Buffer.concat([readFileSync(file), Buffer.from("x")]));
    await expect(u.prepare([signed], DEFAULTS, serving(longer))).rejects.toThrow(/has \d+ bytes, the signed manifest says/);
    expect(existsSync(join(root, "versions", "2.0.0"))).toBe(false);
  });

  it("refuses another platform, a release whose package.json claims another version, and one with no entry point", async () => {
    const u = updater({ keys: [key.publicPem] });
    const arm = signRelease(readFileSync(file), "2.0.0", "plan9-mips", key.privatePem, Date.now());
    await expect(u.prepare([arm], DEFAULTS, serving(file))).rejects.toThrow("no release for " + PLATFORM + " in the update (it has plan9-mips)");
    const liar = artifact("9.9.9");
    await expect(u.prepare([signRelease(readFileSync(liar), "2.0.0", PLATFORM, key.privatePem, Date.now())], DEFAULTS, serving(liar))).rejects.toThrow(/package.json says version "9.9.9"/);
    const empty = artifact("2.0.0", false);
    await expect(u.prepare([signRelease(readFileSync(empty), "2.0.0", PLATFORM, key.privatePem, Date.now())], DEFAULTS, serving(empty))).rejects.toThrow(/no bin\/rexmesh.js/);
  });

  it("does nothing for the version it runs, and never retries a version rolled back here", async () => {
    const root = fresh("root");
    expect(await updater({ root, keys: [key.publicPem], version: "2.0.0" }).prepare([signed], DEFAULTS, serving(file))).toEqual({ already: "2.0.0" });
    const u = updater({ root, keys: [key.publicPem] });
    writeDurable(installPaths(root).result, JSON.stringify({ taskId: "t1", from: "1.0.0", to: "2.0.0", outcome: "rolled-back", reason: "it crashed", at: 5 } satisfies UpdateResult));
    expect(await u.settle("t1", { from: "1.0.0", to: "2.0.0" }, new AbortController().signal)).toEqual({ ok: false, message: "rolled back to 1.0.0: it crashed; version 2.0.0 is marked bad on this host" });
    await expect(u.prepare([signed], DEFAULTS, serving(file))).rejects.toThrow("version 2.0.0 was rolled back on this host at 1970-01-01T00:00:00.005Z (it crashed); it is not tried again");
  });
});

describe("Updater: one update at a time, no silent downgrade, retrying a rolled-back version on request", () => {
  const key = newReleaseKeyPair();
  const sign = (version: string, file: string) => signRelease(readFileSync(file), version, PLATFORM, key.privatePem, Date.now());

  it("refuses a second update while one is under way, and takes one again after the first was abandoned", async () => {
    const file = artifact("2.0.0");
    const u = updater({ keys: [key.publicPem] });
    let release!: () => void;
    const slow = async () => {
      await new Promise<void>((r) => (release = r));
      return serving(file)();
    };
    const first = u.prepare([sign("2.0.0", file)], DEFAULTS, slow);
    await new Promise((r) => setTimeout(r, 20));
    await expect(u.prepare([sign("2.0.0", file)], DEFAULTS, serving(file))).rejects.toThrow("an update to 2.0.0 is already under way on this host");
    release();
    expect(await first).toHaveProperty("restart");
    await expect(u.prepare([sign("2.0.0", file)], DEFAULTS, serving(file))).rejects.toThrow(/already under way/);
    u.abandoned();
    expect(await u.prepare([sign("2.0.0", file)], DEFAULTS, serving(file))).toHaveProperty("restart");
  });

  it("refuses an older release unless allowed, and a rolled-back one unless retried", async () => {
    const old = artifact("0.9.0");
    const u = updater({ keys: [key.publicPem], version: "1.0.0" });
    await expect(u.prepare([sign("0.9.0", old)], DEFAULTS, serving(old))).rejects.toThrow("release 0.9.0 is older than the version running, 1.0.0 (rexmesh update --allow-downgrade to take it)");
    expect(await u.prepare([sign("0.9.0", old)], { ...DEFAULTS, allowDowngrade: true }, serving(old))).toHaveProperty("restart");
    const root = fresh("root");
    const v = updater({ root, keys: [key.publicPem], version: "1.0.0" });
    writeDurable(installPaths(root).result, JSON.stringify({ taskId: "t1", from: "1.0.0", to: "2.0.0", outcome: "rolled-back", reason: "the proxy was away", at: 5 } satisfies UpdateResult));
    await v.settle("t1", { from: "1.0.0", to: "2.0.0" }, new AbortController().signal);
    const file = artifact("2.0.0");
    await expect(v.prepare([sign("2.0.0", file)], DEFAULTS, serving(file))).rejects.toThrow(/not tried again \(rexmesh update --retry-rolled-back to try it\)/);
    expect(await v.prepare([sign("2.0.0", file)], { ...DEFAULTS, retryRolledBack: true }, serving(file))).toHaveProperty("restart");
  });

  it("orders versions as semver does", () => {
    const ordered = ["0.9.0", "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta.2", "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.2.0", "1.10.0", "2.0.0"];
    for (let i = 0; i < ordered.length; i++) {
      for (let j = 0; j < ordered.length; j++) expect(Math.sign(compareVersions(ordered[i]!, ordered[j]!)), `${ordered[i]} vs ${ordered[j]}`).toBe(Math.sign(i - j));
    }
    expect(compareVersions("1.0.0+build.5", "1.0.0")).toBe(0);
  });
});

describe("Updater.settle: the task's end after the restart", () => {
  const never = new AbortController().signal;

  it("the new version waits for the supervisor's word, then reports the update", async () => {
    const root = fresh("root");
    const paths = installPaths(root);
    writeDurable(paths.request, JSON.stringify({ taskId: "t1", hostId: "h", from: "1.0.0", to: "2.0.0", at: 1 }));
    const u = updater({ root, version: "2.0.0" });
    let settled: unknown;
    const p = u.settle("t1", { from: "1.0.0", to: "2.0.0" }, never).then((s) => (settled = s));
    await new Promise((r) => setTimeout(r, 300));
    expect(settled).toBeUndefined();
    writeDurable(paths.result, JSON.stringify({ taskId: "t1", from: "1.0.0", to: "2.0.0", outcome: "updated", at: 2 }));
    await p;
    expect(settled).toEqual({ ok: true, message: "updated from 1.0.0 to 2.0.0" });
    u.forget("t1");
    expect(existsSync(paths.result)).toBe(false);
  });

  it("a hand-over that never reached the supervisor, or no word within the bound, ends FAILED saying which", async () => {
    const lost = updater({ version: "1.0.0" });
    expect((await lost.settle("t1", { from: "1.0.0", to: "2.0.0" }, never)).message).toMatch(/without its supervisor switching to 2.0.0/);
    const root = fresh("root");
    writeDurable(installPaths(root).request, JSON.stringify({ taskId: "t1", hostId: "h", from: "1.0.0", to: "2.0.0", at: 1 }));
    const silent = updater({ root, version: "2.0.0", verdictWaitMs: 200 });
    expect(await silent.settle("t1", { from: "1.0.0", to: "2.0.0" }, never)).toEqual({ ok: false, message: "version 2.0.0 runs, but its supervisor said nothing within 0.2s" });
    const result = updater({ root, version: "3.0.0" });
    writeDurable(installPaths(root).result, JSON.stringify({ taskId: "t1", from: "1.0.0", to: "2.0.0", outcome: "updated", at: 2 }));
    expect((await result.settle("t1", { from: "1.0.0", to: "2.0.0" }, never)).message).toBe("the supervisor reported 2.0.0 up, but this daemon runs 3.0.0");
  });
});

/**
 * A version of a stand-in daemon: `ok` says it runs (running.json) as a
 * connected daemon does; `exit` exits 3 at once; `hang` never says it runs;
 * `update:V` asks for an update to V (request, then EXIT_UPDATE) once it runs.
 */
function installVersion(root: string, version: string, mode: "ok" | "exit" | "hang" | "crash-after" | `update:${string}`): void {
  const dir = join(root, "versions", version, "bin");
  mkdirSync(dir, { recursive: true });
  writeFileSync(
    join(dir, "rexmesh.js"),
    `const fs = require("fs"), path = require("path");
const root = process.env.REXMESH_INSTALL_ROOT, mode = ${JSON.stringify(mode)};
if (mode === "exit") process.exit(3);
process.on("SIGTERM", () => process.exit(0));
setInterval(() => {}, 1000);
if (mode !== "hang") setTimeout(() => {
  fs.writeFileSync(path.join(root, "running.json"), JSON.stringify({ version: ${JSON.stringify(version)}, pid: process.pid, at: Date.now() }));
  if (mode === "crash-after") setTimeout(() => process.exit(3), 100);
  if (mode.startsWith("update:")) {
    fs.writeFileSync(path.join(root, "update-request.json"), JSON.stringify({ taskId: "t9", hostId: "h", from: ${JSON.stringify(version)}, to: mode.slice(7), at: Date.now() }));
    process.exit(${EXIT_UPDATE});
  }
}, 50);
`,
  );
}

describe("rexmesh supervise", () => {
  const lines: string[] = [];
  const supervise = (root: string, healthTimeoutMs = 3000) => {
    const s = new Supervisor({ root, args: [], healthTimeoutMs, killGraceMs: 500, log: (l) => lines.push(l) });
    return { s, done: s.run() };
  };
  const waitFor = async <T,>(what: string, probe: () => T | undefined, ms = 10_000): Promise<T> => {
    const end = Date.now() + ms;
    for (;;) {
      const v = probe();
      if (v !== undefined) return v;
      if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 25));
    }
  };
  const result = (root: string) => readJson<UpdateResult>(installPaths(root).result, ["outcome"]);
  const setupRoot = (from: string, mode: Parameters<typeof installVersion>[2]) => {
    const root = fresh("sroot");
    installVersion(root, from, mode);
    symlinkSync(join("versions", from), join(root, "current"));
    return root;
  };

  it("carries out the update a daemon asks for: switches, sees it run, records it, keeps the old version as previous", async () => {
    const root = setupRoot("1", "update:2");
    installVersion(root, "2", "ok");
    installVersion(root, "0", "ok"); // neither current nor previous after the update: pruned
    const { s, done } = supervise(root);
    const r = await waitFor("the result", () => result(root));
    expect(r).toMatchObject({ taskId: "t9", from: "1", to: "2", outcome: "updated" });
    expect(readlinkSync(join(root, "current"))).toBe(join("versions", "2"));
    expect(readlinkSync(join(root, "previous"))).toBe(join("versions", "1"));
    expect(existsSync(installPaths(root).request)).toBe(false);
    expect(existsSync(join(root, "versions", "0"))).toBe(false);
    s.stop();
    expect(await done).toBe(0);
  });

  it("rolls back a version that exits before it runs, says why, starts the old one again and drops the bad one", async () => {
    const root = setupRoot("1", "update:2");
    installVersion(root, "2", "exit");
    const { s, done } = supervise(root);
    const r = await waitFor("the result", () => result(root));
    expect(r).toMatchObject({ from: "1", to: "2", outcome: "rolled-back", reason: "version 2 exited (code 3) before it connected" });
    expect(readlinkSync(join(root, "current"))).toBe(join("versions", "1"));
    expect(existsSync(join(root, "versions", "2"))).toBe(false);
    s.stop();
    await done;
  });

  it("rolls back a version that never says it runs, after the health timeout", async () => {
    const root = setupRoot("1", "update:2");
    installVersion(root, "2", "hang");
    const { s, done } = supervise(root, 400);
    const started = Date.now();
    // On trial, the new version runs by its own path: `current` still names the old one, so a supervisor killed now
    // is started again from the old version, finds the request and tries again.
    await waitFor("the trial", () => (lines.some((l) => l.startsWith("trying 2")) ? true : undefined));
    expect(readlinkSync(join(root, "current"))).toBe(join("versions", "1"));
    const r = await waitFor("the result", () => result(root));
    expect(Date.now() - started).toBeGreaterThanOrEqual(400);
    expect(r).toMatchObject({ outcome: "rolled-back", reason: "version 2 did not connect and report within 0.4s" });
    expect(readlinkSync(join(root, "current"))).toBe(join("versions", "1"));
    s.stop();
    await done;
  });

  it("acts on a request left by a crash before it started, and rolls back a request for a version that is not there", async () => {
    const root = setupRoot("1", "ok");
    installVersion(root, "2", "ok");
    // The daemon wrote its request and then everything died (a reboot): the supervisor's next start carries it out.
    writeDurable(installPaths(root).request, JSON.stringify({ taskId: "t1", hostId: "h", from: "1", to: "2", at: 1 }));
    const first = supervise(root);
    expect(await waitFor("the result", () => result(root))).toMatchObject({ taskId: "t1", outcome: "updated" });
    first.s.stop();
    await first.done;
    const root2 = setupRoot("1", "ok");
    writeDurable(installPaths(root2).request, JSON.stringify({ taskId: "t2", hostId: "h", from: "1", to: "7", at: 1 }));
    const second = supervise(root2);
    expect(await waitFor("the result", () => result(root2))).toMatchObject({ taskId: "t2", outcome: "rolled-back", reason: "versions/7 is missing or incomplete" });
    expect(readlinkSync(join(root2, "current"))).toBe(join("versions", "1"));
    second.s.stop();
    await second.done;
  });

  it("switches back from a version that came up but keeps exiting within its probation, and records why for the old daemon", async () => {
    const root = setupRoot("1", "update:2");
    installVersion(root, "2", "crash-after");
    const s = new Supervisor({ root, args: [], healthTimeoutMs: 3000, killGraceMs: 500, probationMs: 60_000, log: (l) => lines.push(l) });
    const done = s.run();
    expect(await waitFor("the result", () => result(root))).toMatchObject({ outcome: "updated" });
    const back = await waitFor("the switch back", () => readJson<ProbationRollback>(installPaths(root).probation, ["version"]), 20_000);
    expect(back).toMatchObject({ version: "2", previous: "1", reason: expect.stringMatching(/^version 2 exited 3 times within 1 minutes of its update \(last: code 3\)$/) });
    expect(readlinkSync(join(root, "current"))).toBe(join("versions", "1"));
    // The old version marks it bad when it starts.
    const u = updater({ root, version: "1" });
    await u.checkProbation();
    expect(u.badReason("2")?.reason).toBe(back.reason);
    expect(existsSync(installPaths(root).probation)).toBe(false);
    s.stop();
    await done;
  }, 30_000);

  it("refuses to start without a current version", async () => {
    await expect(new Supervisor({ root: fresh("empty"), args: [], healthTimeoutMs: 1000, log: () => undefined }).run()).rejects.toThrow(/is not a link to versions/);
  });
});

describe("the update step in the executor", () => {
  it("asks for no restart and frees the update when the task is cancelled while it was preparing", async () => {
    const key = newReleaseKeyPair();
    const signed = signRelease(Buffer.from("x"), "2.0.0", PLATFORM, key.privatePem, Date.now());
    let abandoned = 0;
    let release!: () => void;
    const updater = {
      prepare: async () => {
        await new Promise<void>((r) => (release = r));
        return { restart: { from: "1.0.0", to: "2.0.0", keyId: key.keyId, digest: "sha256:" + "0".repeat(64) } };
      },
      abandoned: () => void abandoned++,
    };
    const ex = new Executor({ clock: systemClock, updater });
    const abort = new AbortController();
    const spec = create(TaskSpecSchema, { taskId: "t1", steps: [create(StepSchema, { tool: { case: "update", value: { releases: [signed] } } })] });
    const running = ex.run(spec, { signal: abort.signal, onOutput: () => undefined });
    await new Promise((r) => setTimeout(r, 20));
    abort.abort();
    release();
    const outcome = await running;
    expect(TaskState[outcome.state]).toBe("CANCELLED");
    expect(outcome.restart).toBeUndefined();
    expect(abandoned).toBe(1);
  });
});
