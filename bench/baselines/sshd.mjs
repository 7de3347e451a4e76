// A private sshd on loopback for the SSH baselines: its own config, host key
// and authorized_keys in a temp dir; 127.0.0.1 and a free port only; UsePAM
// no; MaxStartups/MaxSessions raised. An ssh_config maps every name h* to
// it with the client key. Used by pdsh.mjs (fan-out) and the session
// scenario (ssh, ssh -L).
import { spawn } from "node:child_process";
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import { join } from "node:path";
import { run } from "./install.mjs";
import { freePort } from "./nats.mjs";

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitPort(port, proc, timeoutMs, logFile) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (proc.exitCode !== null || proc.signalCode !== null) throw new Error(`sshd exited (${proc.signalCode ?? proc.exitCode}): ${readFileSync(logFile, "utf8").trim().split("\n").slice(-3).join(" | ")}`);
    const ok = await new Promise((res) => {
      const c = net.connect(port, "127.0.0.1");
      c.once("connect", () => (c.destroy(), res(true)));
      c.once("error", () => res(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`sshd not listening on ${port} after ${timeoutMs} ms`);
    await sleep(50);
  }
}


/**
 * Starts the sshd; → { ok: true, port, sshConfig, logFile, dir, stop() } or
 * { ok: false, skipped }. `tcpForwarding`: allow `ssh -L`.
 */
export async function privateSshd({ tag, sshdPath, keygen, tcpForwarding = false }) {
  const dir = mkdtempSync(join(os.tmpdir(), `rexmesh-bench-${tag}-`));
  let sshd;
  const killSshd = () => sshd && sshd.exitCode === null && sshd.signalCode === null && sshd.kill("SIGKILL");
  process.once("exit", killSshd);
  const stop = async () => {
    if (sshd && sshd.exitCode === null && sshd.signalCode === null) {
      await new Promise((res) => {
        const t = setTimeout(() => sshd.kill("SIGKILL"), 5000);
        sshd.once("exit", () => (clearTimeout(t), res()));
        sshd.kill("SIGTERM");
      });
    }
    process.off("exit", killSshd);
    rmSync(dir, { recursive: true, force: true });
  };
  const fail = async (skipped) => {
    await stop();
    return { ok: false, skipped };
  };
  // sshd refuses to start without its privilege-separation directory.
  if (process.getuid?.() === 0 && !existsSync("/run/sshd")) mkdirSync("/run/sshd", { mode: 0o755, recursive: true });
  for (const f of ["host_key", "id_client"]) {
    const r = await run(keygen, ["-q", "-t", "ed25519", "-N", "", "-C", `rexmesh-bench-${f}`, "-f", join(dir, f)], { timeoutMs: 30_000 });
    if (r.code !== 0) return fail(`ssh-keygen failed: ${r.stderr.trim()}`);
  }
  writeFileSync(join(dir, "authorized_keys"), readFileSync(join(dir, "id_client.pub")), { mode: 0o600 });
  const port = await freePort();
  const user = os.userInfo().username;
  const sshdConfig = join(dir, "sshd_config");
  writeFileSync(
    sshdConfig,
    [
      `Port ${port}`,
      `ListenAddress 127.0.0.1`,
      `HostKey ${join(dir, "host_key")}`,
      `PidFile ${join(dir, "sshd.pid")}`,
      `AuthorizedKeysFile ${join(dir, "authorized_keys")}`,
      `UsePAM no`,
      `PermitRootLogin prohibit-password`,
      `PubkeyAuthentication yes`,
      `PasswordAuthentication no`,
      `KbdInteractiveAuthentication no`,
      `StrictModes no`,
      `UseDNS no`,
      `PrintMotd no`,
      `PrintLastLog no`,
      `X11Forwarding no`,
      `AllowTcpForwarding ${tcpForwarding ? "local" : "no"}`,
      `MaxStartups 1000:100:1000`,
      `MaxSessions 1000`,
      `MaxAuthTries 10`,
      `LogLevel ERROR`,
      `AllowUsers ${user}`,
      "",
    ].join("\n"),
  );
  const sshConfig = join(dir, "ssh_config");
  writeFileSync(
    sshConfig,
    [
      `Host h*`,
      `  HostName 127.0.0.1`,
      `  Port ${port}`,
      `  User ${user}`,
      `  IdentityFile ${join(dir, "id_client")}`,
      `  IdentitiesOnly yes`,
      `  StrictHostKeyChecking no`,
      `  UserKnownHostsFile /dev/null`,
      `  GlobalKnownHostsFile /dev/null`,
      `  BatchMode yes`,
      `  LogLevel ERROR`,
      `  ConnectTimeout 30`,
      "",
    ].join("\n"),
  );
  const logFile = join(dir, "sshd.log");
  const fd = openSync(logFile, "a");
  sshd = spawn(sshdPath, ["-D", "-e", "-f", sshdConfig], { stdio: ["ignore", fd, fd] });
  closeSync(fd);
  try {
    await waitPort(port, sshd, 15_000, logFile);
  } catch (err) {
    return fail(`private sshd did not start: ${err.message}`);
  }
  return { ok: true, port, sshConfig, logFile, dir, stop };
}
