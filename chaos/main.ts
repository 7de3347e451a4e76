import { parseArgs } from "node:util";
import { systemClock } from "../common/clock.js";
import { DEFAULT_BOUNDS } from "./checker.js";
import { describeFault, makePlan } from "./plan.js";
import { formatResult, runSeed } from "./run.js";

const USAGE = `npm run chaos -- [--seed N | --seeds A..B | --count K] [--minutes M] [options]

Runs seeded fault schedules against a real mesh and checks invariants I1-I4
(docs/chaos.md). One line per seed, then a total; exits 1 if any seed failed.

  --seed N          one seed (with --count K: K seeds from N)
  --seeds A..B      every seed from A to B
  --count K         K seeds (from --seed, or from 1)
  --minutes M       length of each schedule's fault phase (default 1; fractions allowed)
  --lost-after S    the jobs' lost_after and the I1 bound's L, seconds (default ${DEFAULT_BOUNDS.lostAfterMs / 1000})
  --slack S         I1 slack after the last heal, seconds (default ${DEFAULT_BOUNDS.slackMs / 1000})
  --cancel-bound S  time from CancelJob's return to terminal, seconds (default ${DEFAULT_BOUNDS.cancelMs / 1000})
  --dir DIR         where mesh directories go (default: the temp dir)
  --keep            keep every mesh directory (failed runs are always kept)
  --plan            print each seed's schedule and exit without running anything
  --no-faults       the workload alone, no fault: a control run that must pass
  --verbose         print the schedule's events as they happen
  --stop-on-failure stop after the first failing seed
  --show N          violations printed per invariant (default 5)
`;

function seconds(v: string | undefined, name: string, dflt: number): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0) throw new Error(`--${name} must be a positive number of seconds`);
  return Math.round(n * 1000);
}

function seedList(v: Record<string, string | boolean | undefined>): number[] {
  const int = (s: string, name: string) => {
    const n = Number(s);
    if (!Number.isInteger(n) || n < 0 || n > 0xffffffff) throw new Error(`${name} must be a whole number from 0 to 2^32-1`);
    return n;
  };
  if (typeof v.seeds === "string") {
    const m = /^(\d+)\.\.(\d+)$/.exec(v.seeds);
    if (!m) throw new Error("--seeds takes A..B");
    const [a, b] = [int(m[1]!, "--seeds"), int(m[2]!, "--seeds")];
    if (b < a || b - a >= 100_000) throw new Error("--seeds A..B needs A <= B and at most 100000 seeds");
    return Array.from({ length: b - a + 1 }, (_, i) => a + i);
  }
  const first = typeof v.seed === "string" ? int(v.seed, "--seed") : 1;
  const count = typeof v.count === "string" ? int(v.count, "--count") : 1;
  if (count < 1 || count > 100_000) throw new Error("--count must be from 1 to 100000");
  return Array.from({ length: count }, (_, i) => first + i);
}

async function main(argv: string[]): Promise<number> {
  const { values: v } = parseArgs({
    args: argv,
    options: {
      seed: { type: "string" },
      seeds: { type: "string" },
      count: { type: "string" },
      minutes: { type: "string" },
      "lost-after": { type: "string" },
      slack: { type: "string" },
      "cancel-bound": { type: "string" },
      dir: { type: "string" },
      keep: { type: "boolean" },
      plan: { type: "boolean" },
      "no-faults": { type: "boolean" },
      verbose: { type: "boolean" },
      "stop-on-failure": { type: "boolean" },
      show: { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (v.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  const seeds = seedList(v);
  const minutes = v.minutes === undefined ? 1 : Number(v.minutes);
  if (!Number.isFinite(minutes) || minutes <= 0 || minutes > 24 * 60) throw new Error("--minutes must be a positive number (at most a day)");
  const bounds = {
    lostAfterMs: seconds(v["lost-after"], "lost-after", DEFAULT_BOUNDS.lostAfterMs),
    slackMs: seconds(v.slack, "slack", DEFAULT_BOUNDS.slackMs),
    cancelMs: seconds(v["cancel-bound"], "cancel-bound", DEFAULT_BOUNDS.cancelMs),
  };

  if (v.plan) {
    for (const seed of seeds) {
      const plan = makePlan({ seed, minutes, lostAfterMs: bounds.lostAfterMs, noFaults: v["no-faults"] });
      process.stdout.write(`seed ${seed}: ${plan.faults.length} faults, ${plan.jobs.length} jobs\n`);
      for (const f of plan.faults) process.stdout.write(`  +${(f.at / 1000).toFixed(1)}s fault ${f.id}: ${describeFault(f)}\n`);
      for (const j of plan.jobs.filter((x) => x.purpose === "deadline" || x.cancelAt !== undefined)) {
        process.stdout.write(`  +${(j.at / 1000).toFixed(1)}s job #${j.index} ${j.purpose} of fault ${j.fault} on ${j.hosts.join(",")}${j.cancelAt !== undefined ? `, cancelled at +${(j.cancelAt / 1000).toFixed(1)}s` : ""}\n`);
      }
    }
    return 0;
  }

  const show = v.show === undefined ? 5 : Number(v.show);
  if (!Number.isInteger(show) || show < 0) throw new Error("--show must be a whole number");
  const abort = new AbortController();
  const onSignal = () => abort.abort(new Error("interrupted"));
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  const failed: number[] = [];
  let ran = 0;
  const started = systemClock.now();
  for (const seed of seeds) {
    if (abort.signal.aborted) break;
    try {
      const r = await runSeed({ seed, minutes, bounds, noFaults: v["no-faults"], baseDir: v.dir, keep: v.keep, signal: abort.signal, progress: v.verbose ? (l) => process.stderr.write(`${l}\n`) : undefined });
      ran++;
      process.stdout.write(`${formatResult(r, show)}\n`);
      if (!r.ok) failed.push(seed);
    } catch (err) {
      if (abort.signal.aborted) break;
      ran++;
      failed.push(seed);
      process.stdout.write(`seed ${seed}: ERROR ${(err as Error).stack ?? err}\n  replay: npm run chaos -- --seed ${seed} --minutes ${minutes}\n`);
    }
    if (failed.length > 0 && v["stop-on-failure"]) break;
  }
  const took = ((systemClock.now() - started) / 60_000).toFixed(1);
  process.stdout.write(`total: ${ran} seed(s) in ${took} min, ${ran - failed.length} ok, ${failed.length} failed${failed.length ? ` (seeds ${failed.join(", ")})` : ""}${abort.signal.aborted ? " — interrupted" : ""}\n`);
  return failed.length > 0 || abort.signal.aborted ? 1 : 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: Error) => {
    process.stderr.write(`chaos: ${err.message}\n\n${USAGE}`);
    process.exit(2);
  },
);
