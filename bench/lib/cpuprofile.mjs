// Summarises V8 .cpuprofile files (written by `node --cpu-prof`): self time
// per function (name + script + line), per package/area, and per process.
//
//   node bench/lib/cpuprofile.mjs DIR_OR_FILE... [--top 15]
//   node bench/lib/cpuprofile.mjs --alloc DIR_OR_FILE... [--top 15]   (allocations: BENCH_PROF_ALLOC=1)
//
// Node 20 refuses --cpu-prof in NODE_OPTIONS, so mesh processes (started by
// LocalMesh with this process's environment) are profiled by preloading this
// module instead: NODE_OPTIONS="--import <this file>" with
// BENCH_PROF_DIR=<dir> (see profilingEnv). It starts the V8 profiler through
// node:inspector and writes CPU.0.0.<pid>.0.1.cpuprofile on exit (roles exit
// through process.exit on SIGTERM, which runs 'exit' handlers) or, in window
// mode, between two SIGUSR2s.
//
// A profile holds a call tree (`nodes`, each with a callFrame) and a list of
// samples (`samples`: node ids) with the time since the previous sample in
// microseconds (`timeDeltas`). A sample's duration is the gap until the next
// sample (the last one runs to `endTime`), as Chrome DevTools counts it.
import { readdirSync, readFileSync, statSync } from "node:fs";
import { basename, join, relative } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { isMainThread } from "node:worker_threads";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));

/** A script URL made short: relative to the repository, node_modules/<pkg>/…, node:… as is. */
export function shortUrl(url) {
  if (!url) return "";
  const u = url.startsWith("file://") ? fileURLToPath(url) : url;
  const nm = u.lastIndexOf("/node_modules/");
  if (nm >= 0) return u.slice(nm + 1);
  if (u.startsWith(ROOT)) return relative(ROOT, u);
  return u;
}

/** Where a script belongs: "rexmesh:<dir>", a package name, "node:internal", or a V8 pseudo-frame. */
export function areaOf(url, functionName) {
  if (!url) return functionName.startsWith("(") ? functionName : "(native)";
  const u = shortUrl(url);
  const nm = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(u);
  if (nm) return nm[1];
  if (u.startsWith("node:")) return "node:internal";
  const top = /^dist\/([^/]+)\//.exec(u);
  if (top) return `rexmesh:${top[1]}`;
  return u;
}

/**
 * Self time per function of one profile.
 * Returns { busyMs, idleMs, byFunction: [{ name, url, line, selfMs, pct }], byArea: [{ area, selfMs, pct }] },
 * sorted by selfMs; "(idle)" (the event loop waiting) is left out and pct is of busyMs.
 */
export function summarise(profile, { top = 15 } = {}) {
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const selfUs = new Map();
  const { samples = [], timeDeltas = [] } = profile;
  let t = profile.startTime;
  const stamps = samples.map((_, i) => (t += timeDeltas[i] ?? 0));
  for (let i = 0; i < samples.length; i++) {
    const dur = i + 1 < samples.length ? stamps[i + 1] - stamps[i] : Math.max(0, profile.endTime - stamps[i]);
    selfUs.set(samples[i], (selfUs.get(samples[i]) ?? 0) + dur);
  }
  const sums = tally();
  let idle = 0;
  for (const [id, us] of selfUs) {
    const n = byId.get(id);
    if (!n) continue;
    // Waiting in the event loop: not work; reported apart, percentages are of the busy time.
    if (n.callFrame.functionName === "(idle)") {
      idle += us;
      continue;
    }
    sums.add(n.callFrame, us);
  }
  const ms = (us) => +(us / 1000).toFixed(1);
  const { total, byFunction, byArea } = sums.top(top);
  return {
    busyMs: ms(total),
    idleMs: ms(idle),
    byFunction: byFunction.map((f) => ({ name: f.name, url: f.url, line: f.line, selfMs: ms(f.amount), pct: f.pct })),
    byArea: byArea.map((a) => ({ area: a.area, selfMs: ms(a.amount), pct: a.pct })),
  };
}

/** Sums an amount (µs, bytes) per function (name + script + line) and per area, for the summaries. */
function tally() {
  const fns = new Map();
  const areas = new Map();
  let total = 0;
  return {
    add(cf, amount) {
      const name = cf.functionName || "(anonymous)";
      const key = `${name}\u0000${cf.url}\u0000${cf.lineNumber}`;
      const f = fns.get(key) ?? { name, url: shortUrl(cf.url), line: cf.lineNumber + 1, amount: 0 };
      f.amount += amount;
      fns.set(key, f);
      const area = areaOf(cf.url, name);
      areas.set(area, (areas.get(area) ?? 0) + amount);
      total += amount;
    },
    /** The `top` functions and areas by amount, each with its share of the total (pct). */
    top(top) {
      const pct = (x) => +((100 * x) / (total || 1)).toFixed(1);
      return {
        total,
        byFunction: [...fns.values()].sort((a, b) => b.amount - a.amount).slice(0, top).map((f) => ({ ...f, pct: pct(f.amount) })),
        byArea: [...areas].sort((a, b) => b[1] - a[1]).slice(0, top).map(([area, amount]) => ({ area, amount, pct: pct(amount) })),
      };
    },
  };
}

/**
 * Bytes allocated per function (self: where the allocation was made) in a
 * sampling heap profile (ALLOC.<pid>.heapprofile, see BENCH_PROF_ALLOC): each
 * sample stands for its size, so the sums estimate what each function
 * allocated during the window, whether or not it was freed since. Returns
 * { totalMiB, byFunction: [{ name, url, line, mib, pct }], byArea }.
 */
export function summariseAllocations(profile, { top = 15 } = {}) {
  const t = tally();
  const visit = (node) => {
    if (node.selfSize > 0) t.add(node.callFrame, node.selfSize);
    for (const c of node.children ?? []) visit(c);
  };
  visit(profile.head);
  const mib = (b) => +(b / 2 ** 20).toFixed(1);
  const { total, byFunction, byArea } = t.top(top);
  return {
    totalMiB: mib(total),
    byFunction: byFunction.map((f) => ({ name: f.name, url: f.url, line: f.line, mib: mib(f.amount), pct: f.pct })),
    byArea: byArea.map((a) => ({ area: a.area, mib: mib(a.amount), pct: a.pct })),
  };
}

/** The pid in a --cpu-prof file name (CPU.<date>.<time>.<pid>.<thread>.<seq>.cpuprofile). */
export function pidOfProfileFile(file) {
  const m = /^CPU\.\d+\.\d+\.(\d+)\.\d+\.\d+\.cpuprofile$/.exec(basename(file));
  return m ? Number(m[1]) : undefined;
}

/** Every .cpuprofile in a directory with its pid and summary. */
export function summariseDir(dir, opts) {
  return readdirSync(dir)
    .filter((f) => f.endsWith(".cpuprofile"))
    .map((f) => ({ file: join(dir, f), pid: pidOfProfileFile(f), ...summarise(JSON.parse(readFileSync(join(dir, f), "utf8")), opts) }));
}

/** A summary as a markdown block: the top functions and areas by self time. */
export function toMarkdown(label, s, { top = 10 } = {}) {
  const lines = [`**${label}** — ${(s.busyMs / 1000).toFixed(2)} s busy, ${(s.idleMs / 1000).toFixed(2)} s idle (% of busy time)`, ``, `| self ms | % | function | where |`, `| ---: | ---: | --- | --- |`];
  for (const f of s.byFunction.slice(0, top)) lines.push(`| ${f.selfMs} | ${f.pct} | \`${f.name}\` | ${f.url ? `${f.url}:${f.line}` : ""} |`);
  lines.push(``, `By area: ${s.byArea.slice(0, 8).map((a) => `${a.area} ${a.pct}%`).join(", ")}`, ``);
  return lines.join("\n");
}

/**
 * Environment additions that make Node processes started with them profile
 * themselves into dir: pass to a child's env, or set on process.env around
 * LocalMesh.start(). window: profile only between a first and a second
 * SIGUSR2 (the profile is written at the second, or at exit). memory: also
 * sample process.memoryUsage() every 250 ms and write the peaks, the current
 * values, GC counts and V8 heap spaces to MEM.<pid>.json in dir at exit and
 * at every SIGUSR2 (V8 heap vs. buffers vs. the rest of RSS).
 */
export function profilingEnv(dir, { cpu = true, window = false, memory = false, base = process.env.NODE_OPTIONS } = {}) {
  return {
    NODE_OPTIONS: `${base ? base + " " : ""}--import ${pathToFileURL(fileURLToPath(import.meta.url)).href}`,
    BENCH_PROF_DIR: dir,
    BENCH_PROF_WHAT: [cpu && (window ? "cpu-window" : "cpu"), memory && "memory"].filter(Boolean).join(","),
  };
}

/** Profiles this process when preloaded (see profilingEnv). */
async function preload(dir, what) {
  const { writeFileSync, mkdirSync } = await import("node:fs");
  const write = (name, text) => {
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, name), text);
  };
  if (what.includes("memory")) {
    const peak = {};
    const sample = () => {
      for (const [k, v] of Object.entries(process.memoryUsage())) peak[k] = Math.max(peak[k] ?? 0, v);
    };
    setInterval(sample, 250).unref();
    // Garbage collections by kind (minor, major, incremental, weakcb): count and pause ms.
    const { PerformanceObserver, constants } = await import("node:perf_hooks");
    const v8 = await import("node:v8");
    const kinds = { [constants.NODE_PERFORMANCE_GC_MINOR]: "minor", [constants.NODE_PERFORMANCE_GC_MAJOR]: "major", [constants.NODE_PERFORMANCE_GC_INCREMENTAL]: "incremental", [constants.NODE_PERFORMANCE_GC_WEAKCB]: "weakcb" };
    const gc = {};
    new PerformanceObserver((list) => {
      for (const e of list.getEntries()) {
        const k = kinds[e.detail?.kind] ?? String(e.detail?.kind);
        const g = (gc[k] ??= { count: 0, ms: 0 });
        g.count++;
        g.ms += e.duration;
      }
    }).observe({ entryTypes: ["gc"] });
    // Written at exit, and at every SIGUSR2 (a snapshot while the process still runs, e.g. idle).
    const report = (when) => {
      const last = process.memoryUsage();
      sample();
      const gcMs = Object.fromEntries(Object.entries(gc).map(([k, g]) => [k, { count: g.count, ms: Math.round(g.ms) }]));
      // V8's heap by space now: size (committed) and used bytes.
      const spaces = Object.fromEntries(v8.getHeapSpaceStatistics().map((x) => [x.space_name, { size: x.space_size, used: x.space_used_size }]));
      write(`MEM.${process.pid}.json`, JSON.stringify({ pid: process.pid, when, argv: process.argv.slice(1, 3), peak, last, gc: gcMs, spaces }));
    };
    process.on("SIGUSR2", () => report("signal"));
    process.on("exit", () => report("exit"));
  }
  if (!what.includes("cpu")) return;
  const inspector = await import("node:inspector");
  const session = new inspector.Session();
  session.connect();
  session.post("Profiler.enable");
  session.post("Profiler.setSamplingInterval", { interval: 1000 });
  // BENCH_PROF_ALLOC=1: the same window also samples allocations (one sample per 16 KiB allocated, on average),
  // written as ALLOC.<pid>.heapprofile (summarised by `node bench/lib/cpuprofile.mjs --alloc DIR`).
  const alloc = what.includes("alloc");
  if (alloc) session.post("HeapProfiler.enable");
  let running = false;
  const start = () => {
    session.post("Profiler.start");
    if (alloc) session.post("HeapProfiler.startSampling", { samplingInterval: 16384, includeObjectsCollectedByMajorGC: true, includeObjectsCollectedByMinorGC: true });
    running = true;
  };
  // In-process inspector calls answer synchronously, so this completes also in an 'exit' handler.
  const stop = () => {
    if (!running) return;
    running = false;
    session.post("Profiler.stop", (err, r) => {
      if (!err && r?.profile) write(`CPU.0.0.${process.pid}.0.1.cpuprofile`, JSON.stringify(r.profile));
    });
    if (alloc) {
      session.post("HeapProfiler.stopSampling", (err, r) => {
        if (!err && r?.profile) write(`ALLOC.${process.pid}.heapprofile`, JSON.stringify(r.profile));
      });
    }
  };
  if (what.includes("cpu-window")) {
    let signals = 0;
    process.on("SIGUSR2", () => (++signals === 1 ? start() : stop()));
  } else start();
  process.on("exit", stop);
}

const isCli = Boolean(process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]);
if (process.env.BENCH_PROF_DIR && isMainThread && !isCli) {
  const dir = process.env.BENCH_PROF_DIR;
  const what = `${process.env.BENCH_PROF_WHAT ?? "cpu"}${process.env.BENCH_PROF_ALLOC === "1" ? ",alloc" : ""}`;
  // Not inherited by what this process starts (commands run by a daemon).
  delete process.env.BENCH_PROF_DIR;
  delete process.env.BENCH_PROF_WHAT;
  delete process.env.BENCH_PROF_ALLOC;
  await preload(dir, what);
}

/** Reads the MEM.<pid>.json files a memory-profiled run left in dir. */
export function memoryReports(dir) {
  return readdirSync(dir)
    .filter((f) => /^MEM\.\d+\.json$/.test(f))
    .map((f) => JSON.parse(readFileSync(join(dir, f), "utf8")));
}

if (isCli) {
  const args = process.argv.slice(2);
  const ti = args.indexOf("--top");
  const top = ti >= 0 ? Number(args.splice(ti, 2)[1]) : 15;
  const ai = args.indexOf("--alloc");
  if (ai >= 0) {
    args.splice(ai, 1);
    for (const p of args) {
      const files = statSync(p).isDirectory() ? readdirSync(p).filter((f) => f.endsWith(".heapprofile")).map((f) => join(p, f)) : [p];
      for (const f of files) {
        const a = summariseAllocations(JSON.parse(readFileSync(f, "utf8")), { top });
        const lines = [`**${basename(f)}** — ${a.totalMiB} MiB allocated (sampled)`, ``, `| MiB | % | function | where |`, `| ---: | ---: | --- | --- |`];
        for (const x of a.byFunction) lines.push(`| ${x.mib} | ${x.pct} | \`${x.name}\` | ${x.url ? `${x.url}:${x.line}` : ""} |`);
        lines.push(``, `By area: ${a.byArea.slice(0, 8).map((x) => `${x.area} ${x.pct}%`).join(", ")}`, ``);
        process.stdout.write(lines.join("\n") + "\n");
      }
    }
    process.exit(0);
  }
  for (const p of args) {
    const files = statSync(p).isDirectory() ? readdirSync(p).filter((f) => f.endsWith(".cpuprofile")).map((f) => join(p, f)) : [p];
    for (const f of files) process.stdout.write(toMarkdown(basename(f), summarise(JSON.parse(readFileSync(f, "utf8")), { top }), { top }) + "\n");
  }
}
