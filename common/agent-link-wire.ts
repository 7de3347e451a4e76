/**
 * The host link's hot frames at the proxy, read and written by hand.
 *
 * A fleet-wide ping costs a proxy one frame from each host and one to it;
 * protobuf-es's reflective decode of the host's frame (with the element
 * count that guards it, common/decode-budget.ts) and its encode of the frame
 * down were the largest items at the proxy that are rexmesh's own
 * (docs/fan-out.md, "What a host costs, per role").
 *
 * {@link decodeAgentRequest} reads the frames a host sends most (statuses,
 * output, credits, presence proofs, ping and pong) straight into the message
 * protobuf-es would make: the same fields, values and kinds of values (bytes
 * fields are views into the frame, 64-bit integers bigints), the same
 * element budget. Whatever it is not sure of — a hello, events, an unknown
 * field, a wire type other than the field's own, a field given twice where
 * protobuf-es would merge, a varint longer than the values it takes, text
 * that is not plain UTF-8, anything cut short — it leaves to protobuf-es
 * ({@link decodeBounded}), which accepts or refuses it in its own words.
 *
 * {@link encodeAgentResponse} writes the frames that carry tasks, acks,
 * nonces and pings with {@link ProtoWriter}: the tasks' signed bytes are
 * copied as they are, fields in number order and defaults left out, byte for
 * byte what `toBinary` writes. A frame with a welcome, signing keys,
 * sessions, unknown fields, or a value outside what it writes leaves to
 * protobuf-es (which also refuses what is not a valid value).
 *
 * Nothing here decides what is signed or checked: a task's spec and
 * signature travel as the bytes they came as (test/unit/agent-link-wire.test.ts
 * compares both directions with protobuf-es on seeded random and crafted frames).
 */
import { toBinary } from "@bufbuild/protobuf";
import { AgentStreamRequestSchema, AgentStreamResponseSchema, type AgentStreamRequest, type AgentStreamResponse } from "../gen/rexmesh/v1/agent_link_pb.js";
import type { OutputChunk, OutputStream, SignedTask, TaskState, TaskStatus } from "../gen/rexmesh/v1/task_pb.js";
import { decodeByHand, EMPTY, LEAVE, LEN, noUnknown, readByHand, Reader, readTimestamp, uint32, uint64, VARINT, writeByHand } from "./hand-wire.js";
import { isInt32, ProtoWriter } from "./proto-wire.js";

/** A host's frame, decoded as `decodeBounded(AgentStreamRequestSchema, bytes)` decodes it (and refused where it refuses it). */
export function decodeAgentRequest(bytes: Uint8Array): AgentStreamRequest {
  return decodeByHand(AgentStreamRequestSchema, bytes, readRequest);
}

/** The hand decoder alone: the frame, or undefined where it leaves the frame to protobuf-es. */
export function readAgentRequest(bytes: Uint8Array): AgentStreamRequest | undefined {
  return readByHand(bytes, readRequest);
}

function readRequest(r: Reader): AgentStreamRequest {
  const end = r.buf.length;
  const msg: AgentStreamRequest = {
    $typeName: "rexmesh.v1.AgentStreamRequest",
    statuses: [],
    output: [],
    presenceProof: EMPTY,
    presenceNonce: EMPTY,
    presenceSalt: EMPTY,
    ping: 0,
    pong: 0,
    events: [],
  };
  while (r.pos < end) {
    switch (r.tag()) {
      case (2 << 3) | LEN:
        msg.statuses.push(readStatus(r, r.span(end)));
        break;
      case (3 << 3) | LEN:
        msg.output.push(readChunk(r, r.span(end)));
        break;
      case (4 << 3) | VARINT:
        msg.credits = r.uint32();
        break;
      case (5 << 3) | LEN:
        msg.presenceProof = r.bytes(end);
        break;
      case (6 << 3) | LEN:
        msg.presenceNonce = r.bytes(end);
        break;
      case (7 << 3) | LEN:
        msg.presenceSalt = r.bytes(end);
        break;
      case (8 << 3) | VARINT:
        msg.ping = r.uint32();
        break;
      case (9 << 3) | VARINT:
        msg.pong = r.uint32();
        break;
      default:
        // hello (once a stream), events, unknown fields, other wire types.
        throw LEAVE;
    }
  }
  return msg;
}

/**
 * An empty status: what `create(TaskStatusSchema)` makes (the same keys in
 * the same order; its empty bytes fields the shared {@link EMPTY}), without
 * its reflection. Fields set on it later keep that order; a time or an exit
 * code, absent here, is added last, as protobuf-es adds it.
 */
export function newTaskStatus(): TaskStatus {
  return {
    $typeName: "rexmesh.v1.TaskStatus",
    taskId: "",
    state: 0,
    signal: "",
    message: "",
    outputChunks: 0n,
    outputTruncated: false,
    hostId: "",
    atProxy: false,
    signature: EMPTY,
    keyId: "",
    outputSha256: EMPTY,
    outputBytes: 0n,
    endMac: EMPTY,
    endMacKeyId: "",
  };
}

function readStatus(r: Reader, to: number): TaskStatus {
  const s = newTaskStatus();
  while (r.pos < to) {
    switch (r.tag()) {
      case (1 << 3) | LEN:
        s.taskId = r.string(to);
        break;
      case (2 << 3) | VARINT:
        s.state = (r.uint32() | 0) as TaskState;
        break;
      case (3 << 3) | LEN:
        // Given twice, protobuf-es merges the two: left to it.
        if (s.time) throw LEAVE;
        s.time = readTimestamp(r, r.span(to));
        break;
      case (4 << 3) | VARINT:
        s.exitCode = r.uint32() | 0;
        break;
      case (5 << 3) | LEN:
        s.signal = r.string(to);
        break;
      case (6 << 3) | LEN:
        s.message = r.string(to);
        break;
      case (7 << 3) | VARINT:
        s.outputChunks = BigInt(r.uint49());
        break;
      case (8 << 3) | VARINT:
        s.outputTruncated = r.bool();
        break;
      case (9 << 3) | LEN:
        s.hostId = r.string(to);
        break;
      case (10 << 3) | VARINT:
        s.atProxy = r.bool();
        break;
      case (11 << 3) | LEN:
        s.signature = r.bytes(to);
        break;
      case (12 << 3) | LEN:
        s.keyId = r.string(to);
        break;
      case (13 << 3) | LEN:
        s.outputSha256 = r.bytes(to);
        break;
      case (14 << 3) | VARINT:
        s.outputBytes = BigInt(r.uint49());
        break;
      case (15 << 3) | LEN:
        s.endMac = r.bytes(to);
        break;
      case (16 << 3) | LEN:
        s.endMacKeyId = r.string(to);
        break;
      default:
        throw LEAVE;
    }
  }
  r.closes(to);
  return s;
}

function readChunk(r: Reader, to: number): OutputChunk {
  const c: OutputChunk = { $typeName: "rexmesh.v1.OutputChunk", taskId: "", seq: 0n, stream: 0, data: EMPTY, hostId: "" };
  while (r.pos < to) {
    switch (r.tag()) {
      case (1 << 3) | LEN:
        c.taskId = r.string(to);
        break;
      case (2 << 3) | VARINT:
        c.seq = BigInt(r.uint49());
        break;
      case (3 << 3) | VARINT:
        c.stream = (r.uint32() | 0) as OutputStream;
        break;
      case (4 << 3) | LEN:
        c.data = r.bytes(to);
        break;
      case (5 << 3) | LEN:
        c.hostId = r.string(to);
        break;
      default:
        throw LEAVE;
    }
  }
  r.closes(to);
  return c;
}

// ---- down: the proxy's frames to a host ------------------------------------

const writer = new ProtoWriter();

/**
 * An empty frame to a host: what `create(AgentStreamResponseSchema)` makes
 * (the same keys in the same order), without its reflection — a host link's
 * coalescer starts one for every frame it sends.
 */
export function newAgentResponse(): AgentStreamResponse {
  return {
    $typeName: "rexmesh.v1.AgentStreamResponse",
    tasks: [],
    cancelTaskIds: [],
    outputAcks: [],
    statusAcks: [],
    signingKeys: [],
    withdrawTaskIds: [],
    presenceNonce: EMPTY,
    ping: 0,
    pong: 0,
    sessions: [],
    eventAcks: [],
  };
}

/** A frame to a host, as `toBinary(AgentStreamResponseSchema, msg)` encodes it (and refused where it refuses it). */
export function encodeAgentResponse(msg: AgentStreamResponse): Uint8Array {
  return writeAgentResponse(msg) ?? toBinary(AgentStreamResponseSchema, msg);
}

/** The hand encoder alone: the frame's bytes, or undefined where it leaves the frame to protobuf-es. */
export function writeAgentResponse(msg: AgentStreamResponse): Uint8Array | undefined {
  return handWritable(msg) ? writeByHand(msg, writeResponse) : undefined;
}

/** Whether the frame holds only what the hand encoder writes (values are checked as they are written). */
function handWritable(msg: AgentStreamResponse): boolean {
  return msg.welcome === undefined && msg.signingKeys.length === 0 && msg.sessions.length === 0 && noUnknown(msg);
}

function writeResponse(msg: AgentStreamResponse): Uint8Array {
  const w = writer.reset();
  for (const t of msg.tasks) writeTask(w, t);
  for (const id of msg.cancelTaskIds) w.string(3, id);
  for (const a of msg.outputAcks) {
    if (!noUnknown(a)) throw LEAVE;
    w.tag(4, LEN).fork();
    if (a.taskId !== "") w.string(1, a.taskId);
    const seq = uint64(a.seq);
    if (seq !== 0) w.uint(2, seq);
    w.join();
  }
  for (const a of msg.statusAcks) {
    if (!noUnknown(a) || !isInt32(a.state)) throw LEAVE;
    w.tag(5, LEN).fork();
    if (a.taskId !== "") w.string(1, a.taskId);
    if (a.state !== 0) w.int32(2, a.state);
    if (a.atProxy) w.bool(3, true);
    w.join();
  }
  for (const id of msg.withdrawTaskIds) w.string(7, id);
  if (msg.presenceNonce.length > 0) w.tag(8, LEN).bytes(msg.presenceNonce);
  if (msg.ping !== 0) w.uint(9, uint32(msg.ping));
  if (msg.pong !== 0) w.uint(10, uint32(msg.pong));
  for (const a of msg.eventAcks) {
    if (!noUnknown(a)) throw LEAVE;
    w.tag(20, LEN).fork();
    if (a.hostId !== "") w.string(1, a.hostId);
    if (a.eventId !== "") w.string(2, a.eventId);
    w.join();
  }
  return w.finish();
}

/** A task as the controller signed it: its spec and signature are copied as they are. */
function writeTask(w: ProtoWriter, t: SignedTask): void {
  if (!noUnknown(t)) throw LEAVE;
  w.tag(2, LEN).fork();
  if (t.spec.length > 0) w.tag(1, LEN).bytes(t.spec);
  if (t.signature.length > 0) w.tag(2, LEN).bytes(t.signature);
  if (t.keyId !== "") w.string(3, t.keyId);
  const b = t.batch;
  if (b) {
    if (!noUnknown(b)) throw LEAVE;
    w.tag(4, LEN).fork();
    if (b.index !== 0) w.uint(1, uint32(b.index));
    if (b.leaves !== 0) w.uint(2, uint32(b.leaves));
    for (const p of b.path) w.tag(3, LEN).bytes(p);
    if (b.salt.length > 0) w.tag(4, LEN).bytes(b.salt);
    w.join();
  }
  w.join();
}
