// Idle memory of real daemon processes, one host per process.
//
// Starts a mesh with --hosts daemons (one host each), runs one small job on
// every host (so the task, spawn and output paths have run), lets them sit
// idle for --idle seconds and reads each daemon's memory from /proc: VmRSS
// (the figure the target is about), RssAnon / RssFile (the node binary's
// pages are file-backed and shared by every daemon on a machine) and PSS
// (smaps_rollup: shared pages divided among the processes mapping them).
// The V8 heap in use comes from the daemon's own /metrics (a second mesh, run with --metrics-listen).
//
// Diagnosis (when the median misses the target, or --diagnose 1): what the
// memory is made of — RSS of a bare `node`, and of node after only importing
// the modules a daemon process loads, and of every role's modules;
// V8 heap spaces, external and ArrayBuffer memory inside idle daemons (preload
// of bench/lib/cpuprofile.mjs); and the same mesh with --max-semi-space-size=1.
//
//   node bench/run.mjs daemon-idle-memory [--hosts 5] [--idle 8] [--diagnose auto|1|0]
import { execFile } from "node:child_process";
import { readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { JOB_DONE, log, median, opt, pingStep, scratch, succeededCount, withMesh } from "../lib/common.mjs";
import { memoryReports, profilingEnv } from "../lib/cpuprofile.mjs";

const MB = 1e6;
const TARGET_MB = 50;
const ROOT = fileURLToPath(new URL("../..", import.meta.url));

/** Memory of a process from /proc, in MB (undefined when it is gone). */
function procMem(pid) {
  try {
    const s = readFileSync(`/proc/${pid}/status`, "utf8");
    const kb = (k) => Number(new RegExp(`${k}:\\s+(\\d+) kB`).exec(s)?.[1] ?? 0);
    let pss;
    try {
      pss = Number(/^Pss:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/smaps_rollup`, "utf8"))?.[1]);
    } catch {
      /* older kernels */
    }
    const mb = (x) => +((x * 1024) / MB).toFixed(1);
    const threads = Number(/^Threads:\s+(\d+)/m.exec(s)?.[1]);
    return { rss: mb(kb("VmRSS")), anon: mb(kb("RssAnon")), file: mb(kb("RssFile")), hwm: mb(kb("VmHWM")), pss: pss === undefined ? undefined : mb(pss), threads };
  } catch {
    return undefined;
  }
}

/** A gauge's value from a /metrics endpoint. */
async function gauge(address, name) {
  if (!address) return undefined;
  try {
    const text = await (await fetch(`http://${address}/metrics`, { signal: AbortSignal.timeout(2000) })).text();
    const m = new RegExp(`^(?:rexmesh_)?${name}(?:\\{[^}]*\\})? ([\\d.e+-]+)$`, "m").exec(text);
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Runs a node script in a fresh process and returns the JSON it prints (bounded by a timeout). */
function nodeJson(args, env = process.env) {
  return new Promise((resolve, reject) => {
    execFile(process.execPath, args, { cwd: ROOT, env, timeout: 30_000 }, (err, stdout, stderr) => {
      if (err) return reject(new Error(`${err.message}\n${stderr}`));
      try {
        resolve(JSON.parse(stdout.trim().split("\n").pop()));
      } catch (e) {
        reject(new Error(`no JSON from node ${args.join(" ")}: ${stdout} ${stderr}`));
      }
    });
  });
}

/** RSS of a node process that imported these modules (dist paths) and then sat idle for a second. */
async function moduleCost(label, modules) {
  const script = `
    const fs = await import("node:fs");
    // dist/… are files of this repository; anything else is a package from its node_modules.
    for (const m of ${JSON.stringify(modules)}) await import(m.startsWith("dist/") ? new URL(m, ${JSON.stringify(pathToFileURL(ROOT).href)}).href : m);
    await new Promise((r) => setTimeout(r, 1000));
    const s = fs.readFileSync("/proc/self/status", "utf8");
    const kb = (k) => Number(new RegExp(k + ":\\\\s+(\\\\d+) kB").exec(s)[1]);
    const pss = Number(/^Pss:\\s+(\\d+) kB/m.exec(fs.readFileSync("/proc/self/smaps_rollup", "utf8"))[1]);
    const mu = process.memoryUsage();
    console.log(JSON.stringify({ rss: kb("VmRSS"), anon: kb("RssAnon"), file: kb("RssFile"), pss, heapUsed: mu.heapUsed / 1024, heapTotal: mu.heapTotal / 1024, external: mu.external / 1024 }));
  `;
  // Runs as an ES module from the repository root, like the CLI.
  const r = await nodeJson(["--input-type=module", "-e", script]);
  const mb = (kb) => +((kb * 1024) / MB).toFixed(1);
  return { label, modules: modules.length, rssMB: mb(r.rss), anonMB: mb(r.anon), fileMB: mb(r.file), pssMB: mb(r.pss), heapUsedMB: mb(r.heapUsed), heapTotalMB: mb(r.heapTotal), externalMB: mb(r.external) };
}

/**
 * One mesh: `hosts` daemons of one host each; one small job on every host,
 * then idle; memory of every daemon. env: extra environment for the mesh processes;
 * metrics: daemons serve /metrics (and so load prom-client).
 */
async function measure({ hosts, idleS, env = {}, label, reportsDir, metrics = false }) {
  const saved = Object.fromEntries(Object.keys(env).map((k) => [k, process.env[k]]));
  const restoreEnv = () => {
    for (const [k, v] of Object.entries(saved)) if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  };
  // LocalMesh gives its processes this process's environment when it spawns them.
  Object.assign(process.env, env);
  const ids = Array.from({ length: hosts }, (_, i) => ({ id: `idle${i}`, region: "r1" }));
  let meshDir;
  try {
    return await withMesh({ regions: ["r1"], hosts: ids, hostsPerProcess: 1, daemonArgs: metrics ? ["--metrics-listen", "127.0.0.1:0"] : [] }, async (client, mesh) => {
      restoreEnv();
      meshDir = mesh.dir;
      const daemons = mesh.daemons.map((d) => ({ pid: d.proc.pid, metrics: d.info?.metricsAddress, hosts: d.hosts }));
      const atConnect = daemons.map((d) => procMem(d.pid)?.rss);
      // One small job with a spawn and output, and a ping: the warm paths.
      const run = async (steps) => {
        const { job } = await client.submitJob({ allHosts: true, steps }, { signal: AbortSignal.timeout(60_000) });
        for await (const b of client.watchJob({ jobId: job.id, noOutput: true }, { signal: AbortSignal.timeout(60_000) })) if (b.job?.state === JOB_DONE) return succeededCount(b.job);
        throw new Error(`job ${job.id} did not finish`);
      };
      const ok1 = await run([{ tool: { case: "exec", value: { argv: ["sh", "-c", "echo hello from $(hostname); head -c 65536 /dev/zero"] } } }]);
      const ok2 = await run([pingStep]);
      if (ok1 !== hosts || ok2 !== hosts) throw new Error(`warm-up jobs: ${ok1} and ${ok2} of ${hosts} hosts succeeded`);
      // Idle: sample every second, keep the last sample and the range.
      const samples = daemons.map(() => []);
      for (let t = 0; t < idleS; t++) {
        await sleep(1000);
        daemons.forEach((d, i) => {
          const m = procMem(d.pid);
          if (m) samples[i].push(m);
        });
      }
      // With the memory preload: each daemon writes process.memoryUsage() and its heap spaces now, while idle.
      let reports;
      if (reportsDir) {
        for (const d of daemons) process.kill(d.pid, "SIGUSR2");
        for (let i = 0; i < 50; i++) {
          await sleep(100);
          reports = memoryReports(reportsDir).filter((r) => r.when === "signal" && daemons.some((d) => d.pid === r.pid));
          if (reports.length === daemons.length) break;
        }
      }
      const per = await Promise.all(
        daemons.map(async (d, i) => {
          const last = samples[i].at(-1) ?? {};
          const rssRange = samples[i].map((s) => s.rss);
          return {
            pid: d.pid,
            hosts: d.hosts,
            ...last,
            rssAtConnect: atConnect[i],
            rssIdleMin: Math.min(...rssRange),
            rssIdleMax: Math.max(...rssRange),
            heapUsedMB: +(((await gauge(d.metrics, "nodejs_heap_size_used_bytes")) ?? 0) / MB).toFixed(1),
          };
        }),
      );
      const rss = per.map((p) => p.rss);
      return {
        label,
        hosts,
        idleS,
        daemons: per,
        maxRssMB: Math.max(...rss),
        medianRssMB: median(rss),
        medianAnonMB: median(per.map((p) => p.anon)),
        medianFileMB: median(per.map((p) => p.file)),
        medianPssMB: median(per.map((p) => p.pss ?? 0)),
        medianHeapUsedMB: median(per.map((p) => p.heapUsedMB)),
        pids: per.map((p) => p.pid),
        reports,
      };
    });
  } finally {
    restoreEnv();
    if (meshDir) rmSync(meshDir, { recursive: true, force: true });
  }
}

export default {
  name: "daemon-idle-memory",
  title: "real daemon idle memory, one host per process",
  target: "≤ 50 MB RSS",
  async run() {
    const hosts = opt("hosts", 5);
    const idleS = opt("idle", 8);
    const diagnose = String(opt("diagnose", "auto"));
    log(`${hosts} daemons, idle ${idleS} s`);
    // As a daemon runs by default (no --metrics-listen: prom-client is never loaded), then with metrics, which
    // also gives the V8 heap in use (read from the daemon's own /metrics).
    const main = await measure({ hosts, idleS, label: "plain" });
    const withMetrics = await measure({ hosts, idleS, label: "with --metrics-listen", metrics: true });
    main.medianHeapUsedMB = withMetrics.medianHeapUsedMB;
    log(`median RSS ${main.medianRssMB} MB, max ${main.maxRssMB} MB (anon ${main.medianAnonMB}, file ${main.medianFileMB}, PSS ${main.medianPssMB}); with --metrics-listen ${withMetrics.medianRssMB} MB (heap ${withMetrics.medianHeapUsedMB})`);
    const result = { ...main, withMetrics: { medianRssMB: withMetrics.medianRssMB, maxRssMB: withMetrics.maxRssMB, medianAnonMB: withMetrics.medianAnonMB, medianPssMB: withMetrics.medianPssMB, medianHeapUsedMB: withMetrics.medianHeapUsedMB } };
    if (diagnose === "1" || (diagnose === "auto" && main.medianRssMB > TARGET_MB)) {
      log("diagnosis: module load cost");
      // What `rexmesh daemon` loads: the static imports of dist/cli/main.js, then (lazily) the role table and the daemon's modules.
      const mainImports = [...readFileSync(join(ROOT, "dist/cli/main.js"), "utf8").matchAll(/^import [^;]*?from "([^"]+)";/gm)].map((m) => (m[1].startsWith(".") ? `dist/cli/${m[1]}`.replace("/cli/../", "/") : m[1]));
      const daemonLoads = [...mainImports, "dist/cli/roles.js", "dist/daemon/main.js"];
      result.moduleCost = [
        await moduleCost("bare node (no import)", []),
        await moduleCost("daemon modules only (dist/daemon/main.js)", ["dist/daemon/main.js"]),
        await moduleCost("what `rexmesh daemon` loads (cli/main.js imports, cli/roles.js, daemon/main.js)", daemonLoads),
        await moduleCost("every role's modules (controller, proxy, daemon main.js)", ["dist/controller/main.js", "dist/proxy/main.js", "dist/daemon/main.js"]),
        // Single packages, each on its own over a bare node.
        await moduleCost("package lmdb", ["lmdb"]),
        await moduleCost("package @grpc/grpc-js", ["@grpc/grpc-js"]),
        await moduleCost("package @connectrpc/connect-node", ["@connectrpc/connect-node"]),
        await moduleCost("package node-forge", ["node-forge"]),
        await moduleCost("generated protobuf (dist/gen, every file)", ["agent_link", "artifact", "bundle", "controller", "enroll", "host", "proxy_admin", "proxy_link", "revocation", "task"].map((f) => `dist/gen/rexmesh/v1/${f}_pb.js`)),
      ];
      for (const m of result.moduleCost) log(`${m.label}: RSS ${m.rssMB} MB (anon ${m.anonMB}, heap ${m.heapUsedMB})`);

      log("diagnosis: V8 heap inside idle daemons");
      const work = scratch("idle-mem");
      try {
        const withReports = await measure({ hosts, idleS, label: "with memory reports", env: profilingEnv(work, { cpu: false, memory: true }), reportsDir: work });
        // Snapshots taken at the end of the idle period (SIGUSR2): 'last' is the idle state.
        const reports = withReports.reports ?? [];
        const mb = (x) => +(x / MB).toFixed(1);
        result.v8 = {
          rssMedianMB: withReports.medianRssMB,
          daemons: reports.map((r) => ({
            pid: r.pid,
            rssMB: mb(r.last.rss),
            heapTotalMB: mb(r.last.heapTotal),
            heapUsedMB: mb(r.last.heapUsed),
            externalMB: mb(r.last.external),
            arrayBuffersMB: mb(r.last.arrayBuffers),
            peakRssMB: mb(r.peak.rss),
            peakHeapTotalMB: mb(r.peak.heapTotal),
            spacesMB: Object.fromEntries(Object.entries(r.spaces ?? {}).filter(([, v]) => v.size > 0).map(([k, v]) => [k, { size: mb(v.size), used: mb(v.used) }])),
            gc: r.gc,
          })),
        };
      } finally {
        rmSync(work, { recursive: true, force: true });
      }
      log("diagnosis: --max-semi-space-size=1");
      const semi = await measure({ hosts, idleS, label: "--max-semi-space-size=1", env: { NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ""} --max-semi-space-size=1`.trim() } });
      result.semiSpace1 = { medianRssMB: semi.medianRssMB, maxRssMB: semi.maxRssMB, medianAnonMB: semi.medianAnonMB, medianHeapUsedMB: semi.medianHeapUsedMB };
    }
    result.notes = notes(result);
    return result;
  },
  verdict: (r) => ({ figure: `median ${r.medianRssMB} MB, max ${r.maxRssMB} MB RSS (${r.hosts} daemons; anon ${r.medianAnonMB} MB, PSS ${r.medianPssMB} MB, V8 heap ${r.medianHeapUsedMB} MB)${r.withMetrics ? `; with --metrics-listen ${r.withMetrics.medianRssMB} MB` : ""}`, met: r.maxRssMB <= TARGET_MB }),
  plot: (r) => ({
    title: "idle daemon memory, one host per process (MB)",
    unit: "MB",
    bars: [
      { label: "RSS median", value: r.medianRssMB },
      { label: "RSS max", value: r.maxRssMB },
      { label: "anon (median)", value: r.medianAnonMB },
      { label: "PSS (median)", value: r.medianPssMB },
      ...(r.moduleCost ? [{ label: "bare node RSS", value: r.moduleCost[0].rssMB }] : []),
      { label: "target", value: TARGET_MB, ref: true },
    ],
  }),
};

function notes(r) {
  const lines = [
    `${r.hosts} daemon processes (one host each), idle ${r.idleS} s after one exec job and one ping on every host. RSS median ${r.medianRssMB} MB, max ${r.maxRssMB} MB: anonymous ${r.medianAnonMB} MB, file-backed ${r.medianFileMB} MB (mostly the node binary, shared by every process on the machine), PSS ${r.medianPssMB} MB, V8 heap in use ${r.medianHeapUsedMB} MB.`,
    ``,
  ];
  if (r.moduleCost) {
    lines.push(`What a node process costs before it does anything (import, then idle 1 s):`, ``, `| process | RSS MB | anon MB | file MB | PSS MB | V8 heap used / total MB |`, `| --- | ---: | ---: | ---: | ---: | ---: |`);
    for (const m of r.moduleCost) lines.push(`| ${m.label} | ${m.rssMB} | ${m.anonMB} | ${m.fileMB} | ${m.pssMB} | ${m.heapUsedMB} / ${m.heapTotalMB} |`);
    lines.push(``);
  }
  if (r.v8?.daemons?.length) {
    const d = r.v8.daemons;
    const med = (f) => median(d.map(f));
    lines.push(
      `Inside idle daemons (medians of ${d.length}, process.memoryUsage() at the end of the idle period, with the memory preload): heap total ${med((x) => x.heapTotalMB)} MB, heap used ${med((x) => x.heapUsedMB)} MB, external ${med((x) => x.externalMB)} MB (ArrayBuffers ${med((x) => x.arrayBuffersMB)} MB); RSS ${med((x) => x.rssMB)} MB. Heap spaces (committed) of one: ${Object.entries(d[0].spacesMB).map(([k, v]) => `${k} ${v.size}`).join(", ")} MB.`,
      ``,
    );
  }
  if (r.semiSpace1) lines.push(`With NODE_OPTIONS=--max-semi-space-size=1: RSS median ${r.semiSpace1.medianRssMB} MB, max ${r.semiSpace1.maxRssMB} MB (anon ${r.semiSpace1.medianAnonMB} MB).`, ``);
  return lines.join("\n");
}
