/**
 * The controller's real link handler (controller/proxy-link.ts) with a real
 * JobManager, linked in-process to a proxy under test (proxy-harness.ts):
 * two FakeLinks joined by a pump that the test turns, so that it decides
 * when each side reads what the other sent. For the proxy's tests of what
 * the controller holds back, asks to replay and acknowledges.
 */
import { create } from "@bufbuild/protobuf";
import type { ManualClock } from "../../common/clock.js";
import { silentLogger } from "../../common/logger.js";
import { Inventory } from "../../controller/inventory.js";
import { MemoryJobStore } from "../../controller/job-store.js";
import { JobManager } from "../../controller/jobs.js";
import { hasChunk } from "../../controller/output-ranges.js";
import { serveProxyLink } from "../../controller/proxy-link.js";
import type { Revocations } from "../../controller/revocation.js";
import type { ProxyStreamRequest, ProxyStreamResponse } from "../../gen/rexmesh/v1/proxy_link_pb.js";
import { SignedDenyListSchema } from "../../gen/rexmesh/v1/revocation_pb.js";
import { TaskState } from "../../gen/rexmesh/v1/task_pb.js";
import type { ProxyCore } from "../../proxy/proxy.js";
import type { ControllerSide, HostSide } from "./proxy-harness.js";
import { counterIds, FakeLink, flush, operator, RecordingPort, status, submitRequest, testSigning } from "./support.js";

/**
 * A controller whose host h1 (tenant acme, region eu) is held by another
 * proxy, pxA, when the test starts: tasks submitted go there. The proxy
 * under test is px1 of region eu; what it sends on h1's tasks is held back
 * until h1 proves its presence through it.
 */
export function realController(clock: ManualClock) {
  const inventory = new Inventory();
  const store = new MemoryJobStore();
  const jobs = new JobManager({ store, inventory, clock, ids: counterIds(), log: silentLogger, defaultLostAfterMs: 3_600_000, cancelGraceMs: 10_000 });
  jobs.start();
  const pxA = new RecordingPort("pxA");
  jobs.proxyConnected(pxA);
  jobs.hostConnected(inventory.connected({ id: "h1", tenant: "acme" }, "eu", "pxA", clock.now()));
  const revocations = { current: create(SignedDenyListSchema), onChange: () => () => undefined, isRevoked: () => false } as unknown as Revocations;
  const deps = { jobs, inventory, clock, log: silentLogger, heartbeatMs: 10_000, signer: testSigning().signer, revocations };

  /** A task for h1, started through pxA (so its host ran it before it failed over to px1). */
  const runningTask = async (): Promise<string> => {
    const job = await jobs.submit(operator("acme"), submitRequest());
    const id = job.taskIds[0]!;
    await jobs.applyStatus(pxA, status(id, TaskState.RUNNING, { hostId: "h1" }));
    return id;
  };

  /** Whether the controller's store holds chunk `seq` of a task. */
  const stored = (taskId: string, seq: number): boolean => {
    const task = store.getTask(taskId);
    return task !== undefined && hasChunk(task, seq);
  };

  /** Opens a link between the proxy and this controller; frames cross it only when the test passes them. */
  const link = (core: ProxyCore) => {
    const proxySide: ControllerSide = new FakeLink();
    const controllerSide = new FakeLink<ProxyStreamResponse, ProxyStreamRequest>();
    const proxyServed = core.serveController(proxySide).catch((e: unknown) => e);
    const controllerServed = serveProxyLink(deps, controllerSide, { role: "proxy", scope: "eu", id: "px1" }).catch((e: unknown) => e);
    let upPassed = 0;
    let downPassed = 0;
    const wire = {
      proxySide,
      controllerSide,
      /** Frames the proxy sent that the controller has not read yet. */
      pendingUp: () => proxySide.sent.slice(upPassed),
      /** The controller reads up to `frames` of the frames the proxy sent. */
      up(frames = Infinity): void {
        for (let i = 0; i < frames && upPassed < proxySide.sent.length; i++) controllerSide.deliver(proxySide.sent[upPassed++]!);
      },
      /** The proxy reads up to `frames` of the frames the controller sent. */
      down(frames = Infinity): void {
        for (let i = 0; i < frames && downPassed < controllerSide.sent.length; i++) proxySide.deliver(controllerSide.sent[downPassed++]!);
      },
      /** Both sides read everything, until neither sends more. */
      async settle(): Promise<void> {
        for (let rounds = 0; rounds < 100; rounds++) {
          await flush();
          if (upPassed === proxySide.sent.length && downPassed === controllerSide.sent.length) return;
          wire.up();
          wire.down();
        }
        throw new Error("the link did not settle");
      },
      /** The link drops with whatever was not read yet. */
      async cut(): Promise<void> {
        proxySide.close();
        controllerSide.close();
        await Promise.all([proxyServed, controllerServed]);
      },
    };
    return wire;
  };

  return { jobs, store, inventory, pxA, runningTask, stored, link };
}

/** The presence nonce the proxy last passed to a host (from the controller's welcome). */
export function nonceSentTo(host: HostSide): Uint8Array {
  const frame = host.sent.findLast((f) => f.presenceNonce.length > 0);
  if (!frame) throw new Error("the proxy has passed no presence nonce to the host");
  return frame.presenceNonce;
}
