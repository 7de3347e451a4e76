import { InvalidArgumentError } from "../common/errors.js";
import { clientFor } from "../common/connect-dial.js";
import { RevocationService } from "../gen/rexmesh/v1/revocation_pb.js";
import { helpText, parse, type OptionSpec } from "./args.js";
import { connectionOptions, operatorChannel } from "./client.js";
import type { Io } from "./operator.js";

const options: Record<string, OptionSpec> = {
  reason: { type: "string", doc: "why, for the audit trail", value: "TEXT" },
  region: { type: "string", doc: "proxies: the proxy's region", value: "REGION" },
  tenant: { type: "string", doc: "hosts and operators: the tenant (default: yours)", value: "TENANT" },
  json: { type: "boolean", doc: "JSON output" },
  ...connectionOptions,
  help: { type: "boolean", short: "h", doc: "show this help" },
};

/**
 * `rexmesh hosts|proxies|operators revoke ID`: the identity's certificates are
 * refused from now on; open streams are closed by every proxy, including one
 * that is cut off, as soon as it hears of it.
 */
export async function revokeCommand(role: "host" | "proxy" | "operator", argv: string[], io: Io, env: NodeJS.ProcessEnv = process.env): Promise<number> {
  const p = parse(argv, options);
  const noun = role === "proxy" ? "proxies" : `${role}s`;
  if (p.values.help) {
    io.out(helpText(`rexmesh ${noun} revoke ID [--reason TEXT]${role === "proxy" ? " --region REGION" : ""}`, options, [`rexmesh ${noun} revoke ${role === "proxy" ? "px1 --region eu-1" : role === "host" ? "web-7" : "mallory"} --reason "key leaked"`]));
    return 0;
  }
  const id = p.positionals[0];
  if (!id) throw new InvalidArgumentError(`rexmesh ${noun} revoke needs an id`);
  const scope = role === "proxy" ? p.values.region : p.values.tenant;
  if (role === "proxy" && typeof scope !== "string") throw new InvalidArgumentError("a proxy is named with its region: --region REGION");
  const channel = operatorChannel(p.values, env);
  try {
    const client = clientFor(RevocationService, channel);
    const r = await client.revoke({ role, scope: (scope as string | undefined) ?? "", id, reason: (p.values.reason as string | undefined) ?? "" }, { signal: io.signal });
    const version = r.denyList?.version ?? 0n;
    io.out(p.values.json ? JSON.stringify({ revoked: id, role, denyListVersion: Number(version), ...(r.unknownHost ? { unknownHost: true } : {}) }) + "\n" : `revoked ${role} ${id} (deny-list version ${version})\n`);
    if (r.unknownHost && !p.values.json) io.err(`note: no host ${id} has ever connected to this controller; it is revoked all the same (check the id if that is a surprise)\n`);
    return 0;
  } finally {
    channel.close();
  }
}
