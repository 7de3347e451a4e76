import { readCredentials } from "../certs/files.js";
import { clientFor, openChannel, type ChannelOptions } from "../common/connect-dial.js";
import { parseDuration } from "../common/duration.js";
import { InvalidArgumentError } from "../common/errors.js";
import { ControllerService } from "../gen/rexmesh/v1/controller_pb.js";
import type { OptionSpec } from "./args.js";

/** Options every operator command takes; each falls back to a REXMESH_* variable. */
export const connectionOptions: Record<string, OptionSpec> = {
  controller: { type: "string", doc: "controller address host:port (REXMESH_CONTROLLER)", value: "ADDR" },
  cert: { type: "string", doc: "operator certificate (REXMESH_CERT)", value: "FILE" },
  key: { type: "string", doc: "operator private key (REXMESH_KEY)", value: "FILE" },
  ca: { type: "string", doc: "mesh CA certificate (REXMESH_CA)", value: "FILE" },
  "connect-timeout": { type: "string", doc: "give up connecting after this long (default 10s; REXMESH_CONNECT_TIMEOUT)", value: "DURATION" },
  keepalive: { type: "string", doc: "PING an open connection this often, and drop it when the answer takes longer (default 30s, at most 15s to answer; REXMESH_KEEPALIVE)", value: "DURATION" },
};

/** The connect timeout and keep-alive from flags or REXMESH_CONNECT_TIMEOUT / REXMESH_KEEPALIVE. */
function channelOptions(values: Record<string, unknown>, env: NodeJS.ProcessEnv = process.env): ChannelOptions {
  const duration = (flag: string, variable: string): number | undefined => {
    const v = (values[flag] as string | undefined) ?? env[variable];
    if (v === undefined || v === "") return undefined;
    const ms = parseDuration(v, `--${flag}`);
    if (ms <= 0) throw new InvalidArgumentError(`--${flag} must be positive`);
    return ms;
  };
  const connectTimeoutMs = duration("connectTimeout", "REXMESH_CONNECT_TIMEOUT");
  const pingIntervalMs = duration("keepalive", "REXMESH_KEEPALIVE");
  return { ...(connectTimeoutMs !== undefined ? { connectTimeoutMs } : {}), ...(pingIntervalMs !== undefined ? { pingIntervalMs } : {}) };
}

/** A connection to the controller with the operator's credentials, from flags or REXMESH_* variables. */
export function operatorChannel(values: Record<string, unknown>, env: NodeJS.ProcessEnv = process.env) {
  const pick = (name: string) => {
    const v = (values[name] as string | undefined) ?? env[`REXMESH_${name.toUpperCase()}`];
    if (!v) throw new InvalidArgumentError(`--${name} or REXMESH_${name.toUpperCase()} is required (rexmesh dev prints the exports to use)`);
    return v;
  };
  const creds = readCredentials({ cert: pick("cert"), key: pick("key"), ca: pick("ca") });
  return openChannel(pick("controller"), creds, ["controller"], channelOptions(values, env));
}

/** A ControllerService client with the operator's credentials. */
export function operatorClient(values: Record<string, unknown>, env: NodeJS.ProcessEnv = process.env) {
  const channel = operatorChannel(values, env);
  return { client: clientFor(ControllerService, channel), close: () => channel.close() };
}
