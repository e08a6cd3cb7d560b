/* Times one backend directly, below the engine and the tokenizer: random token ids in the GPU
 * issue's cells (1 to 1000 texts of 16, 50 or 128 tokens, or of mixed 32-256), each call split
 * into batches as the engine's lanes split it (the latency lane's 512 tokens for calls that fit,
 * else the backend's preferred bulk batch) and run submit-to-wait on a stream reserved the way
 * the lane reserves it. Reports the median wall time of a call (synchronized: wait returns after
 * the vectors are in host memory) and, for CUDA, the median device time from CUDA events around
 * each batch's upload, forward pass and download; both after warm-up calls, which also capture
 * the CUDA graphs. Weights come from a model directory or are random (--random), which the
 * timings do not depend on.
 *
 *   embedrag_backend_bench [--model DIR | --random LAYERS,HIDDEN,HEADS,INTERMEDIATE]
 *                          [--device cpu|cuda] [--precision fp32|fp16|bf16] [--seconds S]
 *                          [--threads N] [--only LENGTH,TEXTS] [--cold MB] [--json]
 * --only runs one cell (LENGTH 0 for mixed), e.g. under a profiler. --cold reads MB MiB of
 * memory before each timed call (untimed), so that the call finds the weights in memory rather
 * than in the caches: how a CPU whose last-level cache cannot hold the model runs it (an AMD
 * EPYC's 32 MB L3 against a 12-layer 384-wide model's 85 MB of fp32 weights), measured on any
 * CPU given MB well over its cache. */
#include "backend/backend.h"
#include "model/model.h"
#include "util/error.h"
#ifdef EMBEDRAG_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#endif

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Calls timed per cell: at least this many, and until this many seconds have passed (--seconds
 * changes the time), after BENCH_WARMUP calls. */
#define BENCH_MIN_CALLS 10
#define BENCH_MAX_CALLS 2000
#define BENCH_WARMUP 3
#define BENCH_SECONDS 0.5
/* The engine's latency lane (ENGINE_LATENCY_TOKENS): calls of at most this many tokens go there. */
#define BENCH_LATENCY_TOKENS 512
/* Random ids avoid the first ids of a BERT vocabulary ([PAD], [unused...], [CLS], [SEP]). */
#define BENCH_FIRST_ID 1000
/* Mixed lengths: uniform in [32, 256], as the GPU issue's table. */
#define BENCH_MIXED_MIN 32
#define BENCH_MIXED_MAX 256

static const int bench_batches[] = {1, 2, 10, 50, 100, 1000};
static const int bench_lengths[] = {16, 50, 128, 0}; /* 0: mixed */

static double now_seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static uint64_t bench_rng = 0x243F6A8885A308D3ull;

/* --cold: the buffer read before each timed call, and where its sum goes (so that the reads are
 * not optimized away). */
static unsigned char *bench_cold;
static size_t bench_cold_bytes;
static volatile uint64_t bench_cold_sink;

/* Reads a byte of every 64-byte line of the --cold buffer: the caches then hold it, not the
 * weights. */
static void evict_caches(void)
{
    uint64_t sum = 0;
    for (size_t i = 0; i < bench_cold_bytes; i += 64) sum += bench_cold[i];
    bench_cold_sink += sum;
}

static uint32_t bench_random(void)
{
    /* xorshift64*, seeded the same on every run. */
    bench_rng ^= bench_rng >> 12;
    bench_rng ^= bench_rng << 25;
    bench_rng ^= bench_rng >> 27;
    return (uint32_t)((bench_rng * 0x2545F4914F6CDD1Dull) >> 32);
}

/* ---- random weights ---- */

/* Tensors of the shape a config asks for, F16 values of about the scale a trained model has
 * (weights of 1/sqrt(fan-in), LayerNorm gains near 1): what the timings see is the shapes. */
typedef struct random_model {
    model_weights weights;
    void **blocks;
    int block_count;
} random_model;

static model_tensor random_f16(random_model *r, int64_t rows, int64_t cols, float scale,
                               float center)
{
    size_t n = (size_t)rows * (size_t)cols;
    uint16_t *data = malloc(n * sizeof *data);
    if (!data) {
        fputs("out of memory making random weights\n", stderr);
        exit(1);
    }
    for (size_t i = 0; i < n; i++) {
        /* A value in center +- scale as an IEEE half: exponent and mantissa from a float. */
        float v = center + scale * ((float)(bench_random() >> 8) / 8388608.0f - 1.0f);
        uint32_t u;
        memcpy(&u, &v, sizeof u);
        int e = (int)((u >> 23) & 0xFF) - 112; /* rebias 127 -> 15 */
        uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
        data[i] = e <= 0 ? sign : (uint16_t)(sign | (e << 10) | ((u >> 13) & 0x3FFu));
    }
    r->blocks[r->block_count++] = data;
    return (model_tensor){.name = "random",
                          .dtype = ST_F16,
                          .rows = rows,
                          .cols = cols,
                          .data = data,
                          .nbytes = n * sizeof *data};
}

static void make_random_model(const model_config *c, random_model *r)
{
    memset(r, 0, sizeof *r);
    int h = c->hidden_size, in = c->intermediate_size;
    r->blocks = calloc((size_t)(5 + 16 * c->num_layers), sizeof *r->blocks);
    r->weights.layers = calloc((size_t)c->num_layers, sizeof *r->weights.layers);
    if (!r->blocks || !r->weights.layers) exit(1);
    r->weights.layer_count = c->num_layers;
    r->weights.matrix_dtype = ST_F16;
    model_weights *w = &r->weights;
    w->word_emb = random_f16(r, c->vocab_size, h, 0.05f, 0.0f);
    w->position_emb = random_f16(r, c->max_position_embeddings, h, 0.05f, 0.0f);
    w->type_emb = random_f16(r, c->type_vocab_size, h, 0.05f, 0.0f);
    w->emb_ln_w = random_f16(r, 1, h, 0.1f, 1.0f);
    w->emb_ln_b = random_f16(r, 1, h, 0.1f, 0.0f);
    float wh = 1.0f / sqrtf((float)h), wi = 1.0f / sqrtf((float)in);
    for (int l = 0; l < c->num_layers; l++) {
        model_layer_weights *L = &w->layers[l];
        model_tensor *square[4] = {&L->query_w, &L->key_w, &L->value_w, &L->attn_out_w};
        model_tensor *hidden_bias[6] = {&L->query_b,    &L->key_b,     &L->value_b,
                                        &L->attn_out_b, &L->attn_ln_b, &L->out_b};
        for (int i = 0; i < 4; i++) *square[i] = random_f16(r, h, h, wh, 0.0f);
        for (int i = 0; i < 6; i++) *hidden_bias[i] = random_f16(r, 1, h, 0.1f, 0.0f);
        L->attn_ln_w = random_f16(r, 1, h, 0.1f, 1.0f);
        L->inter_w = random_f16(r, in, h, wh, 0.0f);
        L->inter_b = random_f16(r, 1, in, 0.1f, 0.0f);
        L->out_w = random_f16(r, h, in, wi, 0.0f);
        L->out_ln_w = random_f16(r, 1, h, 0.1f, 1.0f);
        L->out_ln_b = random_f16(r, 1, h, 0.1f, 0.0f);
    }
}

static void free_random_model(random_model *r)
{
    for (int i = 0; i < r->block_count; i++) free(r->blocks[i]);
    free(r->blocks);
    free(r->weights.layers);
}

/* ---- cells ---- */

typedef struct bench_setup {
    backend *b;
    bool cuda;
    backend_stream *latency, *bulk;
    int budget; /* the bulk lane's tokens per batch */
    int32_t *ids;
    int *offsets;
    float *out;
} bench_setup;

typedef struct cell {
    int length; /* 0: mixed */
    int texts, tokens;
    const int *lengths;
    double wall_p50, wall_p99, device_p50; /* seconds per call */
    double flops;
    int batches;
    bool graph;
} cell;

static int compare_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Runs the cell's texts once, as batches of the lane the engine would send them to; returns the
 * device seconds summed over the batches in *device (0 where not measured). */
static int run_call(bench_setup *s, cell *c, double *device)
{
    bool latency = c->tokens <= BENCH_LATENCY_TOKENS;
    backend_stream *stream = latency ? s->latency : s->bulk;
    int budget = latency ? BENCH_LATENCY_TOKENS : s->budget;
    *device = 0.0;
    c->batches = 0;
    c->graph = false;
    for (int first = 0; first < c->texts;) {
        int n = 0, tokens = 0, max_len = 0;
        s->offsets[0] = 0;
        while (first + n < c->texts && (n == 0 || tokens + c->lengths[first + n] <= budget)) {
            int len = c->lengths[first + n];
            tokens += len;
            max_len = len > max_len ? len : max_len;
            s->offsets[++n] = tokens;
        }
        backend_batch batch = {.ids = s->ids,
                               .offsets = s->offsets,
                               .count = n,
                               .tokens = tokens,
                               .max_len = max_len,
                               .pool_skip = NULL};
        backend_ticket ticket;
        int rc = s->b->ops->submit(stream, &batch, s->out, &ticket);
        if (!rc) rc = s->b->ops->wait(stream, &ticket);
        if (rc) return rc;
#ifdef EMBEDRAG_HAVE_CUDA
        if (s->cuda) {
            *device += cuda_stream_last_seconds(stream);
            c->graph = c->graph || cuda_stream_last_used_graph(stream);
        }
#endif
        c->batches++;
        first += n;
    }
    return 0;
}

static int time_cell(bench_setup *s, cell *c, double min_seconds, const model_config *config)
{
    double *wall = malloc(BENCH_MAX_CALLS * sizeof *wall);
    double *device = malloc(BENCH_MAX_CALLS * sizeof *device);
    if (!wall || !device) exit(1);
    int rc = 0, calls = 0;
    for (int i = 0; i < BENCH_WARMUP && !rc; i++) rc = run_call(s, c, &device[0]);
    double start = now_seconds();
    while (!rc && calls < BENCH_MAX_CALLS &&
           (calls < BENCH_MIN_CALLS || now_seconds() - start < min_seconds)) {
        if (bench_cold) evict_caches();
        double t = now_seconds();
        rc = run_call(s, c, &device[calls]);
        wall[calls++] = now_seconds() - t;
    }
    if (!rc) {
        qsort(wall, (size_t)calls, sizeof *wall, compare_double);
        qsort(device, (size_t)calls, sizeof *device, compare_double);
        c->wall_p50 = wall[calls / 2];
        c->wall_p99 = wall[(int)ceil(0.99 * calls) - 1];
        c->device_p50 = device[calls / 2];
        c->flops = 0.0;
        /* The FLOPs of the model on these texts, each at its own length. */
        for (int i = 0; i < c->texts; i++)
            c->flops += backend_batch_flops(config, c->lengths[i], 1, c->lengths[i]);
    }
    free(wall);
    free(device);
    return rc;
}

/* ---- main ---- */

static const char usage[] =
    "usage: embedrag_backend_bench [--model DIR | --random LAYERS,HIDDEN,HEADS,INTERMEDIATE]\n"
    "                              [--device cpu|cuda] [--precision fp32|fp16|bf16]\n"
    "                              [--seconds S] [--threads N] [--only LENGTH,TEXTS] [--cold MB]\n"
    "                              [--budget TOKENS] [--json]\n"
    "--budget: the bulk lane's tokens per batch (default: the backend's preferred batch)\n";

/* A config for random weights: BERT's vocabulary and positions, mean pooling, erf GELU. */
static int random_config(const char *spec, model_config *c)
{
    memset(c, 0, sizeof *c);
    if (sscanf(spec, "%d,%d,%d,%d", &c->num_layers, &c->hidden_size, &c->num_heads,
               &c->intermediate_size) != 4 ||
        c->num_layers < 1 || c->hidden_size < 8 || c->num_heads < 1 || c->intermediate_size < 8)
        return -1;
    c->name = "random";
    c->vocab_size = 30522;
    c->max_position_embeddings = 512;
    c->type_vocab_size = 2;
    c->layer_norm_eps = 1e-12f;
    c->activation = MODEL_ACT_GELU;
    c->max_seq_length = 512;
    c->pooling = EMBEDRAG_POOLING_MEAN;
    c->pooling_include_prompt = true;
    return 0;
}

int main(int argc, char **argv)
{
    const char *dir = NULL, *random_spec = NULL;
    backend_params params = {.kind = BACKEND_CPU, .precision = EMBEDRAG_PRECISION_FP32};
    double seconds = BENCH_SECONDS;
    bool json = false;
    int only_length = -1, only_texts = -1, budget = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--json")) {
            json = true;
            continue;
        }
        if (!v) {
            fputs(usage, stderr);
            return 2;
        }
        i++;
        if (!strcmp(a, "--model"))
            dir = v;
        else if (!strcmp(a, "--random"))
            random_spec = v;
        else if (!strcmp(a, "--device") && (!strcmp(v, "cpu") || !strcmp(v, "cuda")))
            params.kind = !strcmp(v, "cuda") ? BACKEND_CUDA : BACKEND_CPU;
        else if (!strcmp(a, "--precision") && !strcmp(v, "fp32"))
            params.precision = EMBEDRAG_PRECISION_FP32;
        else if (!strcmp(a, "--precision") && !strcmp(v, "fp16"))
            params.precision = EMBEDRAG_PRECISION_FP16;
        else if (!strcmp(a, "--precision") && !strcmp(v, "bf16"))
            params.precision = EMBEDRAG_PRECISION_BF16;
        else if (!strcmp(a, "--seconds"))
            seconds = atof(v);
        else if (!strcmp(a, "--threads"))
            params.threads = atoi(v);
        else if (!strcmp(a, "--only") && sscanf(v, "%d,%d", &only_length, &only_texts) == 2)
            continue;
        else if (!strcmp(a, "--cold") && atoi(v) > 0)
            bench_cold_bytes = (size_t)atoi(v) << 20;
        else if (!strcmp(a, "--budget") && atoi(v) > 0)
            budget = atoi(v);
        else {
            fputs(usage, stderr);
            return 2;
        }
    }
    if (!dir == !random_spec) {
        fputs(usage, stderr);
        return 2;
    }
    model_config config;
    model_weights loaded = {0};
    random_model random = {0};
    const model_weights *weights;
    if (dir) {
        if (model_config_load(dir, &config) || model_weights_load(dir, &config, &loaded)) {
            fprintf(stderr, "embedrag_backend_bench: %s\n", err_get());
            return 1;
        }
        weights = &loaded;
    } else {
        if (random_config(random_spec, &config)) {
            fputs(usage, stderr);
            return 2;
        }
        make_random_model(&config, &random);
        weights = &random.weights;
    }
    if (bench_cold_bytes) {
        bench_cold = malloc(bench_cold_bytes);
        if (!bench_cold) {
            fprintf(stderr, "embedrag_backend_bench: no memory for --cold's %zu MiB\n",
                    bench_cold_bytes >> 20);
            return 1;
        }
        /* Touched once, so that its pages exist (not the shared zero page). */
        for (size_t i = 0; i < bench_cold_bytes; i += 64) bench_cold[i] = (unsigned char)i;
    }
    bench_setup s = {.cuda = params.kind == BACKEND_CUDA};
    int rc = backend_create(&params, &config, weights, &s.b);
    if (!rc) rc = backend_load_layers(s.b, weights);
    if (rc) {
        fprintf(stderr, "embedrag_backend_bench: %s\n", err_get());
        return 1;
    }
    backend *b = s.b;
    int max_len = config.max_position_embeddings;
    s.budget = budget ? budget : b->caps.preferred_batch_tokens;
    if (s.budget < max_len || s.budget > b->caps.max_batch_tokens) {
        fprintf(stderr, "embedrag_backend_bench: --budget must be %d to %d tokens\n", max_len,
                b->caps.max_batch_tokens);
        return 2;
    }
    rc = b->ops->stream_create(b, BACKEND_PRIORITY_LATENCY, &s.latency);
    if (!rc) rc = b->ops->reserve(s.latency, BENCH_LATENCY_TOKENS, BENCH_LATENCY_TOKENS, max_len);
    if (!rc) rc = b->ops->stream_create(b, BACKEND_PRIORITY_BULK, &s.bulk);
    if (!rc) rc = b->ops->reserve(s.bulk, s.budget, s.budget, max_len);
    /* Staging as the lanes have it: host memory the backend reads and writes fastest. */
    int most_texts = bench_batches[sizeof bench_batches / sizeof bench_batches[0] - 1];
    s.ids = b->ops->host_alloc(b, (size_t)s.budget * sizeof *s.ids);
    s.offsets = b->ops->host_alloc(b, ((size_t)s.budget + 1) * sizeof *s.offsets);
    s.out = b->ops->host_alloc(b, (size_t)s.budget * (size_t)config.hidden_size * sizeof *s.out);
    int *lengths = malloc((size_t)most_texts * sizeof *lengths);
    if (rc || !s.ids || !s.offsets || !s.out || !lengths) {
        fprintf(stderr, "embedrag_backend_bench: %s\n", rc ? err_get() : "out of memory");
        return 1;
    }
    int id_range = config.vocab_size > 2 * BENCH_FIRST_ID ? config.vocab_size - BENCH_FIRST_ID
                                                          : config.vocab_size;
    int id_base = config.vocab_size > 2 * BENCH_FIRST_ID ? BENCH_FIRST_ID : 0;
    for (int i = 0; i < s.budget; i++) s.ids[i] = id_base + (int32_t)(bench_random() % id_range);

    if (!json)
        printf("%s, %d layers x %d (%d heads), %s: %s\n%s\n%8s %6s %8s %10s %10s %10s %12s %8s "
               "%6s\n",
               b->caps.name, config.num_layers, config.hidden_size, config.num_heads,
               b->caps.device, b->caps.kernels,
               bench_cold ? "wall: submit to wait, synchronized; device: CUDA events; medians; "
                            "caches evicted before each call (--cold)"
                          : "wall: submit to wait, synchronized; device: CUDA events; medians",
               "length", "texts", "tokens", "wall ms", "wall p99", "device ms", "device tok/s",
               "TFLOP/s", "graph");
    else
        printf("[\n");
    bool first_row = true;
    for (size_t li = 0; li < sizeof bench_lengths / sizeof bench_lengths[0]; li++)
        for (size_t bi = 0; bi < sizeof bench_batches / sizeof bench_batches[0]; bi++) {
            cell c = {.length = bench_lengths[li], .texts = bench_batches[bi], .lengths = lengths};
            if (only_length >= 0 && (c.length != only_length || c.texts != only_texts)) continue;
            c.tokens = 0;
            for (int i = 0; i < c.texts; i++) {
                lengths[i] =
                    c.length ? c.length
                             : BENCH_MIXED_MIN +
                                   (int)(bench_random() % (BENCH_MIXED_MAX - BENCH_MIXED_MIN + 1));
                c.tokens += lengths[i];
            }
            if (time_cell(&s, &c, seconds, &config)) {
                fprintf(stderr, "embedrag_backend_bench: %s\n", err_get());
                return 1;
            }
            double t = c.device_p50 > 0 ? c.device_p50 : c.wall_p50;
            char length[16];
            snprintf(length, sizeof length, c.length ? "%d" : "32-256", c.length);
            if (json) {
                printf("%s  {\"backend\": \"%s\", \"precision\": \"%s\", \"layers\": %d, "
                       "\"hidden\": %d, \"heads\": %d, \"length\": \"%s\", \"texts\": %d, "
                       "\"tokens\": %d, \"batches\": %d, \"graph\": %s, \"wall_ms_p50\": %.4f, "
                       "\"wall_ms_p99\": %.4f, \"device_ms_p50\": %.4f, "
                       "\"device_tokens_per_s\": %.0f, \"wall_tokens_per_s\": %.0f, "
                       "\"tflops\": %.2f, \"cold_mib\": %zu}",
                       first_row ? "" : ",\n", b->caps.name,
                       params.precision == EMBEDRAG_PRECISION_FP16   ? "fp16"
                       : params.precision == EMBEDRAG_PRECISION_BF16 ? "bf16"
                                                                     : "fp32",
                       config.num_layers, config.hidden_size, config.num_heads, length, c.texts,
                       c.tokens, c.batches, c.graph ? "true" : "false", c.wall_p50 * 1e3,
                       c.wall_p99 * 1e3, c.device_p50 * 1e3, c.tokens / t, c.tokens / c.wall_p50,
                       c.flops / t / 1e12, bench_cold_bytes >> 20);
            } else {
                printf("%8s %6d %8d %10.4f %10.4f %10.4f %12.0f %8.1f %6s\n", length, c.texts,
                       c.tokens, c.wall_p50 * 1e3, c.wall_p99 * 1e3, c.device_p50 * 1e3,
                       c.tokens / t, c.flops / t / 1e12, c.graph ? "yes" : "no");
            }
            fflush(stdout);
            first_row = false;
        }
    if (json) printf("\n]\n");
    b->ops->host_free(b, s.ids);
    b->ops->host_free(b, s.offsets);
    b->ops->host_free(b, s.out);
    free(lengths);
    free(bench_cold);
    b->ops->stream_destroy(s.latency);
    b->ops->stream_destroy(s.bulk);
    backend_destroy(b);
    if (dir) {
        model_weights_free(&loaded);
        model_config_free(&config);
    } else {
        free_random_model(&random);
    }
    return 0;
}
