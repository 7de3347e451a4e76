import { join, resolve } from "node:path";
import { create } from "@bufbuild/protobuf";
import { readConfigFile } from "../common/config.js";
import { FailedPreconditionError, InvalidArgumentError } from "../common/errors.js";
import { SubmitJobRequestSchema } from "../gen/rexmesh/v1/controller_pb.js";
import { StepSchema } from "../gen/rexmesh/v1/task_pb.js";
import { helpText, parse, type OptionSpec } from "./args.js";
import { operatorClient } from "./client.js";
import { askMesh, meshRunning, serveControl, type ControlRequest } from "./dev-control.js";
import { devPlan, type DevPlan } from "./dev-plan.js";
import { DEV_SIGNALS, DevSupervisor, type DevRole } from "./dev-supervisor.js";
import { LocalMesh } from "./launcher.js";
import type { Io } from "./operator.js";
import { JobPrinter } from "./printer.js";
import { table } from "./table.js";

const DEFAULT_DIR = ".rexmesh-dev";

const dirOption: Record<string, OptionSpec> = {
  dir: { type: "string", doc: `where certificates, logs and state go (default ${DEFAULT_DIR})`, value: "DIR" },
};

const devOptions: Record<string, OptionSpec> = {
  hosts: { type: "string", short: "n", doc: "number of hosts, host-01 … (default 6)", value: "N" },
  regions: { type: "string", short: "r", doc: "number of regions (default 2, or those the inventory names)", value: "R" },
  "proxies-per-region": { type: "string", doc: "proxies in each region, proxy-<region>-1 … (default 1: proxy-<region>); every daemon is given all of its region's", value: "N" },
  tenants: { type: "string", doc: "tenants, comma-separated (default: default); hosts are spread over them; the exports are the first one's operator, env.<tenant> the others'", value: "A,B" },
  label: { type: "string", short: "l", multiple: true, doc: "a label for a host, set once it is connected (repeatable)", value: "HOST=KEY=VALUE" },
  inventory: { type: "string", doc: "YAML or JSON file naming the hosts: {hosts: {ID: {region?, tenant?, labels?}}} (instead of --hosts)", value: "FILE" },
  ...dirOption,
  "hosts-per-process": { type: "string", doc: "hosts served by one daemon process (default: up to 25)", value: "K" },
  demo: { type: "boolean", doc: "run a first job on every host once the mesh is up" },
  "log-level": { type: "string", doc: "log level of the mesh processes (default info)", value: "LEVEL" },
  help: { type: "boolean", short: "h", doc: "show this help" },
};

const controlOptions: Record<string, OptionSpec> = {
  ...dirOption,
  signal: { type: "string", short: "s", doc: `kill and restart: the signal that stops the role (default SIGKILL; ${DEV_SIGNALS.join(", ")})`, value: "SIG" },
  json: { type: "boolean", doc: "roles: one JSON object per role" },
  help: { type: "boolean", short: "h", doc: "show this help" },
};

const USAGE = "rexmesh dev [--hosts N] [--regions R] [--proxies-per-region N] [--tenants A,B] [--label HOST=KEY=VALUE]... [--inventory FILE] [--dir DIR] [--demo]\n       rexmesh dev roles|kill ROLE|restart ROLE [--dir DIR]";
const EXAMPLES = [
  "rexmesh dev",
  "rexmesh dev --hosts 50 --regions 3",
  "rexmesh dev --proxies-per-region 2 --label host-01=role=web --label host-02=role=db",
  "rexmesh dev roles                         # in another terminal: the roles of the mesh in .rexmesh-dev",
  "rexmesh dev restart proxy-eu-west-1       # kill it (SIGKILL) and start it again on its address and data",
  "rexmesh dev kill controller --signal SIGTERM",
];

function count(value: unknown, name: string, max: number): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1 || n > max) throw new InvalidArgumentError(`--${name} must be a whole number from 1 to ${max}`);
  return n;
}

/**
 * `rexmesh dev`: a whole mesh on loopback (controller, proxies per region,
 * daemons) with certificates issued on the spot; prints the exports an
 * operator pastes, stays in the foreground, says when a role dies, and stops
 * everything on Ctrl-C. `rexmesh dev roles|kill|restart` address that mesh
 * from another terminal (dev-control.ts).
 */
export async function devCommand(argv: string[], io: Io): Promise<number> {
  const sub = argv[0];
  if (sub === "roles" || sub === "kill" || sub === "restart") return controlCommand(sub, argv.slice(1), io);
  const p = parse(argv, devOptions);
  const v = p.values;
  if (v.help) {
    const { help: _help, ...startOptions } = devOptions;
    io.out(helpText(USAGE, { ...startOptions, ...controlOptions }, EXAMPLES));
    return 0;
  }
  const first = p.positionals[0];
  if (first === "roles" || first === "kill" || first === "restart") throw new InvalidArgumentError(`put ${first} first: rexmesh dev ${first}${first === "roles" ? "" : " ROLE"} [--dir DIR]`);
  if (first !== undefined) throw new InvalidArgumentError(`unknown dev command ${JSON.stringify(first)} (roles, kill ROLE, restart ROLE)`);
  const plan = devPlan({
    hosts: count(v.hosts, "hosts", 10_000),
    regions: count(v.regions, "regions", 64),
    tenants: typeof v.tenants === "string" ? v.tenants.split(",").map((t) => t.trim()) : undefined,
    labels: v.label as string[] | undefined,
    inventory: typeof v.inventory === "string" ? readConfigFile(v.inventory) : undefined,
  });
  const proxiesPerRegion = count(v.proxiesPerRegion, "proxies-per-region", 16) ?? 1;
  const hostCount = plan.hosts.length;
  const perProcess = count(v.hostsPerProcess, "hosts-per-process", 10_000) ?? Math.min(25, Math.max(1, Math.ceil(hostCount / plan.regions.length)));
  const dir = resolve((v.dir as string | undefined) ?? DEFAULT_DIR);
  // Starting wipes the directory: never under a mesh that runs there.
  if (await meshRunning(dir)) throw new FailedPreconditionError(`a dev mesh is already running in ${dir}: stop it (Ctrl-C) or give another --dir`);

  const supervisor = new DevSupervisor((line) => io.err(`rexmesh dev: ${line}\n`));
  const mesh = new LocalMesh({
    dir,
    regions: plan.regions,
    proxiesPerRegion,
    hosts: plan.hosts.map((h) => ({ id: h.id, region: h.region, tenant: h.tenant })),
    tenant: plan.tenants[0],
    hostsPerProcess: perProcess,
    logLevel: (v.logLevel as string | undefined) ?? "info",
    // A dev mesh is for trying things: rexmesh shell and the web console too (a controller serves either only when asked).
    controllerArgs: ["--sessions", "--console-listen", "127.0.0.1:0"],
    onExit: supervisor.onExit,
  });
  supervisor.attach(mesh);

  let control: { close: () => Promise<void> } | undefined;
  let stopping = false;
  const stopped = new Promise<void>((resolvePromise) => {
    const onSignal = () => {
      if (stopping) return;
      stopping = true;
      supervisor.stopAll();
      io.err("\nstopping the mesh...\n");
      Promise.resolve(control?.close())
        .then(() => mesh.stop())
        .then(resolvePromise, (err: unknown) => {
          io.err(`stopping the mesh failed: ${err instanceof Error ? err.message : String(err)}\n`);
          resolvePromise();
        });
    };
    process.on("SIGINT", onSignal);
    process.on("SIGTERM", onSignal);
    // The roles run in process groups of their own: a closed terminal stops them through here too.
    process.on("SIGHUP", onSignal);
  });

  const proxyCount = plan.regions.length * proxiesPerRegion;
  const daemons = mesh.daemonGroups().length;
  io.err(`starting a mesh: 1 controller, ${proxyCount} ${proxyCount === 1 ? "proxy" : "proxies"} (${plan.regions.join(", ")}${proxiesPerRegion > 1 ? `, ${proxiesPerRegion} each` : ""}), ${hostCount} hosts in ${plan.tenants.length > 1 ? `${plan.tenants.length} tenants, ` : ""}${daemons} daemon ${daemons === 1 ? "process" : "processes"}\n`);
  let exportsByTenant: Map<string, Record<string, string>>;
  try {
    await mesh.start();
    exportsByTenant = operatorsByTenant(mesh, plan.tenants);
    for (const [tenant, exports] of exportsByTenant) await mesh.waitForHosts(plan.hosts.filter((h) => h.tenant === tenant).length, 60_000, exports);
    await applyLabels(plan, exportsByTenant);
    control = await serveControl(mesh.dir, (req) => answerControl(supervisor, req));
  } catch (err) {
    supervisor.stopAll();
    await control?.close();
    await mesh.stop(1000);
    throw err;
  }
  for (const [tenant, exports] of exportsByTenant) mesh.writeEnvFile(join(mesh.dir, tenant === plan.tenants[0] ? "env" : `env.${tenant}`), exports);

  io.out(`\nrexmesh dev mesh is up in ${mesh.dir}. Its roles (rexmesh dev kill|restart ROLE, from another shell in this directory${dir === resolve(DEFAULT_DIR) ? "" : ` with --dir ${mesh.dir}`}):\n\n`);
  io.out(rolesTable(supervisor.roles()));
  io.out(`\nTo use it from another shell:\n\n`);
  for (const [k, val] of Object.entries(mesh.exports())) io.out(`export ${k}=${val}\n`);
  io.out(`\n(or: source ${join(mesh.dir, "env")})   logs: ${join(mesh.dir, "logs")}\n`);
  for (const tenant of plan.tenants.slice(1)) io.out(`tenant ${tenant}'s operator: source ${join(mesh.dir, `env.${tenant}`)}\n`);
  io.out(`try:  rexmesh hosts   |   rexmesh run --all -- uname -a   |   rexmesh console (a login link for the web console)\n\n`);

  if (v.demo) await demo(mesh, io);
  io.out(`\nthe mesh keeps running; Ctrl-C stops it\n`);
  await stopped;
  io.err("mesh stopped\n");
  return 0;
}

/** The operator exports of every tenant: the mesh's own operator for the first, one issued here for each other. */
function operatorsByTenant(mesh: LocalMesh, tenants: string[]): Map<string, Record<string, string>> {
  const out = new Map<string, Record<string, string>>();
  for (const tenant of tenants) {
    if (tenant === mesh.plan.tenant) {
      out.set(tenant, mesh.exports());
      continue;
    }
    const c = mesh.issue({ role: "operator", scope: tenant, id: "dev" }, join(mesh.dir, "identities", "tenants", tenant), false, 30 * 86_400_000);
    out.set(tenant, { ...mesh.exports(), REXMESH_CERT: c.cert, REXMESH_KEY: c.key, REXMESH_CA: c.ca });
  }
  return out;
}

/** Sets the planned labels through the public API, as each host's tenant's operator. */
async function applyLabels(plan: DevPlan, exportsByTenant: Map<string, Record<string, string>>): Promise<void> {
  for (const h of plan.hosts) {
    if (Object.keys(h.labels).length === 0) continue;
    const { client, close } = operatorClient({}, exportsByTenant.get(h.tenant)!);
    try {
      await client.setHostLabels({ hostId: h.id, set: h.labels, remove: [] });
    } catch (err) {
      throw new InvalidArgumentError(`labels of ${h.id}: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
    } finally {
      close();
    }
  }
}

async function demo(mesh: LocalMesh, io: Io): Promise<void> {
  const script = 'echo "hello from $REXMESH_HOST_ID ($(uname -s) $(uname -m)), task $REXMESH_TASK_ID"';
  io.out(`first job: rexmesh run --all --shell '${script}'\n\n`);
  const { client, close } = operatorClient({}, mesh.exports());
  try {
    const { job } = await client.submitJob(create(SubmitJobRequestSchema, { allHosts: true, steps: [create(StepSchema, { tool: { case: "shell", value: { script } } })] }));
    const printer = new JobPrinter({ json: false, write: io.out, color: io.isTTY });
    for await (const batch of client.watchJob({ jobId: job!.id })) printer.handle(batch);
    printer.summary();
  } finally {
    close();
  }
}

async function answerControl(supervisor: DevSupervisor, req: ControlRequest): Promise<{ message?: string; roles?: DevRole[] }> {
  switch (req.op) {
    case "roles":
      return { roles: supervisor.roles() };
    case "kill":
      return { message: await supervisor.kill(String(req.role), signalOf(req.signal)) };
    case "restart":
      return { message: await supervisor.restart(String(req.role), signalOf(req.signal)) };
    default:
      throw new InvalidArgumentError(`unknown request ${JSON.stringify(req.op)}`);
  }
}

/** `KILL`, `sigterm` or `SIGINT` as the signal's name; undefined means SIGKILL. */
function signalOf(value: unknown): NodeJS.Signals {
  if (value === undefined) return "SIGKILL";
  const name = String(value).toUpperCase();
  const full = (name.startsWith("SIG") ? name : `SIG${name}`) as NodeJS.Signals;
  if (!DEV_SIGNALS.includes(full)) throw new InvalidArgumentError(`--signal ${JSON.stringify(value)}: use one of ${DEV_SIGNALS.join(", ")}`);
  return full;
}

function rolesTable(roles: DevRole[]): string {
  return table([
    ["ROLE", "STATE", "PID", "ADDRESS", "REGION / HOSTS"],
    ...roles.map((r) => [
      r.name,
      r.running ? "running" : "stopped",
      r.pid === undefined ? "" : String(r.pid),
      r.address ?? "",
      r.kind === "daemon" ? `${r.hosts!.join(",")} via ${r.proxies!.join(",")}` : (r.region ?? ""),
    ]),
  ]);
}

/** `rexmesh dev roles|kill ROLE|restart ROLE`: asks the `rexmesh dev` running in --dir. */
async function controlCommand(op: "roles" | "kill" | "restart", argv: string[], io: Io): Promise<number> {
  const p = parse(argv, controlOptions);
  const v = p.values;
  if (v.help) {
    io.out(helpText(`rexmesh dev ${op}${op === "roles" ? "" : " ROLE"} [--dir DIR]${op === "roles" ? " [--json]" : " [--signal SIG]"}`, controlOptions, EXAMPLES.filter((e) => e.includes(` ${op}`))));
    return 0;
  }
  const dir = resolve((v.dir as string | undefined) ?? DEFAULT_DIR);
  if (op === "roles") {
    if (p.positionals.length > 0) throw new InvalidArgumentError("rexmesh dev roles takes no role");
    if (v.signal !== undefined) throw new InvalidArgumentError("--signal is for kill and restart");
    const { roles } = await askMesh(dir, { op });
    io.out(v.json ? (roles as DevRole[]).map((r) => JSON.stringify(r) + "\n").join("") : rolesTable(roles as DevRole[]));
    return 0;
  }
  if (p.positionals.length !== 1) throw new InvalidArgumentError(`rexmesh dev ${op} needs one role (rexmesh dev roles lists them)`);
  if (v.json) throw new InvalidArgumentError("--json is for rexmesh dev roles");
  const signal = signalOf(v.signal);
  const { message } = await askMesh(dir, { op, role: p.positionals[0], signal });
  io.out(`${message}\n`);
  return 0;
}
