import { existsSync } from "node:fs";
import { join } from "node:path";
import { createCa, issueKeyAndCertificate } from "../certs/ca.js";
import { readCa, writeCa, writeCredentials } from "../certs/files.js";
import { checkSegment, identityUri, isRole, type PeerIdentity } from "../certs/identity.js";
import { systemClock } from "../common/clock.js";
import { parseDuration } from "../common/duration.js";
import { FailedPreconditionError, InvalidArgumentError } from "../common/errors.js";
import { helpText, parse, type OptionSpec } from "./args.js";
import type { Io } from "./operator.js";

const caOptions: Record<string, OptionSpec> = {
  dir: { type: "string", doc: "CA directory (default: REXMESH_CA_DIR or ./rexmesh-ca)", value: "DIR" },
  role: { type: "string", doc: "issue: host, proxy, operator, controller or enroll (a tenant's zero certificate: it can only enroll hosts)", value: "ROLE" },
  id: { type: "string", doc: "issue: host id, proxy name, operator name, controller name or zero certificate name", value: "ID" },
  tenant: { type: "string", doc: "issue: tenant of a host, operator or zero certificate (default: default)", value: "TENANT" },
  region: { type: "string", doc: "issue: region of a proxy", value: "REGION" },
  out: { type: "string", doc: "issue: where to write ID.crt, ID.key and ca.crt (default: the current directory)", value: "DIR" },
  validity: { type: "string", doc: "issue: lifetime (default 24h for hosts, 7d for zero certificates, 90d otherwise)", value: "DURATION" },
  dns: { type: "string", multiple: true, doc: "issue: DNS name the certificate serves (controller, proxy; repeatable)", value: "NAME" },
  ip: { type: "string", multiple: true, doc: "issue: IP address the certificate serves (repeatable)", value: "ADDR" },
  force: { type: "boolean", doc: "init: replace an existing CA" },
  help: { type: "boolean", short: "h", doc: "show this help" },
};

/** Builds the identity a certificate will name; the scope depends on the role. */
function identityFor(role: string, id: string, opts: { tenant?: string; region?: string }): PeerIdentity {
  if (!isRole(role)) throw new InvalidArgumentError(`--role must be host, proxy, operator or controller (or enroll, for a zero certificate), not ${JSON.stringify(role)}`);
  let scope: string;
  if (role === "proxy") {
    if (!opts.region) throw new InvalidArgumentError("a proxy certificate needs --region");
    scope = opts.region;
  } else if (role === "controller") scope = "mesh";
  else scope = opts.tenant ?? "default";
  return { role, scope: checkSegment(role === "proxy" ? "region" : "tenant", scope), id: checkSegment("id", id) };
}

/** `rexmesh ca init|issue`: a certificate authority on disk, for bootstrapping a mesh by hand. */
export async function caCommand(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, caOptions);
  const v = p.values;
  const verb = p.positionals[0];
  if (v.help || !verb) {
    io.out(
      helpText("rexmesh ca (init | issue --role ROLE --id ID ...) [--dir DIR]", caOptions, [
        "rexmesh ca init --dir ./ca",
        "rexmesh ca issue --dir ./ca --role controller --id ctl --dns ctl.example.net --out ./controller",
        "rexmesh ca issue --dir ./ca --role proxy --region eu-1 --id px1 --dns px1.eu-1.example.net",
        "rexmesh ca issue --dir ./ca --role operator --tenant default --id alice",
        "rexmesh ca issue --dir ./ca --role host --tenant default --id web-1",
        "rexmesh ca issue --dir ./ca --role enroll --tenant default --id rack-12   # zero certificate",
      ]),
    );
    return v.help ? 0 : 2;
  }
  const dir = (v.dir as string | undefined) ?? process.env.REXMESH_CA_DIR ?? "rexmesh-ca";
  const clock = systemClock;
  if (verb === "init") {
    if (existsSync(join(dir, "ca.key")) && !v.force) throw new FailedPreconditionError(`a CA already exists in ${dir} (use --force to replace it)`);
    writeCa(dir, createCa({ clock }));
    io.out(`CA created in ${dir} (ca.crt, ca.key with mode 0600)\n`);
    return 0;
  }
  if (verb === "issue") {
    if (typeof v.role !== "string" || typeof v.id !== "string") throw new InvalidArgumentError("issue needs --role and --id");
    const identity = identityFor(v.role, v.id, { tenant: v.tenant as string | undefined, region: v.region as string | undefined });
    const serves = identity.role === "controller" || identity.role === "proxy";
    const validityMs = typeof v.validity === "string" ? parseDuration(v.validity, "--validity") : identity.role === "host" ? 86_400_000 : identity.role === "enroll" ? 7 * 86_400_000 : 90 * 86_400_000;
    const creds = issueKeyAndCertificate(readCa(dir), {
      clock,
      identity,
      validityMs,
      dnsNames: (v.dns as string[] | undefined) ?? (serves ? ["localhost"] : []),
      ipAddresses: (v.ip as string[] | undefined) ?? (serves ? ["127.0.0.1", "::1"] : []),
    });
    const out = (v.out as string | undefined) ?? ".";
    writeCredentials(out, identity.id, creds);
    io.out(`issued ${identityUri(identity)} → ${join(out, identity.id)}.crt / .key (mode 0600), ca.crt\n`);
    return 0;
  }
  throw new InvalidArgumentError(`unknown ca command ${JSON.stringify(verb)} (init, issue)`);
}
