import { describe, expect, it } from "vitest";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { systemClock } from "../../common/clock.js";
import { boundaryInterceptor, createRpcServer } from "../../common/connect-server.js";
import { ConfigError } from "../../common/errors.js";
import { silentLogger } from "../../common/logger.js";
import { DeclarationTable, guardLink, guardUnary } from "../../common/rpc-access.js";
import { PermissionDeniedError } from "../../common/errors.js";
import { AgentLinkService } from "../../gen/rexmesh/v1/agent_link_pb.js";
import { ArtifactCacheService } from "../../gen/rexmesh/v1/artifact_pb.js";
import { ProxyAdminService } from "../../gen/rexmesh/v1/proxy_admin_pb.js";
import { CONTROLLER_DECLARATIONS, ENROLL_LISTENER_DECLARATIONS } from "../../controller/declarations.js";
import { ServerReflection } from "../../gen/grpc/reflection/v1/reflection_pb.js";
import { Health } from "../../gen/grpc/health/v1/health_pb.js";
import { ArtifactService } from "../../gen/rexmesh/v1/artifact_pb.js";
import { ControllerService } from "../../gen/rexmesh/v1/controller_pb.js";
import { EnrollService, TokenService } from "../../gen/rexmesh/v1/enroll_pb.js";
import { ProxyLinkService } from "../../gen/rexmesh/v1/proxy_link_pb.js";
import { RevocationService } from "../../gen/rexmesh/v1/revocation_pb.js";
import { TriggerService } from "../../gen/rexmesh/v1/trigger_pb.js";
import { PROXY_ENROLL_LISTENER_DECLARATIONS, proxyDeclarations } from "../../proxy/declarations.js";
import { testCredentials } from "../test-ca.js";

/**
 * Every method a server serves declares what it needs. These tables are
 * the whole authorization surface: a new method fails here until it is
 * declared (and docs/authorization.md says what the declaration means).
 */
describe("declared requirements of every served method", () => {
  it("controller: every method of every service, with its action and scope", () => {
    expect(Object.fromEntries(CONTROLLER_DECLARATIONS.describe().map((r) => [r.method, r.requires]))).toEqual({
      "rexmesh.v1.ControllerService/ListHosts": "operator read (hosts resolved)",
      "rexmesh.v1.ControllerService/SubmitJob": "operator submit (hosts resolved)",
      "rexmesh.v1.ControllerService/GetJob": "operator read (hosts resolved)",
      "rexmesh.v1.ControllerService/WatchJob": "operator read (hosts resolved)",
      "rexmesh.v1.ControllerService/CancelJob": "operator cancel (hosts resolved)",
      "rexmesh.v1.ControllerService/RerunJob": "operator submit (hosts resolved)",
      "rexmesh.v1.ControllerService/ListJobs": "operator read (hosts resolved)",
      "rexmesh.v1.ControllerService/ListHostTasks": "operator read (hosts resolved)",
      "rexmesh.v1.ControllerService/ExportBundle": "operator bundle (hosts resolved)",
      "rexmesh.v1.ControllerService/ImportBundle": "operator bundle (hosts resolved)",
      "rexmesh.v1.ControllerService/SetHostLabels": "operator label (hosts resolved)",
      "rexmesh.v1.ControllerService/ListAudit": "operator audit (tenant)",
      "rexmesh.v1.ControllerService/CreateSchedule": "operator schedule (tenant)",
      "rexmesh.v1.ControllerService/AddRelease": "operator release (tenant)",
      "rexmesh.v1.ControllerService/SubmitJobs": "operator submit (hosts resolved)",
      "rexmesh.v1.ControllerService/SubmitAndWatch": "operator submit (hosts resolved)",
      "rexmesh.v1.ControllerService/ListReleases": "operator read (tenant)",
      "rexmesh.v1.ControllerService/RemoveRelease": "operator release (tenant)",
      "rexmesh.v1.ControllerService/ListSchedules": "operator read (tenant)",
      "rexmesh.v1.ControllerService/GetSchedule": "operator read (tenant)",
      "rexmesh.v1.ControllerService/PauseSchedule": "operator schedule (tenant)",
      "rexmesh.v1.ControllerService/DeleteSchedule": "operator schedule (tenant)",
      "rexmesh.v1.ControllerService/RunSchedule": "operator schedule (tenant)",
      "rexmesh.v1.TriggerService/ListEvents": "operator read (tenant)",
      "rexmesh.v1.TriggerService/CreateTrigger": "operator trigger (tenant)",
      "rexmesh.v1.TriggerService/ListTriggers": "operator read (tenant)",
      "rexmesh.v1.TriggerService/GetTrigger": "operator read (tenant)",
      "rexmesh.v1.TriggerService/PauseTrigger": "operator trigger (tenant)",
      "rexmesh.v1.TriggerService/DeleteTrigger": "operator trigger (tenant)",
      "rexmesh.v1.ControllerService/ListSessions": "operator audit (tenant)",
      "rexmesh.v1.ControllerService/GetSessionRecording": "operator audit (tenant)",
      "rexmesh.v1.ControllerService/JoinSession": "operator audit (tenant)",
      "rexmesh.v1.ControllerService/PutDocument": "operator document (tenant)",
      "rexmesh.v1.ControllerService/GetDocument": "operator read (tenant)",
      "rexmesh.v1.ControllerService/ListDocuments": "operator read (tenant)",
      "rexmesh.v1.ControllerService/Session": "operator session (hosts resolved)",
      "rexmesh.v1.ControllerService/Forward": "operator forward (hosts resolved)",
      "rexmesh.v1.TokenService/CreateJoinToken": "operator token (hosts named)",
      "rexmesh.v1.RevocationService/Revoke": "operator revoke | revoke.operator | revoke.proxy | token (hosts resolved)",
      "rexmesh.v1.RevocationService/ListRevoked": "operator read (tenant)",
      "rexmesh.v1.ArtifactService/PutArtifact": "operator artifact.write (tenant)",
      "rexmesh.v1.ConsoleService/CreateConsoleLink": "operator console (tenant)",
      "rexmesh.v1.ArtifactService/GetArtifact": "operator artifact.read (tenant); proxy artifact.read (any artifact, for the hosts of every tenant in its region)",
      "rexmesh.v1.EnrollService/Enroll": "enroll|proxy enroll (the bootstrap credential in the request, decided and audited by controller/enroll.ts)",
      "rexmesh.v1.ProxyLinkService/ProxyStream": "proxy link (its own name and region: the hello must match the certificate (controller/proxy-link.ts))",
      "rexmesh.v1.ProxyLinkService/ProxySession": "proxy session.relay (a session ordered from this proxy: the first message must name one (controller/sessions.ts))",
      "grpc.health.v1.Health/Check": "open: health checks, for load balancers and probes; reveal nothing but serving status",
      "grpc.health.v1.Health/Watch": "open: health checks, for load balancers and probes; reveal nothing but serving status",
      "grpc.reflection.v1.ServerReflection/ServerReflectionInfo": "operator read (tenant)",
    });
    expect(ENROLL_LISTENER_DECLARATIONS.describe().map((r) => r.method)).toEqual(["rexmesh.v1.EnrollService/Enroll"]);
  });

  it("proxy: every method of every service, with the certificate role and scope", () => {
    const table = proxyDeclarations({ role: "proxy", scope: "eu", id: "px1" });
    expect(Object.fromEntries(table.describe().map((r) => [r.method, r.requires]))).toEqual({
      "rexmesh.v1.AgentLinkService/AgentStream": "host link (its own host id: the hello must match the certificate (proxy/proxy.ts))",
      "rexmesh.v1.AgentLinkService/AgentSession": "host session (a session ordered for this host: the first message must name one (proxy/session-relay.ts))",
      "rexmesh.v1.ArtifactCacheService/GetArtifactChunk": "host artifact.read (an artifact by digest; the daemon checks the digest, and tasks name only their tenant's artifacts)",
      "rexmesh.v1.EnrollService/Enroll": "host renew (its own certificate: the request must name the certificate's host id)",
      "rexmesh.v1.ProxyAdminService/ImportTasks": "proxy bundle (this proxy's own certificate)",
      "rexmesh.v1.ProxyAdminService/ExportResults": "proxy bundle (this proxy's own certificate)",
      "rexmesh.v1.ProxyAdminService/ImportArtifactChunk": "proxy bundle (this proxy's own certificate)",
      "grpc.health.v1.Health/Check": "open: health checks, for load balancers and probes; reveal nothing but serving status",
      "grpc.health.v1.Health/Watch": "open: health checks, for load balancers and probes; reveal nothing but serving status",
    });
    expect(PROXY_ENROLL_LISTENER_DECLARATIONS.describe().map((r) => r.method)).toEqual(["rexmesh.v1.EnrollService/Enroll"]);
  });

  it("covers every service the controller routes", () => {
    const declared = new Set(CONTROLLER_DECLARATIONS.describe().map((r) => r.method));
    for (const s of [ControllerService, TriggerService, TokenService, RevocationService, ArtifactService, EnrollService, ProxyLinkService, Health, ServerReflection]) {
      for (const m of s.methods) expect(declared.has(`${s.typeName}/${m.name}`), `${s.typeName}/${m.name}`).toBe(true);
    }
  });
});

describe("a method without a declaration is never served", () => {
  const creds = testCredentials({ role: "controller", scope: "mesh", id: "c" }, { clock: systemClock, validityMs: 60_000 });
  const health = { check: async () => ({}), watch: async function* () {} };

  it("the server refuses to start", () => {
    const onlyHealth = new DeclarationTable().service(Health, { check: { open: "test" }, watch: { open: "test" } });
    const make = () =>
      createRpcServer({
        creds,
        log: silentLogger,
        declarations: onlyHealth,
        decide: async () => ({ peer: undefined, action: "x", by: "x" }),
        routes: (router) => {
          router.service(Health, health);
          router.service(TokenService, { createJoinToken: async () => ({}) });
        },
      });
    expect(make).toThrow(ConfigError);
    expect(make).toThrow(/rexmesh\.v1\.TokenService\/CreateJoinToken/);
  });

  it("the boundary refuses a call to it with PERMISSION_DENIED, before the handler runs", async () => {
    let ran = false;
    let decided = false;
    const transport = createRouterTransport(
      (router) => {
        router.service(TokenService, {
          createJoinToken: async () => {
            ran = true;
            return {};
          },
        });
      },
      {
        router: {
          interceptors: [
            boundaryInterceptor({
              declarations: new DeclarationTable(),
              decide: async () => {
                decided = true;
                return { peer: undefined, action: "x", by: "x" };
              },
              log: silentLogger,
            }),
          ],
        },
      },
    );
    const err = await createClient(TokenService, transport)
      .createJoinToken({})
      .then(
        () => undefined,
        (e: unknown) => ConnectError.from(e),
      );
    expect(err?.code).toBe(Code.PermissionDenied);
    expect(err?.rawMessage).toMatch(/no authorization declaration/);
    expect(ran).toBe(false);
    expect(decided).toBe(false);
  });

  it("a handler reached without a grant acts on nothing", async () => {
    const { controllerServiceImpl } = await import("../../controller/api.js");
    let touched = false;
    const access = { listHosts: async () => ((touched = true), []) };
    const transport = createRouterTransport((router) => {
      // No boundary at all: the handler finds no grant and does nothing.
      router.service(ControllerService, controllerServiceImpl({ jobs: undefined as never, access: access as never }));
    });
    const failed = await createClient(ControllerService, transport)
      .listHosts({})
      .then(
        () => false,
        () => true,
      );
    expect(failed).toBe(true);
    expect(touched).toBe(false);
  });
});

describe("the proxy's boundary (grpc-js)", () => {
  const me = { role: "proxy" as const, scope: "eu", id: "px1" };
  const table = proxyDeclarations(me);
  const revoked = new Set<string>();
  const opts = { isRevoked: (p: { id: string }) => revoked.has(p.id), log: silentLogger };
  const host = (id: string) => ({ role: "host" as const, scope: "acme", id });
  const ran: string[] = [];
  const handler = (method: Parameters<typeof guardUnary>[1]["method"]) => guardUnary(table, { method, handle: async () => void ran.push(method.name) }, opts);

  it("refuses to wire a handler whose method is not declared", () => {
    expect(() => guardUnary(new DeclarationTable(), { method: ArtifactCacheService.method.getArtifactChunk, handle: async () => undefined }, opts)).toThrow(ConfigError);
  });

  it("admits hosts to the cache and their own renewal, this proxy to its bundle commands, and nobody else", async () => {
    const chunk = handler(ArtifactCacheService.method.getArtifactChunk);
    const renew = handler(EnrollService.method.enroll);
    const importTasks = handler(ProxyAdminService.method.importTasks);
    await chunk.handle({}, host("h1"));
    await renew.handle({ hostId: "h1" }, host("h1"));
    await importTasks.handle({}, me);
    expect(ran).toEqual(["GetArtifactChunk", "Enroll", "ImportTasks"]);
    await expect(renew.handle({ hostId: "h2" }, host("h1"))).rejects.toThrow(/only renew its own certificate/);
    await expect(importTasks.handle({}, { ...me, id: "px2" })).rejects.toThrow(/this proxy's own certificate/);
    await expect(importTasks.handle({}, host("h1"))).rejects.toThrow(PermissionDeniedError);
    await expect(chunk.handle({}, { role: "operator", scope: "acme", id: "alice" })).rejects.toThrow(/an operator certificate cannot be used here/);
    expect(ran).toHaveLength(3);
  });

  it("refuses a revoked host every method, its link included", async () => {
    revoked.add("h9");
    await expect(handler(ArtifactCacheService.method.getArtifactChunk).handle({}, host("h9"))).rejects.toThrow(/revoked/);
    let served = false;
    const link = guardLink(table, AgentLinkService.method.agentStream, async () => void (served = true), opts);
    await expect(link(undefined, host("h9"))).rejects.toThrow(/revoked/);
    expect(served).toBe(false);
    await link(undefined, host("h1"));
    expect(served).toBe(true);
  });
});
