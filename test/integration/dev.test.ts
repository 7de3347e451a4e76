import { spawn } from "node:child_process";
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { REXMESH_BIN } from "../../cli/launcher.js";
import { isAlive, tempDir } from "./support.js";

/** What `npm start` runs: a whole mesh, a first job across regions, and a clean Ctrl-C. */
describe("rexmesh dev --demo", () => {
  it("shows output from several hosts in two regions, then stops everything on SIGINT", async () => {
    const dir = tempDir("dev");
    const env = { ...process.env };
    for (const k of Object.keys(env)) if (k.startsWith("REXMESH_")) delete env[k];
    const proc = spawn(process.execPath, [REXMESH_BIN, "dev", "--hosts", "6", "--regions", "2", "--demo", "--dir", dir], { env, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    proc.stderr.on("data", (d) => (err += d));
    const exited = new Promise<number | null>((resolve) => proc.on("exit", (code) => resolve(code)));
    await new Promise<void>((resolve, reject) => {
      proc.stdout.on("data", (d) => {
        out += d;
        if (out.includes("Ctrl-C stops it")) resolve();
      });
      proc.on("exit", (code) => reject(new Error(`dev exited ${code} early:\n${out}\n${err}`)));
    });

    // The exports an operator pastes.
    expect(out).toMatch(/^export REXMESH_CONTROLLER=127\.0\.0\.1:\d+$/m);
    expect(out).toMatch(/^export REXMESH_CERT=.+dev\.crt$/m);
    // Output from every host, live-prefixed; hosts alternate between the two regions.
    for (let i = 1; i <= 6; i++) expect(out).toMatch(new RegExp(`^host-0${i}\\s+out\\| hello from host-0${i} `, "m"));
    expect(out).toMatch(/^6 hosts: 6 succeeded/m);

    // Every process of the mesh, from the ready files, is alive now and gone after SIGINT.
    const pids = readdirSync(join(dir, "run")).map((f) => JSON.parse(readFileSync(join(dir, "run", f), "utf8")).pid as number);
    expect(pids.length).toBe(1 + 2 + 2); // controller, two proxies, a daemon process per region
    const regions = new Set(readdirSync(join(dir, "run")).filter((f) => f.startsWith("proxy-")).map((f) => JSON.parse(readFileSync(join(dir, "run", f), "utf8")).region));
    expect(regions).toEqual(new Set(["eu-west", "us-east"]));
    for (const pid of pids) expect(isAlive(pid)).toBe(true);
    proc.kill("SIGINT");
    expect(await exited).toBe(0);
    for (const pid of pids) expect(isAlive(pid), `pid ${pid}`).toBe(false);
  });
});
