/**
 * The SpecEncoder's cache (common/task-signing.ts) and JobManager.taskSpec
 * (controller/jobs.ts) against the orders tasks really leave in: the tasks
 * of several jobs interleaved (a proxy's reconnect sends what it holds,
 * job by job in no order), document runs whose steps are rendered per host,
 * a rerun that shares its job's steps and environment objects. Every task's
 * bytes must decode to its own spec.
 */
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { Prng } from "../../chaos/prng.js";
import { ManualClock } from "../../common/clock.js";
import { silentLogger } from "../../common/logger.js";
import { peekSpec, SpecDecoder, TaskSigner } from "../../common/task-signing.js";
import { Inventory } from "../../controller/inventory.js";
import { MemoryJobStore } from "../../controller/job-store.js";
import { JobManager } from "../../controller/jobs.js";
import type { JobRecord, TaskRecord, TaskSteps } from "../../controller/model.js";
import { SignedTaskSchema, StepSchema, TaskSpecSchema, TaskState, type TaskSpec } from "../../gen/rexmesh/v1/task_pb.js";
import { counterIds, execStep, testSigning } from "./support.js";

/** Seeded floats in [0, 1) (chaos/prng.ts), so a failure names its seed. */
function rng(seed: number): () => number {
  const prng = new Prng(seed);
  return () => prng.next();
}

describe("SpecEncoder through JobManager.taskSpec", () => {
  it("gives each task its own steps and its own job's fields, whatever the order tasks of document runs, reruns and plain jobs leave in (seeded)", async () => {
    const clock = new ManualClock();
    const store = new MemoryJobStore();
    const jobs = new JobManager({ store, inventory: new Inventory(), clock, ids: counterIds(), log: silentLogger });
    const signer: TaskSigner = testSigning().signer;
    const plain: JobRecord = { id: "j1", tenant: "acme", submittedBy: "alice", createdAt: 1000, steps: [execStep("echo", "one")], env: { A: "1" }, workingDir: "/", stdin: new Uint8Array([1]), timeoutMs: 5000, deliverBy: 61_000, lostAfterMs: 0, idempotent: false, idempotencyKey: "", cancelRequested: false, taskIds: [], outputLimitBytes: 0 };
    // A rerun shares the steps and environment objects of its job (controller/rerun.ts); submitted in the same millisecond, only its id differs.
    const rerun: JobRecord = { ...plain, id: "j2" };
    const doc: JobRecord = { ...plain, id: "j3", steps: [], document: "d@1", env: {} };
    const doc2: JobRecord = { ...doc, id: "j4" };
    const tasks: [JobRecord, TaskRecord][] = [];
    const steps = new Map<string, TaskSteps>();
    for (const job of [plain, rerun, doc, doc2]) {
      const own: TaskRecord[] = [];
      for (let h = 0; h < 20; h++) {
        const t: TaskRecord = { id: `${job.id}-t${h}`, jobId: job.id, tenant: "acme", hostId: `h${h}`, region: "eu", proxy: "", state: TaskState.PENDING, signal: "", message: "", updatedAt: 0, outputChunks: 0, outputTruncated: false };
        own.push(t);
        tasks.push([job, t]);
        // Rendered per host; two hosts share identical text but never objects, and some share their Step objects across jobs.
        if (job.document) steps.set(t.id, { run: [execStep("echo", job.id, `host ${h % 3}`)], shown: [] });
      }
      job.taskIds = own.map((t) => t.id);
      await store.putJob(job, own, new Map([...steps].filter(([id]) => id.startsWith(`${job.id}-`))));
    }
    const expected = (job: JobRecord, t: TaskRecord): TaskSpec =>
      create(TaskSpecSchema, {
        taskId: t.id,
        jobId: job.id,
        tenant: job.tenant,
        hostId: t.hostId,
        steps: job.document ? steps.get(t.id)!.run : job.steps,
        env: job.env,
        workingDir: job.workingDir,
        stdin: job.stdin,
        timeout: { seconds: BigInt(job.timeoutMs / 1000), nanos: 0 },
        deliverBy: { seconds: BigInt(Math.floor(job.deliverBy / 1000)), nanos: 0 },
        idempotent: job.idempotent,
        createdAt: { seconds: BigInt(Math.floor(job.createdAt / 1000)), nanos: 0 },
      });
    const decoder = new SpecDecoder();
    for (let seed = 1; seed <= 20; seed++) {
      const r = rng(seed);
      // Runs of one job's tasks of random length, jobs in random order: as slices, reconnects and failovers send them.
      for (let i = 0; i < 200; ) {
        const [job] = tasks[Math.floor(r() * tasks.length)]!;
        const mine = tasks.filter(([j]) => j === job);
        for (let n = 1 + Math.floor(r() * 5); n > 0; n--, i++) {
          const [, t] = mine[Math.floor(r() * mine.length)]!;
          const bytes = signer.prepare(jobs.taskSpec(job, t)).spec;
          const whole = fromBinary(TaskSpecSchema, new Uint8Array(bytes));
          expect(whole, `seed ${seed}, ${t.id}`).toEqual(fromBinary(TaskSpecSchema, toBinary(TaskSpecSchema, expected(job, t))));
          // The proxy's decoder (a job's part once) reads the same spec.
          const signed = create(SignedTaskSchema, { spec: bytes });
          expect(decoder.peek(signed), `seed ${seed}, ${t.id} at the proxy`).toEqual(peekSpec(signed));
        }
      }
    }
  });
});

describe("SpecDecoder (the proxy reads a job's part once)", () => {
  it("reads every spec exactly as a whole decode does, also bytes no encoder of ours writes", () => {
    const bin = (init: Parameters<typeof create<typeof TaskSpecSchema>>[1]) => toBinary(TaskSpecSchema, create(TaskSpecSchema, init));
    const cat = (...parts: Uint8Array[]) => new Uint8Array(Buffer.concat(parts));
    const ping = [create(StepSchema, { tool: { case: "ping", value: {} } })];
    const part = bin({ jobId: "j1", tenant: "acme", steps: ping, env: { A: "1" } });
    const other = bin({ jobId: "j2", tenant: "acme", steps: ping });
    const ids = (taskId: string, hostId: string) => bin({ taskId, hostId });
    const field = (tag: number, text: string) => new Uint8Array([tag, Buffer.byteLength(text), ...Buffer.from(text)]);
    const cases: [string, Uint8Array][] = [
      ["ids then the job's part", cat(ids("t1", "h1"), part)],
      ["the same part again (shared)", cat(ids("t2", "h2"), part)],
      ["another job's part", cat(ids("t3", "h3"), other)],
      ["the first job's part once more", cat(ids("t4", "h4"), part)],
      ["a task id alone in front", cat(ids("t5", ""), part)],
      ["a part that names a task itself (the later field wins)", cat(ids("t6", "h6"), part, field(0x0a, "tX"))],
      ["a part that names a host itself", cat(ids("t7", "h7"), part, field(0x22, "hX"))],
      ["a part with an empty host id of its own", cat(ids("t8", "h8"), part, new Uint8Array([0x22, 0]))],
      ["the host id before the task id", cat(field(0x22, "h9"), field(0x0a, "t9"), part)],
      ["a part cut short", cat(ids("t10", "h10"), part.subarray(0, part.length - 1))],
      ["an id longer than the bytes", new Uint8Array([0x0a, 0x7f, 0x61])],
      ["the shared part after a cut one", cat(ids("t11", "h11"), part)],
      ["a part one byte different", cat(ids("t12", "h12"), Buffer.from(part).map((b, i) => (i === part.length - 1 ? b ^ 1 : b)))],
      // The ids are read by hand: text and varints of every kind, the same as a whole decode.
      ["non-ASCII ids", cat(ids("tâche-✓", "hôte-𝄞"), part)],
      ["ids past 64 characters", cat(ids("t".repeat(100), "h".repeat(200)), part)],
      ["a task id of invalid UTF-8", cat(new Uint8Array([0x0a, 2, 0xc3, 0x28]), field(0x22, "h13"), part)],
      ["a host id of invalid UTF-8", cat(field(0x0a, "t14"), new Uint8Array([0x22, 1, 0xff]), part)],
      ["a BOM-led task id", cat(new Uint8Array([0x0a, 4, 0xef, 0xbb, 0xbf, 0x74]), field(0x22, "h15"), part)],
      ["an id's length as an overlong varint", cat(new Uint8Array([0x0a, 0x83, 0x00, 0x74, 0x31, 0x36]), field(0x22, "h16"), part)],
      ["an empty task id given", cat(new Uint8Array([0x0a, 0]), field(0x22, "h17"), part)],
      ["a task id and no host id", cat(field(0x0a, "t18"), part)],
      ["a host id cut short", cat(field(0x0a, "t19"), new Uint8Array([0x22, 5, 0x68]))],
    ];
    const decoder = new SpecDecoder();
    for (const [what, bytes] of cases) {
      const signed = create(SignedTaskSchema, { spec: bytes });
      expect(decoder.peek(signed), what).toEqual(peekSpec(signed));
    }
    // And the shared part is what it claims: t2's spec is t1's but for the ids.
    const t2 = decoder.peek(create(SignedTaskSchema, { spec: cases[1]![1] }))!;
    expect([t2.taskId, t2.hostId, t2.jobId, t2.env]).toEqual(["t2", "h2", "j1", { A: "1" }]);
  });
});
