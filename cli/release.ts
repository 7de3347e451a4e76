import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { InvalidArgumentError, NotFoundError } from "../common/errors.js";
import { newReleaseKeyPair, signRelease } from "../common/release.js";
import { ReleaseManifestSchema, SignedReleaseSchema } from "../gen/rexmesh/v1/release_pb.js";
import { helpText, parse, type OptionSpec } from "./args.js";
import { requireRegularFile } from "./input-file.js";
import type { Io } from "./operator.js";
import { putArtifactFile } from "./artifacts.js";
import { connectionOptions, operatorClient } from "./client.js";
import { table } from "./table.js";
import type { Release } from "../gen/rexmesh/v1/controller_pb.js";

const options: Record<string, OptionSpec> = {
  out: { type: "string", doc: "keygen: the directory for release.key and release.pub; sign: the signed release file (default FILE.release)", value: "PATH" },
  version: { type: "string", doc: "sign: the version the daemon will report", value: "V" },
  platform: { type: "string", doc: "sign: os-arch the release is for (default: this machine's, e.g. linux-x64); remove: only this platform's", value: "P" },
  key: { type: "string", doc: "sign: the release private key (from keygen)", value: "FILE" },
  release: { type: "string", doc: "add: the signed release file (default FILE.release)", value: "FILE" },
  ...connectionOptions,
  json: { type: "boolean", doc: "print the result as JSON" },
  help: { type: "boolean", short: "h", doc: "show this help" },
};

const ABOUT = `Daemon releases (docs/updates.md). A release key signs each release's
manifest (version, platform, size and digest of the artifact); daemons trust
the release keys they are given and refuse anything else. The release key is
not the mesh CA's and need not be on any machine of the mesh: keep it
offline, and sign there.

`;

/** `rexmesh release keygen | sign`. */
export async function releaseCommand(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, options);
  const v = p.values;
  if (v.help) {
    io.out(
      ABOUT +
        helpText("rexmesh release keygen --out DIR | sign FILE --version V --key FILE [--platform P] [--out FILE] | add FILE [--release FILE.release] | list | remove VERSION [--platform P]", options, [
          "rexmesh release keygen --out ~/release-key",
          "rexmesh release sign rexmesh-0.2.0.tar.gz --version 0.2.0 --key ~/release-key/release.key",
          "rexmesh release add rexmesh-0.2.0.tar.gz          # the artifact, and rexmesh-0.2.0.tar.gz.release",
          "rexmesh release list",
          "rexmesh update --to 0.2.0 --all --canary 1",
        ]),
    );
    return 0;
  }
  const [sub, ...args] = p.positionals;
  if (sub === "keygen") {
    if (args.length > 0 || typeof v.out !== "string") throw new InvalidArgumentError("rexmesh release keygen --out DIR");
    const keyFile = join(v.out, "release.key");
    const pubFile = join(v.out, "release.pub");
    if (existsSync(keyFile)) throw new InvalidArgumentError(`${keyFile} exists already: a release key is not replaced by accident`);
    const pair = newReleaseKeyPair();
    writeFileSync(keyFile, pair.privatePem, { mode: 0o600, flag: "wx" });
    writeFileSync(pubFile, pair.publicPem, { mode: 0o644 });
    io.out(v.json ? JSON.stringify({ keyId: pair.keyId, privateKey: keyFile, publicKey: pubFile }) + "\n" : `release key ${pair.keyId}: ${keyFile} (keep it apart), ${pubFile} (give it to daemons: --release-keys)\n`);
    return 0;
  }
  if (sub === "sign") {
    const [file, ...extra] = args;
    if (!file || extra.length > 0) throw new InvalidArgumentError("rexmesh release sign FILE --version V --key FILE");
    if (typeof v.version !== "string") throw new InvalidArgumentError("--version is required: the version the daemon will report");
    if (typeof v.key !== "string") throw new InvalidArgumentError("--key is required: the release private key");
    requireRegularFile(file, "the release artifact");
    const platform = typeof v.platform === "string" ? v.platform : `${process.platform}-${process.arch}`;
    const signed = signRelease(readFileSync(file), v.version, platform, readFileSync(v.key, "utf8"), Date.now());
    const out = typeof v.out === "string" ? v.out : `${file}.release`;
    writeFileSync(out, toBinary(SignedReleaseSchema, signed));
    const m = fromBinary(ReleaseManifestSchema, signed.manifest);
    const shown = { version: m.version, platform: m.platform, size: Number(m.size), digest: m.digest, createdAt: new Date(timestampMs(m.createdAt!)).toISOString(), keyId: signed.keyId, file: out };
    io.out(v.json ? JSON.stringify(shown) + "\n" : `release ${m.version} (${m.platform}, ${m.size} bytes, ${m.digest}) signed by ${signed.keyId}: ${out}\n`);
    return 0;
  }
  if (sub === "add") {
    const [file, ...extra] = args;
    if (!file || extra.length > 0) throw new InvalidArgumentError("rexmesh release add FILE [--release FILE.release]");
    const releaseFile = typeof v.release === "string" ? v.release : `${file}.release`;
    requireRegularFile(releaseFile, "the signed release (rexmesh release sign)");
    let signed;
    try {
      signed = fromBinary(SignedReleaseSchema, readFileSync(releaseFile));
    } catch {
      throw new InvalidArgumentError(`${releaseFile} is not a signed release (rexmesh release sign writes one)`);
    }
    await putArtifactFile(v, file, io.signal);
    const { client, close } = operatorClient(v);
    try {
      const r = await client.addRelease({ release: signed }, { signal: io.signal });
      const rel = r.release!;
      io.out(v.json ? JSON.stringify({ ...releaseJson(rel), created: r.created }) + "\n" : `release ${rel.version} (${rel.platform}, ${rel.size} bytes, ${rel.digest}, key ${rel.keyId}) ${r.created ? "added" : "was there already"}\n`);
      return 0;
    } finally {
      close();
    }
  }
  if (sub === "list") {
    if (args.length > 0) throw new InvalidArgumentError("rexmesh release list");
    const { client, close } = operatorClient(v);
    try {
      const { releases } = await client.listReleases({}, { signal: io.signal });
      if (v.json) io.out(releases.map((r) => JSON.stringify(releaseJson(r)) + "\n").join(""));
      else io.out(table([["VERSION", "PLATFORM", "SIZE", "DIGEST", "KEY", "ADDED", "BY"], ...releases.map((r) => [r.version, r.platform, String(r.size), r.digest, r.keyId, r.addedAt ? new Date(timestampMs(r.addedAt)).toISOString() : "", r.addedBy])]));
      return 0;
    } finally {
      close();
    }
  }
  if (sub === "remove") {
    const [version, ...extra] = args;
    if (!version || extra.length > 0) throw new InvalidArgumentError("rexmesh release remove VERSION [--platform P]");
    const { client, close } = operatorClient(v);
    try {
      const r = await client.removeRelease({ version, platform: typeof v.platform === "string" ? v.platform : "" }, { signal: io.signal });
      if (r.removed === 0) throw new NotFoundError(`no release ${version}${typeof v.platform === "string" ? ` for ${v.platform}` : ""}`);
      io.out(v.json ? JSON.stringify({ removed: r.removed }) + "\n" : `removed ${r.removed} release(s) of ${version}\n`);
      return 0;
    } finally {
      close();
    }
  }
  throw new InvalidArgumentError(`unknown release command ${JSON.stringify(sub ?? "")} (keygen, sign, add, list, remove)`);
}

function releaseJson(r: Release) {
  return { version: r.version, platform: r.platform, size: Number(r.size), digest: r.digest, keyId: r.keyId, addedBy: r.addedBy, addedAt: r.addedAt ? new Date(timestampMs(r.addedAt)).toISOString() : undefined };
}
