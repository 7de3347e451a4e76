/**
 * The job page's label filter becomes a host query the controller answers
 * (console/src/format.ts labelQuery): it must select exactly the hosts the
 * filter names, whatever the value holds.
 */
import { describe, expect, it } from "vitest";
import { labelQuery } from "../../console/src/format.js";
import { hostView, matchHost, parseQuery } from "../../controller/query.js";
import type { HostRecord } from "../../controller/model.js";

const host = (id: string, labels: Record<string, string>): HostRecord => ({ id, tenant: "acme", region: "east", proxy: "", connected: true, since: 0, labels }) as HostRecord;

describe("the console's label filter as a host query", () => {
  const hosts = [
    host("h1", { role: "web" }),
    host("h2", { role: "db", note: 'say "hi" \\ bye' }),
    host("h3", { expr: "a=b=c", "team/x": "ops" }),
    host("h4", { os: "web" }), // a label named like a fact: still a label
    host("h5", {}),
  ];
  const matching = (filter: string) => {
    const q = labelQuery(filter);
    if (q === undefined) return "all";
    if (q === null) return [];
    return hosts.filter((h) => matchHost(parseQuery(q), hostView(h))).map((h) => h.id);
  };

  it("selects by key, by key and exact value (quotes, backslashes and = in the value), and nothing for a key no label can have", () => {
    expect(matching("")).toBe("all");
    expect(matching("  ")).toBe("all");
    expect(matching("role")).toEqual(["h1", "h2"]);
    expect(matching(" role = web ")).toEqual(["h1"]);
    expect(matching("role=")).toEqual([]);
    expect(matching('note=say "hi" \\ bye')).toEqual(["h2"]);
    expect(matching("expr=a=b=c")).toEqual(["h3"]);
    expect(matching("team/x=ops")).toEqual(["h3"]);
    expect(matching("os=web")).toEqual(["h4"]);
    expect(matching("has")).toEqual([]);
    expect(matching("role or all")).toEqual([]);
    expect(matching("-x")).toEqual([]);
  });
});
