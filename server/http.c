/* The HTTP layer of `embedrag serve`, over libmicrohttpd (Debian's libmicrohttpd12): one thread
 * per connection, so a handler may block in the engine while the engine's lanes batch
 * concurrent requests together. This file owns what is HTTP: listening, bodies and their limit,
 * the API key, admission, routing, CORS, and a graceful stop on SIGTERM. */
#include "server_internal.h"
#include "util/clock.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* How long a stop waits for requests in flight before it closes their connections anyway. */
#define SHUTDOWN_GRACE_SECONDS 60

void reply_header(reply *r, const char *name, const char *value)
{
    if (r->header_count == REPLY_HEADERS) return;
    snprintf(r->headers[r->header_count][0], sizeof r->headers[0][0], "%s", name);
    snprintf(r->headers[r->header_count][1], sizeof r->headers[0][1], "%s", value);
    r->header_count++;
}

static const char *tei_error_type(int status)
{
    switch (status) {
    case 400:
        return "Empty";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "NotFound";
    case 429:
        return "Overloaded";
    case 424:
    case 500:
    case 503:
        return "Backend";
    default:
        return "Validation";
    }
}

static const char *openai_error_type(int status)
{
    switch (status) {
    case 401:
        return "authentication_error";
    case 404:
        return "invalid_request_error";
    case 429:
        return "rate_limit_error";
    default:
        return status >= 500 ? "server_error" : "invalid_request_error";
    }
}

void reply_error(reply *r, error_style style, int status, const char *field, const char *format,
                 ...)
{
    char message[1024];
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof message, format, args);
    va_end(args);
    r->status = status;
    r->body.length = 0;
    out_buffer *o = &r->body;
    if (style == ERRORS_OPENAI) {
        out_text(o, "{\"error\":{\"message\":");
        out_json_cstring(o, message);
        out_format(o, ",\"type\":\"%s\",\"param\":", openai_error_type(status));
        out_json_cstring(o, field);
        out_text(o, ",\"code\":");
        out_text(o, status == 404 && field && !strcmp(field, "model") ? "\"model_not_found\""
                    : status == 401                                   ? "\"invalid_api_key\""
                                                                      : "null");
        out_text(o, "}}");
    } else {
        out_text(o, "{\"error\":");
        out_json_cstring(o, message);
        out_format(o, ",\"error_type\":\"%s\"}", tei_error_type(status));
    }
}

bool request_client_gone(const request *rq)
{
    if (rq->socket < 0) return false;
    char byte;
    ssize_t n = recv(rq->socket, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0) return true; /* an orderly close */
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return true;
    return false;
}

bool server_admit(server *s, long texts)
{
    long queued = atomic_load(&s->queued);
    for (;;) {
        /* A request larger than the whole queue still runs when it is alone. */
        if (queued > 0 && queued + texts > s->options->max_queue) {
            metrics_rejected(s->metrics, "queue_full");
            return false;
        }
        if (atomic_compare_exchange_weak(&s->queued, &queued, queued + texts)) return true;
    }
}

void server_release(server *s, long texts)
{
    atomic_fetch_sub(&s->queued, texts);
}

/* ---- connections ---- */

/* One request's state across libmicrohttpd's calls: the body as it arrives. */
typedef struct exchange {
    double start;
    char *body;
    size_t length, capacity;
    bool too_large;
    bool counted; /* in server.active */
    metrics_route route;
} exchange;

/* Compares without an early exit, so the time taken says nothing about where a guess
 * differs. */
static bool same_secret(const char *given, const char *key)
{
    size_t n = strlen(key), m = strlen(given);
    unsigned char diff = (unsigned char)(n != m);
    for (size_t i = 0; i < n; i++) diff |= (unsigned char)(key[i] ^ (i < m ? given[i] : 0));
    return diff == 0;
}

static bool authorized(server *s, struct MHD_Connection *c)
{
    if (!s->options->api_key) return true;
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    if (!h || strncasecmp(h, "Bearer ", 7) != 0) return false;
    h += 7;
    while (*h == ' ') h++;
    return same_secret(h, s->options->api_key);
}

static metrics_route route_of(const char *path)
{
    static const struct {
        const char *path;
        metrics_route route;
    } exact[] = {{"/v1/embeddings", ROUTE_EMBEDDINGS},
                 {"/embeddings", ROUTE_EMBEDDINGS},
                 {"/embed", ROUTE_EMBED},
                 {"/tokenize", ROUTE_TOKENIZE},
                 {"/info", ROUTE_INFO},
                 {"/health", ROUTE_HEALTH},
                 {"/search", ROUTE_SEARCH},
                 {"/documents", ROUTE_DOCUMENTS},
                 {"/metrics", ROUTE_METRICS},
                 {"/", ROUTE_PAGE},
                 {"/openapi.json", ROUTE_OPENAPI}};
    for (size_t i = 0; i < sizeof exact / sizeof *exact; i++)
        if (!strcmp(path, exact[i].path)) return exact[i].route;
    if (!strncmp(path, "/documents/", 11) && path[11]) return ROUTE_DOCUMENTS;
    return ROUTE_OTHER;
}

static error_style style_of(const char *path)
{
    return !strncmp(path, "/v1/", 4) || !strcmp(path, "/embeddings") ? ERRORS_OPENAI : ERRORS_TEI;
}

/* The methods a route takes, for 405's Allow header; NULL for no such route. */
static const char *methods_of(const char *path, metrics_route route)
{
    switch (route) {
    case ROUTE_EMBEDDINGS:
    case ROUTE_EMBED:
    case ROUTE_TOKENIZE:
    case ROUTE_SEARCH:
        return "POST";
    case ROUTE_INFO:
    case ROUTE_HEALTH:
    case ROUTE_METRICS:
    case ROUTE_PAGE:
    case ROUTE_OPENAPI:
        return "GET";
    case ROUTE_DOCUMENTS:
        return strcmp(path, "/documents") ? "GET, DELETE" : "POST";
    default:
        return NULL;
    }
}

static void dispatch(server *s, const request *rq, metrics_route route, reply *r)
{
    const char *m = rq->method;
    bool get = !strcmp(m, "GET") || !strcmp(m, "HEAD");
    switch (route) {
    case ROUTE_EMBEDDINGS:
        route_embeddings(s, rq, r);
        return;
    case ROUTE_EMBED:
        route_embed(s, rq, r);
        return;
    case ROUTE_TOKENIZE:
        route_tokenize(s, rq, r);
        return;
    case ROUTE_SEARCH:
        route_search(s, rq, r);
        return;
    case ROUTE_INFO:
        route_info(s, rq, r);
        return;
    case ROUTE_METRICS:
        route_metrics(s, rq, r);
        return;
    case ROUTE_HEALTH:
        r->status = atomic_load(&s->stopping) ? 503 : 200;
        return;
    case ROUTE_PAGE:
        r->status = 200;
        r->content_type = "text/html; charset=utf-8";
        r->static_body = server_page_html;
        r->static_length = server_page_html_size;
        return;
    case ROUTE_OPENAPI:
        r->status = 200;
        r->static_body = server_openapi_json;
        r->static_length = server_openapi_json_size;
        return;
    case ROUTE_DOCUMENTS:
        if (!strcmp(rq->path, "/documents"))
            route_documents_post(s, rq, r);
        else if (get)
            route_document_get(s, rq, rq->path + 11, r);
        else
            route_document_delete(s, rq, rq->path + 11, r);
        return;
    default:
        reply_error(r, ERRORS_TEI, 404, NULL, "no route %.200s", rq->path);
    }
}

static enum MHD_Result send_reply(server *s, struct MHD_Connection *c, exchange *x, reply *r,
                                  bool close)
{
    struct MHD_Response *response;
    if (r->static_body) {
        response = MHD_create_response_from_buffer(r->static_length, (void *)r->static_body,
                                                   MHD_RESPMEM_PERSISTENT);
    } else {
        if (r->body.failed) {
            free(r->body.data);
            r->body = (out_buffer){0};
            reply_error(r, ERRORS_TEI, 500, NULL, "out of memory writing the response");
        }
        response =
            MHD_create_response_from_buffer(r->body.length, r->body.data, MHD_RESPMEM_MUST_FREE);
        if (response) r->body.data = NULL;
    }
    free(r->body.data);
    r->body.data = NULL;
    if (!response) return MHD_NO;
    MHD_add_response_header(response, "Content-Type",
                            r->content_type ? r->content_type : "application/json");
    for (int i = 0; i < r->header_count; i++)
        MHD_add_response_header(response, r->headers[i][0], r->headers[i][1]);
    if (s->options->cors_origin) {
        MHD_add_response_header(response, "Access-Control-Allow-Origin", s->options->cors_origin);
        MHD_add_response_header(response, "Vary", "Origin");
    }
    if (close || atomic_load(&s->stopping))
        MHD_add_response_header(response, "Connection", "close");
    enum MHD_Result queued = MHD_queue_response(c, (unsigned)r->status, response);
    MHD_destroy_response(response);
    metrics_request(s->metrics, x->route, r->status, clock_seconds() - x->start);
    return queued;
}

/* Replies at once with an error and closes (the body, if any, is not read). */
static enum MHD_Result refuse(server *s, struct MHD_Connection *c, exchange *x, const char *path,
                              int status, const char *format, const char *detail)
{
    reply r = {0};
    reply_error(&r, style_of(path), status, NULL, format, detail);
    if (status == 401) reply_header(&r, "WWW-Authenticate", "Bearer");
    if (status == 503) reply_header(&r, "Retry-After", "1");
    return send_reply(s, c, x, &r, true);
}

static enum MHD_Result handle(void *context, struct MHD_Connection *c, const char *url,
                              const char *method, const char *version, const char *upload,
                              size_t *upload_size, void **state)
{
    (void)version;
    server *s = context;
    exchange *x = *state;
    if (!x) { /* the headers are in: decide what can be decided before the body */
        if (!(x = calloc(1, sizeof *x))) return MHD_NO;
        *state = x;
        x->start = clock_seconds();
        x->route = route_of(url);
        atomic_fetch_add(&s->active, 1);
        x->counted = true;
        if (s->options->cors_origin && !strcmp(method, "OPTIONS")) {
            reply r = {.status = 204};
            reply_header(&r, "Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS");
            reply_header(&r, "Access-Control-Allow-Headers", "Authorization, Content-Type");
            reply_header(&r, "Access-Control-Max-Age", "600");
            return send_reply(s, c, x, &r, false);
        }
        if (x->route == ROUTE_HEALTH && strcmp(method, "GET") && strcmp(method, "HEAD"))
            return refuse(s, c, x, url, 405, "%s takes GET", url);
        /* The health check and the page (static, and a browser cannot send a key to open
         * it: the page asks for the key when a search is refused) need no key. */
        if (x->route != ROUTE_HEALTH && x->route != ROUTE_PAGE && !authorized(s, c)) {
            metrics_rejected(s->metrics, "unauthorized");
            return refuse(s, c, x, url, 401, "%s",
                          "a valid API key is required: send Authorization: Bearer KEY");
        }
        if (atomic_load(&s->stopping) && x->route != ROUTE_HEALTH) {
            metrics_rejected(s->metrics, "shutting_down");
            return refuse(s, c, x, url, 503, "%s", "the server is shutting down");
        }
        const char *allowed = methods_of(url, x->route);
        if (!allowed) return refuse(s, c, x, url, 404, "no route %.200s", url);
        bool head = !strcmp(method, "HEAD") && strstr(allowed, "GET");
        if (!head && !strstr(allowed, method)) {
            reply r = {0};
            reply_error(&r, style_of(url), 405, NULL, "%.200s takes %s, not %.16s", url, allowed,
                        method);
            reply_header(&r, "Allow", allowed);
            return send_reply(s, c, x, &r, true);
        }
        const char *length = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
        if (length && strtoull(length, NULL, 10) > s->options->max_body) {
            metrics_rejected(s->metrics, "body_too_large");
            char limit[64];
            snprintf(limit, sizeof limit, "%zu", s->options->max_body);
            return refuse(s, c, x, url, 413,
                          "the body is larger than the limit of %s bytes (--max-body-mb)", limit);
        }
        return MHD_YES;
    }
    if (*upload_size) { /* more of the body */
        size_t n = *upload_size;
        *upload_size = 0;
        if (x->too_large) return MHD_YES;
        if (x->length + n > s->options->max_body) { /* a chunked body has no length up front */
            x->too_large = true;
            free(x->body);
            x->body = NULL;
            return MHD_YES;
        }
        if (x->length + n + 1 > x->capacity) {
            size_t grown = x->capacity ? x->capacity : 4096;
            while (grown < x->length + n + 1) grown *= 2;
            char *body = realloc(x->body, grown);
            if (!body) return MHD_NO;
            x->body = body;
            x->capacity = grown;
        }
        memcpy(x->body + x->length, upload, n);
        x->length += n;
        x->body[x->length] = '\0';
        return MHD_YES;
    }
    if (x->too_large) {
        metrics_rejected(s->metrics, "body_too_large");
        char limit[64];
        snprintf(limit, sizeof limit, "%zu", s->options->max_body);
        return refuse(s, c, x, url, 413,
                      "the body is larger than the limit of %s bytes (--max-body-mb)", limit);
    }
    const union MHD_ConnectionInfo *info =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    request rq = {.method = method,
                  .path = url,
                  .body = x->body ? x->body : "",
                  .length = x->length,
                  .socket = info ? info->connect_fd : -1};
    reply r = {.status = 500};
    dispatch(s, &rq, x->route, &r);
    if (r.status == 499) { /* the client left while its work waited: nobody to answer */
        metrics_rejected(s->metrics, "disconnected");
        free(r.body.data);
        metrics_request(s->metrics, x->route, 499, clock_seconds() - x->start);
        return MHD_NO;
    }
    return send_reply(s, c, x, &r, false);
}

static void completed(void *context, struct MHD_Connection *c, void **state,
                      enum MHD_RequestTerminationCode why)
{
    (void)c;
    (void)why;
    server *s = context;
    exchange *x = *state;
    if (!x) return;
    if (x->counted) atomic_fetch_sub(&s->active, 1);
    free(x->body);
    free(x);
    *state = NULL;
}

/* ---- listening and stopping ---- */

/* A listening socket on host:port (port 0: any free one); the chosen port in *bound. */
static int listen_on(const char *host, int port, int *bound, char *shown, size_t shown_size)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *found = NULL;
    char service[16];
    snprintf(service, sizeof service, "%d", port);
    int rc = getaddrinfo(host, service, &hints, &found);
    if (rc) {
        fprintf(stderr, "embedrag serve: cannot resolve --host %s: %s\n", host, gai_strerror(rc));
        return -1;
    }
    int fd = -1, saved = 0;
    for (struct addrinfo *a = found; a && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) continue;
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, a->ai_addr, a->ai_addrlen) != 0 || listen(fd, 512) != 0) {
            saved = errno;
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(found);
    if (fd < 0) {
        fprintf(stderr, "embedrag serve: cannot listen on %s port %d: %s%s\n", host, port,
                strerror(saved),
                saved == EADDRINUSE ? " (another process has it: pick another --port)" : "");
        return -1;
    }
    struct sockaddr_storage address;
    socklen_t length = sizeof address;
    getsockname(fd, (struct sockaddr *)&address, &length);
    char name[INET6_ADDRSTRLEN] = "?";
    if (address.ss_family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&address;
        inet_ntop(AF_INET6, &a->sin6_addr, name, sizeof name);
        *bound = ntohs(a->sin6_port);
        snprintf(shown, shown_size, "[%s]:%d", name, *bound);
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&address;
        inet_ntop(AF_INET, &a->sin_addr, name, sizeof name);
        *bound = ntohs(a->sin_port);
        snprintf(shown, shown_size, "%s:%d", name, *bound);
    }
    return fd;
}

static void log_mhd(void *context, const char *format, va_list args)
{
    server *s = context;
    /* The handler answers MHD_NO for a client that left while its work waited (the work was
     * dropped, which /metrics counts); the library calls that an internal error. */
    if (s->options->quiet || !strncmp(format, "Application reported internal error", 35)) return;
    fputs("embedrag serve: ", stderr);
    vfprintf(stderr, format, args);
}

/* The backends as metric lines, written once: they do not change but for a failed flag,
 * which GET /info reports live. */
static char *backend_lines(server *s)
{
    out_buffer o = {0};
    for (int i = 0; i < s->info.backend_count; i++) {
        embedrag_backend_info b;
        if (embedrag_model_get_backend(s->model, i, &b) != 0) continue;
        out_text(&o, "embedrag_backend_info{name=");
        out_json_cstring(&o, b.name);
        out_text(&o, ",device=");
        out_json_cstring(&o, b.device);
        out_format(&o, ",kernels=\"%s\",precision=\"%s\"} 1\n", b.kernels ? b.kernels : "",
                   b.precision == EMBEDRAG_PRECISION_BF16   ? "bf16"
                   : b.precision == EMBEDRAG_PRECISION_FP16 ? "fp16"
                                                            : "fp32");
    }
    out_bytes(&o, "", 1);
    if (o.failed) {
        free(o.data);
        return NULL;
    }
    return o.data;
}

int server_run(embedrag_model *model, embedrag_store *store, const server_options *options)
{
    server s = {.model = model, .store = store, .options = options};
    if (embedrag_model_get_info(model, &s.info) != 0 || metrics_create(&s.metrics) != 0) {
        fprintf(stderr, "embedrag serve: out of memory\n");
        return 1;
    }
    pthread_mutex_init(&s.store_lock, NULL);
    s.backend_lines = backend_lines(&s);

    /* SIGTERM and SIGINT are taken by sigwait below: blocked here, before any thread starts,
     * so that every thread inherits the mask. A client that leaves mid-reply must not kill the
     * process with SIGPIPE. */
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);
    signal(SIGPIPE, SIG_IGN);

    int status = 1, port = 0;
    char shown[INET6_ADDRSTRLEN + 16];
    int fd = listen_on(options->host, options->port, &port, shown, sizeof shown);
    struct MHD_Daemon *daemon = NULL;
    if (fd >= 0)
        daemon = MHD_start_daemon(MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD |
                                      MHD_USE_POLL | MHD_USE_ITC | MHD_USE_ERROR_LOG,
                                  0, NULL, NULL, handle, &s, MHD_OPTION_EXTERNAL_LOGGER, log_mhd,
                                  &s, MHD_OPTION_LISTEN_SOCKET, fd, MHD_OPTION_CONNECTION_TIMEOUT,
                                  (unsigned)options->timeout_seconds, MHD_OPTION_CONNECTION_LIMIT,
                                  (unsigned)SERVER_MAX_CONNECTIONS, MHD_OPTION_NOTIFY_COMPLETED,
                                  completed, &s, MHD_OPTION_END);
    if (fd >= 0 && !daemon) {
        fprintf(stderr, "embedrag serve: the HTTP library could not start on %s\n", shown);
        close(fd);
    }
    if (daemon) {
        printf("listening on http://%s\n", shown);
        fflush(stdout);
        if (!options->quiet)
            fprintf(stderr, "embedrag serve: %s on %s%s%s; SIGTERM or Ctrl-C stops\n", s.info.name,
                    shown, store ? " with the store " : "", store ? options->store_path : "");
        int signal_number = 0;
        sigwait(&stop_signals, &signal_number);
        atomic_store(&s.stopping, true);
        if (!options->quiet)
            fprintf(stderr, "embedrag serve: stopping: finishing %d requests in flight\n",
                    atomic_load(&s.active));
        /* No new connections; open ones get 503 for new requests; the ones in flight finish. */
        MHD_socket listener = MHD_quiesce_daemon(daemon);
        double deadline = clock_seconds() + SHUTDOWN_GRACE_SECONDS;
        while (atomic_load(&s.active) > 0 && clock_seconds() < deadline) poll(NULL, 0, 10);
        MHD_stop_daemon(daemon);
        if (listener != MHD_INVALID_SOCKET) close(listener);
        status = 0;
    }
    free(s.backend_lines);
    metrics_destroy(s.metrics);
    pthread_mutex_destroy(&s.store_lock);
    return status;
}
