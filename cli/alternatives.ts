/**
 * `rexmesh run --alt`: one step offered in several ways, each host taking
 * the first way that fits it (docs/tools.md). The alternatives travel as an
 * inline document (SubmitJobRequest.document_content), so the controller
 * renders, authorizes and rejects them exactly as it does a stored
 * document's `alternatives:`.
 *
 *   --alt 'TOOL[ when QUERY]: BODY'
 *
 *   exec: WORD...             argv split on blanks, or a JSON array of strings
 *   shell: SCRIPT             run by /bin/sh -c
 *   python: SOURCE            run by the host's python3
 *   python: @FILE [ARG...]    a local file's source, with arguments
 *   ansible: MODULE [K=V...]  one module, with its arguments
 *   ansible: @FILE [K=V...]   a local playbook, with extra variables
 *
 * A host takes an alternative when it reports the tool (facts.tools) and
 * matches the `when` query (which cannot contain ":").
 */
import type { JsonObject } from "@bufbuild/protobuf";
import { InvalidArgumentError } from "../common/errors.js";
import { readInputFile } from "./input-file.js";

const HEAD = /^\s*([a-z][a-z.]*)(?:\s+when\s+([^:]*?))?\s*:/;
const ALT_TOOLS = ["exec", "shell", "python", "ansible"] as const;

/** The inline document for `--alt` values, as JSON text. */
export function alternativesDocument(alts: readonly string[]): string {
  const alternatives = alts.map((text, i) => parseAlt(text, `--alt #${i + 1}`));
  return JSON.stringify({ name: "run", steps: [{ alternatives }] });
}

/** One `--alt` value as a document alternative (protobuf-JSON of a Step, plus `when`). */
function parseAlt(text: string, where: string): JsonObject {
  const m = HEAD.exec(text);
  if (!m) throw new InvalidArgumentError(`${where}: write TOOL: BODY or TOOL when QUERY: BODY (TOOL: ${ALT_TOOLS.join(", ")}), not ${JSON.stringify(text.slice(0, 80))}`);
  const [, tool, when] = m;
  const body = text.slice(m[0].length).trim();
  if (body === "") throw new InvalidArgumentError(`${where}: nothing after "${tool}:"`);
  const alt: JsonObject = when !== undefined ? { when } : {};
  switch (tool) {
    case "exec":
      return { ...alt, exec: { argv: body.startsWith("[") ? jsonStrings(body, where) : words(body) } };
    case "shell":
      return { ...alt, shell: { script: body } };
    case "python": {
      if (!body.startsWith("@")) return { ...alt, python: { script: body } };
      const [file = "", ...args] = words(body.slice(1));
      return { ...alt, python: { script: readText(file, where), args } };
    }
    case "ansible": {
      const [first = "", ...rest] = words(body);
      if (first.startsWith("@")) return { ...alt, ansible: { playbook: readText(first.slice(1), where), vars: pairs(rest, where) } };
      const json = body.slice(first.length).trim();
      return { ...alt, ansible: { module: first, moduleArgs: json.startsWith("{") ? jsonObject(json, where) : pairs(rest, where) } };
    }
    default:
      throw new InvalidArgumentError(`${where}: unknown tool ${JSON.stringify(tool)} (use ${ALT_TOOLS.join(", ")})`);
  }
}

function words(text: string): string[] {
  return text.split(/\s+/).filter(Boolean);
}

function readText(file: string, where: string): string {
  if (file === "") throw new InvalidArgumentError(`${where}: a file name after "@"`);
  return Buffer.from(readInputFile(file, where)).toString("utf8");
}

function pairs(list: readonly string[], where: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const kv of list) {
    const i = kv.indexOf("=");
    if (i <= 0) throw new InvalidArgumentError(`${where}: ${JSON.stringify(kv)} is not K=V (a value with blanks: give the arguments as a JSON object)`);
    out[kv.slice(0, i)] = kv.slice(i + 1);
  }
  return out;
}

function parseJson(text: string, where: string): unknown {
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new InvalidArgumentError(`${where}: not valid JSON: ${(err as Error).message}`, { cause: err });
  }
}

function jsonStrings(text: string, where: string): string[] {
  const v = parseJson(text, where);
  if (!Array.isArray(v) || !v.every((x) => typeof x === "string")) throw new InvalidArgumentError(`${where}: exec takes a JSON array of strings`);
  return v;
}

function jsonObject(text: string, where: string): Record<string, string> {
  const v = parseJson(text, where);
  if (v === null || typeof v !== "object" || Array.isArray(v) || !Object.values(v).every((x) => typeof x === "string")) {
    throw new InvalidArgumentError(`${where}: module arguments take a JSON object of strings`);
  }
  return v as Record<string, string>;
}
