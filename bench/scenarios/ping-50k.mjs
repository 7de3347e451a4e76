// Ping 50,000 simulated daemons (bench/sim) through 3 proxy processes on this machine.
import { log, opt } from "../lib/common.mjs";
import { withSimMesh } from "../sim/mesh.mjs";
import { pingRuns } from "../sim/ping.mjs";

const TARGET_MS = 5000;
/** Issue 15: connecting 50,000 hosts from cold within a minute. */
const CONNECT_TARGET_MS = 60_000;

export default {
  name: "ping-50k",
  title: "ping 50,000 simulated daemons through 3+ proxies",
  target: `last reply ≤ ${TARGET_MS / 1000} s; all connected ≤ ${CONNECT_TARGET_MS / 1000} s`,
  async run() {
    const n = opt("hosts", 50_000);
    const nProxies = Math.max(1, opt("proxies", 3));
    const regions = Array.from({ length: nProxies }, (_, i) => `r${i + 1}`);
    const result = await withSimMesh(
      {
        regions,
        fleet: {
          hosts: n,
          perProcess: opt("per-process", 7000),
          heartbeatMs: opt("heartbeat-ms", 10_000),
          // Every simulator process spreads its hosts over all proxies (host i → proxy i mod P).
          proxiesFor: (_k, mesh) => mesh.proxies.map((p) => p.address),
        },
      },
      (ctx) => pingRuns(ctx, { hosts: n, runs: opt("runs", 3), warmup: opt("warmup", 1), proxies: nProxies, targetMs: TARGET_MS, connectTimeoutMs: opt("connect-timeout-ms", 900_000) }),
    );
    log(`done: p50 ${result.lastReplyMsP50} ms`);
    return result;
  },
  verdict: (r) => ({
    figure: `last reply p50 ${r.lastReplyMsP50} ms, best ${r.lastReplyMsBest} ms (${r.hosts} hosts, ${r.proxies} proxies); connected in ${r.connectMs} ms; CPU per host: ${JSON.stringify(r.cpuUsPerHostP50 ?? {})} µs`,
    met: r.hosts >= 50_000 && r.lastReplyMsP50 <= TARGET_MS && r.connectMs <= CONNECT_TARGET_MS,
  }),
  plot: (r) => ({
    title: `ping ${r.hosts} hosts through ${r.proxies} proxies: submit → last reply`,
    unit: "ms",
    bars: r.runs.map((x, i) => ({ label: `run ${i + 1}`, value: x.ms, ref: TARGET_MS })),
  }),
};
