/* Tokenizer tests: exact parity with Hugging Face `tokenizers` on the generated fixtures (ids of
 * >= 10,000 strings under five configurations, and the normalized form and class of every code
 * point), plus behaviour tests for truncation, invalid UTF-8, NUL bytes, huge inputs, prefixes
 * and loading errors. Fixtures: python3 tests/fixtures/make_tokenizer_fixtures.py */
#include "check.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MODEL_DIR "models/all-MiniLM-L6-v2"
#define PARITY_FIXTURE "tests/fixtures/generated/tokenizer_parity.jsonl"
#define UNICODE_FIXTURE "tests/fixtures/generated/tokenizer_unicode.txt"
#define GENERATOR "python3 tests/fixtures/make_tokenizer_fixtures.py"
/* Mismatches printed in full per configuration; the rest are only counted. */
#define MISMATCHES_SHOWN 5
#define MAX_CONFIGS 8
/* all-MiniLM-L6-v2's ids for the special tokens. */
#define MINILM_UNK 100
#define MINILM_CLS 101
#define MINILM_SEP 102
#define MINILM_VOCAB 30522
/* The huge-input test's size: a 10 MB line. */
#define HUGE_BYTES (10u * 1000u * 1000u)
#define UNICODE_LIMIT 0x110000u
/* Code points normalized per tok_normalize call in the per code point test. */
#define SWEEP_CHUNK 4096

static char *path_in_source(const char *relative)
{
    const char *root = check_source_dir();
    size_t n = strlen(root) + strlen(relative) + 2;
    char *p = malloc(n);
    snprintf(p, n, "%s/%s", root, relative);
    return p;
}

static char *read_whole(const char *path, size_t *length)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t capacity = 1 << 20, n = 0;
    char *data = malloc(capacity);
    size_t got;
    while ((got = fread(data + n, 1, capacity - n - 1, f)) > 0) {
        n += got;
        if (capacity - n < 2) {
            capacity *= 2;
            data = realloc(data, capacity);
        }
    }
    fclose(f);
    data[n] = '\0';
    if (length) *length = n;
    return data;
}

/* Prints bytes with everything outside printable ASCII escaped. */
static void print_escaped(FILE *out, const char *s, size_t n)
{
    fputc('"', out);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c < 0x7F && c != '"' && c != '\\')
            fputc(c, out);
        else
            fprintf(out, "\\x%02X", c);
    }
    fputc('"', out);
}

static void print_ids(FILE *out, const char *label, const int32_t *ids, int n)
{
    fprintf(out, "    %s (%d):", label, n);
    for (int i = 0; i < n; i++) fprintf(out, " %d", ids[i]);
    fputc('\n', out);
}

static size_t hex_decode(const char *hex, char *out)
{
    size_t n = strlen(hex) / 2;
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        sscanf(hex + 2 * i, "%2x", &v);
        out[i] = (char)v;
    }
    out[n] = '\0';
    return n;
}

static int json_ids(const cJSON *array, int32_t *out, int capacity)
{
    int n = 0;
    for (const cJSON *item = array ? array->child : NULL; item && n < capacity; item = item->next)
        out[n++] = (int32_t)item->valuedouble;
    return n;
}

static bool same_ids(const int32_t *a, int na, const int32_t *b, int nb)
{
    return na == nb && memcmp(a, b, (size_t)na * sizeof *a) == 0;
}

/* ------------------------------------------------------------------------------------------ */

static tok_tokenizer *open_model(void)
{
    char *dir = path_in_source(MODEL_DIR);
    tok_tokenizer *t = NULL;
    int status = tok_open(dir, &t);
    CHECK(status == 0 && t, "tok_open(%s): %s (run scripts/fetch-models.sh)", dir, err_get());
    free(dir);
    return t;
}

/* Encodes with room for everything and returns the count (or the negative status). */
static int encode_all(const tok_tokenizer *t, const char *prefix, const char *text, size_t len,
                      int32_t **ids)
{
    int capacity = (int)(len + (prefix ? strlen(prefix) : 0)) * 3 + 8;
    *ids = malloc((size_t)capacity * sizeof **ids);
    int untruncated = -1;
    int n = tok_encode(t, prefix, text, len, *ids, capacity, &untruncated);
    if (n >= 0) CHECK(untruncated == n, "untruncated %d != %d without truncation", untruncated, n);
    return n;
}

static void test_parity(void)
{
    char *path = path_in_source(PARITY_FIXTURE);
    size_t length;
    char *data = read_whole(path, &length);
    CHECK(data != NULL, "%s is missing: generate it with `%s` (needs pip install tokenizers)", path,
          GENERATOR);
    if (!data) {
        free(path);
        return;
    }
    char *line = data, *next;
    next = strchr(line, '\n');
    if (next) *next++ = '\0';
    cJSON *header = cJSON_Parse(line);
    const cJSON *configs = cJSON_GetObjectItemCaseSensitive(header, "configs");
    CHECK(cJSON_IsObject(configs), "%s: first line has no configs", path);
    const cJSON *version = cJSON_GetObjectItemCaseSensitive(header, "tokenizers");
    printf("parity: reference is Hugging Face tokenizers %s\n",
           cJSON_IsString(version) ? version->valuestring : "?");

    const char *names[MAX_CONFIGS];
    tok_tokenizer *toks[MAX_CONFIGS] = {0};
    long mismatches[MAX_CONFIGS] = {0};
    int config_count = 0;
    for (const cJSON *c = configs ? configs->child : NULL; c && config_count < MAX_CONFIGS;
         c = c->next) {
        char *dir = path_in_source(c->valuestring);
        names[config_count] = c->string;
        int status = tok_open(dir, &toks[config_count]);
        CHECK(status == 0, "config %s: tok_open(%s): %s", c->string, dir, err_get());
        free(dir);
        config_count++;
    }
    long strings = 0, truncation_mismatches = 0, prefix_mismatches = 0;
    int32_t *expected = malloc(1 << 22);
    char *text = malloc(length / 2 + 1), *prefix = malloc(length / 2 + 1);
    for (line = next; line && *line; line = next) {
        next = strchr(line, '\n');
        if (next) *next++ = '\0';
        cJSON *row = cJSON_Parse(line);
        if (!row) {
            CHECK(false, "%s: bad line %ld", path, strings + 2);
            continue;
        }
        strings++;
        size_t text_length = hex_decode(cJSON_GetObjectItem(row, "text")->valuestring, text);
        const cJSON *prefix_item = cJSON_GetObjectItem(row, "prefix");
        if (prefix_item) hex_decode(prefix_item->valuestring, prefix);
        const char *prefix_arg = prefix_item ? prefix : NULL;
        const cJSON *ids = cJSON_GetObjectItem(row, "ids");
        for (int k = 0; k < config_count; k++) {
            if (!toks[k]) continue;
            int want = json_ids(cJSON_GetObjectItem(ids, names[k]), expected, 1 << 20);
            int32_t *got;
            int n = encode_all(toks[k], prefix_arg, text, text_length, &got);
            if (!same_ids(got, n, expected, want)) {
                if (mismatches[k]++ < MISMATCHES_SHOWN) {
                    fprintf(stderr, "parity mismatch, config %s, line %ld: prefix ", names[k],
                            strings + 1);
                    print_escaped(stderr, prefix_arg ? prefix : "",
                                  prefix_arg ? strlen(prefix) : 0);
                    fprintf(stderr, " text ");
                    print_escaped(stderr, text, text_length);
                    fputc('\n', stderr);
                    print_ids(stderr, "reference", expected, want);
                    if (n < 0)
                        fprintf(stderr, "    ours: error %d: %s\n", n, err_get());
                    else
                        print_ids(stderr, "ours", got, n);
                }
            }
            free(got);
        }
        /* The prefix is the same as gluing it to the text. */
        if (prefix_item && toks[0]) {
            size_t pl = strlen(prefix);
            char *joined = malloc(pl + text_length + 1);
            memcpy(joined, prefix, pl);
            memcpy(joined + pl, text, text_length);
            int32_t *a, *b;
            int na = encode_all(toks[0], prefix, text, text_length, &a);
            int nb = encode_all(toks[0], NULL, joined, pl + text_length, &b);
            if (!same_ids(a, na, b, nb)) prefix_mismatches++;
            free(a);
            free(b);
            free(joined);
        }
        /* Truncation on the first (uncased) configuration, with and without the count. */
        const cJSON *trunc = cJSON_GetObjectItem(row, "trunc");
        if (trunc && toks[0]) {
            int limit = cJSON_GetArrayItem(trunc, 0)->valueint;
            int want = json_ids(cJSON_GetArrayItem(trunc, 1), expected, 1 << 20);
            int32_t got[256];
            int untruncated = -1;
            int n1 = tok_encode(toks[0], prefix_arg, text, text_length, got, limit, NULL);
            bool ok = same_ids(got, n1, expected, want);
            int n2 = tok_encode(toks[0], prefix_arg, text, text_length, got, limit, &untruncated);
            ok = ok && same_ids(got, n2, expected, want);
            int full = json_ids(cJSON_GetObjectItem(ids, names[0]), expected, 1 << 20);
            ok = ok && untruncated == full;
            if (!ok && truncation_mismatches++ < MISMATCHES_SHOWN) {
                fprintf(stderr, "truncation mismatch at %d, line %ld: ", limit, strings + 1);
                print_escaped(stderr, text, text_length);
                fprintf(stderr, " (untruncated %d, reference %d)\n", untruncated, full);
            }
        }
        cJSON_Delete(row);
    }
    printf("parity: %ld strings\n", strings);
    CHECK(strings >= 10000, "only %ld strings in %s", strings, path);
    for (int k = 0; k < config_count; k++) {
        printf("parity: config %-14s %ld mismatches\n", names[k], mismatches[k]);
        CHECK(mismatches[k] == 0, "config %s: %ld of %ld strings differ from the reference",
              names[k], mismatches[k], strings);
        tok_close(toks[k]);
    }
    CHECK(truncation_mismatches == 0, "%ld truncation mismatches", truncation_mismatches);
    CHECK(prefix_mismatches == 0, "%ld prefix mismatches", prefix_mismatches);
    free(expected);
    free(text);
    free(prefix);
    cJSON_Delete(header);
    free(data);
    free(path);
}

/* ------------------------------------------------------------------------------------------ */
/* Every code point: normalized form per configuration and pre-tokenizer class. */

static size_t put_utf8(char *out, uint32_t cp)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

static bool is_surrogate(uint32_t cp)
{
    return cp >= 0xD800 && cp < 0xE000;
}

/* Expected normalized UTF-8 per code point, filled from one configuration's section. */
typedef struct expectation {
    char *bytes[UNICODE_LIMIT]; /* NULL: the code point itself */
} expectation;

static const char *small_vocab = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\n";

static void check_sweep(const char *name, const tok_options *options, expectation *want)
{
    tok_tokenizer *t = NULL;
    int status = tok_open_vocab_buffer(small_vocab, strlen(small_vocab), options, &t);
    CHECK(status == 0, "%s", err_get());
    if (status) return;
    long wrong = 0;
    char *input = malloc(SWEEP_CHUNK * 5 + 1);
    uint32_t chunk[SWEEP_CHUNK];
    uint32_t cp = 0;
    while (cp < UNICODE_LIMIT) {
        /* Code points joined by '|', which nothing normalizes into and no reordering crosses. */
        size_t n = 0, count = 0;
        for (; cp < UNICODE_LIMIT && count < SWEEP_CHUNK; cp++) {
            if (is_surrogate(cp) || cp == '|') continue;
            chunk[count++] = cp;
            n += put_utf8(input + n, cp);
            input[n++] = '|';
        }
        char *out = NULL;
        size_t out_length = 0;
        status = tok_normalize(t, input, n, &out, &out_length);
        CHECK(status == 0, "%s: tok_normalize: %s", name, err_get());
        if (status) break;
        char *p = out;
        for (size_t i = 0; i < count; i++) {
            char *bar = memchr(p, '|', out_length - (size_t)(p - out));
            if (!bar) {
                CHECK(false, "%s: a separator went missing near U+%04X", name, chunk[i]);
                break;
            }
            char self[5];
            const char *expect = want->bytes[chunk[i]];
            size_t expect_length;
            if (expect) {
                expect_length = strlen(expect);
            } else {
                expect_length = put_utf8(self, chunk[i]); /* itself, U+0000 included */
                expect = self;
            }
            size_t got_length = (size_t)(bar - p);
            if (got_length != expect_length || memcmp(p, expect, got_length) != 0) {
                if (wrong++ < MISMATCHES_SHOWN) {
                    fprintf(stderr, "%s: U+%04X normalizes to ", name, chunk[i]);
                    print_escaped(stderr, p, got_length);
                    fprintf(stderr, ", reference ");
                    print_escaped(stderr, expect, expect_length);
                    fputc('\n', stderr);
                }
            }
            p = bar + 1;
        }
        free(out);
    }
    /* '|' itself. */
    char *out = NULL;
    size_t out_length;
    tok_normalize(t, "|", 1, &out, &out_length);
    CHECK(out && strcmp(out, "|") == 0, "%s: '|' changed", name);
    free(out);
    printf("unicode: config %-14s %ld code points differ\n", name, wrong);
    CHECK(wrong == 0, "%s: %ld code points normalize differently from the reference", name, wrong);
    free(input);
    tok_close(t);
}

/* One "N <input hex> <output hex>" line: a whole string through the normalizer. */
static void check_sequence(const char *name, const tok_options *options, char *line)
{
    static long shown;
    char *input_hex = strtok(line + 2, " \n"), *output_hex = strtok(NULL, " \n");
    if (!input_hex || !output_hex) return;
    if (strcmp(output_hex, "-") == 0) output_hex = (char *)"";
    char input[1024], want[1024];
    if (strlen(input_hex) / 2 >= sizeof input || strlen(output_hex) / 2 >= sizeof want) return;
    size_t input_length = hex_decode(input_hex, input);
    size_t want_length = hex_decode(output_hex, want);
    tok_tokenizer *t = NULL;
    if (tok_open_vocab_buffer(small_vocab, strlen(small_vocab), options, &t) != 0) return;
    char *got = NULL;
    size_t got_length = 0;
    tok_normalize(t, input, input_length, &got, &got_length);
    bool same = got && got_length == want_length && memcmp(got, want, want_length) == 0;
    CHECK(same, "%s: a string normalizes differently from the reference", name);
    if (!same && shown++ < MISMATCHES_SHOWN) {
        fprintf(stderr, "    input ");
        print_escaped(stderr, input, input_length);
        fprintf(stderr, "\n    ours ");
        print_escaped(stderr, got ? got : "", got_length);
        fprintf(stderr, "\n    reference ");
        print_escaped(stderr, want, want_length);
        fputc('\n', stderr);
    }
    free(got);
    tok_close(t);
}

static void test_unicode(void)
{
    char *path = path_in_source(UNICODE_FIXTURE);
    FILE *f = fopen(path, "r");
    CHECK(f != NULL, "%s is missing: generate it with `%s`", path, GENERATOR);
    if (!f) {
        free(path);
        return;
    }
    expectation *want = calloc(1, sizeof *want);
    char line[4096], name[64] = "";
    tok_options options = {0};
    bool in_config = false;
    unsigned char *classes = calloc(UNICODE_LIMIT, 1); /* 'W', 'P' or 0 */
    bool in_classes = false;
    while (fgets(line, sizeof line, f)) {
        unsigned lo, hi;
        int clean, chinese, strip, lower;
        if (line[0] == '#') continue;
        if (strncmp(line, "config ", 7) == 0 || strncmp(line, "classes", 7) == 0 ||
            strncmp(line, "end", 3) == 0) {
            if (in_config) check_sweep(name, &options, want);
            for (uint32_t c = 0; c < UNICODE_LIMIT; c++) {
                free(want->bytes[c]);
                want->bytes[c] = NULL;
            }
            in_config = sscanf(line, "config %63s %d %d %d %d", name, &clean, &chinese, &strip,
                               &lower) == 5;
            options = (tok_options){clean, chinese, lower, strip, 100};
            in_classes = strncmp(line, "classes", 7) == 0;
            continue;
        }
        if (in_classes) {
            char kind;
            if (sscanf(line, "%c %X %X", &kind, &lo, &hi) == 3)
                for (uint32_t c = lo; c <= hi && c < UNICODE_LIMIT; c++)
                    classes[c] = (unsigned char)kind;
            continue;
        }
        char kind = line[0];
        if (kind == 'N') {
            check_sequence(name, &options, line);
            continue;
        }
        if (kind == 'M') {
            char *p = line + 2;
            unsigned cp = (unsigned)strtoul(p, &p, 16);
            char bytes[64];
            size_t n = 0;
            unsigned long v;
            char *end;
            while ((v = strtoul(p, &end, 16)), end != p && n + 4 < sizeof bytes) {
                n += put_utf8(bytes + n, (uint32_t)v);
                p = end;
            }
            bytes[n] = '\0';
            if (cp < UNICODE_LIMIT) want->bytes[cp] = strdup(bytes);
        } else if (sscanf(line + 1, "%X %X", &lo, &hi) == 2) {
            for (uint32_t c = lo; c <= hi && c < UNICODE_LIMIT; c++) {
                char bytes[16];
                size_t n = 0;
                if (kind == 'S') {
                    bytes[n++] = ' ';
                } else if (kind == 'C') {
                    bytes[n++] = ' ';
                    n += put_utf8(bytes + n, c);
                    bytes[n++] = ' ';
                }
                bytes[n] = '\0';
                want->bytes[c] = strdup(bytes);
            }
        }
    }
    fclose(f);
    long wrong = 0;
    for (uint32_t c = 0; c < UNICODE_LIMIT; c++) {
        if (is_surrogate(c)) continue;
        bool ws = classes[c] == 'W', punct = classes[c] == 'P';
        if (tok_char_is_whitespace(c) != ws || (!ws && tok_char_is_punctuation(c) != punct)) {
            if (wrong++ < MISMATCHES_SHOWN)
                fprintf(stderr, "U+%04X: class differs from the reference ('%c')\n", c,
                        classes[c] ? classes[c] : 'L');
        }
    }
    CHECK(wrong == 0, "%ld code points split differently from the reference", wrong);
    free(classes);
    free(want);
    free(path);
}

/* ------------------------------------------------------------------------------------------ */
/* Behaviour. */

static void test_special_ids(const tok_tokenizer *t)
{
    CHECK(tok_cls_id(t) == MINILM_CLS, "cls %d", tok_cls_id(t));
    CHECK(tok_sep_id(t) == MINILM_SEP, "sep %d", tok_sep_id(t));
    CHECK(tok_unk_id(t) == MINILM_UNK, "unk %d", tok_unk_id(t));
    CHECK(tok_vocab_size(t) == MINILM_VOCAB, "vocab size %d", tok_vocab_size(t));
    const char *cls = tok_token_text(t, MINILM_CLS);
    CHECK(cls && strcmp(cls, "[CLS]") == 0, "text of 101: %s", cls ? cls : "NULL");
    CHECK(tok_token_text(t, -1) == NULL && tok_token_text(t, MINILM_VOCAB) == NULL,
          "out of range ids have no text");
    const tok_options *o = tok_get_options(t);
    CHECK(o && o->lowercase && o->strip_accents && o->clean_text && o->handle_chinese_chars &&
              o->max_input_chars_per_word == 100,
          "options of the uncased model");
}

static void test_truncation(const tok_tokenizer *t)
{
    const char *text = "The quick brown fox jumps over the lazy dog, again and again and again.";
    int32_t *full;
    int n_full = encode_all(t, NULL, text, strlen(text), &full);
    CHECK(n_full > 10, "full length %d", n_full);
    for (int max = 2; max <= n_full + 2; max++) {
        int32_t ids[64];
        int untruncated = -1;
        int n = tok_encode(t, NULL, text, strlen(text), ids, max, &untruncated);
        int want = max < n_full ? max : n_full;
        CHECK(n == want, "max %d: got %d ids, want %d", max, n, want);
        CHECK(ids[0] == MINILM_CLS && ids[n - 1] == MINILM_SEP, "max %d: [CLS] first, [SEP] last",
              max);
        CHECK(memcmp(ids + 1, full + 1, (size_t)(n - 2) * sizeof *ids) == 0,
              "max %d: a prefix of the full pieces", max);
        CHECK(untruncated == n_full, "max %d: untruncated %d, want %d", max, untruncated, n_full);
        int32_t again[64];
        int m = tok_encode(t, NULL, text, strlen(text), again, max, NULL);
        CHECK(m == n && memcmp(again, ids, (size_t)n * sizeof *ids) == 0,
              "max %d: same ids without the count", max);
        /* From the left: the last pieces, in order, between [CLS] and [SEP]. */
        int32_t tail[64];
        untruncated = -1;
        int k = tok_encode_tail(t, NULL, text, strlen(text), tail, max, &untruncated);
        CHECK(k == want && tail[0] == MINILM_CLS && tail[k - 1] == MINILM_SEP,
              "max %d: tail of %d ids, [CLS] first, [SEP] last", max, k);
        CHECK(memcmp(tail + 1, full + (n_full - 1) - (k - 2), (size_t)(k - 2) * sizeof *tail) == 0,
              "max %d: a suffix of the full pieces", max);
        CHECK(untruncated == n_full, "max %d: tail's untruncated %d", max, untruncated);
    }
    int32_t ids[4];
    CHECK(tok_encode(t, NULL, "x", 1, ids, 1, NULL) == EMBEDRAG_ERR_INVALID_ARGUMENT,
          "max_tokens < 2 is refused");
    free(full);
}

static void test_invalid_utf8(const tok_tokenizer *t)
{
    static const struct {
        const char *text;
        size_t length;
        size_t offset;
        const char *what;
    } cases[] = {
        {"ab\xC0\x80", 4, 2, "overlong NUL"},
        {"\xE0\x80\xAF", 3, 0, "overlong slash"},
        {"xyz\xF0\x80\x80\x80", 7, 3, "overlong four bytes"},
        {"a\xED\xA0\x80z", 5, 1, "surrogate"},
        {"ok \xED\xBF\xBF", 6, 3, "low surrogate"},
        {"abc\xE2\x82", 5, 3, "truncated at the end"},
        {"abc\xE2\x82z", 6, 3, "truncated before ASCII"},
        {"ab\x80"
         "c",
         4, 2, "stray continuation"},
        {"\xBF", 1, 0, "lone continuation"},
        {"caf\xC3\xA9 \xF4\x90\x80\x80", 10, 6, "above U+10FFFF"},
        {"\xF5\x80\x80\x80", 4, 0, "F5 lead byte"},
        {"\xFF", 1, 0, "FF"},
        {"12345678901234567890\xC3", 21, 20, "truncated after the fast path"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int32_t ids[16];
        err_clear();
        int n = tok_encode(t, NULL, cases[i].text, cases[i].length, ids, 16, NULL);
        char want[64];
        snprintf(want, sizeof want, "invalid UTF-8 at byte offset %zu", cases[i].offset);
        CHECK(n == EMBEDRAG_ERR_INVALID_UTF8, "%s: status %d", cases[i].what, n);
        CHECK(strcmp(err_get(), want) == 0, "%s: message \"%s\", want \"%s\"", cases[i].what,
              err_get(), want);
    }
    int32_t ids[16];
    int n = tok_encode(t, "bad \xC3(", "fine", 4, ids, 16, NULL);
    CHECK(n == EMBEDRAG_ERR_INVALID_UTF8 && strstr(err_get(), "prefix") &&
              strstr(err_get(), "offset 4"),
          "a bad prefix is reported as such: %s", err_get());
    /* The error is found even past the truncation point. */
    n = tok_encode(t, NULL, "a b c d e f g \xFF", 15, ids, 3, NULL);
    CHECK(n == EMBEDRAG_ERR_INVALID_UTF8, "invalid UTF-8 after the cut: %d", n);
}

static void test_nul_and_empty(const tok_tokenizer *t)
{
    int32_t a[16], b[16];
    int na = tok_encode(t, NULL, "hel\0lo wor\0\0ld\0", 15, a, 16, NULL);
    int nb = tok_encode(t, NULL, "hello world", 11, b, 16, NULL);
    CHECK(same_ids(a, na, b, nb), "NUL bytes are dropped");
    int n = tok_encode(t, NULL, "", 0, a, 16, NULL);
    CHECK(n == 2 && a[0] == MINILM_CLS && a[1] == MINILM_SEP, "empty text is [CLS] [SEP]");
    n = tok_encode(t, NULL, NULL, 0, a, 16, NULL);
    CHECK(n == 2, "NULL text of length 0 is empty");
    n = tok_encode(t, NULL, " \t\n\x01\x7F\0", 6, a, 2, NULL);
    CHECK(n == 2, "whitespace and controls only");
    n = tok_encode(t, NULL, "\xE2\x80\x8B\xEF\xBB\xBF", 6, a, 16, NULL);
    CHECK(n == 2, "zero width space and BOM are dropped");
}

static double seconds_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void test_huge(const tok_tokenizer *t)
{
    char *text = malloc(HUGE_BYTES + 1);
    int32_t ids[512];
    int untruncated = 0;

    /* Many short words: the exact count is linear in the words. */
    const char *unit = "the cat sat. ";
    size_t unit_length = strlen(unit), units = HUGE_BYTES / unit_length;
    for (size_t i = 0; i < units; i++) memcpy(text + i * unit_length, unit, unit_length);
    size_t n = units * unit_length;
    double t0 = seconds_now();
    int got = tok_encode(t, NULL, text, n, ids, 512, &untruncated);
    double elapsed = seconds_now() - t0;
    CHECK(got == 512 && ids[511] == MINILM_SEP, "huge text truncated to 512: %d", got);
    CHECK(untruncated == (int)(units * 4 + 2), "huge text count %d, want %zu", untruncated,
          units * 4 + 2);
    printf("huge: %zu bytes of short words counted in %.2f s (%.1f MB/s, this build)\n", n, elapsed,
           (double)n / elapsed / 1e6);
    t0 = seconds_now();
    got = tok_encode(t, NULL, text, n, ids, 512, NULL);
    printf("huge: truncated without the count in %.4f s\n", seconds_now() - t0);
    CHECK(got == 512, "huge text truncated without the count: %d", got);

    /* One 10 MB word: a single [UNK]. */
    memset(text, 'a', HUGE_BYTES);
    got = tok_encode(t, NULL, text, HUGE_BYTES, ids, 512, &untruncated);
    CHECK(got == 3 && ids[1] == MINILM_UNK && untruncated == 3, "one huge word is [UNK]: %d", got);

    /* A base letter followed by ~5 million combining marks of two classes, alternating (the
     * worst case for canonical reordering), then CJK: both must stay linear. */
    text[0] = 'a';
    size_t i = 1;
    while (i + 8 <= HUGE_BYTES / 2) {
        memcpy(text + i, "\xCC\x81\xCC\x96", 4); /* U+0301 (230) U+0316 (220) */
        i += 4;
    }
    while (i + 4 <= HUGE_BYTES / 2 + HUGE_BYTES / 4) {
        memcpy(text + i, "\xF0\x9D\x85\xA5", 4); /* U+1D165, a spacing mark of class 216 */
        i += 4;
    }
    while (i + 3 <= HUGE_BYTES) {
        memcpy(text + i, "\xE4\xB8\xAD", 3); /* U+4E2D, its own word */
        i += 3;
    }
    t0 = seconds_now();
    got = tok_encode(t, NULL, text, i, ids, 512, &untruncated);
    elapsed = seconds_now() - t0;
    CHECK(got == 512 && untruncated > 800000, "marks then CJK: %d ids, %d untruncated", got,
          untruncated);
    printf("huge: %zu bytes of marks and CJK in %.2f s\n", i, elapsed);
    free(text);
}

static void test_prefix(const tok_tokenizer *t)
{
    static const char *const pairs[][2] = {
        {"query: ", "how do I bake bread?"},
        {"abc", "def ghi"},               /* glues into one word "abcdef" */
        {"passage: ", ""},                /* prefix alone */
        {"", "no prefix"},                /* empty prefix */
        {"[SE", "P] split special"},      /* the special token spans the boundary */
        {"e", "\xCC\x81t\xC3\xA9"},       /* a combining mark continues the prefix's last letter */
        {"\xE4\xB8\xAD", "\xE6\x96\x87"}, /* CJK on both sides */
    };
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++) {
        char joined[256];
        snprintf(joined, sizeof joined, "%s%s", pairs[i][0], pairs[i][1]);
        int32_t *a, *b;
        int na = encode_all(t, pairs[i][0], pairs[i][1], strlen(pairs[i][1]), &a);
        int nb = encode_all(t, NULL, joined, strlen(joined), &b);
        CHECK(same_ids(a, na, b, nb), "prefix \"%s\" + \"%s\" equals the joined text", pairs[i][0],
              pairs[i][1]);
        free(a);
        free(b);
    }
    int32_t *ids;
    int n = encode_all(t, NULL, "query: ", 7, &ids);
    CHECK(tok_count(t, "query: ") == n - 2, "tok_count(\"query: \") = %d, want %d",
          tok_count(t, "query: "), n - 2);
    CHECK(tok_count(t, NULL) == 0 && tok_count(t, "") == 0, "an empty prefix counts 0");
    free(ids);
}

static void test_small_vocab(void)
{
    const char *vocab = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nun\n##aff\n##able\naff\n##a\n"
                        "hello\n!\r\nworld\n";
    tok_options options = {true, true, true, true, 100};
    tok_tokenizer *t = NULL;
    int status = tok_open_vocab_buffer(vocab, strlen(vocab), &options, &t);
    CHECK(status == 0, "small vocabulary: %s", err_get());
    if (status) return;
    int32_t ids[16];
    int n = tok_encode(t, NULL, "UNAFFABLE Hello!! zzz", 21, ids, 16, NULL);
    int32_t want[] = {2, 5, 6, 7, 10, 11, 11, 1, 3};
    CHECK(same_ids(ids, n, want, 9), "greedy longest match, [UNK] for unknown words");
    n = tok_encode(t, NULL, "[MASK]affa", 10, ids, 16, NULL);
    int32_t want_mask[] = {2, 4, 8, 9, 3};
    CHECK(same_ids(ids, n, want_mask, 5), "special tokens in the text keep their ids");
    const char *text = tok_token_text(t, 11);
    CHECK(text && strcmp(text, "!") == 0, "a CRLF line loses its \\r");
    tok_close(t);

    /* max_input_chars_per_word is counted in characters after normalization. */
    options.max_input_chars_per_word = 3;
    status = tok_open_vocab_buffer(vocab, strlen(vocab), &options, &t);
    CHECK(status == 0, "%s", err_get());
    n = tok_encode(t, NULL,
                   "a\xCC\x81\xCC\x81"
                   "ff unaff",
                   13, ids, 16, NULL);
    int32_t want_long[] = {2, 8, 1, 3};
    CHECK(same_ids(ids, n, want_long, 4), "word length limit after stripping accents");
    tok_close(t);

    status = tok_open_vocab_buffer("a\nb\n", 4, NULL, &t);
    CHECK(status == EMBEDRAG_ERR_FORMAT && t == NULL && strstr(err_get(), "[UNK]"),
          "a vocabulary without [UNK] is refused: %s", err_get());
}

static char *make_temp_dir(void)
{
    const char *base = getenv("EMBEDRAG_BINARY_DIR");
    char *path = malloc(4096);
    snprintf(path, 4096, "%s/tok-test-XXXXXX", base ? base : "/tmp");
    if (!mkdtemp(path)) {
        snprintf(path, 4096, "/tmp/tok-test-XXXXXX");
        if (!mkdtemp(path)) {
            free(path);
            return NULL;
        }
    }
    return path;
}

static void write_text(const char *dir, const char *name, const char *content)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (f) {
        fputs(content, f);
        fclose(f);
    }
}

static void remove_file(const char *dir, const char *name)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    unlink(path);
}

static void expect_open_error(const char *dir, int code, const char *part1, const char *part2,
                              const char *what)
{
    tok_tokenizer *t = (tok_tokenizer *)1;
    int status = tok_open(dir, &t);
    CHECK(status == code && t == NULL, "%s: status %d", what, status);
    CHECK(strstr(err_get(), part1) && (!part2 || strstr(err_get(), part2)),
          "%s: message \"%s\" should name \"%s\"%s%s", what, err_get(), part1, part2 ? " and " : "",
          part2 ? part2 : "");
}

static void test_open_errors(void)
{
    expect_open_error("/nonexistent/model-dir", EMBEDRAG_ERR_IO, "/nonexistent/model-dir",
                      "vocab.txt", "missing directory");
    char *dir = make_temp_dir();
    CHECK(dir != NULL, "mkdtemp: %s", strerror(errno));
    if (!dir) return;
    expect_open_error(dir, EMBEDRAG_ERR_IO, "vocab.txt", "No such file", "empty directory");

    write_text(dir, "tokenizer.json", "{\"model\": {\"vocab\": {\"a\": 0,, }}}");
    expect_open_error(dir, EMBEDRAG_ERR_FORMAT, "tokenizer.json", "not valid JSON",
                      "corrupt tokenizer.json");
    write_text(dir, "tokenizer.json", "{\"model\": {\"type\": \"WordPiece\"}}");
    expect_open_error(dir, EMBEDRAG_ERR_FORMAT, "tokenizer.json", "model.vocab",
                      "tokenizer.json without vocab");
    write_text(dir, "tokenizer.json",
               "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {\"a\": 0, \"[CLS]\": 1, "
               "\"[SEP]\": 2}}, \"pre_tokenizer\": {\"type\": \"BertPreTokenizer\"}}");
    expect_open_error(dir, EMBEDRAG_ERR_FORMAT, "tokenizer.json", "[UNK]",
                      "tokenizer.json without [UNK]");
    write_text(dir, "tokenizer.json",
               "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {\"a\": 0, \"[UNK]\": 1, "
               "\"[SEP]\": 2}}, \"pre_tokenizer\": {\"type\": \"BertPreTokenizer\"}}");
    expect_open_error(dir, EMBEDRAG_ERR_FORMAT, "tokenizer.json", "[CLS]",
                      "tokenizer.json without [CLS]");
    write_text(dir, "tokenizer.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {}}}");
    expect_open_error(dir, EMBEDRAG_ERR_UNSUPPORTED, "tokenizer.json", "BPE", "a BPE model");
    write_text(dir, "tokenizer.json",
               "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {\"a\": \"zero\"}}}");
    expect_open_error(dir, EMBEDRAG_ERR_FORMAT, "tokenizer.json", "model.vocab[\"a\"]",
                      "a vocabulary id that is not a number");
    remove_file(dir, "tokenizer.json");

    write_text(dir, "vocab.txt", "[PAD]\n[UNK]\n[CLS]\nhello\n");
    expect_open_error(dir, EMBEDRAG_ERR_FORMAT, "vocab.txt", "[SEP]", "vocab.txt without [SEP]");
    write_text(dir, "vocab.txt", "[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n");
    write_text(dir, "tokenizer_config.json", "{\"do_lower_case\": fals");
    expect_open_error(dir, EMBEDRAG_ERR_FORMAT, "tokenizer_config.json", "not valid JSON",
                      "corrupt tokenizer_config.json");
    write_text(dir, "tokenizer_config.json", "{\"do_lower_case\": false}");
    tok_tokenizer *t = NULL;
    int status = tok_open(dir, &t);
    CHECK(status == 0, "vocab.txt + tokenizer_config.json: %s", err_get());
    if (t) {
        CHECK(!tok_get_options(t)->lowercase && !tok_get_options(t)->strip_accents,
              "do_lower_case false turns off lowercasing and accent stripping");
        int32_t ids[8];
        int n = tok_encode(t, NULL, "hello Hello", 11, ids, 8, NULL);
        int32_t want[] = {2, 4, 1, 3};
        CHECK(same_ids(ids, n, want, 4), "cased vocab.txt tokenizer");
        tok_close(t);
    }
    remove_file(dir, "tokenizer_config.json");
    remove_file(dir, "vocab.txt");
    rmdir(dir);
    free(dir);
}

int main(void)
{
    tok_tokenizer *t = open_model();
    if (t) {
        test_special_ids(t);
        test_truncation(t);
        test_invalid_utf8(t);
        test_nul_and_empty(t);
        test_prefix(t);
        test_huge(t);
        tok_close(t);
    }
    tok_close(NULL);
    test_small_vocab();
    test_open_errors();
    test_unicode();
    test_parity();
    return check_finish("test_tokenizer");
}
