import { execFileSync, spawn } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { operatorClient } from "../../cli/client.js";
import { LocalMesh, REXMESH_BIN } from "../../cli/launcher.js";
import type { CredentialPaths } from "../../certs/files.js";
import { AuditDecision } from "../../gen/rexmesh/v1/controller_pb.js";
import { tempDir, until } from "./support.js";

/**
 * `rexmesh shell` end to end: a real mesh (controller, proxy, daemon over
 * mTLS), the real CLI inside a real terminal (tmux), a real pty on the
 * host. The host is this machine, so the remote processes can be seen.
 */
describe("rexmesh shell through the mesh", () => {
  const work = tempDir("shell");
  const policyFile = join(work, "policy.yaml");
  writeFileSync(
    policyFile,
    `
roles:
  admin:
    hosts: all
    actions: ["*", session]
    commands: ["*"]
    shell: true
  everything-but-sessions:
    hosts: all
    actions: ["*"]
    commands: ["*"]
    shell: true
bindings:
  acme/dev: admin
  acme/nosession: everything-but-sessions
`,
  );
  const mesh = new LocalMesh({ dir: join(work, "mesh"), regions: ["east"], tenant: "acme", hosts: [{ id: "h1", region: "east" }], controllerArgs: ["--policy", policyFile] });
  let nosession: CredentialPaths;
  const envOf = (c: CredentialPaths) => ({ REXMESH_CONTROLLER: mesh.controllerAddress, REXMESH_CERT: c.cert, REXMESH_KEY: c.key, REXMESH_CA: c.ca });

  /** Runs the CLI with `input` on its stdin (a pipe: no terminal). */
  const shell = (args: string[], input: string, env = mesh.exports()) =>
    new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve, reject) => {
      const clean: NodeJS.ProcessEnv = {};
      for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("REXMESH_")) clean[k] = v;
      const child = spawn(process.execPath, [REXMESH_BIN, "shell", ...args], { env: { ...clean, ...env }, stdio: ["pipe", "pipe", "pipe"] });
      let stdout = "";
      let stderr = "";
      child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
      child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
      child.on("error", reject);
      child.on("close", (code) => resolve({ code, stdout, stderr }));
      child.stdin.end(input);
    });

  beforeAll(async () => {
    await mesh.start();
    nosession = mesh.issue({ role: "operator", scope: "acme", id: "nosession" }, join(work, "nosession"));
    await mesh.waitForHosts(1);
  });

  afterAll(async () => {
    await mesh.stop();
  });

  it("runs a real terminal in tmux: tty is a /dev/pts, stty size follows a resize, Ctrl-C interrupts sleep, exit 7 is the CLI's exit status", async () => {
    const socket = `rexmesh-shell-${process.pid}`;
    const tmux = (...args: string[]) => execFileSync("tmux", ["-L", socket, ...args], { encoding: "utf8" });
    const script = join(work, "in-tmux.sh");
    const exports = Object.entries(mesh.exports()).map(([k, v]) => `export ${k}=${v}`).join("\n");
    writeFileSync(script, `${exports}\nexport TERM=xterm\n${JSON.stringify(process.execPath)} ${JSON.stringify(REXMESH_BIN)} shell h1\necho CLI-EXIT=$?\nsleep 600\n`);
    const screen = () => tmux("capture-pane", "-p", "-J", "-S", "-200");
    const see = (what: string, pattern: RegExp, timeoutMs = 20_000) => until(what, async () => pattern.exec(screen()) ?? undefined, timeoutMs);
    tmux("-f", "/dev/null", "new-session", "-d", "-x", "100", "-y", "30", "bash", "--norc", "--noprofile", script);
    try {
      // Each command prints a marker only its output contains (the typed line shows the unexpanded $((...))).
      tmux("send-keys", "-t", "0", "echo READY-$((40+2))", "Enter");
      await see("the remote shell's first answer", /READY-42/, 30_000);

      tmux("send-keys", "-t", "0", "echo TTY=$(tty)", "Enter");
      await see("tty's answer", /TTY=\/dev\/pts\/\d+/);

      tmux("send-keys", "-t", "0", "echo SIZE=$(stty size)", "Enter");
      await see("the first window size", /SIZE=30 100/);
      tmux("resize-window", "-t", "0", "-x", "120", "-y", "40");
      tmux("send-keys", "-t", "0", "echo SIZE2=$(stty size)", "Enter");
      await see("the window size after the resize", /SIZE2=40 120/);

      // The host is this machine: the remote sleep is a process here.
      const marker = `${process.pid}${Date.now() % 100000}`;
      tmux("send-keys", "-t", "0", `sleep ${marker}`, "Enter");
      const sleeping = () => {
        try {
          return execFileSync("pgrep", ["-f", `^sleep ${marker}$`], { encoding: "utf8" }).trim();
        } catch {
          return "";
        }
      };
      await until("the remote sleep to start", async () => sleeping() || undefined);
      tmux("send-keys", "-t", "0", "C-c");
      await until("the remote sleep to end on Ctrl-C", async () => (sleeping() === "" ? true : undefined), 10_000);
      tmux("send-keys", "-t", "0", "echo AFTER-INT-$((3+4))", "Enter");
      await see("the shell after the interrupt", /AFTER-INT-7/);

      tmux("send-keys", "-t", "0", "exit 7", "Enter");
      await see("the CLI's exit status", /CLI-EXIT=7/);
    } finally {
      try {
        tmux("kill-server");
      } catch {
        // Already gone.
      }
    }
  });

  it("runs without a terminal from a pipe: stdin to the login shell, stdout and stderr apart, the exit code", async () => {
    const r = await shell(["h1"], "tty; echo piped-$((6*7)); echo to-err >&2; exit 3\n");
    expect(r.code, r.stderr).toBe(3);
    expect(r.stdout).toContain("not a tty");
    expect(r.stdout).toContain("piped-42\n");
    expect(r.stderr).toContain("to-err\n");
    expect(r.stdout).not.toContain("to-err");
  });

  it("runs a command with arguments, passing stdin through byte for byte", async () => {
    const input = Array.from({ length: 20_000 }, (_, i) => `line ${i}\n`).join("");
    const r = await shell(["h1", "--", "sha256sum"], input);
    expect(r.code, r.stderr).toBe(0);
    const expected = execFileSync("sha256sum", { input, encoding: "utf8" });
    expect(r.stdout).toBe(expected);
  });

  it("refuses an operator whose policy lacks `session` with PERMISSION_DENIED, and audits both", async () => {
    const r = await shell(["h1", "--", "true"], "", envOf(nosession));
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/PermissionDenied: operator acme\/nosession may not session/);
    const missing = await shell(["nope", "--", "true"], "");
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/NotFound: host "nope" not found/);
    const { client, close } = operatorClient({}, mesh.exports());
    try {
      const { events } = await client.listAudit({ limit: 1000 });
      const sessions = events.filter((e) => e.kind === "session" || e.kind === "session.end");
      expect(sessions.some((e) => e.kind === "session" && e.actor === "operator:acme/nosession" && e.decision === AuditDecision.DENIED)).toBe(true);
      expect(sessions.some((e) => e.kind === "session" && e.actor === "operator:acme/dev" && e.decision === AuditDecision.ALLOWED && e.hostIds.includes("h1"))).toBe(true);
      expect(sessions.some((e) => e.kind === "session.end" && e.reason === "exited 7")).toBe(true);
      expect(sessions.some((e) => e.kind === "session.end" && e.reason === "exited 3")).toBe(true);
    } finally {
      close();
    }
  });
});
