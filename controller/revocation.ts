import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { Database } from "lmdb";
import type { Credentials } from "../certs/files.js";
import { checkSegment, identityUri, isRole, type PeerIdentity } from "../certs/identity.js";
import type { Clock } from "../common/clock.js";
import { DenySet, signDenyList } from "../common/deny-list.js";
import { InvalidArgumentError, PermissionDeniedError } from "../common/errors.js";
import type { Logger } from "../common/logger.js";
import { DenyListSchema, RevokedIdentitySchema, type DenyList, type RevokedIdentity, type SignedDenyList } from "../gen/rexmesh/v1/revocation_pb.js";

interface Stored {
  uri: string;
  revokedAt: number;
  reason: string;
  revokedBy: string;
}

/**
 * The controller's deny-list: identities whose certificates are refused
 * everywhere. Kept in LMDB (revocations survive restarts), signed for the
 * proxies, and pushed to every connected proxy when it changes; a proxy that
 * was away gets it with its next welcome.
 */
export class Revocations {
  private readonly set = new DenySet();
  private entries: Stored[] = [];
  private version = 0n;
  private signed: SignedDenyList;
  private readonly listeners = new Set<(signed: SignedDenyList) => void>();

  constructor(
    private readonly db: Database<Stored | string, string>,
    private readonly creds: Credentials,
    private readonly clock: Clock,
    private readonly log: Logger,
  ) {
    for (const { key, value } of db.getRange()) {
      if (key === "\0version") this.version = BigInt(value as string);
      else this.entries.push(value as Stored);
    }
    this.signed = this.sign();
  }

  private list(): DenyList {
    return create(DenyListSchema, {
      version: this.version,
      entries: this.entries.map((e) => create(RevokedIdentitySchema, { uri: e.uri, revokedAt: timestampFromMs(e.revokedAt), reason: e.reason, revokedBy: e.revokedBy })),
    });
  }

  private sign(): SignedDenyList {
    const list = this.list();
    this.set.update(list);
    return signDenyList(list, this.creds);
  }

  get current(): SignedDenyList {
    return this.signed;
  }

  get denyList(): DenyList {
    return this.list();
  }

  isRevoked(identity: PeerIdentity): boolean {
    return this.set.has(identity);
  }

  /** The deny-list entry of an identity, or undefined when it is not revoked. */
  revocationOf(identity: PeerIdentity): { reason: string; revokedAt: number; revokedBy: string } | undefined {
    if (!this.set.has(identity)) return undefined;
    const uri = identityUri(identity);
    const e = this.entries.find((x) => x.uri === uri);
    return { reason: e?.reason || "revoked", revokedAt: e?.revokedAt ?? 0, revokedBy: e?.revokedBy ?? "" };
  }

  /** Calls fn with every new signed deny-list; returns the unsubscribe function. */
  onChange(fn: (signed: SignedDenyList) => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  /**
   * Revokes an identity: hosts and operators of the caller's own tenant,
   * or a proxy (shared by every tenant). Who may revoke what — the
   * `revoke`, `revoke.operator` and `revoke.proxy` actions and their
   * scopes — is decided before this is called (controller/access.ts); the
   * tenant rule is kept here too, as an invariant of the deny-list.
   */
  async revoke(caller: PeerIdentity, req: { role: string; scope: string; id: string; reason: string }): Promise<RevokedIdentity> {
    if (!isRole(req.role) || req.role === "controller") throw new InvalidArgumentError("role must be host, proxy or operator");
    const scope = req.scope || (req.role === "proxy" ? "" : caller.scope);
    if (!scope) throw new InvalidArgumentError("a proxy is named by its region: give the scope");
    if (req.role !== "proxy" && scope !== caller.scope) throw new PermissionDeniedError(`an operator of tenant ${caller.scope} cannot revoke identities of tenant ${scope}`);
    const uri = identityUri({ role: req.role, scope: checkSegment("scope", scope), id: checkSegment("id", req.id) });
    let entry = this.entries.find((e) => e.uri === uri);
    if (!entry) {
      entry = { uri, revokedAt: this.clock.now(), reason: req.reason, revokedBy: identityUri(caller) };
      this.entries.push(entry);
      this.version++;
      await Promise.all([this.db.put(uri, entry), this.db.put("\0version", this.version.toString())]);
      this.signed = this.sign();
      this.log.warn("identity revoked", { uri, by: entry.revokedBy, reason: req.reason, version: Number(this.version) });
      for (const fn of this.listeners) fn(this.signed);
    }
    return create(RevokedIdentitySchema, { uri: entry.uri, revokedAt: timestampFromMs(entry.revokedAt), reason: entry.reason, revokedBy: entry.revokedBy });
  }
}
