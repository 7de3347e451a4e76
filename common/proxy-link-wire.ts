/**
 * The controller link's hot frames at the proxy, read and written by hand.
 *
 * After the host link's frames (common/agent-link-wire.ts), what was left of
 * protobuf-es at a proxy in a fleet-wide ping was this link: the frames
 * down (tasks, acknowledgements in runs) decoded by reflection, and the
 * frames up (statuses in runs, whole statuses, output) encoded by
 * reflection (docs/fan-out.md, "The controller link's frames by hand").
 *
 * {@link decodeProxyResponse} reads a controller's frame of tasks, cancels,
 * acknowledgements (whole and in runs), replay, ping and pong straight into
 * the message protobuf-es would make: the same fields, values and kinds of
 * values (a task's spec, signature and proof hashes are views into the
 * frame, exactly the bytes the controller signed), the same element
 * budget. A welcome, signing keys, a deny-list, session orders, an unknown
 * field, a wire type other than the field's own, a message field given
 * twice, a varint longer than the values it takes, text that is not plain
 * UTF-8, anything cut short: left to protobuf-es ({@link decodeBounded}).
 *
 * {@link encodeProxyRequest} writes a proxy's frame of statuses (whole and
 * in runs), output chunks, its load, ping and pong with {@link ProtoWriter},
 * byte for byte what `toBinary` wrote for it with the chunks in their wire
 * form (common/output-wire.ts: after every known field, as unknown fields of
 * the list's number). A hello, host presence, events, unknown fields or a
 * value it does not write go to protobuf-es (which also refuses what is not
 * a valid value).
 *
 * test/unit/proxy-link-wire.test.ts compares both with protobuf-es on seeded
 * random and crafted frames.
 */
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { ProxyStreamRequestSchema, ProxyStreamResponseSchema, type CancelTask, type ProxyStreamRequest, type ProxyStreamResponse, type StatusAckRun, type StatusRun } from "../gen/rexmesh/v1/proxy_link_pb.js";
import type { OutputAck, SignedTask, StatusAck, TaskBatchProof, TaskState, TaskStatus } from "../gen/rexmesh/v1/task_pb.js";
import type { EventAck } from "../gen/rexmesh/v1/event_pb.js";
import { decodeByHand, EMPTY, LEAVE, LEN, noUnknown, readByHand, Reader, uint32, uint64, VARINT, writeByHand } from "./hand-wire.js";
import { encodeWithWireOutput, wireOf } from "./output-wire.js";
import { isInt32, ProtoWriter } from "./proto-wire.js";

// ---- down: the controller's frames to the proxy ------------------------------

/** A controller's frame, decoded as `decodeBounded(ProxyStreamResponseSchema, bytes)` decodes it (and refused where it refuses it). */
export function decodeProxyResponse(bytes: Uint8Array): ProxyStreamResponse {
  return decodeByHand(ProxyStreamResponseSchema, bytes, readResponse);
}

/** The hand decoder alone: the frame, or undefined where it leaves the frame to protobuf-es. */
export function readProxyResponse(bytes: Uint8Array): ProxyStreamResponse | undefined {
  return readByHand(bytes, readResponse);
}



function readResponse(r: Reader): ProxyStreamResponse {
  const end = r.buf.length;
  const msg: ProxyStreamResponse = {
    $typeName: "rexmesh.v1.ProxyStreamResponse",
    tasks: [],
    cancels: [],
    outputAcks: [],
    statusAcks: [],
    signingKeys: [],
    replay: false,
    ping: 0,
    pong: 0,
    sessions: [],
    eventAcks: [],
    statusAckRuns: [],
  };
  while (r.pos < end) {
    switch (r.tag()) {
      case (2 << 3) | LEN:
        msg.tasks.push(readTask(r, r.span(end)));
        break;
      case (3 << 3) | LEN:
        msg.cancels.push(readCancel(r, r.span(end)));
        break;
      case (4 << 3) | LEN:
        msg.outputAcks.push(readOutputAck(r, r.span(end)));
        break;
      case (5 << 3) | LEN:
        msg.statusAcks.push(readStatusAck(r, r.span(end)));
        break;
      case (8 << 3) | VARINT:
        msg.replay = r.bool();
        break;
      case (9 << 3) | VARINT:
        msg.ping = r.uint32();
        break;
      case (10 << 3) | VARINT:
        msg.pong = r.uint32();
        break;
      case (20 << 3) | LEN:
        msg.eventAcks.push(readEventAck(r, r.span(end)));
        break;
      case (21 << 3) | LEN:
        msg.statusAckRuns.push(readAckRun(r, r.span(end)));
        break;
      default:
        // A welcome (once a link), signing keys, a deny-list, session orders (rare), unknown fields, other wire types.
        throw LEAVE;
    }
  }
  return msg;
}

function readTask(r: Reader, to: number): SignedTask {
  const t: SignedTask = { $typeName: "rexmesh.v1.SignedTask", spec: EMPTY, signature: EMPTY, keyId: "" };
  while (r.pos < to) {
    switch (r.tag()) {
      case (1 << 3) | LEN:
        t.spec = r.bytes(to);
        break;
      case (2 << 3) | LEN:
        t.signature = r.bytes(to);
        break;
      case (3 << 3) | LEN:
        t.keyId = r.string(to);
        break;
      case (4 << 3) | LEN:
        // Given twice, protobuf-es merges the two: left to it.
        if (t.batch) throw LEAVE;
        t.batch = readProof(r, r.span(to));
        break;
      default:
        throw LEAVE;
    }
  }
  r.closes(to);
  return t;
}

function readProof(r: Reader, to: number): TaskBatchProof {
  const b: TaskBatchProof = { $typeName: "rexmesh.v1.TaskBatchProof", index: 0, leaves: 0, path: [], salt: EMPTY };
  while (r.pos < to) {
    switch (r.tag()) {
      case (1 << 3) | VARINT:
        b.index = r.uint32();
        break;
      case (2 << 3) | VARINT:
        b.leaves = r.uint32();
        break;
      case (3 << 3) | LEN:
        b.path.push(r.bytes(to));
        break;
      case (4 << 3) | LEN:
        b.salt = r.bytes(to);
        break;
      default:
        throw LEAVE;
    }
  }
  r.closes(to);
  return b;
}

function readCancel(r: Reader, to: number): CancelTask {
  const c: CancelTask = { $typeName: "rexmesh.v1.CancelTask", taskId: "", hostId: "", withdraw: false };
  while (r.pos < to) {
    switch (r.tag()) {
      case (1 << 3) | LEN:
        c.taskId = r.string(to);
        break;
      case (2 << 3) | LEN:
        c.hostId = r.string(to);
        break;
      case (3 << 3) | VARINT:
        c.withdraw = r.bool();
        break;
      default:
        throw LEAVE;
    }
  }
  r.closes(to);
  return c;
}

function readOutputAck(r: Reader, to: number): OutputAck {
  const a: OutputAck = { $typeName: "rexmesh.v1.OutputAck", taskId: "", seq: 0n };
  while (r.pos < to) {
    switch (r.tag()) {
      case (1 << 3) | LEN:
        a.taskId = r.string(to);
        break;
      case (2 << 3) | VARINT:
        a.seq = BigInt(r.uint49());
        break;
      default:
        throw LEAVE;
    }
  }
  r.closes(to);
  return a;
}

function readStatusAck(r: Reader, to: number): StatusAck {
  const a: StatusAck = { $typeName: "rexmesh.v1.StatusAck", taskId: "", state: 0, atProxy: false };
  while (r.pos < to) {
    switch (r.tag()) {
      case (1 << 3) | LEN:
        a.taskId = r.string(to);
        break;
      case (2 << 3) | VARINT:
        a.state = (r.uint32() | 0) as TaskState;
        break;
      case (3 << 3) | VARINT:
        a.atProxy = r.bool();
        break;
      default:
        throw LEAVE;
    }
  }
  r.closes(to);
  return a;
}

function readEventAck(r: Reader, to: number): EventAck {
  const a: EventAck = { $typeName: "rexmesh.v1.EventAck", hostId: "", eventId: "" };
  while (r.pos < to) {
    switch (r.tag()) {
      case (1 << 3) | LEN:
        a.hostId = r.string(to);
        break;
      case (2 << 3) | LEN:
        a.eventId = r.string(to);
        break;
      default:
        throw LEAVE;
    }
  }
  r.closes(to);
  return a;
}

function readAckRun(r: Reader, to: number): StatusAckRun {
  const a: StatusAckRun = { $typeName: "rexmesh.v1.StatusAckRun", state: 0, atProxy: false, taskIds: [] };
  while (r.pos < to) {
    switch (r.tag()) {
      case (1 << 3) | VARINT:
        a.state = (r.uint32() | 0) as TaskState;
        break;
      case (2 << 3) | VARINT:
        a.atProxy = r.bool();
        break;
      case (3 << 3) | LEN:
        a.taskIds.push(r.string(to));
        break;
      default:
        throw LEAVE;
    }
  }
  r.closes(to);
  return a;
}

// ---- up: the proxy's frames to the controller --------------------------------

const writer = new ProtoWriter();

/**
 * An empty frame to the controller: what `create(ProxyStreamRequestSchema)`
 * makes (the same keys in the same order), without its reflection.
 */
export function newProxyRequest(): ProxyStreamRequest {
  return { $typeName: "rexmesh.v1.ProxyStreamRequest", hosts: [], statuses: [], output: [], ping: 0, pong: 0, events: [], statusRuns: [] };
}

/** What protobuf-es writes for a frame up: its output chunks in their wire form (common/output-wire.ts). */
const byProtobufEs = encodeWithWireOutput(ProxyStreamRequestSchema);

/** A frame to the controller, as `encodeWithWireOutput(ProxyStreamRequestSchema)` encodes it (and refused where it refuses it). */
export function encodeProxyRequest(msg: ProxyStreamRequest): Uint8Array {
  return writeProxyRequest(msg) ?? byProtobufEs(msg);
}

/** The hand encoder alone: the frame's bytes, or undefined where it leaves the frame to protobuf-es. */
export function writeProxyRequest(msg: ProxyStreamRequest): Uint8Array | undefined {
  return handWritable(msg) ? writeByHand(msg, writeRequest) : undefined;
}

/** Whether the frame holds only what the hand encoder writes (values are checked as they are written). */
function handWritable(msg: ProxyStreamRequest): boolean {
  return msg.hello === undefined && msg.hosts.length === 0 && msg.events.length === 0 && noUnknown(msg);
}

function writeRequest(msg: ProxyStreamRequest): Uint8Array {
  const w = writer.reset();
  for (const s of msg.statuses) writeStatus(w, s);
  const load = msg.load;
  if (load) {
    if (!noUnknown(load)) throw LEAVE;
    w.tag(5, LEN).fork();
    if (load.connectedHosts !== 0) w.uint(1, uint32(load.connectedHosts));
    if (load.queuedTasks !== 0) w.uint(2, uint32(load.queuedTasks));
    if (load.runningTasks !== 0) w.uint(3, uint32(load.runningTasks));
    w.join();
  }
  if (msg.ping !== 0) w.uint(6, uint32(msg.ping));
  if (msg.pong !== 0) w.uint(7, uint32(msg.pong));
  for (const run of msg.statusRuns) writeRun(w, run);
  // The chunks in their wire form, after every known field: where outputAsWire puts them (as unknown fields).
  for (const c of msg.output) w.tag(4, LEN).raw(wireOf(c));
  return w.finish();
}

/** An enum or int32 value that is not the default (0): protobuf-es refuses anything but an int32. */
function enumValue(w: ProtoWriter, no: number, n: number): void {
  if (!isInt32(n)) throw LEAVE;
  if (n !== 0) w.int32(no, n);
}

function writeTime(w: ProtoWriter, no: number, t: Timestamp): void {
  if (!noUnknown(t) || !isInt32(t.nanos)) throw LEAVE;
  w.tag(no, LEN).fork();
  const seconds = uint64(t.seconds);
  if (seconds !== 0) w.uint(1, seconds);
  if (t.nanos !== 0) w.int32(2, t.nanos);
  w.join();
}

function writeBytes(w: ProtoWriter, no: number, b: Uint8Array): void {
  if (b.length > 0) w.tag(no, LEN).bytes(b);
}

function writeStatus(w: ProtoWriter, s: TaskStatus): void {
  if (!noUnknown(s)) throw LEAVE;
  w.tag(3, LEN).fork();
  if (s.taskId !== "") w.string(1, s.taskId);
  enumValue(w, 2, s.state);
  if (s.time) writeTime(w, 3, s.time);
  if (s.exitCode !== undefined) {
    if (!isInt32(s.exitCode)) throw LEAVE;
    w.int32(4, s.exitCode);
  }
  if (s.signal !== "") w.string(5, s.signal);
  if (s.message !== "") w.string(6, s.message);
  const chunks = uint64(s.outputChunks);
  if (chunks !== 0) w.uint(7, chunks);
  if (s.outputTruncated) w.bool(8, true);
  if (s.hostId !== "") w.string(9, s.hostId);
  if (s.atProxy) w.bool(10, true);
  writeBytes(w, 11, s.signature);
  if (s.keyId !== "") w.string(12, s.keyId);
  writeBytes(w, 13, s.outputSha256);
  const bytes = uint64(s.outputBytes);
  if (bytes !== 0) w.uint(14, bytes);
  writeBytes(w, 15, s.endMac);
  if (s.endMacKeyId !== "") w.string(16, s.endMacKeyId);
  w.join();
}

function writeRun(w: ProtoWriter, run: StatusRun): void {
  if (!noUnknown(run)) throw LEAVE;
  w.tag(21, LEN).fork();
  enumValue(w, 1, run.state);
  if (run.atProxy) w.bool(2, true);
  if (run.exitCode !== undefined) {
    if (!isInt32(run.exitCode)) throw LEAVE;
    w.int32(3, run.exitCode);
  }
  if (run.signal !== "") w.string(4, run.signal);
  if (run.message !== "") w.string(5, run.message);
  if (run.time) writeTime(w, 6, run.time);
  for (const id of run.taskIds) w.string(7, id);
  for (const id of run.hostIds) w.string(8, id);
  w.join();
}

