import { readFileSync } from "node:fs";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { generateKeyPair, type KeyPair } from "../../certs/ca.js";
import { createCsr, signEnrollment } from "../../certs/enrollment.js";
import { readCredentials, type CredentialPaths } from "../../certs/files.js";
import { identityFromCertificate } from "../../certs/identity.js";
import { operatorClient, operatorChannel } from "../../cli/client.js";
import { LocalMesh } from "../../cli/launcher.js";
import { clientFor } from "../../common/connect-dial.js";
import { TRUNCATED } from "../../common/limits.js";
import { requestEnrollment } from "../../daemon/enroll.js";
import { EnrollRequestSchema } from "../../gen/rexmesh/v1/enroll_pb.js";
import { RevocationService } from "../../gen/rexmesh/v1/revocation_pb.js";
import { hostileCsr } from "../unit/hostile-csr.js";
import { rexmesh, tempDir, writePolicy } from "./support.js";
import { testCa } from "../test-ca.js";

const INVALID_ARGUMENT = 3;
const ALREADY_EXISTS = 6;
const PERMISSION_DENIED = 7;
const UNAUTHENTICATED = 16;

/**
 * Issue 12, enrollment findings, on a real mesh: an unauthenticated peer
 * cannot stall the controller with a CSR, a revoked zero certificate enrolls
 * nothing, a host id keeps its key unless an operator allowed to re-key says
 * otherwise, and refusals do not grow the audit log without bound.
 */
describe("enrollment hardening", () => {
  const work = tempDir("enroll-hardening");
  const policyFile = writePolicy(
    work,
    `
roles:
  admin: { hosts: all, actions: ["*"], commands: ["*"], shell: true }
  reader: { hosts: all, actions: [read, audit] }
  enroller: { hosts: all, actions: [read, token] }
bindings:
  default/dev: [admin]
  default/ro: [reader]
  default/en: [enroller]
`,
  );
  const mesh = new LocalMesh({
    ca: testCa(),
    dir: join(work, "mesh"),
    regions: ["east"],
    hosts: [{ id: "h1", region: "east" }],
    proxyArgs: ["--enroll-listen", "127.0.0.1:0"],
    controllerArgs: ["--enroll-listen", "127.0.0.1:0", "--policy", policyFile],
  });
  let proxyEnroll = "";
  let controllerEnroll = "";
  let caPem = "";
  let reader: CredentialPaths;
  const keys = generateKeyPair();

  beforeAll(async () => {
    await mesh.start();
    await mesh.waitForHosts(1);
    proxyEnroll = String(mesh.proxies[0]!.info!.enrollAddress);
    controllerEnroll = String(mesh.controller.info!.enrollAddress);
    caPem = readFileSync(mesh.caCertFile, "utf8");
    reader = mesh.issue({ role: "operator", scope: "default", id: "ro" }, join(work, "ro"));
  });
  afterAll(() => mesh.stop());

  async function token(...args: string[]): Promise<string> {
    const r = await rexmesh(["tokens", "create", "--json", ...args], mesh.exports());
    expect(r.code, r.stderr).toBe(0);
    return (JSON.parse(r.stdout) as { token: string }).token;
  }

  function request(hostId: string, fields: { token?: string; tenant?: string; csrPem?: string; keys?: KeyPair } = {}) {
    return create(EnrollRequestSchema, { hostId, csrPem: fields.csrPem ?? createCsr(hostId, fields.keys ?? keys), token: fields.token ?? "", tenant: fields.tenant ?? "" });
  }

  async function codeOf(p: Promise<unknown>): Promise<number> {
    const err = await p.then(
      () => undefined,
      (e: unknown) => e as { code: number; details: string },
    );
    expect(err, "the enrollment should have been refused").toBeDefined();
    return err!.code;
  }

  async function listHostsWithin(ms: number): Promise<number> {
    const { client, close } = operatorClient({}, mesh.exports());
    try {
      return (await client.listHosts({}, { timeoutMs: ms })).hosts.length;
    } finally {
      close();
    }
  }

  it("refuses a 16384-bit modulus-and-exponent CSR with INVALID_ARGUMENT at once, and the controller keeps answering", async () => {
    const hostile = hostileCsr();
    const t = await token("--uses", "5");
    const t0 = performance.now();
    const refused = requestEnrollment(proxyEnroll, caPem, request("dos-1", { token: t, csrPem: hostile }), undefined, undefined, 5000).then(
      () => ({ code: 0, details: "", ms: 0 }),
      (e: { code: number; details: string }) => ({ code: e.code, details: e.details, ms: performance.now() - t0 }),
    );
    // While the hostile request is in flight, the controller still answers an operator.
    const [r, hosts] = await Promise.all([refused, new Promise((res) => setTimeout(res, 100)).then(() => listHostsWithin(2000))]);
    expect(r.code, r.details).toBe(INVALID_ARGUMENT);
    expect(r.details).toMatch(/RSA key of 2048 to 4096 bits/);
    expect(r.ms).toBeLessThan(3000);
    expect(hosts).toBe(1);
    // Without a valid credential the CSR is never even read.
    const anonymous = await requestEnrollment(controllerEnroll, caPem, request("dos-2", { token: "rxj1_wrong", csrPem: hostile }), undefined, undefined, 5000).catch((e: { code: number }) => e);
    expect((anonymous as { code: number }).code).toBe(UNAUTHENTICATED);
    // The token was not spent by the refused request.
    const ok = await requestEnrollment(proxyEnroll, caPem, request("dos-3", { token: t }));
    expect(identityFromCertificate(ok.certificatePem).id).toBe("dos-3");
  });

  it("refuses a revoked zero certificate sent in the request body, through a proxy and on the controller's enroll listener", async () => {
    const zero = readCredentials(mesh.issue({ role: "enroll", scope: "default", id: "rack-7" }, join(work, "zero")));
    const signed = (hostId: string) => {
      const req = request(hostId, { tenant: "default" });
      req.bootstrapCertificatePem = zero.certPem;
      req.bootstrapSignature = signEnrollment(zero.keyPem, hostId, "default", req.csrPem);
      return req;
    };
    // Before revocation it works ...
    expect(identityFromCertificate((await requestEnrollment(proxyEnroll, caPem, signed("rack7-a"))).certificatePem).id).toBe("rack7-a");
    const channel = operatorChannel({}, mesh.exports());
    try {
      await clientFor(RevocationService, channel).revoke({ role: "enroll", scope: "default", id: "rack-7", reason: "left in a truck" });
    } finally {
      channel.close();
    }
    // ... after it, neither path enrolls anything.
    expect(await codeOf(requestEnrollment(proxyEnroll, caPem, signed("rack7-b")))).toBe(PERMISSION_DENIED);
    expect(await codeOf(requestEnrollment(controllerEnroll, caPem, signed("rack7-c")))).toBe(PERMISSION_DENIED);
  });

  it("a token bound to an existing host id cannot give it a new key; --rekey, by an operator allowed to, can, and is audited", async () => {
    const attacker = generateKeyPair();
    // h1 has a hand-issued certificate and is connected: a bound token must not move it to a new key.
    const bound = await token("--host-id", "h1");
    const taken = await requestEnrollment(proxyEnroll, caPem, request("h1", { token: bound, keys: attacker })).catch((e: { code: number; details: string }) => e);
    expect((taken as { code: number }).code).toBe(ALREADY_EXISTS);
    expect((taken as { details: string }).details).toMatch(/--rekey/);

    // Re-keying is its own policy action: an operator who may create tokens but not re-key cannot create such a token.
    const enroller = mesh.issue({ role: "operator", scope: "default", id: "en" }, join(work, "en"));
    const asEnroller = { REXMESH_CONTROLLER: mesh.controllerAddress, REXMESH_CERT: enroller.cert, REXMESH_KEY: enroller.key, REXMESH_CA: enroller.ca };
    expect((await rexmesh(["tokens", "create", "--host-id", "h1"], asEnroller)).code).toBe(0);
    const denied = await rexmesh(["tokens", "create", "--host-id", "h1", "--rekey"], asEnroller);
    expect(denied.code).not.toBe(0);
    expect(denied.stderr).toMatch(/PermissionDenied.*rekey/);
    // One who may not create tokens at all is refused at the boundary.
    const reading = await rexmesh(["tokens", "create", "--host-id", "h1", "--rekey"], { REXMESH_CONTROLLER: mesh.controllerAddress, REXMESH_CERT: reader.cert, REXMESH_KEY: reader.key, REXMESH_CA: reader.ca });
    expect(reading.stderr).toMatch(/PermissionDenied.*may not token/);
    // A re-key token names a host id, and only one of the caller's hosts.
    expect((await rexmesh(["tokens", "create", "--rekey"], mesh.exports())).stderr).toMatch(/--host-id/);
    expect((await rexmesh(["tokens", "create", "--rekey", "--host-id", "nobody"], mesh.exports())).stderr).toMatch(/NotFound/);

    const newKey = generateKeyPair();
    const rekey = await token("--host-id", "h1", "--rekey");
    const issued = await requestEnrollment(proxyEnroll, caPem, request("h1", { token: rekey, keys: newKey }));
    expect(identityFromCertificate(issued.certificatePem).id).toBe("h1");
    // The new key is now h1's: an ordinary bound token re-enrolls that key, not another one.
    expect(await codeOf(requestEnrollment(proxyEnroll, caPem, request("h1", { token: await token("--host-id", "h1"), keys: attacker })))).toBe(ALREADY_EXISTS);
    const again = await requestEnrollment(proxyEnroll, caPem, request("h1", { token: await token("--host-id", "h1"), keys: newKey }));
    expect(identityFromCertificate(again.certificatePem).id).toBe("h1");

    const audit = await rexmesh(["audit", "--json", "--limit", "1000"], mesh.exports());
    const events = audit.stdout.trim().split("\n").map((l) => JSON.parse(l) as { kind: string; decision: string; what: string; reason: string; hosts: string[] });
    expect(events.some((e) => e.kind === "create-join-token" && e.decision === "allowed" && /re-key/.test(e.what) && e.hosts.includes("h1"))).toBe(true);
    expect(events.some((e) => e.kind === "create-join-token" && e.decision === "denied" && /rekey/.test(e.reason))).toBe(true);
    expect(events.some((e) => e.kind === "enroll" && e.decision === "allowed" && /re-key/.test(e.what) && e.hosts.includes("h1"))).toBe(true);
  });

  it("stores refusals of huge host ids in the tenant's audit log truncated, not whole", async () => {
    const huge = "x".repeat(60_000);
    const t = await token("--uses", "100");
    const results = await Promise.all(Array.from({ length: 20 }, () => requestEnrollment(controllerEnroll, caPem, request(huge, { token: t, csrPem: "-" })).catch((e: { code: number }) => e.code)));
    for (const code of results) expect(code).toBe(INVALID_ARGUMENT);
    const { client, close } = operatorClient({}, mesh.exports());
    try {
      const { events } = await client.listAudit({ limit: 1000 });
      const refusals = events.filter((e) => e.kind === "enroll" && e.hostIds.some((h) => h.startsWith("xxxx")));
      expect(refusals.length).toBe(20);
      for (const e of refusals) {
        expect(e.hostIds[0]!.length).toBeLessThanOrEqual(256);
        expect(e.hostIds[0]!.endsWith(TRUNCATED)).toBe(true);
        expect(e.reason.length).toBeLessThanOrEqual(1000);
      }
    } finally {
      close();
    }
  });
});
