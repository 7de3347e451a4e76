/**
 * A ProxyCore under test with its two kinds of link faked: the controller's
 * (one FakeLink per connection) and a host's. Shared by the proxy's unit tests.
 */
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import type { PeerIdentity } from "../../certs/identity.js";
import { ManualClock } from "../../common/clock.js";
import { silentLogger } from "../../common/logger.js";
import { AgentStreamRequestSchema, type AgentStreamRequest, type AgentStreamResponse } from "../../gen/rexmesh/v1/agent_link_pb.js";
import { ProxyStreamResponseSchema, type ProxyStreamRequest, type ProxyStreamResponse } from "../../gen/rexmesh/v1/proxy_link_pb.js";
import { TaskState, type SignedTask, type TaskSpec, type TaskStatus } from "../../gen/rexmesh/v1/task_pb.js";
import { ProxyCore, type ProxyCoreOptions } from "../../proxy/proxy.js";
import type { MemoryProxyStore, ProxyStore } from "../../proxy/store.js";
import { FakeLink, asSigned, hostPeer, signedId } from "./support.js";
import { statusesOfRuns } from "../../common/status-runs.js";

export type ControllerSide = FakeLink<ProxyStreamRequest, ProxyStreamResponse>;
export type HostSide = FakeLink<AgentStreamResponse, AgentStreamRequest>;

const S = (s: TaskStatus) => `${s.taskId}:${TaskState[s.state]}`;
/** Statuses the proxy sent up a controller link, in order, as "task:STATE". */
export const upStatuses = (l: ControllerSide): string[] => l.sent.flatMap((f) => [...statusesOfRuns(f.statusRuns), ...f.statuses].map(S));
/** Output chunks the proxy sent up, in order, as "task:seq". */
export const upOutput = (l: ControllerSide): string[] => l.sent.flatMap((f) => f.output.map((c) => `${c.taskId}:${c.seq}`));
/** Tasks the proxy handed to a host, in order. */
export const handed = (l: HostSide): string[] => l.sent.flatMap((f) => f.tasks.map(signedId));
export const statusAcksTo = (l: HostSide): string[] => l.sent.flatMap((f) => f.statusAcks.map((a) => `${a.taskId}:${TaskState[a.state]}`));

export function proxyHarness<St extends ProxyStore = MemoryProxyStore>(store: St, opts: Pick<ProxyCoreOptions, "sweepMs" | "maxTakenOnPerHost"> = {}) {
  const clock = new ManualClock();
  const core = new ProxyCore({ name: "px1", region: "eu", clock, store, log: silentLogger, heartbeatMs: 10_000, ...opts });
  core.start();

  const connectController = () => {
    const link: ControllerSide = new FakeLink();
    const settled = core.serveController(link).then(
      () => undefined,
      (e: unknown) => e,
    );
    /** A frame from the controller; plain specs are signed as the controller would. */
    const send = (init: Omit<MessageInitShape<typeof ProxyStreamResponseSchema>, "tasks" | "$typeName"> & { tasks?: (TaskSpec | SignedTask)[] }) =>
      link.deliver(create(ProxyStreamResponseSchema, { ...init, tasks: (init.tasks ?? []).map(asSigned) }));
    return { link, settled, send };
  };

  /** A host's stream; `peer` is who its certificate says it is, `claim` the id its hello claims. */
  const connectHost = (hostId: string, credits: number | undefined, o: { peer?: PeerIdentity; claim?: string } = {}) => {
    const link: HostSide = new FakeLink();
    const settled = core.serveHost(link, o.peer ?? hostPeer(hostId)).then(
      () => undefined,
      (e: unknown) => e,
    );
    const send = (init: MessageInitShape<typeof AgentStreamRequestSchema>) => link.deliver(create(AgentStreamRequestSchema, init));
    send({ hello: { hostId: o.claim ?? hostId, heartbeatMs: 0 }, credits });
    return { link, settled, send };
  };

  const future = (ms = 60_000) => clock.now() + ms;
  return { clock, store, core, connectController, connectHost, future };
}
