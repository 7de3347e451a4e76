// The ping fan-out measurement shared by ping-10k and ping-50k: connect the
// simulated fleet, check that the controller sees every host, then submit
// `ping` to all hosts several times and time submit → job DONE. Per run it
// also records when the first task reached a simulated host and when the
// last pong left one (host-side clocks, same machine), and the CPU every
// process spent, to tell where the time goes.
import { log, median, pingStep, succeededCount, untilDone } from "../lib/common.mjs";
import os from "node:os";
import { cpuMsOf } from "./mesh.mjs";

/** A signed command the simulator answers without spawning (bench/sim/host-sim.mjs): the fleet-wide job that is signed. */
export const trueStep = { tool: { case: "exec", value: { argv: ["true"] } } };

/**
 * `signedRuns` more runs with `exec true` (signed, unlike a ping, and ended
 * with a host-signed status) follow the ping runs: result.signed.
 *
 * Each series starts with `warmup` runs that are reported (`warmupRuns`)
 * but not counted in its medians, as the NATS baseline's first round is not
 * (bench/baselines/nats.mjs): V8 compiles the hot paths during the first
 * jobs after a start (perf: a fifth of the roles' CPU in the first runs of a
 * series, 4–12 % later; docs/fan-out.md), which a long-running mesh does not
 * pay again. The first signed job also pays each host's key agreement at the
 * controller once: that job is the signed series' warm-up.
 */
export async function pingRuns(ctx, { hosts, runs, proxies, targetMs, connectTimeoutMs = 900_000, signedRuns = 0, warmup = 1, profile }) {
  const { mesh, client, fleet } = ctx;
  log(`issuing ${hosts} certificates in ${Math.ceil(hosts / fleet.opts.perProcess)} simulator processes`);
  const started = await fleet.start();
  log(`issued in ${started.issueMs} ms; connecting`);
  const procs = { controller: mesh.controller.proc.pid, ...Object.fromEntries(mesh.proxies.map((p) => [p.name, p.proc.pid])) };
  const simPids = fleet.procs.map((p) => p.proc.pid);
  const cpuNow = () => ({ ...Object.fromEntries(Object.entries(procs).map(([k, pid]) => [k, cpuMsOf(pid)])), simulators: simPids.reduce((a, pid) => a + cpuMsOf(pid), 0) });
  const connectCpu0 = cpuNow();
  const t0 = Date.now();
  if (profile === "connect") ctx.toggleProfile();
  const opened = await fleet.open(connectTimeoutMs);
  await fleet.waitConnected(hosts, connectTimeoutMs);
  const connectMs = Date.now() - t0;
  log(`${fleet.connected} hosts connected in ${connectMs} ms; waiting for the controller`);
  await ctx.waitController(hosts, connectTimeoutMs);
  const controllerSeesMs = Date.now() - t0;
  if (profile === "connect") ctx.toggleProfile();
  // CPU per host of connecting (TLS, HTTP/2, hello, report key and presence), per role.
  const connectCpu1 = cpuNow();
  const connectCpuUsPerHost = Object.fromEntries(Object.entries(connectCpu1).map(([k, v]) => [k, Math.round(((v - connectCpu0[k]) * 1000) / hosts)]));
  log(`controller sees ${hosts} hosts after ${controllerSeesMs} ms`);
  // `profile` ("connect", "ping" or "signed"): the controller's and proxies' CPU profiles cover that series' counted runs only.
  const series = async (label, step, count, name) => {
  const out = [];
  let profiling = false;
  try {
  for (let r = 0; r < warmup + count; r++) {
    if (r === warmup && profile === name) {
      ctx.toggleProfile();
      profiling = true;
    }
    await new Promise((res) => setTimeout(res, 1000));
    await fleet.resetTaskStats();
    const cpu0 = Object.fromEntries(Object.entries(procs).map(([k, pid]) => [k, cpuMsOf(pid)]));
    const sim0 = simPids.reduce((a, pid) => a + cpuMsOf(pid), 0);
    const wall0 = Date.now();
    const t = performance.now();
    const { job } = await client.submitJob({ allHosts: true, steps: [step] });
    const submitMs = Math.round(performance.now() - t);
    const done = await untilDone(client, job.id);
    const ms = Math.round(performance.now() - t);
    const st = await fleet.stats();
    const firstTask = Math.min(...st.map((s) => s.firstTaskAt || Infinity));
    const lastPong = Math.max(...st.map((s) => s.lastPongAt || 0));
    const cpuMs = Object.fromEntries(Object.entries(procs).map(([k, pid]) => [k, Math.round(cpuMsOf(pid) - cpu0[k])]));
    cpuMs.simulators = Math.round(simPids.reduce((a, pid) => a + cpuMsOf(pid), 0) - sim0);
    const run = {
      ms,
      submitMs,
      succeeded: succeededCount(done),
      pongs: st.reduce((a, s) => a + s.pongs, 0),
      // Handed to a host again after it answered (a resend after a reconnect mid-run): answered again, not counted in pongs.
      resent: st.reduce((a, s) => a + (s.resent ?? 0), 0),
      firstTaskAtHostMs: Number.isFinite(firstTask) ? firstTask - wall0 : null,
      lastPongAtHostMs: lastPong ? lastPong - wall0 : null,
      cpuMs,
      cpuUsPerHost: Object.fromEntries(Object.entries(cpuMs).map(([k, v]) => [k, Math.round((v * 1000) / hosts)])),
      refused: st.reduce((a, s) => a + (s.refused ?? 0), 0),
      ...(st.some((s) => s.refusedWhy) ? { refusedWhy: st.find((s) => s.refusedWhy).refusedWhy } : {}),
      // Other work on the machine (the 2 cores are shared): the 1-minute load average after the run.
      loadAvg1: +os.loadavg()[0].toFixed(1),
    };
    const counted = r >= warmup;
    log(`${label} ${counted ? "run" : "warm-up run"} ${counted ? r - warmup + 1 : r + 1}: ${JSON.stringify(run)}`);
    out.push(run);
  }
  } finally {
    // Also when a run failed: the profile is written.
    if (profiling) ctx.toggleProfile();
  }
  return { runs: out.slice(warmup), warmupRuns: out.slice(0, warmup) };
  };
  const { runs: out, warmupRuns } = await series("ping", pingStep, runs, "ping");
  const { runs: signed, warmupRuns: signedWarmup } = signedRuns > 0 ? await series("signed `true`", trueStep, signedRuns, "signed") : { runs: [], warmupRuns: [] };
  const st = await fleet.stats();
  const ms = out.map((x) => x.ms);
  const result = {
    hosts,
    proxies,
    simulatorProcesses: fleet.procs.length,
    heartbeatMs: fleet.opts.heartbeatMs,
    issueMs: started.issueMs,
    connectMs,
    controllerSeesMs,
    connectCpuUsPerHost,
    warmupRuns,
    runs: out,
    lastReplyMsP50: median(ms),
    cpuUsPerHostP50: (out.find((x) => x.ms === median(ms)) ?? out[0])?.cpuUsPerHost,
    lastReplyMsBest: Math.min(...ms),
    allSucceeded: [...warmupRuns, ...out].every((x) => x.succeeded === hosts),
    simulator: st.map((s) => ({ hosts: s.hosts, rssMiB: Math.round(s.rss / 2 ** 20), cpuMs: s.cpuMs, failures: s.failures, firstError: s.firstError, unreadableCerts: s.unreadableCerts, contextErrors: s.contextErrors })),
    opened,
  };
  if (signed.length > 0) {
    const p50 = median(signed.map((x) => x.ms));
    const m = signed.find((x) => x.ms === p50) ?? signed[0];
    result.signed = { step: "exec true", warmupRuns: signedWarmup, runs: signed, lastReplyMsP50: p50, allSucceeded: [...signedWarmup, ...signed].every((x) => x.succeeded === hosts), cpuUsPerHostP50: m.cpuUsPerHost };
  }
  result.notes = pingNotes(result, targetMs);
  return result;
}

/** Where the time of the median run went, from the host-side timestamps and the CPU each process used. */
export function pingNotes(r, targetMs) {
  const sorted = [...r.runs].sort((a, b) => a.ms - b.ms);
  const m = sorted[Math.floor(sorted.length / 2)];
  const cpu = Object.entries(m.cpuMs).sort((a, b) => b[1] - a[1]);
  const cores = (ms) => (ms / m.ms).toFixed(2);
  const lines = [
    `Each series began with ${r.warmupRuns.length} warm-up run${r.warmupRuns.length === 1 ? "" : "s"}, not counted (as the NATS baseline's first round): ` +
      (r.warmupRuns.length > 0 ? `${r.warmupRuns.map((x) => `${x.ms} ms, controller ${x.cpuUsPerHost.controller} µs/host`).join("; ")}. ` : "none. ") +
      `Median run (${m.ms} ms, ${r.hosts} hosts, ${r.proxies} proxies, ${r.simulatorProcesses} simulator processes on the same 2 cores): ` +
      `SubmitJob returned after ${m.submitMs} ms; the first task reached a simulated host at ${m.firstTaskAtHostMs} ms, ` +
      `the last pong left a host at ${m.lastPongAtHostMs} ms; the job was DONE at the controller at ${m.ms} ms ` +
      `(so ${m.firstTaskAtHostMs} ms before any host had work, and ${m.ms - m.lastPongAtHostMs} ms between the last pong and DONE).`,
    `CPU used during that run (ms, and average cores busy): ${cpu.map(([k, v]) => `${k} ${v} (${cores(v)})`).join(", ")}. ` +
      `A process near 1.0 core is saturated (Node is single-threaded); the whole machine has 2.`,
    `Simulated hosts verify every task as a daemon does (the batch signature once per simulator process, each host its own proof) and answer a ping or \`true\` at once without spawning; ` +
      `the simulators' CPU above is the cost of being ${r.hosts} TLS peers on the same machine and would not exist in a real fleet.`,
  ];
  const ctl = m.cpuMs.controller ?? 0;
  const px = Object.entries(m.cpuMs).filter(([k]) => k.startsWith("proxy")).map(([, v]) => v);
  const pxSum = px.reduce((a, v) => a + v, 0);
  lines.push(
    `Per task: the controller spent ${Math.round((ctl * 1000) / r.hosts)} µs of CPU (plan, store, route, the hosts' answers and the job's completion; a signed task also its signature, QUEUED/DISPATCHED and the end's check), ` +
      `the proxies together ${Math.round((pxSum * 1000) / r.hosts)} µs (deliver, relay the answers up; a signed task is also stored), which includes what the idle hosts cost them meanwhile ` +
      `(each host PINGs its proxy every ${r.heartbeatMs / 1000} s and sends a frame every ${(r.heartbeatMs / 1000) * 6} s; docs/fan-out.md "Idle links"). ` +
      `The controller is one Node process on the path of every task: ${ctl} ms of its CPU per run is a floor for the fan-out on any machine` +
      (ctl > targetMs ? `, already above the ${targetMs} ms target.` : ` (target ${targetMs} ms).`),
  );
  if (r.signed) {
    const c = r.signed.cpuUsPerHostP50;
    lines.push(
      `Signed fleet-wide job (\`exec true\` on all ${r.hosts} hosts, ${r.signed.runs.length} runs): p50 ${r.signed.lastReplyMsP50} ms; CPU per host in the median run: ` +
        Object.entries(c).map(([k, v]) => `${k} ${v} µs`).join(", ") +
        `. The controller signs each frame of tasks to a proxy once (docs/fan-out.md); tasks refused by the simulated hosts' checks: ${r.signed.runs.reduce((a, x) => a + x.refused, 0)}.`,
    );
  }
  if (r.lastReplyMsP50 > targetMs) {
    const [top, topMs] = cpu[0];
    const total = cpu.reduce((a, [, v]) => a + v, 0);
    lines.push(
      `Target (${targetMs} ms) missed. Busiest process${top === "simulators" ? " group" : ""}: ${top} with ${topMs} ms of CPU in a ${m.ms} ms run (${cores(topMs)} cores); all processes together ${total} ms (${cores(total)} of the 2 cores).` +
        (total / m.ms < 1.5
          ? ` No process was CPU-bound, so the run spent most of its time waiting, not computing: on the machine's run queue` +
            (m.loadAvg1 !== undefined ? ` (1-minute load average ${m.loadAvg1} on 2 cores: other jobs shared the machine)` : ``) +
            ` and on the hops' commit-before-ack LMDB writes (controller, proxy, proxy again for the results, controller again). The CPU figures are the better guide to what 10,000 hosts cost.`
          : ` The machine's two cores were saturated, so the run lasted about as long as everybody's CPU together needs: the simulators' share would not exist with real hosts, ` +
            `and the proxies and the controller would each have their own cores in a real deployment (then the controller's own CPU, above, is the floor). ` +
            `Profile with BENCH_NODE_ARGS="--cpu-prof --cpu-prof-dir=DIR" and bench/lib/cpuprofile.mjs.`),
    );
  }
  return lines.join("\n\n");
}
