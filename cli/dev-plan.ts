import { checkSegment } from "../certs/identity.js";
import { InvalidArgumentError } from "../common/errors.js";

/** Region names a dev mesh uses, in order; more regions are `region-N`. */
const REGION_NAMES = ["eu-west", "us-east", "ap-south", "sa-east", "af-south", "me-central"];

/** One host of a dev mesh. */
export interface DevHost {
  id: string;
  region: string;
  tenant: string;
  /** Set through the public API once the host is connected. */
  labels: Record<string, string>;
}

export interface DevPlanOptions {
  /** Number of hosts to name `host-01`, `host-02`, …; not with an inventory. */
  hosts?: number;
  /** Number of regions; with an inventory, the regions it names come after these. */
  regions?: number;
  /**
   * Tenants, the first one the operator's of the `export` lines; generated
   * hosts are spread over them, an inventory's hosts name theirs (default the
   * first). Default `default`.
   */
  tenants?: string[];
  /** `HOST=KEY=VALUE` each. */
  labels?: string[];
  /** A parsed inventory file (see {@link parseInventory}). */
  inventory?: Record<string, unknown>;
}

export interface DevPlan {
  regions: string[];
  tenants: string[];
  hosts: DevHost[];
}

const INVENTORY_HINT = "an inventory is {hosts: {HOST_ID: {region?, tenant?, labels?: {KEY: VALUE}}}}";

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function stringMap(v: unknown, where: string): Record<string, string> {
  if (v === undefined) return {};
  if (!isRecord(v)) throw new InvalidArgumentError(`${where} must be a map of KEY: VALUE`);
  const out: Record<string, string> = {};
  for (const [k, val] of Object.entries(v)) {
    if (typeof val !== "string" && typeof val !== "number" && typeof val !== "boolean") throw new InvalidArgumentError(`${where}.${k} must be a string`);
    out[k] = String(val);
  }
  return out;
}

function optionalName(v: unknown, field: string, where: string): string | undefined {
  if (v === undefined) return undefined;
  if (typeof v !== "string") throw new InvalidArgumentError(`${where}.${field} must be a string`);
  return checkSegment(`${where}.${field}`, v);
}

/** The hosts of an inventory file, in its order, with what each names. */
function parseInventory(inventory: Record<string, unknown>): { id: string; region?: string; tenant?: string; labels: Record<string, string> }[] {
  const unknownKeys = Object.keys(inventory).filter((k) => k !== "hosts");
  if (unknownKeys.length > 0) throw new InvalidArgumentError(`inventory: unknown key ${JSON.stringify(unknownKeys[0])} (${INVENTORY_HINT})`);
  if (!isRecord(inventory.hosts) || Object.keys(inventory.hosts).length === 0) throw new InvalidArgumentError(`inventory: no hosts (${INVENTORY_HINT})`);
  return Object.entries(inventory.hosts).map(([id, entry]) => {
    const where = `inventory: hosts.${id}`;
    checkSegment("inventory: host id", id);
    const e = entry ?? {};
    if (!isRecord(e)) throw new InvalidArgumentError(`${where} must be a map (${INVENTORY_HINT})`);
    const extra = Object.keys(e).filter((k) => !["region", "tenant", "labels"].includes(k));
    if (extra.length > 0) throw new InvalidArgumentError(`${where}: unknown key ${JSON.stringify(extra[0])} (${INVENTORY_HINT})`);
    return { id, region: optionalName(e.region, "region", where), tenant: optionalName(e.tenant, "tenant", where), labels: stringMap(e.labels, `${where}.labels`) };
  });
}

/** `host-01=role=web` as its host, key and value. */
function parseLabel(text: string): { host: string; key: string; value: string } {
  const m = /^([^=]+)=([^=]+)=(.*)$/s.exec(text);
  if (!m) throw new InvalidArgumentError(`--label ${JSON.stringify(text)} is not HOST=KEY=VALUE (e.g. host-01=role=web)`);
  return { host: m[1]!, key: m[2]!, value: m[3]! };
}

/**
 * Which hosts a dev mesh has, where each lives, its tenant and labels.
 * Generated hosts alternate between regions, and take tenants in turn one
 * round of regions at a time, so that every tenant has hosts in every region
 * when there are enough of them.
 */
export function devPlan(o: DevPlanOptions): DevPlan {
  const tenants = [...(o.tenants ?? ["default"])];
  if (tenants.length === 0) throw new InvalidArgumentError("--tenants needs at least one tenant");
  for (const t of tenants) checkSegment("tenant", t);
  if (new Set(tenants).size !== tenants.length) throw new InvalidArgumentError("--tenants names a tenant twice");
  const listed = o.inventory ? parseInventory(o.inventory) : undefined;
  if (listed && o.hosts !== undefined) throw new InvalidArgumentError("give --hosts or --inventory, not both");

  const named = [...new Set((listed ?? []).flatMap((h) => (h.region ? [h.region] : [])))];
  const count = o.regions ?? (named.length > 0 ? 0 : 2);
  const regions = [...new Set([...Array.from({ length: count }, (_, i) => REGION_NAMES[i] ?? `region-${i + 1}`), ...named])];
  if (regions.length === 0) throw new InvalidArgumentError("a dev mesh needs at least one region");

  let hosts: DevHost[];
  if (listed) {
    for (const h of listed) if (h.tenant && !tenants.includes(h.tenant)) tenants.push(h.tenant);
    let unplaced = 0;
    hosts = listed.map((h) => ({ id: h.id, region: h.region ?? regions[unplaced++ % regions.length]!, tenant: h.tenant ?? tenants[0]!, labels: h.labels }));
  } else {
    const n = o.hosts ?? 6;
    const width = Math.max(2, String(n).length);
    hosts = Array.from({ length: n }, (_, i) => ({
      id: `host-${String(i + 1).padStart(width, "0")}`,
      region: regions[i % regions.length]!,
      tenant: tenants[Math.floor(i / regions.length) % tenants.length]!,
      labels: {},
    }));
  }
  const byId = new Map(hosts.map((h) => [h.id, h]));
  for (const text of o.labels ?? []) {
    const { host, key, value } = parseLabel(text);
    const h = byId.get(host);
    if (!h) throw new InvalidArgumentError(`--label ${JSON.stringify(text)}: no host ${host} in this mesh (hosts are ${hosts[0]!.id} … ${hosts[hosts.length - 1]!.id})`);
    h.labels[key] = value;
  }
  return { regions, tenants, hosts };
}
