/* JSON helpers over cJSON for the files embedrag reads (config.json and the sentence-transformers
 * files, tokenizer.json, the safetensors header): parsing with a message that points at the
 * error, and typed getters whose messages name the file and the field. Callers that walk items
 * include <cjson/cJSON.h> themselves; this header only forward-declares the item type. */
#ifndef EMBEDRAG_UTIL_JSON_H
#define EMBEDRAG_UTIL_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct cJSON;

/* JSON numbers arrive as doubles; integers beyond 2^53 are no longer exact, so no getter
 * accepts a bound past it. */
#define JSON_MAX_EXACT_INTEGER ((int64_t)1 << 53)

/* Parses `length` bytes of text (NUL not needed) that must hold one JSON value, optionally
 * followed by whitespace. `source` names the text in messages (a path, or "x.safetensors
 * header"). On success *out is a tree the caller frees with cJSON_Delete; on failure *out is NULL
 * and the result EMBEDRAG_ERR_FORMAT, with a message giving the line, column and byte offset of
 * the error or of the extra text. */
int json_parse(const char *text, size_t length, const char *source, struct cJSON **out);

/* Reads the file at `path` (at most `max_bytes`, see file_read) and parses it as json_parse
 * does, naming the path in messages. With `missing` not NULL an absent file sets *missing, leaves
 * *out NULL and returns 0. */
int json_read_file(const char *path, size_t max_bytes, bool *missing, struct cJSON **out);

/* Whether `item` is a number holding an exact integer in [min, max] (bounds are clamped to
 * +-JSON_MAX_EXACT_INTEGER); if so it is stored in *out. For callers with their own message. */
bool json_integer(const struct cJSON *item, int64_t min, int64_t max, int64_t *out);

/* Typed members of `object`. `source` names the file and `parent` (NULL at the top level) the
 * object inside it, so that messages read "tokenizer.json: normalizer.lowercase is 1, expected
 * true or false". A member that is absent or null leaves *out unchanged (json_get_string sets it
 * to NULL) unless `required`; a member of the wrong type or out of range is EMBEDRAG_ERR_FORMAT
 * and quotes the value. json_get_string's *out points into `object`'s tree. */
int json_get_int(const struct cJSON *object, const char *source, const char *parent,
                 const char *field, bool required, int min, int max, int *out);
int json_get_bool(const struct cJSON *object, const char *source, const char *parent,
                  const char *field, bool *out);
int json_get_string(const struct cJSON *object, const char *source, const char *parent,
                    const char *field, const char **out);

/* Renders `item` compactly ("[1,2]", "\"gelu\"", "null") into `buffer` for an error message,
 * cut to fit `size` bytes; returns `buffer`. */
const char *json_value_text(const struct cJSON *item, char *buffer, size_t size);

#endif
