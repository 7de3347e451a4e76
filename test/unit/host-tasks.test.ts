import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { LmdbEnv } from "../../common/lmdb.js";
import { MemoryJobStore, type JobStore } from "../../controller/job-store.js";
import { LmdbJobStore } from "../../controller/lmdb-job-store.js";
import type { JobRecord, TaskRecord } from "../../controller/model.js";
import { QueueStage } from "../../gen/rexmesh/v1/controller_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { queueStage } from "../../controller/api.js";

/** A host's queue (ListHostTasks): the store's index of each host's tasks, newest first, by tenant. */

const dirs: string[] = [];
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

function job(id: string, tenant: string, taskIds: string[]): JobRecord {
  return {
    id,
    tenant,
    submittedBy: "operator:acme/dev",
    createdAt: 1,
    steps: [],
    env: {},
    workingDir: "",
    stdin: new Uint8Array(),
    timeoutMs: 0,
    deliverBy: 0,
    lostAfterMs: 0,
    idempotent: false,
    idempotencyKey: "",
    cancelRequested: false,
    taskIds,
    outputLimitBytes: 0,
  };
}

function task(id: string, jobId: string, tenant: string, hostId: string, state = TaskState.PENDING): TaskRecord {
  return { id, jobId, tenant, hostId, region: "", proxy: "", state, signal: "", message: "", updatedAt: 1, outputChunks: 0, outputTruncated: false };
}

/** Three jobs on h1 and h2 of acme, one on another tenant's h1; ids are time-ordered like the controller's. */
async function fill(store: JobStore): Promise<void> {
  await store.putJob(job("j1", "acme", ["t01", "t02"]), [task("t01", "j1", "acme", "h1", TaskState.SUCCEEDED), task("t02", "j1", "acme", "h2")]);
  await store.putJob(job("j2", "acme", ["t03"]), [task("t03", "j2", "acme", "h1", TaskState.RUNNING)]);
  await store.putJob(job("j3", "other", ["t04"]), [task("t04", "j3", "other", "h1")]);
  await store.putJob(job("j4", "acme", ["t05"]), [task("t05", "j4", "acme", "h1", TaskState.DELIVERED)]);
}

function lmdbStore(dir = mkdtempSync(join(tmpdir(), "rexmesh-host-tasks-"))) {
  dirs.push(dir);
  return { dir, store: new LmdbJobStore(new LmdbEnv({ path: dir, maxBytes: 16 << 20 })) };
}

describe("a host's tasks in the job store", () => {
  for (const [name, make] of [
    ["LMDB", () => lmdbStore().store],
    ["memory", () => new MemoryJobStore()],
  ] as const) {
    it(`${name}: lists one host's tasks of its tenant, newest first, in pages`, async () => {
      const store = make();
      await fill(store);
      expect(store.taskIdsOfHost("acme", "h1", 10)).toEqual(["t05", "t03", "t01"]);
      expect(store.taskIdsOfHost("acme", "h1", 2)).toEqual(["t05", "t03"]);
      expect(store.taskIdsOfHost("acme", "h1", 2, "t03")).toEqual(["t01"]);
      expect(store.taskIdsOfHost("acme", "h1", 2, "t01")).toEqual([]);
      // Another tenant's host of the same id is another host.
      expect(store.taskIdsOfHost("other", "h1", 10)).toEqual(["t04"]);
      expect(store.taskIdsOfHost("acme", "h2", 10)).toEqual(["t02"]);
      expect(store.taskIdsOfHost("acme", "h3", 10)).toEqual([]);
      await store.close();
    });
  }

  it("indexes the tasks of a store written before the index existed, once, at its first start", async () => {
    const { dir, store } = lmdbStore();
    await fill(store);
    await store.close();
    // Drop the index, as a store from an older version would not have it.
    const env = new LmdbEnv({ path: dir, maxBytes: 16 << 20 });
    const index = env.db("host-tasks");
    await index.clearAsync();
    expect(index.getKeysCount()).toBe(0);
    await env.close();
    const reopened = new LmdbJobStore(new LmdbEnv({ path: dir, maxBytes: 16 << 20 }));
    expect(reopened.taskIdsOfHost("acme", "h1", 10)).toEqual(["t05", "t03", "t01"]);
    await reopened.close();
  });

  it("says where each task stands: queued until the daemon has it, then delivered, running, finished", () => {
    expect([TaskState.PENDING, TaskState.QUEUED, TaskState.DISPATCHED].map(queueStage)).toEqual([QueueStage.QUEUED, QueueStage.QUEUED, QueueStage.QUEUED]);
    expect(queueStage(TaskState.DELIVERED)).toBe(QueueStage.DELIVERED);
    expect(queueStage(TaskState.RUNNING)).toBe(QueueStage.RUNNING);
    expect([TaskState.SUCCEEDED, TaskState.FAILED, TaskState.EXPIRED, TaskState.LOST, TaskState.CANCELLED].map(queueStage)).toEqual(Array(5).fill(QueueStage.FINISHED));
  });
});
