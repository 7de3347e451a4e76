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
 * - {@link renderShell}: a script for `/bin/sh -c`. Each value is single-quoted
 *   ({@link shellQuote}); a list becomes several quoted words. Quoting only
 *   protects a value where the shell reads a plain word, so the script around
 *   each placeholder is lexed and a placeholder inside quotes, `${…}`,
 *   arithmetic, backquotes, a comment, a here-document, or right after `\` or
 *   `$` is refused with the reason. What quoting cannot prevent is a command
 *   that itself treats its argument as code (`eval`, `sh -c`, bash `let` or
 *   `[[ … -eq … ]]`); a document that does that must restrict the parameter
 *   with a pattern or an `int` type.
 */
import { InvalidArgumentError } from "../common/errors.js";
import type { ParamSpec, ParamValue } from "./params.js";
import { lookupField, type HostView } from "./query.js";

/** What a template is rendered against: the job's resolved parameters and one host. */
export type RenderContext = { params: Record<string, ParamValue>; host: HostView };

/** Longest template accepted, in characters. */
export const MAX_TEMPLATE_LENGTH = 1024 * 1024;

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

/**
 * Renders a script for `/bin/sh -c`: every value single-quoted, a list as
 * several quoted words (it must then stand as a whole word). Refuses a
 * placeholder where quoting would not protect it (see the module notes), so
 * that a parameter always reaches the command as literal words.
 */
export function renderShell(template: string, ctx: RenderContext): string {
  const parsed = parse(template);
  const words = shellWords(parsed);
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
      out += v.map(shellQuote).join(" ");
    } else {
      out += shellQuote(v);
    }
    n++;
  }
  return out;
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

type Frame =
  | { k: "cmd"; sub: boolean; depth: number }
  | { k: "param" | "arith"; depth: number }
  | { k: "sq" | "dq" | "ansi" | "bt" | "comment" };

const INSIDE: Record<Exclude<Frame["k"], "cmd">, string> = {
  sq: "inside single quotes",
  dq: "inside double quotes",
  ansi: "inside $'…' quotes",
  bt: "inside backquotes (use $( ) instead)",
  param: "inside ${…}",
  arith: "inside an arithmetic expression",
  comment: "inside a comment",
};
const WORD_BREAK = " \t\n;&|()<>";
const WORD_EDGE = " \t\n;&|()";

/**
 * A small POSIX shell lexer run over the script with each placeholder as a
 * NUL (the template itself may not contain NUL). It tracks only what changes
 * how the shell reads a word — quotes, escapes, `$(…)`, `${…}`, arithmetic,
 * backquotes, comments and here-documents — and refuses a placeholder
 * anywhere but a plain word. Where it cannot be sure (a here-document that
 * starts inside a nested construct, `case` inside `$(…)`, bash's `$[…]`), it refuses the
 * script rather than guess. Returns, per placeholder, whether it is a whole
 * word (for lists).
 */
function lexShell(parsed: Parsed): boolean[] {
  const s = parsed.segments.map((seg) => (typeof seg === "string" ? seg : "\0")).join("");
  const words: boolean[] = [];
  const stack: Frame[] = [{ k: "cmd", sub: false, depth: 0 }];
  const heredocs: { delim: string; strip: boolean }[] = [];
  let i = 0;
  const bad = (why: string): never => {
    const ref = parsed.refs[words.length]!;
    throw new InvalidArgumentError(
      `template: placeholder ${show(ref)} at ${ref.at} is ${why}; in a shell script a placeholder must stand outside quotes (each value is quoted for you)`,
    );
  };
  const unsure = (why: string): never => {
    throw new InvalidArgumentError(`template: cannot tell where placeholders land in this shell script: ${why}`);
  };
  const wordStart = (at: number): boolean => at === 0 || WORD_BREAK.includes(s[at - 1]!);
  const escape = (): void => {
    if (s[i + 1] === "\0") bad("right after a backslash");
    i += 2;
  };
  const dollar = (quoted: boolean): void => {
    const n = s[i + 1];
    if (n === "\0") bad('right after "$"');
    if (n === "[") unsure(`obsolete "$[" arithmetic at ${i}; write $(( ))`);
    if (n === "(" && s[i + 2] === "(") {
      stack.push({ k: "arith", depth: 0 });
      i += 3;
    } else if (n === "(") {
      stack.push({ k: "cmd", sub: true, depth: 0 });
      i += 2;
    } else if (n === "{") {
      stack.push({ k: "param", depth: 0 });
      i += 2;
    } else if (!quoted && n === "'") {
      stack.push({ k: "ansi" });
      i += 2;
    } else if (!quoted && n === '"') {
      stack.push({ k: "dq" });
      i += 2;
    } else {
      i++;
    }
  };

  while (i < s.length) {
    const c = s[i]!;
    const top = stack[stack.length - 1]!;
    if (c === "\0") {
      if (top.k !== "cmd") bad(INSIDE[top.k]);
      const prev = s[i - 1];
      const next = s[i + 1];
      words.push((prev === undefined || WORD_EDGE.includes(prev)) && (next === undefined || WORD_EDGE.includes(next)));
      i++;
      continue;
    }
    if (c === "\n" && heredocs.length > 0 && top.k !== "comment" && !(top.k === "cmd" && stack.length === 1)) {
      unsure("a here-document whose command line continues inside a nested or quoted construct");
    }
    switch (top.k) {
      case "sq":
        if (c === "'") stack.pop();
        i++;
        break;
      case "ansi":
        if (c === "\\") escape();
        else {
          if (c === "'") stack.pop();
          i++;
        }
        break;
      case "bt":
        if (c === "\\") escape();
        else {
          if (c === "`") stack.pop();
          i++;
        }
        break;
      case "comment":
        if (c === "\n") stack.pop();
        else i++;
        break;
      case "dq":
        if (c === "\\") escape();
        else if (c === "$") dollar(true);
        else {
          if (c === '"') stack.pop();
          else if (c === "`") stack.push({ k: "bt" });
          i++;
        }
        break;
      case "param":
      case "arith":
        if (c === "\\") escape();
        else if (c === "$") dollar(true);
        else {
          if (c === "'") stack.push({ k: "sq" });
          else if (c === '"') stack.push({ k: "dq" });
          else if (c === "`") stack.push({ k: "bt" });
          else if (top.k === "param" && c === "{") top.depth++;
          else if (top.k === "param" && c === "}") {
            if (top.depth === 0) stack.pop();
            else top.depth--;
          } else if (top.k === "arith" && c === "(") top.depth++;
          else if (top.k === "arith" && c === ")") {
            if (top.depth > 0) top.depth--;
            else if (s[i + 1] === ")") {
              stack.pop();
              i++;
            } else unsure(`"((" at ${i} that is not closed by "))"; write "( (" for nested subshells`);
          }
          i++;
        }
        break;
      case "cmd":
        if (c === "\\") escape();
        else if (c === "$") dollar(false);
        else if (c === "'") {
          stack.push({ k: "sq" });
          i++;
        } else if (c === '"') {
          stack.push({ k: "dq" });
          i++;
        } else if (c === "`") {
          stack.push({ k: "bt" });
          i++;
        } else if (c === "#" && wordStart(i)) {
          stack.push({ k: "comment" });
          i++;
        } else if (c === "(" && s[i + 1] === "(" && wordStart(i)) {
          stack.push({ k: "arith", depth: 0 });
          i += 2;
        } else if (c === "(") {
          top.depth++;
          i++;
        } else if (c === ")") {
          if (top.depth > 0) top.depth--;
          else if (top.sub) stack.pop();
          i++;
        } else if (c === "<" && s[i + 1] === "<") {
          if (s[i + 2] === "<") i += 3;
          else i = heredocOperator(i + 2);
        } else if (c === "\n" && heredocs.length > 0) {
          i = heredocBodies(i + 1);
        } else if (top.sub && c === "c" && wordStart(i) && /^case(?=[\s;&|()<>]|$)/.test(s.slice(i, i + 5))) {
          unsure(`"case" inside $( ) at ${i}; move it into a function or its own line`);
        } else {
          i++;
        }
        break;
    }
  }
  return words;

  /** Reads the delimiter after `<<` / `<<-` at `j`; returns where the command line resumes. */
  function heredocOperator(j: number): number {
    let strip = false;
    if (s[j] === "-") {
      strip = true;
      j++;
    }
    while (s[j] === " " || s[j] === "\t") j++;
    let delim = "";
    while (j < s.length && !WORD_BREAK.includes(s[j]!)) {
      const d = s[j]!;
      if (d === "\0") bad("in a here-document delimiter");
      if (d === "'" || d === '"') {
        const end = s.indexOf(d, j + 1);
        if (end < 0) unsure(`unterminated quote in the here-document delimiter at ${j}`);
        const part = s.slice(j + 1, end);
        if (part.includes("\0")) bad("in a here-document delimiter");
        delim += d === '"' ? part.replace(/\\([$`"\\])/g, "$1") : part;
        j = end + 1;
      } else if (d === "\\") {
        if (s[j + 1] === "\0") bad("in a here-document delimiter");
        delim += s[j + 1] ?? "";
        j += 2;
      } else {
        delim += d;
        j++;
      }
    }
    if (delim !== "") heredocs.push({ delim, strip });
    return j;
  }

  /** Skips the pending here-document bodies starting at `j`; none may hold a placeholder. */
  function heredocBodies(j: number): number {
    for (const doc of heredocs) {
      while (j < s.length) {
        const nl = s.indexOf("\n", j);
        const lineEnd = nl < 0 ? s.length : nl;
        const line = s.slice(j, lineEnd);
        j = nl < 0 ? s.length : nl + 1;
        if ((doc.strip ? line.replace(/^\t+/, "") : line) === doc.delim) break;
        if (line.includes("\0")) bad("inside a here-document");
      }
    }
    heredocs.length = 0;
    return j;
  }
}
