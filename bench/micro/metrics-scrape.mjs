// node bench/micro/metrics-scrape.mjs [--connections 5000] [--scrapes 20]: what a Prometheus
// scrape of a process's default metrics costs while it holds N loopback TCP connections (both
// ends in this process, so 2N sockets, as a proxy holds its hosts'): prom-client's defaults as
// they come, against rexmesh's process metrics (common/metrics.ts: without active_handles, the
// descriptors counted off the event loop). CPU includes libuv's threads; wall includes waiting.
// The metrics as built in dist/ (npm run build first).
import net from "node:net";
import { parseArgs } from "node:util";
import { collectDefaultMetrics, Registry } from "prom-client";
import { Metrics } from "../../dist/common/metrics.js";

const { values } = parseArgs({ options: { connections: { type: "string", default: "5000" }, scrapes: { type: "string", default: "20" } } });
const N = Number(values.connections);
const SCRAPES = Number(values.scrapes);

const server = net.createServer(() => {}).listen(0, "127.0.0.1");
await new Promise((r) => server.on("listening", r));
const sockets = [];
for (let i = 0; i < N; i++) sockets.push(net.connect(server.address().port, "127.0.0.1"));
await Promise.all(sockets.map((s) => new Promise((r) => s.once("connect", r))));

const defaults = new Registry();
collectDefaultMetrics({ register: defaults, prefix: "peer_" });
const ours = new Metrics();

const time = async (label, scrape) => {
  await scrape();
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  for (let i = 0; i < SCRAPES; i++) await scrape();
  const cpu = process.cpuUsage(cpu0);
  console.log(`${label}: ${((cpu.user + cpu.system) / 1000 / SCRAPES).toFixed(1)} ms CPU, ${((performance.now() - t0) / SCRAPES).toFixed(1)} ms wall per scrape`);
};
console.log(`${N} connections (${2 * N} sockets), ${SCRAPES} scrapes each, alternating`);
for (let round = 0; round < 2; round++) {
  await time("prom-client defaults", () => defaults.metrics());
  await time("rexmesh process metrics", () => ours.render());
}
for (const s of sockets) s.destroy();
server.close();
process.exit(0);
