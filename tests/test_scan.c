/* The exact dense scan (src/store/scan.h) against a double-precision reference on uniform and
 * clustered normalized vectors, for every instruction set this machine runs, thread counts 1-3,
 * filters, and batches; and the properties the store relies on: the same bits whatever the
 * instruction set, the thread count or the batch, ties to the lower row, NaN never returned,
 * rows a filter rejects never read, row indices past 2^32. */
#include "store/scan.h"
#include "util/error.h"

#include "check.h"
#include "check_hits.h"

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* Sanitizer builds run several times slower: the largest matrices shrink there. Under
 * ThreadSanitizer, which shadows every mapping, the 16 GB reservation of test_rows_past_4g costs
 * seconds of page-table work: that test is left to the other builds. */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SLOW_BUILD 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define SLOW_BUILD 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define TSAN_BUILD 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define TSAN_BUILD 1
#endif
#endif
#ifdef SLOW_BUILD
#define LARGE_ROWS 30000
#else
#define LARGE_ROWS 200000
#endif
#define LARGE_DIM 128

/* |score - reference| allowed for normalized vectors: each lane sums at most dim / 16 products
 * and the lanes meet in 4 additions, so the float32 error is at most (dim / 16 + 4) * 2^-24 *
 * sum |x_i y_i| <= 52 * 6e-8 = 3.1e-6 at 768 dimensions (sum |x_i y_i| <= 1 for unit vectors). */
#define SCORE_TOLERANCE 1e-5

/* Floats after each matrix and query, NaN: a kernel reading past the end returns NaN scores. */
#define SENTINELS 16

/* n normalized vectors, uniform in the cube or in 20 tight clusters (many near-ties), followed
 * by SENTINELS NaNs. */
static float *make_vectors(size_t n, size_t dim, bool clustered)
{
    enum { CLUSTERS = 20 };
    float *m = malloc((n * dim + SENTINELS) * sizeof(float));
    for (size_t i = 0; i < SENTINELS; i++) m[n * dim + i] = NAN;
    float *centres = malloc(CLUSTERS * dim * sizeof(float));
    for (size_t i = 0; i < CLUSTERS * dim; i++) centres[i] = check_uniform();
    for (size_t i = 0; i < n; i++) {
        float *v = m + i * dim;
        const float *c = centres + (check_random() % CLUSTERS) * dim;
        for (size_t j = 0; j < dim; j++)
            v[j] = clustered ? c[j] + 0.1f * check_uniform() : check_uniform();
        check_normalize(v, dim);
    }
    free(centres);
    return m;
}

static double dot_reference(const float *x, const float *y, size_t dim)
{
    double s = 0;
    for (size_t j = 0; j < dim; j++) s += (double)x[j] * (double)y[j];
    return s;
}

typedef struct ranked {
    size_t row;
    double score;
} ranked;

static int compare_ranked(const void *a, const void *b)
{
    const ranked *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return x->row < y->row ? -1 : x->row > y->row;
}

/* Every allowed row ranked by its double-precision score; returns how many. */
static size_t reference_ranking(const float *rows, size_t n, size_t dim, const float *query,
                                const uint8_t *allowed, ranked *out)
{
    size_t count = 0;
    for (size_t i = 0; i < n; i++)
        if (!allowed || scan_bitmap_get(allowed, i))
            out[count++] = (ranked){i, dot_reference(rows + i * dim, query, dim)};
    qsort(out, count, sizeof *out, compare_ranked);
    return count;
}

/* hits against the reference: the right count, each score within SCORE_TOLERANCE of its row's
 * reference, sorted (score descending, row ascending), and at each rank the reference's row or
 * one whose reference score is within twice the tolerance of it (a near-tie may swap). */
static void check_hits(const char *what, const float *rows, size_t n, size_t dim,
                       const float *query, const uint8_t *allowed, size_t k, const scan_hit *hits,
                       size_t n_hits)
{
    ranked *ref = malloc((n ? n : 1) * sizeof *ref);
    size_t count = reference_ranking(rows, n, dim, query, allowed, ref);
    size_t want = k < count ? k : count;
    CHECK(n_hits == want, "%s: %zu hits, want %zu", what, n_hits, want);
    int reported = 0;
    for (size_t i = 0; i < n_hits && i < want && reported < 3; i++) {
        const scan_hit *h = &hits[i];
        bool ok = h->row < n && (!allowed || scan_bitmap_get(allowed, h->row));
        double exact = ok ? dot_reference(rows + h->row * dim, query, dim) : NAN;
        ok = ok && fabs((double)h->score - exact) <= SCORE_TOLERANCE;
        ok = ok && (h->row == ref[i].row || fabs(exact - ref[i].score) <= 2 * SCORE_TOLERANCE);
        if (i > 0)
            ok = ok && (hits[i - 1].score > h->score ||
                        (hits[i - 1].score == h->score && hits[i - 1].row < h->row));
        CHECK(ok, "%s: rank %zu: row %zu score %.8f (reference %.8f), reference row %zu %.8f", what,
              i, h->row, (double)h->score, exact, ref[i].row, ref[i].score);
        reported += !ok;
    }
    free(ref);
}

static int isas[3];
static int n_isas;
static threadpool *pools[4]; /* pools[t]: t threads (pools[1] is NULL: the calling thread) */

static scan_params params_for(int isa, int threads, const uint8_t *allowed)
{
    scan_params p = scan_default_params();
    p.isa = isa;
    p.pool = pools[threads];
    p.allowed = allowed;
    return p;
}

static uint8_t *random_bitmap(size_t n, unsigned percent)
{
    uint8_t *bits = calloc(scan_bitmap_bytes(n) + 1, 1);
    for (size_t i = 0; i < n; i++) scan_bitmap_set(bits, i, check_random() % 100 < percent);
    return bits;
}

/* Every instruction set and thread count against the reference, and bit-identical to the
 * portable kernel on one thread. */
static void test_matches_reference(size_t n, size_t dim, bool clustered, const uint8_t *allowed)
{
    const size_t ks[] = {1, 10, 100};
    float *rows = make_vectors(n, dim, clustered);
    float *query = make_vectors(1, dim, clustered);
    scan_hit *base = malloc(100 * sizeof *base), *hits = malloc(100 * sizeof *hits);
    for (size_t ki = 0; ki < 3; ki++) {
        size_t k = ks[ki], n_base = 0, n_hits = 0;
        scan_params p = params_for(SCAN_ISA_GENERIC, 1, allowed);
        CHECK(scan_topk(rows, n, dim, query, k, &p, base, &n_base) == 0, "%s", err_get());
        char what[160];
        snprintf(what, sizeof what, "n %zu dim %zu k %zu %s%s generic", n, dim, k,
                 clustered ? "clustered" : "uniform", allowed ? " filtered" : "");
        check_hits(what, rows, n, dim, query, allowed, k, base, n_base);
        for (int i = 0; i < n_isas; i++)
            for (int threads = 1; threads <= 3; threads++) {
                p = params_for(isas[i], threads, allowed);
                CHECK(scan_topk(rows, n, dim, query, k, &p, hits, &n_hits) == 0, "%s", err_get());
                CHECK(check_same_hits(base, n_base, hits, n_hits),
                      "n %zu dim %zu k %zu %s%s: %s on %d threads differs from generic on one", n,
                      dim, k, clustered ? "clustered" : "uniform", allowed ? " filtered" : "",
                      scan_isa_name(isas[i]), threads);
            }
    }
    free(hits);
    free(base);
    free(query);
    free(rows);
}

/* A large matrix, so a pool splits it into many ranges: the reference once, then every
 * instruction set on 1, 2 and 3 threads must return the same bits. */
static void test_large_matrix(bool clustered)
{
    const size_t n = LARGE_ROWS, dim = LARGE_DIM, k = 100;
    float *rows = make_vectors(n, dim, clustered);
    float *query = make_vectors(1, dim, clustered);
    scan_hit base[100], hits[100];
    size_t n_base = 0, n_hits = 0;
    scan_params p = params_for(scan_isa(), 1, NULL);
    CHECK(scan_topk(rows, n, dim, query, k, &p, base, &n_base) == 0, "%s", err_get());
    check_hits(clustered ? "large clustered" : "large uniform", rows, n, dim, query, NULL, k, base,
               n_base);
    for (int i = 0; i < n_isas; i++)
        for (int threads = 1; threads <= 3; threads++) {
            if (isas[i] == scan_isa() && threads == 1) continue;
            p = params_for(isas[i], threads, NULL);
            CHECK(scan_topk(rows, n, dim, query, k, &p, hits, &n_hits) == 0, "%s", err_get());
            CHECK(check_same_hits(base, n_base, hits, n_hits), "large: %s on %d threads differs",
                  scan_isa_name(isas[i]), threads);
        }
    free(query);
    free(rows);
}

/* m queries at once return what m single calls return, bit for bit: groups of
 * SCAN_BATCH_QUERIES, query tiles and their remainders, filters, threads. */
static void test_batch_matches_single(size_t n, size_t dim, size_t m, size_t k,
                                      const uint8_t *allowed)
{
    float *rows = make_vectors(n, dim, true);
    float *queries = make_vectors(m, dim, true);
    scan_hit *batch = malloc(m * k * sizeof *batch), *one = malloc(k * sizeof *one);
    size_t *n_batch = malloc(m * sizeof *n_batch), n_one = 0;
    for (int i = 0; i < n_isas; i++)
        for (int threads = 1; threads <= 3; threads += 2) {
            scan_params p = params_for(isas[i], threads, allowed);
            CHECK(scan_topk_batch(rows, n, dim, queries, m, k, &p, batch, n_batch) == 0, "%s",
                  err_get());
            int differ = 0;
            for (size_t q = 0; q < m; q++) {
                CHECK(scan_topk(rows, n, dim, queries + q * dim, k, &p, one, &n_one) == 0, "%s",
                      err_get());
                differ += !check_same_hits(one, n_one, batch + q * k, n_batch[q]);
            }
            CHECK(differ == 0,
                  "batch of %zu (dim %zu, k %zu%s) on %s, %d threads: %d queries "
                  "differ from single calls",
                  m, dim, k, allowed ? ", filtered" : "", scan_isa_name(isas[i]), threads, differ);
        }
    /* And against the reference, for a few of them. */
    for (size_t q = 0; q < m; q += m / 3 + 1)
        check_hits("batch", rows, n, dim, queries + q * dim, allowed, k, batch + q * k, n_batch[q]);
    free(n_batch);
    free(one);
    free(batch);
    free(queries);
    free(rows);
}

static void test_filters(void)
{
    const size_t n = 20000, dim = 96;
    uint8_t *half = random_bitmap(n, 50), *sparse = random_bitmap(n, 1);
    test_matches_reference(n, dim, false, half);
    test_matches_reference(n, dim, true, sparse);
    test_batch_matches_single(n, dim, 9, 10, sparse);
    test_batch_matches_single(n, dim, 6, 10, half);

    /* Nothing allowed: no hits. One row allowed: that row. */
    float *rows = make_vectors(n, dim, false);
    uint8_t *bits = calloc(scan_bitmap_bytes(n), 1);
    scan_hit hits[10];
    size_t n_hits = 99;
    for (int threads = 1; threads <= 3; threads++) {
        scan_params p = params_for(SCAN_ISA_AUTO, threads, bits);
        CHECK(scan_topk(rows, n, dim, rows, 10, &p, hits, &n_hits) == 0 && n_hits == 0,
              "nothing allowed: %zu hits", n_hits);
        scan_bitmap_set(bits, 12345, true);
        CHECK(scan_topk(rows, n, dim, rows, 10, &p, hits, &n_hits) == 0 && n_hits == 1 &&
                  hits[0].row == 12345,
              "one row allowed: %zu hits, row %zu", n_hits, n_hits ? hits[0].row : 0);
        scan_bitmap_set(bits, 12345, false);
    }
    free(bits);
    free(rows);
    free(sparse);
    free(half);
}

/* Rows a sparse filter rejects are not read: each row is a page of its own, and every rejected
 * row's page is made unreadable. (Where most rows of a block are allowed, the block is read whole;
 * the filter here allows one row in 7 and a run of 3 nowhere near that.) */
static void test_filter_reads_only_allowed_rows(void)
{
    long page = sysconf(_SC_PAGESIZE);
    const size_t n = 300;
    size_t dim = (size_t)page / sizeof(float);
    float *rows =
        mmap(NULL, n * (size_t)page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(rows != MAP_FAILED, "mmap");
    if (rows == MAP_FAILED) return;
    float *query = make_vectors(1, dim, false);
    uint8_t *bits = calloc(scan_bitmap_bytes(n), 1);
    for (size_t i = 0; i < n; i++) {
        float *v = rows + i * dim;
        for (size_t j = 0; j < dim; j++) v[j] = check_uniform();
        check_normalize(v, dim);
        bool allowed = i % 7 == 3 || (i >= 150 && i < 153);
        scan_bitmap_set(bits, i, allowed);
    }
    /* The reference before the pages go. */
    ranked *ref = malloc(n * sizeof *ref);
    size_t count = reference_ranking(rows, n, dim, query, bits, ref);
    for (size_t i = 0; i < n; i++)
        if (!scan_bitmap_get(bits, i)) mprotect(rows + i * dim, (size_t)page, PROT_NONE);
    scan_hit hits[20];
    size_t n_hits = 0;
    for (int i = 0; i < n_isas; i++)
        for (int threads = 1; threads <= 2; threads++) {
            scan_params p = params_for(isas[i], threads, bits);
            CHECK(scan_topk(rows, n, dim, query, 20, &p, hits, &n_hits) == 0, "%s", err_get());
            CHECK(n_hits == 20 && count > 20, "%zu hits", n_hits);
            for (size_t h = 0; h < n_hits; h++)
                CHECK(hits[h].row == ref[h].row ||
                          fabs((double)hits[h].score - ref[h].score) <= 2 * SCORE_TOLERANCE,
                      "guarded rows: rank %zu row %zu, reference %zu", h, hits[h].row, ref[h].row);
        }
    free(ref);
    free(bits);
    free(query);
    munmap(rows, n * (size_t)page);
}

/* k >= n returns every row once, whatever the split into ranges (n prime, so no thread count
 * divides it). */
static void test_every_row_found(void)
{
    const size_t n = 49157, dim = 8;
    float *rows = make_vectors(n, dim, false);
    scan_hit *hits = malloc((n + 1) * sizeof *hits);
    uint8_t *seen = malloc(n);
    size_t n_hits = 0;
    for (int i = 0; i < n_isas; i++)
        for (int threads = 1; threads <= 3; threads++) {
            scan_params p = params_for(isas[i], threads, NULL);
            CHECK(scan_topk(rows, n, dim, rows + (n - 1) * dim, n + 1, &p, hits, &n_hits) == 0,
                  "%s", err_get());
            memset(seen, 0, n);
            size_t distinct = 0;
            for (size_t h = 0; h < n_hits; h++)
                if (hits[h].row < n && !seen[hits[h].row]) seen[hits[h].row] = 1, distinct++;
            CHECK(n_hits == n && distinct == n && hits[0].row == n - 1,
                  "every row on %s, %d threads: %zu hits, %zu distinct, first %zu",
                  scan_isa_name(isas[i]), threads, n_hits, distinct, hits[0].row);
        }
    free(seen);
    free(hits);
    free(rows);
}

/* Equal scores rank by row, across the ranges of a pool too: a matrix of one repeated vector. */
static void test_ties_go_to_the_lower_row(void)
{
    const size_t n = 50000, dim = 48, k = 100;
    float *one = make_vectors(1, dim, false);
    float *rows = malloc(n * dim * sizeof(float));
    for (size_t i = 0; i < n; i++) memcpy(rows + i * dim, one, dim * sizeof(float));
    scan_hit hits[100];
    size_t n_hits = 0;
    for (int i = 0; i < n_isas; i++)
        for (int threads = 1; threads <= 3; threads++) {
            scan_params p = params_for(isas[i], threads, NULL);
            CHECK(scan_topk(rows, n, dim, one, k, &p, hits, &n_hits) == 0, "%s", err_get());
            bool in_order = n_hits == k;
            for (size_t h = 0; h < n_hits; h++) in_order = in_order && hits[h].row == h;
            CHECK(in_order, "ties on %s, %d threads: rank 0 row %zu, last row %zu",
                  scan_isa_name(isas[i]), threads, hits[0].row, hits[n_hits - 1].row);
        }
    free(rows);
    free(one);
}

/* NaN scores are never returned (a NaN in a row, inf * 0); infinite scores rank first; a NaN
 * query finds nothing. */
static void test_nan_and_infinity(void)
{
    const size_t n = 1000, dim = 383;
    float *rows = make_vectors(n, dim, false);
    float *query = make_vectors(1, dim, false);
    query[5] = fabsf(query[5]) + 0.01f;
    rows[10 * dim + 200] = NAN;    /* NaN row */
    rows[20 * dim + 382] = NAN;    /* NaN in the tail lanes */
    rows[30 * dim + 5] = INFINITY; /* +inf score */
    rows[40 * dim + 5] = INFINITY; /* +inf, and inf - inf: NaN */
    rows[40 * dim + 6] = -INFINITY;
    query[6] = fabsf(query[6]) + 0.01f;
    scan_hit hits[1000];
    size_t n_hits = 0;
    for (int i = 0; i < n_isas; i++) {
        scan_params p = params_for(isas[i], 2, NULL);
        CHECK(scan_topk(rows, n, dim, query, n, &p, hits, &n_hits) == 0, "%s", err_get());
        CHECK(n_hits == n - 3, "%s: %zu hits of %zu rows, 3 NaN", scan_isa_name(isas[i]), n_hits,
              n);
        CHECK(n_hits > 0 && hits[0].row == 30 && isinf(hits[0].score), "%s: +inf first: row %zu",
              scan_isa_name(isas[i]), hits[0].row);
        bool no_nan = true;
        for (size_t h = 0; h < n_hits; h++)
            no_nan = no_nan && !isnan(hits[h].score) && hits[h].row != 10 && hits[h].row != 20 &&
                     hits[h].row != 40;
        CHECK(no_nan, "%s: a NaN row returned", scan_isa_name(isas[i]));
    }
    query[0] = NAN;
    CHECK(scan_topk(rows, n, dim, query, 10, NULL, hits, &n_hits) == 0 && n_hits == 0,
          "NaN query: %zu hits", n_hits);
    free(query);
    free(rows);
}

static void test_edge_cases(void)
{
    float rows[4 * 3] = {1, 0, 0, 0, 1, 0, 0, 0, 1, 0.6f, 0.8f, 0}, query[3] = {0, 1, 0};
    scan_hit hits[8];
    size_t n_hits = 99, counts[2] = {99, 99};
    CHECK(scan_topk(NULL, 0, 3, query, 5, NULL, hits, &n_hits) == 0 && n_hits == 0, "n = 0");
    n_hits = 99;
    CHECK(scan_topk(rows, 4, 3, query, 0, NULL, hits, &n_hits) == 0 && n_hits == 0, "k = 0");
    CHECK(scan_topk(rows, 4, 3, query, 8, NULL, hits, &n_hits) == 0 && n_hits == 4, "k > n: %zu",
          n_hits);
    CHECK(hits[0].row == 1 && hits[0].score == 1.0f && hits[1].row == 3 && hits[1].score == 0.8f &&
              hits[2].row == 0 && hits[3].row == 2,
          "k > n: order %zu %zu %zu %zu", hits[0].row, hits[1].row, hits[2].row, hits[3].row);
    /* dim 1: scores are the products themselves. */
    float column[5] = {0.5f, -1, 2, 2, -3}, one = -1;
    CHECK(scan_topk(column, 5, 1, &one, 3, NULL, hits, &n_hits) == 0 && n_hits == 3 &&
              hits[0].row == 4 && hits[1].row == 1 && hits[2].row == 0,
          "dim 1");
    CHECK(scan_topk_batch(rows, 4, 3, query, 0, 3, NULL, hits, counts) == 0 && counts[0] == 99,
          "m = 0");
    CHECK(scan_topk(rows, 4, 0, query, 1, NULL, hits, &n_hits) == EMBEDRAG_ERR_INVALID_ARGUMENT,
          "dim 0");
    CHECK(scan_topk(rows, 4, 3, NULL, 1, NULL, hits, &n_hits) == EMBEDRAG_ERR_INVALID_ARGUMENT,
          "NULL query");
    CHECK(scan_topk(NULL, 4, 3, query, 1, NULL, hits, &n_hits) == EMBEDRAG_ERR_INVALID_ARGUMENT,
          "NULL rows");
    CHECK(scan_topk(rows, SIZE_MAX / 2, 3, query, 1, NULL, hits, &n_hits) ==
              EMBEDRAG_ERR_INVALID_ARGUMENT,
          "a matrix beyond memory");
    scan_params p = scan_default_params();
    p.isa = 7;
    CHECK(scan_topk(rows, 4, 3, query, 1, &p, hits, &n_hits) == EMBEDRAG_ERR_UNSUPPORTED,
          "unknown instruction set");
    CHECK(strlen(err_get()) > 0, "a message");
}

/* Row indices past 2^32 (size_t throughout): 2^32 + 200 one-float rows, reserved but never
 * touched except where a filter allows them, so the 16 GB cost no memory. */
static void test_rows_past_4g(void)
{
#ifdef TSAN_BUILD
    printf("rows past 2^32: skipped under ThreadSanitizer\n");
    return;
#endif
    if (sizeof(size_t) < 8) return;
    const size_t n = ((size_t)1 << 32) + 200;
    float *rows = mmap(NULL, n * sizeof(float), PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    uint8_t *bits = mmap(NULL, scan_bitmap_bytes(n), PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (rows == MAP_FAILED || bits == MAP_FAILED) {
        printf("rows past 2^32: skipped (no address space for 16 GB)\n");
        if (rows != MAP_FAILED) munmap(rows, n * sizeof(float));
        if (bits != MAP_FAILED) munmap(bits, scan_bitmap_bytes(n));
        return;
    }
    const size_t picks[] = {5, ((size_t)1 << 32) - 1, ((size_t)1 << 32) + 3, n - 1};
    for (size_t i = 0; i < 4; i++) {
        rows[picks[i]] = (float)(i + 1);
        scan_bitmap_set(bits, picks[i], true);
    }
    float query = 1;
    scan_hit hits[5];
    size_t n_hits = 0;
    scan_params p = params_for(SCAN_ISA_AUTO, 2, bits);
    CHECK(scan_topk(rows, n, 1, &query, 5, &p, hits, &n_hits) == 0, "%s", err_get());
    CHECK(n_hits == 4 && hits[0].row == n - 1 && hits[1].row == picks[2] &&
              hits[2].row == picks[1] && hits[3].row == 5 && hits[0].score == 4.0f,
          "rows past 2^32: %zu hits, first row %zu", n_hits, hits[0].row);
    munmap(bits, scan_bitmap_bytes(n));
    munmap(rows, n * sizeof(float));
}

static void test_bandwidth(void)
{
    double bw = 0;
    CHECK(scan_measure_bandwidth(NULL, 8u << 20, pools[2], SCAN_ISA_AUTO, 2, &bw) == 0 && bw > 0,
          "bandwidth: %s", err_get());
    float buffer[4096];
    for (int i = 0; i < 4096; i++) buffer[i] = (float)i;
    for (int i = 0; i < n_isas; i++)
        CHECK(scan_measure_bandwidth(buffer, sizeof buffer - 4, NULL, isas[i], 1, &bw) == 0 &&
                  bw > 0,
              "bandwidth on %s: %s", scan_isa_name(isas[i]), err_get());
    CHECK(scan_measure_bandwidth(NULL, 100, NULL, SCAN_ISA_AUTO, 1, &bw) ==
              EMBEDRAG_ERR_INVALID_ARGUMENT,
          "too small");
    CHECK(scan_measure_bandwidth(NULL, 8192, NULL, SCAN_ISA_AUTO, 0, &bw) ==
              EMBEDRAG_ERR_INVALID_ARGUMENT,
          "no repeats");
}

static void test_isa_choice(void)
{
    const char *forced = getenv("EMBEDRAG_CPU_ISA");
    CHECK(scan_isa_supported(scan_isa()), "the chosen set runs here");
    if (forced && strcmp(forced, "generic") == 0)
        CHECK(scan_isa() == SCAN_ISA_GENERIC, "EMBEDRAG_CPU_ISA=generic: %s",
              scan_isa_name(scan_isa()));
    if (forced && strcmp(forced, "avx2") == 0 && scan_isa_supported(SCAN_ISA_AVX2))
        CHECK(scan_isa() == SCAN_ISA_AVX2, "EMBEDRAG_CPU_ISA=avx2: %s", scan_isa_name(scan_isa()));
    CHECK(scan_isa_supported(SCAN_ISA_GENERIC) && !scan_isa_supported(9), "supported sets");
    CHECK(strcmp(scan_isa_name(SCAN_ISA_AVX512), "avx512") == 0, "names");
}

int main(void)
{
    const int all[] = {SCAN_ISA_GENERIC, SCAN_ISA_AVX2, SCAN_ISA_AVX512};
    for (int i = 0; i < 3; i++)
        if (scan_isa_supported(all[i])) isas[n_isas++] = all[i];
    printf("scan: %s chosen; testing", scan_isa_name(scan_isa()));
    for (int i = 0; i < n_isas; i++) printf(" %s", scan_isa_name(isas[i]));
    printf("\n");
    for (int t = 2; t <= 3; t++)
        if (threadpool_create(t, &pools[t]) != 0) {
            fprintf(stderr, "threadpool_create: %s\n", err_get());
            return 1;
        }

    test_isa_choice();
    test_edge_cases();
    const size_t dims[] = {1, 7, 16, 17, 383, 384, 768};
    for (size_t d = 0; d < sizeof dims / sizeof *dims; d++) {
        test_matches_reference(dims[d] < 16 ? 300 : 3000, dims[d], false, NULL);
        test_matches_reference(2000, dims[d], true, NULL);
    }
    test_matches_reference(1, 384, false, NULL);
    test_matches_reference(99, 384, true, NULL);
    test_large_matrix(false);
    test_large_matrix(true);
    test_batch_matches_single(5000, 384, 70, 10, NULL);
    test_batch_matches_single(3000, 383, 7, 100, NULL);
    test_batch_matches_single(2000, 17, 5, 1, NULL);
    /* k so large that the heaps of 64 queries would pass SCAN_HEAP_BUDGET_BYTES (8 MB): the
     * batch shares each pass among fewer queries. */
    test_batch_matches_single(9000, 4, 66, 9000, NULL);
    test_filters();
    test_filter_reads_only_allowed_rows();
    test_every_row_found();
    test_ties_go_to_the_lower_row();
    test_nan_and_infinity();
    test_rows_past_4g();
    test_bandwidth();

    threadpool_destroy(pools[2]);
    threadpool_destroy(pools[3]);
    return check_finish("test_scan");
}
