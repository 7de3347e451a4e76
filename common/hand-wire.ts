/**
 * What the hand codecs of the links share (common/agent-link-wire.ts for the
 * host link, common/proxy-link-wire.ts for the controller link, both at the
 * proxy): a reader that reads a frame exactly as protobuf-es's BinaryReader
 * does where it is sure of the outcome and gives up ({@link LEAVE}) where it
 * is not, and the checks the hand encoders make of a value before they
 * write it. Whatever is given up on goes to protobuf-es whole, which then
 * accepts or refuses it in its own words.
 */
import { getTextEncoding, WireType } from "@bufbuild/protobuf/wire";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import type { DescMessage, MessageShape } from "@bufbuild/protobuf";
import { countElements, decodeBounded, MAX_MESSAGE_ELEMENTS } from "./decode-budget.js";
import { isUint53 } from "./proto-wire.js";

/** Thrown inside a hand decoder or encoder when it leaves a frame to protobuf-es; never escapes the codec modules. */
export const LEAVE = new Error("left to protobuf-es");

/**
 * The value of every empty bytes field a hand decoder makes (protobuf-es
 * makes a new one per field: the same value, with no contents to share):
 * a host's answer to a ping has six of them.
 */
export const EMPTY = new Uint8Array(0);

export const VARINT = WireType.Varint;
export const LEN = WireType.LengthDelimited;

/** A reader over one frame: positions, and the elements counted as decode-budget's walk counts them (every tag, nested ones too). */
export class Reader {
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
      // ASCII (ids, names): one native slice. (Appending a character at a time built a chain of partial
      // strings, ~1 KB of garbage per id, flattened again at its first Map lookup: 418–478 ns per id
      // against 153–183 with the lookup, fast-text.ts.)
      for (let i = from; i < to; i++) if (buf[i]! > 0x7f) return decodeText(buf.subarray(from, to));
      return latin1Slice.call(buf, from, to);
    }
    return decodeText(buf.subarray(from, to));
  }

  /** A bytes field: a view into the frame, as protobuf-es's reader gives it. */
  bytes(end: number): Uint8Array {
    const to = this.span(end);
    const from = this.pos;
    this.pos = to;
    return this.buf.subarray(from, to);
  }

  /** A message field's end: its bytes must close exactly there (protobuf-es reads on past a short one; left to it). */
  closes(to: number): void {
    if (this.pos !== to) throw LEAVE;
  }
}

/** Bytes known to be ASCII as a string (latin1 and ASCII agree on them); works on any Uint8Array. */
const latin1Slice = Buffer.prototype.latin1Slice as (this: Uint8Array, start: number, end: number) => string;

function decodeText(bytes: Uint8Array): string {
  try {
    return getTextEncoding().decodeUtf8(bytes, true);
  } catch {
    throw LEAVE;
  }
}

/** A Timestamp message's fields up to `to` (seconds below 2^49, as every clock here writes them). */
export function readTimestamp(r: Reader, to: number): Timestamp {
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
  r.closes(to);
  return t;
}

/** Whether a message carries no fields this release does not know (a hand encoder leaves those to protobuf-es). */
export const noUnknown = (m: { $unknown?: unknown[] }): boolean => !m.$unknown?.length;

/** A uint32 value, as protobuf-es accepts it (anything else is left to it, which refuses it). */
export function uint32(n: number): number {
  if (!(isUint53(n) && n <= 0xffffffff)) throw LEAVE;
  return n;
}

/** A uint64 given as a bigint within a safe integer (what rexmesh sends); anything else is left to protobuf-es. */
export function uint64(n: bigint): number {
  if (typeof n !== "bigint" || n < 0n || n > BigInt(Number.MAX_SAFE_INTEGER)) throw LEAVE;
  return Number(n);
}

/**
 * A frame of `schema` decoded by hand with `read` where it can be, else by
 * `decodeBounded`: the same message, the same refusals. An element takes
 * two bytes or more, so only a frame this long can be over the budget: it
 * is counted first, as decodeBounded does, and refused before any object is
 * made (a hand reader would notice only at element 1,000,001: an attack
 * review measured 4.1 s and 723 MiB to refuse one, against 0.1 s and 4 MiB).
 */
export function decodeByHand<D extends DescMessage>(schema: D, bytes: Uint8Array, read: (r: Reader) => MessageShape<D>): MessageShape<D> {
  if (bytes.length >= 2 * MAX_MESSAGE_ELEMENTS && countElements(schema, bytes) === Infinity) return decodeBounded(schema, bytes);
  return readByHand(bytes, read) ?? decodeBounded(schema, bytes);
}

/** A hand reader alone: the message, or undefined where it leaves the frame to protobuf-es. */
export function readByHand<M>(bytes: Uint8Array, read: (r: Reader) => M): M | undefined {
  try {
    return read(new Reader(bytes));
  } catch {
    // Left to protobuf-es (LEAVE), or anything unforeseen: protobuf-es judges the frame.
    return undefined;
  }
}

/** A hand writer alone: the bytes, or undefined where it leaves the message to protobuf-es. */
export function writeByHand<M>(msg: M, write: (msg: M) => Uint8Array): Uint8Array | undefined {
  try {
    return write(msg);
  } catch {
    // A value the hand encoder does not write (LEAVE): protobuf-es encodes it, or refuses it.
    return undefined;
  }
}
