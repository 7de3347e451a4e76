import { readFileSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");

/** Every project file a module loads, following its relative imports (static, re-exports and dynamic) from source. */
function loads(entry: string): Set<string> {
  const seen = new Set<string>();
  const todo = [resolve(ROOT, entry)];
  while (todo.length > 0) {
    const file = todo.pop()!;
    if (seen.has(file)) continue;
    seen.add(file);
    const text = readFileSync(file, "utf8");
    for (const m of text.matchAll(/(?:^|\n)\s*(?:import|export)\s(?![^;]*?\btype\s+\{)[^;]*?from\s+"(\.{1,2}\/[^"]+)"|\bimport\(\s*"(\.{1,2}\/[^"]+)"\s*\)/g)) {
      const spec = (m[1] ?? m[2])!;
      todo.push(join(dirname(file), spec.replace(/\.js$/, ".ts")));
    }
  }
  return new Set([...seen].map((f) => relative(ROOT, f)));
}

describe("what each role's process loads", () => {
  it("a proxy loads no controller or daemon code, a daemon no controller or proxy code", () => {
    const proxy = [...loads("proxy/main.ts")];
    const daemon = [...loads("daemon/main.ts")];
    expect(proxy.length).toBeGreaterThan(5); // the walk follows imports at all
    expect(proxy.filter((f) => f.startsWith("controller/") || f.startsWith("daemon/"))).toEqual([]);
    expect(daemon.filter((f) => f.startsWith("controller/") || f.startsWith("proxy/"))).toEqual([]);
  });
});
