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
import { getTextEncoding, WireType } from "@bufbuild/protobuf/wire";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { AgentStreamRequestSchema, AgentStreamResponseSchema, type AgentStreamRequest, type AgentStreamResponse } from "../gen/rexmesh/v1/agent_link_pb.js";
import type { OutputChunk, OutputStream, SignedTask, TaskState, TaskStatus } from "../gen/rexmesh/v1/task_pb.js";
import { countElements, decodeBounded, MAX_MESSAGE_ELEMENTS } from "./decode-budget.js";
import { isInt32, isUint53, ProtoWriter } from "./proto-wire.js";

/** Thrown inside the hand decoder and encoder when they leave a frame to protobuf-es; never escapes this module. */
const LEAVE = new Error("left to protobuf-es");

const VARINT = WireType.Varint;
const LEN = WireType.LengthDelimited;

/** A reader over one frame: positions, and the elements counted as decode-budget's walk counts them (every tag, nested ones too). */
class Reader {
  pos = 0;
  elements = 0;
  constructor(readonly buf: Uint8Array) {}

  /** A tag: field number × 8 + wire type, as a number (at most 5 bytes, within uint32). */
  tag(): number {
    if (++this.elements > MAX_MESSAGE_ELEMENTS) throw LEAVE;
    return this.uint32();
  }

  /** A varint of at most 5 bytes whose value fits 32 bits, as an unsigned number: what protobuf-es's uint32 reads for it. */
  uint32(): number {
    const buf = this.buf;
    let p = this.pos;
    let b = buf[p++]!;
    if (b < 0x80) {
      if (p > buf.length) throw LEAVE;
      this.pos = p;
      return b;
    }
    let v = b & 0x7f;
    for (let shift = 7; shift < 28; shift += 7) {
      b = buf[p++]!;
      v |= (b & 0x7f) << shift;
      if (b < 0x80) {
        if (p > buf.length) throw LEAVE;
        this.pos = p;
        return v >>> 0;
      }
    }
    b = buf[p++]!;
    // A fifth byte with more than the top 4 bits, or a longer varint: protobuf-es's own rules apply.
    if (b > 0x0f || p > buf.length) throw LEAVE;
    this.pos = p;
    return (v | (b << 28)) >>> 0;
  }

  /** A varint of at most 7 bytes (below 2^49), as a number: a 64-bit field's value that protobuf-es makes a bigint of. */
  uint49(): number {
    const buf = this.buf;
    let p = this.pos;
    let v = 0;
    for (let mul = 1; mul < 2 ** 49; mul *= 0x80) {
      const b = buf[p++]!;
      v += (b & 0x7f) * mul;
      if (b < 0x80) {
        if (p > buf.length) throw LEAVE;
        this.pos = p;
        return v;
      }
    }
    throw LEAVE;
  }

  /** A bool written as one byte (what every encoder writes): protobuf-es reads any non-zero varint as true. */
  bool(): boolean {
    const b = this.buf[this.pos++]!;
    if (b >= 0x80 || this.pos > this.buf.length) throw LEAVE;
    return b !== 0;
  }

  /** A length-delimited field's bounds, within `end`. */
  span(end: number): number {
    const len = this.uint32();
    const to = this.pos + len;
    if (to > end) throw LEAVE;
    return to;
  }

  /** UTF-8 text, validated as protobuf-es validates a proto3 string (through the same codec); invalid text is left to it. */
  string(end: number): string {
    const to = this.span(end);
    const buf = this.buf;
    const from = this.pos;
    this.pos = to;
    if (to - from <= 64) {
      let s = "";
      for (let i = from; i < to; i++) {
        const c = buf[i]!;
        if (c > 0x7f) return decodeText(buf.subarray(from, to));
        s += String.fromCharCode(c);
      }
      return s;
    }
    return decodeText(buf.subarray(from, to));
  }
}

function decodeText(bytes: Uint8Array): string {
  try {
    return getTextEncoding().decodeUtf8(bytes, true);
  } catch {
    throw LEAVE;
  }
}

/** A host's frame, decoded as `decodeBounded(AgentStreamRequestSchema, bytes)` decodes it (and refused where it refuses it). */
export function decodeAgentRequest(bytes: Uint8Array): AgentStreamRequest {
  // An element takes two bytes or more, so only a frame this long can be over the budget: it is
  // counted first, as decodeBounded does, and refused before any object is made (the hand reader
  // would notice only at element 1,000,001: an attack review measured 4.1 s and 723 MiB to refuse
  // one, against 0.1 s and 4 MiB).
  if (bytes.length >= 2 * MAX_MESSAGE_ELEMENTS && countElements(AgentStreamRequestSchema, bytes) === Infinity) return decodeBounded(AgentStreamRequestSchema, bytes);
  return readAgentRequest(bytes) ?? decodeBounded(AgentStreamRequestSchema, bytes);
}

/** The hand decoder alone: the frame, or undefined where it leaves the frame to protobuf-es. */
export function readAgentRequest(bytes: Uint8Array): AgentStreamRequest | undefined {
  try {
    return readRequest(new Reader(bytes));
  } catch {
    // Left to protobuf-es (LEAVE), or anything unforeseen: protobuf-es judges the frame.
    return undefined;
  }
}

function readRequest(r: Reader): AgentStreamRequest {
  const end = r.buf.length;
  const msg: AgentStreamRequest = {
    $typeName: "rexmesh.v1.AgentStreamRequest",
    statuses: [],
    output: [],
    presenceProof: new Uint8Array(0),
    presenceNonce: new Uint8Array(0),
    presenceSalt: new Uint8Array(0),
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
        msg.presenceProof = readBytes(r, end);
        break;
      case (6 << 3) | LEN:
        msg.presenceNonce = readBytes(r, end);
        break;
      case (7 << 3) | LEN:
        msg.presenceSalt = readBytes(r, end);
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

function readBytes(r: Reader, end: number): Uint8Array {
  const to = r.span(end);
  const from = r.pos;
  r.pos = to;
  return r.buf.subarray(from, to);
}

/** A message field's end: its bytes must close exactly there (protobuf-es reads on past a short one; left to it). */
function closes(r: Reader, to: number): void {
  if (r.pos !== to) throw LEAVE;
}

function readStatus(r: Reader, to: number): TaskStatus {
  const s: TaskStatus = {
    $typeName: "rexmesh.v1.TaskStatus",
    taskId: "",
    state: 0,
    signal: "",
    message: "",
    outputChunks: 0n,
    outputTruncated: false,
    hostId: "",
    atProxy: false,
    signature: new Uint8Array(0),
    keyId: "",
    outputSha256: new Uint8Array(0),
    outputBytes: 0n,
    endMac: new Uint8Array(0),
    endMacKeyId: "",
  };
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
        s.signature = readBytes(r, to);
        break;
      case (12 << 3) | LEN:
        s.keyId = r.string(to);
        break;
      case (13 << 3) | LEN:
        s.outputSha256 = readBytes(r, to);
        break;
      case (14 << 3) | VARINT:
        s.outputBytes = BigInt(r.uint49());
        break;
      case (15 << 3) | LEN:
        s.endMac = readBytes(r, to);
        break;
      case (16 << 3) | LEN:
        s.endMacKeyId = r.string(to);
        break;
      default:
        throw LEAVE;
    }
  }
  closes(r, to);
  return s;
}

function readTimestamp(r: Reader, to: number): Timestamp {
  const t: Timestamp = { $typeName: "google.protobuf.Timestamp", seconds: 0n, nanos: 0 };
  while (r.pos < to) {
    switch (r.tag()) {
      case (1 << 3) | VARINT:
        t.seconds = BigInt(r.uint49());
        break;
      case (2 << 3) | VARINT:
        t.nanos = r.uint32() | 0;
        break;
      default:
        throw LEAVE;
    }
  }
  closes(r, to);
  return t;
}

function readChunk(r: Reader, to: number): OutputChunk {
  const c: OutputChunk = { $typeName: "rexmesh.v1.OutputChunk", taskId: "", seq: 0n, stream: 0, data: new Uint8Array(0), hostId: "" };
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
        c.data = readBytes(r, to);
        break;
      case (5 << 3) | LEN:
        c.hostId = r.string(to);
        break;
      default:
        throw LEAVE;
    }
  }
  closes(r, to);
  return c;
}

// ---- down: the proxy's frames to a host ------------------------------------

const writer = new ProtoWriter();

/** A frame to a host, as `toBinary(AgentStreamResponseSchema, msg)` encodes it (and refused where it refuses it). */
export function encodeAgentResponse(msg: AgentStreamResponse): Uint8Array {
  return writeAgentResponse(msg) ?? toBinary(AgentStreamResponseSchema, msg);
}

/** The hand encoder alone: the frame's bytes, or undefined where it leaves the frame to protobuf-es. */
export function writeAgentResponse(msg: AgentStreamResponse): Uint8Array | undefined {
  if (!handWritable(msg)) return undefined;
  try {
    return writeResponse(msg);
  } catch {
    // A value the hand encoder does not write (LEAVE): protobuf-es encodes it, or refuses it.
    return undefined;
  }
}

const noUnknown = (m: { $unknown?: unknown[] }): boolean => !m.$unknown?.length;

/** Whether the frame holds only what the hand encoder writes (values are checked as they are written). */
function handWritable(msg: AgentStreamResponse): boolean {
  return msg.welcome === undefined && msg.signingKeys.length === 0 && msg.sessions.length === 0 && noUnknown(msg);
}

/** A uint32 value, as protobuf-es accepts it (anything else is left to it, which refuses it). */
function uint32(n: number): number {
  if (!(isUint53(n) && n <= 0xffffffff)) throw LEAVE;
  return n;
}

/** A uint64 given as a bigint within a safe integer (what rexmesh sends); anything else is left to protobuf-es. */
function uint64(n: bigint): number {
  if (typeof n !== "bigint" || n < 0n || n > BigInt(Number.MAX_SAFE_INTEGER)) throw LEAVE;
  return Number(n);
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
