/**
 * Hand-built PKCS#10 requests an attacker could send: well-formed DER whose
 * key would make a pure-JS signature check run for a minute (a 16384-bit
 * modulus with a 16384-bit exponent), or keys of the wrong type or size.
 * Built with node-forge's ASN.1 writer only; no key is generated, so they
 * are cheap to make.
 */
import { randomBytes } from "node:crypto";
import forge from "node-forge";

const asn1 = forge.asn1;

function integer(bytes: Buffer): forge.asn1.Asn1 {
  // A positive INTEGER: a leading zero when the top bit is set.
  const b = bytes[0]! & 0x80 ? Buffer.concat([Buffer.from([0]), bytes]) : bytes;
  return asn1.create(asn1.Class.UNIVERSAL, asn1.Type.INTEGER, false, b.toString("binary"));
}

function oid(dotted: string): forge.asn1.Asn1 {
  return asn1.create(asn1.Class.UNIVERSAL, asn1.Type.OID, false, asn1.oidToDer(dotted).getBytes());
}

function nul(): forge.asn1.Asn1 {
  return asn1.create(asn1.Class.UNIVERSAL, asn1.Type.NULL, false, "");
}

function bitString(bytes: Buffer): forge.asn1.Asn1 {
  return asn1.create(asn1.Class.UNIVERSAL, asn1.Type.BITSTRING, false, "\0" + bytes.toString("binary"));
}

function seq(...items: forge.asn1.Asn1[]): forge.asn1.Asn1 {
  return asn1.create(asn1.Class.UNIVERSAL, asn1.Type.SEQUENCE, true, items);
}

function der(a: forge.asn1.Asn1): Buffer {
  return Buffer.from(asn1.toDer(a).getBytes(), "binary");
}

/** A random number of exactly `bits` bits (top bit set), odd. */
function bigNumber(bits: number): Buffer {
  const b = randomBytes(Math.ceil(bits / 8));
  b[0] = b[0]! | 0x80;
  b[b.length - 1] = b[b.length - 1]! | 1;
  return b;
}

/** An RSA SubjectPublicKeyInfo with the modulus and exponent given. */
export function rsaSpki(n: Buffer, e: Buffer): Buffer {
  return der(seq(seq(oid("1.2.840.113549.1.1.1"), nul()), bitString(der(seq(integer(n), integer(e))))));
}

/** A CSR around any SubjectPublicKeyInfo, with a random "signature" of `sigBytes`. */
export function csrAround(spki: Buffer, sigBytes = 256, sigOid = "1.2.840.113549.1.1.11"): string {
  const spkiAsn1 = asn1.fromDer(spki.toString("binary"));
  const info = seq(
    integer(Buffer.from([0])),
    seq(),
    spkiAsn1,
    asn1.create(asn1.Class.CONTEXT_SPECIFIC, 0, true, []),
  );
  const sig = randomBytes(sigBytes);
  sig[0] = 0x01;
  const csr = seq(info, seq(oid(sigOid), nul()), bitString(sig));
  const b64 = der(csr).toString("base64").replace(/.{64}/g, "$&\n");
  return `-----BEGIN CERTIFICATE REQUEST-----\n${b64}${b64.endsWith("\n") ? "" : "\n"}-----END CERTIFICATE REQUEST-----\n`;
}

/**
 * The CSR of the finding: a 16384-bit modulus and a 16384-bit exponent
 * (about 8.6 KB of PEM). node-forge's verify spent about 52 s on it.
 */
export function hostileCsr(bits = 16384): string {
  return csrAround(rsaSpki(bigNumber(bits), bigNumber(bits)), bits / 8);
}

/** An RSA key of `bits` with exponent `e`, in a CSR whose signature is garbage. */
export function rsaCsr(bits: number, e: number | Buffer = 65537): string {
  const eb = typeof e === "number" ? Buffer.from(e.toString(16).padStart(e.toString(16).length + (e.toString(16).length % 2), "0"), "hex") : e;
  return csrAround(rsaSpki(bigNumber(bits), eb), Math.ceil(bits / 8));
}
