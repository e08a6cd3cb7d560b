/* `embedrag index`, `search` and `stats`: the document store from the command line. index walks
 * folders and JSONL files into a store; search asks it questions (dense, BM25 or hybrid); stats
 * describes it. The store is --store FILE, else $EMBEDRAG_STORE, else embedrag.db here. */
#include "cli.h"

#include "index/indexer.h"
#include "index/search.h"
#include "store/store.h"

#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CLI_DEFAULT_STORE "embedrag.db"

static const char *store_path(const char *option)
{
    if (option) return option;
    const char *env = getenv("EMBEDRAG_STORE");
    return env && *env ? env : CLI_DEFAULT_STORE;
}

enum {
    OPTION_STORE = 0x300,
    OPTION_PRUNE,
    OPTION_OVERLAP,
    OPTION_JSON,
    OPTION_MODE,
    OPTION_QUERIES,
    OPTION_QUIET,
    OPTION_PATH,
    OPTION_WHERE,
    OPTION_TIMINGS,
    OPTION_EXACT
};

/* The most --where conditions one search takes. */
#define CLI_MAX_WHERE 32

/* ---- index ---- */

static const char index_usage[] =
    "usage: embedrag index [options] PATH...\n"
    "\n"
    "Indexes folders (text and Markdown files, walked in name order; hidden entries skipped),\n"
    "text files and JSONL files of documents, one per line:\n"
    "  {\"id\": \"...\", \"text\": \"...\", \"title\": \"...\", \"metadata\": {...}, \"vector\": "
    "[...]}\n"
    "(title, metadata and vector optional; a vector is stored as the document's one chunk\n"
    "without model work, after its dimension is checked). Documents are cut into chunks that\n"
    "fit the model, embedded and stored; unchanged documents (same content) are skipped, so a\n"
    "second run does no model work. A bad document is named and skipped; the run goes on.\n"
    "\n"
    "options:\n" CLI_MODEL_OPTIONS_HELP
    "  --store FILE         the store (default: $EMBEDRAG_STORE or " CLI_DEFAULT_STORE ")\n"
    "  --prune              delete stored documents not seen in this run\n"
    "  --overlap N          tokens shared by consecutive chunks (default: the chunker's)\n"
    "  --json               print the summary as JSON\n"
    "  --quiet              no progress line\n"
    "  -h, --help           this help\n";

static void print_summary(const index_summary *s, const char *path, bool json)
{
    if (s->text_thread_failures)
        fprintf(stderr,
                "embedrag index: warning: %ld of the text index's updates beside the pipeline "
                "failed (first: %s); the update at the end took their work\n",
                s->text_thread_failures, s->text_thread_failure);
    if (json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "store", path);
        cJSON_AddNumberToObject(o, "files", (double)s->files);
        cJSON_AddNumberToObject(o, "documents", (double)s->documents);
        cJSON_AddNumberToObject(o, "indexed", (double)s->indexed);
        cJSON_AddNumberToObject(o, "unchanged", (double)s->unchanged);
        cJSON_AddNumberToObject(o, "skipped_files", (double)s->skipped_files);
        cJSON_AddNumberToObject(o, "failed", (double)s->failed);
        cJSON_AddNumberToObject(o, "deleted", (double)s->deleted);
        cJSON_AddNumberToObject(o, "chunks", (double)s->chunks);
        cJSON_AddNumberToObject(o, "tokens", (double)s->tokens);
        cJSON_AddNumberToObject(o, "vectors_given", (double)s->vectors_given);
        cJSON_AddNumberToObject(o, "seconds", s->seconds);
        cJSON_AddNumberToObject(o, "model_seconds", s->model_seconds);
        cJSON *stages = cJSON_AddObjectToObject(o, "stage_seconds");
        cJSON_AddNumberToObject(stages, "read", s->read_seconds);
        cJSON_AddNumberToObject(stages, "chunk", s->chunk_seconds);
        cJSON_AddNumberToObject(stages, "embed", s->embed_seconds);
        cJSON_AddNumberToObject(stages, "store", s->store_seconds);
        cJSON_AddNumberToObject(stages, "store_cpu", s->store_cpu_seconds);
        cJSON_AddNumberToObject(stages, "wait", s->wait_seconds);
        cJSON_AddNumberToObject(stages, "text_index", s->text_seconds);
        cJSON_AddNumberToObject(stages, "text_thread", s->text_thread_seconds);
        cJSON_AddNumberToObject(stages, "text_thread_cpu", s->text_thread_cpu_seconds);
        cJSON_AddNumberToObject(stages, "prune", s->prune_seconds);
        cJSON_AddNumberToObject(stages, "search_copy", s->copy_seconds);
        cJSON_AddNumberToObject(o, "text_thread_failures", (double)s->text_thread_failures);
        cJSON_AddNumberToObject(o, "tokens_per_second",
                                s->seconds > 0 ? (double)s->tokens / s->seconds : 0.0);
        if (s->first_failure[0])
            cJSON_AddStringToObject(o, "first_failure", s->first_failure);
        else
            cJSON_AddNullToObject(o, "first_failure");
        char *text = cJSON_Print(o);
        puts(text ? text : "{}");
        cJSON_free(text);
        cJSON_Delete(o);
        return;
    }
    printf("%s: %ld documents from %ld files: %ld indexed (%ld chunks, %ld tokens), %ld unchanged, "
           "%ld failed, %ld deleted, %ld other files skipped; %.1f s (%.0f tokens/s)\n",
           path, s->documents, s->files, s->indexed, s->chunks, s->tokens, s->unchanged, s->failed,
           s->deleted, s->skipped_files, s->seconds,
           s->seconds > 0 ? (double)s->tokens / s->seconds : 0.0);
    if (s->first_failure[0])
        fprintf(stderr, "embedrag index: first failure: %s\n", s->first_failure);
}

int cli_index(int argc, char **argv)
{
    static const struct option options[] = {CLI_MODEL_OPTIONS,
                                            {"store", required_argument, NULL, OPTION_STORE},
                                            {"prune", no_argument, NULL, OPTION_PRUNE},
                                            {"overlap", required_argument, NULL, OPTION_OVERLAP},
                                            {"json", no_argument, NULL, OPTION_JSON},
                                            {"quiet", no_argument, NULL, OPTION_QUIET},
                                            {"help", no_argument, NULL, 'h'},
                                            {NULL, 0, NULL, 0}};
    cli_model_options model_options = cli_model_defaults();
    const char *store_option = NULL;
    index_options io = {.overlap_tokens = -1};
    bool json = false, quiet = false;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", options, NULL)) != -1) {
        int shared = cli_model_option(c, optarg, &model_options);
        if (shared < 0) return 2;
        if (shared) continue;
        switch (c) {
        case OPTION_STORE:
            store_option = optarg;
            break;
        case OPTION_PRUNE:
            io.prune = true;
            break;
        case OPTION_OVERLAP:
            if (cli_parse_int("--overlap", optarg, 0, &io.overlap_tokens)) return 2;
            break;
        case OPTION_JSON:
            json = true;
            break;
        case OPTION_QUIET:
            quiet = true;
            break;
        case 'h':
            fputs(index_usage, stdout);
            return 0;
        default:
            fputs(index_usage, stderr);
            return 2;
        }
    }
    if (optind >= argc) {
        fputs("embedrag index: give at least one folder or file to index\n", stderr);
        fputs(index_usage, stderr);
        return 2;
    }
    io.store_path = store_path(store_option);
    io.progress = !quiet && !json && isatty(STDERR_FILENO);
    embedrag_model *model = cli_open_model(&model_options);
    if (!model) return 1;
    index_summary summary;
    int rc = index_paths(model, (const char *const *)argv + optind, (size_t)(argc - optind), &io,
                         &summary);
    embedrag_model_close(model);
    if (rc) {
        fprintf(stderr, "embedrag index: %s\n", embedrag_last_error());
        if (summary.indexed)
            fprintf(stderr, "embedrag index: the %ld documents indexed before are kept\n",
                    summary.indexed);
        return 1;
    }
    print_summary(&summary, io.store_path, json);
    return summary.failed ? 1 : 0;
}

int cli_store_model(const char *command, const store *s, cli_model_options *options)
{
    if (options->dir) return 0;
    /* Its directory may have moved since the store was made. */
    const char *dir = store_get_model(s)->directory;
    struct stat st;
    if (dir && *dir && stat(dir, &st) == 0) {
        options->dir = dir;
    } else if (!getenv("EMBEDRAG_MODEL")) {
        fprintf(stderr,
                "embedrag %s: the store's model (%s) was at %s, which is gone; give --model "
                "DIR\n",
                command, store_get_model(s)->name, dir && *dir ? dir : "(not recorded)");
        return 1;
    }
    return 0;
}

/* ---- search ---- */

static const char search_usage[] =
    "usage: embedrag search [options] \"question\"\n"
    "       embedrag search [options] --queries FILE\n"
    "\n"
    "Prints the chunks that answer best, with their score, source and byte offsets. The\n"
    "model's query prompt is applied. The model is the store's (recorded when it was indexed)\n"
    "unless --model is given.\n"
    "\n"
    "options:\n" CLI_MODEL_OPTIONS_HELP
    "  --store FILE         the store (default: $EMBEDRAG_STORE or " CLI_DEFAULT_STORE ")\n"
    "  -k N                 results per query (default 5)\n"
    "  --mode M             dense (default: cosine over every vector, exact), bm25 (SQLite\n"
    "                       FTS5), or hybrid (both, fused by reciprocal rank)\n"
    "  --queries FILE       one query per line (- for stdin)\n"
    "  --path GLOB          only documents whose source matches GLOB (* ? [...]; '*' also\n"
    "                       matches '/'; sources are absolute paths, or FILE.jsonl:LINE)\n"
    "  --where KEY=VALUE    only documents whose metadata field KEY equals VALUE (a string's\n"
    "                       text, or a number's or boolean's JSON text); repeat to AND them\n"
    "  --exact              dense: scan every vector (by default a store of 50,000 vectors or\n"
    "                       more is searched through 1-bit codes, recall@10 >= 0.99, exact\n"
    "                       scores)\n"
    "  --timings            print each query's time (embedding, search, fetching texts) to\n"
    "                       stderr, and percentiles after the last\n"
    "  --json               one JSON object per query: {\"query\", \"results\": [{\"rank\",\n"
    "                       \"score\", \"document\", \"source\", \"chunk\", \"start\", \"end\",\n"
    "                       \"text\"}]}\n"
    "  -h, --help           this help\n";

static int print_results(store *s, const char *query, const search_hit *hits, int found, bool json)
{
    cJSON *o = json ? cJSON_CreateObject() : NULL;
    cJSON *results = NULL;
    if (o) {
        cJSON_AddStringToObject(o, "query", query);
        results = cJSON_AddArrayToObject(o, "results");
    } else {
        printf("query: %s\n", query);
    }
    for (int i = 0; i < found; i++) {
        store_chunk_info info;
        if (store_get_chunk(s, hits[i].chunk_id, &info) != 0) {
            fprintf(stderr, "embedrag search: %s\n", embedrag_last_error());
            cJSON_Delete(o);
            return 1;
        }
        if (o) {
            cJSON *r = cJSON_CreateObject();
            cJSON_AddNumberToObject(r, "rank", i + 1);
            cJSON_AddNumberToObject(r, "score", hits[i].score);
            cJSON_AddStringToObject(r, "document", info.document_key);
            cJSON_AddStringToObject(r, "source", info.source ? info.source : "");
            cJSON_AddNumberToObject(r, "chunk", info.ordinal);
            cJSON_AddNumberToObject(r, "start", (double)info.start);
            cJSON_AddNumberToObject(r, "end", (double)info.end);
            cJSON_AddStringToObject(r, "text", info.text ? info.text : "");
            if (info.metadata) {
                cJSON *m = cJSON_Parse(info.metadata);
                if (m) cJSON_AddItemToObject(r, "metadata", m);
            }
            cJSON_AddItemToArray(results, r);
        } else {
            printf("%2d. %.4f  %s  [chunk %d, bytes %lld-%lld]\n    ", i + 1, hits[i].score,
                   info.source ? info.source : info.document_key, info.ordinal,
                   (long long)info.start, (long long)info.end);
            /* The passage on one line, cut at 300 bytes on a character boundary. */
            const char *t = info.text ? info.text : "";
            size_t n = strlen(t), shown = n < 300 ? n : 300;
            while (shown < n && ((unsigned char)t[shown] & 0xc0) == 0x80) shown--;
            for (size_t j = 0; j < shown; j++) putchar(t[j] == '\n' || t[j] == '\r' ? ' ' : t[j]);
            printf("%s\n", shown < n ? " ..." : "");
        }
    }
    if (o) {
        char *text = cJSON_PrintUnformatted(o);
        puts(text ? text : "{}");
        cJSON_free(text);
        cJSON_Delete(o);
    }
    return 0;
}

static int search_run(int argc, char **argv, cli_model_options *model_options,
                      const char *store_option, const char *queries, search_mode mode, int k,
                      bool json, const store_filter *filter, bool timings, bool exact);

int cli_search(int argc, char **argv)
{
    static const struct option options[] = {CLI_MODEL_OPTIONS,
                                            {"store", required_argument, NULL, OPTION_STORE},
                                            {"mode", required_argument, NULL, OPTION_MODE},
                                            {"queries", required_argument, NULL, OPTION_QUERIES},
                                            {"json", no_argument, NULL, OPTION_JSON},
                                            {"path", required_argument, NULL, OPTION_PATH},
                                            {"where", required_argument, NULL, OPTION_WHERE},
                                            {"timings", no_argument, NULL, OPTION_TIMINGS},
                                            {"exact", no_argument, NULL, OPTION_EXACT},
                                            {"help", no_argument, NULL, 'h'},
                                            {NULL, 0, NULL, 0}};
    cli_model_options model_options = cli_model_defaults();
    const char *store_option = NULL, *queries = NULL;
    const char *where_keys[CLI_MAX_WHERE], *where_values[CLI_MAX_WHERE];
    char *where_copies[CLI_MAX_WHERE];
    store_filter filter = {.keys = where_keys, .values = where_values};
    bool timings = false, exact = false;
    search_mode mode = SEARCH_DENSE;
    int k = 5, c;
    bool json = false;
    optind = 1;
    while ((c = getopt_long(argc, argv, "hk:", options, NULL)) != -1) {
        int shared = cli_model_option(c, optarg, &model_options);
        if (shared < 0) return 2;
        if (shared) continue;
        switch (c) {
        case OPTION_STORE:
            store_option = optarg;
            break;
        case 'k':
            if (cli_parse_int("-k", optarg, 1, &k)) return 2;
            break;
        case OPTION_MODE:
            if (!strcmp(optarg, "dense"))
                mode = SEARCH_DENSE;
            else if (!strcmp(optarg, "bm25"))
                mode = SEARCH_BM25;
            else if (!strcmp(optarg, "hybrid"))
                mode = SEARCH_HYBRID;
            else {
                fprintf(stderr, "embedrag search: --mode takes dense, bm25 or hybrid (got '%s')\n",
                        optarg);
                return 2;
            }
            break;
        case OPTION_QUERIES:
            queries = optarg;
            break;
        case OPTION_JSON:
            json = true;
            break;
        case OPTION_PATH:
            filter.source_glob = optarg;
            break;
        case OPTION_WHERE: {
            const char *equals = strchr(optarg, '=');
            if (!equals || equals == optarg || filter.count == CLI_MAX_WHERE) {
                fprintf(stderr,
                        "embedrag search: --where takes KEY=VALUE (at most %d of them; got "
                        "'%s')\n",
                        CLI_MAX_WHERE, optarg);
                for (int i = 0; i < filter.count; i++) free(where_copies[i]);
                return 2;
            }
            where_copies[filter.count] = strndup(optarg, (size_t)(equals - optarg));
            where_keys[filter.count] = where_copies[filter.count];
            where_values[filter.count] = equals + 1;
            filter.count++;
            break;
        }
        case OPTION_TIMINGS:
            timings = true;
            break;
        case OPTION_EXACT:
            exact = true;
            break;
        case 'h':
            fputs(search_usage, stdout);
            return 0;
        default:
            fputs(search_usage, stderr);
            return 2;
        }
    }
    int status = search_run(argc, argv, &model_options, store_option, queries, mode, k, json,
                            &filter, timings, exact);
    for (int i = 0; i < filter.count; i++) free(where_copies[i]);
    return status;
}

/* The search itself, once the options are parsed. */
static int search_run(int argc, char **argv, cli_model_options *model_options,
                      const char *store_option, const char *queries, search_mode mode, int k,
                      bool json, const store_filter *filter, bool timings, bool exact)
{
    if (!queries && optind >= argc) {
        fputs("embedrag search: give a question, or --queries FILE\n", stderr);
        return 2;
    }
    const char *path = store_path(store_option);
    store *s = NULL;
    if (store_open(path, NULL, true, &s) != 0) {
        fprintf(stderr, "embedrag search: %s\n", embedrag_last_error());
        return 1;
    }
    if (cli_store_model("search", s, model_options)) {
        store_close(s);
        return 1;
    }
    int status = 1;
    embedrag_model *model = cli_open_model(model_options);
    searcher *sr = NULL;
    search_hit *hits = malloc((size_t)k * sizeof *hits);
    if (!model || !hits) goto done;
    if (searcher_open(s, model, model_options->threads, &sr) != 0) {
        fprintf(stderr, "embedrag search: %s\n", embedrag_last_error());
        goto done;
    }
    searcher_set_exact(sr, exact);
    FILE *in = NULL;
    if (queries) {
        in = strcmp(queries, "-") ? fopen(queries, "rb") : stdin;
        if (!in) {
            perror(queries);
            goto done;
        }
    }
    char *line = NULL;
    size_t capacity = 0;
    double *times = NULL;
    long timed = 0, timed_capacity = 0;
    status = 0;
    for (int q = optind; !status; q++) {
        const char *query;
        if (in) {
            if (cli_read_line(in, &line, &capacity) < 0) break;
            query = line;
        } else {
            if (q >= argc) break;
            query = argv[q];
        }
        int found = 0;
        double t0 = cli_seconds();
        if (searcher_search(sr, query, mode, k, filter, hits, &found) != 0) {
            fprintf(stderr, "embedrag search: %s\n", embedrag_last_error());
            status = 1;
            break;
        }
        double t1 = cli_seconds();
        status = print_results(s, query, hits, found, json);
        if (timings) {
            double t2 = cli_seconds();
            fprintf(stderr, "query %ld: %.3f ms (search %.3f, texts and output %.3f)\n", timed + 1,
                    (t2 - t0) * 1e3, (t1 - t0) * 1e3, (t2 - t1) * 1e3);
            if (timed == timed_capacity) {
                timed_capacity = timed_capacity ? 2 * timed_capacity : 256;
                double *more = realloc(times, (size_t)timed_capacity * sizeof *more);
                if (!more) {
                    fputs("embedrag search: out of memory\n", stderr);
                    status = 1;
                    break;
                }
                times = more;
            }
            times[timed++] = (t2 - t0) * 1e3;
        }
    }
    if (timed > 0) {
        /* The first query pays for warming caches; the percentiles are of the others. */
        int n = timed > 1 ? (int)timed - 1 : 1;
        double *v = timed > 1 ? times + 1 : times;
        double p50 = cli_percentile(v, n, 0.50), p90 = cli_percentile(v, n, 0.90),
               p99 = cli_percentile(v, n, 0.99);
        fprintf(stderr,
                "%ld queries over %zu vectors (%s): p50 %.3f ms, p90 %.3f ms, p99 %.3f ms (the "
                "first left out)\n",
                timed, searcher_vectors(sr), searcher_quantized(sr) ? "quantized" : "exact", p50,
                p90, p99);
    }
    free(times);
    free(line);
    if (in && in != stdin) fclose(in);
done:
    searcher_close(sr);
    free(hits);
    embedrag_model_close(model);
    store_close(s);
    return status;
}

/* ---- stats ---- */

static const char stats_usage[] =
    "usage: embedrag stats [--store FILE] [--json]\n"
    "\n"
    "Prints the store's documents, chunks, tokens, model, size on disk (the store, and its text\n"
    "index for BM25 in FILE-text), and whether the search copy of its vectors (FILE-vectors,\n"
    "read by search) is current.\n";

int cli_stats(int argc, char **argv)
{
    static const struct option options[] = {{"store", required_argument, NULL, OPTION_STORE},
                                            {"json", no_argument, NULL, OPTION_JSON},
                                            {"help", no_argument, NULL, 'h'},
                                            {NULL, 0, NULL, 0}};
    const char *store_option = NULL;
    bool json = false;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", options, NULL)) != -1) {
        switch (c) {
        case OPTION_STORE:
            store_option = optarg;
            break;
        case OPTION_JSON:
            json = true;
            break;
        case 'h':
            fputs(stats_usage, stdout);
            return 0;
        default:
            fputs(stats_usage, stderr);
            return 2;
        }
    }
    const char *path = store_path(store_option);
    store *s = NULL;
    store_stats st;
    if (store_open(path, NULL, true, &s) != 0 || store_get_stats(s, &st) != 0) {
        fprintf(stderr, "embedrag stats: %s\n", embedrag_last_error());
        store_close(s);
        return 1;
    }
    const store_model *m = store_get_model(s);
    if (json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "store", path);
        cJSON_AddNumberToObject(o, "documents", (double)st.documents);
        cJSON_AddNumberToObject(o, "chunks", (double)st.chunks);
        cJSON_AddNumberToObject(o, "vectors", (double)st.chunks);
        cJSON_AddNumberToObject(o, "tokens", (double)st.tokens);
        cJSON_AddNumberToObject(o, "bytes_on_disk", (double)st.file_bytes);
        cJSON_AddNumberToObject(o, "text_index_bytes", (double)st.text_index_bytes);
        cJSON_AddNumberToObject(o, "text_index_files", store_text_shards(s));
        cJSON *mo = cJSON_AddObjectToObject(o, "model");
        cJSON_AddStringToObject(mo, "name", m->name);
        cJSON_AddNumberToObject(mo, "dimension", m->dimension);
        cJSON_AddStringToObject(mo, "pooling", m->pooling);
        cJSON_AddStringToObject(mo, "prompt", m->prompt);
        cJSON_AddStringToObject(mo, "precision", m->precision);
        cJSON_AddStringToObject(mo, "weights_hash", m->weights_hash);
        cJSON_AddStringToObject(mo, "directory", m->directory);
        cJSON_AddNumberToObject(o, "search_copy_bytes", (double)st.search_copy_bytes);
        cJSON_AddBoolToObject(o, "search_copies_current", st.search_copy_current);
        char *text = cJSON_Print(o);
        puts(text ? text : "{}");
        cJSON_free(text);
        cJSON_Delete(o);
    } else {
        char files[32] = "";
        if (store_text_shards(s) > 1)
            snprintf(files, sizeof files, " in %d files", store_text_shards(s));
        printf("%s: %lld documents, %lld chunks (%lld tokens), %.1f MB on disk (and %.1f MB of "
               "text index%s)\n",
               path, (long long)st.documents, (long long)st.chunks, (long long)st.tokens,
               (double)st.file_bytes / 1e6, (double)st.text_index_bytes / 1e6, files);
        printf("model: %s (%d dimensions, %s pooling, %s), from %s\n", m->name, m->dimension,
               m->pooling, m->precision, m->directory);
        printf("search copy: %s (%.1f MB)\n",
               st.search_copy_current ? "current"
               : st.search_copy_bytes ? "stale (the next search rebuilds it)"
                                      : "none (the next search builds it)",
               (double)st.search_copy_bytes / 1e6);
    }
    store_close(s);
    return 0;
}
