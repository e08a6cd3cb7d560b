/* The seam between policy (the engine) and mechanism (a backend): a backend takes the model's
 * weights once, then turns packed batches of token ids into pooled, unnormalized vectors. The CPU
 * backend is the reference; any other backend (CUDA, later) is tested against it. */
#ifndef EMBEDRAG_BACKEND_H
#define EMBEDRAG_BACKEND_H

#include "model/model.h"

#include "embedrag.h"

#include <stdint.h>

/* Sequences packed back to back without padding: sequence i is ids[offsets[i] .. offsets[i+1]),
 * starting with [CLS] and ending with [SEP]. The first pool_skip[i] tokens ([CLS] counted) are
 * left out of mean and max pooling, as sentence-transformers does for a prompt when the pooling
 * config says include_prompt = false; pool_skip may be NULL (nothing skipped). */
typedef struct backend_batch {
    const int32_t *ids;
    const int *offsets; /* count + 1 entries */
    int count;
    const int *pool_skip;
} backend_batch;

typedef struct backend backend;

struct backend {
    const char *name;
    embedrag_precision precision; /* the arithmetic it runs (not just what was asked for) */
    /* Writes count rows of hidden_size floats to out: each sequence's pooled vector. */
    int (*encode)(backend *self, const backend_batch *batch, float *out);
    void (*destroy)(backend *self);
};

/* The CPU backend: repacks the GEMM weights (then releases their mapped pages), keeps the
 * embeddings mapped, and runs on `threads` threads (0 = one per core). It runs `precision` when
 * the CPU can (bfloat16 needs AMX), otherwise fp32. */
int cpu_backend_create(const model_config *config, model_weights *weights, int threads,
                       embedrag_precision precision, backend **out);

#endif
