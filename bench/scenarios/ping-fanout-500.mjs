// Ping every real daemon (500 hosts in daemon processes of 100) through 2 proxies.
import { cpuDuring, median, opt, pingStep, succeededCount, untilDone, withMesh } from "../lib/common.mjs";

export default {
  name: "ping-fanout-500",
  title: "ping 500 real daemons (5 processes) through 2 proxies",
  target: "(context for the 10k scenario)",
  async run() {
    const n = opt("hosts", 500);
    const regions = ["r1", "r2"];
    const hosts = Array.from({ length: n }, (_, i) => ({ id: `p${i}`, region: regions[i % 2] }));
    return withMesh({ regions, hosts, hostsPerProcess: 100 }, async (client, mesh) => {
      const runs = [];
      const count = opt("runs", 5);
      const { cpu } = await cpuDuring(mesh, async () => {
        for (let r = 0; r < count; r++) {
          const t0 = performance.now();
          const { job } = await client.submitJob({ allHosts: true, steps: [pingStep] });
          const done = await untilDone(client, job.id);
          runs.push({ ms: Math.round(performance.now() - t0), succeeded: succeededCount(done) });
        }
      });
      const ms = runs.map((r) => r.ms);
      const cpuMsPerRun = Object.fromEntries(Object.entries(cpu).map(([k, v]) => [k, Math.round(v / count)]));
      return { hosts: n, proxies: 2, runs, lastReplyMsP50: median(ms), lastReplyMsBest: Math.min(...ms), cpuMsPerRun };
    });
  },
  plot: (r) => ({ title: `ping ${r.hosts} real daemons: last reply per run (ms)`, unit: "ms", bars: r.runs.map((x, i) => ({ label: `run ${i + 1}`, value: x.ms })) }),
  verdict: (r) => ({ figure: `last reply p50 ${r.lastReplyMsP50} ms, best ${r.lastReplyMsBest} ms (${r.hosts} hosts)`, met: undefined }),
};
