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

/* The reciprocal rank fusion constant (Cormack et al.: 60), and how deep each ranking is read
 * before fusing. */
#define SEARCH_RRF_K 60
#define SEARCH_FUSION_DEPTH 100

#endif
