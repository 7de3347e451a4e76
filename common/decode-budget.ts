import { fromBinary, ScalarType, type DescField, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { InvalidArgumentError } from "./errors.js";
import { LIMITS } from "./limits.js";

/**
 * Elements one message received on a link may hold, nested ones included
 * (every field occurrence counts one). A frame of a few MiB from an honest
 * peer holds tens of thousands; decoding is what costs: protobuf-es makes an
 * object per element, and a 15 MiB frame of 7.8 million empty tasks once
 * took a daemon 38 s and 3.3 GiB to decode — a proxy could have run its
 * hosts out of memory, which is more than the delaying and dropping a proxy
 * is allowed.
 */
export const MAX_MESSAGE_ELEMENTS = LIMITS.messageElements;

/**
 * What the counter needs of a field: the message type a length-delimited one
 * holds, if any, or for a repeated number (packed on the wire: one
 * length-delimited run of values) the width of each value, 0 for varints.
 */
interface FieldShape {
  message?: DescMessage;
  mapValue?: DescMessage;
  packedWidth?: number;
}

/** Per message type: its fields by number, as the counter sees them. */
const nested = new WeakMap<DescMessage, Map<number, FieldShape>>();

function fieldsOf(desc: DescMessage): Map<number, FieldShape> {
  let m = nested.get(desc);
  if (!m) {
    m = new Map();
    for (const f of desc.fields) m.set(f.number, nestedOf(f));
    nested.set(desc, m);
  }
  return m;
}

function nestedOf(f: DescField): FieldShape {
  if (f.fieldKind === "message") return { message: f.message };
  if (f.fieldKind === "list" && f.listKind === "message") return { message: f.message };
  if (f.fieldKind === "map" && f.mapKind === "message") return { mapValue: f.message };
  if (f.fieldKind === "list" && f.listKind === "enum") return { packedWidth: 0 };
  if (f.fieldKind === "list" && f.listKind === "scalar" && f.scalar !== ScalarType.STRING && f.scalar !== ScalarType.BYTES) return { packedWidth: scalarWidth(f.scalar) };
  return {};
}

/** Bytes of a fixed-width scalar on the wire; 0 for a varint. */
function scalarWidth(s: ScalarType): number {
  if (s === ScalarType.DOUBLE || s === ScalarType.FIXED64 || s === ScalarType.SFIXED64) return 8;
  if (s === ScalarType.FLOAT || s === ScalarType.FIXED32 || s === ScalarType.SFIXED32) return 4;
  return 0;
}

class OverBudget extends Error {}

/**
 * Counts the elements of `bytes` as a `desc` message, reading only the wire
 * format (tags and lengths, no objects made), and stops past `budget`.
 * Returns the count, or Infinity when over. Bytes that are not a valid
 * encoding are counted as far as they go: decoding reports them.
 */
export function countElements(desc: DescMessage, bytes: Uint8Array, budget: number = MAX_MESSAGE_ELEMENTS): number {
  const counter = { n: 0, budget };
  try {
    walk(desc, bytes, 0, bytes.length, counter);
  } catch (err) {
    if (err instanceof OverBudget) return Infinity;
    // Not a valid encoding: counted as far as it goes, and left to decoding to refuse in its own words.
  }
  return counter.n;
}

/** Decodes a message received from a peer, refusing one with more than MAX_MESSAGE_ELEMENTS elements before any object is made. */
export function decodeBounded<D extends DescMessage>(desc: D, bytes: Uint8Array): MessageShape<D> {
  if (countElements(desc, bytes) === Infinity) {
    throw new InvalidArgumentError(`the ${desc.name} message holds more than ${MAX_MESSAGE_ELEMENTS} elements: refused before decoding`);
  }
  return fromBinary(desc, bytes);
}

function walk(desc: DescMessage | undefined, b: Uint8Array, start: number, end: number, c: { n: number; budget: number }, mapValue?: DescMessage): void {
  let p = start;
  const varint = (): number => {
    let v = 0;
    for (let shift = 0; ; shift += 7) {
      if (p >= end || shift > 63) throw new RangeError("malformed varint");
      const byte = b[p++]!;
      v += (byte & 0x7f) * 2 ** shift;
      if (!(byte & 0x80)) return v;
    }
  };
  // `desc` undefined: a map entry, whose field 2 is a `mapValue` message.
  const fields = desc ? fieldsOf(desc) : undefined;
  while (p < end) {
    const tag = varint();
    if (++c.n > c.budget) throw new OverBudget();
    switch (tag % 8) {
      case 0:
        varint();
        break;
      case 1:
        p += 8;
        break;
      case 5:
        p += 4;
        break;
      case 2: {
        const to = varint() + p;
        if (to > end) throw new RangeError("truncated field");
        const no = Math.floor(tag / 8);
        if (!fields) {
          if (no === 2 && mapValue) walk(mapValue, b, p, to, c);
        } else {
          const f = fields.get(no);
          if (f?.message) walk(f.message, b, p, to, c);
          else if (f?.mapValue) walk(undefined, b, p, to, c, f.mapValue);
          else if (f?.packedWidth !== undefined) {
            // A packed run decodes to one array entry per value: a few bytes can be millions of them.
            let values = 0;
            if (f.packedWidth > 0) values = Math.ceil((to - p) / f.packedWidth);
            else for (let i = p; i < to; i++) if (b[i]! < 0x80) values++;
            c.n += values;
            if (c.n > c.budget) throw new OverBudget();
          }
        }
        p = to;
        break;
      }
      default:
        // Groups (3, 4) and unknown wire types: not ours to judge; decoding refuses them.
        return;
    }
  }
}

/**
 * An upper bound on the elements a JSON request decodes to, in one pass over
 * its bytes and without parsing it: every value in an array follows its `[`
 * or a `,`, and every field follows a `:`, so counting those outside strings
 * counts at least every element. Infinity once past `budget`. Parsing is the
 * cost this saves: 16 MiB of `[{},{},…]` is 5.6 million objects.
 */
export function jsonElementsAtMost(bytes: Uint8Array, budget: number = MAX_MESSAGE_ELEMENTS): number {
  let n = 0;
  let inString = false;
  for (let i = 0; i < bytes.length; i++) {
    const c = bytes[i]!;
    if (inString) {
      if (c === 0x5c /* \\ */) i++;
      else if (c === 0x22 /* " */) inString = false;
    } else if (c === 0x22) inString = true;
    else if (c === 0x5b /* [ */ || c === 0x2c /* , */ || c === 0x3a /* : */) {
      if (++n > budget) return Infinity;
    }
  }
  return n;
}
