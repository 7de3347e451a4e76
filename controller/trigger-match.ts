/**
 * The match language of triggers (docs/triggers.md): `key=value` and
 * `key!=value` terms joined by `and`. `kind` is the event's kind; any
 * other key names one of its details. A value is a bare word (no spaces,
 * quotes or `=`) or a double-quoted string (`\"` and `\\` escape). Parsed
 * strictly, in one linear pass; every problem is INVALID_ARGUMENT naming
 * where it is.
 */
import { InvalidArgumentError } from "../common/errors.js";
import { LIMITS, preview } from "../common/limits.js";

export interface MatchTerm {
  key: string;
  negated: boolean;
  value: string;
}

/** What a match looks at: an event's kind and details. */
export interface Matchable {
  kind: string;
  details: Readonly<Record<string, string>>;
}

const KEY = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;

function bad(expr: string, why: string): InvalidArgumentError {
  return new InvalidArgumentError(`match expression ${preview(expr, 80)}: ${why}`);
}

/** Parses a match expression; INVALID_ARGUMENT naming what is wrong. */
export function parseMatch(expr: string): MatchTerm[] {
  if (expr.length > LIMITS.triggerMatchChars) throw bad(expr, `longer than ${LIMITS.triggerMatchChars} characters (${expr.length})`);
  const terms: MatchTerm[] = [];
  let i = 0;
  const n = expr.length;
  const skipSpace = () => {
    while (i < n && /\s/.test(expr[i]!)) i++;
  };
  skipSpace();
  if (i === n) throw bad(expr, "it is empty; write terms like kind=service.failed and unit=nginx.service");
  for (;;) {
    // key
    const keyStart = i;
    while (i < n && /[A-Za-z0-9._-]/.test(expr[i]!)) i++;
    const key = expr.slice(keyStart, i);
    if (key === "") throw bad(expr, `expected a key at column ${i + 1}, found ${preview(expr.slice(i, i + 10))}`);
    if (!KEY.test(key) || key.length > LIMITS.eventNameChars) throw bad(expr, `${preview(key)} is not a key (letters, digits, '.', '_', '-'; at most ${LIMITS.eventNameChars})`);
    // operator
    let negated = false;
    if (expr.startsWith("!=", i)) {
      negated = true;
      i += 2;
    } else if (expr[i] === "=") i += 1;
    else throw bad(expr, `expected = or != after ${preview(key)} at column ${i + 1}`);
    // value
    let value = "";
    if (expr[i] === '"') {
      i++;
      let closed = false;
      while (i < n) {
        const c = expr[i]!;
        if (c === "\\" && i + 1 < n && (expr[i + 1] === '"' || expr[i + 1] === "\\")) {
          value += expr[i + 1];
          i += 2;
        } else if (c === '"') {
          i++;
          closed = true;
          break;
        } else {
          value += c;
          i++;
        }
      }
      if (!closed) throw bad(expr, `the quoted value of ${preview(key)} is not closed`);
    } else {
      const start = i;
      while (i < n && !/[\s"=!]/.test(expr[i]!)) i++;
      value = expr.slice(start, i);
      if (value === "") throw bad(expr, `${preview(key)} has no value at column ${i + 1} (quote an empty or spaced value: key="")`);
    }
    if (value.length > LIMITS.eventDetailValueChars) throw bad(expr, `the value of ${preview(key)} is longer than ${LIMITS.eventDetailValueChars} characters`);
    terms.push({ key, negated, value });
    if (terms.length > LIMITS.triggerMatchTerms) throw bad(expr, `more than ${LIMITS.triggerMatchTerms} terms`);
    const before = i;
    skipSpace();
    if (i === n) break;
    if (i === before) throw bad(expr, `expected a space and 'and' after the value of ${preview(key)} at column ${i + 1}`);
    if (!/^and(\s|$)/i.test(expr.slice(i, i + 4))) throw bad(expr, `expected 'and' at column ${i + 1}, found ${preview(expr.slice(i, i + 10))} (terms are joined by 'and' only)`);
    i += 3;
    skipSpace();
    if (i === n) throw bad(expr, "it ends with 'and'");
  }
  return terms;
}

/** Whether an event matches every term. A detail the event lacks equals no value (so `key!=v` holds). */
export function matches(terms: readonly MatchTerm[], event: Matchable): boolean {
  for (const t of terms) {
    const actual = t.key === "kind" ? event.kind : Object.hasOwn(event.details, t.key) ? event.details[t.key] : undefined;
    if ((actual === t.value) === t.negated) return false;
  }
  return true;
}
