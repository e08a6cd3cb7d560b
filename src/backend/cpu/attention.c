/* Attention of one head of one sequence: AVX-512 kernels for head widths that are multiples of 16
 * (grouped query rows for widths 32 and 64), a portable one for the rest. Every sum runs in an
 * order fixed by the sequence length and head width. */
#include "backend/cpu/kernels_internal.h"

static inline float max_fixed(const float *x, int n)
{
    float lanes[REDUCE_LANES];
    for (int l = 0; l < REDUCE_LANES; l++) lanes[l] = -INFINITY;
    int i = 0;
    for (; i + REDUCE_LANES <= n; i += REDUCE_LANES)
        for (int l = 0; l < REDUCE_LANES; l++) lanes[l] = x[i + l] > lanes[l] ? x[i + l] : lanes[l];
    for (int l = 0; i + l < n; l++) lanes[l] = x[i + l] > lanes[l] ? x[i + l] : lanes[l];
    float m = lanes[0];
    for (int l = 1; l < REDUCE_LANES; l++) m = lanes[l] > m ? lanes[l] : m;
    return m;
}

static inline void exp_shifted(float *x, int n, float shift)
{
    for (int i = 0; i < n; i++) x[i] = exp_approx(x[i] - shift);
}

static inline void scores_row(float *scores, const float *q, const float *kt, int len, int d,
                              float scale)
{
    for (int j = 0; j < len; j++) scores[j] = 0.0f;
    for (int dd = 0; dd < d; dd++) {
        float qd = q[dd] * scale;
        const float *krow = kt + (size_t)dd * (size_t)len;
        for (int j = 0; j < len; j++) scores[j] += qd * krow[j];
    }
}

static inline void weighted_values(float *out, const float *scores, const float *v, size_t ld,
                                   int len, int d, float inv_sum)
{
    for (int dd = 0; dd < d; dd++) out[dd] = 0.0f;
    for (int j = 0; j < len; j++) {
        float p = scores[j];
        const float *vrow = v + (size_t)j * ld;
        for (int dd = 0; dd < d; dd++) out[dd] += p * vrow[dd];
    }
    for (int dd = 0; dd < d; dd++) out[dd] *= inv_sum;
}

/* Attention for head widths that are multiples of 16 (up to ATTENTION_MAX_WIDTH): keys are
 * transposed into kt with rows padded to 16 lanes; scores use four independent accumulators
 * (four key blocks), the weighted sum of values splits even and odd keys into two chains, so the
 * loops run at FMA throughput rather than latency. Orders depend only on len and d. */
#define ATTENTION_MAX_WIDTH 128
AVX512_TARGET static void attention_head_avx512(const float *q, const float *k, const float *v,
                                                size_t ld, int len, int d, float scale, float *out,
                                                size_t ldo, float *scores, float *kt)
{
    size_t padded = (size_t)((len + 15) & ~15);
    for (int dd = 0; dd < d; dd++) {
        float *row = kt + (size_t)dd * padded;
        for (int j = 0; j < len; j++) row[j] = k[(size_t)j * ld + (size_t)dd];
        for (size_t j = (size_t)len; j < padded; j++) row[j] = 0.0f;
    }
    int blocks = d / 16;
    for (int i = 0; i < len; i++) {
        const float *qi = q + (size_t)i * ld;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        for (int j = 0; j < len; j += 64) {
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                             _mm512_setzero_ps()};
            int chunks = (len - j + 15) / 16;
            if (chunks > 4) chunks = 4;
            for (int dd = 0; dd < d; dd++) {
                __m512 qd = _mm512_set1_ps(qi[dd] * scale);
                const float *krow = kt + (size_t)dd * padded + (size_t)j;
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++)
                    if (c < chunks)
                        acc[c] = _mm512_fmadd_ps(qd, _mm512_loadu_ps(krow + 16 * c), acc[c]);
            }
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++)
                if (c < chunks) {
                    _mm512_storeu_ps(scores + j + 16 * c, acc[c]);
                    vmax = _mm512_mask_max_ps(vmax, tail_mask(len - j - 16 * c), vmax, acc[c]);
                }
        }
        __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        __m512 vsum = _mm512_setzero_ps();
        for (int j = 0; j < len; j += 16) {
            __m512 e = _mm512_maskz_mov_ps(
                tail_mask(len - j), exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(scores + j), m)));
            _mm512_storeu_ps(scores + j, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
        __m512 even[ATTENTION_MAX_WIDTH / 16], odd[ATTENTION_MAX_WIDTH / 16];
        for (int b = 0; b < blocks; b++) even[b] = odd[b] = _mm512_setzero_ps();
        int j = 0;
        for (; j + 1 < len; j += 2) {
            __m512 p0 = _mm512_set1_ps(scores[j]), p1 = _mm512_set1_ps(scores[j + 1]);
            const float *v0 = v + (size_t)j * ld, *v1 = v0 + ld;
            for (int b = 0; b < blocks; b++) {
                even[b] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v0 + 16 * b), even[b]);
                odd[b] = _mm512_fmadd_ps(p1, _mm512_loadu_ps(v1 + 16 * b), odd[b]);
            }
        }
        if (j < len) {
            __m512 p0 = _mm512_set1_ps(scores[j]);
            for (int b = 0; b < blocks; b++)
                even[b] =
                    _mm512_fmadd_ps(p0, _mm512_loadu_ps(v + (size_t)j * ld + 16 * b), even[b]);
        }
        float *o = out + (size_t)i * ldo;
        for (int b = 0; b < blocks; b++)
            _mm512_storeu_ps(o + 16 * b, _mm512_mul_ps(_mm512_add_ps(even[b], odd[b]), inv));
    }
}

/* Each row's running maximum starts at -inf. */
AVX512_TARGET static inline __attribute__((always_inline)) void start_rows(const int rows,
                                                                           __m512 *vmax)
{
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++) vmax[r] = _mm512_set1_ps(-INFINITY);
}

/* Zeroes the accumulators of a block of up to 64 keys from key j; returns its groups of 16. */
AVX512_TARGET static inline __attribute__((always_inline)) int score_chunks(const int rows, int len,
                                                                            int j, __m512 acc[][4])
{
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    int chunks = (len - j + 15) / 16;
    return chunks > 4 ? 4 : chunks;
}

/* Stores a block of scores (`rows` query rows by `chunks` groups of 16 keys from key j) and
 * folds the valid ones into each row's running maximum. */
AVX512_TARGET static inline __attribute__((always_inline)) void
store_scores(const int rows, int chunks, __m512 acc[][4], float *scores, size_t padded, int j,
             int len, __m512 *vmax)
{
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++)
            if (c < chunks) {
                _mm512_storeu_ps(scores + (size_t)r * padded + j + 16 * c, acc[r][c]);
                vmax[r] =
                    _mm512_mask_max_ps(vmax[r], tail_mask(len - j - 16 * c), vmax[r], acc[r][c]);
            }
}

/* Each row's scores become exp(score - max), zero past the length (to the next multiple of
 * 16); inv[r] is one over their sum. */
AVX512_TARGET static inline __attribute__((always_inline)) void
softmax_rows(const int rows, float *scores, size_t padded, int len, const __m512 *vmax, __m512 *inv)
{
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++) {
        float *sr = scores + (size_t)r * padded;
        __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax[r]));
        __m512 vsum = _mm512_setzero_ps();
        for (int j = 0; j < len; j += 16) {
            __m512 e = _mm512_maskz_mov_ps(tail_mask(len - j),
                                           exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(sr + j), m)));
            _mm512_storeu_ps(sr + j, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        inv[r] = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
    }
}

/* Attention for `rows` consecutive query rows at once (rows <= 4) and a head width of
 * 16 * BLOCKS: every key and value vector loaded is used by all the rows, which the one-row loop
 * above could not do (it was bound by loads). q holds the rows' queries already scaled, v the
 * head's values, both contiguous (row stride d). Each row's sums run in the same order whatever
 * `rows` is, so grouping never changes a result. */
#define ATTENTION_GROUP_ROWS 4
/* Rows ahead at which the head copy prefetches the QKV rows. */
#define ATTENTION_PREFETCH_ROWS 6
AVX512_TARGET static inline __attribute__((always_inline)) void
attention_rows_avx512(const int rows, const int blocks, const float *q, const float *v, int len,
                      float *out, size_t ldo, float *scores, const float *kt, size_t padded)
{
    const int d = 16 * blocks;
    __m512 vmax[ATTENTION_GROUP_ROWS], acc[ATTENTION_GROUP_ROWS][4];
    start_rows(rows, vmax);
    for (int j = 0; j < len; j += 64) {
        int chunks = score_chunks(rows, len, j, acc);
        for (int dd = 0; dd < d; dd++) {
            const float *krow = kt + (size_t)dd * padded + (size_t)j;
            __m512 kv[4];
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++)
                kv[c] = c < chunks ? _mm512_loadu_ps(krow + 16 * c) : _mm512_setzero_ps();
#pragma GCC unroll 4
            for (int r = 0; r < rows; r++) {
                __m512 qd = _mm512_set1_ps(q[(size_t)r * (size_t)d + (size_t)dd]);
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++)
                    if (c < chunks) acc[r][c] = _mm512_fmadd_ps(qd, kv[c], acc[r][c]);
            }
        }
        store_scores(rows, chunks, acc, scores, padded, j, len, vmax);
    }
    __m512 inv[ATTENTION_GROUP_ROWS];
    softmax_rows(rows, scores, padded, len, vmax, inv);
    __m512 o[ATTENTION_GROUP_ROWS][4];
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
        for (int b = 0; b < blocks; b++) o[r][b] = _mm512_setzero_ps();
    for (int j = 0; j < len; j++) {
        const float *vj = v + (size_t)j * (size_t)d;
        __m512 vv[4];
#pragma GCC unroll 4
        for (int b = 0; b < blocks; b++) vv[b] = _mm512_loadu_ps(vj + 16 * b);
#pragma GCC unroll 4
        for (int r = 0; r < rows; r++) {
            __m512 p = _mm512_set1_ps(scores[(size_t)r * padded + (size_t)j]);
#pragma GCC unroll 4
            for (int b = 0; b < blocks; b++) o[r][b] = _mm512_fmadd_ps(p, vv[b], o[r][b]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
        for (int b = 0; b < blocks; b++)
            _mm512_storeu_ps(out + (size_t)r * ldo + 16 * b, _mm512_mul_ps(o[r][b], inv[r]));
}

/* Runs ROWS_FN over the query rows in groups of ATTENTION_GROUP_ROWS, each call specialized
 * for its row count and the head width (32 or 64): Q holds the head's queries, Q_STRIDE
 * elements a row, V and KT its values and keys in ROWS_FN's layout. Uses the caller's len, d,
 * out, ldo, scores and padded. */
#define ATTENTION_ROWS_CASE(ROWS_FN, r, b, V, KT)                                                  \
    case 8 * (r) + (b):                                                                            \
        ROWS_FN(r, b, qi, V, len, oi, ldo, scores, KT, padded);                                    \
        break;
#define ATTENTION_GROUPS(ROWS_FN, Q, Q_STRIDE, V, KT)                                              \
    for (int i = 0; i < len; i += ATTENTION_GROUP_ROWS) {                                          \
        int rows = len - i < ATTENTION_GROUP_ROWS ? len - i : ATTENTION_GROUP_ROWS;                \
        const __typeof__(*(Q)) *qi = (Q) + (size_t)i * (size_t)(Q_STRIDE);                         \
        float *oi = out + (size_t)i * ldo;                                                         \
        switch (8 * rows + d / 16) {                                                               \
            ATTENTION_ROWS_CASE(ROWS_FN, 4, 2, V, KT)                                              \
            ATTENTION_ROWS_CASE(ROWS_FN, 3, 2, V, KT)                                              \
            ATTENTION_ROWS_CASE(ROWS_FN, 2, 2, V, KT)                                              \
            ATTENTION_ROWS_CASE(ROWS_FN, 1, 2, V, KT)                                              \
            ATTENTION_ROWS_CASE(ROWS_FN, 4, 4, V, KT)                                              \
            ATTENTION_ROWS_CASE(ROWS_FN, 3, 4, V, KT)                                              \
            ATTENTION_ROWS_CASE(ROWS_FN, 2, 4, V, KT)                                              \
            ATTENTION_ROWS_CASE(ROWS_FN, 1, 4, V, KT)                                              \
        default:                                                                                   \
            break;                                                                                 \
        }                                                                                          \
    }

/* Head widths 32 and 64 (BERT-small and -base shapes). The head's keys (transposed), values and
 * scaled queries are first copied out of the QKV rows into contiguous scratch: read in place,
 * rows 3 * hidden floats apart fell into a few L1 sets and every group of query rows missed on
 * them again (profiled: a fifth of the attention time). Then query rows go in groups of four. */
AVX512_TARGET static void attention_grouped_avx512(const float *q, const float *k, const float *v,
                                                   size_t ld, int len, int d, float scale,
                                                   float *out, size_t ldo, float *scores,
                                                   float *head)
{
    size_t padded = (size_t)((len + 15) & ~15);
    float *kt = head, *vh = kt + (size_t)d * padded, *qs = vh + (size_t)d * padded;
    int blocks = d / 16;
    for (int j = 0; j < len; j++) {
        const float *kj = k + (size_t)j * ld;
        /* The rows are far apart (3 x hidden floats): ask for a later row's lines now, which
         * the hardware prefetchers do not (the misses took a fifth of the attention time). */
        if (j + ATTENTION_PREFETCH_ROWS < len)
            for (int dd = 0; dd < d; dd += 16) {
                size_t ahead = (size_t)(j + ATTENTION_PREFETCH_ROWS) * ld + (size_t)dd;
                _mm_prefetch((const char *)(q + ahead), _MM_HINT_T0);
                _mm_prefetch((const char *)(k + ahead), _MM_HINT_T0);
                _mm_prefetch((const char *)(v + ahead), _MM_HINT_T0);
            }
        for (int dd = 0; dd < d; dd++) kt[(size_t)dd * padded + (size_t)j] = kj[dd];
        for (int b = 0; b < blocks; b++) {
            __m512 vb = _mm512_loadu_ps(v + (size_t)j * ld + 16 * b);
            __m512 qb = _mm512_loadu_ps(q + (size_t)j * ld + 16 * b);
            _mm512_storeu_ps(vh + (size_t)j * (size_t)d + 16 * b, vb);
            /* The same rounding as scaling each query element where it is used. */
            _mm512_storeu_ps(qs + (size_t)j * (size_t)d + 16 * b,
                             _mm512_mul_ps(qb, _mm512_set1_ps(scale)));
        }
    }
    for (int dd = 0; dd < d; dd++)
        for (size_t j = (size_t)len; j < padded; j++) kt[(size_t)dd * padded + j] = 0.0f;
    ATTENTION_GROUPS(attention_rows_avx512, qs, d, vh, kt);
}

/* ---- bfloat16 attention (VDPBF16PS), for the bf16 precision ----
 *
 * The same steps as attention_grouped_avx512, with both products on bfloat16 pairs summed into
 * fp32: scores from the scaled queries and the keys rounded to bfloat16, the softmax in fp32,
 * then the probabilities rounded to bfloat16 against the values rounded likewise. Each sum runs
 * over the pairs in order, so a row's result still depends only on its sequence. Layouts, in
 * 32-bit pairs (low half the even element):
 * - kt2[p * padded + j] = (K[j][2p], K[j][2p + 1]): the keys transposed, in pairs of dimensions;
 * - vh2[p * d + c] = (V[2p][c], V[2p + 1][c]): the values in pairs of keys (the pair past an odd
 *   length is zero);
 * - qs2[i * d / 2 + p] = (s Q[i][2p], s Q[i][2p + 1]) with s the scale;
 * - a row's probabilities, rounded, in pairs of keys over its own scores (zero past the length). */

/* Lane 2t takes lane t of the low 16 bfloat16 and lane 2t + 1 lane t of the high 16. */
BF16_TARGET static inline __m512i pair_index(void)
{
    return _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                            6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
}

BF16_TARGET static inline __attribute__((always_inline)) void
attention_rows_bf16(const int rows, const int blocks, const uint32_t *qs2, const uint32_t *vh2,
                    int len, float *out, size_t ldo, float *scores, const uint32_t *kt2,
                    size_t padded)
{
    const int d = 16 * blocks, pairs = d / 2;
    __m512 vmax[ATTENTION_GROUP_ROWS], acc[ATTENTION_GROUP_ROWS][4];
    start_rows(rows, vmax);
    for (int j = 0; j < len; j += 64) {
        int chunks = score_chunks(rows, len, j, acc);
        for (int p = 0; p < pairs; p++) {
            const uint32_t *krow = kt2 + (size_t)p * padded + (size_t)j;
            __m512bh kv[4];
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++)
                kv[c] = c < chunks ? (__m512bh)_mm512_loadu_si512(krow + 16 * c)
                                   : (__m512bh)_mm512_setzero_si512();
#pragma GCC unroll 4
            for (int r = 0; r < rows; r++) {
                __m512bh qp = (__m512bh)_mm512_set1_epi32((int)qs2[(size_t)r * pairs + p]);
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++)
                    if (c < chunks) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qp, kv[c]);
            }
        }
        store_scores(rows, chunks, acc, scores, padded, j, len, vmax);
    }
    /* Softmax, then the exponentials rounded to bfloat16 in place (16 floats become 16 halves
     * of pairs at the row's start, after they are read) and summed as rounded, so the weights
     * the values get sum to one. */
    __m512 inv[ATTENTION_GROUP_ROWS];
    softmax_rows(rows, scores, padded, len, vmax, inv);
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++) {
        float *sr = scores + (size_t)r * padded;
        __m512 vsum = _mm512_setzero_ps();
        for (int j = 0; j < len; j += 16) {
            __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(sr + j));
            _mm256_storeu_si256((__m256i *)((uint16_t *)sr + j), (__m256i)h);
            vsum = _mm512_add_ps(vsum, _mm512_cvtpbh_ps(h));
        }
        inv[r] = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
    }
    __m512 o[ATTENTION_GROUP_ROWS][4];
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
        for (int b = 0; b < blocks; b++) o[r][b] = _mm512_setzero_ps();
    for (int p = 0; p < (len + 1) / 2; p++) {
        const uint32_t *vp = vh2 + (size_t)p * (size_t)d;
        __m512bh vv[4];
#pragma GCC unroll 4
        for (int b = 0; b < blocks; b++) vv[b] = (__m512bh)_mm512_loadu_si512(vp + 16 * b);
#pragma GCC unroll 4
        for (int r = 0; r < rows; r++) {
            const uint32_t *pr = (const uint32_t *)(scores + (size_t)r * padded);
            __m512bh pp = (__m512bh)_mm512_set1_epi32((int)pr[p]);
#pragma GCC unroll 4
            for (int b = 0; b < blocks; b++) o[r][b] = _mm512_dpbf16_ps(o[r][b], pp, vv[b]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
        for (int b = 0; b < blocks; b++)
            _mm512_storeu_ps(out + (size_t)r * ldo + 16 * b, _mm512_mul_ps(o[r][b], inv[r]));
}

/* Head widths 32 and 64: the head's operands copied out of the QKV rows into the pair layouts
 * above (rounded to bfloat16 as they are copied), then query rows in groups of four. */
BF16_TARGET static void attention_grouped_bf16(const float *q, const float *k, const float *v,
                                               size_t ld, int len, int d, float scale, float *out,
                                               size_t ldo, float *scores, float *head)
{
    size_t padded = (size_t)((len + 15) & ~15);
    int pairs = d / 2, blocks = d / 16;
    uint32_t *kt2 = (uint32_t *)head, *vh2 = kt2 + (size_t)pairs * padded,
             *qs2 = vh2 + (padded / 2) * (size_t)d;
    const __m512 vscale = _mm512_set1_ps(scale);
    /* Keys: 16 rows at a time, each row's pairs one vector per 32 dimensions, transposed. */
    for (int j0 = 0; j0 < len; j0 += 16) {
        for (int g = 0; g < d / 32; g++) {
            __m512 r[16], col[16];
            for (int i = 0; i < 16; i++) {
                if (j0 + i >= len) {
                    r[i] = _mm512_setzero_ps();
                    continue;
                }
                const float *kj = k + (size_t)(j0 + i) * ld + 32 * g;
                r[i] = _mm512_castsi512_ps(
                    (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(kj + 16), _mm512_loadu_ps(kj)));
            }
            transpose16_avx512(r, col);
            for (int p = 0; p < 16; p++)
                _mm512_storeu_ps((float *)kt2 + (size_t)(16 * g + p) * padded + j0, col[p]);
        }
    }
    /* Values: two rows interleaved per pair of keys; queries: scaled, then rounded in order. */
    const __m512i index = pair_index();
    for (int p = 0; p < (len + 1) / 2; p++) {
        const float *v0 = v + (size_t)(2 * p) * ld, *v1 = v0 + ld;
        bool second = 2 * p + 1 < len;
        for (int b = 0; b < blocks; b++) {
            __m512 lo = _mm512_loadu_ps(v0 + 16 * b);
            __m512 hi = second ? _mm512_loadu_ps(v1 + 16 * b) : _mm512_setzero_ps();
            __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
            _mm512_storeu_si512(vh2 + (size_t)p * (size_t)d + 16 * b,
                                _mm512_permutexvar_epi16(index, both));
        }
    }
    for (int i = 0; i < len; i++) {
        const float *qi = q + (size_t)i * ld;
        for (int g = 0; g < d / 32; g++) {
            __m512 lo = _mm512_mul_ps(_mm512_loadu_ps(qi + 32 * g), vscale);
            __m512 hi = _mm512_mul_ps(_mm512_loadu_ps(qi + 32 * g + 16), vscale);
            _mm512_storeu_si512(qs2 + (size_t)i * (size_t)pairs + 16 * g,
                                (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    }
    ATTENTION_GROUPS(attention_rows_bf16, qs2, pairs, vh2, kt2);
}

CLONES static void attention_head_generic(const float *q, const float *k, const float *v, size_t ld,
                                          int len, int d, float scale, float *out, size_t ldo,
                                          float *scores, float *kt)
{
    for (int j = 0; j < len; j++)
        for (int dd = 0; dd < d; dd++)
            kt[(size_t)dd * (size_t)len + (size_t)j] = k[(size_t)j * ld + (size_t)dd];
    for (int i = 0; i < len; i++) {
        scores_row(scores, q + (size_t)i * ld, kt, len, d, scale);
        float m = max_fixed(scores, len);
        exp_shifted(scores, len, m);
        float s = sum_fixed(scores, len);
        weighted_values(out + (size_t)i * ldo, scores, v, ld, len, d, 1.0f / s);
    }
}

void cpu_attention_head(const float *q, const float *k, const float *v, size_t ld, int len, int d,
                        float scale, float *out, size_t ldo, float *scores, float *head)
{
    if (cpu_isa() == CPU_ISA_AVX512 && (d == 32 || d == 64))
        attention_grouped_avx512(q, k, v, ld, len, d, scale, out, ldo, scores, head);
    else if (cpu_isa() == CPU_ISA_AVX512 && d % 16 == 0 && d <= ATTENTION_MAX_WIDTH)
        attention_head_avx512(q, k, v, ld, len, d, scale, out, ldo, scores, head);
    else
        attention_head_generic(q, k, v, ld, len, d, scale, out, ldo, scores, head);
}

bool cpu_attention_bf16_available(int d)
{
    return (d == 32 || d == 64) && cpu_bf16() != CPU_BF16_NONE;
}

void cpu_attention_head_bf16(const float *q, const float *k, const float *v, size_t ld, int len,
                             int d, float scale, float *out, size_t ldo, float *scores, float *head)
{
    if (cpu_attention_bf16_available(d))
        attention_grouped_bf16(q, k, v, ld, len, d, scale, out, ldo, scores, head);
    else
        cpu_attention_head(q, k, v, ld, len, d, scale, out, ldo, scores, head);
}
