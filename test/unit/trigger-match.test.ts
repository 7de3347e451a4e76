import { describe, expect, it } from "vitest";
import { Code } from "@connectrpc/connect";
import { codeOf } from "../../common/rpc-errors.js";
import { matches, parseMatch } from "../../controller/trigger-match.js";

const refused = (expr: string): string => {
  try {
    parseMatch(expr);
  } catch (err) {
    expect(codeOf(err)).toBe(Code.InvalidArgument);
    return (err as Error).message;
  }
  throw new Error(`${JSON.stringify(expr)} was accepted`);
};

describe("the triggers' match language", () => {
  it("parses key=value and key!=value terms joined by and, quoted values included", () => {
    expect(parseMatch("kind=service.failed and unit=nginx.service")).toEqual([
      { key: "kind", negated: false, value: "service.failed" },
      { key: "unit", negated: false, value: "nginx.service" },
    ]);
    expect(parseMatch('  kind!=disk.full AND path="/var/my dir" and note="say \\"hi\\" \\\\ bye"  ')).toEqual([
      { key: "kind", negated: true, value: "disk.full" },
      { key: "path", negated: false, value: "/var/my dir" },
      { key: "note", negated: false, value: 'say "hi" \\ bye' },
    ]);
    expect(parseMatch('exit=""')).toEqual([{ key: "exit", negated: false, value: "" }]);
  });

  it("refuses anything else with INVALID_ARGUMENT saying where", () => {
    expect(refused("")).toMatch(/it is empty/);
    expect(refused("   ")).toMatch(/it is empty/);
    expect(refused("kind")).toMatch(/expected = or != after "kind" at column 5/);
    expect(refused("kind=")).toMatch(/"kind" has no value at column 6/);
    expect(refused("kind=a or unit=b")).toMatch(/expected 'and' at column 8/);
    expect(refused("kind=a and")).toMatch(/ends with 'and'/);
    expect(refused("kind=a andunit=b")).toMatch(/expected 'and' at column 8/);
    expect(refused("kind=a unit=b")).toMatch(/expected 'and' at column 8/);
    expect(refused("=x")).toMatch(/expected a key at column 1/);
    expect(refused('kind="open')).toMatch(/quoted value of "kind" is not closed/);
    expect(refused("kind=a\"b")).toMatch(/expected a space and 'and'/);
    expect(refused("kind==a")).toMatch(/has no value/);
    expect(refused("-kind=a")).toMatch(/is not a key/);
    expect(refused(`k=${"v".repeat(257)}`)).toMatch(/longer than 256 characters/);
    expect(refused(Array.from({ length: 17 }, (_, i) => `k${i}=v`).join(" and "))).toMatch(/more than 16 terms/);
    expect(refused("k=v and ".repeat(200) + "k=v")).toMatch(/longer than 1024 characters/);
  });

  it("matches the kind and the details; a detail the event lacks equals nothing", () => {
    const ev = { kind: "service.failed", details: { unit: "nginx.service", exit: "3" } };
    expect(matches(parseMatch("kind=service.failed and unit=nginx.service"), ev)).toBe(true);
    expect(matches(parseMatch("kind=service.failed and unit=sshd.service"), ev)).toBe(false);
    expect(matches(parseMatch("kind!=service.failed"), ev)).toBe(false);
    expect(matches(parseMatch("unit!=sshd.service and exit=3"), ev)).toBe(true);
    expect(matches(parseMatch("path=/tmp"), ev)).toBe(false);
    expect(matches(parseMatch("path!=/tmp"), ev)).toBe(true);
    // Details cannot pose as the kind, nor inherited names as details.
    expect(matches(parseMatch("constructor=x"), { kind: "k", details: {} })).toBe(false);
  });
});
