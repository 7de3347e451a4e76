/**
 * Attacks on statuses in runs (common/status-runs.ts): what a proxy holding a
 * valid certificate, or a host behind an honest proxy, can make of them that
 * it could not with whole statuses.
 */
import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { silentLogger } from "../../common/logger.js";
import { Inventory } from "../../controller/inventory.js";
import { MemoryJobStore } from "../../controller/job-store.js";
import { JobManager } from "../../controller/jobs.js";
import { serveProxyLink } from "../../controller/proxy-link.js";
import type { Revocations } from "../../controller/revocation.js";
import { ProxyStreamRequestSchema, type ProxyStreamRequest, type ProxyStreamResponse } from "../../gen/rexmesh/v1/proxy_link_pb.js";
import { SignedDenyListSchema } from "../../gen/rexmesh/v1/revocation_pb.js";
import { TaskState, TaskStatusSchema } from "../../gen/rexmesh/v1/task_pb.js";
import { StatusRunBuilder, statusesOfRuns } from "../../common/status-runs.js";
import { counterIds, FakeLink, flush, operator, submitRequest, taskSpec, testSigning } from "./support.js";
import { proxyHarness, upStatuses } from "./proxy-harness.js";
import { MemoryProxyStore } from "../../proxy/store.js";

/** A real controller link handler with n hosts held by proxy px1 (presence on its word: no host keys). */
async function controllerWithHosts(n: number, features = ["status-runs"]) {
  const clock = new ManualClock();
  const inventory = new Inventory();
  const store = new MemoryJobStore();
  const jobs = new JobManager({ store, inventory, clock, ids: counterIds(), log: silentLogger, defaultLostAfterMs: 3_600_000 });
  jobs.start();
  const revocations = { current: create(SignedDenyListSchema), onChange: () => () => undefined, isRevoked: () => false } as unknown as Revocations;
  /** Another proxy's link to the same controller, holding `hosts`. */
  const connect = (name: string, region: string, hosts: string[]) => {
    const link = new FakeLink<ProxyStreamResponse, ProxyStreamRequest>();
    const served = serveProxyLink({ jobs, inventory, clock, log: silentLogger, heartbeatMs: 10_000, signer: testSigning().signer, revocations }, link, { role: "proxy", scope: region, id: name }).catch((e: unknown) => e);
    link.deliver(create(ProxyStreamRequestSchema, { hello: { name, region, heartbeatMs: 10_000, features, hosts: hosts.map((hostId) => ({ hostId, tenant: "acme", connected: true })) } }));
    return { link, served };
  };
  const hostIds = Array.from({ length: n }, (_, i) => `h${i}`);
  const { link, served } = connect("px1", "eu", hostIds);
  await flush();
  const job = await jobs.submit(operator("acme"), submitRequest({ hostIds }));
  await flush();
  return { jobs, store, link, served, job, hostIds, connect, stop: () => jobs.stop?.() };
}

describe("status runs against a proxy with a valid certificate", () => {
  it("a run cannot make the controller store more text than the frame could carry as whole statuses", async () => {
    const c = await controllerWithHosts(64);
    // 64 tasks the proxy holds, one frame of ~512 KiB: as whole statuses the same reports would be 32 MiB, twice what a message may be.
    const message = "x".repeat(512 * 1024);
    c.link.deliver(create(ProxyStreamRequestSchema, { statusRuns: [{ state: TaskState.DELIVERED, message, taskIds: c.job.taskIds, hostIds: c.hostIds }] }));
    await flush(20);
    const stored = c.job.taskIds.map((id) => c.store.getTask(id)!);
    const bytes = stored.reduce((n, t) => n + t.message.length, 0);
    expect(bytes).toBeLessThanOrEqual(16 * 1024 * 1024);
    c.link.close();
    await c.served;
  });
});

describe("status runs from a proxy that does not hold the tasks", () => {
  // As with whole statuses: one from the hosts' region is held back (not acknowledged: it may come to hold them after a
  // failover), one from another region is dropped (acknowledged, so that it is not sent forever).
  for (const [who, name, region, acked] of [
    ["another proxy of the hosts' region", "px2", "eu", false],
    ["a proxy of another region", "px9", "us", true],
  ] as const) {
    it(`${who} cannot end them with a run: nothing changes (${acked ? "dropped" : "held back"})`, async () => {
      const c = await controllerWithHosts(4);
      const rogue = c.connect(name, region, []);
      await flush();
      rogue.link.deliver(create(ProxyStreamRequestSchema, { statusRuns: [{ state: TaskState.SUCCEEDED, exitCode: 0, message: "done, trust me", taskIds: c.job.taskIds, hostIds: c.hostIds }] }));
      await flush(20);
      for (const id of c.job.taskIds) expect(c.store.getTask(id)!.state).toBe(TaskState.PENDING);
      expect(rogue.link.sent.flatMap((f) => [...f.statusAcks.map((a) => a.taskId), ...f.statusAckRuns.flatMap((r) => r.taskIds)])).toEqual(acked ? c.job.taskIds : []);
      // The proxy that holds them still can.
      c.link.deliver(create(ProxyStreamRequestSchema, { statusRuns: [{ state: TaskState.QUEUED, atProxy: true, taskIds: c.job.taskIds, hostIds: c.hostIds }] }));
      await flush(20);
      for (const id of c.job.taskIds) expect(c.store.getTask(id)!.state).toBe(TaskState.QUEUED);
      rogue.link.close();
      c.link.close();
      await Promise.all([rogue.served, c.served]);
    });
  }
});

describe("status runs: what a host says stays its own", () => {
  it("a status whose signal and message split the same text differently keeps its own signal and message", () => {
    const b = new StatusRunBuilder();
    // A compromised host's unsigned end (a daemon without a report key), crafted to fall into the run of another host's report.
    b.add(create(TaskStatusSchema, { taskId: "evil", hostId: "h1", state: TaskState.FAILED, exitCode: 1, signal: "SIGTERM\0it was", message: "fine" }));
    b.add(create(TaskStatusSchema, { taskId: "victim", hostId: "h2", state: TaskState.FAILED, exitCode: 1, signal: "SIGTERM", message: "it was\0fine" }));
    const out = [...statusesOfRuns(b.runs), ...b.statuses];
    const victim = out.find((s) => s.taskId === "victim")!;
    expect([victim.signal, victim.message]).toEqual(["SIGTERM", "it was\0fine"]);
  });

  it("a status with fields this release does not know (a newer daemon's) is relayed whole, with them", () => {
    const b = new StatusRunBuilder();
    const s = create(TaskStatusSchema, { taskId: "t1", hostId: "h1", state: TaskState.RUNNING });
    // Field 15, varint 1: what a later TaskStatus field would look like to this release.
    s.$unknown = [{ no: 15, wireType: 0, data: new Uint8Array([0x78, 0x01]) }];
    b.add(s);
    const out = [...statusesOfRuns(b.runs), ...b.statuses];
    expect(out[0]!.$unknown).toEqual(s.$unknown);
  });
});

describe("status runs: an honest proxy's runs are never refused", () => {
  it("statuses whose text would take a frame's runs past the bound go whole, in each task's order", () => {
    const b = new StatusRunBuilder();
    const long = "m".repeat(300 * 1024);
    for (let i = 0; i < 40; i++) b.add(create(TaskStatusSchema, { taskId: `t${i}`, hostId: `h${i}`, state: TaskState.FAILED, exitCode: 1, message: long }));
    for (let i = 0; i < 40; i++) b.add(create(TaskStatusSchema, { taskId: `t${i}`, hostId: `h${i}`, state: TaskState.CANCELLED, atProxy: true }));
    let refused = 0;
    const out = [...statusesOfRuns(b.runs, () => refused++), ...b.statuses];
    expect(refused).toBe(0);
    expect(out.length).toBe(80);
    expect(b.statuses.length).toBeGreaterThan(0);
    for (let i = 0; i < 40; i++) expect(out.filter((s) => s.taskId === `t${i}`).map((s) => TaskState[s.state])).toEqual(["FAILED", "CANCELLED"]);
  });
});

describe("status runs between releases", () => {
  const statusesOf = (f: ProxyStreamRequest) => f.statuses.length;
  for (const [who, features, runs] of [
    ["an older controller (no feature in its welcome)", [] as string[], false],
    ["a controller that takes runs", ["status-runs"], true],
  ] as const) {
    it(`a proxy sends ${runs ? "runs" : "whole statuses only"} to ${who}`, async () => {
      const t = proxyHarness(new MemoryProxyStore());
      const ctl = t.connectController();
      ctl.send({ welcome: { heartbeatMs: 10_000, presenceNonce: new Uint8Array(16), features: [...features] } });
      ctl.send({ tasks: ["t1", "t2"].map((id) => taskSpec(id, "h1", { deliverByMs: t.future() })) });
      await flush();
      expect(upStatuses(ctl.link)).toEqual(["t1:QUEUED", "t2:QUEUED"]);
      const frames = ctl.link.sent.filter((f) => f.statusRuns.length > 0 || f.statuses.length > 0);
      if (runs) expect(frames.flatMap((f) => f.statusRuns.map((r) => r.taskIds.length))).toEqual([2]);
      else {
        expect(frames.every((f) => f.statusRuns.length === 0)).toBe(true);
        expect(frames.map(statusesOf).reduce((a, b) => a + b, 0)).toBe(2);
      }
      t.core.stop();
    });
  }

  for (const [who, features, runs] of [
    ["an older proxy (no feature in its hello)", [] as string[], false],
    ["a proxy that takes runs", ["status-runs"], true],
  ] as const) {
    it(`a controller acknowledges ${runs ? "in runs" : "one by one"} to ${who}`, async () => {
      const c = await controllerWithHosts(3, [...features]);
      c.link.deliver(create(ProxyStreamRequestSchema, { statuses: c.job.taskIds.map((taskId, i) => create(TaskStatusSchema, { taskId, hostId: c.hostIds[i], state: TaskState.QUEUED, atProxy: true })) }));
      await flush(20);
      const acks = c.link.sent.flatMap((f) => f.statusAcks.map((a) => a.taskId));
      const ackRuns = c.link.sent.flatMap((f) => f.statusAckRuns.flatMap((r) => r.taskIds));
      expect(runs ? ackRuns : acks).toEqual(c.job.taskIds);
      expect(runs ? acks : ackRuns).toEqual([]);
      expect(c.link.sent[0]?.welcome?.features).toEqual(["status-runs"]);
      c.link.close();
      await c.served;
    });
  }
});

describe("what the controller sends back", () => {
  it("acknowledges a run in one frame, and answers a frame with nothing to acknowledge with no frame at all", async () => {
    const c = await controllerWithHosts(3);
    const before = c.link.sent.length;
    c.link.deliver(create(ProxyStreamRequestSchema, { load: { queuedTasks: 5 } }));
    c.link.deliver(create(ProxyStreamRequestSchema, {}));
    await flush(20);
    expect(c.link.sent.slice(before)).toEqual([]);
    c.link.deliver(create(ProxyStreamRequestSchema, { statusRuns: [{ state: TaskState.QUEUED, atProxy: true, taskIds: c.job.taskIds, hostIds: c.hostIds }] }));
    await flush(20);
    const after = c.link.sent.slice(before);
    expect(after).toHaveLength(1);
    expect(after[0]!.statusAckRuns.flatMap((r) => r.taskIds)).toEqual(c.job.taskIds);
    c.link.close();
    await c.served;
  });
});
