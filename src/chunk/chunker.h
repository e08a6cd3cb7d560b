/* The token-aware recursive chunker: cuts a document into spans of its own bytes that each fit
 * the model's sequence limit once the passage prompt and the title are put before them, so that
 * the indexer never embeds a truncated passage. Splits at Markdown headings, then paragraphs,
 * sentences, lines, clauses, words, subwords and, last, characters; packs the pieces greedily. */
#ifndef EMBEDRAG_CHUNK_CHUNKER_H
#define EMBEDRAG_CHUNK_CHUNKER_H

#include "tokenizer/tokenizer.h"

#include <stdbool.h>
#include <stddef.h>

/* No overlap by default: chunks are cut at the strongest boundary that fits (a heading, a
 * paragraph, a sentence), so the cut rarely falls inside a thought, and overlap would cost about
 * as much extra model work as it buys (10% overlap is 10% more tokens to embed, and neighbouring
 * chunks then compete for the same search results). Callers that split long unstructured text
 * may ask for some. */
#define CHUNK_DEFAULT_OVERLAP_TOKENS 0

/* A title is put before every chunk only while it leaves the chunk's own text at least this many
 * tokens (about two sentences), or at least half of the room the text would have without it (so
 * that models with tiny limits keep short titles). Otherwise the title is left out. */
#define CHUNK_MIN_TEXT_TOKENS 32

/* What goes between the title and the chunk's text. Whitespace, so that the title's last word
 * and the text's first word stay apart (the tokenizer glues what it is given). */
#define CHUNK_TITLE_SEPARATOR "\n"

/* The largest max_tokens taken (BERT-family models hold 512 to 8,192): room for this many ids
 * is allocated while chunking. */
#define CHUNK_MAX_TOKENS (1 << 20)

/* How to chunk one document. Obtain with chunk_default_options() and adjust. */
typedef struct chunk_options {
    int max_tokens;     /* the model's limit per sequence, [CLS] and [SEP] included; 3 to
                           CHUNK_MAX_TOKENS */
    int overlap_tokens; /* tokens of trailing pieces a chunk may repeat from the one before;
                           at most half of the room for text (more is treated as that) */
    const char *prompt; /* the passage prompt the engine will put first ("passage: "); NULL or ""
                           for none; counted exactly as the engine glues it */
    const char *title;  /* the document's title, NULL or "" for none; see chunk_list.title_used */
} chunk_options;

/* Defaults for a model whose sequences hold `max_tokens` ids: no prompt, no title,
 * CHUNK_DEFAULT_OVERLAP_TOKENS. */
chunk_options chunk_default_options(int max_tokens);

/* One chunk: text[start, end) of the document, which begins and ends with a character that is
 * not whitespace and never splits a UTF-8 sequence. `tokens` is the exact length of the sequence
 * the engine will embed for it (prompt, title when used, separator, text, [CLS] and [SEP]) and is
 * at most max_tokens. */
typedef struct chunk_span {
    size_t start, end;
    int tokens;
} chunk_span;

/* The chunks of one document, in order: starts and ends both strictly increase, consecutive
 * chunks overlap by at most overlap_tokens, and every byte that is not whitespace lies in a
 * chunk (unless its chunk would hold no token at all: text the tokenizer drops, such as control
 * characters alone, makes no chunk). */
typedef struct chunk_list {
    chunk_span *spans;
    size_t count;
    /* Whether the budget counted the title: when true the caller embeds
     * prompt + title + CHUNK_TITLE_SEPARATOR + text for each chunk; when false (no title, or one
     * too long to leave room, see CHUNK_MIN_TEXT_TOKENS) prompt + text. */
    bool title_used;
} chunk_list;

/* Cuts text[0, length) (UTF-8) into chunks for `tokenizer`'s model. Split hierarchy, strongest
 * first: Markdown ATX headings (`#` to `######` at the start of a line, outside fenced code;
 * a `#` heading is stronger than a `##` one), blank lines, sentence ends (. ! ? and the like
 * followed by whitespace, and CJK full stops), line breaks (before a list item or table row
 * they count as sentence ends), clause marks (, ; : and CJK commas), whitespace, then inside a
 * word after punctuation and around CJK ideographs, and last between grapheme clusters (code
 * points for a cluster that alone is too long). A piece that fits is never split: the pieces of
 * each level are packed greedily into chunks, and only a piece too long for a chunk is split at
 * the next level, its parts never sharing a chunk with text outside it. A heading goes with the
 * first words under it. Overlap repeats whole trailing pieces of the level being packed, never
 * crosses a heading, and is not used between parts of a character-split word. Every chunk's
 * count is checked by tokenizing it with its prompt and title. Whitespace alone makes no chunk:
 * an empty or blank document gives none.
 *
 * On success *out holds the chunks (free with chunk_list_free) and 0 is returned. On failure *out
 * is empty and the status is negative: EMBEDRAG_ERR_INVALID_UTF8 with the byte offset in the
 * text (or naming the title or prompt), EMBEDRAG_ERR_INVALID_ARGUMENT for bad options (a prompt
 * that leaves no room), EMBEDRAG_ERR_TOO_LONG for a single character that needs more tokens than
 * the room left, EMBEDRAG_ERR_NO_MEMORY; the message is in util/error.h's err_get(). The text,
 * options and tokenizer are only read during the call. Thread-safe for distinct outputs. */
int chunk_text(const tok_tokenizer *tokenizer, const char *text, size_t length,
               const chunk_options *options, chunk_list *out);

/* Frees the spans and empties the list; the list itself belongs to the caller. NULL is a no-op,
 * and freeing twice is harmless. */
void chunk_list_free(chunk_list *list);

#endif
