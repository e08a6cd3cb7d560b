/* `embedrag tokenize`: prints, for each input line, the token ids the model would see and their
 * vocabulary strings, as one JSON object per line. */
#include "cli.h"

#include <cjson/cJSON.h>
#include <getopt.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const char tokenize_usage[] =
    "usage: embedrag tokenize [options] [< texts.txt]\n"
    "\n"
    "Prints {\"ids\": [...], \"tokens\": [...]} for each input line, [CLS] and [SEP] included.\n"
    "\n"
    "options:\n"
    "  --model DIR          model directory (default: $EMBEDRAG_MODEL or the fetched default)\n"
    "  --input FILE         read texts from FILE instead of stdin\n"
    "  --prompt NAME        prepend the model's prompt NAME\n"
    "  --prompt-text TEXT   prepend TEXT\n"
    "  --no-truncate        fail on texts longer than the model's limit\n"
    "  -h, --help           this help\n";

int cli_tokenize(int argc, char **argv)
{
    static const struct option options[] = {{"model", required_argument, NULL, 'm'},
                                            {"input", required_argument, NULL, 'i'},
                                            {"prompt", required_argument, NULL, 'p'},
                                            {"prompt-text", required_argument, NULL, 'P'},
                                            {"no-truncate", no_argument, NULL, 'T'},
                                            {"help", no_argument, NULL, 'h'},
                                            {NULL, 0, NULL, 0}};
    const char *model_option = NULL, *input_path = NULL;
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
        case 'p':
            params.prompt_name = optarg;
            break;
        case 'P':
            params.prompt = optarg;
            break;
        case 'T':
            params.truncate = false;
            break;
        case 'h':
            fputs(tokenize_usage, stdout);
            return 0;
        default:
            fputs(tokenize_usage, stderr);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "embedrag tokenize: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    FILE *in = stdin;
    if (input_path && !(in = fopen(input_path, "rb"))) {
        perror(input_path);
        return 1;
    }
    cli_model_options model_options = cli_model_defaults();
    model_options.dir = model_option;
    model_options.threads = 1;
    model_options.device = EMBEDRAG_DEVICE_CPU; /* tokenizing needs no GPU */
    embedrag_model *model = cli_open_model(&model_options);
    int status = 1;
    char *line = NULL;
    size_t capacity = 0, line_number = 0;
    int32_t *ids = NULL;
    if (!model) goto close_input;
    embedrag_model_info info;
    embedrag_model_get_info(model, &info);
    ids = malloc((size_t)info.max_tokens * sizeof *ids);
    if (!ids) goto close_model;
    long len;
    while ((len = cli_read_line(in, &line, &capacity)) >= 0) {
        line_number++;
        size_t count = 0;
        if (embedrag_tokenize(model, line, (size_t)len, &params, ids, (size_t)info.max_tokens,
                              &count) != 0) {
            fprintf(stderr, "embedrag tokenize: line %zu: %s\n", line_number,
                    embedrag_last_error());
            goto close_model;
        }
        cJSON *obj = cJSON_CreateObject(), *id_array = cJSON_AddArrayToObject(obj, "ids"),
              *token_array = cJSON_AddArrayToObject(obj, "tokens");
        for (size_t i = 0; i < count; i++) {
            cJSON_AddItemToArray(id_array, cJSON_CreateNumber(ids[i]));
            const char *text = embedrag_token_text(model, ids[i]);
            cJSON_AddItemToArray(token_array, cJSON_CreateString(text ? text : ""));
        }
        char *json = cJSON_PrintUnformatted(obj);
        puts(json ? json : "{}");
        cJSON_free(json);
        cJSON_Delete(obj);
    }
    status = fflush(stdout) == 0 ? 0 : 1;
close_model:
    free(ids);
    free(line);
    embedrag_model_close(model);
close_input:
    if (in != stdin) fclose(in);
    return status;
}
