import type { Database } from "lmdb";
import { NotFoundError } from "../common/errors.js";
import type { LmdbEnv } from "../common/lmdb.js";
import type { Clock } from "../common/clock.js";
import { compileDocument, parseDocumentRef, type CommandDocument } from "./documents.js";

/** One immutable version of a document, as stored per tenant. */
export interface StoredDocument {
  tenant: string;
  name: string;
  version: number;
  description: string;
  createdAt: number;
  createdBy: string;
  /** The validated document as JSON text. */
  content: string;
}

/** Where documents live: versions only ever get added, never changed. */
export interface DocumentBackend {
  /** The newest version of a document, or undefined. */
  latest(tenant: string, name: string): StoredDocument | undefined;
  get(tenant: string, name: string, version: number): StoredDocument | undefined;
  /** The newest version of every document of a tenant, by name. */
  list(tenant: string): StoredDocument[];
  put(doc: StoredDocument): Promise<void>;
}

/**
 * Documents by tenant and name with versions 1, 2, …. Puts are serialized
 * in this process, so two puts of one name never take the same version.
 */
export class DocumentStore {
  private chain: Promise<unknown> = Promise.resolve();

  constructor(private readonly backend: DocumentBackend, private readonly clock: Clock) {}

  /** Stores a validated document as its name's next version. */
  put(tenant: string, createdBy: string, doc: CommandDocument): Promise<StoredDocument> {
    const run = this.chain.then(async () => {
      const version = (this.backend.latest(tenant, doc.name)?.version ?? 0) + 1;
      const stored: StoredDocument = {
        tenant,
        name: doc.name,
        version,
        description: doc.description,
        createdAt: this.clock.now(),
        createdBy,
        content: JSON.stringify(doc.source),
      };
      await this.backend.put(stored);
      return stored;
    });
    this.chain = run.catch(() => undefined);
    return run;
  }

  /** "NAME" (newest) or "NAME@VERSION" within a tenant; other tenants' documents look missing. */
  get(tenant: string, ref: string): StoredDocument {
    const { name, version } = parseDocumentRef(ref);
    const doc = version === 0 ? this.backend.latest(tenant, name) : this.backend.get(tenant, name, version);
    if (!doc) throw new NotFoundError(`document ${JSON.stringify(ref)} not found`);
    return doc;
  }

  /** A stored document compiled for running. */
  load(tenant: string, ref: string): { stored: StoredDocument; doc: CommandDocument } {
    const stored = this.get(tenant, ref);
    return { stored, doc: compileDocument(JSON.parse(stored.content)) };
  }

  list(tenant: string): StoredDocument[] {
    return this.backend.list(tenant);
  }
}

/** Documents in an LMDB database keyed [tenant, name, version]. */
export class LmdbDocumentBackend implements DocumentBackend {
  private readonly db: Database<StoredDocument, (string | number)[]>;

  constructor(env: LmdbEnv) {
    this.db = env.db("documents");
  }

  latest(tenant: string, name: string): StoredDocument | undefined {
    for (const { value } of this.db.getRange({ start: [tenant, name, Number.MAX_SAFE_INTEGER], end: [tenant, name, 0], reverse: true, limit: 1 })) {
      if (value.tenant === tenant && value.name === name) return value;
    }
    return undefined;
  }

  get(tenant: string, name: string, version: number): StoredDocument | undefined {
    return this.db.get([tenant, name, version]);
  }

  list(tenant: string): StoredDocument[] {
    const newest = new Map<string, StoredDocument>();
    for (const { value } of this.db.getRange({ start: [tenant] })) {
      if (value.tenant !== tenant) break;
      newest.set(value.name, value);
    }
    return [...newest.values()];
  }

  put(doc: StoredDocument): Promise<void> {
    return this.db.put([doc.tenant, doc.name, doc.version], doc).then(() => undefined);
  }
}

/** Documents in memory, for logic tests. */
export class MemoryDocumentBackend implements DocumentBackend {
  private readonly docs: StoredDocument[] = [];

  latest(tenant: string, name: string): StoredDocument | undefined {
    return this.docs.filter((d) => d.tenant === tenant && d.name === name).at(-1);
  }

  get(tenant: string, name: string, version: number): StoredDocument | undefined {
    return this.docs.find((d) => d.tenant === tenant && d.name === name && d.version === version);
  }

  list(tenant: string): StoredDocument[] {
    const newest = new Map<string, StoredDocument>();
    for (const d of this.docs) if (d.tenant === tenant) newest.set(d.name, d);
    return [...newest.values()].sort((a, b) => (a.name < b.name ? -1 : 1));
  }

  async put(doc: StoredDocument): Promise<void> {
    this.docs.push({ ...doc });
  }
}
