/**
 * A results bundle is applied like the frames of the proxy that signed it:
 * the same checks where it enters — a presence's "since" never later than
 * the controller's clock, ids and seqs within bounds — whatever a site's
 * proxy (or whoever holds its key) writes into it.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { PeerIdentity } from "../../certs/identity.js";
import { HostKeyVerifier, HostReporter } from "../../common/host-signing.js";
import { LmdbEnv } from "../../common/lmdb.js";
import { EventIntake } from "../../controller/event-intake.js";
import { LmdbTriggerStore } from "../../controller/trigger-store.js";
import { HostEventSchema } from "../../gen/rexmesh/v1/event_pb.js";
import { describe, expect, it } from "vitest";
import { openBundle, sealBundle } from "../../common/bundle.js";
import { ManualClock } from "../../common/clock.js";
import { silentLogger } from "../../common/logger.js";
import { BundleService } from "../../controller/bundles.js";
import { Inventory } from "../../controller/inventory.js";
import { MemoryJobStore } from "../../controller/job-store.js";
import { JobManager } from "../../controller/jobs.js";
import { BundleKind } from "../../gen/rexmesh/v1/bundle_pb.js";
import { OutputStream, TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { testCa, testCredentials } from "../test-ca.js";
import { counterIds, operator, testSigning } from "./support.js";

describe("a results bundle", () => {
  it("cannot set a host's 'since' in the future, and its over-long ids and impossible seqs are dropped, not looked up", async () => {
    const clock = new ManualClock(Date.UTC(2025, 0, 2));
    const site = testCredentials({ role: "proxy", scope: "air", id: "px-site" }, { clock, validityMs: 86_400_000 });
    const inventory = new Inventory();
    const jobs = new JobManager({ store: new MemoryJobStore(), inventory, clock, ids: counterIds(), log: silentLogger });
    jobs.start();
    const bundles = new BundleService({ jobs, inventory, creds: site, clock, ids: counterIds(), log: silentLogger, signer: testSigning().signer, isRevoked: () => false });
    const tenYears = 10 * 365 * 86_400_000;
    const bytes = sealBundle(
      {
        kind: BundleKind.RESULTS,
        region: "air",
        proxy: "px-site",
        hosts: [
          { hostId: "h1", tenant: "acme", connected: false, since: timestampFromMs(clock.now() + tenYears) },
          { hostId: "h".repeat(10_000), tenant: "acme", connected: false },
        ],
        statuses: [{ taskId: "t".repeat(10_000), hostId: "h1", state: TaskState.SUCCEEDED }],
        output: [
          { taskId: "t".repeat(10_000), seq: 1n, stream: OutputStream.STDOUT, data: new Uint8Array([1]) },
          { taskId: "t1", seq: 2n ** 64n - 1n, stream: OutputStream.STDOUT, data: new Uint8Array([1]) },
        ],
      },
      site,
      clock,
      "r1",
    );
    const r = await bundles.import(operator("acme"), bytes);
    expect(r).toEqual({ statuses: 0, chunks: 0, hosts: 1 });
    expect(inventory.get("h1")!.since).toBeLessThanOrEqual(clock.now());
    expect(inventory.list("acme").map((h) => h.id)).toEqual(["h1"]);
  });
});

describe("events in bundles (docs/triggers.md)", () => {
  it("a results bundle's events are checked against their hosts' keys and stored once; the next tasks bundle acknowledges them", async () => {
    const clock = new ManualClock(Date.UTC(2025, 0, 2));
    const site = testCredentials({ role: "proxy", scope: "air", id: "px-site" }, { clock, validityMs: 86_400_000 });
    const inventory = new Inventory();
    const jobs = new JobManager({ store: new MemoryJobStore(), inventory, clock, ids: counterIds(), log: silentLogger });
    jobs.start();
    const dir = mkdtempSync(join(tmpdir(), "rexmesh-bundle-events-"));
    const env = new LmdbEnv({ path: dir, maxBytes: 64 << 20 });
    const store = new LmdbTriggerStore(env, { maxEvents: 100, retentionMs: 86_400_000, now: () => clock.now() });
    const verifier = new HostKeyVerifier(testCa().certPem, clock);
    const intake = new EventIntake({ store, clock, log: silentLogger, checkEvent: (e) => verifier.checkEvent(e), acceptKey: (k, h) => verifier.accept(k, h), stored: () => undefined });
    const bundles = new BundleService({
      jobs,
      inventory,
      creds: site,
      clock,
      ids: counterIds(),
      log: silentLogger,
      signer: testSigning().signer,
      isRevoked: () => false,
      events: { receive: (evs, from) => intake.receive(evs, from), storedFor: (tenant, region) => intake.storedFor(tenant, (id) => inventory.get(id)?.region === region) },
    });
    const h1: PeerIdentity = { role: "host", scope: "acme", id: "h1" };
    const reporter = new HostReporter(testCredentials(h1, { clock, validityMs: 86_400_000 }), clock, h1);
    const genuine = create(HostEventSchema, { id: "e1", hostId: "h1", tenant: "acme", kind: "disk.full", details: { path: "/" }, reportKey: reporter.key });
    reporter.signEvent(genuine);
    const forged = create(HostEventSchema, { ...genuine, id: "e2", details: { path: "/srv" } });
    const bytes = sealBundle({ kind: BundleKind.RESULTS, region: "air", proxy: "px-site", hosts: [{ hostId: "h1", tenant: "acme", connected: true, reportKey: reporter.key }], events: [genuine, forged] }, site, clock, "r1");
    await bundles.import(operator("acme"), bytes);
    await bundles.import(operator("acme"), bytes);
    expect(store.events({ tenant: "acme", limit: 10 }).events.map((e) => `${e.eventId}:${e.details.path}`)).toEqual(["e1:/"]);
    expect(intake.refusedCount).toBe(2);
    // Another tenant's operator imports nothing of it.
    await bundles.import(operator("beta"), bytes);
    expect(store.events({ tenant: "beta", limit: 10 }).events).toEqual([]);
    const out = await bundles.export(operator("acme"), "air");
    const { payload } = openBundle(out.bundle, { caPem: testCa().certPem, signerRole: "proxy", kind: BundleKind.TASKS, clock });
    expect(payload.eventAcks.map((a) => `${a.hostId}/${a.eventId}`)).toEqual(["h1/e1"]);
    await env.close();
    rmSync(dir, { recursive: true, force: true });
  });
});
