import { create } from "@bufbuild/protobuf";
import type { Credentials } from "../certs/files.js";
import { checkSegment, type PeerIdentity } from "../certs/identity.js";
import { openBundle, sealBundle } from "../common/bundle.js";
import type { Clock } from "../common/clock.js";
import type { IdGenerator } from "../common/ids.js";
import { PermissionDeniedError } from "../common/errors.js";
import type { Logger } from "../common/logger.js";
import { checksBatches, type TaskSigner } from "../common/task-signing.js";
import { BundleKind } from "../gen/rexmesh/v1/bundle_pb.js";
import { CancelTaskSchema } from "../gen/rexmesh/v1/proxy_link_pb.js";
import { OutputAckSchema, StatusAckSchema } from "../gen/rexmesh/v1/task_pb.js";
import { reportedSince, type Inventory } from "./inventory.js";
import { screenProxyReports } from "../common/link-limits.js";
import { stepArtifacts } from "../common/step-tool.js";
import type { EventAck, HostEvent } from "../gen/rexmesh/v1/event_pb.js";
import type { JobManager } from "./jobs.js";
import type { HostReportKey } from "../gen/rexmesh/v1/host_pb.js";
import type { TaskRecord } from "./model.js";

/**
 * Bundles for sites with no link to the controller: the region's queued
 * tasks go out signed by the controller; results come back signed by the
 * site's proxy and are applied exactly as if they had come over ProxyLink
 * (authorization: controller/access.ts).
 */
export class BundleService {
  constructor(
    private readonly deps: {
      jobs: JobManager;
      inventory: Inventory;
      creds: Credentials;
      clock: Clock;
      ids: IdGenerator;
      log: Logger;
      signer: TaskSigner;
      /** The deny-list: a revoked proxy's results bundle is refused. */
      isRevoked: (identity: PeerIdentity) => boolean;
      /** Takes a reported host's report key, if its endorsement holds, so its signed results can be checked. */
      acceptReportKey?: (key: HostReportKey | undefined, host: PeerIdentity) => boolean;
      /** Events (docs/triggers.md): takes a results bundle's, checked as on the link; and names those stored for a region's hosts, acknowledged in its tasks bundle. */
      events?: {
        receive(events: readonly HostEvent[], from: string): Promise<unknown>;
        storedFor(tenant: string, region: string): EventAck[];
      };
    },
  ) {}

  async export(caller: PeerIdentity, region: string): Promise<{ bundle: Uint8Array; tasks: number }> {
    checkSegment("region", region);
    const part = await this.deps.jobs.exportForRegion(caller.scope, region);
    const bundle = sealBundle(
      {
        kind: BundleKind.TASKS,
        region,
        tasks: this.deps.signer.signAll(part.tasks, (t) => checksBatches(this.deps.inventory.get(t.hostId)?.facts)),
        signingKeys: [this.deps.signer.key],
        artifacts: [...new Set(part.tasks.flatMap((t) => t.steps.flatMap(stepArtifacts)))].sort(),
        cancels: part.cancels.map((c) => create(CancelTaskSchema, c)),
        statusAcks: part.statusAcks.map((a) => create(StatusAckSchema, a)),
        outputAcks: part.outputAcks.map((a) => create(OutputAckSchema, { taskId: a.taskId, seq: BigInt(a.seq) })),
        eventAcks: this.deps.events?.storedFor(caller.scope, region) ?? [],
      },
      this.deps.creds,
      this.deps.clock,
      this.deps.ids("b"),
    );
    this.deps.log.info("tasks bundle exported", { region, by: caller.id, tasks: part.tasks.length, cancels: part.cancels.length });
    return { bundle, tasks: part.tasks.length };
  }

  /**
   * Applies a results bundle as if it had come over the signer's ProxyLink:
   * only from a proxy whose identity is not revoked, only for tasks routed
   * to that proxy's region, and only the importing operator's tenant's part
   * (another tenant's operator imports the same bundle for its own).
   * `authorize` sees the ids of the hosts the applied part reports on, and
   * refuses by throwing before anything is applied.
   */
  async import(caller: PeerIdentity, bytes: Uint8Array, authorize?: (hostIds: readonly string[]) => void): Promise<{ statuses: number; chunks: number; hosts: number }> {
    const { payload, signer } = openBundle(bytes, { caPem: this.deps.creds.caPem, signerRole: "proxy", kind: BundleKind.RESULTS, clock: this.deps.clock });
    const from = `proxy ${signer.scope}/${signer.id}`;
    if (this.deps.isRevoked(signer)) throw new PermissionDeniedError(`the bundle is signed by ${from}, whose identity has been revoked`);
    if (payload.region !== "" && payload.region !== signer.scope) throw new PermissionDeniedError(`the bundle says region ${payload.region} but is signed by ${from}`);
    // Checked as on the link, before anything is looked up: what no proxy sends is neither applied nor acknowledged.
    screenProxyReports(payload).warn(this.deps.log, "results no proxy sends were dropped from a bundle", { proxy: from });
    const tasks = new Map<string, TaskRecord | undefined>();
    for (const id of [...payload.statuses.map((s) => s.taskId), ...payload.output.map((c) => c.taskId)]) {
      if (!tasks.has(id)) tasks.set(id, this.deps.jobs.getTaskRecord(id));
    }
    const foreign = [...tasks].filter(([, t]) => t !== undefined && t.region !== signer.scope && this.deps.inventory.get(t.hostId)?.region !== signer.scope).map(([id]) => id);
    if (foreign.length > 0) {
      throw new PermissionDeniedError(`the bundle of ${from} reports ${foreign.length} task${foreign.length > 1 ? "s" : ""} not routed to region ${signer.scope}: ${foreign.slice(0, 5).join(", ")}${foreign.length > 5 ? ", …" : ""}`);
    }
    // Unknown task ids are passed on: the job manager ignores them and acknowledges them in the next tasks bundle.
    const ours = (taskId: string) => {
      const t = tasks.get(taskId);
      return t === undefined || t.tenant === caller.scope;
    };
    const statuses = payload.statuses.filter((s) => ours(s.taskId));
    const output = payload.output.filter((c) => ours(c.taskId));
    const reported = payload.hosts.filter((h) => h.tenant === caller.scope);
    const hostIds = new Set([...reported.map((h) => h.hostId), ...[...tasks.values()].filter((t): t is TaskRecord => t !== undefined && t.tenant === caller.scope).map((t) => t.hostId)]);
    authorize?.([...hostIds]);
    const port = { name: signer.id, region: signer.scope };
    for (const h of reported) {
      this.deps.acceptReportKey?.(h.reportKey, { role: "host", scope: h.tenant, id: h.hostId });
      this.deps.inventory.seen({ id: h.hostId, tenant: h.tenant, facts: h.facts }, signer.scope, signer.id, reportedSince(h.since, this.deps.clock.now()));
    }
    const applied = await this.deps.jobs.importResults(port, statuses, output);
    // Events are signed by their hosts: checked, stored once and evaluated as if they had come over the link.
    await this.deps.events?.receive(
      payload.events.filter((e) => e.tenant === caller.scope),
      from,
    );
    this.deps.log.info("results bundle imported", { bundle: payload.id, region: signer.scope, proxy: signer.id, by: caller.id, ...applied, hosts: reported.length });
    return { ...applied, hosts: reported.length };
  }
}
