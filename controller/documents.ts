/**
 * Command documents: a named, versioned specification of what to run —
 * typed parameters (controller/params.ts) and steps whose string fields are
 * templates (controller/template.ts) rendered per host at submit time.
 *
 * A step is protobuf-JSON of `rexmesh.v1.Step` (`{exec: {argv: [...]}}`,
 * `{shell: {script: "..."}}`, and whatever tools Step gains later), or
 * `{alternatives: [{when: QUERY, <step>}, ...]}`: each host gets the first
 * alternative whose `when` matches it and whose tool it reports supporting;
 * a host that fits none is rejected with the reason.
 *
 * Rendering walks the step JSON and renders every string but code
 * (`python.script`, `ansible.playbook`, passed as written): `exec.argv` and
 * `python.args` with {@link renderArgv} (a list parameter spreads into elements),
 * `shell.script` with {@link renderShell} (values quoted), anything else with
 * {@link renderText}; the result is converted with `fromJson(StepSchema, …)`,
 * so a tool added to Step works here without changes.
 */
import { fromJson, type JsonValue } from "@bufbuild/protobuf";
import { parse as parseYaml } from "yaml";
import { InvalidArgumentError } from "../common/errors.js";
import { LIMITS } from "../common/limits.js";
import { toolName } from "../common/step-tool.js";
import { StepSchema, type Step } from "../gen/rexmesh/v1/task_pb.js";
import type { HostRecord } from "./model.js";
import { validateParamSpecs, type ParamSpec, type ParamValue } from "./params.js";
import { hostView, matchHost, parseQuery, QuerySyntaxError, type HostView, type Query } from "./query.js";
import { renderArgv, renderShell, renderText, templateRefs, validateTemplate, type RenderContext } from "./template.js";

/** Most steps a document may declare (as a job may carry). */
const MAX_DOCUMENT_STEPS = LIMITS.documentSteps;
/** Most alternatives one step may offer. */
const MAX_ALTERNATIVES = LIMITS.alternativesPerStep;
/** Largest document accepted, in characters. */
const MAX_DOCUMENT_LENGTH = LIMITS.documentChars;

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
const DOC_KEYS = ["name", "description", "parameters", "steps"];
const PARAM_KEYS = ["name", "type", "description", "default", "required", "pattern", "values", "sensitive", "maxLength"];

type JsonObject = { [k: string]: JsonValue };

/** One way of running a step: an optional host condition and a Step as protobuf-JSON holding templates. */
export interface Alternative {
  when?: string;
  query?: Query;
  /** The tool's name as hosts report it in facts.tools (`exec`, `shell`, `file.put`, …). */
  tool: string;
  step: JsonObject;
}

/** A step of a document: a plain step is one alternative that every host fits. */
export interface DocumentStep {
  alternatives: Alternative[];
  /** Written with `alternatives:` (then the host's tools are checked). */
  offered: boolean;
}

export interface CommandDocument {
  name: string;
  description: string;
  parameters: ParamSpec[];
  steps: DocumentStep[];
  /** The document as stored: canonical JSON of what was given. */
  source: JsonObject;
}

/** What one host gets from a document: its rendered steps, or why it is rejected. */
export type HostPlan = { steps: Step[]; rejected?: undefined } | { steps?: undefined; rejected: string };

/** Parses and validates a document given as YAML or JSON text. Throws InvalidArgumentError naming what is wrong. */
export function parseDocumentText(text: string): CommandDocument {
  if (typeof text !== "string" || text.trim() === "") throw new InvalidArgumentError("the document is empty");
  if (text.length > MAX_DOCUMENT_LENGTH) throw new InvalidArgumentError(`the document is longer than ${MAX_DOCUMENT_LENGTH} characters`);
  let data: unknown;
  try {
    data = parseYaml(text);
  } catch (err) {
    throw new InvalidArgumentError(`the document is not valid YAML or JSON: ${(err as Error).message}`, { cause: err });
  }
  return compileDocument(data);
}

/** Validates a decoded document: names, parameters, steps, `when` queries and every template. */
export function compileDocument(data: unknown): CommandDocument {
  const doc = object(data, "the document");
  for (const k of Object.keys(doc)) if (!DOC_KEYS.includes(k)) throw new InvalidArgumentError(`the document: unknown key ${JSON.stringify(k)} (known: ${DOC_KEYS.join(", ")})`);
  const name = doc.name;
  if (typeof name !== "string" || !NAME.test(name)) {
    throw new InvalidArgumentError('the document needs a name: letters, digits, ".", "_" or "-", starting with a letter or digit (at most 128)');
  }
  const description = doc.description ?? "";
  if (typeof description !== "string") throw new InvalidArgumentError("description must be text");
  const rawParams = doc.parameters ?? [];
  if (!Array.isArray(rawParams)) throw new InvalidArgumentError("parameters must be a list");
  rawParams.forEach((p, i) => {
    const o = object(p, `parameter #${i + 1}`);
    for (const k of Object.keys(o)) if (!PARAM_KEYS.includes(k)) throw new InvalidArgumentError(`parameter #${i + 1}: unknown key ${JSON.stringify(k)} (known: ${PARAM_KEYS.join(", ")})`);
  });
  const parameters = rawParams as unknown as ParamSpec[];
  validateParamSpecs(parameters);
  const rawSteps = doc.steps;
  if (!Array.isArray(rawSteps) || rawSteps.length === 0) throw new InvalidArgumentError("steps must be a non-empty list");
  if (rawSteps.length > MAX_DOCUMENT_STEPS) throw new InvalidArgumentError(`a document may have at most ${MAX_DOCUMENT_STEPS} steps`);
  const steps = rawSteps.map((raw, i) => compileStep(raw, i, parameters));
  return { name, description, parameters, steps, source: structuredClone(doc) as JsonObject };
}

function compileStep(raw: unknown, index: number, params: readonly ParamSpec[]): DocumentStep {
  const where = `step ${index + 1}`;
  const o = object(raw, where);
  if (!Object.hasOwn(o, "alternatives")) return { alternatives: [compileAlternative(o, where, params, false)], offered: false };
  const extra = Object.keys(o).filter((k) => k !== "alternatives");
  if (extra.length > 0) throw new InvalidArgumentError(`${where}: a step with alternatives has no other keys (found ${extra.join(", ")})`);
  const list = o.alternatives;
  if (!Array.isArray(list) || list.length === 0) throw new InvalidArgumentError(`${where}: alternatives must be a non-empty list`);
  if (list.length > MAX_ALTERNATIVES) throw new InvalidArgumentError(`${where}: at most ${MAX_ALTERNATIVES} alternatives`);
  return { alternatives: list.map((a, j) => compileAlternative(object(a, `${where} alternative ${j + 1}`), `${where} alternative ${j + 1}`, params, true)), offered: true };
}

function compileAlternative(o: Record<string, unknown>, where: string, params: readonly ParamSpec[], mayHaveWhen: boolean): Alternative {
  const { when, ...rest } = o;
  const step = rest as JsonObject;
  const alt: Alternative = { tool: "", step };
  if (when !== undefined) {
    if (!mayHaveWhen) throw new InvalidArgumentError(`${where}: "when" belongs to an alternative (write the step under alternatives:)`);
    if (typeof when !== "string") throw new InvalidArgumentError(`${where}: when must be a host query`);
    try {
      alt.query = parseQuery(when);
    } catch (err) {
      const detail = err instanceof QuerySyntaxError ? `${err.message}\n${err.pointer}` : (err as Error).message;
      throw new InvalidArgumentError(`${where}: when is not a valid query: ${detail}`, { cause: err });
    }
    alt.when = when;
  }
  let parsed: Step;
  try {
    parsed = fromJson(StepSchema, step);
  } catch (err) {
    throw new InvalidArgumentError(`${where}: not a valid step: ${(err as Error).message}`, { cause: err });
  }
  if (parsed.tool.case === undefined) throw new InvalidArgumentError(`${where}: names no tool (e.g. exec: {argv: [...]} or shell: {script: ...})`);
  alt.tool = toolName(parsed);
  const label = parsed.name ? `${where} (${parsed.name})` : where;
  forEachString(step, [], (value, path) => {
    if (isCode(path)) return;
    try {
      validateTemplate(value, modeOf(path), params);
      if (path[1] === "interpreter" && templateRefs(value).length > 0) {
        throw new InvalidArgumentError("an interpreter is not a template: no parameter may choose the program that runs a script");
      }
    } catch (err) {
      throw new InvalidArgumentError(`${label}: field ${showPath(path)}: ${(err as Error).message}`, { cause: err });
    }
  });
  checkShellContexts(parsed, label);
  return alt;
}

const POSIX_SHELLS = new Set(["sh", "bash", "dash"]);
const SHELLS = new Set([...POSIX_SHELLS, "ash", "ksh", "mksh", "zsh", "busybox"]);
const baseName = (path: string) => path.slice(path.lastIndexOf("/") + 1);

/**
 * Placeholders reach a shell only through a shell step, whose values are
 * quoted for POSIX shells: such a script must run in sh, bash or dash with
 * `-c`, and an exec step that calls a shell with `-c` may not put a
 * placeholder in the command string (it would be code, unquoted); the
 * arguments after it (`$0`, `$1`, …) are plain values and may.
 */
function checkShellContexts(step: Step, label: string): void {
  const tool = step.tool;
  if (tool.case === "shell" && templateRefs(tool.value.script).length > 0 && tool.value.interpreter.length > 0) {
    const [program = "", ...flags] = tool.value.interpreter;
    const last = flags[flags.length - 1] ?? "";
    if (!POSIX_SHELLS.has(baseName(program)) || !flags.every((f) => /^-[A-Za-z]+$/.test(f)) || !/^-[A-Za-z]*c$/.test(last)) {
      throw new InvalidArgumentError(
        `${label}: field shell.interpreter: a script with placeholders runs in sh, bash or dash with -c (its values are quoted for POSIX shells), not ${JSON.stringify(tool.value.interpreter)}`,
      );
    }
  }
  if (tool.case === "exec" && SHELLS.has(baseName(tool.value.argv[0] ?? ""))) {
    const argv = tool.value.argv;
    const c = argv.findIndex((a, i) => i > 0 && /^-[A-Za-z]*c[A-Za-z]*$/.test(a));
    if (c > 0 && c + 1 < argv.length && templateRefs(argv[c + 1]!).length > 0) {
      throw new InvalidArgumentError(
        `${label}: field exec.argv[${c + 1}]: a placeholder in the command string of ${baseName(argv[0]!)} ${argv[c]} would be shell code; use a shell step (its values are quoted) or pass the value as an argument after the command string ("$1")`,
      );
    }
  }
}

/** Shell words that parse their argument again as code: a quoted value after them is code once more. */
const REPARSES = /(?:^|[\s;&|(`])(eval|(?:ba|da|k|mk|z)?sh\s+(?:-[A-Za-z]+\s+)*-[A-Za-z]*c)(?=[\s"'])/;

/**
 * What a document does that is allowed but likely a mistake: a placeholder
 * in a shell script after `eval`, or in the command string of a nested
 * `sh -c`, is quoted once for the script's own shell and then parsed again
 * as code, so its value can run commands. Each warning names step, field
 * and line.
 */
export function documentWarnings(doc: CommandDocument): string[] {
  const warnings: string[] = [];
  doc.steps.forEach((s, i) =>
    s.alternatives.forEach((alt, j) => {
      const script = (alt.step.shell as JsonObject | undefined)?.script;
      if (typeof script !== "string") return;
      const where = s.offered ? `step ${i + 1} alternative ${j + 1}` : `step ${i + 1}`;
      script.split("\n").forEach((line, n) => {
        const at = line.indexOf("{{");
        if (at < 0) return;
        const m = REPARSES.exec(line.slice(0, at));
        if (!m) return;
        const word = m[1]!.split(/\s/)[0]!;
        const reparser = word === "eval" ? "eval" : `${word} -c`;
        warnings.push(`${where}: field shell.script line ${n + 1}: a placeholder after ${reparser} is quoted once and then parsed again as code: its value can run commands (pass it as a variable or an argument instead)`);
      });
    }),
  );
  return warnings;
}

/**
 * What a host runs: for each step, the first alternative that fits it,
 * rendered from `params` and the host's id, region, labels and facts. A host
 * that fits no alternative of some step is rejected with the reason. A
 * template that cannot be rendered for the host (a fact it lacks, without
 * `| default`) throws InvalidArgumentError naming host, step and field.
 */
export function planHost(doc: CommandDocument, params: Readonly<Record<string, ParamValue>>, host: HostRecord): HostPlan {
  const view = hostView(host);
  const ctx: RenderContext = { params: { ...params }, host: view };
  const steps: Step[] = [];
  for (const [i, s] of doc.steps.entries()) {
    const alt = choose(s, view);
    if (typeof alt === "string") return { rejected: `step ${i + 1}: ${alt}` };
    steps.push(renderStep(alt.step, ctx, `host ${JSON.stringify(host.id)}: step ${i + 1}`));
  }
  return { steps };
}

function choose(s: DocumentStep, view: HostView): Alternative | string {
  if (!s.offered) return s.alternatives[0]!;
  const tools = view.facts.tools;
  const supported = new Set(Array.isArray(tools) ? tools : typeof tools === "string" ? [tools] : []);
  const why: string[] = [];
  for (const [j, alt] of s.alternatives.entries()) {
    if (alt.query && !matchHost(alt.query, view)) why.push(`alternative ${j + 1} (${alt.tool}): the host does not match ${JSON.stringify(alt.when)}`);
    else if (!supported.has(alt.tool)) why.push(`alternative ${j + 1} (${alt.tool}): the host does not support ${alt.tool} (its tools: ${[...supported].join(", ") || "none reported"})`);
    else return alt;
  }
  return `no alternative fits host ${view.id}: ${why.join("; ")}`;
}

/** Renders one step's templates for one host and converts it to a Step. */
function renderStep(step: JsonObject, ctx: RenderContext, where: string): Step {
  const rendered = renderValue(step, [], ctx, where) as JsonObject;
  try {
    return fromJson(StepSchema, rendered);
  } catch (err) {
    throw new InvalidArgumentError(`${where}: the rendered step is not valid: ${(err as Error).message}`, { cause: err });
  }
}

function renderValue(v: JsonValue, path: (string | number)[], ctx: RenderContext, where: string): JsonValue {
  const attempt = <T>(fn: () => T): T => {
    try {
      return fn();
    } catch (err) {
      throw new InvalidArgumentError(`${where}: field ${showPath(path)}: ${(err as Error).message}`, { cause: err });
    }
  };
  if (typeof v === "string") return isCode(path) ? v : attempt(() => (modeOf(path) === "shell" ? renderShell(v, ctx) : renderText(v, ctx)));
  if (Array.isArray(v)) {
    if (isArgv(path) && v.every((x): x is string => typeof x === "string")) return attempt(() => renderArgv(v, ctx));
    return v.map((x, i) => renderValue(x, [...path, i], ctx, where));
  }
  if (v !== null && typeof v === "object") {
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, renderValue(x, [...path, k], ctx, where)]));
  }
  return v;
}

function isArgv(path: readonly (string | number)[]): boolean {
  return path.length === 2 && ((path[0] === "exec" && path[1] === "argv") || (path[0] === "python" && path[1] === "args"));
}

/**
 * A python script and a playbook are code in their own language (a playbook
 * is full of Jinja `{{ }}`): passed exactly as written, never templates.
 * Values reach them as data, through `python.args` and `ansible.vars`.
 */
function isCode(path: readonly (string | number)[]): boolean {
  return path.length === 2 && ((path[0] === "python" && path[1] === "script") || (path[0] === "ansible" && path[1] === "playbook"));
}

function modeOf(path: readonly (string | number)[]): "text" | "shell" {
  return path.length === 2 && path[0] === "shell" && path[1] === "script" ? "shell" : "text";
}

function forEachString(v: unknown, path: (string | number)[], fn: (s: string, path: (string | number)[]) => void): void {
  if (typeof v === "string") fn(v, path);
  else if (Array.isArray(v)) v.forEach((x, i) => forEachString(x, [...path, i], fn));
  else if (v !== null && typeof v === "object") for (const [k, x] of Object.entries(v)) forEachString(x, [...path, k], fn);
}

function showPath(path: readonly (string | number)[]): string {
  return path.map((p, i) => (typeof p === "number" ? `[${p}]` : i === 0 ? p : `.${p}`)).join("") || "(step)";
}

function object(v: unknown, where: string): Record<string, unknown> {
  if (v === null || typeof v !== "object" || Array.isArray(v)) throw new InvalidArgumentError(`${where} must be a mapping`);
  return v as Record<string, unknown>;
}

/** Splits "NAME" or "NAME@VERSION"; version 0 means the newest. */
export function parseDocumentRef(ref: string): { name: string; version: number } {
  const at = ref.lastIndexOf("@");
  const name = at < 0 ? ref : ref.slice(0, at);
  const v = at < 0 ? "" : ref.slice(at + 1);
  if (!NAME.test(name)) throw new InvalidArgumentError(`document ${JSON.stringify(ref)}: write NAME or NAME@VERSION`);
  if (at >= 0 && !/^[1-9][0-9]{0,8}$/.test(v)) throw new InvalidArgumentError(`document ${JSON.stringify(ref)}: the version after "@" is a whole number from 1`);
  return { name, version: at < 0 ? 0 : Number(v) };
}
