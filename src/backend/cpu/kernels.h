/* The CPU backend's numeric kernels: a GEMM against weights repacked once at load, and the
 * row-wise operations of a BERT layer. Every kernel computes each output element with a fixed
 * order of operations that depends only on that element's own row (never on the row count, the
 * row's position, or the thread), which is what makes embeddings bit-identical in any batch. */
#ifndef EMBEDRAG_CPU_KERNELS_H
#define EMBEDRAG_CPU_KERNELS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Columns per packed panel: two AVX-512 registers of floats. */
#define CPU_PANEL_WIDTH 32

/* A weight matrix W [n x k] (PyTorch Linear layout: out x in) repacked into panels of
 * CPU_PANEL_WIDTH output columns, each stored k-major, and cut along k into slices of slice_k
 * rows stored one after another: slice s holds every panel's rows ks = s * slice_k .. ks + kn,
 * panel after panel, so data[ks * panels * 32 + p * kn * 32 + (kk - ks) * 32 + j] =
 * W[p*32 + j][kk], zero beyond n. A GEMM then walks one slice of all panels as one contiguous
 * stream small enough to stay in L2. The bias (n floats) is copied alongside. */
typedef struct cpu_packed {
    int n, k;
    int panels;
    int slice_k;
    float *data;      /* panels * k * CPU_PANEL_WIDTH floats, 64-byte aligned; or NULL */
    uint16_t *data16; /* the same as IEEE half-precision bits, when packed as half */
    float *bias;      /* n floats */
    /* Packed by cpu_pack_bf16 instead (see there), with k padded with zeros to k_pad: bfloat16
     * weights in AMX tile layout, or in VDPBF16PS layout; data and data16 are then NULL. */
    uint16_t *data_amx;
    uint16_t *data_bf16;
    int k_pad;
    struct pack_arena *arena; /* where the weights are allocated (pack.c) */
} cpu_packed;

/* Packs `count` matrices stacked along n (e.g. query, key, value into one [3H x H] GEMM).
 * With `half`, and when the AVX-512 kernels run, the weights are kept as IEEE half precision
 * (widened to fp32 inside the kernel): meant for checkpoints stored as F16, whose values it
 * holds exactly, halving the bytes every forward pass streams. Returns 0 or a negative status. */
int cpu_pack(cpu_packed *out, int count, const float *const *weights, const float *const *biases,
             const int *rows, int k, bool half);
void cpu_packed_free(cpu_packed *packed);

/* The bfloat16 GEMM that runs here: "amx" (AMX tiles, on CPUs with AMX-BF16), "avx512bf16"
 * (VDPBF16PS, on CPUs with AVX512-BF16 and no AMX), or NULL when neither can (or the kernels are
 * not the AVX-512 ones). Chosen once; EMBEDRAG_CPU_BF16=amx, avx512bf16 or none picks another
 * where the CPU can run it, so tests can run the VDPBF16PS path on AMX CPUs too. */
const char *cpu_bf16_kernel(void);
/* Whether cpu_bf16_kernel() is not NULL: bfloat16 precision can run. */
bool cpu_bf16_available(void);
/* Whether the AMX kernel could run here, whichever EMBEDRAG_CPU_BF16 picks: a CPU with AMX-BF16
 * and AVX512-BF16, AVX-512 kernels in use, and the OS's permission for AMX state (asked for
 * once, process-wide). */
bool cpu_amx_available(void);

/* Packs like cpu_pack for cpu_bf16_kernel(), rounding the weights to bfloat16 (to nearest even).
 * A GEMM against it rounds A's rows to bfloat16 too and sums the products in fp32: not exact
 * against the fp32 path, but each output still depends only on its own row. Fails (nothing
 * packed) where cpu_bf16_kernel() is NULL. The layouts, columns j of panel p (32 each):
 * - amx: for k block kb (32 steps), two 1 KiB tiles (columns 0-15, 16-31), each 16 rows of k
 *   pairs: data_amx[((p * KB + kb) * 2 + t) * 512 + kp * 32 + j * 2 + e] =
 *   bf16(W[p*32 + t*16 + j][kb*32 + 2*kp + e]), k_pad a multiple of 32.
 * - avx512bf16: cpu_pack's slices and panels, each k pair of a panel one 128-byte row of 32
 *   columns x 2 steps: for slice ks of kn steps, data_bf16[ks * panels * 32 + p * kn * 32 +
 *   (kk - ks - e) * 32 + j * 2 + e] = bf16(W[p*32 + j][kk]) with e = kk % 2, k_pad even. */
int cpu_pack_bf16(cpu_packed *out, int count, const float *const *weights,
                  const float *const *biases, const int *rows, int k);

typedef enum cpu_epilogue {
    CPU_EPILOGUE_BIAS,           /* C = A W^T + b */
    CPU_EPILOGUE_BIAS_GELU,      /* C = gelu(A W^T + b), exact erf form */
    CPU_EPILOGUE_BIAS_GELU_TANH, /* C = gelu_tanh(A W^T + b) */
    CPU_EPILOGUE_BIAS_RELU,      /* C = relu(A W^T + b) */
    CPU_EPILOGUE_BIAS_RESIDUAL,  /* C = A W^T + b + R (R has C's shape and stride) */
} cpu_epilogue;

/* The unit of parallel work of a GEMM: a block of rows times a group of panels. */
typedef struct cpu_gemm_plan {
    int m;
    int row_blocks, panel_groups; /* group g covers panels [g P / G, (g + 1) P / G) */
    int rows_per_block;
} cpu_gemm_plan;

/* Splits an [m x packed->n] GEMM into tasks so `threads` threads have enough to share. */
cpu_gemm_plan cpu_gemm_plan_make(int m, const cpu_packed *packed, int threads);
static inline int cpu_gemm_plan_tasks(const cpu_gemm_plan *plan)
{
    return plan->row_blocks * plan->panel_groups;
}

/* Floats of per-thread scratch cpu_gemm_task needs for inner dimension k. */
size_t cpu_gemm_scratch_floats(int k);

/* Computes task `task` of the plan: rows of A [m x k] (row stride lda) times the packed weights,
 * written to C (row stride ldc) with the epilogue; R is the residual (stride ldc) or NULL.
 * `scratch` holds cpu_gemm_scratch_floats(k) floats owned by the calling thread. */
void cpu_gemm_task(const cpu_gemm_plan *plan, int task, const float *A, size_t lda,
                   const cpu_packed *packed, cpu_epilogue epilogue, const float *R, float *C,
                   size_t ldc, float *scratch);

/* y = LayerNorm(x) * gamma + beta over one row of n floats (x and y may alias). */
void cpu_layer_norm(float *y, const float *x, int n, const float *gamma, const float *beta,
                    float eps);

/* Attention of one head of one sequence: q, k, v rows of `len` tokens with row stride `ld` and
 * head width d; writes `len` rows of d floats to out (stride ldo). Scratch: `scores` holds
 * CPU_ATTENTION_SCORES(len) floats and `head` CPU_ATTENTION_HEAD(len, d) floats (the head's
 * keys transposed, values and scaled queries, copied out of the strided rows). */
#define CPU_ATTENTION_SCORES(len) (4 * ((size_t)(len) + 16))
#define CPU_ATTENTION_HEAD(len, d) (3 * ((size_t)(len) + 16) * (size_t)(d))
void cpu_attention_head(const float *q, const float *k, const float *v, size_t ld, int len, int d,
                        float scale, float *out, size_t ldo, float *scores, float *head);

/* As cpu_attention_head, with both products (queries x keys, probabilities x values) on
 * bfloat16 inputs summed in fp32 (VDPBF16PS), for the bf16 precision: where
 * cpu_attention_bf16_available(d) (head widths 32 and 64, a CPU with AVX512-BF16 and the AVX-512
 * kernels), else exactly cpu_attention_head. Same scratch sizes. */
bool cpu_attention_bf16_available(int d);
void cpu_attention_head_bf16(const float *q, const float *k, const float *v, size_t ld, int len,
                             int d, float scale, float *out, size_t ldo, float *scores,
                             float *head);

/* Which instruction set the kernels use: "avx512" or "generic". Chosen once from the CPU's
 * features, overridable with EMBEDRAG_CPU_ISA=generic for testing the portable path. */
const char *cpu_kernels_isa(void);

#endif
