import type { Database } from "lmdb";
import type { HostFacts } from "../gen/rexmesh/v1/host_pb.js";
import type { HostRecord } from "./model.js";

/**
 * The hosts the controller knows, where each is connected now, and what it
 * reported about itself. Proxies tell the controller when a host's stream
 * opens or closes; a host seen once stays known while offline, so that
 * jobs can target it and it receives its tasks when it returns.
 */
export class Inventory {
  private readonly hosts = new Map<string, HostRecord>();

  /** With a database, hosts survive a restart (as disconnected until their proxy reports them). */
  constructor(private readonly db?: Database<HostRecord, string>) {
    if (!db) return;
    for (const { value } of db.getRange()) this.hosts.set(value.id, { ...value, connected: false });
  }

  private save(rec: HostRecord): void {
    void this.db?.put(rec.id, rec);
  }

  get(id: string): HostRecord | undefined {
    return this.hosts.get(id);
  }

  /** Hosts of one tenant, sorted by id. */
  list(tenant: string): HostRecord[] {
    return [...this.hosts.values()].filter((h) => h.tenant === tenant).sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  }

  connected(host: { id: string; tenant: string; facts?: HostFacts }, region: string, proxy: string, since: number): HostRecord {
    const prev = this.hosts.get(host.id);
    const rec: HostRecord = {
      id: host.id,
      tenant: host.tenant,
      region,
      proxy,
      connected: true,
      since,
      facts: host.facts ?? prev?.facts,
      labels: prev?.labels ?? {},
    };
    this.hosts.set(host.id, rec);
    this.save(rec);
    return rec;
  }

  /**
   * A host reported in a results bundle from a site with no link: known and
   * targetable, never "connected" (work reaches it by bundle).
   */
  seen(host: { id: string; tenant: string; facts?: HostFacts }, region: string, proxy: string, since: number): HostRecord {
    const prev = this.hosts.get(host.id);
    if (prev?.connected) return prev;
    const rec: HostRecord = { id: host.id, tenant: host.tenant, region, proxy, connected: false, since, facts: host.facts ?? prev?.facts, labels: prev?.labels ?? {} };
    this.hosts.set(host.id, rec);
    this.save(rec);
    return rec;
  }

  /** A host left a proxy; ignored when it has already moved to another one. */
  disconnected(id: string, proxy: string, since: number): HostRecord | undefined {
    const rec = this.hosts.get(id);
    if (!rec || rec.proxy !== proxy || !rec.connected) return undefined;
    rec.connected = false;
    rec.since = since;
    this.save(rec);
    return rec;
  }

  /** Every host held by a proxy whose link went down. */
  proxyLost(proxy: string, since: number): HostRecord[] {
    const lost: HostRecord[] = [];
    for (const rec of this.hosts.values()) {
      if (rec.proxy === proxy && rec.connected) {
        rec.connected = false;
        rec.since = since;
        this.save(rec);
        lost.push(rec);
      }
    }
    return lost;
  }
}
