import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { describeConfig, flagName, readConfigFile, resolveConfig, type Schema } from "../../common/config.js";
import { formatDuration, parseDuration } from "../../common/duration.js";
import { ConfigError, InvalidArgumentError } from "../../common/errors.js";

const schema = {
  listen: { type: "string", default: "127.0.0.1:7443", doc: "address" },
  capacity: { type: "int", default: 4, min: 1, doc: "tasks at once" },
  verbose: { type: "bool", default: false, doc: "chatty" },
  heartbeatInterval: { type: "duration", default: "10s", doc: "heartbeat" },
  proxies: { type: "list", default: ["a:1"], doc: "proxies" },
  dataDir: { type: "string", doc: "no default" },
} satisfies Schema;

function configError(fn: () => unknown): ConfigError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(ConfigError);
    return e as ConfigError;
  }
  throw new Error("expected a ConfigError");
}

describe("resolveConfig", () => {
  it("applies defaults, durations in ms; a field without default stays undefined", () => {
    const c = resolveConfig(schema, {});
    expect(c).toEqual({ listen: "127.0.0.1:7443", capacity: 4, verbose: false, heartbeatInterval: 10_000, proxies: ["a:1"] });
    expect(c.dataDir).toBeUndefined();
  });

  it("precedence: defaults < file < environment < flags", () => {
    const file = { listen: "file:1", capacity: 5, verbose: true, heartbeatInterval: "20s", dataDir: "/file" };
    const env = { REXMESH_LISTEN: "env:2", REXMESH_CAPACITY: "6", REXMESH_HEARTBEAT_INTERVAL: "30s" };
    const flags = { listen: "flag:3" };
    const c = resolveConfig(schema, { file, env, flags });
    expect(c.listen).toBe("flag:3");
    expect(c.capacity).toBe(6);
    expect(c.heartbeatInterval).toBe(30_000);
    expect(c.verbose).toBe(true);
    expect(c.dataDir).toBe("/file");
    expect(c.proxies).toEqual(["a:1"]);
  });

  it("ignores empty environment variables", () => {
    const c = resolveConfig(schema, { file: { listen: "file:1" }, env: { REXMESH_LISTEN: "" } });
    expect(c.listen).toBe("file:1");
  });

  it("converts environment strings by type: int, bool, duration, comma list", () => {
    const c = resolveConfig(schema, {
      env: { REXMESH_CAPACITY: " 8 ", REXMESH_VERBOSE: "yes", REXMESH_HEARTBEAT_INTERVAL: "1m30s", REXMESH_PROXIES: "p1:7444, p2:7444,," },
    });
    expect(c.capacity).toBe(8);
    expect(c.verbose).toBe(true);
    expect(c.heartbeatInterval).toBe(90_000);
    expect(c.proxies).toEqual(["p1:7444", "p2:7444"]);
  });

  it("reads a bare number for a duration in a file as seconds", () => {
    expect(resolveConfig(schema, { file: { heartbeatInterval: 2 } }).heartbeatInterval).toBe(2000);
  });

  it("an unknown key in the file fails and the message names the key and the file", () => {
    const e = configError(() => resolveConfig(schema, { file: { listne: "x" }, filePath: "/etc/rexmesh/proxy.yaml" }));
    expect(e.message).toContain('"listne"');
    expect(e.message).toContain("/etc/rexmesh/proxy.yaml");
    expect(e.message).toContain("listen");
  });

  // Regression guard (was a bug at common/config.ts:108 and :121, now fixed): `schema[key]` is a plain object lookup, so keys that
  // exist on Object.prototype ("constructor", "toString", "hasOwnProperty", ...) are found as
  // "fields"; convert() then falls through its switch and returns undefined. The unknown key is
  // silently accepted instead of failing with a message that names it.
  it("an unknown key that happens to be an Object.prototype name is refused too", () => {
    for (const key of ["constructor", "toString", "hasOwnProperty"]) {
      const e = configError(() => resolveConfig(schema, { file: { [key]: "x" } }));
      expect(e.message).toContain(JSON.stringify(key));
    }
  });

  it("an unknown flag fails naming the option", () => {
    const e = configError(() => resolveConfig(schema, { flags: { bogusOption: 1 } }));
    expect(e.message).toContain("--bogus-option");
  });

  it("a value of the wrong type fails naming the key and where it came from", () => {
    let e = configError(() => resolveConfig(schema, { file: { capacity: "lots" }, filePath: "cfg.yaml" }));
    expect(e.message).toContain("capacity");
    expect(e.message).toContain("cfg.yaml");
    e = configError(() => resolveConfig(schema, { env: { REXMESH_VERBOSE: "maybe" } }));
    expect(e.message).toContain("REXMESH_VERBOSE");
    expect(e.message).toContain("verbose");
    e = configError(() => resolveConfig(schema, { flags: { heartbeatInterval: "soon" } }));
    expect(e.message).toContain("--heartbeat-interval");
    e = configError(() => resolveConfig(schema, { file: { listen: 42 } }));
    expect(e.message).toContain("listen");
    e = configError(() => resolveConfig(schema, { file: { proxies: [1, 2] } }));
    expect(e.message).toContain("proxies");
    e = configError(() => resolveConfig(schema, { file: { capacity: 1.5 } }));
    expect(e.message).toContain("capacity");
  });

  it("enforces an int field's minimum, naming the key", () => {
    const e = configError(() => resolveConfig(schema, { flags: { capacity: 0 } }));
    expect(e.message).toContain("capacity");
    expect(e.message).toContain("at least 1");
  });

  it("describeConfig lists only keys that are set", () => {
    const c = resolveConfig(schema, {});
    expect(describeConfig(schema, c)).not.toHaveProperty("dataDir");
    expect(describeConfig(schema, c)).toHaveProperty("listen", "127.0.0.1:7443");
  });

  it("flag names are kebab-case", () => {
    expect(flagName("heartbeatInterval")).toBe("heartbeat-interval");
    expect(flagName("listen")).toBe("listen");
  });
});

describe("readConfigFile", () => {
  const dir = mkdtempSync(join(tmpdir(), "rexmesh-config-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it("reads YAML and JSON mappings; an empty file is an empty mapping", () => {
    const y = join(dir, "a.yaml");
    writeFileSync(y, "listen: 0.0.0.0:1\ncapacity: 3\n");
    expect(readConfigFile(y)).toEqual({ listen: "0.0.0.0:1", capacity: 3 });
    const j = join(dir, "a.json");
    writeFileSync(j, '{"verbose": true}');
    expect(readConfigFile(j)).toEqual({ verbose: true });
    const e = join(dir, "empty.yaml");
    writeFileSync(e, "");
    expect(readConfigFile(e)).toEqual({});
  });

  it("fails with a ConfigError naming the path for a missing file, bad YAML or a non-mapping", () => {
    const missing = join(dir, "missing.yaml");
    expect(() => readConfigFile(missing)).toThrow(ConfigError);
    expect(() => readConfigFile(missing)).toThrow(missing);
    const bad = join(dir, "bad.yaml");
    writeFileSync(bad, "a: [1, 2\n");
    expect(() => readConfigFile(bad)).toThrow(/bad\.yaml.*not valid/);
    const list = join(dir, "list.yaml");
    writeFileSync(list, "- a\n- b\n");
    expect(() => readConfigFile(list)).toThrow(/must hold a mapping/);
  });
});

describe("parseDuration", () => {
  it("parses units and combinations", () => {
    expect(parseDuration("500ms")).toBe(500);
    expect(parseDuration("30s")).toBe(30_000);
    expect(parseDuration("5m")).toBe(300_000);
    expect(parseDuration("1h30m")).toBe(5_400_000);
    expect(parseDuration("2d")).toBe(172_800_000);
    expect(parseDuration("1.5s")).toBe(1500);
    expect(parseDuration("1m500ms")).toBe(60_500);
    expect(parseDuration(" 10s ")).toBe(10_000);
  });

  it("reads a bare number as seconds", () => {
    expect(parseDuration("30")).toBe(30_000);
    expect(parseDuration("0.25")).toBe(250);
    expect(parseDuration("0")).toBe(0);
  });

  it("refuses what is not a duration, naming the field", () => {
    for (const bad of ["", "  ", "-5s", "5x", "s", "5 s", "1h 30m", "abc", "5s!"]) {
      expect(() => parseDuration(bad, "timeout")).toThrow(InvalidArgumentError);
    }
    expect(() => parseDuration("soon", "timeout")).toThrow(/timeout "soon"/);
  });
});

describe("formatDuration", () => {
  it("formats milliseconds, seconds and minutes", () => {
    expect(formatDuration(250)).toBe("250ms");
    expect(formatDuration(1500)).toBe("1.5s");
    expect(formatDuration(60_000)).toBe("1m");
    expect(formatDuration(90_000)).toBe("1m30s");
  });

  // Regression guard (was a bug at common/duration.ts:27, now fixed): the seconds are rounded after the minutes were floored, so
  // 119.5 s prints as "1m60s" (should be "2m"); the CLI prints this in its run summary.
  it("never shows 60 seconds in a minute", () => {
    expect(formatDuration(119_500)).toBe("2m");
    expect(formatDuration(179_999)).toBe("3m");
  });
});
