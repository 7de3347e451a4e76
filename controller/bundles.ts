import { create } from "@bufbuild/protobuf";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import type { Credentials } from "../certs/files.js";
import { checkSegment, type PeerIdentity } from "../certs/identity.js";
import { openBundle, sealBundle } from "../common/bundle.js";
import type { Clock } from "../common/clock.js";
import type { IdGenerator } from "../common/ids.js";
import type { Logger } from "../common/logger.js";
import type { TaskSigner } from "../common/task-signing.js";
import { BundleKind } from "../gen/rexmesh/v1/bundle_pb.js";
import { CancelTaskSchema } from "../gen/rexmesh/v1/proxy_link_pb.js";
import { OutputAckSchema, StatusAckSchema } from "../gen/rexmesh/v1/task_pb.js";
import type { Inventory } from "./inventory.js";
import type { JobManager } from "./jobs.js";

/**
 * Bundles for sites with no link to the controller: the region's queued
 * tasks go out signed by the controller; results come back signed by the
 * site's proxy and are applied exactly as if they had come over ProxyLink.
 */
export class BundleService {
  constructor(
    private readonly deps: { jobs: JobManager; inventory: Inventory; creds: Credentials; clock: Clock; ids: IdGenerator; log: Logger; signer: TaskSigner },
  ) {}

  async export(caller: PeerIdentity, region: string): Promise<{ bundle: Uint8Array; tasks: number }> {
    checkSegment("region", region);
    const part = await this.deps.jobs.exportForRegion(caller.scope, region);
    const bundle = sealBundle(
      {
        kind: BundleKind.TASKS,
        region,
        tasks: part.tasks.map((t) => this.deps.signer.sign(t)),
        signingKeys: [this.deps.signer.key],
        cancels: part.cancels.map((c) => create(CancelTaskSchema, c)),
        statusAcks: part.statusAcks.map((a) => create(StatusAckSchema, a)),
        outputAcks: part.outputAcks.map((a) => create(OutputAckSchema, { taskId: a.taskId, seq: BigInt(a.seq) })),
      },
      this.deps.creds,
      this.deps.clock,
      this.deps.ids("b"),
    );
    this.deps.log.info("tasks bundle exported", { region, by: caller.id, tasks: part.tasks.length, cancels: part.cancels.length });
    return { bundle, tasks: part.tasks.length };
  }

  async import(caller: PeerIdentity, bytes: Uint8Array): Promise<{ statuses: number; chunks: number; hosts: number }> {
    const { payload, signer } = openBundle(bytes, { caPem: this.deps.creds.caPem, signerRole: "proxy", kind: BundleKind.RESULTS, clock: this.deps.clock });
    const port = { name: signer.id, region: signer.scope };
    let hosts = 0;
    for (const h of payload.hosts) {
      // A site reports its hosts; only those of the importing operator's tenant are taken from this import.
      if (h.tenant !== caller.scope) continue;
      this.deps.inventory.seen({ id: h.hostId, tenant: h.tenant, facts: h.facts }, signer.scope, signer.id, h.since ? timestampMs(h.since) : this.deps.clock.now());
      hosts++;
    }
    const applied = await this.deps.jobs.importResults(port, payload.statuses, payload.output);
    this.deps.log.info("results bundle imported", { bundle: payload.id, region: signer.scope, proxy: signer.id, by: caller.id, ...applied, hosts });
    return { ...applied, hosts };
  }
}
