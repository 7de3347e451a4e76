import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { LinkSession } from "../../common/link-session.js";
import { AgentStreamRequestSchema, AgentStreamResponseSchema, type AgentStreamRequest, type AgentStreamResponse } from "../../gen/rexmesh/v1/agent_link_pb.js";
import { FakeLink, flush } from "./support.js";

/** A daemon's end of AgentLink: it measures; the test plays the proxy. */
function dialler() {
  const clock = new ManualClock(0);
  const link = new FakeLink<AgentStreamRequest, AgentStreamResponse>();
  const trips: number[] = [];
  const ls = new LinkSession(link, { clock, empty: () => create(AgentStreamRequestSchema), peer: "proxy", onRoundTrip: (ms) => trips.push(ms) });
  const reading = ls.forEach(() => undefined);
  ls.startHeartbeat(1000);
  return { clock, link, ls, trips, reading };
}

describe("link round trip", () => {
  it("pings once per interval and measures the time to the peer's pong; a pong for another ping is not a measurement", async () => {
    const t = dialler();
    t.clock.advance(500);
    await flush();
    expect(t.link.sent.map((f) => f.ping)).toEqual([1]);
    t.clock.advance(30);
    t.link.deliver(create(AgentStreamResponseSchema, { pong: 7 }));
    await flush();
    expect(t.trips).toEqual([]);
    t.link.deliver(create(AgentStreamResponseSchema, { pong: 1 }));
    await flush();
    expect(t.trips).toEqual([30]);
    // Answered once only.
    t.link.deliver(create(AgentStreamResponseSchema, { pong: 1 }));
    await flush();
    expect(t.trips).toEqual([30]);
    t.clock.advance(970);
    await flush();
    expect(t.link.sent.map((f) => f.ping)).toEqual([1, 2]);
    t.clock.advance(4);
    t.link.deliver(create(AgentStreamResponseSchema, { pong: 2 }));
    await flush();
    expect(t.trips).toEqual([30, 4]);
    t.ls.end("discard");
    t.link.end();
    await t.reading;
  });

  it("adds no frame to an idle link: the ping frame is the heartbeat, and the peer's pong is its own", async () => {
    const t = dialler();
    // The peer: answers every ping with a pong and sends nothing else.
    const clock = t.clock;
    const peerLink = new FakeLink<AgentStreamResponse, AgentStreamRequest>();
    const peer = new LinkSession(peerLink, { clock, empty: () => create(AgentStreamResponseSchema), peer: "host" });
    const peerReading = peer.forEach(() => undefined);
    peer.startHeartbeat(1000);
    let relayedUp = 0;
    let relayedDown = 0;
    for (let ms = 0; ms < 10_000; ms += 100) {
      clock.advance(100);
      await flush();
      for (; relayedUp < t.link.sent.length; relayedUp++) peerLink.deliver(t.link.sent[relayedUp]!);
      await flush();
      for (; relayedDown < peerLink.sent.length; relayedDown++) t.link.deliver(peerLink.sent[relayedDown]!);
      await flush();
    }
    // Ten seconds at one heartbeat a second: about ten frames each way, every one of them a ping or its pong.
    expect(t.link.sent.length).toBeGreaterThanOrEqual(9);
    expect(t.link.sent.length).toBeLessThanOrEqual(11);
    expect(t.link.sent.every((f) => f.ping !== 0)).toBe(true);
    expect(peerLink.sent.length).toBe(t.link.sent.length);
    expect(peerLink.sent.every((f) => f.pong !== 0 && f.ping === 0)).toBe(true);
    expect(t.trips.length).toBe(t.link.sent.length);
    expect(t.link.isClosed || peerLink.isClosed).toBe(false);
    for (const [ls, link, reading] of [
      [t.ls, t.link, t.reading],
      [peer, peerLink, peerReading],
    ] as const) {
      ls.end("discard");
      link.end();
      await reading;
    }
  });

  it("answers a ping in the next frame without measuring anything itself", async () => {
    const clock = new ManualClock(0);
    const link = new FakeLink<AgentStreamResponse, AgentStreamRequest>();
    const ls = new LinkSession(link, { clock, empty: () => create(AgentStreamResponseSchema), peer: "host" });
    const reading = ls.forEach(() => undefined);
    ls.startHeartbeat(1000);
    link.deliver(create(AgentStreamRequestSchema, { ping: 42 }));
    await flush();
    expect(link.sent.map((f) => [f.ping, f.pong])).toEqual([[0, 42]]);
    // Pinged, it waits 1.5 intervals for the next ping before a heartbeat of its own, which carries no ping.
    clock.advance(1000);
    await flush();
    expect(link.sent).toHaveLength(1);
    clock.advance(500);
    await flush();
    expect(link.sent.map((f) => [f.ping, f.pong])).toEqual([
      [0, 42],
      [0, 0],
    ]);
    ls.end("discard");
    link.end();
    await reading;
  });
});
