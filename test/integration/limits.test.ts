import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { HostReporter } from "../../common/host-signing.js";
import { systemClock } from "../../common/clock.js";
import { readCredentials } from "../../certs/files.js";
import { operatorClient } from "../../cli/client.js";
import { LocalMesh } from "../../cli/launcher.js";
import { AsyncQueue } from "../../common/async-queue.js";
import { clientFor, openChannel } from "../../common/connect-dial.js";
import { LIMITS } from "../../common/limits.js";
import { AgentLinkService, AgentStreamRequestSchema, type AgentStreamRequest } from "../../gen/rexmesh/v1/agent_link_pb.js";
import { ConnectionState, SubmitJobRequestSchema } from "../../gen/rexmesh/v1/controller_pb.js";
import { HostFactsSchema } from "../../gen/rexmesh/v1/host_pb.js";
import { tempDir } from "./support.js";
import { testCa } from "../test-ca.js";

async function codeOf(p: Promise<unknown>): Promise<{ code: Code; message: string; ms: number }> {
  const t0 = Date.now();
  try {
    await p;
  } catch (err) {
    const e = ConnectError.from(err);
    return { code: e.code, message: e.rawMessage, ms: Date.now() - t0 };
  }
  throw new Error("the call succeeded");
}

/**
 * Issue 12, unbounded inputs, on a real mesh: a huge host id, huge facts from
 * a host, oversized job fields and too many watches are refused or cut at the
 * boundary, and the tenant's listings keep working.
 */
describe("input limits on a real mesh", () => {
  const work = tempDir("limits");
  const mesh = new LocalMesh({ ca: testCa(), dir: join(work, "mesh"), regions: ["east"], hosts: [{ id: "h1", region: "east" }] });
  let conn: ReturnType<typeof operatorClient>;

  beforeAll(async () => {
    await mesh.start();
    await mesh.waitForHosts(1);
    conn = operatorClient({}, mesh.exports());
  });
  afterAll(async () => {
    conn?.close();
    await mesh.stop();
  });

  it("refuses a 10 MB host id in SetHostLabels at once, and the tenant's audit stays readable", async () => {
    const r = await codeOf(conn.client.setHostLabels({ hostId: "x".repeat(10 << 20), set: { a: "b" } }));
    expect(r.code).toBe(Code.InvalidArgument);
    expect(r.message.length).toBeLessThan(300);
    const { events } = await conn.client.listAudit({ limit: 1000 });
    for (const e of events) for (const h of e.hostIds) expect(h.length).toBeLessThanOrEqual(LIMITS.auditFieldChars);
  });

  it("cuts a host's 8.5 MB of facts to the limits, and ListHosts keeps working for the tenant", async () => {
    const big = readCredentials(mesh.issue({ role: "host", scope: "default", id: "big-1" }, join(work, "big")));
    const channel = openChannel(mesh.proxies[0]!.address!, big, ["proxy"]);
    const out = new AsyncQueue<AgentStreamRequest>();
    const facts = create(HostFactsSchema, { os: "linux", hostname: "h".repeat(4 << 20), kernel: "k".repeat(4 << 20), addresses: Array.from({ length: 5000 }, (_, i) => `10.0.${i >> 8}.${i & 255}`), tools: ["exec"] });
    // A host that proves its presence (common/host-signing.ts), so that the controller counts it as connected.
    const reporter = new HostReporter(big, systemClock, { role: "host", scope: "default", id: "big-1" });
    out.push(create(AgentStreamRequestSchema, { hello: { hostId: "big-1", facts, reportKey: reporter.key }, credits: 0 }));
    const stream = (async () => {
      for await (const frame of clientFor(AgentLinkService, channel).agentStream(out)) {
        if (frame.presenceNonce.length > 0) {
          const { proof, salt } = reporter.prove(frame.presenceNonce, undefined);
          out.push(create(AgentStreamRequestSchema, { presenceNonce: frame.presenceNonce, presenceProof: proof, presenceSalt: salt }));
        }
      }
    })().catch(() => undefined);
    try {
      let listed: Awaited<ReturnType<typeof conn.client.listHosts>>["hosts"] = [];
      for (let delay = 50; ; delay = Math.min(delay * 2, 500)) {
        listed = (await conn.client.listHosts({})).hosts;
        if (listed.some((h) => h.id === "big-1" && h.connection === ConnectionState.CONNECTED)) break;
        await new Promise((r) => setTimeout(r, delay));
      }
      const b = listed.find((h) => h.id === "big-1")!;
      expect(b.facts!.hostname.length).toBeLessThanOrEqual(LIMITS.factChars);
      expect(b.facts!.kernel.length).toBeLessThanOrEqual(LIMITS.factChars);
      expect(b.facts!.addresses.length).toBeLessThanOrEqual(LIMITS.factListItems);
      expect(b.facts!.os).toBe("linux");
      expect(listed.map((h) => h.id).sort()).toEqual(["big-1", "h1"]);
      // Queries over the tenant still answer.
      expect((await conn.client.listHosts({ target: "hostname ~ 'h*'".replaceAll("'", '"') })).hosts.map((h) => h.id)).toContain("big-1");
    } finally {
      out.close();
      channel.close();
      await stream;
    }
  });

  it("refuses oversized job fields with INVALID_ARGUMENT naming the limit", async () => {
    const base = { hostIds: ["h1"], steps: [{ tool: { case: "exec" as const, value: { argv: ["true"] } } }] };
    const tooMany = Object.fromEntries(Array.from({ length: LIMITS.envVars + 1 }, (_, i) => [`V${i}`, "x"]));
    const cases: [Parameters<typeof create<typeof SubmitJobRequestSchema>>[1], RegExp][] = [
      [{ ...base, env: tooMany }, /env: at most 128/],
      [{ ...base, env: { BIG: "x".repeat(LIMITS.envValueBytes + 1) } }, /environment variable BIG is larger than 32768 bytes/],
      [{ ...base, env: Object.fromEntries(Array.from({ length: 10 }, (_, i) => [`V${i}`, "x".repeat(30_000)])) }, /env \(names and values together\)/],
      [{ ...base, workingDir: "/".repeat(LIMITS.workingDirBytes + 1) }, /working_dir/],
      [{ ...base, stdin: new Uint8Array(LIMITS.stdinBytes + 1) }, /stdin/],
      [{ ...base, hostIds: ["h".repeat(200)] }, /a host id is longer than 128/],
      [{ ...base, idempotencyKey: "k".repeat(1000) }, /idempotency_key/],
    ];
    for (const [req, why] of cases) {
      const r = await codeOf(conn.client.submitJob(create(SubmitJobRequestSchema, req)));
      expect(r.code, String(why)).toBe(Code.InvalidArgument);
      expect(r.message).toMatch(why);
    }
  });

  it("lets one operator hold watchesPerOperator watches at once, and the next is RESOURCE_EXHAUSTED", async () => {
    const { job } = await conn.client.submitJob(create(SubmitJobRequestSchema, { hostIds: ["h1"], steps: [{ tool: { case: "exec", value: { argv: ["sleep", "30"] } } }] }));
    const aborts: AbortController[] = [];
    const watch = (signal: AbortSignal) =>
      (async () => {
        for await (const _ of conn.client.watchJob({ jobId: job!.id }, { signal })) {
          /* follow */
        }
      })();
    try {
      const running = Array.from({ length: LIMITS.watchesPerOperator }, () => {
        const a = new AbortController();
        aborts.push(a);
        return watch(a.signal).catch(() => undefined);
      });
      // Every watch has its first batch before the 17th is tried.
      await new Promise((r) => setTimeout(r, 1500));
      const refused = await codeOf(watch(new AbortController().signal));
      expect(refused.code).toBe(Code.ResourceExhausted);
      expect(refused.message).toContain(`at most ${LIMITS.watchesPerOperator}`);
      aborts.pop()!.abort();
      await running.pop();
      await new Promise((r) => setTimeout(r, 200));
      const again = new AbortController();
      aborts.push(again);
      const one = watch(again.signal).catch((e: unknown) => e);
      await new Promise((r) => setTimeout(r, 500));
      again.abort();
      const ended = await one;
      expect(ended === undefined || ConnectError.from(ended).code === Code.Canceled).toBe(true);
    } finally {
      for (const a of aborts) a.abort();
      await conn.client.cancelJob({ jobId: job!.id }).catch(() => undefined);
    }
  });
});
