import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { timeOrderedIds } from "../../common/ids.js";

describe("time-ordered ids", () => {
  it("sort in the order they were made, within a millisecond and across, and never repeat", () => {
    const clock = new ManualClock();
    const ids = timeOrderedIds(clock);
    const made: string[] = [];
    for (let ms = 0; ms < 5; ms++) {
      for (let i = 0; i < 700; i++) made.push(ids("t"));
      clock.advance(1);
    }
    expect([...made].sort()).toEqual(made);
    expect(new Set(made).size).toBe(made.length);
    for (const id of made) expect(id).toMatch(/^t[0-9a-hjkmnp-tv-z]{10}[0-9a-v]{3}[0-9a-hjkmnp-tv-z]{8}$/);
  });

  it("take their random part from the source given, a pool at a time, every byte used once", () => {
    const calls: number[] = [];
    let next = 0;
    const ids = timeOrderedIds(new ManualClock(), (n) => {
      calls.push(n);
      return Uint8Array.from({ length: n }, () => next++ % 32);
    });
    const first = ids("j");
    expect(first.slice(-8)).toBe("01234567");
    expect(ids("j").slice(-8)).toBe("89abcdef");
    for (let i = 0; i < 1000; i++) ids("j");
    // 1,002 ids of 8 bytes: two pools of 4 KiB.
    expect(calls).toEqual([4096, 4096]);
  });
});
