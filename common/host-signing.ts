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
 *
 * The report key also has an X25519 half, named by its id
 * (common/end-mac.ts): once the daemon holds an X25519 key of the
 * controller (carried by its task-signing key), it MACs its task ends
 * instead of signing them, and the controller checks an HMAC instead of an
 * Ed25519 signature.
 */
import { createHash, createPrivateKey, generateKeyPairSync, randomBytes, sign, verify, X509Certificate, type KeyObject } from "node:crypto";
import { ed25519PublicKey } from "./ed25519.js";
import { framed } from "./framed.js";
import { END_KEY_ID_CHARS, END_MAC_BYTES, endMac, endMacHolds, endMacKey, pairedHalf, pairedKeyId } from "./end-mac.js";
import { newKeyHalf, type KeyHalf } from "./x25519.js";
import { create } from "@bufbuild/protobuf";
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import type { Credentials } from "../certs/files.js";
import { identityFromCertificate, identityUri, sameIdentity, type PeerIdentity } from "../certs/identity.js";
import { HostReportKeySchema, type HostReportKey } from "../gen/rexmesh/v1/host_pb.js";
import type { TaskStatus } from "../gen/rexmesh/v1/task_pb.js";
import type { HostEvent } from "../gen/rexmesh/v1/event_pb.js";
import { SessionKeySchema, type SessionKey } from "../gen/rexmesh/v1/session_pb.js";
import type { Clock } from "./clock.js";

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

/** A controller's X25519 key as a daemon holds it: its id (common/end-mac.ts controllerKeyId) and raw public key. */
export interface ControllerEndKey {
  id: string;
  publicKey: Uint8Array;
}

/** MAC keys a reporter keeps, one per controller key it MAC'd ends for (it uses the newest it holds). */
const REPORTER_MAC_KEYS = 8;

/** The daemon's side: its report key, presence proofs and signed (or MAC'd) task ends. */
export class HostReporter {
  readonly key: HostReportKey;
  private readonly privateKey: KeyObject;
  private readonly half: KeyHalf;
  private readonly macKeys = new Map<string, Buffer>();

  constructor(
    creds: Credentials,
    clock: Clock,
    private readonly self: PeerIdentity,
    lifetimeMs = 365 * 86_400_000,
  ) {
    const { publicKey, privateKey } = generateKeyPairSync("ed25519");
    this.privateKey = privateKey;
    const der = publicKey.export({ type: "spki", format: "der" });
    this.half = newKeyHalf();
    // The id names both public keys, so the endorsement (over the id, in the bytes an earlier controller checks) covers the X25519 half.
    const keyId = pairedKeyId("host report key", der, this.half.publicKey);
    const notAfter = clock.now() + lifetimeMs;
    this.key = create(HostReportKeySchema, {
      keyId,
      publicKey: der,
      notAfter: timestampFromMs(notAfter),
      endorsement: sign("sha256", endorsed(keyId, der, notAfter), createPrivateKey(creds.keyPem)),
      hostCertificate: new X509Certificate(creds.certPem).raw,
      x25519PublicKey: this.half.publicKey,
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

  /**
   * Vouches for a terminal status (its output fields set) in place: with a
   * MAC under the key agreed with `controller` (a controller X25519 key the
   * daemon checked: TaskVerifier.endKey), or without one (an earlier
   * controller, or none checked yet) with an Ed25519 signature.
   */
  signEnd(status: TaskStatus, controller?: ControllerEndKey): void {
    status.keyId = this.key.keyId;
    const key = controller && this.macKey(controller);
    // One of the two, never both: a MAC, when there is one, decides at the controller.
    if (key) {
      status.signature = new Uint8Array();
      status.endMacKeyId = controller!.id;
      status.endMac = endMac(key, ending(status));
    } else {
      status.endMac = new Uint8Array();
      status.endMacKeyId = "";
      status.signature = sign(null, ending(status), this.privateKey);
    }
  }

  private macKey(controller: ControllerEndKey): Buffer | undefined {
    let key = this.macKeys.get(controller.id);
    if (!key) {
      key = endMacKey(this.half.privateKey, controller.publicKey, controller.publicKey, this.half.publicKey, this.self);
      if (!key) return undefined;
      if (this.macKeys.size >= REPORTER_MAC_KEYS) this.macKeys.delete(this.macKeys.keys().next().value!);
      this.macKeys.set(controller.id, key);
    }
    return key;
  }
}

/** A report key the controller has checked, for the host it belongs to. */
interface Trusted {
  publicKey: KeyObject;
  host: PeerIdentity;
  notAfter: number;
  /** The key's X25519 half, when its id names one. */
  x25519?: Uint8Array;
  /** MAC keys agreed with it, by controller key id (one per controller key in use: a handful). */
  macKeys?: Map<string, Buffer>;
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

export interface HostKeyVerifierOptions {
  /** The controller's X25519 keys by id (controller/end-keys.ts), to check MAC'd ends; without it every MAC'd end is "unknown". */
  controllerKeys?: (id: string) => KeyHalf | undefined;
  /** Accepted keys kept in memory at most (the oldest is forgotten first; a stored one is read again when needed). */
  maxKeys?: number;
}

export class HostKeyVerifier {
  private readonly ca: X509Certificate;
  private readonly keys = new Map<string, Trusted>();
  private readonly controllerKeys: (id: string) => KeyHalf | undefined;
  private readonly maxKeys: number;

  constructor(
    caPem: string,
    private readonly clock: Clock,
    private readonly isRevoked: (host: PeerIdentity) => boolean = () => false,
    private readonly store?: ReportKeyStore,
    opts: HostKeyVerifierOptions = {},
  ) {
    this.ca = new X509Certificate(caPem);
    this.controllerKeys = opts.controllerKeys ?? (() => undefined);
    this.maxKeys = opts.maxKeys ?? 200_000;
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
      const x25519 = pairedHalf("host report key", key.keyId, key.publicKey, key.x25519PublicKey);
      if (x25519 === "mismatch") return { ok: false, reason: "the report key's X25519 half is not the one its id names: it was changed or removed on the way" };
      if (this.keys.size >= this.maxKeys) this.keys.delete(this.keys.keys().next().value!);
      this.keys.set(key.keyId, { publicKey, host: id, notAfter, ...(x25519 ? { x25519: Buffer.from(x25519) } : {}) });
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
   * The host's signature or MAC over a task end: "ok", "unknown" (no key
   * the controller accepted for it, or a MAC under a controller key it does
   * not hold: it cannot tell), or "bad" (it does not hold). A MAC, when the
   * end carries one, decides.
   */
  checkEnd(status: TaskStatus, host: PeerIdentity): "ok" | "unknown" | "bad" {
    if (!vouchedFor(status) || status.keyId === "") return "unknown";
    const k = this.known(status.keyId, host);
    if (!k) return "unknown";
    if (!sameHost(k.host, host)) return "bad";
    if (status.endMac.length === 0 && status.endMacKeyId === "") return verify(null, ending(status), k.publicKey, status.signature) ? "ok" : "bad";
    if (status.endMac.length !== END_MAC_BYTES || status.endMacKeyId.length > END_KEY_ID_CHARS) return "bad";
    // A daemon MACs only with a report key whose id names an X25519 half.
    if (!k.x25519) return "bad";
    const key = this.macKey(k, status.endMacKeyId);
    if (!key) return "unknown";
    return endMacHolds(key, ending(status), status.endMac) ? "ok" : "bad";
  }

  /** The MAC key of a report key and a controller key, agreed once (a controller key no longer or never held: undefined). */
  private macKey(k: Trusted, controllerKeyId: string): Buffer | undefined {
    let key = k.macKeys?.get(controllerKeyId);
    if (key) return key;
    const own = this.controllerKeys(controllerKeyId);
    key = own && endMacKey(own.privateKey, k.x25519!, own.publicKey, k.x25519!, k.host);
    if (!key) return undefined;
    // Only ids of keys the controller holds get here: the map is as small as its key ring.
    (k.macKeys ??= new Map()).set(controllerKeyId, key);
    return key;
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

/** Does a status carry the host's signature or MAC (it may still be forged: checkEnd tells)? */
export function vouchedFor(status: TaskStatus): boolean {
  return status.signature.length > 0 || status.endMac.length > 0;
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
