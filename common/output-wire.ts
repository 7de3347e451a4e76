/**
 * Output chunks in their wire form, encoded once per hop.
 *
 * protobuf-es encodes a message nested in a list by encoding it apart and
 * copying the result into its parent (`fork`/`join`), then copies the whole
 * again when it finishes: each output byte was copied twice per encode, on
 * top of the copies made to store it. Here a chunk is encoded by hand into
 * one buffer, exactly as protobuf-es would (fields in number order, defaults
 * left out), and that buffer serves both the hop's LMDB backlog and the
 * frame: {@link outputAsWire} hands the encoded chunks to the frame's
 * encoder as unknown fields of the list's number, which protobuf-es writes
 * as they are. The receiver sees an ordinary repeated field.
 */
import type { DescMessage, MessageShape } from "@bufbuild/protobuf";
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { WireType } from "@bufbuild/protobuf/wire";
import { OutputChunkSchema, type OutputChunk } from "../gen/rexmesh/v1/task_pb.js";
import { varintSize, writeVarint } from "./proto-wire.js";

const MAX_SEQ = BigInt(Number.MAX_SAFE_INTEGER);

/**
 * The chunk as one element of a repeated field (its length as a varint, then
 * the message), after `lead` bytes left for the caller. One copy of the data.
 */
export function encodeOutputChunk(chunk: OutputChunk, lead = 0): Buffer {
  const stream = chunk.stream as number;
  if ((chunk.$unknown?.length ?? 0) > 0 || chunk.seq < 0n || chunk.seq > MAX_SEQ || stream < 0) {
    // What the hand encoder does not cover (no sender makes it): protobuf-es.
    const body = toBinary(OutputChunkSchema, chunk);
    const out = Buffer.allocUnsafe(lead + varintSize(body.length) + body.length);
    out.set(body, writeVarint(out, lead, body.length));
    return out;
  }
  const seq = Number(chunk.seq);
  const idLen = Buffer.byteLength(chunk.taskId);
  const hostLen = Buffer.byteLength(chunk.hostId);
  const dataLen = chunk.data.length;
  let size = 0;
  if (idLen > 0) size += 1 + varintSize(idLen) + idLen;
  if (seq > 0) size += 1 + varintSize(seq);
  if (stream > 0) size += 1 + varintSize(stream);
  if (dataLen > 0) size += 1 + varintSize(dataLen) + dataLen;
  if (hostLen > 0) size += 1 + varintSize(hostLen) + hostLen;
  const out = Buffer.allocUnsafe(lead + varintSize(size) + size);
  let off = writeVarint(out, lead, size);
  if (idLen > 0) {
    out[off++] = (1 << 3) | WireType.LengthDelimited;
    off = writeVarint(out, off, idLen);
    off += out.write(chunk.taskId, off, "utf8");
  }
  if (seq > 0) {
    out[off++] = (2 << 3) | WireType.Varint;
    off = writeVarint(out, off, seq);
  }
  if (stream > 0) {
    out[off++] = (3 << 3) | WireType.Varint;
    off = writeVarint(out, off, stream);
  }
  if (dataLen > 0) {
    out[off++] = (4 << 3) | WireType.LengthDelimited;
    off = writeVarint(out, off, dataLen);
    out.set(chunk.data, off);
    off += dataLen;
  }
  if (hostLen > 0) {
    out[off++] = (5 << 3) | WireType.LengthDelimited;
    off = writeVarint(out, off, hostLen);
    off += out.write(chunk.hostId, off, "utf8");
  }
  return out;
}

/** Where the message starts in a chunk's wire form (after its length). */
export function wireBodyOffset(wire: Uint8Array): number {
  let off = 0;
  while (wire[off]! & 0x80) off++;
  return off + 1;
}

interface Wire {
  bytes: Uint8Array;
  taskId: string;
  seq: bigint;
  stream: number;
  hostId: string;
  data: Uint8Array;
}

const wires = new WeakMap<OutputChunk, Wire>();

/**
 * Notes that `bytes` is the chunk's wire form (as {@link encodeOutputChunk}
 * makes it, without lead): a frame that carries the chunk later writes these
 * bytes instead of encoding it again. A chunk changed since is encoded anew.
 */
export function rememberWire(chunk: OutputChunk, bytes: Uint8Array): void {
  wires.set(chunk, { bytes, taskId: chunk.taskId, seq: chunk.seq, stream: chunk.stream, hostId: chunk.hostId, data: chunk.data });
}

/** Reads a chunk from its wire form (as stored); its data is a view into `wire`, and `wire` is remembered as its wire form. */
export function chunkFromWire(wire: Uint8Array): OutputChunk {
  const chunk = fromBinary(OutputChunkSchema, wire.subarray(wireBodyOffset(wire)));
  rememberWire(chunk, wire);
  return chunk;
}

/** The chunk's wire form: the one remembered if the chunk has not changed since, else encoded now. */
export function wireOf(chunk: OutputChunk): Uint8Array {
  const w = wires.get(chunk);
  if (w && w.data === chunk.data && w.seq === chunk.seq && w.taskId === chunk.taskId && w.hostId === chunk.hostId && w.stream === chunk.stream) return w.bytes;
  return encodeOutputChunk(chunk);
}

/**
 * For a message type with a `repeated OutputChunk output` field: a function
 * that returns a shallow copy of a message whose chunks travel as their wire
 * form (unknown fields of the list's number, written as they are, in order);
 * for any other type, undefined. Use it right before encoding: the copy
 * reads as having no output.
 */
export function outputAsWireFor<D extends DescMessage>(schema: D): ((msg: MessageShape<D>) => MessageShape<D>) | undefined {
  const field = schema.fields.find((f) => f.fieldKind === "list" && f.listKind === "message" && f.message.typeName === OutputChunkSchema.typeName);
  if (!field) return undefined;
  const name = field.localName;
  const no = field.number;
  return (msg) => {
    const output = (msg as Record<string, unknown>)[name] as OutputChunk[];
    if (output.length === 0) return msg;
    const unknown = msg.$unknown ? [...msg.$unknown] : [];
    for (const c of output) unknown.push({ no, wireType: WireType.LengthDelimited, data: wireOf(c) });
    return { ...msg, [name]: [], $unknown: unknown };
  };
}

/** Encodes a message to binary, its output chunks (if its type has them) in their wire form. */
export function encodeWithWireOutput<D extends DescMessage>(schema: D): (msg: MessageShape<D>) => Uint8Array {
  const prepare = outputAsWireFor(schema);
  return prepare ? (msg) => toBinary(schema, prepare(msg)) : (msg) => toBinary(schema, msg);
}
