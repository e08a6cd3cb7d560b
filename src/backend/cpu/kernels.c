/* CPU kernels (see kernels.h). The GEMM is written by hand rather than taken from a BLAS because
 * no BLAS promises that a row's result is independent of the number of rows and threads (they
 * switch kernels and blocking by shape: OpenBLAS takes a different path for M = 1, oneDNN for
 * small M), and that independence is what makes a text's vector identical alone or in a batch.
 * Measured on the development machine it also beats Debian's OpenBLAS and oneDNN at the small
 * shapes of a single query (BENCHMARKS.md). Row-wise operations are plain C loops that GCC
 * vectorizes per target (target_clones), with reductions kept in 16 fixed lanes. */
#include "backend/cpu/kernels.h"

#include "util/error.h"

#include <cpuid.h>
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Rows per micro-tile of the AVX-512 GEMM: 14 rows x 2 registers = 28 accumulators, leaving
 * registers for the two weight vectors and the broadcast. */
#define GEMM_TILE_ROWS 14
/* Rows per parallel task: 8 micro-tiles, so the A block (112 x k floats) stays in L2 while
 * the panels stream past it. */
#define GEMM_BLOCK_ROWS (GEMM_TILE_ROWS * 8)
/* Panels a task must cover before interleaving its rows is worth the copy. Measured one
 * thread, 2048 x 1536 x 384 (12 panels): 145 GFLOP/s reading rows in place, 160 interleaved;
 * a 16-token query is as fast either way. */
#define GEMM_INTERLEAVE_MIN_PANELS 8
/* Panel groups per thread when a GEMM has few row blocks (a query). One contiguous group each
 * measured fastest: 16-token query p50, two rounds, 1 / 2 / 3 / 4 groups per thread: 1.49 /
 * 1.54 / 1.63 / 1.73 ms (6 layers) and 2.79 / 2.89 / 3.08 / 3.44 ms (12 layers, F16). */
#define GEMM_GROUPS_PER_THREAD 1
/* Bytes of one k slice of all panels: a task sweeps a slice once per micro-tile, so it should
 * stay in L2 (2 MB per core here) beside the A block. Measured one thread, 2048 x 384 x 1152:
 * slicing plus tile-outer order took the GEMM from 104 to 157-163 GFLOP/s (bench/gemm_compare). */
#define GEMM_SLICE_BYTES (1024 * 1024)
/* Slice bounds in k rows: long enough to amortize loading and storing the partial sums. */
#define GEMM_SLICE_MIN_K 64
#define GEMM_SLICE_MAX_K 384
/* Distance, in k steps, at which the micro-tile prefetches the panel stream into L1. */
#define GEMM_PREFETCH_K 8
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

/* ---- instruction-set choice (computed once, read-only afterwards) ---- */

enum { ISA_GENERIC, ISA_AVX2, ISA_AVX512 };
static int kernel_isa = -1;
static pthread_once_t kernel_isa_once = PTHREAD_ONCE_INIT;

static void choose_isa(void)
{
    const char *forced = getenv("EMBEDRAG_CPU_ISA");
    __builtin_cpu_init();
    bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
    if (forced && strcmp(forced, "generic") == 0)
        kernel_isa = ISA_GENERIC;
    else if (forced && strcmp(forced, "avx2") == 0 && avx2)
        kernel_isa = ISA_AVX2;
    else if (avx512)
        kernel_isa = ISA_AVX512;
    else if (avx2)
        kernel_isa = ISA_AVX2;
    else
        kernel_isa = ISA_GENERIC;
}

static int isa(void)
{
    pthread_once(&kernel_isa_once, choose_isa);
    return kernel_isa;
}

const char *cpu_kernels_isa(void)
{
    return isa() == ISA_AVX512 ? "avx512" : isa() == ISA_AVX2 ? "avx2" : "generic";
}

/* The first `remaining` of 16 lanes (none when remaining <= 0). */
static inline __mmask16 tail_mask(int remaining)
{
    return remaining >= 16  ? (__mmask16)0xFFFF
           : remaining <= 0 ? (__mmask16)0
                            : (__mmask16)((1u << remaining) - 1u);
}

/* ---- packing ---- */

/* fp32 -> IEEE half, rounding to nearest (exact for values that came from half precision). */
__attribute__((target("f16c"))) static uint16_t to_half(float x)
{
    return (uint16_t)_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);
}

int cpu_pack(cpu_packed *out, int count, const float *const *weights, const float *const *biases,
             const int *rows, int k, bool half)
{
    memset(out, 0, sizeof *out);
    /* Every AVX-512 CPU has F16C (and clang 14 cannot test for it by name). */
    half = half && isa() == ISA_AVX512;
    int n = 0;
    for (int i = 0; i < count; i++) n += rows[i];
    int panels = (n + CPU_PANEL_WIDTH - 1) / CPU_PANEL_WIDTH;
    /* Only the AVX-512 tile continues partial sums across slices; the others take k whole. */
    int slice_k = k;
    if (isa() == ISA_AVX512) {
        size_t row_bytes = (size_t)panels * CPU_PANEL_WIDTH * (half ? 2 : 4);
        size_t fit = GEMM_SLICE_BYTES / row_bytes / 16 * 16;
        slice_k = fit < GEMM_SLICE_MIN_K   ? GEMM_SLICE_MIN_K
                  : fit > GEMM_SLICE_MAX_K ? GEMM_SLICE_MAX_K
                                           : (int)fit;
        if (slice_k > k) slice_k = k;
    }
    size_t elements = (size_t)panels * (size_t)k * CPU_PANEL_WIDTH;
    size_t element_size = half ? sizeof(uint16_t) : sizeof(float);
    void *data = aligned_alloc(64, (elements * element_size + 63) / 64 * 64);
    float *bias = calloc((size_t)panels * CPU_PANEL_WIDTH, sizeof(float));
    if (!data || !bias) {
        free(data);
        free(bias);
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory packing a %d x %d weight", n, k);
    }
    memset(data, 0, elements * element_size);
    int col = 0;
    for (int i = 0; i < count; i++) {
        for (int r = 0; r < rows[i]; r++, col++) {
            const float *src = weights[i] + (size_t)r * (size_t)k;
            for (int ks = 0; ks < k; ks += slice_k) {
                int kn = k - ks < slice_k ? k - ks : slice_k;
                size_t base = (size_t)ks * (size_t)panels * CPU_PANEL_WIDTH +
                              (size_t)(col / CPU_PANEL_WIDTH) * (size_t)kn * CPU_PANEL_WIDTH +
                              (size_t)(col % CPU_PANEL_WIDTH);
                if (half)
                    for (int kk = 0; kk < kn; kk++)
                        ((uint16_t *)data)[base + (size_t)kk * CPU_PANEL_WIDTH] =
                            to_half(src[ks + kk]);
                else
                    for (int kk = 0; kk < kn; kk++)
                        ((float *)data)[base + (size_t)kk * CPU_PANEL_WIDTH] = src[ks + kk];
            }
            bias[col] = biases[i] ? biases[i][r] : 0.0f;
        }
    }
    out->n = n;
    out->k = k;
    out->panels = panels;
    out->slice_k = slice_k;
    if (half)
        out->data16 = data;
    else
        out->data = data;
    out->bias = bias;
    return 0;
}

void cpu_packed_free(cpu_packed *packed)
{
    if (!packed) return;
    free(packed->data);
    free(packed->data16);
    free(packed->data_amx);
    free(packed->bias);
    memset(packed, 0, sizeof *packed);
}

/* ---- bfloat16 on AMX: detection and packing ---- */

/* Linux's interface for AMX state (arch/x86/include/uapi/asm/prctl.h): a process must ask for
 * the tile data state before its first tile instruction, or that instruction faults. */
#define EMBEDRAG_ARCH_REQ_XCOMP_PERM 0x1023
#define EMBEDRAG_XFEATURE_XTILEDATA 18

static bool amx_ok;
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;

static void detect_amx(void)
{
#if defined(__linux__) && defined(SYS_arch_prctl)
    unsigned a, b, c, d;
    if (isa() != ISA_AVX512 || __get_cpuid_max(0, NULL) < 7) return;
    __cpuid_count(7, 0, a, b, c, d);
    bool amx_bf16 = d & (1u << 22), amx_tile = d & (1u << 24);
    __cpuid_count(7, 1, a, b, c, d);
    bool avx512_bf16 = a & (1u << 5);
    __cpuid(1, a, b, c, d);
    bool osxsave = c & (1u << 27);
    if (!amx_bf16 || !amx_tile || !avx512_bf16 || !osxsave) return;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return; /* the OS does not manage tile state */
    if (syscall(SYS_arch_prctl, EMBEDRAG_ARCH_REQ_XCOMP_PERM, EMBEDRAG_XFEATURE_XTILEDATA) != 0)
        return;
    amx_ok = true;
#endif
}

bool cpu_amx_available(void)
{
    pthread_once(&amx_once, detect_amx);
    return amx_ok;
}

/* fp32 -> bfloat16, rounding to nearest even (what the AMX path does to activations too); NaN
 * stays a quiet NaN. */
static uint16_t to_bf16(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Elements of one AMX weight block: two tiles of 16 k pairs x 16 columns x 2. */
#define AMX_BLOCK_ELEMENTS 1024

int cpu_pack_bf16(cpu_packed *out, int count, const float *const *weights,
                  const float *const *biases, const int *rows, int k)
{
    memset(out, 0, sizeof *out);
    if (!cpu_amx_available())
        return err_set(EMBEDRAG_ERR_UNSUPPORTED, "this CPU cannot run the bfloat16 (AMX) GEMM");
    int n = 0;
    for (int i = 0; i < count; i++) n += rows[i];
    int panels = (n + CPU_PANEL_WIDTH - 1) / CPU_PANEL_WIDTH;
    int k_pad = (k + 31) / 32 * 32, blocks = k_pad / 32;
    size_t elements = (size_t)panels * (size_t)blocks * AMX_BLOCK_ELEMENTS;
    uint16_t *data = aligned_alloc(64, elements * sizeof(uint16_t));
    float *bias = calloc((size_t)panels * CPU_PANEL_WIDTH, sizeof(float));
    if (!data || !bias) {
        free(data);
        free(bias);
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory packing a %d x %d weight", n, k);
    }
    memset(data, 0, elements * sizeof(uint16_t));
    int col = 0;
    for (int i = 0; i < count; i++)
        for (int r = 0; r < rows[i]; r++, col++) {
            const float *src = weights[i] + (size_t)r * (size_t)k;
            int p = col / CPU_PANEL_WIDTH, t = col % CPU_PANEL_WIDTH / 16, j = col % 16;
            for (int kk = 0; kk < k; kk++) {
                int kb = kk / 32, kp = kk % 32 / 2, e = kk % 2;
                size_t at = (((size_t)p * (size_t)blocks + (size_t)kb) * 2 + (size_t)t) * 512 +
                            (size_t)kp * 32 + (size_t)j * 2 + (size_t)e;
                data[at] = to_bf16(src[kk]);
            }
            bias[col] = biases[i] ? biases[i][r] : 0.0f;
        }
    out->n = n;
    out->k = k;
    out->panels = panels;
    out->slice_k = k;
    out->k_pad = k_pad;
    out->data_amx = data;
    out->bias = bias;
    return 0;
}

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

CLONES static void apply_activation(float *x, int n, cpu_epilogue epilogue)
{
    switch (epilogue) {
    case CPU_EPILOGUE_BIAS_GELU:
        for (int i = 0; i < n; i++) x[i] = gelu_erf(x[i]);
        break;
    case CPU_EPILOGUE_BIAS_GELU_TANH:
        for (int i = 0; i < n; i++) x[i] = gelu_tanh(x[i]);
        break;
    case CPU_EPILOGUE_BIAS_RELU:
        for (int i = 0; i < n; i++) x[i] = x[i] > 0.0f ? x[i] : 0.0f;
        break;
    default:
        break;
    }
}

/* ---- GEMM ---- */

cpu_gemm_plan cpu_gemm_plan_make(int m, const cpu_packed *packed, int threads)
{
    cpu_gemm_plan plan;
    plan.m = m;
    /* Near-equal row blocks of at most GEMM_BLOCK_ROWS, a whole number per thread when there
     * are several per thread (2048 rows made 18 full blocks and one of 32: one thread ran 10
     * blocks, the other 9). Rows never depend on the blocking, only the speed does. */
    int blocks = (m + GEMM_BLOCK_ROWS - 1) / GEMM_BLOCK_ROWS;
    if (threads > 1 && blocks > threads) blocks = (blocks + threads - 1) / threads * threads;
    plan.rows_per_block = (m + blocks - 1) / blocks;
    plan.row_blocks = (m + plan.rows_per_block - 1) / plan.rows_per_block;
    /* With few row blocks (a query, a small batch), split the panels into near-equal groups, a
     * whole number per thread, so the threads finish together. Each group re-reads the A block
     * and starts a new weight stream, so no more groups than that. */
    int groups = 1;
    if (threads > 1 && plan.row_blocks < 2 * threads) {
        int per_thread =
            (GEMM_GROUPS_PER_THREAD * threads + plan.row_blocks - 1) / plan.row_blocks / threads;
        groups = threads * (per_thread < 1 ? 1 : per_thread);
    }
    if (groups > packed->panels) groups = packed->panels;
    plan.panel_groups = groups;
    return plan;
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

/* One micro-tile: `rows` rows x one panel over one k slice of kn steps, accumulated in
 * registers. The first slice starts from zero, later ones continue from the partial sums left in
 * C; the last adds bias and residual and applies the activation. Each output element is
 * sum_kk A[r][kk] * W[col][kk] in kk order, with fused multiply-adds, then + bias (+ residual):
 * the same for any `rows` and any slicing (a float stored and reloaded is unchanged). */
AVX512_TARGET static inline __attribute__((always_inline)) void
tile_avx512(const int rows, const bool interleaved, const bool half, bool first, bool last, int kn,
            const float *ap, size_t lda, const void *panel_data, const float *bias, int cols,
            cpu_epilogue epilogue, const float *R, float *C, size_t ldc, const char *ahead,
            int ahead_step)
{
    __mmask16 m0 = tail_mask(cols), m1 = tail_mask(cols - 16);
    __m512 c0[GEMM_TILE_ROWS], c1[GEMM_TILE_ROWS];
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
    for (int kk = 0; kk < kn; kk++) {
        __m512 b0, b1;
        /* `ahead` is weight data a later tile reads first: fetched into L2 now, so the stream
         * from L3 overlaps this tile's arithmetic. */
        if (ahead) _mm_prefetch(ahead + (size_t)kk * (size_t)ahead_step, _MM_HINT_T1);
        /* Prefetching past the panel's end reaches the next panel of the slice, which is what
         * runs next. */
        if (half) {
            const uint16_t *p16 = (const uint16_t *)panel_data + (size_t)kk * CPU_PANEL_WIDTH;
            _mm_prefetch((const char *)(p16 + GEMM_PREFETCH_K * CPU_PANEL_WIDTH), _MM_HINT_T0);
            b0 = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)p16));
            b1 = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(p16 + 16)));
        } else {
            const float *p32 = (const float *)panel_data + (size_t)kk * CPU_PANEL_WIDTH;
            _mm_prefetch((const char *)(p32 + GEMM_PREFETCH_K * CPU_PANEL_WIDTH), _MM_HINT_T0);
            _mm_prefetch((const char *)(p32 + GEMM_PREFETCH_K * CPU_PANEL_WIDTH + 16), _MM_HINT_T0);
            b0 = _mm512_load_ps(p32);
            b1 = _mm512_load_ps(p32 + 16);
        }
#pragma GCC unroll 14
        for (int r = 0; r < rows; r++) {
            __m512 a = _mm512_set1_ps(interleaved ? ap[(size_t)kk * (size_t)rows + (size_t)r]
                                                  : ap[(size_t)r * lda + (size_t)kk]);
            c0[r] = _mm512_fmadd_ps(a, b0, c0[r]);
            c1[r] = _mm512_fmadd_ps(a, b1, c1[r]);
        }
    }
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

AVX512_TARGET static void tile_avx512_dispatch(int rows, bool interleaved, bool half, bool first,
                                               bool last, int k, const float *ap, size_t lda,
                                               const void *panel, const float *bias, int cols,
                                               cpu_epilogue epilogue, const float *R, float *C,
                                               size_t ldc, const char *ahead, int ahead_step)
{
#define TILE_ARGS first, last, k, ap, lda, panel, bias, cols, epilogue, R, C, ldc, ahead, ahead_step
#ifdef EMBEDRAG_LIGHT_KERNELS
    /* Sanitizer and fuzz builds: one instance per variant with the row count at run time. The
     * 56 specialized instances below took clang over ten minutes and 11 GB to instrument; the
     * arithmetic is the same. */
    if (interleaved && half)
        tile_avx512(rows, true, true, TILE_ARGS);
    else if (interleaved)
        tile_avx512(rows, true, false, TILE_ARGS);
    else if (half)
        tile_avx512(rows, false, true, TILE_ARGS);
    else
        tile_avx512(rows, false, false, TILE_ARGS);
}
#else
    switch (rows) {
#define TILE_CASE(n)                                                                               \
    case n:                                                                                        \
        if (interleaved && half)                                                                   \
            tile_avx512(n, true, true, TILE_ARGS);                                                 \
        else if (interleaved)                                                                      \
            tile_avx512(n, true, false, TILE_ARGS);                                                \
        else if (half)                                                                             \
            tile_avx512(n, false, true, TILE_ARGS);                                                \
        else                                                                                       \
            tile_avx512(n, false, false, TILE_ARGS);                                               \
        break;
        TILE_CASE(1)
        TILE_CASE(2)
        TILE_CASE(3)
        TILE_CASE(4)
        TILE_CASE(5)
        TILE_CASE(6)
        TILE_CASE(7)
        TILE_CASE(8)
        TILE_CASE(9)
        TILE_CASE(10)
        TILE_CASE(11)
        TILE_CASE(12)
        TILE_CASE(13)
        TILE_CASE(14)
#undef TILE_CASE
    default:
        break;
    }
}
#endif
#undef TILE_ARGS

/* The AVX2 tile (CPUs without AVX-512): two rows x one panel in 8 of the 16 ymm registers, the
 * four weight vectors loaded once per k for both rows. Same per-element order as the AVX-512
 * tile (fused multiply-adds along k, then bias and residual); activations follow in a pass. */
#define AVX2_TARGET __attribute__((target("avx2,fma")))
AVX2_TARGET static inline __attribute__((always_inline)) void
tile_avx2_rows(const int rows, int k, const float *A, size_t lda, const float *panel,
               const float *bias, int cols, const float *R, float *C, size_t ldc)
{
    __m256 acc[2][4];
#pragma GCC unroll 2
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++) acc[r][q] = _mm256_setzero_ps();
    for (int kk = 0; kk < k; kk++) {
        const float *b = panel + (size_t)kk * CPU_PANEL_WIDTH;
        __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8), b2 = _mm256_load_ps(b + 16),
               b3 = _mm256_load_ps(b + 24);
#pragma GCC unroll 2
        for (int r = 0; r < rows; r++) {
            __m256 a = _mm256_broadcast_ss(A + (size_t)r * lda + (size_t)kk);
            acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
            acc[r][2] = _mm256_fmadd_ps(a, b2, acc[r][2]);
            acc[r][3] = _mm256_fmadd_ps(a, b3, acc[r][3]);
        }
    }
#pragma GCC unroll 2
    for (int r = 0; r < rows; r++) {
        float out[CPU_PANEL_WIDTH];
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++)
            _mm256_storeu_ps(out + 8 * q, _mm256_add_ps(acc[r][q], _mm256_loadu_ps(bias + 8 * q)));
        float *c = C + (size_t)r * ldc;
        for (int j = 0; j < cols; j++) c[j] = R ? out[j] + R[(size_t)r * ldc + (size_t)j] : out[j];
    }
}

AVX2_TARGET static void tile_avx2(int rows, int k, const float *A, size_t lda, const float *panel,
                                  const float *bias, int cols, const float *R, float *C, size_t ldc)
{
    int r = 0;
    for (; r + 2 <= rows; r += 2)
        tile_avx2_rows(2, k, A + (size_t)r * lda, lda, panel, bias, cols,
                       R ? R + (size_t)r * ldc : NULL, C + (size_t)r * ldc, ldc);
    if (r < rows)
        tile_avx2_rows(1, k, A + (size_t)r * lda, lda, panel, bias, cols,
                       R ? R + (size_t)r * ldc : NULL, C + (size_t)r * ldc, ldc);
}

/* The portable tile: same loop order, plain multiply and add (no fused multiply-add, since
 * ISO C mode does not contract), one row at a time. */
static void tile_generic(int rows, int k, const float *A, size_t lda, const float *panel,
                         const float *bias, int cols, const float *R, float *C, size_t ldc)
{
    for (int r = 0; r < rows; r++) {
        float acc[CPU_PANEL_WIDTH] = {0};
        const float *a = A + (size_t)r * lda;
        for (int kk = 0; kk < k; kk++) {
            const float *b = panel + (size_t)kk * CPU_PANEL_WIDTH;
            for (int j = 0; j < CPU_PANEL_WIDTH; j++) acc[j] += a[kk] * b[j];
        }
        float *c = C + (size_t)r * ldc;
        for (int j = 0; j < cols; j++) {
            float v = acc[j] + bias[j];
            if (R) v += R[(size_t)r * ldc + (size_t)j];
            c[j] = v;
        }
    }
}

size_t cpu_gemm_scratch_floats(int k)
{
    /* Interleaved fp32 rows, or (AMX) bf16 rows padded to a multiple of 32 columns. */
    size_t k_pad_half = (size_t)((k + 31) / 32 * 32) / 2;
    return (size_t)GEMM_BLOCK_ROWS * ((size_t)k > k_pad_half ? (size_t)k : k_pad_half);
}

/* dst[kk * tr + i] = src[i * lda + kk] for tr <= 16 rows and kn steps: 16 steps at a time, the
 * rows are loaded as vectors and transposed in registers (2.3x faster than the scalar copy,
 * which took 6% of bulk time once every block of the FFN's second GEMM was interleaved). */
AVX512_TARGET static void interleave_rows_avx512(float *dst, const float *src, size_t lda, int tr,
                                                 int kn)
{
    __mmask16 row_mask = (__mmask16)((1u << tr) - 1u);
    for (int k0 = 0; k0 < kn; k0 += 16) {
        int width = kn - k0 < 16 ? kn - k0 : 16;
        __mmask16 load_mask = (__mmask16)((1u << width) - 1u);
        __m512 r[16], t[16], u[16], col[16];
        for (int i = 0; i < 16; i++)
            r[i] = i < tr ? _mm512_maskz_loadu_ps(load_mask, src + (size_t)i * lda + (size_t)k0)
                          : _mm512_setzero_ps();
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
        for (int j = 0; j < width; j++)
            _mm512_mask_storeu_ps(dst + (size_t)(k0 + j) * (size_t)tr, row_mask, col[j]);
    }
}

/* ---- bfloat16 GEMM on AMX ---- */

#define AMX_TARGET                                                                                 \
    __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512bf16,fma")))

/* The tile configuration (palette 1): every tile 16 rows of 64 bytes. Tiles 0-3 hold a 32 x 32
 * block of fp32 sums, 4-5 two 16-row blocks of A (32 bf16 each), 6-7 the weight tiles. */
typedef struct amx_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* A stored 32 x 32 block of sums waiting for its epilogue (bias, residual, activation). */
typedef struct amx_epilogue {
    const float *sums; /* NULL: nothing pending */
    int row, rows, col0, cols, done;
    const float *bias;
    cpu_epilogue epilogue;
    const float *residual;
    float *C;
    size_t ldc;
} amx_epilogue;

/* Finishes the pending block's rows up to part / parts of them. */
AMX_TARGET static inline void amx_epilogue_part(amx_epilogue *e, int part, int parts)
{
    if (!e->sums) return;
    int end = (int)((long)e->rows * part / parts);
    if (end <= e->done) return;
    __mmask16 m0 = tail_mask(e->cols), m1 = tail_mask(e->cols - 16);
    __m512 bias0 = _mm512_loadu_ps(e->bias), bias1 = _mm512_loadu_ps(e->bias + 16);
    for (int i = e->done; i < end; i++) {
        size_t at = (size_t)(e->row + i) * e->ldc + (size_t)e->col0;
        finish_row(_mm512_load_ps(e->sums + i * 32), _mm512_load_ps(e->sums + i * 32 + 16), bias0,
                   bias1, e->residual ? e->residual + at : NULL, e->C + at, m0, m1, e->epilogue);
    }
    e->done = end;
    if (e->done == e->rows) e->sums = NULL;
}

/* One task of a GEMM against cpu_pack_bf16 weights: the block's rows are rounded to bfloat16
 * into scratch (zero-padded to 16 rows and k_pad columns), then for each 32-row pair of tiles and
 * each panel, the k blocks accumulate in tiles, which are stored to a buffer for the fp32
 * epilogue. An output element's sum depends only on its own row of A and the weights. */
AMX_TARGET static void gemm_task_amx(const cpu_gemm_plan *plan, int task, const float *A,
                                     size_t lda, const cpu_packed *packed, cpu_epilogue epilogue,
                                     const float *R, float *C, size_t ldc, uint16_t *a16)
{
    int block = task / plan->panel_groups, group = task % plan->panel_groups;
    int row0 = block * plan->rows_per_block;
    int rows = plan->m - row0 < plan->rows_per_block ? plan->m - row0 : plan->rows_per_block;
    int p0 = (int)((long)group * packed->panels / plan->panel_groups);
    int p1 = (int)((long)(group + 1) * packed->panels / plan->panel_groups);
    int k = packed->k, k_pad = packed->k_pad, blocks = k_pad / 32;
    int rows16 = (rows + 15) / 16 * 16;
    const float *residual = epilogue == CPU_EPILOGUE_BIAS_RESIDUAL ? R : NULL;
    for (int r = 0; r < rows16; r++) {
        uint16_t *dst = a16 + (size_t)r * (size_t)k_pad;
        const float *src = r < rows ? A + (size_t)(row0 + r) * lda : NULL;
        for (int kk = 0; kk < k_pad; kk += 32) {
            __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
            if (src) {
                lo = _mm512_maskz_loadu_ps(tail_mask(k - kk), src + kk);
                hi = _mm512_maskz_loadu_ps(tail_mask(k - kk - 16), src + kk + 16);
            }
            _mm512_storeu_si512(dst + kk, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    }
    amx_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.rows[t] = 16;
        config.colsb[t] = 64;
    }
    /* Loaded per task: other code on this thread (oneDNN, say) may use tiles in between. */
    _tile_loadconfig(&config);
    /* Two buffers: the fp32 epilogue of one panel (bias, residual, GELU: as long as the tile
     * multiplies themselves) runs in pieces between the next panel's tile instructions, so the
     * vector units and the tile unit work at the same time. */
    float sums[2][32 * 32] __attribute__((aligned(64)));
    size_t stride = (size_t)k_pad * sizeof(uint16_t);
    amx_epilogue pending = {.epilogue = epilogue, .residual = residual, .C = C, .ldc = ldc};
    for (int r = 0; r < rows; r += 32) {
        int rn = rows - r < 32 ? rows - r : 32;
        const char *a0 = (const char *)(a16 + (size_t)r * (size_t)k_pad);
        const char *a1 = a0 + 16 * stride;
        for (int p = p0; p < p1; p++) {
            const uint16_t *w = packed->data_amx + (size_t)p * (size_t)blocks * AMX_BLOCK_ELEMENTS;
            /* The other buffer than the pending block's, which the loop below finishes. */
            float *out = sums[pending.sums == sums[0] ? 1 : 0];
            _tile_zero(0);
            _tile_zero(1);
            if (rn > 16) {
                _tile_zero(2);
                _tile_zero(3);
                for (int kb = 0; kb < blocks; kb++) {
                    const uint16_t *wb = w + (size_t)kb * AMX_BLOCK_ELEMENTS;
                    _tile_loadd(4, a0 + kb * 64, stride);
                    _tile_loadd(5, a1 + kb * 64, stride);
                    _tile_loadd(6, wb, 64);
                    _tile_loadd(7, wb + 512, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                    amx_epilogue_part(&pending, kb + 1, blocks);
                }
                _tile_stored(2, out + 16 * 32, 128);
                _tile_stored(3, out + 16 * 32 + 16, 128);
            } else {
                for (int kb = 0; kb < blocks; kb++) {
                    const uint16_t *wb = w + (size_t)kb * AMX_BLOCK_ELEMENTS;
                    _tile_loadd(4, a0 + kb * 64, stride);
                    _tile_loadd(6, wb, 64);
                    _tile_loadd(7, wb + 512, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    amx_epilogue_part(&pending, kb + 1, blocks);
                }
            }
            _tile_stored(0, out, 128);
            _tile_stored(1, out + 16, 128);
            pending.sums = out;
            pending.row = row0 + r;
            pending.rows = rn;
            pending.col0 = p * CPU_PANEL_WIDTH;
            pending.cols = packed->n - pending.col0 < CPU_PANEL_WIDTH ? packed->n - pending.col0
                                                                      : CPU_PANEL_WIDTH;
            pending.bias = packed->bias + pending.col0;
            pending.done = 0;
        }
    }
    amx_epilogue_part(&pending, 1, 1);
    _tile_release();
}

void cpu_gemm_task(const cpu_gemm_plan *plan, int task, const float *A, size_t lda,
                   const cpu_packed *packed, cpu_epilogue epilogue, const float *R, float *C,
                   size_t ldc, float *scratch)
{
    if (packed->data_amx) {
        gemm_task_amx(plan, task, A, lda, packed, epilogue, R, C, ldc, (uint16_t *)scratch);
        return;
    }
    int block = task / plan->panel_groups, group = task % plan->panel_groups;
    int row0 = block * plan->rows_per_block;
    int rows = plan->m - row0 < plan->rows_per_block ? plan->m - row0 : plan->rows_per_block;
    int p0 = (int)((long)group * packed->panels / plan->panel_groups);
    int p1 = (int)((long)(group + 1) * packed->panels / plan->panel_groups);
    int k = packed->k;
    const float *residual = epilogue == CPU_EPILOGUE_BIAS_RESIDUAL ? R : NULL;
    bool half = packed->data16 != NULL;
    /* Split the block's rows into near-equal micro-tiles (16 rows -> 8 + 8, not 14 + 2): the
     * grouping never changes a result, only how well the registers are used. */
    int tiles = (rows + GEMM_TILE_ROWS - 1) / GEMM_TILE_ROWS;
    if (isa() != ISA_AVX512) {
        /* One slice of the whole k (see cpu_pack); activations follow in a pass. */
        for (int p = p0; p < p1; p++) {
            const float *panel = packed->data + (size_t)p * (size_t)k * CPU_PANEL_WIDTH;
            int col0 = p * CPU_PANEL_WIDTH;
            int cols = packed->n - col0 < CPU_PANEL_WIDTH ? packed->n - col0 : CPU_PANEL_WIDTH;
            float *c = C + (size_t)row0 * ldc + (size_t)col0;
            (isa() == ISA_AVX2 ? tile_avx2 : tile_generic)(
                rows, k, A + (size_t)row0 * lda, lda, panel, packed->bias + col0, cols,
                residual ? residual + (size_t)row0 * ldc + (size_t)col0 : NULL, c, ldc);
            if (epilogue != CPU_EPILOGUE_BIAS && epilogue != CPU_EPILOGUE_BIAS_RESIDUAL)
                for (int i = 0; i < rows; i++)
                    apply_activation(c + (size_t)i * ldc, cols, epilogue);
        }
        return;
    }
    /* Interleaving the rows costs a strided copy of the block; it pays off only when many panels
     * reuse it. Both ways compute the same sums in the same order. */
    bool interleave = p1 - p0 >= GEMM_INTERLEAVE_MIN_PANELS;
    for (int ks = 0; ks < k; ks += packed->slice_k) {
        int kn = k - ks < packed->slice_k ? k - ks : packed->slice_k;
        bool first = ks == 0, last = ks + kn == k;
        if (interleave) {
            /* Interleave each tile's rows of this slice (scratch[kk * rows + r]) once for all
             * panels: the kernel then broadcasts from one pointer at fixed offsets instead of
             * needing a register per row, which spilled in the inner loop. */
            float *dst = scratch;
            for (int t = 0, r = row0; t < tiles; t++) {
                int tr = rows / tiles + (t < rows % tiles ? 1 : 0);
                interleave_rows_avx512(dst, A + (size_t)r * lda + (size_t)ks, lda, tr, kn);
                dst += (size_t)tr * (size_t)kn;
                r += tr;
            }
        }
        size_t slice = (size_t)ks * (size_t)packed->panels * CPU_PANEL_WIDTH;
        size_t element = half ? sizeof(uint16_t) : sizeof(float);
        const char *base = half ? (const char *)packed->data16 : (const char *)packed->data;
        if (tiles <= 2) {
            /* Few rows (a query): every weight is used by at most two tiles, so the GEMM streams
             * the weights from L3 at their first use. Panel by panel, each tile prefetches its
             * share of the next panel (of this slice, or the first of the next) into L2, so
             * the stream runs during the arithmetic instead of stalling the first tile. */
            size_t next_slice = slice + (size_t)kn * (size_t)packed->panels * CPU_PANEL_WIDTH;
            int next_kn = k - ks - kn < packed->slice_k ? k - ks - kn : packed->slice_k;
            for (int p = p0; p < p1; p++) {
                size_t offset = slice + (size_t)p * (size_t)kn * CPU_PANEL_WIDTH;
                const char *ahead = NULL;
                size_t ahead_bytes = 0;
                if (p + 1 < p1) {
                    ahead = base + (offset + (size_t)kn * CPU_PANEL_WIDTH) * element;
                    ahead_bytes = (size_t)kn * CPU_PANEL_WIDTH * element;
                } else if (!last) {
                    ahead = base +
                            (next_slice + (size_t)p0 * (size_t)next_kn * CPU_PANEL_WIDTH) * element;
                    ahead_bytes = (size_t)next_kn * CPU_PANEL_WIDTH * element;
                }
                /* One prefetch per k step of each tile covers the next panel in `tiles` parts. */
                int step = (int)((ahead_bytes / (size_t)tiles + (size_t)kn - 1) / (size_t)kn);
                int col0 = p * CPU_PANEL_WIDTH;
                int cols = packed->n - col0 < CPU_PANEL_WIDTH ? packed->n - col0 : CPU_PANEL_WIDTH;
                const float *ap = scratch;
                for (int t = 0, r = row0; t < tiles; t++) {
                    int tr = rows / tiles + (t < rows % tiles ? 1 : 0);
                    float *c = C + (size_t)r * ldc + (size_t)col0;
                    const float *res = residual ? residual + (size_t)r * ldc + (size_t)col0 : NULL;
                    const char *tile_ahead =
                        ahead ? ahead + (size_t)t * (size_t)step * (size_t)kn : NULL;
                    tile_avx512_dispatch(tr, interleave, half, first, last, kn,
                                         interleave ? ap : A + (size_t)r * lda + (size_t)ks, lda,
                                         base + offset * element, packed->bias + col0, cols,
                                         epilogue, res, c, ldc, tile_ahead, step);
                    ap += (size_t)tr * (size_t)kn;
                    r += tr;
                }
            }
            continue;
        }
        /* Tile by tile, sweeping the slice's panels: the tile's rows stay in L1 while the slice
         * (contiguous, see cpu_pack) streams from L2 in order, helped by the prefetch. */
        const float *ap = scratch;
        for (int t = 0, r = row0; t < tiles; t++) {
            int tr = rows / tiles + (t < rows % tiles ? 1 : 0);
            for (int p = p0; p < p1; p++) {
                size_t offset = slice + (size_t)p * (size_t)kn * CPU_PANEL_WIDTH;
                int col0 = p * CPU_PANEL_WIDTH;
                int cols = packed->n - col0 < CPU_PANEL_WIDTH ? packed->n - col0 : CPU_PANEL_WIDTH;
                float *c = C + (size_t)r * ldc + (size_t)col0;
                const float *res = residual ? residual + (size_t)r * ldc + (size_t)col0 : NULL;
                tile_avx512_dispatch(tr, interleave, half, first, last, kn,
                                     interleave ? ap : A + (size_t)r * lda + (size_t)ks, lda,
                                     base + offset * element, packed->bias + col0, cols, epilogue,
                                     res, c, ldc, NULL, 0);
            }
            ap += (size_t)tr * (size_t)kn;
            r += tr;
        }
    }
}

/* ---- row-wise operations ---- */

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

static inline float sum_squared_deviation(const float *x, int n, float mean)
{
    float lanes[REDUCE_LANES] = {0};
    int i = 0;
    for (; i + REDUCE_LANES <= n; i += REDUCE_LANES)
        for (int l = 0; l < REDUCE_LANES; l++) {
            float d = x[i + l] - mean;
            lanes[l] += d * d;
        }
    for (int l = 0; i + l < n; l++) {
        float d = x[i + l] - mean;
        lanes[l] += d * d;
    }
    for (int width = REDUCE_LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++) lanes[l] += lanes[l + width];
    return lanes[0];
}

CLONES void cpu_layer_norm(float *y, const float *x, int n, const float *gamma, const float *beta,
                           float eps)
{
    float mean = sum_fixed(x, n) / (float)n;
    float var = sum_squared_deviation(x, n, mean) / (float)n;
    float inv = 1.0f / sqrtf(var + eps);
    for (int i = 0; i < n; i++) y[i] = (x[i] - mean) * inv * gamma[i] + beta[i];
}

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
    if (isa() == ISA_AVX512 && (d == 32 || d == 64))
        attention_grouped_avx512(q, k, v, ld, len, d, scale, out, ldo, scores, head);
    else if (isa() == ISA_AVX512 && d % 16 == 0 && d <= ATTENTION_MAX_WIDTH)
        attention_head_avx512(q, k, v, ld, len, d, scale, out, ldo, scores, head);
    else
        attention_head_generic(q, k, v, ld, len, d, scale, out, ldo, scores, head);
}
