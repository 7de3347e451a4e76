/**
 * The host link's hand codecs (common/agent-link-wire.ts) against protobuf-es:
 * every frame a host could send, decoded by hand, must be exactly what
 * decodeBounded makes of it (the same objects, values and kinds of values),
 * and every frame it refuses must be refused the same way; every frame a
 * proxy sends must encode to exactly toBinary's bytes. Seeded random
 * messages of every field combination, their bytes mangled (cut, flipped,
 * doubled, spliced), and crafted byte strings (overlong varints, wrong wire
 * types, fields given twice, packed and unpacked lists, unknown fields,
 * invalid UTF-8, the element budget).
 */
import { create, toBinary, type MessageShape } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { describe, expect, it } from "vitest";
import { Prng } from "../../chaos/prng.js";
import { bytesOf, chunk, difference, expectSameHandDecode, expectSameHandEncode, handDecodeDifference, i32, overlong, seededDecodeTests, status, task, text, u32, u64, varint } from "./wire-diff.js";
import { decodeAgentRequest, encodeAgentResponse, readAgentRequest, writeAgentResponse } from "../../common/agent-link-wire.js";
import { decodeBounded, MAX_MESSAGE_ELEMENTS } from "../../common/decode-budget.js";
import { AgentStreamRequestSchema, AgentStreamResponseSchema, type AgentStreamRequest, type AgentStreamResponse } from "../../gen/rexmesh/v1/agent_link_pb.js";
import { OutputChunkSchema, SignedTaskSchema, TaskBatchProofSchema, TaskStatusSchema, type TaskState } from "../../gen/rexmesh/v1/task_pb.js";

const decodeDifference = (bytes: Uint8Array) => handDecodeDifference(AgentStreamRequestSchema, decodeAgentRequest, bytes);
const expectSameDecode = (bytes: Uint8Array, what: string) => expectSameHandDecode(AgentStreamRequestSchema, decodeAgentRequest, bytes, what);
const expectSameEncode = (msg: AgentStreamResponse, what: string) => expectSameHandEncode(encodeAgentResponse, (m) => toBinary(AgentStreamResponseSchema, m), msg, what);

// ---- seeded random messages --------------------------------------------------

function request(p: Prng): AgentStreamRequest {
  const m = create(AgentStreamRequestSchema);
  if (p.chance(0.05)) m.hello = { $typeName: "rexmesh.v1.AgentHello", hostId: text(p), heartbeatMs: u32(p), pingMs: 0 };
  for (let i = p.chance(0.6) ? p.int(1, 4) : 0; i > 0; i--) m.statuses.push(status(p));
  for (let i = p.chance(0.4) ? p.int(1, 4) : 0; i > 0; i--) m.output.push(chunk(p));
  if (p.chance(0.5)) m.credits = u32(p);
  if (p.chance(0.1)) m.presenceProof = bytesOf(p);
  if (p.chance(0.1)) m.presenceNonce = bytesOf(p);
  if (p.chance(0.1)) m.presenceSalt = bytesOf(p);
  if (p.chance(0.3)) m.ping = u32(p);
  if (p.chance(0.3)) m.pong = u32(p);
  if (p.chance(0.05)) m.events.push({ $typeName: "rexmesh.v1.HostEvent", id: text(p), hostId: "", tenant: "", kind: "k", details: { a: "b" }, watcher: "", keyId: "", signature: new Uint8Array(0) });
  if (p.chance(0.05)) m.$unknown = [{ no: 99, wireType: 0, data: new Uint8Array([p.int(0, 127)]) }];
  return m;
}

function response(p: Prng): AgentStreamResponse {
  const m = create(AgentStreamResponseSchema);
  if (p.chance(0.05)) m.welcome = { $typeName: "rexmesh.v1.AgentWelcome", proxy: text(p), region: text(p), heartbeatMs: u32(p) };
  for (let i = p.chance(0.7) ? p.int(1, 5) : 0; i > 0; i--) m.tasks.push(task(p));
  for (let i = p.chance(0.2) ? p.int(1, 3) : 0; i > 0; i--) m.cancelTaskIds.push(text(p));
  for (let i = p.chance(0.3) ? p.int(1, 3) : 0; i > 0; i--) m.outputAcks.push({ $typeName: "rexmesh.v1.OutputAck", taskId: text(p), seq: u64(p) });
  for (let i = p.chance(0.3) ? p.int(1, 3) : 0; i > 0; i--) m.statusAcks.push({ $typeName: "rexmesh.v1.StatusAck", taskId: text(p), state: i32(p), atProxy: p.chance(0.5) });
  if (p.chance(0.05)) m.signingKeys.push({ $typeName: "rexmesh.v1.TaskSigningKey", keyId: "k", publicKey: bytesOf(p), endorsement: bytesOf(p), x25519PublicKey: new Uint8Array(0), x25519KeyId: "" } as never);
  for (let i = p.chance(0.2) ? p.int(1, 3) : 0; i > 0; i--) m.withdrawTaskIds.push(text(p));
  if (p.chance(0.2)) m.presenceNonce = bytesOf(p);
  if (p.chance(0.3)) m.ping = u32(p);
  if (p.chance(0.3)) m.pong = u32(p);
  for (let i = p.chance(0.1) ? p.int(1, 3) : 0; i > 0; i--) m.eventAcks.push({ $typeName: "rexmesh.v1.EventAck", hostId: text(p), eventId: text(p) });
  if (p.chance(0.03)) m.$unknown = [{ no: 50, wireType: 2, data: new Uint8Array([0]) }];
  return m;
}

const SEEDS = 4000;

describe("decodeAgentRequest", () => {
  // The frames not read by hand hold a hello, events, unknown fields or values past 2^49: left to protobuf-es.
  seededDecodeTests(AgentStreamRequestSchema, { decode: decodeAgentRequest, read: readAgentRequest }, request, SEEDS);

  it("takes the common frames itself, not through protobuf-es: every one of them decodes the same (crafted)", () => {
    const st = (fields: number[]) => [0x12, ...varint(fields.length), ...fields];
    const ts = (fields: number[]) => [0x1a, ...varint(fields.length), ...fields];
    const cases: [string, number[]][] = [
      ["empty frame", []],
      ["a ping answer", st([0x0a, 2, 0x74, 0x31, 0x10, 7, ...ts([0x08, ...varint(1_700_000_000), 0x10, ...varint(5_000_000)]), 0x20, 0, 0x32, 4, ...Buffer.from("pong"), 0x4a, 2, 0x68, 0x31])],
      ["credits 0 given explicitly", [0x20, 0]],
      ["credits given twice: the last wins", [0x20, 5, 0x20, 7]],
      ["ping and pong", [0x40, ...varint(2 ** 32 - 1), 0x48, 1]],
      ["an overlong tag", [0xa0, 0x00, 3]],
      ["an overlong 5-byte credits", [0x20, ...overlong(3, 5)]],
      ["an overlong 6-byte credits", [0x20, ...overlong(3, 6)]],
      ["an overlong 10-byte credits", [0x20, ...overlong(3, 10)]],
      ["an 11-byte varint", [0x20, ...overlong(3, 11)]],
      ["a 5-byte varint over 32 bits", [0x20, 0xff, 0xff, 0xff, 0xff, 0x7f]],
      ["a negative exit code (10 bytes)", st([0x20, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01])],
      ["a negative exit code in 5 bytes", st([0x20, 0xff, 0xff, 0xff, 0xff, 0x0f])],
      ["a bool of 2", st([0x40, 2])],
      ["a bool as an overlong varint", st([0x40, 0x81, 0x00])],
      ["a bool of 2^35 (true for protobuf-es, zero in its low bits)", st([0x40, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01])],
      ["seq at 2^49 - 1", [0x1a, 9, 0x10, ...varint(2 ** 49 - 1)]],
      ["seq at 2^49", [0x1a, 9, 0x10, ...varint(2 ** 49)]],
      ["seq overlong in 7 bytes", [0x1a, 8, 0x10, ...overlong(5, 7)]],
      ["seq overlong in 10 bytes", [0x1a, 11, 0x10, ...overlong(5, 10)]],
      ["a status given twice", [...st([0x0a, 1, 0x61]), ...st([0x0a, 1, 0x62])]],
      ["time given twice in one status: merged", st([...ts([0x08, 5]), ...ts([0x10, 9])])],
      ["time given twice, seconds replaced", st([...ts([0x08, 5, 0x10, 3]), ...ts([0x08, 6])])],
      ["an empty time", st(ts([]))],
      ["negative nanos", st(ts([0x10, 0xff, 0xff, 0xff, 0xff, 0x0f]))],
      ["a status whose field runs past its end", [0x12, 2, 0x0a, 3, 0x61, 0x62, 0x63]],
      ["a status shorter than its field, the frame long enough", [0x12, 1, 0x10, 5, 0x20, 1]],
      ["a status length past the frame", [0x12, 50, 0x10, 1]],
      ["a bytes length past the frame", [0x2a, 5, 1, 2]],
      ["a truncated varint", [0x20, 0x80]],
      ["a truncated tag", [0x80]],
      ["field number 0", [0x00, 1]],
      ["wire type 6", [0x16, 1]],
      ["wire type 7", [0x17]],
      ["a group (start) with its end", [0x0b, 0x0c]],
      ["a lone end group", [0x0c]],
      ["credits as length-delimited", [0x22, 1, 5]],
      ["credits as fixed32", [0x25, 1, 0, 0, 0]],
      ["credits as fixed64", [0x21, 1, 0, 0, 0, 0, 0, 0, 0]],
      ["a status as a varint", [0x10, 5]],
      ["a status's state as length-delimited", st([0x12, 1, 2])],
      ["presence proof as a varint", [0x28, 1]],
      ["a status with an unknown field", st([0x0a, 1, 0x61, 0xf8, 0x01, 1])],
      ["a frame with an unknown field", [0x20, 1, 0xf8, 0x07, 1]],
      ["an unknown length-delimited field", [0xfa, 0x07, 2, 1, 2]],
      ["a hello", [0x0a, 4, 0x0a, 2, 0x68, 0x31]],
      ["an event", [0xa2, 0x01, 3, 0x0a, 1, 0x65]],
      // No field read by hand is a packable list (its lists hold messages, strings or bytes): a scalar sent
      // length-delimited, as a packed list would be, is left to protobuf-es (which reads its length as the value).
      ["packed credits", [0x22, 2, 5, 6]],
      ["a status's exit code packed", st([0x22, 2, 1, 2])],
      ["repeated strings in a hello's facts: left whole", [0x0a, 6, 0x12, 4, 0x42, 2, 0x61, 0x62]],
      ["invalid UTF-8 in a task id", st([0x0a, 2, 0xc3, 0x28])],
      ["invalid UTF-8 in a long message", st([0x32, 70, ...Buffer.alloc(69, 0x61), 0xff])],
      ["a BOM-led task id", st([0x0a, 5, 0xef, 0xbb, 0xbf, 0x61, 0x62])],
      ["an overlong UTF-8 slash", st([0x0a, 2, 0xc0, 0xaf])],
      ["a surrogate in UTF-8", st([0x0a, 3, 0xed, 0xa0, 0x80])],
      ["an empty bytes field given (a view, not the default)", [0x2a, 0]],
      ["an output chunk with empty data given", [0x1a, 2, 0x22, 0]],
      ["a state beyond the enum", st([0x10, ...varint(1000)])],
      ["a stream beyond the enum", [0x1a, 3, 0x18, ...varint(300)]],
    ];
    for (const [what, bytes] of cases) expectSameDecode(new Uint8Array(bytes), what);
    // What hosts send most is read by hand (the point of the hand decoder), the same as protobuf-es reads it.
    for (const what of ["empty frame", "a ping answer", "credits given twice: the last wins", "ping and pong", "an overlong tag", "an overlong 5-byte credits", "seq overlong in 7 bytes", "a BOM-led task id", "an empty bytes field given (a view, not the default)"]) {
      const bytes = Buffer.from(cases.find(([w]) => w === what)![1]);
      expect(difference(readAgentRequest(bytes), decodeBounded(AgentStreamRequestSchema, bytes)), what).toBeUndefined();
    }
  });

  it("refuses a frame over the element budget as decodeBounded does, and takes one at it", () => {
    // One status (an element) holding its state given again and again (an element each).
    const frame = (elements: number) => {
      const body = new Uint8Array((elements - 1) * 2);
      for (let i = 0; i < body.length; i += 2) body[i] = 0x10;
      return new Uint8Array([0x12, ...varint(body.length), ...body]);
    };
    const at = frame(MAX_MESSAGE_ELEMENTS);
    const over = frame(MAX_MESSAGE_ELEMENTS + 1);
    expect(readAgentRequest(at)?.statuses).toHaveLength(1);
    expect(decodeDifference(at)).toBeUndefined();
    expect(() => decodeAgentRequest(over)).toThrow(/more than 1000000 elements/);
    expect(decodeDifference(over)).toBeUndefined();
    // A million and one empty statuses or chunks, each its own element, and the same with a field the hand reader
    // leaves to protobuf-es at the very end: refused alike (counted first, before any object is made).
    for (const tag of [0x12, 0x1a]) {
      const flood = new Uint8Array(2 * (MAX_MESSAGE_ELEMENTS + 1));
      for (let i = 0; i < flood.length; i += 2) flood[i] = tag;
      expect(() => decodeAgentRequest(flood)).toThrow(/more than 1000000 elements/);
      expect(() => decodeAgentRequest(new Uint8Array([...flood.subarray(2), 0xb8, 0x01, 0x00]))).toThrow(/more than 1000000 elements/);
    }
  });
});

describe("encodeAgentResponse", () => {
  it("writes every field combination byte for byte as toBinary does, most of them by hand (seeded)", () => {
    let byHand = 0;
    for (let seed = 1; seed <= SEEDS; seed++) {
      const msg = response(new Prng(seed));
      expectSameEncode(msg, `seed ${seed}`);
      const mine = writeAgentResponse(msg);
      if (mine) {
        expect(Buffer.from(mine).equals(toBinary(AgentStreamResponseSchema, msg)), `seed ${seed}`).toBe(true);
        byHand++;
      }
    }
    // The rest hold a welcome, signing keys, unknown fields or values past 2^53: left to protobuf-es.
    expect(byHand).toBeGreaterThan(SEEDS * 0.6);
  });

  it("refuses what toBinary refuses, and writes edge values as it does", () => {
    const base = () => create(AgentStreamResponseSchema, { tasks: [create(SignedTaskSchema, { spec: new Uint8Array([1]) })] });
    const cases: [string, (m: AgentStreamResponse) => void][] = [
      ["ping -1", (m) => (m.ping = -1)],
      ["ping 2^32", (m) => (m.ping = 2 ** 32)],
      ["ping 1.5", (m) => (m.ping = 1.5)],
      ["ping NaN", (m) => (m.ping = NaN)],
      ["ping -0", (m) => (m.ping = -0)],
      ["pong 2^32 - 1", (m) => (m.pong = 2 ** 32 - 1)],
      ["a batch index 2^32", (m) => (m.tasks[0]!.batch = create(TaskBatchProofSchema, { index: 2 ** 32 }))],
      ["an empty batch", (m) => (m.tasks[0]!.batch = create(TaskBatchProofSchema))],
      ["an output ack seq -1", (m) => m.outputAcks.push({ $typeName: "rexmesh.v1.OutputAck", taskId: "t", seq: -1n })],
      ["an output ack seq 2^64", (m) => m.outputAcks.push({ $typeName: "rexmesh.v1.OutputAck", taskId: "t", seq: 2n ** 64n })],
      ["an output ack seq 2^64 - 1", (m) => m.outputAcks.push({ $typeName: "rexmesh.v1.OutputAck", taskId: "t", seq: 2n ** 64n - 1n })],
      ["an output ack seq as a number", (m) => m.outputAcks.push({ $typeName: "rexmesh.v1.OutputAck", taskId: "t", seq: 7 as unknown as bigint })],
      ["a status ack state 2^31", (m) => m.statusAcks.push({ $typeName: "rexmesh.v1.StatusAck", taskId: "t", state: 2 ** 31, atProxy: false })],
      ["a status ack state -5", (m) => m.statusAcks.push({ $typeName: "rexmesh.v1.StatusAck", taskId: "t", state: -5 as TaskState, atProxy: true })],
      ["a welcome", (m) => (m.welcome = { $typeName: "rexmesh.v1.AgentWelcome", proxy: "p", region: "r", heartbeatMs: 1 })],
      ["a spec of 200 KiB", (m) => (m.tasks[0]!.spec = new Uint8Array(200 * 1024).fill(7))],
      ["a key id with a lone surrogate", (m) => (m.tasks[0]!.keyId = "k\uDC00")],
    ];
    for (const [what, change] of cases) {
      const m = base();
      change(m);
      expectSameEncode(m, what);
    }
  });

  it("leaves the writer clean after a frame it left to protobuf-es", () => {
    const bad = create(AgentStreamResponseSchema, { tasks: [create(SignedTaskSchema, { spec: new Uint8Array([1, 2, 3]) })], ping: -1 });
    expect(() => encodeAgentResponse(bad)).toThrow();
    expectSameEncode(create(AgentStreamResponseSchema, { tasks: [create(SignedTaskSchema, { spec: new Uint8Array([4]) })] }), "after a refused frame");
  });
});
