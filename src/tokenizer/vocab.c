/* Building a tokenizer: the arena that holds every token string, the vocabulary hash tables
 * over it, the added-token sets sorted for matching, and the builder that fills them from what
 * load.c read. Nothing here runs per text; encode.c only reads what is built. */
#include "tokenizer/tokenizer_internal.h"

#include "util/error.h"

#include <stdlib.h>
#include <string.h>

/* BERT's (and the reference's) defaults when a file does not say otherwise. */
#define DEFAULT_MAX_INPUT_CHARS_PER_WORD 100
#define DEFAULT_CONTINUATION_PREFIX "##"
#define DEFAULT_UNK_TOKEN "[UNK]"
#define DEFAULT_CLS_TOKEN "[CLS]"
#define DEFAULT_SEP_TOKEN "[SEP]"

bool tok_grow(void **array, size_t *capacity, size_t need, size_t size, void *inline_array)
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

static int table_init(tok_vocab_table *t, size_t expected)
{
    size_t capacity = 16;
    while (capacity < expected * 2) capacity *= 2;
    t->slots = malloc(capacity * sizeof *t->slots);
    if (!t->slots) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for the vocabulary");
    for (size_t i = 0; i < capacity; i++) t->slots[i].id = TOK_SLOT_EMPTY;
    t->mask = capacity - 1;
    t->count = 0;
    t->max_length = 0;
    return 0;
}

/* Later entries replace earlier ones with the same key, as the reference's HashMap does. */
static void table_put(tok_vocab_table *t, const char *arena, uint32_t offset, uint32_t length,
                      int32_t id)
{
    const unsigned char *key = (const unsigned char *)arena + offset;
    uint64_t h = tok_hash_bytes(key, length);
    uint32_t tag = (uint32_t)(h >> 32);
    for (size_t i = h & t->mask;; i = (i + 1) & t->mask) {
        tok_vocab_slot *s = &t->slots[i];
        if (s->id == TOK_SLOT_EMPTY) {
            *s = (tok_vocab_slot){tag, length, offset, id};
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

int tok_builder_init(tok_builder *b)
{
    memset(b, 0, sizeof *b);
    b->tok = calloc(1, sizeof *b->tok);
    if (!b->tok) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for the tokenizer");
    b->cls_id = b->sep_id = -1;
    b->tok->options = (tok_options){true, true, true, true, DEFAULT_MAX_INPUT_CHARS_PER_WORD};
    return 0;
}

void tok_builder_free(tok_builder *b)
{
    free(b->vocab);
    for (size_t i = 0; i < b->added_count; i++) free(b->added[i].content);
    free(b->added);
    free(b->unk_token);
    free(b->cls_token);
    free(b->sep_token);
    tok_close(b->tok);
}

/* Stores bytes in the arena; returns its offset or TOK_NO_TEXT when out of memory. */
static uint32_t arena_add(tok_tokenizer *t, const char *s, size_t n)
{
    if (n >= UINT32_MAX / 2 || t->arena_length + n + 1 >= UINT32_MAX) return TOK_NO_TEXT;
    if (!tok_grow((void **)&t->arena, &t->arena_capacity, t->arena_length + n + 1, 1, NULL))
        return TOK_NO_TEXT;
    uint32_t offset = (uint32_t)t->arena_length;
    memcpy(t->arena + offset, s, n);
    t->arena[offset + n] = '\0';
    t->arena_length += n + 1;
    return offset;
}

int tok_builder_add_vocab(tok_builder *b, const char *s, size_t n, int32_t id)
{
    if (!tok_grow((void **)&b->vocab, &b->vocab_capacity, b->vocab_count + 1, sizeof *b->vocab,
                  NULL))
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for the vocabulary");
    uint32_t offset = arena_add(b->tok, s, n);
    if (offset == TOK_NO_TEXT)
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for the vocabulary");
    b->vocab[b->vocab_count++] = (tok_pending_token){offset, (uint32_t)n, id};
    return 0;
}

int tok_builder_add_added(tok_builder *b, const char *content, int32_t id, bool single_word,
                          bool lstrip, bool rstrip, bool normalized)
{
    /* A later description of the same content replaces the earlier one. */
    for (size_t i = 0; i < b->added_count; i++) {
        if (strcmp(b->added[i].content, content) == 0) {
            b->added[i] =
                (tok_added_spec){b->added[i].content, id, single_word, lstrip, rstrip, normalized};
            return 0;
        }
    }
    if (!tok_grow((void **)&b->added, &b->added_capacity, b->added_count + 1, sizeof *b->added,
                  NULL))
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for added tokens");
    char *copy = strdup(content);
    if (!copy) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for added tokens");
    b->added[b->added_count++] =
        (tok_added_spec){copy, id, single_word, lstrip, rstrip, normalized};
    return 0;
}

/* Order of added tokens: by first byte, then longest first. */
static int compare_added(const tok_added_token *a, const tok_added_token *b, const char *text)
{
    unsigned fa = (unsigned char)text[a->offset], fb = (unsigned char)text[b->offset];
    if (fa != fb) return fa < fb ? -1 : 1;
    if (a->length != b->length) return a->length > b->length ? -1 : 1;
    return a->offset < b->offset ? -1 : a->offset > b->offset;
}

static int added_append(tok_added_set *set, const char *pattern, size_t length,
                        const tok_added_spec *a)
{
    if (length == 0) return 0; /* an empty pattern never matches */
    if (!tok_grow((void **)&set->tokens, &set->capacity, set->count + 1, sizeof *set->tokens, NULL))
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for added tokens");
    if (!tok_grow((void **)&set->text, &set->text_capacity, set->text_length + length, 1, NULL))
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for added tokens");
    memcpy(set->text + set->text_length, pattern, length);
    set->tokens[set->count++] = (tok_added_token){
        (uint32_t)set->text_length, (uint32_t)length, a->id, a->single_word, a->lstrip, a->rstrip};
    set->text_length += length;
    return 0;
}

static void added_index(tok_added_set *set)
{
    /* qsort has no context argument for the pattern text; an insertion sort is enough for the
     * handful of added tokens a model has. */
    for (size_t i = 1; i < set->count; i++) {
        tok_added_token x = set->tokens[i];
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

static void added_free(tok_added_set *set)
{
    free(set->tokens);
    free(set->text);
}

int tok_builder_finish(tok_builder *b, const char *source, tok_tokenizer **out)
{
    tok_tokenizer *t = b->tok;
    if (b->vocab_count == 0)
        return err_set(EMBEDRAG_ERR_FORMAT, "%s: the vocabulary is empty", source);
    for (uint32_t c = 0; c < 128; c++) {
        unsigned flags = 0;
        if (t->options.clean_text && (c == 0 || tok_char_is_control(c)))
            flags |= TOK_ASCII_DROP;
        else if (t->options.clean_text && tok_char_is_whitespace(c))
            flags |= TOK_ASCII_TO_SPACE;
        if (tok_char_is_whitespace(c)) flags |= TOK_ASCII_WHITESPACE;
        if (tok_char_is_punctuation(c)) flags |= TOK_ASCII_PUNCTUATION;
        t->ascii[c] = (unsigned char)flags;
    }
    if (!t->continuation_prefix && !(t->continuation_prefix = strdup(DEFAULT_CONTINUATION_PREFIX)))
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    int status = table_init(&t->words, b->vocab_count);
    if (status) return status;
    size_t prefix_length = strlen(t->continuation_prefix);
    size_t continuation_count = 0;
    int32_t max_id = -1;
    for (size_t i = 0; i < b->vocab_count; i++) {
        const tok_pending_token *p = &b->vocab[i];
        if (p->length >= prefix_length &&
            memcmp(t->arena + p->offset, t->continuation_prefix, prefix_length) == 0)
            continuation_count++;
        if (p->id > max_id) max_id = p->id;
    }
    if ((status = table_init(&t->continuations, continuation_count))) return status;
    for (size_t i = 0; i < b->vocab_count; i++) {
        const tok_pending_token *p = &b->vocab[i];
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
    t->unk_id = tok_table_get(&t->words, t->arena, (const unsigned char *)unk, strlen(unk));
    if (t->unk_id == TOK_SLOT_EMPTY)
        return err_set(EMBEDRAG_ERR_FORMAT, "%s: the unknown token \"%s\" is not in the vocabulary",
                       source, unk);
    const char *names[2] = {b->cls_token ? b->cls_token : DEFAULT_CLS_TOKEN,
                            b->sep_token ? b->sep_token : DEFAULT_SEP_TOKEN};
    int32_t *ids[2] = {&t->cls_id, &t->sep_id};
    int32_t given[2] = {b->cls_id, b->sep_id};
    for (int k = 0; k < 2; k++) {
        *ids[k] = given[k];
        if (*ids[k] >= 0) continue;
        *ids[k] =
            tok_table_get(&t->words, t->arena, (const unsigned char *)names[k], strlen(names[k]));
        for (size_t i = 0; *ids[k] < 0 && i < b->added_count; i++)
            if (strcmp(b->added[i].content, names[k]) == 0) *ids[k] = b->added[i].id;
        if (*ids[k] < 0)
            return err_set(EMBEDRAG_ERR_FORMAT,
                           "%s: the special token \"%s\" is not in the vocabulary", source,
                           names[k]);
    }
    if (t->cls_id > max_id) max_id = t->cls_id;
    if (t->sep_id > max_id) max_id = t->sep_id;

    /* id -> text, added tokens included. */
    t->id_count = max_id + 1;
    t->id_text = malloc((size_t)t->id_count * sizeof *t->id_text);
    if (!t->id_text) return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for the vocabulary");
    for (int32_t i = 0; i < t->id_count; i++) t->id_text[i] = TOK_NO_TEXT;
    for (size_t i = 0; i < b->vocab_count; i++) t->id_text[b->vocab[i].id] = b->vocab[i].offset;
    for (size_t i = 0; i < b->added_count; i++) {
        const tok_added_spec *a = &b->added[i];
        if (t->id_text[a->id] != TOK_NO_TEXT) continue;
        uint32_t offset = arena_add(t, a->content, strlen(a->content));
        if (offset == TOK_NO_TEXT)
            return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory for added tokens");
        t->id_text[a->id] = offset;
    }

    /* Added tokens: the normalized ones are matched against their own normalized form. */
    for (size_t i = 0; i < b->added_count; i++) {
        const tok_added_spec *a = &b->added[i];
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
