import { checkServerIdentity as defaultCheckServerIdentity, type PeerCertificate, type TLSSocket } from "node:tls";
import { UnauthenticatedError } from "../common/errors.js";
import type { Credentials } from "./files.js";
import { identityFromCertificate, requireRole, type PeerIdentity, type Role } from "./identity.js";

/**
 * TLS options for every rexmesh server: a client certificate signed by the
 * mesh CA is required, so plain TLS clients and certificates from other CAs
 * fail during the handshake, before any request is read.
 */
export function serverTlsOptions(creds: Credentials) {
  return {
    cert: creds.certPem,
    key: creds.keyPem,
    ca: creds.caPem,
    requestCert: true,
    rejectUnauthorized: true,
    minVersion: "TLSv1.3" as const,
  };
}

/**
 * TLS options for dialling a rexmesh server. Besides the usual chain and
 * host-name checks, the server must present the role the caller expects, so
 * that a stolen host certificate cannot pose as a proxy or controller.
 */
export function clientTlsOptions(creds: Credentials, serverRoles: readonly Role[]) {
  return {
    cert: creds.certPem,
    key: creds.keyPem,
    ca: creds.caPem,
    minVersion: "TLSv1.3" as const,
    checkServerIdentity(host: string, cert: PeerCertificate): Error | undefined {
      const err = defaultCheckServerIdentity(host, cert);
      if (err) return err;
      try {
        requireRole(identityFromCertificate(cert), ...serverRoles);
        return undefined;
      } catch (e) {
        return e instanceof Error ? e : new Error(String(e));
      }
    },
  };
}

/** The verified identity of the peer on a TLS socket. */
export function peerIdentity(socket: TLSSocket): PeerIdentity {
  if (!socket.authorized) throw new UnauthenticatedError("the client did not present a valid certificate");
  const cert = socket.getPeerCertificate();
  if (!cert || Object.keys(cert).length === 0) throw new UnauthenticatedError("the client presented no certificate");
  return identityFromCertificate(cert);
}
