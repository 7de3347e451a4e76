import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { operatorClient } from "../../cli/client.js";
import { LocalMesh } from "../../cli/launcher.js";
import type { CredentialPaths } from "../../certs/files.js";
import { ConnectionState } from "../../gen/rexmesh/v1/controller_pb.js";
import { rexmesh, tempDir, until } from "./support.js";
import { testCa } from "../test-ca.js";

/**
 * Authorization and audit end to end: a controller started with a policy
 * file, six hosts of two tenants (tenant from each host's certificate)
 * labelled role=web/db, and operators of both tenants using the real CLI.
 */
describe("authorization and audit on a real mesh", () => {
  const work = tempDir("authz");
  const policyFile = join(work, "policy.yaml");
  const policy = (webHosts: string) => `
roles:
  admin:
    hosts: all
    actions: ["*"]
    commands: ["*"]
    shell: true
  web-ops:
    hosts: ${JSON.stringify(webHosts)}
    actions: [read, submit, cancel, audit]
    commands:
      - hostname
      - program: echo
        args: ["[a-z0-9-]+"]
  web-scheduler:
    hosts: ${JSON.stringify(webHosts)}
    actions: [read, schedule, trigger]
bindings:
  acme/dev: [admin]
  acme/alice: [web-ops]
  acme/sam: [web-scheduler]
  beta/admin: [admin]
`;
  writeFileSync(policyFile, policy("role=web"));
  const hosts = [
    { id: "web-1", region: "east", tenant: "acme", role: "web" },
    { id: "web-2", region: "west", tenant: "acme", role: "web" },
    { id: "db-1", region: "east", tenant: "acme", role: "db" },
    { id: "bweb-1", region: "west", tenant: "beta", role: "web" },
    { id: "bweb-2", region: "east", tenant: "beta", role: "web" },
    { id: "bdb-1", region: "west", tenant: "beta", role: "db" },
  ];
  const mesh = new LocalMesh({
    ca: testCa(),
    dir: join(work, "mesh"),
    regions: ["east", "west"],
    tenant: "acme",
    hosts: hosts.map(({ id, region, tenant }) => ({ id, region, tenant })),
    controllerArgs: ["--policy", policyFile],
  });
  let alice: CredentialPaths;
  let betaAdmin: CredentialPaths;
  const envOf = (c: CredentialPaths) => ({ REXMESH_CONTROLLER: mesh.controllerAddress, REXMESH_CERT: c.cert, REXMESH_KEY: c.key, REXMESH_CA: c.ca });
  const asAlice = (args: string[]) => rexmesh(args, envOf(alice));
  const asDev = (args: string[]) => rexmesh(args, mesh.exports());
  const asBeta = (args: string[]) => rexmesh(args, envOf(betaAdmin));
  let sam: CredentialPaths;
  const asSam = (args: string[]) => rexmesh(args, envOf(sam));

  beforeAll(async () => {
    await mesh.start();
    alice = mesh.issue({ role: "operator", scope: "acme", id: "alice" }, join(work, "alice"));
    betaAdmin = mesh.issue({ role: "operator", scope: "beta", id: "admin" }, join(work, "beta-admin"));
    sam = mesh.issue({ role: "operator", scope: "acme", id: "sam" }, join(work, "sam"));
    await mesh.waitForHosts(3);
    // Tenant beta's hosts, seen through beta's own operator.
    const { client, close } = operatorClient({}, envOf(betaAdmin));
    try {
      for (let delay = 20; ; delay = Math.min(delay * 2, 250)) {
        const { hosts: listed } = await client.listHosts({});
        if (listed.filter((h) => h.connection === ConnectionState.CONNECTED).length >= 3) break;
        await new Promise((r) => setTimeout(r, delay));
      }
    } finally {
      close();
    }
    for (const h of hosts) {
      const r = await (h.tenant === "acme" ? asDev : asBeta)(["hosts", "label", h.id, `role=${h.role}`, "env=test"]);
      expect(r.code, r.stderr).toBe(0);
    }
  });

  afterAll(async () => {
    await mesh.stop();
  });

  it("keeps labels, and lists hosts by query", async () => {
    const r = await asAlice(["hosts", "-t", "role=web", "--json"]);
    expect(r.code, r.stderr).toBe(0);
    const rows = JSON.parse(r.stdout) as { id: string; labels: Record<string, string> }[];
    expect(rows.map((h) => h.id)).toEqual(["web-1", "web-2"]);
    expect(rows[0]!.labels).toEqual({ role: "web", env: "test" });
    const removed = await asDev(["hosts", "label", "web-2", "-r", "env"]);
    expect(removed.stdout).toBe("web-2: role=web\n");
  });

  it("lets an operator limited to role=web run on web hosts", async () => {
    const r = await asAlice(["run", "-t", "role=web", "--", "echo", "hello"]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/web-1 out\| hello/);
    expect(r.stdout).toMatch(/web-2 out\| hello/);
    expect(r.stdout).not.toMatch(/db-1/);
  });

  it("refuses a db host, --all and `-t all` with PERMISSION_DENIED naming db-1, and an empty target as INVALID_ARGUMENT", async () => {
    for (const where of [["-H", "db-1"], ["--all"], ["-t", "all"], ["-t", "role=web or role=db"]]) {
      const r = await asAlice(["run", ...where, "--", "hostname"]);
      expect(r.code, where.join(" ")).toBe(1);
      expect(r.stderr).toMatch(/PermissionDenied: .*db-1/);
      expect(r.stderr).toContain("web-ops");
      expect(r.stdout).toBe("");
    }
    const cmd = await asAlice(["run", "-t", "role=web", "--", "echo", "$(reboot)"]);
    expect(cmd.stderr).toMatch(/PermissionDenied: .*arguments of "echo"/);
    // The CLI refuses an empty query itself (nothing reaches the controller); the controller refuses it too.
    const empty = await asAlice(["run", "-t", "", "--", "hostname"]);
    expect(empty.code).toBe(2);
    expect(empty.stderr).toMatch(/-t\/--target needs a query/);
    const api = operatorClient({}, envOf(alice));
    await expect(api.client.submitJob({ target: "", steps: [{ tool: { case: "exec", value: { argv: ["hostname"] } } }] }).finally(api.close)).rejects.toThrow(/target at 0: /);
    const bad = await asAlice(["run", "-t", "role in (web", "--", "hostname"]);
    expect(bad.stderr).toContain("InvalidArgument: target at 12:");
    expect(bad.stderr).toContain("role in (web\n            ^");
    // Nothing of the above became a job.
    const jobs = JSON.parse((await asAlice(["jobs", "--json"])).stdout) as { id: string }[];
    expect(jobs).toHaveLength(1);
  });

  it("records every refusal in the audit log, with who, what, where and why", async () => {
    const r = await asAlice(["audit", "--since", "1h", "--limit", "1000", "--json"]);
    expect(r.code, r.stderr).toBe(0);
    const events = r.stdout.trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
    const denied = events.filter((e) => e.kind === "submit" && e.decision === "denied" && e.actor === "operator:acme/alice");
    expect(denied.map((e) => e.what)).toEqual([
      "hosts db-1: exec hostname",
      "all hosts: exec hostname",
      'target "all": exec hostname',
      'target "role=web or role=db": exec hostname',
      'target "role=web": exec echo "$(reboot)"',
    ]);
    for (const e of denied.slice(0, 4)) {
      expect(e.hosts).toContain("db-1");
      expect(e.reason).toMatch(/db-1/);
    }
    const rejected = events.filter((e) => e.decision === "rejected").map((e) => e.what);
    expect(rejected).toEqual(['target "": exec hostname', 'target "role in (web": exec hostname']);
    const allowed = events.filter((e) => e.kind === "submit" && e.decision === "allowed");
    expect(allowed).toHaveLength(1);
    expect(allowed[0]).toMatchObject({ hosts: ["web-1", "web-2"], reason: "role web-ops" });
    expect(events.filter((e) => e.kind === "label")).toHaveLength(4);
    // Text form, too.
    expect((await asAlice(["audit"])).stdout).toMatch(/DENIED +submit +operator:acme\/alice +hosts db-1: exec hostname +on db-1 +-- .*web-ops/);
    // alice may not label; that refusal is audited as well.
    const label = await asAlice(["hosts", "label", "web-1", "owner=alice"]);
    expect(label.stderr).toMatch(/PermissionDenied: operator acme\/alice may not label/);
    const after = (await asAlice(["audit", "--limit", "1000", "--json"])).stdout.trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
    // (The last event is this very ListAudit call, allowed: every decision is audited.)
    expect(after.at(-1)).toMatchObject({ kind: "audit", decision: "allowed", actor: "operator:acme/alice" });
    expect(after.filter((e) => e.kind === "label").at(-1)).toMatchObject({ kind: "label", decision: "denied", hosts: ["web-1"] });
  });

  it("shows an operator of tenant A none of tenant B's hosts, by id or by query", async () => {
    // alice reads only the hosts her role covers (role=web), and none of tenant B's.
    const list = JSON.parse((await asAlice(["hosts", "--json"])).stdout) as { id: string }[];
    expect(list.map((h) => h.id)).toEqual(["web-1", "web-2"]);
    const byId = await asAlice(["run", "-H", "bweb-1", "--", "hostname"]);
    expect(byId.stderr).toMatch(/NotFound: unknown host: bweb-1/);
    const byQuery = await asAlice(["run", "-t", "#bweb-1", "--", "hostname"]);
    expect(byQuery.stderr).toMatch(/InvalidArgument: the target "#bweb-1" matches no host/);
    expect(JSON.parse((await asDev(["hosts", "-t", "role=web", "--json"])).stdout).map((h: { id: string }) => h.id)).toEqual(["web-1", "web-2"]);
    const beta = JSON.parse((await asBeta(["hosts", "--json"])).stdout) as { id: string }[];
    expect(beta.map((h) => h.id)).toEqual(["bdb-1", "bweb-1", "bweb-2"]);
    // Beta's admin may run anywhere in beta, and still nowhere in acme.
    const r = await asBeta(["run", "--all", "--", "hostname"]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/3 hosts: 3 succeeded/);
    expect((await asBeta(["run", "-H", "web-1", "--", "hostname"])).stderr).toMatch(/NotFound/);
    // And tenant A's audit never shows tenant B's events.
    const audit = (await asAlice(["audit", "--json"])).stdout;
    expect(audit).not.toContain("beta");
  });

  it("shows a host's queue (hosts queue): each task's stage, newest first, in pages; only where the caller's role covers the host, only in its tenant", async () => {
    type Row = { id: string; job: string; stage: string; state: string; what: string; submittedBy: string };
    const queue = async (who: (a: string[]) => ReturnType<typeof rexmesh>, ...args: string[]) => {
      const r = await who(["hosts", "queue", ...args, "--json"]);
      expect(r.code, r.stderr).toBe(0);
      return JSON.parse(r.stdout) as { host: string; tasks: Row[]; nextPage?: string };
    };
    expect((await asDev(["run", "-H", "db-1", "--", "hostname"])).code).toBe(0);
    // A task that runs until it is cancelled: the queue is seen while it runs, however slow the machine.
    const submitted = await asDev(["run", "-H", "db-1", "--detach", "--", "sleep", "300"]);
    expect(submitted.code, submitted.stderr).toBe(0);
    const jobId = submitted.stdout.trim();
    const running = await until("a running task in db-1's queue", async () => (await queue(asDev, "db-1")).tasks.find((t) => t.stage === "running" && t.job === jobId));
    expect(running).toMatchObject({ what: "exec sleep 300", submittedBy: "dev", state: "RUNNING" });
    expect((await queue(asDev, "db-1", "--unfinished")).tasks.map((t) => t.id)).toEqual([running.id]);
    expect((await asDev(["jobs", "cancel", jobId])).code).toBe(0);
    const after = await until("the cancelled task finished", async () => {
      const q = await queue(asDev, "db-1");
      return q.tasks[0]?.stage === "finished" ? q : undefined;
    });
    expect(after.tasks[0]).toMatchObject({ id: running.id, stage: "finished", state: "CANCELLED" });
    expect(after.tasks.length).toBeGreaterThan(1);
    expect((await queue(asDev, "db-1", "--unfinished")).tasks).toEqual([]);
    // Pages: the newest first, then the older ones from the token on.
    const first = await queue(asDev, "db-1", "--limit", "1");
    expect(first.tasks.map((t) => t.id)).toEqual([running.id]);
    const second = await queue(asDev, "db-1", "--limit", "1", "--page", first.nextPage!);
    expect(second.tasks[0]!.id < running.id).toBe(true);
    // Alice's role covers the web hosts only: db-1 is not there for her. Another tenant's host looks missing too.
    expect((await asAlice(["hosts", "queue", "db-1"])).stderr).toMatch(/NotFound: host "db-1" not found/);
    expect((await asAlice(["hosts", "queue", "web-1"])).code).toBe(0);
    expect((await asBeta(["hosts", "queue", "web-1"])).stderr).toMatch(/NotFound: host "web-1" not found/);
    const table = await asDev(["hosts", "queue", "db-1", "--limit", "1"]);
    expect(table.stdout).toMatch(/^TASK +JOB +STAGE +STATE +CREATED +BY +WHAT/);
    expect(table.stdout).toMatch(/more: rexmesh hosts queue db-1 --page \S+/);
  });

  it("runs a schedule's firings as jobs of its creator, linked to it; pause, run-now and remove; an operator without `schedule` is refused", async () => {
    type Sched = { name: string; fired: number; paused: boolean; nextRun?: string; lastJobId: string; recent: { jobId: string; note: string }[] };
    const show = async () => JSON.parse((await asDev(["schedules", "show", "tick", "--json"])).stdout) as Sched;
    const added = await asDev(["schedules", "add", "tick", "--cron", "*/2 * * * * *", "--tz", "Europe/Berlin", "-H", "web-1", "--", "hostname"]);
    expect(added.code, added.stderr).toBe(0);
    expect(added.stdout).toMatch(/^tick: next \d{4}-\d\d-\d\dT/);
    const fired = await until("two firings of the schedule", async () => {
      const s = await show();
      return s.fired >= 2 ? s : undefined;
    });
    // Each firing is an ordinary job of the creator, linked to its schedule, that ran.
    const jobs = JSON.parse((await asDev(["jobs", "--json"])).stdout) as { id: string; schedule?: string; submittedBy: string }[];
    const linked = jobs.filter((j) => j.schedule === "tick");
    expect(linked.length).toBeGreaterThanOrEqual(2);
    expect(linked.every((j) => j.submittedBy === "dev")).toBe(true);
    const job = JSON.parse((await asDev(["jobs", "show", fired.lastJobId, "--json"])).stdout) as { tasks: { host: string; state: string }[] };
    expect(job.tasks.map((t) => t.host)).toEqual(["web-1"]);
    // Paused, it fires no more; run-now still submits one.
    expect((await asDev(["schedules", "pause", "tick"])).stdout).toBe("tick: paused\n");
    const before = (await show()).fired;
    await new Promise((r) => setTimeout(r, 3000));
    expect((await show()).fired).toBe(before);
    const now = await asDev(["schedules", "run-now", "tick"]);
    expect(now.code, now.stderr).toBe(0);
    expect((await show()).recent.at(-1)).toMatchObject({ jobId: now.stdout.trim(), note: "run now" });
    // Alice may submit on web hosts, but holds no `schedule`; she sees the schedule (read) and cannot change it.
    expect((await asAlice(["schedules", "add", "mine", "--cron", "0 * * * *", "-H", "web-1", "--", "hostname"])).stderr).toMatch(/PermissionDenied/);
    expect((await asAlice(["schedules", "pause", "tick"])).stderr).toMatch(/PermissionDenied/);
    expect((await asAlice(["schedules", "list", "--json"])).stdout).toContain('"tick"');
    // Another tenant sees none of it.
    expect((await asBeta(["schedules", "show", "tick"])).stderr).toMatch(/NotFound/);
    // Sam holds `schedule` and `read` on the web hosts but may not submit: he cannot lend himself dev's rights.
    for (const act of ["run-now", "pause", "remove"]) expect((await asSam(["schedules", act, "tick"])).stderr, act).toMatch(/PermissionDenied/);
    // A schedule on a host Alice's roles do not read is not hers to see; nor are the values of a schedule's env.
    expect((await asDev(["schedules", "add", "dbjob", "--cron", "0 3 * * *", "-H", "db-1", "-e", "PGPASSWORD=s3cret", "--", "hostname"])).code).toBe(0);
    expect((await asAlice(["schedules", "show", "dbjob"])).stderr).toMatch(/NotFound/);
    expect((await asAlice(["schedules", "--json"])).stdout).not.toContain("dbjob");
    const { client, close } = operatorClient({}, mesh.exports());
    try {
      const { schedule } = await client.getSchedule({ name: "dbjob" });
      expect(schedule!.spec!.job!.env).toEqual({ PGPASSWORD: "<redacted>" });
      const listed = (await client.listSchedules({})).schedules.find((x) => x.spec!.name === "dbjob")!;
      expect(listed.spec!.job).toBeUndefined();
      expect(listed.what).toBe("exec hostname");
    } finally {
      close();
    }
    expect((await asDev(["schedules", "remove", "dbjob"])).code).toBe(0);
    // The firings' idempotency keys are the schedules' own: nobody can take one first.
    expect((await asDev(["run", "-H", "web-1", "--idempotency-key", "schedule:tick:1:2", "--", "hostname"])).stderr).toMatch(/InvalidArgument: idempotency keys starting "schedule:"/);
    // A bad expression is refused, naming it.
    expect((await asDev(["schedules", "add", "bad", "--cron", "61 * * * *", "-H", "web-1", "--", "hostname"])).stderr).toMatch(/InvalidArgument: cron expression "61 \* \* \* \*"/);
    expect((await asDev(["schedules", "remove", "tick"])).code).toBe(0);
    expect((await asDev(["schedules"])).stdout).toBe("no schedules\n");
  });

  it("keeps triggers to the operators who may: add needs `trigger`, others see one only on hosts they read and change it only if they may run it", async () => {
    expect((await asDev(["triggers", "add", "fix-web", "--on", "kind=service.failed and unit=nginx.service", "-t", "role=web", "--", "hostname"])).code).toBe(0);
    expect((await asDev(["triggers", "add", "fix-here", "--on", "kind=disk.full", "--cooldown", "1h", "--", "hostname"])).code).toBe(0);
    // Alice may submit on web hosts but holds no `trigger`.
    expect((await asAlice(["triggers", "add", "mine", "--on", "kind=x", "--", "hostname"])).stderr).toMatch(/PermissionDenied/);
    // She sees the trigger whose job reaches only web hosts, not the one that runs on any reporting host (db-1 included).
    const seen = JSON.parse((await asAlice(["triggers", "list", "--json"])).stdout) as { name: string }[];
    expect(seen.map((t) => t.name)).toEqual(["fix-web"]);
    expect((await asAlice(["triggers", "show", "fix-here"])).stderr).toMatch(/NotFound/);
    // Sam holds `trigger` but may not submit: he cannot change dev's triggers.
    for (const act of ["pause", "remove"]) expect((await asSam(["triggers", act, "fix-web"])).stderr, act).toMatch(/PermissionDenied/);
    // Another tenant does not see them.
    expect((await asBeta(["triggers", "show", "fix-web"])).stderr).toMatch(/NotFound/);
    expect((await asBeta(["triggers"])).stdout).toBe("no triggers\n");
    // The firings' keys are the triggers' own; a bad expression is refused, naming where.
    expect((await asDev(["run", "-H", "web-1", "--idempotency-key", "trigger:fix-web:1", "--", "hostname"])).stderr).toMatch(/InvalidArgument: idempotency keys starting "trigger:"/);
    expect((await asDev(["triggers", "add", "bad", "--on", "kind=", "--", "hostname"])).stderr).toMatch(/InvalidArgument: match expression "kind=": "kind" has no value at column 6/);
    expect((await asDev(["triggers", "add", "fix-web", "--on", "kind=y", "--", "hostname"])).stderr).toMatch(/AlreadyExists/);
    expect((await asDev(["triggers", "pause", "fix-web"])).stdout).toBe("fix-web: paused\n");
    expect((await asDev(["triggers", "show", "fix-web", "--json"])).stdout).toContain('"paused": true');
    expect((await asDev(["triggers", "resume", "fix-web"])).stdout).toBe("fix-web: active\n");
    expect((await asAlice(["events"])).stdout).toBe("no events\n");
    for (const t of ["fix-web", "fix-here"]) expect((await asDev(["triggers", "remove", t])).code).toBe(0);
    expect((await asDev(["triggers"])).stdout).toBe("no triggers\n");
  });

  it("reloads the policy on SIGHUP", async () => {
    writeFileSync(policyFile, policy("role in (web, db)"));
    const before = readFileSync(mesh.controller.logFile, "utf8").split("authorization policy reloaded").length;
    mesh.controller.proc.kill("SIGHUP");
    for (let delay = 10; readFileSync(mesh.controller.logFile, "utf8").split("authorization policy reloaded").length === before; delay = Math.min(delay * 2, 200)) {
      await new Promise((r) => setTimeout(r, delay));
    }
    const r = await asAlice(["run", "-H", "db-1", "--", "hostname"]);
    expect(r.code, r.stderr).toBe(0);
    expect(mesh.controller.proc.exitCode).toBe(null);
  });
});
