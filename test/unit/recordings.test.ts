import { randomBytes } from "node:crypto";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { LmdbEnv } from "../../common/lmdb.js";
import { silentLogger } from "../../common/logger.js";
import { listSessions, LmdbRecordingStore, Recording, sessionOf, type SessionSummary } from "../../controller/recordings.js";
import { SessionChannel } from "../../gen/rexmesh/v1/session_pb.js";

const envs: LmdbEnv[] = [];
afterAll(async () => {
  for (const e of envs) await e.close();
});

const summary = (id: string, tenant = "acme"): SessionSummary => ({
  id,
  tenant,
  operator: "operator:acme/alice",
  hostId: "h1",
  proxy: "p1",
  kind: "session",
  what: "login shell (tty)",
  startedAt: 0,
  bytesToHost: 0,
  bytesFromHost: 0,
  outcome: "",
  recording: "recording",
});

/** A real LMDB store of `bytes`, as the controller opens it. */
function lmdb(bytes: number) {
  const env = new LmdbEnv({ path: mkdtempSync(join(tmpdir(), "rexmesh-recordings-")), maxBytes: bytes });
  envs.push(env);
  return { env, store: new LmdbRecordingStore(env.db("sessions"), env.db("session-recordings")) };
}

const turn = () => new Promise((r) => setImmediate(r));

describe("session recordings in the controller's store", () => {
  it("stop before the store they share with jobs fills: cut, and the store still takes work", async () => {
    const { env, store } = lmdb(32 << 20);
    const clock = new ManualClock();
    const room = () => (env.usedBytes() > (32 << 20) * 0.75 ? "the controller's store is over 75% full" : undefined);
    const rec = new Recording({ store, clock, log: silentLogger, maxBytes: 1024 ** 3, room }, summary("s1"));
    let failure: string | undefined;
    rec.onFailure((r) => (failure = r));
    await rec.start();
    for (let i = 0; i < 160; i++) {
      rec.add(false, SessionChannel.STDOUT, 0, randomBytes(256 * 1024));
      clock.advance(1);
      await turn();
    }
    await rec.finish("exited 0");
    expect(rec.summary.recording).toBe("cut");
    expect(failure).toMatch(/store is over 75% full/);
    expect(rec.summary.bytesFromHost).toBe(160 * 256 * 1024);
    expect(() => env.checkRoomForWork("a job")).not.toThrow();
  }, 60_000);

  it("count what each piece costs in the store against the limit, and keep a flood of tiny pieces as one", async () => {
    const { env, store } = lmdb(256 << 20);
    const clock = new ManualClock();
    const before = env.usedBytes();
    const max = 1 << 20;
    const rec = new Recording({ store, clock, log: silentLogger, maxBytes: max }, summary("s2"));
    await rec.start();
    // One byte a millisecond: nothing to merge, each piece costs its overhead.
    for (let i = 0; i < max; i++) {
      rec.add(true, SessionChannel.STDIN, 0, Buffer.of(i & 0xff));
      clock.advance(1);
      if (i % 4096 === 0) await turn();
    }
    await rec.finish("exited 0");
    expect(rec.summary.recording).toBe("cut");
    expect(env.usedBytes() - before).toBeLessThan(4 * max);
    // A flood within one millisecond: one piece.
    const flood = new Recording({ store, clock, log: silentLogger, maxBytes: max }, summary("s3"));
    await flood.start();
    for (let i = 0; i < 1000; i++) flood.add(true, SessionChannel.STDIN, 0, Buffer.of(65 + (i % 26)));
    await flood.finish("exited 0");
    const chunks = [...store.events("s3")].flat();
    expect(chunks).toHaveLength(1);
    expect(Buffer.from(chunks[0]![4]).length).toBe(1000);
    expect(flood.summary.recording).toBe("complete");
  }, 60_000);

  it("list a tenant's sessions newest first without another tenant's, and find one only in its tenant", async () => {
    const { store } = lmdb(64 << 20);
    const clock = new ManualClock();
    for (const [id, tenant] of [["s1", "acme"], ["s2", "other"], ["s3", "acme"]] as const) {
      const r = new Recording({ store, clock, log: silentLogger, maxBytes: 1 << 20 }, summary(id, tenant));
      await r.start();
      await r.finish("exited 0");
    }
    expect(listSessions(store, "acme").map((s) => s.id)).toEqual(["s3", "s1"]);
    expect(sessionOf(store, "acme", "s1").id).toBe("s1");
    expect(() => sessionOf(store, "acme", "s2")).toThrow(/not found/);
  });
});
