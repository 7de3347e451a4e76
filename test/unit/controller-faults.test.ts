import { createHash } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { silentLogger } from "../../common/logger.js";
import { Inventory } from "../../controller/inventory.js";
import { MemoryJobStore } from "../../controller/job-store.js";
import { JobManager, type ProxyPort, type SubmitRequest } from "../../controller/jobs.js";
import type { TaskRecord } from "../../controller/model.js";
import { serveProxyLink } from "../../controller/proxy-link.js";
import type { Revocations } from "../../controller/revocation.js";
import { watchJob } from "../../controller/watch.js";
import { ResultCheck } from "../../gen/rexmesh/v1/controller_pb.js";
import { ProxyStreamRequestSchema, type ProxyStreamRequest, type ProxyStreamResponse } from "../../gen/rexmesh/v1/proxy_link_pb.js";
import { SignedDenyListSchema } from "../../gen/rexmesh/v1/revocation_pb.js";
import { TaskState, type TaskSpec } from "../../gen/rexmesh/v1/task_pb.js";
import { hasChunk } from "../../controller/jobs.js";
import { FakeLink, chunk, counterIds, execStep, flush, operator, status, testSigning, text } from "./support.js";

class Port implements ProxyPort {
  readonly tasks: TaskSpec[] = [];
  readonly cancels: string[] = [];
  constructor(readonly name: string, readonly region = "eu") {}
  sendTask(spec: TaskSpec): void {
    this.tasks.push(spec);
  }
  sendCancel(taskId: string, _hostId: string, withdraw = false): void {
    this.cancels.push(`${withdraw ? "withdraw" : "cancel"}:${taskId}`);
  }
}

const req = (more: Partial<SubmitRequest> = {}): SubmitRequest => ({
  hostIds: ["h1"],
  allHosts: false,
  steps: [execStep("true")],
  env: {},
  workingDir: "",
  stdin: new Uint8Array(),
  timeoutMs: 0,
  deliveryDeadlineMs: 0,
  idempotencyKey: "",
  idempotent: false,
  ...more,
});

function setup(store: MemoryJobStore = new MemoryJobStore(), more: Partial<ConstructorParameters<typeof JobManager>[0]> = {}) {
  const clock = new ManualClock();
  const inventory = new Inventory();
  const jobs = new JobManager({ store, inventory, clock, ids: counterIds(), log: silentLogger, defaultLostAfterMs: 60_000, cancelGraceMs: 10_000, ...more });
  const px1 = new Port("px1");
  const px2 = new Port("px2");
  jobs.proxyConnected(px1);
  jobs.proxyConnected(px2);
  const at = (port: Port) => jobs.hostConnected(inventory.connected({ id: "h1", tenant: "acme" }, port.region, port.name, clock.now()));
  const away = (port: Port) => inventory.disconnected("h1", port.name, clock.now());
  at(px1);
  const state = (id: string) => store.getTask(id)!.state;
  const pass = async (ms: number) => {
    for (let left = ms; left > 0; left -= 1000) {
      clock.advance(Math.min(1000, left));
      await flush(2);
    }
  };
  return { clock, store, inventory, jobs, px1, px2, at, away, state, pass, acme: operator("acme") };
}

/** LMDB-like: a put is visible to reads only once it has committed (a turn later). */
class CommitLaterStore extends MemoryJobStore {
  override async putJob(...args: Parameters<MemoryJobStore["putJob"]>): Promise<void> {
    await new Promise((r) => setImmediate(r));
    return super.putJob(...args);
  }
}

/** A store whose next task write fails (a full disk / MDB_MAP_FULL), then works again. */
class FailOnceStore extends MemoryJobStore {
  failNext = false;
  override putTask(task: TaskRecord): Promise<void> {
    if (this.failNext) {
      this.failNext = false;
      return Promise.reject(Object.assign(new Error("MDB_MAP_FULL: Environment mapsize limit reached"), { code: "MDB_MAP_FULL" }));
    }
    return super.putTask(task);
  }
}

describe("controller under faults and a hostile proxy", () => {
  it("F1 an idempotency key retried while the first submit is committing yields ONE job", async () => {
    const t = setup(new CommitLaterStore());
    const r = req({ idempotencyKey: "deploy-42" });
    const [a, b] = await Promise.all([t.jobs.submit(t.acme, r), t.jobs.submit(t.acme, r)]);
    // Both calls passed the key check before either commit: two jobs, the host runs the command twice.
    expect(t.px1.tasks.length).toBe(1);
    expect(b.id).toBe(a.id);
  });

  it("F2 a status acknowledged after a failed write is stored (not only in memory)", async () => {
    const store = new FailOnceStore();
    const t = setup(store);
    const job = await t.jobs.submit(t.acme, req());
    const id = job.taskIds[0]!;
    await t.jobs.applyStatus(t.px1, status(id, TaskState.RUNNING, { hostId: "h1" }));
    store.failNext = true;
    // The write fails: the proxy link handler throws, the link closes, nothing is acknowledged...
    await expect(t.jobs.applyStatus(t.px1, status(id, TaskState.SUCCEEDED, { hostId: "h1", exitCode: 0 }))).rejects.toThrow();
    // ...the proxy reconnects and replays its backlog: this resolves, so serveProxyLink acks it (and the proxy marks it done)
    await t.jobs.applyStatus(t.px1, status(id, TaskState.SUCCEEDED, { hostId: "h1", exitCode: 0 }));
    await flush();
    expect(store.getTask(id)!.state).toBe(TaskState.SUCCEEDED);
    expect(store.getJob(job.id)!.finishedAt).toBeDefined();
  });

  it("F3 a task a proxy keeps QUEUED for a reachable host ends by its delivery deadline (compromised or stuck proxy)", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, req({ deliveryDeadlineMs: 60_000 }));
    const id = job.taskIds[0]!;
    await t.jobs.applyStatus(t.px1, status(id, TaskState.QUEUED, { hostId: "h1", atProxy: true }));
    // px1 holds h1's stream (heartbeats flow) but never hands the task over nor reports its expiry.
    await t.pass(3_600_000);
    expect(t.state(id)).not.toBe(TaskState.QUEUED);
  });







  it("F9 a proxy's word on when a host left it does not stop the host's tasks from ever ending LOST", async () => {
    const t = setup();
    const revocations = { current: create(SignedDenyListSchema), onChange: () => () => undefined, isRevoked: () => false } as unknown as Revocations;
    const link = new FakeLink<ProxyStreamResponse, ProxyStreamRequest>();
    const served = serveProxyLink(
      { jobs: t.jobs, inventory: t.inventory, clock: t.clock, log: silentLogger, heartbeatMs: 10_000, signer: testSigning().signer, revocations },
      link,
      { role: "proxy", scope: "eu", id: "px3" },
    ).catch((e: unknown) => e);
    const up = (init: Parameters<typeof create<typeof ProxyStreamRequestSchema>>[1]) => link.deliver(create(ProxyStreamRequestSchema, init));
    up({ hello: { name: "px3", region: "eu" } });
    await flush();
    up({ hosts: [{ hostId: "h1", tenant: "acme", connected: true }] }); // h1 really is at px3
    await flush();
    const job = await t.jobs.submit(t.acme, req());
    const id = job.taskIds[0]!;
    await flush();
    up({ statuses: [{ ...status(id, TaskState.RUNNING), hostId: "h1" }] });
    await flush();
    // px3 (compromised) says h1 left "in the year 2500", and keeps h1's stream so h1 never fails over.
    up({ hosts: [{ hostId: "h1", tenant: "acme", connected: false, since: { seconds: 16_725_225_600n, nanos: 0 } }] });
    await flush();
    for (let i = 0; i < 3600; i++) {
      t.clock.advance(1000);
      if (i % 10 === 0) up({}); // heartbeats keep the link up
      await flush(1);
    }
    expect(t.state(id)).toBe(TaskState.LOST);
    link.end();
    await served;
  });

  it("F10 a proxy cannot re-claim a host that left it by replaying the host's presence proof on the same link", async () => {
    const t = setup();
    const { createCa, issueKeyAndCertificate } = await import("../../certs/ca.js");
    const { HostKeyVerifier, HostReporter } = await import("../../common/host-signing.js");
    const { signedId } = await import("./support.js");
    const ca = createCa({ clock: t.clock });
    const h1 = { role: "host" as const, scope: "acme", id: "h1" };
    const px3 = { role: "proxy" as const, scope: "eu", id: "px3" };
    const reporter = new HostReporter(issueKeyAndCertificate(ca, { clock: t.clock, identity: h1, validityMs: 86_400_000 }), t.clock, h1);
    const revocations = { current: create(SignedDenyListSchema), onChange: () => () => undefined, isRevoked: () => false } as unknown as Revocations;
    const link = new FakeLink<ProxyStreamResponse, ProxyStreamRequest>();
    const served = serveProxyLink(
      { jobs: t.jobs, inventory: t.inventory, clock: t.clock, log: silentLogger, heartbeatMs: 10_000, signer: testSigning().signer, revocations, hostKeys: new HostKeyVerifier(ca.certPem, t.clock) },
      link,
      px3,
    ).catch((e: unknown) => e);
    const up = (init: Parameters<typeof create<typeof ProxyStreamRequestSchema>>[1]) => link.deliver(create(ProxyStreamRequestSchema, init));
    up({ hello: { name: "px3", region: "eu" } });
    await flush();
    const nonce = link.sent.find((f) => f.welcome)!.welcome!.presenceNonce;
    const proved = reporter.prove(nonce, px3);
    const presence = { hostId: "h1", tenant: "acme", connected: true, reportKey: reporter.key, proof: proved.proof, proofSalt: proved.salt };
    up({ hosts: [presence] }); // h1 genuinely connects to px3 and proves it
    await flush();
    expect(t.inventory.get("h1")!.proxy).toBe("px3");
    t.clock.advance(1000);
    t.at(t.px1); // h1 fails over to px1 (px1's own valid proof)
    t.clock.advance(1000);
    up({ hosts: [presence] }); // px3 (compromised) sends the proof it saw again, on the same link
    await flush();
    const job = await t.jobs.submit(t.acme, req({ env: { SECRET: "s3cr3t" } }));
    await flush();
    const toPx3 = link.sent.flatMap((f) => f.tasks.map(signedId));
    expect(toPx3).not.toContain(job.taskIds[0]); // fails: the new task (env SECRET) goes to px3
    expect(t.inventory.get("h1")!.proxy).toBe("px1");
    link.end();
    await served;
  });
});
