import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { codeOf } from "../../common/rpc-errors.js";
import { checkReleaseArtifact, newReleaseKeyPair, parseReleaseKeys, signRelease, verifyRelease } from "../../common/release.js";
import { ReleaseManifestSchema, SignedReleaseSchema } from "../../gen/rexmesh/v1/release_pb.js";
import { createPrivateKey, sign } from "node:crypto";

/** Daemon releases signed by a release key (common/release.ts): what a host accepts, and what it refuses. */

const artifact = Buffer.from("the daemon's files, as a .tar.gz would hold them");
const NOW = Date.UTC(2026, 11, 5);

function refused(fn: () => unknown): { code: Code; message: string } {
  try {
    fn();
  } catch (err) {
    return { code: codeOf(err), message: (err as Error).message };
  }
  throw new Error("not refused");
}

describe("release manifests", () => {
  const key = newReleaseKeyPair();
  const trusted = parseReleaseKeys(key.publicPem);

  it("a release signed by a trusted key, with its artifact exactly as named, is accepted", () => {
    const signed = signRelease(artifact, "0.2.0", "linux-x64", key.privatePem, NOW);
    const m = verifyRelease(signed, trusted);
    expect([m.version, m.platform, Number(m.size)]).toEqual(["0.2.0", "linux-x64", artifact.length]);
    expect(m.digest).toMatch(/^sha256:[0-9a-f]{64}$/);
    expect(() => checkReleaseArtifact(m, artifact)).not.toThrow();
  });

  it("refuses a release signed by a key the daemon does not trust, naming the key", () => {
    const other = newReleaseKeyPair();
    const r = refused(() => verifyRelease(signRelease(artifact, "0.2.0", "linux-x64", other.privatePem, NOW), trusted));
    expect(r.code).toBe(Code.PermissionDenied);
    expect(r.message).toContain(other.keyId);
  });

  it("refuses a manifest altered after signing (another version, another digest), and a signature moved onto it", () => {
    const signed = signRelease(artifact, "0.2.0", "linux-x64", key.privatePem, NOW);
    const m = fromBinary(ReleaseManifestSchema, signed.manifest);
    for (const change of [{ version: "9.9.9" }, { digest: `sha256:${"0".repeat(64)}` }, { size: 1n }]) {
      const altered = create(SignedReleaseSchema, { ...signed, manifest: toBinary(ReleaseManifestSchema, { ...m, ...change }) });
      expect(refused(() => verifyRelease(altered, trusted)).message).toMatch(/signature does not hold/);
    }
  });

  it("refuses an artifact that is not the one the manifest names: other bytes, or a byte more", () => {
    const m = verifyRelease(signRelease(artifact, "0.2.0", "linux-x64", key.privatePem, NOW), trusted);
    const tampered = Buffer.from(artifact);
    tampered[3] = tampered[3]! ^ 1;
    expect(refused(() => checkReleaseArtifact(m, tampered))).toMatchObject({ code: Code.PermissionDenied, message: expect.stringMatching(/hashes to sha256:.*the signed manifest says/) });
    expect(refused(() => checkReleaseArtifact(m, Buffer.concat([artifact, Buffer.from("x")]))).message).toMatch(/has \d+ bytes, the signed manifest says/);
  });

  it("a signature by the release key over the manifest without the release prefix (as another kind would sign it) does not verify", () => {
    const signed = signRelease(artifact, "0.2.0", "linux-x64", key.privatePem, NOW);
    const bare = create(SignedReleaseSchema, { ...signed, signature: sign(null, signed.manifest, createPrivateKey(key.privatePem)) });
    expect(refused(() => verifyRelease(bare, trusted)).message).toMatch(/signature does not hold/);
  });

  it("refuses a bad version, platform or key file when signing or reading keys", () => {
    expect(refused(() => signRelease(artifact, "1.0 beta", "linux-x64", key.privatePem, NOW)).code).toBe(Code.InvalidArgument);
    expect(refused(() => signRelease(artifact, "1.0.0", "linux", key.privatePem, NOW)).code).toBe(Code.InvalidArgument);
    expect(refused(() => signRelease(new Uint8Array(), "1.0.0", "linux-x64", key.privatePem, NOW)).code).toBe(Code.InvalidArgument);
    expect(refused(() => parseReleaseKeys("not a key")).message).toMatch(/no release public key/);
  });
});
