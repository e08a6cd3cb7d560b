/* Whole-file reads with a size bound, and path joining: the one place that turns open/read
 * failures into messages, so config, tokenizer and weights loaders all name the path and the
 * system's reason alike. */
#include "util/file.h"

#include "util/error.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Pipes and files under /proc report a size of 0; reading them starts with this much room. */
#define FILE_INITIAL_CAPACITY 4096

static int file_too_large(const char *path, size_t max_bytes)
{
    return err_set(EMBEDRAG_ERR_FORMAT,
                   "%s: larger than %zu bytes, too large for this kind of file", path, max_bytes);
}

int file_read(const char *path, size_t max_bytes, char **text, size_t *length, bool *missing)
{
    *text = NULL;
    *length = 0;
    if (missing) *missing = false;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT && missing) {
            *missing = true;
            return 0;
        }
        return err_set(EMBEDRAG_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    }
    int rc = 0;
    char *buffer = NULL;
    size_t used = 0;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        rc = err_set(EMBEDRAG_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        goto close_file;
    }
    if (S_ISDIR(st.st_mode)) {
        rc = err_set(EMBEDRAG_ERR_IO, "%s: is a directory, expected a file", path);
        goto close_file;
    }
    /* One byte more than the limit is enough to see that a file exceeds it, and one more holds
     * the NUL. */
    size_t ceiling = max_bytes < SIZE_MAX - 2 ? max_bytes + 2 : SIZE_MAX;
    size_t capacity = FILE_INITIAL_CAPACITY;
    if (S_ISREG(st.st_mode) && st.st_size > 0) {
        if ((uint64_t)st.st_size > max_bytes) {
            rc = file_too_large(path, max_bytes);
            goto close_file;
        }
        /* Room for the whole file at once, plus the byte that finds its end. */
        capacity = (size_t)st.st_size + 2;
    }
    if (capacity > ceiling) capacity = ceiling;
    buffer = malloc(capacity);
    if (!buffer) {
        rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "%s: out of memory reading it", path);
        goto close_file;
    }
    for (;;) {
        if (used + 1 == capacity) {
            size_t grown_capacity = capacity <= ceiling / 2 ? capacity * 2 : ceiling;
            char *grown = realloc(buffer, grown_capacity);
            if (!grown) {
                rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "%s: out of memory reading it", path);
                goto free_buffer;
            }
            buffer = grown;
            capacity = grown_capacity;
        }
        ssize_t got = read(fd, buffer + used, capacity - 1 - used);
        if (got < 0) {
            if (errno == EINTR) continue;
            rc = err_set(EMBEDRAG_ERR_IO, "%s: read error: %s", path, strerror(errno));
            goto free_buffer;
        }
        if (got == 0) break;
        used += (size_t)got;
        if (used > max_bytes) {
            rc = file_too_large(path, max_bytes);
            goto free_buffer;
        }
    }
    buffer[used] = '\0';
    close(fd);
    *text = buffer;
    *length = used;
    return 0;

free_buffer:
    free(buffer);
close_file:
    close(fd);
    return rc;
}

int file_join(const char *directory, const char *name, char **out)
{
    size_t directory_length = strlen(directory), name_length = strlen(name);
    *out = malloc(directory_length + name_length + 2);
    if (!*out) return err_set(EMBEDRAG_ERR_NO_MEMORY, "%s/%s: out of memory", directory, name);
    char *p = *out;
    memcpy(p, directory, directory_length);
    p += directory_length;
    if (directory_length > 0 && directory[directory_length - 1] != '/') *p++ = '/';
    memcpy(p, name, name_length + 1);
    return 0;
}
