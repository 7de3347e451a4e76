/**
 * Fetches artifacts for the executor through the host's proxies, chunk by
 * chunk (ArtifactCacheService.GetArtifactChunk over grpc-js, with the host's
 * own certificate), into a private file that is hashed as it is written. A
 * file is handed over only when it matches its digest.
 */
import { randomUUID } from "node:crypto";
import { mkdir, open, rm } from "node:fs/promises";
import { join } from "node:path";
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import type { Credentials } from "../certs/files.js";
import { clientTlsOptions } from "../certs/tls.js";
import { digestHex, DigestBuilder, DigestMismatchError } from "../common/digest.js";
import { RexmeshError } from "../common/errors.js";
import { ArtifactCacheService, GetArtifactChunkRequestSchema, type GetArtifactChunkResponse } from "../gen/rexmesh/v1/artifact_pb.js";

/**
 * Resolves to the path of a private file (0600, in a 0700 directory) whose
 * content has the digest; the caller owns the file and removes it. Rejects
 * with an error whose message names the digest.
 */
export type ArtifactFetcher = (digest: string, signal?: AbortSignal, maxBytes?: number) => Promise<string>;

/** Largest artifact fetched when the caller names no bound (the controller's repository takes no larger). */
const MAX_ARTIFACT_BYTES = 256 * 1024 * 1024;

/** An artifact could not be fetched (unknown, unreachable, refused by a hop). */
class ArtifactFetchError extends RexmeshError {}

const method = ArtifactCacheService.method.getArtifactChunk;
const PATH = `/${ArtifactCacheService.typeName}/${method.name}`;
/** grpc status codes after which another proxy would answer the same. */
/** Per chunk: the proxy may first have to fetch the whole artifact from the controller. */
const CHUNK_DEADLINE_MS = 5 * 60_000;
const FINAL_CODES = new Set([grpc.status.NOT_FOUND, grpc.status.INVALID_ARGUMENT, grpc.status.FAILED_PRECONDITION, grpc.status.PERMISSION_DENIED]);

export function proxyArtifactFetcher(opts: {
  proxies: readonly string[];
  /** Read at every fetch, so that a renewed certificate is used. */
  credentials: () => Credentials;
  /** Private working directory for fetched files. */
  dir: string;
}): ArtifactFetcher {
  return async (digest, signal, maxBytes = MAX_ARTIFACT_BYTES) => {
    digestHex(digest);
    await mkdir(opts.dir, { recursive: true, mode: 0o700 });
    const errors: string[] = [];
    for (const address of opts.proxies) {
      const path = join(opts.dir, `artifact-${randomUUID()}`);
      try {
        await fetchFrom(address, opts.credentials(), digest, path, signal, maxBytes);
        return path;
      } catch (err) {
        await rm(path, { force: true });
        if (err instanceof DigestMismatchError) throw err;
        const g = err as { code?: number; details?: string };
        const text = typeof g.details === "string" ? g.details : err instanceof Error ? err.message : String(err);
        if (typeof g.code === "number" && FINAL_CODES.has(g.code)) throw new ArtifactFetchError(`artifact ${digest}: ${text}`, { cause: err });
        errors.push(`${address}: ${text}`);
        if (signal?.aborted) break;
      }
    }
    throw new ArtifactFetchError(`artifact ${digest} could not be fetched: ${errors.join("; ")}`);
  };
}

async function fetchFrom(address: string, creds: Credentials, digest: string, path: string, signal: AbortSignal | undefined, maxBytes: number): Promise<void> {
  const tls = clientTlsOptions(creds, ["proxy"]);
  const credentials = grpc.credentials.createSsl(Buffer.from(creds.caPem), Buffer.from(creds.keyPem), Buffer.from(creds.certPem), { checkServerIdentity: tls.checkServerIdentity });
  const client = new grpc.Client(address, credentials, { "grpc.max_receive_message_length": 16 * 1024 * 1024 });
  const file = await open(path, "wx", 0o600);
  try {
    const hash = new DigestBuilder();
    let size = -1;
    while (size < 0 || hash.size < size) {
      signal?.throwIfAborted();
      let onAbort: (() => void) | undefined;
      const res = await new Promise<GetArtifactChunkResponse>((resolve, reject) => {
        const call = client.makeUnaryRequest(
          PATH,
          (m: unknown) => Buffer.from(toBinary(method.input, m as never)),
          (b: Buffer) => fromBinary(method.output, b),
          { $typeName: GetArtifactChunkRequestSchema.typeName, digest, offset: BigInt(hash.size) },
          { deadline: Date.now() + CHUNK_DEADLINE_MS },
          (err, r) => (err ? reject(err) : resolve(r!)),
        );
        onAbort = () => call.cancel();
        signal?.addEventListener("abort", onAbort, { once: true });
      }).finally(() => {
        if (onAbort) signal?.removeEventListener("abort", onAbort);
      });
      // A proxy cannot make the host write more than it expects: the size is bounded, and may not change on the way.
      if (size >= 0 && Number(res.size) !== size) throw new ArtifactFetchError(`artifact ${digest}: the proxy said ${size} bytes, then ${res.size}`);
      size = Number(res.size);
      if (size > maxBytes) throw new ArtifactFetchError(`artifact ${digest}: the proxy says ${size} bytes, more than the ${maxBytes} expected`);
      if (res.data.length === 0 && hash.size < size) throw new ArtifactFetchError(`artifact ${digest}: the proxy sent no data at offset ${hash.size} of ${size}`);
      if (hash.size + res.data.length > size) throw new ArtifactFetchError(`artifact ${digest}: the proxy sent more than its size`);
      hash.update(res.data);
      await file.write(res.data);
    }
    const actual = hash.digest();
    if (actual !== digest) throw new DigestMismatchError(digest, actual);
  } finally {
    await file.close();
    client.close();
  }
}
