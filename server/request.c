/* Request bodies parsed into plain structs: see request.h. */
#include "request.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

int request_fail(request_error *error, int status, const char *field, const char *format, ...)
{
    error->status = status;
    error->field = field;
    va_list args;
    va_start(args, format);
    vsnprintf(error->message, sizeof error->message, format, args);
    va_end(args);
    return status;
}

static int no_memory(request_error *error)
{
    return request_fail(error, 500, NULL, "out of memory");
}

/* Whether v is a number holding an integer in [min, max]. */
static bool integer_in(const cJSON *v, double min, double max)
{
    return cJSON_IsNumber(v) && v->valuedouble == floor(v->valuedouble) && v->valuedouble >= min &&
           v->valuedouble <= max;
}

/* A token-id sequence: a non-empty array of integers that fit an int32. */
static int append_ids(const cJSON *array, const char *field, int index, request_inputs *in,
                      size_t *used, size_t *capacity, request_error *e)
{
    int n = cJSON_GetArraySize(array);
    if (n == 0)
        return index < 0 ? request_fail(e, 400, field, "%s is an empty list of token ids", field)
                         : request_fail(e, 400, field, "%s[%d] is an empty list of token ids",
                                        field, index);
    if (*used + (size_t)n > *capacity) {
        size_t grown = *capacity ? *capacity : 256;
        while (grown < *used + (size_t)n) grown *= 2;
        int32_t *ids = realloc(in->ids, grown * sizeof *ids);
        if (!ids) return no_memory(e);
        in->ids = ids;
        *capacity = grown;
    }
    int at = 0;
    for (const cJSON *v = array->child; v; v = v->next, at++) {
        if (!integer_in(v, 0, INT32_MAX)) {
            if (index < 0)
                return request_fail(e, 422, field, "%s[%d] is not a token id (an integer >= 0)",
                                    field, at);
            return request_fail(e, 422, field, "%s[%d][%d] is not a token id (an integer >= 0)",
                                field, index, at);
        }
        in->ids[(*used)++] = (int32_t)v->valuedouble;
    }
    return 0;
}

/* `field` holds a string, an array of strings, or (allow_ids) an array of token ids or an
 * array of such arrays. */
static int parse_inputs(const cJSON *v, const char *field, bool allow_ids, request_inputs *in,
                        request_error *e)
{
    memset(in, 0, sizeof *in);
    const char *shape = allow_ids ? "a string, an array of strings, an array of token ids or an "
                                    "array of such arrays"
                                  : "a string or an array of strings";
    if (!v) return request_fail(e, 422, field, "%s is missing: it must be %s", field, shape);
    if (cJSON_IsString(v)) {
        if (!v->valuestring[0]) return request_fail(e, 400, field, "%s is an empty string", field);
        in->count = 1;
        in->single = true;
        in->texts = malloc(sizeof *in->texts);
        in->lengths = malloc(sizeof *in->lengths);
        if (!in->texts || !in->lengths) return no_memory(e);
        in->texts[0] = v->valuestring;
        in->lengths[0] = strlen(v->valuestring);
        return 0;
    }
    if (!cJSON_IsArray(v)) return request_fail(e, 422, field, "%s must be %s", field, shape);
    int n = cJSON_GetArraySize(v);
    if (n == 0) return request_fail(e, 400, field, "%s is an empty array", field);
    const cJSON *first = v->child;
    if (cJSON_IsString(first)) {
        in->count = (size_t)n;
        in->texts = malloc((size_t)n * sizeof *in->texts);
        in->lengths = malloc((size_t)n * sizeof *in->lengths);
        if (!in->texts || !in->lengths) return no_memory(e);
        int i = 0;
        for (const cJSON *item = first; item; item = item->next, i++) {
            if (!cJSON_IsString(item))
                return request_fail(e, 422, field, "%s[%d] is not a string (%s must be %s)", field,
                                    i, field, shape);
            if (!item->valuestring[0])
                return request_fail(e, 400, field, "%s[%d] is an empty string", field, i);
            in->texts[i] = item->valuestring;
            in->lengths[i] = strlen(item->valuestring);
        }
        return 0;
    }
    if (!allow_ids || (!cJSON_IsNumber(first) && !cJSON_IsArray(first)))
        return request_fail(e, 422, field, "%s must be %s", field, shape);
    size_t used = 0, capacity = 0;
    if (cJSON_IsNumber(first)) {
        in->count = 1;
        in->offsets = calloc(2, sizeof *in->offsets);
        if (!in->offsets) return no_memory(e);
        int rc = append_ids(v, field, -1, in, &used, &capacity, e);
        in->offsets[1] = used;
        return rc;
    }
    in->count = (size_t)n;
    in->offsets = calloc((size_t)n + 1, sizeof *in->offsets);
    if (!in->offsets) return no_memory(e);
    int i = 0;
    for (const cJSON *item = first; item; item = item->next, i++) {
        if (!cJSON_IsArray(item))
            return request_fail(e, 422, field, "%s[%d] is not an array of token ids", field, i);
        int rc = append_ids(item, field, i, in, &used, &capacity, e);
        if (rc) return rc;
        in->offsets[i + 1] = used;
    }
    return 0;
}

void request_free_inputs(request_inputs *in)
{
    free(in->texts);
    free(in->lengths);
    free(in->ids);
    free(in->offsets);
    memset(in, 0, sizeof *in);
}

/* Optional typed fields: absent or null leaves the default. */
static int get_bool(const cJSON *root, const char *field, bool *out, request_error *e)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, field);
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsBool(v)) return request_fail(e, 422, field, "%s must be true or false", field);
    *out = cJSON_IsTrue(v);
    return 0;
}

static int get_string(const cJSON *root, const char *field, const char **out, request_error *e)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, field);
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsString(v)) return request_fail(e, 422, field, "%s must be a string", field);
    *out = v->valuestring;
    return 0;
}

static int get_int(const cJSON *root, const char *field, int min, int max, int *out,
                   request_error *e)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, field);
    if (!v || cJSON_IsNull(v)) return 0;
    if (!integer_in(v, min, max))
        return request_fail(e, 422, field, "%s must be an integer from %d to %d", field, min, max);
    *out = (int)v->valuedouble;
    return 0;
}

static int need_object(const cJSON *root, request_error *e)
{
    if (!cJSON_IsObject(root)) return request_fail(e, 422, NULL, "the body must be a JSON object");
    return 0;
}

int request_parse_embeddings(const cJSON *root, embeddings_request *out, request_error *e)
{
    memset(out, 0, sizeof *out);
    int rc = need_object(root, e);
    if (rc) return rc;
    rc = parse_inputs(cJSON_GetObjectItemCaseSensitive(root, "input"), "input", true, &out->inputs,
                      e);
    if (rc) return rc;
    const char *format = NULL;
    if ((rc = get_string(root, "model", &out->model, e)) ||
        (rc = get_string(root, "encoding_format", &format, e)) ||
        (rc = get_int(root, "dimensions", 1, 1 << 20, &out->dimensions, e)))
        return rc;
    if (format && strcmp(format, "float") && strcmp(format, "base64"))
        return request_fail(e, 422, "encoding_format",
                            "encoding_format must be \"float\" or \"base64\" (got \"%.64s\")",
                            format);
    out->base64 = format && !strcmp(format, "base64");
    return 0;
}

int request_parse_embed(const cJSON *root, embed_request *out, request_error *e)
{
    memset(out, 0, sizeof *out);
    out->normalize = true;
    out->truncate = true;
    int rc = need_object(root, e);
    if (rc) return rc;
    rc = parse_inputs(cJSON_GetObjectItemCaseSensitive(root, "inputs"), "inputs", false,
                      &out->inputs, e);
    if (rc) return rc;
    const char *direction = NULL;
    if ((rc = get_bool(root, "normalize", &out->normalize, e)) ||
        (rc = get_bool(root, "truncate", &out->truncate, e)) ||
        (rc = get_string(root, "truncation_direction", &direction, e)) ||
        (rc = get_string(root, "prompt_name", &out->prompt_name, e)) ||
        (rc = get_int(root, "dimensions", 1, 1 << 20, &out->dimensions, e)))
        return rc;
    if (direction && strcasecmp(direction, "right") && strcasecmp(direction, "left"))
        return request_fail(e, 422, "truncation_direction",
                            "truncation_direction must be \"Right\" or \"Left\" (got \"%.64s\")",
                            direction);
    out->truncate_left = direction && !strcasecmp(direction, "left");
    return 0;
}

int request_parse_tokenize(const cJSON *root, tokenize_request *out, request_error *e)
{
    memset(out, 0, sizeof *out);
    out->add_special_tokens = true;
    int rc = need_object(root, e);
    if (rc) return rc;
    rc = parse_inputs(cJSON_GetObjectItemCaseSensitive(root, "inputs"), "inputs", false,
                      &out->inputs, e);
    if (rc) return rc;
    if ((rc = get_bool(root, "add_special_tokens", &out->add_special_tokens, e)) ||
        (rc = get_string(root, "prompt_name", &out->prompt_name, e)))
        return rc;
    return 0;
}

int request_parse_search(const cJSON *root, search_body *out, request_error *e)
{
    memset(out, 0, sizeof *out);
    out->k = 10;
    out->mode = EMBEDRAG_SEARCH_DENSE;
    int rc = need_object(root, e);
    if (rc) return rc;
    const cJSON *query = cJSON_GetObjectItemCaseSensitive(root, "query");
    if (!query) return request_fail(e, 422, "query", "query is missing: it must be a string");
    if (!cJSON_IsString(query)) return request_fail(e, 422, "query", "query must be a string");
    if (!query->valuestring[0]) return request_fail(e, 400, "query", "query is an empty string");
    out->query = query->valuestring;
    const char *mode = NULL;
    if ((rc = get_int(root, "k", 1, REQUEST_MAX_K, &out->k, e)) ||
        (rc = get_string(root, "mode", &mode, e)) ||
        (rc = get_string(root, "path", &out->path, e)) ||
        (rc = get_bool(root, "exact", &out->exact, e)))
        return rc;
    if (mode) {
        if (!strcmp(mode, "dense"))
            out->mode = EMBEDRAG_SEARCH_DENSE;
        else if (!strcmp(mode, "bm25"))
            out->mode = EMBEDRAG_SEARCH_BM25;
        else if (!strcmp(mode, "hybrid"))
            out->mode = EMBEDRAG_SEARCH_HYBRID;
        else
            return request_fail(e, 422, "mode",
                                "mode must be \"dense\", \"bm25\" or \"hybrid\" (got \"%.64s\")",
                                mode);
    }
    const cJSON *where = cJSON_GetObjectItemCaseSensitive(root, "where");
    if (where && !cJSON_IsNull(where)) {
        if (!cJSON_IsObject(where))
            return request_fail(e, 422, "where",
                                "where must be an object of metadata fields and values");
        for (const cJSON *v = where->child; v; v = v->next) {
            if (out->filters == REQUEST_MAX_FILTERS)
                return request_fail(e, 422, "where", "where holds more than %d fields",
                                    REQUEST_MAX_FILTERS);
            char *value = NULL;
            if (cJSON_IsString(v))
                value = strdup(v->valuestring);
            else if (cJSON_IsNumber(v) || cJSON_IsBool(v))
                value = cJSON_PrintUnformatted(v);
            else
                return request_fail(e, 422, "where",
                                    "where.%.64s must be a string, a number or a boolean",
                                    v->string ? v->string : "?");
            if (!value) return no_memory(e);
            out->keys[out->filters] = v->string ? v->string : "";
            out->values[out->filters++] = value;
        }
    }
    return 0;
}

void request_free_search(search_body *body)
{
    /* Numbers are printed by cJSON, strings copied with strdup: both free with free(), as
     * cJSON's default hooks are malloc and free. */
    for (int i = 0; i < body->filters; i++) free(body->values[i]);
    body->filters = 0;
}

static int parse_document(const cJSON *d, const char *where, embedrag_document *out,
                          char **metadata, request_error *e)
{
    if (!cJSON_IsObject(d)) return request_fail(e, 422, "documents", "%s must be an object", where);
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(d, "id");
    const cJSON *text = cJSON_GetObjectItemCaseSensitive(d, "text");
    if (!cJSON_IsString(id) || !id->valuestring[0])
        return request_fail(e, 422, "id", "%s.id must be a non-empty string", where);
    if (!cJSON_IsString(text))
        return request_fail(e, 422, "text", "%s.text must be a string", where);
    out->id = id->valuestring;
    out->text = text->valuestring;
    out->length = strlen(text->valuestring);
    int rc;
    if ((rc = get_string(d, "title", &out->title, e)) ||
        (rc = get_string(d, "source", &out->source, e)))
        return rc;
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(d, "metadata");
    if (m && !cJSON_IsNull(m)) {
        if (!cJSON_IsObject(m))
            return request_fail(e, 422, "metadata", "%s.metadata must be an object", where);
        if (!(*metadata = cJSON_PrintUnformatted(m))) return no_memory(e);
        out->metadata = *metadata;
    }
    return 0;
}

int request_parse_documents(const cJSON *root, documents_body *out, request_error *e)
{
    memset(out, 0, sizeof *out);
    int rc = need_object(root, e);
    if (rc) return rc;
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(root, "documents");
    size_t n = 1;
    if (list) {
        if (!cJSON_IsArray(list))
            return request_fail(e, 422, "documents", "documents must be an array of documents");
        n = (size_t)cJSON_GetArraySize(list);
        if (n == 0) return request_fail(e, 400, "documents", "documents is an empty array");
    }
    out->documents = calloc(n, sizeof *out->documents);
    out->metadata = calloc(n, sizeof *out->metadata);
    if (!out->documents || !out->metadata) return no_memory(e);
    out->count = n;
    if (!list) return parse_document(root, "the document", out->documents, out->metadata, e);
    size_t i = 0;
    for (const cJSON *d = list->child; d; d = d->next, i++) {
        char where[48];
        snprintf(where, sizeof where, "documents[%zu]", i);
        rc = parse_document(d, where, &out->documents[i], &out->metadata[i], e);
        if (rc) return rc;
    }
    return 0;
}

void request_free_documents(documents_body *body)
{
    for (size_t i = 0; body->metadata && i < body->count; i++) free(body->metadata[i]);
    free(body->metadata);
    free(body->documents);
    memset(body, 0, sizeof *body);
}
