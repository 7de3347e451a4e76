import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { getTextEncoding, configureTextEncoding } from "@bufbuild/protobuf/wire";
import { afterAll, describe, expect, it } from "vitest";
import { installFastText } from "../../common/fast-text.js";
import { TaskSchema } from "../../gen/rexmesh/v1/controller_pb.js";

const original = getTextEncoding();
afterAll(() => configureTextEncoding(original));

describe("fast protobuf text codec", () => {
  const samples = ["", "t01kahsdkjahsdkj", "x".repeat(64), "y".repeat(65), "héllo wörld", "日本語のホスト", "emoji 🚀 in a name", "\u007f\u0080", "a".repeat(200) + "é"];

  it("encodes and decodes exactly like the built-in codec", () => {
    installFastText();
    const fast = getTextEncoding();
    for (const s of samples) {
      expect(Buffer.from(fast.encodeUtf8(s))).toEqual(Buffer.from(new TextEncoder().encode(s)));
      expect(fast.decodeUtf8(new TextEncoder().encode(s), true)).toBe(s);
    }
  });

  it("keeps strict decoding: invalid UTF-8 still throws", () => {
    installFastText();
    expect(() => getTextEncoding().decodeUtf8(new Uint8Array([0x61, 0xff, 0x62]), true)).toThrow();
  });

  it("round-trips protobuf messages byte for byte", () => {
    configureTextEncoding(original);
    const msgs = samples.map((s, i) => create(TaskSchema, { id: s, hostId: `h${i}`, message: s, region: "r1" }));
    const plain = msgs.map((m) => toBinary(TaskSchema, m));
    installFastText();
    const fast = msgs.map((m) => toBinary(TaskSchema, m));
    expect(fast.map((b) => Buffer.from(b).toString("hex"))).toEqual(plain.map((b) => Buffer.from(b).toString("hex")));
    expect(fast.map((b) => fromBinary(TaskSchema, b).message)).toEqual(samples);
  });
});
