/**
 * /proc/<pid>/stat, the fields the daemon and its spawner use. Imports
 * nothing but Node's own modules: the spawner (daemon/spawner-main.ts) uses
 * it and must stay small.
 */
import { readFileSync } from "node:fs";

/** What a process's stat line says. */
export interface ProcStat {
  /** R, S, D, T, Z (zombie), X (dead), … */
  state: string;
  pgid: number;
  /** Kernel task flags (PF_*). */
  flags: number;
  /** Start time in clock ticks since boot (field 22): with the pid, names one process for good. */
  startTicks: number;
}

/** Parses a stat line. comm (field 2) may hold spaces and parentheses: fields are counted after the last ')'. */
export function parseStat(text: string): ProcStat {
  const rest = text.slice(text.lastIndexOf(")") + 2).split(" ");
  return { state: rest[0] ?? "?", pgid: Number(rest[2]), flags: Number(rest[6]), startTicks: Number(rest[19]) };
}

/** Reads /proc/<pid>/stat; undefined when the process is gone (or /proc cannot be read). */
export function readStat(pid: number): ProcStat | undefined {
  try {
    return parseStat(readFileSync(`/proc/${pid}/stat`, "latin1"));
  } catch {
    return undefined;
  }
}
