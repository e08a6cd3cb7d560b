/* libFuzzer target for the server's request bodies: any bytes, parsed as JSON and then by every
 * route's parser, must give either a parsed request whose arrays agree with its counts or a
 * 4xx with a message, never a crash or a leak; and any bytes written as a JSON string must
 * parse back. */
#include "output.h"
#include "request.h"
#include "util/json.h"

#include <cjson/cJSON.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_inputs(const request_inputs *in)
{
    if (in->count == 0) __builtin_trap();
    if (in->texts)
        for (size_t i = 0; i < in->count; i++)
            if (!in->texts[i] || in->lengths[i] == 0) __builtin_trap();
    if (!in->texts)
        for (size_t i = 0; i < in->count; i++)
            if (in->offsets[i + 1] <= in->offsets[i]) __builtin_trap();
}

static void check_error(int status, const request_error *e)
{
    if (status != 0 && (status < 400 || status > 500 || !e->message[0])) __builtin_trap();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    out_buffer b = {0};
    out_json_string(&b, (const char *)data, size);
    out_bytes(&b, "", 1);
    cJSON *echo = b.failed ? NULL : cJSON_Parse(b.data);
    if (!b.failed && !cJSON_IsString(echo)) __builtin_trap();
    cJSON_Delete(echo);
    free(b.data);

    cJSON *root = NULL;
    if (json_parse((const char *)data, size, "the body", &root) != 0) return 0;
    request_error e;
    embeddings_request a;
    int status = request_parse_embeddings(root, &a, &e);
    check_error(status, &e);
    if (!status) check_inputs(&a.inputs);
    request_free_inputs(&a.inputs);
    embed_request t;
    status = request_parse_embed(root, &t, &e);
    check_error(status, &e);
    if (!status) check_inputs(&t.inputs);
    request_free_inputs(&t.inputs);
    tokenize_request k;
    status = request_parse_tokenize(root, &k, &e);
    check_error(status, &e);
    request_free_inputs(&k.inputs);
    search_body s;
    status = request_parse_search(root, &s, &e);
    check_error(status, &e);
    if (!status && (!s.query || s.k < 1 || s.k > REQUEST_MAX_K)) __builtin_trap();
    request_free_search(&s);
    documents_body d;
    status = request_parse_documents(root, &d, &e);
    check_error(status, &e);
    if (!status)
        for (size_t i = 0; i < d.count; i++)
            if (!d.documents[i].id || !d.documents[i].text) __builtin_trap();
    request_free_documents(&d);
    cJSON_Delete(root);
    return 0;
}
