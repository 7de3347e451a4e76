import { generateKeyPairSync } from "node:crypto";
import forge from "node-forge";
import { describe, expect, it } from "vitest";
import { generateKeyPair } from "../../certs/ca.js";
import { createCsr, keyFingerprint, readCsr } from "../../certs/enrollment.js";
import { InvalidArgumentError } from "../../common/errors.js";
import { LIMITS } from "../../common/limits.js";
import { otherTestKeys, testKeys } from "../test-ca.js";
import { csrAround, hostileCsr, rsaCsr } from "./hostile-csr.js";

/** How long readCsr took, and what it threw. */
function timed(csrPem: string): { ms: number; error: unknown } {
  const t0 = performance.now();
  try {
    readCsr(csrPem);
    return { ms: performance.now() - t0, error: undefined };
  } catch (error) {
    return { ms: performance.now() - t0, error };
  }
}

/** Issue 12, finding "unauthenticated CPU denial of service": the key is judged from the DER before any signature math. */
describe("CSR checks before signature math", () => {
  it("refuses the 16384-bit modulus-and-exponent CSR in milliseconds, with INVALID_ARGUMENT", () => {
    const csr = hostileCsr();
    expect(csr.length).toBeGreaterThan(8000);
    const { ms, error } = timed(csr);
    expect(error).toBeInstanceOf(InvalidArgumentError);
    expect((error as Error).message).toMatch(/RSA key of 2048 to 4096 bits/);
    expect(ms).toBeLessThan(250);
  });

  it("refuses RSA moduli outside 2048-4096 bits and exponents other than 65537, quickly", () => {
    for (const [bits, e, why] of [
      [1024, 65537, /2048 to 4096 bits/],
      [8192, 65537, /2048 to 4096 bits/],
      [2048, 3, /exponent 65537/],
      [2048, Buffer.alloc(512, 0xff), /exponent 65537/],
    ] as const) {
      const { ms, error } = timed(rsaCsr(bits, e));
      expect(error, `${bits} bits, e=${String(e).slice(0, 10)}`).toBeInstanceOf(InvalidArgumentError);
      expect((error as Error).message).toMatch(why);
      expect(ms).toBeLessThan(250);
    }
  });

  it("refuses keys that are neither ECDSA P-256 nor RSA, and a P-256 point that is compressed or off the curve", () => {
    const p384 = generateKeyPairSync("ec", { namedCurve: "P-384" }).publicKey.export({ type: "spki", format: "der" });
    expect(() => readCsr(csrAround(p384, 64))).toThrow(/ECDSA P-256 key or an RSA key/);
    const ed = generateKeyPairSync("ed25519").publicKey.export({ type: "spki", format: "der" });
    expect(() => readCsr(csrAround(ed, 64))).toThrow(/ECDSA P-256 key or an RSA key/);
    const uncompressed = generateKeyPairSync("ec", { namedCurve: "P-256" }).publicKey.export({ type: "spki", format: "der" });
    // The same key with its point compressed: 02|03 and X only.
    const x = uncompressed.subarray(uncompressed.length - 64, uncompressed.length - 32);
    const odd = uncompressed[uncompressed.length - 1]! & 1;
    const body = Buffer.concat([uncompressed.subarray(2, 23), Buffer.from([0x03, 34, 0, 2 | odd]), x]);
    const compressed = Buffer.concat([Buffer.from([0x30, body.length]), body]);
    expect(() => readCsr(csrAround(compressed, 72))).toThrow(/ECDSA P-256 key or an RSA key/);
    // A point off the curve, in an otherwise well-made request.
    const good = Buffer.from(createCsr("h1", generateKeyPair()).replace(/-----[^-]+-----/g, "").replace(/\s/g, ""), "base64");
    const at = good.indexOf(Buffer.from([0x03, 0x42, 0x00, 0x04]));
    expect(at).toBeGreaterThan(0);
    const bent = Buffer.from(good);
    bent[at + 4 + 63]! ^= 1;
    const pem = `-----BEGIN CERTIFICATE REQUEST-----\n${bent.toString("base64")}\n-----END CERTIFICATE REQUEST-----\n`;
    expect(() => readCsr(pem)).toThrow(/cannot be read|signature does not match/);
    // A P-256 key with a signature algorithm of RSA.
    expect(() => readCsr(csrAround(uncompressed, 64))).toThrow(/ecdsa-with-SHA256/);
  });

  it("refuses oversized, non-PEM and malformed DER requests before parsing further", () => {
    expect(() => readCsr("x".repeat(LIMITS.csrBytes + 1))).toThrow(/larger than/);
    expect(() => readCsr("garbage")).toThrow(InvalidArgumentError);
    expect(() => readCsr("-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n")).toThrow(InvalidArgumentError);
    const good = createCsr("h1", testKeys());
    const der = Buffer.from(good.replace(/-----[^-]+-----/g, "").replace(/\s/g, ""), "base64");
    const pem = (b: Buffer) => `-----BEGIN CERTIFICATE REQUEST-----\n${b.toString("base64")}\n-----END CERTIFICATE REQUEST-----\n`;
    // Trailing bytes after the request.
    expect(() => readCsr(pem(Buffer.concat([der, Buffer.from([0, 0])])))).toThrow(InvalidArgumentError);
    // Truncated.
    expect(() => readCsr(pem(der.subarray(0, der.length - 10)))).toThrow(InvalidArgumentError);
    // Indefinite length (BER, not DER).
    const indefinite = Buffer.concat([Buffer.from([0x30, 0x80]), der.subarray(4), Buffer.from([0, 0])]);
    expect(() => readCsr(pem(indefinite))).toThrow(InvalidArgumentError);
  });

  it("accepts the requests daemons make, and still proves possession of the key natively", () => {
    for (const kind of ["ec", 2048, 3072] as const) {
      const keys = generateKeyPair(kind);
      const read = readCsr(createCsr("h1", keys));
      expect(read.fingerprint).toBe(keyFingerprint(keys.publicKeyPem));
    }
    // An ECDSA request signed by another ECDSA key, and one with its signature bent.
    const [k1, k2] = [generateKeyPair(), generateKeyPair()];
    const signedBy2 = createCsr("h1", { publicKeyPem: k1.publicKeyPem, privateKeyPem: k2.privateKeyPem });
    expect(() => readCsr(signedBy2)).toThrow(/signature does not match/);
    // A request for one key signed with another: no proof of possession.
    const a = testKeys();
    const b = otherTestKeys();
    const forged = forge.pki.createCertificationRequest();
    forged.publicKey = forge.pki.publicKeyFromPem(a.publicKeyPem);
    forged.sign(forge.pki.privateKeyFromPem(b.privateKeyPem), forge.md.sha256.create());
    expect(() => readCsr(forge.pki.certificationRequestToPem(forged))).toThrow(/signature/);
    // A valid key with a garbage signature.
    expect(() => readCsr(rsaCsr(2048))).toThrow(/signature/);
  });
});
