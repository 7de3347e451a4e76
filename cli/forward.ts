import { createServer, type Server } from "node:net";
import { create } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { InvalidArgumentError } from "../common/errors.js";
import { keepaliveOf } from "../common/session-frames.js";
import { ForwardMux } from "../common/session-forward.js";
import { SessionEndedError } from "../common/session-port.js";
import { SessionSpecSchema } from "../gen/rexmesh/v1/session_pb.js";
import { helpText, parse, type OptionSpec } from "./args.js";
import { connectionOptions } from "./client.js";
import type { Io } from "./operator.js";
import { dialSession } from "./shell.js";

const options: Record<string, OptionSpec> = {
  ...connectionOptions,
  help: { type: "boolean", short: "h", doc: "show this help" },
};

const USAGE = "rexmesh forward HOST [LOCAL_ADDR:]LOCAL_PORT:REMOTE_ADDR:REMOTE_PORT";

const ABOUT = `Forwards a local TCP port through the mesh to an address as HOST reaches it
(like ssh -L): each connection to LOCAL_ADDR:LOCAL_PORT (default address
127.0.0.1; port 0 picks a free one, printed) is opened from HOST to
REMOTE_ADDR:REMOTE_PORT. Many connections at once, each with its own credit
window, so a slow one slows only itself. Runs until Ctrl-C. Needs the
'forward' action in the policy; a role forwards only to its forwardTo list
(by default the host's loopback: 127.0.0.1, ::1, localhost).

`;

/** A forward as written: where to listen here, where to go from the host. */
export interface ForwardAddresses {
  localHost: string;
  localPort: number;
  remoteHost: string;
  remotePort: number;
}

/** Parses "[LADDR:]LPORT:RADDR:RPORT"; IPv6 addresses in brackets. */
export function parseForward(text: string): ForwardAddresses {
  const parts: string[] = [];
  const re = /\[([^\]]*)\]|([^:]+)/y;
  let at = 0;
  for (;;) {
    re.lastIndex = at;
    const m = re.exec(text);
    if (!m) break;
    parts.push(m[1] ?? m[2]!);
    at = re.lastIndex;
    if (text[at] !== ":") break;
    at++;
  }
  const bad = () => new InvalidArgumentError(`${JSON.stringify(text)} is not [LOCAL_ADDR:]LOCAL_PORT:REMOTE_ADDR:REMOTE_PORT (IPv6 addresses in brackets)`);
  if (at !== text.length || (parts.length !== 3 && parts.length !== 4)) throw bad();
  const [localHost, lport, remoteHost, rport] = parts.length === 4 ? parts : ["127.0.0.1", ...parts];
  const port = (p: string, min: number) => {
    if (!/^\d{1,5}$/.test(p) || Number(p) < min || Number(p) > 65535) throw bad();
    return Number(p);
  };
  return { localHost: localHost!, localPort: port(lport!, 0), remoteHost: remoteHost!, remotePort: port(rport!, 1) };
}

/** `rexmesh forward`: a port forward through the mesh (docs/sessions.md, "Port forwarding"). */
export async function forwardCommand(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, options);
  const v = p.values;
  if (v.help) {
    io.out(ABOUT + helpText(USAGE, options, ["rexmesh forward db-1 5432:127.0.0.1:5432", "rexmesh forward web-1 0.0.0.0:8080:localhost:80", "rexmesh forward web-1 '[::1]:8443:[::1]:443'"]));
    return 0;
  }
  const [host, what, ...extra] = p.positionals;
  if (!host || !what || extra.length > 0 || p.rest.length > 0) throw new InvalidArgumentError(`say which host and what to forward: ${USAGE}`);
  const f = parseForward(what);
  const spec = create(SessionSpecSchema, { forward: { host: f.remoteHost, port: f.remotePort } });
  const { port, opening, release } = await dialSession("forward", host, spec, v);
  let server: Server | undefined;
  let mux: ForwardMux | undefined;
  let byOperator = false;
  const stop = () => {
    byOperator = true;
    port.end({ code: Code.Canceled, message: "the operator stopped the forward" });
  };
  try {
    mux = new ForwardMux({ side: port });
    port.start(mux.handlers(), opening.frame, keepaliveOf(opening.started.keepaliveMs));
    server = createServer({ allowHalfOpen: true }, (socket) => mux!.attach(socket));
    await new Promise<void>((resolve, reject) => {
      server!.once("error", reject);
      server!.listen(f.localPort, f.localHost, () => resolve());
    });
    const bound = server.address();
    const local = typeof bound === "object" && bound ? `${bound.family === "IPv6" ? `[${bound.address}]` : bound.address}:${bound.port}` : what;
    const remote = `${f.remoteHost.includes(":") ? `[${f.remoteHost}]` : f.remoteHost}:${f.remotePort}`;
    io.out(`forwarding ${local} to ${remote} from ${host} (session ${opening.started.sessionId}, through proxy ${opening.started.proxy}); Ctrl-C stops it\n`);
    process.on("SIGINT", stop);
    process.on("SIGTERM", stop);
    const end = await port.ended;
    if (byOperator) return 0;
    throw new SessionEndedError(`port forward through ${host} ended: ${end.message || "by the controller"}`, end.code || Code.Unavailable);
  } finally {
    process.off("SIGINT", stop);
    process.off("SIGTERM", stop);
    server?.close();
    mux?.close();
    release();
  }
}
