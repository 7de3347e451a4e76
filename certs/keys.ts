import { generateKeyPair as generateKeyPairCallback, generateKeyPairSync, type RSAKeyPairOptions } from "node:crypto";

/** A key pair, PEM encoded. Kept apart from ca.ts so that a daemon need not load node-forge to make a key. */
export interface KeyPair {
  readonly publicKeyPem: string;
  readonly privateKeyPem: string;
}

/**
 * Generates an RSA key natively (node-forge's pure-JS key generation is far
 * slower).
 */
export function generateKeyPair(bits = 2048): KeyPair {
  const { publicKey, privateKey } = generateKeyPairSync("rsa", rsaPem(bits));
  return { publicKeyPem: publicKey, privateKeyPem: privateKey };
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

