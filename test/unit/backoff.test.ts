import { describe, expect, it } from "vitest";
import { Backoff } from "../../common/backoff.js";

describe("Backoff", () => {
  it("grows 1 s × 1.6 per attempt with the jitter centred (random = 0.5)", () => {
    const b = new Backoff({}, () => 0.5);
    expect([b.next(), b.next(), b.next(), b.next()]).toEqual([1000, 1600, 2560, 4096]);
  });

  it("stays within ±20 % of the base at the extremes of the random source", () => {
    const low = new Backoff({}, () => 0);
    const high = new Backoff({}, () => 0.999999);
    expect(low.next()).toBe(800);
    expect(low.next()).toBe(1280);
    expect(high.next()).toBe(1200);
    expect(high.next()).toBe(1920);
  });

  it("caps the base at maxMs", () => {
    const b = new Backoff({ initialMs: 100, multiplier: 10, maxMs: 5000, jitter: 0 }, () => 0.5);
    expect([b.next(), b.next(), b.next(), b.next(), b.next()]).toEqual([100, 1000, 5000, 5000, 5000]);
  });

  it("starts over after reset()", () => {
    const b = new Backoff({ initialMs: 10, multiplier: 2, jitter: 0 }, () => 0.5);
    b.next();
    b.next();
    expect(b.next()).toBe(40);
    b.reset();
    expect(b.next()).toBe(10);
  });

  it("never returns a negative delay, even with jitter above 1", () => {
    const b = new Backoff({ initialMs: 100, jitter: 2 }, () => 0);
    expect(b.next()).toBe(0);
  });

  it("uses the injected random source for every attempt", () => {
    const values = [0, 0.25, 0.75];
    let i = 0;
    const b = new Backoff({ initialMs: 1000, multiplier: 1, jitter: 0.2 }, () => values[i++]!);
    expect([b.next(), b.next(), b.next()]).toEqual([800, 900, 1100]);
    expect(i).toBe(3);
  });
});
