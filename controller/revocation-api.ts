import type { ServiceImpl } from "@connectrpc/connect";
import { grantedPeer } from "../common/connect-server.js";
import type { RevocationService } from "../gen/rexmesh/v1/revocation_pb.js";
import type { OperatorAccess } from "./access.js";

/**
 * The RevocationService handlers. The boundary admitted the caller and its
 * action; the scope of a revocation (a host of the caller's tenant, an
 * operator of it, or a proxy) and its audit are in OperatorAccess, the
 * deny-list in Revocations.
 */
export function revocationServiceImpl(access: OperatorAccess): ServiceImpl<typeof RevocationService> {
  return {
    async revoke(req, ctx) {
      const caller = grantedPeer(ctx);
      await access.revoke(caller, req);
      return { denyList: access.listRevoked(caller), unknownHost: req.role === "host" && !access.knowsHost(caller, req.id) };
    },
    async listRevoked(_req, ctx) {
      return { denyList: access.listRevoked(grantedPeer(ctx)) };
    },
  };
}
