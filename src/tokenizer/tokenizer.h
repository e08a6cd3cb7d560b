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
 * which cleanup drops like other control characters) and writes [CLS] ids [SEP].
 * At most `max_tokens` ids are produced (>= 2): the word-piece ids are cut so that [CLS] and
 * [SEP] still fit, as Hugging Face truncation does. `ids` must hold max_tokens entries.
 * Returns the number of ids written, or a negative status (EMBEDRAG_ERR_INVALID_UTF8 naming the
 * byte offset in `text`). If `untruncated` is non-NULL it receives the count before truncation
 * (so callers can reject long texts). */
int tok_encode(const tok_tokenizer *tokenizer, const char *prefix, const char *text, size_t len,
               int32_t *ids, int max_tokens, int *untruncated);

/* Number of ids `prefix` alone contributes (without [CLS]/[SEP]). */
int tok_count(const tok_tokenizer *tokenizer, const char *prefix);

/* The vocabulary string of `id`, or NULL when out of range. */
const char *tok_token_text(const tok_tokenizer *tokenizer, int32_t id);

int tok_vocab_size(const tok_tokenizer *tokenizer);
const tok_options *tok_get_options(const tok_tokenizer *tokenizer);
int32_t tok_cls_id(const tok_tokenizer *tokenizer);
int32_t tok_sep_id(const tok_tokenizer *tokenizer);
int32_t tok_unk_id(const tok_tokenizer *tokenizer);

#endif
