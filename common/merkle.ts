import { createHash } from "node:crypto";
import { LIMITS } from "./limits.js";

/**
 * The hash tree one signature over a batch of tasks rests on (docs/fan-out.md).
 *
 * leaf = SHA-256(0x00 || salt || bytes), inner node = SHA-256(0x01 || left ||
 * right): the two prefixes keep a leaf from ever passing for an inner node,
 * and the salt (random, 16 bytes, known only to the leaf's own receiver)
 * keeps the sibling hashes a receiver sees from telling it anything about
 * the other leaves' bytes. A level
 * with an odd number of nodes lifts its last node to the next level as it
 * is (never paired with a copy of itself, which would let two different
 * batches share a root). So the path of a leaf is fixed by its index and
 * the number of leaves alone, and a proof of the wrong length is refused.
 */

/** The most tasks one batch signature may cover (a frame holds far fewer). */
export const MAX_BATCH_LEAVES = 2 ** LIMITS.batchProofHashes;

/** Bytes of a leaf's salt. */
export const SALT_BYTES = 16;

const LEAF = Buffer.from([0]);
const NODE = Buffer.from([1]);

export function leafHash(salt: Uint8Array, bytes: Uint8Array): Buffer {
  return createHash("sha256").update(LEAF).update(salt).update(bytes).digest();
}

function nodeHash(left: Uint8Array, right: Uint8Array): Buffer {
  return createHash("sha256").update(NODE).update(left).update(right).digest();
}

/** Every level of the tree over `leaves`, from the leaves up to the root (the last level, one node). */
export function buildTree(leaves: readonly Buffer[]): Buffer[][] {
  if (leaves.length === 0) throw new Error("a hash tree needs at least one leaf");
  const levels: Buffer[][] = [leaves.slice()];
  for (let level = levels[0]!; level.length > 1; ) {
    const up: Buffer[] = [];
    for (let i = 0; i + 1 < level.length; i += 2) up.push(nodeHash(level[i]!, level[i + 1]!));
    if (level.length % 2 === 1) up.push(level[level.length - 1]!);
    levels.push(up);
    level = up;
  }
  return levels;
}

export function rootOf(levels: readonly Buffer[][]): Buffer {
  return levels[levels.length - 1]![0]!;
}

/** The sibling hashes from leaf `index` up to the root. */
export function proofOf(levels: readonly Buffer[][], index: number): Buffer[] {
  const path: Buffer[] = [];
  for (let l = 0, i = index; l < levels.length - 1; l++, i >>= 1) {
    const level = levels[l]!;
    const sibling = i ^ 1;
    if (sibling < level.length) path.push(level[sibling]!);
  }
  return path;
}

/**
 * The root a leaf and its path lead to, or undefined when the proof cannot
 * be one of a tree of `leaves` leaves (index out of range, a path of the
 * wrong length, a sibling that is not a hash).
 */
export function rootFromProof(leaf: Buffer, index: number, leaves: number, path: readonly Uint8Array[]): Buffer | undefined {
  if (!Number.isInteger(index) || !Number.isInteger(leaves) || leaves < 1 || leaves > MAX_BATCH_LEAVES || index < 0 || index >= leaves) return undefined;
  if (path.length > LIMITS.batchProofHashes) return undefined;
  let node = leaf;
  let used = 0;
  for (let i = index, width = leaves; width > 1; i >>= 1, width = (width + 1) >> 1) {
    const sibling = i ^ 1;
    if (sibling >= width) continue; // the last node of an odd level is lifted as it is
    const hash = path[used++];
    if (hash === undefined || hash.length !== 32) return undefined;
    node = i % 2 === 0 ? nodeHash(node, hash) : nodeHash(hash, node);
  }
  return used === path.length ? node : undefined;
}
