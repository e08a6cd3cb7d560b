/* The public API (include/embedrag.h): opens a model directory into an immutable model (config,
 * weight views, tokenizer) and the execution state around it (one backend per device, each with
 * a latency and a bulk lane); resolves prompts, tokenizes on the caller's thread, sorts texts by
 * length and routes each call to the lane where it should finish first. */
#include "engine/engine.h"

#include "backend/backend.h"
#include "engine/lane.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "util/clock.h"
#include "util/error.h"
#include "util/threadpool.h"

#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Backends one model may open: the CPU and, later, one per GPU. */
#define ENGINE_MAX_BACKENDS 9

enum { LANE_LATENCY, LANE_BULK, LANE_KINDS };

/* What never changes after open, shared by every backend and thread. */
typedef struct engine_model {
    model_config config;
    model_weights weights;
    tok_tokenizer *tokenizer;
} engine_model;

typedef struct engine_backend {
    backend *backend;
    lane *lanes[LANE_KINDS];
    bool cpu;
    backend_kind kind;
    /* A GPU that failed is skipped from then on (guarded by the model's route_lock). */
    bool failed;
    char failure[BACKEND_MESSAGE_SIZE];
} engine_backend;

struct embedrag_model {
    engine_model model;
    engine_backend backends[ENGINE_MAX_BACKENDS];
    int backend_count;
    char *gpu_unavailable;      /* why there is no GPU backend, or NULL */
    char *directory;            /* where it was opened from, resolved */
    pthread_mutex_t route_lock; /* the backends' failed flags */
    /* Threads that tokenize a window in parallel, with a GPU backend only (one call at a time:
     * tokenizer_lock); NULL otherwise. */
    threadpool *tokenizer_threads;
    pthread_mutex_t tokenizer_lock;
    /* Texts per window of embedrag_embed: ENGINE_WINDOW_TEXTS, or EMBEDRAG_WINDOW_TEXTS (tests
     * use a small one to cross windows with few texts; each embedding is slow under sanitizers). */
    size_t window_texts;

    /* The latest failure of a call on this model (embedrag_model_last_error). */
    pthread_mutex_t error_lock;
    int error_status;
    char error_message[BACKEND_MESSAGE_SIZE];
};

const char *embedrag_version(void)
{
    return EMBEDRAG_VERSION_STRING;
}

const char *embedrag_status_text(int status)
{
    switch (status) {
    case EMBEDRAG_OK:
        return "ok";
    case EMBEDRAG_ERR_INVALID_ARGUMENT:
        return "invalid argument";
    case EMBEDRAG_ERR_IO:
        return "input/output error";
    case EMBEDRAG_ERR_FORMAT:
        return "malformed file";
    case EMBEDRAG_ERR_UNSUPPORTED:
        return "not supported";
    case EMBEDRAG_ERR_NO_MEMORY:
        return "out of memory";
    case EMBEDRAG_ERR_INVALID_UTF8:
        return "invalid UTF-8";
    case EMBEDRAG_ERR_TOO_LONG:
        return "text too long";
    case EMBEDRAG_ERR_BUSY:
        return "busy";
    case EMBEDRAG_ERR_NOT_FOUND:
        return "not found";
    case EMBEDRAG_ERR_DEVICE:
        return "device failure";
    case EMBEDRAG_ERR_DATABASE:
        return "database error";
    case EMBEDRAG_ERR_MODEL_MISMATCH:
        return "model mismatch";
    }
    return "unknown status";
}

const char *embedrag_last_error(void)
{
    return err_get();
}

long embedrag_last_error_index(void)
{
    return err_text();
}

long embedrag_last_error_text(void)
{
    return err_text();
}

/* Records a failed call's error on the model too, and returns rc. */
static int model_failed(const embedrag_model *m, int rc)
{
    embedrag_model *mutable_model = (embedrag_model *)m; /* the error record is not the model */
    pthread_mutex_lock(&mutable_model->error_lock);
    mutable_model->error_status = rc;
    snprintf(mutable_model->error_message, sizeof mutable_model->error_message, "%s", err_get());
    pthread_mutex_unlock(&mutable_model->error_lock);
    return rc;
}

int embedrag_model_last_error(const embedrag_model *m, char *buffer, size_t size)
{
    if (!m) return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_model_last_error: NULL model");
    embedrag_model *mutable_model = (embedrag_model *)m;
    pthread_mutex_lock(&mutable_model->error_lock);
    int status = m->error_status;
    if (buffer && size) snprintf(buffer, size, "%s", m->error_message);
    pthread_mutex_unlock(&mutable_model->error_lock);
    return status;
}

embedrag_model_params embedrag_model_default_params(void)
{
    embedrag_model_params p = {
        .threads = 0, .precision = EMBEDRAG_PRECISION_AUTO, .device = EMBEDRAG_DEVICE_AUTO};
    return p;
}

embedrag_embed_params embedrag_embed_default_params(void)
{
    embedrag_embed_params p = {.prompt_name = NULL,
                               .prompt = NULL,
                               .normalize = true,
                               .dimensions = 0,
                               .truncate = true,
                               .batch_tokens = 0,
                               .device = EMBEDRAG_DEVICE_AUTO,
                               .lane = EMBEDRAG_LANE_AUTO,
                               .statuses = NULL,
                               .truncate_left = false};
    return p;
}

/* ---- opening ---- */

static void close_backends(embedrag_model *m)
{
    threadpool_destroy(m->tokenizer_threads);
    m->tokenizer_threads = NULL;
    for (int i = 0; i < m->backend_count; i++) {
        for (int k = 0; k < LANE_KINDS; k++) lane_destroy(m->backends[i].lanes[k]);
        backend_destroy(m->backends[i].backend);
    }
    m->backend_count = 0;
}

/* Creates a backend (layers not loaded yet) and its two lanes, appended to m->backends. */
static int add_backend(embedrag_model *m, const backend_params *params)
{
    const model_config *c = &m->model.config;
    engine_backend *e = &m->backends[m->backend_count];
    int rc = backend_create(params, c, &m->model.weights, &e->backend);
    if (rc) return rc;
    int max_len = c->max_position_embeddings;
    rc = lane_create(e->backend, BACKEND_PRIORITY_LATENCY, ENGINE_LATENCY_TOKENS, max_len,
                     c->hidden_size, &e->lanes[LANE_LATENCY]);
    if (!rc)
        rc = lane_create(e->backend, BACKEND_PRIORITY_BULK, e->backend->caps.preferred_batch_tokens,
                         max_len, c->hidden_size, &e->lanes[LANE_BULK]);
    if (rc) {
        for (int k = 0; k < LANE_KINDS; k++) lane_destroy(e->lanes[k]);
        backend_destroy(e->backend);
        memset(e, 0, sizeof *e);
        return rc;
    }
    e->cpu = params->kind == BACKEND_CPU;
    e->kind = params->kind;
    m->backend_count++;
    return 0;
}

/* EMBEDRAG_TEST_FAKE_GPUS=N[:F[:M]] (tests only): N fake GPUs (BACKEND_FAKE_GPU) stand in for
 * the CUDA devices; fake GPU 0 fails every batch after its first F, and each reserves at most M
 * tokens. Returns N (0 when unset). */
static int fake_gpus(int *fail_after, int *memory_tokens)
{
    const char *v = getenv("EMBEDRAG_TEST_FAKE_GPUS");
    *fail_after = -1;
    *memory_tokens = 0;
    if (!v || !*v) return 0;
    int n = 0;
    if (sscanf(v, "%d:%d:%d", &n, fail_after, memory_tokens) < 1 || n < 0) return 0;
    return n < ENGINE_MAX_BACKENDS - 1 ? n : ENGINE_MAX_BACKENDS - 1;
}

/* Opens the backends params->device asks for: always the CPU (the reference, and the fallback),
 * and every GPU found unless only the CPU is wanted; a GPU that cannot open is an error only
 * when GPUs were asked for explicitly and none opened. Then drops the host copies of what every
 * backend has copied. */
static int open_backends(embedrag_model *m, const embedrag_model_params *params)
{
    backend_params cpu = {
        .kind = BACKEND_CPU, .threads = params->threads, .precision = params->precision};
    int rc = add_backend(m, &cpu);
    if (rc) return rc;
    if (params->device == EMBEDRAG_DEVICE_CPU) {
        m->gpu_unavailable = strdup("not asked for (the CPU was)");
    } else {
        int fail_after, memory_tokens;
        int fakes = fake_gpus(&fail_after, &memory_tokens);
        backend_kind kind = fakes ? BACKEND_FAKE_GPU : BACKEND_CUDA;
        int count = fakes ? fakes : backend_device_count(BACKEND_CUDA);
        if (count > ENGINE_MAX_BACKENDS - 1) count = ENGINE_MAX_BACKENDS - 1;
        /* With none found, device 0 is still tried: its error says why there is none. */
        for (int i = 0; i < (count > 0 ? count : 1); i++) {
            backend_params gpu = {.kind = kind,
                                  .device = i,
                                  .precision = params->precision,
                                  .fail_after = i == 0 ? fail_after : -1,
                                  .memory_tokens = memory_tokens};
            rc = add_backend(m, &gpu);
            if (rc && !m->gpu_unavailable) m->gpu_unavailable = strdup(err_get());
        }
        if (m->backend_count > 1) {
            /* Some GPU opened: the others' failures are not why there is none. */
            free(m->gpu_unavailable);
            m->gpu_unavailable = NULL;
        } else if (params->device == EMBEDRAG_DEVICE_GPU) {
            return err_set(rc ? rc : EMBEDRAG_ERR_UNSUPPORTED, "%s",
                           m->gpu_unavailable ? m->gpu_unavailable : "no GPU backend opened");
        }
        err_clear();
    }
    if (!m->gpu_unavailable && m->backend_count == 1)
        m->gpu_unavailable = strdup("no GPU backend opened");
    /* Layer by layer: every backend copies it, then its mapped pages go, so loading holds one
     * layer of the file beside the copies rather than the whole file. */
    const model_weights *w = &m->model.weights;
    for (int l = 0; l < w->layer_count; l++) {
        for (int i = 0; i < m->backend_count; i++) {
            backend *b = m->backends[i].backend;
            rc = b->ops->load_layer(b, w, l);
            if (rc) return err_prefix(rc, "%s backend, layer %d: ", b->caps.name, l);
        }
        model_weights_release_layer(w, l);
    }
    bool embeddings_in_place = false;
    for (int i = 0; i < m->backend_count; i++)
        embeddings_in_place |= m->backends[i].backend->caps.reads_embeddings_in_place;
    if (!embeddings_in_place) {
        model_tensor_release(w, &w->word_emb);
        model_tensor_release(w, &w->position_emb);
        model_tensor_release(w, &w->type_emb);
    }
    return 0;
}

/* EMBEDRAG_DEVICE=cpu|gpu|cuda|auto stands in for a model's EMBEDRAG_DEVICE_AUTO (so a
 * program's default can be changed without rebuilding it); an explicit choice in params wins. */
static int device_from_environment(embedrag_model_params *params)
{
    const char *v = getenv("EMBEDRAG_DEVICE");
    if (params->device != EMBEDRAG_DEVICE_AUTO || !v || !*v || !strcmp(v, "auto")) return 0;
    if (!strcmp(v, "cpu")) {
        params->device = EMBEDRAG_DEVICE_CPU;
    } else if (!strcmp(v, "gpu") || !strcmp(v, "cuda")) {
        params->device = EMBEDRAG_DEVICE_GPU;
    } else {
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                       "EMBEDRAG_DEVICE is '%s'; expected auto, cpu, gpu or cuda", v);
    }
    return 0;
}

/* Runs `count` probe sequences of `len` tokens on a lane `runs` times; returns the fastest
 * run's wall seconds (queueing, staging and post-processing included, as callers see them),
 * or a status (negative, as every EMBEDRAG_ERR_*). */
static double time_probe(lane *l, const model_config *c, int count, int len, int runs)
{
    size_t tokens = (size_t)count * (size_t)len;
    int32_t *ids = malloc(tokens * sizeof *ids);
    int *offsets = malloc(((size_t)count + 1) * sizeof *offsets);
    int *order = malloc((size_t)count * sizeof *order);
    float *out = malloc((size_t)count * (size_t)c->hidden_size * sizeof *out);
    double best = EMBEDRAG_ERR_NO_MEMORY;
    if (ids && offsets && order && out) {
        /* Ids spread over the vocabulary (their values do not change the work). */
        for (size_t t = 0; t < tokens; t++) ids[t] = (int32_t)((1000 + 7919 * t) % c->vocab_size);
        for (int i = 0; i <= count; i++) offsets[i] = i * len;
        for (int i = 0; i < count; i++) order[i] = i;
        best = 0.0;
        for (int r = 0; r < runs; r++) {
            engine_request request = {.ids = ids,
                                      .offsets = offsets,
                                      .order = order,
                                      .count = count,
                                      .out = out,
                                      .dim = c->hidden_size,
                                      .normalize = false};
            double start = clock_seconds();
            int rc = lane_run(l, &request);
            double seconds = clock_seconds() - start;
            if (rc) {
                best = rc;
                break;
            }
            if (r == 0 || seconds < best) best = seconds;
        }
    }
    free(ids);
    free(offsets);
    free(order);
    free(out);
    return best;
}

/* Measures each backend at open (with more than one, the router's choice depends on it): a
 * 16-token query on the latency lane and a batch of 128-token texts on the bulk lane (a quarter
 * of its preferred batch, at most 8,192 tokens), each after a warm-up run that also captures a
 * GPU's graphs; the two times fix the backend's cost line (a fixed part and seconds per FLOP).
 * Takes ~0.1-0.3 s on a 2-core CPU beside a GPU. A backend that fails here is marked failed, as
 * it would be mid-run. */
static int calibrate(embedrag_model *m)
{
    const model_config *c = &m->model.config;
    for (int i = 0; i < m->backend_count; i++) {
        engine_backend *e = &m->backends[i];
        backend *b = e->backend;
        int small_len = c->max_position_embeddings < 16 ? c->max_position_embeddings : 16;
        int large_len = c->max_position_embeddings < 128 ? c->max_position_embeddings : 128;
        int large_tokens = b->caps.preferred_batch_tokens / 4;
        if (large_tokens > 8192) large_tokens = 8192;
        int large_count = large_tokens / large_len > 1 ? large_tokens / large_len : 2;
        double small = time_probe(e->lanes[LANE_LATENCY], c, 1, small_len, 3);
        double large =
            small < 0 ? small : time_probe(e->lanes[LANE_BULK], c, large_count, large_len, 2);
        if (small < 0 || large < 0) {
            if (e->cpu) return (int)(small < 0 ? small : large);
            snprintf(e->failure, sizeof e->failure, "calibration: %s", err_get());
            e->failed = true;
            fprintf(stderr,
                    "embedrag: warning: %s (%s) failed a test batch at open (%s); it is "
                    "not used\n",
                    b->caps.name, b->caps.device, err_get());
            err_clear();
            continue;
        }
        double small_flops = backend_batch_flops(c, small_len, 1, small_len);
        double large_flops =
            backend_batch_flops(c, large_count * large_len, large_count, large_len);
        double per_flop = (large - small) / (large_flops - small_flops);
        if (!(per_flop > 0)) continue; /* noise: keep the backend's own guess */
        double overhead = small - small_flops * per_flop;
        b->ops->set_cost(b, overhead > 0 ? overhead : 0.0, per_flop);
    }
    return 0;
}

/* Most threads that tokenize for a GPU: beyond this, one GPU consumes fewer tokens than they
 * make (a core tokenizes ~2-5 M tokens/s; an H200 embeds ~13 M/s with a 6-layer model). */
#define ENGINE_MAX_TOKENIZER_THREADS 16

/* With a CUDA backend, a pool of tokenizing threads: one per core but two (at most
 * ENGINE_MAX_TOKENIZER_THREADS). The two cores left keep a thread that waits on a GPU and a
 * caller with a query running. With every core tokenizing, queries during a bulk job had p99 3.2
 * ms against p50 0.38 ms on an H200 with 16 cores (a query waiting for a core, we think; a later
 * run with this rule, on 32 cores, had p99 1.1 ms). EMBEDRAG_TOKENIZER_THREADS=N sets the count
 * (1: none), also without a GPU (the tests use it). */
static int open_tokenizer_threads(embedrag_model *m)
{
    int threads = 0;
    for (int i = 0; i < m->backend_count; i++)
        if (m->backends[i].kind == BACKEND_CUDA) threads = threadpool_online_cores() - 2;
    if (threads > ENGINE_MAX_TOKENIZER_THREADS) threads = ENGINE_MAX_TOKENIZER_THREADS;
    const char *v = getenv("EMBEDRAG_TOKENIZER_THREADS");
    if (v && *v) threads = atoi(v);
    if (threads <= 1) return 0;
    return threadpool_create(threads, &m->tokenizer_threads);
}

int embedrag_model_open(const char *dir, const embedrag_model_params *params, embedrag_model **out)
{
    if (!out) return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_model_open: out is NULL");
    *out = NULL;
    if (!dir) return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_model_open: dir is NULL");
    embedrag_model_params defaults = embedrag_model_default_params();
    if (!params) params = &defaults;
    if (params->precision != EMBEDRAG_PRECISION_FP32 &&
        params->precision != EMBEDRAG_PRECISION_BF16 &&
        params->precision != EMBEDRAG_PRECISION_FP16 &&
        params->precision != EMBEDRAG_PRECISION_AUTO)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_model_open: unknown precision %d",
                       (int)params->precision);
    if (params->device != EMBEDRAG_DEVICE_AUTO && params->device != EMBEDRAG_DEVICE_CPU &&
        params->device != EMBEDRAG_DEVICE_GPU)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_model_open: unknown device %d",
                       (int)params->device);
    err_clear();
    embedrag_model *m = calloc(1, sizeof *m);
    if (!m) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory opening %s", dir);
    pthread_mutex_init(&m->error_lock, NULL);
    pthread_mutex_init(&m->route_lock, NULL);
    pthread_mutex_init(&m->tokenizer_lock, NULL);
    engine_model *model = &m->model;
    int rc = model_config_load(dir, &model->config);
    if (rc) goto free_model;
    rc = tok_open(dir, &model->tokenizer);
    if (rc) goto free_config;
    if (tok_vocab_size(model->tokenizer) > model->config.vocab_size) {
        rc = err_set(EMBEDRAG_ERR_FORMAT,
                     "%s: the tokenizer has %d entries but config.json says vocab_size %d", dir,
                     tok_vocab_size(model->tokenizer), model->config.vocab_size);
        goto close_tokenizer;
    }
    rc = model_weights_load(dir, &model->config, &model->weights);
    if (rc) goto close_tokenizer;
    embedrag_model_params chosen = *params;
    rc = device_from_environment(&chosen);
    if (rc) goto close_weights;
    rc = open_backends(m, &chosen);
    if (!rc && m->backend_count > 1) rc = calibrate(m);
    if (!rc) rc = open_tokenizer_threads(m);
    const char *window = getenv("EMBEDRAG_WINDOW_TEXTS");
    m->window_texts = window && atoi(window) > 0 ? (size_t)atoi(window) : ENGINE_WINDOW_TEXTS;
    if (!rc) {
        m->directory = realpath(dir, NULL);
        if (!m->directory) m->directory = strdup(dir);
        if (!m->directory) rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory opening %s", dir);
    }
    if (rc) goto close_backends;
    *out = m;
    return 0;
close_backends:
    close_backends(m);
    free(m->gpu_unavailable);
close_weights:
    model_weights_free(&model->weights);
close_tokenizer:
    tok_close(model->tokenizer);
free_config:
    model_config_free(&model->config);
free_model:
    pthread_mutex_destroy(&m->error_lock);
    pthread_mutex_destroy(&m->route_lock);
    pthread_mutex_destroy(&m->tokenizer_lock);
    free(m);
    return rc;
}

void embedrag_model_close(embedrag_model *m)
{
    if (!m) return;
    close_backends(m);
    free(m->gpu_unavailable);
    free(m->directory);
    model_weights_free(&m->model.weights);
    tok_close(m->model.tokenizer);
    model_config_free(&m->model.config);
    pthread_mutex_destroy(&m->error_lock);
    pthread_mutex_destroy(&m->route_lock);
    pthread_mutex_destroy(&m->tokenizer_lock);
    free(m);
}

/* ---- facts ---- */

int embedrag_model_get_info(const embedrag_model *m, embedrag_model_info *info)
{
    if (!m || !info)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_model_get_info: NULL argument");
    const model_config *c = &m->model.config;
    info->name = c->name;
    info->dimension = c->hidden_size;
    info->max_tokens = c->max_seq_length;
    info->layers = c->num_layers;
    info->hidden = c->hidden_size;
    info->heads = c->num_heads;
    info->vocab_size = c->vocab_size;
    info->pooling = (embedrag_pooling)c->pooling;
    info->normalize = c->normalize;
    info->lowercase = tok_get_options(m->model.tokenizer)->lowercase;
    info->prompt_count = c->prompt_count;
    info->default_prompt_name = c->default_prompt_name;
    info->intermediate = c->intermediate_size;
    info->precision = m->backends[0].backend->caps.precision;
    info->backend_count = m->backend_count;
    return 0;
}

int embedrag_model_get_backend(const embedrag_model *m, int i, embedrag_backend_info *info)
{
    if (!m || !info || i < 0 || i >= m->backend_count)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_model_get_backend: no backend %d",
                       i);
    const backend_caps *caps = &m->backends[i].backend->caps;
    info->name = caps->name;
    info->device = caps->device;
    info->kernels = caps->kernels;
    info->kind = m->backends[i].cpu ? EMBEDRAG_DEVICE_CPU : EMBEDRAG_DEVICE_GPU;
    info->precision = caps->precision;
    info->batch_tokens = caps->preferred_batch_tokens;
    info->max_batch_tokens = caps->max_batch_tokens;
    info->peak_flops = caps->peak_flops;
    embedrag_model *mutable_model = (embedrag_model *)m; /* the lock is not the model */
    pthread_mutex_lock(&mutable_model->route_lock);
    info->failure = m->backends[i].failed ? m->backends[i].failure : NULL;
    pthread_mutex_unlock(&mutable_model->route_lock);
    return 0;
}

int embedrag_model_get_backend_work(const embedrag_model *m, int i, embedrag_lane which,
                                    embedrag_backend_work *work)
{
    if (!m || !work || i < 0 || i >= m->backend_count ||
        (which != EMBEDRAG_LANE_AUTO && which != EMBEDRAG_LANE_LATENCY &&
         which != EMBEDRAG_LANE_BULK))
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                       "embedrag_model_get_backend_work: no backend %d or lane %d", i, (int)which);
    *work = (embedrag_backend_work){0};
    for (int k = 0; k < LANE_KINDS; k++) {
        if ((which == EMBEDRAG_LANE_LATENCY && k != LANE_LATENCY) ||
            (which == EMBEDRAG_LANE_BULK && k != LANE_BULK))
            continue;
        lane_totals t;
        lane_get_totals(m->backends[i].lanes[k], &t);
        work->batches += t.batches;
        work->texts += t.sequences;
        work->tokens += t.tokens;
        work->seconds += t.device_seconds;
    }
    return 0;
}

int embedrag_model_estimate_seconds(const embedrag_model *m, int i, size_t texts,
                                    int tokens_per_text, double *seconds)
{
    if (!m || !seconds || i < 0 || i >= m->backend_count || tokens_per_text < 1 ||
        texts > (size_t)INT_MAX / (size_t)tokens_per_text)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                       "embedrag_model_estimate_seconds: no backend %d or a bad shape", i);
    backend *b = m->backends[i].backend;
    int tokens = (int)texts * tokens_per_text;
    *seconds = texts ? b->ops->estimate_seconds(b, tokens, (int)texts, tokens_per_text) : 0.0;
    return 0;
}

const char *engine_model_directory(const embedrag_model *m)
{
    return m->directory;
}

const struct tok_tokenizer *engine_tokenizer(const embedrag_model *m)
{
    return m->model.tokenizer;
}

const char *embedrag_model_gpu_unavailable(const embedrag_model *m)
{
    return m ? m->gpu_unavailable : NULL;
}

int embedrag_model_get_prompt(const embedrag_model *m, int i, const char **name, const char **text)
{
    if (!m || i < 0 || i >= m->model.config.prompt_count)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_model_get_prompt: no prompt %d", i);
    if (name) *name = m->model.config.prompts[i].name;
    if (text) *text = m->model.config.prompts[i].text;
    return 0;
}

const char *embedrag_token_text(const embedrag_model *m, int32_t id)
{
    return m ? tok_token_text(m->model.tokenizer, id) : NULL;
}

/* ---- parameters and prompts ---- */

/* The prompt text the params ask for: a literal prompt, a named one, the model's default, or
 * none (""). */
static int resolve_prompt(const embedrag_model *m, const embedrag_embed_params *p,
                          const char **prompt)
{
    const model_config *c = &m->model.config;
    *prompt = "";
    if (p->prompt) {
        *prompt = p->prompt;
        return 0;
    }
    const char *name = p->prompt_name ? p->prompt_name : c->default_prompt_name;
    if (!name) return 0;
    for (int i = 0; i < c->prompt_count; i++)
        if (strcmp(c->prompts[i].name, name) == 0) {
            *prompt = c->prompts[i].text;
            return 0;
        }
    char known[256] = "";
    for (int i = 0; i < c->prompt_count; i++) {
        size_t used = strlen(known);
        snprintf(known + used, sizeof known - used, "%s'%s'", i ? ", " : "", c->prompts[i].name);
    }
    return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "unknown prompt '%s' (this model has: %s)", name,
                   c->prompt_count ? known : "no prompts");
}

static int check_params(const embedrag_embed_params *p)
{
    if (p->dimensions < 0)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "dimensions must be >= 0 (got %d)",
                       p->dimensions);
    if (p->batch_tokens < 0)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "batch_tokens must be >= 0 (got %d)",
                       p->batch_tokens);
    if (p->device != EMBEDRAG_DEVICE_AUTO && p->device != EMBEDRAG_DEVICE_CPU &&
        p->device != EMBEDRAG_DEVICE_GPU)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "unknown device %d", (int)p->device);
    if (p->lane != EMBEDRAG_LANE_AUTO && p->lane != EMBEDRAG_LANE_LATENCY &&
        p->lane != EMBEDRAG_LANE_BULK)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "unknown lane %d", (int)p->lane);
    return 0;
}

static int output_dimension(const embedrag_model *m, const embedrag_embed_params *p)
{
    int h = m->model.config.hidden_size;
    return p->dimensions > 0 && p->dimensions < h ? p->dimensions : h;
}

int embedrag_embed_dimension(const embedrag_model *m, const embedrag_embed_params *params)
{
    if (!m)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_embed_dimension: model is NULL");
    embedrag_embed_params defaults = embedrag_embed_default_params();
    if (!params) params = &defaults;
    int rc = check_params(params);
    if (rc) return model_failed(m, rc);
    return output_dimension(m, params);
}

int embedrag_tokenize(const embedrag_model *m, const char *text, size_t length,
                      const embedrag_embed_params *params, int32_t *ids, size_t capacity,
                      size_t *count)
{
    if (!m || (!text && length) || !count || (!ids && capacity))
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_tokenize: NULL argument");
    embedrag_embed_params defaults = embedrag_embed_default_params();
    if (!params) params = &defaults;
    const char *prompt;
    int rc = resolve_prompt(m, params, &prompt);
    if (rc) return model_failed(m, rc);
    int max_tokens = m->model.config.max_seq_length;
    int32_t *buffer = malloc((size_t)max_tokens * sizeof *buffer);
    if (!buffer)
        return model_failed(m, err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory tokenizing"));
    int untruncated = 0;
    int n = (params->truncate_left ? tok_encode_tail : tok_encode)(
        m->model.tokenizer, prompt, text ? text : "", length, buffer, max_tokens, &untruncated);
    if (n < 0) {
        free(buffer);
        return model_failed(m, n);
    }
    if (!params->truncate && untruncated > max_tokens) {
        free(buffer);
        return model_failed(m, err_set(EMBEDRAG_ERR_TOO_LONG,
                                       "the text has %d tokens; the model takes at most %d",
                                       untruncated, max_tokens));
    }
    /* ids may be NULL with capacity 0 (a caller asking only for the count). */
    size_t copy = (size_t)n < capacity ? (size_t)n : capacity;
    if (copy) memcpy(ids, buffer, copy * sizeof *ids);
    *count = (size_t)n;
    free(buffer);
    return 0;
}

/* ---- routing ---- */

static bool backend_matches(const engine_backend *e, embedrag_device device)
{
    return device == EMBEDRAG_DEVICE_AUTO || (device == EMBEDRAG_DEVICE_CPU) == e->cpu;
}

static bool backend_usable(embedrag_model *m, int i, embedrag_device device)
{
    pthread_mutex_lock(&m->route_lock);
    bool usable = !m->backends[i].failed && backend_matches(&m->backends[i], device);
    pthread_mutex_unlock(&m->route_lock);
    return usable;
}

/* Marks a GPU failed after a batch failed on it: one warning line, and from then on its work
 * goes to the other GPUs or the CPU. */
static void backend_failed(embedrag_model *m, int i, const char *why)
{
    engine_backend *e = &m->backends[i];
    pthread_mutex_lock(&m->route_lock);
    bool first = !e->failed;
    if (first) {
        e->failed = true;
        snprintf(e->failure, sizeof e->failure, "%s", why);
    }
    int left = 0;
    for (int j = 0; j < m->backend_count; j++)
        left += !m->backends[j].failed && !m->backends[j].cpu;
    pthread_mutex_unlock(&m->route_lock);
    if (first)
        fprintf(stderr, "embedrag: warning: %s (%s) failed: %s; its work goes to %s\n",
                e->backend->caps.name, e->backend->caps.device, why,
                left ? "the other GPUs" : "the CPU");
}

static int lane_kind(const embedrag_embed_params *p, int tokens)
{
    return p->lane == EMBEDRAG_LANE_LATENCY  ? LANE_LATENCY
           : p->lane == EMBEDRAG_LANE_BULK   ? LANE_BULK
           : tokens <= ENGINE_LATENCY_TOKENS ? LANE_LATENCY
                                             : LANE_BULK;
}

/* The backend whose lane of this kind should finish a call of this shape first, among the
 * usable backends the call may use (queued work counted); -1 when none. */
static int route(embedrag_model *m, const embedrag_embed_params *p, int kind, int tokens,
                 int sequences, int max_len)
{
    int best = -1;
    double best_seconds = 0.0;
    for (int i = 0; i < m->backend_count; i++) {
        if (!backend_usable(m, i, p->device)) continue;
        double seconds = lane_cost_seconds(m->backends[i].lanes[kind], tokens, sequences, max_len);
        if (best < 0 || seconds < best_seconds) {
            best = i;
            best_seconds = seconds;
        }
    }
    return best;
}

static int no_backend(embedrag_model *m, embedrag_device device)
{
    if (device != EMBEDRAG_DEVICE_GPU)
        return err_set(EMBEDRAG_ERR_DEVICE, "no backend is left to run on");
    for (int i = 0; i < m->backend_count; i++)
        if (!m->backends[i].cpu && m->backends[i].failed)
            return err_set(EMBEDRAG_ERR_DEVICE, "no GPU is left to run on (%s failed: %s)",
                           m->backends[i].backend->caps.name, m->backends[i].failure);
    return err_set(EMBEDRAG_ERR_UNSUPPORTED, "no GPU backend to run on: %s",
                   m->gpu_unavailable ? m->gpu_unavailable : "none opened");
}

static int run_order(embedrag_model *m, const embedrag_embed_params *p, const engine_request *base,
                     const int *order, int count, const int *lengths);

/* The least work worth a GPU of its own in a shared call: below ~16k tokens (about a millisecond
 * on an H200) a piece costs more in hand-offs and half-empty batches than a second GPU saves
 * (measured: 50 texts of 50 tokens took 1.06 ms on two GPUs against 0.37 ms on one). */
#define ENGINE_SHARE_MIN_TOKENS 16384

/* A call that asks for small batches (batch_tokens) may share pieces of two of them. */
static long share_min_tokens(const engine_request *base)
{
    long asked = 2L * base->batch_tokens;
    return base->batch_tokens > 0 && asked < ENGINE_SHARE_MIN_TOKENS ? asked
                                                                     : ENGINE_SHARE_MIN_TOKENS;
}

/* Bulk work shared by several GPUs: the sequences (longest first) are cut into pieces of about
 * a batch each, and one worker per GPU (the calling thread is the first) takes pieces until
 * none is left, so faster or less loaded GPUs take more. A GPU whose piece fails is marked
 * failed and its piece goes back; pieces no GPU finished go through run_order again (the
 * remaining GPUs, else the CPU). */
typedef struct share {
    embedrag_model *m;
    const engine_request *base;
    const int *order;
    const int *starts; /* piece k is order[starts[k] .. starts[k + 1]) */
    int pieces;
    pthread_mutex_t lock;
    int next;
    bool *done; /* per piece */
} share;

typedef struct share_worker {
    share *share;
    int backend;
    pthread_t thread;
    bool started;
} share_worker;

static void *share_work(void *arg)
{
    share_worker *w = arg;
    share *sh = w->share;
    lane *l = sh->m->backends[w->backend].lanes[LANE_BULK];
    for (;;) {
        pthread_mutex_lock(&sh->lock);
        int k = sh->next < sh->pieces ? sh->next++ : -1;
        pthread_mutex_unlock(&sh->lock);
        if (k < 0) break;
        engine_request r = *sh->base;
        r.order = sh->order + sh->starts[k];
        r.count = sh->starts[k + 1] - sh->starts[k];
        if (lane_run(l, &r)) {
            backend_failed(sh->m, w->backend, err_get());
            err_clear();
            break;
        }
        pthread_mutex_lock(&sh->lock);
        if (r.device_sink) *r.device_sink += r.device_seconds;
        sh->done[k] = true;
        pthread_mutex_unlock(&sh->lock);
    }
    return NULL;
}

static int run_shared(embedrag_model *m, const embedrag_embed_params *p, const engine_request *base,
                      const int *order, int count, const int *lengths, const int *gpus,
                      int gpu_count)
{
    /* Pieces of about a quarter of each GPU's share, at most a batch, at least
     * ENGINE_SHARE_MIN_TOKENS (and the longest sequence). */
    long total = 0;
    for (int i = 0; i < count; i++) total += lengths[i];
    long piece = total / (4L * gpu_count);
    if (piece < share_min_tokens(base)) piece = share_min_tokens(base);
    long budget = base->batch_tokens > 0
                      ? base->batch_tokens
                      : m->backends[gpus[0]].backend->caps.preferred_batch_tokens;
    if (piece > budget) piece = budget;
    int *starts = malloc(((size_t)count + 1) * sizeof *starts);
    bool *done = calloc((size_t)count + 1, sizeof *done);
    int *left = malloc(((size_t)count + 1) * sizeof *left);
    int *left_lengths = malloc(((size_t)count + 1) * sizeof *left_lengths);
    share_worker *workers = calloc((size_t)gpu_count, sizeof *workers);
    int rc = 0;
    if (!starts || !done || !left || !left_lengths || !workers) {
        rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory sharing %d texts", count);
        goto free_buffers;
    }
    share sh = {.m = m, .base = base, .order = order, .starts = starts, .done = done};
    starts[0] = 0;
    long in_piece = 0;
    for (int i = 0; i < count; i++) {
        if (in_piece > 0 && in_piece + lengths[i] > piece) {
            starts[++sh.pieces] = i;
            in_piece = 0;
        }
        in_piece += lengths[i];
    }
    starts[++sh.pieces] = count;
    pthread_mutex_init(&sh.lock, NULL);
    for (int g = 0; g < gpu_count; g++) {
        workers[g] = (share_worker){.share = &sh, .backend = gpus[g]};
        if (g > 0)
            workers[g].started =
                pthread_create(&workers[g].thread, NULL, share_work, &workers[g]) == 0;
    }
    share_work(&workers[0]);
    for (int g = 1; g < gpu_count; g++)
        if (workers[g].started) pthread_join(workers[g].thread, NULL);
    pthread_mutex_destroy(&sh.lock);
    /* Whatever no GPU finished goes round again. */
    int n = 0;
    for (int k = 0; k < sh.pieces; k++)
        if (!done[k])
            for (int i = starts[k]; i < starts[k + 1]; i++) {
                left_lengths[n] = lengths[i];
                left[n++] = order[i];
            }
    if (n) rc = run_order(m, p, base, left, n, left_lengths);
free_buffers:
    free(starts);
    free(done);
    free(left);
    free(left_lengths);
    free(workers);
    return rc;
}

/* Runs the sequences order[0 .. count) (lengths[i] tokens each) where the router sends them:
 * a GPU's bulk call is shared among every usable GPU; a call that fails on a GPU is run again
 * elsewhere (the GPU is marked failed), so no request is lost while the CPU works. */
static int run_order(embedrag_model *m, const embedrag_embed_params *p, const engine_request *base,
                     const int *order, int count, const int *lengths)
{
    int tokens = 0, max_len = 0;
    for (int i = 0; i < count; i++) {
        tokens += lengths[i];
        max_len = lengths[i] > max_len ? lengths[i] : max_len;
    }
    int kind = lane_kind(p, tokens);
    for (;;) {
        int best = route(m, p, kind, tokens, count, max_len);
        if (best < 0) return no_backend(m, p->device);
        int rc;
        int gpus[ENGINE_MAX_BACKENDS], gpu_count = 0;
        if (kind == LANE_BULK && !m->backends[best].cpu) {
            gpus[gpu_count++] = best;
            for (int i = 0; i < m->backend_count; i++)
                if (i != best && !m->backends[i].cpu && backend_usable(m, i, p->device))
                    gpus[gpu_count++] = i;
        }
        if (gpu_count > 1 && count > 1 && tokens >= 2 * share_min_tokens(base)) {
            return run_shared(m, p, base, order, count, lengths, gpus, gpu_count);
        } else {
            engine_request r = *base;
            r.order = order;
            r.count = count;
            rc = lane_run(m->backends[best].lanes[kind], &r);
            if (!rc && r.device_sink) *r.device_sink += r.device_seconds;
        }
        if (!rc || m->backends[best].cpu) return rc;
        backend_failed(m, best, err_get());
        err_clear();
    }
}

typedef struct seq_ref {
    int index; /* position in the caller's order */
    int len;
} seq_ref;

static int by_length_descending(const void *a, const void *b)
{
    const seq_ref *x = a, *y = b;
    if (x->len != y->len) return y->len - x->len;
    return x->index - y->index;
}

/* Runs `count` of the window's sequences (those with run[i]) longest first (equal lengths
 * together keep attention tasks even) where the router sends them. */
static int run_sequences(embedrag_model *m, const int32_t *ids, const int *offsets, int count,
                         const bool *run, const int *pool_skip, const embedrag_embed_params *p,
                         float *out, double *device_seconds)
{
    size_t slots = (size_t)(count > 0 ? count : 1);
    seq_ref *refs = malloc(slots * sizeof *refs);
    int *order = malloc(slots * sizeof *order);
    int *lengths = malloc(slots * sizeof *lengths);
    int rc = 0;
    if (!refs || !order || !lengths) {
        rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory batching %d texts", count);
        goto free_buffers;
    }
    int n = 0;
    for (int i = 0; i < count; i++) {
        if (run && !run[i]) continue;
        refs[n++] = (seq_ref){.index = i, .len = offsets[i + 1] - offsets[i]};
    }
    qsort(refs, (size_t)n, sizeof *refs, by_length_descending);
    for (int i = 0; i < n; i++) {
        order[i] = refs[i].index;
        lengths[i] = refs[i].len;
    }
    engine_request base = {.ids = ids,
                           .offsets = offsets,
                           .pool_skip = pool_skip,
                           .batch_tokens = p->batch_tokens,
                           .out = out,
                           .dim = output_dimension(m, p),
                           .normalize = p->normalize,
                           .device_sink = device_seconds};
    rc = n ? run_order(m, p, &base, order, n, lengths) : 0;
free_buffers:
    free(refs);
    free(order);
    free(lengths);
    return rc;
}

int engine_embed_tokens(embedrag_model *m, const int32_t *ids, const int *offsets, int count,
                        const int *pool_skip, const embedrag_embed_params *params, float *out)
{
    return engine_embed_tokens_timed(m, ids, offsets, count, pool_skip, params, out, NULL);
}

int engine_embed_tokens_timed(embedrag_model *m, const int32_t *ids, const int *offsets, int count,
                              const int *pool_skip, const embedrag_embed_params *params, float *out,
                              double *device_seconds)
{
    if (!m || count < 0 || (count && (!ids || !offsets || !out)))
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "engine_embed_tokens: NULL argument");
    embedrag_embed_params defaults = embedrag_embed_default_params();
    if (!params) params = &defaults;
    int rc = check_params(params);
    if (rc) return model_failed(m, rc);
    const model_config *c = &m->model.config;
    for (int s = 0; s < count; s++) {
        int len = offsets[s + 1] - offsets[s];
        if (len < 1 || len > c->max_position_embeddings)
            return model_failed(m, err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                                           "sequence %d has %d tokens (the model takes 1 to %d)", s,
                                           len, c->max_position_embeddings));
        for (int t = offsets[s]; t < offsets[s + 1]; t++)
            if (ids[t] < 0 || ids[t] >= c->vocab_size)
                return model_failed(m, err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                                               "token id %d out of range (vocabulary of %d)",
                                               ids[t], c->vocab_size));
    }
    if (device_seconds) *device_seconds = 0.0;
    rc = run_sequences(m, ids, offsets, count, NULL, pool_skip, params, out, device_seconds);
    return rc ? model_failed(m, rc) : 0;
}

int embedrag_embed_tokens(embedrag_model *m, const int32_t *ids, const size_t *offsets, size_t n,
                          const embedrag_embed_params *params, float *out)
{
    return engine_embed_tokens_sized_timed(m, ids, offsets, n, params, out, NULL);
}

int engine_embed_tokens_sized_timed(embedrag_model *m, const int32_t *ids, const size_t *offsets,
                                    size_t n, const embedrag_embed_params *params, float *out,
                                    double *device_seconds)
{
    if (device_seconds) *device_seconds = 0.0;
    if (!m || (n && (!ids || !offsets || !out)))
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_embed_tokens: NULL argument");
    if (n == 0) return 0;
    /* The engine counts in int: a call holds fewer than 2^31 ids and sequences. */
    if (n >= INT_MAX || offsets[n] < offsets[0] || offsets[n] - offsets[0] >= INT_MAX)
        return model_failed(m, err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                                       "embedrag_embed_tokens: a call holds fewer than 2^31 ids"));
    int *narrow = malloc((n + 1) * sizeof *narrow);
    if (!narrow) return model_failed(m, err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory"));
    for (size_t i = 0; i <= n; i++) {
        if (i > 0 && offsets[i] < offsets[i - 1]) {
            free(narrow);
            return model_failed(m, err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                                           "embedrag_embed_tokens: offsets decrease at %zu", i));
        }
        narrow[i] = (int)(offsets[i] - offsets[0]);
    }
    int rc = engine_embed_tokens_timed(m, ids + offsets[0], narrow, (int)n, NULL, params, out,
                                       device_seconds);
    free(narrow);
    return rc;
}

/* ---- embedding texts ---- */

/* Fills a skipped text's row with NaN, so that it cannot pass for a vector. */
static void fill_nan(float *row, int dim)
{
    for (int i = 0; i < dim; i++) row[i] = NAN;
}

/* One window's tokenization: text base + i goes to ids + i * max_tokens; got[i] is its token
 * count or a status (negative), and the message of the first failing text is kept. */
typedef struct tokenize_job {
    embedrag_model *m;
    const char *prompt;
    const char *const *texts;
    const size_t *lengths;
    size_t base;
    int count, max_tokens;
    bool truncate, truncate_left;
    int32_t *ids;
    int *got;
    pthread_mutex_t *lock; /* when tokenizing on several threads */
    size_t first_bad;      /* index in the window of the first failing text (count: none) */
    char message[BACKEND_MESSAGE_SIZE];
} tokenize_job;

/* Texts per tokenizing task: enough to amortize the hand-out, few enough to balance. */
#define TOKENIZE_TASK_TEXTS 32

static void tokenize_texts(void *ctx, int task, int thread)
{
    (void)thread;
    tokenize_job *job = ctx;
    int first = task * TOKENIZE_TASK_TEXTS;
    int last = first + TOKENIZE_TASK_TEXTS < job->count ? first + TOKENIZE_TASK_TEXTS : job->count;
    for (int i = first; i < last; i++) {
        size_t at = job->base + (size_t)i;
        const char *text = job->texts[at];
        int got;
        if (!text) {
            got = err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "text %zu is NULL", at);
        } else {
            size_t len = job->lengths ? job->lengths[at] : strlen(text);
            int untruncated = 0;
            got = (job->truncate_left ? tok_encode_tail : tok_encode)(
                job->m->model.tokenizer, job->prompt, text, len,
                job->ids + (size_t)i * (size_t)job->max_tokens, job->max_tokens, &untruncated);
            if (got < 0)
                got = err_prefix(got, "text %zu: ", at);
            else if (!job->truncate && untruncated > job->max_tokens)
                got = err_set(EMBEDRAG_ERR_TOO_LONG,
                              "text %zu has %d tokens; the model takes at most %d "
                              "(truncation is off)",
                              at, untruncated, job->max_tokens);
        }
        job->got[i] = got;
        if (got >= 0) continue;
        if (job->lock) pthread_mutex_lock(job->lock);
        if ((size_t)i < job->first_bad) {
            job->first_bad = (size_t)i;
            snprintf(job->message, sizeof job->message, "%s", err_get());
        }
        if (job->lock) pthread_mutex_unlock(job->lock);
    }
}

/* Tokenizes a window: on the model's tokenizer threads when it has them (a GPU consumes tokens
 * faster than one core makes them) and no other call holds them, else on the calling thread. */
static void tokenize_window(embedrag_model *m, tokenize_job *job)
{
    job->first_bad = (size_t)job->count;
    job->message[0] = '\0';
    job->lock = NULL;
    int tasks = (job->count + TOKENIZE_TASK_TEXTS - 1) / TOKENIZE_TASK_TEXTS;
    if (m->tokenizer_threads && tasks > 1 && pthread_mutex_trylock(&m->tokenizer_lock) == 0) {
        pthread_mutex_t lock;
        pthread_mutex_init(&lock, NULL);
        job->lock = &lock;
        threadpool_run(m->tokenizer_threads, tasks, tokenize_texts, job);
        job->lock = NULL;
        pthread_mutex_destroy(&lock);
        pthread_mutex_unlock(&m->tokenizer_lock);
        return;
    }
    for (int t = 0; t < tasks; t++) tokenize_texts(job, t, 0);
}

/* A window's buffers: its texts' token slots (max_tokens each, closed up into ids before the
 * run), offsets, pool skips, which texts run, and the tokenizing job that fills them. */
typedef struct window_slot {
    int32_t *ids;
    int *offsets, *skips, *got;
    bool *run;
    tokenize_job job;
} window_slot;

/* Windows tokenized ahead on a second thread (with a GPU: the next window's tokens are made while
 * the GPU runs this one). The caller takes window k once `tokenized` > k and frees its slot by
 * raising `consumed`; the producer stays at most two windows ahead, and stops when told. */
typedef struct window_pipeline {
    embedrag_model *m;
    window_slot *slots;
    size_t n, window, windows;
    pthread_mutex_t lock;
    pthread_cond_t changed;
    size_t tokenized, consumed;
    bool stop;
} window_pipeline;

static void tokenize_window_at(embedrag_model *m, window_slot *slot, size_t base, size_t count)
{
    slot->job.base = base;
    slot->job.count = (int)count;
    tokenize_window(m, &slot->job);
}

static void *window_producer(void *arg)
{
    window_pipeline *pl = arg;
    for (size_t k = 0; k < pl->windows; k++) {
        pthread_mutex_lock(&pl->lock);
        while (!pl->stop && k >= pl->consumed + 2) pthread_cond_wait(&pl->changed, &pl->lock);
        bool stop = pl->stop;
        pthread_mutex_unlock(&pl->lock);
        if (stop) break;
        size_t base = k * pl->window;
        size_t count = pl->n - base < pl->window ? pl->n - base : pl->window;
        tokenize_window_at(pl->m, &pl->slots[k % 2], base, count);
        pthread_mutex_lock(&pl->lock);
        pl->tokenized = k + 1;
        pthread_cond_broadcast(&pl->changed);
        pthread_mutex_unlock(&pl->lock);
    }
    return NULL;
}

static void free_slot(window_slot *slot)
{
    free(slot->ids);
    free(slot->offsets);
    free(slot->skips);
    free(slot->got);
    free(slot->run);
}

int embedrag_embed(embedrag_model *m, const char *const *texts, const size_t *lengths, size_t n,
                   const embedrag_embed_params *params, float *out)
{
    if (!m || (n && (!texts || !out)))
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_embed: NULL argument");
    embedrag_embed_params defaults = embedrag_embed_default_params();
    if (!params) params = &defaults;
    int rc = check_params(params);
    if (rc) return model_failed(m, rc);
    const char *prompt;
    rc = resolve_prompt(m, params, &prompt);
    if (rc) return model_failed(m, rc);
    const model_config *c = &m->model.config;
    int dim = output_dimension(m, params);
    int max_tokens = c->max_seq_length;
    int skip = 0;
    if (!c->pooling_include_prompt && prompt[0]) skip = 1 + tok_count(m->model.tokenizer, prompt);

    /* With statuses: the first bad text's error, raised again at the end. */
    int first_status = 0;
    size_t first_index = 0;
    char *first_message = NULL;
    size_t window = n < m->window_texts ? n : m->window_texts;
    size_t windows = window ? (n + window - 1) / window : 0;
    /* Tokenizing ahead pays where the model runs on a GPU (it has tokenizer threads) and there is
     * a next window; on the CPU the cores are the model's. */
    bool ahead = m->tokenizer_threads && windows > 1;
    size_t slot_texts = window ? window : 1;
    window_slot slots[2] = {{0}};
    pthread_t producer;
    bool producing = false;
    window_pipeline pipeline = {
        .m = m, .slots = slots, .n = n, .window = window, .windows = windows};
    pthread_mutex_init(&pipeline.lock, NULL);
    pthread_cond_init(&pipeline.changed, NULL);
    for (int k = 0; k < (ahead ? 2 : 1); k++) {
        window_slot *slot = &slots[k];
        slot->ids = malloc(slot_texts * (size_t)max_tokens * sizeof *slot->ids);
        slot->offsets = malloc((slot_texts + 1) * sizeof *slot->offsets);
        slot->skips = malloc(slot_texts * sizeof *slot->skips);
        slot->got = malloc(slot_texts * sizeof *slot->got);
        slot->run = malloc(slot_texts * sizeof *slot->run);
        if (!slot->ids || !slot->offsets || !slot->skips || !slot->got || !slot->run) {
            rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory embedding %zu texts", n);
            goto free_buffers;
        }
        slot->job = (tokenize_job){.m = m,
                                   .prompt = prompt,
                                   .texts = texts,
                                   .lengths = lengths,
                                   .max_tokens = max_tokens,
                                   .truncate = params->truncate,
                                   .truncate_left = params->truncate_left,
                                   .ids = slot->ids,
                                   .got = slot->got};
    }
    if (ahead) producing = pthread_create(&producer, NULL, window_producer, &pipeline) == 0;
    ahead = producing; /* without a thread, each window is tokenized in turn */
    for (size_t k = 0; k < windows; k++) {
        size_t base = k * window;
        size_t count = n - base < window ? n - base : window;
        window_slot *slot = &slots[ahead ? k % 2 : 0];
        if (ahead) {
            pthread_mutex_lock(&pipeline.lock);
            while (pipeline.tokenized <= k) pthread_cond_wait(&pipeline.changed, &pipeline.lock);
            pthread_mutex_unlock(&pipeline.lock);
        } else {
            tokenize_window_at(m, slot, base, count);
        }
        const tokenize_job *job = &slot->job;
        int32_t *ids = slot->ids;
        int *offsets = slot->offsets, *got = slot->got;
        offsets[0] = 0;
        for (size_t i = 0; i < count; i++) {
            size_t at = base + i;
            int status = got[i] < 0 ? got[i] : 0, tokens = got[i] < 0 ? 0 : got[i];
            if (status) {
                /* Only the window's first failure's message is kept: it is the one reported. */
                if (i == job->first_bad) err_set(status, "%s", job->message);
                if (!params->statuses) {
                    err_set_text(at);
                    rc = status;
                    goto free_buffers;
                }
                if (!first_status) {
                    first_status = status;
                    first_index = at;
                    first_message = strdup(job->message);
                }
                fill_nan(out + at * (size_t)dim, dim);
            }
            if (params->statuses) params->statuses[at] = status;
            slot->run[i] = status == 0;
            /* Close the gaps between the texts' slots (each text was tokenized into its own). */
            if (tokens && offsets[i] != (int)i * max_tokens)
                memmove(ids + offsets[i], ids + i * (size_t)max_tokens,
                        (size_t)tokens * sizeof *ids);
            offsets[i + 1] = offsets[i] + tokens;
            slot->skips[i] = skip;
        }
        rc = run_sequences(m, ids, offsets, (int)count, slot->run, skip ? slot->skips : NULL,
                           params, out + base * (size_t)dim, NULL);
        if (rc) goto free_buffers;
        if (ahead) {
            pthread_mutex_lock(&pipeline.lock);
            pipeline.consumed = k + 1;
            pthread_cond_broadcast(&pipeline.changed);
            pthread_mutex_unlock(&pipeline.lock);
        }
    }
    if (first_status) {
        err_set(first_status, "%s", first_message ? first_message : "a text failed");
        err_set_text(first_index);
    }
free_buffers:
    if (producing) {
        pthread_mutex_lock(&pipeline.lock);
        pipeline.stop = true;
        pthread_cond_broadcast(&pipeline.changed);
        pthread_mutex_unlock(&pipeline.lock);
        pthread_join(producer, NULL);
    }
    pthread_mutex_destroy(&pipeline.lock);
    pthread_cond_destroy(&pipeline.changed);
    free_slot(&slots[0]);
    free_slot(&slots[1]);
    free(first_message);
    return rc ? model_failed(m, rc) : 0;
}
