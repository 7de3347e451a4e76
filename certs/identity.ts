import { X509Certificate } from "node:crypto";
import type { PeerCertificate } from "node:tls";
import { InvalidArgumentError, PermissionDeniedError, UnauthenticatedError } from "../common/errors.js";
import { preview } from "../common/limits.js";

/**
 * What a certificate lets its holder be. A certificate holds exactly one role.
 * `enroll` is a tenant's zero certificate: it can only call EnrollService
 * (every other service names the roles it accepts, and none names enroll).
 */
export type Role = "host" | "proxy" | "operator" | "controller" | "enroll";

export const ROLES: readonly Role[] = ["host", "proxy", "operator", "controller", "enroll"];

/**
 * Who a peer is, as its certificate's SAN URI says. `scope` is the tenant for
 * hosts, operators and enroll certificates, the region for proxies, and "mesh" for the controller.
 */
export interface PeerIdentity {
  readonly role: Role;
  readonly scope: string;
  readonly id: string;
  /** Set when the call came from a web console session rather than the certificate itself: the audit says so. */
  readonly via?: "console";
}

/** At most LIMITS.idChars (common/limits.ts) characters. */
const SEGMENT = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
const SCHEME = "rexmesh:";

/** Validates one id or scope segment; the message names the field. */
export function checkSegment(field: string, value: string): string {
  if (typeof value !== "string" || !SEGMENT.test(value)) {
    // The value is shown cut short: it may come from an unauthenticated caller.
    throw new InvalidArgumentError(
      `${field} ${preview(String(value))} is not valid: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit`,
    );
  }
  return value;
}

export function isRole(value: string): value is Role {
  return (ROLES as readonly string[]).includes(value);
}

/** `rexmesh://<role>/<scope>/<id>`, the SAN URI that names a peer. */
export function identityUri(identity: PeerIdentity): string {
  checkSegment("scope", identity.scope);
  checkSegment("id", identity.id);
  return `rexmesh://${identity.role}/${identity.scope}/${identity.id}`;
}

export function parseIdentityUri(uri: string): PeerIdentity {
  let url: URL;
  try {
    url = new URL(uri);
  } catch (cause) {
    throw new InvalidArgumentError(`not a rexmesh identity URI: ${JSON.stringify(uri)}`, { cause });
  }
  const parts = url.pathname.split("/").filter((p) => p !== "");
  const role = url.hostname;
  if (url.protocol !== SCHEME || !isRole(role) || parts.length !== 2 || url.search || url.hash) {
    throw new InvalidArgumentError(`not a rexmesh identity URI: ${JSON.stringify(uri)}`);
  }
  return { role, scope: checkSegment("scope", parts[0]!), id: checkSegment("id", parts[1]!) };
}

export function formatIdentity(identity: PeerIdentity): string {
  return `${identity.role}:${identity.scope}/${identity.id}`;
}

/**
 * Reads the identity from a certificate's SAN. A certificate that names no
 * rexmesh identity, or more than one, identifies nobody.
 */
export function identityFromSubjectAltName(san: string | undefined): PeerIdentity {
  const uris = (san ?? "")
    .split(/,\s*/)
    .filter((entry) => entry.startsWith("URI:rexmesh://"))
    .map((entry) => entry.slice("URI:".length));
  if (uris.length !== 1) {
    throw new UnauthenticatedError("the certificate does not name exactly one rexmesh identity");
  }
  try {
    return parseIdentityUri(uris[0]!);
  } catch (cause) {
    throw new UnauthenticatedError("the certificate's rexmesh identity is malformed", { cause });
  }
}

export function identityFromCertificate(cert: PeerCertificate | X509Certificate | string): PeerIdentity {
  if (typeof cert === "string") return identityFromSubjectAltName(new X509Certificate(cert).subjectAltName);
  if (cert instanceof X509Certificate) return identityFromSubjectAltName(cert.subjectAltName);
  return identityFromSubjectAltName(cert.subjectaltname);
}

/** Throws unless the peer holds one of the roles a service accepts. */
export function requireRole(identity: PeerIdentity, ...allowed: Role[]): PeerIdentity {
  if (!allowed.includes(identity.role)) {
    throw new PermissionDeniedError(
      `a ${identity.role} certificate cannot be used here; this service accepts ${allowed.join(" or ")} certificates`,
    );
  }
  return identity;
}

/** The same identity: role, scope and id alike. */
export function sameIdentity(a: PeerIdentity, b: PeerIdentity): boolean {
  return a.role === b.role && a.scope === b.scope && a.id === b.id;
}
