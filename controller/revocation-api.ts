import type { ServiceImpl } from "@connectrpc/connect";
import { requireRole } from "../certs/identity.js";
import { callerOf } from "../common/connect-server.js";
import type { Logger } from "../common/logger.js";
import { toConnectError } from "../common/rpc-errors.js";
import type { RevocationService } from "../gen/rexmesh/v1/revocation_pb.js";
import type { Revocations } from "./revocation.js";

/** The RevocationService handlers: operators only; the logic is in Revocations. */
export function revocationServiceImpl(revocations: Revocations, log: Logger): ServiceImpl<typeof RevocationService> {
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
        await revocations.revoke(requireRole(callerOf(ctx), "operator"), req);
        return { denyList: revocations.denyList };
      }),
    listRevoked: (_req, ctx) =>
      guard(async () => {
        requireRole(callerOf(ctx), "operator");
        return { denyList: revocations.denyList };
      }),
  };
}
