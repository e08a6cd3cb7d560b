/* Shared pieces of the `embedrag` command: the default model's location, the options every
 * model-using command takes (--model, --threads, --precision, --device), opening a model with a
 * one-line error, reading lines that may hold any bytes, and the subcommands' entry points. */
#ifndef EMBEDRAG_CLI_H
#define EMBEDRAG_CLI_H

#include "embedrag.h"

#include <getopt.h>
#include <stdio.h>

/* The options of the model a command opens, as parsed by cli_model_option. */
typedef struct cli_model_options {
    const char *dir; /* --model, or NULL for the default (cli_model_dir) */
    int threads;     /* --threads; 0 = all cores */
    embedrag_precision precision;
    embedrag_device device;
} cli_model_options;

/* getopt_long codes of the shared options, and their table entries (add CLI_MODEL_OPTIONS to a
 * command's option table and hand every code to cli_model_option). */
enum {
    CLI_OPTION_MODEL = 0x100,
    CLI_OPTION_THREADS,
    CLI_OPTION_PRECISION,
    CLI_OPTION_DEVICE,
};
#define CLI_MODEL_OPTIONS                                                                          \
    {"model", required_argument, NULL, CLI_OPTION_MODEL},                                          \
        {"threads", required_argument, NULL, CLI_OPTION_THREADS},                                  \
        {"precision", required_argument, NULL, CLI_OPTION_PRECISION},                              \
    {                                                                                              \
        "device", required_argument, NULL, CLI_OPTION_DEVICE                                       \
    }

/* The help lines of the shared options. */
#define CLI_MODEL_OPTIONS_HELP                                                                     \
    "  --model DIR          model directory (default: $EMBEDRAG_MODEL or the fetched default)\n"   \
    "  --threads N          CPU worker threads (default: all cores)\n"                             \
    "  --precision P        auto (default: fp32 on the CPU, matching sentence-transformers;\n"     \
    "                       fp16 on a GPU), fp32, bf16 (1.8-3x faster on CPUs with AMX-BF16\n"     \
    "                       or AVX512-BF16; cosine to fp32 >= 0.9999 for nearly all texts) or\n"   \
    "                       fp16 (a GPU's fast mode; the CPU runs it as fp32)\n"                   \
    "  --device D           auto (default: the CPU plus every GPU found; each call goes where\n"   \
    "                       it should finish first), cpu, or gpu (alias cuda); the default\n"      \
    "                       comes from $EMBEDRAG_DEVICE when set\n"

/* Defaults: the default model, all cores, each backend's own precision, any device. */
cli_model_options cli_model_defaults(void);

/* Handles one shared option code: returns 1 when it was one (parsed into o), 0 when it was not,
 * -1 after printing an error naming the option. */
int cli_model_option(int code, const char *value, cli_model_options *o);

/* The model directory to use: --model if given, else $EMBEDRAG_MODEL, else the default model
 * fetched by scripts/fetch-models.sh into the source tree. */
const char *cli_model_dir(const char *option);

/* Opens the model or prints "embedrag: <message>" and returns NULL. When the precision asked for
 * cannot run here, says so on stderr (the model then runs fp32). */
embedrag_model *cli_open_model(const cli_model_options *o);

/* "fp32", "bf16" or "fp16". */
const char *cli_precision_name(embedrag_precision precision);

/* Parses a whole non-negative decimal int option; prints an error naming the option on failure. */
int cli_parse_int(const char *option, const char *value, int minimum, int *out);

/* Reads one line (any bytes, NUL included) without its "\n" or "\r\n". Returns its length, or -1
 * at end of input. *line is reallocated as needed; the caller frees it. */
long cli_read_line(FILE *in, char **line, size_t *capacity);

/* Seconds on a monotonic clock. */
double cli_seconds(void);

/* The p-quantile (0..1, nearest rank) of v[0..n), n > 0; sorts v. */
double cli_percentile(double *v, int n, double p);

/* For the commands that answer from a store (search, serve): unless --model is given, the
 * model is the one the store records, where its directory still exists (options->dir then
 * points into s, valid while it is open). Returns 0, or 1 after printing "embedrag COMMAND:
 * ..." when that directory is gone and $EMBEDRAG_MODEL names none instead. */
struct store;
int cli_store_model(const char *command, const struct store *s, cli_model_options *options);

int cli_embed(int argc, char **argv);
int cli_tokenize(int argc, char **argv);
int cli_info(int argc, char **argv);
int cli_bench(int argc, char **argv);
int cli_bench_search(int argc, char **argv); /* bench --search */
int cli_index(int argc, char **argv);
int cli_search(int argc, char **argv);
int cli_stats(int argc, char **argv);
int cli_serve(int argc, char **argv);

#endif
