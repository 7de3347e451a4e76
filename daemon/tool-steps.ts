/**
 * How the python and ansible tools run: which files a step needs and the
 * argv that runs them. Nothing here passes through a shell; every value is
 * an argv element or the content of a private file, and values that reach
 * Ansible are marked `!unsafe`, so Jinja never evaluates them.
 */
import { join } from "node:path";
import { ansibleProblem, pythonProblem } from "../common/tool-checks.js";
import type { AnsibleTool, PythonTool } from "../gen/rexmesh/v1/task_pb.js";

/**
 * A process that needs files while it runs: `files` (name → content) are
 * written to a new private directory, `artifact` is fetched and verified,
 * and `argv` gets both paths; all are removed when the process is done.
 */
export interface Stage {
  artifact?: string;
  files: Readonly<Record<string, string>>;
  argv: (dir: string, artifactPath: string | undefined) => string[];
}

/** `python3 FILE ARGS...`: the source (or the fetched artifact) as a file, the args as sys.argv[1:]. */
export function pythonStage(t: PythonTool, python: string): Stage | string {
  const problem = pythonProblem(t);
  if (problem) return problem;
  const args = [...t.args];
  if (t.artifact !== "") return { artifact: t.artifact, files: {}, argv: (_dir, file) => [python, file!, ...args] };
  return { files: { "main.py": t.script }, argv: (dir) => [python, join(dir, "main.py"), ...args] };
}

/** The inventory Ansible runs against: this host alone, over the local connection. */
const ANSIBLE_LOCAL = ["-i", "localhost,", "-c", "local"] as const;

/** `ansible-playbook -i localhost, -c local [-e @vars.yml] PLAYBOOK`: a playbook given, fetched, or written around one module. */
export function ansibleStage(t: AnsibleTool, ansiblePlaybook: string): Stage | string {
  const problem = ansibleProblem(t);
  if (problem) return problem;
  const files: Record<string, string> = {};
  const hasVars = Object.keys(t.vars).length > 0;
  if (hasVars) files["vars.yml"] = unsafeMapping(t.vars, "");
  const argv = (dir: string, playbook: string) => [ansiblePlaybook, ...ANSIBLE_LOCAL, ...(hasVars ? ["-e", `@${join(dir, "vars.yml")}`] : []), playbook];
  if (t.artifact !== "") return { artifact: t.artifact, files, argv: (dir, file) => argv(dir, file!) };
  files["playbook.yml"] = t.module !== "" ? modulePlaybook(t.module, t.moduleArgs) : t.playbook;
  return { files, argv: (dir) => argv(dir, join(dir, "playbook.yml")) };
}

/** A playbook whose only task runs `module` on this host with `args`, each value unsafe. */
function modulePlaybook(module: string, args: Readonly<Record<string, string>>): string {
  const body = Object.keys(args).length > 0 ? `\n${unsafeMapping(args, "        ")}` : " {}\n";
  return `- hosts: localhost\n  gather_facts: false\n  tasks:\n    - name: ${module}\n      ${module}:${body}`;
}

/**
 * A YAML mapping of names (already checked: letters, digits, "_") to
 * strings tagged `!unsafe`, each value double-quoted with every character
 * outside printable ASCII escaped, so any text reads back exactly.
 */
function unsafeMapping(map: Readonly<Record<string, string>>, indent: string): string {
  return Object.entries(map)
    .map(([k, v]) => `${indent}${k}: !unsafe "${yamlEscape(v)}"\n`)
    .join("");
}

function yamlEscape(value: string): string {
  let out = "";
  for (const ch of value) {
    const cp = ch.codePointAt(0)!;
    if (ch === '"' || ch === "\\") out += `\\${ch}`;
    else if (cp >= 0x20 && cp <= 0x7e) out += ch;
    else if (cp <= 0xffff) out += `\\u${cp.toString(16).padStart(4, "0")}`;
    else out += `\\U${cp.toString(16).padStart(8, "0")}`;
  }
  return out;
}
