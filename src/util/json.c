/* JSON parsing and typed field access over cJSON, shared by the config, safetensors and tokenizer
 * loaders so that a malformed file is reported the same way everywhere: the file, where in it,
 * and which field holds what instead of what was expected. */
#include "util/json.h"

#include "util/error.h"
#include "util/file.h"

#include "embedrag.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Enough of a value to recognize it in a message. */
#define JSON_QUOTED_VALUE_BYTES 64
/* "added_tokens_decoder[\"...\"].single_word" with the key cut to 40 bytes fits. */
#define JSON_FIELD_NAME_BYTES 160

/* Line and column (both from 1; the column counts characters, not bytes) of byte `offset`. */
static void json_position(const char *text, size_t offset, size_t *line, size_t *column)
{
    *line = 1;
    *column = 1;
    for (size_t i = 0; i < offset; i++) {
        if (text[i] == '\n') {
            ++*line;
            *column = 1;
        } else if (((unsigned char)text[i] & 0xC0) != 0x80) {
            ++*column;
        }
    }
}

/* json_parse on text known to have a NUL at text[length], which cJSON may read up to. */
static int json_parse_terminated(const char *text, size_t length, const char *source, cJSON **out)
{
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, length, &end, false);
    size_t offset = end && end >= text && end <= text + length ? (size_t)(end - text) : 0;
    const char *problem = NULL;
    if (!root) {
        problem = "not valid JSON";
    } else {
        while (offset < length && (text[offset] == ' ' || text[offset] == '\t' ||
                                   text[offset] == '\n' || text[offset] == '\r'))
            offset++;
        if (offset < length) problem = "extra text after the JSON value";
    }
    if (problem) {
        cJSON_Delete(root);
        size_t line, column;
        json_position(text, offset, &line, &column);
        return err_set(EMBEDRAG_ERR_FORMAT, "%s: %s at line %zu, column %zu (byte %zu of %zu)",
                       source, problem, line, column, offset, length);
    }
    *out = root;
    return 0;
}

int json_parse(const char *text, size_t length, const char *source, cJSON **out)
{
    *out = NULL;
    /* A terminated copy keeps cJSON inside our buffer whatever the caller passed (the fuzz
     * targets pass raw bytes, the safetensors header is followed by tensor data). */
    char *copy = malloc(length + 1);
    if (!copy) return err_set(EMBEDRAG_ERR_NO_MEMORY, "%s: out of memory for its JSON", source);
    memcpy(copy, text, length);
    copy[length] = '\0';
    int rc = json_parse_terminated(copy, length, source, out);
    free(copy);
    return rc;
}

int json_read_file(const char *path, size_t max_bytes, bool *missing, cJSON **out)
{
    *out = NULL;
    char *text;
    size_t length;
    int rc = file_read(path, max_bytes, &text, &length, missing);
    if (rc || !text) return rc;
    rc = json_parse_terminated(text, length, path, out);
    free(text);
    return rc;
}

bool json_integer(const cJSON *item, int64_t min, int64_t max, int64_t *out)
{
    if (!cJSON_IsNumber(item)) return false;
    if (min < -JSON_MAX_EXACT_INTEGER) min = -JSON_MAX_EXACT_INTEGER;
    if (max > JSON_MAX_EXACT_INTEGER) max = JSON_MAX_EXACT_INTEGER;
    double value = item->valuedouble;
    /* Inside the clamped bounds the conversion is exact, so a fraction shows as a difference. */
    if (!(value >= (double)min && value <= (double)max) || value != (double)(int64_t)value)
        return false;
    *out = (int64_t)value;
    return true;
}

/* "parent.field", or "field" at the top level, for messages. */
static const char *json_field_name(const char *parent, const char *field, char *buffer, size_t size)
{
    snprintf(buffer, size, "%s%s%s", parent ? parent : "", parent ? "." : "", field);
    return buffer;
}

/* Member `field` of `object`, or NULL when it is absent or null. */
static const cJSON *json_member(const cJSON *object, const char *field)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(object, field);
    return cJSON_IsNull(item) ? NULL : item;
}

/* The message for a member that holds the wrong kind of value. */
static int json_wrong_value(const cJSON *item, const char *source, const char *parent,
                            const char *field, const char *expected)
{
    char name[JSON_FIELD_NAME_BYTES], value[JSON_QUOTED_VALUE_BYTES];
    return err_set(EMBEDRAG_ERR_FORMAT, "%s: %s is %s, expected %s", source,
                   json_field_name(parent, field, name, sizeof name),
                   json_value_text(item, value, sizeof value), expected);
}

int json_get_int(const cJSON *object, const char *source, const char *parent, const char *field,
                 bool required, int min, int max, int *out)
{
    const cJSON *item = json_member(object, field);
    if (!item) {
        if (!required) return 0;
        char name[JSON_FIELD_NAME_BYTES];
        return err_set(EMBEDRAG_ERR_FORMAT, "%s: required field %s is missing", source,
                       json_field_name(parent, field, name, sizeof name));
    }
    int64_t value;
    if (!json_integer(item, min, max, &value)) {
        char expected[64];
        snprintf(expected, sizeof expected, "an integer from %d to %d", min, max);
        return json_wrong_value(item, source, parent, field, expected);
    }
    *out = (int)value;
    return 0;
}

int json_get_bool(const cJSON *object, const char *source, const char *parent, const char *field,
                  bool *out)
{
    const cJSON *item = json_member(object, field);
    if (!item) return 0;
    if (!cJSON_IsBool(item)) return json_wrong_value(item, source, parent, field, "true or false");
    *out = cJSON_IsTrue(item);
    return 0;
}

int json_get_string(const cJSON *object, const char *source, const char *parent, const char *field,
                    const char **out)
{
    *out = NULL;
    const cJSON *item = json_member(object, field);
    if (!item) return 0;
    if (!cJSON_IsString(item)) return json_wrong_value(item, source, parent, field, "a string");
    *out = item->valuestring;
    return 0;
}

const char *json_value_text(const cJSON *item, char *buffer, size_t size)
{
    char *text = cJSON_PrintUnformatted(item);
    snprintf(buffer, size, "%s", text ? text : "?");
    free(text);
    return buffer;
}
