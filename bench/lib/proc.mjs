// CPU of a process from /proc, with no dependency on the build (dist/): the
// baselines run on their own too (node bench/baselines/nats.mjs).
import { readFileSync } from "node:fs";

/** CPU ms a process has used so far: its own (utime + stime) and its reaped children's (cutime + cstime); zeros when it is gone. */
export function procCpu(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    const tick = 10; // ms per clock tick (CLK_TCK 100)
    return { self: (Number(f[11]) + Number(f[12])) * tick, children: (Number(f[13]) + Number(f[14])) * tick };
  } catch {
    return { self: 0, children: 0 };
  }
}

/** CPU time (user + system) a process has used so far, in ms. */
export const cpuMs = (pid) => procCpu(pid).self;
