import { createHash } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { silentLogger } from "../../common/logger.js";
import { Inventory } from "../../controller/inventory.js";
import { MemoryJobStore } from "../../controller/job-store.js";
import { JobManager, outputComplete } from "../../controller/jobs.js";
import { LmdbJobStore } from "../../controller/lmdb-job-store.js";
import { LmdbEnv } from "../../common/lmdb.js";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { hasChunk } from "../../controller/output-ranges.js";
import type { TaskRecord } from "../../controller/model.js";
import { serveProxyLink } from "../../controller/proxy-link.js";
import type { Revocations } from "../../controller/revocation.js";
import { watchJob } from "../../controller/watch.js";
import { ResultCheck } from "../../gen/rexmesh/v1/controller_pb.js";
import { ProxyStreamRequestSchema, type ProxyStreamRequest, type ProxyStreamResponse } from "../../gen/rexmesh/v1/proxy_link_pb.js";
import { SignedDenyListSchema } from "../../gen/rexmesh/v1/revocation_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { chunk, counterIds, eventually, FakeLink, flush, operator, RecordingPort, status, submitRequest, testSigning, text } from "./support.js";


function setup(store: MemoryJobStore = new MemoryJobStore(), more: Partial<ConstructorParameters<typeof JobManager>[0]> = {}) {
  const clock = new ManualClock();
  const inventory = new Inventory();
  const jobs = new JobManager({ store, inventory, clock, ids: counterIds(), log: silentLogger, defaultLostAfterMs: 60_000, cancelGraceMs: 10_000, ...more });
  jobs.start();
  const px1 = new RecordingPort("px1");
  const px2 = new RecordingPort("px2");
  jobs.proxyConnected(px1);
  jobs.proxyConnected(px2);
  const at = (port: RecordingPort) => jobs.hostConnected(inventory.connected({ id: "h1", tenant: "acme" }, port.region, port.name, clock.now()));
  const away = (port: RecordingPort) => inventory.disconnected("h1", port.name, clock.now());
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

/** LMDB-like: writes commit in the order issued, a few turns after the call; the next append can be made to fail (a full disk). */
class SlowAppendStore extends MemoryJobStore {
  failNext = false;
  private last: Promise<unknown> = Promise.resolve();
  private inOrder<T>(write: () => Promise<T>, fail = false): Promise<T> {
    const p = this.last.then(() => flush(3)).then(() => (fail ? Promise.reject(Object.assign(new Error("MDB_MAP_FULL: Environment mapsize limit reached"), { code: "MDB_MAP_FULL" })) : write()));
    this.last = p.catch(() => undefined);
    return p;
  }
  override appendOutput(...args: Parameters<MemoryJobStore["appendOutput"]>): Promise<void> {
    const fail = this.failNext;
    this.failNext = false;
    return this.inOrder(() => super.appendOutput(...args), fail);
  }
  override putTask(task: TaskRecord): Promise<void> {
    return this.inOrder(() => super.putTask(task));
  }
}

describe("controller under faults and a hostile proxy", () => {
  it("F1 an idempotency key retried while the first submit is committing yields ONE job", async () => {
    const t = setup(new CommitLaterStore());
    const r = submitRequest({ idempotencyKey: "deploy-42" });
    const [a, b] = await Promise.all([t.jobs.submit(t.acme, r), t.jobs.submit(t.acme, r)]);
    // Both calls passed the key check before either commit: two jobs, the host runs the command twice.
    expect(t.px1.tasks.length).toBe(1);
    expect(b.id).toBe(a.id);
  });

  it("F2 a status acknowledged after a failed write is stored (not only in memory)", async () => {
    const store = new FailOnceStore();
    const t = setup(store);
    const job = await t.jobs.submit(t.acme, submitRequest());
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

  it("F2b a chunk whose write failed while a later chunk's write was queued is taken again on resend and read by a watcher", async () => {
    const store = new SlowAppendStore();
    const t = setup(store);
    const job = await t.jobs.submit(t.acme, submitRequest());
    const id = job.taskIds[0]!;
    const ac = new AbortController();
    let seen = "";
    const watching = (async () => {
      for await (const b of watchJob(t.jobs, t.store.getJob(job.id)!, { noOutput: false, signal: ac.signal })) {
        for (const c of b.output) seen += text(c.data);
        if (b.job?.finishedAt !== undefined) break;
      }
    })();
    store.failNext = true;
    const one = t.jobs.applyOutput(t.px1, chunk(id, 1, "one\n"));
    const two = t.jobs.applyOutput(t.px1, chunk(id, 2, "two\n"));
    await expect(one).rejects.toThrow();
    await two;
    await flush(10);
    expect(hasChunk(store.getTask(id)!, 1)).toBe(false); // the store no longer counts what it does not hold
    // The proxy was not acknowledged chunk 1 and sends it again.
    await t.jobs.applyOutput(t.px1, chunk(id, 1, "one\n"));
    await t.jobs.applyStatus(t.px1, status(id, TaskState.SUCCEEDED, { hostId: "h1", exitCode: 0, outputChunks: 2n }));
    await watching;
    ac.abort();
    expect(store.getTask(id)!.outputChunks).toBe(2);
    expect(store.readOutput(id, 1, 1 << 20).map((c) => text(c.data))).toEqual(["one\n", "two\n"]);
    expect(seen).toBe("one\ntwo\n");
  });

  it("F3 a task a proxy keeps QUEUED for a reachable host ends by its delivery deadline (compromised or stuck proxy)", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, submitRequest({ deliveryDeadlineMs: 60_000 }));
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
    const job = await t.jobs.submit(t.acme, submitRequest());
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
    const { HostKeyVerifier, HostReporter } = await import("../../common/host-signing.js");
    const { signedId } = await import("./support.js");
    const { testCa, testCredentials } = await import("../test-ca.js");
    const ca = testCa();
    const h1 = { role: "host" as const, scope: "acme", id: "h1" };
    const px3 = { role: "proxy" as const, scope: "eu", id: "px3" };
    const reporter = new HostReporter(testCredentials(h1, { clock: t.clock, validityMs: 86_400_000 }), t.clock, h1);
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
    const job = await t.jobs.submit(t.acme, submitRequest({ env: { SECRET: "s3cr3t" } }));
    await flush();
    const toPx3 = link.sent.flatMap((f) => f.tasks.map(signedId));
    expect(toPx3).not.toContain(job.taskIds[0]); // fails: the new task (env SECRET) goes to px3
    expect(t.inventory.get("h1")!.proxy).toBe("px1");
    link.end();
    await served;
  });
  it("F4 a host's signed end that a proxy collected while cut off is taken after the host left that proxy; an unsigned one stays held back", async () => {
    const t = setup(new MemoryJobStore(), { checkEnd: (s) => (s.signature[0] === 1 ? "ok" : "bad") });
    const job = await t.jobs.submit(t.acme, submitRequest());
    const id = job.taskIds[0]!;
    await t.jobs.applyStatus(t.px1, status(id, TaskState.RUNNING, { hostId: "h1" }));
    // px1 died; h1 failed over to px2 while px2's controller link was down; px2 took on the task,
    // stored its end and acked the host. h1 then went back to px1. px2's link returns: no presence of h1.
    t.at(t.px1);
    const forged = status(id, TaskState.SUCCEEDED, { hostId: "h1", exitCode: 0, keyId: "k", signature: new Uint8Array([2]) });
    expect(t.jobs.holdsBack(t.px2, id, "h1", forged)).toBe(true);
    await t.jobs.applyStatus(t.px2, forged);
    expect(t.state(id)).toBe(TaskState.RUNNING);
    const signed = status(id, TaskState.FAILED, { hostId: "h1", exitCode: 3, keyId: "k", signature: new Uint8Array([1]) });
    // The signature vouches for the end only through a proxy of the host's region, and only for that host.
    const elsewhere = new RecordingPort("px-us", "us");
    t.jobs.proxyConnected(elsewhere);
    await t.jobs.applyStatus(elsewhere, signed);
    await t.jobs.applyStatus(t.px2, { ...signed, hostId: "h2" });
    expect(t.state(id)).toBe(TaskState.RUNNING);
    expect(t.jobs.holdsBack(t.px2, id, "h1", signed)).toBe(false);
    expect(t.jobs.holdsBack(t.px2, id, "h1")).toBe(true); // output is still held back: nothing vouches for it
    await t.jobs.applyStatus(t.px2, signed);
    expect(t.state(id)).toBe(TaskState.FAILED);
    expect(t.store.getTask(id)!.exitCode).toBe(3);
  });
  it("F5 a host that returns through another proxy is told of a cancel the controller decided while it was away", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, submitRequest());
    const id = job.taskIds[0]!;
    await t.jobs.applyStatus(t.px1, status(id, TaskState.RUNNING, { hostId: "h1" }));
    t.away(t.px1);
    await t.jobs.cancel(t.acme, job.id);
    expect(t.state(id)).toBe(TaskState.CANCELLED); // message: "...; it is told when it returns"
    t.at(t.px2); // it returns, through px2 (px1 is gone for good)
    await flush();
    expect(t.px2.cancels).toContain(`cancel:${id}`);
    // The host's own end, through px2, settles what px1 was owed too.
    await t.jobs.applyStatus(t.px2, status(id, TaskState.CANCELLED, { hostId: "h1" }));
    await flush();
    expect(t.store.recallsFor("px1")).toEqual([]);
  });

  it("F5c a restarted controller still tells a host that returns through another proxy of a cancel decided before the restart", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, submitRequest());
    const id = job.taskIds[0]!;
    await t.jobs.applyStatus(t.px1, status(id, TaskState.RUNNING, { hostId: "h1" }));
    t.away(t.px1);
    await t.jobs.cancel(t.acme, job.id);
    t.jobs.stop();
    // A new controller process on the same store (and inventory) indexes the stored recalls.
    const jobs = new JobManager({ store: t.store, inventory: t.inventory, clock: t.clock, ids: counterIds(), log: silentLogger, defaultLostAfterMs: 60_000, cancelGraceMs: 10_000 });
    jobs.start();
    const px2 = new RecordingPort("px2");
    jobs.proxyConnected(px2);
    jobs.hostConnected(t.inventory.connected({ id: "h1", tenant: "acme" }, "eu", "px2", t.clock.now()));
    await flush();
    expect(px2.cancels).toContain(`cancel:${id}`);
    jobs.stop();
  });
  it("F6 output a proxy appends after the signed end never reaches a client, and output relayed beyond it before the end marks the task MISMATCH", async () => {
    const t = setup(new MemoryJobStore(), { checkEnd: () => "ok" });
    const job = await t.jobs.submit(t.acme, submitRequest());
    const id = job.taskIds[0]!;
    const real = "real output\n";
    await t.jobs.applyOutput(t.px1, chunk(id, 1, real));
    await t.jobs.applyStatus(
      t.px1,
      status(id, TaskState.SUCCEEDED, {
        hostId: "h1",
        exitCode: 0,
        outputChunks: 1n,
        outputBytes: BigInt(real.length),
        outputSha256: createHash("sha256").update(real).digest(),
        keyId: "k",
        signature: new Uint8Array([1]),
      }),
    );
    await t.jobs.applyOutput(t.px1, chunk(id, 2, "FORGED by the relay\n"));
    await flush(10);
    const ac = new AbortController();
    let seen = "";
    for await (const b of watchJob(t.jobs, t.store.getJob(job.id)!, { noOutput: false, signal: ac.signal })) {
      for (const c of b.output) seen += text(c.data);
      if (b.job?.finishedAt !== undefined) break;
    }
    expect(seen).toBe(real);
    expect(t.store.getTask(id)!.resultCheck).toBe(ResultCheck.VERIFIED);
    // The same forgery sent before the end: a live reader may have read it, so the task cannot say VERIFIED.
    const job2 = await t.jobs.submit(t.acme, submitRequest());
    const id2 = job2.taskIds[0]!;
    await t.jobs.applyOutput(t.px1, chunk(id2, 1, real));
    await t.jobs.applyOutput(t.px1, chunk(id2, 2, "FORGED by the relay\n"));
    await t.jobs.applyStatus(
      t.px1,
      status(id2, TaskState.SUCCEEDED, { hostId: "h1", exitCode: 0, outputChunks: 1n, outputBytes: BigInt(real.length), outputSha256: createHash("sha256").update(real).digest(), keyId: "k", signature: new Uint8Array([1]) }),
    );
    await flush(10);
    expect(t.store.getTask(id2)!.resultCheck).toBe(ResultCheck.MISMATCH);
  });
  it("F7 the controller never acknowledges (cumulatively) output chunks it held back", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, submitRequest());
    const id = job.taskIds[0]!;
    await t.jobs.applyStatus(t.px1, status(id, TaskState.RUNNING, { hostId: "h1" }));
    const revocations = { current: create(SignedDenyListSchema), onChange: () => () => undefined, isRevoked: () => false } as unknown as Revocations;
    const link = new FakeLink<ProxyStreamResponse, ProxyStreamRequest>();
    const served = serveProxyLink(
      { jobs: t.jobs, inventory: t.inventory, clock: t.clock, log: silentLogger, heartbeatMs: 10_000, signer: testSigning().signer, revocations },
      link,
      { role: "proxy", scope: "eu", id: "px2" },
    ).catch((e: unknown) => e);
    const up = (init: Parameters<typeof create<typeof ProxyStreamRequestSchema>>[1]) => link.deliver(create(ProxyStreamRequestSchema, init));
    up({ hello: { name: "px2", region: "eu" } });
    await flush();
    // px2's backlog replay starts before h1 proved its presence on this link: chunk 1 is held back.
    up({ output: [{ ...chunk(id, 1, "one"), hostId: "h1" }] });
    await flush();
    // h1's proof arrives (on the proxy's word here: no hostKeys), then the next backlog frame.
    up({ hosts: [{ hostId: "h1", tenant: "acme", connected: true }] });
    await flush();
    up({ output: [{ ...chunk(id, 2, "two"), hostId: "h1" }] });
    await flush();
    const acks = link.sent.flatMap((f) => f.outputAcks.map((a) => [a.taskId, Number(a.seq)] as const));
    const highest = Math.max(0, ...acks.filter(([tid]) => tid === id).map(([, s]) => s));
    // OutputAck means "every chunk up to and including seq": the proxy drops chunk 1 on this ack.
    const task = t.store.getTask(id)!;
    for (let s = 1; s <= highest; s++) expect(hasChunk(task, s)).toBe(true);
    link.end();
    await served;
  });
  it("F5b a cancel reaches a running task whose host failed over to a proxy that never reported on it", async () => {
    const t = setup();
    const job = await t.jobs.submit(t.acme, submitRequest());
    const id = job.taskIds[0]!;
    await t.jobs.applyStatus(t.px1, status(id, TaskState.RUNNING, { hostId: "h1" }));
    // h1 fails over to px2; its RUNNING was acked by px1 and the task prints nothing: px2 has nothing to report.
    t.at(t.px2);
    await t.jobs.cancel(t.acme, job.id);
    expect(t.px2.cancels).toContain(`cancel:${id}`); // only px1 (where h1 no longer is) is told
  });
  it("F8 an INTERRUPTED end after a failover does not say the output is complete while chunks below the highest are missing", async () => {
    const t = setup(new MemoryJobStore(), { checkEnd: () => "ok" });
    const job = await t.jobs.submit(t.acme, submitRequest());
    const id = job.taskIds[0]!;
    // chunks 1..2 went through px1 (away, not passed on yet); 3..4 arrive through px2, then the daemon's
    // INTERRUPTED end (after a daemon crash: outputChunks 0, no digest).
    t.at(t.px2);
    await t.jobs.applyOutput(t.px2, chunk(id, 3, "three"));
    await t.jobs.applyOutput(t.px2, chunk(id, 4, "four"));
    await t.jobs.applyStatus(t.px2, status(id, TaskState.INTERRUPTED, { hostId: "h1", outputChunks: 0n, keyId: "k", signature: new Uint8Array([1]) }));
    const task = t.store.getTask(id)!;
    expect(outputComplete(task)).toBe(false);
    // Signed, but over no output digest: the state is the host's, the output is unchecked (not VERIFIED).
    expect(task.resultCheck).toBe(ResultCheck.STATE_ONLY);
  });
});

describe("controller killed between a task's end and its output check", () => {
  /** A store on LMDB that stops taking writes at some point (the process died): later writes never land. */
  class DyingStore extends LmdbJobStore {
    dead = false;
    readonly jobWrites: { finished: boolean; checks: (ResultCheck | undefined)[] }[] = [];
    override putTask(task: TaskRecord): Promise<void> {
      return this.dead ? new Promise(() => undefined) : super.putTask(task);
    }
    override putJob(...args: Parameters<LmdbJobStore["putJob"]>): Promise<void> {
      if (this.dead) return new Promise(() => undefined);
      const [job] = args;
      if (job.finishedAt !== undefined) this.jobWrites.push({ finished: true, checks: job.taskIds.map((id) => this.getTask(id)?.resultCheck) });
      return super.putJob(...args);
    }
  }
  const dyingStore = () => new DyingStore(new LmdbEnv({ path: mkdtempSync(join(tmpdir(), "rexmesh-dying-")), maxBytes: 16 << 20 }));
  const real = "all of it\n";
  const signedEnd = (id: string) =>
    status(id, TaskState.SUCCEEDED, { hostId: "h1", exitCode: 0, outputChunks: 1n, outputBytes: BigInt(real.length), outputSha256: createHash("sha256").update(real).digest(), keyId: "k", signature: new Uint8Array([1]) });

  /** A one-task job whose host sent all of its output, then its signed end; `die`: the store takes no write after the end's. */
  const ended = async (store: DyingStore, die = false) => {
    const t = setup(store as unknown as MemoryJobStore, { checkEnd: () => "ok" });
    const job = await t.jobs.submit(t.acme, submitRequest());
    const id = job.taskIds[0]!;
    await t.jobs.applyOutput(t.px1, chunk(id, 1, real));
    await t.jobs.applyStatus(t.px1, signedEnd(id));
    store.dead = die;
    return { t, job, id };
  };

  it("a job is stored finished only once its tasks' checks are stored", async () => {
    const store = dyingStore();
    const { t, job, id } = await ended(store);
    await eventually(() => store.getJob(job.id)?.finishedAt !== undefined);
    expect(store.getTask(id)!.resultCheck).toBe(ResultCheck.VERIFIED);
    expect(store.jobWrites).toEqual([{ finished: true, checks: [ResultCheck.VERIFIED] }]);
    t.jobs.stop();
  });

  it("a restarted controller checks an ended task whose check never landed, then finishes its job", async () => {
    const store = dyingStore();
    // The end is stored; the process dies before the check's write (and the job's) land.
    const { t, job, id } = await ended(store, true);
    await new Promise((r) => setTimeout(r, 50));
    t.jobs.stop();
    expect(store.getTask(id)!.resultCheck).toBe(ResultCheck.OUTPUT_PENDING);
    expect(store.getJob(job.id)!.finishedAt).toBeUndefined();
    store.dead = false;
    const again = new JobManager({ store, inventory: t.inventory, clock: t.clock, ids: counterIds(), log: silentLogger, defaultLostAfterMs: 60_000, cancelGraceMs: 10_000, checkEnd: () => "ok" });
    again.start();
    await eventually(() => store.getJob(job.id)?.finishedAt !== undefined);
    expect(store.getTask(id)!.resultCheck).toBe(ResultCheck.VERIFIED);
    expect(store.getJob(job.id)!.finishedAt).toBeDefined();
    again.stop();
  });
});
