import type { Logger } from "./logger.js";
import { writeFileAtomic } from "../certs/files.js";

export type ServiceState = "starting" | "running" | "draining" | "stopped";

/** A long-running role, seen from the process that hosts it. */
export interface Service {
  /** What the ready file says once the service runs (its address, ...). */
  readonly info: Record<string, unknown>;
  /** Stops taking new work, finishes or hands back what is in flight within graceMs, then releases everything. */
  stop(graceMs: number): Promise<void>;
  /** Called first when a stop begins: health turns NOT_SERVING so balancers move away. */
  draining?(): void;
}

/**
 * The core of a role (JobManager, ProxyCore, Agent), inside its Service.
 * A stop is drain, then stop: drain refuses new work with UNAVAILABLE and
 * grants no more credits, and waits for the work in flight up to the grace;
 * what is not done by then stays in the durable store for the next start.
 */
export interface RoleCore {
  /** Recovers from the store and starts the core's timers and loops. */
  start(): void | Promise<void>;
  /** Takes no new work; resolves once the work in flight is done, or after graceMs. */
  drain(graceMs: number): Promise<void>;
  /** Releases the timers, loops and streams (a stop without drain is an abrupt one). */
  stop(): void | Promise<void>;
}

/** What a running service may ask of the process that hosts it. */
export interface ServiceControl {
  /** Stops the service as a signal would (drain within the grace), then exits with `code`. */
  exit(code: number, reason: string): void;
}

export interface RunOptions {
  log: Logger;
  /** Time allowed for a graceful stop. Default 10 s. */
  graceMs?: number;
  /** After grace, the process exits regardless after this much more. Default 5 s. */
  forceMs?: number;
  /** Written atomically with the service info once running, for supervisors and tests. */
  readyFile?: string;
  /**
   * The process that started this one and manages it (a local mesh): when
   * it is gone (this process re-parented), the service stops as on SIGTERM,
   * so that a runner killed without a chance to stop its mesh leaves nothing
   * running. Ignored when it is alive and not this process's parent.
   */
  parentPid?: number;
}

/** The environment variable naming the process that manages a role (see RunOptions.parentPid): set by a local mesh. */
export const MANAGED_BY_ENV = "REXMESH_MANAGED_BY";

/** How often a managed service looks whether the process that started it is still there. */
const PARENT_CHECK_MS = 1000;

/**
 * Hosts a service in this process: writes the ready file, and on SIGTERM or
 * SIGINT drains it (grace), then exits; a second signal, or the force time
 * running out, exits at once. The only place that installs signal handlers.
 */
export async function runService(start: (control: ServiceControl) => Promise<Service>, opts: RunOptions): Promise<void> {
  const log = opts.log;
  const graceMs = opts.graceMs ?? 10_000;
  const forceMs = opts.forceMs ?? 5_000;
  let state: ServiceState = "starting";
  let service: Service | undefined;
  let stopping: Promise<void> | undefined;
  // Timers inside the roles are unref'd; a running service must not end just
  // because its only pending work is a backoff sleep while a peer is down.
  const keepAlive = setInterval(() => {}, 1 << 30);

  const beginStop = (why: Record<string, unknown>, exitCode: number) => {
    state = "draining";
    log.info("draining", { ...why, graceMs });
    service?.draining?.();
    const force = setTimeout(() => {
      log.error("graceful stop took too long: exiting");
      process.exit(1);
    }, graceMs + forceMs);
    force.unref();
    stopping = (service ? service.stop(graceMs) : Promise.resolve()).then(
      () => {
        clearInterval(keepAlive);
        state = "stopped";
        log.info("stopped", { exitCode });
        process.exit(exitCode);
      },
      (err) => {
        log.error("stop failed", { err });
        process.exit(1);
      },
    );
  };
  const onSignal = (signal: NodeJS.Signals) => {
    if (stopping) {
      log.warn("second signal: exiting now", { signal });
      process.exit(130);
    }
    beginStop({ signal }, 0);
  };
  const control: ServiceControl = {
    exit(code, reason) {
      if (stopping) return;
      beginStop({ reason }, code);
    },
  };
  process.on("SIGTERM", onSignal);
  process.on("SIGINT", onSignal);
  const parent = opts.parentPid;
  // Its parent now, or gone already (while this process loaded, seconds on a loaded machine): managed. Alive and not its
  // parent: the variable was inherited by something the mesh did not start (a supervisor's daemon), which is not tied to it.
  if (parent !== undefined && (parent === process.ppid || !processExists(parent))) {
    const watch = setInterval(() => {
      if (process.ppid === parent) return;
      clearInterval(watch);
      if (!stopping) beginStop({ reason: `the process that started it (pid ${parent}) is gone` }, 0);
    }, PARENT_CHECK_MS);
    watch.unref();
  }

  try {
    service = await start(control);
  } catch (err) {
    log.error("start failed", { err });
    process.exitCode = 1;
    clearInterval(keepAlive);
    process.off("SIGTERM", onSignal);
    process.off("SIGINT", onSignal);
    throw err;
  }
  if (state === "starting") state = "running";
  log.info("running", service.info);
  if (opts.readyFile) writeFileAtomic(opts.readyFile, JSON.stringify({ pid: process.pid, ...service.info }) + "\n");
}

function processExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as { code?: unknown } | null)?.code === "EPERM";
  }
}

/** "host:port" → parts; a bare port listens on 127.0.0.1. */
export function parseHostPort(text: string, what: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(text) ?? /^()()(\d+)$/.exec(text);
  const port = m ? Number(m[3]) : NaN;
  if (!m || !(port >= 0 && port <= 65535)) throw new Error(`${what} ${JSON.stringify(text)} is not host:port`);
  return { host: m[1] || m[2] || "127.0.0.1", port };
}
