/* `embedrag info`: the model's shape, pooling, limits and prompts, and which backend and kernels
 * would run it, as JSON for scripts. */
#include "cli.h"

#include "engine/engine.h"

#include <cjson/cJSON.h>
#include <getopt.h>
#include <stdlib.h>

static const char info_usage[] =
    "usage: embedrag info [--model DIR] [--precision fp32|bf16]\n"
    "\n"
    "Prints facts about the model as JSON, with the precision it would run in.\n";

int cli_info(int argc, char **argv)
{
    static const struct option options[] = {{"model", required_argument, NULL, 'm'},
                                            {"precision", required_argument, NULL, 'R'},
                                            {"help", no_argument, NULL, 'h'},
                                            {NULL, 0, NULL, 0}};
    const char *model_option = NULL;
    embedrag_precision precision = EMBEDRAG_PRECISION_FP32;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", options, NULL)) != -1) {
        switch (c) {
        case 'm':
            model_option = optarg;
            break;
        case 'R':
            if (cli_parse_precision(optarg, &precision)) return 2;
            break;
        case 'h':
            fputs(info_usage, stdout);
            return 0;
        default:
            fputs(info_usage, stderr);
            return 2;
        }
    }
    const char *dir = cli_model_dir(model_option);
    embedrag_model *model = cli_open_model(dir, 1, precision);
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
    cJSON_AddStringToObject(obj, "backend", engine_backend_name(model));
    cJSON_AddStringToObject(obj, "cpu_kernels", engine_cpu_isa());
    cJSON_AddStringToObject(obj, "precision", cli_precision_name(info.precision));
    cJSON_AddStringToObject(obj, "version", embedrag_version());
    char *json = cJSON_Print(obj);
    puts(json ? json : "{}");
    cJSON_free(json);
    cJSON_Delete(obj);
    embedrag_model_close(model);
    return 0;
}
