/* The CUDA backend: a BERT encoder forward pass on one NVIDIA GPU over sequences packed without
 * padding. Weights are uploaded once, layer by layer, as fp16, bf16 or fp32 (the precision asked
 * for); activations stay on the device. Matrix products run on cuBLASLt (bias in its epilogue),
 * everything else on our own kernels (cuda_kernels.cu). A batch goes up as one copy of token ids
 * and offsets from pinned memory, and only the pooled vectors come down. Each stream has its own
 * CUDA stream (latency streams at the device's highest priority), buffers, cuBLASLt handle and
 * workspace; batches of up to CUDA_GRAPH_MAX_TOKENS tokens replay a CUDA graph captured once per
 * power-of-two bucket of tokens, so a query costs one graph launch rather than ~100 kernel
 * launches. Failures while running come back in the ticket, never as a crash. */
#include "backend/cuda/cuda_backend.h"

#include "backend/backend.h"
#include "backend/cuda/cuda_blas.h"
#include "backend/cuda/cuda_kernels.h"
#include "util/error.h"

#include "embedrag.h"

#include <cuda_runtime_api.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* 2^30: device memory is reported in GiB. */
#define CUDA_GIB 1073741824.0
/* cuBLASLt's workspace per stream: NVIDIA recommends 32 MiB on Hopper. */
#define CUDA_WORKSPACE_BYTES ((size_t)32 << 20)
/* Elements converted per step while loading weights (4 MB of fp32 staging on host and device). */
#define CUDA_LOAD_CHUNK ((size_t)1 << 20)
/* Device sub-allocations are aligned like cudaMalloc's own (and as cuBLASLt prefers). */
#define CUDA_ALIGN ((size_t)256)

/* A bulk batch that keeps an H200 busy: 1000 texts of 128 tokens. Below ~32k tokens the thin
 * 384-wide GEMMs leave the GPU partly idle and the ~10 launches a layer start to show; above,
 * memory grows (about 8 KB a token for a 384-wide model in fp16) for little gain. Capped by the
 * device's free memory (CUDA_PREFERRED_MEMORY_SHARE). */
#define CUDA_PREFERRED_BATCH_TOKENS 131072
#define CUDA_PREFERRED_MEMORY_SHARE 0.25
/* The most tokens one batch may reserve: half the free memory, and at most 2^20 (so every row
 * count and element offset the kernels and cuBLASLt see stays far inside their types). */
#define CUDA_MAX_BATCH_TOKENS (1 << 20)
/* The fewest rows for which the attention output product and its LayerNorm run as one kernel
 * (cuda_gemm_norm). On an H200, 12 x 384 fp16: at 128,000 rows 113 us alone (139 in a pass)
 * against cuBLASLt's 71 and the LayerNorm kernel's 75 (1000 x 128 tokens 8.28-8.32 -> 8.37-8.44 M
 * tokens/s); at 5,000 rows 10.0 against ~12 us alone, but no gain in the pass (100 x 50:
 * 0.808-0.828 -> 0.823-0.838 ms); the output product (K = 1536) took 321 us fused against 229 +
 * 75 and stays apart (bench/cuda-notes.md). */
#define CUDA_FUSED_NORM_MIN_ROWS 16384
#define CUDA_MAX_MEMORY_SHARE 0.5

/* Batches of at most CUDA_GRAPH_MAX_TOKENS tokens (cuda_backend.h) replay a CUDA graph captured
 * for their bucket (the next size of graph_sizes); larger ones launch directly. Sizes grow by 1.5
 * and 4/3 in turn, so that a batch pads to at most 1.5 times its tokens. Measured on an H200
 * (bench/cuda-notes.md): with power-of-two buckets a graph won up to ~800 tokens (a 16-token
 * query: 0.30 ms against 0.61 ms launched) and lost beyond ~1000, where the GPU's work outlasts
 * the launches and the padding costs more than they do. */
static const int graph_sizes[] = {16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024};
#define CUDA_GRAPH_BUCKETS ((int)(sizeof graph_sizes / sizeof graph_sizes[0]))
/* cuBLASLt plans (layouts and chosen algorithms) kept per stream, one per row count. */
#define CUDA_PLAN_CACHE 12

/* cuBLASLt's heuristic ranks a few algorithms for a product, and its first is not always the
 * fastest on the card: bench/cublaslt_algos.c timed every one it offers on an H200 (fp16, 384
 * wide), and the fastest took 8% less time than the first for a layer's four products at 128,000
 * rows (the intermediate product 14% less). So for bulk batches the backend times the candidates,
 * once per class of row counts (each class 1.25 times the one before: a bulk run of mixed lengths
 * meets one or two), and keeps the fastest for the class. Only candidates that compute the
 * first's bits take part (same_bits), so the choice changes the speed and never a vector: every
 * process gives the vectors it gave before. The first stays unless another is at least
 * CUDA_TUNE_MARGIN faster. Below CUDA_TUNE_MIN_TOKENS rows the products are short and
 * launch-bound, and most run inside a graph, where the winners of the isolated timing measured
 * slower (a 16-token query 0.319 ms against 0.285): the heuristic's first there, as before.
 * EMBEDRAG_CUDA_TUNE=0 keeps the heuristic's first everywhere, =verbose prints each choice, =all
 * times every row count (a test variant, which checks that the vectors keep their bits). */
#define CUDA_TUNE_MIN_TOKENS 8192
#define CUDA_TUNE_CANDIDATES 8
#define CUDA_TUNE_CLASSES 72 /* row counts up to CUDA_MAX_BATCH_TOKENS, in steps of 1.25 */
#define CUDA_TUNE_MARGIN 0.95
#define CUDA_TUNE_RUNS 3 /* timed rounds over the candidates, after one untimed */

/* Starting guesses for the router, before batches are measured: the H200's dense fp16 rate is
 * ~990 TFLOP/s of which this model's thin GEMMs reach about half (DESIGN.md: 547 TFLOP/s for a
 * layer's four GEMMs at 128k rows), and the fp32 path runs on CUDA cores (~67 TFLOP/s peak). The
 * fixed cost is a graph launch plus two small copies, and a few microseconds a layer. */
#define CUDA_GUESS_FLOPS_HALF 3.0e14
#define CUDA_GUESS_FLOPS_FP32 2.0e13
#define CUDA_GUESS_OVERHEAD_SECONDS 3.0e-5
#define CUDA_GUESS_OVERHEAD_SECONDS_PER_LAYER 5.0e-6
/* Batches this large update the rate; smaller ones the fixed cost. */
#define CUDA_RATE_MIN_TOKENS 8192
#define CUDA_RATE_SMOOTHING 0.2

enum { GEMM_QKV, GEMM_ATTENTION_OUT, GEMM_INTERMEDIATE, GEMM_OUTPUT, GEMM_KINDS };
static const char *const gemm_names[GEMM_KINDS] = {"QKV", "attention output", "intermediate",
                                                   "output"};

typedef struct cuda_layer {
    void *block; /* one allocation holding everything below */
    void *weight[GEMM_KINDS], *bias[GEMM_KINDS];
    float *attention_ln_gamma, *attention_ln_beta, *output_ln_gamma, *output_ln_beta;
} cuda_layer;

typedef struct cuda_backend {
    backend base;
    const model_config *config;
    int device;
    cuda_dtype dtype;
    size_t element; /* bytes per activation / weight element */
    int head_size;
    cuda_blas blas;
    cuda_layer *layers;
    int layers_loaded;
    void *embedding_block;
    float *word, *position, *type, *embedding_gamma, *embedding_beta;
    /* Staging while loading, freed once every layer is loaded. */
    float *load_host, *load_device;
    int priority_bulk, priority_latency;
    /* Choices, read once from the environment (see cuda_backend_create). */
    bool use_graphs;
    int attention;      /* CUDA_ATTENTION_* */
    int inter_epilogue; /* cuBLASLt epilogue of the intermediate GEMM */
    int own_activation; /* CUDA_ACT_* our kernel applies after it, or CUDA_ACT_NONE */
    /* EMBEDRAG_CUDA_SMALL: passes of at most CUDA_SMALL_MAX_ROWS rows use cuda_small_gemm, whose
     * launches (and attention v2's) are programmatic dependents unless small_pdl is off. */
    bool small, small_pdl;
    /* The default path's LayerNorm and attention v2 kernels launched as programmatic dependents
     * of the product before each, outside graphs (unless EMBEDRAG_CUDA_PDL=0; enqueue_forward). */
    bool pdl;
    bool small_norm_next; /* the chain (small_chain), unless EMBEDRAG_CUDA_SMALL=lastnorm */
    /* The attention output product with its residual and LayerNorm in one kernel
     * (cuda_gemm_norm, sm_90a) outside graphs for passes of fused_min_rows rows or more, where
     * this device and the model take it (EMBEDRAG_CUDA_FUSED_NORM: 0 never, "all" at any row
     * count outside graphs); sms bounds its persistent grid. */
    bool fused_norm;
    int fused_min_rows;
    int sms;
    /* EMBEDRAG_CUDA_SMALL=persist: a chain pass in one launch (cuda_small_pass), from the layers'
     * pointers in small_table (device memory, made once every layer is loaded). */
    bool small_persist;
    cuda_small_layer *small_table;
    bool small_trace; /* EMBEDRAG_CUDA_SMALL_TRACE: time the persistent pass's steps */
    /* EMBEDRAG_CUDA_SMALL=cluster: passes of at most CUDA_CLUSTER_MAX_ROWS rows in one cluster
     * launch (cuda_cluster_pass) over cluster_stream, the weights packed once every layer is
     * loaded; small_cluster only where cuda_cluster_takes the model on this device. */
    bool small_cluster;
    cuda_cluster_model cluster_model;
    void *cluster_stream;
    /* EMBEDRAG_CUDA_CLUSTER_TRACE: the pass's phase sums (device), printed when destroyed. */
    unsigned long long *cluster_trace;
    int small_activation; /* CUDA_ACT_* of the model, exact (erf GELU for GELU models) */
    char name[32], device_text[320], kernels[256];

    /* Algorithm choices per class of row counts (get_plan), shared by the streams. */
    bool tune, tune_verbose;
    int tune_min_tokens; /* CUDA_TUNE_MIN_TOKENS, or 1 (EMBEDRAG_CUDA_TUNE=all) */
    pthread_mutex_t tune_lock;
    struct cuda_tuned {
        bool timed;  /* the class's candidates were timed */
        bool better; /* and `algo` beat the heuristic's first by the margin */
        cublasLtMatmulAlgo_t algo;
        cublasLtMatmulAlgo_t first; /* the heuristic's first, whose bits `algo` gives */
    } tuned[CUDA_TUNE_CLASSES][GEMM_KINDS];

    pthread_mutex_t rate_lock;
    double seconds_per_flop, overhead_seconds;
    int fail_after; /* EMBEDRAG_TEST_CUDA_FAIL_AFTER on device 0, else -1 */
    atomic_int batches;
} cuda_backend;

typedef struct cuda_plan {
    int tokens; /* rows (M); 0 when the slot is free */
    unsigned long last_use;
    cublasLtMatrixLayout_t input[GEMM_KINDS], output[GEMM_KINDS];
    cublasLtMatmulAlgo_t algo[GEMM_KINDS];
    int small_pass; /* whether cuda_small_pass takes a pass of `tokens` rows: -1 not yet asked */
} cuda_plan;

/* Sizes of the batch descriptor's sections (cuda_kernels.h), for one launch shape. */
typedef struct cuda_shape {
    int tokens, sequences, tiles;
} cuda_shape;

struct backend_stream {
    cuda_backend *b;
    cudaStream_t stream;
    cudaEvent_t start, done;
    cublasLtHandle_t blas;
    cublasLtMatmulDesc_t matmul[GEMM_KINDS];
    cublasLtMatrixLayout_t weight_layout[GEMM_KINDS];
    cuda_plan plans[CUDA_PLAN_CACHE];
    unsigned long plan_clock;

    /* Reserved bounds and the buffers sized for them. */
    cuda_shape capacity;
    int capacity_len;
    void *device_block, *host_block;
    void *x, *x1, *qkv, *context, *hidden, *workspace;
    float *pooled;
    /* The small-batch kernels' LayerNorm: fp32 rows (CUDA_SMALL_MAX_ROWS x hidden) and the
     * last-block counters, then the persistent pass's barrier and exit counters (all 0 between
     * launches); NULL unless EMBEDRAG_CUDA_SMALL is on. */
    float *small_scratch;
    unsigned *small_counters;
    int *descriptor;      /* device */
    int *host_descriptor; /* pinned mirror */
    float *host_pooled;   /* pinned landing place when the caller's rows are not pinned */
    cudaGraphExec_t graphs[CUDA_GRAPH_BUCKETS];
    bool graphs_failed; /* a capture failed: batches run without graphs */

    /* The batch in flight (one at a time). */
    bool pending;
    backend_ticket *pending_ticket;
    float *pending_out;
    bool pending_staged;
    int pending_count, pending_tokens;
    bool pending_graph;
    double pending_flops;

    double last_seconds;
    bool last_graph;

    /* EMBEDRAG_CUDA_SMALL_TRACE: the persistent pass's stamps (device, and a host copy), their
     * sums per step kind (cuda_small_trace_read) and the passes added, printed at the end. */
    unsigned long long *trace, *trace_host;
    size_t trace_bytes;
    double trace_sums[5][6];
    int trace_passes;
    bool pending_trace;
    int pending_trace_rows;
};

/* ---- errors ---- */

/* Sets the thread's error for a failed CUDA call and returns the status: out of memory where
 * that is what happened, else a device failure. */
static int cuda_error(cudaError_t e, const char *what)
{
    int code = e == cudaErrorMemoryAllocation ? EMBEDRAG_ERR_NO_MEMORY : EMBEDRAG_ERR_DEVICE;
    /* Clear a non-sticky error so that it is not reported again by an unrelated call. */
    cudaGetLastError();
    return err_set(code, "CUDA: %s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
}

static int blas_error(const cuda_backend *b, cublasStatus_t status, const char *what)
{
    return err_set(EMBEDRAG_ERR_DEVICE, "cuBLASLt: %s: %s", what,
                   b->blas.status_string ? b->blas.status_string(status) : "failed");
}

#define CUDA_TRY(call, what)                                                                       \
    do {                                                                                           \
        cudaError_t cuda_try_status = (call);                                                      \
        if (cuda_try_status != cudaSuccess) return cuda_error(cuda_try_status, what);              \
    } while (0)

static size_t align_up(size_t n)
{
    return (n + CUDA_ALIGN - 1) / CUDA_ALIGN * CUDA_ALIGN;
}

/* ---- the batch descriptor ---- */

/* Element offsets of each section for a launch shape; returns the total in ints. */
typedef struct cuda_layout {
    size_t ids, sequence_of, offsets, skip, tiles, total;
} cuda_layout;

static cuda_layout layout_for(cuda_shape shape)
{
    cuda_layout l;
    l.ids = CUDA_HEADER_INTS;
    l.sequence_of = l.ids + (size_t)shape.tokens;
    l.offsets = l.sequence_of + (size_t)shape.tokens;
    l.skip = l.offsets + (size_t)shape.sequences + 1;
    l.tiles = l.skip + (size_t)shape.sequences;
    l.total = l.tiles + 2 * (size_t)shape.tiles;
    return l;
}

/* The most attention tiles a batch within these bounds can have: each sequence has
 * ceil(len / 64) <= len / 64 + 1. */
static int tiles_bound(int tokens, int sequences)
{
    return sequences + tokens / CUDA_ATTENTION_TILE + 1;
}

static cuda_batch_view view_for(const backend_stream *s, cuda_shape shape)
{
    cuda_layout l = layout_for(shape);
    const int *d = s->descriptor;
    return (cuda_batch_view){.header = d,
                             .ids = d + l.ids,
                             .sequence_of = d + l.sequence_of,
                             .offsets = d + l.offsets,
                             .skip = d + l.skip,
                             .tiles = d + l.tiles,
                             .max_tokens = shape.tokens,
                             .max_sequences = shape.sequences,
                             .max_tiles = shape.tiles};
}

/* Writes the batch into the pinned descriptor in the layout of `shape`. */
static void write_descriptor(backend_stream *s, const backend_batch *batch, cuda_shape shape,
                             int tiles)
{
    cuda_layout l = layout_for(shape);
    int *h = s->host_descriptor;
    h[CUDA_HEADER_TOKENS] = batch->tokens;
    h[CUDA_HEADER_SEQUENCES] = batch->count;
    h[CUDA_HEADER_TILES] = tiles;
    h[3] = 0;
    memcpy(h + l.ids, batch->ids, (size_t)batch->tokens * sizeof(int));
    int *tile = h + l.tiles;
    for (int i = 0; i < batch->count; i++) {
        int start = batch->offsets[i], end = batch->offsets[i + 1];
        h[l.offsets + (size_t)i] = start;
        h[l.skip + (size_t)i] = batch->pool_skip ? batch->pool_skip[i] : 0;
        for (int t = start; t < end; t++) h[l.sequence_of + (size_t)t] = i;
        for (int q = 0; q < end - start; q += CUDA_ATTENTION_TILE) {
            *tile++ = i;
            *tile++ = q;
        }
    }
    h[l.offsets + (size_t)batch->count] = batch->tokens;
}

static int count_tiles(const backend_batch *batch)
{
    int tiles = 0;
    for (int i = 0; i < batch->count; i++) {
        int len = batch->offsets[i + 1] - batch->offsets[i];
        tiles += (len + CUDA_ATTENTION_TILE - 1) / CUDA_ATTENTION_TILE;
    }
    return tiles;
}

/* ---- cuBLASLt plans ---- */

static cudaDataType_t blas_type(cuda_dtype dtype)
{
    return dtype == CUDA_DTYPE_F16    ? CUDA_R_16F
           : dtype == CUDA_DTYPE_BF16 ? CUDA_R_16BF
                                      : CUDA_R_32F;
}

/* Output width (N) and inner dimension (K) of each GEMM. */
static void gemm_dims(const model_config *c, int kind, int *n, int *k)
{
    int h = c->hidden_size, in = c->intermediate_size;
    static const int n_of[GEMM_KINDS] = {3, 1, 0, 1};
    *n = kind == GEMM_INTERMEDIATE ? in : n_of[kind] * h;
    *k = kind == GEMM_OUTPUT ? in : h;
}

static void plan_free(const cuda_backend *b, cuda_plan *p)
{
    for (int k = 0; k < GEMM_KINDS; k++) {
        if (p->input[k]) b->blas.layout_destroy(p->input[k]);
        if (p->output[k]) b->blas.layout_destroy(p->output[k]);
    }
    memset(p, 0, sizeof *p);
}

/* The class of a row count for the algorithm choice: the smallest c with bound(c) >= tokens,
 * where bound(0) = 1 and bound(c + 1) = bound(c) * 5 / 4 + 1. */
static int tune_class(int tokens)
{
    int c = 0;
    long bound = 1;
    while (bound < tokens && c < CUDA_TUNE_CLASSES - 1) {
        bound = bound * 5 / 4 + 1;
        c++;
    }
    return c;
}

/* One product on the stream: y = x W^T with the descriptor's epilogue, by `algo`. */
static cublasStatus_t run_product(backend_stream *s, int kind, const void *w, const void *x,
                                  cublasLtMatrixLayout_t input, void *y,
                                  cublasLtMatrixLayout_t output, const cublasLtMatmulAlgo_t *algo)
{
    const float one = 1.0f, zero = 0.0f;
    return s->b->blas.matmul(s->blas, s->matmul[kind], &one, w, s->weight_layout[kind], x, input,
                             &zero, y, output, y, output, algo, s->workspace, CUDA_WORKSPACE_BYTES,
                             s->stream);
}

/* Where the candidates of product `kind` read and write while they are timed: the pass's own
 * input and output buffers, which hold nothing yet (no batch is in flight when a plan is made). */
static void tuning_buffers(backend_stream *s, int kind, void **x, void **y)
{
    *x = kind == GEMM_OUTPUT ? s->hidden : s->x;
    *y = kind == GEMM_QKV ? s->qkv : kind == GEMM_INTERMEDIATE ? s->hidden : s->x1;
}

/* Microseconds one run of product `kind` takes with `algo` over the plan's rows (tuning_buffers,
 * layer 0's weights); a negative value when the algorithm fails. */
static double time_candidate(backend_stream *s, int kind, cublasLtMatrixLayout_t input,
                             cublasLtMatrixLayout_t output, const cublasLtMatmulAlgo_t *algo)
{
    void *x, *y;
    tuning_buffers(s, kind, &x, &y);
    if (cudaEventRecord(s->start, s->stream) != cudaSuccess) return -1.0;
    cublasStatus_t st =
        run_product(s, kind, s->b->layers[0].weight[kind], x, input, y, output, algo);
    float ms = 0.0f;
    if (st != CUBLAS_STATUS_SUCCESS || cudaEventRecord(s->done, s->stream) != cudaSuccess ||
        cudaEventSynchronize(s->done) != cudaSuccess ||
        cudaEventElapsedTime(&ms, s->start, s->done) != cudaSuccess) {
        cudaGetLastError();
        return -1.0;
    }
    return 1000.0 * ms;
}

/* Which of the `found` candidates compute the same bits as the first (eligible[0] is the first
 * itself): each runs once on the same pseudo-random input (rows in [-1, 1), written over the
 * stream's buffer), and the digests of their outputs are compared. A candidate that sums in
 * another order (split K, another reduction) differs in some output's last bit. Returns false when
 * the check itself fails (then only the first is used). */
static bool same_bits(backend_stream *s, int kind, int tokens, cublasLtMatrixLayout_t input,
                      cublasLtMatrixLayout_t output, const cublasLtMatmulHeuristicResult_t *results,
                      int found, bool *eligible)
{
    cuda_backend *b = s->b;
    int n, inner;
    gemm_dims(b->config, kind, &n, &inner);
    void *x, *y;
    tuning_buffers(s, kind, &x, &y);
    unsigned long long *digest = NULL, first = 0;
    if (cudaMalloc((void **)&digest, sizeof *digest) != cudaSuccess ||
        cuda_fill_pattern(b->dtype, x, (size_t)tokens * (size_t)inner, (unsigned)kind + 1u,
                          s->stream) != cudaSuccess) {
        if (digest) cudaFree(digest);
        cudaGetLastError();
        return false;
    }
    bool ok = true;
    for (int i = 0; i < found && ok; i++) {
        unsigned long long got = 0;
        eligible[i] = run_product(s, kind, b->layers[0].weight[kind], x, input, y, output,
                                  &results[i].algo) == CUBLAS_STATUS_SUCCESS;
        if (!eligible[i]) {
            ok = i > 0; /* the first must run */
            continue;
        }
        ok = cuda_digest(y, (size_t)tokens * (size_t)n * b->element, digest, s->stream) ==
                 cudaSuccess &&
             cudaMemcpyAsync(&got, digest, sizeof got, cudaMemcpyDeviceToHost, s->stream) ==
                 cudaSuccess &&
             cudaStreamSynchronize(s->stream) == cudaSuccess;
        if (i == 0) first = got;
        eligible[i] = ok && got == first;
    }
    cudaFree(digest);
    cudaGetLastError();
    return ok;
}

/* The algorithm for product `kind` over `tokens` rows, from the heuristic's `found` results (at
 * least one): the class's choice where its candidates were timed, if the heuristic ranks the same
 * algorithm first for this row count as for the timed one (the choice was checked against that
 * one's bits; another first keeps itself) and the choice takes this row count; else the
 * candidates timed now. Only candidates with the first's bits take part
 * (same_bits), so the choice changes the speed, never a vector. They are timed in rounds, each
 * candidate once a round, the first round untimed: the GPU's clock rises from idle during the
 * first runs, which would otherwise slow whichever candidate came first. A candidate's time is its
 * fastest run. */
static cublasLtMatmulAlgo_t choose_algorithm(backend_stream *s, int kind, int tokens,
                                             cublasLtMatrixLayout_t input,
                                             cublasLtMatrixLayout_t output,
                                             const cublasLtMatmulHeuristicResult_t *results,
                                             int found)
{
    cuda_backend *b = s->b;
    cublasLtMatmulAlgo_t chosen = results[0].algo;
    if (!b->tune || tokens < b->tune_min_tokens || found < 2) return chosen;
    int cls = tune_class(tokens);
    pthread_mutex_lock(&b->tune_lock);
    struct cuda_tuned *t = &b->tuned[cls][kind];
    if (t->timed) {
        cublasLtMatmulHeuristicResult_t check;
        bool same_first = memcmp(&t->first, &results[0].algo, sizeof t->first) == 0;
        if (t->better && same_first &&
            b->blas.algo_check(s->blas, s->matmul[kind], s->weight_layout[kind], input, output,
                               output, &t->algo, &check) == CUBLAS_STATUS_SUCCESS &&
            check.workspaceSize <= CUDA_WORKSPACE_BYTES)
            chosen = t->algo;
        if (b->tune_verbose && t->better)
            fprintf(stderr, "embedrag: CUDA device %d: %s product over %d rows: %s\n", b->device,
                    gemm_names[kind], tokens,
                    same_first ? "the class's timed choice" : "its own first (another first)");
        pthread_mutex_unlock(&b->tune_lock);
        return chosen;
    }
    bool eligible[CUDA_TUNE_CANDIDATES] = {false};
    double us[CUDA_TUNE_CANDIDATES];
    bool failed[CUDA_TUNE_CANDIDATES];
    int alike = 0;
    if (same_bits(s, kind, tokens, input, output, results, found, eligible))
        for (int i = 1; i < found; i++) alike += eligible[i];
    for (int i = 0; i < found; i++) {
        us[i] = -1.0;
        failed[i] = !eligible[i];
    }
    for (int run = 0; alike > 0 && run <= CUDA_TUNE_RUNS; run++)
        for (int i = 0; i < found; i++) {
            if (failed[i]) continue;
            double one = time_candidate(s, kind, input, output, &results[i].algo);
            if (one < 0)
                failed[i] = true;
            else if (run > 0 && (us[i] < 0 || one < us[i]))
                us[i] = one;
        }
    int best = 0;
    for (int i = 1; i < found; i++)
        if (!failed[i] && (failed[best] || us[i] < us[best])) best = i;
    t->timed = true;
    t->first = results[0].algo;
    t->better = best > 0 && !failed[best] && (failed[0] || us[best] < CUDA_TUNE_MARGIN * us[0]);
    t->algo = results[best].algo;
    if (t->better) chosen = t->algo;
    if (b->tune_verbose)
        fprintf(stderr,
                "embedrag: CUDA device %d: %s product over %d rows: %d of %d other candidates "
                "give the first's bits; candidate %d, %.1f us against the first's %.1f us%s\n",
                b->device, gemm_names[kind], tokens, alike, found - 1, best, us[best], us[0],
                t->better ? "" : " (the first kept)");
    pthread_mutex_unlock(&b->tune_lock);
    return chosen;
}

/* The plan for GEMMs of `tokens` rows: cached, else made (layouts and, for each of the four
 * products, the algorithm choose_algorithm picks from the heuristic's candidates). Row-major
 * Y[tokens x N] = X[tokens x K] W^T is, in cuBLASLt's column-major terms, Y^T (N x tokens) = op(W)
 * X^T with op = transpose. */
static int get_plan(backend_stream *s, int tokens, cuda_plan **out)
{
    cuda_backend *b = s->b;
    cuda_plan *slot = &s->plans[0];
    for (int i = 0; i < CUDA_PLAN_CACHE; i++) {
        cuda_plan *p = &s->plans[i];
        if (p->tokens == tokens) {
            p->last_use = ++s->plan_clock;
            *out = p;
            return 0;
        }
        if (p->last_use < slot->last_use) slot = p;
    }
    plan_free(b, slot);
    cudaDataType_t type = blas_type(b->dtype);
    cublasLtMatmulPreference_t preference = NULL;
    cublasStatus_t st = b->blas.preference_create(&preference);
    size_t workspace = CUDA_WORKSPACE_BYTES;
    if (st == CUBLAS_STATUS_SUCCESS)
        st = b->blas.preference_set(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                    &workspace, sizeof workspace);
    if (st != CUBLAS_STATUS_SUCCESS) {
        if (preference) b->blas.preference_destroy(preference);
        return blas_error(b, st, "matmul preference");
    }
    int rc = 0;
    for (int k = 0; k < GEMM_KINDS && !rc; k++) {
        int n, inner;
        gemm_dims(b->config, k, &n, &inner);
        st = b->blas.layout_create(&slot->input[k], type, (uint64_t)inner, (uint64_t)tokens,
                                   (int64_t)inner);
        if (st == CUBLAS_STATUS_SUCCESS)
            st = b->blas.layout_create(&slot->output[k], type, (uint64_t)n, (uint64_t)tokens,
                                       (int64_t)n);
        if (st != CUBLAS_STATUS_SUCCESS) {
            rc = blas_error(b, st, "matrix layout");
            break;
        }
        /* The heuristic reads the bias pointer's alignment: any layer's will do. */
        const void *bias = k == GEMM_INTERMEDIATE && b->own_activation != CUDA_ACT_NONE
                               ? NULL
                               : b->layers[0].bias[k];
        b->blas.desc_set(s->matmul[k], CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias);
        cublasLtMatmulHeuristicResult_t results[CUDA_TUNE_CANDIDATES];
        int found = 0;
        st = b->blas.heuristic(s->blas, s->matmul[k], s->weight_layout[k], slot->input[k],
                               slot->output[k], slot->output[k], preference,
                               b->tune && tokens >= b->tune_min_tokens ? CUDA_TUNE_CANDIDATES : 1,
                               results, &found);
        if (st != CUBLAS_STATUS_SUCCESS || found == 0) {
            rc = st != CUBLAS_STATUS_SUCCESS
                     ? blas_error(b, st, "algorithm heuristic")
                     : err_set(EMBEDRAG_ERR_UNSUPPORTED,
                               "cuBLASLt has no algorithm for a %d x %d x %d product", tokens, n,
                               inner);
            break;
        }
        slot->algo[k] =
            choose_algorithm(s, k, tokens, slot->input[k], slot->output[k], results, found);
    }
    b->blas.preference_destroy(preference);
    if (rc) {
        plan_free(b, slot);
        return rc;
    }
    slot->tokens = tokens;
    slot->small_pass = -1;
    slot->last_use = ++s->plan_clock;
    *out = slot;
    return 0;
}

static int gemm(backend_stream *s, const cuda_plan *plan, int kind, const cuda_layer *layer,
                const void *input, void *output)
{
    cuda_backend *b = s->b;
    /* Without a bias epilogue cuBLASLt refuses a bias pointer (our own kernel adds the bias). */
    const void *bias =
        kind == GEMM_INTERMEDIATE && b->own_activation != CUDA_ACT_NONE ? NULL : layer->bias[kind];
    cublasStatus_t st =
        b->blas.desc_set(s->matmul[kind], CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = run_product(s, kind, layer->weight[kind], input, plan->input[kind], output,
                         plan->output[kind], &plan->algo[kind]);
    return st == CUBLAS_STATUS_SUCCESS ? 0 : blas_error(b, st, "matmul");
}

/* ---- the forward pass ---- */

/* The epilogue the small-batch kernel (EMBEDRAG_CUDA_SMALL) fuses into each product. */
static int small_epilogue(int kind)
{
    return kind == GEMM_INTERMEDIATE ? CUDA_SMALL_ACTIVATION
           : kind == GEMM_QKV        ? CUDA_SMALL_BIAS
                                     : CUDA_SMALL_NORM;
}

/* Whether product `kind` of a pass over plan->tokens rows takes the small-batch kernel: the
 * variant is on, the pass has at most CUDA_SMALL_MAX_ROWS rows (a query's graph bucket) and the
 * kernel takes the shape (cuda_small_gemm_columns: fp16/bf16, widths multiples of 8, shared memory
 * enough); otherwise cuBLASLt and the separate kernels, as without the variant. Decided per
 * product, so a shape the kernel does not take for one product still gets it for the others. */
static bool small_takes(const backend_stream *s, const cuda_plan *plan, int kind)
{
    const cuda_backend *b = s->b;
    if (!b->small || plan->tokens > CUDA_SMALL_MAX_ROWS) return false;
    int n, k;
    gemm_dims(b->config, kind, &n, &k);
    return cuda_small_gemm_columns(b->dtype, plan->tokens, n, k, small_epilogue(kind), 0) > 0;
}

/* Whether a pass takes the chain of small-batch kernels in which each LayerNorm is done by the
 * product after it (EMBEDRAG_CUDA_SMALL on, not "lastnorm"): every product of the layer must take
 * the kernel in the shape the chain gives it (QKV and intermediate normalizing their X, attention
 * output and output leaving fp32 sums, the last output normalizing as before). */
static bool small_chain(const backend_stream *s, const cuda_plan *plan)
{
    const cuda_backend *b = s->b;
    if (!b->small || !b->small_norm_next || plan->tokens > CUDA_SMALL_MAX_ROWS) return false;
    static const int kinds[] = {GEMM_QKV, GEMM_ATTENTION_OUT, GEMM_INTERMEDIATE, GEMM_OUTPUT};
    static const int epilogues[] = {CUDA_SMALL_BIAS, CUDA_SMALL_SUM, CUDA_SMALL_ACTIVATION,
                                    CUDA_SMALL_SUM};
    static const int norm_x[] = {1, 0, 1, 0};
    for (int i = 0; i < 4; i++) {
        int n, k;
        gemm_dims(b->config, kinds[i], &n, &k);
        if (!cuda_small_gemm_columns(b->dtype, plan->tokens, n, k, epilogues[i], norm_x[i]) ||
            (kinds[i] == GEMM_OUTPUT &&
             !cuda_small_gemm_columns(b->dtype, plan->tokens, n, k, CUDA_SMALL_NORM, 0)))
            return false;
    }
    return true;
}

/* One launch of the small-batch kernel for product `kind`: `epilogue` on `out` (or the scratch
 * rows for CUDA_SMALL_SUM), X from `input`, or, with gamma_in (the chain, small_chain),
 * normalized from the scratch rows (and stored to x_out). */
static int small_product(backend_stream *s, const cuda_batch_view *view, const cuda_plan *plan,
                         int kind, int epilogue, const cuda_layer *layer, const void *input,
                         const float *gamma_in, const float *beta_in, void *x_out,
                         const void *residual, const float *gamma, const float *beta, void *out)
{
    const cuda_backend *b = s->b;
    cuda_small_gemm_params p = {.rows = plan->tokens,
                                .x = input,
                                .weight = layer->weight[kind],
                                .bias = layer->bias[kind],
                                .y = out,
                                .epilogue = epilogue,
                                .activation = b->small_activation,
                                .residual = residual,
                                .gamma = gamma,
                                .beta = beta,
                                .eps = b->config->layer_norm_eps,
                                .scratch = s->small_scratch,
                                .x_scratch = gamma_in ? s->small_scratch : NULL,
                                .x_gamma = gamma_in,
                                .x_beta = beta_in,
                                .x_out = x_out,
                                .counter = s->small_counters + (kind == GEMM_OUTPUT),
                                .programmatic = b->small_pdl};
    gemm_dims(b->config, kind, &p.n, &p.k);
    CUDA_TRY(cuda_small_gemm(b->dtype, view, &p, s->stream), "small-batch GEMM kernel");
    return 0;
}

/* A pass on the chain: per layer QKV (normalizing the previous layer's output sums, from the
 * second layer on), attention, attention output + residual as fp32 sums, intermediate (normalizing
 * those) + activation, output + residual as sums (the last layer's normalized by its last block,
 * for the pooling). 5 launches a layer and no LayerNorm of its own; the same bits as the
 * small-batch kernels' last-block LayerNorms (the same formula on the same sums). */
static int enqueue_small_chain(backend_stream *s, const cuda_batch_view *view,
                               const cuda_plan *plan, int attention_pdl)
{
    const cuda_backend *b = s->b;
    const model_config *c = b->config;
    int h = c->hidden_size, rc = 0;
    cudaStream_t st = s->stream;
    for (int l = 0; l < c->num_layers && !rc; l++) {
        const cuda_layer *layer = &b->layers[l], *before = l ? &b->layers[l - 1] : NULL;
        rc = small_product(s, view, plan, GEMM_QKV, CUDA_SMALL_BIAS, layer, s->x,
                           before ? before->output_ln_gamma : NULL,
                           before ? before->output_ln_beta : NULL, before ? s->x : NULL, NULL, NULL,
                           NULL, s->qkv);
        if (rc) break;
        CUDA_TRY(cuda_attention(b->dtype, view, s->qkv, s->context, h, c->num_heads, b->attention,
                                attention_pdl, st),
                 "attention kernel");
        rc = small_product(s, view, plan, GEMM_ATTENTION_OUT, CUDA_SMALL_SUM, layer, s->context,
                           NULL, NULL, NULL, s->x, NULL, NULL, NULL);
        if (!rc)
            rc = small_product(s, view, plan, GEMM_INTERMEDIATE, CUDA_SMALL_ACTIVATION, layer, NULL,
                               layer->attention_ln_gamma, layer->attention_ln_beta, s->x1, NULL,
                               NULL, NULL, s->hidden);
        if (!rc) {
            bool last = l == c->num_layers - 1;
            rc = small_product(s, view, plan, GEMM_OUTPUT, last ? CUDA_SMALL_NORM : CUDA_SMALL_SUM,
                               layer, s->hidden, NULL, NULL, NULL, s->x1, layer->output_ln_gamma,
                               layer->output_ln_beta, s->x);
        }
    }
    return rc;
}

/* The persistent pass's arguments for a pass over `rows` rows on stream s. */
static cuda_small_pass_params small_pass_params(const backend_stream *s, int rows)
{
    const cuda_backend *b = s->b;
    const model_config *c = b->config;
    return (cuda_small_pass_params){.rows = rows,
                                    .layers = c->num_layers,
                                    .hidden = c->hidden_size,
                                    .intermediate = c->intermediate_size,
                                    .heads = c->num_heads,
                                    .activation = b->small_activation,
                                    .eps = c->layer_norm_eps,
                                    .table = b->small_table,
                                    .x = s->x,
                                    .x1 = s->x1,
                                    .qkv = s->qkv,
                                    .context = s->context,
                                    .hidden_rows = s->hidden,
                                    .scratch = s->small_scratch,
                                    .counters = s->small_counters + 1,
                                    .trace = s->trace};
}

/* Whether a pass runs as one persistent kernel (EMBEDRAG_CUDA_SMALL=persist): the chain would
 * take it, the layers' table is made, and cuda_small_pass takes the shape on this device (asked
 * once per plan: it reads the kernel's occupancy). */
static bool small_persistent(const backend_stream *s, cuda_plan *plan)
{
    if (!s->b->small_persist || !s->b->small_table || !small_chain(s, plan)) return false;
    if (plan->small_pass < 0) {
        cuda_small_pass_params p = small_pass_params(s, plan->tokens);
        plan->small_pass = cuda_small_pass_takes(s->b->dtype, &p);
    }
    return plan->small_pass == 1;
}

/* Product `kind` with its epilogue in one launch (small_takes said yes): QKV + bias, intermediate
 * + bias + activation, attention output and output + bias + residual + LayerNorm. */
static int small_gemm(backend_stream *s, const cuda_batch_view *view, const cuda_plan *plan,
                      int kind, const cuda_layer *layer, const void *input, const void *residual,
                      const float *gamma, const float *beta, void *out)
{
    return small_product(s, view, plan, kind, small_epilogue(kind), layer, input, NULL, NULL, NULL,
                         residual, gamma, beta, out);
}

/* out = LayerNorm(input W^T + bias + residual): a layer's attention output and its feed-forward
 * output. dependent: the LayerNorm kernel is launched as a programmatic dependent of the product
 * (see enqueue_forward). fused: the attention output product may take cuda_gemm_norm, one kernel
 * (not in a graph: its tensor maps hold this pass's pointers), for passes of at least
 * CUDA_FUSED_NORM_MIN_ROWS rows. */
static int project_and_norm(backend_stream *s, const cuda_batch_view *view, const cuda_plan *plan,
                            int kind, const cuda_layer *layer, const void *input,
                            const void *residual, const float *gamma, const float *beta, void *out,
                            bool dependent, bool fused)
{
    const cuda_backend *b = s->b;
    const model_config *c = b->config;
    if (small_takes(s, plan, kind))
        return small_gemm(s, view, plan, kind, layer, input, residual, gamma, beta, out);
    if (fused && b->fused_norm && kind == GEMM_ATTENTION_OUT && plan->tokens >= b->fused_min_rows) {
        CUDA_TRY(cuda_gemm_norm(b->dtype, plan->tokens, input, c->hidden_size, layer->weight[kind],
                                layer->bias[kind], residual, gamma, beta, c->layer_norm_eps, out,
                                b->sms, s->stream),
                 "fused attention output kernel");
        return 0;
    }
    int rc = gemm(s, plan, kind, layer, input, out);
    if (rc) return rc;
    CUDA_TRY(cuda_add_layer_norm(b->dtype, view, out, residual, gamma, beta, c->layer_norm_eps,
                                 c->hidden_size, out, dependent, s->stream),
             "layer norm kernel");
    return 0;
}

/* Enqueues the whole pass for a batch within `view`'s bounds, GEMMs over plan->tokens rows. With
 * EMBEDRAG_CUDA_SMALL and at most CUDA_SMALL_MAX_ROWS rows, a layer is 5 kernels: QKV + bias,
 * attention, attention output + LayerNorm, intermediate + activation, output + LayerNorm (each
 * product the small-batch kernel takes; cuBLASLt and the separate kernels for any it does not). */
static int enqueue_forward(backend_stream *s, const cuda_batch_view *view, cuda_plan *plan)
{
    const cuda_backend *b = s->b;
    const model_config *c = b->config;
    cuda_dtype dt = b->dtype;
    int h = c->hidden_size;
    float eps = c->layer_norm_eps;
    cudaStream_t st = s->stream;
    /* Attention v2 waits for the QKV product on the device: launched programmatically in a
     * small pass, it is resident before that product ends. */
    bool small_pass = b->small && plan->tokens <= CUDA_SMALL_MAX_ROWS;
    /* Launched one by one (not captured into a graph), each kernel after a product leaves the GPU
     * idle ~1.1 us while it starts (bench/cuda-notes.md): launched as a programmatic dependent, it
     * starts while the product finishes and waits for it on the device. On an H200 that took 100
     * x 50 tokens from 0.868 to 0.814 ms (12 x 384), the same vectors; in a graph the gaps are
     * ~0.1 us, and it gave no clear gain there. */
    enum cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    bool uncaptured = cudaStreamIsCapturing(st, &capture) == cudaSuccess &&
                      capture == cudaStreamCaptureStatusNone;
    bool dependent = b->pdl && uncaptured;
    int attention_pdl =
        b->attention == CUDA_ATTENTION_MMA_V2 && (dependent || (small_pass && b->small_pdl));
    CUDA_TRY(cuda_embed(dt, view, b->word, b->position, b->type, b->embedding_gamma,
                        b->embedding_beta, eps, h, s->x, st),
             "embedding kernel");
    if (b->cluster_stream && plan->tokens <= CUDA_CLUSTER_MAX_ROWS) {
        CUDA_TRY(cuda_cluster_pass(dt, view, &b->cluster_model, b->cluster_stream, s->x,
                                   b->cluster_trace, st),
                 "cluster pass kernel");
        CUDA_TRY(cuda_pool(dt, view, s->x, h, c->pooling, s->pooled, st), "pooling kernel");
        return 0;
    }
    if (small_persistent(s, plan)) {
        cuda_small_pass_params p = small_pass_params(s, plan->tokens);
        CUDA_TRY(cuda_small_pass(dt, view, &p, st), "persistent small-batch kernel");
        CUDA_TRY(cuda_pool(dt, view, s->x, h, c->pooling, s->pooled, st), "pooling kernel");
        return 0;
    }
    if (small_chain(s, plan)) {
        int rc = enqueue_small_chain(s, view, plan, attention_pdl);
        if (rc) return rc;
        CUDA_TRY(cuda_pool(dt, view, s->x, h, c->pooling, s->pooled, st), "pooling kernel");
        return 0;
    }
    for (int l = 0; l < c->num_layers; l++) {
        const cuda_layer *layer = &b->layers[l];
        int rc = small_takes(s, plan, GEMM_QKV)
                     ? small_gemm(s, view, plan, GEMM_QKV, layer, s->x, NULL, NULL, NULL, s->qkv)
                     : gemm(s, plan, GEMM_QKV, layer, s->x, s->qkv);
        if (rc) return rc;
        CUDA_TRY(cuda_attention(dt, view, s->qkv, s->context, h, c->num_heads, b->attention,
                                attention_pdl, st),
                 "attention kernel");
        rc = project_and_norm(s, view, plan, GEMM_ATTENTION_OUT, layer, s->context, s->x,
                              layer->attention_ln_gamma, layer->attention_ln_beta, s->x1, dependent,
                              uncaptured);
        if (rc) return rc;
        if (small_takes(s, plan, GEMM_INTERMEDIATE)) {
            rc = small_gemm(s, view, plan, GEMM_INTERMEDIATE, layer, s->x1, NULL, NULL, NULL,
                            s->hidden);
            if (rc) return rc;
        } else {
            rc = gemm(s, plan, GEMM_INTERMEDIATE, layer, s->x1, s->hidden);
            if (rc) return rc;
            if (b->own_activation != CUDA_ACT_NONE)
                CUDA_TRY(cuda_bias_activation(dt, view, s->hidden, layer->bias[GEMM_INTERMEDIATE],
                                              c->intermediate_size, b->own_activation, st),
                         "activation kernel");
        }
        rc =
            project_and_norm(s, view, plan, GEMM_OUTPUT, layer, s->hidden, s->x1,
                             layer->output_ln_gamma, layer->output_ln_beta, s->x, dependent, false);
        if (rc) return rc;
    }
    CUDA_TRY(cuda_pool(dt, view, s->x, h, c->pooling, s->pooled, st), "pooling kernel");
    return 0;
}

/* The graph bucket of a batch of `tokens` tokens, or -1 when it runs without a graph. */
static int graph_bucket(const backend_stream *s, int tokens, cuda_shape *shape)
{
    if (!s->b->use_graphs || tokens > CUDA_GRAPH_MAX_TOKENS) return -1;
    int bucket = 0;
    while (graph_sizes[bucket] < tokens) bucket++;
    int size = graph_sizes[bucket];
    /* A bucket holds as many sequences as tokens (every sequence has one at least). */
    cuda_shape want = {size, size, tiles_bound(size, size)};
    if (want.tokens > s->capacity.tokens || want.sequences > s->capacity.sequences ||
        want.tiles > s->capacity.tiles)
        return -1;
    *shape = want;
    return bucket;
}

static void destroy_graphs(backend_stream *s)
{
    for (int i = 0; i < CUDA_GRAPH_BUCKETS; i++)
        if (s->graphs[i]) {
            cudaGraphExecDestroy(s->graphs[i]);
            s->graphs[i] = NULL;
        }
}

/* Captures the forward pass for a bucket once (stream capture records what enqueue_forward
 * enqueues instead of running it). */
static int bucket_graph(backend_stream *s, int bucket, const cuda_batch_view *view, cuda_plan *plan,
                        cudaGraphExec_t *out)
{
    if (s->graphs[bucket]) {
        *out = s->graphs[bucket];
        return 0;
    }
    (void)small_persistent(s, plan); /* its device queries, outside the capture */
    CUDA_TRY(cudaStreamBeginCapture(s->stream, cudaStreamCaptureModeThreadLocal),
             "beginning a graph capture");
    int rc = enqueue_forward(s, view, plan);
    cudaGraph_t graph = NULL;
    cudaError_t e = cudaStreamEndCapture(s->stream, &graph);
    if (rc) {
        if (graph) cudaGraphDestroy(graph);
        cudaGetLastError();
        return rc;
    }
    if (e != cudaSuccess) return cuda_error(e, "capturing a graph");
    e = cudaGraphInstantiate(&s->graphs[bucket], graph, 0);
    cudaGraphDestroy(graph);
    if (e != cudaSuccess) {
        s->graphs[bucket] = NULL;
        return cuda_error(e, "instantiating a graph");
    }
    *out = s->graphs[bucket];
    return 0;
}

/* ---- streams ---- */

static void free_buffers(backend_stream *s)
{
    destroy_graphs(s);
    if (s->device_block) cudaFree(s->device_block);
    if (s->host_block) cudaFreeHost(s->host_block);
    s->device_block = s->host_block = NULL;
    s->x = s->x1 = s->qkv = s->context = s->hidden = s->workspace = NULL;
    s->pooled = s->host_pooled = NULL;
    s->small_scratch = NULL;
    s->small_counters = NULL;
    s->descriptor = s->host_descriptor = NULL;
    s->capacity = (cuda_shape){0, 0, 0};
}

/* Grows the stream's buffers to `want`; on failure the old ones stay and still work. */
static int grow_buffers(backend_stream *s, cuda_shape want)
{
    const cuda_backend *b = s->b;
    const model_config *c = b->config;
    size_t t = (size_t)want.tokens, h = (size_t)c->hidden_size, e = b->element;
    size_t sizes[10] = {
        t * h * e,                                  /* x */
        t * h * e,                                  /* x1 */
        t * 3 * h * e,                              /* qkv */
        t * h * e,                                  /* context */
        t * (size_t)c->intermediate_size * e,       /* hidden */
        CUDA_WORKSPACE_BYTES,                       /* cuBLASLt workspace */
        (size_t)want.sequences * h * sizeof(float), /* pooled */
        layout_for(want).total * sizeof(int),       /* descriptor */
        /* the small-batch LayerNorm's rows and its two counters (zeroed below, as all is) */
        b->small ? (size_t)CUDA_SMALL_MAX_ROWS * h * sizeof(float) : 0,
        b->small ? 4 * sizeof(unsigned) : 0,
    };
    size_t total = 0;
    for (int i = 0; i < 10; i++) total += align_up(sizes[i]);
    size_t host_sizes[2] = {sizes[7], sizes[6]};
    size_t host_total = align_up(host_sizes[0]) + align_up(host_sizes[1]);
    void *device_block = NULL, *host_block = NULL;
    cudaError_t err = cudaMalloc(&device_block, total);
    if (err == cudaSuccess) err = cudaMallocHost(&host_block, host_total);
    /* Rows past a batch are computed by the bucket's GEMMs: zeros keep them finite. On the
     * stream, so that it is done before the stream's next batch starts. */
    if (err == cudaSuccess) err = cudaMemsetAsync(device_block, 0, total, s->stream);
    if (err == cudaSuccess) err = cudaStreamSynchronize(s->stream);
    if (err != cudaSuccess) {
        if (device_block) cudaFree(device_block);
        if (host_block) cudaFreeHost(host_block);
        cudaGetLastError();
        return err_set(EMBEDRAG_ERR_NO_MEMORY,
                       "CUDA device %d: out of memory for a batch of %d tokens (%.2f GiB): %s",
                       b->device, want.tokens, (double)total / CUDA_GIB, cudaGetErrorString(err));
    }
    free_buffers(s);
    char *p = device_block;
    void **slots[10] = {&s->x,
                        &s->x1,
                        (void **)&s->qkv,
                        &s->context,
                        &s->hidden,
                        &s->workspace,
                        (void **)&s->pooled,
                        (void **)&s->descriptor,
                        (void **)&s->small_scratch,
                        (void **)&s->small_counters};
    for (int i = 0; i < 10; i++) {
        *slots[i] = sizes[i] ? p : NULL;
        p += align_up(sizes[i]);
    }
    s->host_descriptor = host_block;
    s->host_pooled = (float *)((char *)host_block + align_up(host_sizes[0]));
    s->device_block = device_block;
    s->host_block = host_block;
    s->capacity = want;
    return 0;
}

static int cuda_reserve(backend_stream *s, int max_tokens, int max_sequences, int max_len)
{
    cuda_backend *b = s->b;
    const model_config *c = b->config;
    if (max_tokens > b->base.caps.max_batch_tokens)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                       "a batch of %d tokens is more than the CUDA backend takes (%d)", max_tokens,
                       b->base.caps.max_batch_tokens);
    if (max_tokens < 1) max_tokens = 1;
    if (max_sequences > max_tokens) max_sequences = max_tokens; /* a token each at least */
    if (max_sequences < 1) max_sequences = 1;
    if (max_len > c->max_position_embeddings) max_len = c->max_position_embeddings;
    if (s->pending)
        return err_set(EMBEDRAG_ERR_BUSY, "reserve on a CUDA stream with a batch in flight");
    cuda_shape want = s->capacity;
    if (max_tokens > want.tokens) want.tokens = max_tokens;
    if (max_sequences > want.sequences) want.sequences = max_sequences;
    want.tiles = tiles_bound(want.tokens, want.sequences);
    if (want.tokens != s->capacity.tokens || want.sequences != s->capacity.sequences) {
        CUDA_TRY(cudaSetDevice(b->device), "selecting the device");
        int rc = grow_buffers(s, want);
        if (rc) return rc;
    }
    if (max_len > s->capacity_len) s->capacity_len = max_len;
    return 0;
}

static void cuda_stream_destroy(backend_stream *s)
{
    if (!s) return;
    cuda_backend *b = s->b;
    cudaSetDevice(b->device);
    if (s->stream) cudaStreamSynchronize(s->stream);
    if (s->trace_passes) {
        static const char *kinds[5] = {"qkv", "attention", "attention output", "intermediate",
                                       "output"};
        fprintf(stderr,
                "embedrag: persistent pass trace, %d passes, us a pass per step kind: "
                "barrier, release, x+w, products, epilogue, to next arrival\n",
                s->trace_passes);
        for (int k = 0; k < 5; k++) {
            fprintf(stderr, "  %-17s", kinds[k]);
            for (int i = 0; i < 6; i++)
                fprintf(stderr, " %7.2f", s->trace_sums[k][i] * 1e-3 / s->trace_passes);
            fputc('\n', stderr);
        }
    }
    if (s->trace) cudaFree(s->trace);
    free(s->trace_host);
    free_buffers(s);
    for (int i = 0; i < CUDA_PLAN_CACHE; i++) plan_free(b, &s->plans[i]);
    for (int k = 0; k < GEMM_KINDS; k++) {
        if (s->weight_layout[k]) b->blas.layout_destroy(s->weight_layout[k]);
        if (s->matmul[k]) b->blas.desc_destroy(s->matmul[k]);
    }
    if (s->blas) b->blas.destroy(s->blas);
    if (s->start) cudaEventDestroy(s->start);
    if (s->done) cudaEventDestroy(s->done);
    if (s->stream) cudaStreamDestroy(s->stream);
    cudaGetLastError();
    free(s);
}

/* The matmul descriptors and weight layouts every plan of this stream shares. */
static int create_matmuls(backend_stream *s)
{
    cuda_backend *b = s->b;
    cudaDataType_t type = blas_type(b->dtype);
    /* fp32 sums in every mode; for fp32 that also rules out TF32 (CUBLAS_COMPUTE_32F). */
    cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
    for (int k = 0; k < GEMM_KINDS && st == CUBLAS_STATUS_SUCCESS; k++) {
        int n, inner;
        gemm_dims(b->config, k, &n, &inner);
        st = b->blas.desc_create(&s->matmul[k], CUBLAS_COMPUTE_32F, CUDA_R_32F);
        cublasOperation_t transpose = CUBLAS_OP_T, keep = CUBLAS_OP_N;
        cublasLtEpilogue_t epilogue =
            k == GEMM_INTERMEDIATE ? (cublasLtEpilogue_t)b->inter_epilogue : CUBLASLT_EPILOGUE_BIAS;
        if (st == CUBLAS_STATUS_SUCCESS)
            st = b->blas.desc_set(s->matmul[k], CUBLASLT_MATMUL_DESC_TRANSA, &transpose,
                                  sizeof transpose);
        if (st == CUBLAS_STATUS_SUCCESS)
            st = b->blas.desc_set(s->matmul[k], CUBLASLT_MATMUL_DESC_TRANSB, &keep, sizeof keep);
        if (st == CUBLAS_STATUS_SUCCESS)
            st = b->blas.desc_set(s->matmul[k], CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue,
                                  sizeof epilogue);
        /* W is [N x K] row-major: column-major K x N, transposed by the product. */
        if (st == CUBLAS_STATUS_SUCCESS)
            st = b->blas.layout_create(&s->weight_layout[k], type, (uint64_t)inner, (uint64_t)n,
                                       (int64_t)inner);
    }
    return st == CUBLAS_STATUS_SUCCESS ? 0 : blas_error(b, st, "matmul descriptor");
}

static int cuda_stream_create(backend *self, backend_priority priority, backend_stream **out)
{
    cuda_backend *b = (cuda_backend *)self;
    *out = NULL;
    backend_stream *s = calloc(1, sizeof *s);
    if (!s) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory creating a CUDA stream");
    s->b = b;
    int rc = 0;
    cudaError_t e = cudaSetDevice(b->device);
    int level = priority == BACKEND_PRIORITY_LATENCY ? b->priority_latency : b->priority_bulk;
    if (e == cudaSuccess)
        e = cudaStreamCreateWithPriority(&s->stream, cudaStreamNonBlocking, level);
    if (e == cudaSuccess) e = cudaEventCreate(&s->start);
    if (e == cudaSuccess) e = cudaEventCreate(&s->done);
    if (e != cudaSuccess) {
        rc = cuda_error(e, "creating a stream");
        goto fail;
    }
    cublasStatus_t st = b->blas.create(&s->blas);
    if (st != CUBLAS_STATUS_SUCCESS) {
        s->blas = NULL;
        rc = blas_error(b, st, "creating a handle");
        goto fail;
    }
    rc = create_matmuls(s);
    if (rc) goto fail;
    if (b->small_trace) {
        s->trace_bytes = (size_t)b->config->num_layers * 5 * CUDA_SMALL_TRACE_BLOCKS * 5 *
                         sizeof(unsigned long long);
        s->trace_host = malloc(s->trace_bytes);
        if (!s->trace_host || cudaMalloc((void **)&s->trace, s->trace_bytes) != cudaSuccess) {
            s->trace = NULL;
            rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for the pass trace");
            goto fail;
        }
    }
    *out = s;
    return 0;
fail:
    cuda_stream_destroy(s);
    return rc;
}

static void *cuda_host_alloc(backend *self, size_t bytes)
{
    cuda_backend *b = (cuda_backend *)self;
    void *p = NULL;
    cudaSetDevice(b->device);
    /* Portable: pinned for every device's context, as other GPUs' streams will read it too. */
    if (cudaHostAlloc(&p, bytes ? bytes : 1, cudaHostAllocPortable) != cudaSuccess) {
        cudaGetLastError();
        return NULL;
    }
    return p;
}

static void cuda_host_free(backend *self, void *memory)
{
    if (memory) cudaFreeHost(memory);
}

/* ---- submit and wait ---- */

static bool is_pinned(const void *p)
{
    struct cudaPointerAttributes attributes;
    if (cudaPointerGetAttributes(&attributes, p) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    return attributes.type == cudaMemoryTypeHost;
}

static int cuda_submit(backend_stream *s, const backend_batch *batch, float *out,
                       backend_ticket *ticket)
{
    cuda_backend *b = s->b;
    int h = b->config->hidden_size;
    ticket->done = false;
    ticket->status = 0;
    ticket->device_seconds = 0.0;
    ticket->message[0] = '\0';
    if (batch->tokens > s->capacity.tokens || batch->count > s->capacity.sequences ||
        batch->max_len > s->capacity_len)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                       "a batch of %d tokens in %d sequences (longest %d) exceeds the stream's "
                       "reservation (%d tokens, %d sequences, longest %d)",
                       batch->tokens, batch->count, batch->max_len, s->capacity.tokens,
                       s->capacity.sequences, s->capacity_len);
    if (s->pending)
        return err_set(EMBEDRAG_ERR_BUSY,
                       "a CUDA stream takes one batch at a time: wait for the previous ticket");
    if (batch->count == 0) {
        ticket->done = true;
        return 0;
    }
    CUDA_TRY(cudaSetDevice(b->device), "selecting the device");
    if (b->fail_after >= 0 && atomic_fetch_add(&b->batches, 1) >= b->fail_after)
        return err_set(EMBEDRAG_ERR_DEVICE,
                       "CUDA device %d: a fault injected after %d batches "
                       "(EMBEDRAG_TEST_CUDA_FAIL_AFTER)",
                       b->device, b->fail_after);

    int tiles = count_tiles(batch);
    cuda_shape shape = {batch->tokens, batch->count, tiles};
    int bucket = graph_bucket(s, batch->tokens, &shape);
    cuda_plan *plan = NULL;
    int rc = get_plan(s, shape.tokens, &plan);
    if (rc) return rc;
    write_descriptor(s, batch, shape, tiles);
    cuda_batch_view view = view_for(s, shape);
    /* A bucket's graph is captured before anything of this batch is enqueued: capture records
     * work instead of running it, so the stream must hold none of ours in between. */
    cudaGraphExec_t graph = NULL;
    if (bucket >= 0 && !s->graphs_failed && bucket_graph(s, bucket, &view, plan, &graph)) {
        /* The same work runs without a graph; say so once per stream. */
        s->graphs_failed = true;
        fprintf(stderr, "embedrag: CUDA device %d: running without CUDA graphs: %s\n", b->device,
                err_get());
        err_clear();
    }

    bool enqueued = false;
    cudaError_t e = cudaEventRecord(s->start, s->stream);
    if (e == cudaSuccess) {
        enqueued = true;
        e = cudaMemcpyAsync(s->descriptor, s->host_descriptor,
                            layout_for(shape).total * sizeof(int), cudaMemcpyHostToDevice,
                            s->stream);
    }
    if (e != cudaSuccess) {
        rc = cuda_error(e, "uploading a batch");
        goto failed;
    }
    if (graph) {
        if ((e = cudaGraphLaunch(graph, s->stream)) != cudaSuccess)
            rc = cuda_error(e, "launching a graph");
    } else {
        rc = enqueue_forward(s, &view, plan);
    }
    if (rc) goto failed;
    bool staged = !is_pinned(out);
    e = cudaMemcpyAsync(staged ? s->host_pooled : out, s->pooled,
                        (size_t)batch->count * (size_t)h * sizeof(float), cudaMemcpyDeviceToHost,
                        s->stream);
    if (e == cudaSuccess) e = cudaEventRecord(s->done, s->stream);
    if (e != cudaSuccess) {
        rc = cuda_error(e, "downloading vectors");
        goto failed;
    }
    s->pending = true;
    s->pending_ticket = ticket;
    s->pending_out = out;
    s->pending_staged = staged;
    s->pending_count = batch->count;
    s->pending_tokens = batch->tokens;
    s->pending_graph = graph != NULL;
    s->pending_trace = s->trace && small_persistent(s, plan);
    s->pending_trace_rows = plan->tokens;
    s->pending_flops = backend_batch_flops(b->config, batch->tokens, batch->count, batch->max_len);
    return 0;
failed:
    /* Whatever was enqueued must finish before the caller reuses its buffers. */
    if (enqueued) cudaStreamSynchronize(s->stream);
    cudaGetLastError();
    return rc;
}

static void record_rate(cuda_backend *b, int tokens, double flops, double seconds)
{
    pthread_mutex_lock(&b->rate_lock);
    if (tokens >= CUDA_RATE_MIN_TOKENS) {
        double measured = (seconds - b->overhead_seconds) / flops;
        if (measured > 0)
            b->seconds_per_flop += CUDA_RATE_SMOOTHING * (measured - b->seconds_per_flop);
    } else {
        double measured = seconds - flops * b->seconds_per_flop;
        if (measured > 0)
            b->overhead_seconds += CUDA_RATE_SMOOTHING * (measured - b->overhead_seconds);
    }
    pthread_mutex_unlock(&b->rate_lock);
}

static int cuda_wait(backend_stream *s, backend_ticket *ticket)
{
    cuda_backend *b = s->b;
    if (!s->pending || s->pending_ticket != ticket) return backend_ticket_status(ticket);
    s->pending = false;
    cudaSetDevice(b->device);
    cudaError_t e = cudaEventSynchronize(s->done);
    if (e != cudaSuccess) {
        int rc = cuda_error(e, "running a batch");
        err_prefix(rc, "CUDA device %d: a batch of %d tokens in %d sequences failed: ", b->device,
                   s->pending_tokens, s->pending_count);
        backend_ticket_fail(ticket, rc);
        return backend_ticket_status(ticket);
    }
    if (s->pending_staged)
        memcpy(s->pending_out, s->host_pooled,
               (size_t)s->pending_count * (size_t)b->config->hidden_size * sizeof(float));
    float ms = 0.0f;
    if (cudaEventElapsedTime(&ms, s->start, s->done) == cudaSuccess) {
        s->last_seconds = ms * 1e-3;
        ticket->device_seconds = s->last_seconds;
        record_rate(b, s->pending_tokens, s->pending_flops, s->last_seconds);
    }
    if (s->pending_trace && cudaMemcpy(s->trace_host, s->trace, s->trace_bytes,
                                       cudaMemcpyDeviceToHost) == cudaSuccess) {
        cuda_small_pass_params p = small_pass_params(s, s->pending_trace_rows);
        s->trace_passes += cuda_small_trace_read(b->dtype, &p, s->trace_host, &s->trace_sums[0][0]);
    }
    cudaGetLastError();
    s->last_graph = s->pending_graph;
    ticket->status = 0;
    ticket->done = true;
    return 0;
}

double cuda_stream_last_seconds(const backend_stream *s)
{
    return s->last_seconds;
}

bool cuda_stream_last_used_graph(const backend_stream *s)
{
    return s->last_graph;
}

static double cuda_estimate_seconds(backend *self, int tokens, int sequences, int max_len)
{
    cuda_backend *b = (cuda_backend *)self;
    pthread_mutex_lock(&b->rate_lock);
    double seconds_per_flop = b->seconds_per_flop, overhead = b->overhead_seconds;
    pthread_mutex_unlock(&b->rate_lock);
    return overhead + backend_batch_flops(b->config, tokens, sequences, max_len) * seconds_per_flop;
}

static void cuda_set_cost(backend *self, double overhead_seconds, double seconds_per_flop)
{
    cuda_backend *b = (cuda_backend *)self;
    pthread_mutex_lock(&b->rate_lock);
    b->overhead_seconds = overhead_seconds;
    b->seconds_per_flop = seconds_per_flop;
    pthread_mutex_unlock(&b->rate_lock);
}

/* ---- loading ---- */

/* Copies elements [0, count) of `t` into dst (device memory of the backend's dtype, or fp32 when
 * as_f32), widening on the host and rounding on the device a chunk at a time. */
static int upload_tensor(cuda_backend *b, const model_tensor *t, void *dst, bool as_f32)
{
    size_t count = model_tensor_elements(t);
    size_t size = as_f32 ? sizeof(float) : b->element;
    for (size_t first = 0; first < count; first += CUDA_LOAD_CHUNK) {
        size_t n = count - first < CUDA_LOAD_CHUNK ? count - first : CUDA_LOAD_CHUNK;
        model_tensor_read_f32(t, first, n, b->load_host);
        char *at = (char *)dst + first * size;
        if (as_f32 || b->dtype == CUDA_DTYPE_F32) {
            CUDA_TRY(cudaMemcpy(at, b->load_host, n * sizeof(float), cudaMemcpyHostToDevice),
                     "uploading weights");
        } else {
            /* cudaMemcpy on the default stream waits for the previous chunk's conversion. */
            CUDA_TRY(
                cudaMemcpy(b->load_device, b->load_host, n * sizeof(float), cudaMemcpyHostToDevice),
                "uploading weights");
            CUDA_TRY(cuda_convert(b->dtype, b->load_device, at, n, 0), "converting weights");
        }
    }
    return 0;
}

static void free_staging(cuda_backend *b)
{
    free(b->load_host);
    if (b->load_device) cudaFree(b->load_device);
    b->load_host = NULL;
    b->load_device = NULL;
}

/* A layer's device pointers as the small-batch kernels take them. */
static cuda_small_layer small_layer_of(const cuda_layer *layer)
{
    cuda_small_layer w = {.attention_gamma = layer->attention_ln_gamma,
                          .attention_beta = layer->attention_ln_beta,
                          .output_gamma = layer->output_ln_gamma,
                          .output_beta = layer->output_ln_beta};
    for (int k = 0; k < GEMM_KINDS; k++) {
        w.weight[k] = layer->weight[k];
        w.bias[k] = layer->bias[k];
    }
    return w;
}

/* The persistent pass's table of every layer's device pointers (EMBEDRAG_CUDA_SMALL=persist). */
static int make_small_table(cuda_backend *b)
{
    int layers = b->config->num_layers;
    cuda_small_layer *host = calloc((size_t)layers, sizeof *host);
    if (!host) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    for (int l = 0; l < layers; l++) host[l] = small_layer_of(&b->layers[l]);
    size_t bytes = (size_t)layers * sizeof *host;
    cudaError_t e = cudaMalloc((void **)&b->small_table, bytes);
    if (e == cudaSuccess) e = cudaMemcpy(b->small_table, host, bytes, cudaMemcpyHostToDevice);
    free(host);
    if (e != cudaSuccess) {
        if (b->small_table) cudaFree(b->small_table);
        b->small_table = NULL;
        return cuda_error(e, "the layers' table");
    }
    return 0;
}

static bool env_flag(const char *name, bool fallback);

/* The cluster pass's weight stream (EMBEDRAG_CUDA_SMALL=cluster), packed from the layers. */
static int make_cluster_stream(cuda_backend *b)
{
    size_t bytes = cuda_cluster_stream_bytes(b->dtype, &b->cluster_model);
    CUDA_TRY(cudaMalloc(&b->cluster_stream, bytes), "allocating the cluster pass's weights");
    for (int l = 0; l < b->config->num_layers; l++) {
        cuda_small_layer w = small_layer_of(&b->layers[l]);
        CUDA_TRY(cuda_cluster_pack(b->dtype, &b->cluster_model, l, &w, b->cluster_stream, 0),
                 "packing the cluster pass's weights");
    }
    if (env_flag("EMBEDRAG_CUDA_CLUSTER_TRACE", false)) {
        size_t trace = CUDA_CLUSTER_TRACE_PHASES * sizeof *b->cluster_trace;
        CUDA_TRY(cudaMalloc((void **)&b->cluster_trace, trace), "allocating the pass's trace");
        CUDA_TRY(cudaMemset(b->cluster_trace, 0, trace), "clearing the pass's trace");
    }
    CUDA_TRY(cudaStreamSynchronize(0), "packing the cluster pass's weights");
    return 0;
}

/* Prints the cluster pass's trace (EMBEDRAG_CUDA_CLUSTER_TRACE): microseconds a pass per phase,
 * summed over the layers, as block 0's thread 0 saw them. */
static void print_cluster_trace(const cuda_backend *b)
{
    unsigned long long sums[CUDA_CLUSTER_TRACE_PHASES];
    if (cudaMemcpy(sums, b->cluster_trace, sizeof sums, cudaMemcpyDeviceToHost) != cudaSuccess ||
        !sums[CUDA_CLUSTER_TRACE_PHASES - 1]) {
        cudaGetLastError();
        return;
    }
    double passes = (double)sums[CUDA_CLUSTER_TRACE_PHASES - 1], total = 0;
    for (int i = 0; i < CUDA_CLUSTER_TRACE_PHASES - 1; i++) total += (double)sums[i];
    fprintf(stderr, "embedrag: cluster pass trace, %.0f passes, us a pass: total %.2f", passes,
            total / passes / 1e3);
    for (int i = 0; i < CUDA_CLUSTER_TRACE_PHASES - 1; i++)
        fprintf(stderr, "; %s %.2f", cuda_cluster_trace_names[i], (double)sums[i] / passes / 1e3);
    fprintf(stderr, "\n");
}

static int cuda_load_layer(backend *self, const model_weights *w, int index)
{
    cuda_backend *b = (cuda_backend *)self;
    const model_config *c = b->config;
    if (index < 0 || index >= c->num_layers)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "no layer %d", index);
    if (!b->load_host)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "CUDA backend: layers are loaded once");
    CUDA_TRY(cudaSetDevice(b->device), "selecting the device");
    const model_layer_weights *l = &w->layers[index];
    cuda_layer *layer = &b->layers[index];
    size_t h = (size_t)c->hidden_size, in = (size_t)c->intermediate_size, e = b->element;
    size_t weight_sizes[GEMM_KINDS] = {3 * h * h * e, h * h * e, in * h * e, h * in * e};
    size_t bias_sizes[GEMM_KINDS] = {3 * h * e, h * e, in * e, h * e};
    size_t total = 4 * align_up(h * sizeof(float));
    for (int k = 0; k < GEMM_KINDS; k++)
        total += align_up(weight_sizes[k]) + align_up(bias_sizes[k]);
    if (!layer->block) CUDA_TRY(cudaMalloc(&layer->block, total), "allocating a layer");
    char *p = layer->block;
    for (int k = 0; k < GEMM_KINDS; k++) {
        layer->weight[k] = p;
        p += align_up(weight_sizes[k]);
        layer->bias[k] = p;
        p += align_up(bias_sizes[k]);
    }
    float **norms[4] = {&layer->attention_ln_gamma, &layer->attention_ln_beta,
                        &layer->output_ln_gamma, &layer->output_ln_beta};
    for (int i = 0; i < 4; i++) {
        *norms[i] = (float *)p;
        p += align_up(h * sizeof(float));
    }
    /* Q, K and V stacked into one [3H x H] product, as the CPU backend does. */
    const model_tensor *matrices[6] = {&l->query_w,    &l->key_w,   &l->value_w,
                                       &l->attn_out_w, &l->inter_w, &l->out_w};
    const model_tensor *biases[6] = {&l->query_b,    &l->key_b,   &l->value_b,
                                     &l->attn_out_b, &l->inter_b, &l->out_b};
    int rc = 0;
    for (int i = 0; i < 3 && !rc; i++) {
        rc = upload_tensor(b, matrices[i], (char *)layer->weight[GEMM_QKV] + (size_t)i * h * h * e,
                           false);
        if (!rc)
            rc = upload_tensor(b, biases[i], (char *)layer->bias[GEMM_QKV] + (size_t)i * h * e,
                               false);
    }
    for (int k = GEMM_ATTENTION_OUT; k < GEMM_KINDS && !rc; k++) {
        rc = upload_tensor(b, matrices[k + 2], layer->weight[k], false);
        if (!rc) rc = upload_tensor(b, biases[k + 2], layer->bias[k], false);
    }
    const model_tensor *norm_tensors[4] = {&l->attn_ln_w, &l->attn_ln_b, &l->out_ln_w,
                                           &l->out_ln_b};
    for (int i = 0; i < 4 && !rc; i++) rc = upload_tensor(b, norm_tensors[i], *norms[i], true);
    if (rc) return rc;
    CUDA_TRY(cudaStreamSynchronize(0), "loading a layer");
    if (++b->layers_loaded == c->num_layers) {
        free_staging(b);
        if (b->small_persist) return make_small_table(b);
        if (b->small_cluster) return make_cluster_stream(b);
    }
    return 0;
}

static int load_embeddings(cuda_backend *b, const model_weights *w)
{
    const model_tensor *tables[5] = {&w->word_emb, &w->position_emb, &w->type_emb, &w->emb_ln_w,
                                     &w->emb_ln_b};
    size_t sizes[5], total = 0;
    for (int i = 0; i < 5; i++) {
        sizes[i] = model_tensor_elements(tables[i]);
        total += align_up(sizes[i] * sizeof(float));
    }
    CUDA_TRY(cudaMalloc(&b->embedding_block, total), "allocating the embeddings");
    float **slots[5] = {&b->word, &b->position, &b->type, &b->embedding_gamma, &b->embedding_beta};
    char *p = b->embedding_block;
    for (int i = 0; i < 5; i++) {
        *slots[i] = (float *)p;
        p += align_up(sizes[i] * sizeof(float));
        int rc = upload_tensor(b, tables[i], *slots[i], true);
        if (rc) return rc;
    }
    return 0;
}

/* ---- creation ---- */

static void cuda_destroy(backend *self)
{
    cuda_backend *b = (cuda_backend *)self;
    if (!b) return;
    cudaSetDevice(b->device);
    if (b->layers)
        for (int l = 0; l < b->config->num_layers; l++)
            if (b->layers[l].block) cudaFree(b->layers[l].block);
    free(b->layers);
    if (b->embedding_block) cudaFree(b->embedding_block);
    if (b->small_table) cudaFree(b->small_table);
    if (b->cluster_stream) cudaFree(b->cluster_stream);
    if (b->cluster_trace) {
        print_cluster_trace(b);
        cudaFree(b->cluster_trace);
    }
    free_staging(b);
    cuda_blas_close(&b->blas);
    cudaGetLastError();
    pthread_mutex_destroy(&b->rate_lock);
    pthread_mutex_destroy(&b->tune_lock);
    free(b);
}

static const backend_ops cuda_ops = {
    .load_layer = cuda_load_layer,
    .estimate_seconds = cuda_estimate_seconds,
    .set_cost = cuda_set_cost,
    .stream_create = cuda_stream_create,
    .stream_destroy = cuda_stream_destroy,
    .reserve = cuda_reserve,
    .host_alloc = cuda_host_alloc,
    .host_free = cuda_host_free,
    .submit = cuda_submit,
    .wait = cuda_wait,
    .destroy = cuda_destroy,
};

/* A yes/no setting from the environment: unset keeps the default. */
static bool env_flag(const char *name, bool fallback)
{
    const char *v = getenv(name);
    if (!v || !*v) return fallback;
    return strcmp(v, "0") != 0 && strcmp(v, "off") != 0 && strcmp(v, "no") != 0;
}

/* How the intermediate product's activation runs. cuBLASLt's GELU epilogue is the tanh form, so
 * it serves gelu-tanh models exactly and ReLU has its own epilogue. BERT's erf GELU: in fp16 and
 * bf16 the epilogue's tanh form too, fused into the product (it differs from erf by at most
 * 2e-4, below the rounding of the fp16 result, and measured no less accurate against the CPU's
 * fp32: bench/cuda-notes.md; it saves a pass over the widest activation, ~12% of a bulk batch);
 * in fp32 our exact bias + erf GELU kernel after a plain product. EMBEDRAG_CUDA_GELU=erf or tanh
 * overrides the choice (for measuring it). */
static void choose_activation(cuda_backend *b)
{
    const char *gelu = getenv("EMBEDRAG_CUDA_GELU");
    bool tanh_for_erf = gelu && *gelu ? strcmp(gelu, "tanh") == 0 : b->dtype != CUDA_DTYPE_F32;
    switch (b->config->activation) {
    case MODEL_ACT_GELU:
        b->inter_epilogue = tanh_for_erf ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
        b->own_activation = tanh_for_erf ? CUDA_ACT_NONE : CUDA_ACT_GELU;
        break;
    case MODEL_ACT_GELU_TANH:
        b->inter_epilogue = CUBLASLT_EPILOGUE_GELU_BIAS;
        b->own_activation = CUDA_ACT_NONE;
        break;
    case MODEL_ACT_RELU:
        b->inter_epilogue = CUBLASLT_EPILOGUE_RELU_BIAS;
        b->own_activation = CUDA_ACT_NONE;
        break;
    }
}

static const char *dtype_name(cuda_dtype dtype)
{
    return dtype == CUDA_DTYPE_F16 ? "fp16" : dtype == CUDA_DTYPE_BF16 ? "bf16" : "fp32";
}

/* What this build's kernels need of the model; EMBEDRAG_ERR_UNSUPPORTED names what is not met. */
static int check_shape(const model_config *c)
{
    int h = c->hidden_size;
    if (h % CUDA_ROW_MULTIPLE || h > CUDA_MAX_HIDDEN || c->intermediate_size % CUDA_ROW_MULTIPLE)
        return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                       "the CUDA backend takes hidden and intermediate sizes that are multiples of "
                       "%d, hidden at most %d (this model: %d and %d)",
                       CUDA_ROW_MULTIPLE, CUDA_MAX_HIDDEN, h, c->intermediate_size);
    if (c->num_heads < 1 || h % c->num_heads || h / c->num_heads > CUDA_MAX_HEAD)
        return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                       "the CUDA backend takes attention heads of at most %d (this model: "
                       "%d heads of %d)",
                       CUDA_MAX_HEAD, c->num_heads, c->num_heads ? h / c->num_heads : 0);
    return 0;
}

int cuda_backend_device_count(void)
{
    int driver = 0, count = 0;
    if (cudaDriverGetVersion(&driver) != cudaSuccess || driver == 0) {
        cudaGetLastError();
        return 0;
    }
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return count;
}

int cuda_backend_create(const backend_params *params, const model_config *config,
                        const model_weights *weights, backend **out)
{
    *out = NULL;
    int driver = 0;
    if (cudaDriverGetVersion(&driver) != cudaSuccess || driver == 0)
        return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                       "no CUDA device found (no NVIDIA driver is loaded)");
    int count = 0;
    cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess || count == 0) {
        cudaGetLastError();
        return err_set(EMBEDRAG_ERR_UNSUPPORTED, "no CUDA device found (%s)",
                       status != cudaSuccess ? cudaGetErrorString(status)
                                             : "the driver lists none");
    }
    if (params->device < 0 || params->device >= count)
        return err_set(EMBEDRAG_ERR_UNSUPPORTED, "CUDA device %d does not exist (%d found)",
                       params->device, count);
    struct cudaDeviceProp properties;
    status = cudaGetDeviceProperties(&properties, params->device);
    if (status != cudaSuccess)
        return err_set(EMBEDRAG_ERR_UNSUPPORTED, "CUDA device %d: %s", params->device,
                       cudaGetErrorString(status));
    /* The build carries sm_90 code and compute_90 PTX (CMakeLists.txt): Hopper and newer. */
    if (properties.major < 9)
        return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                       "CUDA device %d (%s) has compute capability %d.%d; this build runs on 9.0 "
                       "and newer",
                       params->device, properties.name, properties.major, properties.minor);
    int rc = check_shape(config);
    if (rc) return rc;

    cuda_backend *b = calloc(1, sizeof *b);
    if (!b) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory creating the CUDA backend");
    pthread_mutex_init(&b->rate_lock, NULL);
    pthread_mutex_init(&b->tune_lock, NULL);
    b->base.ops = &cuda_ops;
    b->config = config;
    b->device = params->device;
    /* fp16 is the GPU's default (EMBEDRAG_PRECISION_AUTO); fp32 only when asked for. */
    b->dtype = params->precision == EMBEDRAG_PRECISION_BF16   ? CUDA_DTYPE_BF16
               : params->precision == EMBEDRAG_PRECISION_FP32 ? CUDA_DTYPE_F32
                                                              : CUDA_DTYPE_F16;
    b->element = b->dtype == CUDA_DTYPE_F32 ? 4 : 2;
    b->head_size = config->hidden_size / config->num_heads;
    rc = cuda_blas_open(&b->blas);
    if (rc) goto destroy;
    status = cudaSetDevice(b->device);
    if (status == cudaSuccess) status = cudaFree(NULL); /* creates the context now */
    if (status == cudaSuccess)
        status = cudaDeviceGetStreamPriorityRange(&b->priority_bulk, &b->priority_latency);
    size_t free_bytes = 0, total_bytes = 0;
    if (status == cudaSuccess) status = cudaMemGetInfo(&free_bytes, &total_bytes);
    if (status != cudaSuccess) {
        cudaGetLastError();
        rc = err_set(EMBEDRAG_ERR_UNSUPPORTED, "CUDA device %d (%s) cannot be used: %s", b->device,
                     properties.name, cudaGetErrorString(status));
        goto destroy;
    }
    b->use_graphs = env_flag("EMBEDRAG_CUDA_GRAPHS", true);
    const char *tune = getenv("EMBEDRAG_CUDA_TUNE");
    b->tune = env_flag("EMBEDRAG_CUDA_TUNE", true);
    b->tune_verbose = b->tune && tune && !strcmp(tune, "verbose");
    b->tune_min_tokens = b->tune && tune && !strcmp(tune, "all") ? 1 : CUDA_TUNE_MIN_TOKENS;
    /* EMBEDRAG_TEST_CUDA_FAIL_AFTER=N (tests of the engine's recovery on real GPUs): device 0
     * fails every batch after its first N, as a GPU that fails mid-run. */
    const char *fail = getenv("EMBEDRAG_TEST_CUDA_FAIL_AFTER");
    b->fail_after = fail && *fail && b->device == 0 ? atoi(fail) : -1;
    /* Attention: the tensor-core kernel where the dtype and head size have one, v2 (ldmatrix,
     * cp.async; 8.0 against 7.3 M tokens/s at 1000 x 128 on an H200, the same vectors) unless
     * EMBEDRAG_CUDA_ATTENTION=v1; EMBEDRAG_CUDA_TENSOR_CORE_ATTENTION=0 takes the fp32 one. */
    b->attention = CUDA_ATTENTION_FP32;
    if (env_flag("EMBEDRAG_CUDA_TENSOR_CORE_ATTENTION", true) &&
        cuda_attention_has_tensor_cores(b->dtype, b->head_size)) {
        const char *version = getenv("EMBEDRAG_CUDA_ATTENTION");
        b->attention =
            version && !strcmp(version, "v1") ? CUDA_ATTENTION_MMA : CUDA_ATTENTION_MMA_V2;
    }
    choose_activation(b);
    /* Small-batch kernels (bench/cuda-notes.md), off unless EMBEDRAG_CUDA_SMALL is set: 1 (or any
     * yes) with programmatic dependent launches and each LayerNorm in the product after it,
     * "nopdl" without the dependent launches, "lastnorm" with the LayerNorms in the last block of
     * the product before (the first version), "persist" with the whole pass in one persistent
     * kernel (cuda_small_pass) where it takes the shape, "cluster" with passes of at most
     * CUDA_CLUSTER_MAX_ROWS rows in one cluster (cuda_cluster_pass) where this device runs it and
     * the default path for the others. fp16 and bf16 only. */
    const char *small = getenv("EMBEDRAG_CUDA_SMALL");
    b->small = env_flag("EMBEDRAG_CUDA_SMALL", false) && b->dtype != CUDA_DTYPE_F32 &&
               strcmp(small, "cluster") != 0;
    b->small_pdl = b->small && strcmp(small, "nopdl") != 0;
    b->pdl = env_flag("EMBEDRAG_CUDA_PDL", true);
    b->sms = properties.multiProcessorCount;
    const char *fused = getenv("EMBEDRAG_CUDA_FUSED_NORM");
    b->fused_norm = env_flag("EMBEDRAG_CUDA_FUSED_NORM", true) &&
                    cuda_gemm_norm_prepare(b->dtype, config->hidden_size, config->hidden_size);
    b->fused_min_rows = fused && !strcmp(fused, "all") ? 1 : CUDA_FUSED_NORM_MIN_ROWS;
    b->small_norm_next = b->small && strcmp(small, "lastnorm") != 0;
    b->small_persist = b->small && strcmp(small, "persist") == 0;
    b->small_trace = b->small_persist && env_flag("EMBEDRAG_CUDA_SMALL_TRACE", false);
    b->small_activation = config->activation == MODEL_ACT_GELU_TANH ? CUDA_ACT_GELU_TANH
                          : config->activation == MODEL_ACT_RELU    ? CUDA_ACT_RELU
                                                                    : CUDA_ACT_GELU;
    b->cluster_model = (cuda_cluster_model){.layers = config->num_layers,
                                            .hidden = config->hidden_size,
                                            .intermediate = config->intermediate_size,
                                            .heads = config->num_heads,
                                            .activation = b->small_activation,
                                            .eps = config->layer_norm_eps};
    b->small_cluster =
        small && strcmp(small, "cluster") == 0 && cuda_cluster_takes(b->dtype, &b->cluster_model);
    if (b->small && (status = cuda_small_setup()) != cudaSuccess) {
        rc = cuda_error(status, "setting up the small-batch kernels");
        goto destroy;
    }

    backend_caps *caps = &b->base.caps;
    snprintf(b->name, sizeof b->name, "cuda:%d", b->device);
    caps->name = b->name;
    snprintf(b->device_text, sizeof b->device_text,
             "%s (%d SMs, %.0f GiB, compute capability %d.%d)", properties.name,
             properties.multiProcessorCount, (double)properties.totalGlobalMem / CUDA_GIB,
             properties.major, properties.minor);
    caps->device = b->device_text;
    size_t v = b->blas.version;
    snprintf(b->kernels, sizeof b->kernels, "cublaslt %zu.%zu.%zu %s, attention %s, %s%s%s%s%s%s",
             v / 10000, v / 100 % 100, v % 100, dtype_name(b->dtype),
             b->attention == CUDA_ATTENTION_MMA_V2 ? "mma v2"
             : b->attention == CUDA_ATTENTION_MMA  ? "mma"
                                                   : "fp32 cores",
             b->own_activation != CUDA_ACT_NONE ? "own bias+activation" : "activation epilogue",
             b->use_graphs ? ", graphs" : "", b->pdl ? ", dependent launches" : "",
             b->tune ? ", bulk algorithms timed" : "",
             b->fused_norm ? ", attention output + LayerNorm fused (wgmma)" : "",
             b->small_cluster   ? ", cluster pass"
             : !b->small        ? ""
             : b->small_persist ? ", small-batch kernels (persistent pass)"
             : b->small_pdl     ? ", small-batch kernels (pdl)"
                                : ", small-batch kernels");
    caps->kernels = b->kernels;
    caps->precision = b->dtype == CUDA_DTYPE_F16    ? EMBEDRAG_PRECISION_FP16
                      : b->dtype == CUDA_DTYPE_BF16 ? EMBEDRAG_PRECISION_BF16
                                                    : EMBEDRAG_PRECISION_FP32;
    const model_config *c = config;
    size_t per_token = ((size_t)c->hidden_size * 6 + (size_t)c->intermediate_size) * b->element +
                       (size_t)c->hidden_size * sizeof(float) + 6 * sizeof(int);
    size_t preferred = (size_t)(CUDA_PREFERRED_MEMORY_SHARE * (double)free_bytes) / per_token;
    size_t most = (size_t)(CUDA_MAX_MEMORY_SHARE * (double)free_bytes) / per_token;
    caps->preferred_batch_tokens =
        (int)(preferred < CUDA_PREFERRED_BATCH_TOKENS ? preferred : CUDA_PREFERRED_BATCH_TOKENS);
    caps->max_batch_tokens = (int)(most < CUDA_MAX_BATCH_TOKENS ? most : CUDA_MAX_BATCH_TOKENS);
    if (caps->preferred_batch_tokens < c->max_position_embeddings ||
        caps->max_batch_tokens < caps->preferred_batch_tokens) {
        rc = err_set(EMBEDRAG_ERR_UNSUPPORTED,
                     "CUDA device %d (%s) has too little free memory (%.2f GiB)", b->device,
                     properties.name, (double)free_bytes / CUDA_GIB);
        goto destroy;
    }
    caps->memory_available = free_bytes;
    /* Peak: multiprocessors x highest clock x dense FLOPs a multiprocessor does per clock on
     * Hopper's tensor cores in fp16/bf16 (4096: 1024 multiply-adds x 2 x 2 per clock pair as the
     * H100 whitepaper's 989 TFLOP/s at 1.83 GHz and 132 SMs give), or 256 plain fp32 FLOPs (128
     * FMA units). At the H200's 1.98 GHz this reads 1070 TFLOP/s, a little above the
     * datasheet's 989, so fractions of it are conservative. */
    int clock_khz = 0;
    cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, b->device);
    cudaGetLastError();
    caps->peak_flops = (double)properties.multiProcessorCount * clock_khz * 1e3 *
                       (b->dtype == CUDA_DTYPE_F32 ? 256.0 : 4096.0);
    caps->reads_embeddings_in_place = false;
    b->seconds_per_flop =
        1.0 / (b->dtype == CUDA_DTYPE_F32 ? CUDA_GUESS_FLOPS_FP32 : CUDA_GUESS_FLOPS_HALF);
    b->overhead_seconds =
        CUDA_GUESS_OVERHEAD_SECONDS + CUDA_GUESS_OVERHEAD_SECONDS_PER_LAYER * c->num_layers;

    b->layers = calloc((size_t)c->num_layers, sizeof *b->layers);
    b->load_host = malloc(CUDA_LOAD_CHUNK * sizeof(float));
    if (!b->layers || !b->load_host) {
        rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory creating the CUDA backend");
        goto destroy;
    }
    if (b->dtype != CUDA_DTYPE_F32 &&
        (status = cudaMalloc((void **)&b->load_device, CUDA_LOAD_CHUNK * sizeof(float))) !=
            cudaSuccess) {
        rc = cuda_error(status, "allocating load staging");
        goto destroy;
    }
    rc = load_embeddings(b, weights);
    if (!rc && (status = cudaStreamSynchronize(0)) != cudaSuccess)
        rc = cuda_error(status, "loading the embeddings");
    if (rc) goto destroy;
    *out = &b->base;
    return 0;
destroy:
    cuda_destroy(&b->base);
    return rc;
}
