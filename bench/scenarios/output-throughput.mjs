// Output from one real host to the client through a proxy and the controller.
//
// Part A (throughput): the host writes N bytes to stdout as fast as it can
// (`head -c N /dev/zero`, or `cat` of a random file with --content random);
// the client follows the job with WatchJob and counts and hashes every byte.
// Figure: bytes / seconds from submit to the last byte.
// Part B (slow reader): the same output; the client takes one batch, stops
// reading until the job is done, then reads the rest at ≤ --slow-mbps; RSS of
// every mesh process is sampled every 250 ms.
// Figure: peak RSS of the proxy (target ≤ 256 MB).
// When part A misses its target, a part A run under the V8 profiler (bench/lib/cpuprofile.mjs)
// (--profile-mb, default min(N, 512 MiB)) says where the time goes.
//
//   node bench/run.mjs output-throughput [--mb 1024] [--slow-mbps 32]
//        [--part a|b|ab] [--content zero|random] [--profile auto|1|0] [--profile-mb 256]
import { execFile } from "node:child_process";
import { createHash, randomFillSync } from "node:crypto";
import { closeSync, openSync, rmSync, writeSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import { JOB_DONE, SUCCEEDED, log, opt, procCpu, procMemory, scratch, withMesh } from "../lib/common.mjs";
import { memoryReports, profilingEnv, summariseDir, toMarkdown } from "../lib/cpuprofile.mjs";

const MiB = 1 << 20;
const MB = 1e6;
const TARGET_MBPS = 100;
const TARGET_PROXY_RSS = 256 * MB;
const HOST = "out0";

const memOf = procMemory;

/** CPU seconds (user + system) a process has used, with its reaped children's. */
function cpuSeconds(pid) {
  const c = procCpu(pid);
  return { own: c.self / 1000, children: c.children / 1000 };
}

/** Every mesh role process (plus this one, the client) by name. */
function roleProcs(mesh) {
  return [
    { name: "controller", pid: mesh.controller.proc.pid },
    ...mesh.proxies.map((p) => ({ name: "proxy", pid: p.proc.pid })),
    ...mesh.daemons.map((d) => ({ name: "daemon", pid: d.proc.pid })),
    { name: "client", pid: process.pid },
  ];
}

/** Samples memory of the processes every periodMs; stop() returns the peaks and a thinned series. */
function memSampler(procs, periodMs = 250) {
  const peak = Object.fromEntries(procs.map((p) => [p.name, { rss: 0, anon: 0, file: 0 }]));
  const series = [];
  const t0 = performance.now();
  const sample = () => {
    const row = { t: +((performance.now() - t0) / 1000).toFixed(2) };
    for (const p of procs) {
      const m = memOf(p.pid);
      row[p.name] = Math.round(m.rss / MB);
      for (const k of ["rss", "anon", "file"]) peak[p.name][k] = Math.max(peak[p.name][k], m[k]);
    }
    series.push(row);
  };
  sample();
  const timer = setInterval(sample, periodMs);
  timer.unref();
  return {
    stop() {
      clearInterval(timer);
      sample();
      const mb = (x) => Math.round(x / MB);
      return {
        peakMB: Object.fromEntries(Object.entries(peak).map(([k, v]) => [k, { rss: mb(v.rss), anon: mb(v.anon), file: mb(v.file) }])),
        // One row a second is enough to see the shape.
        seriesMB: series.filter((_, i) => i % Math.max(1, Math.round(1000 / periodMs)) === 0),
      };
    },
  };
}

/** The V8 heap and backlog gauges of a process's /metrics, when it serves them. */
async function scrape(address) {
  if (!address) return undefined;
  try {
    const res = await fetch(`http://${address}/metrics`, { signal: AbortSignal.timeout(2000) });
    const text = await res.text();
    const out = {};
    for (const line of text.split("\n")) {
      const m = /^(?:rexmesh_)?(nodejs_heap_size_used_bytes|process_resident_memory_bytes|result_backlog_items|store_used_bytes)(?:\{[^}]*\})? ([\d.e+-]+)$/.exec(line);
      if (m) out[m[1]] = Number(m[2]);
    }
    return out;
  } catch {
    return undefined;
  }
}

/** The content the host writes: its step, and its expected SHA-256 (computed here). */
function makeContent(kind, bytes, dir) {
  if (kind === "random") {
    const file = join(dir, "output.bin");
    const fd = openSync(file, "w");
    const hash = createHash("sha256");
    const buf = Buffer.alloc(4 * MiB);
    for (let left = bytes; left > 0; ) {
      const n = Math.min(left, buf.length);
      randomFillSync(buf, 0, n);
      writeSync(fd, buf, 0, n);
      hash.update(buf.subarray(0, n));
      left -= n;
    }
    closeSync(fd);
    return { argv: ["cat", file], sha256: hash.digest("hex") };
  }
  const hash = createHash("sha256");
  const zeros = Buffer.alloc(4 * MiB);
  for (let left = bytes; left > 0; left -= zeros.length) hash.update(left >= zeros.length ? zeros : zeros.subarray(0, left));
  return { argv: ["head", "-c", String(bytes), "/dev/zero"], sha256: hash.digest("hex") };
}

/**
 * Submits the job and follows it with output until it is done.
 * readMBps > 0 paces the reader: after each batch it sleeps until bytes/elapsed ≤ readMBps.
 * stall: after the first batch the reader stops reading until the job is done
 * (seen on a second watch without output), then reads the rest (paced): a
 * reader slower than the producer whatever the machine's speed.
 */
async function runOnce(client, { argv, bytes, readMBps = 0, stall = false, timeoutMs }) {
  const signal = AbortSignal.timeout(Math.ceil(timeoutMs));
  const hash = createHash("sha256");
  let received = 0;
  let batches = 0;
  let maxBatch = 0;
  let firstByteMs;
  let lastByteMs;
  let finalJob;
  let task;
  const t0 = performance.now();
  const { job } = await client.submitJob(
    { hostIds: [HOST], steps: [{ tool: { case: "exec", value: { argv } } }], outputLimitBytes: BigInt(bytes + MiB), timeout: { seconds: BigInt(Math.ceil(timeoutMs / 1000)), nanos: 0 } },
    { signal },
  );
  const submitMs = performance.now() - t0;
  let producedMs;
  const produced = stall
    ? (async () => {
        for await (const b of client.watchJob({ jobId: job.id, noOutput: true }, { signal })) if (b.job?.state === JOB_DONE) return (producedMs = performance.now() - t0);
      })()
    : undefined;
  let readStart;
  let stalledMs = 0;
  for await (const b of client.watchJob({ jobId: job.id }, { signal })) {
    let n = 0;
    for (const c of b.output) {
      if (c.stream !== 1) continue;
      hash.update(c.data);
      n += c.data.length;
    }
    if (n > 0) {
      batches++;
      maxBatch = Math.max(maxBatch, n);
      received += n;
      const now = performance.now();
      firstByteMs ??= now - t0;
      readStart ??= now;
      lastByteMs = now - t0;
      if (produced && batches === 1) {
        await produced;
        stalledMs = performance.now() - now;
        readStart = performance.now();
      }
      if (readMBps > 0) {
        const due = readStart + ((received / MB) * 1000) / readMBps;
        if (due > now) await new Promise((r) => setTimeout(r, due - now));
      }
    }
    for (const t of b.tasks) task = t;
    if (b.job?.state === JOB_DONE) finalJob = b.job;
  }
  const doneMs = performance.now() - t0;
  return {
    jobId: job.id,
    bytes: received,
    expectedBytes: bytes,
    sha256: hash.digest("hex"),
    taskState: task?.state,
    truncated: task?.outputTruncated ?? false,
    jobDone: finalJob !== undefined,
    batches,
    avgBatchKiB: batches ? Math.round(received / batches / 1024) : 0,
    maxBatchKiB: Math.round(maxBatch / 1024),
    submitMs: Math.round(submitMs),
    firstByteMs: Math.round(firstByteMs ?? 0),
    lastByteMs: Math.round(lastByteMs ?? 0),
    doneMs: Math.round(doneMs),
    mbps: lastByteMs ? +(received / MB / (lastByteMs / 1000)).toFixed(1) : 0,
    ...(stall
      ? {
          // Until the job was done, with the reader stalled: the producer's pace into the controller's store.
          producedMs: Math.round(producedMs ?? 0),
          producedMBps: producedMs ? +(bytes / MB / (producedMs / 1000)).toFixed(1) : 0,
          stalledMs: Math.round(stalledMs),
          // The reading after the stall.
          readAfterStallMBps: lastByteMs && producedMs ? +(received / MB / ((lastByteMs - producedMs) / 1000)).toFixed(1) : 0,
        }
      : {}),
  };
}

/**
 * One mesh (controller, one proxy, one daemon with one host); runs a small
 * warm-up job and then one measured job, sampling memory and CPU. Every mesh
 * process preloads bench/lib/cpuprofile.mjs to report its V8 heap, external
 * and ArrayBuffer peaks at exit; with profile, it also profiles the CPU
 * during the measured job only (SIGUSR2 before submit and after the end).
 */
async function part({ label, bytes, content, readMBps = 0, stall = false, work, profile = false }) {
  const storeSize = Math.max(8 * 1024 ** 3, 3 * bytes);
  const metrics = ["--metrics-listen", "127.0.0.1:0"];
  const profDir = join(work, `prof-${label.replace(/\W+/g, "")}`);
  // LocalMesh gives its processes this process's environment when it spawns them.
  const saved = { NODE_OPTIONS: process.env.NODE_OPTIONS, BENCH_PROF_DIR: process.env.BENCH_PROF_DIR, BENCH_PROF_WHAT: process.env.BENCH_PROF_WHAT };
  const restoreEnv = () => {
    for (const [k, v] of Object.entries(saved)) if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  };
  Object.assign(process.env, profilingEnv(profDir, { cpu: profile, window: true, memory: true }));
  let meshDir;
  let procs = [];
  let result;
  try {
    const plan = {
      regions: ["r1"],
      hosts: [{ id: HOST, region: "r1" }],
      controllerArgs: ["--store-size", String(storeSize), ...metrics],
      proxyArgs: ["--store-size", String(storeSize), ...metrics],
      daemonArgs: ["--store-size", String(Math.max(2 * 1024 ** 3, 2 * bytes)), ...metrics],
    };
    result = await withMesh(plan, async (client, mesh) => {
      // The children have their environment now; this process (the client) does not profile itself.
      restoreEnv();
      meshDir = mesh.dir;
      procs = roleProcs(mesh);
      const roles = procs.filter((p) => p.name !== "client");
      const addr = { controller: mesh.controller.info?.metricsAddress, proxy: mesh.proxies[0].info?.metricsAddress, daemon: mesh.daemons[0].info?.metricsAddress };
      const warm = await runOnce(client, { argv: ["head", "-c", String(8 * MiB), "/dev/zero"], bytes: 8 * MiB, timeoutMs: 60_000 });
      if (warm.bytes !== 8 * MiB) throw new Error(`warm-up job received ${warm.bytes} of ${8 * MiB} bytes`);
      const cpu0 = procs.map((p) => cpuSeconds(p.pid));
      const heapPeak = { controller: 0, proxy: 0, daemon: 0 };
      let backlogPeak = 0;
      const scraper = setInterval(async () => {
        for (const [k, a] of Object.entries(addr)) {
          const m = await scrape(a);
          if (m?.nodejs_heap_size_used_bytes) heapPeak[k] = Math.max(heapPeak[k], m.nodejs_heap_size_used_bytes);
          if (k === "proxy" && m?.result_backlog_items !== undefined) backlogPeak = Math.max(backlogPeak, m.result_backlog_items);
        }
      }, 1000);
      scraper.unref();
      const mem = memSampler(procs);
      // Starts (and below stops) the CPU profile of each role process; a process already gone is skipped.
      const toggleProfile = () => {
        for (const p of roles) {
          try {
            process.kill(p.pid, "SIGUSR2");
          } catch {
            /* exited */
          }
        }
      };
      if (profile) toggleProfile();
      const w0 = performance.now();
      let run;
      let m;
      try {
        // Generous bound: 60 s plus 1 s per 2 MB (and the paced reading time).
        const timeoutMs = 60_000 + (bytes / (2 * MB)) * 1000 + (readMBps ? (bytes / MB / readMBps) * 1000 : 0);
        run = await runOnce(client, { argv: content.argv, bytes, readMBps, stall, timeoutMs });
      } finally {
        clearInterval(scraper);
        m = mem.stop();
        if (profile) toggleProfile();
      }
      const wallS = (performance.now() - w0) / 1000;
      const cpu = Object.fromEntries(
        procs.map((p, i) => {
          const c = cpuSeconds(p.pid);
          const own = +(c.own - cpu0[i].own).toFixed(2);
          return [p.name, p.name === "daemon" ? { s: own, children: +(c.children - cpu0[i].children).toFixed(2) } : { s: own }];
        }),
      );
      const store = {};
      for (const [k, a] of Object.entries(addr)) store[k] = Math.round(((await scrape(a))?.store_used_bytes ?? 0) / MB);
      const mb = run.bytes / MB;
      const cpuTotal = Object.values(cpu).reduce((a, c) => a + c.s + (c.children ?? 0), 0);
      const cpuMax = Math.max(...roles.map((p) => cpu[p.name].s));
      return {
        label,
        ...run,
        verified: run.bytes === bytes && run.sha256 === content.sha256 && run.taskState === SUCCEEDED && !run.truncated,
        readMBps: readMBps || undefined,
        wallS: +wallS.toFixed(1),
        cpuSeconds: cpu,
        cpuMsPerMB: Object.fromEntries(Object.entries(cpu).map(([k, c]) => [k, +((1000 * c.s) / mb).toFixed(1)])),
        cpuPercentOfAllCores: Math.round((100 * cpuTotal) / (wallS * os.cpus().length)),
        // What the CPU cost alone would allow on this machine with nothing else running:
        // the busiest process on one core, and all of them sharing every core.
        cpuBoundMBps: +Math.min(mb / cpuMax, mb / (cpuTotal / os.cpus().length)).toFixed(1),
        peakMB: m.peakMB,
        heapScrapedPeakMB: Object.fromEntries(Object.entries(heapPeak).map(([k, v]) => [k, Math.round(v / MB)])),
        proxyBacklogPeakItems: backlogPeak,
        storeUsedMB: store,
        seriesMB: m.seriesMB,
        pids: roles,
      };
    });
  } finally {
    restoreEnv();
    if (meshDir) rmSync(meshDir, { recursive: true, force: true });
  }
  // The mesh has stopped: every process wrote its reports at exit.
  const names = new Map(result.pids.map((p) => [p.pid, p.name]));
  try {
    const reports = memoryReports(profDir);
    result.v8PeakMB = Object.fromEntries(reports.map((r) => [names.get(r.pid) ?? `pid ${r.pid}`, Object.fromEntries(Object.entries(r.peak).map(([k, v]) => [k, Math.round(v / MB)]))]));
    // Over the process's whole life (start-up and warm-up included).
    result.gc = Object.fromEntries(reports.map((r) => [names.get(r.pid) ?? `pid ${r.pid}`, r.gc]));
    if (profile) result.profile = summariseDir(profDir, { top: 12 }).map((s) => ({ role: names.get(s.pid) ?? `pid ${s.pid}`, ...s, file: undefined }));
  } catch (err) {
    result.profileError = String(err);
  }
  return result;
}

/**
 * Do the link plumbing's queues keep frames alive after use? In a child
 * process, 64 frames of 1 MiB go (1) through common/frame-link.js
 * untilClosed, which wraps every link's `incoming`, vs the bare iterator,
 * with the link still open; (2) through common/async-queue.js AsyncQueue,
 * which holds every Connect link's outgoing frames, pushed and taken one at
 * a time. Reports the ArrayBuffer memory left after two full GCs.
 */
function retentionProbe() {
  const dist = (f) => JSON.stringify(new URL(`../../dist/common/${f}`, import.meta.url).href);
  const script = `
    const { untilClosed } = await import(${dist("frame-link.js")});
    const { AsyncQueue } = await import(${dist("async-queue.js")});
    const N = 64;
    const frame = () => new Uint8Array(1 << 20);
    async function* src() { for (let i = 0; i < N; i++) yield frame(); }
    const open = new Promise(() => {});
    const left = () => { globalThis.gc(); globalThis.gc(); return Math.round(process.memoryUsage().arrayBuffers / 1e6); };
    const out = {};
    for await (const f of src()) void f;
    out.plainIterator = left();
    const wrapped = untilClosed(src(), open);
    for await (const f of wrapped) void f;
    out.untilClosed = left();
    const q = new AsyncQueue();
    for (let i = 0; i < N; i++) { q.push(frame()); await q.next(); }
    out.asyncQueue = left() - out.untilClosed;
    console.log(JSON.stringify({ framesMiB: N, arrayBuffersMBAfterGc: out, queueSizeAfter: q.size }));
  `;
  return new Promise((resolve) =>
    execFile(process.execPath, ["--expose-gc", "--input-type=module", "-e", script], { timeout: 30_000 }, (err, stdout) => {
      try {
        resolve(err ? { error: String(err.message).split("\n")[0] } : JSON.parse(stdout.trim()));
      } catch {
        resolve({ error: `unexpected output: ${stdout}` });
      }
    }),
  );
}

export default {
  name: "output-throughput",
  title: "output of one host → client through proxy and controller (1 GiB)",
  target: "≥ 100 MB/s; slow reader: proxy ≤ 256 MB RSS",
  async run() {
    const bytes = Math.round(opt("mb", 1024) * MiB);
    const slow = opt("slow-mbps", 32);
    const parts = String(opt("part", "ab")).toLowerCase();
    const kind = opt("content", "zero");
    const profile = String(opt("profile", "auto"));
    const work = scratch("output");
    const result = { bytes, mib: bytes / MiB, content: kind, load: os.loadavg().map((x) => +x.toFixed(2)) };
    try {
      log(`content: ${kind}, ${bytes / MiB} MiB`);
      const content = makeContent(kind, bytes, work);
      result.expectedSha256 = content.sha256;
      if (parts.includes("a")) {
        log("part A: throughput");
        result.a = await part({ label: "A", bytes, content, work });
        log(`part A: ${result.a.mbps} MB/s, verified ${result.a.verified}, peaks ${JSON.stringify(result.a.peakMB)}`);
      }
      if (parts.includes("b")) {
        log(`part B: slow reader: stalled until the job is done, then ≤ ${slow} MB/s`);
        result.b = await part({ label: "B", bytes, content, readMBps: slow, stall: true, work });
        log(`part B: produced at ${result.b.producedMBps} MB/s with the reader stalled ${result.b.stalledMs} ms, then read at ${result.b.readAfterStallMBps} MB/s; verified ${result.b.verified}, peaks ${JSON.stringify(result.b.peakMB)}`);
      }
      const want = profile === "1" || (profile === "auto" && result.a && result.a.mbps < TARGET_MBPS);
      if (want) {
        const pbytes = Math.min(bytes, Math.round(opt("profile-mb", 512) * MiB));
        const pcontent = pbytes === bytes ? content : makeContent("zero", pbytes, work);
        log(`profiled part A run (${pbytes / MiB} MiB)`);
        const pr = await part({ label: "P", bytes: pbytes, content: pcontent, work, profile: true });
        result.profiled = { ...pr, seriesMB: undefined };
        log(`profiled run: ${pr.mbps} MB/s`);
      }
      result.load.push(...os.loadavg().map((x) => +x.toFixed(2)));
      result.retentionProbe = await retentionProbe();
      result.notes = notes(result);
      return result;
    } finally {
      rmSync(work, { recursive: true, force: true });
    }
  },
  verdict: (r) => {
    // The machine is shared: what the CPU cost alone allows (cpuBoundMBps) moves less than the wall-clock rate.
    const a = r.a ? `${r.a.mbps} MB/s (${r.mib} MiB${r.a.verified ? ", verified" : ", NOT VERIFIED"}; CPU-bound ${r.a.cpuBoundMBps} MB/s)` : "throughput not run";
    // Every hop's peak RSS, with its anonymous part (heap, buffers) and its file part (LMDB's mapped store pages, reclaimable).
    const hops = (p) => ["controller", "proxy", "daemon"].map((k) => `${k} ${p.peakMB[k].rss} (anon ${p.peakMB[k].anon}, file ${p.peakMB[k].file})`).join(", ");
    const b = r.b ? `slow reader (stalled, then ≤ ${r.b.readMBps} MB/s): proxy peak ${r.b.peakMB.proxy.rss} MB RSS; peak RSS MB per hop: ${hops(r.b)}` : "slow reader not run";
    const met = r.a && r.b ? r.a.verified && r.b.verified && r.a.mbps >= TARGET_MBPS && r.b.peakMB.proxy.rss * MB <= TARGET_PROXY_RSS : undefined;
    return { figure: `${a}; ${b}`, met };
  },
  plot: (r) => [
    { title: "output throughput, host → client (MB/s)", unit: "MB/s", bars: [...(r.a ? [{ label: "measured", value: r.a.mbps }] : []), ...(r.a ? [{ label: "CPU-bound estimate", value: r.a.cpuBoundMBps }] : []), { label: "target", value: TARGET_MBPS, ref: true }] },
    ...(r.b
      ? [
          {
            title: `peak RSS with a stalled, then slow (≤ ${r.b.readMBps} MB/s) reader (MB)`,
            unit: "MB",
            bars: [
              { label: "proxy", value: r.b.peakMB.proxy.rss },
              { label: "controller", value: r.b.peakMB.controller.rss },
              { label: "daemon", value: r.b.peakMB.daemon.rss },
              { label: "target (proxy)", value: TARGET_PROXY_RSS / MB, ref: true },
            ],
          },
        ]
      : []),
  ],
};

/** The markdown notes: figures, and the profile's top functions when there is one. */
function notes(r) {
  const roles = ["controller", "proxy", "daemon"];
  const lines = [];
  const row = (p) =>
    `| ${p.label} | ${p.mbps} | ${p.firstByteMs} / ${p.lastByteMs} | ${roles.map((k) => `${p.peakMB[k].rss} (${p.peakMB[k].anon})`).join(" | ")} | ${roles.map((k) => p.v8PeakMB?.[k] ? `${p.v8PeakMB[k].heapUsed} / ${p.v8PeakMB[k].external}` : "–").join(" | ")} | ${roles.map((k) => p.cpuMsPerMB[k]).join(" / ")} | ${p.cpuPercentOfAllCores}% | ${p.cpuBoundMBps} |`;
  lines.push(
    `${r.mib} MiB of \`${r.content}\` output, one host, one proxy, controller; load average (1, 5, 15 min) at start ${r.load.slice(0, 3).join(", ")}, at end ${r.load.slice(3).join(", ")} — the machine is shared, figures move with it.`,
    ``,
    `| part | MB/s | first / last byte ms | controller peak RSS (anon) MB | proxy peak RSS (anon) MB | daemon peak RSS (anon) MB | ctl heap / external MB | proxy heap / external MB | daemon heap / external MB | CPU ms per MB ctl / proxy / daemon | CPU of all cores | CPU-bound MB/s |`,
    `| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |`,
  );
  for (const p of [r.a, r.b, r.profiled].filter(Boolean)) lines.push(row(p));
  lines.push(``, `${r.b ? `B: the reader takes one batch, stops reading until the job is done (${r.b.stalledMs} ms; the host's output reached the controller at ${r.b.producedMBps} MB/s meanwhile), then reads the rest at ≤ ${r.b.readMBps} MB/s (${r.b.readAfterStallMBps} MB/s); its MB/s column is over the whole time. ` : ""}"CPU-bound MB/s": MB / max(CPU s of the busiest process, total CPU s / cores), what CPU alone would allow on an idle machine. Heap / external: peaks of process.memoryUsage() inside each process.`, ``);
  const gcRows = [r.a, r.b, r.profiled].filter((p) => p?.gc);
  if (gcRows.length) {
    lines.push(`Garbage collection over each process's life (perf_hooks 'gc' entries: count, pause ms):`, ``, `| part | controller major / minor | proxy major / minor | daemon major / minor |`, `| --- | --- | --- | --- |`);
    const g = (x) => (x ? `${x.major?.count ?? 0} (${x.major?.ms ?? 0} ms) / ${x.minor?.count ?? 0} (${x.minor?.ms ?? 0} ms)` : "–");
    for (const p of gcRows) lines.push(`| ${p.label} | ${g(p.gc.controller)} | ${g(p.gc.proxy)} | ${g(p.gc.daemon)} |`);
    lines.push(``);
  }
  const probe = r.retentionProbe?.arrayBuffersMBAfterGc;
  if (probe) {
    lines.push(
      `Retention probe (${r.retentionProbe.framesMiB} frames of 1 MiB, ArrayBuffers still alive after two full GCs): plain iterator ${probe.plainIterator} MB; through common/frame-link.ts \`untilClosed\` (wraps every link's \`incoming\`, link still open) ${probe.untilClosed} MB; through common/async-queue.ts \`AsyncQueue\` (every Connect link's outgoing frames), pushed and taken one at a time, ${probe.asyncQueue} MB more with the queue empty.`,
      ``,
      `- \`untilClosed\`: each \`next()\` is \`Promise.race([it.next(), end])\` on the one long-lived \`closed\` promise; every race adds a reaction to \`end\` that holds the race's result (the frame) until the link closes, so a link keeps every frame it ever received (proxy: all output from the daemon; controller: all output from the proxy).`,
      `- \`AsyncQueue.next()\` advances \`head\` without clearing the slot and compacts only once more than 1,024 items were taken, so up to 1,024 frames already written (up to 4 MiB each) stay referenced (proxy: its uplink to the controller).`,
      ``,
    );
  }
  if (r.profiled?.profile) {
    lines.push(`Profiled run (P: ${r.profiled.bytes / MiB} MiB, ${r.profiled.mbps} MB/s under the profiler, measured job only): self time by process.`, ``);
    for (const p of r.profiled.profile) lines.push(toMarkdown(p.role, p, { top: 8 }));
  }
  return lines.join("\n");
}
