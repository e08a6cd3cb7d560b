/* Response writing for the server: see output.h. */
#include "output.h"

#include "util/utf8.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool reserve(out_buffer *b, size_t more)
{
    if (b->failed) return false;
    if (b->length + more <= b->capacity) return true;
    size_t grown = b->capacity ? b->capacity : 1024;
    while (grown < b->length + more) grown *= 2;
    char *data = realloc(b->data, grown);
    if (!data) {
        b->failed = true;
        return false;
    }
    b->data = data;
    b->capacity = grown;
    return true;
}

void out_bytes(out_buffer *b, const void *bytes, size_t n)
{
    if (!n || !reserve(b, n)) return;
    memcpy(b->data + b->length, bytes, n);
    b->length += n;
}

void out_text(out_buffer *b, const char *text)
{
    out_bytes(b, text, strlen(text));
}

void out_format(out_buffer *b, const char *format, ...)
{
    va_list args;
    va_start(args, format);
    char small[256];
    int n = vsnprintf(small, sizeof small, format, args);
    va_end(args);
    if (n < 0) return;
    if ((size_t)n < sizeof small) {
        out_bytes(b, small, (size_t)n);
        return;
    }
    if (!reserve(b, (size_t)n + 1)) return;
    va_start(args, format);
    vsnprintf(b->data + b->length, (size_t)n + 1, format, args);
    va_end(args);
    b->length += (size_t)n;
}

void out_json_string(out_buffer *b, const char *text, size_t n)
{
    if (!text) {
        out_bytes(b, "null", 4);
        return;
    }
    /* Worst case: every byte becomes \ufffd's three bytes or a six-byte escape. */
    if (n > (SIZE_MAX - 2) / 6 || !reserve(b, n * 6 + 2)) {
        b->failed = true;
        return;
    }
    static const char hex[] = "0123456789abcdef";
    const unsigned char *s = (const unsigned char *)text;
    char *o = b->data + b->length;
    *o++ = '"';
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') {
            *o++ = (char)c;
            i++;
        } else if (c == '"' || c == '\\') {
            *o++ = '\\';
            *o++ = (char)c;
            i++;
        } else if (c < 0x20) {
            static const char short_escape[32] = {
                ['\b'] = 'b', ['\f'] = 'f', ['\n'] = 'n', ['\r'] = 'r', ['\t'] = 't'};
            *o++ = '\\';
            if (short_escape[c]) {
                *o++ = short_escape[c];
            } else {
                memcpy(o, "u00", 3);
                o += 3;
                *o++ = hex[c >> 4];
                *o++ = hex[c & 15];
            }
            i++;
        } else {
            size_t len = utf8_sequence_length(s + i, n - i);
            if (len) {
                memcpy(o, s + i, len);
                o += len;
                i += len;
            } else {
                memcpy(o, "\xef\xbf\xbd", 3); /* U+FFFD for each byte that is not UTF-8 */
                o += 3;
                i++;
            }
        }
    }
    *o++ = '"';
    b->length = (size_t)(o - b->data);
}

void out_json_cstring(out_buffer *b, const char *text)
{
    out_json_string(b, text, text ? strlen(text) : 0);
}

/* Powers of ten from 1e-31 to 1e54, the range 9 digits of any float need; filled once. */
#define POWER_MIN (-31)
#define POWER_MAX 54
static double powers[POWER_MAX - POWER_MIN + 1];
static pthread_once_t powers_once = PTHREAD_ONCE_INIT;

static void fill_powers(void)
{
    for (int i = POWER_MIN; i <= POWER_MAX; i++) powers[i - POWER_MIN] = pow(10.0, i);
}

static double power_of_ten(int e)
{
    pthread_once(&powers_once, fill_powers);
    return powers[e - POWER_MIN];
}

/* Why 9 digits from double arithmetic is exact enough: a float has 24 bits, so 9 significant
 * digits always identify it (the decimal step is at most 1e-8 of the value, a float's half
 * step at least 2.9e-8). The scaling below is a double product with an error near 1e-16 of the
 * value, so the rounded 9-digit integer is the correctly rounded one or, on a near-tie, its
 * neighbour: still within 1.5e-8 of the value, closer than any other float. */
void out_json_float(out_buffer *b, float x)
{
    if (!isfinite(x)) {
        out_bytes(b, "null", 4);
        return;
    }
    if (!reserve(b, 24)) return;
    char *o = b->data + b->length;
    if (signbit(x)) *o++ = '-';
    double v = fabs((double)x);
    if (v == 0.0) {
        *o++ = '0';
        b->length = (size_t)(o - b->data);
        return;
    }
    int e10 = (int)floor(log10(v));
    uint64_t m = (uint64_t)llround(v * power_of_ten(8 - e10));
    if (m < 100000000u || m >= 1000000000u) { /* log10 landed one power off */
        e10 += m < 100000000u ? -1 : 1;
        m = (uint64_t)llround(v * power_of_ten(8 - e10));
    }
    if (m >= 1000000000u) { /* the rounding carried into a tenth digit: 999999999.5 */
        m /= 10;
        e10++;
    }
    char digits[9];
    for (int i = 8; i >= 0; i--) {
        digits[i] = (char)('0' + m % 10);
        m /= 10;
    }
    int count = 9;
    while (count > 1 && digits[count - 1] == '0') count--;
    if (e10 >= -5 && e10 < 9) {
        if (e10 < 0) {
            *o++ = '0';
            *o++ = '.';
            for (int i = -1; i > e10; i--) *o++ = '0';
            memcpy(o, digits, (size_t)count);
            o += count;
        } else {
            int whole = e10 + 1;
            for (int i = 0; i < whole; i++) *o++ = i < count ? digits[i] : '0';
            if (count > whole) {
                *o++ = '.';
                memcpy(o, digits + whole, (size_t)(count - whole));
                o += count - whole;
            }
        }
    } else {
        *o++ = digits[0];
        if (count > 1) {
            *o++ = '.';
            memcpy(o, digits + 1, (size_t)(count - 1));
            o += count - 1;
        }
        o += sprintf(o, "e%d", e10);
    }
    b->length = (size_t)(o - b->data);
}

void out_json_floats(out_buffer *b, const float *v, size_t n)
{
    out_bytes(b, "[", 1);
    for (size_t i = 0; i < n; i++) {
        if (i) out_bytes(b, ",", 1);
        out_json_float(b, v[i]);
    }
    out_bytes(b, "]", 1);
}

void out_base64(out_buffer *b, const void *bytes, size_t n)
{
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    if (n == 0 || !reserve(b, (n + 2) / 3 * 4)) return;
    const unsigned char *s = bytes;
    char *o = b->data + b->length;
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8 | s[i + 2];
        *o++ = alphabet[v >> 18];
        *o++ = alphabet[v >> 12 & 63];
        *o++ = alphabet[v >> 6 & 63];
        *o++ = alphabet[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)s[i] << 16 | (i + 1 < n ? (uint32_t)s[i + 1] << 8 : 0);
        *o++ = alphabet[v >> 18];
        *o++ = alphabet[v >> 12 & 63];
        *o++ = i + 1 < n ? alphabet[v >> 6 & 63] : '=';
        *o++ = '=';
    }
    b->length = (size_t)(o - b->data);
}
