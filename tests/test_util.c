/* Tests of the shared helpers in src/util: whole-file reads (missing, empty, oversized and
 * unreadable files) and path joining. */
#include "check.h"

#include "util/error.h"
#include "util/file.h"

#include "embedrag.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char temp_root[512];

/* temp_root/name in a malloc'd string. */
static char *temp_file(const char *name)
{
    char *path;
    if (file_join(temp_root, name, &path) != 0) abort();
    return path;
}

static void write_file(const char *path, const void *data, size_t size)
{
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, size, f) != size) {
        fprintf(stderr, "cannot write %s\n", path);
        abort();
    }
    fclose(f);
}

static void test_file_read_returns_the_bytes_and_a_nul(void)
{
    char *path = temp_file("bytes.bin");
    static const char data[] = "a\0b\nc"; /* a NUL inside must survive */
    write_file(path, data, sizeof data - 1);
    char *text = NULL;
    size_t length = 0;
    int rc = file_read(path, 1000, &text, &length, NULL);
    CHECK(rc == 0 && text && length == sizeof data - 1, "read: %d %s", rc, err_get());
    if (text) {
        CHECK(memcmp(text, data, length) == 0 && text[length] == '\0', "bytes and NUL");
        free(text);
    }

    /* A file of exactly the limit is accepted; one byte more is refused. */
    rc = file_read(path, sizeof data - 1, &text, &length, NULL);
    CHECK(rc == 0 && length == sizeof data - 1, "at the limit: %d %s", rc, err_get());
    free(text);
    rc = file_read(path, sizeof data - 2, &text, &length, NULL);
    CHECK(rc == EMBEDRAG_ERR_FORMAT && text == NULL && strstr(err_get(), "bytes.bin") &&
              strstr(err_get(), "larger than 4 bytes"),
          "over the limit: %d %s", rc, err_get());
    free(path);

    path = temp_file("empty.txt");
    write_file(path, "", 0);
    rc = file_read(path, 10, &text, &length, NULL);
    CHECK(rc == 0 && text && length == 0 && text[0] == '\0', "empty file: %d %s", rc, err_get());
    free(text);
    free(path);
}

static void test_file_read_grows_past_a_size_it_cannot_know(void)
{
    /* /proc files report a size of 0 but have content, as pipes do. */
    char *text = NULL;
    size_t length = 0;
    int rc = file_read("/proc/self/status", 1 << 20, &text, &length, NULL);
    CHECK(rc == 0 && length > 0 && strlen(text) == length && strstr(text, "Name:"),
          "/proc/self/status: %d %s", rc, err_get());
    free(text);
    rc = file_read("/proc/self/status", 16, &text, &length, NULL);
    CHECK(rc == EMBEDRAG_ERR_FORMAT && text == NULL, "/proc file over the limit: %d %s", rc,
          err_get());
}

static void test_file_read_missing_and_unreadable(void)
{
    char *path = temp_file("absent.json");
    char *text = (char *)1;
    size_t length = 1;
    bool missing = false;
    int rc = file_read(path, 10, &text, &length, &missing);
    CHECK(rc == 0 && missing && text == NULL && length == 0, "optional missing file: %d", rc);
    rc = file_read(path, 10, &text, &length, NULL);
    CHECK(rc == EMBEDRAG_ERR_IO && strstr(err_get(), "absent.json") &&
              strstr(err_get(), "No such file"),
          "required missing file: %d %s", rc, err_get());

    /* Only absence is optional: a directory in the file's place is still an error. */
    rc = file_read(temp_root, 10, &text, &length, &missing);
    CHECK(rc == EMBEDRAG_ERR_IO && !missing && strstr(err_get(), "directory"), "directory: %d %s",
          rc, err_get());
    free(path);
}

static void test_file_join(void)
{
    static const struct {
        const char *directory, *name, *expected;
    } cases[] = {
        {"models/m", "config.json", "models/m/config.json"},
        {"models/m/", "config.json", "models/m/config.json"},
        {"/", "x", "/x"},
        {"", "config.json", "config.json"},
        {"dir", "1_Pooling/config.json", "dir/1_Pooling/config.json"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *path = NULL;
        int rc = file_join(cases[i].directory, cases[i].name, &path);
        CHECK(rc == 0 && path && strcmp(path, cases[i].expected) == 0, "join '%s' '%s': %s",
              cases[i].directory, cases[i].name, path ? path : "(null)");
        free(path);
    }
}

int main(void)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(temp_root, sizeof temp_root, "%s/embedrag-test-util-XXXXXX", tmp ? tmp : "/tmp");
    if (!mkdtemp(temp_root)) {
        perror("mkdtemp");
        return 1;
    }

    test_file_read_returns_the_bytes_and_a_nul();
    test_file_read_grows_past_a_size_it_cannot_know();
    test_file_read_missing_and_unreadable();
    test_file_join();

    static const char *const created[] = {"bytes.bin", "empty.txt"};
    for (size_t i = 0; i < sizeof created / sizeof created[0]; i++) {
        char *path = temp_file(created[i]);
        unlink(path);
        free(path);
    }
    rmdir(temp_root);
    return check_finish("test_util");
}
