import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { codeOf } from "../../common/rpc-errors.js";
import { checkReleaseArtifact, newReleaseKeyPair, parseReleaseKeys, signRelease, verifyRelease } from "../../common/release.js";
import { ReleaseManifestSchema, SignedReleaseSchema } from "../../gen/rexmesh/v1/release_pb.js";
import { createPrivateKey, sign } from "node:crypto";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll } from "vitest";
import { digestOf } from "../../common/digest.js";
import { NotFoundError } from "../../common/errors.js";
import { LmdbEnv } from "../../common/lmdb.js";
import { ReleaseStore } from "../../controller/releases.js";

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

describe("releases at the controller (ReleaseStore)", () => {
  const key = newReleaseKeyPair();
  const dir = mkdtempSync(join(tmpdir(), "rexmesh-releases-"));
  const env = new LmdbEnv({ path: dir, maxBytes: 1 << 24 });
  afterAll(() => env.close());
  const held = new Map<string, number>([[`acme\0${digestOf(artifact)}`, artifact.length]]);
  const sizes = {
    size: async (digest: string, tenant: string) => {
      const n = held.get(`${tenant}\0${digest}`);
      if (n === undefined) throw new NotFoundError(`no artifact ${digest}`);
      return n;
    },
  };
  const store = new ReleaseStore(env.db("releases"), sizes);
  const rejected = async (p: Promise<unknown>) => {
    try {
      await p;
    } catch (err) {
      return { code: codeOf(err), message: (err as Error).message };
    }
    throw new Error("not refused");
  };

  it("keeps a release whose artifact the tenant holds at the manifest's size; the same one again changes nothing", async () => {
    const signed = signRelease(artifact, "0.2.0", "linux-x64", key.privatePem, NOW);
    const first = await store.add("acme", "operator:acme/ann", signed, NOW);
    expect(first.created).toBe(true);
    expect([first.release.version, first.release.keyId, first.release.addedBy]).toEqual(["0.2.0", key.keyId, "operator:acme/ann"]);
    expect((await store.add("acme", "operator:acme/bob", signed, NOW + 1)).created).toBe(false);
    expect(store.get("acme", "0.2.0").map((r) => r.addedBy)).toEqual(["operator:acme/ann"]);
    expect(toBinary(SignedReleaseSchema, store.get("acme", "0.2.0")[0]!.signed!)).toEqual(toBinary(SignedReleaseSchema, signed));
  });

  it("never replaces a version, and refuses what does not match the artifact, an unsigned release, or another tenant's artifact", async () => {
    const resigned = signRelease(artifact, "0.2.0", "linux-x64", key.privatePem, NOW + 5);
    expect(await rejected(store.add("acme", "x", resigned, NOW))).toMatchObject({ code: Code.AlreadyExists, message: expect.stringMatching(/is not replaced \(rexmesh release remove it first\)/) });
    const other = Buffer.concat([artifact, Buffer.from("!")]);
    const wrongSize = signRelease(other, "0.3.0", "linux-x64", key.privatePem, NOW);
    held.set(`acme\0${digestOf(other)}`, artifact.length);
    expect(await rejected(store.add("acme", "x", wrongSize, NOW))).toMatchObject({ code: Code.FailedPrecondition, message: expect.stringMatching(/has \d+ bytes, the manifest says/) });
    const unsigned = create(SignedReleaseSchema, { manifest: signRelease(artifact, "0.4.0", "linux-x64", key.privatePem, NOW).manifest });
    expect((await rejected(store.add("acme", "x", unsigned, NOW))).code).toBe(Code.InvalidArgument);
    expect((await rejected(store.add("globex", "x", signRelease(artifact, "0.5.0", "linux-x64", key.privatePem, NOW), NOW))).code).toBe(Code.NotFound);
    expect(store.list("globex")).toEqual([]);
    expect(store.list("acme").map((r) => r.version)).toEqual(["0.2.0"]);
    const badKey = { ...signRelease(artifact, "0.6.0", "linux-x64", key.privatePem, NOW), keyId: "\u001b[31mred" };
    expect((await rejected(store.add("acme", "x", badKey, NOW))).message).toMatch(/16 lowercase hex/);
  });

  it("keeps one release per version and platform, and removes one or all of a version's", async () => {
    const arm = signRelease(artifact, "0.2.0", "linux-arm64", key.privatePem, NOW);
    expect((await store.add("acme", "x", arm, NOW + 10)).created).toBe(true);
    expect(store.get("acme", "0.2.0").map((r) => r.platform).sort()).toEqual(["linux-arm64", "linux-x64"]);
    expect(await store.remove("acme", "0.2.0", "linux-arm64")).toBe(1);
    expect(store.get("acme", "0.2.0").map((r) => r.platform)).toEqual(["linux-x64"]);
    // Removed, a version may be added again (re-signed).
    expect(await store.remove("acme", "0.2.0", "")).toBe(1);
    expect(await store.remove("acme", "0.2.0", "")).toBe(0);
    expect((await store.add("acme", "x", signRelease(artifact, "0.2.0", "linux-x64", key.privatePem, NOW + 20), NOW)).created).toBe(true);
  });
});
