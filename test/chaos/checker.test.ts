import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { check, DEFAULT_BOUNDS, firstDifference, type CheckInput } from "../../chaos/checker.js";
import type { FinalRead, JobObs, StateSeen, TaskObs } from "../../chaos/observer.js";
import { FAULT_KINDS, makePlan, type JobPlan } from "../../chaos/plan.js";
import { expectedOutput, taskEnv, taskScript, type TaskParams } from "../../chaos/workload.js";
import { TaskSchema } from "../../gen/rexmesh/v1/controller_pb.js";
import { OutputStream, TaskState } from "../../gen/rexmesh/v1/task_pb.js";

const params: TaskParams = { lines: 5, sleepMs: 10, errEvery: 2, pad: 7, burst: 3, exitCode: 0 };
const L = DEFAULT_BOUNDS.lostAfterMs;
const SLACK = DEFAULT_BOUNDS.slackMs;

function seen(at: number, state: TaskState, since = at): StateSeen {
  return { since, at, state, proxy: "p", message: "", chunks: 0, via: "watch" };
}

/**
 * One job on one host, its task SUCCEEDED at +10 s with exactly the expected
 * output, spawned once, the mesh healed at +5 s: a run with nothing wrong.
 * Each test breaks one thing.
 */
function fixture(over: { plan?: Partial<JobPlan>; history?: StateSeen[]; stdout?: Buffer; spawns?: number[]; final?: { outputTruncated?: boolean } } = {}) {
  const plan: JobPlan = { index: 1, at: 0, purpose: "steady", hosts: ["a1"], params, ...over.plan };
  const job: JobObs = { plan, jobId: "j1", acceptedAt: 100, attempts: 1, taskIds: new Map([["a1", "t1"]]) };
  const history = over.history ?? [seen(1000, TaskState.RUNNING), seen(10_000, TaskState.SUCCEEDED)];
  const task: TaskObs = { taskId: "t1", jobId: "j1", hostId: "a1", history, terminal: history.find((h) => h.state >= TaskState.SUCCEEDED), chunks: new Map() };
  const expected = expectedOutput("t1", plan.params);
  const lastState = history[history.length - 1]!.state;
  const final: FinalRead = {
    jobId: "j1",
    complete: true,
    tasks: new Map([["t1", create(TaskSchema, { id: "t1", jobId: "j1", hostId: "a1", state: lastState, outputComplete: true, ...over.final })]]),
    stdout: new Map([["t1", over.stdout ?? expected.stdout]]),
    stderr: new Map([["t1", expected.stderr]]),
    seqs: new Map([["t1", [1, 2]]]),
  };
  const input: CheckInput = {
    jobs: [job],
    tasks: new Map([["t1", task]]),
    finals: new Map([["j1", final]]),
    audits: [{ at: 20_000, reason: "final", jobId: "j1", found: true, tasks: [{ id: "t1", hostId: "a1" }] }],
    spawns: new Map([["t1", over.spawns ?? [4242]]]),
    lastHealAt: 5000,
    controllerDown: [],
    bounds: DEFAULT_BOUNDS,
  };
  return { input, job, task, final };
}

const invariants = (input: CheckInput, now = 60_000) => check(input, now).map((v) => `${v.invariant} ${v.kind}`);

describe("chaos checker", () => {
  it("finds nothing wrong in a clean run", () => {
    expect(check(fixture().input, 60_000)).toEqual([]);
  });

  it("I1: a task not terminal by its bound, and one that ended after it", () => {
    const open = fixture({ history: [seen(1000, TaskState.RUNNING)] });
    const bound = 5000 + Math.max(params.lines * params.sleepMs, L) + SLACK;
    expect(invariants(open.input, bound - 1)).toEqual(["I1 left RUNNING"]);
    const late = fixture({ history: [seen(1000, TaskState.RUNNING), seen(bound + 1, TaskState.LOST)] });
    expect(invariants(late.input, bound + 2)).toEqual(["I1 late LOST"]);
    const inTime = fixture({ history: [seen(1000, TaskState.RUNNING), seen(bound, TaskState.LOST)] });
    expect(invariants(inTime.input, bound + 2)).toEqual([]);
  });

  it("I1: a cancelled job's tasks end within the cancel bound, stretched by controller downtime", () => {
    const f = fixture({ history: [seen(1000, TaskState.RUNNING), seen(20_000, TaskState.CANCELLED)] });
    f.job.cancelledAt = 2000;
    expect(invariants(f.input)).toEqual(["I1 late CANCELLED"]);
    f.input.controllerDown = [{ from: 3000, to: 6000 }];
    expect(invariants(f.input)).toEqual([]);
  });

  it("I1: a task never delivered ends by submit + deadline + lost_after + slack", () => {
    const at = 100 + 2000 + L + SLACK;
    const f = fixture({ plan: { deliveryDeadlineMs: 2000 }, history: [seen(1000, TaskState.QUEUED), seen(at + 500, TaskState.EXPIRED)], spawns: [] });
    f.input.lastHealAt = 30_000;
    expect(invariants(f.input, 90_000)).toEqual(["I1 late EXPIRED"]);
  });

  it("I2: two spawns of one task, and a spawn of a task that says it never started", () => {
    expect(invariants(fixture({ spawns: [1, 2] }).input)).toEqual(["I2 spawned twice"]);
    expect(invariants(fixture({ history: [seen(1000, TaskState.EXPIRED)] }).input)).toEqual(["I2 spawned yet EXPIRED"]);
  });

  it("I3: a SUCCEEDED task whose output lost a line, unless marked truncated; any task's output must be a prefix", () => {
    const full = expectedOutput("t1", params).stdout;
    const lastLine = full.lastIndexOf(10, full.length - 2) + 1;
    const short = full.subarray(0, lastLine);
    expect(invariants(fixture({ stdout: short }).input)).toEqual(["I3 SUCCEEDED, stdout differs"]);
    expect(invariants(fixture({ stdout: short, final: { outputTruncated: true } }).input)).toEqual([]);
    const cancelled = [seen(1000, TaskState.RUNNING), seen(3000, TaskState.CANCELLED)];
    expect(invariants(fixture({ history: cancelled, stdout: short }).input)).toEqual([]);
    expect(invariants(fixture({ history: cancelled, stdout: Buffer.concat([short, short]) }).input)).toEqual(["I3 CANCELLED, stdout not a prefix"]);
    expect(invariants(fixture({ plan: { params: { ...params, exitCode: 3 } } }).input)).toEqual(["I3 SUCCEEDED with exit 3"]);
  });

  it("I4: a terminal state that changes, seen by a look taken after it", () => {
    const stale = fixture({ history: [seen(1000, TaskState.RUNNING), seen(10_000, TaskState.SUCCEEDED), seen(10_050, TaskState.RUNNING, 9_990), seen(10_060, TaskState.SUCCEEDED)] });
    expect(invariants(stale.input)).toEqual([]);
    const changed = fixture({ history: [seen(1000, TaskState.RUNNING), seen(10_000, TaskState.INTERRUPTED), seen(12_000, TaskState.SUCCEEDED, 11_000)] });
    expect(invariants(changed.input)).toContain("I4 terminal state changed");
  });

  it("I4: a chunk read twice with different bytes, a chunk gone, a job gone or with other tasks", () => {
    const f = fixture();
    f.task.chunks.set(1, [{ stream: OutputStream.STDOUT, sha: "aa", bytes: 3, at: 1 }, { stream: OutputStream.STDOUT, sha: "bb", bytes: 3, at: 2 }]);
    f.task.chunks.set(7, [{ stream: OutputStream.STDOUT, sha: "cc", bytes: 3, at: 1 }]);
    expect(invariants(f.input)).toEqual(["I4 chunk changed", "I4 chunks gone"]);
    const gone = fixture();
    gone.input.audits = [{ at: 9000, reason: "after the controller restart of fault 2", jobId: "j1", found: false, tasks: [] }];
    expect(invariants(gone.input)).toEqual(["I4 job gone"]);
    const other = fixture();
    other.input.audits = [{ at: 9000, reason: "final", jobId: "j1", found: true, tasks: [{ id: "t9", hostId: "a1" }] }];
    expect(invariants(other.input)).toEqual(["I4 tasks changed"]);
  });

  it("says where output first differs", () => {
    expect(firstDifference(Buffer.from("a\nb\nc\n"), Buffer.from("a\nb\n"))).toMatch(/got 4 of 6 bytes/);
    expect(firstDifference(Buffer.from("a\nb\n"), Buffer.from("a\nX\n"))).toMatch(/\(line 2\): expected "b", got "X"/);
  });
});

describe("chaos workload", () => {
  it("the task script writes exactly the expected bytes and one spawn marker", async () => {
    const marks = mkdtempSync(join(tmpdir(), "rexmesh-chaos-marks-"));
    try {
      const p = { ...params, exitCode: 3 };
      const run = promisify(execFile)("/bin/sh", ["-c", taskScript("unit")], { env: { ...process.env, ...taskEnv(p, marks), REXMESH_TASK_ID: "t01abc" } });
      const err = await run.then(() => undefined, (e: { code: number; stdout: string; stderr: string }) => e);
      expect(err?.code).toBe(3);
      const expected = expectedOutput("t01abc", p);
      expect(err?.stdout).toBe(expected.stdout.toString());
      expect(err?.stderr).toBe(expected.stderr.toString());
      expect(readFileSync(join(marks, "t01abc"), "utf8")).toMatch(/^t01abc \d+\n$/);
    } finally {
      rmSync(marks, { recursive: true, force: true });
    }
  });
});

describe("chaos plan", () => {
  it("is a pure function of the seed", () => {
    expect(makePlan({ seed: 7, minutes: 1 })).toEqual(makePlan({ seed: 7, minutes: 1 }));
    expect(makePlan({ seed: 7, minutes: 1 }).faults).not.toEqual(makePlan({ seed: 8, minutes: 1 }).faults);
  });

  it("keeps faults inside the phase, never two on one role or link at once, at most two at once, each with a victim job printing through it", () => {
    for (let seed = 1; seed <= 40; seed++) {
      const plan = makePlan({ seed, minutes: 1 });
      expect(plan.faults.length, `seed ${seed}`).toBeGreaterThanOrEqual(5);
      for (const f of plan.faults) {
        expect(f.at + f.downMs).toBeLessThanOrEqual(plan.faultPhaseMs);
        const victim = plan.jobs.find((j) => j.purpose === "victim" && j.fault === f.id)!;
        expect(victim.at).toBeLessThan(f.at);
        expect(victim.at + victim.params.lines * victim.params.sleepMs).toBeGreaterThan(f.at + f.downMs);
        const activeAtStart = plan.faults.filter((g) => g !== f && g.at <= f.at && f.at < g.at + g.downMs + 1000);
        expect(activeAtStart.length, `seed ${seed} fault ${f.id}`).toBeLessThanOrEqual(1);
        const overlapping = plan.faults.filter((g) => g !== f && g.at < f.at + f.downMs + 1000 && f.at < g.at + g.downMs + 1000);
        for (const g of overlapping) {
          const uses = (x: typeof f) => [x.target, ...(x.links ?? [])];
          expect(uses(f).filter((u) => uses(g).includes(u)), `seed ${seed}: faults ${f.id} and ${g.id}`).toEqual([]);
        }
      }
      for (const j of plan.jobs.filter((x) => x.cancelAt !== undefined)) {
        const f = plan.faults.find((x) => x.id === j.fault)!;
        expect(j.cancelAt).toBeGreaterThanOrEqual(f.at);
        expect(j.cancelAt).toBeLessThanOrEqual(f.at + f.downMs + 100);
      }
    }
    const kinds = new Set(Array.from({ length: 10 }, (_, i) => makePlan({ seed: i + 1, minutes: 1 }).faults.map((f) => f.kind)).flat());
    expect([...kinds].sort()).toEqual([...FAULT_KINDS].sort());
  });
});
