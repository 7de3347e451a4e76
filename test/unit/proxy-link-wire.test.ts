/**
 * The controller link's hand codecs at the proxy (common/proxy-link-wire.ts)
 * against protobuf-es: every frame a controller could send, decoded by hand,
 * must be exactly what decodeBounded makes of it (the same objects, values
 * and kinds of values, key order included), and every frame it refuses
 * refused the same way; every frame a proxy sends must encode to exactly the
 * bytes it sent through protobuf-es (`encodeWithWireOutput`: output chunks in
 * their wire form). Seeded random messages of every field combination, their
 * bytes mangled (cut, flipped, doubled, spliced), crafted byte strings, and
 * the frames the controller's own encoder writes; a task's signed bytes
 * reach the host unchanged.
 */
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { describe, expect, it } from "vitest";
import { Prng } from "../../chaos/prng.js";
import { decodeAgentRequest, encodeAgentResponse, newAgentResponse, newTaskStatus } from "../../common/agent-link-wire.js";
import { handDecoderOf, handEncoderOf } from "../../common/hand-codecs.js";
import { MAX_MESSAGE_ELEMENTS } from "../../common/decode-budget.js";
import { encodeWithWireOutput } from "../../common/output-wire.js";
import { decodeProxyResponse, encodeProxyRequest, newProxyRequest, readProxyResponse, writeProxyRequest } from "../../common/proxy-link-wire.js";
import { ackRunsOf, StatusRunBuilder } from "../../common/status-runs.js";
import { peekSpec, SpecDecoder } from "../../common/task-signing.js";
import { tasksAsWire } from "../../controller/signed-task-wire.js";
import { AgentStreamRequestSchema, AgentStreamResponseSchema } from "../../gen/rexmesh/v1/agent_link_pb.js";
import { ProxyStreamRequestSchema, ProxyStreamResponseSchema, type ProxyStreamRequest, type ProxyStreamResponse } from "../../gen/rexmesh/v1/proxy_link_pb.js";
import { OutputChunkSchema, StepSchema, TaskState, TaskStatusSchema } from "../../gen/rexmesh/v1/task_pb.js";
import { taskSpec, testSigning } from "./support.js";
import { chunk, difference, expectSameHandDecode, expectSameHandEncode, handDecodeDifference, i32, overlong, seededDecodeTests, status, task, text, u32, u64, varint } from "./wire-diff.js";

const decodeDifference = (bytes: Uint8Array) => handDecodeDifference(ProxyStreamResponseSchema, decodeProxyResponse, bytes);
const expectSameDecode = (bytes: Uint8Array, what: string) => expectSameHandDecode(ProxyStreamResponseSchema, decodeProxyResponse, bytes, what);
/** What the proxy sent before: protobuf-es, its output chunks in their wire form. */
const reference = encodeWithWireOutput(ProxyStreamRequestSchema);
const expectSameEncode = (msg: ProxyStreamRequest, what: string) => expectSameHandEncode(encodeProxyRequest, reference, msg, what);

// ---- seeded random messages --------------------------------------------------

function response(p: Prng): ProxyStreamResponse {
  const m = create(ProxyStreamResponseSchema);
  if (p.chance(0.04)) m.welcome = { $typeName: "rexmesh.v1.ProxyWelcome", heartbeatMs: u32(p), presenceNonce: new Uint8Array(p.bytes(8)), features: ["status-runs"] };
  for (let i = p.chance(0.6) ? p.int(1, 5) : 0; i > 0; i--) m.tasks.push(task(p));
  for (let i = p.chance(0.2) ? p.int(1, 3) : 0; i > 0; i--) m.cancels.push({ $typeName: "rexmesh.v1.CancelTask", taskId: text(p), hostId: text(p), withdraw: p.chance(0.5) });
  for (let i = p.chance(0.3) ? p.int(1, 3) : 0; i > 0; i--) m.outputAcks.push({ $typeName: "rexmesh.v1.OutputAck", taskId: text(p), seq: u64(p) });
  for (let i = p.chance(0.3) ? p.int(1, 3) : 0; i > 0; i--) m.statusAcks.push({ $typeName: "rexmesh.v1.StatusAck", taskId: text(p), state: i32(p), atProxy: p.chance(0.5) });
  if (p.chance(0.03)) m.signingKeys.push({ $typeName: "rexmesh.v1.TaskSigningKey", keyId: "k", publicKey: new Uint8Array(p.bytes(4)), endorsement: new Uint8Array(0), controllerCertificate: "", x25519PublicKey: new Uint8Array(0) } as never);
  if (p.chance(0.02)) m.denyList = { $typeName: "rexmesh.v1.SignedDenyList", list: new Uint8Array(p.bytes(3)), signature: new Uint8Array(0), keyId: "" } as never;
  if (p.chance(0.2)) m.replay = true;
  if (p.chance(0.3)) m.ping = u32(p);
  if (p.chance(0.3)) m.pong = u32(p);
  if (p.chance(0.02)) m.sessions.push({ $typeName: "rexmesh.v1.SignedSessionOrder", order: new Uint8Array(p.bytes(5)), signature: new Uint8Array(0), keyId: "k" } as never);
  for (let i = p.chance(0.1) ? p.int(1, 3) : 0; i > 0; i--) m.eventAcks.push({ $typeName: "rexmesh.v1.EventAck", hostId: text(p), eventId: text(p) });
  for (let i = p.chance(0.4) ? p.int(1, 3) : 0; i > 0; i--) {
    m.statusAckRuns.push({ $typeName: "rexmesh.v1.StatusAckRun", state: i32(p), atProxy: p.chance(0.5), taskIds: Array.from({ length: p.int(0, 6) }, () => text(p)) });
  }
  if (p.chance(0.03)) m.$unknown = [{ no: 50, wireType: 2, data: new Uint8Array([0]) }];
  return m;
}

function request(p: Prng): ProxyStreamRequest {
  const m = create(ProxyStreamRequestSchema);
  if (p.chance(0.03)) m.hello = { $typeName: "rexmesh.v1.ProxyHello", name: text(p), region: "r", heartbeatMs: u32(p), hosts: [], features: ["status-runs"] };
  if (p.chance(0.03)) m.hosts.push({ $typeName: "rexmesh.v1.HostPresence", hostId: text(p), tenant: "t", connected: true, proof: new Uint8Array(0), proofSalt: new Uint8Array(0) });
  for (let i = p.chance(0.5) ? p.int(1, 4) : 0; i > 0; i--) m.statuses.push(status(p));
  for (let i = p.chance(0.3) ? p.int(1, 4) : 0; i > 0; i--) m.output.push(chunk(p));
  if (p.chance(0.2)) m.load = { $typeName: "rexmesh.v1.ProxyLoad", connectedHosts: u32(p), queuedTasks: p.chance(0.5) ? u32(p) : 0, runningTasks: p.chance(0.5) ? u32(p) : 0 };
  if (p.chance(0.3)) m.ping = u32(p);
  if (p.chance(0.3)) m.pong = u32(p);
  if (p.chance(0.03)) m.events.push({ $typeName: "rexmesh.v1.HostEvent", id: text(p), hostId: "", tenant: "", kind: "k", details: {}, watcher: "", keyId: "", signature: new Uint8Array(0) } as never);
  for (let i = p.chance(0.5) ? p.int(1, 3) : 0; i > 0; i--) {
    const n = p.int(0, 6);
    m.statusRuns.push({
      $typeName: "rexmesh.v1.StatusRun",
      state: i32(p),
      atProxy: p.chance(0.3),
      ...(p.chance(0.5) ? { exitCode: i32(p) } : {}),
      signal: p.chance(0.2) ? text(p) : "",
      message: p.chance(0.5) ? text(p) : "",
      ...(p.chance(0.7) ? { time: p.chance(0.9) ? timestampFromMs(p.int(0, 2 ** 42)) : { $typeName: "google.protobuf.Timestamp", seconds: BigInt(p.int(-5, 5)), nanos: i32(p) } } : {}),
      taskIds: Array.from({ length: n }, () => text(p)),
      hostIds: Array.from({ length: p.chance(0.9) ? n : p.int(0, 6) }, () => text(p)),
    });
  }
  if (p.chance(0.03)) m.$unknown = [{ no: 99, wireType: 0, data: new Uint8Array([p.int(0, 127)]) }];
  return m;
}

const SEEDS = 4000;

describe("decodeProxyResponse", () => {
  // The frames not read by hand hold a welcome, keys, a deny-list, session orders, unknown fields or values past 2^49.
  seededDecodeTests(ProxyStreamResponseSchema, { decode: decodeProxyResponse, read: readProxyResponse }, response, SEEDS);

  it("takes the common frames itself, not through protobuf-es, and leaves the rest to it (crafted)", () => {
    const msg = (tag: number, fields: number[]) => [...varint(tag), ...varint(fields.length), ...fields];
    const task = (fields: number[]) => msg(0x12, fields);
    const proof = (fields: number[]) => msg(0x22, fields);
    const cases: [string, number[], "hand" | "left"][] = [
      ["empty frame", [], "hand"],
      ["a ping task (its spec alone)", task([0x0a, 3, 1, 2, 3]), "hand"],
      ["a task with an empty spec given", task([0x0a, 0]), "hand"],
      ["a signed task with its proof", task([0x0a, 1, 9, 0x12, 2, 7, 7, 0x1a, 1, 0x6b, ...proof([0x08, 3, 0x10, 8, 0x1a, 2, 1, 2, 0x1a, 0, 0x22, 1, 5])]), "hand"],
      ["a proof given twice in one task: merged by protobuf-es", task([...proof([0x08, 3]), ...proof([0x1a, 1, 4])]), "left"],
      ["an empty proof", task(proof([])), "hand"],
      ["an index of 2^32 - 1", task(proof([0x08, ...varint(2 ** 32 - 1)])), "hand"],
      ["an index overlong in 6 bytes", task(proof([0x08, ...overlong(3, 6)])), "left"],
      ["replay", [0x40, 1], "hand"],
      ["replay of 2 (true, as for protobuf-es)", [0x40, 2], "hand"],
      ["replay as an overlong varint", [0x40, 0x81, 0x00], "left"],
      ["ping and pong", [0x48, ...varint(2 ** 32 - 1), 0x50, 1], "hand"],
      ["an ack run", msg(0xaa, [0x08, 6, 0x10, 1, 0x1a, 2, 0x74, 0x31, 0x1a, 0]), "hand"],
      ["an ack run with a negative state", msg(0xaa, [0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]), "left"],
      ["a status ack", msg(0x2a, [0x0a, 1, 0x61, 0x10, 7, 0x18, 1]), "hand"],
      ["a status ack's state -1 in 5 bytes (as protobuf-es reads an int32)", msg(0x2a, [0x10, 0xff, 0xff, 0xff, 0xff, 0x0f]), "hand"],
      ["an ack run's state -2 in 5 bytes", msg(0xaa, [0x08, 0xfe, 0xff, 0xff, 0xff, 0x0f, 0x1a, 1, 0x61]), "hand"],
      ["an output ack at 2^49 - 1", msg(0x22, [0x10, ...varint(2 ** 49 - 1)]), "hand"],
      ["an output ack at 2^49", msg(0x22, [0x10, ...varint(2 ** 49)]), "left"],
      ["a cancel", msg(0x1a, [0x0a, 1, 0x61, 0x12, 1, 0x62, 0x18, 1]), "hand"],
      ["an event ack", msg(0xa2, [0x0a, 1, 0x68, 0x12, 1, 0x65]), "hand"],
      ["a welcome", msg(0x0a, [0x08, 5]), "left"],
      ["a deny-list", msg(0x3a, [0x0a, 1, 1]), "left"],
      ["an unknown field", [0xf8, 0x07, 1], "left"],
      ["a task as a varint", [0x10, 5], "left"],
      ["replay as length-delimited", [0x42, 1, 1], "left"],
      ["a key id of invalid UTF-8", task([0x1a, 2, 0xc3, 0x28]), "left"],
      ["a BOM-led task id in an ack run", msg(0xaa, [0x1a, 4, 0xef, 0xbb, 0xbf, 0x61]), "hand"],
      ["a task whose field runs past its end", [0x12, 2, 0x0a, 3, 1, 2, 3], "left"],
      ["a task shorter than its field, the frame long enough", [0x12, 1, 0x0a, 2, 1, 2], "left"],
      ["a truncated tag", [0x80], "left"],
      ["a group", [0x0b, 0x0c], "left"],
      ["field number 0", [0x00, 1], "left"],
    ];
    for (const [what, bytes, path] of cases) {
      expectSameDecode(new Uint8Array(bytes), what);
      expect(readProxyResponse(new Uint8Array(bytes)) !== undefined, what).toBe(path === "hand");
    }
  });

  it("refuses a frame over the element budget as decodeBounded does, and takes one at it", () => {
    // One task (an element) holding its spec given again and again (an element each, two bytes).
    const frame = (elements: number) => {
      const body = new Uint8Array((elements - 1) * 2);
      for (let i = 0; i < body.length; i += 2) body[i] = 0x0a;
      return new Uint8Array([0x12, ...varint(body.length), ...body]);
    };
    expect(readProxyResponse(frame(MAX_MESSAGE_ELEMENTS))?.tasks).toHaveLength(1);
    expect(decodeDifference(frame(MAX_MESSAGE_ELEMENTS))).toBeUndefined();
    expect(() => decodeProxyResponse(frame(MAX_MESSAGE_ELEMENTS + 1))).toThrow(/more than 1000000 elements/);
    // A million and one empty tasks or ack runs, and the same with a field left to protobuf-es at the end: refused
    // alike, counted before any object is made.
    for (const tag of [0x12, 0x2a]) {
      const flood = new Uint8Array(2 * (MAX_MESSAGE_ELEMENTS + 1));
      for (let i = 0; i < flood.length; i += 2) flood[i] = tag;
      expect(() => decodeProxyResponse(flood)).toThrow(/more than 1000000 elements/);
      expect(() => decodeProxyResponse(new Uint8Array([...flood.subarray(2), 0x0a, 0x00]))).toThrow(/more than 1000000 elements/);
    }
  });
});

describe("encodeProxyRequest", () => {
  it("writes every field combination byte for byte as protobuf-es did, most of them by hand (seeded)", () => {
    let byHand = 0;
    for (let seed = 1; seed <= SEEDS; seed++) {
      const msg = request(new Prng(seed));
      expectSameEncode(msg, `seed ${seed}`);
      const mine = writeProxyRequest(msg);
      if (mine) {
        expect(Buffer.from(mine).equals(reference(msg)), `seed ${seed}`).toBe(true);
        byHand++;
      }
    }
    // The rest hold a hello, presence, events, unknown fields or values past 2^53: left to protobuf-es.
    expect(byHand).toBeGreaterThan(SEEDS * 0.5);
  });

  it("writes a proxy's statuses in runs as the controller reads them back", () => {
    const b = new StatusRunBuilder();
    const time = timestampFromMs(1_700_000_000_123);
    for (let i = 0; i < 500; i++) b.add(create(TaskStatusSchema, { taskId: `t${i}`, hostId: `h${i}`, state: TaskState.SUCCEEDED, time, exitCode: 0, message: "pong" }));
    b.add(create(TaskStatusSchema, { taskId: "t9", hostId: "h9", state: TaskState.SUCCEEDED, endMac: new Uint8Array([1, 2]), endMacKeyId: "k", outputBytes: 12n, outputSha256: new Uint8Array(32) }));
    const frame = newProxyRequest();
    frame.statusRuns = b.runs;
    frame.statuses = b.statuses;
    frame.output.push(create(OutputChunkSchema, { taskId: "t9", seq: 1n, data: new Uint8Array([104, 105]), hostId: "h9" }));
    frame.load = { $typeName: "rexmesh.v1.ProxyLoad", connectedHosts: 500, queuedTasks: 0, runningTasks: 3 };
    const mine = writeProxyRequest(frame);
    expect(mine).toBeDefined();
    expect(Buffer.from(mine!).equals(reference(frame))).toBe(true);
    const back = fromBinary(ProxyStreamRequestSchema, mine!);
    expect(back.statusRuns[0]!.taskIds).toHaveLength(500);
    expect([...back.statuses[0]!.endMac]).toEqual([1, 2]);
    expect(Buffer.from(back.output[0]!.data).toString()).toBe("hi");
  });

  it("refuses what protobuf-es refuses, and writes edge values as it does", () => {
    const base = () => create(ProxyStreamRequestSchema, { statuses: [create(TaskStatusSchema, { taskId: "t", state: TaskState.RUNNING })] });
    const run = (init: object) => ({ $typeName: "rexmesh.v1.StatusRun" as const, state: TaskState.SUCCEEDED, atProxy: false, signal: "", message: "", taskIds: ["a"], hostIds: ["b"], ...init });
    const cases: [string, (m: ProxyStreamRequest) => void][] = [
      ["ping -1", (m) => (m.ping = -1)],
      ["ping 2^32", (m) => (m.ping = 2 ** 32)],
      ["ping 1.5", (m) => (m.ping = 1.5)],
      ["pong 2^32 - 1", (m) => (m.pong = 2 ** 32 - 1)],
      ["a state 2^31", (m) => (m.statuses[0]!.state = 2 ** 31)],
      ["a negative state", (m) => (m.statuses[0]!.state = -3 as TaskState)],
      ["an exit code 0", (m) => (m.statuses[0]!.exitCode = 0)],
      ["a negative exit code", (m) => (m.statuses[0]!.exitCode = -1)],
      ["an exit code 1.5", (m) => (m.statuses[0]!.exitCode = 1.5)],
      ["a time before 1970", (m) => (m.statuses[0]!.time = { $typeName: "google.protobuf.Timestamp", seconds: -5n, nanos: 0 })],
      ["a time with negative nanos", (m) => (m.statuses[0]!.time = { $typeName: "google.protobuf.Timestamp", seconds: 5n, nanos: -1 })],
      ["a time at 2^53 seconds", (m) => (m.statuses[0]!.time = { $typeName: "google.protobuf.Timestamp", seconds: 2n ** 53n, nanos: 0 })],
      ["output chunks 2^64 - 1", (m) => (m.statuses[0]!.outputChunks = 2n ** 64n - 1n)],
      ["output bytes -1", (m) => (m.statuses[0]!.outputBytes = -1n)],
      ["a message with a lone surrogate", (m) => (m.statuses[0]!.message = "x\uD800y")],
      ["a long message", (m) => (m.statuses[0]!.message = "é".repeat(300))],
      ["a load of 2^32", (m) => (m.load = { $typeName: "rexmesh.v1.ProxyLoad", connectedHosts: 2 ** 32, queuedTasks: 0, runningTasks: 0 })],
      ["an empty load", (m) => (m.load = { $typeName: "rexmesh.v1.ProxyLoad", connectedHosts: 0, queuedTasks: 0, runningTasks: 0 })],
      ["a run with an exit code and a time", (m) => m.statusRuns.push(run({ exitCode: 0, time: timestampFromMs(5) }))],
      ["a run of a state 2^31", (m) => m.statusRuns.push(run({ state: 2 ** 31 }))],
      ["a run with unknown fields", (m) => m.statusRuns.push(run({ $unknown: [{ no: 30, wireType: 0, data: new Uint8Array([1]) }] }))],
      ["a chunk with seq 2^64 - 1", (m) => m.output.push(create(OutputChunkSchema, { taskId: "t", seq: 2n ** 64n - 1n }))],
      ["presence", (m) => m.hosts.push({ $typeName: "rexmesh.v1.HostPresence", hostId: "h", tenant: "t", connected: true, proof: new Uint8Array(0), proofSalt: new Uint8Array(0) })],
    ];
    for (const [what, change] of cases) {
      const m = base();
      change(m);
      expectSameEncode(m, what);
    }
  });

  it("leaves the writer clean after a frame it left to protobuf-es", () => {
    const bad = create(ProxyStreamRequestSchema, { statuses: [create(TaskStatusSchema, { taskId: "t" })], ping: -1 });
    expect(() => encodeProxyRequest(bad)).toThrow();
    expectSameEncode(create(ProxyStreamRequestSchema, { statuses: [create(TaskStatusSchema, { taskId: "u" })] }), "after a refused frame");
  });

  it("makes the empty frames and statuses create() makes, keys in the same order", () => {
    expect(difference(newProxyRequest(), create(ProxyStreamRequestSchema))).toBeUndefined();
    expect(difference(newAgentResponse(), create(AgentStreamResponseSchema))).toBeUndefined();
    expect(difference(newTaskStatus(), create(TaskStatusSchema))).toBeUndefined();
    // As the proxy fills one for its own copy of a task (ProxyCore.ownStatus): a time added last, as create() adds it.
    const time = timestampFromMs(1_700_000_000_000);
    const own = Object.assign(newTaskStatus(), { taskId: "t", state: TaskState.QUEUED, message: "m", hostId: "h", atProxy: true, time });
    expect(difference(own, create(TaskStatusSchema, { taskId: "t", hostId: "h", state: TaskState.QUEUED, time, message: "m", atProxy: true }))).toBeUndefined();
  });
});

describe("where the hand codecs apply", () => {
  it("the proxy's directions of both links only: a daemon and the controller keep protobuf-es", () => {
    expect(handDecoderOf(ProxyStreamResponseSchema)).toBe(decodeProxyResponse);
    expect(handEncoderOf(ProxyStreamRequestSchema)).toBe(encodeProxyRequest);
    expect(handDecoderOf(AgentStreamRequestSchema)).toBe(decodeAgentRequest);
    expect(handEncoderOf(AgentStreamResponseSchema)).toBe(encodeAgentResponse);
    // What the controller reads and writes on this link, and what a daemon reads and writes on its own.
    expect(handDecoderOf(ProxyStreamRequestSchema)).toBeUndefined();
    expect(handEncoderOf(ProxyStreamResponseSchema)).toBeUndefined();
    expect(handEncoderOf(AgentStreamRequestSchema)).toBeUndefined();
    expect(handDecoderOf(AgentStreamResponseSchema)).toBeUndefined();
  });
});
