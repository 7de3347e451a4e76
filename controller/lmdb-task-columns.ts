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

/**
 * One page's write in a turn: a delta at `key`, written over the page's
 * only delta (`key` is that delta's) or new; `removed`, deltas it holds
 * the whole of; with `foldBefore`, the page's deltas before it to be folded
 * into the page.
 */
interface PageWrite {
  key: DeltaKey;
  entries: Delta;
  removed?: DeltaKey[];
  foldBefore?: true;
}

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
/** Pages whose kept deltas are counted in memory; one evicted is counted again from the store. */
const KEPT_CACHE = 4096;

/**
 * A page keeps at most this many deltas, so a read applies at most this
 * many ({@link LmdbTaskColumns}: folds).
 */
export const MAX_PAGE_DELTAS = 16;
/** ... and at most this many entries in them (a delta holds up to a page's worth). */
export const MAX_PAGE_DELTA_ENTRIES = 2 * COLUMN_PAGE;

/** A page's changed tasks are held in memory, to be folded without reading a delta back, while they are at most this many. */
const FOLD_FROM_MEMORY = 32;

/** What a page keeps beyond its stored entries: its deltas and the entries in them, counted high when unsure. */
interface Kept {
  deltas: number;
  entries: number;
  /**
   * While the tasks they change are at most {@link FOLD_FROM_MEMORY}: the
   * deltas' keys, and the last entry of each task they change (what they
   * hold together). Undefined when more, or not known.
   */
  held?: { keys: DeltaKey[]; changed: Map<number, Entry> };
}

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
 *   `n` within one).
 * - Folds: a page keeps at most {@link MAX_PAGE_DELTAS} deltas holding at
 *   most {@link MAX_PAGE_DELTA_ENTRIES} entries, so a read, a recovery or
 *   a finished job's listing decodes a page and a bounded number of deltas
 *   however long the job ran. While the tasks a page's deltas change are
 *   few (at most {@link FOLD_FROM_MEMORY}: a few tasks streaming output),
 *   their last entries are held in memory, and a turn writes them all over
 *   the page's only delta when that is at most twice its own entries; else
 *   it appends, and at the bound writes them as one new delta that replaces
 *   the others (removed in the same commit), reading nothing back. Once more
 *   tasks changed, a turn at the bound appends its delta and has the ones
 *   before it folded into the page, in a transaction of their own that reads
 *   the page and them, writes the page and removes them. Appends stop one
 *   delta and half the entries short of the bound, so that the turn's delta
 *   written beside that fold keeps within it until the fold commits.
 *
 * A controller killed at any point recovers each task to its last
 * committed state: pages and deltas are each written whole in one commit, a
 * fold is one transaction (into the page) or part of the turn's commit (into
 * one delta), a fold never changes what a read finds, and everything is read
 * back in the order it was written. Deltas are only written as single
 * writes, never inside a transaction (lmdb-js runs a transaction after the
 * single writes queued with it, so a later turn's rewrite or removal of a
 * delta written in one could land before it).
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
  /** Per page written by this start, what it keeps (bounded; see {@link kept}). */
  private readonly keptCounts = new Map<string, Kept>();
  /** Per page, its turns' writes and folds queued and not yet settled. */
  private readonly inFlight = new Map<string, number>();
  private readonly root: LmdbEnv["root"];

  constructor(env: LmdbEnv) {
    this.root = env.root;
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
      for (const [pageNo, changed] of p.pages) {
        const { key, entries, removed, foldBefore } = this.pageWrite([jobId, pageNo, this.start, this.written++], [...changed]);
        count(this.inFlight, pageKeyOf(jobId, pageNo), +1);
        // A delta that replaces others is written before they are removed (one commit; were it ever split, the new
        // delta reads last and covers them).
        writes.push(this.deltas.put(key, entries));
        for (const k of removed ?? []) writes.push(this.deltas.remove(k));
        if (foldBefore) this.foldIntoPage(key);
      }
      for (const chunk of p.chunks) writes.push(chunk());
      const written = Promise.all(writes);
      const landed = () => {
        for (const pageNo of p.pages.keys()) {
          const pageKey = pageKeyOf(jobId, pageNo);
          this.merged.delete(pageKey);
          count(this.inFlight, pageKey, -1);
        }
      };
      written.then(
        () => {
          landed();
          p.settle();
        },
        (err: unknown) => {
          landed();
          // What the pages keep is no longer known: counted again from the store at their next write.
          for (const pageNo of p.pages.keys()) this.keptCounts.delete(pageKeyOf(jobId, pageNo));
          p.settle(err ?? new Error("storing a task delta failed"));
        },
      );
    }
  }

  /** How a page's changed entries are written this turn (see Folds above). */
  private pageWrite(key: DeltaKey, entries: Delta): PageWrite {
    const kept = this.kept(key[0], key[1]);
    const held = kept.held;
    if (held) {
      for (let k = 0; k < entries.length && held.changed.size <= FOLD_FROM_MEMORY; k++) held.changed.set(...entries[k]!);
      if (held.changed.size > FOLD_FROM_MEMORY) kept.held = undefined;
    }
    if (kept.held?.keys.length === 1 && kept.held.changed.size <= 2 * entries.length) {
      kept.entries = kept.held.changed.size;
      return { key: kept.held.keys[0]!, entries: [...kept.held.changed] };
    }
    if (kept.deltas + 1 < MAX_PAGE_DELTAS && kept.entries + entries.length <= MAX_PAGE_DELTA_ENTRIES - COLUMN_PAGE) {
      kept.deltas++;
      kept.entries += entries.length;
      kept.held?.keys.push(key);
      return { key, entries };
    }
    if (kept.held) {
      const removed = kept.held.keys;
      const union = [...kept.held.changed];
      kept.held.keys = [key];
      kept.deltas = 1;
      kept.entries = union.length;
      return { key, entries: union, removed };
    }
    kept.deltas = 1;
    kept.entries = entries.length;
    kept.held = entries.length <= FOLD_FROM_MEMORY ? { keys: [key], changed: new Map(entries) } : undefined;
    return { key, entries, foldBefore: true };
  }

  /**
   * What a page keeps, as the next write will find it: counted as written
   * by this start, or from the store plus what is in flight (counted twice
   * if it committed meanwhile: high, which only folds sooner; and its
   * changed tasks not known).
   */
  private kept(jobId: string, pageNo: number): Kept {
    const pageKey = pageKeyOf(jobId, pageNo);
    let kept = this.keptCounts.get(pageKey);
    if (kept) {
      this.keptCounts.delete(pageKey);
    } else {
      const inFlight = this.inFlight.get(pageKey) ?? 0;
      kept = { deltas: inFlight, entries: inFlight * COLUMN_PAGE, held: inFlight === 0 ? { keys: [], changed: new Map() } : undefined };
      for (const { key, value } of this.deltas.getRange({ start: [jobId, pageNo], end: [jobId, pageNo + 1] })) {
        kept.deltas++;
        kept.entries += value.length;
        kept.held?.keys.push(key);
        for (const [i, e] of value) kept.held?.changed.set(i, e);
      }
      if (kept.held && kept.held.changed.size > FOLD_FROM_MEMORY) kept.held = undefined;
      if (this.keptCounts.size >= KEPT_CACHE) this.keptCounts.delete(this.keptCounts.keys().next().value!);
    }
    this.keptCounts.set(pageKey, kept);
    return kept;
  }

  /**
   * Folds a page's deltas written before `key` into the page, in one
   * transaction: the page and those deltas read, the page written, the
   * deltas removed. lmdb-js runs it after the single writes queued with it,
   * so every delta before `key` is there; later ones may be too, and are
   * left to apply after. A read finds the same before and after. Should it
   * fail (a full store), the deltas stay, are counted again from the store
   * at the page's next write, and are folded then.
   */
  private foldIntoPage(key: DeltaKey): void {
    const [jobId, pageNo] = key;
    const pageKey = pageKeyOf(jobId, pageNo);
    count(this.inFlight, pageKey, +1);
    this.root
      .childTransaction(() => {
        const page = this.pages.get([jobId, pageNo]);
        // No page to fold into (pages are written at submit, before any change): the deltas stay.
        if (!page) return;
        for (const { key: k, value } of [...this.deltas.getRange({ start: [jobId, pageNo], end: key })]) {
          this.deltas.removeSync(k);
          for (const [i, e] of value) page.tasks[i] = e;
        }
        this.pages.putSync([jobId, pageNo], page);
      })
      .catch(() => this.keptCounts.delete(pageKey))
      .finally(() => count(this.inFlight, pageKey, -1));
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
    const key = pageKeyOf(jobId, p);
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

/** A page's key in the maps kept in memory. */
function pageKeyOf(jobId: string, pageNo: number): string {
  return `${jobId}\0${pageNo}`;
}

/** Adds `by` to a count kept in a map, dropping it at zero. */
function count(counts: Map<string, number>, key: string, by: number): void {
  const n = (counts.get(key) ?? 0) + by;
  if (n === 0) counts.delete(key);
  else counts.set(key, n);
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
