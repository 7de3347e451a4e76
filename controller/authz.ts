/**
 * Authorization at the controller: who may do what, on which hosts, with
 * which commands. Pure logic over a compiled policy (see
 * docs/authorization.md for the file format); the {@link Authorizer} holds
 * the current policy and swaps it on reload.
 *
 * Decisions fail closed: an operator with no binding, an action the policy
 * does not grant or does not know, a step whose tool or program no role
 * allows, a host outside the role's selector, or any error while evaluating
 * all refuse. Host decisions are taken on the hosts a request RESOLVED to,
 * so a wildcard target is judged by what it really reaches and is refused,
 * never silently narrowed.
 */
import { readFileSync } from "node:fs";
import { parse as parseYaml } from "yaml";
import type { PeerIdentity } from "../certs/identity.js";
import { ConfigError, PermissionDeniedError } from "../common/errors.js";
import type { Logger } from "../common/logger.js";
import type { Step } from "../gen/rexmesh/v1/task_pb.js";
import type { HostRecord } from "./model.js";
import { formatQuery, globMatch, hostView, matchHost, parseQuery, QuerySyntaxError, type Query } from "./query.js";

/** Everything an operator can be allowed to do. */
export const ACTIONS = ["read", "submit", "cancel", "label", "audit", "bundle", "rekey"] as const;
export type Action = (typeof ACTIONS)[number];

export function isAction(value: string): value is Action {
  return (ACTIONS as readonly string[]).includes(value);
}

/** One allowed program for the `exec` tool. */
export interface CommandRule {
  /** Glob (`*`, `?`) matched against argv[0] exactly as sent. */
  program: string;
  /** When present, every argument must fully match one of these. */
  args?: RegExp[];
  /** As written in the policy, for messages. */
  source: string;
}

export interface RoleDef {
  name: string;
  hosts: Query;
  hostsText: string;
  actions: ReadonlySet<Action>;
  commands: CommandRule[];
  shell: boolean;
}

/** A validated policy, ready for decisions. */
export interface Policy {
  roles: ReadonlyMap<string, RoleDef>;
  /** "<tenant>/<operator>" or "<tenant>/*" → role names. */
  bindings: ReadonlyMap<string, readonly string[]>;
}

/** What is asked. Hosts are always the resolved set, inside the caller's tenant. */
export type AccessRequest =
  | { action: "submit"; hosts: readonly HostRecord[]; steps: readonly Step[] }
  | { action: "label"; before: HostRecord; after: HostRecord }
  | { action: "read" | "cancel" | "audit" | "bundle" | "rekey" };

export type Decision = { allowed: true; role: string } | { allowed: false; reason: string };

/** How many refused hosts a message names before "and N more". */
const NAMED_HOSTS = 5;

// ---- compiling a policy file ---------------------------------------------

/** Parses a policy document (YAML or JSON text). Throws ConfigError naming the problem. */
export function parsePolicy(text: string, source = "policy"): Policy {
  let data: unknown;
  try {
    data = parseYaml(text);
  } catch (cause) {
    throw new ConfigError(`${source} is not valid YAML or JSON: ${(cause as Error).message}`, { cause });
  }
  return compilePolicy(data, source);
}

/** Validates a decoded policy document; unknown keys, actions and roles are errors, not ignored. */
export function compilePolicy(data: unknown, source = "policy"): Policy {
  const fail = (where: string, problem: string): never => {
    throw new ConfigError(`${source}: ${where}: ${problem}`);
  };
  const doc = record(data, source, fail);
  onlyKeys(doc, ["roles", "bindings"], source, fail);
  const roles = new Map<string, RoleDef>();
  for (const [name, raw] of Object.entries(record(doc.roles ?? {}, "roles", fail))) {
    const where = `roles.${name}`;
    if (!/^[A-Za-z0-9][A-Za-z0-9._-]*$/.test(name)) fail(where, "a role name uses letters, digits, '.', '_' or '-'");
    const r = record(raw, where, fail);
    onlyKeys(r, ["hosts", "actions", "commands", "shell"], where, fail);
    if (typeof r.hosts !== "string") return fail(`${where}.hosts`, 'is required: a host query the role\'s hosts must match ("all" for every host of the tenant)');
    let hosts: Query;
    try {
      hosts = parseQuery(r.hosts);
    } catch (err) {
      const detail = err instanceof QuerySyntaxError ? `${err.message}\n${err.pointer}` : (err as Error).message;
      return fail(`${where}.hosts`, `is not a valid query: ${detail}`);
    }
    const actions = new Set<Action>();
    for (const a of stringList(r.actions ?? [], `${where}.actions`, fail)) {
      if (a === "*") ACTIONS.forEach((x) => actions.add(x));
      else if (isAction(a)) actions.add(a);
      else fail(`${where}.actions`, `unknown action ${JSON.stringify(a)} (known: ${ACTIONS.join(", ")}, or "*")`);
    }
    const commands: CommandRule[] = [];
    const rawCommands = r.commands ?? [];
    if (!Array.isArray(rawCommands)) return fail(`${where}.commands`, "must be a list");
    rawCommands.forEach((c, i) => commands.push(compileCommand(c, `${where}.commands[${i}]`, fail)));
    if (r.shell !== undefined && typeof r.shell !== "boolean") fail(`${where}.shell`, "must be true or false");
    roles.set(name, { name, hosts, hostsText: formatQuery(hosts), actions, commands, shell: r.shell === true });
  }
  const bindings = new Map<string, string[]>();
  for (const [who, raw] of Object.entries(record(doc.bindings ?? {}, "bindings", fail))) {
    const where = `bindings.${who}`;
    if (!/^[A-Za-z0-9][A-Za-z0-9._-]*\/(\*|[A-Za-z0-9][A-Za-z0-9._-]*)$/.test(who)) {
      fail(where, 'an operator is written "<tenant>/<operator-id>" or "<tenant>/*"');
    }
    const names = typeof raw === "string" ? [raw] : stringList(raw, where, fail);
    for (const n of names) if (!roles.has(n)) fail(where, `unknown role ${JSON.stringify(n)}`);
    bindings.set(who, names);
  }
  return { roles, bindings };
}

type Fail = (where: string, problem: string) => never;

function record(v: unknown, where: string, fail: Fail): Record<string, unknown> {
  if (v === null || typeof v !== "object" || Array.isArray(v)) return fail(where, "must be a mapping");
  return v as Record<string, unknown>;
}

function onlyKeys(r: Record<string, unknown>, keys: string[], where: string, fail: Fail): void {
  for (const k of Object.keys(r)) if (!keys.includes(k)) fail(where, `unknown key ${JSON.stringify(k)} (known: ${keys.join(", ")})`);
}

function stringList(v: unknown, where: string, fail: Fail): string[] {
  if (!Array.isArray(v) || !v.every((x) => typeof x === "string")) return fail(where, "must be a list of strings");
  return v as string[];
}

function compileCommand(raw: unknown, where: string, fail: Fail): CommandRule {
  if (typeof raw === "string") return { program: raw, source: raw };
  const c = record(raw, where, fail);
  onlyKeys(c, ["program", "args"], where, fail);
  if (typeof c.program !== "string" || c.program === "") return fail(`${where}.program`, "is required: a glob matched against argv[0]");
  if (c.args === undefined) return { program: c.program, source: c.program };
  const patterns = stringList(c.args, `${where}.args`, fail);
  const args = patterns.map((p, i) => {
    try {
      // Anchored: a pattern describes a whole argument, never a substring of it.
      return new RegExp(`^(?:${p})$`, "u");
    } catch (err) {
      return fail(`${where}.args[${i}]`, `is not a valid regular expression: ${(err as Error).message}`);
    }
  });
  return { program: c.program, args, source: `${c.program} ${patterns.map((a) => `/${a}/`).join(" ")}` };
}

// ---- decisions --------------------------------------------------------------

/** The roles bound to an operator: its own binding plus its tenant's wildcard. */
export function rolesOf(policy: Policy, caller: PeerIdentity): RoleDef[] {
  const names = new Set([...(policy.bindings.get(`${caller.scope}/${caller.id}`) ?? []), ...(policy.bindings.get(`${caller.scope}/*`) ?? [])]);
  return [...names].map((n) => policy.roles.get(n)).filter((r): r is RoleDef => r !== undefined);
}

/**
 * Decides one request. Without a policy every operator may do everything
 * within its own tenant (tenant isolation is enforced before this is
 * asked). With one, a single role must allow the whole request: the action,
 * every step, and every host. Any exception while deciding is a refusal.
 */
export function decide(policy: Policy | undefined, caller: PeerIdentity, req: AccessRequest): Decision {
  try {
    return decideUnsafe(policy, caller, req);
  } catch {
    return { allowed: false, reason: "the authorization policy could not be evaluated for this request" };
  }
}

function decideUnsafe(policy: Policy | undefined, caller: PeerIdentity, req: AccessRequest): Decision {
  const who = `operator ${caller.scope}/${caller.id}`;
  if (caller.role !== "operator") return { allowed: false, reason: `a ${caller.role} certificate cannot act as an operator` };
  if (!isAction(req.action)) return { allowed: false, reason: `unknown action ${JSON.stringify(req.action)}` };
  if (!policy) return { allowed: true, role: "(no policy: full access within the tenant)" };
  const roles = rolesOf(policy, caller);
  if (roles.length === 0) return { allowed: false, reason: `${who} has no role in the authorization policy` };
  const withAction = roles.filter((r) => r.actions.has(req.action));
  if (withAction.length === 0) return { allowed: false, reason: `${who} may not ${req.action} (roles: ${names(roles)})` };
  switch (req.action) {
    case "submit":
      return decideSubmit(who, withAction, req.hosts, req.steps);
    case "label":
      return decideLabel(who, withAction, req.before, req.after);
    default:
      return { allowed: true, role: withAction[0]!.name };
  }
}

function decideSubmit(who: string, roles: RoleDef[], hosts: readonly HostRecord[], steps: readonly Step[]): Decision {
  if (hosts.length === 0) return { allowed: false, reason: "no hosts to authorize" };
  const views = hosts.map((h) => ({ id: h.id, view: hostView(h) }));
  let best: { role: RoleDef; refused: string[] } | undefined;
  let commandRefusal: string | undefined;
  for (const role of roles) {
    const stepProblem = steps.map((s, i) => stepRefusal(role, s, i)).find((p) => p !== undefined);
    if (stepProblem) {
      commandRefusal ??= stepProblem;
      continue;
    }
    const refused = views.filter((h) => !matchHost(role.hosts, h.view)).map((h) => h.id);
    if (refused.length === 0) return { allowed: true, role: role.name };
    if (!best || refused.length < best.refused.length) best = { role, refused };
  }
  if (best) {
    const shown = best.refused.slice(0, NAMED_HOSTS).join(", ") + (best.refused.length > NAMED_HOSTS ? `, and ${best.refused.length - NAMED_HOSTS} more` : "");
    const n = best.refused.length;
    return {
      allowed: false,
      reason: `${who} may not run on ${n} host${n > 1 ? "s" : ""} outside role ${best.role.name} (hosts: ${best.role.hostsText}): ${shown}`,
    };
  }
  return { allowed: false, reason: `${who} may not run this: ${commandRefusal ?? "no role allows it"} (roles: ${names(roles)})` };
}

/** Why a role refuses a step, or undefined when it allows it. */
function stepRefusal(role: RoleDef, step: Step, index: number): string | undefined {
  const where = `step ${index + 1}`;
  switch (step.tool.case) {
    case "shell":
      return role.shell ? undefined : `${where} is a shell script and role ${role.name} does not allow shell`;
    case "exec": {
      const [program = "", ...args] = step.tool.value.argv;
      const rules = role.commands.filter((c) => globMatch(c.program, program));
      if (rules.length === 0) return `${where}: program ${JSON.stringify(program)} is not allowed by role ${role.name}`;
      if (rules.some((c) => !c.args || args.every((a) => c.args!.some((re) => re.test(a))))) return undefined;
      return `${where}: the arguments of ${JSON.stringify(program)} do not match what role ${role.name} allows`;
    }
    default:
      return `${where}: tool ${JSON.stringify(step.tool.case ?? "none")} is not allowed by role ${role.name}`;
  }
}

/**
 * A label change is allowed when the host is inside the role's hosts both
 * before and after it: labelling a host into one's own scope would widen
 * it, labelling it out would widen someone else's.
 */
function decideLabel(who: string, roles: RoleDef[], before: HostRecord, after: HostRecord): Decision {
  const b = hostView(before);
  const a = hostView(after);
  for (const role of roles) if (matchHost(role.hosts, b) && matchHost(role.hosts, a)) return { allowed: true, role: role.name };
  const inside = roles.find((r) => matchHost(r.hosts, b));
  if (inside) return { allowed: false, reason: `${who} may not label ${before.id} so that it leaves role ${inside.name} (hosts: ${inside.hostsText})` };
  return { allowed: false, reason: `${who} may not label ${before.id}: it is outside role${roles.length > 1 ? "s" : ""} ${names(roles)}` };
}

function names(roles: readonly RoleDef[]): string {
  return roles.map((r) => r.name).join(", ");
}

// ---- the running authorizer ----------------------------------------------

export interface AuthorizerOptions {
  /** Policy file (YAML or JSON); absent means full access within each tenant. */
  policyFile?: string;
  log: Logger;
  /** Reads the policy file; injected for tests. */
  readFile?: (path: string) => string;
}

/**
 * The policy in force. Loaded at start (an invalid file stops start-up) and
 * on reload (an invalid file is reported and the previous policy stays, so
 * a typo never opens or closes everything at once).
 */
export class Authorizer {
  private policy: Policy | undefined;
  private readonly file: string | undefined;
  private readonly log: Logger;
  private readonly readFile: (path: string) => string;

  constructor(opts: AuthorizerOptions) {
    this.file = opts.policyFile;
    this.log = opts.log;
    this.readFile = opts.readFile ?? ((p) => readFileSync(p, "utf8"));
    if (this.file === undefined) {
      this.log.warn("no authorization policy (--policy): every operator has full access within its own tenant");
      return;
    }
    this.policy = this.load(this.file);
    this.log.info("authorization policy loaded", { file: this.file, roles: this.policy.roles.size, bindings: this.policy.bindings.size });
  }

  private load(file: string): Policy {
    let text: string;
    try {
      text = this.readFile(file);
    } catch (cause) {
      throw new ConfigError(`cannot read policy file ${file}`, { cause });
    }
    return parsePolicy(text, file);
  }

  /** Reads the policy file again; returns whether the new policy is in force. */
  reload(): boolean {
    if (this.file === undefined) return false;
    try {
      this.policy = this.load(this.file);
      this.log.info("authorization policy reloaded", { file: this.file, roles: this.policy.roles.size, bindings: this.policy.bindings.size });
      return true;
    } catch (err) {
      this.log.error("authorization policy not reloaded: the previous one stays in force", { file: this.file, err });
      return false;
    }
  }

  decide(caller: PeerIdentity, req: AccessRequest): Decision {
    return decide(this.policy, caller, req);
  }

  /** Throws PermissionDeniedError with the reason unless allowed; returns the allowing role. */
  require(caller: PeerIdentity, req: AccessRequest): string {
    const d = this.decide(caller, req);
    if (!d.allowed) throw new PermissionDeniedError(d.reason);
    return d.role;
  }
}
