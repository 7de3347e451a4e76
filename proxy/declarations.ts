/**
 * What every RPC a proxy serves needs (common/rpc-access.ts). A proxy
 * serves mesh identities only: hosts of its region (AgentLink, the artifact
 * cache, certificate renewal) and itself (the bundle commands of a site
 * with no link). Every decision is logged; the proxy keeps no audit log.
 */
import { PermissionDeniedError } from "../common/errors.js";
import { DeclarationTable } from "../common/rpc-access.js";
import type { PeerIdentity } from "../certs/identity.js";
import { Health } from "../gen/grpc/health/v1/health_pb.js";
import { AgentLinkService } from "../gen/rexmesh/v1/agent_link_pb.js";
import { ArtifactCacheService } from "../gen/rexmesh/v1/artifact_pb.js";
import { EnrollService } from "../gen/rexmesh/v1/enroll_pb.js";
import { ProxyAdminService } from "../gen/rexmesh/v1/proxy_admin_pb.js";

const HEALTH = "health checks, for load balancers and probes; reveal nothing but serving status";

/** The proxy's main port (mutual TLS), for the proxy whose certificate names `me`. */
export function proxyDeclarations(me: PeerIdentity): DeclarationTable {
  const self = (peer: PeerIdentity) => {
    if (peer.role !== "proxy" || peer.id !== me.id || peer.scope !== me.scope) throw new PermissionDeniedError("bundle commands need this proxy's own certificate");
  };
  return new DeclarationTable()
    .service(AgentLinkService, {
      agentStream: { peer: { roles: ["host"], action: "link", scope: "its own host id: the hello must match the certificate (proxy/proxy.ts)" } },
      agentSession: { peer: { roles: ["host"], action: "session", scope: "a session ordered for this host: the first message must name one (proxy/session-relay.ts)" } },
    })
    .service(ArtifactCacheService, {
      getArtifactChunk: { peer: { roles: ["host"], action: "artifact.read", scope: "an artifact by digest; the daemon checks the digest, and tasks name only their tenant's artifacts" } },
    })
    .service(EnrollService, {
      enroll: {
        peer: {
          roles: ["host"],
          action: "renew",
          scope: "its own certificate: the request must name the certificate's host id",
          check: (peer, req) => {
            if (peer.id !== req.hostId) throw new PermissionDeniedError("on this port a host may only renew its own certificate");
          },
        },
      },
    })
    .service(ProxyAdminService, {
      importTasks: { peer: { roles: ["proxy"], action: "bundle", scope: "this proxy's own certificate", check: self } },
      exportResults: { peer: { roles: ["proxy"], action: "bundle", scope: "this proxy's own certificate", check: self } },
      // Content-addressed: a slice can only add to the cache what hashes to its digest.
      importArtifactChunk: { peer: { roles: ["proxy"], action: "bundle", scope: "this proxy's own certificate", check: self } },
    })
    .service(Health, { check: { open: HEALTH }, watch: { open: HEALTH } });
}

/** The optional enroll relay listener: no client certificate, EnrollService only. */
export const PROXY_ENROLL_LISTENER_DECLARATIONS = new DeclarationTable().service(EnrollService, {
  enroll: { open: "callers have no certificate yet: relayed to the controller, which decides and audits" },
});
