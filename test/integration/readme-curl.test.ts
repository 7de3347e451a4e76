import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LocalMesh } from "../../cli/launcher.js";
import { tempDir } from "./support.js";
import { testCa } from "../test-ca.js";

/** The curl block of the README, exactly as a reader would paste it. */
function readmeCurlBlock(): string {
  const readme = readFileSync(new URL("../../README.md", import.meta.url), "utf8");
  const m = /<!-- curl-example -->\s*```sh\n([\s\S]*?)```\s*<!-- \/curl-example -->/.exec(readme);
  if (!m) throw new Error("README.md has no curl-example block");
  return m[1]!;
}

describe("the README's curl example", () => {
  const mesh = new LocalMesh({ ca: testCa(), dir: tempDir("readme"), regions: ["r"], hosts: [{ id: "c1", region: "r" }, { id: "c2", region: "r" }] });
  beforeAll(async () => {
    await mesh.start();
    await mesh.waitForHosts(2);
  });
  afterAll(() => mesh.stop());

  it("submits a job and reads it back, as written", async () => {
    const { stdout } = await promisify(execFile)("bash", ["-euo", "pipefail", "-c", readmeCurlBlock()], { env: { ...process.env, ...mesh.exports() } });
    const got = JSON.parse(stdout);
    expect(got.job.state).toBe("JOB_STATE_DONE");
    expect(got.tasks.map((t: { hostId: string; state: string; exitCode: number }) => [t.hostId, t.state, t.exitCode]).sort()).toEqual([
      ["c1", "TASK_STATE_SUCCEEDED", 0],
      ["c2", "TASK_STATE_SUCCEEDED", 0],
    ]);
  });
});
