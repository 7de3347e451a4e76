import { create } from "@bufbuild/protobuf";
import { requireRole, type PeerIdentity } from "../certs/identity.js";
import type { Clock } from "../common/clock.js";
import { InvalidArgumentError, PermissionDeniedError } from "../common/errors.js";
import type { FrameLink } from "../common/frame-link.js";
import { LinkSession } from "../common/link-session.js";
import type { Logger } from "../common/logger.js";
import {
  CancelTaskSchema,
  ProxyStreamResponseSchema,
  type HostPresence,
  type ProxyLoad,
  type ProxyStreamRequest,
  type ProxyStreamResponse,
} from "../gen/rexmesh/v1/proxy_link_pb.js";
import { OutputAckSchema, StatusAckSchema, TaskState } from "../gen/rexmesh/v1/task_pb.js";
import { isTerminal } from "../common/task-state.js";
import { reportedSince, type Inventory } from "./inventory.js";
import { BATCH_PROOF_BYTES, checksBatches, type TaskSigner } from "../common/task-signing.js";
import type { Revocations } from "./revocation.js";
import type { JobManager, ProxyPort } from "./jobs.js";
import { randomBytes } from "node:crypto";
import type { HostKeyVerifier } from "../common/host-signing.js";
import { screenProxyFrame } from "../common/link-limits.js";
import { ackRunsOf, STATUS_RUNS } from "../common/status-runs.js";
import type { EventIntake } from "./event-intake.js";

export type ProxyLinkAtController = FrameLink<ProxyStreamResponse, ProxyStreamRequest>;

export interface ProxyLinkDeps {
  jobs: JobManager;
  inventory: Inventory;
  clock: Clock;
  log: Logger;
  heartbeatMs: number;
  signer: TaskSigner;
  revocations: Revocations;
  /** The latest load each connected proxy reported (for metrics and operators). */
  loads?: Map<string, { region: string; load: ProxyLoad }>;
  /** Counts what the controller receives (optional). */
  counters?: { outputBytes: (bytes: number, region: string) => void; tasksEnded: (state: string, region: string) => void };
  /**
   * Checks hosts' report keys and presence proofs. A host counts as held by
   * a proxy only with a valid proof over that link's nonce, so a proxy
   * cannot claim a host it does not hold. Absent: presence is taken on the
   * proxy's word (logic tests only).
   */
  hostKeys?: HostKeyVerifier;
  /** Takes hosts' events (docs/triggers.md); absent: they are not acknowledged (the proxy keeps them). */
  events?: EventIntake;
}

/**
 * Serves one proxy's stream: registers the proxy and the hosts it holds,
 * routes tasks and cancels down, and stores statuses and output coming up,
 * acknowledging each only once stored.
 */
export async function serveProxyLink(deps: ProxyLinkDeps, link: ProxyLinkAtController, peer: PeerIdentity): Promise<void> {
  requireRole(peer, "proxy");
  const { jobs, inventory, clock } = deps;
  // The tasks of a frame are signed together, once, as it leaves (docs/fan-out.md).
  const ls = new LinkSession<ProxyStreamResponse, ProxyStreamRequest>(link, {
    clock,
    empty: () => create(ProxyStreamResponseSchema),
    peer: "proxy",
    beforeSend: (frame) => deps.signer.seal(frame.tasks),
  });
  const first = await ls.first();
  if (!first) return;
  const hello = first.hello;
  if (!hello) throw new InvalidArgumentError("the first frame of a proxy stream must be a hello");
  if (hello.name !== peer.id || hello.region !== peer.scope) {
    throw new PermissionDeniedError(
      `the stream claims proxy ${hello.region}/${hello.name} but the certificate is for proxy ${peer.scope}/${peer.id}`,
    );
  }
  const log = deps.log.child({ proxy: peer.id, region: peer.scope });
  /** Reports and presences no proxy sends are dropped before anything looks them up (common/link-limits.ts). */
  const screen = (frame: ProxyStreamRequest) => screenProxyFrame(frame).warn(log, "reports no proxy sends were dropped (not acknowledged)");
  screen(first);
  ls.startHeartbeat(hello.heartbeatMs || deps.heartbeatMs);
  const out = ls.out;
  const port: ProxyPort = {
    name: peer.id,
    region: peer.scope,
    sendTask: (spec) => {
      const task = deps.signer.prepare(spec, checksBatches(inventory.get(spec.hostId)?.facts));
      out.frameFor(task.spec.length + BATCH_PROOF_BYTES).tasks.push(task);
    },
    sendCancel: (taskId, hostId, withdraw = false) => out.frame.cancels.push(create(CancelTaskSchema, { taskId, hostId, withdraw })),
    openSession: (order) => out.frameFor(order.order.length + 128).sessions.push(order),
  };
  // New for every link: a host's presence proof over it cannot be replayed on another link.
  const nonce = randomBytes(16);
  out.frame.welcome = { $typeName: "rexmesh.v1.ProxyWelcome", heartbeatMs: deps.heartbeatMs, presenceNonce: nonce, features: [STATUS_RUNS] };
  /** A proxy that takes acknowledgements in runs (an older one gets them one by one). */
  const ackRuns = hello.features.includes(STATUS_RUNS);
  out.frame.signingKeys.push(deps.signer.key);
  // A renewed key goes out at once, in the frame that carries the first tasks signed with it (they are sealed as it leaves).
  const stopRenewals = deps.signer.onRenew((key) => out.frame.signingKeys.push(key));
  // The deny-list goes with every welcome (a proxy that was away catches up) and with every change.
  out.frame.denyList = deps.revocations.current;
  const unsubscribe = deps.revocations.onChange((signed) => {
    if (deps.revocations.isRevoked(peer)) link.close(new PermissionDeniedError("this proxy's identity has been revoked"));
    else out.frame.denyList = signed;
  });
  jobs.proxyConnected(port);
  inventory.proxyLost(port.name, clock.now());
  let refusedPresence = 0;
  /** Hosts whose reports from this proxy were held back: once it is seen to hold one, it replays its backlog. */
  const heldBack = new Set<string>();
  /** Per task, the lowest and highest output seq held back from this link and maybe not stored yet (see the acks below). */
  const heldOutput = new Map<string, { min: number; max: number }>();
  /** Presence proofs taken on this link, by their salt: a proof is good once (a proxy cannot re-claim a host that left it by sending its old proof again). */
  const usedSalts = new Map<string, Set<string>>();
  const presence = (hosts: readonly HostPresence[]) => {
    for (const h of hosts) {
      const since = reportedSince(h.since, clock.now());
      if (!h.connected) {
        inventory.disconnected(h.hostId, port.name, since);
        continue;
      }
      if (deps.hostKeys) {
        const host: PeerIdentity = { role: "host", scope: h.tenant, id: h.hostId };
        const check = deps.hostKeys.accept(h.reportKey, host);
        const salt = Buffer.from(h.proofSalt).toString("base64");
        const seen = usedSalts.get(h.hostId);
        const proved = !check.ok
          ? check
          : seen?.has(salt)
            ? { ok: false as const, reason: "the presence proof was already used on this link" }
            : deps.hostKeys.checkPresence(h.reportKey!.keyId, h.proof, h.proofSalt, nonce, peer, host);
        if (!proved.ok) {
          // Logged for the first few of a link: a proxy that cannot prove a host does not hold it here.
          if (refusedPresence++ < 10) log.warn("host presence refused", { host: h.hostId, tenant: h.tenant, reason: proved.reason });
          continue;
        }
        // One set per host, bounded by how often a host can (re)connect over one link.
        if (seen) seen.add(salt);
        else usedSalts.set(h.hostId, new Set([salt]));
      }
      jobs.hostConnected(inventory.connected({ id: h.hostId, tenant: h.tenant, facts: h.facts }, port.region, port.name, since));
      if (heldBack.delete(h.hostId)) out.frame.replay = true;
    }
  };
  presence(hello.hosts);
  jobs.proxyReady(port);
  log.info("proxy connected", { hosts: hello.hosts.length });
  try {
    await handleFrame(first);
    await ls.forEach(handleFrame);
  } catch (err) {
    // The proxy sees only a status code; the reason stays here.
    log.error("proxy link failed", { err });
    throw err;
  } finally {
    deps.loads?.delete(port.name);
    unsubscribe();
    stopRenewals();
    ls.end("flush");
    jobs.proxyDisconnected(port);
    log.info("proxy disconnected");
  }

  async function handleFrame(frame: ProxyStreamRequest): Promise<void> {
    if (frame !== first) screen(frame);
    if (frame.load) deps.loads?.set(port.name, { region: port.region, load: frame.load });
    if (frame.hosts.length > 0) presence(frame.hosts);
    // Reports on hosts this proxy is not yet seen to hold are held back: not taken, not acknowledged.
    const output = frame.output.filter((c) => {
      if (!jobs.holdsBack(port, c.taskId, c.hostId)) return true;
      if (c.hostId) heldBack.add(c.hostId);
      const h = heldOutput.get(c.taskId);
      const seq = Number(c.seq);
      if (!h) heldOutput.set(c.taskId, { min: seq, max: seq });
      else ((h.min = Math.min(h.min, seq)), (h.max = Math.max(h.max, seq)));
      return false;
    });
    const statuses = frame.statuses.filter((st) => {
      if (!jobs.holdsBack(port, st.taskId, st.hostId, st)) return true;
      if (st.hostId) heldBack.add(st.hostId);
      return false;
    });
    // Output before statuses: a frame may carry a task's last chunks and its end together.
    const acked = await Promise.all(output.map((c) => jobs.applyOutput(port, c).then((seq) => [c.taskId, seq] as const)));
    const highest = new Map<string, number>();
    for (const [taskId, seq] of acked) highest.set(taskId, Math.max(highest.get(taskId) ?? 0, seq));
    // An output ack is cumulative (the proxy drops every chunk up to it): never past a chunk held back from this link until it is stored.
    for (const [taskId, seq] of highest) {
      const h = heldOutput.get(taskId);
      const missing = h && jobs.firstMissingChunk(taskId, h.min);
      if (!h || missing === undefined) continue;
      if (missing > h.max) heldOutput.delete(taskId);
      else if (missing <= seq) highest.set(taskId, missing - 1);
    }
    await Promise.all(statuses.map((s) => jobs.applyStatus(port, s)));
    if (deps.counters) {
      let bytes = 0;
      for (const c of frame.output) bytes += c.data.length;
      if (bytes) deps.counters.outputBytes(bytes, port.region);
      for (const s of frame.statuses) if (isTerminal(s.state) && !s.atProxy) deps.counters.tasksEnded(TaskState[s.state] ?? String(s.state), port.region);
    }
    // Acks only: a frame with nothing to acknowledge (a heartbeat, a load report) gets no empty frame back.
    if (frame.events.length > 0 && deps.events) {
      // Signed by their hosts: taken from any proxy (a host may have moved), checked before they are stored.
      const taken = await deps.events.receive(frame.events, port.name);
      for (const h of taken.heldBack) heldBack.add(h);
      if (taken.acks.length > 0) out.frame.eventAcks.push(...taken.acks);
    }
    for (const [taskId, seq] of highest) if (seq > 0) out.frame.outputAcks.push(create(OutputAckSchema, { taskId, seq: BigInt(seq) }));
    if (statuses.length === 0) return;
    if (ackRuns) out.frame.statusAckRuns.push(...ackRunsOf(statuses));
    else for (const s of statuses) out.frame.statusAcks.push(create(StatusAckSchema, { taskId: s.taskId, state: s.state, atProxy: s.atProxy }));
  }
}
