/**
 * Pings held in memory only at the proxy (proxy/proxy.ts `volatile`), end to
 * end with the controller's own link handler and a proxy on LMDB that is
 * killed and started again: whatever the proxy forgets, the controller sends
 * again, and the ping ends with its host's answer.
 */
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { LmdbEnv } from "../../common/lmdb.js";
import { silentLogger } from "../../common/logger.js";
import { AgentStreamRequestSchema } from "../../gen/rexmesh/v1/agent_link_pb.js";
import { StepSchema, TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import { LmdbProxyStore } from "../../proxy/lmdb-store.js";
import { ProxyCore } from "../../proxy/proxy.js";
import type { HostSide } from "./proxy-harness.js";
import { handed } from "./proxy-harness.js";
import { nonceSentTo, realController } from "./real-controller.js";
import { eventually, FakeLink, flush, hostPeer, operator, status, submitRequest } from "./support.js";

const ping = [create(StepSchema, { tool: { case: "ping", value: {} } })];

/** Lets both sides of the link read everything until `ok` holds (in real time too: LMDB commits in its own thread), at most 5 s. */
const settleUntil = (w: { settle(): Promise<void> }, ok: () => boolean) => eventually(ok, () => w.settle());

describe("a ping held in memory at a proxy that is killed", () => {
  it("is sent again by the controller to the restarted proxy, whether it was waiting there, handed out or answered, and ends SUCCEEDED", async () => {
    const clock = new ManualClock();
    const c = realController(clock);
    const dir = mkdtempSync(join(tmpdir(), "rexmesh-volatile-"));
    const start = async (credits: number) => {
      const env = new LmdbEnv({ path: dir, maxBytes: 64 << 20 });
      const core = new ProxyCore({ name: "px1", region: "eu", clock, store: new LmdbProxyStore(env), log: silentLogger, heartbeatMs: 10_000 });
      core.start();
      const w = c.link(core);
      await w.settle(); // hello and welcome
      const host: HostSide = new FakeLink();
      void core.serveHost(host, hostPeer("h1")).catch(() => undefined);
      const send = (init: MessageInitShape<typeof AgentStreamRequestSchema>) => host.deliver(create(AgentStreamRequestSchema, init));
      send({ hello: { hostId: "h1", heartbeatMs: 0 }, credits });
      await flush();
      send({ presenceNonce: nonceSentTo(host), presenceProof: new Uint8Array([1]), presenceSalt: new Uint8Array([2]) });
      await w.settle(); // h1 is held by px1 now
      const kill = async () => {
        core.stop();
        await w.cut();
        await env.close();
      };
      return { core, w, host, send, kill };
    };
    const state = (id: string) => TaskState[c.store.getTask(id)!.state];

    // 1. Waiting at px1 (no free slot on h1) when px1 dies.
    let p = await start(0);
    const waiting = (await c.jobs.submit(operator("acme"), submitRequest({ steps: ping }))).taskIds[0]!;
    await p.w.settle();
    expect(handed(p.host)).toEqual([]);
    expect(state(waiting)).toBe("PENDING");
    await p.kill();
    p = await start(1);
    await p.w.settle();
    expect(handed(p.host)).toEqual([waiting]);

    // 2. Handed out, its answer lost with the proxy.
    const lost = (await c.jobs.submit(operator("acme"), submitRequest({ steps: ping }))).taskIds[0]!;
    p.send({ credits: 1 });
    await p.w.settle();
    expect(handed(p.host)).toEqual([waiting, lost]);
    await p.kill();
    p = await start(2);
    await p.w.settle();
    expect(handed(p.host).sort()).toEqual([waiting, lost].sort());
    p.send({ statuses: [status(waiting, TaskState.SUCCEEDED, { exitCode: 0, message: "pong" }), status(lost, TaskState.SUCCEEDED, { exitCode: 0, message: "pong" })] });
    await settleUntil(p.w, () => p.core.store.upwardSize() === 0 && p.core.store.allTasks().length === 0);
    expect([state(waiting), state(lost)]).toEqual(["SUCCEEDED", "SUCCEEDED"]);
    // Nothing lingers at the proxy once the controller has the answers.
    expect(p.core.store.allTasks()).toEqual([]);
    expect(p.core.store.upwardSize()).toBe(0);

    // 3. Answered, the answer on its way up (held in memory only) when px1 dies: it is not on disk, and the
    //    controller, never told, sends the ping again.
    const answered = (await c.jobs.submit(operator("acme"), submitRequest({ steps: ping }))).taskIds[0]!;
    p.send({ credits: 1 });
    await settleUntil(p.w, () => handed(p.host).includes(answered));
    p.send({ statuses: [status(answered, TaskState.SUCCEEDED, { exitCode: 0, message: "pong" })] });
    const carries = (f: (typeof p.w.proxySide.sent)[number]) => f.statuses.some((x) => x.taskId === answered) || f.statusRuns.some((r) => r.taskIds.includes(answered));
    await eventually(() => p.w.pendingUp().some(carries));
    expect(p.core.store.upwardSize()).toBe(1);
    await p.kill();
    const env = new LmdbEnv({ path: dir, maxBytes: 64 << 20 });
    expect(new LmdbProxyStore(env).upwardSize()).toBe(0);
    await env.close();
    expect(state(answered)).not.toBe("SUCCEEDED");
    p = await start(1);
    await p.w.settle();
    expect(handed(p.host)).toEqual([answered]);
    p.send({ statuses: [status(answered, TaskState.SUCCEEDED, { exitCode: 0, message: "pong" })] });
    await settleUntil(p.w, () => state(answered) === "SUCCEEDED" && p.core.store.upwardSize() === 0);
    await p.kill();
  });
});
