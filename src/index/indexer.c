/* The indexer (indexer.h). Documents flow one way: read (a file, or a JSONL line) -> hash ->
 * skip if the store has that hash -> chunk -> queued in a batch; when the batch holds enough
 * chunks it is embedded in one call (the bulk lane sorts and packs them) on a thread of its own
 * while the next batch fills, and then its documents are stored in one transaction on a third
 * thread while the batch after it is embedded, so a killed run loses at most the batches in
 * flight and the next run picks up there (unchanged documents are skipped by hash). */
#include "index/indexer.h"

#include "index/search.h"

#include "chunk/chunker.h"
#include "engine/engine.h"
#include "store/store.h"
#include "util/clock.h"
#include "util/error.h"
#include "util/file.h"
#include "util/follower.h"
#include "util/threadpool.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* A batch (embedded in one call, stored in one transaction) closes at this many documents or
 * bytes of text: on the CPU about 1,024 chunks of a 256-token model (full bulk batches of 2,048
 * tokens, and a killed run loses little); with a GPU 8 times more, so that one call fills the
 * GPU's windows and the chunking threads keep up. */
#define INDEX_BATCH_DOCUMENTS 256
#define INDEX_BATCH_BYTES ((size_t)1 << 20)
#define INDEX_GPU_BATCH_SCALE 8
/* The text index thread updates the index when this many chunks were stored since its last
 * update: enough for FTS5 to write few, large segments, few enough to leave little for the end. */
#define INDEX_TEXT_CHUNKS 8192
/* The checkpoint thread copies the write-ahead log into the store after every batch stored. */
#define INDEX_CHECKPOINT_CHANGES 1
/* The largest document file read whole. */
#define INDEX_MAX_FILE_BYTES ((size_t)256 << 20)

uint64_t index_hash(uint64_t hash, const void *data, size_t length)
{
    const unsigned char *p = data;
    for (size_t i = 0; i < length; i++) {
        hash ^= p[i];
        hash *= 0x100000001b3ULL;
    }
    return hash;
}

/* A document waiting for its chunks' vectors. */
typedef struct pending_document {
    store_document doc;
    char *key, *source, *title, *metadata, *text; /* owned */
    size_t first_chunk, chunk_count;
    size_t length;       /* bytes of text */
    float *given_vector; /* a JSONL line's own vector (then one chunk, no model work) */
    int *status;         /* where this document's outcome goes (library callers), or NULL */
    /* Chunked with its batch, in parallel with the batch's other documents. */
    chunk_list chunks;
    int chunk_status; /* nonzero: why it could not be chunked (chunk_error says more) */
    char *chunk_error;
} pending_document;

/* A stage thread's argument. */
typedef struct stage_start {
    indexer *ix;
    int stage;
} stage_start;

/* What storing a batch did (the store thread counts here, the calling thread merges it). */
typedef struct batch_result {
    long indexed, chunks, tokens, failed;
    int64_t done_bytes;
    bool changed;
    char first_failure[sizeof((index_summary *)0)->first_failure];
} batch_result;

/* The pipeline's stages after reading, each on a thread of its own, and the queue after the last
 * (stored batches, which the calling thread settles). */
enum { STAGE_CUT, STAGE_EMBED, STAGE_STORE, STAGES };
/* Batches in all: one filling, the others in the stages or queued between them (memory stays
 * bounded at this many batches). */
#define INDEX_BATCHES 6

/* A batch of documents and their chunks: filled while reading, then chunked (on a thread with the
 * chunking pool), embedded (on another) and stored (on a third), each stage taking the next batch
 * as soon as it is done with one. */
typedef struct batch {
    pending_document *docs; /* room for the batch's documents */
    size_t doc_count, bytes;
    chunk_span *spans; /* every chunk of the batch */
    size_t span_count, span_capacity;
    char **embed_texts; /* what is embedded per chunk: title + text, or the text */
    size_t *embed_lengths;
    float *vectors;
    int *statuses;
    /* What storing it did, merged into the summary by the calling thread once it is stored. */
    batch_result result;
    /* The first stage that failed on it (the batch is then dropped and the run ends), and each
     * stage's time (the model's, the store thread's CPU). */
    int status;
    char error[512];
    double seconds[STAGES], model_seconds, store_cpu;
    struct batch *next; /* in its queue */
} batch;

struct indexer {
    embedrag_model *model;
    const tok_tokenizer *tokenizer;
    store *store;
    const index_options *options;
    index_summary *summary;
    int dim, max_tokens;
    const char *passage_prompt; /* the model's prompt for passages, "" for none */

    /* Four stages: the calling thread reads documents into `fill` (looking them up through a
     * connection of its own), a thread chunks them (the model waited for the chunking when one
     * thread did both: about 1 of 4 s on the GPU host), a thread embeds them, and another stores
     * each batch in one transaction on the store's handle, which no other thread touches
     * meanwhile. So SQLite's one writer, the model, the chunking and the reading overlap. Each
     * stage takes its next batch from a queue as soon as it is free: when the stages moved in
     * step, each step lasted as long as its slowest stage (on the GPU host the steps took 4.9 s
     * where the slowest stage needed 3.9). */
    batch batches[INDEX_BATCHES];
    batch *fill;  /* the calling thread's */
    batch *spare; /* free batches (under lock) */
    struct {
        batch *head, *tail;
    } queue[STAGES + 1]; /* waiting for each stage; the last: stored, to settle (under lock) */
    int queued;          /* batches handed to the stages and not settled yet (under lock) */
    bool pipeline;       /* off: each stage runs on the calling thread in turn */
    bool stages_on;      /* the stage threads run */
    bool stopping;       /* under lock: the stage threads end */
    bool stage_failed;   /* under lock: a stage failed, the batches after it are dropped */
    pthread_t stage_threads[STAGES];
    stage_start stage_starts[STAGES]; /* each thread's argument */
    pthread_mutex_t lock;
    pthread_cond_t moved;                /* a batch moved from one queue to another */
    size_t batch_documents, batch_bytes; /* when a batch closes */
    threadpool *chunkers;                /* chunk a batch's documents in parallel */
    batch *chunking;                     /* the batch they chunk */
    store_lookup *lookup;                /* the calling thread's connection (pipeline only) */
    double stepped;                      /* when the calling thread last handed a batch over */
    /* Beside the stages (pipeline only), a thread per shard keeps the text index ("<store>-text",
     * files with locks of their own) close behind the store, on connections of its own: inside
     * the store's file, SQLite's one writer built it and stored the chunks in turn. Another
     * copies the store's write-ahead log into its file, which SQLite otherwise does inside the
     * store thread's commits. */
    store_text *text[STORE_TEXT_SHARDS_MAX];
    follower text_follower[STORE_TEXT_SHARDS_MAX];
    int text_shards; /* threads started, one per shard (0: the store's commits do it) */
    store_checkpointer *checkpointer;
    follower checkpoint_follower;

    char **seen; /* keys seen in this run (for --prune) */
    size_t seen_count, seen_capacity;
    double last_progress;
    bool changed; /* whether anything was stored or deleted */
    /* For the progress line's share and ETA: what the paths hold (counted first by a walk that
     * reads nothing) and how much of it has been read. */
    bool counting;
    long total_files;
    int64_t total_bytes, done_bytes; /* done: of documents stored, skipped or failed */
    double started;
};

/* Keeps the first failure's message, cut to the summary's room. */
static void keep_first(char *first, const char *what)
{
    if (first[0]) return;
    size_t n = strlen(what), room = sizeof((index_summary *)0)->first_failure - 1;
    memcpy(first, what, n < room ? n : room);
    first[n < room ? n : room] = '\0';
}

static void note_failure(indexer *ix, const char *what, int status, int *status_out)
{
    if (status_out) *status_out = status ? status : EMBEDRAG_ERR_INVALID_ARGUMENT;
    ix->summary->failed++;
    keep_first(ix->summary->first_failure, what);
}

/* A document of a batch that failed, counted in the batch (the store thread's side). */
static void note_batch_failure(batch *b, const char *what, int status, int *status_out)
{
    if (status_out) *status_out = status ? status : EMBEDRAG_ERR_INVALID_ARGUMENT;
    b->result.failed++;
    keep_first(b->result.first_failure, what);
}

/* Adds what storing a batch did to the summary (the calling thread, once it is stored). */
static void merge_result(indexer *ix, batch *b)
{
    batch_result *r = &b->result;
    index_summary *s = ix->summary;
    s->indexed += r->indexed;
    s->chunks += r->chunks;
    s->tokens += r->tokens;
    s->failed += r->failed;
    if (r->first_failure[0]) keep_first(s->first_failure, r->first_failure);
    ix->done_bytes += r->done_bytes;
    ix->changed |= r->changed;
}

static int remember_key(indexer *ix, const char *key)
{
    if (!ix->options->prune) return 0;
    if (ix->seen_count == ix->seen_capacity) {
        size_t grown = ix->seen_capacity ? 2 * ix->seen_capacity : 1024;
        char **more = realloc(ix->seen, grown * sizeof *more);
        if (!more) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory listing documents");
        ix->seen = more;
        ix->seen_capacity = grown;
    }
    ix->seen[ix->seen_count] = strdup(key);
    if (!ix->seen[ix->seen_count]) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    ix->seen_count++;
    return 0;
}

static void free_pending(pending_document *p)
{
    free(p->key);
    free(p->source);
    free(p->title);
    free(p->metadata);
    free(p->text);
    free(p->given_vector);
    chunk_list_free(&p->chunks);
    free(p->chunk_error);
    memset(p, 0, sizeof *p);
}

static void progress(indexer *ix, bool last)
{
    if (!ix->options->progress) return;
    double t = clock_seconds();
    if (!last && t - ix->last_progress < 0.25) return;
    ix->last_progress = t;
    const index_summary *s = ix->summary;
    char files[48] = "", share[64] = "";
    if (ix->total_files)
        snprintf(files, sizeof files, "%ld/%ld files, ", s->files, ix->total_files);
    if (ix->total_bytes > 0 && ix->done_bytes > 0 && !last) {
        double done = (double)ix->done_bytes / (double)ix->total_bytes;
        if (done > 1.0) done = 1.0;
        double left = (t - ix->started) * (1.0 - done) / done;
        snprintf(share, sizeof share, ", %.0f%%, %d:%02d left", 100.0 * done, (int)left / 60,
                 (int)left % 60);
    }
    fprintf(stderr,
            "\r%s%ld documents (%ld unchanged, %ld failed), %ld chunks, %.0f tokens/s%s\033[K",
            files, s->indexed, s->unchanged, s->failed, s->chunks,
            s->model_seconds > 0 ? (double)s->tokens / s->model_seconds : 0.0, share);
    if (last) fputc('\n', stderr);
}

static void batch_clear(batch *b)
{
    for (size_t d = 0; d < b->doc_count; d++) free_pending(&b->docs[d]);
    for (size_t i = 0; i < b->span_count; i++) free(b->embed_texts[i]);
    b->doc_count = 0;
    b->span_count = 0;
    b->bytes = 0;
    memset(&b->result, 0, sizeof b->result);
    memset(b->seconds, 0, sizeof b->seconds);
    b->model_seconds = b->store_cpu = 0;
    b->status = 0;
    b->error[0] = '\0';
}

static void batch_free(batch *b)
{
    if (b->docs) batch_clear(b);
    free(b->docs);
    free(b->spans);
    free(b->embed_texts);
    free(b->embed_lengths);
    free(b->vectors);
    free(b->statuses);
    memset(b, 0, sizeof *b);
}

/* Makes room for `more` chunks in batch b. */
static int reserve_chunks(indexer *ix, batch *b, size_t more)
{
    size_t want = b->span_count + more;
    if (want <= b->span_capacity) return 0;
    size_t grown = b->span_capacity ? b->span_capacity : 1024;
    while (grown < want) grown *= 2;
    chunk_span *spans = realloc(b->spans, grown * sizeof *spans);
    if (spans) b->spans = spans;
    char **texts = realloc(b->embed_texts, grown * sizeof *texts);
    if (texts) b->embed_texts = texts;
    size_t *lengths = realloc(b->embed_lengths, grown * sizeof *lengths);
    if (lengths) b->embed_lengths = lengths;
    float *vectors = realloc(b->vectors, grown * (size_t)ix->dim * sizeof *vectors);
    if (vectors) b->vectors = vectors;
    int *statuses = realloc(b->statuses, grown * sizeof *statuses);
    if (statuses) b->statuses = statuses;
    if (!spans || !texts || !lengths || !vectors || !statuses)
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory queueing %zu chunks", want);
    b->span_capacity = grown;
    return 0;
}

/* Chunks one document of the batch (a task of the chunking pool). */
static void chunk_task(void *ctx, int task, int thread)
{
    (void)thread;
    indexer *ix = ctx;
    pending_document *p = &ix->chunking->docs[task];
    if (p->given_vector) return;
    chunk_options co = chunk_default_options(ix->max_tokens);
    if (ix->options->overlap_tokens >= 0) co.overlap_tokens = ix->options->overlap_tokens;
    co.prompt = ix->passage_prompt;
    co.title = p->title;
    p->chunk_status = chunk_text(ix->tokenizer, p->text, p->length, &co, &p->chunks);
    if (p->chunk_status) {
        p->chunk_error = strdup(err_get()); /* errors are per thread */
        err_clear();
    }
}

/* Chunks every document of the batch (in parallel) and lays their chunks out as the texts one
 * embedding call takes: the title, where the chunker counted it, then the chunk's text (the
 * engine puts the prompt first). */
static int prepare_batch(indexer *ix, batch *b)
{
    ix->chunking = b;
    if (ix->chunkers && b->doc_count > 1)
        threadpool_run(ix->chunkers, (int)b->doc_count, chunk_task, ix);
    else
        for (size_t d = 0; d < b->doc_count; d++) chunk_task(ix, (int)d, 0);
    int rc = 0;
    for (size_t d = 0; d < b->doc_count && !rc; d++) {
        pending_document *p = &b->docs[d];
        p->first_chunk = b->span_count;
        p->chunk_count = 0;
        if (p->given_vector || p->chunk_status) continue;
        const chunk_list *list = &p->chunks;
        rc = reserve_chunks(ix, b, list->count);
        size_t title_len = list->title_used && p->title ? strlen(p->title) : 0;
        size_t separator = title_len ? strlen(CHUNK_TITLE_SEPARATOR) : 0;
        for (size_t c = 0; c < list->count && !rc; c++) {
            const chunk_span *span = &list->spans[c];
            size_t at = b->span_count, len = span->end - span->start;
            char *t = malloc(title_len + separator + len + 1);
            if (!t) {
                rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory chunking %s", p->source);
                break;
            }
            memcpy(t, p->title ? p->title : "", title_len);
            memcpy(t + title_len, CHUNK_TITLE_SEPARATOR, separator);
            memcpy(t + title_len + separator, p->text + span->start, len);
            t[title_len + separator + len] = '\0';
            b->spans[at] = *span;
            b->embed_texts[at] = t;
            b->embed_lengths[at] = title_len + separator + len;
            b->statuses[at] = 0;
            b->span_count++;
            p->chunk_count++;
        }
    }
    return rc;
}

/* Embeds a batch's chunks (any thread: the model is thread-safe, and nothing here touches the
 * store). On failure the message is copied into `error`, since errors are per thread. */
static int embed_batch(indexer *ix, batch *b, double *seconds, char *error, size_t error_size)
{
    *seconds = 0;
    if (!b->span_count) return 0;
    int rc;
    embedrag_embed_params p = embedrag_embed_default_params();
    p.prompt = ix->passage_prompt;
    p.truncate = false; /* the chunker's budget holds; an overflow is an error, not a cut */
    p.statuses = b->statuses;
    p.lane = EMBEDRAG_LANE_BULK;
    double t = clock_seconds();
    rc = embedrag_embed(ix->model, (const char *const *)b->embed_texts, b->embed_lengths,
                        b->span_count, &p, b->vectors);
    *seconds = clock_seconds() - t;
    if (rc) snprintf(error, error_size, "%s", embedrag_last_error());
    return rc;
}

/* Stores an embedded batch's documents in one transaction, counting into b->result (the
 * store thread: nothing here touches the summary). The batch is emptied by the caller once the
 * result is merged. */
static int store_batch(indexer *ix, batch *b)
{
    if (!b->doc_count) return 0;
    int rc = store_begin(ix->store);
    if (rc) return rc;
    batch_result *r = &b->result;
    store_chunk *chunks = NULL;
    for (size_t d = 0; d < b->doc_count && !rc; d++) {
        pending_document *p = &b->docs[d];
        r->done_bytes += p->doc.size;
        if (p->chunk_status) {
            char what[800];
            snprintf(what, sizeof what, "%s: %s", p->source,
                     p->chunk_error ? p->chunk_error : "could not be chunked");
            note_batch_failure(b, what, p->chunk_status, p->status);
            continue;
        }
        bool failed = false;
        for (size_t c = 0; c < p->chunk_count; c++)
            if (b->statuses[p->first_chunk + c]) {
                char what[600];
                snprintf(what, sizeof what, "%s: a chunk could not be embedded (status %d)",
                         p->source, b->statuses[p->first_chunk + c]);
                note_batch_failure(b, what, b->statuses[p->first_chunk + c], p->status);
                failed = true;
                break;
            }
        if (failed) continue;
        size_t count = p->given_vector ? 1 : p->chunk_count;
        store_chunk *grown = realloc(chunks, (count ? count : 1) * sizeof *chunks);
        if (!grown) {
            rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory storing %s", p->source);
            break;
        }
        chunks = grown;
        long tokens = 0;
        if (p->given_vector) {
            chunks[0] = (store_chunk){.text = p->text,
                                      .length = strlen(p->text),
                                      .start = 0,
                                      .end = (int64_t)strlen(p->text),
                                      .tokens = 0,
                                      .vector = p->given_vector};
        } else {
            for (size_t c = 0; c < count; c++) {
                const chunk_span *span = &b->spans[p->first_chunk + c];
                chunks[c] =
                    (store_chunk){.text = p->text + span->start,
                                  .length = span->end - span->start,
                                  .start = (int64_t)span->start,
                                  .end = (int64_t)span->end,
                                  .tokens = span->tokens,
                                  .vector = b->vectors + (p->first_chunk + c) * (size_t)ix->dim};
                tokens += span->tokens;
            }
        }
        rc = store_put_document(ix->store, &p->doc, chunks, count);
        if (!rc) {
            r->changed = true;
            r->indexed++;
            r->chunks += (long)count;
            r->tokens += tokens;
        }
    }
    free(chunks);
    if (rc) {
        store_rollback(ix->store);
        return rc;
    }
    return store_commit(ix->store);
}

/* Runs one stage on a batch (any thread: each stage has one at a time). A failure is kept in the
 * batch with its message (errors are per thread); a batch that failed before, or any batch after
 * a failure when `dropping`, passes through untouched. */
static void run_stage(indexer *ix, int stage, batch *b, bool dropping)
{
    if (b->status || (dropping && stage == STAGE_STORE)) return;
    double t = clock_seconds();
    int rc = 0;
    if (stage == STAGE_CUT) {
        rc = prepare_batch(ix, b);
        if (rc) snprintf(b->error, sizeof b->error, "%s", err_get());
    } else if (stage == STAGE_EMBED) {
        rc = embed_batch(ix, b, &b->model_seconds, b->error, sizeof b->error);
    } else {
        double cpu = clock_thread_cpu_seconds();
        rc = store_batch(ix, b);
        b->store_cpu = clock_thread_cpu_seconds() - cpu;
        if (rc) snprintf(b->error, sizeof b->error, "%s", err_get());
    }
    b->seconds[stage] = clock_seconds() - t;
    b->status = rc;
}

static void enqueue(indexer *ix, int queue, batch *b)
{
    b->next = NULL;
    if (ix->queue[queue].tail)
        ix->queue[queue].tail->next = b;
    else
        ix->queue[queue].head = b;
    ix->queue[queue].tail = b;
}

static batch *dequeue(indexer *ix, int queue)
{
    batch *b = ix->queue[queue].head;
    if (b) {
        ix->queue[queue].head = b->next;
        if (!b->next) ix->queue[queue].tail = NULL;
    }
    return b;
}

/* A stage's thread: takes the batches of its queue in turn and passes each to the next queue,
 * until the indexer closes (a batch being stored is finished first: it commits whole). */
static void *stage_thread(void *arg)
{
    const stage_start *start = arg;
    indexer *ix = start->ix;
    int stage = start->stage;
    pthread_mutex_lock(&ix->lock);
    for (;;) {
        while (!ix->stopping && !ix->queue[stage].head) pthread_cond_wait(&ix->moved, &ix->lock);
        if (ix->stopping) break;
        batch *b = dequeue(ix, stage);
        bool dropping = ix->stage_failed;
        pthread_mutex_unlock(&ix->lock);
        run_stage(ix, stage, b, dropping);
        pthread_mutex_lock(&ix->lock);
        if (b->status) ix->stage_failed = true;
        enqueue(ix, stage + 1, b);
        pthread_cond_broadcast(&ix->moved);
    }
    pthread_mutex_unlock(&ix->lock);
    return NULL;
}

/* Starts the stage threads; false when one could not be started (the others are then ended, and
 * each stage runs on the calling thread). */
static bool stages_start(indexer *ix)
{
    pthread_mutex_init(&ix->lock, NULL);
    pthread_cond_init(&ix->moved, NULL);
    int started = 0;
    for (; started < STAGES; started++) {
        ix->stage_starts[started] = (stage_start){ix, started};
        if (pthread_create(&ix->stage_threads[started], NULL, stage_thread,
                           &ix->stage_starts[started]))
            break;
    }
    ix->stages_on = true;
    if (started == STAGES) return true;
    ix->stopping = true;
    pthread_cond_broadcast(&ix->moved);
    for (int i = 0; i < started; i++) pthread_join(ix->stage_threads[i], NULL);
    ix->stages_on = ix->stopping = false;
    return false;
}

/* Ends the stage threads: batches queued are dropped, never stored; one being stored is waited
 * for (it commits whole or not at all). */
static void stages_end(indexer *ix)
{
    if (!ix->stages_on) return;
    pthread_mutex_lock(&ix->lock);
    ix->stopping = true;
    pthread_cond_broadcast(&ix->moved);
    pthread_mutex_unlock(&ix->lock);
    for (int i = 0; i < STAGES; i++) pthread_join(ix->stage_threads[i], NULL);
    pthread_mutex_destroy(&ix->lock);
    pthread_cond_destroy(&ix->moved);
    ix->stages_on = false;
}

/* Ends the text index's threads (after their last update, where one was asked for) and
 * closes their connections; the store's commits take the work over. */
static void texts_end(indexer *ix)
{
    for (int k = 0; k < STORE_TEXT_SHARDS_MAX; k++) {
        follower_end(&ix->text_follower[k]);
        store_text_close(ix->text[k]);
        ix->text[k] = NULL;
    }
    ix->text_shards = 0;
}

static int text_run(void *ctx)
{
    return store_text_update(ctx);
}

static int checkpoint_run(void *ctx)
{
    return store_checkpoint(ctx);
}

/* Tells the followers how much was stored. */
static void followers_note(indexer *ix)
{
    long stored = ix->summary->chunks + ix->summary->deleted;
    for (int k = 0; k < ix->text_shards; k++) follower_note(&ix->text_follower[k], stored);
    follower_note(&ix->checkpoint_follower, stored);
}

/* After a batch went through every stage (on their threads, or here): counts what each did and
 * empties it. A batch that failed ends the run: it is dropped, and whatever failed to store (a
 * full disk, a lost lock) left nothing in the store. */
static int settle(indexer *ix, batch *b)
{
    index_summary *sum = ix->summary;
    sum->chunk_seconds += b->seconds[STAGE_CUT];
    sum->embed_seconds += b->seconds[STAGE_EMBED];
    sum->model_seconds += b->model_seconds;
    sum->store_seconds += b->seconds[STAGE_STORE];
    sum->store_cpu_seconds += b->store_cpu;
    int rc = b->status;
    if (rc)
        err_set(rc, "%s", b->error);
    else
        merge_result(ix, b);
    if (!rc) followers_note(ix);
    batch_clear(b);
    progress(ix, false);
    return rc;
}

/* Settles the stored batches (under lock, which it lets go of while settling); the first failure
 * is returned, and every batch is settled. */
static int settle_stored(indexer *ix)
{
    int rc = 0;
    batch *b;
    while ((b = dequeue(ix, STAGES))) {
        pthread_mutex_unlock(&ix->lock);
        int r = settle(ix, b);
        if (!rc) rc = r;
        pthread_mutex_lock(&ix->lock);
        b->next = ix->spare;
        ix->spare = b;
        ix->queued--;
    }
    return rc;
}

/* Hands `fill` to the stages and takes an empty batch to fill, settling the batches stored
 * meanwhile; with `drain`, also waits until every batch handed over is stored. Without the
 * pipeline the stages run here, one after another. The calling thread's time since it last
 * handed a batch over counts as reading, its time here as waiting. */
static int hand_over(indexer *ix, bool drain)
{
    double t = clock_seconds();
    ix->summary->read_seconds += t - (ix->stepped ? ix->stepped : ix->started);
    int rc = 0;
    if (!ix->stages_on) {
        if (ix->fill->doc_count) {
            for (int stage = 0; stage < STAGES; stage++) run_stage(ix, stage, ix->fill, false);
            rc = settle(ix, ix->fill);
        }
    } else {
        pthread_mutex_lock(&ix->lock);
        if (ix->fill->doc_count) {
            enqueue(ix, STAGE_CUT, ix->fill);
            ix->queued++;
            pthread_cond_broadcast(&ix->moved);
            ix->fill = NULL;
        }
        for (;;) {
            int r = settle_stored(ix);
            if (!rc) rc = r;
            if (!ix->fill && ix->spare) {
                ix->fill = ix->spare;
                ix->spare = ix->fill->next;
            }
            if (ix->fill && (!drain || !ix->queued)) break;
            pthread_cond_wait(&ix->moved, &ix->lock);
        }
        pthread_mutex_unlock(&ix->lock);
    }
    ix->stepped = clock_seconds();
    ix->summary->wait_seconds += ix->stepped - t;
    return rc;
}

/* Embeds and stores everything queued; returns when it is stored. */
static int flush(indexer *ix)
{
    return hand_over(ix, true);
}

/* Takes ownership of the strings (they are freed here on every path). A document whose stored
 * hash matches is skipped; otherwise it is queued, and the batch sent off when full. */
static int add_document(indexer *ix, char *key, char *source, char *title, char *metadata,
                        char *text, size_t length, float *given_vector, int64_t size, int64_t mtime,
                        int *status_out)
{
    if (status_out) *status_out = 0;
    index_summary *sum = ix->summary;
    sum->documents++;
    uint64_t hash = index_hash(INDEX_HASH_SEED, text, length);
    hash = index_hash(hash, "\0", 1);
    if (title) hash = index_hash(hash, title, strlen(title));
    hash = index_hash(hash, "\0", 1);
    if (metadata) hash = index_hash(hash, metadata, strlen(metadata));
    if (given_vector) hash = index_hash(hash, given_vector, (size_t)ix->dim * sizeof(float));
    int rc = remember_key(ix, key);
    bool found = false;
    uint64_t stored = 0;
    if (!rc)
        rc = ix->lookup ? store_lookup_find(ix->lookup, key, &found, &stored)
                        : store_find_document(ix->store, key, &found, &stored);
    if (rc || (found && stored == hash)) {
        if (!rc) sum->unchanged++;
        ix->done_bytes += size;
        progress(ix, false);
        goto free_strings;
    }
    batch *b = ix->fill;
    b->docs[b->doc_count++] = (pending_document){.doc = {.key = key,
                                                         .source = source,
                                                         .title = title,
                                                         .metadata = metadata,
                                                         .content_hash = hash,
                                                         .size = size,
                                                         .mtime = mtime},
                                                 .key = key,
                                                 .source = source,
                                                 .title = title,
                                                 .metadata = metadata,
                                                 .text = text,
                                                 .length = length,
                                                 .given_vector = given_vector,
                                                 .status = status_out};
    if (given_vector) sum->vectors_given++;
    b->bytes += length;
    if (b->doc_count >= ix->batch_documents || b->bytes >= ix->batch_bytes)
        return hand_over(ix, false);
    return 0;
free_strings:
    free(key);
    free(source);
    free(title);
    free(metadata);
    free(text);
    free(given_vector);
    return rc;
}

/* ---- files ---- */

static bool has_suffix(const char *name, const char *suffix)
{
    size_t n = strlen(name), s = strlen(suffix);
    return n > s && strcasecmp(name + n - s, suffix) == 0;
}

static bool is_text_file(const char *name)
{
    return has_suffix(name, ".txt") || has_suffix(name, ".md") || has_suffix(name, ".markdown");
}

static int index_text_file(indexer *ix, const char *path, const struct stat *st)
{
    ix->summary->files++;
    char *text = NULL;
    size_t length = 0;
    int read = file_read(path, INDEX_MAX_FILE_BYTES, &text, &length, NULL);
    if (read != 0) {
        note_failure(ix, err_get(), read, NULL);
        err_clear();
        return 0;
    }
    char *resolved = realpath(path, NULL);
    char *key = resolved ? resolved : strdup(path);
    char *source = strdup(key ? key : path);
    if (!key || !source) {
        free(key);
        free(source);
        free(text);
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory reading %s", path);
    }
    return add_document(ix, key, source, NULL, NULL, text, length, NULL, (int64_t)st->st_size,
                        (int64_t)st->st_mtime, NULL);
}

static char *json_string_or_number(const cJSON *item)
{
    if (cJSON_IsString(item) && item->valuestring) return strdup(item->valuestring);
    if (cJSON_IsNumber(item)) {
        char buffer[64];
        snprintf(buffer, sizeof buffer, "%.17g", item->valuedouble);
        return strdup(buffer);
    }
    return NULL;
}

/* One JSONL line: {"id", "text", "title"?, "metadata"?, "vector"?}. */
static int index_json_line(indexer *ix, const char *path, long line_number, const char *line,
                           size_t length)
{
    char where[600];
    snprintf(where, sizeof where, "%s:%ld", path, line_number);
    cJSON *o = cJSON_ParseWithLength(line, length);
    char what[800];
    if (!cJSON_IsObject(o)) {
        snprintf(what, sizeof what, "%s: not a JSON object", where);
        note_failure(ix, what, EMBEDRAG_ERR_FORMAT, NULL);
        cJSON_Delete(o);
        return 0;
    }
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(o, "id");
    const cJSON *text = cJSON_GetObjectItemCaseSensitive(o, "text");
    const cJSON *title = cJSON_GetObjectItemCaseSensitive(o, "title");
    const cJSON *metadata = cJSON_GetObjectItemCaseSensitive(o, "metadata");
    const cJSON *vector = cJSON_GetObjectItemCaseSensitive(o, "vector");
    const char *problem = !id || !(cJSON_IsString(id) || cJSON_IsNumber(id))
                              ? "\"id\" (a string or number) is missing"
                          : !cJSON_IsString(text) ? "\"text\" (a string) is missing"
                          : title && !cJSON_IsString(title) && !cJSON_IsNull(title)
                              ? "\"title\" is not a string"
                          : metadata && !cJSON_IsObject(metadata) && !cJSON_IsNull(metadata)
                              ? "\"metadata\" is not an object"
                          : vector && !cJSON_IsArray(vector) ? "\"vector\" is not an array"
                                                             : NULL;
    float *given = NULL;
    if (!problem && vector) {
        if (cJSON_GetArraySize(vector) != ix->dim) {
            snprintf(what, sizeof what,
                     "%s: \"vector\" has %d numbers; the store's dimension is %d", where,
                     cJSON_GetArraySize(vector), ix->dim);
            note_failure(ix, what, EMBEDRAG_ERR_FORMAT, NULL);
            cJSON_Delete(o);
            return 0;
        }
        given = malloc((size_t)ix->dim * sizeof *given);
        int i = 0;
        const cJSON *x;
        cJSON_ArrayForEach(x, vector)
        {
            if (!cJSON_IsNumber(x) || !isfinite(x->valuedouble))
                problem = "\"vector\" holds a non-number";
            if (given) given[i++] = (float)x->valuedouble;
        }
        if (!given) problem = "out of memory";
    }
    if (problem) {
        snprintf(what, sizeof what, "%s: %s", where, problem);
        note_failure(ix, what, EMBEDRAG_ERR_FORMAT, NULL);
        free(given);
        cJSON_Delete(o);
        return 0;
    }
    char *key = json_string_or_number(id);
    char *source = strdup(where);
    char *title_text = cJSON_IsString(title) ? strdup(title->valuestring) : NULL;
    char *metadata_text = cJSON_IsObject(metadata) ? cJSON_PrintUnformatted(metadata) : NULL;
    char *body = strdup(text->valuestring);
    size_t body_length = body ? strlen(body) : 0;
    cJSON_Delete(o);
    if (!key || !source || !body) {
        free(key);
        free(source);
        free(title_text);
        free(metadata_text);
        free(body);
        free(given);
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory reading %s", where);
    }
    return add_document(ix, key, source, title_text, metadata_text, body, body_length, given,
                        (int64_t)length, 0, NULL);
}

static int index_jsonl_file(indexer *ix, const char *path)
{
    ix->summary->files++;
    FILE *f = fopen(path, "rb");
    if (!f) {
        char what[600];
        snprintf(what, sizeof what, "%s: %s", path, strerror(errno));
        note_failure(ix, what, EMBEDRAG_ERR_IO, NULL);
        return 0;
    }
    char *line = NULL;
    size_t capacity = 0;
    ssize_t n;
    long number = 0;
    int rc = 0;
    while (!rc && (n = getline(&line, &capacity, f)) >= 0) {
        number++;
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = '\0';
        size_t blank = 0;
        while (blank < (size_t)n && (line[blank] == ' ' || line[blank] == '\t')) blank++;
        if (blank == (size_t)n) continue;
        rc = index_json_line(ix, path, number, line, (size_t)n);
    }
    free(line);
    fclose(f);
    return rc;
}

static int compare_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Walks a folder in name order; hidden entries and symbolic links to folders are left out (no
 * loops); other files than text, Markdown and JSONL are counted as skipped. */
static int index_path(indexer *ix, const char *path, bool top);

static int index_folder(indexer *ix, const char *path)
{
    DIR *d = opendir(path);
    if (!d) {
        char what[600];
        snprintf(what, sizeof what, "%s: %s", path, strerror(errno));
        note_failure(ix, what, EMBEDRAG_ERR_IO, NULL);
        return 0;
    }
    char **names = NULL;
    size_t count = 0, capacity = 0;
    int rc = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        if (count == capacity) {
            capacity = capacity ? 2 * capacity : 64;
            char **more = realloc(names, capacity * sizeof *more);
            if (!more) {
                rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory listing %s", path);
                break;
            }
            names = more;
        }
        names[count] = strdup(e->d_name);
        if (!names[count]) {
            rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory listing %s", path);
            break;
        }
        count++;
    }
    closedir(d);
    if (!rc) qsort(names, count, sizeof *names, compare_names);
    for (size_t i = 0; i < count; i++) {
        if (!rc) {
            char *child = NULL;
            rc = file_join(path, names[i], &child);
            if (!rc) rc = index_path(ix, child, false);
            free(child);
        }
        free(names[i]);
    }
    free(names);
    return rc;
}

static int index_path(indexer *ix, const char *path, bool top)
{
    struct stat st;
    if ((top ? stat(path, &st) : lstat(path, &st)) != 0) {
        if (top) return err_set(EMBEDRAG_ERR_NOT_FOUND, "%s: %s", path, strerror(errno));
        return 0;
    }
    if (S_ISLNK(st.st_mode)) {
        /* A link inside a folder: followed to a file, never to a folder. */
        if (stat(path, &st) != 0 || S_ISDIR(st.st_mode)) {
            ix->summary->skipped_files++;
            return 0;
        }
    }
    if (S_ISDIR(st.st_mode)) return index_folder(ix, path);
    if (!S_ISREG(st.st_mode)) {
        ix->summary->skipped_files++;
        return 0;
    }
    if (ix->counting) {
        if (has_suffix(path, ".jsonl") || is_text_file(path) || top) {
            ix->total_files++;
            ix->total_bytes += st.st_size;
        }
        return 0;
    }
    if (has_suffix(path, ".jsonl")) return index_jsonl_file(ix, path);
    if (is_text_file(path) || (top && !has_suffix(path, ".jsonl")))
        return index_text_file(ix, path, &st);
    ix->summary->skipped_files++;
    return 0;
}

/* ---- the run ---- */

static int compare_keys(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

typedef struct prune_context {
    indexer *ix;
    char **gone;
    size_t count, capacity;
} prune_context;

static int collect_gone(void *ctx, const char *key, const char *source)
{
    (void)source;
    prune_context *pc = ctx;
    if (bsearch(&key, pc->ix->seen, pc->ix->seen_count, sizeof *pc->ix->seen, compare_keys))
        return 0;
    if (pc->count == pc->capacity) {
        pc->capacity = pc->capacity ? 2 * pc->capacity : 64;
        char **more = realloc(pc->gone, pc->capacity * sizeof *more);
        if (!more) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory pruning");
        pc->gone = more;
    }
    pc->gone[pc->count] = strdup(key);
    if (!pc->gone[pc->count]) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory pruning");
    pc->count++;
    return 0;
}

static int prune(indexer *ix)
{
    qsort(ix->seen, ix->seen_count, sizeof *ix->seen, compare_keys);
    prune_context pc = {.ix = ix};
    int rc = store_each_document(ix->store, collect_gone, &pc);
    if (!rc) rc = store_begin(ix->store);
    for (size_t i = 0; i < pc.count && !rc; i++) {
        bool found = false;
        rc = store_delete_document(ix->store, pc.gone[i], &found);
        if (!rc && found) ix->summary->deleted++;
        if (!rc && found) ix->changed = true;
    }
    if (!rc)
        rc = store_commit(ix->store);
    else
        store_rollback(ix->store);
    for (size_t i = 0; i < pc.count; i++) free(pc.gone[i]);
    free(pc.gone);
    return rc;
}

/* A hash of the model's weights file, so that a store knows the exact weights its vectors came
 * from (two checkpoints of one name are different models). */
static int weights_hash(const char *model_dir, char out[17])
{
    char *path = NULL;
    int rc = file_join(model_dir, "model.safetensors", &path);
    if (rc) return rc;
    FILE *f = fopen(path, "rb");
    if (!f) {
        rc = err_set(EMBEDRAG_ERR_IO, "%s: %s", path, strerror(errno));
        free(path);
        return rc;
    }
    uint64_t hash = INDEX_HASH_SEED;
    static char buffer[1 << 16];
    size_t n;
    while ((n = fread(buffer, 1, sizeof buffer, f)) > 0) hash = index_hash(hash, buffer, n);
    fclose(f);
    free(path);
    snprintf(out, 17, "%016llx", (unsigned long long)hash);
    return 0;
}

const char *index_model_prompt(const embedrag_model *m, const char *name, const char *alias)
{
    embedrag_model_info info;
    embedrag_model_get_info(m, &info);
    for (int i = 0; i < info.prompt_count; i++) {
        const char *prompt_name, *text;
        if (embedrag_model_get_prompt(m, i, &prompt_name, &text) == 0 &&
            (!strcmp(prompt_name, name) || (alias && !strcmp(prompt_name, alias))))
            return text;
    }
    return "";
}

int index_model_identity(const embedrag_model *model, store_model *out, char hash[17])
{
    embedrag_model_info info;
    embedrag_model_get_info(model, &info);
    static const char *const poolings[] = {"mean", "cls", "max"};
    const char *directory = engine_model_directory(model);
    int rc = weights_hash(directory, hash);
    if (rc) return rc;
    embedrag_backend_info cpu;
    embedrag_model_get_backend(model, 0, &cpu);
    *out = (store_model){.name = info.name,
                         .dimension = info.dimension,
                         .pooling = poolings[info.pooling],
                         .prompt = index_model_prompt(model, "passage", "document"),
                         .precision = cpu.precision == EMBEDRAG_PRECISION_BF16 ? "bf16" : "fp32",
                         .weights_hash = hash,
                         .directory = directory};
    return 0;
}

int indexer_open(embedrag_model *model, store *s, const index_options *options,
                 index_summary *summary, indexer **out)
{
    *out = NULL;
    embedrag_model_info info;
    embedrag_model_get_info(model, &info);
    const store_model *sm = store_get_model(s);
    if (strcmp(sm->name, info.name) != 0 || sm->dimension != info.dimension)
        return err_set(EMBEDRAG_ERR_MODEL_MISMATCH,
                       "the store was built with %s (%d dimensions); the model given is %s (%d)",
                       sm->name, sm->dimension, info.name, info.dimension);
    indexer *ix = calloc(1, sizeof *ix);
    if (!ix) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory indexing");
    *ix = (indexer){.model = model,
                    .tokenizer = engine_tokenizer(model),
                    .store = s,
                    .options = options,
                    .summary = summary,
                    .dim = info.dimension,
                    .max_tokens = info.max_tokens,
                    .passage_prompt = index_model_prompt(model, "passage", "document"),
                    .started = clock_seconds()};
    /* EMBEDRAG_INDEX_PIPELINE=0 embeds each batch on the calling thread (to measure what the
     * overlap gives). */
    const char *pipeline = getenv("EMBEDRAG_INDEX_PIPELINE");
    ix->pipeline = !(pipeline && !strcmp(pipeline, "0"));
    ix->batch_documents = INDEX_BATCH_DOCUMENTS;
    ix->batch_bytes = INDEX_BATCH_BYTES;
    for (int i = 0; i < info.backend_count; i++) {
        embedrag_backend_info backend;
        if (embedrag_model_get_backend(model, i, &backend) == 0 &&
            backend.kind == EMBEDRAG_DEVICE_GPU) {
            ix->batch_documents = INDEX_BATCH_DOCUMENTS * INDEX_GPU_BATCH_SCALE;
            ix->batch_bytes = INDEX_BATCH_BYTES * INDEX_GPU_BATCH_SCALE;
        }
    }
    /* Without the pipeline one batch does. */
    bool no_memory = false;
    for (int i = 0; i < (ix->pipeline ? INDEX_BATCHES : 1); i++) {
        batch *b = &ix->batches[i];
        b->docs = calloc(ix->batch_documents, sizeof *b->docs);
        no_memory |= !b->docs;
        if (i) {
            b->next = ix->spare;
            ix->spare = b;
        }
    }
    ix->fill = &ix->batches[0];
    int rc = threadpool_online_cores() > 1 ? threadpool_create(0, &ix->chunkers) : 0;
    if (!rc && ix->pipeline) rc = store_lookup_open(s, &ix->lookup);
    int shards = store_text_shards(s);
    for (int k = 0; k < shards && !rc && ix->pipeline; k++)
        rc = store_text_open(s, k, &ix->text[k]);
    for (int k = 0; k < shards && ix->text[k]; k++) {
        if (!follower_start(&ix->text_follower[k], INDEX_TEXT_CHUNKS, text_run, ix->text[k])) break;
        ix->text_shards = k + 1;
    }
    if (ix->text_shards < shards) {
        /* Without a thread for every shard the store's commits keep the index up to date. */
        texts_end(ix);
    }
    if (!rc && ix->pipeline) rc = store_checkpointer_open(s, &ix->checkpointer);
    if (ix->checkpointer && !follower_start(&ix->checkpoint_follower, INDEX_CHECKPOINT_CHANGES,
                                            checkpoint_run, ix->checkpointer)) {
        store_checkpointer_close(ix->checkpointer);
        ix->checkpointer = NULL;
    }
    /* The search copy is then made from the last one and the vectors stored, not read back out
     * of SQLite, for as many vectors as a quarter of the memory holds. */
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (!rc)
        rc = store_track_vectors(s, pages > 0 && page > 0 ? (size_t)pages * (size_t)page / 4
                                                          : (size_t)1 << 30);
    if (rc) {
        indexer_close(ix);
        return rc;
    }
    if (no_memory) {
        indexer_close(ix);
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory indexing");
    }
    if (ix->pipeline) stages_start(ix); /* else (no thread) each stage runs here */
    *out = ix;
    return 0;
}

int indexer_add_path(indexer *ix, const char *path)
{
    return index_path(ix, path, true);
}

void indexer_expect_paths(indexer *ix, const char *const *paths, size_t count)
{
    index_summary scratch = {0}, *real = ix->summary;
    ix->summary = &scratch;
    ix->counting = true;
    for (size_t i = 0; i < count; i++) index_path(ix, paths[i], true);
    ix->counting = false;
    ix->summary = real;
    err_clear();
}

static char *copy_or_null(const char *text, bool *failed)
{
    if (!text) return NULL;
    char *copy = strdup(text);
    if (!copy) *failed = true;
    return copy;
}

int indexer_add_document(indexer *ix, const index_document *d, int *status)
{
    if (status) *status = 0;
    if (!d || !d->key || !d->text)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "a document needs an id and a text");
    bool failed = false;
    char *key = copy_or_null(d->key, &failed);
    char *source = copy_or_null(d->source ? d->source : d->key, &failed);
    char *title = copy_or_null(d->title, &failed);
    char *metadata = copy_or_null(d->metadata, &failed);
    char *text = malloc(d->length + 1);
    float *vector = d->vector ? malloc((size_t)ix->dim * sizeof *vector) : NULL;
    if (failed || !text || (d->vector && !vector)) {
        free(key);
        free(source);
        free(title);
        free(metadata);
        free(text);
        free(vector);
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory adding %s", d->key);
    }
    memcpy(text, d->text, d->length);
    text[d->length] = '\0';
    if (vector) memcpy(vector, d->vector, (size_t)ix->dim * sizeof *vector);
    return add_document(ix, key, source, title, metadata, text, d->length, vector,
                        (int64_t)d->length, 0, status);
}

int indexer_flush(indexer *ix)
{
    int rc = flush(ix);
    /* The thread's update in progress ends; the writer's update below takes the rest. */
    for (int k = 0; k < ix->text_shards; k++) follower_settle(&ix->text_follower[k], false, false);
    return rc ? rc : store_index_text(ix->store);
}

int indexer_finish_start(indexer *ix)
{
    int rc = flush(ix);
    double t = clock_seconds();
    if (!rc && ix->options->prune) rc = prune(ix);
    ix->summary->prune_seconds += clock_seconds() - t;
    followers_note(ix);
    /* The text thread's last update runs while the caller goes on (with the search copy). */
    for (int k = 0; k < ix->text_shards; k++) follower_settle(&ix->text_follower[k], true, rc != 0);
    return rc;
}

int indexer_finish_end(indexer *ix, int rc)
{
    double t = clock_seconds();
    /* The slowest shard's thread is the one the run waits for. */
    for (int k = 0; k < ix->text_shards; k++) {
        follower *f = &ix->text_follower[k];
        follower_end(f);
        if (f->seconds > ix->summary->text_thread_seconds) {
            ix->summary->text_thread_seconds = f->seconds;
            ix->summary->text_thread_cpu_seconds = f->cpu_seconds;
        }
        if (f->failures && !ix->summary->text_thread_failures)
            memcpy(ix->summary->text_thread_failure, f->failure,
                   sizeof ix->summary->text_thread_failure);
        ix->summary->text_thread_failures += f->failures;
    }
    /* Where the thread's last update failed (or there was none), this one says why. */
    if (!rc) rc = store_index_text(ix->store);
    ix->summary->text_seconds += clock_seconds() - t;
    progress(ix, true);
    return rc;
}

int indexer_finish(indexer *ix)
{
    return indexer_finish_end(ix, indexer_finish_start(ix));
}

void indexer_close(indexer *ix)
{
    if (!ix) return;
    stages_end(ix);
    follower_end(&ix->checkpoint_follower);
    store_checkpointer_close(ix->checkpointer);
    texts_end(ix);
    store_lookup_close(ix->lookup);
    for (int i = 0; i < INDEX_BATCHES; i++) batch_free(&ix->batches[i]);
    threadpool_destroy(ix->chunkers);
    for (size_t i = 0; i < ix->seen_count; i++) free(ix->seen[i]);
    free(ix->seen);
    free(ix);
}

int index_paths(embedrag_model *model, const char *const *paths, size_t count,
                const index_options *options, index_summary *summary)
{
    memset(summary, 0, sizeof *summary);
    double start = clock_seconds();
    store_model identity;
    char hash[17];
    int rc = index_model_identity(model, &identity, hash);
    store *s = NULL;
    indexer *ix = NULL;
    if (!rc) rc = store_open(options->store_path, &identity, false, &s);
    if (!rc) rc = indexer_open(model, s, options, summary, &ix);
    if (!rc && options->progress) indexer_expect_paths(ix, paths, count);
    for (size_t i = 0; i < count && !rc; i++) rc = indexer_add_path(ix, paths[i]);
    if (!rc) rc = indexer_finish_start(ix);
    if (!rc && (summary->indexed || summary->deleted)) {
        /* Loading the vectors once writes the search copy, and builds the quantized codes where
         * the store is large enough, so the first search after the run opens at once. It runs
         * beside the text thread's last update. */
        searcher *sr = NULL;
        double t = clock_seconds();
        rc = searcher_open(s, NULL, 0, &sr);
        searcher_close(sr);
        summary->copy_seconds = clock_seconds() - t;
    }
    if (ix && !rc) rc = indexer_finish_end(ix, rc);
    if (rc && ix) progress(ix, true); /* ends the progress line before the error */
    indexer_close(ix);
    store_close(s);
    summary->seconds = clock_seconds() - start;
    return rc;
}
