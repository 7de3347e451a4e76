/**
 * Every size limit on what enters rexmesh, in one place. Each limit is
 * enforced where the input enters (the module named beside it) and listed in
 * docs/security.md, "Input limits", with the test that proves it. Inputs from
 * callers are refused with INVALID_ARGUMENT naming the limit; what a peer
 * reports about itself (facts) and what the audit log keeps are truncated
 * with {@link TRUNCATED} instead, so that a record is never lost because a
 * field was too long.
 */
import { create } from "@bufbuild/protobuf";
import { HostFactsSchema, type HostFacts } from "../gen/rexmesh/v1/host_pb.js";
import { InvalidArgumentError, ResourceExhaustedError } from "./errors.js";

const KiB = 1024;
const MiB = 1024 * KiB;

export const LIMITS = {
  // ---- many jobs in one call (SubmitJobs) ------------------------------------
  /** Jobs in one SubmitJobs request. */
  batchJobs: 1000,

  // ---- identities (certs/identity.ts) ---------------------------------------
  /** Host ids, tenants, regions, proxy and operator names: one SAN URI segment. */
  idChars: 128,

  // ---- enrollment (certs/enrollment.ts, controller/enroll.ts; unauthenticated) ----
  /** A CSR in PEM, refused before it is decoded. */
  csrBytes: 16 * KiB,
  /** A zero certificate sent in the request body, refused before it is parsed. */
  bootstrapCertificateBytes: 16 * KiB,
  /** The zero certificate key's signature over the request (RSA 4096 is 512 bytes). */
  bootstrapSignatureBytes: 1 * KiB,
  /** A join token as presented, refused before it is hashed. */
  tokenChars: 256,
  /** RSA keys certified for hosts: modulus size in bits, and the only public exponent accepted. */
  rsaMinBits: 2048,
  rsaMaxBits: 4096,
  rsaExponent: 65537,

  // ---- open (unauthenticated) listeners (common/open-unary-server.ts) --------
  /** Largest request or response message. */
  openMessageBytes: 64 * KiB,
  /** Calls in flight on one connection. */
  openStreamsPerConnection: 8,
  /** Connections open at once from one remote address. */
  openConnectionsPerAddress: 32,
  /** Connections open at once in all. */
  openConnections: 1024,
  /** Time a new connection has to complete its TLS handshake. */
  openHandshakeMs: 10_000,
  /** A connection with no call in flight for this long is closed (the handshake counts). */
  openIdleMs: 30_000,
  /** One call, from its first frame to its answer (the relay to the controller waits 30 s at most). */
  openCallMs: 60_000,

  // ---- main ports (common/connect-server.ts, common/grpc-link.ts) ------------
  /**
   * A unary or server-streaming call's request must have arrived whole by
   * then, whatever its grpc-timeout asks (a shorter one ends it sooner):
   * DEADLINE_EXCEEDED. 16 MiB, the largest message, needs about 280 KB/s.
   */
  requestArrivalMs: 60_000,
  /** Calls in flight on one connection to the controller; HTTP/2 makes a client wait for a free one beyond. */
  streamsPerConnection: 256,

  // ---- links: ProxyLink and AgentLink (common/link-session.ts) ---------------
  /** The accepting side waits this long for the hello that opens a link: DEADLINE_EXCEEDED after. */
  linkHelloMs: 20_000,
  /** Every link's heartbeat interval, whatever a hello asks for, is held within these. */
  heartbeatMinMs: 1000,
  heartbeatMaxMs: 300_000,

  // ---- hosts (controller/inventory.ts, controller/request-limits.ts) ---------
  labelsPerHost: 64,
  labelKeyChars: 63,
  labelValueChars: 256,
  /** Label keys set plus removed in one SetHostLabels request. */
  labelChangesPerRequest: 128,
  /** Each text fact (os, kernel, hostname, ...), truncated beyond. */
  factChars: 256,
  /** Elements of a list fact (addresses, tools), dropped beyond. */
  factListItems: 64,
  /** All facts of one host together, in characters; list elements are dropped from the end beyond. */
  factsTotalChars: 8 * KiB,
  /** Sibling hashes in a task's batch proof (docs/fan-out.md): a tree of at most 2^20 tasks is 20 levels high; a longer path is refused before any hashing. */
  batchProofHashes: 20,
  /** Elements (field occurrences, nested ones included) of one message received on a host's link, counted from the wire format before decoding (common/decode-budget.ts). */
  messageElements: 1_000_000,

  // ---- queries (controller/query.ts) -----------------------------------------
  queryChars: 8 * KiB,
  queryDepth: 64,
  /** A `~` glob value: matching costs pattern × value length per host. */
  globChars: 256,

  // ---- documents (controller/documents.ts, params.ts, template.ts) ----------
  documentChars: 1 * MiB,
  documentSteps: 64,
  alternativesPerStep: 16,
  paramsPerDocument: 256,
  /** A parameter `pattern`, in characters (compiled by a linear-time engine). */
  patternChars: 1 * KiB,
  /** A string parameter's value unless its `maxLength` says otherwise, and the largest `maxLength`. */
  paramValueChars: 4 * KiB,
  paramMaxLengthLimit: 128 * KiB,
  paramListItems: 1024,
  templateChars: 1 * MiB,

  // ---- jobs (controller/validate.ts, controller/request-limits.ts) ----------
  jobSteps: 64,
  /** One argv element, script, path or interpreter argument (Linux MAX_ARG_STRLEN). */
  argBytes: 128 * KiB,
  /** Entries of an ansible step's `vars` or `module_args` (each name and value is an argument: `argBytes`). */
  toolVars: 64,
  envVars: 128,
  envNameChars: 128,
  envValueBytes: 32 * KiB,
  /** Names and values of all variables together. */
  envTotalBytes: 256 * KiB,
  stdinBytes: 1 * MiB,
  workingDirBytes: 4 * KiB,
  /** Explicit host ids in one submit. */
  hostIdsPerJob: 100_000,
  idempotencyKeyChars: 256,
  /** Parameter values given to a document run (each is also checked by its declaration). */
  paramsGivenPerJob: 256,
  paramGivenBytes: 256 * KiB,
  /** Job ids, document names and references in requests. */
  refChars: 256,
  /** A results or tasks bundle given to ImportBundle (the RPC message limit is 16 MiB). */
  bundleBytes: 16 * MiB,

  // ---- audit (controller/audit.ts): truncated with TRUNCATED, never refused --
  /** `what` and `reason`. */
  auditTextChars: 1000,
  /** `kind`, `tenant`, `actor`, `jobId` and each host id. */
  auditFieldChars: 256,
  /** Host ids kept per event; `hostCount` still counts them all. */
  auditHosts: 20,

  // ---- link frames (common/link-limits.ts) -----------------------------------
  /** Task ids in link frames and bundles (the controller makes them: a letter and 21 characters). */
  taskIdChars: 256,
  /** Tasks a proxy takes on from one host's reports (never sent them: the host brought them along) and holds at once. */
  takenOnTasksPerHost: 10_000,
  /**
   * Characters of message and signal that the status runs of one proxy frame
   * stand for in all (each run's text times its tasks): what a frame of
   * whole statuses carries at most, so that a run cannot make the
   * controller store one long message once per task it names.
   */
  statusRunTextChars: 4 * MiB,
  /**
   * Characters of a task status's message (why, in words) as a proxy takes
   * it from a host and as the controller takes it from a proxy; longer ones
   * are cut. Honest messages are a line or two; one near the link's 16 MiB
   * message limit would make every frame that carries it too large to send.
   */
  statusMessageChars: 64 * KiB,
  /** Characters of a status's signal name ("SIGKILL"); longer ones are cut. */
  statusSignalChars: 64,

  // ---- operators (controller/request-limits.ts) ------------------------------
  /**
   * WatchJob (and SubmitAndWatch) streams one operator identity may hold
   * open at once. A CI pipeline follows as many jobs as it runs in
   * parallel under one identity; each stream costs the controller an
   * iterator and a listener.
   */
  watchesPerOperator: 128,

  /** Schedules of one tenant (rexmesh schedules). */
  schedulesPerTenant: 100,
  /** A schedule's job (SubmitJobRequest, encoded): schedules are read whole on every wake of the scheduler. */
  scheduleJobBytes: 256 * KiB,
  /** A schedule's cron expression, and its time zone's name. */
  cronChars: 256,
  // ---- events and triggers (common/host-event.ts, daemon/watchers.ts, controller/triggers.ts) ----
  /** An event's id and kind, and each detail key: letters, digits, '.', '_', '-'. */
  eventNameChars: 64,
  /** Details of one event. */
  eventDetails: 16,
  /** One detail's value. */
  eventDetailValueChars: 256,
  /** Watchers of one daemon (its watch file). */
  watchersPerHost: 32,
  /** The shortest interval a watcher may poll at. */
  watchIntervalMinMs: 1000,
  /** A command watcher's run: killed after this, counted as exit code -1. */
  watchCommandMs: 30_000,
  /** Events the controller keeps (oldest dropped first); an event's id is remembered as long as the event. */
  eventsKept: 50_000,
  /** Events are dropped this long after they were received. */
  eventRetentionMs: 7 * 24 * 3600_000,
  /**
   * Events one host may bring at once, then one a second on average (a
   * token bucket at the controller's intake): beyond, they are dropped,
   * acknowledged and counted, so that one flapping or hostile host neither
   * fills the store nor holds up everybody's evaluation.
   */
  eventsBurstPerHost: 120,
  /**
   * Events a daemon keeps per host while they wait for their ack (a long
   * cut-off): beyond, new ones are dropped and, once the queue has drained
   * to half, one `events.dropped` event says how many and since when.
   */
  eventsQueuedPerHost: 10_000,
  eventsPerHostPerSecond: 1,
  /** Triggers of one tenant. */
  triggersPerTenant: 100,
  /** A trigger's match expression, and its terms. */
  triggerMatchChars: 1024,
  triggerMatchTerms: 16,
  /** Events in one page of ListEvents (50 when not said). */
  eventsPage: 1000,
  /** Tasks in one page of a host's queue (ListHostTasks; 50 when not said). */
  hostTasksPage: 500,
  // ---- sessions (common/session-frames.ts, controller/sessions.ts) ------------
  /** Bytes a receiver grants on each hop of a session, each way: what a relay may hold of one session's data in one direction. */
  sessionWindowBytes: 256 * KiB,
  /** The largest grant a peer may give (a larger one is refused as a protocol error). */
  sessionWindowMaxBytes: 16 * MiB,
  /** Bytes of one data item of a session frame; a sender cuts larger writes. */
  sessionDataBytes: 32 * KiB,
  /** Data items in one session frame. */
  sessionDataItems: 64,
  /** Keep-alive interval of session streams; a peer silent for three of them is gone. */
  sessionKeepaliveMs: 5_000,
  /** A session's program and arguments, counted together. */
  sessionArgs: 256,
  /** TERM of a session. */
  sessionTermChars: 64,
  /** Columns and rows of a session's terminal. */
  sessionWindowCells: 4096,
  /** A session's close message; longer ones are cut. */
  sessionMessageChars: 1000,
  /**
   * Connection events a session side holds waiting to be sent (they cost
   * no credit, so a peer could otherwise make a side queue them without
   * end): past it the session ends.
   */
  sessionQueuedConnEvents: 4096,
  /**
   * Bytes of one session's data stream one end keeps sealed until the other
   * has opened them, to send again on a resumed leg: in flight through the
   * hops' windows, a few hundred KiB; past it the session ends.
   */
  sessionUnopenedBytes: 4 * MiB,
  /** Resizes and signals the controller keeps until the host has opened them (see sessionUnopenedBytes). */
  sessionUnopenedControl: 1024,
  /** How long a session whose leg was cut waits for a new one (its proxy restarted, its host failed over) before it ends. */
  sessionResumeMs: 30_000,
  /** Operators watching one session at once (sessions join); each may be 4 MiB behind before it is dropped. */
  sessionWatchers: 8,
  /** Credit a port forward's connection starts with, each way: what one connection holds at either end when its reader stalls. */
  forwardWindowBytes: 256 * KiB,
  /** Connections of one port forward open at once. */
  forwardConnections: 128,
  /** How long a session order is good for: the host opens it before then, the proxy's and the host's legs must join by then. */
  sessionOpenMs: 20_000,
  /** Sessions open at once per host (a host refuses orders beyond). */
  sessionsPerHost: 32,
  /** Sessions one operator identity may hold open at once. */
  sessionsPerOperator: 16,

  // ---- clients (common/connect-dial.ts) --------------------------------------
  /** Dialling plus the TLS handshake; a silent address fails after this. */
  connectTimeoutMs: 10_000,
  /** Keep-alive PING interval on an open connection, and how long an answer may take. */
  keepaliveMs: 30_000,
  keepaliveTimeoutMs: 15_000,
} as const;

/** What ends a truncated text: the reader sees that something was cut. */
export const TRUNCATED = "…[truncated]";

/** `text` cut to at most `max` characters, the cut marked with {@link TRUNCATED}. */
export function truncate(text: string, max: number): string {
  if (text.length <= max) return text;
  if (max <= TRUNCATED.length) return TRUNCATED.slice(0, max);
  return text.slice(0, max - TRUNCATED.length) + TRUNCATED;
}

/**
 * Text from elsewhere made safe to print on a terminal: control characters
 * (escape sequences among them, which could rewrite the screen or the
 * title) become U+FFFD. For what a peer says that the CLI shows as it is.
 */
export function printable(text: string): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/[\u0000-\u001f\u007f-\u009f]/g, "\ufffd");
}

/** A value for an error message: cut short, so a huge input never travels back in the refusal. */
export function preview(text: string, max = 64): string {
  return JSON.stringify(text.length > max ? `${text.slice(0, max)}…` : text);
}

/** Throws InvalidArgumentError unless `value` is at most `max` characters. */
export function checkChars(field: string, value: string, max: number): string {
  if (value.length > max) throw new InvalidArgumentError(`${field} is longer than ${max} characters (${value.length})`);
  return value;
}

/** Throws InvalidArgumentError unless `value` is at most `max` bytes (UTF-8 for text). */
export function checkBytes(field: string, value: string | Uint8Array, max: number): void {
  // A string has at most 3 UTF-8 bytes per UTF-16 unit: skip the count when it cannot exceed.
  const n = typeof value === "string" ? (value.length * 3 <= max ? 0 : Buffer.byteLength(value)) : value.length;
  if (n > max) throw new InvalidArgumentError(`${field} is larger than ${max} bytes (${n})`);
}

/** Throws InvalidArgumentError unless a list or map holds at most `max` entries. */
export function checkCount(field: string, count: number, max: number): void {
  if (count > max) throw new InvalidArgumentError(`${field}: at most ${max} allowed (${count} given)`);
}

/**
 * Host facts as a daemon reports them, cut to the fact limits: each text
 * truncated, each list to {@link LIMITS.factListItems} elements (each
 * truncated), and list elements dropped from the end until all fit in
 * {@link LIMITS.factsTotalChars}. A peer that reports too much loses the
 * excess, never its place in the inventory. `truncated` says whether anything was cut.
 */
export function clampFacts(facts: HostFacts): { facts: HostFacts; truncated: boolean } {
  let truncated = false;
  const text = (s: string) => {
    const t = truncate(s, LIMITS.factChars);
    if (t !== s) truncated = true;
    return t;
  };
  const list = (l: readonly string[]) => {
    if (l.length > LIMITS.factListItems) truncated = true;
    return l.slice(0, LIMITS.factListItems).map(text);
  };
  const out = create(HostFactsSchema, {
    os: text(facts.os),
    osFamily: text(facts.osFamily),
    arch: text(facts.arch),
    kernel: text(facts.kernel),
    hostname: text(facts.hostname),
    addresses: list(facts.addresses),
    daemonVersion: text(facts.daemonVersion),
    tools: list(facts.tools),
    features: list(facts.features),
  });
  const size = () =>
    out.os.length + out.osFamily.length + out.arch.length + out.kernel.length + out.hostname.length + out.daemonVersion.length +
    out.addresses.reduce((n, a) => n + a.length, 0) + out.tools.reduce((n, t) => n + t.length, 0) + out.features.reduce((n, f) => n + f.length, 0);
  while (size() > LIMITS.factsTotalChars && (out.addresses.length > 0 || out.tools.length > 0 || out.features.length > 0)) {
    truncated = true;
    if (out.addresses.length > 0 && out.addresses.length >= out.tools.length) out.addresses.pop();
    else if (out.tools.length > 0) out.tools.pop();
    else out.features.pop();
  }
  return { facts: out, truncated };
}

/**
 * Counts what one key (an operator, a remote address) holds open at once,
 * refusing more than `max` with RESOURCE_EXHAUSTED. `acquire` returns the
 * release function; call it exactly once.
 */
export class ConcurrencyLimit {
  private readonly held = new Map<string, number>();

  constructor(
    private readonly max: number,
    private readonly what: string,
  ) {}

  acquire(key: string): () => void {
    const n = this.held.get(key) ?? 0;
    if (n >= this.max) throw new ResourceExhaustedError(`too many ${this.what} at once (at most ${this.max})`);
    this.held.set(key, n + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const left = (this.held.get(key) ?? 1) - 1;
      if (left > 0) this.held.set(key, left);
      else this.held.delete(key);
    };
  }

  /** How many `key` holds now. */
  count(key: string): number {
    return this.held.get(key) ?? 0;
  }
}
