/* `embedrag serve`: an HTTP server over one model's engine lanes and, optionally, one store.
 * The routes (OpenAI, TEI, the store, metrics, the page) are in ROUTES.md beside this file. */
#ifndef EMBEDRAG_SERVER_H
#define EMBEDRAG_SERVER_H

#include "embedrag.h"

#include <stdbool.h>
#include <stddef.h>

/* Defaults, and where they come from. */
#define SERVER_DEFAULT_PORT 8080
/* TEI's default payload limit is 2 MB; ours is larger so that a 10 MB text (which is cut to
 * the model's limit anyway) is answered rather than refused. */
#define SERVER_DEFAULT_MAX_BODY_MB 16
/* Texts admitted at once: about 4 s of bulk work for MiniLM on two cores, a few ms on a GPU. */
#define SERVER_DEFAULT_MAX_QUEUE 4096
/* Seconds a connection may stay silent: long enough for a slow client on a slow link, short
 * enough that stalled and slow-header connections do not pile up. */
#define SERVER_DEFAULT_TIMEOUT 30
/* Open connections at once; each has a thread while it is open. */
#define SERVER_MAX_CONNECTIONS 1024

typedef struct server_options {
    const char *host;       /* address to listen on: "127.0.0.1" by default, "0.0.0.0", "::" */
    int port;               /* 0: any free port */
    const char *api_key;    /* or NULL: then no route needs a key */
    const char *store_path; /* for GET /info; NULL without a store */
    bool read_only;         /* refuse the document routes that change the store */
    size_t max_body;        /* bytes */
    long max_queue;         /* texts */
    int timeout_seconds;
    const char *cors_origin; /* or NULL: no CORS headers */
    bool quiet;              /* no request log on stderr */
} server_options;

/* Serves until SIGTERM or SIGINT, then finishes the requests in flight and returns 0; or
 * returns nonzero at once, after printing why, when it cannot listen. The model (and the
 * store, which may be NULL) stay the caller's. Prints "listening on http://HOST:PORT" to stdout
 * once it accepts connections. */
int server_run(embedrag_model *model, embedrag_store *store, const server_options *options);

#endif
