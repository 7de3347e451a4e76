/**
 * What makes a python or ansible step well formed, checked the same way at
 * the controller (submit, INVALID_ARGUMENT) and by the daemon (before it
 * writes or runs anything).
 */
import { isDigest } from "./digest.js";
import { LIMITS } from "./limits.js";
import type { AnsibleTool, PythonTool } from "../gen/rexmesh/v1/task_pb.js";

/** An Ansible variable or module argument name. */
const VAR_NAME = /^[A-Za-z_][A-Za-z0-9_]{0,127}$/;
/** A module name: `ping`, `ansible.builtin.file`, `community.general.ini_file`. */
const MODULE = /^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){0,2}$/;

/** Why a text cannot be an argument or file content: a NUL byte, or more than `argBytes`. */
export function textProblem(field: string, value: string): string | undefined {
  if (value.includes("\0")) return `${field} contains a NUL byte`;
  if (Buffer.byteLength(value) > LIMITS.argBytes) return `${field} is longer than ${LIMITS.argBytes} bytes`;
  return undefined;
}

function sourceProblem(tool: string, given: Record<string, boolean>): string | undefined {
  const named = Object.entries(given).filter(([, set]) => set).map(([k]) => k);
  if (named.length === 1) return undefined;
  const keys = Object.keys(given);
  return `${tool} needs exactly one of ${keys.slice(0, -1).join(", ")} and ${keys[keys.length - 1]}${named.length > 1 ? ` (got ${named.join(" and ")})` : ""}`;
}

/** Why a python step cannot run, or undefined. */
export function pythonProblem(t: PythonTool): string | undefined {
  const artifact = t.artifact !== "";
  const source = sourceProblem("python", { script: t.script.trim() !== "", artifact });
  if (source) return source;
  if (artifact && !isDigest(t.artifact)) return `python artifact ${JSON.stringify(t.artifact.slice(0, 80))} is not a digest of the form sha256:<64 lowercase hex digits>`;
  for (const [field, value] of [["python.script", t.script], ...t.args.map((a) => ["python.args", a])] as const) {
    const problem = textProblem(field, value);
    if (problem) return problem;
  }
  return undefined;
}

/** Why an ansible step cannot run, or undefined. */
export function ansibleProblem(t: AnsibleTool): string | undefined {
  const artifact = t.artifact !== "";
  const source = sourceProblem("ansible", { playbook: t.playbook.trim() !== "", artifact, module: t.module !== "" });
  if (source) return source;
  if (artifact && !isDigest(t.artifact)) return `ansible artifact ${JSON.stringify(t.artifact.slice(0, 80))} is not a digest of the form sha256:<64 lowercase hex digits>`;
  if (t.module !== "" && !MODULE.test(t.module)) return `ansible module ${JSON.stringify(t.module.slice(0, 80))} is not a module name (e.g. ping or ansible.builtin.copy)`;
  if (t.module === "" && Object.keys(t.moduleArgs).length > 0) return "ansible module_args belong to a module step";
  const playbook = textProblem("ansible.playbook", t.playbook);
  if (playbook) return playbook;
  for (const [field, map] of [["ansible.vars", t.vars], ["ansible.module_args", t.moduleArgs]] as const) {
    const entries = Object.entries(map);
    if (entries.length > LIMITS.toolVars) return `${field} has ${entries.length} entries; the limit is ${LIMITS.toolVars}`;
    for (const [name, value] of entries) {
      if (!VAR_NAME.test(name)) return `${field}: ${JSON.stringify(name.slice(0, 80))} is not a variable name (letters, digits, "_", not starting with a digit)`;
      if (map === t.vars && /^ansible_/i.test(name)) return `${field}: ${name}: variables named ansible_* configure Ansible itself (connection, interpreter, privilege) and cannot be set by a step`;
      const problem = textProblem(`${field}.${name}`, value);
      if (problem) return problem;
    }
  }
  return undefined;
}
