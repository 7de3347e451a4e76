// Throwaway PKI for the link-transport benchmark.
//
// The CA, the server certificate (SAN IP:127.0.0.1, DNS:localhost) and one
// client certificate are made with the openssl CLI in a temp dir.
// The thousands of per-daemon client identities needed by the idle-stream
// test are minted in-process (DER built by hand, signed by the openssl-made CA
// key with node:crypto), because one openssl process per identity would take
// minutes for K = 5,000. One sample identity is checked with `openssl verify`.
import { execFileSync } from "node:child_process";
import { createPrivateKey, createPublicKey, generateKeyPairSync, randomBytes, sign, X509Certificate } from "node:crypto";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

function openssl(args, cwd) {
  return execFileSync("openssl", args, { cwd, stdio: ["ignore", "pipe", "pipe"] }).toString();
}

function genKeyArgs(keyType, out) {
  return keyType === "rsa"
    ? ["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", out]
    : ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", out];
}

/**
 * Creates ca.key/ca.pem, server.key/server.pem, client.key/client.pem in a new
 * temp dir with the openssl CLI. keyType: "ec" (P-256) or "rsa" (2048).
 */
export function makePki(keyType) {
  const dir = mkdtempSync(join(tmpdir(), `rexmesh-link-bench-${keyType}-`));
  openssl(genKeyArgs(keyType, "ca.key"), dir);
  openssl(["req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", "2", "-subj", "/CN=rexmesh bench CA",
    "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    "-out", "ca.pem"], dir);
  const leaf = (name, subj, ext) => {
    writeFileSync(join(dir, `${name}.ext`), ext);
    openssl(genKeyArgs(keyType, `${name}.key`), dir);
    openssl(["req", "-new", "-key", `${name}.key`, "-subj", subj, "-out", `${name}.csr`], dir);
    openssl(["x509", "-req", "-in", `${name}.csr`, "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial",
      "0x" + randomBytes(8).toString("hex"), "-days", "2", "-sha256", "-extfile", `${name}.ext`, "-out", `${name}.pem`], dir);
  };
  leaf("server", "/CN=proxy-bench",
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n");
  leaf("client", "/CN=host-client",
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\nsubjectAltName=DNS:host-client\n");
  // Self-check: mint one identity in-process and verify it with openssl.
  const minter = new IdentityMinter(dir, keyType);
  const sample = minter.mint("host-selftest");
  writeFileSync(join(dir, "sample.pem"), sample.cert);
  const verify = openssl(["verify", "-CAfile", "ca.pem", "-purpose", "sslclient", "sample.pem"], dir);
  if (!/sample\.pem: OK/.test(verify)) throw new Error("minted identity does not verify: " + verify);
  return { dir, keyType };
}

export function loadPki(dir) {
  const r = (f) => readFileSync(join(dir, f));
  return {
    ca: r("ca.pem"),
    serverKey: r("server.key"), serverCert: r("server.pem"),
    clientKey: r("client.key"), clientCert: r("client.pem"),
  };
}

// ---- minimal DER encoder ----
function der(tag, content) {
  const len = content.length;
  let hdr;
  if (len < 0x80) hdr = Buffer.from([tag, len]);
  else if (len < 0x100) hdr = Buffer.from([tag, 0x81, len]);
  else if (len < 0x10000) hdr = Buffer.from([tag, 0x82, len >> 8, len & 0xff]);
  else hdr = Buffer.from([tag, 0x83, len >> 16, (len >> 8) & 0xff, len & 0xff]);
  return Buffer.concat([hdr, content]);
}
const seq = (...c) => der(0x30, Buffer.concat(c));
const set = (...c) => der(0x31, Buffer.concat(c));
const ctx = (n, ...c) => der(0xa0 | n, Buffer.concat(c));
function oid(s) {
  const p = s.split(".").map(Number);
  const out = [40 * p[0] + p[1]];
  for (const v of p.slice(2)) {
    const b = [v & 0x7f];
    for (let x = v >>> 7; x > 0; x >>>= 7) b.unshift((x & 0x7f) | 0x80);
    out.push(...b);
  }
  return der(0x06, Buffer.from(out));
}
const utf8 = (s) => der(0x0c, Buffer.from(s, "utf8"));
const octets = (b) => der(0x04, b);
const bits = (b) => der(0x03, Buffer.concat([Buffer.from([0]), b]));
const bool = (v) => der(0x01, Buffer.from([v ? 0xff : 0]));
function utcTime(d) {
  const p = (n) => String(n).padStart(2, "0");
  const s = `${p(d.getUTCFullYear() % 100)}${p(d.getUTCMonth() + 1)}${p(d.getUTCDate())}${p(d.getUTCHours())}${p(d.getUTCMinutes())}${p(d.getUTCSeconds())}Z`;
  return der(0x17, Buffer.from(s));
}
function readTlv(buf, off) {
  let len = buf[off + 1];
  let hdr = 2;
  if (len & 0x80) {
    const n = len & 0x7f;
    len = 0;
    for (let i = 0; i < n; i++) len = len * 256 + buf[off + 2 + i];
    hdr = 2 + n;
  }
  return { tag: buf[off], start: off, contentStart: off + hdr, end: off + hdr + len };
}
function subjectDerOf(certDer) {
  const cert = readTlv(certDer, 0);
  const tbs = readTlv(certDer, cert.contentStart);
  let off = tbs.contentStart;
  const fields = [];
  while (off < tbs.end) { const t = readTlv(certDer, off); fields.push(t); off = t.end; }
  // [0] version, serial, sigAlg, issuer, validity, subject
  const subj = fields[0].tag === 0xa0 ? fields[5] : fields[4];
  return certDer.subarray(subj.start, subj.end);
}
const pem = (label, b) => `-----BEGIN ${label}-----\n${b.toString("base64").replace(/.{64}/g, "$&\n").replace(/\n?$/, "\n")}-----END ${label}-----\n`;

/**
 * Mints client identities (CN = SAN DNS = hostId, EKU clientAuth) signed by
 * the CA of a PKI dir. EC: a fresh P-256 key per identity. RSA: one shared
 * RSA-2048 key (client.key) for all identities, since generating thousands of
 * RSA keys would take minutes; the certificate (and so the identity) still
 * differs per daemon.
 */
export class IdentityMinter {
  constructor(dir, keyType) {
    this.keyType = keyType;
    this.caKey = createPrivateKey(readFileSync(join(dir, "ca.key")));
    this.issuer = subjectDerOf(new X509Certificate(readFileSync(join(dir, "ca.pem"))).raw);
    this.sigAlg = keyType === "rsa"
      ? seq(oid("1.2.840.113549.1.1.11"), Buffer.from([0x05, 0x00]))
      : seq(oid("1.2.840.10045.4.3.2"));
    if (keyType === "rsa") {
      const k = createPrivateKey(readFileSync(join(dir, "client.key")));
      this.sharedKeyPem = k.export({ type: "pkcs8", format: "pem" });
      this.sharedSpki = createPublicKey(k).export({ type: "spki", format: "der" });
    }
    const now = Date.now();
    this.validity = seq(utcTime(new Date(now - 3600_000)), utcTime(new Date(now + 2 * 86400_000)));
    this.exts = (hostId) => ctx(3, seq(
      seq(oid("2.5.29.19"), bool(true), octets(seq())),
      seq(oid("2.5.29.15"), bool(true), octets(bits(Buffer.from([0xa0])))), // digitalSignature, keyEncipherment
      seq(oid("2.5.29.37"), octets(seq(oid("1.3.6.1.5.5.7.3.2")))),
      seq(oid("2.5.29.17"), octets(seq(der(0x82, Buffer.from(hostId))))),
    ));
  }

  mint(hostId) {
    let keyPem, spki;
    if (this.keyType === "rsa") { keyPem = this.sharedKeyPem; spki = this.sharedSpki; }
    else {
      const kp = generateKeyPairSync("ec", { namedCurve: "P-256" });
      keyPem = kp.privateKey.export({ type: "pkcs8", format: "pem" });
      spki = kp.publicKey.export({ type: "spki", format: "der" });
    }
    const serial = randomBytes(12); serial[0] &= 0x7f; serial[0] |= 0x01;
    const tbs = seq(ctx(0, der(0x02, Buffer.from([2]))), der(0x02, serial), this.sigAlg, this.issuer, this.validity,
      seq(set(seq(oid("2.5.4.3"), utf8(hostId)))), spki, this.exts(hostId));
    const sig = sign("sha256", tbs, this.caKey);
    const cert = pem("CERTIFICATE", seq(tbs, this.sigAlg, bits(sig)));
    return { hostId, key: keyPem, cert };
  }
}
