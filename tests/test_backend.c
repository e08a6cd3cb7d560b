/* Every compiled backend against the CPU reference, on random weights of several shapes and
 * random packed batches (the way llama.cpp's test-backend-ops compares each backend with the
 * CPU): the CPU's fp32 backend against a plain double-precision forward pass written here, and
 * every other backend and precision against the CPU's fp32, each with its own bar. Also: a
 * sequence's vector is the same alone or in any batch, two streams of different priority may run
 * at once, and the seam's limits (reservation, unknown kinds) answer with errors.
 *
 * With EMBEDRAG_TEST_GPU=1 (ctest's test_backend_gpu, labelled gpu) it runs the GPU's own checks
 * instead: the CUDA backend in every precision against the CPU's fp32 on the model shapes of the
 * GPU issue (6 and 12 layers, 384 and 768 wide, heads of 32 and 64, sequences up to 512 tokens),
 * outputs poisoned first and checked written, the same bits on every run, each sequence alone
 * against in its batch, graphs and plain launches, two streams at once and the limits. Where no
 * CUDA device opens it prints "skipped: no CUDA device" and passes. */
#include "backend/backend.h"
#include "model/model.h"
#include "util/error.h"
#ifdef EMBEDRAG_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#endif

#include "check.h"

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Bars. fp32 against double: the two differ by float rounding and by the CPU's exp and erf
 * approximations (relative error below 2e-7), summed over a few layers. */
#define FP32_MIN_COSINE 0.99999
#define FP32_MAX_ABS_DIFF 1e-4
/* bfloat16 GEMMs (8 significant bits) against fp32 on these random weights; measured worst
 * 0.9993 over the shapes below (real checkpoints: tests/test_embed.c). */
#define BF16_MIN_COSINE 0.998
/* A GPU against the CPU's fp32 (the CUDA backend's issue): fp16 and bf16 modes, fp32 mode. */
#define GPU_HALF_MIN_COSINE 0.9995
#define GPU_FP32_MIN_COSINE 0.99999

#define BATCHES_PER_SHAPE 6
#define MAX_SEQUENCES 9

/* ---- random models ---- */

typedef struct shape {
    const char *name;
    int layers, hidden, heads, intermediate, max_position;
    int pooling;
    model_activation activation;
    bool half; /* encoder matrices stored as F16 */
} shape;

static const shape shapes[] = {
    {"2x64, d32, mean, gelu", 2, 64, 2, 256, 64, EMBEDRAG_POOLING_MEAN, MODEL_ACT_GELU, false},
    {"2x128, d64, cls, gelu-tanh", 2, 128, 2, 512, 80, EMBEDRAG_POOLING_CLS, MODEL_ACT_GELU_TANH,
     false},
    {"1x48, d16, max, relu", 1, 48, 3, 96, 40, EMBEDRAG_POOLING_MAX, MODEL_ACT_RELU, false},
    {"2x96, d32, mean, F16 matrices", 2, 96, 3, 384, 64, EMBEDRAG_POOLING_MEAN, MODEL_ACT_GELU,
     true},
    {"1x40, d20, mean, odd widths", 1, 40, 2, 72, 33, EMBEDRAG_POOLING_MEAN, MODEL_ACT_GELU, false},
};

#define VOCAB 50

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint32_t next_random(void)
{
    /* xorshift64*: plenty for test data, and the same on every run. */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1Dull) >> 32);
}

static float uniform(float lo, float hi)
{
    return lo + (hi - lo) * (float)(next_random() >> 8) / (float)(1u << 24);
}

static uint16_t to_half(float x)
{
    /* Values here are small normal numbers: round to nearest by the bit pattern (exactness of
     * the conversion does not matter, the reference reads the same stored halves). */
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    uint32_t sign = (u >> 16) & 0x8000u;
    int exponent = (int)((u >> 23) & 0xFF) - 127 + 15;
    uint32_t mantissa = u & 0x7FFFFFu;
    if (exponent <= 0) return (uint16_t)sign; /* flush tiny values to zero */
    uint32_t half = sign | ((uint32_t)exponent << 10) | (mantissa >> 13);
    if (mantissa & 0x1000u) half++;
    return (uint16_t)half;
}

typedef struct test_model {
    model_config config;
    model_weights weights;
    void *buffers[256];
    int buffer_count;
} test_model;

/* A tensor of random values in [lo, hi), stored as F16 when `half`. */
static model_tensor random_tensor(test_model *m, const char *name, int64_t rows, int64_t cols,
                                  float lo, float hi, bool half)
{
    size_t n = (size_t)rows * (size_t)cols;
    void *data = malloc(n * (half ? 2 : 4));
    if (!data) abort();
    for (size_t i = 0; i < n; i++) {
        float v = uniform(lo, hi);
        if (half)
            ((uint16_t *)data)[i] = to_half(v);
        else
            ((float *)data)[i] = v;
    }
    m->buffers[m->buffer_count++] = data;
    return (model_tensor){.name = name,
                          .dtype = half ? ST_F16 : ST_F32,
                          .rows = rows,
                          .cols = cols,
                          .data = data,
                          .nbytes = n * (half ? 2 : 4)};
}

static void make_model(const shape *s, test_model *m)
{
    memset(m, 0, sizeof *m);
    model_config *c = &m->config;
    c->vocab_size = VOCAB;
    c->hidden_size = s->hidden;
    c->num_layers = s->layers;
    c->num_heads = s->heads;
    c->intermediate_size = s->intermediate;
    c->max_position_embeddings = s->max_position;
    c->type_vocab_size = 2;
    c->layer_norm_eps = 1e-12f;
    c->activation = s->activation;
    c->max_seq_length = s->max_position;
    c->pooling = s->pooling;
    c->pooling_include_prompt = true;
    int h = s->hidden, in = s->intermediate;
    /* Weights of scale 1/sqrt(k) keep every layer's outputs near unit size. */
    float wh = 1.0f / sqrtf((float)h), wi = 1.0f / sqrtf((float)in);
    model_weights *w = &m->weights;
    w->word_emb = random_tensor(m, "word", VOCAB, h, -1.0f, 1.0f, false);
    w->position_emb = random_tensor(m, "position", s->max_position, h, -0.5f, 0.5f, false);
    w->type_emb = random_tensor(m, "type", 2, h, -0.1f, 0.1f, false);
    w->emb_ln_w = random_tensor(m, "emb_ln_w", 1, h, 0.8f, 1.2f, false);
    w->emb_ln_b = random_tensor(m, "emb_ln_b", 1, h, -0.1f, 0.1f, false);
    w->layers = calloc((size_t)s->layers, sizeof *w->layers);
    w->layer_count = s->layers;
    w->matrix_dtype = s->half ? ST_F16 : ST_F32;
    for (int l = 0; l < s->layers; l++) {
        model_layer_weights *L = &w->layers[l];
        L->query_w = random_tensor(m, "query_w", h, h, -wh, wh, s->half);
        L->query_b = random_tensor(m, "query_b", 1, h, -0.1f, 0.1f, false);
        L->key_w = random_tensor(m, "key_w", h, h, -wh, wh, s->half);
        L->key_b = random_tensor(m, "key_b", 1, h, -0.1f, 0.1f, false);
        L->value_w = random_tensor(m, "value_w", h, h, -wh, wh, s->half);
        L->value_b = random_tensor(m, "value_b", 1, h, -0.1f, 0.1f, false);
        L->attn_out_w = random_tensor(m, "attn_out_w", h, h, -wh, wh, s->half);
        L->attn_out_b = random_tensor(m, "attn_out_b", 1, h, -0.1f, 0.1f, false);
        L->attn_ln_w = random_tensor(m, "attn_ln_w", 1, h, 0.8f, 1.2f, false);
        L->attn_ln_b = random_tensor(m, "attn_ln_b", 1, h, -0.1f, 0.1f, false);
        L->inter_w = random_tensor(m, "inter_w", in, h, -wh, wh, s->half);
        L->inter_b = random_tensor(m, "inter_b", 1, in, -0.1f, 0.1f, false);
        L->out_w = random_tensor(m, "out_w", h, in, -wi, wi, s->half);
        L->out_b = random_tensor(m, "out_b", 1, h, -0.1f, 0.1f, false);
        L->out_ln_w = random_tensor(m, "out_ln_w", 1, h, 0.8f, 1.2f, false);
        L->out_ln_b = random_tensor(m, "out_ln_b", 1, h, -0.1f, 0.1f, false);
    }
}

static void free_model(test_model *m)
{
    for (int i = 0; i < m->buffer_count; i++) free(m->buffers[i]);
    free(m->weights.layers);
}

/* ---- the reference: a plain forward pass in double precision ---- */

static double value(const model_tensor *t, size_t i)
{
    float v;
    model_tensor_read_f32(t, i, 1, &v);
    return v;
}

static void layer_norm(double *x, int n, const model_tensor *g, const model_tensor *b, double eps)
{
    double mean = 0, var = 0;
    for (int i = 0; i < n; i++) mean += x[i];
    mean /= n;
    for (int i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    var /= n;
    for (int i = 0; i < n; i++)
        x[i] = (x[i] - mean) / sqrt(var + eps) * value(g, (size_t)i) + value(b, (size_t)i);
}

/* out[r][o] = in[r] . W[o] + b[o] (+ residual[r][o]) for `rows` rows. */
static void linear(const double *in, int rows, int k, const model_tensor *W, const model_tensor *b,
                   const double *residual, int n, double *out)
{
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < n; o++) {
            double sum = value(b, (size_t)o);
            for (int i = 0; i < k; i++)
                sum += in[(size_t)r * (size_t)k + (size_t)i] * value(W, (size_t)o * (size_t)k + i);
            if (residual) sum += residual[(size_t)r * (size_t)n + (size_t)o];
            out[(size_t)r * (size_t)n + (size_t)o] = sum;
        }
}

static double activate(double x, model_activation a)
{
    if (a == MODEL_ACT_RELU) return x > 0 ? x : 0;
    if (a == MODEL_ACT_GELU_TANH)
        return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)));
    return 0.5 * x * (1.0 + erf(x / sqrt(2.0)));
}

/* The pooled vector of one sequence. */
static void reference_sequence(const test_model *m, const int32_t *ids, int len, int skip,
                               double *pooled)
{
    const model_config *c = &m->config;
    const model_weights *w = &m->weights;
    int h = c->hidden_size, in = c->intermediate_size, heads = c->num_heads, d = h / heads;
    size_t t = (size_t)len;
    double *x = calloc(t * (size_t)h, sizeof *x), *qkv = calloc(3 * t * (size_t)h, sizeof *qkv);
    double *ctx = calloc(t * (size_t)h, sizeof *ctx), *x1 = calloc(t * (size_t)h, sizeof *x1);
    double *hid = calloc(t * (size_t)in, sizeof *hid), *p = calloc(t, sizeof *p);
    for (int r = 0; r < len; r++) {
        for (int i = 0; i < h; i++)
            x[r * h + i] = value(&w->word_emb, (size_t)ids[r] * h + i) +
                           value(&w->position_emb, (size_t)r * h + i) + value(&w->type_emb, i);
        layer_norm(x + r * h, h, &w->emb_ln_w, &w->emb_ln_b, c->layer_norm_eps);
    }
    for (int l = 0; l < c->num_layers; l++) {
        const model_layer_weights *L = &w->layers[l];
        linear(x, len, h, &L->query_w, &L->query_b, NULL, h, qkv);
        linear(x, len, h, &L->key_w, &L->key_b, NULL, h, qkv + t * h);
        linear(x, len, h, &L->value_w, &L->value_b, NULL, h, qkv + 2 * t * h);
        const double *q = qkv, *k = qkv + t * h, *v = qkv + 2 * t * h;
        for (int head = 0; head < heads; head++)
            for (int i = 0; i < len; i++) {
                double top = -INFINITY, sum = 0;
                for (int j = 0; j < len; j++) {
                    double s = 0;
                    for (int e = 0; e < d; e++)
                        s += q[i * h + head * d + e] * k[j * h + head * d + e];
                    p[j] = s / sqrt((double)d);
                    top = p[j] > top ? p[j] : top;
                }
                for (int j = 0; j < len; j++) sum += p[j] = exp(p[j] - top);
                for (int e = 0; e < d; e++) {
                    double o = 0;
                    for (int j = 0; j < len; j++) o += p[j] * v[j * h + head * d + e];
                    ctx[i * h + head * d + e] = o / sum;
                }
            }
        linear(ctx, len, h, &L->attn_out_w, &L->attn_out_b, x, h, x1);
        for (int r = 0; r < len; r++)
            layer_norm(x1 + r * h, h, &L->attn_ln_w, &L->attn_ln_b, 1e-12);
        linear(x1, len, h, &L->inter_w, &L->inter_b, NULL, in, hid);
        for (size_t i = 0; i < t * (size_t)in; i++) hid[i] = activate(hid[i], c->activation);
        linear(hid, len, in, &L->out_w, &L->out_b, x1, h, x);
        for (int r = 0; r < len; r++) layer_norm(x + r * h, h, &L->out_ln_w, &L->out_ln_b, 1e-12);
    }
    int first = skip < len ? skip : 0;
    for (int i = 0; i < h; i++) {
        if (c->pooling == EMBEDRAG_POOLING_CLS) {
            pooled[i] = x[i];
        } else if (c->pooling == EMBEDRAG_POOLING_MAX) {
            pooled[i] = x[first * h + i];
            for (int r = first + 1; r < len; r++) pooled[i] = fmax(pooled[i], x[r * h + i]);
        } else {
            double sum = 0;
            for (int r = first; r < len; r++) sum += x[r * h + i];
            pooled[i] = sum / (len - first);
        }
    }
    free(x);
    free(qkv);
    free(ctx);
    free(x1);
    free(hid);
    free(p);
}

/* ---- batches ---- */

typedef struct batch_data {
    int32_t ids[MAX_SEQUENCES * 128];
    int offsets[MAX_SEQUENCES + 1];
    int skip[MAX_SEQUENCES];
    backend_batch batch;
} batch_data;

/* Appends sequence `index` of `len` random ids, with a random pool_skip, to the packed arrays
 * (offsets[0] is 0), and describes the batch so far in *batch. */
static void append_sequence(int32_t *ids, int *offsets, int *skip, int index, int len,
                            backend_batch *batch)
{
    int tokens = offsets[index];
    for (int t = 0; t < len; t++) ids[tokens + t] = (int32_t)(next_random() % VOCAB);
    offsets[index + 1] = tokens + len;
    skip[index] = len > 2 ? (int)(next_random() % 3) : 0;
    int max_len = index > 0 && batch->max_len > len ? batch->max_len : len;
    *batch = (backend_batch){.ids = ids,
                             .offsets = offsets,
                             .count = index + 1,
                             .tokens = tokens + len,
                             .max_len = max_len,
                             .pool_skip = skip};
}

static void random_batch(const model_config *c, batch_data *b)
{
    int count = 1 + (int)(next_random() % MAX_SEQUENCES);
    b->offsets[0] = 0;
    for (int s = 0; s < count; s++) {
        /* Lengths from 1 to the model's limit, with the limit itself now and then. */
        int len = next_random() % 4 == 0 ? c->max_position_embeddings
                                         : 1 + (int)(next_random() % c->max_position_embeddings);
        append_sequence(b->ids, b->offsets, b->skip, s, len, &b->batch);
    }
}

/* Runs a batch on a fresh stream of `b`; returns the status. */
static int run_batch(backend *b, backend_priority priority, const backend_batch *batch, float *out)
{
    backend_stream *stream;
    int rc = b->ops->stream_create(b, priority, &stream);
    if (rc) return rc;
    rc = b->ops->reserve(stream, batch->tokens, batch->count, batch->max_len);
    backend_ticket ticket;
    if (!rc) rc = b->ops->submit(stream, batch, out, &ticket);
    if (!rc) rc = b->ops->wait(stream, &ticket);
    b->ops->stream_destroy(stream);
    return rc;
}

static double cosine_f(const float *a, const float *b, int n)
{
    double ab = 0, aa = 0, bb = 0;
    for (int i = 0; i < n; i++) {
        ab += (double)a[i] * b[i];
        aa += (double)a[i] * a[i];
        bb += (double)b[i] * b[i];
    }
    return ab / sqrt(aa * bb);
}

/* ---- the comparisons ---- */

/* The backends to compare with the CPU's fp32, with their bars. */
typedef struct candidate {
    backend_params params;
    const char *label;
    double min_cosine;
} candidate;

static const candidate candidates[] = {
    {{.kind = BACKEND_CPU, .threads = 2, .precision = EMBEDRAG_PRECISION_BF16},
     "cpu bf16",
     BF16_MIN_COSINE},
    /* Bar unused: the same bits are required (see test_shape). */
    {{.kind = BACKEND_CPU, .threads = 1, .precision = EMBEDRAG_PRECISION_FP32},
     "cpu fp32 1 thread",
     1.0},
    {{.kind = BACKEND_CUDA, .precision = EMBEDRAG_PRECISION_FP16},
     "cuda fp16",
     GPU_HALF_MIN_COSINE},
    {{.kind = BACKEND_CUDA, .precision = EMBEDRAG_PRECISION_BF16},
     "cuda bf16",
     GPU_HALF_MIN_COSINE},
    {{.kind = BACKEND_CUDA, .precision = EMBEDRAG_PRECISION_FP32},
     "cuda fp32",
     GPU_FP32_MIN_COSINE},
};

static void test_shape(const shape *s)
{
    test_model m;
    make_model(s, &m);
    const model_config *c = &m.config;
    int h = c->hidden_size;
    backend_params cpu_params = {
        .kind = BACKEND_CPU, .threads = 2, .precision = EMBEDRAG_PRECISION_FP32};
    backend *cpu;
    int rc = backend_create(&cpu_params, c, &m.weights, &cpu);
    if (!rc) rc = backend_load_layers(cpu, &m.weights);
    CHECK(rc == 0, "%s: cpu backend: %s", s->name, err_get());
    if (rc) {
        free_model(&m);
        return;
    }
    CHECK(cpu->caps.precision == EMBEDRAG_PRECISION_FP32 && !strcmp(cpu->caps.name, "cpu") &&
              cpu->caps.kernels && cpu->caps.device && cpu->caps.preferred_batch_tokens > 0 &&
              cpu->caps.max_batch_tokens >= cpu->caps.preferred_batch_tokens,
          "%s: cpu capabilities", s->name);

    backend *others[sizeof candidates / sizeof candidates[0]] = {NULL};
    for (size_t k = 0; k < sizeof candidates / sizeof candidates[0]; k++) {
        rc = backend_create(&candidates[k].params, c, &m.weights, &others[k]);
        if (rc == 0) {
            rc = backend_load_layers(others[k], &m.weights);
            if (rc) {
                backend_destroy(others[k]);
                others[k] = NULL;
            }
        }
        if (rc == EMBEDRAG_ERR_UNSUPPORTED) {
            if (s == &shapes[0])
                printf("skipped on this machine: %s: %s\n", candidates[k].label, err_get());
            continue;
        }
        CHECK(rc == 0, "%s: %s: %s", s->name, candidates[k].label, err_get());
        /* The CPU runs bf16 only where it has a bf16 kernel: then it must say so. */
        if (rc == 0 && s == &shapes[0] && candidates[k].params.kind == BACKEND_CPU &&
            others[k]->caps.precision != candidates[k].params.precision)
            printf("%s runs as fp32 on this CPU (no bf16 kernel): compared for identity\n",
                   candidates[k].label);
    }

    double worst_ref = 1.0, worst_diff = 0.0;
    double worst[sizeof candidates / sizeof candidates[0]];
    bool identical[sizeof candidates / sizeof candidates[0]];
    for (size_t k = 0; k < sizeof candidates / sizeof candidates[0]; k++) {
        worst[k] = 1.0;
        identical[k] = true;
    }
    for (int n = 0; n < BATCHES_PER_SHAPE; n++) {
        batch_data b;
        random_batch(c, &b);
        float *out = malloc((size_t)b.batch.count * h * sizeof *out);
        float *alone = malloc((size_t)h * sizeof *alone);
        float *other = malloc((size_t)b.batch.count * h * sizeof *other);
        double *ref = malloc((size_t)h * sizeof *ref);
        rc = run_batch(cpu, BACKEND_PRIORITY_BULK, &b.batch, out);
        CHECK(rc == 0, "%s: cpu batch: %s", s->name, err_get());
        for (int i = 0; rc == 0 && i < b.batch.count; i++) {
            const int32_t *ids = b.ids + b.offsets[i];
            int len = b.offsets[i + 1] - b.offsets[i];
            reference_sequence(&m, ids, len, b.skip[i], ref);
            double ab = 0, aa = 0, bb = 0;
            for (int e = 0; e < h; e++) {
                double o = out[(size_t)i * h + e];
                ab += o * ref[e];
                aa += o * o;
                bb += ref[e] * ref[e];
                worst_diff = fmax(worst_diff, fabs(o - ref[e]));
            }
            worst_ref = fmin(worst_ref, ab / sqrt(aa * bb));
            /* The same sequence alone, on a latency stream: the same bits. */
            backend_batch single = {.ids = ids,
                                    .offsets = (const int[]){0, len},
                                    .count = 1,
                                    .tokens = len,
                                    .max_len = len,
                                    .pool_skip = &b.skip[i]};
            CHECK(run_batch(cpu, BACKEND_PRIORITY_LATENCY, &single, alone) == 0 &&
                      memcmp(alone, out + (size_t)i * h, (size_t)h * sizeof *alone) == 0,
                  "%s: sequence %d of %d (%d tokens) differs alone", s->name, i, b.batch.count,
                  len);
        }
        for (size_t k = 0; rc == 0 && k < sizeof candidates / sizeof candidates[0]; k++) {
            if (!others[k]) continue;
            int orc = run_batch(others[k], BACKEND_PRIORITY_BULK, &b.batch, other);
            CHECK(orc == 0, "%s: %s batch: %s", s->name, candidates[k].label, err_get());
            identical[k] = identical[k] && orc == 0 &&
                           memcmp(other, out, (size_t)b.batch.count * h * sizeof *out) == 0;
            for (int i = 0; orc == 0 && i < b.batch.count; i++)
                worst[k] = fmin(worst[k], cosine_f(other + (size_t)i * h, out + (size_t)i * h, h));
        }
        free(out);
        free(alone);
        free(other);
        free(ref);
    }
    CHECK(worst_ref >= FP32_MIN_COSINE && worst_diff <= FP32_MAX_ABS_DIFF,
          "%s: cpu fp32 against double: worst cosine %.8f, worst difference %.2e", s->name,
          worst_ref, worst_diff);
    printf("%s: cpu fp32 against double: worst cosine %.8f, worst difference %.2e\n", s->name,
           worst_ref, worst_diff);
    for (size_t k = 0; k < sizeof candidates / sizeof candidates[0]; k++) {
        if (!others[k]) continue;
        /* The CPU's fp32 (asked for, or what bf16 falls back to) with any thread count is the
         * same bits. */
        bool exact = others[k]->caps.precision == EMBEDRAG_PRECISION_FP32 &&
                     candidates[k].params.kind == BACKEND_CPU;
        if (exact)
            CHECK(identical[k], "%s: %s differs from cpu fp32 with 2 threads", s->name,
                  candidates[k].label);
        else
            CHECK(worst[k] >= candidates[k].min_cosine,
                  "%s: %s against cpu fp32: worst cosine %.8f, bar %.8f", s->name,
                  candidates[k].label, worst[k], candidates[k].min_cosine);
        printf("%s: %s (%s) against cpu fp32: worst cosine %.8f\n", s->name, candidates[k].label,
               others[k]->caps.kernels, worst[k]);
        backend_destroy(others[k]);
    }
    backend_destroy(cpu);
    free_model(&m);
}

/* ---- two streams at once ---- */

typedef struct stream_job {
    backend *b;
    backend_priority priority;
    const backend_batch *batch;
    float *out;
    int rounds, rc;
} stream_job;

static void *stream_thread(void *arg)
{
    stream_job *j = arg;
    for (int r = 0; r < j->rounds && j->rc == 0; r++)
        j->rc = run_batch(j->b, j->priority, j->batch, j->out);
    return NULL;
}

/* A bulk stream and a latency stream of one backend run from two threads at once; each result
 * equals the one computed alone. */
static void test_streams_of_two_priorities_share_a_backend(const backend_params *p, const shape *s)
{
    test_model m;
    make_model(s, &m);
    int h = m.config.hidden_size;
    backend *b;
    CHECK(backend_create(p, &m.config, &m.weights, &b) == 0 &&
              backend_load_layers(b, &m.weights) == 0,
          "backend: %s", err_get());
    batch_data big, small;
    random_batch(&m.config, &big);
    random_batch(&m.config, &small);
    float *big_alone = malloc((size_t)big.batch.count * h * sizeof(float));
    float *small_alone = malloc((size_t)small.batch.count * h * sizeof(float));
    float *big_out = malloc((size_t)big.batch.count * h * sizeof(float));
    float *small_out = malloc((size_t)small.batch.count * h * sizeof(float));
    CHECK(run_batch(b, BACKEND_PRIORITY_BULK, &big.batch, big_alone) == 0 &&
              run_batch(b, BACKEND_PRIORITY_LATENCY, &small.batch, small_alone) == 0,
          "batches alone: %s", err_get());
    stream_job jobs[2] = {{b, BACKEND_PRIORITY_BULK, &big.batch, big_out, 20, 0},
                          {b, BACKEND_PRIORITY_LATENCY, &small.batch, small_out, 40, 0}};
    pthread_t threads[2];
    for (int i = 0; i < 2; i++) pthread_create(&threads[i], NULL, stream_thread, &jobs[i]);
    for (int i = 0; i < 2; i++) pthread_join(threads[i], NULL);
    CHECK(jobs[0].rc == 0 && jobs[1].rc == 0, "concurrent streams failed");
    CHECK(memcmp(big_out, big_alone, (size_t)big.batch.count * h * sizeof(float)) == 0 &&
              memcmp(small_out, small_alone, (size_t)small.batch.count * h * sizeof(float)) == 0,
          "results of concurrent streams differ from the ones computed alone");
    free(big_alone);
    free(small_alone);
    free(big_out);
    free(small_out);
    backend_destroy(b);
    free_model(&m);
}

/* ---- the seam's limits ---- */

static void test_limits_are_errors(const backend_params *p, const shape *s)
{
    test_model m;
    make_model(s, &m);
    backend *b;
    CHECK(backend_create(p, &m.config, &m.weights, &b) == 0 &&
              backend_load_layers(b, &m.weights) == 0,
          "backend: %s", err_get());
    CHECK(b->ops->load_layer(b, &m.weights, m.config.num_layers) == EMBEDRAG_ERR_INVALID_ARGUMENT,
          "a layer past the model's is refused");
    backend_stream *stream;
    CHECK(b->ops->stream_create(b, BACKEND_PRIORITY_BULK, &stream) == 0, "stream: %s", err_get());
    CHECK(b->ops->reserve(stream, b->caps.max_batch_tokens + 1, 1, 8) ==
              EMBEDRAG_ERR_INVALID_ARGUMENT,
          "reserving past max_batch_tokens must fail");
    CHECK(b->ops->reserve(stream, 16, 4, 16) == 0, "reserve: %s", err_get());
    batch_data big;
    do random_batch(&m.config, &big);
    while (big.batch.tokens <= 16);
    float *out = malloc((size_t)MAX_SEQUENCES * m.config.hidden_size * sizeof(float));
    backend_ticket ticket;
    int rc = b->ops->submit(stream, &big.batch, out, &ticket);
    CHECK(rc == EMBEDRAG_ERR_INVALID_ARGUMENT && strstr(err_get(), "reservation"),
          "a batch past the reservation: rc %d: %s", rc, err_get());
    /* Estimates grow with the work. */
    double small = b->ops->estimate_seconds(b, 16, 1, 16);
    double large = b->ops->estimate_seconds(b, 4096, 32, 128);
    CHECK(small > 0 && large > 4 * small, "estimates: %g s for 16 tokens, %g s for 4096", small,
          large);
    if (p->kind == BACKEND_CUDA) {
        /* An asynchronous stream takes one batch at a time. */
        batch_data few;
        do random_batch(&m.config, &few);
        while (few.batch.tokens > 16 || few.batch.count > 4 || few.batch.max_len > 16);
        backend_ticket first, second;
        CHECK(b->ops->submit(stream, &few.batch, out, &first) == 0, "submit: %s", err_get());
        CHECK(b->ops->submit(stream, &few.batch, out, &second) == EMBEDRAG_ERR_BUSY,
              "a second batch before the first is waited on is refused");
        CHECK(b->ops->wait(stream, &first) == 0 && first.done, "wait: %s", err_get());
    }
    b->ops->stream_destroy(stream);
    free(out);
    backend_destroy(b);

    backend_params bad = {.kind = (backend_kind)42};
    backend *none = (backend *)&bad;
    CHECK(backend_create(&bad, &m.config, &m.weights, &none) == EMBEDRAG_ERR_INVALID_ARGUMENT &&
              none == NULL,
          "an unknown kind is refused and *out is NULL");
    free_model(&m);
}

/* ---- the GPU's own checks (EMBEDRAG_TEST_GPU=1) ---- */

/* The model shapes of the GPU issue: 6 and 12 layers, 384 and 768 wide, heads of 32 and 64, every
 * pooling, erf and tanh GELU, F32 and F16 matrices; positions up to 512. */
static const shape gpu_shapes[] = {
    {"6x384, d32, mean", 6, 384, 12, 1536, 512, EMBEDRAG_POOLING_MEAN, MODEL_ACT_GELU, false},
    {"12x384, d64, cls, F16 matrices", 12, 384, 6, 1536, 512, EMBEDRAG_POOLING_CLS, MODEL_ACT_GELU,
     true},
    {"12x768, d64, mean, gelu-tanh", 12, 768, 12, 3072, 512, EMBEDRAG_POOLING_MEAN,
     MODEL_ACT_GELU_TANH, false},
    {"6x768, d32, max", 6, 768, 24, 3072, 512, EMBEDRAG_POOLING_MAX, MODEL_ACT_GELU, false},
};

/* For the streams and limits checks, whose random batches hold 128 tokens a sequence at most. */
static const shape gpu_short_shape = {"6x384, d32, mean, 128 positions",
                                      6,
                                      384,
                                      12,
                                      1536,
                                      128,
                                      EMBEDRAG_POOLING_MEAN,
                                      MODEL_ACT_GELU,
                                      false};

/* The bulk stream's reservation, as the engine's bulk lane makes one: batches up to the CUDA
 * backend's graph limit (CUDA_GRAPH_MAX_TOKENS) replay graphs, larger ones launch directly. */
#define GPU_BULK_TOKENS 8192
/* The latency stream's, as the engine's latency lane (ENGINE_LATENCY_TOKENS). */
#define GPU_LATENCY_TOKENS 512
/* A sequence alone against the same sequence in a batch (the GPU issue's bar; the GEMMs may pick
 * other algorithms for other row counts, so bit-identity is reported, not required). bf16 rounds
 * to 8 significant bits, and the GEMMs' different summation orders alone moved 12x768 vectors to
 * cosine 0.99997 (bench/cuda-notes.md): its bar is the looser one. */
#define GPU_SINGLE_MIN_COSINE 0.99999
#define GPU_SINGLE_BF16_MIN_COSINE 0.9999
#define GPU_BATCHES 3
#define GPU_MAX_SEQUENCES 64

typedef struct gpu_batch {
    int32_t ids[GPU_BULK_TOKENS];
    int offsets[GPU_MAX_SEQUENCES + 1];
    int skip[GPU_MAX_SEQUENCES];
    backend_batch batch;
} gpu_batch;

/* Lengths at and around the attention kernels' 16-row and 64-key tiles, the model's limit and
 * 1; then many short texts (a graph's bucket); then long ones, 5000 tokens. */
static void make_gpu_batch(const model_config *c, int which, gpu_batch *g)
{
    static const int edges[] = {512, 1, 16, 17, 64, 65, 128, 200, 255, 33, 2, 100, 15, 511};
    int lengths[GPU_MAX_SEQUENCES], count = 0;
    if (which == 0) {
        for (size_t i = 0; i < sizeof edges / sizeof edges[0]; i++) lengths[count++] = edges[i];
    } else if (which == 1) {
        while (count < 40) lengths[count++] = 1 + (int)(next_random() % 24);
    } else {
        while (count < 11) lengths[count++] = 420 + (int)(next_random() % 93);
    }
    g->offsets[0] = 0;
    for (int s = 0; s < count; s++) {
        int len = lengths[s] < c->max_position_embeddings ? lengths[s] : c->max_position_embeddings;
        append_sequence(g->ids, g->offsets, g->skip, s, len, &g->batch);
    }
}

/* Submits on an existing stream with the output poisoned first; returns the status. */
static int run_on(backend *b, backend_stream *stream, const backend_batch *batch, float *out, int h)
{
    for (size_t i = 0; i < (size_t)batch->count * (size_t)h; i++) out[i] = NAN;
    backend_ticket ticket;
    int rc = b->ops->submit(stream, batch, out, &ticket);
    if (!rc) rc = b->ops->wait(stream, &ticket);
    return rc;
}

static bool all_finite(const float *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(v[i])) return false;
    return true;
}

/* A CUDA configuration to compare: a precision and an environment setting of the backend's. */
typedef struct gpu_variant {
    embedrag_precision precision;
    const char *variable, *value; /* set while the backend is created, or NULL */
    const char *label;
    double min_cosine; /* 0: measured and reported only */
    bool same_bits;    /* must give the first variant's (fp16 defaults') bits */
} gpu_variant;

/* On every shape: the defaults (the v2 tensor-core attention kernel), the first attention
 * kernel (v1, heads of 32 and 64, fp16 and bf16 each), which stays selectable, the small-batch
 * kernels, and every product's algorithm chosen by timing cuBLASLt's candidates (the default does
 * so only for bulk batches, larger than these), which must keep the defaults' bits. */
static const gpu_variant gpu_variants[] = {
    {EMBEDRAG_PRECISION_FP16, NULL, NULL, "cuda fp16", GPU_HALF_MIN_COSINE, false},
    {EMBEDRAG_PRECISION_BF16, NULL, NULL, "cuda bf16", GPU_HALF_MIN_COSINE, false},
    {EMBEDRAG_PRECISION_FP32, NULL, NULL, "cuda fp32", GPU_FP32_MIN_COSINE, false},
    {EMBEDRAG_PRECISION_FP16, "EMBEDRAG_CUDA_ATTENTION", "v1", "cuda fp16, attention v1",
     GPU_HALF_MIN_COSINE, false},
    {EMBEDRAG_PRECISION_BF16, "EMBEDRAG_CUDA_ATTENTION", "v1", "cuda bf16, attention v1",
     GPU_HALF_MIN_COSINE, false},
    {EMBEDRAG_PRECISION_FP16, "EMBEDRAG_CUDA_SMALL", "1", "cuda fp16, small-batch kernels",
     GPU_HALF_MIN_COSINE, false},
    {EMBEDRAG_PRECISION_BF16, "EMBEDRAG_CUDA_SMALL", "1", "cuda bf16, small-batch kernels",
     GPU_HALF_MIN_COSINE, false},
    {EMBEDRAG_PRECISION_FP16, "EMBEDRAG_CUDA_SMALL", "nopdl",
     "cuda fp16, small-batch kernels without pdl", GPU_HALF_MIN_COSINE, false},
    {EMBEDRAG_PRECISION_FP16, "EMBEDRAG_CUDA_SMALL", "lastnorm",
     "cuda fp16, small-batch kernels, LayerNorm in the last block", GPU_HALF_MIN_COSINE, false},
    {EMBEDRAG_PRECISION_FP16, "EMBEDRAG_CUDA_SMALL", "persist",
     "cuda fp16, small-batch kernels in one persistent pass", GPU_HALF_MIN_COSINE, false},
    {EMBEDRAG_PRECISION_BF16, "EMBEDRAG_CUDA_SMALL", "persist",
     "cuda bf16, small-batch kernels in one persistent pass", GPU_HALF_MIN_COSINE, false},
    {EMBEDRAG_PRECISION_FP16, "EMBEDRAG_CUDA_SMALL", "cluster", "cuda fp16, cluster pass",
     GPU_HALF_MIN_COSINE, false},
    {EMBEDRAG_PRECISION_BF16, "EMBEDRAG_CUDA_SMALL", "cluster", "cuda bf16, cluster pass",
     GPU_HALF_MIN_COSINE, false},
    {EMBEDRAG_PRECISION_FP16, "EMBEDRAG_CUDA_TUNE", "all",
     "cuda fp16, cuBLASLt's candidates timed at every row count", GPU_HALF_MIN_COSINE, true},
    /* The attention output product and its LayerNorm as one kernel (cuda_gemm_norm, on an
     * H100/H200 for 384-wide models) in every pass outside graphs, not only in bulk passes of
     * CUDA_FUSED_NORM_MIN_ROWS rows (more than these batches have): other bits (the products'
     * sums run in another order), the same bars. */
    {EMBEDRAG_PRECISION_FP16, "EMBEDRAG_CUDA_FUSED_NORM", "all",
     "cuda fp16, attention output product and LayerNorm in one kernel", GPU_HALF_MIN_COSINE, false},
    {EMBEDRAG_PRECISION_BF16, "EMBEDRAG_CUDA_FUSED_NORM", "all",
     "cuda bf16, attention output product and LayerNorm in one kernel", GPU_HALF_MIN_COSINE, false},
    /* Without dependent launches outside graphs: the same bits. */
    {EMBEDRAG_PRECISION_FP16, "EMBEDRAG_CUDA_PDL", "0",
     "cuda fp16, LayerNorm and attention launched the ordinary way", GPU_HALF_MIN_COSINE, true},
};

/* Further variants, on the first shape only: the paths the defaults do not take (no graphs,
 * attention without tensor cores, BERT's exact erf GELU in fp16, the heuristic's first cuBLASLt
 * algorithm without timing the others, bit for bit the defaults' here), and fp32 with cuBLASLt's
 * tanh GELU epilogue in place of erf (measured only, for bench/cuda-notes.md). */
static const gpu_variant gpu_extra_variants[] = {
    {EMBEDRAG_PRECISION_FP16, "EMBEDRAG_CUDA_GRAPHS", "0", "cuda fp16 without graphs",
     GPU_HALF_MIN_COSINE, false},
    {EMBEDRAG_PRECISION_FP16, "EMBEDRAG_CUDA_TENSOR_CORE_ATTENTION", "0",
     "cuda fp16, fp32-core attention", GPU_HALF_MIN_COSINE, false},
    {EMBEDRAG_PRECISION_FP16, "EMBEDRAG_CUDA_GELU", "erf", "cuda fp16, own erf GELU kernel",
     GPU_HALF_MIN_COSINE, false},
    {EMBEDRAG_PRECISION_FP32, "EMBEDRAG_CUDA_GELU", "tanh", "cuda fp32, tanh GELU epilogue", 0.0,
     false},
    {EMBEDRAG_PRECISION_FP16, "EMBEDRAG_CUDA_TUNE", "0", "cuda fp16, cuBLASLt's first algorithms",
     GPU_HALF_MIN_COSINE, true},
};

/* Runs the batches on one CUDA configuration and compares with the CPU's vectors. */
/* `first` holds the first variant's vectors of each batch: filled by that variant (when NULL),
 * compared with bit for bit by a same_bits variant. */
static void test_gpu_variant(const shape *s, const test_model *m, const gpu_variant *v,
                             gpu_batch *batches, float *const *reference, float **first)
{
    const model_config *c = &m->config;
    int h = c->hidden_size;
    backend_params params = {.kind = BACKEND_CUDA, .device = 0, .precision = v->precision};
    if (v->variable) setenv(v->variable, v->value, 1);
    backend *b;
    int rc = backend_create(&params, c, &m->weights, &b);
    if (v->variable) unsetenv(v->variable);
    if (!rc) rc = backend_load_layers(b, &m->weights);
    CHECK(rc == 0, "%s: %s: %s", s->name, v->label, err_get());
    if (rc) {
        backend_destroy(b);
        return;
    }
    backend_stream *bulk = NULL, *latency = NULL;
    rc = b->ops->stream_create(b, BACKEND_PRIORITY_BULK, &bulk);
    if (!rc)
        rc = b->ops->reserve(bulk, GPU_BULK_TOKENS, GPU_BULK_TOKENS, c->max_position_embeddings);
    if (!rc) rc = b->ops->stream_create(b, BACKEND_PRIORITY_LATENCY, &latency);
    if (!rc)
        rc = b->ops->reserve(latency, GPU_LATENCY_TOKENS, GPU_LATENCY_TOKENS,
                             c->max_position_embeddings);
    CHECK(rc == 0, "%s: %s: streams: %s", s->name, v->label, err_get());
    /* Pinned rows for the bulk stream (the engine's case), plain ones for the single texts. */
    float *out = b->ops->host_alloc(b, (size_t)GPU_MAX_SEQUENCES * h * sizeof(float));
    float *again = b->ops->host_alloc(b, (size_t)GPU_MAX_SEQUENCES * h * sizeof(float));
    float *alone = malloc((size_t)h * sizeof(float));
    double worst = 1.0, worst_alone = 1.0;
    int singles = 0, identical_singles = 0;
#ifdef EMBEDRAG_HAVE_CUDA
    int graph_batches = 0, graph_expected = 0;
    bool graphs_on = !(v->variable && !strcmp(v->variable, "EMBEDRAG_CUDA_GRAPHS"));
#endif
    bool deterministic = true, written = true;
    for (int k = 0; rc == 0 && k < GPU_BATCHES; k++) {
        const backend_batch *batch = &batches[k].batch;
        size_t n = (size_t)batch->count * (size_t)h;
        int orc = run_on(b, bulk, batch, out, h);
        CHECK(orc == 0, "%s: %s: batch %d: %s", s->name, v->label, k, err_get());
        if (orc) continue;
#ifdef EMBEDRAG_HAVE_CUDA
        graph_batches += cuda_stream_last_used_graph(bulk);
        graph_expected += graphs_on && batch->tokens <= CUDA_GRAPH_MAX_TOKENS;
#endif
        written = written && all_finite(out, n);
        for (int i = 0; i < batch->count; i++)
            worst = fmin(worst, cosine_f(out + (size_t)i * h, reference[k] + (size_t)i * h, h));
        orc = run_on(b, bulk, batch, again, h);
        deterministic = deterministic && orc == 0 && memcmp(out, again, n * sizeof *out) == 0;
        if (!first[k]) {
            first[k] = malloc(n * sizeof *out);
            if (first[k]) memcpy(first[k], out, n * sizeof *out);
        } else if (v->same_bits) {
            CHECK(memcmp(out, first[k], n * sizeof *out) == 0,
                  "%s: %s: batch %d differs from the defaults' vectors in some bit", s->name,
                  v->label, k);
        }
        for (int i = 0; i < batch->count; i++) {
            int len = batch->offsets[i + 1] - batch->offsets[i];
            backend_batch single = {.ids = batch->ids + batch->offsets[i],
                                    .offsets = (const int[]){0, len},
                                    .count = 1,
                                    .tokens = len,
                                    .max_len = len,
                                    .pool_skip = &batch->pool_skip[i]};
            orc = run_on(b, latency, &single, alone, h);
            CHECK(orc == 0, "%s: %s: sequence alone: %s", s->name, v->label, err_get());
            if (orc) continue;
            written = written && all_finite(alone, (size_t)h);
            const float *row = out + (size_t)i * h;
            worst_alone = fmin(worst_alone, cosine_f(alone, row, h));
            singles++;
            identical_singles += memcmp(alone, row, (size_t)h * sizeof *alone) == 0;
        }
    }
    CHECK(written, "%s: %s: a vector was not written (NaN left) or is not finite", s->name,
          v->label);
    CHECK(deterministic, "%s: %s: the same batch twice gave different bits", s->name, v->label);
    if (v->min_cosine > 0)
        CHECK(worst >= v->min_cosine, "%s: %s against cpu fp32: worst cosine %.8f, bar %.8f",
              s->name, v->label, worst, v->min_cosine);
    double alone_bar = v->precision == EMBEDRAG_PRECISION_BF16 ? GPU_SINGLE_BF16_MIN_COSINE
                                                               : GPU_SINGLE_MIN_COSINE;
    CHECK(worst_alone >= alone_bar,
          "%s: %s: a sequence alone against in its batch: worst cosine %.8f, bar %.8f", s->name,
          v->label, worst_alone, alone_bar);
#ifdef EMBEDRAG_HAVE_CUDA
    CHECK(graph_batches == graph_expected && (graph_expected > 0) == graphs_on,
          "%s: %s: %d batches replayed a graph, %d should have", s->name, v->label, graph_batches,
          graph_expected);
#endif
    printf("%s: %s (%s) against cpu fp32: worst cosine %.8f; alone against in a batch: worst "
           "%.8f, %d of %d identical\n",
           s->name, v->label, b->caps.kernels, worst, worst_alone, identical_singles, singles);
    b->ops->host_free(b, out);
    b->ops->host_free(b, again);
    free(alone);
    if (latency) b->ops->stream_destroy(latency);
    if (bulk) b->ops->stream_destroy(bulk);
    backend_destroy(b);
}

static void test_gpu_shape(const shape *s, bool extras)
{
    test_model m;
    make_model(s, &m);
    const model_config *c = &m.config;
    int h = c->hidden_size;
    backend_params cpu_params = {
        .kind = BACKEND_CPU, .threads = 0, .precision = EMBEDRAG_PRECISION_FP32};
    backend *cpu;
    int rc = backend_create(&cpu_params, c, &m.weights, &cpu);
    if (!rc) rc = backend_load_layers(cpu, &m.weights);
    CHECK(rc == 0, "%s: cpu backend: %s", s->name, err_get());
    gpu_batch *batches = malloc(GPU_BATCHES * sizeof *batches);
    float *reference[GPU_BATCHES] = {NULL};
    for (int k = 0; rc == 0 && k < GPU_BATCHES; k++) {
        make_gpu_batch(c, k, &batches[k]);
        reference[k] = malloc((size_t)batches[k].batch.count * h * sizeof(float));
        rc = run_batch(cpu, BACKEND_PRIORITY_BULK, &batches[k].batch, reference[k]);
        CHECK(rc == 0, "%s: cpu batch: %s", s->name, err_get());
    }
    float *first[GPU_BATCHES] = {NULL};
    for (size_t i = 0; rc == 0 && i < sizeof gpu_variants / sizeof gpu_variants[0]; i++)
        test_gpu_variant(s, &m, &gpu_variants[i], batches, reference, first);
    for (size_t i = 0;
         rc == 0 && extras && i < sizeof gpu_extra_variants / sizeof gpu_extra_variants[0]; i++)
        test_gpu_variant(s, &m, &gpu_extra_variants[i], batches, reference, first);
    for (int k = 0; k < GPU_BATCHES; k++) free(first[k]);
    for (int k = 0; k < GPU_BATCHES; k++) free(reference[k]);
    free(batches);
    if (cpu) backend_destroy(cpu);
    free_model(&m);
}

static void test_gpu(void)
{
    /* Is there a device at all? Asked on the smallest model, before any reference is computed. */
    backend_params cuda = {.kind = BACKEND_CUDA, .device = 0, .precision = EMBEDRAG_PRECISION_FP16};
    test_model probe_model;
    make_model(&shapes[0], &probe_model);
    backend *probe;
    int rc = backend_create(&cuda, &probe_model.config, &probe_model.weights, &probe);
    if (rc == EMBEDRAG_ERR_UNSUPPORTED) printf("skipped: no CUDA device (%s)\n", err_get());
    CHECK(rc == 0 || rc == EMBEDRAG_ERR_UNSUPPORTED, "cuda backend: %s", err_get());
    backend_destroy(probe);
    free_model(&probe_model);
    if (rc) return;
    for (size_t i = 0; i < sizeof gpu_shapes / sizeof gpu_shapes[0]; i++)
        test_gpu_shape(&gpu_shapes[i], i == 0);
    test_streams_of_two_priorities_share_a_backend(&cuda, &gpu_short_shape);
    test_limits_are_errors(&cuda, &gpu_short_shape);
}

int main(void)
{
    const char *gpu = getenv("EMBEDRAG_TEST_GPU");
    if (gpu && !strcmp(gpu, "1")) {
        test_gpu();
        return check_finish("test_backend (gpu)");
    }
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) test_shape(&shapes[i]);
    backend_params cpu = {.kind = BACKEND_CPU, .threads = 2, .precision = EMBEDRAG_PRECISION_FP32};
    test_streams_of_two_priorities_share_a_backend(&cpu, &shapes[0]);
    cpu.threads = 1;
    test_limits_are_errors(&cpu, &shapes[0]);
    return check_finish("test_backend");
}
