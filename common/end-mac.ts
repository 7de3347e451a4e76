/**
 * Task ends vouched for by a MAC instead of a signature (docs/fan-out.md,
 * "Ends vouched for by a MAC"). Checking an Ed25519 signature costs the
 * controller about 110 µs of CPU per host per job; an HMAC about one. The
 * guarantee against a proxy is the same as long as the proxy never holds
 * the MAC key: the key comes from an X25519 agreement between a half the
 * host's report key carries and a half the controller's task-signing key
 * carries, and each half is vouched for by the certificate that endorses
 * its key.
 *
 * How a half is vouched for: a key whose id has the paired form names both
 * of its public keys (the id is their fingerprint), and the id is what the
 * certificate's endorsement covers. The endorsement's bytes are those an
 * earlier release checks, so an earlier controller still takes a new
 * daemon's report key (and an earlier daemon a new controller's signing
 * key), ignoring the X25519 half; a proxy that changes or strips the half
 * makes the id disagree, and the key is refused.
 */
import { createHash, createHmac, hkdfSync, timingSafeEqual, type KeyObject } from "node:crypto";
import { identityUri, type PeerIdentity } from "../certs/identity.js";
import { framed } from "./framed.js";
import { sharedSecret, X25519_KEY_BYTES } from "./x25519.js";

/** Bytes of an end's MAC (HMAC-SHA256). */
export const END_MAC_BYTES = 32;

/** The longest key id a MAC'd end may name (ids made here are 33 characters). */
export const END_KEY_ID_CHARS = 64;

/** A key id that names an X25519 half: "x" and 128 bits of a fingerprint, in hex. Earlier ids are 16 hex digits. */
const PAIRED_ID = /^x[0-9a-f]{32}$/;

/** What a paired key id is the fingerprint of. */
export type PairedKind = "host report key" | "task-signing key";

/** The id of a key made of an Ed25519 key (its SPKI DER) and an X25519 half (raw). */
export function pairedKeyId(kind: PairedKind, signingKey: Uint8Array, x25519: Uint8Array): string {
  return `x${createHash("sha256").update(framed(`${kind} id`, signingKey, x25519)).digest("hex").slice(0, 32)}`;
}

/**
 * The X25519 half a key's id vouches for: none when the id is of the
 * earlier form (whatever the key carries: nothing vouches for it);
 * "mismatch" when the id names a half and the key carries another or none
 * (changed or stripped on the way).
 */
export function pairedHalf(kind: PairedKind, keyId: string, signingKey: Uint8Array, x25519: Uint8Array): Uint8Array | "mismatch" | undefined {
  if (!PAIRED_ID.test(keyId)) return undefined;
  if (x25519.length !== X25519_KEY_BYTES || pairedKeyId(kind, signingKey, x25519) !== keyId) return "mismatch";
  return x25519;
}

/** The id an end names the controller's X25519 key by: a fingerprint, so that nobody has to be told it. */
export function controllerKeyId(x25519: Uint8Array): string {
  return `x${createHash("sha256").update(framed("controller end key id", x25519)).digest("hex").slice(0, 32)}`;
}

/**
 * The key that MACs one host's task ends for one controller key: HKDF-SHA256
 * over the X25519 shared secret, salted with both public halves and the
 * host's identity, under its own label. Either end computes it with its own
 * private half and the other's public one. Undefined when the peer's half
 * is not a usable X25519 key.
 */
export function endMacKey(own: KeyObject, peer: Uint8Array, controllerKey: Uint8Array, hostKey: Uint8Array, host: PeerIdentity): Buffer | undefined {
  const shared = sharedSecret(own, peer);
  if (!shared) return undefined;
  return Buffer.from(hkdfSync("sha256", shared, framed("task end mac salt", controllerKey, hostKey, identityUri(host)), "rexmesh task end mac v1", 32));
}

/** The MAC of an end's framed bytes. */
export function endMac(key: Buffer, bytes: Buffer): Buffer {
  return createHmac("sha256", key).update(bytes).digest();
}

/** Does `mac` hold for these bytes? Compared in constant time; a MAC of any other length does not. */
export function endMacHolds(key: Buffer, bytes: Buffer, mac: Uint8Array): boolean {
  return mac.length === END_MAC_BYTES && timingSafeEqual(endMac(key, bytes), mac);
}
