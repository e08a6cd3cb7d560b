/* Thread-local error messages: every public call that fails leaves a one-line explanation here
 * for embedrag_last_error(). */
#include "util/error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* Long enough for a path plus a field name and an offset; longer messages are cut. */
#define ERROR_MESSAGE_CAPACITY 1024

static _Thread_local char error_message[ERROR_MESSAGE_CAPACITY];
static _Thread_local long error_text = -1;

int err_set(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(error_message, sizeof error_message, fmt, ap);
    va_end(ap);
    error_text = -1;
    return code;
}

void err_set_text(size_t index)
{
    error_text = (long)index;
}

long err_text(void)
{
    return error_text;
}

int err_prefix(int code, const char *fmt, ...)
{
    char old[ERROR_MESSAGE_CAPACITY];
    memcpy(old, error_message, sizeof old);
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(error_message, sizeof error_message, fmt, ap);
    va_end(ap);
    if (n >= 0 && (size_t)n < sizeof error_message)
        snprintf(error_message + n, sizeof error_message - (size_t)n, "%s", old);
    return code;
}

void err_clear(void)
{
    error_message[0] = '\0';
    error_text = -1;
}

const char *err_get(void)
{
    return error_message;
}
