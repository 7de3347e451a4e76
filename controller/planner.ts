import { createHash } from "node:crypto";
import { durationMs } from "@bufbuild/protobuf/wkt";
import type { SubmitJobRequest } from "../gen/rexmesh/v1/controller_pb.js";
import { toBinary } from "@bufbuild/protobuf";
import type { PeerIdentity } from "../certs/identity.js";
import { FailedPreconditionError, InvalidArgumentError, NotFoundError } from "../common/errors.js";
import { StepSchema, type Step } from "../gen/rexmesh/v1/task_pb.js";
import type { DocumentStore } from "./document-store.js";
import { parseDocumentText, planHost, type CommandDocument } from "./documents.js";
import type { Inventory } from "./inventory.js";
import type { HostRecord, TaskSteps } from "./model.js";
import { redactParams, resolveParams, type ParamValue } from "./params.js";
import { parseQuery, QuerySyntaxError, selectHosts, type Query } from "./query.js";
import { validateSteps } from "./validate.js";


/** How a job run from a document given inline names it (JobRecord.document): such a document is not kept. */
export const INLINE_DOCUMENT = " (inline)";
/**
 * Decides whether a request may run on the hosts it resolved to; refuses by
 * throwing. `steps` are what would run: the request's steps, or for a
 * document run every distinct step rendered for any of the hosts (with real
 * parameter values).
 */
export type SubmitAuthorizer = (hosts: readonly HostRecord[], req: SubmitRequest, steps: readonly Step[]) => void;

export interface SubmitRequest {
  /** Where to run: exactly one of hostIds, allHosts and target. */
  hostIds: string[];
  allHosts: boolean;
  /** A host query (controller/query.ts); present but empty is an error. */
  target?: string;
  steps: Step[];
  env: Record<string, string>;
  workingDir: string;
  stdin: Uint8Array;
  timeoutMs: number;
  /** Zero means the controller default. */
  deliveryDeadlineMs: number;
  /** Zero (or absent) means the controller default. */
  lostAfterMs?: number;
  idempotencyKey: string;
  idempotent: boolean;
  outputLimitBytes?: number;
  rate?: RateRequest;
  /** A stored document to run instead of steps: "NAME" or "NAME@VERSION". */
  document?: string;
  /** A document given whole (YAML or JSON), run once and not stored, instead of steps or a stored document. */
  documentContent?: string;
  /** The document's parameters as given (text; a list as a JSON array or one value). */
  parameters?: Record<string, string | string[]>;
  /** A firing of this schedule (controller/schedules.ts): the job is linked to it. */
  schedule?: string;
  /** A firing of this trigger (controller/triggers.ts), for the audit log. */
  trigger?: string;
}

/** Rate control as asked for: absolute numbers or percentages of the job's task count. */
export interface RateRequest {
  concurrency?: number;
  concurrencyPercent?: number;
  concurrencyPerRegion?: number;
  maxErrors?: number;
  maxErrorsPercent?: number;
  batch?: number;
}

/** What one host would get, as a dry run shows it (sensitive parameters redacted). */
export interface PlannedHost {
  host: HostRecord;
  steps: Step[];
  /** Set when the host's task would end REJECTED at once (no alternative fits it, or it is revoked). */
  rejected?: string;
}

/** A request checked, resolved, rendered and authorized: everything submit needs, nothing stored yet. */
export interface Plan {
  hosts: HostRecord[];
  /** Per host id: why its task ends REJECTED at submit (revoked, or no alternative of a document step fits). */
  rejected: Map<string, string>;
  /** Document runs: per host id, its steps. */
  perHost?: Map<string, TaskSteps>;
  document?: string;
  parameters?: Record<string, string>;
}

export interface PlannerOptions {
  inventory: Inventory;
  /** Stored documents, for document runs; without it a document run is refused. */
  documents?: DocumentStore;
  /** Why a host's identity is revoked, or undefined when it is not. */
  revoked?: (host: HostRecord) => string | undefined;
  /** Largest stdin a job may carry. Default 1 MiB. */
  maxStdinBytes?: number;
  /** Most hosts one job may target. Default 200,000. */
  maxHostsPerJob?: number;
}

/**
 * Turns a request into a plan: checks it, resolves its hosts inside the
 * caller's tenant, renders a document per host, and asks the authorizer,
 * storing and sending nothing. Submit and dry run share it, so that a dry
 * run shows exactly what a submit would do.
 */
export class Planner {
  private readonly inventory: Inventory;
  private readonly documents: DocumentStore | undefined;
  private readonly revoked: (host: HostRecord) => string | undefined;
  private readonly maxStdinBytes: number;
  private readonly maxHostsPerJob: number;

  constructor(opts: PlannerOptions) {
    this.inventory = opts.inventory;
    this.documents = opts.documents;
    this.revoked = opts.revoked ?? (() => undefined);
    this.maxStdinBytes = opts.maxStdinBytes ?? 1 << 20;
    this.maxHostsPerJob = opts.maxHostsPerJob ?? 200_000;
  }

  /** Every check of a request, the host set, per-host rendering of a document, then authorization. */
  plan(caller: PeerIdentity, req: SubmitRequest, authorize?: SubmitAuthorizer): Plan {
    const tenant = caller.scope;
    const params = req.parameters ?? {};
    let loaded: { label: string; doc: CommandDocument } | undefined;
    if (req.document || req.documentContent) {
      if (req.steps.length > 0) throw new InvalidArgumentError("give either steps or a document, not both");
      if (req.document && req.documentContent) throw new InvalidArgumentError("give either a stored document or a document's content, not both");
      if (req.documentContent) {
        const doc = parseDocumentText(req.documentContent);
        loaded = { label: `${doc.name}${INLINE_DOCUMENT}`, doc };
      } else {
        if (!this.documents) throw new FailedPreconditionError("this controller does not keep documents");
        const { stored, doc } = this.documents.load(tenant, req.document!);
        loaded = { label: `${stored.name}@${stored.version}`, doc };
      }
    } else {
      if (Object.keys(params).length > 0) throw new InvalidArgumentError("parameters are given to a document (--doc NAME)");
      validateSteps(req.steps);
    }
    if (req.stdin.length > this.maxStdinBytes) {
      throw new InvalidArgumentError(`stdin is ${req.stdin.length} bytes; the limit is ${this.maxStdinBytes}`);
    }
    if (req.timeoutMs < 0 || req.deliveryDeadlineMs < 0 || (req.lostAfterMs ?? 0) < 0) throw new InvalidArgumentError("timeouts cannot be negative");
    for (const [key, value] of Object.entries(req.env)) {
      if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(key)) throw new InvalidArgumentError(`environment variable name ${JSON.stringify(key)} is not valid`);
      // No process can be given it: refused here, rather than failing at each host's start.
      if (value.includes("\0")) throw new InvalidArgumentError(`environment variable ${key} contains a NUL byte, which no process can be given`);
    }
    const hosts = this.resolveHosts(tenant, req);
    const rejected = new Map<string, string>();
    for (const h of hosts) {
      const why = this.revoked(h);
      if (why !== undefined) rejected.set(h.id, why);
    }
    if (!loaded) {
      authorize?.(hosts, req, req.steps);
      return { hosts, rejected };
    }
    const { label, doc } = loaded;
    const values = resolveParams(doc.parameters, params);
    const redacted = redactParams(doc.parameters, values) as Record<string, ParamValue>;
    const perHost = new Map<string, TaskSteps>();
    const distinct = new Map<string, Step>();
    for (const h of hosts) {
      if (rejected.has(h.id)) continue;
      const real = planHost(doc, values, h);
      if (real.rejected !== undefined) {
        rejected.set(h.id, real.rejected);
        continue;
      }
      try {
        validateSteps(real.steps);
      } catch (err) {
        throw new InvalidArgumentError(`document ${label} on host ${JSON.stringify(h.id)}: ${(err as Error).message}`, { cause: err });
      }
      const shown = planHost(doc, redacted, h).steps ?? [];
      perHost.set(h.id, { run: real.steps, shown });
      for (const step of real.steps) distinct.set(Buffer.from(toBinary(StepSchema, step)).toString("base64"), step);
    }
    authorize?.(hosts, req, [...distinct.values()]);
    const parameters = Object.fromEntries(Object.entries(redacted).map(([k, v]) => [k, typeof v === "string" ? v : JSON.stringify(v)]));
    return { hosts, rejected, perHost, document: label, parameters };
  }

  /** What each host would run, as a dry run shows it. */
  dryRun(caller: PeerIdentity, req: SubmitRequest, authorize?: SubmitAuthorizer): PlannedHost[] {
    const { hosts, perHost, rejected } = this.plan(caller, req, authorize);
    return hosts.map((host) => {
      const why = rejected.get(host.id);
      if (why !== undefined) return { host, steps: [], rejected: why };
      if (!perHost) return { host, steps: req.steps };
      return { host, steps: perHost.get(host.id)?.shown ?? [] };
    });
  }

  /**
   * The hosts a request targets, inside the caller's tenant. Never empty: an
   * empty or unmatched target is refused here, so that authorization always
   * judges the real host set. Revoked hosts are left out of `--all` and of
   * queries (they can never run anything); named explicitly, they are kept,
   * and their tasks end REJECTED with the reason.
   */
  resolveHosts(tenant: string, req: Pick<SubmitRequest, "hostIds" | "allHosts" | "target">): HostRecord[] {
    const ways = (req.allHosts ? 1 : 0) + (req.hostIds.length > 0 ? 1 : 0) + (req.target !== undefined ? 1 : 0);
    if (ways !== 1) {
      throw new InvalidArgumentError("say where to run: host ids, all hosts, or a target query (exactly one of the three)");
    }
    let hosts: HostRecord[];
    if (req.target !== undefined || req.allHosts) {
      const all = this.inventory.list(tenant);
      const matched = req.target !== undefined ? selectHosts(parseTarget(req.target), all) : all;
      hosts = matched.filter((h) => this.revoked(h) === undefined);
      const left = matched.length - hosts.length;
      const revokedNote = left > 0 ? ` (${left} revoked host${left > 1 ? "s" : ""} left out)` : "";
      if (hosts.length === 0) {
        if (req.target !== undefined) throw new InvalidArgumentError(`the target ${JSON.stringify(req.target)} matches no host${revokedNote}`);
        throw new FailedPreconditionError(`there are no hosts in this tenant yet${revokedNote}`);
      }
    } else {
      const ids = [...new Set(req.hostIds)];
      const unknown: string[] = [];
      hosts = [];
      for (const id of ids) {
        const h = this.inventory.get(id);
        // Hosts of other tenants are reported exactly like hosts that do not exist.
        if (!h || h.tenant !== tenant) unknown.push(id);
        else hosts.push(h);
      }
      if (unknown.length > 0) {
        const shown = unknown.slice(0, 10).join(", ") + (unknown.length > 10 ? `, and ${unknown.length - 10} more` : "");
        throw new NotFoundError(`unknown host${unknown.length > 1 ? "s" : ""}: ${shown}`);
      }
    }
    if (hosts.length > this.maxHostsPerJob) {
      throw new InvalidArgumentError(`the job targets ${hosts.length} hosts; the limit is ${this.maxHostsPerJob}`);
    }
    return hosts;
  }
}

/** Parses a target query; a syntax error carries the position and a caret line for the client. */
export function parseTarget(text: string): Query {
  try {
    return parseQuery(text);
  } catch (err) {
    if (err instanceof QuerySyntaxError) throw new InvalidArgumentError(`target ${err.message}\n${err.pointer}`, { cause: err });
    throw err;
  }
}

/**
 * A digest of everything a request asks for (not the key itself), so that a
 * reused idempotency key can be told apart from a replay of the same request.
 */
export function requestDigest(req: SubmitRequest): string {
  const h = createHash("sha256");
  const field = (name: string, value: string | Uint8Array) => {
    h.update(name);
    h.update("\0");
    const bytes = typeof value === "string" ? Buffer.from(value) : value;
    h.update(String(bytes.length));
    h.update("\0");
    h.update(bytes);
  };
  const sorted = (o: Record<string, unknown>) => JSON.stringify(Object.keys(o).sort().map((k) => [k, o[k]]));
  field("hosts", JSON.stringify([...new Set(req.hostIds)].sort()));
  field("all", String(req.allHosts));
  field("target", req.target === undefined ? "\u0000none" : req.target);
  for (const s of req.steps) field("step", toBinary(StepSchema, s));
  field("env", sorted(req.env));
  field("cwd", req.workingDir);
  field("stdin", req.stdin);
  field("timeout", String(req.timeoutMs));
  field("deadline", String(req.deliveryDeadlineMs));
  field("lostAfter", String(req.lostAfterMs ?? 0));
  field("idempotent", String(req.idempotent));
  field("outputLimit", String(req.outputLimitBytes ?? 0));
  field("rate", sorted((req.rate ?? {}) as Record<string, unknown>));
  field("document", req.document ?? "");
  field("documentContent", req.documentContent ?? "");
  field("parameters", sorted(req.parameters ?? {}));
  return h.digest("hex");
}

/** A SubmitJob request as the job manager takes it (the API's, and each firing of a schedule). */
export function submitRequestOf(req: SubmitJobRequest): SubmitRequest {
  return {
    hostIds: req.hostIds,
    allHosts: req.allHosts,
    target: req.target,
    steps: req.steps,
    env: req.env,
    workingDir: req.workingDir,
    stdin: req.stdin,
    timeoutMs: req.timeout ? durationMs(req.timeout) : 0,
    deliveryDeadlineMs: req.deliveryDeadline ? durationMs(req.deliveryDeadline) : 0,
    lostAfterMs: req.lostAfter ? durationMs(req.lostAfter) : 0,
    idempotencyKey: req.idempotencyKey,
    idempotent: req.idempotent,
    outputLimitBytes: Number(req.outputLimitBytes),
    rate: req.rate && {
      concurrency: req.rate.concurrency,
      concurrencyPercent: req.rate.concurrencyPercent,
      concurrencyPerRegion: req.rate.concurrencyPerRegion,
      maxErrors: req.rate.maxErrors,
      maxErrorsPercent: req.rate.maxErrorsPercent,
      batch: req.rate.batch,
    },
    document: req.document || undefined,
    documentContent: req.documentContent || undefined,
    parameters: req.parameters,
  };
}
