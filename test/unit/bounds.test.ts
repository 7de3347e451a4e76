import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { silentLogger } from "../../common/logger.js";
import { Inventory } from "../../controller/inventory.js";
import { MemoryJobStore } from "../../controller/job-store.js";
import { JobManager } from "../../controller/jobs.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { chunk, counterIds, flush, operator, RecordingPort, status, submitRequest } from "./support.js";


/** Host h1 of tenant acme behind px1 (region eu), a second proxy px2 of the same region, lost_after 60 s. */
function setup() {
  const clock = new ManualClock();
  const store = new MemoryJobStore();
  const inventory = new Inventory();
  const jobs = new JobManager({ store, inventory, clock, ids: counterIds(), log: silentLogger, defaultLostAfterMs: 60_000, cancelGraceMs: 10_000 });
  jobs.start();
  const px1 = new RecordingPort("px1");
  const px2 = new RecordingPort("px2");
  jobs.proxyConnected(px1);
  jobs.proxyConnected(px2);
  const at = (port: RecordingPort) => jobs.hostConnected(inventory.connected({ id: "h1", tenant: "acme" }, port.region, port.name, clock.now()));
  const away = (port: RecordingPort) => inventory.disconnected("h1", port.name, clock.now());
  at(px1);
  const state = (id: string) => store.getTask(id)!.state;
  /** Time passes in one-second steps (the bounds sweep runs every second). */
  const pass = async (ms: number) => {
    for (let left = ms; left > 0; left -= 1000) {
      clock.advance(Math.min(1000, left));
      await flush(2);
    }
  };
  return { clock, store, inventory, jobs, px1, px2, at, away, state, pass, acme: operator("acme") };
}

describe("task bounds: every task ends in bounded time", () => {
  it("a task whose host stays unreachable ends LOST after lost_after; its holder is owed a withdrawal; the host's later report is kept beside it", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, submitRequest());
    const id = job.taskIds[0]!;
    await t.jobs.applyStatus(t.px1, status(id, TaskState.RUNNING, { hostId: "h1" }));
    t.away(t.px1);
    await t.pass(59_000);
    expect(t.state(id)).toBe(TaskState.RUNNING);
    await t.pass(2000);
    expect(t.state(id)).toBe(TaskState.LOST);
    expect(t.store.getTask(id)!.message).toMatch(/h1 unreachable since .* \(lost after 1m\)/);
    expect(t.store.getJob(job.id)!.finishedAt).toBeDefined();
    expect(t.px1.cancels).toContain(`withdraw:${id}`);
    expect(t.store.recallsFor("px1").map((r) => [r.taskId, r.withdraw])).toEqual([[id, true]]);
    // The host comes back and reports the end: kept as late, the state stays LOST, the recall is settled.
    t.at(t.px1);
    await t.jobs.applyStatus(t.px1, status(id, TaskState.SUCCEEDED, { hostId: "h1", exitCode: 0, outputChunks: 1n }));
    await t.jobs.applyOutput(t.px1, chunk(id, 1, "late output"));
    const task = t.store.getTask(id)!;
    expect(task.state).toBe(TaskState.LOST);
    expect(task.late).toMatchObject({ state: TaskState.SUCCEEDED, exitCode: 0 });
    expect(task.outputChunks).toBe(1);
    expect(t.store.recallsFor("px1")).toEqual([]);
  });

  it("a reachable host's running task never ends LOST", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, submitRequest());
    await t.jobs.applyStatus(t.px1, status(job.taskIds[0]!, TaskState.RUNNING, { hostId: "h1" }));
    await t.pass(300_000);
    expect(t.state(job.taskIds[0]!)).toBe(TaskState.RUNNING);
  });

  it("a task not yet delivered waits for its delivery deadline (plus the proxies' grace) before it can be LOST", async () => {
    const t = setup();
    t.away(t.px1);
    const job = await t.jobs.submit(t.acme, submitRequest({ deliveryDeadlineMs: 300_000 }));
    const id = job.taskIds[0]!;
    // Never handed to a proxy: EXPIRED at the deadline by the controller itself.
    await t.pass(301_000);
    expect(t.state(id)).toBe(TaskState.EXPIRED);

    const t2 = setup();
    const job2 = await t2.jobs.submit(t2.acme, submitRequest({ deliveryDeadlineMs: 300_000 }));
    const id2 = job2.taskIds[0]!;
    await t2.jobs.applyStatus(t2.px1, status(id2, TaskState.QUEUED, { hostId: "h1", atProxy: true }));
    t2.away(t2.px1);
    // Held by px1 for a host that is away: lost_after (60 s) alone does not end it before the deadline.
    await t2.pass(300_000);
    expect(t2.state(id2)).toBe(TaskState.QUEUED);
    await t2.pass(31_000);
    expect(t2.state(id2)).toBe(TaskState.LOST);
  });

  it("a cancel ends a task at once when its host is unreachable, and the proxy that holds it is told when it returns", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, submitRequest());
    const id = job.taskIds[0]!;
    await t.jobs.applyStatus(t.px1, status(id, TaskState.RUNNING, { hostId: "h1" }));
    t.jobs.proxyDisconnected(t.px1);
    await t.jobs.cancel(t.acme, job.id);
    expect(t.state(id)).toBe(TaskState.CANCELLED);
    expect(t.store.getTask(id)!.message).toMatch(/unreachable/);
    const back = new RecordingPort("px1");
    t.jobs.proxyConnected(back);
    t.jobs.proxyReady(back);
    expect(back.cancels).toEqual([`cancel:${id}`]);
    // The host's own CANCELLED follows: kept as its late report; the recall is settled.
    await t.jobs.applyStatus(back, status(id, TaskState.CANCELLED, { hostId: "h1", message: "cancelled" }));
    expect(t.store.getTask(id)!.late?.state).toBe(TaskState.CANCELLED);
    expect(t.store.recallsFor("px1")).toEqual([]);
  });

  it("a cancel the reachable host does not confirm ends the task after the cancel grace", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, submitRequest());
    const id = job.taskIds[0]!;
    await t.jobs.applyStatus(t.px1, status(id, TaskState.RUNNING, { hostId: "h1" }));
    await t.jobs.cancel(t.acme, job.id);
    expect(t.px1.cancels).toEqual([`cancel:${id}`]);
    await t.pass(9000);
    expect(t.state(id)).toBe(TaskState.RUNNING);
    await t.pass(2000);
    expect(t.state(id)).toBe(TaskState.CANCELLED);
    expect(t.store.getTask(id)!.message).toMatch(/did not confirm within 10s/);
  });
});

describe("routing across a failover", () => {
  it("a host that moves to another proxy gets its undelivered tasks there; one proxy's expiry of its copy does not end a task another still holds", async () => {
    const t = setup();
    t.away(t.px1);
    const job = await t.jobs.submit(t.acme, submitRequest({ deliveryDeadlineMs: 60_000 }));
    const id = job.taskIds[0]!;
    t.at(t.px1);
    await flush();
    await t.jobs.applyStatus(t.px1, status(id, TaskState.QUEUED, { hostId: "h1", atProxy: true }));
    // The host fails over to px2 before px1 handed the task over.
    t.at(t.px2);
    await flush();
    expect(t.px2.tasks.map((s) => s.taskId)).toEqual([id]);
    expect(t.store.getTask(id)!.proxies).toEqual(["px1", "px2"]);
    // px1 expires its copy at the deadline: px2 may still hand its copy over, so the task goes on.
    await t.jobs.applyStatus(t.px1, status(id, TaskState.EXPIRED, { hostId: "h1", atProxy: true }));
    expect(t.state(id)).toBe(TaskState.QUEUED);
    expect(t.store.getTask(id)!.proxies).toEqual(["px2"]);
    // The host runs it through px2.
    await t.jobs.applyStatus(t.px2, status(id, TaskState.SUCCEEDED, { hostId: "h1", exitCode: 0 }));
    expect(t.state(id)).toBe(TaskState.SUCCEEDED);
  });

  it("the last holder's own expiry ends an undelivered task", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, submitRequest());
    const id = job.taskIds[0]!;
    await t.jobs.applyStatus(t.px1, status(id, TaskState.EXPIRED, { hostId: "h1", atProxy: true, message: "deadline" }));
    expect(t.state(id)).toBe(TaskState.EXPIRED);
  });

  it("takes reports on a task from a proxy that holds it or holds its host now, and drops them from any other", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, submitRequest());
    const id = job.taskIds[0]!;
    const rogue = new RecordingPort("px-rogue", "us");
    t.jobs.proxyConnected(rogue);
    await t.jobs.applyStatus(rogue, status(id, TaskState.SUCCEEDED, { hostId: "h1", exitCode: 0 }));
    expect(await t.jobs.applyOutput(rogue, chunk(id, 1, "forged"))).toBe(1);
    expect(t.state(id)).toBe(TaskState.PENDING);
    expect(t.store.getTask(id)!.outputChunks).toBe(0);
    // A status naming another host than the task's is dropped too.
    await t.jobs.applyStatus(t.px1, status(id, TaskState.RUNNING, { hostId: "h9" }));
    expect(t.state(id)).toBe(TaskState.PENDING);
    // The host fails over to px2 (which never had the task) and reports through it: taken.
    t.at(t.px2);
    await t.jobs.applyStatus(t.px2, status(id, TaskState.RUNNING, { hostId: "h1" }));
    expect(t.state(id)).toBe(TaskState.RUNNING);
    expect(t.store.getTask(id)!.proxies).toContain("px2");
  });

  it("takes reports from a proxy that held the host at some time during the job, also after the host moved on; not from one that held it only before", async () => {
    const t = setup();
    const px3 = new RecordingPort("px3");
    t.jobs.proxyConnected(px3);
    // px3 held h1 before the job; it left before the job was submitted.
    t.at(px3);
    t.away(px3);
    t.clock.advance(1000);
    t.at(t.px1);
    const job = await t.jobs.submit(t.acme, submitRequest());
    const id = job.taskIds[0]!;
    expect(t.jobs.holdsBack(px3, id, "h1")).toBe(true);
    // h1 fails over to px2 during the job, then on to px1 again: px2 may still pass on what it got.
    t.clock.advance(1000);
    t.at(t.px2);
    t.clock.advance(1000);
    t.at(t.px1);
    expect(t.jobs.holdsBack(t.px2, id, "h1")).toBe(false);
    await t.jobs.applyOutput(t.px2, chunk(id, 1, "through px2"));
    expect(t.store.getTask(id)!.outputChunks).toBe(1);
    await t.jobs.applyOutput(px3, chunk(id, 2, "px3 never held h1 during the job"));
    expect(t.store.getTask(id)!.outputChunks).toBe(1);
  });
});
