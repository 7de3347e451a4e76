/**
 * Boolean options of the roles (cli/roles.ts): `--X` / `--no-X`, and a value
 * after a boolean flag refused rather than ignored (`--spawner false` used to
 * leave the spawner on).
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { runRole } from "../../cli/roles.js";

async function spawnerOf(argv: string[]): Promise<unknown> {
  let printed = "";
  const code = await runRole("daemon", [...argv, "--print-config"], (s) => (printed += s));
  expect(code).toBe(0);
  return (JSON.parse(printed) as { spawner?: unknown }).spawner;
}

describe("the daemon's spawner option", () => {
  const saved = process.env.REXMESH_SPAWNER;
  afterEach(() => {
    if (saved === undefined) delete process.env.REXMESH_SPAWNER;
    else process.env.REXMESH_SPAWNER = saved;
  });

  it("is on by default and with --spawner; off with --no-spawner, REXMESH_SPAWNER=false or `spawner: false` in the config file", async () => {
    delete process.env.REXMESH_SPAWNER;
    expect(await spawnerOf([])).toBe(true);
    expect(await spawnerOf(["--spawner"])).toBe(true);
    expect(await spawnerOf(["--no-spawner"])).toBe(false);
    const dir = mkdtempSync(join(tmpdir(), "rexmesh-flags-"));
    try {
      writeFileSync(join(dir, "d.yaml"), "spawner: false\n");
      expect(await spawnerOf(["--config", join(dir, "d.yaml")])).toBe(false);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
    process.env.REXMESH_SPAWNER = "false";
    expect(await spawnerOf([])).toBe(false);
    // A flag beats the environment.
    expect(await spawnerOf(["--spawner"])).toBe(true);
  });

  it("refuses `--spawner false` (a value after a boolean flag) instead of ignoring it, and --spawner with --no-spawner", async () => {
    await expect(runRole("daemon", ["--spawner", "false", "--print-config"], () => {})).rejects.toThrow(/takes options only, not "false" \(a true\/false option takes no value/);
    await expect(runRole("daemon", ["--spawner", "--no-spawner", "--print-config"], () => {})).rejects.toThrow(/together/);
  });
});
