/**
 * X25519 key halves (common/x25519.ts): made from random bytes and read
 * back through DER, because on Node 20 generateKeyPairSync followed by a
 * JWK export deadlocks the process now and then (a GC during the export
 * frees the key-generation job, whose destructor takes the lock the export
 * holds). Making keys in a loop, in a process of its own, must finish.
 */
import { spawnSync } from "node:child_process";
import { createPublicKey } from "node:crypto";
import { describe, expect, it } from "vitest";
import { keyHalfOf, newKeyHalf, sharedSecret, X25519_KEY_BYTES } from "../../common/x25519.js";

describe("X25519 key halves", () => {
  it("are X25519 keys whose raw public half is the key's own, distinct, and agree the same secret at both ends", () => {
    const seen = new Set<string>();
    for (let i = 0; i < 200; i++) {
      const a = newKeyHalf();
      const b = newKeyHalf();
      expect(a.privateKey.asymmetricKeyType).toBe("x25519");
      expect(a.publicKey).toHaveLength(X25519_KEY_BYTES);
      // The raw half as JWK names it (safe here: these keys were not made by generateKeyPairSync).
      expect(Buffer.from(a.publicKey).toString("base64url")).toBe(createPublicKey(a.privateKey).export({ format: "jwk" }).x);
      expect(sharedSecret(a.privateKey, b.publicKey)!.equals(sharedSecret(b.privateKey, a.publicKey)!)).toBe(true);
      seen.add(Buffer.from(a.publicKey).toString("hex"));
      // A stored key (PKCS#8) reads back to the same half.
      const stored = a.privateKey.export({ format: "der", type: "pkcs8" });
      expect(Buffer.from(keyHalfOf(stored).publicKey).equals(Buffer.from(a.publicKey))).toBe(true);
    }
    expect(seen.size).toBe(200);
    expect(() => keyHalfOf(Buffer.from("not a key"))).toThrow();
  });

  it("are made 30,000 times in a row, under constant garbage collection, without the process hanging", () => {
    const script = `
      const { newKeyHalf } = await import(${JSON.stringify(new URL("../../dist/common/x25519.js", import.meta.url).href)});
      const keep = [];
      for (let i = 0; i < 30000; i++) { keep.push(newKeyHalf().publicKey); if (keep.length > 1000) keep.length = 0; }
      process.stdout.write("made 30000");
    `;
    // The old way hung within a few thousand keys here (0 % CPU, a futex wait in a KeyGenJob destructor).
    const r = spawnSync(process.execPath, ["--max-semi-space-size=1", "--input-type=module", "-e", script], { encoding: "utf8", timeout: 120_000 });
    expect(r.signal, "the key-making process hung and was killed").toBeNull();
    expect(r.stdout).toBe("made 30000");
  }, 130_000);
});
