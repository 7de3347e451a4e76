/**
 * What the differential tests of the hand codecs (agent-link-wire,
 * proxy-link-wire) share: outcomes compared down to prototypes and key
 * order, seeded values around every edge the hand readers and writers have,
 * and byte-level mangling of frames.
 */
import { create, toBinary, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { expect, it } from "vitest";
import { Prng } from "../../chaos/prng.js";
import { decodeBounded } from "../../common/decode-budget.js";
import { writeVarint } from "../../common/proto-wire.js";
import { OutputChunkSchema, SignedTaskSchema, TaskBatchProofSchema, TaskStatusSchema } from "../../gen/rexmesh/v1/task_pb.js";

/** Where two decoded values differ (prototype, own keys in order, value kinds such as Buffer against Uint8Array, bigint against number), or undefined. */
export function difference(a: unknown, b: unknown, path = "$"): string | undefined {
  if (typeof a !== typeof b) return `${path}: ${typeof a} vs ${typeof b}`;
  if (a === null || b === null || typeof a !== "object") return Object.is(a, b) ? undefined : `${path}: ${String(a)} vs ${String(b)}`;
  if (Object.getPrototypeOf(a) !== Object.getPrototypeOf(b)) return `${path}: prototypes differ`;
  if (a instanceof Uint8Array) return Buffer.compare(a, b as Uint8Array) === 0 ? undefined : `${path}: bytes differ`;
  const ka = Object.keys(a);
  const kb = Object.keys(b as object);
  if (ka.join() !== kb.join()) return `${path}: keys ${ka.join()} vs ${kb.join()}`;
  for (const k of ka) {
    const d = difference((a as Record<string, unknown>)[k], (b as Record<string, unknown>)[k], `${path}.${k}`);
    if (d) return d;
  }
  return undefined;
}

export type Outcome = { value: unknown } | { error: string };

export function outcome(f: () => unknown): Outcome {
  try {
    return { value: f() };
  } catch (err) {
    return { error: `${(err as Error).constructor.name}: ${(err as Error).message}` };
  }
}

/** Text of the kinds a frame may hold: empty, ids, long, non-ASCII, a leading BOM, a lone surrogate. */
export function text(p: Prng): string {
  switch (p.int(0, 7)) {
    case 0:
      return "";
    case 1:
      return `t-${p.int(0, 1e9)}`;
    case 2:
      return "x".repeat(p.int(60, 300));
    case 3:
      return `héllo ${p.int(0, 99)} ✓ 𝄞`;
    case 4:
      return "\uFEFFbom";
    case 5:
      return "lone \uD800 surrogate";
    case 6:
      return p.bytes(p.int(1, 20)).toString("latin1");
    default:
      return `h${p.int(0, 9999)}`;
  }
}

export function bytesOf(p: Prng): Uint8Array {
  return p.chance(0.3) ? new Uint8Array(0) : new Uint8Array(p.bytes(p.int(1, p.chance(0.1) ? 300 : 40)));
}

/** 64-bit values around every edge the hand decoder has (7-byte varints, 2^49, safe integers, 2^64 - 1). */
export function u64(p: Prng): bigint {
  const edges = [0n, 1n, 127n, 128n, 2n ** 49n - 1n, 2n ** 49n, 2n ** 53n - 1n, 2n ** 53n, 2n ** 63n, 2n ** 64n - 1n];
  return p.chance(0.25) ? edges[p.int(0, edges.length - 1)]! : BigInt(p.int(0, 2 ** 31));
}

export function i64(p: Prng): bigint {
  const edges = [0n, 5n, -1n, -(2n ** 63n), 2n ** 63n - 1n, 2n ** 49n - 1n, 2n ** 49n, -(2n ** 40n)];
  return edges[p.int(0, edges.length - 1)]!;
}

export function u32(p: Prng): number {
  const edges = [0, 1, 127, 128, 2 ** 28 - 1, 2 ** 28, 2 ** 31, 2 ** 32 - 1];
  return p.chance(0.5) ? edges[p.int(0, edges.length - 1)]! : p.int(0, 2 ** 32 - 1);
}

export function i32(p: Prng): number {
  const edges = [0, 1, -1, 2 ** 31 - 1, -(2 ** 31), 12, 99];
  return p.chance(0.3) ? edges[p.int(0, edges.length - 1)]! : p.int(0, 255);
}

/** A hand decoder's outcome on `bytes` against decodeBounded's; a description of the difference, or undefined. */
export function handDecodeDifference<D extends DescMessage>(schema: D, decode: (b: Uint8Array) => MessageShape<D>, bytes: Uint8Array): string | undefined {
  const mine = outcome(() => decode(bytes));
  const theirs = outcome(() => decodeBounded(schema, bytes));
  if ("error" in mine || "error" in theirs) {
    const m = "error" in mine ? mine.error : "decoded";
    const t = "error" in theirs ? theirs.error : "decoded";
    return m === t ? undefined : `hand: ${m}; protobuf-es: ${t}`;
  }
  return difference(mine.value, theirs.value);
}

/** Both as grpc-js hands frames over (a Buffer) and as a plain Uint8Array. */
export function expectSameHandDecode<D extends DescMessage>(schema: D, decode: (b: Uint8Array) => MessageShape<D>, bytes: Uint8Array, what: string): void {
  for (const b of [Buffer.from(bytes), new Uint8Array(bytes)]) {
    const d = handDecodeDifference(schema, decode, b);
    if (d) expect.fail(`${what} (${Buffer.from(bytes).toString("hex")}): ${d}`);
  }
}

/** A hand encoder's bytes (or refusal) against the reference encoder's. */
export function expectSameHandEncode<M>(encode: (m: M) => Uint8Array, reference: (m: M) => Uint8Array, msg: M, what: string): void {
  const mine = outcome(() => Buffer.from(encode(msg)).toString("hex"));
  const theirs = outcome(() => Buffer.from(reference(msg)).toString("hex"));
  expect(mine, what).toEqual(theirs);
}

/**
 * The seeded tests every hand decoder passes: random frames of every field
 * combination decoded as protobuf-es does (at least 40 % of them by hand),
 * the same frames mangled, and two frames run together.
 */
export function seededDecodeTests<D extends DescMessage>(
  schema: D,
  hand: { decode: (b: Uint8Array) => MessageShape<D>; read: (b: Uint8Array) => MessageShape<D> | undefined },
  generate: (p: Prng) => MessageShape<D>,
  seeds: number,
): void {
  const expectSame = (bytes: Uint8Array, what: string) => expectSameHandDecode(schema, hand.decode, bytes, what);
  it("decodes every field combination exactly as protobuf-es does, most of them by hand (seeded)", () => {
    let byHand = 0;
    for (let seed = 1; seed <= seeds; seed++) {
      const bytes = toBinary(schema, generate(new Prng(seed)));
      expectSame(bytes, `seed ${seed}`);
      if (hand.read(bytes)) byHand++;
    }
    expect(byHand).toBeGreaterThan(seeds * 0.4);
  });

  it("accepts and refuses mangled frames exactly as protobuf-es does: cut, flipped, doubled, spliced (seeded)", () => {
    for (let seed = 1; seed <= seeds; seed++) {
      const p = new Prng(seed);
      let bytes: Uint8Array = toBinary(schema, generate(p));
      for (let i = p.int(1, 3); i > 0; i--) bytes = mangle(p, bytes);
      expectSame(bytes, `seed ${seed}`);
    }
  });

  it("reads two frames' bytes run together as one, fields given twice merged or replaced as protobuf-es does (seeded)", () => {
    for (let seed = 1; seed <= 500; seed++) {
      const p = new Prng(seed);
      const a = toBinary(schema, generate(p));
      const b = toBinary(schema, generate(p));
      expectSame(new Uint8Array([...a, ...b]), `seed ${seed}`);
    }
  });
}

// ---- seeded random messages of the types both links carry --------------------

export function status(p: Prng): MessageShape<typeof TaskStatusSchema> {
  const s = create(TaskStatusSchema);
  if (p.chance(0.7)) s.taskId = text(p);
  if (p.chance(0.7)) s.state = i32(p);
  if (p.chance(0.7)) s.time = p.chance(0.8) ? timestampFromMs(p.int(0, 2 ** 42)) : { $typeName: "google.protobuf.Timestamp", seconds: i64(p), nanos: i32(p) };
  if (p.chance(0.5)) s.exitCode = i32(p);
  if (p.chance(0.3)) s.signal = text(p);
  if (p.chance(0.5)) s.message = text(p);
  if (p.chance(0.4)) s.outputChunks = u64(p);
  if (p.chance(0.3)) s.outputTruncated = true;
  if (p.chance(0.6)) s.hostId = text(p);
  if (p.chance(0.2)) s.atProxy = true;
  if (p.chance(0.4)) s.signature = bytesOf(p);
  if (p.chance(0.4)) s.keyId = text(p);
  if (p.chance(0.4)) s.outputSha256 = bytesOf(p);
  if (p.chance(0.4)) s.outputBytes = u64(p);
  if (p.chance(0.3)) s.endMac = bytesOf(p);
  if (p.chance(0.3)) s.endMacKeyId = text(p);
  return s;
}

export function chunk(p: Prng): MessageShape<typeof OutputChunkSchema> {
  const c = create(OutputChunkSchema);
  if (p.chance(0.8)) c.taskId = text(p);
  if (p.chance(0.8)) c.seq = u64(p);
  if (p.chance(0.6)) c.stream = i32(p);
  if (p.chance(0.8)) c.data = bytesOf(p);
  if (p.chance(0.3)) c.hostId = text(p);
  return c;
}

export function task(p: Prng): MessageShape<typeof SignedTaskSchema> {
  const t = create(SignedTaskSchema);
  if (p.chance(0.9)) t.spec = bytesOf(p);
  if (p.chance(0.7)) t.signature = bytesOf(p);
  if (p.chance(0.7)) t.keyId = text(p);
  if (p.chance(0.6)) {
    const b = create(TaskBatchProofSchema);
    if (p.chance(0.7)) b.index = u32(p);
    if (p.chance(0.7)) b.leaves = u32(p);
    for (let i = p.int(0, 5); i > 0; i--) b.path.push(p.chance(0.1) ? new Uint8Array(0) : new Uint8Array(p.bytes(32)));
    if (p.chance(0.7)) b.salt = bytesOf(p);
    if (p.chance(0.03)) b.$unknown = [{ no: 7, wireType: 2, data: new Uint8Array([1, 0]) }];
    t.batch = b;
  }
  if (p.chance(0.03)) t.$unknown = [{ no: 9, wireType: 0, data: new Uint8Array([3]) }];
  return t;
}

// ---- byte-level mangling -----------------------------------------------------

export function varint(n: number): number[] {
  const out = new Uint8Array(10);
  return [...out.subarray(0, writeVarint(out, 0, n))];
}

/** `n` as a varint padded to `len` bytes (an overlong encoding of the same value). */
export function overlong(n: number, len: number): number[] {
  const v = varint(n);
  while (v.length < len) {
    v[v.length - 1]! |= 0x80;
    v.push(0);
  }
  return v;
}

export function mangle(p: Prng, bytes: Uint8Array): Uint8Array {
  const b = [...bytes];
  switch (p.int(0, 5)) {
    case 0:
      return new Uint8Array(b.slice(0, p.int(0, b.length)));
    case 1:
      if (b.length) b[p.int(0, b.length - 1)] = p.int(0, 255);
      return new Uint8Array(b);
    case 2:
      if (b.length) b[p.int(0, b.length - 1)]! ^= 1 << p.int(0, 7);
      return new Uint8Array(b);
    case 3:
      return new Uint8Array([...b, ...b]);
    case 4: {
      const at = p.int(0, b.length);
      return new Uint8Array([...b.slice(0, at), ...p.bytes(p.int(1, 4)), ...b.slice(at)]);
    }
    default: {
      const at = p.int(0, b.length);
      return new Uint8Array([...b.slice(0, at), ...b.slice(p.int(at, b.length))]);
    }
  }
}
