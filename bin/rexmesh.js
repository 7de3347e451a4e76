#!/usr/bin/env node
// Entry point: the compiled CLI lives in dist/ (npm run build).

// grpc-js sets the TLS server name to the peer's IP address when dialled by
// IP, which makes Node print DEP0123 ("SNI is ignored for IP addresses").
// Nothing is wrong (certificates carry IP SANs), so only that warning is dropped.
const emitWarning = process.emitWarning;
process.emitWarning = function (warning, ...rest) {
  const code = typeof rest[0] === "object" && rest[0] !== null ? rest[0].code : rest[1];
  if (code === "DEP0123") return;
  return emitWarning.call(process, warning, ...rest);
};

import("../dist/cli/main.js").catch((err) => {
  if (err && err.code === "ERR_MODULE_NOT_FOUND" && String(err.message).includes("dist/cli/main.js")) {
    console.error("rexmesh: not built yet; run `npm run build` first");
    process.exit(1);
  }
  throw err;
});
