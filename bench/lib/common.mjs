// Shared helpers for the benchmark scenarios (bench/scenarios/*.mjs).
import { execSync } from "node:child_process";
import { cpuMs } from "./proc.mjs";
import { mkdtempSync, readFileSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import { LocalMesh } from "../../dist/cli/launcher.js";
import { operatorClient } from "../../dist/cli/client.js";

export { LocalMesh, operatorClient };
export { cpuMs, procCpu } from "./proc.mjs";

/** Task states as numbers (rexmesh.v1.TaskState). */
export const SUCCEEDED = 10;
/** Job state DONE (rexmesh.v1.JobState). */
export const JOB_DONE = 2;
/** The built-in no-spawn ping step. */
export const pingStep = { tool: { case: "ping", value: {} } };

/** The value of `--name N` on the command line (numbers), or the default. */
export function opt(name, dflt) {
  const args = process.argv.slice(2);
  const i = args.indexOf(`--${name}`);
  if (i < 0) return dflt;
  const v = args[i + 1];
  return typeof dflt === "number" ? Number(v) : v;
}

/** Percentile p (0..100) of a list of numbers. */
export function pct(xs, p) {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
}

export const median = (xs) => pct(xs, 50);

export function machine() {
  const cpus = os.cpus();
  return {
    cpus: cpus.length,
    cpu: cpus[0]?.model,
    memGiB: Math.round(os.totalmem() / 2 ** 30),
    node: process.version,
    platform: `${os.platform()} ${os.release()}`,
    fdLimit: (() => {
      try {
        return Number(execSync("sh -c 'ulimit -n'", { encoding: "utf8" }).trim());
      } catch {
        return undefined;
      }
    })(),
  };
}

export function commit() {
  try {
    const sha = execSync("git rev-parse --short HEAD", { encoding: "utf8" }).trim();
    const dirty = execSync("git status --porcelain --untracked-files=no -- . ':!bench/results'", { encoding: "utf8" }).trim() !== "";
    return dirty ? `${sha}+dirty` : sha;
  } catch {
    return "unknown";
  }
}

/** Memory of a process from /proc/PID/status, in bytes: VmRSS, RssAnon, RssFile, VmHWM (zeros when it is gone). */
export function procMemory(pid) {
  try {
    const s = readFileSync(`/proc/${pid}/status`, "utf8");
    const kb = (k) => Number(new RegExp(`${k}:\\s+(\\d+) kB`).exec(s)?.[1] ?? 0) * 1024;
    return { rss: kb("VmRSS"), anon: kb("RssAnon"), file: kb("RssFile"), hwm: kb("VmHWM") };
  } catch {
    return { rss: 0, anon: 0, file: 0, hwm: 0 };
  }
}

/** Resident set size of a process in bytes (0 when it is gone). */
export const rssBytes = (pid) => procMemory(pid).rss;

/** A fresh scratch directory under the OS temp dir. */
export const scratch = (tag) => mkdtempSync(join(os.tmpdir(), `rexmesh-bench-${tag}-`));

/**
 * Starts a LocalMesh (real controller, proxies and daemon processes, mTLS,
 * LMDB), waits for its hosts, runs fn(client, mesh) and always stops it.
 */
export async function withMesh(plan, fn, { waitHosts = true } = {}) {
  const mesh = new LocalMesh({ dir: scratch("mesh"), shareHostKey: true, logLevel: "warn", nodeArgs: benchNodeArgs(), ...plan });
  try {
    await mesh.start();
    if (waitHosts) await mesh.waitForHosts(plan.hosts.length, 300_000);
    const conn = operatorClient({}, mesh.exports());
    try {
      return await fn(conn.client, mesh);
    } finally {
      conn.close();
    }
  } finally {
    await mesh.stop();
  }
}

/**
 * Node flags for every mesh process, from BENCH_NODE_ARGS (node refuses
 * --cpu-prof in NODE_OPTIONS): BENCH_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof".
 */
export function benchNodeArgs() {
  return (process.env.BENCH_NODE_ARGS ?? "").split(/\s+/).filter(Boolean);
}

/** Follows a job (no output) until it is DONE; returns the final Job. */
export async function untilDone(client, jobId) {
  for await (const b of client.watchJob({ jobId, noOutput: true })) if (b.job && b.job.state === JOB_DONE) return b.job;
  throw new Error(`watch of ${jobId} ended before the job was done`);
}

export const succeededCount = (job) => job.counts.find((c) => c.state === SUCCEEDED)?.count ?? 0;

export const log = (msg) => process.stderr.write(`  ${msg}\n`);


/** CPU ms used per role of a LocalMesh while fn runs: { controller, proxies, daemons, bench }. */
export async function cpuDuring(mesh, fn) {
  const groups = { controller: [mesh.controller], proxies: mesh.proxies, daemons: mesh.daemons };
  const read = () => Object.fromEntries(Object.entries(groups).map(([k, ps]) => [k, ps.reduce((a, p) => a + cpuMs(p.proc.pid), 0)]));
  const before = read();
  const self0 = process.cpuUsage();
  const value = await fn();
  const after = read();
  const self = process.cpuUsage(self0);
  const cpu = Object.fromEntries(Object.keys(before).map((k) => [k, Math.round(after[k] - before[k])]));
  cpu.bench = Math.round((self.user + self.system) / 1000);
  return { value, cpu };
}
