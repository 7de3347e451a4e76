import { create } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import type { PeerIdentity } from "../../certs/identity.js";
import { ManualClock } from "../../common/clock.js";
import { HostKeyVerifier, HostReporter } from "../../common/host-signing.js";
import { LIMITS } from "../../common/limits.js";
import { ENDED_OK, relaySession, SessionPort, type SessionEnd } from "../../common/session-port.js";
import { newKeyHalf, RECORD_DATA_BYTES, RecordAssembler, RecordOpener, RecordSealer, RecordStream, SealedPort, sessionSecret } from "../../common/session-seal.js";
import { SealedRecordSchema, SessionChannel, SessionExitSchema, SessionFrameSchema, SessionSpecSchema, type SessionFrame, type SignedSessionOrder } from "../../gen/rexmesh/v1/session_pb.js";
import { testCa, testCredentials } from "../test-ca.js";
import { silentLogger } from "../../common/logger.js";
import { SessionBroker } from "../../controller/sessions.js";
import type { HostRecord } from "../../controller/model.js";
import { ProxySessionRequestSchema, type ProxySessionRequest, type ProxySessionResponse } from "../../gen/rexmesh/v1/proxy_link_pb.js";
import { counterIds, FakeLink, flush, operator, testSigning, WiredLink, wire } from "./support.js";

type F = { frame?: SessionFrame };
const W = LIMITS.sessionWindowBytes;
const sealedPort = (link: WiredLink<F, F>, clock: ManualClock, peerSends: "input" | "output", peer: string) =>
  new SessionPort<F, F>(link, { clock, wrap: (frame) => ({ frame }), unwrap: (m) => m.frame, peer, peerSends, sealed: true });

/** Both ends' session key, as the key agreement makes it. */
function agreedKey(sessionId = "s1"): Buffer {
  const c = newKeyHalf();
  const h = newKeyHalf();
  const atController = sessionSecret(c, h.publicKey, sessionId, c.publicKey, h.publicKey);
  const atHost = sessionSecret(h, c.publicKey, sessionId, c.publicKey, h.publicKey);
  expect(atController.equals(atHost)).toBe(true);
  return atController;
}

/**
 * The controller's sealed side ⇄ a proxy ⇄ the host's sealed side. `tamper`
 * is what a compromised proxy does to each frame it passes to the host
 * (undefined: drops it); without it the proxy is an honest relay of two ports.
 */
type Tamper = (f: SessionFrame) => SessionFrame | SessionFrame[] | undefined;
function mesh(clock: ManualClock, tamper?: { toHost?: Tamper; toController?: Tamper }) {
  const key = agreedKey();
  const seen: SessionFrame[] = [];
  let controllerPort: SessionPort<F, F>;
  let hostPort: SessionPort<F, F>;
  let proxyDone: Promise<unknown> = Promise.resolve();
  if (!tamper) {
    const [cLink, upLink] = wire<F, F>();
    const [downLink, hLink] = wire<F, F>();
    controllerPort = sealedPort(cLink, clock, "output", "proxy");
    hostPort = sealedPort(hLink, clock, "input", "proxy");
    const up = sealedPort(upLink, clock, "input", "controller");
    const down = sealedPort(downLink, clock, "output", "host");
    // What the proxy holds: every frame on both of its legs.
    for (const l of [upLink, downLink]) {
      const deliver = l.deliver.bind(l);
      l.deliver = (m: F) => (m.frame && seen.push(m.frame), deliver(m));
    }
    proxyDone = relaySession(up, down);
  } else {
    const [cLink, hLink] = wire<F, F>();
    const toHost = hLink.deliver.bind(hLink);
    const toController = cLink.deliver.bind(cLink);
    const pass = (m: F, t: Tamper | undefined, deliver: (m: F) => void) => {
      const out = m.frame && (t ? t(m.frame) : m.frame);
      for (const f of out === undefined ? [] : Array.isArray(out) ? out : [out]) deliver({ frame: f });
    };
    hLink.deliver = (m: F) => pass(m, tamper.toHost, toHost);
    cLink.deliver = (m: F) => pass(m, tamper.toController, toController);
    controllerPort = sealedPort(cLink, clock, "output", "proxy");
    hostPort = sealedPort(hLink, clock, "input", "proxy");
  }
  const controller = new SealedPort(controllerPort, key, "controller");
  const host = new SealedPort(hostPort, key, "host");
  return { controller, host, seen, proxyDone };
}

/** What each end was handed. */
function record(m: ReturnType<typeof mesh>) {
  const got = { toHost: [] as Buffer[], toController: [] as Buffer[], started: 0, resizes: [] as string[], signals: [] as string[], eof: false, exit: undefined as number | undefined };
  m.controller.start({ data: (_c, d) => (got.toController.push(Buffer.from(d)), m.controller.consumed(d.length)), exit: (e) => (got.exit = e.code) });
  m.host.start({
    start: () => got.started++,
    data: (_c, d) => (got.toHost.push(Buffer.from(d)), m.host.consumed(d.length)),
    resize: (s) => got.resizes.push(`${s.cols}x${s.rows}`),
    signal: (s) => got.signals.push(s),
    eof: () => (got.eof = true),
  });
  return got;
}

async function settle(until: () => boolean) {
  for (let i = 0; i < 400 && !until(); i++) await flush(2);
}

describe("a session sealed end to end between the controller and the host", () => {
  it("passes input, output, resizes, signals, the end of input and the exit through an honest proxy, which sees none of it", async () => {
    const clock = new ManualClock();
    const m = mesh(clock);
    const got = record(m);
    const password = "correct horse battery staple";
    m.controller.sendData(SessionChannel.STDIN, Buffer.from(`${password}\n`));
    m.controller.sendResize({ cols: 120, rows: 40 } as never);
    m.controller.sendSignal("INT");
    m.controller.sendEof();
    // Output larger than every window on the way, cut by the proxy's credit wherever it falls.
    const big = Buffer.alloc(3 * W + 12345);
    for (let i = 0; i < big.length; i++) big[i] = (i * 7 + (i >> 9)) & 0xff;
    m.host.sendData(SessionChannel.STDOUT, big);
    m.host.sendData(SessionChannel.STDERR, Buffer.from(`echo ${password}`));
    m.host.sendExit(create(SessionExitSchema, { code: 7 }));
    m.host.end(ENDED_OK);
    await settle(() => got.exit !== undefined);
    expect(got.started).toBe(1);
    expect(Buffer.concat(got.toHost).toString()).toBe(`${password}\n`);
    expect(got.resizes).toEqual(["120x40"]);
    expect(got.signals).toEqual(["INT"]);
    expect(got.eof).toBe(true);
    expect(Buffer.concat(got.toController).equals(Buffer.concat([big, Buffer.from(`echo ${password}`)]))).toBe(true);
    expect(got.exit).toBe(7);
    expect(await m.controller.ended).toEqual(ENDED_OK);
    // The proxy relayed only sealed bytes: nothing of what was typed or printed is in them.
    const relayed = Buffer.concat(m.seen.flatMap((f) => [...f.data.map((d) => Buffer.from(d.data)), Buffer.from(f.urgent)]));
    expect(relayed.length).toBeGreaterThan(big.length);
    expect(relayed.includes(Buffer.from(password))).toBe(false);
    expect(relayed.includes(big.subarray(1000, 1064))).toBe(false);
    expect(m.seen.every((f) => f.data.every((d) => d.channel === SessionChannel.SEALED) && !f.resize && f.signal === "" && !f.eof && !f.exit)).toBe(true);
  });

  it("holds no more than a window at the proxy when the controller stops reading", async () => {
    const clock = new ManualClock();
    const m = mesh(clock);
    let received = 0;
    m.controller.start({ data: (_c, d) => (received += d.length) }); // never consumed
    m.host.start({ data: () => undefined });
    m.host.sendData(SessionChannel.STDOUT, Buffer.alloc(10 * W));
    await flush(100);
    // Each hop grants one window; records are cut to fit, so what arrives is a window's worth of plain bytes, less framing.
    expect(received).toBeGreaterThan(W - 2 * RECORD_DATA_BYTES);
    expect(received).toBeLessThanOrEqual(W);
    expect(m.host.queuedBytes).toBeGreaterThan(7 * W);
  });

  it("ends the session DATA_LOSS when the proxy alters a byte of input, and hands the host nothing of it", async () => {
    const clock = new ManualClock();
    const m = mesh(clock, {
      toHost: (f) => {
        for (const d of f.data) if (d.data.length > 30) d.data[30]! ^= 1;
        return f;
      },
    });
    const got = record(m);
    m.controller.sendData(SessionChannel.STDIN, Buffer.from("rm -rf /tmp/scratch && echo done\n"));
    const end: SessionEnd = await m.host.ended;
    expect(end.code).toBe(Code.DataLoss);
    expect(end.message).toMatch(/did not open: it was altered, moved or left out/);
    expect(got.toHost).toEqual([]);
    // The controller is told, and ends the session too.
    expect((await m.controller.ended).code).toBe(Code.DataLoss);
  });

  it("ends the session when the proxy leaves out a record, repeats a signal, or turns output back as input", async () => {
    // Left out: the first data item to the host is dropped, the next does not open (its number is the nonce).
    {
      const clock = new ManualClock();
      // The proxy numbers its own hop: it drops the item and moves the later offsets back, so the hop sees no gap.
      let removed: number | undefined;
      const m = mesh(clock, {
        toHost: (f) => {
          if (f.data.length === 0) return f;
          if (removed === undefined) {
            removed = f.data.reduce((n, d) => n + d.data.length, 0);
            return undefined;
          }
          for (const d of f.data) d.offset -= BigInt(removed);
          return f;
        },
      });
      const got = record(m);
      m.controller.sendData(SessionChannel.STDIN, Buffer.from("one\n"));
      await flush(10);
      m.controller.sendData(SessionChannel.STDIN, Buffer.from("two\n"));
      expect((await m.host.ended).code).toBe(Code.DataLoss);
      expect(got.toHost).toEqual([]);
    }
    // Repeated: a signal passed on twice.
    {
      const clock = new ManualClock();
      let urgent = 0;
      const m = mesh(clock, { toHost: (f) => (f.urgent.length > 0 && ++urgent === 2 ? [f, create(SessionFrameSchema, { urgent: f.urgent })] : f) });
      const got = record(m);
      m.controller.sendSignal("TERM");
      expect((await m.host.ended).code).toBe(Code.DataLoss);
      expect(got.signals).toEqual(["TERM"]);
    }
    // Reflected: the host's own sealed output played back to it as the controller's input.
    {
      const clock = new ManualClock();
      let output: Uint8Array | undefined;
      const m = mesh(clock, {
        toController: (f) => ((output ??= f.data[0]?.data.slice()), f),
        toHost: (f) => {
          if (output && f.data[0]) f.data[0].data = output;
          return f;
        },
      });
      const got = record(m);
      m.host.sendData(SessionChannel.STDOUT, Buffer.from("rm -rf ~\n"));
      await settle(() => output !== undefined);
      m.controller.sendData(SessionChannel.STDIN, Buffer.from("ls\n"));
      expect((await m.host.ended).code).toBe(Code.DataLoss);
      expect(got.toHost).toEqual([]);
    }
  });

  it("takes no plain exit, signal or input from the proxy, and counts an OK close without the host's sealed exit as cut off", async () => {
    const plain = [create(SessionFrameSchema, { exit: { code: 0 } }), create(SessionFrameSchema, { signal: "KILL" }), create(SessionFrameSchema, { data: [{ channel: SessionChannel.STDIN, offset: 0n, data: Buffer.from("x") }] })];
    for (const [i, forged] of plain.entries()) {
      const clock = new ManualClock();
      let injected = false;
      // To the controller for an exit, to the host for a signal or input.
      const inject: Tamper = (f) => (injected ? f : ((injected = true), [f, forged]));
      const m = mesh(clock, i === 0 ? { toController: inject } : { toHost: inject });
      const got = record(m);
      m.host.sendData(SessionChannel.STDOUT, Buffer.from("hi"));
      m.controller.sendData(SessionChannel.STDIN, Buffer.from("hi"));
      const end = await (i === 0 ? m.controller.ended : m.host.ended);
      expect(end.code).toBe(Code.InvalidArgument);
      expect(end.message).toMatch(/on a hop that carries only sealed records/);
      expect(got.exit).toBeUndefined();
      expect(got.signals).toEqual([]);
    }
    const clock = new ManualClock();
    const m = mesh(clock, { toController: (f) => (f.data.length > 0 ? create(SessionFrameSchema, { close: { code: 0, message: "" } }) : f) });
    record(m);
    m.host.sendData(SessionChannel.STDOUT, Buffer.from("hi"));
    const end = await m.controller.ended;
    expect(end.code).toBe(Code.Unavailable);
    expect(end.message).toMatch(/closed without the host's exit/);
  });
});

describe("sealed sessions under a hostile proxy or a bursty client (attack review)", () => {
  it("does not let a key-less leg kept alive hold the client: it ends within the hello bound, and at once when the client goes", async () => {
    for (const how of ["silent", "abort"] as const) {
      const clock = new ManualClock();
      let order: SignedSessionOrder | undefined;
      const broker = new SessionBroker({
        clock,
        ids: counterIds(),
        signer: testSigning().signer,
        log: silentLogger,
        idleMs: 0,
        maxMs: 0,
        hostKeys: { checkSessionKey: () => ({ ok: true }) },
        portOf: () => ({ name: "px1", region: "eu", sendTask: () => undefined, sendCancel: () => undefined, openSession: (o) => (order = o) }),
      });
      const host = { id: "h1", tenant: "acme", region: "eu", proxy: "px1", connected: true, since: 0, labels: {} } as HostRecord;
      const abort = new AbortController();
      const opened = broker.open(operator(), host, create(SessionSpecSchema, {}), "s1", abort.signal, { idleMs: 0, maxMs: 0 });
      opened.catch(() => undefined);
      expect(order).toBeDefined();
      const leg = new FakeLink<ProxySessionResponse, ProxySessionRequest>();
      broker.serveLeg(leg, { role: "proxy", scope: "mesh", id: "px1" }).catch(() => undefined);
      leg.deliver(create(ProxySessionRequestSchema, { sessionId: "s1" })); // no key, no refusal: only keep-alives follow
      await flush();
      if (how === "abort") abort.abort();
      for (let t = 0; t < LIMITS.linkHelloMs + 2000; t += 1000) {
        leg.deliver(create(ProxySessionRequestSchema, { frame: create(SessionFrameSchema, {}) }));
        await flush(2);
        clock.advance(1000);
      }
      await expect(opened).rejects.toThrow(how === "abort" ? /the client went away before the session opened/ : /answered the session without a key and without a refusal/);
    }
  });

  it("seals the start first even when the client's opening frame carries a signal, and merges a burst of resizes", async () => {
    const clock = new ManualClock();
    const key = agreedKey();
    const [ctlLegLink, hostLink] = wire<F, F>();
    const ctlClientLink = new FakeLink<F, F>();
    const plain = new SessionPort<F, F>(ctlClientLink, { clock, wrap: (frame) => ({ frame }), unwrap: (m) => m.frame, peer: "client", peerSends: "input" });
    const ctlLeg = new SealedPort(sealedPort(ctlLegLink, clock, "output", "proxy"), key, "controller");
    const host = new SealedPort(sealedPort(hostLink, clock, "input", "proxy"), key, "host");
    const seen: string[] = [];
    host.start({ start: () => seen.push("start"), data: () => undefined, resize: (r) => seen.push(`${r.cols}x${r.rows}`), signal: (x) => seen.push(x) });
    relaySession(plain, ctlLeg, { first: { client: create(SessionFrameSchema, { signal: "INT" }) } }).catch(() => undefined);
    await flush(5);
    for (let i = 0; i < 70; i++) ctlClientLink.deliver({ frame: create(SessionFrameSchema, { resize: { cols: 80 + i, rows: 24 } }) });
    await settle(() => seen.includes("149x24"));
    expect(seen[0]).toBe("start");
    expect(seen).toContain("INT");
    expect(seen.at(-1)).toBe("149x24");
    expect(seen.length).toBeLessThan(70);
  });

  it("refuses a signal the proxy held back past input sealed after it", async () => {
    const clock = new ManualClock();
    let held: Uint8Array | undefined;
    let urgent = 0;
    const m = mesh(clock, {
      toHost: (f) => {
        if (f.urgent.length > 0 && ++urgent === 2) {
          held = f.urgent;
          f.urgent = new Uint8Array();
        }
        if (held && f.data.length > 0) {
          const late = create(SessionFrameSchema, { urgent: held });
          held = undefined;
          return [f, late];
        }
        return f;
      },
    });
    const got = record(m);
    await flush(5);
    m.controller.sendSignal("INT");
    await flush(5);
    m.controller.sendData(SessionChannel.STDIN, Buffer.from("next-command\n"));
    const end = await m.host.ended;
    expect(end.code).toBe(Code.DataLoss);
    expect(end.message).toMatch(/held back on the way/);
    expect(got.signals).toEqual([]);
  });

  it("refuses a record too short to be one at once, without copying what follows", () => {
    expect(() => new RecordAssembler().push(Buffer.alloc(LIMITS.sessionDataBytes))).toThrow(/a sealed session record of 0 bytes \(at least 18\)/);
  });
});

describe("a port forward's connection events (attack review)", () => {
  it("cannot make the controller queue without bound: a client flooding events while the leg is slow has its session ended", async () => {
    const clock = new ManualClock();
    const clientLink = new FakeLink<F, F>();
    const legLink = new FakeLink<F, F>();
    const client = new SessionPort<F, F>(clientLink, { clock, wrap: (frame) => ({ frame }), unwrap: (m) => m.frame, peer: "client", peerSends: "input" });
    const legPort = sealedPort(legLink as unknown as WiredLink<F, F>, clock, "output", "proxy");
    const relayed = relaySession(client, new SealedPort(legPort, agreedKey(), "controller"));
    await flush();
    // The proxy's leg grants nothing; the client sends grants for a connection and no data at all.
    for (let i = 0; i < 100_000; i++) clientLink.deliver({ frame: create(SessionFrameSchema, { conn: { conn: 1, grant: 1 } }) });
    const r = await relayed;
    expect(r.end.code).toBe(Code.ResourceExhausted);
    expect(r.end.message).toMatch(/connection events wait to be passed on/);
    expect(legPort.queuedBytes).toBeLessThan(1 << 20);
  });
});

describe("sealed records", () => {
  it("open only in their stream, in their place, under their key", () => {
    const key = agreedKey();
    const seal = new RecordSealer(key, RecordStream.ToHost);
    const a = seal.seal(create(SealedRecordSchema, { channel: SessionChannel.STDIN, data: Buffer.from("a") }), false);
    const b = seal.seal(create(SealedRecordSchema, { channel: SessionChannel.STDIN, data: Buffer.from("b") }), false);
    // In order: both open.
    const inOrder = new RecordOpener(key, RecordStream.ToHost, "input");
    expect(Buffer.from(inOrder.open(a).data).toString()).toBe("a");
    expect(Buffer.from(inOrder.open(b).data).toString()).toBe("b");
    // Out of order, repeated, in another stream, under another session's key: none opens.
    expect(() => new RecordOpener(key, RecordStream.ToHost, "input").open(b)).toThrow(/did not open/);
    const again = new RecordOpener(key, RecordStream.ToHost, "input");
    again.open(a);
    expect(() => again.open(a)).toThrow(/did not open/);
    expect(() => new RecordOpener(key, RecordStream.FromHost, "output").open(a)).toThrow(/did not open/);
    expect(() => new RecordOpener(agreedKey(), RecordStream.ToHost, "input").open(a)).toThrow(/did not open/);
    expect(() => new RecordOpener(key, RecordStream.ToHost, "input").open(a.subarray(0, 10))).toThrow(/did not open/);
  });

  it("are put together again from pieces cut anywhere, and a length past the limit is refused before it is buffered", () => {
    const key = agreedKey();
    const seal = new RecordSealer(key, RecordStream.FromHost);
    const records = [1, 5000, RECORD_DATA_BYTES].map((n, i) => seal.seal(create(SealedRecordSchema, { channel: SessionChannel.STDOUT, data: Buffer.alloc(n, i + 1) }), true));
    const stream = Buffer.concat(records);
    for (const cut of [1, 3, 4, 7, 1000, 4096, stream.length]) {
      const asm = new RecordAssembler();
      const open = new RecordOpener(key, RecordStream.FromHost, "output");
      const sizes: number[] = [];
      for (let at = 0; at < stream.length; at += cut) for (const r of asm.push(stream.subarray(at, at + cut))) sizes.push(open.open(r).data.length);
      expect(sizes).toEqual([1, 5000, RECORD_DATA_BYTES]);
      expect(asm.pending).toBe(0);
    }
    const huge = Buffer.alloc(4);
    huge.writeUInt32BE(1 << 30);
    expect(() => new RecordAssembler().push(huge)).toThrow(/a sealed session record of 1073741824 bytes/);
  });
});

describe("the session key agreement", () => {
  const clock = new ManualClock(Date.UTC(2026, 0, 1));
  const ca = testCa();
  const host = (id: string): PeerIdentity => ({ role: "host", scope: "acme", id });
  const reporter = (id: string) => new HostReporter(testCredentials(host(id), { clock, validityMs: 86_400_000, ca }), clock, host(id));

  it("takes the host's half only signed by that host's report key, for this session and this controller half", () => {
    const h1 = reporter("h1");
    const h2 = reporter("h2");
    const v = new HostKeyVerifier(ca.certPem, clock);
    expect(v.accept(h1.key, host("h1")).ok).toBe(true);
    expect(v.accept(h2.key, host("h2")).ok).toBe(true);
    const controllerHalf = newKeyHalf().publicKey;
    const hostHalf = newKeyHalf().publicKey;
    const signed = h1.signSessionKey("s1", controllerHalf, hostHalf);
    expect(v.checkSessionKey(signed, host("h1"), "s1", controllerHalf)).toEqual({ ok: true });
    // A proxy's own half under the host's signature; the host's half replayed for another session or another
    // controller half; another host's signature; no key at all: each refused.
    const proxyHalf = newKeyHalf().publicKey;
    expect(v.checkSessionKey({ ...signed, publicKey: proxyHalf }, host("h1"), "s1", controllerHalf).ok).toBe(false);
    expect(v.checkSessionKey(signed, host("h1"), "s2", controllerHalf).ok).toBe(false);
    expect(v.checkSessionKey(signed, host("h1"), "s1", newKeyHalf().publicKey).ok).toBe(false);
    expect(v.checkSessionKey(h2.signSessionKey("s1", controllerHalf, hostHalf), host("h1"), "s1", controllerHalf)).toEqual({ ok: false, reason: "the session key is signed with no valid report key of the host" });
    expect(v.checkSessionKey(undefined, host("h1"), "s1", controllerHalf).ok).toBe(false);
    // A revoked host's key signs no session.
    const revoking = new HostKeyVerifier(ca.certPem, clock, (p) => p.id === "h1");
    revoking.accept(h1.key, host("h1"));
    expect(revoking.checkSessionKey(signed, host("h1"), "s1", controllerHalf).ok).toBe(false);
  });

  it("refuses a half that is no X25519 public key", () => {
    const own = newKeyHalf();
    expect(() => sessionSecret(own, new Uint8Array(31), "s1", own.publicKey, new Uint8Array(31))).toThrow(/31 bytes/);
    // The all-zero point gives no shared secret.
    expect(() => sessionSecret(own, new Uint8Array(32), "s1", own.publicKey, new Uint8Array(32))).toThrow(/not a usable X25519 key/);
  });
});
