import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { InvalidArgumentError, NotFoundError, PermissionDeniedError } from "../../common/errors.js";
import { LIMITS, TRUNCATED } from "../../common/limits.js";
import { silentLogger } from "../../common/logger.js";
import { OperatorAccess } from "../../controller/access.js";
import { AuditLog, MAX_AUDIT_HOSTS, MemoryAuditStore, type AuditStore } from "../../controller/audit.js";
import { Authorizer } from "../../controller/authz.js";
import { Inventory } from "../../controller/inventory.js";
import { MemoryJobStore } from "../../controller/job-store.js";
import { JobManager, type SubmitRequest } from "../../controller/jobs.js";
import { counterIds, execStep, operator } from "./support.js";

describe("AuditLog", () => {
  it("appends with id and time, caps host lists, and lists a tenant's events oldest first since a time", async () => {
    const clock = new ManualClock();
    const store = new MemoryAuditStore();
    const log = new AuditLog({ store, clock, ids: counterIds() });
    const hosts = Array.from({ length: 30 }, (_, i) => `h${i}`);
    await log.append({ kind: "submit", tenant: "acme", actor: "operator:acme/alice", decision: "allowed", hostIds: hosts, jobId: "j1" });
    clock.advance(1000);
    await log.append({ kind: "enroll", tenant: "other", actor: "token:t1", decision: "allowed", hostIds: ["x1"] });
    clock.advance(1000);
    await log.append({ kind: "submit", tenant: "acme", actor: "operator:acme/alice", decision: "denied", reason: "no", what: "x".repeat(5000) });
    const all = log.list("acme");
    expect(all.map((e) => e.decision)).toEqual(["allowed", "denied"]);
    expect(all[0]!.hostIds).toHaveLength(MAX_AUDIT_HOSTS);
    expect(all[0]!.hostCount).toBe(30);
    expect(all[1]!.what.length).toBeLessThanOrEqual(1000);
    expect(log.list("acme", { sinceMs: clock.now() - 500 }).map((e) => e.decision)).toEqual(["denied"]);
    expect(log.list("acme", { limit: 1 }).map((e) => e.decision)).toEqual(["denied"]);
    expect(log.list("other").map((e) => e.kind)).toEqual(["enroll"]);
  });

  it("truncates every field with a marker, so a 10 MB host id or actor cannot bloat the log (issue 12)", async () => {
    const store = new MemoryAuditStore();
    const log = new AuditLog({ store, clock: new ManualClock(), ids: counterIds() });
    const huge = "h".repeat(10 << 20);
    const e = await log.append({ kind: "k".repeat(5000), tenant: "t".repeat(5000), actor: "a".repeat(5000), decision: "rejected", reason: huge, what: huge, hostIds: [huge, "ok"], jobId: "j".repeat(5000) });
    for (const field of [e.kind, e.tenant, e.actor, e.jobId, e.hostIds[0]!]) {
      expect(field.length).toBeLessThanOrEqual(LIMITS.auditFieldChars);
      expect(field.endsWith(TRUNCATED)).toBe(true);
    }
    expect(e.hostIds[1]).toBe("ok");
    expect(e.reason.length).toBeLessThanOrEqual(LIMITS.auditTextChars);
    expect(e.what.endsWith(TRUNCATED)).toBe(true);
    expect(JSON.stringify(store.events).length).toBeLessThan(8 * 1024);
  });
});

const POLICY = `
roles:
  web-ops: { hosts: role=web, actions: [read, submit, label, audit], commands: [uptime] }
  reader: { hosts: all, actions: [read] }
bindings:
  acme/alice: [web-ops]
  acme/bob: [reader]
  beta/*: [web-ops]
`;

function request(more: Partial<SubmitRequest>): SubmitRequest {
  return { hostIds: [], allHosts: false, steps: [execStep("uptime")], env: {}, workingDir: "", stdin: new Uint8Array(), timeoutMs: 0, deliveryDeadlineMs: 0, idempotencyKey: "", idempotent: false, ...more };
}

async function setup(opts: { policy?: string; auditStore?: AuditStore } = { policy: POLICY }) {
  const clock = new ManualClock();
  const ids = counterIds();
  const inventory = new Inventory();
  const jobs = new JobManager({ store: new MemoryJobStore(), inventory, clock, ids, log: silentLogger });
  jobs.start();
  const store = opts.auditStore ?? new MemoryAuditStore();
  const audit = new AuditLog({ store, clock, ids });
  const authz = new Authorizer({ policyFile: opts.policy === undefined ? undefined : "p.yaml", log: silentLogger, readFile: () => opts.policy! });
  const access = new OperatorAccess({ authz, audit, jobs, inventory, log: silentLogger });
  const root = operator("acme", "root");
  for (const [id, role, tenant] of [["web-1", "web", "acme"], ["web-2", "web", "acme"], ["db-1", "db", "acme"], ["bweb-1", "web", "beta"]] as const) {
    inventory.connected({ id, tenant }, "eu", "px", clock.now());
    await inventory.setLabels(tenant, id, { set: { role }, remove: [] });
  }
  return { access, audit, inventory, jobs, alice: operator("acme", "alice"), bob: operator("acme", "bob"), root };
}

describe("OperatorAccess", () => {
  it("runs an allowed target and audits it with the hosts and job", async () => {
    const t = await setup();
    const job = await t.access.submit(t.alice, request({ target: "role=web" }));
    expect(t.jobs.tasksOf(job).map((x) => x.hostId).sort()).toEqual(["web-1", "web-2"]);
    const [e] = t.audit.list("acme");
    expect(e).toMatchObject({ kind: "submit", decision: "allowed", actor: "operator:acme/alice", jobId: job.id, hostCount: 2, reason: "role web-ops" });
    expect(e!.what).toBe('target "role=web": exec uptime');
  });

  it("refuses a db host, --all and `all` with PERMISSION_DENIED naming db-1, stores no job, and audits each", async () => {
    const t = await setup();
    for (const req of [request({ hostIds: ["db-1"] }), request({ allHosts: true }), request({ target: "all" }), request({ target: "not role=nothing" })]) {
      const err = await t.access.submit(t.alice, req).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(PermissionDeniedError);
      expect((err as Error).message).toContain("db-1");
    }
    expect(t.jobs.listJobs(t.alice, 10)).toEqual([]);
    const events = t.audit.list("acme");
    expect(events).toHaveLength(4);
    for (const e of events) expect(e).toMatchObject({ kind: "submit", decision: "denied", hostIds: expect.arrayContaining(["db-1"]) });
  });

  it("refuses an empty or unmatched target as INVALID_ARGUMENT, with a caret for a syntax error, and audits it", async () => {
    const t = await setup();
    await expect(t.access.submit(t.alice, request({ target: "" }))).rejects.toThrow(InvalidArgumentError);
    await expect(t.access.submit(t.alice, request({}))).rejects.toThrow(InvalidArgumentError);
    await expect(t.access.submit(t.alice, request({ target: "role=nothing" }))).rejects.toThrow(/matches no host/);
    const err = (await t.access.submit(t.alice, request({ target: "role in (web" })).catch((e: unknown) => e)) as Error;
    expect(err).toBeInstanceOf(InvalidArgumentError);
    expect(err.message).toMatch(/^target at 12: .*\nrole in \(web\n {12}\^$/);
    expect(t.audit.list("acme").map((e) => e.decision)).toEqual(["rejected", "rejected", "rejected", "rejected"]);
  });

  it("keeps tenants apart: another tenant's host is NOT_FOUND by id and never matched by a query", async () => {
    const t = await setup();
    await expect(t.access.submit(t.alice, request({ hostIds: ["bweb-1"] }))).rejects.toThrow(NotFoundError);
    const job = await t.access.submit(t.alice, request({ target: "role=web or id=bweb-1" }));
    expect(t.jobs.tasksOf(job).map((x) => x.hostId).sort()).toEqual(["web-1", "web-2"]);
    // alice reads only what her role covers (role=web), and never another tenant's hosts.
    expect((await t.access.listHosts(t.alice, "")).map((h) => h.id)).toEqual(["web-1", "web-2"]);
    expect(await t.access.listHosts(t.alice, "#bweb-1")).toEqual([]);
    await expect(t.access.setLabels(t.alice, "bweb-1", { env: "x" }, [])).rejects.toThrow(NotFoundError);
    const carol = operator("beta", "carol");
    expect((await t.access.listHosts(carol, "all")).map((h) => h.id)).toEqual(["bweb-1"]);
    // Audit events are per tenant too.
    expect(t.audit.list("beta").map((e) => `${e.actor} ${e.kind} ${e.decision}`)).toEqual(["operator:beta/carol read allowed"]);
  });

  it("labels within scope, refuses labelling a host into it, persists nothing refused, and audits both", async () => {
    const t = await setup();
    const h = await t.access.setLabels(t.alice, "web-1", { env: "prod" }, []);
    expect(h.labels).toEqual({ role: "web", env: "prod" });
    await expect(t.access.setLabels(t.alice, "db-1", { role: "web" }, [])).rejects.toThrow(PermissionDeniedError);
    expect(t.inventory.get("db-1")!.labels).toEqual({ role: "db" });
    await expect(t.access.setLabels(t.alice, "web-1", {}, ["role"])).rejects.toThrow(/leaves role web-ops/);
    expect(t.audit.list("acme").map((e) => `${e.kind}:${e.decision}:${e.what}`)).toEqual(["label:allowed:labels env=prod", "label:denied:labels role=web", "label:denied:labels -role"]);
  });

  it("needs the action: bob may read but not submit or cancel; each decision is audited", async () => {
    const t = await setup();
    expect(await t.access.listHosts(t.bob, "role=db")).toHaveLength(1);
    await expect(t.access.submit(t.bob, request({ target: "role=web" }))).rejects.toThrow(PermissionDeniedError);
    await expect(t.access.cancel(t.bob, "j1")).rejects.toThrow(/may not cancel/);
    // Unbound operator: refused everything.
    await expect(t.access.listHosts(t.root, "")).rejects.toThrow(/no role/);
    expect((await t.access.listAudit(t.alice, {})).map((e) => `${e.actor}:${e.kind}:${e.decision}`)).toEqual([
      "operator:acme/bob:read:allowed",
      "operator:acme/bob:submit:denied",
      "operator:acme/bob:cancel:denied",
      "operator:acme/root:read:denied",
    ]);
  });

  it("without a policy gives full access within the tenant only", async () => {
    const t = await setup({});
    const job = await t.access.submit(t.root, request({ allHosts: true }));
    expect(t.jobs.tasksOf(job)).toHaveLength(3);
    const cancelled = await t.access.cancel(t.root, job.id);
    expect(cancelled.cancelRequested).toBe(true);
    expect(t.audit.list("acme").map((e) => `${e.kind}:${e.decision}`)).toEqual(["submit:allowed", "cancel:allowed"]);
  });

  it("fails the call (the change is already made) when an allowed action cannot be audited; a refusal stays a refusal", async () => {
    const failing: AuditStore = { put: () => Promise.reject(new Error("disk gone")), newestFirst: () => [] };
    const t = await setup({ policy: POLICY, auditStore: failing });
    await expect(t.access.setLabels(t.alice, "web-2", { env: "x" }, [])).rejects.toThrow("disk gone");
    // A refusal is still a refusal when the audit write fails.
    await expect(t.access.submit(t.alice, request({ hostIds: ["db-1"] }))).rejects.toThrow(PermissionDeniedError);
  });
});
