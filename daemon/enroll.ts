import { createPrivateKey, createPublicKey, X509Certificate } from "node:crypto";
import { existsSync, mkdirSync, readFileSync } from "node:fs";
import { fromBinary, toBinary, create } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import { generateKeyPair, type KeyPair } from "../certs/keys.js";
import { credentialPaths, writeFileAtomic, type CredentialPaths } from "../certs/files.js";
import { checkSegment, identityFromCertificate } from "../certs/identity.js";
import { clientTlsOptions } from "../certs/tls.js";
import { Backoff } from "../common/backoff.js";
import type { Clock } from "../common/clock.js";
import {
  AlreadyExistsError,
  ConfigError,
  DeadlineExceededError,
  FailedPreconditionError,
  InvalidArgumentError,
  PermissionDeniedError,
  RexmeshError,
  UnauthenticatedError,
  UnavailableError,
} from "../common/errors.js";
import type { Logger } from "../common/logger.js";
import { isRetryable } from "../common/rpc-errors.js";
import { EnrollRequestSchema, EnrollService, type EnrollRequest, type EnrollResponse } from "../gen/rexmesh/v1/enroll_pb.js";

/** A bootstrap credential: a join token, or a zero certificate with its key. */
export type BootstrapCredential = { token: string } | { certPem: string; keyPem: string };

export interface EnrollOptions {
  /** Where `<host>.key`, `<host>.crt` and `ca.crt` live (the daemon's --identities directory). */
  dir: string;
  hostId: string;
  /** The tenant the host means to join; empty: the credential's. */
  tenant?: string;
  /** Proxies' (or the controller's) enroll addresses, tried in order. */
  via: readonly string[];
  /** The mesh CA, given with the bootstrap: every server is verified against it (never trust on first use). */
  caPem: string;
  credential?: BootstrapCredential;
  clock: Clock;
  log: Logger;
  /** Rounds over `via` on retryable failures before giving up; default: keep trying. */
  maxRounds?: number;
  signal?: AbortSignal;
}

/**
 * Why the files in the directory cannot be used as this host's identity
 * now, or undefined when they can.
 */
function identityProblem(paths: CredentialPaths, hostId: string, caPem: string, now: number, tenant?: string): string | undefined {
  if (!existsSync(paths.cert) || !existsSync(paths.key)) return "no certificate yet";
  try {
    const cert = new X509Certificate(readFileSync(paths.cert));
    const ca = new X509Certificate(caPem);
    if (!cert.checkIssued(ca) || !cert.verify(ca.publicKey)) return "the certificate is not from this mesh's CA";
    if (now < Date.parse(cert.validFrom) || now >= Date.parse(cert.validTo)) return "the certificate has expired";
    const id = identityFromCertificate(cert);
    if (id.role !== "host" || id.id !== hostId || (tenant && id.scope !== tenant)) return "the certificate names another identity";
    if (!cert.checkPrivateKey(createPrivateKey(readFileSync(paths.key)))) return "the key does not match the certificate";
    return undefined;
  } catch (err) {
    return `the identity files cannot be read (${(err as Error).message})`;
  }
}

/**
 * Makes sure `dir` holds a valid certificate for `hostId`: if it does not,
 * uses the bootstrap credential to enroll. The key is generated here and
 * never leaves the host; it is written (mode 0600) before the request, so a
 * retry after a lost answer asks for the same key.
 */
export async function ensureEnrolled(opts: EnrollOptions): Promise<CredentialPaths> {
  checkSegment("host id", opts.hostId);
  const paths = credentialPaths(opts.dir, opts.hostId);
  const problem = identityProblem(paths, opts.hostId, opts.caPem, opts.clock.now(), opts.tenant);
  if (problem === undefined) {
    // The agent trusts ca.crt beside the certificate; it is the CA the certificate was just checked against.
    writeFileAtomic(paths.ca, opts.caPem);
    return paths;
  }
  if (!opts.credential) throw new ConfigError(`${paths.cert}: ${problem}, and no bootstrap credential was given (--join-token, or --enroll-cert and --enroll-key)`);
  if (opts.via.length === 0) throw new ConfigError("enrollVia is required to enroll (--enroll-via HOST:PORT[,HOST:PORT...])");
  opts.log.info("enrolling", { host: opts.hostId, reason: problem, via: opts.via });
  mkdirSync(opts.dir, { recursive: true, mode: 0o700 });
  const keys = readOrCreateKey(paths.key);
  // node-forge (CSRs) is loaded only when a host actually enrolls: it is most of a daemon's idle memory otherwise.
  const { createCsr, signEnrollment } = await import("../certs/enrollment.js");
  const csrPem = createCsr(opts.hostId, keys);
  const tenant = opts.tenant ?? "";
  const request = create(EnrollRequestSchema, { hostId: opts.hostId, csrPem, tenant });
  const zero = opts.credential && "certPem" in opts.credential ? opts.credential : undefined;
  if (zero) {
    request.bootstrapCertificatePem = zero.certPem;
    request.bootstrapSignature = signEnrollment(zero.keyPem, opts.hostId, tenant, csrPem);
  } else if (opts.credential && "token" in opts.credential) {
    request.token = opts.credential.token;
  }
  const response = await enrollWithRetries(opts, request, zero);
  const certPem = checkIssued(response, opts, keys);
  writeFileAtomic(paths.ca, opts.caPem);
  writeFileAtomic(paths.cert, certPem);
  opts.log.info("enrolled", { host: opts.hostId, cert: paths.cert, notAfter: response.notAfter ? new Date(Number(response.notAfter.seconds) * 1000).toISOString() : undefined });
  return paths;
}

function readOrCreateKey(path: string): KeyPair {
  if (existsSync(path)) {
    try {
      const privateKeyPem = readFileSync(path, "utf8");
      const publicKeyPem = createPublicKey(createPrivateKey(privateKeyPem)).export({ type: "spki", format: "pem" }).toString();
      return { privateKeyPem, publicKeyPem };
    } catch {
      // An unreadable key is replaced: the host id will then need an operator's bound token.
    }
  }
  const keys = generateKeyPair();
  writeFileAtomic(path, keys.privateKeyPem, 0o600);
  return keys;
}

/** The certificate must be for our key, our host id, and from the CA we were given. */
function checkIssued(response: EnrollResponse, opts: EnrollOptions, keys: KeyPair): string {
  const cert = new X509Certificate(response.certificatePem);
  const ca = new X509Certificate(opts.caPem);
  if (!cert.checkIssued(ca) || !cert.verify(ca.publicKey)) throw new UnauthenticatedError("the enrollment answer holds a certificate not issued by the mesh CA");
  const id = identityFromCertificate(cert);
  if (id.role !== "host" || id.id !== opts.hostId) throw new PermissionDeniedError(`the enrollment answer names ${id.role}/${id.scope}/${id.id}, not this host`);
  const ours = createPublicKey(keys.publicKeyPem).export({ type: "spki", format: "der" });
  if (!cert.publicKey.export({ type: "spki", format: "der" }).equals(ours)) throw new PermissionDeniedError("the enrollment answer certifies another key");
  return response.certificatePem;
}

async function enrollWithRetries(opts: EnrollOptions, request: EnrollRequest, zero: { certPem: string; keyPem: string } | undefined): Promise<EnrollResponse> {
  const backoff = new Backoff({ initialMs: 1000, maxMs: 60_000 });
  for (let round = 1; ; round++) {
    let last: RexmeshError | undefined;
    for (const address of opts.via) {
      try {
        return await requestEnrollment(address, opts.caPem, request, zero, opts.signal);
      } catch (err) {
        const e = domainError(err, address);
        if (!isRetryable(codeOfGrpc(err))) throw e;
        opts.log.warn("enrollment attempt failed", { via: address, err: e.message });
        last = e;
      }
    }
    if (opts.maxRounds !== undefined && round >= opts.maxRounds) throw last ?? new UnavailableError("enrollment failed");
    await opts.clock.sleep(backoff.next(), opts.signal);
  }
}

/**
 * One Enroll call over its own grpc-js channel. The server must be a proxy
 * or the controller of the mesh CA given; the zero certificate, if any, is
 * presented too (the controller's main port asks for one).
 */
export function requestEnrollment(
  address: string,
  caPem: string,
  request: EnrollRequest,
  zero?: { certPem: string; keyPem: string },
  signal?: AbortSignal,
  timeoutMs = 30_000,
): Promise<EnrollResponse> {
  const { checkServerIdentity } = clientTlsOptions({ caPem, certPem: "", keyPem: "" }, ["proxy", "controller"]);
  const credentials = grpc.credentials.createSsl(Buffer.from(caPem), zero ? Buffer.from(zero.keyPem) : null, zero ? Buffer.from(zero.certPem) : null, { checkServerIdentity });
  // Its own subchannel pool: closing the client closes the connection at once (an open enroll listener counts
  // connections per address, and a shared pool would keep this one open for the next caller).
  const client = new grpc.Client(address, credentials, { "grpc.max_receive_message_length": 1 << 20, "grpc.use_local_subchannel_pool": 1 });
  const m = EnrollService.method.enroll;
  let onAbort: (() => void) | undefined;
  return new Promise<EnrollResponse>((resolve, reject) => {
    const call = client.makeUnaryRequest(
      `/${EnrollService.typeName}/${m.name}`,
      (x: EnrollRequest) => Buffer.from(toBinary(m.input, x)),
      (b: Buffer) => fromBinary(m.output, b),
      request,
      { deadline: Date.now() + timeoutMs },
      (err, res) => (err ? reject(err) : resolve(res!)),
    );
    onAbort = () => call.cancel();
    signal?.addEventListener("abort", onAbort, { once: true });
  }).finally(() => {
    // The signal outlives the call (one per process, shared by every host's renewals): leave no listener on it.
    if (onAbort) signal?.removeEventListener("abort", onAbort);
    client.close();
  });
}

function codeOfGrpc(err: unknown): number {
  const c = (err as { code?: unknown })?.code;
  return typeof c === "number" ? c : grpc.status.UNKNOWN;
}

/** A grpc-js status from an enrollment call, as the domain error a daemon's start fails with. */
function domainError(err: unknown, address: string): RexmeshError {
  const code = codeOfGrpc(err);
  const details = (err as { details?: string })?.details ?? String(err);
  const message = `enrollment via ${address}: ${details}`;
  switch (code) {
    case grpc.status.PERMISSION_DENIED:
      return new PermissionDeniedError(message, { cause: err });
    case grpc.status.UNAUTHENTICATED:
      return new UnauthenticatedError(message, { cause: err });
    case grpc.status.INVALID_ARGUMENT:
      return new InvalidArgumentError(message, { cause: err });
    case grpc.status.FAILED_PRECONDITION:
      return new FailedPreconditionError(message, { cause: err });
    case grpc.status.ALREADY_EXISTS:
      return new AlreadyExistsError(message, { cause: err });
    case grpc.status.DEADLINE_EXCEEDED:
      return new DeadlineExceededError(message, { cause: err });
    default:
      return new UnavailableError(message, { cause: err });
  }
}
