/**
 * Daemon releases (docs/updates.md): a manifest naming a version, a
 * platform, and the size and digest of the release artifact, signed with
 * an Ed25519 release key. The release key is not the mesh CA's key and
 * is not held by the controller: a compromised controller or proxy can
 * withhold a release, never make one up. A daemon updates only to a
 * release that a key it trusts signed and whose artifact is exactly the
 * bytes the manifest names.
 */
import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync, sign, verify, type KeyObject } from "node:crypto";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { InvalidArgumentError, PermissionDeniedError } from "./errors.js";
import { digestOf, isDigest } from "./digest.js";
import { ReleaseManifestSchema, SignedReleaseSchema, type ReleaseManifest, type SignedRelease } from "../gen/rexmesh/v1/release_pb.js";

/** What a release signature covers: its own prefix, so that no other signed kind verifies as a release. */
const RELEASE_PREFIX = Buffer.from("rexmesh release v1\0");
/** A version: digits, letters, '.', '-', '+' (semver and the like), at most 64. */
const VERSION = /^[0-9A-Za-z][0-9A-Za-z.+-]{0,63}$/;
/** A platform as Node names it: os-arch. */
const PLATFORM = /^[a-z0-9]+-[a-z0-9]+$/;
/** Bytes of a serialized manifest at most: a handful of short fields. */
const MANIFEST_BYTES_MAX = 1024;

/** A release key's id: the first 16 hex digits of the SHA-256 of its public key (SPKI DER). */
export function releaseKeyId(publicKey: KeyObject): string {
  return createHash("sha256").update(publicKey.export({ type: "spki", format: "der" })).digest("hex").slice(0, 16);
}

/** A new release key pair, as PEM: the private key (PKCS#8) to keep apart, the public key to give daemons. */
export function newReleaseKeyPair(): { privatePem: string; publicPem: string; keyId: string } {
  const { publicKey, privateKey } = generateKeyPairSync("ed25519");
  return {
    privatePem: privateKey.export({ type: "pkcs8", format: "pem" }).toString(),
    publicPem: publicKey.export({ type: "spki", format: "pem" }).toString(),
    keyId: releaseKeyId(publicKey),
  };
}

/** The public keys in a PEM file's text (one or more), each an Ed25519 key; INVALID_ARGUMENT otherwise. */
export function parseReleaseKeys(pemText: string): KeyObject[] {
  const blocks = pemText.match(/-----BEGIN PUBLIC KEY-----[\s\S]+?-----END PUBLIC KEY-----/g) ?? [];
  if (blocks.length === 0) throw new InvalidArgumentError("no release public key (-----BEGIN PUBLIC KEY-----) in the file");
  return blocks.map((b) => {
    const key = createPublicKey(b);
    if (key.asymmetricKeyType !== "ed25519") throw new InvalidArgumentError(`a release key must be Ed25519, not ${key.asymmetricKeyType}`);
    return key;
  });
}

/** A version or platform as a request names it (a lookup key): INVALID_ARGUMENT when it could be neither. */
export function checkReleaseName(what: "version" | "platform", value: string): void {
  if (!(what === "version" ? VERSION : PLATFORM).test(value)) throw new InvalidArgumentError(`release ${what} ${JSON.stringify(value.slice(0, 80))} is not ${what === "version" ? "1-64 letters, digits, '.', '-' or '+'" : "os-arch (e.g. linux-x64)"}`);
}

/** Checks a manifest's fields; INVALID_ARGUMENT naming the first that is wrong. */
export function checkManifest(m: ReleaseManifest): void {
  if (!VERSION.test(m.version)) throw new InvalidArgumentError(`release version ${JSON.stringify(m.version.slice(0, 80))} is not 1-64 letters, digits, '.', '-' or '+'`);
  if (!PLATFORM.test(m.platform)) throw new InvalidArgumentError(`release platform ${JSON.stringify(m.platform.slice(0, 80))} is not os-arch (e.g. linux-x64)`);
  if (!isDigest(m.digest)) throw new InvalidArgumentError(`release digest ${JSON.stringify(m.digest.slice(0, 80))} is not sha256:<64 hex digits>`);
  if (m.size <= 0n) throw new InvalidArgumentError("a release artifact has at least one byte");
}

/** The manifest of an artifact's bytes, signed with the release key (PKCS#8 PEM). */
export function signRelease(artifact: Uint8Array, version: string, platform: string, privatePem: string, nowMs: number): SignedRelease {
  const privateKey = createPrivateKey(privatePem);
  if (privateKey.asymmetricKeyType !== "ed25519") throw new InvalidArgumentError(`a release key must be Ed25519, not ${privateKey.asymmetricKeyType}`);
  const manifest = create(ReleaseManifestSchema, { version, platform, size: BigInt(artifact.length), digest: digestOf(artifact), createdAt: timestampFromMs(nowMs) });
  checkManifest(manifest);
  const bytes = toBinary(ReleaseManifestSchema, manifest);
  return create(SignedReleaseSchema, { manifest: bytes, signature: sign(null, Buffer.concat([RELEASE_PREFIX, bytes]), privateKey), keyId: releaseKeyId(createPublicKey(privateKey)) });
}

/**
 * The manifest of a signed release, if one of the `trusted` keys signed
 * it and its fields hold; PERMISSION_DENIED naming why not (an unknown
 * key, a signature that does not hold: altered, or not a release key's).
 */
export function verifyRelease(signed: SignedRelease, trusted: readonly KeyObject[]): ReleaseManifest {
  const key = trusted.find((k) => releaseKeyId(k) === signed.keyId);
  if (!key) throw new PermissionDeniedError(`the release is signed by key ${JSON.stringify(signed.keyId.slice(0, 32))}, which this daemon does not trust (--release-keys)`);
  if (signed.manifest.length > MANIFEST_BYTES_MAX) throw new PermissionDeniedError(`a release manifest of ${signed.manifest.length} bytes (at most ${MANIFEST_BYTES_MAX})`);
  if (!verify(null, Buffer.concat([RELEASE_PREFIX, signed.manifest]), key, Buffer.from(signed.signature))) {
    throw new PermissionDeniedError(`the release's signature does not hold for key ${signed.keyId}: the manifest was altered, or not signed with that release key`);
  }
  let manifest: ReleaseManifest;
  try {
    manifest = fromBinary(ReleaseManifestSchema, signed.manifest);
  } catch {
    throw new PermissionDeniedError("the release manifest does not decode");
  }
  checkManifest(manifest);
  return manifest;
}

/** Checks that an artifact is exactly what a verified manifest names (size, then digest); PERMISSION_DENIED otherwise. */
export function checkReleaseArtifact(manifest: ReleaseManifest, artifact: Uint8Array): void {
  if (BigInt(artifact.length) !== manifest.size) throw new PermissionDeniedError(`release ${manifest.version}: the artifact has ${artifact.length} bytes, the signed manifest says ${manifest.size}`);
  const digest = digestOf(artifact);
  if (digest !== manifest.digest) throw new PermissionDeniedError(`release ${manifest.version}: the artifact hashes to ${digest}, the signed manifest says ${manifest.digest}`);
}
