/**
 * PositionLog: a backlog's items in memory, read after a position (what a
 * proxy's sender does once per turn while a fleet answers a ping). Checked
 * against a plain list under seeded mixes of adds, removals and reads, and
 * for what removals leave behind.
 */
import { describe, expect, it } from "vitest";
import { Prng } from "../../chaos/prng.js";
import { PositionLog, type UpwardItem } from "../../common/backlog.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { status } from "./support.js";

const item = (n: number): UpwardItem => ({ kind: "status", status: status(`t${n}`, TaskState.SUCCEEDED), volatile: true });
const positions = (it: Iterable<{ n: number }>) => Array.from(it, (e) => e.n);

describe("PositionLog", () => {
  it.each([1, 2, 3, 4, 5])("reads, after any position, exactly the items a plain list holds above it (seed %i)", (seed) => {
    const rnd = new Prng(seed);
    const log = new PositionLog();
    let model: number[] = [];
    let next = 1;
    for (let step = 0; step < 20_000; step++) {
      const r = rnd.next();
      if (r < 0.45) {
        // Positions rise, with gaps (a backlog numbers written and volatile items alike).
        next += 1 + Math.floor(rnd.next() * 3);
        log.add(next, item(next));
        model.push(next);
      } else if (r < 0.9) {
        // Mostly from the front (acks come roughly in order), sometimes from anywhere, sometimes a position not held.
        const pick = rnd.next() < 0.7 ? model[0] : rnd.next() < 0.8 ? model[Math.floor(rnd.next() * model.length)] : next + 5;
        const held = pick !== undefined && model.includes(pick);
        expect(log.delete(pick ?? 0)).toBe(held);
        if (held) model = model.filter((n) => n !== pick);
      } else {
        const after = model.length === 0 || rnd.next() < 0.2 ? Math.floor(rnd.next() * (next + 2)) : model[Math.floor(rnd.next() * model.length)]!;
        expect(positions(log.after(after))).toEqual(model.filter((n) => n > after));
      }
      expect(log.size).toBe(model.length);
    }
    expect(positions(log.after(0))).toEqual(model);
  });

  it("keeps no more than about twice the items it holds, whatever was removed (holes are swept)", () => {
    const log = new PositionLog();
    for (let n = 1; n <= 10_000; n++) log.add(n, item(n));
    // One item left at the front while everything behind it is acknowledged: the case a sweep of the front alone would not bound.
    for (let n = 2; n <= 10_000; n++) log.delete(n);
    expect(log.size).toBe(1);
    expect(log.slots).toBeLessThanOrEqual(2 * log.size + 65);
    for (let n = 10_001; n <= 10_100; n++) log.add(n, item(n));
    for (let n = 10_001; n <= 10_100; n += 2) log.delete(n);
    expect(log.slots).toBeLessThanOrEqual(2 * log.size + 65);
    expect(positions(log.after(1))).toEqual(Array.from({ length: 50 }, (_, i) => 10_002 + 2 * i));
    log.delete(1);
    for (let n = 10_002; n <= 10_100; n += 2) log.delete(n);
    expect(log.size).toBe(0);
    expect(log.slots).toBe(0);
  });

  it("refuses a position that does not rise (reads rely on the order)", () => {
    const log = new PositionLog();
    log.add(5, item(5));
    expect(() => log.add(5, item(5))).toThrow(/position 5 added after 5/);
    expect(() => log.add(3, item(3))).toThrow();
    expect(positions(log.after(0))).toEqual([5]);
  });
});
