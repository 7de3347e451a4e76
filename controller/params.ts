/**
 * Typed document parameters. A document declares its parameters once
 * ({@link ParamSpec}); at submit time the values an operator gave on the CLI
 * or through the API (always strings) are converted and checked against those
 * declarations before anything is rendered or sent, so a bad value is refused
 * with INVALID_ARGUMENT naming the parameter instead of reaching a host.
 */
import { InvalidArgumentError } from "../common/errors.js";
import { LIMITS } from "../common/limits.js";
import { compileWholeMatch, type WholeMatch } from "./linear-pattern.js";

export type ParamType = "string" | "int" | "bool" | "enum" | "list";

/**
 * One declared parameter, as written in a document (YAML or JSON).
 *
 * - `pattern` is a regular expression (JavaScript syntax, Unicode mode) that
 *   must match the WHOLE value — it is anchored for you — and is applied to a
 *   string value or to each element of a list. Allowed on `string` and `list`.
 *   It runs in RE2 (linear time): backreferences and lookaround are refused.
 * - `values` lists the accepted values of an `enum` (and only of an enum).
 * - `maxLength` caps a string value or each list element, in characters;
 *   defaults to {@link DEFAULT_MAX_LENGTH}, at most {@link MAX_LENGTH_LIMIT}.
 * - `default` is a typed value (number for `int`, boolean for `bool`, array of
 *   strings for `list`) and must pass the parameter's own checks. A parameter
 *   is either `required` or has a `default`, or neither (then it is simply
 *   absent when not given); declaring both is refused as a likely mistake.
 * - `sensitive` values are replaced by `[sensitive]` wherever parameters are
 *   logged, audited or listed ({@link redactParams}), and are never echoed in
 *   error messages.
 */
export interface ParamSpec {
  name: string;
  type: ParamType;
  description?: string;
  default?: unknown;
  required?: boolean;
  pattern?: string;
  values?: string[];
  sensitive?: boolean;
  maxLength?: number;
}

export type ParamValue = string | number | boolean | string[];

/** What {@link redactParams} puts in place of a sensitive value. */
export const SENSITIVE = "[sensitive]" as const;
/** Default cap on a string value or list element, in characters. */
export const DEFAULT_MAX_LENGTH = LIMITS.paramValueChars;
/** Largest `maxLength` a document may declare: the size of one argv element a job may carry. */
const MAX_LENGTH_LIMIT = LIMITS.paramMaxLengthLimit;
/** Most elements a list parameter may hold. */
export const MAX_LIST_ITEMS = LIMITS.paramListItems;
/** Most parameters a document may declare. */
const MAX_PARAMS = LIMITS.paramsPerDocument;

const TYPES: ReadonlySet<string> = new Set<ParamType>(["string", "int", "bool", "enum", "list"]);
/**
 * Parameter names are identifiers that start with a letter: they appear in
 * templates as `param.<name>` and on the CLI as `-p name=value`, and a leading
 * letter rules out `__proto__` and friends.
 */
const NAME = /^[A-Za-z][A-Za-z0-9_]{0,63}$/;
const INT = /^-?[0-9]{1,20}$/;
const PREVIEW = 64;

/**
 * Checks a document's parameter declarations when the document is stored, so
 * that mistakes surface at `docs put` rather than on the first run. Throws
 * InvalidArgumentError whose message starts with `parameter "<name>"`.
 */
export function validateParamSpecs(specs: readonly ParamSpec[]): void {
  if (!Array.isArray(specs)) throw new InvalidArgumentError("parameters must be a list");
  if (specs.length > MAX_PARAMS) throw new InvalidArgumentError(`a document may declare at most ${MAX_PARAMS} parameters`);
  const seen = new Set<string>();
  specs.forEach((spec, i) => {
    const name = typeof spec?.name === "string" ? spec.name : undefined;
    if (name === undefined) throw new InvalidArgumentError(`parameter #${i + 1}: has no name`);
    const fail = (why: string): never => {
      throw new InvalidArgumentError(`${label(name)}: ${why}`);
    };
    if (!NAME.test(name)) fail('a name starts with a letter and holds only letters, digits and "_" (at most 64)');
    if (seen.has(name)) fail("is declared twice");
    seen.add(name);
    if (typeof spec.type !== "string" || !TYPES.has(spec.type)) fail(`type must be one of ${[...TYPES].join(", ")}`);
    if (spec.description !== undefined && typeof spec.description !== "string") fail("description must be text");
    if (spec.required !== undefined && typeof spec.required !== "boolean") fail("required must be true or false");
    if (spec.sensitive !== undefined && typeof spec.sensitive !== "boolean") fail("sensitive must be true or false");
    const textual = spec.type === "string" || spec.type === "list";
    if (spec.pattern !== undefined) {
      if (!textual) fail("pattern applies only to string and list parameters");
      compilePattern(spec);
    }
    if (spec.maxLength !== undefined) {
      if (!textual) fail("maxLength applies only to string and list parameters");
      if (!Number.isSafeInteger(spec.maxLength) || spec.maxLength < 1 || spec.maxLength > MAX_LENGTH_LIMIT) {
        fail(`maxLength must be an integer from 1 to ${MAX_LENGTH_LIMIT}`);
      }
    }
    if (spec.type === "enum") {
      const values = spec.values;
      if (!Array.isArray(values) || values.length === 0) fail("an enum needs a non-empty list of values");
      for (const v of values as unknown[]) {
        if (typeof v !== "string") fail("enum values must be text");
        if ((v as string).includes("\0")) fail("enum values must not contain NUL bytes");
      }
      if (new Set(values).size !== values!.length) fail("enum values must be distinct");
    } else if (spec.values !== undefined) {
      fail("values applies only to enum parameters");
    }
    if (spec.default !== undefined) {
      if (spec.required) fail("a required parameter cannot have a default (drop one of them)");
      typedValue(spec, spec.default, `${label(name)}: default`);
    }
  });
}

/**
 * Turns the values given at submit time into typed values, applying defaults.
 * `given` holds strings as they come from `-p name=value` or the API; a list
 * parameter takes repeated values (an array) or one string holding a JSON
 * array (`["a","b"]`); any other single string is a one-element list. Refuses
 * unknown parameters, missing required ones, values that fail their type,
 * enum, pattern or length, and NUL bytes anywhere. Every error is an
 * InvalidArgumentError whose message starts with `parameter "<name>"`.
 * The result holds the given and defaulted parameters, in declaration order;
 * an optional parameter without default that was not given is absent.
 */
export function resolveParams(specs: readonly ParamSpec[], given: Readonly<Record<string, string | string[]>>): Record<string, ParamValue> {
  validateParamSpecs(specs);
  const byName = new Map(specs.map((s) => [s.name, s]));
  for (const name of Object.keys(given)) {
    if (!byName.has(name)) {
      const declared = specs.length === 0 ? "it declares none" : `it declares ${specs.map((s) => s.name).join(", ")}`;
      throw new InvalidArgumentError(`${label(name)} is not declared by the document (${declared})`);
    }
  }
  const out: [string, ParamValue][] = [];
  for (const spec of specs) {
    if (Object.hasOwn(given, spec.name)) {
      out.push([spec.name, fromGiven(spec, given[spec.name])]);
    } else if (spec.default !== undefined) {
      out.push([spec.name, typedValue(spec, spec.default)]);
    } else if (spec.required) {
      throw new InvalidArgumentError(`${label(spec.name)} is required`);
    }
  }
  return Object.fromEntries(out);
}

/**
 * A copy of `values` fit for logs, audit records and job listings: every
 * sensitive value becomes `[sensitive]`. A value with no declaration is
 * treated as sensitive too, so a mismatch between specs and values fails
 * closed rather than leaking.
 */
export function redactParams(
  specs: readonly ParamSpec[],
  values: Readonly<Record<string, ParamValue>>,
): Record<string, ParamValue | typeof SENSITIVE> {
  const byName = new Map(specs.map((s) => [s.name, s]));
  return Object.fromEntries(
    Object.entries(values).map(([name, value]): [string, ParamValue | typeof SENSITIVE] => {
      const spec = byName.get(name);
      if (!spec || spec.sensitive) return [name, SENSITIVE];
      return [name, Array.isArray(value) ? [...value] : value];
    }),
  );
}

function fromGiven(spec: ParamSpec, raw: unknown): ParamValue {
  const fail = (why: string): never => {
    throw new InvalidArgumentError(`${label(spec.name)} ${why}`);
  };
  const texts = typeof raw === "string" ? [raw] : Array.isArray(raw) ? (raw as unknown[]) : undefined;
  if (texts === undefined || !texts.every((t): t is string => typeof t === "string")) return fail("must be given as text");
  if (texts.some((t) => t.includes("\0"))) fail("must not contain NUL bytes");
  if (spec.type === "list") {
    if (typeof raw === "string" && raw.trimStart().startsWith("[")) {
      let parsed: unknown;
      try {
        parsed = JSON.parse(raw);
      } catch {
        fail("looks like a JSON array but is not valid JSON");
      }
      return typedValue(spec, parsed);
    }
    return typedValue(spec, texts);
  }
  if (texts.length !== 1) fail(`takes one value, got ${texts.length}`);
  const text = texts[0]!;
  switch (spec.type) {
    case "int": {
      const n = INT.test(text) ? Number(text) : NaN;
      if (!Number.isSafeInteger(n)) fail(`must be an integer from ${Number.MIN_SAFE_INTEGER} to ${Number.MAX_SAFE_INTEGER}${got(spec, text)}`);
      return typedValue(spec, n === 0 ? 0 : n);
    }
    case "bool":
      if (text !== "true" && text !== "false") fail(`must be true or false${got(spec, text)}`);
      return text === "true";
    default:
      return typedValue(spec, text);
  }
}

/** Checks a typed value (a default, or a converted given value) against its spec. */
function typedValue(spec: ParamSpec, value: unknown, subject = label(spec.name)): ParamValue {
  const fail = (why: string): never => {
    throw new InvalidArgumentError(`${subject} ${why}`);
  };
  switch (spec.type) {
    case "string":
      if (typeof value !== "string") return fail("must be a string");
      checkText(spec, value, subject);
      return value;
    case "int":
      if (typeof value !== "number" || !Number.isSafeInteger(value)) return fail("must be a safe integer");
      return value;
    case "bool":
      if (typeof value !== "boolean") return fail("must be true or false");
      return value;
    case "enum":
      if (typeof value !== "string" || !spec.values?.includes(value)) {
        return fail(`must be one of ${(spec.values ?? []).join(", ")}${typeof value === "string" ? got(spec, value) : ""}`);
      }
      return value;
    case "list": {
      if (!Array.isArray(value) || !value.every((v): v is string => typeof v === "string")) return fail("must be a list of strings");
      if (value.length > MAX_LIST_ITEMS) fail(`may hold at most ${MAX_LIST_ITEMS} elements, got ${value.length}`);
      value.forEach((v, i) => checkText(spec, v, `${subject} element ${i + 1}`));
      return [...value];
    }
  }
}

function checkText(spec: ParamSpec, value: string, subject: string): void {
  const fail = (why: string): never => {
    throw new InvalidArgumentError(`${subject} ${why}`);
  };
  if (value.includes("\0")) fail("must not contain NUL bytes");
  const max = spec.maxLength ?? DEFAULT_MAX_LENGTH;
  if (value.length > max) fail(`is longer than ${max} characters`);
  if (spec.pattern !== undefined && !compilePattern(spec).test(value)) fail(`does not match the pattern ${spec.pattern}${got(spec, value)}`);
}

const compiled = new WeakMap<ParamSpec, WholeMatch>();

/**
 * Compiles a spec's pattern, anchored to the whole value, for RE2 (linear
 * time in the value, whatever the pattern: controller/linear-pattern.ts).
 * Patterns run at `docs put` (defaults) and at submit, before authorization,
 * so a backtracking engine would let any reader stall the controller.
 */
function compilePattern(spec: ParamSpec): WholeMatch {
  const hit = compiled.get(spec);
  if (hit && hit.source === spec.pattern) return hit;
  const re = compileWholeMatch(spec.pattern as string, label(spec.name));
  compiled.set(spec, re);
  return re;
}

function label(name: string): string {
  const shown = name.length > PREVIEW ? `${name.slice(0, PREVIEW)}…` : name;
  return `parameter ${JSON.stringify(shown)}`;
}

/** `, got "…"` for error messages — but never for a sensitive parameter. */
function got(spec: ParamSpec, value: string): string {
  if (spec.sensitive) return "";
  const shown = value.length > PREVIEW ? `${value.slice(0, PREVIEW)}…` : value;
  return `, got ${JSON.stringify(shown)}`;
}
