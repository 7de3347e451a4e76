import { spawn, type ChildProcess } from "node:child_process";
import { mkdirSync, openSync, closeSync, readFileSync, existsSync, watch, rmSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { createCa, generateKeyPair, issueCertificate, issueKeyAndCertificate } from "../certs/ca.js";
import { credentialPaths, writeCa, writeCredentials, type CredentialPaths } from "../certs/files.js";
import type { PeerIdentity } from "../certs/identity.js";
import { systemClock } from "../common/clock.js";
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

export interface MeshPlan {
  dir: string;
  regions: string[];
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
  /** Extra flags per role. */
  controllerArgs?: string[];
  proxyArgs?: string[];
  daemonArgs?: string[];
}

export interface RoleProcess {
  name: string;
  args: string[];
  proc: ChildProcess;
  readyFile: string;
  logFile: string;
  info?: Record<string, unknown>;
}

const SERVE_NAMES = { dnsNames: ["localhost"], ipAddresses: ["127.0.0.1", "::1"] };

function cleanEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("REXMESH_")) env[k] = v;
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
            finish();
            resolvePromise(text);
          }
        } catch {
          /* being renamed into place */
        }
      }
    };
    const watcher = watch(dirname(path), check);
    const onExit = (code: number | null, signal: string | null) => {
      finish();
      reject(new Error(`process exited (${signal ?? code}) before it was ready`));
    };
    const timer = setTimeout(() => {
      finish();
      reject(new Error(`not ready after ${timeoutMs} ms: ${path}`));
    }, timeoutMs);
    const finish = () => {
      watcher.close();
      clearTimeout(timer);
      proc.off("exit", onExit);
    };
    proc.once("exit", onExit);
    check();
  });
}

/**
 * A whole mesh on loopback as real processes: a CA, a controller, one proxy
 * per region and the daemons, every link with mutual TLS. Used by
 * `rexmesh dev` and by the integration tests.
 */
export class LocalMesh {
  readonly dir: string;
  readonly plan: Required<Omit<MeshPlan, "controllerArgs" | "proxyArgs" | "daemonArgs" | "shareHostKey" | "nodeArgs">> & MeshPlan;
  controller!: RoleProcess;
  readonly proxies: (RoleProcess & { region: string; address?: string })[] = [];
  readonly daemons: (RoleProcess & { hosts: string[] })[] = [];
  controllerAddress = "";
  /** Where proxies dial the controller, when not directly (a test relay in between). */
  controllerAddressForProxies: string | undefined;
  operator!: CredentialPaths;
  private readonly identityDir: string;
  private caMaterial!: ReturnType<typeof createCa>;

  constructor(plan: MeshPlan) {
    this.plan = { hostsPerProcess: 1, tenant: "default", logLevel: "info", ...plan };
    this.dir = resolve(plan.dir);
    this.identityDir = join(this.dir, "identities");
  }

  /** Issues every certificate; a fresh CA each time. */
  prepare(): void {
    rmSync(this.dir, { recursive: true, force: true });
    mkdirSync(join(this.dir, "logs"), { recursive: true });
    mkdirSync(join(this.dir, "run"), { recursive: true });
    const clock = systemClock;
    this.caMaterial = createCa({ clock, commonName: "rexmesh dev CA" });
    writeCa(join(this.dir, "ca"), this.caMaterial);
    const issue = (identity: PeerIdentity, dir: string, serves: boolean, days = 30) =>
      writeCredentials(dir, identity.id, issueKeyAndCertificate(this.caMaterial, { clock, identity, validityMs: days * 86_400_000, ...(serves ? SERVE_NAMES : {}) }));
    issue({ role: "controller", scope: "mesh", id: "controller" }, this.identityDir, true);
    for (const region of this.plan.regions) issue({ role: "proxy", scope: region, id: `proxy-${region}` }, this.identityDir, true);
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

  private daemonGroups(): { name: string; region: string; hosts: string[] }[] {
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
    rmSync(readyFile, { force: true });
    const fd = openSync(logFile, "a");
    const fullArgs = [...(this.plan.nodeArgs ?? []), REXMESH_BIN, role, ...args, "--data", join(this.dir, "data", name), "--ready-file", readyFile, "--log-level", this.plan.logLevel];
    const proc = spawn(process.execPath, fullArgs, { stdio: ["ignore", fd, fd], env: cleanEnv() });
    closeSync(fd);
    return { name, args: fullArgs, proc, readyFile, logFile };
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
    for (const region of this.plan.regions) {
      const name = `proxy-${region}`;
      const p = this.spawnRole(name, "proxy", ["--listen", "127.0.0.1:0", "--controller", this.controllerAddressForProxies ?? this.controllerAddress, ...this.creds(this.identityDir, name), ...(this.plan.proxyArgs ?? [])]);
      this.proxies.push({ ...p, region });
    }
    await Promise.all(this.proxies.map((p) => this.ready(p)));
    for (const p of this.proxies) p.address = String(p.info!.address);
  }

  /** Starts one more proxy in a region (a region may have several), with its own identity. */
  async startExtraProxy(region: string, name: string): Promise<RoleProcess & { region: string; address?: string }> {
    this.issue({ role: "proxy", scope: region, id: name }, this.identityDir, true, 30 * 86_400_000);
    const p = { ...this.spawnRole(name, "proxy", ["--listen", "127.0.0.1:0", "--controller", this.controllerAddressForProxies ?? this.controllerAddress, ...this.creds(this.identityDir, name), ...(this.plan.proxyArgs ?? [])]), region };
    this.proxies.push(p);
    await this.ready(p);
    (p as { address?: string }).address = String(p.info!.address);
    return p;
  }

  async startDaemons(): Promise<void> {
    for (const group of this.daemonGroups()) {
      const proxy = this.proxies.find((p) => p.region === group.region)!;
      const p = this.spawnRole(`daemon-${group.name}`, "daemon", ["--proxies", proxy.address!, "--identities", join(this.dir, "hosts", group.name), ...(this.plan.daemonArgs ?? [])]);
      this.daemons.push({ ...p, hosts: group.hosts });
    }
    await Promise.all(this.daemons.map((d) => this.ready(d)));
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

  /** Waits until the controller sees `count` connected hosts (checked through the public API). */
  async waitForHosts(count: number, timeoutMs = 60_000): Promise<void> {
    const { client, close } = operatorClient({}, this.exports());
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
    const listen = p.args.indexOf("--listen");
    if (listen >= 0 && p.info?.address) p.args[listen + 1] = String(p.info.address);
    rmSync(p.readyFile, { force: true });
    const fd = openSync(p.logFile, "a");
    p.proc = spawn(process.execPath, p.args, { stdio: ["ignore", fd, fd], env: cleanEnv() });
    closeSync(fd);
    await this.ready(p);
  }

  /** Resolves when a role process has exited. */
  exited(p: RoleProcess): Promise<void> {
    if (p.proc.exitCode !== null || p.proc.signalCode !== null) return Promise.resolve();
    return new Promise((resolve) => p.proc.once("exit", () => resolve()));
  }

  all(): RoleProcess[] {
    return [...this.daemons, ...this.proxies, ...(this.controller ? [this.controller] : [])];
  }

  /** Stops every process (daemons first), with SIGTERM and then SIGKILL after graceMs. */
  async stop(graceMs = 5000): Promise<void> {
    const stopOne = (p: RoleProcess) =>
      new Promise<void>((res) => {
        if (p.proc.exitCode !== null || p.proc.signalCode !== null) return res();
        const t = setTimeout(() => p.proc.kill("SIGKILL"), graceMs);
        p.proc.once("exit", () => {
          clearTimeout(t);
          res();
        });
        p.proc.kill("SIGTERM");
      });
    await Promise.all(this.daemons.map(stopOne));
    await Promise.all(this.proxies.map(stopOne));
    if (this.controller) await stopOne(this.controller);
  }

  writeEnvFile(path: string): void {
    writeFileSync(path, Object.entries(this.exports()).map(([k, v]) => `export ${k}=${v}`).join("\n") + "\n");
  }
}
