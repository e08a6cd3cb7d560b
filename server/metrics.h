/* The server's counters and histograms, written in Prometheus' text format for GET /metrics.
 * One lock guards them all: every update is a few additions, far below a request's cost. */
#ifndef EMBEDRAG_SERVER_METRICS_H
#define EMBEDRAG_SERVER_METRICS_H

#include "output.h"

#include <stddef.h>

/* The routes as counted (anything else is ROUTE_OTHER). */
typedef enum metrics_route {
    ROUTE_EMBEDDINGS, /* POST /v1/embeddings */
    ROUTE_EMBED,      /* POST /embed */
    ROUTE_TOKENIZE,
    ROUTE_INFO,
    ROUTE_HEALTH,
    ROUTE_SEARCH,
    ROUTE_DOCUMENTS,
    ROUTE_METRICS,
    ROUTE_PAGE,
    ROUTE_OPENAPI,
    ROUTE_OTHER,
    ROUTE_COUNT
} metrics_route;

typedef enum metrics_lane { METRICS_LANE_LATENCY, METRICS_LANE_BULK, METRICS_LANES } metrics_lane;

typedef struct metrics metrics;

int metrics_create(metrics **out);
void metrics_destroy(metrics *m);

/* A finished request: its route, HTTP status and seconds from the first byte to the reply. */
void metrics_request(metrics *m, metrics_route route, int status, double seconds);

/* An embedding request's texts and tokens once embedded, with the seconds its tokenization took
 * and its engine calls: queue_seconds waiting (in the engine's lanes, for the device or the
 * CPU's threads), compute_seconds in the batches that carried its texts; and the texts it adds
 * to (or, with a negative count, takes from) a lane's queue. */
void metrics_batch(metrics *m, size_t texts, size_t tokens, double tokenize_seconds,
                   double queue_seconds, double compute_seconds);
void metrics_queue(metrics *m, metrics_lane lane, long texts);

/* A request refused before any work: "queue_full", "body_too_large", "unauthorized",
 * "shutting_down", "disconnected" (a client gone while its work waited). */
void metrics_rejected(metrics *m, const char *reason);

/* Everything, in Prometheus' text format (version 0.0.4). `backends` is written as is: lines of
 * embedrag_backend_info, made by the caller from the model. */
void metrics_write(metrics *m, out_buffer *out, const char *backends);

#endif
