import { createPrivateKey, sign, verify, X509Certificate } from "node:crypto";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import type { Credentials } from "../certs/files.js";
import { identityFromCertificate, identityUri, type PeerIdentity } from "../certs/identity.js";
import { DenyListSchema, SignedDenyListSchema, type DenyList, type SignedDenyList } from "../gen/rexmesh/v1/revocation_pb.js";
import type { Clock } from "./clock.js";
import { PermissionDeniedError } from "./errors.js";

/** Signs a deny-list with the controller certificate's key, so relays can check it came from the controller. */
export function signDenyList(list: DenyList, creds: Credentials): SignedDenyList {
  const bytes = toBinary(DenyListSchema, list);
  return create(SignedDenyListSchema, { denyList: bytes, signature: sign("sha256", bytes, createPrivateKey(creds.keyPem)), controllerCertificate: creds.certPem });
}

/** The deny-list inside, if a controller of this mesh signed exactly these bytes. */
export function openDenyList(signed: SignedDenyList, caPem: string, clock: Clock): DenyList {
  const cert = new X509Certificate(signed.controllerCertificate);
  const ca = new X509Certificate(caPem);
  const now = clock.now();
  const ok =
    cert.checkIssued(ca) &&
    cert.verify(ca.publicKey) &&
    now >= Date.parse(cert.validFrom) &&
    now <= Date.parse(cert.validTo) &&
    identityFromCertificate(cert).role === "controller" &&
    verify("sha256", signed.denyList, cert.publicKey, signed.signature);
  if (!ok) throw new PermissionDeniedError("a deny-list that a controller of this mesh did not sign was refused");
  return fromBinary(DenyListSchema, signed.denyList);
}

/** Fast membership for a deny-list. */
export class DenySet {
  private uris = new Set<string>();
  version = 0n;

  /** Replaces the set with a newer list; an older or equal version is ignored. */
  update(list: DenyList): boolean {
    if (list.version <= this.version && this.version !== 0n) return false;
    this.version = list.version;
    this.uris = new Set(list.entries.map((e) => e.uri));
    return true;
  }

  has(identity: PeerIdentity): boolean {
    return this.uris.size > 0 && this.uris.has(identityUri(identity));
  }
}
