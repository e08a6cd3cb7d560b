/* Lanes: a backend stream, a queue of requests and a token budget. Callers tokenize on their own
 * threads, queue a request and wait on it; whichever waiting caller finds the lane idle becomes
 * its leader and runs batches for everyone queued (its own and others'), so an idle lane costs
 * no thread hand-off, and concurrent requests share batches. Each sequence carries its own
 * post-processing (output row, width, normalization), so requests with different options can
 * share a batch. */
#ifndef EMBEDRAG_ENGINE_LANE_H
#define EMBEDRAG_ENGINE_LANE_H

#include "backend/backend.h"

#include <stdbool.h>
#include <stdint.h>

/* One call's tokenized sequences and where their vectors go. The caller fills the inputs and
 * keeps them (and `out`) valid until lane_run returns; the lane owns the state fields. */
typedef struct engine_request {
    const int32_t *ids;
    const int *offsets;   /* sequence i is ids[offsets[i] .. offsets[i + 1]) */
    const int *pool_skip; /* or NULL */
    const int *order;     /* the sequences to run, in this order (longest first suits batching) */
    int count;            /* entries of order */
    int batch_tokens;     /* most tokens per batch for this request; 0 = the lane's budget */
    float *out;           /* sequence i's vector goes to out + i * dim */
    int dim;              /* components kept (Matryoshka), <= the hidden width */
    bool normalize;
    double *device_sink; /* the engine adds device_seconds here after a run (or NULL) */

    /* Device seconds of the batches that carried this request's sequences (each batch counted
     * whole), summed by lane_run. */
    double device_seconds;

    /* State, guarded by the lane's lock. */
    int next;     /* entries of order handed to batches */
    int finished; /* entries of order whose vectors are written */
    bool done;
    int status;
    char message[BACKEND_MESSAGE_SIZE];
    struct engine_request *queue_next;
} engine_request;

typedef struct lane lane;

/* Creates a lane on backend b with its own stream of `priority`, reserving batches of `budget`
 * tokens (at least the longest sequence, max_len). */
int lane_create(backend *b, backend_priority priority, int budget, int max_len, int hidden,
                lane **out);
void lane_destroy(lane *l);

/* Queues the request and returns when all its vectors are written, or it failed (then the
 * calling thread's error is set from the request's message). Thread-safe. */
int lane_run(lane *l, engine_request *request);

/* Estimated seconds until a new batch of this shape would be done on this lane: the queued work
 * plus the batch itself. Thread-safe. */
double lane_cost_seconds(lane *l, int tokens, int sequences, int max_len);

/* Work a lane has finished since it was created (failed batches are not counted). */
typedef struct lane_totals {
    uint64_t batches, sequences, tokens;
    double device_seconds; /* the backend's own timing of those batches */
} lane_totals;

/* The lane's totals so far. Thread-safe. */
void lane_get_totals(lane *l, lane_totals *totals);

/* The backend this lane runs on. */
backend *lane_backend(const lane *l);

#endif
