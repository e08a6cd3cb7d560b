/* The reference backend: a BERT encoder forward pass in fp32 (or bfloat16 GEMMs where asked and
 * possible) on the CPU over sequences packed without padding (attention runs per sequence, so
 * padding is never computed or attended), then pooling. Parallel regions split work into tasks
 * whose outputs do not depend on who runs them. Streams share the packed weights and the thread
 * pool; a latency stream takes the pool from a bulk batch between two steps of its pass. */
#include "backend/backend.h"

#include "backend/cpu/kernels.h"
#include "util/clock.h"
#include "util/error.h"
#include "util/threadpool.h"

#include "embedrag.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

/* Rows per task in row-wise parallel regions (embeddings, LayerNorm): small enough to share a
 * 16-token query between two threads, large enough to amortize a task claim. */
#define ROWS_PER_TASK 8

/* The bulk batch that keeps every thread busy: GEMM row blocks are 112 tokens, so 2048 tokens
 * give each of a few threads many blocks, and activations stay near 30 MB for a 384-wide model
 * (the intermediate activation is tokens x 1536 floats). 4096 ran 2-3% faster on 200 x 128
 * tokens (within this machine's noise) and held 30 MB more. */
#define CPU_PREFERRED_BATCH_TOKENS 2048
/* The most tokens one batch may reserve: activations of ~(6 H + I) floats a token, 420 MB for a
 * 384-wide model, a bound on what a caller's batch_tokens can make us allocate. */
#define CPU_MAX_BATCH_TOKENS 65536

/* Starting guesses of the sustained GEMM rate per thread, before any batch was measured (the
 * FMA peaks of BENCHMARKS.md's machines are 117-238 GFLOP/s a core for AVX-512, of which bulk
 * reaches 55-84%); bfloat16 on AMX ran about 3x fp32. The router only compares backends, and
 * measured batches replace the guess. */
#define CPU_GUESS_FLOPS_AVX512 1.0e11
#define CPU_GUESS_FLOPS_AVX2 4.0e10
#define CPU_GUESS_FLOPS_GENERIC 4.0e9
#define CPU_GUESS_BF16_SPEEDUP 3.0
/* Fixed cost of a batch, per layer: ~14 parallel regions of a few microseconds each. */
#define CPU_OVERHEAD_SECONDS_PER_LAYER 2.0e-5
/* Batches smaller than this are dominated by that overhead and do not update the rate. */
#define CPU_RATE_MIN_TOKENS 256
/* Weight of a new measurement in the running rate. */
#define CPU_RATE_SMOOTHING 0.2

typedef struct cpu_layer {
    cpu_packed qkv, attn_out, inter, out;
    float *attn_ln_w, *attn_ln_b, *out_ln_w, *out_ln_b; /* owned fp32 copies */
} cpu_layer;

typedef struct cpu_backend {
    backend base;
    const model_config *config; /* the engine's; outlives the backend */
    threadpool *threads;
    cpu_layer *layers;
    /* Embedding tables as fp32: the mapped views themselves when the file holds aligned F32,
     * else owned widened copies (owned_tables). */
    const float *word_emb, *position_emb, *type_emb;
    float *owned_tables[3];
    float *emb_ln_w, *emb_ln_b;
    char device[160];

    /* Who holds the thread pool: one stream at a time; latency streams go first. */
    pthread_mutex_t exec_lock;
    pthread_cond_t exec_free;
    bool exec_busy;
    int latency_waiting;
    atomic_int latency_pending; /* latency_waiting, read without the lock at checkpoints */
    int preempt;                /* PREEMPT_*: where bulk passes check for latency work */
    /* Attention's products in bfloat16 (cpu_attention_head_bf16): with the VDPBF16PS GEMM. The
     * AMX path keeps fp32 attention (its accuracy was measured so; AMX CPUs reach this kernel
     * through EMBEDRAG_CPU_BF16=avx512bf16). EMBEDRAG_CPU_ATTENTION=fp32 turns it off, to
     * measure what it changes. */
    bool bf16_attention;

    /* Measured seconds per FLOP of completed batches (guarded by rate_lock). */
    pthread_mutex_t rate_lock;
    double seconds_per_flop, overhead_seconds;

    /* A fake GPU (BACKEND_FAKE_GPU, for tests): its name, batches left before it fails (< 0:
     * never) and the most tokens it reserves (0: no limit). */
    char name[32];
    int fail_after, memory_tokens;
    atomic_int batches;
} cpu_backend;

struct backend_stream {
    cpu_backend *b;
    bool latency;
    /* Activations, sized by reserve. */
    int capacity_tokens;
    float *x, *qkv, *ctx, *tmp, *hidden;
    /* Per-thread attention scratch, sized for the longest sequence reserved. */
    int capacity_len;
    float *scores, *head;
    /* Per-thread GEMM scratch (row interleaving), sized for the widest inner dimension. */
    float *gemm_scratch;
    size_t gemm_scratch_floats;
    /* Seconds this stream's batch has held the pool (pauses excluded). */
    double held_seconds, held_since;
};

/* ---- who runs: one stream holds the pool, latency streams first ---- */

static void exec_acquire(backend_stream *s)
{
    cpu_backend *b = s->b;
    pthread_mutex_lock(&b->exec_lock);
    if (s->latency) atomic_store(&b->latency_pending, ++b->latency_waiting);
    while (b->exec_busy || (!s->latency && b->latency_waiting > 0))
        pthread_cond_wait(&b->exec_free, &b->exec_lock);
    if (s->latency) atomic_store(&b->latency_pending, --b->latency_waiting);
    b->exec_busy = true;
    pthread_mutex_unlock(&b->exec_lock);
    s->held_since = clock_seconds();
}

static void exec_release(backend_stream *s)
{
    cpu_backend *b = s->b;
    s->held_seconds += clock_seconds() - s->held_since;
    pthread_mutex_lock(&b->exec_lock);
    b->exec_busy = false;
    pthread_cond_broadcast(&b->exec_free);
    pthread_mutex_unlock(&b->exec_lock);
}

/* Where a bulk pass lets waiting latency work run: after every step (each GEMM, in slices of
 * PREEMPT_SLICE_ROWS rows, and the attention), after every layer, or only between batches.
 * EMBEDRAG_CPU_PREEMPT=step|layer|batch chooses, for measuring them against each other
 * (BENCHMARKS.md); step is the default. */
enum { PREEMPT_BATCH, PREEMPT_LAYER, PREEMPT_STEP };

static int preempt_level(void)
{
    const char *v = getenv("EMBEDRAG_CPU_PREEMPT");
    if (v && !strcmp(v, "batch")) return PREEMPT_BATCH;
    if (v && !strcmp(v, "layer")) return PREEMPT_LAYER;
    return PREEMPT_STEP;
}

static void exec_checkpoint(backend_stream *s, int level)
{
    if (s->latency || level > s->b->preempt ||
        atomic_load_explicit(&s->b->latency_pending, memory_order_relaxed) == 0)
        return;
    exec_release(s);
    exec_acquire(s);
}

/* ---- buffers ---- */

/* Activation buffers of 2 MiB or more are aligned to 2 MiB and marked for transparent huge
 * pages: the GEMM reads 14 rows at once and attention one head of every row, rows 1.5-6 KB
 * apart, so with 4 KiB pages nearly every row is a TLB miss. Where the kernel does not give huge
 * pages the advice is ignored. */
#define HUGE_PAGE_BYTES ((size_t)2 << 20)

static void *alloc_activation(size_t bytes)
{
    if (bytes < HUGE_PAGE_BYTES) return malloc(bytes);
    size_t rounded = (bytes + HUGE_PAGE_BYTES - 1) / HUGE_PAGE_BYTES * HUGE_PAGE_BYTES;
    void *p = aligned_alloc(HUGE_PAGE_BYTES, rounded);
#ifdef MADV_HUGEPAGE
    if (p) madvise(p, rounded, MADV_HUGEPAGE);
#endif
    return p;
}

static void free_activations(backend_stream *s)
{
    free(s->x);
    free(s->qkv);
    free(s->ctx);
    free(s->tmp);
    free(s->hidden);
    s->x = s->qkv = s->ctx = s->tmp = s->hidden = NULL;
    s->capacity_tokens = 0;
}

/* Grows the stream's buffers; on failure the old ones stay and still work. */
static int cpu_reserve(backend_stream *s, int max_tokens, int max_sequences, int max_len)
{
    const model_config *c = s->b->config;
    if (max_tokens > CPU_MAX_BATCH_TOKENS)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                       "a batch of %d tokens is more than the CPU backend takes (%d)", max_tokens,
                       CPU_MAX_BATCH_TOKENS);
    if (max_len > c->max_position_embeddings) max_len = c->max_position_embeddings;
    if (s->b->memory_tokens > 0 && max_tokens > s->b->memory_tokens)
        return err_set(EMBEDRAG_ERR_NO_MEMORY,
                       "%s: out of device memory for a batch of %d tokens (it holds %d)",
                       s->b->name, max_tokens, s->b->memory_tokens);
    if (max_tokens > s->capacity_tokens) {
        backend_stream grown = {0};
        size_t t = (size_t)max_tokens, h = (size_t)c->hidden_size;
        grown.x = alloc_activation(t * h * sizeof(float));
        grown.qkv = alloc_activation(t * 3 * h * sizeof(float));
        grown.ctx = alloc_activation(t * h * sizeof(float));
        grown.tmp = alloc_activation(t * h * sizeof(float));
        grown.hidden = alloc_activation(t * (size_t)c->intermediate_size * sizeof(float));
        if (!grown.x || !grown.qkv || !grown.ctx || !grown.tmp || !grown.hidden) {
            free_activations(&grown);
            return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for a batch of %d tokens",
                           max_tokens);
        }
        free_activations(s);
        s->x = grown.x;
        s->qkv = grown.qkv;
        s->ctx = grown.ctx;
        s->tmp = grown.tmp;
        s->hidden = grown.hidden;
        s->capacity_tokens = max_tokens;
    }
    if (max_len > s->capacity_len) {
        int n = threadpool_threads(s->b->threads);
        int d = c->hidden_size / c->num_heads;
        float *scores = malloc((size_t)n * CPU_ATTENTION_SCORES(max_len) * sizeof(float));
        float *head = malloc((size_t)n * CPU_ATTENTION_HEAD(max_len, d) * sizeof(float));
        if (!scores || !head) {
            free(scores);
            free(head);
            return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for attention scratch");
        }
        free(s->scores);
        free(s->head);
        s->scores = scores;
        s->head = head;
        s->capacity_len = max_len;
    }
    (void)max_sequences; /* pooling writes straight to the caller's rows */
    return 0;
}

static void cpu_stream_destroy(backend_stream *s)
{
    if (!s) return;
    free_activations(s);
    free(s->scores);
    free(s->head);
    free(s->gemm_scratch);
    free(s);
}

static int cpu_stream_create(backend *self, backend_priority priority, backend_stream **out)
{
    cpu_backend *b = (cpu_backend *)self;
    *out = NULL;
    backend_stream *s = calloc(1, sizeof *s);
    if (!s) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory creating a CPU stream");
    s->b = b;
    s->latency = priority == BACKEND_PRIORITY_LATENCY;
    const model_config *c = b->config;
    int widest = c->intermediate_size > c->hidden_size ? c->intermediate_size : c->hidden_size;
    s->gemm_scratch_floats = cpu_gemm_scratch_floats(widest);
    s->gemm_scratch =
        malloc((size_t)threadpool_threads(b->threads) * s->gemm_scratch_floats * sizeof(float));
    if (!s->gemm_scratch) {
        cpu_stream_destroy(s);
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory creating a CPU stream");
    }
    *out = s;
    return 0;
}

static void *cpu_host_alloc(backend *self, size_t bytes)
{
    return malloc(bytes ? bytes : 1);
}

static void cpu_host_free(backend *self, void *memory)
{
    free(memory);
}

/* ---- parallel regions ---- */

typedef struct gemm_job {
    cpu_gemm_plan plan;
    const float *A;
    size_t lda;
    const cpu_packed *packed;
    cpu_epilogue epilogue;
    const float *R;
    float *C;
    size_t ldc;
    float *scratch;
    size_t scratch_floats;
} gemm_job;

static void gemm_worker(void *ctx, int task, int thread)
{
    gemm_job *j = ctx;
    cpu_gemm_task(&j->plan, task, j->A, j->lda, j->packed, j->epilogue, j->R, j->C, j->ldc,
                  j->scratch + (size_t)thread * j->scratch_floats);
}

/* A bulk pass also yields to latency work between slices of this many rows of one GEMM: the
 * first feed-forward GEMM of a 2048-token batch takes about 10 ms on two cores, a 256-row slice
 * an eighth of that, which is about what a query then waits before it runs. Measured on Zen 4
 * (BENCHMARKS.md): a query's p99 during bulk work went from 15.5 ms (whole GEMMs) to 10.6 (512
 * rows) and 8.9 (256), with no loss of bulk throughput; 128 rows gained little more and cost
 * throughput. Each row's result depends only on that row, so slicing changes no bit. */
#define PREEMPT_SLICE_ROWS 256

static void gemm(backend_stream *s, int m, const float *A, const cpu_packed *packed,
                 cpu_epilogue epilogue, const float *R, float *C)
{
    size_t lda = (size_t)packed->k, ldc = (size_t)packed->n;
    int slice = !s->latency && s->b->preempt == PREEMPT_STEP ? PREEMPT_SLICE_ROWS : m;
    for (int first = 0; first < m; first += slice) {
        int rows = m - first < slice ? m - first : slice;
        gemm_job j = {.A = A + (size_t)first * lda,
                      .lda = lda,
                      .packed = packed,
                      .epilogue = epilogue,
                      .R = R ? R + (size_t)first * ldc : NULL,
                      .C = C + (size_t)first * ldc,
                      .ldc = ldc,
                      .scratch = s->gemm_scratch,
                      .scratch_floats = s->gemm_scratch_floats};
        j.plan = cpu_gemm_plan_make(rows, packed, threadpool_threads(s->b->threads));
        threadpool_run(s->b->threads, cpu_gemm_plan_tasks(&j.plan), gemm_worker, &j);
        exec_checkpoint(s, PREEMPT_STEP);
    }
}

typedef struct rows_job {
    const cpu_backend *b;
    const backend_batch *batch;
    int tokens;
    const float *gamma, *beta;
    float *x;
} rows_job;

static void embed_worker(void *ctx, int task, int thread)
{
    rows_job *j = ctx;
    const cpu_backend *b = j->b;
    int h = b->config->hidden_size;
    int t0 = task * ROWS_PER_TASK, t1 = t0 + ROWS_PER_TASK;
    if (t1 > j->tokens) t1 = j->tokens;
    /* Find the sequence of row t0 to know each token's position. */
    int s = 0;
    while (j->batch->offsets[s + 1] <= t0) s++;
    for (int t = t0; t < t1; t++) {
        while (j->batch->offsets[s + 1] <= t) s++;
        int pos = t - j->batch->offsets[s];
        const float *word = b->word_emb + (size_t)j->batch->ids[t] * (size_t)h;
        const float *position = b->position_emb + (size_t)pos * (size_t)h;
        const float *type = b->type_emb; /* token type 0 */
        float *row = j->x + (size_t)t * (size_t)h;
        for (int i = 0; i < h; i++) row[i] = word[i] + position[i] + type[i];
        cpu_layer_norm(row, row, h, b->emb_ln_w, b->emb_ln_b, b->config->layer_norm_eps);
    }
}

static void layer_norm_worker(void *ctx, int task, int thread)
{
    rows_job *j = ctx;
    const model_config *c = j->b->config;
    int h = c->hidden_size;
    int t0 = task * ROWS_PER_TASK, t1 = t0 + ROWS_PER_TASK;
    if (t1 > j->tokens) t1 = j->tokens;
    for (int t = t0; t < t1; t++) {
        float *row = j->x + (size_t)t * (size_t)h;
        cpu_layer_norm(row, row, h, j->gamma, j->beta, c->layer_norm_eps);
    }
}

static void rows_run(backend_stream *s, rows_job *j, threadpool_fn fn)
{
    threadpool_run(s->b->threads, (j->tokens + ROWS_PER_TASK - 1) / ROWS_PER_TASK, fn, j);
}

typedef struct attention_job {
    const backend_stream *s;
    const backend_batch *batch;
} attention_job;

static void attention_worker(void *ctx, int task, int thread)
{
    attention_job *j = ctx;
    const backend_stream *s = j->s;
    const model_config *c = s->b->config;
    int heads = c->num_heads, h = c->hidden_size, d = h / heads;
    int seq = task / heads, head = task % heads;
    int start = j->batch->offsets[seq], len = j->batch->offsets[seq + 1] - start;
    size_t ld = 3 * (size_t)h;
    const float *q = s->qkv + (size_t)start * ld + (size_t)head * (size_t)d;
    float *out = s->ctx + (size_t)start * (size_t)h + (size_t)head * (size_t)d;
    (s->b->bf16_attention ? cpu_attention_head_bf16 : cpu_attention_head)(
        q, q + h, q + 2 * h, ld, len, d, 1.0f / sqrtf((float)d), out, (size_t)h,
        s->scores + (size_t)thread * CPU_ATTENTION_SCORES(s->capacity_len),
        s->head + (size_t)thread * CPU_ATTENTION_HEAD(s->capacity_len, d));
}

/* ---- the forward pass ---- */

static void pool_sequence(const backend_stream *s, const backend_batch *batch, int seq, float *out)
{
    const model_config *c = s->b->config;
    int h = c->hidden_size;
    int start = batch->offsets[seq], end = batch->offsets[seq + 1];
    const float *x = s->x;
    if (c->pooling == EMBEDRAG_POOLING_CLS) {
        memcpy(out, x + (size_t)start * (size_t)h, (size_t)h * sizeof(float));
        return;
    }
    int skip = batch->pool_skip ? batch->pool_skip[seq] : 0;
    int first = start + skip < end ? start + skip : start; /* never pool nothing */
    if (c->pooling == EMBEDRAG_POOLING_MAX) {
        memcpy(out, x + (size_t)first * (size_t)h, (size_t)h * sizeof(float));
        for (int t = first + 1; t < end; t++)
            for (int i = 0; i < h; i++) {
                float v = x[(size_t)t * (size_t)h + (size_t)i];
                out[i] = v > out[i] ? v : out[i];
            }
        return;
    }
    for (int i = 0; i < h; i++) out[i] = 0.0f;
    for (int t = first; t < end; t++)
        for (int i = 0; i < h; i++) out[i] += x[(size_t)t * (size_t)h + (size_t)i];
    float inv = 1.0f / (float)(end - first);
    for (int i = 0; i < h; i++) out[i] *= inv;
}

static void forward(backend_stream *s, const backend_batch *batch, float *out)
{
    const cpu_backend *b = s->b;
    const model_config *c = b->config;
    int tokens = batch->tokens;
    rows_job rows = {.b = b, .batch = batch, .tokens = tokens, .x = s->x};
    rows_run(s, &rows, embed_worker);

    cpu_epilogue activation = c->activation == MODEL_ACT_GELU        ? CPU_EPILOGUE_BIAS_GELU
                              : c->activation == MODEL_ACT_GELU_TANH ? CPU_EPILOGUE_BIAS_GELU_TANH
                                                                     : CPU_EPILOGUE_BIAS_RELU;
    attention_job attention = {.s = s, .batch = batch};
    for (int l = 0; l < c->num_layers; l++) {
        const cpu_layer *layer = &b->layers[l];
        gemm(s, tokens, s->x, &layer->qkv, CPU_EPILOGUE_BIAS, NULL, s->qkv);
        threadpool_run(b->threads, batch->count * c->num_heads, attention_worker, &attention);
        exec_checkpoint(s, PREEMPT_STEP);
        gemm(s, tokens, s->ctx, &layer->attn_out, CPU_EPILOGUE_BIAS_RESIDUAL, s->x, s->tmp);
        rows.x = s->tmp;
        rows.gamma = layer->attn_ln_w;
        rows.beta = layer->attn_ln_b;
        rows_run(s, &rows, layer_norm_worker);
        gemm(s, tokens, s->tmp, &layer->inter, activation, NULL, s->hidden);
        gemm(s, tokens, s->hidden, &layer->out, CPU_EPILOGUE_BIAS_RESIDUAL, s->tmp, s->x);
        rows.x = s->x;
        rows.gamma = layer->out_ln_w;
        rows.beta = layer->out_ln_b;
        rows_run(s, &rows, layer_norm_worker);
        exec_checkpoint(s, PREEMPT_LAYER);
    }
    for (int i = 0; i < batch->count; i++)
        pool_sequence(s, batch, i, out + (size_t)i * (size_t)c->hidden_size);
}

static double cpu_estimate_seconds(backend *self, int tokens, int sequences, int max_len)
{
    cpu_backend *b = (cpu_backend *)self;
    pthread_mutex_lock(&b->rate_lock);
    double seconds_per_flop = b->seconds_per_flop, overhead = b->overhead_seconds;
    pthread_mutex_unlock(&b->rate_lock);
    double seconds =
        overhead + backend_batch_flops(b->config, tokens, sequences, max_len) * seconds_per_flop;
    /* A fake GPU routes like a real one: it claims to be much faster than the CPU. */
    return b->name[0] ? seconds * 0.01 : seconds;
}

static void cpu_set_cost(backend *self, double overhead_seconds, double seconds_per_flop)
{
    cpu_backend *b = (cpu_backend *)self;
    pthread_mutex_lock(&b->rate_lock);
    b->overhead_seconds = overhead_seconds;
    b->seconds_per_flop = seconds_per_flop;
    pthread_mutex_unlock(&b->rate_lock);
}

static void record_rate(cpu_backend *b, const backend_batch *batch, double seconds)
{
    if (batch->tokens < CPU_RATE_MIN_TOKENS) return;
    double flops = backend_batch_flops(b->config, batch->tokens, batch->count, batch->max_len);
    pthread_mutex_lock(&b->rate_lock);
    double overhead = b->overhead_seconds;
    if (flops <= 0 || seconds <= overhead) {
        pthread_mutex_unlock(&b->rate_lock);
        return;
    }
    double measured = (seconds - overhead) / flops;
    b->seconds_per_flop += CPU_RATE_SMOOTHING * (measured - b->seconds_per_flop);
    pthread_mutex_unlock(&b->rate_lock);
}

/* The CPU runs the batch on the calling thread (with the pool), so the ticket is complete when
 * submit returns. */
static int cpu_submit(backend_stream *s, const backend_batch *batch, float *out,
                      backend_ticket *ticket)
{
    ticket->done = false;
    ticket->status = 0;
    ticket->device_seconds = 0.0;
    ticket->message[0] = '\0';
    if (batch->tokens > s->capacity_tokens || batch->max_len > s->capacity_len)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                       "a batch of %d tokens (longest %d) exceeds the stream's reservation (%d "
                       "tokens, longest %d)",
                       batch->tokens, batch->max_len, s->capacity_tokens, s->capacity_len);
    if (batch->count == 0) {
        ticket->done = true;
        return 0;
    }
    if (s->b->fail_after >= 0 && atomic_fetch_add(&s->b->batches, 1) >= s->b->fail_after) {
        err_set(EMBEDRAG_ERR_DEVICE, "%s: the device failed (a fault injected after %d batches)",
                s->b->name, s->b->fail_after);
        backend_ticket_fail(ticket, EMBEDRAG_ERR_DEVICE);
        return 0;
    }
    s->held_seconds = 0.0;
    /* A bulk pass runs as SCHED_BATCH (see threadpool_bulk_enter): when a query's pass releases
     * the pool, waking this thread must not take the core from the query's thread. */
    threadpool_sched sched = {0};
    if (!s->latency) threadpool_bulk_enter(&sched);
    exec_acquire(s);
    forward(s, batch, out);
    exec_release(s);
    threadpool_bulk_leave(&sched);
    record_rate(s->b, batch, s->held_seconds);
    ticket->device_seconds = s->held_seconds;
    ticket->done = true;
    return 0;
}

static int cpu_wait(backend_stream *s, backend_ticket *ticket)
{
    return backend_ticket_status(ticket);
}

/* ---- creation ---- */

static void cpu_destroy(backend *self)
{
    cpu_backend *b = (cpu_backend *)self;
    if (!b) return;
    if (b->layers)
        for (int l = 0; l < b->config->num_layers; l++) {
            cpu_layer *layer = &b->layers[l];
            cpu_packed_free(&layer->qkv);
            cpu_packed_free(&layer->attn_out);
            cpu_packed_free(&layer->inter);
            cpu_packed_free(&layer->out);
            free(layer->attn_ln_w);
            free(layer->attn_ln_b);
            free(layer->out_ln_w);
            free(layer->out_ln_b);
        }
    free(b->layers);
    for (int i = 0; i < 3; i++) free(b->owned_tables[i]);
    free(b->emb_ln_w);
    free(b->emb_ln_b);
    threadpool_destroy(b->threads);
    pthread_mutex_destroy(&b->exec_lock);
    pthread_cond_destroy(&b->exec_free);
    pthread_mutex_destroy(&b->rate_lock);
    free(b);
}

/* An owned fp32 copy of a tensor (vectors: biases, LayerNorm parameters; or a whole matrix that
 * cannot be read in place). */
static float *copy_f32(const model_tensor *t)
{
    size_t n = model_tensor_elements(t);
    float *copy = malloc((n ? n : 1) * sizeof *copy);
    if (copy) model_tensor_read_f32(t, 0, n, copy);
    return copy;
}

/* The tensor as floats: in place when it is aligned F32, else an owned copy in *owned. */
static const float *read_f32(const model_tensor *t, float **owned)
{
    *owned = NULL;
    const float *in_place = model_tensor_f32(t);
    if (in_place) return in_place;
    *owned = copy_f32(t);
    return *owned;
}

/* Packs `count` weight matrices stacked along n, with their biases, for the backend's precision.
 * Half-precision files keep half-precision weights in fp32 mode: exact, and half the bytes per
 * pass. */
static int pack_matrices(const cpu_backend *b, const model_weights *w, cpu_packed *out, int count,
                         const model_tensor *const *matrices, const model_tensor *const *biases)
{
    const float *data[3], *bias[3];
    float *owned[6] = {NULL};
    int rows[3];
    int rc = 0;
    for (int i = 0; i < count; i++) {
        data[i] = read_f32(matrices[i], &owned[2 * i]);
        bias[i] = read_f32(biases[i], &owned[2 * i + 1]);
        rows[i] = (int)matrices[i]->rows;
        if (!data[i] || !bias[i]) {
            rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory reading tensor '%s'",
                         matrices[i]->name);
            goto free_owned;
        }
    }
    int k = (int)matrices[0]->cols;
    if (b->base.caps.precision == EMBEDRAG_PRECISION_BF16)
        rc = cpu_pack_bf16(out, count, data, bias, rows, k);
    else
        rc = cpu_pack(out, count, data, bias, rows, k, w->matrix_dtype == ST_F16);
free_owned:
    for (int i = 0; i < 2 * count; i++) free(owned[i]);
    return rc;
}

static int cpu_load_layer(backend *self, const model_weights *w, int index)
{
    cpu_backend *b = (cpu_backend *)self;
    if (index < 0 || index >= b->config->num_layers)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "no layer %d", index);
    const model_layer_weights *l = &w->layers[index];
    cpu_layer *out = &b->layers[index];
    const model_tensor *qkv_w[3] = {&l->query_w, &l->key_w, &l->value_w};
    const model_tensor *qkv_b[3] = {&l->query_b, &l->key_b, &l->value_b};
    const model_tensor *attn_w = &l->attn_out_w, *attn_b = &l->attn_out_b;
    const model_tensor *inter_w = &l->inter_w, *inter_b = &l->inter_b;
    const model_tensor *out_w = &l->out_w, *out_b = &l->out_b;
    int rc = pack_matrices(b, w, &out->qkv, 3, qkv_w, qkv_b);
    if (!rc) rc = pack_matrices(b, w, &out->attn_out, 1, &attn_w, &attn_b);
    if (!rc) rc = pack_matrices(b, w, &out->inter, 1, &inter_w, &inter_b);
    if (!rc) rc = pack_matrices(b, w, &out->out, 1, &out_w, &out_b);
    if (rc) return rc;
    out->attn_ln_w = copy_f32(&l->attn_ln_w);
    out->attn_ln_b = copy_f32(&l->attn_ln_b);
    out->out_ln_w = copy_f32(&l->out_ln_w);
    out->out_ln_b = copy_f32(&l->out_ln_b);
    if (!out->attn_ln_w || !out->attn_ln_b || !out->out_ln_w || !out->out_ln_b)
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory loading a layer");
    return 0;
}

/* The embedding tables: read in place where the file allows, and mapped in now rather than
 * faulted on new tokens in the middle of a query (measured: 25 us of a 1.6 ms query). */
static int load_embeddings(cpu_backend *b, const model_weights *w)
{
    const model_tensor *tables[3] = {&w->word_emb, &w->position_emb, &w->type_emb};
    const float **views[3] = {&b->word_emb, &b->position_emb, &b->type_emb};
    bool in_place = true;
    for (int i = 0; i < 3; i++) {
        *views[i] = read_f32(tables[i], &b->owned_tables[i]);
        if (!*views[i])
            return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory reading tensor '%s'",
                           tables[i]->name);
        if (b->owned_tables[i])
            in_place = false;
        else
            model_tensor_prefault(w, tables[i]);
    }
    b->base.caps.reads_embeddings_in_place = in_place;
    b->emb_ln_w = copy_f32(&w->emb_ln_w);
    b->emb_ln_b = copy_f32(&w->emb_ln_b);
    if (!b->emb_ln_w || !b->emb_ln_b)
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory loading the embeddings");
    return 0;
}

/* "AMD EPYC" from /proc/cpuinfo's first "model name", or "unknown CPU". */
static void cpu_model_name(char *out, size_t size)
{
    snprintf(out, size, "unknown CPU");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[256];
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "model name", 10) != 0) continue;
        const char *value = strchr(line, ':');
        if (!value) break;
        value++;
        while (*value == ' ' || *value == '\t') value++;
        size_t n = strcspn(value, "\n");
        snprintf(out, size, "%.*s", (int)n, value);
        break;
    }
    fclose(f);
}

static const backend_ops cpu_ops = {
    .load_layer = cpu_load_layer,
    .estimate_seconds = cpu_estimate_seconds,
    .set_cost = cpu_set_cost,
    .stream_create = cpu_stream_create,
    .stream_destroy = cpu_stream_destroy,
    .reserve = cpu_reserve,
    .host_alloc = cpu_host_alloc,
    .host_free = cpu_host_free,
    .submit = cpu_submit,
    .wait = cpu_wait,
    .destroy = cpu_destroy,
};

int cpu_backend_create(const backend_params *params, const model_config *config,
                       const model_weights *weights, backend **out)
{
    *out = NULL;
    cpu_backend *b = calloc(1, sizeof *b);
    if (!b) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory creating the CPU backend");
    pthread_mutex_init(&b->exec_lock, NULL);
    pthread_cond_init(&b->exec_free, NULL);
    pthread_mutex_init(&b->rate_lock, NULL);
    b->base.ops = &cpu_ops;
    b->config = config;
    b->preempt = preempt_level();
    backend_caps *caps = &b->base.caps;
    caps->name = "cpu";
    b->fail_after = -1;
    if (params->kind == BACKEND_FAKE_GPU) {
        snprintf(b->name, sizeof b->name, "fake-gpu:%d", params->device);
        caps->name = b->name;
        b->fail_after = params->fail_after;
        b->memory_tokens = params->memory_tokens;
    }
    bool bf16 = params->precision == EMBEDRAG_PRECISION_BF16 && cpu_bf16_available();
    caps->precision = bf16 ? EMBEDRAG_PRECISION_BF16 : EMBEDRAG_PRECISION_FP32;
    /* "avx512", "avx2", "generic", or the bf16 kernel: "amx-bf16", "avx512bf16". */
    caps->kernels = !bf16                                   ? cpu_kernels_isa()
                    : strcmp(cpu_bf16_kernel(), "amx") == 0 ? "amx-bf16"
                                                            : cpu_bf16_kernel();
    const char *attention = getenv("EMBEDRAG_CPU_ATTENTION");
    b->bf16_attention = bf16 && strcmp(cpu_bf16_kernel(), "avx512bf16") == 0 &&
                        cpu_attention_bf16_available(config->hidden_size / config->num_heads) &&
                        !(attention && strcmp(attention, "fp32") == 0);
    caps->preferred_batch_tokens = CPU_PREFERRED_BATCH_TOKENS;
    caps->max_batch_tokens = CPU_MAX_BATCH_TOKENS;
    int rc = threadpool_create(params->kind == BACKEND_FAKE_GPU ? 1 : params->threads, &b->threads);
    if (rc) goto destroy;
    int threads = threadpool_threads(b->threads);
    char model[96];
    cpu_model_name(model, sizeof model);
    snprintf(b->device, sizeof b->device, "%s%s (%s, %d thread%s)",
             params->kind == BACKEND_FAKE_GPU ? "a fake GPU on " : "", model, caps->kernels,
             threads, threads == 1 ? "" : "s");
    caps->device = b->device;
    double rate = strcmp(cpu_kernels_isa(), "avx512") == 0 ? CPU_GUESS_FLOPS_AVX512
                  : strcmp(cpu_kernels_isa(), "avx2") == 0 ? CPU_GUESS_FLOPS_AVX2
                                                           : CPU_GUESS_FLOPS_GENERIC;
    if (bf16) rate *= CPU_GUESS_BF16_SPEEDUP;
    b->seconds_per_flop = 1.0 / (rate * threads);
    b->overhead_seconds = CPU_OVERHEAD_SECONDS_PER_LAYER * config->num_layers;

    b->layers = calloc((size_t)config->num_layers, sizeof *b->layers);
    if (!b->layers) {
        rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory creating the CPU backend");
        goto destroy;
    }
    rc = load_embeddings(b, weights);
    if (rc) goto destroy;
    *out = &b->base;
    return 0;
destroy:
    cpu_destroy(&b->base);
    return rc;
}
