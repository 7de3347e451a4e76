import { writeFileAtomic, readCredentials } from "../certs/files.js";
import { InvalidArgumentError } from "../common/errors.js";
import { callGrpcUnary } from "../common/grpc-link.js";
import { create } from "@bufbuild/protobuf";
import { ExportResultsRequestSchema, ImportTasksRequestSchema, ProxyAdminService } from "../gen/rexmesh/v1/proxy_admin_pb.js";
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
      io.out(`${r.tasks} tasks for region ${region} written to ${file}\n`);
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
    const r = await callGrpcUnary(address, creds, ["proxy"], ProxyAdminService.method.importTasks, create(ImportTasksRequestSchema, { bundle }));
    io.out(`imported ${file}: ${r.tasksAdded} new tasks, ${r.tasksAlreadyKnown} already known\n`);
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
