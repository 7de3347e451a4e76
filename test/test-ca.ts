/**
 * The test run's certificate authorities and leaf keys, made once per
 * `vitest run` by test/test-ca-setup.ts (vitest.config.ts globalSetup)
 * instead of once per test file: an RSA-3072 CA key costs seconds of CPU.
 * A test that checks what createCa itself makes (a name, a validity) still
 * makes its own CA.
 */
import { inject } from "vitest";
import { issueCertificate, type CaMaterial, type KeyPair } from "../certs/ca.js";
import type { Credentials } from "../certs/files.js";
import type { PeerIdentity } from "../certs/identity.js";
import type { Clock } from "../common/clock.js";

/** What test/test-ca-setup.ts makes for the run. */
export interface TestPki {
  /** The mesh CA of the tests. */
  readonly ca: CaMaterial;
  /** A CA unrelated to it, for tests that a foreign CA's certificates are refused. */
  readonly otherCa: CaMaterial;
  /** Two different leaf key pairs (RSA-2048), for certificates whose key the test does not care about. */
  readonly keys: KeyPair;
  readonly otherKeys: KeyPair;
}

declare module "vitest" {
  export interface ProvidedContext {
    testPki: TestPki;
  }
}

function pki(): TestPki {
  const made = inject("testPki") as TestPki | undefined;
  if (!made) throw new Error("no test CA: it is made by test/test-ca-setup.ts, the globalSetup of vitest.config.ts");
  return made;
}

/** The tests' mesh CA, valid from 2020 to late 2044: at every clock the tests set, and at real time. */
export const testCa = (): CaMaterial => pki().ca;

/** A CA that is not the tests' mesh CA. */
export const otherTestCa = (): CaMaterial => pki().otherCa;

/** A leaf key pair made once for the run. */
export const testKeys = (): KeyPair => pki().keys;

/** A second leaf key pair, for where a test needs two different keys. */
export const otherTestKeys = (): KeyPair => pki().otherKeys;

/**
 * Credentials for an identity, like issueKeyAndCertificate but on one of
 * the run's key pairs (the tests' CA and first key unless given) instead
 * of a new key per certificate.
 */
export function testCredentials(
  identity: PeerIdentity,
  opts: { clock: Clock; validityMs: number; ca?: CaMaterial; keys?: KeyPair; dnsNames?: string[]; ipAddresses?: string[] },
): Credentials {
  const { ca = testCa(), keys = testKeys(), ...issue } = opts;
  return { certPem: issueCertificate(ca, { ...issue, identity, publicKeyPem: keys.publicKeyPem }), keyPem: keys.privateKeyPem, caPem: ca.certPem };
}
