import { create, toBinary, ScalarType, type DescField, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import type { Prng } from "../../chaos/prng.js";

/**
 * Seeded inputs for the RPC fuzz test (the chaos harness's PRNG, so that a
 * failing seed replays exactly): protobuf messages of any type built
 * from their descriptors with hostile field values — oversized strings,
 * huge repeated fields, extreme and negative numbers, enum values no
 * version of the API defines.
 */

/** FNV-1a of the parts: one independent seed per RPC, so that one RPC's inputs do not depend on the others'. */
export function seedOf(...parts: (string | number)[]): number {
  let h = 0x811c9dc5;
  for (const c of parts.join("\u0000")) {
    h ^= c.codePointAt(0)!;
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h;
}

/** Strings that have broken parsers, limits and lookups elsewhere. */
const NASTY_STRINGS = [
  "",
  " ",
  "default",
  "east",
  "all",
  "*",
  "ghost-1",
  "rexmesh://host/default/ghost-1",
  "../../../../etc/passwd",
  "/bin/sh",
  "\u0000",
  "a\u0000b",
  "\r\n\r\n",
  "\u202e\u2066",
  "💥".repeat(40),
  "\ud800",
  "%s%n%x",
  "${PATH}",
  "{{ .params.x }}",
  "sha256:" + "0".repeat(64),
  "sha256:" + "z".repeat(64),
  "sha256:",
  "-1",
  "9".repeat(40),
  "NaN",
  "role=web and (",
  "((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((a=b))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))",
  "not ".repeat(500) + "a=b",
  "(".repeat(4000),
  `hostname ~ "${"*".repeat(300)}"`,
  `hostname ~ "${"*a".repeat(120)}b"`,
  "a=b or ".repeat(1000) + "a=b",
  "rxj1_" + "A".repeat(40),
  "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n",
  "-----BEGIN CERTIFICATE-----\n" + "A".repeat(64) + "\n-----END CERTIFICATE-----\n",
  "steps:\n  - exec: [uptime]\n",
  "name: x\nparams:\n  p: { type: string, pattern: '(a+)+$' }\nsteps:\n  - exec: [uptime, '{{ .params.p }}']\n",
  "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n",
  "!!js/function 'function () {}'",
  "{".repeat(2000),
  "- ".repeat(3000) + "x",
  '{"__proto__": {"polluted": true}}',
  "constructor",
  "__proto__",
  "toString",
];

const ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./:=~!*()[]{}\"' \t\n\\$%&@#,;<>?|^`+";
const EXOTIC = ["é", "ß", "💥", "\u0000", "\u0007", "\u00ad", "\u200b", "\ufeff", "\u202e", "\uffff", "𝔘"];

export interface Budget {
  /** Bytes of big values (strings, bytes, long lists) one message may still get. */
  bytesLeft: number;
}

const SHORT_NASTY_STRINGS = NASTY_STRINGS.filter((s) => s.length <= 64);

/** A string: a nasty one, a short random one, or (not when `small`) one around or over a size limit. */
export function randomString(rng: Prng, budget: Budget, small = false): string {
  const r = rng.next();
  if (r < 0.35) return rng.pick(small ? SHORT_NASTY_STRINGS : NASTY_STRINGS);
  if (small || r < 0.8) {
    let s = "";
    for (let i = rng.int(0, 24); i > 0; i--) s += rng.chance(0.9) ? ALPHABET[rng.int(0, ALPHABET.length - 1)] : rng.pick(EXOTIC);
    return s;
  }
  // Around and over the limits of common/limits.ts: ids (128), labels (63, 256), refs, queries (8 KiB), args (128 KiB), stdin (1 MiB).
  const n = rng.pick([64, 129, 257, 1025, 4097, 8193, 32_769, 131_073, 300_000]);
  if (n > budget.bytesLeft) return "x".repeat(rng.int(0, 200));
  budget.bytesLeft -= n;
  return rng.chance(0.5) ? rng.pick(["x", "é", "(", "*", "\u0000"]).repeat(n) : rng.bytes(Math.ceil(n / 2)).toString("hex");
}

function randomBytes(rng: Prng, budget: Budget, small = false): Uint8Array {
  if (small || rng.chance(0.9)) return rng.bytes(rng.int(0, 64));
  const n = rng.pick([1024, 65_537, 1_048_577, 2_000_000]);
  if (n > budget.bytesLeft) return rng.bytes(rng.int(0, 64));
  budget.bytesLeft -= n;
  return rng.bytes(n);
}

const INT32 = [0, 1, -1, 2 ** 31 - 1, -(2 ** 31), 1000, 65_536];
const UINT32 = [0, 1, 2 ** 32 - 1, 2 ** 31, 100_001, 65_537];
const INT64 = [0n, 1n, -1n, 2n ** 63n - 1n, -(2n ** 63n), 2n ** 53n + 1n, -(2n ** 53n) - 1n, 86_400_000n];
const UINT64 = [0n, 1n, 2n ** 64n - 1n, 2n ** 63n, 2n ** 53n + 1n];
const DOUBLES = [0, -0, NaN, Infinity, -Infinity, 1e308, 5e-324, -1];

function randomScalar(rng: Prng, type: ScalarType, longAsString: boolean, budget: Budget, small: boolean): unknown {
  const long = (v: bigint) => (longAsString ? v.toString() : v);
  switch (type) {
    case ScalarType.STRING:
      return randomString(rng, budget, small);
    case ScalarType.BYTES:
      return randomBytes(rng, budget, small);
    case ScalarType.BOOL:
      return rng.chance(0.5);
    case ScalarType.DOUBLE:
    case ScalarType.FLOAT:
      return rng.chance(0.6) ? rng.pick(DOUBLES) : (rng.next() - 0.5) * 2 ** rng.int(0, 80);
    case ScalarType.INT32:
    case ScalarType.SINT32:
    case ScalarType.SFIXED32:
      return rng.chance(0.6) ? rng.pick(INT32) : rng.u32() | 0;
    case ScalarType.UINT32:
    case ScalarType.FIXED32:
      return rng.chance(0.6) ? rng.pick(UINT32) : rng.u32();
    case ScalarType.INT64:
    case ScalarType.SINT64:
    case ScalarType.SFIXED64:
      return long(rng.chance(0.6) ? rng.pick(INT64) : BigInt.asIntN(64, (BigInt(rng.u32()) << 32n) | BigInt(rng.u32())));
    case ScalarType.UINT64:
    case ScalarType.FIXED64:
      return long(rng.chance(0.6) ? rng.pick(UINT64) : (BigInt(rng.u32()) << 32n) | BigInt(rng.u32()));
  }
}

function randomEnum(rng: Prng, field: { enum: { values: readonly { number: number }[] } }): number {
  // Known values mostly; then values no version of the API defines.
  return rng.chance(0.6) ? rng.pick(field.enum.values).number : rng.pick([-1, 42, 999, 2 ** 31 - 1, -(2 ** 31)]);
}

/**
 * How many elements a repeated field or map gets: a few, or (now and then)
 * thousands of small ones — at most 2,000 messages, which may be larger.
 */
function randomCount(rng: Prng, budget: Budget, small: boolean, messages: boolean): { n: number; small: boolean } {
  if (small || rng.chance(0.9)) return { n: rng.int(0, small ? 2 : 4), small };
  // Around the count limits: labels (64, 128 changes), env (128), params (256), list items (1024), hosts per job (100,000).
  const n = rng.pick(messages ? [65, 129, 257, 1025, 2000] : [65, 129, 257, 1025, 5000, 100_001]);
  const cost = n * (messages ? 256 : 32);
  if (cost > budget.bytesLeft) return { n: rng.int(0, 4), small };
  budget.bytesLeft -= cost;
  return { n, small: true };
}

function randomValue(rng: Prng, field: DescField, depth: number, budget: Budget, small: boolean): unknown {
  switch (field.fieldKind) {
    case "scalar":
      return randomScalar(rng, field.scalar, field.longAsString, budget, small);
    case "enum":
      return randomEnum(rng, field);
    case "message":
      return randomInit(rng, field.message, depth + 1, budget, small);
    case "list": {
      const { n, small: elementsSmall } = randomCount(rng, budget, small, field.listKind === "message");
      const out: unknown[] = [];
      for (let i = 0; i < n; i++) {
        if (field.listKind === "scalar") out.push(randomScalar(rng, field.scalar, field.longAsString, budget, elementsSmall));
        else if (field.listKind === "enum") out.push(randomEnum(rng, field));
        else out.push(randomInit(rng, field.message, depth + 1, budget, elementsSmall));
      }
      return out;
    }
    case "map": {
      const { n, small: entriesSmall } = randomCount(rng, budget, small, field.mapKind === "message");
      const out: Record<string, unknown> = {};
      for (let i = 0; i < n; i++) {
        const key = field.mapKey === ScalarType.STRING ? randomString(rng, budget, entriesSmall) + (n > 4 ? String(i) : "") : String(randomScalar(rng, field.mapKey, true, budget, true));
        const value =
          field.mapKind === "scalar"
            ? randomScalar(rng, field.scalar, false, budget, entriesSmall)
            : field.mapKind === "enum"
              ? randomEnum(rng, field)
              : randomInit(rng, field.message, depth + 1, budget, entriesSmall);
        // An own property even for keys like "__proto__", so that it is sent.
        Object.defineProperty(out, key, { value, enumerable: true, writable: true, configurable: true });
      }
      return out;
    }
  }
}

const MAX_DEPTH = 4;

/** An init object for `create`: some fields set, with hostile values; oneofs get one of their cases. */
export function randomInit(rng: Prng, desc: DescMessage, depth = 0, budget: Budget = { bytesLeft: 4 << 20 }, small = false): Record<string, unknown> {
  const init: Record<string, unknown> = {};
  if (depth >= MAX_DEPTH) return init;
  for (const member of desc.members) {
    if (member.kind === "oneof") {
      if (rng.chance(0.7)) {
        const f = rng.pick(member.fields);
        init[member.localName] = { case: f.localName, value: randomValue(rng, f, depth, budget, small) };
      }
      continue;
    }
    if (rng.chance(small ? 0.7 : 0.35)) continue;
    init[member.localName] = randomValue(rng, member, depth, budget, small);
  }
  return init;
}

export function randomMessage<D extends DescMessage>(rng: Prng, desc: D, budget?: Budget): MessageShape<D> {
  return create(desc, randomInit(rng, desc, 0, budget) as never) as MessageShape<D>;
}

/** A varint, for hand-built protobuf. */
function varint(n: number): number[] {
  const out: number[] = [];
  while (n > 0x7f) {
    out.push((n & 0x7f) | 0x80);
    n >>>= 7;
  }
  out.push(n);
  return out;
}

/**
 * Bytes that decode as the message with a field it does not know (a high
 * field number of a random wire type): a server must ignore it.
 */
export function withUnknownField(rng: Prng, bytes: Uint8Array): Buffer {
  const field = rng.int(1000, 536_870_911);
  const wire = rng.pick([0, 1, 2, 5]);
  const tag = varint(field * 8 + wire);
  const value = wire === 0 ? varint(rng.u32()) : wire === 1 ? [...rng.bytes(8)] : wire === 5 ? [...rng.bytes(4)] : [...varint(7), ...rng.bytes(7)];
  return Buffer.concat([Buffer.from(bytes), Buffer.from([...tag, ...value])]);
}

/** Field 1 sent with each wire type it is not, and a string field with bytes that are not UTF-8. */
export const MISTYPED_FIELDS: readonly { what: string; bytes: Buffer }[] = [
  { what: "field 1 as a varint", bytes: Buffer.from([0x08, 0x96, 0x01]) },
  { what: "field 1 as a 64-bit value", bytes: Buffer.from([0x09, 1, 2, 3, 4, 5, 6, 7, 8]) },
  { what: "field 1 as length-delimited, not UTF-8", bytes: Buffer.from([0x0a, 0x04, 0xff, 0xfe, 0xc0, 0x80]) },
  { what: "field 1 as a 32-bit value", bytes: Buffer.from([0x0d, 1, 2, 3, 4]) },
  { what: "field 1 as a start group", bytes: Buffer.from([0x0b, 0x10, 0x01]) },
  { what: "field 0", bytes: Buffer.from([0x00, 0x01]) },
  { what: "a length past the end", bytes: Buffer.from([0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x41]) },
  { what: "a varint of 11 bytes", bytes: Buffer.from([0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]) },
  { what: "field 1 nested 2,000 length-delimited levels deep", bytes: nestedTower(2000) },
];

/** A message nested `depth` times in field 1, each level length-delimited: recursion a decoder must survive. */
function nestedTower(depth: number): Buffer {
  let inner = Buffer.alloc(0);
  for (let i = 0; i < depth; i++) inner = Buffer.concat([Buffer.from([0x0a, ...varint(inner.length)]), inner]);
  return inner;
}

export function encode<D extends DescMessage>(desc: D, message: MessageShape<D>): Buffer {
  return Buffer.from(toBinary(desc, message));
}
