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

/* fp32 -> IEEE half, rounding to nearest (exact for values that came from half precision). */
__attribute__((target("f16c"))) static uint16_t to_half(float x)
{
    return (uint16_t)_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);
}

int cpu_pack(cpu_packed *out, int count, const float *const *weights, const float *const *biases,
             const int *rows, int k, bool half)
{
    memset(out, 0, sizeof *out);
    /* The half-precision tile widens with F16C's conversion, which every AVX-512 CPU has. */
    half = half && cpu_isa() == CPU_ISA_AVX512 && cpu_features_get()->f16c;
    int n = 0;
    for (int i = 0; i < count; i++) n += rows[i];
    int panels = (n + CPU_PANEL_WIDTH - 1) / CPU_PANEL_WIDTH;
    /* Only the AVX-512 tile continues partial sums across slices; the others take k whole. */
    int slice_k = k;
    if (cpu_isa() == CPU_ISA_AVX512) {
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
