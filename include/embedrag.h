/* embedrag — sentence embeddings with BERT-family models, in C.
 * This header is the whole public API and its manual: open a model directory, embed texts into a
 * caller-owned float matrix, tokenize, and read model facts. Everything else is internal. */
#ifndef EMBEDRAG_H
#define EMBEDRAG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The one place the version is written: CMakeLists.txt reads these three lines. NUMBER is
 * MAJOR * 10000 + MINOR * 100 + PATCH, for #if comparisons; STRING is "MAJOR.MINOR.PATCH", what
 * embedrag_version() returns from the library actually linked. */
#define EMBEDRAG_VERSION_MAJOR 0
#define EMBEDRAG_VERSION_MINOR 1
#define EMBEDRAG_VERSION_PATCH 0
#define EMBEDRAG_VERSION_NUMBER                                                                    \
    (EMBEDRAG_VERSION_MAJOR * 10000 + EMBEDRAG_VERSION_MINOR * 100 + EMBEDRAG_VERSION_PATCH)
#define EMBEDRAG_VERSION_JOIN_(major, minor, patch) #major "." #minor "." #patch
#define EMBEDRAG_VERSION_JOIN(major, minor, patch) EMBEDRAG_VERSION_JOIN_(major, minor, patch)
#define EMBEDRAG_VERSION_STRING                                                                    \
    EMBEDRAG_VERSION_JOIN(EMBEDRAG_VERSION_MAJOR, EMBEDRAG_VERSION_MINOR, EMBEDRAG_VERSION_PATCH)

/* The library is built with hidden visibility; only what this header declares is exported. */
#if defined(__GNUC__)
#define EMBEDRAG_API __attribute__((visibility("default")))
#else
#define EMBEDRAG_API
#endif

/* Status codes. Action functions return EMBEDRAG_OK (0) or one of the negative codes below; the
 * message with context (file, field, text index, byte offset) is then in embedrag_last_error()
 * on the calling thread, and embedrag_status_text() names the code itself. */
typedef enum embedrag_status {
    EMBEDRAG_OK = 0,
    EMBEDRAG_ERR_INVALID_ARGUMENT = -1, /* a NULL where a value is required, a bad option */
    EMBEDRAG_ERR_IO = -2,               /* a file could not be opened, read or mapped */
    EMBEDRAG_ERR_FORMAT = -3,           /* a model file is malformed, truncated or inconsistent */
    EMBEDRAG_ERR_UNSUPPORTED = -4, /* a valid feature (or device) this build or machine lacks */
    EMBEDRAG_ERR_NO_MEMORY = -5,
    EMBEDRAG_ERR_INVALID_UTF8 = -6,    /* a text is not valid UTF-8 */
    EMBEDRAG_ERR_TOO_LONG = -7,        /* a text exceeds the model's limit and truncation is off */
    EMBEDRAG_ERR_BUSY = -8,            /* a queue or a resource is full: try again later */
    EMBEDRAG_ERR_NOT_FOUND = -9,       /* a named thing (document, prompt, device) does not exist */
    EMBEDRAG_ERR_DEVICE = -10,         /* a device failed while running (a GPU error) */
    EMBEDRAG_ERR_DATABASE = -11,       /* the document store's database failed */
    EMBEDRAG_ERR_MODEL_MISMATCH = -12, /* data made with one model meets another */
} embedrag_status;

/* The fixed text of a status code, e.g. "invalid UTF-8" for EMBEDRAG_ERR_INVALID_UTF8 and
 * "unknown status" for a value not listed above (as sqlite3_errstr). A static string.
 * Thread-safe. */
EMBEDRAG_API const char *embedrag_status_text(int status);

typedef enum embedrag_pooling {
    EMBEDRAG_POOLING_MEAN = 0, /* mean of the token vectors (sentence-transformers' default) */
    EMBEDRAG_POOLING_CLS = 1,  /* the [CLS] token's vector (bge) */
    EMBEDRAG_POOLING_MAX = 2,  /* element-wise maximum over the tokens */
} embedrag_pooling;

/* An open model: weights, tokenizer and configuration. Opaque. */
typedef struct embedrag_model embedrag_model;

/* Returns the library version as "MAJOR.MINOR.PATCH"; a static string. Thread-safe. */
EMBEDRAG_API const char *embedrag_version(void);

/* Returns the message describing the last failure on the calling thread (thread-local storage,
 * valid until the next embedrag call on this thread); "" if there was none. Thread-safe. This is
 * where embedrag_model_open's errors go; a call's error is here even when the work failed on
 * another thread (the engine carries it back). */
EMBEDRAG_API const char *embedrag_last_error(void);

/* When the last failure on the calling thread concerned one text of an embedrag_embed call (it
 * is NULL, not valid UTF-8, or too long with truncation off), returns that text's index in the
 * call's `texts`; otherwise -1. Valid until the next embedrag call on this thread. Thread-safe. */
EMBEDRAG_API long embedrag_last_error_index(void);

/* The former name of embedrag_last_error_index, kept while the version is 0.x. */
EMBEDRAG_API long embedrag_last_error_text(void);

/* The arithmetic of the forward pass's matrix products. */
typedef enum embedrag_precision {
    /* fp32 throughout (the CPU's default): matches sentence-transformers within float rounding.
     * On a GPU, its accuracy mode (several times slower than fp16 there). */
    EMBEDRAG_PRECISION_FP32 = 0,
    /* Opt-in, for CPUs with AMX-BF16 (Intel Xeon since Sapphire Rapids) or AVX512-BF16 (AMD Zen
     * 4 and 5, Intel Cooper Lake): the weights and each matrix product's inputs are rounded to
     * bfloat16, sums stay fp32. With AVX512-BF16 the attention's two products (queries by keys,
     * probabilities by values) take bfloat16 inputs too; the softmax, LayerNorm, GELU and
     * pooling stay fp32. About 3x the bulk throughput with AMX and 1.8-2x with AVX512-BF16
     * (measured on AMD Zen 4), about half the single-query latency with either; a vector's
     * cosine to its fp32 counterpart is typically 0.99999 and was at worst 0.9977 over the
     * tests' texts (BENCHMARKS.md), and it is still identical alone or in any batch. Where the
     * CPU cannot run it, the model opens in fp32 and embedrag_model_info.precision says so. An
     * unknown value is EMBEDRAG_ERR_INVALID_ARGUMENT. */
    EMBEDRAG_PRECISION_BF16 = 1,
    /* IEEE half-precision weights and activations with fp32 sums: a GPU's fast mode and its
     * default. The CPU runs fp32 when asked for it; embedrag_backend_info.precision says what
     * each backend runs. */
    EMBEDRAG_PRECISION_FP16 = 2,
    /* Each backend's own default (embedrag_model_default_params' choice): fp32 on the CPU,
     * fp16 on a GPU. */
    EMBEDRAG_PRECISION_AUTO = 3,
} embedrag_precision;

/* Where work runs. A model opens a backend per device it may use (the CPU always); each
 * embedrag_embed call may then pick one, or leave the choice to the engine, which sends the
 * call where it is estimated to finish first (queued work included). */
typedef enum embedrag_device {
    EMBEDRAG_DEVICE_AUTO = 0, /* model: the CPU plus every GPU found; call: the engine picks */
    EMBEDRAG_DEVICE_CPU = 1,
    EMBEDRAG_DEVICE_GPU = 2, /* model: fail unless a GPU backend opens; call: a GPU only */
} embedrag_device;

/* Which queue a call joins. Each backend serves two: latency work (a query) runs ahead of bulk
 * work (indexing) already running, on the CPU within about one matrix product's time (a few
 * milliseconds) rather than after the bulk call. */
typedef enum embedrag_lane {
    EMBEDRAG_LANE_AUTO = 0,    /* latency for calls of at most 512 tokens in all, else bulk */
    EMBEDRAG_LANE_LATENCY = 1, /* served first; batches of up to 512 tokens */
    EMBEDRAG_LANE_BULK = 2,    /* large token-budget batches for throughput */
} embedrag_lane;

/* Parameters for embedrag_model_open. Obtain defaults with embedrag_model_default_params() and
 * adjust fields; new fields are added at the end with defaults that keep old behaviour. */
typedef struct embedrag_model_params {
    int threads;                  /* worker threads for the forward pass; 0 = one per online core */
    embedrag_precision precision; /* requested; default EMBEDRAG_PRECISION_AUTO */
    embedrag_device device;       /* which backends to open; default EMBEDRAG_DEVICE_AUTO */
} embedrag_model_params;

EMBEDRAG_API embedrag_model_params embedrag_model_default_params(void);

/* Opens the Hugging Face model directory `dir` (config.json, model.safetensors, tokenizer.json or
 * vocab.txt, and sentence-transformers' files where present) and validates every tensor's shape
 * against the config. On success *out is a model the caller frees with embedrag_model_close; on
 * failure *out is NULL and embedrag_last_error() names the file and what is wrong. `params` may
 * be NULL for defaults. Thread-safe (distinct calls do not share state). */
EMBEDRAG_API int embedrag_model_open(const char *dir, const embedrag_model_params *params,
                                     embedrag_model **out);

/* Frees the model and everything it owns. close(NULL) is a no-op. Not to be called while
 * another thread uses the model. */
EMBEDRAG_API void embedrag_model_close(embedrag_model *model);

/* The error of the latest failed call on this model, from whichever thread made it (as
 * sqlite3_errmsg): copies its message into buffer (cut to size, NUL-terminated; buffer may be
 * NULL when size is 0) and returns its status, or 0 and "" when no call on it has failed. For
 * code that shares a model across threads and reports errors elsewhere; the calling thread's
 * own error is embedrag_last_error(). Thread-safe. */
EMBEDRAG_API int embedrag_model_last_error(const embedrag_model *model, char *buffer, size_t size);

/* Facts about an open model. String pointers stay valid until the model is closed. */
typedef struct embedrag_model_info {
    const char *name; /* the model directory's name */
    int dimension;    /* the pooled vector's width (before any Matryoshka truncation) */
    int max_tokens;   /* the most tokens per text, [CLS] and [SEP] included */
    int layers;       /* encoder layers */
    int hidden;       /* hidden width */
    int heads;        /* attention heads */
    int vocab_size;   /* vocabulary entries */
    embedrag_pooling pooling;
    bool normalize;                  /* whether the model's pipeline L2-normalizes (modules.json) */
    bool lowercase;                  /* whether the tokenizer lowercases (uncased model) */
    int prompt_count;                /* prompts named in config_sentence_transformers.json */
    const char *default_prompt_name; /* NULL when the model names none */
    int intermediate;                /* feed-forward width */
    embedrag_precision precision;    /* what the CPU backend runs (see embedrag_precision) */
    int backend_count;               /* backends open (embedrag_model_get_backend) */
} embedrag_model_info;

/* Fills *info. Returns 0, or EMBEDRAG_ERR_INVALID_ARGUMENT for NULL arguments. Thread-safe. */
EMBEDRAG_API int embedrag_model_get_info(const embedrag_model *model, embedrag_model_info *info);

/* One backend of an open model. Strings stay valid until the model is closed. */
typedef struct embedrag_backend_info {
    const char *name;             /* "cpu", "cuda:0" */
    const char *device;           /* the hardware: "AMD EPYC (avx512, 2 threads)" */
    const char *kernels;          /* the matrix-product kernels: "avx512", "amx-bf16", ... */
    embedrag_device kind;         /* EMBEDRAG_DEVICE_CPU or EMBEDRAG_DEVICE_GPU */
    embedrag_precision precision; /* what it runs */
    int batch_tokens;             /* the bulk lane's default tokens per batch */
    int max_batch_tokens;         /* the most tokens one batch may hold */
    /* NULL while the backend works; once a GPU has failed (a batch, or its test batch at
     * open), why, and the engine no longer sends it work. */
    const char *failure;
    /* The device's peak FLOP/s for the arithmetic it runs (a GPU's dense tensor rate at its
     * highest clock), or 0 when unknown (the CPU: `embedrag bench` measures its FMA peak). */
    double peak_flops;
} embedrag_backend_info;

/* Fills *info for backend i (0 <= i < backend_count; 0 is the CPU). Returns 0 or
 * EMBEDRAG_ERR_INVALID_ARGUMENT. Thread-safe. */
EMBEDRAG_API int embedrag_model_get_backend(const embedrag_model *model, int i,
                                            embedrag_backend_info *info);

/* The work backend i has finished since the model opened, on one lane: what the engine's
 * routing chose, as counters (`GET /metrics` of `embedrag serve` exports them). A batch that
 * failed is not counted; the timing batches the engine runs at open when it has a GPU are. */
typedef struct embedrag_backend_work {
    uint64_t batches; /* forward passes */
    uint64_t texts;   /* sequences embedded */
    uint64_t tokens;  /* their tokens, [CLS] and [SEP] included */
    double seconds;   /* the backend's own time for those batches (a GPU's from CUDA events) */
} embedrag_backend_work;

/* Fills *work for backend i and `lane` (EMBEDRAG_LANE_LATENCY or EMBEDRAG_LANE_BULK; AUTO sums
 * both). Returns 0 or EMBEDRAG_ERR_INVALID_ARGUMENT. Thread-safe. */
EMBEDRAG_API int embedrag_model_get_backend_work(const embedrag_model *model, int i,
                                                 embedrag_lane lane, embedrag_backend_work *work);

/* The router's estimate of the seconds backend i would take for `texts` texts of
 * `tokens_per_text` tokens each on an idle device (its measured cost line: the engine times each
 * backend at open when there is more than one, and every completed batch refines it). Comparing
 * backends gives the crossover where a GPU starts to win. Returns 0 or
 * EMBEDRAG_ERR_INVALID_ARGUMENT. Thread-safe. */
EMBEDRAG_API int embedrag_model_estimate_seconds(const embedrag_model *model, int i, size_t texts,
                                                 int tokens_per_text, double *seconds);

/* Why the model has no GPU backend ("this build of embedrag has no GPU backend ...", "no CUDA
 * device found"), or NULL when it has one. Valid until the model is closed. Thread-safe. */
EMBEDRAG_API const char *embedrag_model_gpu_unavailable(const embedrag_model *model);

/* The i-th prompt's name and text (0 <= i < prompt_count), e.g. "query" and "query: ".
 * Returns 0 or EMBEDRAG_ERR_INVALID_ARGUMENT. The strings stay valid until the model is closed.
 * Thread-safe. */
EMBEDRAG_API int embedrag_model_get_prompt(const embedrag_model *model, int i, const char **name,
                                           const char **text);

/* Options for one embedding or tokenizing call. Obtain defaults with
 * embedrag_embed_default_params() and adjust fields. */
typedef struct embedrag_embed_params {
    const char *prompt_name; /* a prompt from the model's config ("query", "passage"), or NULL */
    const char *prompt;      /* literal text to prepend; overrides prompt_name; NULL for none */
    bool normalize;          /* L2-normalize the output vectors (default true) */
    int dimensions;          /* keep the first N components (Matryoshka); 0 = all */
    bool truncate;    /* cut texts at the model's max_tokens (default true); if false, a longer text
                         is an EMBEDRAG_ERR_TOO_LONG error */
    int batch_tokens; /* the most tokens in one forward pass (bounds memory); 0 = the backend's
                         default; at most the backend's max_batch_tokens */
    embedrag_device device; /* where to run; default EMBEDRAG_DEVICE_AUTO */
    embedrag_lane lane;     /* which queue; default EMBEDRAG_LANE_AUTO */
    /* NULL (the default): a text that cannot be embedded fails the whole call. Otherwise n
     * entries the call fills: 0 for each text embedded, or its status (EMBEDRAG_ERR_INVALID_UTF8,
     * EMBEDRAG_ERR_TOO_LONG, EMBEDRAG_ERR_INVALID_ARGUMENT for a NULL text); such a text's row is
     * filled with NaN, the others are embedded, and the call returns 0; embedrag_last_error()
     * and embedrag_last_error_index() then describe the first such text. */
    int *statuses;
    /* Which end of a text longer than the model's limit truncation keeps: false (the default)
     * keeps the start, true the end (TEI's truncation_direction "Left"); [CLS] and [SEP] stay
     * either way, and a prompt, being at the start, is cut first. */
    bool truncate_left;
} embedrag_embed_params;

EMBEDRAG_API embedrag_embed_params embedrag_embed_default_params(void);

/* The width of the vectors embedrag_embed writes with these params (the model's dimension, or
 * `dimensions` when smaller). Returns a negative code for bad params. Thread-safe. */
EMBEDRAG_API int embedrag_embed_dimension(const embedrag_model *model,
                                          const embedrag_embed_params *params);

/* Embeds n texts. texts[i] is UTF-8 of lengths[i] bytes (lengths may be NULL: then each text is
 * NUL-terminated). Writes n rows of embedrag_embed_dimension() floats, row-major, into `out`,
 * which the caller owns and must size. On failure nothing useful is in `out` and the message
 * names the text's index (embedrag_last_error_index) and, for invalid UTF-8, the byte offset;
 * see params->statuses to go on past bad texts instead. `params` may be NULL for defaults.
 *
 * Exactness: on the CPU, in one precision, a text's vector does not depend on the other texts
 * in the call or in concurrent calls, their order, the lane or the thread count (bit for bit).
 * On a GPU the same batch gives the same bits on every run, but a text alone and in a batch may
 * differ in the last bits (cuBLASLt picks its algorithm by batch size): cosine >= 0.99999 in fp16
 * and fp32, 0.9999 in bf16. Across backends and precisions: the CPU's fp32 vectors match
 * sentence-transformers within cosine 0.99999; a GPU's fp16 or bf16 vectors are held to cosine
 * >= 0.9995 of the CPU's, its fp32 mode to 0.99999; CPU bf16 see EMBEDRAG_PRECISION_BF16. Pin
 * params->device when vectors from several calls must be compared bit for bit.
 *
 * Thread-safe: any number of threads may call it on one model. Calls join a lane (params->lane)
 * and share its batches; a small call on the latency lane is served while a bulk call runs,
 * between two steps of the bulk call's forward pass. */
EMBEDRAG_API int embedrag_embed(embedrag_model *model, const char *const *texts,
                                const size_t *lengths, size_t n,
                                const embedrag_embed_params *params, float *out);

/* Embeds n sequences of token ids, as embedrag_tokenize returns them ([CLS] and [SEP]
 * included; no prompt is added): sequence i is ids[offsets[i] .. offsets[i + 1]), offsets has
 * n + 1 entries (offsets[0] need not be 0, so a caller can pass a slice of a larger call). Writes
 * rows as embedrag_embed does, with the same exactness; params' prompt, truncate and statuses
 * fields do not apply. A sequence that is empty, longer than the model's positions, or holds an id
 * outside the vocabulary is EMBEDRAG_ERR_INVALID_ARGUMENT naming it. Thread-safe. */
EMBEDRAG_API int embedrag_embed_tokens(embedrag_model *model, const int32_t *ids,
                                       const size_t *offsets, size_t n,
                                       const embedrag_embed_params *params, float *out);

/* Tokenizes one text exactly as embedrag_embed would (prompt, [CLS]/[SEP], truncation).
 * Writes at most `capacity` ids into `ids` and the full count into *count (which may exceed
 * capacity: call again with a larger buffer). Thread-safe. */
EMBEDRAG_API int embedrag_tokenize(const embedrag_model *model, const char *text, size_t length,
                                   const embedrag_embed_params *params, int32_t *ids,
                                   size_t capacity, size_t *count);

/* The vocabulary entry for a token id, or NULL if out of range. The string stays valid until
 * the model is closed. Thread-safe. */
EMBEDRAG_API const char *embedrag_token_text(const embedrag_model *model, int32_t id);

/* ---- The document store: index documents, search them ----
 *
 * A store is one SQLite file (with "-wal", "-shm" and the search copy "-vectors" beside it)
 * holding documents, their chunks with byte offsets, one vector per chunk and a BM25 text index,
 * under the identity of the model that made the vectors (a store refuses another model). The
 * `embedrag index`, `search` and `stats` commands use this API. A store handle is used by one
 * thread at a time; one process writes a store at a time (another gets EMBEDRAG_ERR_BUSY), and
 * any number read it, also while it is written. Every add is committed before the call returns:
 * a process killed at any moment leaves the store as it was after the last call (or the last
 * batch of a large call). Errors come as a status with embedrag_last_error() naming the file. */
typedef struct embedrag_store embedrag_store;

typedef struct embedrag_store_params {
    bool read_only;     /* open an existing store to search it only (default false: create it
                           when absent, and take the writer's lock) */
    int threads;        /* threads one search scans with; 0 (default) = every core */
    int overlap_tokens; /* tokens consecutive chunks of a document share; -1 (default): the
                           chunker's choice */
} embedrag_store_params;

EMBEDRAG_API embedrag_store_params embedrag_store_default_params(void);

/* Opens the store at `path` with `model`, the model of its vectors: needed to add documents
 * and to search by text, and checked against the store's identity (name and dimension; to
 * write, also pooling, prompt and weights): EMBEDRAG_ERR_MODEL_MISMATCH names both. A
 * read-only store may be opened with model NULL to search by vector. The model must stay open
 * until the store is closed. `params` may be NULL for defaults. */
EMBEDRAG_API int embedrag_store_open(const char *path, embedrag_model *model,
                                     const embedrag_store_params *params, embedrag_store **out);

/* Closes the store (NULL is a no-op); everything added was already committed. */
EMBEDRAG_API void embedrag_store_close(embedrag_store *store);

/* A document to add. Its text is cut into chunks that fit the model (Markdown headings and
 * paragraphs, then sentences, then words; the title, where given, is put before each chunk) and
 * each chunk is embedded with the model's passage prompt. */
typedef struct embedrag_document {
    const char *id;       /* required: unique in the store; adding an id again replaces it */
    const char *text;     /* required: UTF-8 */
    size_t length;        /* bytes of text; 0 with a non-empty text: strlen(text) */
    const char *title;    /* or NULL */
    const char *metadata; /* a JSON object as text (filters match its fields), or NULL */
    const char *source;   /* where it came from (--path filters match it); NULL: the id */
    /* NULL, or an embedding of the whole text made elsewhere (the store's dimension, and
     * L2-normalized if searches are to be cosine): stored as the document's one chunk, without
     * model work. */
    const float *vector;
} embedrag_document;

/* Adds (or replaces) `count` documents, embedding them in large batches, and commits them
 * before returning (one transaction per batch of up to 256 documents). A document whose id is
 * stored with the same text, title, metadata and vector is left as it is, without model work.
 * A document that cannot be added (invalid UTF-8, a NULL text) does not stop the others: with
 * statuses (n entries, may be NULL) each gets 0 or its status, and embedrag_last_error() names
 * the first. Returns 0 unless the store or memory failed (then nothing of the batch in flight
 * is stored, and earlier batches are). */
EMBEDRAG_API int embedrag_store_add(embedrag_store *store, const embedrag_document *documents,
                                    size_t count, int *statuses);

/* Adds every document under a path as `embedrag index` does: a folder (its .txt and .md files,
 * walked in name order), a text file, or a JSONL file of {"id", "text", "title"?,
 * "metadata"?, "vector"?} lines. Returns 0 unless the store or memory failed; documents that
 * could not be read are counted in *failed (may be NULL). */
EMBEDRAG_API int embedrag_store_add_path(embedrag_store *store, const char *path, long *failed);

/* Deletes the document with this id and its chunks; *found (may be NULL) says whether it was
 * there. Committed before it returns. */
EMBEDRAG_API int embedrag_store_delete(embedrag_store *store, const char *id, bool *found);

typedef enum embedrag_search_mode {
    EMBEDRAG_SEARCH_DENSE = 0,  /* cosine over every vector, exact */
    EMBEDRAG_SEARCH_BM25 = 1,   /* SQLite FTS5's BM25 over chunk text */
    EMBEDRAG_SEARCH_HYBRID = 2, /* both, fused by reciprocal rank (k = 60) */
} embedrag_search_mode;

typedef struct embedrag_search_params {
    int k;                     /* results wanted (default 10) */
    embedrag_search_mode mode; /* default EMBEDRAG_SEARCH_DENSE; a search by vector is dense */
    /* Only documents whose source matches this glob (`*` any run of characters, '/' included;
     * `?` one; `[...]` a set; case-sensitive), or NULL for all. */
    const char *source_glob;
    /* Only documents whose metadata field metadata_keys[i] equals metadata_values[i] (a
     * string's text, or a number's or boolean's JSON text: "en", "2021", "true"), for every i
     * below metadata_count. */
    const char *const *metadata_keys;
    const char *const *metadata_values;
    int metadata_count;
    /* Dense: scan every vector. By default (false) a store of 50,000 vectors or more is
     * searched through 1-bit codes that pick a shortlist sized to keep recall@10 >= 0.99, and
     * the shortlist is scored exactly (the scores are exact; which chunks are found may differ
     * from the exact scan's in rare cases): 1.9 ms instead of 50 for a million vectors on two
     * cores. */
    bool exact;
} embedrag_search_params;

EMBEDRAG_API embedrag_search_params embedrag_search_default_params(void);

/* One result: a chunk, its score (cosine for dense, BM25 for bm25, the fused score for
 * hybrid; larger is better) and where it came from. The strings stay valid until the next call
 * on the store. */
typedef struct embedrag_search_result {
    double score;
    const char *document;                  /* the document's id */
    const char *source, *title, *metadata; /* title and metadata may be NULL */
    const char *text;                      /* the chunk's text */
    int chunk;                             /* its ordinal in the document, from 0 */
    int64_t start, end;                    /* its bytes [start, end) in the document's text */
} embedrag_search_result;

/* The best params->k chunks for a question, best first; `results` has room for k and *found
 * says how many were written. The query is embedded with the model's query prompt on the
 * latency lane. A search sees every add committed before it, by this handle or another
 * process (the store's vectors are loaded once and again only after a change). */
EMBEDRAG_API int embedrag_store_search(embedrag_store *store, const char *query,
                                       const embedrag_search_params *params,
                                       embedrag_search_result *results, int *found);

/* The same by a vector of the store's dimension (an embedding the caller made). */
EMBEDRAG_API int embedrag_store_search_vector(embedrag_store *store, const float *vector,
                                              const embedrag_search_params *params,
                                              embedrag_search_result *results, int *found);

/* One stored chunk of a document. */
typedef struct embedrag_chunk {
    const char *text;
    int chunk;          /* its ordinal in the document, from 0 */
    int64_t start, end; /* its bytes [start, end) in the document's text */
    int tokens;         /* tokens as embedded */
} embedrag_chunk;

/* A stored document and its chunks, in order. */
typedef struct embedrag_document_info {
    const char *id, *source;
    const char *title, *metadata; /* or NULL */
    const embedrag_chunk *chunks;
    int chunk_count; /* 0 for an empty text */
} embedrag_document_info;

/* Fills *info with the document stored under `id`, or returns EMBEDRAG_ERR_NOT_FOUND. The
 * strings and chunks stay valid until the next call on the store. */
EMBEDRAG_API int embedrag_store_get_document(embedrag_store *store, const char *id,
                                             embedrag_document_info *info);

typedef struct embedrag_store_info {
    int64_t documents, chunks, tokens;
    int64_t bytes_on_disk; /* the database and its write-ahead log */
    int64_t search_copy_bytes;
    bool search_copy_current; /* whether "<store>-vectors" is of the current contents */
    const char *model;        /* the identity recorded: the model's name */
    int dimension;
} embedrag_store_info;

/* Strings valid until the store is closed. */
EMBEDRAG_API int embedrag_store_get_info(embedrag_store *store, embedrag_store_info *info);

#ifdef __cplusplus
}
#endif
#endif
