/* `embedrag info`: the model's shape, pooling, limits and prompts, and which backend and kernels
 * would run it, as JSON for scripts. */
#include "cli.h"

#include <cjson/cJSON.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>

static const char info_usage[] =
    "usage: embedrag info [options]\n"
    "\n"
    "Prints facts about the model as JSON: its shape, pooling, limits and prompts, and each\n"
    "backend that would run it (device, kernels, precision, the estimated time of a 16-token\n"
    "query and of 1000 texts of 128 tokens), or why there is no GPU. With a GPU, \"crossover\"\n"
    "says from how many texts of 16, 50, 128 and 256 tokens a GPU is estimated to beat the CPU\n"
    "(both are timed when the model opens). EMBEDRAG_DEVICE=cpu|gpu|auto sets the default device.\n"
    "\n"
    "options:\n" CLI_MODEL_OPTIONS_HELP "  -h, --help           this help\n";

int cli_info(int argc, char **argv)
{
    static const struct option options[] = {
        CLI_MODEL_OPTIONS, {"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
    cli_model_options model_options = cli_model_defaults();
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", options, NULL)) != -1) {
        int shared = cli_model_option(c, optarg, &model_options);
        if (shared < 0) return 2;
        if (shared) continue;
        switch (c) {
        case 'h':
            fputs(info_usage, stdout);
            return 0;
        default:
            fputs(info_usage, stderr);
            return 2;
        }
    }
    const char *dir = cli_model_dir(model_options.dir);
    embedrag_model *model = cli_open_model(&model_options);
    if (!model) return 1;
    embedrag_model_info info;
    embedrag_model_get_info(model, &info);
    static const char *const pooling[] = {"mean", "cls", "max"};
    cJSON *obj = cJSON_CreateObject();
    cJSON_AddStringToObject(obj, "name", info.name);
    cJSON_AddStringToObject(obj, "directory", dir);
    cJSON_AddNumberToObject(obj, "dimension", info.dimension);
    cJSON_AddNumberToObject(obj, "max_tokens", info.max_tokens);
    cJSON_AddNumberToObject(obj, "layers", info.layers);
    cJSON_AddNumberToObject(obj, "hidden", info.hidden);
    cJSON_AddNumberToObject(obj, "heads", info.heads);
    cJSON_AddNumberToObject(obj, "vocab_size", info.vocab_size);
    cJSON_AddStringToObject(obj, "pooling", pooling[info.pooling]);
    cJSON_AddBoolToObject(obj, "normalize", info.normalize);
    cJSON_AddBoolToObject(obj, "lowercase", info.lowercase);
    cJSON *prompts = cJSON_AddObjectToObject(obj, "prompts");
    for (int i = 0; i < info.prompt_count; i++) {
        const char *name, *text;
        embedrag_model_get_prompt(model, i, &name, &text);
        cJSON_AddStringToObject(prompts, name, text);
    }
    if (info.default_prompt_name)
        cJSON_AddStringToObject(obj, "default_prompt_name", info.default_prompt_name);
    else
        cJSON_AddNullToObject(obj, "default_prompt_name");
    embedrag_backend_info cpu;
    embedrag_model_get_backend(model, 0, &cpu);
    cJSON_AddStringToObject(obj, "cpu_kernels", cpu.kernels);
    cJSON_AddStringToObject(obj, "precision", cli_precision_name(info.precision));
    cJSON *backends = cJSON_AddArrayToObject(obj, "backends");
    for (int i = 0; i < info.backend_count; i++) {
        embedrag_backend_info b;
        embedrag_model_get_backend(model, i, &b);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "name", b.name);
        cJSON_AddStringToObject(o, "device", b.device);
        cJSON_AddStringToObject(o, "kernels", b.kernels);
        cJSON_AddStringToObject(o, "precision", cli_precision_name(b.precision));
        cJSON_AddNumberToObject(o, "batch_tokens", b.batch_tokens);
        cJSON_AddNumberToObject(o, "max_batch_tokens", b.max_batch_tokens);
        double query = 0.0, bulk = 0.0;
        embedrag_model_estimate_seconds(model, i, 1, 16, &query);
        embedrag_model_estimate_seconds(model, i, 1000, 128, &bulk);
        cJSON_AddNumberToObject(o, "estimated_query_ms", query * 1e3);
        cJSON_AddNumberToObject(o, "estimated_1000x128_tokens_per_s", 128000.0 / bulk);
        if (b.failure)
            cJSON_AddStringToObject(o, "failure", b.failure);
        else
            cJSON_AddNullToObject(o, "failure");
        cJSON_AddItemToArray(backends, o);
    }
    /* Per GPU and text length: the fewest texts for which the GPU's estimate beats the CPU's
     * (0: the CPU wins up to 100,000 texts). */
    cJSON *crossover = NULL;
    for (int i = 1; i < info.backend_count; i++) {
        embedrag_backend_info b;
        embedrag_model_get_backend(model, i, &b);
        if (b.failure) continue;
        if (!crossover) crossover = cJSON_AddObjectToObject(obj, "crossover");
        cJSON *o = cJSON_AddObjectToObject(crossover, b.name);
        static const int lengths[] = {16, 50, 128, 256};
        for (size_t k = 0; k < sizeof lengths / sizeof lengths[0]; k++) {
            size_t texts = 0;
            for (size_t n = 1; n <= 100000 && !texts && lengths[k] <= info.max_tokens;
                 n += n < 64 ? 1 : n / 16) {
                double on_cpu, on_gpu;
                embedrag_model_estimate_seconds(model, 0, n, lengths[k], &on_cpu);
                embedrag_model_estimate_seconds(model, i, n, lengths[k], &on_gpu);
                if (on_gpu < on_cpu) texts = n;
            }
            char key[32];
            snprintf(key, sizeof key, "texts_of_%d_tokens", lengths[k]);
            cJSON_AddNumberToObject(o, key, (double)texts);
        }
    }
    const char *no_gpu = embedrag_model_gpu_unavailable(model);
    if (no_gpu)
        cJSON_AddStringToObject(obj, "gpu_unavailable", no_gpu);
    else
        cJSON_AddNullToObject(obj, "gpu_unavailable");
    cJSON_AddStringToObject(obj, "version", embedrag_version());
    char *json = cJSON_Print(obj);
    puts(json ? json : "{}");
    cJSON_free(json);
    cJSON_Delete(obj);
    embedrag_model_close(model);
    return 0;
}
