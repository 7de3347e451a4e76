// Baseline: the bare cost of spawning the same processes locally.
//
//   seq N | xargs -P 8 -I{} hostname
//
// `-I{}` with no `{}` in the command runs `hostname` with no argument once
// per input line (`xargs -n1 hostname` would pass the number as an argument,
// which *sets* the hostname when run as root). Output goes to a pipe that is
// counted, so every run proves it ran N processes. Several runs; median.
//
//   node bench/baselines/spawn.mjs [--count 500] [--parallel 8] [--runs 5]
import { spawn } from "node:child_process";
import { which } from "./install.mjs";

function once(count, parallel, command) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const child = spawn("sh", ["-c", `seq ${count} | xargs -P ${parallel} -I{} ${command}`], { stdio: ["ignore", "pipe", "pipe"] });
    let lines = 0;
    let err = "";
    child.stdout.on("data", (b) => {
      for (const c of b) if (c === 10) lines++;
    });
    child.stderr.on("data", (b) => (err += b));
    const timer = setTimeout(() => child.kill("SIGKILL"), 120_000);
    child.on("error", reject);
    child.on("close", (code) => {
      clearTimeout(timer);
      const ms = performance.now() - t0;
      if (code !== 0) return reject(new Error(`xargs exited ${code}: ${err.trim()}`));
      resolve({ ms, lines });
    });
  });
}

/**
 * Times `seq count | xargs -P parallel -I{} command` (command without
 * arguments, one output line each) `runs` times.
 * → { available, skipped?, count, parallel, command, runsMs, medianMs, bestMs }
 */
export async function xargsSpawn({ count = 500, parallel = 8, command = "hostname", runs = 5 } = {}) {
  const base = { count, parallel, command, form: `seq ${count} | xargs -P ${parallel} -I{} ${command}` };
  for (const b of ["xargs", "seq", command.split(" ")[0]]) if (!which(b)) return { available: false, skipped: `${b} not found`, ...base };
  await once(Math.min(count, 20), parallel, command); // warm the page cache
  const runsMs = [];
  for (let i = 0; i < runs; i++) {
    const r = await once(count, parallel, command);
    if (r.lines !== count) throw new Error(`xargs run gave ${r.lines} lines, expected ${count}`);
    runsMs.push(Math.round(r.ms * 10) / 10);
  }
  const sorted = [...runsMs].sort((a, b) => a - b);
  return { available: true, ...base, runsMs, medianMs: sorted[Math.floor(sorted.length / 2)], bestMs: sorted[0] };
}

// The probe: a Node process that first touches `ballast` MiB (to have the
// resident size of a busy daemon), then spawns `n` × hostname at once the way
// the daemon's executor does (detached, three pipes), and reports its own CPU.
const PROBE = `
import { spawn } from "node:child_process";
const [n, ballast] = process.argv.slice(1).map(Number);
const keep = Array.from({ length: ballast }, () => Buffer.alloc(1 << 20, 1));
const rssMiB = Math.round(process.memoryUsage().rss / 2 ** 20);
const c0 = process.cpuUsage();
let inSpawn = 0;
const t0 = performance.now();
await Promise.all(Array.from({ length: n }, () => new Promise((res) => {
  const s = performance.now();
  const c = spawn("hostname", [], { detached: true, stdio: ["pipe", "pipe", "pipe"] });
  inSpawn += performance.now() - s;
  c.stdout.resume(); c.stderr.resume(); c.on("close", res);
})));
const cpu = process.cpuUsage(c0);
process.stdout.write(JSON.stringify({ rssMiB, n, wallMs: Math.round(performance.now() - t0), blockedInSpawnMsEach: +(inSpawn / n).toFixed(2), parentCpuMsEach: +((cpu.user + cpu.system) / 1000 / n).toFixed(2), keep: keep.length }));
`;

/**
 * What one child_process.spawn costs a Node process of a given resident size
 * (fork copies the parent's page tables, so it grows with RSS):
 * → [{ rssMiB, n, wallMs, blockedInSpawnMsEach, parentCpuMsEach }] for each ballast.
 */
export async function nodeSpawnProbe({ count = 100, ballastsMiB = [0, 100] } = {}) {
  const out = [];
  for (const b of ballastsMiB) {
    const r = await new Promise((resolve) => {
      const child = spawn(process.execPath, ["--input-type=module", "-e", PROBE, String(count), String(b)], { stdio: ["ignore", "pipe", "pipe"] });
      let text = "";
      child.stdout.on("data", (d) => (text += d));
      const timer = setTimeout(() => child.kill("SIGKILL"), 60_000);
      child.on("close", () => {
        clearTimeout(timer);
        try {
          const { keep, ...rest } = JSON.parse(text);
          resolve(rest);
        } catch {
          resolve({ ballastMiB: b, error: "probe failed" });
        }
      });
    });
    out.push(r);
  }
  return out;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const arg = (n, d) => {
    const i = process.argv.indexOf(`--${n}`);
    return i < 0 ? d : Number(process.argv[i + 1]);
  };
  const r = await xargsSpawn({ count: arg("count", 500), parallel: arg("parallel", 8), runs: arg("runs", 5) });
  process.stdout.write(JSON.stringify(r, null, 2) + "\n");
}
