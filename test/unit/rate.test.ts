import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { InvalidArgumentError } from "../../common/errors.js";
import { silentLogger } from "../../common/logger.js";
import { Inventory } from "../../controller/inventory.js";
import { MemoryJobStore } from "../../controller/job-store.js";
import { JobManager, resolveRate, type ProxyPort, type RateRequest } from "../../controller/jobs.js";
import { TaskState, type TaskSpec } from "../../gen/rexmesh/v1/task_pb.js";
import { counterIds, execStep, flush, operator, status } from "./support.js";

class Port implements ProxyPort {
  readonly sent: TaskSpec[] = [];
  constructor(readonly name: string, readonly region: string, private readonly log: string[] = []) {}
  sendTask(spec: TaskSpec): void {
    this.sent.push(spec);
    this.log.push(spec.taskId);
  }
  sendCancel(): void {}
}

/** Ten hosts: e1..e5 behind proxy "pe" in region eu, u1..u5 behind "pu" in region us. */
function setup() {
  const clock = new ManualClock();
  const store = new MemoryJobStore();
  const inventory = new Inventory();
  const jobs = new JobManager({ store, inventory, clock, ids: counterIds(), log: silentLogger });
  jobs.start();
  const log: string[] = [];
  const ports = { eu: new Port("pe", "eu", log), us: new Port("pu", "us", log) };
  jobs.proxyConnected(ports.eu);
  jobs.proxyConnected(ports.us);
  for (const r of ["eu", "us"] as const) {
    for (let i = 1; i <= 5; i++) jobs.hostConnected(inventory.connected({ id: `${r[0]}${i}`, tenant: "acme" }, r, ports[r].name, clock.now()));
  }
  const submit = (rate: RateRequest) =>
    jobs.submit(operator("acme"), { hostIds: [], allHosts: true, steps: [execStep("true")], env: {}, workingDir: "", stdin: new Uint8Array(), timeoutMs: 0, deliveryDeadlineMs: 0, idempotencyKey: "", idempotent: false, rate });
  /** Every task sent, in the order it was sent. */
  const sentIds = () => [...log];
  const portOf = (taskId: string) => (ports.eu.sent.some((s) => s.taskId === taskId) ? ports.eu : ports.us);
  /** Ends a task at its proxy: the status path a real proxy takes. */
  const end = async (taskId: string, state: TaskState) => {
    await jobs.applyStatus(portOf(taskId), status(taskId, state));
    await flush();
  };
  const states = (jobId: string) => jobs.tasksOf(jobs.getJobRecord(jobId)!).map((t) => t.state);
  return { jobs, ports, submit, sentIds, end, states, store };
}

describe("rate control", () => {
  it("keeps at most N tasks in flight and releases one as each ends", async () => {
    const t = setup();
    const job = await t.submit({ concurrency: 3 });
    expect(t.sentIds()).toHaveLength(3);
    await t.end(t.sentIds()[0]!, TaskState.SUCCEEDED);
    expect(t.sentIds()).toHaveLength(4);
    // Statuses short of terminal do not free a slot.
    await t.jobs.applyStatus(t.ports.eu, status(t.sentIds()[1]!, TaskState.RUNNING));
    expect(t.sentIds()).toHaveLength(4);
    for (let i = 1; i < 10; i++) {
      const sent = t.sentIds();
      if (i < sent.length) await t.end(sent[i]!, TaskState.SUCCEEDED);
      expect(t.sentIds().length - (i + 1)).toBeLessThanOrEqual(3);
    }
    expect(t.states(job.id).every((s) => s === TaskState.SUCCEEDED)).toBe(true);
    expect(t.store.getJob(job.id)!.finishedAt).toBeDefined();
  });

  it("reads a percentage of the job's hosts (10 hosts at 20% → 2 at once)", async () => {
    const t = setup();
    await t.submit({ concurrencyPercent: 20 });
    expect(t.sentIds()).toHaveLength(2);
  });

  it("limits each region separately and takes regions in turn", async () => {
    const t = setup();
    await t.submit({ concurrencyPerRegion: 2 });
    expect(t.ports.eu.sent).toHaveLength(2);
    expect(t.ports.us.sent).toHaveLength(2);
    await t.end(t.ports.us.sent[0]!.taskId, TaskState.SUCCEEDED);
    expect(t.ports.us.sent).toHaveLength(3);
    expect(t.ports.eu.sent).toHaveLength(2);
  });

  it("skips the tasks not yet started once the error budget is spent", async () => {
    const t = setup();
    const job = await t.submit({ concurrency: 2, maxErrors: 1 });
    const [a, b] = t.sentIds();
    await t.end(a!, TaskState.FAILED);
    expect(t.sentIds()).toHaveLength(3); // one failure is within the budget
    await t.end(b!, TaskState.TIMED_OUT);
    const c = t.sentIds()[2]!;
    expect(t.sentIds()).toHaveLength(3); // budget spent: nothing more starts
    const states = t.states(job.id);
    expect(states.filter((s) => s === TaskState.SKIPPED)).toHaveLength(7);
    const skipped = t.jobs.tasksOf(t.jobs.getJobRecord(job.id)!).find((x) => x.state === TaskState.SKIPPED)!;
    expect(skipped.message).toMatch(/error budget \(1\) was spent/);
    // The task already running finishes normally, and the job with it.
    await t.end(c, TaskState.SUCCEEDED);
    expect(t.store.getJob(job.id)!.finishedAt).toBeDefined();
  });

  it("runs the canary batch first and the rest only if all of it succeeds", async () => {
    const t = setup();
    await t.submit({ batch: 2, concurrency: 4 });
    const canary = t.sentIds();
    expect(canary).toHaveLength(2);
    await t.end(canary[0]!, TaskState.SUCCEEDED);
    expect(t.sentIds()).toHaveLength(2); // still waiting for the second canary
    await t.end(canary[1]!, TaskState.SUCCEEDED);
    expect(t.sentIds()).toHaveLength(2 + 4);
  });

  it("skips everything else when a canary fails", async () => {
    const t = setup();
    const job = await t.submit({ batch: 2 });
    const [a, b] = t.sentIds();
    await t.end(a!, TaskState.SUCCEEDED);
    await t.end(b!, TaskState.FAILED);
    expect(t.sentIds()).toHaveLength(2);
    const states = t.states(job.id);
    expect(states.filter((s) => s === TaskState.SKIPPED)).toHaveLength(8);
    expect(t.store.getJob(job.id)!.finishedAt).toBeDefined();
  });

  it("refuses contradictory or out-of-range limits", () => {
    expect(() => resolveRate({ concurrency: 2, concurrencyPercent: 10 }, ["a"])).toThrow(InvalidArgumentError);
    expect(() => resolveRate({ maxErrorsPercent: 150 }, ["a"])).toThrow(/above 100/);
    expect(resolveRate({ maxErrorsPercent: 10 }, Array.from({ length: 50 }, (_, i) => `t${i}`)).maxErrors).toBe(5);
  });

  it("a restarted controller keeps the limits: released tasks still count, waiting ones still wait", async () => {
    const t = setup();
    const job = await t.submit({ concurrency: 2 });
    const restarted = new JobManager({ store: t.store, inventory: new Inventory(), clock: new ManualClock(), ids: counterIds(), log: silentLogger });
    restarted.start();
    const port = new Port("pe", "eu");
    restarted.proxyConnected(port);
    const inv = (restarted as unknown as { inventory: Inventory }).inventory;
    for (const id of ["e1", "e2", "e3", "e4", "e5", "u1", "u2", "u3", "u4", "u5"]) restarted.hostConnected(inv.connected({ id, tenant: "acme" }, "eu", "pe", 0));
    // The two released before the restart may go again; nothing beyond the limit does.
    expect(port.sent.length).toBeLessThanOrEqual(2);
    const released = t.jobs.tasksOf(t.jobs.getJobRecord(job.id)!).filter((x) => x.released);
    expect(released).toHaveLength(2);
  });
});
