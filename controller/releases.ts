/**
 * Daemon releases held by the controller (docs/updates.md): per tenant, by
 * version, the signed release as its maker gave it, whose artifact the
 * tenant holds in the artifact repository. The controller does not hold the
 * release keys and does not check the signature (the daemons do); it checks
 * that the manifest is well formed and names an artifact of exactly that
 * size and digest, so that `rexmesh update --to V` never sends a release
 * whose bytes are not here. There is one release per version and platform:
 * it is never replaced, only removed (a version signed by mistake).
 */
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { Database } from "lmdb";
import { AlreadyExistsError, FailedPreconditionError, InvalidArgumentError } from "../common/errors.js";
import { checkManifest } from "../common/release.js";
import { ReleaseSchema, type Release } from "../gen/rexmesh/v1/controller_pb.js";
import { ReleaseManifestSchema, SignedReleaseSchema, type ReleaseManifest, type SignedRelease } from "../gen/rexmesh/v1/release_pb.js";

interface StoredRelease {
  signed: Uint8Array;
  addedBy: string;
  addedAt: number;
}

/** Releases a tenant may hold at most. */
const MAX_RELEASES_PER_TENANT = 1000;
/** Bytes of a signed release at most (a manifest of a handful of short fields, a signature, a key id). */
const MAX_SIGNED_BYTES = 2048;

export interface ArtifactSizes {
  /** The size of a blob the tenant holds; rejects NOT_FOUND when it does not. */
  size(digest: string, tenant: string): Promise<number>;
}

/** The manifest inside a signed release, checked for form only; INVALID_ARGUMENT otherwise. */
export function manifestOf(signed: SignedRelease): ReleaseManifest {
  if (toBinary(SignedReleaseSchema, signed).length > MAX_SIGNED_BYTES) throw new InvalidArgumentError(`a signed release has at most ${MAX_SIGNED_BYTES} bytes`);
  if (signed.signature.length === 0 || signed.keyId === "") throw new InvalidArgumentError("the release is not signed (no signature or key id): sign it with rexmesh release sign");
  if (!/^[0-9a-f]{16}$/.test(signed.keyId)) throw new InvalidArgumentError("a release key id is 16 lowercase hex digits (rexmesh release sign writes it)");
  let manifest: ReleaseManifest;
  try {
    manifest = fromBinary(ReleaseManifestSchema, signed.manifest);
  } catch {
    throw new InvalidArgumentError("the release manifest does not decode");
  }
  checkManifest(manifest);
  return manifest;
}

export class ReleaseStore {
  constructor(
    /** [tenant, version, platform] → the release. */
    private readonly db: Database<StoredRelease, string[]>,
    private readonly artifacts: ArtifactSizes,
  ) {}

  /** Adds a release of `tenant`; `created` false when the very same signed release is there already. */
  async add(tenant: string, addedBy: string, signed: SignedRelease, nowMs: number): Promise<{ release: Release; created: boolean }> {
    const manifest = manifestOf(signed);
    const bytes = toBinary(SignedReleaseSchema, signed);
    const key = [tenant, manifest.version, manifest.platform];
    const existing = this.db.get(key);
    if (existing) {
      if (Buffer.compare(Buffer.from(existing.signed), Buffer.from(bytes)) === 0) return { release: toRelease(existing), created: false };
      throw new AlreadyExistsError(`release ${manifest.version} for ${manifest.platform} exists with another manifest or signature; it is not replaced (rexmesh release remove it first)`);
    }
    const size = await this.artifacts.size(manifest.digest, tenant);
    if (BigInt(size) !== manifest.size) throw new FailedPreconditionError(`the artifact ${manifest.digest} has ${size} bytes, the manifest says ${manifest.size}`);
    if (this.count(tenant) >= MAX_RELEASES_PER_TENANT) throw new FailedPreconditionError(`a tenant holds at most ${MAX_RELEASES_PER_TENANT} releases`);
    const stored: StoredRelease = { signed: bytes, addedBy, addedAt: nowMs };
    await this.db.put(key, stored);
    return { release: toRelease(stored), created: true };
  }

  /** The version's release for each platform (one per platform). */
  get(tenant: string, version: string): Release[] {
    return [...this.db.getRange({ start: [tenant, version, ""], end: [tenant, version, "\uffff"] })].map(({ value }) => toRelease(value));
  }

  /** The tenant's releases, newest added first. */
  list(tenant: string): Release[] {
    const out: StoredRelease[] = [];
    for (const { value } of this.db.getRange({ start: [tenant, ""], end: [tenant, "\uffff"] })) out.push(value);
    return out.sort((a, b) => b.addedAt - a.addedAt).map(toRelease);
  }

  /** Removes the version's release for `platform` (every platform when empty); how many were removed. */
  async remove(tenant: string, version: string, platform: string): Promise<number> {
    const gone = this.get(tenant, version).filter((r) => platform === "" || r.platform === platform);
    for (const r of gone) await this.db.remove([tenant, r.version, r.platform]);
    return gone.length;
  }

  private count(tenant: string): number {
    return this.db.getKeysCount({ start: [tenant, ""], end: [tenant, "\uffff"] });
  }
}

function toRelease(stored: StoredRelease): Release {
  const signed = fromBinary(SignedReleaseSchema, stored.signed);
  const m = fromBinary(ReleaseManifestSchema, signed.manifest);
  return create(ReleaseSchema, {
    version: m.version,
    platform: m.platform,
    size: m.size,
    digest: m.digest,
    keyId: signed.keyId,
    signed,
    addedBy: stored.addedBy,
    addedAt: timestampFromMs(stored.addedAt),
  });
}
