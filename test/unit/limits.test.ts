import { readFileSync } from "node:fs";
import { create } from "@bufbuild/protobuf";
import type { Database } from "lmdb";
import { describe, expect, it } from "vitest";
import { ResourceExhaustedError } from "../../common/errors.js";
import { clampFacts, ConcurrencyLimit, LIMITS, printable, truncate, TRUNCATED } from "../../common/limits.js";
import { Inventory } from "../../controller/inventory.js";
import type { HostRecord } from "../../controller/model.js";
import { checkEnv, checkSubmitLimits } from "../../controller/request-limits.js";
import { collectFacts } from "../../daemon/facts.js";
import { detectTools } from "../../daemon/tools.js";
import { SubmitJobRequestSchema } from "../../gen/rexmesh/v1/controller_pb.js";
import { HostFactsSchema } from "../../gen/rexmesh/v1/host_pb.js";

describe("the limits module", () => {
  it("documents every limit in docs/security.md, section Input limits", () => {
    const doc = readFileSync(new URL("../../docs/security.md", import.meta.url), "utf8");
    const section = doc.slice(doc.indexOf("## Input limits"));
    expect(section.length).toBeGreaterThan(100);
    for (const key of Object.keys(LIMITS)) expect(section, key).toContain(`\`${key}\``);
  });

  it("truncates with a visible marker, never beyond the limit", () => {
    expect(truncate("short", 10)).toBe("short");
    const cut = truncate("x".repeat(100), 20);
    expect(cut).toHaveLength(20);
    expect(cut.endsWith(TRUNCATED)).toBe(true);
  });

  it("cuts facts field by field, list by list, and all together (issue 12: 8.5 MB of facts)", () => {
    const huge = create(HostFactsSchema, {
      os: "linux",
      hostname: "h".repeat(4 << 20),
      kernel: "k".repeat(4 << 20),
      addresses: Array.from({ length: 10_000 }, (_, i) => `fe80::${i.toString(16)}:${"a".repeat(200)}`),
      tools: ["exec", "shell"],
    });
    const { facts, truncated } = clampFacts(huge);
    expect(truncated).toBe(true);
    expect(facts.os).toBe("linux");
    expect(facts.hostname.length).toBe(LIMITS.factChars);
    expect(facts.hostname.endsWith(TRUNCATED)).toBe(true);
    expect(facts.addresses.length).toBeLessThanOrEqual(LIMITS.factListItems);
    const total = [facts.os, facts.osFamily, facts.arch, facts.kernel, facts.hostname, facts.daemonVersion, ...facts.addresses, ...facts.tools].join("").length;
    expect(total).toBeLessThanOrEqual(LIMITS.factsTotalChars);
    const small = create(HostFactsSchema, { os: "linux", tools: ["exec"] });
    expect(clampFacts(small)).toEqual({ facts: small, truncated: false });
    // The daemon never sends more than the controller keeps.
    expect(clampFacts(collectFacts(detectTools().names)).truncated).toBe(false);
  });

  it("keeps facts cut in the inventory, also those stored before the limits existed", () => {
    const big = create(HostFactsSchema, { hostname: "h".repeat(1 << 20) });
    const inventory = new Inventory();
    const rec = inventory.connected({ id: "h1", tenant: "t", facts: big }, "r", "p", 0);
    expect(rec.facts!.hostname.length).toBe(LIMITS.factChars);
    expect(inventory.seen({ id: "h2", tenant: "t", facts: big }, "r", "p", 0).facts!.hostname.length).toBe(LIMITS.factChars);
    const stored: HostRecord = { id: "old", tenant: "t", region: "r", proxy: "p", connected: true, since: 0, labels: {}, facts: big };
    const db = { getRange: () => [{ key: "old", value: stored }] } as unknown as Database<HostRecord, string>;
    expect(new Inventory(db).get("old")!.facts!.hostname.length).toBe(LIMITS.factChars);
  });

  it("refuses a host id beyond its limit before looking it up, without echoing it", async () => {
    const err = await new Inventory().setLabels("t", "x".repeat(10 << 20), { set: {}, remove: [] }).catch((e: Error) => e);
    expect((err as Error).message).toMatch(/host id is longer than 128/);
    expect((err as Error).message.length).toBeLessThan(200);
  });

  it("counts what one key holds, refuses beyond, and frees on release (once)", () => {
    const limit = new ConcurrencyLimit(2, "watches");
    const a = limit.acquire("op");
    const b = limit.acquire("op");
    expect(() => limit.acquire("op")).toThrow(ResourceExhaustedError);
    expect(limit.acquire("other")).toBeTypeOf("function");
    a();
    a();
    expect(limit.count("op")).toBe(1);
    limit.acquire("op");
    expect(() => limit.acquire("op")).toThrow(/at most 2/);
    b();
  });

  it("checks a submit's env, stdin and ids at the boundary", () => {
    expect(() => checkEnv({ A: "x" })).not.toThrow();
    expect(() => checkEnv(Object.fromEntries(Array.from({ length: 129 }, (_, i) => [`V${i}`, ""])))).toThrow(/env: at most 128/);
    expect(() => checkEnv({ ["N".repeat(129)]: "" })).toThrow(/name is longer than 128/);
    expect(() => checkSubmitLimits(create(SubmitJobRequestSchema, { stdin: new Uint8Array(LIMITS.stdinBytes + 1) }))).toThrow(/stdin/);
    expect(() => checkSubmitLimits(create(SubmitJobRequestSchema, { parameters: { p: "x".repeat(LIMITS.paramGivenBytes + 1) } }))).toThrow(/parameter p/);
    expect(() => checkSubmitLimits(create(SubmitJobRequestSchema, { hostIds: ["h1"], target: "x".repeat(LIMITS.queryChars + 1) }))).toThrow(/target/);
  });
});

describe("text a peer says, printed on a terminal", () => {
  it("has its control characters made harmless: no escape sequence reaches the operator's screen", () => {
    expect(printable("cut (\x1b]0;pwned\x07\x1b[2J)\r\nnext")).toBe("cut (\ufffd]0;pwned\ufffd\ufffd[2J)\ufffd\ufffdnext");
    expect(printable("proxy px1 — 30 s")).toBe("proxy px1 — 30 s");
    expect(printable("\u009b31m")).toBe("\ufffd31m");
  });
});
