/* Exact dense search (see scan.h): each task of a thread pool scans a contiguous range of rows in
 * blocks, SIMD dot products for a tile of rows x queries at a time, then keeps the best k of its
 * range in a heap per query; the heaps are merged at the end. A row's score is computed the same
 * way by every instruction set (16 lanes of fused multiply-adds, then a fixed pairwise sum), so
 * results never depend on the machine, the thread count or the neighbouring rows. */
#include "store/scan.h"

#include "util/cpu_features.h"
#include "util/clock.h"
#include "util/error.h"
#include "util/memory.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define SCAN_X86 1
#include <immintrin.h>
#endif

/* Lanes of a row's sum: element e is accumulated in lane e % SCAN_LANES, one AVX-512 register.
 * The AVX2 kernels hold the same lanes in two registers and the portable one in an array. */
#define SCAN_LANES 16
/* Rows scored between two selections: the scores of a block for SCAN_BATCH_QUERIES queries
 * (16 KB) stay on the stack, and the block's rows stay in L2 while the queries of a batch pass
 * over them. A block is also at most SCAN_BLOCK_BYTES of rows (96 KB, 64 rows of 384 floats),
 * well inside the 1-2 MB of L2 per core of the machines here. */
#define SCAN_BLOCK_ROWS 64
#define SCAN_BLOCK_BYTES (96 * 1024)
#define SCAN_MIN_BLOCK_ROWS 4
/* A filtered block where at least this many percent of the rows are allowed is read whole, as
 * one stream, and the rows not allowed are dropped at selection; sparser blocks read only their
 * allowed rows. Measured on Zen 4, 1M x 384, one thread: a row picked out of a random filter
 * costs about 2.3 times a row of the stream (0.17 against 0.075 us; software prefetch of the
 * next rows changed nothing measurable), so reading everything wins above ~45%; 40% is the
 * nearest round number below. */
#define SCAN_DENSE_FILTER_PERCENT 40
/* Batches of more queries than this (more than one pass over a block) fetch the next block while
 * they compute. */
#define SCAN_PREFETCH_MIN_QUERIES 4
/* A pool of T threads splits each query's rows into T * SCAN_TASKS_PER_THREAD contiguous
 * ranges, claimed dynamically, so a thread slowed by another process on its core leaves its
 * remaining ranges to the others; ranges are at least SCAN_MIN_TASK_ROWS rows (below that the
 * wake-up of the pool costs more than the rows). */
#define SCAN_TASKS_PER_THREAD 4
#define SCAN_MIN_TASK_ROWS 4096
/* The per-task heaps of one batch group (tasks x queries x k entries) stay below this; a batch
 * with a large k shares the matrix pass among fewer queries. */
#define SCAN_HEAP_BUDGET_BYTES ((size_t)8 << 20)
/* Below this a bandwidth measurement is mostly overhead. */
#define SCAN_MIN_BANDWIDTH_BYTES 4096

/* ---- instruction set ------------------------------------------------------------------------ */

static int chosen_isa = SCAN_ISA_GENERIC;
static pthread_once_t chosen_isa_once = PTHREAD_ONCE_INIT;

bool scan_isa_supported(int isa)
{
    const cpu_features *f = cpu_features_get();
    switch (isa) {
    case SCAN_ISA_AUTO:
    case SCAN_ISA_GENERIC:
        return true;
    case SCAN_ISA_AVX2:
        return f->avx2 && f->fma;
    case SCAN_ISA_AVX512:
        /* What SCAN_AVX512_TARGET compiles for (the 256-bit extract is AVX512DQ). */
        return f->avx512f && f->avx512dq && f->fma;
    default:
        return false;
    }
}

static void choose_isa(void)
{
    const char *forced = getenv("EMBEDRAG_CPU_ISA");
    if (forced && strcmp(forced, "generic") == 0)
        chosen_isa = SCAN_ISA_GENERIC;
    else if (forced && strcmp(forced, "avx2") == 0 && scan_isa_supported(SCAN_ISA_AVX2))
        chosen_isa = SCAN_ISA_AVX2;
    else if (scan_isa_supported(SCAN_ISA_AVX512))
        chosen_isa = SCAN_ISA_AVX512;
    else if (scan_isa_supported(SCAN_ISA_AVX2))
        chosen_isa = SCAN_ISA_AVX2;
    else
        chosen_isa = SCAN_ISA_GENERIC;
}

int scan_isa(void)
{
    pthread_once(&chosen_isa_once, choose_isa);
    return chosen_isa;
}

const char *scan_isa_name(int isa)
{
    switch (isa) {
    case SCAN_ISA_AUTO:
        return "auto";
    case SCAN_ISA_GENERIC:
        return "generic";
    case SCAN_ISA_AVX2:
        return "avx2";
    case SCAN_ISA_AVX512:
        return "avx512";
    default:
        return "unknown";
    }
}

/* ---- dot-product kernels -------------------------------------------------------------------- */

/* A block of rows (given by index, ascending) against a group of queries:
 * scores[q * SCAN_BLOCK_ROWS + i] = <rows[index[i]], queries[q]>. */
typedef struct scan_block {
    const float *rows;
    size_t dim;
    const size_t *index;
    int count;
    const float *queries;
    int n_queries;
    float *scores;
    /* Bytes the next block will read, when contiguous (else NULL): a batch's later passes, which
     * compute from cache, fetch them a few lines per tile, so the next first pass finds them in
     * cache too and memory time hides behind arithmetic. */
    const char *next;
    size_t next_bytes;
} scan_block;

typedef void (*scan_dots_fn)(const scan_block *b);

/* The portable kernel: the same lanes and the same pairwise sum as the SIMD ones, with fmaf
 * (one rounding, as their fused multiply-adds), one row and query at a time. */
static float dot_generic(const float *x, const float *y, size_t dim)
{
    float lanes[SCAN_LANES] = {0};
    size_t e = 0;
    for (; e + SCAN_LANES <= dim; e += SCAN_LANES)
        for (int l = 0; l < SCAN_LANES; l++) lanes[l] = fmaf(x[e + l], y[e + l], lanes[l]);
    for (int l = 0; e + (size_t)l < dim; l++) lanes[l] = fmaf(x[e + l], y[e + l], lanes[l]);
    for (int width = SCAN_LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++) lanes[l] = lanes[l] + lanes[l + width];
    return lanes[0];
}

static void dots_generic(const scan_block *b)
{
    for (int q = 0; q < b->n_queries; q++)
        for (int i = 0; i < b->count; i++)
            b->scores[q * SCAN_BLOCK_ROWS + i] = dot_generic(
                b->rows + b->index[i] * b->dim, b->queries + (size_t)q * b->dim, b->dim);
}

#ifdef SCAN_X86
#define SCAN_AVX512_TARGET __attribute__((target("avx512f,avx512dq,fma")))
#define SCAN_AVX2_TARGET __attribute__((target("avx2,fma")))
#define SCAN_INLINE static inline __attribute__((always_inline))

/* The lanes' pairwise sum, in the order of dot_generic: lane i + lane i+8, then i + i+4, i + i+2,
 * and lane 0 + lane 1. */
SCAN_INLINE SCAN_AVX512_TARGET float reduce_avx512(__m512 v)
{
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 g = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    g = _mm_add_ps(g, _mm_movehl_ps(g, g));
    g = _mm_add_ss(g, _mm_movehdup_ps(g));
    return _mm_cvtss_f32(g);
}

/* reduce_avx512 of the 16 accumulators of a 4 x 4 tile at once, the same additions of the same
 * pairs, 4 registers of sums combined per step: 15 additions and 30 shuffles instead of 64 and
 * 64. Element 4 q + r of the result is acc[r][q]'s sum. */
SCAN_INLINE SCAN_AVX512_TARGET __m512 reduce16_avx512(__m512 acc[4][4])
{
    __m512 c[8], e[4], g[2];
    /* Lane i + lane i+8: two sums of 8 per register (a in the lower half, b in the upper). */
#pragma GCC unroll 8
    for (int p = 0; p < 8; p++) {
        __m512 a = acc[p / 2][(2 * p) % 4], b = acc[p / 2][(2 * p) % 4 + 1];
        c[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
    }
    /* Lane i + lane i+4: four sums of 4 per register, one per 128-bit quarter. */
#pragma GCC unroll 4
    for (int p = 0; p < 4; p++)
        e[p] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * p], c[2 * p + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(c[2 * p], c[2 * p + 1], _MM_SHUFFLE(3, 1, 3, 1)));
        /* Lane i + lane i+2 within quarters, then lane 0 + lane 1. */
#pragma GCC unroll 2
    for (int p = 0; p < 2; p++)
        g[p] = _mm512_add_ps(_mm512_shuffle_ps(e[2 * p], e[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(e[2 * p], e[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_ps(g[0], g[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(g[0], g[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Rows ROWS x queries QUERIES, one register of lanes each, in registers for the whole row (4 x 4
 * uses 16 accumulators + 4 rows + 1 query of the 32 zmm registers). Lanes past dim are left as
 * they are (a masked multiply-add), so they add nothing, not even the sign of a zero. */
#define SCAN_AVX512_TILE_ROWS 4
#define SCAN_AVX512_TILE_QUERIES 4
SCAN_INLINE SCAN_AVX512_TARGET void tile_avx512(const int ROWS, const int QUERIES,
                                                const scan_block *b, int i, int q0)
{
    const size_t dim = b->dim;
    const float *x[SCAN_AVX512_TILE_ROWS], *y[SCAN_AVX512_TILE_QUERIES];
    __m512 acc[SCAN_AVX512_TILE_ROWS][SCAN_AVX512_TILE_QUERIES];
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; r++) x[r] = b->rows + b->index[i + r] * dim;
#pragma GCC unroll 4
    for (int q = 0; q < QUERIES; q++) y[q] = b->queries + (size_t)(q0 + q) * dim;
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; r++)
#pragma GCC unroll 4
        for (int q = 0; q < QUERIES; q++) acc[r][q] = _mm512_setzero_ps();
    size_t e = 0;
    for (; e + SCAN_LANES <= dim; e += SCAN_LANES) {
        __m512 xv[SCAN_AVX512_TILE_ROWS];
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++) {
            xv[r] = _mm512_loadu_ps(x[r] + e);
        }
#pragma GCC unroll 4
        for (int q = 0; q < QUERIES; q++) {
            __m512 yv = _mm512_loadu_ps(y[q] + e);
#pragma GCC unroll 4
            for (int r = 0; r < ROWS; r++) acc[r][q] = _mm512_fmadd_ps(xv[r], yv, acc[r][q]);
        }
    }
    if (e < dim) {
        __mmask16 m = (__mmask16)((1u << (dim - e)) - 1u);
        __m512 xv[SCAN_AVX512_TILE_ROWS];
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++) xv[r] = _mm512_maskz_loadu_ps(m, x[r] + e);
#pragma GCC unroll 4
        for (int q = 0; q < QUERIES; q++) {
            __m512 yv = _mm512_maskz_loadu_ps(m, y[q] + e);
#pragma GCC unroll 4
            for (int r = 0; r < ROWS; r++)
                acc[r][q] = _mm512_mask3_fmadd_ps(xv[r], yv, acc[r][q], m);
        }
    }
    if (ROWS == 4 && QUERIES == 4) {
        __m512 sums = reduce16_avx512(acc);
        float *out = b->scores + q0 * SCAN_BLOCK_ROWS + i;
        _mm_storeu_ps(out, _mm512_castps512_ps128(sums));
        _mm_storeu_ps(out + SCAN_BLOCK_ROWS, _mm512_extractf32x4_ps(sums, 1));
        _mm_storeu_ps(out + 2 * SCAN_BLOCK_ROWS, _mm512_extractf32x4_ps(sums, 2));
        _mm_storeu_ps(out + 3 * SCAN_BLOCK_ROWS, _mm512_extractf32x4_ps(sums, 3));
        return;
    }
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; r++)
#pragma GCC unroll 4
        for (int q = 0; q < QUERIES; q++)
            b->scores[(q0 + q) * SCAN_BLOCK_ROWS + i + r] = reduce_avx512(acc[r][q]);
}

/* Cache lines of the next block still to fetch, and how many to fetch per tile. */
typedef struct scan_prefetch {
    const char *at, *end;
    size_t per_tile;
} scan_prefetch;

/* Starts fetching b's next block over `tiles` tiles. */
SCAN_INLINE scan_prefetch prefetch_plan(const scan_block *b, size_t tiles)
{
    scan_prefetch f = {b->next, b->next ? b->next + b->next_bytes : NULL, 0};
    size_t lines = b->next_bytes / 64 + 1;
    if (b->next && tiles > 0) f.per_tile = (lines + tiles - 1) / tiles;
    return f;
}

SCAN_INLINE void prefetch_step(scan_prefetch *f)
{
    for (size_t j = 0; j < f->per_tile && f->at < f->end; j++, f->at += 64)
        _mm_prefetch(f->at, _MM_HINT_T0);
}

/* All rows of the block, a tile of ROWS at a time, against queries q0 .. q0 + QUERIES. */
SCAN_INLINE SCAN_AVX512_TARGET void tiles_avx512(const int ROWS, const int QUERIES,
                                                 const scan_block *b, int q0, scan_prefetch *f)
{
    int i = 0;
    if (ROWS > 1)
        for (; i + ROWS <= b->count; i += ROWS) {
            if (f) prefetch_step(f);
            tile_avx512(ROWS, QUERIES, b, i, q0);
        }
    for (; i < b->count; i++) tile_avx512(1, QUERIES, b, i, q0);
}

/* The first pass over a block takes the rows one at a time, in address order: one stream for the
 * hardware prefetcher (measured on Zen 4, 100k x 384: 92% of the read bandwidth against 50% for
 * four rows side by side, whose short interleaved streams it follows poorly, software prefetch
 * or not). Later passes of a batch find the block in L2 and take 4 rows x 4 queries. */
SCAN_AVX512_TARGET static void dots_avx512(const scan_block *b)
{
    int first = b->n_queries < SCAN_AVX512_TILE_QUERIES ? b->n_queries : SCAN_AVX512_TILE_QUERIES;
    switch (first) {
    case 4:
        tiles_avx512(1, 4, b, 0, NULL);
        break;
    case 3:
        tiles_avx512(1, 3, b, 0, NULL);
        break;
    case 2:
        tiles_avx512(1, 2, b, 0, NULL);
        break;
    default:
        tiles_avx512(1, 1, b, 0, NULL);
        break;
    }
    int q0 = first;
    size_t passes =
        (size_t)(b->n_queries - first + SCAN_AVX512_TILE_QUERIES - 1) / SCAN_AVX512_TILE_QUERIES;
    scan_prefetch f = prefetch_plan(b, passes * (size_t)(b->count / SCAN_AVX512_TILE_ROWS));
    for (; q0 + SCAN_AVX512_TILE_QUERIES <= b->n_queries; q0 += SCAN_AVX512_TILE_QUERIES)
        tiles_avx512(SCAN_AVX512_TILE_ROWS, SCAN_AVX512_TILE_QUERIES, b, q0, &f);
    switch (b->n_queries - q0) {
    case 3:
        tiles_avx512(SCAN_AVX512_TILE_ROWS, 3, b, q0, &f);
        break;
    case 2:
        tiles_avx512(SCAN_AVX512_TILE_ROWS, 2, b, q0, &f);
        break;
    case 1:
        tiles_avx512(SCAN_AVX512_TILE_ROWS, 1, b, q0, &f);
        break;
    default:
        break;
    }
}

/* The AVX2 kernels keep a row's 16 lanes in two registers, lo (lanes 0-7) and hi (8-15). */
SCAN_INLINE SCAN_AVX2_TARGET float reduce_avx2(__m256 lo, __m256 hi)
{
    __m256 h = _mm256_add_ps(lo, hi);
    __m128 g = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    g = _mm_add_ps(g, _mm_movehl_ps(g, g));
    g = _mm_add_ss(g, _mm_movehdup_ps(g));
    return _mm_cvtss_f32(g);
}

/* Rows x queries up to 2 x 2: 8 accumulators + 4 row registers + 2 query registers of the 16
 * ymm registers. Lanes past dim keep their value (blend) as in the AVX-512 tile. */
#define SCAN_AVX2_TILE_ROWS 2
#define SCAN_AVX2_TILE_QUERIES 2
SCAN_INLINE SCAN_AVX2_TARGET void tile_avx2(const int ROWS, const int QUERIES, const scan_block *b,
                                            int i, int q0)
{
    const size_t dim = b->dim;
    const float *x[SCAN_AVX2_TILE_ROWS], *y[SCAN_AVX2_TILE_QUERIES];
    __m256 lo[SCAN_AVX2_TILE_ROWS][SCAN_AVX2_TILE_QUERIES];
    __m256 hi[SCAN_AVX2_TILE_ROWS][SCAN_AVX2_TILE_QUERIES];
#pragma GCC unroll 2
    for (int r = 0; r < ROWS; r++) x[r] = b->rows + b->index[i + r] * dim;
#pragma GCC unroll 2
    for (int q = 0; q < QUERIES; q++) y[q] = b->queries + (size_t)(q0 + q) * dim;
#pragma GCC unroll 2
    for (int r = 0; r < ROWS; r++)
#pragma GCC unroll 2
        for (int q = 0; q < QUERIES; q++) lo[r][q] = hi[r][q] = _mm256_setzero_ps();
    size_t e = 0;
    for (; e + SCAN_LANES <= dim; e += SCAN_LANES) {
        __m256 xl[SCAN_AVX2_TILE_ROWS], xh[SCAN_AVX2_TILE_ROWS];
#pragma GCC unroll 2
        for (int r = 0; r < ROWS; r++) {
            xl[r] = _mm256_loadu_ps(x[r] + e);
            xh[r] = _mm256_loadu_ps(x[r] + e + 8);
        }
#pragma GCC unroll 2
        for (int q = 0; q < QUERIES; q++) {
            __m256 yl = _mm256_loadu_ps(y[q] + e), yh = _mm256_loadu_ps(y[q] + e + 8);
#pragma GCC unroll 2
            for (int r = 0; r < ROWS; r++) {
                lo[r][q] = _mm256_fmadd_ps(xl[r], yl, lo[r][q]);
                hi[r][q] = _mm256_fmadd_ps(xh[r], yh, hi[r][q]);
            }
        }
    }
    if (e < dim) {
        int rest = (int)(dim - e);
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        __m256i ml = _mm256_cmpgt_epi32(_mm256_set1_epi32(rest), lane);
        __m256i mh = _mm256_cmpgt_epi32(_mm256_set1_epi32(rest - 8), lane);
        __m256 fl = _mm256_castsi256_ps(ml), fh = _mm256_castsi256_ps(mh);
        __m256 xl[SCAN_AVX2_TILE_ROWS], xh[SCAN_AVX2_TILE_ROWS];
#pragma GCC unroll 2
        for (int r = 0; r < ROWS; r++) {
            xl[r] = _mm256_maskload_ps(x[r] + e, ml);
            xh[r] = _mm256_maskload_ps(x[r] + e + 8, mh);
        }
#pragma GCC unroll 2
        for (int q = 0; q < QUERIES; q++) {
            __m256 yl = _mm256_maskload_ps(y[q] + e, ml), yh = _mm256_maskload_ps(y[q] + e + 8, mh);
#pragma GCC unroll 2
            for (int r = 0; r < ROWS; r++) {
                lo[r][q] = _mm256_blendv_ps(lo[r][q], _mm256_fmadd_ps(xl[r], yl, lo[r][q]), fl);
                hi[r][q] = _mm256_blendv_ps(hi[r][q], _mm256_fmadd_ps(xh[r], yh, hi[r][q]), fh);
            }
        }
    }
#pragma GCC unroll 2
    for (int r = 0; r < ROWS; r++)
#pragma GCC unroll 2
        for (int q = 0; q < QUERIES; q++)
            b->scores[(q0 + q) * SCAN_BLOCK_ROWS + i + r] = reduce_avx2(lo[r][q], hi[r][q]);
}

SCAN_INLINE SCAN_AVX2_TARGET void tiles_avx2(const int ROWS, const int QUERIES, const scan_block *b,
                                             int q0, scan_prefetch *f)
{
    int i = 0;
    if (ROWS > 1)
        for (; i + ROWS <= b->count; i += ROWS) {
            if (f) prefetch_step(f);
            tile_avx2(ROWS, QUERIES, b, i, q0);
        }
    for (; i < b->count; i++) tile_avx2(1, QUERIES, b, i, q0);
}

/* As dots_avx512: a first pass a row at a time, then 2 x 2 tiles from cache while the next block
 * is fetched (52 GFLOP/s on one Zen 4 thread for 64 queries, against 93 for AVX-512). */
SCAN_AVX2_TARGET static void dots_avx2(const scan_block *b)
{
    int q0 = b->n_queries < SCAN_AVX2_TILE_QUERIES ? b->n_queries : SCAN_AVX2_TILE_QUERIES;
    if (q0 == 2)
        tiles_avx2(1, 2, b, 0, NULL);
    else
        tiles_avx2(1, 1, b, 0, NULL);
    size_t passes =
        (size_t)(b->n_queries - q0 + SCAN_AVX2_TILE_QUERIES - 1) / SCAN_AVX2_TILE_QUERIES;
    scan_prefetch f = prefetch_plan(b, passes * (size_t)(b->count / SCAN_AVX2_TILE_ROWS));
    for (; q0 + SCAN_AVX2_TILE_QUERIES <= b->n_queries; q0 += SCAN_AVX2_TILE_QUERIES)
        tiles_avx2(SCAN_AVX2_TILE_ROWS, SCAN_AVX2_TILE_QUERIES, b, q0, &f);
    if (q0 < b->n_queries) tiles_avx2(SCAN_AVX2_TILE_ROWS, 1, b, q0, &f);
}
#endif

static scan_dots_fn dots_for(int isa)
{
#ifdef SCAN_X86
    if (isa == SCAN_ISA_AVX512) return dots_avx512;
    if (isa == SCAN_ISA_AVX2) return dots_avx2;
#endif
    return dots_generic;
}

/* ---- selection ------------------------------------------------------------------------------ */

/* The order of results: higher score first, then lower row. Total on rows that are not NaN. */
static inline bool ranks_before(scan_hit a, scan_hit b)
{
    return a.score > b.score || (a.score == b.score && a.row < b.row);
}

/* Heaps keep their lowest-ranked entry at the root: the one a better row replaces. */
static void heap_sift_down(scan_hit *h, size_t size, size_t i)
{
    scan_hit x = h[i];
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= size) break;
        if (c + 1 < size && ranks_before(h[c], h[c + 1])) c++;
        if (!ranks_before(x, h[c])) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = x;
}

float scan_hits_offer(scan_hit *h, size_t *size, size_t cap, scan_hit x)
{
    if (*size < cap) {
        size_t i = (*size)++;
        while (i > 0) {
            size_t parent = (i - 1) / 2;
            if (!ranks_before(h[parent], x)) break;
            h[i] = h[parent];
            i = parent;
        }
        h[i] = x;
        return *size == cap ? h[0].score : -INFINITY;
    }
    if (ranks_before(x, h[0])) {
        h[0] = x;
        heap_sift_down(h, cap, 0);
    }
    return h[0].score;
}

void scan_hits_sort(scan_hit *h, size_t size)
{
    for (size_t end = size; end > 1; end--) {
        scan_hit worst = h[0];
        h[0] = h[end - 1];
        h[end - 1] = worst;
        heap_sift_down(h, end - 1, 0);
    }
}

/* ---- the scan ------------------------------------------------------------------------------- */

/* One group of queries over the whole matrix, split into `tasks` contiguous row ranges. */
typedef struct scan_job {
    const float *rows;
    size_t n, dim;
    const uint8_t *allowed;
    const float *queries;
    int n_queries;
    scan_dots_fn dots;
    int tasks;
    int block_rows;
    size_t cap;      /* entries per heap: min(k, rows of the largest range) */
    scan_hit *heaps; /* [task][query][cap] */
    size_t *sizes;   /* [task][query] */
    int max_queries; /* heaps and sizes are laid out for this many queries per task */
} scan_job;

/* First row of range t of `tasks` over n rows (t = tasks gives n); ranges differ by at most one
 * row. */
static size_t range_begin(size_t n, int tasks, int t)
{
    size_t per = n / (size_t)tasks, extra = n % (size_t)tasks;
    return per * (size_t)t + ((size_t)t < extra ? (size_t)t : extra);
}

/* Puts the allowed rows of [row, stop) into index (at most SCAN_BLOCK_ROWS) and returns how
 * many. Whole 64-row words and bytes of the bitmap are taken at once, so a sparse filter costs a
 * load per 64 rows it rejects. */
static int allowed_rows(const uint8_t *allowed, size_t row, size_t stop, size_t *index)
{
    int count = 0;
    if (!allowed) {
        for (size_t r = row; r < stop; r++) index[count++] = r;
        return count;
    }
    size_t r = row;
    while (r < stop) {
        if (r % 64 == 0 && r + 64 <= stop) {
            uint64_t word;
            memcpy(&word, allowed + r / 8, sizeof word);
            /* Little-endian: bit (r % 8) of byte r / 8 is bit r % 64 of the word. */
            for (int j = 0; j < 8; j++)
                for (uint32_t byte = (word >> (8 * j)) & 0xFFu; byte; byte &= byte - 1)
                    index[count++] = r + 8 * (size_t)j + (size_t)__builtin_ctz(byte);
            r += 64;
        } else if (r % 8 == 0 && r + 8 <= stop) {
            for (uint32_t byte = allowed[r / 8]; byte; byte &= byte - 1)
                index[count++] = r + (size_t)__builtin_ctz(byte);
            r += 8;
        } else {
            if (scan_bitmap_get(allowed, r)) index[count++] = r;
            r++;
        }
    }
    return count;
}

static void scan_task(void *ctx, int task, int thread)
{
    const scan_job *job = ctx;
    size_t begin = range_begin(job->n, job->tasks, task);
    size_t end = range_begin(job->n, job->tasks, task + 1);
    int nq = job->n_queries;
    scan_hit *heaps = job->heaps + (size_t)task * (size_t)job->max_queries * job->cap;
    size_t *sizes = job->sizes + (size_t)task * (size_t)job->max_queries;
    float threshold[SCAN_BATCH_QUERIES];
    float scores[SCAN_BATCH_QUERIES * SCAN_BLOCK_ROWS];
    size_t index[SCAN_BLOCK_ROWS];
    for (int q = 0; q < nq; q++) {
        sizes[q] = 0;
        threshold[q] = -INFINITY;
    }
    scan_block b = {.rows = job->rows,
                    .dim = job->dim,
                    .index = index,
                    .queries = job->queries,
                    .n_queries = nq,
                    .scores = scores};
    for (size_t row = begin; row < end;) {
        /* Blocks start at multiples of block_rows, so a filter's bitmap is read in whole words. */
        size_t stop = (row / (size_t)job->block_rows + 1) * (size_t)job->block_rows;
        if (stop > end) stop = end;
        int count = allowed_rows(job->allowed, row, stop, index);
        bool dense =
            job->allowed && (size_t)count * 100 >= (stop - row) * SCAN_DENSE_FILTER_PERCENT;
        if (dense) count = allowed_rows(NULL, row, stop, index);
        b.count = count;
        /* The next block's rows, for a batch to fetch while it computes (see scan_block). */
        size_t next_stop =
            stop + (size_t)job->block_rows < end ? stop + (size_t)job->block_rows : end;
        b.next = !job->allowed && nq > SCAN_PREFETCH_MIN_QUERIES && stop < end
                     ? (const char *)(job->rows + stop * job->dim)
                     : NULL;
        b.next_bytes = (next_stop - stop) * job->dim * sizeof(float);
        row = stop;
        if (b.count == 0) continue;
        job->dots(&b);
        for (int q = 0; q < nq; q++) {
            const float *s = scores + q * SCAN_BLOCK_ROWS;
            scan_hit *heap = heaps + (size_t)q * job->cap;
            float t = threshold[q];
            /* NaN fails >= and is never offered. */
            for (int i = 0; i < b.count; i++)
                if (s[i] >= t && (!dense || scan_bitmap_get(job->allowed, index[i])))
                    t = scan_hits_offer(heap, &sizes[q], job->cap, (scan_hit){index[i], s[i]});
            threshold[q] = t;
        }
    }
}

scan_params scan_default_params(void)
{
    return (scan_params){.allowed = NULL, .pool = NULL, .isa = SCAN_ISA_AUTO};
}

/* Tasks for n rows on `threads` threads (see SCAN_TASKS_PER_THREAD). */
static int task_count(size_t n, int threads)
{
    if (threads <= 1) return 1;
    size_t tasks = (size_t)threads * SCAN_TASKS_PER_THREAD;
    size_t most = n / SCAN_MIN_TASK_ROWS;
    if (tasks > most) tasks = most;
    return tasks < 1 ? 1 : (int)tasks;
}

/* Checks the arguments both entry points share and resolves the instruction set. */
static int check_arguments(const char *fn, const float *rows, size_t n, size_t dim,
                           const void *queries, const void *hits, const void *n_hits,
                           const scan_params *p, int *isa)
{
    if (!queries || !hits || !n_hits || (!rows && n > 0))
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "%s: NULL %s", fn,
                       !queries  ? "query"
                       : !hits   ? "hits"
                       : !n_hits ? "n_hits"
                                 : "rows");
    if (dim == 0) return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "%s: dimension 0", fn);
    if (n > SIZE_MAX / sizeof(float) / dim)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "%s: %zu rows of %zu floats exceed memory",
                       fn, n, dim);
    *isa = p->isa == SCAN_ISA_AUTO ? scan_isa() : p->isa;
    if (!scan_isa_supported(*isa))
        return err_set(EMBEDRAG_ERR_UNSUPPORTED, "%s: this CPU cannot run the %s kernels", fn,
                       scan_isa_name(*isa));
    return 0;
}

int scan_topk_batch(const float *rows, size_t n, size_t dim, const float *queries, size_t m,
                    size_t k, const scan_params *params, scan_hit *hits, size_t *n_hits)
{
    scan_params p = params ? *params : scan_default_params();
    int isa = SCAN_ISA_GENERIC;
    int rc = check_arguments("scan_topk_batch", rows, n, dim, queries, hits, n_hits, &p, &isa);
    if (rc) return rc;
    if (m > 0 && k > SIZE_MAX / m)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "scan_topk_batch: %zu queries x k %zu", m, k);
    if (m > 0 && dim > SIZE_MAX / sizeof(float) / m)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "scan_topk_batch: %zu queries of %zu floats",
                       m, dim);
    if (n == 0 || k == 0) {
        for (size_t q = 0; q < m; q++) n_hits[q] = 0;
        return 0;
    }

    int threads = p.pool ? threadpool_threads(p.pool) : 1;
    int tasks = task_count(n, threads);
    size_t longest = range_begin(n, tasks, 1);
    size_t cap = k < longest ? k : longest;
    size_t per_query = (size_t)tasks * cap; /* <= n + tasks */
    if (per_query > SIZE_MAX / sizeof(scan_hit) / SCAN_BATCH_QUERIES)
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "scan_topk_batch: heaps for k = %zu", k);
    size_t group = m < SCAN_BATCH_QUERIES ? m : SCAN_BATCH_QUERIES;
    size_t fit = SCAN_HEAP_BUDGET_BYTES / (per_query * sizeof(scan_hit));
    if (group > fit) group = fit > 0 ? fit : 1;
    if (group == 0) return 0; /* m == 0 */

    scan_job job = {.rows = rows,
                    .n = n,
                    .dim = dim,
                    .allowed = p.allowed,
                    .dots = dots_for(isa),
                    .tasks = tasks,
                    .cap = cap,
                    .max_queries = (int)group};
    size_t block_bytes = dim * sizeof(float);
    job.block_rows = block_bytes * SCAN_BLOCK_ROWS <= SCAN_BLOCK_BYTES
                         ? SCAN_BLOCK_ROWS
                         : (int)(SCAN_BLOCK_BYTES / block_bytes);
    if (job.block_rows < SCAN_MIN_BLOCK_ROWS) job.block_rows = SCAN_MIN_BLOCK_ROWS;
    job.heaps = malloc(per_query * group * sizeof(scan_hit));
    job.sizes = malloc((size_t)tasks * group * sizeof(size_t));
    if (!job.heaps || !job.sizes) {
        rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "scan_topk_batch: out of memory for %zu heaps of %zu",
                     (size_t)tasks * group, cap);
        goto free_heaps;
    }

    for (size_t q0 = 0; q0 < m; q0 += group) {
        job.queries = queries + q0 * dim;
        job.n_queries = (int)(m - q0 < group ? m - q0 : group);
        if (p.pool && tasks > 1)
            threadpool_run(p.pool, tasks, scan_task, &job);
        else
            for (int t = 0; t < tasks; t++) scan_task(&job, t, 0);
        /* Every range's best cap hold the group's best k: merge them in the output's room. */
        for (int q = 0; q < job.n_queries; q++) {
            scan_hit *out = hits + (q0 + (size_t)q) * k;
            size_t size = 0;
            for (int t = 0; t < tasks; t++) {
                const scan_hit *h = job.heaps + ((size_t)t * group + (size_t)q) * cap;
                size_t count = job.sizes[(size_t)t * group + (size_t)q];
                for (size_t j = 0; j < count; j++) scan_hits_offer(out, &size, k, h[j]);
            }
            scan_hits_sort(out, size);
            n_hits[q0 + (size_t)q] = size;
        }
    }
free_heaps:
    free(job.heaps);
    free(job.sizes);
    return rc;
}

int scan_topk(const float *rows, size_t n, size_t dim, const float *query, size_t k,
              const scan_params *params, scan_hit *hits, size_t *n_hits)
{
    return scan_topk_batch(rows, n, dim, query, 1, k, params, hits, n_hits);
}

void scan_score_rows(const float *rows, size_t dim, const size_t *index, size_t count,
                     const float *query, int isa, float *scores)
{
    scan_dots_fn dots = dots_for(isa == SCAN_ISA_AUTO ? scan_isa() : isa);
    float block_scores[SCAN_BLOCK_ROWS];
    scan_block b = {.rows = rows, .dim = dim, .queries = query, .n_queries = 1};
    b.scores = block_scores;
    for (size_t i = 0; i < count; i += SCAN_BLOCK_ROWS) {
        b.index = index + i;
        b.count = count - i < SCAN_BLOCK_ROWS ? (int)(count - i) : SCAN_BLOCK_ROWS;
        dots(&b);
        memcpy(scores + i, block_scores, (size_t)b.count * sizeof(float));
    }
}

/* ---- memory bandwidth ----------------------------------------------------------------------- */

static double sum_generic(const float *p, size_t count)
{
    float lanes[SCAN_LANES] = {0};
    size_t i = 0;
    for (; i + SCAN_LANES <= count; i += SCAN_LANES)
        for (int l = 0; l < SCAN_LANES; l++) lanes[l] += p[i + l];
    double sum = 0;
    for (; i < count; i++) sum += p[i];
    for (int l = 0; l < SCAN_LANES; l++) sum += lanes[l];
    return sum;
}

#ifdef SCAN_X86
/* Eight independent sums, so the adds never wait on each other and the loads run at the speed
 * of memory. */
SCAN_AVX512_TARGET static double sum_avx512(const float *p, size_t count)
{
    __m512 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm512_setzero_ps();
    size_t i = 0;
    for (; i + 8 * SCAN_LANES <= count; i += 8 * SCAN_LANES)
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++)
            acc[j] = _mm512_add_ps(acc[j], _mm512_loadu_ps(p + i + (size_t)j * SCAN_LANES));
    for (int j = 1; j < 8; j++) acc[0] = _mm512_add_ps(acc[0], acc[j]);
    return sum_generic(p + i, count - i) + reduce_avx512(acc[0]);
}

SCAN_AVX2_TARGET static double sum_avx2(const float *p, size_t count)
{
    __m256 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 64 <= count; i += 64)
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++)
            acc[j] = _mm256_add_ps(acc[j], _mm256_loadu_ps(p + i + (size_t)j * 8));
    for (int j = 2; j < 8; j += 2) {
        acc[0] = _mm256_add_ps(acc[0], acc[j]);
        acc[1] = _mm256_add_ps(acc[1], acc[j + 1]);
    }
    return sum_generic(p + i, count - i) + reduce_avx2(acc[0], acc[1]);
}
#endif

typedef struct bandwidth_job {
    const float *data;
    size_t count; /* floats */
    int tasks;
    int isa;
    double *sums; /* one per task, so the reads cannot be optimized away */
} bandwidth_job;

static void bandwidth_task(void *ctx, int task, int thread)
{
    const bandwidth_job *job = ctx;
    size_t begin = range_begin(job->count, job->tasks, task);
    size_t end = range_begin(job->count, job->tasks, task + 1);
    const float *p = job->data + begin;
    double s;
#ifdef SCAN_X86
    if (job->isa == SCAN_ISA_AVX512)
        s = sum_avx512(p, end - begin);
    else if (job->isa == SCAN_ISA_AVX2)
        s = sum_avx2(p, end - begin);
    else
#endif
        s = sum_generic(p, end - begin);
    job->sums[task] = s;
}

int scan_measure_bandwidth(const void *buffer, size_t bytes, threadpool *pool, int isa, int repeats,
                           double *bytes_per_second)
{
    if (!bytes_per_second || bytes < SCAN_MIN_BANDWIDTH_BYTES || repeats < 1)
        return err_set(
            EMBEDRAG_ERR_INVALID_ARGUMENT,
            "scan_measure_bandwidth: %zu bytes, %d repeats (at least %d bytes, 1 repeat)", bytes,
            repeats, SCAN_MIN_BANDWIDTH_BYTES);
    if (isa == SCAN_ISA_AUTO) isa = scan_isa();
    if (!scan_isa_supported(isa))
        return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                       "scan_measure_bandwidth: this CPU cannot run the %s kernels",
                       scan_isa_name(isa));
    int rc = 0;
    float *owned = NULL;
    if (!buffer) {
        /* On huge pages where the OS gives them (transparent huge pages in "madvise" mode, as on
         * Debian): with 4 KB pages one thread read ~18 GB/s on the Zen 4 VM, with 2 MB ~28. */
        owned = memory_alloc_huge(bytes);
        if (!owned)
            return err_set(EMBEDRAG_ERR_NO_MEMORY, "scan_measure_bandwidth: %zu bytes", bytes);
        /* Written once so every page is mapped before the timing. */
        for (size_t i = 0; i < bytes / sizeof(float); i++) owned[i] = (float)(i & 1023);
        buffer = owned;
    }
    /* The same split as a scan: its task count for as many rows as there are 64-byte lines. */
    int threads = pool ? threadpool_threads(pool) : 1;
    bandwidth_job job = {.data = buffer,
                         .count = bytes / sizeof(float),
                         .tasks = task_count(bytes / 64, threads),
                         .isa = isa};
    job.sums = calloc((size_t)job.tasks, sizeof(double));
    if (!job.sums) {
        rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "scan_measure_bandwidth: out of memory");
        goto free_buffer;
    }
    double best = 0;
    for (int pass = -1; pass < repeats; pass++) { /* pass -1 warms up */
        double start = clock_seconds();
        if (pool && job.tasks > 1)
            threadpool_run(pool, job.tasks, bandwidth_task, &job);
        else
            for (int t = 0; t < job.tasks; t++) bandwidth_task(&job, t, 0);
        double seconds = clock_seconds() - start;
        if (pass >= 0 && seconds > 0 && (double)(job.count * sizeof(float)) / seconds > best)
            best = (double)(job.count * sizeof(float)) / seconds;
    }
    *bytes_per_second = best;
    free(job.sums);
free_buffer:
    free(owned);
    return rc;
}
