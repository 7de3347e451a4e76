/**
 * The execution tools of this host: what the daemon reports in facts.tools
 * (so that documents' alternatives and `when: tools=…` pick hosts by them)
 * and what it agrees to run.
 *
 * Built-in tools need nothing but the daemon. Program tools need a program:
 * it is looked up on the daemon's PATH at start, file by file, without a
 * shell, and the absolute path found is what steps run (a job cannot change
 * it). Operators add tools in the daemon's config (`tools: [docker,
 * python=/opt/py/bin/python3]`) and hide any (`hideTools: [ansible]`), so a
 * host can be made to look like one without them.
 */
import { accessSync, constants, statSync } from "node:fs";
import { delimiter, isAbsolute, join } from "node:path";
import { ConfigError } from "../common/errors.js";

/** Tools the daemon runs by itself. */
const BUILTIN_TOOLS = ["exec", "shell", "script", "file.put", "ping"] as const;

/**
 * Tools backed by a program found on PATH. `python` and `ansible` are step
 * tools (task.proto); `pwsh` is only reported, for `when: "tools=pwsh"` with
 * an exec or shell step that runs it.
 */
export const PROGRAM_TOOLS: Readonly<Record<string, string>> = { python: "python3", ansible: "ansible-playbook", pwsh: "pwsh" };

const NAME = /^[a-z][a-z0-9._-]{0,63}$/;

/** What this host offers: tool names in report order, and the program of each program tool it has. */
export interface HostTools {
  names: string[];
  /** Absolute path of the program behind each program tool present (python, ansible, pwsh). */
  programs: Readonly<Record<string, string>>;
}

export interface ToolOptions {
  /** Extra tools: `NAME` (reported; a program tool is looked up on PATH) or `NAME=/abs/path` (a program tool's program). */
  declared?: readonly string[];
  /** Tools neither reported nor run, whatever else says. */
  hidden?: readonly string[];
  /** The PATH searched; default the daemon's own (the one its children inherit). */
  path?: string;
}

/**
 * Detects this host's tools. Throws ConfigError for a declared or hidden
 * name that is not a tool name, and for a declared program that is not an
 * executable file given by absolute path.
 */
export function detectTools(opts: ToolOptions = {}): HostTools {
  const hidden = new Set((opts.hidden ?? []).map((n) => checkName(n, "hideTools")));
  const search = opts.path ?? process.env.PATH ?? "";
  const names: string[] = [...BUILTIN_TOOLS];
  const programs: Record<string, string> = {};
  for (const [tool, program] of Object.entries(PROGRAM_TOOLS)) {
    const found = findOnPath(program, search);
    if (found !== undefined) programs[tool] = found;
  }
  for (const entry of opts.declared ?? []) {
    const eq = entry.indexOf("=");
    const name = checkName(eq < 0 ? entry : entry.slice(0, eq), "tools");
    if (eq >= 0) {
      const path = entry.slice(eq + 1);
      if (!Object.hasOwn(PROGRAM_TOOLS, name)) throw new ConfigError(`tools: ${JSON.stringify(entry)}: only ${Object.keys(PROGRAM_TOOLS).join(", ")} take a program (NAME=/path)`);
      if (!isAbsolute(path) || !isExecutableFile(path)) throw new ConfigError(`tools: ${JSON.stringify(entry)}: ${JSON.stringify(path)} is not an executable file given by absolute path`);
      programs[name] = path;
    } else if (Object.hasOwn(PROGRAM_TOOLS, name)) {
      if (programs[name] === undefined) throw new ConfigError(`tools: ${name} is declared but ${PROGRAM_TOOLS[name]} is not on PATH (give ${name}=/path/to/${PROGRAM_TOOLS[name]})`);
    } else if (!names.includes(name)) {
      names.push(name);
    }
  }
  for (const tool of Object.keys(PROGRAM_TOOLS)) if (programs[tool] !== undefined) names.push(tool);
  for (const h of hidden) delete programs[h];
  return { names: names.filter((n) => !hidden.has(n)), programs };
}

function checkName(name: string, key: string): string {
  if (!NAME.test(name)) throw new ConfigError(`${key}: ${JSON.stringify(name)} is not a tool name (lowercase letters, digits, ".", "_", "-", at most 64)`);
  return name;
}

/** The first executable file called `program` in the directories of `search`, as execvp would pick it; relative directories are skipped. */
export function findOnPath(program: string, search: string): string | undefined {
  for (const dir of search.split(delimiter)) {
    if (dir === "" || !isAbsolute(dir)) continue;
    const candidate = join(dir, program);
    if (isExecutableFile(candidate)) return candidate;
  }
  return undefined;
}

function isExecutableFile(path: string): boolean {
  try {
    accessSync(path, constants.X_OK);
    return statSync(path).isFile();
  } catch {
    return false;
  }
}
