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
    __m512 vmax[ATTENTION_GROUP_ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++) vmax[r] = _mm512_set1_ps(-INFINITY);
    for (int j = 0; j < len; j += 64) {
        int chunks = (len - j + 15) / 16;
        if (chunks > 4) chunks = 4;
        __m512 acc[ATTENTION_GROUP_ROWS][4];
#pragma GCC unroll 4
        for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
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
#pragma GCC unroll 4
        for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++)
                if (c < chunks) {
                    _mm512_storeu_ps(scores + (size_t)r * padded + j + 16 * c, acc[r][c]);
                    vmax[r] = _mm512_mask_max_ps(vmax[r], tail_mask(len - j - 16 * c), vmax[r],
                                                 acc[r][c]);
                }
    }
    __m512 inv[ATTENTION_GROUP_ROWS];
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
    for (int i = 0; i < len; i += ATTENTION_GROUP_ROWS) {
        int rows = len - i < ATTENTION_GROUP_ROWS ? len - i : ATTENTION_GROUP_ROWS;
        const float *qi = qs + (size_t)i * (size_t)d;
        float *oi = out + (size_t)i * ldo;
#define ATTENTION_CASE(r, b)                                                                       \
    if (rows == r && d == 16 * b) {                                                                \
        attention_rows_avx512(r, b, qi, vh, len, oi, ldo, scores, kt, padded);                     \
        continue;                                                                                  \
    }
        ATTENTION_CASE(4, 2)
        ATTENTION_CASE(3, 2)
        ATTENTION_CASE(2, 2)
        ATTENTION_CASE(1, 2)
        ATTENTION_CASE(4, 4)
        ATTENTION_CASE(3, 4)
        ATTENTION_CASE(2, 4)
        ATTENTION_CASE(1, 4)
#undef ATTENTION_CASE
    }
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
