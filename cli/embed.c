/* `embedrag embed`: one text per input line, one vector per output line (JSON array, TSV, or
 * raw little-endian float32). Texts are embedded in chunks so memory stays flat however long the
 * input is. A bad line (invalid UTF-8, too long without truncation) either stops the run after
 * every earlier line's vector is written and flushed, with its line number and a non-zero exit,
 * or, with --on-error skip, gets a placeholder row so output lines stay aligned with input
 * lines, and is counted. */
#include "cli.h"

#include "engine/engine.h"

#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Lines embedded per call: enough for full token-budget batches, small enough that a chunk's
 * texts and vectors stay a few megabytes. With a GPU, four of the library's windows a call, so
 * that it tokenizes the next window while the GPU runs one (about 30 MB of texts and vectors). */
#define EMBED_CHUNK_LINES 1024
#define EMBED_CHUNK_LINES_GPU (4 * ENGINE_WINDOW_TEXTS)

static const char embed_usage[] =
    "usage: embedrag embed [options] [< texts.txt]\n"
    "\n"
    "Embeds one text per line and prints one vector per line, in input order.\n"
    "\n"
    "options:\n" CLI_MODEL_OPTIONS_HELP
    "  --input FILE         read texts from FILE instead of stdin\n"
    "  --output FILE        write vectors to FILE instead of stdout\n"
    "  --format FMT         json (default: one JSON array per line), tsv, or f32 (raw\n"
    "                       little-endian float32, dimension floats per text)\n"
    "  --prompt NAME        use the model's prompt NAME (e.g. query, passage)\n"
    "  --prompt-text TEXT   prepend TEXT to every line (overrides --prompt)\n"
    "  --no-normalize       do not L2-normalize the vectors\n"
    "  --dimensions N       keep the first N components (Matryoshka), then normalize\n"
    "  --no-truncate        fail on texts longer than the model's limit instead of cutting\n"
    "  --on-error MODE      stop (default): a bad line (invalid UTF-8, too long) ends the run\n"
    "                       after the vectors of the lines before it; skip: write `null` (json),\n"
    "                       an empty line (tsv) or NaNs (f32) in its place, go on, and count\n"
    "                       the skipped lines on stderr\n"
    "  --batch-tokens N     most tokens per forward pass (default 2048)\n"
    "  --quiet              no progress on stderr\n"
    "  -h, --help           this help\n";

enum { FORMAT_JSON, FORMAT_TSV, FORMAT_F32 };

/* Writes n rows; a row whose status is non-zero (a skipped line) is written as `null` (json), an
 * empty line (tsv) or the NaNs the library filled it with (f32), so that output line i is always
 * input line i. */
static int write_vectors(FILE *out, int format, const float *v, const int *statuses, size_t n,
                         int dim)
{
    if (format == FORMAT_F32)
        return fwrite(v, sizeof(float), n * (size_t)dim, out) == n * (size_t)dim ? 0 : -1;
    for (size_t i = 0; i < n; i++) {
        const float *row = v + i * (size_t)dim;
        if (statuses[i]) {
            fputs(format == FORMAT_JSON ? "null\n" : "\n", out);
            continue;
        }
        if (format == FORMAT_JSON) fputc('[', out);
        for (int j = 0; j < dim; j++) {
            /* %.9g round-trips every float32 exactly. */
            fprintf(out, format == FORMAT_JSON ? (j ? ",%.9g" : "%.9g") : (j ? "\t%.9g" : "%.9g"),
                    (double)row[j]);
        }
        if (format == FORMAT_JSON) fputc(']', out);
        fputc('\n', out);
    }
    return ferror(out) ? -1 : 0;
}

/* The reason a line was not embedded, for people: "invalid UTF-8 at byte offset 4". The
 * library's message names the text's index within the chunk ("text 3: invalid UTF-8 ...",
 * "text 3 has 600 tokens ..."); the line number replaces it. */
static void report_line(size_t line, long index, const char *message)
{
    char prefix[32];
    size_t prefix_len = (size_t)snprintf(prefix, sizeof prefix, "text %ld", index);
    const char *rest = strncmp(message, prefix, prefix_len) == 0 ? message + prefix_len : NULL;
    if (rest && strncmp(rest, ": ", 2) == 0)
        fprintf(stderr, "embedrag embed: line %zu: %s\n", line, rest + 2);
    else if (rest)
        fprintf(stderr, "embedrag embed: line %zu: text%s\n", line, rest);
    else
        fprintf(stderr, "embedrag embed: line %zu: %s\n", line, message);
}

/* Lines skipped with --on-error skip, by reason. */
typedef struct skip_counts {
    size_t invalid_utf8, too_long, first_line;
} skip_counts;

int cli_embed(int argc, char **argv)
{
    enum {
        OPTION_INPUT = 0x200,
        OPTION_OUTPUT,
        OPTION_FORMAT,
        OPTION_PROMPT,
        OPTION_PROMPT_TEXT,
        OPTION_NO_NORMALIZE,
        OPTION_DIMENSIONS,
        OPTION_NO_TRUNCATE,
        OPTION_ON_ERROR,
        OPTION_BATCH_TOKENS,
        OPTION_QUIET,
    };
    static const struct option options[] = {
        CLI_MODEL_OPTIONS,
        {"input", required_argument, NULL, OPTION_INPUT},
        {"output", required_argument, NULL, OPTION_OUTPUT},
        {"format", required_argument, NULL, OPTION_FORMAT},
        {"prompt", required_argument, NULL, OPTION_PROMPT},
        {"prompt-text", required_argument, NULL, OPTION_PROMPT_TEXT},
        {"no-normalize", no_argument, NULL, OPTION_NO_NORMALIZE},
        {"dimensions", required_argument, NULL, OPTION_DIMENSIONS},
        {"no-truncate", no_argument, NULL, OPTION_NO_TRUNCATE},
        {"on-error", required_argument, NULL, OPTION_ON_ERROR},
        {"batch-tokens", required_argument, NULL, OPTION_BATCH_TOKENS},
        {"quiet", no_argument, NULL, OPTION_QUIET},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    cli_model_options model_options = cli_model_defaults();
    const char *input_path = NULL, *output_path = NULL;
    int format = FORMAT_JSON, quiet = 0, skip_bad = 0;
    embedrag_embed_params params = embedrag_embed_default_params();
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", options, NULL)) != -1) {
        int shared = cli_model_option(c, optarg, &model_options);
        if (shared < 0) return 2;
        if (shared) continue;
        switch (c) {
        case OPTION_INPUT:
            input_path = optarg;
            break;
        case OPTION_OUTPUT:
            output_path = optarg;
            break;
        case OPTION_FORMAT:
            if (!strcmp(optarg, "json"))
                format = FORMAT_JSON;
            else if (!strcmp(optarg, "tsv"))
                format = FORMAT_TSV;
            else if (!strcmp(optarg, "f32"))
                format = FORMAT_F32;
            else {
                fprintf(stderr, "embedrag embed: --format takes json, tsv or f32 (got '%s')\n",
                        optarg);
                return 2;
            }
            break;
        case OPTION_PROMPT:
            params.prompt_name = optarg;
            break;
        case OPTION_PROMPT_TEXT:
            params.prompt = optarg;
            break;
        case OPTION_NO_NORMALIZE:
            params.normalize = false;
            break;
        case OPTION_DIMENSIONS:
            if (cli_parse_int("--dimensions", optarg, 1, &params.dimensions)) return 2;
            break;
        case OPTION_NO_TRUNCATE:
            params.truncate = false;
            break;
        case OPTION_ON_ERROR:
            if (!strcmp(optarg, "stop") || !strcmp(optarg, "skip")) {
                skip_bad = !strcmp(optarg, "skip");
            } else {
                fprintf(stderr, "embedrag embed: --on-error takes stop or skip (got '%s')\n",
                        optarg);
                return 2;
            }
            break;
        case OPTION_BATCH_TOKENS:
            if (cli_parse_int("--batch-tokens", optarg, 1, &params.batch_tokens)) return 2;
            break;
        case OPTION_QUIET:
            quiet = 1;
            break;
        case 'h':
            fputs(embed_usage, stdout);
            return 0;
        default:
            fputs(embed_usage, stderr);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr,
                "embedrag embed: unexpected argument '%s' (texts come from stdin or --input)\n",
                argv[optind]);
        return 2;
    }
    params.device = model_options.device;
    FILE *in = stdin, *out = stdout;
    if (input_path && !(in = fopen(input_path, "rb"))) {
        perror(input_path);
        return 1;
    }
    embedrag_model *model = cli_open_model(&model_options);
    int status = 1;
    char **texts = NULL;
    size_t *lengths = NULL, *capacities = NULL;
    float *vectors = NULL;
    int *statuses = NULL;
    skip_counts skipped = {0};
    if (!model) goto close_input;
    int dim = embedrag_embed_dimension(model, &params);
    if (dim < 0) {
        fprintf(stderr, "embedrag embed: %s\n", embedrag_last_error());
        goto close_model;
    }
    if (output_path && !(out = fopen(output_path, "wb"))) {
        perror(output_path);
        goto close_model;
    }
    size_t chunk = EMBED_CHUNK_LINES;
    embedrag_model_info info;
    embedrag_model_get_info(model, &info);
    for (int i = 1; i < info.backend_count && model_options.device != EMBEDRAG_DEVICE_CPU; i++) {
        embedrag_backend_info b;
        if (embedrag_model_get_backend(model, i, &b) == 0 && !b.failure)
            chunk = EMBED_CHUNK_LINES_GPU;
    }
    texts = calloc(chunk, sizeof *texts);
    lengths = calloc(chunk, sizeof *lengths);
    capacities = calloc(chunk, sizeof *capacities);
    vectors = malloc(chunk * (size_t)dim * sizeof *vectors);
    statuses = calloc(chunk, sizeof *statuses);
    if (!texts || !lengths || !capacities || !vectors || !statuses) {
        fprintf(stderr, "embedrag embed: out of memory\n");
        goto free_buffers;
    }
    /* Each chunk is embedded with per-line statuses, so a bad line never costs the good ones. */
    params.statuses = statuses;
    int progress = !quiet && isatty(STDERR_FILENO);
    double start = cli_seconds();
    size_t done = 0;
    for (;;) {
        size_t n = 0;
        long len;
        while (n < chunk && (len = cli_read_line(in, &texts[n], &capacities[n])) >= 0)
            lengths[n++] = (size_t)len;
        if (ferror(in)) {
            fprintf(stderr, "embedrag embed: error reading %s\n",
                    input_path ? input_path : "stdin");
            goto free_buffers;
        }
        if (n == 0) break;
        if (embedrag_embed(model, (const char *const *)texts, lengths, n, &params, vectors) != 0) {
            fprintf(stderr, "embedrag embed: %s\n", embedrag_last_error());
            goto free_buffers;
        }
        /* Stop mode: the lines before the first bad one are written, then the error. */
        size_t good = n, first_bad = n;
        for (size_t i = 0; i < n && first_bad == n; i++)
            if (statuses[i]) first_bad = i;
        if (!skip_bad) good = first_bad;
        if (write_vectors(out, format, vectors, statuses, good, dim) != 0) {
            perror(output_path ? output_path : "stdout");
            goto free_buffers;
        }
        if (first_bad < n) {
            /* The library describes the first bad text of the call; in skip mode only the first
             * of the run is shown, the summary counts the rest. */
            if (!skip_bad || skipped.invalid_utf8 + skipped.too_long == 0)
                report_line(done + first_bad + 1, embedrag_last_error_index(),
                            embedrag_last_error());
            if (!skip_bad) {
                if (fflush(out) != 0) perror(output_path ? output_path : "stdout");
                goto free_buffers;
            }
            for (size_t i = first_bad; i < n; i++) {
                if (!statuses[i]) continue;
                if (skipped.invalid_utf8 + skipped.too_long == 0) skipped.first_line = done + i + 1;
                if (statuses[i] == EMBEDRAG_ERR_TOO_LONG)
                    skipped.too_long++;
                else
                    skipped.invalid_utf8++;
            }
        }
        done += n;
        if (progress) {
            double t = cli_seconds() - start;
            fprintf(stderr, "\rembedded %zu texts (%.0f texts/s)", done,
                    t > 0 ? (double)done / t : 0.0);
        }
        if (n < chunk) break;
    }
    if (progress && done) fputc('\n', stderr);
    if (fflush(out) != 0) {
        perror(output_path ? output_path : "stdout");
        goto free_buffers;
    }
    if (skipped.invalid_utf8 + skipped.too_long > 0)
        fprintf(stderr,
                "embedrag embed: skipped %zu of %zu lines (%zu invalid UTF-8, %zu too long); "
                "the first was line %zu\n",
                skipped.invalid_utf8 + skipped.too_long, done, skipped.invalid_utf8,
                skipped.too_long, skipped.first_line);
    status = 0;
free_buffers:
    if (texts)
        for (size_t i = 0; i < chunk; i++) free(texts[i]);
    free(texts);
    free(lengths);
    free(capacities);
    free(vectors);
    free(statuses);
    if (out != stdout && fclose(out) != 0 && status == 0) {
        perror(output_path);
        status = 1;
    }
close_model:
    embedrag_model_close(model);
close_input:
    if (in != stdin) fclose(in);
    return status;
}
