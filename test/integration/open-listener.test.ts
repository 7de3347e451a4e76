import http2 from "node:http2";
import net from "node:net";
import tls from "node:tls";
import { create } from "@bufbuild/protobuf";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { issueKeyAndCertificate } from "../../certs/ca.js";
import { systemClock } from "../../common/clock.js";
import { InvalidArgumentError } from "../../common/errors.js";
import { silentLogger } from "../../common/logger.js";
import { createOpenUnaryServer, type OpenUnaryServer } from "../../common/open-unary-server.js";
import { requestEnrollment } from "../../daemon/enroll.js";
import { EnrollRequestSchema, EnrollResponseSchema, EnrollService, type EnrollRequest } from "../../gen/rexmesh/v1/enroll_pb.js";
import { testCa } from "../test-ca.js";

const RESOURCE_EXHAUSTED = 8;
const INVALID_ARGUMENT = 3;

/**
 * Issue 12, limits on the unauthenticated enroll listener (controller and
 * proxies): a connection that never finishes its TLS handshake, or holds no
 * call, is closed; one address cannot hold more than its share of
 * connections; messages are small. Real TLS on 127.0.0.1:0.
 */
describe("the open (unauthenticated) listener", () => {
  const ca = testCa();
  const server = issueKeyAndCertificate(ca, { clock: systemClock, identity: { role: "controller", scope: "mesh", id: "c" }, validityMs: 3_600_000, ipAddresses: ["127.0.0.1"], dnsNames: ["localhost"] });
  const limits = { handshakeMs: 500, idleMs: 500, callMs: 800, connectionsPerAddress: 4, connections: 100 };
  let open: OpenUnaryServer;
  let port = 0;
  const seen: string[] = [];

  beforeAll(async () => {
    open = createOpenUnaryServer({
      creds: { certPem: server.certPem, keyPem: server.keyPem, caPem: ca.certPem },
      log: silentLogger,
      limits,
      handlers: [
        {
          method: EnrollService.method.enroll,
          handle: async (req: EnrollRequest) => {
            if (req.hostId === "bad") throw new InvalidArgumentError("bad host");
            seen.push(req.hostId);
            return create(EnrollResponseSchema, { certificatePem: `for ${req.hostId}` });
          },
        },
      ],
    });
    port = await open.listen("127.0.0.1", 0);
  });
  afterAll(() => open.close(100));

  /** Resolves with how long the server took to close the socket, or "open" after waitMs. */
  function closedWithin(socket: net.Socket, waitMs: number): Promise<number | "open"> {
    const t0 = Date.now();
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        socket.destroy();
        resolve("open");
      }, waitMs);
      socket.on("error", () => undefined);
      // A paused socket never sees its end: read (and drop) whatever comes.
      socket.resume();
      socket.on("close", () => {
        clearTimeout(timer);
        resolve(Date.now() - t0);
      });
    });
  }

  function tlsConnection(): Promise<tls.TLSSocket> {
    return new Promise((resolve, reject) => {
      const s = tls.connect({ host: "127.0.0.1", port, ca: ca.certPem, ALPNProtocols: ["h2"], servername: "localhost" }, () => resolve(s));
      s.once("error", reject);
    });
  }

  it("serves calls, maps domain errors, and refuses large messages", async () => {
    const ok = await requestEnrollment(`127.0.0.1:${port}`, ca.certPem, create(EnrollRequestSchema, { hostId: "h1" }));
    expect(ok.certificatePem).toBe("for h1");
    const bad = await requestEnrollment(`127.0.0.1:${port}`, ca.certPem, create(EnrollRequestSchema, { hostId: "bad" })).catch((e: { code: number }) => e.code);
    expect(bad).toBe(INVALID_ARGUMENT);
    const big = await requestEnrollment(`127.0.0.1:${port}`, ca.certPem, create(EnrollRequestSchema, { hostId: "big", csrPem: "x".repeat(100_000) })).catch((e: { code: number }) => e.code);
    expect(big).toBe(RESOURCE_EXHAUSTED);
    expect(seen).toEqual(["h1"]);
  });

  it("closes a connection that never finishes its TLS handshake", async () => {
    const raw = net.connect(port, "127.0.0.1");
    const waited = await closedWithin(raw, 5000);
    expect(waited).not.toBe("open");
    expect(waited as number).toBeGreaterThanOrEqual(limits.handshakeMs - 100);
  });

  it("closes a TLS connection that holds no call", async () => {
    const s = await tlsConnection();
    const waited = await closedWithin(s, 5000);
    expect(waited).not.toBe("open");
  });

  it("cuts a call whose request never ends", async () => {
    const session = http2.connect(`https://localhost:${port}`, { ca: ca.certPem });
    session.on("error", () => undefined);
    const t0 = Date.now();
    const stream = session.request({ ":method": "POST", ":path": "/rexmesh.v1.EnrollService/Enroll", "content-type": "application/grpc" }, { endStream: false });
    stream.on("error", () => undefined);
    stream.write(Buffer.from([0, 0, 0, 0, 10]));
    stream.resume();
    await new Promise((resolve) => stream.once("close", resolve));
    expect(Date.now() - t0).toBeGreaterThanOrEqual(limits.callMs - 100);
    expect(Date.now() - t0).toBeLessThan(5000);
    session.destroy();
  });

  it("refuses more connections from one address than its share, and takes new ones once they close", async () => {
    const held = await Promise.all(Array.from({ length: limits.connectionsPerAddress }, () => tlsConnection()));
    const extra = net.connect(port, "127.0.0.1");
    expect(await closedWithin(extra, 2000)).not.toBe("open");
    for (const s of held) s.destroy();
    await new Promise((r) => setTimeout(r, 100));
    const again = await requestEnrollment(`127.0.0.1:${port}`, ca.certPem, create(EnrollRequestSchema, { hostId: "h2" }));
    expect(again.certificatePem).toBe("for h2");
  });
});
