/**
 * A step's process group, from the daemon: signalling it (after checking
 * that its number is still the step's) and telling whether a live member is
 * left in it.
 *
 * kill(-pgid, 0) alone counts zombies, which never go away under an init
 * that does not reap orphans (common in containers), and processes whose
 * death is under way; on Linux /proc tells them apart, at the cost of
 * reading every process's stat (some 40 µs each on a busy host). A step
 * being terminated is looked at now and then until its group is gone, and
 * one daemon process serves many hosts: when each look scanned /proc on its
 * own, 300 tasks timed out at once (processes ignoring SIGTERM) took the
 * daemon's whole CPU, 4 scans a second each, and ended 10 s past their two
 * kill graces. Periodic looks now share a scan ({@link LiveGroups.polled});
 * a look after an event (an exit) still scans afresh.
 */
import { readdirSync } from "node:fs";
import type { Clock } from "../common/clock.js";
import { SCAN_SHARE, sameGroup, type GroupRef } from "./orphans.js";
import { readStat } from "./proc-stat.js";

/** Linux task flag: the task is inside exit() and cannot come back. */
const PF_EXITING = 0x4;

/**
 * Sends sig (0: only probe) to every member of the group; false when the
 * group no longer exists, or its number is another process's now (see
 * sameGroup: with a spawner, the daemon learns of the leader's reaping late).
 */
export function signalGroup(group: GroupRef, sig: NodeJS.Signals | 0): boolean {
  if (!sameGroup(group)) return false;
  try {
    process.kill(-group.pgid, sig);
    return true;
  } catch (err) {
    // EPERM: some member runs as another user (e.g. a setuid program); the
    // group exists but is beyond reach.
    return (err as { code?: unknown } | null)?.code !== "ESRCH";
  }
}

/** Which groups have a live member (neither a zombie nor exiting), by one scan of /proc; undefined when /proc cannot be listed. */
function scanLiveGroups(): Set<number> | undefined {
  let entries: string[];
  try {
    entries = readdirSync("/proc");
  } catch {
    return undefined;
  }
  const live = new Set<number>();
  for (const entry of entries) {
    if (!/^\d+$/.test(entry)) continue;
    const s = readStat(Number(entry));
    // Gone while we looked, or neither alive nor coming back.
    if (s === undefined || s.state === "Z" || s.state === "X" || (s.flags & PF_EXITING) !== 0) continue;
    live.add(s.pgid);
  }
  return live;
}

/**
 * Tells whether a group has a live member. One per clock (so per daemon
 * process: its executors share it), see {@link liveGroupsOf}.
 */
export class LiveGroups {
  private last: { at: number; tookMs: number; live: ReadonlySet<number> } | undefined;

  constructor(private readonly clock: Clock) {}

  /** Scans now: for a look after an event, which decides what happens next (a stale "live" would start a termination). */
  has(group: GroupRef): boolean {
    return this.check(group, 0, Infinity);
  }

  /**
   * For a look repeated every intervalMs until the group is gone, by a
   * caller that knew the group to exist at `since` (its signal reached it):
   * a scan taken after that and younger than intervalMs (or than SCAN_SHARE
   * times a scan's duration) serves. Such a scan only delays: a group with
   * no live member then never gets one again (only a live member could add
   * one), and a stale "live" is looked at again at the next poll. An older
   * scan could predate the group and miss it: it is not used.
   */
  polled(group: GroupRef, intervalMs: number, since: number): boolean {
    return this.check(group, intervalMs, since);
  }

  private check(group: GroupRef, maxAgeMs: number, since: number): boolean {
    if (!signalGroup(group, 0)) return false;
    if (process.platform !== "linux") return true;
    const last = this.last;
    const now = this.clock.now();
    if (last !== undefined && last.at > since && now >= last.at && now - last.at < Math.max(maxAgeMs, SCAN_SHARE * last.tookMs)) return last.live.has(group.pgid);
    const live = scanLiveGroups();
    // /proc unreadable: it cannot be told, so the group is taken as live (a SIGKILL after the grace settles it).
    if (live === undefined) return true;
    this.last = { at: now, tookMs: this.clock.now() - now, live };
    return live.has(group.pgid);
  }
}

const perClock = new WeakMap<Clock, LiveGroups>();

/** The LiveGroups of a clock: every executor of a daemon process (one clock) shares its scans. */
export function liveGroupsOf(clock: Clock): LiveGroups {
  let g = perClock.get(clock);
  if (g === undefined) perClock.set(clock, (g = new LiveGroups(clock)));
  return g;
}
