import { createHash, randomBytes } from "node:crypto";
import { checkSegment } from "../certs/identity.js";
import { InvalidArgumentError, PermissionDeniedError, UnauthenticatedError } from "../common/errors.js";

/**
 * Join tokens: bootstrap credentials an operator hands to new hosts. The
 * secret is shown once; the controller stores only its SHA-256 (the secret
 * is 256 random bits, so a fast hash is enough), keyed by that hash.
 */
export interface JoinTokenRecord {
  /** Non-secret name: the first 16 hex digits of the hash. */
  readonly id: string;
  readonly tenant: string;
  readonly createdAt: number;
  readonly expiresAt: number;
  /** Enrollments still allowed. A used-up record stays until it expires, so refusals say why. */
  readonly usesLeft: number;
  /** When set, only this host id may enroll with the token. */
  readonly hostId?: string;
  /** Who created it (`operator:<tenant>/<name>`). */
  readonly createdBy: string;
}

export const TOKEN_PREFIX = "rxj1_";
const DEFAULT_TOKEN_TTL_MS = 3_600_000;
const MAX_TOKEN_TTL_MS = 30 * 86_400_000;
const MAX_TOKEN_USES = 100_000;
/** Longer tokens are refused before hashing: they come from unauthenticated callers. */
const MAX_TOKEN_LENGTH = 256;

export function hashJoinToken(token: string): string {
  return createHash("sha256").update(token, "utf8").digest("hex");
}

function tokenIdOf(hash: string): string {
  return hash.slice(0, 16);
}

export interface NewJoinToken {
  /** The secret, for the operator only. */
  readonly token: string;
  readonly hash: string;
  readonly record: JoinTokenRecord;
}

/** Validates the options and mints a token; nothing is stored here. */
export function mintJoinToken(
  opts: { tenant: string; ttlMs?: number; uses?: number; hostId?: string; createdBy: string; now: number },
  random: (bytes: number) => Buffer = randomBytes,
): NewJoinToken {
  checkSegment("tenant", opts.tenant);
  if (opts.hostId !== undefined) checkSegment("host id", opts.hostId);
  const ttlMs = opts.ttlMs ?? DEFAULT_TOKEN_TTL_MS;
  if (!Number.isFinite(ttlMs) || ttlMs < 1000 || ttlMs > MAX_TOKEN_TTL_MS) {
    throw new InvalidArgumentError(`ttl must be between 1s and ${MAX_TOKEN_TTL_MS / 86_400_000}d`);
  }
  const uses = opts.uses ?? 1;
  if (!Number.isInteger(uses) || uses < 1 || uses > MAX_TOKEN_USES) throw new InvalidArgumentError(`uses must be a whole number from 1 to ${MAX_TOKEN_USES}`);
  if (opts.hostId !== undefined && uses !== 1) throw new InvalidArgumentError("a token bound to a host id can be used once (--uses 1)");
  const token = TOKEN_PREFIX + random(32).toString("base64url");
  const hash = hashJoinToken(token);
  const record: JoinTokenRecord = {
    id: tokenIdOf(hash),
    tenant: opts.tenant,
    createdAt: opts.now,
    expiresAt: opts.now + ttlMs,
    usesLeft: uses,
    ...(opts.hostId !== undefined ? { hostId: opts.hostId } : {}),
    createdBy: opts.createdBy,
  };
  return { token, hash, record };
}

/** The hash to look a presented token up by; malformed tokens are refused before any lookup. */
export function lookupHash(token: string): string {
  if (token.length > MAX_TOKEN_LENGTH || !token.startsWith(TOKEN_PREFIX)) throw new UnauthenticatedError("the join token is not valid");
  return hashJoinToken(token);
}

/**
 * Throws unless the token can enroll `hostId` now. `reserved` counts uses
 * taken by enrollments in flight, so concurrent requests cannot spend the
 * same use twice.
 */
export function checkJoinToken(rec: JoinTokenRecord | undefined, hostId: string, now: number, reserved = 0): JoinTokenRecord {
  if (!rec) throw new UnauthenticatedError("the join token is not valid");
  if (now >= rec.expiresAt) throw new UnauthenticatedError(`join token ${rec.id} has expired`);
  if (rec.usesLeft - reserved <= 0) throw new UnauthenticatedError(`join token ${rec.id} has been used up`);
  if (rec.hostId !== undefined && rec.hostId !== hostId) throw new PermissionDeniedError(`join token ${rec.id} is bound to another host id`);
  return rec;
}

/** The record after one use. */
export function spendJoinToken(rec: JoinTokenRecord): JoinTokenRecord {
  return { ...rec, usesLeft: rec.usesLeft - 1 };
}
