/**
 * Per-host rendering of document steps. A template is text with placeholders
 * that are replaced by a parameter, the host's id or region, a label or a fact
 * — and nothing else: there are no expressions, loops, calls or includes, so
 * rendering can never run code, at the controller or on the host.
 *
 * ## Syntax
 *
 * ```text
 * {{ param.<name> }}           a document parameter (names as in params.ts)
 * {{ host.id }}                the host's id
 * {{ host.region }}            the host's region
 * {{ label.<key> }}            a label set by an operator
 * {{ fact.<key> }}             a fact, flattened as in query.ts (os, os.family, arch,
 *                              kernel, hostname, addresses, daemon.version, tools,
 *                              region, proxy, connected)
 * {{ <ref> | default "text" }} the text when the value is absent; "text" takes \" and \\
 * {{{{                         a literal "{{" ("}}" needs no escape)
 * ```
 *
 * Blanks inside the braces are optional. Anything else between `{{` and `}}`
 * is an error naming the placeholder. A value that is absent (a parameter not
 * given and without default, a label or fact the host lacks) is an error
 * unless the placeholder has `| default`. Values containing NUL are refused.
 *
 * ## Three ways to render, by where the text goes
 *
 * - {@link renderText}: argv elements, file paths, environment values. The
 *   value goes in as-is; a list is joined with ",".
 * - {@link renderArgv}: an exec step's argv; an element that is exactly one
 *   placeholder of a list value becomes one element per item.
 * - {@link renderShell}: a script for `/bin/sh -c`. Each value is assigned,
 *   single-quoted ({@link shellQuote}), to a read-only shell variable before
 *   the script, and the placeholder becomes a double-quoted reference to it;
 *   a list becomes several such words. The script up to its last placeholder
 *   is checked by a lexer that knows a small part of the shell completely
 *   ({@link lexShell}): a placeholder inside quotes, `${…}`, a comment, or
 *   right after `\` or `$` is refused, and so is, before the last
 *   placeholder, anything the lexer does not fully understand (`$( )`,
 *   backquotes, `${` with an operator, arithmetic, `[[ ]]`, here-documents,
 *   `$'…'`). What no template check can prevent is a command that itself
 *   treats its argument as code (`eval`, `sh -c "$v"`, bash `let` or
 *   `declare -i`); a document that does that must restrict the parameter with
 *   a pattern or an `int` type.
 */
import { InvalidArgumentError } from "../common/errors.js";
import { LIMITS } from "../common/limits.js";
import type { ParamSpec, ParamValue } from "./params.js";
import { lookupField, type HostView } from "./query.js";

/** What a template is rendered against: the job's resolved parameters and one host. */
export type RenderContext = { params: Record<string, ParamValue>; host: HostView };

/** Longest template accepted, in characters. */
const MAX_TEMPLATE_LENGTH = LIMITS.templateChars;

type RefKind = "param" | "host" | "label" | "fact";

interface Ref {
  /** `param.x`, `host.id`, … as reported by {@link templateRefs}. */
  name: string;
  kind: RefKind;
  key: string;
  fallback: string | undefined;
  /** Offset of `{{` in the template, for messages. */
  at: number;
  /** The placeholder as written, for messages. */
  raw: string;
}

interface Parsed {
  segments: (string | Ref)[];
  refs: Ref[];
  /** Per placeholder, in order: whether it stands as a whole shell word. Computed on first shell use. */
  shellWords?: boolean[];
}

const PARAM_NAME = /^[A-Za-z][A-Za-z0-9_]{0,63}$/;
const KEY_NAME = /^[A-Za-z0-9_][A-Za-z0-9._/-]*$/;
const REF_CHAR = /[A-Za-z0-9._/-]/;
const HOST_KEYS = new Set(["id", "region"]);
const CACHE_LIMIT = 256;
const cache = new Map<string, Parsed>();

/**
 * Renders for places where no shell is involved: each value is inserted
 * as-is, a list joined with ",". Throws InvalidArgumentError naming an
 * unknown placeholder, an absent value or a value holding NUL.
 */
export function renderText(template: string, ctx: RenderContext): string {
  const parsed = parse(template);
  let out = "";
  for (const seg of parsed.segments) {
    if (typeof seg === "string") {
      out += seg;
    } else {
      const v = valueOf(seg, ctx);
      out += Array.isArray(v) ? v.join(",") : v;
    }
  }
  return out;
}

/** Shell variables that carry values into a rendered script: `rexmesh_v1`, `rexmesh_v2`, … */
const SHELL_VALUE_PREFIX = "rexmesh_v";

/**
 * Renders a script for `/bin/sh -c` (or bash, dash). Values never appear in
 * the script's text where it uses them: each one (each element of a list) is
 * assigned, single-quoted, to a read-only variable on a first statement
 * (`readonly rexmesh_v1='…' …;`), read before anything of the template, and
 * each placeholder becomes `"${rexmesh_v1}"` (a list: several such words,
 * and it must stand as a whole word). A variable's value is never parsed
 * again as code, even where a script changes its own syntax at run time
 * (dash expands aliases in scripts, which no lexer of the text can follow);
 * {@link lexShell} in addition refuses a placeholder anywhere it would not
 * be exactly one literal word.
 */
export function renderShell(template: string, ctx: RenderContext): string {
  const parsed = parse(template);
  const words = shellWords(parsed);
  const assignments: string[] = [];
  const variable = (value: string): string => {
    const name = `${SHELL_VALUE_PREFIX}${assignments.length + 1}`;
    assignments.push(`${name}=${shellQuote(value)}`);
    return `"\${${name}}"`;
  };
  let out = "";
  let n = 0;
  for (const seg of parsed.segments) {
    if (typeof seg === "string") {
      out += seg;
      continue;
    }
    const v = valueOf(seg, ctx);
    if (Array.isArray(v)) {
      if (!words[n]) throw new InvalidArgumentError(`template: list placeholder ${show(seg)} at ${seg.at} must stand as a whole word in a shell script`);
      out += v.map(variable).join(" ");
    } else {
      out += variable(v);
    }
    n++;
  }
  return assignments.length === 0 ? out : `readonly ${assignments.join(" ")}; ${out}`;
}

/**
 * Renders an exec step's argv without any shell: each element with
 * {@link renderText}, except that an element consisting of exactly one
 * placeholder whose value is a list expands to one element per item (none for
 * an empty list), so `["rm", "--", "{{ param.files }}"]` passes each file as
 * its own argument.
 */
export function renderArgv(argv: readonly string[], ctx: RenderContext): string[] {
  const out: string[] = [];
  for (const element of argv) {
    const parsed = parse(element);
    const only = parsed.segments.length === 1 ? parsed.segments[0] : undefined;
    if (only !== undefined && typeof only !== "string") {
      const v = valueOf(only, ctx);
      if (Array.isArray(v)) out.push(...v);
      else out.push(v);
    } else {
      out.push(renderText(element, ctx));
    }
  }
  return out;
}

/**
 * Quotes one value as a single POSIX shell word: `'…'` with each `'` written
 * as `'\''`. Inside single quotes no character is special, so the word is the
 * value, byte for byte. NUL cannot be passed in an argument and is refused.
 */
export function shellQuote(value: string): string {
  if (value.includes("\0")) throw new InvalidArgumentError("a value passed to the shell contains a NUL byte");
  return `'${value.replaceAll("'", "'\\''")}'`;
}

/**
 * The placeholders a template uses (`param.x`, `host.id`, `label.k`,
 * `fact.os`, …), each once, in order of first use — for checking a document
 * at load time. Throws on a malformed or unknown placeholder.
 */
export function templateRefs(template: string): string[] {
  return [...new Set(parse(template).refs.map((r) => r.name))];
}

/**
 * Checks a template when a document is stored: every placeholder is known,
 * every `param.x` names a declared parameter, and, for a shell script, every
 * placeholder sits where quoting protects it and every list parameter stands
 * as a whole word. Rendering repeats the checks that depend on values.
 */
export function validateTemplate(template: string, mode: "text" | "shell", params: readonly ParamSpec[]): void {
  const parsed = parse(template);
  const types = new Map(params.map((p) => [p.name, p.type]));
  for (const ref of parsed.refs) {
    if (ref.kind === "param" && !types.has(ref.key)) {
      throw new InvalidArgumentError(`template: placeholder ${show(ref)} at ${ref.at} names no declared parameter`);
    }
  }
  if (mode === "shell") {
    const words = shellWords(parsed);
    parsed.refs.forEach((ref, n) => {
      if (ref.kind === "param" && types.get(ref.key) === "list" && !words[n]) {
        throw new InvalidArgumentError(`template: list placeholder ${show(ref)} at ${ref.at} must stand as a whole word in a shell script`);
      }
    });
  }
}

function valueOf(ref: Ref, ctx: RenderContext): string | string[] {
  let v: ParamValue | undefined;
  switch (ref.kind) {
    case "param":
      v = Object.hasOwn(ctx.params, ref.key) ? ctx.params[ref.key] : undefined;
      break;
    case "host":
      v = ref.key === "id" ? ctx.host.id : ctx.host.region;
      break;
    case "label":
    case "fact":
      v = lookupField(ctx.host, { scope: ref.kind, name: ref.key });
      break;
  }
  if (v === undefined) {
    if (ref.fallback === undefined) {
      const why =
        ref.kind === "param" ? "the parameter was not given and has no default" : `host ${JSON.stringify(ctx.host.id)} has no such ${ref.kind}`;
      throw new InvalidArgumentError(`template: placeholder ${show(ref)} has no value (${why}); add | default "…" to make it optional`);
    }
    v = ref.fallback;
  }
  const out = Array.isArray(v) ? [...v] : String(v);
  if ((Array.isArray(out) ? out : [out]).some((s) => s.includes("\0"))) {
    throw new InvalidArgumentError(`template: the value of ${show(ref)} contains a NUL byte`);
  }
  return out;
}

function show(ref: Ref): string {
  return JSON.stringify(ref.raw.length > 80 ? `${ref.raw.slice(0, 80)}…` : ref.raw);
}

function parse(template: string): Parsed {
  const hit = cache.get(template);
  if (hit) return hit;
  if (typeof template !== "string") throw new InvalidArgumentError("template: must be text");
  if (template.length > MAX_TEMPLATE_LENGTH) throw new InvalidArgumentError(`template: longer than ${MAX_TEMPLATE_LENGTH} characters`);
  if (template.includes("\0")) throw new InvalidArgumentError("template: contains a NUL byte");
  const segments: (string | Ref)[] = [];
  const refs: Ref[] = [];
  let text = "";
  let i = 0;
  while (i < template.length) {
    const open = template.indexOf("{{", i);
    if (open < 0) {
      text += template.slice(i);
      break;
    }
    text += template.slice(i, open);
    if (template.startsWith("{{{{", open)) {
      text += "{{";
      i = open + 4;
      continue;
    }
    const [ref, end] = parseRef(template, open);
    if (text !== "") segments.push(text);
    text = "";
    segments.push(ref);
    refs.push(ref);
    i = end;
  }
  if (text !== "") segments.push(text);
  const parsed: Parsed = { segments, refs };
  if (cache.size >= CACHE_LIMIT) cache.delete(cache.keys().next().value!);
  cache.set(template, parsed);
  return parsed;
}

/** Parses the placeholder whose `{{` is at `open`; returns it and the offset after its `}}`. */
function parseRef(t: string, open: number): [Ref, number] {
  const close = t.indexOf("}}", open + 2);
  const fail = (why: string): never => {
    const raw = close < 0 ? t.slice(open, open + 40) : t.slice(open, close + 2);
    throw new InvalidArgumentError(`template: ${why} ${JSON.stringify(raw.length > 80 ? `${raw.slice(0, 80)}…` : raw)} at ${open}`);
  };
  if (close < 0) fail(`"{{" is never closed by "}}" (write "{{{{" for a literal "{{"):`);
  let k = open + 2;
  const blanks = (): void => {
    while (t[k] === " " || t[k] === "\t") k++;
  };
  blanks();
  const nameStart = k;
  while (k < t.length && REF_CHAR.test(t[k]!)) k++;
  const name = t.slice(nameStart, k);
  blanks();
  let fallback: string | undefined;
  if (t[k] === "|") {
    k++;
    blanks();
    if (!t.startsWith("default", k)) fail('expected `| default "text"` in placeholder');
    k += "default".length;
    blanks();
    if (t[k] !== '"') fail('expected a quoted text after "default" in placeholder');
    k++;
    fallback = "";
    for (;;) {
      const c = t[k];
      if (c === undefined) return fail("unterminated default text in placeholder");
      if (c === '"') break;
      if (c === "\\") {
        const n = t[k + 1];
        if (n !== '"' && n !== "\\") fail('only \\" and \\\\ escapes are allowed in default text in placeholder');
        fallback += n;
        k += 2;
        continue;
      }
      fallback += c;
      k++;
    }
    k++;
    blanks();
  }
  if (!t.startsWith("}}", k)) fail("expected }} to end placeholder");
  const end = k + 2;
  const raw = t.slice(open, end);
  const dot = name.indexOf(".");
  const kind = name.slice(0, dot);
  const key = name.slice(dot + 1);
  const known =
    dot > 0 &&
    ((kind === "param" && PARAM_NAME.test(key)) ||
      (kind === "host" && HOST_KEYS.has(key)) ||
      ((kind === "label" || kind === "fact") && KEY_NAME.test(key)));
  if (!known) {
    throw new InvalidArgumentError(
      `template: unknown placeholder ${JSON.stringify(raw)} at ${open}: use param.<name>, host.id, host.region, label.<key> or fact.<key>`,
    );
  }
  return [{ name, kind: kind as RefKind, key, fallback, at: open, raw }, end];
}

function shellWords(parsed: Parsed): boolean[] {
  parsed.shellWords ??= parsed.refs.length === 0 ? [] : lexShell(parsed);
  return parsed.shellWords;
}

const WORD_EDGE = " \t\n;&|()";
const OPERATOR = ";&|()<>";
const NAME_START = /[A-Za-z_]/;
const NAME_CHAR = /[A-Za-z0-9_]/;
/** What may stand between `${` and `}`: a name, a positional or special parameter, optionally its length. */
const PLAIN_BRACED = /^#?(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+|[@*#?$!-])$/;

/**
 * Checks where the placeholders of a shell script land, with a lexer that
 * understands a small part of the POSIX shell language completely and
 * refuses everything else. It reads the script (each placeholder a NUL, which
 * a template may not contain) up to its LAST placeholder — what follows
 * cannot change how an earlier word was read — and knows only: blanks and
 * operators, words, backslash escapes and line continuations, single quotes,
 * double quotes, `$name`, `${name}` and `${#name}` (also inside double
 * quotes), and comments. A placeholder must stand in a plain word: not in
 * quotes, not after `\` or `$`, not in a comment. Anything else before the
 * last placeholder — `$( )`, backquotes, `${` with an operator, `$(( ))`,
 * `(( ))`, `[[ ]]`, here-documents, `$'…'`, `$"…"`, `$[ ]` — is refused
 * with the reason: where the shell's reading depends on its dialect or on
 * nesting, the lexer does not guess. Returns, per placeholder, whether it is
 * a whole word (for lists).
 */
function lexShell(parsed: Parsed): boolean[] {
  const s = parsed.segments.map((seg) => (typeof seg === "string" ? seg : "\0")).join("");
  const end = s.lastIndexOf("\0") + 1;
  const words: boolean[] = [];
  let i = 0;
  /** Whether the next character starts a word (so that `#` starts a comment). */
  let wordStart = true;
  const bad = (why: string): never => {
    const ref = parsed.refs[words.length]!;
    throw new InvalidArgumentError(
      `template: placeholder ${show(ref)} at ${ref.at} is ${why}; in a shell script a placeholder must stand outside quotes (each value is quoted for you)`,
    );
  };
  const unsure = (what: string, at: number): never => {
    const ref = parsed.refs[words.length]!;
    throw new InvalidArgumentError(
      `template: ${what} at ${at} comes before placeholder ${show(ref)}; a shell script may use it only after its last placeholder ` +
        "(pass the value through a variable first: v={{ param.x }} … \"$v\")",
    );
  };
  /** `$` at i; returns the index after what it starts. */
  const dollar = (quoted: boolean): number => {
    const n = s[i + 1];
    if (n === "\0") bad('right after "$"');
    if (n === "(") unsure(s[i + 2] === "(" ? "arithmetic $(( ))" : "command substitution $( )", i);
    if (n === "[") unsure('arithmetic "$["', i);
    if (n === "{") {
      const close = s.indexOf("}", i + 2);
      const inner = close < 0 ? s.slice(i + 2) : s.slice(i + 2, close);
      if (inner.includes("\0")) bad("inside ${…}");
      if (close < 0 || !PLAIN_BRACED.test(inner)) unsure("a parameter expansion with an operator ${…}", i);
      return close + 1;
    }
    if (!quoted && (n === "'" || n === '"')) unsure(n === "'" ? "$'…' quoting" : '$"…" quoting', i);
    if (n !== undefined && NAME_START.test(n)) {
      let j = i + 2;
      while (j < s.length && NAME_CHAR.test(s[j]!)) j++;
      return j;
    }
    if (n !== undefined && /[0-9@*#?$!-]/.test(n)) return i + 2;
    return i + 1;
  };

  while (i < end) {
    const c = s[i]!;
    if (c === "\0") {
      const prev = s[i - 1];
      const next = s[i + 1];
      words.push((prev === undefined || WORD_EDGE.includes(prev)) && (next === undefined || WORD_EDGE.includes(next)));
      wordStart = false;
      i++;
      continue;
    }
    switch (c) {
      case "\\":
        if (s[i + 1] === "\0") bad("right after a backslash");
        // A line continuation joins two lines into one word: it changes nothing.
        if (s[i + 1] !== "\n") wordStart = false;
        i += 2;
        break;
      case "'": {
        const close = s.indexOf("'", i + 1);
        if ((close < 0 ? s.slice(i + 1) : s.slice(i + 1, close)).includes("\0")) bad("inside single quotes");
        i = close < 0 ? s.length : close + 1;
        wordStart = false;
        break;
      }
      case '"':
        i = doubleQuoted(i + 1);
        wordStart = false;
        break;
      case "$":
        i = dollar(false);
        wordStart = false;
        break;
      case "`":
        unsure("a backquoted command", i);
        break;
      case "#":
        if (wordStart) {
          const nl = s.indexOf("\n", i);
          if ((nl < 0 ? s.slice(i) : s.slice(i, nl)).includes("\0")) bad("inside a comment");
          i = nl < 0 ? s.length : nl;
        } else i++;
        break;
      case "<":
        if (s[i + 1] === "<") unsure("a here-document", i);
        wordStart = true;
        i++;
        break;
      case "(":
        if (s[i + 1] === "(") unsure("arithmetic (( ))", i);
        wordStart = true;
        i++;
        break;
      case "[":
        if (wordStart && s[i + 1] === "[") unsure("[[ ]]", i);
        wordStart = false;
        i++;
        break;
      default:
        wordStart = c === " " || c === "\t" || c === "\n" || OPERATOR.includes(c);
        i++;
    }
  }
  return words;

  /** Skips a double-quoted string whose content starts at j; returns the index after its closing quote. */
  function doubleQuoted(j: number): number {
    i = j;
    while (i < s.length) {
      const c = s[i]!;
      if (c === "\0") bad("inside double quotes");
      if (c === '"') return i + 1;
      if (c === "\\") i += 2;
      else if (c === "$") i = dollar(true);
      else if (c === "`") unsure("a backquoted command", i);
      else i++;
    }
    return i;
  }
}
