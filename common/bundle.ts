import { createPrivateKey, sign, verify, X509Certificate } from "node:crypto";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { Credentials } from "../certs/files.js";
import { identityFromCertificate, type PeerIdentity, type Role } from "../certs/identity.js";
import { BundleKind, BundlePayloadSchema, BundleSchema, type BundlePayload } from "../gen/rexmesh/v1/bundle_pb.js";
import type { Clock } from "./clock.js";
import { InvalidArgumentError, PermissionDeniedError } from "./errors.js";

export type PayloadInit = Parameters<typeof create<typeof BundlePayloadSchema>>[1];

/** Serializes and signs a payload with the author's key; the result is written to a file as is. */
export function sealBundle(init: PayloadInit, creds: Credentials, clock: Clock, id: string): Uint8Array {
  const payload = toBinary(BundlePayloadSchema, create(BundlePayloadSchema, { ...init, id, createdAt: timestampFromMs(clock.now()) }));
  const signature = sign("sha256", payload, createPrivateKey(creds.keyPem));
  return toBinary(BundleSchema, create(BundleSchema, { payload, signature, signerCertificate: creds.certPem }));
}

export interface OpenedBundle {
  payload: BundlePayload;
  signer: PeerIdentity;
}

/**
 * Verifies a bundle before anything in it is used: the signer's certificate
 * chains to the mesh CA, is valid now and holds the expected role, and the
 * signature covers the payload exactly. Anything else is refused.
 */
export function openBundle(bytes: Uint8Array, opts: { caPem: string; signerRole: Role; kind: BundleKind; clock: Clock }): OpenedBundle {
  let bundle;
  try {
    bundle = fromBinary(BundleSchema, bytes);
  } catch (cause) {
    throw new InvalidArgumentError("not a rexmesh bundle (it cannot be decoded)", { cause });
  }
  if (bundle.payload.length === 0 || !bundle.signerCertificate) throw new InvalidArgumentError("not a rexmesh bundle (payload or signer missing)");
  let cert: X509Certificate;
  try {
    cert = new X509Certificate(bundle.signerCertificate);
  } catch (cause) {
    throw new InvalidArgumentError("the bundle's signer certificate cannot be read", { cause });
  }
  const ca = new X509Certificate(opts.caPem);
  if (!cert.checkIssued(ca) || !cert.verify(ca.publicKey)) throw new PermissionDeniedError("the bundle is signed by a certificate this mesh's CA did not issue");
  const now = opts.clock.now();
  if (now < Date.parse(cert.validFrom) || now > Date.parse(cert.validTo)) throw new PermissionDeniedError("the bundle's signer certificate is not valid now");
  const signer = identityFromCertificate(cert);
  if (signer.role !== opts.signerRole) throw new PermissionDeniedError(`the bundle is signed by a ${signer.role}; only a ${opts.signerRole} may sign this kind of bundle`);
  if (!verify("sha256", bundle.payload, cert.publicKey, bundle.signature)) {
    throw new PermissionDeniedError("the bundle's signature does not match its content: it was altered after signing");
  }
  const payload = fromBinary(BundlePayloadSchema, bundle.payload);
  if (payload.kind !== opts.kind) throw new InvalidArgumentError(`this is a ${BundleKind[payload.kind]} bundle; a ${BundleKind[opts.kind]} bundle is expected here`);
  if (opts.signerRole === "proxy" && payload.region !== signer.scope) throw new PermissionDeniedError(`a proxy of region ${signer.scope} cannot sign results for region ${payload.region}`);
  return { payload, signer };
}
