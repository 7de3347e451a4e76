import { describe, expect, it } from "vitest";
import { AsyncQueue } from "../../common/async-queue.js";
import { MemoryBacklog, itemBytes, upwardKey, type UpwardItem } from "../../common/backlog.js";
import { ManualClock, systemClock, type Clock } from "../../common/clock.js";
import { Coalescer } from "../../common/coalescer.js";
import { Heartbeat } from "../../common/heartbeat.js";
import { advances, isTerminal, parseStateName, stateName } from "../../common/task-state.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { chunk, status } from "./support.js";

describe("ManualClock", () => {
  it("fires timers in time order, only when advanced past them, and not after cancel", () => {
    const clock = new ManualClock(1000);
    const fired: string[] = [];
    clock.setTimeout(() => fired.push(`b@${clock.now()}`), 20);
    clock.setTimeout(() => fired.push(`a@${clock.now()}`), 10);
    const c = clock.setTimeout(() => fired.push("c"), 15);
    c.cancel();
    clock.advance(9);
    expect(fired).toEqual([]);
    clock.advance(11);
    expect(fired).toEqual(["a@1010", "b@1020"]);
    expect(clock.now()).toBe(1020);
  });

  it("sleep resolves on advance and rejects with the signal's reason on abort", async () => {
    const clock = new ManualClock();
    let done = false;
    const p = clock.sleep(100).then(() => (done = true));
    clock.advance(99);
    await Promise.resolve();
    expect(done).toBe(false);
    clock.advance(1);
    await p;
    expect(done).toBe(true);

    const ac = new AbortController();
    const q = clock.sleep(100, ac.signal);
    ac.abort(new Error("stop"));
    await expect(q).rejects.toThrow("stop");
  });
});

describe("Heartbeat", () => {
  function setup(intervalMs = 1000) {
    const clock = new ManualClock(0);
    let sent = 0;
    let dead = 0;
    const hb = new Heartbeat(
      clock,
      intervalMs,
      () => sent++,
      () => dead++,
    );
    return { clock, hb, sent: () => sent, dead: () => dead };
  }

  it("sends an empty frame once we have been quiet for an interval, not before", () => {
    const t = setup();
    t.clock.advance(999);
    expect(t.sent()).toBe(0);
    t.clock.advance(1);
    expect(t.sent()).toBe(1);
    t.hb.received();
  });

  it("does not send while we keep sending frames ourselves", () => {
    const t = setup();
    t.clock.advance(900);
    t.hb.sent();
    t.clock.advance(600); // t=1500: 600 ms since our last frame
    expect(t.sent()).toBe(0);
    t.clock.advance(500); // t=2000: 1100 ms since
    expect(t.sent()).toBe(1);
  });

  it("declares the peer dead after three intervals without a frame from it, once", () => {
    const t = setup();
    t.clock.advance(3000);
    expect(t.dead()).toBe(0);
    t.clock.advance(500);
    expect(t.dead()).toBe(1);
    const sentAtDeath = t.sent();
    t.clock.advance(10_000);
    expect(t.dead()).toBe(1);
    expect(t.sent()).toBe(sentAtDeath);
  });

  it("does not count its own stall as the peer's silence: a late tick gives the peer another window", () => {
    // A clock whose timers can fire late, as in a process that was stalled.
    let now = 0;
    let timers: { at: number; fn: () => void }[] = [];
    const clock: Clock = {
      now: () => now,
      setTimeout: (fn, ms) => {
        const t = { at: now + ms, fn };
        timers.push(t);
        return { cancel: () => (timers = timers.filter((x) => x !== t)) };
      },
      sleep: () => Promise.resolve(),
    };
    /** Moves time to `to`, firing timers on time (at their own time) unless `late`: then at `to`. */
    const run = (to: number, late = false) => {
      for (;;) {
        const due = timers.filter((t) => t.at <= to).sort((a, b) => a.at - b.at)[0];
        if (!due) break;
        timers = timers.filter((t) => t !== due);
        now = late ? to : due.at;
        due.fn();
      }
      now = to;
    };
    let dead = 0;
    new Heartbeat(clock, 1000, () => {}, () => dead++);
    run(500);
    // The process stalls for 10 s: the next tick fires 9.5 s late; frames may wait unread.
    run(10_500, true);
    expect(dead).toBe(0);
    // Still nothing from the peer once the process runs again: dead three intervals after the stall.
    run(12_000);
    expect(dead).toBe(0);
    run(13_000);
    expect(dead).toBe(1);
  });

  it("stays alive while the peer keeps sending", () => {
    const t = setup();
    for (let i = 0; i < 10; i++) {
      t.clock.advance(2000);
      t.hb.received();
    }
    expect(t.dead()).toBe(0);
    t.clock.advance(3000);
    expect(t.dead()).toBe(0);
    t.clock.advance(500);
    expect(t.dead()).toBe(1);
  });

  it("does nothing after stop()", () => {
    const t = setup();
    t.hb.stop();
    t.clock.advance(60_000);
    expect(t.sent()).toBe(0);
    expect(t.dead()).toBe(0);
  });
});

describe("Coalescer", () => {
  function setup() {
    const scheduled: (() => void)[] = [];
    const sent: string[][] = [];
    const c = new Coalescer<string[]>(
      () => [],
      (f) => sent.push(f),
      (fn) => scheduled.push(fn),
    );
    return { c, scheduled, sent };
  }

  it("gathers everything added in one turn into one frame, scheduled once", () => {
    const { c, scheduled, sent } = setup();
    c.frame.push("a");
    c.frame.push("b");
    c.frame.push("c");
    expect(scheduled).toHaveLength(1);
    expect(sent).toEqual([]);
    scheduled.shift()!();
    expect(sent).toEqual([["a", "b", "c"]]);
  });

  it("starts a new frame and a new schedule after a flush", () => {
    const { c, scheduled, sent } = setup();
    c.frame.push("a");
    scheduled.shift()!();
    c.frame.push("b");
    expect(scheduled).toHaveLength(1);
    scheduled.shift()!();
    expect(sent).toEqual([["a"], ["b"]]);
  });

  it("flush() sends at once; the scheduled flush then sends nothing", () => {
    const { c, scheduled, sent } = setup();
    c.frame.push("a");
    c.flush();
    expect(sent).toEqual([["a"]]);
    scheduled.shift()!();
    expect(sent).toEqual([["a"]]);
  });

  it("discard() drops the gathered frame", () => {
    const { c, scheduled, sent } = setup();
    c.frame.push("lost");
    c.discard();
    scheduled.shift()!();
    expect(sent).toEqual([]);
  });
});

describe("MemoryBacklog", () => {
  const out = (taskId: string, seq: number): UpwardItem => ({ kind: "output", chunk: chunk(taskId, seq) });
  const st = (taskId: string, state: TaskState): UpwardItem => ({ kind: "status", status: status(taskId, state) });
  const keys = (b: MemoryBacklog) => b.all().map(upwardKey);

  it("keeps items in the order produced and drops duplicates by key", async () => {
    const b = new MemoryBacklog();
    await b.push([st("t1", TaskState.DELIVERED), st("t1", TaskState.RUNNING), out("t1", 1), out("t1", 2)]);
    await b.push([out("t1", 2), st("t1", TaskState.RUNNING), st("t1", TaskState.SUCCEEDED)]);
    expect(keys(b)).toEqual(["s/t1/4", "s/t1/5", "o/t1/1", "o/t1/2", "s/t1/10"]);
    expect(b.size).toBe(5);
  });

  it("acks output up to a seq, per task", async () => {
    const b = new MemoryBacklog();
    await b.push([out("t1", 1), out("t2", 1), out("t1", 2), out("t1", 3)]);
    await b.ackOutput("t1", 2);
    expect(keys(b)).toEqual(["o/t2/1", "o/t1/3"]);
    await b.ackOutput("t1", 1); // stale ack: nothing changes
    expect(keys(b)).toEqual(["o/t2/1", "o/t1/3"]);
    await b.ackOutput("t1", 3);
    expect(keys(b)).toEqual(["o/t2/1"]);
  });

  it("acks statuses up to a state and keeps later ones", async () => {
    const b = new MemoryBacklog();
    await b.push([st("t1", TaskState.DELIVERED), st("t1", TaskState.RUNNING), st("t1", TaskState.SUCCEEDED), st("t2", TaskState.DELIVERED)]);
    await b.ackStatus("t1", TaskState.RUNNING);
    expect(keys(b)).toEqual(["s/t1/10", "s/t2/4"]);
    await b.ackStatus("t1", TaskState.SUCCEEDED);
    expect(keys(b)).toEqual(["s/t2/4"]);
  });

  it("counts the bytes it holds", async () => {
    const b = new MemoryBacklog();
    const items = [out("t1", 1), st("t1", TaskState.RUNNING)];
    await b.push(items);
    expect(b.bytes).toBe(itemBytes(items[0]!) + itemBytes(items[1]!));
    await b.ackOutput("t1", 1);
    await b.ackStatus("t1", TaskState.RUNNING);
    expect(b.bytes).toBe(0);
    expect(b.size).toBe(0);
  });
});

describe("AsyncQueue", async () => {
  it("hands items pushed before and after the consumer waits, in order", async () => {
    const q = new AsyncQueue<number>();
    q.push(1);
    q.push(2);
    const got: number[] = [];
    const consumer = (async () => {
      for await (const x of q) got.push(x);
    })();
    await Promise.resolve();
    q.push(3);
    q.close();
    await consumer;
    expect(got).toEqual([1, 2, 3]);
  });

  it("close() without an error ends after the items already pushed", async () => {
    const q = new AsyncQueue<string>();
    q.push("a");
    q.close();
    q.push("ignored");
    expect(await q.next()).toEqual({ value: "a", done: false });
    expect((await q.next()).done).toBe(true);
    expect(q.isClosed).toBe(true);
  });

  it("close(error) drops pending items and fails a waiting consumer", async () => {
    const q = new AsyncQueue<string>();
    const waiting = q.next();
    q.close(new Error("boom"));
    await expect(waiting).rejects.toThrow("boom");
    const q2 = new AsyncQueue<string>();
    q2.push("dropped");
    q2.close(new Error("boom2"));
    expect(q2.size).toBe(0);
    await expect(q2.next()).rejects.toThrow("boom2");
  });

  it("breaking out of for-await closes the queue", async () => {
    const q = new AsyncQueue<number>();
    q.push(1);
    q.push(2);
    for await (const x of q) {
      expect(x).toBe(1);
      break;
    }
    expect(q.isClosed).toBe(true);
  });

  it("keeps order across its internal compaction (more than 1024 items)", async () => {
    const q = new AsyncQueue<number>();
    for (let i = 0; i < 3000; i++) q.push(i);
    const got: number[] = [];
    for (let i = 0; i < 1500; i++) got.push((await q.next()).value as number);
    for (let i = 3000; i < 3100; i++) q.push(i);
    q.close();
    for await (const x of q) got.push(x);
    expect(got).toEqual(Array.from({ length: 3100 }, (_, i) => i));
  });
});

describe("task states", () => {
  it("moves only forward; the first terminal state wins", () => {
    expect(advances(TaskState.PENDING, TaskState.QUEUED)).toBe(true);
    expect(advances(TaskState.RUNNING, TaskState.DELIVERED)).toBe(false);
    expect(advances(TaskState.RUNNING, TaskState.RUNNING)).toBe(false);
    expect(advances(TaskState.QUEUED, TaskState.CANCELLED)).toBe(true);
    expect(advances(TaskState.SUCCEEDED, TaskState.FAILED)).toBe(false);
    expect(advances(TaskState.RUNNING, TaskState.UNSPECIFIED)).toBe(false);
    expect(isTerminal(TaskState.RUNNING)).toBe(false);
    expect(isTerminal(TaskState.SKIPPED)).toBe(true);
  });

  it("names states as users see them and parses them back", () => {
    expect(stateName(TaskState.TIMED_OUT)).toBe("TIMED_OUT");
    expect(parseStateName("succeeded")).toBe(TaskState.SUCCEEDED);
    expect(parseStateName("nope")).toBeUndefined();
  });
});

describe("systemClock", () => {
  it("honours delays past Node's 24.8-day timer limit instead of firing at once", async () => {
    let fired = 0;
    const long = systemClock.setTimeout(() => fired++, 25 * 86_400_000);
    const short = await new Promise<number>((resolve) => systemClock.setTimeout(() => resolve(fired), 30));
    long.cancel();
    expect(short).toBe(0);
    expect(fired).toBe(0);
  });
});
