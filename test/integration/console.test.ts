import { request } from "node:https";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { chromium, type Browser, type Page } from "playwright-core";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { LocalMesh } from "../../cli/launcher.js";
import { operatorClient } from "../../cli/client.js";
import type { CredentialPaths } from "../../certs/files.js";
import { ControllerService } from "../../gen/rexmesh/v1/controller_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { rexmesh, tempDir, until } from "./support.js";
import { testCa } from "../test-ca.js";

/**
 * The web console end to end: a real controller (with --console-listen and
 * a policy), proxies and daemons, the real `rexmesh console` CLI for the
 * links, and the built console driven in headless Debian chromium through
 * playwright-core (never a downloaded browser). Security properties of the
 * listener are checked at its API as well.
 */
const CHROMIUM = "/usr/bin/chromium";
/**
 * Where the screenshots go: docs/ (committed, shown in docs/console.md) when
 * REXMESH_UPDATE_SCREENSHOTS=1, a scratch directory otherwise, so that a
 * test run leaves the checkout as it was.
 */
const DOCS = process.env.REXMESH_UPDATE_SCREENSHOTS === "1" ? join(import.meta.dirname, "..", "..", "docs") : mkdtempSync(join(tmpdir(), "rexmesh-console-shots-"));

describe("web console on a real mesh", () => {
  const work = tempDir("console");
  const policy = join(work, "policy.yaml");
  // dev may do everything; viewer may read and log in, never submit.
  writeFileSync(
    policy,
    `
roles:
  admin: { hosts: all, actions: ["*"], commands: ["*"], tools: ["*"] }
  viewer: { hosts: all, actions: [read, console] }
bindings:
  acme/dev: admin
  acme/viewer: viewer
  beta/admin: admin
`,
  );
  const mesh = new LocalMesh({
    ca: testCa(),
    dir: join(work, "mesh"),
    regions: ["east", "west"],
    tenant: "acme",
    hosts: [
      { id: "h01", region: "east" },
      { id: "h02", region: "west" },
      { id: "h03", region: "east" },
      { id: "h04", region: "west" },
      { id: "b01", region: "east", tenant: "beta" },
    ],
    controllerArgs: ["--policy", policy, "--console-listen", "127.0.0.1:0"],
  });
  let browser: Browser;
  let consoleUrl: string;
  let viewer: CredentialPaths;
  let beta: CredentialPaths;
  const envOf = (c: CredentialPaths) => ({ REXMESH_CONTROLLER: mesh.controllerAddress, REXMESH_CERT: c.cert, REXMESH_KEY: c.key, REXMESH_CA: c.ca });
  const admin = () => operatorClient({}, mesh.exports());
  /** A one-time link, from the real CLI. */
  const linkFor = async (env: Record<string, string>) => {
    const r = await rexmesh(["console", "--json"], env);
    expect(r.code, r.stderr).toBe(0);
    return (JSON.parse(r.stdout) as { url: string }).url;
  };
  const newPage = async (): Promise<Page> => {
    const ctx = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1366, height: 860 } });
    return ctx.newPage();
  };

  beforeAll(async () => {
    await mesh.start();
    consoleUrl = String(mesh.controller.info!.consoleUrl);
    viewer = mesh.issue({ role: "operator", scope: "acme", id: "viewer" }, join(work, "viewer"));
    beta = mesh.issue({ role: "operator", scope: "beta", id: "admin" }, join(work, "beta"));
    [browser] = await Promise.all([chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] }), mesh.waitForHosts(4), mesh.waitForHosts(1, 60_000, envOf(beta))]);
    const { client, close } = admin();
    try {
      await client.setHostLabels({ hostId: "h01", set: { role: "web" } });
      await client.setHostLabels({ hostId: "h02", set: { role: "web" } });
      await client.setHostLabels({ hostId: "h03", set: { role: "db" } });
      // Hosts named in `fail` exit 3 with a line on stderr; the others print the same two lines.
      await client.putDocument({
        content: `name: probe
description: says a message, fails on some hosts
parameters:
  - { name: message, type: string, pattern: "[a-z-]+" }
  - { name: fail, type: string, default: "h01 h03" }
steps:
  - exec: { argv: [sh, -c, 'echo "$1"; sleep 3; case " $3 " in *" $2 "*) echo failing >&2; exit 3;; esac; echo done', sh, "{{param.message}}", "{{host.id}}", "{{param.fail}}"] }
`,
      });
      await client.putDocument({ content: `name: deploy\nparameters:\n  - { name: token, type: string, sensitive: true }\nsteps:\n  - exec: { argv: [echo, "{{param.token}}"] }\n` });
    } finally {
      close();
    }
  }, 120_000);

  afterAll(async () => {
    await browser?.close();
    await mesh.stop();
  });

  it("logs in with a one-time link, runs a document, shows live and grouped output, reruns only the failed hosts, cancels", async () => {
    const link = await linkFor(mesh.exports());
    expect(link).toMatch(new RegExp(`^${consoleUrl}/login#[A-Za-z0-9_-]{43}$`));
    const page = await newPage();
    await page.goto(link);
    await page.getByText("operator:acme/dev").waitFor();
    // The link works once.
    const again = await newPage();
    await again.goto(link);
    await again.getByRole("alert").filter({ hasText: "not valid" }).waitFor();
    await again.context().close();

    // Run: a document with typed inputs (sensitive ones masked), previewed first.
    await page.goto(`${consoleUrl}/#/submit`);
    await page.getByLabel("Document", { exact: true }).check();
    await page.locator("select[name=document]").selectOption("deploy");
    expect(await page.getByLabel("token (sensitive)").getAttribute("type")).toBe("password");
    await page.locator("select[name=document]").selectOption("probe");
    await page.locator("#param-message").fill("hello-console");
    await page.getByLabel("Hosts (comma or space separated)").fill("h01,h02,h03,h04");
    await page.getByRole("button", { name: "Preview (dry run)" }).click();
    await page.getByText("Dry run: 4 hosts").waitFor();
    expect(await page.locator("table tbody tr").count()).toBe(4);
    await expect(page.locator("table tbody").innerText()).resolves.toContain("hello-console");
    await page.getByRole("button", { name: "Submit" }).click();
    await until("the job's page", async () => (page.url().includes("#/jobs/") ? true : undefined), 15_000);
    const jobId = decodeURIComponent(page.url().split("#/jobs/")[1]!);

    // Live: the first line is on the page while the job still runs (each host sleeps 3 s after it).
    await page.locator("[data-testid=output]", { hasText: "hello-console" }).first().waitFor({ timeout: 15_000 });
    expect(await page.locator(".badge.live").count()).toBe(1);
    await page.locator(".badge.done").waitFor({ timeout: 30_000 });
    // Histogram, grouped output (identical output once, the other group marked as differing).
    await expect(page.getByRole("list", { name: "hosts by state" }).innerText()).resolves.toMatch(/succeeded\s*2[\s\S]*failed\s*2/);
    const groups = page.locator("ol.groups > li");
    await expect(groups.count()).resolves.toBe(2);
    await expect(page.locator("ol.groups > li.differs").count()).resolves.toBe(1);
    await expect(groups.allInnerTexts()).resolves.toEqual(expect.arrayContaining([expect.stringMatching(/h01, h03[\s\S]*failing/), expect.stringMatching(/h02, h04[\s\S]*done/)]));
    await page.screenshot({ path: join(DOCS, "console-job.png"), fullPage: true });
    // Filter the failed hosts.
    await page.locator("select[name=state]").selectOption(String(TaskState.FAILED));
    await expect(page.locator("table.hosts tbody tr").evaluateAll((rows) => rows.map((r) => r.getAttribute("data-host")))).resolves.toEqual(["h01", "h03"]);
    // By label, as the controller answers the query (h01 and h02 are role=web, h03 role=db, h04 has no role).
    const shown = () => page.locator("table.hosts tbody tr").evaluateAll((rows) => rows.map((r) => r.getAttribute("data-host")).join(","));
    const label = page.getByLabel("Label (key or key=value)");
    await page.locator("select[name=state]").selectOption("");
    await label.fill("role=web");
    await until("role=web", async () => ((await shown()) === "h01,h02" ? true : undefined), 10_000);
    await label.fill("role");
    await until("role", async () => ((await shown()) === "h01,h02,h03" ? true : undefined), 10_000);
    await label.fill("");
    await until("no label filter", async () => ((await shown()) === "h01,h02,h03,h04" ? true : undefined), 10_000);
    await page.locator("select[name=state]").selectOption(String(TaskState.FAILED));

    // Rerun only them; the API shows the new job: exactly those hosts, the same document and parameters.
    await page.getByRole("button", { name: "Rerun failed" }).click();
    const rerunId = await until("the rerun's page", async () => {
      const alert = await page.locator("[role=alert]").allInnerTexts();
      if (alert.length > 0) throw new Error(`rerun refused: ${alert.join("; ")}`);
      const id = decodeURIComponent(page.url().split("#/jobs/")[1] ?? "");
      return id && id !== jobId ? id : undefined;
    }, 15_000);
    const { client, close } = admin();
    try {
      const [before, after] = await Promise.all([client.getJob({ jobId }), client.getJob({ jobId: rerunId })]);
      expect(after.tasks.map((t) => t.hostId).sort()).toEqual(["h01", "h03"]);
      expect(after.job!.document).toBe(before.job!.document);
      expect(after.job!.parameters).toEqual(before.job!.parameters);
      expect(after.job!.parameters).toEqual({ message: "hello-console", fail: "h01 h03" });

      // Cancel a running job from its page.
      const long = await client.submitJob({ hostIds: ["h02", "h04"], steps: [{ tool: { case: "exec", value: { argv: ["sleep", "60"] } } }] });
      const longId = long.job!.id;
      await until("the long job to run", async () => ((await client.getJob({ jobId: longId })).tasks.every((t) => t.state === TaskState.RUNNING) ? true : undefined));
      await page.goto(`${consoleUrl}/#/jobs/${longId}`);
      await page.locator(".badge.live").waitFor();
      // One host's task first: it ends CANCELLED, the job goes on on the other.
      await page.getByRole("checkbox", { name: "select h02" }).check();
      await page.getByRole("button", { name: "Cancel selected (1)" }).click();
      await until("h02's task cancelled", async () => {
        const t = (await client.getJob({ jobId: longId })).tasks;
        return t.find((x) => x.hostId === "h02")?.state === TaskState.CANCELLED ? t : undefined;
      });
      const partly = await client.getJob({ jobId: longId });
      expect(partly.tasks.find((t) => t.hostId === "h04")?.state).toBe(TaskState.RUNNING);
      await page.getByRole("button", { name: "Cancel job" }).click();
      await page.locator(".badge.done").waitFor({ timeout: 30_000 });
      const cancelled = await client.getJob({ jobId: longId });
      expect(cancelled.tasks.map((t) => t.state)).toEqual([TaskState.CANCELLED, TaskState.CANCELLED]);
    } finally {
      close();
    }

    // Hosts: connection, region, proxy, version, labels; a host's page lists its tasks.
    await page.goto(`${consoleUrl}/#/hosts`);
    await page.getByText("4 hosts, 4 connected").waitFor();
    await expect(page.locator("table.hosts tbody").innerText()).resolves.toMatch(/h01\s+connected[\s\S]*role=web/);
    await page.screenshot({ path: join(DOCS, "console-hosts.png"), fullPage: true });
    await page.getByRole("link", { name: "h01" }).click();
    await page.getByRole("link", { name: rerunId }).waitFor();

    // Logging out ends the session: the page says so.
    await page.getByRole("button", { name: "Log out" }).click();
    await page.getByText("You are not logged in").waitFor();
    await page.context().close();
  }, 90_000);

  it("refuses a submit in the page to an operator without submit: the error is shown, nothing is submitted", async () => {
    const { client, close } = admin();
    try {
      const before = (await client.listJobs({})).jobs.length;
      const page = await newPage();
      await page.goto(await linkFor(envOf(viewer)));
      await page.getByText("operator:acme/viewer").waitFor();
      await page.goto(`${consoleUrl}/#/submit`);
      await page.getByRole("textbox", { name: "Script" }).fill("echo should-not-run");
      await page.getByLabel("Hosts (comma or space separated)").fill("h01");
      await page.getByRole("button", { name: "Submit" }).click();
      await expect(page.getByRole("alert").innerText()).resolves.toMatch(/PermissionDenied/);
      expect(page.url()).toContain("#/submit");
      expect((await client.listJobs({})).jobs.length).toBe(before);
      await page.context().close();
    } finally {
      close();
    }
  });

  it("answers UNAUTHENTICATED without a cookie or with a forged one; another tenant's session sees nothing of ours; cross-site calls are refused", async () => {
    const ca = readFileSync(mesh.exports().REXMESH_CA!, "utf8");
    const apiWith = (cookie?: string) => {
      const withCookie: Interceptor = (next) => (req) => {
        if (cookie) req.header.set("cookie", cookie);
        return next(req);
      };
      return createClient(ControllerService, createConnectTransport({ baseUrl: consoleUrl, httpVersion: "1.1", nodeOptions: { ca }, interceptors: [withCookie] }));
    };
    const codeOf = (p: Promise<unknown>) => p.then(() => Code.Unknown + 100, (err: unknown) => ConnectError.from(err).code);
    await expect(codeOf(apiWith().listHosts({}))).resolves.toBe(Code.Unauthenticated);
    await expect(codeOf(apiWith(`__Host-rexmesh-console=${"A".repeat(43)}`).listJobs({}))).resolves.toBe(Code.Unauthenticated);

    // Beta's operator logs in; its cookie, used against our jobs and hosts, shows none of them.
    const link = await linkFor(envOf(beta));
    const login = await post(ca, `${consoleUrl}/session/login`, JSON.stringify({ token: link.split("#")[1] }), { "content-type": "application/json", origin: consoleUrl });
    expect(login.status).toBe(200);
    const setCookie = String(login.headers["set-cookie"]);
    expect(setCookie).toMatch(/HttpOnly/);
    expect(setCookie).toMatch(/Secure/);
    expect(setCookie).toMatch(/SameSite=Strict/);
    const cookie = setCookie.split(";")[0]!;
    const stolen = apiWith(cookie);
    expect((await stolen.listHosts({})).hosts.map((h) => h.id)).toEqual(["b01"]);
    const { client, close } = admin();
    try {
      await client.submitJob({ hostIds: ["h01"], steps: [{ tool: { case: "exec", value: { argv: ["true"] } } }] });
      const ours = (await client.listJobs({})).jobs;
      expect(ours.length).toBeGreaterThan(0);
      expect((await stolen.listJobs({})).jobs).toEqual([]);
      await expect(codeOf(stolen.getJob({ jobId: ours[0]!.id }))).resolves.toBe(Code.NotFound);
      await expect(codeOf(stolen.submitJob({ hostIds: ["h01"], steps: [{ tool: { case: "exec", value: { argv: ["true"] } } }] }))).resolves.toBe(Code.NotFound);
    } finally {
      close();
    }
    // A link is used once: a second login with it is refused.
    const second = await post(ca, `${consoleUrl}/session/login`, JSON.stringify({ token: link.split("#")[1] }), { "content-type": "application/json" });
    expect(second.status).toBe(401);
    // CSRF: a form's content type, or another Origin, never reaches the API.
    const form = await post(ca, `${consoleUrl}/rexmesh.v1.ControllerService/ListHosts`, "{}", { "content-type": "text/plain", cookie });
    expect(form.status).toBe(403);
    const elsewhere = await post(ca, `${consoleUrl}/rexmesh.v1.ControllerService/ListHosts`, "{}", { "content-type": "application/json", origin: "https://evil.example", cookie });
    expect(elsewhere.status).toBe(403);
    // Links are minted on the main port only, never by a browser session.
    const mint = await post(ca, `${consoleUrl}/rexmesh.v1.ConsoleService/CreateConsoleLink`, "{}", { "content-type": "application/json", cookie });
    expect(mint.status).not.toBe(200);
    // After logout the cookie is worthless.
    await post(ca, `${consoleUrl}/session/logout`, "{}", { "content-type": "application/json", cookie });
    await expect(codeOf(stolen.listHosts({}))).resolves.toBe(Code.Unauthenticated);
  });
});

function post(ca: string, url: string, body: string, headers: Record<string, string>): Promise<{ status: number; headers: Record<string, string | string[] | undefined>; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request(url, { method: "POST", ca, headers: { ...headers, "content-length": Buffer.byteLength(body) } }, (res) => {
      let text = "";
      res.on("data", (d: Buffer) => (text += d.toString()));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: text }));
    });
    req.on("error", reject);
    req.end(body);
  });
}
