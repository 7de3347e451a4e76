import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { Prng } from "../../chaos/prng.js";
import { ManualClock } from "../../common/clock.js";
import { LIMITS } from "../../common/limits.js";
import { ENDED_OK, relaySession, SessionPort } from "../../common/session-port.js";
import { newKeyHalf, SealedPort, sessionSecret } from "../../common/session-seal.js";
import { SessionChannel, SessionExitSchema, SessionFrameSchema, SessionResumeSchema, type SessionFrame } from "../../gen/rexmesh/v1/session_pb.js";
import { flush, hostPeer, testSigning, WiredLink, wire } from "./support.js";
import { SessionRelays } from "../../proxy/session-relay.js";
import { silentLogger } from "../../common/logger.js";
import { codeOf } from "../../common/rpc-errors.js";
import { SessionOrderSchema } from "../../gen/rexmesh/v1/session_pb.js";
import { AgentSessionRequestSchema, type AgentSessionRequest, type AgentSessionResponse } from "../../gen/rexmesh/v1/agent_link_pb.js";
import type { ProxySessionRequest, ProxySessionResponse } from "../../gen/rexmesh/v1/proxy_link_pb.js";

/**
 * Resuming a session whose leg was cut (docs/sessions.md, "Resume"), as
 * pure logic: the controller's and the host's sealed ends over in-memory
 * hops, a relay of two ports for each proxy, and proxies that die with
 * frames in flight (everything queued in them and on their wires is lost).
 * The handshake is the one the roles run: the host asks with
 * resumeRequest(), the controller checks it with acceptResume(), the host
 * checks the answer, and both take up the session on the new hop.
 */

type F = { frame?: SessionFrame };
const W = LIMITS.sessionWindowBytes;
const port = (link: WiredLink<F, F>, clock: ManualClock, peerSends: "input" | "output", peer: string) =>
  new SessionPort<F, F>(link, { clock, wrap: (frame) => ({ frame }), unwrap: (m) => m.frame, peer, peerSends, sealed: true });

function agreedKey(): Buffer {
  const c = newKeyHalf();
  const h = newKeyHalf();
  return sessionSecret(c, h.publicKey, "s1", c.publicKey, h.publicKey);
}

const cutError = () => new ConnectError("the proxy's process was killed", Code.Unavailable);

/** A proxy between the controller's and the host's hops: two wires and a relay; kill() loses all it holds. */
function proxy(clock: ManualClock) {
  const [cLink, upLink] = wire<F, F>();
  const [downLink, hLink] = wire<F, F>();
  const up = port(upLink, clock, "input", "controller");
  const down = port(downLink, clock, "output", "host");
  const relayed = relaySession(up, down, { passCuts: true });
  const cut = (a: WiredLink<F, F>, b: WiredLink<F, F>) => {
    // Both directions fail at once and whatever was on the wire is dropped (AsyncQueue drops on an error close).
    b.close(cutError());
    a.close(cutError());
  };
  return {
    controllerSide: port(cLink, clock, "output", "proxy"),
    hostSide: port(hLink, clock, "input", "proxy"),
    relayed,
    kill: () => {
      cut(cLink, upLink);
      cut(hLink, downLink);
    },
    /** Only the host's leg fails: the proxy passes the cut on to the controller. */
    cutHostLeg: () => cut(hLink, downLink),
    /** Only the controller's leg fails: the proxy passes the cut on to the host. */
    cutControllerLeg: () => cut(cLink, upLink),
    /** The host's end of its leg fails, and nothing else notices: the proxy goes on holding the controller's leg. */
    cutAtHostOnly: () => {
      hLink.other = undefined;
      hLink.close(cutError());
    },
  };
}

/** The two ends, joined through a first proxy, recording what each is handed. */
function session(clock: ManualClock, windowMs = 60_000) {
  const key = agreedKey();
  const first = proxy(clock);
  const controller = new SealedPort(first.controllerSide, key, "controller", { clock, windowMs });
  const host = new SealedPort(first.hostSide, key, "host", { clock, windowMs });
  const got = { input: [] as Buffer[], output: [] as Buffer[], signals: [] as string[], exit: undefined as number | undefined, started: 0 };
  controller.start({ data: (_c, d) => (got.output.push(Buffer.from(d)), controller.consumed(d.length)), exit: (e) => (got.exit = e.code) });
  host.start({ start: () => got.started++, data: (_c, d) => (got.input.push(Buffer.from(d)), host.consumed(d.length)), signal: (s) => got.signals.push(s) });
  /** The host dials a new proxy and asks to resume; the controller answers; both take up the session. */
  const resume = () => {
    const next = proxy(clock);
    const request = host.resumeRequest();
    const answer = controller.acceptResume(request);
    controller.resume(next.controllerSide, request);
    host.checkResumed(answer);
    host.resume(next.hostSide, answer);
    return next;
  };
  return { controller, host, got, first, resume };
}

async function settle(until: () => boolean, turns = 2000) {
  for (let i = 0; i < turns && !until(); i++) await flush(2);
}

describe("a session resumes after its leg is cut", () => {
  it("a proxy killed with output and input in flight: both ends pause, resume through a new proxy, and every byte arrives once, in order", async () => {
    const clock = new ManualClock();
    const s = session(clock);
    const out = Buffer.alloc(3 * W + 777, 0);
    for (let i = 0; i < out.length; i++) out[i] = (i * 31 + (i >> 8)) & 0xff;
    const inp = Buffer.from(Array.from({ length: 20_000 }, (_, i) => `line ${i}\n`).join(""));
    s.host.sendData(SessionChannel.STDOUT, out);
    s.controller.sendData(SessionChannel.STDIN, inp);
    await flush(3);
    // Part of it is through, part is in the proxy and on its wires when it dies.
    const before = Buffer.concat(s.got.output).length;
    expect(before).toBeGreaterThan(0);
    expect(before).toBeLessThan(out.length);
    s.first.kill();
    await flush(3);
    expect(s.controller.paused).toBe(true);
    expect(s.host.paused).toBe(true);
    s.resume();
    s.host.sendExit(create(SessionExitSchema, { code: 3 }));
    s.host.end(ENDED_OK);
    await settle(() => s.got.exit !== undefined && Buffer.concat(s.got.input).length === inp.length);
    expect(Buffer.concat(s.got.output).equals(out)).toBe(true);
    expect(Buffer.concat(s.got.input).equals(inp)).toBe(true);
    expect(s.got.exit).toBe(3);
    expect(await s.controller.ended).toEqual(ENDED_OK);
    expect(s.got.started).toBe(1);
  });

  it("the exit is not lost to a cut: the host's end waits until the controller has opened it", async () => {
    const clock = new ManualClock();
    const s = session(clock);
    s.host.sendData(SessionChannel.STDOUT, Buffer.from("last words\n"));
    s.host.sendExit(create(SessionExitSchema, { code: 9 }));
    s.host.end(ENDED_OK);
    // The proxy dies before anything of it went on (nothing has been flushed yet).
    s.first.kill();
    await flush(3);
    let hostEnded = false;
    s.host.ended.then(() => (hostEnded = true)).catch(() => undefined);
    await flush(3);
    expect(hostEnded).toBe(false);
    s.resume();
    await settle(() => s.got.exit !== undefined);
    expect(Buffer.concat(s.got.output).toString()).toBe("last words\n");
    expect(s.got.exit).toBe(9);
    expect(await s.host.ended).toEqual(ENDED_OK);
    expect(await s.controller.ended).toEqual(ENDED_OK);
  });

  it("a cut not noticed at the controller: the new leg takes over from the old one, which is let go", async () => {
    const clock = new ManualClock();
    const s = session(clock);
    s.controller.sendData(SessionChannel.STDIN, Buffer.from("abc"));
    await flush(4);
    s.first.cutAtHostOnly();
    await flush(3);
    expect(s.host.paused).toBe(true);
    expect(s.controller.paused).toBe(false);
    s.controller.sendData(SessionChannel.STDIN, Buffer.from("def"));
    s.resume();
    s.controller.sendSignal("INT");
    await settle(() => s.got.signals.length > 0 && Buffer.concat(s.got.input).length === 6);
    expect(Buffer.concat(s.got.input).toString()).toBe("abcdef");
    expect(s.got.signals).toEqual(["INT"]);
    // The old proxy's relay ended: the controller let its old leg go.
    const r = await s.first.relayed;
    expect(r.end.code).toBe(Code.Aborted);
  });

  it("a session not resumed within its window ends UNAVAILABLE, saying so", async () => {
    const clock = new ManualClock();
    const s = session(clock, 30_000);
    s.first.kill();
    await flush(3);
    expect(s.controller.paused).toBe(true);
    clock.advance(30_000);
    const end = await s.controller.ended;
    expect(end.code).toBe(Code.Unavailable);
    expect(end.message).toMatch(/did not resume within 30s/);
  });

  it("without a resume window a cut ends the session as before", async () => {
    const clock = new ManualClock();
    const s = session(clock, 0);
    s.first.kill();
    expect((await s.controller.ended).code).toBe(Code.Unavailable);
    expect((await s.host.ended).code).toBe(Code.Unavailable);
  });

  it("a resume not made with the session's key, or made before, is refused and leaves the session as it was", async () => {
    const clock = new ManualClock();
    const s = session(clock);
    s.first.kill();
    await flush(3);
    const request = s.host.resumeRequest();
    // A proxy makes one up, or changes the counts of the host's.
    const forged = create(SessionResumeSchema, { attempt: 7, dataOpened: 0n, urgentOpened: 0n, mac: Buffer.alloc(32) });
    expect(() => s.controller.acceptResume(forged)).toThrow(expect.objectContaining({ code: Code.PermissionDenied }));
    expect(() => s.controller.acceptResume({ ...request, dataOpened: request.dataOpened + 1n })).toThrow(/not made by its host/);
    const answer = s.controller.acceptResume(request);
    // The same request again (a replay) is refused; so is an answer changed on the way back.
    expect(() => s.controller.acceptResume(request)).toThrow(/not newer than attempt 1/);
    expect(() => s.host.checkResumed({ ...answer, dataOpened: answer.dataOpened + 1n })).toThrow(/not the controller's/);
    expect(s.controller.paused).toBe(true);
  });

  it("counts that do not fit what was sealed end the session DATA_LOSS instead of losing or repeating bytes", async () => {
    const clock = new ManualClock();
    const s = session(clock);
    s.controller.sendData(SessionChannel.STDIN, Buffer.from("abc"));
    await flush(4);
    s.first.kill();
    await flush(3);
    const next = proxy(clock);
    // The host claims to have opened more records than the controller ever sealed.
    s.controller.resume(next.controllerSide, create(SessionResumeSchema, { dataOpened: 99n, urgentOpened: 1n }));
    const end = await s.controller.ended;
    expect(end.code).toBe(Code.DataLoss);
    expect(end.message).toMatch(/opened 99 input records, but the stream has only 1/);
  });

  it("resizes, signals and input given while the leg is cut arrive after the resume in a valid order (the review's DATA_LOSS)", async () => {
    const clock = new ManualClock();
    const s = session(clock);
    const sizes: string[] = [];
    await flush(4);
    s.first.kill();
    await flush(4);
    s.controller.sendData(SessionChannel.STDIN, Buffer.from("a"));
    // A terminal resized over and over during the pause keeps only its latest size: no record piles up.
    for (let i = 0; i < 2 * LIMITS.sessionUnopenedControl; i++) {
      s.controller.sendResize({ cols: 80 + (i % 50), rows: 30 } as never);
      await flush(1);
    }
    s.controller.sendSignal("INT");
    await flush(2);
    s.controller.sendData(SessionChannel.STDIN, Buffer.from("b"));
    s.resume();
    await settle(() => s.got.signals.length > 0 && Buffer.concat(s.got.input).length === 2);
    expect(Buffer.concat(s.got.input).toString()).toBe("ab");
    expect(s.got.signals).toEqual(["INT"]);
    expect(s.controller.paused || s.host.paused).toBe(false);
    void sizes;
  });

  it("a cut just after the host's close, with the exit at the controller, ends the session OK with its exit", async () => {
    const clock = new ManualClock();
    const s = session(clock);
    await flush(4);
    s.host.sendExit(create(SessionExitSchema, { code: 7 }));
    s.host.end(ENDED_OK);
    s.host.ended.then(() => s.first.kill()).catch(() => undefined);
    expect(await s.host.ended).toEqual(ENDED_OK);
    expect(await s.controller.ended).toEqual(ENDED_OK);
    expect(s.got.exit).toBe(7);
  });

  it("a port forward's many connections, each within its window, do not trip the bound on unopened records", async () => {
    const clock = new ManualClock();
    const s = session(clock);
    let got = 0;
    const key = agreedKey();
    const first = proxy(clock);
    const controller = new SealedPort(first.controllerSide, key, "controller", { clock, windowMs: 30_000 });
    const host = new SealedPort(first.hostSide, key, "host", { clock, windowMs: 30_000 });
    controller.start({ data: (_c, d) => ((got += d.length), controller.consumed(d.length)), conn: () => undefined });
    host.start({ start: () => undefined, data: (_c, d) => host.consumed(d.length) });
    await flush(4);
    // What ForwardMux does: each connection sends up to its own window at once, whatever the session's queue.
    for (let id = 1; id <= 40; id++) host.sendData(SessionChannel.CONN, Buffer.alloc(LIMITS.forwardWindowBytes, id), undefined, id);
    await settle(() => got === 40 * LIMITS.forwardWindowBytes);
    expect(got).toBe(40 * LIMITS.forwardWindowBytes);
    let ended = false;
    host.ended.then(() => (ended = true)).catch(() => undefined);
    await flush(2);
    expect(ended).toBe(false);
    void s;
  });

  it("a relay that says records were opened before they left on its hop ends the session DATA_LOSS, instead of the end queueing without bound", async () => {
    const clock = new ManualClock();
    const [cLink, pLink] = wire<F, F>();
    const controller = new SealedPort(port(cLink, clock, "output", "proxy"), agreedKey(), "controller", { clock, windowMs: 30_000 });
    controller.start({ data: () => undefined });
    let credited = 0;
    controller.sendData(SessionChannel.STDIN, Buffer.alloc(64 * 1024, 0x61), (n) => (credited += n));
    await flush(2);
    // The proxy grants nothing (nothing leaves the controller) and claims all four records opened.
    pLink.send({ frame: create(SessionFrameSchema, { opened: { data: 4n, urgent: 1n } as never }) });
    const end = await controller.ended;
    expect(end.code).toBe(Code.DataLoss);
    expect(end.message).toMatch(/opened 4 input records, but the hop carried only 0/);
    expect(credited).toBe(0);
  });

  it("a relay that swallows the count of opened records cannot hold the host's end open past the resume window", async () => {
    const clock = new ManualClock();
    const key = agreedKey();
    const [cLink, hLink] = wire<F, F>();
    // The proxy passes everything on except the controller's counts.
    const toHost = hLink.deliver.bind(hLink);
    hLink.deliver = (m: F) => (m.frame?.opened ? undefined : toHost(m));
    const controller = new SealedPort(port(cLink, clock, "output", "proxy"), key, "controller", { clock, windowMs: 30_000 });
    const host = new SealedPort(port(hLink, clock, "input", "proxy"), key, "host", { clock, windowMs: 30_000 });
    controller.start({ data: (_c, d) => controller.consumed(d.length) });
    host.start({ start: () => undefined, data: (_c, d) => host.consumed(d.length) });
    await flush(4);
    host.sendExit(create(SessionExitSchema, { code: 0 }));
    host.end(ENDED_OK);
    let ended = false;
    host.ended.then(() => (ended = true)).catch(() => undefined);
    await flush(6);
    expect(ended).toBe(false);
    clock.advance(30_000);
    expect(await host.ended).toEqual(ENDED_OK);
  });

  it("with a peer from before resume (no window) nothing is kept: a transfer past the bound on unopened records goes through", async () => {
    const clock = new ManualClock();
    const s = session(clock, 0);
    const big = Buffer.alloc(2 * LIMITS.sessionUnopenedBytes, 0x5a);
    s.host.sendData(SessionChannel.STDOUT, big);
    s.host.sendExit(create(SessionExitSchema, { code: 0 }));
    s.host.end(ENDED_OK);
    await settle(() => s.got.exit !== undefined);
    expect(Buffer.concat(s.got.output).equals(big)).toBe(true);
    expect(await s.controller.ended).toEqual(ENDED_OK);
  });

  it("holds a seeded schedule of faults with data flowing both ways: proxies killed, legs cut on either side, nothing lost or repeated", async () => {
    for (let seed = 1; seed <= 12; seed++) {
      const prng = new Prng(seed);
      const clock = new ManualClock();
      const s = session(clock);
      const sentOut: Buffer[] = [];
      const sentIn: Buffer[] = [];
      let proxyNow = s.first;
      let faults = 0;
      for (let step = 0; step < 120; step++) {
        const r = prng.next();
        if (r < 0.4 && s.host.queuedBytes < W) {
          const b = prng.bytes(prng.int(1, 40_000));
          sentOut.push(b);
          s.host.sendData(SessionChannel.STDOUT, b);
        } else if (r < 0.75 && s.controller.queuedBytes < W) {
          const b = prng.bytes(prng.int(1, 20_000));
          sentIn.push(b);
          s.controller.sendData(SessionChannel.STDIN, b);
        } else if (r < 0.85) {
          faults++;
          const kind = prng.int(0, 3);
          if (kind === 0) proxyNow.kill();
          else if (kind === 1) proxyNow.cutHostLeg();
          else if (kind === 2) proxyNow.cutControllerLeg();
          else proxyNow.cutAtHostOnly();
          await flush(prng.int(1, 4));
          if (s.host.paused) proxyNow = s.resume();
        }
        await flush(prng.int(0, 3));
      }
      s.host.sendExit(create(SessionExitSchema, { code: seed }));
      s.host.end(ENDED_OK);
      const inLen = Buffer.concat(sentIn).length;
      await settle(() => s.got.exit !== undefined && Buffer.concat(s.got.input).length >= inLen, 5000);
      expect(faults, `seed ${seed}`).toBeGreaterThan(3);
      expect(Buffer.concat(s.got.output).equals(Buffer.concat(sentOut)), `seed ${seed}: output`).toBe(true);
      expect(Buffer.concat(s.got.input).equals(Buffer.concat(sentIn)), `seed ${seed}: input`).toBe(true);
      expect(s.got.exit, `seed ${seed}`).toBe(seed);
      expect(await s.controller.ended, `seed ${seed}`).toEqual(ENDED_OK);
      expect(s.got.started, `seed ${seed}`).toBe(1);
    }
  });
});

describe("a proxy takes a resumed leg only from the session's own host (a host holding another certificate)", () => {
  /** A proxy's session relays, recording every leg it dials to the controller. */
  function relays() {
    const dialled: unknown[] = [];
    const r = new SessionRelays({
      clock: new ManualClock(),
      log: silentLogger,
      name: "px1",
      offerToHost: () => true,
      dialController: () => {
        const [up] = wire<ProxySessionRequest, ProxySessionResponse>();
        dialled.push(up);
        return up;
      },
    });
    return { r, dialled };
  }
  const order = (hostId: string, tenant: string) =>
    testSigning().signer.signSession(create(SessionOrderSchema, { sessionId: "s1", hostId, tenant, spec: {}, keepaliveMs: 5000, resumeWindowMs: 30_000 }));
  const resumeLeg = (signed: ReturnType<typeof order>) => {
    const [link, host] = wire<AgentSessionResponse, AgentSessionRequest>();
    host.send(create(AgentSessionRequestSchema, { sessionId: "s1", resume: { attempt: 1, mac: Buffer.alloc(32) }, order: signed }));
    return link;
  };

  it("refuses, PERMISSION_DENIED, a resume whose order is another host's or another tenant's, and dials nothing for it", async () => {
    for (const [signed, peer] of [
      [order("h2", "acme"), hostPeer("h1")],
      [order("h1", "beta"), hostPeer("h1")],
    ] as const) {
      const { r, dialled } = relays();
      const err = await r.serveHost(resumeLeg(signed), peer).then(() => undefined, (e: unknown) => e);
      expect(codeOf(err)).toBe(Code.PermissionDenied);
      expect(dialled).toEqual([]);
    }
  });

  it("refuses a resume that carries no order, and holds a host to sessionsPerHost resumed legs at once", async () => {
    const { r, dialled } = relays();
    const [link, host] = wire<AgentSessionResponse, AgentSessionRequest>();
    host.send(create(AgentSessionRequestSchema, { sessionId: "s1", resume: { attempt: 1 } }));
    expect(codeOf(await r.serveHost(link, hostPeer("h1")).then(() => undefined, (e: unknown) => e))).toBe(Code.InvalidArgument);
    // Legs that wait for the controller's answer, which never comes: the next one past the bound is refused.
    for (let i = 0; i < LIMITS.sessionsPerHost; i++) r.serveHost(resumeLeg(order("h1", "acme")), hostPeer("h1")).catch(() => undefined);
    await flush(3);
    expect(dialled.length).toBe(LIMITS.sessionsPerHost);
    expect(codeOf(await r.serveHost(resumeLeg(order("h1", "acme")), hostPeer("h1")).then(() => undefined, (e: unknown) => e))).toBe(Code.ResourceExhausted);
  });
});
