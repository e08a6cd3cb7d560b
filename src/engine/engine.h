/* Engine internals shared with the CLI and the benchmark: embedding already-tokenized texts, so
 * tokenization and model time can be measured apart. */
#ifndef EMBEDRAG_ENGINE_H
#define EMBEDRAG_ENGINE_H

#include "embedrag.h"

#include <stdint.h>

/* Texts per window: embedrag_embed tokenizes, sorts and runs at most this many texts at once, so
 * memory stays bounded however many texts a call passes. */
#define ENGINE_WINDOW_TEXTS 4096

/* The latency lane's batches, and the size of call EMBEDRAG_LANE_AUTO sends there: the longest
 * sequence BERT models take, about 2 ms of 2-core CPU time for a 6-layer 384-wide model. */
#define ENGINE_LATENCY_TOKENS 512

/* Embeds `count` tokenized sequences (ids[offsets[i]..offsets[i+1]), each already with [CLS] and
 * [SEP]) and post-processes like embedrag_embed (truncation to params->dimensions,
 * normalization). Ids and lengths are validated here (0 <= id < vocab_size, 1 <= length <=
 * max_position_embeddings). pool_skip may be NULL. Thread-safe, like embedrag_embed. */
int engine_embed_tokens(embedrag_model *model, const int32_t *ids, const int *offsets, int count,
                        const int *pool_skip, const embedrag_embed_params *params, float *out);

/* The directory the model was opened from (resolved to an absolute path where it could be), so
 * that a store can record it and hash its weights. Valid until the model is closed. */
const char *engine_model_directory(const embedrag_model *model);

/* The model's tokenizer (for the chunker), valid until the model is closed. */
struct tok_tokenizer;
const struct tok_tokenizer *engine_tokenizer(const embedrag_model *model);

/* engine_embed_tokens that also returns the device seconds its batches took (a GPU's from CUDA
 * events around upload, forward pass and download; summed over GPUs when several shared the
 * call), for the benchmark's device time beside its wall time. */
int engine_embed_tokens_timed(embedrag_model *model, const int32_t *ids, const int *offsets,
                              int count, const int *pool_skip, const embedrag_embed_params *params,
                              float *out, double *device_seconds);

/* embedrag_embed_tokens (offsets as its callers hold them) that also returns the device seconds
 * of the batches that carried its sequences, as engine_embed_tokens_timed does: on the CPU the
 * time those batches held the thread pool, without their pauses for queries; each batch counted
 * whole, also where it carried other callers' sequences. The server's queue and inference times
 * come from it. */
int engine_embed_tokens_sized_timed(embedrag_model *model, const int32_t *ids,
                                    const size_t *offsets, size_t n,
                                    const embedrag_embed_params *params, float *out,
                                    double *device_seconds);

#endif
