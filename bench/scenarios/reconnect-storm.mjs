// Reconnect storm: 10,000 simulated daemons (bench/sim) on one proxy; the
// proxy is SIGKILLed and restarted on the same address; how long until every
// host is back, as the proxy and the controller see it.
import os from "node:os";
import { log, opt } from "../lib/common.mjs";
import { scrapeAll } from "../sim/fleet.mjs";
import { cpuMsOf, withSimMesh } from "../sim/mesh.mjs";

// Issue 15: every host back within 10 s of the kill (it was 20 s before).
const TARGET_MS = 10_000;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export default {
  name: "reconnect-storm",
  title: "reconnect storm: 10,000 hosts after a proxy is killed and restarted",
  target: `all reconnected ≤ ${TARGET_MS / 1000} s`,
  async run() {
    const n = opt("hosts", 10_000);
    return withSimMesh(
      {
        regions: ["r1"],
        fleet: {
          hosts: n,
          perProcess: opt("per-process", 5000),
          heartbeatMs: opt("heartbeat-ms", 10_000),
          backoff: { initialMs: opt("backoff-initial-ms", 1000), maxMs: opt("backoff-max-ms", 10_000) },
          proxiesFor: (_k, mesh) => mesh.proxies[0].address,
          // `--sim-count-own-stalls yes`: the simulator's timeouts count its own event loop's lateness as the proxy's (bench/sim/host-sim.mjs, "own stalls").
          countOwnStalls: opt("sim-count-own-stalls", "no") === "yes",
        },
      },
      async (ctx) => {
        const { mesh, fleet } = ctx;
        const proxy = mesh.proxies[0];
        log(`issuing ${n} certificates`);
        await fleet.start();
        const c0 = Date.now();
        await fleet.open(1_200_000);
        await fleet.waitConnected(n, 600_000);
        await ctx.waitController(n, 600_000);
        const initialConnectMs = Date.now() - c0;
        log(`${n} hosts connected in ${initialConnectMs} ms; the controller sees them; settling 5 s`);
        await sleep(5000);

        const dropsBefore = sumCounts((await fleet.stats(300_000)).map((s) => s.drops ?? {}));
        const simPids = fleet.procs.map((p) => p.proc.pid);
        const simCpu = () => simPids.reduce((a, pid) => a + cpuMsOf(pid), 0);
        const ctlCpu0 = cpuMsOf(mesh.controller.proc.pid);
        const sim0 = simCpu();
        const tKill = Date.now();
        proxy.proc.kill("SIGKILL");
        await mesh.exited(proxy);
        const tExited = Date.now();
        await mesh.restart(proxy);
        const tReady = Date.now();
        log(`proxy killed, restarted and ready after ${tReady - tKill} ms; waiting for ${n} hosts`);
        const timeline = [];
        let proxyAllAt = 0;
        let simsAllAt = 0;
        let controllerAllAt = 0;
        const deadline = tKill + opt("timeout-ms", 180_000);
        let last = -1;
        let lastGone = "{}";
        /** The restarted proxy's host disconnects by reason (its counter), as last scraped. */
        let proxyGone = {};
        while (Date.now() < deadline) {
          const t = Date.now();
          let held = -1;
          let gone;
          let lagMaxS;
          try {
            const m = await scrapeAll(ctx.proxyMetrics(proxy), ["rexmesh_connected_hosts", "rexmesh_host_disconnects_total", "rexmesh_nodejs_eventloop_lag_max_seconds"]);
            held = m.rexmesh_connected_hosts.reduce((a, x) => a + x.value, 0);
            gone = Object.fromEntries(m.rexmesh_host_disconnects_total.map((x) => [x.labels.reason, x.value]));
            lagMaxS = m.rexmesh_nodejs_eventloop_lag_max_seconds[0]?.value;
          } catch {
            /* proxy busy; try again */
          }
          if (gone) proxyGone = gone;
          const sims = fleet.connected;
          if (held >= n && !proxyAllAt) proxyAllAt = t;
          if (sims >= n && !simsAllAt) simsAllAt = Math.max(...fleet.procs.map((p) => p.fullAt || t));
          if (proxyAllAt && !controllerAllAt) {
            const { scrapeSum } = await import("../sim/fleet.mjs");
            const seen = await scrapeSum(ctx.controllerMetrics, "rexmesh_hosts", { connected: "true" });
            if (seen >= n) controllerAllAt = Date.now();
          }
          const goneKey = JSON.stringify(gone ?? {});
          if (held !== last || goneKey !== lastGone) timeline.push({ s: +((t - tKill) / 1000).toFixed(1), proxy: held, simulators: sims, ...(gone && Object.keys(gone).length ? { proxyDisconnects: gone } : {}), ...(lagMaxS !== undefined ? { proxyLoopLagMaxMs: Math.round(lagMaxS * 1000) } : {}) });
          lastGone = goneKey;
          last = held;
          if (proxyAllAt && simsAllAt && controllerAllAt) break;
          await sleep(250);
        }
        const proxyCpuMs = Math.round(cpuMsOf(proxy.proc.pid));
        const simCpuMs = Math.round(simCpu() - sim0);
        const ctlCpuMs = Math.round(cpuMsOf(mesh.controller.proc.pid) - ctlCpu0);
        // A simulator deep in its own backlog answers late (over 30 s was seen under load).
        const st = await fleet.stats(300_000);
        const since = (t) => (t ? t - tKill : null);
        const r = {
          hosts: n,
          simulatorProcesses: fleet.procs.length,
          backoff: fleet.opts.backoff,
          initialConnectMs,
          killToExitedMs: tExited - tKill,
          killToProxyReadyMs: tReady - tKill,
          allBackAtProxyMs: since(proxyAllAt),
          allBackAtSimulatorsMs: since(simsAllAt),
          allBackAtControllerMs: since(controllerAllAt),
          readyToAllBackAtProxyMs: proxyAllAt ? proxyAllAt - tReady : null,
          cpuMsDuringStorm: { restartedProxy: proxyCpuMs, simulators: simCpuMs, controller: ctlCpuMs },
          reconnectAttempts: st.reduce((a, s) => a + s.reconnects, 0),
          failedAttempts: st.reduce((a, s) => a + s.failures, 0),
          // Who gave up which connections: the restarted proxy's count by reason, and the simulated hosts' own.
          proxyDisconnects: proxyGone,
          simulatorDrops: sumCounts([sumCounts(st.map((s) => s.drops ?? {})), Object.fromEntries(Object.entries(dropsBefore).map(([k, v]) => [k, -v]))]),
          simulatorDropsBeforeTheKill: dropsBefore,
          simulatorsCountOwnStalls: fleet.opts.countOwnStalls,
          simulatorLoop: st.map((s) => ({ maxLagMs: Math.round(s.maxLoopLagMs), stalledMs: Math.round(s.stalledMs), maxPingGapMs: s.maxPingGapMs })),
          timeline,
        };
        r.loadAvg1 = +os.loadavg()[0].toFixed(1);
        r.notes = stormNotes(r);
        log(JSON.stringify({ ...r, timeline: r.timeline.length }));
        return r;
      },
    );
  },
  verdict: (r) => ({
    figure: r.allBackAtProxyMs === null ? "not all hosts came back" : `all ${r.hosts} back in ${(r.allBackAtProxyMs / 1000).toFixed(1)} s at the proxy, ${r.allBackAtControllerMs === null ? "?" : (r.allBackAtControllerMs / 1000).toFixed(1)} s at the controller (from SIGKILL)`,
    met: r.hosts >= 10_000 && r.allBackAtProxyMs !== null && r.allBackAtProxyMs <= TARGET_MS,
  }),
  plot: (r) => ({
    title: `reconnect storm, ${r.hosts} hosts: seconds from SIGKILL`,
    unit: "s",
    bars: [
      { label: "proxy ready", value: r.killToProxyReadyMs / 1000 },
      { label: "all at proxy", value: (r.allBackAtProxyMs ?? 0) / 1000, ref: TARGET_MS / 1000 },
      { label: "all at controller", value: (r.allBackAtControllerMs ?? 0) / 1000, ref: TARGET_MS / 1000 },
    ],
  }),
};

/** Adds up counts by key. */
function sumCounts(xs) {
  const out = {};
  for (const x of xs) for (const [k, v] of Object.entries(x)) out[k] = (out[k] ?? 0) + v;
  return out;
}

/** Where the storm's time went: the restarted proxy's CPU per host against the simulators'. */
export function stormNotes(r) {
  const c = r.cpuMsDuringStorm;
  const perHost = (c.restartedProxy / r.hosts).toFixed(1);
  const fig = r.allBackAtProxyMs;
  const lines = [
    `Measured from the SIGKILL; the restarted proxy (new process, LMDB open, listening on the same address) was ready after ${r.killToProxyReadyMs} ms. ` +
      `Simulated hosts reconnect with the daemon's backoff shape (${r.backoff.initialMs ?? 1000} ms × 1.6 per failed attempt, ±20 % jitter, capped at ${r.backoff.maxMs ?? 10_000} ms here), ` +
      `so attempts before the proxy listens are refused: ${r.reconnectAttempts} attempts, ${r.failedAttempts} of them failed.`,
    `CPU during the storm: restarted proxy ${c.restartedProxy} ms (${perHost} ms per host brought back, counting also the handshakes of attempts that failed and the heartbeats of hosts already back), simulators ${c.simulators} ms (the TLS client side of ${r.hosts} hosts: an ECDSA P-256 signature, ` +
      `chain and host-name checks, new HTTP/2 sessions), controller ${c.controller} ms; all on the same 2 cores` +
      (r.loadAvg1 !== undefined ? ` (1-minute load average ${r.loadAvg1} at the end)` : ``) + `. Real hosts pay their side on their own CPUs.`,
    `The proxy is one Node thread: ${(c.restartedProxy / 1000).toFixed(1)} s of its CPU is the least this storm can take on this machine even with free simulators` +
      (c.restartedProxy > TARGET_MS
        ? `, more than the ${TARGET_MS / 1000} s target. A CPU profile of the proxy accepting 2,000 hosts (BENCH_NODE_ARGS=--cpu-prof, bench/lib/cpuprofile.mjs) shows no single hot spot: ` +
          `Node's TLS and HTTP/2 internals about 50 % (TLSSocket.getPeerCertificate alone 7 %: grpc-js builds the peer certificate object for every call's auth context, read by peerOf in common/grpc-link.ts), ` +
          `protobuf-es 9 %, GC 8 %, grpc-js 7 %, rexmesh proxy/common code 9 %. Bringing 10,000 hosts back within 20 s needs the accept work spread over more than one process (several proxies per region, or a cluster of workers behind one address), or cheaper handshakes (TLS session resumption, which grpc-js's client does not offer).`
        : `.`),
  ];
  if (fig !== null && fig > TARGET_MS) lines.push(`Target missed: all hosts were back at the proxy after ${(fig / 1000).toFixed(1)} s.`);
  return lines.join("\n\n");
}
