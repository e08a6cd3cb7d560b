/* BERT WordPiece tokenizer: loads tokenizer.json (or vocab.txt + tokenizer_config.json) and turns
 * UTF-8 text into [CLS] word-piece ids [SEP] exactly as Hugging Face `tokenizers` does for BERT
 * models (added tokens, BertNormalizer, BertPreTokenizer, WordPiece, BERT post-processing), in
 * one streaming pass over the text with no allocation per character or word. */
#include "tokenizer/tokenizer.h"

#include "util/error.h"
#include "util/file.h"
#include "util/json.h"

#include <cjson/cJSON.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* BERT's (and the reference's) defaults when a file does not say otherwise. */
#define DEFAULT_MAX_INPUT_CHARS_PER_WORD 100
#define DEFAULT_CONTINUATION_PREFIX "##"
#define DEFAULT_UNK_TOKEN "[UNK]"
#define DEFAULT_CLS_TOKEN "[CLS]"
#define DEFAULT_SEP_TOKEN "[SEP]"

/* tokenizer.json takes about 15 bytes a vocabulary entry (466 KB for BERT's 30,522), so this
 * holds over four million entries, many times the largest multilingual vocabularies; beyond it a
 * file is not a tokenizer file. */
#define MAX_TOKENIZER_FILE_BYTES (64u * 1024u * 1024u)

/* Ids above this are surely a corrupt file: the largest BERT vocabularies hold about 250,000
 * entries, and the reverse table is sized by the largest id. */
#define MAX_TOKEN_ID (1 << 24)

/* Longest canonical decomposition of one code point is 4 (Unicode 15); room to spare. */
#define DECOMPOSITION_CAPACITY 16

/* Sizes of the per-call scratch arrays that live on the stack; longer words or runs of
 * combining marks move to the heap. A BERT word is at most 100 characters of 4 bytes. */
#define WORD_INLINE_BYTES 512
#define PIECES_INLINE 128
#define RUN_INLINE 32
/* Runs of combining marks longer than this are sorted by counting instead of insertion, so that
 * pathological input stays linear. */
#define RUN_INSERTION_SORT_LIMIT 32

/* An empty hash slot. */
#define SLOT_EMPTY (-1)
#define NO_TEXT UINT32_MAX

/* ------------------------------------------------------------------------------------------ */
/* Vocabulary: an open-addressing hash table over byte strings kept in one arena. */

typedef struct vocab_slot {
    uint32_t tag; /* high bits of the hash, to skip most key comparisons */
    uint32_t length;
    uint32_t offset; /* key bytes in the tokenizer's arena */
    int32_t id;      /* SLOT_EMPTY when free */
} vocab_slot;

typedef struct vocab_table {
    vocab_slot *slots;
    size_t mask;
    size_t count;
    size_t max_length; /* longest key in bytes: longer substrings need no lookup */
} vocab_table;

/* A token matched in the text before (or, when `normalized`, after) normalization. */
typedef struct added_token {
    uint32_t offset; /* pattern bytes in the added set's own storage */
    uint32_t length;
    int32_t id;
    bool single_word, lstrip, rstrip;
} added_token;

typedef struct added_set {
    added_token *tokens; /* sorted by first byte, then longest first */
    size_t count, capacity;
    char *text;
    size_t text_length, text_capacity;
    uint32_t first_start[257]; /* tokens starting with byte b: [first_start[b], first_start[b+1]) */
} added_set;

/* Classes of ASCII characters, precomputed for the common case. */
enum {
    ASCII_DROP = 1,        /* removed by clean_text */
    ASCII_TO_SPACE = 2,    /* turned into ' ' by clean_text */
    ASCII_WHITESPACE = 4,  /* ends a word */
    ASCII_PUNCTUATION = 8, /* a word of its own */
};

struct tok_tokenizer {
    tok_options options;
    unsigned char ascii[128];
    char *arena; /* every token string, NUL-terminated */
    size_t arena_length, arena_capacity;
    uint32_t *id_text; /* id -> arena offset, NO_TEXT for gaps */
    int32_t id_count;
    vocab_table words;         /* every vocabulary entry */
    vocab_table continuations; /* entries that start with the prefix, prefix removed */
    char *continuation_prefix;
    int32_t cls_id, sep_id, unk_id;
    added_set raw_added;        /* matched in the original text */
    added_set normalized_added; /* matched in the normalized text */
};

static uint64_t hash_bytes(const unsigned char *p, size_t n)
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

static int table_init(vocab_table *t, size_t expected)
{
    size_t capacity = 16;
    while (capacity < expected * 2) capacity *= 2;
    t->slots = malloc(capacity * sizeof *t->slots);
    if (!t->slots) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for the vocabulary");
    for (size_t i = 0; i < capacity; i++) t->slots[i].id = SLOT_EMPTY;
    t->mask = capacity - 1;
    t->count = 0;
    t->max_length = 0;
    return 0;
}

/* Later entries replace earlier ones with the same key, as the reference's HashMap does. */
static void table_put(vocab_table *t, const char *arena, uint32_t offset, uint32_t length,
                      int32_t id)
{
    const unsigned char *key = (const unsigned char *)arena + offset;
    uint64_t h = hash_bytes(key, length);
    uint32_t tag = (uint32_t)(h >> 32);
    for (size_t i = h & t->mask;; i = (i + 1) & t->mask) {
        vocab_slot *s = &t->slots[i];
        if (s->id == SLOT_EMPTY) {
            *s = (vocab_slot){tag, length, offset, id};
            t->count++;
            if (length > t->max_length) t->max_length = length;
            return;
        }
        if (s->tag == tag && s->length == length && memcmp(arena + s->offset, key, length) == 0) {
            s->id = id;
            return;
        }
    }
}

static int32_t table_get(const vocab_table *t, const char *arena, const unsigned char *key,
                         size_t length)
{
    if (length > t->max_length) return SLOT_EMPTY;
    uint64_t h = hash_bytes(key, length);
    uint32_t tag = (uint32_t)(h >> 32);
    for (size_t i = h & t->mask;; i = (i + 1) & t->mask) {
        const vocab_slot *s = &t->slots[i];
        if (s->id == SLOT_EMPTY) return SLOT_EMPTY;
        if (s->tag == tag && s->length == length && memcmp(arena + s->offset, key, length) == 0)
            return s->id;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* UTF-8. */

/* Checks that s[0, n) is UTF-8 as Rust's str accepts it (no overlong forms, no surrogates,
 * nothing above U+10FFFF). Returns n, or the offset of the first byte of the first bad
 * sequence. */
static size_t utf8_check(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (i + 8 <= n) {
            uint64_t v;
            memcpy(&v, s + i, 8);
            if ((v & 0x8080808080808080ull) == 0) {
                i += 8;
                continue;
            }
        }
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t need;
        unsigned lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
        if (c >= 0xC2 && c <= 0xDF) {
            need = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            need = 2;
            if (c == 0xE0)
                lo = 0xA0; /* overlong */
            else if (c == 0xED)
                hi = 0x9F; /* surrogates */
        } else if (c >= 0xF0 && c <= 0xF4) {
            need = 3;
            if (c == 0xF0)
                lo = 0x90; /* overlong */
            else if (c == 0xF4)
                hi = 0x8F; /* above U+10FFFF */
        } else {
            return i; /* stray continuation byte, overlong C0/C1, or F5..FF */
        }
        if (n - i <= need) return i; /* truncated */
        if (s[i + 1] < lo || s[i + 1] > hi) return i;
        for (size_t k = 2; k <= need; k++)
            if ((s[i + k] & 0xC0) != 0x80) return i;
        i += need + 1;
    }
    return n;
}

/* Decodes the code point at s[*i] of text already checked by utf8_check. */
static inline uint32_t utf8_next(const unsigned char *s, size_t *i)
{
    uint32_t c = s[*i];
    if (c < 0x80) {
        *i += 1;
        return c;
    }
    if (c < 0xE0) {
        c = ((c & 0x1F) << 6) | (s[*i + 1] & 0x3F);
        *i += 2;
    } else if (c < 0xF0) {
        c = ((c & 0x0F) << 12) | ((uint32_t)(s[*i + 1] & 0x3F) << 6) | (s[*i + 2] & 0x3F);
        *i += 3;
    } else {
        c = ((c & 0x07) << 18) | ((uint32_t)(s[*i + 1] & 0x3F) << 12) |
            ((uint32_t)(s[*i + 2] & 0x3F) << 6) | (s[*i + 3] & 0x3F);
        *i += 4;
    }
    return c;
}

/* Writes cp as UTF-8 to out (room for 4 bytes); returns the length. */
static inline size_t utf8_put(unsigned char *out, uint32_t cp)
{
    if (cp < 0x80) {
        out[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (unsigned char)(0xC0 | (cp >> 6));
        out[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (unsigned char)(0xE0 | (cp >> 12));
        out[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (unsigned char)(0xF0 | (cp >> 18));
    out[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

/* The code point that ends just before s[end] (end > 0, text valid UTF-8). */
static uint32_t utf8_last(const unsigned char *s, size_t end)
{
    size_t start = end - 1;
    while (start > 0 && (s[start] & 0xC0) == 0x80) start--;
    return utf8_next(s, &start);
}

/* ------------------------------------------------------------------------------------------ */
/* Encoding: the per-call state. Characters flow raw -> normalize -> (reorder marks) ->
 * lowercase -> sink, where the sink is the pre-tokenizer (word buffer + WordPiece) or, when
 * normalized added tokens must be found first, a byte buffer. */

typedef struct run_char {
    uint32_t cp;
    uint32_t ccc;
} run_char;

typedef struct encoder {
    const tok_tokenizer *tok;
    int32_t *out;
    int64_t capacity; /* room in out */
    int64_t produced; /* pieces so far, counting past capacity when count_all */
    bool count_all;
    bool stopped; /* out is full and the count is not wanted, or an allocation failed */
    int status;

    /* The current combining sequence (a starter and the marks after it), held back so that
     * marks can be put in canonical order as NFD requires. Only used when stripping accents. */
    run_char *run;
    size_t run_length, run_capacity;
    bool run_unordered;

    /* Sink into a byte buffer instead of the pre-tokenizer. */
    bool to_buffer;
    unsigned char *buffer;
    size_t buffer_length, buffer_capacity;

    /* The current word, as UTF-8. Only its first max_input_chars_per_word characters are kept:
     * a longer word becomes [UNK] whatever it holds. */
    unsigned char *word;
    size_t word_length, word_capacity;
    size_t word_chars;
    int32_t *pieces; /* a word's pieces wait here until the whole word has matched */
    size_t pieces_capacity;

    run_char run_inline[RUN_INLINE];
    unsigned char word_inline[WORD_INLINE_BYTES];
    int32_t pieces_inline[PIECES_INLINE];
} encoder;

static void encoder_init(encoder *e, const tok_tokenizer *tok, int32_t *out, int64_t capacity,
                         bool count_all)
{
    e->tok = tok;
    e->out = out;
    e->capacity = capacity;
    e->produced = 0;
    e->count_all = count_all;
    e->stopped = !count_all && capacity <= 0;
    e->status = 0;
    e->run = e->run_inline;
    e->run_length = 0;
    e->run_capacity = RUN_INLINE;
    e->run_unordered = false;
    e->to_buffer = false;
    e->buffer = NULL;
    e->buffer_length = e->buffer_capacity = 0;
    e->word = e->word_inline;
    e->word_length = 0;
    e->word_capacity = WORD_INLINE_BYTES;
    e->word_chars = 0;
    e->pieces = e->pieces_inline;
    e->pieces_capacity = PIECES_INLINE;
}

static void encoder_free(encoder *e)
{
    if (e->run != e->run_inline) free(e->run);
    if (e->word != e->word_inline) free(e->word);
    if (e->pieces != e->pieces_inline) free(e->pieces);
    free(e->buffer);
}

static void encoder_fail(encoder *e)
{
    e->status = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory while tokenizing");
    e->stopped = true;
}

/* Grows *array (which may be the inline array `inline_array`) to hold at least `need` elements
 * of `size` bytes. Returns false when memory runs out. */
static bool grow(void **array, size_t *capacity, size_t need, size_t size, void *inline_array)
{
    if (need <= *capacity) return true;
    size_t capacity_new = *capacity ? *capacity : 64;
    while (capacity_new < need) {
        if (capacity_new > SIZE_MAX / 2 / size) return false;
        capacity_new *= 2;
    }
    void *p;
    if (*array == inline_array) {
        p = malloc(capacity_new * size);
        if (p && *capacity) memcpy(p, *array, *capacity * size);
    } else {
        p = realloc(*array, capacity_new * size);
    }
    if (!p) return false;
    *array = p;
    *capacity = capacity_new;
    return true;
}

static inline void emit(encoder *e, int32_t id)
{
    if (e->produced < e->capacity) e->out[e->produced] = id;
    e->produced++;
    if (!e->count_all && e->produced >= e->capacity) e->stopped = true;
}

/* Greedy longest-match-first WordPiece over the current word. */
static void wordpiece(encoder *e)
{
    const tok_tokenizer *t = e->tok;
    const unsigned char *w = e->word;
    size_t n = e->word_length;
    size_t count = 0;
    for (size_t start = 0; start < n;) {
        const vocab_table *table = start == 0 ? &t->words : &t->continuations;
        size_t end = n;
        if (end - start > table->max_length) {
            end = start + table->max_length;
            while (end > start && (w[end] & 0xC0) == 0x80) end--;
        }
        int32_t id = SLOT_EMPTY;
        while (end > start) {
            id = table_get(table, t->arena, w + start, end - start);
            if (id != SLOT_EMPTY) break;
            do end--;
            while (end > start && (w[end] & 0xC0) == 0x80);
        }
        if (id == SLOT_EMPTY) {
            /* Any unmatched remainder makes the whole word unknown. */
            emit(e, t->unk_id);
            return;
        }
        if (count == e->pieces_capacity && !grow((void **)&e->pieces, &e->pieces_capacity,
                                                 count + 1, sizeof *e->pieces, e->pieces_inline)) {
            encoder_fail(e);
            return;
        }
        e->pieces[count++] = id;
        start = end;
    }
    for (size_t i = 0; i < count && !e->stopped; i++) emit(e, e->pieces[i]);
}

static void word_end(encoder *e)
{
    if (e->word_chars == 0) return;
    if (e->word_chars > (size_t)e->tok->options.max_input_chars_per_word)
        emit(e, e->tok->unk_id);
    else
        wordpiece(e);
    e->word_length = 0;
    e->word_chars = 0;
}

static inline void word_append(encoder *e, uint32_t cp)
{
    e->word_chars++;
    if (e->word_chars > (size_t)e->tok->options.max_input_chars_per_word) return;
    if (cp < 0x80 && e->word_length < e->word_capacity) {
        e->word[e->word_length++] = (unsigned char)cp;
        return;
    }
    if (e->word_length + 4 > e->word_capacity &&
        !grow((void **)&e->word, &e->word_capacity, e->word_length + 4, 1, e->word_inline)) {
        encoder_fail(e);
        return;
    }
    e->word_length += utf8_put(e->word + e->word_length, cp);
}

/* The pre-tokenizer: whitespace ends a word, punctuation is a word of its own. */
static inline void pretokenize(encoder *e, uint32_t cp)
{
    if (cp < 0x80) {
        unsigned flags = e->tok->ascii[cp];
        if (flags & ASCII_WHITESPACE) {
            word_end(e);
        } else if (flags & ASCII_PUNCTUATION) {
            word_end(e);
            word_append(e, cp);
            word_end(e);
        } else {
            word_append(e, cp);
        }
    } else if (tok_char_is_whitespace(cp)) {
        word_end(e);
    } else if (tok_char_is_punctuation(cp)) {
        word_end(e);
        word_append(e, cp);
        word_end(e);
    } else {
        word_append(e, cp);
    }
}

static inline void sink(encoder *e, uint32_t cp)
{
    if (!e->to_buffer) {
        pretokenize(e, cp);
        return;
    }
    if (e->buffer_length + 4 > e->buffer_capacity &&
        !grow((void **)&e->buffer, &e->buffer_capacity, e->buffer_length + 4, 1, NULL)) {
        encoder_fail(e);
        return;
    }
    e->buffer_length += utf8_put(e->buffer + e->buffer_length, cp);
}

static inline void lowercase_and_sink(encoder *e, uint32_t cp)
{
    if (!e->tok->options.lowercase) {
        sink(e, cp);
    } else if (cp < 0x80) {
        sink(e, cp >= 'A' && cp <= 'Z' ? cp + ('a' - 'A') : cp);
    } else {
        uint32_t lower[2];
        int n = tok_char_lowercase(cp, lower);
        for (int i = 0; i < n; i++) sink(e, lower[i]);
    }
}

/* Stable sort of the held-back run by combining class (canonical ordering). */
static void run_sort(encoder *e)
{
    run_char *r = e->run;
    size_t n = e->run_length;
    if (n <= RUN_INSERTION_SORT_LIMIT) {
        for (size_t i = 1; i < n; i++) {
            run_char x = r[i];
            size_t j = i;
            while (j > 0 && r[j - 1].ccc > x.ccc) {
                r[j] = r[j - 1];
                j--;
            }
            r[j] = x;
        }
        return;
    }
    run_char *sorted = malloc(n * sizeof *sorted);
    if (!sorted) {
        encoder_fail(e);
        return;
    }
    size_t start[257] = {0};
    for (size_t i = 0; i < n; i++) start[r[i].ccc + 1]++;
    for (size_t c = 1; c < 257; c++) start[c] += start[c - 1];
    for (size_t i = 0; i < n; i++) sorted[start[r[i].ccc]++] = r[i];
    memcpy(r, sorted, n * sizeof *r);
    free(sorted);
}

static void run_flush(encoder *e)
{
    if (e->run_unordered) run_sort(e);
    for (size_t i = 0; i < e->run_length; i++) lowercase_and_sink(e, e->run[i].cp);
    e->run_length = 0;
    e->run_unordered = false;
}

static void run_push(encoder *e, uint32_t cp)
{
    /* No code point below U+0300 has a nonzero combining class. */
    uint32_t ccc = cp < 0x300 ? 0 : (uint32_t)tok_char_combining_class(cp);
    if (ccc == 0)
        run_flush(e);
    else if (e->run_length > 0 && e->run[e->run_length - 1].ccc > ccc)
        e->run_unordered = true;
    if (e->run_length == e->run_capacity &&
        !grow((void **)&e->run, &e->run_capacity, e->run_length + 1, sizeof *e->run,
              e->run_inline)) {
        encoder_fail(e);
        return;
    }
    e->run[e->run_length++] = (run_char){cp, ccc};
}

/* strip_accents: NFD, then drop nonspacing marks. Without it nothing is decomposed or
 * reordered, so characters pass straight on. */
static void strip_accents(encoder *e, uint32_t cp)
{
    if (!e->tok->options.strip_accents) {
        lowercase_and_sink(e, cp);
        return;
    }
    if (cp < 0xC0) { /* nothing below U+00C0 decomposes or is a mark */
        run_push(e, cp);
        return;
    }
    uint32_t parts[DECOMPOSITION_CAPACITY];
    int n = tok_char_decompose(cp, parts, DECOMPOSITION_CAPACITY);
    if (n < 1 || n > DECOMPOSITION_CAPACITY) {
        parts[0] = cp;
        n = 1;
    }
    for (int i = 0; i < n; i++)
        if (!tok_char_is_nonspacing_mark(parts[i])) run_push(e, parts[i]);
}

/* BertNormalizer on one code point of the original text. */
static inline void normalize(encoder *e, uint32_t cp)
{
    const tok_options *o = &e->tok->options;
    if (cp < 0x80) {
        unsigned flags = e->tok->ascii[cp];
        if (flags & ASCII_DROP) return;
        if (flags & ASCII_TO_SPACE) cp = ' ';
        if (o->strip_accents)
            run_push(e, cp);
        else
            lowercase_and_sink(e, cp);
        return;
    }
    if (o->clean_text) {
        if (cp == 0 || cp == 0xFFFD || tok_char_is_control(cp)) return;
        if (tok_char_is_whitespace(cp)) cp = ' ';
    }
    if (o->handle_chinese_chars && tok_char_is_chinese(cp)) {
        strip_accents(e, ' ');
        strip_accents(e, cp);
        strip_accents(e, ' ');
        return;
    }
    strip_accents(e, cp);
}

/* Normalizes s[0, n) into e->buffer. */
static void normalize_to_buffer(encoder *e, const unsigned char *s, size_t n)
{
    e->to_buffer = true;
    e->buffer_length = 0;
    for (size_t i = 0; i < n && e->status == 0;) normalize(e, utf8_next(s, &i));
    run_flush(e);
    e->to_buffer = false;
}

/* ------------------------------------------------------------------------------------------ */
/* Added tokens: leftmost-longest matching like the reference's Aho-Corasick automaton. */

/* The regex class \s the reference uses around added tokens (\w is tok_char_is_word). */
static bool is_regex_space(uint32_t cp)
{
    return tok_char_is_whitespace(cp);
}

/* Finds the next accepted added token in s[0, n) at or after *scan. `segment_start` is where
 * the text not yet consumed begins (lstrip never reaches before it). On a match, sets
 * [*start, *end) (whitespace taken by lstrip/rstrip included) and *id, moves *scan past it and
 * returns true. */
static bool added_find(const added_set *set, const unsigned char *s, size_t n, size_t *scan,
                       size_t segment_start, size_t *start, size_t *end, int32_t *id)
{
    for (size_t i = *scan; i < n; i++) {
        unsigned b = s[i];
        uint32_t first = set->first_start[b], last = set->first_start[b + 1];
        const added_token *match = NULL;
        for (uint32_t k = first; k < last; k++) {
            const added_token *a = &set->tokens[k];
            if (a->length <= n - i && memcmp(set->text + a->offset, s + i, a->length) == 0) {
                match = a; /* longest first */
                break;
            }
        }
        if (!match) continue;
        size_t match_start = i, match_end = i + match->length;
        if (match->single_word) {
            bool word_before = match_start > 0 && tok_char_is_word(utf8_last(s, match_start));
            size_t after = match_end;
            bool word_after = match_end < n && tok_char_is_word(utf8_next(s, &after));
            if (word_before || word_after) {
                /* A rejected match still consumes its text, as the automaton's iteration
                 * resumes after it. */
                i = match_end - 1;
                continue;
            }
        }
        if (match->lstrip) {
            size_t p = match_start;
            while (p > segment_start) {
                size_t q = p - 1;
                while (q > segment_start && (s[q] & 0xC0) == 0x80) q--;
                size_t r = q;
                if (!is_regex_space(utf8_next(s, &r))) break;
                p = q;
            }
            match_start = p;
        }
        if (match->rstrip) {
            while (match_end < n) {
                size_t r = match_end;
                if (!is_regex_space(utf8_next(s, &r))) break;
                match_end = r;
            }
        }
        *start = match_start;
        *end = match_end;
        *id = match->id;
        *scan = match_end;
        return true;
    }
    *scan = n;
    return false;
}

/* Pre-tokenizes normalized text (already in canonical order and lowercased). */
static void pretokenize_bytes(encoder *e, const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n && !e->stopped;) pretokenize(e, utf8_next(s, &i));
    word_end(e);
}

/* One stretch of original text between raw added tokens. */
static void encode_segment(encoder *e, const unsigned char *s, size_t n)
{
    const tok_tokenizer *t = e->tok;
    if (n == 0 || e->stopped) return;
    if (t->normalized_added.count == 0) {
        for (size_t i = 0; i < n && !e->stopped;) normalize(e, utf8_next(s, &i));
        if (!e->stopped) run_flush(e);
        if (!e->stopped) word_end(e);
        e->run_length = 0;
        return;
    }
    normalize_to_buffer(e, s, n);
    if (e->status || e->buffer_length == 0) return; /* (the buffer may not exist yet) */
    const unsigned char *b = e->buffer;
    size_t length = e->buffer_length, position = 0, scan = 0, start, end;
    int32_t id;
    while (!e->stopped &&
           added_find(&t->normalized_added, b, length, &scan, position, &start, &end, &id)) {
        pretokenize_bytes(e, b + position, start - position);
        if (!e->stopped) emit(e, id);
        position = end;
    }
    if (!e->stopped) pretokenize_bytes(e, b + position, length - position);
}

static void encode_text(encoder *e, const unsigned char *s, size_t n)
{
    const tok_tokenizer *t = e->tok;
    size_t position = 0, scan = 0, start, end;
    int32_t id;
    if (t->raw_added.count > 0) {
        while (!e->stopped && added_find(&t->raw_added, s, n, &scan, position, &start, &end, &id)) {
            encode_segment(e, s + position, start - position);
            if (!e->stopped) emit(e, id);
            position = end;
        }
    }
    encode_segment(e, s + position, n - position);
}

/* ------------------------------------------------------------------------------------------ */
/* Public encoding functions. */

static int check_text(const char *text, size_t len, const char *what)
{
    size_t bad = utf8_check((const unsigned char *)text, len);
    if (bad != len)
        return err_set(EMBEDRAG_ERR_INVALID_UTF8, "invalid UTF-8%s at byte offset %zu", what, bad);
    return 0;
}

int tok_encode(const tok_tokenizer *tokenizer, const char *prefix, const char *text, size_t len,
               int32_t *ids, int max_tokens, int *untruncated)
{
    if (!tokenizer || !ids || max_tokens < 2 || (!text && len > 0))
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                       "tok_encode: needs a tokenizer, a text and room for >= 2 ids");
    if (!text) text = "";
    int status = check_text(text, len, "");
    if (status) return status;
    size_t prefix_length = prefix ? strlen(prefix) : 0;
    status = check_text(prefix ? prefix : "", prefix_length, " in the prefix");
    if (status) return status;

    /* The prompt is glued to the text exactly as sentence-transformers does, so a prompt that
     * ends inside a word continues into the text's first word. */
    unsigned char *joined = NULL;
    const unsigned char *s = (const unsigned char *)text;
    size_t n = len;
    if (prefix_length > 0) {
        if (len > SIZE_MAX - prefix_length || !(joined = malloc(prefix_length + len)))
            return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory joining the prefix");
        memcpy(joined, prefix, prefix_length);
        if (len) memcpy(joined + prefix_length, text, len);
        s = joined;
        n = prefix_length + len;
    }

    encoder e;
    encoder_init(&e, tokenizer, ids + 1, max_tokens - 2, untruncated != NULL);
    encode_text(&e, s, n);
    status = e.status;
    int64_t produced = e.produced;
    encoder_free(&e);
    free(joined);
    if (status) return status;

    int64_t kept = produced < max_tokens - 2 ? produced : max_tokens - 2;
    ids[0] = tokenizer->cls_id;
    ids[kept + 1] = tokenizer->sep_id;
    if (untruncated) *untruncated = produced > INT_MAX - 2 ? INT_MAX : (int)produced + 2;
    return (int)kept + 2;
}

int tok_count(const tok_tokenizer *tokenizer, const char *prefix)
{
    if (!tokenizer) return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "tok_count: no tokenizer");
    if (!prefix) return 0;
    size_t n = strlen(prefix);
    int status = check_text(prefix, n, " in the prefix");
    if (status) return status;
    encoder e;
    encoder_init(&e, tokenizer, NULL, 0, true);
    encode_text(&e, (const unsigned char *)prefix, n);
    status = e.status;
    int64_t produced = e.produced;
    encoder_free(&e);
    if (status) return status;
    return produced > INT_MAX ? INT_MAX : (int)produced;
}

int tok_normalize(const tok_tokenizer *tokenizer, const char *text, size_t len, char **out,
                  size_t *out_len)
{
    if (out) *out = NULL;
    if (!tokenizer || !out || (!text && len > 0))
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "tok_normalize: bad arguments");
    if (!text) text = "";
    int status = check_text(text, len, "");
    if (status) return status;
    encoder *e = malloc(sizeof *e);
    if (!e) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory while normalizing");
    encoder_init(e, tokenizer, NULL, 0, true);
    normalize_to_buffer(e, (const unsigned char *)text, len);
    status = e->status;
    if (!status && !grow((void **)&e->buffer, &e->buffer_capacity, e->buffer_length + 1, 1, NULL))
        status = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory while normalizing");
    if (!status) {
        e->buffer[e->buffer_length] = '\0';
        *out = (char *)e->buffer;
        if (out_len) *out_len = e->buffer_length;
        e->buffer = NULL;
    }
    encoder_free(e);
    free(e);
    return status;
}

/* ------------------------------------------------------------------------------------------ */
/* Building a tokenizer. */

/* A token string with its id, before the tables exist. */
typedef struct pending_token {
    uint32_t offset, length;
    int32_t id;
} pending_token;

/* An added token as the files describe it. */
typedef struct added_spec {
    char *content;
    int32_t id;
    bool single_word, lstrip, rstrip, normalized;
} added_spec;

typedef struct builder {
    tok_tokenizer *tok;
    pending_token *vocab;
    size_t vocab_count, vocab_capacity;
    added_spec *added;
    size_t added_count, added_capacity;
    char *unk_token, *cls_token, *sep_token; /* names to look up when no id was given */
    int32_t cls_id, sep_id;                  /* -1 when to be looked up by name */
} builder;

static char *copy_string(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p) memcpy(p, s, n);
    return p;
}

static int builder_init(builder *b)
{
    memset(b, 0, sizeof *b);
    b->tok = calloc(1, sizeof *b->tok);
    if (!b->tok) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for the tokenizer");
    b->cls_id = b->sep_id = -1;
    b->tok->options = (tok_options){true, true, true, true, DEFAULT_MAX_INPUT_CHARS_PER_WORD};
    return 0;
}

static void builder_free(builder *b)
{
    free(b->vocab);
    for (size_t i = 0; i < b->added_count; i++) free(b->added[i].content);
    free(b->added);
    free(b->unk_token);
    free(b->cls_token);
    free(b->sep_token);
    tok_close(b->tok);
}

static int set_string(char **field, const char *value)
{
    char *p = copy_string(value);
    if (!p) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    free(*field);
    *field = p;
    return 0;
}

/* Stores bytes in the arena; returns its offset or NO_TEXT when out of memory. */
static uint32_t arena_add(tok_tokenizer *t, const char *s, size_t n)
{
    if (n >= UINT32_MAX / 2 || t->arena_length + n + 1 >= UINT32_MAX) return NO_TEXT;
    if (!grow((void **)&t->arena, &t->arena_capacity, t->arena_length + n + 1, 1, NULL))
        return NO_TEXT;
    uint32_t offset = (uint32_t)t->arena_length;
    memcpy(t->arena + offset, s, n);
    t->arena[offset + n] = '\0';
    t->arena_length += n + 1;
    return offset;
}

static int add_vocab(builder *b, const char *s, size_t n, int32_t id)
{
    if (!grow((void **)&b->vocab, &b->vocab_capacity, b->vocab_count + 1, sizeof *b->vocab, NULL))
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for the vocabulary");
    uint32_t offset = arena_add(b->tok, s, n);
    if (offset == NO_TEXT)
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for the vocabulary");
    b->vocab[b->vocab_count++] = (pending_token){offset, (uint32_t)n, id};
    return 0;
}

static int add_added(builder *b, const char *content, int32_t id, bool single_word, bool lstrip,
                     bool rstrip, bool normalized)
{
    /* A later description of the same content replaces the earlier one. */
    for (size_t i = 0; i < b->added_count; i++) {
        if (strcmp(b->added[i].content, content) == 0) {
            b->added[i] =
                (added_spec){b->added[i].content, id, single_word, lstrip, rstrip, normalized};
            return 0;
        }
    }
    if (!grow((void **)&b->added, &b->added_capacity, b->added_count + 1, sizeof *b->added, NULL))
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for added tokens");
    char *copy = copy_string(content);
    if (!copy) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for added tokens");
    b->added[b->added_count++] = (added_spec){copy, id, single_word, lstrip, rstrip, normalized};
    return 0;
}

/* Order of added tokens: by first byte, then longest first. */
static int compare_added(const added_token *a, const added_token *b, const char *text)
{
    unsigned fa = (unsigned char)text[a->offset], fb = (unsigned char)text[b->offset];
    if (fa != fb) return fa < fb ? -1 : 1;
    if (a->length != b->length) return a->length > b->length ? -1 : 1;
    return a->offset < b->offset ? -1 : a->offset > b->offset;
}

static int added_append(added_set *set, const char *pattern, size_t length, const added_spec *a)
{
    if (length == 0) return 0; /* an empty pattern never matches */
    if (!grow((void **)&set->tokens, &set->capacity, set->count + 1, sizeof *set->tokens, NULL))
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for added tokens");
    if (!grow((void **)&set->text, &set->text_capacity, set->text_length + length, 1, NULL))
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for added tokens");
    memcpy(set->text + set->text_length, pattern, length);
    set->tokens[set->count++] = (added_token){
        (uint32_t)set->text_length, (uint32_t)length, a->id, a->single_word, a->lstrip, a->rstrip};
    set->text_length += length;
    return 0;
}

static void added_index(added_set *set)
{
    /* qsort has no context argument for the pattern text; an insertion sort is enough for the
     * handful of added tokens a model has. */
    for (size_t i = 1; i < set->count; i++) {
        added_token x = set->tokens[i];
        size_t j = i;
        while (j > 0 && compare_added(&set->tokens[j - 1], &x, set->text) > 0) {
            set->tokens[j] = set->tokens[j - 1];
            j--;
        }
        set->tokens[j] = x;
    }
    size_t k = 0;
    for (unsigned b = 0; b < 256; b++) {
        set->first_start[b] = (uint32_t)k;
        while (k < set->count && (unsigned char)set->text[set->tokens[k].offset] == b) k++;
    }
    set->first_start[256] = (uint32_t)k;
}

static void added_free(added_set *set)
{
    free(set->tokens);
    free(set->text);
}

/* Builds the tables once the vocabulary, options and added tokens are known. `source` names
 * the file for messages. On success the tokenizer moves to *out. */
static int builder_finish(builder *b, const char *source, tok_tokenizer **out)
{
    tok_tokenizer *t = b->tok;
    if (b->vocab_count == 0)
        return err_set(EMBEDRAG_ERR_FORMAT, "%s: the vocabulary is empty", source);
    for (uint32_t c = 0; c < 128; c++) {
        unsigned flags = 0;
        if (t->options.clean_text && (c == 0 || tok_char_is_control(c)))
            flags |= ASCII_DROP;
        else if (t->options.clean_text && tok_char_is_whitespace(c))
            flags |= ASCII_TO_SPACE;
        if (tok_char_is_whitespace(c)) flags |= ASCII_WHITESPACE;
        if (tok_char_is_punctuation(c)) flags |= ASCII_PUNCTUATION;
        t->ascii[c] = (unsigned char)flags;
    }
    if (!t->continuation_prefix && !(t->continuation_prefix = copy_string("##")))
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    int status = table_init(&t->words, b->vocab_count);
    if (status) return status;
    size_t prefix_length = strlen(t->continuation_prefix);
    size_t continuation_count = 0;
    int32_t max_id = -1;
    for (size_t i = 0; i < b->vocab_count; i++) {
        const pending_token *p = &b->vocab[i];
        if (p->length >= prefix_length &&
            memcmp(t->arena + p->offset, t->continuation_prefix, prefix_length) == 0)
            continuation_count++;
        if (p->id > max_id) max_id = p->id;
    }
    if ((status = table_init(&t->continuations, continuation_count))) return status;
    for (size_t i = 0; i < b->vocab_count; i++) {
        const pending_token *p = &b->vocab[i];
        table_put(&t->words, t->arena, p->offset, p->length, p->id);
        /* "##ing" is looked up as "ing" after the first piece; an empty remainder never is. */
        if (p->length > prefix_length &&
            memcmp(t->arena + p->offset, t->continuation_prefix, prefix_length) == 0)
            table_put(&t->continuations, t->arena, p->offset + (uint32_t)prefix_length,
                      p->length - (uint32_t)prefix_length, p->id);
    }
    for (size_t i = 0; i < b->added_count; i++)
        if (b->added[i].id > max_id) max_id = b->added[i].id;

    const char *unk = b->unk_token ? b->unk_token : DEFAULT_UNK_TOKEN;
    t->unk_id = table_get(&t->words, t->arena, (const unsigned char *)unk, strlen(unk));
    if (t->unk_id == SLOT_EMPTY)
        return err_set(EMBEDRAG_ERR_FORMAT, "%s: the unknown token \"%s\" is not in the vocabulary",
                       source, unk);
    const char *names[2] = {b->cls_token ? b->cls_token : DEFAULT_CLS_TOKEN,
                            b->sep_token ? b->sep_token : DEFAULT_SEP_TOKEN};
    int32_t *ids[2] = {&t->cls_id, &t->sep_id};
    int32_t given[2] = {b->cls_id, b->sep_id};
    for (int k = 0; k < 2; k++) {
        *ids[k] = given[k];
        if (*ids[k] >= 0) continue;
        *ids[k] = table_get(&t->words, t->arena, (const unsigned char *)names[k], strlen(names[k]));
        for (size_t i = 0; *ids[k] < 0 && i < b->added_count; i++)
            if (strcmp(b->added[i].content, names[k]) == 0) *ids[k] = b->added[i].id;
        if (*ids[k] < 0)
            return err_set(EMBEDRAG_ERR_FORMAT,
                           "%s: the special token \"%s\" is not in the "
                           "vocabulary",
                           source, names[k]);
    }
    if (t->cls_id > max_id) max_id = t->cls_id;
    if (t->sep_id > max_id) max_id = t->sep_id;

    /* id -> text, added tokens included. */
    t->id_count = max_id + 1;
    t->id_text = malloc((size_t)t->id_count * sizeof *t->id_text);
    if (!t->id_text) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for the vocabulary");
    for (int32_t i = 0; i < t->id_count; i++) t->id_text[i] = NO_TEXT;
    for (size_t i = 0; i < b->vocab_count; i++) t->id_text[b->vocab[i].id] = b->vocab[i].offset;
    for (size_t i = 0; i < b->added_count; i++) {
        const added_spec *a = &b->added[i];
        if (t->id_text[a->id] != NO_TEXT) continue;
        uint32_t offset = arena_add(t, a->content, strlen(a->content));
        if (offset == NO_TEXT)
            return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for added tokens");
        t->id_text[a->id] = offset;
    }

    /* Added tokens: the normalized ones are matched against their own normalized form. */
    for (size_t i = 0; i < b->added_count; i++) {
        const added_spec *a = &b->added[i];
        if (!a->normalized) {
            status = added_append(&t->raw_added, a->content, strlen(a->content), a);
        } else {
            char *pattern = NULL;
            size_t pattern_length = 0;
            status = tok_normalize(t, a->content, strlen(a->content), &pattern, &pattern_length);
            if (!status) status = added_append(&t->normalized_added, pattern, pattern_length, a);
            free(pattern);
        }
        if (status) return status;
    }
    added_index(&t->raw_added);
    added_index(&t->normalized_added);

    *out = t;
    b->tok = NULL;
    return 0;
}

/* A token id from JSON: an integer in [0, MAX_TOKEN_ID]. */
static bool token_id_from_json(const cJSON *item, int32_t *id)
{
    int64_t value;
    if (!json_integer(item, 0, MAX_TOKEN_ID, &value)) return false;
    *id = (int32_t)value;
    return true;
}

/* The "type" of a model, normalizer, pre-tokenizer or post-processor, or NULL. */
static const char *component_type(const cJSON *object)
{
    return cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(object, "type"));
}

/* Reads a tokenizer file that must hold a JSON object; a missing file sets *missing, leaves *out
 * NULL and returns 0. */
static int read_json_object(const char *path, bool *missing, cJSON **out)
{
    int status = json_read_file(path, MAX_TOKENIZER_FILE_BYTES, missing, out);
    if (status || !*out) return status;
    if (!cJSON_IsObject(*out)) {
        cJSON_Delete(*out);
        *out = NULL;
        return err_set(EMBEDRAG_ERR_FORMAT, "%s: the top level is not a JSON object", path);
    }
    return 0;
}

/* A one-element "Sequence" is treated as its element. */
static const cJSON *unwrap_sequence(const cJSON *object, const char *list_name)
{
    const char *type = component_type(object);
    if (type && strcmp(type, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(object, list_name);
        if (cJSON_IsArray(list) && cJSON_GetArraySize(list) == 1)
            return cJSON_GetArrayItem(list, 0);
    }
    return object;
}

static int parse_normalizer(builder *b, const cJSON *root, const char *path)
{
    tok_options *o = &b->tok->options;
    const cJSON *n = cJSON_GetObjectItemCaseSensitive(root, "normalizer");
    if (!n || cJSON_IsNull(n)) {
        /* No normalizer: the text reaches the pre-tokenizer unchanged. */
        o->clean_text = o->handle_chinese_chars = o->strip_accents = o->lowercase = false;
        return 0;
    }
    n = unwrap_sequence(n, "normalizers");
    const char *type = component_type(n);
    if (!type || strcmp(type, "BertNormalizer") != 0)
        return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                       "%s: normalizer type \"%s\" is not supported (only BertNormalizer)", path,
                       type ? type : "?");
    /* Missing fields take the reference's defaults: everything on, strip_accents following
     * lowercase. */
    o->clean_text = o->handle_chinese_chars = o->lowercase = true;
    int status;
    if ((status = json_get_bool(n, path, "normalizer", "clean_text", &o->clean_text)) ||
        (status = json_get_bool(n, path, "normalizer", "handle_chinese_chars",
                                &o->handle_chinese_chars)) ||
        (status = json_get_bool(n, path, "normalizer", "lowercase", &o->lowercase)))
        return status;
    o->strip_accents = o->lowercase;
    return json_get_bool(n, path, "normalizer", "strip_accents", &o->strip_accents);
}

static int parse_pre_tokenizer(const cJSON *root, const char *path)
{
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
    const char *type = NULL;
    if (p && !cJSON_IsNull(p)) type = component_type(unwrap_sequence(p, "pretokenizers"));
    if (!type || strcmp(type, "BertPreTokenizer") != 0)
        return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                       "%s: pre_tokenizer \"%s\" is not supported (only BertPreTokenizer)", path,
                       type ? type : "null");
    return 0;
}

/* The id of a TemplateProcessing special token named `name`. */
static int template_special_id(const cJSON *processor, const char *name, int32_t *id,
                               const char *path)
{
    const cJSON *specials = cJSON_GetObjectItemCaseSensitive(processor, "special_tokens");
    const cJSON *entry = cJSON_GetObjectItemCaseSensitive(specials, name);
    if (!entry) {
        *id = -1; /* look the name up in the vocabulary */
        return 0;
    }
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(entry, "ids");
    if (!cJSON_IsArray(list) || cJSON_GetArraySize(list) != 1 ||
        !token_id_from_json(cJSON_GetArrayItem(list, 0), id))
        return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                       "%s: post_processor.special_tokens[\"%s\"] must have exactly one id", path,
                       name);
    return 0;
}

static int parse_post_processor(builder *b, const cJSON *root, const char *path)
{
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(root, "post_processor");
    if (!p || cJSON_IsNull(p)) return 0; /* [CLS] and [SEP] by name */
    p = unwrap_sequence(p, "processors");
    const char *type = component_type(p);
    if (type && strcmp(type, "BertProcessing") == 0) {
        const char *names[2] = {"cls", "sep"};
        char **tokens[2] = {&b->cls_token, &b->sep_token};
        int32_t *ids[2] = {&b->cls_id, &b->sep_id};
        for (int k = 0; k < 2; k++) {
            const cJSON *pair = cJSON_GetObjectItemCaseSensitive(p, names[k]);
            const cJSON *name = cJSON_GetArrayItem(pair, 0);
            if (!cJSON_IsArray(pair) || !cJSON_IsString(name) ||
                !token_id_from_json(cJSON_GetArrayItem(pair, 1), ids[k]))
                return err_set(EMBEDRAG_ERR_FORMAT,
                               "%s: post_processor.%s is not a [token, id] pair", path, names[k]);
            int status = set_string(tokens[k], name->valuestring);
            if (status) return status;
        }
        return 0;
    }
    if (type && strcmp(type, "TemplateProcessing") == 0) {
        /* Only the BERT shape: one special token, the sequence, one special token. */
        const cJSON *single = cJSON_GetObjectItemCaseSensitive(p, "single");
        const cJSON *first = cJSON_GetArrayItem(single, 0), *middle = cJSON_GetArrayItem(single, 1),
                    *last = cJSON_GetArrayItem(single, 2);
        const cJSON *first_id = cJSON_GetObjectItemCaseSensitive(
            cJSON_GetObjectItemCaseSensitive(first, "SpecialToken"), "id");
        const cJSON *last_id = cJSON_GetObjectItemCaseSensitive(
            cJSON_GetObjectItemCaseSensitive(last, "SpecialToken"), "id");
        if (!cJSON_IsArray(single) || cJSON_GetArraySize(single) != 3 ||
            !cJSON_GetObjectItemCaseSensitive(middle, "Sequence") || !cJSON_IsString(first_id) ||
            !cJSON_IsString(last_id))
            return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                           "%s: post_processor.single is not [special, $A, special]", path);
        int status;
        if ((status = set_string(&b->cls_token, first_id->valuestring)) ||
            (status = set_string(&b->sep_token, last_id->valuestring)) ||
            (status = template_special_id(p, first_id->valuestring, &b->cls_id, path)) ||
            (status = template_special_id(p, last_id->valuestring, &b->sep_id, path)))
            return status;
        return 0;
    }
    return err_set(EMBEDRAG_ERR_UNSUPPORTED, "%s: post_processor \"%s\" is not supported", path,
                   type ? type : "?");
}

/* Reads one added-token description (tokenizer.json's added_tokens entries and
 * tokenizer_config.json's added_tokens_decoder values share the fields). */
static int parse_added_token(builder *b, const cJSON *item, int32_t id, const char *path,
                             const char *where)
{
    const cJSON *content = cJSON_GetObjectItemCaseSensitive(item, "content");
    if (!cJSON_IsObject(item) || !cJSON_IsString(content))
        return err_set(EMBEDRAG_ERR_FORMAT, "%s: %s has no content string", path, where);
    bool single_word = false, lstrip = false, rstrip = false, special = false;
    int status;
    if ((status = json_get_bool(item, path, where, "special", &special))) return status;
    bool normalized = !special; /* the reference's default */
    if ((status = json_get_bool(item, path, where, "single_word", &single_word)) ||
        (status = json_get_bool(item, path, where, "lstrip", &lstrip)) ||
        (status = json_get_bool(item, path, where, "rstrip", &rstrip)) ||
        (status = json_get_bool(item, path, where, "normalized", &normalized)))
        return status;
    return add_added(b, content->valuestring, id, single_word, lstrip, rstrip, normalized);
}

/* Loads tokenizer.json; a missing file sets *missing and returns 0, so the caller can fall back
 * to vocab.txt. */
static int load_tokenizer_json(builder *b, const char *path, bool *missing)
{
    cJSON *root;
    int status = read_json_object(path, missing, &root);
    if (status || *missing) return status;

    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const char *type = component_type(model);
    if (!cJSON_IsObject(model)) {
        status = err_set(EMBEDRAG_ERR_FORMAT, "%s: \"model\" is missing or not an object", path);
        goto done;
    }
    if (type && strcmp(type, "WordPiece") != 0) {
        status = err_set(EMBEDRAG_ERR_UNSUPPORTED,
                         "%s: model.type is \"%s\"; only WordPiece is supported", path, type);
        goto done;
    }
    if (!cJSON_IsObject(vocab)) {
        status = err_set(EMBEDRAG_ERR_FORMAT, "%s: model.vocab is missing or not an object", path);
        goto done;
    }
    for (const cJSON *entry = vocab->child; entry; entry = entry->next) {
        int32_t id;
        if (!token_id_from_json(entry, &id)) {
            status = err_set(EMBEDRAG_ERR_FORMAT, "%s: model.vocab[\"%s\"] is not a valid id", path,
                             entry->string ? entry->string : "");
            goto done;
        }
        if ((status = add_vocab(b, entry->string, strlen(entry->string), id))) goto done;
    }
    const cJSON *unk = cJSON_GetObjectItemCaseSensitive(model, "unk_token");
    const cJSON *prefix = cJSON_GetObjectItemCaseSensitive(model, "continuing_subword_prefix");
    if (cJSON_IsString(unk) && (status = set_string(&b->unk_token, unk->valuestring))) goto done;
    if (cJSON_IsString(prefix) &&
        !(b->tok->continuation_prefix = copy_string(prefix->valuestring))) {
        status = err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
        goto done;
    }
    if ((status = json_get_int(model, path, "model", "max_input_chars_per_word", false, 0, INT_MAX,
                               &b->tok->options.max_input_chars_per_word)))
        goto done;

    if ((status = parse_normalizer(b, root, path)) || (status = parse_pre_tokenizer(root, path)) ||
        (status = parse_post_processor(b, root, path)))
        goto done;

    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    if (added && !cJSON_IsNull(added) && !cJSON_IsArray(added)) {
        status = err_set(EMBEDRAG_ERR_FORMAT, "%s: added_tokens is not an array", path);
        goto done;
    }
    int index = 0;
    for (const cJSON *item = added ? added->child : NULL; item; item = item->next, index++) {
        int32_t id;
        char where[64];
        snprintf(where, sizeof where, "added_tokens[%d]", index);
        if (!token_id_from_json(cJSON_GetObjectItemCaseSensitive(item, "id"), &id)) {
            status = err_set(EMBEDRAG_ERR_FORMAT, "%s: %s has no valid id", path, where);
            goto done;
        }
        if ((status = parse_added_token(b, item, id, path, where))) goto done;
    }
done:
    cJSON_Delete(root);
    return status;
}

/* Splits a vocab.txt buffer into tokens, one per line, id = line number. A trailing "\r" is
 * dropped with the "\n" so that files written on Windows still work. */
static int load_vocab_lines(builder *b, const char *data, size_t length)
{
    int32_t id = 0;
    size_t start = 0;
    while (start < length) {
        const char *newline = memchr(data + start, '\n', length - start);
        size_t end = newline ? (size_t)(newline - data) : length;
        size_t token_end = end;
        if (token_end > start && data[token_end - 1] == '\r') token_end--;
        if (id > MAX_TOKEN_ID)
            return err_set(EMBEDRAG_ERR_FORMAT, "more than %d vocabulary lines", MAX_TOKEN_ID);
        int status = add_vocab(b, data + start, token_end - start, id++);
        if (status) return status;
        start = end + 1;
    }
    return 0;
}

/* BERT's special tokens, matched in the original text like the reference's added tokens. */
static int add_default_specials(builder *b)
{
    static const char *const names[] = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        const char *name = names[i];
        if (strcmp(name, "[UNK]") == 0 && b->unk_token)
            name = b->unk_token;
        else if (strcmp(name, "[CLS]") == 0 && b->cls_token)
            name = b->cls_token;
        else if (strcmp(name, "[SEP]") == 0 && b->sep_token)
            name = b->sep_token;
        /* Find the id by scanning the pending vocabulary (tables are not built yet). */
        int32_t id = -1;
        size_t n = strlen(name);
        for (size_t k = 0; k < b->vocab_count; k++)
            if (b->vocab[k].length == n && memcmp(b->tok->arena + b->vocab[k].offset, name, n) == 0)
                id = b->vocab[k].id; /* the last duplicate wins */
        bool known = false;
        for (size_t k = 0; k < b->added_count; k++) known |= strcmp(b->added[k].content, name) == 0;
        if (id >= 0 && !known) {
            int status = add_added(b, name, id, false, false, false, false);
            if (status) return status;
        }
    }
    return 0;
}

/* A special token in tokenizer_config.json: a string, or an object with "content". */
static int config_token(const cJSON *config, const char *field, char **out)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(config, field);
    if (cJSON_IsObject(item)) item = cJSON_GetObjectItemCaseSensitive(item, "content");
    if (cJSON_IsString(item)) return set_string(out, item->valuestring);
    return 0;
}

static int load_tokenizer_config(builder *b, const char *path)
{
    bool missing;
    cJSON *config;
    int status = read_json_object(path, &missing, &config);
    if (status || missing) return status; /* the file is optional */
    tok_options *o = &b->tok->options;
    /* BertTokenizer's defaults: lowercase, strip accents when lowercasing, space CJK. */
    o->clean_text = true;
    bool strip_given = false;
    const cJSON *strip = cJSON_GetObjectItemCaseSensitive(config, "strip_accents");
    if ((status = json_get_bool(config, path, NULL, "do_lower_case", &o->lowercase)) ||
        (status =
             json_get_bool(config, path, NULL, "tokenize_chinese_chars", &o->handle_chinese_chars)))
        goto done;
    if (strip && !cJSON_IsNull(strip)) {
        if ((status = json_get_bool(config, path, NULL, "strip_accents", &o->strip_accents)))
            goto done;
        strip_given = true;
    }
    if (!strip_given) o->strip_accents = o->lowercase;
    if ((status = config_token(config, "unk_token", &b->unk_token)) ||
        (status = config_token(config, "cls_token", &b->cls_token)) ||
        (status = config_token(config, "sep_token", &b->sep_token)))
        goto done;
    const cJSON *decoder = cJSON_GetObjectItemCaseSensitive(config, "added_tokens_decoder");
    for (const cJSON *item = cJSON_IsObject(decoder) ? decoder->child : NULL; item;
         item = item->next) {
        char *end;
        long id = strtol(item->string, &end, 10);
        char where[96];
        snprintf(where, sizeof where, "added_tokens_decoder[\"%.40s\"]", item->string);
        if (*end != '\0' || id < 0 || id > MAX_TOKEN_ID) {
            status = err_set(EMBEDRAG_ERR_FORMAT, "%s: %s: the key is not a token id", path, where);
            goto done;
        }
        if ((status = parse_added_token(b, item, (int32_t)id, path, where))) goto done;
    }
done:
    cJSON_Delete(config);
    return status;
}

int tok_open(const char *model_dir, tok_tokenizer **out)
{
    if (out) *out = NULL;
    if (!model_dir || !out)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "tok_open: needs a directory and *out");
    char *json_path = NULL, *vocab_path = NULL, *config_path = NULL;
    int status;
    if ((status = file_join(model_dir, "tokenizer.json", &json_path)) ||
        (status = file_join(model_dir, "vocab.txt", &vocab_path)) ||
        (status = file_join(model_dir, "tokenizer_config.json", &config_path)))
        goto free_paths;
    builder b;
    if ((status = builder_init(&b))) goto free_paths;

    bool json_missing;
    if ((status = load_tokenizer_json(&b, json_path, &json_missing))) goto free_builder;
    if (!json_missing) {
        status = builder_finish(&b, json_path, out);
        goto free_builder;
    }
    char *data;
    size_t length;
    status = file_read(vocab_path, MAX_TOKENIZER_FILE_BYTES, &data, &length, NULL);
    if (status) {
        status = err_prefix(status, "%s: no tokenizer.json, and ", model_dir);
        goto free_builder;
    }
    if ((status = load_vocab_lines(&b, data, length)))
        status = err_prefix(status, "%s: ", vocab_path);
    free(data);
    if (!status && !(status = load_tokenizer_config(&b, config_path)) &&
        !(status = add_default_specials(&b)))
        status = builder_finish(&b, vocab_path, out);
free_builder:
    builder_free(&b);
free_paths:
    free(json_path);
    free(vocab_path);
    free(config_path);
    return status;
}

int tok_open_vocab_buffer(const char *vocab, size_t length, const tok_options *options,
                          tok_tokenizer **out)
{
    if (out) *out = NULL;
    if (!vocab || !out)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "tok_open_vocab_buffer: bad arguments");
    if (options && options->max_input_chars_per_word < 0)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                       "tok_open_vocab_buffer: max_input_chars_per_word < 0");
    builder b;
    int status = builder_init(&b);
    if (status) return status;
    if (options) b.tok->options = *options;
    if (!(status = load_vocab_lines(&b, vocab, length)) && !(status = add_default_specials(&b)))
        status = builder_finish(&b, "vocabulary buffer", out);
    builder_free(&b);
    return status;
}

void tok_close(tok_tokenizer *tokenizer)
{
    if (!tokenizer) return;
    free(tokenizer->arena);
    free(tokenizer->id_text);
    free(tokenizer->words.slots);
    free(tokenizer->continuations.slots);
    free(tokenizer->continuation_prefix);
    added_free(&tokenizer->raw_added);
    added_free(&tokenizer->normalized_added);
    free(tokenizer);
}

const char *tok_token_text(const tok_tokenizer *tokenizer, int32_t id)
{
    if (!tokenizer || id < 0 || id >= tokenizer->id_count || tokenizer->id_text[id] == NO_TEXT)
        return NULL;
    return tokenizer->arena + tokenizer->id_text[id];
}

int tok_vocab_size(const tok_tokenizer *tokenizer)
{
    return tokenizer ? tokenizer->id_count : 0;
}

const tok_options *tok_get_options(const tok_tokenizer *tokenizer)
{
    return tokenizer ? &tokenizer->options : NULL;
}

int32_t tok_cls_id(const tok_tokenizer *tokenizer)
{
    return tokenizer ? tokenizer->cls_id : -1;
}

int32_t tok_sep_id(const tok_tokenizer *tokenizer)
{
    return tokenizer ? tokenizer->sep_id : -1;
}

int32_t tok_unk_id(const tok_tokenizer *tokenizer)
{
    return tokenizer ? tokenizer->unk_id : -1;
}
