/* The server's parts that need no HTTP and no model: floats written with 9 digits read back to
 * the same float (every exponent, random values, edge cases), base64 against RFC 4648's
 * vectors, JSON strings that stay valid for any bytes, and the request parsers' answers (status
 * and field) for good and bad bodies. */
#include "check.h"
#include "output.h"
#include "request.h"
#include "util/json.h"

#include <cjson/cJSON.h>
#include <float.h>

static char *text_of(out_buffer *b)
{
    out_bytes(b, "", 1);
    return b->data;
}

static void check_float_round_trip(float x)
{
    out_buffer b = {0};
    out_json_float(&b, x);
    char *text = text_of(&b);
    float back = strtof(text, NULL);
    CHECK(memcmp(&back, &x, sizeof x) == 0 || (x == 0 && back == 0), "%.9g written as %s",
          (double)x, text);
    /* JSON numbers: no leading '+', no bare '.', digits after '.' */
    CHECK(text[0] == '-' || (text[0] >= '0' && text[0] <= '9'), "%s starts badly", text);
    CHECK(strlen(text) <= 16, "%s is longer than needed", text);
    free(b.data);
}

static void test_floats(void)
{
    const float edges[] = {0.0f,         -0.0f,          1.0f,           -1.0f,       0.1f,
                           1e-45f,       FLT_MIN,        FLT_MAX,        -FLT_MAX,    123456789.0f,
                           0.000123457f, 9.99999944e-6f, 1e9f,           99999999.0f, 0.5f,
                           16777216.0f,  3.40282347e38f, 1.17549435e-38f};
    for (size_t i = 0; i < sizeof edges / sizeof *edges; i++) check_float_round_trip(edges[i]);
    /* Every binade, several mantissas each, and a million random unit-vector components. */
    for (int e = 0; e < 255; e++)
        for (uint32_t m = 0; m < 64; m++) {
            uint32_t bits = (uint32_t)e << 23 | (m * 131071u & 0x7fffffu);
            float x;
            memcpy(&x, &bits, sizeof x);
            check_float_round_trip(x);
        }
    int failures = check_failures;
    for (int i = 0; i < 1000000 && check_failures == failures; i++) {
        uint32_t bits = (uint32_t)check_random();
        float x;
        memcpy(&x, &bits, sizeof x);
        if (isfinite(x)) check_float_round_trip(x);
        check_float_round_trip(check_uniform() * 0.2f);
    }
    out_buffer b = {0};
    out_json_float(&b, NAN);
    out_json_float(&b, INFINITY);
    CHECK(!strcmp(text_of(&b), "nullnull"), "non-finite floats are null: %s", b.data);
    free(b.data);
    b = (out_buffer){0};
    const float v[3] = {0.25f, -2.0f, 1e-7f};
    out_json_floats(&b, v, 3);
    CHECK(!strcmp(text_of(&b), "[0.25,-2,1.00000001e-7]"), "array: %s", b.data);
    free(b.data);
}

static void test_base64(void)
{
    /* RFC 4648, section 10. */
    const char *const plain[] = {"", "f", "fo", "foo", "foob", "fooba", "foobar"};
    const char *const coded[] = {"", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy"};
    for (int i = 0; i < 7; i++) {
        out_buffer b = {0};
        out_base64(&b, plain[i], strlen(plain[i]));
        CHECK(!strcmp(text_of(&b), coded[i]), "base64(%s) = %s", plain[i], b.data);
        free(b.data);
    }
    out_buffer b = {0};
    const unsigned char high[3] = {0xff, 0xfe, 0xfd};
    out_base64(&b, high, 3);
    CHECK(!strcmp(text_of(&b), "//79"), "high bytes: %s", b.data);
    free(b.data);
}

static void test_strings(void)
{
    out_buffer b = {0};
    out_json_string(&b, "a\"b\\c\n\x01\xc3\xa9\xff", 10);
    CHECK(!strcmp(text_of(&b), "\"a\\\"b\\\\c\\n\\u0001\xc3\xa9\xef\xbf\xbd\""), "escaped: %s",
          b.data);
    free(b.data);
    /* Any bytes give JSON that cJSON parses, with the valid UTF-8 kept. */
    for (int round = 0; round < 2000; round++) {
        char bytes[40];
        size_t n = check_random() % sizeof bytes;
        for (size_t i = 0; i < n; i++) bytes[i] = (char)check_random();
        b = (out_buffer){0};
        out_json_string(&b, bytes, n);
        out_bytes(&b, "", 1);
        cJSON *parsed = cJSON_Parse(b.data);
        CHECK(cJSON_IsString(parsed), "unparseable: %s", b.data);
        cJSON_Delete(parsed);
        free(b.data);
    }
    b = (out_buffer){0};
    out_json_cstring(&b, NULL);
    CHECK(!strcmp(text_of(&b), "null"), "NULL is null");
    free(b.data);
}

/* Parses body with parser and checks the status (and the field named, when expected). */
#define EXPECT(parser, type, freer, body, status_wanted, field_wanted)                             \
    do {                                                                                           \
        cJSON *root = cJSON_Parse(body);                                                           \
        type parsed;                                                                               \
        request_error e = {0};                                                                     \
        int got = parser(root, &parsed, &e);                                                       \
        CHECK(got == (status_wanted), "%s: status %d, wanted %d (%s)", body, got, status_wanted,   \
              e.message);                                                                          \
        if (field_wanted)                                                                          \
            CHECK(e.field && !strcmp(e.field, field_wanted ? field_wanted : ""), "%s: field %s",   \
                  body, e.field ? e.field : "(none)");                                             \
        if (got) CHECK(e.message[0] != '\0', "%s: no message", body);                              \
        freer(&parsed);                                                                            \
        cJSON_Delete(root);                                                                        \
    } while (0)

static void free_embeddings(embeddings_request *r)
{
    request_free_inputs(&r->inputs);
}
static void free_embed(embed_request *r)
{
    request_free_inputs(&r->inputs);
}

static void test_requests(void)
{
    const char *none = NULL;
    EXPECT(request_parse_embeddings, embeddings_request, free_embeddings, "{\"input\": \"hi\"}", 0,
           none);
    EXPECT(request_parse_embeddings, embeddings_request, free_embeddings, "{\"input\": 5}", 422,
           "input");
    EXPECT(request_parse_embeddings, embeddings_request, free_embeddings, "{\"input\": \"\"}", 400,
           "input");
    EXPECT(request_parse_embeddings, embeddings_request, free_embeddings, "{\"input\": []}", 400,
           "input");
    EXPECT(request_parse_embeddings, embeddings_request, free_embeddings, "{\"input\": [[]]}", 400,
           "input");
    EXPECT(request_parse_embeddings, embeddings_request, free_embeddings, "{\"input\": [\"a\", 3]}",
           422, "input");
    EXPECT(request_parse_embeddings, embeddings_request, free_embeddings,
           "{\"input\": [101, -1, 102]}", 422, "input");
    EXPECT(request_parse_embeddings, embeddings_request, free_embeddings, "{\"input\": [101, 1.5]}",
           422, "input");
    EXPECT(request_parse_embeddings, embeddings_request, free_embeddings,
           "{\"input\": \"a\", \"encoding_format\": \"hex\"}", 422, "encoding_format");
    EXPECT(request_parse_embeddings, embeddings_request, free_embeddings,
           "{\"input\": \"a\", \"dimensions\": 0}", 422, "dimensions");
    EXPECT(request_parse_embeddings, embeddings_request, free_embeddings,
           "{\"input\": \"a\", \"model\": 7}", 422, "model");
    EXPECT(request_parse_embeddings, embeddings_request, free_embeddings, "[1, 2]", 422, none);
    EXPECT(request_parse_embed, embed_request, free_embed,
           "{\"inputs\": [\"a\"], \"truncation_direction\": \"up\"}", 422, "truncation_direction");
    EXPECT(request_parse_embed, embed_request, free_embed, "{\"inputs\": [1, 2]}", 422, "inputs");
    EXPECT(request_parse_embed, embed_request, free_embed,
           "{\"inputs\": \"a\", \"normalize\": \"yes\"}", 422, "normalize");
    EXPECT(request_parse_search, search_body, request_free_search, "{\"query\": \"q\", \"k\": 0}",
           422, "k");
    EXPECT(request_parse_search, search_body, request_free_search,
           "{\"query\": \"q\", \"mode\": \"fuzzy\"}", 422, "mode");
    EXPECT(request_parse_search, search_body, request_free_search,
           "{\"query\": \"q\", \"where\": {\"a\": [1]}}", 422, "where");
    EXPECT(request_parse_search, search_body, request_free_search, "{\"k\": 3}", 422, "query");
    EXPECT(request_parse_documents, documents_body, request_free_documents,
           "{\"documents\": [{\"id\": \"a\", \"text\": \"t\"}, {\"id\": \"b\"}]}", 422, "text");
    EXPECT(request_parse_documents, documents_body, request_free_documents,
           "{\"id\": \"a\", \"text\": \"t\", \"metadata\": [1]}", 422, "metadata");
    EXPECT(request_parse_documents, documents_body, request_free_documents, "{\"documents\": []}",
           400, "documents");

    /* What a good body becomes. */
    cJSON *root = cJSON_Parse("{\"input\": [[101, 7592, 102], [101, 102]], \"dimensions\": 64,"
                              " \"encoding_format\": \"base64\"}");
    embeddings_request r;
    request_error e;
    CHECK(request_parse_embeddings(root, &r, &e) == 0, "token ids: %s", e.message);
    CHECK(r.inputs.count == 2 && !r.inputs.texts && r.inputs.offsets[1] == 3 &&
              r.inputs.offsets[2] == 5 && r.inputs.ids[1] == 7592 && r.base64 && r.dimensions == 64,
          "token ids parsed");
    free_embeddings(&r);
    cJSON_Delete(root);
    root = cJSON_Parse("{\"query\": \"q\", \"where\": {\"lang\": \"en\", \"year\": 2021,"
                       " \"open\": true}, \"mode\": \"hybrid\", \"k\": 3}");
    search_body s;
    CHECK(request_parse_search(root, &s, &e) == 0, "search: %s", e.message);
    CHECK(s.filters == 3 && !strcmp(s.values[0], "en") && !strcmp(s.values[1], "2021") &&
              !strcmp(s.values[2], "true") && s.mode == EMBEDRAG_SEARCH_HYBRID && s.k == 3,
          "filters parsed");
    request_free_search(&s);
    cJSON_Delete(root);
}

int main(void)
{
    test_floats();
    test_base64();
    test_strings();
    test_requests();
    return check_finish("test_server_parts");
}
