import { setMaxListeners } from "node:events";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { operatorClient } from "../cli/client.js";
import { systemClock, type Clock } from "../common/clock.js";
import { stateName } from "../common/task-state.js";
import { check, DEFAULT_BOUNDS, type Bounds, type Violation } from "./checker.js";
import { ChaosMesh } from "./mesh.js";
import { Observer, type FinalRead } from "./observer.js";
import { describeFault, makePlan, type ChaosPlan, type FaultStep } from "./plan.js";
import { ALL_HOSTS, hostsBehind } from "./topology.js";
import { runtimeMs, scriptToken } from "./workload.js";

export interface RunOptions {
  seed: number;
  /** Length of the fault phase. */
  minutes: number;
  /** The workload without any fault: a control run. */
  noFaults?: boolean;
  bounds?: Partial<Bounds>;
  /** Where the mesh goes (a fresh directory inside it). Default: the system temp dir. */
  baseDir?: string;
  /** Keep the mesh directory (certificates, LMDB, logs, markers) even when the run passes. */
  keep?: boolean;
  /** Progress lines as the run goes. */
  progress?: (line: string) => void;
  /** Ends the run early (its mesh is still stopped and cleaned up). */
  signal?: AbortSignal;
  clock?: Clock;
}

export interface FaultLogEntry {
  at: number;
  text: string;
}

export interface RunResult {
  seed: number;
  minutes: number;
  ok: boolean;
  violations: Violation[];
  /** What was actually done, with times from the schedule's start. */
  faultLog: FaultLogEntry[];
  /** Facts worth knowing that are not violations (submits that never returned, orphan processes, …). */
  notes: string[];
  stats: {
    jobs: number;
    accepted: number;
    tasks: number;
    faults: number;
    spawns: number;
    /** Tasks by final state. */
    states: Record<string, number>;
    /** Seconds spent starting the mesh, playing the schedule, waiting for tasks to end, reading and checking. */
    phases: { start: number; schedule: number; settle: number; check: number };
    durationMs: number;
  };
  dir: string;
  plan: ChaosPlan;
}

function readSpawns(marksDir: string): Map<string, number[]> {
  const spawns = new Map<string, number[]>();
  if (!existsSync(marksDir)) return spawns;
  for (const f of readdirSync(marksDir)) {
    const lines = readFileSync(join(marksDir, f), "utf8").split("\n").filter((l) => l.trim() !== "");
    spawns.set(f, lines.map((l) => Number(l.trim().split(/\s+/)[1])));
  }
  return spawns;
}

/** A process of this run's workload still alive: only pids whose command line carries the run's token. */
function liveTaskProcess(pid: number, token: string): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
    if (state === "Z" || state === "X") return false;
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").includes(token);
  } catch {
    return false;
  }
}

/**
 * One chaos run: a fresh mesh, the seed's workload and fault schedule played
 * in real time, then — once every role is back — the wait for every task to
 * end within its bound, a final read of every job, and the checker.
 */
export async function runSeed(opts: RunOptions): Promise<RunResult> {
  const clock = opts.clock ?? systemClock;
  const bounds: Bounds = { ...DEFAULT_BOUNDS, ...opts.bounds };
  const plan = makePlan({ seed: opts.seed, minutes: opts.minutes, lostAfterMs: bounds.lostAfterMs, noFaults: opts.noFaults });
  const base = opts.baseDir ?? tmpdir();
  mkdirSync(base, { recursive: true });
  const dir = mkdtempSync(join(base, `rexmesh-chaos-${opts.seed}-`));
  const marksDir = join(dir, "marks");
  const runId = `${opts.seed}-${dir.slice(-6)}`;
  const token = scriptToken(runId);
  const progress = opts.progress ?? (() => undefined);
  // Every scheduled step sleeps on this signal: a run's own, linked to the caller's.
  const stopRun = new AbortController();
  setMaxListeners(0, stopRun.signal);
  const signal = stopRun.signal;
  const onAbort = () => stopRun.abort(opts.signal?.reason);
  if (opts.signal?.aborted) onAbort();
  else opts.signal?.addEventListener("abort", onAbort, { once: true });
  const started = clock.now();
  const mesh = new ChaosMesh({ dir: join(dir, "mesh"), clock });
  const faultLog: FaultLogEntry[] = [];
  const notes: string[] = [];
  let conn: ReturnType<typeof operatorClient> | undefined;
  let obs: Observer | undefined;
  let result: RunResult | undefined;
  try {
    progress(`seed ${opts.seed}: starting the mesh in ${dir}`);
    await mesh.start();
    mkdirSync(marksDir, { recursive: true });
    const startMs = clock.now() - started;
    conn = operatorClient({}, mesh.mesh.exports());
    const t0 = clock.now();
    const o = (obs = new Observer(conn.client, clock, t0, { runId, marksDir, lostAfterMs: bounds.lostAfterMs, retryForMs: 60_000 }));
    const log = (text: string) => {
      faultLog.push({ at: o.now(), text });
      progress(`  +${(o.now() / 1000).toFixed(1)}s ${text}`);
    };
    const until = (ms: number) => clock.sleep(Math.max(0, t0 + ms - clock.now()), signal);
    const background: Promise<unknown>[] = [];
    const healedAt: number[] = [];

    const runFault = async (f: FaultStep) => {
      await until(f.at);
      const hosts = hostsBehind(f.target);
      log(`fault ${f.id}: ${describeFault(f)} — ${o.runningOn(hosts)} task(s) running on ${hosts.join(",")}`);
      try {
        if (f.links) {
          const live = f.links.filter((l) => mesh.relay(l).connections > 0);
          const links = f.activeOnly && live.length > 0 ? live : f.links;
          if (f.activeOnly) log(`fault ${f.id}: acts on ${links.join(", ")}`);
          for (const l of links) {
            const r = mesh.relay(l);
            if (f.kind === "one-way") r.oneWay(f.flows!);
            else if (f.kind === "half-open") r.halfOpen(f.closed!);
            else if (f.kind === "reset") r.reset();
            else r.stop();
          }
          if (f.kind !== "reset") {
            await clock.sleep(f.downMs, signal);
            for (const l of links) mesh.relay(l).restore();
          }
        } else {
          const waited = await mesh.exclusive(f.target, async () => {
            await mesh.kill(f.target, f.signal!, t0);
            log(`fault ${f.id}: ${f.target} exited`);
            await clock.sleep(f.downMs, signal);
            await mesh.restart(f.target, t0);
          });
          if (waited > 100) log(`fault ${f.id}: struck ${(waited / 1000).toFixed(1)} s late, after an earlier fault on ${f.target} had healed`);
          if (f.target === "controller") background.push(o.audit(`after the controller restart of fault ${f.id}`));
        }
        log(`fault ${f.id}: healed`);
      } catch (err) {
        if (signal.aborted) throw err;
        log(`fault ${f.id}: could not heal: ${(err as Error).message.split("\n")[0]}`);
      }
      healedAt.push(o.now());
    };

    const work: Promise<unknown>[] = [];
    for (const j of plan.jobs) {
      work.push(
        until(j.at).then(async () => {
          if (j.purpose === "deadline") log(`deadline job #${j.index} to ${j.hosts.join(",")} (delivery deadline ${(j.deliveryDeadlineMs! / 1000).toFixed(1)} s) during fault ${j.fault}`);
          await o.submit(j, opts.seed);
        }),
      );
      if (j.cancelAt !== undefined) {
        work.push(
          until(j.cancelAt).then(async () => {
            log(`cancel job #${j.index} (victim of fault ${j.fault}) mid-fault`);
            await o.cancel(j.index);
            const job = o.jobs.get(j.index);
            log(job?.cancelledAt !== undefined ? `cancel job #${j.index}: CancelJob returned` : `cancel job #${j.index}: not done (${job?.cancelError ?? "job not accepted"})`);
          }),
        );
      }
    }
    // Every step ends by itself (errors are logged or recorded); only an abort rejects, once all have stopped.
    await Promise.allSettled([...plan.faults.map(runFault), ...work]);
    await Promise.allSettled(background);
    if (signal.aborted) throw signal.reason;

    // Every role back, every link open: from here no fault is active.
    let healPhaseAt = 0;
    for (const l of mesh.faultyLinks()) {
      log(`heal: restoring ${l}, still faulty after the schedule`);
      mesh.relay(l).restore();
      healPhaseAt = o.now();
    }
    for (const role of mesh.down()) {
      log(`heal: restarting ${role}, still down after the schedule`);
      await mesh.exclusive(role, () => mesh.restart(role, t0)).catch((err) => notes.push(`could not restart ${role}: ${(err as Error).message.split("\n")[0]}`));
      healPhaseAt = o.now();
    }
    const lastHealAt = Math.max(0, healPhaseAt, ...healedAt);
    log(`schedule over; last heal at +${(lastHealAt / 1000).toFixed(1)}s`);
    const scheduleMs = o.now();
    let healError: string | undefined;
    try {
      await mesh.mesh.waitForHosts(ALL_HOSTS.length, 60_000);
    } catch (err) {
      healError = (err as Error).message;
    }

    // Wait for every task to end, at most until the latest bound.
    let waitUntil = 0;
    for (const job of o.jobs.values()) {
      const term = Math.max(runtimeMs(job.plan.params) + (job.plan.timeoutMs ?? 0), bounds.lostAfterMs);
      waitUntil = Math.max(waitUntil, Math.max(lastHealAt, job.acceptedAt) + term + bounds.slackMs);
    }
    for (let round = 0; round < 10_000; round++) {
      const open = await o.pollOpen();
      if (open === 0 || o.now() > waitUntil + 1000) {
        progress(`  +${(o.now() / 1000).toFixed(1)}s ${open} task(s) not terminal`);
        break;
      }
      await clock.sleep(1000, signal);
    }
    await o.stop();
    const settleMs = o.now() - scheduleMs;

    // Read every job from its start, a few at a time (a job that never ends costs an idle timeout).
    const finals = new Map<string, FinalRead>();
    const queue = [...o.jobs.values()];
    await Promise.all(
      Array.from({ length: 8 }, async () => {
        for (let job = queue.shift(); job; job = queue.shift()) finals.set(job.jobId, await o.finalRead(job));
      }),
    );
    await o.audit("final");
    const spawns = readSpawns(marksDir);

    // Task processes still alive now that the run is over: every task of theirs should have ended. (A task's
    // process dies with its daemon at its next write, by SIGPIPE: the workload writes all the time.)
    const known = new Map([...o.tasks.values()].map((t) => [t.taskId, t]));
    for (const [taskId, pids] of spawns) {
      for (const pid of pids) {
        if (!liveTaskProcess(pid, token)) continue;
        const t = known.get(taskId);
        const last = t?.history[t.history.length - 1];
        notes.push(`orphan: task ${taskId} on ${t?.hostId ?? "?"} (${last ? stateName(last.state) : "unknown"}) still has its process ${pid} running after the run`);
      }
    }

    const jobs = [...o.jobs.values()];
    const controllerDown = mesh.downtimes.filter((d) => d.role === "controller");
    const violations = check({ jobs, tasks: o.tasks, finals, audits: o.audits, spawns, lastHealAt, controllerDown, healError, bounds }, o.now());
    for (const u of o.unaccepted) notes.push(`job #${u.plan.index} (${u.plan.purpose}) was never accepted: ${u.error}`);
    const states: Record<string, number> = {};
    let tasks = 0;
    for (const job of jobs) {
      for (const id of job.taskIds.values()) {
        tasks++;
        const t = finals.get(job.jobId)?.tasks.get(id) ?? o.tasks.get(id)?.last;
        const name = t ? stateName(t.state) : "UNSEEN";
        states[name] = (states[name] ?? 0) + 1;
      }
    }
    const spawnCount = [...spawns.entries()].filter(([id]) => known.has(id)).reduce((n, [, p]) => n + p.length, 0);
    // Every task as it ended, for reading a failure beside the logs.
    const rows = ["job\tpurpose\ttask\thost\tstate\texit\tproxy\tspawns\tmessage"];
    for (const job of jobs) {
      for (const [host, id] of job.taskIds) {
        const t = finals.get(job.jobId)?.tasks.get(id) ?? o.tasks.get(id)?.last;
        rows.push([job.plan.index, job.plan.purpose, id, host, t ? stateName(t.state) : "UNSEEN", t?.exitCode ?? "", t?.proxy ?? "", spawns.get(id)?.length ?? 0, t?.message ?? ""].join("\t"));
      }
    }
    writeFileSync(join(dir, "tasks.tsv"), `${rows.join("\n")}\n`);
    result = {
      seed: opts.seed,
      minutes: opts.minutes,
      ok: violations.length === 0,
      violations,
      faultLog,
      notes,
      stats: {
        jobs: plan.jobs.length,
        accepted: jobs.length,
        tasks,
        faults: plan.faults.length,
        spawns: spawnCount,
        states,
        phases: { start: startMs / 1000, schedule: scheduleMs / 1000, settle: settleMs / 1000, check: (o.now() - scheduleMs - settleMs) / 1000 },
        durationMs: clock.now() - started,
      },
      dir,
      plan,
    };
    return result;
  } finally {
    opts.signal?.removeEventListener("abort", onAbort);
    await obs?.stop();
    conn?.close();
    await mesh.stop().catch(() => undefined);
    // The workload's own processes, should any outlive their daemon: found by the run's token, killed by group.
    for (const [, pids] of readSpawns(marksDir)) {
      for (const pid of pids) {
        if (!liveTaskProcess(pid, token)) continue;
        try {
          process.kill(-pid, "SIGKILL");
        } catch {
          /* already gone */
        }
      }
    }
    if (result && !result.ok) writeFileSync(join(dir, "report.txt"), `${formatResult(result, Number.MAX_SAFE_INTEGER)}\n`);
    if (result?.ok && !opts.keep) rmSync(dir, { recursive: true, force: true });
  }
}

/** "I1×32 [left RUNNING 27, left DELIVERED 5]" for each invariant violated. */
export function tally(violations: readonly Violation[]): string {
  const by = new Map<string, Map<string, number>>();
  for (const v of violations) {
    let kinds = by.get(v.invariant);
    if (!kinds) by.set(v.invariant, (kinds = new Map()));
    kinds.set(v.kind, (kinds.get(v.kind) ?? 0) + 1);
  }
  return [...by]
    .map(([inv, kinds]) => `${inv}×${[...kinds.values()].reduce((a, b) => a + b, 0)} [${[...kinds].map(([k, n]) => `${k} ${n}`).join(", ")}]`)
    .join(" ");
}

/** The report of one run: a line, then on failure every violation (up to maxPerInvariant each), the notes, the fault log and how to replay. */
export function formatResult(r: RunResult, maxPerInvariant = 5): string {
  const states = Object.entries(r.stats.states).map(([k, v]) => `${k} ${v}`).join(", ");
  const p = r.stats.phases;
  const took = `${(r.stats.durationMs / 1000).toFixed(0)} s (start ${p.start.toFixed(0)}, schedule ${p.schedule.toFixed(0)}, settle ${p.settle.toFixed(0)}, check ${p.check.toFixed(0)})`;
  const lines = [`seed ${r.seed}: ${r.ok ? "ok" : `FAIL ${tally(r.violations)}`} — ${r.stats.accepted}/${r.stats.jobs} jobs, ${r.stats.tasks} tasks (${states}), ${r.stats.spawns} spawns, ${r.stats.faults} faults, ${took}`];
  if (!r.ok) {
    for (const inv of new Set(r.violations.map((v) => v.invariant))) {
      const of = r.violations.filter((v) => v.invariant === inv);
      for (const v of of.slice(0, maxPerInvariant)) {
        lines.push(`  ${v.invariant} ${v.summary}`);
        for (const e of v.evidence) lines.push(`      ${e}`);
      }
      if (of.length > maxPerInvariant) lines.push(`  ${inv} … and ${of.length - maxPerInvariant} more`);
    }
  }
  for (const n of r.notes.slice(0, 10)) lines.push(`  note: ${n}`);
  if (r.notes.length > 10) lines.push(`  note: … and ${r.notes.length - 10} more`);
  if (!r.ok) {
    lines.push(`  fault log (seed ${r.seed}, ${r.minutes} min; times from the schedule's start):`);
    for (const e of r.faultLog) lines.push(`    +${(e.at / 1000).toFixed(1)}s ${e.text}`);
    lines.push(`  mesh directory (logs, LMDB, spawn markers, report.txt with every violation, tasks.tsv): ${r.dir}`);
    lines.push(`  replay: npm run chaos -- --seed ${r.seed} --minutes ${r.minutes}${r.plan.faults.length === 0 ? " --no-faults" : ""}`);
  }
  return lines.join("\n");
}
