import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { InvalidArgumentError } from "../../common/errors.js";
import { LIMITS } from "../../common/limits.js";
import {
  MAX_QUERY_DEPTH,
  MAX_QUERY_LENGTH,
  QuerySyntaxError,
  formatQuery,
  globMatch,
  hostView,
  matchHost,
  parseQuery,
  selectHosts,
} from "../../controller/query.js";
import type { HostRecord } from "../../controller/model.js";
import { HostFactsSchema } from "../../gen/rexmesh/v1/host_pb.js";

/**
 * A deterministic inventory of 60 hosts. Every property is a simple function
 * of the host number so that the expectations below can be written as plain
 * filters over the same records, independently of the query engine.
 */
function inventory(): HostRecord[] {
  const hosts: HostRecord[] = [];
  for (let i = 0; i < 60; i++) {
    const id = `h${String(i).padStart(2, "0")}`;
    const region = ["eu-1", "eu-2", "us-1"][i % 3]!;
    const labels: Record<string, string> = { env: ["prod", "staging", "dev", "prod"][i % 4]! };
    const role = ["web", "db", "cache", "web", "db", undefined, undefined][i % 7];
    if (role) labels.role = role;
    if (i % 2 === 0) labels.dc = `dc-${(i % 3) + 1}`;
    if (i % 10 === 0) labels.owner = "team blue";
    if (i % 5 === 0) labels["topology.k8s.io/zone"] = `zone-${i % 2}`;
    if (i === 20) labels.os = "custom"; // shadows the os fact for bare names
    if (i === 33) labels.region = "spoofed"; // must not shadow the host's region
    const darwin = i % 6 === 5;
    const facts =
      i % 13 === 12
        ? undefined
        : create(HostFactsSchema, {
            os: darwin ? "darwin" : "linux",
            osFamily: darwin ? "darwin" : i % 3 === 0 ? "rhel" : "debian",
            arch: i % 5 < 2 ? "arm64" : "x64",
            kernel: `6.${i % 4}.0`,
            hostname: `${id}.example`,
            addresses: [`10.${i % 3}.0.${i}`, `fd00::${i}`],
            daemonVersion: i % 11 === 0 ? "0.2.0-rc.1" : "0.1.0",
            tools: ["exec", ...(i % 2 === 1 ? ["shell"] : []), ...(i % 9 === 0 ? ["script"] : [])],
          });
    hosts.push({ id, tenant: "t1", region, proxy: `${region}-p${i % 2}`, connected: i % 8 !== 7, since: 0, facts, labels });
  }
  return hosts;
}

const HOSTS = inventory();
const ids = (hs: HostRecord[]): string[] => hs.map((h) => h.id);
const where = (pred: (h: HostRecord) => boolean): string[] => ids(HOSTS.filter(pred));
const L = (h: HostRecord, k: string): string | undefined => (Object.hasOwn(h.labels, k) ? h.labels[k] : undefined);

const CASES: [string, (h: HostRecord) => boolean][] = [
  ["env=prod and role in (web,db)", (h) => L(h, "env") === "prod" && ["web", "db"].includes(L(h, "role") ?? "")],
  [
    "env=prod and role in (web,db) and os.family=debian",
    (h) => L(h, "env") === "prod" && ["web", "db"].includes(L(h, "role") ?? "") && h.facts?.osFamily === "debian",
  ],
  ["not env=prod", (h) => L(h, "env") !== "prod"],
  ["role not in (web)", (h) => L(h, "role") !== "web"],
  ["role != web", (h) => L(h, "role") !== "web"],
  ["role in (web) or not has role", (h) => L(h, "role") === "web" || L(h, "role") === undefined],
  ['hostname ~ "h1*"', (h) => h.facts?.hostname.startsWith("h1") ?? false],
  ["id ~ h?5", (h) => h.id.length === 3 && h.id.endsWith("5")],
  ["has dc and not has owner", (h) => L(h, "dc") !== undefined && L(h, "owner") === undefined],
  ["env=dev or env=staging and role=web", (h) => L(h, "env") === "dev" || (L(h, "env") === "staging" && L(h, "role") === "web")],
  ["(env=dev or env=staging) and role=web", (h) => (L(h, "env") === "dev" || L(h, "env") === "staging") && L(h, "role") === "web"],
  ["id = h07", (h) => h.id === "h07"],
  ["id in (h01, h02, h59, nothere)", (h) => ["h01", "h02", "h59"].includes(h.id)],
  ["#h03 or #h04", (h) => h.id === "h03" || h.id === "h04"],
  ["tools = shell", (h) => h.facts?.tools.includes("shell") ?? false],
  ["tools != shell", (h) => !(h.facts?.tools.includes("shell") ?? false)],
  ["tools in (script, nope)", (h) => h.facts?.tools.includes("script") ?? false],
  ['owner = "team blue"', (h) => L(h, "owner") === "team blue"],
  ["os = linux", (h) => (L(h, "os") ?? h.facts?.os) === "linux"],
  ["fact.os = linux", (h) => h.facts?.os === "linux"],
  ["label.os = custom", (h) => L(h, "os") === "custom"],
  ["region = eu-1", (h) => h.region === "eu-1"],
  ["region = spoofed", () => false],
  ["label.region = spoofed", (h) => L(h, "region") === "spoofed"],
  ["connected = false and region in (us-1)", (h) => !h.connected && h.region === "us-1"],
  ['addresses ~ "10.1.*"', (h) => h.facts?.addresses.some((a) => a.startsWith("10.1.")) ?? false],
  ["arch = arm64 and not (os = darwin or has dc)", (h) => h.facts?.arch === "arm64" && (L(h, "os") ?? h.facts.os) !== "darwin" && L(h, "dc") === undefined],
  ["topology.k8s.io/zone = zone-0", (h) => L(h, "topology.k8s.io/zone") === "zone-0"],
  ['daemon.version ~ "*-rc*"', (h) => h.facts?.daemonVersion.includes("-rc") ?? false],
  ['kernel !~ "6.0*"', (h) => !(h.facts?.kernel.startsWith("6.0") ?? false)],
  ['proxy ~ "*-p1" and not connected = true', (h) => h.proxy.endsWith("-p1") && !h.connected],
  ['id = "h*"', () => false],
  ["all", () => true],
  ['not not env = "prod"', (h) => L(h, "env") === "prod"],
];

describe("query selection over a 60-host inventory", () => {
  it("has a fixture varied enough for the cases to discriminate", () => {
    expect(HOSTS.length).toBeGreaterThanOrEqual(50);
    expect(HOSTS.filter((h) => h.facts === undefined).length).toBeGreaterThan(2);
    expect(HOSTS.filter((h) => L(h, "role") === undefined).length).toBeGreaterThan(10);
  });

  it.each(CASES)("%s", (text, pred) => {
    const expected = where(pred);
    const got = ids(selectHosts(parseQuery(text), HOSTS));
    expect(got).toEqual(expected);
  });

  it("is not trivially all-or-nothing: most cases select a proper, non-empty subset", () => {
    const proper = CASES.filter(([, pred]) => {
      const n = where(pred).length;
      return n > 0 && n < HOSTS.length;
    });
    expect(proper.length).toBeGreaterThanOrEqual(25);
  });

  it("prints every case back in a form that parses to the same query", () => {
    for (const [text] of CASES) {
      const q = parseQuery(text);
      expect(parseQuery(formatQuery(q)), text).toEqual(q);
    }
    expect(formatQuery(parseQuery('env=dev or (env=staging and not (role=web or #h1)) and owner="team \\"b\\""'))).toBe(
      'env = dev or (env = staging and not (role = web or id = h1)) and owner = "team \\"b\\""',
    );
  });

  it("builds the host view with flattened facts and pseudo-fields", () => {
    const v = hostView(HOSTS[1]!);
    expect(v.facts).toEqual({
      os: "linux",
      "os.family": "debian",
      arch: "arm64",
      kernel: "6.1.0",
      hostname: "h01.example",
      addresses: ["10.1.0.1", "fd00::1"],
      "daemon.version": "0.1.0",
      tools: ["exec", "shell"],
      region: "eu-2",
      proxy: "eu-2-p1",
      connected: "true",
    });
    expect(hostView(HOSTS[12]!).facts).toEqual({ region: "eu-1", proxy: "eu-1-p0", connected: "true" });
  });

  it("does not treat inherited object properties as labels", () => {
    const q = parseQuery("has constructor or label.toString ~ *");
    expect(matchHost(q, hostView(HOSTS[0]!))).toBe(false);
  });

  it("handles long flat chains without recursion and hostile globs in linear-ish time", () => {
    const chain = Array.from({ length: 600 }, (_, i) => `id = x${i}`).join(" or ") + " or id = h05";
    expect(ids(selectHosts(parseQuery(chain), HOSTS))).toEqual(["h05"]);
    expect(globMatch("*a".repeat(40) + "b", "a".repeat(5000))).toBe(false);
    expect(globMatch("*a*?c", "xxabyc")).toBe(true);
    expect(globMatch("a?c", "a😀c")).toBe(true);
  });
});

describe("malformed queries give a positioned error saying what was expected", () => {
  const BAD: [string, number, string][] = [
    ["(env=prod", 9, 'expected ")" to close the "(" at 0 but found end of query'],
    ["env=", 4, 'expected a value after "=" but found end of query'],
    ["role in web", 8, 'expected "(" after "in" but found "web"'],
    ["env=prod role=web", 9, 'expected "and", "or" or end of query but found "role"'],
    ['env="prod', 4, "unterminated string"],
    ["", 0, "expected a condition but found end of query"],
    ["env=prod & role=web", 9, 'unexpected character "&"'],
    ["and env=prod", 0, 'expected a condition but found "and"'],
    ["env=prod and not", 16, 'expected a condition after "not" but found end of query'],
    ["role in ()", 9, 'expected a value in the list but found ")"'],
    // and a few more
    ["role=web and env = and x=1", 19, 'expected a value after "=" but found "and"'],
    ["env=prod)", 8, "closes nothing"],
    ["env prod", 4, 'expected "=", "!=", "~", "!~", "in" or "not in" after "env" but found "prod"'],
    ["role in (web db)", 13, 'expected "," or ")" in the list opened at 8 but found "db"'],
    ['env = "a\\n"', 8, 'invalid escape "\\\\n"'],
    ["# h1", 1, 'expected a host id right after "#"'],
    ["env ! prod", 4, 'expected "!=" or "!~"'],
    ["label. = x", 0, 'expected a label name after "label."'],
    ["env=prod AND role=web", 9, 'but found "AND"'],
    ["env=prod or", 11, 'expected a condition after "or" but found end of query'],
    ["web-* = x", 0, 'expected a condition but found "web-*"'],
    ["has = x", 4, 'expected a key after "has" but found "="'],
    ["role not (web)", 9, 'expected "in" after "role not" but found "("'],
    ["role in (web,)", 13, 'expected a value in the list but found ")"'],
  ];

  it.each(BAD)("%j at %i", (text, position, message) => {
    let err: unknown;
    try {
      parseQuery(text);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(QuerySyntaxError);
    expect(err).toBeInstanceOf(InvalidArgumentError);
    const e = err as QuerySyntaxError;
    expect(e.position).toBe(position);
    expect(e.message.startsWith(`at ${position}: `)).toBe(true);
    expect(e.message).toContain(message);
    expect(e.pointer).toBe(`${text}\n${" ".repeat(position)}^`);
  });

  it("points at the right line and column of a multi-line query, keeping tabs", () => {
    const text = "env=prod and\n\trole in (web,\n\t  db db)";
    try {
      parseQuery(text);
      expect.unreachable();
    } catch (e) {
      const err = e as QuerySyntaxError;
      expect(err.position).toBe(text.lastIndexOf("db"));
      expect(err.pointer).toBe("\t  db db)\n\t     ^");
    }
  });

  it("limits nesting depth and length", () => {
    const deep = "(".repeat(MAX_QUERY_DEPTH + 1) + "a=b" + ")".repeat(MAX_QUERY_DEPTH + 1);
    expect(() => parseQuery(deep)).toThrow(/^at 64: nesting deeper than 64 levels$/);
    const ok = "(".repeat(MAX_QUERY_DEPTH) + "a=b" + ")".repeat(MAX_QUERY_DEPTH);
    expect(parseQuery(ok)).toEqual({ kind: "cmp", field: { scope: "auto", name: "a" }, op: "=", value: "b" });
    expect(() => parseQuery("not ".repeat(MAX_QUERY_DEPTH + 1) + "a=b")).toThrow(QuerySyntaxError);
    const long = `a = "${"x".repeat(MAX_QUERY_LENGTH)}"`;
    expect(() => parseQuery(long)).toThrow(InvalidArgumentError);
    expect(() => parseQuery(long)).not.toThrow(QuerySyntaxError);
  });

  it("limits queries to 8 KiB and globs to 256 characters, keeping a hostile glob over many hosts bounded (issue 12)", () => {
    expect(() => parseQuery(`a = "${"x".repeat(LIMITS.queryChars)}"`)).toThrow(/longer than 8192/);
    const glob = `"${"*a".repeat(127)}*b"`;
    expect(() => parseQuery(`hostname ~ ${glob}`)).not.toThrow();
    expect(() => parseQuery(`hostname ~ "${"*a".repeat(200)}"`)).toThrow(/glob.*256/);
    expect(() => parseQuery(`hostname !~ "${"?".repeat(300)}"`)).toThrow(/glob.*256/);
    // "=" compares exactly, so a long value costs nothing and is not a glob.
    expect(() => parseQuery(`hostname = "${"*".repeat(300)}"`)).not.toThrow();
    // The worst glob against 2,000 hosts whose every fact is at its limit.
    const q = parseQuery(`hostname ~ ${glob} or kernel ~ ${glob}`);
    const long = "a".repeat(LIMITS.factChars);
    const hosts = Array.from({ length: 2000 }, (_, i) =>
      hostView({ id: `h${i}`, tenant: "t", region: "r", proxy: "p", connected: true, since: 0, labels: {}, facts: create(HostFactsSchema, { hostname: long, kernel: long }) }),
    );
    const t0 = performance.now();
    expect(hosts.filter((h) => matchHost(q, h))).toHaveLength(0);
    expect(performance.now() - t0).toBeLessThan(5000);
  });
});
