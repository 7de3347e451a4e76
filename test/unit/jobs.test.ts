import { durationMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError, PermissionDeniedError, UnavailableError } from "../../common/errors.js";
import { silentLogger } from "../../common/logger.js";
import { Inventory } from "../../controller/inventory.js";
import { MemoryJobStore } from "../../controller/job-store.js";
import { JobManager, type ProxyPort, type SubmitRequest } from "../../controller/jobs.js";
import { TaskState, type TaskSpec } from "../../gen/rexmesh/v1/task_pb.js";
import { chunk, counterIds, execStep, expectResolvesAfter, flush, operator, status, submitRequest, text } from "./support.js";

class FakePort implements ProxyPort {
  readonly tasks: TaskSpec[] = [];
  readonly cancels: { taskId: string; hostId: string }[] = [];
  constructor(
    readonly name: string,
    readonly region = "eu",
  ) {}
  sendTask(spec: TaskSpec): void {
    this.tasks.push(spec);
  }
  sendCancel(taskId: string, hostId: string): void {
    this.cancels.push({ taskId, hostId });
  }
  get taskIds(): string[] {
    return this.tasks.map((t) => t.taskId);
  }
}

const request = (more: Partial<SubmitRequest> = {}): SubmitRequest => submitRequest({ hostIds: [], steps: [execStep("echo", "hi")], ...more });

/**
 * A controller with hosts h1, h2 (acme, connected via px1), h3 (acme, known
 * but offline) and x1 (tenant "other", connected via px1).
 */
function setup(opts: { defaultDeliveryDeadlineMs?: number; store?: MemoryJobStore } = {}) {
  const clock = new ManualClock();
  const store = opts.store ?? new MemoryJobStore();
  const inventory = new Inventory();
  const jobs = new JobManager({ store, inventory, clock, ids: counterIds(), log: silentLogger, ...opts });
  jobs.start();
  const px1 = new FakePort("px1");
  jobs.proxyConnected(px1);
  const connect = (id: string, tenant = "acme", port: FakePort = px1) => {
    const rec = inventory.connected({ id, tenant }, port.region, port.name, clock.now());
    jobs.hostConnected(rec);
    return rec;
  };
  connect("h1");
  connect("h2");
  inventory.connected({ id: "h3", tenant: "acme" }, "eu", "px1", clock.now());
  inventory.disconnected("h3", "px1", clock.now());
  connect("x1", "other");
  const task = (id: string) => store.getTask(id)!;
  const state = (id: string) => task(id).state;
  return { clock, store, inventory, jobs, px1, connect, task, state, acme: operator("acme"), other: operator("other") };
}

describe("JobManager.submit", () => {
  it("plans one task per named host and sends each to the proxy holding it", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h1", "h2"], env: { A: "1" }, timeoutMs: 5000, workingDir: "/tmp" }));
    expect(job.tenant).toBe("acme");
    expect(job.submittedBy).toBe("alice");
    expect(job.taskIds).toHaveLength(2);
    const tasks = t.jobs.tasksOf(job);
    expect(tasks.map((x) => x.hostId)).toEqual(["h1", "h2"]);
    expect(tasks.every((x) => x.state === TaskState.PENDING)).toBe(true);
    expect(t.px1.tasks.map((s) => s.hostId)).toEqual(["h1", "h2"]);
    const spec = t.px1.tasks[0]!;
    expect(spec.taskId).toBe(job.taskIds[0]);
    expect(spec.jobId).toBe(job.id);
    expect(spec.tenant).toBe("acme");
    expect(spec.env).toEqual({ A: "1" });
    expect(spec.workingDir).toBe("/tmp");
    expect(durationMs(spec.timeout!)).toBe(5000);
    expect(timestampMs(spec.deliverBy!)).toBe(t.clock.now() + 3_600_000);
    expect(spec.steps[0]?.tool.case).toBe("exec");
  });

  it("targets every host of the caller's tenant (and only those) with allHosts", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ allHosts: true }));
    expect(t.jobs.tasksOf(job).map((x) => x.hostId)).toEqual(["h1", "h2", "h3"]);
    // h3 is offline: nothing is sent for it yet.
    expect(t.px1.tasks.map((s) => s.hostId)).toEqual(["h1", "h2"]);
  });

  it("deduplicates repeated host ids", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h1", "h1"] }));
    expect(job.taskIds).toHaveLength(1);
  });

  it("refuses an unknown host, naming it, and stores nothing", async () => {
    const t = setup();
    await expect(t.jobs.submit(t.acme, request({ hostIds: ["h1", "nope"] }))).rejects.toThrow(NotFoundError);
    await expect(t.jobs.submit(t.acme, request({ hostIds: ["h1", "nope"] }))).rejects.toThrow(/nope/);
    expect(t.px1.tasks).toHaveLength(0);
    expect(t.store.unfinishedJobs()).toHaveLength(0);
  });

  it("reports a host of another tenant exactly like an unknown one", async () => {
    const t = setup();
    const err = await t.jobs.submit(t.acme, request({ hostIds: ["x1"] })).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NotFoundError);
    expect((err as Error).message).toBe("unknown host: x1");
    const err2 = await t.jobs.submit(t.acme, request({ hostIds: ["zz"] })).catch((e: unknown) => e);
    expect((err2 as Error).message).toBe("unknown host: zz");
  });

  it("needs exactly one of hostIds and allHosts", async () => {
    const t = setup();
    await expect(t.jobs.submit(t.acme, request({ hostIds: ["h1"], allHosts: true }))).rejects.toThrow(InvalidArgumentError);
    await expect(t.jobs.submit(t.acme, request({}))).rejects.toThrow(InvalidArgumentError);
  });

  it("refuses allHosts in a tenant with no hosts", async () => {
    const t = setup();
    await expect(t.jobs.submit(operator("empty"), request({ allHosts: true }))).rejects.toThrow(FailedPreconditionError);
  });

  it("refuses empty steps, an empty argv, a step without tool, bad env names, a NUL in an env value, negative timeouts, big stdin", async () => {
    const t = setup();
    const bad: Partial<SubmitRequest>[] = [
      { steps: [] },
      { steps: [execStep()] },
      { steps: [execStep("")] },
      { steps: [{ ...execStep("x"), tool: { case: undefined } }] },
      { env: { "1BAD": "x" } },
      { env: { "A=B": "x" } },
      { env: { A: "a\0b" } },
      { timeoutMs: -1 },
      { deliveryDeadlineMs: -1 },
      { stdin: new Uint8Array((1 << 20) + 1) },
    ];
    for (const more of bad) {
      await expect(t.jobs.submit(t.acme, request({ hostIds: ["h1"], ...more })), JSON.stringify(Object.keys(more))).rejects.toThrow(InvalidArgumentError);
    }
    expect(t.px1.tasks).toHaveLength(0);
  });

  it("refuses more hosts than maxHostsPerJob", async () => {
    const clock = new ManualClock();
    const inventory = new Inventory();
    const jobs = new JobManager({ store: new MemoryJobStore(), inventory, clock, ids: counterIds(), log: silentLogger, maxHostsPerJob: 1 });
    jobs.start();
    inventory.connected({ id: "a", tenant: "acme" }, "eu", "px1", 0);
    inventory.connected({ id: "b", tenant: "acme" }, "eu", "px1", 0);
    await expect(jobs.submit(operator(), request({ allHosts: true }))).rejects.toThrow(/limit is 1/);
  });

  it("returns the same job for the same request under the same idempotency key in the same tenant, and sends nothing again", async () => {
    const t = setup();
    const a = await t.jobs.submit(t.acme, request({ hostIds: ["h1"], idempotencyKey: "k1" }));
    const b = await t.jobs.submit(t.acme, request({ hostIds: ["h1"], idempotencyKey: "k1" }));
    expect(b.id).toBe(a.id);
    expect(b.taskIds).toEqual(a.taskIds);
    expect(t.px1.tasks).toHaveLength(1);
    const c = await t.jobs.submit(t.other, request({ hostIds: ["x1"], idempotencyKey: "k1" }));
    expect(c.id).not.toBe(a.id);
  });

  it("refuses an idempotency key reused with a different request, naming the job it belongs to (ALREADY_EXISTS)", async () => {
    const t = setup();
    const a = await t.jobs.submit(t.acme, request({ hostIds: ["h1"], idempotencyKey: "k1" }));
    for (const other of [request({ hostIds: ["h1", "h2"], idempotencyKey: "k1" }), request({ hostIds: ["h1"], idempotencyKey: "k1", env: { A: "1" } }), request({ hostIds: ["h1"], idempotencyKey: "k1", steps: [execStep("echo", "bye")] })]) {
      const err = await t.jobs.submit(t.acme, other).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(AlreadyExistsError);
      expect((err as Error).message).toContain(a.id);
    }
    expect(t.store.listJobs("acme", 10)).toHaveLength(1);
  });

  it("authorizes a replay of an idempotent submit again: a caller who may not run it now gets no job", async () => {
    const t = setup();
    await t.jobs.submit(t.acme, request({ hostIds: ["h1"], idempotencyKey: "k1" }));
    await expect(
      t.jobs.submit(t.acme, request({ hostIds: ["h1"], idempotencyKey: "k1" }), () => {
        throw new PermissionDeniedError("no");
      }),
    ).rejects.toThrow(PermissionDeniedError);
  });
});

describe("JobManager dispatch", () => {
  it("sends a big job's tasks a slice per turn of the event loop, all of them in the end, and skips one cancelled meanwhile", async () => {
    const t = setup();
    const ids = Array.from({ length: 2500 }, (_, i) => `b${i}`);
    for (const id of ids) t.connect(id);
    const job = await t.jobs.submit(t.acme, request({ hostIds: ids }));
    expect(t.px1.tasks.length).toBe(1000); // the first slice at once
    await t.jobs.cancel(t.acme, job.id); // the rest is not sent: cancelled before it left
    await new Promise((r) => setImmediate(r));
    await new Promise((r) => setImmediate(r));
    expect(t.px1.tasks.length).toBe(1000);
    const job2 = await t.jobs.submit(t.acme, request({ hostIds: ids }));
    for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
    expect(t.px1.tasks.filter((x) => x.jobId === job2.id).map((x) => x.hostId)).toEqual(ids);
  });

  it("sends a task for an offline host only when the host connects", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h3"] }));
    expect(t.px1.tasks).toHaveLength(0);
    t.connect("h3");
    // The proxy is stored as the task's holder first, then the task goes.
    expect(t.px1.tasks).toHaveLength(0);
    await flush();
    expect(t.task(job.taskIds[0]!).proxies).toEqual(["px1"]);
    expect(t.px1.taskIds).toEqual(job.taskIds);
    // A second presence report of the same host does not send it twice.
    t.connect("h3");
    await flush();
    expect(t.px1.tasks).toHaveLength(1);
  });

  it("does not send once the proxy took the task (QUEUED)", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h1"] }));
    await t.jobs.applyStatus(t.px1, status(job.taskIds[0]!, TaskState.QUEUED));
    t.connect("h1");
    expect(t.px1.tasks).toHaveLength(1);
  });

  it("sends again after the proxy link was lost before it confirmed", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h1"] }));
    t.jobs.proxyDisconnected(t.px1);
    expect(t.inventory.get("h1")?.connected).toBe(false);
    const px1b = new FakePort("px1");
    t.jobs.proxyConnected(px1b);
    t.connect("h1", "acme", px1b);
    expect(px1b.taskIds).toEqual(job.taskIds);
  });

  // Regression guard (was a bug at controller/jobs.ts:107-118 with :238, now fixed): when a proxy's new stream arrives before its
  // old one is noticed dead (a proxy restart; the old stream is only dropped after three
  // heartbeats), proxyConnected() replaces the port but keeps `sentTo` entries naming the
  // proxy, and the old stream's proxyDisconnected() then returns early because the port was
  // replaced. dispatch() sees sentTo === port.name and never sends the task on the new
  // stream: a task lost in flight stays PENDING while its host is connected, until the
  // delivery deadline expires it.
  it("sends an unconfirmed task again on a proxy's replacement stream", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h1"] }));
    expect(t.px1.tasks).toHaveLength(1); // sent on the old stream, never confirmed
    const px1b = new FakePort("px1");
    t.jobs.proxyConnected(px1b); // the proxy came back before the old stream died
    t.inventory.proxyLost("px1", t.clock.now()); // as serveProxyLink does on connect
    t.connect("h1", "acme", px1b); // the new stream's hello lists h1
    t.jobs.proxyDisconnected(t.px1); // the old stream finally ends
    expect(px1b.taskIds).toEqual(job.taskIds);
  });
});

describe("JobManager statuses and output", () => {
  async function oneTask() {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h1"] }));
    return { ...t, job, id: job.taskIds[0]! };
  }

  it("moves a task forward and records where it went", async () => {
    const t = await oneTask();
    await t.jobs.applyStatus(t.px1, status(t.id, TaskState.QUEUED));
    expect(t.state(t.id)).toBe(TaskState.QUEUED);
    expect(t.task(t.id).proxy).toBe("px1");
    expect(t.task(t.id).region).toBe("eu");
    await t.jobs.applyStatus(t.px1, status(t.id, TaskState.RUNNING));
    expect(t.state(t.id)).toBe(TaskState.RUNNING);
  });

  it("ignores a late DELIVERED after RUNNING", async () => {
    const t = await oneTask();
    await t.jobs.applyStatus(t.px1, status(t.id, TaskState.RUNNING));
    t.clock.advance(10);
    const before = t.task(t.id);
    await t.jobs.applyStatus(t.px1, status(t.id, TaskState.DELIVERED, { message: "late" }));
    expect(t.task(t.id)).toEqual(before);
  });

  it("keeps the first terminal state", async () => {
    const t = await oneTask();
    await t.jobs.applyStatus(t.px1, status(t.id, TaskState.FAILED, { exitCode: 3, message: "exit code 3" }));
    await t.jobs.applyStatus(t.px1, status(t.id, TaskState.SUCCEEDED, { exitCode: 0 }));
    expect(t.state(t.id)).toBe(TaskState.FAILED);
    expect(t.task(t.id).exitCode).toBe(3);
    expect(t.task(t.id).message).toBe("exit code 3");
  });

  it("serializes concurrent updates of one task in arrival order", async () => {
    const t = await oneTask();
    await Promise.all([
      t.jobs.applyStatus(t.px1, status(t.id, TaskState.DELIVERED)),
      t.jobs.applyStatus(t.px1, status(t.id, TaskState.SUCCEEDED)),
      t.jobs.applyStatus(t.px1, status(t.id, TaskState.FAILED)),
    ]);
    expect(t.state(t.id)).toBe(TaskState.SUCCEEDED);
  });

  it("drops statuses for unknown tasks without failing", async () => {
    const t = await oneTask();
    await expect(t.jobs.applyStatus(t.px1, status("t-unknown", TaskState.RUNNING))).resolves.toBeUndefined();
  });

  it("stores each chunk once whatever the order, counting the contiguous prefix, and acknowledges each chunk's seq", async () => {
    const t = await oneTask();
    expect(await t.jobs.applyOutput(t.px1, chunk(t.id, 1, "a"))).toBe(1);
    expect(await t.jobs.applyOutput(t.px1, chunk(t.id, 1, "dup"))).toBe(1);
    // Above a gap (after a failover, newer chunks can come first): kept, not yet counted as contiguous.
    expect(await t.jobs.applyOutput(t.px1, chunk(t.id, 3, "c"))).toBe(3);
    expect(t.task(t.id).outputChunks).toBe(1);
    expect(t.task(t.id).outputBeyond).toEqual([[3, 3]]);
    expect(await t.jobs.applyOutput(t.px1, chunk(t.id, 2, "b"))).toBe(2);
    expect(t.task(t.id).outputChunks).toBe(3);
    expect(t.task(t.id).outputBeyond).toBeUndefined();
    expect(await t.jobs.applyOutput(t.px1, chunk(t.id, 3, "dup"))).toBe(3);
    const stored = t.jobs.readOutput(t.id, 1, 1 << 20);
    expect(stored.map((c) => text(c.data)).join("")).toBe("abc");
    expect(stored.map((c) => Number(c.seq))).toEqual([1, 2, 3]);
  });

  it("finishes the job once every task is terminal, and records the expected chunk count", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h1", "h2"] }));
    const [a, b] = job.taskIds as [string, string];
    t.clock.advance(1000);
    await t.jobs.applyStatus(t.px1, status(a, TaskState.SUCCEEDED, { outputChunks: 4n, outputTruncated: true }));
    expect(t.jobs.getJobRecord(job.id)?.finishedAt).toBeUndefined();
    expect(t.task(a).expectedChunks).toBe(4);
    expect(t.task(a).outputTruncated).toBe(true);
    t.clock.advance(1000);
    await t.jobs.applyStatus(t.px1, status(b, TaskState.FAILED));
    expect(t.jobs.getJobRecord(job.id)?.finishedAt).toBe(t.clock.now());
  });
});

describe("JobManager.cancel", () => {
  it("cancels tasks never sent at the controller and asks the proxy to cancel the others", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h1", "h2", "h3"] }));
    const [a, b, c] = job.taskIds as [string, string, string];
    await t.jobs.applyStatus(t.px1, status(b, TaskState.RUNNING));
    const after = await t.jobs.cancel(t.acme, job.id);
    expect(after.cancelRequested).toBe(true);
    expect(t.state(c)).toBe(TaskState.CANCELLED); // h3 offline: never sent
    expect(t.state(a)).toBe(TaskState.PENDING); // sent, not yet confirmed: the proxy decides
    expect(t.state(b)).toBe(TaskState.RUNNING);
    expect(t.px1.cancels).toEqual([
      { taskId: a, hostId: "h1" },
      { taskId: b, hostId: "h2" },
    ]);
    expect(after.finishedAt).toBeUndefined();
    // A cancelled job's tasks are not sent when their host shows up.
    t.connect("h3");
    expect(t.px1.taskIds).not.toContain(c);
  });

  it("finishes a job whose tasks were all cancelled locally", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h3"] }));
    const after = await t.jobs.cancel(t.acme, job.id);
    expect(t.state(job.taskIds[0]!)).toBe(TaskState.CANCELLED);
    expect(after.finishedAt).toBe(t.clock.now());
  });

  it("leaves a finished job as it is", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h1"] }));
    await t.jobs.applyStatus(t.px1, status(job.taskIds[0]!, TaskState.SUCCEEDED));
    const after = await t.jobs.cancel(t.acme, job.id);
    expect(after.cancelRequested).toBe(false);
    expect(t.px1.cancels).toEqual([]);
  });

  it("refuses another tenant's job as not found", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h1"] }));
    await expect(t.jobs.cancel(t.other, job.id)).rejects.toThrow(NotFoundError);
    expect(t.px1.cancels).toEqual([]);
  });

  it("resends cancels of unfinished cancelled jobs to a proxy that reconnects", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h1"] }));
    const id = job.taskIds[0]!;
    await t.jobs.applyStatus(t.px1, status(id, TaskState.QUEUED));
    await t.jobs.cancel(t.acme, job.id);
    const px1b = new FakePort("px1");
    t.jobs.proxyConnected(px1b);
    t.jobs.proxyReady(px1b);
    expect(px1b.cancels).toEqual([{ taskId: id, hostId: "h1" }]);
  });

  // Regression (found by this test): proxyDisconnected() forgot `sentTo` for the lost
  // proxy, so cancel() treats a task that was already sent (but whose QUEUED status had not
  // arrived yet) as never sent and marks it CANCELLED at the controller, finishing the job.
  // The proxy did store the task: when it reconnects it replays QUEUED, which is ignored
  // (CANCELLED is terminal), and resendCancels() skips the job (it is finished) and the task
  // (task.proxy is ""). No cancel ever reaches the proxy, so the command runs on the host
  // while the client was told CANCELLED.
  it("a task that may have reached a proxy is cancelled through that proxy, not only locally", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h1"] }));
    const id = job.taskIds[0]!;
    expect(t.px1.taskIds).toEqual([id]);
    t.jobs.proxyDisconnected(t.px1); // the stream drops before the proxy's QUEUED arrives
    await t.jobs.cancel(t.acme, job.id);
    const px1b = new FakePort("px1");
    t.jobs.proxyConnected(px1b);
    t.jobs.proxyReady(px1b);
    await t.jobs.applyStatus(px1b, status(id, TaskState.QUEUED)); // the proxy's backlog replay
    await flush();
    expect(px1b.cancels.map((c) => c.taskId)).toContain(id);
  });
});

describe("JobManager delivery deadline", () => {
  it("expires tasks still at the controller when the deadline passes and finishes the job", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h3"], deliveryDeadlineMs: 60_000 }));
    const id = job.taskIds[0]!;
    t.clock.advance(59_999);
    await flush();
    expect(t.state(id)).toBe(TaskState.PENDING);
    t.clock.advance(1);
    await flush();
    expect(t.state(id)).toBe(TaskState.EXPIRED);
    expect(t.task(id).message).toMatch(/deadline/);
    expect(t.jobs.getJobRecord(job.id)?.finishedAt).toBe(t.clock.now());
    // The host returning later gets nothing.
    t.connect("h3");
    expect(t.px1.tasks).toHaveLength(0);
  });

  it("does not send a task once its deadline is reached, even before the expiry has been stored", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h3"], deliveryDeadlineMs: 1000 }));
    t.clock.advance(1000);
    t.connect("h3"); // no await in between: the expiry is still on its way to the store
    expect(t.px1.tasks).toHaveLength(0);
    await flush();
    expect(t.state(job.taskIds[0]!)).toBe(TaskState.EXPIRED);
  });

  it("uses the controller default when the job gives no deadline", async () => {
    const t = setup({ defaultDeliveryDeadlineMs: 5000 });
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h3"] }));
    expect(job.deliverBy).toBe(t.clock.now() + 5000);
    t.clock.advance(5000);
    await flush();
    expect(t.state(job.taskIds[0]!)).toBe(TaskState.EXPIRED);
  });

  it("leaves tasks a proxy holds to the proxy and does not finish the job early", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h1", "h3"], deliveryDeadlineMs: 1000 }));
    const [a, c] = job.taskIds as [string, string];
    await t.jobs.applyStatus(t.px1, status(a, TaskState.QUEUED));
    t.clock.advance(1000);
    await flush();
    expect(t.state(a)).toBe(TaskState.QUEUED);
    expect(t.state(c)).toBe(TaskState.EXPIRED);
    expect(t.jobs.getJobRecord(job.id)?.finishedAt).toBeUndefined();
    await t.jobs.applyStatus(t.px1, status(a, TaskState.EXPIRED));
    expect(t.jobs.getJobRecord(job.id)?.finishedAt).toBeDefined();
  });

  it("a job that finished before its deadline is left alone by the timer", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h1"], deliveryDeadlineMs: 1000 }));
    await t.jobs.applyStatus(t.px1, status(job.taskIds[0]!, TaskState.SUCCEEDED));
    const finishedAt = t.jobs.getJobRecord(job.id)?.finishedAt;
    t.clock.advance(5000);
    await flush();
    expect(t.state(job.taskIds[0]!)).toBe(TaskState.SUCCEEDED);
    expect(t.jobs.getJobRecord(job.id)?.finishedAt).toBe(finishedAt);
  });

  it("recover() rebuilds pending tasks and deadlines from the store", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h3", "h1"], deliveryDeadlineMs: 10_000 }));
    const [c, a] = job.taskIds as [string, string];
    t.jobs.stop();
    const restarted = new JobManager({ store: t.store, inventory: t.inventory, clock: t.clock, ids: counterIds(), log: silentLogger });
    restarted.start();
    const px = new FakePort("px1");
    restarted.proxyConnected(px);
    restarted.hostConnected(t.inventory.connected({ id: "h3", tenant: "acme" }, "eu", "px1", t.clock.now()));
    await flush();
    // a was sent before the restart: the stored holder says px1 may have it, so it is not sent again on
    // this link unasked (the proxy's replay would confirm it) but it is not forgotten either.
    expect(px.taskIds).toEqual([c]);
    t.clock.advance(10_000);
    await flush();
    // Both were handed to px1: only the proxy knows whether it still has them; it enforces the same
    // deadline and says so. The controller does not expire them behind its back.
    expect(t.state(a)).toBe(TaskState.PENDING);
    expect(t.state(c)).toBe(TaskState.PENDING);
    await restarted.applyStatus(px, status(c, TaskState.EXPIRED, { atProxy: true }));
    await restarted.applyStatus(px, status(a, TaskState.EXPIRED, { atProxy: true }));
    expect(t.state(c)).toBe(TaskState.EXPIRED);
    expect(t.state(a)).toBe(TaskState.EXPIRED);
    restarted.stop();
  });

  it("recover() expires at the deadline a task that never left the controller", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h3"], deliveryDeadlineMs: 10_000 }));
    t.jobs.stop();
    const restarted = new JobManager({ store: t.store, inventory: t.inventory, clock: t.clock, ids: counterIds(), log: silentLogger });
    restarted.start();
    t.clock.advance(10_000);
    await flush();
    expect(t.state(job.taskIds[0]!)).toBe(TaskState.EXPIRED);
    restarted.stop();
  });
});

/** A job store whose job writes wait until the test lets them through. */
class GatedJobStore extends MemoryJobStore {
  private gates: (() => void)[] = [];
  override async putJob(...args: Parameters<MemoryJobStore["putJob"]>): Promise<void> {
    await new Promise<void>((resolve) => this.gates.push(resolve));
    return super.putJob(...args);
  }
  release(): void {
    for (const open of this.gates.splice(0)) open();
  }
}

describe("JobManager lifecycle", () => {
  it("refuses a new submit UNAVAILABLE once draining, and the drain waits for the submit being stored", async () => {
    const store = new GatedJobStore();
    const t = setup({ store });
    const first = t.jobs.submit(t.acme, request({ hostIds: ["h1"] }));
    await flush();
    let drained = false;
    const draining = t.jobs.drain(30_000).then(() => (drained = true));
    await expect(t.jobs.submit(t.acme, request({ hostIds: ["h2"] }))).rejects.toThrow(UnavailableError);
    await expect(t.jobs.submit(t.acme, request({ hostIds: ["h2"] }))).rejects.toThrow(/stopping and takes no new jobs/);
    await flush();
    expect(drained).toBe(false);
    store.release();
    const job = await first;
    await draining;
    expect(drained).toBe(true);
    expect(t.store.getJob(job.id)?.taskIds).toHaveLength(1);
    expect(t.px1.taskIds).toEqual(job.taskIds);
    t.jobs.stop();
  });

  it("answers the replay of a stored idempotent submit while draining, and refuses a new one", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h1"], idempotencyKey: "k1" }));
    await t.jobs.drain(1000);
    expect((await t.jobs.submit(t.acme, request({ hostIds: ["h1"], idempotencyKey: "k1" }))).id).toBe(job.id);
    await expect(t.jobs.submit(t.acme, request({ hostIds: ["h1"], idempotencyKey: "k2" }))).rejects.toThrow(UnavailableError);
    t.jobs.stop();
  });

  it("stops waiting for a submit that is not stored within the grace", async () => {
    const store = new GatedJobStore();
    const t = setup({ store });
    void t.jobs.submit(t.acme, request({ hostIds: ["h1"] })).catch(() => undefined);
    await flush();
    await expectResolvesAfter(t.clock, t.jobs.drain(5000), 5000);
    store.release();
    t.jobs.stop();
  });
});

describe("JobManager.hostTasks", () => {
  it("lists a host's unfinished tasks without reading those of its finished jobs (a finished column job's task costs a page's decoding)", async () => {
    const t = setup();
    const ended: string[] = [];
    for (let i = 0; i < 30; i++) {
      const job = await t.jobs.submit(t.acme, request({ hostIds: ["h1"] }));
      await t.jobs.applyStatus(t.px1, status(job.taskIds[0]!, TaskState.SUCCEEDED, { hostId: "h1" }));
      ended.push(job.taskIds[0]!);
    }
    await flush();
    const open = await t.jobs.submit(t.acme, request({ hostIds: ["h1"] }));
    expect(t.jobs.isFinished(open.id)).toBe(false);
    const reads: string[] = [];
    const getTask = t.store.getTask.bind(t.store);
    t.store.getTask = (id: string) => {
      reads.push(id);
      return getTask(id);
    };
    const unfinished = t.jobs.hostTasks(t.acme, "h1", 50, "", true);
    expect(unfinished.tasks.map((x) => x.task.id)).toEqual(open.taskIds);
    expect(reads.filter((id) => ended.includes(id))).toEqual([]);
    // Without the filter every task is read and listed, newest first.
    const all = t.jobs.hostTasks(t.acme, "h1", 50, "", false);
    expect(all.tasks.map((x) => x.task.id)).toEqual([...open.taskIds, ...ended.slice().reverse()]);
    expect(all.tasks.slice(1).every((x) => x.task.state === TaskState.SUCCEEDED)).toBe(true);
    t.jobs.stop();
  });
});

describe("JobManager.getJobFor", () => {
  it("returns the caller's job and hides other tenants' jobs and missing ones", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h1"] }));
    expect(t.jobs.getJobFor(t.acme, job.id).id).toBe(job.id);
    expect(() => t.jobs.getJobFor(t.other, job.id)).toThrow(NotFoundError);
    expect(() => t.jobs.getJobFor(t.acme, "j-missing")).toThrow(NotFoundError);
    expect(() => t.jobs.getJobFor(t.acme, "")).toThrow(NotFoundError);
  });
});

describe("Inventory", () => {
  it("lists a tenant's hosts sorted by id and keeps labels and facts across reconnects", () => {
    const inv = new Inventory();
    inv.connected({ id: "b", tenant: "t" }, "eu", "p1", 1);
    inv.connected({ id: "a", tenant: "t" }, "eu", "p1", 1);
    inv.connected({ id: "c", tenant: "u" }, "eu", "p1", 1);
    expect(inv.list("t").map((h) => h.id)).toEqual(["a", "b"]);
    inv.get("a")!.labels.env = "prod";
    inv.connected({ id: "a", tenant: "t" }, "us", "p2", 2);
    expect(inv.get("a")).toMatchObject({ region: "us", proxy: "p2", connected: true, since: 2, labels: { env: "prod" } });
  });

  it("ignores a disconnect from a proxy the host has already left", () => {
    const inv = new Inventory();
    inv.connected({ id: "a", tenant: "t" }, "eu", "p1", 1);
    inv.connected({ id: "a", tenant: "t" }, "eu", "p2", 2);
    expect(inv.disconnected("a", "p1", 3)).toBeUndefined();
    expect(inv.get("a")?.connected).toBe(true);
    expect(inv.disconnected("a", "p2", 4)?.connected).toBe(false);
    expect(inv.get("a")?.since).toBe(4);
  });

  it("marks every host of a lost proxy disconnected", () => {
    const inv = new Inventory();
    inv.connected({ id: "a", tenant: "t" }, "eu", "p1", 1);
    inv.connected({ id: "b", tenant: "t" }, "eu", "p2", 1);
    expect(inv.proxyLost("p1", 5).map((h) => h.id)).toEqual(["a"]);
    expect(inv.get("a")?.connected).toBe(false);
    expect(inv.get("b")?.connected).toBe(true);
  });
});

describe("MemoryJobStore", () => {
  it("reads output from a seq up to about maxBytes, always at least one chunk", async () => {
    const s = new MemoryJobStore();
    const task = { id: "t1" } as Parameters<MemoryJobStore["appendOutput"]>[0];
    for (let i = 1; i <= 4; i++) await s.appendOutput(task, chunk("t1", i, "x".repeat(10)));
    expect(s.readOutput("t1", 1, 25).map((c) => Number(c.seq))).toEqual([1, 2]);
    expect(s.readOutput("t1", 3, 1000).map((c) => Number(c.seq))).toEqual([3, 4]);
    expect(s.readOutput("t1", 2, 1).map((c) => Number(c.seq))).toEqual([2]);
    expect(s.readOutput("t1", 5, 1000)).toEqual([]);
  });

  it("hands out copies: changing a read record does not change the store", async () => {
    const s = new MemoryJobStore();
    const t = setup();
    const job = await t.jobs.submit(t.acme, request({ hostIds: ["h1"] }));
    const copy = t.store.getJob(job.id)!;
    copy.cancelRequested = true;
    expect(t.store.getJob(job.id)?.cancelRequested).toBe(false);
    expect(s.getJob(job.id)).toBeUndefined();
  });
});
