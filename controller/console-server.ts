/**
 * The web console's HTTPS listener (docs/console.md): the console's static
 * files, the login and logout of browser sessions, and the public
 * ControllerService through Connect — the same handlers, boundary, policy
 * and audit as the main port, with the caller taken from the session
 * cookie instead of a client certificate. There are no other data
 * endpoints: the browser reads and acts through the protobuf API.
 */
import http2 from "node:http2";
import type { IncomingMessage, ServerResponse } from "node:http";
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { extname, join, relative, sep } from "node:path";
import type { ConnectRouter } from "@connectrpc/connect";
import { formatIdentity, type PeerIdentity } from "../certs/identity.js";
import type { Clock } from "../common/clock.js";
import { callerContext, closingUnfinishedRequests, createRpcHandler, http2Lifecycle, type RpcServer } from "../common/connect-server.js";
import { ResourceExhaustedError, UnauthenticatedError } from "../common/errors.js";
import { LIMITS } from "../common/limits.js";
import type { Logger } from "../common/logger.js";
import type { Call, DeclarationTable, Grant } from "../common/rpc-access.js";
import type { ConsoleSession, ConsoleSessions } from "./console-sessions.js";
import { LinkReplayed, MAX_SECRET_CHARS } from "./console-sessions.js";

/** The session cookie: `__Host-` makes browsers insist on Secure, Path=/ and no Domain. */
export const CONSOLE_COOKIE = "__Host-rexmesh-console";
/** Bytes of a login or logout request body at most (a secret in JSON). */
const MAX_LOGIN_BODY = 256;
/** Bytes of a Cookie header looked at, at most. */
const MAX_COOKIE_HEADER = 4096;

const TYPES: Record<string, string> = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".svg": "image/svg+xml",
  ".png": "image/png",
  ".ico": "image/x-icon",
  ".json": "application/json",
  ".woff2": "font/woff2",
};

/** Headers on every answer: no framing, no sniffing, no referrer, only our own scripts and connections. */
const SECURITY_HEADERS = {
  "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
  "x-content-type-options": "nosniff",
  "referrer-policy": "no-referrer",
  "x-frame-options": "DENY",
  "strict-transport-security": "max-age=31536000",
};

/** Content types a cross-site form may send without a preflight: never accepted for a call. */
const SIMPLE_TYPES = ["application/x-www-form-urlencoded", "multipart/form-data", "text/plain"];

export interface ConsoleServerOptions {
  /** TLS certificate and key the browser sees (the controller's own by default). */
  tls: { certPem: string; keyPem: string };
  /** The console's built files (dist/console). */
  staticDir: string;
  sessions: ConsoleSessions;
  routes: (router: ConnectRouter) => void;
  declarations: DeclarationTable;
  decide: (call: Call) => Promise<Grant>;
  isRevoked: (peer: PeerIdentity) => boolean;
  /** Whether the operator still holds the `console` action under the policy in force: a session is worth nothing once it does not. */
  holdsConsole: (peer: PeerIdentity) => boolean;
  /**
   * The host[:port] names browsers may reach the console by (the address it
   * bound, and that of --console-url), lower case, read per request. Any other Host is
   * answered 421 before anything else: a page on a rebound DNS name gets
   * nothing, and the Origin check below compares with a name we chose.
   */
  allowedHosts: () => readonly string[];
  /**
   * Records logins and logouts (the calls themselves are audited by the
   * boundary), and logins refused to a known operator: one whose identity
   * was revoked or whose console action was taken away, or a link opened a
   * second time (someone else holds it). A secret that names nobody is only
   * logged: a stranger must not write into a tenant's audit.
   */
  audit: (kind: "console.login" | "console.logout", peer: PeerIdentity, reason: string, decision?: "allowed" | "denied") => Promise<void>;
  log: Logger;
  clock: Clock;
}

type Req = http2.Http2ServerRequest | IncomingMessage;
type Res = http2.Http2ServerResponse | ServerResponse;

/** The console listener; `listen` and `close` as the main port's. */
export function createConsoleServer(opts: ConsoleServerOptions): Pick<RpcServer, "listen" | "close" | "served"> & { server: http2.Http2SecureServer } {
  const files = loadStatic(opts.staticDir);
  /** The request's session, if it has one that is valid, not revoked, and whose operator still holds `console`. */
  const checked = new WeakMap<object, ConsoleSession>();
  const sessionOf = (req: Req): ConsoleSession | undefined => {
    const secret = cookieOf(req);
    const s = secret === undefined ? undefined : opts.sessions.session(secret);
    return s && !opts.isRevoked(s.peer) && opts.holdsConsole(s.peer) ? s : undefined;
  };
  const { handler: rpc, served } = createRpcHandler({
    routes: opts.routes,
    log: opts.log,
    declarations: opts.declarations,
    decide: opts.decide,
    clock: opts.clock,
    // The session handle() found for this request (checked once per request, not again here).
    callerOf: (req) => {
      const peer = checked.get(req)?.peer;
      return callerContext(peer && { ...peer, via: "console" }, opts.isRevoked);
    },
  });
  const api = closingUnfinishedRequests(rpc, served, opts.clock);
  const apiPaths = new Set(served.map((m) => `/${m.parent.typeName}/${m.name}`));

  const handle = async (req: Req, res: Res): Promise<void> => {
    const host = hostOf(req);
    if (!opts.allowedHosts().includes(host)) return send(res, 421, { "content-type": "text/plain" }, "this console is not served under that name");
    const path = (req.url ?? "/").split("?")[0]!;
    if (apiPaths.has(path)) {
      const refusal = crossSiteRefusal(req);
      if (refusal) return send(res, 403, { "content-type": "application/json" }, JSON.stringify({ code: "permission_denied", message: refusal }));
      // Without a session the call is answered at once, its body never read: the port needs no certificate,
      // and a caller with nothing must not get to hold streams and buffers for the arrival timeout.
      const session = sessionOf(req);
      if (!session) return send(res, 401, { "content-type": "application/json" }, JSON.stringify({ code: "unauthenticated", message: "not logged in to the console (or the session ended): open a new link from rexmesh console" }));
      checked.set(req, session);
      return api(req, res);
    }
    if (path === "/session/login" || path === "/session/logout" || path === "/session") return sessionEndpoint(path, req, res);
    if (req.method !== "GET" && req.method !== "HEAD") return send(res, 405, { allow: "GET" }, "");
    // Every page of the single-page app is index.html; assets by their built names.
    const file = files.get(path) ?? (path.startsWith("/assets/") ? undefined : files.get("/index.html"));
    if (!file) return send(res, 404, { "content-type": "text/plain" }, "not found");
    const cache = path.startsWith("/assets/") ? "public, max-age=31536000, immutable" : "no-store";
    return send(res, 200, { "content-type": file.type, "cache-control": cache }, req.method === "HEAD" ? "" : file.body);
  };

  const sessionEndpoint = async (path: string, req: Req, res: Res): Promise<void> => {
    const json = { "content-type": "application/json", "cache-control": "no-store" };
    if (path === "/session") {
      if (req.method !== "GET") return send(res, 405, { allow: "GET" }, "");
      const s = sessionOf(req);
      if (!s) return send(res, 401, json, JSON.stringify({ code: "unauthenticated", message: "not logged in" }));
      return send(res, 200, json, JSON.stringify({ operator: s.peer.id, tenant: s.peer.scope, identity: formatIdentity(s.peer), expiresAt: new Date(s.expiresAt).toISOString() }));
    }
    if (req.method !== "POST") return send(res, 405, { allow: "POST" }, "");
    const refusal = crossSiteRefusal(req);
    if (refusal) return send(res, 403, json, JSON.stringify({ code: "permission_denied", message: refusal }));
    if (path === "/session/logout") {
      const secret = cookieOf(req);
      const s = secret === undefined ? undefined : opts.sessions.session(secret);
      if (secret !== undefined) opts.sessions.end(secret);
      if (s) await opts.audit("console.logout", s.peer, "logged out");
      return send(res, 204, { ...json, "set-cookie": `${CONSOLE_COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0` }, "");
    }
    let token: string;
    try {
      const body = JSON.parse(await readBody(req, MAX_LOGIN_BODY)) as { token?: unknown };
      token = typeof body.token === "string" ? body.token : "";
    } catch {
      return send(res, 400, json, JSON.stringify({ code: "invalid_argument", message: `the login request must be JSON {"token": "..."} of at most ${MAX_LOGIN_BODY} bytes` }));
    }
    try {
      const { secret, session } = opts.sessions.redeem(token);
      if (opts.isRevoked(session.peer) || !opts.holdsConsole(session.peer)) {
        opts.sessions.end(secret);
        const why = opts.isRevoked(session.peer) ? "this operator's identity has been revoked" : "the policy no longer gives this operator the console action";
        await auditRefusal(session.peer, why);
        return send(res, 403, json, JSON.stringify({ code: "permission_denied", message: why }));
      }
      await opts.audit("console.login", session.peer, `one-time link, session until ${new Date(session.expiresAt).toISOString()}`);
      const maxAge = Math.floor((session.expiresAt - opts.clock.now()) / 1000);
      return send(res, 200, { ...json, "set-cookie": `${CONSOLE_COOKIE}=${secret}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=${maxAge}` }, JSON.stringify({ operator: session.peer.id, tenant: session.peer.scope }));
    } catch (err) {
      if (!(err instanceof UnauthenticatedError || err instanceof ResourceExhaustedError)) throw err;
      const status = err instanceof UnauthenticatedError ? 401 : 429;
      opts.log.info("console login refused", { err, from: req.socket.remoteAddress });
      if (err instanceof LinkReplayed) await auditRefusal(err.peer, `the link was opened already; opened again from ${req.socket.remoteAddress ?? "an unknown address"}`);
      return send(res, status, json, JSON.stringify({ code: status === 401 ? "unauthenticated" : "resource_exhausted", message: err.message }));
    }
  };

  /** A refusal stands whether or not its audit event could be stored. */
  const auditRefusal = (peer: PeerIdentity, why: string) =>
    opts.audit("console.login", peer, why, "denied").catch((err: unknown) => opts.log.error("audit event not stored", { kind: "console.login", err }));

  const server = http2.createSecureServer(
    { cert: opts.tls.certPem, key: opts.tls.keyPem, allowHTTP1: true, minVersion: "TLSv1.2", settings: { maxConcurrentStreams: LIMITS.streamsPerConnection } },
    (req, res) => {
    for (const [k, v] of Object.entries(SECURITY_HEADERS)) res.setHeader(k, v);
    handle(req, res).catch((err: unknown) => {
      opts.log.error("console request failed", { err });
      if (!res.headersSent) send(res, 500, { "content-type": "text/plain" }, "internal error");
      else res.end();
    });
    },
  );
  server.on("tlsClientError", (err) => opts.log.debug("console TLS handshake refused", { err }));
  return { server, served, ...http2Lifecycle(server) };
}

/**
 * Why a state-changing request does not come from the console's own pages,
 * or undefined. A cross-site page can make a browser send a cookie-bearing
 * POST only with a "simple" content type (a form), and its Origin names
 * the other site; a Connect call sends application/json or
 * application/connect+json, which needs a CORS preflight we never grant.
 */
export function crossSiteRefusal(req: Req): string | undefined {
  const type = String(req.headers["content-type"] ?? "").split(";")[0]!.trim().toLowerCase();
  if (req.method !== "POST") return "the console's API takes POST requests only";
  if (type === "" || SIMPLE_TYPES.includes(type)) return "refused: a cross-site form cannot call the console's API (content type)";
  const origin = req.headers.origin;
  if (origin !== undefined && origin.toLowerCase() !== `https://${hostOf(req)}`) return "refused: the request comes from another site (Origin)";
  const site = req.headers["sec-fetch-site"];
  if (site !== undefined && site !== "same-origin") return "refused: the request comes from another site (Sec-Fetch-Site)";
  return undefined;
}

/** The name the request was sent to (HTTP/2 :authority, or Host), lower case. */
function hostOf(req: Req): string {
  return String((req.headers[":authority"] as string | undefined) ?? req.headers.host ?? "").toLowerCase();
}

/** The session secret in the request's cookie, if any. */
function cookieOf(req: Req): string | undefined {
  const header = req.headers.cookie;
  const text = (Array.isArray(header) ? header.join("; ") : (header ?? "")).slice(0, MAX_COOKIE_HEADER);
  for (const part of text.split(";")) {
    const eq = part.indexOf("=");
    if (eq > 0 && part.slice(0, eq).trim() === CONSOLE_COOKIE) {
      const value = part.slice(eq + 1).trim();
      return value.length <= MAX_SECRET_CHARS ? value : undefined;
    }
  }
  return undefined;
}

/** How long a login or logout body may take to arrive. */
const BODY_MS = 5_000;

/** A small request body: refused at once when its declared length is over `max`, cut off past `max` bytes or BODY_MS. */
function readBody(req: Req, max: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const declared = Number(req.headers["content-length"] ?? 0);
    if (declared > max) {
      req.destroy();
      reject(new Error("body too large"));
      return;
    }
    const parts: Buffer[] = [];
    let size = 0;
    const timer = setTimeout(() => {
      req.destroy();
      reject(new Error("body too slow"));
    }, BODY_MS);
    req.on("data", (d: Buffer) => {
      size += d.length;
      if (size > max) {
        clearTimeout(timer);
        reject(new Error("body too large"));
        req.destroy();
      } else parts.push(d);
    });
    req.on("end", () => {
      clearTimeout(timer);
      resolve(Buffer.concat(parts).toString("utf8"));
    });
    req.on("error", (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

function send(res: Res, status: number, headers: Record<string, string>, body: string | Buffer): void {
  (res as ServerResponse).writeHead(status, headers);
  res.end(body);
}

/** The built console, read once at start: only these files are ever served, so no path from a URL reaches the disk. */
function loadStatic(dir: string): Map<string, { body: Buffer; type: string }> {
  const files = new Map<string, { body: Buffer; type: string }>();
  if (!existsSync(join(dir, "index.html"))) return files;
  const walk = (d: string) => {
    for (const name of readdirSync(d)) {
      const full = join(d, name);
      if (statSync(full).isDirectory()) walk(full);
      else files.set(`/${relative(dir, full).split(sep).join("/")}`, { body: readFileSync(full), type: TYPES[extname(name)] ?? "application/octet-stream" });
    }
  };
  walk(dir);
  return files;
}

/** Where the console's built files are: dist/console beside the running dist/controller. */
export function consoleStaticDir(moduleUrl: string): string {
  const here = new URL(".", moduleUrl).pathname;
  const root = join(here, "..");
  return root.endsWith(`${sep}dist${sep}`) || root.endsWith(`${sep}dist`) ? join(root, "console") : join(root, "dist", "console");
}
