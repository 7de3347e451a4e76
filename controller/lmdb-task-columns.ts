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
/** What changed in one commit on one page: [index in the page, the task's whole entry]. */
type Delta = [number, Entry][];
/** A delta's key: the job, the page, then the start it was written in and its number in that start (so deltas read in the order they were written). */
type DeltaKey = [string, number, number, number];

interface Pending {
  /** Per page of the job: the entries changed this turn, by index in the page. */
  pages: Map<number, Map<number, Entry>>;
  /** Output chunks to store in the same commit as the entries that count them. */
  chunks: (() => Promise<unknown>)[];
  done: Promise<void>;
  settle: (err?: unknown) => void;
}

const PAGE_CACHE = 256;
const COLUMNAR_CACHE = 4096;

/**
 * The tasks of jobs whose task ids name their place ({@link placeOfTaskId}),
 * kept as one column per job instead of a record per task.
 *
 * - At submit the job's tasks are written as pages of {@link COLUMN_PAGE}
 *   entries, `[jobId, page]`, in the job's commit: O(tasks / 256) puts.
 * - Every later change is queued and, once per event-loop turn, written as
 *   one delta per page of the job that changed: `[jobId, page, start, n]`
 *   → the changed tasks' whole entries. A fleet-wide turn of 500 ends on a
 *   10,000-task job is 40 puts, not 500. An output chunk goes in the same
 *   commit as the delta that counts it. A write resolves once that commit
 *   is durable.
 * - A task reads as its page's entry overlaid by the page's deltas in the
 *   order they were written (`start` grows with every start of the store,
 *   `n` within one). Nothing is folded: a page's deltas are as many as the
 *   turns that changed it, and a read decodes one page and its deltas.
 *
 * A controller killed at any point recovers each task to its last
 * committed state: pages and deltas are each written whole in one commit,
 * and read back in the order they were written.
 */
export class LmdbTaskColumns {
  private readonly pages: Database<Page, [string, number]>;
  private readonly deltas: Database<Delta, DeltaKey>;
  /** Jobs known to be stored as columns (true) or not (false); bounded. */
  private readonly columnar = new Map<string, boolean>();
  /** This start's number (one more than the last start's), and the deltas written in it so far. */
  private readonly start: number;
  private written = 0;
  private readonly pending = new Map<string, Pending>();
  private flushScheduled = false;
  /** Committed pages with their deltas applied, `${jobId}\0${page}`; dropped when a delta of the page commits. */
  private readonly merged = new Map<string, Page>();

  constructor(env: LmdbEnv) {
    this.pages = env.db("task-pages");
    this.deltas = env.db("task-deltas");
    const meta = env.db<number>("task-columns");
    this.start = (meta.get("start") ?? 0) + 1;
    meta.putSync("start", this.start);
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

  /**
   * Queues a task's new record (and an output chunk counted by it) for the
   * next delta of its page; resolves once that delta is durable. Undefined
   * when the task is not in a column (its record is written as before).
   */
  write(task: TaskRecord, chunk?: () => Promise<unknown>): Promise<void> | undefined {
    const place = placeOfTaskId(task.id);
    if (!place || !this.isColumnar(place.jobId)) return undefined;
    let p = this.pending.get(place.jobId);
    if (!p) {
      let settle!: (err?: unknown) => void;
      const done = new Promise<void>((resolve, reject) => (settle = (err) => (err === undefined ? resolve() : reject(err))));
      p = { pages: new Map(), chunks: [], done, settle };
      this.pending.set(place.jobId, p);
    }
    const pageNo = Math.floor(place.index / COLUMN_PAGE);
    let page = p.pages.get(pageNo);
    if (!page) p.pages.set(pageNo, (page = new Map()));
    page.set(place.index % COLUMN_PAGE, entryOf(task));
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
      const writes: Promise<unknown>[] = [];
      for (const [pageNo, entries] of p.pages) writes.push(this.deltas.put([jobId, pageNo, this.start, this.written++], [...entries]));
      for (const chunk of p.chunks) writes.push(chunk());
      const landed = () => {
        for (const pageNo of p.pages.keys()) this.merged.delete(`${jobId}\0${pageNo}`);
      };
      Promise.all(writes).then(
        () => {
          landed();
          p.settle();
        },
        (err: unknown) => {
          landed();
          p.settle(err ?? new Error("storing a task delta failed"));
        },
      );
    }
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
    return page && entry && recordOf(taskId, place.jobId, page.tenant, entry);
  }

  /** Every task of a job stored as a column, in order, as last committed; undefined for any other job. */
  tasksOf(job: JobRecord): TaskRecord[] | undefined {
    if (!this.isColumnar(job.id)) return undefined;
    const out: TaskRecord[] = [];
    for (let p = 0; p * COLUMN_PAGE < job.taskIds.length; p++) {
      const page = this.page(job.id, p);
      if (!page) break;
      page.tasks.forEach((e, k) => {
        const id = job.taskIds[p * COLUMN_PAGE + k];
        if (id !== undefined) out.push(recordOf(id, job.id, page.tenant, e));
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

  /** A committed page with its committed deltas applied in order. */
  private page(jobId: string, p: number): Page | undefined {
    const key = `${jobId}\0${p}`;
    const cached = this.merged.get(key);
    if (cached) return cached;
    const stored = this.pages.get([jobId, p]);
    if (!stored) return undefined;
    const page: Page = { tenant: stored.tenant, tasks: stored.tasks };
    for (const { value } of this.deltas.getRange({ start: [jobId, p], end: [jobId, p + 1] })) for (const [k, e] of value) page.tasks[k] = e;
    if (this.merged.size >= PAGE_CACHE) this.merged.delete(this.merged.keys().next().value!);
    this.merged.set(key, page);
    return page;
  }
}

/**
 * A task's entry, copied to its leaves: a change is written a turn after it
 * is queued, and the live record's lists (holders, output ranges) may change
 * meanwhile; what is written must be the record as it was queued.
 */
function entryOf(task: TaskRecord): Entry {
  const entry: Record<string, unknown> = {};
  for (const key in task) if (key !== "id" && key !== "jobId" && key !== "tenant") entry[key] = copied((task as unknown as Record<string, unknown>)[key]);
  return entry as unknown as Entry;
}

/** A task read from a page: its own copy, so that changing it changes no page held in memory. */
function recordOf(id: string, jobId: string, tenant: string, entry: Entry): TaskRecord {
  const record: Record<string, unknown> = { id, jobId, tenant };
  for (const key in entry) record[key] = copied((entry as unknown as Record<string, unknown>)[key]);
  return record as unknown as TaskRecord;
}

function copied(value: unknown): unknown {
  if (typeof value !== "object" || value === null) return value;
  if (Array.isArray(value)) return value.map(copied);
  if (value instanceof Uint8Array) return value.slice();
  const out: Record<string, unknown> = {};
  for (const key in value) out[key] = copied((value as Record<string, unknown>)[key]);
  return out;
}
