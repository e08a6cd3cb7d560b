/* Engine internals shared with the CLI and the benchmark: embedding already-tokenized texts, so
 * tokenization and model time can be measured apart. */
#ifndef EMBEDRAG_ENGINE_H
#define EMBEDRAG_ENGINE_H

#include "embedrag.h"

#include <stdint.h>

/* The default token budget of one forward pass: GEMM row blocks are 112 tokens, so 2048 keeps
 * every thread busy, and activations stay near 30 MB for a 384-wide model (the intermediate
 * activation is tokens x 1536 floats). 4096 ran 2-3% faster on 200 x 128 tokens (within this
 * machine's noise) and held 30 MB more. */
#define ENGINE_DEFAULT_BATCH_TOKENS 2048

/* Texts per window: embedrag_embed tokenizes, sorts and runs at most this many texts at once, so
 * memory stays bounded however many texts a call passes. */
#define ENGINE_WINDOW_TEXTS 4096

/* Embeds `count` tokenized sequences (ids[offsets[i]..offsets[i+1]), each already with [CLS] and
 * [SEP] and within max_tokens) and post-processes like embedrag_embed (truncation to
 * params->dimensions, normalization). pool_skip may be NULL. Serialized by the model's lock. */
int engine_embed_tokens(embedrag_model *model, const int32_t *ids, const int *offsets, int count,
                        const int *pool_skip, const embedrag_embed_params *params, float *out);

/* The name of the backend that runs the model ("cpu") and the CPU kernels' instruction set. */
const char *engine_backend_name(const embedrag_model *model);
const char *engine_cpu_isa(void);

#endif
