/* `embedrag serve`: parses the options, opens the model and the store, and hands them to the
 * HTTP server (server/), which runs until SIGTERM or Ctrl-C. */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef EMBEDRAG_HAVE_SERVER
#include "server.h"
#include "store/store.h"

#include <unistd.h>

/* A store's own model serves it unless --model says otherwise, as for `search` (a copy of its
 * directory in *dir, since the store is closed before the model opens). Returns 1 after an
 * error. */
static int model_of_store(const char *path, cli_model_options *options, char **dir)
{
    *dir = NULL;
    if (options->dir || access(path, F_OK) != 0) return 0;
    store *s = NULL;
    if (store_open(path, NULL, true, &s) != 0) return 0; /* embedrag_store_open will say why */
    int status = cli_store_model("serve", s, options);
    if (!status && options->dir) {
        *dir = strdup(options->dir);
        options->dir = *dir;
    }
    store_close(s);
    return status;
}

static const char usage[] =
    "usage: embedrag serve [options]\n"
    "\n"
    "Serves embeddings over HTTP, for many clients at once: OpenAI's POST /v1/embeddings,\n"
    "text-embeddings-inference's POST /embed, /tokenize, /info and /health; with --store, also\n"
    "POST /search, POST /documents, GET and DELETE /documents/ID and a search page at /;\n"
    "GET /metrics for Prometheus and GET /openapi.json. Prints \"listening on http://HOST:PORT\"\n"
    "when ready; SIGTERM or Ctrl-C finishes the requests in flight and exits.\n"
    "\n"
    "options:\n" CLI_MODEL_OPTIONS_HELP
    "  --store FILE         a store to search and add documents to (created if absent); its\n"
    "                       model serves unless --model is given\n"
    "  --host ADDRESS       address to listen on (default 127.0.0.1: this machine only; 0.0.0.0\n"
    "                       or :: for every interface)\n"
    "  --port N             port (default 8080; 0 picks a free one)\n"
    "  --api-key KEY        require \"Authorization: Bearer KEY\" on every route but /health;\n"
    "                       $EMBEDRAG_API_KEY does the same and keeps the key out of ps\n"
    "  --read-only          refuse the routes that change the store\n"
    "  --max-body-mb N      largest request body in MiB (default 16); larger gets 413\n"
    "  --max-queue N        texts admitted at once (default 4096); past it 429 with\n"
    "                       Retry-After; a single larger request still runs when alone\n"
    "  --timeout S          close connections silent for S seconds (default 30)\n"
    "  --cors ORIGIN        send Access-Control-Allow-Origin: ORIGIN (default: no CORS)\n"
    "  --quiet              no messages on stderr but errors\n"
    "  -h, --help           this help\n";

enum {
    OPTION_STORE = 0x400,
    OPTION_HOST,
    OPTION_PORT,
    OPTION_API_KEY,
    OPTION_READ_ONLY,
    OPTION_MAX_BODY,
    OPTION_MAX_QUEUE,
    OPTION_TIMEOUT,
    OPTION_CORS,
    OPTION_QUIET,
};

int cli_serve(int argc, char **argv)
{
    static const struct option options[] = {
        CLI_MODEL_OPTIONS,
        {"store", required_argument, NULL, OPTION_STORE},
        {"host", required_argument, NULL, OPTION_HOST},
        {"port", required_argument, NULL, OPTION_PORT},
        {"api-key", required_argument, NULL, OPTION_API_KEY},
        {"read-only", no_argument, NULL, OPTION_READ_ONLY},
        {"max-body-mb", required_argument, NULL, OPTION_MAX_BODY},
        {"max-queue", required_argument, NULL, OPTION_MAX_QUEUE},
        {"timeout", required_argument, NULL, OPTION_TIMEOUT},
        {"cors", required_argument, NULL, OPTION_CORS},
        {"quiet", no_argument, NULL, OPTION_QUIET},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    cli_model_options model_options = cli_model_defaults();
    server_options o = {.host = "127.0.0.1",
                        .port = SERVER_DEFAULT_PORT,
                        .max_body = (size_t)SERVER_DEFAULT_MAX_BODY_MB << 20,
                        .max_queue = SERVER_DEFAULT_MAX_QUEUE,
                        .timeout_seconds = SERVER_DEFAULT_TIMEOUT};
    const char *key = getenv("EMBEDRAG_API_KEY");
    if (key && *key) o.api_key = key;
    int value, code;
    optind = 1;
    while ((code = getopt_long(argc, argv, "h", options, NULL)) != -1) {
        int handled = cli_model_option(code, optarg, &model_options);
        if (handled < 0) return 2;
        if (handled) continue;
        switch (code) {
        case OPTION_STORE:
            o.store_path = optarg;
            break;
        case OPTION_HOST:
            o.host = optarg;
            break;
        case OPTION_PORT:
            if (cli_parse_int("--port", optarg, 0, &value) || value > 65535) {
                if (value > 65535) fprintf(stderr, "embedrag serve: --port is at most 65535\n");
                return 2;
            }
            o.port = value;
            break;
        case OPTION_API_KEY:
            if (!*optarg) {
                fprintf(stderr, "embedrag serve: --api-key is empty\n");
                return 2;
            }
            o.api_key = optarg;
            break;
        case OPTION_READ_ONLY:
            o.read_only = true;
            break;
        case OPTION_MAX_BODY:
            if (cli_parse_int("--max-body-mb", optarg, 1, &value)) return 2;
            o.max_body = (size_t)value << 20;
            break;
        case OPTION_MAX_QUEUE:
            if (cli_parse_int("--max-queue", optarg, 1, &value)) return 2;
            o.max_queue = value;
            break;
        case OPTION_TIMEOUT:
            if (cli_parse_int("--timeout", optarg, 1, &value)) return 2;
            o.timeout_seconds = value;
            break;
        case OPTION_CORS:
            o.cors_origin = optarg;
            break;
        case OPTION_QUIET:
            o.quiet = true;
            break;
        case 'h':
            fputs(usage, stdout);
            return 0;
        default:
            fputs(usage, stderr);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "embedrag serve: unexpected argument '%s' (see --help)\n", argv[optind]);
        return 2;
    }
    char *store_model_dir = NULL;
    if (o.store_path && model_of_store(o.store_path, &model_options, &store_model_dir)) return 1;
    embedrag_model *model = cli_open_model(&model_options);
    free(store_model_dir); /* the model keeps its own copy of the path */
    if (!model) return 1;
    embedrag_store *opened = NULL;
    if (o.store_path) {
        embedrag_store_params sp = embedrag_store_default_params();
        sp.read_only = o.read_only;
        if (embedrag_store_open(o.store_path, model, &sp, &opened) != 0) {
            fprintf(stderr, "embedrag serve: %s\n", embedrag_last_error());
            embedrag_model_close(model);
            return 1;
        }
    }
    int status = server_run(model, opened, &o);
    embedrag_store_close(opened);
    embedrag_model_close(model);
    return status;
}

#else

int cli_serve(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    fprintf(stderr, "embedrag serve: this build has no HTTP server: install libmicrohttpd "
                    "(Debian: apt install libmicrohttpd-dev) and build again\n");
    return 1;
}

#endif
