/* Encoding, the hot path: UTF-8 checking and decoding, BertNormalizer, BertPreTokenizer,
 * WordPiece and added-token matching, streamed over the text in one pass with no allocation per
 * character or word. tok_encode, tok_count and tok_normalize are its public entry points. */
#include "tokenizer/tokenizer_internal.h"

#include "util/error.h"
#include "util/utf8.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

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

/* ------------------------------------------------------------------------------------------ */
/* UTF-8. */

/* Checks that s[0, n) is UTF-8 (util/utf8.h says which forms are). Returns n, or the offset of
 * the first byte of the first bad sequence. */
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
        size_t length = utf8_sequence_length(s + i, n - i);
        if (!length) return i;
        i += length;
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
    bool keep_end; /* out is a ring that keeps the last `capacity` pieces (left truncation) */
    bool stopped;  /* out is full and the count is not wanted, or an allocation failed */
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
    e->keep_end = false;
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

static inline void emit(encoder *e, int32_t id)
{
    if (e->keep_end) {
        if (e->capacity > 0) e->out[e->produced % e->capacity] = id;
        e->produced++;
        return;
    }
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
        const tok_vocab_table *table = start == 0 ? &t->words : &t->continuations;
        size_t end = n;
        if (end - start > table->max_length) {
            end = start + table->max_length;
            while (end > start && (w[end] & 0xC0) == 0x80) end--;
        }
        int32_t id = TOK_SLOT_EMPTY;
        while (end > start) {
            id = tok_table_get(table, t->arena, w + start, end - start);
            if (id != TOK_SLOT_EMPTY) break;
            do end--;
            while (end > start && (w[end] & 0xC0) == 0x80);
        }
        if (id == TOK_SLOT_EMPTY) {
            /* Any unmatched remainder makes the whole word unknown. */
            emit(e, t->unk_id);
            return;
        }
        if (count == e->pieces_capacity &&
            !tok_grow((void **)&e->pieces, &e->pieces_capacity, count + 1, sizeof *e->pieces,
                      e->pieces_inline)) {
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
        !tok_grow((void **)&e->word, &e->word_capacity, e->word_length + 4, 1, e->word_inline)) {
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
        if (flags & TOK_ASCII_WHITESPACE) {
            word_end(e);
        } else if (flags & TOK_ASCII_PUNCTUATION) {
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
        !tok_grow((void **)&e->buffer, &e->buffer_capacity, e->buffer_length + 4, 1, NULL)) {
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
        !tok_grow((void **)&e->run, &e->run_capacity, e->run_length + 1, sizeof *e->run,
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
        if (flags & TOK_ASCII_DROP) return;
        if (flags & TOK_ASCII_TO_SPACE) cp = ' ';
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
static bool added_find(const tok_added_set *set, const unsigned char *s, size_t n, size_t *scan,
                       size_t segment_start, size_t *start, size_t *end, int32_t *id)
{
    for (size_t i = *scan; i < n; i++) {
        unsigned b = s[i];
        uint32_t first = set->first_start[b], last = set->first_start[b + 1];
        const tok_added_token *match = NULL;
        for (uint32_t k = first; k < last; k++) {
            const tok_added_token *a = &set->tokens[k];
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

static void reverse_ids(int32_t *v, int64_t n)
{
    for (int64_t i = 0, j = n - 1; i < j; i++, j--) {
        int32_t t = v[i];
        v[i] = v[j];
        v[j] = t;
    }
}

static int encode_ids(const tok_tokenizer *tokenizer, const char *prefix, const char *text,
                      size_t len, int32_t *ids, int max_tokens, int *untruncated, bool keep_end)
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
    encoder_init(&e, tokenizer, ids + 1, max_tokens - 2, untruncated != NULL || keep_end);
    e.keep_end = keep_end;
    encode_text(&e, s, n);
    status = e.status;
    int64_t produced = e.produced;
    encoder_free(&e);
    free(joined);
    if (status) return status;

    int64_t kept = produced < max_tokens - 2 ? produced : max_tokens - 2;
    if (keep_end && produced > kept && kept > 0) {
        /* The ring's oldest piece sits at produced % kept: rotate it to the front. */
        int64_t r = produced % kept;
        reverse_ids(ids + 1, r);
        reverse_ids(ids + 1 + r, kept - r);
        reverse_ids(ids + 1, kept);
    }
    ids[0] = tokenizer->cls_id;
    ids[kept + 1] = tokenizer->sep_id;
    if (untruncated) *untruncated = produced > INT_MAX - 2 ? INT_MAX : (int)produced + 2;
    return (int)kept + 2;
}

int tok_encode(const tok_tokenizer *tokenizer, const char *prefix, const char *text, size_t len,
               int32_t *ids, int max_tokens, int *untruncated)
{
    return encode_ids(tokenizer, prefix, text, len, ids, max_tokens, untruncated, false);
}

int tok_encode_tail(const tok_tokenizer *tokenizer, const char *prefix, const char *text,
                    size_t len, int32_t *ids, int max_tokens, int *untruncated)
{
    return encode_ids(tokenizer, prefix, text, len, ids, max_tokens, untruncated, true);
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
    if (!status &&
        !tok_grow((void **)&e->buffer, &e->buffer_capacity, e->buffer_length + 1, 1, NULL))
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
