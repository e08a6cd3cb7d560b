/* The server's routes: each parses its body (request.c), calls the library (the engine's lanes
 * through embedrag_embed_tokens, the store's API) and writes the reply. No policy of its own:
 * batching, lanes and the choice of backend are the engine's. */
#include "request.h"
#include "server_internal.h"
#include "engine/engine.h"
#include "util/clock.h"
#include "util/json.h"
#include "util/threadpool.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Sequences per embedding call: between two calls a request checks that its client is still
 * there, so a client that leaves stops costing work within about this many texts. Large enough
 * that the bulk lane still fills its token-budget batches. */
#define SEQUENCES_PER_CALL 1024

/* A request of at most this many tokens in all goes to the latency lane (the engine's own
 * rule for EMBEDRAG_LANE_AUTO, made explicit so that /metrics counts what the engine does). */
#define LATENCY_LANE_TOKENS 512

/* Parses the body as JSON; on failure replies 422 with the parser's line and column. */
static cJSON *parse_body(const request *rq, reply *r, error_style style)
{
    if (rq->length == 0) {
        reply_error(r, style, 422, NULL, "the body is empty: it must be a JSON object");
        return NULL;
    }
    cJSON *root = NULL;
    if (json_parse(rq->body, rq->length, "the body", &root) != 0) {
        reply_error(r, style, 422, NULL, "%s", embedrag_last_error());
        return NULL;
    }
    return root;
}

static void fail_request(reply *r, error_style style, const request_error *e)
{
    reply_error(r, style, e->status, e->field, "%s", e->message);
}

/* Whether `name` is one of the model's prompts (or NULL); if not, replies 422 naming the field
 * with the engine's message (which lists the prompts the model has). */
static bool known_prompt(server *s, const char *name, reply *r, error_style style)
{
    if (!name) return true;
    embedrag_embed_params params = embedrag_embed_default_params();
    params.prompt_name = name;
    size_t count = 0;
    if (embedrag_tokenize(s->model, "", 0, &params, NULL, 0, &count) == 0) return true;
    reply_error(r, style, 422, "prompt_name", "prompt_name: %s", embedrag_last_error());
    return false;
}

/* One embedding request's work: tokens, vectors and the times the TEI headers report. */
typedef struct embedding {
    int32_t *ids;
    size_t *offsets; /* count + 1 */
    size_t count, tokens;
    int dim;
    float *vectors; /* count x dim */
    double tokenize_seconds;
    double inference_seconds; /* in the engine, in all */
    double compute_seconds;   /* of it, the batches' own (engine_embed_tokens_sized_timed) */
    /* A request for the bulk lane runs on its connection thread as bulk work until it is
     * answered (threadpool_bulk_enter): its wake-ups to format a finished batch's JSON then
     * never take a core from a query's thread. */
    threadpool_sched bulk;
} embedding;

static void embedding_free(embedding *e)
{
    threadpool_bulk_leave(&e->bulk);
    free(e->ids);
    free(e->offsets);
    free(e->vectors);
}

/* Tokenizes the texts as the engine would, into e's ids. Replies and returns false on a text
 * that cannot be embedded (invalid UTF-8 422, too long without truncation 413). */
static bool tokenize_texts(server *s, const request *rq, const request_inputs *in,
                           const embedrag_embed_params *params, const char *field, embedding *e,
                           reply *r, error_style style)
{
    int max_tokens = s->info.max_tokens;
    size_t capacity = 0;
    e->offsets = calloc(in->count + 1, sizeof *e->offsets);
    if (!e->offsets) goto no_memory;
    for (size_t i = 0; i < in->count; i++) {
        if (i % SEQUENCES_PER_CALL == SEQUENCES_PER_CALL - 1 && request_client_gone(rq)) {
            reply_error(r, style, 499, NULL, "the client closed the connection");
            return false;
        }
        if (e->tokens + (size_t)max_tokens > capacity) {
            size_t grown = capacity ? 2 * capacity : 4096;
            while (grown < e->tokens + (size_t)max_tokens) grown *= 2;
            int32_t *ids = realloc(e->ids, grown * sizeof *ids);
            if (!ids) goto no_memory;
            e->ids = ids;
            capacity = grown;
        }
        size_t count = 0;
        int rc = embedrag_tokenize(s->model, in->texts[i], in->lengths[i], params,
                                   e->ids + e->tokens, (size_t)max_tokens, &count);
        if (rc == EMBEDRAG_ERR_TOO_LONG) {
            reply_error(r, style, 413, field, "%s[%zu]: %s (send truncate: true to cut it)", field,
                        i, embedrag_last_error());
            return false;
        }
        if (rc) {
            reply_error(r, style, rc == EMBEDRAG_ERR_NO_MEMORY ? 500 : 422, field, "%s[%zu]: %s",
                        field, i, embedrag_last_error());
            return false;
        }
        e->tokens += count;
        e->offsets[i + 1] = e->tokens;
    }
    e->count = in->count;
    return true;
no_memory:
    reply_error(r, style, 500, NULL, "out of memory tokenizing the request");
    return false;
}

/* Runs the sequences through the engine in calls of SEQUENCES_PER_CALL, stopping when the
 * client leaves. Replies and returns false on failure. */
static bool embed_sequences(server *s, const request *rq, embedrag_embed_params *params,
                            embedding *e, reply *r, error_style style)
{
    e->vectors = malloc(e->count * (size_t)e->dim * sizeof *e->vectors);
    if (!e->vectors && e->count) {
        reply_error(r, style, 500, NULL, "out of memory for %zu vectors", e->count);
        return false;
    }
    metrics_lane lane = e->tokens <= LATENCY_LANE_TOKENS ? METRICS_LANE_LATENCY : METRICS_LANE_BULK;
    params->lane = lane == METRICS_LANE_LATENCY ? EMBEDRAG_LANE_LATENCY : EMBEDRAG_LANE_BULK;
    if (lane == METRICS_LANE_BULK) threadpool_bulk_enter(&e->bulk);
    metrics_queue(s->metrics, lane, (long)e->count);
    double start = clock_seconds();
    bool ok = true;
    size_t first = 0;
    while (first < e->count) {
        if (first > 0 && request_client_gone(rq)) {
            reply_error(r, style, 499, NULL, "the client closed the connection");
            ok = false;
            break;
        }
        size_t n = e->count - first < SEQUENCES_PER_CALL ? e->count - first : SEQUENCES_PER_CALL;
        double compute = 0.0;
        int rc = engine_embed_tokens_sized_timed(s->model, e->ids, e->offsets + first, n, params,
                                                 e->vectors + first * (size_t)e->dim, &compute);
        e->compute_seconds += compute;
        if (rc) {
            int status = rc == EMBEDRAG_ERR_INVALID_ARGUMENT ? 422
                         : rc == EMBEDRAG_ERR_DEVICE         ? 424
                         : rc == EMBEDRAG_ERR_BUSY           ? 429
                                                             : 500;
            reply_error(r, style, status, status == 422 ? "input" : NULL, "%s",
                        embedrag_last_error());
            ok = false;
            break;
        }
        metrics_queue(s->metrics, lane, -(long)n);
        first += n;
    }
    /* What a failure or a departure left unrun leaves the queue too. */
    if (first < e->count) metrics_queue(s->metrics, lane, -(long)(e->count - first));
    e->inference_seconds = clock_seconds() - start;
    /* A batch shared with other requests counts whole for each, and GPUs sharing a call add up:
     * the compute time can pass the wall time, never the queue below zero. */
    if (e->compute_seconds > e->inference_seconds) e->compute_seconds = e->inference_seconds;
    if (ok)
        metrics_batch(s->metrics, e->count, e->tokens, e->tokenize_seconds,
                      e->inference_seconds - e->compute_seconds, e->compute_seconds);
    return ok;
}

/* Admission, tokenization (texts) or adoption (token ids), and the forward passes. */
static bool run_embedding(server *s, const request *rq, request_inputs *in,
                          embedrag_embed_params *params, const char *field, embedding *e, reply *r,
                          error_style style)
{
    memset(e, 0, sizeof *e);
    e->dim = embedrag_embed_dimension(s->model, params);
    if (params->dimensions > s->info.dimension) {
        reply_error(r, style, 422, "dimensions", "dimensions is %d; this model's vectors have %d",
                    params->dimensions, s->info.dimension);
        return false;
    }
    if (!server_admit(s, (long)in->count)) {
        reply_header(r, "Retry-After", "1");
        reply_error(r, style, 429, NULL,
                    "the server is at its limit of %ld queued texts: retry after a second",
                    s->options->max_queue);
        return false;
    }
    bool ok;
    double start = clock_seconds();
    if (in->texts) {
        ok = tokenize_texts(s, rq, in, params, field, e, r, style);
    } else { /* token ids: the parser's arrays become the request's */
        e->ids = in->ids;
        e->offsets = in->offsets;
        in->ids = NULL;
        in->offsets = NULL;
        e->count = in->count;
        e->tokens = e->offsets[e->count];
        ok = true;
    }
    e->tokenize_seconds = clock_seconds() - start;
    if (ok) ok = embed_sequences(s, rq, params, e, r, style);
    server_release(s, (long)in->count);
    return ok;
}

static void timing_headers(reply *r, double total, const embedding *e)
{
    char value[32];
    snprintf(value, sizeof value, "%.0f", total * 1e3);
    reply_header(r, "x-total-time", value);
    snprintf(value, sizeof value, "%.0f", e->tokenize_seconds * 1e3);
    reply_header(r, "x-tokenization-time", value);
    snprintf(value, sizeof value, "%.0f", (e->inference_seconds - e->compute_seconds) * 1e3);
    reply_header(r, "x-queue-time", value);
    snprintf(value, sizeof value, "%.0f", e->compute_seconds * 1e3);
    reply_header(r, "x-inference-time", value);
}

/* Whether a client's "model" names the loaded one: its directory name, with or without an
 * owner ("sentence-transformers/all-MiniLM-L6-v2"). */
static bool model_matches(const char *asked, const char *name)
{
    const char *slash = strrchr(asked, '/');
    return !strcmp(asked, name) || (slash && !strcmp(slash + 1, name));
}

void route_embeddings(server *s, const request *rq, reply *r)
{
    double start = clock_seconds();
    cJSON *root = parse_body(rq, r, ERRORS_OPENAI);
    if (!root) return;
    embeddings_request body;
    request_error e;
    if (request_parse_embeddings(root, &body, &e)) {
        fail_request(r, ERRORS_OPENAI, &e);
        goto done;
    }
    if (body.model && !model_matches(body.model, s->info.name)) {
        reply_error(r, ERRORS_OPENAI, 404, "model",
                    "The model '%.128s' does not exist: this server runs '%s'", body.model,
                    s->info.name);
        goto done;
    }
    embedrag_embed_params params = embedrag_embed_default_params();
    params.dimensions = body.dimensions;
    embedding work;
    if (!run_embedding(s, rq, &body.inputs, &params, "input", &work, r, ERRORS_OPENAI)) {
        embedding_free(&work);
        goto done;
    }
    out_buffer *o = &r->body;
    out_text(o, "{\"object\":\"list\",\"data\":[");
    for (size_t i = 0; i < work.count; i++) {
        out_format(o, "%s{\"object\":\"embedding\",\"index\":%zu,\"embedding\":", i ? "," : "", i);
        const float *v = work.vectors + i * (size_t)work.dim;
        if (body.base64) {
            out_bytes(o, "\"", 1);
            out_base64(o, v, (size_t)work.dim * sizeof *v); /* little-endian, as x86 and ARM */
            out_bytes(o, "\"", 1);
        } else {
            out_json_floats(o, v, (size_t)work.dim);
        }
        out_bytes(o, "}", 1);
    }
    out_text(o, "],\"model\":");
    out_json_cstring(o, s->info.name);
    out_format(o, ",\"usage\":{\"prompt_tokens\":%zu,\"total_tokens\":%zu}}", work.tokens,
               work.tokens);
    r->status = 200;
    timing_headers(r, clock_seconds() - start, &work);
    embedding_free(&work);
done:
    request_free_inputs(&body.inputs);
    cJSON_Delete(root);
}

void route_embed(server *s, const request *rq, reply *r)
{
    double start = clock_seconds();
    cJSON *root = parse_body(rq, r, ERRORS_TEI);
    if (!root) return;
    embed_request body;
    request_error e;
    if (request_parse_embed(root, &body, &e)) {
        fail_request(r, ERRORS_TEI, &e);
        goto done;
    }
    if (!known_prompt(s, body.prompt_name, r, ERRORS_TEI)) goto done;
    embedrag_embed_params params = embedrag_embed_default_params();
    params.normalize = body.normalize;
    params.truncate = body.truncate;
    params.truncate_left = body.truncate_left;
    params.prompt_name = body.prompt_name;
    params.dimensions = body.dimensions;
    embedding work;
    if (!run_embedding(s, rq, &body.inputs, &params, "inputs", &work, r, ERRORS_TEI)) {
        embedding_free(&work);
        goto done;
    }
    out_buffer *o = &r->body;
    out_bytes(o, "[", 1);
    for (size_t i = 0; i < work.count; i++) {
        if (i) out_bytes(o, ",", 1);
        out_json_floats(o, work.vectors + i * (size_t)work.dim, (size_t)work.dim);
    }
    out_bytes(o, "]", 1);
    r->status = 200;
    timing_headers(r, clock_seconds() - start, &work);
    embedding_free(&work);
done:
    request_free_inputs(&body.inputs);
    cJSON_Delete(root);
}

static bool special_token(const char *text)
{
    static const char *const specials[] = {"[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"};
    for (size_t i = 0; i < sizeof specials / sizeof *specials; i++)
        if (text && !strcmp(text, specials[i])) return true;
    return false;
}

void route_tokenize(server *s, const request *rq, reply *r)
{
    cJSON *root = parse_body(rq, r, ERRORS_TEI);
    if (!root) return;
    tokenize_request body;
    request_error e;
    int32_t *ids = NULL;
    if (request_parse_tokenize(root, &body, &e)) {
        fail_request(r, ERRORS_TEI, &e);
        goto done;
    }
    if (!known_prompt(s, body.prompt_name, r, ERRORS_TEI)) goto done;
    embedrag_embed_params params = embedrag_embed_default_params();
    params.prompt_name = body.prompt_name;
    ids = malloc((size_t)s->info.max_tokens * sizeof *ids);
    if (!ids) {
        reply_error(r, ERRORS_TEI, 500, NULL, "out of memory");
        goto done;
    }
    out_buffer *o = &r->body;
    out_bytes(o, "[", 1);
    for (size_t i = 0; i < body.inputs.count; i++) {
        size_t count = 0;
        if (embedrag_tokenize(s->model, body.inputs.texts[i], body.inputs.lengths[i], &params, ids,
                              (size_t)s->info.max_tokens, &count)) {
            reply_error(r, ERRORS_TEI, 422, "inputs", "inputs[%zu]: %s", i, embedrag_last_error());
            goto done;
        }
        out_text(o, i ? ",[" : "[");
        size_t first = body.add_special_tokens ? 0 : 1;
        size_t end = body.add_special_tokens ? count : count - 1;
        for (size_t t = first; t < end; t++) {
            const char *text = embedrag_token_text(s->model, ids[t]);
            out_format(o, "%s{\"id\":%d,\"text\":", t > first ? "," : "", (int)ids[t]);
            out_json_cstring(o, text ? text : "");
            out_format(o, ",\"special\":%s}", special_token(text) ? "true" : "false");
        }
        out_bytes(o, "]", 1);
    }
    out_bytes(o, "]", 1);
    r->status = 200;
done:
    free(ids);
    request_free_inputs(&body.inputs);
    cJSON_Delete(root);
}

static const char *pooling_name(embedrag_pooling p)
{
    return p == EMBEDRAG_POOLING_CLS ? "cls" : p == EMBEDRAG_POOLING_MAX ? "max" : "mean";
}

static const char *precision_name(embedrag_precision p)
{
    return p == EMBEDRAG_PRECISION_BF16   ? "bfloat16"
           : p == EMBEDRAG_PRECISION_FP16 ? "float16"
                                          : "float32";
}

void route_info(server *s, const request *rq, reply *r)
{
    (void)rq;
    out_buffer *o = &r->body;
    out_text(o, "{\"model_id\":");
    out_json_cstring(o, s->info.name);
    out_format(o, ",\"model_dtype\":\"%s\",\"model_type\":{\"embedding\":{\"pooling\":\"%s\"}}",
               precision_name(s->info.precision), pooling_name(s->info.pooling));
    out_format(o, ",\"dimension\":%d,\"max_input_length\":%d", s->info.dimension,
               s->info.max_tokens);
    embedrag_backend_info cpu;
    int batch_tokens = embedrag_model_get_backend(s->model, 0, &cpu) == 0 ? cpu.batch_tokens : 0;
    out_format(o, ",\"max_batch_tokens\":%d,\"max_client_batch_size\":%ld,\"max_queue\":%ld",
               batch_tokens, s->options->max_queue, s->options->max_queue);
    out_text(o, ",\"prompts\":{");
    for (int i = 0; i < s->info.prompt_count; i++) {
        const char *name, *text;
        if (embedrag_model_get_prompt(s->model, i, &name, &text) != 0) continue;
        if (i) out_bytes(o, ",", 1);
        out_json_cstring(o, name);
        out_bytes(o, ":", 1);
        out_json_cstring(o, text);
    }
    out_text(o, "},\"default_prompt_name\":");
    out_json_cstring(o, s->info.default_prompt_name);
    out_text(o, ",\"backends\":[");
    for (int i = 0; i < s->info.backend_count; i++) {
        embedrag_backend_info b;
        if (embedrag_model_get_backend(s->model, i, &b) != 0) continue;
        out_text(o, i ? ",{\"name\":" : "{\"name\":");
        out_json_cstring(o, b.name);
        out_text(o, ",\"device\":");
        out_json_cstring(o, b.device);
        out_format(o, ",\"precision\":\"%s\",\"failed\":%s}", precision_name(b.precision),
                   b.failure ? "true" : "false");
    }
    out_text(o, "],\"version\":");
    out_json_cstring(o, embedrag_version());
    out_text(o, ",\"store\":");
    if (s->store) {
        embedrag_store_info st;
        pthread_mutex_lock(&s->store_lock);
        int rc = embedrag_store_get_info(s->store, &st);
        pthread_mutex_unlock(&s->store_lock);
        out_text(o, "{\"path\":");
        out_json_cstring(o, s->options->store_path);
        if (!rc)
            out_format(o, ",\"documents\":%lld,\"chunks\":%lld", (long long)st.documents,
                       (long long)st.chunks);
        out_format(o, ",\"read_only\":%s}", s->options->read_only ? "true" : "false");
    } else {
        out_text(o, "null");
    }
    out_bytes(o, "}", 1);
    r->status = 200;
}

/* ---- the store ---- */

static bool need_store(server *s, reply *r, bool write)
{
    if (!s->store) {
        reply_error(r, ERRORS_TEI, 404, NULL,
                    "this server has no store: start it with --store FILE to search and add "
                    "documents");
        return false;
    }
    if (write && s->options->read_only) {
        reply_error(r, ERRORS_TEI, 403, NULL,
                    "this server was started with --read-only: documents cannot be changed");
        return false;
    }
    return true;
}

/* A stored metadata object as JSON (it was written from JSON), or null. */
static void out_metadata(out_buffer *o, const char *metadata)
{
    out_text(o, metadata && metadata[0] == '{' ? metadata : "null");
}

static int store_status(int rc)
{
    switch (rc) {
    case EMBEDRAG_ERR_INVALID_ARGUMENT:
    case EMBEDRAG_ERR_INVALID_UTF8:
        return 422;
    case EMBEDRAG_ERR_NOT_FOUND:
        return 404;
    case EMBEDRAG_ERR_BUSY:
        return 503;
    case EMBEDRAG_ERR_DEVICE:
        return 424;
    default:
        return 500;
    }
}

void route_search(server *s, const request *rq, reply *r)
{
    if (!need_store(s, r, false)) return;
    double start = clock_seconds();
    cJSON *root = parse_body(rq, r, ERRORS_TEI);
    if (!root) return;
    search_body body;
    request_error e;
    embedrag_search_result *results = NULL;
    if (request_parse_search(root, &body, &e)) {
        fail_request(r, ERRORS_TEI, &e);
        goto done;
    }
    results = malloc((size_t)body.k * sizeof *results);
    if (!results) {
        reply_error(r, ERRORS_TEI, 500, NULL, "out of memory");
        goto done;
    }
    embedrag_search_params params = embedrag_search_default_params();
    params.k = body.k;
    params.mode = body.mode;
    params.source_glob = body.path;
    params.metadata_keys = body.keys;
    params.metadata_values = (const char *const *)body.values;
    params.metadata_count = body.filters;
    params.exact = body.exact;
    static const char *const mode_names[] = {"dense", "bm25", "hybrid"};
    pthread_mutex_lock(&s->store_lock);
    int found = 0;
    int rc = embedrag_store_search(s->store, body.query, &params, results, &found);
    if (rc) {
        reply_error(r, ERRORS_TEI, store_status(rc), NULL, "%s", embedrag_last_error());
    } else {
        out_buffer *o = &r->body;
        out_text(o, "{\"query\":");
        out_json_cstring(o, body.query);
        out_format(o, ",\"mode\":\"%s\",\"took_ms\":%.3f,\"results\":[", mode_names[body.mode],
                   (clock_seconds() - start) * 1e3);
        for (int i = 0; i < found; i++) {
            const embedrag_search_result *h = &results[i];
            out_format(o, "%s{\"rank\":%d,\"score\":%.9g,\"document\":", i ? "," : "", i + 1,
                       h->score);
            out_json_cstring(o, h->document);
            out_text(o, ",\"source\":");
            out_json_cstring(o, h->source);
            out_text(o, ",\"title\":");
            out_json_cstring(o, h->title);
            out_format(o, ",\"chunk\":%d,\"start\":%lld,\"end\":%lld,\"text\":", h->chunk,
                       (long long)h->start, (long long)h->end);
            out_json_cstring(o, h->text);
            out_text(o, ",\"metadata\":");
            out_metadata(o, h->metadata);
            out_bytes(o, "}", 1);
        }
        out_text(o, "]}");
        r->status = 200;
    }
    pthread_mutex_unlock(&s->store_lock);
done:
    free(results);
    request_free_search(&body);
    cJSON_Delete(root);
}

void route_documents_post(server *s, const request *rq, reply *r)
{
    if (!need_store(s, r, true)) return;
    cJSON *root = parse_body(rq, r, ERRORS_TEI);
    if (!root) return;
    documents_body body;
    request_error e;
    int *statuses = NULL;
    if (request_parse_documents(root, &body, &e)) {
        fail_request(r, ERRORS_TEI, &e);
        goto done;
    }
    statuses = calloc(body.count, sizeof *statuses);
    if (!statuses) {
        reply_error(r, ERRORS_TEI, 500, NULL, "out of memory");
        goto done;
    }
    if (!server_admit(s, (long)body.count)) {
        reply_header(r, "Retry-After", "1");
        reply_error(r, ERRORS_TEI, 429, NULL, "the server is at its limit of queued texts");
        goto done;
    }
    pthread_mutex_lock(&s->store_lock);
    int rc = embedrag_store_add(s->store, body.documents, body.count, statuses);
    char first[512];
    snprintf(first, sizeof first, "%s", embedrag_last_error());
    pthread_mutex_unlock(&s->store_lock);
    server_release(s, (long)body.count);
    if (rc) {
        reply_error(r, ERRORS_TEI, store_status(rc), NULL, "%s", first);
        goto done;
    }
    size_t stored = 0;
    out_buffer *o = &r->body;
    out_text(o, "{\"documents\":[");
    for (size_t i = 0; i < body.count; i++) {
        out_text(o, i ? ",{\"id\":" : "{\"id\":");
        out_json_cstring(o, body.documents[i].id);
        if (statuses[i] == 0) {
            stored++;
            out_text(o, ",\"status\":\"stored\"}");
        } else {
            out_text(o, ",\"status\":\"error\",\"error\":");
            out_json_cstring(o, embedrag_status_text(statuses[i]));
            out_bytes(o, "}", 1);
        }
    }
    out_format(o, "],\"stored\":%zu,\"failed\":%zu", stored, body.count - stored);
    if (stored < body.count) {
        out_text(o, ",\"first_error\":");
        out_json_cstring(o, first);
    }
    out_bytes(o, "}", 1);
    r->status = stored ? 200 : 422;
done:
    free(statuses);
    request_free_documents(&body);
    cJSON_Delete(root);
}

void route_document_get(server *s, const request *rq, const char *id, reply *r)
{
    (void)rq;
    if (!need_store(s, r, false)) return;
    embedrag_document_info d;
    pthread_mutex_lock(&s->store_lock);
    int rc = embedrag_store_get_document(s->store, id, &d);
    if (rc) {
        reply_error(r, ERRORS_TEI, store_status(rc), NULL, "%s", embedrag_last_error());
    } else {
        out_buffer *o = &r->body;
        out_text(o, "{\"id\":");
        out_json_cstring(o, d.id);
        out_text(o, ",\"source\":");
        out_json_cstring(o, d.source);
        out_text(o, ",\"title\":");
        out_json_cstring(o, d.title);
        out_text(o, ",\"metadata\":");
        out_metadata(o, d.metadata);
        out_text(o, ",\"chunks\":[");
        for (int i = 0; i < d.chunk_count; i++) {
            const embedrag_chunk *c = &d.chunks[i];
            out_format(o, "%s{\"chunk\":%d,\"start\":%lld,\"end\":%lld,\"tokens\":%d,\"text\":",
                       i ? "," : "", c->chunk, (long long)c->start, (long long)c->end, c->tokens);
            out_json_cstring(o, c->text);
            out_bytes(o, "}", 1);
        }
        out_text(o, "]}");
        r->status = 200;
    }
    pthread_mutex_unlock(&s->store_lock);
}

void route_document_delete(server *s, const request *rq, const char *id, reply *r)
{
    (void)rq;
    if (!need_store(s, r, true)) return;
    bool found = false;
    pthread_mutex_lock(&s->store_lock);
    int rc = embedrag_store_delete(s->store, id, &found);
    char message[512];
    snprintf(message, sizeof message, "%s", embedrag_last_error());
    pthread_mutex_unlock(&s->store_lock);
    if (rc) {
        reply_error(r, ERRORS_TEI, store_status(rc), NULL, "%s", message);
    } else if (!found) {
        reply_error(r, ERRORS_TEI, 404, NULL, "no document with id '%.256s'", id);
    } else {
        out_text(&r->body, "{\"id\":");
        out_json_cstring(&r->body, id);
        out_text(&r->body, ",\"deleted\":true}");
        r->status = 200;
    }
}

/* What the engine's routing chose: each backend's finished work by lane, read once per scrape
 * so that the four series agree with each other. */
static void backend_work_lines(server *s, out_buffer *out)
{
    enum { SERIES = 4, LANES = 2 };
    static const char *names[SERIES] = {
        "embedrag_backend_batches_total", "embedrag_backend_texts_total",
        "embedrag_backend_tokens_total", "embedrag_backend_seconds_total"};
    static const char *helps[SERIES] = {
        "Forward passes finished, by backend and lane.",
        ("Texts embedded, by backend and lane (the routing's choices; the engine's timing "
         "batches at open included)."),
        "Tokens embedded, by backend and lane.",
        "The backends' own compute time for those batches, by backend and lane."};
    static const embedrag_lane lanes[LANES] = {EMBEDRAG_LANE_LATENCY, EMBEDRAG_LANE_BULK};
    static const char *lane_labels[LANES] = {"latency", "bulk"};
    int n = s->info.backend_count;
    const char **backend_names = calloc((size_t)n, sizeof *backend_names);
    embedrag_backend_work *work = calloc((size_t)n * LANES, sizeof *work);
    if (!backend_names || !work) {
        out->failed = true; /* answered as out of memory, as any reply that could not grow */
        goto done;
    }
    for (int i = 0; i < n; i++) {
        embedrag_backend_info b;
        if (embedrag_model_get_backend(s->model, i, &b) != 0) continue;
        backend_names[i] = b.name;
        for (int l = 0; l < LANES; l++)
            embedrag_model_get_backend_work(s->model, i, lanes[l], &work[i * LANES + l]);
    }
    for (int k = 0; k < SERIES; k++) {
        out_format(out, "# HELP %s %s\n# TYPE %s counter\n", names[k], helps[k], names[k]);
        for (int i = 0; i < n * LANES; i++) {
            if (!backend_names[i / LANES]) continue;
            const embedrag_backend_work *w = &work[i];
            out_format(out, "%s{backend=", names[k]);
            out_json_cstring(out, backend_names[i / LANES]);
            out_format(out, ",lane=\"%s\"} ", lane_labels[i % LANES]);
            if (k == SERIES - 1)
                out_format(out, "%.9g\n", w->seconds);
            else
                out_format(out, "%llu\n",
                           (unsigned long long)(k == 0   ? w->batches
                                                : k == 1 ? w->texts
                                                         : w->tokens));
        }
    }
done:
    free(backend_names);
    free(work);
}

void route_metrics(server *s, const request *rq, reply *r)
{
    (void)rq;
    metrics_write(s->metrics, &r->body, s->backend_lines ? s->backend_lines : "");
    backend_work_lines(s, &r->body);
    r->content_type = "text/plain; version=0.0.4";
    r->status = 200;
}
