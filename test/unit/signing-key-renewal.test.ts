/**
 * The controller's task-signing key is renewed at half its lifetime
 * (TaskSigner.renewIfDue), and the new key reaches every connected proxy
 * in the frame that carries the first tasks signed with it: a controller
 * that runs longer than a key lives is not refused by its daemons.
 */
import { create } from "@bufbuild/protobuf";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { LmdbEnv } from "../../common/lmdb.js";
import { silentLogger } from "../../common/logger.js";
import { TASK_KEY_LIFETIME_MS, TaskRejected, TaskSigner, TaskVerifier } from "../../common/task-signing.js";
import { Inventory } from "../../controller/inventory.js";
import { MemoryJobStore } from "../../controller/job-store.js";
import { JobManager } from "../../controller/jobs.js";
import { serveProxyLink } from "../../controller/proxy-link.js";
import type { Revocations } from "../../controller/revocation.js";
import { AgentStreamRequestSchema, type AgentStreamRequest, type AgentStreamResponse } from "../../gen/rexmesh/v1/agent_link_pb.js";
import { ProxyStreamRequestSchema, type ProxyStreamRequest, type ProxyStreamResponse } from "../../gen/rexmesh/v1/proxy_link_pb.js";
import { SignedDenyListSchema } from "../../gen/rexmesh/v1/revocation_pb.js";
import { LmdbProxyStore } from "../../proxy/lmdb-store.js";
import { ProxyCore } from "../../proxy/proxy.js";
import { testCa, testCredentials } from "../test-ca.js";
import { counterIds, eventually, execStep, FakeLink, flush, hostPeer, operator, submitRequest, taskSpec } from "./support.js";

const DAY = 86_400_000;

function controllerSigner(clock: ManualClock): TaskSigner {
  const creds = testCredentials({ role: "controller", scope: "mesh", id: "ctl" }, { clock, validityMs: 365 * DAY });
  return new TaskSigner(creds, clock, TASK_KEY_LIFETIME_MS);
}

describe("the task-signing key, renewed while the controller runs", () => {
  it("is replaced at half its lifetime; what the old key signed verifies until that key expires, and only the new key's tasks after", () => {
    const clock = new ManualClock(Date.UTC(2026, 0, 1));
    const signer = controllerSigner(clock);
    const daemon = new TaskVerifier(testCa().certPem, clock);
    const first = signer.key;
    daemon.addKeys([first]);
    const old = signer.sign(taskSpec("t1", "h1", { steps: [execStep("true")] }));

    clock.advance(TASK_KEY_LIFETIME_MS / 2 - DAY);
    expect(signer.renewIfDue()).toBe(false);
    expect(signer.key).toBe(first);

    const seen: string[] = [];
    const stop = signer.onRenew((key) => seen.push(key.keyId));
    clock.advance(2 * DAY);
    expect(signer.renewIfDue()).toBe(true);
    stop();
    const second = signer.key;
    expect(second.keyId).not.toBe(first.keyId);
    expect(seen).toEqual([second.keyId]);
    const fresh = signer.sign(taskSpec("t2", "h1", { steps: [execStep("true")] }));
    expect(fresh.keyId).toBe(second.keyId);

    // A daemon that has not been given the new key refuses its tasks: the key must travel (below).
    expect(() => daemon.verify(fresh)).toThrow(TaskRejected);
    daemon.addKeys([second]);
    expect(daemon.verify(fresh).taskId).toBe("t2");
    expect(daemon.verify(old).taskId).toBe("t1");

    // Past the first key's end, what it signed is refused; the renewed key still holds, and is renewed in turn.
    clock.advance(TASK_KEY_LIFETIME_MS / 2);
    expect(() => daemon.verify(old)).toThrow(TaskRejected);
    expect(daemon.verify(fresh).taskId).toBe("t2");
    expect(signer.renewIfDue()).toBe(true);
    expect(signer.key.keyId).not.toBe(second.keyId);
  });

  it("goes to a connected proxy with the first tasks signed with it", async () => {
    const clock = new ManualClock(Date.UTC(2026, 0, 1));
    // The signer's own clock: moving the link's on by half a key lifetime would fire its heartbeats and end it.
    const signerClock = new ManualClock(Date.UTC(2026, 0, 1));
    const signer = controllerSigner(signerClock);
    const inventory = new Inventory();
    const jobs = new JobManager({ store: new MemoryJobStore(), inventory, clock, ids: counterIds(), log: silentLogger, defaultLostAfterMs: 3_600_000 });
    jobs.start();
    const revocations = { current: create(SignedDenyListSchema), onChange: () => () => undefined, isRevoked: () => false } as unknown as Revocations;
    const link = new FakeLink<ProxyStreamResponse, ProxyStreamRequest>();
    const served = serveProxyLink({ jobs, inventory, clock, log: silentLogger, heartbeatMs: 10_000, signer, revocations }, link, { role: "proxy", scope: "eu", id: "px1" }).catch((e: unknown) => e);
    link.deliver(create(ProxyStreamRequestSchema, { hello: { name: "px1", region: "eu", heartbeatMs: 10_000, hosts: [{ hostId: "h1", tenant: "acme", connected: true }] } }));
    await flush();
    const first = signer.key.keyId;
    expect(link.sent.flatMap((f) => f.signingKeys.map((k) => k.keyId))).toEqual([first]);

    signerClock.advance(TASK_KEY_LIFETIME_MS / 2 + 1);
    expect(signer.renewIfDue()).toBe(true);
    const before = link.sent.length;
    await jobs.submit(operator("acme"), submitRequest({ hostIds: ["h1"], steps: [execStep("true")] }));
    await flush(10);
    const after = link.sent.slice(before);
    const withTasks = after.find((f) => f.tasks.length > 0)!;
    expect(withTasks.tasks.map((t) => t.keyId)).toEqual([signer.key.keyId]);
    // The key came before or with those tasks, and only the new one.
    const upTo = after.slice(0, after.indexOf(withTasks) + 1).flatMap((f) => f.signingKeys.map((k) => k.keyId));
    expect(upTo).toEqual([signer.key.keyId]);
    link.close();
    await served;
    jobs.stop?.();
  });
});

describe("keys past their end, at a proxy and a daemon up for months", () => {
  it("are forgotten: a proxy on LMDB hands a connecting host only keys in force, before and after its restart, and a daemon's verifier keeps only those", async () => {
    const clock = new ManualClock(Date.UTC(2026, 0, 1));
    const signer = controllerSigner(clock);
    const daemon = new TaskVerifier(testCa().certPem, clock);
    const dir = mkdtempSync(join(tmpdir(), "rexmesh-keys-"));
    const open = () => new LmdbEnv({ path: dir, maxBytes: 16 << 20 });
    let env = open();
    let store = new LmdbProxyStore(env);
    const ids = (keys: readonly { keyId: string }[]) => keys.map((k) => k.keyId).sort();
    const issued: string[] = [];
    // Half a year of renewals at half a key's 30 days: 12 keys issued.
    for (let day = 0; day < 180; day++) {
      if (day === 0 || signer.renewIfDue()) {
        issued.push(signer.key.keyId);
        expect(ids(await store.addSigningKeys([signer.key], clock.now()))).toEqual([signer.key.keyId]);
        expect(daemon.addKeys([signer.key])).toBe(1);
      }
      // At most the current key, the one before it (in force until its end) and, on the day that one ends, the one before that.
      expect(store.signingKeys(clock.now()).length).toBeLessThanOrEqual(3);
      expect(daemon.size).toBeLessThanOrEqual(3);
      clock.advance(DAY);
    }
    expect(issued.length).toBeGreaterThanOrEqual(12);
    const inForce = ids(store.signingKeys(clock.now()));
    expect(inForce).toContain(signer.key.keyId);
    // A key already held, or one past its end, is not taken again.
    expect(await store.addSigningKeys([signer.key], clock.now())).toEqual([]);
    await env.close();

    // Restarted after the current key's predecessor ended: a host's welcome carries only the current key, and the ended one is gone from disk.
    clock.advance(TASK_KEY_LIFETIME_MS / 2);
    env = open();
    store = new LmdbProxyStore(env);
    const core = new ProxyCore({ name: "px1", region: "eu", clock, store, log: silentLogger, heartbeatMs: 10_000 });
    core.start();
    const host = new FakeLink<AgentStreamResponse, AgentStreamRequest>();
    const served = core.serveHost(host, hostPeer("h1")).catch(() => undefined);
    host.deliver(create(AgentStreamRequestSchema, { hello: { hostId: "h1", heartbeatMs: 0 } }));
    await flush();
    expect(ids(host.sent.flatMap((f) => f.signingKeys))).toEqual([signer.key.keyId]);
    expect(await store.addSigningKeys([], clock.now())).toEqual([]);
    await eventually(() => [...env.db<Buffer>("proxy-signing-keys", "binary").getKeys()].filter((k) => k !== "\0deny-list").length === 1);
    host.close();
    core.stop();
    await served;
    await env.close();
  });
});
