/* The server's response writing: a growable byte buffer, JSON strings escaped for any bytes,
 * floats with just enough digits to read back exactly, and base64. Hand-written because the
 * responses are mostly float arrays and cJSON prints each with a 17-digit sprintf and a
 * re-parse (measured several times the cost of the forward pass for 100 short texts). */
#ifndef EMBEDRAG_SERVER_OUTPUT_H
#define EMBEDRAG_SERVER_OUTPUT_H

#include <stdbool.h>
#include <stddef.h>

/* A byte buffer that grows as needed; `failed` is set (and writes stop) when memory runs out,
 * so callers check once at the end. Zero-initialize; free `data` with free(). */
typedef struct out_buffer {
    char *data;
    size_t length, capacity;
    bool failed;
} out_buffer;

void out_bytes(out_buffer *b, const void *bytes, size_t n);
void out_text(out_buffer *b, const char *text);
void out_format(out_buffer *b, const char *format, ...) __attribute__((format(printf, 2, 3)));

/* A JSON string (quotes included) of n bytes: quotes, backslashes and control characters are
 * escaped, valid UTF-8 is copied, and each byte of invalid UTF-8 becomes U+FFFD, so the output
 * is always valid JSON. text NULL writes null. */
void out_json_string(out_buffer *b, const char *text, size_t n);
void out_json_cstring(out_buffer *b, const char *text);

/* A float as a JSON number with 9 significant digits at most (trailing zeros dropped): strtof of
 * the text gives back the same float for every finite value. NaN and infinities write null. */
void out_json_float(out_buffer *b, float x);

/* n floats as a JSON array. */
void out_json_floats(out_buffer *b, const float *v, size_t n);

/* n bytes in base64 (RFC 4648, padded), without quotes. */
void out_base64(out_buffer *b, const void *bytes, size_t n);

#endif
