import { generateKeyPair as generateKeyPairCallback, generateKeyPairSync, type ECKeyPairOptions, type RSAKeyPairOptions } from "node:crypto";

/** A key pair, PEM encoded. Kept apart from ca.ts so that a daemon need not load node-forge to make a key. */
export interface KeyPair {
  readonly publicKeyPem: string;
  readonly privateKeyPem: string;
}

/**
 * Generates a key natively (node-forge's pure-JS key generation is far
 * slower): ECDSA P-256 by default, what every identity rexmesh makes gets;
 * RSA of `bits` bits when a number is given (the CA's key, and tests of
 * certificates made before P-256 was the default).
 *
 * Why P-256: every TLS handshake costs each side one signature with its
 * certificate's key, and a proxy accepting thousands of hosts at once (a
 * cold start, a reconnect storm after a restart) spends most of its CPU on
 * them. On the bench machine a P-256 signature costs about 30 µs of CPU,
 * an RSA-2048 one about 0.25 ms and an RSA-3072 one 1.8 ms; verifying costs
 * about 65 µs against 40 µs. The CA keeps RSA: it signs rarely, and every
 * chain check verifies its signature.
 */
export function generateKeyPair(kind: "ec" | number = "ec"): KeyPair {
  const { publicKey, privateKey } = kind === "ec" ? generateKeyPairSync("ec", ecPem()) : generateKeyPairSync("rsa", rsaPem(kind));
  return { publicKeyPem: publicKey, privateKeyPem: privateKey };
}

function ecPem(): ECKeyPairOptions<"pem", "pem"> {
  return { namedCurve: "prime256v1", publicKeyEncoding: { type: "spki", format: "pem" }, privateKeyEncoding: { type: "pkcs8", format: "pem" } };
}

/**
 * The same, on libuv's thread pool: several keys are made at once (on as
 * many cores) instead of one after another. For the test run's keys
 * (test/test-ca-setup.ts), seconds each on a busy machine.
 */
export function generateKeyPairAsync(bits = 2048): Promise<KeyPair> {
  return new Promise((resolve, reject) =>
    generateKeyPairCallback("rsa", rsaPem(bits), (err, publicKey, privateKey) => (err ? reject(err) : resolve({ publicKeyPem: publicKey, privateKeyPem: privateKey }))),
  );
}

function rsaPem(bits: number): RSAKeyPairOptions<"pem", "pem"> {
  return { modulusLength: bits, publicKeyEncoding: { type: "spki", format: "pem" }, privateKeyEncoding: { type: "pkcs8", format: "pem" } };
}

