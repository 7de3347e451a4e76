import { describe, expect, it } from "vitest";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { createCa, issueKeyAndCertificate } from "../../certs/ca.js";
import { systemClock } from "../../common/clock.js";
import { boundaryInterceptor, createRpcServer } from "../../common/connect-server.js";
import { ConfigError } from "../../common/errors.js";
import { silentLogger } from "../../common/logger.js";
import { DeclarationTable } from "../../common/rpc-access.js";
import { CONTROLLER_DECLARATIONS, ENROLL_LISTENER_DECLARATIONS } from "../../controller/declarations.js";
import { ServerReflection } from "../../gen/grpc/reflection/v1/reflection_pb.js";
import { Health } from "../../gen/grpc/health/v1/health_pb.js";
import { ArtifactService } from "../../gen/rexmesh/v1/artifact_pb.js";
import { ControllerService } from "../../gen/rexmesh/v1/controller_pb.js";
import { EnrollService, TokenService } from "../../gen/rexmesh/v1/enroll_pb.js";
import { ProxyLinkService } from "../../gen/rexmesh/v1/proxy_link_pb.js";
import { RevocationService } from "../../gen/rexmesh/v1/revocation_pb.js";
import { PROXY_ENROLL_LISTENER_DECLARATIONS, proxyDeclarations } from "../../proxy/declarations.js";

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
      "rexmesh.v1.ControllerService/ListJobs": "operator read (hosts resolved)",
      "rexmesh.v1.ControllerService/ExportBundle": "operator bundle (hosts resolved)",
      "rexmesh.v1.ControllerService/ImportBundle": "operator bundle (hosts resolved)",
      "rexmesh.v1.ControllerService/SetHostLabels": "operator label (hosts resolved)",
      "rexmesh.v1.ControllerService/ListAudit": "operator audit (tenant)",
      "rexmesh.v1.ControllerService/PutDocument": "operator document (tenant)",
      "rexmesh.v1.ControllerService/GetDocument": "operator read (tenant)",
      "rexmesh.v1.ControllerService/ListDocuments": "operator read (tenant)",
      "rexmesh.v1.TokenService/CreateJoinToken": "operator token (hosts named)",
      "rexmesh.v1.RevocationService/Revoke": "operator revoke | revoke.operator | revoke.proxy (hosts resolved)",
      "rexmesh.v1.RevocationService/ListRevoked": "operator read (tenant)",
      "rexmesh.v1.ArtifactService/PutArtifact": "operator artifact.write (tenant)",
      "rexmesh.v1.ArtifactService/GetArtifact": "operator artifact.read (tenant); proxy artifact.read (any artifact, for the hosts of every tenant in its region)",
      "rexmesh.v1.EnrollService/Enroll": "enroll|proxy enroll (the bootstrap credential in the request, decided and audited by controller/enroll.ts)",
      "rexmesh.v1.ProxyLinkService/ProxyStream": "proxy link (its own name and region: the hello must match the certificate (controller/proxy-link.ts))",
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
      "rexmesh.v1.ArtifactCacheService/GetArtifactChunk": "host artifact.read (an artifact by digest; the daemon checks the digest, and tasks name only their tenant's artifacts)",
      "rexmesh.v1.EnrollService/Enroll": "host renew (its own certificate: the request must name the certificate's host id)",
      "rexmesh.v1.ProxyAdminService/ImportTasks": "proxy bundle (this proxy's own certificate)",
      "rexmesh.v1.ProxyAdminService/ExportResults": "proxy bundle (this proxy's own certificate)",
      "grpc.health.v1.Health/Check": "open: health checks, for load balancers and probes; reveal nothing but serving status",
      "grpc.health.v1.Health/Watch": "open: health checks, for load balancers and probes; reveal nothing but serving status",
    });
    expect(PROXY_ENROLL_LISTENER_DECLARATIONS.describe().map((r) => r.method)).toEqual(["rexmesh.v1.EnrollService/Enroll"]);
  });

  it("covers every service the controller routes", () => {
    const declared = new Set(CONTROLLER_DECLARATIONS.describe().map((r) => r.method));
    for (const s of [ControllerService, TokenService, RevocationService, ArtifactService, EnrollService, ProxyLinkService, Health, ServerReflection]) {
      for (const m of s.methods) expect(declared.has(`${s.typeName}/${m.name}`), `${s.typeName}/${m.name}`).toBe(true);
    }
  });
});

describe("a method without a declaration is never served", () => {
  const ca = createCa({ clock: systemClock });
  const creds = { ...issueKeyAndCertificate(ca, { clock: systemClock, identity: { role: "controller", scope: "mesh", id: "c" }, validityMs: 60_000 }), caPem: ca.certPem };
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
