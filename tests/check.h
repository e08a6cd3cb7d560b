/* A minimal test harness: CHECK records a failure with file and line and keeps going; each test
 * binary returns non-zero when any check failed, which ctest counts. */
#ifndef EMBEDRAG_TESTS_CHECK_H
#define EMBEDRAG_TESTS_CHECK_H

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int check_failures;
static int check_count;

/* Sanitizer builds run many times slower (ASan, UBSan and the fuzzers' coverage counters in every
 * loop of the model): tests size their work down there, keeping every code path. */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define CHECK_SLOW_BUILD 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define CHECK_SLOW_BUILD 1
#endif
#endif

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

/* Random test data, the same on every run: xorshift64 (check_random), uniform in [-1, 1)
 * (check_uniform), and scaling a vector to unit length (check_normalize; a zero vector becomes
 * the first axis). */
static inline uint64_t check_random(void)
{
    static uint64_t state = 0x9E3779B97F4A7C15ull;
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

static inline float check_uniform(void)
{
    return (float)((check_random() >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

static inline void check_normalize(float *v, size_t dim)
{
    double s = 0;
    for (size_t j = 0; j < dim; j++) s += (double)v[j] * v[j];
    if (s == 0) v[0] = 1.0f, s = 1.0;
    float inv = (float)(1.0 / sqrt(s));
    for (size_t j = 0; j < dim; j++) v[j] *= inv;
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

/* SQLite's integrity checks of the store and of its text index's files, and the text index's
 * account: each file (one, or one per shard, as the store's meta text_shards says) holds exactly
 * what an index built afresh from the store's chunks of that shard would hold, term by term,
 * chunk by chunk, position by position (FTS5's vocabulary of instances, compared both ways), and
 * one row per chunk of the shard. The text index must have been brought up to date. Uses the
 * sqlite3 command. */
static inline bool check_text_index_consistent(const char *path)
{
    char command[3000];
    snprintf(command, sizeof command,
             "sqlite3 '%s' \"SELECT coalesce((SELECT value FROM meta WHERE key = 'text_shards'), "
             "1)\"",
             path);
    FILE *p = popen(command, "r");
    int shards = 0;
    if (!p || fscanf(p, "%d", &shards) != 1) shards = 0;
    if (p) pclose(p);
    if (shards < 1) return false;
    for (int k = 0; k < shards; k++) {
        char file[600];
        if (shards > 1)
            snprintf(file, sizeof file, "%s-text.%d", path, k);
        else
            snprintf(file, sizeof file, "%s-text", path);
        snprintf(command, sizeof command,
                 "test \"$(sqlite3 '%s' \"ATTACH '%s' AS store; PRAGMA integrity_check; INSERT "
                 "INTO chunk_text(chunk_text) VALUES ('integrity-check'); CREATE VIRTUAL TABLE "
                 "temp.fresh USING fts5 (text, content = ''); INSERT INTO temp.fresh (rowid, text) "
                 "SELECT id, text FROM store.chunks WHERE id %% %d = %d; CREATE VIRTUAL TABLE "
                 "temp.fresh_terms USING fts5vocab(temp, fresh, 'instance'); CREATE VIRTUAL TABLE "
                 "temp.kept_terms USING fts5vocab(main, chunk_text, 'instance'); SELECT (SELECT "
                 "count(*) FROM (SELECT * FROM temp.fresh_terms EXCEPT SELECT * FROM "
                 "temp.kept_terms)) + (SELECT count(*) FROM (SELECT * FROM temp.kept_terms EXCEPT "
                 "SELECT * FROM temp.fresh_terms)) = 0 AND (SELECT count(*) FROM "
                 "chunk_text_docsize) = (SELECT count(*) FROM store.chunks WHERE id %% %d = "
                 "%d);\" 2>&1 | tr '\\n' ' ')\" = 'ok 1 '",
                 file, path, shards, k, shards, k);
        if (system(command) != 0) return false;
    }
    return true;
}

#endif
