import { fromBinary, toBinary } from "@bufbuild/protobuf";
import type { ReportKeyStore } from "../common/host-signing.js";
import type { LmdbEnv } from "../common/lmdb.js";
import type { Logger } from "../common/logger.js";
import { HostReportKeySchema } from "../gen/rexmesh/v1/host_pb.js";

/**
 * Hosts' accepted report keys in the controller's store (protobuf, so a
 * field of a later release is kept): a restarted controller checks presence
 * proofs, task ends and events against them. A failed write is logged; the
 * key is taken again from the host's next hello.
 */
export function lmdbReportKeyStore(env: LmdbEnv, log: Logger): ReportKeyStore {
  const db = env.db<Buffer>("report-keys", "binary");
  return {
    get: (keyId) => {
      const raw = db.get(keyId);
      return raw ? fromBinary(HostReportKeySchema, raw) : undefined;
    },
    put: (key) => {
      db.put(key.keyId, Buffer.from(toBinary(HostReportKeySchema, key))).catch((err: unknown) => log.error("storing a report key failed", { err }));
    },
  };
}
