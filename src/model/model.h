/* Model files: config.json and sentence-transformers' configs parsed into model_config, and
 * model.safetensors memory-mapped with every tensor located and its shape validated against the
 * config. Tensors are exposed as views of the file's own bytes (see model_tensor); converting them
 * is each backend's business. */
#ifndef EMBEDRAG_MODEL_H
#define EMBEDRAG_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- safetensors (prefix st_) ---- */

typedef enum st_dtype { ST_F32, ST_F16, ST_BF16, ST_OTHER } st_dtype;

#define ST_MAX_DIMS 8

typedef struct st_tensor {
    char *name;
    st_dtype dtype;
    char dtype_name[16]; /* as written in the header, for messages */
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const void *data; /* points into the mapping / buffer */
    size_t nbytes;
} st_tensor;

typedef struct st_file {
    const char *path; /* for messages; owned */
    void *map;        /* mmap base, or NULL when parsed from a caller buffer */
    size_t map_size;
    st_tensor *tensors;
    int tensor_count;
} st_file;

/* Maps `path` read-only and parses its header; validates that every tensor's byte range lies
 * inside the file, matches dtype x shape, and that ranges do not overlap. */
int st_open(const char *path, st_file **out);

/* Parses a safetensors image already in memory (not copied: `data` must outlive the result).
 * `name` is used in messages. Used by st_open and the fuzz target. */
int st_parse(const void *data, size_t size, const char *name, st_file **out);

/* The tensor named `name`, or NULL. The pointer is valid until st_close. */
const st_tensor *st_find(const st_file *file, const char *name);
void st_close(st_file *file);

/* Exact widening of one IEEE half (F16) or bfloat16 (BF16) value, subnormals, infinities and
 * NaNs included. */
float st_f16_to_f32(uint16_t half);
float st_bf16_to_f32(uint16_t bfloat);

/* ---- configuration (prefix model_) ---- */

typedef enum model_activation {
    MODEL_ACT_GELU,      /* exact erf GELU ("gelu") */
    MODEL_ACT_GELU_TANH, /* tanh approximation ("gelu_new", "gelu_pytorch_tanh", "gelu_fast") */
    MODEL_ACT_RELU,
} model_activation;

typedef struct model_prompt {
    char *name;
    char *text;
} model_prompt;

typedef struct model_config {
    char *name; /* _name_or_path, else the directory's base name */
    int vocab_size, hidden_size, num_layers, num_heads, intermediate_size;
    int max_position_embeddings, type_vocab_size;
    float layer_norm_eps;
    model_activation activation;
    int max_seq_length; /* min(max_position_embeddings, sentence_bert_config max_seq_length) */
    int pooling;        /* embedrag_pooling; mean when modules.json names no Pooling module */
    bool pooling_include_prompt; /* 1_Pooling include_prompt, default true */
    bool normalize;              /* modules.json lists a Normalize module */
    model_prompt *prompts;
    int prompt_count;
    char *default_prompt_name; /* or NULL */
} model_config;

/* Reads config.json (required) and, where present, modules.json, 1_Pooling/config.json (or the
 * pooling module's path from modules.json), sentence_bert_config.json and
 * config_sentence_transformers.json from `dir`. Rejects non-BERT architectures it cannot run
 * (EMBEDRAG_ERR_UNSUPPORTED) and nonsense values (EMBEDRAG_ERR_FORMAT), naming file and field. */
int model_config_load(const char *dir, model_config *out);

/* Parses config.json text alone (used by model_config_load and the fuzz target). */
int model_config_parse(const char *json, size_t length, const char *filename, model_config *out);

void model_config_free(model_config *config);

/* ---- weights: immutable views of the file's tensors ---- */

/* One tensor as stored in model.safetensors: the file's own bytes (F32, F16 or BF16,
 * little-endian, possibly misaligned), never converted. Any number of backends read the same
 * views, each into its own layout (packed fp32 or half on the CPU, uploaded fp16 to a GPU). */
typedef struct model_tensor {
    const char *name; /* as written in the file; valid while the weights are open */
    st_dtype dtype;   /* ST_F32, ST_F16 or ST_BF16 */
    int64_t rows;     /* 1 for a vector */
    int64_t cols;
    const void *data; /* inside the read-only mapping */
    size_t nbytes;
} model_tensor;

static inline size_t model_tensor_elements(const model_tensor *t)
{
    return (size_t)t->rows * (size_t)t->cols;
}

/* Widens elements [first, first + count) of `t` to float32 into out (exact for every format:
 * subnormals, infinities and NaNs included). */
void model_tensor_read_f32(const model_tensor *t, size_t first, size_t count, float *out);

/* The tensor's data as floats when it is stored as F32 at a 4-byte aligned address, else NULL
 * (then read it with model_tensor_read_f32). */
const float *model_tensor_f32(const model_tensor *t);

typedef struct model_layer_weights {
    model_tensor query_w, query_b, key_w, key_b, value_w, value_b; /* [H x H], [H] */
    model_tensor attn_out_w, attn_out_b;                           /* [H x H], [H] */
    model_tensor attn_ln_w, attn_ln_b;                             /* [H] */
    model_tensor inter_w, inter_b; /* [I x H], [I] (PyTorch Linear: out x in) */
    model_tensor out_w, out_b;     /* [H x I], [H] */
    model_tensor out_ln_w, out_ln_b;
} model_layer_weights;

typedef struct model_weights {
    st_file *file;
    model_tensor word_emb;     /* [vocab x H] */
    model_tensor position_emb; /* [max_position x H] */
    model_tensor type_emb;     /* [type_vocab x H]; row 0 is used (token type ids are 0) */
    model_tensor emb_ln_w, emb_ln_b;
    model_layer_weights *layers; /* layer_count entries (config's num_layers) */
    int layer_count;
    /* The dtype every encoder weight matrix shares, or ST_OTHER when they differ: a backend may
     * keep half-precision matrices as they are. */
    st_dtype matrix_dtype;
} model_weights;

/* Maps dir/model.safetensors and finds every tensor of a BertModel, with or without a "bert."
 * (or other single) prefix, accepting LayerNorm "weight/bias" or "gamma/beta" names. Every shape
 * is checked against `config`; a missing or mis-shaped tensor is an EMBEDRAG_ERR_FORMAT error
 * naming the tensor, its shape and the expected one. The views stay valid until
 * model_weights_free. */
int model_weights_load(const char *dir, const model_config *config, model_weights *out);

/* Tells the kernel the mapped pages of `t` are not needed now: called by the engine once every
 * backend holds its own copy. The view stays valid; touched again, its pages are re-read from
 * the file. */
void model_tensor_release(const model_weights *weights, const model_tensor *t);

/* Releases encoder layer `layer`'s tensors (model_tensor_release). */
void model_weights_release_layer(const model_weights *weights, int layer);

/* Maps a tensor's pages in now: for tables read a few rows at a time on the latency path, such
 * as the word embeddings, where each new token would otherwise take a page fault in the middle
 * of a query. */
void model_tensor_prefault(const model_weights *weights, const model_tensor *t);

void model_weights_free(model_weights *weights);

#endif
