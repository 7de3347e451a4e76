/**
 * "A partition mid-job converges to the same per-host states as without it."
 *
 * A mesh (region east with two proxies, region west with one; 48 hosts
 * online and one offline) runs a fixed set of jobs whose outcome differs per
 * host: exit codes and output, an execution timeout some hosts hit, tasks
 * cancelled by host id while they run, a host offline past the delivery
 * deadline, and a ping and a short job submitted while a fault is in force.
 * It runs them once without faults (the baseline), then once per seed with a
 * seeded schedule of faults striking while every shell task still runs and
 * output is streaming (see scheduleOf): silent and one-way cuts of a
 * proxy's link to the controller, a silent cut of its hosts' links, SIGKILL
 * and restart of a proxy or of the controller, resets of connections. Every
 * run must end with the baseline's outcome on every host (state, exit code,
 * signal, output bytes and digests, result check, late report), within a
 * bounded time, with no process started twice.
 *
 * Each run has a mesh of its own, so that a seed replays the same way alone
 * as after others (a proxy's reconnect backoff only starts over after a link
 * that stayed up 10 s: runs sharing a mesh made each other slower). A failing
 * run names its seed; `REXMESH_FAULT_SEED=<n>[,<n>…]` runs those seeds
 * instead of the CI ones.
 */
import { createHash } from "node:crypto";
import { mkdirSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { create } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import type { Client } from "@connectrpc/connect";
import { isRunning, LocalMesh, type RoleProcess } from "../../cli/launcher.js";
import { Prng } from "../../chaos/prng.js";
import { isTerminal, stateName } from "../../common/task-state.js";
import { ConnectionState, JobState, ResultCheck, SubmitJobRequestSchema, type ControllerService, type Task } from "../../gen/rexmesh/v1/controller_pb.js";
import { clientOf, collectJob, hostIds, SilentCut, spawnsOf, tempDir, until } from "./support.js";
import { testCa } from "../test-ca.js";

type Api = Client<typeof ControllerService>;

const EAST = hostIds(25, "e");
const WEST = hostIds(24, "w");
/** Alone in its daemon process (12 hosts per process, 25 in east), which is stopped before any job. */
const OFFLINE = "e25";
const ALL = [...EAST, ...WEST];
const ONLINE = ALL.filter((h) => h !== OFFLINE);
const indexOf = new Map(ALL.map((h, i) => [h, i]));
const idx = (host: string) => indexOf.get(host)!;
/** Hosts whose task of the cancel job is cancelled by host id while it runs. */
const CANCELLED = ONLINE.filter((h) => idx(h) % 4 === 1);

const SHELL_LINES = 8;
/** Bytes of x the shell job writes after the release: FILLER + i × FILLER_STEP. */
const FILLER = 4096;
const FILLER_STEP = 512;
/** Delivery deadline of the shell job: its online tasks start long before, the offline host's task ends EXPIRED. */
const SHELL_DEADLINE_MS = 10_000;
/**
 * The timeout job's timeout. A task's timeout counts from the daemon taking
 * it, not from its process's start (a stalled spawner must not hold a task
 * past it), and the three jobs start 144 processes within a second: on a
 * 2-core VM whose spawn() costs 7–13 ms (Firecracker, measured 2026-12-06) the
 * last of them started up to 2.9 s after its submit, and 2.5 s here timed out
 * the quick tasks of a whole daemon in every run.
 */
const TIMEOUT_MS = 6000;

// ---- the jobs --------------------------------------------------------------

/** `i` = the host's index in ALL, set by a case over the host id; then the marker line that counts spawns. */
const prologue = [
  `case "$REXMESH_HOST_ID" in ${ALL.map((h, i) => `${h}) i=${i};;`).join(" ")} *) i=999;; esac`,
  'echo "$REXMESH_TASK_ID" >> "$MARK/$REXMESH_TASK_ID"',
].join("\n");

/** Waits (bounded: 60 s) until the test lets the tail of the output go. */
const awaitRelease = 'n=0; while [ ! -e "$MARK/release" ]; do sleep 0.25; n=$((n+1)); if [ $n -gt 240 ]; then echo "never released" >&2; exit 99; fi; done';

const shellScript = [
  prologue,
  `k=1; while [ $k -le ${SHELL_LINES} ]; do echo "out $REXMESH_HOST_ID $k"; echo "err $REXMESH_HOST_ID $k" >&2; sleep 0.4; k=$((k+1)); done`,
  awaitRelease,
  `head -c $((${FILLER} + i * ${FILLER_STEP})) /dev/zero | tr '\\0' x; echo`,
  'echo "tail $REXMESH_HOST_ID" >&2',
  "sleep 0.5",
  'echo "end $REXMESH_HOST_ID"',
  "exit $((i % 3))",
].join("\n");

const timeoutScript = [prologue, 'echo "begin $REXMESH_HOST_ID"', 'if [ $((i % 2)) -eq 0 ]; then sleep 12; echo never; else sleep 0.3; echo "quick $REXMESH_HOST_ID"; fi'].join("\n");

const cancelScript = [
  prologue,
  'echo "start $REXMESH_HOST_ID"',
  'if [ $((i % 4)) -eq 1 ]; then sleep 90; echo "not cancelled"; exit 7; fi',
  awaitRelease,
  'echo "done $REXMESH_HOST_ID"',
].join("\n");

/** Submitted while a fault is in force: a short process per host, so that delivery itself goes through the fault. */
const lateScript = [prologue, 'echo "late $REXMESH_HOST_ID"', "exit $((i % 2))"].join("\n");

const shell = (script: string) => [{ tool: { case: "shell" as const, value: { script } } }];

const expectedShell = (host: string) => {
  const i = idx(host);
  let out = "";
  let err = "";
  for (let k = 1; k <= SHELL_LINES; k++) {
    out += `out ${host} ${k}\n`;
    err += `err ${host} ${k}\n`;
  }
  out += "x".repeat(FILLER + i * FILLER_STEP) + "\n" + `end ${host}\n`;
  err += `tail ${host}\n`;
  return { out, err, code: i % 3 };
};

type JobName = "shell" | "timeout" | "cancel" | "ping" | "late";

// ---- what a run ends with, per host ----------------------------------------

interface Outcome {
  state: string;
  exitCode: number | null;
  signal: string;
  stdout: string;
  stderr: string;
  resultCheck: string;
  outputComplete: boolean;
  outputTruncated: boolean;
  late: string;
  spawns: number;
}

const digest = (b: Buffer | undefined) => `${b?.length ?? 0}:${createHash("sha256").update(b ?? Buffer.alloc(0)).digest("hex")}`;


// ---- the fault schedule ----------------------------------------------------

const KINDS = ["cut", "one-way", "host-cut", "proxy-kill", "controller-kill", "reset", "host-reset"] as const;
type Kind = (typeof KINDS)[number];
const PROXIES = ["proxy-east-1", "proxy-east-2", "proxy-west"];

interface Fault {
  kind: Kind;
  /** The proxy whose controller link is cut, which is killed, or whose hosts' links are cut or reset (none for a controller kill or a reset of everything). */
  proxy?: string;
  /** Pause before it strikes. */
  gapMs: number;
  /** How long it lasts: a cut's silence, a killed process's downtime. */
  holdMs: number;
}

interface Schedule {
  seed: number;
  faults: Fault[];
  /** The ping and late jobs are submitted while this fault is in force (just before it, for a controller kill). */
  pingAt: number;
  /** The per-host cancel is sent once this fault has struck (during its hold, unless the controller is down). */
  cancelAt: number;
}

/**
 * Three distinct kinds of fault, in a seeded order, targets and timing:
 * `cut` (silence both ways) and `one-way` (acks lost) on a proxy's link to
 * the controller; `host-cut`, silence on the links of one proxy's hosts
 * (the proxy stays linked to the controller and is sent work for hosts it
 * cannot reach; once heartbeats give up, the hosts redial, in east possibly
 * the other proxy); `proxy-kill` and `controller-kill` (SIGKILL, restart);
 * `reset`, every connection torn down; `host-reset`, the links of one
 * proxy's hosts torn down (they reconnect at once).
 */
function scheduleOf(seed: number): Schedule {
  const rng = new Prng(seed);
  const faults = rng.shuffle(KINDS).slice(0, 3).map((kind): Fault => ({
    kind,
    ...(kind === "controller-kill" || kind === "reset" ? {} : { proxy: rng.pick(PROXIES) }),
    gapMs: rng.int(100, 600),
    // A cut of the controller link may end before heartbeats give up on it (3 intervals: 3 s) or after; the hosts' links are cut past it.
    holdMs: kind.endsWith("reset") ? 0 : kind.endsWith("kill") ? rng.int(0, 1000) : kind === "host-cut" ? rng.int(3500, 5000) : rng.int(1500, 3500),
  }));
  return { seed, faults, pingAt: rng.int(0, faults.length - 1), cancelAt: rng.int(0, faults.length - 1) };
}

const describeSchedule = (s: Schedule) =>
  `seed ${s.seed}: ` + s.faults.map((f, i) => `${i === s.pingAt ? "ping+" : ""}${f.kind}${f.proxy ? `(${f.proxy})` : ""}/${f.holdMs}ms${i === s.cancelAt ? "+cancel" : ""}`).join(", ");

/** Seeds run in CI: together they strike with every kind of fault (checked below). */
const CI_SEEDS = [9, 34, 42];
/** `REXMESH_FAULT_SEED=7` (or `7,19,20`) runs those seeds instead. */
const SEEDS = process.env.REXMESH_FAULT_SEED ? process.env.REXMESH_FAULT_SEED.split(",").map((s) => Number(s.trim())) : CI_SEEDS;
if (SEEDS.some((s) => !Number.isInteger(s))) throw new Error(`REXMESH_FAULT_SEED must be whole numbers, comma separated: ${process.env.REXMESH_FAULT_SEED}`);

const pause = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * One mesh for one run, every link through a relay: each proxy's to the
 * controller and each daemon process's to each proxy of its region.
 */
class Testbed {
  readonly relays = new Map<string, SilentCut>();
  readonly mesh: LocalMesh;
  private conn: ReturnType<typeof clientOf> | undefined;

  constructor(label: string) {
    this.mesh = new LocalMesh({
      ca: testCa(),
      dir: tempDir(`convergence-${label}`),
      regions: ["east", "west"],
      proxiesPerRegion: { east: 2, west: 1 },
      hosts: [...EAST.map((id) => ({ id, region: "east" })), ...WEST.map((id) => ({ id, region: "west" }))],
      hostsPerProcess: 12,
      shareHostKey: true,
      // A short kill grace: the spawner's late report of an exit is still waited for at least 5 s (the executor's report wait).
      // Until that wait was its own, a loaded CI run on a 2-core VM ended a daemon's six timed-out tasks here with their exit
      // unknown: the spawner reported it more than the 1 s grace after their groups were gone.
      daemonArgs: ["--heartbeat", "1s", "--kill-grace", "1s"],
      proxyArgs: ["--heartbeat", "1s"],
      controllerArgs: ["--heartbeat", "1s"],
      route: async ({ from, to, address }) => {
        const relay = await SilentCut.start(address);
        this.relays.set(`${from}->${to}`, relay);
        return relay.address;
      },
    });
  }

  /** Starts every process, waits for every host, then stops the offline host's daemon and waits until the controller sees it gone. */
  async start(): Promise<void> {
    await this.mesh.start();
    await this.mesh.waitForHosts(ALL.length);
    await this.mesh.kill(this.mesh.daemons.find((d) => d.hosts.includes(OFFLINE))!, "SIGTERM");
    await until(`${OFFLINE} to be seen offline`, this.probe(async (api) => ((await api.listHosts({})).hosts.find((h) => h.id === OFFLINE)?.connection === ConnectionState.DISCONNECTED ? true : undefined)));
  }

  async stop(): Promise<void> {
    this.conn?.close();
    try {
      await this.mesh.stop();
    } finally {
      for (const r of this.relays.values()) r.close();
    }
  }

  /** The links of the daemons to a proxy (each daemon process dials every proxy of its region it was given). */
  hostLinks(proxy: string): SilentCut[] {
    return [...this.relays].filter(([name]) => name.startsWith("daemon-") && name.endsWith(`->${proxy}`)).map(([, r]) => r);
  }

  controllerLink(proxy: string): SilentCut {
    const r = this.relays.get(`${proxy}->controller`);
    if (!r) throw new Error(`no relay in front of the controller for ${proxy}`);
    return r;
  }

  /**
   * Calls the controller, dialling again after a failure (the controller may
   * have been restarted); three attempts. Only for calls that may be
   * repeated: submits carry an idempotency key.
   */
  async call<T>(fn: (api: Api) => Promise<T>): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      this.conn ??= clientOf(this.mesh);
      try {
        return await fn(this.conn.client);
      } catch (err) {
        this.conn.close();
        this.conn = undefined;
        if (attempt >= 3) throw err;
        await pause(200 * attempt);
      }
    }
  }

  /** A probe for `until`: undefined while the controller cannot answer. */
  probe<T>(fn: (api: Api) => Promise<T | undefined>): () => Promise<T | undefined> {
    return () => this.call(fn).catch(() => undefined);
  }

  async kill(p: RoleProcess): Promise<void> {
    await this.mesh.kill(p, "SIGKILL");
  }

  /** Restarts a killed role on its address; a start that fails (the port not free yet on a slow machine) is tried again. */
  async restart(p: RoleProcess): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      try {
        await this.mesh.restart(p);
        return;
      } catch (err) {
        if (isRunning(p)) await this.kill(p);
        if (attempt >= 3) throw err;
      }
    }
  }
}

interface Struck {
  fault: string;
  /** Shell tasks not terminal at the controller just before it struck. */
  openShellTasks: number;
  /** Shell output chunks stored by then. */
  chunksStored: number;
}

interface Run {
  outcomes: Map<string, Outcome>;
  /** Each task's message, not compared (it names proxies, pids and times) but shown beside a difference. */
  messages: Map<string, string>;
  struck: Struck[];
  /** From the first submit to every job settled and collected. */
  ms: number;
}

/** Waits until a job is DONE, no result check is pending and the cancelled hosts' own ends are in (late reports). */
async function settle(bed: Testbed, jobId: string, name: JobName, timeoutMs: number): Promise<void> {
  const taskSettled = (t: Task) =>
    isTerminal(t.state) && t.resultCheck !== ResultCheck.OUTPUT_PENDING && (name !== "cancel" || !CANCELLED.includes(t.hostId) || (t.lateReport !== undefined && t.outputChunks >= 1n));
  try {
    await until(
      `${name} job ${jobId} to settle`,
      bed.probe(async (api) => {
        const { job, tasks } = await api.getJob({ jobId });
        return job?.state === JobState.DONE && tasks.every(taskSettled) ? true : undefined;
      }),
      timeoutMs,
    );
  } catch (err) {
    const { tasks } = await bed.call((api) => api.getJob({ jobId }));
    const open = tasks.filter((t) => !taskSettled(t)).map((t) => `${t.hostId}:${stateName(t.state)}@${t.proxy}(chunks ${t.outputChunks}/${t.outputChunksExpected}, check ${ResultCheck[t.resultCheck]}, late ${t.lateReport ? stateName(t.lateReport.state) : "-"})`);
    throw new Error(`${name} job did not settle: ${open.length} tasks open: ${open.slice(0, 12).join(" ")}`, { cause: err });
  }
}

/**
 * Runs the jobs once on a mesh of their own: submits them, waits until every
 * online host runs its three processes, then either strikes with the
 * schedule's faults or (the baseline) takes the same steps without them,
 * lets the output's tail go, and collects every host's outcome once
 * everything settled.
 */
async function runJobs(label: string, schedule?: Schedule): Promise<Run> {
  const bed = new Testbed(label);
  try {
    await bed.start();
    return await runOn(bed, label, schedule);
  } finally {
    await bed.stop();
  }
}

async function runOn(bed: Testbed, label: string, schedule?: Schedule): Promise<Run> {
  const t0 = Date.now();
  const marks = join(bed.mesh.dir, "marks");
  mkdirSync(marks, { recursive: true });
  const env = { MARK: marks };

  const jobs = new Map<JobName, string>();
  const submit = async (name: JobName, req: Parameters<Api["submitJob"]>[0]) => {
    const { job } = await bed.call((api) => api.submitJob(create(SubmitJobRequestSchema, { ...req, idempotencyKey: `${label}-${name}` })));
    jobs.set(name, job!.id);
  };
  await submit("shell", { hostIds: ALL, steps: shell(shellScript), env, deliveryDeadline: durationFromMs(SHELL_DEADLINE_MS) });
  await submit("timeout", { hostIds: ONLINE, steps: shell(timeoutScript), env, timeout: durationFromMs(TIMEOUT_MS) });
  await submit("cancel", { hostIds: ONLINE, steps: shell(cancelScript), env });
  // Every online host has started its three processes (each writes its marker first), and the shell job's output reaches
  // the controller: the faults must strike with output flowing (checked below), which a loaded machine may take a moment for.
  await until("every process to start", async () => (readdirSync(marks).length >= 3 * ONLINE.length ? true : undefined), 30_000);
  await until(
    "the shell job's first output stored",
    bed.probe(async (api) => ((await api.getJob({ jobId: jobs.get("shell")! })).tasks.some((t) => t.outputChunks > 0n) ? true : undefined)),
    30_000,
  );

  const ping = async () => {
    await submit("ping", { hostIds: ONLINE, steps: [{ tool: { case: "ping", value: {} } }], deliveryDeadline: durationFromMs(60_000) });
    await submit("late", { hostIds: ONLINE, steps: shell(lateScript), env, deliveryDeadline: durationFromMs(60_000) });
  };
  const cancel = () => bed.call((api) => api.cancelJob({ jobId: jobs.get("cancel")!, hostIds: CANCELLED }));
  const release = () => writeFileSync(join(marks, "release"), "");
  const struck: Struck[] = [];

  if (!schedule) {
    await ping();
    await cancel();
    release();
  } else {
    for (const [i, f] of schedule.faults.entries()) {
      await pause(f.gapMs);
      const now = i === schedule.pingAt;
      if (now && f.kind === "controller-kill") await ping();
      const { tasks } = await bed.call((api) => api.getJob({ jobId: jobs.get("shell")! }));
      struck.push({
        fault: `${f.kind}${f.proxy ? `(${f.proxy})` : ""}`,
        openShellTasks: tasks.filter((t) => t.hostId !== OFFLINE && !isTerminal(t.state)).length,
        chunksStored: tasks.reduce((n, t) => n + Number(t.outputChunks), 0),
      });
      const last = i === schedule.faults.length - 1;
      switch (f.kind) {
        case "cut":
        case "one-way":
        case "host-cut": {
          const links = f.kind === "host-cut" ? bed.hostLinks(f.proxy!) : [bed.controllerLink(f.proxy!)];
          // one-way: the proxy's frames reach the controller; its acks and heartbeats do not come back.
          for (const link of links) if (f.kind === "one-way") link.oneWay("up");
          else link.stop();
          if (now) await ping();
          if (last) release();
          if (i === schedule.cancelAt) await cancel();
          await pause(f.holdMs);
          for (const link of links) link.restore();
          break;
        }
        case "reset":
        case "host-reset":
          for (const r of f.kind === "reset" ? bed.relays.values() : bed.hostLinks(f.proxy!)) r.reset();
          if (now) await ping();
          if (last) release();
          if (i === schedule.cancelAt) await cancel();
          break;
        case "proxy-kill":
        case "controller-kill": {
          const p = f.kind === "controller-kill" ? bed.mesh.controller : bed.mesh.role(f.proxy!);
          await bed.kill(p);
          if (now && f.kind === "proxy-kill") await ping();
          if (last) release();
          if (i === schedule.cancelAt && f.kind === "proxy-kill") await cancel();
          await pause(f.holdMs);
          await bed.restart(p);
          if (i === schedule.cancelAt && f.kind === "controller-kill") await cancel();
          break;
        }
      }
    }
  }

  // Bounded: every job ends and settles within this, whatever struck.
  const deadline = Date.now() + 40_000;
  for (const [name, jobId] of jobs) await settle(bed, jobId, name, Math.max(1000, deadline - Date.now()));

  const outcomes = new Map<string, Outcome>();
  const messages = new Map<string, string>();
  for (const [name, jobId] of jobs) {
    const r = await bed.call((api) => collectJob(api, jobId, AbortSignal.timeout(20_000)));
    expect(r.tasks.size, `${label}: ${name} tasks`).toBe(name === "shell" ? ALL.length : ONLINE.length);
    for (const [host, t] of r.tasks) {
      const seqs = r.seqs.get(host) ?? [];
      expect(new Set(seqs).size, `${label}: ${name}/${host} no chunk read twice`).toBe(seqs.length);
      outcomes.set(`${name}/${host}`, {
        state: stateName(t.state),
        exitCode: t.exitCode ?? null,
        signal: t.signal,
        stdout: digest(r.stdout.get(host)),
        stderr: digest(r.stderr.get(host)),
        resultCheck: ResultCheck[t.resultCheck] ?? String(t.resultCheck),
        outputComplete: t.outputComplete,
        outputTruncated: t.outputTruncated,
        late: t.lateReport ? `${stateName(t.lateReport.state)}/${t.lateReport.exitCode ?? ""}/${t.lateReport.signal}` : "",
        spawns: name === "ping" ? 0 : spawnsOf(marks, t.id),
      });
      messages.set(`${name}/${host}`, `${t.id}: ${t.message}`);
      if (name === "shell" && host !== OFFLINE) {
        // The exact bytes each host wrote, not just the same as the baseline's.
        const want = expectedShell(host);
        expect(r.stdout.get(host)?.toString(), `${label}: shell/${host} stdout`).toBe(want.out);
        expect(r.stderr.get(host)?.toString(), `${label}: shell/${host} stderr`).toBe(want.err);
      }
    }
  }
  return { outcomes, messages, struck, ms: Date.now() - t0 };
}

describe("convergence: faults mid-job end with the same per-host outcomes as no fault", () => {
  let baseline: Run | undefined;

  it("the CI seeds strike with every kind of fault", () => {
    const kinds = new Set(CI_SEEDS.flatMap((s) => scheduleOf(s).faults.map((f) => f.kind)));
    expect([...kinds].sort()).toEqual([...KINDS].sort());
  });

  it("baseline: every host ends as its job says, without faults", async () => {
    const run = await runJobs("baseline");
    const o = run.outcomes;
    for (const host of ALL) {
      const s = o.get(`shell/${host}`)!;
      if (host === OFFLINE) {
        expect(s, OFFLINE).toMatchObject({ state: "EXPIRED", spawns: 0 });
        continue;
      }
      const want = expectedShell(host);
      expect(s, `shell/${host}`).toMatchObject({ state: want.code === 0 ? "SUCCEEDED" : "FAILED", exitCode: want.code, resultCheck: "VERIFIED", outputComplete: true, spawns: 1 });
      expect(o.get(`timeout/${host}`), `timeout/${host}`).toMatchObject({ state: idx(host) % 2 === 0 ? "TIMED_OUT" : "SUCCEEDED", resultCheck: "VERIFIED", spawns: 1 });
      expect(o.get(`cancel/${host}`), `cancel/${host}`).toMatchObject(
        CANCELLED.includes(host) ? { state: "CANCELLED", late: expect.stringMatching(/^CANCELLED\//), spawns: 1 } : { state: "SUCCEEDED", resultCheck: "VERIFIED", late: "", spawns: 1 },
      );
      expect(o.get(`ping/${host}`), `ping/${host}`).toMatchObject({ state: "SUCCEEDED", spawns: 0 });
      expect(o.get(`late/${host}`), `late/${host}`).toMatchObject({ state: idx(host) % 2 === 0 ? "SUCCEEDED" : "FAILED", exitCode: idx(host) % 2, resultCheck: "VERIFIED", spawns: 1 });
    }
    baseline = run;
    console.log(`convergence baseline: ${o.size} tasks in ${run.ms} ms`);
  }, 90_000);

  for (const seed of SEEDS) {
    const schedule = scheduleOf(seed);
    it(`${describeSchedule(schedule)} (replay: REXMESH_FAULT_SEED=${seed})`, async () => {
      if (!baseline) throw new Error("no baseline (its test failed)");
      const run = await runJobs(`seed-${seed}`, schedule);
      const context = `${describeSchedule(schedule)}; struck ${JSON.stringify(run.struck)}`;
      // Not vacuous: every fault struck while every online shell task was still running, with output already flowing.
      expect(run.struck.length, context).toBe(schedule.faults.length);
      for (const s of run.struck) expect(s.openShellTasks, context).toBe(ONLINE.length);
      expect(run.struck[0]!.chunksStored, context).toBeGreaterThan(0);
      const diffs: string[] = [];
      for (const key of new Set([...baseline.outcomes.keys(), ...run.outcomes.keys()])) {
        const want = JSON.stringify(baseline.outcomes.get(key));
        const got = JSON.stringify(run.outcomes.get(key));
        if (want !== got) diffs.push(`${key}: baseline ${want} but ${got} (task ${run.messages.get(key)}; baseline's ${baseline.messages.get(key)})`);
      }
      // The assertion's message may be cut short in a CI log: every difference is printed whole.
      if (diffs.length > 0) console.error(`convergence ${describeSchedule(schedule)}: ${diffs.length} tasks differ from the baseline:\n${diffs.join("\n")}`);
      expect(diffs, context).toEqual([]);
      console.log(`convergence ${describeSchedule(schedule)}: ${run.outcomes.size} tasks converged in ${run.ms} ms`);
    }, 90_000);
  }
});
