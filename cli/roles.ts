import { describeConfig, flagName, readConfigFile, resolveConfig, type Schema } from "../common/config.js";
import { ConfigError, InvalidArgumentError } from "../common/errors.js";
import { MANAGED_BY_ENV, parseHostPort, runService, type Service, type ServiceControl } from "../common/lifecycle.js";
import { createLogger, parseLevel, type Logger } from "../common/logger.js";
import { helpText, parse, schemaOptions, type OptionSpec } from "./args.js";

interface RoleDef {
  schema: Schema;
  start: (config: never, log: Logger, clock: undefined, control: ServiceControl) => Promise<Service>;
}

/**
 * Each role's code is loaded only when that role runs: a daemon never loads
 * the controller's or the proxy's modules (and their libraries), which keeps
 * its memory and start-up small.
 */
const ROLES: Record<string, { load: () => Promise<RoleDef>; examples: string[] }> = {
  controller: {
    load: async () => {
      const m = await import("../controller/main.js");
      return { schema: m.controllerSchema, start: m.startController as RoleDef["start"] };
    },
    examples: ["rexmesh controller --listen 0.0.0.0:7443 --cert controller.crt --key controller.key --ca ca.crt"],
  },
  proxy: {
    load: async () => {
      const m = await import("../proxy/main.js");
      return { schema: m.proxySchema, start: m.startProxy as RoleDef["start"] };
    },
    examples: ["rexmesh proxy --listen 0.0.0.0:7444 --controller ctl.example.net:7443 --cert proxy.crt --key proxy.key --ca ca.crt"],
  },
  daemon: {
    load: async () => {
      const m = await import("../daemon/main.js");
      return { schema: m.daemonSchema, start: m.startDaemon as RoleDef["start"] };
    },
    examples: ["rexmesh daemon --proxies px1.dc1:7444,px2.dc1:7444 --cert host.crt --key host.key --ca ca.crt"],
  },
};

/**
 * `rexmesh controller|proxy|daemon`: the long-running roles. Options come
 * from the role's config schema; precedence is defaults < --config file <
 * REXMESH_* environment < flags.
 */
export async function runRole(role: string, argv: string[], out: (s: string) => void): Promise<number> {
  const role_ = ROLES[role]!;
  const def = { ...(await role_.load()), examples: role_.examples };
  const options: Record<string, OptionSpec> = {
    ...schemaOptions(def.schema),
    config: { type: "string", doc: "YAML or JSON file with any of these options (camelCase keys)", value: "FILE" },
    "print-config": { type: "boolean", doc: "print the effective configuration and exit" },
    help: { type: "boolean", short: "h", doc: "show this help" },
  };
  const parsed = parse(argv, options);
  if (parsed.values.help) {
    out(helpText(`rexmesh ${role} [options]`, options, def.examples));
    return 0;
  }
  if (parsed.positionals.length > 0 || parsed.rest.length > 0) {
    const stray = parsed.positionals[0] ?? parsed.rest[0]!;
    const hint = /^(true|false|yes|no|0|1)$/.test(stray) ? " (a true/false option takes no value: --X turns it on, --no-X off)" : "";
    throw new InvalidArgumentError(`rexmesh ${role} takes options only, not ${JSON.stringify(stray)}${hint}`);
  }
  const { config: configPath, printConfig, help: _help, ...flags } = parsed.values;
  // --no-X: X false. Both given: an error rather than a guess.
  for (const [key, field] of Object.entries(def.schema)) {
    if (field.type !== "bool") continue;
    const no = `no${key[0]!.toUpperCase()}${key.slice(1)}`;
    if (!(no in flags)) continue;
    if (key in flags) throw new InvalidArgumentError(`--${flagName(key)} and --no-${flagName(key)} together`);
    if (flags[no] === true) flags[key] = false;
    delete flags[no];
  }
  const file = typeof configPath === "string" ? readConfigFile(configPath) : undefined;
  const config = resolveConfig(def.schema, { file, filePath: configPath as string | undefined, env: process.env, flags });
  if (printConfig) {
    out(JSON.stringify(describeConfig(def.schema, config), null, 2) + "\n");
    return 0;
  }
  const c = config as Record<string, unknown>;
  checkBeforeStart(def.schema, c);
  const log = createLogger({ level: parseLevel(c.logLevel as string) }, { role });
  // Set by a local mesh (cli/launcher.ts) for the roles it starts; not passed on to what they start (a daemon's tasks).
  const parentPid = Number(process.env[MANAGED_BY_ENV]) || undefined;
  delete process.env[MANAGED_BY_ENV];
  await runService((control) => def.start(config as never, log, undefined, control), { log, graceMs: c.grace as number, readyFile: c.readyFile as string | undefined, parentPid });
  return -1; // keeps running until a signal
}

/**
 * Values the schema only knows as strings, checked before the role starts so
 * that a typo is a one-line usage error (exit 2) naming the option rather
 * than a failed start: the log level, and every listen address (host:port).
 */
function checkBeforeStart(schema: Schema, config: Record<string, unknown>): void {
  try {
    parseLevel(config.logLevel as string | undefined);
  } catch (err) {
    throw new ConfigError((err as Error).message, { cause: err });
  }
  for (const key of Object.keys(schema)) {
    const value = config[key];
    if (!/^(listen|.+Listen)$/.test(key) || typeof value !== "string" || value === "") continue;
    try {
      parseHostPort(value, `--${flagName(key)}`);
    } catch (err) {
      throw new ConfigError((err as Error).message, { cause: err });
    }
  }
}
