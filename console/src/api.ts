import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-web";
import { ControllerService } from "../../gen/rexmesh/v1/controller_pb.js";

/**
 * The console talks to the controller's public API through Connect (JSON),
 * exactly as any client does; the session cookie goes with every call
 * (same origin), and Connect's content type is what the server's CSRF check
 * wants to see.
 */
const transport = createConnectTransport({
  baseUrl: location.origin,
  fetch: (input, init) => fetch(input, { ...init, credentials: "same-origin" }),
});

export const api = createClient(ControllerService, transport);

export interface Me {
  operator: string;
  tenant: string;
  identity: string;
  expiresAt: string;
}

/** Who this browser is logged in as, or undefined. */
export async function whoAmI(): Promise<Me | undefined> {
  const res = await fetch("/session", { credentials: "same-origin" });
  return res.ok ? ((await res.json()) as Me) : undefined;
}

/** Turns a one-time link's secret into a session cookie. */
export async function login(token: string): Promise<void> {
  const res = await fetch("/session/login", { method: "POST", credentials: "same-origin", headers: { "content-type": "application/json" }, body: JSON.stringify({ token }) });
  if (!res.ok) {
    const body = (await res.json().catch(() => ({}))) as { message?: string };
    throw new Error(body.message ?? `login failed (${res.status})`);
  }
}

export async function logout(): Promise<void> {
  await fetch("/session/logout", { method: "POST", credentials: "same-origin", headers: { "content-type": "application/json" }, body: "{}" });
}

/** An error as the operator should read it: the API's code and message. */
export function describeError(err: unknown): string {
  if (err instanceof ConnectError) return `${Code[err.code] ?? `code ${err.code}`}: ${err.rawMessage}`;
  return err instanceof Error ? err.message : String(err);
}


/** Runs a promise from an event handler: what it fails with goes to the browser's console (handlers show their own errors). */
export function background(p: Promise<unknown>): void {
  p.catch((err: unknown) => console.error(err));
}
