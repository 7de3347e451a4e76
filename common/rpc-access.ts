/**
 * What every RPC needs before it is served, declared once per method and
 * enforced by one boundary per server (common/connect-server.ts for the
 * controller's connect-node server, {@link guardUnary} for grpc-js
 * servers). A method with no declaration is not served: the server refuses
 * to start, and a call that still reaches the boundary is refused.
 *
 * A declaration says who may call (operators with a policy action, other
 * mesh identities by their certificate's role, or anyone) and the scope
 * the call acts on. The boundary authenticates the caller from its
 * certificate, refuses revoked identities and wrong roles, then hands the
 * call to the server's decider (the controller's policy and audit log, or
 * the proxy's log), which refuses by throwing.
 */
import type { DescMethod, DescService, MessageShape } from "@bufbuild/protobuf";
import { formatIdentity, type PeerIdentity, type Role } from "../certs/identity.js";
import { ConfigError, PermissionDeniedError, UnauthenticatedError } from "./errors.js";
import type { UnaryHandler } from "./grpc-link.js";
import type { Logger } from "./logger.js";

/**
 * Where an operator's action applies.
 * - `tenant`: the caller's tenant as a whole; decided at the boundary.
 * - `hosts`: hosts of the caller's tenant. With `hostsOf`, the hosts the
 *   request names, decided at the boundary; without, the hosts the request
 *   resolves to (a target, a job's tasks, a region), decided by the
 *   service's access module on the resolved set.
 * - `mesh`: what every tenant shares (proxies); only roles that name the action.
 */
export type OperatorScope = "tenant" | "hosts" | "mesh";

export interface OperatorRule<Req = unknown> {
  /**
   * The policy action; a function of the request when the action depends on
   * it (then `actions` lists every value it can take).
   */
  action: string | ((request: Req) => string);
  actions?: readonly string[];
  scope: OperatorScope;
  /**
   * Host ids the request names, for a `hosts` scope decided at the boundary;
   * "all" when it concerns any host of the tenant (a role must cover all).
   */
  hostsOf?: (request: Req) => string[] | "all";
}

export interface PeerRule<Req = unknown> {
  /** Mesh identities (not operators) that may call, by the role their certificate holds. */
  roles: readonly Exclude<Role, "operator">[];
  /** What the call is called in logs and the audit log, e.g. "link" or "artifact.read". */
  action: string;
  /** The scope in words (for the declaration table and docs/security.md). */
  scope: string;
  /** Checks the scope where the request shows it; refuses by throwing. */
  check?: (peer: PeerIdentity, request: Req) => void;
}

export type Declaration<Req = unknown> =
  | {
      /** Why the method needs no identity. */
      open: string;
    }
  | {
      operator?: OperatorRule<Req>;
      peer?: PeerRule<Req>;
      /** What a unary request asks, for the audit record of the boundary's decision. */
      summary?: (request: Req) => { what: string; hostIds?: string[] };
      /**
       * Who records an allowed call in the audit log: the boundary (default),
       * or the service itself (it decides on resolved resources, or keeps its
       * own record, like enrollment). Refusals at the boundary are always
       * recorded by the boundary.
       */
      auditedBy?: "boundary" | "service";
    };

export type ServiceDeclarations<S extends DescService> = {
  readonly [K in keyof S["method"]]: Declaration<MessageShape<S["method"][K]["input"]>>;
};

/** One declared method. */
export interface DeclaredMethod {
  readonly service: DescService;
  readonly method: DescMethod;
  readonly declaration: Declaration;
}

/** Every declared method of a server, by `<service type name>/<method name>`. */
export class DeclarationTable {
  private readonly byPath = new Map<string, DeclaredMethod>();

  /** Declares every method of a service; TypeScript refuses a service with a method left out. */
  service<S extends DescService>(service: S, methods: ServiceDeclarations<S>): this {
    for (const method of service.methods) {
      const declaration = (methods as Record<string, Declaration | undefined>)[method.localName];
      if (!declaration) throw new ConfigError(`${service.typeName}/${method.name} has no authorization declaration`);
      this.byPath.set(pathOf(method), { service, method, declaration: declaration as Declaration });
    }
    return this;
  }

  /** Every declared method. */
  methods(): DeclaredMethod[] {
    return [...this.byPath.values()];
  }

  get(method: DescMethod): DeclaredMethod | undefined {
    return this.byPath.get(pathOf(method));
  }

  /** Throws unless every method served is declared: called before a server starts. */
  requireDeclared(served: Iterable<DescMethod>): void {
    const missing = [...served].filter((m) => !this.byPath.has(pathOf(m))).map(pathOf);
    if (missing.length > 0) throw new ConfigError(`refusing to serve methods with no authorization declaration: ${missing.join(", ")}`);
  }

  /** Every declared method with its requirement in words: the table tests and docs check. */
  describe(): { method: string; requires: string }[] {
    return [...this.byPath.entries()].map(([method, d]) => ({ method, requires: describeDeclaration(d.declaration) }));
  }
}

export function pathOf(method: DescMethod): string {
  return `${method.parent.typeName}/${method.name}`;
}

function describeDeclaration(d: Declaration): string {
  if ("open" in d) return `open: ${d.open}`;
  const parts: string[] = [];
  if (d.operator) {
    const action = typeof d.operator.action === "string" ? d.operator.action : (d.operator.actions ?? []).join(" | ");
    const scope = d.operator.scope === "hosts" ? (d.operator.hostsOf ? "hosts named" : "hosts resolved") : d.operator.scope;
    parts.push(`operator ${action} (${scope})`);
  }
  if (d.peer) parts.push(`${d.peer.roles.join("|")} ${d.peer.action} (${d.peer.scope})`);
  return parts.join("; ") || "nobody";
}

/** A call as the boundary sees it before deciding. */
export interface Call {
  readonly declared: DeclaredMethod;
  /** From the TLS peer certificate; undefined when it names no rexmesh identity (or there is none). */
  readonly peer: PeerIdentity | undefined;
  /** Whether the peer's identity is on the deny-list. */
  readonly revoked: boolean;
  /** The request, for unary calls; undefined for streams (read by the service). */
  readonly request: unknown;
}

/** What the boundary allowed: who, for which action. Handlers act only on a grant. */
export interface Grant {
  readonly peer: PeerIdentity | undefined;
  /** The action allowed ("open" for open methods). */
  readonly action: string;
  /** The role (operators) or rule that allowed it, for the audit log. */
  readonly by: string;
}

/**
 * The checks every server makes the same way: the caller is identified,
 * not revoked, and holds a role the declaration accepts. Returns the peer
 * and the rule that admits it.
 */
export function admit(call: Call): { peer: PeerIdentity; operator?: OperatorRule; peerRule?: PeerRule } {
  const admitted = admitIdentity(call);
  admitted.peerRule?.check?.(admitted.peer, call.request);
  return admitted;
}

/**
 * What {@link admit} decides without the request: who the caller is, not
 * revoked, with a role the declaration accepts. A caller it refuses is
 * refused whatever it asks, so a server may ask it before reading a body.
 */
export function admitIdentity(call: Omit<Call, "request">): { peer: PeerIdentity; operator?: OperatorRule; peerRule?: PeerRule } {
  const d = call.declared.declaration;
  if ("open" in d) throw new PermissionDeniedError("internal: an open method is not admitted by identity");
  const peer = call.peer;
  if (!peer) throw new UnauthenticatedError("the client certificate names no rexmesh identity");
  if (call.revoked) throw new PermissionDeniedError("this certificate's identity has been revoked");
  if (peer.role === "operator" && d.operator) return { peer, operator: d.operator };
  if (peer.role !== "operator" && d.peer?.roles.includes(peer.role)) return { peer, peerRule: d.peer };
  const accepted = [...(d.operator ? ["operator"] : []), ...(d.peer?.roles ?? [])];
  const article = /^[aeiou]/.test(peer.role) ? "an" : "a";
  throw new PermissionDeniedError(
    accepted.length ? `${article} ${peer.role} certificate cannot be used here; this service accepts ${accepted.join(" or ")} certificates` : "this method is not served to anyone",
  );
}

/** The action an operator call asks for. */
export function operatorAction(rule: OperatorRule, request: unknown): string {
  return typeof rule.action === "string" ? rule.action : rule.action(request);
}

/**
 * A grpc-js unary handler behind the boundary: the declaration of its
 * method admits the caller (certificate role, deny-list, scope check) and
 * `decided` records the outcome, before the handler runs. A method without
 * a declaration throws here, at wiring time.
 */
export function guardUnary(
  table: DeclarationTable,
  handler: UnaryHandler,
  opts: { isRevoked: (peer: PeerIdentity) => boolean; log: Logger },
): UnaryHandler {
  const declared = table.get(handler.method);
  if (!declared) throw new ConfigError(`${pathOf(handler.method)} has no authorization declaration`);
  if ("open" in declared.declaration) return handler;
  return {
    method: handler.method,
    handle: async (request, peer) => {
      const grant = admitLogged({ declared, peer, revoked: opts.isRevoked(peer), request }, opts.log);
      return handler.handle(request, grant.peer);
    },
  };
}

/** The same boundary for a bidirectional link served by grpc-js (the request is read by the session). */
export function guardLink<L>(
  table: DeclarationTable,
  method: DescMethod,
  serve: (link: L, peer: PeerIdentity) => Promise<void>,
  opts: { isRevoked: (peer: PeerIdentity) => boolean; log: Logger },
): (link: L, peer: PeerIdentity) => Promise<void> {
  const declared = table.get(method);
  if (!declared) throw new ConfigError(`${pathOf(method)} has no authorization declaration`);
  return async (link, peer) => {
    const grant = admitLogged({ declared, peer, revoked: opts.isRevoked(peer), request: undefined }, opts.log);
    await serve(link, grant.peer);
  };
}

/** Admits a peer call where no audit log is kept (proxies): every refusal is logged, allowed calls at debug. */
function admitLogged(call: Call, log: Logger): Grant & { peer: PeerIdentity } {
  const method = pathOf(call.declared.method);
  const who = call.peer ? formatIdentity(call.peer) : "unidentified";
  try {
    const { peer, peerRule } = admit(call);
    if (!peerRule) throw new PermissionDeniedError(`a ${peer.role} certificate cannot be used here`);
    log.debug("call allowed", { method, peer: who, action: peerRule.action });
    return { peer, action: peerRule.action, by: peerRule.scope };
  } catch (err) {
    log.info("call refused", { method, peer: who, err });
    throw err;
  }
}
