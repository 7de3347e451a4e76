/**
 * X25519 key agreement, shared by the two places the controller and a host
 * agree a key the proxy between them never sees: a session's sealing key
 * (common/session-seal.ts) and the key that MACs a host's task ends
 * (common/end-mac.ts).
 */
import { createPrivateKey, createPublicKey, diffieHellman, generateKeyPairSync, type KeyObject } from "node:crypto";

/** Bytes of a raw X25519 public key. */
export const X25519_KEY_BYTES = 32;

/** One end's half of a key agreement: an X25519 key pair. */
export interface KeyHalf {
  /** Raw public key, 32 bytes: what goes to the other end. */
  publicKey: Uint8Array;
  privateKey: KeyObject;
}

export function newKeyHalf(): KeyHalf {
  return keyHalfOf(generateKeyPairSync("x25519").privateKey);
}

/** The half of a private key (a stored one: PKCS#8 DER); throws on anything but an X25519 key. */
export function keyHalfOf(privateKey: KeyObject | Uint8Array): KeyHalf {
  const key = privateKey instanceof Uint8Array ? createPrivateKey({ key: Buffer.from(privateKey), format: "der", type: "pkcs8" }) : privateKey;
  if (key.asymmetricKeyType !== "x25519") throw new Error(`an X25519 key was expected, not ${key.asymmetricKeyType ?? "a secret key"}`);
  const jwk = createPublicKey(key).export({ format: "jwk" });
  return { publicKey: Buffer.from(jwk.x!, "base64url"), privateKey: key };
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
