/* Chunker tests on documents built from real sentences (the STS Benchmark dev set beside the
 * source tree) with all-MiniLM-L6-v2's tokenizer: every chunk of every document, under several
 * limits, overlaps, titles and prompts, is checked against its source (offsets, UTF-8 boundaries,
 * order, coverage) and re-tokenized here to check its count; plus the structure (headings,
 * paragraphs, sentences, grapheme clusters), the title policy, errors, and a 1 MB timing. */
#include "check.h"
#include "chunk/chunker.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MODEL_DIR "models/all-MiniLM-L6-v2"
#define MAX_SENTENCES 1500
/* The limits tried on every document: tiny, all-MiniLM-L6-v2's 256, BERT's 512, and between. */
static const int limits[] = {16, 64, 128, 256, 512};
#define LIMIT_COUNT (sizeof limits / sizeof limits[0])
/* About 10% of 256, the overlap a caller might ask for. */
#define SOME_OVERLAP 25
/* The timing document's size. */
#define TIMING_BYTES (1000u * 1000u)
/* Random documents in the mixed test. */
#define RANDOM_DOCUMENTS 300

static tok_tokenizer *tok;
static char *sentences[MAX_SENTENCES];
static int sentence_count;

static double now_seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* A small deterministic generator, so that failures reproduce. */
static uint64_t random_state = 0x9E3779B97F4A7C15ull;
static uint32_t random_below(uint32_t n)
{
    random_state ^= random_state << 13;
    random_state ^= random_state >> 7;
    random_state ^= random_state << 17;
    return (uint32_t)(random_state % n);
}

/* ------------------------------------------------------------------------------------------ */
/* Building documents, with the byte ranges of their sentences, paragraphs and sections. */

typedef struct range {
    size_t start, end;
} range;

typedef struct ranges {
    range *items;
    size_t count, capacity;
} ranges;

typedef struct document {
    char *text;
    size_t length, capacity;
    ranges sentences;  /* each sentence written with add_sentence */
    ranges paragraphs; /* from begin_block to end_block */
    ranges sections;   /* a heading and everything under it, up to the next heading as deep */
} document;

static void ranges_add(ranges *r, size_t start, size_t end)
{
    if (r->count == r->capacity) {
        r->capacity = r->capacity ? 2 * r->capacity : 64;
        r->items = realloc(r->items, r->capacity * sizeof *r->items);
    }
    r->items[r->count++] = (range){start, end};
}

static void add_bytes(document *d, const char *s, size_t n)
{
    if (d->length + n + 1 > d->capacity) {
        while (d->length + n + 1 > d->capacity) d->capacity = d->capacity ? 2 * d->capacity : 4096;
        d->text = realloc(d->text, d->capacity);
    }
    memcpy(d->text + d->length, s, n);
    d->length += n;
    d->text[d->length] = '\0';
}

static void add(document *d, const char *s)
{
    add_bytes(d, s, strlen(s));
}

static void add_sentence(document *d, const char *s)
{
    size_t start = d->length;
    add(d, s);
    ranges_add(&d->sentences, start, d->length);
}

static void document_free(document *d)
{
    free(d->text);
    free(d->sentences.items);
    free(d->paragraphs.items);
    free(d->sections.items);
    memset(d, 0, sizeof *d);
}

static const char *random_sentence(void)
{
    return sentences[random_below((uint32_t)sentence_count)];
}

/* A paragraph of `count` sentences joined by spaces (or, hard-wrapped, by a line break before
 * the word that passes 72 columns). */
static void add_paragraph(document *d, int count, bool wrapped)
{
    size_t start = d->length, column = 0;
    for (int k = 0; k < count; k++) {
        const char *s = random_sentence();
        if (k > 0) {
            add(d, " ");
            column++;
        }
        if (!wrapped) {
            add_sentence(d, s);
            continue;
        }
        size_t sentence_start = d->length;
        for (const char *w = s; *w;) {
            const char *space = strchr(w, ' ');
            size_t n = space ? (size_t)(space - w) : strlen(w);
            if (column + n > 72 && column > 0) {
                if (d->text[d->length - 1] == ' ') d->length--;
                add(d, "\n");
                column = 0;
            }
            add_bytes(d, w, n);
            column += n;
            w += n;
            if (*w == ' ') {
                add(d, " ");
                column++;
                w++;
            }
        }
        ranges_add(&d->sentences, sentence_start, d->length);
    }
    ranges_add(&d->paragraphs, start, d->length);
}

/* Plain prose: paragraphs of 1 to 8 sentences separated by blank lines. */
static void make_plain(document *d, int paragraphs, bool wrapped)
{
    for (int p = 0; p < paragraphs; p++) {
        if (p > 0) add(d, random_below(4) == 0 ? "\n\n\n" : "\n\n");
        add_paragraph(d, 1 + (int)random_below(8), wrapped);
    }
}

/* Markdown: a title, sections and subsections of paragraphs and lists, and fenced code whose
 * comment lines start with '#' (not headings). Sections are recorded when the document ends. */
static void make_markdown(document *d, int sections)
{
    size_t heading_at[256];
    int heading_depth[256], headings = 0;
    heading_at[headings] = d->length;
    heading_depth[headings++] = 1;
    add(d, "# A document of real sentences\n\n");
    add_paragraph(d, 3, false);
    d->paragraphs.items[d->paragraphs.count - 1].start = heading_at[0];
    for (int s = 0; s < sections && headings < 250; s++) {
        char line[64];
        heading_at[headings] = d->length + 2;
        heading_depth[headings++] = 2;
        snprintf(line, sizeof line, "\n\n## Section %d\n\n", s + 1);
        add(d, line);
        add_paragraph(d, 1 + (int)random_below(6), false);
        /* A heading goes with the paragraph under it. */
        d->paragraphs.items[d->paragraphs.count - 1].start = heading_at[headings - 1];
        if (random_below(3) == 0) {
            add(d, "\n\n");
            for (int k = 0; k < 3; k++) {
                size_t start = d->length + (k ? 1 : 0);
                add(d, k ? "\n- " : "- ");
                add(d, random_sentence());
                ranges_add(&d->sentences, start, d->length);
            }
        }
        if (random_below(4) == 0) {
            add(d, "\n\n");
            size_t start = d->length;
            add(d, "```\n# a comment, not a heading\nx = 1\n```");
            ranges_add(&d->sentences, start, d->length);
            ranges_add(&d->paragraphs, start, d->length);
            add(d, "\n\n");
            add_paragraph(d, 2, false);
        }
        int subsections = (int)random_below(3);
        for (int k = 0; k < subsections && headings < 250; k++) {
            heading_at[headings] = d->length + 2;
            heading_depth[headings++] = 3;
            snprintf(line, sizeof line, "\n\n### Part %d.%d\n", s + 1, k + 1);
            add(d, line);
            add_paragraph(d, 1 + (int)random_below(10), false);
            d->paragraphs.items[d->paragraphs.count - 1].start = heading_at[headings - 1];
        }
    }
    for (int h = 0; h < headings; h++) {
        size_t end = d->length;
        for (int k = h + 1; k < headings; k++)
            if (heading_depth[k] <= heading_depth[h]) {
                end = heading_at[k];
                break;
            }
        while (end > heading_at[h] && (d->text[end - 1] == '\n' || d->text[end - 1] == ' ')) end--;
        ranges_add(&d->sections, heading_at[h], end);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Checking chunks. */

static bool is_continuation(unsigned char c)
{
    return (c & 0xC0) == 0x80;
}

static uint32_t decode_at(const char *text, size_t i)
{
    const unsigned char *s = (const unsigned char *)text;
    if (s[i] < 0x80) return s[i];
    if (s[i] < 0xE0) return ((uint32_t)(s[i] & 0x1F) << 6) | (s[i + 1] & 0x3F);
    if (s[i] < 0xF0)
        return ((uint32_t)(s[i] & 0x0F) << 12) | ((uint32_t)(s[i + 1] & 0x3F) << 6) |
               (s[i + 2] & 0x3F);
    return ((uint32_t)(s[i] & 0x07) << 18) | ((uint32_t)(s[i + 1] & 0x3F) << 12) |
           ((uint32_t)(s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F);
}

static uint32_t decode_before(const char *text, size_t end)
{
    size_t i = end - 1;
    while (i > 0 && is_continuation((unsigned char)text[i])) i--;
    return decode_at(text, i);
}

/* Tokens of text[start, end) alone, without [CLS] and [SEP]. */
static int count_alone(const char *text, size_t start, size_t end)
{
    int32_t ids[2];
    int untruncated = -1;
    int n = tok_encode(tok, NULL, text + start, end - start, ids, 2, &untruncated);
    return n < 0 ? n : untruncated - 2;
}

/* The sequence the engine embeds for a chunk, built here as one string (prompt, title and
 * separator, text) rather than through tok_encode's prefix, and counted. */
static int embedded_count(const chunk_options *o, bool title_used, const char *text, size_t start,
                          size_t end)
{
    size_t p = o->prompt ? strlen(o->prompt) : 0;
    size_t t = title_used ? strlen(o->title) + strlen(CHUNK_TITLE_SEPARATOR) : 0;
    char *s = malloc(p + t + end - start + 1);
    memcpy(s, o->prompt ? o->prompt : "", p);
    if (title_used) {
        memcpy(s + p, o->title, strlen(o->title));
        memcpy(s + p + strlen(o->title), CHUNK_TITLE_SEPARATOR, strlen(CHUNK_TITLE_SEPARATOR));
    }
    memcpy(s + p + t, text + start, end - start);
    int32_t ids[2];
    int untruncated = -1;
    int n = tok_encode(tok, NULL, s, p + t + end - start, ids, 2, &untruncated);
    free(s);
    return n < 0 ? n : untruncated;
}

/* The title policy of chunker.h, worked out here from counts. */
static bool title_expected(const chunk_options *o)
{
    if (!o->title || tok_count(tok, o->title) <= 0) return false;
    char joined[1 << 16];
    snprintf(joined, sizeof joined, "%s%s%s", o->prompt ? o->prompt : "", o->title,
             CHUNK_TITLE_SEPARATOR);
    int room = o->max_tokens - 2 - tok_count(tok, o->prompt);
    int with_title = o->max_tokens - 2 - tok_count(tok, joined);
    return with_title >= CHUNK_MIN_TEXT_TOKENS || (with_title >= 1 && 2 * with_title >= room);
}

/* Marks where Markdown headings start (lines of '#'s and a space, outside ``` fences). */
static unsigned char *heading_starts(const char *text, size_t length)
{
    unsigned char *marks = calloc(length + 1, 1);
    bool fenced = false;
    for (size_t line = 0; line < length;) {
        const char *newline = memchr(text + line, '\n', length - line);
        size_t end = newline ? (size_t)(newline - text) : length, p = line;
        while (p < end && p - line < 3 && text[p] == ' ') p++;
        if (end - p >= 3 && strncmp(text + p, "```", 3) == 0) fenced = !fenced;
        size_t q = p;
        while (q < end && text[q] == '#') q++;
        if (!fenced && q > p && q - p <= 6 && (q == end || text[q] == ' ')) marks[p] = 1;
        line = end + 1;
    }
    return marks;
}

/* The invariants every chunk list must keep. `what` names the case in messages. */
static void check_chunks(const char *what, const char *text, size_t length, const chunk_options *o,
                         const chunk_list *list)
{
    CHECK(list->count == 0 || list->spans != NULL, "%s: spans", what);
    CHECK(list->title_used == title_expected(o), "%s: title_used %d", what, list->title_used);
    int budget = o->max_tokens - 2;
    int overlap = o->overlap_tokens < budget / 2 ? o->overlap_tokens : budget / 2;
    unsigned char *covered = calloc(length + 1, 1), *headings = heading_starts(text, length);
    int failures = check_failures;
    for (size_t k = 0; k < list->count && check_failures - failures < 5; k++) {
        const chunk_span *c = &list->spans[k];
        CHECK(c->start < c->end && c->end <= length, "%s: chunk %zu is [%zu, %zu) of %zu bytes",
              what, k, c->start, c->end, length);
        if (!(c->start < c->end && c->end <= length)) continue;
        CHECK(!is_continuation((unsigned char)text[c->start]) &&
                  (c->end == length || !is_continuation((unsigned char)text[c->end])),
              "%s: chunk %zu [%zu, %zu) splits a UTF-8 sequence", what, k, c->start, c->end);
        CHECK(!tok_char_is_whitespace(decode_at(text, c->start)) &&
                  !tok_char_is_whitespace(decode_before(text, c->end)),
              "%s: chunk %zu [%zu, %zu) begins or ends with whitespace", what, k, c->start, c->end);
        int tokens = embedded_count(o, list->title_used, text, c->start, c->end);
        CHECK(c->tokens == tokens, "%s: chunk %zu [%zu, %zu) says %d tokens, is %d", what, k,
              c->start, c->end, c->tokens, tokens);
        CHECK(tokens <= o->max_tokens, "%s: chunk %zu [%zu, %zu) has %d tokens > %d", what, k,
              c->start, c->end, tokens, o->max_tokens);
        memset(covered + c->start, 1, c->end - c->start);
        if (k == 0) continue;
        const chunk_span *p = &list->spans[k - 1];
        CHECK(p->start < c->start && p->end < c->end, "%s: chunks %zu and %zu out of order", what,
              k - 1, k);
        if (c->start < p->end) {
            CHECK(overlap > 0, "%s: chunks %zu and %zu overlap without overlap_tokens", what, k - 1,
                  k);
            int repeated = count_alone(text, c->start, p->end);
            CHECK(repeated <= overlap, "%s: chunks %zu and %zu overlap by %d tokens > %d", what,
                  k - 1, k, repeated, overlap);
            for (size_t i = c->start; i < p->end; i++)
                if (headings[i]) {
                    CHECK(false, "%s: the overlap of chunks %zu and %zu holds a heading", what,
                          k - 1, k);
                    break;
                }
        }
    }
    /* What no chunk holds is whitespace, or text the model sees nothing of. */
    for (size_t i = 0; i < length;) {
        if (covered[i]) {
            i++;
            continue;
        }
        size_t end = i;
        while (end < length && !covered[end]) end++;
        int tokens = count_alone(text, i, end);
        CHECK(tokens == 0, "%s: bytes [%zu, %zu) (%d tokens) are in no chunk: \"%.20s\"", what, i,
              end, tokens, text + i);
        if (tokens) break;
        i = end;
    }
    free(covered);
    free(headings);
}

/* Whether some chunk holds all of r. */
static bool contained(const chunk_list *list, range r)
{
    for (size_t k = 0; k < list->count; k++)
        if (list->spans[k].start <= r.start && list->spans[k].end >= r.end) return true;
    return false;
}

/* Every range of `rs` that fits in a chunk by itself lies whole in one chunk. */
static void check_kept_whole(const char *what, const char *kind, const document *d,
                             const ranges *rs, const chunk_options *o, const chunk_list *list)
{
    int kept = 0, fitting = 0;
    for (size_t i = 0; i < rs->count; i++) {
        range r = rs->items[i];
        if (embedded_count(o, list->title_used, d->text, r.start, r.end) > o->max_tokens) continue;
        fitting++;
        bool whole = contained(list, r);
        kept += whole;
        CHECK(whole, "%s: %s [%zu, %zu) fits a chunk but is split", what, kind, r.start, r.end);
        if (!whole) break;
    }
    (void)kept;
}

/* Where every sentence fits, chunks begin at a sentence's start and end at a sentence's end. */
static void check_sentence_bounds(const char *what, const document *d, const chunk_options *o,
                                  const chunk_list *list)
{
    for (size_t i = 0; i < d->sentences.count; i++) {
        range r = d->sentences.items[i];
        if (embedded_count(o, list->title_used, d->text, r.start, r.end) > o->max_tokens) return;
    }
    unsigned char *starts = calloc(d->length + 1, 1), *ends = calloc(d->length + 1, 1);
    for (size_t i = 0; i < d->sentences.count; i++) {
        starts[d->sentences.items[i].start] = 1;
        ends[d->sentences.items[i].end] = 1;
    }
    /* Headings count as sentences here. */
    for (size_t i = 0; i < d->sections.count; i++) {
        size_t h = d->sections.items[i].start, e = h;
        while (e < d->length && d->text[e] != '\n') e++;
        starts[h] = ends[e] = 1;
    }
    for (size_t k = 0; k < list->count; k++) {
        const chunk_span *c = &list->spans[k];
        CHECK(starts[c->start] && ends[c->end],
              "%s: chunk %zu [%zu, %zu) does not run from a sentence's start to one's end: "
              "\"%.30s\"",
              what, k, c->start, c->end, d->text + c->start);
        if (!(starts[c->start] && ends[c->end])) break;
    }
    free(starts);
    free(ends);
}

/* Chunks text with `o`, checks the invariants and returns the list (the caller frees it). */
static chunk_list chunk_checked(const char *what, const char *text, size_t length,
                                const chunk_options *o)
{
    chunk_list list;
    int status = chunk_text(tok, text, length, o, &list);
    CHECK(status == 0, "%s: chunk_text: %d %s", what, status, err_get());
    if (status == 0) check_chunks(what, text, length, o, &list);
    return list;
}

/* ------------------------------------------------------------------------------------------ */
/* The tests. */

/* Whether s has no end mark inside (where "Mr. Smith" would make the chunker see two sentences
 * and this test one), no word that starts a Markdown list item or heading at the start of a
 * line, and no fence. */
static bool plain_sentence(const char *s)
{
    for (const char *p = s; *p; p++) {
        if (strchr(".!?", *p)) {
            const char *q = p + 1;
            while (*q && strchr("\"')]}*_", *q)) q++;
            if (*q == ' ') return false;
        }
        if (strchr("#|`~", *p)) return false;
        if (p == s || p[-1] == ' ') {
            const char *q = p;
            while (*q >= '0' && *q <= '9') q++;
            if (q > p && (*q == '.' || *q == ')') && (q[1] == ' ' || !q[1])) return false;
            if (strchr("-+*", *p) && (p[1] == ' ' || !p[1])) return false;
        }
    }
    return true;
}

/* The first sentence of each STS-B dev pair, ending with an end mark, plain as above. */
static int load_sentences(void)
{
    static char *raw[MAX_SENTENCES];
    int n = check_stsb_sentences(raw, MAX_SENTENCES);
    for (int i = 0; i < n; i++) {
        char *line = raw[i], *end = line + strlen(line);
        while (end > line && end[-1] == ' ') *--end = '\0';
        if (end == line || !plain_sentence(line)) {
            free(line);
            continue;
        }
        size_t len = strlen(line);
        char *s = realloc(line, len + 2);
        if (!s) {
            free(line);
            continue;
        }
        if (!strchr(".!?", s[len - 1])) strcpy(s + len, ".");
        sentences[sentence_count++] = s;
    }
    return sentence_count > 100 ? 0 : -1;
}

static void test_plain(void)
{
    for (int wrapped = 0; wrapped < 2; wrapped++) {
        document d = {0};
        make_plain(&d, 120, wrapped);
        for (size_t l = 0; l < LIMIT_COUNT; l++) {
            for (int variant = 0; variant < 4; variant++) {
                chunk_options o = chunk_default_options(limits[l]);
                o.overlap_tokens = variant & 1 ? SOME_OVERLAP : 0;
                if (variant & 2) {
                    o.prompt = "passage: ";
                    o.title = "Sentences from the STS Benchmark";
                }
                char what[128];
                snprintf(what, sizeof what, "plain%s max %d overlap %d%s",
                         wrapped ? " wrapped" : "", o.max_tokens, o.overlap_tokens,
                         variant & 2 ? " titled" : "");
                chunk_list list = chunk_checked(what, d.text, d.length, &o);
                check_kept_whole(what, "paragraph", &d, &d.paragraphs, &o, &list);
                check_sentence_bounds(what, &d, &o, &list);
                if (limits[l] == 256 && variant == 0)
                    printf("%s: %zu bytes, %zu chunks\n", what, d.length, list.count);
                chunk_list_free(&list);
            }
        }
        document_free(&d);
    }
}

static void test_markdown(void)
{
    document d = {0};
    make_markdown(&d, 40);
    for (size_t l = 0; l < LIMIT_COUNT; l++) {
        for (int variant = 0; variant < 4; variant++) {
            chunk_options o = chunk_default_options(limits[l]);
            o.overlap_tokens = variant & 1 ? SOME_OVERLAP : 0;
            if (variant & 2) o.prompt = "passage: ";
            char what[128];
            snprintf(what, sizeof what, "markdown max %d overlap %d%s", o.max_tokens,
                     o.overlap_tokens, variant & 2 ? " prompt" : "");
            chunk_list list = chunk_checked(what, d.text, d.length, &o);
            check_kept_whole(what, "section", &d, &d.sections, &o, &list);
            check_kept_whole(what, "paragraph", &d, &d.paragraphs, &o, &list);
            check_sentence_bounds(what, &d, &o, &list);
            /* A heading stays with the text under it: no chunk ends with a heading line (every
             * heading here has a sentence under it that fits with it from 64 tokens on). */
            for (size_t k = 0; o.max_tokens >= 64 && k < list.count; k++) {
                size_t line = list.spans[k].end;
                while (line > list.spans[k].start && d.text[line - 1] != '\n') line--;
                for (size_t h = 0; h < d.sections.count; h++)
                    CHECK(d.sections.items[h].start != line,
                          "%s: chunk %zu ends with a heading: \"%.40s\"", what, k, d.text + line);
            }
            if (limits[l] == 256 && variant == 0)
                printf("%s: %zu bytes, %zu sections, %zu chunks\n", what, d.length,
                       d.sections.count, list.count);
            chunk_list_free(&list);
        }
    }
    document_free(&d);
}

/* One paragraph of 3,000 sentences and no line break: cut at sentence ends, and with overlap
 * some chunks repeat whole sentences of the one before. */
static void test_huge_paragraph(void)
{
    document d = {0};
    add_paragraph(&d, 3000, false);
    for (size_t l = 0; l < LIMIT_COUNT; l++) {
        for (int overlap = 0; overlap <= SOME_OVERLAP; overlap += SOME_OVERLAP) {
            chunk_options o = chunk_default_options(limits[l]);
            o.overlap_tokens = overlap;
            char what[128];
            snprintf(what, sizeof what, "huge paragraph max %d overlap %d", o.max_tokens, overlap);
            chunk_list list = chunk_checked(what, d.text, d.length, &o);
            check_sentence_bounds(what, &d, &o, &list);
            size_t overlapping = 0;
            for (size_t k = 1; k < list.count; k++)
                overlapping += list.spans[k].start < list.spans[k - 1].end;
            if (overlap && limits[l] >= 64)
                CHECK(overlapping > list.count / 4, "%s: only %zu of %zu chunks overlap", what,
                      overlapping, list.count);
            if (limits[l] == 256)
                printf("%s: %zu chunks, %zu overlapping\n", what, list.count, overlapping);
            chunk_list_free(&list);
        }
    }
    document_free(&d);
}

/* Words longer than any chunk: letters only (over 100 characters: one [UNK], so it fits), a URL
 * and base64 (thousands of tokens: cut between characters, after punctuation where it can). */
static void test_long_words(void)
{
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (int kind = 0; kind < 3; kind++) {
        document d = {0};
        add_paragraph(&d, 3, false);
        add(&d, " ");
        size_t word_start = d.length;
        if (kind == 1) add(&d, "https://example.org/");
        while (d.length - word_start < 5000) {
            char c[2] = {alphabet[random_below(kind == 0 ? 62 : 64)], 0};
            if (kind == 1 && random_below(9) == 0) c[0] = "/.-_?=&"[random_below(7)];
            add(&d, c);
        }
        size_t word_end = d.length;
        add(&d, " ");
        add_paragraph(&d, 3, false);
        int word_tokens = count_alone(d.text, word_start, word_end);
        for (size_t l = 0; l < LIMIT_COUNT; l++) {
            chunk_options o = chunk_default_options(limits[l]);
            o.prompt = "passage: ";
            o.overlap_tokens = SOME_OVERLAP;
            char what[128];
            snprintf(what, sizeof what, "%s word max %d", kind == 0 ? "letters" : "URL/base64",
                     o.max_tokens);
            chunk_list list = chunk_checked(what, d.text, d.length, &o);
            size_t parts = 0;
            for (size_t k = 0; k < list.count; k++)
                parts += list.spans[k].start < word_end && list.spans[k].end > word_start;
            if (kind == 0) {
                CHECK(word_tokens == 1, "%s: a 5,000-letter word is %d tokens", what, word_tokens);
                CHECK(parts == 1, "%s: the letters are in %zu chunks", what, parts);
            } else {
                CHECK(parts >= (size_t)(word_tokens / o.max_tokens),
                      "%s: %d tokens in only %zu chunks", what, word_tokens, parts);
            }
            if (limits[l] == 256) printf("%s: %d tokens, %zu parts\n", what, word_tokens, parts);
            chunk_list_free(&list);
        }
        document_free(&d);
    }
}

/* Chinese and Japanese without spaces: cut after 。！？ where sentences fit; a run of ideographs
 * with no punctuation at all is cut between characters. */
static void test_cjk(void)
{
    static const char *cjk[] = {
        "今天天气很好，我们去公园散步吧。",
        "你觉得这个主意怎么样？",
        "他每天早上六点起床，然后跑步半个小时。",
        "这本书非常有意思！",
        "東京は日本の首都です。",
        "明日は雨が降るかもしれません。",
        "机器学习模型需要大量的数据进行训练。",
        "请把窗户关上，外面太冷了。",
    };
    document d = {0};
    for (int p = 0; p < 40; p++) {
        if (p) add(&d, "\n\n");
        size_t start = d.length;
        int n = 1 + (int)random_below(12);
        for (int k = 0; k < n; k++) add_sentence(&d, cjk[random_below(8)]);
        ranges_add(&d.paragraphs, start, d.length);
    }
    add(&d, "\n\n");
    size_t run = d.length;
    while (d.length - run < 3 * 3000) add(&d, "中文文本没有标点符号");
    for (size_t l = 0; l < LIMIT_COUNT; l++) {
        for (int overlap = 0; overlap <= SOME_OVERLAP; overlap += SOME_OVERLAP) {
            chunk_options o = chunk_default_options(limits[l]);
            o.overlap_tokens = overlap;
            o.title = "中文标题";
            char what[128];
            snprintf(what, sizeof what, "CJK max %d overlap %d", o.max_tokens, overlap);
            chunk_list list = chunk_checked(what, d.text, d.length, &o);
            check_kept_whole(what, "paragraph", &d, &d.paragraphs, &o, &list);
            /* Cut after an end mark, or inside the run without punctuation. */
            for (size_t k = 0; o.max_tokens >= 64 && k < list.count; k++) {
                size_t e = list.spans[k].end;
                uint32_t last = decode_before(d.text, e);
                CHECK(e > run || last == 0x3002 || last == 0xFF1F || last == 0xFF01,
                      "%s: chunk %zu ends with U+%04X", what, k, last);
            }
            chunk_list_free(&list);
        }
    }
    document_free(&d);
}

static bool is_cluster_extender(uint32_t cp)
{
    return cp == 0x200D || cp == 0xFE0F || (cp >= 0x1F3FB && cp <= 0x1F3FF);
}

/* Emoji: in sentences, and runs of families (ZWJ sequences), flags (pairs of regional
 * indicators) and skin tones between commas, thousands of tokens long: cuts keep clusters whole. */
static void test_emoji(void)
{
    document d = {0};
    /* A family (woman, woman, girl, boy joined by ZWJ), two flags, a thumb with a skin tone, a
     * heart with its emoji variation selector. */
    static const char family[] = "\xF0\x9F\x91\xA9\xE2\x80\x8D\xF0\x9F\x91\xA9\xE2\x80\x8D"
                                 "\xF0\x9F\x91\xA7\xE2\x80\x8D\xF0\x9F\x91\xA6";
    static const char *emoji[] = {family, "\xF0\x9F\x87\xBA\xF0\x9F\x87\xB8",
                                  "\xF0\x9F\x87\xAF\xF0\x9F\x87\xB5",
                                  "\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD", "\xE2\x9D\xA4\xEF\xB8\x8F"};
    for (int k = 0; k < 20; k++) {
        add(&d, random_sentence());
        add(&d, k % 3 ? " " : " \xF0\x9F\x98\x80 ");
    }
    add(&d, "\n\n");
    size_t run = d.length;
    for (int k = 0; k < 1500; k++) {
        add(&d, emoji[random_below(5)]);
        add(&d, ",");
    }
    add(&d, "\n\nThe end.");
    for (size_t l = 0; l < LIMIT_COUNT; l++) {
        chunk_options o = chunk_default_options(limits[l]);
        o.prompt = "passage: ";
        char what[128];
        snprintf(what, sizeof what, "emoji max %d", o.max_tokens);
        chunk_list list = chunk_checked(what, d.text, d.length, &o);
        size_t parts = 0;
        for (size_t k = 0; k < list.count; k++) {
            const chunk_span *c = &list.spans[k];
            if (c->start < run) continue;
            parts++;
            CHECK(!is_cluster_extender(decode_at(d.text, c->start)) &&
                      (c->end == d.length || !is_cluster_extender(decode_at(d.text, c->end))),
                  "%s: chunk %zu [%zu, %zu) cuts an emoji", what, k, c->start, c->end);
            /* Regional indicators come in pairs: an even number before a cut. */
            size_t before = 0;
            for (size_t i = c->start; i >= run + 4 && decode_before(d.text, i) >= 0x1F1E6 &&
                                      decode_before(d.text, i) <= 0x1F1FF;
                 i -= 4)
                before++;
            CHECK(before % 2 == 0, "%s: chunk %zu starts inside a flag", what, k);
        }
        CHECK(parts > 1, "%s: the emoji run is in %zu chunks", what, parts);
        chunk_list_free(&list);
    }
    document_free(&d);
}

/* Chunks text at max_tokens with overlap and checks them against the expected texts (at most
 * 8, NULL-terminated). */
static void expect_chunks(const char *what, const char *text, int max_tokens, int overlap,
                          const char *const *expected)
{
    chunk_options o = chunk_default_options(max_tokens);
    o.overlap_tokens = overlap;
    chunk_list list = chunk_checked(what, text, strlen(text), &o);
    size_t n = 0;
    while (expected[n]) n++;
    CHECK(list.count == n, "%s: %zu chunks, expected %zu", what, list.count, n);
    for (size_t k = 0; k < list.count && k < n; k++) {
        const chunk_span *c = &list.spans[k];
        bool same = c->end - c->start == strlen(expected[k]) &&
                    memcmp(text + c->start, expected[k], c->end - c->start) == 0;
        CHECK(same, "%s: chunk %zu is \"%.*s\", expected \"%s\"", what, k, (int)(c->end - c->start),
              text + c->start, expected[k]);
    }
    chunk_list_free(&list);
}

/* Each level of the hierarchy on a small text whose every word is one token, where the budget
 * (max_tokens - 2) forces a choice. */
static void test_levels(void)
{
    /* Sections: 8 and 6 tokens, budget 10. */
    const char *sections = "# Title\n\nOne two. Three four.\n\n## Sub\n\nFive six.";
    expect_chunks(
        "sections", sections, 12, 0,
        (const char *const[]){"# Title\n\nOne two. Three four.", "## Sub\n\nFive six.", NULL});
    expect_chunks("sections fit", sections, 16, 0, (const char *const[]){sections + 0, NULL});
    /* A '#' line inside a fence is code: the block (10 tokens) stays whole, not cut before it. */
    expect_chunks("fence", "Alpha beta.\n\n```\ncode\n# gamma delta\n```", 14, 0,
                  (const char *const[]){"Alpha beta.", "```\ncode\n# gamma delta\n```", NULL});
    /* Sentences of 4 tokens, budget 8; with an overlap of 4 the second repeats one. */
    const char *three = "One two three. Four five six. Seven eight nine.";
    expect_chunks(
        "sentences", three, 10, 0,
        (const char *const[]){"One two three. Four five six.", "Seven eight nine.", NULL});
    expect_chunks("sentences overlap", three, 10, 4,
                  (const char *const[]){"One two three. Four five six.",
                                        "Four five six. Seven eight nine.", NULL});
    /* A list number is no sentence: greedy sentences would make "Cat dog. 2." and "Cat dog." */
    expect_chunks("list number", "Cat dog. 2. Cat dog.", 7, 0,
                  (const char *const[]){"Cat dog.", "2. Cat dog.", NULL});
    /* Whitespace the tokenizer drops (\v, \f) neither splits nor ends a chunk. */
    expect_chunks("dropped whitespace", "\v\fcat\vdog\f\v", 16, 0,
                  (const char *const[]){"cat\vdog", NULL});
    /* Paragraphs before sentences: 3 + 3 tokens would fit, but not across the blank line. */
    expect_chunks("paragraphs", "One two.\n\nThree four. Five six.", 8, 0,
                  (const char *const[]){"One two.", "Three four. Five six.", NULL});
    /* Lines before words, in a paragraph of no sentence ends (words: "cat dog cat\ndog"). */
    expect_chunks("lines", "cat dog cat\ndog cat dog", 6, 0,
                  (const char *const[]){"cat dog cat", "dog cat dog", NULL});
    /* Clauses before words: greedy words would make "cat dog, cat" and "dog cat". */
    expect_chunks("clauses", "cat dog, cat dog cat", 6, 0,
                  (const char *const[]){"cat dog,", "cat dog cat", NULL});
    expect_chunks("words", "cat dog cat dog cat", 4, 0,
                  (const char *const[]){"cat dog", "cat dog", "cat", NULL});
    expect_chunks("words overlap", "cat dog cat dog cat", 5, 1,
                  (const char *const[]){"cat dog cat", "cat dog cat", NULL});
    /* Characters: ideographs (a token each), and after punctuation where it can. */
    expect_chunks("characters", "中文中文中文", 6, 0,
                  (const char *const[]){"中文中文", "中文", NULL});
    expect_chunks("punctuation", "cat/cat/cat/cat", 7, 0,
                  (const char *const[]){"cat/cat/", "cat/cat", NULL});
    /* A heading goes with the first words under it, even when its sentence must be split. */
    expect_chunks("heading", "## Cat\n\ndog cat dog cat dog", 7, 0,
                  (const char *const[]){"## Cat\n\ndog cat", "dog cat dog", NULL});
}

/* Nothing to embed: no chunk, and no error. */
static void test_empty(void)
{
    static const char *texts[] = {"", "   ", "\n\n\t \r\n", "\xE3\x80\x80\xC2\xA0\n \xE2\x80\xA8",
                                  "\x01\x02\x7F"};
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        chunk_options o = chunk_default_options(256);
        o.title = "A title";
        chunk_list list;
        int status = chunk_text(tok, texts[i], strlen(texts[i]), &o, &list);
        CHECK(status == 0 && list.count == 0 && list.spans == NULL,
              "blank text %zu: status %d, %zu chunks", i, status, list.count);
        chunk_list_free(&list);
    }
    chunk_options o = chunk_default_options(256);
    chunk_list list;
    CHECK(chunk_text(tok, NULL, 0, &o, &list) == 0 && list.count == 0, "NULL text of 0 bytes");
    /* A text that fits is one chunk, trimmed. */
    const char *text = "  \n Hello world.  \n\n";
    int status = chunk_text(tok, text, strlen(text), &o, &list);
    CHECK(status == 0 && list.count == 1 && list.spans[0].start == 4 && list.spans[0].end == 16 &&
              list.spans[0].tokens == 5,
          "short text: %d, %zu chunks", status, list.count);
    chunk_list_free(&list);
    chunk_list_free(&list);
    chunk_list_free(NULL);
}

static void test_errors(void)
{
    chunk_options o = chunk_default_options(256);
    chunk_list list = {(chunk_span *)&o, 7, true};
    const char *bad = "Hello world. \xC3\x28 more text.";
    int status = chunk_text(tok, bad, strlen(bad), &o, &list);
    CHECK(status == EMBEDRAG_ERR_INVALID_UTF8 && strstr(err_get(), "byte offset 13"),
          "invalid UTF-8: %d %s", status, err_get());
    CHECK(list.spans == NULL && list.count == 0, "the list is empty after an error");
    /* ...also far into a long document, past the first pieces. */
    document d = {0};
    make_plain(&d, 30, false);
    size_t at = d.length;
    add(&d, " \xED\xA0\x80 surrogate.");
    status = chunk_text(tok, d.text, d.length, &o, &list);
    char expected[64];
    snprintf(expected, sizeof expected, "byte offset %zu", at + 1);
    CHECK(status == EMBEDRAG_ERR_INVALID_UTF8 && strstr(err_get(), expected),
          "invalid UTF-8 late: %d %s", status, err_get());
    document_free(&d);

    o.title = "bad \xFF title";
    status = chunk_text(tok, "text", 4, &o, &list);
    CHECK(status == EMBEDRAG_ERR_INVALID_UTF8 && strstr(err_get(), "title"), "bad title: %s",
          err_get());
    o.title = NULL;
    o.prompt = "bad \xC0\x80 prompt";
    status = chunk_text(tok, "text", 4, &o, &list);
    CHECK(status == EMBEDRAG_ERR_INVALID_UTF8 && strstr(err_get(), "prompt"), "bad prompt: %s",
          err_get());

    /* A prompt that leaves no room. */
    o = chunk_default_options(8);
    o.prompt = "one two three four five six";
    status = chunk_text(tok, "text", 4, &o, &list);
    CHECK(status == EMBEDRAG_ERR_INVALID_ARGUMENT, "prompt filling max_tokens: %d %s", status,
          err_get());

    o = chunk_default_options(2);
    CHECK(chunk_text(tok, "text", 4, &o, &list) == EMBEDRAG_ERR_INVALID_ARGUMENT, "max_tokens 2");
    o = chunk_default_options(256);
    o.overlap_tokens = -1;
    CHECK(chunk_text(tok, "text", 4, &o, &list) == EMBEDRAG_ERR_INVALID_ARGUMENT, "overlap -1");
    o.overlap_tokens = 0;
    CHECK(chunk_text(NULL, "text", 4, &o, &list) == EMBEDRAG_ERR_INVALID_ARGUMENT, "no tokenizer");
    CHECK(chunk_text(tok, "text", 4, NULL, &list) == EMBEDRAG_ERR_INVALID_ARGUMENT, "no options");
    CHECK(chunk_text(tok, NULL, 4, &o, &list) == EMBEDRAG_ERR_INVALID_ARGUMENT, "NULL text");
    CHECK(chunk_text(tok, "text", 4, &o, NULL) == EMBEDRAG_ERR_INVALID_ARGUMENT, "no output");
}

/* A title of exactly `tokens` tokens ("cat" is one). */
static char *title_of(int tokens)
{
    document d = {0};
    for (int k = 0; k < tokens; k++) add(&d, k ? " cat" : "cat");
    CHECK(tok_count(tok, d.text) == tokens, "a title of %d cats", tokens);
    return d.text;
}

static void test_title_policy(void)
{
    document d = {0};
    make_plain(&d, 20, false);
    struct {
        int max_tokens;
        int title_tokens;
        const char *prompt;
        bool kept;
    } cases[] = {
        {256, 5, NULL, true},
        {256, 5, "passage: ", true},
        {256, 200, NULL, true},         /* 54 left, more than CHUNK_MIN_TEXT_TOKENS */
        {256, 222, NULL, true},         /* 32 left */
        {256, 223, NULL, false},        /* 31 left: under 32 and under half of the room */
        {256, 300, "passage: ", false}, /* no room at all */
        {16, 3, NULL, true},            /* 11 left: under 32 but most of the room */
        {16, 7, NULL, true},            /* 7 left: half of the room */
        {16, 8, NULL, false},           /* 6 left: under half of the room */
        {512, 478, NULL, true},         /* 32 left */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *title = title_of(cases[i].title_tokens);
        chunk_options o = chunk_default_options(cases[i].max_tokens);
        o.title = title;
        o.prompt = cases[i].prompt;
        char what[128];
        snprintf(what, sizeof what, "title of %d tokens, max %d", cases[i].title_tokens,
                 cases[i].max_tokens);
        chunk_list list = chunk_checked(what, d.text, d.length, &o);
        CHECK(list.title_used == cases[i].kept, "%s: title_used %d", what, list.title_used);
        chunk_list_free(&list);
        free(title);
    }
    /* A title the tokenizer sees nothing of is no title. */
    chunk_options o = chunk_default_options(256);
    o.title = " \n\t";
    chunk_list list = chunk_checked("blank title", d.text, d.length, &o);
    CHECK(!list.title_used, "a blank title is not used");
    chunk_list_free(&list);
    document_free(&d);
}

/* A prompt that ends inside a word glues onto each chunk's first word, so sums are off there;
 * the check by tokenizing catches it and the counts still hold. Also overlaps too large, and
 * the smallest limit (one token of text). */
static void test_odd_options(void)
{
    document d = {0};
    make_markdown(&d, 6);
    static const char *prompts[] = {"query", "Represent this sentence for searching: ", "passage"};
    for (size_t p = 0; p < sizeof prompts / sizeof prompts[0]; p++) {
        for (size_t l = 0; l < LIMIT_COUNT; l++) {
            chunk_options o = chunk_default_options(limits[l]);
            o.prompt = prompts[p];
            o.title = p == 2 ? "Doc" : NULL;
            char what[128];
            snprintf(what, sizeof what, "prompt \"%s\" max %d", prompts[p], o.max_tokens);
            chunk_list list = chunk_checked(what, d.text, d.length, &o);
            chunk_list_free(&list);
        }
    }
    chunk_options o = chunk_default_options(64);
    o.overlap_tokens = 1000;
    chunk_list list = chunk_checked("overlap 1000 at max 64", d.text, d.length, &o);
    chunk_list_free(&list);
    document small = {0};
    make_plain(&small, 3, false);
    add(&small, " https://example.org/a/b?c=d");
    o = chunk_default_options(3);
    list = chunk_checked("max 3", small.text, small.length, &o);
    CHECK(list.count > 0, "max 3: %zu chunks", list.count);
    chunk_list_free(&list);
    o.overlap_tokens = 1;
    list = chunk_checked("max 3 overlap 1", small.text, small.length, &o);
    chunk_list_free(&list);
    document_free(&small);
    document_free(&d);
}

/* Random mixtures of everything above, at random limits and overlaps. */
static void test_random(void)
{
    static const char *pieces[] = {
        "\n",
        "\n\n",
        "\n# Heading\n",
        "\n## Sub\n",
        "\n```\n# code\n```\n",
        " ",
        "\t",
        "\r\n",
        "\n- item ",
        "\n1. first ",
        "。",
        "中文",
        "\xF0\x9F\x98\x80",
        "\xF0\x9F\x91\xA9\xE2\x80\x8D\xF0\x9F\x92\xBB",
        "e\xCC\x81",
        "https://x.y/z?a=b&c=d.e",
        ", ",
        "; ",
        "\xE3\x80\x81",
        "...",
        "?! ",
        "\"Quoted.\" ",
        "[SEP]",
        "\xC2\xA0",
    };
    const size_t piece_count = sizeof pieces / sizeof pieces[0];
    for (int r = 0; r < RANDOM_DOCUMENTS; r++) {
        document d = {0};
        int n = 1 + (int)random_below(60);
        for (int k = 0; k < n; k++) {
            if (random_below(2))
                add(&d, random_sentence());
            else
                add(&d, pieces[random_below((uint32_t)piece_count)]);
            if (random_below(20) == 0)
                for (int w = 0; w < 200; w++) add(&d, random_below(5) ? "ab" : ".");
        }
        chunk_options o = chunk_default_options(3 + (int)random_below(80));
        o.overlap_tokens = (int)random_below(3) == 0 ? (int)random_below(40) : 0;
        if (random_below(3) == 0) o.prompt = random_below(2) ? "passage: " : "query";
        if (random_below(3) == 0) o.title = random_below(2) ? "A title" : "中文";
        char what[128];
        snprintf(what, sizeof what, "random %d (max %d, overlap %d)", r, o.max_tokens,
                 o.overlap_tokens);
        chunk_list list;
        int status = chunk_text(tok, d.text, d.length, &o, &list);
        /* A prompt may leave no room; at a limit of a few tokens, one character may need more
         * than there is. */
        bool no_room = o.max_tokens - 2 - tok_count(tok, o.prompt) < 1;
        CHECK(no_room ? status == EMBEDRAG_ERR_INVALID_ARGUMENT
                      : status == 0 || (status == EMBEDRAG_ERR_TOO_LONG && o.max_tokens < 8),
              "%s: %d %s", what, status, err_get());
        if (status == 0) check_chunks(what, d.text, d.length, &o, &list);
        chunk_list_free(&list);
        document_free(&d);
    }
}

/* Not a timed test: prints how long a 1 MB document takes, structured and as one run of words
 * without punctuation (the word level), with the tokenizer's own time for the same text. */
static void test_timing(void)
{
    static const char *kinds[] = {"Markdown", "one run of words", "base64", "CJK, no punctuation"};
    for (int kind = 0; kind < 4; kind++) {
        document d = {0};
        while (d.length < TIMING_BYTES) {
            if (kind == 0) {
                make_markdown(&d, 20);
                add(&d, "\n\n");
            } else if (kind == 2) {
                static const char b64[] =
                    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
                add_bytes(&d, &b64[random_below(64)], 1);
            } else if (kind == 3) {
                add(&d, "中文文本没有标点符号");
            } else {
                const char *s = random_sentence();
                for (; *s; s++)
                    if (*s == ' ' || (*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z'))
                        add_bytes(&d, s, 1);
                add(&d, " ");
            }
        }
        chunk_options o = chunk_default_options(256);
        o.prompt = "passage: ";
        o.title = "A title";
        chunk_list list;
        double t0 = now_seconds();
        int status = chunk_text(tok, d.text, d.length, &o, &list);
        double seconds = now_seconds() - t0;
        CHECK(status == 0, "timing: %s", err_get());
        t0 = now_seconds();
        int tokens = count_alone(d.text, 0, d.length);
        double tokenize_seconds = now_seconds() - t0;
        long chunk_tokens = 0;
        for (size_t k = 0; k < list.count; k++) chunk_tokens += list.spans[k].tokens;
        printf("timing: %s, %zu bytes (%d tokens): %zu chunks (%ld tokens) in %.3f s; "
               "tokenizing it whole takes %.3f s\n",
               kinds[kind], d.length, tokens, list.count, chunk_tokens, seconds, tokenize_seconds);
        if (kind > 0) check_chunks(kinds[kind], d.text, d.length, &o, &list);
        chunk_list_free(&list);
        document_free(&d);
    }
}

int main(void)
{
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/%s", check_source_dir(), MODEL_DIR);
    int status = tok_open(dir, &tok);
    CHECK(status == 0, "tok_open(%s): %s (run scripts/fetch-models.sh)", dir, err_get());
    CHECK(load_sentences() == 0, "cannot read ../shared/data/stsb-en-dev.csv");
    if (tok && sentence_count > 0) {
        test_empty();
        test_errors();
        test_levels();
        test_plain();
        test_markdown();
        test_huge_paragraph();
        test_long_words();
        test_cjk();
        test_emoji();
        test_title_policy();
        test_odd_options();
        test_random();
        test_timing();
    }
    for (int i = 0; i < sentence_count; i++) free(sentences[i]);
    tok_close(tok);
    return check_finish("test_chunk");
}
