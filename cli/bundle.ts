import { writeFileAtomic, readCredentials } from "../certs/files.js";
import { InvalidArgumentError } from "../common/errors.js";
import { callGrpcUnary } from "../common/grpc-link.js";
import { create } from "@bufbuild/protobuf";
import { ExportResultsRequestSchema, ImportArtifactChunkRequestSchema, ImportTasksRequestSchema, ProxyAdminService } from "../gen/rexmesh/v1/proxy_admin_pb.js";
import { closeSync, createWriteStream, existsSync, mkdirSync, openSync, readSync, renameSync, rmSync, statSync } from "node:fs";
import { once } from "node:events";
import { join } from "node:path";
import { fromBinary } from "@bufbuild/protobuf";
import type { Credentials } from "../certs/files.js";
import { digestHex, DigestBuilder, DigestMismatchError, digestOfFile, isDigest } from "../common/digest.js";
import { BundlePayloadSchema, BundleSchema } from "../gen/rexmesh/v1/bundle_pb.js";
import { artifactClient } from "./artifacts.js";

/** Bytes per ImportArtifactChunk (the proxy takes at most 1 MiB). */
const IMPORT_SLICE_BYTES = 1024 * 1024;
import { helpText, parse, type OptionSpec } from "./args.js";
import { connectionOptions, operatorClient } from "./client.js";
import { readInputFile } from "./input-file.js";
import type { Io } from "./operator.js";

const controllerBundleOptions: Record<string, OptionSpec> = {
  region: { type: "string", doc: "export: the region whose queued tasks go into the bundle", value: "REGION" },
  ...connectionOptions,
  help: { type: "boolean", short: "h", doc: "show this help" },
};

/** `rexmesh bundle export|import`: the controller's side of sites with no link. */
export async function bundleCommand(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, controllerBundleOptions);
  const [verb, file] = p.positionals;
  if (p.values.help || !verb) {
    io.out(
      helpText("rexmesh bundle (export --region REGION FILE | import FILE)", controllerBundleOptions, [
        "rexmesh bundle export --region ship-7 tasks.rxb    # signed by the controller; carry it to the site",
        "rexmesh bundle import results.rxb                  # results signed by the site's proxy; importing twice changes nothing",
      ]),
    );
    return p.values.help ? 0 : 2;
  }
  if (!file) throw new InvalidArgumentError(`rexmesh bundle ${verb} needs a FILE`);
  if (verb !== "export" && verb !== "import") throw new InvalidArgumentError(`unknown bundle command ${JSON.stringify(verb)} (export, import)`);
  if (verb === "export" && typeof p.values.region !== "string") throw new InvalidArgumentError("export needs --region");
  // Read before connecting: a missing file is the operator's to fix, whatever the controller says.
  const bundle = verb === "import" ? readInputFile(file, "bundle import") : undefined;
  const { client, close } = operatorClient(p.values);
  try {
    if (bundle === undefined) {
      const region = p.values.region as string;
      const r = await client.exportBundle({ region }, { signal: io.signal });
      writeFileAtomic(file, r.bundle);
      const carried = await fetchBundleArtifacts(p.values, file, r.bundle, io.signal);
      io.out(`${r.tasks} tasks for region ${region} written to ${file}${carried > 0 ? `, with ${carried} artifact(s) in ${file}.artifacts/ (carry it along)` : ""}\n`);
      return 0;
    }
    const r = await client.importBundle({ bundle }, { signal: io.signal });
    io.out(`imported ${file}: ${r.statusesApplied} statuses and ${r.outputChunksApplied} output chunks applied, ${r.hosts} hosts reported\n`);
    return 0;
  } finally {
    close();
  }
}

const proxyBundleOptions: Record<string, OptionSpec> = {
  proxy: { type: "string", doc: "the proxy's address (default 127.0.0.1:7444)", value: "ADDR" },
  cert: { type: "string", doc: "the proxy's own certificate (REXMESH_CERT)", value: "FILE" },
  key: { type: "string", doc: "the proxy's own key (REXMESH_KEY)", value: "FILE" },
  ca: { type: "string", doc: "mesh CA certificate (REXMESH_CA)", value: "FILE" },
  help: { type: "boolean", short: "h", doc: "show this help" },
};

/** `rexmesh proxy bundle import|export-results`: the site's side, run on the proxy's machine with its own certificate. */
export async function proxyBundleCommand(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, proxyBundleOptions);
  const [verb, file] = p.positionals;
  if (p.values.help || !verb) {
    io.out(
      helpText("rexmesh proxy bundle (import FILE | export-results FILE) [--proxy ADDR] --cert --key --ca", proxyBundleOptions, [
        "rexmesh proxy bundle import tasks.rxb --cert px.crt --key px.key --ca ca.crt",
        "rexmesh proxy bundle export-results results.rxb --cert px.crt --key px.key --ca ca.crt",
      ]),
    );
    return p.values.help ? 0 : 2;
  }
  if (!file) throw new InvalidArgumentError(`rexmesh proxy bundle ${verb} needs a FILE`);
  const pick = (name: string) => {
    const v = (p.values[name] as string | undefined) ?? process.env[`REXMESH_${name.toUpperCase()}`];
    if (!v) throw new InvalidArgumentError(`--${name} is required (the proxy's own credentials)`);
    return v;
  };
  const bundle = verb === "import" ? readInputFile(file, "proxy bundle import") : undefined;
  const creds = readCredentials({ cert: pick("cert"), key: pick("key"), ca: pick("ca") });
  const address = (p.values.proxy as string | undefined) ?? "127.0.0.1:7444";
  if (bundle !== undefined) {
    // The artifacts first: the tasks may start as soon as they are in.
    const digests = bundleArtifacts(bundle);
    const sources = digests.map((digest) => ({ digest, path: join(`${file}.artifacts`, digestHex(digest)) }));
    const missing = sources.filter((s) => !existsSync(s.path));
    if (missing.length > 0) throw new InvalidArgumentError(`the bundle's tasks need ${missing.length} artifact(s) that are not beside it: ${missing.map((m) => m.path).join(", ")} (rexmesh bundle export writes them)`);
    for (const s of sources) await importArtifact(address, creds, s.digest, s.path);
    const r = await callGrpcUnary(address, creds, ["proxy"], ProxyAdminService.method.importTasks, create(ImportTasksRequestSchema, { bundle }));
    io.out(`imported ${file}: ${r.tasksAdded} new tasks, ${r.tasksAlreadyKnown} already known${sources.length > 0 ? `, ${sources.length} artifact(s) in the proxy's cache` : ""}\n`);
    return 0;
  }
  if (verb === "export-results") {
    const r = await callGrpcUnary(address, creds, ["proxy"], ProxyAdminService.method.exportResults, create(ExportResultsRequestSchema));
    writeFileAtomic(file, r.bundle);
    io.out(`${r.statuses} statuses and ${r.outputChunks} output chunks written to ${file}\n`);
    return 0;
  }
  throw new InvalidArgumentError(`unknown proxy bundle command ${JSON.stringify(verb)} (import, export-results)`);
}

/** The artifacts a tasks bundle says its tasks fetch (read without checking the signature: the proxy checks it). */
function bundleArtifacts(bytes: Uint8Array): string[] {
  try {
    return fromBinary(BundlePayloadSchema, fromBinary(BundleSchema, bytes).payload).artifacts.filter(isDigest);
  } catch {
    return []; // not a bundle: the proxy says so
  }
}

/** Downloads the artifacts a tasks bundle's tasks need into FILE.artifacts/<hex>, each checked against its digest. */
async function fetchBundleArtifacts(values: Record<string, unknown>, file: string, bundle: Uint8Array, signal: AbortSignal): Promise<number> {
  const digests = bundleArtifacts(bundle);
  if (digests.length === 0) return 0;
  const dir = `${file}.artifacts`;
  mkdirSync(dir, { recursive: true });
  const { client, close } = artifactClient(values);
  try {
    for (const digest of digests) {
      const path = join(dir, digestHex(digest));
      if (existsSync(path) && (await digestOfFile(path)) === digest) continue;
      const tmp = `${path}.part`;
      const out = createWriteStream(tmp, { mode: 0o600 });
      const hash = new DigestBuilder();
      try {
        for await (const r of client.getArtifact({ digest }, { signal })) {
          hash.update(r.data);
          if (!out.write(r.data)) await once(out, "drain");
        }
        await new Promise<void>((resolve, reject) => out.end((err?: Error | null) => (err ? reject(err) : resolve())));
      } catch (err) {
        out.destroy();
        rmSync(tmp, { force: true });
        throw err;
      }
      if (hash.digest() !== digest) {
        rmSync(tmp, { force: true });
        throw new DigestMismatchError(digest, hash.digest());
      }
      renameSync(tmp, path);
    }
    return digests.length;
  } finally {
    close();
  }
}

/** Sends one artifact to the proxy's cache in slices (ImportArtifactChunk), starting over where the proxy says it stands. */
async function importArtifact(address: string, creds: Credentials, digest: string, path: string): Promise<void> {
  const size = statSync(path).size;
  const fd = openSync(path, "r");
  try {
    const buf = Buffer.alloc(IMPORT_SLICE_BYTES);
    let offset = 0;
    for (;;) {
      const n = readSync(fd, buf, 0, Math.min(buf.length, size - offset), offset);
      const r = await callGrpcUnary(address, creds, ["proxy"], ProxyAdminService.method.importArtifactChunk, create(ImportArtifactChunkRequestSchema, { digest, size: BigInt(size), offset: BigInt(offset), data: buf.subarray(0, n) }));
      if (r.complete) return;
      offset = Number(r.received);
      if (n === 0) throw new Error(`artifact ${digest}: ${path} ended at ${offset} of ${size} bytes`);
    }
  } finally {
    closeSync(fd);
  }
}
