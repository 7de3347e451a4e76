/**
 * Length-prefixed fields under a purpose label: no two different messages
 * frame to the same bytes, and no label's bytes pass for another's. What a
 * host signs or MACs (common/host-signing.ts), and what key ids and MAC keys
 * are derived from (common/end-mac.ts), is framed this way.
 */
export function framed(label: string, ...fields: (string | Uint8Array | bigint | number)[]): Buffer {
  const parts: Buffer[] = [Buffer.from(`rexmesh ${label} v1\0`)];
  for (const f of fields) {
    const b = typeof f === "string" ? Buffer.from(f, "utf8") : typeof f === "number" || typeof f === "bigint" ? Buffer.from(BigInt.asIntN(64, BigInt(f)).toString()) : Buffer.from(f);
    const len = Buffer.alloc(4);
    len.writeUInt32BE(b.length);
    parts.push(len, b);
  }
  return Buffer.concat(parts);
}
