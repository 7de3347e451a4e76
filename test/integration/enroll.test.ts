import { spawn, type ChildProcess } from "node:child_process";
import { X509Certificate } from "node:crypto";
import { closeSync, openSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { generateKeyPair } from "../../certs/ca.js";
import { createCsr, signEnrollment } from "../../certs/enrollment.js";
import { readCredentials } from "../../certs/files.js";
import { identityFromCertificate } from "../../certs/identity.js";
import { operatorClient } from "../../cli/client.js";
import { LocalMesh, REXMESH_BIN } from "../../cli/launcher.js";
import { requestEnrollment } from "../../daemon/enroll.js";
import { SubmitJobRequestSchema } from "../../gen/rexmesh/v1/controller_pb.js";
import { EnrollRequestSchema } from "../../gen/rexmesh/v1/enroll_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { clientOf, collectJob, rexmesh, tempDir } from "./support.js";
import { testCa } from "../test-ca.js";

const ALREADY_EXISTS = 6;
const PERMISSION_DENIED = 7;
const UNAVAILABLE = 14;
const UNAUTHENTICATED = 16;

/** Enrollment (issue 4): bootstrap credentials turn into host certificates, through a proxy. */
describe("enrollment", () => {
  const mesh = new LocalMesh({
    ca: testCa(),
    dir: tempDir("enroll"),
    regions: ["east"],
    hosts: [],
    proxyArgs: ["--enroll-listen", "127.0.0.1:0"],
    controllerArgs: ["--host-cert-ttl", "2h"],
  });
  const spawned: ChildProcess[] = [];
  let enrollAddress = "";
  let caPem = "";
  const keys = generateKeyPair();

  beforeAll(async () => {
    await mesh.start();
    enrollAddress = String(mesh.proxies[0]!.info!.enrollAddress);
    caPem = readFileSync(mesh.caCertFile, "utf8");
  });
  afterAll(async () => {
    for (const p of spawned) p.kill("SIGTERM");
    await mesh.stop();
  });

  async function createToken(...args: string[]): Promise<string> {
    const r = await rexmesh(["tokens", "create", "--json", ...args], mesh.exports());
    expect(r.code, r.stderr).toBe(0);
    return (JSON.parse(r.stdout) as { token: string }).token;
  }

  function enrollRequest(hostId: string, fields: { token?: string; tenant?: string; csrPem?: string } = {}) {
    return create(EnrollRequestSchema, { hostId, csrPem: fields.csrPem ?? createCsr(hostId, keys), token: fields.token ?? "", tenant: fields.tenant ?? "" });
  }

  async function refusal(p: Promise<unknown>): Promise<number> {
    const err = await p.then(
      () => undefined,
      (e: unknown) => e as { code: number },
    );
    expect(err, "the enrollment should have been refused").toBeDefined();
    return err!.code;
  }

  it("the proxy reports its enroll address", () => {
    expect(enrollAddress).toMatch(/^127\.0\.0\.1:\d+$/);
  });

  it("a fresh daemon with only a one-use token enrolls through the proxy and runs a job", async () => {
    const token = await createToken("--tenant", "default", "--uses", "1");
    const dir = join(mesh.dir, "hosts", "fresh");
    const log = openSync(join(mesh.dir, "logs", "daemon-fresh.log"), "a");
    const proc = spawn(
      process.execPath,
      [REXMESH_BIN, "daemon", "--proxies", mesh.proxies[0]!.address!, "--identities", dir, "--host-id", "fresh-1", "--enroll-via", enrollAddress, "--ca", mesh.caCertFile, "--data", join(mesh.dir, "data", "fresh")],
      { stdio: ["ignore", log, log], env: { ...process.env, REXMESH_JOIN_TOKEN: token } },
    );
    closeSync(log);
    spawned.push(proc);
    await mesh.waitForHosts(1);

    expect(statSync(join(dir, "fresh-1.key")).mode & 0o777).toBe(0o600);
    const cert = new X509Certificate(readFileSync(join(dir, "fresh-1.crt")));
    expect(identityFromCertificate(cert)).toEqual({ role: "host", scope: "default", id: "fresh-1" });
    // --host-cert-ttl 2h (plus the 5 minutes every certificate is backdated).
    expect(Date.parse(cert.validTo) - Date.parse(cert.validFrom)).toBe(2 * 3_600_000 + 5 * 60_000);

    const conn = clientOf(mesh);
    try {
      const { job } = await conn.client.submitJob(create(SubmitJobRequestSchema, { hostIds: ["fresh-1"], steps: [{ tool: { case: "shell", value: { script: 'echo "enrolled $REXMESH_HOST_ID"' } } }] }));
      const r = await collectJob(conn.client, job!.id);
      expect(r.tasks.get("fresh-1")?.state).toBe(TaskState.SUCCEEDED);
      expect(r.stdout.get("fresh-1")?.toString()).toBe("enrolled fresh-1\n");
    } finally {
      conn.close();
    }
    // The token is spent, and the host id is now fresh-1's: neither can be used again.
    expect(await refusal(requestEnrollment(enrollAddress, caPem, enrollRequest("fresh-2", { token })))).toBe(UNAUTHENTICATED);
    const another = await createToken();
    expect(await refusal(requestEnrollment(enrollAddress, caPem, enrollRequest("fresh-1", { token: another })))).toBe(ALREADY_EXISTS);
  });

  it("refuses an expired token and a token bound to another host id", async () => {
    const expiring = await createToken("--ttl", "1s");
    // Token lifetimes are checked against the controller's clock: wait one out.
    await new Promise((r) => setTimeout(r, 1100));
    expect(await refusal(requestEnrollment(enrollAddress, caPem, enrollRequest("late-1", { token: expiring })))).toBe(UNAUTHENTICATED);

    const bound = await createToken("--host-id", "web-7");
    expect(await refusal(requestEnrollment(enrollAddress, caPem, enrollRequest("web-8", { token: bound })))).toBe(PERMISSION_DENIED);
    // ... while the host it is bound to can use it.
    const ok = await requestEnrollment(enrollAddress, caPem, enrollRequest("web-7", { token: bound }));
    expect(identityFromCertificate(ok.certificatePem).id).toBe("web-7");
  });

  it("enrolls with a zero certificate of the tenant, refuses one of another tenant, and the zero certificate can do nothing else", async () => {
    const zero = readCredentials(mesh.issue({ role: "enroll", scope: "default", id: "rack-1" }, join(mesh.dir, "zero")));
    const foreign = readCredentials(mesh.issue({ role: "enroll", scope: "globex", id: "rack-9" }, join(mesh.dir, "zero-globex")));
    const signed = (hostId: string, tenant: string, z: { certPem: string; keyPem: string }) => {
      const req = enrollRequest(hostId, { tenant });
      req.bootstrapCertificatePem = z.certPem;
      req.bootstrapSignature = signEnrollment(z.keyPem, hostId, tenant, req.csrPem);
      return req;
    };
    // Through the proxy (the signature carries the proof) ...
    const viaProxy = await requestEnrollment(enrollAddress, caPem, signed("zero-1", "default", zero));
    expect(identityFromCertificate(viaProxy.certificatePem)).toEqual({ role: "host", scope: "default", id: "zero-1" });
    // ... and directly to the controller's main port over mTLS with the zero certificate.
    const direct = await requestEnrollment(mesh.controllerAddress, caPem, enrollRequest("zero-2"), zero);
    expect(identityFromCertificate(direct.certificatePem).scope).toBe("default");

    expect(await refusal(requestEnrollment(enrollAddress, caPem, signed("zero-3", "default", foreign)))).toBe(PERMISSION_DENIED);
    expect(await refusal(requestEnrollment(mesh.controllerAddress, caPem, enrollRequest("zero-4", { tenant: "default" }), foreign))).toBe(PERMISSION_DENIED);

    const paths = join(mesh.dir, "zero");
    const { client, close } = operatorClient({ controller: mesh.controllerAddress, cert: join(paths, "rack-1.crt"), key: join(paths, "rack-1.key"), ca: join(paths, "ca.crt") }, {});
    try {
      const err = await client.listHosts({}).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(ConnectError);
      expect((err as ConnectError).code).toBe(Code.PermissionDenied);
    } finally {
      close();
    }
  });

  // Last: the burst fills the proxy's open listener for a while (connections per address), as it is meant to.
  it("100 parallel enrollments with one one-use token give exactly one certificate", async () => {
    const token = await createToken("--uses", "1");
    const csrPem = createCsr("race", keys);
    const results = await Promise.allSettled(Array.from({ length: 100 }, (_, i) => requestEnrollment(enrollAddress, caPem, enrollRequest(`race-${i}`, { token, csrPem }))));
    const issued = results.filter((r) => r.status === "fulfilled");
    expect(issued).toHaveLength(1);
    for (const r of results) {
      // UNAVAILABLE: beyond its connections per address the proxy's open listener refuses (daemons retry).
      if (r.status === "rejected") expect([PERMISSION_DENIED, UNAUTHENTICATED, UNAVAILABLE], String(r.reason)).toContain((r.reason as { code: number }).code);
    }
    const cert = (issued[0] as PromiseFulfilledResult<{ certificatePem: string }>).value.certificatePem;
    expect(identityFromCertificate(cert).id).toMatch(/^race-\d+$/);
    // The listener sheds the burst: within seconds it answers a new caller from the same address again.
    const deadline = Date.now() + 10_000;
    let code = UNAVAILABLE;
    while (code === UNAVAILABLE && Date.now() < deadline) {
      code = await refusal(requestEnrollment(enrollAddress, caPem, enrollRequest("after-burst", { token })));
      if (code === UNAVAILABLE) await new Promise((r) => setTimeout(r, 250));
    }
    expect(code).toBe(UNAUTHENTICATED);
  });

});
