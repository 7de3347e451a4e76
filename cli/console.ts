import { timestampMs } from "@bufbuild/protobuf/wkt";
import { clientFor } from "../common/connect-dial.js";
import { InvalidArgumentError } from "../common/errors.js";
import { ConsoleService } from "../gen/rexmesh/v1/console_pb.js";
import { helpText, parse, type OptionSpec } from "./args.js";
import { connectionOptions, operatorChannel } from "./client.js";
import type { Io } from "./operator.js";

const consoleOptions: Record<string, OptionSpec> = {
  json: { type: "boolean", doc: "print {url, expiresAt} as JSON" },
  ...connectionOptions,
  help: { type: "boolean", short: "h", doc: "show this help" },
};

/** `rexmesh console`: a one-time link that logs a browser in to the web console as this operator. */
export async function consoleCommand(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, consoleOptions);
  const v = p.values;
  if (v.help) {
    io.out(
      helpText("rexmesh console [--json]", consoleOptions, [
        "rexmesh console            # prints https://controller:8443/login#…: open it within two minutes, once",
      ]),
    );
    return 0;
  }
  if (p.positionals.length > 0) throw new InvalidArgumentError(`unexpected ${JSON.stringify(p.positionals[0])}`);
  const channel = operatorChannel(v);
  try {
    const res = await clientFor(ConsoleService, channel).createConsoleLink({}, { signal: io.signal });
    const expiresAt = res.expiresAt ? new Date(timestampMs(res.expiresAt)).toISOString() : "";
    if (v.json) io.out(JSON.stringify({ url: res.url, expiresAt }) + "\n");
    else {
      io.out(`${res.url}\n`);
      io.err(`open it in a browser before ${expiresAt}; it works once and logs that browser in as you\n`);
    }
    return 0;
  } finally {
    channel.close();
  }
}
