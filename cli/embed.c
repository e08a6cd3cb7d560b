/* `embedrag embed`: one text per input line, one vector per output line (JSON array, TSV, or
 * raw little-endian float32). Texts are embedded in chunks so memory stays flat however long the
 * input is; a bad line stops the run with its line number and a non-zero exit. */
#include "cli.h"

#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Lines embedded per call: enough for full token-budget batches, small enough that a chunk's
 * texts and vectors stay a few megabytes. */
#define EMBED_CHUNK_LINES 1024

static const char embed_usage[] =
    "usage: embedrag embed [options] [< texts.txt]\n"
    "\n"
    "Embeds one text per line and prints one vector per line, in input order.\n"
    "\n"
    "options:\n"
    "  --model DIR          model directory (default: $EMBEDRAG_MODEL or the fetched default)\n"
    "  --input FILE         read texts from FILE instead of stdin\n"
    "  --output FILE        write vectors to FILE instead of stdout\n"
    "  --format FMT         json (default: one JSON array per line), tsv, or f32 (raw\n"
    "                       little-endian float32, dimension floats per text)\n"
    "  --prompt NAME        use the model's prompt NAME (e.g. query, passage)\n"
    "  --prompt-text TEXT   prepend TEXT to every line (overrides --prompt)\n"
    "  --no-normalize       do not L2-normalize the vectors\n"
    "  --dimensions N       keep the first N components (Matryoshka), then normalize\n"
    "  --no-truncate        fail on texts longer than the model's limit instead of cutting\n"
    "  --batch-tokens N     most tokens per forward pass (default 2048)\n"
    "  --threads N          worker threads (default: all cores)\n"
    "  --precision P        fp32 (default, matches sentence-transformers) or bf16 (~3x faster\n"
    "                       on CPUs with AMX-BF16; cosine to fp32 >= 0.9999 for nearly all texts)\n"
    "  --quiet              no progress on stderr\n"
    "  -h, --help           this help\n";

enum { FORMAT_JSON, FORMAT_TSV, FORMAT_F32 };

static int write_vectors(FILE *out, int format, const float *v, size_t n, int dim)
{
    if (format == FORMAT_F32)
        return fwrite(v, sizeof(float), n * (size_t)dim, out) == n * (size_t)dim ? 0 : -1;
    for (size_t i = 0; i < n; i++) {
        const float *row = v + i * (size_t)dim;
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

static double seconds_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

int cli_embed(int argc, char **argv)
{
    static const struct option options[] = {{"model", required_argument, NULL, 'm'},
                                            {"input", required_argument, NULL, 'i'},
                                            {"output", required_argument, NULL, 'o'},
                                            {"format", required_argument, NULL, 'f'},
                                            {"prompt", required_argument, NULL, 'p'},
                                            {"prompt-text", required_argument, NULL, 'P'},
                                            {"no-normalize", no_argument, NULL, 'N'},
                                            {"dimensions", required_argument, NULL, 'd'},
                                            {"no-truncate", no_argument, NULL, 'T'},
                                            {"batch-tokens", required_argument, NULL, 'b'},
                                            {"threads", required_argument, NULL, 't'},
                                            {"quiet", no_argument, NULL, 'q'},
                                            {"precision", required_argument, NULL, 'R'},
                                            {"help", no_argument, NULL, 'h'},
                                            {NULL, 0, NULL, 0}};
    const char *model_option = NULL, *input_path = NULL, *output_path = NULL;
    int format = FORMAT_JSON, threads = 0, quiet = 0;
    embedrag_precision precision = EMBEDRAG_PRECISION_FP32;
    embedrag_embed_params params = embedrag_embed_default_params();
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", options, NULL)) != -1) {
        switch (c) {
        case 'm':
            model_option = optarg;
            break;
        case 'i':
            input_path = optarg;
            break;
        case 'o':
            output_path = optarg;
            break;
        case 'f':
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
        case 'p':
            params.prompt_name = optarg;
            break;
        case 'P':
            params.prompt = optarg;
            break;
        case 'N':
            params.normalize = false;
            break;
        case 'd':
            if (cli_parse_int("--dimensions", optarg, 1, &params.dimensions)) return 2;
            break;
        case 'T':
            params.truncate = false;
            break;
        case 'b':
            if (cli_parse_int("--batch-tokens", optarg, 1, &params.batch_tokens)) return 2;
            break;
        case 't':
            if (cli_parse_int("--threads", optarg, 1, &threads)) return 2;
            break;
        case 'q':
            quiet = 1;
            break;
        case 'R':
            if (cli_parse_precision(optarg, &precision)) return 2;
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
    FILE *in = stdin, *out = stdout;
    if (input_path && !(in = fopen(input_path, "rb"))) {
        perror(input_path);
        return 1;
    }
    const char *dir = cli_model_dir(model_option);
    embedrag_model *model = cli_open_model(dir, threads, precision);
    int status = 1;
    char **texts = NULL;
    size_t *lengths = NULL, *capacities = NULL;
    float *vectors = NULL;
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
    texts = calloc(EMBED_CHUNK_LINES, sizeof *texts);
    lengths = calloc(EMBED_CHUNK_LINES, sizeof *lengths);
    capacities = calloc(EMBED_CHUNK_LINES, sizeof *capacities);
    vectors = malloc((size_t)EMBED_CHUNK_LINES * (size_t)dim * sizeof *vectors);
    if (!texts || !lengths || !capacities || !vectors) {
        fprintf(stderr, "embedrag embed: out of memory\n");
        goto free_buffers;
    }
    int progress = !quiet && isatty(STDERR_FILENO);
    double start = seconds_now();
    size_t done = 0;
    for (;;) {
        size_t n = 0;
        long len;
        while (n < EMBED_CHUNK_LINES && (len = cli_read_line(in, &texts[n], &capacities[n])) >= 0)
            lengths[n++] = (size_t)len;
        if (ferror(in)) {
            fprintf(stderr, "embedrag embed: error reading %s\n",
                    input_path ? input_path : "stdin");
            goto free_buffers;
        }
        if (n == 0) break;
        if (embedrag_embed(model, (const char *const *)texts, lengths, n, &params, vectors) != 0) {
            /* A text's error names its index within this chunk: report the input line instead. */
            const char *msg = embedrag_last_error();
            long index = embedrag_last_error_text();
            if (index >= 0) {
                /* "text 3: invalid UTF-8 ..." -> "line 7: invalid UTF-8 ...";
                 * "text 3 has 600 tokens ..." -> "line 7: text has 600 tokens ...". */
                char prefix[32];
                size_t prefix_len = (size_t)snprintf(prefix, sizeof prefix, "text %ld", index);
                const char *rest = strncmp(msg, prefix, prefix_len) == 0 ? msg + prefix_len : NULL;
                size_t line = done + (size_t)index + 1;
                if (rest && strncmp(rest, ": ", 2) == 0)
                    fprintf(stderr, "embedrag embed: line %zu: %s\n", line, rest + 2);
                else if (rest)
                    fprintf(stderr, "embedrag embed: line %zu: text%s\n", line, rest);
                else
                    fprintf(stderr, "embedrag embed: line %zu: %s\n", line, msg);
            } else {
                fprintf(stderr, "embedrag embed: %s\n", msg);
            }
            goto free_buffers;
        }
        if (write_vectors(out, format, vectors, n, dim) != 0) {
            perror(output_path ? output_path : "stdout");
            goto free_buffers;
        }
        done += n;
        if (progress) {
            double t = seconds_now() - start;
            fprintf(stderr, "\rembedded %zu texts (%.0f texts/s)", done,
                    t > 0 ? (double)done / t : 0.0);
        }
        if (n < EMBED_CHUNK_LINES) break;
    }
    if (progress && done) fputc('\n', stderr);
    if (fflush(out) != 0) {
        perror(output_path ? output_path : "stdout");
        goto free_buffers;
    }
    status = 0;
free_buffers:
    if (texts)
        for (size_t i = 0; i < EMBED_CHUNK_LINES; i++) free(texts[i]);
    free(texts);
    free(lengths);
    free(capacities);
    free(vectors);
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
