// Ping 10,000 simulated daemons (bench/sim) through 2 proxies, and raw NATS
// request/reply to as many connections in the same run for comparison: over
// plain TCP (the issue's target) and over mutual TLS (`--nats-tls 0` skips it),
// to tell what TLS alone costs a broker on these cores.
import { log, opt } from "../lib/common.mjs";
import { withSimMesh } from "../sim/mesh.mjs";
import { pingRuns } from "../sim/ping.mjs";

const TARGET_MS = 1500;
/** Issue 15's targets: ping ≤ 1.0× NATS request/reply, connect ≤ 1.5× NATS connecting, CPU per host per job. */
const TARGETS = { pingVsNats: 1.0, connectVsNats: 1.5, controllerUsPerHost: 15, proxiesUsPerHost: 50 };

/** The issue-15 figures of a result: ratios to NATS in the same run, and CPU per host (the proxies summed). */
export function fanoutFigures(r) {
  const cpu = r.cpuUsPerHostP50 ?? {};
  const proxies = Object.entries(cpu).filter(([k]) => k.startsWith("proxy")).reduce((a, [, v]) => a + v, 0);
  const nats = r.nats?.available ? r.nats : undefined;
  const natsTls = r.natsTls?.available ? r.natsTls : undefined;
  return {
    pingVsNats: nats ? +(r.lastReplyMsP50 / nats.medianMs).toFixed(2) : undefined,
    connectVsNats: nats?.connectMs ? +(r.connectMs / nats.connectMs).toFixed(2) : undefined,
    pingVsNatsTls: natsTls ? +(r.lastReplyMsP50 / natsTls.medianMs).toFixed(2) : undefined,
    connectVsNatsTls: natsTls?.connectMs ? +(r.connectMs / natsTls.connectMs).toFixed(2) : undefined,
    controllerUsPerHost: cpu.controller,
    proxiesUsPerHost: proxies || undefined,
  };
}

async function natsBaseline(subscribers, runs, tls = false) {
  try {
    const mod = await import(new URL("../baselines/nats.mjs", import.meta.url).href);
    // As many warm-up rounds as the rexmesh series had (--warmup), not counted either.
    const r = await mod.natsFanout({ subscribers, runs, tls, warmup: opt("warmup", 1) });
    return r;
  } catch (err) {
    return { skipped: String(err?.message ?? err).split("\n")[0] };
  }
}

export default {
  name: "ping-10k",
  title: "ping 10,000 simulated daemons through 2 proxies",
  target: `last reply ≤ ${TARGET_MS / 1000} s; compared with NATS request/reply`,
  async run() {
    const n = opt("hosts", 10_000);
    const runs = opt("runs", 5);
    const regions = ["r1", "r2"];
    const result = await withSimMesh(
      {
        regions,
        // --profile connect|ping|signed --profile-dir DIR: the controller's and proxies' CPU during that series (node bench/lib/cpuprofile.mjs DIR).
        profileDir: opt("profile", "") ? String(opt("profile-dir", "bench/results/prof-ping-10k")) : undefined,
        fleet: { hosts: n, perProcess: opt("per-process", 5000), heartbeatMs: opt("heartbeat-ms", 10_000), proxiesFor: (_k, mesh) => mesh.proxies.map((p) => p.address) },
      },
      (ctx) => pingRuns(ctx, { hosts: n, runs, proxies: 2, targetMs: TARGET_MS, signedRuns: opt("signed-runs", 3), warmup: opt("warmup", 1), profile: opt("profile", "") || undefined }),
    );
    log(`nats baseline (${n} subscribers)`);
    result.nats = await natsBaseline(n, runs);
    result.notes += natsNote(result.nats, n);
    if (opt("nats-tls", 1)) {
      log(`nats baseline with mutual TLS (${n} subscribers)`);
      result.natsTls = await natsBaseline(n, runs, true);
      result.notes += natsNote(result.natsTls, n);
    }
    result.issue15 = fanoutFigures(result);
    const f = result.issue15;
    result.notes +=
      `\n\nIssue 15 targets, this run: ping ${f.pingVsNats ?? "?"}× NATS (target ≤ ${TARGETS.pingVsNats}×), connect ${f.connectVsNats ?? "?"}× NATS (≤ ${TARGETS.connectVsNats}×), ` +
      (f.pingVsNatsTls !== undefined ? `against NATS with mutual TLS ping ${f.pingVsNatsTls}× and connect ${f.connectVsNatsTls ?? "?"}×, ` : "") +
      `controller ${f.controllerUsPerHost ?? "?"} µs CPU per host (≤ ${TARGETS.controllerUsPerHost}), proxies together ${f.proxiesUsPerHost ?? "?"} µs (≤ ${TARGETS.proxiesUsPerHost}). docs/fan-out.md gives the profile and floor of each.`;
    return result;
  },
  verdict: (r) => ({
    figure: `last reply p50 ${r.lastReplyMsP50} ms, best ${r.lastReplyMsBest} ms (${r.hosts} hosts, ${r.proxies} proxies)` + (r.nats?.available ? `; NATS p50 ${r.nats.medianMs} ms` : r.nats?.skipped ? `; NATS skipped` : "") +
      (r.natsTls?.available ? `; NATS with mTLS p50 ${r.natsTls.medianMs} ms, connect ${r.natsTls.connectMs} ms` : "") +
      (r.issue15 ? `; ${r.issue15.pingVsNats ?? "?"}× NATS, connect ${r.issue15.connectVsNats ?? "?"}× NATS, CPU per host: controller ${r.issue15.controllerUsPerHost} µs, proxies ${r.issue15.proxiesUsPerHost} µs` : "") +
      (r.signed ? `; signed \`true\` p50 ${r.signed.lastReplyMsP50} ms, controller ${r.signed.cpuUsPerHostP50.controller} µs/host` : ""),
    met:
      r.hosts >= 10_000 &&
      r.lastReplyMsP50 <= TARGET_MS &&
      (r.issue15 === undefined ||
        ((r.issue15.pingVsNats ?? Infinity) <= TARGETS.pingVsNats &&
          (r.issue15.connectVsNats ?? Infinity) <= TARGETS.connectVsNats &&
          r.issue15.controllerUsPerHost <= TARGETS.controllerUsPerHost &&
          r.issue15.proxiesUsPerHost <= TARGETS.proxiesUsPerHost)),
  }),
  plot: (r) => ({
    title: `ping ${r.hosts} hosts: submit → last reply`,
    unit: "ms",
    bars: [
      { label: "rexmesh p50", value: r.lastReplyMsP50, ref: TARGET_MS },
      { label: "rexmesh best", value: r.lastReplyMsBest, ref: TARGET_MS },
      ...(r.nats?.available ? [{ label: "NATS req/reply p50", value: r.nats.medianMs }] : []),
      ...(r.natsTls?.available ? [{ label: "NATS mTLS req/reply p50", value: r.natsTls.medianMs }] : []),
    ],
  }),
};

function natsNote(nats, n) {
  if (!nats) return "";
  if (!nats.available) return `\n\nNATS baseline skipped: ${nats.skipped ?? "not available"}.`;
  return `\n\nNATS baseline${nats.tls ? " with mutual TLS" : ""}, same machine, same run: request/reply to ${nats.subscribers ?? n} connections, median ${nats.medianMs} ms` + (nats.note ? ` (${nats.note})` : "") + ".";
}
