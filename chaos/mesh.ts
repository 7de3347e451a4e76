import { LocalMesh, type RoleProcess } from "../cli/launcher.js";
import type { Clock } from "../common/clock.js";
import { TcpRelay } from "./tcp-relay.js";
import { ALL_HOSTS, linkName, LINKS, TOPOLOGY } from "./topology.js";

export interface ChaosMeshOptions {
  dir: string;
  clock: Clock;
  /** Heartbeat of every link, so that silence is noticed within seconds. Default "1s". */
  heartbeat?: string;
  logLevel?: string;
}

/** When a role was not serving: from its kill to its restart being ready. */
export interface Downtime {
  role: string;
  from: number;
  to?: number;
}

/**
 * The chaos topology as real processes (LocalMesh), with a TCP relay on every
 * link (each proxy to the controller, each daemon to each proxy it was given)
 * so that links can be cut without touching the processes.
 */
export class ChaosMesh {
  readonly mesh: LocalMesh;
  readonly relays = new Map<string, TcpRelay>();
  readonly downtimes: Downtime[] = [];

  constructor(private readonly opts: ChaosMeshOptions) {
    const hb = opts.heartbeat ?? "1s";
    const regionOf = new Map<string, string>(TOPOLOGY.daemons.flatMap((d) => d.hosts.map((h) => [h, d.region] as const)));
    this.mesh = new LocalMesh({
      dir: opts.dir,
      regions: [...TOPOLOGY.regions],
      proxiesPerRegion: TOPOLOGY.proxiesPerRegion,
      hosts: ALL_HOSTS.map((id) => ({ id, region: regionOf.get(id)! })),
      hostsPerProcess: TOPOLOGY.hostsPerProcess,
      shareHostKey: true,
      logLevel: opts.logLevel ?? "info",
      controllerArgs: ["--heartbeat", hb, "--grace", "3s"],
      proxyArgs: ["--heartbeat", hb, "--grace", "3s"],
      daemonArgs: ["--heartbeat", hb, "--grace", "3s", "--capacity", "16", "--kill-grace", "1s"],
      route: async ({ from, to, address }) => {
        const relay = await TcpRelay.start(address);
        this.relays.set(linkName(from, to), relay);
        return relay.address;
      },
    });
  }

  /** Starts every process and waits for every host; checks that the mesh has the topology's names. */
  async start(timeoutMs = 90_000): Promise<void> {
    await this.mesh.start();
    for (const d of TOPOLOGY.daemons) {
      const got = this.mesh.daemons.find((x) => x.name === d.name);
      if (!got || got.hosts.join() !== d.hosts.join() || got.proxies.join() !== d.proxies.join()) {
        throw new Error(`the mesh does not match the chaos topology: ${d.name} is ${JSON.stringify(got && { hosts: got.hosts, proxies: got.proxies })}`);
      }
    }
    for (const l of LINKS) if (!this.relays.has(l)) throw new Error(`no relay on link ${l}`);
    await this.mesh.waitForHosts(ALL_HOSTS.length, timeoutMs);
  }

  relay(link: string): TcpRelay {
    const r = this.relays.get(link);
    if (!r) throw new Error(`no relay on link ${link}`);
    return r;
  }

  isUp(role: string): boolean {
    const p = this.mesh.role(role);
    return p.proc.exitCode === null && p.proc.signalCode === null;
  }

  private now(t0: number): number {
    return this.opts.clock.now() - t0;
  }

  /** Signals a role and waits for it to exit (a SIGTERM that takes too long is followed by SIGKILL). */
  async kill(role: string, signal: "SIGKILL" | "SIGTERM", t0: number): Promise<void> {
    const p: RoleProcess = this.mesh.role(role);
    if (!this.isUp(role)) return;
    this.downtimes.push({ role, from: this.now(t0) });
    const exited = this.mesh.exited(p);
    p.proc.kill(signal);
    const force = this.opts.clock.setTimeout(() => p.proc.kill("SIGKILL"), signal === "SIGTERM" ? 10_000 : 5000);
    await exited;
    force.cancel();
  }

  /**
   * Restarts a role on its address and data directory; resolves once it is
   * ready. A start that fails (a slow machine, the port not free yet) is
   * killed and tried again, a few times.
   */
  async restart(role: string, t0: number, attempts = 3): Promise<void> {
    const p = this.mesh.role(role);
    for (let i = 1; ; i++) {
      try {
        await this.mesh.restart(p);
        break;
      } catch (err) {
        if (p.proc.exitCode === null && p.proc.signalCode === null) {
          const exited = this.mesh.exited(p);
          p.proc.kill("SIGKILL");
          await exited;
        }
        if (i >= attempts) throw err;
      }
    }
    const open = [...this.downtimes].reverse().find((d) => d.role === role && d.to === undefined);
    if (open) open.to = this.now(t0);
  }

  private readonly busy = new Map<string, Promise<void>>();

  /**
   * Runs fn with the role to itself: faults on one role never interleave
   * (a kill landing on a restart in progress would leave two processes on
   * one data directory). Resolves with how long fn had to wait its turn.
   */
  async exclusive(role: string, fn: () => Promise<void>): Promise<number> {
    const asked = this.opts.clock.now();
    const before = this.busy.get(role) ?? Promise.resolve();
    let done!: () => void;
    const mine = new Promise<void>((resolve) => (done = resolve));
    this.busy.set(role, before.then(() => mine));
    await before;
    const waited = this.opts.clock.now() - asked;
    try {
      await fn();
    } finally {
      done();
    }
    return waited;
  }

  /** Roles not running now. */
  down(): string[] {
    return this.mesh.all().filter((p) => p.proc.exitCode !== null || p.proc.signalCode !== null).map((p) => p.name);
  }

  /** Links with a fault in force now. */
  faultyLinks(): string[] {
    return [...this.relays].filter(([, r]) => r.state !== "open").map(([l]) => l);
  }

  /** Stops every process and relay. */
  async stop(): Promise<void> {
    try {
      await this.mesh.stop(3000);
    } finally {
      for (const r of this.relays.values()) r.close();
    }
  }
}
