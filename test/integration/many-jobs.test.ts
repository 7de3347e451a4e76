/**
 * The API for many jobs (docs/clients.md, "Many jobs"): SubmitJobs (each
 * job on its own, each with its own result) and SubmitAndWatch (submit and
 * follow in one call, re-attached by its idempotency key after the client
 * dropped), through a real mesh, and `rexmesh run --batch-file`.
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { Code } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LocalMesh } from "../../cli/launcher.js";
import { LIMITS } from "../../common/limits.js";
import { OutputStream, TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { testCa } from "../test-ca.js";
import { clientOf, collectJob, rexmesh, tempDir } from "./support.js";

describe("many jobs: SubmitJobs and SubmitAndWatch", () => {
  const mesh = new LocalMesh({ ca: testCa(), dir: tempDir("many-jobs"), regions: ["r1"], hosts: ["m1", "m2"].map((id) => ({ id, region: "r1" })), hostsPerProcess: 2 });
  beforeAll(async () => {
    await mesh.start();
    await mesh.waitForHosts(2);
  }, 120_000);
  afterAll(() => mesh.stop());

  const exec = (...argv: string[]) => [{ tool: { case: "exec" as const, value: { argv } } }];

  it("answers each job of a batch on its own: the refused ones with their code and message, the others run", async () => {
    const { client, close } = clientOf(mesh);
    try {
      const { results } = await client.submitJobs({
        jobs: [
          { hostIds: ["m1"], steps: exec("echo", "first") },
          { hostIds: ["m1"], steps: [] },
          { hostIds: ["nowhere"], steps: exec("true") },
          { hostIds: ["m2"], steps: exec("echo", "fourth") },
          { hostIds: ["m1"], steps: exec("true"), idempotencyKey: "schedule:not-yours" },
          { hostIds: ["m2"], steps: exec("true"), dryRun: true },
        ],
      });
      expect(results.map((r) => r.code)).toEqual([0, Code.InvalidArgument, Code.NotFound, 0, Code.InvalidArgument, 0]);
      expect(results[1]!.message).toMatch(/at least one step/);
      expect(results[2]!.message).toMatch(/nowhere/);
      expect(results[4]!.message).toMatch(/are the schedules. own/);
      expect(results[5]!.response?.plan.map((p) => p.hostId)).toEqual(["m2"]);
      expect(results[5]!.response?.job).toBeUndefined();
      for (const [i, text] of [[0, "first"], [3, "fourth"]] as const) {
        const r = await collectJob(client, results[i]!.response!.job!.id);
        const host = i === 0 ? "m1" : "m2";
        expect(r.tasks.get(host)!.state).toBe(TaskState.SUCCEEDED);
        expect(r.stdout.get(host)!.toString()).toBe(`${text}\n`);
      }
      // More than a call may carry: refused whole, before any job is looked at.
      const tooMany = await client.submitJobs({ jobs: Array.from({ length: LIMITS.batchJobs + 1 }, () => ({ hostIds: ["m1"], steps: exec("true") })) }).catch((e: unknown) => e);
      expect(tooMany).toMatchObject({ code: Code.InvalidArgument, rawMessage: expect.stringMatching(/at most 1000 jobs/) });
    } finally {
      close();
    }
  }, 60_000);

  it("submits and follows in one call, and a client that dropped the stream re-attaches to the same job by its key", async () => {
    const { client, close } = clientOf(mesh);
    try {
      const job = { hostIds: ["m1"], idempotencyKey: "follow-1", steps: [{ tool: { case: "shell" as const, value: { script: "for i in 1 2 3 4 5 6; do echo line-$i; sleep 0.2; done" } } }] };
      const first = new AbortController();
      let jobId = "";
      let seen = "";
      try {
        for await (const batch of client.submitAndWatch({ job }, { signal: first.signal })) {
          if (batch.job) jobId = batch.job.id;
          seen += batch.output.filter((c) => c.stream === OutputStream.STDOUT).map((c) => Buffer.from(c.data).toString()).join("");
          if (seen.includes("line-2")) first.abort(); // the client goes away mid-job
        }
      } catch (err) {
        expect(first.signal.aborted, String(err)).toBe(true);
      }
      expect(jobId).not.toBe("");
      expect(seen).not.toContain("line-6");
      // The same call again: the same job (not a second one), everything from its start, to its end.
      let again = "";
      let state: TaskState | undefined;
      let sameJob = "";
      for await (const batch of client.submitAndWatch({ job })) {
        if (batch.job) sameJob = batch.job.id;
        again += batch.output.map((c) => Buffer.from(c.data).toString()).join("");
        for (const t of batch.tasks) state = t.state;
      }
      expect(sameJob).toBe(jobId);
      expect(again).toBe([1, 2, 3, 4, 5, 6].map((i) => `line-${i}\n`).join(""));
      expect(state).toBe(TaskState.SUCCEEDED);
      const { jobs } = await client.listJobs({ limit: 100 });
      expect(jobs.filter((j) => j.id === jobId)).toHaveLength(1);
      // A dry run is SubmitJob's.
      const dry = await (async () => {
        for await (const _ of client.submitAndWatch({ job: { ...job, idempotencyKey: "", dryRun: true } })) void _;
      })().catch((e: unknown) => e);
      expect(dry).toMatchObject({ code: Code.InvalidArgument });
    } finally {
      close();
    }
  }, 60_000);

  it("rexmesh run --batch-file submits every line, says which were refused and why, and exits 1 if any was", async () => {
    const file = join(mesh.dir, "jobs.jsonl");
    writeFileSync(
      file,
      [
        JSON.stringify({ hostIds: ["m1"], steps: [{ exec: { argv: ["echo", "a"] } }] }),
        "",
        JSON.stringify({ hostIds: ["m2"], steps: [] }),
        JSON.stringify({ allHosts: true, steps: [{ exec: { argv: ["true"] } }] }),
      ].join("\n") + "\n",
    );
    const r = await rexmesh(["run", "--batch-file", file], mesh.exports());
    expect(r.code, r.stderr).toBe(1);
    const lines = r.stdout.trim().split("\n");
    expect(lines).toHaveLength(3);
    expect(lines[0]).toMatch(/^1: j\w+$/);
    expect(lines[1]).toMatch(/^2: refused, InvalidArgument: .*at least one step/);
    expect(lines[2]).toMatch(/^3: j\w+$/);
    expect(r.stderr).toContain("2 of 3 jobs submitted, 1 refused");
    const bad = join(mesh.dir, "bad.jsonl");
    writeFileSync(bad, '{"hostIds": ["m1"], "stepz": []}\n');
    const refused = await rexmesh(["run", "--batch-file", bad], mesh.exports());
    expect(refused.code).toBe(2);
    expect(refused.stderr).toMatch(/bad.jsonl:1: not a SubmitJobRequest in protobuf JSON/);
    const mixed = await rexmesh(["run", "--batch-file", file, "--all"], mesh.exports());
    expect(mixed.code).toBe(2);
    expect(mixed.stderr).toMatch(/leave out --all/);
  }, 60_000);
});
