/* What the CPU kernel files share and nothing outside them includes: the instruction-set choice,
 * the target attributes, and the small helpers (masks, e^x, activations, the GEMM's row epilogue)
 * that each kernel needs inlined into its own loops, so they are static inline here rather than
 * functions of one file. */
#ifndef EMBEDRAG_CPU_KERNELS_INTERNAL_H
#define EMBEDRAG_CPU_KERNELS_INTERNAL_H

#include "backend/cpu/kernels.h"

#include <immintrin.h>
#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Lanes of the fixed-order reductions (one AVX-512 register of floats). */
#define REDUCE_LANES 16

#if defined(__clang__)
/* clang 14 emits no resolver for target_clones functions called only from other files; the clang
 * build (used for sanitizers and fuzzing) takes the baseline versions, same results. */
#define CLONES
#else
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#define AVX512_TARGET __attribute__((target("avx512f,avx512dq,fma")))
/* The VDPBF16PS kernels (the bf16 GEMM tile and attention). */
#define BF16_TARGET __attribute__((target("avx512f,avx512dq,avx512bw,avx512bf16,fma")))

/* Rows per micro-tile of the AVX-512 GEMMs: 14 rows x 2 registers = 28 accumulators, leaving
 * registers for the two weight vectors and the broadcast. */
#define GEMM_TILE_ROWS 14
/* switch (rows) running CALL(n) with n = rows, a constant, so that each call is a tile
 * specialized for its row count (1 to GEMM_TILE_ROWS). */
/* clang-format off */
#define GEMM_SWITCH_TILE_ROWS(rows, CALL)                                                          \
    switch (rows) {                                                                                \
    case 1: CALL(1); break;   case 2: CALL(2); break;   case 3: CALL(3); break;                    \
    case 4: CALL(4); break;   case 5: CALL(5); break;   case 6: CALL(6); break;                    \
    case 7: CALL(7); break;   case 8: CALL(8); break;   case 9: CALL(9); break;                    \
    case 10: CALL(10); break; case 11: CALL(11); break; case 12: CALL(12); break;                  \
    case 13: CALL(13); break; case 14: CALL(14); break;                                            \
    default: break;                                                                                \
    }
/* clang-format on */

/* The kernels' instruction set, chosen once from the CPU's features (see isa.c). */
enum { CPU_ISA_GENERIC, CPU_ISA_AVX2, CPU_ISA_AVX512 };
int cpu_isa(void);

/* The first `remaining` of 16 lanes (none when remaining <= 0). */
static inline __mmask16 tail_mask(int remaining)
{
    return remaining >= 16  ? (__mmask16)0xFFFF
           : remaining <= 0 ? (__mmask16)0
                            : (__mmask16)((1u << remaining) - 1u);
}

/* Elements of one AMX weight block: two tiles of 16 k pairs x 16 columns x 2. */
#define AMX_BLOCK_ELEMENTS 1024

/* The AMX GEMM task behind cpu_gemm_task (gemm_amx.c); a16 is the thread's scratch. */
void cpu_gemm_task_amx(const cpu_gemm_plan *plan, int task, const float *A, size_t lda,
                       const cpu_packed *packed, cpu_epilogue epilogue, const float *R, float *C,
                       size_t ldc, uint16_t *a16);

/* The bfloat16 GEMM that runs (see cpu_bf16_kernel in isa.c). */
enum { CPU_BF16_NONE, CPU_BF16_AMX, CPU_BF16_AVX512 };
int cpu_bf16(void);

/* The VDPBF16PS GEMM's pieces (gemm_avx512bf16.c), which cpu_gemm_task runs. Interleaving: for
 * tr <= 16 rows of src and kn (even) k steps of which the first `valid` are src's and the rest
 * zero, dst[kp * tr + i] = the bfloat16 pair (src[i][2 kp], src[i][2 kp + 1]), rounded to nearest
 * even, the lower step in the lower half. */
void cpu_bf16_interleave_rows(uint32_t *dst, const float *src, size_t lda, int tr, int kn,
                              int valid);
/* One micro-tile of `rows` interleaved rows `ap` x one panel over `pairs` k pairs (see
 * tile_avx512 for the other arguments). */
void cpu_tile_bf16(int rows, bool first, bool last, int pairs, const uint32_t *ap,
                   const uint16_t *panel, const float *bias, int cols, cpu_epilogue epilogue,
                   const float *R, float *C, size_t ldc, const char *ahead, int ahead_step);

/* ---- element-wise math, written so GCC can vectorize loops that call it ---- */

static inline float bits_to_float(int32_t bits)
{
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* e^x with relative error below 2e-7 on [-87, 88]: x = n ln2 + r with |r| <= ln2/2, a degree-7
 * Taylor polynomial for e^r, and 2^n built in the exponent bits. Inputs are clamped so 2^n stays
 * a normal float; below -87 the result is ~1e-38, indistinguishable from 0 in our sums. */
static inline float exp_approx(float x)
{
    const float log2e = 1.44269504f, ln2_hi = 0.693145752f, ln2_lo = 1.42860677e-6f;
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    /* Round to nearest by adding and removing 1.5 * 2^23 (floorf is a library call GCC will not
     * vectorize); |x * log2e| < 128 keeps this exact. */
    const float round_magic = 12582912.0f;
    float n = (x * log2e + round_magic) - round_magic;
    float r = x - n * ln2_hi - n * ln2_lo;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * bits_to_float(((int32_t)n + 127) << 23);
}

/* Exact (erf) GELU: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)). erf comes from Abramowitz and
 * Stegun 7.1.26 (absolute error <= 1.5e-7), arranged so negative inputs compute the small tail
 * q = 1 - erf|z| directly instead of cancelling 1 - (1 - q). */
static inline float gelu_erf(float x)
{
    const float p = 0.3275911f, a1 = 0.254829592f, a2 = -0.284496736f, a3 = 1.421413741f,
                a4 = -1.453152027f, a5 = 1.061405429f;
    float z = fabsf(x) * 0.70710678f;
    float t = 1.0f / (1.0f + p * z);
    float poly = ((((a5 * t + a4) * t + a3) * t + a2) * t + a1) * t;
    float q = poly * exp_approx(-z * z);
    float one_plus_erf = x >= 0.0f ? 2.0f - q : q;
    return 0.5f * x * one_plus_erf;
}

/* GELU's tanh approximation (gelu_new / gelu_pytorch_tanh), tanh via e^(2y). */
static inline float gelu_tanh(float x)
{
    float y = 0.7978845608f * (x + 0.044715f * x * x * x);
    y = y > 15.0f ? 15.0f : (y < -15.0f ? -15.0f : y);
    float e = exp_approx(2.0f * y);
    float th = (e - 1.0f) / (e + 1.0f);
    return 0.5f * x * (1.0f + th);
}

/* Sum of x[0..n) in REDUCE_LANES fixed lanes, then a fixed pairwise tree. */
static inline float sum_fixed(const float *x, int n)
{
    float lanes[REDUCE_LANES] = {0};
    int i = 0;
    for (; i + REDUCE_LANES <= n; i += REDUCE_LANES)
        for (int l = 0; l < REDUCE_LANES; l++) lanes[l] += x[i + l];
    for (int l = 0; i + l < n; l++) lanes[l] += x[i + l];
    for (int width = REDUCE_LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++) lanes[l] += lanes[l + width];
    return lanes[0];
}

/* e^x on 16 lanes, the same method as exp_approx: 2^n applied with scalef. */
AVX512_TARGET static inline __m512 exp_avx512(__m512 x)
{
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* The activations of apply_activation on 16 lanes, same formulas. */
AVX512_TARGET static inline __m512 activation_avx512(__m512 x, cpu_epilogue epilogue)
{
    if (epilogue == CPU_EPILOGUE_BIAS_GELU) {
        __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678f));
        __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f),
                                                                       z, _mm512_set1_ps(1.0f)));
        __m512 poly = _mm512_set1_ps(1.061405429f);
        poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-1.453152027f));
        poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
        poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
        poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
        poly = _mm512_mul_ps(poly, t);
        __m512 q = _mm512_mul_ps(
            poly, exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(z, z))));
        __mmask16 positive = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
        __m512 one_plus_erf = _mm512_mask_sub_ps(q, positive, _mm512_set1_ps(2.0f), q);
        return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), one_plus_erf);
    }
    if (epilogue == CPU_EPILOGUE_BIAS_GELU_TANH) {
        __m512 y = _mm512_mul_ps(
            _mm512_set1_ps(0.7978845608f),
            _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x), _mm512_mul_ps(x, x), x));
        y = _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-15.0f)), _mm512_set1_ps(15.0f));
        __m512 e = exp_avx512(_mm512_add_ps(y, y));
        __m512 th = _mm512_div_ps(_mm512_sub_ps(e, _mm512_set1_ps(1.0f)),
                                  _mm512_add_ps(e, _mm512_set1_ps(1.0f)));
        return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x),
                             _mm512_add_ps(_mm512_set1_ps(1.0f), th));
    }
    if (epilogue == CPU_EPILOGUE_BIAS_RELU) return _mm512_max_ps(x, _mm512_setzero_ps());
    return x;
}

/* The end of one output row's 32 columns: sums + bias (+ residual row R), the activation, then
 * a masked store. Shared by the fp32 tile and the AMX epilogue. */
AVX512_TARGET static inline __attribute__((always_inline)) void
finish_row(__m512 v0, __m512 v1, __m512 bias0, __m512 bias1, const float *R, float *C, __mmask16 m0,
           __mmask16 m1, cpu_epilogue epilogue)
{
    v0 = _mm512_add_ps(v0, bias0);
    v1 = _mm512_add_ps(v1, bias1);
    if (R) {
        v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, R));
        v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, R + 16));
    }
    if (epilogue != CPU_EPILOGUE_BIAS && epilogue != CPU_EPILOGUE_BIAS_RESIDUAL) {
        v0 = activation_avx512(v0, epilogue);
        v1 = activation_avx512(v1, epilogue);
    }
    _mm512_mask_storeu_ps(C, m0, v0);
    _mm512_mask_storeu_ps(C + 16, m1, v1);
}

/* A micro-tile's sums at the start of a k slice: zero for the first slice, else the partial sums
 * an earlier slice left in C (a float stored and reloaded is unchanged). */
AVX512_TARGET static inline __attribute__((always_inline)) void
tile_start(const int rows, bool first, __m512 *c0, __m512 *c1, const float *C, size_t ldc,
           __mmask16 m0, __mmask16 m1)
{
    if (first) {
#pragma GCC unroll 14
        for (int r = 0; r < rows; r++) {
            c0[r] = _mm512_setzero_ps();
            c1[r] = _mm512_setzero_ps();
        }
    } else {
#pragma GCC unroll 14
        for (int r = 0; r < rows; r++) {
            c0[r] = _mm512_maskz_loadu_ps(m0, C + (size_t)r * ldc);
            c1[r] = _mm512_maskz_loadu_ps(m1, C + (size_t)r * ldc + 16);
        }
    }
}

/* A micro-tile's sums at the end of a k slice: stored to C as partial sums, or after the last
 * slice finished with bias, residual and activation. */
AVX512_TARGET static inline __attribute__((always_inline)) void
tile_end(const int rows, bool last, const __m512 *c0, const __m512 *c1, const float *bias,
         cpu_epilogue epilogue, const float *R, float *C, size_t ldc, __mmask16 m0, __mmask16 m1)
{
    if (!last) {
#pragma GCC unroll 14
        for (int r = 0; r < rows; r++) {
            _mm512_mask_storeu_ps(C + (size_t)r * ldc, m0, c0[r]);
            _mm512_mask_storeu_ps(C + (size_t)r * ldc + 16, m1, c1[r]);
        }
        return;
    }
    __m512 bias0 = _mm512_loadu_ps(bias), bias1 = _mm512_loadu_ps(bias + 16);
#pragma GCC unroll 14
    for (int r = 0; r < rows; r++)
        finish_row(c0[r], c1[r], bias0, bias1, R ? R + (size_t)r * ldc : NULL, C + (size_t)r * ldc,
                   m0, m1, epilogue);
}

/* col[j] lane i = r[i] lane j: a 16 x 16 transpose of 32-bit elements in registers (only moves
 * bits, so it serves bfloat16 pairs as well as floats). */
AVX512_TARGET static inline __attribute__((always_inline)) void
transpose16_avx512(const __m512 r[16], __m512 col[16])
{
    __m512 t[16], u[16];
    /* Pairs of rows, then 4 x 4 blocks within each 128-bit lane ... */
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int g = 0; g < 4; g++) {
        u[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
        u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
        u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
        u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
    }
    /* ... then lanes: u[4g + c] lane L holds column 4L + c of rows 4g .. 4g + 3. */
    for (int c = 0; c < 4; c++) {
        __m512 low_a = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44);
        __m512 low_b = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
        __m512 high_a = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
        __m512 high_b = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
        col[c] = _mm512_shuffle_f32x4(low_a, low_b, 0x88);
        col[4 + c] = _mm512_shuffle_f32x4(low_a, low_b, 0xDD);
        col[8 + c] = _mm512_shuffle_f32x4(high_a, high_b, 0x88);
        col[12 + c] = _mm512_shuffle_f32x4(high_a, high_b, 0xDD);
    }
}

#endif
