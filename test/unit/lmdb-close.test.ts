/**
 * LmdbEnv.close() and lmdb-js's close race (common/lmdb.ts, countWrites):
 * a close that does not wait for every write job frees the environment
 * under a write thread still in it, and the process dies (SIGFPE, SIGSEGV)
 * or hangs. Real LMDB on disk, real processes; the race's window is widened
 * by an LD_PRELOAD shim (test/fixtures/lmdb-close-race/delay.c) so that
 * what happens now and then happens every time.
 */
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { LmdbEnv } from "../../common/lmdb.js";

const dir = mkdtempSync(join(tmpdir(), "rexmesh-lmdb-close-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("LmdbEnv.close", () => {
  it("counts lmdb-js's write jobs (a new lmdb-js that no longer starts them through env.startWriting fails here)", async () => {
    const env = new LmdbEnv({ path: join(dir, "count"), maxBytes: 16 << 20 });
    const db = env.db("x");
    for (let i = 0; i < 3; i++) {
      await db.put(`k${i}`, { i });
      await new Promise((r) => setImmediate(r));
    }
    expect(env.writeJobs.started).toBeGreaterThan(0);
    await env.close();
    expect(env.writeJobs.running).toBe(0);
  });

  it("waits for every write job: writes over several turns, close and reopen, 20 times a process, under a shim that delays the write thread", async () => {
    const shim = join(dir, "delay.so");
    const source = fileURLToPath(new URL("../fixtures/lmdb-close-race/delay.c", import.meta.url));
    const cc = spawnSync("cc", ["-shared", "-fPIC", "-O1", "-o", shim, source, "-ldl"], { encoding: "utf8" });
    expect(cc.status, `cc: ${cc.stderr}`).toBe(0);
    const lmdb = pathToFileURL(fileURLToPath(new URL("../../dist/common/lmdb.js", import.meta.url))).href;
    const script = join(dir, "churn.mjs");
    writeFileSync(
      script,
      `import { mkdtempSync } from "node:fs";
import { join } from "node:path";
import { LmdbEnv } from ${JSON.stringify(lmdb)};
const [where, how] = process.argv.slice(2);
const path = mkdtempSync(join(where, "env-"));
const turn = () => new Promise((r) => setImmediate(r));
for (let i = 0; i < 20; i++) {
  const env = new LmdbEnv({ path, maxBytes: 64 << 20 });
  const db = env.db("x");
  const puts = [];
  for (let t = 0; t < 8; t++) {
    for (let k = 0; k < 10; k++) puts.push(db.put("k" + t + "-" + k, { i, t, k, v: "x".repeat(200) }));
    await turn();
  }
  await Promise.all(puts);
  if (how === "lmdb") await env.root.close();
  else await env.close();
}
`,
    );
    const run = (how: "ours" | "lmdb", i: number) =>
      new Promise<{ how: string; code: number | null; signal: string | null; delays: number; err: string }>((resolve) => {
        const count = join(dir, `delays-${how}-${i}`);
        const child = spawn(process.execPath, [script, dir, how], {
          env: { ...process.env, LD_PRELOAD: shim, DELAY_US: "20000", DELAY_COUNT_FILE: count },
          stdio: ["ignore", "ignore", "pipe"],
        });
        let err = "";
        child.stderr.on("data", (d: Buffer) => (err = (err + d.toString()).slice(-400)));
        // A write thread stuck on a freed mutex hangs the process: killed, and counted as the failure it is.
        const hung = setTimeout(() => child.kill("SIGKILL"), 30_000);
        child.on("exit", (code, signal) => {
          clearTimeout(hung);
          resolve({ how, code, signal, delays: existsSync(count) ? readFileSync(count).length : 0, err });
        });
      });
    const ours = [];
    for (let i = 0; i < 6; i += 2) ours.push(...(await Promise.all([run("ours", i), run("ours", i + 1)])));
    // The shim found its spot in this lmdb-js build: else the runs above prove nothing (a new build: see delay.c).
    for (const r of ours) expect(r.delays, "write threads delayed by the shim").toBeGreaterThan(0);
    expect(ours.map((r) => [r.code, r.signal, r.err])).toEqual(ours.map(() => [0, null, ""]));
    // The same churn through lmdb-js's own close() dies: the race is real in this build (30 of 30 runs died here). When
    // a new lmdb-js fixes it, this fails, and the guard in common/lmdb.ts can go.
    const theirs = await Promise.all([run("lmdb", 0), run("lmdb", 1), run("lmdb", 2)]);
    expect(theirs.filter((r) => r.signal !== null || r.code !== 0).length, JSON.stringify(theirs.map((r) => [r.code, r.signal]))).toBeGreaterThan(0);
  }, 120_000);
});
