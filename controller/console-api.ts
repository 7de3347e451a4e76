import type { ServiceImpl } from "@connectrpc/connect";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { grantedPeer, peerNotAfterKey } from "../common/connect-server.js";
import { FailedPreconditionError } from "../common/errors.js";
import type { ConsoleService } from "../gen/rexmesh/v1/console_pb.js";
import type { ConsoleSessions } from "./console-sessions.js";

/**
 * ConsoleService on the main port: an operator's one-time login link. The
 * secret goes in the URL's fragment, which browsers never send to a server,
 * so it cannot end up in a proxy's or the controller's request log; the
 * console page posts it to /session/login.
 */
export function consoleServiceImpl(deps: { sessions: ConsoleSessions; baseUrl: string | undefined }): ServiceImpl<typeof ConsoleService> {
  return {
    createConsoleLink(_req, ctx) {
      if (!deps.baseUrl) throw new FailedPreconditionError("the web console is off at this controller: it serves one when started with --console-listen HOST:PORT (docs/console.md)");
      const { secret, expiresAt } = deps.sessions.createLink(grantedPeer(ctx), ctx.values.get(peerNotAfterKey));
      return { url: `${deps.baseUrl}/login#${secret}`, expiresAt: timestampFromMs(expiresAt) };
    },
  };
}
