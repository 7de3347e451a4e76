import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { afterEach, describe, expect, it } from "vitest";
import type { PeerIdentity } from "../../certs/identity.js";
import { ManualClock } from "../../common/clock.js";
import { HostKeyVerifier, HostReporter } from "../../common/host-signing.js";
import { LmdbEnv } from "../../common/lmdb.js";
import { silentLogger } from "../../common/logger.js";
import { LIMITS } from "../../common/limits.js";
import { EventIntake } from "../../controller/event-intake.js";
import { LmdbTriggerStore, type EventRecord, type TriggerRecord } from "../../controller/trigger-store.js";
import { firingKey, newTrigger, TriggerEvaluator } from "../../controller/triggers.js";
import { SubmitJobRequestSchema } from "../../gen/rexmesh/v1/controller_pb.js";
import { HostEventSchema, type HostEvent } from "../../gen/rexmesh/v1/event_pb.js";
import { TriggerSpecSchema } from "../../gen/rexmesh/v1/trigger_pb.js";
import { testCa, testCredentials } from "../test-ca.js";

const alice: PeerIdentity = { role: "operator", scope: "acme", id: "alice" };
const host = (id: string, tenant = "acme"): PeerIdentity => ({ role: "host", scope: tenant, id });
const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

/**
 * A controller's trigger side on a real LMDB store in a temp dir, which a
 * test can close and open again (a restart); `fire` stands for the
 * creator's submit, and keeps one job per idempotency key as the job
 * manager does.
 */
class Controller {
  env!: LmdbEnv;
  store!: LmdbTriggerStore;
  evaluator!: TriggerEvaluator;
  intake!: EventIntake;
  readonly jobs = new Map<string, string>();
  readonly fired: { trigger: string; host: string; key: string }[] = [];
  refuse: Error | undefined;
  readonly dir = mkdtempSync(join(tmpdir(), "rexmesh-triggers-"));
  readonly verifier: HostKeyVerifier;

  constructor(readonly clock: ManualClock) {
    dirs.push(this.dir);
    this.verifier = new HostKeyVerifier(testCa().certPem, clock);
    this.open();
  }

  open(): void {
    this.env = new LmdbEnv({ path: this.dir, maxBytes: 64 << 20 });
    this.store = new LmdbTriggerStore(this.env, { maxEvents: 100, retentionMs: 86_400_000, now: () => this.clock.now() });
    this.evaluator = new TriggerEvaluator({
      clock: this.clock,
      store: this.store,
      log: silentLogger,
      fire: async (rec, event, key) => {
        if (this.refuse) throw this.refuse;
        this.fired.push({ trigger: rec.name, host: event.hostId, key });
        let job = this.jobs.get(key);
        if (!job) this.jobs.set(key, (job = `j${this.jobs.size + 1}`));
        return job;
      },
    });
    this.intake = new EventIntake({
      store: this.store,
      clock: this.clock,
      log: silentLogger,
      checkEvent: (e) => this.verifier.checkEvent(e),
      acceptKey: (k, h) => this.verifier.accept(k, h),
      stored: () => undefined,
    });
  }

  async restart(): Promise<void> {
    this.evaluator.stop();
    await this.env.close();
    this.open();
  }

  async addTrigger(name: string, on: string, more: { cooldownMs?: number; max?: number; windowMs?: number } = {}): Promise<TriggerRecord> {
    const rec = newTrigger(
      alice,
      create(TriggerSpecSchema, {
        name,
        on,
        job: create(SubmitJobRequestSchema, { steps: [{ tool: { case: "exec", value: { argv: ["systemctl", "restart", "nginx"] } } }] }),
        cooldown: more.cooldownMs === undefined ? undefined : durationFromMs(more.cooldownMs),
        maxPerHost: more.max ?? 0,
        rateWindow: more.windowMs === undefined ? undefined : durationFromMs(more.windowMs),
      }),
      this.clock.now(),
    );
    await this.store.putTrigger(rec);
    return rec;
  }

  /** Takes events as a proxy's frame brings them, then evaluates what is pending. */
  async receive(...events: HostEvent[]) {
    const r = await this.intake.receive(events, "px1");
    await this.evaluator.wake();
    return r;
  }

  events(): EventRecord[] {
    return this.store.events({ tenant: "acme", limit: 1000 }).events.reverse();
  }
}

let seq = 0;
function event(reporter: HostReporter | undefined, hostId: string, kind = "service.failed", details: Record<string, string> = { unit: "nginx.service" }, id = `e${++seq}`): HostEvent {
  const e = create(HostEventSchema, { id, hostId, tenant: "acme", kind, details, time: timestampFromMs(Date.UTC(2026, 0, 1)), watcher: "nginx" });
  reporter?.signEvent(e);
  return e;
}

function reporterFor(c: Controller, id: string): HostReporter {
  const r = new HostReporter(testCredentials(host(id), { clock: c.clock, validityMs: 86_400_000 }), c.clock, host(id));
  // The key reached the controller with the host's presence, as it does on connecting.
  expect(c.verifier.accept(r.key, host(id)).ok).toBe(true);
  return r;
}

describe("triggers: evaluating hosts' events", () => {
  it("fires for a matching event on its host, then holds the same host back for the cooldown, not another host", async () => {
    const c = new Controller(new ManualClock());
    const [h1, h2] = [reporterFor(c, "h1"), reporterFor(c, "h2")];
    await c.addTrigger("fix-nginx", "kind=service.failed and unit=nginx.service", { cooldownMs: 600_000 });
    await c.addTrigger("other", "kind=disk.full");
    await c.receive(event(h1, "h1"), event(h1, "h1", "service.failed", { unit: "sshd.service" }));
    expect(c.fired).toEqual([{ trigger: "fix-nginx", host: "h1", key: expect.stringMatching(/^trigger:fix-nginx:[0-9a-f]{32}$/) }]);
    c.clock.advance(60_000);
    await c.receive(event(h1, "h1"), event(h2, "h2"));
    expect(c.fired.map((f) => f.host)).toEqual(["h1", "h2"]);
    const [first, nonMatching, heldBack, other] = c.events();
    expect(first!.outcomes).toEqual([{ trigger: "fix-nginx", jobId: "j1", note: "" }]);
    expect(nonMatching!.outcomes).toEqual([]);
    expect(heldBack!.outcomes).toEqual([{ trigger: "fix-nginx", jobId: "", note: "suppressed: cooldown (job j1 for this host 1m before; cooldown 10m)" }]);
    expect(other!.outcomes).toEqual([{ trigger: "fix-nginx", jobId: "j2", note: "" }]);
    // Past the cooldown it fires again.
    c.clock.advance(600_000);
    await c.receive(event(h1, "h1"));
    expect(c.fired.map((f) => f.host)).toEqual(["h1", "h2", "h1"]);
    const rec = c.store.getTrigger("acme", "fix-nginx")!;
    expect({ fired: rec.fired, suppressed: rec.suppressed, recent: rec.recent.length }).toEqual({ fired: 3, suppressed: 1, recent: 4 });
  });

  it("fires at most max-per-host jobs for a host within the window; a paused trigger fires none; a refused firing is recorded", async () => {
    const c = new Controller(new ManualClock());
    const h1 = reporterFor(c, "h1");
    await c.addTrigger("t", "kind=service.failed", { cooldownMs: 0, max: 2, windowMs: 3600_000 });
    for (let i = 0; i < 4; i++) {
      await c.receive(event(h1, "h1"));
      c.clock.advance(60_000);
    }
    expect(c.fired).toHaveLength(2);
    expect(c.events().map((e) => e.outcomes[0]!.note)).toEqual(["", "", "suppressed: rate limit (2 jobs for this host within 60m; at most 2)", "suppressed: rate limit (2 jobs for this host within 60m; at most 2)"]);
    // The window slides: an hour after the first, one more may go.
    c.clock.advance(3600_000 - 4 * 60_000 + 1);
    await c.receive(event(h1, "h1"));
    expect(c.fired).toHaveLength(3);
    await c.evaluator.setPaused("acme", "t", true);
    c.clock.advance(3600_000);
    await c.receive(event(h1, "h1"));
    expect(c.fired).toHaveLength(3);
    expect(c.events().at(-1)!.outcomes[0]!.note).toBe("suppressed: the trigger is paused");
    await c.evaluator.setPaused("acme", "t", false);
    c.refuse = new Error("no role allows alice to run systemctl on h1");
    await c.receive(event(h1, "h1"));
    expect(c.events().at(-1)!.outcomes[0]!.note).toBe("refused: no role allows alice to run systemctl on h1");
  });

  it("stores and evaluates an event once by its id, also when it comes again after a restart", async () => {
    const c = new Controller(new ManualClock());
    const h1 = reporterFor(c, "h1");
    await c.addTrigger("t", "kind=service.failed", { cooldownMs: 0 });
    const e = event(h1, "h1");
    const r1 = await c.receive(e, e);
    // Both copies acknowledged (the proxy may forget them), one stored.
    expect(r1.acks).toHaveLength(2);
    expect(c.events()).toHaveLength(1);
    expect(c.fired).toHaveLength(1);
    // (The verifier keeps its keys across the restart, as the controller's report-key store does.)
    await c.restart();
    const r2 = await c.receive(e);
    expect(r2.acks).toHaveLength(1);
    expect(c.events()).toHaveLength(1);
    expect(c.fired).toHaveLength(1);
    // The same id from another host is another event.
    const h2 = reporterFor(c, "h2");
    await c.receive(event(h2, "h2", "service.failed", {}, e.id));
    expect(c.fired.map((f) => f.host)).toEqual(["h1", "h2"]);
  });

  it("a controller that stops between an event and its evaluation evaluates it after the restart, once, under the same job key", async () => {
    const c = new Controller(new ManualClock());
    const h1 = reporterFor(c, "h1");
    await c.addTrigger("t", "kind=service.failed", { cooldownMs: 600_000 });
    // Stored, then the submit fails as a stopping controller's does: nothing of the evaluation is stored.
    c.refuse = new ConnectError("the controller is stopping", Code.Unavailable);
    await c.receive(event(h1, "h1"));
    expect(c.events()[0]!.evaluated).toBe(false);
    c.refuse = undefined;
    // A submit that went through but whose evaluation was not stored yet (the job exists under its key).
    const pending = c.events()[0]!;
    c.jobs.set(firingKey(c.store.getTrigger("acme", "t")!, pending), "j-before-restart");
    await c.restart();
    await c.evaluator.wake();
    expect(c.events()[0]!.evaluated).toBe(true);
    expect(c.events()[0]!.outcomes).toEqual([{ trigger: "t", jobId: "j-before-restart", note: "" }]);
    await c.restart();
    await c.evaluator.wake();
    expect(c.fired).toHaveLength(1);
    expect(c.jobs.size).toBe(1);
  });
});

describe("triggers: the events kept", () => {
  it("lists a tenant's events newest first, paged, by kind and host; drops the oldest evaluated past the bound", async () => {
    const c = new Controller(new ManualClock());
    const h1 = reporterFor(c, "h1");
    const h2 = reporterFor(c, "h2");
    for (let i = 0; i < 5; i++) await c.receive(event(i % 2 ? h2 : h1, i % 2 ? "h2" : "h1", i === 4 ? "disk.full" : "service.failed", {}, `p${i}`));
    const first = c.store.events({ tenant: "acme", limit: 2 });
    expect(first.events.map((e) => e.eventId)).toEqual(["p4", "p3"]);
    const second = c.store.events({ tenant: "acme", limit: 2, before: first.next });
    expect(second.events.map((e) => e.eventId)).toEqual(["p2", "p1"]);
    const last = c.store.events({ tenant: "acme", limit: 2, before: second.next });
    expect(last).toEqual({ events: [expect.objectContaining({ eventId: "p0" })] });
    expect(c.store.events({ tenant: "acme", limit: 10, kind: "disk.full" }).events.map((e) => e.eventId)).toEqual(["p4"]);
    expect(c.store.events({ tenant: "acme", limit: 10, host: (id) => id === "h2" }).events.map((e) => e.eventId)).toEqual(["p3", "p1"]);
    expect(c.store.events({ tenant: "beta", limit: 10 }).events).toEqual([]);
    // 100 kept (this store's bound): the oldest go, but their ids stay for the retention, so a copy sent again is known.
    for (let i = 5; i < 105; i++) await c.receive(event(h1, "h1", "disk.full", {}, `p${i}`));
    const kept = c.store.events({ tenant: "acme", limit: 1000 }).events;
    expect(kept).toHaveLength(100);
    expect(kept.at(-1)!.eventId).toBe("p5");
    expect(c.store.hasEvent("acme", "h1", "p0")).toBe(true);
    const again = await c.receive(event(h1, "h1", "service.failed", {}, "p0"));
    expect(again.acks).toHaveLength(1);
    expect(c.store.events({ tenant: "acme", limit: 1000 }).events.map((e) => e.eventId)).not.toContain("p0");
    // Past the retention (a day in this store) the ids go too.
    c.clock.advance(86_400_000 + 120_000);
    await c.receive(event(h1, "h1", "disk.full", {}, "late"));
    expect(c.store.hasEvent("acme", "h1", "p0")).toBe(false);
    expect(c.store.hasEvent("acme", "h1", "late")).toBe(true);
  });

  it("keeps one tenant's events when another tenant's host floods the bound: the biggest tenant's oldest go first", async () => {
    const c = new Controller(new ManualClock());
    const mine = reporterFor(c, "h1");
    for (let i = 0; i < 10; i++) await c.receive(event(mine, "h1", "service.failed", {}, `a${i}`));
    const other = new HostReporter(testCredentials(host("x1", "beta"), { clock: c.clock, validityMs: 86_400_000 }), c.clock, host("x1", "beta"));
    expect(c.verifier.accept(other.key, host("x1", "beta")).ok).toBe(true);
    for (let i = 0; i < 100; i++) {
      const e = create(HostEventSchema, { id: `b${i}`, hostId: "x1", tenant: "beta", kind: "noise", time: timestampFromMs(c.clock.now()), watcher: "w" });
      other.signEvent(e);
      await c.receive(e);
      c.clock.advance(1000); // within its host's rate
    }
    expect(c.store.events({ tenant: "acme", limit: 1000 }).events).toHaveLength(10);
    expect(c.store.events({ tenant: "beta", limit: 1000 }).events).toHaveLength(90);
  });

  it("drops (acknowledged, counted) an event signed longer ago than its id would be remembered, one past its host's rate, and one signed after its report key expired", async () => {
    const clock = new ManualClock();
    const c = new Controller(clock);
    const h1 = reporterFor(c, "h1");
    const reasons: string[] = [];
    c.intake = new EventIntake({ store: c.store, clock, log: silentLogger, checkEvent: (e) => c.verifier.checkEvent(e), acceptKey: (k, h) => c.verifier.accept(k, h), stored: () => undefined, refused: (r) => reasons.push(r) });
    const at = (ms: number, id: string) => {
      const e = create(HostEventSchema, { id, hostId: "h1", tenant: "acme", kind: "k", time: timestampFromMs(ms), watcher: "w" });
      h1.signEvent(e);
      return e;
    };
    clock.advance(8 * 86_400_000);
    const old = await c.receive(at(clock.now() - 7 * 86_400_000, "old"));
    expect(old.acks.map((a) => a.eventId)).toEqual(["old"]);
    expect(c.store.hasEvent("acme", "h1", "old")).toBe(false);
    // A burst past the bucket: the first LIMITS.eventsBurstPerHost are taken, the rest dropped until it refills.
    const burst = Array.from({ length: LIMITS.eventsBurstPerHost + 5 }, (_, i) => at(clock.now(), `r${i}`));
    await c.receive(...burst);
    expect(c.store.hasEvent("acme", "h1", `r${LIMITS.eventsBurstPerHost - 1}`)).toBe(true);
    expect(c.store.hasEvent("acme", "h1", `r${LIMITS.eventsBurstPerHost}`)).toBe(false);
    clock.advance(10_000);
    await c.receive(at(clock.now(), "later"));
    expect(c.store.hasEvent("acme", "h1", "later")).toBe(true);
    // The report key lives a year (HostReporter's default): an event it signed as noticed later does not count.
    await c.receive(at(clock.now() + 400 * 86_400_000, "after-key"));
    expect(c.store.hasEvent("acme", "h1", "after-key")).toBe(false);
    expect(reasons).toEqual(["too old", ...Array(5).fill("rate"), "signature"]);
  });

  it("keeps a targeted trigger's cooldown for the trigger as a whole: hosts failing together queue one job", async () => {
    const c = new Controller(new ManualClock());
    const rec = newTrigger(alice, create(TriggerSpecSchema, { name: "all-restart", on: "kind=service.failed", job: create(SubmitJobRequestSchema, { allHosts: true, steps: [{ tool: { case: "exec", value: { argv: ["true"] } } }] }), cooldown: durationFromMs(600_000) }), c.clock.now());
    await c.store.putTrigger(rec);
    for (const id of ["h1", "h2", "h3", "h4"]) await c.receive(event(reporterFor(c, id), id));
    expect(c.fired).toHaveLength(1);
    expect(c.events().slice(1).map((e) => e.outcomes[0]!.note)).toEqual(Array(3).fill(expect.stringMatching(/^suppressed: cooldown \(job j1 for this trigger/)));
  });

  it("takes two copies arriving at once (two proxies) once; the second is answered only when the first is stored", async () => {
    const c = new Controller(new ManualClock());
    const rec = { tenant: "acme", hostId: "h1", eventId: "twin", kind: "k", details: {}, time: 0, watcher: "w", receivedAt: c.clock.now() };
    const order: string[] = [];
    const [a, b] = await Promise.all([c.store.addEvent(rec).then((r) => (order.push(`a:${c.store.hasEvent("acme", "h1", "twin")}`), r)), c.store.addEvent(rec).then((r) => (order.push(`b:${c.store.hasEvent("acme", "h1", "twin")}`), r))]);
    expect([a, b]).toEqual([true, false]);
    expect(order.sort()).toEqual(["a:true", "b:true"]);
    expect(c.store.unevaluated()).toHaveLength(1);
  });
});

describe("triggers: events a proxy forges", () => {
  it("drops an event whose signature does not hold, that claims another host, or that is unsigned: never stored, never fires", async () => {
    const c = new Controller(new ManualClock());
    const [h1, h2] = [reporterFor(c, "h1"), reporterFor(c, "h2")];
    await c.addTrigger("t", "kind=service.failed", { cooldownMs: 0 });
    // Made up by the proxy: unsigned; signed by h2 but naming h1; a genuine event with its details changed; another tenant's host.
    const unsigned = event(undefined, "h1");
    const otherHost = event(h2, "h1");
    const altered = event(h1, "h1");
    altered.details.unit = "sshd.service";
    const otherTenant = event(h1, "h1");
    otherTenant.tenant = "beta";
    const r = await c.receive(unsigned, otherHost, altered, otherTenant);
    expect(r.acks).toHaveLength(4);
    expect(c.intake.refusedCount).toBe(4);
    expect(c.events()).toEqual([]);
    expect(c.fired).toEqual([]);
    // The genuine event still fires.
    await c.receive(event(h1, "h1"));
    expect(c.fired).toHaveLength(1);
  });

  it("holds back an event signed by a key the controller never saw, and takes one that carries its key endorsed by the host's certificate", async () => {
    const c = new Controller(new ManualClock());
    await c.addTrigger("t", "kind=service.failed", { cooldownMs: 0 });
    const fresh = new HostReporter(testCredentials(host("h3"), { clock: c.clock, validityMs: 86_400_000 }), c.clock, host("h3"));
    const e = event(fresh, "h3");
    const r = await c.receive(e);
    expect(r).toEqual({ acks: [], heldBack: ["h3"] });
    expect(c.events()).toEqual([]);
    // A key of another host, carried along, does not vouch for it: it proves the event false (dropped, acknowledged).
    const stranger = new HostReporter(testCredentials(host("h4"), { clock: c.clock, validityMs: 86_400_000 }), c.clock, host("h4"));
    const signedByStranger = event(stranger, "h3", "service.failed", {}, "e-stranger");
    signedByStranger.reportKey = stranger.key;
    expect(await c.receive(signedByStranger)).toEqual({ acks: [expect.objectContaining({ eventId: "e-stranger" })], heldBack: [] });
    expect(c.intake.refusedCount).toBe(1);
    // Nor does a genuine key of another host carried with a different key id.
    expect((await c.receive(create(HostEventSchema, { ...e, reportKey: stranger.key }))).heldBack).toEqual([]);
    expect(c.events()).toEqual([]);
    const carried = create(HostEventSchema, { ...e, reportKey: fresh.key });
    expect((await c.receive(carried)).acks).toHaveLength(1);
    expect(c.fired.map((f) => f.host)).toEqual(["h3"]);
  });
});
