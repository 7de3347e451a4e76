/**
 * The tasks of a frame to a proxy in their wire form, encoded by hand.
 *
 * A fleet-wide job puts one SignedTask per host into the frames to its
 * proxies. protobuf-es encodes each by reflection and copies it into a
 * fresh Uint8Array at every nested message it closes (the task, its batch
 * proof): about a fifth of the controller's CPU in a 4,000-host ping. Here a
 * each task is written into one reused buffer, exactly as protobuf-es writes
 * them (fields in number order, defaults left out), and handed to the
 * frame's encoder as an unknown field of the list's number, which protobuf-es
 * writes as it is (as controller/task-wire.ts does for a watch's tasks).
 * The proxy decodes an ordinary repeated field: the same tasks, in order.
 */
import { toBinary } from "@bufbuild/protobuf";
import { WireType } from "@bufbuild/protobuf/wire";
import { isUint53, ProtoWriter, varintSize, writeVarint } from "../common/proto-wire.js";
import { ProxyStreamResponseSchema, type ProxyStreamResponse } from "../gen/rexmesh/v1/proxy_link_pb.js";
import { SignedTaskSchema, type SignedTask } from "../gen/rexmesh/v1/task_pb.js";

const writer = new ProtoWriter();
const TASKS = ProxyStreamResponseSchema.field.tasks.number;
/** A varint's bytes, before the bytes it counts. */
const lengthBytes = new Uint8Array(10);

/** A bytes field (tag, length, bytes): its length is written before it, not moved behind it. */
function bytes(w: ProtoWriter, no: number, b: Uint8Array): void {
  w.tag(no, WireType.LengthDelimited).raw(lengthBytes.subarray(0, writeVarint(lengthBytes, 0, b.length))).raw(b);
}

/** Whether the hand encoder covers the task; what it does not (fields this release does not know) goes to protobuf-es. */
function covered(t: SignedTask): boolean {
  const b = t.batch;
  return !t.$unknown?.length && (b === undefined || (!b.$unknown?.length && isUint53(b.index) && isUint53(b.leaves)));
}

/** The task as one element of a repeated SignedTask field (its length, then the message), written into `w`. */
function writeTask(w: ProtoWriter, t: SignedTask): void {
  if (!covered(t)) {
    const whole = toBinary(SignedTaskSchema, t);
    w.raw(lengthBytes.subarray(0, writeVarint(lengthBytes, 0, whole.length))).raw(whole);
    return;
  }
  // The length first, computed: the spec is most of the task, and a fork would move it behind a longer length.
  const b = t.batch;
  let proof = 0;
  if (b) {
    if (b.index) proof += 1 + varintSize(b.index);
    if (b.leaves) proof += 1 + varintSize(b.leaves);
    for (const h of b.path) proof += 1 + varintSize(h.length) + h.length;
    if (b.salt.length) proof += 1 + varintSize(b.salt.length) + b.salt.length;
  }
  const keyId = Buffer.byteLength(t.keyId, "utf8");
  let len = 0;
  if (t.spec.length) len += 1 + varintSize(t.spec.length) + t.spec.length;
  if (t.signature.length) len += 1 + varintSize(t.signature.length) + t.signature.length;
  if (keyId) len += 1 + varintSize(keyId) + keyId;
  if (b) len += 1 + varintSize(proof) + proof;
  w.raw(lengthBytes.subarray(0, writeVarint(lengthBytes, 0, len)));
  if (t.spec.length) bytes(w, 1, t.spec);
  if (t.signature.length) bytes(w, 2, t.signature);
  if (keyId) w.string(3, t.keyId);
  if (!b) return;
  w.tag(4, WireType.LengthDelimited).raw(lengthBytes.subarray(0, writeVarint(lengthBytes, 0, proof)));
  if (b.index) w.uint(1, b.index);
  if (b.leaves) w.uint(2, b.leaves);
  for (const h of b.path) bytes(w, 3, h);
  if (b.salt.length) bytes(w, 4, b.salt);
}

/**
 * The task as one element of a repeated SignedTask field (its length, then
 * the message): byte for byte what protobuf-es writes after the field's tag.
 */
export function encodeSignedTask(t: SignedTask): Uint8Array {
  const w = writer.reset();
  writeTask(w, t);
  return w.finish();
}

/**
 * A frame whose tasks travel in their wire form: a shallow copy that reads
 * as having no tasks, and carries them as one unknown field of the list's
 * number whose bytes are every element in turn, each after the first with
 * its own tag — what protobuf-es writes of an unknown field is its tag, then
 * its bytes as they are, so the frame's bytes are those of the ordinary
 * message (one field per task would cost protobuf-es a small buffer per
 * task for its tag). Use it right before encoding, after the tasks are
 * signed; a frame without tasks is returned as it is.
 */
export function tasksAsWire(frame: ProxyStreamResponse): ProxyStreamResponse {
  if (frame.tasks.length === 0) return frame;
  const w = writer.reset();
  frame.tasks.forEach((t, i) => {
    if (i > 0) w.tag(TASKS, WireType.LengthDelimited);
    writeTask(w, t);
  });
  const unknown = frame.$unknown ? [...frame.$unknown] : [];
  unknown.push({ no: TASKS, wireType: WireType.LengthDelimited, data: w.finish() });
  return { ...frame, tasks: [], $unknown: unknown };
}
