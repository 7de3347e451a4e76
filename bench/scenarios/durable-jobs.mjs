// Durable single-host jobs (ping: no spawn), submit → done, many at once.
import { cpuDuring, JOB_DONE, log, opt, pct, pingStep, untilDone, withMesh } from "../lib/common.mjs";

export default {
  name: "durable-jobs",
  title: "durable single-host jobs, submit → done, no spawn",
  target: "≥ 3,000 jobs/s with p99 ≤ 50 ms",
  async run() {
    const total = opt("jobs", 3000);
    const concurrency = opt("concurrency", 64);
    const batch = opt("batch", 64);
    return withMesh({ regions: ["r1"], hosts: [{ id: "j0", region: "r1" }], daemonArgs: ["--capacity", "64"] }, async (client, mesh) => {
      const job = { hostIds: ["j0"], steps: [pingStep] };
      // Three ways to run the same jobs, one after the other on the same mesh: two calls per job (SubmitJob, then
      // WatchJob until done), one call per job (SubmitAndWatch), and SubmitJobs batches with one watch per job.
      const modes = {
        "SubmitJob + WatchJob": async (lat, take) => {
          while (take()) {
            const s = performance.now();
            const { job: j } = await client.submitJob(job);
            await untilDone(client, j.id);
            lat.push(performance.now() - s);
          }
        },
        SubmitAndWatch: async (lat, take) => {
          while (take()) {
            const s = performance.now();
            for await (const b of client.submitAndWatch({ job, noOutput: true })) if (b.job && b.job.state === JOB_DONE) break;
            lat.push(performance.now() - s);
          }
        },
        [`SubmitJobs ×${batch}`]: async (lat, take) => {
          for (;;) {
            let n = 0;
            while (n < batch && take()) n++;
            if (n === 0) return;
            const s = performance.now();
            const { results } = await client.submitJobs({ jobs: Array.from({ length: n }, () => job) });
            await Promise.all(
              results.map(async (r) => {
                await untilDone(client, r.response.job.id);
                lat.push(performance.now() - s);
              }),
            );
          }
        },
      };
      // Warm-up (discarded): the first mode would otherwise pay for the JIT and the first LMDB pages.
      {
        let left = Math.min(500, total);
        await Promise.all(Array.from({ length: concurrency }, () => modes["SubmitJob + WatchJob"]([], () => (left > 0 ? (left--, true) : false))));
      }
      const runs = {};
      // `--modes batch` (or any words of the mode names, comma separated) runs only those: for profiling one.
      const only = String(opt("modes", "")).toLowerCase().split(",").filter(Boolean);
      for (const [mode, worker] of Object.entries(modes)) {
        if (only.length > 0 && !only.some((w) => mode.toLowerCase().includes(w))) continue;
        const lat = [];
        let next = 0;
        const take = () => (next < total ? (next++, true) : false);
        // A batch worker holds `batch` jobs in flight: as many workers as keep about `concurrency` jobs in flight.
        const workers = mode.startsWith("SubmitJobs") ? Math.max(1, Math.round(concurrency / batch)) : concurrency;
        const t0 = performance.now();
        const { cpu } = await cpuDuring(mesh, () => Promise.all(Array.from({ length: workers }, () => worker(lat, take))));
        const secs = (performance.now() - t0) / 1000;
        const cpuMsPerJob = Object.fromEntries(Object.entries(cpu).map(([k, v]) => [k, +(v / lat.length).toFixed(2)]));
        runs[mode] = { jobs: lat.length, jobsPerSecond: Math.round(lat.length / secs), p50Ms: +pct(lat, 50).toFixed(1), p99Ms: +pct(lat, 99).toFixed(1), cpuMsPerJob };
        log(`${mode}: ${runs[mode].jobsPerSecond} jobs/s, p50 ${runs[mode].p50Ms} ms, p99 ${runs[mode].p99Ms} ms`);
      }
      const best = Object.entries(runs).sort((x, y) => y[1].jobsPerSecond - x[1].jobsPerSecond)[0];
      const first = runs["SubmitJob + WatchJob"] ?? Object.values(runs)[0];
      const cpuTotal = (r) => Object.values(r.cpuMsPerJob).reduce((a, b) => a + b, 0);
      return {
        jobs: first.jobs,
        concurrency,
        jobsPerSecond: first.jobsPerSecond,
        p50Ms: first.p50Ms,
        p99Ms: first.p99Ms,
        cpuMsPerJob: first.cpuMsPerJob,
        modes: runs,
        best: best[0],
        notes: [
          ...Object.entries(runs).map(([mode, r]) => `${mode}: ${r.jobsPerSecond} jobs/s, p50 ${r.p50Ms} ms, p99 ${r.p99Ms} ms; CPU per job (ms): ${Object.entries(r.cpuMsPerJob).map(([k, v]) => `${k} ${v}`).join(", ")}; total ${cpuTotal(r).toFixed(2)} ms, so two cores allow at most about ${Math.round(2000 / cpuTotal(r))} jobs/s.`),
          `Batches: ${batch} jobs per SubmitJobs call, about ${concurrency} jobs in flight in every mode; a batch job's latency counts from its call to its own end.`,
          `3,000 jobs/s would need ≤ 0.67 ms of CPU per job across client, controller, proxy and daemon together.`,
          `Profile (\`BENCH_NODE_ARGS="--cpu-prof --cpu-prof-dir=DIR" node bench/run.mjs durable-jobs\`), controller: no single hot spot; the cost is spread over connect-node's per-call machinery (abort signals and their DOMExceptions, async-iterable plumbing, header maps), protobuf-es reflective encoding, and GC. Each job also makes about 4 LMDB commits across the hops (job + task at submit, task at the proxy, statuses back), batched when jobs overlap.`,
        ].join("\n\n"),
      };
    });
  },
  /** The summary row: the headline figure and whether the target is met. */
  verdict: (r) => {
    const shown = r.modes ?? { "SubmitJob + WatchJob": r };
    const figure = Object.entries(shown).map(([mode, m]) => `${mode}: ${m.jobsPerSecond} jobs/s, p50 ${m.p50Ms} ms, p99 ${m.p99Ms} ms`).join("; ");
    return { figure: `${figure} (${r.jobs} jobs each, ${r.concurrency} in flight)`, met: Object.values(shown).some((m) => m.jobsPerSecond >= 3000 && m.p99Ms <= 50) };
  },
  plot: (r) => ({ title: "durable jobs: latency (ms)", unit: "ms", bars: [{ label: "p50", value: r.p50Ms }, { label: "p99", value: r.p99Ms }, { label: "target p99", value: 50, ref: true }] }),
};
