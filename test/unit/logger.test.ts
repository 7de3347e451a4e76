import { describe, expect, it } from "vitest";
import { createLogger, parseLevel, type Level } from "../../common/logger.js";

function capture(level: Level = "debug", base: Record<string, unknown> = {}) {
  const lines: string[] = [];
  const log = createLogger({ level, write: (l) => lines.push(l), now: () => Date.UTC(2026, 0, 2, 3, 4, 5) }, base);
  return { log, lines, records: () => lines.map((l) => JSON.parse(l) as Record<string, unknown>) };
}

describe("the logger", () => {
  it("writes one JSON object per line: level name, ISO time, message, the child's fields and the call's", () => {
    const { log, lines, records } = capture("debug", { role: "proxy" });
    log.child({ host: "h1" }).info("host connected", { via: "127.0.0.1:1" });
    expect(lines).toHaveLength(1);
    expect(lines[0]!.endsWith("}\n")).toBe(true);
    expect(records()[0]).toEqual({ level: "info", time: "2026-01-02T03:04:05.000Z", role: "proxy", host: "h1", via: "127.0.0.1:1", msg: "host connected" });
  });

  it("drops what is below its level, and knows only debug, info, warn and error", () => {
    const { log, records } = capture("warn");
    log.debug("d");
    log.info("i");
    log.warn("w");
    log.error("e");
    expect(records().map((r) => `${r.level as string} ${r.msg as string}`)).toEqual(["warn w", "error e"]);
    expect(parseLevel(undefined)).toBe("info");
    expect(parseLevel("debug")).toBe("debug");
    expect(() => parseLevel("trace")).toThrow(/not one of debug, info, warn, error/);
  });

  it("writes errors as name, message and cause, with a short stack only for bugs", () => {
    const { log, records } = capture();
    log.error("stop failed", { err: new Error("disk gone", { cause: new TypeError("x is undefined") }) });
    const err = records()[0]!.err as { name: string; message: string; stack?: unknown; cause: { name: string; stack: string[] } };
    expect(err).toMatchObject({ name: "Error", message: "disk gone", cause: { name: "TypeError", message: "x is undefined" } });
    expect(err.stack).toBeUndefined();
    expect(err.cause.stack.length).toBeGreaterThan(0);
  });

  it("redacts secrets in fields, nested headers and a job's environment, in the child's fields too, and any PEM private key", () => {
    const { log, lines, records } = capture("debug", { token: "base-Secret-1" });
    log.child({ secret: "child-Secret-2" }).warn("request refused", {
      tokenId: "tk-public",
      joinToken: "Secret-3",
      headers: { authorization: "Bearer Secret-4", cookie: "sid=Secret-5", "set-cookie": "sid=Secret-6", host: "ctl" },
      spec: { env: { API_KEY: "Secret-7" }, stdin: "Secret-8", workingDir: "/srv" },
      key: "-----BEGIN PRIVATE KEY-----\nSecret-9\n-----END PRIVATE KEY-----\n",
      password: "Secret-10",
    });
    const out = lines.join("");
    expect(out).not.toMatch(/Secret/);
    const r = records()[0]!;
    expect(r).toMatchObject({
      token: "[redacted]",
      secret: "[redacted]",
      tokenId: "tk-public",
      joinToken: "[redacted]",
      headers: { authorization: "[redacted]", cookie: "[redacted]", "set-cookie": "[redacted]", host: "ctl" },
      spec: { env: "[redacted]", stdin: "[redacted]", workingDir: "/srv" },
      key: "[redacted]",
      password: "[redacted]",
      msg: "request refused",
    });
    // The caller's objects are left as they were.
    const headers = { authorization: "Bearer z" };
    log.info("x", { headers });
    expect(headers.authorization).toBe("Bearer z");
  });
});
