/* The tokenizer's inside, shared by vocab.c (building it), encode.c (the hot path) and load.c
 * (reading model files): the tokenizer struct, its vocabulary hash table and added-token sets,
 * and the one lookup the hot path needs, kept static inline here so that WordPiece's inner loop
 * in encode.c inlines it as it did when everything lived in one file. */
#ifndef EMBEDRAG_TOKENIZER_INTERNAL_H
#define EMBEDRAG_TOKENIZER_INTERNAL_H

#include "tokenizer/tokenizer.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* An empty hash slot, and an id with no text. */
#define TOK_SLOT_EMPTY (-1)
#define TOK_NO_TEXT UINT32_MAX

/* Vocabulary: an open-addressing hash table over byte strings kept in one arena. */

typedef struct tok_vocab_slot {
    uint32_t tag; /* high bits of the hash, to skip most key comparisons */
    uint32_t length;
    uint32_t offset; /* key bytes in the tokenizer's arena */
    int32_t id;      /* TOK_SLOT_EMPTY when free */
} tok_vocab_slot;

typedef struct tok_vocab_table {
    tok_vocab_slot *slots;
    size_t mask;
    size_t count;
    size_t max_length; /* longest key in bytes: longer substrings need no lookup */
} tok_vocab_table;

/* A token matched in the text before (or, when `normalized`, after) normalization. */
typedef struct tok_added_token {
    uint32_t offset; /* pattern bytes in the added set's own storage */
    uint32_t length;
    int32_t id;
    bool single_word, lstrip, rstrip;
} tok_added_token;

typedef struct tok_added_set {
    tok_added_token *tokens; /* sorted by first byte, then longest first */
    size_t count, capacity;
    char *text;
    size_t text_length, text_capacity;
    uint32_t first_start[257]; /* tokens starting with byte b: [first_start[b], first_start[b+1]) */
} tok_added_set;

/* Classes of ASCII characters, precomputed for the common case. */
enum {
    TOK_ASCII_DROP = 1,        /* removed by clean_text */
    TOK_ASCII_TO_SPACE = 2,    /* turned into ' ' by clean_text */
    TOK_ASCII_WHITESPACE = 4,  /* ends a word */
    TOK_ASCII_PUNCTUATION = 8, /* a word of its own */
};

struct tok_tokenizer {
    tok_options options;
    unsigned char ascii[128];
    char *arena; /* every token string, NUL-terminated */
    size_t arena_length, arena_capacity;
    uint32_t *id_text; /* id -> arena offset, TOK_NO_TEXT for gaps */
    int32_t id_count;
    tok_vocab_table words;         /* every vocabulary entry */
    tok_vocab_table continuations; /* entries that start with the prefix, prefix removed */
    char *continuation_prefix;
    int32_t cls_id, sep_id, unk_id;
    tok_added_set raw_added;        /* matched in the original text */
    tok_added_set normalized_added; /* matched in the normalized text */
};

static inline uint64_t tok_hash_bytes(const unsigned char *p, size_t n)
{
    /* Multiply-xorshift over 8-byte words: keys are short, so speed matters more than
     * resistance to crafted keys (the keys come from the model, not from users). */
    const uint64_t k1 = 0x9E3779B97F4A7C15ull, k2 = 0xC2B2AE3D27D4EB4Full;
    uint64_t h = k1 ^ (n * k2);
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        h = (h ^ v) * k2;
        h ^= h >> 31;
        p += 8;
        n -= 8;
    }
    if (n > 0) {
        uint64_t v = 0;
        memcpy(&v, p, n);
        h = (h ^ v) * k2;
    }
    h ^= h >> 33;
    h *= k1;
    h ^= h >> 29;
    return h;
}

/* The id of `key`, or TOK_SLOT_EMPTY. WordPiece asks for every candidate piece of every word. */
static inline int32_t tok_table_get(const tok_vocab_table *t, const char *arena,
                                    const unsigned char *key, size_t length)
{
    if (length > t->max_length) return TOK_SLOT_EMPTY;
    uint64_t h = tok_hash_bytes(key, length);
    uint32_t tag = (uint32_t)(h >> 32);
    for (size_t i = h & t->mask;; i = (i + 1) & t->mask) {
        const tok_vocab_slot *s = &t->slots[i];
        if (s->id == TOK_SLOT_EMPTY) return TOK_SLOT_EMPTY;
        if (s->tag == tag && s->length == length && memcmp(arena + s->offset, key, length) == 0)
            return s->id;
    }
}

/* Collects a vocabulary, options and added tokens from whatever file describes them, then builds
 * the tables at once (tok_builder_finish). */

/* A token string with its id, before the tables exist. */
typedef struct tok_pending_token {
    uint32_t offset, length;
    int32_t id;
} tok_pending_token;

/* An added token as the files describe it. */
typedef struct tok_added_spec {
    char *content;
    int32_t id;
    bool single_word, lstrip, rstrip, normalized;
} tok_added_spec;

typedef struct tok_builder {
    tok_tokenizer *tok;
    tok_pending_token *vocab;
    size_t vocab_count, vocab_capacity;
    tok_added_spec *added;
    size_t added_count, added_capacity;
    char *unk_token, *cls_token, *sep_token; /* names to look up when no id was given */
    int32_t cls_id, sep_id;                  /* -1 when to be looked up by name */
} tok_builder;

/* Starts a builder with BERT's default options; tok_builder_free releases it, and the tokenizer
 * too unless tok_builder_finish handed it out. */
int tok_builder_init(tok_builder *b);
void tok_builder_free(tok_builder *b);

/* Adds vocabulary entry `s` (n bytes) with `id`; a later entry with the same text wins. */
int tok_builder_add_vocab(tok_builder *b, const char *s, size_t n, int32_t id);

/* Adds (or, for the same content, replaces) an added token. */
int tok_builder_add_added(tok_builder *b, const char *content, int32_t id, bool single_word,
                          bool lstrip, bool rstrip, bool normalized);

/* Builds the tables once the vocabulary, options and added tokens are known. `source` names
 * the file for messages. On success the tokenizer moves to *out. */
int tok_builder_finish(tok_builder *b, const char *source, tok_tokenizer **out);

/* Growable arrays for the builder and for the encoder's scratch, which starts in an array on the
 * stack. Grows *array (which may be the inline array `inline_array`) to hold at least `need`
 * elements of `size` bytes. Returns false when memory runs out. */
bool tok_grow(void **array, size_t *capacity, size_t need, size_t size, void *inline_array);

#endif
