import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { create } from "@bufbuild/protobuf";
import { Prng } from "../../chaos/prng.js";
import { LmdbEnv } from "../../common/lmdb.js";
import { MemoryJobStore, type JobStore } from "../../controller/job-store.js";
import { COLUMN_PAGE, MAX_PAGE_DELTA_ENTRIES, MAX_PAGE_DELTAS } from "../../controller/lmdb-task-columns.js";
import { JOB_STORE_LAYOUT, LmdbJobStore } from "../../controller/lmdb-job-store.js";
import type { JobRecord, TaskRecord } from "../../controller/model.js";
import { placeOfTaskId, taskIdOf } from "../../controller/task-ids.js";
import { OutputChunkSchema, TaskState } from "../../gen/rexmesh/v1/task_pb.js";

/**
 * A job's tasks as one column in the LMDB store (controller/lmdb-task-columns.ts):
 * the same reads as the memory store after any sequence of writes, across a
 * reopen; what is written is the record as it was queued; a store written by
 * the release before columns reads and takes writes as before.
 */

const dirs: string[] = [];
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "rexmesh-columns-"));
  dirs.push(dir);
  return dir;
}

const open = (dir: string) => new LmdbJobStore(new LmdbEnv({ path: dir, maxBytes: 64 << 20 }));
const turn = () => new Promise((r) => setImmediate(r));

function job(id: string, tenant: string, taskIds: string[]): JobRecord {
  return { id, tenant, submittedBy: `operator:${tenant}/alice`, createdAt: 1, steps: [], env: {}, workingDir: "", stdin: new Uint8Array(), timeoutMs: 0, deliverBy: 0, lostAfterMs: 0, idempotent: false, idempotencyKey: "", cancelRequested: false, taskIds, outputLimitBytes: 0 };
}

function columnJob(jobId: string, tenant: string, n: number): { job: JobRecord; tasks: TaskRecord[] } {
  const tasks = Array.from({ length: n }, (_, i): TaskRecord => ({
    id: taskIdOf(jobId, i), jobId, tenant, hostId: `h${i}`, region: "r1", proxy: "p1", state: TaskState.PENDING, signal: "", message: "", updatedAt: 1, outputChunks: 0, outputTruncated: false, released: true, proxies: ["p1"],
  }));
  return { job: job(jobId, tenant, tasks.map((t) => t.id)), tasks };
}

/** A seeded generator: a failing seed replays exactly. */
function rng(seed: number): () => number {
  const prng = new Prng(seed);
  return () => prng.next();
}

const chunk = (taskId: string, seq: number, text: string) => create(OutputChunkSchema, { taskId, seq: BigInt(seq), stream: 1, data: new TextEncoder().encode(text) });

function reads(store: JobStore, j: JobRecord) {
  return {
    tasks: store.tasksOf(j),
    each: j.taskIds.map((id) => store.getTask(id)),
    output: j.taskIds.map((id) => store.readOutput(id, 1, 1 << 20).map((c) => [Number(c.seq), Buffer.from(c.data).toString()])),
    h7: store.taskIdsOfHost(j.tenant, "h7", 10),
  };
}

describe("task ids that name their job and place", () => {
  it("read back their job and index, in the one spelling taskIdOf makes", () => {
    for (const i of [0, 1, 31, 32, 255, 256, 1023, 199_999, 1 << 20, 2 ** 35]) expect(placeOfTaskId(taskIdOf("j01k742sg0000070e2nwaa", i))).toEqual({ jobId: "j01k742sg0000070e2nwaa", index: i });
    expect(taskIdOf("j01k742sg0000070e2nwaa", 33)).toBe("t01k742sg0000070e2nwaa.0011");
    // A job's ids sort in index order.
    const ids = Array.from({ length: 3000 }, (_, i) => taskIdOf("j1", i));
    expect([...ids].sort()).toEqual(ids);
    for (const id of ["t01k742sg0000070e2nwaa", "t01k742sg0000070e2nwaa.011", "t01k742sg0000070e2nwaa.00011", "t01k742sg0000070e2nwaa.001A", "t01k742sg0000070e2nwaa.-001", "j01k742sg0000070e2nwaa.0011", "t.0000", "t01k742sg0000070e2nwaa.0011 ", "t01k742sg0000070e2nwaa.+011", "t01k742sg0000070e2nwaa.zzzzzzzzzzzz", ""]) {
      expect(placeOfTaskId(id), id).toBeUndefined();
    }
  });
});

describe("a job's tasks as one column in the LMDB store", () => {
  for (const seed of [1, 2, 3]) {
    it(`reads as the memory store after a seeded mix of writes, and again after a reopen (seed ${seed})`, async () => {
      const random = rng(seed);
      const dir = tempDir();
      let lmdb = open(dir);
      const memory = new MemoryJobStore();
      const { job: j, tasks } = columnJob("j01k7seed" + seed, "acme", COLUMN_PAGE * 2 + 37);
      const other = columnJob("j01k7other" + seed, "other", 20);
      for (const s of [lmdb, memory]) {
        await s.putJob(j, tasks);
        await s.putJob(other.job, other.tasks);
      }
      const live = tasks.map((t) => ({ ...t }));
      for (let round = 0; round < 12; round++) {
        const writes: Promise<void>[] = [];
        for (let k = 0; k < 150; k++) {
          const t = live[Math.floor(random() * live.length)]!;
          const what = random();
          if (what < 0.3) {
            t.outputChunks++;
            const c = chunk(t.id, t.outputChunks, `${t.hostId} ${t.outputChunks}\n`);
            for (const s of [lmdb, memory]) writes.push(s.appendOutput({ ...t }, c));
          } else {
            t.state = Math.min(t.state + 1 + Math.floor(random() * 4), TaskState.LOST);
            t.updatedAt++;
            if (random() < 0.3) t.proxies = [...(t.proxies ?? []), `p${Math.floor(random() * 3)}`];
            if (random() < 0.2) t.late = { state: TaskState.SUCCEEDED, exitCode: 0, signal: "", message: `late ${round}`, time: round };
            if (t.state >= TaskState.SUCCEEDED) t.exitCode = Math.floor(random() * 3);
            for (const s of [lmdb, memory]) writes.push(s.putTask({ ...t }));
          }
          if (random() < 0.05) await turn();
        }
        await Promise.all(writes);
        if (round === 5) await Promise.all([lmdb.putJob({ ...j, finishedAt: 2 }), memory.putJob({ ...j, finishedAt: 2 })]);
      }
      expect(reads(lmdb, j)).toEqual(reads(memory, j));
      expect(reads(lmdb, other.job)).toEqual(reads(memory, other.job));
      expect(lmdb.getTask(taskIdOf(j.id, 3))).toEqual(live[3]);
      await lmdb.close();
      lmdb = open(dir);
      expect(reads(lmdb, j)).toEqual(reads(memory, j));
      expect(lmdb.tasksOf(j)).toEqual(live);
      // Writes after a reopen land after the ones before it.
      live[5]!.state = TaskState.CANCELLED;
      await Promise.all([lmdb.putTask({ ...live[5]! }), memory.putTask({ ...live[5]! })]);
      expect(reads(lmdb, j)).toEqual(reads(memory, j));
      await lmdb.close();
      expect(reads(open(dir), j)).toEqual(reads(memory, j));
    });
  }

  it("writes no record per task at submit nor at a task's end", async () => {
    const dir = tempDir();
    const store = open(dir);
    const { job: j, tasks } = columnJob("j01k7count", "acme", 1000);
    await store.putJob(j, tasks);
    await Promise.all(tasks.map((t) => store.putTask({ ...t, state: TaskState.SUCCEEDED, exitCode: 0, proxies: [] })));
    await store.close();
    const env = new LmdbEnv({ path: dir, maxBytes: 64 << 20 });
    const count = (name: string) => env.db(name).getKeysCount();
    expect({ tasks: count("tasks"), pages: count("task-pages"), deltas: count("task-deltas"), hostIndex: count("host-tasks") }).toEqual({ tasks: 0, pages: 4, deltas: 4, hostIndex: 1000 });
    await env.close();
  });

  it("stores a task as it was when its write was queued, though its lists change before the commit", async () => {
    const dir = tempDir();
    const store = open(dir);
    const { job: j, tasks } = columnJob("j01k7queued", "acme", 3);
    await store.putJob(j, tasks);
    const snapshot: TaskRecord = { ...tasks[1]!, state: TaskState.RUNNING, proxies: ["p1"], outputBeyond: [[3, 4]] };
    const written = store.putTask(snapshot);
    snapshot.proxies!.push("p2");
    snapshot.outputBeyond![0]![1] = 9;
    await written;
    await store.close();
    const again = open(dir);
    expect(again.getTask(tasks[1]!.id)).toMatchObject({ state: TaskState.RUNNING, proxies: ["p1"], outputBeyond: [[3, 4]] });
    // A read is the reader's own copy.
    again.getTask(tasks[1]!.id)!.proxies!.push("p3");
    expect(again.getTask(tasks[1]!.id)!.proxies).toEqual(["p1"]);
  });

  it("finds no task for an id that names no place of a column, nor another job's task", async () => {
    const store = open(tempDir());
    const { job: j, tasks } = columnJob("j01k7acme", "acme", 5);
    const o = columnJob("j01k7else", "other", 5);
    await store.putJob(j, tasks);
    await store.putJob(o.job, o.tasks);
    expect(store.getTask(taskIdOf(j.id, 5))).toBeUndefined();
    expect(store.getTask(taskIdOf(j.id, COLUMN_PAGE))).toBeUndefined();
    expect(store.getTask(taskIdOf("j01k7nosuchjob", 0))).toBeUndefined();
    expect(store.getTask(`${taskIdOf(j.id, 1).slice(0, -4)}00001`)).toBeUndefined();
    // Each id reads as its own job's task, with that job's tenant.
    expect(store.getTask(taskIdOf(o.job.id, 2))).toMatchObject({ jobId: o.job.id, tenant: "other", hostId: "h2" });
    expect(store.getTask(taskIdOf(j.id, 2))).toMatchObject({ jobId: j.id, tenant: "acme", hostId: "h2" });
  });
});

describe("a store written by the release before task columns (078a2db)", () => {
  const fixture = join(import.meta.dirname, "../fixtures/job-store-078a2db");
  const expected = JSON.parse(readFileSync(join(fixture, "expected.json"), "utf8")) as {
    jobs: Record<"a" | "b" | "c", { id: string; taskIds: string[]; finished: boolean; idempotencyKey?: string }>;
    tasks: Record<string, TaskRecord>;
    output: Record<string, string[]>;
  };
  const copy = () => {
    const dir = tempDir();
    mkdirSync(dir, { recursive: true });
    copyFileSync(join(fixture, "store/data.mdb"), join(dir, "data.mdb"));
    return dir;
  };
  const { a, b, c } = expected.jobs;

  it("opens and reads every job, task, output chunk, host history and recall as written", async () => {
    const store = open(copy());
    for (const [id, t] of Object.entries(expected.tasks)) expect(store.getTask(id), id).toEqual(t);
    for (const x of [a, b, c]) {
      const j = store.getJob(x.id)!;
      expect(j.taskIds).toEqual(x.taskIds);
      expect(j.finishedAt !== undefined).toBe(x.finished);
      expect(store.tasksOf(j)).toEqual(x.taskIds.map((id) => expected.tasks[id]));
    }
    expect(store.unfinishedJobs().map((j) => j.id)).toEqual([b.id]);
    expect(store.jobByIdempotencyKey("acme", "deploy-7")?.id).toBe(b.id);
    for (const [id, texts] of Object.entries(expected.output)) expect(store.readOutput(id, 1, 1 << 20).map((ch) => Buffer.from(ch.data).toString())).toEqual(texts);
    expect(store.taskIdsOfHost("acme", "h1", 10)).toEqual([b.taskIds[0], a.taskIds[0]]);
    expect(store.taskIdsOfHost("other", "h1", 10)).toEqual(c.taskIds);
    expect(store.allRecalls().map((r) => r.taskId)).toEqual([a.taskIds[2]]);
    await store.close();
  });

  it("is recorded with this release's layout at its first open; a store of a later layout is refused with the reason", async () => {
    const dir = copy();
    const layoutOf = (env: LmdbEnv) => env.db<number>("job-store").get("layout");
    let env = new LmdbEnv({ path: dir, maxBytes: 64 << 20 });
    expect(layoutOf(env)).toBeUndefined();
    await new LmdbJobStore(env).close();
    env = new LmdbEnv({ path: dir, maxBytes: 64 << 20 });
    expect(layoutOf(env)).toBe(JOB_STORE_LAYOUT);
    await env.db<number>("job-store").put("layout", JOB_STORE_LAYOUT + 1);
    expect(() => new LmdbJobStore(env)).toThrow(/has layout 3, written by a later release; this release reads layouts up to 2: run that release, or restore the backup/);
    // Refused, not rewritten.
    expect(layoutOf(env)).toBe(JOB_STORE_LAYOUT + 1);
    await env.close();
  });

  it("takes writes to its tasks and new column jobs beside them, read back after a reopen", async () => {
    const dir = copy();
    let store = open(dir);
    const running = expected.tasks[b.taskIds[0]!]!;
    const ended = { ...running, state: TaskState.SUCCEEDED, exitCode: 0, outputChunks: 2, proxies: [] };
    await store.appendOutput(ended, chunk(running.id, 2, "done\n"));
    const { job: j, tasks } = columnJob("j01k8new", "acme", 3);
    await store.putJob(j, tasks);
    await store.putTask({ ...tasks[1]!, state: TaskState.FAILED, exitCode: 2 });
    await store.close();
    store = open(dir);
    expect(store.getTask(running.id)).toEqual(ended);
    expect(store.readOutput(running.id, 1, 1 << 20).map((ch) => Buffer.from(ch.data).toString())).toEqual(["working\n", "done\n"]);
    expect(store.getTask(tasks[1]!.id)).toMatchObject({ state: TaskState.FAILED, exitCode: 2 });
    expect(store.taskIdsOfHost("acme", "h1", 10)).toEqual([tasks[1]!.id, b.taskIds[0], a.taskIds[0]]);
    await store.close();
  });
});

describe("a page's deltas are folded past a bound", () => {
  /** A store, and what a read of a page of it applies: the page's deltas and the entries in them, as the store holds them. */
  function opened(dir: string) {
    const env = new LmdbEnv({ path: dir, maxBytes: 64 << 20 });
    const deltas = env.db<unknown[]>("task-deltas");
    const keptOf = (jobId: string, page: number) => {
      let n = 0;
      let entries = 0;
      for (const { value } of deltas.getRange({ start: [jobId, page], end: [jobId, page + 1] })) {
        n++;
        entries += value.length;
      }
      return { deltas: n, entries };
    };
    return { store: new LmdbJobStore(env), keptOf };
  }

  for (const seed of [11, 12, 13]) {
    it(`keeps at most ${MAX_PAGE_DELTAS} deltas and ${MAX_PAGE_DELTA_ENTRIES} entries per page through thousands of turns, reading as the memory store after each (seed ${seed})`, async () => {
      const random = rng(seed);
      const dir = tempDir();
      let { store: lmdb, keptOf } = opened(dir);
      const memory = new MemoryJobStore();
      const { job: j, tasks } = columnJob(`j01k9bound${seed}`, "acme", COLUMN_PAGE + 40);
      for (const s of [lmdb, memory]) await s.putJob(j, tasks);
      const live = tasks.map((t) => ({ ...t }));
      let most = { deltas: 0, entries: 0 };
      let inFlight: Promise<void>[] = [];
      for (let step = 0; step < 2500; step++) {
        // Most turns change a few tasks of each page (folded into one delta); some change most of page 0 (folded into the page).
        const wide = random() < 0.05;
        const changed = wide ? live.slice(0, COLUMN_PAGE).filter(() => random() < 0.8) : [live[Math.floor(random() * 4)]!];
        if (random() < 0.5) changed.push(live[COLUMN_PAGE + Math.floor(random() * 6)]!);
        for (const t of changed) {
          t.updatedAt = step;
          if (random() < 0.5) {
            t.outputChunks++;
            const c = chunk(t.id, t.outputChunks, `${step}\n`);
            for (const s of [lmdb, memory]) inFlight.push(s.appendOutput({ ...t }, c));
          } else {
            t.state = Math.floor(random() * TaskState.LOST) + 1;
            if (random() < 0.2) t.proxies = [`p${step % 3}`];
            for (const s of [lmdb, memory]) inFlight.push(s.putTask({ ...t }));
          }
        }
        await turn();
        // Writes of several turns in flight at once, then every one of them durable.
        if (random() < 0.3) {
          await Promise.all(inFlight);
          inFlight = [];
          for (const page of [0, 1]) {
            const kept = keptOf(j.id, page);
            most = { deltas: Math.max(most.deltas, kept.deltas), entries: Math.max(most.entries, kept.entries) };
            expect(kept.deltas, `step ${step}: deltas of page ${page}`).toBeLessThanOrEqual(MAX_PAGE_DELTAS);
            expect(kept.entries, `step ${step}: entries in page ${page}'s deltas`).toBeLessThanOrEqual(MAX_PAGE_DELTA_ENTRIES);
          }
          for (const t of changed) expect(lmdb.getTask(t.id), `step ${step}: ${t.id}`).toEqual(t);
        }
        if (random() < 0.005) {
          await Promise.all(inFlight);
          inFlight = [];
          await lmdb.close();
          ({ store: lmdb, keptOf } = opened(dir));
        }
      }
      await Promise.all(inFlight);
      expect(reads(lmdb, j)).toEqual(reads(memory, j));
      expect(lmdb.tasksOf(j)).toEqual(live);
      // The bound was reached, not merely never approached.
      expect(most.deltas).toBeGreaterThanOrEqual(MAX_PAGE_DELTAS - 1);
      await lmdb.close();
      expect(reads(open(dir), j)).toEqual(reads(memory, j));
    }, 120_000);
  }
});
