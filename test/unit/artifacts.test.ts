import { chmodSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, realpathSync, statSync, symlinkSync, writeFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { create } from "@bufbuild/protobuf";
import { createContextValues, type HandlerContext } from "@connectrpc/connect";
import { grantKey } from "../../common/connect-server.js";
import { ArtifactStore, artifactServiceImpl } from "../../controller/artifacts.js";
import { InvalidArgumentError, NotFoundError, PermissionDeniedError } from "../../common/errors.js";
import { GetArtifactRequestSchema, PutArtifactRequestSchema } from "../../gen/rexmesh/v1/artifact_pb.js";
import { digestOf, DigestMismatchError, isDigest, verifyFile } from "../../common/digest.js";
import { silentLogger } from "../../common/logger.js";
import { relativePathProblem } from "../../common/put-path.js";
import { PathRefusedError, putFile, resolveTarget } from "../../daemon/file-put.js";
import { ArtifactCache } from "../../proxy/artifact-cache.js";

const temp = (p: string) => realpathSync(mkdtempSync(join(tmpdir(), `rexmesh-art-${p}-`)));
async function* once(...parts: string[]): AsyncGenerator<Uint8Array> {
  for (const p of parts) yield Buffer.from(p);
}

describe("digests", () => {
  it("accepts only sha256:<64 lowercase hex>", () => {
    expect(isDigest(digestOf(Buffer.from("x")))).toBe(true);
    for (const bad of ["", "sha256:", `sha256:${"A".repeat(64)}`, `sha1:${"a".repeat(40)}`, `sha256:${"a".repeat(63)}`, `sha256:${"a".repeat(64)}\n`]) expect(isDigest(bad), bad).toBe(false);
  });

  it("verifyFile refuses content that does not match, naming both digests", async () => {
    const dir = temp("digest");
    const f = join(dir, "f");
    writeFileSync(f, "hello");
    await verifyFile(f, digestOf(Buffer.from("hello")));
    const want = digestOf(Buffer.from("hellO"));
    const err = await verifyFile(f, want).catch((e) => e);
    expect(err).toBeInstanceOf(DigestMismatchError);
    expect(err.message).toContain(want);
    expect(err.message).toContain(digestOf(Buffer.from("hello")));
  });
});

describe("controller artifact store", () => {
  it("stores under sha256/<hex>, idempotently, and refuses content that does not match the expected digest", async () => {
    const dir = temp("store");
    const store = new ArtifactStore(dir);
    const d = digestOf(Buffer.from("abcdef"));
    expect(await store.put("acme", once("abc", "def"), d)).toEqual({ digest: d, size: 6, created: true });
    expect(readFileSync(join(dir, "sha256", d.slice(7)), "utf8")).toBe("abcdef");
    expect((await store.put("acme", once("abcdef"))).created).toBe(false);
    await expect(store.put("acme", once("abcdeX"), d)).rejects.toBeInstanceOf(DigestMismatchError);
    expect(readdirSync(join(dir, "sha256"))).toEqual([d.slice(7)]);
    expect(readdirSync(join(dir, "tmp"))).toEqual([]);
  });
});

describe("artifacts belong to tenants", () => {
  it("are held, sized and created per tenant, one blob on disk for all", async () => {
    const dir = temp("tenants");
    const store = new ArtifactStore(dir);
    const d = digestOf(Buffer.from("shared"));
    expect((await store.put("acme", once("shared"))).created).toBe(true);
    expect(store.has("acme", d)).toBe(true);
    expect(store.has("beta", d)).toBe(false);
    await expect(store.size(d, "beta")).rejects.toBeInstanceOf(NotFoundError);
    expect(await store.size(d, "acme")).toBe(6);
    // Beta storing the same bytes learns nothing of acme: for beta it is new.
    expect((await store.put("beta", once("shared"))).created).toBe(true);
    expect(readdirSync(join(dir, "sha256"))).toEqual([d.slice(7)]);
    // Proxies size any blob.
    expect(await store.size(d)).toBe(6);
    expect(store.has("../acme", d)).toBe(false);
  });
});

describe("proxy artifact cache", () => {
  it("takes an artifact carried beside a bundle in slices, in order, and caches it only when it hashes to its digest", async () => {
    let fetches = 0;
    const cache = new ArtifactCache({
      dir: temp("import"),
      log: silentLogger,
      fetch: async function* () {
        fetches++;
        yield new Uint8Array();
      },
    });
    const content = Buffer.alloc(2 * 1024 * 1024 + 5, 9);
    const d = digestOf(content);
    const MiB = 1024 * 1024;
    expect(await cache.importChunk(d, content.length, 0, content.subarray(0, MiB))).toEqual({ received: MiB, complete: false });
    // Out of order: refused, naming where to go on from.
    await expect(cache.importChunk(d, content.length, 2 * MiB, content.subarray(2 * MiB))).rejects.toThrow(`the proxy has ${MiB} bytes of it, the slice starts at ${2 * MiB}`);
    expect((await cache.importChunk(d, content.length, MiB, content.subarray(MiB, 2 * MiB))).complete).toBe(false);
    expect(await cache.importChunk(d, content.length, 2 * MiB, content.subarray(2 * MiB))).toEqual({ received: content.length, complete: true });
    // Served from the cache, never from upstream; importing it again is complete at once.
    expect((await cache.chunk(d, 0)).size).toBe(content.length);
    expect(fetches).toBe(0);
    expect((await cache.importChunk(d, content.length, 0, content.subarray(0, 10))).complete).toBe(true);
    // Bytes that do not hash to the digest never enter the cache.
    const other = digestOf(Buffer.from("another"));
    await expect(cache.importChunk(other, 7, 0, Buffer.from("anothex"))).rejects.toThrow(DigestMismatchError);
    await expect(cache.importChunk("sha256:zz", 7, 0, Buffer.from("another"))).rejects.toThrow(InvalidArgumentError);
    await expect(cache.importChunk(other, 7, 0, Buffer.alloc(MiB + 1))).rejects.toThrow(InvalidArgumentError);
    await expect(cache.importChunk(other, 5, 3, Buffer.from("abc"))).rejects.toThrow(/runs past/);
    await expect(cache.importChunk(other, 300 * MiB, 0, Buffer.from("a"))).rejects.toThrow(/1 to \d+ bytes/);
  });

  it("coalesces concurrent misses into one upstream fetch and serves later requests from disk", async () => {
    const dir = temp("cache");
    const content = Buffer.alloc(3 * 1024 * 1024 + 17, 7);
    const d = digestOf(content);
    let fetches = 0;
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const cache = new ArtifactCache({
      dir,
      log: silentLogger,
      fetch: async function* () {
        fetches++;
        await gate;
        yield content.subarray(0, 1000);
        yield content.subarray(1000);
      },
    });
    const waiting = Array.from({ length: 20 }, () => cache.chunk(d, 0));
    release();
    const first = await Promise.all(waiting);
    expect(fetches).toBe(1);
    for (const c of first) expect(c.size).toBe(content.length);
    // Read it whole, chunk by chunk.
    const parts: Uint8Array[] = [];
    for (let off = 0; off < content.length; ) {
      const c = await cache.chunk(d, off);
      parts.push(c.data);
      off += c.data.length;
    }
    expect(Buffer.concat(parts).equals(content)).toBe(true);
    expect(fetches).toBe(1);
    expect(readdirSync(join(dir, "sha256"))).toEqual([d.slice(7)]);
  });

  it("refuses corrupted upstream content and never caches it", async () => {
    const dir = temp("cache-bad");
    const d = digestOf(Buffer.from("good"));
    let fetches = 0;
    const cache = new ArtifactCache({ dir, log: silentLogger, fetch: () => (fetches++, once("evil")) });
    await expect(cache.chunk(d, 0)).rejects.toThrow(d);
    await expect(cache.chunk(d, 0)).rejects.toBeInstanceOf(DigestMismatchError);
    expect(fetches).toBe(2);
    expect(existsSync(join(dir, "sha256", d.slice(7)))).toBe(false);
  });

  it("replaces a corrupted copy found on disk by fetching again", async () => {
    const dir = temp("cache-disk");
    const d = digestOf(Buffer.from("good"));
    mkdirSync(join(dir, "sha256"), { recursive: true });
    writeFileSync(join(dir, "sha256", d.slice(7)), "rotten");
    let fetches = 0;
    const cache = new ArtifactCache({ dir, log: silentLogger, fetch: () => (fetches++, once("good")) });
    expect(Buffer.from((await cache.chunk(d, 0)).data).toString()).toBe("good");
    expect(fetches).toBe(1);
  });
});

describe("file.put path safety", () => {
  it("refuses absolute paths, .. segments and empty names by syntax", () => {
    for (const bad of ["/etc/passwd", "../x", "a/../../x", "a/..", "", "a/", ".", "a\0b"]) expect(relativePathProblem(bad), bad).toBeDefined();
    for (const ok of ["a", "a/b.conf", "./a", "a..b", "..a"]) expect(relativePathProblem(ok), ok).toBeUndefined();
  });

  it("refuses a symlink that leads out of base_dir", async () => {
    const base = temp("put-base");
    const outside = temp("put-outside");
    symlinkSync(outside, join(base, "escape"));
    const src = join(temp("put-src"), "s");
    writeFileSync(src, "data");
    await expect(resolveTarget(base, "escape/x")).rejects.toBeInstanceOf(PathRefusedError);
    await expect(putFile(src, base, "escape/x", 0o644)).rejects.toThrow(/outside/);
    expect(readdirSync(outside)).toEqual([]);
    await expect(putFile(src, base, "../x", 0o644)).rejects.toBeInstanceOf(PathRefusedError);
    await expect(putFile(src, base, "/tmp/x", 0o644)).rejects.toBeInstanceOf(PathRefusedError);
  });

  it("follows a symlink that stays inside base_dir, and replaces a symlink at the target instead of writing through it", async () => {
    const base = temp("put-in");
    const outside = temp("put-out2");
    mkdirSync(join(base, "real"));
    symlinkSync(join(base, "real"), join(base, "link"));
    const victim = join(outside, "victim");
    writeFileSync(victim, "untouched");
    symlinkSync(victim, join(base, "real", "target"));
    const src = join(temp("put-src2"), "s");
    writeFileSync(src, "new content");
    const written = await putFile(src, base, "link/target", 0o640);
    expect(written).toBe(join(base, "real", "target"));
    expect(readFileSync(join(base, "real", "target"), "utf8")).toBe("new content");
    expect(statSync(join(base, "real", "target")).mode & 0o777).toBe(0o640);
    expect(readFileSync(victim, "utf8")).toBe("untouched");
    expect(readdirSync(join(base, "real"))).toEqual(["target"]);
  });

  it("applies the mode exactly (not masked by umask)", async () => {
    const base = temp("put-mode");
    const src = join(temp("put-src3"), "s");
    writeFileSync(src, "#!/bin/sh\n");
    chmodSync(src, 0o600);
    await putFile(src, base, "run.sh", 0o755);
    expect(statSync(join(base, "run.sh")).mode & 0o777).toBe(0o755);
  });
});

describe("ArtifactService handlers", () => {
  const peer = (role: "operator" | "proxy" | "host") => ({ role, scope: role === "proxy" ? "dc1" : "default", id: `${role}-1` });
  // The boundary (common/connect-server.ts) has admitted the caller: its grant is in the context.
  const impl = (dir = temp("svc")) => artifactServiceImpl({ store: new ArtifactStore(dir), log: silentLogger });
  const ctx = (role: "operator" | "proxy" | "host" | undefined) =>
    ({ values: createContextValues().set(grantKey, role && { peer: peer(role), action: "artifact", by: "test" }) }) as HandlerContext;
  const reqs = (digest: string, ...parts: string[]) =>
    (async function* () {
      let first = true;
      for (const p of parts) {
        yield create(PutArtifactRequestSchema, { digest: first ? digest : "", data: Buffer.from(p) });
        first = false;
      }
    })();
  const drain = async (it: AsyncIterable<{ data?: Uint8Array }>) => {
    const out: Uint8Array[] = [];
    for await (const r of it) out.push(r.data ?? new Uint8Array());
    return Buffer.concat(out).toString();
  };

  it("puts into the operator's tenant and gets from it; proxies get any; nothing without a grant", async () => {
    const svc = impl(temp("svc-roles"));
    const d = digestOf(Buffer.from("abc"));
    const put = await svc.putArtifact!(reqs(d, "a", "bc"), ctx("operator"));
    expect(put.digest).toBe(d);
    expect(await drain(svc.getArtifact!(create(GetArtifactRequestSchema, { digest: d }), ctx("operator")))).toBe("abc");
    expect(await drain(svc.getArtifact!(create(GetArtifactRequestSchema, { digest: d }), ctx("proxy")))).toBe("abc");
    await expect(svc.putArtifact!(reqs(d, "abc"), ctx(undefined))).rejects.toBeInstanceOf(PermissionDeniedError);
    await expect(drain(svc.getArtifact!(create(GetArtifactRequestSchema, { digest: d }), ctx(undefined)))).rejects.toBeInstanceOf(PermissionDeniedError);
  });

  it("refuses a put whose content does not match the digest sent with it, and names unknown or malformed digests", async () => {
    const svc = impl(temp("svc-bad"));
    const d = digestOf(Buffer.from("abc"));
    await expect(svc.putArtifact!(reqs(d, "abX"), ctx("operator"))).rejects.toBeInstanceOf(DigestMismatchError);
    await expect(drain(svc.getArtifact!(create(GetArtifactRequestSchema, { digest: d }), ctx("proxy")))).rejects.toBeInstanceOf(NotFoundError);
    await expect(drain(svc.getArtifact!(create(GetArtifactRequestSchema, { digest: "sha256:../../etc" }), ctx("proxy")))).rejects.toBeInstanceOf(InvalidArgumentError);
  });
});
