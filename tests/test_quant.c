/* The quantized search (src/store/quant.h) against the exact scan (scan_topk) on clustered and
 * uniform normalized vectors: every score returned is the bits scan_topk gives that row; with
 * the default shortlist recall@10 reaches 0.99 on clustered vectors; a shortlist of every row
 * finds exactly scan_topk's hits; filters, k past n, n = 0, NaN and infinite rows and queries;
 * the same results on every instruction set and thread count, and the same codes from every
 * build; saving and loading. */
#include "store/quant.h"
#include "store/scan.h"
#include "util/error.h"

#include "check.h"
#include "check_hits.h"

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#define DIM 384
#define ROWS 20000
#define QUERIES 50
#define K 10
/* Centres of the clustered vectors: 100 rows a centre, noise of the centre's norm (a cosine of
 * ~0.5 inside a cluster), as bench/quant_bench.c draws them around 1,000 centres. */
#define CENTRES 200

static float gaussian(void)
{
    return (check_uniform() + check_uniform() + check_uniform() + check_uniform()) * 0.8660254f;
}

/* n normalized vectors: around `centres` random ones of n_centres (uniform on the sphere when
 * n_centres is 0). */
static float *make_vectors(size_t n, size_t dim, const float *centres, size_t n_centres)
{
    float *m = malloc(n * dim * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        float *v = m + i * dim;
        const float *c = n_centres ? centres + check_random() % n_centres * dim : NULL;
        for (size_t j = 0; j < dim; j++)
            v[j] = c ? c[j] + gaussian() / sqrtf((float)dim) : gaussian();
        check_normalize(v, dim);
    }
    return m;
}

static threadpool *pools[4]; /* pools[t]: t threads (pools[1] is NULL: the calling thread) */

/* The data most tests share: clustered rows and queries, their exact top K, default codes. */
static float *rows, *queries;
static scan_hit truth[QUERIES * K];
static size_t n_truth[QUERIES];
static quant_codes *codes;

static size_t found_of(const scan_hit *hits, size_t n_hits, const scan_hit *t, size_t nt)
{
    size_t found = 0;
    for (size_t i = 0; i < n_hits; i++)
        for (size_t j = 0; j < nt; j++) found += hits[i].row == t[j].row;
    return found;
}

/* Recall@K of the queries against the truth with params p; every score returned is checked
 * against the row's exact score and the hits' order. */
static double recall_of(const quant_codes *c, const float *m, size_t n, const float *qs,
                        const scan_hit *t, const size_t *nt, const quant_params *p)
{
    size_t found = 0, wanted = 0;
    for (size_t q = 0; q < QUERIES; q++) {
        scan_hit hits[K];
        size_t n_hits = 0;
        int rc = quant_search(c, m, n, DIM, qs + q * DIM, K, p, hits, &n_hits);
        CHECK(rc == 0, "quant_search: %s", err_get());
        for (size_t i = 0; i < n_hits; i++) {
            float exact;
            scan_score_rows(m, DIM, &hits[i].row, 1, qs + q * DIM, SCAN_ISA_GENERIC, &exact);
            CHECK(memcmp(&exact, &hits[i].score, sizeof exact) == 0,
                  "query %zu row %zu: score %.9g, exact %.9g", q, hits[i].row, hits[i].score,
                  exact);
            if (i > 0)
                CHECK(hits[i - 1].score > hits[i].score ||
                          (hits[i - 1].score == hits[i].score && hits[i - 1].row < hits[i].row),
                      "query %zu: hits %zu and %zu out of order", q, i - 1, i);
        }
        found += found_of(hits, n_hits, t + q * K, nt[q]);
        wanted += nt[q];
    }
    return wanted ? (double)found / (double)wanted : 1.0;
}

static void test_scores_and_recall(void)
{
    quant_codes_info info;
    quant_codes_get_info(codes, &info);
    CHECK(info.n == ROWS && info.dim == DIM, "info %zu x %zu", info.n, info.dim);
    CHECK(info.shortlist >= QUANT_MIN_SHORTLIST && info.shortlist <= ROWS, "shortlist %zu",
          info.shortlist);
    CHECK(info.calibrated_recall >= 0.99, "calibrated recall %.4f", info.calibrated_recall);
    quant_params p = quant_default_params();
    double recall = recall_of(codes, rows, ROWS, queries, truth, n_truth, &p);
    CHECK(recall >= 0.99, "clustered recall@10 %.4f with the default shortlist %zu", recall,
          info.shortlist);
    /* Rows found by both carry scan_topk's bits: the whole top K when the shortlist is every
     * row. */
    p.shortlist = ROWS;
    for (size_t q = 0; q < QUERIES; q++) {
        scan_hit hits[K];
        size_t n_hits = 0;
        quant_search(codes, rows, ROWS, DIM, queries + q * DIM, K, &p, hits, &n_hits);
        CHECK(check_same_hits(hits, n_hits, truth + q * K, n_truth[q]), "query %zu: shortlist n",
              q);
    }
    /* A test that can fail: a shortlist of k on these vectors misses neighbours. */
    p.shortlist = K;
    recall = recall_of(codes, rows, ROWS, queries, truth, n_truth, &p);
    CHECK(recall < 0.99, "recall %.4f with a shortlist of %d: the check cannot tell", recall, K);
}

/* Uniform vectors: the calibrated shortlist grows until recall holds (a few percent of the
 * rows), and Hamming (1 query bit) ranks worse than the 4-bit query. */
static void test_uniform(void)
{
    enum { N = 8000 };
    float *m = make_vectors(N, DIM, NULL, 0);
    float *qs = make_vectors(QUERIES, DIM, NULL, 0);
    scan_hit t[QUERIES * K];
    size_t nt[QUERIES];
    scan_topk_batch(m, N, DIM, qs, QUERIES, K, NULL, t, nt);
    quant_codes *c = NULL;
    int rc = quant_codes_build(m, N, DIM, NULL, &c);
    CHECK(rc == 0, "build: %s", err_get());
    if (c) {
        quant_codes_info info;
        quant_codes_get_info(c, &info);
        quant_params p = quant_default_params();
        double recall = recall_of(c, m, N, qs, t, nt, &p);
        CHECK(recall >= 0.98, "uniform recall@10 %.4f with shortlist %zu", recall, info.shortlist);
        p.shortlist = 200;
        double four = recall_of(c, m, N, qs, t, nt, &p);
        p.query_bits = 1;
        double one = recall_of(c, m, N, qs, t, nt, &p);
        CHECK(four > one, "4-bit query recall %.4f, Hamming %.4f", four, one);
    }
    quant_codes_free(c);
    free(qs);
    free(m);
}

static void test_modes_isas_threads(void)
{
    quant_build_params bp = quant_default_build_params();
    bp.int8 = QUANT_INT8_ON;
    bp.pool = pools[2];
    quant_codes *c8 = NULL;
    int rc = quant_codes_build(rows, ROWS, DIM, &bp, &c8);
    CHECK(rc == 0, "build with int8: %s", err_get());
    if (!c8) return;
    const int modes[] = {QUANT_MODE_BITS, QUANT_MODE_CASCADE, QUANT_MODE_INT8};
    const char *names[] = {"bits", "cascade", "int8"};
    for (int mi = 0; mi < 3; mi++) {
        quant_params p = quant_default_params();
        p.mode = modes[mi];
        p.shortlist = 1000; /* the cascade needs a shortlist above its int8 one */
        double recall = recall_of(c8, rows, ROWS, queries, truth, n_truth, &p);
        CHECK(recall >= 0.99, "%s: recall@10 %.4f", names[mi], recall);
        for (size_t q = 0; q < 8; q++) {
            scan_hit want[K], got[K];
            size_t n_want = 0, n_got = 0;
            quant_search(c8, rows, ROWS, DIM, queries + q * DIM, K, &p, want, &n_want);
            for (int isa = QUANT_ISA_GENERIC; isa <= QUANT_ISA_AVX512_VNNI; isa++) {
                if (!quant_isa_supported(isa)) continue;
                for (int threads = 1; threads <= 3; threads++) {
                    quant_params v = p;
                    v.isa = isa;
                    v.pool = pools[threads];
                    rc = quant_search(c8, rows, ROWS, DIM, queries + q * DIM, K, &v, got, &n_got);
                    CHECK(rc == 0 && check_same_hits(want, n_want, got, n_got),
                          "%s, query %zu: %s on %d threads differs", names[mi], q,
                          quant_isa_name(isa), threads);
                }
            }
        }
    }
    /* Every instruction set and thread count builds the same bytes. */
    const void *want_bytes, *got_bytes;
    size_t n_want_bytes, n_got_bytes;
    quant_codes_bytes(c8, &want_bytes, &n_want_bytes);
    for (int isa = QUANT_ISA_GENERIC; isa <= QUANT_ISA_AVX512_VNNI; isa++) {
        if (!quant_isa_supported(isa)) continue;
        bp.isa = isa;
        bp.pool = pools[isa % 2 ? 3 : 1];
        quant_codes *other = NULL;
        rc = quant_codes_build(rows, ROWS, DIM, &bp, &other);
        CHECK(rc == 0, "build on %s: %s", quant_isa_name(isa), err_get());
        if (!other) continue;
        quant_codes_bytes(other, &got_bytes, &n_got_bytes);
        CHECK(n_got_bytes == n_want_bytes && memcmp(want_bytes, got_bytes, n_got_bytes) == 0,
              "codes built with %s differ", quant_isa_name(isa));
        quant_codes_free(other);
    }
    quant_codes_free(c8);
}

static void test_filter(void)
{
    uint8_t *allowed = calloc(scan_bitmap_bytes(ROWS), 1);
    for (unsigned percent = 1; percent <= 30; percent += 29) {
        for (size_t i = 0; i < ROWS; i++)
            scan_bitmap_set(allowed, i, check_random() % 100 < percent);
        quant_params p = quant_default_params();
        p.allowed = allowed;
        p.pool = pools[2];
        scan_params sp = scan_default_params();
        sp.allowed = allowed;
        for (size_t q = 0; q < 10; q++) {
            scan_hit hits[K], want[K];
            size_t n_hits = 0, n_want = 0;
            p.shortlist = 0;
            quant_search(codes, rows, ROWS, DIM, queries + q * DIM, K, &p, hits, &n_hits);
            CHECK(n_hits == K, "%u%%: %zu hits", percent, n_hits);
            for (size_t i = 0; i < n_hits; i++)
                CHECK(scan_bitmap_get(allowed, hits[i].row), "%u%%: row %zu not allowed", percent,
                      hits[i].row);
            p.shortlist = ROWS;
            quant_search(codes, rows, ROWS, DIM, queries + q * DIM, K, &p, hits, &n_hits);
            scan_topk(rows, ROWS, DIM, queries + q * DIM, K, &sp, want, &n_want);
            CHECK(check_same_hits(hits, n_hits, want, n_want), "%u%%: query %zu differs", percent,
                  q);
        }
    }
    /* Nothing allowed: nothing found. */
    memset(allowed, 0, scan_bitmap_bytes(ROWS));
    quant_params p = quant_default_params();
    p.allowed = allowed;
    scan_hit hits[K];
    size_t n_hits = 1;
    CHECK(quant_search(codes, rows, ROWS, DIM, queries, K, &p, hits, &n_hits) == 0 && n_hits == 0,
          "nothing allowed: %zu hits", n_hits);
    free(allowed);
}

/* Odd sizes: n below a block, k past n, dimensions that are not whole words, n = 0. */
static void test_edges(void)
{
    const size_t dims[] = {1, 100, 130};
    for (int di = 0; di < 3; di++) {
        size_t dim = dims[di], n = 53;
        float *m = malloc(n * dim * sizeof(float));
        for (size_t i = 0; i < n * dim; i++) m[i] = check_uniform();
        float *q = malloc(dim * sizeof(float));
        for (size_t j = 0; j < dim; j++) q[j] = check_uniform();
        quant_codes *c = NULL;
        int rc = quant_codes_build(m, n, dim, NULL, &c);
        CHECK(rc == 0, "dim %zu: %s", dim, err_get());
        if (c) {
            scan_hit hits[100], want[100];
            size_t n_hits = 0, n_want = 0;
            rc = quant_search(c, m, n, dim, q, 100, NULL, hits, &n_hits);
            scan_topk(m, n, dim, q, 100, NULL, want, &n_want);
            CHECK(rc == 0 && n_hits == n && check_same_hits(hits, n_hits, want, n_want),
                  "dim %zu, k 100 > n %zu: %zu hits", dim, n, n_hits);
            CHECK(quant_search(c, m, n - 1, dim, q, 1, NULL, hits, &n_hits) ==
                      EMBEDRAG_ERR_INVALID_ARGUMENT,
                  "n other than the codes' accepted");
            quant_params p = quant_default_params();
            p.mode = QUANT_MODE_CASCADE;
            CHECK(quant_search(c, m, n, dim, q, 1, &p, hits, &n_hits) == EMBEDRAG_ERR_UNSUPPORTED,
                  "cascade without int8 codes accepted");
        }
        quant_codes_free(c);
        free(q);
        free(m);
    }
    quant_codes *c = NULL;
    float q[DIM] = {1};
    int rc = quant_codes_build(NULL, 0, DIM, NULL, &c);
    CHECK(rc == 0 && c, "n = 0: %s", err_get());
    if (c) {
        scan_hit hits[K];
        size_t n_hits = 1;
        rc = quant_search(c, NULL, 0, DIM, q, K, NULL, hits, &n_hits);
        CHECK(rc == 0 && n_hits == 0, "n = 0: rc %d, %zu hits", rc, n_hits);
    }
    quant_codes_free(c);
    CHECK(quant_codes_build(rows, 10, 0, NULL, &c) == EMBEDRAG_ERR_INVALID_ARGUMENT && !c,
          "dim 0 accepted");
}

/* Rows with a NaN or infinity are never returned, even where they would score best; a query
 * with one finds nothing. */
static void test_nan_rows(void)
{
    enum { N = 3000 };
    float *m = malloc((size_t)N * DIM * sizeof(float));
    memcpy(m, rows, (size_t)N * DIM * sizeof(float));
    const float *q = queries;
    /* Copies of the query, spoiled: they would be the best rows otherwise. */
    for (size_t i = 0; i < N; i += 100) {
        memcpy(m + i * DIM, q, DIM * sizeof(float));
        m[i * DIM + i % DIM] = i % 200 ? NAN : INFINITY;
    }
    quant_codes *c = NULL;
    int rc = quant_codes_build(m, N, DIM, NULL, &c);
    CHECK(rc == 0, "build: %s", err_get());
    if (c) {
        scan_hit hits[N];
        size_t n_hits = 0;
        quant_params p = quant_default_params();
        p.shortlist = N;
        rc = quant_search(c, m, N, DIM, q, N, &p, hits, &n_hits);
        CHECK(rc == 0 && n_hits == N - N / 100, "%zu hits of %d finite rows", n_hits, N - N / 100);
        for (size_t i = 0; i < n_hits; i++)
            CHECK(hits[i].row % 100 != 0, "row %zu (not finite) returned", hits[i].row);
        rc = quant_search(c, m, N, DIM, q, K, NULL, hits, &n_hits);
        for (size_t i = 0; i < n_hits; i++)
            CHECK(hits[i].row % 100 != 0 && !isnan(hits[i].score), "row %zu returned", hits[i].row);
        float bad[DIM];
        memcpy(bad, q, sizeof bad);
        bad[7] = NAN;
        rc = quant_search(c, m, N, DIM, bad, K, NULL, hits, &n_hits);
        CHECK(rc == 0 && n_hits == 0, "NaN query: %zu hits", n_hits);
    }
    quant_codes_free(c);
    free(m);
}

static void test_save_load(void)
{
    const void *data;
    size_t bytes;
    quant_codes_bytes(codes, &data, &bytes);
    char *copy = malloc(bytes);
    memcpy(copy, data, bytes);
    quant_codes *loaded = NULL;
    int rc = quant_codes_load(copy, bytes, &loaded);
    CHECK(rc == 0 && loaded, "load: %s", err_get());
    if (loaded) {
        for (size_t q = 0; q < 5; q++) {
            scan_hit a[K], b[K];
            size_t na = 0, nb = 0;
            quant_search(codes, rows, ROWS, DIM, queries + q * DIM, K, NULL, a, &na);
            quant_search(loaded, rows, ROWS, DIM, queries + q * DIM, K, NULL, b, &nb);
            CHECK(check_same_hits(a, na, b, nb), "query %zu: loaded codes differ", q);
        }
        quant_codes_free(loaded);
    }
    CHECK(quant_codes_load(copy, bytes - 1, &loaded) == EMBEDRAG_ERR_FORMAT && !loaded,
          "a short buffer loaded");
    copy[0] ^= 1;
    CHECK(quant_codes_load(copy, bytes, &loaded) == EMBEDRAG_ERR_FORMAT && !loaded,
          "a bad magic loaded");
    copy[0] ^= 1;
    copy[8] ^= 1; /* the version */
    CHECK(quant_codes_load(copy, bytes, &loaded) == EMBEDRAG_ERR_FORMAT && !loaded,
          "another version loaded");
    free(copy);
}

int main(void)
{
    for (int t = 2; t <= 3; t++)
        if (threadpool_create(t, &pools[t]) != 0) return 1;
    float *centres = make_vectors(CENTRES, DIM, NULL, 0);
    rows = make_vectors(ROWS, DIM, centres, CENTRES);
    queries = make_vectors(QUERIES, DIM, centres, CENTRES);
    scan_topk_batch(rows, ROWS, DIM, queries, QUERIES, K, NULL, truth, n_truth);
    quant_build_params bp = quant_default_build_params();
    bp.pool = pools[2];
    if (quant_codes_build(rows, ROWS, DIM, &bp, &codes) != 0) {
        fprintf(stderr, "quant_codes_build: %s\n", err_get());
        return 1;
    }
    printf("isa %s\n", quant_isa_name(quant_isa()));

    test_scores_and_recall();
    test_uniform();
    test_modes_isas_threads();
    test_filter();
    test_edges();
    test_nan_rows();
    test_save_load();

    quant_codes_free(codes);
    free(queries);
    free(rows);
    free(centres);
    for (int t = 2; t <= 3; t++) threadpool_destroy(pools[t]);
    return check_finish("test_quant");
}
