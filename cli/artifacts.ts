import { createReadStream } from "node:fs";
import { create } from "@bufbuild/protobuf";
import { readCredentials } from "../certs/files.js";
import { clientFor, openChannel } from "../common/connect-dial.js";
import { digestOfFile } from "../common/digest.js";
import { InvalidArgumentError } from "../common/errors.js";
import { ArtifactService, PutArtifactRequestSchema, type PutArtifactRequest } from "../gen/rexmesh/v1/artifact_pb.js";
import { StepSchema, type Step } from "../gen/rexmesh/v1/task_pb.js";
import { helpText, parse, type OptionSpec } from "./args.js";
import { connectionOptions } from "./client.js";
import { requireRegularFile } from "./input-file.js";
import type { Io } from "./operator.js";

const options: Record<string, OptionSpec> = {
  json: { type: "boolean", doc: "print {digest, size, created} as JSON" },
  ...connectionOptions,
  help: { type: "boolean", short: "h", doc: "show this help" },
};

/** Chunks sent per PutArtifact message. */
const PUT_CHUNK_BYTES = 1024 * 1024;

/** An ArtifactService client with the operator's credentials (same flags and REXMESH_* variables as the other commands). */
export function artifactClient(values: Record<string, unknown>, env: NodeJS.ProcessEnv = process.env) {
  const pick = (name: string) => {
    const v = (values[name] as string | undefined) ?? env[`REXMESH_${name.toUpperCase()}`];
    if (!v) throw new InvalidArgumentError(`--${name} or REXMESH_${name.toUpperCase()} is required (rexmesh dev prints the exports to use)`);
    return v;
  };
  const creds = readCredentials({ cert: pick("cert"), key: pick("key"), ca: pick("ca") });
  const channel = openChannel(pick("controller"), creds, ["controller"]);
  return { client: clientFor(ArtifactService, channel), close: () => channel.close() };
}

/**
 * `rexmesh artifacts put FILE`: stores a file in the controller's artifact
 * repository and prints its digest, which `script` and `file.put` steps
 * name (`rexmesh run --script DIGEST`, `--put DIGEST --to PATH --base-dir DIR`).
 */
export async function artifactsCommand(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, options);
  if (p.values.help) {
    io.out(
      helpText("rexmesh artifacts put FILE [--json]", options, [
        "rexmesh artifacts put deploy.sh          # prints sha256:...",
        "rexmesh run --all --script sha256:... -- --verbose",
        "rexmesh run -H web-1 --put sha256:... --to nginx.conf --base-dir /etc/nginx",
      ]),
    );
    return 0;
  }
  const [verb, file, ...extra] = p.positionals;
  if (verb !== "put") throw new InvalidArgumentError(`unknown artifacts command ${JSON.stringify(verb ?? "")} (put)`);
  if (!file || extra.length > 0) throw new InvalidArgumentError("rexmesh artifacts put needs exactly one FILE");
  const r = await putArtifactFile(p.values, file, io.signal);
  io.out(p.values.json ? JSON.stringify(r) + "\n" : `${r.digest}\n`);
  return 0;
}

/** Stores a file in the controller's artifact repository (streamed, with its digest to check against). */
export async function putArtifactFile(values: Record<string, unknown>, file: string, signal: AbortSignal): Promise<{ digest: string; size: number; created: boolean }> {
  requireRegularFile(file, "artifacts put");
  // Sent with the content, so that the controller refuses it if the bytes change on the way.
  const digest = await digestOfFile(file);
  async function* requests(): AsyncGenerator<PutArtifactRequest> {
    let first = true;
    for await (const data of createReadStream(file, { highWaterMark: PUT_CHUNK_BYTES })) {
      yield create(PutArtifactRequestSchema, { digest: first ? digest : "", data: data as Buffer });
      first = false;
    }
    if (first) yield create(PutArtifactRequestSchema, { digest });
  }
  const { client, close } = artifactClient(values);
  try {
    const r = await client.putArtifact(requests(), { signal });
    return { digest: r.digest, size: Number(r.size), created: r.created };
  } finally {
    close();
  }
}

/** `rexmesh run` flags for steps that use an artifact. */
export const artifactRunOptions: Record<string, OptionSpec> = {
  script: { type: "string", doc: "run an artifact as a script with /bin/sh; arguments after --", value: "DIGEST" },
  put: { type: "string", doc: "write an artifact to a file (with --to and --base-dir)", value: "DIGEST" },
  to: { type: "string", doc: "--put: the file, relative to --base-dir", value: "PATH" },
  "base-dir": { type: "string", doc: "--put: the directory the file must stay inside (absolute)", value: "DIR" },
  mode: { type: "string", doc: "--put: permission bits in octal (default 644)", value: "OCTAL" },
};

/** The step `--script` or `--put` asks for, or undefined when neither is given. */
export function artifactStep(v: Record<string, unknown>, rest: string[]): Step | undefined {
  const script = v.script as string | undefined;
  const put = v.put as string | undefined;
  if (script === undefined && put === undefined) {
    for (const f of ["to", "baseDir", "mode"]) if (v[f] !== undefined) throw new InvalidArgumentError(`--${f === "baseDir" ? "base-dir" : f} goes with --put`);
    return undefined;
  }
  if (script !== undefined && put !== undefined) throw new InvalidArgumentError("give either --script or --put, not both");
  if (script !== undefined) return create(StepSchema, { tool: { case: "script", value: { artifact: script, args: rest } } });
  if (rest.length > 0) throw new InvalidArgumentError("--put takes no command after --");
  const to = v.to as string | undefined;
  const baseDir = v.baseDir as string | undefined;
  if (!to || !baseDir) throw new InvalidArgumentError("--put needs --to PATH and --base-dir DIR");
  const modeText = v.mode as string | undefined;
  if (modeText !== undefined && !/^[0-7]{1,4}$/.test(modeText)) throw new InvalidArgumentError(`--mode must be octal like 644, not ${JSON.stringify(modeText)}`);
  return create(StepSchema, { tool: { case: "filePut", value: { artifact: put!, path: to, baseDir, mode: modeText ? parseInt(modeText, 8) : 0 } } });
}
