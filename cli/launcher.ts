import { spawn, type ChildProcess } from "node:child_process";
import { mkdirSync, openSync, closeSync, readFileSync, existsSync, watch, rmSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { createCa, generateKeyPair, issueCertificate, issueKeyAndCertificate, type CaMaterial } from "../certs/ca.js";
import { credentialPaths, writeCa, writeCredentials, type CredentialPaths } from "../certs/files.js";
import type { PeerIdentity } from "../certs/identity.js";
import { systemClock } from "../common/clock.js";
import { MANAGED_BY_ENV } from "../common/lifecycle.js";
import { ConnectionState } from "../gen/rexmesh/v1/controller_pb.js";
import { operatorClient } from "./client.js";

/** The package root, found from this module whether it runs from dist/ or from source. */
function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, "package.json"))) {
    const up = dirname(dir);
    if (up === dir) throw new Error("cannot find the rexmesh package root");
    dir = up;
  }
  return dir;
}

/** The CLI entry point (the compiled one: role processes never run from source). */
export const REXMESH_BIN = join(packageRoot(), "bin", "rexmesh.js");

/** One connection a role process dials: from the dialler's role name to the server's. */
export interface MeshLink {
  /** The dialling role: `proxy-<region>…` or `daemon-<group>`. */
  from: string;
  /** The role dialled: `controller` or a proxy's name. */
  to: string;
  /** Where the server listens. */
  address: string;
}

export interface MeshPlan {
  dir: string;
  /** The CA that issues the mesh's certificates; a new one (an RSA-3072 key: seconds of CPU) by default. */
  ca?: CaMaterial;
  regions: string[];
  /**
   * Proxies per region, one number for every region or one per region name
   * (default 1). A region with one proxy names it `proxy-<region>`; with
   * more, `proxy-<region>-1`, `proxy-<region>-2`, … Every daemon is given all
   * the proxies of its region, so that it fails over between them; the list
   * starts at a different proxy for each daemon process of the region, so
   * that the hosts spread over them.
   */
  proxiesPerRegion?: number | Record<string, number>;
  /**
   * Where a role dials another, when not directly: called once per link as
   * the mesh is wired (before the dialling process starts) and returns the
   * address to dial instead, e.g. a fault-injecting relay in front of the
   * server. Restarts keep what it returned.
   */
  route?: (link: MeshLink) => string | Promise<string>;
  /** Hosts and the region each lives in; `tenant` (in the host's certificate) defaults to the mesh's. */
  hosts: { id: string; region: string; tenant?: string }[];
  /** Hosts served by one daemon process (each still its own identity, stream and ledger). Default 1. */
  hostsPerProcess?: number;
  tenant?: string;
  logLevel?: string;
  /**
   * Give every host certificate the same key pair (each host still has its
   * own certificate and identity). Only for large test meshes: RSA key
   * generation dominates their start-up otherwise.
   */
  shareHostKey?: boolean;
  /** Flags for node itself before the script, for every role process (e.g. `--cpu-prof`). */
  nodeArgs?: string[];
  /**
   * Called whenever a role process the mesh started exits, whatever the
   * reason (a stop, a kill, a crash); `rexmesh dev` reports deaths with it.
   * Restarted processes are watched too.
   */
  onExit?: (p: RoleProcess, code: number | null, signal: NodeJS.Signals | null) => void;
  /** Extra flags per role. */
  controllerArgs?: string[];
  proxyArgs?: string[];
  daemonArgs?: string[];
  /** Extra flags for the daemon process serving these hosts (after daemonArgs), e.g. to hide tools on some. */
  daemonArgsFor?: (hosts: readonly string[]) => string[];
}

export interface RoleProcess {
  name: string;
  args: string[];
  proc: ChildProcess;
  readyFile: string;
  logFile: string;
  info?: Record<string, unknown>;
}

/** Whether a role's current process has not exited yet. */
export function isRunning(p: RoleProcess): boolean {
  return p.proc.exitCode === null && p.proc.signalCode === null;
}

const SERVE_NAMES = { dnsNames: ["localhost"], ipAddresses: ["127.0.0.1", "::1"] };

/**
 * The grace each role of a local mesh has to drain on SIGTERM (given as
 * REXMESH_GRACE, so a plan's own --grace wins), and what stop() waits on top
 * of it before a SIGKILL.
 */
const ROLE_GRACE_MS = 4000;
const FORCE_AFTER_MS = 5000;

/**
 * The environment of a role: the caller's, without its REXMESH_* settings,
 * with the mesh's grace, and this process as the one that manages it (the
 * role stops once this process is gone: a test runner killed outright
 * leaves no mesh running).
 */
function roleEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("REXMESH_")) env[k] = v;
  env.REXMESH_GRACE = `${ROLE_GRACE_MS}ms`;
  env[MANAGED_BY_ENV] = String(process.pid);
  return env;
}

/** Waits until a file exists, without polling: a directory watch wakes the check. */
async function waitForFile(path: string, proc: ChildProcess, timeoutMs: number): Promise<string> {
  return new Promise((resolvePromise, reject) => {
    const check = () => {
      if (existsSync(path)) {
        try {
          const text = readFileSync(path, "utf8");
          if (text.endsWith("\n")) {
            stopWatching();
            resolvePromise(text);
          }
        } catch {
          /* being renamed into place */
        }
      }
    };
    const watcher = watch(dirname(path), check);
    const onExit = (code: number | null, signal: string | null) => {
      stopWatching();
      reject(new Error(`process exited (${signal ?? code}) before it was ready`));
    };
    const timer = setTimeout(() => {
      stopWatching();
      reject(new Error(`not ready after ${timeoutMs} ms: ${path}`));
    }, timeoutMs);
    const stopWatching = () => {
      watcher.close();
      clearTimeout(timer);
      proc.off("exit", onExit);
    };
    proc.once("exit", onExit);
    check();
  });
}

/**
 * A whole mesh on loopback as real processes: a CA, a controller, one or
 * more proxies per region and the daemons, every link with mutual TLS. Used
 * by `rexmesh dev`, the integration tests and the chaos harness.
 */
export class LocalMesh {
  readonly dir: string;
  readonly plan: Required<Omit<MeshPlan, "ca" | "controllerArgs" | "proxyArgs" | "daemonArgs" | "daemonArgsFor" | "shareHostKey" | "nodeArgs" | "proxiesPerRegion" | "route" | "onExit">> & MeshPlan;
  controller!: RoleProcess;
  readonly proxies: (RoleProcess & { region: string; address?: string })[] = [];
  /** Daemon processes, each with its hosts and the names of the proxies it was given, in dialling order. */
  readonly daemons: (RoleProcess & { hosts: string[]; proxies: string[] })[] = [];
  controllerAddress = "";
  /** Where proxies dial the controller, when not directly (a test relay in between). */
  controllerAddressForProxies: string | undefined;
  operator!: CredentialPaths;
  private readonly identityDir: string;
  private caMaterial!: CaMaterial;

  constructor(plan: MeshPlan) {
    this.plan = { hostsPerProcess: 1, tenant: "default", logLevel: "info", ...plan };
    this.dir = resolve(plan.dir);
    this.identityDir = join(this.dir, "identities");
  }

  /** Issues every certificate, with the plan's CA or a fresh one. */
  prepare(): void {
    rmSync(this.dir, { recursive: true, force: true });
    mkdirSync(join(this.dir, "logs"), { recursive: true });
    mkdirSync(join(this.dir, "run"), { recursive: true });
    const clock = systemClock;
    this.caMaterial = this.plan.ca ?? createCa({ clock, commonName: "rexmesh dev CA" });
    writeCa(join(this.dir, "ca"), this.caMaterial);
    const issue = (identity: PeerIdentity, dir: string, serves: boolean, days = 30) =>
      writeCredentials(dir, identity.id, issueKeyAndCertificate(this.caMaterial, { clock, identity, validityMs: days * 86_400_000, ...(serves ? SERVE_NAMES : {}) }));
    issue({ role: "controller", scope: "mesh", id: "controller" }, this.identityDir, true);
    for (const region of this.plan.regions) for (const name of this.proxyNames(region)) issue({ role: "proxy", scope: region, id: name }, this.identityDir, true);
    issue({ role: "operator", scope: this.plan.tenant, id: "dev" }, this.identityDir, false);
    this.operator = credentialPaths(this.identityDir, "dev");
    const shared = this.plan.shareHostKey ? generateKeyPair() : undefined;
    for (const group of this.daemonGroups()) {
      for (const h of group.hosts) {
        const identity: PeerIdentity = { role: "host", scope: this.plan.hosts.find((x) => x.id === h)?.tenant ?? this.plan.tenant, id: h };
        const dir = join(this.dir, "hosts", group.name);
        if (!shared) issue(identity, dir, false, 1);
        else writeCredentials(dir, h, { certPem: issueCertificate(this.caMaterial, { clock, identity, validityMs: 86_400_000, publicKeyPem: shared.publicKeyPem }), keyPem: shared.privateKeyPem, caPem: this.caMaterial.certPem });
      }
    }
  }

  /** The mesh CA certificate file: what a host being enrolled is given to verify servers with. */
  get caCertFile(): string {
    return join(this.dir, "ca", "ca.crt");
  }

  /** Issues a certificate with the mesh CA, for tests that need extra identities. */
  issue(identity: PeerIdentity, dir: string, serves = false, validityMs = 86_400_000): CredentialPaths {
    writeCredentials(dir, identity.id, issueKeyAndCertificate(this.caMaterial, { clock: systemClock, identity, validityMs, ...(serves ? SERVE_NAMES : {}) }));
    return credentialPaths(dir, identity.id);
  }

  /** The names of a region's proxies as the plan makes them (extra proxies started later not included). */
  proxyNames(region: string): string[] {
    const per = this.plan.proxiesPerRegion;
    const count = typeof per === "number" ? per : (per?.[region] ?? 1);
    if (!Number.isInteger(count) || count < 1) throw new Error(`proxies per region must be a whole number of at least 1 (${region}: ${count})`);
    return count === 1 ? [`proxy-${region}`] : Array.from({ length: count }, (_, i) => `proxy-${region}-${i + 1}`);
  }

  /** A role process by name (`controller`, `proxy-east`, `daemon-east-1`, …). */
  role(name: string): RoleProcess {
    const p = this.all().find((r) => r.name === name);
    if (!p) throw new Error(`no role process named ${name}`);
    return p;
  }

  private async dialAddress(from: string, to: string, address: string): Promise<string> {
    return this.plan.route ? await this.plan.route({ from, to, address }) : address;
  }

  private async controllerFor(proxy: string): Promise<string> {
    return this.controllerAddressForProxies ?? (await this.dialAddress(proxy, "controller", this.controllerAddress));
  }

  /** How the hosts are split into daemon processes: `daemon-<name>` each, with its region and hosts. */
  daemonGroups(): { name: string; region: string; hosts: string[] }[] {
    const groups: { name: string; region: string; hosts: string[] }[] = [];
    for (const region of this.plan.regions) {
      const hosts = this.plan.hosts.filter((h) => h.region === region).map((h) => h.id);
      for (let i = 0; i < hosts.length; i += this.plan.hostsPerProcess) {
        groups.push({ name: `${region}-${groups.length + 1}`, region, hosts: hosts.slice(i, i + this.plan.hostsPerProcess) });
      }
    }
    return groups;
  }

  private spawnRole(name: string, role: string, args: string[]): RoleProcess {
    const readyFile = join(this.dir, "run", `${name}.ready`);
    const logFile = join(this.dir, "logs", `${name}.log`);
    const fullArgs = [...(this.plan.nodeArgs ?? []), REXMESH_BIN, role, ...args, "--data", join(this.dir, "data", name), "--ready-file", readyFile, "--log-level", this.plan.logLevel];
    const p = { name, args: fullArgs, readyFile, logFile } as RoleProcess;
    this.launch(p);
    return p;
  }

  /** Starts (or starts again) a role's process from its arguments, its output appended to its log. */
  private launch(p: RoleProcess): void {
    rmSync(p.readyFile, { force: true });
    const fd = openSync(p.logFile, "a");
    // Detached (a process group of its own): a Ctrl-C at the terminal reaches only the process that runs the
    // mesh, which stops the roles in order and lets each drain, instead of every role at once and then again.
    const proc = spawn(process.execPath, p.args, { stdio: ["ignore", fd, fd], env: roleEnv(), detached: true });
    closeSync(fd);
    p.proc = proc;
    const onExit = this.plan.onExit;
    if (onExit) proc.once("exit", (code, signal) => onExit(p, code, signal));
  }

  private async ready(p: RoleProcess, timeoutMs = 30_000): Promise<void> {
    try {
      p.info = JSON.parse(await waitForFile(p.readyFile, p.proc, timeoutMs));
    } catch (err) {
      const tail = existsSync(p.logFile) ? readFileSync(p.logFile, "utf8").split("\n").slice(-5).join("\n") : "";
      throw new Error(`${p.name}: ${(err as Error).message}\n${tail}`);
    }
  }

  private creds(dir: string, name: string): string[] {
    const c = credentialPaths(dir, name);
    return ["--cert", c.cert, "--key", c.key, "--ca", c.ca];
  }

  async startController(): Promise<void> {
    // The dev controller holds the CA key, so that hosts can enroll (docs/enrollment.md).
    const caKey = ["--ca-key", join(this.dir, "ca", "ca.key")];
    this.controller = this.spawnRole("controller", "controller", ["--listen", "127.0.0.1:0", ...this.creds(this.identityDir, "controller"), ...caKey, ...(this.plan.controllerArgs ?? [])]);
    await this.ready(this.controller);
    this.controllerAddress = String(this.controller.info!.address);
  }

  async startProxies(): Promise<void> {
    const started: (RoleProcess & { region: string; address?: string })[] = [];
    for (const region of this.plan.regions) {
      for (const name of this.proxyNames(region)) {
        const p = this.spawnRole(name, "proxy", ["--listen", "127.0.0.1:0", "--controller", await this.controllerFor(name), ...this.creds(this.identityDir, name), ...(this.plan.proxyArgs ?? [])]);
        started.push({ ...p, region });
      }
    }
    this.proxies.push(...started);
    await Promise.all(started.map((p) => this.ready(p)));
    for (const p of started) p.address = String(p.info!.address);
  }

  /** Starts one more proxy in a region (a region may have several), with its own identity. */
  async startExtraProxy(region: string, name: string): Promise<RoleProcess & { region: string; address?: string }> {
    this.issue({ role: "proxy", scope: region, id: name }, this.identityDir, true, 30 * 86_400_000);
    const p = { ...this.spawnRole(name, "proxy", ["--listen", "127.0.0.1:0", "--controller", await this.controllerFor(name), ...this.creds(this.identityDir, name), ...(this.plan.proxyArgs ?? [])]), region };
    this.proxies.push(p);
    await this.ready(p);
    (p as { address?: string }).address = String(p.info!.address);
    return p;
  }

  async startDaemons(): Promise<void> {
    const perRegion = new Map<string, number>();
    const started: (RoleProcess & { hosts: string[]; proxies: string[] })[] = [];
    for (const group of this.daemonGroups()) {
      const ofRegion = this.proxies.filter((p) => p.region === group.region);
      if (ofRegion.length === 0) throw new Error(`no proxy started for region ${group.region}`);
      const nth = perRegion.get(group.region) ?? 0;
      perRegion.set(group.region, nth + 1);
      const shift = nth % ofRegion.length;
      const order = [...ofRegion.slice(shift), ...ofRegion.slice(0, shift)];
      const name = `daemon-${group.name}`;
      const addresses = [];
      for (const proxy of order) addresses.push(await this.dialAddress(name, proxy.name, proxy.address!));
      const p = this.spawnRole(name, "daemon", ["--proxies", addresses.join(","), "--identities", join(this.dir, "hosts", group.name), ...(this.plan.daemonArgs ?? []), ...(this.plan.daemonArgsFor?.(group.hosts) ?? [])]);
      started.push({ ...p, hosts: group.hosts, proxies: order.map((o) => o.name) });
    }
    this.daemons.push(...started);
    await Promise.all(started.map((d) => this.ready(d)));
  }

  async start(): Promise<void> {
    this.prepare();
    await this.startController();
    await this.startProxies();
    await this.startDaemons();
  }

  /** The lines an operator pastes to use this mesh. */
  exports(): Record<string, string> {
    return { REXMESH_CONTROLLER: this.controllerAddress, REXMESH_CERT: this.operator.cert, REXMESH_KEY: this.operator.key, REXMESH_CA: this.operator.ca };
  }

  /**
   * Waits until the controller sees `count` connected hosts (checked through
   * the public API), as the operator of `exports` sees them: the mesh's own
   * tenant by default.
   */
  async waitForHosts(count: number, timeoutMs = 60_000, exports = this.exports()): Promise<void> {
    const { client, close } = operatorClient({}, exports);
    const deadline = Date.now() + timeoutMs;
    try {
      for (let delay = 20; ; delay = Math.min(delay * 2, 250)) {
        const { hosts } = await client.listHosts({});
        const connected = hosts.filter((h) => h.connection === ConnectionState.CONNECTED).length;
        if (connected >= count) return;
        if (Date.now() > deadline) throw new Error(`only ${connected} of ${count} hosts connected after ${timeoutMs} ms`);
        await new Promise((r) => setTimeout(r, delay));
      }
    } finally {
      close();
    }
  }

  /**
   * Restarts a stopped role process with the same arguments and, for a
   * server, on the same address, so that its peers find it again.
   */
  async restart(p: RoleProcess): Promise<void> {
    // A second process on the same data directory and address would fight the first, which nothing would stop.
    if (isRunning(p)) throw new Error(`${p.name} is still running (pid ${p.proc.pid})`);
    const listen = p.args.indexOf("--listen");
    if (listen >= 0 && p.info?.address) p.args[listen + 1] = String(p.info.address);
    this.launch(p);
    await this.ready(p);
  }

  /** Signals a role process and waits for it to exit; SIGKILL follows after forceMs if it has not. */
  async kill(p: RoleProcess, signal: NodeJS.Signals = "SIGKILL", forceMs = 10_000): Promise<void> {
    if (!isRunning(p)) return;
    const exited = this.exited(p);
    p.proc.kill(signal);
    const force = setTimeout(() => p.proc.kill("SIGKILL"), forceMs);
    await exited;
    clearTimeout(force);
  }

  /** Resolves when a role process has exited. */
  exited(p: RoleProcess): Promise<void> {
    if (!isRunning(p)) return Promise.resolve();
    return new Promise((resolve) => p.proc.once("exit", () => resolve()));
  }

  all(): RoleProcess[] {
    return [...this.daemons, ...this.proxies, ...(this.controller ? [this.controller] : [])];
  }

  /** Stops every process (daemons first), with SIGTERM, each draining within its grace, and SIGKILL after graceMs. */
  async stop(graceMs = ROLE_GRACE_MS + FORCE_AFTER_MS): Promise<void> {
    const stopOne = (p: RoleProcess) => this.kill(p, "SIGTERM", graceMs);
    await Promise.all(this.daemons.map(stopOne));
    await Promise.all(this.proxies.map(stopOne));
    if (this.controller) await stopOne(this.controller);
  }

  writeEnvFile(path: string, exports = this.exports()): void {
    writeFileSync(path, Object.entries(exports).map(([k, v]) => `export ${k}=${v}`).join("\n") + "\n");
  }
}
