import type { ServiceImpl } from "@connectrpc/connect";
import { formatIdentity, requireRole } from "../certs/identity.js";
import type { AuditLog } from "./audit.js";
import { callerOf } from "../common/connect-server.js";
import type { Logger } from "../common/logger.js";
import { toConnectError } from "../common/rpc-errors.js";
import type { RevocationService } from "../gen/rexmesh/v1/revocation_pb.js";
import type { Revocations } from "./revocation.js";

/** The RevocationService handlers: operators only; the logic is in Revocations. */
export function revocationServiceImpl(revocations: Revocations, log: Logger, audit?: AuditLog): ServiceImpl<typeof RevocationService> {
  const guard = async <T>(fn: () => Promise<T>): Promise<T> => {
    try {
      return await fn();
    } catch (err) {
      log.info("revocation request refused", { err });
      throw toConnectError(err);
    }
  };
  return {
    revoke: (req, ctx) =>
      guard(async () => {
        const caller = requireRole(callerOf(ctx), "operator");
        const what = `revoke ${req.role} ${req.scope ? `${req.scope}/` : ""}${req.id}${req.reason ? ` (${req.reason})` : ""}`;
        try {
          const entry = await revocations.revoke(caller, req);
          await audit?.append({ kind: "revoke", tenant: caller.scope, actor: formatIdentity(caller), decision: "allowed", what: entry.uri, reason: req.reason || undefined });
        } catch (err) {
          await audit?.append({ kind: "revoke", tenant: caller.scope, actor: formatIdentity(caller), decision: "denied", what, reason: (err as Error).message }).catch(() => undefined);
          throw err;
        }
        return { denyList: revocations.denyList };
      }),
    listRevoked: (_req, ctx) =>
      guard(async () => {
        requireRole(callerOf(ctx), "operator");
        return { denyList: revocations.denyList };
      }),
  };
}
