import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import { InvalidArgumentError } from "../../common/errors.js";
import { hostView } from "../../controller/query.js";
import { renderShell, validateTemplate } from "../../controller/template.js";

/**
 * Issue 12, "template lexer vs /bin/sh": a template the controller accepted
 * (`echo "${u-'}" '}" {{param.v}} '`) put the parameter where the shell
 * read it as code. These tests run rendered scripts through real shells —
 * /bin/sh (dash here) and bash when present — with payloads that create a
 * marker file if they ever execute, and check that every template either is
 * refused at `docs put` or delivers the parameter as one literal word.
 */
const dir = mkdtempSync(join(tmpdir(), "rexmesh-shell-"));
const marker = join(dir, "INJECTED");
afterAll(() => rmSync(dir, { recursive: true, force: true }));
afterEach(() => {
  const ran = existsSync(marker);
  rmSync(marker, { force: true });
  expect(ran, "a payload executed").toBe(false);
});

const SHELLS = ["/bin/sh", "/usr/bin/dash", "/bin/bash", "/usr/bin/bash"].filter((s, i, all) => existsSync(s) && all.findIndex((x) => existsSync(x) && x.split("/").pop() === s.split("/").pop()) === i);

const PAYLOADS = [
  `$(touch ${marker})`,
  `\`touch ${marker}\``,
  `'$(touch ${marker})'`,
  `"$(touch ${marker})"`,
  `'; touch ${marker}; '`,
  `"; touch ${marker}; "`,
  `}'"$(touch ${marker})"'{`,
  `'}" $(touch ${marker}) "{'`,
  `\\'; touch ${marker} #`,
  `\n touch ${marker}\n`,
  `x' $(touch ${marker}) '`,
  `$IFS$(touch${"${IFS}"}${marker})`,
  "a b  *  ?",
  "\\",
  "'",
  '"',
  "",
];
const TOKEN = "Wq7Token";

const params = [{ name: "v", type: "string" as const }];
const host = hostView({ id: "h1", tenant: "t", region: "r", proxy: "p", connected: true, since: 0, labels: {} });

function accepted(template: string): boolean {
  try {
    validateTemplate(template, "shell", params);
    return true;
  } catch (err) {
    expect(err).toBeInstanceOf(InvalidArgumentError);
    return false;
  }
}

interface Ran {
  out: string;
  status: number;
}

let batches = 0;
/**
 * Runs each script as its own `shell FILE` process (the same parser as
 * `shell -c`), forked by one driver shell: far cheaper than a Node spawn per
 * script. Returns each one's stdout and exit status.
 */
function runAll(shell: string, scripts: readonly string[]): Ran[] {
  const files = scripts.map((script, i) => {
    const f = join(dir, `s${batches}-${i}.sh`);
    writeFileSync(f, script);
    return f;
  });
  batches++;
  const driver = `for f; do "${shell}" "$f" </dev/null 2>/dev/null; printf '\\001%d\\001' $?; done`;
  const r = spawnSync("/bin/sh", ["-c", driver, "driver", ...files], { cwd: dir, encoding: "utf8", timeout: 60_000, env: { PATH: process.env.PATH, LC_ALL: "C" } });
  for (const f of files) rmSync(f, { force: true });
  const parts = r.stdout.split("\x01");
  const out: Ran[] = [];
  for (let i = 0; i + 1 < parts.length; i += 2) out.push({ out: parts[i]!, status: Number(parts[i + 1]) });
  expect(out.length, `${shell}: every script ran`).toBe(scripts.length);
  return out;
}

function run(shell: string, script: string): Ran {
  return runAll(shell, [script])[0]!;
}

/**
 * The parameter arrived as one literal word: the script behaves with each
 * payload exactly as with a plain token, the token replaced by the payload
 * in what it printed — and nothing ran.
 */
function checkLiteral(templates: readonly string[], payloads: readonly string[] = PAYLOADS, shells: readonly string[] = SHELLS): void {
  const values = [TOKEN, ...payloads];
  for (const shell of shells) {
    const results = runAll(shell, templates.flatMap((t) => values.map((v) => renderShell(t, { params: { v }, host }))));
    templates.forEach((t, k) => {
      const plain = results[k * values.length]!;
      payloads.forEach((payload, j) => {
        const got = results[k * values.length + 1 + j]!;
        expect(got.out, `${shell}: ${JSON.stringify(t)} with ${JSON.stringify(payload)}`).toBe(plain.out.replaceAll(TOKEN, () => payload));
        expect(got.status, `${shell}: ${JSON.stringify(t)} with ${JSON.stringify(payload)}`).toBe(plain.status);
      });
    });
    expect(existsSync(marker), `${shell}: a payload ran`).toBe(false);
  }
}

describe("shell templates against real shells", () => {
  it("finds the shells it runs", () => {
    expect(SHELLS.length).toBeGreaterThan(0);
  });

  it("refuses the template of the finding, and its relatives", () => {
    for (const t of [
      `echo "\${u-'}" '}" {{param.v}} '`,
      `echo "\${u:-'}" '}" {{param.v}} '`,
      `echo "\${u+'}" '}" {{param.v}} '`,
      `echo "\${u#'}" '}" {{param.v}} '`,
      `v=$(id -un; echo "\${u-'}") '}" {{param.v}} '`,
      `echo "\${u-"'"}" {{param.v}}`,
      `echo \${u-'}'} {{param.v}}`,
      "echo `echo '` {{param.v}} '`",
      `echo $'\\'' {{param.v}} '`,
      `echo $"'" {{param.v}}`,
      "cat <<E\n' {{param.v}}\nE",
      "cat <<'E'\n{{param.v}}\nE",
      "echo $(( 1 )) {{param.v}}",
      "(( 1 )) && echo {{param.v}}",
      `echo $(echo ')') {{param.v}} '`,
      "x=a\\\n#' {{param.v}} '",
      "echo a #' {{param.v}}",
      "echo '{{param.v}}'",
      'echo "{{param.v}}"',
      "echo \\{{param.v}}",
      "echo ${{param.v}}",
      "echo $[1] {{param.v}}",
      "[[ 1 -eq {{param.v}} ]]",
    ]) {
      expect(accepted(t), t).toBe(false);
    }
  });

  it("delivers the parameter as one literal word wherever it accepts one", () => {
    const good: string[] = [];
    for (const t of [
      "printf '<%s>\\n' {{param.v}}",
      "printf '<%s>\\n' x{{param.v}}y --opt={{param.v}} a#{{param.v}}",
      "v={{param.v}}; printf '<%s>\\n' \"$v\"",
      `printf '<%s>\\n' "\${HOME}" '}"' {{param.v}} "'" \${HOME} $HOME "$#"`,
      "x=a\\\nb; printf '<%s>\\n' \"$x\" {{param.v}} # {{{{ not a placeholder",
      "case {{param.v}} in *) printf '<%s>\\n' {{param.v}};; esac",
      "f() { printf '<%s>\\n' \"$1\"; }; f {{param.v}} | cat",
      "printf '<%s>\\n' {{param.v}} >&2 2>/dev/null; printf '<%s>\\n' {{param.v}}",
      // What follows the last placeholder is the shell's business alone.
      "printf '<%s>\\n' {{param.v}}; echo \"$(echo done)\" `echo x` $((1+1))",
      "printf '<%s>\\n' {{param.v}}; cat <<E\nhere $HOME\nE",
    ]) {
      expect(accepted(t), t).toBe(true);
      good.push(t);
    }
    checkLiteral(good);
    expect(run(SHELLS[0]!, renderShell("printf '<%s>' {{param.v}}", { params: { v: `'"$(x)` }, host })).out).toBe(`<'"$(x)>`);
  });

  it("keeps a value from running even where a script rewrites its own syntax at run time (aliases)", () => {
    // dash expands aliases in scripts: a lexer reading the text cannot know that `e` now opens a quote.
    const t = `c=ali; c=\${c}as; $c e="printf '<%s>\\n' '"\ne {{param.v}} '`;
    expect(accepted(t)).toBe(true);
    for (const shell of SHELLS) runAll(shell, PAYLOADS.map((v) => renderShell(t, { params: { v }, host })));
    expect(existsSync(marker)).toBe(false);
  });

  it("holds for 300 random templates built from fragments that confuse lexers (seeded)", () => {
    const FRAGMENTS = [
      " ", " ", "\n", ";", "&&", "|", "echo", "x", "a=b ", "'", '"', "`", "\\", "\\\n", "#", "$", "$x", "${x}", "${x-", "${x:-", "${#x}",
      "}", "$(", "$((", "(", ")", "((", "))", "<<E\n", "<<'E'\n", "<<-E\n", "\nE\n", "\tE\n", "$'", '$"', "'}\"", "\"'\"", "${u-'}",
      "\"${u-'}\"", "case x in x) ", ";;", "esac", "{ ", " }", "[[ ", " ]]", "\\'", '\\"', "$[", "<<<", ">", "<", "*", "~", "!", "=", "'a'", '"a"',
    ];
    let seed = 0x5eed1;
    const rand = (n: number) => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed % n;
    };
    const accepts: string[] = [];
    for (let i = 0; i < 300; i++) {
      const pick = (k: number) => Array.from({ length: k }, () => FRAGMENTS[rand(FRAGMENTS.length)]!).join("");
      const t = `${pick(1 + rand(6))}printf '<%s>\\n' {{param.v}}${pick(rand(4))}\n`;
      if (accepted(t)) accepts.push(t);
    }
    // The generator must exercise both outcomes.
    expect(accepts.length).toBeGreaterThan(20);
    expect(accepts.length).toBeLessThan(300);
    // /bin/sh only, the daemon's default interpreter: bash runs the hand-written cases above.
    checkLiteral(accepts, PAYLOADS.slice(0, 5), SHELLS.slice(0, 1));
  });
});
