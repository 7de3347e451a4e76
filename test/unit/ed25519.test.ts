import { describe, expect, it } from "vitest";
import { generateKeyPairSync, sign, verify } from "node:crypto";
import { ed25519PublicKey } from "../../common/ed25519.js";

describe("ed25519PublicKey", () => {
  it("reads an Ed25519 SPKI as the same key, and nothing else", () => {
    const { publicKey, privateKey } = generateKeyPairSync("ed25519");
    const spki = publicKey.export({ type: "spki", format: "der" });
    const key = ed25519PublicKey(new Uint8Array(spki))!;
    expect(key.asymmetricKeyType).toBe("ed25519");
    expect(Buffer.compare(key.export({ type: "spki", format: "der" }), spki)).toBe(0);
    const sig = sign(null, Buffer.from("x"), privateKey);
    expect(verify(null, Buffer.from("x"), key, sig)).toBe(true);
    // Inside a larger buffer (as protobuf-es hands out bytes), at an offset.
    const padded = Buffer.concat([Buffer.from([9, 9, 9]), spki, Buffer.from([7])]);
    expect(verify(null, Buffer.from("x"), ed25519PublicKey(padded.subarray(3, 3 + spki.length))!, sig)).toBe(true);
    // Another curve, RSA, a truncated or lengthened key: not Ed25519.
    const x25519 = generateKeyPairSync("x25519").publicKey.export({ type: "spki", format: "der" });
    const rsa = generateKeyPairSync("rsa", { modulusLength: 1024 }).publicKey.export({ type: "spki", format: "der" });
    for (const bad of [x25519, rsa, spki.subarray(0, 43), Buffer.concat([spki, Buffer.from([0])]), Buffer.alloc(0)]) expect(ed25519PublicKey(new Uint8Array(bad))).toBeUndefined();
  });
});
