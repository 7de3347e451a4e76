import { createConnection, createServer, type AddressInfo, type Server, type Socket } from "node:net";

/** Which end of a relayed connection: the dialler's or the server's. */
export type RelaySide = "client" | "server";

/** A direction of traffic: `up` is from the dialler to the server. */
export type RelayDirection = "up" | "down";

interface Pair {
  client: Socket;
  server: Socket;
  /** Set while half-open: the other end was closed, this one is kept silent. */
  dangling?: RelaySide;
}

type Mode = { kind: "open" } | { kind: "cut" } | { kind: "one-way"; flows: RelayDirection } | { kind: "half-open"; closed: RelaySide };

/**
 * A TCP relay on loopback that injects the faults a real network makes,
 * without closing anything unless asked to:
 * - `stop()`: a silent partition: nothing is forwarded either way, the
 *   connections stay open and go quiet, new ones hang until `restore()`;
 * - `oneWay(direction)`: only one direction is forwarded (acks never arrive);
 * - `halfOpen(side)`: one end sees its connection close while the other end
 *   still believes it is open and hears nothing (a peer that vanished without
 *   a reset); on `restore()` the dangling end is reset, as its next write
 *   would be by a real peer;
 * - `reset()`: every current connection is torn down at once.
 * Data held back while paused stays in the sockets' buffers and flows on
 * restore, as TCP retransmission would deliver it after a partition heals.
 */
export class TcpRelay {
  private readonly pairs = new Set<Pair>();
  private readonly waiting: Socket[] = [];
  private mode: Mode = { kind: "open" };
  address = "";

  private constructor(
    private readonly server: Server,
    private readonly target: { host: string; port: number },
  ) {}

  /** Starts a relay on 127.0.0.1 (port 0) in front of `target` (`host:port`). */
  static async start(target: string): Promise<TcpRelay> {
    const colon = target.lastIndexOf(":");
    const host = target.slice(0, colon);
    const port = Number(target.slice(colon + 1));
    if (!host || !Number.isInteger(port) || port <= 0) throw new Error(`relay target must be host:port, not ${target}`);
    let relay!: TcpRelay;
    const server = createServer((client) => relay.accept(client));
    relay = new TcpRelay(server, { host, port });
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(0, "127.0.0.1", () => {
        server.off("error", reject);
        resolve();
      });
    });
    relay.address = `127.0.0.1:${(server.address() as AddressInfo).port}`;
    return relay;
  }

  /** Connections being relayed now (including dangling halves). */
  get connections(): number {
    return this.pairs.size;
  }

  /** The fault in force, in words: `open`, `cut`, `one-way up`, `half-open (server closed)`. */
  get state(): string {
    const m = this.mode;
    return m.kind === "one-way" ? `one-way ${m.flows}` : m.kind === "half-open" ? `half-open (${m.closed} closed)` : m.kind;
  }

  private accept(client: Socket): void {
    client.pause();
    client.on("error", () => client.destroy());
    if (this.mode.kind === "open") this.join(client);
    else this.waiting.push(client);
  }

  private join(client: Socket): void {
    if (client.destroyed) return;
    const server = createConnection(this.target.port, this.target.host);
    server.pause();
    const pair: Pair = { client, server };
    this.pairs.add(pair);
    const closed = (side: RelaySide) => () => {
      if (pair.dangling === (side === "client" ? "server" : "client")) return;
      this.pairs.delete(pair);
      client.destroy();
      server.destroy();
    };
    server.on("error", closed("server"));
    client.on("error", closed("client"));
    server.on("close", closed("server"));
    client.on("close", closed("client"));
    client.on("data", (d) => server.write(d));
    server.on("data", (d) => client.write(d));
    this.apply(pair);
  }

  /** Makes one connection obey the current mode. */
  private apply(pair: Pair): void {
    const m = this.mode;
    const up = m.kind === "open" || (m.kind === "one-way" && m.flows === "up");
    const down = m.kind === "open" || (m.kind === "one-way" && m.flows === "down");
    if (up) pair.client.resume();
    else pair.client.pause();
    if (down) pair.server.resume();
    else pair.server.pause();
    if (m.kind === "half-open" && !pair.dangling) {
      pair.dangling = m.closed === "client" ? "server" : "client";
      (m.closed === "client" ? pair.client : pair.server).destroy();
    }
  }

  private set(mode: Mode): void {
    this.mode = mode;
    for (const pair of this.pairs) this.apply(pair);
  }

  /** A silent partition: nothing forwarded either way, nothing closed. */
  stop(): void {
    this.set({ kind: "cut" });
  }

  /** Forwards only one direction; new connections hang (a handshake needs both). */
  oneWay(flows: RelayDirection): void {
    this.set({ kind: "one-way", flows });
  }

  /** Closes every connection on one side only; the other side is kept open and silent. */
  halfOpen(closed: RelaySide): void {
    this.set({ kind: "half-open", closed });
  }

  /** Tears down every current connection on both sides; new ones are handled by the mode in force. */
  reset(): void {
    for (const pair of [...this.pairs]) {
      this.pairs.delete(pair);
      pair.client.destroy();
      pair.server.destroy();
    }
  }

  /** Forwards again: what was held back flows, dangling halves are reset, waiting connections go through. */
  restore(): void {
    for (const pair of [...this.pairs]) {
      if (!pair.dangling) continue;
      this.pairs.delete(pair);
      pair.client.destroy();
      pair.server.destroy();
    }
    this.set({ kind: "open" });
    for (const c of this.waiting.splice(0)) this.join(c);
  }

  /** Closes the relay and every connection through it. */
  close(): void {
    this.reset();
    for (const c of this.waiting.splice(0)) c.destroy();
    this.server.close();
  }
}
