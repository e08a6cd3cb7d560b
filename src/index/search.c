/* Search by text (search.h): dense, BM25 and their reciprocal rank fusion. */
#include "index/search.h"

#include "index/indexer.h"

#include "store/quant.h"
#include "store/scan.h"
#include "util/error.h"
#include "util/threadpool.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct searcher {
    store *store;
    embedrag_model *model; /* NULL: searches by vector only */
    float *matrix;
    int64_t *chunk_ids; /* ascending */
    size_t count;
    uint64_t generation; /* the store's when the vectors were loaded */
    int dim;
    threadpool *pool;
    const char *query_prompt; /* the model's query prompt ("" for none) */
    float *query;
    scan_hit *scan_hits;
    int64_t *bm25_ids;
    double *bm25_scores;
    /* The quantized codes of the matrix (stores of SEARCH_QUANT_MIN_ROWS vectors and more), or
     * NULL: then dense search scans every vector. */
    quant_codes *codes;
    bool exact; /* scan every vector even where there are codes */
    /* The last filter's rows, kept while the same filter comes again (a batch of queries). */
    char *filter_key;
    uint8_t *allowed;
};

static void forget_filter(searcher *sr)
{
    free(sr->filter_key);
    free(sr->allowed);
    sr->filter_key = NULL;
    sr->allowed = NULL;
}

/* The codes of the loaded vectors: from the store's cache file when it is of this generation,
 * else built (a second or so for a million vectors) and cached for the next open. */
static int load_codes(searcher *sr)
{
    if (sr->count < SEARCH_QUANT_MIN_ROWS) return 0;
    void *data = NULL;
    size_t bytes = 0;
    int rc = store_cache_read(sr->store, SEARCH_CODES_CACHE, sr->generation, &data, &bytes);
    if (rc) return rc;
    if (data) {
        quant_codes_info info;
        if (quant_codes_load(data, bytes, &sr->codes) == 0) {
            quant_codes_get_info(sr->codes, &info);
            if (info.n != sr->count || info.dim != (size_t)sr->dim) {
                quant_codes_free(sr->codes);
                sr->codes = NULL;
            }
        }
        err_clear();
        free(data);
        if (sr->codes) return 0;
    }
    quant_build_params bp = quant_default_build_params();
    bp.pool = sr->pool;
    rc = quant_codes_build(sr->matrix, sr->count, (size_t)sr->dim, &bp, &sr->codes);
    if (rc) return rc;
    const void *built = NULL;
    quant_codes_bytes(sr->codes, &built, &bytes);
    store_cache_write(sr->store, SEARCH_CODES_CACHE, sr->generation, built, bytes);
    return 0;
}

static int load(searcher *sr)
{
    free(sr->matrix);
    free(sr->chunk_ids);
    quant_codes_free(sr->codes);
    sr->matrix = NULL;
    sr->chunk_ids = NULL;
    sr->codes = NULL;
    sr->count = 0;
    forget_filter(sr);
    int rc =
        store_load_vectors(sr->store, &sr->matrix, &sr->chunk_ids, &sr->count, &sr->generation);
    return rc ? rc : load_codes(sr);
}

int searcher_refresh(searcher *sr)
{
    uint64_t generation = 0;
    int rc = store_generation(sr->store, &generation);
    if (rc || generation == sr->generation) return rc;
    return load(sr);
}

int searcher_open(store *s, embedrag_model *model, int threads, searcher **out)
{
    *out = NULL;
    const store_model *sm = store_get_model(s);
    const char *prompt = "";
    if (model) {
        embedrag_model_info info;
        embedrag_model_get_info(model, &info);
        if (strcmp(sm->name, info.name) != 0 || sm->dimension != info.dimension)
            return err_set(EMBEDRAG_ERR_MODEL_MISMATCH,
                           "the store was built with %s (%d dimensions); the model given is %s "
                           "(%d)",
                           sm->name, sm->dimension, info.name, info.dimension);
        prompt = index_model_prompt(model, "query", NULL);
    }
    searcher *sr = calloc(1, sizeof *sr);
    if (!sr) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    sr->store = s;
    sr->model = model;
    sr->dim = sm->dimension;
    sr->query_prompt = prompt;
    int rc = threadpool_create(threads, &sr->pool);
    if (!rc) rc = load(sr);
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
    quant_codes_free(sr->codes);
    free(sr->matrix);
    free(sr->chunk_ids);
    free(sr->query);
    free(sr->scan_hits);
    free(sr->bm25_ids);
    free(sr->bm25_scores);
    forget_filter(sr);
    free(sr);
}

size_t searcher_vectors(const searcher *sr)
{
    return sr->count;
}

void searcher_set_exact(searcher *sr, bool exact)
{
    sr->exact = exact;
}

bool searcher_quantized(const searcher *sr)
{
    return sr->codes && !sr->exact;
}

/* ---- filters ---- */

/* One string that names a filter, to tell when the next query's filter is the same. */
static char *filter_key(const store_filter *f)
{
    size_t n = 2 + (f->source_glob ? strlen(f->source_glob) : 0);
    for (int i = 0; i < f->count; i++)
        n += 2 + (f->keys[i] ? strlen(f->keys[i]) : 0) + (f->values[i] ? strlen(f->values[i]) : 0);
    char *key = malloc(n), *w = key;
    if (!key) return NULL;
    w += sprintf(w, "%s\x1f", f->source_glob ? f->source_glob : "");
    for (int i = 0; i < f->count; i++)
        w += sprintf(w, "%s\x1e%s\x1f", f->keys[i] ? f->keys[i] : "",
                     f->values[i] ? f->values[i] : "");
    return key;
}

typedef struct allow_job {
    const searcher *sr;
    uint8_t *bitmap;
} allow_job;

static int by_id(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static int allow_chunk(void *ctx, int64_t chunk_id)
{
    allow_job *job = ctx;
    const int64_t *at =
        bsearch(&chunk_id, job->sr->chunk_ids, job->sr->count, sizeof chunk_id, by_id);
    /* A chunk added after the vectors were loaded has no row yet. */
    if (at) scan_bitmap_set(job->bitmap, (size_t)(at - job->sr->chunk_ids), true);
    return 0;
}

/* The rows `filter` allows as a scan bitmap (*allowed NULL when it allows everything). */
static int allowed_rows(searcher *sr, const store_filter *filter, const uint8_t **allowed)
{
    *allowed = NULL;
    if (!store_filter_active(filter)) return 0;
    if (filter->count && (!filter->keys || !filter->values))
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "search: a filter without keys or values");
    char *key = filter_key(filter);
    if (!key) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    if (sr->filter_key && !strcmp(key, sr->filter_key)) {
        free(key);
        *allowed = sr->allowed;
        return 0;
    }
    forget_filter(sr);
    allow_job job = {.sr = sr, .bitmap = calloc(scan_bitmap_bytes(sr->count) + 1, 1)};
    if (!job.bitmap) {
        free(key);
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    }
    int rc = store_filter_chunks(sr->store, filter, allow_chunk, &job);
    if (rc) {
        free(key);
        free(job.bitmap);
        return rc;
    }
    sr->filter_key = key;
    sr->allowed = job.bitmap;
    *allowed = job.bitmap;
    return 0;
}

/* ---- modes ---- */

static int dense_vector(searcher *sr, const float *vector, int k, const uint8_t *allowed,
                        search_hit *hits, int *found)
{
    scan_hit *grown = realloc(sr->scan_hits, (size_t)(k > 0 ? k : 1) * sizeof *grown);
    if (!grown) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    sr->scan_hits = grown;
    scan_params sp = scan_default_params();
    sp.pool = sr->pool;
    sp.allowed = allowed;
    size_t n = 0;
    int rc = scan_topk(sr->matrix, sr->count, (size_t)sr->dim, vector, (size_t)k, &sp,
                       sr->scan_hits, &n);
    if (rc) return rc;
    for (size_t i = 0; i < n; i++)
        hits[i] = (search_hit){.chunk_id = sr->chunk_ids[sr->scan_hits[i].row],
                               .score = sr->scan_hits[i].score};
    *found = (int)n;
    return 0;
}

static int dense(searcher *sr, const char *query, int k, const uint8_t *allowed, search_hit *hits,
                 int *found)
{
    if (!sr->model)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                       "search: a text query needs the store's model (open it with one)");
    embedrag_embed_params p = embedrag_embed_default_params();
    p.prompt = sr->query_prompt;
    p.lane = EMBEDRAG_LANE_LATENCY;
    int rc = embedrag_embed(sr->model, &query, NULL, 1, &p, sr->query);
    if (rc) return err_set(rc, "embedding the query: %s", embedrag_last_error());
    return dense_vector(sr, sr->query, k, allowed, hits, found);
}

static int bm25(searcher *sr, const char *query, int k, const store_filter *filter,
                search_hit *hits, int *found)
{
    int64_t *ids = realloc(sr->bm25_ids, (size_t)(k > 0 ? k : 1) * sizeof *ids);
    if (ids) sr->bm25_ids = ids;
    double *scores = realloc(sr->bm25_scores, (size_t)(k > 0 ? k : 1) * sizeof *scores);
    if (scores) sr->bm25_scores = scores;
    if (!ids || !scores) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    int rc = store_bm25(sr->store, query, filter, k, sr->bm25_ids, sr->bm25_scores, found);
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
static int hybrid(searcher *sr, const char *query, int k, const store_filter *filter,
                  const uint8_t *allowed, search_hit *hits, int *found)
{
    int depth = k > SEARCH_FUSION_DEPTH ? k : SEARCH_FUSION_DEPTH;
    search_hit *lists = malloc(2 * (size_t)depth * sizeof *lists);
    search_hit *fused = malloc(2 * (size_t)depth * sizeof *fused);
    int counts[2] = {0, 0}, rc = 0, n = 0;
    if (!lists || !fused) rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    if (!rc) rc = dense(sr, query, depth, allowed, lists, &counts[0]);
    if (!rc) rc = bm25(sr, query, depth, filter, lists + depth, &counts[1]);
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

int searcher_search(searcher *sr, const char *query, search_mode mode, int k,
                    const store_filter *filter, search_hit *hits, int *found)
{
    *found = 0;
    if (!query || k < 1) return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "search: no query or k < 1");
    int rc = searcher_refresh(sr);
    const uint8_t *allowed = NULL;
    if (!rc && mode != SEARCH_BM25) rc = allowed_rows(sr, filter, &allowed);
    if (rc) return rc;
    switch (mode) {
    case SEARCH_DENSE:
        return dense(sr, query, k, allowed, hits, found);
    case SEARCH_BM25:
        return bm25(sr, query, k, filter, hits, found);
    case SEARCH_HYBRID:
        return hybrid(sr, query, k, filter, allowed, hits, found);
    }
    return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "search: unknown mode %d", (int)mode);
}

int searcher_search_vector(searcher *sr, const float *vector, int k, const store_filter *filter,
                           search_hit *hits, int *found)
{
    *found = 0;
    if (!vector || k < 1)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "search: no vector or k < 1");
    int rc = searcher_refresh(sr);
    const uint8_t *allowed = NULL;
    if (!rc) rc = allowed_rows(sr, filter, &allowed);
    if (rc) return rc;
    return dense_vector(sr, vector, k, allowed, hits, found);
}
