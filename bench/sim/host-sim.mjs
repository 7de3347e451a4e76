// The host simulator (issue 7): many daemon identities in one process, for
// benchmarks only. Started and driven by bench/sim/fleet.mjs over the IPC
// channel of child_process.fork.
//
// Every simulated host is a real peer on the wire: its own certificate (one
// shared RSA key pair, one certificate per identity, issued here with the
// mesh CA), its own TLS connection from this process's loopback source
// address, one HTTP/2 session and one AgentStream (gRPC, length-prefixed
// protobuf frames written by hand over node:http2, no grpc-js channel).
//
// What it speaks, exactly as daemon/agent.ts does:
//   → hello {host_id, facts, heartbeat_ms, report_key} + credits (first frame)
//   ← welcome (+ signing keys, acks, the controller's presence nonce)
//   → a presence proof over the nonce and the proxy whose certificate the
//     host saw, signed with the report key (as the daemon does:
//     common/host-signing.ts), whenever a nonce comes
//   ← tasks      → one frame: a status per task + credits again (the daemon
//                  re-reports its credits after every frame carrying tasks)
//                  every task is verified as the daemon verifies it
//                  (common/task-signing.ts: the controller's endorsed key, the
//                  task's signature or its batch proof, its host): a task
//                  that fails is REJECTED with the verifier's reason
//                  all-ping task: SUCCEEDED, exit 0, "pong" (no ledger, no spawn)
//                  `exec true`: SUCCEEDED, exit 0, no output, the end MAC'd
//                  (under the key agreed with the controller's X25519 key,
//                  once one is checked) or else signed with the host's report
//                  key, as the daemon does (common/end-mac.ts; no spawn)
//                  anything else: REJECTED "the host simulator runs only ping and true"
//   ← status acks: the status leaves the outbox; unacknowledged statuses are
//                  sent again after a reconnect, as the daemon does.
//   ↔ heartbeats: an HTTP/2 PING every heartbeat (the daemon's grpc-js
//                  keepalive; the connection is dropped when one is not
//                  answered within 2 more intervals), and an empty frame when
//                  nothing was sent for IDLE_FRAME_INTERVALS heartbeats (the
//                  hello's heartbeat_ms); the stream is dropped after 3 of
//                  those without a frame. The hello's ping_ms says it PINGs
//                  (the proxy then watches for them instead of asking back).
// Simplifications (documented in the results): one verifier per simulator
// process (a batch's signature is checked once per process, not once per
// host: each host still checks its own proof), cancels are ignored, nothing
// is persisted. The proxy's certificate IS verified (chain to the mesh CA by
// OpenSSL, host name and role proxy as certs/tls.ts does). Each host's TLS
// context is built when the process starts, as a daemon builds its
// credentials when it starts, so a connect costs what connecting costs.
//
// Reconnects follow the daemon's backoff shape (common/backoff.ts): 1 s × 1.6
// per failed attempt, ±20 % jitter, capped (default 10 s here), reset after
// a healthy connection; a connection attempt not connected is given up
// after 20 s (grpc-js's connect timeout); once connected, a stream with no
// frame from the proxy (not even the welcome) for 3 heartbeat intervals is
// dropped, as the daemon's Heartbeat does. Those three timers count time
// less this process's own event-loop lateness ("own stalls" below): a
// daemon is alone on its machine, while here thousands of hosts share one
// loop, which in a storm falls tens of seconds behind on its own handshakes.
import http2 from "node:http2";
import tls from "node:tls";
import { X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { AgentStreamRequestSchema, AgentStreamResponseSchema } from "../../dist/gen/rexmesh/v1/agent_link_pb.js";
import { TaskSpecSchema, TaskStatusSchema, TaskState } from "../../dist/gen/rexmesh/v1/task_pb.js";
import { HostFactsSchema } from "../../dist/gen/rexmesh/v1/host_pb.js";
import { issueCertificate } from "../../dist/certs/ca.js";
import { HostReporter, OutputDigest } from "../../dist/common/host-signing.js";
import { identityFromSubjectAltName } from "../../dist/certs/identity.js";
import { TaskRejected, TaskVerifier } from "../../dist/common/task-signing.js";

import { IDLE_FRAME_INTERVALS } from "../../dist/common/grpc-link.js";

const METHOD_PATH = "/rexmesh.v1.AgentLinkService/AgentStream";
const EMPTY_FRAME = Buffer.from([0, 0, 0, 0, 0]);
const CREDITS = 4;

let cfg;
let hosts = [];
const verifiedProxyCerts = new Map(); // host + fingerprint256 → Error or null
let stopping = false;
/** Checks tasks as a daemon does (created at start, with the mesh CA). */
let verifier;
const EMPTY_SHA256 = new OutputDigest().digest();

/** The ids of the tasks answered since the task stats were last reset, by any host of this process (task ids are unique). */
const answered = new Set();

const stats = {
  connected: 0,
  welcomes: 0,
  reconnects: 0,
  failures: 0,
  firstError: undefined,
  pongs: 0,
  /** Tasks a host was handed again after answering them (a proxy resends what a host had on a stream that ended before the answer was acknowledged). */
  resent: 0,
  rejected: 0,
  /** Tasks whose signature or batch proof did not hold. */
  refused: 0,
  firstTaskAt: 0,
  lastPongAt: 0,
  fullAt: 0,
  unreadableCerts: 0,
  contextErrors: 0,
  unreadableCertError: undefined,
  /** Why connections ended: "<welcomed|connected, not welcomed|not connected>: <reason>" → count (digits folded). */
  drops: {},
  /** This process's event loop: its longest lateness, and all its lateness added up (see "own stalls"). */
  maxLoopLagMs: 0,
  stalledMs: 0,
  /** The longest time between two PINGs of one host on one connection. */
  maxPingGapMs: 0,
};

// ---- this process's own stalls --------------------------------------------------
// A daemon is one host on a machine of its own; here thousands of hosts share one event loop, on cores the
// proxy also uses. In a storm this loop falls behind by seconds (its own hosts' handshakes), and a timer
// that judges the proxy (the connect timeout, the keepalive's, the heartbeat's) would count that as the
// proxy's silence while its answer sits unread in the socket: the simulator would give up connections a
// daemon keeps, and make the storm it measures. So those timers count elapsed time less this process's
// own lateness over the same span, as the proxy's silence watch does (common/silence-watch.ts).
// cfg.countOwnStalls restores plain elapsed time (to show the difference).
const LAG_TICK_MS = 50;
let lastLagTick = Date.now();
setInterval(() => {
  const now = Date.now();
  const lag = now - lastLagTick - LAG_TICK_MS;
  lastLagTick = now;
  if (lag <= 0) return;
  stats.stalledMs += lag;
  if (lag > stats.maxLoopLagMs) stats.maxLoopLagMs = lag;
}, LAG_TICK_MS).unref();

/** This process's lateness so far, a stall still going on included. */
function stalledSoFar(now) {
  return stats.stalledMs + Math.max(0, now - lastLagTick - LAG_TICK_MS);
}

/** A moment, to measure a wait from with waited(). */
function mark(now = Date.now()) {
  return { at: now, stalled: stalledSoFar(now) };
}

/** Milliseconds since `m` in which this process was not itself late (all of them with cfg.countOwnStalls). */
function waited(m, now = Date.now()) {
  return cfg.countOwnStalls ? now - m.at : now - m.at - (stalledSoFar(now) - m.stalled);
}

// ---- framing ----------------------------------------------------------------

function grpcFrame(bytes) {
  const out = Buffer.allocUnsafe(5 + bytes.byteLength);
  out[0] = 0;
  out.writeUInt32BE(bytes.byteLength, 1);
  out.set(bytes, 5);
  return out;
}

function deframer(onMessage) {
  let buf;
  return (chunk) => {
    buf = buf === undefined ? chunk : Buffer.concat([buf, chunk]);
    while (buf !== undefined && buf.length >= 5) {
      const len = buf.readUInt32BE(1);
      if (buf.length < 5 + len) break;
      const msg = buf.subarray(5, 5 + len);
      buf = buf.length === 5 + len ? undefined : buf.subarray(5 + len);
      onMessage(msg);
    }
  };
}

// ---- proxy certificate check --------------------------------------------------
// OpenSSL verifies the chain against the mesh CA (the only CA in every
// context: no root store is loaded); this adds what clientTlsOptions adds
// (certs/tls.ts): the usual host-name check and the role proxy, once per
// distinct proxy certificate.

/** The proxy's identity from its certificate (named in presence proofs, as the daemon does), or the reason it is refused. */
function checkProxy(host, cert) {
  const key = `${host}\0${cert.fingerprint256}`;
  let verdict = verifiedProxyCerts.get(key);
  if (verdict === undefined) {
    verdict = tls.checkServerIdentity(host, cert) ?? null;
    if (!verdict) {
      try {
        const peer = identityFromSubjectAltName(cert.subjectaltname);
        verdict = peer.role === "proxy" ? { peer } : new Error("the server is not a rexmesh proxy");
      } catch (err) {
        verdict = err;
      }
    }
    verifiedProxyCerts.set(key, verdict);
  }
  return verdict;
}

// ---- one simulated host -------------------------------------------------------

class SimHost {
  constructor(id, certPem, proxy) {
    this.id = id;
    this.certPem = certPem;
    // Its report key, endorsed by its own certificate: the controller counts it as held by its proxy only with a proof.
    this.reporter = new HostReporter({ certPem, keyPem: cfg.keyPem, caPem: cfg.caPem }, { now: () => Date.now() }, { role: "host", scope: cfg.tenant ?? "default", id });
    const [host, port] = proxy.split(":");
    this.host = host;
    this.port = Number(port);
    this.session = undefined;
    this.stream = undefined;
    this.connected = false;
    this.lastSent = 0;
    this.lastRecv = undefined;
    this.nextBackoff = cfg.backoff.initialMs;
    this.connectedAt = 0;
    this.outbox = new Map(); // taskId → TaskStatus, until acknowledged
    this.retry = undefined;
    this.welcomeTimer = undefined;
  }

  helloBytes() {
    const frame = create(AgentStreamRequestSchema, {
      hello: {
        hostId: this.id,
        heartbeatMs: cfg.heartbeatMs * IDLE_FRAME_INTERVALS,
        pingMs: cfg.heartbeatMs,
        reportKey: this.reporter.key,
        facts: create(HostFactsSchema, {
          os: "linux", osFamily: "debian", arch: "x86_64", kernel: "6.1.0-sim", hostname: this.id,
          addresses: [cfg.localAddress], daemonVersion: "sim", tools: ["ping", "exec"], features: ["batch-signature"],
        }),
      },
      credits: CREDITS,
      statuses: [...this.outbox.values()],
    });
    return grpcFrame(toBinary(AgentStreamRequestSchema, frame));
  }

  connect(onSettled) {
    if (stopping) return;
    let settled = false;
    const settle = (ok) => {
      if (settled) return;
      settled = true;
      onSettled?.(ok);
    };
    const secureContext = this.secureContext;
    if (!secureContext) {
      stats.failures++;
      settle(false);
      return;
    }
    const session = http2.connect(`https://${this.host}:${this.port}`, {
      createConnection: () => {
        const socket = tls.connect({
          host: this.host,
          port: this.port,
          localAddress: cfg.localAddress,
          secureContext,
          ALPNProtocols: ["h2"],
          checkServerIdentity: (name, cert) => {
            const verdict = checkProxy(name, cert);
            if (verdict instanceof Error) return verdict;
            this.proxyPeer = verdict.peer;
            return undefined;
          },
        });
        return socket;
      },
    });
    this.session = session;
    let errorText;
    session.on("error", (e) => (errorText ??= e.code ?? e.message));
    const stream = session.request({ ":method": "POST", ":path": METHOD_PATH, "content-type": "application/grpc", te: "trailers" });
    this.stream = stream;
    stream.on("error", (e) => (errorText ??= e.code ?? e.message));
    stream.on("data", deframer((bytes) => this.onFrame(bytes, settle)));
    stream.on("response", (headers) => {
      const st = headers["grpc-status"];
      if (st !== undefined && st !== "0") errorText = `grpc-status ${st}: ${headers["grpc-message"] ?? ""}`;
    });
    stream.on("trailers", (t) => {
      if (t["grpc-status"] !== undefined && t["grpc-status"] !== "0") errorText = `grpc-status ${t["grpc-status"]}: ${decodeURIComponent(t["grpc-message"] ?? "")}`;
    });
    const onGone = (err) => {
      if (this.session !== session) return;
      this.drop(errorText ?? err?.message ?? "stream closed");
      settle(false);
    };
    stream.on("close", () => onGone());
    session.on("close", () => onGone());
    session.on("goaway", () => {});
    // As with grpc-js: the connection (TCP, TLS, HTTP/2 settings) must be up within the connect timeout;
    // after that the heartbeat rule applies (no frame, not even the welcome, for 3 intervals: dropped).
    this.linkUp = false;
    session.once("connect", () => {
      clearTimeout(this.welcomeTimer);
      this.linkUp = true;
      this.lastRecv = mark();
    });
    const started = mark();
    const check = () => {
      if (this.session !== session || this.linkUp) return;
      const left = cfg.connectTimeoutMs - waited(started);
      if (left > 0) {
        this.welcomeTimer = setTimeout(check, left);
        return;
      }
      errorText = "connect timeout";
      session.destroy(new Error(`not connected after ${cfg.connectTimeoutMs} ms`));
    };
    this.welcomeTimer = setTimeout(check, cfg.connectTimeoutMs);
    stream.write(this.helloBytes());
    this.lastSent = Date.now();
  }

  drop(reason) {
    clearTimeout(this.welcomeTimer);
    const why = `${this.connected ? "welcomed" : this.linkUp ? "connected, not welcomed" : "not connected"}: ${String(reason).replace(/\d+/g, "N").slice(0, 120)}`;
    stats.drops[why] = (stats.drops[why] ?? 0) + 1;
    const session = this.session;
    this.session = undefined;
    this.stream = undefined;
    this.linkUp = false;
    this.pingSentAt = undefined;
    if (this.connected) {
      this.connected = false;
      stats.connected--;
      stats.fullAt = 0;
      if (Date.now() - this.connectedAt > cfg.healthyAfterMs) this.nextBackoff = cfg.backoff.initialMs;
    } else {
      stats.failures++;
      stats.firstError ??= reason;
    }
    session?.destroy();
    if (!stopping) this.scheduleReconnect();
  }

  scheduleReconnect() {
    const base = this.nextBackoff;
    this.nextBackoff = Math.min(cfg.backoff.maxMs, base * cfg.backoff.multiplier);
    const spread = base * cfg.backoff.jitter;
    const delay = Math.max(0, Math.round(base - spread + Math.random() * 2 * spread));
    this.retry = setTimeout(() => {
      this.retry = undefined;
      stats.reconnects++;
      this.connect();
    }, delay);
  }

  send(frame) {
    if (!this.stream || this.stream.destroyed) return;
    this.stream.write(frame);
    this.lastSent = Date.now();
  }

  onFrame(bytes, settle) {
    this.lastRecv = mark();
    const frame = fromBinary(AgentStreamResponseSchema, bytes);
    if (frame.welcome && !this.connected) {
      clearTimeout(this.welcomeTimer);
      this.connected = true;
      this.connectedAt = Date.now();
      stats.connected++;
      stats.welcomes++;
      if (stats.connected === hosts.length) stats.fullAt = Date.now();
      settle(true);
    }
    for (const ack of frame.statusAcks) this.outbox.delete(ack.taskId);
    if (frame.presenceNonce.length > 0) {
      // Bound to the link by the nonce and to the proxy whose certificate this host saw, as the daemon binds it.
      const { proof, salt } = this.reporter.prove(frame.presenceNonce, this.proxyPeer);
      this.send(grpcFrame(toBinary(AgentStreamRequestSchema, create(AgentStreamRequestSchema, { presenceNonce: frame.presenceNonce, presenceProof: proof, presenceSalt: salt }))));
    }
    if (frame.signingKeys.length > 0) verifier.addKeys(frame.signingKeys);
    if (frame.tasks.length === 0) return;
    const now = Date.now();
    if (!stats.firstTaskAt) stats.firstTaskAt = now;
    const statuses = [];
    for (const signed of frame.tasks) {
      let spec;
      let refused;
      try {
        spec = verifier.verify(signed);
      } catch (err) {
        if (!(err instanceof TaskRejected)) continue;
        spec = fromBinary(TaskSpecSchema, signed.spec);
        refused = err.message;
        stats.refused++;
        stats.refusedWhy ??= refused;
      }
      const isPing = spec.steps.length > 0 && spec.steps.every((s) => s.tool.case === "ping");
      const isTrue = spec.steps.length === 1 && spec.steps[0].tool.case === "exec" && spec.steps[0].tool.value.argv.join(" ") === "true";
      const ok = refused === undefined && (isPing || isTrue) && spec.hostId === this.id;
      const status = create(TaskStatusSchema, ok
        ? { taskId: spec.taskId, hostId: this.id, state: TaskState.SUCCEEDED, time: timestampFromMs(now), exitCode: 0, message: isPing ? "pong" : "" }
        : { taskId: spec.taskId, hostId: this.id, state: TaskState.REJECTED, time: timestampFromMs(now), message: refused ?? (spec.hostId === this.id ? "the host simulator runs only ping and true" : "the task is addressed to another host") });
      if (answered.has(spec.taskId)) stats.resent++;
      else if (ok) stats.pongs++;
      else stats.rejected++;
      answered.add(spec.taskId);
      if (!isPing) {
        // What the daemon MACs or signs on every end but a ping's: the controller checks it against what it received.
        status.outputSha256 = EMPTY_SHA256;
        this.reporter.signEnd(status, verifier.endKey?.());
      }
      this.outbox.set(spec.taskId, status);
      statuses.push(status);
    }
    // The proxy spent a credit per task; the daemon sends its true count back after every frame with tasks.
    this.send(grpcFrame(toBinary(AgentStreamRequestSchema, create(AgentStreamRequestSchema, { statuses, credits: CREDITS }))));
    stats.lastPongAt = Date.now();
  }

  close() {
    clearTimeout(this.retry);
    clearTimeout(this.welcomeTimer);
    this.session?.destroy();
  }
}

// ---- heartbeats: one sweep per second over all hosts ---------------------------

function heartbeatSweep() {
  const now = Date.now();
  const idleFrameMs = cfg.heartbeatMs * IDLE_FRAME_INTERVALS;
  for (const h of hosts) {
    if (!h.session || !h.linkUp) continue;
    if (waited(h.lastRecv, now) > idleFrameMs * 3) {
      h.drop("proxy heartbeat lost");
      continue;
    }
    if (h.pingSentAt !== undefined && waited(h.pingSentAt, now) > cfg.heartbeatMs * 2) {
      h.drop("keepalive timeout");
      continue;
    }
    if (h.pingSentAt === undefined && now - (h.lastPingAt ?? 0) >= cfg.heartbeatMs) {
      const session = h.session;
      if (h.pingSession === session) stats.maxPingGapMs = Math.max(stats.maxPingGapMs, now - h.lastPingAt);
      h.pingSession = session;
      h.pingSentAt = mark(now);
      h.lastPingAt = now;
      try {
        session.ping((err) => {
          if (!err && h.session === session) h.pingSentAt = undefined;
        });
      } catch {
        h.pingSentAt = undefined;
      }
    }
    if (now - h.lastSent >= idleFrameMs) h.send(EMPTY_FRAME);
  }
}

// ---- commands -------------------------------------------------------------------

async function start(msg) {
  cfg = {
    heartbeatMs: 10_000,
    connectTimeoutMs: 20_000,
    healthyAfterMs: 10_000,
    concurrency: 64,
    ...msg,
    backoff: { initialMs: 1000, multiplier: 1.6, jitter: 0.2, maxMs: 10_000, ...(msg.backoff ?? {}) },
  };
  const ca = { certPem: readFileSync(cfg.caCertFile, "utf8"), keyPem: readFileSync(cfg.caKeyFile, "utf8") };
  cfg.caPem = ca.certPem;
  verifier = new TaskVerifier(ca.certPem, { now: () => Date.now() });
  const clock = { now: () => Date.now() };
  const t0 = performance.now();
  for (let i = 0; i < cfg.ids.length; i++) {
    const id = cfg.ids[i];
    let certPem;
    for (let attempt = 0; ; attempt++) {
      certPem = issueCertificate(ca, { clock, identity: { role: "host", scope: cfg.tenant ?? "default", id }, publicKeyPem: cfg.publicKeyPem, validityMs: 86_400_000 });
      // About 1 in 65,536 certificates from certs/ca.ts cannot be read by OpenSSL (a serial number whose
      // DER INTEGER keeps a redundant leading zero: ERR_OSSL_ASN1_ILLEGAL_PADDING); issue that one again.
      try {
        new X509Certificate(certPem);
        break;
      } catch (err) {
        stats.unreadableCerts++;
        stats.unreadableCertError ??= `${err.code ?? ""} ${err.message}`;
        if (attempt > 5) throw err;
      }
    }
    const host = new SimHost(id, certPem, cfg.proxies[i % cfg.proxies.length]);
    // Each host's TLS context (its key, its own certificate, the mesh CA as the only trust anchor) is built
    // here, as a daemon builds its credentials when it starts (~1-2 ms of CPU each), and kept across
    // reconnects as grpc-js keeps a channel's: a connect measures connecting, not starting.
    try {
      host.secureContext = tls.createSecureContext({ key: cfg.keyPem, cert: certPem, ca: cfg.caPem, minVersion: "TLSv1.3" });
    } catch (err) {
      stats.contextErrors++;
      stats.firstError ??= `${id}: ${err.code ?? ""} ${err.message}`;
    }
    hosts.push(host);
  }
  const issueMs = Math.round(performance.now() - t0);
  setInterval(heartbeatSweep, 1000).unref();
  return { issued: hosts.length, issueMs };
}

/** Opens every host's stream, at most `concurrency` handshakes in flight. */
async function open() {
  const t0 = performance.now();
  let next = 0;
  await new Promise((resolve) => {
    let inFlight = 0;
    const pump = () => {
      while (inFlight < cfg.concurrency && next < hosts.length) {
        const h = hosts[next++];
        inFlight++;
        h.connect(() => {
          inFlight--;
          pump();
        });
      }
      if (inFlight === 0 && next >= hosts.length) resolve();
    };
    pump();
  });
  return { openMs: Math.round(performance.now() - t0), connected: stats.connected };
}

function report() {
  const m = process.memoryUsage();
  const cpu = process.cpuUsage();
  return { ...stats, hosts: hosts.length, rss: m.rss, heapUsed: m.heapUsed, cpuMs: Math.round((cpu.user + cpu.system) / 1000) };
}

process.on("message", async (msg) => {
  try {
    let r;
    switch (msg.cmd) {
      case "start": r = await start(msg); break;
      case "open": r = await open(); break;
      case "stats": r = report(); break;
      case "reset-task-stats": stats.firstTaskAt = 0; stats.lastPongAt = 0; stats.pongs = 0; stats.resent = 0; stats.rejected = 0; stats.refused = 0; answered.clear(); r = {}; break;
      case "stop":
        stopping = true;
        for (const h of hosts) h.close();
        r = {};
        setTimeout(() => process.exit(0), 50);
        break;
      default: throw new Error(`unknown command ${msg.cmd}`);
    }
    process.send({ id: msg.id, ...r });
  } catch (e) {
    process.send({ id: msg.id, error: String(e?.stack ?? e) });
  }
});
process.on("disconnect", () => process.exit(0));
// Counts go to the parent twice a second while they change.
let lastSentCount = -1;
setInterval(() => {
  if (stats.connected !== lastSentCount) {
    lastSentCount = stats.connected;
    process.send?.({ event: "count", connected: stats.connected, fullAt: stats.fullAt, at: Date.now() });
  }
}, 250).unref();
process.send({ ready: true, pid: process.pid });
