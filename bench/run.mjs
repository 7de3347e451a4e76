// npm run bench — rexmesh's benchmark suite (issue 7, first scenarios).
// Each scenario starts a real mesh (controller, proxies, daemon processes, mTLS,
// LMDB) on loopback, measures, and writes bench/results/<scenario>.json; the
// run ends with bench/results/summary.md. A scenario runs alone with
// `node bench/run.mjs <scenario> [--hosts N] [--jobs N] ...`.
import { execSync } from "node:child_process";
import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import { LocalMesh } from "../dist/cli/launcher.js";
import { operatorClient } from "../dist/cli/client.js";

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? Number(args[i + 1]) : dflt;
};
const only = args.find((a) => !a.startsWith("--") && Number.isNaN(Number(a)));
const results = new URL("./results/", import.meta.url).pathname;
mkdirSync(results, { recursive: true });

const machine = { cpus: os.cpus().length, cpu: os.cpus()[0]?.model, memGiB: Math.round(os.totalmem() / 2 ** 30), node: process.version, platform: `${os.platform()} ${os.release()}` };
const commit = (() => {
  try {
    return execSync("git rev-parse --short HEAD", { encoding: "utf8" }).trim();
  } catch {
    return "unknown";
  }
})();

const pct = (xs, p) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
};
const ping = { tool: { case: "ping", value: {} } };

async function withMesh(plan, fn) {
  const mesh = new LocalMesh({ dir: mkdtempSync(join(os.tmpdir(), "rexmesh-bench-")), shareHostKey: true, logLevel: "warn", ...plan });
  try {
    await mesh.start();
    await mesh.waitForHosts(plan.hosts.length, 180_000);
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

async function untilDone(client, jobId) {
  for await (const b of client.watchJob({ jobId, noOutput: true })) if (b.job && b.job.state === 2) return b.job;
}

const scenarios = {
  /** Ping every host through 2 proxies: the time until the last reply. */
  async "ping-fanout"() {
    const n = opt("hosts", 1000);
    const regions = ["r1", "r2"];
    const hosts = Array.from({ length: n }, (_, i) => ({ id: `p${i}`, region: regions[i % 2] }));
    return withMesh({ regions, hosts, hostsPerProcess: 100 }, async (client) => {
      const runs = [];
      for (let r = 0; r < opt("runs", 5); r++) {
        const t0 = performance.now();
        const { job } = await client.submitJob({ allHosts: true, steps: [ping] });
        const done = await untilDone(client, job.id);
        const ms = performance.now() - t0;
        const ok = done.counts.find((c) => c.state === 10)?.count ?? 0;
        runs.push({ ms: Math.round(ms), succeeded: ok });
      }
      return { hosts: n, proxies: 2, runs, lastReplyMsP50: pct(runs.map((r) => r.ms), 50), lastReplyMsBest: Math.min(...runs.map((r) => r.ms)) };
    });
  },

  /** Durable single-host jobs (ping: no spawn), submit → done, many at once. */
  async "durable-jobs"() {
    const total = opt("jobs", 2000);
    const concurrency = opt("concurrency", 64);
    return withMesh({ regions: ["r1"], hosts: [{ id: "j0", region: "r1" }], daemonArgs: ["--capacity", "64"] }, async (client) => {
      const lat = [];
      let next = 0;
      const t0 = performance.now();
      await Promise.all(
        Array.from({ length: concurrency }, async () => {
          while (next < total) {
            next++;
            const s = performance.now();
            const { job } = await client.submitJob({ hostIds: ["j0"], steps: [ping] });
            await untilDone(client, job.id);
            lat.push(performance.now() - s);
          }
        }),
      );
      const secs = (performance.now() - t0) / 1000;
      return { jobs: lat.length, concurrency, jobsPerSecond: Math.round(lat.length / secs), p50Ms: +pct(lat, 50).toFixed(1), p99Ms: +pct(lat, 99).toFixed(1) };
    });
  },
};

const names = only ? [only] : Object.keys(scenarios);
const summary = [];
for (const name of names) {
  if (!scenarios[name]) throw new Error(`unknown scenario ${name} (${Object.keys(scenarios).join(", ")})`);
  process.stderr.write(`running ${name}...\n`);
  const result = await scenarios[name]();
  const record = { scenario: name, date: new Date().toISOString(), commit, machine, result };
  writeFileSync(join(results, `${name}.json`), JSON.stringify(record, null, 2) + "\n");
  summary.push(record);
  process.stderr.write(`${name}: ${JSON.stringify(result)}\n`);
}
const md = [
  `# rexmesh benchmarks`,
  ``,
  `commit ${commit}, ${new Date().toISOString()}; ${machine.cpus} × ${machine.cpu}, ${machine.memGiB} GiB, Node ${machine.node}, ${machine.platform}`,
  ``,
  `| scenario | figures |`,
  `| --- | --- |`,
  ...summary.map((r) => `| ${r.scenario} | ${Object.entries(r.result).filter(([, v]) => typeof v !== "object").map(([k, v]) => `${k} ${v}`).join(", ")} |`),
  ``,
  `Not measured yet (issue 7): idle streams per proxy with a host simulator, 10k/50k-host fan-out, real-process fan-out vs xargs and pdsh, output throughput with a slow reader, reconnect storm, daemon idle memory; the NATS and pdsh baselines. The link-transport comparison is \`node bench/link-transport/run.mjs\` (docs/transport.md).`,
  ``,
];
if (!only) writeFileSync(join(results, "summary.md"), md.join("\n"));
process.stderr.write(md.join("\n"));
