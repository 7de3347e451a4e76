import type { TaskRecord } from "./model.js";

/**
 * Which output chunks a task's record counts as stored: the contiguous
 * prefix 1..outputChunks, and ranges above a gap (`outputBeyond`, sorted,
 * disjoint, never touching the prefix). Chunks arrive in any order after a
 * failover; these keep the count exact.
 */

/** The first seq at or above `from` that the record does not count as stored. */
export function firstMissing(task: TaskRecord, from: number): number {
  let next = Math.max(from, task.outputChunks + 1);
  for (const [lo, hi] of task.outputBeyond ?? []) {
    if (next < lo) break;
    if (next <= hi) next = hi + 1;
  }
  return next;
}

/** Whether the record counts chunk `seq` as stored. */
export function hasChunk(task: TaskRecord, seq: number): boolean {
  return firstMissing(task, seq) > seq;
}

/** The highest seq the record counts as stored, above any gap. */
export function lastHeld(task: TaskRecord): number {
  const beyond = task.outputBeyond;
  return beyond && beyond.length > 0 ? Math.max(task.outputChunks, beyond[beyond.length - 1]![1]) : task.outputChunks;
}

/**
 * Counts chunk `seq` as stored: it extends the contiguous prefix (merging
 * ranges it reaches) or joins the ranges above a gap. New range arrays, so
 * that a snapshot of the record taken for a write is never changed under it.
 */
export function addChunk(task: TaskRecord, seq: number): void {
  const ranges = (task.outputBeyond ?? []).map(([lo, hi]): [number, number] => [lo, hi]);
  if (seq === task.outputChunks + 1) {
    task.outputChunks = seq;
    while (ranges.length > 0 && ranges[0]![0] <= task.outputChunks + 1) task.outputChunks = Math.max(task.outputChunks, ranges.shift()![1]);
  } else {
    let i = 0;
    while (i < ranges.length && ranges[i]![1] < seq - 1) i++;
    if (i < ranges.length && ranges[i]![0] <= seq + 1) {
      const r = ranges[i]!;
      r[0] = Math.min(r[0], seq);
      r[1] = Math.max(r[1], seq);
      const next = ranges[i + 1];
      if (next && next[0] <= r[1] + 1) {
        r[1] = Math.max(r[1], next[1]);
        ranges.splice(i + 1, 1);
      }
    } else {
      ranges.splice(i, 0, [seq, seq]);
    }
  }
  setRanges(task, ranges);
}

/** Stops counting chunk `seq` (its write failed): the prefix ends below it, or its range splits around it. */
export function removeChunk(task: TaskRecord, seq: number): void {
  if (!hasChunk(task, seq)) return;
  const ranges: [number, number][] = [];
  if (seq <= task.outputChunks) {
    if (seq < task.outputChunks) ranges.push([seq + 1, task.outputChunks]);
    task.outputChunks = seq - 1;
  }
  for (const [lo, hi] of task.outputBeyond ?? []) {
    if (seq < lo || seq > hi) ranges.push([lo, hi]);
    else {
      if (lo < seq) ranges.push([lo, seq - 1]);
      if (seq < hi) ranges.push([seq + 1, hi]);
    }
  }
  setRanges(task, ranges.sort((a, b) => a[0] - b[0]));
}

function setRanges(task: TaskRecord, ranges: [number, number][]): void {
  if (ranges.length > 0) task.outputBeyond = ranges;
  else delete task.outputBeyond;
}
