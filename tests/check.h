/* A minimal test harness: CHECK records a failure with file and line and keeps going; each test
 * binary returns non-zero when any check failed, which ctest counts. */
#ifndef EMBEDRAG_TESTS_CHECK_H
#define EMBEDRAG_TESTS_CHECK_H

#include <stdio.h>
#include <stdlib.h>

static int check_failures;
static int check_count;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        check_count++;                                                                             \
        if (!(cond)) {                                                                             \
            check_failures++;                                                                      \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);               \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fprintf(stderr, "\n");                                                                 \
        }                                                                                          \
    } while (0)

/* Ends a test program: prints a summary line and returns the exit status for main. */
static inline int check_finish(const char *name)
{
    printf("%s: %d checks, %d failed\n", name, check_count, check_failures);
    return check_failures ? 1 : 0;
}

/* Directory of the source tree (set by ctest; "." otherwise). */
static inline const char *check_source_dir(void)
{
    const char *d = getenv("EMBEDRAG_SOURCE_DIR");
    return d ? d : ".";
}

#endif
