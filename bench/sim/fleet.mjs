// The parent side of the host simulator: spreads simulated hosts over
// several host-sim processes (each with its own 127.0.0.x source address, so
// that no address pair runs out of ephemeral ports and no process passes its
// file-descriptor limit), sums their counts and always kills them.
import { fork } from "node:child_process";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { generateKeyPair } from "../../dist/certs/ca.js";

const SIM = fileURLToPath(new URL("./host-sim.mjs", import.meta.url));
const live = new Set();
process.once("exit", () => {
  for (const p of live) p.kill("SIGKILL");
});

/** Rejects after ms with a message naming what was waited for. */
export function withTimeout(promise, ms, what) {
  let t;
  return Promise.race([promise, new Promise((_, rej) => (t = setTimeout(() => rej(new Error(`${what}: timed out after ${ms} ms`)), ms)))]).finally(() => clearTimeout(t));
}

class SimProcess {
  constructor(index, execArgv) {
    this.index = index;
    this.proc = fork(SIM, [], { stdio: ["ignore", "inherit", "inherit", "ipc"], execArgv });
    live.add(this.proc);
    this.proc.once("exit", () => live.delete(this.proc));
    this.pending = new Map();
    this.nextId = 1;
    this.connected = 0;
    this.fullAt = 0;
    this.countListeners = new Set();
    this.ready = new Promise((resolve, reject) => {
      this.proc.once("exit", (code, sig) => {
        reject(new Error(`host-sim ${index} exited (${sig ?? code})`));
        for (const { reject: r } of this.pending.values()) r(new Error(`host-sim ${index} exited (${sig ?? code})`));
        this.pending.clear();
      });
      this.proc.on("message", (m) => {
        if (m.ready) return resolve();
        if (m.event === "count") {
          this.connected = m.connected;
          this.fullAt = m.fullAt;
          for (const fn of this.countListeners) fn();
          return;
        }
        const p = this.pending.get(m.id);
        if (!p) return;
        this.pending.delete(m.id);
        if (m.error) p.reject(new Error(`host-sim ${index}: ${m.error}`));
        else p.resolve(m);
      });
    });
    this.ready.catch(() => {});
  }

  call(cmd, args = {}, timeoutMs = 600_000) {
    const id = this.nextId++;
    const p = new Promise((resolve, reject) => this.pending.set(id, { resolve, reject }));
    this.proc.send({ id, cmd, ...args });
    return withTimeout(p, timeoutMs, `host-sim ${this.index} ${cmd}`);
  }

  kill() {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill("SIGKILL");
  }
}

/**
 * Starts `hosts` simulated hosts, ids `${prefix}${i}`, at most `perProcess`
 * per process. `proxiesFor(i)` gives the proxy address(es) of host i's
 * process (hosts of a process take them round-robin); every process has
 * its own source address 127.0.0.(2+k).
 */
export class Fleet {
  constructor({ caDir, hosts, perProcess = 7000, prefix = "sim-", proxiesFor, heartbeatMs = 10_000, concurrency = 64, backoff = {}, execArgv = [], tenant = "default", countOwnStalls = false }) {
    this.opts = { caDir, hosts, perProcess, prefix, proxiesFor, heartbeatMs, concurrency, backoff, execArgv, tenant, countOwnStalls };
    this.procs = [];
  }

  get size() {
    return this.opts.hosts;
  }

  /** Forks the processes and has each issue its certificates (spread over processes: ~2.6 ms each). */
  async start(timeoutMs = 600_000) {
    const o = this.opts;
    const nProcs = Math.ceil(o.hosts / o.perProcess);
    const keys = generateKeyPair();
    const width = String(o.hosts - 1).length;
    const t0 = performance.now();
    for (let k = 0; k < nProcs; k++) this.procs.push(new SimProcess(k, o.execArgv));
    await withTimeout(Promise.all(this.procs.map((p) => p.ready)), 30_000, "host-sim processes ready");
    const per = Math.ceil(o.hosts / nProcs);
    const results = await Promise.all(
      this.procs.map((p, k) => {
        const ids = [];
        for (let i = k * per; i < Math.min(o.hosts, (k + 1) * per); i++) ids.push(`${o.prefix}${String(i).padStart(width, "0")}`);
        p.hostCount = ids.length;
        return p.call("start", {
          caCertFile: join(o.caDir, "ca.crt"),
          caKeyFile: join(o.caDir, "ca.key"),
          publicKeyPem: keys.publicKeyPem,
          keyPem: keys.privateKeyPem,
          ids,
          proxies: [o.proxiesFor(k)].flat(),
          localAddress: `127.0.0.${2 + k}`,
          heartbeatMs: o.heartbeatMs,
          concurrency: o.concurrency,
          backoff: o.backoff,
          tenant: o.tenant,
          countOwnStalls: o.countOwnStalls,
        }, timeoutMs);
      }),
    );
    return { processes: nProcs, issueMs: Math.round(performance.now() - t0), issueMsPerProcess: results.map((r) => r.issueMs) };
  }

  /** Opens every host's stream; resolves when each process has tried all of its hosts once. */
  async open(timeoutMs = 600_000) {
    const t0 = performance.now();
    const r = await Promise.all(this.procs.map((p) => p.call("open", {}, timeoutMs)));
    return { openMs: Math.round(performance.now() - t0), connected: r.reduce((a, x) => a + x.connected, 0) };
  }

  /** Hosts with a welcomed stream now, as last reported by the processes (every 250 ms). */
  get connected() {
    return this.procs.reduce((a, p) => a + p.connected, 0);
  }

  /** Resolves when at least n hosts are connected; rejects after timeoutMs. */
  waitConnected(n = this.size, timeoutMs = 300_000) {
    if (this.connected >= n) return Promise.resolve();
    const t0 = Date.now();
    const progress = setInterval(() => process.stderr.write(`  … ${this.connected} of ${n} simulated hosts connected after ${Math.round((Date.now() - t0) / 1000)} s\n`), 15_000);
    return withTimeout(
      new Promise((resolve) => {
        const check = () => {
          if (this.connected >= n) {
            for (const p of this.procs) p.countListeners.delete(check);
            resolve();
          }
        };
        for (const p of this.procs) p.countListeners.add(check);
      }),
      timeoutMs,
      `waiting for ${n} simulated hosts (have ${this.connected})`,
    )
      .catch((err) => {
        throw new Error(`${err.message}; connected now ${this.connected}`);
      })
      .finally(() => clearInterval(progress));
  }

  /** Every process's counters (connected, pongs, failures, cpu, rss, ...). */
  stats(timeoutMs = 30_000) {
    return Promise.all(this.procs.map((p) => p.call("stats", {}, timeoutMs)));
  }

  resetTaskStats() {
    return Promise.all(this.procs.map((p) => p.call("reset-task-stats", {}, 30_000)));
  }

  /** Ends every process: a polite stop, then SIGKILL. Safe to call twice. */
  async stop() {
    await Promise.all(
      this.procs.map(async (p) => {
        if (p.proc.exitCode !== null || p.proc.signalCode !== null) return;
        const exited = new Promise((r) => p.proc.once("exit", r));
        try {
          p.proc.send({ id: 0, cmd: "stop" });
        } catch {
          /* already gone */
        }
        const t = setTimeout(() => p.kill(), 3000);
        await exited;
        clearTimeout(t);
      }),
    );
  }
}

/** Reads a Prometheus text page and returns the samples of one metric: [{ labels, value }]. */
export async function scrape(address, name) {
  return (await scrapeAll(address, [name]))[name];
}

/** One read of a Prometheus text page: the samples of each named metric, { name: [{ labels, value }] }. */
export async function scrapeAll(address, names) {
  const res = await withTimeout(fetch(`http://${address}/metrics`), 30_000, `scrape ${address}`);
  const text = await res.text();
  const out = Object.fromEntries(names.map((n) => [n, []]));
  for (const line of text.split("\n")) {
    if (!names.some((n) => line.startsWith(n))) continue;
    const m = /^([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s+(\S+)/.exec(line);
    if (!m || !out[m[1]]) continue;
    const labels = {};
    for (const kv of (m[3] ?? "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[kv[1]] = kv[2];
    out[m[1]].push({ labels, value: Number(m[4]) });
  }
  return out;
}

/** Sum of a metric's samples whose labels match `where`. */
export async function scrapeSum(address, name, where = {}) {
  const xs = await scrape(address, name);
  return xs.filter((x) => Object.entries(where).every(([k, v]) => x.labels[k] === v)).reduce((a, x) => a + x.value, 0);
}

/** Polls the controller's metrics until it counts n connected hosts. */
export async function waitControllerHosts(metricsAddress, n, timeoutMs = 300_000, intervalMs = 500) {
  const deadline = Date.now() + timeoutMs;
  let seen = 0;
  for (;;) {
    seen = await scrapeSum(metricsAddress, "rexmesh_hosts", { connected: "true" });
    if (seen >= n) return seen;
    if (Date.now() > deadline) throw new Error(`the controller sees ${seen} of ${n} hosts connected after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}
