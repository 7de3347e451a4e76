import { create } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { LIMITS } from "../../common/limits.js";
import { heartbeatInterval, LinkSession } from "../../common/link-session.js";
import { silentLogger } from "../../common/logger.js";
import { codeOf } from "../../common/rpc-errors.js";
import { serveProxyLink, type ProxyLinkDeps } from "../../controller/proxy-link.js";
import { AgentStreamRequestSchema, AgentStreamResponseSchema, type AgentStreamRequest, type AgentStreamResponse } from "../../gen/rexmesh/v1/agent_link_pb.js";
import type { ProxyStreamRequest, ProxyStreamResponse } from "../../gen/rexmesh/v1/proxy_link_pb.js";
import { ProxyCore } from "../../proxy/proxy.js";
import { MemoryProxyStore } from "../../proxy/store.js";
import { FakeLink, flush, hostPeer } from "./support.js";

type HostSide = FakeLink<AgentStreamResponse, AgentStreamRequest>;

function session(clock: ManualClock) {
  const link: HostSide = new FakeLink();
  const ls = new LinkSession<AgentStreamResponse, AgentStreamRequest>(link, { clock, empty: () => create(AgentStreamResponseSchema), peer: "host" });
  return { link, ls };
}

/** How long a link with this heartbeat interval lives without a frame from its peer, to the 50 ms tick. */
async function silenceLived(clock: ManualClock, intervalMs: number): Promise<{ ms: number; link: HostSide }> {
  const { link, ls } = session(clock);
  ls.startHeartbeat(intervalMs);
  const start = clock.now();
  while (!link.isClosed && clock.now() - start < 3_600_000) {
    clock.advance(50);
    await flush(1);
  }
  return { ms: clock.now() - start, link };
}

describe("link session bounds", () => {
  it("gives up on a peer that sends no first frame within LIMITS.linkHelloMs, with DEADLINE_EXCEEDED", async () => {
    const clock = new ManualClock();
    const { link, ls } = session(clock);
    const first = ls.first();
    clock.advance(LIMITS.linkHelloMs - 1);
    await flush();
    expect(link.isClosed).toBe(false);
    clock.advance(1);
    // A real link's frames end when it closes; this fake's fail with the close's error.
    await first.catch(() => undefined);
    expect(link.isClosed).toBe(true);
    expect(codeOf(link.closeError)).toBe(Code.DeadlineExceeded);
    expect(link.closeError?.message).toMatch(/no frame from the host within 20 s/);
  });

  it("holds a heartbeat interval within [LIMITS.heartbeatMinMs, LIMITS.heartbeatMaxMs]", () => {
    expect(heartbeatInterval(1)).toBe(LIMITS.heartbeatMinMs);
    expect(heartbeatInterval(10_000)).toBe(10_000);
    expect(heartbeatInterval(2 ** 32 - 1)).toBe(LIMITS.heartbeatMaxMs);
  });

  it("ends a link whose peer fell silent with UNAVAILABLE, after three intervals of at least 1 s", async () => {
    const { ms, link } = await silenceLived(new ManualClock(), 1);
    expect(ms).toBeGreaterThan(3 * LIMITS.heartbeatMinMs);
    expect(ms).toBeLessThanOrEqual(3 * LIMITS.heartbeatMinMs + LIMITS.heartbeatMinMs / 2 + 50);
    expect(codeOf(link.closeError)).toBe(Code.Unavailable);
    expect(link.closeError?.message).toBe("host heartbeat lost: no frame for 3 s");
  });

  it("does not let a hello's huge heartbeat_ms keep a silent peer for longer than three times LIMITS.heartbeatMaxMs", async () => {
    const { ms, link } = await silenceLived(new ManualClock(), 2 ** 32 - 1);
    expect(link.isClosed).toBe(true);
    expect(ms).toBeLessThanOrEqual(3 * LIMITS.heartbeatMaxMs + LIMITS.heartbeatMaxMs / 2 + 50);
  });
});

describe("link servers wait a bounded time for the hello", () => {
  it("the proxy ends an AgentLink with no hello after LIMITS.linkHelloMs, DEADLINE_EXCEEDED", async () => {
    const clock = new ManualClock();
    const core = new ProxyCore({ name: "px1", region: "eu", clock, store: new MemoryProxyStore(), log: silentLogger, heartbeatMs: 10_000, sweepMs: 1e9 });
    core.start();
    const link: HostSide = new FakeLink();
    const served = core.serveHost(link, hostPeer("h1"));
    await flush();
    clock.advance(LIMITS.linkHelloMs);
    await served.catch(() => undefined);
    expect(codeOf(link.closeError)).toBe(Code.DeadlineExceeded);
    expect(core.connectedHosts).toBe(0);
  });

  it("the controller ends a ProxyLink with no hello after LIMITS.linkHelloMs, DEADLINE_EXCEEDED", async () => {
    const clock = new ManualClock();
    const link = new FakeLink<ProxyStreamResponse, ProxyStreamRequest>();
    // Nothing past the hello is reached: the session needs only its clock.
    const deps = { clock, log: silentLogger, heartbeatMs: 10_000 } as unknown as ProxyLinkDeps;
    const served = serveProxyLink(deps, link, { role: "proxy", scope: "eu", id: "px1" });
    await flush();
    clock.advance(LIMITS.linkHelloMs);
    await served.catch(() => undefined);
    expect(codeOf(link.closeError)).toBe(Code.DeadlineExceeded);
  });

  it("a hello within the bound opens the link as before", async () => {
    const clock = new ManualClock();
    const core = new ProxyCore({ name: "px1", region: "eu", clock, store: new MemoryProxyStore(), log: silentLogger, heartbeatMs: 10_000, sweepMs: 1e9 });
    core.start();
    const link: HostSide = new FakeLink();
    const served = core.serveHost(link, hostPeer("h1"));
    clock.advance(LIMITS.linkHelloMs - 1);
    link.deliver(create(AgentStreamRequestSchema, { hello: { hostId: "h1", heartbeatMs: 0 }, credits: 0 }));
    await flush();
    clock.advance(LIMITS.linkHelloMs);
    await flush();
    expect(link.isClosed).toBe(false);
    expect(core.connectedHosts).toBe(1);
    link.end();
    await served;
    expect(core.connectedHosts).toBe(0);
  });
});
