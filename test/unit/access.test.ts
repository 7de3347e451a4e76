import { describe, expect, it } from "vitest";
import { createHash } from "node:crypto";
import { newReleaseKeyPair, signRelease } from "../../common/release.js";
import type { DescMethod } from "@bufbuild/protobuf";
import type { PeerIdentity } from "../../certs/identity.js";
import { ManualClock } from "../../common/clock.js";
import { AlreadyExistsError, NotFoundError, PermissionDeniedError, UnauthenticatedError } from "../../common/errors.js";
import { silentLogger } from "../../common/logger.js";
import type { Call } from "../../common/rpc-access.js";
import { OperatorAccess } from "../../controller/access.js";
import { AuditLog, MemoryAuditStore } from "../../controller/audit.js";
import { Authorizer } from "../../controller/authz.js";
import { CONTROLLER_DECLARATIONS } from "../../controller/declarations.js";
import { Inventory } from "../../controller/inventory.js";
import { MemoryJobStore } from "../../controller/job-store.js";
import { JobManager, type SubmitRequest } from "../../controller/jobs.js";
import { ArtifactService } from "../../gen/rexmesh/v1/artifact_pb.js";
import { ControllerService } from "../../gen/rexmesh/v1/controller_pb.js";
import { TokenService } from "../../gen/rexmesh/v1/enroll_pb.js";
import { ProxyLinkService } from "../../gen/rexmesh/v1/proxy_link_pb.js";
import { RevocationService } from "../../gen/rexmesh/v1/revocation_pb.js";
import { create } from "@bufbuild/protobuf";
import { StepSchema, TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { counterIds, execStep, operator } from "./support.js";

const POLICY = `
roles:
  admin: { hosts: all, actions: ["*"], commands: ["*"], tools: ["*"] }
  web-ops: { hosts: role=web, actions: [read, submit, cancel, token], commands: [hostname] }
  reader: { hosts: role=web, actions: [read] }
bindings:
  acme/admin: admin
  acme/web: web-ops
  acme/reader: reader
`;

async function setup() {
  const clock = new ManualClock();
  const ids = counterIds();
  const inventory = new Inventory();
  const jobs = new JobManager({ store: new MemoryJobStore(), inventory, clock, ids, log: silentLogger });
  jobs.start();
  const audit = new AuditLog({ store: new MemoryAuditStore(), clock, ids });
  const authz = new Authorizer({ policyFile: "p.yaml", log: silentLogger, readFile: () => POLICY });
  const held = new Set<string>();
  const access = new OperatorAccess({ authz, audit, jobs, inventory, log: silentLogger, artifacts: { has: (tenant, digest) => held.has(`${tenant} ${digest}`) } });
  for (const [id, role] of [["web-1", "web"], ["db-1", "db"]] as const) {
    inventory.connected({ id, tenant: "acme" }, "eu", "px", clock.now());
    await inventory.setLabels("acme", id, { set: { role }, remove: [] });
  }
  const call = (method: DescMethod, peer: PeerIdentity | undefined, request?: unknown, revoked = false): Call => ({ declared: CONTROLLER_DECLARATIONS.get(method)!, peer, revoked, request });
  return { access, audit, jobs, held, call, admin: operator("acme", "admin"), web: operator("acme", "web"), reader: operator("acme", "reader"), nobody: operator("acme", "nobody") };
}

const request = (more: Partial<SubmitRequest>): SubmitRequest => ({ hostIds: [], allHosts: false, steps: [execStep("hostname")], env: {}, workingDir: "", stdin: new Uint8Array(), timeoutMs: 0, deliveryDeadlineMs: 0, idempotencyKey: "", idempotent: false, ...more });

describe("the controller's boundary decisions", () => {
  it("admits by certificate, then by policy action, and audits every refusal with its action", async () => {
    const t = await setup();
    await expect(t.access.decideCall(t.call(TokenService.method.createJoinToken, t.nobody, {}))).rejects.toThrow(/no role/);
    await expect(t.access.decideCall(t.call(ArtifactService.method.putArtifact, t.web))).rejects.toThrow(PermissionDeniedError);
    await expect(t.access.decideCall(t.call(ControllerService.method.listHosts, undefined, {}))).rejects.toThrow(UnauthenticatedError);
    await expect(t.access.decideCall(t.call(ControllerService.method.listHosts, t.admin, {}, true))).rejects.toThrow(/revoked/);
    await expect(t.access.decideCall(t.call(ControllerService.method.listHosts, { role: "host", scope: "acme", id: "web-1" }, {}))).rejects.toThrow(/a host certificate cannot be used here/);
    await expect(t.access.decideCall(t.call(RevocationService.method.revoke, t.admin, { role: "proxy", scope: "eu", id: "px" }))).rejects.toThrow(/may not revoke\.proxy/);
    expect(t.audit.list("acme").map((e) => `${e.kind} ${e.actor} ${e.decision}`)).toEqual([
      "token operator:acme/nobody denied",
      "artifact.write operator:acme/web denied",
      "read operator:acme/admin denied",
      "read host:acme/web-1 denied",
      "revoke.proxy operator:acme/admin denied",
    ]);
    // (The unidentified caller has no tenant: its refusal is kept, out of every tenant's view.)
  });

  it("decides a token bound to a host on that host, an unbound one only for a role on all hosts, and audits each", async () => {
    const t = await setup();
    await expect(t.access.decideCall(t.call(TokenService.method.createJoinToken, t.web, { hostId: "db-1" }))).rejects.toThrow(/outside role web-ops/);
    expect(await t.access.decideCall(t.call(TokenService.method.createJoinToken, t.web, { hostId: "web-1" }))).toMatchObject({ action: "token", by: "web-ops" });
    // An id the controller does not know is judged by its id alone: not role=web.
    await expect(t.access.decideCall(t.call(TokenService.method.createJoinToken, t.web, { hostId: "new-1" }))).rejects.toThrow(PermissionDeniedError);
    // An unbound token lets any new host id join the tenant, where other operators' jobs reach it: web-ops may not.
    await expect(t.access.decideCall(t.call(TokenService.method.createJoinToken, t.web, { hostId: "" }))).rejects.toThrow(
      'operator acme/web may not create a join token for any host id (one not bound with --host-id): its roles grant token only on some hosts, web-ops (hosts: role = web); that needs a role with hosts "all"',
    );
    expect(await t.access.decideCall(t.call(TokenService.method.createJoinToken, t.admin, { hostId: "" }))).toMatchObject({ action: "token", by: "admin" });
    const events = t.audit.list("acme");
    expect(events.map((e) => `${e.kind} ${e.actor} ${e.decision} ${e.hostIds.join(",")}`)).toEqual([
      "token operator:acme/web denied db-1",
      "token operator:acme/web allowed web-1",
      "token operator:acme/web denied new-1",
      "token operator:acme/web denied ",
      "token operator:acme/admin allowed ",
    ]);
    // A call decided on resolved hosts is left to the method it reaches (no event yet); a proxy is admitted by its role.
    expect(await t.access.decideCall(t.call(ControllerService.method.cancelJob, t.web, { jobId: "j", hostIds: [] }))).toMatchObject({ action: "cancel" });
    expect(await t.access.decideCall(t.call(ProxyLinkService.method.proxyStream, { role: "proxy", scope: "eu", id: "px" }))).toMatchObject({ action: "link" });
    expect(t.audit.list("acme")).toHaveLength(5);
  });
});

describe("scopes decided on resolved hosts", () => {
  it("cancels only where a cancel role covers every host of the job", async () => {
    const t = await setup();
    const job = await t.access.submit(t.admin, request({ hostIds: ["web-1", "db-1"] }));
    await expect(t.access.cancel(t.web, job.id)).rejects.toThrow(/may not cancel on 1 host outside role web-ops .*db-1/);
    const own = await t.access.submit(t.web, request({ hostIds: ["web-1"] }));
    expect((await t.access.cancel(t.web, own.id)).cancelRequested).toBe(true);
  });

  it("cancels a job on some of its hosts where a cancel role covers those hosts: the others go on", async () => {
    const t = await setup();
    const job = await t.access.submit(t.admin, request({ hostIds: ["web-1", "db-1"] }));
    // Not on db-1, which web-ops does not cover; nor on a host the job has no task on.
    await expect(t.access.cancel(t.web, job.id, ["db-1"])).rejects.toThrow(/may not cancel on 1 host outside role web-ops .*db-1/);
    await expect(t.access.cancel(t.web, job.id, ["web-1", "web-9"])).rejects.toThrow(/has no task on web-9/);
    const after = await t.access.cancel(t.web, job.id, ["web-1"]);
    expect(after.cancelRequested).toBeFalsy();
    const states = Object.fromEntries(t.jobs.tasksOf(after).map((x) => [x.hostId, TaskState[x.state]]));
    expect(states["web-1"]).toBe("CANCELLED");
    expect(states["db-1"]).not.toBe("CANCELLED");
    expect(t.audit.list("acme").filter((e) => e.kind === "cancel").map((e) => `${e.decision} ${e.hostIds.join(",")}`)).toEqual(["denied db-1", "rejected ", "allowed web-1"]);
  });

  it("shows a job only with the tasks a read role covers, and a job with none as missing", async () => {
    const t = await setup();
    const mixed = await t.access.submit(t.admin, request({ hostIds: ["web-1", "db-1"] }));
    const db = await t.access.submit(t.admin, request({ hostIds: ["db-1"] }));
    expect((await t.access.getJob(t.reader, mixed.id)).tasks.map((x) => x.hostId)).toEqual(["web-1"]);
    await expect(t.access.getJob(t.reader, db.id)).rejects.toThrow(NotFoundError);
    expect((await t.access.listJobs(t.reader, 10)).map((v) => v.job.id)).toEqual([mixed.id]);
  });

  it("authorizes an idempotent replay like a new submit and returns only the job the request describes", async () => {
    const t = await setup();
    const first = await t.access.submit(t.admin, request({ hostIds: ["db-1"], idempotencyKey: "k" }));
    await expect(t.access.submit(t.web, request({ hostIds: ["db-1"], idempotencyKey: "k" }))).rejects.toThrow(PermissionDeniedError);
    await expect(t.access.submit(t.web, request({ hostIds: ["web-1"], idempotencyKey: "k" }))).rejects.toThrow(AlreadyExistsError);
    await expect(t.access.submit(t.admin, request({ hostIds: ["db-1"], idempotencyKey: "k", env: { A: "b" } }))).rejects.toThrow(AlreadyExistsError);
    expect((await t.access.submit(t.admin, request({ hostIds: ["db-1"], idempotencyKey: "k" }))).id).toBe(first.id);
    expect(t.jobs.listJobs(t.admin, 10)).toHaveLength(1);
  });

  it("runs only artifacts of the caller's tenant", async () => {
    const t = await setup();
    const digest = `sha256:${"b".repeat(64)}`;
    const step = create(StepSchema, { tool: { case: "script", value: { artifact: digest } } });
    await expect(t.access.submit(t.admin, request({ hostIds: ["web-1"], steps: [step] }))).rejects.toThrow(NotFoundError);
    t.held.add(`beta ${digest}`);
    await expect(t.access.submit(t.admin, request({ hostIds: ["web-1"], steps: [step] }))).rejects.toThrow(/no artifact/);
    t.held.add(`acme ${digest}`);
    expect((await t.access.submit(t.admin, request({ hostIds: ["web-1"], steps: [step] }))).id).toMatch(/^j/);
  });

  it("runs only the caller's tenant's artifacts with every tool that names one (python, ansible, update too)", async () => {
    const t = await setup();
    const digest = `sha256:${"c".repeat(64)}`;
    t.held.add(`beta ${digest}`);
    const key = newReleaseKeyPair();
    const signed = signRelease(Buffer.from("x"), "2.0.0", "linux-x64", key.privatePem, 0);
    const release = `sha256:${createHash("sha256").update("x").digest("hex")}`;
    t.held.add(`beta ${release}`);
    const steps = [
      create(StepSchema, { tool: { case: "python", value: { artifact: digest } } }),
      create(StepSchema, { tool: { case: "ansible", value: { artifact: digest } } }),
      create(StepSchema, { tool: { case: "update", value: { releases: [signed] } } }),
    ];
    for (const step of steps) {
      await expect(t.access.submit(t.admin, request({ hostIds: ["web-1"], steps: [step] })), step.tool.case).rejects.toThrow(/no artifact/);
    }
  });
});
