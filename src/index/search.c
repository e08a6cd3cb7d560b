/* Search by text (search.h): dense, BM25 and their reciprocal rank fusion. */
#include "index/search.h"

#include "index/indexer.h"

#include "store/scan.h"
#include "util/error.h"
#include "util/threadpool.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct searcher {
    store *store;
    embedrag_model *model;
    float *matrix;
    int64_t *chunk_ids;
    size_t count;
    int dim;
    threadpool *pool;
    const char *query_prompt; /* the model's query prompt ("" for none) */
    float *query;
    scan_hit *scan_hits;
    int64_t *bm25_ids;
    double *bm25_scores;
};

int searcher_open(store *s, embedrag_model *model, int threads, searcher **out)
{
    *out = NULL;
    embedrag_model_info info;
    embedrag_model_get_info(model, &info);
    const store_model *sm = store_get_model(s);
    if (strcmp(sm->name, info.name) != 0 || sm->dimension != info.dimension)
        return err_set(EMBEDRAG_ERR_MODEL_MISMATCH,
                       "the store was built with %s (%d dimensions); the model given is %s (%d)",
                       sm->name, sm->dimension, info.name, info.dimension);
    searcher *sr = calloc(1, sizeof *sr);
    if (!sr) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    sr->store = s;
    sr->model = model;
    sr->dim = info.dimension;
    sr->query_prompt = index_model_prompt(model, "query", NULL);
    int rc = store_load_vectors(s, &sr->matrix, &sr->chunk_ids, &sr->count);
    if (!rc) rc = threadpool_create(threads, &sr->pool);
    sr->query = malloc((size_t)sr->dim * sizeof *sr->query);
    if (!rc && !sr->query) rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    if (rc) {
        searcher_close(sr);
        return rc;
    }
    *out = sr;
    return 0;
}

void searcher_close(searcher *sr)
{
    if (!sr) return;
    threadpool_destroy(sr->pool);
    free(sr->matrix);
    free(sr->chunk_ids);
    free(sr->query);
    free(sr->scan_hits);
    free(sr->bm25_ids);
    free(sr->bm25_scores);
    free(sr);
}

size_t searcher_vectors(const searcher *sr)
{
    return sr->count;
}

static int dense(searcher *sr, const char *query, int k, search_hit *hits, int *found)
{
    embedrag_embed_params p = embedrag_embed_default_params();
    p.prompt = sr->query_prompt;
    p.lane = EMBEDRAG_LANE_LATENCY;
    int rc = embedrag_embed(sr->model, &query, NULL, 1, &p, sr->query);
    if (rc) return err_set(rc, "embedding the query: %s", embedrag_last_error());
    scan_hit *grown = realloc(sr->scan_hits, (size_t)(k > 0 ? k : 1) * sizeof *grown);
    if (!grown) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    sr->scan_hits = grown;
    scan_params sp = scan_default_params();
    sp.pool = sr->pool;
    size_t n = 0;
    rc = scan_topk(sr->matrix, sr->count, (size_t)sr->dim, sr->query, (size_t)k, &sp, sr->scan_hits,
                   &n);
    if (rc) return rc;
    for (size_t i = 0; i < n; i++)
        hits[i] = (search_hit){.chunk_id = sr->chunk_ids[sr->scan_hits[i].row],
                               .score = sr->scan_hits[i].score};
    *found = (int)n;
    return 0;
}

static int bm25(searcher *sr, const char *query, int k, search_hit *hits, int *found)
{
    int64_t *ids = realloc(sr->bm25_ids, (size_t)(k > 0 ? k : 1) * sizeof *ids);
    if (ids) sr->bm25_ids = ids;
    double *scores = realloc(sr->bm25_scores, (size_t)(k > 0 ? k : 1) * sizeof *scores);
    if (scores) sr->bm25_scores = scores;
    if (!ids || !scores) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    int rc = store_bm25(sr->store, query, k, sr->bm25_ids, sr->bm25_scores, found);
    for (int i = 0; !rc && i < *found; i++)
        hits[i] = (search_hit){.chunk_id = sr->bm25_ids[i], .score = sr->bm25_scores[i]};
    return rc;
}

static int by_score(const void *a, const void *b)
{
    const search_hit *x = a, *y = b;
    if (x->score != y->score) return x->score < y->score ? 1 : -1;
    return x->chunk_id < y->chunk_id ? -1 : x->chunk_id > y->chunk_id;
}

/* Reciprocal rank fusion: each chunk scores the sum over the two rankings of 1 / (60 + rank). */
static int hybrid(searcher *sr, const char *query, int k, search_hit *hits, int *found)
{
    int depth = k > SEARCH_FUSION_DEPTH ? k : SEARCH_FUSION_DEPTH;
    search_hit *lists = malloc(2 * (size_t)depth * sizeof *lists);
    search_hit *fused = malloc(2 * (size_t)depth * sizeof *fused);
    int counts[2] = {0, 0}, rc = 0, n = 0;
    if (!lists || !fused) rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    if (!rc) rc = dense(sr, query, depth, lists, &counts[0]);
    if (!rc) rc = bm25(sr, query, depth, lists + depth, &counts[1]);
    for (int l = 0; !rc && l < 2; l++)
        for (int r = 0; r < counts[l]; r++) {
            int64_t id = lists[l * depth + r].chunk_id;
            double add = 1.0 / (SEARCH_RRF_K + r + 1);
            int at = 0;
            while (at < n && fused[at].chunk_id != id) at++;
            if (at == n) fused[n++] = (search_hit){.chunk_id = id, .score = 0.0};
            fused[at].score += add;
        }
    if (!rc) {
        qsort(fused, (size_t)n, sizeof *fused, by_score);
        *found = n < k ? n : k;
        memcpy(hits, fused, (size_t)*found * sizeof *hits);
    }
    free(lists);
    free(fused);
    return rc;
}

int searcher_search(searcher *sr, const char *query, search_mode mode, int k, search_hit *hits,
                    int *found)
{
    *found = 0;
    if (!query || k < 1) return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "search: no query or k < 1");
    switch (mode) {
    case SEARCH_DENSE:
        return dense(sr, query, k, hits, found);
    case SEARCH_BM25:
        return bm25(sr, query, k, hits, found);
    case SEARCH_HYBRID:
        return hybrid(sr, query, k, hits, found);
    }
    return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "search: unknown mode %d", (int)mode);
}
