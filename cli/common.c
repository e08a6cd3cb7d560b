/* Helpers every subcommand shares (see cli.h): the shared model options, opening the model with
 * a clear one-line error, number parsing and line reading. */
#include "cli.h"

#include "util/clock.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef EMBEDRAG_DEFAULT_MODEL_DIR
#define EMBEDRAG_DEFAULT_MODEL_DIR "models/all-MiniLM-L6-v2"
#endif

cli_model_options cli_model_defaults(void)
{
    cli_model_options o = {.dir = NULL,
                           .threads = 0,
                           .precision = EMBEDRAG_PRECISION_AUTO,
                           .device = EMBEDRAG_DEVICE_AUTO};
    return o;
}

int cli_model_option(int code, const char *value, cli_model_options *o)
{
    switch (code) {
    case CLI_OPTION_MODEL:
        o->dir = value;
        return 1;
    case CLI_OPTION_THREADS:
        return cli_parse_int("--threads", value, 1, &o->threads) ? -1 : 1;
    case CLI_OPTION_PRECISION:
        if (!strcmp(value, "auto"))
            o->precision = EMBEDRAG_PRECISION_AUTO;
        else if (!strcmp(value, "fp32"))
            o->precision = EMBEDRAG_PRECISION_FP32;
        else if (!strcmp(value, "bf16"))
            o->precision = EMBEDRAG_PRECISION_BF16;
        else if (!strcmp(value, "fp16"))
            o->precision = EMBEDRAG_PRECISION_FP16;
        else {
            fprintf(stderr, "embedrag: --precision takes auto, fp32, bf16 or fp16 (got '%s')\n",
                    value);
            return -1;
        }
        return 1;
    case CLI_OPTION_DEVICE:
        if (!strcmp(value, "auto"))
            o->device = EMBEDRAG_DEVICE_AUTO;
        else if (!strcmp(value, "cpu"))
            o->device = EMBEDRAG_DEVICE_CPU;
        else if (!strcmp(value, "gpu") || !strcmp(value, "cuda"))
            o->device = EMBEDRAG_DEVICE_GPU;
        else {
            fprintf(stderr, "embedrag: --device takes auto, cpu, gpu or cuda (got '%s')\n", value);
            return -1;
        }
        return 1;
    }
    return 0;
}

const char *cli_model_dir(const char *option)
{
    if (option) return option;
    const char *env = getenv("EMBEDRAG_MODEL");
    if (env && env[0]) return env;
    return EMBEDRAG_DEFAULT_MODEL_DIR;
}

embedrag_model *cli_open_model(const cli_model_options *o)
{
    const char *dir = cli_model_dir(o->dir);
    embedrag_model_params params = embedrag_model_default_params();
    params.threads = o->threads;
    params.precision = o->precision;
    params.device = o->device;
    embedrag_model *model = NULL;
    if (embedrag_model_open(dir, &params, &model) != 0) {
        fprintf(stderr, "embedrag: cannot open model %s: %s\n", dir, embedrag_last_error());
        return NULL;
    }
    embedrag_model_info info;
    embedrag_model_get_info(model, &info);
    if (o->precision == EMBEDRAG_PRECISION_AUTO) return model;
    if (info.precision != o->precision && o->precision == EMBEDRAG_PRECISION_BF16)
        fprintf(stderr,
                "embedrag: this CPU cannot run bf16 (it needs AMX-BF16 or AVX512-BF16); running "
                "fp32 instead\n");
    else if (info.precision != o->precision && info.backend_count == 1)
        fprintf(stderr, "embedrag: the CPU runs %s as fp32 (%s is a GPU precision)\n",
                cli_precision_name(o->precision), cli_precision_name(o->precision));
    return model;
}

const char *cli_precision_name(embedrag_precision precision)
{
    return precision == EMBEDRAG_PRECISION_BF16   ? "bf16"
           : precision == EMBEDRAG_PRECISION_FP16 ? "fp16"
           : precision == EMBEDRAG_PRECISION_AUTO ? "auto"
                                                  : "fp32";
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

double cli_seconds(void)
{
    return clock_seconds();
}

static int compare_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

double cli_percentile(double *v, int n, double p)
{
    qsort(v, (size_t)n, sizeof *v, compare_double);
    int i = (int)ceil(p * n) - 1;
    return v[i < 0 ? 0 : (i >= n ? n - 1 : i)];
}
