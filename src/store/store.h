/* The document store: one SQLite file holding documents and their chunks (text, byte offsets,
 * token counts, vectors) under the identity of the model that made the vectors, and beside it an
 * FTS5 index over chunk text for BM25 in a SQLite file of its own ("<store>-text", or split
 * into shards "<store>-text.K" by chunk id; derived from the chunks and rebuilt from them when
 * missing). SQLite is the source of truth; what a search
 * scans is loaded from it. The store never computes embeddings (the indexer hands it vectors) and
 * keeps SQL out of its callers: this header is the narrow interface a second store (PostgreSQL)
 * would implement. A store handle is used by one thread at a time. */
#ifndef EMBEDRAG_STORE_STORE_H
#define EMBEDRAG_STORE_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct store store;

/* Who made the vectors. A store remembers the identity it was created with and refuses a model
 * whose identity differs (EMBEDRAG_ERR_MODEL_MISMATCH, naming both). */
typedef struct store_model {
    const char *name;         /* the model's name ("all-MiniLM-L6-v2") */
    int dimension;            /* vector width */
    const char *pooling;      /* "mean", "cls", "max" */
    const char *prompt;       /* the passage prompt applied to chunks ("" for none) */
    const char *precision;    /* "fp32", "bf16", "fp16": what made the vectors */
    const char *weights_hash; /* a hash of the weights file, hex */
    const char *directory;    /* where the model was (search may open it again) */
} store_model;

/* Opens the store at `path`. To write (read_only false) it is created when absent; `model`
 * (required then) must match a store's recorded identity on every field but directory and
 * precision. read_only opens an existing store and ignores `model` (may be NULL). Errors name
 * the file: not a SQLite database, a SQLite database that is not an embedrag store, a newer
 * format, a read-only or missing location, another process writing it. On failure *out is NULL.
 * Close with store_close. */
int store_open(const char *path, const store_model *model, bool read_only, store **out);

/* Closes the store (NULL is a no-op). A transaction still open is rolled back. */
void store_close(store *s);

/* The identity recorded in the store; valid until store_close. */
const store_model *store_get_model(const store *s);

/* One document as the indexer knows it. `key` identifies it across runs (its path, or its JSONL
 * id); content_hash is of its bytes, so an unchanged document is recognized without model work. */
typedef struct store_document {
    const char *key;
    const char *source;   /* the file it came from */
    const char *title;    /* or NULL */
    const char *metadata; /* a JSON object as text, or NULL */
    uint64_t content_hash;
    int64_t size, mtime;
} store_document;

/* A chunk to store: text (the source bytes [start, end) of the document, not NUL-terminated),
 * its token count as embedded, and its vector (dimension floats). */
typedef struct store_chunk {
    const char *text;
    size_t length;
    int64_t start, end;
    int tokens;
    const float *vector;
} store_chunk;

/* Batches: everything between store_begin and store_commit is one transaction, so a process
 * killed at any point leaves the store as it was at the last commit. Without store_begin each
 * store_put_document is its own transaction. store_rollback undoes an open one. */
int store_begin(store *s);
int store_commit(store *s);
void store_rollback(store *s);

/* Whether a document with this key is stored, and its content hash (0 when not found). */
int store_find_document(store *s, const char *key, bool *found, uint64_t *content_hash);

/* A connection of its own for finding documents from another thread than the one writing with
 * the store's handle (the indexer looks documents up while its store thread writes). It sees
 * what is committed, not the writer's open batch. Open after the store, close before it. */
typedef struct store_lookup store_lookup;
int store_lookup_open(const store *s, store_lookup **out);
int store_lookup_find(store_lookup *l, const char *key, bool *found, uint64_t *content_hash);
void store_lookup_close(store_lookup *l);

/* Adds the document with its chunks, replacing every earlier chunk of the same key. */
int store_put_document(store *s, const store_document *document, const store_chunk *chunks,
                       size_t count);

/* From now on the handle remembers the chunks it adds (ids and vectors, up to max_bytes) and
 * deletes, so that the next store_load_vectors makes the new search copy from the current one
 * and these, instead of reading every vector out of SQLite (2.3 s for 244,800 chunks). A no-op
 * unless the handle writes and the search copy is current (or the store empty); past max_bytes,
 * or where it cannot be exact, the load reads SQLite as before. */
int store_track_vectors(store *s, size_t max_bytes);

/* Brings the BM25 text index ("<store>-text", a file of its own, or one per shard: see the text
 * index section of store.c) up to date with what the store holds, in one transaction a file.
 * Outside a transaction; a no-op then, and for a writer when it changed nothing since. Writers call
 * it when they finish an add (the indexer) or when many chunks wait (store_commit), store_close
 * before it closes, and store_bm25 before it searches (a reader too, where it may write the file).
 */
int store_index_text(store *s);

/* A second connection to shard `shard` (0 .. store_text_shards - 1) of the text index, for a
 * thread of the caller's that keeps it up to date (store_text_update) while this handle stores:
 * from then on store_commit leaves that work to the threads, until store_text_close. Writers of a
 * current store only (*out stays NULL otherwise, which the other two take as a no-op). The thread
 * is the handle's only user; the store handle may be used meanwhile from another thread. */
typedef struct store_text store_text;
#define STORE_TEXT_SHARDS_MAX 8 /* the most files a text index is split into */
int store_text_shards(const store *s);
/* The shards a new store's text index gets on a machine with `cores` online cores (1 to 3) where
 * EMBEDRAG_TEXT_SHARDS does not say. */
int store_text_shards_for(int cores);
int store_text_open(store *s, int shard, store_text **out);
int store_text_update(store_text *t);
void store_text_close(store_text *t);

/* A connection of its own that copies the write-ahead log into the store file, for a thread of
 * the caller's (store_checkpoint, each time a transaction was committed) while this handle
 * stores: from store_checkpointer_open on, the handle's commits leave that copy to it (SQLite's
 * automatic checkpoint, which otherwise runs inside the committing call, is off until
 * store_checkpointer_close). Writers only (*out stays NULL otherwise, which the other two take as
 * a no-op). Open and close while no other thread uses the store handle. */
typedef struct store_checkpointer store_checkpointer;
int store_checkpointer_open(store *s, store_checkpointer **out);
int store_checkpoint(store_checkpointer *c);
void store_checkpointer_close(store_checkpointer *c);

/* Deletes a document and its chunks; *found says whether it was there. */
int store_delete_document(store *s, const char *key, bool *found);

/* Calls fn(ctx, key, source) for every stored document, in key order; fn returns nonzero to stop
 * (that value is returned). For pruning: the indexer collects keys whose files are gone. */
int store_each_document(store *s, int (*fn)(void *ctx, const char *key, const char *source),
                        void *ctx);

/* Every vector as one contiguous row-major matrix (count x dimension floats, 2 MB-aligned on
 * huge pages) with each row's chunk id in ascending order, for scanning; all of one snapshot of
 * the store. Read from the search copy ("<store>-vectors") when that is current, which is fast
 * (a million 384-wide vectors are one 1.5 GB read); otherwise from the database, after which the
 * search copy is written again where the folder allows (a stale or damaged copy is never used).
 * *generation is that snapshot's store_generation (may be NULL). The caller frees both with
 * free(). */
int store_load_vectors(store *s, float **matrix, int64_t **chunk_ids, size_t *count,
                       uint64_t *generation);

/* Cache files beside the store ("<store>-NAME"): bytes derived from its vectors at one
 * generation (a search's quantized codes), so that they are built once per change, not once per
 * open. store_cache_read gives a malloc'd copy when the file is of `generation` (0 never is),
 * else *data NULL (not an error); store_cache_write replaces the file whole (by rename), and
 * says whether it could (a read-only folder or a full disk only costs the next open the
 * rebuild). */
int store_cache_read(store *s, const char *name, uint64_t generation, void **data, size_t *bytes);
bool store_cache_write(store *s, const char *name, uint64_t generation, const void *data,
                       size_t bytes);

/* A number that changes with every committed change of the chunks (0 for a store of format 1,
 * which has none): a searcher reloads its vectors when it differs from the one it loaded. */
int store_generation(store *s, uint64_t *generation);

/* Whether the search copy is of the store's current contents. */
int store_search_copy_current(store *s, bool *current);

/* Which documents a search may return; every condition must hold. A zeroed filter (or NULL where
 * a filter is taken) allows everything. */
typedef struct store_filter {
    /* The document's source (a file's absolute path, or "FILE.jsonl:LINE") matches this glob:
     * `*` any run of characters ('/' included), `?` one, `[...]` a set; case-sensitive. */
    const char *source_glob;
    /* Metadata fields (top-level names of the document's JSON object) and the values they must
     * equal, `count` pairs: a string field's text ("en"), or another field's JSON text ("3",
     * "true"). A document without the field does not match. */
    const char *const *keys;
    const char *const *values;
    int count;
} store_filter;

/* Whether a filter has any condition. */
bool store_filter_active(const store_filter *filter);

/* Calls fn(ctx, chunk_id) for every chunk whose document passes `filter`, in ascending chunk id
 * order; fn returns nonzero to stop (that value is returned). EMBEDRAG_ERR_INVALID_ARGUMENT
 * for a metadata key holding '"'. */
int store_filter_chunks(store *s, const store_filter *filter,
                        int (*fn)(void *ctx, int64_t chunk_id), void *ctx);

/* BM25 over chunk text (SQLite FTS5): up to k chunk ids, best first, with scores where larger is
 * better. The query's words are searched as plain terms (any of them), never as FTS5 syntax, so
 * user text cannot fail to parse. Only chunks of documents that pass `filter` (NULL: all) are
 * returned. *found is how many were written. */
int store_bm25(store *s, const char *query, const store_filter *filter, int k, int64_t *chunk_ids,
               double *scores, int *found);

/* A stored chunk with where it came from. Strings stay valid until the next call on the store. */
typedef struct store_chunk_info {
    const char *document_key, *source, *title, *metadata, *text;
    int64_t start, end;
    int ordinal, tokens;
} store_chunk_info;
int store_get_chunk(store *s, int64_t chunk_id, store_chunk_info *out);

/* Calls fn(ctx, chunk) for each chunk of the document with this key, in order (the chunk's
 * document fields are the document's); *found says whether the document is stored. A document
 * without chunks (an empty text) is found and calls fn once with text NULL and ordinal -1, so
 * that its fields can be read. fn returns nonzero to stop (that value is returned). */
int store_document_chunks(store *s, const char *key, bool *found,
                          int (*fn)(void *ctx, const store_chunk_info *chunk), void *ctx);

typedef struct store_stats {
    int64_t documents, chunks, tokens;
    int64_t file_bytes;        /* the database file and its write-ahead log on disk */
    int64_t text_index_bytes;  /* the text index's files ("<store>-text*") and their logs */
    int64_t search_copy_bytes; /* the search copy on disk (0 when there is none) */
    bool search_copy_current;  /* whether it is of the current contents */
} store_stats;
int store_get_stats(store *s, store_stats *out);

#endif
