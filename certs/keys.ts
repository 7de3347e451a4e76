import { generateKeyPairSync } from "node:crypto";

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
  const { publicKey, privateKey } = generateKeyPairSync("rsa", {
    modulusLength: bits,
    publicKeyEncoding: { type: "spki", format: "pem" },
    privateKeyEncoding: { type: "pkcs8", format: "pem" },
  });
  return { publicKeyPem: publicKey, privateKeyPem: privateKey };
}

