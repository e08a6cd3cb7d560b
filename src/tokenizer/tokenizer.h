/* BERT WordPiece tokenizer, exact against Hugging Face `tokenizers` for BERT models:
 * clean -> normalize (lowercase, strip accents) -> pre-split (whitespace, punctuation, CJK) ->
 * greedy longest-match WordPiece -> [CLS] ids [SEP]. Unicode data comes from utf8proc. */
#ifndef EMBEDRAG_TOKENIZER_H
#define EMBEDRAG_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct tok_tokenizer tok_tokenizer;

/* Options read from tokenizer.json's normalizer / tokenizer_config.json. */
typedef struct tok_options {
    bool clean_text;           /* drop control characters, map whitespace to ' ' */
    bool handle_chinese_chars; /* put spaces around CJK ideographs */
    bool lowercase;            /* lowercase (uncased models) */
    bool strip_accents;        /* NFD + drop combining marks; defaults to `lowercase` when unset */
    int max_input_chars_per_word; /* longer words become [UNK]; 100 in BERT */
} tok_options;

/* Opens the tokenizer of a model directory: tokenizer.json when present, else vocab.txt with
 * tokenizer_config.json (do_lower_case, strip_accents, tokenize_chinese_chars). On failure *out
 * is NULL and the error (util/error.h) names the file and the problem. Free with tok_close. */
int tok_open(const char *model_dir, tok_tokenizer **out);

/* Builds a tokenizer from a vocabulary in memory (one token per line, id = line number) and
 * explicit options; used by tests and the fuzz target. */
int tok_open_vocab_buffer(const char *vocab, size_t length, const tok_options *options,
                          tok_tokenizer **out);

void tok_close(tok_tokenizer *tokenizer);

/* Tokenizes `prefix` (may be NULL) followed by `text` (len bytes of UTF-8, may hold NUL bytes,
 * which cleanup drops like other control characters) and writes [CLS] ids [SEP]. Added tokens
 * written in the text (such as "[SEP]" or "[MASK]") become their ids, as in the reference.
 * At most `max_tokens` ids are produced (>= 2): the word-piece ids are cut so that [CLS] and
 * [SEP] still fit, as Hugging Face truncation does. `ids` must hold max_tokens entries.
 * Returns the number of ids written, or a negative status (EMBEDRAG_ERR_INVALID_UTF8 naming the
 * byte offset in `text`). If `untruncated` is non-NULL it receives the count before truncation,
 * [CLS] and [SEP] included (so callers can reject long texts); without it the work stops as soon
 * as `ids` is full. The whole text is still checked for valid UTF-8 either way. */
int tok_encode(const tok_tokenizer *tokenizer, const char *prefix, const char *text, size_t len,
               int32_t *ids, int max_tokens, int *untruncated);

/* tok_encode with truncation from the left: a long text keeps its last word pieces (TEI's
 * truncation_direction "Left"), still between [CLS] and [SEP]; the prompt, being first, is
 * what goes first. The whole text is always read. */
int tok_encode_tail(const tok_tokenizer *tokenizer, const char *prefix, const char *text,
                    size_t len, int32_t *ids, int max_tokens, int *untruncated);

/* Number of ids `prefix` alone contributes (without [CLS]/[SEP]; sentence-transformers'
 * prompt_length is this plus one, for [CLS]). A negative status for invalid UTF-8. */
int tok_count(const tok_tokenizer *tokenizer, const char *prefix);

/* The vocabulary string of `id`, or NULL when out of range. */
const char *tok_token_text(const tok_tokenizer *tokenizer, int32_t id);

int tok_vocab_size(const tok_tokenizer *tokenizer);
const tok_options *tok_get_options(const tok_tokenizer *tokenizer);
int32_t tok_cls_id(const tok_tokenizer *tokenizer);
int32_t tok_sep_id(const tok_tokenizer *tokenizer);
int32_t tok_unk_id(const tok_tokenizer *tokenizer);

/* The normalizer alone (clean, CJK spacing, strip accents, lowercase; no splitting, no added
 * tokens) applied to `len` bytes of UTF-8: *out receives a malloc'd, NUL-terminated string of
 * *out_len bytes that the caller frees. For tests and debugging. */
int tok_normalize(const tok_tokenizer *tokenizer, const char *text, size_t len, char **out,
                  size_t *out_len);

/* Character classes as the reference implementation sees them (tokenizer_unicode.c): utf8proc's
 * data corrected where the reference's older or newer Unicode tables differ. Exposed so that
 * the tests can check every code point. */
bool tok_char_is_whitespace(uint32_t cp);      /* split point, mapped to ' ' by clean_text */
bool tok_char_is_control(uint32_t cp);         /* dropped by clean_text */
bool tok_char_is_punctuation(uint32_t cp);     /* isolated by the pre-tokenizer */
bool tok_char_is_chinese(uint32_t cp);         /* spaced by handle_chinese_chars */
bool tok_char_is_nonspacing_mark(uint32_t cp); /* dropped by strip_accents */
int tok_char_combining_class(uint32_t cp);     /* canonical ordering key for NFD */
bool tok_char_is_word(uint32_t cp); /* regex \w, for added tokens that must be whole words */
/* Canonical (NFD) decomposition of one code point into out (up to `capacity`); returns the
 * length, which may exceed `capacity` (then out is incomplete), or -1. */
int tok_char_decompose(uint32_t cp, uint32_t *out, int capacity);
/* Rust's char::to_lowercase: one code point, or two for U+0130. Returns the count. */
int tok_char_lowercase(uint32_t cp, uint32_t out[2]);

#endif
