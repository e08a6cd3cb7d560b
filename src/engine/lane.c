/* Lanes (see lane.h): a queue of requests served by a leader chosen among the waiting callers.
 * The leader forms token-budget batches from the queue in arrival order, runs them on the lane's
 * backend stream, writes each finished vector where its request wants it, and hands the lane to
 * another waiter once its own request is done. */
#include "engine/lane.h"

#include "util/error.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The most sequences one batch holds. A batch's pooled rows are staged in pinned memory sized by
 * this, not by its tokens: 131,072-token GPU batches had ~200 MB of pinned rows a lane and
 * another ~200 MB in the stream, for sequences of one token that never come; 16,384 rows of 384
 * floats are 25 MB, and 16,384 texts of 8 tokens still fill such a batch. */
#define LANE_MAX_SEQUENCES 16384

/* Where one sequence of a batch came from. */
typedef struct lane_ref {
    engine_request *request;
    int index; /* the request's sequence index */
} lane_ref;

struct lane {
    backend *backend;
    backend_stream *stream;
    int budget;    /* default tokens per batch */
    int capacity;  /* tokens the stream and the staging buffers are sized for */
    int sequences; /* sequences a batch may hold: min(capacity, LANE_MAX_SEQUENCES) */
    int max_len;
    int hidden;
    int refused; /* the smallest growth that failed for want of memory (0: none) */

    pthread_mutex_t lock;
    pthread_cond_t changed; /* a request finished or the leader left */
    engine_request *head, *tail;
    bool leader_active;
    long queued_tokens, queued_sequences; /* not yet handed to a batch */
    lane_totals totals;                   /* finished work */

    /* Staging, used only by the leader. */
    int32_t *ids;
    int *offsets, *skip;
    float *pooled;
    lane_ref *refs;
};

static void free_staging(lane *l)
{
    backend *b = l->backend;
    b->ops->host_free(b, l->ids);
    b->ops->host_free(b, l->offsets);
    b->ops->host_free(b, l->skip);
    b->ops->host_free(b, l->pooled);
    free(l->refs);
    l->ids = NULL;
    l->offsets = l->skip = NULL;
    l->pooled = NULL;
    l->refs = NULL;
    l->capacity = 0;
    l->sequences = 0;
}

/* Sizes the stream and the staging for batches of `tokens` (as many sequences at most). On
 * failure the lane keeps its previous size and still works. */
static int ensure_capacity(lane *l, int tokens)
{
    if (tokens <= l->capacity) return 0;
    backend *b = l->backend;
    int sequences = tokens < LANE_MAX_SEQUENCES ? tokens : LANE_MAX_SEQUENCES;
    int rc = b->ops->reserve(l->stream, tokens, sequences, l->max_len);
    if (rc) return rc;
    lane grown = {.backend = b};
    size_t n = (size_t)tokens, m = (size_t)sequences;
    grown.ids = b->ops->host_alloc(b, n * sizeof *grown.ids);
    grown.offsets = b->ops->host_alloc(b, (m + 1) * sizeof *grown.offsets);
    grown.skip = b->ops->host_alloc(b, m * sizeof *grown.skip);
    grown.pooled = b->ops->host_alloc(b, m * (size_t)l->hidden * sizeof *grown.pooled);
    grown.refs = malloc(m * sizeof *grown.refs);
    if (!grown.ids || !grown.offsets || !grown.skip || !grown.pooled || !grown.refs) {
        free_staging(&grown);
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for batches of %d tokens", tokens);
    }
    free_staging(l);
    l->ids = grown.ids;
    l->offsets = grown.offsets;
    l->skip = grown.skip;
    l->pooled = grown.pooled;
    l->refs = grown.refs;
    l->capacity = tokens;
    l->sequences = sequences;
    return 0;
}

int lane_create(backend *b, backend_priority priority, int budget, int max_len, int hidden,
                lane **out)
{
    *out = NULL;
    lane *l = calloc(1, sizeof *l);
    if (!l) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory creating a lane");
    l->backend = b;
    l->budget = budget > max_len ? budget : max_len;
    l->max_len = max_len;
    l->hidden = hidden;
    pthread_mutex_init(&l->lock, NULL);
    pthread_cond_init(&l->changed, NULL);
    int rc = b->ops->stream_create(b, priority, &l->stream);
    if (!rc) rc = ensure_capacity(l, l->budget);
    if (rc && rc == EMBEDRAG_ERR_NO_MEMORY && l->budget > max_len) {
        /* Too little memory for the preferred batches: batches of the longest sequence. */
        l->refused = l->budget;
        rc = ensure_capacity(l, max_len);
    }
    if (rc) {
        lane_destroy(l);
        return rc;
    }
    *out = l;
    return 0;
}

void lane_destroy(lane *l)
{
    if (!l) return;
    free_staging(l);
    if (l->stream) l->backend->ops->stream_destroy(l->stream);
    pthread_mutex_destroy(&l->lock);
    pthread_cond_destroy(&l->changed);
    free(l);
}

backend *lane_backend(const lane *l)
{
    return l->backend;
}

static int sequence_length(const engine_request *r, int index)
{
    return r->offsets[index + 1] - r->offsets[index];
}

/* Writes the final vector: the first `dim` components, L2-normalized if asked. */
static void finish_vector(const float *pooled, int dim, bool normalize, float *out)
{
    if (!normalize) {
        memcpy(out, pooled, (size_t)dim * sizeof(float));
        return;
    }
    double sum = 0.0;
    for (int i = 0; i < dim; i++) sum += (double)pooled[i] * (double)pooled[i];
    /* As torch.nn.functional.normalize: divide by max(norm, 1e-12). */
    double norm = sqrt(sum);
    float inv = (float)(1.0 / (norm > 1e-12 ? norm : 1e-12));
    for (int i = 0; i < dim; i++) out[i] = pooled[i] * inv;
}

static void dequeue(lane *l, engine_request *r)
{
    engine_request **at = &l->head, *previous = NULL;
    while (*at && *at != r) {
        previous = *at;
        at = &(*at)->queue_next;
    }
    if (!*at) return;
    *at = r->queue_next;
    if (l->tail == r) l->tail = previous;
    r->queue_next = NULL;
}

static void finish_request(lane *l, engine_request *r)
{
    r->done = true;
    dequeue(l, r);
}

/* The batch budget for a request: its own, else the lane's. */
static int request_budget(const lane *l, const engine_request *r)
{
    return r->batch_tokens > 0 ? r->batch_tokens : l->budget;
}

/* The largest batch the first queued request with work left wants (at least its next
 * sequence); 0 when nothing is queued. Called under the lock. */
static int next_batch_budget(const lane *l)
{
    for (const engine_request *r = l->head; r; r = r->queue_next) {
        if (r->next >= r->count) continue;
        int budget = request_budget(l, r);
        int len = sequence_length(r, r->order[r->next]);
        return budget > len ? budget : len;
    }
    return 0;
}

/* Takes sequences from the queue in arrival order into the staging buffers, up to `budget`
 * tokens and every request's own budget. Called under the lock; returns the sequence count. */
static int form_batch(lane *l, int budget, backend_batch *batch)
{
    int n = 0, tokens = 0, max_len = 0;
    bool skips = false;
    l->offsets[0] = 0;
    for (engine_request *r = l->head; r; r = r->queue_next) {
        if (r->next >= r->count) continue;
        int own = request_budget(l, r);
        if (n > 0 && own < budget) budget = own > tokens ? own : tokens;
        while (r->next < r->count) {
            int index = r->order[r->next];
            int len = sequence_length(r, index);
            if (n > 0 && (tokens + len > budget || n == l->sequences)) goto formed;
            memcpy(l->ids + tokens, r->ids + r->offsets[index], (size_t)len * sizeof *l->ids);
            l->skip[n] = r->pool_skip ? r->pool_skip[index] : 0;
            skips = skips || l->skip[n] != 0;
            l->refs[n] = (lane_ref){.request = r, .index = index};
            tokens += len;
            max_len = len > max_len ? len : max_len;
            l->offsets[++n] = tokens;
            r->next++;
            l->queued_tokens -= len;
            l->queued_sequences--;
        }
    }
formed:
    *batch = (backend_batch){.ids = l->ids,
                             .offsets = l->offsets,
                             .count = n,
                             .tokens = tokens,
                             .max_len = max_len,
                             .pool_skip = skips ? l->skip : NULL};
    return n;
}

/* Fails a request with the calling thread's error, dropping its sequences not yet taken.
 * Called under the lock. */
static void fail_request(lane *l, engine_request *r, int status)
{
    if (r->done) return;
    r->status = status;
    snprintf(r->message, sizeof r->message, "%s", err_get());
    for (; r->next < r->count; r->next++) {
        l->queued_tokens -= sequence_length(r, r->order[r->next]);
        l->queued_sequences--;
    }
    finish_request(l, r);
}

/* Runs one batch as the leader: called under the lock, returns under it. */
static void lead_one_batch(lane *l)
{
    int budget = next_batch_budget(l);
    if (budget == 0) return;
    backend *b = l->backend;
    int rc = 0;
    if (budget > l->capacity && (!l->refused || budget < l->refused)) {
        /* Only the leader touches the stream and staging: growing them needs no one else. When
         * the memory is not there (a GPU's, or the host's), the batches stay at the size the
         * lane has, which always holds the longest sequence: a large request is split further,
         * never refused. */
        int cap = b->caps.max_batch_tokens;
        int want = budget < cap ? budget : cap;
        if (ensure_capacity(l, want)) {
            l->refused = want;
            err_clear();
        }
    }
    if (budget > l->capacity) budget = l->capacity;
    backend_batch batch;
    int n = form_batch(l, budget, &batch);
    pthread_mutex_unlock(&l->lock);

    backend_ticket ticket;
    rc = b->ops->submit(l->stream, &batch, l->pooled, &ticket);
    if (!rc) rc = b->ops->wait(l->stream, &ticket);
    if (!rc)
        for (int i = 0; i < n; i++) {
            const engine_request *r = l->refs[i].request;
            finish_vector(l->pooled + (size_t)i * (size_t)l->hidden, r->dim, r->normalize,
                          r->out + (size_t)l->refs[i].index * (size_t)r->dim);
        }

    pthread_mutex_lock(&l->lock);
    if (rc) {
        for (int i = 0; i < n; i++) fail_request(l, l->refs[i].request, rc);
    } else {
        l->totals.batches++;
        l->totals.sequences += (uint64_t)n;
        l->totals.tokens += (uint64_t)batch.tokens;
        l->totals.device_seconds += ticket.device_seconds;
        for (int i = 0; i < n; i++) {
            engine_request *r = l->refs[i].request;
            /* Once per request in the batch: its sequences are consecutive there. */
            if (i == 0 || l->refs[i - 1].request != r) r->device_seconds += ticket.device_seconds;
            if (++r->finished == r->count) finish_request(l, r);
        }
    }
    pthread_cond_broadcast(&l->changed);
}

int lane_run(lane *l, engine_request *r)
{
    r->next = r->finished = 0;
    r->device_seconds = 0.0;
    r->done = r->count == 0;
    r->status = 0;
    r->message[0] = '\0';
    r->queue_next = NULL;
    if (r->done) return 0;
    pthread_mutex_lock(&l->lock);
    if (l->tail)
        l->tail->queue_next = r;
    else
        l->head = r;
    l->tail = r;
    for (int i = 0; i < r->count; i++) l->queued_tokens += sequence_length(r, r->order[i]);
    l->queued_sequences += r->count;
    while (!r->done) {
        if (l->leader_active) {
            pthread_cond_wait(&l->changed, &l->lock);
            continue;
        }
        /* Lead until this request is done, serving earlier requests first. */
        l->leader_active = true;
        while (!r->done) lead_one_batch(l);
        l->leader_active = false;
        /* Let a waiter with work left take over. */
        pthread_cond_broadcast(&l->changed);
    }
    pthread_mutex_unlock(&l->lock);
    if (r->status) return err_set(r->status, "%s", r->message);
    return 0;
}

void lane_get_totals(lane *l, lane_totals *totals)
{
    pthread_mutex_lock(&l->lock);
    *totals = l->totals;
    pthread_mutex_unlock(&l->lock);
}

double lane_cost_seconds(lane *l, int tokens, int sequences, int max_len)
{
    pthread_mutex_lock(&l->lock);
    long queued_tokens = l->queued_tokens, queued_sequences = l->queued_sequences;
    pthread_mutex_unlock(&l->lock);
    backend *b = l->backend;
    double seconds = b->ops->estimate_seconds(b, tokens, sequences, max_len);
    if (queued_sequences > 0)
        seconds +=
            b->ops->estimate_seconds(b, (int)queued_tokens, (int)queued_sequences, l->max_len);
    return seconds;
}
