/**
 * Authorization at the controller: who may do what, on which hosts, with
 * which commands. Pure logic over a compiled policy (see
 * docs/authorization.md for the file format); the {@link Authorizer} holds
 * the current policy and swaps it on reload.
 *
 * Decisions fail closed: an operator with no binding, an action the policy
 * does not grant or does not know, a step whose tool or program no role
 * allows, a protected environment variable no role names, a host outside
 * the role's selector, or any error while evaluating all refuse. Host decisions are taken on the hosts a request RESOLVED to,
 * so a wildcard target is judged by what it really reaches and is refused,
 * never silently narrowed.
 */
import { readFileSync } from "node:fs";
import { isIP } from "node:net";
import { parse as parseYaml } from "yaml";
import type { PeerIdentity } from "../certs/identity.js";
import { parseDuration } from "../common/duration.js";
import { ConfigError, PermissionDeniedError } from "../common/errors.js";
import type { Logger } from "../common/logger.js";
import type { Step } from "../gen/rexmesh/v1/task_pb.js";
import type { HostRecord } from "./model.js";
import { formatQuery, globMatch, hostView, matchHost, parseQuery, QuerySyntaxError, type Query } from "./query.js";

/**
 * What an operator can be allowed to do within its own tenant. Every RPC an
 * operator may call declares one of these (controller/declarations.ts);
 * `"*"` in a role grants all of them.
 */
const TENANT_ACTIONS = ["read", "submit", "cancel", "label", "audit", "bundle", "document", "token", "rekey", "revoke", "revoke.operator", "artifact.read", "artifact.write", "schedule", "release", "trigger", "console"] as const;
/**
 * Actions on what every tenant shares (proxies). `"*"` never grants them: a
 * role must name them, and without a policy nobody holds them.
 */
const MESH_ACTIONS = ["revoke.proxy"] as const;
/**
 * Tenant actions that `"*"` does not grant either: a role names them. An
 * interactive session runs whatever its operator types, so a policy written
 * before sessions existed, with `"*"` and a narrow `commands` list, must not
 * start granting shells.
 */
const NAMED_ACTIONS = ["session", "forward"] as const;
const ACTIONS = [...TENANT_ACTIONS, ...NAMED_ACTIONS, ...MESH_ACTIONS] as const;
export type Action = (typeof ACTIONS)[number];

/**
 * The action a revocation needs, by the role of the identity revoked: a host
 * needs `revoke` on that host; an operator `revoke.operator`; a proxy
 * `revoke.proxy`; a zero certificate (role enroll) — the tenant's own
 * enrollment credential, which stops every enrollment with it — `token`,
 * the action that issues enrollment credentials, not a host-scoped `revoke`.
 */
export function revokeAction(role: string): Action {
  return role === "proxy" ? "revoke.proxy" : role === "operator" ? "revoke.operator" : role === "enroll" ? "token" : "revoke";
}

export function isAction(value: string): value is Action {
  return (ACTIONS as readonly string[]).includes(value);
}

function isMeshAction(action: Action): boolean {
  return (MESH_ACTIONS as readonly string[]).includes(action);
}

/** Step tools, by the names a policy uses (`file.put` is the proto's `filePut`). */
const TOOLS = ["exec", "shell", "script", "file.put", "python", "ansible", "ping", "update"] as const;
export type Tool = (typeof TOOLS)[number];
/** Tools a role has when it names none: a ping runs nothing, exec is limited by `commands`. */
const DEFAULT_TOOLS: readonly Tool[] = ["exec", "ping"];

function toolOf(step: Step): Tool | undefined {
  switch (step.tool.case) {
    case "exec":
    case "shell":
    case "script":
    case "python":
    case "ansible":
    case "ping":
    case "update":
      return step.tool.case;
    case "filePut":
      return "file.put";
    default:
      return undefined;
  }
}

/**
 * Environment variables that change which program runs or what it loads:
 * refused in a job unless one of the role's `env` patterns names them. A
 * policy adds its own with `protectedEnv`. Globs, matched case-sensitively
 * (the loader and shells read exactly these names).
 */
const PROTECTED_ENV: readonly string[] = [
  // program lookup, the dynamic loader and libc
  "PATH", "LD_*", "DYLD_*", "GCONV_PATH", "GLIBC_TUNABLES", "HOSTALIASES", "LOCPATH", "NLSPATH",
  // shells
  "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "IFS", "PROMPT_COMMAND", "CDPATH",
  // interpreters and runtimes
  "PYTHON*", "PERL*", "RUBY*", "ANSIBLE_*", "NODE_OPTIONS", "NODE_PATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "CLASSPATH",
  // helper programs that tools start on their own
  "GIT_*", "SSH_ASKPASS", "SUDO_ASKPASS", "PAGER", "MANPAGER", "SYSTEMD_PAGER", "SYSTEMD_EDITOR", "LESSOPEN", "LESSCLOSE", "EDITOR", "VISUAL", "BROWSER",
];

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
  tools: ReadonlySet<Tool>;
  /** Globs of protected environment variables this role may set. */
  env: readonly string[];
  /** Where a port forward (action forward) may go; absent: the host's loopback only. */
  forwardTo?: readonly ForwardTarget[];
  /** Sessions this role opens end after this long without input, and after this long in all (absent: the controller's defaults; 0: none). */
  sessionIdleMs?: number;
  sessionMaxMs?: number;
  /** A session this role opens ends when its recording cannot be stored (cut at the limit, or the store failed). */
  strictRecording?: boolean;
}

/** A validated policy, ready for decisions. */
export interface Policy {
  roles: ReadonlyMap<string, RoleDef>;
  /** "<tenant>/<operator>" or "<tenant>/*" → role names. */
  bindings: ReadonlyMap<string, readonly string[]>;
  /** {@link PROTECTED_ENV} and the policy's own `protectedEnv`. */
  protectedEnv: readonly string[];
}

/**
 * What is asked. Hosts are always the resolved set, inside the caller's
 * tenant. An action with `hosts` needs one role granting it whose selector
 * covers every one of them; with `allHosts`, one whose selector is `all`;
 * without either, a role granting it at all.
 */
export type AccessRequest =
  | { action: "submit"; hosts: readonly HostRecord[]; steps: readonly Step[]; env?: Readonly<Record<string, string>> }
  | { action: "label"; before: HostRecord; after: HostRecord }
  /** An interactive session on one host: `argv` empty for the login shell. */
  | { action: "session"; host: HostRecord; argv: readonly string[] }
  /** A port forward through one host to an address as that host reaches it. */
  | { action: "forward"; host: HostRecord; to: { host: string; port: number } }
  | { action: Exclude<Action, "submit" | "label" | "session" | "forward">; hosts?: readonly HostRecord[]; allHosts?: boolean; what?: string };

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

/** Validates a decoded policy document; unknown keys, actions, tools and roles are errors, not ignored. */
export function compilePolicy(data: unknown, source = "policy"): Policy {
  const fail = (where: string, problem: string): never => {
    throw new ConfigError(`${source}: ${where}: ${problem}`);
  };
  const doc = record(data, source, fail);
  onlyKeys(doc, ["roles", "bindings", "protectedEnv"], source, fail);
  const roles = new Map<string, RoleDef>();
  for (const [name, raw] of Object.entries(record(doc.roles ?? {}, "roles", fail))) {
    const where = `roles.${name}`;
    if (!/^[A-Za-z0-9][A-Za-z0-9._-]*$/.test(name)) fail(where, "a role name uses letters, digits, '.', '_' or '-'");
    const r = record(raw, where, fail);
    onlyKeys(r, ["hosts", "actions", "commands", "shell", "tools", "env", "sessionIdle", "sessionMax", "forwardTo", "strictRecording"], where, fail);
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
      if (a === "*") TENANT_ACTIONS.forEach((x) => actions.add(x));
      else if (isAction(a)) actions.add(a);
      else fail(`${where}.actions`, `unknown action ${JSON.stringify(a)} (known: ${ACTIONS.join(", ")}, or "*" for every one but ${[...NAMED_ACTIONS, ...MESH_ACTIONS].join(", ")})`);
    }
    const commands: CommandRule[] = [];
    const rawCommands = r.commands ?? [];
    if (!Array.isArray(rawCommands)) return fail(`${where}.commands`, "must be a list");
    rawCommands.forEach((c, i) => commands.push(compileCommand(c, `${where}.commands[${i}]`, fail)));
    if (r.shell !== undefined && typeof r.shell !== "boolean") fail(`${where}.shell`, "must be true or false");
    const tools = new Set<Tool>(r.tools === undefined ? DEFAULT_TOOLS : []);
    for (const t of stringList(r.tools ?? [], `${where}.tools`, fail)) {
      if (t === "*") TOOLS.forEach((x) => tools.add(x));
      else if ((TOOLS as readonly string[]).includes(t)) tools.add(t as Tool);
      else fail(`${where}.tools`, `unknown tool ${JSON.stringify(t)} (known: ${TOOLS.join(", ")}, or "*")`);
    }
    if (r.shell === true) tools.add("shell");
    const env = stringList(r.env ?? [], `${where}.env`, fail);
    const sessionIdleMs = sessionLimit(r.sessionIdle, `${where}.sessionIdle`, fail);
    const sessionMaxMs = sessionLimit(r.sessionMax, `${where}.sessionMax`, fail);
    const forwardTo = r.forwardTo === undefined ? undefined : stringList(r.forwardTo, `${where}.forwardTo`, fail).map((t, i) => forwardTarget(t, `${where}.forwardTo[${i}]`, fail));
    if (r.strictRecording !== undefined && typeof r.strictRecording !== "boolean") fail(`${where}.strictRecording`, "must be true or false");
    const strictRecording = r.strictRecording === true;
    roles.set(name, { name, hosts, hostsText: formatQuery(hosts), actions, commands, tools, env, sessionIdleMs, sessionMaxMs, forwardTo, strictRecording });
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
  const protectedEnv = [...PROTECTED_ENV, ...stringList(doc.protectedEnv ?? [], "protectedEnv", fail)];
  return { roles, bindings, protectedEnv };
}

type Fail = (where: string, problem: string) => never;

/** A target a role may forward to: a glob of the address or name, and a port or "*". */
export interface ForwardTarget {
  host: string;
  port: string;
  source: string;
}

/** "HOST:PORT", "[V6]:PORT", with globs in HOST and "*" for any port. */
function forwardTarget(text: string, where: string, fail: Fail): ForwardTarget {
  const m = /^(?:\[([0-9A-Fa-f:.*?]+)\]|([A-Za-z0-9.*?_-]+)):(\*|\d{1,5})$/.exec(text);
  if (!m || (m[3] !== "*" && (Number(m[3]) < 1 || Number(m[3]) > 65535))) return fail(where, `${JSON.stringify(text)} is not HOST:PORT (a name or address, globs allowed, [v6]:PORT; the port 1-65535 or "*")`);
  return { host: (m[1] ?? m[2])!.toLowerCase(), port: m[3]!, source: text };
}

/** The longest session limit a policy may set (it travels in milliseconds in a 32-bit field). */
export const SESSION_LIMIT_MAX_MS = 30 * 86_400_000;

/** A session limit: a duration ("15m", "8h"), "0" for none, at most 30 days. */
function sessionLimit(v: unknown, where: string, fail: Fail): number | undefined {
  if (v === undefined) return undefined;
  if (typeof v !== "string" && v !== 0) return fail(where, 'must be a duration such as "15m" or "8h", or "0" for none');
  let ms: number;
  try {
    ms = v === 0 ? 0 : parseDuration(v, where);
  } catch (err) {
    return fail(where, (err as Error).message);
  }
  if (ms > SESSION_LIMIT_MAX_MS) fail(where, "is longer than 30 days");
  return ms;
}

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
function rolesOf(policy: Policy, caller: PeerIdentity): RoleDef[] {
  const names = new Set([...(policy.bindings.get(`${caller.scope}/${caller.id}`) ?? []), ...(policy.bindings.get(`${caller.scope}/*`) ?? [])]);
  return [...names].map((n) => policy.roles.get(n)).filter((r): r is RoleDef => r !== undefined);
}

/**
 * Decides one request. Without a policy every operator may do every tenant
 * action within its own tenant (tenant isolation is enforced before this
 * is asked) and no mesh action. With one, a single role must allow the
 * whole request: the action, every step and variable, and every host. Any
 * exception while deciding is a refusal.
 */
export function decide(policy: Policy | undefined, caller: PeerIdentity, req: AccessRequest): Decision {
  try {
    return decideUnsafe(policy, caller, req);
  } catch {
    return { allowed: false, reason: "the authorization policy could not be evaluated for this request" };
  }
}

function decideUnsafe(policy: Policy | undefined, caller: PeerIdentity, req: AccessRequest): Decision {
  const p = prelude(policy, caller, req.action);
  if ("decision" in p) return p.decision;
  const { who, roles, withAction } = p;
  switch (req.action) {
    case "submit":
      return decideSubmit(who, withAction, req.hosts, req.steps, req.env ?? {}, p.policy.protectedEnv);
    case "label":
      return decideLabel(who, roles, withAction, req.before, req.after);
    case "session":
      return decideSession(who, withAction, req.host, req.argv);
    case "forward":
      return decideForward(who, withAction, req.host, req.to);
    default:
      if (req.allHosts) return decideOnAllHosts(who, req.action, withAction, req.what);
      return req.hosts ? decideOnHosts(who, req.action, withAction, req.hosts) : { allowed: true, role: withAction[0]!.name };
  }
}

/**
 * Whether the caller holds an action at all, whatever its scope: what the
 * boundary checks before a request's hosts are known.
 */
export function holds(policy: Policy | undefined, caller: PeerIdentity, action: Action): Decision {
  try {
    const p = prelude(policy, caller, action);
    return "decision" in p ? p.decision : { allowed: true, role: p.withAction[0]!.name };
  } catch {
    return { allowed: false, reason: "the authorization policy could not be evaluated for this request" };
  }
}

/** The checks every decision starts with; a decision when they settle it, else the roles granting the action. */
function prelude(policy: Policy | undefined, caller: PeerIdentity, action: string): { decision: Decision } | { who: string; policy: Policy; roles: RoleDef[]; withAction: RoleDef[] } {
  const who = `operator ${caller.scope}/${caller.id}`;
  if (caller.role !== "operator") return { decision: { allowed: false, reason: `a ${caller.role} certificate cannot act as an operator` } };
  if (!isAction(action)) return { decision: { allowed: false, reason: `unknown action ${JSON.stringify(action)}` } };
  if (!policy) {
    if (isMeshAction(action)) return { decision: { allowed: false, reason: `${action} concerns every tenant: it needs a policy (--policy) with a role that names it` } };
    return { decision: { allowed: true, role: "(no policy: full access within the tenant)" } };
  }
  const roles = rolesOf(policy, caller);
  if (roles.length === 0) return { decision: { allowed: false, reason: `${who} has no role in the authorization policy` } };
  const withAction = roles.filter((r) => r.actions.has(action));
  if (withAction.length === 0) return { decision: { allowed: false, reason: `${who} may not ${action} (roles: ${names(roles)})` } };
  return { who, policy, roles, withAction };
}

/** A role whose selector is `all` must grant the action: the request concerns hosts no selector can be checked on yet. */
function decideOnAllHosts(who: string, action: Action, roles: RoleDef[], what = action === "token" ? "create a join token for any host id (one not bound with --host-id)" : `${action} on any host of the tenant`): Decision {
  const role = roles.find((r) => r.hosts.kind === "all");
  if (role) return { allowed: true, role: role.name };
  const held = roles.map((r) => `${r.name} (hosts: ${r.hostsText})`).join(", ");
  return { allowed: false, reason: `${who} may not ${what}: its roles grant ${action} only on some hosts, ${held}; that needs a role with hosts "all"` };
}

/** One role must cover every host; the refusal names the first hosts left out by the role that came closest. */
function decideOnHosts(who: string, action: Action, roles: RoleDef[], hosts: readonly HostRecord[]): Decision {
  if (hosts.length === 0) return { allowed: false, reason: "no hosts to authorize" };
  const views = hosts.map((h) => ({ id: h.id, view: hostView(h) }));
  let best: { role: RoleDef; refused: string[] } | undefined;
  for (const role of roles) {
    const refused = views.filter((h) => !matchHost(role.hosts, h.view)).map((h) => h.id);
    if (refused.length === 0) return { allowed: true, role: role.name };
    if (!best || refused.length < best.refused.length) best = { role, refused };
  }
  const { role, refused } = best!;
  const shown = refused.slice(0, NAMED_HOSTS).join(", ") + (refused.length > NAMED_HOSTS ? `, and ${refused.length - NAMED_HOSTS} more` : "");
  const n = refused.length;
  const verb = action === "submit" ? "run" : action === "session" ? "open a session" : action;
  return { allowed: false, reason: `${who} may not ${verb} on ${n} host${n > 1 ? "s" : ""} outside role ${role.name} (hosts: ${role.hostsText}): ${shown}` };
}

function decideSubmit(who: string, roles: RoleDef[], hosts: readonly HostRecord[], steps: readonly Step[], env: Readonly<Record<string, string>>, protectedEnv: readonly string[]): Decision {
  if (hosts.length === 0) return { allowed: false, reason: "no hosts to authorize" };
  let refusal: string | undefined;
  const fit: RoleDef[] = [];
  for (const role of roles) {
    const problem = steps.map((s, i) => stepRefusal(role, s, i)).find((p) => p !== undefined) ?? envRefusal(role, env, protectedEnv);
    if (problem) refusal ??= problem;
    else fit.push(role);
  }
  if (fit.length === 0) return { allowed: false, reason: `${who} may not run this: ${refusal ?? "no role allows it"} (roles: ${names(roles)})` };
  return decideOnHosts(who, "submit", fit, hosts);
}

/**
 * A session is allowed by a role that names `session`, covers the host and
 * allows what the session runs: a login shell (no argv) runs anything, so
 * the role must allow the `shell` tool; a program is judged like an `exec`
 * step (`commands`, with its arguments).
 */
function decideSession(who: string, roles: RoleDef[], host: HostRecord, argv: readonly string[]): Decision {
  let refusal: string | undefined;
  const fit: RoleDef[] = [];
  const step = { tool: { case: "exec", value: { argv } } } as unknown as Step;
  for (const role of roles) {
    const problem = argv.length === 0 ? (role.tools.has("shell") ? undefined : `a login shell runs anything, and role ${role.name} does not allow shell`) : stepRefusal(role, step, 0)?.replace(/^step 1: /, "");
    if (problem) refusal ??= problem;
    else fit.push(role);
  }
  if (fit.length === 0) return { allowed: false, reason: `${who} may not open this session: ${refusal ?? "no role allows it"} (roles: ${names(roles)})` };
  return decideOnHosts(who, "session", fit, [host]);
}

/**
 * Whether a forward target matches a role's pattern. A glob never crosses a
 * label: "db-*.internal" and "10.0.0.*" are compared label by label, so
 * "db-x.attacker.example" or "10.0.0.1.attacker.example" (a name that
 * resolves wherever its owner likes) match neither. A pattern that is an
 * IPv4 address (digits and globs in four labels) takes only an IPv4
 * literal; one with ":" (IPv6) only that exact address; "*" alone, anything.
 */
function targetMatches(pattern: string, target: string): boolean {
  if (pattern === "*") return true;
  if (pattern.includes(":")) return target === pattern;
  if (/^[0-9*?]+(\.[0-9*?]+){3}$/.test(pattern) && isIP(target) !== 4) return false;
  const want = pattern.split(".");
  const got = target.replace(/\.$/, "").split(".");
  return want.length === got.length && want.every((w, i) => globMatch(w, got[i]!));
}

/** Where a role forwards to when it names nothing: the host's own loopback, any port. */
const LOOPBACK_TARGETS: readonly ForwardTarget[] = ["127.0.0.1", "::1", "localhost"].map((h) => ({ host: h, port: "*", source: `${h}:*` }));

/**
 * A port forward is allowed by a role that names `forward`, covers the host
 * and lists the target in `forwardTo` (by default the host's loopback only).
 * Targets are compared as written, not resolved: "localhost" is allowed by
 * "localhost:*", not by "127.0.0.1:*".
 */
function decideForward(who: string, roles: RoleDef[], host: HostRecord, to: { host: string; port: number }): Decision {
  const target = `${to.host.includes(":") ? `[${to.host}]` : to.host}:${to.port}`;
  const fit = roles.filter((r) => (r.forwardTo ?? LOOPBACK_TARGETS).some((t) => targetMatches(t.host, to.host.toLowerCase()) && (t.port === "*" || t.port === String(to.port))));
  if (fit.length === 0) {
    const allowed = [...new Set(roles.flatMap((r) => (r.forwardTo ?? LOOPBACK_TARGETS).map((t) => t.source)))];
    return { allowed: false, reason: `${who} may not forward to ${target}: no role lists it in forwardTo (allowed: ${allowed.join(", ")}; roles: ${names(roles)})` };
  }
  return decideOnHosts(who, "forward", fit, [host]);
}

/**
 * A program named by a relative path with a slash (`./x`, `bin/x`) is
 * whatever the job's working directory holds, and `/usr/bin/../../tmp/x`
 * is not what a rule for `/usr/bin/*` means: both are refused by every
 * role. A bare name is resolved on the host with the PATH the daemon starts
 * children with, which a job changes only where a role allows PATH.
 */
function programPathProblem(program: string): string | undefined {
  if (program.includes("/") && !program.startsWith("/")) return "is a relative path (give a bare name or an absolute path)";
  if (program.startsWith("/") && /(^|\/)\.{1,2}(\/|$)|\/\/|\/$/.test(program)) return "is not a normalized absolute path";
  return undefined;
}

/** Why a role refuses a step, or undefined when it allows it. */
function stepRefusal(role: RoleDef, step: Step, index: number): string | undefined {
  const where = `step ${index + 1}`;
  const tool = toolOf(step);
  if (!tool) return `${where}: tool ${JSON.stringify(step.tool.case ?? "none")} is not known to this controller`;
  if (!role.tools.has(tool)) {
    if (tool === "shell") return `${where} is a shell script and role ${role.name} does not allow shell`;
    return `${where}: tool ${JSON.stringify(tool)} is not allowed by role ${role.name} (tools: ${[...role.tools].join(", ") || "none"})`;
  }
  if (step.tool.case !== "exec") return undefined;
  const [program = "", ...args] = step.tool.value.argv;
  const pathProblem = programPathProblem(program);
  if (pathProblem) return `${where}: program ${JSON.stringify(program)} ${pathProblem}`;
  const rules = role.commands.filter((c) => globMatch(c.program, program));
  if (rules.length === 0) return `${where}: program ${JSON.stringify(program)} is not allowed by role ${role.name}`;
  if (rules.some((c) => !c.args || args.every((a) => c.args!.some((re) => re.test(a))))) return undefined;
  return `${where}: the arguments of ${JSON.stringify(program)} do not match what role ${role.name} allows`;
}

/** Why a role refuses a job's environment: a protected variable the role's `env` does not name. */
function envRefusal(role: RoleDef, env: Readonly<Record<string, string>>, protectedEnv: readonly string[]): string | undefined {
  for (const name of Object.keys(env)) {
    if (!protectedEnv.some((p) => globMatch(p, name))) continue;
    if (role.env.some((p) => globMatch(p, name))) continue;
    return `environment variable ${name} changes what runs and role ${role.name} does not allow it (env)`;
  }
  return undefined;
}

/**
 * A label change is allowed when a role granting `label` covers the host
 * both before and after it (labelling a host out of the labeller's own
 * scope would hand it on unseen), and it gives the caller on that host no
 * power it did not hold before: every role of the caller — whatever it
 * grants — that covers the host only after the change must be matched by a
 * role that covered it before and allows at least as much. Labels decide
 * scopes: an operator may move hosts between other people's scopes if the
 * policy lets it label them, but never widen its own.
 */
function decideLabel(who: string, roles: RoleDef[], withLabel: RoleDef[], before: HostRecord, after: HostRecord): Decision {
  const b = hostView(before);
  const a = hostView(after);
  const labeller = withLabel.find((r) => matchHost(r.hosts, b) && matchHost(r.hosts, a));
  if (!labeller) {
    const inside = withLabel.find((r) => matchHost(r.hosts, b));
    if (inside) return { allowed: false, reason: `${who} may not label ${before.id} so that it leaves role ${inside.name} (hosts: ${inside.hostsText})` };
    return { allowed: false, reason: `${who} may not label ${before.id}: it is outside role${withLabel.length > 1 ? "s" : ""} ${names(withLabel)}` };
  }
  const held = roles.filter((r) => matchHost(r.hosts, b));
  const gained = roles.find((r) => !matchHost(r.hosts, b) && matchHost(r.hosts, a) && !held.some((h) => allowsAll(h, r)));
  if (gained) {
    return { allowed: false, reason: `${who} may not label ${before.id} so that it moves into role ${gained.name} (hosts: ${gained.hostsText}): that would widen the operator's own reach` };
  }
  return { allowed: true, role: labeller.name };
}

/** Whether role `a` allows everything role `b` allows (on a host both cover). Conservative: compares what the policy wrote. */
function allowsAll(a: RoleDef, b: RoleDef): boolean {
  const all = (xs: readonly string[]) => xs.includes("*");
  const anyProgram = a.commands.some((c) => c.program === "*" && !c.args);
  return (
    [...b.actions].every((x) => a.actions.has(x)) &&
    [...b.tools].every((x) => a.tools.has(x)) &&
    (all(a.env) || b.env.every((x) => a.env.includes(x))) &&
    (anyProgram || b.commands.every((c) => a.commands.some((d) => d.source === c.source)))
  );
}

/**
 * The hosts among `hosts` that some role granting `action` covers: what a
 * read shows. Without a policy, all of them.
 */
export function covered(policy: Policy | undefined, caller: PeerIdentity, action: Action, hosts: readonly HostRecord[]): HostRecord[] {
  if (caller.role !== "operator") return [];
  if (!policy) return isMeshAction(action) ? [] : [...hosts];
  try {
    const roles = rolesOf(policy, caller).filter((r) => r.actions.has(action));
    return hosts.filter((h) => {
      const view = hostView(h);
      return roles.some((r) => matchHost(r.hosts, view));
    });
  } catch {
    return [];
  }
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

  /** Whether the caller holds the action at all (see {@link holds}). */
  holds(caller: PeerIdentity, action: Action): Decision {
    return holds(this.policy, caller, action);
  }

  /** The hosts among `hosts` that some role of the caller granting `action` covers. */
  covered(caller: PeerIdentity, action: Action, hosts: readonly HostRecord[]): HostRecord[] {
    return covered(this.policy, caller, action, hosts);
  }

  /** The session limits a role sets (absent when it sets none, or there is no policy or no such role now). */
  sessionLimits(role: string): { idleMs?: number; maxMs?: number; strictRecording?: boolean } {
    const r = this.policy?.roles.get(role);
    return { idleMs: r?.sessionIdleMs, maxMs: r?.sessionMaxMs, strictRecording: r?.strictRecording };
  }

  /** Throws PermissionDeniedError with the reason unless allowed; returns the allowing role. */
  require(caller: PeerIdentity, req: AccessRequest): string {
    const d = this.decide(caller, req);
    if (!d.allowed) throw new PermissionDeniedError(d.reason);
    return d.role;
  }
}
