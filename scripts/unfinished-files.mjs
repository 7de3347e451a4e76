// Prints the test files that a worker started and never ended, from the trace
// test/worker-trace.ts writes: where a vitest worker died mid-run.
import { readFileSync } from "node:fs";

let text = "";
try {
  text = readFileSync(process.argv[2], "utf8");
} catch {
  console.log(`no worker trace at ${process.argv[2]}`);
  process.exit(0);
}
const open = new Map();
for (const line of text.split("\n")) {
  const m = /^(\S+) pid (\d+) (start|end) (.*)$/.exec(line);
  if (!m) continue;
  const key = `${m[2]} ${m[4]}`;
  if (m[3] === "start") open.set(key, m[1]);
  else open.delete(key);
}
if (open.size === 0) console.log("every test file that started also ended");
for (const [key, at] of open) {
  const [pid, ...file] = key.split(" ");
  console.log(`started and never ended: ${file.join(" ")} (worker pid ${pid}, started ${at})`);
}
