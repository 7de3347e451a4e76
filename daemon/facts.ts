import { create } from "@bufbuild/protobuf";
import { readFileSync } from "node:fs";
import os from "node:os";
import { clampFacts } from "../common/limits.js";
import { BATCH_SIGNATURE } from "../common/task-signing.js";
import { HostFactsSchema, type HostFacts } from "../gen/rexmesh/v1/host_pb.js";
import { DAEMON_VERSION } from "./version.js";


/** The os family from /etc/os-release (debian, rhel, ...), or the platform elsewhere. */
function osFamily(): string {
  try {
    const text = readFileSync("/etc/os-release", "utf8");
    const value = (key: string) => text.match(new RegExp(`^${key}=\"?([^\"\\n]*)`, "m"))?.[1];
    const like = value("ID_LIKE")?.split(/\s+/)[0];
    return like || value("ID") || os.platform();
  } catch {
    return os.platform();
  }
}

/**
 * What this host reports about itself when it connects, cut to the fact
 * limits (common/limits.ts): the controller keeps no more than that, so the
 * daemon never sends more (a host with thousands of addresses, say).
 * `tools` are the host's execution tools (daemon/tools.ts).
 */
export function collectFacts(tools: readonly string[]): HostFacts {
  const addresses = Object.values(os.networkInterfaces())
    .flat()
    .filter((a): a is os.NetworkInterfaceInfo => a !== undefined && !a.internal)
    .map((a) => a.address);
  const facts = create(HostFactsSchema, {
    os: os.platform(),
    osFamily: osFamily(),
    arch: os.arch(),
    kernel: os.release(),
    hostname: os.hostname(),
    addresses,
    daemonVersion: DAEMON_VERSION,
    tools: [...tools],
    features: [BATCH_SIGNATURE],
  });
  return clampFacts(facts).facts;
}
