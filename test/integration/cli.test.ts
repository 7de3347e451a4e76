import { X509Certificate } from "node:crypto";
import { readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { rexmesh, tempDir } from "./support.js";

describe("rexmesh ca", () => {
  it("creates a CA and issues certificates whose SAN names the role and identity, keys mode 0600", async () => {
    const dir = tempDir("ca");
    const ca = join(dir, "ca");
    expect((await rexmesh(["ca", "init", "--dir", ca])).code).toBe(0);
    expect(statSync(join(ca, "ca.key")).mode & 0o777).toBe(0o600);
    // A second init would destroy the CA: refused without --force.
    const again = await rexmesh(["ca", "init", "--dir", ca]);
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/already exists/);

    const out = join(dir, "px");
    const r = await rexmesh(["ca", "issue", "--dir", ca, "--role", "proxy", "--region", "eu-1", "--id", "px1", "--dns", "px1.example.net", "--out", out]);
    expect(r.code, r.stderr).toBe(0);
    expect(statSync(join(out, "px1.key")).mode & 0o777).toBe(0o600);
    const cert = new X509Certificate(readFileSync(join(out, "px1.crt")));
    const caCert = new X509Certificate(readFileSync(join(ca, "ca.crt")));
    expect(cert.verify(caCert.publicKey)).toBe(true);
    expect(cert.ca).toBe(false);
    expect(cert.subjectAltName).toContain("URI:rexmesh://proxy/eu-1/px1");
    expect(cert.subjectAltName).toContain("DNS:px1.example.net");

    const bad = await rexmesh(["ca", "issue", "--dir", ca, "--role", "wizard", "--id", "x"]);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/--role must be host, proxy, operator or controller/);
    const noRegion = await rexmesh(["ca", "issue", "--dir", ca, "--role", "proxy", "--id", "x"]);
    expect(noRegion.stderr).toMatch(/needs --region/);
  });
});

describe("role configuration", () => {
  it("resolves defaults < config file < REXMESH_* environment < flags", async () => {
    const dir = tempDir("cfg");
    const file = join(dir, "controller.yaml");
    writeFileSync(file, "listen: 127.0.0.1:9001\nheartbeat: 5s\ndeliveryDeadline: 2h\ncert: /etc/rexmesh/c.crt\n");
    const r = await rexmesh(["controller", "--config", file, "--print-config", "--delivery-deadline", "30m"], { REXMESH_HEARTBEAT: "7s" });
    expect(r.code, r.stderr).toBe(0);
    const config = JSON.parse(r.stdout);
    expect(config).toMatchObject({ listen: "127.0.0.1:9001", heartbeat: 7000, deliveryDeadline: 1_800_000, cert: "/etc/rexmesh/c.crt", logLevel: "info" });
  });

  it("fails start-up on a wrong key or a wrong type, naming it", async () => {
    const dir = tempDir("cfg");
    const wrongKey = join(dir, "a.yaml");
    writeFileSync(wrongKey, "proxies: [127.0.0.1:1]\ncapacityy: 4\n");
    const a = await rexmesh(["daemon", "--config", wrongKey]);
    expect(a.code).toBe(2);
    expect(a.stderr).toMatch(/unknown key "capacityy"/);
    const wrongType = join(dir, "b.json");
    writeFileSync(wrongType, JSON.stringify({ proxies: ["127.0.0.1:1"], capacity: "many" }));
    const b = await rexmesh(["daemon", "--config", wrongType]);
    expect(b.code).toBe(2);
    expect(b.stderr).toMatch(/capacity must be an integer/);
    const env = await rexmesh(["proxy", "--print-config"], { REXMESH_HEARTBEAT: "soon" });
    expect(env.stderr).toMatch(/environment REXMESH_HEARTBEAT: heartbeat must be a duration/);
    const flag = await rexmesh(["controller", "--no-such-flag"]);
    expect(flag.code).toBe(2);
    expect(flag.stderr).toMatch(/no-such-flag/);
  });

  it("the deployment examples in deploy/ are valid configurations", async () => {
    for (const role of ["controller", "proxy", "daemon"]) {
      const r = await rexmesh([role, "--config", `deploy/${role}.yaml`, "--print-config"]);
      expect(r.code, `${role}: ${r.stderr}`).toBe(0);
      expect(JSON.parse(r.stdout)).toHaveProperty("data");
    }
  });

  it("the systemd units in deploy/ pass systemd-analyze verify", async () => {
    const { execFile } = await import("node:child_process");
    const { promisify } = await import("node:util");
    for (const unit of ["rexmesh-controller.service", "rexmesh-proxy.service", "rexmesh-daemon.service"]) {
      const { stderr } = await promisify(execFile)("systemd-analyze", ["verify", `deploy/${unit}`]);
      expect(stderr, unit).toBe("");
    }
  });

  it("completes commands and options in bash", async () => {
    const { execFile } = await import("node:child_process");
    const { promisify } = await import("node:util");
    const script = (await rexmesh(["completion", "bash"])).stdout;
    const complete = async (...words: string[]) => {
      const { stdout } = await promisify(execFile)("bash", ["-c", `${script}\nCOMP_WORDS=(${words.map((w) => `'${w}'`).join(" ")}); COMP_CWORD=${words.length - 1}; _rexmesh; printf '%s\\n' "\${COMPREPLY[@]}"`]);
      return stdout.trim().split("\n");
    };
    expect(await complete("rexmesh", "ru")).toEqual(["run"]);
    expect(await complete("rexmesh", "jobs", "c")).toEqual(["cancel"]);
    expect(await complete("rexmesh", "run", "--max")).toEqual(["--max-errors"]);
  });

  it("every command has --help with examples", async () => {
    for (const cmd of [["run"], ["hosts"], ["jobs"], ["ca"], ["dev"], ["controller"], ["proxy"], ["daemon"]]) {
      const r = await rexmesh([...cmd, "--help"]);
      expect(r.code, cmd.join(" ")).toBe(0);
      expect(r.stdout, cmd.join(" ")).toMatch(/^usage: rexmesh /);
      expect(r.stdout, cmd.join(" ")).toMatch(/examples:/);
    }
  });
});
