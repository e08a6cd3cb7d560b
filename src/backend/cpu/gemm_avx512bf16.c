/* The bfloat16 GEMM on AVX512-BF16 (VDPBF16PS: two bfloat16 products summed into each fp32 lane),
 * for CPUs that have it without AMX (AMD Zen 4 and 5) and, through EMBEDRAG_CPU_BF16=avx512bf16,
 * on AMX CPUs too. cpu_gemm_task runs it with the fp32 GEMM's blocking; this file holds what
 * differs: rows rounded to bfloat16 pairs, and the micro-tile on pairs of k steps. */
#include "backend/cpu/kernels_internal.h"

/* Distance, in k pairs, at which the micro-tile prefetches the panel stream into L1: 8 pairs of
 * 128 bytes, the same 1 KiB ahead as the fp32 tile's 8 k steps. */
#define BF16_PREFETCH_PAIRS 8
/* bfloat16 elements of one k pair of a panel: 32 columns x 2. */
#define BF16_PAIR_ELEMENTS (2 * CPU_PANEL_WIDTH)

BF16_TARGET void cpu_bf16_interleave_rows(uint32_t *dst, const float *src, size_t lda, int tr,
                                          int kn, int valid)
{
    __mmask16 row_mask = (__mmask16)((1u << tr) - 1u);
    for (int k0 = 0; k0 < kn; k0 += 2 * 16) {
        __m512 r[16], col[16];
        __mmask16 lo_mask = tail_mask(valid - k0), hi_mask = tail_mask(valid - k0 - 16);
        for (int i = 0; i < 16; i++) {
            if (i >= tr) {
                r[i] = _mm512_setzero_ps();
                continue;
            }
            const float *row = src + (size_t)i * lda + (size_t)k0;
            /* Lane j of the result holds steps k0 + 2j (low half) and k0 + 2j + 1: the pair
             * order VDPBF16PS multiplies with the weights' pairs. */
            __m512bh pairs = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi_mask, row + 16),
                                                 _mm512_maskz_loadu_ps(lo_mask, row));
            r[i] = _mm512_castsi512_ps((__m512i)pairs);
        }
        transpose16_avx512(r, col);
        int width = (kn - k0) / 2 < 16 ? (kn - k0) / 2 : 16;
        for (int j = 0; j < width; j++)
            _mm512_mask_storeu_ps((float *)dst + (size_t)(k0 / 2 + j) * (size_t)tr, row_mask,
                                  col[j]);
    }
}

/* One micro-tile: `rows` rows x one panel over one k slice of `pairs` pairs. Like tile_avx512,
 * each output's sum runs over the k pairs in order, from zero or from the partial sum left in C,
 * then bias (+ residual) and the activation: an order fixed by k alone, the same for any `rows`,
 * tile, slicing or thread. The broadcast of A's pair folds into VDPBF16PS as a memory operand. */
BF16_TARGET static inline __attribute__((always_inline)) void
tile_bf16(const int rows, bool first, bool last, int pairs, const uint32_t *ap,
          const uint16_t *panel, const float *bias, int cols, cpu_epilogue epilogue, const float *R,
          float *C, size_t ldc, const char *ahead, int ahead_step)
{
    __mmask16 m0 = tail_mask(cols), m1 = tail_mask(cols - 16);
    __m512 c0[GEMM_TILE_ROWS], c1[GEMM_TILE_ROWS];
    tile_start(rows, first, c0, c1, C, ldc, m0, m1);
    for (int kp = 0; kp < pairs; kp++) {
        /* As in tile_avx512: `ahead` is what a later tile reads first, fetched into L2 now. */
        if (ahead) _mm_prefetch(ahead + (size_t)kp * (size_t)ahead_step, _MM_HINT_T1);
        const uint16_t *w = panel + (size_t)kp * BF16_PAIR_ELEMENTS;
        const uint16_t *w_ahead = w + BF16_PREFETCH_PAIRS * BF16_PAIR_ELEMENTS;
        _mm_prefetch((const char *)w_ahead, _MM_HINT_T0);
        _mm_prefetch((const char *)(w_ahead + CPU_PANEL_WIDTH), _MM_HINT_T0);
        __m512bh b0 = (__m512bh)_mm512_load_si512(w);
        __m512bh b1 = (__m512bh)_mm512_load_si512(w + CPU_PANEL_WIDTH);
#pragma GCC unroll 14
        for (int r = 0; r < rows; r++) {
            __m512bh a =
                (__m512bh)_mm512_set1_epi32((int)ap[(size_t)kp * (size_t)rows + (size_t)r]);
            c0[r] = _mm512_dpbf16_ps(c0[r], a, b0);
            c1[r] = _mm512_dpbf16_ps(c1[r], a, b1);
        }
    }
    tile_end(rows, last, c0, c1, bias, epilogue, R, C, ldc, m0, m1);
}

BF16_TARGET void cpu_tile_bf16(int rows, bool first, bool last, int pairs, const uint32_t *ap,
                               const uint16_t *panel, const float *bias, int cols,
                               cpu_epilogue epilogue, const float *R, float *C, size_t ldc,
                               const char *ahead, int ahead_step)
{
#define TILE_ARGS first, last, pairs, ap, panel, bias, cols, epilogue, R, C, ldc, ahead, ahead_step
#ifdef EMBEDRAG_LIGHT_KERNELS
    /* Sanitizer and fuzz builds: the row count at run time, as in tile_avx512_dispatch. */
    tile_bf16(rows, TILE_ARGS);
#else
#define TILE_CALL(n) tile_bf16(n, TILE_ARGS)
    GEMM_SWITCH_TILE_ROWS(rows, TILE_CALL)
#undef TILE_CALL
#endif
#undef TILE_ARGS
}
