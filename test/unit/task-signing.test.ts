import { describe, expect, it } from "vitest";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { ManualClock } from "../../common/clock.js";
import { leafHash } from "../../common/merkle.js";
import { checksBatches, SpecEncoder, TaskRejected, TaskSigner, TaskVerifier } from "../../common/task-signing.js";
import { HostFactsSchema } from "../../gen/rexmesh/v1/host_pb.js";
import { TaskVerifier as TaskVerifierV1 } from "./fixtures/task-signing-v1.js";
import { SignedTaskSchema, StepSchema, TaskBatchProofSchema, TaskSpecSchema } from "../../gen/rexmesh/v1/task_pb.js";
import { otherTestCa, otherTestKeys, testCredentials } from "../test-ca.js";
import { taskSpec, testSigning } from "./support.js";

const clock = new ManualClock(Date.UTC(2025, 6, 1));
const spec = taskSpec("t1", "h1", { deliverByMs: clock.now() + 60_000 });

describe("TaskVerifier", () => {
  it("accepts a task signed by an endorsed controller key and returns its spec", () => {
    const { signer, caPem } = testSigning();
    const v = new TaskVerifier(caPem, clock);
    expect(v.addKeys([signer.key])).toBe(1);
    expect(v.verify(signer.sign(spec)).taskId).toBe("t1");
  });

  it("refuses an altered, unsigned or unknown-key task, naming why", () => {
    const { signer, caPem } = testSigning();
    const v = new TaskVerifier(caPem, clock);
    v.addKeys([signer.key]);
    const signed = signer.sign(spec);
    const altered = create(SignedTaskSchema, { ...signed, spec: Uint8Array.from(signed.spec, (b, i) => (i === 5 ? b ^ 1 : b)) });
    expect(() => v.verify(altered)).toThrow(/altered on the way/);
    expect(() => v.verify(create(SignedTaskSchema, { spec: signed.spec, keyId: signed.keyId }))).toThrow(/not signed/);
    expect(() => v.verify(create(SignedTaskSchema, { ...signed, keyId: "nope" }))).toThrow(TaskRejected);
  });

  it("sends a ping-only task unsigned and accepts it unsigned; anything else unsigned is refused", () => {
    const { signer, caPem } = testSigning();
    const v = new TaskVerifier(caPem, clock);
    v.addKeys([signer.key]);
    const ping = taskSpec("t2", "h1", { deliverByMs: clock.now() + 60_000 });
    ping.steps = [create(StepSchema, { tool: { case: "ping", value: {} } })];
    const signedPing = signer.sign(ping);
    expect(signedPing.signature.length).toBe(0);
    expect(v.verify(signedPing).taskId).toBe("t2");
    // A ping with a command smuggled in beside it is not a ping: unsigned, it is refused.
    const mixed = taskSpec("t3", "h1", { deliverByMs: clock.now() + 60_000 });
    mixed.steps = [create(StepSchema, { tool: { case: "ping", value: {} } }), ...spec.steps];
    expect(signer.sign(mixed).signature.length).toBeGreaterThan(0);
    expect(() => v.verify(create(SignedTaskSchema, { spec: signer.sign(mixed).spec }))).toThrow(/not signed/);
  });

  it("trusts no key endorsed by a host certificate, by another CA, or past its expiry", () => {
    const { caPem } = testSigning();
    const longAgo = new ManualClock(Date.UTC(2025, 0, 1));
    const tenYears = 10 * 365 * 86_400_000;
    // A second mesh: its controller and one of its hosts (on a key of their own: not the key of our controller's certificate).
    const otherCa = otherTestCa();
    const theirs = { clock: longAgo, validityMs: tenYears, ca: otherCa, keys: otherTestKeys() };
    const hostCreds = testCredentials({ role: "host", scope: "t", id: "h" }, theirs);
    const otherCtl = testCredentials({ role: "controller", scope: "mesh", id: "c" }, theirs);
    // Against the other CA: a controller key is fine, a host-endorsed key is not.
    const vOther = new TaskVerifier(otherCa.certPem, clock);
    expect(vOther.addKeys([new TaskSigner(hostCreds, longAgo, tenYears).key])).toBe(0);
    expect(vOther.addKeys([new TaskSigner(otherCtl, longAgo, tenYears).key])).toBe(1);
    // Against our CA: the other CA's controller is a stranger.
    const v = new TaskVerifier(caPem, clock);
    expect(v.addKeys([new TaskSigner(otherCtl, longAgo, tenYears).key])).toBe(0);
    // An expired key is not taken.
    const shortLived = new TaskSigner(otherCtl, longAgo, 1000);
    expect(new TaskVerifier(otherCa.certPem, clock).addKeys([shortLived.key])).toBe(0);
  });
});

describe("batch signatures (one signature over a frame's tasks, a hash-tree proof each)", () => {
  const { signer, caPem } = testSigning();
  const verifier = () => {
    const v = new TaskVerifier(caPem, clock);
    v.addKeys([signer.key]);
    return v;
  };
  const specs = (n: number, job = "j1") => Array.from({ length: n }, (_, i) => taskSpec(`${job}-t${i}`, `h${i}`, { jobId: job, deliverByMs: clock.now() + 60_000 }));

  it("every task of batches of every shape verifies, all under one signature, with the shortest path its place allows", () => {
    for (const n of [2, 3, 4, 5, 7, 8, 9, 16, 17, 100, 1000]) {
      const tasks = signer.signAll(specs(n));
      const v = verifier();
      expect(new Set(tasks.map((t) => Buffer.from(t.signature).toString("hex"))).size).toBe(1);
      tasks.forEach((t, i) => {
        expect(t.batch).toMatchObject({ index: i, leaves: n });
        expect(t.batch!.path.length).toBeLessThanOrEqual(Math.ceil(Math.log2(n)));
        expect(v.verify(t).taskId).toBe(`j1-t${i}`);
      });
    }
    // A lone task keeps the plain signature: no proof.
    expect(signer.signAll(specs(1))[0]!.batch).toBeUndefined();
  });

  it("a tampered leaf, a task from outside the set, another batch's proof or a bent proof is refused", () => {
    const v = verifier();
    const tasks = signer.signAll(specs(5));
    const other = signer.signAll(specs(5, "j2"));
    const t = tasks[2]!;
    const flip = (b: Uint8Array, at: number) => Uint8Array.from(b, (x, i) => (i === at ? x ^ 1 : x));
    const bad: [string, ReturnType<typeof create<typeof SignedTaskSchema>>, RegExp][] = [
      ["tampered spec", create(SignedTaskSchema, { ...t, spec: flip(t.spec, 7) }), /does not match its batch/],
      // The same task readdressed to a host the batch never named.
      ["host outside the set", create(SignedTaskSchema, { ...t, spec: signer.signAll([taskSpec("j1-t2", "h9", { jobId: "j1", deliverByMs: clock.now() + 60_000 })])[0]!.spec }), /does not match its batch/],
      ["proof of another job", create(SignedTaskSchema, { ...t, batch: other[2]!.batch, signature: other[2]!.signature }), /does not match its batch/],
      ["another index", create(SignedTaskSchema, { ...t, batch: { ...t.batch!, index: 3 } }), /does not match its batch/],
      ["index out of range", create(SignedTaskSchema, { ...t, batch: { ...t.batch!, index: 5 } }), /malformed/],
      ["other leaf count", create(SignedTaskSchema, { ...t, batch: { ...t.batch!, leaves: 6 } }), /does not match its batch|malformed/],
      ["a hash too many", create(SignedTaskSchema, { ...t, batch: { ...t.batch!, path: [...t.batch!.path, new Uint8Array(32)] } }), /malformed/],
      ["a hash too few", create(SignedTaskSchema, { ...t, batch: { ...t.batch!, path: t.batch!.path.slice(1) } }), /malformed/],
      ["a short hash", create(SignedTaskSchema, { ...t, batch: { ...t.batch!, path: [t.batch!.path[0]!.subarray(1), ...t.batch!.path.slice(1)] } }), /malformed/],
      ["a bent sibling", create(SignedTaskSchema, { ...t, batch: { ...t.batch!, path: [flip(t.batch!.path[0]!, 0), ...t.batch!.path.slice(1)] } }), /does not match its batch/],
      ["the proof dropped", create(SignedTaskSchema, { ...t, batch: undefined }), /altered on the way/],
    ];
    for (const [what, task, why] of bad) expect(() => v.verify(task), what).toThrow(why);
    // The honest ones still pass, in any order, once the batch's signature is known to hold.
    for (const x of [...tasks].reverse()) expect(v.verify(x).taskId).toBe(peekId(x));
    // ... and a root remembered as verified lets nothing else through.
    for (const [what, task, why] of bad) expect(() => v.verify(task), `${what}, after`).toThrow(why);
  });

  it("a batch signature never passes for a lone task's, nor the reverse", () => {
    const v = verifier();
    const [a] = signer.signAll(specs(2));
    const lone = signer.sign(specs(1)[0]!);
    expect(() => v.verify(create(SignedTaskSchema, { ...a!, batch: undefined }))).toThrow(/altered/);
    expect(() => v.verify(create(SignedTaskSchema, { ...lone, batch: create(TaskBatchProofSchema, { index: 0, leaves: 1, salt: new Uint8Array(16) }) }))).toThrow(/does not match its batch/);
  });


  it("prepares a task as create(SignedTaskSchema) would make it, until it is sealed", () => {
    const [spec] = specs(1, "shape");
    const task = signer.prepare(spec!, true);
    expect(task).toStrictEqual(create(SignedTaskSchema, { spec: task.spec }));
    expect(fromBinary(TaskSpecSchema, task.spec).taskId).toBe("shape-t0");
  });

  it("a host that does not report the feature (a daemon of the previous release) gets its tasks signed alone, in the same frame", () => {
    const old = new TaskVerifierV1(caPem, clock);
    expect(old.addKeys([signer.key])).toBe(1);
    const frame = specs(4, "mixed").map((s, i) => signer.prepare(s, i % 2 === 0));
    signer.seal(frame);
    const wire = frame.map((t) => fromBinary(SignedTaskSchema, toBinary(SignedTaskSchema, t)));
    // Tasks 0 and 2 share a batch; 1 and 3 are signed alone, and the old verifier takes them.
    expect(wire.map((t) => t.batch?.leaves ?? 0)).toEqual([2, 0, 2, 0]);
    expect(old.verify(wire[1]!).taskId).toBe("mixed-t1");
    expect(old.verify(wire[3]!).taskId).toBe("mixed-t3");
    expect(() => old.verify(wire[0]!)).toThrow(/altered/);
    // The current verifier takes all four.
    const v = verifier();
    expect(wire.map((t) => v.verify(t).taskId)).toEqual(["mixed-t0", "mixed-t1", "mixed-t2", "mixed-t3"]);
    // A batch of one is a lone signature too.
    const [single] = [signer.prepare(specs(1, "one")[0]!, true)];
    signer.seal([single!, signer.prepare(specs(1, "two")[0]!, false)]);
    expect(single!.batch).toBeUndefined();
    expect(old.verify(single!).taskId).toBe("one-t0");
    expect(checksBatches(create(HostFactsSchema, { features: ["batch-signature"] }))).toBe(true);
    expect(checksBatches(create(HostFactsSchema, { tools: ["batch-signature"] }))).toBe(false);
    expect(checksBatches(undefined)).toBe(false);
  });

  it("the sibling hashes a host sees say nothing testable about its neighbours' tasks (salted leaves); salts and paths are bounded", () => {
    const mine = taskSpec("a-1", "web-1", { tenant: "acme", jobId: "ja", deliverByMs: clock.now() + 60_000 });
    const theirs = taskSpec("b-1", "db-1", { tenant: "globex", jobId: "jb", deliverByMs: clock.now() + 60_000, env: { DB_PASSWORD: "hunter2" } });
    const [a, b] = signer.signAll([mine, theirs]);
    const sibling = Buffer.from(a!.batch!.path[0]!).toString("hex");
    // Knowing the neighbour's exact bytes is not enough without its salt, which only the neighbour receives.
    expect(leafHash(new Uint8Array(16), b!.spec).toString("hex")).not.toBe(sibling);
    expect(leafHash(b!.batch!.salt, b!.spec).toString("hex")).toBe(sibling);
    expect(Buffer.from(a!.batch!.salt).equals(Buffer.from(b!.batch!.salt))).toBe(false);
    const v = verifier();
    const withBatch = (batch: Partial<{ salt: Uint8Array; path: Uint8Array[] }>) => create(SignedTaskSchema, { ...a!, batch: create(TaskBatchProofSchema, { ...a!.batch!, ...batch }) });
    expect(() => v.verify(withBatch({ salt: a!.batch!.salt.subarray(1) }))).toThrow(/malformed/);
    expect(() => v.verify(withBatch({ salt: new Uint8Array(0) }))).toThrow(/malformed/);
    expect(() => v.verify(withBatch({ salt: b!.batch!.salt }))).toThrow(/does not match its batch/);
    expect(() => v.verify(withBatch({ path: Array.from({ length: 21 }, () => new Uint8Array(32)) }))).toThrow(/malformed/);
    expect(v.verify(a!).taskId).toBe("a-1");
  });
});

const peekId = (t: { spec: Uint8Array }) => fromBinary(TaskSpecSchema, t.spec).taskId;

describe("SpecEncoder (a job's part of its tasks' specs encoded once)", () => {
  it("gives bytes that decode to exactly the spec, for tasks of one job, of jobs in turn, and after a change of any shared field", () => {
    const enc = new SpecEncoder();
    const steps = [create(StepSchema, { tool: { case: "exec", value: { argv: ["echo", "héllo"] } } })];
    const env = { A: "1" };
    const base = { jobId: "j1", tenant: "acme", steps, env, workingDir: "/tmp", stdin: new Uint8Array([1, 2]), timeout: { seconds: 5n, nanos: 0 }, deliverBy: { seconds: 99n, nanos: 1 }, idempotent: true, outputLimitBytes: 7n, createdAt: { seconds: 1n, nanos: 2 } };
    const variants: Partial<typeof base>[] = [
      {},
      { jobId: "j2" },
      { tenant: "other" },
      { steps: [create(StepSchema, { tool: { case: "exec", value: { argv: ["rm", "-rf", "/"] } } })] },
      { env: { A: "2" } },
      { workingDir: "/" },
      { stdin: new Uint8Array([3]) },
      { timeout: { seconds: 6n, nanos: 0 } },
      { deliverBy: { seconds: 99n, nanos: 2 } },
      { idempotent: false },
      { outputLimitBytes: 8n },
      { createdAt: { seconds: 1n, nanos: 3 } },
    ];
    let n = 0;
    for (const v of variants) {
      for (const host of ["h1", "hôte-2", ""]) {
        const spec = create(TaskSpecSchema, { ...base, ...v, taskId: `t${n++}`, hostId: host });
        const bytes = enc.encode(spec);
        // (a Buffer decodes its bytes fields as Buffers: compared as a daemon reads them, from a plain array)
        expect(fromBinary(TaskSpecSchema, new Uint8Array(bytes))).toEqual(fromBinary(TaskSpecSchema, toBinary(TaskSpecSchema, spec)));
      }
    }
  });

  it("compares every field a spec has besides its ids (a new field must be added to its check)", () => {
    // sameJobPart in common/task-signing.ts lists these; a field it does not compare would let one job's part be sent with another's.
    expect(TaskSpecSchema.fields.map((f) => f.name)).toEqual(["task_id", "job_id", "tenant", "host_id", "steps", "env", "working_dir", "stdin", "timeout", "deliver_by", "idempotent", "output_limit_bytes", "created_at"]);
  });

  it("signs the bytes it encoded: a batch of a job's tasks verifies at each host, and a spec altered in its shared part does not", () => {
    const { signer, caPem } = testSigning();
    const verifier = new TaskVerifier(caPem, clock);
    verifier.addKeys([signer.key]);
    const job = taskSpec("t0", "h0", { deliverByMs: clock.now() + 60_000 });
    const specs = ["h1", "h2", "h3"].map((h, i) => create(TaskSpecSchema, { ...job, taskId: `t${i + 1}`, hostId: h }));
    const tasks = signer.signAll(specs);
    for (const [i, t] of tasks.entries()) expect(verifier.verify(t)).toEqual(fromBinary(TaskSpecSchema, toBinary(TaskSpecSchema, specs[i]!)));
    const forged = create(SignedTaskSchema, { ...tasks[1]!, spec: new Uint8Array(tasks[1]!.spec) });
    forged.spec[forged.spec.length - 1]! ^= 1;
    expect(() => verifier.verify(forged)).toThrow(TaskRejected);
  });
});
