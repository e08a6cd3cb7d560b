/* The public API (include/embedrag.h): opens a model directory, resolves prompts, tokenizes,
 * sorts texts by length and cuts them into token-budget batches for the backend, then truncates
 * (Matryoshka) and normalizes the pooled vectors and puts them back in the caller's order. */
#include "engine/engine.h"

#include "backend/backend.h"
#include "backend/cpu/kernels.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct embedrag_model {
    model_config config;
    model_weights weights;
    tok_tokenizer *tokenizer;
    backend *cpu;
    pthread_mutex_t lock; /* serializes forward passes: the backend's buffers are shared */
};

const char *embedrag_version(void)
{
    return EMBEDRAG_VERSION_STRING;
}

const char *embedrag_last_error(void)
{
    return err_get();
}

long embedrag_last_error_text(void)
{
    return err_text();
}

embedrag_model_params embedrag_model_default_params(void)
{
    embedrag_model_params p = {.threads = 0, .precision = EMBEDRAG_PRECISION_FP32};
    return p;
}

embedrag_embed_params embedrag_embed_default_params(void)
{
    embedrag_embed_params p = {.prompt_name = NULL,
                               .prompt = NULL,
                               .normalize = true,
                               .dimensions = 0,
                               .truncate = true,
                               .batch_tokens = 0};
    return p;
}

int embedrag_model_open(const char *dir, const embedrag_model_params *params, embedrag_model **out)
{
    if (!out) return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_model_open: out is NULL");
    *out = NULL;
    if (!dir) return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_model_open: dir is NULL");
    embedrag_model_params defaults = embedrag_model_default_params();
    if (!params) params = &defaults;
    if (params->precision != EMBEDRAG_PRECISION_FP32 &&
        params->precision != EMBEDRAG_PRECISION_BF16)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_model_open: unknown precision %d",
                       (int)params->precision);
    err_clear();
    embedrag_model *m = calloc(1, sizeof *m);
    if (!m) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory opening %s", dir);
    int rc = model_config_load(dir, &m->config);
    if (rc) goto free_model;
    rc = tok_open(dir, &m->tokenizer);
    if (rc) goto free_config;
    if (tok_vocab_size(m->tokenizer) > m->config.vocab_size) {
        rc = err_set(EMBEDRAG_ERR_FORMAT,
                     "%s: the tokenizer has %d entries but config.json says vocab_size %d", dir,
                     tok_vocab_size(m->tokenizer), m->config.vocab_size);
        goto close_tokenizer;
    }
    rc = model_weights_load(dir, &m->config, &m->weights);
    if (rc) goto close_tokenizer;
    rc = cpu_backend_create(&m->config, &m->weights, params->threads, params->precision, &m->cpu);
    if (rc) goto free_weights;
    pthread_mutex_init(&m->lock, NULL);
    *out = m;
    return 0;
free_weights:
    model_weights_free(&m->weights);
close_tokenizer:
    tok_close(m->tokenizer);
free_config:
    model_config_free(&m->config);
free_model:
    free(m);
    return rc;
}

void embedrag_model_close(embedrag_model *m)
{
    if (!m) return;
    m->cpu->destroy(m->cpu);
    model_weights_free(&m->weights);
    tok_close(m->tokenizer);
    model_config_free(&m->config);
    pthread_mutex_destroy(&m->lock);
    free(m);
}

int embedrag_model_get_info(const embedrag_model *m, embedrag_model_info *info)
{
    if (!m || !info)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_model_get_info: NULL argument");
    const model_config *c = &m->config;
    info->name = c->name;
    info->dimension = c->hidden_size;
    info->max_tokens = c->max_seq_length;
    info->layers = c->num_layers;
    info->hidden = c->hidden_size;
    info->heads = c->num_heads;
    info->vocab_size = c->vocab_size;
    info->pooling = (embedrag_pooling)c->pooling;
    info->normalize = c->normalize;
    info->lowercase = tok_get_options(m->tokenizer)->lowercase;
    info->prompt_count = c->prompt_count;
    info->default_prompt_name = c->default_prompt_name;
    info->intermediate = c->intermediate_size;
    info->precision = m->cpu->precision;
    return 0;
}

int embedrag_model_get_prompt(const embedrag_model *m, int i, const char **name, const char **text)
{
    if (!m || i < 0 || i >= m->config.prompt_count)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_model_get_prompt: no prompt %d", i);
    if (name) *name = m->config.prompts[i].name;
    if (text) *text = m->config.prompts[i].text;
    return 0;
}

const char *embedrag_token_text(const embedrag_model *m, int32_t id)
{
    return m ? tok_token_text(m->tokenizer, id) : NULL;
}

const char *engine_backend_name(const embedrag_model *m)
{
    return m->cpu->name;
}

const char *engine_cpu_isa(void)
{
    return cpu_kernels_isa();
}

/* The prompt text the params ask for: a literal prompt, a named one, the model's default, or
 * none (""). */
static int resolve_prompt(const embedrag_model *m, const embedrag_embed_params *p,
                          const char **prompt)
{
    *prompt = "";
    if (p->prompt) {
        *prompt = p->prompt;
        return 0;
    }
    const char *name = p->prompt_name ? p->prompt_name : m->config.default_prompt_name;
    if (!name) return 0;
    for (int i = 0; i < m->config.prompt_count; i++)
        if (strcmp(m->config.prompts[i].name, name) == 0) {
            *prompt = m->config.prompts[i].text;
            return 0;
        }
    char known[256] = "";
    for (int i = 0; i < m->config.prompt_count; i++) {
        size_t used = strlen(known);
        snprintf(known + used, sizeof known - used, "%s'%s'", i ? ", " : "",
                 m->config.prompts[i].name);
    }
    return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "unknown prompt '%s' (this model has: %s)", name,
                   m->config.prompt_count ? known : "no prompts");
}

static int check_params(const embedrag_model *m, const embedrag_embed_params *p)
{
    if (p->dimensions < 0)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "dimensions must be >= 0 (got %d)",
                       p->dimensions);
    if (p->batch_tokens < 0)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "batch_tokens must be >= 0 (got %d)",
                       p->batch_tokens);
    return 0;
}

int embedrag_embed_dimension(const embedrag_model *m, const embedrag_embed_params *params)
{
    if (!m)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_embed_dimension: model is NULL");
    embedrag_embed_params defaults = embedrag_embed_default_params();
    if (!params) params = &defaults;
    int rc = check_params(m, params);
    if (rc) return rc;
    int h = m->config.hidden_size;
    return params->dimensions > 0 && params->dimensions < h ? params->dimensions : h;
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
    if (rc) return rc;
    int max_tokens = m->config.max_seq_length;
    int32_t *buffer = malloc((size_t)max_tokens * sizeof *buffer);
    if (!buffer) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory tokenizing");
    int untruncated = 0;
    int n = tok_encode(m->tokenizer, prompt, text ? text : "", length, buffer, max_tokens,
                       &untruncated);
    if (n < 0) {
        free(buffer);
        return n;
    }
    if (!params->truncate && untruncated > max_tokens) {
        free(buffer);
        return err_set(EMBEDRAG_ERR_TOO_LONG, "the text has %d tokens; the model takes at most %d",
                       untruncated, max_tokens);
    }
    memcpy(ids, buffer, (size_t)(n < (int)capacity ? n : (int)capacity) * sizeof *ids);
    *count = (size_t)n;
    free(buffer);
    return 0;
}

/* Writes the final vector: the first `dim` components, L2-normalized if asked. */
static void finish_vector(const float *pooled, int dim, bool normalize, float *out)
{
    if (!normalize) {
        memcpy(out, pooled, (size_t)dim * sizeof(float));
        return;
    }
    double sum = 0.0;
    for (int i = 0; i < dim; i++) sum += (double)pooled[i] * (double)pooled[i];
    /* As torch.nn.functional.normalize: divide by max(norm, 1e-12). */
    double norm = sqrt(sum);
    float inv = (float)(1.0 / (norm > 1e-12 ? norm : 1e-12));
    for (int i = 0; i < dim; i++) out[i] = pooled[i] * inv;
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

/* Runs the sequences through the backend in token-budget batches, longest first (equal lengths
 * together keep attention tasks even), and writes each finished vector to out[index]. */
static int run_batches(embedrag_model *m, const int32_t *ids, const int *offsets, int count,
                       const int *pool_skip, const embedrag_embed_params *p, float *out)
{
    int h = m->config.hidden_size;
    int dim = embedrag_embed_dimension(m, p);
    int budget = p->batch_tokens > 0 ? p->batch_tokens : ENGINE_DEFAULT_BATCH_TOKENS;
    if (budget < m->config.max_seq_length) budget = m->config.max_seq_length;
    int rc = 0;
    seq_ref *order = malloc((size_t)(count > 0 ? count : 1) * sizeof *order);
    int32_t *batch_ids = malloc((size_t)budget * sizeof *batch_ids);
    int *batch_offsets = malloc((size_t)(count + 1) * sizeof *batch_offsets);
    int *batch_skip = malloc((size_t)(count > 0 ? count : 1) * sizeof *batch_skip);
    float *pooled = malloc((size_t)(count > 0 ? count : 1) * (size_t)h * sizeof *pooled);
    if (!order || !batch_ids || !batch_offsets || !batch_skip || !pooled) {
        rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory batching %d texts", count);
        goto free_buffers;
    }
    for (int i = 0; i < count; i++) {
        order[i].index = i;
        order[i].len = offsets[i + 1] - offsets[i];
    }
    qsort(order, (size_t)count, sizeof *order, by_length_descending);
    for (int first = 0; first < count;) {
        int n = 0, tokens = 0;
        batch_offsets[0] = 0;
        while (first + n < count && tokens + order[first + n].len <= budget) {
            const seq_ref *s = &order[first + n];
            memcpy(batch_ids + tokens, ids + offsets[s->index], (size_t)s->len * sizeof *ids);
            tokens += s->len;
            batch_skip[n] = pool_skip ? pool_skip[s->index] : 0;
            batch_offsets[++n] = tokens;
        }
        backend_batch batch = {.ids = batch_ids,
                               .offsets = batch_offsets,
                               .count = n,
                               .pool_skip = pool_skip ? batch_skip : NULL};
        rc = m->cpu->encode(m->cpu, &batch, pooled);
        if (rc) goto free_buffers;
        for (int i = 0; i < n; i++)
            finish_vector(pooled + (size_t)i * (size_t)h, dim, p->normalize,
                          out + (size_t)order[first + i].index * (size_t)dim);
        first += n;
    }
free_buffers:
    free(order);
    free(batch_ids);
    free(batch_offsets);
    free(batch_skip);
    free(pooled);
    return rc;
}

int engine_embed_tokens(embedrag_model *m, const int32_t *ids, const int *offsets, int count,
                        const int *pool_skip, const embedrag_embed_params *params, float *out)
{
    embedrag_embed_params defaults = embedrag_embed_default_params();
    if (!params) params = &defaults;
    int rc = check_params(m, params);
    if (rc) return rc;
    pthread_mutex_lock(&m->lock);
    rc = run_batches(m, ids, offsets, count, pool_skip, params, out);
    pthread_mutex_unlock(&m->lock);
    return rc;
}

int embedrag_embed(embedrag_model *m, const char *const *texts, const size_t *lengths, size_t n,
                   const embedrag_embed_params *params, float *out)
{
    if (!m || (n && (!texts || !out)))
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "embedrag_embed: NULL argument");
    embedrag_embed_params defaults = embedrag_embed_default_params();
    if (!params) params = &defaults;
    int rc = check_params(m, params);
    if (rc) return rc;
    const char *prompt;
    rc = resolve_prompt(m, params, &prompt);
    if (rc) return rc;
    int dim = embedrag_embed_dimension(m, params);
    int max_tokens = m->config.max_seq_length;
    int skip = 0;
    if (!m->config.pooling_include_prompt && prompt[0]) skip = 1 + tok_count(m->tokenizer, prompt);

    size_t window = n < ENGINE_WINDOW_TEXTS ? n : ENGINE_WINDOW_TEXTS;
    int32_t *ids = malloc((window ? window : 1) * (size_t)max_tokens * sizeof *ids);
    int *offsets = malloc((window + 1) * sizeof *offsets);
    int *skips = malloc((window ? window : 1) * sizeof *skips);
    if (!ids || !offsets || !skips) {
        rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory embedding %zu texts", n);
        goto free_buffers;
    }
    for (size_t base = 0; base < n; base += window) {
        size_t count = n - base < window ? n - base : window;
        offsets[0] = 0;
        for (size_t i = 0; i < count; i++) {
            const char *text = texts[base + i];
            if (!text) {
                rc = err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "text %zu is NULL", base + i);
                err_set_text(base + i);
                goto free_buffers;
            }
            size_t len = lengths ? lengths[base + i] : strlen(text);
            int untruncated = 0;
            int got = tok_encode(m->tokenizer, prompt, text, len, ids + offsets[i], max_tokens,
                                 &untruncated);
            if (got < 0) {
                rc = err_prefix(got, "text %zu: ", base + i);
                err_set_text(base + i);
                goto free_buffers;
            }
            if (!params->truncate && untruncated > max_tokens) {
                rc = err_set(EMBEDRAG_ERR_TOO_LONG,
                             "text %zu has %d tokens; the model takes at most %d (truncation is "
                             "off)",
                             base + i, untruncated, max_tokens);
                err_set_text(base + i);
                goto free_buffers;
            }
            offsets[i + 1] = offsets[i] + got;
            skips[i] = skip;
        }
        pthread_mutex_lock(&m->lock);
        rc = run_batches(m, ids, offsets, (int)count, skip ? skips : NULL, params,
                         out + base * (size_t)dim);
        pthread_mutex_unlock(&m->lock);
        if (rc) goto free_buffers;
    }
free_buffers:
    free(ids);
    free(offsets);
    free(skips);
    return rc;
}
