import { createHash, createPrivateKey, createPublicKey, randomBytes, sign, type KeyObject } from "node:crypto";
import forge from "node-forge";
import type { Clock } from "../common/clock.js";
import { InvalidArgumentError } from "../common/errors.js";
import { identityUri, type PeerIdentity } from "./identity.js";

/** A certificate authority: its certificate and private key, PEM encoded. */
export interface CaMaterial {
  readonly certPem: string;
  readonly keyPem: string;
}

export { generateKeyPair, type KeyPair } from "./keys.js";

const asn1 = forge.asn1;

/** Parses DER leaving BIT STRINGs as their bytes (forge would otherwise try to read them as nested DER; its typings omit the option). */
const rawDer = (der: string): forge.asn1.Asn1 => (asn1.fromDer as unknown as (der: string, options: { decodeBitStrings: boolean }) => forge.asn1.Asn1)(der, { decodeBitStrings: false });
import { generateKeyPair, type KeyPair } from "./keys.js";

/** Certificates are valid from a little before issue, so peers with slightly slow clocks accept them. */
const BACKDATE_MS = 5 * 60 * 1000;

/**
 * A random positive serial whose first byte is 0x40–0x7f: never a leading
 * zero byte. (node-forge strips only one redundant leading zero, so a serial
 * starting 00 00 was encoded as an invalid INTEGER that OpenSSL refuses:
 * about one certificate in 65,536, found by the 50,000-host benchmark.)
 */
export function serialNumber(): string {
  const bytes = randomBytes(16);
  bytes[0] = (bytes[0]! & 0x7f) | 0x40;
  return bytes.toString("hex");
}

/**
 * Signs a certificate with sha256WithRSAEncryption using Node's native RSA:
 * forge builds the TBSCertificate, OpenSSL signs it. forge's own signing (pure
 * JS, and a fresh parse of the CA key each time) cost about 60 ms per
 * certificate; enrollment, renewal and large test meshes issue many.
 */
function signNatively(cert: forge.pki.Certificate, keyPem: string): void {
  const oid = forge.pki.oids.sha256WithRSAEncryption!;
  cert.signatureOid = oid;
  (cert as unknown as { siginfo: { algorithmOid: string } }).siginfo.algorithmOid = oid;
  const tbs = forge.asn1.toDer((forge.pki as unknown as { getTBSCertificate(c: forge.pki.Certificate): forge.asn1.Asn1 }).getTBSCertificate(cert)).getBytes();
  cert.signature = sign("sha256", Buffer.from(tbs, "binary"), privateKeyObject(keyPem)).toString("binary");
}

const keyObjects = new Map<string, KeyObject>();
function privateKeyObject(pem: string): KeyObject {
  let key = keyObjects.get(pem);
  if (!key) {
    key = createPrivateKey(pem);
    if (keyObjects.size > 16) keyObjects.clear();
    keyObjects.set(pem, key);
  }
  return key;
}

const caCerts = new Map<string, { cert: forge.pki.Certificate; keyIdentifier: string }>();
function parsedCaCert(pem: string): { cert: forge.pki.Certificate; keyIdentifier: string } {
  let entry = caCerts.get(pem);
  if (!entry) {
    const cert = forge.pki.certificateFromPem(pem);
    entry = { cert, keyIdentifier: cert.generateSubjectKeyIdentifier().getBytes() };
    if (caCerts.size > 16) caCerts.clear();
    caCerts.set(pem, entry);
  }
  return entry;
}

export interface CreateCaOptions {
  clock: Clock;
  commonName?: string;
  validityDays?: number;
  /** The CA's key pair (RSA, 3072 bits or more); a new 3072-bit one by default. Given when keys are made ahead, several at once. */
  keys?: KeyPair;
}

/** Creates a self-signed CA that may sign leaf certificates only (pathLen 0). */
export function createCa(opts: CreateCaOptions): CaMaterial {
  const keys = opts.keys ?? generateKeyPair(3072);
  const publicKey = forge.pki.publicKeyFromPem(keys.publicKeyPem);
  const cert = forge.pki.createCertificate();
  const now = opts.clock.now();
  cert.publicKey = publicKey;
  cert.serialNumber = serialNumber();
  cert.validity.notBefore = new Date(now - BACKDATE_MS);
  cert.validity.notAfter = new Date(now + (opts.validityDays ?? 3650) * 86_400_000);
  const subject = [
    { name: "commonName", value: opts.commonName ?? "rexmesh CA" },
    { name: "organizationName", value: "rexmesh" },
  ];
  cert.setSubject(subject);
  cert.setIssuer(subject);
  cert.setExtensions([
    { name: "basicConstraints", cA: true, pathLenConstraint: 0, critical: true },
    { name: "keyUsage", keyCertSign: true, cRLSign: true, critical: true },
    { name: "subjectKeyIdentifier" },
  ]);
  signNatively(cert, keys.privateKeyPem);
  return { certPem: forge.pki.certificateToPem(cert), keyPem: keys.privateKeyPem };
}

export interface IssueOptions {
  clock: Clock;
  identity: PeerIdentity;
  /** The subject's public key; the CA never sees the subject's private key. */
  publicKeyPem: string;
  validityMs: number;
  /** DNS names and IP addresses for roles that also serve (controller, proxy). */
  dnsNames?: readonly string[];
  ipAddresses?: readonly string[];
}

/**
 * Issues a leaf certificate naming exactly one rexmesh identity. Leaves can
 * never sign (cA false), so a stolen host key cannot mint identities.
 */
export function issueCertificate(ca: CaMaterial, opts: IssueOptions): string {
  if (!(opts.validityMs > 0)) throw new InvalidArgumentError("certificate validity must be positive");
  const caCert = parsedCaCert(ca.certPem);
  const subject = subjectKey(opts.publicKeyPem);
  const cert = forge.pki.createCertificate();
  const now = opts.clock.now();
  // forge encodes RSA keys only: it builds the TBSCertificate around a stand-in (the CA's own key), and the
  // subject's SubjectPublicKeyInfo, whatever its type, takes the stand-in's place below.
  cert.publicKey = caCert.cert.publicKey;
  cert.serialNumber = serialNumber();
  cert.validity.notBefore = new Date(now - BACKDATE_MS);
  cert.validity.notAfter = new Date(now + opts.validityMs);
  const uri = identityUri(opts.identity);
  cert.setSubject([
    { name: "commonName", value: `${opts.identity.role}/${opts.identity.scope}/${opts.identity.id}` },
    { name: "organizationName", value: "rexmesh" },
  ]);
  cert.setIssuer(caCert.cert.subject.attributes);
  const altNames: object[] = [{ type: 6, value: uri }];
  for (const dns of opts.dnsNames ?? []) altNames.push({ type: 2, value: dns });
  for (const ip of opts.ipAddresses ?? []) altNames.push({ type: 7, ip });
  cert.setExtensions([
    { name: "basicConstraints", cA: false, critical: true },
    { name: "keyUsage", digitalSignature: true, keyEncipherment: true, critical: true },
    { name: "extKeyUsage", serverAuth: true, clientAuth: true },
    { name: "subjectAltName", altNames },
    { name: "subjectKeyIdentifier", value: asn1.create(asn1.Class.UNIVERSAL, asn1.Type.OCTETSTRING, false, subject.keyIdentifier) },
    { name: "authorityKeyIdentifier", keyIdentifier: caCert.keyIdentifier },
  ]);
  const oid = forge.pki.oids.sha256WithRSAEncryption!;
  cert.signatureOid = oid;
  (cert as unknown as { siginfo: { algorithmOid: string } }).siginfo.algorithmOid = oid;
  const tbs = (forge.pki as unknown as { getTBSCertificate(c: forge.pki.Certificate): forge.asn1.Asn1 }).getTBSCertificate(cert);
  const fields = tbs.value as forge.asn1.Asn1[];
  // TBSCertificate: [0] version, serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo, [3] extensions.
  if (fields.length !== 8 || fields[6]!.type !== asn1.Type.SEQUENCE) throw new Error("unexpected TBSCertificate layout from node-forge");
  fields[6] = rawDer(subject.spki);
  const tbsDer = asn1.toDer(tbs).getBytes();
  const signature = sign("sha256", Buffer.from(tbsDer, "binary"), privateKeyObject(ca.keyPem)).toString("binary");
  const algorithm = asn1.create(asn1.Class.UNIVERSAL, asn1.Type.SEQUENCE, true, [
    asn1.create(asn1.Class.UNIVERSAL, asn1.Type.OID, false, asn1.oidToDer(oid).getBytes()),
    asn1.create(asn1.Class.UNIVERSAL, asn1.Type.NULL, false, ""),
  ]);
  const certificate = asn1.create(asn1.Class.UNIVERSAL, asn1.Type.SEQUENCE, true, [tbs, algorithm, asn1.create(asn1.Class.UNIVERSAL, asn1.Type.BITSTRING, false, "\0" + signature)]);
  return forge.pem.encode({ type: "CERTIFICATE", body: asn1.toDer(certificate).getBytes() }, { maxline: 64 });
}

/**
 * The subject's SubjectPublicKeyInfo (DER, as a binary string for forge) and
 * its key identifier: SHA-1 of the subjectPublicKey bits (RFC 5280 4.2.1.2,
 * method 1, as forge computes it for RSA keys). RSA and ECDSA P-256 only.
 */
function subjectKey(publicKeyPem: string): { spki: string; keyIdentifier: string } {
  let key: KeyObject;
  try {
    key = createPublicKey(publicKeyPem);
  } catch (cause) {
    throw new InvalidArgumentError("the subject's public key cannot be read", { cause });
  }
  const ec = key.asymmetricKeyType === "ec" && key.asymmetricKeyDetails?.namedCurve === "prime256v1";
  if (key.asymmetricKeyType !== "rsa" && !ec) throw new InvalidArgumentError("the subject's key must be RSA or ECDSA P-256");
  const spki = key.export({ type: "spki", format: "der" }).toString("binary");
  const bits = (rawDer(spki).value as forge.asn1.Asn1[])[1]!.value as string;
  const keyIdentifier = createHash("sha1").update(Buffer.from(bits.slice(1), "binary")).digest().toString("binary");
  return { spki, keyIdentifier };
}

/**
 * Generates a key pair and issues its certificate in one step, for tools that
 * create identities on behalf of peers (`rexmesh ca issue`, `rexmesh dev`).
 * Enrolment over the network instead sends only a CSR.
 */
export function issueKeyAndCertificate(
  ca: CaMaterial,
  opts: Omit<IssueOptions, "publicKeyPem">,
): { certPem: string; keyPem: string; caPem: string } {
  const keys = generateKeyPair();
  const certPem = issueCertificate(ca, { ...opts, publicKeyPem: keys.publicKeyPem });
  return { certPem, keyPem: keys.privateKeyPem, caPem: ca.certPem };
}
