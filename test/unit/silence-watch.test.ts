import { create } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { ManualClock, type Clock } from "../../common/clock.js";
import { silentLogger } from "../../common/logger.js";
import { codeOf } from "../../common/rpc-errors.js";
import { SilenceWatch } from "../../common/silence-watch.js";
import type { LinkConnection } from "../../common/frame-link.js";
import { AgentStreamRequestSchema, type AgentStreamRequest, type AgentStreamResponse } from "../../gen/rexmesh/v1/agent_link_pb.js";
import { ProxyCore } from "../../proxy/proxy.js";
import { MemoryProxyStore } from "../../proxy/store.js";
import { FakeLink, flush, hostPeer } from "./support.js";

/** A connection whose peer PINGs when told to (each PING and its frame header: 17 bytes). */
class FakeConnection implements LinkConnection {
  bytesRead = 0;
  destroyed = false;
  ping(): void {
    this.bytesRead += 17;
  }
  destroy(): void {
    this.destroyed = true;
  }
}

describe("SilenceWatch: one sweep notices connections that stopped sending", () => {
  it("keeps a connection that sends every interval and drops one that stopped, between limit − tick and limit + tick after its last byte", () => {
    const clock = new ManualClock();
    const watch = new SilenceWatch(clock, 500);
    const live = new FakeConnection();
    const cut = new FakeConnection();
    const gone: string[] = [];
    watch.watch(live, 3000, () => gone.push("live"));
    watch.watch(cut, 3000, () => gone.push("cut"));
    let lastByte = 0;
    for (let t = 0; t < 20_000; t += 100) {
      if (t % 1000 === 0) {
        live.ping();
        if (t < 5000) {
          cut.ping();
          lastByte = clock.now();
        }
      }
      clock.advance(100);
      if (gone.includes("cut") && lastByte > 0) {
        const after = clock.now() - lastByte;
        expect(after).toBeGreaterThanOrEqual(3000 - 500);
        expect(after).toBeLessThanOrEqual(3000 + 500);
        lastByte = -1;
      }
    }
    expect(gone).toEqual(["cut"]);
    expect(watch.size).toBe(1);
  });

  it("forgets a connection once unwatched, and stops its timer when nothing is watched", () => {
    const clock = new ManualClock();
    const watch = new SilenceWatch(clock, 500);
    const gone: string[] = [];
    const unwatch = watch.watch(new FakeConnection(), 1000, () => gone.push("a"));
    clock.advance(400);
    unwatch();
    clock.advance(10_000);
    expect(gone).toEqual([]);
    expect(watch.size).toBe(0);
  });

  it("counts no silence for a stall of this process (a late sweep): the bytes of the stall are read after the timers", () => {
    // A clock that can jump without firing timers: the process was stalled.
    const manual = new ManualClock();
    let stall = 0;
    const clock: Clock = { now: () => manual.now() + stall, setTimeout: (fn, ms) => manual.setTimeout(fn, ms), sleep: (ms, signal) => manual.sleep(ms, signal) };
    const watch = new SilenceWatch(clock, 500);
    const gone: string[] = [];
    const c = new FakeConnection();
    watch.watch(c, 3000, () => gone.push("c"));
    stall = 10_000;
    // The sweep due at 500 ms runs 10 s late, before the stall's reads are handled: no byte yet, not silence.
    manual.advance(500);
    expect(gone).toEqual([]);
    c.ping();
    manual.advance(500);
    expect(gone).toEqual([]);
    // Silent from here on: dropped as usual.
    manual.advance(3500);
    expect(gone).toEqual(["c"]);
  });
});

describe("the proxy watches a host that PINGs instead of asking it", () => {
  function serve(pingMs: number, heartbeatMs = 6 * pingMs) {
    const clock = new ManualClock();
    const gone: string[] = [];
    const core = new ProxyCore({ name: "px1", region: "eu", clock, store: new MemoryProxyStore(), log: silentLogger, heartbeatMs: 1000, sweepMs: 1e9, onHostGone: (r) => gone.push(r) });
    core.start();
    const connection = new FakeConnection();
    const link = Object.assign(new FakeLink<AgentStreamResponse, AgentStreamRequest>(), { connection });
    const served = core.serveHost(link, hostPeer("h1")).catch(() => undefined);
    link.deliver(create(AgentStreamRequestSchema, { hello: { hostId: "h1", heartbeatMs, pingMs }, credits: 0 }));
    return { clock, core, connection, link, served, gone };
  }

  it("a host whose PINGs stop is dropped (UNAVAILABLE, its connection destroyed) after three of its PING intervals", async () => {
    const { clock, core, connection, link, served, gone } = serve(1000);
    await flush();
    // PINGs every interval: held well past three intervals without a frame.
    for (let i = 0; i < 10; i++) {
      connection.ping();
      clock.advance(1000);
      await flush();
    }
    expect(link.isClosed).toBe(false);
    expect(core.connectedHosts).toBe(1);
    expect(gone).toEqual([]);
    // Silent: gone within three intervals and a tick, long before the link heartbeat (3 × 6 intervals).
    clock.advance(3500);
    await flush();
    expect(link.isClosed).toBe(true);
    expect(codeOf(link.closeError)).toBe(Code.Unavailable);
    expect(connection.destroyed).toBe(true);
    await served;
    expect(core.connectedHosts).toBe(0);
    // Counted by its reason (the proxy's host_disconnects_total).
    expect(gone).toEqual(["silent"]);
  });

  it("a host that does not say it PINGs is left to the link heartbeat", async () => {
    const { clock, connection, link, served, gone } = serve(0, 60_000);
    await flush();
    clock.advance(10_000);
    await flush();
    expect(link.isClosed).toBe(false);
    expect(connection.destroyed).toBe(false);
    link.end();
    await served;
    expect(gone).toEqual(["ended"]);
  });
});
