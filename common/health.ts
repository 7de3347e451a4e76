import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import type { ServiceImpl } from "@connectrpc/connect";
import * as grpc from "@grpc/grpc-js";
import { Health, HealthCheckRequestSchema, HealthCheckResponse_ServingStatus as Status, HealthCheckResponseSchema } from "../gen/grpc/health/v1/health_pb.js";

export { Status as ServingStatus };

/**
 * Whether a role serves, for load balancers and probes (grpc.health.v1).
 * The empty service name stands for the whole process; named services are
 * the rexmesh services it hosts. Draining turns everything NOT_SERVING, so
 * balancers stop sending new work before the process stops.
 */
export class HealthState {
  private readonly statuses = new Map<string, Status>();
  private readonly watchers = new Set<() => void>();

  constructor(services: readonly string[]) {
    this.statuses.set("", Status.SERVING);
    for (const s of services) this.statuses.set(s, Status.SERVING);
  }

  status(service: string): Status {
    return this.statuses.get(service) ?? Status.SERVICE_UNKNOWN;
  }

  /** Everything NOT_SERVING from now on. */
  draining(): void {
    for (const key of this.statuses.keys()) this.statuses.set(key, Status.NOT_SERVING);
    for (const fn of this.watchers) fn();
  }

  /** Calls fn on every change; returns the unsubscribe function. */
  onChange(fn: () => void): () => void {
    this.watchers.add(fn);
    return () => this.watchers.delete(fn);
  }
}

/** The health service for a connect-node router. */
export function healthServiceImpl(state: HealthState): ServiceImpl<typeof Health> {
  return {
    check: async (req) => create(HealthCheckResponseSchema, { status: state.status(req.service) }),
    async *watch(req, ctx) {
      let last: Status | undefined;
      let wake: (() => void) | undefined;
      const off = state.onChange(() => wake?.());
      const onAbort = () => wake?.();
      ctx.signal.addEventListener("abort", onAbort);
      try {
        while (!ctx.signal.aborted) {
          const now = state.status(req.service);
          if (now !== last) {
            last = now;
            yield create(HealthCheckResponseSchema, { status: now });
          }
          await new Promise<void>((resolve) => (wake = resolve));
        }
      } finally {
        off();
        ctx.signal.removeEventListener("abort", onAbort);
      }
    },
  };
}

/** The same health service on a grpc-js server. */
export function addHealthToGrpc(server: grpc.Server, state: HealthState): void {
  const path = (m: string) => `/${Health.typeName}/${m}`;
  const ser = (m: ReturnType<typeof create<typeof HealthCheckResponseSchema>>) => Buffer.from(toBinary(HealthCheckResponseSchema, m));
  const de = (b: Buffer) => fromBinary(HealthCheckRequestSchema, b);
  server.addService(
    {
      check: { path: path("Check"), requestStream: false, responseStream: false, requestSerialize: () => Buffer.alloc(0), requestDeserialize: de, responseSerialize: ser, responseDeserialize: () => undefined },
      watch: { path: path("Watch"), requestStream: false, responseStream: true, requestSerialize: () => Buffer.alloc(0), requestDeserialize: de, responseSerialize: ser, responseDeserialize: () => undefined },
    } as grpc.ServiceDefinition,
    {
      check: (call: grpc.ServerUnaryCall<{ service: string }, unknown>, cb: grpc.sendUnaryData<unknown>) => cb(null, create(HealthCheckResponseSchema, { status: state.status(call.request.service) })),
      watch: (call: grpc.ServerWritableStream<{ service: string }, unknown>) => {
        let last: Status | undefined;
        const send = () => {
          const now = state.status(call.request.service);
          if (now !== last) {
            last = now;
            call.write(create(HealthCheckResponseSchema, { status: now }));
          }
        };
        const off = state.onChange(send);
        call.on("cancelled", off);
        call.on("close", off);
        send();
      },
    },
  );
}
