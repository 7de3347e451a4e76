import { create } from "@bufbuild/protobuf";
import { durationMs, timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { HandlerContext, ServiceImpl } from "@connectrpc/connect";
import { X509Certificate } from "node:crypto";
import { issueCertificate, type CaMaterial } from "../certs/ca.js";
import { readCsr, verifyZeroCertificate } from "../certs/enrollment.js";
import { checkSegment, formatIdentity, requireRole, type PeerIdentity } from "../certs/identity.js";
import type { Clock } from "../common/clock.js";
import { AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError, PermissionDeniedError, UnavailableError } from "../common/errors.js";
import { checkBytes, checkChars, LIMITS, truncate } from "../common/limits.js";
import type { Logger } from "../common/logger.js";
import { toConnectError } from "../common/rpc-errors.js";
import {
  CreateJoinTokenResponseSchema,
  EnrollResponseSchema,
  type EnrollRequest,
  type EnrollResponse,
  type EnrollService,
  type TokenService,
} from "../gen/rexmesh/v1/enroll_pb.js";
import type { EnrolledHost, EnrollStore, StoredToken } from "./enroll-store.js";
import { checkJoinToken, lookupHash, mintJoinToken, spendJoinToken } from "./tokens.js";

/**
 * One enrollment decision or token creation, for the audit log. The
 * controller passes a callback (controller/main.ts); enrollment never
 * depends on how events are stored.
 */
export interface EnrollmentEvent {
  readonly at: number;
  readonly action: "enroll" | "create-join-token";
  readonly decision: "allowed" | "refused";
  /** Who asked: the TLS peer (`operator:t/alice`, `proxy:eu/px1`, `enroll:t/rack-1`), or "anonymous" on an open enroll listener. */
  readonly caller: string;
  /** For a relayed request, the proxy that relayed it. */
  readonly relayedBy?: string;
  readonly hostId?: string;
  readonly tenant?: string;
  /** `token:<id>` or `enroll:<tenant>/<name>`. */
  readonly credential?: string;
  readonly keyFingerprint?: string;
  readonly serial?: string;
  readonly notAfter?: number;
  /** Why it was refused (the message the caller saw). */
  readonly reason?: string;
  /** A re-key token was created, or a host id was given a new key with one. */
  readonly rekey?: boolean;
  /** On a re-key enrollment: the key the host id had before ("unknown" for a hand-issued certificate). */
  readonly previousKeyFingerprint?: string;
}

/** Awaited before the caller is answered; a failing hook is logged, not fatal. */
export type EnrollmentAudit = (event: EnrollmentEvent) => void | Promise<void>;

export interface EnrollmentOptions {
  store: EnrollStore;
  /** The mesh CA with its key; without it enrollment is refused (FAILED_PRECONDITION). */
  ca: CaMaterial | undefined;
  clock: Clock;
  log: Logger;
  /** Lifetime of the host certificates issued. */
  hostCertTtlMs: number;
  /** Hosts the controller knows of otherwise (certificates issued by hand): treated as enrolled with an unknown key. */
  knownHost?: (id: string) => { tenant: string } | undefined;
  /**
   * Revoked identities: a revoked host id is never enrolled again, not even
   * with a bound token, and a revoked zero certificate enrolls nothing, over
   * TLS or in a request's body.
   */
  isRevoked?: (identity: PeerIdentity) => boolean;
  /**
   * Whether an operator may create re-key tokens (the policy action
   * `rekey`): returns the allowing role or throws PermissionDeniedError.
   * Without it, re-key tokens are refused.
   */
  authorizeRekey?: (caller: PeerIdentity) => string;
  audit?: EnrollmentAudit;
}

/** What a request carries, transport aside. */
export interface EnrollInput {
  hostId: string;
  csrPem: string;
  token: string;
  tenant: string;
  bootstrapCertificatePem: string;
  bootstrapSignature: Uint8Array;
}

export interface IssuedCertificate {
  certPem: string;
  caPem: string;
  notAfter: number;
}

type Credential = { kind: "token"; hash: string; record: StoredToken } | { kind: "zero"; identity: PeerIdentity } | { kind: "renew"; identity: PeerIdentity };

function credentialName(c: Credential): string {
  if (c.kind === "renew") return `renew:${c.identity.scope}/${c.identity.id}`;
  return c.kind === "token" ? `token:${c.record.id}` : `enroll:${c.identity.scope}/${c.identity.id}`;
}

/**
 * The controller's side of enrollment: checks a bootstrap credential and a
 * CSR and issues a host certificate, at most once per token use, and never
 * for a host id that another machine owns.
 *
 * Host id rule: an id seen for the first time can be enrolled with any valid
 * credential of a tenant. An id enrolled already can be enrolled again with
 * a join token bound to that id and only with the key it was enrolled with.
 * Giving an id a new key (or a first known key, for an id known only from a
 * hand-issued certificate) needs a re-key token: bound to the id, created by
 * an operator the policy allows to `rekey`, and audited. Anything else is
 * ALREADY_EXISTS, in the same words whatever tenant holds the id.
 *
 * Order of checks, cheapest first, so that an unauthenticated caller cannot
 * make the controller work: the sizes of the credential fields, the
 * credential, the host id, and only then the CSR (its key judged from its
 * encoding before its signature is checked natively).
 */
export class EnrollmentAuthority {
  /** Token uses held by enrollments between their check and their commit. */
  private readonly reservedUses = new Map<string, number>();
  /** Host ids with an enrollment between its check and its commit. */
  private readonly pendingHosts = new Set<string>();

  constructor(private readonly opts: EnrollmentOptions) {}

  private async audit(event: Omit<EnrollmentEvent, "at">): Promise<void> {
    try {
      await this.opts.audit?.({ at: this.opts.clock.now(), ...event });
    } catch (err) {
      this.opts.log.error("enrollment audit hook failed", { err });
    }
  }

  /**
   * Creates a join token for the caller's tenant; returns the secret once. A
   * re-key token (`rekey`) must name a host id of the caller's tenant and
   * needs the policy action `rekey`.
   */
  async createToken(caller: PeerIdentity, req: { tenant?: string; ttlMs?: number; uses?: number; hostId?: string; rekey?: boolean }): Promise<{ token: string; id: string; expiresAt: number }> {
    const who = formatIdentity(caller);
    const rekey = req.rekey === true ? true : undefined;
    try {
      requireRole(caller, "operator");
      const tenant = checkChars("tenant", req.tenant || caller.scope, LIMITS.idChars);
      if (tenant !== caller.scope) throw new PermissionDeniedError(`an operator of tenant ${caller.scope} cannot create join tokens for tenant ${tenant}`);
      if (rekey) {
        if (!req.hostId) throw new InvalidArgumentError("a re-key token names the host id it re-keys (--host-id ID --rekey)");
        if (!this.opts.authorizeRekey) throw new PermissionDeniedError("re-keying host ids is not enabled on this controller");
        this.opts.authorizeRekey(caller);
        const id = checkSegment("host id", req.hostId);
        const known = this.opts.store.getHost(id) ?? this.opts.knownHost?.(id);
        // Another tenant's host is reported like one that does not exist.
        if (!known || known.tenant !== tenant) throw new NotFoundError(`host ${id} not found: only an enrolled host of your tenant can be re-keyed`);
      }
      const minted = mintJoinToken({ tenant, ttlMs: req.ttlMs, uses: req.uses, hostId: req.hostId || undefined, createdBy: who, now: this.opts.clock.now() });
      const record: StoredToken = rekey ? { ...minted.record, rekey } : minted.record;
      await this.opts.store.putToken(minted.hash, record);
      await this.audit({ action: "create-join-token", decision: "allowed", caller: who, tenant, hostId: record.hostId, credential: `token:${record.id}`, rekey });
      this.opts.log.info("join token created", { tokenId: record.id, tenant, uses: record.usesLeft, expiresAt: record.expiresAt, hostId: record.hostId, rekey, by: who });
      return { token: minted.token, id: record.id, expiresAt: record.expiresAt };
    } catch (err) {
      const tenant = req.tenant || (caller.role === "operator" ? caller.scope : undefined);
      await this.audit({ action: "create-join-token", decision: "refused", caller: who, tenant, hostId: req.hostId || undefined, rekey, reason: (err as Error).message });
      throw err;
    }
  }

  /**
   * `peer` is the TLS identity of the caller: undefined on a listener that
   * asks for no client certificate; on the main port, an enroll certificate
   * (itself the credential) or a proxy relaying for a daemon.
   */
  async enroll(input: EnrollInput, peer: PeerIdentity | undefined): Promise<IssuedCertificate> {
    const caller = peer ? formatIdentity(peer) : "anonymous";
    const relayedBy = peer?.role === "proxy" ? `${peer.scope}/${peer.id}` : undefined;
    let credential: Credential | undefined;
    let fingerprint: string | undefined;
    try {
      if (peer) requireRole(peer, "enroll", "proxy");
      const ca = this.opts.ca;
      if (!ca) throw new FailedPreconditionError("enrollment is off: this controller holds no CA key (--ca-key)");
      checkCredentialSizes(input);
      const now = this.opts.clock.now();
      credential = this.credentialOf(input, peer, now);
      const cred = credential;
      const tenant = cred.kind === "token" ? cred.record.tenant : cred.identity.scope;
      const hostId = checkSegment("host id", checkChars("host_id", input.hostId, LIMITS.idChars));
      if (input.tenant) checkSegment("tenant", checkChars("tenant", input.tenant, LIMITS.idChars));
      if (input.tenant && input.tenant !== tenant) throw new PermissionDeniedError(`the bootstrap credential is not for tenant ${input.tenant}`);
      const csr = readCsr(input.csrPem);
      fingerprint = csr.fingerprint;

      // Checked and reserved in one synchronous step, so concurrent requests
      // for the same token or host id fail here without signing anything.
      const check = (token: StoredToken | undefined, host: EnrolledHost | undefined, reserved: number): Rekey | undefined => {
        if (cred.kind === "token") checkJoinToken(token, hostId, now, reserved);
        return this.checkHost(hostId, tenant, csr.fingerprint, host, cred);
      };
      if (this.pendingHosts.has(hostId)) throw new UnavailableError(`another enrollment of host id ${hostId} is in progress; try again`);
      const tokenHash = cred.kind === "token" ? cred.hash : undefined;
      let rekey = check(tokenHash ? this.opts.store.getToken(tokenHash) : undefined, this.opts.store.getHost(hostId), tokenHash ? (this.reservedUses.get(tokenHash) ?? 0) : 0);
      this.pendingHosts.add(hostId);
      if (tokenHash) this.reservedUses.set(tokenHash, (this.reservedUses.get(tokenHash) ?? 0) + 1);
      try {
        const certPem = issueCertificate(ca, { clock: this.opts.clock, identity: { role: "host", scope: tenant, id: hostId }, publicKeyPem: csr.publicKeyPem, validityMs: this.opts.hostCertTtlMs });
        const issued = new X509Certificate(certPem);
        const notAfter = Date.parse(issued.validTo);
        const host: EnrolledHost = { id: hostId, tenant, keyFingerprint: csr.fingerprint, enrolledAt: now, notAfter, serial: issued.serialNumber.toLowerCase(), credential: credentialName(cred), ...(relayedBy ? { relayedBy } : {}) };
        // Commit before answering: a certificate is returned only once the
        // spent use and the host's key are durable.
        await this.opts.store.commit(tokenHash, hostId, (token, current) => {
          rekey = check(token, current, 0);
          return { host, ...(tokenHash && token ? { token: { hash: tokenHash, record: spendJoinToken(token) as StoredToken } } : {}) };
        });
        await this.audit({ action: "enroll", decision: "allowed", caller, relayedBy, hostId, tenant, credential: credentialName(cred), keyFingerprint: csr.fingerprint, serial: host.serial, notAfter, ...rekey });
        this.opts.log[rekey ? "warn" : "info"](rekey ? "host id re-keyed" : "host enrolled", { host: hostId, tenant, credential: credentialName(cred), relayedBy, serial: host.serial, notAfter, ...rekey });
        return { certPem, caPem: ca.certPem, notAfter };
      } finally {
        this.pendingHosts.delete(hostId);
        if (tokenHash) {
          const n = (this.reservedUses.get(tokenHash) ?? 1) - 1;
          if (n > 0) this.reservedUses.set(tokenHash, n);
          else this.reservedUses.delete(tokenHash);
        }
      }
    } catch (err) {
      await this.audit({
        action: "enroll",
        decision: "refused",
        caller,
        relayedBy,
        hostId: input.hostId,
        tenant: credential && (credential.kind === "token" ? credential.record.tenant : credential.identity.scope),
        rekey: credential?.kind === "token" && credential.record.rekey ? true : undefined,
        credential: credential && credentialName(credential),
        keyFingerprint: fingerprint,
        reason: (err as Error).message,
      });
      this.opts.log.info("enrollment refused", { host: truncate(input.hostId, LIMITS.auditFieldChars), caller, relayedBy, err });
      throw err;
    }
  }

  private credentialOf(input: EnrollInput, peer: PeerIdentity | undefined, now: number): Credential {
    const zero = peer?.role === "enroll" || input.bootstrapCertificatePem !== "";
    if (zero && input.token !== "") throw new InvalidArgumentError("give one bootstrap credential: a join token or a zero certificate, not both");
    if (peer?.role === "enroll") return { kind: "zero", identity: peer };
    if (input.bootstrapCertificatePem !== "") {
      const identity = verifyZeroCertificate(
        { certPem: input.bootstrapCertificatePem, signature: input.bootstrapSignature, caPem: this.opts.ca!.certPem, now },
        { hostId: input.hostId, tenant: input.tenant, csrPem: input.csrPem },
      );
      // The TLS peer is checked against the deny-list by the server; a certificate in the body is checked here.
      if (this.opts.isRevoked?.(identity)) throw new PermissionDeniedError(`the bootstrap certificate ${formatIdentity(identity)} has been revoked`);
      return identity.role === "host" ? { kind: "renew", identity } : { kind: "zero", identity };
    }
    if (input.token === "") throw new InvalidArgumentError("no bootstrap credential: send a join token or use a zero certificate");
    const hash = lookupHash(input.token);
    return { kind: "token", hash, record: checkJoinToken(this.opts.store.getToken(hash), input.hostId, now) as StoredToken };
  }

  /** Throws unless `cred` may enroll `hostId` with this key; says so when it re-keys the id. */
  private checkHost(hostId: string, tenant: string, fingerprint: string, host: EnrolledHost | undefined, cred: Credential): Rekey | undefined {
    if (this.opts.isRevoked?.({ role: "host", scope: tenant, id: hostId })) {
      throw new PermissionDeniedError(`host id ${hostId} was revoked: it is never enrolled again`);
    }
    const known = host ?? this.opts.knownHost?.(hostId);
    if (!known) return undefined;
    const taken = `host id ${hostId} is enrolled already`;
    const otherKey = new AlreadyExistsError(
      `${taken} with another key: host ids are never reissued to another machine; an operator who means to re-key it creates a re-key token (rexmesh tokens create --host-id ${hostId} --rekey)`,
    );
    // The same refusal whatever the tenant, so ids of other tenants are not revealed.
    if (known.tenant !== tenant) throw otherKey;
    // Renewal: the host proved it holds its current, valid, unrevoked certificate; the same key is certified again.
    if (cred.kind === "renew") {
      if (host && host.keyFingerprint !== fingerprint) throw new PermissionDeniedError(`${taken} with another key: renew with the same key`);
      return undefined;
    }
    const bound = cred.kind === "token" && cred.record.hostId === hostId;
    if (bound && cred.record.rekey) return { rekey: true, previousKeyFingerprint: host?.keyFingerprint ?? "unknown" };
    if (!host || host.keyFingerprint !== fingerprint) throw otherKey;
    if (!bound) throw new AlreadyExistsError(`${taken}; enrolling it again needs a join token bound to it (rexmesh tokens create --host-id ${hostId})`);
    return undefined;
  }
}

type Rekey = { rekey: true; previousKeyFingerprint: string };

/**
 * The sizes of what the credential check reads, before anything is parsed
 * or looked up: the caller is not authenticated yet. (The host id and
 * tenant are compared, not parsed, by the credential check; their own limits
 * follow it, so that the refusal is recorded under the credential's tenant.)
 */
function checkCredentialSizes(input: EnrollInput): void {
  checkChars("token", input.token, LIMITS.tokenChars);
  checkBytes("csr_pem", input.csrPem, LIMITS.csrBytes);
  checkBytes("bootstrap_certificate_pem", input.bootstrapCertificatePem, LIMITS.bootstrapCertificateBytes);
  checkBytes("bootstrap_signature", input.bootstrapSignature, LIMITS.bootstrapSignatureBytes);
}

function inputOf(req: EnrollRequest): EnrollInput {
  return {
    hostId: req.hostId,
    csrPem: req.csrPem,
    token: req.token,
    tenant: req.tenant,
    bootstrapCertificatePem: req.bootstrapCertificatePem,
    bootstrapSignature: req.bootstrapSignature,
  };
}

function enrollResponse(issued: IssuedCertificate): EnrollResponse {
  return create(EnrollResponseSchema, { certificatePem: issued.certPem, caPem: issued.caPem, notAfter: timestampFromMs(issued.notAfter) });
}

/** Enroll for a caller without a client certificate (the open enroll listener). */
export function enrollAnonymous(authority: EnrollmentAuthority, req: EnrollRequest): Promise<EnrollResponse> {
  return authority.enroll(inputOf(req), undefined).then(enrollResponse);
}

/** EnrollService and TokenService on the controller's main (mTLS) port. */
export function enrollServiceImpl(authority: EnrollmentAuthority, callerOf: (ctx: HandlerContext) => PeerIdentity): ServiceImpl<typeof EnrollService> {
  return {
    async enroll(req, ctx) {
      try {
        return enrollResponse(await authority.enroll(inputOf(req), callerOf(ctx)));
      } catch (err) {
        throw toConnectError(err);
      }
    },
  };
}

export function tokenServiceImpl(authority: EnrollmentAuthority, callerOf: (ctx: HandlerContext) => PeerIdentity): ServiceImpl<typeof TokenService> {
  return {
    async createJoinToken(req, ctx) {
      try {
        const r = await authority.createToken(callerOf(ctx), {
          tenant: req.tenant,
          ttlMs: req.ttl ? durationMs(req.ttl) : undefined,
          uses: req.uses || undefined,
          hostId: req.hostId,
          rekey: req.rekey,
        });
        return create(CreateJoinTokenResponseSchema, { token: r.token, tokenId: r.id, expiresAt: timestampFromMs(r.expiresAt) });
      } catch (err) {
        throw toConnectError(err);
      }
    },
  };
}
