/* Repacking weight matrices once at load into the layouts the GEMMs read (see kernels.h): fp32
 * or half-precision panels cut into k slices for the fp32 kernels, bfloat16 tile blocks for AMX. */
#include "backend/cpu/kernels_internal.h"

#include "util/cpu_features.h"
#include "util/error.h"

#include <stdlib.h>

/* Bytes of one k slice of all panels: a task sweeps a slice once per micro-tile, so it should
 * stay in L2 (2 MB per core here) beside the A block. Measured one thread, 2048 x 384 x 1152:
 * slicing plus tile-outer order took the GEMM from 104 to 157-163 GFLOP/s (bench/gemm_compare). */
#define GEMM_SLICE_BYTES (1024 * 1024)
/* Slice bounds in k rows: long enough to amortize loading and storing the partial sums. */
#define GEMM_SLICE_MIN_K 64
#define GEMM_SLICE_MAX_K 384
/* The bfloat16 (VDPBF16PS) tile sums twice as fast, so its partial sums cost twice as much per
 * k step: twice the steps, the same bytes. Measured one thread, 2048 x 1536 x 384: 184-188
 * GFLOP/s with 384 steps, 186-191 with 768 (best of 40, shared machine). */
#define BF16_SLICE_MAX_K (2 * GEMM_SLICE_MAX_K)

/* fp32 -> IEEE half, rounding to nearest (exact for values that came from half precision). */
__attribute__((target("f16c"))) static uint16_t to_half(float x)
{
    return (uint16_t)_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);
}

/* k steps per slice (see cpu_packed) when a row of all panels takes row_bytes. */
static int slice_steps(size_t row_bytes, int k, int max_k)
{
    size_t fit = GEMM_SLICE_BYTES / row_bytes / 16 * 16;
    int slice_k = fit < GEMM_SLICE_MIN_K ? GEMM_SLICE_MIN_K
                  : fit > (size_t)max_k  ? max_k
                                         : (int)fit;
    return slice_k > k ? k : slice_k;
}

/* Sets out's shape and bias (zero beyond n) and allocates its weights: zeroed, 64-byte aligned,
 * k_stored steps of every panel column, of element_size bytes each. */
static int pack_start(cpu_packed *out, int count, const float *const *biases, const int *rows,
                      int k, int k_stored, size_t element_size, void **data)
{
    memset(out, 0, sizeof *out);
    int n = 0;
    for (int i = 0; i < count; i++) n += rows[i];
    int panels = (n + CPU_PANEL_WIDTH - 1) / CPU_PANEL_WIDTH;
    size_t bytes = (size_t)panels * (size_t)k_stored * CPU_PANEL_WIDTH * element_size;
    *data = aligned_alloc(64, (bytes + 63) / 64 * 64);
    float *bias = calloc((size_t)panels * CPU_PANEL_WIDTH, sizeof(float));
    if (!*data || !bias) {
        free(*data);
        free(bias);
        *data = NULL;
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory packing a %d x %d weight", n, k);
    }
    memset(*data, 0, bytes);
    for (int i = 0, col = 0; i < count; i++)
        for (int r = 0; r < rows[i]; r++, col++) bias[col] = biases[i] ? biases[i][r] : 0.0f;
    out->n = n;
    out->k = k;
    out->panels = panels;
    out->slice_k = k;
    out->bias = bias;
    return 0;
}

int cpu_pack(cpu_packed *out, int count, const float *const *weights, const float *const *biases,
             const int *rows, int k, bool half)
{
    /* The half-precision tile widens with F16C's conversion, which every AVX-512 CPU has. */
    half = half && cpu_isa() == CPU_ISA_AVX512 && cpu_features_get()->f16c;
    size_t element_size = half ? sizeof(uint16_t) : sizeof(float);
    void *data;
    int rc = pack_start(out, count, biases, rows, k, k, element_size, &data);
    if (rc) return rc;
    int panels = out->panels;
    /* Only the AVX-512 tile continues partial sums across slices; the others take k whole. */
    int slice_k = k;
    if (cpu_isa() == CPU_ISA_AVX512)
        slice_k = slice_steps((size_t)panels * CPU_PANEL_WIDTH * element_size, k, GEMM_SLICE_MAX_K);
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
        }
    }
    out->slice_k = slice_k;
    if (half)
        out->data16 = data;
    else
        out->data = data;
    return 0;
}

void cpu_packed_free(cpu_packed *packed)
{
    if (!packed) return;
    free(packed->data);
    free(packed->data16);
    free(packed->data_amx);
    free(packed->data_bf16);
    free(packed->bias);
    memset(packed, 0, sizeof *packed);
}

/* fp32 -> bfloat16, rounding to nearest even (what the GEMMs do to activations too); NaN stays a
 * quiet NaN. */
static uint16_t to_bf16(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Where step kk of column col goes in the AMX layout (see kernels.h). */
static size_t amx_index(int col, int kk, int blocks)
{
    int p = col / CPU_PANEL_WIDTH, t = col % CPU_PANEL_WIDTH / 16, j = col % 16;
    int kb = kk / 32, kp = kk % 32 / 2, e = kk % 2;
    return (((size_t)p * (size_t)blocks + (size_t)kb) * 2 + (size_t)t) * (AMX_BLOCK_ELEMENTS / 2) +
           (size_t)kp * 32 + (size_t)j * 2 + (size_t)e;
}

int cpu_pack_bf16(cpu_packed *out, int count, const float *const *weights,
                  const float *const *biases, const int *rows, int k)
{
    int kernel = cpu_bf16();
    if (kernel == CPU_BF16_NONE) {
        memset(out, 0, sizeof *out);
        return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                       "this CPU cannot run a bfloat16 GEMM (it needs AMX-BF16 or AVX512-BF16)");
    }
    bool amx = kernel == CPU_BF16_AMX;
    /* AMX multiplies blocks of 32 k steps, VDPBF16PS pairs of them; zeros pad k to either. */
    int k_pad = amx ? (k + 31) / 32 * 32 : (k + 1) / 2 * 2;
    uint16_t *data;
    int rc = pack_start(out, count, biases, rows, k, k_pad, sizeof(uint16_t), (void **)&data);
    if (rc) return rc;
    int panels = out->panels;
    /* VDPBF16PS: slices of the padded k, like the fp32 layout's, each a whole number of pairs. */
    int slice_k = amx ? k_pad
                      : slice_steps((size_t)panels * CPU_PANEL_WIDTH * sizeof(uint16_t), k_pad,
                                    BF16_SLICE_MAX_K);
    int col = 0;
    for (int i = 0; i < count; i++)
        for (int r = 0; r < rows[i]; r++, col++) {
            const float *src = weights[i] + (size_t)r * (size_t)k;
            for (int ks = 0; ks < k; ks += slice_k) {
                int kn = k_pad - ks < slice_k ? k_pad - ks : slice_k,
                    end = k < ks + kn ? k : ks + kn;
                size_t base = (size_t)ks * (size_t)panels * CPU_PANEL_WIDTH +
                              (size_t)(col / CPU_PANEL_WIDTH) * (size_t)kn * CPU_PANEL_WIDTH +
                              (size_t)(col % CPU_PANEL_WIDTH) * 2;
                for (int kk = ks; kk < end; kk++) {
                    int e = kk % 2;
                    size_t at = amx ? amx_index(col, kk, k_pad / 32)
                                    : base + (size_t)(kk - ks - e) * CPU_PANEL_WIDTH + (size_t)e;
                    data[at] = to_bf16(src[kk]);
                }
            }
        }
    out->k_pad = k_pad;
    if (amx) {
        out->data_amx = data;
    } else {
        out->slice_k = slice_k;
        out->data_bf16 = data;
    }
    return 0;
}
