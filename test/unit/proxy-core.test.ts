import { create, toBinary, type MessageInitShape } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { FailedPreconditionError, PermissionDeniedError, UnavailableError } from "../../common/errors.js";
import { silentLogger } from "../../common/logger.js";
import { AgentStreamRequestSchema } from "../../gen/rexmesh/v1/agent_link_pb.js";
import { ProxyStreamRequestSchema, ProxyStreamResponseSchema } from "../../gen/rexmesh/v1/proxy_link_pb.js";
import { StepSchema, TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { ProxyCore } from "../../proxy/proxy.js";
import { MemoryProxyStore } from "../../proxy/store.js";
import { LmdbProxyStore } from "../../proxy/lmdb-store.js";
import { LmdbEnv } from "../../common/lmdb.js";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { FakeLink, asSigned, chunk, eventually, expectResolvesAfter, flush, hostPeer, status, taskSpec } from "./support.js";
import { handed, proxyHarness, statusAcksTo, upOutput, upStatuses, type ControllerSide, type HostSide } from "./proxy-harness.js";

const upHosts = (l: ControllerSide) => l.sent.flatMap((f) => [...(f.hello?.hosts ?? []), ...f.hosts].map((h) => `${h.hostId}:${h.tenant}:${h.connected}`));
const cancelsTo = (l: HostSide) => l.sent.flatMap((f) => f.cancelTaskIds);
const outputAcksTo = (l: HostSide) => l.sent.flatMap((f) => f.outputAcks.map((a) => `${a.taskId}:${a.seq}`));

function setup(opts: { sweepMs?: number; maxTakenOnPerHost?: number } = {}) {
  return proxyHarness(new MemoryProxyStore(), opts);
}

/** A proxy with a controller link, and task(s) handed to host h1. */
async function dispatched(taskIds = ["t1"]) {
  const t = setup();
  const ctl = t.connectController();
  ctl.send({ tasks: taskIds.map((id) => taskSpec(id, "h1", { deliverByMs: t.future() })) });
  await flush();
  const h = t.connectHost("h1", 0);
  await flush();
  h.send({ credits: taskIds.length });
  await flush();
  expect(handed(h.link)).toEqual(taskIds);
  return { ...t, ctl, h };
}

describe("ProxyCore: who may connect", () => {
  it("refuses a host stream whose hello claims another host than its certificate", async () => {
    const t = setup();
    const ctl = t.connectController();
    const h = t.connectHost("h1", 1, { claim: "h2" });
    const err = await h.settled;
    expect(err).toBeInstanceOf(PermissionDeniedError);
    expect((err as Error).message).toContain("h2");
    await flush();
    expect(t.core.connectedHosts).toBe(0);
    expect(upHosts(ctl.link)).toEqual([]);
    expect(h.link.sent).toEqual([]);
  });

  it("refuses a peer that is not a host", async () => {
    const t = setup();
    const h = t.connectHost("px9", 1, { peer: { role: "proxy", scope: "eu", id: "px9" } });
    expect(await h.settled).toBeInstanceOf(PermissionDeniedError);
    expect(t.core.connectedHosts).toBe(0);
  });

  it("reports a host as held once it proves its presence over the controller's nonce, and when it leaves", async () => {
    const t = setup();
    const h1 = t.connectHost("h1", 0);
    await flush();
    const ctl = t.connectController();
    const nonce = new Uint8Array([1, 2, 3]);
    ctl.send({ welcome: { heartbeatMs: 10_000, presenceNonce: nonce } });
    const h2 = t.connectHost("h2", 0);
    await flush();
    // Both hosts are asked to prove their presence over this link's nonce; nothing goes up before they do.
    expect(h1.link.sent.flatMap((f) => (f.presenceNonce.length ? [[...f.presenceNonce]] : []))).toEqual([[1, 2, 3]]);
    expect(h2.link.sent[0]?.presenceNonce).toEqual(nonce);
    expect(upHosts(ctl.link)).toEqual([]);
    h1.send({ presenceNonce: nonce, presenceProof: new Uint8Array([9]) });
    // A proof over another nonce (a stale link's) is not passed on.
    h2.send({ presenceNonce: new Uint8Array([7]), presenceProof: new Uint8Array([9]) });
    await flush();
    h2.send({ presenceNonce: nonce, presenceProof: new Uint8Array([8]) });
    await flush();
    h1.link.end();
    await h1.settled;
    await flush();
    expect(upHosts(ctl.link)).toEqual(["h1:acme:true", "h2:acme:true", "h1:acme:false"]);
    const proofs = ctl.link.sent.flatMap((f) => f.hosts.filter((h) => h.connected).map((h) => [...h.proof]));
    expect(proofs).toEqual([[9], [8]]);
    expect(t.core.connectedHosts).toBe(1);
    expect(h2.link.sent[0]?.welcome?.proxy).toBe("px1");
  });

  it("never lets a second stream of a host replace a live one; takes it once the first has ended", async () => {
    const t = setup();
    const a = t.connectHost("h1", 0);
    await flush();
    const b = t.connectHost("h1", 0);
    await flush();
    expect(await b.settled).toBeInstanceOf(FailedPreconditionError);
    expect(a.link.isClosed).toBe(false);
    expect(t.core.connectedHosts).toBe(1);
    a.link.end();
    await a.settled;
    const c = t.connectHost("h1", 0);
    await flush();
    expect(c.link.isClosed).toBe(false);
    expect(c.link.sent[0]?.welcome).toBeDefined();
    expect(t.core.connectedHosts).toBe(1);
  });
});

describe("ProxyCore: tasks going down", () => {
  it("queues tasks from the controller and reports QUEUED up", async () => {
    const t = setup();
    const ctl = t.connectController();
    ctl.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.future() }), taskSpec("t2", "h2", { deliverByMs: t.future() })] });
    await flush();
    expect(ctl.link.sent[0]?.hello?.name).toBe("px1");
    expect(upStatuses(ctl.link)).toEqual(["t1:QUEUED", "t2:QUEUED"]);
    expect(t.store.getTask("t1")?.state).toBe(TaskState.QUEUED);
    const queued = ctl.link.sent.flatMap((f) => f.statuses)[0]!;
    expect(queued.hostId).toBe("h1");
  });

  it("hands a host nothing without credits, then only as many tasks as credits, oldest first", async () => {
    const t = setup();
    const ctl = t.connectController();
    ctl.send({ tasks: ["t1", "t2", "t3"].map((id) => taskSpec(id, "h1", { deliverByMs: t.future() })) });
    await flush();
    const h = t.connectHost("h1", 0);
    await flush();
    expect(handed(h.link)).toEqual([]);
    h.send({ credits: 2 });
    await flush();
    expect(handed(h.link)).toEqual(["t1", "t2"]);
    expect(t.store.getTask("t3")?.state).toBe(TaskState.QUEUED);
    expect(upStatuses(ctl.link)).toEqual(["t1:QUEUED", "t2:QUEUED", "t3:QUEUED", "t1:DISPATCHED", "t2:DISPATCHED"]);
    h.send({ credits: 1 });
    await flush();
    expect(handed(h.link)).toEqual(["t1", "t2", "t3"]);
  });

  it("holds a ping in memory only: no QUEUED, no DISPATCHED, no reminder on a resend; its answer goes up as usual", async () => {
    const t = setup();
    const ctl = t.connectController();
    const ping = [create(StepSchema, { tool: { case: "ping", value: {} } })];
    ctl.send({ tasks: [taskSpec("p1", "h1", { deliverByMs: t.future(), steps: ping }), taskSpec("x1", "h1", { deliverByMs: t.future() })] });
    await flush();
    const h = t.connectHost("h1", 2);
    await flush();
    expect(handed(h.link)).toEqual(["p1", "x1"]);
    expect(upStatuses(ctl.link)).toEqual(["x1:QUEUED", "x1:DISPATCHED"]);
    expect(t.store.getTask("p1")?.volatile).toBe(true);
    // The controller sends it again (a link that came back): no reminder confirms it, so a proxy that restarted
    // would be sent it again too; the host already has it.
    ctl.send({ tasks: [taskSpec("p1", "h1", { deliverByMs: t.future(), steps: ping })] });
    await flush();
    expect(upStatuses(ctl.link)).toEqual(["x1:QUEUED", "x1:DISPATCHED"]);
    expect(handed(h.link)).toEqual(["p1", "x1"]);
    const framesBefore = h.link.sent.length;
    h.send({ statuses: [status("p1", TaskState.SUCCEEDED)], credits: 2 });
    await flush();
    expect(upStatuses(ctl.link)).toEqual(["x1:QUEUED", "x1:DISPATCHED", "p1:SUCCEEDED"]);
    // The daemon keeps no ping answer for an ack, so none goes back, and no empty frame either (a write, a TLS
    // record and a read per host of a fleet-wide ping); other statuses are acknowledged.
    expect(h.link.sent.slice(framesBefore)).toEqual([]);
    h.send({ statuses: [status("x1", TaskState.DELIVERED)] });
    await flush();
    expect(statusAcksTo(h.link)).toEqual(["x1:DELIVERED"]);
  });

  it("hands a task that arrives while the host is connected with credits at once", async () => {
    const t = setup();
    const ctl = t.connectController();
    const h = t.connectHost("h1", 0);
    await flush();
    h.send({ credits: 3 });
    await flush();
    ctl.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.future() }), taskSpec("t9", "h9", { deliverByMs: t.future() })] });
    await flush();
    expect(handed(h.link)).toEqual(["t1"]);
  });

  // Regression guard (was a bug at proxy/proxy.ts:138-140 with :207, now fixed): the hello frame of a daemon carries its credits, so
  // handleHostFrame(first) already calls deliver(), which marks queued tasks DISPATCHED and puts
  // them in the welcome frame; resendHandedOut() then runs and adds every DISPATCHED task again.
  // Each task queued while its host was away is sent twice in the same frame: the daemon's
  // ledger drops the copy, but every spec (up to 1 MiB of stdin each) crosses the link twice
  // and the daemon answers each copy with one more status.
  it("hands each queued task to a host connecting with credits exactly once", async () => {
    const t = setup();
    const ctl = t.connectController();
    ctl.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.future() }), taskSpec("t2", "h1", { deliverByMs: t.future() })] });
    await flush();
    const h = t.connectHost("h1", 2);
    await flush();
    expect(handed(h.link)).toEqual(["t1", "t2"]);
  });

  it("hands a DISPATCHED task again after the host reconnects", async () => {
    const t = setup();
    const ctl = t.connectController();
    ctl.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.future() })] });
    await flush();
    const a = t.connectHost("h1", 0);
    await flush();
    a.send({ credits: 1 });
    await flush();
    expect(handed(a.link)).toEqual(["t1"]);
    a.link.end();
    await a.settled;
    const b = t.connectHost("h1", 0);
    await flush();
    expect(handed(b.link)).toEqual(["t1"]);
    expect(b.link.sent[0]?.welcome).toBeDefined();
  });

  it("does not hand a task again once the daemon reported it DELIVERED", async () => {
    const t = setup();
    const ctl = t.connectController();
    ctl.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.future() })] });
    await flush();
    const a = t.connectHost("h1", 0);
    await flush();
    a.send({ credits: 1 });
    await flush();
    a.send({ statuses: [status("t1", TaskState.DELIVERED)], credits: 0 });
    await flush();
    a.link.end();
    await a.settled;
    const b = t.connectHost("h1", 0);
    await flush();
    expect(handed(b.link)).toEqual([]);
  });

  it("answers a task the controller sends again with its state, without queueing it twice", async () => {
    const t = setup();
    const ctl = t.connectController();
    const spec = taskSpec("t1", "h1", { deliverByMs: t.future() });
    ctl.send({ tasks: [spec] });
    await flush();
    ctl.send({ tasks: [spec] });
    await flush();
    expect(upStatuses(ctl.link)).toEqual(["t1:QUEUED", "t1:QUEUED"]);
    expect(t.store.allTasks()).toHaveLength(1);
    const h = t.connectHost("h1", 0);
    await flush();
    h.send({ credits: 5 });
    await flush();
    expect(handed(h.link)).toEqual(["t1"]);
  });
});

describe("ProxyCore: cancels and deadlines", () => {
  it("cancels a QUEUED task at the proxy and never hands it out", async () => {
    const t = setup();
    const ctl = t.connectController();
    ctl.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.future() })] });
    await flush();
    ctl.send({ cancels: [{ taskId: "t1", hostId: "h1" }] });
    await flush();
    expect(upStatuses(ctl.link)).toEqual(["t1:QUEUED", "t1:CANCELLED"]);
    const h = t.connectHost("h1", 4);
    await flush();
    expect(handed(h.link)).toEqual([]);
    expect(cancelsTo(h.link)).toEqual([]);
  });

  it("forwards the cancel of a DISPATCHED task to its host, now or when it reconnects", async () => {
    const t = setup();
    const ctl = t.connectController();
    ctl.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.future() }), taskSpec("t2", "h1", { deliverByMs: t.future() })] });
    await flush();
    const a = t.connectHost("h1", 0);
    await flush();
    a.send({ credits: 2 });
    await flush();
    ctl.send({ cancels: [{ taskId: "t1", hostId: "h1" }] });
    await flush();
    expect(cancelsTo(a.link)).toEqual(["t1"]);
    expect(upStatuses(ctl.link)).not.toContain("t1:CANCELLED");
    a.link.end();
    await a.settled;
    ctl.send({ cancels: [{ taskId: "t2", hostId: "h1" }] });
    await flush();
    const b = t.connectHost("h1", 0);
    await flush();
    expect(cancelsTo(b.link)).toEqual(["t1", "t2"]);
  });

  it("expires a task whose deadline passed before it reached the proxy", async () => {
    const t = setup();
    const ctl = t.connectController();
    const h = t.connectHost("h1", 0);
    await flush();
    h.send({ credits: 4 });
    await flush();
    ctl.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.clock.now() - 1 })] });
    await flush();
    expect(upStatuses(ctl.link)).toEqual(["t1:EXPIRED"]);
    expect(handed(h.link)).toEqual([]);
  });

  it("expires queued tasks of an absent host when the sweep finds their deadline passed", async () => {
    const t = setup({ sweepMs: 1000 });
    const ctl = t.connectController();
    ctl.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.clock.now() + 5000 }), taskSpec("t2", "h1", { deliverByMs: t.future() })] });
    await flush();
    t.clock.advance(4000);
    await flush();
    expect(upStatuses(ctl.link)).toEqual(["t1:QUEUED", "t2:QUEUED"]);
    t.clock.advance(1000);
    await flush();
    expect(upStatuses(ctl.link)).toEqual(["t1:QUEUED", "t2:QUEUED", "t1:EXPIRED"]);
    const h = t.connectHost("h1", 0);
    await flush();
    h.send({ credits: 4 });
    await flush();
    expect(handed(h.link)).toEqual(["t2"]);
  });

  it("expires instead of handing out a task whose deadline passed between sweeps", async () => {
    const t = setup({ sweepMs: 1e9 });
    const ctl = t.connectController();
    ctl.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.clock.now() + 5000 })] });
    await flush();
    t.clock.advance(6000);
    const h = t.connectHost("h1", 0);
    await flush();
    h.send({ credits: 1 });
    await flush();
    expect(handed(h.link)).toEqual([]);
    expect(upStatuses(ctl.link)).toEqual(["t1:QUEUED", "t1:EXPIRED"]);
  });
});

describe("ProxyCore: results going up", () => {

  it("forwards the host's statuses up, stamped with its host id, and acks them to the host", async () => {
    const t = await dispatched();
    t.h.send({ statuses: [status("t1", TaskState.DELIVERED), status("t1", TaskState.RUNNING)] });
    await flush();
    expect(upStatuses(t.ctl.link)).toEqual(["t1:QUEUED", "t1:DISPATCHED", "t1:DELIVERED", "t1:RUNNING"]);
    expect(t.ctl.link.sent.flatMap((f) => f.statuses).every((s) => s.hostId === "h1")).toBe(true);
    expect(statusAcksTo(t.h.link)).toEqual(["t1:DELIVERED", "t1:RUNNING"]);
    expect(t.store.getTask("t1")?.state).toBe(TaskState.RUNNING);
  });

  it("drops a stale status from the host (only forward moves are sent up) but still acks it", async () => {
    const t = await dispatched();
    t.h.send({ statuses: [status("t1", TaskState.RUNNING)] });
    await flush();
    t.h.send({ statuses: [status("t1", TaskState.DELIVERED)] });
    await flush();
    expect(upStatuses(t.ctl.link)).toEqual(["t1:QUEUED", "t1:DISPATCHED", "t1:RUNNING"]);
    expect(statusAcksTo(t.h.link)).toEqual(["t1:RUNNING", "t1:DELIVERED"]);
  });

  it("does not let a host report status or output for another host's task", async () => {
    const t = await dispatched();
    const intruder = t.connectHost("h2", 0);
    await flush();
    intruder.send({ statuses: [status("t1", TaskState.SUCCEEDED)], output: [chunk("t1", 1, "forged")] });
    await flush();
    expect(upStatuses(t.ctl.link)).toEqual(["t1:QUEUED", "t1:DISPATCHED"]);
    expect(upOutput(t.ctl.link)).toEqual([]);
    expect(t.store.getTask("t1")?.state).toBe(TaskState.DISPATCHED);
    expect(t.store.getTask("t1")?.outputSeq).toBe(0);
    // The real host's output still counts from 1.
    t.h.send({ output: [chunk("t1", 1)] });
    await flush();
    expect(upOutput(t.ctl.link)).toEqual(["t1:1"]);
  });

  it("acks output to the daemon with the highest seq it stored; a chunk at or below it is a duplicate and not sent up", async () => {
    const t = await dispatched();
    const acksAfter = async (...seqs: number[]) => {
      const before = t.h.link.sent.length;
      t.h.send({ output: seqs.map((s) => chunk("t1", s)) });
      await flush();
      return t.h.link.sent.slice(before).flatMap((f) => f.outputAcks.map((a) => Number(a.seq)));
    };
    expect(await acksAfter(1)).toEqual([1]);
    expect(await acksAfter(1)).toEqual([1]);
    // A host sends a task's chunks in order and forgets only acknowledged ones: after a gap
    // (chunks 2-3 went through another proxy before a failover) the next chunk is new.
    expect(await acksAfter(4, 5)).toEqual([5]);
    expect(await acksAfter(4, 5, 6)).toEqual([6]);
    expect(upOutput(t.ctl.link)).toEqual(["t1:1", "t1:4", "t1:5", "t1:6"]);
    // The highest seq is stored with the task, so a restarted proxy knows it too.
    expect(t.store.getTask("t1")?.outputSeq).toBe(6);
  });

  it("keeps results while the controller is away and resends them in order when it returns; acks trim them", async () => {
    const t = await dispatched();
    t.ctl.link.end();
    await t.ctl.settled;
    expect(t.core.controllerConnected).toBe(false);
    t.h.send({ statuses: [status("t1", TaskState.DELIVERED), status("t1", TaskState.RUNNING)] });
    await flush();
    t.h.send({ output: [chunk("t1", 1), chunk("t1", 2)] });
    await flush();
    t.h.send({ statuses: [status("t1", TaskState.SUCCEEDED, { outputChunks: 2n })] });
    await flush();
    // The daemon was acked although the controller is away: the proxy holds the results.
    expect(outputAcksTo(t.h.link)).toEqual(["t1:2"]);
    expect(t.store.upwardSize()).toBe(7);

    const c2 = t.connectController();
    await flush();
    expect(c2.link.sent[0]?.hello).toBeDefined();
    expect(upStatuses(c2.link)).toEqual(["t1:QUEUED", "t1:DISPATCHED", "t1:DELIVERED", "t1:RUNNING", "t1:SUCCEEDED"]);
    expect(upOutput(c2.link)).toEqual(["t1:1", "t1:2"]);

    // The controller acks part of it; the rest goes again on the next link.
    // The proxy's own statuses and the host's are acknowledged apart.
    c2.send({ outputAcks: [{ taskId: "t1", seq: 1n }], statusAcks: [{ taskId: "t1", state: TaskState.RUNNING }] });
    await flush();
    expect(t.store.upwardSize()).toBe(4);
    c2.send({ statusAcks: [{ taskId: "t1", state: TaskState.DISPATCHED, atProxy: true }] });
    await flush();
    expect(t.store.upwardSize()).toBe(2);
    c2.link.end();
    await c2.settled;
    const c3 = t.connectController();
    await flush();
    expect(upStatuses(c3.link)).toEqual(["t1:SUCCEEDED"]);
    expect(upOutput(c3.link)).toEqual(["t1:2"]);

    // Acking the terminal status and the last chunk empties the backlog and forgets the task.
    c3.send({ outputAcks: [{ taskId: "t1", seq: 2n }], statusAcks: [{ taskId: "t1", state: TaskState.SUCCEEDED }] });
    await flush();
    expect(t.store.upwardSize()).toBe(0);
    expect(t.store.getTask("t1")).toBeUndefined();
    c3.link.end();
    await c3.settled;
    const c4 = t.connectController();
    await flush();
    expect(upStatuses(c4.link)).toEqual([]);
    expect(upOutput(c4.link)).toEqual([]);
  });

  it("forwards the terminal status with its exit code and chunk count, after the output of the same frame", async () => {
    const t = await dispatched();
    t.h.send({ output: [chunk("t1", 1)], statuses: [status("t1", TaskState.SUCCEEDED, { outputChunks: 1n, exitCode: 0 })] });
    await flush();
    const final = t.ctl.link.sent.flatMap((f) => f.statuses).find((s) => s.state === TaskState.SUCCEEDED)!;
    expect(final.outputChunks).toBe(1n);
    expect(final.exitCode).toBe(0);
    expect(upOutput(t.ctl.link)).toEqual(["t1:1"]);
  });
});

describe("ProxyCore: a host that failed over, and tasks that ended here", () => {
  it("takes on a task it never held from the host's reports: output and status go up stamped with the host, and are acked", async () => {
    const t = setup();
    const ctl = t.connectController();
    await flush();
    const h = t.connectHost("h1", 0);
    await flush();
    // The host got t7 through another proxy of the region, which then went away; chunks 1-2 went through it.
    h.send({ statuses: [status("t7", TaskState.RUNNING)], output: [chunk("t7", 3), chunk("t7", 4)] });
    await flush();
    expect(upOutput(ctl.link)).toEqual(["t7:3", "t7:4"]);
    expect(upStatuses(ctl.link)).toEqual(["t7:RUNNING"]);
    const up = ctl.link.sent.flatMap((f) => [...f.statuses.map((x) => x.hostId), ...f.output.map((c) => c.hostId)]);
    expect(up.every((x) => x === "h1")).toBe(true);
    expect(outputAcksTo(h.link)).toEqual(["t7:4"]);
    expect(statusAcksTo(h.link)).toEqual(["t7:RUNNING"]);
    expect(t.store.getTask("t7")).toMatchObject({ hostId: "h1", state: TaskState.RUNNING, outputSeq: 4 });
  });

  it("a cancel for a task it never held reaches the host once the host reports that task", async () => {
    const t = setup();
    const ctl = t.connectController();
    ctl.send({ cancels: [{ taskId: "t7", hostId: "h1" }] });
    await flush();
    expect(t.store.markOf("t7")).toBe("cancelled");
    const h = t.connectHost("h1", 0);
    await flush();
    h.send({ statuses: [status("t7", TaskState.RUNNING)] });
    await flush();
    expect(cancelsTo(h.link)).toEqual(["t7"]);
  });

  it("remembers a task whose end the controller acknowledged: a replay of it is not queued again, the host's repeats are only acked", async () => {
    const t = await dispatched();
    t.h.send({ statuses: [status("t1", TaskState.SUCCEEDED, { outputChunks: 0n })] });
    await flush();
    t.ctl.send({ statusAcks: [{ taskId: "t1", state: TaskState.SUCCEEDED }, { taskId: "t1", state: TaskState.DISPATCHED, atProxy: true }] });
    await flush();
    expect(t.store.getTask("t1")).toBeUndefined();
    expect(t.store.markOf("t1")).toBe("done");
    const before = upStatuses(t.ctl.link).length;
    // The controller (or a bundle imported again) sends it once more: nothing is queued or handed out.
    t.ctl.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.future() })] });
    await flush();
    t.h.send({ credits: 1 });
    await flush();
    expect(handed(t.h.link)).toEqual(["t1"]);
    expect(t.store.getTask("t1")).toBeUndefined();
    // The host repeats its end (it missed the ack): acked, not sent up again.
    t.h.send({ statuses: [status("t1", TaskState.SUCCEEDED)] });
    await flush();
    expect(upStatuses(t.ctl.link).length).toBe(before);
    expect(statusAcksTo(t.h.link).filter((x) => x === "t1:SUCCEEDED")).toHaveLength(2);
  });

  it("after its own copy expired, still takes the host's reports on that task (the host may have it from another proxy)", async () => {
    const t = setup();
    const ctl = t.connectController();
    ctl.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.clock.now() + 1000 })] });
    await flush();
    t.clock.advance(1500);
    await flush();
    expect(upStatuses(ctl.link)).toEqual(["t1:QUEUED", "t1:EXPIRED"]);
    expect(ctl.link.sent.flatMap((f) => f.statuses).every((x) => x.atProxy)).toBe(true);
    ctl.send({ statusAcks: [{ taskId: "t1", state: TaskState.EXPIRED, atProxy: true }] });
    await flush();
    expect(t.store.markOf("t1")).toBe("dropped");
    const h = t.connectHost("h1", 0);
    await flush();
    h.send({ statuses: [status("t1", TaskState.SUCCEEDED)], output: [chunk("t1", 1)] });
    await flush();
    expect(upStatuses(ctl.link).slice(2)).toEqual(["t1:SUCCEEDED"]);
    expect(upOutput(ctl.link)).toEqual(["t1:1"]);
  });
});

describe("ProxyCore: what no peer sends (F4, F7)", () => {
  const longId = "t".repeat(4000);

  it("drops a host's reports with a 4,000-character task id, a seq beyond 2^53-1 or a state no version defines: not stored, not sent up, not acked; the stream goes on", async () => {
    const t = await dispatched();
    t.h.send({
      statuses: [status("t1", 2 ** 31 - 1), status(longId, TaskState.RUNNING), status("t1", TaskState.RUNNING)],
      output: [chunk(longId, 1), { ...chunk("t1", 1), seq: 2n ** 64n - 1n }, chunk("t1", 1)],
    });
    await flush();
    expect(t.h.link.isClosed).toBe(false);
    expect(t.store.getTask(longId)).toBeUndefined();
    expect(t.store.getTask("t1")).toMatchObject({ state: TaskState.RUNNING, outputSeq: 1 });
    expect(upStatuses(t.ctl.link)).toEqual(["t1:QUEUED", "t1:DISPATCHED", "t1:RUNNING"]);
    expect(upOutput(t.ctl.link)).toEqual(["t1:1"]);
    expect(statusAcksTo(t.h.link)).toEqual(["t1:RUNNING"]);
    expect(outputAcksTo(t.h.link)).toEqual(["t1:1"]);
  });

  it("ignores an ack from the controller of a state no version defines, and takes an ack of a seq far beyond anything sent at once", async () => {
    const t = await dispatched(["t1", "t2"]);
    t.h.send({ statuses: [status("t1", TaskState.SUCCEEDED, { outputChunks: 2n }), status("t2", TaskState.RUNNING)], output: [chunk("t1", 1), chunk("t1", 2), chunk("t2", 1)] });
    await flush();
    // A state above every terminal one passed for an end: the task was settled and its results dropped.
    t.ctl.send({ statusAcks: [{ taskId: "t1", state: 2 ** 20 }] });
    await flush();
    expect(t.store.getTask("t1")?.state).toBe(TaskState.SUCCEEDED);
    expect(t.store.upward().map((i) => (i.kind === "output" ? `${i.chunk.taskId}:${i.chunk.seq}` : i.kind === "status" ? `${i.status.taskId}:${TaskState[i.status.state]}` : `event:${i.event.id}`))).toEqual([
      "t1:QUEUED",
      "t2:QUEUED",
      "t1:DISPATCHED",
      "t2:DISPATCHED",
      "t1:1",
      "t1:2",
      "t2:1",
      "t1:SUCCEEDED",
      "t2:RUNNING",
    ]);
    // Walking every seq up to this one takes seconds (up to 10^15, as in F7: the proxy froze for good).
    const started = performance.now();
    t.ctl.send({ outputAcks: [{ taskId: "t1", seq: 100_000_000n }] });
    await flush();
    expect(performance.now() - started).toBeLessThan(1000);
    expect(t.store.upward().filter((i) => i.kind === "output").map((i) => (i.kind === "output" ? `${i.chunk.taskId}:${i.chunk.seq}` : ""))).toEqual(["t2:1"]);
  });

  it("takes on at most maxTakenOnPerHost tasks it never held from one host; reports on more are neither taken nor acked, until room is made", async () => {
    const t = setup({ maxTakenOnPerHost: 2 });
    const ctl = t.connectController();
    await flush();
    const h = t.connectHost("h1", 0);
    await flush();
    h.send({ statuses: [status("t7", TaskState.RUNNING), status("t8", TaskState.SUCCEEDED)] });
    await flush();
    h.send({ statuses: [status("t9", TaskState.RUNNING)], output: [chunk("t9", 1)] });
    await flush();
    expect(h.link.isClosed).toBe(false);
    expect(upStatuses(ctl.link)).toEqual(["t7:RUNNING", "t8:SUCCEEDED"]);
    expect(upOutput(ctl.link)).toEqual([]);
    expect(statusAcksTo(h.link)).toEqual(["t7:RUNNING", "t8:SUCCEEDED"]);
    expect(outputAcksTo(h.link)).toEqual([]);
    expect(t.store.getTask("t9")).toBeUndefined();
    // Another host has a cap of its own.
    const h2 = t.connectHost("h2", 0);
    await flush();
    h2.send({ statuses: [status("t20", TaskState.RUNNING)] });
    await flush();
    expect(t.store.getTask("t20")?.hostId).toBe("h2");
    // The controller settles t8: h1 holds one taken-on task again, and its report on t9 is taken.
    ctl.send({ statusAcks: [{ taskId: "t8", state: TaskState.SUCCEEDED }] });
    await flush();
    expect(t.store.getTask("t8")).toBeUndefined();
    h.send({ statuses: [status("t9", TaskState.RUNNING)], output: [chunk("t9", 1)] });
    await flush();
    expect(t.store.getTask("t9")).toMatchObject({ hostId: "h1", state: TaskState.RUNNING, outputSeq: 1 });
    expect(outputAcksTo(h.link)).toEqual(["t9:1"]);
    // A task the controller sent is not taken on: it counts against no cap.
    ctl.send({ tasks: [taskSpec("t10", "h1", { deliverByMs: t.future() })] });
    await flush();
    h.send({ statuses: [status("t10", TaskState.RUNNING)] });
    await flush();
    expect(t.store.getTask("t10")?.state).toBe(TaskState.RUNNING);
  });
});


describe("ProxyCore on LMDB: a restart keeps what was acknowledged", () => {
  it("keeps each task's highest output seq, so the chunks a host sends again after the restart are taken, not dropped as out of order", async () => {
    const dir = mkdtempSync(join(tmpdir(), "rexmesh-proxy-lmdb-"));
    const clock = new ManualClock();
    const start = () => {
      const env = new LmdbEnv({ path: dir, maxBytes: 64 << 20 });
      const core = new ProxyCore({ name: "px1", region: "eu", clock, store: new LmdbProxyStore(env), log: silentLogger, heartbeatMs: 10_000 });
      core.start();
      const ctl: ControllerSide = new FakeLink();
      void core.serveController(ctl).catch(() => undefined);
      const host: HostSide = new FakeLink();
      void core.serveHost(host, hostPeer("h1")).catch(() => undefined);
      const send = (init: MessageInitShape<typeof AgentStreamRequestSchema>) => host.deliver(create(AgentStreamRequestSchema, init));
      send({ hello: { hostId: "h1", heartbeatMs: 0 }, credits: 1 });
      return { env, core, ctl, host, send };
    };
    const a = start();
    a.ctl.deliver(create(ProxyStreamResponseSchema, { tasks: [asSigned(taskSpec("t1", "h1", { deliverByMs: clock.now() + 60_000 }))] }));
    await flush(10);
    a.send({ statuses: [status("t1", TaskState.RUNNING)] });
    await eventually(() => statusAcksTo(a.host).length > 0);
    // Output alone, no state change with it.
    a.send({ output: [chunk("t1", 1), chunk("t1", 2)] });
    await eventually(() => outputAcksTo(a.host).length > 0);
    expect(outputAcksTo(a.host)).toEqual(["t1:2"]);
    // The proxy stops (a kill would keep the same committed state) and comes back on the same store.
    a.core.stop();
    await a.env.close();
    const b = start();
    await flush(10);
    // The host resends what it did not see acknowledged plus what came since: 2 is a duplicate, 3 and 4 are new.
    b.send({ output: [chunk("t1", 2), chunk("t1", 3), chunk("t1", 4)], statuses: [status("t1", TaskState.SUCCEEDED, { outputChunks: 4n })] });
    await eventually(() => outputAcksTo(b.host).length > 0 && upOutput(b.ctl).length >= 4);
    expect(outputAcksTo(b.host)).toEqual(["t1:4"]);
    expect(upOutput(b.ctl)).toEqual(["t1:1", "t1:2", "t1:3", "t1:4"]);
    b.core.stop();
    await b.env.close();
  });
});

describe("ProxyCore on LMDB: a ping is not stored", () => {
  it("forgets a ping and its answer across a restart (the controller sends it again), and keeps the answer until the controller has it", async () => {
    const dir = mkdtempSync(join(tmpdir(), "rexmesh-proxy-lmdb-"));
    const clock = new ManualClock();
    const ping = [create(StepSchema, { tool: { case: "ping", value: {} } })];
    const start = (credits: number) => {
      const env = new LmdbEnv({ path: dir, maxBytes: 64 << 20 });
      const store = new LmdbProxyStore(env);
      const core = new ProxyCore({ name: "px1", region: "eu", clock, store, log: silentLogger, heartbeatMs: 10_000 });
      core.start();
      const ctl: ControllerSide = new FakeLink();
      void core.serveController(ctl).catch(() => undefined);
      const host: HostSide = new FakeLink();
      void core.serveHost(host, hostPeer("h1")).catch(() => undefined);
      host.deliver(create(AgentStreamRequestSchema, { hello: { hostId: "h1", heartbeatMs: 0 }, credits }));
      return { env, store, core, ctl, host };
    };
    const a = start(0);
    a.ctl.deliver(create(ProxyStreamResponseSchema, { tasks: [asSigned(taskSpec("p1", "h1", { deliverByMs: clock.now() + 60_000, steps: ping })), asSigned(taskSpec("p2", "h1", { deliverByMs: clock.now() + 60_000, steps: ping }))] }));
    await flush(10);
    expect(a.store.getTask("p1")?.state).toBe(TaskState.QUEUED);
    a.core.stop();
    await a.env.close();
    // Restarted on the same store: neither ping was stored, nothing went up about them.
    const b = start(2);
    await flush(10);
    expect(b.store.allTasks()).toEqual([]);
    expect(upStatuses(b.ctl)).toEqual([]);
    // The controller sends them again (the proxy never confirmed them); they are handed out, and p1's answer goes up,
    // held in memory (a ping's answer is not stored either) until the controller acknowledges it.
    b.ctl.deliver(create(ProxyStreamResponseSchema, { tasks: [asSigned(taskSpec("p1", "h1", { deliverByMs: clock.now() + 60_000, steps: ping })), asSigned(taskSpec("p2", "h1", { deliverByMs: clock.now() + 60_000, steps: ping }))] }));
    await flush(10);
    expect(handed(b.host)).toEqual(["p1", "p2"]);
    b.host.deliver(create(AgentStreamRequestSchema, { statuses: [status("p1", TaskState.SUCCEEDED, { message: "pong" }), status("p2", TaskState.SUCCEEDED, { message: "pong" })] }));
    await eventually(() => upStatuses(b.ctl).length === 2);
    expect(upStatuses(b.ctl)).toEqual(["p1:SUCCEEDED", "p2:SUCCEEDED"]);
    b.ctl.deliver(create(ProxyStreamResponseSchema, { statusAcks: [{ taskId: "p2", state: TaskState.SUCCEEDED }] }));
    await eventually(() => b.store.upwardSize() === 1);
    expect(b.store.upward().map((i) => i.kind === "status" && i.status.taskId)).toEqual(["p1"]);
    b.core.stop();
    await b.env.close();
    // Restarted again: p1's answer is gone with the process (the controller, never told of p1 here, sends it again).
    const c = start(0);
    await flush(10);
    expect(upStatuses(c.ctl)).toEqual([]);
    expect(c.store.upwardSize()).toBe(0);
    expect(c.store.allTasks()).toEqual([]);
    c.core.stop();
    await c.env.close();
  });
});

describe("ProxyCore: frames to the controller stay within a message", () => {
  it("counts a status's message when it sizes a frame, so a host's long messages never make the replay after a reconnect one the controller refuses", async () => {
    const t = setup();
    const ctl = t.connectController();
    ctl.send({ tasks: [taskSpec("t1", "h1", { deliverByMs: t.future() }), taskSpec("t2", "h1", { deliverByMs: t.future() })] });
    const h = t.connectHost("h1", 2);
    await flush();
    // A compromised host: two reports of 9 MiB each (its frames are within the 16 MiB a message may be).
    h.send({ statuses: [status("t1", TaskState.DELIVERED, { message: "x".repeat(9 << 20) })] });
    await flush();
    h.send({ statuses: [status("t2", TaskState.DELIVERED, { message: "y".repeat(9 << 20) })] });
    await flush(20);
    // The link drops before the controller acknowledged them; the new link replays the backlog from its start.
    ctl.link.close();
    await flush();
    const again = t.connectController();
    await flush(20);
    expect(upStatuses(again.link)).toEqual(["t1:QUEUED", "t2:QUEUED", "t1:DISPATCHED", "t2:DISPATCHED", "t1:DELIVERED", "t2:DELIVERED"]);
    for (const f of again.link.sent) expect(toBinary(ProxyStreamRequestSchema, f).length).toBeLessThanOrEqual(16 << 20);
  });
});

describe("ProxyCore: draining", () => {
  it("refuses new host streams UNAVAILABLE and hands out nothing more, keeps the streams it holds, and resolves once what runs has ended and the controller has acknowledged it", async () => {
    const t = await dispatched();
    t.ctl.send({ tasks: [taskSpec("t2", "h1", { deliverByMs: t.future() })] });
    await flush();
    let drained = false;
    const draining = t.core.drain(60_000).then(() => (drained = true));
    await flush();
    const late = t.connectHost("h2", 4);
    const refused = await late.settled;
    expect(refused).toBeInstanceOf(UnavailableError);
    expect(String(refused)).toMatch(/px1 is stopping; connect to another proxy of region eu/);
    // Credits no longer hand out the queued task; it waits in the store.
    t.h.send({ credits: 4 });
    await flush();
    expect(handed(t.h.link)).toEqual(["t1"]);
    expect(t.store.getTask("t2")?.state).toBe(TaskState.QUEUED);
    // t1 is still running on a connected host: the drain waits for it.
    t.h.send({ statuses: [status("t1", TaskState.RUNNING)], output: [chunk("t1", 1)] });
    await flush();
    expect(drained).toBe(false);
    expect(t.h.link.isClosed).toBe(false);
    t.h.send({ statuses: [status("t1", TaskState.SUCCEEDED, { outputChunks: 1n })] });
    await flush();
    expect(upStatuses(t.ctl.link)).toContain("t1:SUCCEEDED");
    // Nothing runs on h1 through this proxy any more: it is let go (to fail over now), after the ack of its end.
    expect(statusAcksTo(t.h.link)).toContain("t1:SUCCEEDED");
    expect(t.h.link.isClosed).toBe(true);
    expect(t.h.link.closeError).toBeInstanceOf(UnavailableError);
    expect(drained).toBe(false);
    // Once the controller has every result, nothing is in flight.
    t.ctl.send({ outputAcks: [{ taskId: "t1", seq: 1n }], statusAcks: [{ taskId: "t1", state: TaskState.SUCCEEDED }, { taskId: "t1", state: TaskState.DISPATCHED, atProxy: true }, { taskId: "t2", state: TaskState.QUEUED, atProxy: true }] });
    await flush();
    expect(t.store.upwardSize()).toBe(0);
    expect(drained).toBe(true);
    await draining;
    t.core.stop();
  });

  it("lets a host with nothing running through it go at once, so that it fails over now, and keeps one whose task runs", async () => {
    const t = await dispatched();
    t.h.send({ statuses: [status("t1", TaskState.RUNNING)] });
    const idle = t.connectHost("h2", 4);
    await flush();
    const draining = t.core.drain(60_000);
    await flush();
    expect(idle.link.isClosed).toBe(true);
    expect(String(idle.link.closeError)).toMatch(/px1 is stopping; connect to another proxy of region eu/);
    expect(t.h.link.isClosed).toBe(false);
    t.clock.advance(60_000);
    await draining;
    t.core.stop();
  });

  it("gives up waiting after the grace: a task still running stays in the store, as after a crash", async () => {
    const t = await dispatched();
    t.h.send({ statuses: [status("t1", TaskState.RUNNING)] });
    await flush();
    await expectResolvesAfter(t.clock, t.core.drain(10_000), 10_000);
    expect(t.store.getTask("t1")?.state).toBe(TaskState.RUNNING);
    t.core.stop();
  });

  it("does not wait for results while no controller is connected: they are durable in the store", async () => {
    const t = await dispatched();
    t.h.send({ statuses: [status("t1", TaskState.SUCCEEDED)] });
    await flush();
    t.ctl.link.end();
    await t.ctl.settled;
    expect(t.store.upwardSize()).toBeGreaterThan(0);
    await t.core.drain(60_000);
    t.core.stop();
  });
});
