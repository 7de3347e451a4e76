// node bench/micro/leftover-scans.mjs [--others 200] [--searches 36]: the daemon's search for what tasks left
// running (daemon/orphans.ts), with --others sleeping processes on the host: the searches asked in one turn
// answered by one shared scan of /proc, against one scan each (as before fb14c7f). Wall time and this
// process's CPU. The daemon as built in dist/ (npm run build first).
import { spawn } from "node:child_process";
import { parseArgs } from "node:util";
import { systemClock } from "../../dist/common/clock.js";
import { MarkedScans } from "../../dist/daemon/orphans.js";

const { values } = parseArgs({ options: { others: { type: "string", default: "200" }, searches: { type: "string", default: "36" } } });
const others = Number(values.others);
const searches = Number(values.searches);
// Other processes, each with an environment of a few KiB to read.
const kids = Array.from({ length: others }, () => spawn("/bin/sleep", ["120"], { detached: true, stdio: "ignore", env: { PATH: "/usr/bin:/bin", REXMESH_TASK_ID: "t-other", FILLER: "x".repeat(2000) } }));
try {
  await new Promise((r) => setTimeout(r, 1500));
  const measure = async (fn) => {
    const c0 = process.cpuUsage();
    const t0 = performance.now();
    await fn();
    const c = process.cpuUsage(c0);
    return `${(performance.now() - t0).toFixed(0)} ms wall, ${((c.user + c.system) / 1000).toFixed(0)} ms CPU`;
  };
  const shared = new MarkedScans({ ...systemClock });
  const one = await measure(() => Promise.all(Array.from({ length: searches }, (_, i) => shared.find(`REXMESH_TASK_ID=t-${i}`, []))));
  const each = await measure(async () => {
    for (let i = 0; i < searches; i++) await new MarkedScans({ ...systemClock }).find(`REXMESH_TASK_ID=t-${i}`, []);
  });
  console.log(`${searches} searches for leftovers, ${others} other processes on the host: one shared scan (${shared.scans}) ${one}; one scan each ${each}`);
} finally {
  for (const k of kids) process.kill(k.pid, "SIGKILL");
}
