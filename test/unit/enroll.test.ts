import { X509Certificate } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import forge from "node-forge";
import { describe, expect, it } from "vitest";
import { generateKeyPair, issueCertificate, type KeyPair } from "../../certs/ca.js";
import { createCsr, keyFingerprint, readCsr, signEnrollment, verifyZeroCertificate } from "../../certs/enrollment.js";
import { identityFromCertificate, requireRole, type PeerIdentity } from "../../certs/identity.js";
import { ManualClock } from "../../common/clock.js";
import {
  AlreadyExistsError,
  FailedPreconditionError,
  InvalidArgumentError,
  NotFoundError,
  PermissionDeniedError,
  UnauthenticatedError,
} from "../../common/errors.js";
import { LmdbEnv } from "../../common/lmdb.js";
import { silentLogger } from "../../common/logger.js";
import { EnrollmentAuthority, type EnrollInput, type EnrollmentEvent } from "../../controller/enroll.js";
import { LmdbEnrollStore, MemoryEnrollStore, type EnrollStore } from "../../controller/enroll-store.js";
import { checkJoinToken, hashJoinToken, mintJoinToken, TOKEN_PREFIX } from "../../controller/tokens.js";
import { otherTestCa, otherTestKeys, testCa, testKeys } from "../test-ca.js";

const HOUR = 3_600_000;
const alice: PeerIdentity = { role: "operator", scope: "acme", id: "alice" };
const proxy: PeerIdentity = { role: "proxy", scope: "eu", id: "px1" };

const ca = testCa();
const keys = testKeys();
const otherKeys = otherTestKeys();
const clock = new ManualClock();

function setup(store: EnrollStore = new MemoryEnrollStore(), known?: Record<string, string>, more: { revoked?: Set<string>; rekeyers?: Set<string> } = {}) {
  const events: EnrollmentEvent[] = [];
  const authority = new EnrollmentAuthority({
    store,
    ca,
    clock,
    log: silentLogger,
    hostCertTtlMs: 24 * HOUR,
    knownHost: (id) => (known?.[id] ? { tenant: known[id]! } : undefined),
    isRevoked: (i) => more.revoked?.has(`${i.role}:${i.scope}/${i.id}`) ?? false,
    authorizeRekey: (caller) => {
      if (!(more.rekeyers ?? new Set(["alice"])).has(caller.id)) throw new PermissionDeniedError(`operator ${caller.scope}/${caller.id} may not rekey`);
      return "admin";
    },
    audit: (e) => void events.push(e),
  });
  return { authority, events, store };
}

function request(hostId: string, over: Partial<EnrollInput> = {}, k: KeyPair = keys): EnrollInput {
  return { hostId, csrPem: over.csrPem ?? createCsr(hostId, k), token: "", tenant: "", bootstrapCertificatePem: "", bootstrapSignature: new Uint8Array(), ...over };
}

describe("join tokens", () => {
  it("are random, prefixed, and stored only as a hash", async () => {
    const { authority, store } = setup();
    const a = await authority.createToken(alice, {});
    const b = await authority.createToken(alice, {});
    expect(a.token.startsWith(TOKEN_PREFIX)).toBe(true);
    expect(a.token).not.toBe(b.token);
    const mem = store as MemoryEnrollStore;
    expect([...mem.tokens.keys()]).toEqual([hashJoinToken(a.token), hashJoinToken(b.token)]);
    const stored = JSON.stringify([...mem.tokens.entries()]);
    expect(stored).not.toContain(a.token);
    expect(stored).not.toContain(a.token.slice(TOKEN_PREFIX.length));
    expect(mem.tokens.get(hashJoinToken(a.token))).toMatchObject({ tenant: "acme", usesLeft: 1, expiresAt: clock.now() + HOUR, createdBy: "operator:acme/alice" });
  });

  it("can be created by operators for their own tenant only", async () => {
    const { authority, events } = setup();
    await expect(authority.createToken(alice, { tenant: "globex" })).rejects.toThrow(PermissionDeniedError);
    const huge = await authority.createToken(alice, { tenant: "t".repeat(1 << 20) }).catch((e: Error) => e.message);
    expect(huge).toMatch(/tenant is longer than 128/);
    expect(String(huge).length).toBeLessThan(200);
    await expect(authority.createToken(proxy, {})).rejects.toThrow(PermissionDeniedError);
    await expect(authority.createToken({ role: "enroll", scope: "acme", id: "z" }, {})).rejects.toThrow(PermissionDeniedError);
    expect(events.filter((e) => e.decision === "refused")).toHaveLength(4);
  });

  it("validate ttl, uses and host id", () => {
    const now = clock.now();
    expect(() => mintJoinToken({ tenant: "acme", ttlMs: 0, createdBy: "x", now })).toThrow(InvalidArgumentError);
    expect(() => mintJoinToken({ tenant: "acme", ttlMs: 31 * 24 * HOUR, createdBy: "x", now })).toThrow(InvalidArgumentError);
    expect(() => mintJoinToken({ tenant: "acme", uses: 0, createdBy: "x", now })).toThrow(InvalidArgumentError);
    expect(() => mintJoinToken({ tenant: "acme", hostId: "bad id", createdBy: "x", now })).toThrow(InvalidArgumentError);
    expect(() => mintJoinToken({ tenant: "acme", hostId: "h1", uses: 2, createdBy: "x", now })).toThrow(InvalidArgumentError);
  });

  it("expire, run out, and bind to a host id", () => {
    const now = clock.now();
    const { record } = mintJoinToken({ tenant: "acme", ttlMs: HOUR, uses: 2, createdBy: "x", now });
    expect(checkJoinToken(record, "h1", now + HOUR - 1)).toBe(record);
    expect(() => checkJoinToken(record, "h1", now + HOUR)).toThrow(/expired/);
    expect(() => checkJoinToken({ ...record, usesLeft: 0 }, "h1", now)).toThrow(/used up/);
    expect(() => checkJoinToken(record, "h1", now, 2)).toThrow(/used up/);
    expect(() => checkJoinToken(undefined, "h1", now)).toThrow(UnauthenticatedError);
    const bound = mintJoinToken({ tenant: "acme", hostId: "h1", createdBy: "x", now }).record;
    expect(checkJoinToken(bound, "h1", now)).toBe(bound);
    expect(() => checkJoinToken(bound, "h2", now)).toThrow(PermissionDeniedError);
  });
});

describe("enrollment", () => {
  it("issues a certificate for the CSR's key, bound to the host id and the token's tenant", async () => {
    const { authority, events } = setup();
    const { token } = await authority.createToken(alice, { uses: 1 });
    const issued = await authority.enroll(request("web-1", { token }), proxy);
    const cert = new X509Certificate(issued.certPem);
    expect(identityFromCertificate(cert)).toEqual({ role: "host", scope: "acme", id: "web-1" });
    expect(keyFingerprint(cert.publicKey.export({ type: "spki", format: "pem" }).toString())).toBe(keyFingerprint(keys.publicKeyPem));
    expect(cert.verify(new X509Certificate(ca.certPem).publicKey)).toBe(true);
    expect(issued.notAfter).toBe(Date.parse(cert.validTo));
    expect(issued.notAfter - clock.now()).toBeLessThanOrEqual(24 * HOUR);
    expect(issued.caPem).toBe(ca.certPem);
    const e = events.find((x) => x.action === "enroll")!;
    expect(e).toMatchObject({ decision: "allowed", hostId: "web-1", tenant: "acme", relayedBy: "eu/px1", caller: "proxy:eu/px1" });
  });

  it("refuses an expired token, a used-up one, and one bound to another host id", async () => {
    const { authority } = setup();
    const expiring = await authority.createToken(alice, { ttlMs: 1000 });
    clock.advance(1000);
    await expect(authority.enroll(request("a1", { token: expiring.token }), undefined)).rejects.toThrow(/expired/);
    const once = await authority.createToken(alice, {});
    await authority.enroll(request("a2", { token: once.token }), undefined);
    await expect(authority.enroll(request("a3", { token: once.token }), undefined)).rejects.toThrow(/used up/);
    const bound = await authority.createToken(alice, { hostId: "a4" });
    await expect(authority.enroll(request("a5", { token: bound.token }), undefined)).rejects.toThrow(PermissionDeniedError);
    await expect(authority.enroll(request("a6", { token: "rxj1_nope" }), undefined)).rejects.toThrow(UnauthenticatedError);
    await expect(authority.enroll(request("a7"), undefined)).rejects.toThrow(InvalidArgumentError);
  });

  it("spends a token's uses exactly once under concurrency, with real LMDB commits", async () => {
    const dir = mkdtempSync(join(tmpdir(), "rexmesh-enroll-"));
    const env = new LmdbEnv({ path: dir, maxBytes: 64 << 20 });
    try {
      const { authority } = setup(new LmdbEnrollStore(env));
      const { token } = await authority.createToken(alice, { uses: 3 });
      const csr = createCsr("x", keys);
      const results = await Promise.allSettled(Array.from({ length: 100 }, (_, i) => authority.enroll(request(`c${i}`, { token, csrPem: csr }), undefined)));
      expect(results.filter((r) => r.status === "fulfilled")).toHaveLength(3);
      for (const r of results) if (r.status === "rejected") expect(r.reason).toBeInstanceOf(UnauthenticatedError);
      const store = new LmdbEnrollStore(env);
      expect(store.getToken(hashJoinToken(token))?.usesLeft).toBe(0);
    } finally {
      await env.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("re-checks inside the commit, so a use spent by another writer is not spent twice", async () => {
    const store = new MemoryEnrollStore();
    const { authority } = setup(store);
    const { token } = await authority.createToken(alice, {});
    const hash = hashJoinToken(token);
    // Another writer spends the use between the check and the commit.
    const commit = store.commit.bind(store);
    store.commit = async (t, h, check) => {
      store.tokens.set(hash, { ...store.tokens.get(hash)!, usesLeft: 0 });
      return commit(t, h, check);
    };
    await expect(authority.enroll(request("r1", { token }), undefined)).rejects.toThrow(/used up/);
    expect(store.getHost("r1")).toBeUndefined();
  });

  it("never reissues a host id to another key, and re-enrolls the same key only with a bound token", async () => {
    const { authority } = setup();
    const t = () => authority.createToken(alice, {}).then((r) => r.token);
    await authority.enroll(request("h1", { token: await t() }), undefined);
    await expect(authority.enroll(request("h1", { token: await t() }, otherKeys), undefined)).rejects.toThrow(/another key/);
    await expect(authority.enroll(request("h1", { token: await t() }), undefined)).rejects.toThrow(/bound to it/);
    const bound = await authority.createToken(alice, { hostId: "h1" });
    await expect(authority.enroll(request("h1", { token: bound.token }, otherKeys), undefined)).rejects.toThrow(AlreadyExistsError);
    const again = await authority.createToken(alice, { hostId: "h1" });
    const issued = await authority.enroll(request("h1", { token: again.token }), undefined);
    expect(identityFromCertificate(issued.certPem).id).toBe("h1");
  });

  it("re-keys an enrolled host id only with a --rekey token, which needs its own policy action and is audited", async () => {
    const { authority, events, store } = setup(new MemoryEnrollStore(), undefined, { rekeyers: new Set(["alice"]) });
    await authority.enroll(request("h2", { token: (await authority.createToken(alice, {})).token }), undefined);
    const bob: PeerIdentity = { role: "operator", scope: "acme", id: "bob" };
    await expect(authority.createToken(bob, { hostId: "h2", rekey: true })).rejects.toThrow(/may not rekey/);
    expect(events.at(-1)).toMatchObject({ action: "create-join-token", decision: "refused", hostId: "h2", rekey: true });
    await expect(authority.createToken(alice, { rekey: true })).rejects.toThrow(/--host-id/);
    await expect(authority.createToken(alice, { hostId: "elsewhere", rekey: true })).rejects.toThrow(NotFoundError);
    const rekey = await authority.createToken(alice, { hostId: "h2", rekey: true });
    expect(events.at(-1)).toMatchObject({ action: "create-join-token", decision: "allowed", hostId: "h2", rekey: true });
    const before = store.getHost("h2")!.keyFingerprint;
    await authority.enroll(request("h2", { token: rekey.token }, otherKeys), undefined);
    expect(store.getHost("h2")!.keyFingerprint).toBe(keyFingerprint(otherKeys.publicKeyPem));
    expect(events.at(-1)).toMatchObject({ action: "enroll", decision: "allowed", hostId: "h2", rekey: true, previousKeyFingerprint: before });
    // Used once: the old key cannot come back with it.
    await expect(authority.enroll(request("h2", { token: rekey.token }), undefined)).rejects.toThrow(/used up/);
  });

  it("never enrolls a revoked host id again, not even with a bound token and its old key", async () => {
    const revoked = new Set(["acme/h9"]);
    const authority = new EnrollmentAuthority({
      store: new MemoryEnrollStore(),
      ca,
      clock,
      log: silentLogger,
      hostCertTtlMs: HOUR,
      isRevoked: (i) => revoked.has(`${i.scope}/${i.id}`),
    });
    const bound = await authority.createToken(alice, { hostId: "h9" });
    await expect(authority.enroll(request("h9", { token: bound.token }), undefined)).rejects.toThrow(/revoked: it is never enrolled again/);
    const other = await authority.createToken(alice, {});
    expect(identityFromCertificate((await authority.enroll(request("h10", { token: other.token }), undefined)).certPem).id).toBe("h10");
  });

  it("treats hosts known from hand-issued certificates as taken: a bound token cannot give them a key, a re-key token can", async () => {
    const { authority } = setup(new MemoryEnrollStore(), { old: "acme", theirs: "globex" });
    const token = (await authority.createToken(alice, { uses: 5 })).token;
    await expect(authority.enroll(request("old", { token }), undefined)).rejects.toThrow(/enrolled already/);
    await expect(authority.enroll(request("theirs", { token }), undefined)).rejects.toThrow(/enrolled already/);
    // The key of a hand-issued certificate is unknown: a bound token is not enough to name one.
    const bound = await authority.createToken(alice, { hostId: "old" });
    await expect(authority.enroll(request("old", { token: bound.token }), undefined)).rejects.toThrow(AlreadyExistsError);
    // Another tenant's id is refused with the same words as one's own, so tenants stay hidden.
    const refusal = (p: Promise<unknown>) => p.then(() => "enrolled", (e: Error) => e.message);
    const mine = await refusal(authority.enroll(request("old", { token: bound.token }, otherKeys), undefined));
    const theirs = await refusal(authority.enroll(request("theirs", { token }, otherKeys), undefined));
    expect(mine.replaceAll("old", "ID")).toBe(theirs.replaceAll("theirs", "ID"));
    await expect(authority.createToken(alice, { hostId: "theirs", rekey: true })).rejects.toThrow(NotFoundError);
    const rekey = await authority.createToken(alice, { hostId: "old", rekey: true });
    expect(identityFromCertificate((await authority.enroll(request("old", { token: rekey.token }), undefined)).certPem).id).toBe("old");
  });

  it("checks the credential before anything costly: without one, even a garbage CSR is UNAUTHENTICATED", async () => {
    const { authority } = setup();
    await expect(authority.enroll(request("g1", { token: "rxj1_nope", csrPem: "garbage" }), undefined)).rejects.toThrow(UnauthenticatedError);
    const { token } = await authority.createToken(alice, {});
    await expect(authority.enroll(request("g1", { token, csrPem: "garbage" }), undefined)).rejects.toThrow(InvalidArgumentError);
  });

  it("refuses a revoked zero certificate presented in the request body", async () => {
    const revoked = new Set<string>();
    const { authority } = setup(new MemoryEnrollStore(), undefined, { revoked });
    const zeroKeys = generateKeyPair();
    const zeroPem = issueCertificate(ca, { clock, identity: { role: "enroll", scope: "acme", id: "rack-2" }, publicKeyPem: zeroKeys.publicKeyPem, validityMs: HOUR });
    const signed = (hostId: string) => {
      const r = request(hostId, { tenant: "acme", bootstrapCertificatePem: zeroPem });
      r.bootstrapSignature = signEnrollment(zeroKeys.privateKeyPem, hostId, "acme", r.csrPem);
      return r;
    };
    await authority.enroll(signed("rb1"), proxy);
    revoked.add("enroll:acme/rack-2");
    await expect(authority.enroll(signed("rb2"), proxy)).rejects.toThrow(/revoked/);
    await expect(authority.enroll(signed("rb3"), undefined)).rejects.toThrow(PermissionDeniedError);
  });

  it("accepts a zero certificate over TLS or as a signed proof, and refuses one of another tenant", async () => {
    const { authority } = setup();
    const zeroKeys = generateKeyPair();
    const zeroId: PeerIdentity = { role: "enroll", scope: "acme", id: "rack-1" };
    const zeroPem = issueCertificate(ca, { clock, identity: zeroId, publicKeyPem: zeroKeys.publicKeyPem, validityMs: 24 * HOUR });
    // Over TLS to the controller's main port: the peer is the credential.
    const direct = await authority.enroll(request("z1"), zeroId);
    expect(identityFromCertificate(direct.certPem)).toEqual({ role: "host", scope: "acme", id: "z1" });
    // Through a proxy: the signature proves possession of the zero certificate's key.
    const relayed = request("z2", { tenant: "acme", bootstrapCertificatePem: zeroPem });
    relayed.bootstrapSignature = signEnrollment(zeroKeys.privateKeyPem, "z2", "acme", relayed.csrPem);
    expect(identityFromCertificate((await authority.enroll(relayed, proxy)).certPem).scope).toBe("acme");
    // The signature covers the host id, tenant and CSR: a relay cannot reuse it.
    await expect(authority.enroll({ ...relayed, hostId: "z3" }, proxy)).rejects.toThrow(/signature/);
    await expect(authority.enroll({ ...relayed, csrPem: createCsr("z2", otherKeys) }, proxy)).rejects.toThrow(/signature/);
    // A daemon that means to join another tenant is refused.
    const other = request("z4", { tenant: "globex", bootstrapCertificatePem: zeroPem });
    other.bootstrapSignature = signEnrollment(zeroKeys.privateKeyPem, "z4", "globex", other.csrPem);
    await expect(authority.enroll(other, proxy)).rejects.toThrow(PermissionDeniedError);
    await expect(authority.enroll(request("z5", { tenant: "globex" }), zeroId)).rejects.toThrow(PermissionDeniedError);
    // A certificate of another role is no bootstrap credential.
    const hostPem = issueCertificate(ca, { clock, identity: { role: "host", scope: "acme", id: "x" }, publicKeyPem: zeroKeys.publicKeyPem, validityMs: HOUR });
    const fake = request("z6", { bootstrapCertificatePem: hostPem });
    fake.bootstrapSignature = signEnrollment(zeroKeys.privateKeyPem, "z6", "", fake.csrPem);
    await expect(authority.enroll(fake, proxy)).rejects.toThrow(PermissionDeniedError);
    // Other TLS roles cannot call Enroll themselves.
    await expect(authority.enroll(request("z7"), { role: "host", scope: "acme", id: "z1" })).rejects.toThrow(PermissionDeniedError);
    await expect(authority.enroll(request("z8"), alice)).rejects.toThrow(PermissionDeniedError);
  });

  it("refuses a zero certificate from another CA or past its validity", () => {
    const otherCa = otherTestCa();
    const zeroKeys = keys;
    const id: PeerIdentity = { role: "enroll", scope: "acme", id: "z" };
    const req = { hostId: "h", tenant: "", csrPem: createCsr("h", keys) };
    const sig = signEnrollment(zeroKeys.privateKeyPem, "h", "", req.csrPem);
    const foreign = issueCertificate(otherCa, { clock, identity: id, publicKeyPem: zeroKeys.publicKeyPem, validityMs: HOUR });
    expect(() => verifyZeroCertificate({ certPem: foreign, signature: sig, caPem: ca.certPem, now: clock.now() }, req)).toThrow(/CA/);
    const ours = issueCertificate(ca, { clock, identity: id, publicKeyPem: zeroKeys.publicKeyPem, validityMs: HOUR });
    expect(verifyZeroCertificate({ certPem: ours, signature: sig, caPem: ca.certPem, now: clock.now() }, req)).toEqual(id);
    expect(() => verifyZeroCertificate({ certPem: ours, signature: sig, caPem: ca.certPem, now: clock.now() + 2 * HOUR }, req)).toThrow(/valid now/);
  });

  it("refuses bad CSRs and host ids, and refuses everything without a CA key", async () => {
    const { authority } = setup();
    const token = (await authority.createToken(alice, { uses: 5 })).token;
    await expect(authority.enroll(request("ok", { token, csrPem: "garbage" }), undefined)).rejects.toThrow(InvalidArgumentError);
    // A CSR for one key signed by another: no proof of possession.
    const forged = forge.pki.createCertificationRequest();
    forged.publicKey = forge.pki.publicKeyFromPem(keys.publicKeyPem);
    forged.sign(forge.pki.privateKeyFromPem(otherKeys.privateKeyPem), forge.md.sha256.create());
    expect(() => readCsr(forge.pki.certificationRequestToPem(forged))).toThrow(/signature/);
    await expect(authority.enroll(request("ok", { token, csrPem: forge.pki.certificationRequestToPem(forged) }), undefined)).rejects.toThrow(InvalidArgumentError);
    await expect(authority.enroll(request("../etc", { token }), undefined)).rejects.toThrow(InvalidArgumentError);
    const off = new EnrollmentAuthority({ store: new MemoryEnrollStore(), ca: undefined, clock, log: silentLogger, hostCertTtlMs: HOUR });
    await expect(off.enroll(request("ok", { token }), undefined)).rejects.toThrow(FailedPreconditionError);
  });
});

describe("the enroll role", () => {
  it("is refused by every service that lists its roles", () => {
    const zero: PeerIdentity = { role: "enroll", scope: "acme", id: "z" };
    // The role lists of ControllerService, ProxyLink, AgentLink and the proxies' clients.
    for (const allowed of [["operator"], ["proxy"], ["host"], ["controller"], ["proxy", "controller"]] as const) {
      expect(() => requireRole(zero, ...allowed)).toThrow(PermissionDeniedError);
    }
  });
});
