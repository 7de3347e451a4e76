import { parseArgs } from "node:util";
import { flagName, type Schema } from "../common/config.js";
import { parseDuration } from "../common/duration.js";
import { InvalidArgumentError } from "../common/errors.js";

export interface OptionSpec {
  type: "string" | "boolean";
  short?: string;
  multiple?: boolean;
  doc: string;
  /** Shown in help as the value's name. */
  value?: string;
}

export interface Parsed {
  values: Record<string, string | boolean | string[] | undefined>;
  positionals: string[];
  /** Everything after a bare `--`. */
  rest: string[];
}

function camel(flag: string): string {
  return flag.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());
}

/** Parses argv strictly against the options given; unknown options are errors. */
export function parse(argv: readonly string[], options: Record<string, OptionSpec>): Parsed {
  const dash = argv.indexOf("--");
  const head = dash >= 0 ? argv.slice(0, dash) : [...argv];
  const rest = dash >= 0 ? argv.slice(dash + 1) : [];
  const config: Record<string, { type: "string" | "boolean"; short?: string; multiple?: boolean }> = {};
  for (const [name, o] of Object.entries(options)) {
    config[name] = { type: o.type };
    if (o.short) config[name].short = o.short;
    if (o.multiple) config[name].multiple = true;
  }
  try {
    const { values, positionals } = parseArgs({ args: head, options: config, allowPositionals: true, strict: true });
    const out: Parsed["values"] = {};
    for (const [k, v] of Object.entries(values)) out[camel(k)] = v as string | boolean | string[];
    return { values: out, positionals, rest };
  } catch (err) {
    throw new InvalidArgumentError(parseArgsMessage(err as Error & { code?: string }, head, options), { cause: err });
  }
}

/** The long name of an option as node's parseArgs names it (`-p` or `--param`). */
function longName(named: string, options: Record<string, OptionSpec>): string {
  if (named.startsWith("--")) return named;
  const found = Object.entries(options).find(([, o]) => o.short === named.slice(1));
  return found ? `--${found[0]}` : named;
}

/**
 * One line saying what is wrong, in place of node's parseArgs text (several
 * lines about "ambiguous" arguments and positionals after '--').
 */
function parseArgsMessage(err: Error & { code?: string }, argv: readonly string[], options: Record<string, OptionSpec>): string {
  const m = err.message;
  let hit: RegExpExecArray | null;
  if ((hit = /^Option '(-[^' ]+)' argument is ambiguous/.exec(m))) {
    const i = argv.findIndex((a) => a === hit![1]);
    const value = i >= 0 ? argv[i + 1] : undefined;
    const name = longName(hit[1]!, options);
    if (value === undefined) return `${name} needs a value`;
    if (value.startsWith("--") || (value.length === 2 && /^-[A-Za-z]$/.test(value))) return `${name} needs a value (${value} is an option)`;
    return `${name} needs a value, and ${JSON.stringify(value)} starts with "-": write ${name}=${value} if that is the value`;
  }
  if ((hit = /^Option '(?:-\S, )?(--?[^' ]+) <value>' argument missing/.exec(m))) return `${longName(hit[1]!, options)} needs a value`;
  if ((hit = /^Unknown option '([^']+)'/.exec(m))) return `unknown option ${hit[1]} (--help lists the options)`;
  if ((hit = /^Option '([^']+)' does not take an argument/.exec(m))) return `${longName(hit[1]!, options)} takes no value`;
  // Anything else: node's first line without its "Option ...: " lead-in.
  return m.split("\n")[0]!.replace(/^.*?: /, "");
}

/** Command-line options for every key of a config schema. */
export function schemaOptions(schema: Schema): Record<string, OptionSpec> {
  const out: Record<string, OptionSpec> = {};
  for (const [key, field] of Object.entries(schema)) {
    out[flagName(key)] = { type: field.type === "bool" ? "boolean" : "string", doc: field.doc, value: field.type === "bool" ? undefined : field.type.toUpperCase() };
    // A boolean flag takes no value (`--spawner false` would leave it on): its negation is a flag of its own.
    if (field.type === "bool") out[`no-${flagName(key)}`] = { type: "boolean", doc: `the opposite of --${flagName(key)}` };
  }
  return out;
}

export function helpText(usage: string, options: Record<string, OptionSpec>, examples: string[] = []): string {
  const lines = [`usage: ${usage}`, "", "options:"];
  for (const [name, o] of Object.entries(options)) {
    const flag = `${o.short ? `-${o.short}, ` : "    "}--${name}${o.value ? ` ${o.value}` : ""}`;
    lines.push(`  ${flag.padEnd(34)} ${o.doc}`);
  }
  if (examples.length) lines.push("", "examples:", ...examples.map((e) => `  ${e}`));
  return lines.join("\n") + "\n";
}

/**
 * The value of a host query option (`-t QUERY`), or undefined when it is not
 * given. An empty query is refused: `--all` says "every host" on purpose.
 */
export function targetQuery(value: unknown): string | undefined {
  if (typeof value !== "string") return undefined;
  if (value.trim() === "") throw new InvalidArgumentError("-t/--target needs a query, e.g. 'role=web'; an empty one is refused (use --all for every host)");
  return value;
}

/**
 * A duration option that must be more than zero: zero would quietly mean the
 * default (or no limit) on the controller, which is not what anyone typing 0s meant.
 */
export function positiveDuration(value: unknown, flag: string, unset: string): number | undefined {
  if (typeof value !== "string") return undefined;
  const ms = parseDuration(value, flag);
  if (ms <= 0) throw new InvalidArgumentError(`${flag} must be more than 0, not ${JSON.stringify(value)} (leave it out for ${unset})`);
  return ms;
}

/**
 * Refuses, for a subcommand other than `add`, the options (all but `keep`)
 * and the command after -- that only `add` takes: refused, not silently
 * ignored (`rexmesh schedules`, `rexmesh triggers`).
 */
export function refuseAddOnly(command: string, options: Record<string, OptionSpec>, values: Record<string, unknown>, rest: readonly string[], keep: readonly string[]): void {
  const addOnly = Object.keys(options).filter((k) => !keep.includes(k));
  const given = addOnly.filter((k) => values[k.replace(/-([a-z])/g, (_m, c: string) => c.toUpperCase())] !== undefined);
  if (given.length > 0 || rest.length > 0) throw new InvalidArgumentError(`${given.length > 0 ? given.map((k) => `--${k}`).join(", ") : "a command after --"}: only for rexmesh ${command} add`);
}
