/* Model configuration: config.json (the BERT shape and activation) plus the sentence-transformers
 * files that decide what an embedding is (pooling, normalization, sequence limit, prompts).
 * Anything embedrag would run differently from the reference pipeline is rejected here, by name,
 * rather than producing embeddings that are quietly wrong. */
#include "model/model.h"

#include "util/error.h"
#include "util/file.h"
#include "util/json.h"

#include "embedrag.h"

#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

/* Upper bounds that no real BERT checkpoint approaches (BERT-large: 1024 hidden, 24 layers,
 * 16 heads, 4096 intermediate, 30522 vocabulary, 512 positions; multilingual vocabularies stay
 * under 300k). They keep a corrupt config from asking for absurd allocations later. */
#define MODEL_MAX_HIDDEN 16384
#define MODEL_MAX_LAYERS 256
#define MODEL_MAX_HEADS 1024
#define MODEL_MAX_INTERMEDIATE 65536
#define MODEL_MAX_VOCAB 10000000
#define MODEL_MAX_POSITIONS 1000000
#define MODEL_MAX_TYPE_VOCAB 1024

/* Models name a handful of prompts (query, passage, a few task instructions); the bound keeps
 * the duplicate check below cheap on a hostile file. */
#define MODEL_MAX_PROMPTS 1024

/* Config files are a few KB; a larger one is not a config file. */
#define MODEL_MAX_CONFIG_BYTES (16u * 1024u * 1024u)

/* Decides from model_type, or from architectures when model_type is absent, whether this is a
 * plain BERT encoder. Look-alikes (RoBERTa's offset positions, DistilBERT's tensor names,
 * XLM-R's vocabulary) would load and then compute something else, so only "bert" passes. */
static int cfg_check_architecture(const cJSON *root, const char *filename)
{
    const char *model_type;
    int rc = json_get_string(root, filename, NULL, "model_type", &model_type);
    if (rc) return rc;
    if (model_type) {
        if (strcmp(model_type, "bert") != 0)
            return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                           "%s: model_type '%s' is not supported (embedrag runs BERT models)",
                           filename, model_type);
        return 0;
    }
    const cJSON *architectures = cJSON_GetObjectItemCaseSensitive(root, "architectures");
    if (!cJSON_IsArray(architectures) || cJSON_GetArraySize(architectures) == 0)
        return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                       "%s: neither model_type nor architectures says this is a BERT model "
                       "(embedrag runs BERT models)",
                       filename);
    const cJSON *arch;
    cJSON_ArrayForEach(arch, architectures)
    {
        /* BertModel, BertForMaskedLM, BertForPreTraining, ...: all carry a BertModel body. */
        if (!cJSON_IsString(arch) || strncmp(arch->valuestring, "Bert", 4) != 0) {
            char text[64];
            return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                           "%s: architecture %s is not supported (embedrag runs BERT models)",
                           filename, json_value_text(arch, text, sizeof text));
        }
    }
    return 0;
}

static int cfg_parse_activation(const cJSON *root, const char *filename, model_activation *out)
{
    const char *act;
    int rc = json_get_string(root, filename, NULL, "hidden_act", &act);
    if (rc) return rc;
    if (!act || strcmp(act, "gelu") == 0 || strcmp(act, "gelu_python") == 0)
        *out = MODEL_ACT_GELU;
    else if (strcmp(act, "gelu_new") == 0 || strcmp(act, "gelu_pytorch_tanh") == 0 ||
             strcmp(act, "gelu_fast") == 0)
        *out = MODEL_ACT_GELU_TANH;
    else if (strcmp(act, "relu") == 0)
        *out = MODEL_ACT_RELU;
    else
        return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                       "%s: hidden_act '%s' is not supported (gelu, gelu_new, gelu_pytorch_tanh, "
                       "gelu_fast, relu are)",
                       filename, act);
    return 0;
}

void model_config_free(model_config *config)
{
    if (!config) return;
    free(config->name);
    for (int i = 0; i < config->prompt_count; i++) {
        free(config->prompts[i].name);
        free(config->prompts[i].text);
    }
    free(config->prompts);
    free(config->default_prompt_name);
    memset(config, 0, sizeof *config);
}

int model_config_parse(const char *json, size_t length, const char *filename, model_config *out)
{
    memset(out, 0, sizeof *out);
    cJSON *root;
    int rc = json_parse(json, length, filename, &root);
    if (rc) return rc;
    if (!cJSON_IsObject(root)) {
        rc = err_set(EMBEDRAG_ERR_FORMAT, "%s: not a JSON object", filename);
        goto free_root;
    }
    rc = cfg_check_architecture(root, filename);
    if (rc) goto free_root;

    const char *position_type;
    rc = json_get_string(root, filename, NULL, "position_embedding_type", &position_type);
    if (rc) goto free_root;
    if (position_type && strcmp(position_type, "absolute") != 0) {
        rc = err_set(EMBEDRAG_ERR_UNSUPPORTED,
                     "%s: position_embedding_type '%s' is not supported (only 'absolute' is)",
                     filename, position_type);
        goto free_root;
    }

    out->type_vocab_size = 2;
    if ((rc = json_get_int(root, filename, NULL, "hidden_size", true, 1, MODEL_MAX_HIDDEN,
                           &out->hidden_size)) ||
        (rc = json_get_int(root, filename, NULL, "num_hidden_layers", true, 1, MODEL_MAX_LAYERS,
                           &out->num_layers)) ||
        (rc = json_get_int(root, filename, NULL, "num_attention_heads", true, 1, MODEL_MAX_HEADS,
                           &out->num_heads)) ||
        (rc = json_get_int(root, filename, NULL, "intermediate_size", true, 1,
                           MODEL_MAX_INTERMEDIATE, &out->intermediate_size)) ||
        (rc = json_get_int(root, filename, NULL, "vocab_size", true, 1, MODEL_MAX_VOCAB,
                           &out->vocab_size)) ||
        (rc = json_get_int(root, filename, NULL, "max_position_embeddings", true, 1,
                           MODEL_MAX_POSITIONS, &out->max_position_embeddings)) ||
        (rc = json_get_int(root, filename, NULL, "type_vocab_size", false, 1, MODEL_MAX_TYPE_VOCAB,
                           &out->type_vocab_size)))
        goto free_root;
    if (out->hidden_size % out->num_heads != 0) {
        rc = err_set(EMBEDRAG_ERR_FORMAT,
                     "%s: hidden_size %d is not divisible by num_attention_heads %d", filename,
                     out->hidden_size, out->num_heads);
        goto free_root;
    }

    out->layer_norm_eps = 1e-12f;
    const cJSON *eps = cJSON_GetObjectItemCaseSensitive(root, "layer_norm_eps");
    if (eps && !cJSON_IsNull(eps)) {
        /* A LayerNorm epsilon of 1 or more would swamp the variance of any trained layer; one
         * that rounds to 0 in float (found by fuzzing: 1e-52) would divide by zero on a
         * constant row. */
        if (!cJSON_IsNumber(eps) || !(eps->valuedouble > 0 && eps->valuedouble < 1) ||
            !((float)eps->valuedouble > 0.0f)) {
            char text[64];
            rc = err_set(EMBEDRAG_ERR_FORMAT,
                         "%s: layer_norm_eps is %s, expected a number in (0, 1) that a float "
                         "holds",
                         filename, json_value_text(eps, text, sizeof text));
            goto free_root;
        }
        out->layer_norm_eps = (float)eps->valuedouble;
    }
    rc = cfg_parse_activation(root, filename, &out->activation);
    if (rc) goto free_root;

    const char *name;
    rc = json_get_string(root, filename, NULL, "_name_or_path", &name);
    if (rc) goto free_root;
    if (name && *name) {
        out->name = strdup(name);
        if (!out->name) {
            rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "%s: out of memory", filename);
            goto free_root;
        }
    }

    /* What the sentence-transformers files would set, for a directory that has none of them. */
    out->max_seq_length = out->max_position_embeddings;
    out->pooling = EMBEDRAG_POOLING_MEAN;
    out->pooling_include_prompt = true;
    out->normalize = false;

free_root:
    cJSON_Delete(root);
    if (rc) model_config_free(out);
    return rc;
}

/* Reads and parses dir/name. An absent optional file leaves *root NULL and returns 0. On return
 * *path holds the joined path (for messages) and the caller frees it. */
static int cfg_load_json(const char *dir, const char *name, bool optional, char **path,
                         cJSON **root)
{
    *root = NULL;
    int rc = file_join(dir, name, path);
    if (rc) return rc;
    bool missing;
    return json_read_file(*path, MODEL_MAX_CONFIG_BYTES, optional ? &missing : NULL, root);
}

/* The last component of a module's type ("sentence_transformers.models.Pooling" -> "Pooling"),
 * so renamed packages with the same modules still match. */
static const char *cfg_module_kind(const char *type)
{
    const char *dot = strrchr(type, '.');
    return dot ? dot + 1 : type;
}

/* modules.json: finds the Pooling module's directory (*pooling_dir, owned by `modules`) and
 * whether a Normalize module follows. Modules that would change the vector (Dense, LayerNorm,
 * ...) are refused: embedrag would otherwise return a different embedding than the model's. */
static int cfg_parse_modules(const cJSON *modules, const char *path, model_config *config,
                             const char **pooling_dir)
{
    *pooling_dir = NULL;
    if (!cJSON_IsArray(modules))
        return err_set(EMBEDRAG_ERR_FORMAT, "%s: not a JSON array of modules", path);
    const cJSON *module;
    int index = 0;
    cJSON_ArrayForEach(module, modules)
    {
        const char *type, *module_path;
        if (!cJSON_IsObject(module))
            return err_set(EMBEDRAG_ERR_FORMAT, "%s: module %d is not an object", path, index);
        int rc = json_get_string(module, path, NULL, "type", &type);
        if (rc) return rc;
        if (!type) return err_set(EMBEDRAG_ERR_FORMAT, "%s: module %d has no type", path, index);
        rc = json_get_string(module, path, NULL, "path", &module_path);
        if (rc) return rc;
        const char *kind = cfg_module_kind(type);
        if (strcmp(kind, "Transformer") == 0) {
            /* the BERT encoder itself */
        } else if (strcmp(kind, "Pooling") == 0) {
            if (*pooling_dir)
                return err_set(EMBEDRAG_ERR_UNSUPPORTED, "%s: more than one Pooling module", path);
            /* The pooling directory is joined to the model directory: it must stay inside. */
            if (!module_path || !*module_path || module_path[0] == '/' || strstr(module_path, ".."))
                return err_set(EMBEDRAG_ERR_FORMAT,
                               "%s: module %d (Pooling) has path '%s', expected a relative "
                               "directory such as 1_Pooling",
                               path, index, module_path ? module_path : "");
            *pooling_dir = module_path;
        } else if (strcmp(kind, "Normalize") == 0) {
            config->normalize = true;
        } else {
            return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                           "%s: module %d has type '%s', which embedrag does not implement "
                           "(it runs Transformer, Pooling and Normalize)",
                           path, index, type);
        }
        index++;
    }
    return 0;
}

/* The pooling options named in sentence-transformers' Pooling config, and what embedrag does
 * with each. */
static const struct {
    const char *flag; /* the boolean field */
    const char *mode; /* the "pooling_mode" string */
    int pooling;      /* embedrag_pooling, or -1 for a mode embedrag does not implement */
} cfg_pooling_modes[] = {
    {"pooling_mode_cls_token", "cls", EMBEDRAG_POOLING_CLS},
    {"pooling_mode_mean_tokens", "mean", EMBEDRAG_POOLING_MEAN},
    {"pooling_mode_max_tokens", "max", EMBEDRAG_POOLING_MAX},
    {"pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens", -1},
    {"pooling_mode_weightedmean_tokens", "weightedmean", -1},
    {"pooling_mode_lasttoken", "lasttoken", -1},
};
#define CFG_POOLING_MODE_COUNT (int)(sizeof cfg_pooling_modes / sizeof cfg_pooling_modes[0])

static int cfg_parse_pooling(const cJSON *root, const char *path, model_config *config)
{
    if (!cJSON_IsObject(root)) return err_set(EMBEDRAG_ERR_FORMAT, "%s: not a JSON object", path);
    int dimension = 0;
    int rc = json_get_int(root, path, NULL, "word_embedding_dimension", false, 1, MODEL_MAX_HIDDEN,
                          &dimension);
    if (rc) return rc;
    if (dimension && dimension != config->hidden_size)
        return err_set(EMBEDRAG_ERR_FORMAT,
                       "%s: word_embedding_dimension %d differs from config.json's hidden_size %d",
                       path, dimension, config->hidden_size);
    rc = json_get_bool(root, path, NULL, "include_prompt", &config->pooling_include_prompt);
    if (rc) return rc;

    /* sentence-transformers lets the "pooling_mode" string override the flags. */
    const char *mode;
    rc = json_get_string(root, path, NULL, "pooling_mode", &mode);
    if (rc) return rc;
    if (mode) {
        for (int i = 0; i < CFG_POOLING_MODE_COUNT; i++) {
            if (strcmp(mode, cfg_pooling_modes[i].mode) != 0) continue;
            if (cfg_pooling_modes[i].pooling < 0) break;
            config->pooling = cfg_pooling_modes[i].pooling;
            return 0;
        }
        return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                       "%s: pooling_mode '%s' is not supported (cls, mean and max are)", path,
                       mode);
    }

    int chosen = -1;
    for (int i = 0; i < CFG_POOLING_MODE_COUNT; i++) {
        bool on = false;
        rc = json_get_bool(root, path, NULL, cfg_pooling_modes[i].flag, &on);
        if (rc) return rc;
        if (!on) continue;
        if (cfg_pooling_modes[i].pooling < 0)
            return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                           "%s: %s is not supported (cls, mean and max pooling are)", path,
                           cfg_pooling_modes[i].flag);
        /* Several modes concatenate their vectors into a wider embedding. */
        if (chosen >= 0)
            return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                           "%s: %s and %s are both set; embedrag supports exactly one pooling "
                           "mode",
                           path, cfg_pooling_modes[chosen].flag, cfg_pooling_modes[i].flag);
        chosen = i;
    }
    if (chosen < 0)
        return err_set(EMBEDRAG_ERR_FORMAT,
                       "%s: no pooling mode is set (expected one of pooling_mode_cls_token, "
                       "pooling_mode_mean_tokens, pooling_mode_max_tokens)",
                       path);
    config->pooling = cfg_pooling_modes[chosen].pooling;
    return 0;
}

static int cfg_parse_sentence_bert(const cJSON *root, const char *path, model_config *config)
{
    if (!cJSON_IsObject(root)) return err_set(EMBEDRAG_ERR_FORMAT, "%s: not a JSON object", path);
    int max_seq_length = 0;
    int rc = json_get_int(root, path, NULL, "max_seq_length", false, 1, MODEL_MAX_POSITIONS,
                          &max_seq_length);
    if (rc) return rc;
    /* Positions past the table do not exist, whatever the file asks for. */
    if (max_seq_length && max_seq_length < config->max_position_embeddings)
        config->max_seq_length = max_seq_length;
    return 0;
}

static int cfg_parse_prompts(const cJSON *root, const char *path, model_config *config)
{
    if (!cJSON_IsObject(root)) return err_set(EMBEDRAG_ERR_FORMAT, "%s: not a JSON object", path);
    const cJSON *prompts = cJSON_GetObjectItemCaseSensitive(root, "prompts");
    char text[64];
    if (prompts && !cJSON_IsNull(prompts)) {
        if (!cJSON_IsObject(prompts))
            return err_set(EMBEDRAG_ERR_FORMAT, "%s: prompts is %s, expected an object", path,
                           json_value_text(prompts, text, sizeof text));
        int count = cJSON_GetArraySize(prompts);
        if (count > MODEL_MAX_PROMPTS)
            return err_set(EMBEDRAG_ERR_FORMAT, "%s: prompts has %d entries, at most %d", path,
                           count, MODEL_MAX_PROMPTS);
        config->prompts = calloc((size_t)count + 1, sizeof *config->prompts);
        if (!config->prompts) return err_set(EMBEDRAG_ERR_NO_MEMORY, "%s: out of memory", path);
        const cJSON *prompt;
        cJSON_ArrayForEach(prompt, prompts)
        {
            if (!cJSON_IsString(prompt))
                return err_set(EMBEDRAG_ERR_FORMAT, "%s: prompt '%s' is %s, expected a string",
                               path, prompt->string, json_value_text(prompt, text, sizeof text));
            for (int i = 0; i < config->prompt_count; i++)
                if (strcmp(config->prompts[i].name, prompt->string) == 0)
                    return err_set(EMBEDRAG_ERR_FORMAT, "%s: prompt '%s' appears twice", path,
                                   prompt->string);
            model_prompt *p = &config->prompts[config->prompt_count];
            p->name = strdup(prompt->string);
            p->text = strdup(prompt->valuestring);
            if (p->name || p->text) config->prompt_count++; /* so model_config_free frees them */
            if (!p->name || !p->text)
                return err_set(EMBEDRAG_ERR_NO_MEMORY, "%s: out of memory", path);
        }
    }
    const char *default_name;
    int rc = json_get_string(root, path, NULL, "default_prompt_name", &default_name);
    if (rc) return rc;
    if (default_name) {
        bool known = false;
        for (int i = 0; i < config->prompt_count; i++)
            if (strcmp(config->prompts[i].name, default_name) == 0) known = true;
        if (!known)
            return err_set(EMBEDRAG_ERR_FORMAT,
                           "%s: default_prompt_name '%s' is not one of the prompts", path,
                           default_name);
        config->default_prompt_name = strdup(default_name);
        if (!config->default_prompt_name)
            return err_set(EMBEDRAG_ERR_NO_MEMORY, "%s: out of memory", path);
    }
    return 0;
}

/* The directory's last component ("models/e5-small-v2/" -> "e5-small-v2"). */
static char *cfg_base_name(const char *dir)
{
    size_t end = strlen(dir);
    while (end > 1 && dir[end - 1] == '/') end--;
    size_t begin = end;
    while (begin > 0 && dir[begin - 1] != '/') begin--;
    if (begin == end) return strdup(dir);
    return strndup(dir + begin, end - begin);
}

/* One optional sentence-transformers file: parsed by `parse` when present. */
static int cfg_apply_optional(const char *dir, const char *name,
                              int (*parse)(const cJSON *, const char *, model_config *),
                              model_config *config)
{
    char *path;
    cJSON *root;
    int rc = cfg_load_json(dir, name, true, &path, &root);
    if (rc == 0 && root) rc = parse(root, path, config);
    cJSON_Delete(root);
    free(path);
    return rc;
}

/* dir/<pooling_dir>/config.json, which must exist when modules.json names the module. */
static int cfg_load_pooling(const char *dir, const char *pooling_dir, model_config *config)
{
    char *name;
    int rc = file_join(pooling_dir, "config.json", &name);
    if (rc) return rc;
    char *path;
    cJSON *root;
    rc = cfg_load_json(dir, name, false, &path, &root);
    if (rc == 0) rc = cfg_parse_pooling(root, path, config);
    cJSON_Delete(root);
    free(path);
    free(name);
    return rc;
}

int model_config_load(const char *dir, model_config *out)
{
    memset(out, 0, sizeof *out);
    char *path;
    int rc = file_join(dir, "config.json", &path);
    if (rc) return rc;
    char *text;
    size_t length;
    rc = file_read(path, MODEL_MAX_CONFIG_BYTES, &text, &length, NULL);
    if (rc) goto free_path;
    rc = model_config_parse(text, length, path, out);
    free(text);
    if (rc) goto free_path;

    /* The directory names the model the user chose; a sentence-transformers checkpoint's
     * _name_or_path usually names the base model it was trained from instead. */
    {
        free(out->name);
        out->name = cfg_base_name(dir);
        if (!out->name) {
            rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "%s: out of memory", dir);
            goto free_config;
        }
    }

    /* modules.json decides which pooling directory applies and whether vectors are normalized;
     * without it sentence-transformers builds Transformer + mean Pooling, and so do we. */
    char *modules_path;
    cJSON *modules;
    rc = cfg_load_json(dir, "modules.json", true, &modules_path, &modules);
    if (rc == 0 && modules) {
        const char *pooling_dir;
        rc = cfg_parse_modules(modules, modules_path, out, &pooling_dir);
        if (rc == 0 && pooling_dir) rc = cfg_load_pooling(dir, pooling_dir, out);
    }
    cJSON_Delete(modules);
    free(modules_path);
    if (rc) goto free_config;

    rc = cfg_apply_optional(dir, "sentence_bert_config.json", cfg_parse_sentence_bert, out);
    if (rc) goto free_config;
    rc = cfg_apply_optional(dir, "config_sentence_transformers.json", cfg_parse_prompts, out);
    if (rc) goto free_config;
    free(path);
    return 0;

free_config:
    model_config_free(out);
free_path:
    free(path);
    return rc;
}
