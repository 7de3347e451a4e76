// npm run bench — rexmesh's benchmark suite (issue 7).
//
// Every scenario starts real processes on loopback (controller, proxies,
// daemons or the host simulator, mTLS, LMDB), measures, and writes
// bench/results/<scenario>.json. A full run (no scenario named) also writes
// bench/results/summary.md with the table and bench/results/plots/*.svg.
//
//   node bench/run.mjs                       every scenario, in order
//   node bench/run.mjs durable-jobs --jobs 500   one scenario with its own sizes
//   node bench/run.mjs --list                the scenarios and their targets
//   node bench/run.mjs a b --summary         run a and b, then rebuild the summary from every result file
//   node bench/run.mjs --summary             only rebuild the summary
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { commit, machine } from "./lib/common.mjs";
import { barChart } from "./lib/plot.mjs";

/** The scenarios, in the order a full run takes them (files in bench/scenarios). */
const ORDER = [
  "daemon-idle-memory",
  "idle-streams",
  "ping-10k",
  "ping-50k",
  "ping-fanout-500",
  "hostname-500",
  "durable-jobs",
  "output-throughput",
  "sessions",
  "reconnect-storm",
];

const args = process.argv.slice(2);
const named = args.filter((a, i) => !a.startsWith("--") && !(i > 0 && args[i - 1].startsWith("--")));
const here = new URL(".", import.meta.url).pathname;
const results = join(here, "results");
mkdirSync(join(results, "plots"), { recursive: true });

const available = [];
for (const name of ORDER) {
  const file = join(here, "scenarios", `${name}.mjs`);
  if (existsSync(file)) available.push((await import(file)).default);
}
if (args.includes("--list")) {
  for (const s of available) process.stdout.write(`${s.name.padEnd(20)} ${s.target}\n`);
  process.exit(0);
}
for (const n of named) if (!available.some((s) => s.name === n)) throw new Error(`unknown scenario ${n} (${available.map((s) => s.name).join(", ")})`);
// `--summary` alone rebuilds the summary from the result files and runs nothing.
const chosen = named.length ? available.filter((s) => named.includes(s.name)) : args.includes("--summary") ? [] : available;

// A library may emit an 'error' nobody listens to (connect-node's HTTP/2 session, when its
// keep-alive PING times out against a controller that is too busy to answer): that must fail the
// scenario at hand, not kill the whole run.
process.on("uncaughtException", (err) => {
  process.stderr.write(`uncaught error during a scenario (it fails, the run goes on): ${err?.stack ?? err}\n`);
});

const runCommit = commit();
const runMachine = machine();
const started = Date.now();
for (const s of chosen) {
  process.stderr.write(`running ${s.name}: ${s.title}\n`);
  const t0 = Date.now();
  let record;
  try {
    const result = await s.run();
    record = { scenario: s.name, title: s.title, target: s.target, date: new Date().toISOString(), commit: runCommit, machine: runMachine, seconds: Math.round((Date.now() - t0) / 1000), result };
  } catch (err) {
    record = { scenario: s.name, title: s.title, target: s.target, date: new Date().toISOString(), commit: runCommit, machine: runMachine, seconds: Math.round((Date.now() - t0) / 1000), error: String(err?.stack ?? err) };
  }
  writeFileSync(join(results, `${s.name}.json`), JSON.stringify(record, null, 2) + "\n");
  process.stderr.write(`${s.name} (${record.seconds} s): ${record.error ?? JSON.stringify(record.result)}\n`);
}

if (!named.length || args.includes("--summary")) writeSummary();

/** Builds summary.md and the plots from every result file on disk. */
function writeSummary() {
  const rows = [];
  const plots = [];
  const notes = [];
  for (const s of available) {
    const file = join(results, `${s.name}.json`);
    if (!existsSync(file)) continue;
    const rec = JSON.parse(readFileSync(file, "utf8"));
    if (rec.error) {
      rows.push(`| ${s.title} | ${s.target} | failed: ${rec.error.split("\n")[0]} | ✗ | ${rec.commit}, ${rec.date.slice(0, 16).replace("T", " ")} |`);
      continue;
    }
    const v = s.verdict(rec.result);
    rows.push(`| ${s.title} | ${s.target} | ${v.figure} | ${v.met === undefined ? "–" : v.met ? "✓" : "✗"} | ${rec.commit}, ${rec.date.slice(0, 16).replace("T", " ")} |`);
    if (rec.result.notes) notes.push(`### ${s.name}\n\n${rec.result.notes}\n`);
    for (const [i, spec] of (s.plot ? [s.plot(rec.result)].flat() : []).entries()) {
      const name = `${s.name}${i ? `-${i}` : ""}.svg`;
      writeFileSync(join(results, "plots", name), barChart(spec));
      plots.push(`![${spec.title}](plots/${name})`);
    }
  }
  const m = runMachine;
  const md = [
    `# rexmesh benchmarks`,
    ``,
    `The latest result of each scenario (its commit and start time in the last column; this summary written ${new Date().toISOString().slice(0, 16).replace("T", " ")} UTC).`,
    `Machine: ${m.cpus} × ${m.cpu}, ${m.memGiB} GiB, Node ${m.node}, ${m.platform}, ${m.fdLimit} file descriptors per process.`,
    `Reproduce: \`npm run bench\` (all), or \`node bench/run.mjs <scenario> [--sizes]\` for one; raw figures in bench/results/<scenario>.json.`,
    ``,
    `| scenario | target | measured | met | commit, UTC |`,
    `| --- | --- | --- | --- | --- |`,
    ...rows,
    ``,
    ...(notes.length ? [`## Notes: bottlenecks and limits`, ``, ...notes] : []),
    `## Plots`,
    ``,
    ...plots.map((p) => `${p}\n`),
  ];
  writeFileSync(join(results, "summary.md"), md.join("\n"));
  process.stderr.write(md.join("\n") + "\n");
}
