import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { ConfigError, PermissionDeniedError } from "../../common/errors.js";
import { silentLogger } from "../../common/logger.js";
import { Authorizer, compilePolicy, covered, decide, holds, parsePolicy, type Policy } from "../../controller/authz.js";
import type { HostRecord } from "../../controller/model.js";
import { StepSchema } from "../../gen/rexmesh/v1/task_pb.js";
import { execStep, operator } from "./support.js";

const shellStep = (script: string) => create(StepSchema, { tool: { case: "shell", value: { script } } });

const host = (id: string, labels: Record<string, string>, tenant = "acme"): HostRecord => ({ id, tenant, region: "eu", proxy: "px", connected: true, since: 0, labels });
const web1 = host("web-1", { role: "web" });
const web2 = host("web-2", { role: "web" });
const db1 = host("db-1", { role: "db" });

const POLICY = `
roles:
  web-ops:
    hosts: role=web
    actions: [read, submit, cancel, label, audit]
    commands:
      - uptime
      - program: systemctl
        args: ["status|restart", "nginx(\\\\.service)?"]
  db-ops:
    hosts: role=db
    actions: [submit]
    shell: true
  viewer:
    hosts: all
    actions: [read]
bindings:
  acme/alice: [web-ops]
  acme/dba: db-ops
  acme/*: [viewer]
`;

describe("authorization policy", () => {
  const policy: Policy = parsePolicy(POLICY);
  const alice = operator("acme", "alice");

  it("allows a permitted command on hosts inside the role's selector", () => {
    expect(decide(policy, alice, { action: "submit", hosts: [web1, web2], steps: [execStep("uptime")] })).toEqual({ allowed: true, role: "web-ops" });
    expect(decide(policy, alice, { action: "submit", hosts: [web1], steps: [execStep("systemctl", "restart", "nginx.service")] }).allowed).toBe(true);
  });

  it("refuses a resolved set with any host outside the selector, naming the host and the role", () => {
    const d = decide(policy, alice, { action: "submit", hosts: [web1, db1, web2], steps: [execStep("uptime")] });
    expect(d.allowed).toBe(false);
    if (d.allowed) return;
    expect(d.reason).toContain("db-1");
    expect(d.reason).toContain("web-ops");
    expect(d.reason).not.toContain("web-1");
  });

  it("names the first refused hosts and counts the rest", () => {
    const many = Array.from({ length: 9 }, (_, i) => host(`db-${i}`, { role: "db" }));
    const d = decide(policy, alice, { action: "submit", hosts: [web1, ...many], steps: [execStep("uptime")] });
    expect(d.allowed ? "" : d.reason).toMatch(/9 hosts .*db-0, db-1, db-2, db-3, db-4, and 4 more/);
  });

  it("checks programs by glob on argv[0] exactly, and arguments against anchored patterns", () => {
    const no = (steps: ReturnType<typeof execStep>[]) => decide(policy, alice, { action: "submit", hosts: [web1], steps });
    expect(no([execStep("rm", "-rf", "/")]).allowed).toBe(false);
    expect(no([execStep("/tmp/evil/uptime")]).allowed).toBe(false);
    expect(no([execStep("systemctl", "stop", "nginx")]).allowed).toBe(false);
    // A pattern matches whole arguments, never a substring.
    expect(no([execStep("systemctl", "restart", "nginx; reboot")]).allowed).toBe(false);
    expect(no([execStep("systemctl", "xrestart", "nginx")]).allowed).toBe(false);
    // Every step must be allowed.
    expect(no([execStep("uptime"), execStep("reboot")]).allowed).toBe(false);
    const d = no([execStep("reboot")]);
    expect(d.allowed ? "" : d.reason).toContain('program "reboot"');
  });

  it("refuses shell scripts unless the role says shell: true", () => {
    expect(decide(policy, alice, { action: "submit", hosts: [web1], steps: [shellStep("uptime")] }).allowed).toBe(false);
    expect(decide(policy, operator("acme", "dba"), { action: "submit", hosts: [db1], steps: [shellStep("pg_dump x")] }).allowed).toBe(true);
  });

  it("fails closed: no binding, an action no role grants, an unknown action, a non-operator", () => {
    const nobody = operator("other", "mallory");
    expect(decide(policy, nobody, { action: "read" })).toMatchObject({ allowed: false, reason: expect.stringContaining("no role") });
    // acme/* gives bob the viewer role: reading, nothing else.
    const bob = operator("acme", "bob");
    expect(decide(policy, bob, { action: "read" }).allowed).toBe(true);
    expect(decide(policy, bob, { action: "submit", hosts: [web1], steps: [execStep("uptime")] }).allowed).toBe(false);
    expect(decide(policy, bob, { action: "cancel" }).allowed).toBe(false);
    expect(decide(policy, alice, { action: "bundle" }).allowed).toBe(false);
    expect(decide(policy, alice, { action: "frobnicate" } as never).allowed).toBe(false);
    expect(decide(undefined, { role: "host", scope: "acme", id: "web-1" }, { action: "read" }).allowed).toBe(false);
    // An empty resolved set is never "all allowed".
    expect(decide(policy, alice, { action: "submit", hosts: [], steps: [execStep("uptime")] }).allowed).toBe(false);
  });

  it("turns an evaluation error into a refusal", () => {
    const broken = { roles: new Map(), bindings: { get: () => { throw new Error("boom"); } } } as unknown as Policy;
    expect(decide(broken, alice, { action: "read" })).toMatchObject({ allowed: false });
  });

  it("allows a label change only when the host is inside the role before and after it", () => {
    expect(decide(policy, alice, { action: "label", before: web1, after: { ...web1, labels: { role: "web", env: "prod" } } }).allowed).toBe(true);
    // Labelling a db host into one's own scope would widen it.
    const into = decide(policy, alice, { action: "label", before: db1, after: { ...db1, labels: { role: "web" } } });
    expect(into.allowed ? "" : into.reason).toContain("db-1");
    // Labelling a web host out would hand it to someone else's scope.
    expect(decide(policy, alice, { action: "label", before: web1, after: { ...web1, labels: { role: "db" } } }).allowed).toBe(false);
  });

  it("without a policy allows everything (tenant isolation is enforced before)", () => {
    expect(decide(undefined, alice, { action: "submit", hosts: [db1], steps: [shellStep("x")] }).allowed).toBe(true);
  });

  it("refuses invalid policies with a message naming the place", () => {
    const badTool = () => compilePolicy({ roles: { r: { hosts: "all", tools: ["nuke"] } } }, "p.yaml");
    expect(badTool).toThrow(/roles\.r\.tools: unknown tool "nuke"/);
    expect(() => compilePolicy({ roles: { r: { hosts: "all", env: "PATH" } } }, "p.yaml")).toThrow(/roles\.r\.env: must be a list/);
    const bad = (doc: unknown, msg: RegExp) => expect(() => compilePolicy(doc, "p.yaml")).toThrow(msg);
    bad({ roles: { r: { actions: ["read"] } } }, /roles\.r\.hosts: is required/);
    bad({ roles: { r: { hosts: "role=" } } }, /roles\.r\.hosts: is not a valid query: at 5/);
    bad({ roles: { r: { hosts: "all", actions: ["nuke"] } } }, /unknown action "nuke"/);
    bad({ roles: { r: { hosts: "all", commands: [{ program: "x", args: ["("] }] } } }, /commands\[0\]\.args\[0\]/);
    bad({ roles: { r: { hosts: "all", extra: 1 } } }, /unknown key "extra"/);
    bad({ roles: {}, bindings: { "acme/alice": ["ghost"] } }, /unknown role "ghost"/);
    bad({ roles: { r: { hosts: "all" } }, bindings: { alice: ["r"] } }, /<tenant>\/<operator-id>/);
    bad({ roles: { r: { hosts: "all" } }, bindings: { "*/*": ["r"] } }, /<tenant>/);
    expect(() => parsePolicy("roles: [", "p.yaml")).toThrow(ConfigError);
  });
});

describe("Authorizer", () => {
  it("loads at start, keeps the previous policy when a reload is invalid, and takes a valid one", () => {
    let text = POLICY;
    const a = new Authorizer({ policyFile: "p.yaml", log: silentLogger, readFile: () => text });
    const alice = operator("acme", "alice");
    expect(a.require(alice, { action: "audit" })).toBe("web-ops");
    text = "roles: {bad";
    expect(a.reload()).toBe(false);
    expect(a.decide(alice, { action: "audit" }).allowed).toBe(true);
    text = "roles: {r: {hosts: all, actions: [read]}}\nbindings: {acme/alice: [r]}";
    expect(a.reload()).toBe(true);
    expect(() => a.require(alice, { action: "audit" })).toThrow(PermissionDeniedError);
  });

  it("refuses to start on an invalid or unreadable policy", () => {
    expect(() => new Authorizer({ policyFile: "p.yaml", log: silentLogger, readFile: () => "roles: 3" })).toThrow(ConfigError);
    expect(() => new Authorizer({ policyFile: "/nonexistent/policy.yaml", log: silentLogger })).toThrow(/cannot read policy file/);
  });
});

const ping = create(StepSchema, { tool: { case: "ping", value: {} } });
const script = create(StepSchema, { tool: { case: "script", value: { artifact: `sha256:${"a".repeat(64)}` } } });
const filePut = create(StepSchema, { tool: { case: "filePut", value: { artifact: `sha256:${"a".repeat(64)}`, path: "x", baseDir: "/srv" } } });

describe("issue 12: every tool, variable and host decided the same way", () => {
  const policy = parsePolicy(`
roles:
  admin: { hosts: all, actions: ["*"], commands: ["*"], shell: true }
  builder: { hosts: all, actions: [submit], commands: ["*"], tools: ["*"] }
  putter: { hosts: all, actions: [submit], tools: [file.put] }
  web-ops: { hosts: role=web, actions: [read, submit, cancel], commands: [uptime, /usr/bin/uptime] }
  web-path: { hosts: role=web, actions: [submit], commands: [uptime], env: [PATH, "LD_*"] }
  web-submit: { hosts: role=web, actions: [read, submit], commands: [hostname] }
  labeller: { hosts: all, actions: [label] }
  mesh: { hosts: all, actions: [revoke.proxy] }
protectedEnv: [APP_PLUGIN_DIR]
bindings:
  acme/admin: admin
  acme/builder: builder
  acme/putter: putter
  acme/web: web-ops
  acme/pathfinder: web-path
  acme/narrow: [web-submit, labeller]
  acme/mesh: mesh
`);
  const as = (id: string) => operator("acme", id);
  const submit = (id: string, steps: ReturnType<typeof execStep>[], env: Record<string, string> = {}, hosts = [web1]) => decide(policy, as(id), { action: "submit", hosts, steps, env });

  it("allows ping wherever submit is allowed, also with actions: ['*']", () => {
    expect(submit("admin", [ping]).allowed).toBe(true);
    expect(submit("web", [ping]).allowed).toBe(true);
  });

  it("allows script and file.put only to roles that name them (or tools: ['*']); shell: true is not enough", () => {
    expect(submit("admin", [script])).toMatchObject({ allowed: false, reason: expect.stringContaining('tool "script" is not allowed by role admin') });
    expect(submit("admin", [filePut]).allowed).toBe(false);
    expect(submit("builder", [script, filePut, shellStep("x"), ping, execStep("anything")]).allowed).toBe(true);
    expect(submit("putter", [filePut]).allowed).toBe(true);
    expect(submit("putter", [script]).allowed).toBe(false);
    // No commands: a role that names tools without exec runs no program.
    expect(submit("putter", [execStep("uptime")]).allowed).toBe(false);
  });

  it("governs python and ansible like script: only roles that name them (or tools: ['*']), never by default or by commands: ['*']", () => {
    const python = create(StepSchema, { tool: { case: "python", value: { script: "print(1)" } } });
    const ansible = create(StepSchema, { tool: { case: "ansible", value: { module: "ping" } } });
    expect(submit("admin", [python])).toMatchObject({ allowed: false, reason: expect.stringContaining('tool "python" is not allowed by role admin') });
    expect(submit("admin", [ansible])).toMatchObject({ allowed: false, reason: expect.stringContaining('tool "ansible" is not allowed by role admin') });
    expect(submit("web", [python]).allowed).toBe(false);
    expect(submit("builder", [python, ansible]).allowed).toBe(true);
    const named = parsePolicy("roles:\n  py: { hosts: all, actions: [submit], tools: [python] }\nbindings:\n  acme/py: py\n");
    expect(decide(named, as("py"), { action: "submit", hosts: [web1], steps: [python] }).allowed).toBe(true);
    expect(decide(named, as("py"), { action: "submit", hosts: [web1], steps: [ansible] }).allowed).toBe(false);
    expect(submit("web", [execStep("uptime")], { ANSIBLE_CONFIG: "/tmp/x.cfg" })).toMatchObject({ allowed: false, reason: expect.stringContaining("environment variable ANSIBLE_CONFIG changes what runs") });
  });

  it("refuses variables that change what runs unless the role's env names them", () => {
    for (const name of ["PATH", "LD_PRELOAD", "LD_LIBRARY_PATH", "BASH_ENV", "PYTHONPATH", "NODE_OPTIONS", "GIT_SSH_COMMAND", "APP_PLUGIN_DIR"]) {
      const d = submit("web", [execStep("uptime")], { [name]: "/tmp/x" });
      expect(d.allowed, name).toBe(false);
      expect(d.allowed ? "" : d.reason).toContain(`environment variable ${name} changes what runs`);
    }
    expect(submit("web", [execStep("uptime")], { GREETING: "hi", path: "lowercase is not PATH" }).allowed).toBe(true);
    expect(submit("pathfinder", [execStep("uptime")], { PATH: "/usr/bin", LD_LIBRARY_PATH: "/opt/lib" }).allowed).toBe(true);
    expect(submit("pathfinder", [execStep("uptime")], { BASH_ENV: "/tmp/x" }).allowed).toBe(false);
    // The role that allows PATH must also allow the rest of the request: roles are not mixed.
    expect(submit("pathfinder", [execStep("hostname")], { PATH: "/usr/bin" }).allowed).toBe(false);
  });

  it("refuses a program named by a relative path or a path that is not normalized, whatever the rule", () => {
    expect(submit("web", [execStep("/usr/bin/uptime")]).allowed).toBe(true);
    for (const program of ["./uptime", "bin/uptime", "/usr/bin/../../tmp/uptime", "/usr//bin/uptime"]) {
      expect(submit("builder", [execStep(program)]).allowed, program).toBe(false);
    }
  });

  it("keeps mesh actions out of '*': only a role that names revoke.proxy holds it, and nobody without a policy", () => {
    expect(holds(policy, as("admin"), "revoke").allowed).toBe(true);
    expect(holds(policy, as("admin"), "revoke.proxy").allowed).toBe(false);
    expect(holds(policy, as("mesh"), "revoke.proxy").allowed).toBe(true);
    expect(holds(undefined, as("anyone"), "revoke.proxy").allowed).toBe(false);
    expect(holds(undefined, as("anyone"), "token").allowed).toBe(true);
    expect(holds(policy, as("nobody"), "token")).toMatchObject({ allowed: false, reason: expect.stringContaining("no role") });
  });

  it("decides host-scoped actions on every host: cancel on a db host is refused to a web role", () => {
    expect(decide(policy, as("web"), { action: "cancel", hosts: [web1, web2] }).allowed).toBe(true);
    const d = decide(policy, as("web"), { action: "cancel", hosts: [web1, db1] });
    expect(d.allowed ? "" : d.reason).toMatch(/may not cancel on 1 host outside role web-ops .*db-1/);
  });

  it("never lets a label change give the caller power on the host it did not hold before", () => {
    // narrow may label anything (labeller: hosts all) and submit on role=web (web-submit).
    const into = decide(policy, as("narrow"), { action: "label", before: db1, after: { ...db1, labels: { role: "web" } } });
    expect(into.allowed ? "" : into.reason).toMatch(/moves into role web-submit .*widen the operator's own reach/);
    // Moving a host out of one's own roles, or labels that move nothing, widen nothing.
    expect(decide(policy, as("narrow"), { action: "label", before: web1, after: { ...web1, labels: { role: "db" } } }).allowed).toBe(true);
    expect(decide(policy, as("narrow"), { action: "label", before: web1, after: { ...web1, labels: { role: "web", owner: "me" } } }).allowed).toBe(true);
    // An admin whose role covers everything already holds whatever a narrower role of its tenant gives.
    const wide = parsePolicy(`
roles:
  admin: { hosts: all, actions: ["*"], commands: ["*"], tools: ["*"], env: ["*"] }
  viewer: { hosts: role=web, actions: [read] }
bindings:
  acme/root: admin
  acme/*: viewer
`);
    expect(decide(wide, as("root"), { action: "label", before: db1, after: { ...db1, labels: { role: "web" } } }).allowed).toBe(true);
    // While a viewer-only labeller may not label a host into a read scope it lacks there.
    const peek = parsePolicy(`
roles:
  labeller: { hosts: all, actions: [label] }
  viewer: { hosts: role=web, actions: [read] }
bindings:
  acme/lab: [labeller, viewer]
`);
    expect(decide(peek, as("lab"), { action: "label", before: db1, after: { ...db1, labels: { role: "web" } } }).allowed).toBe(false);
  });

  it("shows reads only on the hosts a read role covers", () => {
    expect(covered(policy, as("web"), "read", [web1, db1, web2]).map((h) => h.id)).toEqual(["web-1", "web-2"]);
    expect(covered(policy, as("builder"), "read", [web1])).toEqual([]);
    expect(covered(undefined, as("anyone"), "read", [web1, db1]).map((h) => h.id)).toEqual(["web-1", "db-1"]);
    expect(covered(policy, { role: "host", scope: "acme", id: "web-1" }, "read", [web1])).toEqual([]);
  });
});
