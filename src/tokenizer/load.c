/* Loading a tokenizer from a model directory: tokenizer.json (model, normalizer, pre-tokenizer,
 * post-processor, added tokens), or vocab.txt with tokenizer_config.json; tok_open,
 * tok_open_vocab_buffer and the accessors. Anything the reference would run differently from
 * BERT's pipeline is refused here by name. */
#include "tokenizer/tokenizer_internal.h"

#include "util/error.h"
#include "util/file.h"
#include "util/json.h"

#include <cjson/cJSON.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* tokenizer.json takes about 15 bytes a vocabulary entry (466 KB for BERT's 30,522), so this
 * holds over four million entries, many times the largest multilingual vocabularies; beyond it a
 * file is not a tokenizer file. */
#define MAX_TOKENIZER_FILE_BYTES (64u * 1024u * 1024u)

/* Ids above this are surely a corrupt file: the largest BERT vocabularies hold about 250,000
 * entries, and the reverse table is sized by the largest id. */
#define MAX_TOKEN_ID (1 << 24)

/* Replaces the string *field holds (if any) with a copy of `value`. */
static int set_string(char **field, const char *value)
{
    char *p = strdup(value);
    if (!p) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    free(*field);
    *field = p;
    return 0;
}

/* A token id from JSON: an integer in [0, MAX_TOKEN_ID]. */
static bool token_id_from_json(const cJSON *item, int32_t *id)
{
    int64_t value;
    if (!json_integer(item, 0, MAX_TOKEN_ID, &value)) return false;
    *id = (int32_t)value;
    return true;
}

/* The "type" of a model, normalizer, pre-tokenizer or post-processor, or NULL. */
static const char *component_type(const cJSON *object)
{
    return cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(object, "type"));
}

/* Reads a tokenizer file that must hold a JSON object; a missing file sets *missing, leaves *out
 * NULL and returns 0. */
static int read_json_object(const char *path, bool *missing, cJSON **out)
{
    int status = json_read_file(path, MAX_TOKENIZER_FILE_BYTES, missing, out);
    if (status || !*out) return status;
    if (!cJSON_IsObject(*out)) {
        cJSON_Delete(*out);
        *out = NULL;
        return err_set(EMBEDRAG_ERR_FORMAT, "%s: the top level is not a JSON object", path);
    }
    return 0;
}

/* A one-element "Sequence" is treated as its element. */
static const cJSON *unwrap_sequence(const cJSON *object, const char *list_name)
{
    const char *type = component_type(object);
    if (type && strcmp(type, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(object, list_name);
        if (cJSON_IsArray(list) && cJSON_GetArraySize(list) == 1)
            return cJSON_GetArrayItem(list, 0);
    }
    return object;
}

static int parse_normalizer(tok_builder *b, const cJSON *root, const char *path)
{
    tok_options *o = &b->tok->options;
    const cJSON *n = cJSON_GetObjectItemCaseSensitive(root, "normalizer");
    if (!n || cJSON_IsNull(n)) {
        /* No normalizer: the text reaches the pre-tokenizer unchanged. */
        o->clean_text = o->handle_chinese_chars = o->strip_accents = o->lowercase = false;
        return 0;
    }
    n = unwrap_sequence(n, "normalizers");
    const char *type = component_type(n);
    if (!type || strcmp(type, "BertNormalizer") != 0)
        return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                       "%s: normalizer type \"%s\" is not supported (only BertNormalizer)", path,
                       type ? type : "?");
    /* Missing fields take the reference's defaults: everything on, strip_accents following
     * lowercase. */
    o->clean_text = o->handle_chinese_chars = o->lowercase = true;
    int status;
    if ((status = json_get_bool(n, path, "normalizer", "clean_text", &o->clean_text)) ||
        (status = json_get_bool(n, path, "normalizer", "handle_chinese_chars",
                                &o->handle_chinese_chars)) ||
        (status = json_get_bool(n, path, "normalizer", "lowercase", &o->lowercase)))
        return status;
    o->strip_accents = o->lowercase;
    return json_get_bool(n, path, "normalizer", "strip_accents", &o->strip_accents);
}

static int parse_pre_tokenizer(const cJSON *root, const char *path)
{
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
    const char *type = NULL;
    if (p && !cJSON_IsNull(p)) type = component_type(unwrap_sequence(p, "pretokenizers"));
    if (!type || strcmp(type, "BertPreTokenizer") != 0)
        return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                       "%s: pre_tokenizer \"%s\" is not supported (only BertPreTokenizer)", path,
                       type ? type : "null");
    return 0;
}

/* The id of a TemplateProcessing special token named `name`. */
static int template_special_id(const cJSON *processor, const char *name, int32_t *id,
                               const char *path)
{
    const cJSON *specials = cJSON_GetObjectItemCaseSensitive(processor, "special_tokens");
    const cJSON *entry = cJSON_GetObjectItemCaseSensitive(specials, name);
    if (!entry) {
        *id = -1; /* look the name up in the vocabulary */
        return 0;
    }
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(entry, "ids");
    if (!cJSON_IsArray(list) || cJSON_GetArraySize(list) != 1 ||
        !token_id_from_json(cJSON_GetArrayItem(list, 0), id))
        return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                       "%s: post_processor.special_tokens[\"%s\"] must have exactly one id", path,
                       name);
    return 0;
}

static int parse_post_processor(tok_builder *b, const cJSON *root, const char *path)
{
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(root, "post_processor");
    if (!p || cJSON_IsNull(p)) return 0; /* [CLS] and [SEP] by name */
    p = unwrap_sequence(p, "processors");
    const char *type = component_type(p);
    if (type && strcmp(type, "BertProcessing") == 0) {
        const char *names[2] = {"cls", "sep"};
        char **tokens[2] = {&b->cls_token, &b->sep_token};
        int32_t *ids[2] = {&b->cls_id, &b->sep_id};
        for (int k = 0; k < 2; k++) {
            const cJSON *pair = cJSON_GetObjectItemCaseSensitive(p, names[k]);
            const cJSON *name = cJSON_GetArrayItem(pair, 0);
            if (!cJSON_IsArray(pair) || !cJSON_IsString(name) ||
                !token_id_from_json(cJSON_GetArrayItem(pair, 1), ids[k]))
                return err_set(EMBEDRAG_ERR_FORMAT,
                               "%s: post_processor.%s is not a [token, id] pair", path, names[k]);
            int status = set_string(tokens[k], name->valuestring);
            if (status) return status;
        }
        return 0;
    }
    if (type && strcmp(type, "TemplateProcessing") == 0) {
        /* Only the BERT shape: one special token, the sequence, one special token. */
        const cJSON *single = cJSON_GetObjectItemCaseSensitive(p, "single");
        const cJSON *first = cJSON_GetArrayItem(single, 0), *middle = cJSON_GetArrayItem(single, 1),
                    *last = cJSON_GetArrayItem(single, 2);
        const cJSON *first_id = cJSON_GetObjectItemCaseSensitive(
            cJSON_GetObjectItemCaseSensitive(first, "SpecialToken"), "id");
        const cJSON *last_id = cJSON_GetObjectItemCaseSensitive(
            cJSON_GetObjectItemCaseSensitive(last, "SpecialToken"), "id");
        if (!cJSON_IsArray(single) || cJSON_GetArraySize(single) != 3 ||
            !cJSON_GetObjectItemCaseSensitive(middle, "Sequence") || !cJSON_IsString(first_id) ||
            !cJSON_IsString(last_id))
            return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                           "%s: post_processor.single is not [special, $A, special]", path);
        int status;
        if ((status = set_string(&b->cls_token, first_id->valuestring)) ||
            (status = set_string(&b->sep_token, last_id->valuestring)) ||
            (status = template_special_id(p, first_id->valuestring, &b->cls_id, path)) ||
            (status = template_special_id(p, last_id->valuestring, &b->sep_id, path)))
            return status;
        return 0;
    }
    return err_set(EMBEDRAG_ERR_UNSUPPORTED, "%s: post_processor \"%s\" is not supported", path,
                   type ? type : "?");
}

/* Reads one added-token description (tokenizer.json's added_tokens entries and
 * tokenizer_config.json's added_tokens_decoder values share the fields). */
static int parse_added_token(tok_builder *b, const cJSON *item, int32_t id, const char *path,
                             const char *where)
{
    const cJSON *content = cJSON_GetObjectItemCaseSensitive(item, "content");
    if (!cJSON_IsObject(item) || !cJSON_IsString(content))
        return err_set(EMBEDRAG_ERR_FORMAT, "%s: %s has no content string", path, where);
    bool single_word = false, lstrip = false, rstrip = false, special = false;
    int status;
    if ((status = json_get_bool(item, path, where, "special", &special))) return status;
    bool normalized = !special; /* the reference's default */
    if ((status = json_get_bool(item, path, where, "single_word", &single_word)) ||
        (status = json_get_bool(item, path, where, "lstrip", &lstrip)) ||
        (status = json_get_bool(item, path, where, "rstrip", &rstrip)) ||
        (status = json_get_bool(item, path, where, "normalized", &normalized)))
        return status;
    return tok_builder_add_added(b, content->valuestring, id, single_word, lstrip, rstrip,
                                 normalized);
}

/* Loads tokenizer.json; a missing file sets *missing and returns 0, so the caller can fall back
 * to vocab.txt. */
static int load_tokenizer_json(tok_builder *b, const char *path, bool *missing)
{
    cJSON *root;
    int status = read_json_object(path, missing, &root);
    if (status || *missing) return status;

    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const char *type = component_type(model);
    if (!cJSON_IsObject(model)) {
        status = err_set(EMBEDRAG_ERR_FORMAT, "%s: \"model\" is missing or not an object", path);
        goto done;
    }
    if (type && strcmp(type, "WordPiece") != 0) {
        status = err_set(EMBEDRAG_ERR_UNSUPPORTED,
                         "%s: model.type is \"%s\"; only WordPiece is supported", path, type);
        goto done;
    }
    if (!cJSON_IsObject(vocab)) {
        status = err_set(EMBEDRAG_ERR_FORMAT, "%s: model.vocab is missing or not an object", path);
        goto done;
    }
    for (const cJSON *entry = vocab->child; entry; entry = entry->next) {
        int32_t id;
        if (!token_id_from_json(entry, &id)) {
            status = err_set(EMBEDRAG_ERR_FORMAT, "%s: model.vocab[\"%s\"] is not a valid id", path,
                             entry->string ? entry->string : "");
            goto done;
        }
        if ((status = tok_builder_add_vocab(b, entry->string, strlen(entry->string), id)))
            goto done;
    }
    const cJSON *unk = cJSON_GetObjectItemCaseSensitive(model, "unk_token");
    const cJSON *prefix = cJSON_GetObjectItemCaseSensitive(model, "continuing_subword_prefix");
    if (cJSON_IsString(unk) && (status = set_string(&b->unk_token, unk->valuestring))) goto done;
    if (cJSON_IsString(prefix) && !(b->tok->continuation_prefix = strdup(prefix->valuestring))) {
        status = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
        goto done;
    }
    if ((status = json_get_int(model, path, "model", "max_input_chars_per_word", false, 0, INT_MAX,
                               &b->tok->options.max_input_chars_per_word)))
        goto done;

    if ((status = parse_normalizer(b, root, path)) || (status = parse_pre_tokenizer(root, path)) ||
        (status = parse_post_processor(b, root, path)))
        goto done;

    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    if (added && !cJSON_IsNull(added) && !cJSON_IsArray(added)) {
        status = err_set(EMBEDRAG_ERR_FORMAT, "%s: added_tokens is not an array", path);
        goto done;
    }
    int index = 0;
    for (const cJSON *item = added ? added->child : NULL; item; item = item->next, index++) {
        int32_t id;
        char where[64];
        snprintf(where, sizeof where, "added_tokens[%d]", index);
        if (!token_id_from_json(cJSON_GetObjectItemCaseSensitive(item, "id"), &id)) {
            status = err_set(EMBEDRAG_ERR_FORMAT, "%s: %s has no valid id", path, where);
            goto done;
        }
        if ((status = parse_added_token(b, item, id, path, where))) goto done;
    }
done:
    cJSON_Delete(root);
    return status;
}

/* Splits a vocab.txt buffer into tokens, one per line, id = line number. A trailing "\r" is
 * dropped with the "\n" so that files written on Windows still work. */
static int load_vocab_lines(tok_builder *b, const char *data, size_t length)
{
    int32_t id = 0;
    size_t start = 0;
    while (start < length) {
        const char *newline = memchr(data + start, '\n', length - start);
        size_t end = newline ? (size_t)(newline - data) : length;
        size_t token_end = end;
        if (token_end > start && data[token_end - 1] == '\r') token_end--;
        if (id > MAX_TOKEN_ID)
            return err_set(EMBEDRAG_ERR_FORMAT, "more than %d vocabulary lines", MAX_TOKEN_ID);
        int status = tok_builder_add_vocab(b, data + start, token_end - start, id++);
        if (status) return status;
        start = end + 1;
    }
    return 0;
}

/* BERT's special tokens, matched in the original text like the reference's added tokens. */
static int add_default_specials(tok_builder *b)
{
    static const char *const names[] = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        const char *name = names[i];
        if (strcmp(name, "[UNK]") == 0 && b->unk_token)
            name = b->unk_token;
        else if (strcmp(name, "[CLS]") == 0 && b->cls_token)
            name = b->cls_token;
        else if (strcmp(name, "[SEP]") == 0 && b->sep_token)
            name = b->sep_token;
        /* Find the id by scanning the pending vocabulary (tables are not built yet). */
        int32_t id = -1;
        size_t n = strlen(name);
        for (size_t k = 0; k < b->vocab_count; k++)
            if (b->vocab[k].length == n && memcmp(b->tok->arena + b->vocab[k].offset, name, n) == 0)
                id = b->vocab[k].id; /* the last duplicate wins */
        bool known = false;
        for (size_t k = 0; k < b->added_count; k++) known |= strcmp(b->added[k].content, name) == 0;
        if (id >= 0 && !known) {
            int status = tok_builder_add_added(b, name, id, false, false, false, false);
            if (status) return status;
        }
    }
    return 0;
}

/* A special token in tokenizer_config.json: a string, or an object with "content". */
static int config_token(const cJSON *config, const char *field, char **out)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(config, field);
    if (cJSON_IsObject(item)) item = cJSON_GetObjectItemCaseSensitive(item, "content");
    if (cJSON_IsString(item)) return set_string(out, item->valuestring);
    return 0;
}

static int load_tokenizer_config(tok_builder *b, const char *path)
{
    bool missing;
    cJSON *config;
    int status = read_json_object(path, &missing, &config);
    if (status || missing) return status; /* the file is optional */
    tok_options *o = &b->tok->options;
    /* BertTokenizer's defaults: lowercase, strip accents when lowercasing, space CJK. */
    o->clean_text = true;
    bool strip_given = false;
    const cJSON *strip = cJSON_GetObjectItemCaseSensitive(config, "strip_accents");
    if ((status = json_get_bool(config, path, NULL, "do_lower_case", &o->lowercase)) ||
        (status =
             json_get_bool(config, path, NULL, "tokenize_chinese_chars", &o->handle_chinese_chars)))
        goto done;
    if (strip && !cJSON_IsNull(strip)) {
        if ((status = json_get_bool(config, path, NULL, "strip_accents", &o->strip_accents)))
            goto done;
        strip_given = true;
    }
    if (!strip_given) o->strip_accents = o->lowercase;
    if ((status = config_token(config, "unk_token", &b->unk_token)) ||
        (status = config_token(config, "cls_token", &b->cls_token)) ||
        (status = config_token(config, "sep_token", &b->sep_token)))
        goto done;
    const cJSON *decoder = cJSON_GetObjectItemCaseSensitive(config, "added_tokens_decoder");
    for (const cJSON *item = cJSON_IsObject(decoder) ? decoder->child : NULL; item;
         item = item->next) {
        char *end;
        long id = strtol(item->string, &end, 10);
        char where[96];
        snprintf(where, sizeof where, "added_tokens_decoder[\"%.40s\"]", item->string);
        if (*end != '\0' || id < 0 || id > MAX_TOKEN_ID) {
            status = err_set(EMBEDRAG_ERR_FORMAT, "%s: %s: the key is not a token id", path, where);
            goto done;
        }
        if ((status = parse_added_token(b, item, (int32_t)id, path, where))) goto done;
    }
done:
    cJSON_Delete(config);
    return status;
}

int tok_open(const char *model_dir, tok_tokenizer **out)
{
    if (out) *out = NULL;
    if (!model_dir || !out)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "tok_open: needs a directory and *out");
    char *json_path = NULL, *vocab_path = NULL, *config_path = NULL;
    int status;
    if ((status = file_join(model_dir, "tokenizer.json", &json_path)) ||
        (status = file_join(model_dir, "vocab.txt", &vocab_path)) ||
        (status = file_join(model_dir, "tokenizer_config.json", &config_path)))
        goto free_paths;
    tok_builder b;
    if ((status = tok_builder_init(&b))) goto free_paths;

    bool json_missing;
    if ((status = load_tokenizer_json(&b, json_path, &json_missing))) goto free_builder;
    if (!json_missing) {
        status = tok_builder_finish(&b, json_path, out);
        goto free_builder;
    }
    char *data;
    size_t length;
    status = file_read(vocab_path, MAX_TOKENIZER_FILE_BYTES, &data, &length, NULL);
    if (status) {
        status = err_prefix(status, "%s: no tokenizer.json, and ", model_dir);
        goto free_builder;
    }
    if ((status = load_vocab_lines(&b, data, length)))
        status = err_prefix(status, "%s: ", vocab_path);
    free(data);
    if (!status && !(status = load_tokenizer_config(&b, config_path)) &&
        !(status = add_default_specials(&b)))
        status = tok_builder_finish(&b, vocab_path, out);
free_builder:
    tok_builder_free(&b);
free_paths:
    free(json_path);
    free(vocab_path);
    free(config_path);
    return status;
}

int tok_open_vocab_buffer(const char *vocab, size_t length, const tok_options *options,
                          tok_tokenizer **out)
{
    if (out) *out = NULL;
    if (!vocab || !out)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "tok_open_vocab_buffer: bad arguments");
    if (options && options->max_input_chars_per_word < 0)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                       "tok_open_vocab_buffer: max_input_chars_per_word < 0");
    tok_builder b;
    int status = tok_builder_init(&b);
    if (status) return status;
    if (options) b.tok->options = *options;
    if (!(status = load_vocab_lines(&b, vocab, length)) && !(status = add_default_specials(&b)))
        status = tok_builder_finish(&b, "vocabulary buffer", out);
    tok_builder_free(&b);
    return status;
}

const char *tok_token_text(const tok_tokenizer *tokenizer, int32_t id)
{
    if (!tokenizer || id < 0 || id >= tokenizer->id_count || tokenizer->id_text[id] == TOK_NO_TEXT)
        return NULL;
    return tokenizer->arena + tokenizer->id_text[id];
}

int tok_vocab_size(const tok_tokenizer *tokenizer)
{
    return tokenizer ? tokenizer->id_count : 0;
}

const tok_options *tok_get_options(const tok_tokenizer *tokenizer)
{
    return tokenizer ? &tokenizer->options : NULL;
}

int32_t tok_cls_id(const tok_tokenizer *tokenizer)
{
    return tokenizer ? tokenizer->cls_id : -1;
}

int32_t tok_sep_id(const tok_tokenizer *tokenizer)
{
    return tokenizer ? tokenizer->sep_id : -1;
}

int32_t tok_unk_id(const tok_tokenizer *tokenizer)
{
    return tokenizer ? tokenizer->unk_id : -1;
}
