import { create } from "@bufbuild/protobuf";
import { durationFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { clientFor } from "../common/connect-dial.js";
import { parseDuration } from "../common/duration.js";
import { InvalidArgumentError } from "../common/errors.js";
import { printable } from "../common/limits.js";
import { TriggerService, TriggerSpecSchema, type StoredEvent, type Trigger } from "../gen/rexmesh/v1/trigger_pb.js";
import { helpText, parse, refuseAddOnly, type OptionSpec } from "./args.js";
import { connectionOptions, operatorChannel, operatorClient } from "./client.js";
import { buildJobRequest, refuseRepeated, runOptions, type Io } from "./operator.js";
import { table } from "./table.js";

/** `run`'s options that say nothing of a job submitted later, by a trigger. */
const NOT_FOR_TRIGGERS = ["dry-run", "idempotency-key", "detach", "group"] as const;

const triggerOptions: Record<string, OptionSpec> = {
  on: { type: "string", doc: "add: the events it fires on: key=value / key!=value terms joined by 'and' (kind is the event's kind, other keys its details)", value: "'EXPR'" },
  run: { type: "string", doc: "add: run this stored document (as --doc)", value: "DOC" },
  cooldown: { type: "string", doc: "add: no second job for the same host within this time (default 10m; 0s: none)", value: "DURATION" },
  "max-per-host": { type: "string", doc: "add: at most N jobs per host within a window (default 10/1h)", value: "N/DURATION" },
  ...Object.fromEntries(Object.entries(runOptions).filter(([k]) => !(NOT_FOR_TRIGGERS as readonly string[]).includes(k))),
  ...connectionOptions,
  json: { type: "boolean", doc: "JSON output" },
  help: { type: "boolean", short: "h", doc: "show this help" },
};

const USAGE =
  "rexmesh triggers [list] | add NAME --on 'EXPR' (--run DOC [-p K=V]... | -- CMD | --shell S) [-H IDS | --all | -t QUERY] [--cooldown D] [--max-per-host N/D] [job options] | show NAME | pause NAME | resume NAME | remove NAME";

const ABOUT = `Triggers queue a job when a host reports an event that matches (docs/triggers.md).
Hosts report events from the watchers in their daemon's watch file. The job
runs on the host that reported the event, unless -H, --all or -t names the
hosts; it is an ordinary job of the operator who added the trigger,
authorized each time it fires. A cooldown and a per-host rate keep a
flapping service from starting a storm; 'rexmesh events' shows what each
event did.

`;

function triggerClient(v: Record<string, unknown>) {
  const channel = operatorChannel(v);
  return { client: clientFor(TriggerService, channel), close: () => channel.close() };
}

/** `rexmesh triggers`: list, add, show, pause, resume, remove. */
export async function triggersCommand(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, triggerOptions);
  const v = p.values;
  if (v.help) {
    io.out(
      ABOUT +
        helpText(USAGE, triggerOptions, [
          "rexmesh triggers add restart-nginx --on 'kind=service.failed and unit=nginx.service' --cooldown 10m --max-per-host 3/1h -- systemctl restart nginx",
          "rexmesh triggers add clean-tmp --on 'kind=disk.full and path=/tmp' --run clean-tmp -p age=7d",
          "rexmesh triggers",
          "rexmesh triggers show restart-nginx",
          "rexmesh triggers pause restart-nginx",
        ]),
    );
    return 0;
  }
  const [sub = "list", name, ...extra] = p.positionals;
  if (sub === "add") {
    if (!name || extra.length > 0) throw new InvalidArgumentError(`rexmesh triggers add needs one name: ${USAGE}`);
    return add(name, v, p.rest, io);
  }
  if (sub !== "list" && (!name || extra.length > 0)) throw new InvalidArgumentError(`rexmesh triggers ${sub} needs one trigger name`);
  refuseAddOnly("triggers", triggerOptions, v, p.rest, ["json", "help", ...Object.keys(connectionOptions)]);
  const { client, close } = triggerClient(v);
  try {
    switch (sub) {
      case "list": {
        const { triggers } = await client.listTriggers({}, { signal: io.signal });
        if (v.json) io.out(JSON.stringify(triggers.map(triggerJson), null, 2) + "\n");
        else if (triggers.length === 0) io.out("no triggers\n");
        else {
          io.out(
            table([
              ["NAME", "ON", "STATE", "COOLDOWN", "RATE", "FIRED", "SUPPRESSED", "BY"],
              ...triggers.map((t) => {
                const j = triggerJson(t);
                return [j.name, j.on, j.paused ? "paused" : "active", `${j.cooldownSeconds}s`, `${j.maxPerHost}/${j.rateWindowSeconds}s`, String(j.fired), String(j.suppressed), j.createdBy];
              }),
            ]),
          );
        }
        return 0;
      }
      case "show": {
        const { trigger } = await client.getTrigger({ name: name! }, { signal: io.signal });
        const j = triggerJson(trigger!);
        if (v.json) {
          io.out(JSON.stringify(j, null, 2) + "\n");
          return 0;
        }
        io.out(
          [
            `trigger ${j.name} (${j.paused ? "paused" : "active"}), by ${j.createdBy} since ${j.createdAt}`,
            `  on ${j.on}`,
            `  runs ${j.what}${j.targeted ? "" : " on the host that reported the event"}`,
            `  cooldown ${j.cooldownSeconds} s; at most ${j.maxPerHost} jobs per host in ${j.rateWindowSeconds} s; fired ${j.fired}, suppressed ${j.suppressed}`,
            ...j.recent.map((f) => `  ${f.at}  ${f.hostId}  ${f.eventId}  ${f.jobId || "-"}  ${f.note}`),
          ].join("\n") + "\n",
        );
        return 0;
      }
      case "pause":
      case "resume": {
        const { trigger } = await client.pauseTrigger({ name: name!, paused: sub === "pause" }, { signal: io.signal });
        io.out(v.json ? JSON.stringify(triggerJson(trigger!)) + "\n" : `${name}: ${sub === "pause" ? "paused" : "active"}\n`);
        return 0;
      }
      case "remove":
        await client.deleteTrigger({ name: name! }, { signal: io.signal });
        io.out(v.json ? JSON.stringify({ removed: name }) + "\n" : `${name}: removed\n`);
        return 0;
      default:
        throw new InvalidArgumentError(`unknown triggers command ${JSON.stringify(sub)} (list, add, show, pause, resume, remove)`);
    }
  } finally {
    close();
  }
}

/** N/DURATION, e.g. 3/1h. */
function perHost(raw: unknown): { max: number; windowMs: number } | undefined {
  if (raw === undefined) return undefined;
  const m = /^(\d{1,4})\/(.+)$/.exec(String(raw));
  if (!m || Number(m[1]) < 1) throw new InvalidArgumentError(`--max-per-host is N/DURATION with N at least 1, e.g. 3/1h; not ${JSON.stringify(raw)}`);
  return { max: Number(m[1]), windowMs: parseDuration(m[2]!, "--max-per-host") };
}

async function add(triggerName: string, v: Record<string, unknown>, rest: string[], io: Io): Promise<number> {
  if (typeof v.on !== "string") throw new InvalidArgumentError("say which events fire it: --on 'kind=service.failed and unit=nginx.service'");
  if (v.stdin === "-") throw new InvalidArgumentError("--stdin - streams this terminal's input now; a trigger's job takes --stdin FILE");
  if (typeof v.run === "string") {
    if (v.doc !== undefined) throw new InvalidArgumentError("--run DOC and --doc DOC are the same: give one");
    v.doc = v.run;
  }
  const { req, document, given } = buildJobRequest(v, rest, true);
  const cooldown = v.cooldown === undefined ? undefined : parseDuration(String(v.cooldown), "--cooldown");
  const rate = perHost(v.maxPerHost);
  const spec = create(TriggerSpecSchema, {
    name: triggerName,
    on: v.on,
    job: req,
    cooldown: cooldown === undefined ? undefined : durationFromMs(cooldown),
    maxPerHost: rate?.max ?? 0,
    rateWindow: rate ? durationFromMs(rate.windowMs) : undefined,
  });
  if (document) {
    const { client, close } = operatorClient(v);
    try {
      await refuseRepeated(client, document, given, io.signal);
    } finally {
      close();
    }
  }
  const { client, close } = triggerClient(v);
  try {
    const { trigger } = await client.createTrigger({ trigger: spec }, { signal: io.signal });
    const j = triggerJson(trigger!);
    io.out(v.json ? JSON.stringify(j) + "\n" : `${j.name}: on ${j.on}\n`);
    return 0;
  } finally {
    close();
  }
}

const at = (t: { seconds: bigint; nanos: number } | undefined) => (t ? new Date(timestampMs(t as never)).toISOString() : undefined);

function triggerJson(t: Trigger) {
  const spec = t.spec!;
  const job = spec.job;
  return {
    name: spec.name,
    on: printable(spec.on),
    targeted: job ? job.hostIds.length > 0 || job.allHosts || job.target !== undefined : undefined,
    cooldownSeconds: Number(spec.cooldown?.seconds ?? 0n),
    maxPerHost: spec.maxPerHost,
    rateWindowSeconds: Number(spec.rateWindow?.seconds ?? 0n),
    paused: t.paused,
    createdBy: t.createdBy,
    createdAt: at(t.createdAt),
    fired: Number(t.fired),
    suppressed: Number(t.suppressed),
    what: printable(t.what),
    recent: t.recent.map((f) => ({ at: at(f.at), hostId: f.hostId, eventId: f.eventId, jobId: f.jobId, note: printable(f.note) })),
  };
}

const eventOptions: Record<string, OptionSpec> = {
  target: { type: "string", short: "t", doc: "only events of hosts matching a query", value: "QUERY" },
  kind: { type: "string", doc: "only events of this kind", value: "KIND" },
  limit: { type: "string", short: "n", doc: "at most this many (default 50, at most 10000)", value: "N" },
  ...connectionOptions,
  json: { type: "boolean", doc: "JSON output" },
  help: { type: "boolean", short: "h", doc: "show this help" },
};

/** `rexmesh events`: recent events, newest first, with what each trigger did with them. */
export async function eventsCommand(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, eventOptions);
  const v = p.values;
  if (v.help) {
    io.out(
      "Events hosts' watchers reported (docs/triggers.md), newest first, with what each trigger did.\n\n" +
        helpText("rexmesh events [-t QUERY] [--kind KIND] [-n N] [--json]", eventOptions, ["rexmesh events", "rexmesh events --kind service.failed -t 'role=web' -n 20"]),
    );
    return 0;
  }
  if (p.positionals.length > 0 || p.rest.length > 0) throw new InvalidArgumentError("rexmesh events takes options only (-t QUERY, --kind KIND, -n N)");
  const limit = v.limit === undefined ? 50 : Number(v.limit);
  if (!Number.isInteger(limit) || limit < 1 || limit > 10_000) throw new InvalidArgumentError(`--limit must be from 1 to 10000, not ${JSON.stringify(v.limit)}`);
  const { client, close } = triggerClient(v);
  const events: StoredEvent[] = [];
  try {
    let token = "";
    do {
      const page = await client.listEvents({ target: (v.target as string | undefined) ?? "", kind: (v.kind as string | undefined) ?? "", pageSize: Math.min(1000, limit - events.length), pageToken: token }, { signal: io.signal });
      events.push(...page.events);
      token = page.nextPageToken;
    } while (token && events.length < limit);
  } finally {
    close();
  }
  const rows = events.map(eventJson);
  if (v.json) io.out(JSON.stringify(rows, null, 2) + "\n");
  else if (rows.length === 0) io.out("no events\n");
  else {
    io.out(
      table([
        ["TIME", "HOST", "KIND", "DETAILS", "ID", "OUTCOME"],
        ...rows.map((e) => [
          e.time ?? "",
          e.hostId,
          e.kind,
          Object.entries(e.details)
            .map(([k, val]) => `${k}=${val}`)
            .join(" "),
          e.id,
          !e.evaluated ? "pending" : e.outcomes.map((o) => `${o.trigger}: ${o.jobId || o.note}`).join("; ") || "-",
        ]),
      ]),
    );
  }
  return 0;
}

function eventJson(s: StoredEvent) {
  const e = s.event!;
  const details: Record<string, string> = {};
  for (const [k, val] of Object.entries(e.details)) details[printable(k)] = printable(val);
  return {
    id: e.id,
    hostId: e.hostId,
    kind: e.kind,
    details,
    watcher: e.watcher,
    time: at(e.time),
    receivedAt: at(s.receivedAt),
    evaluated: s.evaluated,
    outcomes: s.outcomes.map((o) => ({ trigger: o.trigger, jobId: o.jobId, note: printable(o.note) })),
  };
}
