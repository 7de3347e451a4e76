import { describe, expect, it } from "vitest";
import { FAULT_KINDS, makePlan } from "../../chaos/plan.js";
import { formatResult, runSeed } from "../../chaos/run.js";

/**
 * A short fixed set of chaos schedules run in CI (docs/chaos.md): two seeds of
 * 33 s of faults each, chosen so that together they strike every
 * kind of fault. Longer and more runs are `npm run chaos`, not CI.
 */
const SEEDS = [13, 36];
const MINUTES = 0.55;
/** Shorter than the harness default (20 s) so that a host-lost fault fits in so short a schedule. */
const LOST_AFTER_MS = 15_000;

describe("chaos: fixed seeds", () => {
  it("strike every kind of fault between them", () => {
    const kinds = new Set(SEEDS.flatMap((seed) => makePlan({ seed, minutes: MINUTES, lostAfterMs: LOST_AFTER_MS }).faults.map((f) => f.kind)));
    expect([...kinds].sort()).toEqual([...FAULT_KINDS].sort());
  });

  for (const seed of SEEDS) {
    it(`seed ${seed}: every task ends in its bound, spawns at most once, and nothing acknowledged is lost or changed (I1–I4)`, async () => {
      const r = await runSeed({ seed, minutes: MINUTES, bounds: { lostAfterMs: LOST_AFTER_MS } });
      expect(r.stats.accepted, formatResult(r)).toBe(r.stats.jobs);
      expect(r.violations.length, formatResult(r, 10)).toBe(0);
    }, 300_000);
  }
});
