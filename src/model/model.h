/* Model files: config.json and sentence-transformers' configs parsed into model_config, and
 * model.safetensors memory-mapped with every tensor located and its shape validated against the
 * config. Tensors are exposed as float32: mapped in place when stored as aligned F32, converted
 * into owned buffers when stored as F16 or BF16. */
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

/* ---- weights ---- */

typedef struct model_layer_weights {
    const float *query_w, *query_b, *key_w, *key_b, *value_w, *value_b; /* [H x H], [H] */
    const float *attn_out_w, *attn_out_b;                               /* [H x H], [H] */
    const float *attn_ln_w, *attn_ln_b;                                 /* [H] */
    const float *inter_w, *inter_b; /* [I x H], [I] (PyTorch Linear: out x in) */
    const float *out_w, *out_b;     /* [H x I], [H] */
    const float *out_ln_w, *out_ln_b;
} model_layer_weights;

typedef struct model_weights {
    st_file *file;
    const float *word_emb;     /* [vocab x H] */
    const float *position_emb; /* [max_position x H] */
    const float *type_emb;     /* [type_vocab x H]; row 0 is used (token type ids are 0) */
    const float *emb_ln_w, *emb_ln_b;
    model_layer_weights *layers; /* num_layers entries */
    bool layer_matrices_f16;     /* every encoder weight matrix is stored as F16 in the file */
    void **owned;                /* buffers converted from F16/BF16 or realigned */
    int owned_count;
} model_weights;

/* Maps dir/model.safetensors and finds every tensor of a BertModel, with or without a "bert."
 * (or other single) prefix, accepting LayerNorm "weight/bias" or "gamma/beta" names. Every shape
 * is checked against `config`; a missing or mis-shaped tensor is an EMBEDRAG_ERR_FORMAT error
 * naming the tensor, its shape and the expected one. */
int model_weights_load(const char *dir, const model_config *config, model_weights *out);

/* Called by a backend once it has copied a tensor into its own layout: a converted (F16/BF16)
 * buffer is freed (the tensor's pointer must not be used again); for a mapped tensor the kernel
 * is told its pages are not needed (they are re-read from the file if touched again). */
void model_weights_release(model_weights *weights, const void *data, size_t nbytes);

/* Maps a mapped tensor's pages in now (a no-op for converted buffers): for tables read a few rows
 * at a time on the latency path, such as the word embeddings, where each new token would
 * otherwise take a page fault in the middle of a query. */
void model_weights_prefault(const model_weights *weights, const void *data, size_t nbytes);

void model_weights_free(model_weights *weights);

#endif
