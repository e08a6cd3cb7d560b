/* Exact dense search: the k rows of a float32 matrix with the largest inner product with a query
 * (cosine for L2-normalized rows), scanned with SIMD chosen at run time and all threads of a pool
 * on one query, and the memory bandwidth the scan is measured against. The document store owns
 * the matrix; nothing here allocates beyond a call. */
#ifndef EMBEDRAG_STORE_SCAN_H
#define EMBEDRAG_STORE_SCAN_H

#include "util/threadpool.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* One result: a row of the matrix and its inner product with the query. */
typedef struct scan_hit {
    size_t row;
    float score;
} scan_hit;

/* The kernels' instruction sets. SCAN_ISA_AUTO is the process's choice: the widest the CPU runs,
 * unless EMBEDRAG_CPU_ISA (the same variable as the CPU backend's) says "generic", "avx2" or
 * "avx512" and the CPU runs that. Every set computes the same bits (see scan.c), so the choice
 * changes speed, never results. */
enum { SCAN_ISA_AUTO = -1, SCAN_ISA_GENERIC = 0, SCAN_ISA_AVX2 = 1, SCAN_ISA_AVX512 = 2 };

typedef struct scan_params {
    /* Rows that may be returned: bit (row % 8) of byte allowed[row / 8] set (scan_bitmap_bytes
     * gives the size). NULL allows every row. Where few rows of a block are allowed only those
     * are read; where most are, the block is read whole, as one stream, which is faster. */
    const uint8_t *allowed;
    /* Threads that share each query's rows; NULL runs on the calling thread alone. Must not be
     * running anything else during the call (threadpool_run is not reentrant). */
    threadpool *pool;
    /* SCAN_ISA_AUTO, or one set to force (tests, benchmarks): EMBEDRAG_ERR_UNSUPPORTED where the
     * CPU lacks it. */
    int isa;
} scan_params;

/* Every row allowed, no pool, SCAN_ISA_AUTO. */
scan_params scan_default_params(void);

/* The top k of one query. `rows` is n rows x dim floats, row-major and contiguous; query is dim
 * floats. Fills hits[0 .. *n_hits) sorted by score descending, ties by lower row first, with
 * *n_hits = min(k, rows allowed and not NaN). The result is the exact top k in that order, the
 * same bits whatever the thread count, the instruction set, or the other rows: each row's score
 * is float32 fused multiply-adds in a fixed order (16 lanes, element e in lane e % 16, then a
 * fixed pairwise sum of the lanes). A row whose score is NaN (a NaN in the row or the query,
 * inf * 0, inf - inf) is never returned, so a NaN query finds nothing; infinite scores rank as
 * numbers. hits has room for k entries; params NULL means scan_default_params(). Returns 0,
 * EMBEDRAG_ERR_INVALID_ARGUMENT (NULL pointers where data is needed, dim 0, a matrix larger than
 * memory can address), EMBEDRAG_ERR_UNSUPPORTED or EMBEDRAG_ERR_NO_MEMORY (a heap of up to k
 * entries per range of rows a task scans is allocated during the call and freed before it
 * returns). */
int scan_topk(const float *rows, size_t n, size_t dim, const float *query, size_t k,
              const scan_params *params, scan_hit *hits, size_t *n_hits);

/* The top k of each of m queries (m x dim floats, row-major), as m calls of scan_topk would
 * return them (the same bits), but reading the matrix once for each group of up to
 * SCAN_BATCH_QUERIES queries, which share each block of rows while it is in cache. Query q's
 * hits are hits[q * k .. q * k + n_hits[q]); hits has room for m * k entries, n_hits for m. */
int scan_topk_batch(const float *rows, size_t n, size_t dim, const float *queries, size_t m,
                    size_t k, const scan_params *params, scan_hit *hits, size_t *n_hits);

/* For searches that score only some rows (a quantized search's shortlist, src/store/quant.h):
 * scores[i] = <rows[index[i] * dim ..], query> for i < count, the same bits scan_topk computes
 * for those rows with instruction set `isa` (SCAN_ISA_AUTO: scan_isa(); the caller checks
 * scan_isa_supported). Rows are read in the order given: ascending order reads fastest. */
void scan_score_rows(const float *rows, size_t dim, const size_t *index, size_t count,
                     const float *query, int isa, float *scores);

/* The bounded heap scan_topk keeps a range's best hits in, ordered as its results are (higher
 * score first, then lower row): scan_hits_offer offers x to a heap of capacity cap (>= 1)
 * holding *size entries, and returns the score a hit must reach (>=) to be worth offering next
 * time (the worst kept once full, -inf before); NaN scores must not be offered.
 * scan_hits_sort sorts a heap of `size` entries in place, best first. */
float scan_hits_offer(scan_hit *heap, size_t *size, size_t cap, scan_hit x);
void scan_hits_sort(scan_hit *heap, size_t size);

/* Queries that share one pass over the matrix in scan_topk_batch: enough to make the pass
 * compute-bound (each row then costs 64 x 2 x dim FLOPs per 4 x dim bytes, about 6 times the
 * FLOP-per-byte balance of a 2-core VM here), few enough for their scores and heaps to stay
 * small. */
#define SCAN_BATCH_QUERIES 64

/* Bytes of an `allowed` bitmap for n rows. */
static inline size_t scan_bitmap_bytes(size_t n)
{
    return n / 8 + (n % 8 != 0);
}

static inline bool scan_bitmap_get(const uint8_t *bitmap, size_t row)
{
    return (bitmap[row / 8] >> (row % 8)) & 1u;
}

static inline void scan_bitmap_set(uint8_t *bitmap, size_t row, bool allowed)
{
    if (allowed)
        bitmap[row / 8] |= (uint8_t)(1u << (row % 8));
    else
        bitmap[row / 8] &= (uint8_t) ~(1u << (row % 8));
}

/* The instruction set SCAN_ISA_AUTO picks in this process (chosen once, then fixed). */
int scan_isa(void);

/* Whether this CPU runs `isa` (SCAN_ISA_AUTO: true). */
bool scan_isa_supported(int isa);

/* "generic", "avx2", "avx512" (static strings), or "auto" / "unknown". */
const char *scan_isa_name(int isa);

/* The memory read bandwidth the scan is held against, measured as the scan reads: every thread
 * of `pool` (NULL: the calling thread) sums a contiguous part of a buffer of `bytes` with the
 * kernels of `isa` (SCAN_ISA_AUTO: scan_isa()), `repeats` times; *bytes_per_second is the best
 * pass. `buffer` is read as is (e.g. the store's own matrix, so no second copy is needed); NULL
 * allocates and fills one of `bytes` for the call, on transparent huge pages where the OS gives
 * them (use several times the last-level cache: 256 MB against 32 MB of L3 here). Huge pages
 * matter: the store's matrix should be 2 MB-aligned and madvise(MADV_HUGEPAGE)d too (one thread
 * read 18 GB/s on 4 KB pages and 28 on 2 MB ones on the Zen 4 VM). Returns 0,
 * EMBEDRAG_ERR_INVALID_ARGUMENT (bytes < 4096, repeats < 1), EMBEDRAG_ERR_UNSUPPORTED or
 * EMBEDRAG_ERR_NO_MEMORY. */
int scan_measure_bandwidth(const void *buffer, size_t bytes, threadpool *pool, int isa, int repeats,
                           double *bytes_per_second);

#endif
