/* The CUDA backend's own kernels (cuda_kernels.cu), behind launchers that C code calls: embedding
 * gather + LayerNorm, residual + LayerNorm, bias + activation, attention over packed sequences and
 * pooling. Activations are fp32, fp16 or bf16 (cuda_dtype); every kernel computes in fp32. Sizes
 * the batch decides are read from the device (the batch descriptor's header), so that one
 * captured CUDA graph serves every batch within its launch bounds. */
#ifndef EMBEDRAG_CUDA_KERNELS_H
#define EMBEDRAG_CUDA_KERNELS_H

#include <cuda_runtime_api.h>

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum cuda_dtype {
    CUDA_DTYPE_F32,
    CUDA_DTYPE_F16,
    CUDA_DTYPE_BF16,
} cuda_dtype;

/* The widest hidden size the row kernels hold in registers (one warp per row): BERT-large's. */
#define CUDA_MAX_HIDDEN 1024
/* Row lengths must be a multiple of this (16-byte vectors of fp16). */
#define CUDA_ROW_MULTIPLE 8
/* The largest attention head the kernels take. */
#define CUDA_MAX_HEAD 128
/* Queries per tile of the tensor-core attention kernel (4 warps of 16 rows); the batch
 * descriptor lists one tile per 64 queries of each sequence. */
#define CUDA_ATTENTION_TILE 64

/* The packed batch in device memory, as the host writes it once per batch into pinned memory
 * and copies up in one transfer (int32 throughout):
 *   header[CUDA_HEADER_INTS]: tokens, sequences, attention tiles
 *   ids[max_tokens], sequence_of[max_tokens] (each token's sequence),
 *   offsets[max_sequences + 1], skip[max_sequences] (pool_skip),
 *   tiles[2 * max_tiles] (sequence, first query) pairs.
 * The max_* bounds size the kernels' grids; the header says how much of each is in use. */
#define CUDA_HEADER_INTS 4
enum { CUDA_HEADER_TOKENS, CUDA_HEADER_SEQUENCES, CUDA_HEADER_TILES };

typedef struct cuda_batch_view {
    const int *header, *ids, *sequence_of, *offsets, *skip, *tiles;
    int max_tokens, max_sequences, max_tiles;
} cuda_batch_view;

/* Activation codes of cuda_bias_activation (the model's, see model_activation). */
enum { CUDA_ACT_NONE, CUDA_ACT_GELU, CUDA_ACT_GELU_TANH, CUDA_ACT_RELU };

/* Pooling codes (embedrag_pooling's values). */

/* out[t] = LayerNorm(word[ids[t]] + position[t - offsets[seq]] + type[0]) for every token; the
 * tables and LayerNorm parameters are fp32. */
cudaError_t cuda_embed(cuda_dtype dtype, const cuda_batch_view *batch, const float *word,
                       const float *position, const float *type, const float *gamma,
                       const float *beta, float eps, int hidden, void *out, cudaStream_t stream);

/* out = LayerNorm(a + residual) row by row over the batch's tokens (out may be a or residual).
 * programmatic: launched as a programmatic dependent of the kernel before it (PDL, as
 * cuda_attention's v2). */
cudaError_t cuda_add_layer_norm(cuda_dtype dtype, const cuda_batch_view *batch, const void *a,
                                const void *residual, const float *gamma, const float *beta,
                                float eps, int hidden, void *out, int programmatic,
                                cudaStream_t stream);

/* x = activation(x + bias) over the batch's tokens' rows of n columns (bias of the dtype). */
cudaError_t cuda_bias_activation(cuda_dtype dtype, const cuda_batch_view *batch, void *x,
                                 const void *bias, int n, int activation, cudaStream_t stream);

/* The attention kernels of cuda_attention: one that computes in fp32 on the ordinary cores (any
 * head size up to CUDA_MAX_HEAD, any dtype), and two on tensor cores (mma.sync; fp16/bf16 with head
 * size 32 or 64 only, see cuda_attention_has_tensor_cores): v1, and v2 with ldmatrix fragments and
 * cp.async double buffering (cuda_kernels.cu says how they differ). */
enum { CUDA_ATTENTION_FP32, CUDA_ATTENTION_MMA, CUDA_ATTENTION_MMA_V2 };

/* Self-attention of every sequence: qkv rows are [q | k | v] (3 x hidden), context rows hidden
 * wide. kernel is a CUDA_ATTENTION_* code; a tensor-core kernel where the dtype and head size have
 * none falls back to the fp32 one. programmatic: v2 is launched as a programmatic dependent of the
 * kernel before it (PDL: it starts while that one finishes and waits for it on the device; the
 * other kernels have no such wait and ignore the flag). */
cudaError_t cuda_attention(cuda_dtype dtype, const cuda_batch_view *batch, const void *qkv,
                           void *context, int hidden, int heads, int kernel, int programmatic,
                           cudaStream_t stream);
int cuda_attention_has_tensor_cores(cuda_dtype dtype, int head_size);

/* pooled[s] (fp32) = mean, CLS or max (embedrag_pooling) over sequence s's rows of x, leaving
 * out its first skip[s] tokens for mean and max, as the CPU backend does. */
cudaError_t cuda_pool(cuda_dtype dtype, const cuda_batch_view *batch, const void *x, int hidden,
                      int pooling, float *pooled, cudaStream_t stream);

/* ---- small-batch GEMMs (EMBEDRAG_CUDA_SMALL) ---- */

/* Y = X W^T (X: rows x k activations, W: n x k row-major weights, Y: rows x n, all of the dtype)
 * with a fused epilogue, for at most CUDA_SMALL_MAX_ROWS rows, fp16 and bf16 only: a block per
 * slice of 8, 16 or 32 output columns (see cuda_small_gemm_columns), W's slice held in shared
 * memory (copied before the previous kernel is waited for when launched programmatically), X
 * streamed through in chunks, mma.sync with fp32 sums. Rows past the batch's tokens (the header)
 * are neither read nor written. Epilogues:
 *   CUDA_SMALL_BIAS:       Y = X W^T + bias
 *   CUDA_SMALL_ACTIVATION: Y = activation(X W^T + bias) (a CUDA_ACT_* code)
 *   CUDA_SMALL_NORM:       Y = LayerNorm(X W^T + bias + residual) * gamma + beta (n at most
 *                          CUDA_MAX_HIDDEN; X W^T + bias rounded to the dtype first, as
 *                          cuda_add_layer_norm gets it from cuBLASLt): every block writes its fp32
 *                          slice to scratch (rows x n floats), the last block to finish (counted
 *                          on *counter, which must be 0 before and is 0 again after) normalizes
 *                          the rows.
 *   CUDA_SMALL_SUM:        scratch = X W^T + bias (rounded to the dtype) + residual in fp32, for
 *                          the next launch to normalize as its X (x_scratch); y is not written.
 * With x_scratch, X is not read from x: it is LayerNorm(x_scratch's rows) * x_gamma + x_beta in
 * the dtype (k at most CUDA_MAX_HIDDEN), what CUDA_SMALL_NORM would have stored, computed by every
 * block for itself; block 0 also stores it to x_out (the next product's residual) when non-NULL.
 * So a layer's LayerNorms cost no launch and no last block of their own. */
#define CUDA_SMALL_MAX_ROWS 64
enum { CUDA_SMALL_BIAS, CUDA_SMALL_ACTIVATION, CUDA_SMALL_NORM, CUDA_SMALL_SUM };

typedef struct cuda_small_gemm_params {
    int rows; /* the launch's row count (a graph bucket's size); the header's tokens are used */
    int n, k;
    const void *x, *weight, *bias; /* bias: n elements of the dtype */
    void *y;                       /* must not alias x or residual */
    int epilogue, activation;
    const void *residual;      /* CUDA_SMALL_NORM: rows x n of the dtype */
    const float *gamma, *beta; /* CUDA_SMALL_NORM: n floats each */
    float eps;
    float *scratch;                /* CUDA_SMALL_NORM and _SUM: CUDA_SMALL_MAX_ROWS x n floats */
    const float *x_scratch;        /* or NULL: X normalized from these fp32 rows (rows x k) */
    const float *x_gamma, *x_beta; /* with x_scratch: k floats each */
    void *x_out;                   /* with x_scratch: X stored here too (rows x k), or NULL */
    unsigned *counter; /* CUDA_SMALL_NORM: one per stream at least (launches in a stream take
                        * turns) */
    int programmatic;  /* launched as a programmatic dependent (PDL) of the kernel before it */
} cuda_small_gemm_params;

/* The columns a block of the small-batch kernel takes for this product (32, 16 or 8), or 0 where
 * it does not take it (fp32, more than CUDA_SMALL_MAX_ROWS rows, n or k not a multiple of 8, a
 * LayerNorm wider than CUDA_MAX_HIDDEN, or more shared memory than a block may have): the caller
 * then uses cuBLASLt and the separate kernels. */
int cuda_small_gemm_columns(cuda_dtype dtype, int rows, int n, int k, int epilogue, int norm_x);
cudaError_t cuda_small_gemm(cuda_dtype dtype, const cuda_batch_view *batch,
                            const cuda_small_gemm_params *params, cudaStream_t stream);
/* Lets the small-batch kernels use more than 48 KB of shared memory on the current device. */
cudaError_t cuda_small_setup(void);

/* ---- the persistent small pass (EMBEDRAG_CUDA_SMALL=persist) ---- */

/* One layer's device pointers (weights and biases of the dtype, LayerNorm parameters fp32). */
typedef struct cuda_small_layer {
    const void *weight[4], *bias[4]; /* QKV, attention output, intermediate, output */
    const float *attention_gamma, *attention_beta, *output_gamma, *output_beta;
} cuda_small_layer;

typedef struct cuda_small_pass_params {
    int rows; /* the launch's row count (at most CUDA_SMALL_MAX_ROWS; the header's tokens used) */
    int layers, hidden, intermediate, heads, activation;
    float eps;
    const cuda_small_layer *table;              /* device memory, `layers` entries */
    void *x, *x1, *qkv, *context, *hidden_rows; /* the stream's activations */
    float *scratch;                             /* CUDA_SMALL_MAX_ROWS x hidden floats */
    unsigned *counters;                         /* 3, 0 before a launch and again after it */
    /* Or NULL: time stamps (ns, the GPU's clock) of each block at each step, for
     * cuda_small_trace_read: CUDA_SMALL_TRACE_BLOCKS x 5 a step, 5 steps a layer (QKV,
     * attention, attention output, intermediate, output). Passes of more blocks leave it. */
    unsigned long long *trace;
} cuda_small_pass_params;
#define CUDA_SMALL_TRACE_BLOCKS 256
/* Adds a pass's trace (copied to the host) to sums[5][6], nanoseconds per step kind (QKV,
 * attention, attention output, intermediate, output) summed over its layers: the grid barrier
 * (the last arrival to the first release), the last block's release after that, its wait for X
 * and W, its products, its epilogue, and from its end to the next step's last arrival. 0 where
 * the pass was not traced. */
int cuda_small_trace_read(cuda_dtype dtype, const cuda_small_pass_params *p,
                          const unsigned long long *trace, double *sums);

/* Whether cuda_small_pass takes this pass on the current device: fp16/bf16, heads of 32 or 64,
 * every product taken by the small-batch kernel in the chain's shapes, and every block resident
 * at once. */
int cuda_small_pass_takes(cuda_dtype dtype, const cuda_small_pass_params *params);
/* Every layer of the pass over x (the embedding's output; the last layer's output is left in x,
 * normalized) in one launch: the chain of small-batch kernels, grid barriers between its steps
 * (cuda_kernels.cu says how). */
cudaError_t cuda_small_pass(cuda_dtype dtype, const cuda_batch_view *batch,
                            const cuda_small_pass_params *params, cudaStream_t stream);

/* ---- the cluster pass (EMBEDRAG_CUDA_SMALL=cluster, cuda_cluster.cu) ---- */

/* Rows a cluster pass takes (one m16n8k16 row tile), and the bytes of its weight stream's
 * chunks. */
#define CUDA_CLUSTER_MAX_ROWS 16
#define CUDA_CLUSTER_CHUNK 32768

typedef struct cuda_cluster_model {
    int layers, hidden, intermediate, heads, activation; /* activation: CUDA_ACT_*, exact */
    float eps;
} cuda_cluster_model;

/* Bytes of the packed weight stream a cluster pass of this model reads, or 0 where the pass
 * cannot take the model: fp32, more than 16 heads (a block a head, one cluster), heads other
 * than 32 or 64 wide, widths not multiples of 8 x heads and of 32, hidden above
 * CUDA_MAX_HIDDEN. */
size_t cuda_cluster_stream_bytes(cuda_dtype dtype, const cuda_cluster_model *model);
/* Whether this device runs the pass: the stream is taken, the blocks' shared memory fits, and a
 * cluster of `heads` blocks can be resident (cudaOccupancyMaxActiveClusters). Sets the kernel's
 * attributes; call it once before cuda_cluster_pass. */
int cuda_cluster_takes(cuda_dtype dtype, const cuda_cluster_model *model);
/* Writes layer `layer`'s part of the stream (cuda_cluster_stream_bytes bytes at `stream`) from
 * its device weights, biases and LayerNorm parameters (weights[0..3]: the backend's [n x k]
 * matrices of the dtype). */
cudaError_t cuda_cluster_pack(cuda_dtype dtype, const cuda_cluster_model *model, int layer,
                              const cuda_small_layer *weights, void *stream, cudaStream_t st);
/* Every layer over x (at most CUDA_CLUSTER_MAX_ROWS rows of the batch, hidden wide: the
 * embedding's output; the last layer's output is left there) in one launch of one cluster.
 * trace: NULL, or CUDA_CLUSTER_TRACE_PHASES counters (device, zeroed once) to which block 0 adds
 * the nanoseconds of each phase (cuda_cluster_trace_names), summed over layers and passes; the
 * last counts the passes. */
#define CUDA_CLUSTER_TRACE_PHASES 17
cudaError_t cuda_cluster_pass(cuda_dtype dtype, const cuda_batch_view *batch,
                              const cuda_cluster_model *model, const void *stream, void *x,
                              unsigned long long *trace, cudaStream_t st);
/* The phases' names, CUDA_CLUSTER_TRACE_PHASES - 1 of them. */
extern const char *const cuda_cluster_trace_names[];

/* x[i] = a pseudo-random value in [-1, 1) of (seed, i), rounded to the dtype. */
cudaError_t cuda_fill_pattern(cuda_dtype dtype, void *x, size_t count, unsigned seed,
                              cudaStream_t stream);

/* *digest (device memory) = a 64-bit digest of `bytes` bytes (a multiple of 4) at x: equal
 * contents, equal digests. */
cudaError_t cuda_digest(const void *x, size_t bytes, unsigned long long *digest,
                        cudaStream_t stream);

/* dst[i] = src[i] rounded to the dtype (weights at load time). */
cudaError_t cuda_convert(cuda_dtype dtype, const float *src, void *dst, size_t count,
                         cudaStream_t stream);

/* ---- the fused output products (cuda_gemm_norm.cu, sm_90a) ---- */

/* Whether cuda_gemm_norm takes products of n output columns over k inputs in this dtype on the
 * current device (n 384, k a multiple of 64, fp16 or bf16, compute capability 9.0 exactly: the
 * kernel is built for sm_90a only), and if so readies the kernel there (its shared memory). Call
 * once per device before cuda_gemm_norm. */
int cuda_gemm_norm_prepare(cuda_dtype dtype, int n, int k);

/* out = LayerNorm(x weight^T + bias + residual) row by row, x `rows` x k and weight 384 x k, out
 * and residual rows x 384 (out must not alias residual or x), bias of the dtype, gamma and beta
 * fp32; the product plus bias rounded to the dtype before the residual is added, as the unfused
 * path (cuBLASLt, then cuda_add_layer_norm) does. At most `sms` blocks (the device's
 * multiprocessors). */
cudaError_t cuda_gemm_norm(cuda_dtype dtype, int rows, const void *x, int k, const void *weight,
                           const void *bias, const void *residual, const float *gamma,
                           const float *beta, float eps, void *out, int sms, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
