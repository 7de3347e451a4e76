// Prints the one line CI reads, "N passed, N failed", from vitest's JSON
// report; exits non-zero when anything failed or no test ran.
import { readFileSync } from "node:fs";

const report = JSON.parse(readFileSync(process.argv[2], "utf8"));
let passed = report.numPassedTests ?? 0;
let failed = report.numFailedTests ?? 0;
// A file that failed to load has no test results but must count as a failure,
// and in a failed file the tests vitest skipped because a hook threw are
// failures too.
for (const file of report.testResults ?? []) {
  if (file.status !== "failed") continue;
  const results = file.assertionResults ?? [];
  if (results.length === 0) failed++;
  failed += results.filter((t) => t.status !== "passed" && t.status !== "failed").length;
}
for (const file of report.testResults ?? []) {
  for (const t of file.assertionResults ?? []) {
    if (t.status === "failed") console.error(`FAILED ${file.name}: ${t.fullName}`);
  }
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed > 0 || passed === 0 ? 1 : 0);
