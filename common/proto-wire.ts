/**
 * Protobuf's binary format for rexmesh's hand encoders (common/output-wire.ts,
 * controller/task-wire.ts): each piece writes exactly the bytes protobuf-es's
 * BinaryWriter writes for the same value, so a hand-encoded message is
 * byte-for-byte what `toBinary` makes, without its reflection.
 */
import { WireType } from "@bufbuild/protobuf/wire";

/** Bytes of a non-negative safe integer as a varint. */
export function varintSize(n: number): number {
  let size = 1;
  while (n >= 0x80) {
    n = Math.floor(n / 0x80);
    size++;
  }
  return size;
}

/** Writes a non-negative safe integer as a varint at `off`; returns the offset after it. */
export function writeVarint(buf: Uint8Array, off: number, n: number): number {
  while (n >= 0x80) {
    buf[off++] = (n % 0x80) | 0x80;
    n = Math.floor(n / 0x80);
  }
  buf[off++] = n;
  return off;
}

/** Whether `n` is a value of an int32 field (or an enum): anything else protobuf-es refuses to encode. */
export function isInt32(n: number): boolean {
  return Number.isInteger(n) && n >= -0x80000000 && n <= 0x7fffffff;
}

/** Whether `n` fits a varint written by {@link writeVarint} (uint64 fields given as numbers). */
export function isUint53(n: number): boolean {
  return Number.isSafeInteger(n) && n >= 0;
}

/**
 * A message writer over one scratch buffer, reused call after call: fields
 * are written in the order given (protobuf-es writes them in field-number
 * order, defaults left out — the caller does the same), a nested message is
 * written in place between {@link fork} and {@link join}, and
 * {@link finish} copies the bytes out. Not re-entrant: finish before the
 * next message.
 */
export class ProtoWriter {
  private buf = Buffer.allocUnsafe(4096);
  private pos = 0;
  private readonly forks: number[] = [];

  /** Starts a new message. */
  reset(): this {
    this.pos = 0;
    this.forks.length = 0;
    return this;
  }

  private ensure(more: number): void {
    if (this.pos + more <= this.buf.length) return;
    const grown = Buffer.allocUnsafe(Math.max(this.buf.length * 2, this.pos + more));
    this.buf.copy(grown, 0, 0, this.pos);
    this.buf = grown;
  }

  /** A field's tag. */
  tag(no: number, wireType: WireType): this {
    this.ensure(5);
    this.pos = writeVarint(this.buf, this.pos, ((no << 3) | wireType) >>> 0);
    return this;
  }

  /** A uint32/uint64/enum value known to be a non-negative safe integer, with its tag. */
  uint(no: number, n: number): this {
    this.tag(no, WireType.Varint).ensure(10);
    this.pos = writeVarint(this.buf, this.pos, n);
    return this;
  }

  /** An int32 (or enum) value with its tag: a negative one sign-extended to ten bytes, as protobuf writes it. */
  int32(no: number, n: number): this {
    if (n >= 0) return this.uint(no, n);
    this.tag(no, WireType.Varint).ensure(10);
    const buf = this.buf;
    let lo = n >>> 0;
    for (let i = 0; i < 4; i++) {
      buf[this.pos++] = (lo & 0x7f) | 0x80;
      lo >>>= 7;
    }
    // Bits 28–31 of the low word, then the high word: all ones.
    buf[this.pos++] = lo | 0xf0;
    buf[this.pos++] = 0xff;
    buf[this.pos++] = 0xff;
    buf[this.pos++] = 0xff;
    buf[this.pos++] = 0xff;
    buf[this.pos++] = 0x01;
    return this;
  }

  /** A bool with its tag. */
  bool(no: number, b: boolean): this {
    return this.uint(no, b ? 1 : 0);
  }

  /** A string with its tag, as UTF-8 (a lone surrogate becomes U+FFFD, as TextEncoder makes it). */
  string(no: number, s: string): this {
    const n = s.length;
    this.tag(no, WireType.LengthDelimited).ensure(5 + n * 3);
    const buf = this.buf;
    if (n * 3 < 0x80) {
      // The length fits one byte whatever the characters: write the string after it, ASCII by hand.
      const at = this.pos;
      let i = 0;
      for (; i < n; i++) {
        const c = s.charCodeAt(i);
        if (c > 0x7f) break;
        buf[at + 1 + i] = c;
      }
      const len = i === n ? n : buf.write(s, at + 1, "utf8");
      buf[at] = len;
      this.pos = at + 1 + len;
      return this;
    }
    this.pos = writeVarint(buf, this.pos, Buffer.byteLength(s, "utf8"));
    this.pos += buf.write(s, this.pos, "utf8");
    return this;
  }

  /** A bytes value after its tag: its length, then the bytes as they are. */
  bytes(bytes: Uint8Array): this {
    this.ensure(5 + bytes.length);
    this.pos = writeVarint(this.buf, this.pos, bytes.length);
    this.buf.set(bytes, this.pos);
    this.pos += bytes.length;
    return this;
  }

  /** Bytes as they are (an encoded message, after its tag and length). */
  raw(bytes: Uint8Array): this {
    this.ensure(bytes.length);
    this.buf.set(bytes, this.pos);
    this.pos += bytes.length;
    return this;
  }

  /** Starts a length-delimited part (after its tag, if it has one): its length is written by {@link join}. */
  fork(): this {
    this.ensure(1);
    this.forks.push(this.pos++);
    return this;
  }

  /** Ends the part {@link fork} began, writing its length before it. */
  join(): this {
    const at = this.forks.pop()!;
    const len = this.pos - at - 1;
    if (len < 0x80) {
      this.buf[at] = len;
      return this;
    }
    const extra = varintSize(len) - 1;
    this.ensure(extra);
    this.buf.copyWithin(at + 1 + extra, at + 1, this.pos);
    writeVarint(this.buf, at, len);
    this.pos += extra;
    return this;
  }

  /** A copy of what was written since {@link reset}. */
  finish(): Uint8Array {
    return Buffer.from(this.buf.subarray(0, this.pos));
  }
}
