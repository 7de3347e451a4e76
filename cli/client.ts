import { readCredentials } from "../certs/files.js";
import { clientFor, openChannel } from "../common/connect-dial.js";
import { InvalidArgumentError } from "../common/errors.js";
import { ControllerService } from "../gen/rexmesh/v1/controller_pb.js";
import type { OptionSpec } from "./args.js";

/** Options every operator command takes; each falls back to a REXMESH_* variable. */
export const connectionOptions: Record<string, OptionSpec> = {
  controller: { type: "string", doc: "controller address host:port (REXMESH_CONTROLLER)", value: "ADDR" },
  cert: { type: "string", doc: "operator certificate (REXMESH_CERT)", value: "FILE" },
  key: { type: "string", doc: "operator private key (REXMESH_KEY)", value: "FILE" },
  ca: { type: "string", doc: "mesh CA certificate (REXMESH_CA)", value: "FILE" },
};

/** A connection to the controller with the operator's credentials, from flags or REXMESH_* variables. */
export function operatorChannel(values: Record<string, unknown>, env: NodeJS.ProcessEnv = process.env) {
  const pick = (name: string) => {
    const v = (values[name] as string | undefined) ?? env[`REXMESH_${name.toUpperCase()}`];
    if (!v) throw new InvalidArgumentError(`--${name} or REXMESH_${name.toUpperCase()} is required (rexmesh dev prints the exports to use)`);
    return v;
  };
  const creds = readCredentials({ cert: pick("cert"), key: pick("key"), ca: pick("ca") });
  return openChannel(pick("controller"), creds, ["controller"]);
}

/** A ControllerService client with the operator's credentials. */
export function operatorClient(values: Record<string, unknown>, env: NodeJS.ProcessEnv = process.env) {
  const channel = operatorChannel(values, env);
  return { client: clientFor(ControllerService, channel), close: () => channel.close() };
}
