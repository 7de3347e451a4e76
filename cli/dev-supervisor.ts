import type { ChildProcess } from "node:child_process";
import { isRunning, type LocalMesh, type RoleProcess } from "./launcher.js";

/** What `rexmesh dev roles` shows of one role. */
export interface DevRole {
  name: string;
  kind: "controller" | "proxy" | "daemon";
  running: boolean;
  pid?: number;
  /** Where a server role listens (the same across restarts). */
  address?: string;
  region?: string;
  /** A daemon process's hosts. */
  hosts?: string[];
  /** The proxies a daemon process is given, in the order it tries them. */
  proxies?: string[];
  log: string;
}

/** Signals `rexmesh dev kill|restart --signal` accepts. */
export const DEV_SIGNALS: readonly NodeJS.Signals[] = ["SIGKILL", "SIGTERM", "SIGINT"];

function how(code: number | null, signal: NodeJS.Signals | null): string {
  return signal ? `signal ${signal}` : `exit code ${code}`;
}

/**
 * Watches the role processes of a `rexmesh dev` mesh and kills or restarts
 * one on request. Every exit is reported in one line: one that nobody asked
 * for says it died unexpectedly, with how it ended and where its log is.
 * Operations on one role run one at a time, so that a kill never lands on a
 * restart in progress (two processes on one data directory).
 */
export class DevSupervisor {
  private mesh: LocalMesh | undefined;
  /** Exits that were asked for, by the process asked to exit, with why. */
  private readonly expected = new Map<ChildProcess, string>();
  private readonly busy = new Map<string, Promise<unknown>>();
  private stopping = false;

  /** `report` receives one line (no newline) per event. */
  constructor(private readonly report: (line: string) => void) {}

  /** The mesh to watch; its plan's `onExit` must be {@link onExit}. */
  attach(mesh: LocalMesh): void {
    this.mesh = mesh;
  }

  /** For the mesh plan: called on every exit of a role process. */
  readonly onExit = (p: RoleProcess, code: number | null, signal: NodeJS.Signals | null): void => {
    const asked = this.expected.get(p.proc);
    this.expected.delete(p.proc);
    if (this.stopping) return;
    if (asked !== undefined) this.report(`${p.name} stopped (${how(code, signal)}) ${asked}`);
    else this.report(`${p.name} died unexpectedly (${how(code, signal)}, pid ${p.proc.pid}); log: ${p.logFile}; \`rexmesh dev restart ${p.name}\` starts it again`);
  };

  /** From now on exits are the mesh stopping, and go unreported. */
  stopAll(): void {
    this.stopping = true;
  }

  roles(): DevRole[] {
    const mesh = this.meshOrThrow();
    const base = (p: RoleProcess) => ({ name: p.name, running: isRunning(p), pid: isRunning(p) ? p.proc.pid : undefined, log: p.logFile });
    return [
      ...(mesh.controller ? [{ ...base(mesh.controller), kind: "controller" as const, address: mesh.controllerAddress }] : []),
      ...mesh.proxies.map((p) => ({ ...base(p), kind: "proxy" as const, region: p.region, address: p.address })),
      ...mesh.daemons.map((d) => ({ ...base(d), kind: "daemon" as const, hosts: d.hosts, proxies: d.proxies })),
    ];
  }

  /** Kills a running role; resolves with a line saying so once it has exited. */
  kill(name: string, signal: NodeJS.Signals): Promise<string> {
    return this.exclusive(name, async (p) => {
      if (!isRunning(p)) throw new Error(`${name} is not running (\`rexmesh dev restart ${name}\` starts it)`);
      const pid = p.proc.pid;
      await this.stopRole(p, signal, `as asked (rexmesh dev kill); \`rexmesh dev restart ${name}\` starts it again`);
      return `killed ${name} (pid ${pid}, ${signal})`;
    });
  }

  /**
   * Stops a role if it runs, then starts it again on its address and data
   * directory; resolves with a line saying so once it is ready.
   */
  restart(name: string, signal: NodeJS.Signals): Promise<string> {
    return this.exclusive(name, async (p) => {
      if (isRunning(p)) await this.stopRole(p, signal, "to be restarted (rexmesh dev restart)");
      this.report(`restarting ${name}`);
      try {
        await this.meshOrThrow().restart(p);
      } catch (err) {
        // A start that failed leaves no process behind to fight the next one.
        await this.stopRole(p, "SIGKILL", "after a failed restart");
        throw err;
      }
      const where = (p.info?.address as string | undefined) ?? "";
      this.report(`${name} is up again (pid ${p.proc.pid}${where ? `, ${where}` : ""})`);
      return `restarted ${name} (pid ${p.proc.pid}${where ? `, ${where}` : ""})`;
    });
  }

  private async stopRole(p: RoleProcess, signal: NodeJS.Signals, why: string): Promise<void> {
    if (!isRunning(p)) return;
    this.expected.set(p.proc, why);
    await this.meshOrThrow().kill(p, signal);
  }

  private exclusive<T>(name: string, fn: (p: RoleProcess) => Promise<T>): Promise<T> {
    const mesh = this.meshOrThrow();
    const p = mesh.all().find((r) => r.name === name);
    if (!p) return Promise.reject(new Error(`no role named ${JSON.stringify(name)} in this mesh (\`rexmesh dev roles\` lists them)`));
    const before = this.busy.get(name) ?? Promise.resolve();
    const mine = before.then(() => fn(p));
    const settled: Promise<void> = mine.then(
      () => this.idle(name, settled),
      () => this.idle(name, settled),
    );
    this.busy.set(name, settled);
    return mine;
  }

  private idle(name: string, done: Promise<unknown>): void {
    if (this.busy.get(name) === done) this.busy.delete(name);
  }

  private meshOrThrow(): LocalMesh {
    if (!this.mesh) throw new Error("the mesh is not started yet");
    return this.mesh;
  }
}
