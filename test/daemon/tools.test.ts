import { chmodSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { afterAll, describe, expect, it } from "vitest";
import { systemClock } from "../../common/clock.js";
import { ConfigError } from "../../common/errors.js";
import { Executor } from "../../daemon/executor.js";
import { detectTools, findOnPath } from "../../daemon/tools.js";
import { OutputStream, StepSchema, TaskSpecSchema, TaskState, type Step } from "../../gen/rexmesh/v1/task_pb.js";

/**
 * The python and ansible tools with the real python3 and ansible-playbook of
 * this machine (.ci/run installs them from Debian), and tool detection on a
 * PATH the test builds.
 */
const tmp = mkdtempSync(join(tmpdir(), "rexmesh-tools-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** This machine's tools: python3 and ansible-playbook must be there (no skipping: the test exists to run them). */
const found = detectTools();

function executable(dir: string, name: string): string {
  mkdirSync(dir, { recursive: true });
  const path = join(dir, name);
  writeFileSync(path, "#!/bin/sh\n");
  chmodSync(path, 0o755);
  return path;
}

async function run(steps: Step[], programs = found.programs) {
  const executor = new Executor({ clock: systemClock, programs });
  const out: { stream: OutputStream; text: string }[] = [];
  const outcome = await executor.run(create(TaskSpecSchema, { taskId: "t1", steps }), {
    onOutput: (stream, data) => out.push({ stream, text: Buffer.from(data).toString("utf8") }),
  });
  const text = (s: OutputStream) => out.filter((o) => o.stream === s).map((o) => o.text).join("");
  return { outcome, stdout: text(OutputStream.STDOUT), stderr: text(OutputStream.STDERR) };
}

const pythonStep = (value: { script?: string; artifact?: string; args?: string[] }) => create(StepSchema, { tool: { case: "python", value } });
const ansibleStep = (value: { playbook?: string; module?: string; moduleArgs?: Record<string, string>; vars?: Record<string, string> }) =>
  create(StepSchema, { tool: { case: "ansible", value } });

/** Step files left behind in the temp directory (each step's directory must be gone after it). */
const leftovers = () => readdirSync(tmpdir()).filter((f) => f.startsWith("rexmesh-step-"));

describe("tool detection", () => {
  it("finds programs on PATH without a shell, first directory first, skipping relative and non-executable entries", () => {
    const a = join(tmp, "a");
    const b = join(tmp, "b");
    mkdirSync(a, { recursive: true });
    writeFileSync(join(a, "python3"), "not executable");
    const inB = executable(b, "python3");
    executable(b, "ansible-playbook");
    expect(findOnPath("python3", `relative/dir:${a}:${b}`)).toBe(inB);
    const t = detectTools({ path: `${a}:${b}` });
    expect(t.names).toEqual(["exec", "shell", "script", "file.put", "ping", "python", "ansible"]);
    expect(t.programs).toEqual({ python: inB, ansible: join(b, "ansible-playbook") });
    expect(detectTools({ path: a }).names).toEqual(["exec", "shell", "script", "file.put", "ping"]);
  });

  it("reports declared tools, takes a program by absolute path, and hides tools from facts and from running", () => {
    const c = join(tmp, "c");
    const py = executable(c, "py");
    const t = detectTools({ path: "", declared: ["docker", `python=${py}`], hidden: ["shell", "ansible"] });
    expect(t.names).toEqual(["exec", "script", "file.put", "ping", "docker", "python"]);
    expect(t.programs).toEqual({ python: py });
    const hidden = detectTools({ path: "", declared: [`python=${py}`], hidden: ["python"] });
    expect(hidden.names).not.toContain("python");
    expect(hidden.programs).toEqual({});
  });

  it("refuses a bad tool name, a program that is not an executable file, and a declared program tool it cannot find", () => {
    expect(() => detectTools({ declared: ["Bad Name"] })).toThrow(ConfigError);
    expect(() => detectTools({ hidden: ["x;y"] })).toThrow(/hideTools: "x;y" is not a tool name/);
    expect(() => detectTools({ declared: [`python=${join(tmp, "nope")}`] })).toThrow(/is not an executable file/);
    expect(() => detectTools({ declared: ["python=python3"] })).toThrow(/absolute path/);
    expect(() => detectTools({ declared: ["docker=/bin/sh"] })).toThrow(/only python, ansible, pwsh take a program/);
    expect(() => detectTools({ path: "", declared: ["ansible"] })).toThrow(/ansible is declared but ansible-playbook is not on PATH/);
  });
});

describe("the python tool (real python3)", () => {
  it("runs the source with the host's python3, args as sys.argv, never as code, and removes its file", async () => {
    const before = leftovers();
    const hostile = `'; import os; os.system("touch ${join(tmp, "pwned")}") #`;
    const r = await run([pythonStep({ script: "import sys, json\nprint(json.dumps(sys.argv[1:]))\nprint('file', sys.argv[0].endswith('main.py'))", args: ["a b", hostile, "{{x}}"] })]);
    expect(r.outcome.state, r.stderr).toBe(TaskState.SUCCEEDED);
    expect(JSON.parse(r.stdout.split("\n")[0]!)).toEqual(["a b", hostile, "{{x}}"]);
    expect(r.stdout).toContain("file True");
    expect(leftovers()).toEqual(before);
    expect(() => readFileSync(join(tmp, "pwned"))).toThrow();
  });

  it("fails with python's exit code and stderr", async () => {
    const r = await run([pythonStep({ script: "import sys\nsys.stderr.write('boom\\n')\nsys.exit(3)" })]);
    expect(r.outcome.state).toBe(TaskState.FAILED);
    expect(r.outcome.exitCode).toBe(3);
    expect(r.stderr).toBe("boom\n");
  });

  it("fails a python step on a host without python3 (hidden), and a malformed one, without running anything", async () => {
    const none = await run([pythonStep({ script: "print(1)" })], {});
    expect(none.outcome.state).toBe(TaskState.FAILED);
    expect(none.outcome.message).toBe("step 1: this host has no python tool (python3 not found, or hidden by the daemon's config)");
    const both = await run([pythonStep({ script: "print(1)", artifact: "sha256:" + "0".repeat(64) })]);
    expect(both.outcome.message).toBe("step 1: python needs exactly one of script and artifact (got script and artifact)");
    const big = await run([pythonStep({ script: "#".repeat(128 * 1024 + 1) })]);
    expect(big.outcome.message).toBe("step 1: python.script is longer than 131072 bytes");
  });
});

describe("the ansible tool (real ansible-playbook, -c local)", () => {
  it("runs a playbook against this host only, with vars that Jinja never evaluates", { timeout: 120_000 }, async () => {
    const out = join(tmp, "playbook-out");
    const playbook = `- hosts: all
  gather_facts: false
  tasks:
    - ansible.builtin.copy:
        dest: "{{ dest }}"
        content: "{{ inventory_hostname }} {{ ansible_connection }} {{ greeting }}"
`;
    const r = await run([ansibleStep({ playbook, vars: { dest: out, greeting: `{{ lookup('pipe', 'id') }} "q" \\ é\n✓` } })]);
    expect(r.outcome.state, r.stdout + r.stderr).toBe(TaskState.SUCCEEDED);
    expect(readFileSync(out, "utf8")).toBe(`localhost local {{ lookup('pipe', 'id') }} "q" \\ é\n✓`);
    expect(r.stdout).toMatch(/localhost\s+: ok=1\s+changed=1/);
  });

  it("runs one module with its arguments, unsafe too, and fails when the module fails", { timeout: 120_000 }, async () => {
    const out = join(tmp, "module-out");
    const r = await run([ansibleStep({ module: "ansible.builtin.copy", moduleArgs: { dest: out, content: "{{ 7 * 6 }}" } })]);
    expect(r.outcome.state, r.stdout + r.stderr).toBe(TaskState.SUCCEEDED);
    expect(readFileSync(out, "utf8")).toBe("{{ 7 * 6 }}");
    const bad = await run([ansibleStep({ module: "ansible.builtin.command", moduleArgs: { argv: "false" } })]);
    expect(bad.outcome.state).toBe(TaskState.FAILED);
    expect(bad.outcome.exitCode).toBe(2);
  });

  it("refuses ansible_* variables, which would reconfigure Ansible itself", async () => {
    const r = await run([ansibleStep({ module: "ping", vars: { ansible_python_interpreter: "/tmp/evil" } })]);
    expect(r.outcome.state).toBe(TaskState.FAILED);
    expect(r.outcome.message).toMatch(/ansible\.vars: ansible_python_interpreter: variables named ansible_\* configure Ansible itself/);
  });
});
