/**
 * Structured JSON logs, one object per line on stderr, so that operators can
 * filter them with jq and ship them unchanged. Fields given to `child` are
 * repeated on every line (role, host, task ...).
 */
export type Level = "debug" | "info" | "warn" | "error";

const LEVELS: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export interface Logger {
  debug(msg: string, fields?: Record<string, unknown>): void;
  info(msg: string, fields?: Record<string, unknown>): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
  error(msg: string, fields?: Record<string, unknown>): void;
  child(fields: Record<string, unknown>): Logger;
}

export interface LoggerOptions {
  level?: Level;
  write?: (line: string) => void;
  now?: () => number;
}

function errorFields(value: unknown): unknown {
  if (value instanceof Error) {
    const out: Record<string, unknown> = { name: value.name, message: value.message };
    if (value.cause !== undefined) out.cause = errorFields(value.cause);
    // A bug, not a refusal: where it happened is what the reader needs.
    if (value instanceof TypeError || value instanceof RangeError || value instanceof ReferenceError) out.stack = value.stack?.split("\n").slice(1, 6).map((l) => l.trim());
    return out;
  }
  return value;
}

export function createLogger(opts: LoggerOptions = {}, base: Record<string, unknown> = {}): Logger {
  const min = LEVELS[opts.level ?? "info"];
  const write = opts.write ?? ((line: string) => process.stderr.write(line));
  const now = opts.now ?? Date.now;
  const log = (level: Level, msg: string, fields?: Record<string, unknown>) => {
    if (LEVELS[level] < min) return;
    const entry: Record<string, unknown> = { time: new Date(now()).toISOString(), level, msg, ...base };
    if (fields) for (const [k, v] of Object.entries(fields)) entry[k] = errorFields(v);
    write(JSON.stringify(entry) + "\n");
  };
  return {
    debug: (m, f) => log("debug", m, f),
    info: (m, f) => log("info", m, f),
    warn: (m, f) => log("warn", m, f),
    error: (m, f) => log("error", m, f),
    child: (fields) => createLogger(opts, { ...base, ...fields }),
  };
}

/** A logger that drops everything, for tests that do not look at logs. */
export const silentLogger: Logger = createLogger({ level: "error", write: () => {} });

export function parseLevel(value: string | undefined): Level {
  if (value === undefined || value === "") return "info";
  if (value in LEVELS) return value as Level;
  throw new Error(`log level ${JSON.stringify(value)} is not one of ${Object.keys(LEVELS).join(", ")}`);
}
