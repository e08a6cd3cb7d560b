/* Reading small files whole and building paths inside a model directory, shared by the loaders
 * of config files, tokenizer files and weights so that every one reports a missing, unreadable or
 * oversized file the same way. */
#ifndef EMBEDRAG_UTIL_FILE_H
#define EMBEDRAG_UTIL_FILE_H

#include <stdbool.h>
#include <stddef.h>

/* Reads the whole file at `path` into a malloc'd buffer that the caller frees; *text holds
 * *length bytes followed by a NUL (the file may itself hold NUL bytes). A file of more than
 * `max_bytes` bytes is refused with EMBEDRAG_ERR_FORMAT: each caller states what is plausible
 * for its kind of file, so that a wrong or hostile path cannot make it allocate without bound.
 * When `missing` is not NULL, a file that does not exist is not an error: *missing becomes true,
 * *text NULL, and the result 0 (for optional files). Any other failure is EMBEDRAG_ERR_IO (or
 * EMBEDRAG_ERR_NO_MEMORY) with a message naming the path and the system's reason. */
int file_read(const char *path, size_t max_bytes, char **text, size_t *length, bool *missing);

/* Sets *out to "directory/name" in a malloc'd string the caller frees; no second '/' is added
 * when `directory` already ends with one, and an empty `directory` gives `name` alone. On
 * failure *out is NULL and the result EMBEDRAG_ERR_NO_MEMORY. */
int file_join(const char *directory, const char *name, char **out);

#endif
