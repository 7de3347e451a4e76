import type { Database } from "lmdb";
import type { LmdbEnv } from "../common/lmdb.js";
import type { JobRecord, TaskRecord } from "./model.js";
import { placeOfTaskId } from "./task-ids.js";

/** Tasks per page of a job's column: a single task's read decodes one page. */
export const COLUMN_PAGE = 256;

/** A task's record without what its id and its page already say. */
type Entry = Omit<TaskRecord, "id" | "jobId" | "tenant">;
interface Page {
  tenant: string;
  tasks: Entry[];
}
/** What changed in one commit: [index in the job, the task's whole entry]. */
type Delta = [number, Entry][];

interface Pending {
  entries: Map<number, Entry>;
  /** Output chunks to store in the same commit as the entries that count them. */
  chunks: (() => Promise<unknown>)[];
  done: Promise<void>;
  settle: (err?: unknown) => void;
}

const PAGE_CACHE = 64;
const OVERLAY_CACHE = 16;
const COLUMNAR_CACHE = 4096;

/**
 * The tasks of jobs whose task ids name their place ({@link placeOfTaskId}),
 * kept as one column per job instead of a record per task.
 *
 * - At submit the job's tasks are written as pages of {@link COLUMN_PAGE}
 *   entries, `[jobId, page]`, in the job's commit: O(tasks / 256) puts.
 * - Every later change is queued and, once per event-loop turn, written as
 *   one delta per job, `[jobId, seq]` → the changed tasks' whole entries:
 *   one put per job and commit, whatever the number of tasks. An output
 *   chunk goes in the same commit as the delta that counts it. A write's
 *   promise resolves when that commit is durable.
 * - A task reads as its page's entry overlaid by the last committed delta
 *   that names it. When the job is stored finished, its committed deltas are
 *   folded into its pages (the pages rewritten, the deltas removed, in the
 *   job's commit); deltas written after (a late report) apply on top.
 *
 * A controller killed at any point recovers each task to its last
 * committed state: pages and deltas are each written whole in one commit,
 * deltas apply in seq order, and a fold only moves into the pages deltas
 * it read as committed.
 */
export class LmdbTaskColumns {
  private readonly pages: Database<Page, [string, number]>;
  private readonly deltas: Database<Delta, [string, number]>;
  /** Jobs known to be stored as columns (true) or not (false); bounded. */
  private readonly columnar = new Map<string, boolean>();
  /**
   * The next delta seq of a job with deltas in flight, and how many; with
   * none in flight the next seq follows the last committed delta's.
   */
  private readonly nextSeq = new Map<string, { seq: number; inFlight: number }>();
  private readonly pending = new Map<string, Pending>();
  private flushScheduled = false;
  /** Decoded committed pages, `${jobId}\0${page}`; dropped when a fold of their job commits. */
  private readonly pageCache = new Map<string, Page>();
  /** Per job: the last committed entry of each task named by a delta; dropped when a delta or fold of the job commits. */
  private readonly overlays = new Map<string, Map<number, Entry>>();

  constructor(env: LmdbEnv) {
    this.pages = env.db("task-pages");
    this.deltas = env.db("task-deltas");
  }

  /**
   * Whether a job's tasks can be kept as its column: each task's id names
   * the job and the task's place, and the job lists them all in order.
   */
  fits(job: JobRecord, tasks: readonly TaskRecord[]): boolean {
    if (tasks.length === 0 || tasks.length !== job.taskIds.length) return false;
    for (let i = 0; i < tasks.length; i++) {
      const t = tasks[i]!;
      if (t.jobId !== job.id || t.tenant !== job.tenant || job.taskIds[i] !== t.id) return false;
      const place = placeOfTaskId(t.id);
      if (place?.jobId !== job.id || place.index !== i) return false;
    }
    return true;
  }

  /** The job's pages, to be written in its commit (see {@link fits}). */
  putTasks(job: JobRecord, tasks: readonly TaskRecord[]): Promise<unknown>[] {
    const writes: Promise<unknown>[] = [];
    for (let p = 0; p * COLUMN_PAGE < tasks.length; p++) {
      const entries = tasks.slice(p * COLUMN_PAGE, (p + 1) * COLUMN_PAGE).map(entryOf);
      writes.push(this.pages.put([job.id, p], { tenant: job.tenant, tasks: entries }));
    }
    this.remember(job.id, true);
    return writes;
  }

  /** Whether the task lives in a column (its later writes go through {@link write}). */
  holds(taskId: string): boolean {
    const place = placeOfTaskId(taskId);
    return place !== undefined && this.isColumnar(place.jobId);
  }

  /**
   * Queues a task's new record (and an output chunk counted by it) for the
   * next delta of its job; resolves once that delta is durable.
   */
  write(task: TaskRecord, chunk?: () => Promise<unknown>): Promise<void> {
    const place = placeOfTaskId(task.id)!;
    let p = this.pending.get(place.jobId);
    if (!p) {
      let settle!: (err?: unknown) => void;
      const done = new Promise<void>((resolve, reject) => (settle = (err) => (err === undefined ? resolve() : reject(err))));
      p = { entries: new Map(), chunks: [], done, settle };
      this.pending.set(place.jobId, p);
    }
    p.entries.set(place.index, entryOf(task));
    if (chunk) p.chunks.push(chunk);
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      setImmediate(() => this.flush());
    }
    return p.done;
  }

  private flush(): void {
    this.flushScheduled = false;
    const jobs = [...this.pending];
    this.pending.clear();
    for (const [jobId, p] of jobs) {
      const seq = this.takeSeq(jobId);
      const writes: Promise<unknown>[] = [this.deltas.put([jobId, seq], [...p.entries])];
      for (const chunk of p.chunks) writes.push(chunk());
      Promise.all(writes).then(
        () => {
          this.landed(jobId);
          p.settle();
        },
        (err: unknown) => {
          this.landed(jobId);
          p.settle(err ?? new Error("storing a task delta failed"));
        },
      );
    }
  }

  private takeSeq(jobId: string): number {
    let next = this.nextSeq.get(jobId);
    if (!next) {
      let seq = 0;
      for (const key of this.deltas.getKeys({ start: [jobId, Number.MAX_SAFE_INTEGER], end: [jobId, -1], reverse: true, limit: 1 })) seq = (key[1] as number) + 1;
      this.nextSeq.set(jobId, (next = { seq, inFlight: 0 }));
    }
    next.inFlight++;
    return next.seq++;
  }

  /** A delta of the job committed or failed: readers see it (or not) from now on. */
  private landed(jobId: string): void {
    this.overlays.delete(jobId);
    const next = this.nextSeq.get(jobId);
    if (next && --next.inFlight === 0) this.nextSeq.delete(jobId);
  }

  /**
   * The writes that fold a finished job's committed deltas into its pages,
   * to go in the job's commit. Deltas still in flight keep applying on top.
   */
  fold(jobId: string): Promise<unknown>[] {
    if (!this.isColumnar(jobId)) return [];
    const seqs: number[] = [];
    const overlay = new Map<number, Entry>();
    for (const { key, value } of this.deltas.getRange({ start: [jobId, 0], end: [jobId, Number.MAX_SAFE_INTEGER] })) {
      seqs.push(key[1] as number);
      for (const [i, e] of value) overlay.set(i, e);
    }
    if (seqs.length === 0) return [];
    const changed = new Map<number, Page>();
    for (const [i, e] of overlay) {
      const p = Math.floor(i / COLUMN_PAGE);
      let page = changed.get(p);
      if (!page) {
        const stored = this.pages.get([jobId, p]);
        if (!stored) continue;
        changed.set(p, (page = { tenant: stored.tenant, tasks: [...stored.tasks] }));
      }
      page.tasks[i % COLUMN_PAGE] = e;
    }
    const writes: Promise<unknown>[] = [];
    for (const [p, page] of changed) writes.push(this.pages.put([jobId, p], page));
    for (const seq of seqs) writes.push(this.deltas.remove([jobId, seq]));
    const all = Promise.all(writes);
    const forget = () => {
      for (const p of changed.keys()) this.pageCache.delete(`${jobId}\0${p}`);
      this.overlays.delete(jobId);
    };
    all.then(forget, forget);
    return [all];
  }

  /**
   * A task of a column, as last committed; undefined when the id names no
   * place in a job stored as a column (the caller looks for a record).
   */
  get(taskId: string): TaskRecord | undefined {
    const place = placeOfTaskId(taskId);
    if (!place || !this.isColumnar(place.jobId)) return undefined;
    const page = this.page(place.jobId, Math.floor(place.index / COLUMN_PAGE));
    const entry = page?.tasks[place.index % COLUMN_PAGE];
    if (!page || !entry) return undefined;
    return recordOf(taskId, place.jobId, page.tenant, this.overlay(place.jobId).get(place.index) ?? entry);
  }

  /** Every task of a job stored as a column, in order, as last committed; undefined for any other job. */
  tasksOf(job: JobRecord): TaskRecord[] | undefined {
    if (!this.isColumnar(job.id)) return undefined;
    const overlay = this.overlay(job.id);
    const out: TaskRecord[] = [];
    for (const { key, value } of this.pages.getRange({ start: [job.id, 0], end: [job.id, Number.MAX_SAFE_INTEGER] })) {
      const base = (key[1] as number) * COLUMN_PAGE;
      value.tasks.forEach((e, k) => {
        const i = base + k;
        const id = job.taskIds[i];
        if (id !== undefined) out.push(recordOf(id, job.id, value.tenant, overlay.get(i) ?? e));
      });
    }
    return out;
  }

  private isColumnar(jobId: string): boolean {
    let known = this.columnar.get(jobId);
    if (known === undefined) this.remember(jobId, (known = this.pages.doesExist([jobId, 0])));
    return known;
  }

  private remember(jobId: string, columnar: boolean): void {
    if (this.columnar.size >= COLUMNAR_CACHE) this.columnar.delete(this.columnar.keys().next().value!);
    this.columnar.set(jobId, columnar);
  }

  private page(jobId: string, p: number): Page | undefined {
    const key = `${jobId}\0${p}`;
    const cached = this.pageCache.get(key);
    if (cached) return cached;
    const page = this.pages.get([jobId, p]);
    if (!page) return undefined;
    if (this.pageCache.size >= PAGE_CACHE) this.pageCache.delete(this.pageCache.keys().next().value!);
    this.pageCache.set(key, page);
    return page;
  }

  private overlay(jobId: string): Map<number, Entry> {
    const cached = this.overlays.get(jobId);
    if (cached) return cached;
    const overlay = new Map<number, Entry>();
    for (const { value } of this.deltas.getRange({ start: [jobId, 0], end: [jobId, Number.MAX_SAFE_INTEGER] })) for (const [i, e] of value) overlay.set(i, e);
    if (this.overlays.size >= OVERLAY_CACHE) this.overlays.delete(this.overlays.keys().next().value!);
    this.overlays.set(jobId, overlay);
    return overlay;
  }
}

function entryOf(task: TaskRecord): Entry {
  const { id: _id, jobId: _job, tenant: _tenant, ...entry } = task;
  return entry;
}

function recordOf(id: string, jobId: string, tenant: string, entry: Entry): TaskRecord {
  return { id, jobId, tenant, ...entry };
}
