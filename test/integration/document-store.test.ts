import { create } from "@bufbuild/protobuf";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { LmdbEnv } from "../../common/lmdb.js";
import { DocumentStore, LmdbDocumentBackend } from "../../controller/document-store.js";
import { compileDocument } from "../../controller/documents.js";
import { LmdbJobStore } from "../../controller/lmdb-job-store.js";
import { StepSchema, TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { tempDir } from "./support.js";

/** Documents and per-task steps in a real LMDB environment, read back after reopening it. */
describe("LMDB storage of documents and per-task steps", () => {
  const dir = join(tempDir("docstore"), "db");
  const envs: LmdbEnv[] = [];
  const open = () => {
    const env = new LmdbEnv({ path: dir, maxBytes: 64 << 20 });
    envs.push(env);
    return env;
  };
  afterAll(async () => {
    for (const e of envs) await e.close().catch(() => undefined);
  });
  const doc = (name: string, word: string) => compileDocument({ name, steps: [{ exec: { argv: ["echo", word] } }] });

  it("numbers versions per tenant and name, finds the newest, lists one per name, and keeps them across a reopen", async () => {
    const env = open();
    const store = new DocumentStore(new LmdbDocumentBackend(env), new ManualClock());
    const puts = await Promise.all([store.put("acme", "op", doc("b", "1")), store.put("acme", "op", doc("b", "2")), store.put("acme", "op", doc("a", "1"))]);
    expect(puts.map((p) => `${p.name}@${p.version}`)).toEqual(["b@1", "b@2", "a@1"]);
    for (let i = 3; i <= 12; i++) await store.put("acme", "op", doc("b", String(i)));
    await store.put("acmf", "op", doc("b", "other tenant"));
    await store.put("acm", "op", doc("b", "short tenant"));
    await env.close();
    const again = new DocumentStore(new LmdbDocumentBackend(open()), new ManualClock());
    expect(again.get("acme", "b").version).toBe(12);
    expect(JSON.parse(again.get("acme", "b@2").content).steps[0].exec.argv).toEqual(["echo", "2"]);
    expect(again.get("acmf", "b").version).toBe(1);
    expect(again.list("acme").map((d) => `${d.name}@${d.version}`).sort()).toEqual(["a@1", "b@12"]);
    expect(again.list("acm").map((d) => `${d.name}@${d.version}`)).toEqual(["b@1"]);
    expect(() => again.get("acme", "c")).toThrow(/not found/);
  });

  it("keeps each task's run and shown steps apart from the job", async () => {
    const store = new LmdbJobStore(open());
    const step = (s: string) => create(StepSchema, { tool: { case: "shell", value: { script: s } } });
    const job = { id: "j1", tenant: "acme", submittedBy: "a", createdAt: 0, steps: [], env: {}, workingDir: "", stdin: new Uint8Array(), timeoutMs: 0, deliverBy: 1, lostAfterMs: 60_000, idempotent: false, idempotencyKey: "", cancelRequested: false, taskIds: ["t1"], outputLimitBytes: 0, document: "d@1", parameters: { p: "[sensitive]" } };
    const task = { id: "t1", jobId: "j1", tenant: "acme", hostId: "h1", region: "eu", proxy: "", state: TaskState.PENDING, signal: "", message: "", updatedAt: 0, outputChunks: 0, outputTruncated: false };
    await store.putJob(job, [task], new Map([["t1", { run: [step("echo 'pw'")], shown: [step("echo '[sensitive]'")] }]]));
    const got = store.taskSteps("t1")!;
    expect(got.run[0]!.tool.value).toMatchObject({ script: "echo 'pw'" });
    expect(got.shown[0]!.tool.value).toMatchObject({ script: "echo '[sensitive]'" });
    expect(store.getJob("j1")).toMatchObject({ document: "d@1", parameters: { p: "[sensitive]" } });
    expect(store.taskSteps("t2")).toBeUndefined();
  });
});
