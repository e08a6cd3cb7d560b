/* The `embedrag` command: dispatches to one subcommand per file (embed, tokenize, info, bench)
 * and holds the helpers they share. */
#include "cli.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#ifndef EMBEDRAG_DEFAULT_MODEL_DIR
#define EMBEDRAG_DEFAULT_MODEL_DIR "models/all-MiniLM-L6-v2"
#endif

static const char usage[] =
    "usage: embedrag <command> [options]\n"
    "\n"
    "Sentence embeddings with BERT-family models (CPU; fp32, or bf16 on AMX CPUs).\n"
    "\n"
    "commands:\n"
    "  embed      embed one text per line (stdin or --input) and print one vector per line\n"
    "  tokenize   print the token ids and tokens of each line\n"
    "  info       print facts about a model as JSON\n"
    "  bench      measure latency and throughput, print JSON\n"
    "\n"
    "Each command takes --help. The model is --model DIR, else $EMBEDRAG_MODEL, "
    "else\n" EMBEDRAG_DEFAULT_MODEL_DIR " (fetched by scripts/fetch-models.sh).\n";

const char *cli_model_dir(const char *option)
{
    if (option) return option;
    const char *env = getenv("EMBEDRAG_MODEL");
    if (env && env[0]) return env;
    return EMBEDRAG_DEFAULT_MODEL_DIR;
}

embedrag_model *cli_open_model(const char *dir, int threads, embedrag_precision precision)
{
    embedrag_model_params params = embedrag_model_default_params();
    params.threads = threads;
    params.precision = precision;
    embedrag_model *model = NULL;
    if (embedrag_model_open(dir, &params, &model) != 0) {
        fprintf(stderr, "embedrag: cannot open model %s: %s\n", dir, embedrag_last_error());
        return NULL;
    }
    embedrag_model_info info;
    embedrag_model_get_info(model, &info);
    if (info.precision != precision)
        fprintf(stderr,
                "embedrag: this CPU cannot run %s (it needs AMX-BF16 or AVX512-BF16); running %s "
                "instead\n",
                cli_precision_name(precision), cli_precision_name(info.precision));
    return model;
}

int cli_parse_precision(const char *value, embedrag_precision *out)
{
    if (!strcmp(value, "fp32"))
        *out = EMBEDRAG_PRECISION_FP32;
    else if (!strcmp(value, "bf16"))
        *out = EMBEDRAG_PRECISION_BF16;
    else {
        fprintf(stderr, "embedrag: --precision takes fp32 or bf16 (got '%s')\n", value);
        return -1;
    }
    return 0;
}

const char *cli_precision_name(embedrag_precision precision)
{
    return precision == EMBEDRAG_PRECISION_BF16 ? "bf16" : "fp32";
}

int cli_parse_int(const char *option, const char *value, int minimum, int *out)
{
    char *end = NULL;
    errno = 0;
    long v = strtol(value, &end, 10);
    if (errno || !end || *end || end == value || v < minimum || v > INT_MAX) {
        fprintf(stderr, "embedrag: %s takes a whole number >= %d (got '%s')\n", option, minimum,
                value);
        return -1;
    }
    *out = (int)v;
    return 0;
}

long cli_read_line(FILE *in, char **line, size_t *capacity)
{
    ssize_t n = getline(line, capacity, in);
    if (n < 0) return -1;
    if (n > 0 && (*line)[n - 1] == '\n') n--;
    if (n > 0 && (*line)[n - 1] == '\r') n--;
    (*line)[n] = '\0';
    return (long)n;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fputs(usage, stderr);
        return 2;
    }
    const char *command = argv[1];
    if (!strcmp(command, "--help") || !strcmp(command, "-h") || !strcmp(command, "help")) {
        fputs(usage, stdout);
        return 0;
    }
    if (!strcmp(command, "--version")) {
        printf("embedrag %s\n", embedrag_version());
        return 0;
    }
    if (!strcmp(command, "embed")) return cli_embed(argc - 1, argv + 1);
    if (!strcmp(command, "tokenize")) return cli_tokenize(argc - 1, argv + 1);
    if (!strcmp(command, "info")) return cli_info(argc - 1, argv + 1);
    if (!strcmp(command, "bench")) return cli_bench(argc - 1, argv + 1);
    fprintf(stderr, "embedrag: unknown command '%s' (try embedrag --help)\n", command);
    return 2;
}
