import { once } from "node:events";
import { createConnection, createServer, type AddressInfo, type Server, type Socket } from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TcpRelay } from "../../chaos/tcp-relay.js";

/** An echo server that also keeps what it received and its side of each connection. */
function echoServer(): { server: Server; received: Buffer[]; sockets: Socket[] } {
  const received: Buffer[] = [];
  const sockets: Socket[] = [];
  const server = createServer((s) => {
    sockets.push(s);
    s.on("error", () => undefined);
    s.on("data", (d) => {
      received.push(d);
      s.write(d);
    });
  });
  return { server, received, sockets };
}

async function dial(address: string): Promise<{ socket: Socket; echoed: Buffer[]; next: () => Promise<string> }> {
  const [host, port] = address.split(":") as [string, string];
  const socket = createConnection(Number(port), host);
  socket.on("error", () => undefined);
  await once(socket, "connect");
  const echoed: Buffer[] = [];
  socket.on("data", (d) => echoed.push(d));
  const next = async () => {
    if (echoed.length === 0) await once(socket, "data");
    return Buffer.concat(echoed.splice(0)).toString();
  };
  return { socket, echoed, next };
}

/** Nothing arrives within a short window: the only way to see silence. */
const QUIET_MS = 150;
const quiet = () => new Promise((r) => setTimeout(r, QUIET_MS));

describe("TcpRelay", () => {
  const echo = echoServer();
  let relay: TcpRelay;

  beforeAll(async () => {
    await new Promise<void>((r) => echo.server.listen(0, "127.0.0.1", r));
    relay = await TcpRelay.start(`127.0.0.1:${(echo.server.address() as AddressInfo).port}`);
  });
  afterAll(() => {
    relay.close();
    echo.server.close();
  });

  it("forwards both ways, holds everything while cut without closing, and delivers it on restore", async () => {
    const c = await dial(relay.address);
    c.socket.write("one");
    expect(await c.next()).toBe("one");
    relay.stop();
    expect(relay.state).toBe("cut");
    c.socket.write("two");
    await quiet();
    expect(c.echoed).toEqual([]);
    expect(c.socket.destroyed).toBe(false);
    // A connection made while cut hangs until the link returns.
    const late = await dial(relay.address);
    late.socket.write("late");
    relay.restore();
    expect(await c.next()).toBe("two");
    expect(await late.next()).toBe("late");
    c.socket.destroy();
    late.socket.destroy();
  });

  it("one-way: what goes up arrives, nothing comes down until restore", async () => {
    const c = await dial(relay.address);
    const before = echo.received.length;
    relay.oneWay("up");
    c.socket.write("up only");
    for (let i = 0; i < 100 && echo.received.length === before; i++) await new Promise((r) => setTimeout(r, 10));
    expect(Buffer.concat(echo.received.slice(before)).toString()).toBe("up only");
    await quiet();
    expect(c.echoed).toEqual([]);
    relay.restore();
    expect(await c.next()).toBe("up only");
    c.socket.destroy();
  });

  it("half-open: the server's side closes, the client's stays open and silent, and is reset on restore", async () => {
    const c = await dial(relay.address);
    c.socket.write("hi");
    expect(await c.next()).toBe("hi");
    const serverSide = echo.sockets[echo.sockets.length - 1]!;
    const serverClosed = once(serverSide, "close");
    relay.halfOpen("server");
    await serverClosed;
    c.socket.write("into the void");
    await quiet();
    expect(c.socket.destroyed).toBe(false);
    expect(c.echoed).toEqual([]);
    const clientClosed = once(c.socket, "close");
    relay.restore();
    await clientClosed;
  });

  it("reset: tears down current connections; new ones go through", async () => {
    const c = await dial(relay.address);
    const closed = once(c.socket, "close");
    relay.reset();
    await closed;
    const d = await dial(relay.address);
    d.socket.write("again");
    expect(await d.next()).toBe("again");
    d.socket.destroy();
  });
});
