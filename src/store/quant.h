/* Quantized dense search with exact rescoring: compact codes of a float32 matrix (1 bit per
 * dimension, optionally 1 byte) are scanned to pick a shortlist of candidate rows, and the
 * shortlist is scored exactly against the float matrix (store/scan.h's kernels), so every hit
 * returned carries the bits scan_topk gives its row. Only which rows are found is approximate.
 *
 * The codes of a row x (rows L2-normalized embeddings; any rows work, less well):
 *  - bits: sign(x - mean) per dimension, the mean over the matrix's rows; centering first puts
 *    the bits' hyperplanes through the data instead of the origin (real embeddings share a
 *    common direction, and then most signs would be alike for every row; on synthetic data it
 *    measured no difference, see quant.c);
 *  - a factor |x - mean|^2 / |x - mean|_1 per row that scales the bits' estimate of
 *    <x - mean, q> (the row's sign vector is only partly aligned with the row, and how much
 *    varies from row to row);
 *  - int8 (optional): round((x_d - mean_d) / scale_d), scale_d = max over rows of
 *    |x_d - mean_d| / 127, a scale per dimension.
 * A query is scanned asymmetrically against the bits: it is quantized to QUANT_QUERY_BITS bits
 * per dimension (bit planes), and each row's estimate is factor * <query levels, signs>, from
 * popcounts of (plane AND row bits). See quant.c for the measurements behind each choice.
 *
 * The shortlist: at build, QUANT_CALIBRATION_QUERIES rows spread over the matrix are searched
 * exactly (scan_topk_batch, their own row left out) and by the bits; the shortlist is the bits
 * rank that holds a fraction target_recall of those true top-10 neighbours, times
 * QUANT_SHORTLIST_MARGIN, at least QUANT_MIN_SHORTLIST. It therefore grows with the corpus and
 * with how badly the bits rank it: on clustered vectors it is a few hundred to a few thousand
 * rows at 1M; on uniform random vectors, where sign bits carry little of the small differences
 * between neighbours, it is a few percent of the corpus. Where it exceeds
 * QUANT_CASCADE_MIN_SHORTLIST, building (QUANT_INT8_AUTO) adds the int8 codes and the default
 * search runs a cascade: bits -> that shortlist -> int8 scores -> QUANT_INT8_SHORTLIST rows ->
 * exact; int8 scores of a row read a quarter of the bytes of its exact score, so the large
 * shortlist costs less to thin.
 *
 * Measured (bench/quant_bench.c, Zen 4 VM, 2 threads, 384 dimensions, 1M rows): clustered
 * vectors calibrate to the floor, 1,000 rows, and search in 1.8 ms at recall@10 1.000 (500 rows
 * give 0.992); uniform random vectors calibrate to 31k rows (the calibration rows' recall 0.997),
 * build the int8 codes, and the cascade searches in 7.1 ms at recall 0.994, where the bits alone
 * with that shortlist take 10+ ms, the int8 codes alone 22 ms, and the exact scan ~60 ms. */
#ifndef EMBEDRAG_STORE_QUANT_H
#define EMBEDRAG_STORE_QUANT_H

#include "store/scan.h"
#include "util/threadpool.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The codes of one matrix: one allocation, header and arrays, that can be saved and loaded as
 * bytes (quant_codes_bytes, quant_codes_load). */
typedef struct quant_codes quant_codes;

/* The quantized kernels' instruction sets. QUANT_ISA_AUTO is the widest this CPU runs, unless
 * EMBEDRAG_CPU_ISA says "generic", "avx2" or "avx512" (AVX-512 without VNNI and VPOPCNTDQ).
 * Every set computes the same integers, so the choice changes speed, never results. The exact
 * rescoring runs the matching scan.h set (AVX512_VNNI: SCAN_ISA_AVX512). */
enum {
    QUANT_ISA_AUTO = -1,
    QUANT_ISA_GENERIC = 0,
    QUANT_ISA_AVX2 = 1,        /* AVX2 + FMA: popcounts by byte lookup, int8 by VPMADDWD */
    QUANT_ISA_AVX512 = 2,      /* AVX512F/DQ/BW: the same, 512 bits wide */
    QUANT_ISA_AVX512_VNNI = 3, /* and VPOPCNTQ, VPDPBUSD (Ice Lake, Zen 4 and later) */
};

/* What a search scans first. */
enum {
    QUANT_MODE_AUTO = 0,    /* the cascade where the codes have int8 and the bits' shortlist is
                               above QUANT_CASCADE_MIN_SHORTLIST, else BITS */
    QUANT_MODE_BITS = 1,    /* bits -> shortlist -> exact */
    QUANT_MODE_CASCADE = 2, /* bits -> shortlist -> int8 -> shortlist_int8 -> exact */
    QUANT_MODE_INT8 = 3,    /* int8 (every row) -> shortlist_int8 -> exact */
};

/* Whether to build the int8 codes (n x dim bytes: a quarter of the float matrix). */
enum { QUANT_INT8_AUTO = 0, QUANT_INT8_ON = 1, QUANT_INT8_OFF = 2 };

/* Ablations, for benchmarks (quant_build_params.flags): leave out the centering of the bits,
 * the per-row factor, or use one int8 scale for all dimensions. */
enum {
    QUANT_BUILD_NO_CENTER = 1,
    QUANT_BUILD_NO_ROW_FACTOR = 2,
    QUANT_BUILD_INT8_GLOBAL_SCALE = 4,
};

/* Bits per dimension a query is quantized to against the 1-bit codes (1 makes the scan a
 * Hamming distance between sign vectors). */
#define QUANT_QUERY_BITS 4
/* Build-time calibration: rows searched, neighbours checked per row, and the margin on the
 * shortlist they call for (queries are not rows of the matrix: their neighbours are farther). */
#define QUANT_CALIBRATION_QUERIES 32
#define QUANT_CALIBRATION_K 10
/* 3, not 2: with 2, uniform random vectors at 100k calibrated to 4,824 rows and held-out queries
 * found recall@10 0.987-0.990 (bench --search); 3 gives 7,236 rows and 0.994. Clustered data
 * stays at the floor either way. */
#define QUANT_SHORTLIST_MARGIN 3
#define QUANT_MIN_SHORTLIST 200
/* Bits shortlists above this go through the int8 codes when present (QUANT_MODE_AUTO). */
#define QUANT_CASCADE_MIN_SHORTLIST 4096
/* Rows the int8 stage passes to the exact one (QUANT_MODE_CASCADE, QUANT_MODE_INT8), at least k. */
#define QUANT_INT8_SHORTLIST 200

typedef struct quant_build_params {
    threadpool *pool; /* NULL: the calling thread */
    int isa;          /* QUANT_ISA_* */
    int int8;         /* QUANT_INT8_* */
    /* Rows searched to calibrate the shortlist; 0 skips calibration (shortlist = the larger of
     * QUANT_MIN_SHORTLIST and n / 1000). */
    int calibration_queries;
    double target_recall; /* of the calibrated shortlist, before the margin */
    unsigned flags;       /* QUANT_BUILD_* */
} quant_build_params;

/* No pool, QUANT_ISA_AUTO, QUANT_INT8_AUTO, QUANT_CALIBRATION_QUERIES, recall 0.99, no flags. */
quant_build_params quant_default_build_params(void);

/* Builds the codes of rows (n x dim floats, row-major, contiguous). Rows with a NaN or infinite
 * element get codes that never enter a shortlist. Reads the matrix twice (three times with
 * int8), plus one exact batch scan of the calibration rows. The codes are one allocation of
 * about n * (dim / 8 + 4) bytes (+ n * dim with int8), freed by quant_codes_free; *out is NULL
 * on failure. Returns 0, EMBEDRAG_ERR_INVALID_ARGUMENT, EMBEDRAG_ERR_UNSUPPORTED or
 * EMBEDRAG_ERR_NO_MEMORY. */
int quant_codes_build(const float *rows, size_t n, size_t dim, const quant_build_params *params,
                      quant_codes **out);

void quant_codes_free(quant_codes *codes);

typedef struct quant_codes_info {
    size_t n, dim;
    bool has_int8;
    size_t shortlist;         /* the bits' default shortlist (calibrated) */
    double calibrated_recall; /* recall@10 of the calibration rows at that shortlist, or -1 */
    unsigned flags;           /* QUANT_BUILD_* */
    size_t bytes;             /* of the whole allocation, as quant_codes_bytes gives it */
} quant_codes_info;

void quant_codes_get_info(const quant_codes *codes, quant_codes_info *info);

/* The codes as bytes, to write to a file: *data points into the codes (valid until they are
 * freed), *bytes long. The layout is little-endian with a versioned header. */
void quant_codes_bytes(const quant_codes *codes, const void **data, size_t *bytes);

/* Codes from bytes quant_codes_bytes gave (copied: data may be freed after the call). Returns 0,
 * EMBEDRAG_ERR_FORMAT (not codes, another version, a size that does not match),
 * EMBEDRAG_ERR_INVALID_ARGUMENT or EMBEDRAG_ERR_NO_MEMORY; *out is NULL on failure. */
int quant_codes_load(const void *data, size_t bytes, quant_codes **out);

typedef struct quant_params {
    /* As scan_params: rows that may be returned (NULL: all), the pool sharing each query's rows
     * (NULL: the calling thread; not running anything else during the call). */
    const uint8_t *allowed;
    threadpool *pool;
    int isa;               /* QUANT_ISA_* */
    int mode;              /* QUANT_MODE_* */
    size_t shortlist;      /* the bits' shortlist; 0: the codes' calibrated one */
    size_t shortlist_int8; /* the int8 stage's; 0: QUANT_INT8_SHORTLIST */
    int query_bits;        /* 1 to 4; 0: QUANT_QUERY_BITS */
} quant_params;

/* Every row allowed, no pool, QUANT_ISA_AUTO, QUANT_MODE_AUTO, default shortlists. */
quant_params quant_default_params(void);

/* The top k of one query among the rows (the same matrix, n x dim, the codes were built from;
 * for speed 2 MB-aligned on huge pages, as scan.h says). Fills hits[0 .. *n_hits) as scan_topk
 * does: sorted by score descending, ties by lower row, each score the exact float32 bits
 * scan_topk computes for that row; the rows are scan_topk's wherever the true top k are all in
 * the shortlist (always when the shortlist is at least the rows allowed). Rows with a NaN or
 * infinite element are never returned, and a query with one finds nothing. *n_hits =
 * min(k, rows allowed and finite). hits has room for k entries; params NULL means
 * quant_default_params(). Allocates about (2 threads + 2) x shortlist hits during the call.
 * Returns 0, EMBEDRAG_ERR_INVALID_ARGUMENT (NULL pointers, n or dim other than the codes'),
 * EMBEDRAG_ERR_UNSUPPORTED (an isa the CPU lacks, a mode needing int8 codes that were not built)
 * or EMBEDRAG_ERR_NO_MEMORY. */
int quant_search(const quant_codes *codes, const float *rows, size_t n, size_t dim,
                 const float *query, size_t k, const quant_params *params, scan_hit *hits,
                 size_t *n_hits);

/* m queries (m x dim floats) one after another: query q's hits are hits[q * k ..
 * q * k + n_hits[q]). */
int quant_search_batch(const quant_codes *codes, const float *rows, size_t n, size_t dim,
                       const float *queries, size_t m, size_t k, const quant_params *params,
                       scan_hit *hits, size_t *n_hits);

/* The instruction set QUANT_ISA_AUTO picks in this process; whether this CPU runs `isa`;
 * "generic", "avx2", "avx512", "avx512vnni" (static strings), or "auto" / "unknown". */
int quant_isa(void);
bool quant_isa_supported(int isa);
const char *quant_isa_name(int isa);

#endif
