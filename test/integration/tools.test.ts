import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LocalMesh } from "../../cli/launcher.js";
import { StepSchema, TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { clientOf, collectJob, rexmesh, tempDir } from "./support.js";
import { testCa } from "../test-ca.js";

/**
 * Execution tools on a real mesh: four hosts, each its own daemon process
 * with a config file that hides some tools, so one machine (with python3
 * and Ansible from Debian, .ci/run) stands for hosts with and without them.
 * The same alternatives, from a stored document and from `rexmesh run
 * --alt`, run by Ansible, python3 or /bin/sh depending on the host, and a
 * host with none of them is REJECTED with the reason.
 */
const HIDDEN: Record<string, string[]> = {
  "h-ansible": [],
  "h-python": ["ansible"],
  "h-shell": ["python", "ansible"],
  "h-none": ["python", "ansible", "shell"],
};
const HOSTS = Object.keys(HIDDEN);

describe("execution tools chosen by host, with real python3 and ansible-playbook", () => {
  const work = tempDir("tools");
  const mesh = new LocalMesh({
    ca: testCa(),
    dir: join(work, "mesh"),
    regions: ["eu"],
    hosts: HOSTS.map((id) => ({ id, region: "eu" })),
    daemonArgsFor: ([host]) => {
      const file = join(work, `${host}.yaml`);
      writeFileSync(file, `hideTools: [${HIDDEN[host!]!.join(", ")}]\ntools: [site-${host}]\n`);
      return ["--config", file];
    },
  });
  const cli = (args: string[]) => rexmesh(args, mesh.exports());
  let conn: ReturnType<typeof clientOf>;

  beforeAll(async () => {
    await mesh.start();
    await mesh.waitForHosts(HOSTS.length);
    conn = clientOf(mesh);
  }, 120_000);
  afterAll(async () => {
    conn?.close();
    await mesh.stop();
  });

  it("each daemon reports the tools its host has, without the hidden ones, with the declared ones", async () => {
    const { hosts } = await conn.client.listHosts({});
    const tools = Object.fromEntries(hosts.map((h) => [h.id, h.facts!.tools]));
    expect(tools["h-ansible"]).toEqual(["exec", "shell", "script", "file.put", "ping", "site-h-ansible", "python", "ansible"]);
    expect(tools["h-python"]).toEqual(["exec", "shell", "script", "file.put", "ping", "site-h-python", "python"]);
    expect(tools["h-shell"]).toEqual(["exec", "shell", "script", "file.put", "ping", "site-h-shell"]);
    expect(tools["h-none"]).toEqual(["exec", "script", "file.put", "ping", "site-h-none"]);
    const byQuery = await cli(["hosts", "-t", "tools=python", "--json"]);
    expect((JSON.parse(byQuery.stdout) as { id: string }[]).map((h) => h.id).sort()).toEqual(["h-ansible", "h-python"]);
  });

  it("a document's alternatives run by Ansible, python3 or the shell by host, and a host with none is REJECTED with the reason", { timeout: 120_000 }, async () => {
    const doc = join(work, "which.yaml");
    writeFileSync(
      doc,
      `name: which
parameters:
  - { name: word, type: string, pattern: "[a-z{}' ]+" }
steps:
  - alternatives:
      - ansible: { module: ansible.builtin.debug, moduleArgs: { msg: "by-ansible {{host.id}} {{param.word}}" } }
      - python:
          script: |
            import sys
            print("by-python", sys.argv[1], sys.argv[2])
          args: ["{{host.id}}", "{{param.word}}"]
      - shell: { script: "echo by-shell {{host.id}} {{param.word}}" }
`,
    );
    expect((await cli(["docs", "put", doc])).code).toBe(0);
    // A value that Jinja, Python and the shell would each run, if any of them read it as code.
    const word = "{{ x }}' y";
    const { job } = await conn.client.submitJob({ allHosts: true, document: "which", parameters: { word } });
    const r = await collectJob(conn.client, job!.id);
    const state = (h: string) => TaskState[r.tasks.get(h)!.state];
    const out = (h: string) => r.stdout.get(h)?.toString("utf8") ?? "";
    expect(state("h-ansible"), out("h-ansible")).toBe("SUCCEEDED");
    expect(out("h-ansible")).toContain(`"msg": "by-ansible h-ansible {{ x }}' y"`);
    expect(state("h-python")).toBe("SUCCEEDED");
    expect(out("h-python")).toBe(`by-python h-python ${word}\n`);
    expect(state("h-shell")).toBe("SUCCEEDED");
    expect(out("h-shell")).toBe(`by-shell h-shell ${word}\n`);
    expect(state("h-none")).toBe("REJECTED");
    expect(r.tasks.get("h-none")!.message).toBe(
      "step 1: no alternative fits host h-none: alternative 1 (ansible): the host does not support ansible (its tools: exec, script, file.put, ping, site-h-none); " +
        "alternative 2 (python): the host does not support python (its tools: exec, script, file.put, ping, site-h-none); " +
        "alternative 3 (shell): the host does not support shell (its tools: exec, script, file.put, ping, site-h-none)",
    );
  });

  it("a daemon refuses a step whose tool its host does not have: REJECTED with the reason, nothing run", { timeout: 60_000 }, async () => {
    const python = create(StepSchema, { tool: { case: "python", value: { script: "print('ran')" } } });
    const { job } = await conn.client.submitJob({ hostIds: ["h-python", "h-shell"], steps: [python] });
    const r = await collectJob(conn.client, job!.id);
    expect(TaskState[r.tasks.get("h-python")!.state]).toBe("SUCCEEDED");
    expect(r.stdout.get("h-python")?.toString()).toBe("ran\n");
    expect(TaskState[r.tasks.get("h-shell")!.state]).toBe("REJECTED");
    expect(r.tasks.get("h-shell")!.message).toBe("step 1 needs the python tool, which this host does not have (its tools: exec, shell, script, file.put, ping, site-h-shell)");
    expect(r.stdout.get("h-shell")).toBeUndefined();
  });

  it("rexmesh run --alt carries alternatives: each host's output shows which ran, a host with none fails the run", { timeout: 120_000 }, async () => {
    const playbook = join(work, "site.yml");
    writeFileSync(playbook, "- hosts: all\n  gather_facts: false\n  tasks:\n    - ansible.builtin.debug: { msg: \"playbook {{ release }}\" }\n");
    const r = await cli(["run", "--all", "--alt", `ansible: @${playbook} release=r{{host.id}}`, "--alt", "python: import socket; print('alt-python')", "--alt", "shell: echo alt-shell {{host.id}}"]);
    const shown = `exit ${r.code}\nstdout:\n${r.stdout}\nstderr:\n${r.stderr}`;
    expect(r.code, shown).toBe(1);
    expect(r.stdout, shown).toMatch(/^h-ansible out\| +"msg": "playbook rh-ansible"$/m);
    expect(r.stdout, shown).toMatch(/^h-python +out\| alt-python$/m);
    expect(r.stdout, shown).toMatch(/^h-shell +out\| alt-shell h-shell$/m);
    expect(r.stdout, shown).toMatch(/^4 hosts: 3 succeeded, 1 rejected in /m);
    expect(r.stdout, shown).toMatch(/^ +h-none +\[eu\] REJECTED: step 1: no alternative fits host h-none: alternative 1 \(ansible\): the host does not support ansible /m);

    const dry = await cli(["run", "-H", "h-python,h-none", "--dry-run", "--alt", "python when tools=site-h-python: print(1)", "--alt", "exec: uname -n"]);
    expect(dry.code, dry.stderr).toBe(0);
    expect(dry.stdout).toMatch(/h-python[^\n]*\n {2}1\. python print\(1\)\n/);
    expect(dry.stdout).toMatch(/h-none[^\n]*\n {2}1\. exec \["uname","-n"\]/);

    const bad = await cli(["run", "--all", "--alt", "perl: print 1"]);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toBe('rexmesh: --alt #1: unknown tool "perl" (use exec, shell, python, ansible)\n');
    const both = await cli(["run", "--all", "--alt", "shell: true", "--", "true"]);
    expect(both.code).toBe(2);
    expect(both.stderr).toMatch(/--alt gives the whole step/);
  });
});
