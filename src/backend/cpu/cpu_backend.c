/* The reference backend: a BERT encoder forward pass in fp32 on the CPU over sequences packed
 * without padding (attention runs per sequence, so padding is never computed or attended), then
 * pooling. Parallel regions split work into tasks whose outputs do not depend on who runs them. */
#include "backend/backend.h"

#include "backend/cpu/kernels.h"
#include "util/error.h"
#include "util/threadpool.h"

#include "embedrag.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* Rows per task in row-wise parallel regions (embeddings, LayerNorm): small enough to share a
 * 16-token query between two threads, large enough to amortize a task claim. */
#define ROWS_PER_TASK 8

typedef struct cpu_layer {
    cpu_packed qkv, attn_out, inter, out;
    const float *attn_ln_w, *attn_ln_b, *out_ln_w, *out_ln_b;
} cpu_layer;

typedef struct cpu_backend {
    backend base;
    const model_config *config;
    model_weights *weights;
    pool *threads;
    cpu_layer *layers;
    /* Activations, sized for the largest batch seen so far. */
    int capacity_tokens;
    float *x, *qkv, *ctx, *tmp, *hidden;
    /* Per-thread attention scratch, sized for the longest sequence seen so far. */
    int capacity_len;
    float *scores, *head;
    /* Per-thread GEMM scratch (row interleaving), sized for the widest inner dimension. */
    float *gemm_scratch;
    size_t gemm_scratch_floats;
} cpu_backend;

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

static void free_activations(cpu_backend *b)
{
    free(b->x);
    free(b->qkv);
    free(b->ctx);
    free(b->tmp);
    free(b->hidden);
    b->x = b->qkv = b->ctx = b->tmp = b->hidden = NULL;
    b->capacity_tokens = 0;
}

static int reserve(cpu_backend *b, int tokens, int max_len)
{
    const model_config *c = b->config;
    if (tokens > b->capacity_tokens) {
        free_activations(b);
        size_t t = (size_t)tokens, h = (size_t)c->hidden_size;
        b->x = alloc_activation(t * h * sizeof(float));
        b->qkv = alloc_activation(t * 3 * h * sizeof(float));
        b->ctx = alloc_activation(t * h * sizeof(float));
        b->tmp = alloc_activation(t * h * sizeof(float));
        b->hidden = alloc_activation(t * (size_t)c->intermediate_size * sizeof(float));
        if (!b->x || !b->qkv || !b->ctx || !b->tmp || !b->hidden) {
            free_activations(b);
            return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for a batch of %d tokens",
                           tokens);
        }
        b->capacity_tokens = tokens;
    }
    if (max_len > b->capacity_len) {
        int n = pool_threads(b->threads);
        int d = c->hidden_size / c->num_heads;
        free(b->scores);
        free(b->head);
        b->scores = malloc((size_t)n * CPU_ATTENTION_SCORES(max_len) * sizeof(float));
        b->head = malloc((size_t)n * CPU_ATTENTION_HEAD(max_len, d) * sizeof(float));
        if (!b->scores || !b->head) {
            free(b->scores);
            free(b->head);
            b->scores = b->head = NULL;
            b->capacity_len = 0;
            return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for attention scratch");
        }
        b->capacity_len = max_len;
    }
    return 0;
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

static void gemm(cpu_backend *b, int m, const float *A, const cpu_packed *packed,
                 cpu_epilogue epilogue, const float *R, float *C)
{
    gemm_job j = {.A = A,
                  .lda = (size_t)packed->k,
                  .packed = packed,
                  .epilogue = epilogue,
                  .R = R,
                  .C = C,
                  .ldc = (size_t)packed->n,
                  .scratch = b->gemm_scratch,
                  .scratch_floats = b->gemm_scratch_floats};
    j.plan = cpu_gemm_plan_make(m, packed, pool_threads(b->threads));
    pool_run(b->threads, cpu_gemm_plan_tasks(&j.plan), gemm_worker, &j);
}

typedef struct rows_job {
    cpu_backend *b;
    const backend_batch *batch;
    int tokens;
    const float *gamma, *beta;
    float *x;
} rows_job;

static void embed_worker(void *ctx, int task, int thread)
{
    rows_job *j = ctx;
    const model_config *c = j->b->config;
    const model_weights *w = j->b->weights;
    int h = c->hidden_size;
    int t0 = task * ROWS_PER_TASK, t1 = t0 + ROWS_PER_TASK;
    if (t1 > j->tokens) t1 = j->tokens;
    /* Find the sequence of row t0 to know each token's position. */
    int s = 0;
    while (j->batch->offsets[s + 1] <= t0) s++;
    for (int t = t0; t < t1; t++) {
        while (j->batch->offsets[s + 1] <= t) s++;
        int pos = t - j->batch->offsets[s];
        const float *word = w->word_emb + (size_t)j->batch->ids[t] * (size_t)h;
        const float *position = w->position_emb + (size_t)pos * (size_t)h;
        const float *type = w->type_emb; /* token type 0 */
        float *row = j->x + (size_t)t * (size_t)h;
        for (int i = 0; i < h; i++) row[i] = word[i] + position[i] + type[i];
        cpu_layer_norm(row, row, h, w->emb_ln_w, w->emb_ln_b, c->layer_norm_eps);
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

static void rows_run(cpu_backend *b, rows_job *j, pool_fn fn)
{
    pool_run(b->threads, (j->tokens + ROWS_PER_TASK - 1) / ROWS_PER_TASK, fn, j);
}

typedef struct attention_job {
    cpu_backend *b;
    const backend_batch *batch;
} attention_job;

static void attention_worker(void *ctx, int task, int thread)
{
    attention_job *j = ctx;
    cpu_backend *b = j->b;
    const model_config *c = b->config;
    int heads = c->num_heads, h = c->hidden_size, d = h / heads;
    int s = task / heads, head = task % heads;
    int start = j->batch->offsets[s], len = j->batch->offsets[s + 1] - start;
    size_t ld = 3 * (size_t)h;
    const float *q = b->qkv + (size_t)start * ld + (size_t)head * (size_t)d;
    float *out = b->ctx + (size_t)start * (size_t)h + (size_t)head * (size_t)d;
    cpu_attention_head(q, q + h, q + 2 * h, ld, len, d, 1.0f / sqrtf((float)d), out, (size_t)h,
                       b->scores + (size_t)thread * CPU_ATTENTION_SCORES(b->capacity_len),
                       b->head + (size_t)thread * CPU_ATTENTION_HEAD(b->capacity_len, d));
}

/* ---- the forward pass ---- */

static void pool_sequence(const cpu_backend *b, const backend_batch *batch, int s, float *out)
{
    const model_config *c = b->config;
    int h = c->hidden_size;
    int start = batch->offsets[s], end = batch->offsets[s + 1];
    const float *x = b->x;
    if (c->pooling == EMBEDRAG_POOLING_CLS) {
        memcpy(out, x + (size_t)start * (size_t)h, (size_t)h * sizeof(float));
        return;
    }
    int skip = batch->pool_skip ? batch->pool_skip[s] : 0;
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

static int cpu_encode(backend *self, const backend_batch *batch, float *out)
{
    cpu_backend *b = (cpu_backend *)self;
    const model_config *c = b->config;
    int tokens = batch->offsets[batch->count];
    int max_len = 0;
    for (int s = 0; s < batch->count; s++) {
        int len = batch->offsets[s + 1] - batch->offsets[s];
        if (len < 1 || len > c->max_position_embeddings)
            return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                           "sequence %d has %d tokens (the model takes 1 to %d)", s, len,
                           c->max_position_embeddings);
        if (len > max_len) max_len = len;
    }
    for (int t = 0; t < tokens; t++)
        if (batch->ids[t] < 0 || batch->ids[t] >= c->vocab_size)
            return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "token id %d out of range",
                           batch->ids[t]);
    int rc = reserve(b, tokens, max_len);
    if (rc) return rc;

    rows_job rows = {.b = b, .batch = batch, .tokens = tokens, .x = b->x};
    rows_run(b, &rows, embed_worker);

    cpu_epilogue activation = c->activation == MODEL_ACT_GELU        ? CPU_EPILOGUE_BIAS_GELU
                              : c->activation == MODEL_ACT_GELU_TANH ? CPU_EPILOGUE_BIAS_GELU_TANH
                                                                     : CPU_EPILOGUE_BIAS_RELU;
    attention_job attention = {.b = b, .batch = batch};
    for (int l = 0; l < c->num_layers; l++) {
        const cpu_layer *layer = &b->layers[l];
        gemm(b, tokens, b->x, &layer->qkv, CPU_EPILOGUE_BIAS, NULL, b->qkv);
        pool_run(b->threads, batch->count * c->num_heads, attention_worker, &attention);
        gemm(b, tokens, b->ctx, &layer->attn_out, CPU_EPILOGUE_BIAS_RESIDUAL, b->x, b->tmp);
        rows.x = b->tmp;
        rows.gamma = layer->attn_ln_w;
        rows.beta = layer->attn_ln_b;
        rows_run(b, &rows, layer_norm_worker);
        gemm(b, tokens, b->tmp, &layer->inter, activation, NULL, b->hidden);
        gemm(b, tokens, b->hidden, &layer->out, CPU_EPILOGUE_BIAS_RESIDUAL, b->tmp, b->x);
        rows.x = b->x;
        rows.gamma = layer->out_ln_w;
        rows.beta = layer->out_ln_b;
        rows_run(b, &rows, layer_norm_worker);
    }
    for (int s = 0; s < batch->count; s++)
        pool_sequence(b, batch, s, out + (size_t)s * (size_t)c->hidden_size);
    return 0;
}

static void cpu_destroy(backend *self)
{
    cpu_backend *b = (cpu_backend *)self;
    if (!b) return;
    if (b->layers)
        for (int l = 0; l < b->config->num_layers; l++) {
            cpu_packed_free(&b->layers[l].qkv);
            cpu_packed_free(&b->layers[l].attn_out);
            cpu_packed_free(&b->layers[l].inter);
            cpu_packed_free(&b->layers[l].out);
        }
    free(b->layers);
    free_activations(b);
    free(b->scores);
    free(b->head);
    free(b->gemm_scratch);
    pool_destroy(b->threads);
    free(b);
}

/* Packs one GEMM's weights for the backend's precision. Half-precision files keep half-precision
 * weights in fp32 mode: exact, and half the bytes per pass. */
static int pack_matrix(const cpu_backend *b, cpu_packed *out, int count, const float *const *w,
                       const float *const *bias, const int *rows, int k)
{
    if (b->base.precision == EMBEDRAG_PRECISION_BF16)
        return cpu_pack_bf16(out, count, w, bias, rows, k);
    return cpu_pack(out, count, w, bias, rows, k, b->weights->layer_matrices_f16);
}

/* Packs one layer's four GEMMs, then lets the kernel drop the mapped pages just copied (the
 * packed copy replaces them, so resident memory stays near the model file's size). */
static int pack_layer(cpu_backend *b, const model_layer_weights *w, cpu_layer *out)
{
    const model_config *c = b->config;
    int h = c->hidden_size, inter = c->intermediate_size;
    const float *qkv_w[3] = {w->query_w, w->key_w, w->value_w};
    const float *qkv_b[3] = {w->query_b, w->key_b, w->value_b};
    int qkv_rows[3] = {h, h, h};
    int rc = pack_matrix(b, &out->qkv, 3, qkv_w, qkv_b, qkv_rows, h);
    if (!rc) rc = pack_matrix(b, &out->attn_out, 1, &w->attn_out_w, &w->attn_out_b, &h, h);
    if (!rc) rc = pack_matrix(b, &out->inter, 1, &w->inter_w, &w->inter_b, &inter, h);
    if (!rc) rc = pack_matrix(b, &out->out, 1, &w->out_w, &w->out_b, &h, inter);
    if (rc) return rc;
    size_t hh = (size_t)h * (size_t)h * sizeof(float),
           hi = (size_t)h * (size_t)inter * sizeof(float);
    model_weights_release(b->weights, w->query_w, hh);
    model_weights_release(b->weights, w->key_w, hh);
    model_weights_release(b->weights, w->value_w, hh);
    model_weights_release(b->weights, w->attn_out_w, hh);
    model_weights_release(b->weights, w->inter_w, hi);
    model_weights_release(b->weights, w->out_w, hi);
    out->attn_ln_w = w->attn_ln_w;
    out->attn_ln_b = w->attn_ln_b;
    out->out_ln_w = w->out_ln_w;
    out->out_ln_b = w->out_ln_b;
    return 0;
}

int cpu_backend_create(const model_config *config, model_weights *weights, int threads,
                       embedrag_precision precision, backend **out)
{
    *out = NULL;
    cpu_backend *b = calloc(1, sizeof *b);
    if (!b) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory creating the CPU backend");
    b->base.name = "cpu";
    b->base.precision = precision == EMBEDRAG_PRECISION_BF16 && cpu_bf16_available()
                            ? EMBEDRAG_PRECISION_BF16
                            : EMBEDRAG_PRECISION_FP32;
    b->base.encode = cpu_encode;
    b->base.destroy = cpu_destroy;
    b->config = config;
    b->weights = weights;
    int rc = pool_create(threads, &b->threads);
    if (rc) goto destroy;
    int widest = config->intermediate_size > config->hidden_size ? config->intermediate_size
                                                                 : config->hidden_size;
    b->gemm_scratch_floats = cpu_gemm_scratch_floats(widest);
    b->gemm_scratch =
        malloc((size_t)pool_threads(b->threads) * b->gemm_scratch_floats * sizeof(float));
    b->layers = calloc((size_t)config->num_layers, sizeof *b->layers);
    if (!b->layers || !b->gemm_scratch) {
        rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory creating the CPU backend");
        goto destroy;
    }
    for (int l = 0; l < config->num_layers; l++) {
        rc = pack_layer(b, &weights->layers[l], &b->layers[l]);
        if (rc) goto destroy;
    }
    /* The embedding tables are read a few rows per text: map them in now rather than fault on
     * new tokens in the middle of a query (measured: 25 us of a 1.6 ms query). */
    size_t row_bytes = (size_t)config->hidden_size * sizeof(float);
    model_weights_prefault(weights, weights->word_emb, (size_t)config->vocab_size * row_bytes);
    model_weights_prefault(weights, weights->position_emb,
                           (size_t)config->max_position_embeddings * row_bytes);
    model_weights_prefault(weights, weights->type_emb, (size_t)config->type_vocab_size * row_bytes);
    *out = &b->base;
    return 0;
destroy:
    cpu_destroy(&b->base);
    return rc;
}
