/* Request bodies of the server's routes, parsed from JSON into plain structs before any work:
 * every check of shape and type is here, so that a bad body gets its 4xx naming the field, and
 * so that the fuzz target can drive all of it without a model. Strings point into the cJSON
 * tree, which must outlive the struct. */
#ifndef EMBEDRAG_SERVER_REQUEST_H
#define EMBEDRAG_SERVER_REQUEST_H

#include "embedrag.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct cJSON;

/* Why a body was refused: the HTTP status (400 empty input, 413 too large, 422 wrong shape),
 * the field at fault (or NULL) and a sentence naming it. */
typedef struct request_error {
    int status;
    const char *field;
    char message[512];
} request_error;

/* The texts, or the token-id sequences, of one request. */
typedef struct request_inputs {
    size_t count;
    const char **texts; /* count entries, or NULL when the inputs are token ids */
    size_t *lengths;
    int32_t *ids;    /* token ids of every sequence, end to end, or NULL */
    size_t *offsets; /* count + 1 entries: sequence i is ids[offsets[i] .. offsets[i + 1]) */
    bool single;     /* the input was one string (not an array) */
} request_inputs;

/* POST /v1/embeddings (OpenAI). */
typedef struct embeddings_request {
    request_inputs inputs;
    const char *model; /* or NULL */
    bool base64;
    int dimensions; /* 0: all */
} embeddings_request;

/* POST /embed (TEI). */
typedef struct embed_request {
    request_inputs inputs;
    bool normalize, truncate, truncate_left;
    const char *prompt_name; /* or NULL */
    int dimensions;
} embed_request;

/* POST /tokenize (TEI). */
typedef struct tokenize_request {
    request_inputs inputs;
    bool add_special_tokens;
    const char *prompt_name;
} tokenize_request;

/* POST /search. */
#define REQUEST_MAX_K 1000
#define REQUEST_MAX_FILTERS 32
typedef struct search_body {
    const char *query;
    int k;
    embedrag_search_mode mode;
    const char *path; /* a glob over sources, or NULL */
    const char *keys[REQUEST_MAX_FILTERS];
    char *values[REQUEST_MAX_FILTERS]; /* malloc'd (a number's JSON text) */
    int filters;
    bool exact;
} search_body;

/* POST /documents: one document, or {"documents": [...]}. */
typedef struct documents_body {
    size_t count;
    embedrag_document *documents;
    char **metadata; /* count entries: each document's metadata printed back to text, or NULL */
} documents_body;

/* Each parser fills *out and returns 0, or fills *error and returns its status; out is freed
 * with request_free_* in both cases. `root` is the body's parsed JSON. */
int request_parse_embeddings(const struct cJSON *root, embeddings_request *out,
                             request_error *error);
int request_parse_embed(const struct cJSON *root, embed_request *out, request_error *error);
int request_parse_tokenize(const struct cJSON *root, tokenize_request *out, request_error *error);
int request_parse_search(const struct cJSON *root, search_body *out, request_error *error);
int request_parse_documents(const struct cJSON *root, documents_body *out, request_error *error);

void request_free_inputs(request_inputs *inputs);
void request_free_search(search_body *body);
void request_free_documents(documents_body *body);

/* Fills *error (status, field, printf-style message) and returns the status. */
int request_fail(request_error *error, int status, const char *field, const char *format, ...)
    __attribute__((format(printf, 4, 5)));

#endif
