/* What the CUDA backend offers beyond the seam (backend.h), for benchmarks and tests that know
 * they hold a CUDA stream. Compiled only into builds with the CUDA backend. */
#ifndef EMBEDRAG_CUDA_BACKEND_H
#define EMBEDRAG_CUDA_BACKEND_H

#include "backend/backend.h"

/* Batches of at most this many tokens replay a captured CUDA graph (when the stream's reservation
 * holds the graph's bucket); larger ones launch their kernels directly. */
#define CUDA_GRAPH_MAX_TOKENS 1024

/* Device time of the stream's last waited-on batch, in seconds: CUDA events recorded before its
 * upload and after its download, so the forward pass and both transfers; 0 before the first. */
double cuda_stream_last_seconds(const backend_stream *stream);

/* Whether the stream's last batch replayed a captured CUDA graph. */
bool cuda_stream_last_used_graph(const backend_stream *stream);

#endif
