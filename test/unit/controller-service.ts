/**
 * The controller's public ControllerService for service tests: the real
 * handlers (controller/api.ts, behind controller/request-limits.ts as
 * controller/main.ts wires them) and the real boundary (the interceptor of
 * common/connect-server.ts with controller/declarations.ts and
 * OperatorAccess deciding and auditing), on connect-es's in-memory
 * transport instead of HTTP/2 and mutual TLS. A client's identity is the
 * one its certificate (issued by the run's test CA) names, put where the
 * TLS server puts it; the job manager, inventory, audit log and policy are
 * real, on in-memory stores, with one proxy that records what it is sent.
 */
import type { HandlerContext, ServiceImpl } from "@connectrpc/connect";
import { createClient, createRouterTransport, type Client } from "@connectrpc/connect";
import { formatIdentity, identityFromCertificate, type PeerIdentity } from "../../certs/identity.js";
import { ManualClock } from "../../common/clock.js";
import { boundaryInterceptor, callerContext, callerOf } from "../../common/connect-server.js";
import { silentLogger } from "../../common/logger.js";
import { asHandlerOf } from "../../common/undecodable-request.js";
import { OperatorAccess } from "../../controller/access.js";
import { controllerServiceImpl } from "../../controller/api.js";
import { AuditLog, MemoryAuditStore } from "../../controller/audit.js";
import { Authorizer } from "../../controller/authz.js";
import { CONTROLLER_DECLARATIONS } from "../../controller/declarations.js";
import { Inventory } from "../../controller/inventory.js";
import { MemoryJobStore } from "../../controller/job-store.js";
import { JobManager } from "../../controller/jobs.js";
import { withRequestLimits } from "../../controller/request-limits.js";
import { ControllerService } from "../../gen/rexmesh/v1/controller_pb.js";
import { testCredentials } from "../test-ca.js";
import { counterIds, RecordingPort } from "./support.js";

/**
 * Who may do what: acme/alice and acme/mallory everything in tenant acme
 * (tests revoke mallory), acme/wendy read, submit and cancel on acme's web
 * hosts, beta/bob everything in beta; anyone else has no role.
 */
const POLICY = `
roles:
  admin: { hosts: all, actions: ["*"], commands: ["*"], tools: ["*"] }
  web-ops: { hosts: role=web, actions: [read, submit, cancel], commands: [hostname] }
bindings:
  acme/alice: admin
  acme/mallory: admin
  acme/wendy: web-ops
  beta/bob: admin
`;

/** Hosts known when a test starts, all connected through proxy px1 of region eu: id, tenant, role label. */
const HOSTS = [
  ["web-1", "acme", "web"],
  ["db-1", "acme", "db"],
  ["web-9", "beta", "web"],
] as const;

export async function controllerService() {
  const clock = new ManualClock();
  const ids = counterIds();
  const store = new MemoryJobStore();
  const inventory = new Inventory();
  const jobs = new JobManager({ store, inventory, clock, ids, log: silentLogger });
  jobs.start();
  const audit = new AuditLog({ store: new MemoryAuditStore(), clock, ids });
  const authz = new Authorizer({ policyFile: "policy.yaml", log: silentLogger, readFile: () => POLICY });
  const access = new OperatorAccess({ authz, audit, jobs, inventory, log: silentLogger });
  const proxy = new RecordingPort("px1", "eu");
  jobs.proxyConnected(proxy);
  for (const [id, tenant, role] of HOSTS) {
    jobs.hostConnected(inventory.connected({ id, tenant }, proxy.region, proxy.name, clock.now()));
    await inventory.setLabels(tenant, id, { set: { role }, remove: [] });
  }

  /** Identities on the deny-list, as formatIdentity writes them. */
  const revoked = new Set<string>();
  /** Every ControllerService method the boundary let through to the service, in order. */
  const reached: string[] = [];
  const service = reaching(withRequestLimits(controllerServiceImpl({ jobs, access }), { callerOf, log: silentLogger }), reached);
  const boundary = boundaryInterceptor({ declarations: CONTROLLER_DECLARATIONS, decide: (call) => access.decideCall(call), log: silentLogger });

  /**
   * A client on a connection of its own that presented `certPem`: every
   * call carries the identity the certificate names (none if it names no
   * rexmesh identity), as the TLS server's contextValues set it. Binary
   * Connect, or with `json` Connect's JSON (as the web console calls).
   */
  const clientWith = (certPem: string, opts: { json?: boolean } = {}): Client<typeof ControllerService> => {
    let peer: PeerIdentity | undefined;
    try {
      peer = identityFromCertificate(certPem);
    } catch {
      peer = undefined;
    }
    const transport = createRouterTransport(
      (router) => {
        router.service(ControllerService, service);
        router.handlers.forEach((h, i) => {
          router.handlers[i] = asHandlerOf(h, (req) => h({ ...req, contextValues: callerContext(peer, (p) => revoked.has(formatIdentity(p))) }));
        });
      },
      { router: { interceptors: [boundary] }, transport: { useBinaryFormat: !opts.json } },
    );
    return createClient(ControllerService, transport);
  };

  /** A client presenting a certificate of the run's test CA for `identity`. */
  const as = (identity: PeerIdentity, opts?: { json?: boolean }) => clientWith(testCredentials(identity, { clock, validityMs: 3_600_000 }).certPem, opts);

  return { clock, jobs, store, inventory, audit, proxy, revoked, reached, clientWith, as };
}

/** The service with each call of a method recorded in `reached` before it runs. */
function reaching(impl: ServiceImpl<typeof ControllerService>, reached: string[]): ServiceImpl<typeof ControllerService> {
  const methods = Object.entries(impl) as [string, (req: unknown, ctx: HandlerContext) => unknown][];
  return Object.fromEntries(
    methods.map(([name, fn]) => [
      name,
      (req: unknown, ctx: HandlerContext) => {
        reached.push(name);
        return fn.call(impl, req, ctx);
      },
    ]),
  ) as unknown as ServiceImpl<typeof ControllerService>;
}
