/**
 * What a host signs, so that a proxy can relay and delay what a host says
 * but never make it up: that it holds a stream at that proxy (a presence
 * proof over the controller's per-link nonce), and how each task it ran
 * ended (its state, exit code and the SHA-256 of its output).
 *
 * The daemon makes an Ed25519 report key when it starts and endorses it
 * with its host certificate's key (RSA is too slow to sign every task end;
 * Ed25519 signs in tens of microseconds). The controller trusts a report
 * key only when the endorsing certificate chains to the mesh CA, is valid,
 * names that very host, and is not revoked.
 */
import { createHash, createPrivateKey, generateKeyPairSync, randomBytes, sign, verify, X509Certificate, type KeyObject } from "node:crypto";
import { ed25519PublicKey } from "./ed25519.js";
import { create } from "@bufbuild/protobuf";
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import type { Credentials } from "../certs/files.js";
import { identityFromCertificate, identityUri, sameIdentity, type PeerIdentity } from "../certs/identity.js";
import { HostReportKeySchema, type HostReportKey } from "../gen/rexmesh/v1/host_pb.js";
import type { TaskStatus } from "../gen/rexmesh/v1/task_pb.js";
import type { HostEvent } from "../gen/rexmesh/v1/event_pb.js";
import { SessionKeySchema, type SessionKey } from "../gen/rexmesh/v1/session_pb.js";
import type { Clock } from "./clock.js";

/** Length-prefixed fields under a purpose label: no two different messages frame to the same bytes. */
function framed(label: string, ...fields: (string | Uint8Array | bigint | number)[]): Buffer {
  const parts: Buffer[] = [Buffer.from(`rexmesh ${label} v1\0`)];
  for (const f of fields) {
    const b = typeof f === "string" ? Buffer.from(f, "utf8") : typeof f === "number" || typeof f === "bigint" ? Buffer.from(BigInt.asIntN(64, BigInt(f)).toString()) : Buffer.from(f);
    const len = Buffer.alloc(4);
    len.writeUInt32BE(b.length);
    parts.push(len, b);
  }
  return Buffer.concat(parts);
}

function endorsed(keyId: string, publicKey: Uint8Array, notAfterMs: number): Buffer {
  return framed("host report key", keyId, publicKey, notAfterMs);
}

function presence(nonce: Uint8Array, salt: Uint8Array, proxy: PeerIdentity | undefined, host: PeerIdentity): Buffer {
  return framed("host presence", nonce, salt, proxy ? identityUri(proxy) : "", identityUri(host));
}

/** The fields of a task's end that the host signs. */
function ending(s: TaskStatus): Buffer {
  return framed("task end", s.taskId, s.state, s.exitCode === undefined ? "" : String(s.exitCode), s.signal, s.outputChunks, s.outputBytes, s.outputSha256, s.outputTruncated ? "1" : "0");
}

/**
 * The fields of an event that the host signs: all of them but the
 * signature, the details in key order (a map has no order on the wire).
 */
function eventBytes(e: HostEvent): Buffer {
  const details = Object.keys(e.details)
    .sort()
    .flatMap((k) => [k, e.details[k]!]);
  return framed("host event", e.id, e.hostId, e.tenant, e.kind, e.time ? timestampMs(e.time) : 0, e.watcher, e.keyId, details.length, ...details);
}

/** The host's half of a session's key agreement (common/session-seal.ts), bound to the session and the controller's half. */
function sessionKeyBytes(sessionId: string, controllerKey: Uint8Array, hostKey: Uint8Array): Buffer {
  return framed("session key", sessionId, controllerKey, hostKey);
}

/** The daemon's side: its report key, presence proofs and signed task ends. */
export class HostReporter {
  readonly key: HostReportKey;
  private readonly privateKey: KeyObject;

  constructor(
    creds: Credentials,
    clock: Clock,
    private readonly self: PeerIdentity,
    lifetimeMs = 365 * 86_400_000,
  ) {
    const { publicKey, privateKey } = generateKeyPairSync("ed25519");
    this.privateKey = privateKey;
    const der = publicKey.export({ type: "spki", format: "der" });
    const keyId = createHash("sha256").update(der).digest("hex").slice(0, 16);
    const notAfter = clock.now() + lifetimeMs;
    this.key = create(HostReportKeySchema, {
      keyId,
      publicKey: der,
      notAfter: timestampFromMs(notAfter),
      endorsement: sign("sha256", endorsed(keyId, der, notAfter), createPrivateKey(creds.keyPem)),
      hostCertificate: new X509Certificate(creds.certPem).raw,
    });
  }

  /**
   * A presence proof over the controller's nonce, for the proxy whose
   * certificate the daemon saw, with a fresh salt (the controller takes
   * each proof once).
   */
  prove(nonce: Uint8Array, proxy: PeerIdentity | undefined): { proof: Uint8Array; salt: Uint8Array } {
    const salt = randomBytes(16);
    return { proof: sign(null, presence(nonce, salt, proxy, this.self), this.privateKey), salt };
  }

  /** Signs the host's half of a session's key agreement. */
  signSessionKey(sessionId: string, controllerKey: Uint8Array, hostKey: Uint8Array): SessionKey {
    return create(SessionKeySchema, { publicKey: hostKey, reportKeyId: this.key.keyId, signature: sign(null, sessionKeyBytes(sessionId, controllerKey, hostKey), this.privateKey) });
  }

  /** Signs an event (docs/triggers.md) in place. */
  signEvent(event: HostEvent): void {
    event.keyId = this.key.keyId;
    event.signature = sign(null, eventBytes(event), this.privateKey);
  }

  /** Signs a terminal status (its output fields set) in place. */
  signEnd(status: TaskStatus): void {
    status.keyId = this.key.keyId;
    status.signature = sign(null, ending(status), this.privateKey);
  }
}

/** A report key the controller has checked, for the host it belongs to. */
interface Trusted {
  publicKey: KeyObject;
  host: PeerIdentity;
  notAfter: number;
}

export type KeyCheck = { ok: true } | { ok: false; reason: string };

/**
 * The controller's side: which report keys belong to which host, checked
 * against the mesh CA; presence proofs and task ends checked against them.
 * Checked keys are kept (bounded), so a host's reconnects cost one
 * Ed25519 verification each.
 */
/** Where accepted report keys are kept, so that a restarted controller still checks results against them. */
export interface ReportKeyStore {
  get(keyId: string): HostReportKey | undefined;
  put(key: HostReportKey): void;
}

export class HostKeyVerifier {
  private readonly ca: X509Certificate;
  private readonly keys = new Map<string, Trusted>();

  constructor(
    caPem: string,
    private readonly clock: Clock,
    private readonly isRevoked: (host: PeerIdentity) => boolean = () => false,
    private readonly store?: ReportKeyStore,
    private readonly maxKeys = 200_000,
  ) {
    this.ca = new X509Certificate(caPem);
  }

  /**
   * Takes a report key for a host if its endorsement holds (see the class
   * comment). A key accepted before (from the store) need not be endorsed
   * by a certificate still valid now: host certificates are short-lived,
   * and what the key signed while the certificate was valid stays genuine.
   */
  accept(key: HostReportKey | undefined, host: PeerIdentity, acceptedBefore = false): KeyCheck {
    if (!key || key.keyId === "") return { ok: false, reason: "no report key" };
    const known = this.keys.get(key.keyId);
    if (known) return sameHost(known.host, host) ? { ok: true } : { ok: false, reason: "the report key belongs to another host" };
    try {
      const cert = new X509Certificate(Buffer.from(key.hostCertificate));
      const now = this.clock.now();
      if (!cert.checkIssued(this.ca) || !cert.verify(this.ca.publicKey)) return { ok: false, reason: "the report key's certificate is not from this mesh's CA" };
      if (!acceptedBefore && (now < Date.parse(cert.validFrom) || now > Date.parse(cert.validTo))) return { ok: false, reason: "the report key's certificate is not valid now" };
      const id = identityFromCertificate(cert);
      if (!sameHost(id, host)) return { ok: false, reason: "the report key's certificate names another host" };
      const notAfter = key.notAfter ? timestampMs(key.notAfter) : 0;
      if (notAfter <= now && !acceptedBefore) return { ok: false, reason: "the report key has expired" };
      if (!verify("sha256", endorsed(key.keyId, key.publicKey, notAfter), cert.publicKey, key.endorsement)) return { ok: false, reason: "the report key's endorsement does not hold" };
      const publicKey = ed25519PublicKey(key.publicKey);
      if (!publicKey) return { ok: false, reason: "the report key is not Ed25519" };
      if (this.keys.size >= this.maxKeys) this.keys.delete(this.keys.keys().next().value!);
      this.keys.set(key.keyId, { publicKey, host: id, notAfter });
      if (this.store && !this.store.get(key.keyId)) this.store.put(key);
      return { ok: true };
    } catch {
      return { ok: false, reason: "the report key cannot be read" };
    }
  }

  /** An accepted key by id; one accepted before this controller started, perhaps, is checked again from the store. */
  private known(keyId: string, host: PeerIdentity): Trusted | undefined {
    if (!this.keys.has(keyId)) {
      const stored = this.store?.get(keyId);
      if (stored) this.accept(stored, host, true);
    }
    return this.keys.get(keyId);
  }

  private usable(keyId: string, host: PeerIdentity): Trusted | undefined {
    const k = this.keys.get(keyId);
    if (!k || !sameHost(k.host, host) || k.notAfter <= this.clock.now() || this.isRevoked(host)) return undefined;
    return k;
  }

  /**
   * A presence proof of `host` over this link's nonce and the proof's salt,
   * at `proxy`, with an accepted key. (Taking each proof once is the
   * caller's part: it knows the salts already used on the link.)
   */
  checkPresence(keyId: string, proof: Uint8Array, salt: Uint8Array, nonce: Uint8Array, proxy: PeerIdentity, host: PeerIdentity): KeyCheck {
    const k = this.usable(keyId, host);
    if (!k) return { ok: false, reason: "no valid report key" };
    if (proof.length === 0) return { ok: false, reason: "no presence proof" };
    if (salt.length < 16 || salt.length > 64) return { ok: false, reason: `the presence proof's salt is ${salt.length} bytes (16 to 64)` };
    // The daemon names the proxy whose certificate it saw; a proof without a proxy name is bound by the nonce alone.
    if (verify(null, presence(nonce, salt, proxy, host), k.publicKey, proof) || verify(null, presence(nonce, salt, undefined, host), k.publicKey, proof)) return { ok: true };
    return { ok: false, reason: "the presence proof does not hold" };
  }

  /**
   * The host's signature over a task end: "ok", "unknown" (no key the
   * controller accepted for it: it cannot tell), or "bad" (it does not hold).
   */
  checkEnd(status: TaskStatus, host: PeerIdentity): "ok" | "unknown" | "bad" {
    if (status.signature.length === 0 || status.keyId === "") return "unknown";
    const k = this.known(status.keyId, host);
    if (!k) return "unknown";
    if (!sameHost(k.host, host)) return "bad";
    return verify(null, ending(status), k.publicKey, status.signature) ? "ok" : "bad";
  }

  /**
   * The host's signature over an event it claims: "ok"; "unknown" (no key
   * the controller accepted by that id: it cannot tell yet); or "bad" (the
   * signature does not hold, the key is another host's, or the host is
   * revoked). Only "ok" lets an event be stored and fire triggers.
   */
  checkEvent(event: HostEvent): "ok" | "unknown" | "bad" {
    const host: PeerIdentity = { role: "host", scope: event.tenant, id: event.hostId };
    if (event.signature.length === 0 || event.keyId === "") return "bad";
    const k = this.known(event.keyId, host);
    if (!k) return "unknown";
    if (!sameHost(k.host, host) || this.isRevoked(host)) return "bad";
    // Noticed (as the host signed it) after its report key expired: the key no longer speaks for the host.
    if (event.time && timestampMs(event.time) > k.notAfter) return "bad";
    return verify(null, eventBytes(event), k.publicKey, event.signature) ? "ok" : "bad";
  }

  /**
   * The host's half of a session's key agreement, signed with a report key
   * of that host that is accepted, valid and not revoked.
   */
  checkSessionKey(key: SessionKey | undefined, host: PeerIdentity, sessionId: string, controllerKey: Uint8Array): KeyCheck {
    if (!key || key.publicKey.length === 0) return { ok: false, reason: "the host sent no key for the session" };
    this.known(key.reportKeyId, host);
    const k = this.usable(key.reportKeyId, host);
    if (!k) return { ok: false, reason: "the session key is signed with no valid report key of the host" };
    return verify(null, sessionKeyBytes(sessionId, controllerKey, key.publicKey), k.publicKey, key.signature) ? { ok: true } : { ok: false, reason: "the host's signature over the session key does not hold" };
  }

  /** Whether the controller holds an accepted report key by this id. */
  knows(keyId: string): boolean {
    return this.keys.has(keyId);
  }
}

function sameHost(a: PeerIdentity, b: PeerIdentity): boolean {
  return a.role === "host" && sameIdentity(a, b);
}

/** Running SHA-256 and length of a task's output, in seq order, as the daemon signs it. */
export class OutputDigest {
  private readonly hash = createHash("sha256");
  bytes = 0;

  add(data: Uint8Array): void {
    this.hash.update(data);
    this.bytes += data.length;
  }

  digest(): Uint8Array {
    return this.hash.digest();
  }
}
