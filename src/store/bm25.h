/* BM25 over a text index split into shards (files of their own, each an FTS5 index of some of
 * the chunks), scored as one index would score it.
 *
 * FTS5's bm25() takes its statistics (how many rows, their average length, how many rows hold
 * each phrase) from the table it runs on: over shards, a rare word would weigh more in the shard
 * that holds it than in one index, and rankings would change with the shard count. So the
 * statistics are gathered from every shard first (bm25_totals, and embedrag_bm25_hits on each
 * shard's match), added up, turned into the weights of the formula (bm25_weights), and each
 * shard scores its rows with them (embedrag_bm25). With FTS5's constants and order of
 * operations, a row's score is the same double as bm25()'s over one index of all the chunks
 * (negated: larger is better). */
#ifndef EMBEDRAG_STORE_BM25_H
#define EMBEDRAG_STORE_BM25_H

#include <sqlite3.h>
#include <stddef.h>
#include <stdint.h>

/* Registers on `db` (which holds FTS5 table "chunk_text") the auxiliary functions
 *   embedrag_bm25_hits(chunk_text): for the statement's query, the rows holding each of its
 *     phrases, a blob of int64 (one per phrase; call it on one matching row: LIMIT 1);
 *   embedrag_bm25(chunk_text, weights): the row's score, with `weights` a blob that
 *     bm25_weights made.
 * Returns a SQLite result code. */
int bm25_register(sqlite3 *db);

/* The rows an FTS5 table "chunk_text" on `db` holds and their tokens in all (its "averages"
 * record); zeros for an empty index. Returns a SQLite result code. */
int bm25_totals(sqlite3 *db, int64_t *rows, int64_t *tokens);

/* The weights blob for embedrag_bm25 (malloc'd, *bytes long; NULL when out of memory): from the
 * rows and tokens of all shards and, for each of `phrases` phrases, the rows of all shards that
 * hold it. */
void *bm25_weights(int64_t rows, int64_t tokens, const int64_t *hits, int phrases, size_t *bytes);

#endif
