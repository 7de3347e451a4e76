import { createPrivateKey, generateKeyPairSync, sign, X509Certificate } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { afterEach, describe, expect, it } from "vitest";
import type { PeerIdentity } from "../../certs/identity.js";
import { ManualClock } from "../../common/clock.js";
import { controllerKeyId, END_MAC_BYTES, pairedKeyId } from "../../common/end-mac.js";
import { framed } from "../../common/framed.js";
import { HostKeyVerifier, HostReporter, OutputDigest, type ReportKeyStore } from "../../common/host-signing.js";
import { LmdbEnv } from "../../common/lmdb.js";
import { TaskSigner, TaskVerifier } from "../../common/task-signing.js";
import { newKeyHalf } from "../../common/x25519.js";
import { EndKeyRing, LmdbEndKeyStore, MemoryEndKeyStore, type EndKeyStore } from "../../controller/end-keys.js";
import { lmdbReportKeyStore } from "../../controller/report-keys.js";
import { HostReportKeySchema, type HostReportKey } from "../../gen/rexmesh/v1/host_pb.js";
import { TaskSigningKeySchema, TaskState, TaskStatusSchema, type TaskStatus } from "../../gen/rexmesh/v1/task_pb.js";
import { silentLogger } from "../../common/logger.js";
import { testCa, testCredentials } from "../test-ca.js";
import { HostKeyVerifier as HostKeyVerifierV1, HostReporter as HostReporterV1 } from "./fixtures/host-signing-v1.js";
import { TaskVerifier as TaskVerifierV1 } from "./fixtures/task-signing-v1.js";
import { taskSpec } from "./support.js";

const clock = new ManualClock(Date.UTC(2026, 0, 1));
const ca = testCa();
const day = 86_400_000;
const host = (id: string): PeerIdentity => ({ role: "host", scope: "acme", id });
const controllerCreds = testCredentials({ role: "controller", scope: "mesh", id: "ctl" }, { clock, validityMs: 365 * day });
const hostCreds = (id: string) => testCredentials(host(id), { clock, validityMs: day });
const reporter = (id: string) => new HostReporter(hostCreds(id), clock, host(id));

function end(taskId: string, out: string, state = TaskState.SUCCEEDED): TaskStatus {
  const d = new OutputDigest();
  d.add(new TextEncoder().encode(out));
  return create(TaskStatusSchema, { taskId, state, exitCode: 0, outputChunks: 1n, outputBytes: BigInt(d.bytes), outputSha256: d.digest() });
}

const copy = (s: TaskStatus, change: Partial<TaskStatus> = {}): TaskStatus => create(TaskStatusSchema, { ...s, ...change });

function memoryReportKeys(): ReportKeyStore & { map: Map<string, HostReportKey> } {
  const map = new Map<string, HostReportKey>();
  return { map, get: (id) => map.get(id), put: (k) => void map.set(k.keyId, k) };
}

/** A controller as main.ts wires it: its X25519 keys, a signing key carrying the current one, a verifier that checks MACs with them. */
async function controller(store: EndKeyStore = new MemoryEndKeyStore(), reportKeys: ReportKeyStore = memoryReportKeys(), at = clock) {
  const ring = await EndKeyRing.open(store, at);
  const signer = new TaskSigner(controllerCreds, at, 30 * day, ring.current.publicKey);
  const verifier = new HostKeyVerifier(ca.certPem, at, () => false, reportKeys, { controllerKeys: (id) => ring.get(id) });
  return { ring, signer, verifier };
}

/** A daemon that took the controller's welcome: its verifier holds the signing key (and so the controller's X25519 key). */
function daemon(id: string, ...keys: TaskSigner["key"][]) {
  const r = reporter(id);
  const tasks = new TaskVerifier(ca.certPem, clock);
  tasks.addKeys(keys);
  return { r, tasks, endKey: () => tasks.endKey() };
}

describe("ends vouched for by a MAC", () => {
  it("a MAC'd end verifies; any field altered, another host, another host's MAC or a bent MAC does not", async () => {
    const c = await controller();
    const d = daemon("h1", c.signer.key);
    expect(d.endKey()).toEqual({ id: c.ring.current.id, publicKey: Buffer.from(c.ring.current.publicKey) });
    expect(c.verifier.accept(d.r.key, host("h1"))).toEqual({ ok: true });
    const s = end("t1", "hello\n");
    d.r.signEnd(s, d.endKey());
    expect(s.signature.length).toBe(0);
    expect(s.endMac.length).toBe(END_MAC_BYTES);
    expect(s.endMacKeyId).toBe(c.ring.current.id);
    expect(c.verifier.checkEnd(s, host("h1"))).toBe("ok");
    const changes: Partial<TaskStatus>[] = [
      { exitCode: 1 },
      { exitCode: undefined },
      { state: TaskState.FAILED },
      { outputSha256: new Uint8Array(32) },
      { outputBytes: 0n },
      { outputChunks: 2n },
      { outputTruncated: true },
      { signal: "SIGKILL" },
      { taskId: "t2" },
    ];
    for (const change of changes) expect(c.verifier.checkEnd(copy(s, change), host("h1")), JSON.stringify(Object.keys(change))).toBe("bad");
    // Passed off as another host's end: the key is h1's.
    expect(c.verifier.checkEnd(s, host("h2"))).toBe("bad");
    // Another host's MAC over the same end, under h1's key id (and under its own: the wrong host).
    const d2 = daemon("h2", c.signer.key);
    expect(c.verifier.accept(d2.r.key, host("h2"))).toEqual({ ok: true });
    const s2 = end("t1", "hello\n");
    d2.r.signEnd(s2, d2.endKey());
    expect(c.verifier.checkEnd(copy(s2, { keyId: d.r.key.keyId }), host("h1"))).toBe("bad");
    expect(c.verifier.checkEnd(s2, host("h1"))).toBe("bad");
    // A MAC bent, cut or lengthened; a key id beyond its bound.
    const flipped = Uint8Array.from(s.endMac, (b, i) => (i === 7 ? b ^ 1 : b));
    expect(c.verifier.checkEnd(copy(s, { endMac: flipped }), host("h1"))).toBe("bad");
    expect(c.verifier.checkEnd(copy(s, { endMac: s.endMac.subarray(0, 16) }), host("h1"))).toBe("bad");
    expect(c.verifier.checkEnd(copy(s, { endMac: new Uint8Array([...s.endMac, 0]) }), host("h1"))).toBe("bad");
    expect(c.verifier.checkEnd(copy(s, { endMacKeyId: "x".repeat(65) }), host("h1"))).toBe("bad");
    // The MAC stripped: nothing to check (as a signature stripped: unverified, never verified).
    expect(c.verifier.checkEnd(copy(s, { endMac: new Uint8Array(), endMacKeyId: "" }), host("h1"))).toBe("unknown");
    // A controller key the controller does not hold: it cannot tell.
    expect(c.verifier.checkEnd(copy(s, { endMacKeyId: controllerKeyId(newKeyHalf().publicKey) }), host("h1"))).toBe("unknown");
  });

  it("a host that puts another host's X25519 half in its own report key cannot pass that host's MACs as its own", async () => {
    const c = await controller();
    const b = daemon("h2", c.signer.key);
    c.verifier.accept(b.r.key, host("h2"));
    // Host h1 (its own certificate and key) endorses a report key with h2's public half: it needs no private key to do that.
    const creds = hostCreds("h1");
    const { publicKey } = generateKeyPairSync("ed25519");
    const der = publicKey.export({ type: "spki", format: "der" });
    const keyId = pairedKeyId("host report key", der, b.r.key.x25519PublicKey);
    const notAfter = clock.now() + day;
    const copied = create(HostReportKeySchema, {
      keyId,
      publicKey: der,
      notAfter: timestampFromMs(notAfter),
      endorsement: sign("sha256", framed("host report key", keyId, der, notAfter), createPrivateKey(creds.keyPem)),
      hostCertificate: new X509Certificate(creds.certPem).raw,
      x25519PublicKey: b.r.key.x25519PublicKey,
    });
    expect(c.verifier.accept(copied, host("h1"))).toEqual({ ok: true });
    const s = end("t1", "x");
    b.r.signEnd(s, b.endKey());
    expect(c.verifier.checkEnd(s, host("h2"))).toBe("ok");
    // The agreed key is bound to the host's identity: the same halves agree another key for h1.
    expect(c.verifier.checkEnd(copy(s, { keyId }), host("h1"))).toBe("bad");
  });

  it("a daemon refuses a controller key whose X25519 half a proxy replaced or stripped, and MACs with none", async () => {
    const c = await controller();
    const proxyHalf = newKeyHalf();
    const replaced = create(TaskSigningKeySchema, { ...c.signer.key, x25519PublicKey: proxyHalf.publicKey });
    const stripped = create(TaskSigningKeySchema, { ...c.signer.key, x25519PublicKey: new Uint8Array() });
    for (const k of [replaced, stripped]) {
      const tasks = new TaskVerifier(ca.certPem, clock);
      expect(tasks.addKeys([k])).toBe(0);
      expect(tasks.endKey()).toBeUndefined();
      // The daemon then signs its end, which the controller checks as before.
      const r = reporter("h1");
      c.verifier.accept(r.key, host("h1"));
      const s = end("t1", "x");
      r.signEnd(s, tasks.endKey());
      expect(s.endMac.length).toBe(0);
      expect(c.verifier.checkEnd(s, host("h1"))).toBe("ok");
    }
    // An unchanged key is taken (the check above fails for the change, not for the key).
    expect(new TaskVerifier(ca.certPem, clock).addKeys([c.signer.key])).toBe(1);
  });

  it("a MAC made with a key a proxy could know is not accepted at the controller", async () => {
    const c = await controller();
    const d = daemon("h1", c.signer.key);
    c.verifier.accept(d.r.key, host("h1"));
    const proxyHalf = newKeyHalf();
    // Had a daemon taken the proxy's half (it does not: above), its MACs would be under a key the controller does not hold...
    const s = end("t1", "x");
    d.r.signEnd(s, { id: controllerKeyId(proxyHalf.publicKey), publicKey: proxyHalf.publicKey });
    expect(c.verifier.checkEnd(s, host("h1"))).toBe("unknown");
    // ...or, under the controller's key id, under a key the controller's half does not agree.
    const t = end("t2", "x");
    d.r.signEnd(t, { id: c.ring.current.id, publicKey: proxyHalf.publicKey });
    expect(c.verifier.checkEnd(t, host("h1"))).toBe("bad");
  });

  it("refuses a report key whose X25519 half a proxy replaced or stripped in the relayed hello", async () => {
    const c = await controller();
    const k = reporter("h1").key;
    for (const x25519PublicKey of [newKeyHalf().publicKey, new Uint8Array(), new Uint8Array(33)]) {
      expect(c.verifier.accept({ ...k, x25519PublicKey }, host("h1"))).toMatchObject({ ok: false, reason: expect.stringMatching(/X25519 half is not the one its id names/) });
    }
    // Nor can it make the key look like an earlier release's (an id that names no half): the endorsement covers the id.
    expect(c.verifier.accept({ ...k, keyId: "0123456789abcdef", x25519PublicKey: new Uint8Array() }, host("h1"))).toMatchObject({ ok: false, reason: expect.stringMatching(/endorsement does not hold/) });
    expect(c.verifier.accept(k, host("h1"))).toEqual({ ok: true });
  });

  it("mixed releases: an earlier controller takes a new daemon's key and signed ends; an earlier daemon's signed ends and an earlier daemon taking a new controller's key", async () => {
    const c = await controller();
    // A new daemon under an earlier controller: its report key passes the earlier check; with no controller X25519 key it signs.
    const oldController = new HostKeyVerifierV1(ca.certPem, clock);
    const d = daemon("h1");
    expect(oldController.accept(d.r.key, host("h1"))).toEqual({ ok: true });
    const s = end("t1", "x");
    d.r.signEnd(s, d.endKey());
    expect(s.signature.length).toBeGreaterThan(0);
    expect(oldController.checkEnd(s, host("h1"))).toBe("ok");
    // An earlier daemon under the new controller: its key and its signed ends check out.
    const old = new HostReporterV1(hostCreds("h2"), clock, host("h2"));
    expect(c.verifier.accept(old.key, host("h2"))).toEqual({ ok: true });
    const o = end("t2", "y");
    old.signEnd(o);
    expect(c.verifier.checkEnd(o, host("h2"))).toBe("ok");
    expect(c.verifier.checkEnd(copy(o, { exitCode: 3 }), host("h2"))).toBe("bad");
    // Its key has no X25519 half, so it MACs nothing: a MAC'd end under it was made up on the way.
    expect(c.verifier.checkEnd(copy(o, { signature: new Uint8Array(), endMac: new Uint8Array(32), endMacKeyId: c.ring.current.id }), host("h2"))).toBe("bad");
    // An earlier daemon takes the new controller's signing key (X25519 half and all) and runs what it signs.
    const oldDaemon = new TaskVerifierV1(ca.certPem, clock);
    expect(oldDaemon.addKeys([c.signer.key])).toBe(1);
    expect(oldDaemon.verify(c.signer.sign(taskSpec("t3", "h2", { deliverByMs: clock.now() + 60_000 }))).taskId).toBe("t3");
  });

  it("a restarted controller (its X25519 keys and hosts' report keys on LMDB) checks ends MAC'd before and after the restart", async () => {
    const dir = mkdtempSync(join(tmpdir(), "rexmesh-end-mac-"));
    dirs.push(dir);
    const open = () => new LmdbEnv({ path: dir, maxBytes: 16 << 20 });
    let env = open();
    const first = await controller(new LmdbEndKeyStore(env), lmdbReportKeyStore(env, silentLogger));
    const d = daemon("h1", first.signer.key);
    expect(first.verifier.accept(d.r.key, host("h1"))).toEqual({ ok: true });
    const before = end("t1", "before");
    d.r.signEnd(before, d.endKey());
    expect(first.verifier.checkEnd(before, host("h1"))).toBe("ok");
    await env.root.flushed;
    await env.close();
    env = open();
    // A new start: a new signing key carrying the same X25519 key; the daemon has not heard of it yet.
    const later = new ManualClock(clock.now() + 3_600_000);
    const second = await controller(new LmdbEndKeyStore(env), lmdbReportKeyStore(env, silentLogger), later);
    expect(second.ring.current.id).toBe(first.ring.current.id);
    expect(second.signer.key.keyId).not.toBe(first.signer.key.keyId);
    const after = end("t2", "after");
    d.r.signEnd(after, d.endKey());
    expect(second.verifier.checkEnd(before, host("h1"))).toBe("ok");
    expect(second.verifier.checkEnd(after, host("h1"))).toBe("ok");
    expect(second.verifier.checkEnd(copy(after, { exitCode: 1 }), host("h1"))).toBe("bad");
    await env.close();
  });

  it("rotation: a start replaces a key older than rotateAfterMs; ends MAC'd under the replaced key verify while it is kept, then are unverified", async () => {
    const store = new MemoryEndKeyStore();
    // Hosts' report keys are kept across starts too (the host's certificate will have expired by then).
    const reportKeys = memoryReportKeys();
    const first = await controller(store, reportKeys);
    const d = daemon("h1", first.signer.key);
    expect(first.verifier.accept(d.r.key, host("h1"))).toEqual({ ok: true });
    const s = end("t1", "x");
    d.r.signEnd(s, d.endKey());
    // 31 days on: a new X25519 key, carried by the new start's signing key.
    const at31 = new ManualClock(clock.now() + 31 * day);
    const second = await controller(store, reportKeys, at31);
    expect(second.ring.current.id).not.toBe(first.ring.current.id);
    expect([...store.keys.values()].filter((k) => k.retiredAt === undefined)).toHaveLength(1);
    expect(second.verifier.checkEnd(s, host("h1"))).toBe("ok");
    // The daemon moves to the newest key it holds (the signing key that expires last).
    const tasks = new TaskVerifier(ca.certPem, at31);
    tasks.addKeys([second.signer.key, first.signer.key]);
    expect(tasks.endKey()?.id).toBe(second.ring.current.id);
    // 90 days after it was replaced, the old key is gone: its ends can no longer be told apart from made-up ones.
    const at122 = new ManualClock(clock.now() + 122 * day);
    const third = await controller(store, reportKeys, at122);
    expect(third.ring.get(first.ring.current.id)).toBeUndefined();
    expect(third.verifier.checkEnd(s, host("h1"))).toBe("unknown");
    // (Unknown for the controller key alone: an end under the current one checks out.)
    const t = end("t2", "x");
    d.r.signEnd(t, daemon("h1", third.signer.key).endKey());
    expect(third.verifier.checkEnd(t, host("h1"))).toBe("ok");
  });

  it("keeps at most maxKeys keys, the current one always", async () => {
    const store = new MemoryEndKeyStore();
    let current = "";
    for (let i = 0; i < 6; i++) current = (await EndKeyRing.open(store, new ManualClock(clock.now() + i * day), { rotateAfterMs: day, maxKeys: 3 })).current.id;
    expect(store.keys.size).toBe(3);
    expect(store.keys.has(current)).toBe(true);
  });
});

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});
