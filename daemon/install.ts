/**
 * The install root a supervised daemon runs from (docs/updates.md), and the
 * files through which the daemon and its supervisor (daemon/supervisor.ts)
 * hand an update over. Each side writes only its own files, each write
 * whole (a temporary file, synced, renamed), so a crash of either at any
 * point leaves the other something it can act on:
 *
 *   versions/<V>/         each release unpacked into its own directory
 *   current -> versions/<V>   what the supervisor starts; switched by rename
 *   previous -> versions/<V>  the version before the last update, kept
 *   update-request.json   daemon: "restart me into V" (task, from, to)
 *   running.json          daemon: "version V, pid P, is connected"
 *   update-result.json    supervisor: "V came up" or "V rolled back: why"
 *   probation-rollback.json  supervisor: "V crash-looped after its update; back to W"
 *
 * During a trial `current` keeps naming the version that ran: the new one
 * is started by its own path, and `current` switches only once it is up.
 */
import { closeSync, fsyncSync, mkdirSync, openSync, readFileSync, readlinkSync, renameSync, rmSync, symlinkSync, writeSync } from "node:fs";
import { basename, dirname, join } from "node:path";

export const INSTALL_ROOT_ENV = "REXMESH_INSTALL_ROOT";
/** The supervisor's health timeout (ms), told to the daemons it starts. */
export const HEALTH_TIMEOUT_ENV = "REXMESH_SUPERVISOR_HEALTH_TIMEOUT_MS";
/** The exit code with which a daemon asks its supervisor to restart it into a new version. */
export const EXIT_UPDATE = 75;

export interface UpdateRequest {
  taskId: string;
  hostId: string;
  from: string;
  to: string;
  at: number;
}

export interface UpdateResult {
  taskId: string;
  from: string;
  to: string;
  outcome: "updated" | "rolled-back";
  reason?: string;
  at: number;
}

/** A version that crash-looped after its update and was switched back from (the old daemon marks it bad). */
export interface ProbationRollback {
  version: string;
  previous: string;
  reason: string;
  at: number;
}

export interface Running {
  version: string;
  pid: number;
  at: number;
}

/** The paths of an install root. */
export function installPaths(root: string) {
  return {
    root,
    versions: join(root, "versions"),
    version: (v: string) => join(root, "versions", v),
    current: join(root, "current"),
    previous: join(root, "previous"),
    request: join(root, "update-request.json"),
    result: join(root, "update-result.json"),
    running: join(root, "running.json"),
    probation: join(root, "probation-rollback.json"),
  };
}
export type InstallPaths = ReturnType<typeof installPaths>;

/** Writes a file whole and durably: a temporary file, synced, renamed over, the directory synced. */
export function writeDurable(path: string, text: string): void {
  const tmp = `${path}.${process.pid}.tmp`;
  const fd = openSync(tmp, "w", 0o600);
  try {
    writeSync(fd, text);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, path);
  syncDir(dirname(path));
}

function syncDir(dir: string): void {
  const fd = openSync(dir, "r");
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** A JSON file's content when it is there and parses to an object with the string fields named; undefined otherwise. */
export function readJson<T>(path: string, fields: readonly (keyof T & string)[]): T | undefined {
  let value: unknown;
  try {
    value = JSON.parse(readFileSync(path, "utf8"));
  } catch {
    return undefined;
  }
  if (typeof value !== "object" || value === null) return undefined;
  for (const f of fields) if (typeof (value as Record<string, unknown>)[f] !== "string") return undefined;
  return value as T;
}

export function removeFile(path: string): void {
  rmSync(path, { force: true });
  syncDir(dirname(path));
}

/** The version a link (current, previous) names, or undefined when there is none. */
export function linkedVersion(link: string): string | undefined {
  try {
    return basename(readlinkSync(link));
  } catch {
    return undefined;
  }
}

/** Points a link at versions/<version>, atomically: a new link renamed over the old one. */
export function switchLink(paths: InstallPaths, link: string, version: string): void {
  mkdirSync(paths.versions, { recursive: true });
  const tmp = `${link}.${process.pid}.tmp`;
  rmSync(tmp, { force: true });
  symlinkSync(join("versions", version), tmp);
  renameSync(tmp, link);
  syncDir(paths.root);
}
