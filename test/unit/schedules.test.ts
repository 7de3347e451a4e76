import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { silentLogger } from "../../common/logger.js";
import { cronOf, MemoryScheduleStore, Scheduler, type Misfire, type Overlap, type ScheduleRecord } from "../../controller/schedules.js";
import { flush } from "./support.js";
import { UnavailableError } from "../../common/errors.js";

/**
 * Schedules on an injected clock (docs/schedules.md): daylight saving in a
 * named zone, each misfire policy after an outage, each overlap policy, and
 * a firing submitted exactly once across a crash.
 */

const MIN = 60_000;
const iso = (ms: number) => new Date(ms).toISOString().slice(0, 16);

function schedule(more: Partial<ScheduleRecord> & { cron: string; createdAt: number }): ScheduleRecord {
  return {
    tenant: "acme",
    name: "nightly",
    timezone: "Europe/Berlin",
    paused: false,
    misfire: "skip",
    graceMs: 30_000,
    overlap: "allow",
    request: new Uint8Array(),
    creator: { role: "operator", scope: "acme", id: "dev" },
    lastAt: more.createdAt,
    lastJobId: "",
    queued: [],
    fired: 0,
    skipped: 0,
    missed: 0,
    recent: [],
    ...more,
  };
}

/** A scheduler over a memory store whose firings are recorded; jobs "run" while `running` holds their id. */
function harness(clock: ManualClock, store = new MemoryScheduleStore()) {
  const fired: { at: number; key: string; job: string }[] = [];
  const running = new Set<string>();
  const jobsByKey = new Map<string, string>();
  const scheduler = new Scheduler({
    clock,
    store,
    log: silentLogger,
    // Idempotent like the job manager: a key names one job.
    fire: async (_rec, at, key) => {
      let job = jobsByKey.get(key);
      if (!job) {
        job = `j${jobsByKey.size + 1}`;
        jobsByKey.set(key, job);
        fired.push({ at, key, job });
      }
      return job;
    },
    running: (id) => running.has(id),
  });
  return { scheduler, fired, running, store };
}

/** Advances the clock in steps, letting the scheduler work after each. */
async function run(clock: ManualClock, stepMs: number, steps: number) {
  for (let i = 0; i < steps; i++) {
    clock.advance(stepMs);
    await flush(3);
  }
}

describe("schedules across daylight saving (Europe/Berlin)", () => {
  it("every minute through the autumn change (02:00-03:00 happens twice): one firing each real minute, none twice", async () => {
    const start = Date.parse("2026-10-25T00:00:00Z"); // 02:00 CEST
    const clock = new ManualClock(start);
    const h = harness(clock);
    await h.store.put(schedule({ cron: "* * * * *", createdAt: start }));
    h.scheduler.start();
    await run(clock, 10_000, 6 * 150); // 150 minutes in 10 s steps
    const times = h.fired.map((f) => f.at);
    expect(times.length).toBe(150);
    for (let i = 1; i < times.length; i++) expect(times[i]! - times[i - 1]!, iso(times[i]!)).toBe(MIN);
    h.scheduler.stop();
  });

  it("every minute through the spring change (02:00-03:00 does not exist): one firing each real minute, no gap", async () => {
    const start = Date.parse("2026-03-29T00:30:00Z"); // 01:30 CET
    const clock = new ManualClock(start);
    const h = harness(clock);
    await h.store.put(schedule({ cron: "* * * * *", createdAt: start }));
    h.scheduler.start();
    await run(clock, 20_000, 3 * 60);
    const times = h.fired.map((f) => f.at);
    expect(times.length).toBe(60);
    for (let i = 1; i < times.length; i++) expect(times[i]! - times[i - 1]!).toBe(MIN);
    h.scheduler.stop();
  });

  it("daily at 02:30: once on the day the hour is skipped (at 03:00 CEST, the first minute after the gap), once on the day it repeats (the first 02:30)", async () => {
    for (const [from, days, expected] of [
      ["2026-03-27T12:00:00Z", 4, ["2026-03-28T01:30", "2026-03-29T01:00", "2026-03-30T00:30", "2026-03-31T00:30"]],
      ["2026-10-23T12:00:00Z", 4, ["2026-10-24T00:30", "2026-10-25T00:30", "2026-10-26T01:30", "2026-10-27T01:30"]],
    ] as const) {
      const clock = new ManualClock(Date.parse(from));
      const h = harness(clock);
      await h.store.put(schedule({ cron: "30 2 * * *", createdAt: clock.now() }));
      h.scheduler.start();
      await run(clock, 10 * MIN, days * 24 * 6);
      expect(h.fired.map((f) => iso(f.at))).toEqual(expected);
      h.scheduler.stop();
    }
  });
});

describe("expressions that name hours, across daylight saving (the attack review's croner cases)", () => {
  /** The firings of `cron` in Europe/Berlin over a day around a change, stepping 5 minutes. */
  async function firings(cron: string, from: string) {
    const clock = new ManualClock(Date.parse(from));
    const h = harness(clock);
    await h.store.put(schedule({ cron, createdAt: clock.now() }));
    h.scheduler.start();
    await flush(3);
    await run(clock, 5 * MIN, 12 * 24);
    h.scheduler.stop();
    return h.fired.map((f) => iso(f.at));
  }

  it("every 15 minutes in hour 2: in autumn each wall time once (not again in the repeated hour); in spring once, at the first minute after the gap", async () => {
    expect(await firings("*/15 2 * * *", "2026-10-24T12:00:00Z")).toEqual(["2026-10-25T00:00", "2026-10-25T00:15", "2026-10-25T00:30", "2026-10-25T00:45"]);
    expect(await firings("*/15 2 * * *", "2026-03-28T12:00:00Z")).toEqual(["2026-03-29T01:00"]);
  });

  it("hours 1 to 3: 02:00 once in autumn; in spring the skipped 02:00 and the 03:00 after it are one firing", async () => {
    expect(await firings("0 1-3 * * *", "2026-10-24T12:00:00Z")).toEqual(["2026-10-24T23:00", "2026-10-25T00:00", "2026-10-25T02:00"]);
    expect(await firings("0 1-3 * * *", "2026-03-28T12:00:00Z")).toEqual(["2026-03-29T00:00", "2026-03-29T01:00"]);
  });

  it("every hour at :30 follows real time through both changes (as every minute does)", async () => {
    const autumn = await firings("30 * * * *", "2026-10-24T23:00:00Z");
    expect(autumn.slice(0, 5)).toEqual(["2026-10-24T23:30", "2026-10-25T00:30", "2026-10-25T01:30", "2026-10-25T02:30", "2026-10-25T03:30"]);
  });
});

describe("misfire: firings missed while the controller was down", () => {
  /** A schedule every minute whose controller was down for 10 minutes and starts again 45 s after the last missed firing. */
  async function outage(misfire: Misfire) {
    const t0 = Date.parse("2026-06-01T10:00:00Z");
    const clock = new ManualClock(t0 + 10 * MIN + 45_000);
    const h = harness(clock);
    await h.store.put(schedule({ cron: "* * * * *", createdAt: t0, misfire, graceMs: 30_000 }));
    h.scheduler.start();
    await flush(5);
    return { ...h, t0, clock };
  }

  it("skip: none of the missed firings runs; the next on-time one does", async () => {
    const o = await outage("skip");
    expect(o.fired).toEqual([]);
    expect(o.store.get("acme", "nightly")!.missed).toBe(10);
    await run(o.clock, 15_000, 1);
    expect(o.fired.map((f) => iso(f.at))).toEqual([iso(o.t0 + 11 * MIN)]);
    o.scheduler.stop();
  });

  it("once: one firing runs now for all of them (the latest); the rest are counted missed", async () => {
    const o = await outage("once");
    expect(o.fired.map((f) => iso(f.at))).toEqual([iso(o.t0 + 10 * MIN)]);
    expect(o.store.get("acme", "nightly")!.missed).toBe(9);
    o.scheduler.stop();
  });

  it("all: each missed firing runs now, in order, each its own job", async () => {
    const o = await outage("all");
    expect(o.fired.map((f) => f.at)).toEqual(Array.from({ length: 10 }, (_, i) => o.t0 + (i + 1) * MIN));
    expect(new Set(o.fired.map((f) => f.job)).size).toBe(10);
    expect(o.store.get("acme", "nightly")!.missed).toBe(0);
    o.scheduler.stop();
  });

  it("a firing late by less than the grace window is on time under every policy", async () => {
    for (const misfire of ["skip", "once", "all"] as const) {
      const t0 = Date.parse("2026-06-01T10:00:00Z");
      const clock = new ManualClock(t0 + MIN + 20_000);
      const h = harness(clock);
      await h.store.put(schedule({ cron: "* * * * *", createdAt: t0, misfire, graceMs: 30_000 }));
      h.scheduler.start();
      await flush(5);
      expect(h.fired.map((f) => f.at), misfire).toEqual([t0 + MIN]);
      h.scheduler.stop();
    }
  });
});

describe("overlap: the previous firing's job still runs", () => {
  async function overlapping(overlap: Overlap) {
    const t0 = Date.parse("2026-06-01T10:00:00Z");
    const clock = new ManualClock(t0);
    const h = harness(clock);
    await h.store.put(schedule({ cron: "* * * * *", createdAt: t0, overlap }));
    h.scheduler.start();
    await flush(3);
    await run(clock, MIN, 1);
    expect(h.fired.length).toBe(1);
    // The first job runs for three minutes.
    h.running.add(h.fired[0]!.job);
    await run(clock, 10_000, 19);
    return { ...h, clock };
  }

  it("allow: the next firings run anyway", async () => {
    const o = await overlapping("allow");
    expect(o.fired.length).toBe(4);
    o.scheduler.stop();
  });

  it("skip: the firings while it runs are skipped and counted", async () => {
    const o = await overlapping("skip");
    expect(o.fired.length).toBe(1);
    expect(o.store.get("acme", "nightly")!.skipped).toBe(3);
    o.running.clear();
    await run(o.clock, 10_000, 6);
    expect(o.fired.length).toBe(2);
    o.scheduler.stop();
  });

  it("a pause drops the firings waiting in the queue; resumed, the schedule goes on from now and makes up nothing", async () => {
    const o = await overlapping("queue");
    expect(o.store.get("acme", "nightly")!.queued.length).toBe(3);
    await o.scheduler.setPaused("acme", "nightly", true);
    expect(o.store.get("acme", "nightly")).toMatchObject({ queued: [], skipped: 3, paused: true });
    o.running.clear();
    await run(o.clock, MIN, 3);
    expect(o.fired.length).toBe(1);
    await o.scheduler.setPaused("acme", "nightly", false);
    await run(o.clock, 10_000, 7);
    // Only the firing after the resume: none of the three minutes paused.
    expect(o.fired.length).toBe(2);
    o.scheduler.stop();
  });

  it("queue: the firings wait and run one after another as each job ends", async () => {
    const o = await overlapping("queue");
    expect(o.fired.length).toBe(1);
    expect(o.store.get("acme", "nightly")!.queued.length).toBe(3);
    o.running.clear();
    await run(o.clock, 1000, 1);
    // The first queued one runs; it "runs" in turn, so the next waits for it.
    expect(o.fired.length).toBe(2);
    o.running.add(o.fired[1]!.job);
    await run(o.clock, 1000, 3);
    expect(o.fired.length).toBe(2);
    o.running.clear();
    await run(o.clock, 1000, 3);
    expect(o.fired.length).toBe(4);
    expect(o.store.get("acme", "nightly")!.queued).toEqual([]);
    o.scheduler.stop();
  });
});

describe("a firing is submitted exactly once", () => {
  it("a controller that dies after the submit and before it recorded the firing submits it again under the same key: the same job", async () => {
    const t0 = Date.parse("2026-06-01T10:00:00Z");
    const clock = new ManualClock(t0 + MIN + 1000);
    const store = new MemoryScheduleStore();
    await store.put(schedule({ cron: "* * * * *", createdAt: t0 }));
    // The first scheduler's store write fails: the firing was submitted but never recorded.
    const failing = Object.assign(Object.create(store) as MemoryScheduleStore, { put: async () => Promise.reject(new Error("the controller died")) });
    const first = harness(clock, failing);
    await first.scheduler.wake();
    first.scheduler.stop();
    expect(first.fired.length).toBe(1);
    expect(store.get("acme", "nightly")!.lastAt).toBe(t0);
    // After the restart the firing is still due, and goes again with the same key.
    const keys: string[] = [];
    const second = new Scheduler({ clock, store, log: silentLogger, fire: async (_r, _at, key) => (keys.push(key), "j1"), running: () => false });
    await second.wake();
    second.stop();
    expect(keys).toEqual([first.fired[0]!.key]);
    expect(store.get("acme", "nightly")!.lastAt).toBe(t0 + MIN);
  });

  it("a firing refused because the controller is stopping is not recorded: after the restart it is due again, under the same key", async () => {
    const t0 = Date.parse("2026-06-01T10:00:00Z");
    const clock = new ManualClock(t0 + MIN + 1000);
    const store = new MemoryScheduleStore();
    await store.put(schedule({ cron: "* * * * *", createdAt: t0 }));
    const keys: string[] = [];
    const stopping = new Scheduler({ clock, store, log: silentLogger, fire: async (_r, _at, key) => (keys.push(key), Promise.reject(new UnavailableError("the controller is stopping"))), running: () => false });
    await stopping.wake();
    stopping.stop();
    expect(store.get("acme", "nightly")).toMatchObject({ lastAt: t0, skipped: 0 });
    const restarted = new Scheduler({ clock, store, log: silentLogger, fire: async (_r, _at, key) => (keys.push(key), "j1"), running: () => false });
    await restarted.wake();
    restarted.stop();
    expect(keys).toHaveLength(2);
    expect(keys[1]).toBe(keys[0]);
    expect(store.get("acme", "nightly")).toMatchObject({ lastAt: t0 + MIN, fired: 1 });
  });

  it("refuses a cron expression or a time zone that does not parse, naming it", () => {
    expect(() => cronOf("61 * * * *", "UTC")).toThrow(/cron expression "61 \* \* \* \*"/);
    expect(() => cronOf("* * * * *", "Mars/Olympus")).toThrow(/time zone "Mars\/Olympus"/);
  });
});

describe("one writer at a time", () => {
  it("a pause given while a firing is being submitted is not lost when the firing is recorded", async () => {
    const t0 = Date.parse("2026-06-01T10:00:00Z");
    const clock = new ManualClock(t0 + MIN + 1000);
    const store = new MemoryScheduleStore();
    await store.put(schedule({ cron: "* * * * *", createdAt: t0 }));
    let release!: () => void;
    const submitted = new Promise<void>((r) => (release = r));
    const scheduler = new Scheduler({ clock, store, log: silentLogger, fire: async () => (await submitted, "j1"), running: () => false });
    const woke = scheduler.wake();
    await flush(2);
    // The operator pauses while the submit is under way (as controller/access.ts does it).
    const paused = scheduler.exclusive(async () => {
      const r = store.get("acme", "nightly")!;
      r.paused = true;
      await store.put(r);
    });
    release();
    await woke;
    await paused;
    expect(store.get("acme", "nightly")).toMatchObject({ paused: true, fired: 1, lastJobId: "j1" });
    scheduler.stop();
  });
});

describe("a schedule far behind, or a clock that jumped (attack review)", () => {
  it("an every-second schedule with a day's grace after a 3-hour outage runs the latest 100 once, then one a second: nothing is handled twice", async () => {
    const t0 = Date.parse("2026-06-01T10:00:00Z");
    const clock = new ManualClock(t0 + 3 * 3600_000);
    const h = harness(clock);
    await h.store.put(schedule({ cron: "* * * * * *", createdAt: t0, graceMs: 24 * 3600_000, misfire: "all" }));
    await h.scheduler.wake();
    expect(h.fired.length).toBe(100);
    expect(h.fired.at(-1)!.at).toBe(clock.now());
    expect(h.store.get("acme", "nightly")!.missed).toBeGreaterThan(0);
    for (let i = 0; i < 3; i++) {
      clock.advance(1000);
      await h.scheduler.wake();
    }
    expect(h.fired.length).toBe(103);
    expect(new Set(h.fired.map((f) => f.at)).size).toBe(103);
    h.scheduler.stop();
  });

  it("misfire all after a week away runs the latest missed firings, not the oldest", async () => {
    const t0 = Date.parse("2026-06-01T10:00:00Z");
    const clock = new ManualClock(t0 + 7 * 24 * 3600_000 + 45_000);
    const h = harness(clock);
    await h.store.put(schedule({ cron: "* * * * *", createdAt: t0, misfire: "all", graceMs: 30_000 }));
    await h.scheduler.wake();
    expect(h.fired.length).toBe(100);
    expect(h.fired.at(-1)!.at).toBe(t0 + 7 * 24 * 3600_000);
    h.scheduler.stop();
  });

  it("a clock that ran a day ahead and was set back: the schedule goes on from now, with a note", async () => {
    const t0 = Date.parse("2026-06-01T10:00:00Z");
    // A clock that can be set anywhere, backwards too (the scheduler is woken by hand here).
    let time = t0;
    const clock = Object.assign(new ManualClock(t0), { now: () => time, set: (ms: number) => (time = ms) });
    const h = harness(clock);
    await h.store.put(schedule({ cron: "* * * * *", createdAt: t0 }));
    clock.set(t0 + 24 * 3600_000 + 30_000);
    await h.scheduler.wake();
    expect(h.fired.length).toBe(1);
    clock.set(t0 + 90_000);
    await h.scheduler.wake();
    expect(h.store.get("acme", "nightly")!.recent.at(-1)!.note).toMatch(/the clock went back/);
    clock.set(t0 + 2 * MIN + 1000);
    await h.scheduler.wake();
    expect(h.fired.map((f) => f.at).at(-1)).toBe(t0 + 2 * MIN);
    h.scheduler.stop();
  });
});
