/* Counters and histograms for GET /metrics: see metrics.h. */
#include "metrics.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const route_names[ROUTE_COUNT] = {
    [ROUTE_EMBEDDINGS] = "/v1/embeddings",
    [ROUTE_EMBED] = "/embed",
    [ROUTE_TOKENIZE] = "/tokenize",
    [ROUTE_INFO] = "/info",
    [ROUTE_HEALTH] = "/health",
    [ROUTE_SEARCH] = "/search",
    [ROUTE_DOCUMENTS] = "/documents",
    [ROUTE_METRICS] = "/metrics",
    [ROUTE_PAGE] = "/",
    [ROUTE_OPENAPI] = "/openapi.json",
    [ROUTE_OTHER] = "other",
};

static const char *const lane_names[METRICS_LANES] = {"latency", "bulk"};

/* Bucket bounds: request seconds from 0.5 ms (a query on a GPU) to 10 s (a large batch on two
 * cores); tokens and texts per request in powers of four. */
static const double duration_bounds[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                         0.1,    0.25,  0.5,    1,     2.5,  5,     10};
static const double token_bounds[] = {16, 64, 256, 1024, 4096, 16384, 65536, 262144};
static const double text_bounds[] = {1, 4, 16, 64, 256, 1024, 4096, 16384};
#define COUNT_OF(a) (sizeof(a) / sizeof(a)[0])

typedef struct histogram {
    const double *bounds;
    size_t count;           /* bounds; buckets holds one more (+Inf) */
    unsigned long *buckets; /* not cumulative; summed when written */
    double sum;
    unsigned long total;
} histogram;

#define STATUS_MAX 600
#define REASONS 8

struct metrics {
    pthread_mutex_t lock;
    unsigned long requests[ROUTE_COUNT][STATUS_MAX];
    histogram durations[ROUTE_COUNT];
    histogram tokens, texts, tokenize, inference, queue_time, compute;
    unsigned long long tokens_total, texts_total;
    long queue[METRICS_LANES];
    const char *reasons[REASONS];
    unsigned long rejected[REASONS];
};

static int histogram_init(histogram *h, const double *bounds, size_t count)
{
    h->bounds = bounds;
    h->count = count;
    h->buckets = calloc(count + 1, sizeof *h->buckets);
    return h->buckets ? 0 : -1;
}

static void histogram_add(histogram *h, double value)
{
    size_t i = 0;
    while (i < h->count && value > h->bounds[i]) i++;
    h->buckets[i]++;
    h->sum += value;
    h->total++;
}

int metrics_create(metrics **out)
{
    *out = NULL;
    metrics *m = calloc(1, sizeof *m);
    if (!m) return -1;
    pthread_mutex_init(&m->lock, NULL);
    int failed = 0;
    for (int r = 0; r < ROUTE_COUNT; r++)
        failed |= histogram_init(&m->durations[r], duration_bounds, COUNT_OF(duration_bounds));
    failed |= histogram_init(&m->tokens, token_bounds, COUNT_OF(token_bounds));
    failed |= histogram_init(&m->texts, text_bounds, COUNT_OF(text_bounds));
    failed |= histogram_init(&m->tokenize, duration_bounds, COUNT_OF(duration_bounds));
    failed |= histogram_init(&m->inference, duration_bounds, COUNT_OF(duration_bounds));
    failed |= histogram_init(&m->queue_time, duration_bounds, COUNT_OF(duration_bounds));
    failed |= histogram_init(&m->compute, duration_bounds, COUNT_OF(duration_bounds));
    if (failed) {
        metrics_destroy(m);
        return -1;
    }
    *out = m;
    return 0;
}

void metrics_destroy(metrics *m)
{
    if (!m) return;
    for (int r = 0; r < ROUTE_COUNT; r++) free(m->durations[r].buckets);
    free(m->tokens.buckets);
    free(m->texts.buckets);
    free(m->tokenize.buckets);
    free(m->inference.buckets);
    free(m->queue_time.buckets);
    free(m->compute.buckets);
    pthread_mutex_destroy(&m->lock);
    free(m);
}

void metrics_request(metrics *m, metrics_route route, int status, double seconds)
{
    if (route < 0 || route >= ROUTE_COUNT) route = ROUTE_OTHER;
    pthread_mutex_lock(&m->lock);
    if (status >= 100 && status < STATUS_MAX) m->requests[route][status]++;
    histogram_add(&m->durations[route], seconds);
    pthread_mutex_unlock(&m->lock);
}

void metrics_batch(metrics *m, size_t texts, size_t tokens, double tokenize_seconds,
                   double queue_seconds, double compute_seconds)
{
    pthread_mutex_lock(&m->lock);
    histogram_add(&m->tokenize, tokenize_seconds);
    histogram_add(&m->inference, queue_seconds + compute_seconds);
    histogram_add(&m->queue_time, queue_seconds);
    histogram_add(&m->compute, compute_seconds);
    histogram_add(&m->texts, (double)texts);
    histogram_add(&m->tokens, (double)tokens);
    m->texts_total += texts;
    m->tokens_total += tokens;
    pthread_mutex_unlock(&m->lock);
}

void metrics_queue(metrics *m, metrics_lane lane, long texts)
{
    pthread_mutex_lock(&m->lock);
    m->queue[lane] += texts;
    pthread_mutex_unlock(&m->lock);
}

void metrics_rejected(metrics *m, const char *reason)
{
    pthread_mutex_lock(&m->lock);
    for (int i = 0; i < REASONS; i++) {
        if (!m->reasons[i]) m->reasons[i] = reason; /* reasons are static strings */
        if (!strcmp(m->reasons[i], reason)) {
            m->rejected[i]++;
            break;
        }
    }
    pthread_mutex_unlock(&m->lock);
}

static void write_histogram(out_buffer *out, const char *name, const char *labels,
                            const histogram *h)
{
    unsigned long cumulative = 0;
    const char *comma = labels[0] ? "," : "";
    for (size_t i = 0; i <= h->count; i++) {
        cumulative += h->buckets[i];
        if (i < h->count)
            out_format(out, "%s_bucket{%s%sle=\"%g\"} %lu\n", name, labels, comma, h->bounds[i],
                       cumulative);
        else
            out_format(out, "%s_bucket{%s%sle=\"+Inf\"} %lu\n", name, labels, comma, cumulative);
    }
    const char *open = labels[0] ? "{" : "", *close = labels[0] ? "}" : "";
    out_format(out, "%s_sum%s%s%s %.9g\n", name, open, labels, close, h->sum);
    out_format(out, "%s_count%s%s%s %lu\n", name, open, labels, close, h->total);
}

/* A histogram without labels, with its HELP and TYPE lines. */
static void histogram_block(out_buffer *out, const char *name, const char *help, const histogram *h)
{
    out_format(out, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    write_histogram(out, name, "", h);
}

void metrics_write(metrics *m, out_buffer *out, const char *backends)
{
    pthread_mutex_lock(&m->lock);
    out_text(out, "# HELP embedrag_requests_total HTTP requests answered, by route and status.\n"
                  "# TYPE embedrag_requests_total counter\n");
    for (int r = 0; r < ROUTE_COUNT; r++)
        for (int s = 0; s < STATUS_MAX; s++)
            if (m->requests[r][s])
                out_format(out, "embedrag_requests_total{route=\"%s\",status=\"%d\"} %lu\n",
                           route_names[r], s, m->requests[r][s]);
    out_text(out, "# HELP embedrag_request_duration_seconds Time from a request's arrival to its "
                  "reply, by route.\n# TYPE embedrag_request_duration_seconds histogram\n");
    for (int r = 0; r < ROUTE_COUNT; r++) {
        if (!m->durations[r].total) continue;
        char labels[64];
        snprintf(labels, sizeof labels, "route=\"%s\"", route_names[r]);
        write_histogram(out, "embedrag_request_duration_seconds", labels, &m->durations[r]);
    }
    out_text(out, "# HELP embedrag_queue_texts Texts admitted and not yet answered, by lane.\n"
                  "# TYPE embedrag_queue_texts gauge\n");
    for (int l = 0; l < METRICS_LANES; l++)
        out_format(out, "embedrag_queue_texts{lane=\"%s\"} %ld\n", lane_names[l], m->queue[l]);
    histogram_block(out, "embedrag_batch_tokens", "Tokens per embedding request.", &m->tokens);
    histogram_block(out, "embedrag_batch_texts", "Texts per embedding request.", &m->texts);
    histogram_block(out, "embedrag_tokenize_seconds", "Tokenization time per embedding request.",
                    &m->tokenize);
    histogram_block(out, "embedrag_inference_seconds",
                    "Time per embedding request in the engine: waiting and computing.",
                    &m->inference);
    histogram_block(out, "embedrag_queue_seconds",
                    "Time per embedding request in the engine not spent on its own batches: "
                    "waiting in its lane, and for the device or the CPU's threads.",
                    &m->queue_time);
    histogram_block(out, "embedrag_compute_seconds",
                    "Time per embedding request of the batches that carried its texts (each "
                    "counted whole).",
                    &m->compute);
    out_format(out,
               "# HELP embedrag_tokens_total Tokens embedded.\n# TYPE embedrag_tokens_total "
               "counter\nembedrag_tokens_total %llu\n"
               "# HELP embedrag_texts_total Texts embedded.\n# TYPE embedrag_texts_total "
               "counter\nembedrag_texts_total %llu\n",
               m->tokens_total, m->texts_total);
    out_text(out, "# HELP embedrag_rejected_total Requests refused before any work, by reason.\n"
                  "# TYPE embedrag_rejected_total counter\n");
    for (int i = 0; i < REASONS && m->reasons[i]; i++)
        out_format(out, "embedrag_rejected_total{reason=\"%s\"} %lu\n", m->reasons[i],
                   m->rejected[i]);
    pthread_mutex_unlock(&m->lock);
    out_text(out, "# HELP embedrag_backend_info The model's backends (value 1; failed=\"1\" once "
                  "a GPU has failed and gets no more work).\n# TYPE embedrag_backend_info gauge\n");
    out_text(out, backends);
}
