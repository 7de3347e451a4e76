import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { parseDuration } from "../common/duration.js";
import { InvalidArgumentError } from "../common/errors.js";
import { AuditDecision, type AuditEvent } from "../gen/rexmesh/v1/controller_pb.js";
import { helpText, parse, type OptionSpec } from "./args.js";
import { connectionOptions, operatorClient } from "./client.js";
import type { Io } from "./operator.js";

const auditOptions: Record<string, OptionSpec> = {
  since: { type: "string", doc: "only events since then: a duration ago (1h, 30m) or an ISO time", value: "WHEN" },
  limit: { type: "string", doc: "at most this many of the newest events (default 100, at most 1000)", value: "N" },
  json: { type: "boolean", doc: "one JSON object per line per event" },
  ...connectionOptions,
  help: { type: "boolean", short: "h", doc: "show this help" },
};

/** `--since`: "1h" means an hour ago, anything else must be an ISO date/time. */
function parseSince(text: string, now: number): number {
  if (/^(\d+(\.\d+)?(ms|s|m|h|d))+$/.test(text.trim())) return now - parseDuration(text.trim(), "--since");
  const ms = Date.parse(text);
  if (Number.isNaN(ms)) throw new InvalidArgumentError(`--since ${JSON.stringify(text)} is neither a duration (1h, 30m) nor an ISO time`);
  return ms;
}

function auditJson(e: AuditEvent) {
  return {
    id: e.id,
    time: e.time ? new Date(timestampMs(e.time)).toISOString() : undefined,
    kind: e.kind,
    tenant: e.tenant,
    actor: e.actor,
    decision: (AuditDecision[e.decision] ?? "UNSPECIFIED").toLowerCase(),
    reason: e.reason,
    what: e.what,
    hosts: e.hostIds,
    hostCount: e.hostCount,
    ...(e.jobId ? { job: e.jobId } : {}),
  };
}

/** `rexmesh audit [--since 1h|ISO] [--json]`: the audit log of your tenant, oldest first. */
export async function auditCommand(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, auditOptions);
  const v = p.values;
  if (v.help) {
    io.out(helpText("rexmesh audit [--since 1h|ISO] [--limit N] [--json]", auditOptions, ["rexmesh audit --since 1h", "rexmesh audit --since 2025-01-31T08:00:00Z --json | jq 'select(.decision==\"denied\")'"]));
    return 0;
  }
  if (p.positionals.length > 0) throw new InvalidArgumentError(`unexpected ${JSON.stringify(p.positionals[0])}`);
  const since = typeof v.since === "string" ? timestampFromMs(parseSince(v.since, Date.now())) : undefined;
  const limit = typeof v.limit === "string" ? Number(v.limit) : 0;
  if (!Number.isInteger(limit) || limit < 0) throw new InvalidArgumentError(`--limit must be a whole number, not ${JSON.stringify(v.limit)}`);
  const { client, close } = operatorClient(v);
  try {
    const { events } = await client.listAudit({ since, limit }, { signal: io.signal });
    for (const e of events.map(auditJson)) {
      if (v.json) {
        io.out(JSON.stringify(e) + "\n");
        continue;
      }
      const hosts = e.hostCount ? `  on ${e.hosts.join(",")}${e.hostCount > e.hosts.length ? ` (+${e.hostCount - e.hosts.length} more)` : ""}` : "";
      io.out(`${e.time}  ${e.decision.toUpperCase().padEnd(8)}  ${e.kind.padEnd(7)}  ${e.actor}  ${e.what}${hosts}${e.job ? `  job ${e.job}` : ""}${e.reason ? `  -- ${e.reason}` : ""}\n`);
    }
    return 0;
  } finally {
    close();
  }
}
