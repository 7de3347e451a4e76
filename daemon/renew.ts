import { createPrivateKey, createPublicKey, X509Certificate } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { readCredentials, writeFileAtomic, type CredentialPaths } from "../certs/files.js";
import { identityFromCertificate } from "../certs/identity.js";
import { Backoff } from "../common/backoff.js";
import type { Clock } from "../common/clock.js";
import type { Logger } from "../common/logger.js";
import { EnrollRequestSchema } from "../gen/rexmesh/v1/enroll_pb.js";
import { requestEnrollment } from "./enroll.js";

export interface RenewOptions {
  paths: CredentialPaths;
  /** Proxies of the host's region (their main, mTLS address). */
  proxies: readonly string[];
  /** Renew this long before the certificate expires. */
  renewBeforeMs: number;
  clock: Clock;
  log: Logger;
  signal: AbortSignal;
}

/** When to renew: renewBefore ahead of expiry, but never in the first half of a short lifetime. */
export function renewalTime(notBefore: number, notAfter: number, renewBeforeMs: number): number {
  return Math.max(notAfter - renewBeforeMs, notBefore + (notAfter - notBefore) / 2);
}

/**
 * Keeps a host's certificate fresh: well before it expires, the host proves
 * it holds the current one (signing the request with its key), sends a CSR
 * for the same key over its authenticated link to a proxy, and swaps the
 * certificate file in one atomic rename. The running stream is untouched,
 * so no task or output is dropped; the next connection uses the new
 * certificate. A certificate that expired while the host was away can only
 * be replaced by enrolling again with a new bootstrap credential.
 */
export async function keepRenewed(opts: RenewOptions): Promise<void> {
  const backoff = new Backoff({ initialMs: 2000, maxMs: 60_000 });
  let i = 0;
  while (!opts.signal.aborted) {
    const creds = readCredentials(opts.paths);
    const cert = new X509Certificate(creds.certPem);
    const notAfter = Date.parse(cert.validTo);
    const at = renewalTime(Date.parse(cert.validFrom), notAfter, opts.renewBeforeMs);
    try {
      await opts.clock.sleep(Math.max(0, at - opts.clock.now()), opts.signal);
    } catch {
      return;
    }
    if (opts.clock.now() >= notAfter) {
      opts.log.error("the host certificate expired before it could be renewed: enroll again with a new bootstrap credential");
      return;
    }
    const me = identityFromCertificate(cert);
    const publicKeyPem = createPublicKey(creds.keyPem).export({ type: "spki", format: "pem" }).toString();
    const { createCsr, signEnrollment } = await import("../certs/enrollment.js"); // node-forge, only when renewing
    const csrPem = createCsr(me.id, { publicKeyPem, privateKeyPem: creds.keyPem });
    const request = create(EnrollRequestSchema, {
      hostId: me.id,
      tenant: me.scope,
      csrPem,
      bootstrapCertificatePem: creds.certPem,
      bootstrapSignature: signEnrollment(creds.keyPem, me.id, me.scope, csrPem),
    });
    const address = opts.proxies[i++ % opts.proxies.length]!;
    try {
      const res = await requestEnrollment(address, creds.caPem, request, { certPem: creds.certPem, keyPem: creds.keyPem }, opts.signal);
      const issued = new X509Certificate(res.certificatePem);
      if (!issued.checkIssued(new X509Certificate(creds.caPem)) || identityFromCertificate(issued).id !== me.id || !issued.checkPrivateKey(createPrivateKey(creds.keyPem))) {
        throw new Error("the renewed certificate does not match this host and key");
      }
      writeFileAtomic(opts.paths.cert, res.certificatePem);
      backoff.reset();
      opts.log.info("host certificate renewed", { host: me.id, notAfter: issued.validTo, serial: issued.serialNumber });
    } catch (err) {
      if (opts.signal.aborted) return;
      const delay = backoff.next();
      opts.log.warn("certificate renewal failed; retrying", { host: me.id, proxy: address, retryInMs: delay, err });
      try {
        await opts.clock.sleep(delay, opts.signal);
      } catch {
        return;
      }
    }
  }
}
