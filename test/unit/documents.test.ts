import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { InvalidArgumentError, NotFoundError } from "../../common/errors.js";
import { silentLogger } from "../../common/logger.js";
import { DocumentStore, MemoryDocumentBackend } from "../../controller/document-store.js";
import { compileDocument, documentWarnings, parseDocumentRef, parseDocumentText, planHost } from "../../controller/documents.js";
import { Inventory } from "../../controller/inventory.js";
import { MemoryJobStore } from "../../controller/job-store.js";
import { JobManager, type ProxyPort, type SubmitRequest } from "../../controller/jobs.js";
import type { HostRecord } from "../../controller/model.js";
import { shellQuote } from "../../controller/template.js";
import { HostFactsSchema } from "../../gen/rexmesh/v1/host_pb.js";
import { TaskState, type Step, type TaskSpec } from "../../gen/rexmesh/v1/task_pb.js";
import { counterIds, flush, operator, submitRequest } from "./support.js";
import { AuditLog, MemoryAuditStore } from "../../controller/audit.js";
import { Authorizer } from "../../controller/authz.js";
import { OperatorAccess } from "../../controller/access.js";

const host = (id: string, region: string, tools = ["exec", "shell"], labels: Record<string, string> = {}): HostRecord => ({
  id,
  tenant: "acme",
  region,
  proxy: `px-${region}`,
  connected: true,
  since: 0,
  labels,
  facts: create(HostFactsSchema, { os: "linux", hostname: `${id}.example`, tools }),
});

const DOC = `
name: greet
description: says hello
parameters:
  - { name: msg, type: string, pattern: "[A-Za-z0-9 ]+" }
  - { name: token, type: string, sensitive: true, default: "s3cret" }
  - { name: files, type: list, default: [a, b] }
steps:
  - exec: { argv: [echo, "{{host.id}}", "{{param.msg}}", "{{param.files}}"] }
  - shell: { script: "echo {{fact.hostname}} {{host.region}} {{param.token}}" }
  - alternatives:
      - when: "region=eu"
        shell: { script: "echo eu {{param.msg}}" }
      - exec: { argv: [echo, other] }
`;

function argv(s: Step | undefined): string[] {
  if (s?.tool.case !== "exec") throw new Error("not exec");
  return s.tool.value.argv;
}
function script(s: Step | undefined): string {
  if (s?.tool.case !== "shell") throw new Error("not shell");
  return s.tool.value.script;
}

/** What renderShell makes of `body`: the values in read-only variables, each § a reference to the next one. */
function rendered(body: string, ...values: string[]): string {
  let n = 0;
  return `readonly ${values.map((v, i) => `rexmesh_v${i + 1}=${shellQuote(v)}`).join(" ")}; ${body.replaceAll("§", () => `"\${rexmesh_v${++n}}"`)}`;
}

describe("document format", () => {
  it("parses YAML and JSON alike and keeps the source", () => {
    const doc = parseDocumentText(DOC);
    expect(doc.name).toBe("greet");
    expect(doc.parameters.map((p) => p.name)).toEqual(["msg", "token", "files"]);
    expect(doc.steps).toHaveLength(3);
    expect(doc.steps[2]!.alternatives.map((a) => a.tool)).toEqual(["shell", "exec"]);
    const again = parseDocumentText(JSON.stringify(doc.source));
    expect(again.source).toEqual(doc.source);
  });

  it("refuses unknown placeholders at put time, naming the step and field", () => {
    const bad = { name: "x", steps: [{ exec: { argv: ["echo", "ok"] } }, { name: "two", exec: { argv: ["echo", "{{param.nope}}"] } }] };
    expect(() => compileDocument(bad)).toThrow(/step 2 \(two\): field exec\.argv\[1\]: .*param\.nope.*names no declared parameter/);
    expect(() => compileDocument({ name: "x", steps: [{ shell: { script: "echo {{ host.nope }}" } }] })).toThrow(/step 1: field shell\.script: .*unknown placeholder/);
    expect(() => compileDocument({ name: "x", steps: [{ shell: { script: "echo '{{host.id}}'" } }] })).toThrow(/inside single quotes/);
  });

  it("refuses malformed documents with INVALID_ARGUMENT", () => {
    const cases: unknown[] = [
      { steps: [{ exec: { argv: ["a"] } }] },
      { name: "a@b", steps: [{ exec: { argv: ["a"] } }] },
      { name: "x", steps: [] },
      { name: "x", steps: [{ bogus: 1 }] },
      { name: "x", steps: [{ name: "no tool" }] },
      { name: "x", extra: 1, steps: [{ exec: { argv: ["a"] } }] },
      { name: "x", parameters: [{ name: "p", type: "float" }], steps: [{ exec: { argv: ["a"] } }] },
      { name: "x", parameters: [{ name: "p", type: "string", colour: "red" }], steps: [{ exec: { argv: ["a"] } }] },
      { name: "x", steps: [{ alternatives: [{ when: "region = (", exec: { argv: ["a"] } }] }] },
      { name: "x", steps: [{ when: "all", exec: { argv: ["a"] } }] },
      { name: "x", steps: [{ alternatives: [] }] },
    ];
    for (const c of cases) expect(() => compileDocument(c), JSON.stringify(c)).toThrow(InvalidArgumentError);
  });

  it("reads NAME and NAME@VERSION", () => {
    expect(parseDocumentRef("greet")).toEqual({ name: "greet", version: 0 });
    expect(parseDocumentRef("greet@3")).toEqual({ name: "greet", version: 3 });
    expect(() => parseDocumentRef("greet@0")).toThrow(InvalidArgumentError);
    expect(() => parseDocumentRef("greet@x")).toThrow(InvalidArgumentError);
  });
});

describe("per-host rendering", () => {
  const doc = parseDocumentText(DOC);
  const params = { msg: "hi there", token: "s3cret", files: ["a b", "c"] };

  it("renders each host from its own id, region and facts; lists spread in argv, values quoted in shell", () => {
    const eu = planHost(doc, params, host("h1", "eu"));
    const us = planHost(doc, params, host("h2", "us"));
    expect(argv(eu.steps?.[0])).toEqual(["echo", "h1", "hi there", "a b", "c"]);
    expect(script(eu.steps?.[1])).toBe(rendered("echo § § §", "h1.example", "eu", "s3cret"));
    expect(script(us.steps?.[1])).toBe(rendered("echo § § §", "h2.example", "us", "s3cret"));
    expect(script(eu.steps?.[2])).toBe(rendered("echo eu §", "hi there"));
    expect(argv(us.steps?.[2])).toEqual(["echo", "other"]);
  });

  it("lets placeholders reach a shell only through a shell step run by sh, bash or dash -c (issue 12)", () => {
    const v = [{ name: "v", type: "string" }];
    const doc = (step: object) => () => compileDocument({ name: "s", parameters: v, steps: [step] });
    expect(doc({ shell: { script: "echo {{param.v}}", interpreter: ["/bin/bash", "-e", "-c"] } })).not.toThrow();
    expect(doc({ shell: { script: "echo {{param.v}}", interpreter: ["dash", "-ec"] } })).not.toThrow();
    expect(doc({ shell: { script: "print({{param.v}})", interpreter: ["python3", "-c"] } })).toThrow(/runs in sh, bash or dash with -c/);
    expect(doc({ shell: { script: "echo {{param.v}}", interpreter: ["zsh", "-c"] } })).toThrow(/runs in sh, bash or dash/);
    expect(doc({ shell: { script: "echo {{param.v}}", interpreter: ["sh", "-c", "x"] } })).toThrow(/runs in sh, bash or dash/);
    // Without placeholders the interpreter is the author's choice.
    expect(doc({ shell: { script: "print(1)", interpreter: ["python3", "-c"] } })).not.toThrow();
    // A parameter never chooses the program.
    expect(doc({ shell: { script: "echo hi", interpreter: ["{{param.v}}", "-c"] } })).toThrow(/interpreter is not a template/);
    expect(doc({ script: { artifact: `sha256:${"0".repeat(64)}`, interpreter: ["{{param.v}}"] } })).toThrow(/interpreter is not a template/);
    // sh -c with a placeholder in its command string is shell code; after it, a plain argument.
    expect(doc({ exec: { argv: ["/bin/sh", "-c", "echo {{param.v}}"] } })).toThrow(/command string of sh -c/);
    expect(doc({ exec: { argv: ["bash", "-xc", "echo {{param.v}}"] } })).toThrow(/command string of bash -xc/);
    expect(doc({ exec: { argv: ["sh", "-c", 'echo "$1"', "sh", "{{param.v}}"] } })).not.toThrow();
  });

  it("warns at put where a shell script parses a placeholder's quoted value again (eval, a nested sh -c), naming step and line", () => {
    const v = [{ name: "v", type: "string" }];
    const warn = (...scripts: string[]) => documentWarnings(compileDocument({ name: "w", parameters: v, steps: scripts.map((script) => ({ shell: { script } })) }));
    expect(warn("set -e\neval {{param.v}}")).toEqual([
      "step 1: field shell.script line 2: a placeholder after eval is quoted once and then parsed again as code: its value can run commands (pass it as a variable or an argument instead)",
    ]);
    expect(warn("x=1; eval echo {{param.v}}", "bash -lc {{param.v}}", "sudo sh -c {{param.v}}", "( zsh -c {{param.v}} )")).toEqual([
      expect.stringMatching(/^step 1: field shell\.script line 1: a placeholder after eval /),
      expect.stringMatching(/^step 2: field shell\.script line 1: a placeholder after bash -c /),
      expect.stringMatching(/^step 3: field shell\.script line 1: a placeholder after sh -c /),
      expect.stringMatching(/^step 4: field shell\.script line 1: a placeholder after zsh -c /),
    ]);
    // Quoted once and used as a value: no warning. Nor for eval after the placeholder, or a word that only contains eval.
    expect(warn("echo {{param.v}}", "evaluate {{param.v}}", "echo {{param.v}}; eval true", "bash -x {{param.v}}", "eval true\necho {{param.v}}")).toEqual([]);
    const alternatives = documentWarnings(compileDocument({ name: "w", parameters: v, steps: [{ alternatives: [{ when: "os=linux", shell: { script: "eval {{param.v}}" } }, { exec: { argv: ["echo", "{{param.v}}"] } }] }] }));
    expect(alternatives).toEqual([expect.stringMatching(/^step 1 alternative 1: field shell\.script line 1: /)]);
  });

  it("an injection attempt stays one literal argument or one quoted word", () => {
    const evil = "x; rm -rf / | $(touch /tmp/p) `id`\n-rf '\"";
    const d = compileDocument({ name: "e", parameters: [{ name: "v", type: "string" }], steps: [{ exec: { argv: ["echo", "{{param.v}}"] } }, { shell: { script: "printf %s {{param.v}}" } }] });
    const plan = planHost(d, { v: evil }, host("h1", "eu"));
    expect(argv(plan.steps?.[0])).toEqual(["echo", evil]);
    expect(script(plan.steps?.[1])).toBe(`readonly rexmesh_v1='${evil.replaceAll("'", "'\\''")}'; printf %s "\${rexmesh_v1}"`);
  });

  it("takes the first alternative the host matches and supports; rejects a host that fits none, with the reason", () => {
    const d = compileDocument({
      name: "alt",
      steps: [{ alternatives: [{ when: "region=eu", shell: { script: "echo eu" } }, { when: "label.kind=legacy", exec: { argv: ["echo", "legacy"] } }] }],
    });
    expect(script(planHost(d, {}, host("h1", "eu")).steps?.[0])).toBe("echo eu");
    // eu host without shell falls through to the next alternative, which it does not match either.
    const noShell = planHost(d, {}, host("h2", "eu", ["exec"]));
    expect(noShell.rejected).toMatch(/does not support shell.*does not match "label.kind=legacy"/);
    expect(argv(planHost(d, {}, host("h3", "us", ["exec"], { kind: "legacy" })).steps?.[0])).toEqual(["echo", "legacy"]);
    const none = planHost(d, {}, host("h4", "us"));
    expect(none.rejected).toMatch(/^step 1: no alternative fits host h4/);
  });

  it("renders tools it does not know by name (file.put, script) through protobuf-JSON, and names them as hosts report them", () => {
    const digest = `sha256:${"a".repeat(64)}`;
    const d = compileDocument({
      name: "put",
      parameters: [{ name: "dir", type: "string", pattern: "[a-z]+" }],
      steps: [
        { alternatives: [{ filePut: { artifact: digest, path: "{{param.dir}}/{{host.id}}.conf", baseDir: "/srv" } }, { exec: { argv: ["true"] } }] },
        { script: { artifact: digest, args: ["{{host.region}}", "{{param.dir}}"] } },
      ],
    });
    expect(d.steps[0]!.alternatives.map((a) => a.tool)).toEqual(["file.put", "exec"]);
    const plan = planHost(d, { dir: "etc" }, host("h1", "eu", ["exec", "shell", "script", "file.put"]));
    const [put, run] = plan.steps ?? [];
    expect(put?.tool.case === "filePut" && put.tool.value.path).toBe("etc/h1.conf");
    expect(run?.tool.case === "script" && run.tool.value.args).toEqual(["eu", "etc"]);
    // A host without file.put takes the exec alternative.
    expect(argv(planHost(d, { dir: "etc" }, host("h2", "eu", ["exec", "script"])).steps?.[0])).toEqual(["true"]);
  });

  it("a fact the host lacks is an error naming host, step and field, unless defaulted", () => {
    const d = compileDocument({ name: "f", steps: [{ exec: { argv: ["echo", "{{fact.kernel}}"] } }] });
    expect(() => planHost(d, {}, host("h1", "eu"))).toThrow(/host "h1": step 1: field exec\.argv: .*fact\.kernel/);
    const ok = compileDocument({ name: "f", steps: [{ exec: { argv: ["echo", '{{fact.kernel | default "?"}}'] } }] });
    expect(argv(planHost(ok, {}, host("h1", "eu")).steps?.[0])).toEqual(["echo", "?"]);
  });
});

class FakePort implements ProxyPort {
  readonly tasks: TaskSpec[] = [];
  constructor(readonly name: string, readonly region: string) {}
  sendTask(spec: TaskSpec): void {
    this.tasks.push(spec);
  }
  sendCancel(): void {}
}

describe("document runs in the job manager", () => {
  function setup() {
    const clock = new ManualClock();
    const store = new MemoryJobStore();
    const inventory = new Inventory();
    const documents = new DocumentStore(new MemoryDocumentBackend(), clock);
    const jobs = new JobManager({ store, inventory, clock, ids: counterIds(), log: silentLogger, documents });
    jobs.start();
    const ports = { eu: new FakePort("px-eu", "eu"), us: new FakePort("px-us", "us") };
    jobs.proxyConnected(ports.eu);
    jobs.proxyConnected(ports.us);
    const add = (id: string, region: "eu" | "us", tools = ["exec", "shell"]) => {
      const rec = inventory.connected({ id, tenant: "acme", facts: create(HostFactsSchema, { hostname: `${id}.example`, tools }) }, region, ports[region].name, clock.now());
      jobs.hostConnected(rec);
    };
    add("e1", "eu");
    add("u1", "us");
    add("u2", "us", ["exec"]);
    return { clock, store, jobs, documents, ports };
  }
  const req = (more: Partial<SubmitRequest>): SubmitRequest => submitRequest({ hostIds: [], allHosts: true, steps: [], ...more });
  const doc = compileDocument({
    name: "d",
    parameters: [
      { name: "msg", type: "string", pattern: "[a-z]+" },
      { name: "secret", type: "string", sensitive: true },
    ],
    steps: [{ alternatives: [{ shell: { script: "echo {{host.id}} {{param.msg}} {{param.secret}}" } }, { when: "region=eu", exec: { argv: ["echo", "{{param.secret}}"] } }] }],
  });

  it("stores versions per tenant, newest by default; other tenants see nothing", async () => {
    const t = setup();
    expect((await t.documents.put("acme", "op", doc)).version).toBe(1);
    expect((await t.documents.put("acme", "op", doc)).version).toBe(2);
    expect(t.documents.get("acme", "d").version).toBe(2);
    expect(t.documents.get("acme", "d@1").version).toBe(1);
    expect(() => t.documents.get("other", "d")).toThrow(NotFoundError);
    expect(t.documents.list("acme").map((d) => `${d.name}@${d.version}`)).toEqual(["d@2"]);
  });

  it("renders per host, sends real values to hosts, shows redacted ones, rejects the host that fits no alternative", async () => {
    const t = setup();
    await t.documents.put("acme", "op", doc);
    let authorized: Step[] = [];
    const job = await t.jobs.submit(operator("acme"), req({ document: "d", parameters: { msg: "hello", secret: "pw" } }), (_h, _r, steps) => {
      authorized = [...steps];
    });
    await flush();
    expect(job.document).toBe("d@1");
    expect(job.parameters).toEqual({ msg: "hello", secret: "[sensitive]" });
    expect(authorized.map(script)).toEqual([rendered("echo § § §", "e1", "hello", "pw"), rendered("echo § § §", "u1", "hello", "pw")]);
    expect(t.ports.eu.tasks.map((s) => script(s.steps[0]))).toEqual([rendered("echo § § §", "e1", "hello", "pw")]);
    expect(t.ports.us.tasks.map((s) => script(s.steps[0]))).toEqual([rendered("echo § § §", "u1", "hello", "pw")]);
    const tasks = t.jobs.tasksOf(job);
    const u2 = tasks.find((x) => x.hostId === "u2")!;
    expect(u2.state).toBe(TaskState.REJECTED);
    expect(u2.message).toMatch(/no alternative fits host u2/);
    const e1 = tasks.find((x) => x.hostId === "e1")!;
    expect(script(t.jobs.shownSteps(e1)?.[0])).toBe(rendered("echo § § §", "e1", "hello", "[sensitive]"));
  });

  it("refuses a parameter that fails its pattern, naming it, and stores nothing", async () => {
    const t = setup();
    await t.documents.put("acme", "op", doc);
    await expect(t.jobs.submit(operator("acme"), req({ document: "d", parameters: { msg: "x; rm", secret: "pw" } }))).rejects.toThrow(/parameter "msg"/);
    expect(t.store.listJobs("acme", 10)).toHaveLength(0);
    await expect(t.jobs.submit(operator("acme"), req({ document: "d", steps: [doc.steps[0]!.alternatives[0]!.step as never], parameters: {} }))).rejects.toThrow(InvalidArgumentError);
  });

  it("a dry run plans every host and stores nothing", async () => {
    const t = setup();
    await t.documents.put("acme", "op", doc);
    const plan = t.jobs.dryRun(operator("acme"), req({ document: "d", parameters: { msg: "hello", secret: "pw" } }));
    expect(plan.map((p) => [p.host.id, p.host.proxy, p.rejected ? "rejected" : script(p.steps[0])])).toEqual([
      ["e1", "px-eu", rendered("echo § § §", "e1", "hello", "[sensitive]")],
      ["u1", "px-us", rendered("echo § § §", "u1", "hello", "[sensitive]")],
      ["u2", "px-us", "rejected"],
    ]);
    expect(t.store.listJobs("acme", 10)).toHaveLength(0);
    expect(t.ports.eu.tasks).toHaveLength(0);
  });

  it("a job whose every host is rejected finishes", async () => {
    const t = setup();
    await t.documents.put("acme", "op", compileDocument({ name: "n", steps: [{ alternatives: [{ when: "region=nowhere", exec: { argv: ["true"] } }] }] }));
    const job = await t.jobs.submit(operator("acme"), req({ document: "n" }));
    await flush();
    expect(t.store.getJob(job.id)?.finishedAt).toBeDefined();
    expect(t.jobs.tasksOf(job).every((x) => x.state === TaskState.REJECTED)).toBe(true);
  });
});

describe("document runs through OperatorAccess: authorized on the rendered steps, audited without sensitive values", () => {
  const policy = `
roles:
  echo-only:
    hosts: all
    actions: [read, submit]
    commands:
      - program: echo
        args: ["[a-z0-9-]+"]
bindings:
  acme/alice: [echo-only]
`;
  async function setup() {
    const clock = new ManualClock();
    const store = new MemoryJobStore();
    const inventory = new Inventory();
    const documents = new DocumentStore(new MemoryDocumentBackend(), clock);
    const jobs = new JobManager({ store, inventory, clock, ids: counterIds(), log: silentLogger, documents });
    jobs.start();
    inventory.connected({ id: "h1", tenant: "acme", facts: create(HostFactsSchema, { tools: ["exec", "shell"] }) }, "eu", "px", clock.now());
    const auditStore = new MemoryAuditStore();
    const audit = new AuditLog({ store: auditStore, clock, ids: counterIds() });
    const authz = new Authorizer({ policyFile: "p.yaml", log: silentLogger, readFile: () => policy });
    const access = new OperatorAccess({ authz, audit, jobs, inventory, log: silentLogger, documents });
    const alice = operator("acme", "alice");
    await access.putDocument(
      alice,
      JSON.stringify({
        name: "say",
        parameters: [{ name: "word", type: "string" }, { name: "pin", type: "string", sensitive: true, default: "1234" }],
        steps: [{ exec: { argv: ["echo", "{{param.word}}", "{{param.pin}}"] } }],
      }),
    );
    const req = (word: string): SubmitRequest => ({
      hostIds: ["h1"],
      allHosts: false,
      steps: [],
      env: {},
      workingDir: "",
      stdin: new Uint8Array(),
      timeoutMs: 0,
      deliveryDeadlineMs: 0,
      idempotencyKey: "",
      idempotent: false,
      document: "say",
      parameters: { word },
    });
    return { access, alice, req, audit, store };
  }

  it("allows what the role allows once rendered, refuses what it does not, for runs and dry runs alike", async () => {
    const t = await setup();
    const job = await t.access.submit(t.alice, t.req("hello"));
    expect(job.document).toBe("say@1");
    await expect(t.access.submit(t.alice, t.req("$(reboot)"))).rejects.toThrow(/arguments of "echo"/);
    await expect(t.access.dryRun(t.alice, t.req("$(reboot)"))).rejects.toThrow(/arguments of "echo"/);
    expect((await t.access.dryRun(t.alice, t.req("fine"))).map((p) => argv(p.steps[0]))).toEqual([["echo", "fine", "[sensitive]"]]);
    const events = await t.audit.list("acme", {});
    const text = JSON.stringify(events);
    expect(text).not.toContain("1234");
    expect(events.map((e) => `${e.kind} ${e.decision}`)).toEqual(["submit allowed", "submit denied", "dry-run denied", "dry-run allowed"]);
    expect(events[0]!.what).toBe('hosts h1: document say@1 word=hello pin="[sensitive]"');
  });

  it("a task rejected at submit is still rejected after a restart before its rejection was stored", async () => {
    const clock = new ManualClock();
    const store = new MemoryJobStore();
    const inventory = new Inventory();
    const job = { id: "j1", tenant: "acme", submittedBy: "a", createdAt: 0, steps: [], env: {}, workingDir: "", stdin: new Uint8Array(), timeoutMs: 0, deliverBy: 3_600_000, lostAfterMs: 60_000, idempotent: false, idempotencyKey: "", cancelRequested: false, taskIds: ["t1"], outputLimitBytes: 0, document: "d@1" };
    await store.putJob(job, [{ id: "t1", jobId: "j1", tenant: "acme", hostId: "h1", region: "eu", proxy: "", state: TaskState.PENDING, signal: "", message: "", updatedAt: 0, outputChunks: 0, outputTruncated: false, released: false, rejectAtSubmit: "step 1: no alternative fits host h1" }]);
    const jobs = new JobManager({ store, inventory, clock, ids: counterIds(), log: silentLogger });
    jobs.start();
    await flush();
    expect(store.getTask("t1")).toMatchObject({ state: TaskState.REJECTED, message: "step 1: no alternative fits host h1" });
    expect(store.getJob("j1")?.finishedAt).toBeDefined();
  });
});

describe("python and ansible steps in documents", () => {
  const doc = compileDocument({
    name: "tools",
    parameters: [
      { name: "v", type: "string", pattern: ".*" },
      { name: "many", type: "list" },
    ],
    steps: [
      { python: { script: "print('{{ not a placeholder }}', {'a': {{1}}})", args: ["{{param.v}}", "{{param.many}}", "{{host.id}}"] } },
      { ansible: { playbook: "- hosts: all\n  tasks:\n    - debug: { msg: '{{ item }}' }\n", vars: { v: "{{param.v}}", h: "{{host.id}}" } } },
      { ansible: { module: "ansible.builtin.copy", moduleArgs: { content: "{{param.v}}", dest: "/tmp/{{host.id}}" } } },
    ],
  });

  it("passes python source and playbooks as written, renders args (a list spreads) and vars as values", () => {
    const plan = planHost(doc, { v: "{{ lookup('pipe','id') }}", many: ["a", "b c"] }, host("h1", "eu", ["python", "ansible"]));
    const [py, pb, mod] = plan.steps!;
    expect(py!.tool.case === "python" && py!.tool.value).toMatchObject({ script: "print('{{ not a placeholder }}', {'a': {{1}}})", args: ["{{ lookup('pipe','id') }}", "a", "b c", "h1"] });
    expect(pb!.tool.case === "ansible" && pb!.tool.value).toMatchObject({ playbook: "- hosts: all\n  tasks:\n    - debug: { msg: '{{ item }}' }\n", vars: { v: "{{ lookup('pipe','id') }}", h: "h1" } });
    expect(mod!.tool.case === "ansible" && mod!.tool.value).toMatchObject({ module: "ansible.builtin.copy", moduleArgs: { content: "{{ lookup('pipe','id') }}", dest: "/tmp/h1" } });
  });

  it("still checks the templates in args and vars at put", () => {
    expect(() => compileDocument({ name: "x", steps: [{ python: { script: "pass", args: ["{{param.nope}}"] } }] })).toThrow(/field python\.args\[0\]: .*param\.nope/);
    expect(() => compileDocument({ name: "x", steps: [{ ansible: { module: "ping", vars: { a: "{{fact.x" } } }] })).toThrow(InvalidArgumentError);
  });
});
