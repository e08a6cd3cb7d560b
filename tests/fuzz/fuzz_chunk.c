/* libFuzzer target for the chunker: arbitrary bytes as a document, under several tokenizers,
 * limits, overlaps, prompts and titles picked by the first bytes, checking what must hold for any
 * input: the call fails only for invalid UTF-8 or a limit too small for one character; every
 * chunk lies in the text on UTF-8 boundaries, in order, with its exact count within the limit,
 * overlapping the one before by at most the overlap; what no chunk holds has no token. Build:
 * CC=clang cmake -DEMBEDRAG_FUZZ=ON. */
#include "chunk/chunker.h"
#include "tokenizer/tokenizer.h"

#include "embedrag.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A vocabulary with pieces of several lengths and scripts, as in fuzz_tokenizer.c. */
static const char fuzz_vocab[] = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nb\nab\nabc\n##a\n##b\n"
                                 "##bc\n##c\n!\n.\n##.\nthe\n##s\n\xC3\xA9\n##\xC3\xA9\n"
                                 "\xE4\xB8\xAD\n\xE2\x80\x94\ni\n##\xCC\x87\n#\n";

#define TOKENIZER_COUNT 4
/* Limits small enough that most inputs are split, and a model's usual one. */
#define FUZZ_LARGE_LIMIT 512

static tok_tokenizer *tokenizers[TOKENIZER_COUNT];
static int tokenizer_count;

static void setup(void)
{
    static const tok_options options[] = {
        {true, true, true, true, 100},   /* uncased BERT */
        {false, false, false, false, 3}, /* nothing cleaned, tiny word limit */
        {true, false, false, true, 100}, /* cased, no CJK spacing */
    };
    for (size_t i = 0; i < sizeof options / sizeof options[0]; i++)
        if (tok_open_vocab_buffer(fuzz_vocab, sizeof fuzz_vocab - 1, &options[i],
                                  &tokenizers[tokenizer_count]) == 0)
            tokenizer_count++;
    const char *root = getenv("EMBEDRAG_SOURCE_DIR");
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/models/all-MiniLM-L6-v2", root ? root : ".");
    if (tok_open(dir, &tokenizers[tokenizer_count]) == 0) tokenizer_count++;
    if (tokenizer_count == 0) abort();
}

static void check(bool condition, const char *what)
{
    if (!condition) {
        fprintf(stderr, "fuzz_chunk: invariant broken: %s\n", what);
        abort();
    }
}

static int count(const tok_tokenizer *t, const char *s, size_t n)
{
    int32_t ids[2];
    int untruncated = -1;
    return tok_encode(t, NULL, s, n, ids, 2, &untruncated) < 0 ? -1 : untruncated;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (tokenizer_count == 0) setup();
    if (size < 3) return 0;
    static const char *prompts[] = {NULL, "passage: ", "query", "ab"};
    static const char *titles[] = {NULL, "The title", "\xE4\xB8\xAD", "abc abc abc abc abc"};
    const tok_tokenizer *t = tokenizers[data[0] % tokenizer_count];
    chunk_options o = chunk_default_options(data[1] >= 250 ? FUZZ_LARGE_LIMIT : 3 + data[1] % 40);
    o.overlap_tokens = data[2] % 16;
    o.prompt = prompts[(data[0] >> 2) % 4];
    o.title = titles[(data[0] >> 4) % 4];
    const char *text = (const char *)data + 3;
    size_t length = size - 3;

    chunk_list list;
    int status = chunk_text(t, text, length, &o, &list);
    if (status == EMBEDRAG_ERR_INVALID_UTF8) return 0;
    if (status == EMBEDRAG_ERR_INVALID_ARGUMENT) {
        check(o.max_tokens - 2 - tok_count(t, o.prompt) < 1, "only a prompt leaving no room fails");
        return 0;
    }
    if (status == EMBEDRAG_ERR_TOO_LONG) {
        check(o.max_tokens < 12, "only tiny limits fail on one character");
        return 0;
    }
    check(status == 0, "chunk_text succeeds on valid UTF-8");
    check(list.count == 0 || list.spans, "spans");

    size_t prefix_length = (o.prompt ? strlen(o.prompt) : 0) +
                           (list.title_used ? strlen(o.title) + strlen(CHUNK_TITLE_SEPARATOR) : 0);
    char *joined = malloc(prefix_length + length + 1);
    snprintf(joined, prefix_length + 1, "%s%s%s", o.prompt ? o.prompt : "",
             list.title_used ? o.title : "", list.title_used ? CHUNK_TITLE_SEPARATOR : "");
    unsigned char *covered = calloc(length + 1, 1);
    int budget = o.max_tokens - 2;
    int overlap = o.overlap_tokens < budget / 2 ? o.overlap_tokens : budget / 2;
    for (size_t k = 0; k < list.count; k++) {
        const chunk_span *c = &list.spans[k];
        check(c->start < c->end && c->end <= length, "a chunk lies in the text");
        check((data[3 + c->start] & 0xC0) != 0x80 &&
                  (c->end == length || (data[3 + c->end] & 0xC0) != 0x80),
              "a chunk starts and ends on UTF-8 boundaries");
        memcpy(joined + prefix_length, text + c->start, c->end - c->start);
        int tokens = count(t, joined, prefix_length + c->end - c->start);
        check(tokens == c->tokens, "the count is exact");
        check(tokens <= o.max_tokens, "the count is within the limit");
        memset(covered + c->start, 1, c->end - c->start);
        if (k == 0) continue;
        const chunk_span *p = &list.spans[k - 1];
        check(p->start < c->start && p->end < c->end, "chunks in order");
        if (c->start < p->end)
            check(count(t, text + c->start, p->end - c->start) - 2 <= overlap,
                  "overlap within overlap_tokens");
    }
    /* What is left out is whitespace or text the model sees nothing of (control characters). */
    for (size_t i = 0; i < length;) {
        if (covered[i]) {
            i++;
            continue;
        }
        size_t end = i;
        while (end < length && !covered[end]) end++;
        check(count(t, text + i, end - i) == 2, "only text of no token is left out");
        i = end;
    }
    free(covered);
    free(joined);
    chunk_list_free(&list);
    return 0;
}
