/* What the HTTP layer (http.c) and the route handlers (routes.c) share: the server's state, one
 * request as the handlers see it, and the reply they fill. */
#ifndef EMBEDRAG_SERVER_INTERNAL_H
#define EMBEDRAG_SERVER_INTERNAL_H

#include "metrics.h"
#include "output.h"
#include "server.h"

#include <pthread.h>
#include <stdatomic.h>

typedef struct server {
    embedrag_model *model;
    embedrag_model_info info;
    embedrag_store *store;      /* or NULL */
    pthread_mutex_t store_lock; /* a store handle is used by one thread at a time */
    const server_options *options;
    metrics *metrics;
    char *backend_lines; /* embedrag_backend_info lines for /metrics, made at start */
    atomic_long queued;  /* texts admitted and not yet answered */
    atomic_int active;   /* requests being handled */
    atomic_bool stopping;
} server;

typedef struct request {
    const char *method;
    const char *path;
    const char *body;
    size_t length;
    int socket; /* the client's, to notice that it left; -1 when unknown */
} request;

/* The shape of an error body: OpenAI's {"error": {"message", "type", "param", "code"}} on
 * /v1/ routes, TEI's {"error", "error_type"} elsewhere. */
typedef enum error_style { ERRORS_OPENAI, ERRORS_TEI } error_style;

#define REPLY_HEADERS 6
typedef struct reply {
    int status;
    out_buffer body;
    const char *content_type;
    const char *static_body; /* instead of body: bytes that outlive the server (the page) */
    size_t static_length;
    char headers[REPLY_HEADERS][2][48];
    int header_count;
} reply;

void reply_header(reply *r, const char *name, const char *value);

/* Replies `status` with an error body of the route's style naming `field` (or NULL). */
void reply_error(reply *r, error_style style, int status, const char *field, const char *format,
                 ...) __attribute__((format(printf, 5, 6)));

/* Whether the client has closed its connection (a read would see the end). */
bool request_client_gone(const request *rq);

/* Admission: takes `texts` places in the queue, or returns false when that would pass
 * --max-queue while other work is in flight. server_release gives them back. */
bool server_admit(server *s, long texts);
void server_release(server *s, long texts);

/* The route handlers (routes.c); each fills the reply. */
void route_embeddings(server *s, const request *rq, reply *r);
void route_embed(server *s, const request *rq, reply *r);
void route_tokenize(server *s, const request *rq, reply *r);
void route_info(server *s, const request *rq, reply *r);
void route_search(server *s, const request *rq, reply *r);
void route_documents_post(server *s, const request *rq, reply *r);
void route_document_get(server *s, const request *rq, const char *id, reply *r);
void route_document_delete(server *s, const request *rq, const char *id, reply *r);
void route_metrics(server *s, const request *rq, reply *r);

/* The search page and the OpenAPI description, embedded at build time (assets.c). */
extern const char server_page_html[];
extern const size_t server_page_html_size;
extern const char server_openapi_json[];
extern const size_t server_openapi_json_size;

#endif
