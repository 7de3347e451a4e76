import { createHash, createPrivateKey, generateKeyPairSync, randomBytes, sign, verify, X509Certificate, type KeyObject } from "node:crypto";
import { ed25519PublicKey } from "./ed25519.js";
import { controllerKeyId, pairedHalf, pairedKeyId } from "./end-mac.js";
import type { ControllerEndKey } from "./host-signing.js";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import type { Credentials } from "../certs/files.js";
import { identityFromCertificate } from "../certs/identity.js";
import { SignedTaskSchema, TaskBatchProofSchema, TaskSigningKeySchema, TaskSpecSchema, type SignedTask, type TaskSigningKey, type TaskSpec } from "../gen/rexmesh/v1/task_pb.js";
import { SessionOrderSchema, SignedSessionOrderSchema, type SessionOrder, type SignedSessionOrder } from "../gen/rexmesh/v1/session_pb.js";
import type { HostFacts } from "../gen/rexmesh/v1/host_pb.js";
import type { Clock } from "./clock.js";
import { buildTree, leafHash, proofOf, rootFromProof, rootOf, SALT_BYTES } from "./merkle.js";
import { readByHand } from "./hand-wire.js";
import { varintSize, writeVarint } from "./proto-wire.js";

/** The bytes the controller's certificate key endorses: key id, public key and expiry, unambiguously framed. */
function endorsedBytes(keyId: string, publicKey: Uint8Array, notAfterMs: number): Buffer {
  const id = Buffer.from(keyId, "utf8");
  const head = Buffer.alloc(12);
  head.writeUInt32BE(id.length, 0);
  head.writeBigUInt64BE(BigInt(notAfterMs), 4);
  return Buffer.concat([Buffer.from("rexmesh task-signing key v1\0"), head, id, Buffer.from(publicKey)]);
}

/**
 * What a signature covers: a prefix naming what is signed, then its bytes.
 * One key signs tasks and session orders; each kind has its own prefix, and
 * the prefixes differ within their first bytes, so a signature over one
 * kind never verifies as the other. (With tasks signed over their bare
 * bytes, prefix + order decoded as a task: the prefix became an unknown
 * field that swallowed the order's first bytes, and decoding resumed inside
 * an argv the operator chose — a proxy could pass an order off as any task.)
 */
function signedBytes(prefix: Buffer, bytes: Uint8Array): Buffer {
  return Buffer.concat([prefix, bytes]);
}
const TASK_PREFIX = Buffer.from("rexmesh task v1\0");
const BATCH_PREFIX = Buffer.from("rexmesh task batch v1\0");

/** What a batch signature covers: the number of tasks and the root of their hash tree (common/merkle.ts). */
function batchBytes(leaves: number, root: Uint8Array): Buffer {
  const head = Buffer.alloc(4);
  head.writeUInt32BE(leaves, 0);
  return Buffer.concat([BATCH_PREFIX, head, root]);
}

/** Room a batch proof takes in a frame, at most (a frame of MAX_FRAME_BYTES holds far fewer than 2^17 tasks). */
export const BATCH_PROOF_BYTES = 17 * 34 + 18 + 16;

/**
 * The HostFacts feature of a daemon that checks batch signatures. Tasks for
 * a host that does not report it (a daemon of an earlier release) are
 * signed on their own, as those daemons expect.
 */
export const BATCH_SIGNATURE = "batch-signature";

/** Does a host with these facts check batch signatures? */
export function checksBatches(facts: HostFacts | undefined): boolean {
  return facts?.features.includes(BATCH_SIGNATURE) ?? false;
}
const SESSION_ORDER_PREFIX = Buffer.from("rexmesh session order v1\0");

/** How long a task-signing key is valid (a controller makes a new one each start). */
export const TASK_KEY_LIFETIME_MS = 30 * 86_400_000;

/**
 * Signs every task the controller sends. The Ed25519 key lives only in the
 * controller's memory (a new one each start); its public half is endorsed by
 * the controller certificate's key, so daemons can check it against the
 * mesh CA without any other channel. With `x25519PublicKey` (the
 * controller's current X25519 key, controller/end-keys.ts) the key carries
 * it too, named by its id and so endorsed with it: daemons agree with it
 * the key that MACs their task ends (common/end-mac.ts).
 */
export class TaskSigner {
  private privateKey: KeyObject;
  private current: TaskSigningKey;
  private readonly renewed = new Set<(key: TaskSigningKey) => void>();

  constructor(
    private readonly creds: Credentials,
    private readonly clock: Clock,
    private readonly lifetimeMs = TASK_KEY_LIFETIME_MS,
    private readonly x25519PublicKey?: Uint8Array,
  ) {
    [this.current, this.privateKey] = this.newKey();
  }

  /** The key tasks are signed with now: daemons must hold it (it goes to every proxy, and on to every host). */
  get key(): TaskSigningKey {
    return this.current;
  }

  private newKey(): [TaskSigningKey, KeyObject] {
    const { publicKey, privateKey } = generateKeyPairSync("ed25519");
    const der = publicKey.export({ type: "spki", format: "der" });
    const x25519PublicKey = this.x25519PublicKey;
    const keyId = x25519PublicKey ? pairedKeyId("task-signing key", der, x25519PublicKey) : createHash("sha256").update(der).digest("hex").slice(0, 16);
    const notAfter = this.clock.now() + this.lifetimeMs;
    const key = create(TaskSigningKeySchema, {
      keyId,
      publicKey: der,
      notAfter: timestampFromMs(notAfter),
      endorsement: sign("sha256", endorsedBytes(keyId, der, notAfter), createPrivateKey(this.creds.keyPem)),
      controllerCertificate: this.creds.certPem,
      ...(x25519PublicKey ? { x25519PublicKey } : {}),
    });
    return [key, privateKey];
  }

  /**
   * Replaces the key once half its lifetime has passed, so that a
   * controller that runs for months keeps signing with a key daemons
   * accept: what was signed with the old one stays valid until that key
   * expires (half a lifetime on), and the new key reaches daemons before
   * any task signed with it (onRenew). Returns whether it renewed.
   */
  renewIfDue(): boolean {
    const notAfter = this.current.notAfter ? timestampMs(this.current.notAfter) : 0;
    if (this.clock.now() < notAfter - this.lifetimeMs / 2) return false;
    [this.current, this.privateKey] = this.newKey();
    for (const fn of this.renewed) fn(this.current);
    return true;
  }

  /** Calls fn with each new key as it replaces the old one; returns the function that stops it. */
  onRenew(fn: (key: TaskSigningKey) => void): () => void {
    this.renewed.add(fn);
    return () => this.renewed.delete(fn);
  }

  private readonly specs = new SpecEncoder();

  /** Tasks made by {@link prepare} that {@link seal} still has to sign, and whether each may share a batch signature. */
  private readonly unsealed = new WeakMap<SignedTask, boolean>();

  /**
   * A task to be signed when its frame leaves: its spec is encoded now, its
   * signature added by {@link seal} just before the frame is written —
   * together with the frame's other tasks when `batch` (its host reports
   * {@link BATCH_SIGNATURE}), on its own otherwise. A ping-only task needs
   * none (see isPingOnly).
   */
  prepare(spec: TaskSpec, batch = true): SignedTask {
    // What create(SignedTaskSchema, { spec }) makes, without its reflection (once per host of a job).
    const task: SignedTask = { $typeName: SignedTaskSchema.typeName, spec: this.specs.encode(spec), signature: new Uint8Array(0), keyId: "" };
    if (!isPingOnly(spec)) this.unsealed.set(task, batch);
    return task;
  }

  /**
   * Signs every task of `tasks` made by {@link prepare} and not signed yet,
   * with one signature over the root of their hash tree (docs/fan-out.md):
   * each task carries its place in the tree and its path to the root. A lone
   * task is signed on its own, as {@link sign} does.
   */
  seal(tasks: readonly SignedTask[]): void {
    const batch: SignedTask[] = [];
    for (const t of tasks) {
      const batchable = this.unsealed.get(t);
      if (batchable === undefined) continue;
      this.unsealed.delete(t);
      if (batchable) batch.push(t);
      else this.signAlone(t);
    }
    if (batch.length === 1) this.signAlone(batch[0]!);
    if (batch.length < 2) return;
    const salts = randomBytes(SALT_BYTES * batch.length);
    const salt = (i: number) => salts.subarray(i * SALT_BYTES, (i + 1) * SALT_BYTES);
    const levels = buildTree(batch.map((t, i) => leafHash(salt(i), t.spec)));
    const signature = sign(null, batchBytes(batch.length, rootOf(levels)), this.privateKey);
    batch.forEach((t, index) => {
      t.signature = signature;
      t.keyId = this.key.keyId;
      t.batch = create(TaskBatchProofSchema, { index, leaves: batch.length, path: proofOf(levels, index), salt: salt(index) });
    });
  }

  private signAlone(t: SignedTask): void {
    t.signature = sign(null, signedBytes(TASK_PREFIX, t.spec), this.privateKey);
    t.keyId = this.key.keyId;
  }

  /** Signs tasks sent together (a bundle's): {@link prepare} and {@link seal} in one; `batch` says which may share the signature. */
  signAll(specs: readonly TaskSpec[], batch: (spec: TaskSpec) => boolean = () => true): SignedTask[] {
    const tasks = specs.map((s) => this.prepare(s, batch(s)));
    this.seal(tasks);
    return tasks;
  }

  /** Signs a task on its own; a ping-only task goes unsigned (see isPingOnly). */
  sign(spec: TaskSpec): SignedTask {
    return this.signAll([spec])[0]!;
  }

  /** Signs a session order (docs/sessions.md); never valid as a task signature. */
  signSession(order: SessionOrder): SignedSessionOrder {
    const bytes = toBinary(SessionOrderSchema, order);
    return create(SignedSessionOrderSchema, { order: bytes, signature: sign(null, signedBytes(SESSION_ORDER_PREFIX, bytes), this.privateKey), keyId: this.key.keyId });
  }
}

/**
 * Encodes task specs for signing, the part every task of a job shares once:
 * a spec's bytes are its task_id and host_id fields, then everything else
 * (the job's part, encoded as protobuf-es would with both ids empty). Field
 * order does not matter to a protobuf decoder, and what is signed is these
 * bytes, whatever their order, so a daemon sees an ordinary task. The job's
 * part is kept for the next spec: the tasks of a job are sent one after the
 * other, and re-encoding their steps per host was most of the controller's
 * cost of sending a task.
 */
export class SpecEncoder {
  private last: { spec: TaskSpec; bytes: Uint8Array } | undefined;

  encode(spec: TaskSpec): Buffer {
    let common = this.last && sameJobPart(this.last.spec, spec) ? this.last.bytes : undefined;
    if (!common) {
      common = toBinary(TaskSpecSchema, { ...spec, taskId: "", hostId: "" });
      this.last = { spec, bytes: common };
    }
    const id = Buffer.byteLength(spec.taskId);
    const host = Buffer.byteLength(spec.hostId);
    const head = (n: number) => (n > 0 ? 1 + varintSize(n) + n : 0);
    const out = Buffer.allocUnsafe(head(id) + head(host) + common.length);
    let off = 0;
    if (id > 0) {
      out[off++] = TASK_ID_TAG;
      off = writeVarint(out, off, id);
      off += out.write(spec.taskId, off, "utf8");
    }
    if (host > 0) {
      out[off++] = HOST_ID_TAG;
      off = writeVarint(out, off, host);
      off += out.write(spec.hostId, off, "utf8");
    }
    out.set(common, off);
    return out;
  }
}

/** The one-byte tags of a spec's task_id (field 1) and host_id (field 4), both length-delimited: what SpecEncoder writes first. */
const TASK_ID_TAG = (1 << 3) | WireType.LengthDelimited;
const HOST_ID_TAG = (4 << 3) | WireType.LengthDelimited;

/**
 * The proxy's side of SpecEncoder: decodes tasks' specs to route them, the
 * job's part once. Bytes that are a task_id field and perhaps a host_id
 * field followed by the same bytes as the previous task's are read as that
 * job part (decoded once and shared: callers must not change it) with
 * these ids. That is exactly what decoding them whole gives (protobuf
 * reads concatenated fields as one message), because a job part is shared
 * only if it has no task_id or host_id field of its own (one after the ids
 * would win). Anything else is decoded whole, as peekSpec does.
 */
export class SpecDecoder {
  private last: { rest: Buffer; part: TaskSpec | undefined } | undefined;

  peek(task: SignedTask): TaskSpec | undefined {
    const bytes = task.spec;
    const ids = leadingIds(bytes);
    if (ids) {
      const rest = Buffer.from(bytes.buffer, bytes.byteOffset + ids.at, bytes.length - ids.at);
      // Decoded from the task's own bytes, so its bytes fields are of the same kind as a whole decode's.
      if (!this.last || !this.last.rest.equals(rest)) this.last = { rest, part: jobPart(bytes.subarray(ids.at)) };
      const part = this.last.part;
      if (part) return { ...part, taskId: ids.taskId, hostId: ids.hostId };
    }
    return peekSpec(task);
  }
}

/**
 * A spec's leading task_id and host_id fields (SpecEncoder's ids, in that
 * order), read by hand as protobuf-es reads them, and where they end;
 * undefined when it does not start with task_id, or for anything the hand
 * reader leaves to protobuf-es (text that is not plain UTF-8, an unusual
 * varint, a field cut short): the spec is then decoded whole.
 */
function leadingIds(bytes: Uint8Array): { at: number; taskId: string; hostId: string } | undefined {
  if (bytes[0] !== TASK_ID_TAG) return undefined;
  return readByHand(bytes, (r) => {
    const end = bytes.length;
    r.tag();
    const taskId = r.string(end);
    let hostId = "";
    if (r.pos < end && bytes[r.pos] === HOST_ID_TAG) {
      r.tag();
      hostId = r.string(end);
    }
    return { at: r.pos, taskId, hostId };
  });
}

/** A job's part of a spec, decoded; undefined if it does not decode or names a task or host itself (it cannot be shared). */
function jobPart(bytes: Uint8Array): TaskSpec | undefined {
  try {
    const r = new BinaryReader(bytes);
    while (r.pos < r.len) {
      const [no, wireType] = r.tag();
      if (no === 1 || no === 4) return undefined;
      r.skip(wireType, no);
    }
    return fromBinary(TaskSpecSchema, bytes);
  } catch {
    return undefined;
  }
}

const sameDuration = (a: TaskSpec["timeout"], b: TaskSpec["timeout"]) => a === b || (a !== undefined && b !== undefined && a.seconds === b.seconds && a.nanos === b.nanos);
const sameTimestamp = (a: TaskSpec["deliverBy"], b: TaskSpec["deliverBy"]) => a === b || (a !== undefined && b !== undefined && a.seconds === b.seconds && a.nanos === b.nanos);

/** Do two specs share everything but their task and host ids? Steps and env by identity (a job's are the same objects for each of its tasks). */
function sameJobPart(a: TaskSpec, b: TaskSpec): boolean {
  return (
    a.jobId === b.jobId &&
    a.tenant === b.tenant &&
    a.steps.length === b.steps.length &&
    a.steps.every((s, i) => s === b.steps[i]) &&
    a.env === b.env &&
    a.workingDir === b.workingDir &&
    a.stdin === b.stdin &&
    sameDuration(a.timeout, b.timeout) &&
    sameTimestamp(a.deliverBy, b.deliverBy) &&
    a.idempotent === b.idempotent &&
    a.outputLimitBytes === b.outputLimitBytes &&
    sameTimestamp(a.createdAt, b.createdAt) &&
    !a.$unknown?.length &&
    !b.$unknown?.length
  );
}

/** Decodes a session order without trusting it: for routing at a proxy. */
export function peekSessionOrder(signed: SignedSessionOrder): SessionOrder | undefined {
  try {
    return fromBinary(SessionOrderSchema, signed.order);
  } catch {
    return undefined;
  }
}

/**
 * A task whose every step is the built-in ping. It runs nothing, reads
 * nothing and writes nothing on the host: the daemon only answers that it is
 * there, which the proxy in between could claim by itself anyway. So pings
 * are neither signed nor verified, which takes two public-key operations per
 * host off `rexmesh ping` across a fleet (about 40 µs at the controller and
 * 250 µs at the daemon each, measured in the issue-7 ping profile).
 */
export function isPingOnly(spec: TaskSpec): boolean {
  return spec.steps.length > 0 && spec.steps.every((s) => s.tool.case === "ping");
}

/** Decodes a signed task's spec without trusting it: for routing at a proxy, and for naming a task a daemon refuses. */
export function peekSpec(task: SignedTask): TaskSpec | undefined {
  try {
    return fromBinary(TaskSpecSchema, task.spec);
  } catch {
    return undefined;
  }
}

export class TaskRejected extends Error {}

/** Batch roots a verifier remembers as verified (oldest forgotten first). */
const VERIFIED_ROOTS = 256;

/**
 * The daemon's check before it runs anything: keys are trusted only when a
 * certificate chaining to the mesh CA, valid now and naming a controller,
 * endorsed them; a task only when one of those keys signed exactly its bytes.
 */
export class TaskVerifier {
  private readonly keys = new Map<string, { publicKey: KeyObject; notAfter: number; end?: ControllerEndKey }>();
  private readonly ca: X509Certificate;

  constructor(
    caPem: string,
    private readonly clock: Clock,
  ) {
    this.ca = new X509Certificate(caPem);
  }

  get size(): number {
    return this.keys.size;
  }

  /**
   * Adds the keys whose endorsement holds; returns how many were accepted.
   * Keys past their end are forgotten first: they verify nothing any more,
   * and a daemon up for months is handed a new key every fortnight.
   */
  addKeys(keys: readonly TaskSigningKey[]): number {
    let added = 0;
    const now = this.clock.now();
    for (const [id, k] of this.keys) if (k.notAfter <= now) this.keys.delete(id);
    for (const k of keys) {
      if (this.keys.has(k.keyId)) continue;
      try {
        const cert = new X509Certificate(k.controllerCertificate);
        if (!cert.checkIssued(this.ca) || !cert.verify(this.ca.publicKey)) continue;
        if (now < Date.parse(cert.validFrom) || now > Date.parse(cert.validTo)) continue;
        if (identityFromCertificate(cert).role !== "controller") continue;
        const notAfter = k.notAfter ? timestampMs(k.notAfter) : 0;
        if (notAfter <= now) continue;
        if (!verify("sha256", endorsedBytes(k.keyId, k.publicKey, notAfter), cert.publicKey, k.endorsement)) continue;
        const publicKey = ed25519PublicKey(k.publicKey);
        if (!publicKey) continue;
        // A key whose X25519 half is not the one its id names was changed on the way: not the controller's.
        const x25519 = pairedHalf("task-signing key", k.keyId, k.publicKey, k.x25519PublicKey);
        if (x25519 === "mismatch") continue;
        const end = x25519 && { id: controllerKeyId(x25519), publicKey: Buffer.from(x25519) };
        this.keys.set(k.keyId, { publicKey, notAfter, ...(end ? { end } : {}) });
        added++;
      } catch {
        // An unreadable key is simply not trusted.
      }
    }
    return added;
  }

  /**
   * The controller X25519 key to MAC task ends with: the one carried by the
   * valid signing key that expires last (the newest controller start's), or
   * undefined when none carries one (an earlier controller): ends are then
   * signed.
   */
  endKey(): ControllerEndKey | undefined {
    const now = this.clock.now();
    let best: { notAfter: number; end?: ControllerEndKey } | undefined;
    for (const k of this.keys.values()) if (k.end && k.notAfter > now && (!best || k.notAfter > best.notAfter)) best = k;
    return best?.end;
  }

  /** The order of a session whose signature holds; throws TaskRejected with the reason otherwise. */
  verifySession(signed: SignedSessionOrder): SessionOrder {
    if (signed.signature.length === 0) throw new TaskRejected("the session order is not signed");
    const key = this.keys.get(signed.keyId);
    if (!key) throw new TaskRejected(`the session order is signed with an unknown key ${JSON.stringify(signed.keyId)}`);
    if (key.notAfter <= this.clock.now()) throw new TaskRejected("the session order is signed with an expired key");
    if (!verify(null, signedBytes(SESSION_ORDER_PREFIX, signed.order), key.publicKey, signed.signature)) throw new TaskRejected("the session order's signature does not match: it was altered on the way");
    return fromBinary(SessionOrderSchema, signed.order);
  }

  /** The spec of a task whose signature holds; throws TaskRejected with the reason otherwise. */
  verify(task: SignedTask): TaskSpec {
    if (task.signature.length === 0) {
      const spec = peekSpec(task);
      if (spec && isPingOnly(spec)) return spec;
      throw new TaskRejected("the task is not signed");
    }
    const key = this.keys.get(task.keyId);
    if (!key) throw new TaskRejected(`the task is signed with an unknown key ${JSON.stringify(task.keyId)}`);
    if (key.notAfter <= this.clock.now()) throw new TaskRejected("the task is signed with an expired key");
    if (task.batch) this.verifyBatch(task, key.publicKey);
    else if (!verify(null, signedBytes(TASK_PREFIX, task.spec), key.publicKey, task.signature)) throw new TaskRejected("the task's signature does not match: it was altered on the way");
    return fromBinary(TaskSpecSchema, task.spec);
  }

  /** Roots of batches whose signature held (a host sent several tasks of one batch checks the signature once). */
  private readonly verifiedRoots = new Set<string>();

  /** A task signed as part of a batch: its path must lead from its spec to a root the key signed. */
  private verifyBatch(task: SignedTask, publicKey: KeyObject): void {
    const { index, leaves, path, salt } = task.batch!;
    const root = salt.length === SALT_BYTES ? rootFromProof(leafHash(salt, task.spec), index, leaves, path) : undefined;
    if (!root) throw new TaskRejected("the task's batch proof is malformed");
    const id = `${task.keyId}/${leaves}/${root.toString("hex")}/${Buffer.from(task.signature).toString("base64")}`;
    if (this.verifiedRoots.has(id)) return;
    if (!verify(null, batchBytes(leaves, root), publicKey, task.signature)) {
      throw new TaskRejected("the task's signature does not match its batch: it was altered on the way");
    }
    if (this.verifiedRoots.size >= VERIFIED_ROOTS) this.verifiedRoots.delete(this.verifiedRoots.values().next().value!);
    this.verifiedRoots.add(id);
  }
}
