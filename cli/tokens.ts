import { create } from "@bufbuild/protobuf";
import { durationFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { clientFor } from "../common/connect-dial.js";
import { parseDuration } from "../common/duration.js";
import { InvalidArgumentError } from "../common/errors.js";
import { CreateJoinTokenRequestSchema, TokenService } from "../gen/rexmesh/v1/enroll_pb.js";
import { helpText, parse, type OptionSpec } from "./args.js";
import { connectionOptions, operatorChannel } from "./client.js";
import type { Io } from "./operator.js";

const tokenOptions: Record<string, OptionSpec> = {
  tenant: { type: "string", doc: "tenant the hosts join (default: your own; you can create tokens for your tenant only)", value: "TENANT" },
  ttl: { type: "string", doc: "how long the token can be used (default 1h, at most 30d)", value: "DURATION" },
  uses: { type: "string", doc: "how many hosts can enroll with it (default 1)", value: "N" },
  "host-id": { type: "string", doc: "only this host id can enroll with it (also lets that id enroll again with its key)", value: "ID" },
  rekey: { type: "boolean", doc: "with --host-id: lets that enrolled host id enroll once with a NEW key (needs the policy action rekey; audited)" },
  json: { type: "boolean", doc: "print {token, id, expiresAt} as JSON" },
  ...connectionOptions,
  help: { type: "boolean", short: "h", doc: "show this help" },
};

/** `rexmesh tokens create`: a join token for new hosts, printed once. */
export async function tokensCommand(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, tokenOptions);
  const v = p.values;
  if (v.help || p.positionals[0] !== "create") {
    io.out(
      helpText("rexmesh tokens create [--tenant T] [--ttl 1h] [--uses 1] [--host-id ID [--rekey]] [--json]", tokenOptions, [
        "rexmesh tokens create --tenant acme                       # one host, within the hour",
        "rexmesh tokens create --tenant acme --ttl 24h --uses 50   # a rack",
        "rexmesh tokens create --host-id web-1                     # only web-1 (also re-enrolls it with its key)",
        "rexmesh tokens create --host-id web-1 --rekey             # web-1 was rebuilt: one enrollment with a new key",
        "rexmesh daemon --identities /etc/rexmesh --host-id web-1 --join-token TOKEN --enroll-via px1:7445 --ca ca.crt --proxies px1:7444",
      ]),
    );
    return v.help ? 0 : 2;
  }
  if (p.positionals.length > 1) throw new InvalidArgumentError(`unexpected ${JSON.stringify(p.positionals[1])}`);
  let uses = 0;
  if (typeof v.uses === "string") {
    if (!/^\d+$/.test(v.uses)) throw new InvalidArgumentError(`--uses must be a whole number, not ${JSON.stringify(v.uses)}`);
    uses = Number(v.uses);
  }
  const req = create(CreateJoinTokenRequestSchema, {
    tenant: (v.tenant as string | undefined) ?? "",
    ttl: typeof v.ttl === "string" ? durationFromMs(parseDuration(v.ttl, "--ttl")) : undefined,
    uses,
    hostId: (v.hostId as string | undefined) ?? "",
    rekey: v.rekey === true,
  });
  const channel = operatorChannel(v);
  try {
    const res = await clientFor(TokenService, channel).createJoinToken(req, { signal: io.signal });
    const expiresAt = res.expiresAt ? new Date(timestampMs(res.expiresAt)).toISOString() : "";
    if (v.json) io.out(JSON.stringify({ token: res.token, id: res.tokenId, expiresAt }) + "\n");
    else {
      io.out(`${res.token}\n`);
      io.err(`join token ${res.tokenId}, valid until ${expiresAt}; it is shown only now\n`);
    }
    return 0;
  } finally {
    channel.close();
  }
}
