import { createHash, createPublicKey, sign, verify, X509Certificate } from "node:crypto";
import forge from "node-forge";
import { InvalidArgumentError, PermissionDeniedError, UnauthenticatedError } from "../common/errors.js";
import { identityFromCertificate, type PeerIdentity } from "./identity.js";

/**
 * What both ends of enrollment share: the CSR a new host sends, and the
 * proof that a request was made by the holder of a zero certificate when
 * TLS cannot show that certificate end to end (the request went through a
 * proxy). See docs/enrollment.md.
 */

/** Larger CSRs are refused before parsing: they come from unauthenticated callers. */
export const MAX_CSR_BYTES = 16 * 1024;
const MIN_RSA_BITS = 2048;

/** A PKCS#10 request for the host's own key; the controller uses only its public key. */
export function createCsr(hostId: string, keys: { publicKeyPem: string; privateKeyPem: string }): string {
  const csr = forge.pki.createCertificationRequest();
  csr.publicKey = forge.pki.publicKeyFromPem(keys.publicKeyPem);
  csr.setSubject([{ name: "commonName", value: hostId }]);
  csr.sign(forge.pki.privateKeyFromPem(keys.privateKeyPem), forge.md.sha256.create());
  return forge.pki.certificationRequestToPem(csr);
}

/** SHA-256 of the key's SubjectPublicKeyInfo, hex: how the controller recognises a machine. */
export function keyFingerprint(publicKeyPem: string): string {
  return createHash("sha256").update(createPublicKey(publicKeyPem).export({ type: "spki", format: "der" })).digest("hex");
}

/**
 * Parses a CSR and checks its self-signature, which proves that the sender
 * holds the private key of the public key it asks to certify.
 */
export function readCsr(csrPem: string): { publicKeyPem: string; fingerprint: string } {
  if (Buffer.byteLength(csrPem) > MAX_CSR_BYTES) throw new InvalidArgumentError(`the CSR is larger than ${MAX_CSR_BYTES} bytes`);
  let csr: ReturnType<typeof forge.pki.certificationRequestFromPem>;
  try {
    csr = forge.pki.certificationRequestFromPem(csrPem);
  } catch (cause) {
    throw new InvalidArgumentError("csr_pem is not a PEM PKCS#10 certificate request with an RSA key", { cause });
  }
  let valid = false;
  try {
    valid = csr.verify();
  } catch {
    valid = false;
  }
  if (!valid || !csr.publicKey) throw new InvalidArgumentError("the CSR's signature does not match its public key");
  const key = csr.publicKey as forge.pki.rsa.PublicKey;
  if (!key.n || key.n.bitLength() < MIN_RSA_BITS) throw new InvalidArgumentError(`the CSR's key must be RSA of at least ${MIN_RSA_BITS} bits`);
  const publicKeyPem = forge.pki.publicKeyToPem(key);
  return { publicKeyPem, fingerprint: keyFingerprint(publicKeyPem) };
}

/**
 * The bytes a zero certificate's key signs: the host id, the tenant asked
 * for and the CSR, so a relaying proxy can neither change them nor reuse
 * the signature for another host or key.
 */
export function enrollmentPayload(hostId: string, tenant: string, csrPem: string): Buffer {
  return Buffer.from(`rexmesh-enroll-v1\n${hostId}\n${tenant}\n${csrPem}`, "utf8");
}

export function signEnrollment(zeroKeyPem: string, hostId: string, tenant: string, csrPem: string): Buffer {
  return sign("sha256", enrollmentPayload(hostId, tenant, csrPem), zeroKeyPem);
}

/**
 * Checks a zero certificate presented inside a request (not over TLS): it
 * must chain to the mesh CA, be valid now, be a leaf of role enroll, and
 * the signature must be its key's over this very request. Returns its
 * identity (scope = tenant).
 */
export function verifyZeroCertificate(
  opts: { certPem: string; signature: Uint8Array; caPem: string; now: number },
  request: { hostId: string; tenant: string; csrPem: string },
): PeerIdentity {
  let cert: X509Certificate;
  let ca: X509Certificate;
  try {
    cert = new X509Certificate(opts.certPem);
    ca = new X509Certificate(opts.caPem);
  } catch (cause) {
    throw new UnauthenticatedError("the bootstrap certificate is not a valid PEM certificate", { cause });
  }
  if (cert.ca || !cert.checkIssued(ca) || !cert.verify(ca.publicKey)) throw new UnauthenticatedError("the bootstrap certificate was not issued by this mesh's CA");
  if (opts.now < Date.parse(cert.validFrom) || opts.now > Date.parse(cert.validTo)) throw new UnauthenticatedError("the bootstrap certificate is not valid now (expired?)");
  const identity = identityFromCertificate(cert);
  // A host may renew itself: its current certificate is the proof, for its own id only.
  if (identity.role === "host") {
    if (identity.id !== request.hostId) throw new PermissionDeniedError(`a certificate of host ${identity.id} can renew only that host, not ${request.hostId}`);
  } else if (identity.role !== "enroll") {
    throw new PermissionDeniedError(`a ${identity.role} certificate is not a bootstrap (enroll) certificate`);
  }
  let ok = false;
  try {
    ok = verify("sha256", enrollmentPayload(request.hostId, request.tenant, request.csrPem), cert.publicKey, opts.signature);
  } catch {
    ok = false;
  }
  if (!ok) throw new UnauthenticatedError("the bootstrap signature does not match this request");
  return identity;
}
