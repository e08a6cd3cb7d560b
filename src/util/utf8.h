/* UTF-8 validity, shared by the tokenizer (which refuses invalid text) and the server's JSON
 * writer (which replaces it): the length of the well-formed sequence at the start of a buffer,
 * as Rust's str accepts it (no overlong forms, no surrogates, nothing above U+10FFFF). Inline,
 * since the tokenizer checks every byte it reads. */
#ifndef EMBEDRAG_UTIL_UTF8_H
#define EMBEDRAG_UTIL_UTF8_H

#include <stddef.h>

/* The byte length (1 to 4) of the valid sequence at s[0] within s[0, n), or 0 when s[0] does
 * not start one (a stray continuation byte, an overlong form, a surrogate, a value past
 * U+10FFFF, or a sequence cut short by n). n must be at least 1. */
static inline size_t utf8_sequence_length(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    if (c < 0x80) return 1;
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
        return 0; /* stray continuation byte, overlong C0/C1, or F5..FF */
    }
    if (n <= need) return 0; /* truncated */
    if (s[1] < lo || s[1] > hi) return 0;
    for (size_t k = 2; k <= need; k++)
        if ((s[k] & 0xC0) != 0x80) return 0;
    return need + 1;
}

#endif
