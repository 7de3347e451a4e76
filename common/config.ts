import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

/** The YAML parser, loaded when a file is read: a role started with flags alone never loads it. */
export const parseYaml = (text: string): unknown => (createRequire(import.meta.url)("yaml") as typeof import("yaml")).parse(text);
import { parseDuration } from "./duration.js";
import { ConfigError } from "./errors.js";

type FieldType = "string" | "int" | "bool" | "duration" | "list";

interface FieldBase<T extends FieldType> {
  type: T;
  doc: string;
}
export type Field =
  | (FieldBase<"string"> & { default?: string })
  | (FieldBase<"int"> & { default?: number; min?: number })
  | (FieldBase<"bool"> & { default?: boolean })
  | (FieldBase<"duration"> & { default?: string })
  | (FieldBase<"list"> & { default?: string[] });

export type Schema = Record<string, Field>;

type ValueOf<F extends Field> = F["type"] extends "string"
  ? string
  : F["type"] extends "int"
    ? number
    : F["type"] extends "bool"
      ? boolean
      : F["type"] extends "duration"
        ? number
        : string[];

/** A resolved config: durations in ms; fields without a default may be undefined. */
export type Resolved<S extends Schema> = { [K in keyof S]: S[K] extends { default: unknown } ? ValueOf<S[K]> : ValueOf<S[K]> | undefined };

function envName(key: string): string {
  return "REXMESH_" + key.replace(/([a-z0-9])([A-Z])/g, "$1_$2").toUpperCase();
}

export function flagName(key: string): string {
  return key.replace(/([a-z0-9])([A-Z])/g, "$1-$2").toLowerCase();
}

function convert(key: string, field: Field, raw: unknown, source: string): unknown {
  const where = `${source}: ${key}`;
  switch (field.type) {
    case "string":
      if (typeof raw !== "string") throw new ConfigError(`${where} must be a string`);
      return raw;
    case "int": {
      const n = typeof raw === "string" && raw.trim() !== "" ? Number(raw) : raw;
      if (typeof n !== "number" || !Number.isInteger(n)) throw new ConfigError(`${where} must be an integer, got ${JSON.stringify(raw)}`);
      if (field.min !== undefined && n < field.min) throw new ConfigError(`${where} must be at least ${field.min}, got ${n}`);
      return n;
    }
    case "bool":
      if (typeof raw === "boolean") return raw;
      if (raw === "true" || raw === "1" || raw === "yes") return true;
      if (raw === "false" || raw === "0" || raw === "no") return false;
      throw new ConfigError(`${where} must be true or false, got ${JSON.stringify(raw)}`);
    case "duration":
      if (typeof raw === "number") return raw * 1000;
      if (typeof raw !== "string") throw new ConfigError(`${where} must be a duration like "30s"`);
      try {
        return parseDuration(raw);
      } catch {
        throw new ConfigError(`${where} must be a duration like "30s", got ${JSON.stringify(raw)}`);
      }
    case "list":
      if (Array.isArray(raw) && raw.every((x) => typeof x === "string")) return raw;
      if (typeof raw === "string") return raw.split(",").map((s) => s.trim()).filter(Boolean);
      throw new ConfigError(`${where} must be a list of strings`);
  }
}

/** Reads a YAML or JSON config file (JSON is YAML). */
export function readConfigFile(path: string): Record<string, unknown> {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (cause) {
    throw new ConfigError(`cannot read config file ${path}`, { cause });
  }
  let data: unknown;
  try {
    data = parseYaml(text);
  } catch (cause) {
    throw new ConfigError(`config file ${path} is not valid YAML or JSON: ${(cause as Error).message}`, { cause });
  }
  if (data === null || data === undefined) return {};
  if (typeof data !== "object" || Array.isArray(data)) throw new ConfigError(`config file ${path} must hold a mapping of keys to values`);
  return data as Record<string, unknown>;
}

/**
 * Resolves a role's configuration: defaults, then the config file, then
 * REXMESH_* environment variables, then flags. Unknown keys in the file and
 * values of the wrong type fail with a message naming the key.
 */
export function resolveConfig<S extends Schema>(
  schema: S,
  sources: { file?: Record<string, unknown>; filePath?: string; env?: Record<string, string | undefined>; flags?: Record<string, unknown> },
): Resolved<S> {
  const out: Record<string, unknown> = {};
  for (const [key, field] of Object.entries(schema)) {
    if (field.default !== undefined) out[key] = field.type === "duration" ? parseDuration(field.default as string) : field.default;
  }
  const filePath = sources.filePath ?? "config file";
  for (const [key, raw] of Object.entries(sources.file ?? {})) {
    const field = Object.hasOwn(schema, key) ? schema[key] : undefined;
    if (!field) {
      const known = Object.keys(schema).join(", ");
      throw new ConfigError(`${filePath}: unknown key ${JSON.stringify(key)} (known keys: ${known})`);
    }
    out[key] = convert(key, field, raw, filePath);
  }
  for (const [key, field] of Object.entries(schema)) {
    const name = envName(key);
    const raw = sources.env?.[name];
    if (raw !== undefined && raw !== "") out[key] = convert(key, field, raw, `environment ${name}`);
  }
  for (const [key, raw] of Object.entries(sources.flags ?? {})) {
    const field = Object.hasOwn(schema, key) ? schema[key] : undefined;
    if (!field) throw new ConfigError(`unknown option --${flagName(key)}`);
    out[key] = convert(key, field, raw, `option --${flagName(key)}`);
  }
  return out as Resolved<S>;
}

/** The effective configuration as a user would write it. */
export function describeConfig(schema: Schema, config: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const key of Object.keys(schema)) if (config[key] !== undefined) out[key] = config[key];
  return out;
}

/** The certificate, key and CA files a role serves with; each is required. */
export function requireFiles(config: { cert?: string; key?: string; ca?: string }): { cert: string; key: string; ca: string } {
  for (const k of ["cert", "key", "ca"] as const) {
    if (!config[k]) throw new ConfigError(`${k} is required (--${k} FILE or REXMESH_${k.toUpperCase()})`);
  }
  return config as { cert: string; key: string; ca: string };
}
