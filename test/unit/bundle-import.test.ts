/**
 * A results bundle is applied like the frames of the proxy that signed it:
 * the same checks where it enters — a presence's "since" never later than
 * the controller's clock, ids and seqs within bounds — whatever a site's
 * proxy (or whoever holds its key) writes into it.
 */
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { describe, expect, it } from "vitest";
import { sealBundle } from "../../common/bundle.js";
import { ManualClock } from "../../common/clock.js";
import { silentLogger } from "../../common/logger.js";
import { BundleService } from "../../controller/bundles.js";
import { Inventory } from "../../controller/inventory.js";
import { MemoryJobStore } from "../../controller/job-store.js";
import { JobManager } from "../../controller/jobs.js";
import { BundleKind } from "../../gen/rexmesh/v1/bundle_pb.js";
import { OutputStream, TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { testCredentials } from "../test-ca.js";
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
