import { parseArgs } from "node:util";
import { flagName, type Schema } from "../common/config.js";
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
    throw new InvalidArgumentError((err as Error).message.replace(/^.*?: /, ""));
  }
}

/** Command-line options for every key of a config schema. */
export function schemaOptions(schema: Schema): Record<string, OptionSpec> {
  const out: Record<string, OptionSpec> = {};
  for (const [key, field] of Object.entries(schema)) {
    out[flagName(key)] = { type: field.type === "bool" ? "boolean" : "string", doc: field.doc, value: field.type === "bool" ? undefined : field.type.toUpperCase() };
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
