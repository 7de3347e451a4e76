import http2 from "node:http2";
import { request } from "node:https";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { LocalMesh } from "../../cli/launcher.js";
import type { CredentialPaths } from "../../certs/files.js";
import { LIMITS } from "../../common/limits.js";
import { ControllerService } from "../../gen/rexmesh/v1/controller_pb.js";
import { rexmesh, tempDir, until } from "./support.js";
import { testCa } from "../test-ca.js";

/**
 * The web console listener against an attacker (from an attack review):
 * the F-tests failed before their fixes; the second block is what held and
 * must keep holding.
 */
describe("console listener: hardening (attack review)", () => {
  const work = tempDir("console-review");
  const policy = join(work, "policy.yaml");
  const policyText = (carolActions: string) => `
roles:
  admin: { hosts: all, actions: ["*"], commands: ["*"], tools: ["*"] }
  carol: { hosts: all, actions: ${carolActions}, commands: ["*"], tools: ["*"] }
bindings:
  acme/dev: admin
  acme/brief: admin
  acme/carol: carol
  beta/admin: admin
`;
  writeFileSync(policy, policyText(`[read, submit, console]`));
  const mesh = new LocalMesh({
    ca: testCa(),
    dir: join(work, "mesh"),
    regions: ["east"],
    tenant: "acme",
    hosts: [{ id: "h01", region: "east" }],
    controllerArgs: ["--policy", policy, "--console-listen", "127.0.0.1:0"],
  });
  let consoleUrl: string;
  let ca: string;
  const envOf = (c: CredentialPaths) => ({ REXMESH_CONTROLLER: mesh.controllerAddress, REXMESH_CERT: c.cert, REXMESH_KEY: c.key, REXMESH_CA: c.ca });
  const linkFor = async (env: Record<string, string>) => {
    const r = await rexmesh(["console", "--json"], env);
    if (r.code !== 0) throw new Error(`rexmesh console: ${r.stderr}`);
    return (JSON.parse(r.stdout) as { url: string }).url;
  };
  const login = async (env: Record<string, string>): Promise<string> => {
    const link = await linkFor(env);
    const res = await post(ca, `${consoleUrl}/session/login`, JSON.stringify({ token: link.split("#")[1] }), { "content-type": "application/json", origin: consoleUrl });
    expect(res.status, res.body).toBe(200);
    return String(res.headers["set-cookie"]).split(";")[0]!;
  };
  const apiWith = (cookie?: string) => {
    const withCookie: Interceptor = (next) => (req) => {
      if (cookie) req.header.set("cookie", cookie);
      return next(req);
    };
    return createClient(ControllerService, createConnectTransport({ baseUrl: consoleUrl, httpVersion: "1.1", nodeOptions: { ca }, interceptors: [withCookie] }));
  };
  const codeOf = (p: Promise<unknown>) => p.then(() => "OK", (err: unknown) => Code[ConnectError.from(err).code]);

  beforeAll(async () => {
    await mesh.start();
    consoleUrl = String(mesh.controller.info!.consoleUrl);
    ca = readFileSync(mesh.exports().REXMESH_CA!, "utf8");
  }, 120_000);

  afterAll(async () => {
    await mesh.stop();
  });

  it("F1: a console session ends when the operator certificate it was minted from expires", async () => {
    // A short-lived operator certificate (as an SSO-issued or `step`-style one would be): valid 12 s.
    const brief = mesh.issue({ role: "operator", scope: "acme", id: "brief" }, join(work, "brief"), false, 12_000);
    const cookie = await login(envOf(brief));
    await expect(codeOf(apiWith(cookie).listJobs({}))).resolves.toBe("OK");
    expect((await rexmesh(["jobs", "--json"], envOf(brief))).code).toBe(0);
    // Once the certificate has expired, the main port refuses it at the TLS handshake ...
    await until("the certificate to expire", async () => ((await rexmesh(["jobs", "--json"], envOf(brief))).code !== 0 ? true : undefined), 30_000);
    // ... and so does the browser session it was exchanged for (it once went on for the whole --console-session, 8 h).
    await expect(codeOf(apiWith(cookie).listJobs({}))).resolves.not.toBe("OK");
  }, 60_000);

  it("F2: the console listener holds an unauthenticated caller to the main port's stream limit and refuses it before reading its request", async () => {
    const session = http2.connect(consoleUrl, { ca });
    try {
      const settings = await new Promise<http2.Settings>((resolve) => session.once("remoteSettings", resolve));
      // The main port advertises LIMITS.streamsPerConnection (256); the console listener, reachable without any credential, advertises none.
      expect.soft(settings.maxConcurrentStreams).toBeLessThanOrEqual(LIMITS.streamsPerConnection);
      // No cookie, a request body announced at 16 MB and never sent: the call is UNAUTHENTICATED whatever its body, and
      // should be answered at once. It is answered only at LIMITS.requestArrivalMs (60 s), holding the stream and what it buffered.
      const started = Date.now();
      const answered = await new Promise<{ status: number | undefined; ms: number }>((resolve) => {
        const s = session.request({ ":method": "POST", ":path": "/rexmesh.v1.ControllerService/ListJobs", "content-type": "application/json", "content-length": String(16 * 1024 * 1024 - 1) });
        s.write(Buffer.alloc(64 * 1024, 0x20));
        const timer = setTimeout(() => resolve({ status: undefined, ms: Date.now() - started }), 5_000);
        s.on("response", (h) => {
          clearTimeout(timer);
          resolve({ status: Number(h[":status"]), ms: Date.now() - started });
        });
        s.on("error", () => {});
      });
      expect.soft(answered.status, `no answer after ${answered.ms} ms`).toBe(401);
    } finally {
      session.destroy();
    }
  }, 30_000);

  it("F3: /session/login is answered or cut within the request-arrival bound, like every API call", async () => {
    // Unauthenticated slowloris: a login whose body never arrives. API calls are cut at LIMITS.requestArrivalMs; the login has no bound.
    const session = http2.connect(consoleUrl, { ca });
    try {
      const outcome = await new Promise<string>((resolve) => {
        const s = session.request({ ":method": "POST", ":path": "/session/login", "content-type": "application/json", "content-length": "200" });
        s.write("{");
        const timer = setTimeout(() => resolve("still open"), LIMITS.requestArrivalMs + 5_000);
        s.on("response", (h) => {
          clearTimeout(timer);
          resolve(`answered ${String(h[":status"])}`);
        });
        s.on("close", () => {
          clearTimeout(timer);
          resolve("closed");
        });
        s.on("error", () => {});
      });
      expect(outcome).not.toBe("still open");
    } finally {
      session.destroy();
    }
  }, LIMITS.requestArrivalMs + 20_000);

  it("F4: the console answers only for its own host name (DNS rebinding: a foreign Host with a matching Origin passes the CSRF check)", async () => {
    const cookie = await login(mesh.exports());
    const port = new URL(consoleUrl).port;
    const res = await post(ca, `${consoleUrl}/rexmesh.v1.ControllerService/ListJobs`, "{}", {
      "content-type": "application/json",
      host: `evil.example:${port}`,
      origin: `https://evil.example:${port}`,
      cookie,
    });
    // Served (200): the Origin check compares the Origin with the Host the request itself claims.
    expect(res.status).not.toBe(200);
  });

  it("F5: a policy reload that takes `console` away from an operator ends its browser sessions", async () => {
    const carol = mesh.issue({ role: "operator", scope: "acme", id: "carol" }, join(work, "carol"));
    const cookie = await login(envOf(carol));
    await expect(codeOf(apiWith(cookie).listJobs({}))).resolves.toBe("OK");
    // The administrator keeps carol to the CLI (docs/console.md: "a policy can leave it out to keep operators to the CLI").
    writeFileSync(policy, policyText(`[read, submit]`));
    mesh.controller.proc.kill("SIGHUP");
    await until("the reload to refuse carol a link", async () => ((await rexmesh(["console", "--json"], envOf(carol))).code !== 0 ? true : undefined), 15_000);
    // The session minted before the reload is worth nothing from then on (it once read and submitted for up to 8 h more).
    await expect(codeOf(apiWith(cookie).listJobs({}))).resolves.not.toBe("OK");
  }, 60_000);

  it("F6: a login refused to a known operator is in its tenant's audit (a link opened twice, a console action taken away); a secret naming nobody is not", async () => {
    const carol = mesh.issue({ role: "operator", scope: "acme", id: "carol2" }, join(work, "carol2"));
    const audited = async () =>
      (await rexmesh(["audit", "--since", "1h", "--limit", "1000", "--json"], mesh.exports())).stdout
        .trim()
        .split("\n")
        .filter(Boolean)
        .map((l) => JSON.parse(l) as { kind: string; actor: string; decision: string; reason: string })
        .filter((e) => e.kind === "console.login");
    const before = (await audited()).length;
    // Opened twice: the second opening is someone else holding the link.
    const token = (await linkFor(mesh.exports())).split("#")[1]!;
    expect((await post(ca, `${consoleUrl}/session/login`, JSON.stringify({ token }), { "content-type": "application/json" })).status).toBe(200);
    expect((await post(ca, `${consoleUrl}/session/login`, JSON.stringify({ token }), { "content-type": "application/json" })).status).toBe(401);
    // A well-formed secret no link has: answered alike, audited nowhere.
    expect((await post(ca, `${consoleUrl}/session/login`, JSON.stringify({ token: "A".repeat(43) }), { "content-type": "application/json" })).status).toBe(401);
    // A link made while the policy gave carol2 the console, opened after a reload took it away.
    writeFileSync(policy, policyText(`[read, submit, console]`).replace("acme/carol: carol", "acme/carol: carol\n  acme/carol2: carol"));
    mesh.controller.proc.kill("SIGHUP");
    const carolLink = await until("the reload to give carol2 a link", async () => {
      const r = await rexmesh(["console", "--json"], envOf(carol));
      return r.code === 0 ? (JSON.parse(r.stdout) as { url: string }).url : undefined;
    }, 15_000);
    writeFileSync(policy, policyText(`[read, submit]`).replace("acme/carol: carol", "acme/carol: carol\n  acme/carol2: carol"));
    mesh.controller.proc.kill("SIGHUP");
    await until("the reload to refuse carol2 a link", async () => ((await rexmesh(["console", "--json"], envOf(carol))).code !== 0 ? true : undefined), 15_000);
    expect((await post(ca, `${consoleUrl}/session/login`, JSON.stringify({ token: carolLink.split("#")[1] }), { "content-type": "application/json" })).status).toBe(403);

    // Oldest first: what this test added is at the end.
    const events = (await audited()).slice(before);
    const denied = events.filter((e) => e.decision === "denied");
    expect(denied.map((e) => e.actor).sort(), JSON.stringify(events)).toEqual(["operator:acme/carol2", "operator:acme/dev"]);
    expect(denied.find((e) => e.actor === "operator:acme/dev")!.reason).toMatch(/opened already; opened again from 127\.0\.0\.1/);
    expect(denied.find((e) => e.actor === "operator:acme/carol2")!.reason).toMatch(/no longer gives this operator the console action/);
    expect(events.filter((e) => e.decision === "allowed").map((e) => e.actor)).toEqual(["operator:acme/dev"]);
  }, 60_000);

  it("F7: the audit tells a call made from a browser session from one made with the certificate itself", async () => {
    const cookie = await login(mesh.exports());
    const { job } = await apiWith(cookie).submitJob({ hostIds: ["h01"], steps: [{ tool: { case: "exec", value: { argv: ["true"] } } }] });
    const r = await rexmesh(["run", "-H", "h01", "--", "true"], mesh.exports());
    expect(r.code, r.stderr).toBe(0);
    const events = (await rexmesh(["audit", "--since", "1h", "--limit", "1000", "--json"], mesh.exports())).stdout
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as { kind: string; reason: string; job?: string })
      .filter((e) => e.kind === "submit");
    const fromBrowser = events.find((e) => e.job === job!.id)!;
    expect(fromBrowser.reason).toMatch(/^role admin \(web console\)$/);
    expect(events.at(-1)!.job).not.toBe(job!.id);
    expect(events.at(-1)!.reason).toBe("role admin");
  }, 60_000);

  // What the review tried that held: on the same mesh (its operator dev holds every action).
  describe("attacks that must keep failing", () => {
    const get = (path: string, headers: Record<string, string> = {}, method = "GET") =>
      new Promise<{ status: number; headers: Record<string, string | string[] | undefined>; body: string }>((resolve, reject) => {
        const req = request(`${consoleUrl}${path}`, { method, ca, headers }, (res) => {
          let text = "";
          res.on("data", (d: Buffer) => (text += d.toString()));
          res.on("end", () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: text }));
        });
        req.on("error", reject);
        req.end();
      });
    const loginCookie = async () => {
      const r = await rexmesh(["console", "--json"], mesh.exports());
      const link = (JSON.parse(r.stdout) as { url: string }).url;
      const res = await post(ca, `${consoleUrl}/session/login`, JSON.stringify({ token: link.split("#")[1] }), { "content-type": "application/json" });
      return { cookie: String(res.headers["set-cookie"]).split(";")[0]!, token: link.split("#")[1]! };
    };

    it("static files: no traversal, no listing, index.html for unknown pages, assets 404, headers everywhere", async () => {
      for (const p of ["/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/assets/../../package.json", "/assets/..%2f..%2fpackage.json", "//etc/passwd"]) {
        const r = await get(p);
        expect(r.body).not.toMatch(/root:|"name":/);
        expect(r.headers["content-security-policy"]).toMatch(/frame-ancestors 'none'/);
      }
      expect((await get("/assets/nope.js")).status).toBe(404);
      const index = await get("/");
      expect(index.headers["cache-control"]).toBe("no-store");
      expect(index.headers["x-frame-options"]).toBe("DENY");
    });

    it("CSRF and cross-origin: GET, Connect GET, simple types, foreign Origin or Sec-Fetch-Site never reach the API", async () => {
      const { cookie } = await loginCookie();
      const api = "/rexmesh.v1.ControllerService/ListJobs";
      expect((await get(`${api}?connect=v1&encoding=json&message=%7B%7D`, { cookie })).status).toBe(403);
      const refused: Record<string, string>[] = [
        { "content-type": "text/plain;charset=UTF-8" },
        { "content-type": "application/x-www-form-urlencoded" },
        { "content-type": " Multipart/Form-Data; boundary=x" },
        { "content-type": "application/json", "sec-fetch-site": "cross-site" },
        { "content-type": "application/json", "sec-fetch-site": "same-site" },
        { "content-type": "application/json", origin: "null" },
      ];
      for (const headers of refused) expect((await post(ca, `${consoleUrl}${api}`, "{}", { ...headers, cookie })).status, JSON.stringify(headers)).toBe(403);
      expect((await post(ca, `${consoleUrl}/session/logout`, "{}", { "content-type": "text/plain", cookie })).status).toBe(403);
      // No CORS is granted to a preflight.
      const pre = await get(api, { origin: "https://evil.example", "access-control-request-method": "POST" }, "OPTIONS");
      expect(pre.headers["access-control-allow-origin"]).toBeUndefined();
    });

    it("login: oversized body, oversized cookie, replay, a race of two redemptions; the listener survives", async () => {
      const big = await post(ca, `${consoleUrl}/session/login`, JSON.stringify({ token: "A".repeat(10_000) }), { "content-type": "application/json" }).catch((e: Error) => ({ status: -1, body: e.message, headers: {} }));
      expect([400, -1]).toContain(big.status);
      expect((await get("/session")).status).toBe(401);
      const r = await rexmesh(["console", "--json"], mesh.exports());
      const token = (JSON.parse(r.stdout) as { url: string }).url.split("#")[1]!;
      const both = await Promise.all([0, 1].map(() => post(ca, `${consoleUrl}/session/login`, JSON.stringify({ token }), { "content-type": "application/json" })));
      expect(both.map((b) => b.status).sort()).toEqual([200, 401]);
      const cookie = String(both.find((b) => b.status === 200)!.headers["set-cookie"]).split(";")[0]!;
      expect((await get("/session", { cookie: `${"x=".padEnd(5000, "y")}; ${cookie}` })).status).toBe(401);
      expect((await get("/session", { cookie: `${cookie}${"A".repeat(30)}` })).status).toBe(401);
      expect((await get("/session", { cookie })).status).toBe(200);
      // A session cannot mint links or reach other services, nor open sessions.
      for (const p of ["/rexmesh.v1.ConsoleService/CreateConsoleLink", "/rexmesh.v1.RevocationService/Revoke", "/rexmesh.v1.TokenService/CreateJoinToken", "/grpc.health.v1.Health/Check", "/rexmesh.v1.ControllerService/Session"]) {
        expect((await post(ca, `${consoleUrl}${p}`, "{}", { "content-type": "application/json", cookie })).status, p).not.toBe(200);
      }
    });
  });
});

function post(ca: string, url: string, body: string, headers: Record<string, string>): Promise<{ status: number; headers: Record<string, string | string[] | undefined>; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request(url, { method: "POST", ca, checkServerIdentity: () => undefined, headers: { ...headers, "content-length": Buffer.byteLength(body) } }, (res) => {
      let text = "";
      res.on("data", (d: Buffer) => (text += d.toString()));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: text }));
    });
    req.on("error", reject);
    req.end(body);
  });
}
