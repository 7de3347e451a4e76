// Real `hostname` on 500 hosts (real child processes), against the same
// 500 processes spawned locally (xargs -P 8) and against pdsh over SSH, all
// measured in the same run.
//
//   node bench/run.mjs hostname-500 [--hosts 500] [--runs 5] [--per-process 50]
//                                   [--pdsh-runs 1] [--pdsh-fanout 16] [--skip-pdsh 1]
import { JOB_DONE, SUCCEEDED, log, median, opt, procCpu, rssBytes, withMesh } from "../lib/common.mjs";
import { pdshFanout } from "../baselines/pdsh.mjs";
import { nodeSpawnProbe, xargsSpawn } from "../baselines/spawn.mjs";
import { hostname as osHostname, loadavg } from "node:os";
import { readFileSync, readdirSync } from "node:fs";

const hostnameStep = { tool: { case: "exec", value: { argv: ["hostname"] } } };
/** Reference figure from the issue, used only when pdsh cannot run here. */
const PDSH_REFERENCE_MS = 78_000;

/** Pids of the Node processes whose parent is one of `parents` (a daemon's spawner: daemon/spawner.ts). */
function nodeChildren(parents) {
  const want = new Set(parents);
  const found = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = readFileSync(`/proc/${name}/stat`, "utf8");
      const comm = stat.slice(stat.indexOf("(") + 1, stat.lastIndexOf(")"));
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      if (want.has(ppid) && comm.startsWith("node")) found.push(Number(name));
    } catch {
      // gone
    }
  }
  return found;
}

function cpuSnapshot(mesh) {
  const sum = (pids) => pids.reduce((a, pid) => {
    const c = procCpu(pid);
    return { self: a.self + c.self, children: a.children + c.children };
  }, { self: 0, children: 0 });
  const daemonPids = mesh.daemons.map((d) => d.proc.pid);
  // A spawner's CPU is its daemon's, and the hostname processes it reaped count in its children.
  const spawners = nodeChildren(daemonPids);
  return {
    controller: sum([mesh.controller.proc.pid]),
    proxies: sum(mesh.proxies.map((p) => p.proc.pid)),
    daemons: sum(daemonPids),
    spawners: sum(spawners),
    spawnerPids: spawners,
    bench: process.cpuUsage(),
  };
}

function cpuDelta(a, b) {
  // A spawner that was not there at both ends (started or restarted in between) is left out rather than counted from zero.
  const both = a.spawnerPids.filter((p) => b.spawnerPids.includes(p)).length === b.spawnerPids.length && a.spawnerPids.length === b.spawnerPids.length;
  return {
    spawnersMs: both ? b.spawners.self - a.spawners.self : undefined,
    controllerMs: b.controller.self - a.controller.self,
    proxiesMs: b.proxies.self - a.proxies.self,
    daemonsMs: b.daemons.self - a.daemons.self,
    // CPU of the hostname processes themselves (reaped children of the daemons).
    childProcessesMs: b.daemons.children - a.daemons.children + (both ? b.spawners.children - a.spawners.children : 0),
    benchClientMs: Math.round((b.bench.user + b.bench.system - a.bench.user - a.bench.system) / 1000),
  };
}

/** Submits hostname to every host, follows the job with its output until DONE. */
async function oneRun(client, n, expect, timeoutMs = 120_000) {
  const ac = new AbortController();
  const timer = setTimeout(() => ac.abort(), timeoutMs);
  try {
    const t0 = performance.now();
    const { job } = await client.submitJob({ allHosts: true, steps: [hostnameStep] }, { signal: ac.signal });
    const submitMs = performance.now() - t0;
    const tasks = new Map(); // task id → Task
    const out = new Map(); // task id → stdout text
    let firstOutputMs;
    let done;
    const dec = new TextDecoder();
    for await (const b of client.watchJob({ jobId: job.id }, { signal: ac.signal })) {
      for (const t of b.tasks) tasks.set(t.id, t);
      for (const c of b.output) {
        firstOutputMs ??= performance.now() - t0;
        out.set(c.taskId, (out.get(c.taskId) ?? "") + dec.decode(c.data));
      }
      if (b.job && b.job.state === JOB_DONE) {
        done = b.job;
        break;
      }
    }
    const ms = performance.now() - t0;
    if (!done) throw new Error(`watch of ${job.id} ended before the job was done`);
    const succeeded = [...tasks.values()].filter((t) => t.state === SUCCEEDED).length;
    const hostsWithOutput = [...tasks.values()].filter((t) => (out.get(t.id) ?? "").trim() === expect).length;
    const bad = [...tasks.values()].find((t) => t.state !== SUCCEEDED || (out.get(t.id) ?? "").trim() !== expect);
    return {
      ms: Math.round(ms),
      submitMs: Math.round(submitMs),
      firstOutputMs: firstOutputMs === undefined ? undefined : Math.round(firstOutputMs),
      tasks: tasks.size,
      succeeded,
      hostsWithOutput,
      ok: tasks.size === n && succeeded === n && hostsWithOutput === n,
      firstBad: bad ? { host: bad.hostId, state: bad.state, message: bad.message, output: out.get(bad.id) } : undefined,
    };
  } finally {
    clearTimeout(timer);
  }
}

export default {
  name: "hostname-500",
  title: "real `hostname` on 500 hosts, submit → all output back",
  target: "≤ 3× local xargs -P 8 of the same processes and ≥ 20× faster than pdsh over SSH (fan-out 16)",
  async run() {
    const n = opt("hosts", 500);
    const runs = opt("runs", 5);
    const perProcess = opt("per-process", 50);
    // "no": the daemons start tasks themselves (--no-spawner), with posix_spawn where the addon was built.
    const useSpawner = opt("spawner", "yes") !== "no";
    const expect = osHostname();
    const notes = [];
    const loadAtStart = loadavg().map((x) => +x.toFixed(1));

    log(`baseline: xargs -P 8, ${n} × hostname`);
    const xargs = await xargsSpawn({ count: n, parallel: 8, runs: 5 });

    const regions = ["r1", "r2"];
    const hosts = Array.from({ length: n }, (_, i) => ({ id: `h${i}`, region: regions[i % 2] }));
    const startT0 = performance.now();
    const rex = await withMesh({ regions, hosts, hostsPerProcess: perProcess, daemonArgs: useSpawner ? [] : ["--no-spawner"] }, async (client, mesh) => {
      const startMs = Math.round(performance.now() - startT0);
      log(`mesh up: ${n} hosts in ${mesh.daemons.length} daemon processes, ${Math.round(startMs / 1000)} s`);
      const warmup = await oneRun(client, n, expect);
      if (!warmup.ok) throw new Error(`warm-up run: ${JSON.stringify(warmup)}`);
      const list = [];
      let cpu;
      for (let r = 0; r < runs; r++) {
        const before = cpuSnapshot(mesh);
        const res = await oneRun(client, n, expect);
        const after = cpuSnapshot(mesh);
        if (!res.ok) throw new Error(`run ${r + 1}: ${JSON.stringify(res)}`);
        res.cpu = cpuDelta(before, after);
        list.push(res);
        log(`run ${r + 1}/${runs}: ${res.ms} ms (first output ${res.firstOutputMs} ms)`);
      }
      // CPU per role, median over the runs.
      cpu = Object.fromEntries(Object.keys(list[0].cpu).map((k) => [k, median(list.map((r) => r.cpu[k] ?? 0))]));
      const mib = (pid) => Math.round(rssBytes(pid) / 2 ** 20);
      const rssMiB = { controller: mib(mesh.controller.proc.pid), proxies: mesh.proxies.map((p) => mib(p.proc.pid)), daemonMedian: median(mesh.daemons.map((d) => mib(d.proc.pid))) };
      return { startMs, daemonProcesses: mesh.daemons.length, warmupMs: warmup.ms, runs: list, cpuMsPerRun: cpu, rssMiB };
    });

    // Where the daemons' CPU goes: child_process.spawn forks the whole Node
    // process, so its cost grows with the daemon's resident size.
    log(`probe: cost of child_process.spawn in a Node process of ~40 MiB and of ~${rex.rssMiB.daemonMedian} MiB (the daemons')`);
    const spawnProbe = await nodeSpawnProbe({ count: 100, ballastsMiB: [0, Math.max(0, rex.rssMiB.daemonMedian - 40)] });

    let pdsh;
    if (opt("skip-pdsh", 0)) pdsh = { available: false, skipped: "--skip-pdsh given" };
    else {
      log(`baseline: pdsh over ssh, ${n} hosts at fan-out ${opt("pdsh-fanout", 16)} (about a minute or two)`);
      try {
        pdsh = await pdshFanout({ hosts: n, fanout: opt("pdsh-fanout", 16), runs: opt("pdsh-runs", 1) });
      } catch (err) {
        pdsh = { available: false, skipped: `pdsh run failed: ${err?.message ?? err}` };
      }
    }

    const ms = rex.runs.map((r) => r.ms);
    const rexMedian = median(ms);
    const rexBest = Math.min(...ms);
    const pdshMs = pdsh.available ? pdsh.medianMs : undefined;
    const pdshRef = pdshMs ?? (n === 500 ? PDSH_REFERENCE_MS : undefined);
    const vsXargs = xargs.available ? +(rexMedian / xargs.medianMs).toFixed(2) : undefined;
    const pdshOverRex = pdshRef ? +(pdshRef / rexMedian).toFixed(1) : undefined;
    const skipped = [];
    if (!xargs.available) skipped.push(`xargs: ${xargs.skipped}`);
    if (!pdsh.available) skipped.push(`pdsh: ${pdsh.skipped}${pdshRef ? ` (ratio uses the issue's reference ${PDSH_REFERENCE_MS / 1000} s)` : ""}`);

    const c = rex.cpuMsPerRun;
    const totalCpu = c.controllerMs + c.proxiesMs + c.daemonsMs + c.spawnersMs + c.childProcessesMs;
    const [small, big] = spawnProbe;
    notes.push(
      `${n} hosts in ${rex.daemonProcesses} daemon processes of ${perProcess}, 2 proxies${useSpawner ? "" : "; the daemons start tasks themselves (--no-spawner)"}. ` +
        `rexmesh submit → all ${n} outputs back: median ${rexMedian} ms, best ${rexBest} ms over ${runs} runs (warm-up ${rex.warmupMs} ms not counted); ` +
        `xargs -P 8 median ${xargs.medianMs} ms → ${vsXargs}× (target ≤ 3×); ` +
        (pdshRef === undefined
          ? `pdsh not run (${pdsh.skipped}).`
          : `pdsh ${pdshMs !== undefined ? `measured ${pdshMs} ms` : `not run (${pdsh.skipped}); the issue's reference ${pdshRef} ms`} → ${pdshOverRex}× slower than rexmesh (target ≥ 20×).`),
      `CPU per run (median, ms; 2 cores = ${2 * rexMedian} core-ms available in the median wall time): controller ${c.controllerMs}, proxies ${c.proxiesMs}, daemons ${c.daemonsMs}, their spawners ${c.spawnersMs}, ` +
        `the ${n} hostname processes ${c.childProcessesMs}, bench client ${c.benchClientMs}; mesh total ${totalCpu} ms = ${(totalCpu / rexMedian).toFixed(2)} cores busy on average. ` +
        `Per host: daemon ${(c.daemonsMs / n).toFixed(1)} ms + spawner ${(c.spawnersMs / n).toFixed(1)} ms, proxy ${(c.proxiesMs / n).toFixed(1)} ms, controller ${(c.controllerMs / n).toFixed(1)} ms. ` +
        `On 2 cores the mesh's CPU alone needs ≥ ${Math.round(totalCpu / 2)} ms of wall time per run, against a target of ${xargs.available ? Math.round(3 * xargs.medianMs) : "?"} ms (3 × xargs).`,
      `Spawn cost (probe, 100 × hostname at once from one Node process, as the executor spawns: detached, 3 pipes): ` +
        spawnProbe.map((p) => `RSS ${p.rssMiB} MiB → ${p.parentCpuMsEach} ms parent CPU and ${p.blockedInSpawnMsEach} ms event loop blocked in spawn() per child`).join("; ") +
        `. The daemons run at ~${rex.rssMiB.daemonMedian} MiB RSS (controller ${rex.rssMiB.controller}, proxies ${rex.rssMiB.proxies.join("/")} MiB): at that size one spawn() costs the parent ` +
        `~${big?.parentCpuMsEach ?? "?"} ms CPU (vs ${small?.parentCpuMsEach ?? "?"} ms at ${small?.rssMiB ?? "?"} MiB: it grows with RSS because the whole process is forked), comparable to the ` +
        `${(c.daemonsMs / n).toFixed(1)} ms of daemon CPU per host, and the daemon's event loop is blocked meanwhile; xargs forks a tiny process instead. ` +
        `Load average at start ${loadAtStart.join(" / ")} (other work on the machine inflates every figure here).`,
      `Profile the mesh processes with BENCH_NODE_ARGS="--cpu-prof --cpu-prof-dir=DIR" node bench/run.mjs hostname-500, then node bench/lib/cpuprofile.mjs DIR.`,
    );
    return {
      hosts: n,
      loadAtStart,
      hostsPerProcess: perProcess,
      spawner: useSpawner,
      daemonProcesses: rex.daemonProcesses,
      proxies: 2,
      meshStartMs: rex.startMs,
      rexmesh: { runsMs: ms, medianMs: rexMedian, bestMs: rexBest, warmupMs: rex.warmupMs, runs: rex.runs, cpuMsPerRun: rex.cpuMsPerRun, rssMiB: rex.rssMiB },
      xargs,
      pdsh,
      spawnProbe,
      ratios: { rexmeshOverXargs: vsXargs, pdshOverRexmesh: pdshOverRex, pdshMeasured: pdshMs !== undefined },
      targets: { xargs: vsXargs !== undefined ? vsXargs <= 3 : undefined, pdsh: pdshOverRex !== undefined ? pdshOverRex >= 20 : undefined },
      skipped,
      notes: notes.join("\n\n"),
    };
  },
  verdict: (r) => ({
    figure:
      `rexmesh p50 ${r.rexmesh.medianMs} ms (best ${r.rexmesh.bestMs}) for ${r.hosts} hosts = ${r.ratios.rexmeshOverXargs}× xargs -P 8 (${r.xargs.medianMs} ms); ` +
      `pdsh ${r.pdsh.available ? `${(r.pdsh.medianMs / 1000).toFixed(1)} s` : "(not run: reference 78 s)"} = ${r.ratios.pdshOverRexmesh}× rexmesh`,
    met: r.targets.xargs !== undefined && r.targets.pdsh !== undefined ? r.targets.xargs && r.targets.pdsh : undefined,
  }),
  plot: (r) => ({
    title: `hostname on ${r.hosts} hosts: wall time (ms)`,
    unit: "ms",
    bars: [
      { label: "rexmesh p50", value: r.rexmesh.medianMs },
      { label: "rexmesh best", value: r.rexmesh.bestMs },
      { label: "xargs -P 8 (local spawn)", value: r.xargs.medianMs, ref: true },
      { label: "target: 3 × xargs", value: 3 * r.xargs.medianMs, ref: true },
      ...(r.pdsh.available ? [{ label: "target: pdsh ÷ 20", value: r.pdsh.medianMs / 20, ref: true }] : []),
    ],
  }),
};
