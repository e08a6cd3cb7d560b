/* Times the quantized search (src/store/quant.h) and measures its recall@k against the exact scan
 * (scan_topk_batch) on the same vectors: the build, then single queries (p50 and p90 over
 * --queries calls after a warm-up) for each thread count from 1 to --threads and each shortlist
 * of --shortlists (0: the codes' calibrated one). Prints one JSON object per line.
 *
 *   embedrag_quant_bench [--n N] [--dim D] [--k K] [--queries Q] [--threads T]
 *                        [--kind uniform|clustered|anisotropic] [--mode auto|bits|cascade|int8]
 *                        [--shortlists L1,L2,...] [--shortlist-int8 L] [--query-bits B]
 *                        [--int8 auto|on|off] [--calibration S] [--no-center] [--no-factor]
 *                        [--global-scale] [--isa generic|avx2|avx512|avx512vnni]
 *
 * Vectors are drawn as bench/peers/search_peers.py draws them: uniform on the sphere, or
 * clustered: 1,000 centres uniform on the sphere, a row a random centre plus gaussian noise of
 * norm ~1 (two rows of one cluster have a cosine of ~0.5), normalized; queries the same way with
 * their own random numbers. anisotropic adds one direction shared by every row and query (norm
 * 1.5 against the centre's 1), as real embeddings share one: rows then differ mostly in a few
 * dimensions around a common mean. Gaussians are sums of four uniforms (enough for this). */
#include "store/quant.h"
#include "store/scan.h"
#include "util/clock.h"
#include "util/error.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define BENCH_CLUSTERS 1000
#define BENCH_SPREAD 1.0f
#define BENCH_SHARED 1.5f
#define BENCH_MAX_SHORTLISTS 16

/* xorshift64*, one stream per purpose so the queries do not depend on n. */
static float uniform(uint64_t *state)
{
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    uint64_t x = *state * 0x2545F4914F6CDD1Dull;
    return (float)((double)(x >> 40) / (double)(1ull << 23)) - 1.0f;
}

/* Mean 0, variance 1: four uniforms of variance 1/3. */
static float gaussian(uint64_t *state)
{
    return (uniform(state) + uniform(state) + uniform(state) + uniform(state)) * 0.8660254f;
}

static void normalize(float *v, size_t dim)
{
    double s = 0;
    for (size_t j = 0; j < dim; j++) s += (double)v[j] * v[j];
    float inv = s > 0 ? (float)(1.0 / sqrt(s)) : 0.0f;
    for (size_t j = 0; j < dim; j++) v[j] *= inv;
}

typedef enum { KIND_UNIFORM, KIND_CLUSTERED, KIND_ANISOTROPIC } vector_kind;

static void fill(float *m, size_t n, size_t dim, vector_kind kind, const float *centres,
                 const float *shared, uint64_t *state)
{
    float sd = BENCH_SPREAD / sqrtf((float)dim);
    for (size_t i = 0; i < n; i++) {
        float *v = m + i * dim;
        if (kind == KIND_UNIFORM) {
            for (size_t j = 0; j < dim; j++) v[j] = gaussian(state);
        } else {
            size_t c = (size_t)((uniform(state) + 1.0f) * 0.5f * BENCH_CLUSTERS) % BENCH_CLUSTERS;
            for (size_t j = 0; j < dim; j++)
                v[j] = centres[c * dim + j] + sd * gaussian(state) +
                       (kind == KIND_ANISOTROPIC ? BENCH_SHARED * shared[j] : 0.0f);
        }
        normalize(v, dim);
    }
}

static int compare_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static const char *text_option(int argc, char **argv, const char *name, const char *fallback)
{
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], name) == 0) return argv[i + 1];
    return fallback;
}

static long option(int argc, char **argv, const char *name, long fallback)
{
    const char *t = text_option(argc, argv, name, NULL);
    return t ? strtol(t, NULL, 10) : fallback;
}

static bool flag(int argc, char **argv, const char *name)
{
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], name) == 0) return true;
    return false;
}

static int fail(const char *what)
{
    fprintf(stderr, "quant_bench: %s: %s\n", what, err_get());
    return 1;
}

int main(int argc, char **argv)
{
    size_t n = (size_t)option(argc, argv, "--n", 100000);
    size_t dim = (size_t)option(argc, argv, "--dim", 384);
    size_t k = (size_t)option(argc, argv, "--k", 10);
    size_t n_queries = (size_t)option(argc, argv, "--queries", 200);
    int max_threads = (int)option(argc, argv, "--threads", threadpool_online_cores());
    const char *kind_name = text_option(argc, argv, "--kind", "clustered");
    vector_kind kind = strcmp(kind_name, "uniform") == 0       ? KIND_UNIFORM
                       : strcmp(kind_name, "anisotropic") == 0 ? KIND_ANISOTROPIC
                                                               : KIND_CLUSTERED;
    const char *mode_name = text_option(argc, argv, "--mode", "auto");
    quant_params qp = quant_default_params();
    qp.mode = strcmp(mode_name, "bits") == 0      ? QUANT_MODE_BITS
              : strcmp(mode_name, "cascade") == 0 ? QUANT_MODE_CASCADE
              : strcmp(mode_name, "int8") == 0    ? QUANT_MODE_INT8
                                                  : QUANT_MODE_AUTO;
    qp.shortlist_int8 = (size_t)option(argc, argv, "--shortlist-int8", 0);
    qp.query_bits = (int)option(argc, argv, "--query-bits", 0);
    const char *isa_name = text_option(argc, argv, "--isa", NULL);
    if (isa_name)
        qp.isa = strcmp(isa_name, "generic") == 0  ? QUANT_ISA_GENERIC
                 : strcmp(isa_name, "avx2") == 0   ? QUANT_ISA_AVX2
                 : strcmp(isa_name, "avx512") == 0 ? QUANT_ISA_AVX512
                                                   : QUANT_ISA_AVX512_VNNI;
    quant_build_params bp = quant_default_build_params();
    const char *int8_name = text_option(argc, argv, "--int8", "auto");
    bp.int8 = strcmp(int8_name, "on") == 0    ? QUANT_INT8_ON
              : strcmp(int8_name, "off") == 0 ? QUANT_INT8_OFF
                                              : QUANT_INT8_AUTO;
    bp.calibration_queries = (int)option(argc, argv, "--calibration", QUANT_CALIBRATION_QUERIES);
    bp.isa = qp.isa;
    if (flag(argc, argv, "--no-center")) bp.flags |= QUANT_BUILD_NO_CENTER;
    if (flag(argc, argv, "--no-factor")) bp.flags |= QUANT_BUILD_NO_ROW_FACTOR;
    if (flag(argc, argv, "--global-scale")) bp.flags |= QUANT_BUILD_INT8_GLOBAL_SCALE;
    size_t shortlists[BENCH_MAX_SHORTLISTS] = {0};
    int n_shortlists = 0;
    for (const char *s = text_option(argc, argv, "--shortlists", "0");
         *s && n_shortlists < BENCH_MAX_SHORTLISTS;) {
        char *end;
        shortlists[n_shortlists++] = (size_t)strtoul(s, &end, 10);
        s = *end == ',' ? end + 1 : end;
        if (end == s && *s != '\0') break;
    }
    if (n == 0 || dim == 0 || k == 0 || n_queries == 0 || max_threads < 1) {
        fprintf(stderr, "quant_bench: --n, --dim, --k, --queries, --threads must be positive\n");
        return 2;
    }

    size_t bytes = n * dim * sizeof(float);
    float *matrix = NULL;
    if (posix_memalign((void **)&matrix, 2u << 20, bytes) != 0) return fail("matrix");
    madvise(matrix, bytes, MADV_HUGEPAGE);
    float *centres = malloc((size_t)BENCH_CLUSTERS * dim * sizeof(float));
    float *shared = malloc(dim * sizeof(float));
    float *queries = malloc(n_queries * dim * sizeof(float));
    scan_hit *truth = malloc(n_queries * k * sizeof(scan_hit));
    size_t *n_truth = malloc(n_queries * sizeof(size_t));
    scan_hit *hits = malloc(k * sizeof(scan_hit));
    double *times = malloc(n_queries * sizeof(double));
    threadpool *pool = NULL;
    if (!centres || !shared || !queries || !truth || !n_truth || !hits || !times ||
        threadpool_create(max_threads, &pool) != 0)
        return fail("allocation");
    uint64_t centre_state = 0x243F6A8885A308D3ull, row_state = 0x13198A2E03707344ull,
             query_state = 0xA4093822299F31D0ull;
    fill(centres, BENCH_CLUSTERS, dim, KIND_UNIFORM, NULL, NULL, &centre_state);
    fill(shared, 1, dim, KIND_UNIFORM, NULL, NULL, &centre_state);
    double t0 = clock_seconds();
    fill(matrix, n, dim, kind, centres, shared, &row_state);
    fill(queries, n_queries, dim, kind, centres, shared, &query_state);
    fprintf(stderr, "quant_bench: %zu x %zu %s vectors made in %.1f s\n", n, dim, kind_name,
            clock_seconds() - t0);

    /* The truth, and the build, on every thread. */
    scan_params sp = scan_default_params();
    sp.pool = pool;
    t0 = clock_seconds();
    if (scan_topk_batch(matrix, n, dim, queries, n_queries, k, &sp, truth, n_truth) != 0)
        return fail("scan_topk_batch");
    fprintf(stderr, "quant_bench: exact top %zu of %zu queries in %.2f s\n", k, n_queries,
            clock_seconds() - t0);
    bp.pool = pool;
    quant_codes *codes = NULL;
    t0 = clock_seconds();
    if (quant_codes_build(matrix, n, dim, &bp, &codes) != 0) return fail("quant_codes_build");
    double build_s = clock_seconds() - t0;
    quant_codes_info info;
    quant_codes_get_info(codes, &info);
    printf("{\"build\": true, \"n\": %zu, \"dim\": %zu, \"kind\": \"%s\", \"threads\": %d, "
           "\"build_s\": %.3f, \"shortlist\": %zu, \"calibrated_recall\": %.4f, \"int8\": %s, "
           "\"mb\": %.1f, \"flags\": %u}\n",
           n, dim, kind_name, max_threads, build_s, info.shortlist, info.calibrated_recall,
           info.has_int8 ? "true" : "false", (double)info.bytes / 1e6, info.flags);
    fflush(stdout);

    for (int threads = 1; threads <= max_threads; threads++) {
        threadpool *run_pool = NULL;
        if (threads > 1 && threadpool_create(threads, &run_pool) != 0) return fail("pool");
        qp.pool = run_pool;
        for (int s = 0; s < n_shortlists; s++) {
            qp.shortlist = shortlists[s];
            size_t found = 0, wanted = 0, score_mismatches = 0;
            for (size_t q = 0; q < 3; q++) /* warm-up */
                if (quant_search(codes, matrix, n, dim, queries + q % n_queries * dim, k, &qp, hits,
                                 &(size_t){0}) != 0)
                    return fail("quant_search");
            for (size_t q = 0; q < n_queries; q++) {
                size_t n_hits = 0;
                double start = clock_seconds();
                if (quant_search(codes, matrix, n, dim, queries + q * dim, k, &qp, hits, &n_hits) !=
                    0)
                    return fail("quant_search");
                times[q] = clock_seconds() - start;
                const scan_hit *t = truth + q * k;
                wanted += n_truth[q];
                for (size_t i = 0; i < n_hits; i++)
                    for (size_t j = 0; j < n_truth[q]; j++)
                        if (hits[i].row == t[j].row) {
                            found++;
                            score_mismatches += memcmp(&hits[i].score, &t[j].score, 4) != 0;
                        }
            }
            qsort(times, n_queries, sizeof(double), compare_double);
            printf("{\"n\": %zu, \"kind\": \"%s\", \"mode\": \"%s\", \"isa\": \"%s\", "
                   "\"threads\": %d, \"shortlist\": %zu, \"query_bits\": %d, \"ms_p50\": %.3f, "
                   "\"ms_p90\": %.3f, \"recall\": %.4f, \"score_mismatches\": %zu}\n",
                   n, kind_name, mode_name,
                   quant_isa_name(qp.isa == QUANT_ISA_AUTO ? quant_isa() : qp.isa), threads,
                   qp.shortlist ? qp.shortlist : info.shortlist,
                   qp.query_bits ? qp.query_bits : QUANT_QUERY_BITS, times[n_queries / 2] * 1e3,
                   times[n_queries * 9 / 10] * 1e3, wanted ? (double)found / (double)wanted : 1.0,
                   score_mismatches);
            fflush(stdout);
        }
        threadpool_destroy(run_pool);
    }
    quant_codes_free(codes);
    threadpool_destroy(pool);
    free(times);
    free(hits);
    free(n_truth);
    free(truth);
    free(queries);
    free(shared);
    free(centres);
    free(matrix);
    return 0;
}
