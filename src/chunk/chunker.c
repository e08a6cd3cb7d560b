/* The chunker (chunker.h). One scan cuts the document into pieces (sentences and lines) and notes
 * the strength of the boundary before each; a recursive packer splits a range at its strongest
 * boundaries, packs the groups that fit and splits the others further. Each piece is tokenized
 * alone once; sums stand for longer texts, and each chunk is tokenized once more, with its
 * prompt and title, to check and report its exact count. */
#include "chunk/chunker.h"

#include "util/error.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

/* Boundary strengths: a range is split at the strongest boundaries inside it. Pieces meet at
 * whitespace or just after punctuation, where BERT's pre-tokenizer always cuts, so the tokens of
 * a run of pieces are the sum of the pieces' own counts. */
enum {
    LEVEL_SUBWORD = 0,   /* after punctuation inside a word, around a CJK ideograph */
    LEVEL_WORD = 1,      /* whitespace inside a sentence */
    LEVEL_CLAUSE = 2,    /* after , ; : and the CJK commas */
    LEVEL_LINE = 3,      /* a line break inside a paragraph (hard-wrapped prose, code) */
    LEVEL_SENTENCE = 4,  /* a sentence end, or a line break before a list item or table row */
    LEVEL_PARAGRAPH = 5, /* a blank line */
    LEVEL_HEADING = 6,   /* before a `######` heading; a `#` heading is LEVEL_HEADING + 5 */
    LEVEL_DOCUMENT = 12, /* before the first piece */
};

/* What the items of a range are, which says how a single item too long for a chunk is split. */
typedef enum chunk_grain {
    GRAIN_PIECE,   /* sentences, lines, headings: split into words */
    GRAIN_WORD,    /* split into subwords */
    GRAIN_SUBWORD, /* split between grapheme clusters */
} chunk_grain;

/* ATX headings run from `#` to `######`; CommonMark allows up to three spaces before them. */
#define MAX_HEADING_DEPTH 6
#define MAX_HEADING_INDENT 3
/* A code fence is at least three backticks or tildes. */
#define MIN_FENCE_LENGTH 3
/* An ordered list item's number has at most nine digits (CommonMark). */
#define MAX_LIST_NUMBER_DIGITS 9
/* First sizes of the growing arrays. */
#define INITIAL_ITEMS 256
#define INITIAL_SPANS 16

/* A piece of the text: [start, end) with no whitespace at either end. */
typedef struct chunk_item {
    size_t start, end;
    int tokens; /* alone, without [CLS] and [SEP] */
    int level;  /* strength of the boundary before it */
} chunk_item;

typedef struct item_array {
    chunk_item *items;
    size_t count, capacity;
} item_array;

/* A run of items packed as one: a group that the current level does not split. */
typedef struct chunk_unit {
    size_t first, last; /* items[first, last) */
    int64_t tokens;     /* sum of the items' counts */
} chunk_unit;

typedef struct chunker {
    const tok_tokenizer *tok;
    const unsigned char *text;
    size_t length;
    const char *prefix; /* what goes before each chunk: prompt, title and separator; or NULL */
    int max_tokens;
    int budget;         /* tokens left for a chunk's own text, by the sum of its pieces */
    int overlap;        /* at most budget / 2 */
    bool clean_text;    /* the tokenizer drops control characters */
    bool chinese_chars; /* the tokenizer makes each CJK ideograph a word */
    int32_t *ids;       /* room for max_tokens + 1 ids, for counting */
    chunk_span *spans;
    size_t count, capacity;
} chunker;

/* ------------------------------------------------------------------------------------------ */
/* Characters. The text has passed the tokenizer's UTF-8 check before any of these run. */

static uint32_t utf8_next(const unsigned char *s, size_t *i)
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

/* The code point that ends at s[end] (end > 0). */
static uint32_t utf8_before(const unsigned char *s, size_t end)
{
    size_t start = end - 1;
    while (start > 0 && (s[start] & 0xC0) == 0x80) start--;
    return utf8_next(s, &start);
}

/* Whitespace exactly where the tokenizer ends a word: clean_text drops control characters
 * before the pre-tokenizer sees them, so \v, \f and U+0085 then join their neighbours. */
static bool is_space(const chunker *c, uint32_t cp)
{
    if (cp == ' ' || cp == '\n' || cp == '\t' || cp == '\r') return true;
    if (cp < 0x80 && cp != 0x0B && cp != 0x0C) return false;
    return tok_char_is_whitespace(cp) && !(c->clean_text && tok_char_is_control(cp));
}

/* Whitespace that the tokenizer drops rather than splits at (\v, \f, U+0085 when it cleans): it
 * neither ends a piece nor begins or ends one, like the characters it drops. */
static bool is_dropped_space(const chunker *c, uint32_t cp)
{
    return !is_space(c, cp) && tok_char_is_whitespace(cp);
}

/* Whether text[start, end) is a list number ("12.") or a single character ("a."), whose end
 * mark does not end a sentence. */
static bool is_marker(const unsigned char *s, size_t start, size_t end)
{
    size_t i = start;
    utf8_next(s, &i);
    if (i >= end) return true;
    for (i = start; i < end && s[i] >= '0' && s[i] <= '9'; i++) continue;
    return i == end;
}

/* Sentence ends: 1 for marks that end a sentence only before whitespace (3.5, e.g. and URLs
 * keep theirs), 2 for the CJK full stops, which need none. */
static int sentence_end_kind(uint32_t cp)
{
    switch (cp) {
    case '.':
    case '!':
    case '?':
    case 0x061F: /* ؟ Arabic question mark */
    case 0x06D4: /* ۔ Urdu full stop */
    case 0x0964: /* । Devanagari danda */
    case 0x0965: /* ॥ */
    case 0x2026: /* … */
    case 0x203C: /* ‼ */
    case 0x203D: /* ‽ */
    case 0x2047: /* ⁇ */
    case 0x2048: /* ⁈ */
    case 0x2049: /* ⁉ */
        return 1;
    case 0x3002: /* 。 */
    case 0xFF01: /* ！ */
    case 0xFF0E: /* ． */
    case 0xFF1F: /* ？ */
    case 0xFF61: /* ｡ */
        return 2;
    default:
        return 0;
    }
}

/* Marks that close a sentence after its end mark: quotes, brackets, Markdown emphasis. */
static bool is_closer(uint32_t cp)
{
    switch (cp) {
    case '"':
    case '\'':
    case ')':
    case ']':
    case '}':
    case '*':
    case '_':
    case 0x00BB: /* » */
    case 0x2019: /* ’ */
    case 0x201D: /* ” */
    case 0x203A: /* › */
    case 0x3009: /* 〉 */
    case 0x300B: /* 》 */
    case 0x300D: /* 」 */
    case 0x300F: /* 』 */
    case 0x3011: /* 】 */
    case 0xFF09: /* ） */
    case 0xFF3D: /* ］ */
        return true;
    default:
        return false;
    }
}

/* Clause marks: 1 for those that end a clause before whitespace, 2 for the CJK ones (and the CJK
 * full stops, for sentences the scan kept whole) that need none. */
static int clause_end_kind(uint32_t cp)
{
    switch (cp) {
    case ',':
    case ';':
    case ':':
    case 0x2013: /* – */
    case 0x2014: /* — */
        return 1;
    case 0x3001: /* 、 */
    case 0xFF0C: /* ， */
    case 0xFF1A: /* ： */
    case 0xFF1B: /* ； */
        return 2;
    default:
        return sentence_end_kind(cp);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Counting and output. */

/* Tokens of text[start, end) alone, without [CLS] and [SEP], but no more than budget + 1: a
 * piece longer than a chunk is split whatever its length, so the tokenizer may stop there, and
 * a long piece costs no more to count than a chunk. */
static int count_alone(const chunker *c, size_t start, size_t end, int *tokens)
{
    int n = tok_encode(c->tok, NULL, (const char *)c->text + start, end - start, c->ids,
                       c->budget + 3, NULL);
    if (n < 0) return n;
    *tokens = n - 2;
    return 0;
}

/* The length of the sequence the engine will embed for text[start, end) when it is at most
 * max_tokens, else max_tokens + 1. */
static int count_embedded(const chunker *c, size_t start, size_t end, int *tokens)
{
    int n = tok_encode(c->tok, c->prefix, (const char *)c->text + start, end - start, c->ids,
                       c->max_tokens + 1, NULL);
    if (n < 0) return n;
    *tokens = n;
    return 0;
}

static int grow(void **array, size_t *capacity, size_t needed, size_t element, size_t initial)
{
    if (needed <= *capacity) return 0;
    size_t n = *capacity ? *capacity : initial;
    while (n < needed) {
        if (n > SIZE_MAX / 2 / element) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
        n *= 2;
    }
    void *p = realloc(*array, n * element);
    if (!p) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for %zu chunk entries", n);
    *array = p;
    *capacity = n;
    return 0;
}

static int append_span(chunker *c, size_t start, size_t end, int tokens)
{
    int status =
        grow((void **)&c->spans, &c->capacity, c->count + 1, sizeof *c->spans, INITIAL_SPANS);
    if (status) return status;
    c->spans[c->count++] = (chunk_span){start, end, tokens};
    return 0;
}

/* Adds text[start, end) as an item, counted alone. */
static int append_item(const chunker *c, item_array *a, size_t start, size_t end, int level)
{
    int tokens = 0;
    int status = count_alone(c, start, end, &tokens);
    if (status) return status;
    status = grow((void **)&a->items, &a->capacity, a->count + 1, sizeof *a->items, INITIAL_ITEMS);
    if (status) return status;
    a->items[a->count++] = (chunk_item){start, end, tokens, level};
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* The scan: lines, Markdown blocks and sentences. */

static size_t skip_spaces(const unsigned char *s, size_t i, size_t end, size_t most)
{
    size_t n = 0;
    while (i < end && s[i] == ' ' && n < most) {
        i++;
        n++;
    }
    return i;
}

/* The end of text[start, end) without the whitespace at its end. */
static size_t trim_end(const chunker *c, size_t start, size_t end)
{
    while (end > start) {
        size_t before = end - 1;
        while (before > start && (c->text[before] & 0xC0) == 0x80) before--;
        size_t i = before;
        if (!tok_char_is_whitespace(utf8_next(c->text, &i))) break;
        end = before;
    }
    return end;
}

static bool is_blank(const chunker *c, size_t i, size_t end)
{
    while (i < end)
        if (!is_space(c, utf8_next(c->text, &i))) return false;
    return true;
}

/* The depth of the ATX heading that starts at s[i] (after the indentation), or 0. */
static int heading_depth(const unsigned char *s, size_t i, size_t end)
{
    int depth = 0;
    while (i < end && s[i] == '#' && depth <= MAX_HEADING_DEPTH) {
        i++;
        depth++;
    }
    if (depth == 0 || depth > MAX_HEADING_DEPTH) return 0;
    return i == end || s[i] == ' ' || s[i] == '\t' || s[i] == '\r' ? depth : 0;
}

/* Whether a list item or a table row starts at s[i] (after the indentation). */
static bool starts_list_item(const unsigned char *s, size_t i, size_t end)
{
    if (i >= end) return false;
    if (s[i] == '|') return true;
    size_t j = i;
    if (s[i] == '-' || s[i] == '*' || s[i] == '+') {
        j = i + 1;
    } else {
        while (j < end && j - i < MAX_LIST_NUMBER_DIGITS && s[j] >= '0' && s[j] <= '9') j++;
        if (j == i || j >= end || (s[j] != '.' && s[j] != ')')) return false;
        j++;
    }
    return j == end || s[j] == ' ' || s[j] == '\t';
}

/* The length of the run of backticks or tildes at s[i], when it can be a fence, else 0. */
static size_t fence_run(const unsigned char *s, size_t i, size_t end)
{
    if (i >= end || (s[i] != '`' && s[i] != '~')) return 0;
    size_t j = i;
    while (j < end && s[j] == s[i]) j++;
    return j - i >= MIN_FENCE_LENGTH ? j - i : 0;
}

/* Cuts the line s[i, end) into sentences. `*pending` is the strength of the boundary before the
 * first; on return, that of the boundary after the last (LEVEL_SENTENCE after an end mark, 0
 * otherwise). A heading waiting at *heading (else SIZE_MAX) becomes the start of the first. */
static int scan_sentences(const chunker *c, size_t i, size_t end, int *pending, size_t *heading,
                          item_array *a)
{
    const unsigned char *s = c->text;
    size_t start = SIZE_MAX, last = i;
    while (i < end) {
        size_t at = i;
        uint32_t cp = utf8_next(s, &i);
        if (is_space(c, cp) || is_dropped_space(c, cp)) continue;
        if (start == SIZE_MAX) start = at;
        last = i;
        int kind = sentence_end_kind(cp);
        if (!kind || (kind == 1 && is_marker(s, start, at))) continue;
        while (i < end) {
            size_t j = i;
            uint32_t next = utf8_next(s, &j);
            int next_kind = sentence_end_kind(next);
            if (!next_kind && !is_closer(next)) break;
            if (next_kind > kind) kind = next_kind;
            i = last = j;
        }
        size_t after = i;
        if (kind == 2 || i == end || is_space(c, utf8_next(s, &after))) {
            int status = append_item(c, a, *heading != SIZE_MAX ? *heading : start, last, *pending);
            if (status) return status;
            *heading = SIZE_MAX;
            *pending = LEVEL_SENTENCE;
            start = SIZE_MAX;
        }
    }
    if (start != SIZE_MAX) {
        int status = append_item(c, a, *heading != SIZE_MAX ? *heading : start, last, *pending);
        if (status) return status;
        *heading = SIZE_MAX;
        *pending = 0;
    }
    return 0;
}

static int max_level(int a, int b)
{
    return a > b ? a : b;
}

/* Cuts the whole text into pieces: lines cut into sentences. A heading line starts the piece
 * after it, so that a chunk never holds a heading without the first words under it (it would
 * find nothing). Blank lines make no piece but a paragraph boundary. */
static int scan_pieces(const chunker *c, item_array *a)
{
    const unsigned char *s = c->text;
    size_t n = c->length;
    int pending = LEVEL_DOCUMENT;
    size_t heading = SIZE_MAX, heading_end = 0; /* a heading line waiting for its text */
    unsigned char fence_char = 0;
    size_t fence_length = 0;
    for (size_t line = 0; line < n;) {
        const unsigned char *newline = memchr(s + line, '\n', n - line);
        size_t end = newline ? (size_t)(newline - s) : n;
        size_t next = newline ? end + 1 : n;
        if (is_blank(c, line, end)) {
            pending = max_level(pending, LEVEL_PARAGRAPH);
            line = next;
            continue;
        }
        size_t p = skip_spaces(s, line, end, MAX_HEADING_INDENT);
        bool in_fence = fence_char != 0;
        size_t run = fence_run(s, p, end);
        if (run && !in_fence) {
            fence_char = s[p];
            fence_length = run;
        } else if (run && s[p] == fence_char && run >= fence_length && is_blank(c, p + run, end)) {
            fence_char = 0;
        }
        int depth = in_fence ? 0 : heading_depth(s, p, end);
        if (depth) {
            if (heading != SIZE_MAX) { /* a heading right under a heading stands alone */
                int status = append_item(c, a, heading, heading_end, pending);
                if (status) return status;
                pending = 0;
            }
            pending = max_level(pending, LEVEL_HEADING + MAX_HEADING_DEPTH - depth);
            heading = p;
            heading_end = trim_end(c, p, end);
            line = next;
            continue;
        }
        /* (Under a heading, pending is the heading's strength, above any of these.) */
        size_t q = line;
        while (q < end && (s[q] == ' ' || s[q] == '\t')) q++;
        bool item = !in_fence && starts_list_item(s, q, end);
        pending = max_level(pending, item ? LEVEL_SENTENCE : LEVEL_LINE);
        int status = scan_sentences(c, line, end, &pending, &heading, a);
        if (status) return status;
        line = next;
    }
    if (heading != SIZE_MAX) return append_item(c, a, heading, heading_end, pending);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Splitting below the pieces: words, subwords, then characters. */

static int pack(chunker *c, const chunk_item *items, size_t first, size_t last, chunk_grain grain,
                bool must_split);

/* Whether text[start, end) fits with its prompt and title; *tokens gets its count when it does. */
static int fits(const chunker *c, size_t start, size_t end, bool *result, int *tokens)
{
    int status = count_embedded(c, start, end, tokens);
    if (status) return status;
    *result = *tokens <= c->max_tokens;
    return 0;
}

/* The largest k in (from, to] such that text[bounds[from], bounds[k]) fits, found by doubling
 * then bisecting, so that each chunk costs tokenizations of at most twice its own length (a
 * count may dip where a word passes 100 characters and becomes one [UNK]; any k found fits).
 * *found is `from` when not even bounds[from + 1] fits. */
static int longest_fit(const chunker *c, const size_t *bounds, size_t from, size_t to,
                       size_t *found, int *tokens)
{
    size_t good = from, bad = to + 1, step = 1;
    while (good < to) {
        size_t k = to - good < step ? to : good + step;
        bool ok = false;
        int count = 0;
        int status = fits(c, bounds[from], bounds[k], &ok, &count);
        if (status) return status;
        if (!ok) {
            bad = k;
            break;
        }
        good = k;
        *tokens = count;
        step *= 2;
    }
    while (bad - good > 1) {
        size_t k = good + (bad - good) / 2;
        bool ok = false;
        int count = 0;
        int status = fits(c, bounds[from], bounds[k], &ok, &count);
        if (status) return status;
        if (ok) {
            good = k;
            *tokens = count;
        } else {
            bad = k;
        }
    }
    *found = good;
    return 0;
}

/* Offsets of the code points of text[start, end), and `end`, into *out (malloc'd); with
 * `clusters`, only those that begin an extended grapheme cluster (an emoji with its modifiers
 * and joiners, a letter with its marks), so that a cut keeps them whole. */
static int char_bounds(const chunker *c, size_t start, size_t end, bool clusters, size_t **out,
                       size_t *count)
{
    size_t *b = malloc((end - start + 1) * sizeof *b);
    if (!b)
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for a %zu-byte word", end - start);
    size_t n = 0, i = start;
    utf8proc_int32_t state = 0;
    uint32_t previous = 0;
    while (i < end) {
        size_t at = i;
        uint32_t cp = utf8_next(c->text, &i);
        if (n == 0 || !clusters ||
            utf8proc_grapheme_break_stateful((utf8proc_int32_t)previous, (utf8proc_int32_t)cp,
                                             &state))
            b[n++] = at;
        previous = cp;
    }
    b[n++] = end;
    *out = b;
    *count = n;
    return 0;
}

/* The last resort for a subword too long for any chunk (a run of punctuation marks, or of
 * letters without any at small limits: a run longer than 100 characters is one [UNK]): the
 * longest run of whole grapheme clusters that fits. Each part is counted with its prompt and
 * title directly; one the model would see nothing of makes no chunk. No overlap here. */
static int cut_characters(chunker *c, size_t start, size_t end)
{
    size_t *bounds = NULL, count = 0;
    int status = char_bounds(c, start, end, true, &bounds, &count);
    if (status) return status;
    size_t last = count - 1;
    for (size_t at = 0; at < last;) {
        size_t cut = at;
        int tokens = 0;
        status = longest_fit(c, bounds, at, last, &cut, &tokens);
        if (status) goto free_bounds;
        if (cut == at) {
            /* Not even one cluster fits: its code points, one by one at worst. */
            size_t *points = NULL, points_count = 0, point = 0;
            status = char_bounds(c, bounds[at], bounds[at + 1], false, &points, &points_count);
            if (status) goto free_bounds;
            status = longest_fit(c, points, 0, points_count - 1, &point, &tokens);
            size_t cluster_cut = points[point];
            free(points);
            if (status) goto free_bounds;
            if (point == 0) {
                status = err_set(EMBEDRAG_ERR_TOO_LONG,
                                 "the character at byte offset %zu needs more tokens than the %d "
                                 "that max_tokens leaves with the prompt and title",
                                 bounds[at], c->budget);
                goto free_bounds;
            }
            int content = 0;
            status = count_alone(c, bounds[at], cluster_cut, &content);
            if (!status && content > 0) status = append_span(c, bounds[at], cluster_cut, tokens);
            if (status) goto free_bounds;
            /* The rest of the cluster starts the next part. */
            bounds[at] = cluster_cut;
            continue;
        }
        int content = 0;
        status = count_alone(c, bounds[at], bounds[cut], &content);
        if (!status && content > 0) status = append_span(c, bounds[at], bounds[cut], tokens);
        if (status) goto free_bounds;
        at = cut;
    }
free_bounds:
    free(bounds);
    return status;
}

/* Splits a piece too long for a chunk into words: at whitespace, and after CJK clause marks,
 * which need none; a boundary after a clause mark is a clause boundary. (A heading's end, the
 * only line break inside a piece, is a word boundary: its text's first words go with it.) */
static int split_words(chunker *c, const chunk_item *piece, bool must_split)
{
    const unsigned char *s = c->text;
    item_array words = {0};
    int status = 0;
    int level = LEVEL_DOCUMENT;
    size_t start = SIZE_MAX, last = piece->start;
    for (size_t i = piece->start; i < piece->end;) {
        size_t at = i;
        uint32_t cp = utf8_next(s, &i);
        if (is_space(c, cp)) {
            if (start != SIZE_MAX) {
                status = append_item(c, &words, start, last, level);
                if (status) goto free_words;
                level = clause_end_kind(utf8_before(s, last)) ? LEVEL_CLAUSE : LEVEL_WORD;
                start = SIZE_MAX;
            }
            continue;
        }
        if (is_dropped_space(c, cp)) continue;
        if (start == SIZE_MAX) start = at;
        last = i;
        if (clause_end_kind(cp) == 2) {
            status = append_item(c, &words, start, last, level);
            if (status) goto free_words;
            level = LEVEL_CLAUSE;
            start = SIZE_MAX;
        }
    }
    if (start != SIZE_MAX) {
        status = append_item(c, &words, start, last, level);
        if (status) goto free_words;
    }
    if (words.count > 0) status = pack(c, words.items, 0, words.count, GRAIN_WORD, must_split);
free_words:
    free(words.items);
    return status;
}

/* Whether the tokenizer puts a word boundary between code points a and b whatever surrounds
 * them (after punctuation; around a CJK ideograph when the model spaces them), and a cut there
 * keeps grapheme clusters whole. */
static bool subword_boundary(const chunker *c, uint32_t a, uint32_t b)
{
    bool cut = (tok_char_is_punctuation(a) && !tok_char_is_punctuation(b)) ||
               (c->chinese_chars && (tok_char_is_chinese(a) || tok_char_is_chinese(b)));
    return cut && utf8proc_grapheme_break((utf8proc_int32_t)a, (utf8proc_int32_t)b);
}

/* Splits a word too long for a chunk (a URL, base64, a run of CJK) into subwords, cut after
 * runs of punctuation and around ideographs: the tokenizer cuts there too, so their counts add
 * up, and a chunk of whole subwords ends at a natural place ("https://example.org/" +
 * "path/"). */
static int split_subwords(chunker *c, const chunk_item *word, bool must_split)
{
    const unsigned char *s = c->text;
    item_array parts = {0};
    int status = 0;
    size_t start = word->start, i = word->start;
    uint32_t previous = utf8_next(s, &i);
    while (i < word->end) {
        size_t at = i;
        uint32_t cp = utf8_next(s, &i);
        if (subword_boundary(c, previous, cp)) {
            status = append_item(c, &parts, start, at,
                                 start == word->start ? LEVEL_DOCUMENT : LEVEL_SUBWORD);
            if (status) goto free_parts;
            start = at;
        }
        previous = cp;
    }
    status = append_item(c, &parts, start, word->end,
                         start == word->start ? LEVEL_DOCUMENT : LEVEL_SUBWORD);
    if (status) goto free_parts;
    status = pack(c, parts.items, 0, parts.count, GRAIN_SUBWORD, must_split);
free_parts:
    free(parts.items);
    return status;
}

/* ------------------------------------------------------------------------------------------ */
/* Packing. */

/* Emits units[*seed, *j) as one chunk (units before i are overlap) after counting it with its
 * prompt and title. Sums are exact where pieces meet at whitespace or punctuation, but a prompt
 * that ends inside a word glues onto the text's first word (and an added token such as [SEP]
 * cut at its brackets counts less whole): if the count is over, the overlap goes, then units
 * from the end, then the one unit left is split further. The overlap is counted too, so that it
 * never exceeds c->overlap. *emitted tells whether a chunk came out of units[*seed, *j) itself
 * (and may lend its tail to the next). */
static int emit_units(chunker *c, const chunk_item *items, const chunk_unit *units, size_t *seed,
                      size_t i, size_t *j, chunk_grain grain, bool *emitted)
{
    *emitted = false;
    for (;;) {
        int64_t content = 0;
        for (size_t k = *seed; k < *j; k++) content += units[k].tokens;
        /* Nothing the model would see (control characters alone): no chunk. */
        if (content == 0) return 0;
        size_t start = items[units[*seed].first].start;
        size_t end = items[units[*j - 1].last - 1].end;
        int tokens = 0, repeated = 0;
        int status = 0;
        if (*seed < i) {
            status = count_alone(c, start, items[units[i - 1].last - 1].end, &repeated);
            if (status) return status;
            if (repeated > c->overlap) {
                *seed = i;
                continue;
            }
        }
        status = count_embedded(c, start, end, &tokens);
        if (status) return status;
        if (tokens <= c->max_tokens) {
            *emitted = true;
            return append_span(c, start, end, tokens);
        }
        if (*seed < i) {
            *seed = i;
        } else if (*j > i + 1) {
            /* At least one token goes, not only units of none (a long run of them would make
             * this quadratic). */
            int64_t removed = 0;
            while (*j > i + 1 && removed == 0) removed += units[--*j].tokens;
        } else {
            return pack(c, items, units[i].first, units[i].last, grain, true);
        }
    }
}

/* Chunks items[first, last): splits the range at its strongest boundaries into units, packs
 * consecutive units that fit greedily (each chunk may begin with up to `overlap` tokens of the
 * previous chunk's trailing units, never its first, so that chunks always move on) and splits
 * each unit too long for a chunk recursively. A single item that must be split goes down a
 * grain (chunk_grain). `must_split`: the range did not fit although its sum did. */
static int pack(chunker *c, const chunk_item *items, size_t first, size_t last, chunk_grain grain,
                bool must_split)
{
    if (last - first == 1 && (must_split || items[first].tokens > c->budget)) {
        const chunk_item *item = &items[first];
        if (grain == GRAIN_PIECE) return split_words(c, item, must_split);
        if (grain == GRAIN_WORD) return split_subwords(c, item, must_split);
        return cut_characters(c, item->start, item->end);
    }
    int strength = 0;
    for (size_t k = first + 1; k < last; k++) strength = max_level(strength, items[k].level);
    size_t unit_count = 1;
    for (size_t k = first + 1; k < last; k++) unit_count += items[k].level >= strength;
    chunk_unit *units = malloc(unit_count * sizeof *units);
    if (!units) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for %zu units", unit_count);
    size_t m = 0;
    for (size_t k = first; k < last; k++) {
        if (k == first || items[k].level >= strength) units[m++] = (chunk_unit){k, k, 0};
        units[m - 1].last = k + 1;
        units[m - 1].tokens += items[k].tokens;
    }

    /* Overlap repeats text of the same section only. */
    bool may_overlap = c->overlap > 0 && strength < LEVEL_HEADING;
    int status = 0;
    size_t previous = SIZE_MAX; /* first unit of the chunk just emitted from units before i */
    for (size_t i = 0; i < m;) {
        if (units[i].tokens > c->budget) {
            status = pack(c, items, units[i].first, units[i].last, grain, true);
            if (status) break;
            previous = SIZE_MAX;
            i++;
            continue;
        }
        size_t seed = i;
        int64_t tokens = units[i].tokens, repeated = 0;
        while (may_overlap && previous != SIZE_MAX && seed > previous + 1 &&
               repeated + units[seed - 1].tokens <= c->overlap &&
               tokens + units[seed - 1].tokens <= c->budget) {
            seed--;
            repeated += units[seed].tokens;
            tokens += units[seed].tokens;
        }
        size_t j = i + 1;
        while (j < m && tokens + units[j].tokens <= c->budget) tokens += units[j++].tokens;
        bool emitted = false;
        status = emit_units(c, items, units, &seed, i, &j, grain, &emitted);
        if (status) break;
        previous = emitted ? seed : SIZE_MAX;
        i = j;
    }
    free(units);
    return status;
}

/* ------------------------------------------------------------------------------------------ */
/* Entry points. */

chunk_options chunk_default_options(int max_tokens)
{
    chunk_options o = {max_tokens, CHUNK_DEFAULT_OVERLAP_TOKENS, NULL, NULL};
    return o;
}

void chunk_list_free(chunk_list *list)
{
    if (!list) return;
    free(list->spans);
    list->spans = NULL;
    list->count = 0;
    list->title_used = false;
}

/* Joins prompt, title and separator into a malloc'd string. */
static char *join_prefix(const char *prompt, const char *title)
{
    size_t a = prompt ? strlen(prompt) : 0, b = strlen(title), d = strlen(CHUNK_TITLE_SEPARATOR);
    char *p = malloc(a + b + d + 1);
    if (!p) return NULL;
    if (a) memcpy(p, prompt, a);
    memcpy(p + a, title, b);
    memcpy(p + a + b, CHUNK_TITLE_SEPARATOR, d + 1);
    return p;
}

/* Decides whether the title goes before each chunk (chunker.h, CHUNK_MIN_TEXT_TOKENS), sets the
 * prefix and the budget. *joined receives the string to free, or NULL. */
static int plan_budget(chunker *c, const chunk_options *o, char **joined, bool *title_used)
{
    *joined = NULL;
    *title_used = false;
    const char *prompt = o->prompt && *o->prompt ? o->prompt : NULL;
    int prompt_tokens = tok_count(c->tok, prompt);
    if (prompt_tokens < 0) return err_prefix(prompt_tokens, "chunk prompt: ");
    int room = o->max_tokens - 2 - prompt_tokens;
    if (room < 1)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                       "the prompt takes %d of the %d tokens of a sequence and leaves none for "
                       "text",
                       prompt_tokens, o->max_tokens);
    c->prefix = prompt;
    c->budget = room;
    if (!o->title || !*o->title) return 0;
    int title_tokens = tok_count(c->tok, o->title);
    if (title_tokens < 0) return err_prefix(title_tokens, "chunk title: ");
    if (title_tokens == 0) return 0; /* nothing the model would see */
    char *prefix = join_prefix(prompt, o->title);
    if (!prefix) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for the title");
    int prefix_tokens = tok_count(c->tok, prefix);
    int room_with_title = o->max_tokens - 2 - prefix_tokens;
    if (prefix_tokens >= 0 && (room_with_title >= CHUNK_MIN_TEXT_TOKENS ||
                               (room_with_title >= 1 && 2 * (int64_t)room_with_title >= room))) {
        c->prefix = prefix;
        c->budget = room_with_title;
        *joined = prefix;
        *title_used = true;
        return 0;
    }
    free(prefix);
    return 0;
}

int chunk_text(const tok_tokenizer *tokenizer, const char *text, size_t length,
               const chunk_options *options, chunk_list *out)
{
    if (!out) return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "chunk_text: no output list");
    *out = (chunk_list){0};
    if (!tokenizer || !options || (!text && length > 0))
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                       "chunk_text: needs a tokenizer, options and a text");
    if (options->max_tokens < 3)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                       "chunk_text: max_tokens is %d; a sequence needs [CLS], [SEP] and at least "
                       "one token of text",
                       options->max_tokens);
    if (options->max_tokens > CHUNK_MAX_TOKENS)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "chunk_text: max_tokens is %d (> %d)",
                       options->max_tokens, CHUNK_MAX_TOKENS);
    if (options->overlap_tokens < 0)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "chunk_text: overlap_tokens is %d (< 0)",
                       options->overlap_tokens);
    if (!text) text = "";
    /* The tokenizer's own check, for its message with the byte offset; with no count wanted it
     * stops tokenizing at once. */
    int32_t ids[2];
    int status = tok_encode(tokenizer, NULL, text, length, ids, 2, NULL);
    if (status < 0) return status;

    chunker c = {0};
    c.ids = malloc(((size_t)options->max_tokens + 1) * sizeof *c.ids);
    if (!c.ids)
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for %d ids", options->max_tokens);
    c.tok = tokenizer;
    c.text = (const unsigned char *)text;
    c.length = length;
    c.max_tokens = options->max_tokens;
    c.clean_text = tok_get_options(tokenizer)->clean_text;
    c.chinese_chars = tok_get_options(tokenizer)->handle_chinese_chars;
    char *joined = NULL;
    bool title_used = false;
    status = plan_budget(&c, options, &joined, &title_used);
    if (status) goto free_ids;
    c.overlap = options->overlap_tokens < c.budget / 2 ? options->overlap_tokens : c.budget / 2;

    item_array pieces = {0};
    status = scan_pieces(&c, &pieces);
    if (status) goto free_pieces;
    if (pieces.count > 0) status = pack(&c, pieces.items, 0, pieces.count, GRAIN_PIECE, false);
    if (status) goto free_pieces;
    out->spans = c.spans;
    out->count = c.count;
    out->title_used = title_used;
    c.spans = NULL;
free_pieces:
    free(pieces.items);
    free(c.spans);
    free(joined);
free_ids:
    free(c.ids);
    return status;
}
