import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LocalMesh } from "../../cli/launcher.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { clientOf, collectJob, rexmesh, tempDir } from "./support.js";
import { testCa } from "../test-ca.js";

/**
 * Documents end to end: a mesh of two regions (eu-west, us-east) with two
 * hosts each; documents stored with the real CLI, run by the API and the
 * CLI, rendered per host at the controller.
 */
describe("documents, per-host templates, alternatives and dry runs on a real mesh", () => {
  const work = tempDir("docs");
  const markers = join(work, "markers");
  const mesh = new LocalMesh({
    ca: testCa(),
    dir: join(work, "mesh"),
    regions: ["eu-west", "us-east"],
    hosts: [
      { id: "eu-1", region: "eu-west" },
      { id: "eu-2", region: "eu-west" },
      { id: "us-1", region: "us-east" },
      { id: "us-2", region: "us-east" },
    ],
  });
  const cli = (args: string[]) => rexmesh(args, mesh.exports());
  const put = (name: string, doc: unknown) => {
    const file = join(work, `${name}.json`);
    writeFileSync(file, JSON.stringify(doc));
    return cli(["docs", "put", file]);
  };
  let conn: ReturnType<typeof clientOf>;
  const SECRET = "pw-Zq81-secret";

  beforeAll(async () => {
    await mesh.start();
    await mesh.waitForHosts(4);
    conn = clientOf(mesh);
    // us-2 is a "legacy" host: the second alternative below is meant for it.
    expect((await cli(["hosts", "label", "us-2", "kind=legacy"])).code).toBe(0);
    writeFileSync(
      join(work, "greet.yaml"),
      `name: greet
description: per-host greeting
parameters:
  - { name: msg, type: string, pattern: "[A-Za-z0-9 ]+" }
  - { name: count, type: int, default: 1 }
  - { name: token, type: string, sensitive: true }
steps:
  - exec: { argv: [printf, "%s|%s|%s\\\\n", "{{host.id}}", "{{fact.hostname}}", "{{host.region}}"] }
  - shell: { script: "echo host={{host.id}} region={{host.region}} count={{param.count}} msg={{param.msg}} token={{param.token}}" }
`,
    );
    const r = await cli(["docs", "put", join(work, "greet.yaml")]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toBe("stored greet@1\n");
  });

  afterAll(async () => {
    conn?.close();
    await mesh.stop();
  });

  it("stores immutable versions and refuses unknown placeholders at put, naming step and field", async () => {
    const v2 = await put("greet2", { name: "other", steps: [{ exec: { argv: ["true"] } }] });
    expect(v2.stdout).toBe("stored other@1\n");
    expect((await put("greet3", { name: "other", steps: [{ exec: { argv: ["false"] } }] })).stdout).toBe("stored other@2\n");
    const shown = await cli(["docs", "show", "other@1", "--json"]);
    expect(JSON.parse(shown.stdout).content.steps[0].exec.argv).toEqual(["true"]);
    const list = await cli(["docs", "list", "--json"]);
    expect((JSON.parse(list.stdout) as { name: string; version: number }[]).map((d) => `${d.name}@${d.version}`).sort()).toEqual(["greet@1", "other@2"]);
    const bad = await put("bad", { name: "bad", steps: [{ exec: { argv: ["echo"] } }, { shell: { script: "echo {{param.nope}}" } }] });
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/InvalidArgument: step 2: field shell\.script: .*param\.nope/);
    expect((await cli(["docs", "show", "bad"])).stderr).toMatch(/NotFound/);
  });

  it("refuses at docs put the template of issue 12 that /bin/sh read differently, and a ReDoS pattern at once", async () => {
    const finding = await put("finding", { name: "finding", parameters: [{ name: "v", type: "string" }], steps: [{ shell: { script: `echo "\${u-'}" '}" {{param.v}} '` } }] });
    expect(finding.code).toBe(2);
    expect(finding.stderr).toMatch(/InvalidArgument: step 1: field shell\.script: .*parameter expansion with an operator/);
    const t0 = Date.now();
    const redos = await put("redos", { name: "redos", parameters: [{ name: "v", type: "string", pattern: "(a|a)+", default: "a".repeat(30) + "!" }], steps: [{ exec: { argv: ["true"] } }] });
    expect(redos.code).toBe(2);
    expect(redos.stderr).toMatch(/InvalidArgument: parameter "v": default does not match/);
    expect(Date.now() - t0).toBeLessThan(10_000);
  });

  it("runs on hosts of both regions; each host's rendered steps carry its own facts; sensitive values reach hosts but no listing", async () => {
    const r = await cli(["run", "--doc", "greet", "-p", "msg=hello world", "-p", "count=3", "-p", `token=${SECRET}`, "--all", "--json"]);
    expect(r.code, r.stderr).toBe(0);
    const events = r.stdout.trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
    const jobId = String((events.find((e) => e.type === "job") as { job: { id: string } } | undefined)?.job.id ?? "");
    const result = await collectJob(conn.client, jobId || (await conn.client.listJobs({ limit: 1 })).jobs[0]!.id);
    const hostname = (await conn.client.listHosts({})).hosts.find((h) => h.id === "eu-1")!.facts!.hostname;
    for (const [id, region] of [["eu-1", "eu-west"], ["eu-2", "eu-west"], ["us-1", "us-east"], ["us-2", "us-east"]] as const) {
      expect(result.tasks.get(id)?.state, id).toBe(TaskState.SUCCEEDED);
      expect(result.stdout.get(id)?.toString()).toBe(`${id}|${hostname}|${region}\nhost=${id} region=${region} count=3 msg=hello world token=${SECRET}\n`);
    }
    const { job, tasks } = await conn.client.getJob({ jobId: result.job.id });
    expect(job?.document).toBe("greet@1");
    expect(job?.parameters).toEqual({ msg: "hello world", count: "3", token: "[sensitive]" });
    const eu1 = tasks.find((t) => t.hostId === "eu-1")!;
    const step = eu1.steps[1]!;
    expect(step.tool.case === "shell" && step.tool.value.script).toBe(
      `readonly rexmesh_v1='eu-1' rexmesh_v2='eu-west' rexmesh_v3='3' rexmesh_v4='hello world' rexmesh_v5='[sensitive]'; echo host="\${rexmesh_v1}" region="\${rexmesh_v2}" count="\${rexmesh_v3}" msg="\${rexmesh_v4}" token="\${rexmesh_v5}"`,
    );
    const listings = JSON.stringify([job, tasks, (await conn.client.listJobs({})).jobs, (await conn.client.listAudit({ limit: 1000 })).events], (_k, v: unknown) => (typeof v === "bigint" ? String(v) : v));
    expect(listings).not.toContain(SECRET);
    expect(readFileSync(mesh.controller.logFile, "utf8")).not.toContain(SECRET);
  });

  it("refuses a bad typed value with INVALID_ARGUMENT naming the parameter", async () => {
    const r = await cli(["run", "--doc", "greet", "-p", "msg=hi", "-p", "count=many", "-p", "token=x", "--all"]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/InvalidArgument: parameter "count"/);
  });

  it("an injection corpus is refused by the pattern or arrives as one literal argument, never executed", async () => {
    const put1 = await put("echo-raw", {
      name: "echo-raw",
      parameters: [
        { name: "raw", type: "string" },
        { name: "safe", type: "string", pattern: "[A-Za-z0-9][A-Za-z0-9_.]*", default: "ok" },
      ],
      steps: [{ exec: { argv: ["printf", "[%s]\\n", "{{param.raw}}"] } }, { shell: { script: "printf '<%s>\\n' {{param.raw}} {{param.safe}}" } }],
    });
    expect(put1.code, put1.stderr).toBe(0);
    const corpus = [
      `a; touch ${markers}-semi`,
      `a | touch ${markers}-pipe`,
      `$(touch ${markers}-subst)`,
      `\`touch ${markers}-tick\``,
      `a\ntouch ${markers}-nl`,
      "-rf",
      "--help",
      `it's "quoted" 'x'`,
      "${HOME} $HOME \\ * ?",
    ];
    for (const value of corpus) {
      await expect(conn.client.submitJob({ hostIds: ["eu-1"], document: "echo-raw", parameters: { raw: "x", safe: value } }), JSON.stringify(value)).rejects.toSatisfy(
        (e: unknown) => e instanceof ConnectError && e.code === Code.InvalidArgument && e.rawMessage.startsWith('parameter "safe" does not match'),
      );
      const { job } = await conn.client.submitJob({ hostIds: ["eu-1", "us-1"], document: "echo-raw", parameters: { raw: value } });
      const result = await collectJob(conn.client, job!.id);
      for (const h of ["eu-1", "us-1"]) {
        expect(result.tasks.get(h)?.state, `${h} ${JSON.stringify(value)}`).toBe(TaskState.SUCCEEDED);
        expect(result.stdout.get(h)?.toString()).toBe(`[${value}]\n<${value}>\n<ok>\n`);
      }
    }
    await expect(conn.client.submitJob({ hostIds: ["eu-1"], document: "echo-raw", parameters: { raw: "a\0b" } })).rejects.toSatisfy(
      (e: unknown) => e instanceof ConnectError && e.code === Code.InvalidArgument && e.rawMessage.includes('parameter "raw"'),
    );
    for (const m of ["semi", "pipe", "subst", "tick", "nl"]) expect(existsSync(`${markers}-${m}`), m).toBe(false);
  });

  it("runs each host with the alternative it fits and rejects the host that fits none, with the reason in the job", async () => {
    const r = await put("alt", {
      name: "alt",
      steps: [
        {
          alternatives: [
            { when: "region=eu-west", shell: { script: "echo shell on {{host.id}}" } },
            { when: "label.kind=legacy", exec: { argv: ["echo", "exec on", "{{host.id}}"] } },
          ],
        },
      ],
    });
    expect(r.code, r.stderr).toBe(0);
    const { job } = await conn.client.submitJob({ allHosts: true, document: "alt" });
    const result = await collectJob(conn.client, job!.id);
    expect(result.stdout.get("eu-1")?.toString()).toBe("shell on eu-1\n");
    expect(result.stdout.get("eu-2")?.toString()).toBe("shell on eu-2\n");
    expect(result.stdout.get("us-2")?.toString()).toBe("exec on us-2\n");
    const us1 = result.tasks.get("us-1")!;
    expect(us1.state).toBe(TaskState.REJECTED);
    expect(us1.message).toMatch(/no alternative fits host us-1: alternative 1 \(shell\): the host does not match "region=eu-west"; alternative 2 \(exec\)/);
    const show = await cli(["jobs", "show", job!.id]);
    expect(show.stdout).toMatch(/us-1 +us-east +REJECTED: step 1: no alternative fits host us-1/);
  });

  it("--dry-run lists hosts, proxies and rendered steps, and creates no job", async () => {
    const before = (await conn.client.listJobs({ limit: 1000 })).jobs.length;
    const r = await cli(["run", "--doc", "greet", "-p", "msg=dry", "-p", `token=${SECRET}`, "-t", "region=us-east or #eu-1", "--dry-run"]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^eu-1 +eu-west +via proxy-eu-west +connected\n  1\. exec \["printf","%s\|%s\|%s\\\\n","eu-1",".+","eu-west"\]\n  2\. shell readonly rexmesh_v1='eu-1' rexmesh_v2='eu-west' rexmesh_v3='1' rexmesh_v4='dry' rexmesh_v5='\[sensitive\]'; echo host="\$\{rexmesh_v1\}" region="\$\{rexmesh_v2\}" count="\$\{rexmesh_v3\}" msg="\$\{rexmesh_v4\}" token="\$\{rexmesh_v5\}"\n/);
    expect(r.stdout).toMatch(/us-2 +us-east +via proxy-us-east +connected\n/);
    expect(r.stdout).toContain("dry run: 3 hosts, 3 would run, 0 rejected; nothing was stored or run");
    expect(r.stdout).not.toContain(SECRET);
    const j = await cli(["run", "--doc", "alt", "--all", "--dry-run", "--json"]);
    const plan = JSON.parse(j.stdout) as { hosts: { host: string; proxy: string; steps: unknown[]; rejected?: string }[] };
    expect(plan.hosts.map((h) => [h.host, h.proxy, h.rejected ? "rejected" : JSON.stringify(h.steps)])).toEqual([
      ["eu-1", "proxy-eu-west", JSON.stringify([{ shell: { script: `readonly rexmesh_v1='eu-1'; echo shell on "\${rexmesh_v1}"` } }])],
      ["eu-2", "proxy-eu-west", JSON.stringify([{ shell: { script: `readonly rexmesh_v1='eu-2'; echo shell on "\${rexmesh_v1}"` } }])],
      ["us-1", "proxy-us-east", "rejected"],
      ["us-2", "proxy-us-east", JSON.stringify([{ exec: { argv: ["echo", "exec on", "us-2"] } }])],
    ]);
    expect((await conn.client.listJobs({ limit: 1000 })).jobs.length).toBe(before);
  });
});
