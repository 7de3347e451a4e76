// Durable single-host jobs (ping: no spawn), submit → done, many at once.
import { opt, pct, pingStep, untilDone, withMesh } from "../lib/common.mjs";

export default {
  name: "durable-jobs",
  title: "durable single-host jobs, submit → done, no spawn",
  target: "≥ 3,000 jobs/s with p99 ≤ 50 ms",
  async run() {
    const total = opt("jobs", 3000);
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
            const { job } = await client.submitJob({ hostIds: ["j0"], steps: [pingStep] });
            await untilDone(client, job.id);
            lat.push(performance.now() - s);
          }
        }),
      );
      const secs = (performance.now() - t0) / 1000;
      return { jobs: lat.length, concurrency, jobsPerSecond: Math.round(lat.length / secs), p50Ms: +pct(lat, 50).toFixed(1), p99Ms: +pct(lat, 99).toFixed(1) };
    });
  },
  /** The summary row: the headline figure and whether the target is met. */
  verdict: (r) => ({ figure: `${r.jobsPerSecond} jobs/s, p50 ${r.p50Ms} ms, p99 ${r.p99Ms} ms (${r.jobs} jobs, ${r.concurrency} in flight)`, met: r.jobsPerSecond >= 3000 && r.p99Ms <= 50 }),
  plot: (r) => ({ title: "durable jobs: latency (ms)", unit: "ms", bars: [{ label: "p50", value: r.p50Ms }, { label: "p99", value: r.p99Ms }, { label: "target p99", value: 50, ref: true }] }),
};
