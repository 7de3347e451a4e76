/**
 * Where hosts' events enter the controller (docs/triggers.md), from a
 * proxy's link or a results bundle: each is checked against its host's
 * report key before anything else, stored once, acknowledged, and handed
 * to the trigger evaluator.
 *
 * A proxy can delay and drop events but never forge one: an event whose
 * signature does not hold, or that claims another host than the one whose
 * key signed it, is dropped — counted and logged, acknowledged so that the
 * proxy stops sending it, never stored or evaluated. One signed by a key
 * the controller does not know yet is held back (not acknowledged) and
 * comes again when the proxy replays its backlog.
 */
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { create } from "@bufbuild/protobuf";
import type { PeerIdentity } from "../certs/identity.js";
import type { Clock } from "../common/clock.js";
import type { Logger } from "../common/logger.js";
import { EventAckSchema, type EventAck, type HostEvent } from "../gen/rexmesh/v1/event_pb.js";
import type { HostReportKey } from "../gen/rexmesh/v1/host_pb.js";
import type { TriggerStore } from "./trigger-store.js";
import { LIMITS } from "../common/limits.js";

/** Event acks a tasks bundle carries at most (the newest). */
const BUNDLE_EVENT_ACKS = 10_000;

export interface EventIntakeDeps {
  store: TriggerStore;
  clock: Clock;
  log: Logger;
  /** The host's signature over the event (common/host-signing.ts, HostKeyVerifier.checkEvent). */
  checkEvent(event: HostEvent): "ok" | "unknown" | "bad";
  /** Takes a report key the event carries, endorsed by the host's certificate (HostKeyVerifier.accept). */
  acceptKey(key: HostReportKey | undefined, host: PeerIdentity): { ok: boolean; reason?: string };
  /** Told after new events were stored (the trigger evaluator's wake). */
  stored(): void;
  /** Counts events dropped because their signature did not hold. */
  refused?: (reason: string) => void;
}

/** Events signed longer ago than this are refused: their ids may no longer be remembered (the retention, less a day). */
const MAX_EVENT_AGE_MS = LIMITS.eventRetentionMs - 24 * 3600_000;
/** Hosts whose token buckets are kept at most (the oldest forgotten first). */
const BUCKETS_KEPT = 200_000;

export class EventIntake {
  private refusedLogged = 0;
  /** Per host (tenant and id): tokens left and when they were counted. */
  private readonly buckets = new Map<string, { tokens: number; at: number }>();
  /** Events refused since start, by reason (for tests and operators' logs). */
  refusedCount = 0;

  constructor(private readonly deps: EventIntakeDeps) {}

  /** Acks of the newest events stored for hosts `inRegion` accepts (a tasks bundle carries them to a site with no link). */
  storedFor(tenant: string, inRegion: (hostId: string) => boolean): EventAck[] {
    return this.deps.store.events({ tenant, host: inRegion, limit: BUNDLE_EVENT_ACKS }).events.map((e) => create(EventAckSchema, { hostId: e.hostId, eventId: e.eventId }));
  }

  /**
   * Checks and stores events relayed by `from` (a proxy's name or a
   * bundle); resolves with the acks to send back and the hosts whose
   * events were held back.
   */
  async receive(events: readonly HostEvent[], from: string): Promise<{ acks: EventAck[]; heldBack: string[] }> {
    const acks: EventAck[] = [];
    const heldBack = new Set<string>();
    let added = 0;
    for (const e of events) {
      let check = this.deps.checkEvent(e);
      if (check === "unknown" && e.reportKey) {
        const host: PeerIdentity = { role: "host", scope: e.tenant, id: e.hostId };
        const taken = e.reportKey.keyId === e.keyId ? this.deps.acceptKey(e.reportKey, host) : { ok: false, reason: "the carried key is not the one that signed" };
        if (taken.ok) check = this.deps.checkEvent(e);
        // A key that is not this host's (another host's, another CA's, altered) proves the event false; one
        // whose certificate has merely expired since proves nothing either way: held back.
        else if (!/not valid now|expired/.test(taken.reason ?? "")) check = "bad";
      }
      if (check === "unknown") {
        heldBack.add(e.hostId);
        continue;
      }
      const ack = create(EventAckSchema, { hostId: e.hostId, eventId: e.id });
      const now = this.deps.clock.now();
      const why = check === "bad" ? "signature" : e.time && timestampMs(e.time) < now - MAX_EVENT_AGE_MS ? "too old" : !this.take(e.tenant, e.hostId, now) ? "rate" : undefined;
      if (why !== undefined) {
        this.refusedCount++;
        this.deps.refused?.(why);
        if (this.refusedLogged++ < 20) this.deps.log.warn(why === "signature" ? "an event whose host signature does not hold was dropped" : why === "too old" ? "an event signed too long ago to be told from one already taken was dropped" : "an event past its host's rate was dropped", { from, host: e.hostId, tenant: e.tenant, event: e.id, kind: e.kind });
        acks.push(ack);
        continue;
      }
      const fresh = await this.deps.store.addEvent({
        tenant: e.tenant,
        hostId: e.hostId,
        eventId: e.id,
        kind: e.kind,
        details: { ...e.details },
        time: e.time ? timestampMs(e.time) : 0,
        watcher: e.watcher,
        receivedAt: this.deps.clock.now(),
      });
      if (fresh) added++;
      acks.push(ack);
    }
    if (added > 0) this.deps.stored();
    return { acks, heldBack: [...heldBack] };
  }

  /** Takes one token of the host's bucket (LIMITS.eventsBurstPerHost, refilled at eventsPerHostPerSecond); false when it is empty. */
  private take(tenant: string, hostId: string, now: number): boolean {
    const key = `${tenant}\0${hostId}`;
    const b = this.buckets.get(key) ?? { tokens: LIMITS.eventsBurstPerHost, at: now };
    b.tokens = Math.min(LIMITS.eventsBurstPerHost, b.tokens + ((now - b.at) / 1000) * LIMITS.eventsPerHostPerSecond);
    b.at = now;
    this.buckets.delete(key);
    if (this.buckets.size >= BUCKETS_KEPT) this.buckets.delete(this.buckets.keys().next().value!);
    this.buckets.set(key, b);
    if (b.tokens < 1) return false;
    b.tokens -= 1;
    return true;
  }
}
