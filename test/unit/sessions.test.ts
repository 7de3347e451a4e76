import { create, toBinary } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { EscapeScanner } from "../../cli/shell-escape.js";
import { exitStatus } from "../../cli/shell.js";
import { parseForward } from "../../cli/forward.js";
import { ManualClock } from "../../common/clock.js";
import { InvalidArgumentError, ResourceExhaustedError } from "../../common/errors.js";
import type { FrameLink } from "../../common/frame-link.js";
import { LIMITS } from "../../common/limits.js";
import { checkSessionSpec, ReceiveWindow, screenFrame, SendWindow } from "../../common/session-frames.js";
import { ENDED_OK, relaySession, SessionPort, type SessionEnd } from "../../common/session-port.js";
import { TaskRejected } from "../../common/task-signing.js";
import { decide, parsePolicy } from "../../controller/authz.js";
import type { HostRecord } from "../../controller/model.js";
import {
  SessionChannel,
  SessionDataSchema,
  SessionExitSchema,
  SessionFrameSchema,
  SessionGrantSchema,
  SessionOrderSchema,
  SessionSpecSchema,
  SignedSessionOrderSchema,
  type SessionFrame,
} from "../../gen/rexmesh/v1/session_pb.js";
import { SignedTaskSchema } from "../../gen/rexmesh/v1/task_pb.js";
import { flush, operator, taskSpec, testSigning, testVerifier, wire } from "./support.js";

const W = LIMITS.sessionWindowBytes;
const data = (offset: number, bytes: number, channel = SessionChannel.STDOUT) => create(SessionDataSchema, { channel, offset: BigInt(offset), data: new Uint8Array(bytes) });
const grant = (ack: number, window: number) => create(SessionGrantSchema, { ack: BigInt(ack), window });

describe("session credit windows", () => {
  it("sends only within what the peer granted, and refuses a grant that acknowledges bytes never sent or takes one back", () => {
    const w = new SendWindow();
    expect(w.available).toBe(0);
    w.grant(grant(0, 100));
    expect(w.take(60)).toBe(0);
    expect(w.take(40)).toBe(60);
    expect(w.available).toBe(0);
    expect(() => w.take(1)).toThrow(/internal/);
    expect(() => w.grant(grant(101, 100))).toThrow(InvalidArgumentError);
    w.grant(grant(50, 100));
    expect(w.available).toBe(50);
    expect(w.unacked).toBe(50);
    expect(() => w.grant(grant(40, 100))).toThrow(/already acknowledged/);
    // A smaller grant never takes back credit already given.
    w.grant(grant(50, 10));
    expect(w.available).toBe(50);
    expect(() => w.grant(grant(50, LIMITS.sessionWindowMaxBytes + 1))).toThrow(/larger than/);
  });

  it("takes data only at the next offset and within the grant, and grants again in quarters of the window", () => {
    const r = new ReceiveWindow(1000);
    expect(r.grantIsDue()).toBe(true);
    expect(r.grantDue()).toMatchObject({ ack: 0n, window: 1000 });
    expect(r.grantDue()).toBeUndefined();
    r.accept(data(0, 600));
    expect(() => r.accept(data(0, 10))).toThrow(/byte 0, where byte 600 was next/);
    expect(() => r.accept(data(700, 10))).toThrow(InvalidArgumentError);
    expect(() => r.accept(data(600, 401))).toThrow(ResourceExhaustedError);
    r.accept(data(600, 400));
    expect(r.held).toBe(1000);
    r.consumed(200);
    // Less than a quarter taken: no grant on its own, one with a frame that goes anyway.
    expect(r.grantIsDue()).toBe(false);
    expect(r.grantDue()).toBeUndefined();
    expect(r.grantDue(true)).toMatchObject({ ack: 200n, window: 1000 });
    r.consumed(250);
    expect(r.grantDue()).toMatchObject({ ack: 450n });
    expect(() => r.consumed(551)).toThrow(/internal/);
  });
});

describe("what a session frame may hold", () => {
  it("takes from the client's side only input, and from the host's side only output", () => {
    expect(() => screenFrame(create(SessionFrameSchema, { exit: create(SessionExitSchema, { code: 0 }) }), "input")).toThrow(/exit comes only from the host/);
    expect(() => screenFrame(create(SessionFrameSchema, { data: [data(0, 1, SessionChannel.STDOUT)] }), "input")).toThrow(/channel 2/);
    expect(() => screenFrame(create(SessionFrameSchema, { signal: "INT" }), "output")).toThrow(/signal comes only from the client/);
    expect(() => screenFrame(create(SessionFrameSchema, { eof: true }), "output")).toThrow(/end of input/);
    expect(() => screenFrame(create(SessionFrameSchema, { resize: { cols: 80, rows: 24 } }), "output")).toThrow(/resize/);
    screenFrame(create(SessionFrameSchema, { signal: "INT", eof: true, resize: { cols: 80, rows: 24 }, data: [data(0, 5, SessionChannel.STDIN)] }), "input");
    screenFrame(create(SessionFrameSchema, { exit: create(SessionExitSchema, { signal: "SIGKILL" }), data: [data(0, 5, SessionChannel.STDERR)] }), "output");
  });

  it("refuses signals it does not pass on, sizes and counts past the limits, and cuts a long close message", () => {
    expect(() => screenFrame(create(SessionFrameSchema, { signal: "SEGV" }), "input")).toThrow(/not one a session passes on/);
    expect(() => screenFrame(create(SessionFrameSchema, { resize: { cols: 0, rows: 24 } }), "input")).toThrow(/outside/);
    expect(() => screenFrame(create(SessionFrameSchema, { resize: { cols: 80, rows: LIMITS.sessionWindowCells + 1 } }), "input")).toThrow(/outside/);
    expect(() => screenFrame(create(SessionFrameSchema, { data: [data(0, LIMITS.sessionDataBytes + 1)] }), "output")).toThrow(/larger than/);
    expect(() => screenFrame(create(SessionFrameSchema, { data: [data(0, 0)] }), "output")).toThrow(/without bytes/);
    expect(() => screenFrame(create(SessionFrameSchema, { data: Array.from({ length: LIMITS.sessionDataItems + 1 }, (_, i) => data(i, 1)) }), "output")).toThrow(/at most/);
    expect(() => screenFrame(create(SessionFrameSchema, { close: { code: 99, message: "" } }), "output")).toThrow(/no gRPC code/);
    const long = create(SessionFrameSchema, { close: { code: 14, message: "x".repeat(5000) } });
    screenFrame(long, "output");
    expect(long.close!.message.length).toBe(LIMITS.sessionMessageChars);
  });

  it("checks what a session asks to run", () => {
    const spec = (init: Parameters<typeof create<typeof SessionSpecSchema>>[1]) => create(SessionSpecSchema, init);
    checkSessionSpec(spec({ argv: ["top"], tty: true, term: "xterm-256color", window: { cols: 120, rows: 40 } }));
    checkSessionSpec(spec({}));
    expect(() => checkSessionSpec(spec({ argv: ["a\0b"] }))).toThrow(/NUL/);
    expect(() => checkSessionSpec(spec({ argv: [""] }))).toThrow(/program is empty/);
    expect(() => checkSessionSpec(spec({ argv: Array.from({ length: LIMITS.sessionArgs + 1 }, () => "x") }))).toThrow(/at most/);
    expect(() => checkSessionSpec(spec({ term: "xterm;rm -rf /" }))).toThrow(/not a terminal name/);
    expect(() => checkSessionSpec(spec({ tty: true, window: { cols: 99999, rows: 1 } }))).toThrow(/outside/);
  });
});

type F = { frame?: SessionFrame };
const port = (link: FrameLink<F, F>, clock: ManualClock, peerSends: "input" | "output", peer: string) =>
  new SessionPort<F, F>(link, { clock, wrap: (frame) => ({ frame }), unwrap: (m) => m.frame, peer, peerSends });

/** client ⇄ relay ⇄ host, each hop a port on either side. */
function chain(clock: ManualClock) {
  const [clientLink, relayUp] = wire<F, F>();
  const [relayDown, hostLink] = wire<F, F>();
  const client = port(clientLink, clock, "output", "relay");
  const relayClient = port(relayUp, clock, "input", "client");
  const relayHost = port(relayDown, clock, "output", "host");
  const host = port(hostLink, clock, "input", "relay");
  return { client, relayClient, relayHost, host, relayed: relaySession(relayClient, relayHost) };
}

describe("a session through a relay", () => {
  it("passes input and output byte for byte, the exit after all output, and ends every hop", async () => {
    const clock = new ManualClock();
    const c = chain(clock);
    const toClient: Uint8Array[] = [];
    const toHost: Uint8Array[] = [];
    let exit: number | undefined;
    c.client.start({ data: (_ch, d) => (toClient.push(d), c.client.consumed(d.length)), exit: (e) => (exit = e.code) });
    c.host.start({ data: (_ch, d) => (toHost.push(d), c.host.consumed(d.length)) });
    await flush();
    // The relay is done only once its client side has sent the close too: whoever serves that stream ends it then.
    const order: string[] = [];
    const noted = Promise.all([c.relayClient.ended.then(() => order.push("client side closed")), c.relayed.then(() => order.push("relay done"))]);
    c.client.sendData(SessionChannel.STDIN, Buffer.from("echo hi\n"));
    const big = Buffer.alloc(3 * W + 123, 7);
    c.host.sendData(SessionChannel.STDOUT, big);
    c.host.sendExit(create(SessionExitSchema, { code: 7 }));
    c.host.end(ENDED_OK);
    for (let i = 0; i < 200 && exit === undefined; i++) await flush(2);
    expect(Buffer.concat(toHost).toString()).toBe("echo hi\n");
    expect(Buffer.concat(toClient).equals(big)).toBe(true);
    expect(exit).toBe(7);
    expect((await c.relayed).end).toEqual(ENDED_OK);
    await noted;
    expect(order).toEqual(["client side closed", "relay done"]);
    expect(await c.client.ended).toEqual(ENDED_OK);
  });

  it("holds no more than the window at the relay when the client stops reading: the host's output waits at the host", async () => {
    const clock = new ManualClock();
    const c = chain(clock);
    let received = 0;
    c.client.start({ data: (_ch, d) => (received += d.length) }); // never consumed: a reader that stalled
    c.host.start({ data: () => undefined });
    c.host.sendData(SessionChannel.STDOUT, Buffer.alloc(10 * W));
    await flush(50);
    expect(received).toBe(W);
    // At the relay: what the host sent and the client has not taken (held on the host's leg, queued on the
    // client's: the same bytes), at most one window.
    expect(c.relayHost.heldBytes).toBe(W);
    expect(c.relayClient.queuedBytes).toBe(W);
    // The rest is still at the host (where the daemon pauses the process).
    expect(c.host.queuedBytes).toBeGreaterThanOrEqual(8 * W);
    c.client.consumed(received);
    await flush(50);
    expect(received).toBe(2 * W);
    c.client.end({ code: Code.Canceled, message: "bye" });
    expect((await c.host.ended).code).toBe(Code.Canceled);
  });

  it("ends a hop whose peer falls silent after three keep-alive intervals, and passes the reason on", async () => {
    const clock = new ManualClock();
    const c = chain(clock);
    c.client.start({ data: () => undefined });
    // The host's side never starts: no grant, no keep-alive.
    for (let t = 0; t < LIMITS.sessionKeepaliveMs * 4; t += 500) {
      await flush(2);
      clock.advance(500);
    }
    const end: SessionEnd = await c.client.ended;
    expect(end.code).toBe(Code.Unavailable);
    expect(end.message).toMatch(/the host stopped answering: nothing from it for 15 s/);
  });

  it("ends a hop whose peer sends past its credit with RESOURCE_EXHAUSTED", async () => {
    const clock = new ManualClock();
    const [a, b] = wire<F, F>();
    const p = port(a, clock, "output", "host");
    p.start({ data: () => undefined });
    b.send({ frame: create(SessionFrameSchema, { data: [data(0, LIMITS.sessionDataBytes)] }) });
    for (let off = LIMITS.sessionDataBytes; off <= W; off += LIMITS.sessionDataBytes) b.send({ frame: create(SessionFrameSchema, { data: [data(off, LIMITS.sessionDataBytes)] }) });
    const end = await p.ended;
    expect(end.code).toBe(Code.ResourceExhausted);
    // The peer is told why, in a close frame.
    expect(a.sent.at(-1)?.frame?.close?.code).toBe(Code.ResourceExhausted);
  });
});

describe("a relay's limits", () => {
  const limited = (clock: ManualClock, idleMs: number, maxMs: number, outputIsActivity = false) => {
    const [clientLink, relayUp] = wire<F, F>();
    const [relayDown, hostLink] = wire<F, F>();
    const client = port(clientLink, clock, "output", "relay");
    const host = port(hostLink, clock, "input", "relay");
    const relayed = relaySession(port(relayUp, clock, "input", "client"), port(relayDown, clock, "output", "host"), { limits: { clock, idleMs, maxMs, by: "the controller", outputIsActivity } });
    client.start({ data: (_c, d) => client.consumed(d.length) });
    host.start({ data: (_c, d) => host.consumed(d.length) });
    return { client, host, relayed };
  };
  const pass = async (clock: ManualClock, ms: number, each?: () => void) => {
    for (let t = 0; t < ms; t += 500) {
      each?.();
      await flush(3);
      clock.advance(500);
    }
    await flush(3);
  };

  it("ends a session without input for the idle timeout on both sides; input resets it, output and keep-alives do not", async () => {
    const clock = new ManualClock();
    const s = limited(clock, 10_000, 0);
    let ended = false;
    s.relayed.then(() => (ended = true), () => undefined);
    // 30 s of typing: never idle.
    await pass(clock, 30_000, () => s.client.sendData(SessionChannel.STDIN, Buffer.from("x")));
    expect(ended).toBe(false);
    // Then only output, for longer than the timeout.
    await pass(clock, 12_000, () => s.host.sendData(SessionChannel.STDOUT, Buffer.from("tick\n")));
    const r = await s.relayed;
    expect(r.from).toBe("relay");
    expect(r.end).toEqual({ code: Code.DeadlineExceeded, message: "the session was idle (no input) for 10s: ended by the controller" });
    expect(await s.client.ended).toEqual(r.end);
    expect(await s.host.ended).toEqual(r.end);
  });

  it("counts a port forward's output as use: a download or a log stream with no input is not idle", async () => {
    const clock = new ManualClock();
    const s = limited(clock, 10_000, 0, true);
    let ended = false;
    s.relayed.then(() => (ended = true), () => undefined);
    await pass(clock, 30_000, () => s.host.sendData(SessionChannel.STDOUT, Buffer.from("event\n")));
    expect(ended).toBe(false);
    await pass(clock, 12_000);
    expect((await s.relayed).end.message).toBe("the session was idle (no traffic) for 10s: ended by the controller");
  });

  it("ends a session at its maximum duration however busy it is", async () => {
    const clock = new ManualClock();
    const s = limited(clock, 0, 20_000);
    let ended = false;
    s.relayed.then(() => (ended = true), () => undefined);
    await pass(clock, 19_000, () => s.client.sendData(SessionChannel.STDIN, Buffer.from("x")));
    expect(ended).toBe(false);
    await pass(clock, 2_000, () => s.client.sendData(SessionChannel.STDIN, Buffer.from("x")));
    expect((await s.host.ended).message).toBe("the session reached its maximum duration of 20s: ended by the controller");
  });
});

describe("a session hop under a hostile peer", () => {
  it("keeps of a byte waiting for credit only that byte, not the whole message it came in", async () => {
    const clock = new ManualClock();
    const [a, b] = wire<F, F>();
    const p = port(a, clock, "output", "host");
    const held: Uint8Array[] = [];
    p.start({ data: (_ch, d) => held.push(d) });
    await flush(); // its first grant goes out
    // One byte of data inside a 1 MiB message (what a padded frame decodes to: a view into the message's buffer).
    const message = new Uint8Array(1 << 20);
    b.send({ frame: create(SessionFrameSchema, { data: [{ channel: SessionChannel.STDOUT, offset: 0n, data: message.subarray(100, 101) }] }) });
    await flush(5);
    expect(held).toHaveLength(1);
    expect(held[0]!.byteLength).toBe(1);
    expect(held[0]!.buffer.byteLength).toBe(1);
  });

  it("ends a hop whose peer sends a second end of input or a second exit, instead of queueing each", async () => {
    const clock = new ManualClock();
    for (const [peerSends, frame, said] of [
      ["input", { eof: true }, /second end of input/],
      ["output", { exit: { code: 0 } }, /second exit/],
    ] as const) {
      const [a, b] = wire<F, F>();
      const p = port(a, clock, peerSends, "peer");
      let ends = 0;
      p.start({ data: () => undefined, eof: () => ends++, exit: () => ends++ });
      for (let i = 0; i < 1000; i++) b.send({ frame: create(SessionFrameSchema, frame) });
      const end = await p.ended;
      expect(end.code).toBe(Code.InvalidArgument);
      expect(end.message).toMatch(said);
      expect(ends).toBe(1);
    }
  });
});

describe("session orders", () => {
  const order = () =>
    create(SessionOrderSchema, { sessionId: "s1", hostId: "h1", tenant: "acme", spec: { argv: ["bash"], tty: true }, operator: "operator:acme/alice", notAfter: timestampFromMs(Date.UTC(2026, 0, 1) + 20_000) });

  it("are verified with the controller's key, refused altered, and a session signature is never a task's", () => {
    const clock = new ManualClock();
    const verifier = testVerifier(clock);
    const signed = testSigning().signer.signSession(order());
    expect(verifier.verifySession(signed).sessionId).toBe("s1");
    const altered = { ...signed, order: toBinary(SessionOrderSchema, { ...order(), spec: create(SessionSpecSchema, { argv: ["rm", "-rf", "/"] }) }) };
    expect(() => verifier.verifySession(altered)).toThrow(TaskRejected);
    expect(() => verifier.verifySession({ ...signed, signature: new Uint8Array() })).toThrow(/not signed/);
    // The same key and bytes presented as a task: the session prefix makes the signature fail.
    expect(() => verifier.verify(create(SignedTaskSchema, { spec: signed.order, signature: signed.signature, keyId: signed.keyId }))).toThrow(/does not match/);
    // Nor as a task whose bytes are exactly what the order's signature covers (the prefix and the order): with tasks
    // signed over their bare bytes this verified, and decoded as a task of the attacker's making (a review's finding).
    const covered = new Uint8Array(Buffer.concat([Buffer.from("rexmesh session order v1\0"), signed.order]));
    expect(() => verifier.verify(create(SignedTaskSchema, { spec: covered, signature: signed.signature, keyId: signed.keyId }))).toThrow(/does not match/);
    // And a task's signature is never a session order's.
    const task = testSigning().signer.sign(taskSpec("t1", "h1"));
    expect(() => verifier.verifySession(create(SignedSessionOrderSchema, { order: task.spec, signature: task.signature, keyId: task.keyId }))).toThrow(/does not match/);
    expect(() => verifier.verifySession(create(SignedSessionOrderSchema, { order: new Uint8Array(Buffer.concat([Buffer.from("rexmesh task v1\0"), task.spec])), signature: task.signature, keyId: task.keyId }))).toThrow(/does not match/);
  });
});

describe("the session action in the policy", () => {
  const host = (id: string, labels: Record<string, string> = {}): HostRecord => ({ id, tenant: "acme", region: "eu", proxy: "p", connected: true, since: 0, labels });
  const policy = parsePolicy(`
roles:
  star: { hosts: all, actions: ["*"], commands: ["*"], shell: true }
  shells: { hosts: role=web, actions: [session], shell: true }
  tops: { hosts: all, actions: [session], commands: [top, "/usr/bin/*"] }
bindings:
  acme/star: star
  acme/web: shells
  acme/top: tops
`);

  it("allows a port forward only to the role's forwardTo, the host's loopback by default; \"*\" does not grant it", () => {
    const p = parsePolicy(`
roles:
  star: { hosts: all, actions: ["*"] }
  local: { hosts: all, actions: [forward] }
  db: { hosts: role=db, actions: [forward], forwardTo: ["db-*.internal:5432", "[fd00::1]:*"] }
  subnet: { hosts: all, actions: [forward], forwardTo: ["10.0.0.*:5432", "db-*:5432"] }
bindings:
  acme/subnet: subnet
  acme/star: star
  acme/local: local
  acme/db: db
`);
    const h1 = host("h1");
    const dbHost = host("d1", { role: "db" });
    const fwd = (who: string, h: HostRecord, to: string, port: number) => decide(p, operator("acme", who), { action: "forward", host: h, to: { host: to, port } });
    expect(fwd("star", h1, "127.0.0.1", 80).allowed).toBe(false);
    expect(fwd("local", h1, "127.0.0.1", 80).allowed).toBe(true);
    expect(fwd("local", h1, "::1", 443).allowed).toBe(true);
    expect(fwd("local", h1, "LOCALHOST", 8080).allowed).toBe(true);
    const far = fwd("local", h1, "10.0.0.5", 80);
    expect(far).toEqual({ allowed: false, reason: expect.stringMatching(/may not forward to 10\.0\.0\.5:80: no role lists it in forwardTo \(allowed: 127\.0\.0\.1:\*, ::1:\*, localhost:\*; roles: local\)/) as unknown as string });
    expect(fwd("db", dbHost, "db-3.internal", 5432).allowed).toBe(true);
    expect(fwd("db", dbHost, "db-3.internal", 5433).allowed).toBe(false);
    expect(fwd("db", dbHost, "fd00::1", 9).allowed).toBe(true);
    expect(fwd("db", dbHost, "127.0.0.1", 5432).allowed).toBe(false);
    // The role's hosts still decide: a db target through a host the role does not cover.
    expect(fwd("db", h1, "db-3.internal", 5432).allowed).toBe(false);
    // A glob never crosses a label, and an address pattern takes only addresses: a name that resolves anywhere does not pass.
    expect(fwd("subnet", h1, "10.0.0.17", 5432).allowed).toBe(true);
    expect(fwd("subnet", h1, "10.0.0.1.attacker.example", 5432).allowed).toBe(false);
    expect(fwd("subnet", h1, "10.0.0.169.254.169.254.nip.io", 5432).allowed).toBe(false);
    expect(fwd("subnet", h1, "db-7", 5432).allowed).toBe(true);
    expect(fwd("subnet", h1, "db-x.attacker.example", 5432).allowed).toBe(false);
    expect(fwd("db", dbHost, "db-x.attacker.example.internal", 5432).allowed).toBe(false);
    expect(() => parsePolicy("roles: { r: { hosts: all, forwardTo: ['db:70000'] } }")).toThrow(/is not HOST:PORT/);
    expect(() => parsePolicy("roles: { r: { hosts: all, forwardTo: ['no-port'] } }")).toThrow(/is not HOST:PORT/);
  });

  it("takes idle and maximum limits per role, and refuses ones that are not durations or longer than 30 days", () => {
    const p = parsePolicy(`
roles:
  brief: { hosts: all, actions: [session], shell: true, sessionIdle: 5m, sessionMax: 1h }
  endless: { hosts: all, actions: [session], shell: true, sessionIdle: 0, sessionMax: "0" }
`);
    expect([p.roles.get("brief")!.sessionIdleMs, p.roles.get("brief")!.sessionMaxMs]).toEqual([300_000, 3_600_000]);
    expect([p.roles.get("endless")!.sessionIdleMs, p.roles.get("endless")!.sessionMaxMs]).toEqual([0, 0]);
    expect(() => parsePolicy("roles: { r: { hosts: all, sessionIdle: soon } }")).toThrow(/roles.r.sessionIdle: .*is not a duration/);
    expect(() => parsePolicy("roles: { r: { hosts: all, sessionMax: 31d } }")).toThrow(/roles.r.sessionMax: is longer than 30 days/);
    expect(() => parsePolicy("roles: { r: { hosts: all, sessionMax: [1] } }")).toThrow(/must be a duration/);
  });

  it('is not granted by "*": a role names it', () => {
    const d = decide(policy, operator("acme", "star"), { action: "session", host: host("h1"), argv: [] });
    expect(d).toMatchObject({ allowed: false, reason: expect.stringMatching(/may not session/) });
  });

  it("covers the role's hosts only, and a login shell only with the shell tool", () => {
    expect(decide(policy, operator("acme", "web"), { action: "session", host: host("w1", { role: "web" }), argv: [] })).toMatchObject({ allowed: true, role: "shells" });
    expect(decide(policy, operator("acme", "web"), { action: "session", host: host("d1", { role: "db" }), argv: [] })).toMatchObject({ allowed: false, reason: expect.stringMatching(/may not open a session on 1 host outside role shells.*d1/) });
    expect(decide(policy, operator("acme", "top"), { action: "session", host: host("h1"), argv: [] })).toMatchObject({ allowed: false, reason: expect.stringMatching(/login shell runs anything, and role tops does not allow shell/) });
  });

  it("judges a command like an exec step", () => {
    expect(decide(policy, operator("acme", "top"), { action: "session", host: host("h1"), argv: ["top", "-b"] })).toMatchObject({ allowed: true });
    expect(decide(policy, operator("acme", "top"), { action: "session", host: host("h1"), argv: ["/usr/bin/htop"] })).toMatchObject({ allowed: true });
    expect(decide(policy, operator("acme", "top"), { action: "session", host: host("h1"), argv: ["bash"] })).toMatchObject({ allowed: false, reason: expect.stringMatching(/program "bash" is not allowed by role tops/) });
    expect(decide(policy, operator("acme", "top"), { action: "session", host: host("h1"), argv: ["/usr/bin/../../bin/sh"] })).toMatchObject({ allowed: false, reason: expect.stringMatching(/not a normalized absolute path/) });
    // Without a policy every operator may, within its tenant.
    expect(decide(undefined, operator("acme", "anyone"), { action: "session", host: host("h1"), argv: [] })).toMatchObject({ allowed: true });
  });
});

describe("rexmesh forward", () => {
  it("reads [LOCAL_ADDR:]LOCAL_PORT:REMOTE_ADDR:REMOTE_PORT, IPv6 in brackets", () => {
    expect(parseForward("8080:localhost:80")).toEqual({ localHost: "127.0.0.1", localPort: 8080, remoteHost: "localhost", remotePort: 80 });
    expect(parseForward("0.0.0.0:0:10.0.0.5:5432")).toEqual({ localHost: "0.0.0.0", localPort: 0, remoteHost: "10.0.0.5", remotePort: 5432 });
    expect(parseForward("[::1]:8443:[fd00::1]:443")).toEqual({ localHost: "::1", localPort: 8443, remoteHost: "fd00::1", remotePort: 443 });
    for (const bad of ["80", "80:host", "x:80:host:80:9", "8080:host:0", "8080:host:65536", "99999:host:80", "8080::80", "[::1:80:h:80"]) expect(() => parseForward(bad), bad).toThrow(/is not \[LOCAL_ADDR:\]LOCAL_PORT/);
  });
});

describe("rexmesh shell", () => {
  it("reads ~. only at the start of a line, ~~ as one ~, and passes anything else", () => {
    const s = new EscapeScanner();
    const text = (b: Uint8Array) => Buffer.from(b).toString();
    expect(text(s.scan(Buffer.from("ls ~.\r")).send)).toBe("ls ~.\r");
    expect(s.scan(Buffer.from("~")).send.length).toBe(0);
    expect(s.scan(Buffer.from("?"))).toMatchObject({ actions: ["help"] });
    const again = new EscapeScanner();
    expect(text(again.scan(Buffer.from("~~x\r~a")).send)).toBe("~x\r~a");
    const close = new EscapeScanner();
    const r = close.scan(Buffer.from("echo\r~.rest"));
    expect(text(r.send)).toBe("echo\r");
    expect(r.actions).toEqual(["close"]);
  });

  it("exits with the remote code, or 128 + the signal's number", () => {
    expect(exitStatus(create(SessionExitSchema, { code: 7 }))).toBe(7);
    expect(exitStatus(create(SessionExitSchema, { signal: "SIGKILL" }))).toBe(137);
    expect(exitStatus(create(SessionExitSchema, { signal: "SIGINT" }))).toBe(130);
    expect(exitStatus(undefined)).toBe(255);
  });
});
