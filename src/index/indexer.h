/* Indexing: walks folders of text and Markdown files and reads JSONL files of documents, skips
 * what the store already holds unchanged (same content hash), chunks the rest with the model's
 * tokenizer, embeds the chunks on the engine's bulk lane in batches and stores each batch of
 * documents in one transaction. The one place where the engine and the store meet. */
#ifndef EMBEDRAG_INDEX_INDEXER_H
#define EMBEDRAG_INDEX_INDEXER_H

#include "embedrag.h"

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
    char first_failure[512]; /* what went wrong first, "" when nothing did */
} index_summary;

/* Indexes `count` paths (folders, .txt/.md files, .jsonl files) into the store with this model.
 * A document that fails (unreadable, invalid UTF-8, a bad JSONL line) is counted and named in
 * the summary, and the run goes on; a store failure (disk full, another writer) ends the run
 * with every earlier batch kept. `model_dir` is recorded in the store so that search can open
 * the model again. */
int index_paths(embedrag_model *model, const char *model_dir, const char *const *paths,
                size_t count, const index_options *options, index_summary *summary);

/* The text of the model's prompt `name` (or `alias`, NULL for none), "" when it has neither: the
 * passage prompt for indexing, the query prompt for search. Valid while the model is open. */
const char *index_model_prompt(const embedrag_model *model, const char *name, const char *alias);

/* FNV-1a, 64 bits: the content hash that tells unchanged documents. */
uint64_t index_hash(uint64_t hash, const void *data, size_t length);
#define INDEX_HASH_SEED 0xcbf29ce484222325ULL

#endif
