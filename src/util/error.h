/* Error reporting shared by every module: a thread-local message plus the negative status code
 * that the failing function returns (see embedrag_status in include/embedrag.h). */
#ifndef EMBEDRAG_UTIL_ERROR_H
#define EMBEDRAG_UTIL_ERROR_H

#include "embedrag.h"

/* Formats a message into the calling thread's error buffer and returns `code`, so callers can
 * write `return err_set(EMBEDRAG_ERR_FORMAT, "%s: ...", path);`. */
int err_set(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prefixes the current message with more context ("model.safetensors: " + old message) and
 * returns `code`. */
int err_prefix(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Records that the current error concerns text `index` of the call (see
 * embedrag_last_error_text); err_set and err_clear forget it. */
void err_set_text(size_t index);

/* The text index recorded by err_set_text since the last err_set or err_clear, or -1. */
long err_text(void);

/* Clears the calling thread's message. */
void err_clear(void);

/* The calling thread's message ("" when none). */
const char *err_get(void);

#endif
