/* libFuzzer target for the tokenizer: arbitrary bytes (valid UTF-8 or not) through tok_encode
 * under several options and limits, checking the invariants that must hold for any input:
 * [CLS] first, [SEP] last, truncation is a prefix of the full result, the count is exact, and a
 * prefix behaves like text glued in front. Build: CC=clang cmake -DEMBEDRAG_FUZZ=ON. */
#include "tokenizer/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A vocabulary with pieces of several lengths and scripts, so WordPiece has work to do. */
static const char fuzz_vocab[] = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nb\nab\nabc\n##a\n##b\n"
                                 "##bc\n##c\n!\n.\n##.\nthe\n##s\n\xC3\xA9\n##\xC3\xA9\n"
                                 "\xE4\xB8\xAD\n\xE2\x80\x94\ni\n##\xCC\x87\n";

/* Room for the largest limit tried. */
#define FUZZ_MAX_TOKENS 512
#define TOKENIZER_COUNT 5

static tok_tokenizer *tokenizers[TOKENIZER_COUNT];
static int tokenizer_count;

static void setup(void)
{
    static const tok_options options[] = {
        {true, true, true, true, 100},    /* uncased BERT */
        {true, true, false, false, 100},  /* cased BERT */
        {false, false, true, false, 100}, /* accents stripped, nothing cleaned */
        {true, false, false, true, 3},    /* tiny word limit */
    };
    for (size_t i = 0; i < sizeof options / sizeof options[0]; i++)
        if (tok_open_vocab_buffer(fuzz_vocab, sizeof fuzz_vocab - 1, &options[i],
                                  &tokenizers[tokenizer_count]) == 0)
            tokenizer_count++;
    /* The real model when it has been fetched (the fuzz run's working directory is the source
     * root). */
    const char *root = getenv("EMBEDRAG_SOURCE_DIR");
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/models/all-MiniLM-L6-v2", root ? root : ".");
    if (tok_open(dir, &tokenizers[tokenizer_count]) == 0) tokenizer_count++;
    if (tokenizer_count == 0) abort();
}

static void check(bool condition, const char *what)
{
    if (!condition) {
        fprintf(stderr, "fuzz_tokenizer: invariant broken: %s\n", what);
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (tokenizer_count == 0) setup();
    if (size == 0) return 0;
    /* First byte: which tokenizer and how much of the rest is a prefix. */
    const tok_tokenizer *t = tokenizers[data[0] % tokenizer_count];
    size_t prefix_length = size > 1 ? (data[0] >> 3) % (size - 1) : 0;
    const char *body = (const char *)data + 1;
    size_t body_length = size - 1;

    static int32_t full[FUZZ_MAX_TOKENS], part[FUZZ_MAX_TOKENS];
    int untruncated = -1;
    int n_full = tok_encode(t, NULL, body, body_length, full, FUZZ_MAX_TOKENS, &untruncated);
    if (n_full < 0) return 0; /* invalid UTF-8: reported, nothing else to check */
    check(n_full >= 2 && n_full <= FUZZ_MAX_TOKENS, "count within limits");
    check(full[0] == tok_cls_id(t) && full[n_full - 1] == tok_sep_id(t), "[CLS] ... [SEP]");
    check(untruncated >= n_full && (untruncated == n_full || n_full == FUZZ_MAX_TOKENS),
          "untruncated count");
    for (int i = 1; i < n_full - 1; i++) check(tok_token_text(t, full[i]) != NULL, "ids have text");

    static const int limits[] = {2, 3, 7, 64};
    for (size_t k = 0; k < sizeof limits / sizeof limits[0]; k++) {
        int limit = limits[k];
        int counted = -1;
        int n = tok_encode(t, NULL, body, body_length, part, limit, k % 2 ? &counted : NULL);
        int want = untruncated < limit ? untruncated : limit;
        check(n == want, "truncated length");
        check(memcmp(part, full, (size_t)(n - 1) * sizeof *part) == 0, "truncation keeps a prefix");
        check(part[n - 1] == tok_sep_id(t), "[SEP] after truncation");
        check(k % 2 == 0 || counted == untruncated, "count with truncation");
    }

    /* A prefix (up to its first NUL) equals the glued text. */
    char prefix[256];
    if (prefix_length >= sizeof prefix) prefix_length = sizeof prefix - 1;
    memcpy(prefix, body, prefix_length);
    prefix[prefix_length] = '\0';
    prefix_length = strlen(prefix);
    const char *rest = body + prefix_length;
    size_t rest_length = body_length - prefix_length;
    int glued_count = -1, split_count = -1;
    int n_split = tok_encode(t, prefix, rest, rest_length, part, FUZZ_MAX_TOKENS, &split_count);
    int n_glued = tok_encode(t, NULL, body, body_length, full, FUZZ_MAX_TOKENS, &glued_count);
    if (n_split >= 0 && n_glued >= 0) {
        check(n_split == n_glued && split_count == glued_count, "prefix count");
        check(memcmp(part, full, (size_t)n_split * sizeof *part) == 0, "prefix ids");
        int alone = -1;
        int n_alone = tok_encode(t, NULL, prefix, prefix_length, part, 2, &alone);
        check(n_alone == 2 && tok_count(t, prefix) == alone - 2, "tok_count of the prefix");
    }

    char *normalized = NULL;
    size_t normalized_length = 0;
    if (tok_normalize(t, body, body_length, &normalized, &normalized_length) == 0)
        check(normalized != NULL && normalized[normalized_length] == '\0', "normalized text");
    free(normalized);
    return 0;
}
