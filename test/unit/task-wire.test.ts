import { create, equals, fromBinary, toBinary } from "@bufbuild/protobuf";
import { BinaryWriter } from "@bufbuild/protobuf/wire";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { describe, expect, it } from "vitest";
import { Prng } from "../../chaos/prng.js";
import { encodeOutputChunk } from "../../common/output-wire.js";
import { ProtoWriter } from "../../common/proto-wire.js";
import { encodeTask, taskToProto, watchResponse, type WatchFrame } from "../../controller/task-wire.js";
import type { LateReport, TaskRecord } from "../../controller/model.js";
import { JobSchema, JobState, ResultCheck, SubmitAndWatchResponseSchema, TaskSchema, WatchJobResponseSchema } from "../../gen/rexmesh/v1/controller_pb.js";
import { OutputChunkSchema, OutputStream, TaskState, type Step } from "../../gen/rexmesh/v1/task_pb.js";
import { execStep } from "./support.js";

const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");

/** What protobuf-es makes of the task as an element of a repeated field: its length, then the message. */
function reference(t: TaskRecord, steps?: Step[]): Uint8Array {
  return new BinaryWriter().bytes(toBinary(TaskSchema, taskToProto(t, steps))).finish();
}

const enumValues = (e: object) => Object.values(e).filter((v): v is number => typeof v === "number");
const STATES = enumValues(TaskState);
const CHECKS = enumValues(ResultCheck);

const STRINGS = [
  "",
  "a",
  "t-0001",
  "tâsk-ünïcode-✓",
  "😀 emoji, a surrogate pair",
  "lone \ud800 surrogate",
  "trailing lone \udfff",
  "x".repeat(42),
  "x".repeat(127),
  "x".repeat(128),
  "✓".repeat(42), // 126 bytes: the one-byte length, non-ASCII
  "é".repeat(43), // 86 bytes from 43 characters: past the short path's bound, length still one byte
  "✓".repeat(43), // 129 bytes: a two-byte length
  "ü".repeat(8200), // 16,400 bytes: a three-byte length
  "line one\nline two\ttab\0nul",
];
const INT32S = [0, 1, -1, 2, 127, 128, 255, 16_383, 16_384, 0x7fffffff, -0x80000000, -129, 137];
const COUNTS = [0, 1, 127, 128, 16_383, 16_384, 2 ** 32, 2 ** 35 + 7, Number.MAX_SAFE_INTEGER];
const TIMES = [0, 1, 999, 1000, 1001, 1_700_000_000_123, 1_700_000_000_000, Number.MAX_SAFE_INTEGER];
/** Times the hand encoder leaves to protobuf-es (no clock gives them): the result must be the same. */
const ODD_TIMES = [-1, -1500, 1.5, 1234.25];

function randomString(p: Prng): string {
  if (p.chance(0.6)) return p.pick(STRINGS);
  const n = p.int(0, 300);
  let s = "";
  for (let i = 0; i < n; i++) s += String.fromCharCode(p.chance(0.9) ? p.int(0x20, 0x7e) : p.int(0x80, 0xffff));
  return s;
}

const randomInt32 = (p: Prng) => (p.chance(0.7) ? p.pick(INT32S) : p.u32() | 0);
const randomCount = (p: Prng) => (p.chance(0.7) ? p.pick(COUNTS) : p.int(0, 1_000_000));
const randomTime = (p: Prng) => (p.chance(0.05) ? p.pick(ODD_TIMES) : p.chance(0.5) ? p.pick(TIMES) : 1_600_000_000_000 + p.int(0, 2 ** 31));

function randomLate(p: Prng): LateReport {
  return {
    state: p.chance(0.1) ? 0 : p.pick(STATES),
    exitCode: p.chance(0.3) ? undefined : randomInt32(p),
    signal: randomString(p),
    message: randomString(p),
    time: randomTime(p),
  };
}

function randomTask(p: Prng): TaskRecord {
  const outputChunks = randomCount(p);
  const state = p.chance(0.03) ? p.pick([-1, 99, 0x7fffffff]) : p.pick(STATES);
  return {
    id: randomString(p),
    jobId: randomString(p),
    tenant: randomString(p),
    hostId: randomString(p),
    region: randomString(p),
    proxy: randomString(p),
    state,
    exitCode: p.chance(0.3) ? undefined : randomInt32(p),
    signal: randomString(p),
    message: randomString(p),
    updatedAt: randomTime(p),
    outputChunks,
    // Often exactly or below the count, so that output_complete is set on terminal tasks.
    expectedChunks: p.chance(0.3) ? undefined : p.chance(0.5) ? Math.max(0, outputChunks - p.int(0, 1)) : randomCount(p),
    outputTruncated: p.chance(0.5),
    resultCheck: p.chance(0.3) ? undefined : p.pick(CHECKS),
    late: p.chance(0.3) ? randomLate(p) : undefined,
  };
}

describe("a task in its wire form", () => {
  it("is byte for byte what protobuf-es makes of taskToProto, over 20,000 seeded random tasks", () => {
    const p = new Prng(20_240_611);
    const seen = { complete: 0, late: 0, exit0: 0, noExit: 0, negExit: 0, steps: 0, long: 0 };
    for (let i = 0; i < 20_000; i++) {
      const t = randomTask(p);
      const steps = p.chance(0.05) ? [execStep("echo", randomString(p)), execStep("true")] : undefined;
      const want = reference(t, steps);
      const got = encodeTask(t, steps);
      if (hex(got) !== hex(want)) expect({ i, task: t, got: hex(got) }).toEqual({ i, task: t, got: hex(want) });
      const proto = taskToProto(t, steps);
      if (proto.outputComplete) seen.complete++;
      if (t.late) seen.late++;
      if (t.exitCode === 0) seen.exit0++;
      if (t.exitCode === undefined) seen.noExit++;
      if ((t.exitCode ?? 0) < 0) seen.negExit++;
      if (steps) seen.steps++;
      if (want.length > 16_384) seen.long++;
    }
    // The seed covers every case this test is for.
    for (const [what, n] of Object.entries(seen)) expect(n, what).toBeGreaterThan(50);
  });

  it("covers every state and result check, with and without a late report, at the edges of each field", () => {
    const base: TaskRecord = { id: "t1", jobId: "j1", tenant: "acme", hostId: "h1", region: "eu", proxy: "px1", state: TaskState.SUCCEEDED, signal: "", message: "", updatedAt: 1_700_000_000_123, outputChunks: 3, outputTruncated: false };
    const cases: TaskRecord[] = [
      { ...base, id: "", jobId: "", hostId: "", region: "", proxy: "", state: TaskState.UNSPECIFIED, updatedAt: 0, outputChunks: 0 },
      ...STATES.flatMap((state) => CHECKS.map((resultCheck) => ({ ...base, state, resultCheck }))),
      ...STATES.map((state) => ({ ...base, state, expectedChunks: 3 })), // complete once terminal
      ...STATES.map((state) => ({ ...base, state, expectedChunks: 4 })), // never complete
      ...INT32S.map((exitCode) => ({ ...base, exitCode })),
      { ...base, exitCode: undefined },
      ...COUNTS.map((outputChunks) => ({ ...base, outputChunks, expectedChunks: outputChunks })),
      ...[...TIMES, ...ODD_TIMES].map((updatedAt) => ({ ...base, updatedAt })),
      ...STRINGS.map((s) => ({ ...base, signal: s, message: s, hostId: s })),
      ...STATES.map((state) => ({ ...base, state: TaskState.LOST, late: { state, signal: "", message: "", time: 0 } })),
      { ...base, late: { state: TaskState.FAILED, exitCode: 0, signal: "SIGKILL", message: "ü".repeat(100), time: 1_700_000_000_999 } },
      { ...base, late: { state: TaskState.FAILED, exitCode: -2, signal: "", message: "", time: -5 } },
      { ...base, outputTruncated: true, message: "x".repeat(20_000) },
    ];
    for (const t of cases) expect(hex(encodeTask(t))).toBe(hex(reference(t)));
    expect(hex(encodeTask(base, []))).toBe(hex(reference(base, [])));
    const steps = [execStep("sh", "-c", "é".repeat(500))];
    expect(hex(encodeTask(base, steps))).toBe(hex(reference(base, steps)));
  });

  it("writes what protobuf-es refuses to encode the way protobuf-es does: it throws", () => {
    const t: TaskRecord = { id: "t1", jobId: "j1", tenant: "acme", hostId: "h1", region: "", proxy: "", state: TaskState.FAILED, exitCode: 2 ** 31, signal: "", message: "", updatedAt: 0, outputChunks: 0, outputTruncated: false };
    expect(() => reference(t)).toThrow();
    expect(() => encodeTask(t)).toThrow();
    expect(() => encodeTask({ ...t, exitCode: 1, outputChunks: 1.5 })).toThrow();
  });

  it("writes negative int32 values sign-extended to ten bytes, and nested lengths past one byte in place", () => {
    const w = new ProtoWriter();
    expect(hex(w.reset().int32(1, -1).finish())).toBe("08ffffffffffffffffff01");
    expect(hex(w.reset().int32(1, -0x80000000).finish())).toBe("0880808080f8ffffffff01");
    const body = "y".repeat(200);
    w.reset().tag(2, 2).fork().string(1, body).join();
    expect(hex(w.finish())).toBe(hex(new BinaryWriter().tag(2, 2).fork().tag(1, 2).string(body).join().finish()));
  });
});

describe("a watch response with its tasks in their wire form", () => {
  const p = new Prng(7);
  const tasks = Array.from({ length: 300 }, () => randomTask(p)).filter((t) => Number.isSafeInteger(t.updatedAt));
  const output = [0, 1, 2].map((i) => create(OutputChunkSchema, { taskId: tasks[i]!.id, seq: BigInt(i + 1), stream: OutputStream.STDOUT, data: Buffer.from(`out ${i} ✓\n`), hostId: tasks[i]!.hostId }));
  const job = create(JobSchema, { id: "j1", tenant: "acme", submittedBy: "alice", state: JobState.RUNNING, createdAt: timestampFromMs(1_700_000_000_000), taskCount: tasks.length });
  const frames: WatchFrame[] = [
    { job, tasks, output },
    { tasks, output: [] },
    { tasks: [], output },
    { job, tasks: [], output: [] },
    { tasks: tasks.slice(0, 1), output: output.slice(0, 1) },
  ];

  for (const schema of [WatchJobResponseSchema, SubmitAndWatchResponseSchema]) {
    it(`${schema.typeName}: encodes to the ordinary message's bytes and decodes to the same message`, () => {
      for (const frame of frames) {
        const plain = create(schema, { job: frame.job, tasks: frame.tasks.map((t) => taskToProto(t)), output: frame.output });
        const ordinary = toBinary(schema, plain);
        const wire = toBinary(schema, watchResponse(schema, frame, true));
        expect(hex(wire)).toBe(hex(ordinary));
        // (Decoded, not compared with `plain`: a lone surrogate comes back as U+FFFD either way.)
        const decoded = fromBinary(schema, wire);
        expect(equals(schema, decoded, fromBinary(schema, ordinary))).toBe(true);
        expect(decoded.tasks).toHaveLength(frame.tasks.length);
        expect(decoded.$unknown ?? []).toEqual([]);
        // Without the wire form (a JSON call): the ordinary message, tasks as fields.
        const json = watchResponse(schema, frame, false);
        expect(json.$unknown ?? []).toEqual([]);
        expect(equals(schema, json, plain)).toBe(true);
      }
    });
  }

  it("uses an output chunk's wire form too, and leaves the chunks given as they were", () => {
    const before = output.map((c) => hex(encodeOutputChunk(c)));
    const msg = watchResponse(WatchJobResponseSchema, { tasks: [], output }, true);
    expect(msg.output).toEqual([]);
    expect(msg.$unknown?.map((u) => u.no)).toEqual([3, 3, 3]);
    expect(output.map((c) => hex(encodeOutputChunk(c)))).toEqual(before);
  });
});
