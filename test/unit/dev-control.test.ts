import { mkdtempSync, readFileSync, statSync, writeFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { askMesh, CONTROL_FILE, meshRunning, NoMeshError, serveControl } from "../../cli/dev-control.js";

const tempDir = () => mkdtempSync(join(tmpdir(), "rexmesh-devcontrol-"));

describe("rexmesh dev's control channel", () => {
  it("answers requests that carry the token of its control file, refuses others, and removes the file on close", async () => {
    const dir = tempDir();
    const seen: unknown[] = [];
    const control = await serveControl(dir, async (req) => {
      seen.push(req);
      if (req.role === "nope") throw new Error("no role named nope");
      return { message: `did ${req.op} ${req.role}` };
    });
    try {
      const file = join(dir, CONTROL_FILE);
      expect(statSync(file).mode & 0o777).toBe(0o600);
      expect(await askMesh(dir, { op: "restart", role: "controller", signal: "SIGKILL" })).toEqual({ ok: true, message: "did restart controller" });
      expect(seen).toEqual([{ op: "restart", role: "controller", signal: "SIGKILL", token: JSON.parse(readFileSync(file, "utf8")).token }]);
      await expect(askMesh(dir, { op: "kill", role: "nope" })).rejects.toThrow(/^no role named nope$/);
      expect(await meshRunning(dir)).toBe(true);

      // Another directory's copy of the file with a token of its own is refused before anything is done.
      const forged = tempDir();
      writeFileSync(join(forged, CONTROL_FILE), JSON.stringify({ ...JSON.parse(readFileSync(file, "utf8")), token: "0".repeat(64) }));
      await expect(askMesh(forged, { op: "kill", role: "controller" })).rejects.toThrow(/wrong token/);
      expect(seen.map((r) => (r as { op: string }).op)).toEqual(["restart", "kill", "roles"]); // the forged kill never reached the handler
    } finally {
      await control.close();
    }
    expect(existsSync(join(dir, CONTROL_FILE))).toBe(false);
    await expect(askMesh(dir, { op: "roles" })).rejects.toThrow(NoMeshError);
    expect(await meshRunning(dir)).toBe(false);
  });

  it("calls a control file that is not JSON or not its own shape no mesh", async () => {
    const dir = tempDir();
    writeFileSync(join(dir, CONTROL_FILE), "{");
    await expect(askMesh(dir, { op: "roles" })).rejects.toThrow(/no dev mesh running in .* \(control\.json cannot be read/);
    writeFileSync(join(dir, CONTROL_FILE), JSON.stringify({ pid: 1, port: "x", token: "t" }));
    await expect(askMesh(dir, { op: "roles" })).rejects.toThrow(/not one that rexmesh dev wrote/);
  });
});
