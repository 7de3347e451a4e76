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
import { digestHex, DigestBuilder, DigestMismatchError, isDigest, verifyFile } from "../common/digest.js";
import { FailedPreconditionError, InvalidArgumentError } from "../common/errors.js";
import type { Logger } from "../common/logger.js";

/** Streams an artifact's content from upstream (the controller). */
export type UpstreamFetch = (digest: string) => AsyncIterable<Uint8Array>;

/** Largest slice served per GetArtifactChunk. */
const CACHE_CHUNK_BYTES = 1024 * 1024;
/** Largest artifact a bundle may carry (the controller's repository takes no larger). */
const MAX_IMPORT_BYTES = 256 * 1024 * 1024;

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

  /**
   * Takes one slice of an artifact carried beside a tasks bundle (a site
   * with no link to the controller). Slices come in order into a file of
   * their own; the last one puts the artifact into the cache if its
   * content matches its digest (otherwise it is dropped, DATA_LOSS-like:
   * DigestMismatchError). A slice out of order is refused naming the
   * offset expected, so the sender can start over; an artifact already
   * cached is complete at once.
   */
  async importChunk(digest: string, size: number, offset: number, data: Uint8Array): Promise<{ received: number; complete: boolean }> {
    if (!isDigest(digest)) throw new InvalidArgumentError(`artifact ${JSON.stringify(digest.slice(0, 80))} is not sha256:<64 hex digits>`);
    if (!Number.isSafeInteger(size) || size <= 0 || size > MAX_IMPORT_BYTES) throw new InvalidArgumentError(`an imported artifact has 1 to ${MAX_IMPORT_BYTES} bytes, not ${size}`);
    if (data.length > CACHE_CHUNK_BYTES) throw new InvalidArgumentError(`a slice has at most ${CACHE_CHUNK_BYTES} bytes`);
    if (offset + data.length > size) throw new InvalidArgumentError(`a slice at ${offset} of ${data.length} bytes runs past the artifact's ${size}`);
    const final = join(this.blobs, digestHex(digest));
    if (offset === 0 && (await this.present(final)) && (await verifyFile(final, digest).then(() => true, () => false))) {
      this.verified.add(digest);
      return { received: size, complete: true };
    }
    await mkdir(this.blobs, { recursive: true, mode: 0o700 });
    await mkdir(this.tmp, { recursive: true, mode: 0o700 });
    const partial = join(this.tmp, `import-${digestHex(digest)}-${size}`);
    if (offset === 0) await rm(partial, { force: true });
    const have = await stat(partial).then((s) => s.size, () => 0);
    if (offset !== have) throw new FailedPreconditionError(`artifact ${digest}: the proxy has ${have} bytes of it, the slice starts at ${offset}; send from ${have} (or from 0)`);
    const file = await open(partial, offset === 0 ? "wx" : "a", 0o600);
    try {
      await file.write(data);
      if (offset + data.length < size) return { received: offset + data.length, complete: false };
      await file.sync();
    } finally {
      await file.close();
    }
    try {
      await verifyFile(partial, digest);
    } catch (err) {
      await rm(partial, { force: true });
      this.opts.log.warn("imported artifact refused", { digest, err });
      throw err;
    }
    await rename(partial, final);
    this.verified.add(digest);
    this.opts.log.info("artifact imported into the cache", { digest, size });
    return { received: size, complete: true };
  }

  private present(path: string): Promise<boolean> {
    return stat(path).then(
      () => true,
      () => false,
    );
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
