/* The fp32 GEMM (see kernels.h): task planning, the AVX-512, AVX2 and portable tiles. Ours rather
 * than a BLAS's because no BLAS promises that a row's result is independent of the row count and
 * threads (OpenBLAS takes another path for M = 1, oneDNN for small M), and that independence makes
 * a text's vector identical alone or in a batch; it also beats both at a query's small shapes. */
#include "backend/cpu/kernels_internal.h"

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
/* Distance, in k steps, at which the micro-tile prefetches the panel stream into L1. */
#define GEMM_PREFETCH_K 8

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
    tile_start(rows, first, c0, c1, C, ldc, m0, m1);
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
    tile_end(rows, last, c0, c1, bias, epilogue, R, C, ldc, m0, m1);
}

AVX512_TARGET static void tile_avx512_dispatch(int rows, bool interleaved, bool half, bool first,
                                               bool last, int k, const float *ap, size_t lda,
                                               const void *panel, const float *bias, int cols,
                                               cpu_epilogue epilogue, const float *R, float *C,
                                               size_t ldc, const char *ahead, int ahead_step)
{
#define TILE_ARGS first, last, k, ap, lda, panel, bias, cols, epilogue, R, C, ldc, ahead, ahead_step
#define TILE_CALL(n)                                                                               \
    do {                                                                                           \
        if (interleaved && half)                                                                   \
            tile_avx512(n, true, true, TILE_ARGS);                                                 \
        else if (interleaved)                                                                      \
            tile_avx512(n, true, false, TILE_ARGS);                                                \
        else if (half)                                                                             \
            tile_avx512(n, false, true, TILE_ARGS);                                                \
        else                                                                                       \
            tile_avx512(n, false, false, TILE_ARGS);                                               \
    } while (0)
#ifdef EMBEDRAG_LIGHT_KERNELS
    /* Sanitizer and fuzz builds: one instance per variant with the row count at run time. The
     * 56 specialized instances of the switch took clang over ten minutes and 11 GB to instrument;
     * the arithmetic is the same. */
    TILE_CALL(rows);
#else
    GEMM_SWITCH_TILE_ROWS(rows, TILE_CALL)
#endif
#undef TILE_CALL
#undef TILE_ARGS
}

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
    /* Interleaved fp32 rows, interleaved bfloat16 pairs (fewer), or (AMX) bf16 rows padded to a
     * multiple of 32 columns. */
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
        __m512 r[16], col[16];
        for (int i = 0; i < 16; i++)
            r[i] = i < tr ? _mm512_maskz_loadu_ps(load_mask, src + (size_t)i * lda + (size_t)k0)
                          : _mm512_setzero_ps();
        transpose16_avx512(r, col);
        for (int j = 0; j < width; j++)
            _mm512_mask_storeu_ps(dst + (size_t)(k0 + j) * (size_t)tr, row_mask, col[j]);
    }
}

/* One micro-tile of the fp32 kernel, or of the VDPBF16PS one (bf16), whose rows are always
 * interleaved (as pairs) and whose loop runs over pairs of the slice's kn steps. */
static inline void run_tile(bool bf16, int rows, bool interleaved, bool half, bool first, bool last,
                            int kn, const float *ap, const float *a_rows, size_t lda,
                            const char *panel, const float *bias, int cols, cpu_epilogue epilogue,
                            const float *R, float *C, size_t ldc, const char *ahead, int ahead_step)
{
    if (bf16)
        cpu_tile_bf16(rows, first, last, kn / 2, (const uint32_t *)ap, (const uint16_t *)panel,
                      bias, cols, epilogue, R, C, ldc, ahead, ahead_step);
    else
        tile_avx512_dispatch(rows, interleaved, half, first, last, kn, interleaved ? ap : a_rows,
                             lda, panel, bias, cols, epilogue, R, C, ldc, ahead, ahead_step);
}

void cpu_gemm_task(const cpu_gemm_plan *plan, int task, const float *A, size_t lda,
                   const cpu_packed *packed, cpu_epilogue epilogue, const float *R, float *C,
                   size_t ldc, float *scratch)
{
    if (packed->data_amx) {
        cpu_gemm_task_amx(plan, task, A, lda, packed, epilogue, R, C, ldc, (uint16_t *)scratch);
        return;
    }
    int block = task / plan->panel_groups, group = task % plan->panel_groups;
    int row0 = block * plan->rows_per_block;
    int rows = plan->m - row0 < plan->rows_per_block ? plan->m - row0 : plan->rows_per_block;
    int p0 = (int)((long)group * packed->panels / plan->panel_groups);
    int p1 = (int)((long)(group + 1) * packed->panels / plan->panel_groups);
    int k = packed->k;
    const float *residual = epilogue == CPU_EPILOGUE_BIAS_RESIDUAL ? R : NULL;
    bool half = packed->data16 != NULL, bf16 = packed->data_bf16 != NULL;
    /* Split the block's rows into near-equal micro-tiles (16 rows -> 8 + 8, not 14 + 2): the
     * grouping never changes a result, only how well the registers are used. */
    int tiles = (rows + GEMM_TILE_ROWS - 1) / GEMM_TILE_ROWS;
    if (cpu_isa() != CPU_ISA_AVX512) {
        /* One slice of the whole k (see cpu_pack); activations follow in a pass. */
        for (int p = p0; p < p1; p++) {
            const float *panel = packed->data + (size_t)p * (size_t)k * CPU_PANEL_WIDTH;
            int col0 = p * CPU_PANEL_WIDTH;
            int cols = packed->n - col0 < CPU_PANEL_WIDTH ? packed->n - col0 : CPU_PANEL_WIDTH;
            float *c = C + (size_t)row0 * ldc + (size_t)col0;
            (cpu_isa() == CPU_ISA_AVX2 ? tile_avx2 : tile_generic)(
                rows, k, A + (size_t)row0 * lda, lda, panel, packed->bias + col0, cols,
                residual ? residual + (size_t)row0 * ldc + (size_t)col0 : NULL, c, ldc);
            if (epilogue != CPU_EPILOGUE_BIAS && epilogue != CPU_EPILOGUE_BIAS_RESIDUAL)
                for (int i = 0; i < rows; i++)
                    apply_activation(c + (size_t)i * ldc, cols, epilogue);
        }
        return;
    }
    /* Interleaving the rows costs a strided copy of the block; it pays off only when many panels
     * reuse it. Both ways compute the same sums in the same order. The bfloat16 kernel always
     * interleaves, rounding the rows to bfloat16 pairs as it copies them. */
    bool interleave = bf16 || p1 - p0 >= GEMM_INTERLEAVE_MIN_PANELS;
    /* bfloat16 panels are sliced along k padded to pairs (cpu_pack_bf16). */
    int k_sliced = bf16 ? packed->k_pad : k;
    for (int ks = 0; ks < k_sliced; ks += packed->slice_k) {
        int kn = k_sliced - ks < packed->slice_k ? k_sliced - ks : packed->slice_k;
        bool first = ks == 0, last = ks + kn == k_sliced;
        /* Iterations of the tile's loop: k steps, or pairs of them; each takes one float (or
         * pair) per row of interleaved A. */
        int steps = bf16 ? kn / 2 : kn;
        if (interleave) {
            /* Interleave each tile's rows of this slice (scratch[kk * rows + r]) once for all
             * panels: the kernel then broadcasts from one pointer at fixed offsets instead of
             * needing a register per row, which spilled in the inner loop. */
            float *dst = scratch;
            for (int t = 0, r = row0; t < tiles; t++) {
                int tr = rows / tiles + (t < rows % tiles ? 1 : 0);
                const float *src = A + (size_t)r * lda + (size_t)ks;
                if (bf16)
                    cpu_bf16_interleave_rows((uint32_t *)dst, src, lda, tr, kn,
                                             k - ks < kn ? k - ks : kn);
                else
                    interleave_rows_avx512(dst, src, lda, tr, kn);
                dst += (size_t)tr * (size_t)steps;
                r += tr;
            }
        }
        size_t slice = (size_t)ks * (size_t)packed->panels * CPU_PANEL_WIDTH;
        size_t element = half || bf16 ? sizeof(uint16_t) : sizeof(float);
        const char *base = bf16   ? (const char *)packed->data_bf16
                           : half ? (const char *)packed->data16
                                  : (const char *)packed->data;
        if (tiles <= 2) {
            /* Few rows (a query): every weight is used by at most two tiles, so the GEMM streams
             * the weights from L3 at their first use. Panel by panel, each tile prefetches its
             * share of the next panel (of this slice, or the first of the next) into L2, so
             * the stream runs during the arithmetic instead of stalling the first tile. */
            size_t next_slice = slice + (size_t)kn * (size_t)packed->panels * CPU_PANEL_WIDTH;
            int next_kn =
                k_sliced - ks - kn < packed->slice_k ? k_sliced - ks - kn : packed->slice_k;
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
                /* One prefetch per step of each tile covers the next panel in `tiles` parts. */
                int step = (int)((ahead_bytes / (size_t)tiles + (size_t)steps - 1) / (size_t)steps);
                int col0 = p * CPU_PANEL_WIDTH;
                int cols = packed->n - col0 < CPU_PANEL_WIDTH ? packed->n - col0 : CPU_PANEL_WIDTH;
                const float *ap = scratch;
                for (int t = 0, r = row0; t < tiles; t++) {
                    int tr = rows / tiles + (t < rows % tiles ? 1 : 0);
                    float *c = C + (size_t)r * ldc + (size_t)col0;
                    const float *res = residual ? residual + (size_t)r * ldc + (size_t)col0 : NULL;
                    const char *tile_ahead =
                        ahead ? ahead + (size_t)t * (size_t)step * (size_t)steps : NULL;
                    run_tile(bf16, tr, interleave, half, first, last, kn, ap,
                             A + (size_t)r * lda + (size_t)ks, lda, base + offset * element,
                             packed->bias + col0, cols, epilogue, res, c, ldc, tile_ahead, step);
                    ap += (size_t)tr * (size_t)steps;
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
                run_tile(bf16, tr, interleave, half, first, last, kn, ap,
                         A + (size_t)r * lda + (size_t)ks, lda, base + offset * element,
                         packed->bias + col0, cols, epilogue, res, c, ldc, NULL, 0);
            }
            ap += (size_t)tr * (size_t)steps;
            r += tr;
        }
    }
}
