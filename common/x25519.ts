/**
 * X25519 key agreement, shared by the two places the controller and a host
 * agree a key the proxy between them never sees: a session's sealing key
 * (common/session-seal.ts) and the key that MACs a host's task ends
 * (common/end-mac.ts).
 */
import { createPrivateKey, createPublicKey, diffieHellman, randomBytes, type KeyObject } from "node:crypto";

/** Bytes of a raw X25519 public key. */
export const X25519_KEY_BYTES = 32;

/** One end's half of a key agreement: an X25519 key pair. */
export interface KeyHalf {
  /** Raw public key, 32 bytes: what goes to the other end. */
  publicKey: Uint8Array;
  privateKey: KeyObject;
}

/** PKCS#8 DER of an X25519 private key, before its 32 bytes (RFC 8410). */
const PKCS8_PREFIX = Buffer.from("302e020100300506032b656e04220420", "hex");
/** SPKI DER of an X25519 public key, before its 32 bytes (RFC 8410). */
const SPKI_PREFIX = Buffer.from("302a300506032b656e032100", "hex");

/**
 * A new key half. The private key is 32 random bytes (any 32 bytes are an
 * X25519 private key: the curve clamps them) made a KeyObject from PKCS#8,
 * not `generateKeyPairSync`: on Node 20, exporting as JWK a key that
 * generateKeyPairSync made deadlocks the process when a garbage collection
 * during the export frees the finished key-generation job (its destructor
 * takes the key's lock, which the export holds). A host simulator process
 * hung that way on one of its 6,250 keys, and a daemon could at its start
 * (test/unit/x25519-keys.test.ts makes keys until it would have).
 */
export function newKeyHalf(): KeyHalf {
  return keyHalfOf(Buffer.concat([PKCS8_PREFIX, randomBytes(X25519_KEY_BYTES)]));
}

/** The half of a private key (a stored one: PKCS#8 DER); throws on anything but an X25519 key. */
export function keyHalfOf(privateKey: KeyObject | Uint8Array): KeyHalf {
  const key = privateKey instanceof Uint8Array ? createPrivateKey({ key: Buffer.from(privateKey), format: "der", type: "pkcs8" }) : privateKey;
  if (key.asymmetricKeyType !== "x25519") throw new Error(`an X25519 key was expected, not ${key.asymmetricKeyType ?? "a secret key"}`);
  // DER, not JWK (above): the raw key is what follows the fixed SPKI prefix.
  const spki = createPublicKey(key).export({ type: "spki", format: "der" });
  if (spki.length !== SPKI_PREFIX.length + X25519_KEY_BYTES || !spki.subarray(0, SPKI_PREFIX.length).equals(SPKI_PREFIX)) throw new Error("an X25519 public key's SPKI encoding was not the RFC 8410 one");
  return { publicKey: Buffer.from(spki.subarray(SPKI_PREFIX.length)), privateKey: key };
}

/**
 * The X25519 shared secret of `own` and a peer's raw public key, or
 * undefined when the peer's key is not 32 bytes or not usable (a low-order
 * point: Node refuses it). Imported as a JWK, as Ed25519 keys are
 * (common/ed25519.ts): cheaper than OpenSSL's DER decoders.
 */
export function sharedSecret(own: KeyObject, peerPublicKey: Uint8Array): Buffer | undefined {
  if (peerPublicKey.length !== X25519_KEY_BYTES) return undefined;
  try {
    const peer = createPublicKey({ key: { kty: "OKP", crv: "X25519", x: Buffer.from(peerPublicKey).toString("base64url") }, format: "jwk" });
    return diffieHellman({ privateKey: own, publicKey: peer });
  } catch {
    return undefined;
  }
}
