import { timestampMs } from "@bufbuild/protobuf/wkt";
import { setTimeout as delay } from "node:timers/promises";
import { formatDuration } from "../common/duration.js";
import { InvalidArgumentError } from "../common/errors.js";
import { RecordingState, type SessionInfo } from "../gen/rexmesh/v1/controller_pb.js";
import { SessionChannel } from "../gen/rexmesh/v1/session_pb.js";
import { helpText, parse, type OptionSpec } from "./args.js";
import { connectionOptions, operatorClient } from "./client.js";
import type { Io } from "./operator.js";
import { table } from "./table.js";

const options: Record<string, OptionSpec> = {
  limit: { type: "string", doc: "at most this many of the newest sessions (default 100, at most 1000)", value: "N" },
  speed: { type: "string", doc: "play: this many times the original speed (0: no waiting at all; default 1)", value: "X" },
  input: { type: "boolean", doc: "play: show what was typed or sent too, on stderr (a password typed is in it)" },
  json: { type: "boolean", doc: "one JSON object per line: per session, or per recorded piece (base64) with play" },
  ...connectionOptions,
  help: { type: "boolean", short: "h", doc: "show this help" },
};

const USAGE = "rexmesh sessions [--limit N] [--json]\n       rexmesh sessions play ID [--speed X] [--input] [--json]\n       rexmesh sessions join ID";

export function sessionJson(s: SessionInfo) {
  return {
    id: s.sessionId,
    operator: s.operator,
    host: s.hostId,
    proxy: s.proxy,
    kind: s.kind,
    what: s.what,
    startedAt: s.startedAt ? new Date(timestampMs(s.startedAt)).toISOString() : undefined,
    endedAt: s.endedAt ? new Date(timestampMs(s.endedAt)).toISOString() : undefined,
    bytesToHost: Number(s.bytesToHost),
    bytesFromHost: Number(s.bytesFromHost),
    outcome: s.outcome,
    recording: (RecordingState[s.recording] ?? "UNSPECIFIED").toLowerCase(),
  };
}

/** `rexmesh sessions`: who opened which session where, how it ended; `play ID` replays one with its timing. */
export async function sessionsCommand(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, options);
  const v = p.values;
  if (v.help) {
    io.out(
      `Sessions (rexmesh shell, run --stdin -) and port forwards of your tenant, newest first, and their\nrecordings, kept by the controller (docs/sessions.md, "Recording"). Needs the 'audit' action.\n\n` +
        helpText(USAGE, options, ["rexmesh sessions", "rexmesh sessions play s01abc --speed 4", "rexmesh sessions play s01abc --speed 0 > what-they-saw.txt", "rexmesh sessions join s01abc"]),
    );
    return 0;
  }
  const [sub, id, ...extra] = p.positionals;
  const { client, close } = operatorClient(v);
  try {
    if (sub === undefined) {
      const limit = typeof v.limit === "string" ? Number(v.limit) : 0;
      if (!Number.isInteger(limit) || limit < 0) throw new InvalidArgumentError(`--limit must be a whole number, not ${JSON.stringify(v.limit)}`);
      const { sessions } = await client.listSessions({ limit }, { signal: io.signal });
      const rows = sessions.map(sessionJson);
      if (v.json) {
        for (const r of rows) io.out(JSON.stringify(r) + "\n");
        return 0;
      }
      const header = ["SESSION", "OPERATOR", "HOST", "STARTED", "LASTED", "IN", "OUT", "RECORDING", "WHAT", "OUTCOME"];
      const lines = rows.map((r, i) => {
        const s = sessions[i]!;
        const lasted = s.startedAt && s.endedAt ? formatDuration(timestampMs(s.endedAt) - timestampMs(s.startedAt)) : "running";
        return [r.id, r.operator, r.host, r.startedAt?.slice(0, 19).replace("T", " ") ?? "", lasted, String(r.bytesToHost), String(r.bytesFromHost), r.recording, r.what, r.outcome || "-"];
      });
      io.out(table([header, ...lines]));
      return 0;
    }
    if (sub === "join" && id && extra.length === 0) {
      // Read-only: the session's output as it comes, until it ends. Nothing typed here reaches it.
      for await (const r of client.joinSession({ sessionId: id }, { signal: io.signal })) {
        if (r.session) io.err(`rexmesh: watching session ${id} of ${r.session.operator} on ${r.session.hostId} (${r.session.what}), read-only; Ctrl-C stops watching\n`);
        for (const e of r.events) await write(e.channel === SessionChannel.STDERR ? process.stderr : process.stdout, e.data);
        if (r.ended) io.err(`\r\nrexmesh: session ${id} ended: ${r.ended}\n`);
      }
      return 0;
    }
    if (sub !== "play" || !id || extra.length > 0) throw new InvalidArgumentError(`unknown use: ${USAGE}`);
    const speed = typeof v.speed === "string" ? Number(v.speed) : 1;
    if (!Number.isFinite(speed) || speed < 0) throw new InvalidArgumentError(`--speed must be 0 or more, not ${JSON.stringify(v.speed)}`);
    const started = Date.now();
    for await (const r of client.getSessionRecording({ sessionId: id }, { signal: io.signal })) {
      if (r.session && v.json) io.out(JSON.stringify({ type: "session", session: sessionJson(r.session) }) + "\n");
      for (const e of r.events) {
        const at = Number(e.atMs);
        if (speed > 0) {
          const wait = started + at / speed - Date.now();
          if (wait > 0) await delay(wait, undefined, { signal: io.signal });
        }
        if (v.json) {
          io.out(JSON.stringify({ type: "data", atMs: at, toHost: e.toHost, channel: (SessionChannel[e.channel] ?? "").toLowerCase(), conn: e.conn, data: Buffer.from(e.data).toString("base64") }) + "\n");
        } else if (!e.toHost) {
          await write(e.channel === SessionChannel.STDERR ? process.stderr : process.stdout, e.data);
        } else if (v.input) {
          await write(process.stderr, e.data);
        }
      }
    }
    return 0;
  } finally {
    close();
  }
}

/** Writes bytes as they are (a recording is not text), waiting when the reader is slow. */
function write(stream: NodeJS.WriteStream, data: Uint8Array): Promise<void> {
  return new Promise((resolve) => {
    if (stream.write(data)) resolve();
    else stream.once("drain", resolve);
  });
}
