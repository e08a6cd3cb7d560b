/* Indexing: walks folders of text and Markdown files and reads JSONL files of documents, skips
 * what the store already holds unchanged (same content hash), chunks the rest with the model's
 * tokenizer, embeds the chunks on the engine's bulk lane in batches and stores each batch of
 * documents in one transaction. The one place where the engine and the store meet. */
#ifndef EMBEDRAG_INDEX_INDEXER_H
#define EMBEDRAG_INDEX_INDEXER_H

#include "embedrag.h"
#include "store/store.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct index_options {
    const char *store_path;
    bool prune;         /* delete stored documents not seen in this run */
    int overlap_tokens; /* chunk overlap, <0: the chunker's default */
    bool progress;      /* a progress line on stderr (a terminal) */
} index_options;

typedef struct index_summary {
    long files, documents;   /* files read (JSONL counted once), documents seen */
    long indexed, unchanged; /* documents (re)embedded, documents skipped as unchanged */
    long skipped_files;      /* files of other kinds under the folders */
    long failed;             /* documents that could not be read or embedded */
    long deleted;            /* pruned */
    long chunks, tokens;     /* embedded in this run */
    long vectors_given;      /* JSONL documents that brought their own vector */
    double seconds, model_seconds;
    /* Where the time went, each stage timed on its own thread (with the pipeline they overlap,
     * and waiting is the calling thread's time spent for the slowest of the other two):
     * reading and looking documents up, chunking, embedding (model_seconds of it in the model),
     * storing batches, waiting, and at the end the text index, pruning, and the search copy. */
    double read_seconds, chunk_seconds, embed_seconds, store_seconds, wait_seconds;
    double text_seconds, prune_seconds, copy_seconds;
    double text_thread_seconds;     /* the text index's own thread, beside the others */
    double text_thread_cpu_seconds; /* its CPU time */
    long text_thread_failures;     /* its updates that failed (the last update made good on them) */
    char text_thread_failure[256]; /* the first one's message */
    double store_cpu_seconds;      /* the store thread's CPU time */
    char first_failure[512];       /* what went wrong first, "" when nothing did */
} index_summary;

/* Indexes `count` paths (folders, .txt/.md files, .jsonl files) into the store at
 * options->store_path with this model (created when absent). A document that fails
 * (unreadable, invalid UTF-8, a bad JSONL line) is counted and named in the summary, and the run
 * goes on; a store failure (disk full, another writer) ends the run with every earlier batch
 * kept. The model's directory is recorded in the store so that search can open it again. */
int index_paths(embedrag_model *model, const char *const *paths, size_t count,
                const index_options *options, index_summary *summary);

/* The model's identity as a store records it (its name, width, pooling, passage prompt, the
 * precision the CPU runs, a hash of its weights file into hash, its directory); the strings
 * stay valid while the model is open and `hash` lives. */
int index_model_identity(const embedrag_model *model, store_model *out, char hash[17]);

/* The steps of index_paths, for callers that bring documents themselves (the library API): an
 * indexer adds to an open store (whose model must be this one), queueing documents until a
 * batch is full; indexer_flush embeds and stores what is queued (one transaction);
 * indexer_finish flushes and prunes (options->prune: every stored document not added since
 * open); indexer_close drops what is still queued. Bringing the search copy and codes up to
 * date is the caller's (a searcher's load does it). `options`
 * (store_path unused) and `summary` must outlive the indexer; the summary accumulates. */
typedef struct indexer indexer;
int indexer_open(embedrag_model *model, store *s, const index_options *options,
                 index_summary *summary, indexer **out);
int indexer_add_path(indexer *ix, const char *path);

/* Walks the paths without reading them, so that the progress line can show the files and the
 * share of bytes done and estimate the time left (options->progress only). */
void indexer_expect_paths(indexer *ix, const char *const *paths, size_t count);

/* One document from memory; the indexer copies what it keeps. */
typedef struct index_document {
    const char *key, *text;                /* required */
    size_t length;                         /* bytes of text */
    const char *title, *metadata, *source; /* or NULL (source: the key) */
    const float *vector; /* the store's dimension: stored as the one chunk, without model work */
} index_document;

/* Queues the document (or skips it when stored unchanged). *status (may be NULL) becomes 0, or
 * the reason it failed (invalid UTF-8 when it is chunked; an embedding failure at the flush
 * that embeds it), so it must stay valid until that flush. Returns nonzero only for failures
 * of the store or of memory, which end the run. */
int indexer_add_document(indexer *ix, const index_document *document, int *status);
int indexer_flush(indexer *ix);
int indexer_finish(indexer *ix);
void indexer_close(indexer *ix);
/* indexer_finish in two: the start flushes and prunes and leaves the text index's last update
 * running on its thread; the end (given the start's result) waits for it. Between the two the
 * caller may use the store handle (index_paths makes the search copy there). */
int indexer_finish_start(indexer *ix);
int indexer_finish_end(indexer *ix, int rc);

/* The text of the model's prompt `name` (or `alias`, NULL for none), "" when it has neither: the
 * passage prompt for indexing, the query prompt for search. Valid while the model is open. */
const char *index_model_prompt(const embedrag_model *model, const char *name, const char *alias);

/* FNV-1a, 64 bits: the content hash that tells unchanged documents. */
uint64_t index_hash(uint64_t hash, const void *data, size_t length);
#define INDEX_HASH_SEED 0xcbf29ce484222325ULL

#endif
