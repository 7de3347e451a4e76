/**
 * The proxy's disk cache of artifacts, `<proxy data>/artifacts/sha256/<hex>`,
 * so that a datacenter downloads each artifact from the controller once.
 * A miss fetches from the controller; concurrent requests for one digest
 * share that one fetch. Fetched content is hashed as it arrives and renamed
 * into the cache only when it matches its digest: a corrupted artifact is
 * refused and never cached. A blob found on disk (e.g. after a restart) is
 * verified once before it is first served; daemons verify again before use.
 */
import { rmSync } from "node:fs";
import { mkdir, open, rename, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { digestHex, DigestBuilder, DigestMismatchError, verifyFile } from "../common/digest.js";
import type { Logger } from "../common/logger.js";

/** Streams an artifact's content from upstream (the controller). */
export type UpstreamFetch = (digest: string) => AsyncIterable<Uint8Array>;

/** Largest slice served per GetArtifactChunk. */
const CACHE_CHUNK_BYTES = 1024 * 1024;

export class ArtifactCache {
  private readonly blobs: string;
  private readonly tmp: string;
  private readonly inflight = new Map<string, Promise<string>>();
  private readonly verified = new Set<string>();
  private seq = 0;
  /** Fetches from upstream started by this cache (misses), for metrics and tests. */
  upstreamFetches = 0;

  constructor(
    private readonly opts: { dir: string; fetch: UpstreamFetch; log: Logger },
  ) {
    this.blobs = join(opts.dir, "sha256");
    this.tmp = join(opts.dir, "tmp");
    // Leftovers of writes cut short by a crash; nothing else is ever in there.
    rmSync(this.tmp, { recursive: true, force: true });
  }

  /** The path of a verified cached copy, fetching it first on a miss. */
  async path(digest: string): Promise<string> {
    const final = join(this.blobs, digestHex(digest));
    if (this.verified.has(digest)) {
      const present = await stat(final).then(
        () => true,
        () => false,
      );
      if (present) return final;
      this.verified.delete(digest);
    }
    let p = this.inflight.get(digest);
    if (!p) {
      p = this.ensure(digest, final).finally(() => this.inflight.delete(digest));
      this.inflight.set(digest, p);
    }
    return p;
  }

  /** A slice of an artifact: its whole size and up to CACHE_CHUNK_BYTES from offset. */
  async chunk(digest: string, offset: number): Promise<{ size: number; data: Uint8Array }> {
    const path = await this.path(digest);
    const file = await open(path, "r");
    try {
      const size = (await file.stat()).size;
      if (offset >= size) return { size, data: new Uint8Array() };
      const buf = Buffer.allocUnsafe(Math.min(CACHE_CHUNK_BYTES, size - offset));
      const { bytesRead } = await file.read(buf, 0, buf.length, offset);
      return { size, data: buf.subarray(0, bytesRead) };
    } finally {
      await file.close();
    }
  }

  private async ensure(digest: string, final: string): Promise<string> {
    const present = await stat(final).then(
      () => true,
      () => false,
    );
    if (present) {
      try {
        await verifyFile(final, digest);
        this.verified.add(digest);
        return final;
      } catch (err) {
        this.opts.log.warn("cached artifact is corrupted; fetching it again", { digest, err });
        await rm(final, { force: true });
      }
    }
    await this.fill(digest, final);
    this.verified.add(digest);
    return final;
  }

  private async fill(digest: string, final: string): Promise<void> {
    await mkdir(this.blobs, { recursive: true, mode: 0o700 });
    await mkdir(this.tmp, { recursive: true, mode: 0o700 });
    const tmpPath = join(this.tmp, `${process.pid}-${++this.seq}`);
    const file = await open(tmpPath, "wx", 0o600);
    const hash = new DigestBuilder();
    let kept = false;
    this.upstreamFetches++;
    this.opts.log.info("fetching artifact from the controller", { digest, fetches: this.upstreamFetches });
    try {
      for await (const data of this.opts.fetch(digest)) {
        hash.update(data);
        await file.write(data);
      }
      await file.sync();
      await file.close();
      const actual = hash.digest();
      if (actual !== digest) {
        const err = new DigestMismatchError(digest, actual);
        this.opts.log.warn("artifact from the controller refused", { digest, actual });
        throw err;
      }
      await rename(tmpPath, final);
      kept = true;
      this.opts.log.info("artifact cached", { digest, size: hash.size });
    } finally {
      await file.close().catch(() => undefined);
      if (!kept) await rm(tmpPath, { force: true });
    }
  }
}
