import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { afterEach, describe, expect, it } from "vitest";
import { LmdbBacklog } from "../../common/lmdb-backlog.js";
import { LmdbEnv } from "../../common/lmdb.js";
import { HostEventSchema, type HostEvent } from "../../gen/rexmesh/v1/event_pb.js";
import { LmdbProxyStore } from "../../proxy/lmdb-store.js";
import { resendOrder } from "../../daemon/agent.js";
import { TaskState, TaskStatusSchema } from "../../gen/rexmesh/v1/task_pb.js";
import { proxyHarness } from "./proxy-harness.js";
import { flush } from "./support.js";

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});
const tempEnv = (dir = mkdtempSync(join(tmpdir(), "rexmesh-events-"))) => {
  dirs.push(dir);
  return { dir, env: new LmdbEnv({ path: dir, maxBytes: 64 << 20 }) };
};
/** Waits (real time: LMDB commits) until `probe` holds. */
async function settled(probe: () => boolean): Promise<void> {
  for (let i = 0; i < 200 && !probe(); i++) await new Promise((r) => setTimeout(r, 10));
}
const ev = (id: string, hostId = "h1", tenant = "acme"): HostEvent => create(HostEventSchema, { id, hostId, tenant, kind: "service.failed", details: { unit: "nginx.service" }, keyId: "k", signature: new Uint8Array(64) });

describe("events on their way up", () => {
  it("a durable outbox keeps an event across a reopen until it is acknowledged, beside a task's statuses", async () => {
    const { dir, env } = tempEnv();
    const outbox = new LmdbBacklog(env.db("outbox", "binary"), "h1");
    await outbox.push([{ kind: "event", event: ev("e1") }, { kind: "status", status: create(TaskStatusSchema, { taskId: "t1", state: TaskState.RUNNING }) }, { kind: "event", event: ev("e1") }]);
    expect(outbox.size).toBe(2);
    await env.close();
    const again = tempEnv(dir).env;
    const reopened = new LmdbBacklog(again.db("outbox", "binary"), "h1");
    expect(reopened.all().map((i) => (i.kind === "event" ? `event:${i.event.id}:${i.event.details.unit}` : i.kind))).toEqual(["event:e1:nginx.service", "status"]);
    // An ack of another host's event, or of an event not held, drops nothing.
    await reopened.ackEvent("h2", "e1");
    await reopened.ackEvent("h1", "e9");
    expect(reopened.size).toBe(2);
    await reopened.ackEvent("h1", "e1");
    expect(reopened.all().map((i) => i.kind)).toEqual(["status"]);
    expect(resendOrder([{ kind: "status", status: create(TaskStatusSchema, { taskId: "t1", state: TaskState.RUNNING }) }, { kind: "event", event: ev("e2") }]).map((i) => i.kind)).toEqual(["event", "status"]);
    await again.close();
  });

  it("a proxy stores a host's events, acknowledges them, keeps them while cut off and across its restart, sends them up, and forgets them once the controller acknowledges", async () => {
    const { dir, env } = tempEnv();
    const t = proxyHarness(new LmdbProxyStore(env));
    const h = t.connectHost("h1", 0);
    await flush();
    h.send({ events: [ev("e1"), ev("e2", "h2"), ev("e3", "h1", "beta")] });
    await settled(() => h.link.sent.some((f) => f.eventAcks.length > 0));
    // Only its own: an event naming another host or tenant is dropped, not acknowledged.
    expect(h.link.sent.flatMap((f) => f.eventAcks.map((a) => `${a.hostId}/${a.eventId}`))).toEqual(["h1/e1"]);
    expect(t.store.upward().map((i) => (i.kind === "event" ? i.event.id : i.kind))).toEqual(["e1"]);
    // Restarted while cut off: still there.
    t.core.stop();
    await env.close();
    const again = tempEnv(dir).env;
    const t2 = proxyHarness(new LmdbProxyStore(again));
    const ctl = t2.connectController();
    await settled(() => ctl.link.sent.some((f) => f.events.length > 0));
    expect(ctl.link.sent.flatMap((f) => f.events.map((e) => e.id))).toEqual(["e1"]);
    ctl.send({ eventAcks: [{ hostId: "h1", eventId: "e1" }] });
    await settled(() => t2.store.upward().length === 0);
    expect(t2.store.upward()).toEqual([]);
    t2.core.stop();
    await again.close();
  });
});
