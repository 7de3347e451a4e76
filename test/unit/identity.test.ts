import { X509Certificate, createPrivateKey } from "node:crypto";
import type { PeerCertificate } from "node:tls";
import { beforeAll, describe, expect, it } from "vitest";
import { createCa, issueCertificate, issueKeyAndCertificate, serialNumber, type CaMaterial, type KeyPair } from "../../certs/ca.js";
import {
  checkSegment,
  formatIdentity,
  identityFromCertificate,
  identityFromSubjectAltName,
  identityUri,
  parseIdentityUri,
  requireRole,
  type PeerIdentity,
} from "../../certs/identity.js";
import { clientTlsOptions } from "../../certs/tls.js";
import { ManualClock } from "../../common/clock.js";
import { InvalidArgumentError, PermissionDeniedError, UnauthenticatedError } from "../../common/errors.js";
import { otherTestCa, testKeys } from "../test-ca.js";

const host: PeerIdentity = { role: "host", scope: "acme", id: "web-01.dc1" };

describe("identity URIs", () => {
  it("round-trips every role", () => {
    for (const id of [
      host,
      { role: "proxy", scope: "eu-1", id: "px1" },
      { role: "operator", scope: "acme", id: "alice" },
      { role: "controller", scope: "mesh", id: "ctl" },
    ] as PeerIdentity[]) {
      const uri = identityUri(id);
      expect(uri).toBe(`rexmesh://${id.role}/${id.scope}/${id.id}`);
      expect(parseIdentityUri(uri)).toEqual(id);
    }
  });

  it("refuses segments that could smuggle structure, naming the field", () => {
    expect(() => identityUri({ ...host, id: "a/b" })).toThrow(InvalidArgumentError);
    expect(() => identityUri({ ...host, id: "" })).toThrow(/id ""/);
    expect(() => identityUri({ ...host, scope: "-acme" })).toThrow(/scope/);
    expect(() => checkSegment("id", "x".repeat(129))).toThrow(InvalidArgumentError);
    expect(checkSegment("id", "x".repeat(128))).toHaveLength(128);
  });

  it("refuses URIs of another scheme, an unknown role, or the wrong number of parts", () => {
    for (const bad of [
      "https://host/acme/h1",
      "rexmesh://admin/acme/h1",
      "rexmesh://host/acme",
      "rexmesh://host/acme/h1/extra",
      "rexmesh://host/acme/h1?x=1",
      "rexmesh://host/acme/h1#f",
      "rexmesh://host/acme/h%2F1",
      "not a uri",
    ]) {
      expect(() => parseIdentityUri(bad), bad).toThrow(InvalidArgumentError);
    }
  });

  it("formats an identity for people", () => {
    expect(formatIdentity(host)).toBe("host:acme/web-01.dc1");
  });
});

describe("identityFromSubjectAltName", () => {
  it("finds the single rexmesh URI among other SAN entries", () => {
    expect(identityFromSubjectAltName("DNS:localhost, URI:rexmesh://proxy/eu-1/px1, IP Address:127.0.0.1")).toEqual({
      role: "proxy",
      scope: "eu-1",
      id: "px1",
    });
  });

  it("identifies nobody when there is no rexmesh URI, more than one, or a malformed one", () => {
    expect(() => identityFromSubjectAltName(undefined)).toThrow(UnauthenticatedError);
    expect(() => identityFromSubjectAltName("DNS:localhost, URI:https://example.com/")).toThrow(UnauthenticatedError);
    expect(() => identityFromSubjectAltName("URI:rexmesh://host/acme/h1, URI:rexmesh://proxy/eu/p1")).toThrow(/exactly one/);
    expect(() => identityFromSubjectAltName("URI:rexmesh://root/acme/h1")).toThrow(/malformed/);
  });
});

describe("requireRole", () => {
  it("returns the identity when its role is allowed", () => {
    expect(requireRole(host, "proxy", "host")).toBe(host);
  });

  it("refuses another role with PermissionDenied naming both", () => {
    expect(() => requireRole(host, "proxy")).toThrow(PermissionDeniedError);
    expect(() => requireRole(host, "operator", "controller")).toThrow(/a host certificate.*operator or controller/);
  });
});

describe("certificate authority", () => {
  const clock = new ManualClock(Date.UTC(2026, 0, 1, 12, 0, 0));
  let ca: CaMaterial;
  let caCert: X509Certificate;
  let keys: KeyPair;
  let leafPem: string;
  let leaf: X509Certificate;

  beforeAll(() => {
    // Its own CA, not the run's: the test checks the name and validity it was made with.
    ca = createCa({ clock, commonName: "test CA", validityDays: 30 });
    caCert = new X509Certificate(ca.certPem);
    keys = testKeys();
    leafPem = issueCertificate(ca, { clock, identity: host, publicKeyPem: keys.publicKeyPem, validityMs: 86_400_000 });
    leaf = new X509Certificate(leafPem);
  });

  it("creates a self-signed CA certificate", () => {
    expect(caCert.ca).toBe(true);
    expect(caCert.subject).toContain("CN=test CA");
    expect(caCert.checkIssued(caCert)).toBe(true);
    expect(caCert.verify(caCert.publicKey)).toBe(true);
    expect(new Date(caCert.validTo).getTime()).toBe(clock.now() + 30 * 86_400_000);
  });

  it("issues a leaf signed by the CA that cannot sign itself", () => {
    expect(leaf.verify(caCert.publicKey)).toBe(true);
    expect(leaf.checkIssued(caCert)).toBe(true);
    expect(leaf.ca).toBe(false);
    expect(leaf.issuer).toBe(caCert.subject);
  });

  it("names exactly the identity in its SAN URI, bound to the subject's key", () => {
    expect(leaf.subjectAltName).toContain("URI:rexmesh://host/acme/web-01.dc1");
    expect(identityFromCertificate(leaf)).toEqual(host);
    expect(identityFromCertificate(leafPem)).toEqual(host);
    expect(leaf.publicKey.export({ type: "spki", format: "pem" })).toBe(keys.publicKeyPem);
  });

  it("is valid from slightly before the clock's now until now + validity", () => {
    expect(new Date(leaf.validFrom).getTime()).toBe(clock.now() - 5 * 60_000);
    expect(new Date(leaf.validTo).getTime()).toBe(clock.now() + 86_400_000);
  });

  it("allows both TLS server and client use", () => {
    expect(leaf.keyUsage).toEqual(expect.arrayContaining(["1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"]));
  });

  it("is not accepted as issued by a different CA", () => {
    const other = otherTestCa();
    const otherCert = new X509Certificate(other.certPem);
    expect(leaf.verify(otherCert.publicKey)).toBe(false);
    expect(leaf.checkIssued(otherCert)).toBe(false);
  });

  it("refuses a non-positive validity and an invalid identity", () => {
    expect(() => issueCertificate(ca, { clock, identity: host, publicKeyPem: keys.publicKeyPem, validityMs: 0 })).toThrow(InvalidArgumentError);
    expect(() =>
      issueCertificate(ca, { clock, identity: { ...host, id: "../etc" }, publicKeyPem: keys.publicKeyPem, validityMs: 1000 }),
    ).toThrow(InvalidArgumentError);
  });

  it("adds DNS names and IP addresses for serving roles", () => {
    const pem = issueCertificate(ca, {
      clock,
      identity: { role: "proxy", scope: "eu-1", id: "px1" },
      publicKeyPem: keys.publicKeyPem,
      validityMs: 1000,
      dnsNames: ["px1.example.net"],
      ipAddresses: ["127.0.0.1"],
    });
    const san = new X509Certificate(pem).subjectAltName ?? "";
    expect(san).toContain("DNS:px1.example.net");
    expect(san).toContain("IP Address:127.0.0.1");
    expect(san).toContain("URI:rexmesh://proxy/eu-1/px1");
  });

  it("issueKeyAndCertificate returns a key that matches the certificate", () => {
    const out = issueKeyAndCertificate(ca, { clock, identity: host, validityMs: 1000 });
    const cert = new X509Certificate(out.certPem);
    expect(cert.checkPrivateKey(createPrivateKey(out.keyPem))).toBe(true);
    expect(out.caPem).toBe(ca.certPem);
  });

  describe("clientTlsOptions.checkServerIdentity", () => {
    function serverCert(identity: PeerIdentity, dnsNames: string[]): PeerCertificate {
      const pem = issueCertificate(ca, { clock, identity, publicKeyPem: keys.publicKeyPem, validityMs: 60_000, dnsNames });
      return new X509Certificate(pem).toLegacyObject() as unknown as PeerCertificate;
    }
    const creds = () => ({ certPem: leafPem, keyPem: keys.privateKeyPem, caPem: ca.certPem });

    it("accepts a server certificate of the expected role for the dialled name", () => {
      const opts = clientTlsOptions(creds(), ["proxy"]);
      expect(opts.checkServerIdentity("px1.example.net", serverCert({ role: "proxy", scope: "eu-1", id: "px1" }, ["px1.example.net"]))).toBeUndefined();
      expect(opts.minVersion).toBe("TLSv1.3");
    });

    it("refuses a server certificate of the wrong role even when the name matches", () => {
      const opts = clientTlsOptions(creds(), ["proxy"]);
      const err = opts.checkServerIdentity("px1.example.net", serverCert({ role: "host", scope: "acme", id: "h9" }, ["px1.example.net"]));
      expect(err).toBeInstanceOf(PermissionDeniedError);
      expect(err?.message).toContain("host certificate");
    });

    it("still refuses a certificate for another host name", () => {
      const opts = clientTlsOptions(creds(), ["proxy"]);
      const err = opts.checkServerIdentity("evil.example.net", serverCert({ role: "proxy", scope: "eu-1", id: "px1" }, ["px1.example.net"]));
      expect(err).toBeInstanceOf(Error);
      expect(err).not.toBeInstanceOf(PermissionDeniedError);
    });
  });
});

describe("certificate serial numbers", () => {
  it("are positive and never start with a zero byte (a 00 00 prefix made forge encode an INTEGER OpenSSL refuses)", () => {
    for (let i = 0; i < 5000; i++) {
      const first = parseInt(serialNumber().slice(0, 2), 16);
      expect(first).toBeGreaterThanOrEqual(0x40);
      expect(first).toBeLessThanOrEqual(0x7f);
    }
  });
});
