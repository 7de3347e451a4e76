import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import type { PeerIdentity } from "../../certs/identity.js";
import { ManualClock } from "../../common/clock.js";
import { HostKeyVerifier, HostReporter, OutputDigest } from "../../common/host-signing.js";
import type { HostReportKey } from "../../gen/rexmesh/v1/host_pb.js";
import { TaskState, TaskStatusSchema } from "../../gen/rexmesh/v1/task_pb.js";
import { otherTestCa, testCa, testCredentials } from "../test-ca.js";

const clock = new ManualClock(Date.UTC(2026, 0, 1));
const ca = testCa();
const other = otherTestCa();
const host = (id: string): PeerIdentity => ({ role: "host", scope: "acme", id });
const proxy: PeerIdentity = { role: "proxy", scope: "eu", id: "px1" };
// Every host's certificate is on the run's one leaf key: what tells hosts apart is their certificate and report key.
const reporter = (id: string, from = ca, validityMs = 86_400_000) => new HostReporter(testCredentials(host(id), { clock, validityMs, ca: from }), clock, host(id));

function end(taskId: string, out: string, state = TaskState.SUCCEEDED) {
  const d = new OutputDigest();
  d.add(new TextEncoder().encode(out));
  return create(TaskStatusSchema, { taskId, state, exitCode: 0, outputChunks: 1n, outputBytes: BigInt(d.bytes), outputSha256: d.digest() });
}

describe("host report keys", () => {
  it("proves presence over the link's nonce only, and signs task ends that cannot be altered", () => {
    const r = reporter("h1");
    const v = new HostKeyVerifier(ca.certPem, clock);
    expect(v.accept(r.key, host("h1"))).toEqual({ ok: true });
    const nonce = new Uint8Array([1, 2, 3, 4]);
    const p = r.prove(nonce, proxy);
    expect(v.checkPresence(r.key.keyId, p.proof, p.salt, nonce, proxy, host("h1")).ok).toBe(true);
    // Each proof has its own salt.
    expect(Buffer.from(r.prove(nonce, proxy).salt).equals(Buffer.from(p.salt))).toBe(false);
    // Another link's nonce, another proxy, another host, another salt, no salt: refused.
    expect(v.checkPresence(r.key.keyId, p.proof, p.salt, new Uint8Array([9]), proxy, host("h1")).ok).toBe(false);
    expect(v.checkPresence(r.key.keyId, p.proof, p.salt, nonce, { ...proxy, id: "px2" }, host("h1")).ok).toBe(false);
    expect(v.checkPresence(r.key.keyId, p.proof, p.salt, nonce, proxy, host("h2")).ok).toBe(false);
    expect(v.checkPresence(r.key.keyId, p.proof, new Uint8Array(16), nonce, proxy, host("h1")).ok).toBe(false);
    expect(v.checkPresence(r.key.keyId, p.proof, new Uint8Array(), nonce, proxy, host("h1")).ok).toBe(false);
    expect(v.checkPresence(r.key.keyId, p.proof, new Uint8Array(65), nonce, proxy, host("h1"))).toEqual({ ok: false, reason: "the presence proof's salt is 65 bytes (16 to 64)" });
    const s = end("t1", "hello\n");
    r.signEnd(s);
    expect(v.checkEnd(s, host("h1"))).toBe("ok");
    for (const change of [(x: typeof s) => (x.exitCode = 1), (x: typeof s) => (x.state = TaskState.FAILED), (x: typeof s) => (x.outputSha256 = new Uint8Array(32)), (x: typeof s) => (x.outputBytes = 0n), (x: typeof s) => (x.taskId = "t2")]) {
      const copy = create(TaskStatusSchema, { ...s });
      change(copy);
      expect(v.checkEnd(copy, host("h1"))).toBe("bad");
    }
    expect(v.checkEnd(s, host("h2"))).toBe("bad");
    expect(v.checkEnd(create(TaskStatusSchema, { ...s, signature: new Uint8Array() }), host("h1"))).toBe("unknown");
  });

  it("refuses a key endorsed by another CA's certificate, or by another host's, or altered", () => {
    const v = new HostKeyVerifier(ca.certPem, clock);
    expect(v.accept(reporter("h1", other).key, host("h1"))).toMatchObject({ ok: false, reason: expect.stringMatching(/not from this mesh's CA/) });
    expect(v.accept(reporter("h2").key, host("h1"))).toMatchObject({ ok: false, reason: expect.stringMatching(/names another host/) });
    const k = reporter("h1").key;
    const tampered: HostReportKey = { ...k, publicKey: reporter("h3").key.publicKey };
    expect(v.accept(tampered, host("h1"))).toMatchObject({ ok: false, reason: expect.stringMatching(/endorsement does not hold/) });
    expect(v.accept(undefined, host("h1"))).toMatchObject({ ok: false });
  });

  it("refuses presence for a revoked host", () => {
    const r = reporter("h1");
    let revoked = false;
    const v = new HostKeyVerifier(ca.certPem, clock, () => revoked);
    v.accept(r.key, host("h1"));
    const nonce = new Uint8Array([5]);
    revoked = true;
    const p = r.prove(nonce, proxy);
    expect(v.checkPresence(r.key.keyId, p.proof, p.salt, nonce, proxy, host("h1")).ok).toBe(false);
  });

  it("checks results after a restart with keys it accepted before, even once their short-lived certificate expired", () => {
    const r = reporter("h1", ca, 3_600_000);
    const stored = new Map<string, HostReportKey>();
    const store = { get: (id: string) => stored.get(id), put: (k: HostReportKey) => void stored.set(k.keyId, k) };
    new HostKeyVerifier(ca.certPem, clock, () => false, store).accept(r.key, host("h1"));
    const s = end("t1", "x");
    r.signEnd(s);
    const later = new ManualClock(clock.now() + 2 * 3_600_000);
    // After the certificate expired, a key never accepted before is refused...
    const restarted = new HostKeyVerifier(ca.certPem, later, () => false, store);
    const fresh = new HostKeyVerifier(ca.certPem, later);
    expect(fresh.accept(r.key, host("h1"))).toMatchObject({ ok: false, reason: expect.stringMatching(/not valid now/) });
    // ...but what the stored key signed while it was valid still checks out.
    expect(restarted.checkEnd(s, host("h1"))).toBe("ok");
  });
});
