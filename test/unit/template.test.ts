import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { afterAll, describe, expect, it } from "vitest";
import { InvalidArgumentError } from "../../common/errors.js";
import type { ParamValue } from "../../controller/params.js";
import { hostView, type HostView } from "../../controller/query.js";
import { renderArgv, renderShell, renderText, shellQuote, templateRefs, validateTemplate, type RenderContext } from "../../controller/template.js";
import { HostFactsSchema } from "../../gen/rexmesh/v1/host_pb.js";

const EU: HostView = hostView({
  id: "web-1",
  tenant: "t1",
  region: "eu-1",
  proxy: "eu-1-a",
  connected: true,
  since: 0,
  labels: { role: "web", "team/owner": "blue" },
  facts: create(HostFactsSchema, { os: "linux", osFamily: "debian", arch: "x64", hostname: "web-1.eu", tools: ["exec", "shell"], addresses: ["10.0.0.1"] }),
});
const US: HostView = hostView({
  id: "db-7",
  tenant: "t1",
  region: "us-1",
  proxy: "us-1-b",
  connected: false,
  since: 0,
  labels: {},
  facts: create(HostFactsSchema, { os: "linux", osFamily: "rhel", arch: "arm64", hostname: "db-7.us", tools: ["exec"] }),
});

const ctx = (params: Record<string, ParamValue>, host: HostView = EU): RenderContext => ({ params, host });

function refusal(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(InvalidArgumentError);
    return (err as Error).message;
  }
  throw new Error("expected an InvalidArgumentError, nothing was thrown");
}

describe("the injection corpus reaches the command as one literal argument", () => {
  const dir = mkdtempSync(join(tmpdir(), "rexmesh-template-"));
  const marker = join(dir, "marker");
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  const CORPUS = [
    ";",
    `; touch ${marker}`,
    "|",
    `x | touch ${marker}`,
    "&&",
    `x && touch ${marker}`,
    `$(touch ${marker})`,
    `\`touch ${marker}\``,
    "$HOME",
    "${HOME}",
    "$((6*7))",
    "line1\nline2",
    `x\ntouch ${marker}\n`,
    "\\n",
    "-",
    "-rf",
    "--",
    "--help",
    "'",
    '"',
    `it's "quoted"`,
    `'; touch ${marker}; '`,
    `\\'; touch ${marker}; \\'`,
    `"; touch ${marker}; "`,
    "\\",
    "back\\slash\\",
    "*",
    "/*",
    "a b  c",
    "",
    " ",
    "\t",
    "~",
    "#not a comment",
    "a=b",
    `>${marker}`,
    "{a,b}",
    "!!",
    "é 日本 😀",
  ];

  /** Runs a rendered script and returns the NUL-separated words printf received. */
  const sh = (script: string): string[] => {
    const out = execFileSync("/bin/sh", ["-c", script], { cwd: dir, encoding: "utf8" });
    expect(out.endsWith("\0") || out === "").toBe(true);
    return out === "" ? [] : out.slice(0, -1).split("\0");
  };

  it("proves the detector works: unquoted substitution would run the payload", () => {
    const control = join(dir, "control");
    const naive = renderText("printf '%s\\000' {{param.x}}", ctx({ x: `$(touch ${control})` }));
    sh(naive);
    expect(existsSync(control)).toBe(true);
  });

  it("renderShell: every value is one word, byte for byte, and nothing runs", () => {
    for (const value of CORPUS) {
      const script = renderShell("printf '%s\\000' {{param.x}}", ctx({ x: value }));
      expect(sh(script), JSON.stringify(value)).toEqual([value]);
    }
    expect(existsSync(marker)).toBe(false);
  });

  it("renderShell: a list is one word per element", () => {
    const list = CORPUS.slice(0, 12);
    expect(sh(renderShell("printf '%s\\000' {{ param.l }}", ctx({ l: list })))).toEqual(list);
    expect(sh(renderShell("printf '%s\\000' start {{ param.l }} end", ctx({ l: [] })))).toEqual(["start", "end"]);
    expect(existsSync(marker)).toBe(false);
  });

  it("renderShell: placeholders beside text stay literal, and anything may follow the last one", () => {
    const value = `"; touch ${marker}; " $(touch ${marker}) 'x'`;
    const script = [
      `v={{param.x}}`,
      `printf '%s\\000' "$v" --opt={{param.x}}x a#{{param.x}} # {{{{ not a placeholder }}`,
      `cat <<'EOF' >/dev/null`,
      `it's $(not) run "here"`,
      `EOF`,
      `w="$(printf '%s' "$v")"`,
      `printf '%s\\000' "$w"`,
    ].join("\n");
    expect(sh(renderShell(script, ctx({ x: value })))).toEqual([value, `--opt=${value}x`, `a#${value}`, value]);
    expect(existsSync(marker)).toBe(false);
  });

  it("renderShell: values travel in read-only variables, never in the script's text where they are used", () => {
    expect(renderShell("echo {{param.x}} --v={{param.x}}", ctx({ x: "a'b" }))).toBe(`readonly rexmesh_v1='a'\\''b' rexmesh_v2='a'\\''b'; echo "\${rexmesh_v1}" --v="\${rexmesh_v2}"`);
    expect(renderShell("echo hi", ctx({}))).toBe("echo hi");
    // The script cannot overwrite a value before using it.
    expect(() => sh(renderShell("rexmesh_v1=evil; printf '%s\\000' {{param.x}}", ctx({ x: "good" })))).toThrow();
  });

  it("renderArgv: every value is one argv element with no shell at all", () => {
    for (const value of CORPUS) {
      const argv = renderArgv(["/usr/bin/printf", "%s\\000", "{{param.x}}", "--v={{ param.x }}"], ctx({ x: value }));
      const out = execFileSync(argv[0]!, argv.slice(1), { cwd: dir, encoding: "utf8" });
      expect(out, JSON.stringify(value)).toBe(`${value}\0--v=${value}\0`);
    }
    const files = ["a b", `$(touch ${marker})`, "", "-rf"];
    const argv = renderArgv(["/usr/bin/printf", "%s\\000", "{{ param.files }}", "{{param.files}}!"], ctx({ files }));
    expect(argv).toEqual(["/usr/bin/printf", "%s\\000", ...files, `${files.join(",")}!`]);
    expect(execFileSync(argv[0]!, argv.slice(1), { encoding: "utf8" }).split("\0").slice(0, -1)).toEqual([...files, `${files.join(",")}!`]);
    expect(existsSync(marker)).toBe(false);
  });

  it("refuses NUL in values, lists, defaults and templates", () => {
    expect(refusal(() => renderShell("echo {{param.x}}", ctx({ x: "a\0b" })))).toBe('template: the value of "{{param.x}}" contains a NUL byte');
    expect(refusal(() => renderArgv(["{{param.l}}"], ctx({ l: ["ok", "\0"] })))).toContain("NUL");
    expect(refusal(() => renderText("a\0{{host.id}}", ctx({})))).toBe("template: contains a NUL byte");
    expect(refusal(() => shellQuote("\0"))).toContain("NUL");
  });
});

describe("renderShell refuses placeholders that quoting cannot protect", () => {
  const cases: [string, string][] = [
    ['echo "{{param.x}}"', 'placeholder "{{param.x}}" at 6 is inside double quotes'],
    ["echo '{{param.x}}'", 'placeholder "{{param.x}}" at 6 is inside single quotes'],
    ["echo ${X:-{{param.x}}}", 'placeholder "{{param.x}}" at 10 is inside ${…}'],
    ["echo hi # {{param.x}}", 'placeholder "{{param.x}}" at 10 is inside a comment'],
    ["echo \\{{param.x}}", 'placeholder "{{param.x}}" at 6 is right after a backslash'],
    ["echo ${{param.x}}", 'placeholder "{{param.x}}" at 6 is right after "$"'],
    ['echo "unterminated {{param.x}}', 'placeholder "{{param.x}}" at 19 is inside double quotes'],
    ["echo $'a {{param.x}}'", "$'…' quoting at 5 comes before placeholder"],
    ['echo $"a" {{param.x}}', '$"…" quoting at 5 comes before placeholder'],
    ["echo `echo {{param.x}}`", "a backquoted command at 5 comes before placeholder"],
    ['echo "$(echo `x {{param.x}}`)"', "command substitution $( ) at 6 comes before placeholder"],
    ['echo "${u-\'}" \'}" {{param.x}} \'', "a parameter expansion with an operator ${…} at 6 comes before placeholder"],
    ["echo $(( 1 + 1 )) {{param.x}}", "arithmetic $(( )) at 5 comes before placeholder"],
    ["(( {{param.x}} > 1 )) && echo big", "arithmetic (( )) at 0 comes before placeholder"],
    ["[[ 1 -eq {{param.x}} ]]", "[[ ]] at 0 comes before placeholder"],
    ["echo $[ {{param.x}} + 1 ]", 'arithmetic "$[" at 5 comes before placeholder'],
    ["cat <<EOF\nhello {{param.x}}\nEOF", "a here-document at 4 comes before placeholder"],
    ["cat <<{{param.x}}\nx\n", "a here-document at 4 comes before placeholder"],
    ["echo x <<<y {{param.x}}", "a here-document at 7 comes before placeholder"],
  ];
  it.each(cases)("%j", (template, why) => {
    const msg = refusal(() => renderShell(template, ctx({ x: "v" })));
    expect(msg).toContain(why);
    expect(refusal(() => validateTemplate(template, "shell", [{ name: "x", type: "string" }]))).toBe(msg);
  });

  it("refuses what it does not understand only before the last placeholder", () => {
    expect(refusal(() => renderShell('cat <<EOF; echo "a\nb"\nEOF\necho {{param.x}}', ctx({ x: "v" })))).toContain("here-document");
    expect(refusal(() => renderShell("v=$(case a in a) echo {{param.x}};; esac)", ctx({ x: "v" })))).toContain("command substitution");
    // …and only when there is something to protect.
    expect(renderShell('cat <<EOF; echo "a\nb"\nEOF', ctx({}))).toBe('cat <<EOF; echo "a\nb"\nEOF');
    expect(renderShell('echo {{param.x}}; cat <<EOF; echo "$(x)" `y` ${z:-w}\nEOF', ctx({ x: "v" }))).toBe(
      'readonly rexmesh_v1=\'v\'; echo "${rexmesh_v1}"; cat <<EOF; echo "$(x)" `y` ${z:-w}\nEOF',
    );
  });

  it("allows placeholders where they are plain words", () => {
    expect(renderShell('echo ${X} "$X" $# {{param.x}}', ctx({ x: "a'b" }))).toBe(`readonly rexmesh_v1='a'\\''b'; echo \${X} "$X" $# "\${rexmesh_v1}"`);
    expect(renderShell("case {{param.x}} in a) echo {{param.x}};; esac", ctx({ x: "a" }))).toBe(`readonly rexmesh_v1='a' rexmesh_v2='a'; case "\${rexmesh_v1}" in a) echo "\${rexmesh_v2}";; esac`);
    expect(renderShell("x=a\\\n#b {{param.x}}", ctx({ x: "a" }))).toBe(`readonly rexmesh_v1='a'; x=a\\\n#b "\${rexmesh_v1}"`);
  });

  it("requires a list to stand as a whole word", () => {
    expect(refusal(() => renderShell("echo --files={{param.l}}", ctx({ l: ["a", "b"] })))).toBe(
      'template: list placeholder "{{param.l}}" at 13 must stand as a whole word in a shell script',
    );
    expect(renderShell("echo --files={{param.l}}", ctx({ l: "a" }))).toBe(`readonly rexmesh_v1='a'; echo --files="\${rexmesh_v1}"`);
    expect(renderShell("for f in {{param.l}}; do rm -- \"$f\"; done", ctx({ l: ["a b", "c"] }))).toBe(
      `readonly rexmesh_v1='a b' rexmesh_v2='c'; for f in "\${rexmesh_v1}" "\${rexmesh_v2}"; do rm -- "$f"; done`,
    );
    expect(renderShell("rm -- {{param.l}}", ctx({ l: [] }))).toBe("rm -- ");
    expect(refusal(() => validateTemplate("echo x{{ param.l }}", "shell", [{ name: "l", type: "list" }]))).toContain("must stand as a whole word");
  });
});

describe("template rendering", () => {
  it("renders each host with its own id, region, labels and facts", () => {
    const t = "{{host.id}}@{{host.region}} {{fact.os.family}}/{{fact.arch}} role={{ label.role | default \"none\" }} owner={{label.team/owner|default \"-\"}} tools={{fact.tools}} up={{fact.connected}}";
    expect(renderText(t, ctx({}, EU))).toBe("web-1@eu-1 debian/x64 role=web owner=blue tools=exec,shell up=true");
    expect(renderText(t, ctx({}, US))).toBe("db-7@us-1 rhel/arm64 role=none owner=- tools=exec up=false");
    expect(renderShell("echo {{fact.hostname}} {{fact.tools}}", ctx({}, US))).toBe(`readonly rexmesh_v1='db-7.us' rexmesh_v2='exec'; echo "\${rexmesh_v1}" "\${rexmesh_v2}"`);
  });

  it("formats every parameter type", () => {
    const params = { s: "x y", n: -7, b: false, l: ["a", "b", "c"] };
    expect(renderText("{{param.s}}|{{param.n}}|{{param.b}}|{{param.l}}", ctx(params))).toBe("x y|-7|false|a,b,c");
    expect(renderShell("f {{param.s}} {{param.n}} {{param.b}} {{param.l}}", ctx(params))).toBe(
      `readonly rexmesh_v1='x y' rexmesh_v2='-7' rexmesh_v3='false' rexmesh_v4='a' rexmesh_v5='b' rexmesh_v6='c'; f "\${rexmesh_v1}" "\${rexmesh_v2}" "\${rexmesh_v3}" "\${rexmesh_v4}" "\${rexmesh_v5}" "\${rexmesh_v6}"`,
    );
  });

  it("names an unknown or malformed placeholder with its position", () => {
    const bad: [string, string][] = [
      ["run {{ foo }}", 'template: unknown placeholder "{{ foo }}" at 4: use param.<name>, host.id, host.region, label.<key> or fact.<key>'],
      ["{{params.x}}", 'unknown placeholder "{{params.x}}" at 0'],
      ["{{ host.name }}", 'unknown placeholder "{{ host.name }}" at 0'],
      ["{{ param.1x }}", 'unknown placeholder "{{ param.1x }}" at 0'],
      ["{{ label. }}", 'unknown placeholder "{{ label. }}" at 0'],
      ["a {{ param.x", 'template: "{{" is never closed by "}}" (write "{{{{" for a literal "{{"): "{{ param.x" at 2'],
      ["{{ param.x y }}", 'template: expected }} to end placeholder "{{ param.x y }}" at 0'],
      ['{{ param.x | upper }}', 'template: expected `| default "text"` in placeholder'],
      ['{{ param.x | default none }}', "template: expected a quoted text after \"default\""],
      ["{{ $(id) }}", 'template: expected }} to end placeholder "{{ $(id) }}" at 0'],
    ];
    for (const [template, message] of bad) {
      expect(refusal(() => renderText(template, ctx({ x: "v" }))), template).toContain(message);
      expect(refusal(() => templateRefs(template)), template).toContain(message);
    }
  });

  it("says which value is missing, and on which host", () => {
    expect(refusal(() => renderText("{{param.x}}", ctx({})))).toBe(
      'template: placeholder "{{param.x}}" has no value (the parameter was not given and has no default); add | default "…" to make it optional',
    );
    expect(refusal(() => renderText("{{ label.role }}", ctx({}, US)))).toContain('host "db-7" has no such label');
    expect(refusal(() => renderText("{{fact.kernel}}", ctx({}, EU)))).toContain('"{{fact.kernel}}" has no value (host "web-1" has no such fact)');
    // Inherited object members are not parameters.
    expect(refusal(() => renderText("{{param.constructor}}", ctx({})))).toContain("has no value");
  });

  it('writes a literal "{{" as "{{{{" and keeps default text exactly', () => {
    expect(renderText("{{{{ param.x }} and {{{{{{param.x}}}}", ctx({ x: "v" }))).toBe("{{ param.x }} and {{v}}");
    expect(renderText('{{ label.none | default "a \\"q\\" \\\\ }} b" }}', ctx({}))).toBe('a "q" \\ }} b');
    expect(renderShell('echo {{ label.none | default "it\'s" }}', ctx({}))).toBe(`readonly rexmesh_v1='it'\\''s'; echo "\${rexmesh_v1}"`);
    expect(templateRefs("{{{{ param.x }}")).toEqual([]);
  });

  it("lists the placeholders a template uses, once each", () => {
    expect(templateRefs("{{param.a}} {{ host.id }} {{param.a}} {{fact.os.family|default \"x\"}} {{label.k8s.io/zone}}")).toEqual([
      "param.a",
      "host.id",
      "fact.os.family",
      "label.k8s.io/zone",
    ]);
  });

  it("checks parameter references against the declarations", () => {
    expect(() => validateTemplate("echo {{param.a}} {{host.id}}", "shell", [{ name: "a", type: "string" }])).not.toThrow();
    expect(refusal(() => validateTemplate("echo {{ param.b }}", "text", [{ name: "a", type: "string" }]))).toBe(
      'template: placeholder "{{ param.b }}" at 5 names no declared parameter',
    );
  });

  it("quotes for POSIX shells", () => {
    expect(shellQuote("")).toBe("''");
    expect(shellQuote("it's")).toBe("'it'\\''s'");
    expect(shellQuote("$(x) `y` \\ \"")).toBe("'$(x) `y` \\ \"'");
  });
});
