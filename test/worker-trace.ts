/**
 * Vitest setupFiles: when REXMESH_TEST_TRACE names a file, each test file's
 * worker appends a line there as the file starts and as it ends (pid, file,
 * time). A worker that died mid-file (a signal, a crash in native code, the
 * OOM killer: vitest then fails with "Channel closed" and writes no report)
 * is the one with a start and no end; .ci/run prints it, with what the
 * kernel said. Nothing is written without the variable.
 */
import { appendFileSync } from "node:fs";
import { afterAll, beforeAll, expect } from "vitest";

const trace = process.env.REXMESH_TEST_TRACE;
if (trace) {
  const note = (event: string) => {
    const file = expect.getState().testPath ?? "?";
    appendFileSync(trace, `${new Date().toISOString()} pid ${process.pid} ${event} ${file}\n`);
  };
  beforeAll(() => note("start"));
  afterAll(() => note("end"));
}
