import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { isTerminal } from "../../common/task-state.js";
import { silentLogger } from "../../common/logger.js";
import { Inventory } from "../../controller/inventory.js";
import { MemoryJobStore } from "../../controller/job-store.js";
import { JobManager, type ProxyPort } from "../../controller/jobs.js";
import type { JobRecord } from "../../controller/model.js";
import type { TaskRecord } from "../../controller/model.js";
import { sameAsSent, watchJob, type WatchBatch } from "../../controller/watch.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { chunk, counterIds, execStep, flush, operator, status, submitRequest, text } from "./support.js";

const port: ProxyPort = { name: "px1", region: "eu", sendTask: () => {}, sendCancel: () => {} };

async function setup(hostIds: string[], opts: { offline?: boolean } = {}) {
  const clock = new ManualClock();
  const inventory = new Inventory();
  const jobs = new JobManager({ store: new MemoryJobStore(), inventory, clock, ids: counterIds(), log: silentLogger });
  jobs.start();
  jobs.proxyConnected(port);
  for (const id of hostIds) jobs.hostConnected(inventory.connected({ id, tenant: "acme" }, "eu", "px1", clock.now()));
  if (opts.offline) jobs.proxyDisconnected(port);
  const job = await jobs.submit(operator(), submitRequest({ hostIds, steps: [execStep("echo")] }));
  return { clock, jobs, job, ids: job.taskIds };
}

/** Reads a watch in the background, recording every batch; `done` resolves when it ends. */
function collect(jobs: JobManager, job: JobRecord, opts: { noOutput?: boolean; maxBatchBytes?: number; signal?: AbortSignal } = {}) {
  const batches: WatchBatch[] = [];
  const done = (async () => {
    for await (const b of watchJob(jobs, job, { noOutput: opts.noOutput ?? false, signal: opts.signal ?? new AbortController().signal, maxBatchBytes: opts.maxBatchBytes })) {
      batches.push(b);
    }
  })();
  let ended = false;
  done.then(
    () => (ended = true),
    () => (ended = true),
  );
  return { batches, done, ended: () => ended };
}

/** Every event of the watch as a flat list: output chunks of a batch come before its tasks. */
function events(batches: WatchBatch[]): string[] {
  const out: string[] = [];
  for (const b of batches) {
    for (const c of b.output) out.push(`o:${c.taskId}:${c.seq}`);
    for (const t of b.tasks) out.push(`s:${t.id}:${TaskState[t.state]}`);
  }
  return out;
}

describe("watchJob", () => {
  it("starts with a batch holding the job and every task", async () => {
    const t = await setup(["h1", "h2", "h3"]);
    const w = collect(t.jobs, t.job);
    await flush();
    expect(w.batches).toHaveLength(1);
    expect(w.batches[0]!.job?.id).toBe(t.job.id);
    expect(w.batches[0]!.tasks.map((x) => x.id)).toEqual(t.ids);
    expect(w.batches[0]!.tasks.every((x) => x.state === TaskState.PENDING)).toBe(true);
    expect(w.ended()).toBe(false);
  });

  it("streams changes and output in seq order, a terminal state only after the task's output, and ends when all are terminal", async () => {
    const t = await setup(["h1", "h2"]);
    const [a, b] = t.ids as [string, string];
    const w = collect(t.jobs, t.job);
    await flush();
    await t.jobs.applyStatus(port, status(a, TaskState.RUNNING));
    await flush();
    await t.jobs.applyOutput(port, chunk(a, 1, "one "));
    await flush();
    // Applied together, as a proxy frame would carry them: the watcher sees them after.
    await Promise.all([t.jobs.applyOutput(port, chunk(a, 2, "two ")), t.jobs.applyOutput(port, chunk(a, 3, "three"))]);
    await t.jobs.applyStatus(port, status(a, TaskState.SUCCEEDED, { outputChunks: 3n }));
    await flush();
    expect(w.ended()).toBe(false);
    await t.jobs.applyStatus(port, status(b, TaskState.FAILED));
    await w.done;

    const ev = events(w.batches);
    expect(ev.filter((e) => e.startsWith("o:"))).toEqual([`o:${a}:1`, `o:${a}:2`, `o:${a}:3`]);
    expect(ev.indexOf(`s:${a}:SUCCEEDED`)).toBeGreaterThan(ev.indexOf(`o:${a}:3`));
    expect(ev.filter((e) => e.startsWith(`s:${a}:`))).toEqual([`s:${a}:PENDING`, `s:${a}:RUNNING`, `s:${a}:SUCCEEDED`]);
    expect(ev.at(-1)).toBe(`s:${b}:FAILED`);
    const last = w.batches.at(-1)!;
    expect(last.job?.finishedAt).toBeDefined();
    const bytes = w.batches.flatMap((x) => x.output).map((c) => text(c.data)).join("");
    expect(bytes).toBe("one two three");
  });

  it("holds a terminal state back until the output before it has been sent, across small batches", async () => {
    const t = await setup(["h1"]);
    const [a] = t.ids as [string];
    for (let i = 1; i <= 4; i++) await t.jobs.applyOutput(port, chunk(a, i, "0123456789"));
    await t.jobs.applyStatus(port, status(a, TaskState.SUCCEEDED, { outputChunks: 4n }));
    const w = collect(t.jobs, t.jobs.getJobRecord(t.job.id)!, { maxBatchBytes: 10 });
    await w.done;
    expect(w.batches.length).toBeGreaterThan(1);
    for (const b of w.batches) expect(b.output.length).toBeLessThanOrEqual(1);
    const ev = events(w.batches);
    expect(ev).toEqual([`o:${a}:1`, `o:${a}:2`, `o:${a}:3`, `o:${a}:4`, `s:${a}:SUCCEEDED`]);
  });

  it("replays everything to a watcher opened after the job finished, in one batch, then ends", async () => {
    const t = await setup(["h1", "h2"]);
    const [a, b] = t.ids as [string, string];
    await t.jobs.applyOutput(port, chunk(a, 1, "x"));
    await t.jobs.applyOutput(port, chunk(a, 2, "y"));
    await t.jobs.applyOutput(port, chunk(b, 1, "z"));
    await t.jobs.applyStatus(port, status(a, TaskState.SUCCEEDED, { outputChunks: 2n }));
    await t.jobs.applyStatus(port, status(b, TaskState.FAILED, { outputChunks: 1n }));
    const finished = t.jobs.getJobRecord(t.job.id)!;
    expect(finished.finishedAt).toBeDefined();
    const w = collect(t.jobs, finished);
    await w.done;
    expect(w.batches).toHaveLength(1);
    const only = w.batches[0]!;
    expect(only.job?.finishedAt).toBe(finished.finishedAt);
    expect(only.tasks.map((x) => [x.id, x.state])).toEqual([
      [a, TaskState.SUCCEEDED],
      [b, TaskState.FAILED],
    ]);
    expect(only.output.map((c) => `${c.taskId}:${c.seq}:${text(c.data)}`)).toEqual([`${a}:1:x`, `${a}:2:y`, `${b}:1:z`]);
  });

  it("sends no output with noOutput, but still every state", async () => {
    const t = await setup(["h1"]);
    const [a] = t.ids as [string];
    await t.jobs.applyOutput(port, chunk(a, 1, "secret"));
    const w = collect(t.jobs, t.job, { noOutput: true });
    await flush();
    await t.jobs.applyOutput(port, chunk(a, 2, "more"));
    await t.jobs.applyStatus(port, status(a, TaskState.SUCCEEDED, { outputChunks: 2n }));
    await w.done;
    expect(w.batches.flatMap((b) => b.output)).toEqual([]);
    expect(events(w.batches)).toEqual([`s:${a}:PENDING`, `s:${a}:SUCCEEDED`]);
  });

  it("does not send a task again when nothing the client sees changed", async () => {
    const t = await setup(["h1", "h2"]);
    const [a] = t.ids as [string, string];
    const w = collect(t.jobs, t.job);
    await flush();
    await t.jobs.applyStatus(port, status(a, TaskState.RUNNING));
    await t.jobs.applyStatus(port, status(a, TaskState.DELIVERED)); // stale: ignored
    await flush();
    expect(events(w.batches).filter((e) => e.startsWith(`s:${a}`))).toEqual([`s:${a}:PENDING`, `s:${a}:RUNNING`]);
  });

  it("hands out each task as it was when sent: a later change to the task does not change a batch already yielded", async () => {
    const t = await setup(["h1"]);
    const [a] = t.ids as [string];
    const w = collect(t.jobs, t.job);
    await flush();
    const first = w.batches[0]!.tasks.find((x) => x.id === a)!;
    expect(first.state).toBe(TaskState.PENDING);
    await t.jobs.applyStatus(port, status(a, TaskState.RUNNING));
    await flush();
    expect(first.state, "the first batch's copy").toBe(TaskState.PENDING);
    expect(events(w.batches).filter((e) => e.startsWith(`s:${a}`))).toEqual([`s:${a}:PENDING`, `s:${a}:RUNNING`]);
  });

  it("sends a task again when its state, exit, signal, proxy, truncation, message, expected chunks or late report's state changed, and not for its output count alone", () => {
    const sent: TaskRecord = { id: "t1", jobId: "j1", tenant: "acme", hostId: "h1", region: "eu", proxy: "px1", state: TaskState.RUNNING, signal: "", message: "", updatedAt: 1, outputChunks: 3, outputTruncated: false };
    expect(sameAsSent({ ...sent }, undefined), "never sent").toBe(false);
    expect(sameAsSent({ ...sent, outputChunks: 9, updatedAt: 2 }, sent)).toBe(true);
    const changes: Partial<TaskRecord>[] = [
      { state: TaskState.SUCCEEDED },
      { exitCode: 0 },
      { signal: "SIGTERM" },
      { proxy: "px2" },
      { outputTruncated: true },
      { message: "done" },
      { expectedChunks: 3 },
      { late: { state: TaskState.CANCELLED, signal: "", message: "", time: 5 } },
    ];
    for (const change of changes) expect(sameAsSent({ ...sent, ...change }, sent), JSON.stringify(change)).toBe(false);
  });

  it("ends when the signal aborts", async () => {
    const t = await setup(["h1"]);
    const ac = new AbortController();
    const w = collect(t.jobs, t.job, { signal: ac.signal });
    await flush();
    expect(w.ended()).toBe(false);
    ac.abort();
    await w.done;
    expect(w.batches).toHaveLength(1);
  });

  // Regression guard (was a bug at controller/jobs.ts:337 with :373 and :409, seen through controller/watch.ts:542, now fixed): when
  // tasks end at the controller itself (cancel before delivery, delivery deadline), finishHere()
  // notifies watchers before maybeFinishJob() has set finishedAt. The watcher wakes, sees every
  // task terminal, sends its last batch with the job record as it is then (no finishedAt, so
  // JobState RUNNING on the wire and no elapsed time in the CLI summary) and ends.
  it("sees a cancel end the job: the last batch carries the finished job", async () => {
    const t = await setup(["h1"], { offline: true }); // never sent: cancel ends it at the controller
    const w = collect(t.jobs, t.job);
    await flush();
    await t.jobs.cancel(operator(), t.job.id);
    await w.done;
    const last = w.batches.at(-1)!;
    expect(last.tasks.map((x) => x.state)).toEqual([TaskState.CANCELLED]);
    expect(isTerminal(last.tasks[0]!.state)).toBe(true);
    expect(last.job?.finishedAt).toBeDefined();
  });

  it("sees the delivery deadline end the job: the last batch carries the finished job", async () => {
    const t = await setup(["h1"], { offline: true });
    const w = collect(t.jobs, t.job);
    await flush();
    t.clock.advance(3_600_000);
    await w.done;
    const last = w.batches.at(-1)!;
    expect(last.tasks.map((x) => x.state)).toEqual([TaskState.EXPIRED]);
    expect(last.job?.finishedAt).toBe(t.clock.now());
  });

  it("ends with the job DONE even when it starts between the last task's commit and the job's", async () => {
    // A store that holds the write recording the job finished until released.
    class SlowFinish extends MemoryJobStore {
      release!: () => void;
      override async putJob(...args: Parameters<MemoryJobStore["putJob"]>): Promise<void> {
        if (args[0].finishedAt !== undefined) await new Promise<void>((r) => (this.release = r));
        return super.putJob(...args);
      }
    }
    const store = new SlowFinish();
    const clock = new ManualClock();
    const inventory = new Inventory();
    const jobs = new JobManager({ store, inventory, clock, ids: counterIds(), log: silentLogger });
    jobs.start();
    jobs.proxyConnected(port);
    jobs.hostConnected(inventory.connected({ id: "h1", tenant: "acme" }, "eu", "px1", clock.now()));
    const job = await jobs.submit(operator(), { hostIds: ["h1"], allHosts: false, steps: [execStep("echo")], env: {}, workingDir: "", stdin: new Uint8Array(), timeoutMs: 0, deliveryDeadlineMs: 0, idempotencyKey: "", idempotent: false });
    const applied = jobs.applyStatus(port, status(job.taskIds[0]!, TaskState.SUCCEEDED));
    await flush();
    expect(store.release).toBeDefined(); // the task is stored, the job's finish is held
    const w = collect(jobs, jobs.getJobRecord(job.id)!, { noOutput: true });
    await flush();
    expect(w.ended()).toBe(false); // it waits for the job instead of ending on a RUNNING job
    store.release();
    await applied;
    await w.done;
    expect(w.batches.at(-1)!.job?.finishedAt).toBeDefined();
  });
});
