import { mkdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { NotFoundError } from "../common/errors.js";
import type { CaMaterial } from "./ca.js";

/** What a peer needs to speak mTLS: its certificate and key, and the CA to trust. */
export interface Credentials {
  readonly certPem: string;
  readonly keyPem: string;
  readonly caPem: string;
}

/** Writes a file so that a crash never leaves it half written; keys get mode 0600. */
export function writeFileAtomic(path: string, data: string | Uint8Array, mode = 0o644): void {
  const tmp = `${path}.${process.pid}.tmp`;
  writeFileSync(tmp, data, { mode });
  renameSync(tmp, path);
}

function readRequired(path: string, what: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch (cause) {
    throw new NotFoundError(`cannot read ${what} at ${path}`, { cause });
  }
}

/** A CA directory holds ca.crt and ca.key. */
export function writeCa(dir: string, ca: CaMaterial): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  writeFileAtomic(join(dir, "ca.crt"), ca.certPem);
  writeFileAtomic(join(dir, "ca.key"), ca.keyPem, 0o600);
}

export function readCa(dir: string): CaMaterial {
  return { certPem: readRequired(join(dir, "ca.crt"), "CA certificate"), keyPem: readRequired(join(dir, "ca.key"), "CA key") };
}

/** Identity files are `<name>.crt` and `<name>.key` beside a copy of `ca.crt`. */
export function writeCredentials(dir: string, name: string, creds: Credentials): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  writeFileAtomic(join(dir, `${name}.crt`), creds.certPem);
  writeFileAtomic(join(dir, `${name}.key`), creds.keyPem, 0o600);
  writeFileAtomic(join(dir, "ca.crt"), creds.caPem);
}

export interface CredentialPaths {
  cert: string;
  key: string;
  ca: string;
}

export function credentialPaths(dir: string, name: string): CredentialPaths {
  return { cert: join(dir, `${name}.crt`), key: join(dir, `${name}.key`), ca: join(dir, "ca.crt") };
}

export function readCredentials(paths: CredentialPaths): Credentials {
  return {
    certPem: readRequired(paths.cert, "certificate"),
    keyPem: readRequired(paths.key, "private key"),
    caPem: readRequired(paths.ca, "CA certificate"),
  };
}
