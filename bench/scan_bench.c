/* Times the exact dense scan (src/store/scan.h) against the memory bandwidth measured in the same
 * run on the same matrix: single-query latency (best and median of --repeat calls after a
 * warm-up) and batch throughput, for each thread count from 1 to --threads. Vectors are random
 * and L2-normalized, uniform or clustered (--clustered); the timings do not depend on which.
 * Prints one JSON object per thread count.
 *
 *   embedrag_scan_bench [--n N] [--dim D] [--k K] [--threads T] [--repeat R] [--batch M]
 *                       [--isa generic|avx2|avx512] [--clustered] [--hugepages]
 *                       [--filter PERCENT]
 * --hugepages asks for transparent huge pages on the matrix (madvise), as a store could;
 * --filter allows a random PERCENT of the rows (a bitmap, as a metadata filter would). */
#include "store/scan.h"
#include "util/error.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

/* Clusters of --clustered, and their spread around a centre (per coordinate, before
 * normalizing). */
#define BENCH_CLUSTERS 1000
#define BENCH_CLUSTER_SPREAD 0.35f

static double now_seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static uint64_t bench_rng = 0x243F6A8885A308D3ull;

/* xorshift64*, seeded the same on every run: uniform in [-1, 1). */
static float bench_uniform(void)
{
    bench_rng ^= bench_rng >> 12;
    bench_rng ^= bench_rng << 25;
    bench_rng ^= bench_rng >> 27;
    uint64_t x = bench_rng * 0x2545F4914F6CDD1Dull;
    return (float)((double)(x >> 40) / (double)(1ull << 23)) - 1.0f;
}

static void normalize(float *v, size_t dim)
{
    double s = 0;
    for (size_t j = 0; j < dim; j++) s += (double)v[j] * v[j];
    float inv = s > 0 ? (float)(1.0 / sqrt(s)) : 0.0f;
    for (size_t j = 0; j < dim; j++) v[j] *= inv;
}

static void fill_vectors(float *m, size_t n, size_t dim, bool clustered, const float *centres)
{
    for (size_t i = 0; i < n; i++) {
        float *v = m + i * dim;
        const float *c = clustered ? centres + (i * 7919 % BENCH_CLUSTERS) * dim : NULL;
        for (size_t j = 0; j < dim; j++)
            v[j] = c ? c[j] + BENCH_CLUSTER_SPREAD * bench_uniform() : bench_uniform();
        normalize(v, dim);
    }
}

static int compare_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static long option(int argc, char **argv, const char *name, long fallback)
{
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], name) == 0) return strtol(argv[i + 1], NULL, 10);
    return fallback;
}

static bool flag(int argc, char **argv, const char *name)
{
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], name) == 0) return true;
    return false;
}

int main(int argc, char **argv)
{
    size_t n = (size_t)option(argc, argv, "--n", 100000);
    size_t dim = (size_t)option(argc, argv, "--dim", 384);
    size_t k = (size_t)option(argc, argv, "--k", 10);
    int max_threads = (int)option(argc, argv, "--threads", threadpool_online_cores());
    int repeat = (int)option(argc, argv, "--repeat", 20);
    size_t batch = (size_t)option(argc, argv, "--batch", 64);
    bool clustered = flag(argc, argv, "--clustered");
    long filter = option(argc, argv, "--filter", 100);
    int isa = SCAN_ISA_AUTO;
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], "--isa") == 0)
            isa = strcmp(argv[i + 1], "generic") == 0 ? SCAN_ISA_GENERIC
                  : strcmp(argv[i + 1], "avx2") == 0  ? SCAN_ISA_AVX2
                                                      : SCAN_ISA_AVX512;
    if (isa == SCAN_ISA_AUTO) isa = scan_isa();
    if (n == 0 || dim == 0 || k == 0 || max_threads < 1 || repeat < 1) {
        fprintf(stderr, "scan_bench: --n, --dim, --k, --threads and --repeat must be positive\n");
        return 2;
    }

    size_t bytes = n * dim * sizeof(float);
    float *matrix = NULL;
    if (posix_memalign((void **)&matrix, 2u << 20, bytes) != 0) {
        fprintf(stderr, "scan_bench: out of memory for %zu bytes\n", bytes);
        return 1;
    }
    if (flag(argc, argv, "--hugepages")) madvise(matrix, bytes, MADV_HUGEPAGE);
    float *centres = malloc((size_t)BENCH_CLUSTERS * dim * sizeof(float));
    float *queries = malloc(batch * dim * sizeof(float));
    scan_hit *hits = malloc(batch * k * sizeof(scan_hit));
    size_t *n_hits = malloc(batch * sizeof(size_t));
    double *times = malloc((size_t)repeat * sizeof(double));
    if (!centres || !queries || !hits || !n_hits || !times) {
        fprintf(stderr, "scan_bench: out of memory\n");
        return 1;
    }
    uint8_t *allowed = NULL;
    if (filter < 100) {
        allowed = calloc(scan_bitmap_bytes(n), 1);
        if (!allowed) return 1;
        for (size_t i = 0; i < n; i++)
            scan_bitmap_set(allowed, i, (long)(bench_uniform() * 50.0f + 50.0f) < filter);
    }
    fill_vectors(centres, BENCH_CLUSTERS, dim, false, NULL);
    double t0 = now_seconds();
    fill_vectors(matrix, n, dim, clustered, centres);
    fill_vectors(queries, batch, dim, clustered, centres);
    fprintf(stderr, "scan_bench: %zu x %zu vectors (%.0f MB) made in %.1f s\n", n, dim,
            (double)bytes / 1e6, now_seconds() - t0);

    for (int threads = 1; threads <= max_threads; threads++) {
        threadpool *pool = NULL;
        if (threadpool_create(threads, &pool) != 0) {
            fprintf(stderr, "scan_bench: %s\n", err_get());
            return 1;
        }
        scan_params p = scan_default_params();
        p.pool = pool;
        p.isa = isa;
        p.allowed = allowed;
        double bandwidth = 0;
        if (scan_measure_bandwidth(matrix, bytes, pool, isa, repeat, &bandwidth) != 0) {
            fprintf(stderr, "scan_bench: %s\n", err_get());
            return 1;
        }
        for (int r = -2; r < repeat; r++) { /* two warm-up calls */
            double start = now_seconds();
            if (scan_topk(matrix, n, dim, queries + (size_t)(r + 2) % batch * dim, k, &p, hits,
                          n_hits) != 0) {
                fprintf(stderr, "scan_bench: %s\n", err_get());
                return 1;
            }
            if (r >= 0) times[r] = now_seconds() - start;
        }
        qsort(times, (size_t)repeat, sizeof(double), compare_double);
        double best = times[0], median = times[repeat / 2];
        /* Batch: a few passes of `batch` queries, the best. */
        double batch_best = INFINITY;
        for (int r = 0; r < 3; r++) {
            double start = now_seconds();
            if (scan_topk_batch(matrix, n, dim, queries, batch, k, &p, hits, n_hits) != 0) {
                fprintf(stderr, "scan_bench: %s\n", err_get());
                return 1;
            }
            double s = now_seconds() - start;
            batch_best = s < batch_best ? s : batch_best;
        }
        printf("{\"n\": %zu, \"dim\": %zu, \"k\": %zu, \"threads\": %d, \"isa\": \"%s\", "
               "\"vectors\": \"%s\", \"filter_percent\": %ld, \"bandwidth_gb_s\": %.2f, "
               "\"single_ms_best\": %.3f, "
               "\"single_ms_median\": %.3f, \"single_gb_s_best\": %.2f, "
               "\"fraction_of_bandwidth\": %.3f, \"batch\": %zu, \"batch_ms\": %.2f, "
               "\"batch_queries_per_s\": %.1f, \"batch_gflop_s\": %.1f}\n",
               n, dim, k, threads, scan_isa_name(isa), clustered ? "clustered" : "uniform", filter,
               bandwidth / 1e9, best * 1e3, median * 1e3, (double)bytes / best / 1e9,
               (double)bytes / best / bandwidth, batch, batch_best * 1e3,
               (double)batch / batch_best,
               2.0 * (double)batch * (double)n * (double)dim / batch_best / 1e9);
        fflush(stdout);
        threadpool_destroy(pool);
    }
    free(allowed);
    free(times);
    free(n_hits);
    free(hits);
    free(queries);
    free(centres);
    free(matrix);
    return 0;
}
