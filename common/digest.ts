/**
 * Content digests of artifacts: "sha256:<64 lowercase hex>". Every hop that
 * holds an artifact (controller, proxy cache, daemon) checks the bytes
 * against the digest before it keeps or uses them.
 */
import { createHash, type Hash } from "node:crypto";
import { createReadStream } from "node:fs";
import { FailedPreconditionError, InvalidArgumentError } from "./errors.js";

const DIGEST_RE = /^sha256:([0-9a-f]{64})$/;

/** True when s is a well-formed digest. */
export function isDigest(s: string): boolean {
  return DIGEST_RE.test(s);
}

/** The hex part of a digest; throws InvalidArgumentError when it is malformed. */
export function digestHex(digest: string): string {
  const m = DIGEST_RE.exec(digest);
  if (!m) throw new InvalidArgumentError(`artifact digest ${JSON.stringify(digest.slice(0, 80))} is not of the form sha256:<64 lowercase hex digits>`);
  return m[1]!;
}

/** Content that does not hash to the digest it was asked for. FAILED_PRECONDITION on the wire, so the message (naming both digests) reaches the caller. */
export class DigestMismatchError extends FailedPreconditionError {
  constructor(
    readonly expected: string,
    readonly actual: string,
  ) {
    super(`artifact ${expected} refused: its content hashes to ${actual} (corrupted or tampered with)`);
  }
}

/** A running SHA-256 that ends in a digest string. */
export class DigestBuilder {
  private readonly hash: Hash = createHash("sha256");
  size = 0;

  update(data: Uint8Array): void {
    this.hash.update(data);
    this.size += data.length;
  }

  digest(): string {
    return `sha256:${this.hash.digest("hex")}`;
  }
}

export function digestOf(data: Uint8Array): string {
  const b = new DigestBuilder();
  b.update(data);
  return b.digest();
}

/** The digest of a file's content. */
export async function digestOfFile(path: string): Promise<string> {
  const b = new DigestBuilder();
  for await (const chunk of createReadStream(path)) b.update(chunk as Buffer);
  return b.digest();
}

/** Throws DigestMismatchError unless the file's content has the digest. */
export async function verifyFile(path: string, expected: string): Promise<void> {
  const actual = await digestOfFile(path);
  if (actual !== expected) throw new DigestMismatchError(expected, actual);
}
