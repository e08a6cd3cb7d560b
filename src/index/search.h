/* Searching a store by text: the query embedded with the model's query prompt on the latency
 * lane, then an exact scan of the store's vectors (dense), SQLite FTS5's BM25 (bm25), or both
 * fused by reciprocal rank (hybrid); or by a vector the caller brings (dense only). The store's
 * vectors are loaded once per searcher, so many queries share them, and loaded again when the
 * store has changed since (its generation moved). Filters (store_filter) restrict every mode to
 * some documents: the chunks they allow become the dense scan's bitmap, and BM25 joins them. */
#ifndef EMBEDRAG_INDEX_SEARCH_H
#define EMBEDRAG_INDEX_SEARCH_H

#include "embedrag.h"
#include "store/store.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum search_mode { SEARCH_DENSE, SEARCH_BM25, SEARCH_HYBRID } search_mode;

typedef struct searcher searcher;

/* One result: the chunk and its score (cosine for dense, BM25 for bm25, the fused reciprocal
 * rank score for hybrid). */
typedef struct search_hit {
    int64_t chunk_id;
    double score;
} search_hit;

/* Prepares searches of store `s` with `model` (which must be the store's: its name and dimension
 * are checked; NULL allows only searches by vector). Loads the vectors and a thread pool for the
 * scan (threads: 0 = every core). */
int searcher_open(store *s, embedrag_model *model, int threads, searcher **out);
void searcher_close(searcher *sr);

/* Loads the vectors (and codes) again when the store has changed since they were loaded; every
 * search does this first. */
int searcher_refresh(searcher *sr);

/* The top k chunks for `query` among those `filter` allows (NULL: all); *found is how many were
 * written to hits (room for k). */
int searcher_search(searcher *sr, const char *query, search_mode mode, int k,
                    const store_filter *filter, search_hit *hits, int *found);

/* The top k chunks by inner product with `vector` (the store's dimension, as the model's
 * vectors are: L2-normalized for cosine). */
int searcher_search_vector(searcher *sr, const float *vector, int k, const store_filter *filter,
                           search_hit *hits, int *found);

/* Chunks the dense scan holds. */
size_t searcher_vectors(const searcher *sr);

/* Dense search over SEARCH_QUANT_MIN_ROWS vectors or more is quantized by default: 1-bit codes
 * (and int8 codes where the bits rank the vectors poorly) pick a shortlist sized at build to
 * keep recall@10 at 0.99 or more, and the shortlist is scored exactly, so every score returned
 * is the exact cosine (store/quant.h; 1.9 ms instead of 50 for a million clustered vectors on
 * two Zen 4 cores, recall@10 1.000). Below that size the exact scan takes a few milliseconds
 * and is used. searcher_set_exact(sr, true) scans every vector whatever the size;
 * searcher_quantized says whether the next dense search will use codes. The codes are kept in
 * the store's cache file "<store>-codes" for the next open. */
#define SEARCH_QUANT_MIN_ROWS 50000
#define SEARCH_CODES_CACHE "codes"
void searcher_set_exact(searcher *sr, bool exact);
bool searcher_quantized(const searcher *sr);

/* The reciprocal rank fusion constant (Cormack et al.: 60), and how deep each ranking is read
 * before fusing. */
#define SEARCH_RRF_K 60
#define SEARCH_FUSION_DEPTH 100

#endif
