import { createHash, createPublicKey, sign, verify, X509Certificate, type KeyObject } from "node:crypto";
import forge from "node-forge";
import { InvalidArgumentError, PermissionDeniedError, UnauthenticatedError } from "../common/errors.js";
import { LIMITS } from "../common/limits.js";
import { identityFromCertificate, type PeerIdentity } from "./identity.js";

/**
 * What both ends of enrollment share: the CSR a new host sends, and the
 * proof that a request was made by the holder of a zero certificate when
 * TLS cannot show that certificate end to end (the request went through a
 * proxy). See docs/enrollment.md.
 */


/** A PKCS#10 request for the host's own key (ECDSA P-256 or RSA); the controller uses only its public key. */
export function createCsr(hostId: string, keys: { publicKeyPem: string; privateKeyPem: string }): string {
  if (createPublicKey(keys.publicKeyPem).asymmetricKeyType === "ec") return createEcCsr(hostId, keys);
  const csr = forge.pki.createCertificationRequest();
  csr.publicKey = forge.pki.publicKeyFromPem(keys.publicKeyPem);
  csr.setSubject([{ name: "commonName", value: hostId }]);
  csr.sign(forge.pki.privateKeyFromPem(keys.privateKeyPem), forge.md.sha256.create());
  return forge.pki.certificationRequestToPem(csr);
}

/**
 * The same for an ECDSA key, which node-forge cannot encode: the request is
 * put together with forge's DER writer and signed by OpenSSL
 * (ecdsa-with-SHA256, the signature DER-encoded as X.509 wants it).
 */
function createEcCsr(hostId: string, keys: { publicKeyPem: string; privateKeyPem: string }): string {
  const asn1 = forge.asn1;
  const { UNIVERSAL } = asn1.Class;
  const spki = createPublicKey(keys.publicKeyPem).export({ type: "spki", format: "der" }).toString("binary");
  const name = asn1.create(UNIVERSAL, asn1.Type.SEQUENCE, true, [
    asn1.create(UNIVERSAL, asn1.Type.SET, true, [
      asn1.create(UNIVERSAL, asn1.Type.SEQUENCE, true, [
        asn1.create(UNIVERSAL, asn1.Type.OID, false, asn1.oidToDer(forge.pki.oids.commonName!).getBytes()),
        asn1.create(UNIVERSAL, asn1.Type.UTF8, false, forge.util.encodeUtf8(hostId)),
      ]),
    ]),
  ]);
  const info = asn1.create(UNIVERSAL, asn1.Type.SEQUENCE, true, [
    asn1.create(UNIVERSAL, asn1.Type.INTEGER, false, "\0"),
    name,
    (asn1.fromDer as unknown as (der: string, options: { decodeBitStrings: boolean }) => forge.asn1.Asn1)(spki, { decodeBitStrings: false }),
    asn1.create(asn1.Class.CONTEXT_SPECIFIC, 0, true, []),
  ]);
  const infoDer = Buffer.from(asn1.toDer(info).getBytes(), "binary");
  const signature = sign("sha256", infoDer, keys.privateKeyPem).toString("binary");
  const request = asn1.create(UNIVERSAL, asn1.Type.SEQUENCE, true, [
    info,
    asn1.create(UNIVERSAL, asn1.Type.SEQUENCE, true, [asn1.create(UNIVERSAL, asn1.Type.OID, false, asn1.oidToDer(ECDSA_WITH_SHA256_OID).getBytes())]),
    asn1.create(UNIVERSAL, asn1.Type.BITSTRING, false, "\0" + signature),
  ]);
  return forge.pem.encode({ type: "CERTIFICATE REQUEST", body: asn1.toDer(request).getBytes() }, { maxline: 64 });
}

const ECDSA_WITH_SHA256_OID = "1.2.840.10045.4.3.2";

/** SHA-256 of the key's SubjectPublicKeyInfo, hex: how the controller recognises a machine. */
export function keyFingerprint(publicKeyPem: string): string {
  return createHash("sha256").update(createPublicKey(publicKeyPem).export({ type: "spki", format: "der" })).digest("hex");
}

/**
 * Reads a CSR sent by an unauthenticated caller and checks its
 * self-signature, which proves that the sender holds the private key of the
 * public key it asks to certify. Nothing costly happens before the key is
 * judged: the size of the text, then the DER structure, then the key's type
 * and size (ECDSA P-256 with an uncompressed point, or RSA of
 * {@link LIMITS.rsaMinBits}–{@link LIMITS.rsaMaxBits} bits with exponent
 * 65537) read from its encoding; only then is the signature checked,
 * natively (OpenSSL). A pure-JS check of a 16384-bit modulus and
 * exponent once blocked the controller for about a minute.
 */
export function readCsr(csrPem: string): { publicKeyPem: string; fingerprint: string } {
  if (typeof csrPem !== "string" || csrPem.length > LIMITS.csrBytes || Buffer.byteLength(csrPem) > LIMITS.csrBytes) {
    throw new InvalidArgumentError(`the CSR is larger than ${LIMITS.csrBytes} bytes`);
  }
  const der = pemBody(csrPem);
  const csr = parseCsrDer(der);
  const ec = checkKey(der, csr.spki);
  const hash = (ec ? ECDSA_HASHES : SIGNATURE_HASHES).get(der.subarray(csr.sigAlg.start, csr.sigAlg.end).toString("hex"));
  if (!hash) throw new InvalidArgumentError(ec ? "a CSR for an ECDSA key must be signed with ecdsa-with-SHA256 (or SHA-384/512)" : "the CSR must be signed with sha256WithRSAEncryption (or SHA-384/512 with RSA)");
  let key: KeyObject;
  try {
    key = createPublicKey({ key: der.subarray(csr.spki.start, csr.spki.end), format: "der", type: "spki" });
  } catch (cause) {
    throw new InvalidArgumentError("the CSR's public key cannot be read", { cause });
  }
  let valid = false;
  try {
    valid = verify(hash, der.subarray(csr.info.start, csr.info.end), key, csr.signature);
  } catch {
    valid = false;
  }
  if (!valid) throw new InvalidArgumentError("the CSR's signature does not match its public key");
  const spkiDer = key.export({ type: "spki", format: "der" });
  return { publicKeyPem: key.export({ type: "spki", format: "pem" }).toString(), fingerprint: createHash("sha256").update(spkiDer).digest("hex") };
}

const NOT_A_CSR = "csr_pem is not a PEM PKCS#10 certificate request";
const PEM = /^-----BEGIN (NEW )?CERTIFICATE REQUEST-----\r?\n([A-Za-z0-9+/=\r\n]+)-----END (NEW )?CERTIFICATE REQUEST-----\s*$/;

function pemBody(pem: string): Buffer {
  const m = PEM.exec(pem.trimStart());
  if (!m) throw new InvalidArgumentError(NOT_A_CSR);
  const b64 = m[2]!.replace(/[\r\n]/g, "");
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(b64) || b64.length % 4 !== 0) throw new InvalidArgumentError(`${NOT_A_CSR} (bad base64)`);
  return Buffer.from(b64, "base64");
}

/** One DER element: its tag, and where it and its content start and end in the buffer. */
interface Tlv {
  tag: number;
  start: number;
  content: number;
  end: number;
}

/** Reads the element at `at`, which must end by `limit`: definite, minimal lengths only (DER, not BER). */
function readTlv(der: Buffer, at: number, limit: number): Tlv {
  const bad = (why: string): never => {
    throw new InvalidArgumentError(`${NOT_A_CSR} (${why} at byte ${at})`);
  };
  if (at + 2 > limit) bad("truncated");
  const tag = der[at]!;
  if ((tag & 0x1f) === 0x1f) bad("unexpected tag");
  let len = der[at + 1]!;
  let p = at + 2;
  if (len & 0x80) {
    const n = len & 0x7f;
    if (n === 0) bad("indefinite length");
    if (n > 3) bad("length too large");
    if (p + n > limit) bad("truncated");
    if (der[p] === 0) bad("non-minimal length");
    len = 0;
    for (let i = 0; i < n; i++) len = len * 256 + der[p++]!;
    if (len < 0x80) bad("non-minimal length");
  }
  if (p + len > limit) bad("truncated");
  return { tag, start: at, content: p, end: p + len };
}

/** The elements inside a constructed element, which must fill it exactly. */
function children(der: Buffer, parent: Tlv): Tlv[] {
  const out: Tlv[] = [];
  for (let at = parent.content; at < parent.end; ) {
    const t = readTlv(der, at, parent.end);
    out.push(t);
    at = t.end;
  }
  return out;
}

const SEQUENCE = 0x30;
const INTEGER = 0x02;
const BIT_STRING = 0x03;
const NULL = 0x05;
const OID = 0x06;
const CONTEXT_0 = 0xa0;

function expectTag(t: Tlv | undefined, tag: number, what: string): Tlv {
  if (!t || t.tag !== tag) throw new InvalidArgumentError(`${NOT_A_CSR} (${what} expected)`);
  return t;
}

/**
 * CertificationRequest ::= SEQUENCE { info SEQUENCE { version, subject,
 * subjectPKInfo, [0] attributes }, signatureAlgorithm, signature BIT STRING }
 * (RFC 2986), located without interpreting anything costly.
 */
function parseCsrDer(der: Buffer): { info: Tlv; spki: Tlv; sigAlg: Tlv; signature: Buffer } {
  const outer = expectTag(readTlv(der, 0, der.length), SEQUENCE, "a SEQUENCE");
  if (outer.end !== der.length) throw new InvalidArgumentError(`${NOT_A_CSR} (bytes after the request)`);
  const [info, sigAlg, sig, ...rest] = children(der, outer);
  if (rest.length > 0) throw new InvalidArgumentError(`${NOT_A_CSR} (unexpected fields)`);
  expectTag(info, SEQUENCE, "certificationRequestInfo");
  expectTag(sigAlg, SEQUENCE, "signatureAlgorithm");
  expectTag(sig, BIT_STRING, "signature");
  const [version, subject, spki, attributes, ...more] = children(der, info!);
  expectTag(version, INTEGER, "version");
  if (version!.end - version!.content !== 1 || der[version!.content] !== 0) throw new InvalidArgumentError(`${NOT_A_CSR} (version must be 0)`);
  expectTag(subject, SEQUENCE, "subject");
  expectTag(spki, SEQUENCE, "subjectPKInfo");
  if ((attributes && attributes.tag !== CONTEXT_0) || more.length > 0) throw new InvalidArgumentError(`${NOT_A_CSR} (unexpected fields)`);
  if (sig!.end - sig!.content < 2 || der[sig!.content] !== 0) throw new InvalidArgumentError(`${NOT_A_CSR} (malformed signature)`);
  return { info: info!, spki: spki!, sigAlg: sigAlg!, signature: der.subarray(sig!.content + 1, sig!.end) };
}

/** DER of the OIDs, hex, with a NULL parameter: what forge and OpenSSL write. */
const RSA_ENCRYPTION = "06092a864886f70d010101";
const SIGNATURE_HASHES = new Map([
  ["300d06092a864886f70d01010b0500", "sha256"],
  ["300d06092a864886f70d01010c0500", "sha384"],
  ["300d06092a864886f70d01010d0500", "sha512"],
  ["300b06092a864886f70d01010b", "sha256"],
  ["300b06092a864886f70d01010c", "sha384"],
  ["300b06092a864886f70d01010d", "sha512"],
]);

/** id-ecPublicKey with the named curve prime256v1, DER. */
const EC_P256 = "06072a8648ce3d020106082a8648ce3d030107";
const ECDSA_HASHES = new Map([
  ["300a06082a8648ce3d040302", "sha256"],
  ["300a06082a8648ce3d040303", "sha384"],
  ["300a06082a8648ce3d040304", "sha512"],
]);

/**
 * The key must be ECDSA P-256 (an uncompressed point: OpenSSL checks that it
 * is on the curve when the key is read) or RSA with a modulus of the allowed
 * size and exponent 65537, judged from the encoding alone. True for ECDSA.
 */
function checkKey(der: Buffer, spki: Tlv): boolean {
  const wrongKey = () =>
    new InvalidArgumentError(`the CSR's key must be an ECDSA P-256 key or an RSA key of ${LIMITS.rsaMinBits} to ${LIMITS.rsaMaxBits} bits with public exponent ${LIMITS.rsaExponent}`);
  const [alg, bits, ...rest] = children(der, spki);
  if (rest.length > 0 || !alg || alg.tag !== SEQUENCE || !bits || bits.tag !== BIT_STRING) throw new InvalidArgumentError(`${NOT_A_CSR} (malformed subjectPKInfo)`);
  if (der.subarray(alg.content, alg.end).toString("hex") === EC_P256) {
    // 0 unused bits, then 04 || X || Y.
    if (bits.end - bits.content !== 66 || der[bits.content] !== 0 || der[bits.content + 1] !== 4) throw wrongKey();
    return true;
  }
  const [oid, params, ...extra] = children(der, alg);
  if (!oid || oid.tag !== OID || der.subarray(oid.start, oid.end).toString("hex") !== RSA_ENCRYPTION) throw wrongKey();
  if (extra.length > 0 || (params && (params.tag !== NULL || params.end !== params.content))) throw wrongKey();
  if (bits.end - bits.content < 2 || der[bits.content] !== 0) throw wrongKey();
  const inner = readTlv(der, bits.content + 1, bits.end);
  if (inner.tag !== SEQUENCE || inner.end !== bits.end) throw wrongKey();
  const [n, e, ...others] = children(der, inner);
  if (!n || n.tag !== INTEGER || !e || e.tag !== INTEGER || others.length > 0) throw wrongKey();
  const modulusBits = positiveBits(der, n);
  if (modulusBits < LIMITS.rsaMinBits || modulusBits > LIMITS.rsaMaxBits) throw wrongKey();
  if (e.end - e.content > 4 || positiveBits(der, e) === 0 || der.readUIntBE(e.content, e.end - e.content) !== LIMITS.rsaExponent) throw wrongKey();
  return false;
}

/** Bit length of a positive, minimally encoded INTEGER; 0 for anything else. */
function positiveBits(der: Buffer, t: Tlv): number {
  let start = t.content;
  const len = t.end - start;
  if (len === 0 || der[start]! & 0x80) return 0;
  if (der[start] === 0) {
    if (len === 1 || !(der[start + 1]! & 0x80)) return 0;
    start++;
  }
  return (t.end - start - 1) * 8 + (32 - Math.clz32(der[start]!));
}

/**
 * The bytes a zero certificate's key signs: the host id, the tenant asked
 * for and the CSR, so a relaying proxy can neither change them nor reuse
 * the signature for another host or key.
 */
function enrollmentPayload(hostId: string, tenant: string, csrPem: string): Buffer {
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
