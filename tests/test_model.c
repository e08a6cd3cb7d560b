/* Tests of the model-files module: the real all-MiniLM-L6-v2 directory (config values and tensor
 * values read independently with Python's safetensors), and crafted files in a temporary
 * directory for every way a safetensors file or a config can be malformed or unsupported. */
#include "check.h"

#include "model/model.h"
#include "util/error.h"

#include "embedrag.h"

#include <ftw.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- helpers: temporary files ---- */

static char temp_root[512];

/* A path under the temporary root; the caller frees it. */
static char *temp_path(const char *relative)
{
    char *path;
    if (asprintf(&path, "%s/%s", temp_root, relative) < 0) abort();
    return path;
}

static void write_bytes(const char *path, const void *data, size_t size)
{
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, size, f) != size) {
        fprintf(stderr, "cannot write %s\n", path);
        abort();
    }
    fclose(f);
}

/* Writes `text` to dir/name. */
static void write_text(const char *dir, const char *name, const char *text)
{
    char *path;
    if (asprintf(&path, "%s/%s", dir, name) < 0) abort();
    write_bytes(path, text, strlen(text));
    free(path);
}

/* Creates (empty) the model directory temp_root/name and returns its path; caller frees. */
static char *make_dir(const char *name)
{
    char *path = temp_path(name);
    mkdir(path, 0700);
    return path;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    return remove(path);
}

static bool contains(const char *haystack, const char *needle)
{
    return strstr(haystack, needle) != NULL;
}

/* ---- helpers: building safetensors images ---- */

typedef struct tensor_spec {
    const char *name;
    const char *dtype;
    int ndim;
    int64_t shape[4];
    const void *data;
    size_t nbytes;
} tensor_spec;

typedef struct buffer {
    unsigned char *data;
    size_t size;
} buffer;

/* Lays tensors out back to back and pads the header with spaces so the data area starts at
 * `data_alignment` modulo 8 (0 for the aligned layout real writers produce). */
static buffer build_safetensors(const tensor_spec *specs, int count, size_t data_alignment)
{
    char *header = NULL;
    size_t header_size = 0;
    FILE *h = open_memstream(&header, &header_size);
    fprintf(h, "{\"__metadata__\":{\"format\":\"pt\"}");
    size_t offset = 0;
    for (int i = 0; i < count; i++) {
        fprintf(h, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[", specs[i].name, specs[i].dtype);
        for (int d = 0; d < specs[i].ndim; d++)
            fprintf(h, "%s%lld", d ? "," : "", (long long)specs[i].shape[d]);
        fprintf(h, "],\"data_offsets\":[%zu,%zu]}", offset, offset + specs[i].nbytes);
        offset += specs[i].nbytes;
    }
    fprintf(h, "}");
    fclose(h);
    while ((8 + header_size) % 8 != data_alignment) {
        header = realloc(header, header_size + 2);
        header[header_size++] = ' ';
        header[header_size] = '\0';
    }
    buffer b = {malloc(8 + header_size + offset + 1), 8 + header_size + offset};
    for (int i = 0; i < 8; i++) b.data[i] = (unsigned char)((uint64_t)header_size >> (8 * i));
    memcpy(b.data + 8, header, header_size);
    size_t at = 8 + header_size;
    for (int i = 0; i < count; i++) {
        memcpy(b.data + at, specs[i].data, specs[i].nbytes);
        at += specs[i].nbytes;
    }
    free(header);
    return b;
}

/* An image from a literal header (any bytes, valid or not) and a data area, with the header
 * length field set to `claimed_length` (or the true length when it is SIZE_MAX). */
static buffer build_raw(const char *json, uint64_t claimed_length, size_t data_size)
{
    size_t json_length = strlen(json);
    if (claimed_length == UINT64_MAX) claimed_length = json_length;
    buffer b = {calloc(1, 8 + json_length + data_size + 1), 8 + json_length + data_size};
    for (int i = 0; i < 8; i++) b.data[i] = (unsigned char)(claimed_length >> (8 * i));
    memcpy(b.data + 8, json, json_length);
    return b;
}

/* Parses an image from an exactly sized heap copy, so ASan catches any read past its end. */
static int parse_exact(const void *data, size_t size, st_file **out)
{
    void *copy = malloc(size ? size : 1);
    memcpy(copy, data, size);
    int rc = st_parse(copy, size, "crafted.safetensors", out);
    if (rc == 0) {
        /* The result points into `copy`, which the caller cannot keep; check and drop it. */
        st_close(*out);
        *out = NULL;
    }
    free(copy);
    return rc;
}

/* Expects st_parse of a literal header to fail with `code` and a message holding `needle1`
 * and `needle2` (NULL to skip), besides the file name. */
static void expect_header_error(const char *json, size_t data_size, int code, const char *needle1,
                                const char *needle2)
{
    buffer b = build_raw(json, UINT64_MAX, data_size);
    st_file *f = (st_file *)1;
    int rc = parse_exact(b.data, b.size, &f);
    CHECK(rc == code, "header %s: rc %d, expected %d (%s)", json, rc, code, err_get());
    CHECK(f == NULL, "header %s: out not NULL on failure", json);
    CHECK(contains(err_get(), "crafted.safetensors"), "message lacks the file: %s", err_get());
    if (needle1) CHECK(contains(err_get(), needle1), "message lacks '%s': %s", needle1, err_get());
    if (needle2) CHECK(contains(err_get(), needle2), "message lacks '%s': %s", needle2, err_get());
    free(b.data);
}

/* ---- helpers: a tiny BERT model directory ---- */

enum { TINY_H = 4, TINY_HEADS = 2, TINY_LAYERS = 2, TINY_I = 8, TINY_VOCAB = 5, TINY_POS = 6 };

typedef struct tiny_options {
    const char *prefix;     /* tensor name prefix, e.g. "bert." */
    const char *dtype;      /* F32, F16 or BF16 for every tensor */
    bool gamma_beta;        /* LayerNorm names in the older gamma/beta form */
    bool misaligned;        /* data area starting at 2 mod 8 */
    const char *omit;       /* a tensor (without prefix) left out */
    const char *as_i64;     /* a tensor (without prefix) stored with dtype I64 */
    int layers;             /* encoder layers in the file (TINY_LAYERS when 0) */
    const uint16_t *word16; /* raw F16/BF16 bits for the word embeddings, or NULL */
} tiny_options;

static const char tiny_config[] =
    "{\"architectures\":[\"BertModel\"],\"model_type\":\"bert\",\"hidden_size\":4,"
    "\"num_hidden_layers\":2,\"num_attention_heads\":2,\"intermediate_size\":8,"
    "\"vocab_size\":5,\"max_position_embeddings\":6,\"type_vocab_size\":2}";

/* The value of element e of the t-th tensor: small enough integers plus sixteenths to be exact
 * in F16 and BF16 alike, and different from one tensor to the next. */
static float tiny_value(int t, int e)
{
    return (float)(t % 16) + (float)(e % 8) / 8.0f;
}

static uint16_t to_bf16(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return (uint16_t)(bits >> 16); /* exact for tiny_value's values */
}

static uint16_t to_f16(float f)
{
    /* Exact for tiny_value's values: normal, at most 7 significant bits. */
    if (f == 0) return 0;
    int exponent;
    float m = frexpf(f, &exponent); /* f = m * 2^exponent, m in [0.5, 1) */
    uint16_t mantissa = (uint16_t)((m * 2 - 1) * 1024);
    return (uint16_t)((exponent - 1 + 15) << 10 | mantissa);
}

typedef struct tiny_tensor {
    char name[128];
    int ndim;
    int64_t shape[2];
} tiny_tensor;

/* The BertModel tensor list for the tiny shape, in a fixed order (tiny_value's t). */
static int tiny_tensors(const tiny_options *o, tiny_tensor *out)
{
    int n = 0;
    const char *lw = o->gamma_beta ? "gamma" : "weight", *lb = o->gamma_beta ? "beta" : "bias";
#define ADD(rows, cols, ...)                                                                       \
    do {                                                                                           \
        snprintf(out[n].name, sizeof out[n].name, __VA_ARGS__);                                    \
        out[n].ndim = (cols) ? 2 : 1;                                                              \
        out[n].shape[0] = rows;                                                                    \
        out[n].shape[1] = cols;                                                                    \
        n++;                                                                                       \
    } while (0)
    ADD(TINY_VOCAB, TINY_H, "embeddings.word_embeddings.weight");
    ADD(TINY_POS, TINY_H, "embeddings.position_embeddings.weight");
    ADD(2, TINY_H, "embeddings.token_type_embeddings.weight");
    ADD(TINY_H, 0, "embeddings.LayerNorm.%s", lw);
    ADD(TINY_H, 0, "embeddings.LayerNorm.%s", lb);
    int layers = o->layers ? o->layers : TINY_LAYERS;
    for (int l = 0; l < layers; l++) {
        static const char *const qkv[] = {"query", "key", "value"};
        for (int i = 0; i < 3; i++) {
            ADD(TINY_H, TINY_H, "encoder.layer.%d.attention.self.%s.weight", l, qkv[i]);
            ADD(TINY_H, 0, "encoder.layer.%d.attention.self.%s.bias", l, qkv[i]);
        }
        ADD(TINY_H, TINY_H, "encoder.layer.%d.attention.output.dense.weight", l);
        ADD(TINY_H, 0, "encoder.layer.%d.attention.output.dense.bias", l);
        ADD(TINY_H, 0, "encoder.layer.%d.attention.output.LayerNorm.%s", l, lw);
        ADD(TINY_H, 0, "encoder.layer.%d.attention.output.LayerNorm.%s", l, lb);
        ADD(TINY_I, TINY_H, "encoder.layer.%d.intermediate.dense.weight", l);
        ADD(TINY_I, 0, "encoder.layer.%d.intermediate.dense.bias", l);
        ADD(TINY_H, TINY_I, "encoder.layer.%d.output.dense.weight", l);
        ADD(TINY_H, 0, "encoder.layer.%d.output.dense.bias", l);
        ADD(TINY_H, 0, "encoder.layer.%d.output.LayerNorm.%s", l, lw);
        ADD(TINY_H, 0, "encoder.layer.%d.output.LayerNorm.%s", l, lb);
    }
#undef ADD
    return n;
}

/* Writes config.json (when `config` is not NULL) and model.safetensors into temp_root/name. */
static char *make_tiny_model(const char *name, const char *config, const tiny_options *o)
{
    char *dir = make_dir(name);
    if (config) write_text(dir, "config.json", config);
    tiny_tensor tensors[128];
    int count = tiny_tensors(o, tensors);
    tensor_spec specs[128];
    char names[128][160];
    void *datas[128];
    int n = 0;
    for (int t = 0; t < count; t++) {
        if (o->omit && strcmp(tensors[t].name, o->omit) == 0) continue;
        size_t elements =
            (size_t)tensors[t].shape[0] * (size_t)(tensors[t].ndim == 2 ? tensors[t].shape[1] : 1);
        bool i64 = o->as_i64 && strcmp(tensors[t].name, o->as_i64) == 0;
        const char *dtype = i64 ? "I64" : o->dtype;
        size_t size = strcmp(dtype, "I64") == 0 ? 8 : strcmp(dtype, "F32") == 0 ? 4 : 2;
        unsigned char *data = calloc(elements, size);
        for (size_t e = 0; e < elements && !i64; e++) {
            float v = tiny_value(t, (int)e);
            if (size == 4) {
                memcpy(data + 4 * e, &v, 4);
            } else {
                uint16_t bits = strcmp(dtype, "F16") == 0 ? to_f16(v) : to_bf16(v);
                if (t == 0 && o->word16) bits = o->word16[e];
                memcpy(data + 2 * e, &bits, 2);
            }
        }
        if (snprintf(names[n], sizeof names[n], "%s%s", o->prefix ? o->prefix : "",
                     tensors[t].name) >= (int)sizeof names[n])
            abort(); /* names are short literals; this cannot happen */
        specs[n] = (tensor_spec){
            names[n], dtype,          tensors[t].ndim, {tensors[t].shape[0], tensors[t].shape[1]},
            data,     elements * size};
        datas[n++] = data;
    }
    buffer b = build_safetensors(specs, n, o->misaligned ? 2 : 0);
    char *path;
    if (asprintf(&path, "%s/model.safetensors", dir) < 0) abort();
    write_bytes(path, b.data, b.size);
    free(path);
    free(b.data);
    for (int i = 0; i < n; i++) free(datas[i]);
    return dir;
}

static bool inside_map(const model_weights *w, const model_tensor *t)
{
    const char *base = w->file->map;
    const char *p = t->data;
    return p >= base && p + t->nbytes <= base + w->file->map_size;
}

/* Element e of a tensor, widened to float32. */
static float tensor_value(const model_tensor *t, size_t e)
{
    float v;
    model_tensor_read_f32(t, e, 1, &v);
    return v;
}

/* Checks that every view of a tiny model holds tiny_value(t, e) for its tensor t, and has the
 * shape it was written with. */
static void check_tiny_values(const model_weights *w, const char *what)
{
    tiny_options o = {0};
    tiny_tensor tensors[128];
    int count = tiny_tensors(&o, tensors);
    const model_tensor *views[128];
    views[0] = &w->word_emb;
    views[1] = &w->position_emb;
    views[2] = &w->type_emb;
    views[3] = &w->emb_ln_w;
    views[4] = &w->emb_ln_b;
    for (int l = 0; l < TINY_LAYERS; l++) {
        const model_layer_weights *L = &w->layers[l];
        const model_tensor *layer_views[16] = {
            &L->query_w,    &L->query_b,    &L->key_w,     &L->key_b,     &L->value_w, &L->value_b,
            &L->attn_out_w, &L->attn_out_b, &L->attn_ln_w, &L->attn_ln_b, &L->inter_w, &L->inter_b,
            &L->out_w,      &L->out_b,      &L->out_ln_w,  &L->out_ln_b};
        memcpy(&views[5 + 16 * l], layer_views, sizeof layer_views);
    }
    int bad = 0, bad_shapes = 0;
    for (int t = 0; t < count; t++) {
        size_t elements =
            (size_t)tensors[t].shape[0] * (size_t)(tensors[t].ndim == 2 ? tensors[t].shape[1] : 1);
        if (model_tensor_elements(views[t]) != elements ||
            views[t]->rows != (tensors[t].ndim == 2 ? tensors[t].shape[0] : 1))
            bad_shapes++;
        for (size_t e = 0; e < elements; e++)
            if (tensor_value(views[t], e) != tiny_value(t, (int)e)) bad++;
    }
    CHECK(bad == 0, "%s: %d tensor values differ from what was written", what, bad);
    CHECK(bad_shapes == 0, "%s: %d tensors have the wrong shape", what, bad_shapes);
}

/* ---- the real model ---- */

static void test_real_model_loads_with_expected_config_and_values(void)
{
    char *dir;
    if (asprintf(&dir, "%s/models/all-MiniLM-L6-v2", check_source_dir()) < 0) abort();
    char *probe;
    if (asprintf(&probe, "%s/model.safetensors", dir) < 0) abort();
    bool present = access(probe, R_OK) == 0;
    free(probe);
    CHECK(present, "%s is missing: run scripts/fetch-models.sh first (CI does)", dir);
    if (!present) {
        free(dir);
        return;
    }

    model_config c;
    int rc = model_config_load(dir, &c);
    CHECK(rc == 0, "model_config_load: %s", err_get());
    if (rc) {
        free(dir);
        return;
    }
    CHECK(c.num_layers == 6, "layers %d", c.num_layers);
    CHECK(c.hidden_size == 384, "hidden %d", c.hidden_size);
    CHECK(c.num_heads == 12, "heads %d", c.num_heads);
    CHECK(c.intermediate_size == 1536, "intermediate %d", c.intermediate_size);
    CHECK(c.vocab_size == 30522, "vocab %d", c.vocab_size);
    CHECK(c.max_position_embeddings == 512, "max_position %d", c.max_position_embeddings);
    CHECK(c.type_vocab_size == 2, "type_vocab %d", c.type_vocab_size);
    CHECK(c.max_seq_length == 256, "max_seq_length %d", c.max_seq_length);
    CHECK(c.pooling == EMBEDRAG_POOLING_MEAN, "pooling %d", c.pooling);
    CHECK(c.normalize, "normalize should be true (modules.json lists Normalize)");
    CHECK(c.pooling_include_prompt, "include_prompt defaults to true");
    CHECK(c.activation == MODEL_ACT_GELU, "activation %d", (int)c.activation);
    CHECK(c.layer_norm_eps == 1e-12f, "eps %g", (double)c.layer_norm_eps);
    CHECK(c.name && strcmp(c.name, "all-MiniLM-L6-v2") == 0, "name (the directory's) %s", c.name);
    CHECK(c.prompt_count == 0 && c.default_prompt_name == NULL, "no prompts expected");

    model_weights w;
    rc = model_weights_load(dir, &c, &w);
    CHECK(rc == 0, "model_weights_load: %s", err_get());
    if (rc == 0) {
        /* Reference values: safetensors.numpy.load_file + float.hex() in Python. */
        static const float word0[4] = {-0x1.478p-6f, -0x1.bep-9f, -0x1.e1p-7f, 0x1.7f8p-7f};
        const float *words = model_tensor_f32(&w.word_emb);
        CHECK(words != NULL, "aligned F32 word embeddings are readable in place");
        for (int i = 0; words && i < 4; i++)
            CHECK(words[i] == word0[i], "word_emb[0][%d] = %a, expected %a", i, (double)words[i],
                  (double)word0[i]);
        CHECK(tensor_value(&w.word_emb, 101 * 384 + 1) == -0x1.f21c1p-8f, "word_emb[101][1] = %a",
              (double)tensor_value(&w.word_emb, 101 * 384 + 1));
        CHECK(tensor_value(&w.word_emb, 30521 * 384 + 383) == 0x1.2b80f2p-8f,
              "word_emb[30521][383] = %a", (double)tensor_value(&w.word_emb, 30521 * 384 + 383));
        CHECK(tensor_value(&w.position_emb, 511 * 384 + 1) == -0x1.1fp-7f,
              "position_emb[511][1] = %a", (double)tensor_value(&w.position_emb, 511 * 384 + 1));
        CHECK(tensor_value(&w.layers[5].out_ln_b, 0) == -0x1.296e22p-5f,
              "layer 5 output LayerNorm bias[0] = %a",
              (double)tensor_value(&w.layers[5].out_ln_b, 0));
        CHECK(tensor_value(&w.layers[3].inter_w, 1535 * 384 + 383) == 0x1.4b220ap-5f,
              "layer 3 intermediate weight[1535][383] = %a",
              (double)tensor_value(&w.layers[3].inter_w, 1535 * 384 + 383));
        CHECK(tensor_value(&w.layers[0].query_w, 1) == 0x1.6502acp-5f,
              "layer 0 query weight[0][1] = %a", (double)tensor_value(&w.layers[0].query_w, 1));
        CHECK(w.layers[3].inter_w.rows == 1536 && w.layers[3].inter_w.cols == 384 &&
                  w.layers[5].out_ln_b.rows == 1 && w.layers[5].out_ln_b.cols == 384,
              "shapes: inter %lld x %lld, LayerNorm %lld x %lld",
              (long long)w.layers[3].inter_w.rows, (long long)w.layers[3].inter_w.cols,
              (long long)w.layers[5].out_ln_b.rows, (long long)w.layers[5].out_ln_b.cols);
        CHECK(w.matrix_dtype == ST_F32, "matrix dtype %d", (int)w.matrix_dtype);
        CHECK(inside_map(&w, &w.word_emb) && inside_map(&w, &w.layers[5].out_ln_b),
              "views point into the mapping");

        /* Released pages come back from the file when touched again. */
        model_tensor_release(&w, &w.word_emb);
        for (int l = 0; l < 6; l++) model_weights_release_layer(&w, l);
        CHECK(words && words[0] == word0[0] && words[30521 * 384 + 383] == 0x1.2b80f2p-8f &&
                  tensor_value(&w.layers[3].inter_w, 1535 * 384 + 383) == 0x1.4b220ap-5f,
              "values after release: %a", words ? (double)words[0] : 0.0);
        float outside[4] = {0};
        model_tensor not_mapped = {
            .dtype = ST_F32, .rows = 1, .cols = 4, .data = outside, .nbytes = sizeof outside};
        model_tensor_release(&w, &not_mapped); /* not in the mapping: no-op */
        model_tensor_prefault(&w, &not_mapped);
        CHECK(outside[0] == 0.0f, "a foreign buffer is left alone");
        model_weights_free(&w);
        CHECK(w.file == NULL && w.layers == NULL, "model_weights_free clears the struct");
    }
    model_config_free(&c);
    free(dir);
}

/* ---- safetensors ---- */

static const float small_f32[4] = {1.0f, -2.0f, 0.5f, 3.25f};
static const int64_t small_i64[3] = {0, 1, 2};

static buffer small_valid_file(void)
{
    tensor_spec specs[2] = {
        {"weights", "F32", 2, {2, 2}, small_f32, sizeof small_f32},
        {"position_ids", "I64", 2, {1, 3}, small_i64, sizeof small_i64},
    };
    return build_safetensors(specs, 2, 0);
}

static void test_safetensors_valid_file_parses(void)
{
    buffer b = small_valid_file();
    st_file *f;
    int rc = st_parse(b.data, b.size, "small.safetensors", &f);
    CHECK(rc == 0, "st_parse: %s", err_get());
    if (rc == 0) {
        CHECK(f->tensor_count == 2, "tensor_count %d", f->tensor_count);
        const st_tensor *w = st_find(f, "weights");
        CHECK(w && w->dtype == ST_F32 && w->ndim == 2 && w->shape[0] == 2 && w->shape[1] == 2 &&
                  w->nbytes == 16,
              "weights tensor fields");
        if (w) CHECK(memcmp(w->data, small_f32, 16) == 0, "weights data");
        const st_tensor *p = st_find(f, "position_ids");
        CHECK(p && p->dtype == ST_OTHER && strcmp(p->dtype_name, "I64") == 0 && p->nbytes == 24,
              "I64 tensors are kept as ST_OTHER");
        CHECK(st_find(f, "missing") == NULL, "st_find of an absent name");
        CHECK(f->map == NULL, "a parsed buffer is not a mapping");
        st_close(f);
    }
    st_close(NULL);

    /* The same bytes through a file and mmap. */
    char *path = temp_path("small.safetensors");
    write_bytes(path, b.data, b.size);
    rc = st_open(path, &f);
    CHECK(rc == 0, "st_open: %s", err_get());
    if (rc == 0) {
        CHECK(f->map != NULL && f->map_size == b.size, "st_open maps the whole file");
        CHECK(strcmp(f->path, path) == 0, "path kept for messages");
        const st_tensor *w = st_find(f, "weights");
        CHECK(w && memcmp(w->data, small_f32, 16) == 0, "mapped weights data");
        st_close(f);
    }
    free(path);
    free(b.data);
}

static void test_safetensors_every_truncation_fails_cleanly(void)
{
    buffer b = small_valid_file();
    char *path = temp_path("truncated.safetensors");
    int unexpected = 0;
    for (size_t length = 0; length < b.size; length++) {
        st_file *f = (st_file *)1;
        int rc = parse_exact(b.data, length, &f);
        if (rc != EMBEDRAG_ERR_FORMAT || f != NULL) unexpected++;

        write_bytes(path, b.data, length);
        f = (st_file *)1;
        rc = st_open(path, &f);
        if (rc != EMBEDRAG_ERR_FORMAT || f != NULL) {
            unexpected++;
            st_close(rc == 0 ? f : NULL);
        } else if (!contains(err_get(), "truncated.safetensors")) {
            unexpected++;
        }
    }
    CHECK(unexpected == 0, "%d truncations of a %zu-byte file did not fail as FORMAT errors",
          unexpected, b.size);
    free(path);
    free(b.data);
}

static void test_safetensors_missing_file_is_io_error(void)
{
    char *path = temp_path("nowhere.safetensors");
    st_file *f = (st_file *)1;
    int rc = st_open(path, &f);
    CHECK(rc == EMBEDRAG_ERR_IO && f == NULL, "rc %d", rc);
    CHECK(contains(err_get(), "nowhere.safetensors"), "message: %s", err_get());
    free(path);
}

static void test_safetensors_lying_header_length_is_rejected(void)
{
    const char *json = "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
    struct {
        uint64_t claimed;
        const char *needle;
    } cases[] = {
        {1000, "runs past the end"},      {UINT64_MAX - 1, "absurd"}, {(uint64_t)1 << 63, "absurd"},
        {200u * 1000u * 1000u, "absurd"}, {10, "not valid JSON"}, /* cuts the JSON short */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        buffer b = build_raw(json, cases[i].claimed, 4);
        st_file *f = (st_file *)1;
        int rc = parse_exact(b.data, b.size, &f);
        CHECK(rc == EMBEDRAG_ERR_FORMAT && f == NULL, "claimed %llu: rc %d",
              (unsigned long long)cases[i].claimed, rc);
        CHECK(contains(err_get(), cases[i].needle) && contains(err_get(), "crafted.safetensors"),
              "claimed %llu: message: %s", (unsigned long long)cases[i].claimed, err_get());
        free(b.data);
    }
}

static void test_safetensors_malformed_headers_are_rejected(void)
{
    const int F = EMBEDRAG_ERR_FORMAT;
    expect_header_error("{not json", 0, F, "not valid JSON", NULL);
    expect_header_error("", 0, F, "not valid JSON", NULL);
    expect_header_error("[1,2]", 0, F, "not an object", NULL);
    expect_header_error("\"text\"", 0, F, "not an object", NULL);
    expect_header_error("{} {}", 0, F, "extra text", NULL);
    expect_header_error("{\"a\":5}", 0, F, "'a'", "not an object");
    expect_header_error("{\"__metadata__\":[1]}", 0, F, "__metadata__", NULL);
    expect_header_error("{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, F, "'w'", "dtype");
    expect_header_error("{\"w\":{\"dtype\":7,\"shape\":[1],\"data_offsets\":[0,4]}}", 4, F, "'w'",
                        "dtype");
    expect_header_error("{\"w\":{\"dtype\":\"f32 \",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, F,
                        "'w'", "dtype 'f32 '");
    expect_header_error(
        "{\"w\":{\"dtype\":\"AVERYLONGDTYPENAME\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, F,
        "'w'", "AVERYLONGDTYPENAME");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, F, "'w'", "shape");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, F,
                        "'w'", "-1");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4, F,
                        "'w'", "1.5");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,4]}}", 4,
                        F, "'w'", "shape entry 0");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],"
                        "\"data_offsets\":[0,4]}}",
                        4, F, "'w'", "9 dimensions");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],"
                        "\"data_offsets\":[0,4]}}",
                        4, F, "'w'", "overflows");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904],"
                        "\"data_offsets\":[0,4]}}",
                        4, F, "'w'", NULL);
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, F, "'w'", "data_offsets");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 8, F,
                        "'w'", "data_offsets");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4, F,
                        "'w'", "data_offsets");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", 8, F,
                        "'w'", "[8, 4]");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,9999]}}", 4, F,
                        "'w'", "[0, 9999]");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 4, F,
                        "'w'", "[4, 8]");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,1e300]}}", 4,
                        F, "'w'", NULL);
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,16]}}", 16,
                        F, "'w'", "needs 24 bytes");
    expect_header_error("{\"w\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[0,16]}}", 16, F,
                        "'w'", "needs 8 bytes");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                        "\"v\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                        12, F, "overlap", "'v'");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                        "\"v\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
                        16, F, "overlap", "'w'");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                        "\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                        8, F, "'w'", "twice");
}

static void test_safetensors_accepts_what_real_files_contain(void)
{
    /* Empty tensors sharing an offset, unknown dtypes (kept as ST_OTHER, sizes unchecked),
     * gaps between tensors, metadata and trailing space padding. */
    const char *json = "{\"__metadata__\":{\"format\":\"pt\"},"
                       "\"e1\":{\"dtype\":\"F32\",\"shape\":[0,3],\"data_offsets\":[4,4]},"
                       "\"e2\":{\"dtype\":\"F16\",\"shape\":[0],\"data_offsets\":[4,4]},"
                       "\"n\":{\"dtype\":\"F4_NEW\",\"shape\":[5],\"data_offsets\":[0,3]},"
                       "\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}     ";
    buffer b = build_raw(json, UINT64_MAX, 12);
    st_file *f;
    int rc = st_parse(b.data, b.size, "real.safetensors", &f);
    CHECK(rc == 0, "st_parse: %s", err_get());
    if (rc == 0) {
        const st_tensor *n = st_find(f, "n");
        CHECK(n && n->dtype == ST_OTHER && strcmp(n->dtype_name, "F4_NEW") == 0 && n->nbytes == 3,
              "unknown dtype kept");
        const st_tensor *e1 = st_find(f, "e1");
        CHECK(e1 && e1->nbytes == 0 && e1->ndim == 2, "empty tensor");
        CHECK(f->tensor_count == 4, "count %d", f->tensor_count);
        st_close(f);
    }
    free(b.data);

    buffer empty = build_raw("{}", UINT64_MAX, 0);
    rc = st_parse(empty.data, empty.size, "empty.safetensors", &f);
    CHECK(rc == 0 && f->tensor_count == 0, "a header without tensors is valid: %s", err_get());
    if (rc == 0) st_close(f);
    free(empty.data);
}

static void test_f16_and_bf16_widen_exactly(void)
{
    /* Every half value against the definition: (-1)^s x 2^(e-15) x 1.m, or 2^-14 x 0.m. */
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        int exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
        float sign = (h & 0x8000) ? -1.0f : 1.0f;
        float got = st_f16_to_f32((uint16_t)h);
        if (exponent == 0x1f) {
            if (mantissa ? !isnan(got) : got != sign * INFINITY) bad++;
            continue;
        }
        float want = exponent ? sign * ldexpf((float)(1024 + mantissa), exponent - 25)
                              : sign * ldexpf((float)mantissa, -24);
        if (got != want || signbit(got) != signbit(want)) bad++;
    }
    CHECK(bad == 0, "%d of 65536 half values widened wrongly", bad);
    CHECK(st_bf16_to_f32(0x3f80) == 1.0f && st_bf16_to_f32(0xc040) == -3.0f, "bf16 basics");
    CHECK(st_bf16_to_f32(0x0001) == 0x1p-133f, "bf16 smallest subnormal");
    CHECK(st_bf16_to_f32(0x7f80) == INFINITY && isnan(st_bf16_to_f32(0x7fc1)), "bf16 inf/nan");
}

/* ---- config ---- */

static int parse_config(const char *json, model_config *c)
{
    return model_config_parse(json, strlen(json), "config.json", c);
}

static void expect_config_error(const char *json, int code, const char *needle)
{
    model_config c;
    int rc = parse_config(json, &c);
    CHECK(rc == code, "config %s: rc %d, expected %d (%s)", json, rc, code, err_get());
    CHECK(contains(err_get(), "config.json") && contains(err_get(), needle),
          "config %s: message lacks '%s': %s", json, needle, err_get());
    CHECK(c.name == NULL && c.prompts == NULL, "config left empty on failure");
    if (rc == 0) model_config_free(&c);
}

#define BASE_FIELDS                                                                                \
    "\"hidden_size\":384,\"num_hidden_layers\":6,\"num_attention_heads\":12,"                      \
    "\"intermediate_size\":1536,\"vocab_size\":30522,\"max_position_embeddings\":512"

static void test_config_defaults_and_architecture_rules(void)
{
    model_config c;
    int rc = parse_config("{\"model_type\":\"bert\"," BASE_FIELDS "}", &c);
    CHECK(rc == 0, "minimal config: %s", err_get());
    if (rc == 0) {
        CHECK(c.type_vocab_size == 2 && c.layer_norm_eps == 1e-12f &&
                  c.activation == MODEL_ACT_GELU && c.max_seq_length == 512 &&
                  c.pooling == EMBEDRAG_POOLING_MEAN && !c.normalize && c.name == NULL,
              "defaults");
        model_config_free(&c);
    }
    rc = parse_config("{\"architectures\":[\"BertForMaskedLM\"],\"hidden_act\":\"gelu_new\","
                      "\"layer_norm_eps\":1e-5,\"type_vocab_size\":1," BASE_FIELDS "}",
                      &c);
    CHECK(rc == 0 && c.activation == MODEL_ACT_GELU_TANH && c.layer_norm_eps == 1e-5f &&
              c.type_vocab_size == 1,
          "architectures without model_type: %s", err_get());
    if (rc == 0) model_config_free(&c);
    rc = parse_config("{\"model_type\":\"bert\",\"hidden_act\":\"relu\"," BASE_FIELDS "}", &c);
    CHECK(rc == 0 && c.activation == MODEL_ACT_RELU, "relu: %s", err_get());
    if (rc == 0) model_config_free(&c);

    const int U = EMBEDRAG_ERR_UNSUPPORTED, F = EMBEDRAG_ERR_FORMAT;
    expect_config_error("{\"model_type\":\"xlm-roberta\"," BASE_FIELDS "}", U,
                        "model_type 'xlm-roberta' is not supported");
    expect_config_error("{\"architectures\":[\"RobertaModel\"]," BASE_FIELDS "}", U,
                        "RobertaModel");
    expect_config_error("{" BASE_FIELDS "}", U, "BERT");
    expect_config_error(
        "{\"model_type\":\"bert\",\"position_embedding_type\":\"relative_key\"," BASE_FIELDS "}", U,
        "position_embedding_type 'relative_key'");
    expect_config_error("{\"model_type\":\"bert\",\"hidden_act\":\"swish\"," BASE_FIELDS "}", U,
                        "hidden_act 'swish'");
    expect_config_error("{\"model_type\":7," BASE_FIELDS "}", F, "model_type");
    expect_config_error("[1]", F, "not a JSON object");
    expect_config_error("{\"model_type\":\"bert\"", F, "not valid JSON");
    expect_config_error("{\"model_type\":\"bert\"} x", F, "extra text");
}

static void test_config_sizes_are_validated(void)
{
    const int F = EMBEDRAG_ERR_FORMAT;
    expect_config_error("{\"model_type\":\"bert\",\"hidden_size\":384,\"num_hidden_layers\":6,"
                        "\"num_attention_heads\":12,\"intermediate_size\":1536,"
                        "\"vocab_size\":30522}",
                        F, "max_position_embeddings is missing");
    expect_config_error("{\"model_type\":\"bert\",\"hidden_size\":384,\"num_hidden_layers\":6,"
                        "\"num_attention_heads\":10,\"intermediate_size\":1536,"
                        "\"vocab_size\":30522,\"max_position_embeddings\":512}",
                        F, "not divisible by num_attention_heads 10");
    expect_config_error("{\"model_type\":\"bert\",\"hidden_size\":-384,\"num_hidden_layers\":6,"
                        "\"num_attention_heads\":12,\"intermediate_size\":1536,"
                        "\"vocab_size\":30522,\"max_position_embeddings\":512}",
                        F, "hidden_size is -384");
    expect_config_error("{\"model_type\":\"bert\",\"hidden_size\":384.5,\"num_hidden_layers\":6,"
                        "\"num_attention_heads\":12,\"intermediate_size\":1536,"
                        "\"vocab_size\":30522,\"max_position_embeddings\":512}",
                        F, "hidden_size");
    expect_config_error("{\"model_type\":\"bert\",\"hidden_size\":\"384\",\"num_hidden_layers\":6,"
                        "\"num_attention_heads\":12,\"intermediate_size\":1536,"
                        "\"vocab_size\":30522,\"max_position_embeddings\":512}",
                        F, "hidden_size is \"384\"");
    expect_config_error("{\"model_type\":\"bert\",\"hidden_size\":384,\"num_hidden_layers\":1000,"
                        "\"num_attention_heads\":12,\"intermediate_size\":1536,"
                        "\"vocab_size\":30522,\"max_position_embeddings\":512}",
                        F, "num_hidden_layers is 1000");
    expect_config_error("{\"model_type\":\"bert\",\"hidden_size\":384,\"num_hidden_layers\":6,"
                        "\"num_attention_heads\":12,\"intermediate_size\":1536,"
                        "\"vocab_size\":1e12,\"max_position_embeddings\":512}",
                        F, "vocab_size");
    expect_config_error("{\"model_type\":\"bert\",\"layer_norm_eps\":0," BASE_FIELDS "}", F,
                        "layer_norm_eps");
    /* Positive as a double but 0 as a float (found by fuzzing). */
    expect_config_error("{\"model_type\":\"bert\",\"layer_norm_eps\":1e-52," BASE_FIELDS "}", F,
                        "layer_norm_eps");
    expect_config_error("{\"model_type\":\"bert\",\"type_vocab_size\":0," BASE_FIELDS "}", F,
                        "type_vocab_size");
}

/* A directory with config.json for the tiny model plus the given sentence-transformers files
 * (pairs of name, text; NULL-terminated). */
static char *make_config_dir(const char *name, ...)
{
    char *dir = make_dir(name);
    write_text(dir, "config.json", tiny_config);
    va_list ap;
    va_start(ap, name);
    for (;;) {
        const char *file = va_arg(ap, const char *);
        if (!file) break;
        const char *text = va_arg(ap, const char *);
        if (strchr(file, '/')) { /* a pooling directory */
            char *sub = strdup(file);
            *strchr(sub, '/') = '\0';
            char *subdir;
            if (asprintf(&subdir, "%s/%s", dir, sub) < 0) abort();
            mkdir(subdir, 0700);
            free(subdir);
            free(sub);
        }
        write_text(dir, file, text);
    }
    va_end(ap);
    return dir;
}

static const char modules_pooling_normalize[] =
    "[{\"idx\":0,\"name\":\"0\",\"path\":\"\",\"type\":\"sentence_transformers.models."
    "Transformer\"},"
    "{\"idx\":1,\"name\":\"1\",\"path\":\"1_Pooling\",\"type\":\"sentence_transformers.models."
    "Pooling\"},"
    "{\"idx\":2,\"name\":\"2\",\"path\":\"2_Normalize\",\"type\":\"sentence_transformers.models."
    "Normalize\"}]";

static const char modules_pooling_only[] = "[{\"idx\":0,\"name\":\"0\",\"path\":\"\",\"type\":"
                                           "\"sentence_transformers.models.Transformer\"},"
                                           "{\"idx\":1,\"name\":\"1\",\"path\":\"1_Pooling\","
                                           "\"type\":\"sentence_transformers.models.Pooling\"}]";

/* Loads a directory made by make_config_dir with one pooling config and returns the rc. */
static int load_pooling(const char *name, const char *pooling_json, model_config *c)
{
    char *dir = make_config_dir(name, "modules.json", modules_pooling_normalize,
                                "1_Pooling/config.json", pooling_json, (const char *)NULL);
    int rc = model_config_load(dir, c);
    free(dir);
    return rc;
}

static void test_config_pooling_modes(void)
{
    model_config c;
    int rc = load_pooling("pool-cls",
                          "{\"word_embedding_dimension\":4,\"pooling_mode_cls_token\":true,"
                          "\"pooling_mode_mean_tokens\":false,\"pooling_mode_max_tokens\":false,"
                          "\"pooling_mode_mean_sqrt_len_tokens\":false}",
                          &c);
    CHECK(rc == 0 && c.pooling == EMBEDRAG_POOLING_CLS && c.normalize, "cls: %s", err_get());
    if (rc == 0) model_config_free(&c);
    rc = load_pooling("pool-mean", "{\"pooling_mode_mean_tokens\":true,\"include_prompt\":false}",
                      &c);
    CHECK(rc == 0 && c.pooling == EMBEDRAG_POOLING_MEAN && !c.pooling_include_prompt,
          "mean with include_prompt false: %s", err_get());
    if (rc == 0) model_config_free(&c);
    rc = load_pooling("pool-max", "{\"pooling_mode_max_tokens\":true}", &c);
    CHECK(rc == 0 && c.pooling == EMBEDRAG_POOLING_MAX, "max: %s", err_get());
    if (rc == 0) model_config_free(&c);
    rc = load_pooling("pool-string", "{\"pooling_mode\":\"cls\",\"pooling_mode_mean_tokens\":true}",
                      &c);
    CHECK(rc == 0 && c.pooling == EMBEDRAG_POOLING_CLS, "pooling_mode string: %s", err_get());
    if (rc == 0) model_config_free(&c);

    struct {
        const char *name, *json;
        int code;
        const char *needle;
    } bad[] = {
        {"pool-sqrt", "{\"pooling_mode_mean_sqrt_len_tokens\":true}", EMBEDRAG_ERR_UNSUPPORTED,
         "pooling_mode_mean_sqrt_len_tokens"},
        {"pool-two", "{\"pooling_mode_cls_token\":true,\"pooling_mode_mean_tokens\":true}",
         EMBEDRAG_ERR_UNSUPPORTED, "pooling_mode_cls_token and pooling_mode_mean_tokens"},
        {"pool-none", "{\"pooling_mode_cls_token\":false}", EMBEDRAG_ERR_FORMAT, "no pooling mode"},
        {"pool-lasttoken", "{\"pooling_mode\":\"lasttoken\"}", EMBEDRAG_ERR_UNSUPPORTED,
         "pooling_mode 'lasttoken'"},
        {"pool-dim", "{\"word_embedding_dimension\":768,\"pooling_mode_mean_tokens\":true}",
         EMBEDRAG_ERR_FORMAT, "word_embedding_dimension 768"},
        {"pool-flag-type", "{\"pooling_mode_mean_tokens\":1}", EMBEDRAG_ERR_FORMAT,
         "pooling_mode_mean_tokens"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        rc = load_pooling(bad[i].name, bad[i].json, &c);
        CHECK(rc == bad[i].code, "%s: rc %d (%s)", bad[i].name, rc, err_get());
        CHECK(contains(err_get(), "1_Pooling/config.json") && contains(err_get(), bad[i].needle),
              "%s: message: %s", bad[i].name, err_get());
        if (rc == 0) model_config_free(&c);
    }
}

static void test_config_modules_and_sentence_files(void)
{
    model_config c;
    /* No modules.json: mean pooling, no normalization, even with a 1_Pooling directory. */
    char *dir = make_config_dir("no-modules", "1_Pooling/config.json",
                                "{\"pooling_mode_cls_token\":true}", (const char *)NULL);
    int rc = model_config_load(dir, &c);
    CHECK(rc == 0 && c.pooling == EMBEDRAG_POOLING_MEAN && !c.normalize && c.max_seq_length == 6,
          "defaults without modules.json: %s", err_get());
    CHECK(rc == 0 && c.name && strcmp(c.name, "no-modules") == 0, "name from the directory: %s",
          c.name);
    if (rc == 0) model_config_free(&c);
    free(dir);

    /* Without Normalize, and a pooling directory with another name. */
    dir = make_config_dir("custom-pooling", "modules.json",
                          "[{\"path\":\"\",\"type\":\"sentence_transformers.models.Transformer\"},"
                          "{\"path\":\"pool\",\"type\":\"sentence_transformers.models.Pooling\"}]",
                          "pool/config.json", "{\"pooling_mode_max_tokens\":true}",
                          "sentence_bert_config.json",
                          "{\"max_seq_length\":4,\"do_lower_case\":false}", (const char *)NULL);
    char *slash_dir;
    if (asprintf(&slash_dir, "%s/", dir) < 0) abort();
    rc = model_config_load(slash_dir, &c);
    CHECK(rc == 0 && c.pooling == EMBEDRAG_POOLING_MAX && !c.normalize && c.max_seq_length == 4,
          "custom pooling path: %s", err_get());
    CHECK(rc == 0 && strcmp(c.name, "custom-pooling") == 0, "name with a trailing slash: %s",
          c.name);
    if (rc == 0) model_config_free(&c);
    free(slash_dir);
    free(dir);

    /* max_seq_length beyond the position table is clamped to it. */
    dir = make_config_dir("long-seq", "sentence_bert_config.json", "{\"max_seq_length\":4096}",
                          (const char *)NULL);
    rc = model_config_load(dir, &c);
    CHECK(rc == 0 && c.max_seq_length == 6, "clamped max_seq_length %d (%s)", c.max_seq_length,
          err_get());
    if (rc == 0) model_config_free(&c);
    free(dir);

    /* Modules embedrag would silently skip are refused. */
    dir = make_config_dir("dense", "modules.json",
                          "[{\"path\":\"\",\"type\":\"sentence_transformers.models.Transformer\"},"
                          "{\"path\":\"2_Dense\",\"type\":\"sentence_transformers.models.Dense\"}]",
                          (const char *)NULL);
    rc = model_config_load(dir, &c);
    CHECK(rc == EMBEDRAG_ERR_UNSUPPORTED && contains(err_get(), "modules.json") &&
              contains(err_get(), "sentence_transformers.models.Dense"),
          "Dense module: rc %d: %s", rc, err_get());
    free(dir);

    dir = make_config_dir("escape", "modules.json",
                          "[{\"path\":\"../x\",\"type\":\"sentence_transformers.models.Pooling\"}]",
                          (const char *)NULL);
    rc = model_config_load(dir, &c);
    CHECK(rc == EMBEDRAG_ERR_FORMAT && contains(err_get(), "../x"), "pooling path escaping: %s",
          err_get());
    free(dir);

    dir = make_config_dir("pooling-missing", "modules.json", modules_pooling_only,
                          (const char *)NULL);
    rc = model_config_load(dir, &c);
    CHECK(rc == EMBEDRAG_ERR_IO && contains(err_get(), "1_Pooling/config.json"),
          "listed pooling config missing: %s", err_get());
    free(dir);

    dir = make_config_dir("modules-bad", "modules.json", "{\"a\":1}", (const char *)NULL);
    rc = model_config_load(dir, &c);
    CHECK(rc == EMBEDRAG_ERR_FORMAT && contains(err_get(), "modules.json"), "modules object: %s",
          err_get());
    free(dir);

    dir = make_config_dir("seq-bad", "sentence_bert_config.json", "{\"max_seq_length\":0}",
                          (const char *)NULL);
    rc = model_config_load(dir, &c);
    CHECK(rc == EMBEDRAG_ERR_FORMAT && contains(err_get(), "sentence_bert_config.json") &&
              contains(err_get(), "max_seq_length"),
          "max_seq_length 0: %s", err_get());
    free(dir);

    /* config.json missing, and a non-BERT config.json through model_config_load. */
    dir = make_dir("empty-dir");
    rc = model_config_load(dir, &c);
    CHECK(rc == EMBEDRAG_ERR_IO && contains(err_get(), "empty-dir/config.json"),
          "missing config.json: rc %d: %s", rc, err_get());
    CHECK(c.name == NULL, "config left empty");
    write_text(dir, "config.json", "{\"model_type\":\"xlm-roberta\"," BASE_FIELDS "}");
    rc = model_config_load(dir, &c);
    CHECK(rc == EMBEDRAG_ERR_UNSUPPORTED && contains(err_get(), "config.json: model_type "
                                                                "'xlm-roberta' is not supported"),
          "xlm-roberta: %s", err_get());
    free(dir);
}

static void test_config_prompts(void)
{
    model_config c;
    char *dir = make_config_dir(
        "prompts", "config_sentence_transformers.json",
        "{\"prompts\":{\"query\":\"query: \",\"passage\":\"passage: \",\"empty\":\"\"},"
        "\"default_prompt_name\":\"query\",\"similarity_fn_name\":\"cosine\"}",
        (const char *)NULL);
    int rc = model_config_load(dir, &c);
    CHECK(rc == 0, "prompts: %s", err_get());
    if (rc == 0) {
        CHECK(c.prompt_count == 3, "prompt_count %d", c.prompt_count);
        bool query = false, passage = false, empty = false;
        for (int i = 0; i < c.prompt_count; i++) {
            if (strcmp(c.prompts[i].name, "query") == 0)
                query = strcmp(c.prompts[i].text, "query: ") == 0;
            if (strcmp(c.prompts[i].name, "passage") == 0)
                passage = strcmp(c.prompts[i].text, "passage: ") == 0;
            if (strcmp(c.prompts[i].name, "empty") == 0) empty = c.prompts[i].text[0] == '\0';
        }
        CHECK(query && passage && empty, "prompt texts");
        CHECK(c.default_prompt_name && strcmp(c.default_prompt_name, "query") == 0,
              "default_prompt_name %s", c.default_prompt_name);
        model_config_free(&c);
    }
    free(dir);

    dir = make_config_dir("prompts-null", "config_sentence_transformers.json",
                          "{\"prompts\":{},\"default_prompt_name\":null}", (const char *)NULL);
    rc = model_config_load(dir, &c);
    CHECK(rc == 0 && c.prompt_count == 0 && c.default_prompt_name == NULL, "empty prompts: %s",
          err_get());
    if (rc == 0) model_config_free(&c);
    free(dir);

    struct {
        const char *name, *json, *needle;
    } bad[] = {
        {"prompts-unknown-default",
         "{\"prompts\":{\"query\":\"q: \"},\"default_prompt_name\":"
         "\"passage\"}",
         "default_prompt_name 'passage'"},
        {"prompts-not-string", "{\"prompts\":{\"query\":3}}", "prompt 'query'"},
        {"prompts-twice", "{\"prompts\":{\"query\":\"a\",\"query\":\"b\"}}", "twice"},
        {"prompts-array", "{\"prompts\":[\"q\"]}", "prompts"},
    };
    /* A hostile number of prompts is refused before the duplicate check. */
    char *many = malloc(1100 * 16 + 32);
    size_t at = (size_t)sprintf(many, "{\"prompts\":{");
    for (int i = 0; i < 1100; i++)
        at += (size_t)sprintf(many + at, "%s\"p%d\":\"\"", i ? "," : "", i);
    sprintf(many + at, "}}");
    dir = make_config_dir("prompts-many", "config_sentence_transformers.json", many,
                          (const char *)NULL);
    rc = model_config_load(dir, &c);
    CHECK(rc == EMBEDRAG_ERR_FORMAT && contains(err_get(), "1100 entries"), "1100 prompts: %s",
          err_get());
    free(dir);
    free(many);

    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        dir = make_config_dir(bad[i].name, "config_sentence_transformers.json", bad[i].json,
                              (const char *)NULL);
        rc = model_config_load(dir, &c);
        CHECK(rc == EMBEDRAG_ERR_FORMAT &&
                  contains(err_get(), "config_sentence_transformers.json") &&
                  contains(err_get(), bad[i].needle),
              "%s: rc %d: %s", bad[i].name, rc, err_get());
        CHECK(c.prompts == NULL && c.prompt_count == 0, "%s: config left empty", bad[i].name);
        free(dir);
    }
}

/* ---- weights ---- */

/* Loads config and weights of a tiny model directory; returns the weights rc. */
static int load_tiny(const char *dir, model_weights *w)
{
    model_config c;
    int rc = model_config_load(dir, &c);
    CHECK(rc == 0, "%s: config: %s", dir, err_get());
    if (rc) return rc;
    rc = model_weights_load(dir, &c, w);
    model_config_free(&c);
    return rc;
}

static void test_weights_tiny_f32_model_with_prefixes(void)
{
    static const char *const prefixes[] = {"", "bert.", "0.auto_model."};
    for (int i = 0; i < 3; i++) {
        char name[64];
        snprintf(name, sizeof name, "tiny-f32-%d", i);
        tiny_options o = {.prefix = prefixes[i], .dtype = "F32", .gamma_beta = i == 1};
        char *dir = make_tiny_model(name, tiny_config, &o);
        model_weights w;
        int rc = load_tiny(dir, &w);
        CHECK(rc == 0, "prefix '%s': %s", prefixes[i], err_get());
        if (rc == 0) {
            check_tiny_values(&w, name);
            CHECK(inside_map(&w, &w.layers[1].out_ln_b) && model_tensor_f32(&w.layers[1].out_ln_b),
                  "aligned F32 is read in place");
            model_weights_free(&w);
        }
        free(dir);
    }
}

static void test_weights_misaligned_f32_reads_exactly(void)
{
    tiny_options o = {.dtype = "F32", .misaligned = true};
    char *dir = make_tiny_model("tiny-misaligned", tiny_config, &o);
    model_weights w;
    int rc = load_tiny(dir, &w);
    CHECK(rc == 0, "misaligned: %s", err_get());
    if (rc == 0) {
        check_tiny_values(&w, "misaligned F32");
        CHECK((uintptr_t)w.word_emb.data % 4 != 0 && inside_map(&w, &w.word_emb),
              "the view is the file's misaligned bytes");
        CHECK(model_tensor_f32(&w.word_emb) == NULL,
              "a misaligned tensor is not offered as floats in place");
        model_weights_free(&w);
    }
    free(dir);
}

static void test_weights_f16_and_bf16_are_converted(void)
{
    /* 20 word-embedding values (5 x 4) with the edge cases of each format. */
    static const uint16_t f16_bits[20] = {0x0000, 0x8000, 0x3c00, 0xc000, 0x0001, 0x8001, 0x03ff,
                                          0x0200, 0x0400, 0x7bff, 0x7c00, 0xfc00, 0x7e00, 0x3555,
                                          0x3bff, 0x0155, 0x4248, 0xfbff, 0x0002, 0x5640};
    static const float f16_values[20] = {
        0.0f,        -0.0f,      1.0f,      -2.0f,     0x1p-24f,  -0x1p-24f, 0x1.ff8p-15f,
        0x1p-15f,    0x1p-14f,   65504.0f,  INFINITY,  -INFINITY, NAN,       0x1.554p-2f,
        0x1.ffcp-1f, 0x155p-24f, 3.140625f, -65504.0f, 0x1p-23f,  100.0f};
    static const uint16_t bf16_bits[20] = {0x3f80, 0xc040, 0x7f80, 0xff80, 0x0001, 0x8000, 0x7fc0,
                                           0x4049, 0x3e80, 0x0080, 0x007f, 0x4780, 0x7f7f, 0x0000,
                                           0xbf80, 0x3f80, 0x3f80, 0x3f80, 0x3f80, 0x3f80};
    static const float bf16_values[20] = {1.0f,         -3.0f,    INFINITY,    -INFINITY, 0x1p-133f,
                                          -0.0f,        NAN,      3.140625f,   0.25f,     0x1p-126f,
                                          0x1.fcp-127f, 65536.0f, 0x1.fep127f, 0.0f,      -1.0f,
                                          1.0f,         1.0f,     1.0f,        1.0f,      1.0f};
    struct {
        const char *dtype;
        const uint16_t *bits;
        const float *values;
    } cases[] = {{"F16", f16_bits, f16_values}, {"BF16", bf16_bits, bf16_values}};
    for (int k = 0; k < 2; k++) {
        char name[64];
        snprintf(name, sizeof name, "tiny-%s", cases[k].dtype);
        tiny_options o = {.prefix = "bert.", .dtype = cases[k].dtype, .word16 = cases[k].bits};
        char *dir = make_tiny_model(name, tiny_config, &o);
        model_weights w;
        int rc = load_tiny(dir, &w);
        CHECK(rc == 0, "%s: %s", cases[k].dtype, err_get());
        if (rc == 0) {
            CHECK(w.word_emb.dtype == (k == 0 ? ST_F16 : ST_BF16) &&
                      w.matrix_dtype == w.word_emb.dtype && model_tensor_f32(&w.word_emb) == NULL,
                  "%s views keep the file's dtype", cases[k].dtype);
            for (int i = 0; i < 20; i++) {
                float got = tensor_value(&w.word_emb, (size_t)i), want = cases[k].values[i];
                bool same = isnan(want) ? isnan(got) : got == want && signbit(got) == signbit(want);
                CHECK(same, "%s word_emb[%d] (0x%04x) = %a, expected %a", cases[k].dtype, i,
                      cases[k].bits[i], (double)got, (double)want);
            }
            /* Every other tensor holds tiny_value, exact in both formats. */
            CHECK(tensor_value(&w.layers[1].out_w, 31) == tiny_value(5 + 16 + 12, 31) &&
                      tensor_value(&w.position_emb, 23) == tiny_value(1, 23),
                  "%s other tensors", cases[k].dtype);
            /* Releasing drops pages, never values. */
            for (int l = 0; l < TINY_LAYERS; l++) model_weights_release_layer(&w, l);
            model_tensor_release(&w, &w.word_emb);
            CHECK(tensor_value(&w.word_emb, 2) == cases[k].values[2] &&
                      tensor_value(&w.layers[1].out_w, 31) == tiny_value(5 + 16 + 12, 31),
                  "%s values survive release", cases[k].dtype);
            model_weights_free(&w);
        }
        free(dir);
    }
}

/* Loads config text + tiny tensors and expects an error with `code` naming `needle`. */
static void expect_weights_error(const char *name, const char *config, const tiny_options *o,
                                 int code, const char *needle, const char *needle2)
{
    char *dir = make_tiny_model(name, config, o);
    model_config c;
    int rc = model_config_load(dir, &c);
    CHECK(rc == 0, "%s: config: %s", name, err_get());
    if (rc == 0) {
        model_weights w;
        rc = model_weights_load(dir, &c, &w);
        CHECK(rc == code, "%s: rc %d, expected %d (%s)", name, rc, code, err_get());
        CHECK(contains(err_get(), "model.safetensors") && contains(err_get(), needle) &&
                  (!needle2 || contains(err_get(), needle2)),
              "%s: message lacks '%s'/'%s': %s", name, needle, needle2 ? needle2 : "", err_get());
        CHECK(w.file == NULL && w.layers == NULL, "%s: weights left empty", name);
        if (rc == 0) model_weights_free(&w);
        model_config_free(&c);
    }
    free(dir);
}

static void test_weights_errors_name_the_tensor(void)
{
    tiny_options plain = {.prefix = "bert.", .dtype = "F32"};
    const int F = EMBEDRAG_ERR_FORMAT;
    /* The config lies about the width: the first tensor checked is named with both shapes. */
    const char *wide = "{\"model_type\":\"bert\",\"hidden_size\":8,\"num_hidden_layers\":2,"
                       "\"num_attention_heads\":2,\"intermediate_size\":8,\"vocab_size\":5,"
                       "\"max_position_embeddings\":6}";
    expect_weights_error("lie-hidden", wide, &plain, F,
                         "'bert.embeddings.word_embeddings.weight' has shape [5, 4]",
                         "expected [5, 8]");
    const char *inter = "{\"model_type\":\"bert\",\"hidden_size\":4,\"num_hidden_layers\":2,"
                        "\"num_attention_heads\":2,\"intermediate_size\":16,\"vocab_size\":5,"
                        "\"max_position_embeddings\":6}";
    expect_weights_error("lie-intermediate", inter, &plain, F,
                         "'bert.encoder.layer.0.intermediate.dense.weight' has shape [8, 4]",
                         "expected [16, 4]");
    const char *positions = "{\"model_type\":\"bert\",\"hidden_size\":4,\"num_hidden_layers\":2,"
                            "\"num_attention_heads\":2,\"intermediate_size\":8,\"vocab_size\":5,"
                            "\"max_position_embeddings\":512}";
    expect_weights_error("lie-positions", positions, &plain, F,
                         "'bert.embeddings.position_embeddings.weight'", "expected [512, 4]");
    const char *fewer = "{\"model_type\":\"bert\",\"hidden_size\":4,\"num_hidden_layers\":1,"
                        "\"num_attention_heads\":2,\"intermediate_size\":8,\"vocab_size\":5,"
                        "\"max_position_embeddings\":6}";
    expect_weights_error("lie-layers", fewer, &plain, F, "bert.encoder.layer.1.",
                         "num_hidden_layers");
    const char *more = "{\"model_type\":\"bert\",\"hidden_size\":4,\"num_hidden_layers\":3,"
                       "\"num_attention_heads\":2,\"intermediate_size\":8,\"vocab_size\":5,"
                       "\"max_position_embeddings\":6}";
    expect_weights_error("more-layers", more, &plain, F,
                         "'bert.encoder.layer.2.attention.self.query.weight' is missing", NULL);

    tiny_options missing = plain;
    missing.omit = "encoder.layer.1.output.LayerNorm.bias";
    expect_weights_error("missing-tensor", tiny_config, &missing, F,
                         "'bert.encoder.layer.1.output.LayerNorm.bias' is missing", NULL);
    tiny_options no_words = plain;
    no_words.omit = "embeddings.word_embeddings.weight";
    expect_weights_error("no-word-embeddings", tiny_config, &no_words, F,
                         "embeddings.word_embeddings.weight", "missing");
    tiny_options i64 = plain;
    i64.as_i64 = "encoder.layer.0.attention.self.key.bias";
    expect_weights_error("i64-tensor", tiny_config, &i64, EMBEDRAG_ERR_UNSUPPORTED,
                         "'bert.encoder.layer.0.attention.self.key.bias' has dtype I64", NULL);

    /* No model.safetensors at all. */
    char *dir = make_dir("no-weights");
    write_text(dir, "config.json", tiny_config);
    model_config c;
    int rc = model_config_load(dir, &c);
    if (rc == 0) {
        model_weights w;
        rc = model_weights_load(dir, &c, &w);
        CHECK(rc == EMBEDRAG_ERR_IO && contains(err_get(), "no-weights/model.safetensors"),
              "missing model.safetensors: rc %d: %s", rc, err_get());
        model_config_free(&c);
    }
    free(dir);
}

int main(void)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(temp_root, sizeof temp_root, "%s/embedrag-test-model-XXXXXX", tmp ? tmp : "/tmp");
    if (!mkdtemp(temp_root)) {
        perror("mkdtemp");
        return 1;
    }

    test_real_model_loads_with_expected_config_and_values();
    test_safetensors_valid_file_parses();
    test_safetensors_every_truncation_fails_cleanly();
    test_safetensors_missing_file_is_io_error();
    test_safetensors_lying_header_length_is_rejected();
    test_safetensors_malformed_headers_are_rejected();
    test_safetensors_accepts_what_real_files_contain();
    test_f16_and_bf16_widen_exactly();
    test_config_defaults_and_architecture_rules();
    test_config_sizes_are_validated();
    test_config_pooling_modes();
    test_config_modules_and_sentence_files();
    test_config_prompts();
    test_weights_tiny_f32_model_with_prefixes();
    test_weights_misaligned_f32_reads_exactly();
    test_weights_f16_and_bf16_are_converted();
    test_weights_errors_name_the_tensor();

    nftw(temp_root, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    return check_finish("test_model");
}
