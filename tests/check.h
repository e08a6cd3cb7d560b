/* A minimal test harness: CHECK records a failure with file and line and keeps going; each test
 * binary returns non-zero when any check failed, which ctest counts. */
#ifndef EMBEDRAG_TESTS_CHECK_H
#define EMBEDRAG_TESTS_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

/* Real text for tests: the first sentence of each STS-B dev pair (sentence1,sentence2,score: cut
 * at the second comma from the end), up to `max`, into out[] as malloc'd strings the caller
 * frees. Returns how many were read, or -1 when ../shared/data/stsb-en-dev.csv is missing. */
static inline int check_stsb_sentences(char **out, int max)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/../shared/data/stsb-en-dev.csv", check_source_dir());
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    char line[4096];
    int n = 0;
    while (n < max && fgets(line, sizeof line, f)) {
        char *end = line + strlen(line);
        int commas = 0;
        while (end > line && commas < 2)
            if (*--end == ',') commas++;
        if (commas < 2 || end == line) continue;
        *end = '\0';
        out[n] = strdup(line);
        if (out[n]) n++;
    }
    fclose(f);
    return n;
}

#endif
