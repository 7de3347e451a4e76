/**
 * The upward backlogs (memory and LMDB): cumulative output acks, acks whose
 * cost does not grow with the number they name, and a push whose write
 * failed.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Database } from "lmdb";
import { afterAll, describe, expect, it } from "vitest";
import { itemBytes, MemoryBacklog, upwardKey, type Backlog, type UpwardItem } from "../../common/backlog.js";
import { LmdbEnv } from "../../common/lmdb.js";
import { decodeItem, LmdbBacklog } from "../../common/lmdb-backlog.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { chunk, status } from "./support.js";

const out = (taskId: string, seq: number): UpwardItem => ({ kind: "output", chunk: chunk(taskId, seq) });
const st = (taskId: string, state: TaskState): UpwardItem => ({ kind: "status", status: status(taskId, state) });
const keys = (b: Backlog) => b.all().map(upwardKey);

const dirs: string[] = [];
const envs: LmdbEnv[] = [];
afterAll(async () => {
  for (const env of envs) await env.close();
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

type BacklogDb = Database<Buffer, (string | number)[]>;

/** An LMDB backlog database whose puts fail (ENOSPC) while `failing` says so. */
function lmdbBacklogDb(): { db: BacklogDb; failing: { when: (item: UpwardItem) => boolean } } {
  const dir = mkdtempSync(join(tmpdir(), "rexmesh-backlog-"));
  dirs.push(dir);
  const env = new LmdbEnv({ path: dir, maxBytes: 16 << 20 });
  envs.push(env);
  const real = env.db<Buffer>("backlog", "binary") as BacklogDb;
  const failing = { when: (_item: UpwardItem) => false };
  const db = new Proxy(real, {
    get(target, prop) {
      if (prop === "put") {
        return (key: (string | number)[], value: Buffer) =>
          failing.when(decodeItem(value)) ? Promise.reject(Object.assign(new Error("No space left on device"), { code: "ENOSPC" })) : target.put(key, value);
      }
      const v: unknown = Reflect.get(target, prop, target);
      return typeof v === "function" ? (v as (...a: unknown[]) => unknown).bind(target) : v;
    },
  });
  return { db, failing };
}

const kinds: [string, () => Promise<Backlog>][] = [
  ["MemoryBacklog", async () => new MemoryBacklog()],
  [
    "LmdbBacklog",
    async () => new LmdbBacklog(lmdbBacklogDb().db, "h1"),
  ],
];

describe.each(kinds)("%s output acks", (_name, make) => {
  it("are cumulative: an ack drops its task's chunks up to its seq, nothing above it and nothing of other tasks", async () => {
    const b = await make();
    await b.push([out("t1", 1), out("t1", 2), out("t2", 1), out("t1", 3), out("t1", 4)]);
    await b.ackOutput("t1", 3);
    expect(keys(b)).toEqual(["o/t2/1", "o/t1/4"]);
    await b.ackOutput("t1", 1); // an older ack: nothing left below it
    expect(keys(b)).toEqual(["o/t2/1", "o/t1/4"]);
    await b.ackOutput("t1", 4);
    expect(keys(b)).toEqual(["o/t2/1"]);
    expect(b.size).toBe(1);
    expect(b.bytes).toBe(itemBytes(out("t2", 1)));
  });

  it("take a chunk pushed after a later one (its first write failed) by its seq, not by when it was pushed", async () => {
    const b = await make();
    await b.push([out("t1", 1), out("t1", 3)]);
    await b.push([out("t1", 2)]);
    await b.ackOutput("t1", 2);
    expect(keys(b)).toEqual(["o/t1/3"]);
    await b.push([out("t1", 5), out("t1", 4)]);
    expect(b.topOutputSeq("t1")).toBe(5);
    await b.ackOutput("t1", 4);
    expect(keys(b)).toEqual(["o/t1/5"]);
    await b.ackOutput("t1", 5);
    expect(keys(b)).toEqual([]);
    expect(b.topOutputSeq("t1")).toBe(0);
    expect(b.bytes).toBe(0);
  });
});

describe("MemoryBacklog under many acks", () => {
  // Each ack takes chunks off the front of its task's seq-ordered list: it visits what it drops and stops at the
  // first chunk above its seq. (Walking every chunk the task held on every ack took 3.7 s for these numbers.)
  it("drops exactly what each ack covers while 100,000 chunks of two tasks are acknowledged every 100", async () => {
    const b = new MemoryBacklog();
    const N = 100_000;
    for (let seq = 1; seq <= N; seq++) {
      await b.push([out("t1", seq), out("t2", seq)]);
      if (seq % 100 === 0) {
        await b.ackOutput("t1", seq);
        await b.ackOutput("t2", seq - 50);
      }
    }
    expect(b.size).toBe(50);
    expect(keys(b)[0]).toBe(`o/t2/${N - 49}`);
    await b.ackOutput("t2", Number.MAX_SAFE_INTEGER);
    expect(b.size).toBe(0);
    expect(b.bytes).toBe(0);
  });
});

describe.each(kinds)("%s acks naming numbers far beyond anything held (F7)", (_name, make) => {
  // Big enough that walking every number up to them takes seconds, small enough that a regression fails
  // rather than hangs (a host's seq of 10^15 or a state of 2^31-1 froze the proxy for good).
  const SEQ = 100_000_000;
  const STATE = (2 ** 27) as TaskState;
  /** Runs `ack` and fails if it takes longer than a walk over the few items held could. */
  const quickly = async (ack: () => Promise<void>) => {
    const started = performance.now();
    await ack();
    expect(performance.now() - started).toBeLessThan(250);
  };

  it("an ack costs what its task holds, not the number it names, and drops exactly what it covers", async () => {
    const b = await make();
    await b.push([out("t1", 1), out("t1", 2), st("t1", TaskState.RUNNING), out("t2", 1), st("t2", TaskState.RUNNING), st("t1", TaskState.QUEUED)]);
    await quickly(() => b.ackOutput("t1", SEQ));
    expect(keys(b)).toEqual(["s/t1/5", "o/t2/1", "s/t2/5", "s/t1/2"]);
    await quickly(() => b.ackStatus("t1", STATE));
    expect(keys(b)).toEqual(["o/t2/1", "s/t2/5"]);
    await quickly(() => b.ackOutput("t-none", SEQ));
    await quickly(() => b.ackStatus("t-none", STATE, true));
    expect(keys(b)).toEqual(["o/t2/1", "s/t2/5"]);
    expect(b.size).toBe(2);
  });

  it("keeps what a huge ack does not cover: the other source's statuses", async () => {
    const b = await make();
    const own = { kind: "status", status: status("t1", TaskState.QUEUED, { atProxy: true }) } as const;
    await b.push([out("t1", 1), out("t1", 2), own, out("t1", 3), st("t1", TaskState.RUNNING)]);
    await quickly(() => b.ackOutput("t1", SEQ));
    await quickly(() => b.ackStatus("t1", STATE, false));
    expect(keys(b)).toEqual(["s/t1/2/p"]);
    await quickly(() => b.ackStatus("t1", STATE, true));
    expect(keys(b)).toEqual([]);
  });
});

describe("LmdbBacklog opened again", () => {
  it("rebuilds its index by task: a huge ack drops exactly the task's items, durably", async () => {
    const { db } = lmdbBacklogDb();
    await new LmdbBacklog(db, "h1").push([out("t1", 1), out("t1", 2), st("t1", TaskState.SUCCEEDED), out("t2", 7)]);
    const b = new LmdbBacklog(db, "h1");
    const started = performance.now();
    await b.ackOutput("t1", 100_000_000);
    await b.ackStatus("t1", (2 ** 27) as TaskState);
    expect(performance.now() - started).toBeLessThan(250);
    expect(keys(b)).toEqual(["o/t2/7"]);
    expect(b.bytes).toBe(itemBytes(out("t2", 7)));
    expect(keys(new LmdbBacklog(db, "h1"))).toEqual(["o/t2/7"]);
  });
});

describe("LmdbBacklog push whose write fails", () => {
  it("leaves no trace, so the same items pushed again are stored (not taken for duplicates)", async () => {
    const { db, failing } = lmdbBacklogDb();
    const b = new LmdbBacklog(db, "h1");
    await b.push([st("t1", TaskState.RUNNING)]);
    failing.when = (item) => item.kind === "status" && item.status.state === TaskState.SUCCEEDED;
    const end = [out("t1", 1), st("t1", TaskState.SUCCEEDED)];
    await expect(b.push(end)).rejects.toMatchObject({ code: "ENOSPC" });
    // The chunk's write went through; the end's did not, and is not held.
    expect(keys(b)).toEqual(["s/t1/5", "o/t1/1"]);
    expect(b.size).toBe(2);
    failing.when = () => false;
    await b.push(end); // the sender's resend
    expect(keys(b)).toEqual(["s/t1/5", "o/t1/1", "s/t1/10"]);
    // Durable: a backlog opened again on the same database holds it.
    expect(keys(new LmdbBacklog(db, "h1"))).toEqual(["s/t1/5", "o/t1/1", "s/t1/10"]);
  });

  it("counts no bytes for what it failed to store", async () => {
    const { db, failing } = lmdbBacklogDb();
    const b = new LmdbBacklog(db, "h1");
    failing.when = () => true;
    await expect(b.push([out("t1", 1), out("t1", 2)])).rejects.toThrow(/No space/);
    expect(b.size).toBe(0);
    expect(b.bytes).toBe(0);
    expect(b.all()).toEqual([]);
  });
});

describe("LmdbBacklog volatile statuses (a ping's answer at a proxy)", () => {
  const vol = (taskId: string, state: TaskState): UpwardItem => ({ kind: "status", status: status(taskId, state), volatile: true });

  it("holds them in push order among stored items, writes none of them, and forgets them when opened again", async () => {
    const { db } = lmdbBacklogDb();
    const b = new LmdbBacklog(db, "h1");
    await b.push([st("t1", TaskState.RUNNING), vol("p1", TaskState.SUCCEEDED)]);
    await b.push([out("t1", 1), vol("p2", TaskState.SUCCEEDED), st("t1", TaskState.SUCCEEDED)]);
    const order = ["s/t1/5", "s/p1/10", "o/t1/1", "s/p2/10", "s/t1/10"];
    expect(keys(b)).toEqual(order);
    // Sent up in that order, from any position and within any budget.
    expect(b.after(0, 1 << 20).map((e) => upwardKey(e.item))).toEqual(order);
    const second = b.after(0, 1 << 20)[1]!.n;
    expect(b.after(second, 1 << 20).map((e) => upwardKey(e.item))).toEqual(order.slice(2));
    expect(b.after(0, 1).map((e) => upwardKey(e.item))).toEqual(order.slice(0, 1));
    expect(b.size).toBe(5);
    // Nothing of them on disk: a process that starts again on the same database holds only the others.
    let written = 0;
    for (const { value } of db.getRange({ start: ["h1", 0], end: ["h1", Number.MAX_SAFE_INTEGER] })) {
      const item = decodeItem(value);
      if (item.kind === "status" && item.status.taskId.startsWith("p")) written++;
    }
    expect(written).toBe(0);
    expect(keys(new LmdbBacklog(db, "h1"))).toEqual(["s/t1/5", "o/t1/1", "s/t1/10"]);
    // Acknowledged like the others; a duplicate is not taken twice.
    await b.push([vol("p1", TaskState.SUCCEEDED)]);
    await b.ackStatus("p1", TaskState.SUCCEEDED);
    expect(keys(b)).toEqual(["s/t1/5", "o/t1/1", "s/p2/10", "s/t1/10"]);
    expect(b.bytes).toBe([st("t1", TaskState.RUNNING), out("t1", 1), vol("p2", TaskState.SUCCEEDED), st("t1", TaskState.SUCCEEDED)].reduce((n, i) => n + itemBytes(i), 0));
  });
});
