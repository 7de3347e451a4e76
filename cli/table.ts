/** Rows of text as aligned columns, the first row a header, each line after `indent`; trailing blanks trimmed. */
export function table(rows: readonly (readonly string[])[], indent = ""): string {
  if (rows.length === 0) return "";
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((row) => (row[i] ?? "").length)));
  return rows.map((row) => indent + row.map((c, i) => c.padEnd(widths[i]!)).join("  ").trimEnd()).join("\n") + "\n";
}
