/* Shared pieces of the `embedrag` command: the default model's location, opening a model with a
 * one-line error, reading lines that may hold any bytes, and the subcommands' entry points. */
#ifndef EMBEDRAG_CLI_H
#define EMBEDRAG_CLI_H

#include "embedrag.h"

#include <stdio.h>

/* The model directory to use: --model if given, else $EMBEDRAG_MODEL, else the default model
 * fetched by scripts/fetch-models.sh into the source tree. */
const char *cli_model_dir(const char *option);

/* Opens the model or prints "embedrag: <message>" and returns NULL. When bfloat16 was asked
 * for and the CPU cannot run it, says so on stderr (the model then runs fp32). */
embedrag_model *cli_open_model(const char *dir, int threads, embedrag_precision precision);

/* Parses --precision fp32|bf16; prints an error naming the option on failure. */
int cli_parse_precision(const char *value, embedrag_precision *out);

/* "fp32" or "bf16". */
const char *cli_precision_name(embedrag_precision precision);

/* Parses a whole non-negative decimal int option; prints an error naming the option on failure. */
int cli_parse_int(const char *option, const char *value, int minimum, int *out);

/* Reads one line (any bytes, NUL included) without its "\n" or "\r\n". Returns its length, or -1
 * at end of input. *line is reallocated as needed; the caller frees it. */
long cli_read_line(FILE *in, char **line, size_t *capacity);

int cli_embed(int argc, char **argv);
int cli_tokenize(int argc, char **argv);
int cli_info(int argc, char **argv);
int cli_bench(int argc, char **argv);

#endif
