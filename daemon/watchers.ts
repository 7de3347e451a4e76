/**
 * The built-in watchers a daemon runs for the events it reports
 * (docs/triggers.md): a command whose exit code changed between runs, a
 * systemd unit that left `active` (a command watcher over `systemctl
 * is-active`), a file that changed (mtime, size, SHA-256), and a disk
 * above a usage threshold (statfs). They are configured on the host, in
 * the file the daemon's `watch` option names: a watcher runs commands as
 * the daemon, so what it runs is decided by whoever configures the host,
 * never sent over the mesh.
 *
 * Each watcher polls on its own interval (at least 1 s), one poll at a
 * time; its first poll sets what later ones compare with (a service found
 * not active, or a disk found full, is reported at once). State is in
 * memory: after a restart the first poll sets it again.
 */
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { stat, statfs } from "node:fs/promises";
import { parseYaml } from "../common/config.js";
import { readFileSync } from "node:fs";
import type { Clock, Timer } from "../common/clock.js";
import { parseDuration } from "../common/duration.js";
import { ConfigError } from "../common/errors.js";
import { eventNameProblem } from "../common/host-event.js";
import { LIMITS } from "../common/limits.js";
import type { Logger } from "../common/logger.js";

export type WatcherKind = "command" | "service" | "file" | "disk";

export interface WatcherSpec {
  name: string;
  kind: WatcherKind;
  everyMs: number;
  /** command: what runs (argv, no shell); service: overrides `systemctl is-active --quiet UNIT`. */
  command?: string[];
  /** service: the unit. */
  unit?: string;
  /** file: the file; disk: a path on the filesystem. */
  path?: string;
  /** disk: the threshold, percent used (1-100). */
  above?: number;
  /** command: the kind of the event it reports (default command.changed). */
  event?: string;
}

/** Files at most this large are hashed; larger ones are compared by mtime and size only. */
const HASH_MAX_BYTES = 64 * 1024 * 1024;
const ARGS_MAX = 64;
const ARG_CHARS = 4096;

const KINDS: readonly WatcherKind[] = ["command", "service", "file", "disk"];
const KEYS: Record<WatcherKind, readonly string[]> = {
  command: ["name", "command", "every", "event"],
  service: ["name", "unit", "command", "every"],
  file: ["name", "path", "every"],
  disk: ["name", "path", "above", "every"],
};

/** Reads and checks a watch file: `watchers:` a list of watchers (docs/triggers.md); ConfigError naming what is wrong. */
export function readWatchFile(path: string): WatcherSpec[] {
  let data: unknown;
  try {
    data = parseYaml(readFileSync(path, "utf8"));
  } catch (cause) {
    throw new ConfigError(`watch file ${path}: ${(cause as Error).message}`, { cause });
  }
  return parseWatchers(data, path);
}

export function parseWatchers(data: unknown, where: string): WatcherSpec[] {
  const top = data as { watchers?: unknown } | null;
  if (!top || typeof top !== "object" || Array.isArray(top) || Object.keys(top).some((k) => k !== "watchers")) throw new ConfigError(`${where}: must be a mapping with one key, watchers (a list)`);
  if (!Array.isArray(top.watchers)) throw new ConfigError(`${where}: watchers must be a list`);
  if (top.watchers.length > LIMITS.watchersPerHost) throw new ConfigError(`${where}: ${top.watchers.length} watchers; at most ${LIMITS.watchersPerHost}`);
  const names = new Set<string>();
  return top.watchers.map((raw: unknown, i: number) => {
    const at = `${where}: watchers[${i}]`;
    if (!raw || typeof raw !== "object" || Array.isArray(raw)) throw new ConfigError(`${at} must be a mapping`);
    const w = raw as Record<string, unknown>;
    if (typeof w.kind !== "string" || !KINDS.includes(w.kind as WatcherKind)) throw new ConfigError(`${at}: kind must be one of ${KINDS.join(", ")}`);
    const k = w.kind as WatcherKind;
    for (const key of Object.keys(w)) if (key !== "kind" && !KEYS[k].includes(key)) throw new ConfigError(`${at}: unknown key ${JSON.stringify(key)} for a ${k} watcher (known: ${KEYS[k].join(", ")})`);
    const name = str(w.name, `${at}: name`);
    const bad = eventNameProblem("name", name);
    if (bad) throw new ConfigError(`${at}: ${bad}`);
    if (names.has(name)) throw new ConfigError(`${at}: a second watcher named ${name}`);
    names.add(name);
    let everyMs: number;
    try {
      everyMs = w.every === undefined ? 30_000 : typeof w.every === "number" ? w.every * 1000 : parseDuration(str(w.every, `${at}: every`));
    } catch {
      throw new ConfigError(`${at}: every must be a duration like 30s`);
    }
    if (!(everyMs >= LIMITS.watchIntervalMinMs && everyMs <= 24 * 3600_000)) throw new ConfigError(`${at}: every must be from 1s to 24h`);
    const spec: WatcherSpec = { name, kind: k, everyMs };
    if (w.command !== undefined) {
      if (!Array.isArray(w.command) || w.command.length === 0 || w.command.length > ARGS_MAX || !w.command.every((a) => typeof a === "string" && a.length <= ARG_CHARS)) {
        throw new ConfigError(`${at}: command must be a list of 1 to ${ARGS_MAX} strings (argv, no shell)`);
      }
      spec.command = w.command as string[];
    }
    if (k === "command" && !spec.command) throw new ConfigError(`${at}: a command watcher needs command`);
    if (k === "command" && w.event !== undefined) {
      spec.event = str(w.event, `${at}: event`);
      const why = eventNameProblem("event", spec.event);
      if (why) throw new ConfigError(`${at}: ${why}`);
    }
    if (k === "service") {
      spec.unit = str(w.unit, `${at}: unit`);
      if (!/^[A-Za-z0-9@._:-]{1,200}$/.test(spec.unit)) throw new ConfigError(`${at}: unit ${JSON.stringify(spec.unit.slice(0, 80))} is not a unit name`);
    }
    if (k === "file" || k === "disk") {
      spec.path = str(w.path, `${at}: path`);
      if (!spec.path.startsWith("/") || spec.path.length > 1024) throw new ConfigError(`${at}: path must be absolute, at most 1024 characters`);
    }
    if (k === "disk") {
      if (typeof w.above !== "number" || !(w.above > 0 && w.above <= 100)) throw new ConfigError(`${at}: above must be a percentage from 1 to 100`);
      spec.above = w.above;
    }
    return spec;
  });
}

function str(v: unknown, what: string): string {
  if (typeof v !== "string" || v === "") throw new ConfigError(`${what} must be a non-empty string`);
  return v;
}

/** Runs argv without a shell; resolves with its exit code (-1: it could not run, or ran past the limit). */
export type CommandRunner = (argv: readonly string[], timeoutMs: number) => Promise<number>;

export const runCommand: CommandRunner = (argv, timeoutMs) =>
  new Promise((resolve) => {
    // Its own process group, its output not read (only the exit code counts, however much it prints), and on the
    // timeout the whole group killed: what a hung check started (curl, ssh, a df on a dead NFS mount) goes with it.
    let child: ReturnType<typeof spawn>;
    try {
      child = spawn(argv[0]!, argv.slice(1), { detached: true, stdio: "ignore" });
    } catch {
      resolve(-1);
      return;
    }
    const killGroup = () => {
      try {
        if (child.pid !== undefined) process.kill(-child.pid, "SIGKILL");
      } catch {
        // already gone
      }
    };
    const timer = setTimeout(killGroup, timeoutMs);
    child.once("error", () => {
      clearTimeout(timer);
      resolve(-1);
    });
    child.once("exit", (code) => {
      clearTimeout(timer);
      // Whatever it left behind in its group goes too: a check must not leave processes running.
      killGroup();
      resolve(code ?? -1);
    });
  });

export interface WatchersOptions {
  specs: readonly WatcherSpec[];
  clock: Clock;
  log: Logger;
  /** Reports an event (Agent.reportEvent makes, signs and keeps it); resolves once it is durable. */
  report(watcher: string, kind: string, details: Record<string, string>): Promise<void>;
  run?: CommandRunner;
}

/** What a watcher saw last: an exit code, a file's state, whether a disk was above its threshold. */
type Seen = { exit: number } | { file: string } | { full: boolean };

/** Runs a host's watchers until stopped. */
export class Watchers {
  private readonly timers = new Map<string, Timer>();
  private readonly seen = new Map<string, Seen>();
  private stopped = false;
  private readonly run: CommandRunner;

  constructor(private readonly opts: WatchersOptions) {
    this.run = opts.run ?? runCommand;
  }

  start(): void {
    for (const spec of this.opts.specs) this.schedule(spec, 0);
  }

  stop(): void {
    this.stopped = true;
    for (const t of this.timers.values()) t.cancel();
    this.timers.clear();
  }

  private schedule(spec: WatcherSpec, delay: number): void {
    if (this.stopped) return;
    this.timers.set(
      spec.name,
      this.opts.clock.setTimeout(() => {
        this.poll(spec)
          .catch((err: unknown) => this.opts.log.warn("a watcher's poll failed", { watcher: spec.name, err }))
          .finally(() => this.schedule(spec, spec.everyMs));
      }, delay),
    );
  }

  /** One poll of one watcher; reports what changed since the last. */
  async poll(spec: WatcherSpec): Promise<void> {
    const before = this.seen.get(spec.name);
    switch (spec.kind) {
      case "command": {
        const exit = await this.run(spec.command!, LIMITS.watchCommandMs);
        this.seen.set(spec.name, { exit });
        if (before && "exit" in before && before.exit !== exit) {
          await this.opts.report(spec.name, spec.event ?? "command.changed", { command: clip(spec.command!.join(" ")), exit: String(exit), previous: String(before.exit) });
        }
        return;
      }
      case "service": {
        const exit = await this.run(spec.command ?? ["systemctl", "is-active", "--quiet", spec.unit!], LIMITS.watchCommandMs);
        this.seen.set(spec.name, { exit });
        const was = before && "exit" in before ? before.exit : 0;
        if (was === 0 && exit !== 0) await this.opts.report(spec.name, "service.failed", { unit: spec.unit!, exit: String(exit) });
        else if (before && was !== 0 && exit === 0) await this.opts.report(spec.name, "service.recovered", { unit: spec.unit! });
        return;
      }
      case "file": {
        const state = await fileState(spec.path!);
        this.seen.set(spec.name, { file: JSON.stringify(state) });
        if (before && "file" in before && before.file !== JSON.stringify(state)) await this.opts.report(spec.name, "file.changed", { path: clip(spec.path!), ...state });
        return;
      }
      case "disk": {
        const fs = await statfs(spec.path!);
        const used = fs.blocks - fs.bfree;
        const percent = used + fs.bavail > 0 ? (used / (used + fs.bavail)) * 100 : 0;
        const full = percent > spec.above!;
        this.seen.set(spec.name, { full });
        const wasFull = before && "full" in before ? before.full : false;
        if (full && !wasFull) await this.opts.report(spec.name, "disk.full", { path: clip(spec.path!), used_percent: percent.toFixed(1), threshold: String(spec.above) });
        return;
      }
    }
  }
}

async function fileState(path: string): Promise<Record<string, string>> {
  let s;
  try {
    s = await stat(path);
  } catch {
    return { exists: "false" };
  }
  const out: Record<string, string> = { exists: "true", size: String(s.size), mtime: new Date(s.mtimeMs).toISOString() };
  if (s.isFile() && s.size <= HASH_MAX_BYTES) {
    const hash = createHash("sha256");
    for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
    out.sha256 = hash.digest("hex");
  }
  return out;
}

function clip(s: string): string {
  return s.length > LIMITS.eventDetailValueChars ? `${s.slice(0, LIMITS.eventDetailValueChars - 1)}…` : s;
}
