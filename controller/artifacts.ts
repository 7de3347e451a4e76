/**
 * The controller's artifact repository: content-addressed blobs on disk
 * under `<data>/artifacts/sha256/<hex>`. Content is written to a temporary
 * file, hashed as it arrives, synced, checked against the digest the caller
 * expected and only then renamed into place, so a stored blob is always
 * whole and always matches its name.
 *
 * Artifacts belong to tenants: a blob is stored once, and each tenant that
 * put it holds a marker `<data>/artifacts/tenants/<tenant>/<hex>`. An
 * operator reads, and runs, only what its own tenant put; to any other
 * tenant the artifact does not exist (even `created` says nothing of other
 * tenants). Proxies fetch by digest for every tenant of their region.
 */
import { createReadStream, existsSync, rmSync } from "node:fs";
import { mkdir, open, rename, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import type { ServiceImpl } from "@connectrpc/connect";
import { create } from "@bufbuild/protobuf";
import { checkSegment, formatIdentity } from "../certs/identity.js";
import { grantedPeer } from "../common/connect-server.js";
import { digestHex, DigestBuilder, DigestMismatchError } from "../common/digest.js";
import { InvalidArgumentError, NotFoundError, ResourceExhaustedError } from "../common/errors.js";
import type { Logger } from "../common/logger.js";
import { storageError } from "../common/lmdb.js";
import {
  ArtifactService,
  GetArtifactResponseSchema,
  PutArtifactResponseSchema,
  type GetArtifactResponse,
  type PutArtifactRequest,
} from "../gen/rexmesh/v1/artifact_pb.js";

/** Largest artifact accepted. */
const MAX_ARTIFACT_BYTES = 256 * 1024 * 1024;
/** Size of the chunks GetArtifact streams. */
const ARTIFACT_CHUNK_BYTES = 1024 * 1024;

export interface PutResult {
  digest: string;
  size: number;
  created: boolean;
}

export class ArtifactStore {
  private readonly blobs: string;
  private readonly tenants: string;
  private readonly tmp: string;
  private seq = 0;

  constructor(
    dir: string,
    private readonly maxBytes = MAX_ARTIFACT_BYTES,
  ) {
    this.blobs = join(dir, "sha256");
    this.tenants = join(dir, "tenants");
    this.tmp = join(dir, "tmp");
    // Leftovers of writes cut short by a crash; nothing else is ever in there.
    rmSync(this.tmp, { recursive: true, force: true });
  }

  /** Where a blob lives; throws InvalidArgumentError for a malformed digest. */
  pathOf(digest: string): string {
    return join(this.blobs, digestHex(digest));
  }

  /** The marker of a tenant's artifact; throws InvalidArgumentError for a malformed digest. */
  private markerOf(tenant: string, digest: string): string {
    return join(this.tenants, checkSegment("tenant", tenant), digestHex(digest));
  }

  /** Whether a tenant holds an artifact (put it). */
  has(tenant: string, digest: string): boolean {
    try {
      return existsSync(this.markerOf(tenant, digest));
    } catch {
      return false;
    }
  }

  /**
   * Stores content arriving in chunks for a tenant. With `expected`,
   * content that hashes to anything else is refused (DigestMismatchError)
   * and nothing is kept. `created` is false when the tenant held it already.
   */
  async put(tenant: string, chunks: AsyncIterable<Uint8Array>, expected?: string): Promise<PutResult> {
    const r = await this.putBlob(chunks, expected);
    const marker = this.markerOf(tenant, r.digest);
    const held = existsSync(marker);
    if (!held) {
      try {
        await mkdir(join(this.tenants, tenant), { recursive: true, mode: 0o700 });
        const file = await open(marker, "w", 0o600);
        await file.sync().finally(() => file.close());
      } catch (err) {
        throw storageError(err);
      }
    }
    return { ...r, created: !held };
  }

  private async putBlob(chunks: AsyncIterable<Uint8Array>, expected?: string): Promise<PutResult> {
    if (expected !== undefined) digestHex(expected);
    await mkdir(this.blobs, { recursive: true, mode: 0o700 });
    await mkdir(this.tmp, { recursive: true, mode: 0o700 });
    const tmpPath = join(this.tmp, `${process.pid}-${++this.seq}`);
    const file = await open(tmpPath, "wx", 0o600);
    const hash = new DigestBuilder();
    let renamed = false;
    try {
      for await (const chunk of chunks) {
        if (hash.size + chunk.length > this.maxBytes) throw new ResourceExhaustedError(`an artifact may hold at most ${this.maxBytes} bytes`);
        hash.update(chunk);
        await file.write(chunk);
      }
      await file.sync();
      await file.close();
      const digest = hash.digest();
      if (expected !== undefined && expected !== digest) throw new DigestMismatchError(expected, digest);
      const final = this.pathOf(digest);
      const existed = await stat(final).then(
        () => true,
        () => false,
      );
      await rename(tmpPath, final);
      renamed = true;
      return { digest, size: hash.size, created: !existed };
    } catch (err) {
      throw storageError(err);
    } finally {
      await file.close().catch(() => undefined);
      if (!renamed) await rm(tmpPath, { force: true });
    }
  }

  /** The size of a stored blob; NotFoundError when there is none, or `tenant` does not hold it. */
  async size(digest: string, tenant?: string): Promise<number> {
    if (tenant !== undefined && !this.has(tenant, digest)) {
      digestHex(digest);
      throw new NotFoundError(`no artifact ${digest}`);
    }
    try {
      return (await stat(this.pathOf(digest))).size;
    } catch (err) {
      if ((err as { code?: string }).code === "ENOENT") throw new NotFoundError(`no artifact ${digest}`);
      throw err;
    }
  }

  /** The stored bytes in chunks, as they are on disk: the reader verifies them. */
  async *read(digest: string, chunkBytes = ARTIFACT_CHUNK_BYTES): AsyncGenerator<Uint8Array> {
    const stream = createReadStream(this.pathOf(digest), { highWaterMark: chunkBytes });
    for await (const chunk of stream) yield chunk as Buffer;
  }
}

/**
 * ArtifactService for the controller's router. The boundary admitted the
 * caller: an operator with `artifact.write` puts into its tenant, one with
 * `artifact.read` gets from it; a proxy gets any artifact, for the hosts of
 * every tenant in its region. Each blob served is logged ("artifact
 * served"), so that a download per datacenter can be counted.
 */
export function artifactServiceImpl(deps: { store: ArtifactStore; log: Logger }): ServiceImpl<typeof ArtifactService> {
  const { store, log } = deps;
  return {
    async putArtifact(requests: AsyncIterable<PutArtifactRequest>, ctx) {
      const caller = grantedPeer(ctx);
      let expected: string | undefined;
      let first = true;
      async function* chunks() {
        for await (const req of requests) {
          if (first && req.digest !== "") expected = req.digest;
          else if (!first && req.digest !== "" && req.digest !== expected) throw new InvalidArgumentError("the digest may be given on the first message only");
          first = false;
          yield req.data;
        }
      }
      // The expected digest arrives with the first message; peek at it before storing.
      const it = chunks()[Symbol.asyncIterator]();
      const head = await it.next();
      const rest: AsyncIterable<Uint8Array> = {
        async *[Symbol.asyncIterator]() {
          if (!head.done) yield head.value;
          for (let n = await it.next(); !n.done; n = await it.next()) yield n.value;
        },
      };
      const r = await store.put(caller.scope, rest, expected);
      log.info("artifact stored", { digest: r.digest, size: r.size, created: r.created, by: formatIdentity(caller) });
      return create(PutArtifactResponseSchema, { digest: r.digest, size: BigInt(r.size), created: r.created });
    },
    async *getArtifact(req, ctx): AsyncGenerator<GetArtifactResponse> {
      const caller = grantedPeer(ctx);
      const size = await store.size(req.digest, caller.role === "operator" ? caller.scope : undefined);
      log.info("artifact served", { digest: req.digest, size, to: formatIdentity(caller) });
      let firstChunk = true;
      for await (const data of store.read(req.digest)) {
        yield create(GetArtifactResponseSchema, { size: firstChunk ? BigInt(size) : 0n, data });
        firstChunk = false;
      }
      if (firstChunk) yield create(GetArtifactResponseSchema, { size: 0n });
    },
  };
}
