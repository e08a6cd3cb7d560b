/* BERT weights: locates every tensor a BertModel needs in model.safetensors, checks each shape
 * against the config, and exposes immutable views of the file's bytes in their stored dtype.
 * Backends read only these views, never the file, and convert what they read themselves. */
#include "model/model.h"

#include "util/error.h"
#include "util/file.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* Tensors point straight into the mapping, so the file's little-endian floats must be ours. */
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "embedrag reads safetensors data in place and needs a little-endian host"
#endif

/* Every name is the prefix plus one of the names below; "encoder.layer.%d." names stay well
 * under this. */
#define WT_MAX_NAME 512

#define WT_WORD_EMBEDDINGS "embeddings.word_embeddings.weight"

/* Tensors per encoder layer. */
#define WT_TENSORS_PER_LAYER 16

typedef struct wt_context {
    const st_file *file;
    const char *path;   /* model.safetensors path, for messages */
    const char *prefix; /* "" or e.g. "bert." */
    model_weights *weights;
    int layer_matrices; /* 2-D encoder tensors seen so far */
} wt_context;

static void wt_format_shape(const int64_t *shape, int ndim, char *buf, size_t size)
{
    size_t n = (size_t)snprintf(buf, size, "[");
    for (int i = 0; i < ndim && n < size; i++)
        n += (size_t)snprintf(buf + n, size - n, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (n < size) snprintf(buf + n, size - n, "]");
}

/* Finds the one prefix the checkpoint puts before BertModel's names ("" for a bare BertModel,
 * "bert." for BertForMaskedLM, "0.auto_model." for some sentence-transformers exports) from
 * the word-embedding tensor, the one tensor every BERT file has. */
static int wt_detect_prefix(const st_file *file, const char *path, char *prefix, size_t size)
{
    const size_t suffix_length = strlen(WT_WORD_EMBEDDINGS);
    const char *found = NULL;
    for (int i = 0; i < file->tensor_count; i++) {
        const char *name = file->tensors[i].name;
        size_t length = strlen(name);
        if (length < suffix_length || strcmp(name + length - suffix_length, WT_WORD_EMBEDDINGS))
            continue;
        size_t prefix_length = length - suffix_length;
        if (prefix_length && name[prefix_length - 1] != '.') continue; /* "xembeddings..." */
        if (found)
            return err_set(EMBEDRAG_ERR_FORMAT,
                           "%s: tensors '%s' and '%s' are both word embeddings; cannot tell "
                           "which model to load",
                           path, found, name);
        found = name;
    }
    if (!found)
        return err_set(EMBEDRAG_ERR_FORMAT,
                       "%s: tensor '%s' is missing (with or without a prefix such as 'bert.'); "
                       "not a BERT checkpoint?",
                       path, WT_WORD_EMBEDDINGS);
    size_t prefix_length = strlen(found) - suffix_length;
    if (prefix_length >= size)
        return err_set(EMBEDRAG_ERR_FORMAT, "%s: tensor name prefix of '%s' is too long", path,
                       found);
    memcpy(prefix, found, prefix_length);
    prefix[prefix_length] = '\0';
    return 0;
}

/* Resolves prefix + `name` (or prefix + `alternative`, for LayerNorm's older gamma/beta names),
 * checks it has exactly the shape {d0} (d1 < 0) or {d0, d1} and a float dtype, and stores its
 * view. */
static int wt_tensor(wt_context *ctx, const char *name, const char *alternative, int64_t d0,
                     int64_t d1, model_tensor *out)
{
    char full[WT_MAX_NAME];
    snprintf(full, sizeof full, "%s%s", ctx->prefix, name);
    const st_tensor *t = st_find(ctx->file, full);
    if (!t && alternative) {
        char other[WT_MAX_NAME];
        snprintf(other, sizeof other, "%s%s", ctx->prefix, alternative);
        t = st_find(ctx->file, other);
    }
    if (!t) return err_set(EMBEDRAG_ERR_FORMAT, "%s: tensor '%s' is missing", ctx->path, full);

    int64_t expected[2] = {d0, d1};
    int expected_ndim = d1 < 0 ? 1 : 2;
    bool same = t->ndim == expected_ndim;
    for (int i = 0; same && i < expected_ndim; i++) same = t->shape[i] == expected[i];
    if (!same) {
        char have[160], want[64];
        wt_format_shape(t->shape, t->ndim, have, sizeof have);
        wt_format_shape(expected, expected_ndim, want, sizeof want);
        return err_set(EMBEDRAG_ERR_FORMAT,
                       "%s: tensor '%s' has shape %s, expected %s from config.json", ctx->path,
                       t->name, have, want);
    }
    if (t->dtype == ST_OTHER)
        return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                       "%s: tensor '%s' has dtype %s; embedrag reads F32, F16 and BF16", ctx->path,
                       t->name, t->dtype_name);
    if (expected_ndim == 2 && strncmp(name, "encoder.", 8) == 0) {
        model_weights *w = ctx->weights;
        if (ctx->layer_matrices++ == 0)
            w->matrix_dtype = t->dtype;
        else if (w->matrix_dtype != t->dtype)
            w->matrix_dtype = ST_OTHER;
    }
    *out = (model_tensor){.name = t->name,
                          .dtype = t->dtype,
                          .rows = d1 < 0 ? 1 : d0,
                          .cols = d1 < 0 ? d0 : d1,
                          .data = t->data,
                          .nbytes = t->nbytes};
    return 0;
}

static int wt_layer(wt_context *ctx, const model_config *c, int index, model_layer_weights *l)
{
    const int64_t h = c->hidden_size, inter = c->intermediate_size;
    const struct {
        const char *name, *alternative;
        int64_t d0, d1;
        model_tensor *out;
    } specs[WT_TENSORS_PER_LAYER] = {
        {"attention.self.query.weight", NULL, h, h, &l->query_w},
        {"attention.self.query.bias", NULL, h, -1, &l->query_b},
        {"attention.self.key.weight", NULL, h, h, &l->key_w},
        {"attention.self.key.bias", NULL, h, -1, &l->key_b},
        {"attention.self.value.weight", NULL, h, h, &l->value_w},
        {"attention.self.value.bias", NULL, h, -1, &l->value_b},
        {"attention.output.dense.weight", NULL, h, h, &l->attn_out_w},
        {"attention.output.dense.bias", NULL, h, -1, &l->attn_out_b},
        {"attention.output.LayerNorm.weight", "attention.output.LayerNorm.gamma", h, -1,
         &l->attn_ln_w},
        {"attention.output.LayerNorm.bias", "attention.output.LayerNorm.beta", h, -1,
         &l->attn_ln_b},
        {"intermediate.dense.weight", NULL, inter, h, &l->inter_w},
        {"intermediate.dense.bias", NULL, inter, -1, &l->inter_b},
        {"output.dense.weight", NULL, h, inter, &l->out_w},
        {"output.dense.bias", NULL, h, -1, &l->out_b},
        {"output.LayerNorm.weight", "output.LayerNorm.gamma", h, -1, &l->out_ln_w},
        {"output.LayerNorm.bias", "output.LayerNorm.beta", h, -1, &l->out_ln_b},
    };
    for (int i = 0; i < WT_TENSORS_PER_LAYER; i++) {
        char name[WT_MAX_NAME], alternative[WT_MAX_NAME];
        snprintf(name, sizeof name, "encoder.layer.%d.%s", index, specs[i].name);
        if (specs[i].alternative)
            snprintf(alternative, sizeof alternative, "encoder.layer.%d.%s", index,
                     specs[i].alternative);
        int rc = wt_tensor(ctx, name, specs[i].alternative ? alternative : NULL, specs[i].d0,
                           specs[i].d1, specs[i].out);
        if (rc) return rc;
    }
    return 0;
}

int model_weights_load(const char *dir, const model_config *config, model_weights *out)
{
    memset(out, 0, sizeof *out);
    char *path;
    int rc = file_join(dir, "model.safetensors", &path);
    if (rc) return rc;
    rc = st_open(path, &out->file);
    if (rc) goto free_path;
    char prefix[WT_MAX_NAME / 2];
    rc = wt_detect_prefix(out->file, path, prefix, sizeof prefix);
    if (rc) goto free_weights;

    const int layers = config->num_layers;
    out->layers = calloc((size_t)layers, sizeof *out->layers);
    out->layer_count = layers;
    if (!out->layers) {
        rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "%s: out of memory", path);
        goto free_weights;
    }

    wt_context ctx = {.file = out->file, .path = path, .prefix = prefix, .weights = out};
    const int64_t h = config->hidden_size;
    if ((rc = wt_tensor(&ctx, WT_WORD_EMBEDDINGS, NULL, config->vocab_size, h, &out->word_emb)) ||
        (rc = wt_tensor(&ctx, "embeddings.position_embeddings.weight", NULL,
                        config->max_position_embeddings, h, &out->position_emb)) ||
        (rc = wt_tensor(&ctx, "embeddings.token_type_embeddings.weight", NULL,
                        config->type_vocab_size, h, &out->type_emb)) ||
        (rc = wt_tensor(&ctx, "embeddings.LayerNorm.weight", "embeddings.LayerNorm.gamma", h, -1,
                        &out->emb_ln_w)) ||
        (rc = wt_tensor(&ctx, "embeddings.LayerNorm.bias", "embeddings.LayerNorm.beta", h, -1,
                        &out->emb_ln_b)))
        goto free_weights;
    for (int i = 0; i < layers; i++) {
        rc = wt_layer(&ctx, config, i, &out->layers[i]);
        if (rc) goto free_weights;
    }

    /* A file with more layers than num_hidden_layers means the config describes another model;
     * running only the first layers would give plausible but wrong vectors. */
    char extra[WT_MAX_NAME];
    snprintf(extra, sizeof extra, "%sencoder.layer.%d.attention.self.query.weight", prefix, layers);
    if (st_find(out->file, extra)) {
        rc = err_set(EMBEDRAG_ERR_FORMAT,
                     "%s: tensor '%s' exists but config.json's num_hidden_layers is %d", path,
                     extra, layers);
        goto free_weights;
    }
    free(path);
    return 0;

free_weights:
    model_weights_free(out);
free_path:
    free(path);
    return rc;
}

void model_tensor_read_f32(const model_tensor *t, size_t first, size_t count, float *out)
{
    const unsigned char *src = t->data;
    if (t->dtype == ST_F32) {
        memcpy(out, src + first * sizeof(float), count * sizeof(float)); /* may be misaligned */
        return;
    }
    float (*widen)(uint16_t) = t->dtype == ST_F16 ? st_f16_to_f32 : st_bf16_to_f32;
    for (size_t i = 0; i < count; i++) {
        uint16_t v;
        memcpy(&v, src + 2 * (first + i), sizeof v); /* the data may be misaligned */
        out[i] = widen(v);
    }
}

const float *model_tensor_f32(const model_tensor *t)
{
    return t->dtype == ST_F32 && (uintptr_t)t->data % sizeof(float) == 0 ? t->data : NULL;
}

/* The page-aligned part of [data, data + nbytes) inside the mapping: whole pages only when
 * `inner` (the partial pages at either end may hold a neighbour still in use), else every page
 * touched. Returns false when the range is not in the mapping. */
static bool wt_pages(const model_weights *weights, const void *data, size_t nbytes, bool inner,
                     uintptr_t *first, uintptr_t *last)
{
    if (!weights || !data || !nbytes || !weights->file || !weights->file->map) return false;
    uintptr_t map_begin = (uintptr_t)weights->file->map;
    uintptr_t map_end = map_begin + weights->file->map_size;
    uintptr_t begin = (uintptr_t)data;
    if (begin < map_begin || begin > map_end || nbytes > map_end - begin) return false;
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    *first = inner ? (begin + page - 1) / page * page : begin / page * page;
    *last = inner ? (begin + nbytes) / page * page : (begin + nbytes + page - 1) / page * page;
    return *first < *last;
}

void model_tensor_release(const model_weights *weights, const model_tensor *t)
{
    uintptr_t first, last;
    /* Dropping a neighbour's page would be harmless for a read-only file mapping, but would cost
     * a re-read: only whole pages go. */
    if (wt_pages(weights, t->data, t->nbytes, true, &first, &last))
        madvise((void *)first, last - first, MADV_DONTNEED);
}

void model_weights_release_layer(const model_weights *weights, int layer)
{
    if (!weights || !weights->layers || layer < 0 || layer >= weights->layer_count) return;
    /* The layer struct holds nothing but tensors. */
    size_t per_layer = sizeof(model_layer_weights) / sizeof(model_tensor);
    const model_tensor *t = (const model_tensor *)&weights->layers[layer];
    for (size_t i = 0; i < per_layer; i++) model_tensor_release(weights, &t[i]);
}

void model_tensor_prefault(const model_weights *weights, const model_tensor *t)
{
    uintptr_t first, last;
    if (!wt_pages(weights, t->data, t->nbytes, false, &first, &last)) return;
#ifdef MADV_POPULATE_READ
    if (madvise((void *)first, last - first, MADV_POPULATE_READ) == 0) return;
#endif
    /* Older kernels: read a byte of every page. */
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    volatile const unsigned char *bytes = (const unsigned char *)t->data;
    unsigned char sink = 0;
    for (size_t offset = 0; offset < t->nbytes; offset += page) sink ^= bytes[offset];
    sink ^= bytes[t->nbytes - 1];
    (void)sink;
}

void model_weights_free(model_weights *weights)
{
    if (!weights) return;
    free(weights->layers);
    st_close(weights->file);
    memset(weights, 0, sizeof *weights);
}
