import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import http2 from "node:http2";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { readCredentials, type CredentialPaths } from "../../certs/files.js";
import type { PeerIdentity } from "../../certs/identity.js";
import { LocalMesh } from "../../cli/launcher.js";
import { sealBundle } from "../../common/bundle.js";
import { AsyncQueue } from "../../common/async-queue.js";
import { systemClock } from "../../common/clock.js";
import { clientFor, openChannel, type Channel } from "../../common/connect-dial.js";
import { ArtifactCacheService, ArtifactService } from "../../gen/rexmesh/v1/artifact_pb.js";
import { BundleKind } from "../../gen/rexmesh/v1/bundle_pb.js";
import { AuditDecision, ControllerService } from "../../gen/rexmesh/v1/controller_pb.js";
import { TokenService } from "../../gen/rexmesh/v1/enroll_pb.js";
import { ProxyLinkService, ProxyStreamRequestSchema } from "../../gen/rexmesh/v1/proxy_link_pb.js";
import { RevocationService } from "../../gen/rexmesh/v1/revocation_pb.js";
import { StepSchema, TaskState, TaskStatusSchema, type Step } from "../../gen/rexmesh/v1/task_pb.js";
import { collectJob, tempDir, writePolicy } from "./support.js";
import { testCa } from "../test-ca.js";

/**
 * Attack cases for each credential an operator of this mesh might hold
 * (issue 12): a controller with a policy, two tenants, and operators with
 * no role, narrow roles and full roles, calling every service with real
 * certificates over mutual TLS. Each case is a finding that once got
 * through; the test says what must happen instead.
 */
describe("authorization boundary under attack", () => {
  const work = tempDir("authz-attacks");
  const policyFile = writePolicy(
    work,
    `
roles:
  admin:
    hosts: all
    actions: ["*"]
    commands: ["*"]
    shell: true
  builder:
    hosts: all
    actions: ["*"]
    commands: ["*"]
    tools: ["*"]
  mesh:
    hosts: all
    actions: [revoke.proxy]
  web-ops:
    hosts: role=web
    actions: [read, submit, cancel]
    commands: [uptime, hostname, sleep]
  web-path:
    hosts: role=web
    actions: [submit]
    commands: [uptime]
    env: [PATH]
  web-submit:
    hosts: role=web
    actions: [read, submit]
    commands: [hostname]
  labeller:
    hosts: all
    actions: [label]
  web-reader:
    hosts: role=web
    actions: [read]
  web-revoker:
    hosts: role=web
    actions: [revoke]
  web-enroller:
    hosts: role=web
    actions: [read, token]
bindings:
  acme/dev: admin
  acme/admin: admin
  acme/builder: builder
  acme/meshadmin: mesh
  acme/web: web-ops
  acme/pathfinder: web-path
  acme/narrow: [web-submit, labeller]
  acme/reader: web-reader
  acme/webrevoker: web-revoker
  acme/webenroller: web-enroller
  beta/admin: admin
  beta/builder: builder
`,
  );
  const mesh = new LocalMesh({
    ca: testCa(),
    dir: join(work, "mesh"),
    regions: ["east", "west"],
    tenant: "acme",
    hosts: [
      { id: "web-1", region: "east" },
      { id: "db-1", region: "east" },
      { id: "web-2", region: "west" },
      { id: "bweb-1", region: "west", tenant: "beta" },
    ],
    controllerArgs: ["--policy", policyFile],
  });

  const channels: Channel[] = [];
  const ids: Record<string, CredentialPaths> = {};
  const as = (name: string) => {
    const channel = openChannel(mesh.controllerAddress, readCredentials(ids[name]!), ["controller"]);
    channels.push(channel);
    return {
      controller: clientFor(ControllerService, channel),
      tokens: clientFor(TokenService, channel),
      revocation: clientFor(RevocationService, channel),
      artifacts: clientFor(ArtifactService, channel),
    };
  };
  const issue = (identity: PeerIdentity, serves = false) => mesh.issue(identity, join(work, "ids", identity.role, identity.scope, identity.id), serves);

  async function failure(p: Promise<unknown>): Promise<ConnectError> {
    try {
      await p;
    } catch (err) {
      return ConnectError.from(err);
    }
    throw new Error("the call succeeded");
  }
  const exec = (...argv: string[]): Step => create(StepSchema, { tool: { case: "exec", value: { argv } } });
  const run = (hostIds: string[], steps: Step[], more: Record<string, unknown> = {}) => ({ hostIds, steps, ...more });
  async function* chunks(data: Uint8Array) {
    yield { digest: "", data };
  }
  const auditOf = async (who: string) => (await as(who).controller.listAudit({ limit: 1000 })).events;

  let admin: ReturnType<typeof as>;
  let adminArtifact: string;

  beforeAll(async () => {
    mesh.prepare();
    for (const [tenant, id] of [["acme", "admin"], ["acme", "builder"], ["acme", "meshadmin"], ["acme", "web"], ["acme", "pathfinder"], ["acme", "narrow"], ["acme", "reader"], ["acme", "webrevoker"], ["acme", "webenroller"], ["acme", "nobody"], ["beta", "admin"], ["beta", "builder"]] as const) {
      ids[`${tenant}/${id}`] = issue({ role: "operator", scope: tenant, id });
    }
    await mesh.startController();
    await mesh.startProxies();
    await mesh.startDaemons();
    await mesh.waitForHosts(3);
    admin = as("acme/admin");
    for (const [host, role] of [["web-1", "web"], ["web-2", "web"], ["db-1", "db"]] as const) await admin.controller.setHostLabels({ hostId: host, set: { role } });
    await as("beta/admin").controller.setHostLabels({ hostId: "bweb-1", set: { role: "web" } });
    adminArtifact = (await admin.artifacts.putArtifact(chunks(new TextEncoder().encode("#!/bin/sh\necho acme secret\n")))).digest;
  }, 120_000);

  afterAll(async () => {
    for (const c of channels) c.close();
    await mesh.stop();
  });

  describe("TokenService, RevocationService and ArtifactService need a policy action", () => {
    it("refuses a join token to an operator with no role", async () => {
      const err = await failure(as("acme/nobody").tokens.createJoinToken({ uses: 100_000 }));
      expect(err.code).toBe(Code.PermissionDenied);
    });

    it("lets an operator who may issue tokens for some hosts bind them to those hosts only: no token for any host id", async () => {
      // An unbound token would let any new host id join the tenant, where other operators' jobs (--all) reach it.
      const unbound = await failure(as("acme/webenroller").tokens.createJoinToken({ uses: 10 }));
      expect(unbound.code).toBe(Code.PermissionDenied);
      expect(unbound.rawMessage).toMatch(/may not create a join token for any host id .*needs a role with hosts "all"/);
      const elsewhere = await failure(as("acme/webenroller").tokens.createJoinToken({ hostId: "db-1" }));
      expect(elsewhere.code).toBe(Code.PermissionDenied);
      const bound = await as("acme/webenroller").tokens.createJoinToken({ hostId: "web-1" });
      expect(bound.token).toMatch(/^rxj1_/);
      // Nor may it stop every enrollment of the tenant by revoking its zero certificate.
      const zero = await failure(as("acme/webenroller").revocation.revoke({ role: "enroll", id: "rack-1", reason: "test" }));
      expect(zero.code).toBe(Code.PermissionDenied);
      expect(zero.rawMessage).toMatch(/needs a role with hosts "all"/);
    });

    it("refuses revocation of another operator to an operator with no role", async () => {
      const err = await failure(as("acme/nobody").revocation.revoke({ role: "operator", id: "victim" }));
      expect(err.code).toBe(Code.PermissionDenied);
    });

    it("keeps the tenant's enrollment credential (a zero certificate) out of reach of an operator who may revoke only some hosts", async () => {
      const err = await failure(as("acme/webrevoker").revocation.revoke({ role: "enroll", id: "rack-1", reason: "test" }));
      expect(err.code).toBe(Code.PermissionDenied);
      expect(err.rawMessage).toMatch(/token/);
    });

    it("keeps proxies (shared by every tenant) out of reach of a tenant's admin", async () => {
      const err = await failure(as("beta/admin").revocation.revoke({ role: "proxy", scope: "west", id: "px-spare" }));
      expect(err.code).toBe(Code.PermissionDenied);
    });

    it("keeps another tenant's hosts and operators out of reach", async () => {
      expect((await failure(as("beta/admin").revocation.revoke({ role: "host", scope: "acme", id: "web-1" }))).code).toBe(Code.PermissionDenied);
      expect((await failure(as("beta/admin").revocation.revoke({ role: "operator", scope: "acme", id: "admin" }))).code).toBe(Code.PermissionDenied);
    });

    it("shows the deny-list of the caller's own tenant only", async () => {
      await as("beta/admin").revocation.revoke({ role: "host", id: "bghost-1", reason: "test" });
      const { denyList } = await admin.revocation.listRevoked({});
      expect(denyList!.entries.map((e) => e.uri)).not.toContain("rexmesh://host/beta/bghost-1");
    });

    it("refuses artifacts to an operator with no role, and another tenant's artifacts to anyone", async () => {
      const nobody = as("acme/nobody");
      const read = async (client: ReturnType<typeof as>["artifacts"], digest: string) => {
        for await (const _ of client.getArtifact({ digest })) {
          /* drain */
        }
      };
      expect((await failure(read(nobody.artifacts, adminArtifact))).code).toBe(Code.PermissionDenied);
      expect((await failure(nobody.artifacts.putArtifact(chunks(new Uint8Array([1, 2, 3]))))).code).toBe(Code.PermissionDenied);
      // Beta holds the digest (it is no secret) but not the artifact: it does not exist for beta.
      expect((await failure(read(as("beta/admin").artifacts, adminArtifact))).code).toBe(Code.NotFound);
      // Nor can beta run it on its hosts, with a role that allows scripts.
      const script = create(StepSchema, { tool: { case: "script", value: { artifact: adminArtifact } } });
      expect((await failure(as("beta/builder").controller.submitJob(run(["bweb-1"], [script])))).code).toBe(Code.NotFound);
    });

    it("answers NOT_FOUND, not INTERNAL, for an artifact that does not exist", async () => {
      const digest = `sha256:${createHash("sha256").update("nothing here").digest("hex")}`;
      const err = await failure((async () => {
        for await (const _ of admin.artifacts.getArtifact({ digest })) {
          /* drain */
        }
      })());
      expect(err.code).toBe(Code.NotFound);
    });
  });

  describe("hosts scope every operation", () => {
    it("refuses to cancel a job on hosts outside the operator's role", async () => {
      const { job } = await admin.controller.submitJob(run(["db-1"], [exec("sleep", "30")]));
      try {
        const err = await failure(as("acme/web").controller.cancelJob({ jobId: job!.id }));
        expect(err.code).toBe(Code.PermissionDenied);
        expect(err.rawMessage).toContain("db-1");
      } finally {
        await admin.controller.cancelJob({ jobId: job!.id });
      }
    });

    it("lets an operator cancel its own job on its own hosts", async () => {
      const web = as("acme/web");
      const { job } = await web.controller.submitJob(run(["web-1"], [exec("sleep", "30")]));
      const { job: after } = await web.controller.cancelJob({ jobId: job!.id });
      expect(after!.id).toBe(job!.id);
    });

    it("never lets a label change widen the caller's own reach", async () => {
      const narrow = as("acme/narrow");
      const err = await failure(narrow.controller.setHostLabels({ hostId: "db-1", set: { role: "web" } }));
      expect(err.code).toBe(Code.PermissionDenied);
      expect((await failure(narrow.controller.submitJob(run(["db-1"], [exec("hostname")])))).code).toBe(Code.PermissionDenied);
      // A label that moves nothing in or out of the caller's roles is fine.
      const { host } = await narrow.controller.setHostLabels({ hostId: "web-1", set: { owner: "narrow" } });
      expect(host!.labels).toMatchObject({ role: "web", owner: "narrow" });
    });

    it("shows an operator only the hosts, jobs and tasks its read roles cover", async () => {
      const reader = as("acme/reader");
      const { hosts } = await reader.controller.listHosts({});
      expect(hosts.map((h) => h.id)).toEqual(["web-1", "web-2"]);
      const dbOnly = (await admin.controller.submitJob(run(["db-1"], [exec("hostname")]))).job!;
      const mixed = (await admin.controller.submitJob(run(["web-1", "db-1"], [exec("hostname")]))).job!;
      await collectJob(admin.controller, mixed.id);
      expect((await failure(reader.controller.getJob({ jobId: dbOnly.id }))).code).toBe(Code.NotFound);
      const { jobs } = await reader.controller.listJobs({ limit: 1000 });
      expect(jobs.map((j) => j.id)).not.toContain(dbOnly.id);
      expect(jobs.map((j) => j.id)).toContain(mixed.id);
      const got = await reader.controller.getJob({ jobId: mixed.id });
      expect(got.tasks.map((t) => t.hostId)).toEqual(["web-1"]);
      const watched = await collectJob(reader.controller, mixed.id);
      expect([...watched.tasks.keys()]).toEqual(["web-1"]);
      expect([...watched.stdout.keys()]).toEqual(["web-1"]);
      expect((await failure(collectJob(reader.controller, dbOnly.id))).code).toBe(Code.NotFound);
    });
  });

  describe("submit", () => {
    it("authorizes an idempotent replay like a new submit, and never hands out another request's job", async () => {
      const original = (await admin.controller.submitJob(run(["db-1"], [exec("hostname")], { idempotencyKey: "nightly" }))).job!;
      const web = as("acme/web");
      expect((await failure(web.controller.submitJob(run(["db-1"], [exec("hostname")], { idempotencyKey: "nightly" })))).code).toBe(Code.PermissionDenied);
      expect((await failure(web.controller.submitJob(run(["web-1"], [exec("hostname")], { idempotencyKey: "nightly" })))).code).toBe(Code.AlreadyExists);
      // The same request again is the same job.
      expect((await admin.controller.submitJob(run(["db-1"], [exec("hostname")], { idempotencyKey: "nightly" }))).job!.id).toBe(original.id);
    });

    it("refuses environment variables that change what runs, unless the role allows them", async () => {
      const web = as("acme/web");
      for (const env of [{ PATH: "/home/attacker/bin" }, { LD_PRELOAD: "/tmp/evil.so" }, { LD_LIBRARY_PATH: "/tmp" }, { BASH_ENV: "/tmp/x" }]) {
        const err = await failure(web.controller.submitJob(run(["web-1"], [exec("uptime")], { env })));
        expect(err.code, JSON.stringify(env)).toBe(Code.PermissionDenied);
        expect(err.rawMessage).toContain(Object.keys(env)[0]);
      }
      const ok = await web.controller.submitJob(run(["web-1"], [exec("uptime")], { env: { GREETING: "hello" } }));
      expect(ok.job!.id).toMatch(/^j/);
      // A role that names PATH may set it.
      const path = await as("acme/pathfinder").controller.submitJob(run(["web-1"], [exec("uptime")], { env: { PATH: "/usr/bin:/bin" } }));
      expect(path.job!.id).toMatch(/^j/);
    });

    it("checks the program that will run: no relative path with a slash", async () => {
      const err = await failure(as("acme/web").controller.submitJob(run(["web-1"], [exec("./uptime")])));
      expect(err.code).toBe(Code.PermissionDenied);
    });

    it("governs every tool the same way: ping for every role that may submit, script and file.put only where named", async () => {
      const ping = create(StepSchema, { tool: { case: "ping", value: {} } });
      const r = await admin.controller.submitJob(run(["web-1"], [ping]));
      expect((await collectJob(admin.controller, r.job!.id)).tasks.get("web-1")!.state).toBe(TaskState.SUCCEEDED);
      expect((await as("acme/web").controller.submitJob(run(["web-1"], [ping]))).job!.id).toMatch(/^j/);
      const script = create(StepSchema, { tool: { case: "script", value: { artifact: adminArtifact } } });
      // admin allows shell but names no tools: a script runs arbitrary code, so it is refused...
      expect((await failure(admin.controller.submitJob(run(["web-1"], [script])))).code).toBe(Code.PermissionDenied);
      // ...while `tools: ["*"]` allows it.
      const builder = as("acme/builder");
      const b = await builder.controller.submitJob(run(["web-1"], [script]));
      expect(Buffer.from((await collectJob(builder.controller, b.job!.id)).stdout.get("web-1")!).toString()).toBe("acme secret\n");
    });
  });

  describe("bundles and the proxies' servers", () => {
    it("refuses a results bundle that reports tasks of another region", async () => {
      const { job } = await admin.controller.submitJob(run(["db-1"], [exec("sleep", "30")]));
      try {
        const { tasks } = await admin.controller.getJob({ jobId: job!.id });
        const site = readCredentials(issue({ role: "proxy", scope: "west", id: "px-site" }, true));
        const forged = create(TaskStatusSchema, { taskId: tasks[0]!.id, state: TaskState.SUCCEEDED, exitCode: 0, hostId: "db-1" });
        const bundle = sealBundle({ kind: BundleKind.RESULTS, region: "west", proxy: "px-site", statuses: [forged] }, site, systemClock, "r-forged");
        const err = await failure(admin.controller.importBundle({ bundle }));
        expect(err.code).toBe(Code.PermissionDenied);
        const after = await admin.controller.getJob({ jobId: job!.id });
        expect(after.tasks[0]!.state).not.toBe(TaskState.SUCCEEDED);
      } finally {
        await admin.controller.cancelJob({ jobId: job!.id });
      }
    });

    it("refuses a results bundle signed by a revoked proxy", async () => {
      const { job } = await admin.controller.submitJob(run(["db-1"], [exec("sleep", "30")]));
      try {
        const { tasks } = await admin.controller.getJob({ jobId: job!.id });
        const site = readCredentials(issue({ role: "proxy", scope: "east", id: "px-stolen" }, true));
        await as("acme/meshadmin").revocation.revoke({ role: "proxy", scope: "east", id: "px-stolen", reason: "test" });
        const forged = create(TaskStatusSchema, { taskId: tasks[0]!.id, state: TaskState.SUCCEEDED, exitCode: 0, hostId: "db-1" });
        const bundle = sealBundle({ kind: BundleKind.RESULTS, region: "east", proxy: "px-stolen", statuses: [forged] }, site, systemClock, "r-stolen");
        const err = await failure(admin.controller.importBundle({ bundle }));
        expect(err.code).toBe(Code.PermissionDenied);
        expect(err.rawMessage).toMatch(/revoked/);
      } finally {
        await admin.controller.cancelJob({ jobId: job!.id });
      }
    });

    it("answers a revoked proxy on ProxyLink with PERMISSION_DENIED, and logs it", async () => {
      const rogue = readCredentials(issue({ role: "proxy", scope: "east", id: "px-rogue" }, true));
      await as("acme/meshadmin").revocation.revoke({ role: "proxy", scope: "east", id: "px-rogue", reason: "test" });
      const channel = openChannel(mesh.controllerAddress, rogue, ["controller"]);
      channels.push(channel);
      const out = new AsyncQueue<ReturnType<typeof create<typeof ProxyStreamRequestSchema>>>();
      out.push(create(ProxyStreamRequestSchema, { hello: { name: "px-rogue", region: "east" } }));
      const err = await failure((async () => {
        for await (const _ of clientFor(ProxyLinkService, channel).proxyStream(out)) {
          /* drain */
        }
      })());
      out.close();
      expect(err.code).toBe(Code.PermissionDenied);
      expect(readFileSync(mesh.controller.logFile, "utf8")).toMatch(/refused.*px-rogue|px-rogue.*refused/);
    });

    it("refuses artifacts to a revoked host at its proxy", async () => {
      const ghost = readCredentials(issue({ role: "host", scope: "acme", id: "ghost-1" }));
      const proxy = mesh.proxies.find((p) => p.region === "east")!;
      const channel = openChannel(proxy.address!, ghost, ["proxy"]);
      channels.push(channel);
      const cache = clientFor(ArtifactCacheService, channel);
      expect((await cache.getArtifactChunk({ digest: adminArtifact, offset: 0n })).size).toBeGreaterThan(0n);
      await admin.revocation.revoke({ role: "host", id: "ghost-1", reason: "test" });
      // The deny-list reaches the proxy over its link; from then on the host is refused.
      const end = Date.now() + 10_000;
      let code: Code | undefined;
      while (code === undefined && Date.now() < end) {
        code = await cache.getArtifactChunk({ digest: adminArtifact, offset: 0n }).then(
          () => undefined,
          (e) => ConnectError.from(e).code,
        );
        if (code === undefined) await new Promise((r) => setTimeout(r, 50));
      }
      expect(code).toBe(Code.PermissionDenied);
    });
  });

  describe("malformed requests", () => {
    const post = (path: string, contentType: string, body: Buffer) =>
      new Promise<{ status: number; headers: http2.IncomingHttpHeaders; trailers: http2.IncomingHttpHeaders; body: string }>((resolve, reject) => {
        const creds = readCredentials(ids["acme/admin"]!);
        const session = http2.connect(`https://${mesh.controllerAddress}`, { ca: creds.caPem, cert: creds.certPem, key: creds.keyPem, servername: "localhost" });
        session.on("error", reject);
        const req = session.request({ ":method": "POST", ":path": path, "content-type": contentType, te: "trailers" });
        let headers: http2.IncomingHttpHeaders = {};
        let trailers: http2.IncomingHttpHeaders = {};
        const parts: Buffer[] = [];
        req.on("response", (h) => (headers = h));
        req.on("trailers", (t) => (trailers = t));
        req.on("data", (d: Buffer) => parts.push(d));
        req.on("end", () => {
          session.close();
          resolve({ status: Number(headers[":status"]), headers, trailers, body: Buffer.concat(parts).toString() });
        });
        req.on("error", reject);
        req.end(body);
      });
    // Field 1 (target, a string) with a length running past the end: not a message.
    const garbage = Buffer.from([0x0a, 0x7f, 0x01]);
    const envelope = (b: Buffer) => Buffer.concat([Buffer.from([0, 0, 0, 0, b.length]), b]);

    it("answers INVALID_ARGUMENT to malformed protobuf over gRPC, and logs it", async () => {
      const r = await post("/rexmesh.v1.ControllerService/ListHosts", "application/grpc", envelope(garbage));
      const status = r.trailers["grpc-status"] ?? r.headers["grpc-status"];
      expect(status).toBe(String(Code.InvalidArgument));
      expect(readFileSync(mesh.controller.logFile, "utf8")).toMatch(/malformed/i);
    });

    it("answers INVALID_ARGUMENT to malformed protobuf over Connect", async () => {
      const r = await post("/rexmesh.v1.ControllerService/ListHosts", "application/proto", garbage);
      expect(r.status).toBe(400);
      expect(JSON.parse(r.body)).toMatchObject({ code: "invalid_argument" });
    });

    it("answers INVALID_ARGUMENT to malformed protobuf over gRPC-Web", async () => {
      const r = await post("/rexmesh.v1.ControllerService/ListHosts", "application/grpc-web+proto", envelope(garbage));
      expect(r.body).toMatch(new RegExp(`grpc-status: ?${Code.InvalidArgument}\r\n`));
    });
  });

  it("audits every decision with its action", async () => {
    const events = await auditOf("acme/admin");
    const denied = (kind: string, actor: string) => events.some((e) => e.kind === kind && e.actor === actor && e.decision === AuditDecision.DENIED);
    expect(denied("token", "operator:acme/nobody")).toBe(true);
    expect(denied("revoke.operator", "operator:acme/nobody")).toBe(true);
    expect(denied("artifact.read", "operator:acme/nobody")).toBe(true);
    expect(denied("artifact.write", "operator:acme/nobody")).toBe(true);
    expect(denied("cancel", "operator:acme/web")).toBe(true);
    expect(denied("label", "operator:acme/narrow")).toBe(true);
    expect(events.some((e) => e.kind === "read" && e.actor === "operator:acme/reader" && e.decision === AuditDecision.ALLOWED)).toBe(true);
  });
});
