import http2 from "node:http2";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createConnectRouter, createContextValues } from "@connectrpc/connect";
import type { UniversalServerResponse } from "@connectrpc/connect/protocol";
import * as grpc from "@grpc/grpc-js";
import { describe, expect, it } from "vitest";
import { ManualClock } from "../../common/clock.js";
import { addUnaryMethod, boundUnaryArrival } from "../../common/grpc-link.js";
import { LIMITS } from "../../common/limits.js";
import { boundRequestArrival, failingOnAbort } from "../../common/request-arrival.js";
import { ControllerService, ListHostsResponseSchema } from "../../gen/rexmesh/v1/controller_pb.js";
import { flush } from "./support.js";

/** A request body that sends part of a frame (its prefix says 40 bytes, 10 follow) and never ends. */
function halfSent(): AsyncIterable<Uint8Array> {
  const head = Buffer.from([0, 0, 0, 0, 40, ...Buffer.alloc(10)]);
  let sent = false;
  return {
    [Symbol.asyncIterator]: () => ({
      next: () => {
        if (sent) return new Promise<IteratorResult<Uint8Array>>(() => undefined);
        sent = true;
        return Promise.resolve({ done: false, value: head });
      },
    }),
  };
}

function whole(): AsyncIterable<Uint8Array> {
  return (async function* () {
    yield Buffer.from([0, 0, 0, 0, 0]);
  })();
}

function setup() {
  const clock = new ManualClock();
  const router = createConnectRouter();
  router.rpc(ControllerService.method.listHosts, () => Promise.resolve(create(ListHostsResponseSchema)));
  const handler = boundRequestArrival(router.handlers[0]!, { maxMs: LIMITS.requestArrivalMs, clock });
  const call = (body: AsyncIterable<Uint8Array>, headers: Record<string, string> = {}) => {
    let settled = false;
    const res = handler({
      httpVersion: "2.0",
      method: "POST",
      url: "https://controller/rexmesh.v1.ControllerService/ListHosts",
      header: new Headers({ "content-type": "application/grpc", te: "trailers", ...headers }),
      body,
      signal: new AbortController().signal,
      contextValues: createContextValues(),
    });
    res.then(
      () => (settled = true),
      () => (settled = true),
    );
    return { res, settled: () => settled };
  };
  return { clock, call };
}

/** The gRPC status of a response, after its body. */
async function grpcStatus(res: UniversalServerResponse): Promise<{ code: number; message: string }> {
  for await (const chunk of (res.body ?? []) as AsyncIterable<Uint8Array>) void chunk;
  return { code: Number(res.trailer?.get("grpc-status")), message: decodeURIComponent(res.trailer?.get("grpc-message") ?? "") };
}

describe("the arrival of a unary request is bounded", () => {
  it("answers a request that never completes DEADLINE_EXCEEDED at its grpc-timeout", async () => {
    const t = setup();
    const c = t.call(halfSent(), { "grpc-timeout": "300m" });
    t.clock.advance(299);
    await flush();
    expect(c.settled()).toBe(false);
    t.clock.advance(1);
    expect(await grpcStatus(await c.res)).toEqual({ code: Code.DeadlineExceeded, message: "the request had not arrived by its deadline (300 ms)" });
  });

  it("answers it DEADLINE_EXCEEDED after LIMITS.requestArrivalMs without a grpc-timeout, or with a longer one", async () => {
    for (const headers of [{}, { "grpc-timeout": "10M" }] as Record<string, string>[]) {
      const t = setup();
      const c = t.call(halfSent(), headers);
      t.clock.advance(LIMITS.requestArrivalMs - 1);
      await flush();
      expect(c.settled()).toBe(false);
      t.clock.advance(1);
      expect(await grpcStatus(await c.res)).toEqual({ code: Code.DeadlineExceeded, message: "the request had not arrived within 60 s" });
    }
  });

  it("honours connect-timeout-ms in the Connect protocol", async () => {
    const t = setup();
    const c = t.call(halfSent(), { "content-type": "application/proto", "connect-protocol-version": "1", "connect-timeout-ms": "250" });
    t.clock.advance(250);
    const res = await c.res;
    expect(res.status).toBe(504);
  });

  it("leaves a request that arrived whole alone", async () => {
    const t = setup();
    const c = t.call(whole(), { "grpc-timeout": "300m" });
    const res = await c.res;
    t.clock.advance(LIMITS.requestArrivalMs);
    expect((await grpcStatus(res)).code).toBe(0);
  });
});

describe("a client stream stops at its call's end", () => {
  it("fails the read in flight, and every read after, with the signal's reason", async () => {
    const abort = new AbortController();
    const it = failingOnAbort(halfSent(), abort.signal)[Symbol.asyncIterator]();
    expect((await it.next()).done).toBe(false);
    const pending = it.next();
    const reason = new ConnectError("the operation timed out", Code.DeadlineExceeded);
    abort.abort(reason);
    await expect(pending).rejects.toBe(reason);
    await expect(it.next()).rejects.toBe(reason);
  });
});

/** A manual clock that says when a timer is set. */
class WatchedClock extends ManualClock {
  private onArm: (() => void)[] = [];
  /** Resolves once the next timer is set. */
  armed(): Promise<void> {
    return new Promise((resolve) => this.onArm.push(resolve));
  }
  override setTimeout(fn: () => void, ms: number) {
    const t = super.setTimeout(fn, ms);
    for (const f of this.onArm.splice(0)) f();
    return t;
  }
}

describe("the arrival of a unary request at a grpc-js server is bounded", () => {
  /** A grpc-js server (plain HTTP/2 on 127.0.0.1) serving ListHosts behind the interceptor, and raw calls to it. */
  async function grpcServer() {
    const clock = new WatchedClock();
    const server = new grpc.Server({ interceptors: [boundUnaryArrival(LIMITS.requestArrivalMs, clock)] });
    let handled = 0;
    addUnaryMethod(server, ControllerService.method.listHosts, () => {
      handled++;
      return Promise.resolve(create(ListHostsResponseSchema));
    });
    const port = await new Promise<number>((resolve, reject) => server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))));
    const session = http2.connect(`http://127.0.0.1:${port}`);
    session.on("error", () => undefined);
    /** Sends `chunks`, ending the request if `end`; `answered` resolves to the grpc-status once the answer is over. */
    const call = (chunks: Buffer[], end: boolean) => {
      const req = session.request({ ":method": "POST", ":path": "/rexmesh.v1.ControllerService/ListHosts", "content-type": "application/grpc", te: "trailers" }, { endStream: false });
      let status: string | undefined;
      req.on("response", (h) => (status ??= h["grpc-status"] as string | undefined));
      req.on("trailers", (h) => (status ??= h["grpc-status"] as string | undefined));
      req.on("data", () => undefined);
      for (const c of chunks) req.write(c);
      if (end) req.end();
      const answered = new Promise<string | undefined>((resolve) => {
        req.on("end", () => resolve(status));
        req.on("close", () => resolve(status));
      });
      return { req, answered, status: () => status };
    };
    const close = () => {
      session.destroy();
      server.forceShutdown();
    };
    return { clock, call, close, handled: () => handled };
  }

  const whole = () => Buffer.from([0, 0, 0, 0, 0]);

  it("answers a request that never completes DEADLINE_EXCEEDED after LIMITS.requestArrivalMs, and never runs the handler", async () => {
    const g = await grpcServer();
    try {
      const armed = g.clock.armed();
      const c = g.call([Buffer.from([0, 0, 0, 0, 40, ...Buffer.alloc(10)])], false);
      await armed;
      g.clock.advance(LIMITS.requestArrivalMs - 1);
      // A whole call on the same connection is answered meanwhile: the half-sent one was not.
      expect(await g.call([whole()], true).answered).toBe("0");
      expect(c.status()).toBeUndefined();
      g.clock.advance(1);
      expect(await c.answered).toBe(String(Code.DeadlineExceeded));
      // The rest of the request, late, is dropped: a call after it is the only one handled.
      c.req.end(Buffer.alloc(30));
      expect(await g.call([whole()], true).answered).toBe("0");
      expect(g.handled()).toBe(2);
    } finally {
      g.close();
    }
  });

  it("leaves a request that arrived whole alone", async () => {
    const g = await grpcServer();
    try {
      const c = g.call([whole()], true);
      expect(await c.answered).toBe("0");
      g.clock.advance(LIMITS.requestArrivalMs);
      expect(g.handled()).toBe(1);
    } finally {
      g.close();
    }
  });
});
