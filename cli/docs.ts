import { timestampMs } from "@bufbuild/protobuf/wkt";
import { InvalidArgumentError } from "../common/errors.js";
import type { Document } from "../gen/rexmesh/v1/controller_pb.js";
import { helpText, parse, type OptionSpec } from "./args.js";
import { connectionOptions, operatorClient } from "./client.js";
import { readInputFile } from "./input-file.js";
import { table } from "./table.js";
import type { Io } from "./operator.js";

const docsOptions: Record<string, OptionSpec> = {
  json: { type: "boolean", doc: "JSON output" },
  ...connectionOptions,
  help: { type: "boolean", short: "h", doc: "show this help" },
};

function docJson(d: Document): Record<string, unknown> {
  return {
    name: d.name,
    version: d.version,
    description: d.description,
    createdAt: d.createdAt ? new Date(timestampMs(d.createdAt)).toISOString() : undefined,
    createdBy: d.createdBy,
  };
}

/** `rexmesh docs put FILE | list | show NAME[@VERSION]`: command documents of the tenant. */
export async function docsCommand(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, docsOptions);
  const [verb, arg] = p.positionals;
  if (p.values.help) {
    io.out(
      helpText("rexmesh docs (put FILE | list | show NAME[@VERSION]) [--json]", docsOptions, [
        "rexmesh docs put restart-service.yaml     # stores the next version",
        "rexmesh docs list",
        "rexmesh docs show restart-service@2",
        "rexmesh run --doc restart-service -p service=nginx -t 'role=web'",
      ]),
    );
    return 0;
  }
  const json = Boolean(p.values.json);
  const run = async <T>(fn: (client: ReturnType<typeof operatorClient>["client"]) => Promise<T>): Promise<T> => {
    const { client, close } = operatorClient(p.values);
    try {
      return await fn(client);
    } finally {
      close();
    }
  };
  switch (verb) {
    case "put": {
      if (!arg) throw new InvalidArgumentError("rexmesh docs put needs a file (YAML or JSON)");
      const content = readInputFile(arg, "docs put").toString("utf8");
      const { document, warnings } = await run((c) => c.putDocument({ content }, { signal: io.signal }));
      for (const w of warnings) io.err(`rexmesh: warning: ${document!.name}@${document!.version} ${w}\n`);
      io.out(json ? JSON.stringify(docJson(document!)) + "\n" : `stored ${document!.name}@${document!.version}\n`);
      return 0;
    }
    case undefined:
    case "list": {
      const { documents } = await run((c) => c.listDocuments({}, { signal: io.signal }));
      const rows = documents.map(docJson);
      if (json) io.out(JSON.stringify(rows, null, 2) + "\n");
      // Versions are 1..N and never removed, so the newest names them all; UPDATED and BY are the newest's.
      else io.out(table([["NAME", "VERSIONS", "UPDATED", "BY", "DESCRIPTION"], ...documents.map((d) => [d.name, d.version === 1 ? "1" : `1..${d.version}`, d.createdAt ? new Date(timestampMs(d.createdAt)).toISOString() : "", d.createdBy, d.description])]));
      return 0;
    }
    case "show": {
      if (!arg) throw new InvalidArgumentError("rexmesh docs show needs NAME or NAME@VERSION");
      const { document } = await run((c) => c.getDocument({ name: arg }, { signal: io.signal }));
      const content = JSON.parse(document!.content) as unknown;
      if (json) io.out(JSON.stringify({ ...docJson(document!), content }, null, 2) + "\n");
      else io.out(`# ${document!.name}@${document!.version} by ${document!.createdBy}\n${JSON.stringify(content, null, 2)}\n`);
      return 0;
    }
    default:
      throw new InvalidArgumentError(`unknown docs command ${JSON.stringify(verb)} (put, list, show)`);
  }
}
