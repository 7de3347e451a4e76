/**
 * The host query language: how an operator (`rexmesh run -t …`,
 * `rexmesh hosts -t …`) and an authorization rule (a role's host selector)
 * name a set of hosts by their labels, facts and ids. Queries are parsed once
 * at submit time into a plain-data AST and evaluated at the controller, so the
 * same AST can be combined with a role's selector (`{ kind: "and", items: [q,
 * selector] }`), logged with {@link formatQuery} and matched against every
 * host of the tenant without re-parsing.
 *
 * ## Grammar
 *
 * ```text
 * query      := or-expr END
 * or-expr    := and-expr ( "or" and-expr )*         -- "and" binds tighter than "or"
 * and-expr   := unary ( "and" unary )*
 * unary      := "not" unary | primary               -- "not" binds tighter than "and"
 * primary    := "(" or-expr ")"
 *             | "all"                               -- every host, on purpose
 *             | "has" key                           -- the key exists on the host
 *             | "#" host-id                         -- shorthand for: id = host-id
 *             | key "=" value | key "!=" value      -- exact, case-sensitive
 *             | key "~" value | key "!~" value      -- glob: * any run, ? one character
 *             | key "in" list | key "not" "in" list
 * list       := "(" value ( "," value )* ")"        -- at least one value
 * key        := id | region | proxy | connected     -- the host itself (see below)
 *             | "label." name | "fact." name        -- explicit namespace
 *             | name                                -- a label if the host has it, else a fact
 * name       := [A-Za-z0-9_] [A-Za-z0-9._/-]*
 * value      := word | string
 * word       := [A-Za-z0-9._:/*?-]+ that is not a keyword
 * string     := '"' ( any character but " and \ | '\"' | '\\' )* '"'
 * keywords   := and or not in has all               -- lowercase only; quote them as values
 * ```
 *
 * Blanks (spaces, tabs, newlines) separate tokens and are otherwise ignored.
 * Everything is case-sensitive, keywords included.
 *
 * ## Semantics, and why
 *
 * - `=` is always exact, even when the value contains `*` or `?`; glob
 *   matching is only ever asked for with `~`, so a host id or label value that
 *   happens to contain `*` can still be matched literally.
 * - Facts are flattened as in {@link HostView}: `os`, `os.family`, `arch`,
 *   `kernel`, `hostname`, `addresses` (list), `daemon.version`, `tools` (list),
 *   plus `region`, `proxy` and `connected` (`"true"`/`"false"`).
 * - `id`, `region`, `proxy` and `connected` always mean the host's own values,
 *   never a label of that name: they are known to the controller rather than
 *   set by an operator or reported by a daemon, so a selector written with them
 *   (an authorization scope, typically) cannot be widened by labelling a host.
 *   `label.region` reaches a label called `region`.
 * - Any other bare name is looked up among the labels first, then the facts
 *   (labels are how operators override what they want to target by);
 *   `label.x` and `fact.x` name one namespace only.
 * - A list-valued fact (`addresses`, `tools`) matches `=`, `~` and `in` when
 *   any element matches.
 * - The negated forms are exact negations: `k != v` is `not k = v`,
 *   `k not in (…)` is `not k in (…)`, `k !~ p` is `not k ~ p`. So a host
 *   without the key matches `!=`, `not in` and `!~` and never `=`, `in` or
 *   `~`; a list fact matches `!=` only when no element equals the value.
 * - An empty query is an error (“expected a condition”): selecting every host
 *   must be written `all`, so that a forgotten `-t` never fans out a job to a
 *   whole tenant.
 * - A query is at most {@link MAX_QUERY_LENGTH} characters, nests
 *   parentheses and `not` at most {@link MAX_QUERY_DEPTH} deep, and each glob
 *   is at most {@link MAX_GLOB_LENGTH} characters; these limits keep the parser
 *   and the matcher bounded on hostile input. No regular expression is ever
 *   built from a query.
 */
import { InvalidArgumentError } from "../common/errors.js";
import { LIMITS } from "../common/limits.js";
import type { HostRecord } from "./model.js";

/** Longest query accepted, in characters (UTF-16 code units). */
export const MAX_QUERY_LENGTH = LIMITS.queryChars;
/** Deepest nesting of parentheses and `not` accepted. */
export const MAX_QUERY_DEPTH = LIMITS.queryDepth;
/**
 * Longest `~`/`!~` glob. Matching costs at most (longest run between two
 * `*`) × (value length) per host and value; with values capped by the fact
 * and label limits, that keeps a query over a whole tenant bounded.
 */
const MAX_GLOB_LENGTH = LIMITS.globChars;

/** Where a key is looked up; see the module documentation for the order. */
export type QueryScope = "host" | "label" | "fact" | "auto";

/** A key as written: `id` → host, `label.env` → label, `fact.os` → fact, `env` → auto. */
export interface QueryField {
  scope: QueryScope;
  name: string;
}

/**
 * A parsed query: plain data (JSON-serializable), so it can be stored with a
 * job, combined with an authorization selector by wrapping both in an `and`,
 * and printed back with {@link formatQuery}.
 */
export type Query =
  | { kind: "all" }
  | { kind: "and"; items: Query[] }
  | { kind: "or"; items: Query[] }
  | { kind: "not"; item: Query }
  | { kind: "has"; field: QueryField }
  | { kind: "cmp"; field: QueryField; op: "=" | "!=" | "~" | "!~"; value: string }
  | { kind: "in"; field: QueryField; negated: boolean; values: string[] };

/**
 * What a query (and a template) sees of a host: labels as set by operators and
 * facts flattened to dotted names, list facts kept as lists. Built once per
 * host with {@link hostView} so that matching and rendering agree on names.
 */
export interface HostView {
  id: string;
  region: string;
  labels: Record<string, string>;
  facts: Record<string, string | string[]>;
}

/**
 * A query the parser refused. `position` is the 0-based character index of
 * the offending token; `pointer` is the query line and a caret under that
 * position, ready to print under a CLI error message.
 */
export class QuerySyntaxError extends InvalidArgumentError {
  readonly position: number;
  readonly pointer: string;
  constructor(text: string, position: number, problem: string) {
    super(`at ${position}: ${problem}`);
    this.position = position;
    this.pointer = caretPointer(text, position);
  }
}

const HOST_FIELDS = new Set(["id", "region", "proxy", "connected"]);
const KEYWORDS = new Set(["and", "or", "not", "in", "has", "all"]);
const NAME = /^[A-Za-z0-9_][A-Za-z0-9._/-]*$/;
const WORD_CHAR = /[A-Za-z0-9._:/*?-]/;
const BLANK = /[ \t\r\n]/;

type Token =
  | { t: "word" | "string" | "hash"; v: string; pos: number; end: number }
  | { t: "op"; v: "=" | "!=" | "~" | "!~"; pos: number; end: number }
  | { t: "(" | ")" | "," | "eof"; pos: number; end: number };

/**
 * Parses a query. Throws {@link QuerySyntaxError} (an InvalidArgumentError)
 * that says where and what was expected, or InvalidArgumentError when the
 * query is longer than {@link MAX_QUERY_LENGTH}.
 */
export function parseQuery(text: string): Query {
  if (text.length > MAX_QUERY_LENGTH) {
    throw new InvalidArgumentError(`query is longer than ${MAX_QUERY_LENGTH} characters`);
  }
  return new Parser(text).parse();
}

class Parser {
  private at = 0;
  private ahead: Token | undefined;
  private depth = 0;

  constructor(private readonly text: string) {}

  parse(): Query {
    const q = this.orExpr();
    const tok = this.peek();
    if (tok.t !== "eof") {
      const expected = tok.t === ")" ? `"and", "or" or end of query (this ")" closes nothing)` : `"and", "or" or end of query`;
      this.fail(tok, `expected ${expected} but found ${this.show(tok)}`);
    }
    return q;
  }

  private orExpr(): Query {
    const items = [this.andExpr()];
    while (this.isWord(this.peek(), "or")) {
      this.take();
      items.push(this.andExpr('"or"'));
    }
    return items.length === 1 ? items[0]! : { kind: "or", items };
  }

  private andExpr(after?: string): Query {
    const items = [this.unary(after)];
    while (this.isWord(this.peek(), "and")) {
      this.take();
      items.push(this.unary('"and"'));
    }
    return items.length === 1 ? items[0]! : { kind: "and", items };
  }

  private unary(after?: string): Query {
    const tok = this.peek();
    if (this.isWord(tok, "not")) {
      this.take();
      this.enter(tok);
      const item = this.unary('"not"');
      this.depth--;
      return { kind: "not", item };
    }
    return this.primary(after);
  }

  private primary(after?: string): Query {
    const tok = this.take();
    const expected = `expected a condition${after ? ` after ${after}` : ""}`;
    switch (tok.t) {
      case "(": {
        this.enter(tok);
        const inner = this.orExpr();
        this.depth--;
        const close = this.take();
        if (close.t !== ")") this.fail(close, `expected ")" to close the "(" at ${tok.pos} but found ${this.show(close)}`);
        return inner;
      }
      case "hash":
        return { kind: "cmp", field: { scope: "host", name: "id" }, op: "=", value: tok.v };
      case "word": {
        if (tok.v === "all") return { kind: "all" };
        if (tok.v === "has") return { kind: "has", field: this.field(this.take(), '"has"') };
        if (KEYWORDS.has(tok.v)) this.fail(tok, `${expected} but found ${this.show(tok)}`);
        const field = this.field(tok, undefined, expected);
        return this.comparison(field, tok);
      }
      default:
        return this.fail(tok, `${expected} but found ${this.show(tok)}`);
    }
  }

  private comparison(field: QueryField, keyTok: Token): Query {
    const key = this.text.slice(keyTok.pos, keyTok.end);
    const tok = this.take();
    if (tok.t === "op") {
      const valueTok = this.take();
      const value = this.value(valueTok, `after "${tok.v}"`);
      if ((tok.v === "~" || tok.v === "!~") && value.length > MAX_GLOB_LENGTH) {
        this.fail(valueTok, `a glob is at most ${MAX_GLOB_LENGTH} characters (this one has ${value.length})`);
      }
      return { kind: "cmp", field, op: tok.v, value };
    }
    if (this.isWord(tok, "in")) return { kind: "in", field, negated: false, values: this.list() };
    if (this.isWord(tok, "not")) {
      const inTok = this.take();
      if (!this.isWord(inTok, "in")) this.fail(inTok, `expected "in" after "${key} not" but found ${this.show(inTok)}`);
      return { kind: "in", field, negated: true, values: this.list() };
    }
    return this.fail(tok, `expected "=", "!=", "~", "!~", "in" or "not in" after "${key}" but found ${this.show(tok)}`);
  }

  private list(): string[] {
    const open = this.take();
    if (open.t !== "(") this.fail(open, `expected "(" after "in" but found ${this.show(open)}`);
    const values = [this.value(this.take(), "in the list")];
    for (;;) {
      const tok = this.take();
      if (tok.t === ")") return values;
      if (tok.t !== ",") this.fail(tok, `expected "," or ")" in the list opened at ${open.pos} but found ${this.show(tok)}`);
      values.push(this.value(this.take(), "in the list"));
    }
  }

  private value(tok: Token, where: string): string {
    if (tok.t === "string") return tok.v;
    if (tok.t === "word" && !KEYWORDS.has(tok.v)) return tok.v;
    const hint = tok.t === "word" ? ` (quote it to use it as a value: "${tok.v}")` : "";
    return this.fail(tok, `expected a value ${where} but found ${this.show(tok)}${hint}`);
  }

  private field(tok: Token, after?: string, expected?: string): QueryField {
    const what = expected ?? `expected a key${after ? ` after ${after}` : ""}`;
    if (tok.t !== "word" || KEYWORDS.has(tok.v)) this.fail(tok, `${what} but found ${this.show(tok)}`);
    const word = tok.v;
    for (const [prefix, scope] of [["label.", "label"], ["fact.", "fact"]] as const) {
      if (word.startsWith(prefix)) {
        const name = word.slice(prefix.length);
        if (!NAME.test(name)) this.fail(tok, `expected a ${scope} name after "${prefix}" but found ${this.show(tok)}`);
        return { scope, name };
      }
    }
    if (!NAME.test(word)) this.fail(tok, `${what} but found ${this.show(tok)} (keys use letters, digits, ".", "_", "-" and "/")`);
    return { scope: HOST_FIELDS.has(word) ? "host" : "auto", name: word };
  }

  private enter(tok: Token): void {
    if (++this.depth > MAX_QUERY_DEPTH) this.fail(tok, `nesting deeper than ${MAX_QUERY_DEPTH} levels`);
  }

  private isWord(tok: Token, v: string): boolean {
    return tok.t === "word" && tok.v === v;
  }

  private show(tok: Token): string {
    if (tok.t === "eof") return "end of query";
    const raw = this.text.slice(tok.pos, tok.end);
    return raw.length > 40 ? `${JSON.stringify(raw.slice(0, 40))}…` : JSON.stringify(raw);
  }

  private fail(tok: Token | number, problem: string): never {
    throw new QuerySyntaxError(this.text, typeof tok === "number" ? tok : tok.pos, problem);
  }

  private peek(): Token {
    this.ahead ??= this.lex();
    return this.ahead;
  }

  private take(): Token {
    const tok = this.peek();
    this.ahead = undefined;
    return tok;
  }

  private lex(): Token {
    const s = this.text;
    while (this.at < s.length && BLANK.test(s[this.at]!)) this.at++;
    const pos = this.at;
    const c = s[pos];
    if (c === undefined) return { t: "eof", pos, end: pos };
    if (c === "(" || c === ")" || c === ",") {
      this.at++;
      return { t: c, pos, end: this.at };
    }
    if (c === "=" || c === "~") {
      this.at++;
      return { t: "op", v: c, pos, end: this.at };
    }
    if (c === "!") {
      const n = s[pos + 1];
      if (n !== "=" && n !== "~") this.fail(pos, `expected "!=" or "!~" but found ${JSON.stringify(s.slice(pos, pos + 2))}`);
      this.at += 2;
      return { t: "op", v: n === "=" ? "!=" : "!~", pos, end: this.at };
    }
    if (c === '"') return this.lexString(pos);
    if (c === "#") {
      this.at++;
      const v = this.lexWord();
      if (v === "") this.fail(pos + 1, `expected a host id right after "#" but found ${this.describeChar(pos + 1)}`);
      return { t: "hash", v, pos, end: this.at };
    }
    if (WORD_CHAR.test(c)) {
      const v = this.lexWord();
      return { t: "word", v, pos, end: this.at };
    }
    const cp = String.fromCodePoint(s.codePointAt(pos)!);
    return this.fail(pos, `unexpected character ${JSON.stringify(cp)}`);
  }

  private lexWord(): string {
    const start = this.at;
    while (this.at < this.text.length && WORD_CHAR.test(this.text[this.at]!)) this.at++;
    return this.text.slice(start, this.at);
  }

  private lexString(pos: number): Token {
    const s = this.text;
    let out = "";
    let i = pos + 1;
    for (;;) {
      const c = s[i];
      if (c === undefined) this.fail(pos, `unterminated string: no closing '"' for the '"' at ${pos}`);
      if (c === '"') break;
      if (c === "\\") {
        const n = s[i + 1];
        if (n !== '"' && n !== "\\") {
          this.fail(i, `invalid escape ${JSON.stringify(s.slice(i, i + 2))} in a string: only \\" and \\\\ are allowed`);
        }
        out += n;
        i += 2;
        continue;
      }
      out += c;
      i++;
    }
    this.at = i + 1;
    return { t: "string", v: out, pos, end: this.at };
  }

  private describeChar(i: number): string {
    const c = this.text[i];
    return c === undefined ? "end of query" : JSON.stringify(c);
  }
}

/** The line of `text` holding `position`, and a caret under it (long lines are cut around it). */
function caretPointer(text: string, position: number): string {
  const lineStart = text.lastIndexOf("\n", position - 1) + 1;
  const nl = text.indexOf("\n", position);
  let line = text.slice(lineStart, nl === -1 ? text.length : nl);
  let col = position - lineStart;
  const WINDOW = 60;
  if (line.length > 2 * WINDOW) {
    const from = Math.max(0, col - WINDOW);
    const to = Math.min(line.length, col + WINDOW);
    const head = from > 0 ? "…" : "";
    line = head + line.slice(from, to) + (to < line.length ? "…" : "");
    col = col - from + head.length;
  }
  const pad = line.slice(0, col).replace(/[^\t]/g, " ");
  return `${line}\n${pad}^`;
}

/**
 * The view queries and templates see of a host. Empty facts (a daemon that
 * has not reported, or reported nothing for a field) are left out, so that
 * `has os` means “the daemon told us its os”.
 */
export function hostView(h: HostRecord): HostView {
  const facts: Record<string, string | string[]> = {};
  const put = (k: string, v: string | string[] | undefined): void => {
    if (v !== undefined && v.length > 0) facts[k] = Array.isArray(v) ? [...v] : v;
  };
  const f = h.facts;
  if (f) {
    put("os", f.os);
    put("os.family", f.osFamily);
    put("arch", f.arch);
    put("kernel", f.kernel);
    put("hostname", f.hostname);
    put("addresses", f.addresses);
    put("daemon.version", f.daemonVersion);
    put("tools", f.tools);
  }
  put("region", h.region);
  put("proxy", h.proxy);
  facts.connected = h.connected ? "true" : "false";
  return { id: h.id, region: h.region, labels: { ...h.labels }, facts };
}

/**
 * Looks a field up on a host view; `undefined` when the host lacks it. Shared
 * with the template renderer so that `{{ fact.os }}` and `os = …` agree.
 */
export function lookupField(view: HostView, field: QueryField): string | string[] | undefined {
  switch (field.scope) {
    case "host":
      if (field.name === "id") return view.id;
      if (field.name === "region") return view.region;
      return own(view.facts, field.name);
    case "label":
      return own(view.labels, field.name);
    case "fact":
      return own(view.facts, field.name);
    case "auto":
      return own(view.labels, field.name) ?? own(view.facts, field.name);
  }
}

function own<V>(rec: Record<string, V>, key: string): V | undefined {
  return Object.hasOwn(rec, key) ? rec[key] : undefined;
}

/** Whether one host matches; pure, so it can be run for every host of a tenant. */
export function matchHost(q: Query, host: HostView): boolean {
  switch (q.kind) {
    case "all":
      return true;
    case "and":
      return q.items.every((item) => matchHost(item, host));
    case "or":
      return q.items.some((item) => matchHost(item, host));
    case "not":
      return !matchHost(q.item, host);
    case "has":
      return lookupField(host, q.field) !== undefined;
    case "cmp": {
      const values = asList(lookupField(host, q.field));
      const glob = q.op === "~" || q.op === "!~";
      const hit = glob ? values.some((v) => globMatch(q.value, v)) : values.includes(q.value);
      return q.op === "=" || q.op === "~" ? hit : !hit;
    }
    case "in": {
      const hit = asList(lookupField(host, q.field)).some((v) => q.values.includes(v));
      return q.negated ? !hit : hit;
    }
  }
}

/** The hosts matching `q`, in the order given. */
export function selectHosts(q: Query, hosts: Iterable<HostRecord>): HostRecord[] {
  const out: HostRecord[] = [];
  for (const h of hosts) if (matchHost(q, hostView(h))) out.push(h);
  return out;
}

function asList(v: string | string[] | undefined): readonly string[] {
  return v === undefined ? [] : Array.isArray(v) ? v : [v];
}

/**
 * Glob match over code points: `*` any run (including none), `?` exactly one.
 * Greedy with a single backtrack point, so it runs in O(pattern × value) at
 * worst — no regular expression, hence no catastrophic backtracking on a
 * hostile pattern like `*a*a*a*a*b`.
 */
export function globMatch(pattern: string, value: string): boolean {
  const p = Array.from(pattern);
  const s = Array.from(value);
  let pi = 0;
  let si = 0;
  let star = -1;
  let mark = 0;
  while (si < s.length) {
    const pc = p[pi];
    if (pc === "*") {
      star = pi++;
      mark = si;
    } else if (pc !== undefined && (pc === "?" || pc === s[si])) {
      pi++;
      si++;
    } else if (star >= 0) {
      pi = star + 1;
      si = ++mark;
    } else {
      return false;
    }
  }
  while (p[pi] === "*") pi++;
  return pi === p.length;
}

/**
 * Prints a query back in canonical form (single spaces, minimal parentheses,
 * values quoted only when they must be). `parseQuery(formatQuery(q))` equals
 * `q`, so the text is fit for audit records and `--dry-run` output.
 */
export function formatQuery(q: Query): string {
  return fmt(q, 0);
}

// Precedence: 0 = or, 1 = and, 2 = unary/primary.
function fmt(q: Query, ctx: number): string {
  switch (q.kind) {
    case "all":
      return "all";
    case "or": {
      const s = q.items.map((i) => fmt(i, 1)).join(" or ");
      return ctx > 0 ? `(${s})` : s;
    }
    case "and": {
      const s = q.items.map((i) => fmt(i, 2)).join(" and ");
      return ctx > 1 ? `(${s})` : s;
    }
    case "not":
      return `not ${fmt(q.item, 2)}`;
    case "has":
      return `has ${fmtField(q.field)}`;
    case "cmp":
      return `${fmtField(q.field)} ${q.op} ${fmtValue(q.value)}`;
    case "in":
      return `${fmtField(q.field)} ${q.negated ? "not in" : "in"} (${q.values.map(fmtValue).join(", ")})`;
  }
}

function fmtField(f: QueryField): string {
  return f.scope === "label" || f.scope === "fact" ? `${f.scope}.${f.name}` : f.name;
}

function fmtValue(v: string): string {
  if (v !== "" && !KEYWORDS.has(v) && [...v].every((c) => WORD_CHAR.test(c))) return v;
  return `"${v.replace(/[\\"]/g, (c) => `\\${c}`)}"`;
}
