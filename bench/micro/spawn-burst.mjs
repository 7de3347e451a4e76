// node bench/micro/spawn-burst.mjs [--steps 36] [--main FILE] [--process-start posix_spawn|fork]: a burst of steps started through the daemon's spawner
// (daemon/spawner.ts), each `sh -c 'echo; sleep 0.3; echo'`: when each one's start (SPAWNED) and exit reached
// the daemon's side, from the launch; beside it, the same number of spawn() calls from this process, which
// tells what a fork costs on this machine. The spawner's own CPU and its children's (the steps' processes) are read
// from /proc. The daemon as built in dist/ (npm run build first).
import { spawn } from "node:child_process";
import { parseArgs } from "node:util";
import { systemClock } from "../../dist/common/clock.js";
import { silentLogger } from "../../dist/common/logger.js";
import { Spawner } from "../../dist/daemon/spawner.js";
import { pct, procCpu } from "../lib/common.mjs";

const q = (xs, p) => pct(xs, p).toFixed(0);

// --main FILE: another build of the spawner's script beside dist/daemon's (an A/B of two versions in one sitting).
// --process-start: how the spawner starts processes (SpawnerOptions.processStart).
const { values } = parseArgs({ options: { steps: { type: "string", default: "36" }, main: { type: "string" }, "process-start": { type: "string", default: "posix_spawn" } } });
const n = Number(values.steps);
const script = ["-c", "echo begin; sleep 0.3; echo end"];

const spawner = new Spawner({ clock: systemClock, log: silentLogger, processStart: values["process-start"], ...(values.main ? { mainPath: values.main } : {}) });
// The spawner's pipes do not keep a process alive (the daemon's links do): this does, while it runs.
const keep = setInterval(() => {}, 1000);
spawner.start();
while (!spawner.ready) await new Promise((r) => setTimeout(r, 10));
const spawned = [];
const exited = [];
const t0 = performance.now();
await Promise.all(
  Array.from({ length: n }, () => new Promise((resolve) => {
    const at = performance.now();
    spawner.launch({ program: "/bin/sh", args: script, env: { PATH: process.env.PATH ?? "/usr/bin:/bin" }, stdin: new Uint8Array() }, {
      spawned: () => spawned.push(performance.now() - at),
      failed: (f) => resolve(console.error("failed", f)),
      data: () => {},
      closed: () => {},
      exited: () => resolve(exited.push(performance.now() - at)),
      lost: (why) => resolve(console.error("lost", why)),
    });
  })),
);
const through = performance.now() - t0;
// The steps' exits were read, so the spawner has reaped them all: its children's CPU is theirs.
const cpu = procCpu(spawner.pid);
spawner.stop();
clearInterval(keep);

const s0 = performance.now();
const direct = Array.from({ length: n }, () => {
  const c = spawn("/bin/sh", script, { detached: true, stdio: ["pipe", "pipe", "pipe"] });
  c.stdout.resume();
  c.stderr.resume();
  c.stdin.end();
  return new Promise((r) => c.on("close", r));
});
const calls = performance.now() - s0;
await Promise.all(direct);
console.log(
  `${n} steps through the spawner: started (SPAWNED read) p50 ${q(spawned, 50)} ms, first ${q(spawned, 0)}, last ${q(spawned, 100)}; ` +
    `exited p50 ${q(exited, 50)}, last ${q(exited, 100)} ms; all in ${through.toFixed(0)} ms; ` +
    `spawner (${values["process-start"]}) CPU ${(cpu.self / n).toFixed(2)} ms per step, its children ${(cpu.children / n).toFixed(2)} ms each. ` +
    `${n} spawn() calls from this process: ${calls.toFixed(0)} ms (${(calls / n).toFixed(1)} ms each)`,
);
