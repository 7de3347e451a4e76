import { create } from "@bufbuild/protobuf";
import { durationMs, timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { HandlerContext, ServiceImpl } from "@connectrpc/connect";
import forge from "node-forge";
import { issueCertificate, type CaMaterial } from "../certs/ca.js";
import { readCsr, verifyZeroCertificate } from "../certs/enrollment.js";
import { checkSegment, formatIdentity, requireRole, type PeerIdentity } from "../certs/identity.js";
import type { Clock } from "../common/clock.js";
import { FailedPreconditionError, InvalidArgumentError, PermissionDeniedError, UnavailableError } from "../common/errors.js";
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
import type { EnrolledHost, EnrollStore } from "./enroll-store.js";
import { checkJoinToken, lookupHash, mintJoinToken, spendJoinToken, type JoinTokenRecord } from "./tokens.js";

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
  /** Revoked identities: a revoked host id is never enrolled again, not even with a bound token. */
  isRevoked?: (identity: { role: "host"; scope: string; id: string }) => boolean;
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

type Credential = { kind: "token"; hash: string; record: JoinTokenRecord } | { kind: "zero"; identity: PeerIdentity } | { kind: "renew"; identity: PeerIdentity };

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
 * credential of a tenant. An id enrolled already (or known from a
 * hand-issued certificate) can be enrolled again only with a join token
 * bound to that id, and only with the key it was enrolled with; a different
 * key is always refused, so an id is never reissued to another machine.
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

  /** Creates a join token for the caller's tenant; returns the secret once. */
  async createToken(caller: PeerIdentity, req: { tenant?: string; ttlMs?: number; uses?: number; hostId?: string }): Promise<{ token: string; id: string; expiresAt: number }> {
    const who = formatIdentity(caller);
    try {
      requireRole(caller, "operator");
      const tenant = req.tenant || caller.scope;
      if (tenant !== caller.scope) throw new PermissionDeniedError(`an operator of tenant ${caller.scope} cannot create join tokens for tenant ${tenant}`);
      const minted = mintJoinToken({ tenant, ttlMs: req.ttlMs, uses: req.uses, hostId: req.hostId || undefined, createdBy: who, now: this.opts.clock.now() });
      await this.opts.store.putToken(minted.hash, minted.record);
      await this.audit({ action: "create-join-token", decision: "allowed", caller: who, tenant, hostId: minted.record.hostId, credential: `token:${minted.record.id}` });
      this.opts.log.info("join token created", { token: minted.record.id, tenant, uses: minted.record.usesLeft, expiresAt: minted.record.expiresAt, hostId: minted.record.hostId, by: who });
      return { token: minted.token, id: minted.record.id, expiresAt: minted.record.expiresAt };
    } catch (err) {
      await this.audit({ action: "create-join-token", decision: "refused", caller: who, tenant: req.tenant, reason: (err as Error).message });
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
      const hostId = checkSegment("host id", input.hostId);
      if (input.tenant) checkSegment("tenant", input.tenant);
      const csr = readCsr(input.csrPem);
      fingerprint = csr.fingerprint;
      const now = this.opts.clock.now();
      credential = this.credentialOf(input, peer, now);
      const cred = credential;
      const tenant = cred.kind === "token" ? cred.record.tenant : cred.identity.scope;
      if (input.tenant && input.tenant !== tenant) throw new PermissionDeniedError(`the bootstrap credential is not for tenant ${input.tenant}`);

      // Checked and reserved in one synchronous step, so concurrent requests
      // for the same token or host id fail here without signing anything.
      const check = (token: JoinTokenRecord | undefined, host: EnrolledHost | undefined, reserved: number) => {
        if (cred.kind === "token") checkJoinToken(token, hostId, now, reserved);
        this.checkHost(hostId, tenant, csr.fingerprint, host, cred);
      };
      if (this.pendingHosts.has(hostId)) throw new UnavailableError(`another enrollment of host id ${hostId} is in progress; try again`);
      const tokenHash = cred.kind === "token" ? cred.hash : undefined;
      check(tokenHash ? this.opts.store.getToken(tokenHash) : undefined, this.opts.store.getHost(hostId), tokenHash ? (this.reservedUses.get(tokenHash) ?? 0) : 0);
      this.pendingHosts.add(hostId);
      if (tokenHash) this.reservedUses.set(tokenHash, (this.reservedUses.get(tokenHash) ?? 0) + 1);
      try {
        const certPem = issueCertificate(ca, { clock: this.opts.clock, identity: { role: "host", scope: tenant, id: hostId }, publicKeyPem: csr.publicKeyPem, validityMs: this.opts.hostCertTtlMs });
        const issued = forge.pki.certificateFromPem(certPem);
        const notAfter = issued.validity.notAfter.getTime();
        const host: EnrolledHost = { id: hostId, tenant, keyFingerprint: csr.fingerprint, enrolledAt: now, notAfter, serial: issued.serialNumber, credential: credentialName(cred), ...(relayedBy ? { relayedBy } : {}) };
        // Commit before answering: a certificate is returned only once the
        // spent use and the host's key are durable.
        await this.opts.store.commit(tokenHash, hostId, (token, current) => {
          check(token, current, 0);
          return { host, ...(tokenHash && token ? { token: { hash: tokenHash, record: spendJoinToken(token) } } : {}) };
        });
        await this.audit({ action: "enroll", decision: "allowed", caller, relayedBy, hostId, tenant, credential: credentialName(cred), keyFingerprint: csr.fingerprint, serial: host.serial, notAfter });
        this.opts.log.info("host enrolled", { host: hostId, tenant, credential: credentialName(cred), relayedBy, serial: host.serial, notAfter });
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
        credential: credential && credentialName(credential),
        keyFingerprint: fingerprint,
        reason: (err as Error).message,
      });
      this.opts.log.info("enrollment refused", { host: input.hostId, caller, relayedBy, err });
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
      return identity.role === "host" ? { kind: "renew", identity } : { kind: "zero", identity };
    }
    if (input.token === "") throw new InvalidArgumentError("no bootstrap credential: send a join token or use a zero certificate");
    const hash = lookupHash(input.token);
    return { kind: "token", hash, record: checkJoinToken(this.opts.store.getToken(hash), input.hostId, now) };
  }

  private checkHost(hostId: string, tenant: string, fingerprint: string, host: EnrolledHost | undefined, cred: Credential): void {
    if (this.opts.isRevoked?.({ role: "host", scope: tenant, id: hostId })) {
      throw new PermissionDeniedError(`host id ${hostId} was revoked: it is never enrolled again`);
    }
    const known = host ?? this.opts.knownHost?.(hostId);
    if (!known) return;
    const taken = `host id ${hostId} is enrolled already`;
    // Worded as the refusal of an id of one's own tenant enrolled with another key, so ids of other tenants are not revealed.
    if (known.tenant !== tenant) throw new PermissionDeniedError(`${taken} with another key: host ids are never reissued to another machine`);
    // Renewal: the host proved it holds its current, valid, unrevoked certificate; the same key is certified again.
    if (cred.kind === "renew") {
      if (host && host.keyFingerprint !== fingerprint) throw new PermissionDeniedError(`${taken} with another key: renew with the same key`);
      return;
    }
    if (host && host.keyFingerprint !== fingerprint) throw new PermissionDeniedError(`${taken} with another key: host ids are never reissued to another machine`);
    const boundToken = cred.kind === "token" && cred.record.hostId === hostId;
    if (!boundToken) throw new PermissionDeniedError(`${taken}; enrolling it again needs a join token bound to it (rexmesh tokens create --host-id ${hostId})`);
  }
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

export function enrollResponse(issued: IssuedCertificate): EnrollResponse {
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
        });
        return create(CreateJoinTokenResponseSchema, { token: r.token, tokenId: r.id, expiresAt: timestampFromMs(r.expiresAt) });
      } catch (err) {
        throw toConnectError(err);
      }
    },
  };
}
