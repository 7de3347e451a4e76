import { describe, expect, it } from "vitest";
import { InvalidArgumentError } from "../../common/errors.js";
import {
  DEFAULT_MAX_LENGTH,
  MAX_LIST_ITEMS,
  SENSITIVE,
  redactParams,
  resolveParams,
  validateParamSpecs,
  type ParamSpec,
} from "../../controller/params.js";

const SPECS: ParamSpec[] = [
  { name: "user", type: "string", pattern: "[a-z]+", required: true },
  { name: "count", type: "int", default: 3 },
  { name: "force", type: "bool", default: false },
  { name: "level", type: "enum", values: ["debug", "info", "warn"], default: "info" },
  { name: "files", type: "list", pattern: "[A-Za-z0-9_./-]+", default: [] },
  { name: "token", type: "string", sensitive: true, pattern: "[A-F0-9]{8}" },
  { name: "note", type: "string", maxLength: 10 },
];

/** The InvalidArgumentError message thrown by `fn`, failing the test if none is thrown. */
function refusal(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(InvalidArgumentError);
    return (err as Error).message;
  }
  throw new Error("expected an InvalidArgumentError, nothing was thrown");
}

describe("resolveParams", () => {
  it("converts each type and applies defaults in declaration order", () => {
    const v = resolveParams(SPECS, { user: "alice", count: "-42", force: "true", level: "warn", files: ["a.txt", "b/c.log"], note: "" });
    expect(v).toEqual({ user: "alice", count: -42, force: true, level: "warn", files: ["a.txt", "b/c.log"], note: "" });
    expect(Object.keys(v)).toEqual(["user", "count", "force", "level", "files", "note"]);

    const d = resolveParams(SPECS, { user: "bob" });
    expect(d).toEqual({ user: "bob", count: 3, force: false, level: "info", files: [] });
    expect("token" in d).toBe(false);
  });

  it("takes a list as repeated values, a JSON array, or one plain value", () => {
    expect(resolveParams(SPECS, { user: "a", files: ' ["x", "y_z"]' }).files).toEqual(["x", "y_z"]);
    expect(resolveParams(SPECS, { user: "a", files: "only.txt" }).files).toEqual(["only.txt"]);
    expect(resolveParams(SPECS, { user: "a", files: [] }).files).toEqual([]);
    expect(refusal(() => resolveParams(SPECS, { user: "a", files: "[not json" }))).toBe('parameter "files" looks like a JSON array but is not valid JSON');
    expect(refusal(() => resolveParams(SPECS, { user: "a", files: '["a", 1]' }))).toBe('parameter "files" must be a list of strings');
    expect(refusal(() => resolveParams(SPECS, { user: "a", files: ["ok", "bad;rm"] }))).toMatch(/^parameter "files" element 2 does not match/);
    const many = Array.from({ length: MAX_LIST_ITEMS + 1 }, () => "x");
    expect(refusal(() => resolveParams(SPECS, { user: "a", files: many }))).toMatch(/^parameter "files" may hold at most 1024 elements/);
  });

  it("refuses each kind of bad value, naming the parameter", () => {
    const bad: [Record<string, string | string[]>, string][] = [
      [{ user: "a", count: "3.5" }, 'parameter "count" must be an integer'],
      [{ user: "a", count: "12abc" }, 'parameter "count" must be an integer'],
      [{ user: "a", count: "" }, 'parameter "count" must be an integer'],
      [{ user: "a", count: "9007199254740992" }, 'parameter "count" must be an integer'],
      [{ user: "a", count: ["1", "2"] }, 'parameter "count" takes one value, got 2'],
      [{ user: "a", force: "yes" }, 'parameter "force" must be true or false, got "yes"'],
      [{ user: "a", force: "TRUE" }, 'parameter "force" must be true or false'],
      [{ user: "a", level: "trace" }, 'parameter "level" must be one of debug, info, warn, got "trace"'],
      [{ user: "a", note: "x".repeat(11) }, 'parameter "note" is longer than 10 characters'],
      [{ user: "a", nope: "1" }, 'parameter "nope" is not declared by the document (it declares user, count, force, level, files, token, note)'],
      [{ count: "1" }, 'parameter "user" is required'],
      [{ user: "a", note: "a\0b" }, 'parameter "note" must not contain NUL bytes'],
      [{ user: "a", files: ["ok", "a\0"] }, 'parameter "files" must not contain NUL bytes'],
      [{ user: "a", level: "info\0" }, 'parameter "level" must not contain NUL bytes'],
    ];
    for (const [given, message] of bad) {
      expect(refusal(() => resolveParams(SPECS, given)), JSON.stringify(given)).toContain(message);
    }
  });

  it("accepts the full safe-integer range and normalises -0", () => {
    expect(resolveParams(SPECS, { user: "a", count: "9007199254740991" }).count).toBe(Number.MAX_SAFE_INTEGER);
    expect(Object.is(resolveParams(SPECS, { user: "a", count: "-0" }).count, 0)).toBe(true);
  });

  it("anchors patterns to the whole value", () => {
    const specs: ParamSpec[] = [{ name: "name", type: "string", pattern: "[a-z]+" }];
    expect(resolveParams(specs, { name: "abc" })).toEqual({ name: "abc" });
    for (const v of ["abc;rm", "rm;abc", "abc\n", "\nabc", "ABC", "", "abc def"]) {
      expect(refusal(() => resolveParams(specs, { name: v })), JSON.stringify(v)).toMatch(/^parameter "name" does not match the pattern \[a-z\]\+/);
    }
    // An alternation is anchored as a whole, not just its first and last branch.
    const alt: ParamSpec[] = [{ name: "mode", type: "string", pattern: "read|write" }];
    expect(resolveParams(alt, { mode: "write" })).toEqual({ mode: "write" });
    expect(refusal(() => resolveParams(alt, { mode: "read;id" }))).toContain('parameter "mode" does not match');
    expect(refusal(() => resolveParams(alt, { mode: "x;write" }))).toContain('parameter "mode" does not match');
  });

  it("applies the default length cap", () => {
    const specs: ParamSpec[] = [{ name: "s", type: "string" }];
    expect(resolveParams(specs, { s: "x".repeat(DEFAULT_MAX_LENGTH) }).s).toHaveLength(DEFAULT_MAX_LENGTH);
    expect(refusal(() => resolveParams(specs, { s: "x".repeat(DEFAULT_MAX_LENGTH + 1) }))).toBe(
      `parameter "s" is longer than ${DEFAULT_MAX_LENGTH} characters`,
    );
  });

  it("never echoes a sensitive value in an error", () => {
    const msg = refusal(() => resolveParams(SPECS, { user: "a", token: "hunter2-secret" }));
    expect(msg).toMatch(/^parameter "token" does not match the pattern/);
    expect(msg).not.toContain("hunter2");
    const enumSecret: ParamSpec[] = [{ name: "key", type: "enum", values: ["a", "b"], sensitive: true }];
    expect(refusal(() => resolveParams(enumSecret, { key: "topsecret" }))).not.toContain("topsecret");
  });

  it("is not fooled by prototype property names", () => {
    expect(refusal(() => resolveParams(SPECS, JSON.parse('{"user":"a","__proto__":"x"}') as Record<string, string>))).toBe(
      'parameter "__proto__" is not declared by the document (it declares user, count, force, level, files, token, note)',
    );
    expect(refusal(() => resolveParams(SPECS, { constructor: "x" } as Record<string, string>))).toMatch(/^parameter "constructor" is not declared/);
  });
});

describe("redactParams", () => {
  it("hides sensitive values and fails closed on undeclared ones", () => {
    const values = resolveParams(SPECS, { user: "alice", token: "DEADBEEF", files: ["a"] });
    const shown = redactParams(SPECS, { ...values, stray: "leak?" });
    expect(shown).toEqual({ user: "alice", count: 3, force: false, level: "info", files: ["a"], token: SENSITIVE, stray: SENSITIVE });
    expect(JSON.stringify(shown)).not.toContain("DEADBEEF");
    // A copy: editing the redacted listing does not touch the values sent to hosts.
    (shown.files as string[]).push("b");
    expect(values.files).toEqual(["a"]);
  });
});

describe("validateParamSpecs", () => {
  it("accepts the example specs", () => {
    expect(() => validateParamSpecs(SPECS)).not.toThrow();
  });

  it("refuses bad declarations, naming the parameter", () => {
    const bad: [ParamSpec, string][] = [
      [{ name: "1abc", type: "string" }, 'parameter "1abc": a name starts with a letter'],
      [{ name: "has-dash", type: "string" }, 'parameter "has-dash": a name starts with a letter'],
      [{ name: "__proto__", type: "string" }, 'parameter "__proto__": a name starts with a letter'],
      [{ name: "t", type: "float" as never }, 'parameter "t": type must be one of string, int, bool, enum, list'],
      [{ name: "re", type: "string", pattern: "([a-z]" }, 'parameter "re": pattern is not a valid regular expression'],
      [{ name: "esc", type: "string", pattern: "a)|(b" }, 'parameter "esc": pattern is not a valid regular expression'],
      [{ name: "e", type: "enum" }, 'parameter "e": an enum needs a non-empty list of values'],
      [{ name: "e", type: "enum", values: [] }, 'parameter "e": an enum needs a non-empty list of values'],
      [{ name: "e", type: "enum", values: ["a", "a"] }, 'parameter "e": enum values must be distinct'],
      [{ name: "v", type: "string", values: ["a"] }, 'parameter "v": values applies only to enum parameters'],
      [{ name: "p", type: "int", pattern: "[0-9]+" }, 'parameter "p": pattern applies only to string and list parameters'],
      [{ name: "d", type: "int", default: "3" }, 'parameter "d": default must be a safe integer'],
      [{ name: "d", type: "int", default: 1.5 }, 'parameter "d": default must be a safe integer'],
      [{ name: "d", type: "bool", default: "false" }, 'parameter "d": default must be true or false'],
      [{ name: "d", type: "enum", values: ["a"], default: "b" }, 'parameter "d": default must be one of a'],
      [{ name: "d", type: "string", pattern: "[a-z]+", default: "A" }, 'parameter "d": default does not match the pattern'],
      [{ name: "d", type: "list", pattern: "[a-z]+", default: ["ok", "NO"] }, 'parameter "d": default element 2 does not match the pattern'],
      [{ name: "d", type: "list", default: "a" }, 'parameter "d": default must be a list of strings'],
      [{ name: "r", type: "string", required: true, default: "x" }, 'parameter "r": a required parameter cannot have a default'],
      [{ name: "m", type: "string", maxLength: 0 }, 'parameter "m": maxLength must be an integer from 1 to 131072'],
    ];
    for (const [spec, message] of bad) {
      expect(refusal(() => validateParamSpecs([spec])), JSON.stringify(spec)).toContain(message);
    }
    expect(refusal(() => validateParamSpecs([{ name: "a", type: "int" }, { name: "a", type: "bool" }]))).toBe('parameter "a": is declared twice');
  });

  it("is applied by resolveParams too, so an unchecked document cannot slip through", () => {
    expect(refusal(() => resolveParams([{ name: "x", type: "string", pattern: "(" }], { x: "a" }))).toContain('parameter "x": pattern is not a valid');
  });
});

/** Issue 12, ReDoS: `(a|a)+` against 30 characters blocked the controller for over a minute at `docs put` and at submit. */
describe("patterns run in linear time", () => {
  const hostile = "a".repeat(30) + "!";
  const timed = (fn: () => unknown): { ms: number; threw: unknown } => {
    const t0 = performance.now();
    try {
      fn();
      return { ms: performance.now() - t0, threw: undefined };
    } catch (err) {
      return { ms: performance.now() - t0, threw: err };
    }
  };

  it("(a|a)+ checks a default at docs put and a value at submit in milliseconds", () => {
    const atPut = timed(() => validateParamSpecs([{ name: "v", type: "string", pattern: "(a|a)+", default: hostile }]));
    expect(atPut.threw).toBeInstanceOf(InvalidArgumentError);
    expect(atPut.ms).toBeLessThan(200);
    const atSubmit = timed(() => resolveParams([{ name: "v", type: "list", pattern: "(a|a)+", default: [] }], { v: [hostile, "a".repeat(4000) + "!"] }));
    expect(atSubmit.threw).toBeInstanceOf(InvalidArgumentError);
    expect(atSubmit.ms).toBeLessThan(200);
    for (const p of ["(a*)*b", "(a+)+$", "(x+x+)+y", "(.*a){20}"]) {
      expect(timed(() => resolveParams([{ name: "v", type: "string", pattern: p }], { v: "a".repeat(4096) })).ms, p).toBeLessThan(200);
    }
    // Still a whole match, as before.
    expect(resolveParams([{ name: "v", type: "string", pattern: "(a|a)+" }], { v: "aaa" })).toEqual({ v: "aaa" });
    expect(refusal(() => resolveParams([{ name: "v", type: "string", pattern: "[a-z]+" }], { v: "abc1" }))).toMatch(/does not match/);
  });

  it("refuses patterns that need backtracking, escape their anchors, or are too long", () => {
    expect(refusal(() => validateParamSpecs([{ name: "v", type: "string", pattern: "(a)\\1" }]))).toMatch(/linear time/);
    expect(refusal(() => validateParamSpecs([{ name: "v", type: "string", pattern: "a(?=b)" }]))).toMatch(/linear time/);
    expect(refusal(() => validateParamSpecs([{ name: "v", type: "string", pattern: "(?<=a)b" }]))).toMatch(/linear time/);
    expect(refusal(() => validateParamSpecs([{ name: "v", type: "string", pattern: "a)|(b" }]))).toMatch(/not a valid regular expression/);
    expect(refusal(() => validateParamSpecs([{ name: "v", type: "string", pattern: "a".repeat(2000) }]))).toMatch(/longer than/);
  });
});
