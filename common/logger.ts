import { pino, type DestinationStream, type Logger as Pino } from "pino";

/**
 * Structured JSON logs through pino, one object per line on stderr, so that
 * operators can filter them with jq and ship them unchanged. Fields given to
 * `child` are repeated on every line (role, host, task ...). Fields that may
 * hold secrets are replaced by "[redacted]" (SECRET_FIELDS), and so is any
 * string holding a PEM private key. The format is in docs/observability.md.
 */
export type Level = "debug" | "info" | "warn" | "error";

const LEVEL_NAMES: readonly Level[] = ["debug", "info", "warn", "error"];

export interface Logger {
  debug(msg: string, fields?: Record<string, unknown>): void;
  info(msg: string, fields?: Record<string, unknown>): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
  error(msg: string, fields?: Record<string, unknown>): void;
  child(fields: Record<string, unknown>): Logger;
}

export interface LoggerOptions {
  /** Least level written. Default info. */
  level?: Level;
  /** Where each line goes (with its newline). Default: stderr, written synchronously so that nothing is lost at exit. */
  write?: (line: string) => void;
  /** The clock of the `time` field. Default Date.now. */
  now?: () => number;
}

/**
 * Field names whose values are never written, at the top of a record or one
 * level down (`headers.authorization`, `spec.env`): credentials (join
 * tokens, secrets, passwords, private keys), HTTP credentials, and a job's
 * environment and stdin, which carry whatever the operator handed the job.
 * A join token's public id is logged as `tokenId`.
 */
const SECRET_FIELDS = ["token", "joinToken", "secret", "password", "passphrase", "privateKey", "keyPem", "caKey", "authorization", "cookie", "set-cookie", "env", "stdin"];

const REDACTED = "[redacted]";

/** fast-redact paths for SECRET_FIELDS, quoted where a name is not an identifier. */
const REDACT_PATHS = SECRET_FIELDS.flatMap((k) => {
  const key = /^[A-Za-z_$][\w$]*$/.test(k) ? k : `["${k}"]`;
  return [key, key.startsWith("[") ? `*${key}` : `*.${key}`];
});

function scrubbed(value: unknown): unknown {
  if (value instanceof Error) {
    const out: Record<string, unknown> = { name: value.name, message: scrubbed(value.message) };
    if (value.cause !== undefined) out.cause = scrubbed(value.cause);
    // A bug, not a refusal: where it happened is what the reader needs.
    if (value instanceof TypeError || value instanceof RangeError || value instanceof ReferenceError) out.stack = value.stack?.split("\n").slice(1, 6).map((l) => l.trim());
    return out;
  }
  if (typeof value === "string" && value.includes("PRIVATE KEY-----")) return REDACTED;
  return value;
}

function adapt(p: Pino): Logger {
  // The message goes in first among the call's fields (pino would write it last), so a line reads
  // level, time, the child's fields, msg, then the call's fields, as before pino.
  const log = (level: Level) => (msg: string, fields?: Record<string, unknown>) => p[level](fields ? { msg, ...fields } : { msg });
  return { debug: log("debug"), info: log("info"), warn: log("warn"), error: log("error"), child: (fields) => adapt(p.child(fields)) };
}

export function createLogger(opts: LoggerOptions = {}, base: Record<string, unknown> = {}): Logger {
  const now = opts.now ?? Date.now;
  const write = opts.write;
  const destination: DestinationStream = write ? { write: (line: string) => write(line) } : pino.destination({ dest: 2, sync: true });
  const p = pino(
    {
      level: opts.level ?? "info",
      base: undefined,
      timestamp: () => `,"time":"${new Date(now()).toISOString()}"`,
      formatters: {
        level: (label) => ({ level: label }),
        bindings: (bindings) => Object.fromEntries(Object.entries(bindings ?? {}).map(([k, v]) => [k, scrubbed(v)])),
        log: (fields) => Object.fromEntries(Object.entries(fields).map(([k, v]) => [k, scrubbed(v)])),
      },
      redact: { paths: REDACT_PATHS, censor: REDACTED },
      // Errors are shaped by scrubbed() under any field name; pino's own `err` serializer would reshape them again.
      serializers: { err: (v: unknown) => v },
    },
    destination,
  );
  return adapt(Object.keys(base).length > 0 ? p.child(base) : p);
}

/** A logger that drops everything, for tests that do not look at logs. */
export const silentLogger: Logger = adapt(pino({ level: "silent" }));

export function parseLevel(value: string | undefined): Level {
  if (value === undefined || value === "") return "info";
  if ((LEVEL_NAMES as readonly string[]).includes(value)) return value as Level;
  throw new Error(`log level ${JSON.stringify(value)} is not one of ${LEVEL_NAMES.join(", ")}`);
}
