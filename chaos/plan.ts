import { Prng } from "./prng.js";
import { ALL_HOSTS, hostsBehind, TOPOLOGY } from "./topology.js";
import { runtimeMs, type TaskParams } from "./workload.js";

/** The kinds of fault a schedule draws from, each with output in flight on the hosts it touches. */
export const FAULT_KINDS = [
  "proxy-kill",
  "proxy-term",
  "failover",
  "daemon-kill",
  "daemon-term",
  "host-lost",
  "controller-kill",
  "controller-term",
  "partition-proxy",
  "isolate-daemon",
  "one-way",
  "half-open",
  "reset",
] as const;
export type FaultKind = (typeof FAULT_KINDS)[number];

/** One fault: struck at `at` (ms from the schedule's start) and healed `downMs` later. */
export interface FaultStep {
  id: number;
  at: number;
  kind: FaultKind;
  /** A role name, or a link `<dialler>-><server>`. */
  target: string;
  /** For kills: the signal. */
  signal?: "SIGKILL" | "SIGTERM";
  /** The links a relay fault acts on (one, or all of a daemon's). */
  links?: string[];
  /** Act only on those of `links` that carry a connection when the fault strikes (the daemon's link in use). */
  activeOnly?: boolean;
  /** One-way: the direction still forwarded. */
  flows?: "up" | "down";
  /** Half-open: the side whose connection is closed. */
  closed?: "client" | "server";
  downMs: number;
}

export type JobPurpose = "steady" | "victim" | "deadline" | "after";

export interface JobPlan {
  index: number;
  at: number;
  purpose: JobPurpose;
  /** The fault this job was placed around (victim and deadline jobs). */
  fault?: number;
  hosts: string[];
  params: TaskParams;
  timeoutMs?: number;
  deliveryDeadlineMs?: number;
  /** Cancel the job at this time (ms from start), in the middle of its fault. */
  cancelAt?: number;
}

export interface ChaosPlan {
  seed: number;
  /** Length of the fault phase: no fault strikes or lasts past it. */
  faultPhaseMs: number;
  /** Jobs keep being submitted this long after the fault phase. */
  afterMs: number;
  lostAfterMs: number;
  faults: FaultStep[];
  jobs: JobPlan[];
}

export interface PlanOptions {
  seed: number;
  minutes: number;
  /** The jobs' lost_after (host-lost faults last longer than it). Default 20 s. */
  lostAfterMs?: number;
  /** No faults at all (the same workload): a control run, which must pass. */
  noFaults?: boolean;
  /** Jobs submitted after the faults. Default 6 s. */
  afterMs?: number;
}

const proxyNames = TOPOLOGY.proxies.map((p) => p.name);
const daemonNames = TOPOLOGY.daemons.map((d) => d.name);
const failoverProxies = TOPOLOGY.proxies.filter((p) => TOPOLOGY.proxiesPerRegion[p.region]! > 1).map((p) => p.name);

function steadyParams(rng: Prng): TaskParams {
  return {
    lines: rng.int(8, 40),
    sleepMs: rng.int(80, 300),
    errEvery: rng.int(2, 7),
    pad: rng.int(1, 160),
    burst: rng.chance(0.3) ? rng.int(50, 600) : 0,
    exitCode: rng.chance(0.1) ? 3 : 0,
  };
}

/** Long enough to print through the whole fault and a little after it. */
function victimParams(rng: Prng, spanMs: number): TaskParams {
  const sleepMs = Math.max(rng.int(100, 250), Math.ceil(spanMs / 200));
  return { lines: Math.ceil(spanMs / sleepMs) + rng.int(5, 20), sleepMs, errEvery: rng.int(2, 5), pad: rng.int(1, 120), burst: rng.chance(0.3) ? rng.int(50, 400) : 0, exitCode: 0 };
}

/** A link to fault: a proxy's link to the controller, or the link a daemon is using when the fault strikes. */
function linkTarget(rng: Prng): Pick<FaultStep, "target" | "links" | "activeOnly"> {
  const choice = rng.pick([...proxyNames, ...daemonNames]);
  const daemon = TOPOLOGY.daemons.find((d) => d.name === choice);
  if (!daemon) return { target: `${choice}->controller`, links: [`${choice}->controller`] };
  return { target: `${daemon.name}->(its proxy)`, links: daemon.proxies.map((p) => `${daemon.name}->${p}`), activeOnly: true };
}

/** What a fault of this kind strikes, how, and for how long. */
function drawFault(rng: Prng, kind: FaultKind, lostAfterMs: number): Omit<FaultStep, "id" | "at"> {
  const signal = (): "SIGKILL" | "SIGTERM" => (rng.chance(0.5) ? "SIGKILL" : "SIGTERM");
  switch (kind) {
    case "proxy-kill":
      return { kind, target: rng.pick(proxyNames), signal: "SIGKILL", downMs: rng.int(200, 3000) };
    case "proxy-term":
      return { kind, target: rng.pick(proxyNames), signal: "SIGTERM", downMs: rng.int(200, 3000) };
    case "failover":
      // Down long enough for its hosts to notice and move to the other proxy of the region.
      return { kind, target: rng.pick(failoverProxies), signal: signal(), downMs: rng.int(6000, 10_000) };
    case "daemon-kill":
      return { kind, target: rng.pick(daemonNames), signal: "SIGKILL", downMs: rng.int(300, 4000) };
    case "daemon-term":
      return { kind, target: rng.pick(daemonNames), signal: "SIGTERM", downMs: rng.int(300, 4000) };
    case "host-lost":
      // Away past lost_after: its tasks must end LOST (or be reported before), then it returns.
      return { kind, target: rng.pick(daemonNames), signal: "SIGKILL", downMs: lostAfterMs + rng.int(3000, 6000) };
    case "controller-kill":
      return { kind, target: "controller", signal: "SIGKILL", downMs: rng.int(300, 3000) };
    case "controller-term":
      return { kind, target: "controller", signal: "SIGTERM", downMs: rng.int(300, 3000) };
    case "partition-proxy": {
      const proxy = rng.pick(proxyNames);
      return { kind, target: `${proxy}->controller`, links: [`${proxy}->controller`], downMs: rng.int(2000, 10_000) };
    }
    case "isolate-daemon": {
      const daemon = rng.pick(TOPOLOGY.daemons);
      return { kind, target: daemon.name, links: daemon.proxies.map((p) => `${daemon.name}->${p}`), downMs: rng.int(2000, 10_000) };
    }
    case "one-way":
      return { kind, ...linkTarget(rng), flows: rng.chance(0.5) ? "up" : "down", downMs: rng.int(2000, 8000) };
    case "half-open":
      return { kind, ...linkTarget(rng), closed: rng.chance(0.5) ? "client" : "server", downMs: rng.int(3000, 8000) };
    case "reset":
      return { kind, ...linkTarget(rng), downMs: 0 };
  }
}

/** What a fault occupies: two faults never act on the same role or link at once. */
function resources(f: Omit<FaultStep, "id" | "at">): string[] {
  return f.links ? [...f.links, `role:${f.target}`] : [`role:${f.target}`];
}

/**
 * The whole run a seed names: the faults (a shuffled deck of every kind, so
 * that a few seeds cover them all; at most two active at once, never two on
 * the same role or link) and the jobs (a steady stream, one victim job on the
 * hosts of each fault started shortly before it and printing through it,
 * deadline jobs sent to hosts that are down, cancels striking mid-fault).
 * Pure: the same options give the same plan.
 */
export function makePlan(opts: PlanOptions): ChaosPlan {
  const lostAfterMs = opts.lostAfterMs ?? 20_000;
  const afterMs = opts.afterMs ?? 6000;
  const faultPhaseMs = Math.round(opts.minutes * 60_000);
  const root = new Prng(opts.seed);
  const frng = root.fork("faults");
  const jrng = root.fork("jobs");

  const faults: FaultStep[] = [];
  let deck: FaultKind[] = [];
  const active: { until: number; uses: string[] }[] = [];
  for (let at = frng.int(2500, 4000), guard = 0; at < faultPhaseMs && guard < 1000 && !opts.noFaults; guard++) {
    const live = active.filter((a) => a.until > at);
    let placed: FaultStep | undefined;
    if (live.length < 2) {
      if (deck.length === 0) deck = frng.shuffle(FAULT_KINDS);
      // The long fault gets its last chance before the phase is too short for it.
      const lost = deck.indexOf("host-lost");
      if (lost > 0 && at + lostAfterMs + 6000 + 5000 > faultPhaseMs) deck.unshift(...deck.splice(lost, 1));
      for (let i = 0; i < deck.length && !placed; i++) {
        const drawn = drawFault(frng, deck[i]!, lostAfterMs);
        const uses = resources(drawn);
        const busy = live.some((a) => a.uses.some((u) => uses.includes(u)));
        if (busy || at + drawn.downMs > faultPhaseMs) continue;
        deck.splice(i, 1);
        placed = { id: faults.length + 1, at, ...drawn };
        // A killed role also needs time to stop (SIGTERM) and to start again.
        active.push({ until: at + drawn.downMs + (drawn.signal ? 5000 : 1000), uses });
      }
    }
    if (placed) faults.push(placed);
    at += frng.int(2000, 5000);
  }

  const jobs: JobPlan[] = [];
  const add = (j: Omit<JobPlan, "index">) => jobs.push({ index: 0, ...j });
  for (let at = 0; at < faultPhaseMs + afterMs; at += jrng.int(700, 1800)) {
    const params = steadyParams(jrng);
    const job: Omit<JobPlan, "index"> = { at, purpose: at < faultPhaseMs ? "steady" : "after", hosts: jrng.subset(ALL_HOSTS), params };
    if (jrng.chance(0.15)) {
      // Half of them end TIMED_OUT, half finish well within the limit.
      job.timeoutMs = jrng.chance(0.5) ? Math.max(500, Math.round(runtimeMs(params) / 2)) : runtimeMs(params) + 8000;
    }
    add(job);
  }
  for (const f of faults) {
    const hosts = hostsBehind(f.target);
    const lead = jrng.int(800, 2000);
    const victim: Omit<JobPlan, "index"> = { at: Math.max(0, f.at - lead), purpose: "victim", fault: f.id, hosts, params: victimParams(jrng, lead + f.downMs + jrng.int(3000, 6000)) };
    if (jrng.chance(0.3)) victim.cancelAt = f.at + Math.round(f.downMs * (0.2 + 0.6 * jrng.next())) + 100;
    add(victim);
    const down = f.kind === "daemon-kill" || f.kind === "daemon-term" || f.kind === "host-lost" || f.kind === "isolate-daemon";
    if (down && jrng.chance(0.7)) {
      add({ at: f.at + jrng.int(150, 400), purpose: "deadline", fault: f.id, hosts, params: steadyParams(jrng), deliveryDeadlineMs: jrng.int(1000, 4000) });
    }
  }
  jobs.sort((a, b) => a.at - b.at);
  jobs.forEach((j, i) => (j.index = i + 1));
  return { seed: opts.seed, faultPhaseMs, afterMs, lostAfterMs, faults, jobs };
}

/** The fault in words, for logs: "SIGKILL proxy-alpha-1 for 2.1 s". */
export function describeFault(f: FaultStep): string {
  const d = `${(f.downMs / 1000).toFixed(1)} s`;
  switch (f.kind) {
    case "proxy-kill":
    case "proxy-term":
    case "daemon-kill":
    case "daemon-term":
    case "controller-kill":
    case "controller-term":
      return `${f.signal} ${f.target}, restart after ${d}`;
    case "failover":
      return `failover: ${f.signal} ${f.target}, its hosts move to the region's other proxy; restart after ${d}`;
    case "host-lost":
      return `host lost: ${f.signal} ${f.target}, away ${d} (past lost_after)`;
    case "partition-proxy":
      return `silent partition ${f.target} for ${d}`;
    case "isolate-daemon":
      return `silent partition of ${f.target} from all its proxies for ${d}`;
    case "one-way":
      return `one-way link ${f.target} (only ${f.flows} flows) for ${d}`;
    case "half-open":
      return `half-open link ${f.target} (${f.closed} side closed, other side silent) for ${d}`;
    case "reset":
      return `connection reset on ${f.target}`;
  }
}
