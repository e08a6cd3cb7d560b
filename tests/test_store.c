/* The SQLite store: documents with chunks and vectors round-trip, replacing and deleting keep the
 * text index in step, the model's identity is enforced, a second writer and foreign or damaged
 * files get clear errors, batches are all-or-nothing, a process killed mid-batch (SIGKILL, at
 * random points, many times) leaves a consistent store that takes more work, and a write that
 * runs out of space fails cleanly. Real sentences from ../shared/data. */
#include "store/store.h"

#include "check.h"
#include "util/error.h"
#include "util/threadpool.h"

#include <math.h>
#include <pthread.h>
#include <sqlite3.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define DIM 8
#define MAX_SENTENCES 400
/* Documents of the killed-writer test: enough that a run lasts a few hundred milliseconds. */
#define KILL_DOCUMENTS 3000

static char *sentences[MAX_SENTENCES];
static int sentence_count;
static char dir[256];

static const store_model model = {.name = "test-model",
                                  .dimension = DIM,
                                  .pooling = "mean",
                                  .prompt = "",
                                  .precision = "fp32",
                                  .weights_hash = "abc123",
                                  .directory = "/models/test"};

static int load_sentences(void)
{
    sentence_count = check_stsb_sentences(sentences, MAX_SENTENCES);
    return sentence_count > 100 ? 0 : -1;
}

/* A deterministic vector for chunk `seed`. */
static void vector_for(int seed, float *v)
{
    for (int i = 0; i < DIM; i++) v[i] = (float)sin(seed * 0.37 + i * 1.3);
}

/* Document `d`: `chunks` sentences, each a chunk with its own vector. */
static int put_document(store *s, int d, int chunks, int salt)
{
    char key[64], source[96], metadata[96];
    snprintf(key, sizeof key, "doc-%04d", d);
    snprintf(source, sizeof source, "/corpus/doc-%04d.txt", d);
    snprintf(metadata, sizeof metadata, "{\"lang\":\"en\",\"rank\":%d,\"draft\":%s}", d % 5,
             d % 4 == 1 ? "true" : "false");
    store_document doc = {.key = key,
                          .source = source,
                          .title = d % 3 ? NULL : "A title",
                          .metadata = d % 2 ? metadata : NULL,
                          .content_hash = 1000003u * (uint64_t)d + (uint64_t)salt,
                          .size = 100 * d,
                          .mtime = 1700000000 + d};
    store_chunk c[16];
    float v[16][DIM];
    int64_t offset = 0;
    for (int i = 0; i < chunks; i++) {
        const char *text = sentences[(d * 7 + i + salt) % sentence_count];
        vector_for(d * 100 + i + salt, v[i]);
        c[i] = (store_chunk){.text = text,
                             .length = strlen(text),
                             .start = offset,
                             .end = offset + (int64_t)strlen(text),
                             .tokens = 5 + i,
                             .vector = v[i]};
        offset += (int64_t)strlen(text) + 1;
    }
    return store_put_document(s, &doc, c, (size_t)chunks);
}

static void path_in_dir(char *out, size_t size, const char *name)
{
    snprintf(out, size, "%s/%s", dir, name);
}

/* A new store named `name` in the test's folder (NULL, with a failed check, when it cannot be
 * made); its path in path[size]. */
static store *create_store(const char *name, char *path, size_t size)
{
    path_in_dir(path, size, name);
    store *s = NULL;
    CHECK(store_open(path, &model, false, &s) == 0, "create %s: %s", name, err_get());
    return s;
}

static int count_document(void *ctx, const char *key, const char *source)
{
    (void)source;
    *(int *)ctx += key != NULL;
    return 0;
}

/* BM25 for `target` under `filter` into hits/scores (room for k), checked to succeed and to
 * descend; *top is the best hit's chunk (zeroed when there is none). Returns the hit count. */
static int bm25_checked(store *s, const char *target, const store_filter *filter, int k,
                        int64_t *hits, double *scores, store_chunk_info *top)
{
    int got = 0;
    memset(top, 0, sizeof *top);
    CHECK(store_bm25(s, target, filter, k, hits, scores, &got) == 0, "bm25: %s", err_get());
    for (int i = 1; i < got; i++) CHECK(scores[i] <= scores[i - 1], "bm25 scores descend");
    if (got > 0) CHECK(store_get_chunk(s, hits[0], top) == 0, "bm25's best hit: %s", err_get());
    return got;
}

static void test_round_trip(void)
{
    char path[512];
    path_in_dir(path, sizeof path, "round.db");
    store *s = NULL;
    int rc = store_open(path, &model, false, &s);
    CHECK(rc == 0 && s, "create: %s", err_get());
    if (!s) return;
    for (int d = 0; d < 20; d++) CHECK(put_document(s, d, 1 + d % 4, 0) == 0, "put: %s", err_get());
    bool found;
    uint64_t hash;
    CHECK(store_find_document(s, "doc-0007", &found, &hash) == 0 && found && hash == 1000003u * 7,
          "find doc-0007");
    CHECK(store_find_document(s, "doc-9999", &found, &hash) == 0 && !found, "absent document");
    store_stats st;
    CHECK(store_get_stats(s, &st) == 0 && st.documents == 20 && st.chunks == 50 &&
              st.file_bytes > 0,
          "stats: %lld documents, %lld chunks", (long long)st.documents, (long long)st.chunks);

    float *m;
    int64_t *ids;
    size_t n;
    CHECK(store_load_vectors(s, &m, &ids, &n, NULL) == 0 && n == 50, "load: %zu vectors", n);
    /* Row i is chunk ids[i]; its text and vector are the ones stored. */
    int wrong = 0;
    for (size_t i = 0; i < n; i++) {
        store_chunk_info info;
        if (store_get_chunk(s, ids[i], &info) != 0) {
            wrong++;
            continue;
        }
        int d = atoi(info.document_key + 4);
        float v[DIM];
        vector_for(d * 100 + info.ordinal, v);
        const char *text = sentences[(d * 7 + info.ordinal) % sentence_count];
        wrong += memcmp(v, m + i * DIM, sizeof v) != 0 || strcmp(text, info.text) != 0 ||
                 info.tokens != 5 + info.ordinal || info.end - info.start != (int64_t)strlen(text);
    }
    CHECK(wrong == 0, "%d chunks differ from what was stored", wrong);
    free(m);
    free(ids);

    /* BM25: a sentence's rarest-looking words find it first. */
    const char *target = sentences[(7 * 7 + 2) % sentence_count]; /* doc 7's third chunk */
    int64_t hits[10];
    double scores[10];
    store_chunk_info top;
    int got = bm25_checked(s, target, NULL, 10, hits, scores, &top);
    CHECK(got > 0 && strcmp(top.text, target) == 0,
          "bm25's best hit is the sentence searched for: '%s' vs '%s'", got ? top.text : "",
          target);
    for (int i = 1; i < got; i++) CHECK(scores[i] <= scores[i - 1], "bm25 scores descend");
    /* Text that is no FTS5 syntax still searches: quotes, operators, parentheses. */
    CHECK(store_bm25(s, "\"NEAR( AND OR * ^ -:", NULL, 10, hits, scores, &got) == 0,
          "odd query text: %s", err_get());
    CHECK(store_bm25(s, "!!! ???", NULL, 10, hits, scores, &got) == 0 && got == 0, "no words");

    /* Replacing: the old chunks and their text go, the new ones come. */
    const char *old_text = sentences[(3 * 7 + 0) % sentence_count];
    CHECK(put_document(s, 3, 2, 50) == 0, "replace: %s", err_get());
    CHECK(store_get_stats(s, &st) == 0 && st.documents == 20 && st.chunks == 50 - 4 + 2,
          "after replace: %lld chunks", (long long)st.chunks);
    CHECK(store_bm25(s, old_text, NULL, 10, hits, scores, &got) == 0, "bm25");
    bool stale = false;
    for (int i = 0; i < got; i++) {
        store_chunk_info info;
        if (store_get_chunk(s, hits[i], &info) == 0 && !strcmp(info.document_key, "doc-0003") &&
            !strcmp(info.text, old_text) &&
            strcmp(old_text, sentences[(3 * 7 + 50) % sentence_count]))
            stale = true;
    }
    CHECK(!stale, "the replaced chunk's text is no longer found");

    CHECK(store_delete_document(s, "doc-0004", &found) == 0 && found, "delete");
    CHECK(store_delete_document(s, "doc-0004", &found) == 0 && !found, "delete twice");
    CHECK(store_get_stats(s, &st) == 0 && st.documents == 19 && st.chunks == 48 - 1,
          "after delete: %lld documents, %lld chunks", (long long)st.documents,
          (long long)st.chunks);
    int listed = 0;
    CHECK(store_each_document(s, count_document, &listed) == 0 && listed == 19,
          "every document listed: %d", listed);
    store_close(s);

    /* Read-only: the identity comes from the store. */
    rc = store_open(path, NULL, true, &s);
    CHECK(rc == 0, "read-only open: %s", err_get());
    if (s) {
        const store_model *m2 = store_get_model(s);
        CHECK(!strcmp(m2->name, "test-model") && m2->dimension == DIM &&
                  !strcmp(m2->weights_hash, "abc123"),
              "identity read back");
        CHECK(store_get_stats(s, &st) == 0 && st.documents == 19, "read-only stats");
        store_close(s);
    }
}

static void test_identity_and_files(void)
{
    char path[512];
    path_in_dir(path, sizeof path, "identity.db");
    store *s = NULL;
    CHECK(store_open(path, &model, false, &s) == 0, "create: %s", err_get());
    store *second = NULL;
    int rc = store_open(path, &model, false, &second);
    CHECK(rc == EMBEDRAG_ERR_BUSY && !second && strstr(err_get(), path) &&
              strstr(err_get(), "another process"),
          "a second writer is refused: %d %s", rc, err_get());
    store *reader = NULL;
    CHECK(store_open(path, NULL, true, &reader) == 0, "a reader beside the writer: %s", err_get());
    store_close(reader);
    store_close(s);

    store_model other = model;
    other.name = "other-model";
    rc = store_open(path, &other, false, &s);
    CHECK(rc == EMBEDRAG_ERR_MODEL_MISMATCH && !s && strstr(err_get(), "test-model") &&
              strstr(err_get(), "other-model"),
          "another model is refused, naming both: %s", err_get());
    other = model;
    other.dimension = DIM * 2;
    rc = store_open(path, &other, false, &s);
    CHECK(rc == EMBEDRAG_ERR_MODEL_MISMATCH, "another dimension is refused: %s", err_get());
    other = model;
    other.precision = "bf16";
    other.directory = "/elsewhere";
    rc = store_open(path, &other, false, &s);
    CHECK(rc == 0, "another precision and directory are taken: %s", err_get());
    if (s) {
        CHECK(!strcmp(store_get_model(s)->directory, "/elsewhere"), "the directory is updated");
        store_close(s);
    }

    /* Files that are no store. */
    char junk[512];
    path_in_dir(junk, sizeof junk, "junk.db");
    FILE *f = fopen(junk, "wb");
    for (int i = 0; i < 2000; i++) fputs("not a database at all ", f);
    fclose(f);
    rc = store_open(junk, &model, false, &s);
    CHECK(rc == EMBEDRAG_ERR_FORMAT && strstr(err_get(), junk) &&
              strstr(err_get(), "not a SQLite database"),
          "junk: %d %s", rc, err_get());
    rc = store_open(junk, NULL, true, &s);
    CHECK(rc == EMBEDRAG_ERR_FORMAT, "junk read-only: %d %s", rc, err_get());
    struct stat st;
    CHECK(stat(junk, &st) == 0 && st.st_size == 2000 * 22, "the junk file is untouched");

    char foreign[512], command[1200];
    path_in_dir(foreign, sizeof foreign, "foreign.db");
    /* A SQLite database of someone else's. */
    snprintf(command, sizeof command,
             "sqlite3 '%s' 'CREATE TABLE t (x); INSERT INTO t VALUES (1);'", foreign);
    if (system(command) == 0) {
        rc = store_open(foreign, &model, false, &s);
        CHECK(rc == EMBEDRAG_ERR_FORMAT && strstr(err_get(), "not an embedrag store"),
              "a foreign database: %d %s", rc, err_get());
    } else {
        printf("skipped the foreign-database check: no sqlite3 command\n");
    }

    char missing[512];
    path_in_dir(missing, sizeof missing, "missing.db");
    rc = store_open(missing, NULL, true, &s);
    CHECK(rc == EMBEDRAG_ERR_NOT_FOUND && strstr(err_get(), missing), "missing: %s", err_get());
    rc = store_open("/proc/no-such-dir/x.db", &model, false, &s);
    CHECK(rc == EMBEDRAG_ERR_IO && strstr(err_get(), "/proc/no-such-dir/x.db"),
          "unwritable location: %d %s", rc, err_get());
}

static void test_batches(void)
{
    char path[512];
    store *s = create_store("batches.db", path, sizeof path);
    if (!s) return;
    CHECK(store_begin(s) == 0, "begin");
    for (int d = 0; d < 5; d++) put_document(s, d, 2, 0);
    store_rollback(s);
    store_stats st;
    CHECK(store_get_stats(s, &st) == 0 && st.documents == 0 && st.chunks == 0,
          "a rolled-back batch leaves nothing");
    CHECK(store_begin(s) == 0, "begin");
    for (int d = 0; d < 5; d++) put_document(s, d, 2, 0);
    CHECK(store_commit(s) == 0, "commit: %s", err_get());
    CHECK(store_get_stats(s, &st) == 0 && st.documents == 5 && st.chunks == 10, "committed");
    /* A chunk without a vector fails its document only, inside the batch. */
    store_document bad = {.key = "bad", .source = "bad.txt"};
    store_chunk c = {.text = "x", .length = 1, .vector = NULL};
    CHECK(store_begin(s) == 0, "begin");
    put_document(s, 10, 1, 0);
    CHECK(store_put_document(s, &bad, &c, 1) == EMBEDRAG_ERR_INVALID_ARGUMENT, "no vector");
    CHECK(store_commit(s) == 0, "commit");
    bool found;
    uint64_t hash;
    store_find_document(s, "bad", &found, &hash);
    CHECK(!found, "the failed document is not stored");
    store_find_document(s, "doc-0010", &found, &hash);
    CHECK(found, "its batch's other document is");
    store_close(s);
}

static int check_consistent(const char *path, const char *when)
{
    store *s = NULL;
    if (store_open(path, NULL, true, &s) != 0) {
        CHECK(false, "%s: reopen: %s", when, err_get());
        return -1;
    }
    float *m;
    int64_t *ids;
    size_t n;
    static int counts[KILL_DOCUMENTS];
    memset(counts, 0, sizeof counts);
    CHECK(store_load_vectors(s, &m, &ids, &n, NULL) == 0, "%s: load", when);
    for (size_t i = 0; i < n; i++) {
        store_chunk_info info;
        if (store_get_chunk(s, ids[i], &info) == 0)
            counts[atoi(info.document_key + 4) % KILL_DOCUMENTS]++;
    }
    int documents = 0, partial = 0;
    for (int d = 0; d < KILL_DOCUMENTS; d++) {
        if (counts[d]) documents++;
        if (counts[d] && counts[d] != 1 + d % 4) partial++;
    }
    store_stats st;
    store_get_stats(s, &st);
    CHECK(partial == 0 && st.documents == documents && st.chunks == (int64_t)n,
          "%s: %d partial documents, %lld stored, %d with chunks", when, partial,
          (long long)st.documents, documents);
    free(m);
    free(ids);
    /* Whatever the kill left of the text index, a reader's update brings it up to date. */
    CHECK(store_index_text(s) == 0, "%s: update the text index: %s", when, err_get());
    store_close(s);
    if (access("/usr/bin/sqlite3", X_OK) == 0)
        CHECK(check_text_index_consistent(path),
              "%s: integrity check of the database and its text index", when);
    return documents;
}

/* In a killed writer: a second thread updates the text index on a connection of its own
 * (as the indexer's does) until the kill, so that kills land inside its transactions too. */
static void *keep_text_updated(void *arg)
{
    store_text *t = arg;
    for (;;) {
        if (store_text_update(t) != 0) _exit(7);
        struct timespec pause = {0, 2000000L};
        nanosleep(&pause, NULL);
    }
    return NULL;
}

/* A child indexes KILL_DOCUMENTS documents in batches of 7, replacing some stored ones (whose
 * old chunks leave the text index), while a thread updates the text index, and is killed with
 * SIGKILL after a random delay; the store and its text index must be consistent after every
 * kill, and the next run adds what is missing. */
static void test_killed_writers(void)
{
    char path[512];
    path_in_dir(path, sizeof path, "killed.db");
    srand(12345);
    int kills = 0, last = 0;
    for (int round = 0; round < 12; round++) {
        pid_t pid = fork();
        if (pid == 0) {
            store *s = NULL;
            if (store_open(path, &model, false, &s) != 0) _exit(3);
            /* A thread for each shard of the text index. */
            for (int k = 0; k < store_text_shards(s); k++) {
                store_text *text = NULL;
                pthread_t updater;
                if (store_text_open(s, k, &text) != 0 || !text ||
                    pthread_create(&updater, NULL, keep_text_updated, text) != 0)
                    _exit(3);
            }
            for (int d = 0; d < KILL_DOCUMENTS; d++) {
                bool found;
                uint64_t hash;
                if (d % 7 == 0 && store_begin(s) != 0) _exit(4);
                char key[64];
                snprintf(key, sizeof key, "doc-%04d", d);
                store_find_document(s, key, &found, &hash);
                if ((!found || d % 5 == round % 5) &&
                    put_document(s, d, 1 + d % 4, found ? round : 0) != 0)
                    _exit(5);
                if (d % 7 == 6 && store_commit(s) != 0) _exit(6);
            }
            store_commit(s);
            store_close(s);
            _exit(0);
        }
        struct timespec t = {0, (long)(rand() % 150) * 1000000L};
        nanosleep(&t, NULL);
        kill(pid, SIGKILL);
        int status = 0;
        waitpid(pid, &status, 0);
        if (WIFSIGNALED(status)) kills++;
        CHECK(WIFSIGNALED(status) || (WIFEXITED(status) && WEXITSTATUS(status) == 0),
              "round %d: the writer failed with %d", round, WEXITSTATUS(status));
        char when[32];
        snprintf(when, sizeof when, "after kill %d", round);
        int documents = check_consistent(path, when);
        CHECK(documents >= last, "round %d: documents went from %d to %d", round, last, documents);
        last = documents;
    }
    /* A last, uninterrupted run completes the corpus without duplicates. */
    pid_t pid = fork();
    if (pid == 0) {
        store *s = NULL;
        if (store_open(path, &model, false, &s) != 0) _exit(3);
        store_begin(s);
        for (int d = 0; d < KILL_DOCUMENTS; d++) {
            bool found;
            uint64_t hash;
            char key[64];
            snprintf(key, sizeof key, "doc-%04d", d);
            store_find_document(s, key, &found, &hash);
            if (!found && put_document(s, d, 1 + d % 4, 0) != 0) _exit(5);
        }
        _exit(store_commit(s) == 0 ? 0 : 6);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the completing run: %d", status);
    CHECK(check_consistent(path, "completed") == KILL_DOCUMENTS, "all documents after the kills");
    printf("killed the writer %d times mid-run; the store stayed consistent\n", kills);
}

/* Out of space: a batch larger than the file may grow fails with the file named, and what was
 * stored before stays (RLIMIT_FSIZE stands in for a full disk). */
static void test_out_of_space(void)
{
    char path[512];
    path_in_dir(path, sizeof path, "full.db");
    pid_t pid = fork();
    if (pid == 0) {
        store *s = NULL;
        if (store_open(path, &model, false, &s) != 0) _exit(3);
        for (int d = 0; d < 10; d++)
            if (put_document(s, d, 1 + d % 4, 0) != 0) _exit(4);
        store_close(s);
        if (store_open(path, &model, false, &s) != 0) _exit(5);
        signal(SIGXFSZ, SIG_IGN);
        struct stat st;
        stat(path, &st);
        struct rlimit limit = {(rlim_t)st.st_size + 8192, (rlim_t)st.st_size + 8192};
        setrlimit(RLIMIT_FSIZE, &limit);
        store_begin(s);
        int rc = 0;
        for (int d = 10; d < 400 && !rc; d++) rc = put_document(s, d, 1 + d % 4, 0);
        if (!rc) rc = store_commit(s);
        bool named = strstr(err_get(), path) != NULL && strstr(err_get(), "disk is full") != NULL;
        fprintf(stderr, "out of space: %d %s\n", rc, err_get());
        store_close(s);
        _exit(rc == 0 ? 10 : named ? 0 : 11);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0,
          "running out of space fails the batch with the file named (status %d)",
          WEXITSTATUS(status));
    int documents = check_consistent(path, "after running out of space");
    CHECK(documents == 10, "the 10 documents stored before are there: %d", documents);
}

typedef struct collected {
    int64_t ids[256];
    int count;
} collected;

static int collect_chunk(void *ctx, int64_t chunk_id)
{
    collected *c = ctx;
    if (c->count < 256) c->ids[c->count] = chunk_id;
    c->count++;
    return 0;
}

/* Whether every chunk in ids[0..n) belongs to a document `want` accepts, and how many do not. */
static int outside(store *s, const int64_t *ids, int n, bool (*want)(int d, const char *source))
{
    int bad = 0;
    for (int i = 0; i < n; i++) {
        store_chunk_info info;
        bad += store_get_chunk(s, ids[i], &info) != 0 ||
               !want(atoi(info.document_key + 4), info.source);
    }
    return bad;
}

static bool first_ten(int d, const char *source)
{
    return d < 10 && strncmp(source, "/corpus/doc-000", 15) == 0;
}
static bool odd(int d, const char *source)
{
    (void)source;
    return d % 2 == 1;
}
static bool odd_rank_3(int d, const char *source)
{
    (void)source;
    return d % 2 == 1 && d % 5 == 3;
}
static bool odd_draft_first_ten(int d, const char *source)
{
    return d % 2 == 1 && d % 4 == 1 && first_ten(d, source);
}

/* Filters by source glob and by metadata fields (strings, numbers, booleans), alone and
 * together, for listing chunks and for BM25. */
static void test_filters(void)
{
    char path[300];
    store *s = create_store("filters.db", path, sizeof path);
    if (!s) return;
    for (int d = 0; d < 40; d++) put_document(s, d, 2, 0); /* 80 chunks, 2 per document */
    static const char *const lang[] = {"lang"}, *const en[] = {"en"}, *const fr[] = {"fr"};
    static const char *const rank_glob[] = {"rank"}, *const three[] = {"3"};
    static const char *const draft[] = {"draft"}, *const yes[] = {"true"};
    static const char *const quoted[] = {"la\"ng"};
    struct {
        store_filter filter;
        int chunks;
        bool (*want)(int, const char *);
    } cases[] = {
        {{.source_glob = "/corpus/doc-000?.txt"}, 20, first_ten},
        {{.keys = lang, .values = en, .count = 1}, 40, odd},
        {{.keys = lang, .values = fr, .count = 1}, 0, odd},
        {{.keys = rank_glob, .values = three, .count = 1}, 8, odd_rank_3}, /* 3, 13, 23, 33 */
        /* Documents 1, 5 and 9 of the first ten have "draft": true. */
        {{.source_glob = "/corpus/doc-000*", .keys = draft, .values = yes, .count = 1},
         6,
         odd_draft_first_ten},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        collected c = {.count = 0};
        int rc = store_filter_chunks(s, &cases[i].filter, collect_chunk, &c);
        CHECK(rc == 0 && c.count == cases[i].chunks, "filter %zu: %d chunks, want %d (%s)", i,
              c.count, cases[i].chunks, rc ? err_get() : "");
        CHECK(outside(s, c.ids, c.count < 256 ? c.count : 256, cases[i].want) == 0,
              "filter %zu: every chunk passes", i);
        for (int j = 1; j < c.count && j < 256; j++)
            CHECK(c.ids[j] > c.ids[j - 1], "filter %zu: ascending ids", i);
    }
    collected all = {.count = 0};
    CHECK(store_filter_chunks(s, NULL, collect_chunk, &all) == 0 && all.count == 80,
          "no filter lists every chunk: %d", all.count);
    store_filter bad = {.keys = quoted, .values = en, .count = 1};
    collected none = {.count = 0};
    CHECK(store_filter_chunks(s, &bad, collect_chunk, &none) == EMBEDRAG_ERR_INVALID_ARGUMENT,
          "a key with '\"' is refused");

    /* BM25 under a filter: a sentence of an even document, searched among odd ones, never
     * returns its own chunk; unfiltered it comes first. */
    const char *target = sentences[(4 * 7) % sentence_count]; /* doc 4, chunk 0 */
    int64_t hits[20];
    double scores[20];
    store_chunk_info top;
    int got = bm25_checked(s, target, NULL, 20, hits, scores, &top);
    CHECK(got > 0 && !strcmp(top.document_key, "doc-0004"),
          "unfiltered, the sentence's own document comes first");
    store_filter only_odd = {.keys = lang, .values = en, .count = 1};
    got = bm25_checked(s, target, &only_odd, 20, hits, scores, &top);
    CHECK(got > 0 && outside(s, hits, got, odd) == 0,
          "filtered bm25 returns only odd documents (%d hits)", got);
    /* Words at least half of the chunks hold are left out of a query, unless it has no other:
     * "a" is in most of these sentences. */
    collected with_a = {.count = 0};
    for (int i = 0; i < all.count && i < 256; i++) {
        store_chunk_info info;
        if (store_get_chunk(s, all.ids[i], &info) == 0 &&
            (strstr(info.text, " a ") || !strncmp(info.text, "A ", 2)))
            with_a.count++;
    }
    CHECK(2 * with_a.count >= all.count, "'a' is common here (%d of %d chunks)", with_a.count,
          all.count);
    got = bm25_checked(s, "a", NULL, 20, hits, scores, &top);
    CHECK(got == 20, "a query of only common words still finds chunks: %d", got);
    got = bm25_checked(s, target, NULL, 20, hits, scores, &top);
    CHECK(got > 0 && !strcmp(top.document_key, "doc-0004"), "and its rarer words rank as before");
    CHECK(store_bm25(s, target, &bad, 20, hits, scores, &got) == EMBEDRAG_ERR_INVALID_ARGUMENT,
          "bm25 refuses a bad filter too");
    store_close(s);
}

/* Loads every vector and checks each row against what put_document stored for its chunk. */
static int load_and_check(store *s, size_t expect, const char *when)
{
    float *m = NULL;
    int64_t *ids = NULL;
    size_t n = 0;
    int rc = store_load_vectors(s, &m, &ids, &n, NULL);
    CHECK(rc == 0 && n == expect, "%s: load %zu vectors (want %zu): %s", when, n, expect,
          rc ? err_get() : "");
    int wrong = 0;
    for (size_t i = 0; !rc && i < n; i++) {
        store_chunk_info info;
        float v[DIM];
        if (store_get_chunk(s, ids[i], &info) != 0 || (i && ids[i] <= ids[i - 1])) {
            wrong++;
            continue;
        }
        vector_for(atoi(info.document_key + 4) * 100 + info.ordinal, v);
        wrong += memcmp(v, m + i * DIM, sizeof v) != 0;
    }
    CHECK(wrong == 0, "%s: %d rows differ from their chunks", when, wrong);
    free(m);
    free(ids);
    return wrong;
}

static bool copy_current(store *s)
{
    store_stats st;
    return store_get_stats(s, &st) == 0 && st.search_copy_current && st.search_copy_bytes > 0;
}

/* The search copy: written by a load, used while current, never when stale or damaged, not
 * needed where the folder is read-only, and a format-1 store (which has no generation) is
 * upgraded by a writer and read without a copy by a reader. */
static void test_search_copy(void)
{
    char path[300], copy[320];
    store *s = create_store("copy.db", path, sizeof path);
    if (!s) return;
    snprintf(copy, sizeof copy, "%s-vectors", path);
    for (int d = 0; d < 30; d++) put_document(s, d, 1 + d % 3, 0); /* 60 chunks */
    CHECK(!copy_current(s), "no copy before the first load");
    load_and_check(s, 60, "first load");
    CHECK(copy_current(s), "the first load writes the copy");
    load_and_check(s, 60, "load from the copy");

    put_document(s, 5, 4, 0); /* 3 chunks -> 4 */
    CHECK(!copy_current(s), "a change makes the copy stale");
    load_and_check(s, 61, "load after a change");
    CHECK(copy_current(s), "and the load writes it again");
    bool found = false;
    store_delete_document(s, "doc-0006", &found);
    CHECK(found && !copy_current(s), "a deletion makes it stale");
    /* A transaction rolled back leaves the generation, so the copy stays current. */
    load_and_check(s, 60, "load after a deletion");
    store_begin(s);
    put_document(s, 7, 2, 9);
    store_rollback(s);
    CHECK(copy_current(s), "a rolled-back change leaves the copy current");
    /* A batch bumps the generation once, whatever it holds: the second change of a batch must
     * not undo the first's staleness, nor a batch that ends in a deletion. */
    CHECK(store_begin(s) == 0, "begin");
    put_document(s, 40, 2, 0);
    put_document(s, 41, 1, 0);
    store_delete_document(s, "doc-0040", &found);
    bool found_too = false;
    store_delete_document(s, "doc-0041", &found_too);
    CHECK(found && found_too && store_commit(s) == 0, "a batch of four changes: %s", err_get());
    CHECK(!copy_current(s), "a batch of changes makes the copy stale");
    load_and_check(s, 60, "load after a batch");
    CHECK(copy_current(s), "and the load writes it again");

    /* A cache file: read back at its generation only, whole. */
    uint64_t generation = 0;
    CHECK(store_generation(s, &generation) == 0 && generation > 0, "a generation");
    const char payload[] = "codes of the vectors";
    CHECK(store_cache_write(s, "test-cache", generation, payload, sizeof payload), "cache write");
    void *data = NULL;
    size_t bytes = 0;
    CHECK(store_cache_read(s, "test-cache", generation, &data, &bytes) == 0 && data &&
              bytes == sizeof payload && !memcmp(data, payload, bytes),
          "cache read back");
    free(data);
    CHECK(store_cache_read(s, "test-cache", generation + 1, &data, &bytes) == 0 && !data,
          "a cache of another generation is not read");
    CHECK(store_cache_read(s, "no-such-cache", generation, &data, &bytes) == 0 && !data,
          "an absent cache is not an error");
    char cache_file[340];
    snprintf(cache_file, sizeof cache_file, "%s-test-cache", path);
    CHECK(truncate(cache_file, 30) == 0, "truncate the cache");
    CHECK(store_cache_read(s, "test-cache", generation, &data, &bytes) == 0 && !data,
          "a truncated cache is not read");
    CHECK(!store_cache_write(s, "test-cache", 0, payload, sizeof payload),
          "generation 0 (format 1) writes no cache");

    /* Damage: a truncated copy, then a copy of another width, are ignored and replaced. */
    CHECK(truncate(copy, 100) == 0, "truncate the copy");
    CHECK(!copy_current(s), "a truncated copy is not current");
    load_and_check(s, 60, "load beside a truncated copy");
    CHECK(copy_current(s), "which is replaced");
    FILE *f = fopen(copy, "r+b");
    if (f) {
        unsigned char byte = 9; /* the header's width field: 8 -> 9 */
        fseek(f, 8, SEEK_SET);
        fwrite(&byte, 1, 1, f);
        fclose(f);
    }
    CHECK(!copy_current(s), "a copy of another width is not current");
    load_and_check(s, 60, "load beside a copy of another width");

    /* A read-only folder: loads work and write nothing. */
    store_close(s);
    s = NULL;
    char ro[300], ro_db[340];
    path_in_dir(ro, sizeof ro, "ro");
    mkdir(ro, 0755);
    snprintf(ro_db, sizeof ro_db, "%s/store.db", ro);
    CHECK(store_open(ro_db, &model, false, &s) == 0, "create in ro: %s", err_get());
    for (int d = 0; d < 10 && s; d++) put_document(s, d, 2, 0);
    store_close(s);
    s = NULL;
    chmod(ro, 0555);
    if (access(ro, W_OK) == 0) {
        /* Root writes anywhere: a folder where the copy would go blocks the rename instead. */
        chmod(ro, 0755);
        char blocker[360];
        snprintf(blocker, sizeof blocker, "%s-vectors", ro_db);
        CHECK(mkdir(blocker, 0755) == 0, "a folder in the copy's place");
        CHECK(store_open(ro_db, NULL, true, &s) == 0, "open read-only: %s", err_get());
        if (s) load_and_check(s, 20, "load where the copy cannot be written");
        CHECK(s && !copy_current(s), "no copy could be written there");
        store_close(s);
        s = NULL;
        struct stat st;
        CHECK(stat(blocker, &st) == 0 && S_ISDIR(st.st_mode), "the folder is left alone");
        rmdir(blocker);
    } else {
        CHECK(store_open(ro_db, NULL, true, &s) == 0, "open read-only: %s", err_get());
        if (s) load_and_check(s, 20, "load in a read-only folder");
        CHECK(s && !copy_current(s), "no copy could be written there");
        store_close(s);
        s = NULL;
    }
    chmod(ro, 0755);

    /* Format 1: no generation. A reader loads from the database and writes no copy; a writer
     * upgrades the store to format 2. */
    char old[300];
    path_in_dir(old, sizeof old, "format1.db");
    CHECK(store_open(old, &model, false, &s) == 0, "create: %s", err_get());
    for (int d = 0; d < 10 && s; d++) put_document(s, d, 1, 0);
    store_close(s);
    s = NULL;
    sqlite3 *db = NULL;
    int sq = sqlite3_open(old, &db);
    if (sq == SQLITE_OK)
        sq = sqlite3_exec(db,
                          "UPDATE meta SET value = '1' WHERE key = 'format';"
                          "DELETE FROM meta WHERE key = 'generation'",
                          NULL, NULL, NULL);
    sqlite3_close(db);
    CHECK(sq == SQLITE_OK, "made a format-1 store");
    CHECK(store_open(old, NULL, true, &s) == 0, "a reader opens format 1: %s", err_get());
    if (s) load_and_check(s, 10, "format 1 read-only");
    CHECK(s && !copy_current(s), "format 1 has no copy");
    store_close(s);
    s = NULL;
    CHECK(store_open(old, &model, false, &s) == 0, "a writer opens format 1: %s", err_get());
    if (s) load_and_check(s, 10, "format 1 upgraded");
    CHECK(s && copy_current(s), "the upgraded store has a copy");
    store_close(s);
}

/* Whether BM25 on the text of doc-NNNN's first chunk finds one of its chunks, searching
 * through handle s. */
static bool bm25_finds(store *s, int d, int chunks, int salt)
{
    const char *text = sentences[(d * 7 + salt) % sentence_count];
    int64_t hits[20];
    double scores[20];
    int got = 0;
    if (store_bm25(s, text, NULL, 20, hits, scores, &got) != 0) return false;
    char key[64];
    snprintf(key, sizeof key, "doc-%04d", d);
    for (int i = 0; i < got; i++) {
        store_chunk_info info;
        if (store_get_chunk(s, hits[i], &info) == 0 && !strcmp(info.document_key, key)) return true;
    }
    (void)chunks;
    return false;
}

static bool run_sql(const char *file, const char *sql)
{
    sqlite3 *db = NULL;
    int sq = sqlite3_open(file, &db);
    if (sq == SQLITE_OK) sq = sqlite3_exec(db, sql, NULL, NULL, NULL);
    sqlite3_close(db);
    return sq == SQLITE_OK;
}

/* One value of a SQLite file, as an integer (-1 where it cannot be read). */
static long long sql_value(const char *file, const char *sql)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    long long v = -1;
    if (sqlite3_open(file, &db) == SQLITE_OK &&
        sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW &&
        sqlite3_column_type(st, 0) != SQLITE_NULL)
        v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    sqlite3_close(db);
    return v;
}

/* create_store with EMBEDRAG_TEXT_SHARDS set to `shards` while the store is made. */
static store *create_store_sharded(const char *name, const char *shards, char *path, size_t size)
{
    const char *set = getenv("EMBEDRAG_TEXT_SHARDS");
    char *was = set ? strdup(set) : NULL;
    setenv("EMBEDRAG_TEXT_SHARDS", shards, 1);
    store *s = create_store(name, path, size);
    if (was)
        setenv("EMBEDRAG_TEXT_SHARDS", was, 1);
    else
        unsetenv("EMBEDRAG_TEXT_SHARDS");
    free(was);
    return s;
}

/* Builds a store named `name` with its text index in `shards` files: 300 documents of 3 chunks,
 * then a tenth replaced and a tenth deleted (the same chunk ids whatever the shards). */
static store *shards_store(const char *name, const char *shards, char *path, size_t size)
{
    store *s = create_store_sharded(name, shards, path, size);
    if (!s) return NULL;
    int rc = store_begin(s);
    for (int d = 0; d < 300 && !rc; d++) rc = put_document(s, d, 3, 0);
    if (!rc) rc = store_commit(s);
    CHECK(rc == 0 && store_index_text(s) == 0, "%s: store and index 900 chunks: %s", name,
          err_get());
    rc = store_begin(s);
    for (int d = 0; d < 300 && !rc; d += 10) {
        char key[64];
        bool found = false;
        snprintf(key, sizeof key, "doc-%04d", d + 5);
        rc = put_document(s, d, 3, 7);
        if (!rc) rc = store_delete_document(s, key, &found);
    }
    if (!rc) rc = store_commit(s);
    CHECK(rc == 0, "%s: replace and delete: %s", name, err_get());
    return s;
}

/* Compares two stores' BM25 answers to the same question: the same scores rank by rank (to
 * the last bits: the shards are scored with the statistics of all, as one index), and the same
 * chunks wherever a score is not tied (ties may come in another order, and at the cut-off the
 * two may keep different chunks of the same score). */
static int bm25_differences(store *one, store *split, const char *query, const store_filter *f)
{
    int64_t a[10], b[10];
    double x[10], y[10];
    int na = -1, nb = -2;
    if (store_bm25(one, query, f, 10, a, x, &na) != 0 ||
        store_bm25(split, query, f, 10, b, y, &nb) != 0 || na != nb)
        return 1;
    int differ = 0;
    for (int i = 0; i < na; i++) {
        if (fabs(x[i] - y[i]) > 1e-12 * fmax(1.0, fabs(x[i]))) differ++;
        bool tied = (i > 0 && x[i] == x[i - 1]) || (i + 1 < na && x[i] == x[i + 1]) ||
                    (na == 10 && x[i] == x[na - 1] && i != na - 1);
        if (!tied && a[i] != b[i]) differ++;
    }
    return differ;
}

/* A text index split into three files searches as one index of all the chunks does: 300
 * questions, unfiltered and filtered, after replacements and deletions. */
static void test_text_shards(void)
{
    char one_path[300], split_path[300];
    store *one = shards_store("one.db", "1", one_path, sizeof one_path);
    store *split = shards_store("split.db", "3", split_path, sizeof split_path);
    if (!one || !split) {
        store_close(one);
        store_close(split);
        return;
    }
    CHECK(store_text_shards(one) == 1 && store_text_shards(split) == 3, "shards %d and %d",
          store_text_shards(one), store_text_shards(split));
    static const char *const lang[] = {"lang"}, *const en[] = {"en"};
    store_filter english = {.keys = lang, .values = en, .count = 1};
    int differ = 0, filtered_differ = 0, answered = 0;
    for (int q = 0; q < 300; q++) {
        const char *query = sentences[(q * 13) % sentence_count];
        differ += bm25_differences(one, split, query, NULL);
        filtered_differ += bm25_differences(one, split, query, &english);
        int64_t ids[10];
        double scores[10];
        int n = 0;
        if (store_bm25(split, query, NULL, 10, ids, scores, &n) == 0 && n > 0) answered++;
    }
    CHECK(differ == 0 && filtered_differ == 0 && answered > 250,
          "three shards against one file: %d and %d (filtered) differences; %d of 300 questions "
          "answered",
          differ, filtered_differ, answered);
    char file[400];
    bool files = true;
    for (int k = 0; k < 3; k++) {
        snprintf(file, sizeof file, "%s-text.%d", split_path, k);
        files = files && access(file, F_OK) == 0;
    }
    snprintf(file, sizeof file, "%s-text", split_path);
    store_stats st;
    CHECK(files && access(file, F_OK) != 0 && store_get_stats(split, &st) == 0 &&
              st.text_index_bytes > 0,
          "the shards' files, no single one, and their size in the stats");
    store_close(one);
    store_close(split);
    if (access("/usr/bin/sqlite3", X_OK) == 0)
        CHECK(check_text_index_consistent(split_path), "the shards' account");
}

/* Without EMBEDRAG_TEXT_SHARDS a new store gets a text file per five online cores, one to three
 * (one here on 2 cores, three on the 16-core GPU host); a value out of range is clamped. */
static void test_default_shards(void)
{
    static const int cores[] = {1, 2, 4, 5, 9, 10, 14, 15, 16, 64, 0, -3};
    static const int want[] = {1, 1, 1, 1, 1, 2, 2, 3, 3, 3, 1, 1};
    for (size_t i = 0; i < sizeof cores / sizeof cores[0]; i++)
        CHECK(store_text_shards_for(cores[i]) == want[i], "%d cores: %d shards, want %d", cores[i],
              store_text_shards_for(cores[i]), want[i]);
    static const char *const set[] = {"", "0", "12"};
    int expect[] = {store_text_shards_for(threadpool_online_cores()), 1, STORE_TEXT_SHARDS_MAX};
    for (int i = 0; i < 3; i++) {
        char name[32], path[300];
        snprintf(name, sizeof name, "default%d.db", i);
        store *s = create_store_sharded(name, set[i], path, sizeof path);
        CHECK(s && store_text_shards(s) == expect[i],
              "EMBEDRAG_TEXT_SHARDS=\"%s\": %d shards, want %d", set[i],
              s ? store_text_shards(s) : -1, expect[i]);
        store_close(s);
    }
}

/* Updates smaller than one step (what the indexer's text thread does every 8,192 chunks): the
 * index's "chunks" mark ends at the store's chunk_high, and the next update goes on from it
 * rather than building the index again (a row put into the index by hand survives it). The first
 * step of an update reads before it knows its target; it once took its open limit as the mark,
 * and every other update then started from scratch. */
static void test_text_update_marks(void)
{
    char path[512], text[560];
    path_in_dir(path, sizeof path, "marks.db");
    store *s = NULL;
    if (store_open(path, &model, false, &s) != 0) {
        CHECK(false, "open: %s", err_get());
        return;
    }
    int shards = store_text_shards(s);
    for (int round = 0; round < 3; round++) {
        int rc = store_begin(s);
        for (int d = 0; d < 50 && !rc; d++) rc = put_document(s, round * 100 + d, 3, round);
        if (!rc) rc = store_commit(s);
        CHECK(rc == 0, "round %d: store 150 chunks: %s", round, err_get());
        CHECK(store_index_text(s) == 0, "round %d: update the text index: %s", round, err_get());
        long long high = sql_value(path, "SELECT value FROM meta WHERE key = 'chunk_high'");
        for (int k = 0; k < shards; k++) {
            if (shards > 1)
                snprintf(text, sizeof text, "%s-text.%d", path, k);
            else
                snprintf(text, sizeof text, "%s-text", path);
            long long mark = sql_value(text, "SELECT value FROM text_meta WHERE key = 'chunks'");
            CHECK(high == 150 * (round + 1) && mark == high,
                  "round %d, shard %d: the index's mark %lld is the store's chunk_high %lld", round,
                  k, mark, high);
            /* A row put by hand into each shard (an id of that shard). */
            char sql[200];
            snprintf(sql, sizeof sql,
                     "INSERT INTO chunk_text (rowid, text) VALUES (%d, 'zzmarkerword')",
                     999999 - (999999 % shards) + k);
            if (round == 0)
                CHECK(run_sql(text, sql), "shard %d: a row put into the index by hand", k);
            else
                CHECK(sql_value(text, "SELECT count(*) FROM chunk_text WHERE chunk_text MATCH "
                                      "'zzmarkerword'") == 1,
                      "round %d, shard %d: the update went on from the marks (the hand-put row "
                      "is still there)",
                      round, k);
        }
    }
    store_close(s);
}

/* An update larger than one step (16,384 rows read at a time): 24,000 chunks (and one without
 * text) indexed, then all of them replaced and some documents deleted, each in one update that
 * takes several steps of log rows and of chunks; the index matches one built afresh after each. */
static void test_text_update_steps(void)
{
    char path[512];
    path_in_dir(path, sizeof path, "steps.db");
    store *s = NULL;
    if (store_open(path, &model, false, &s) != 0) {
        CHECK(false, "open: %s", err_get());
        return;
    }
    for (int round = 0; round < 2; round++) {
        int rc = store_begin(s);
        for (int d = 0; d < 6000 && !rc; d++) rc = put_document(s, d, 4, round);
        if (!rc && round == 0) {
            /* A chunk with no text (a document that brought only its vector). */
            float v[DIM];
            vector_for(7, v);
            store_chunk empty = {.text = "", .length = 0, .vector = v};
            store_document doc = {.key = "empty", .source = "empty", .content_hash = 1};
            rc = store_put_document(s, &doc, &empty, 1);
        }
        if (!rc) rc = store_commit(s);
        CHECK(rc == 0, "round %d: store 24,000 chunks: %s", round, err_get());
        if (round == 1) {
            rc = store_begin(s);
            bool found = false;
            for (int d = 0; d < 6000 && !rc; d += 3) {
                char key[64];
                snprintf(key, sizeof key, "doc-%04d", d);
                rc = store_delete_document(s, key, &found);
            }
            if (!rc) rc = store_commit(s);
            CHECK(rc == 0 && found, "delete a third of the documents: %s", err_get());
        }
        CHECK(store_index_text(s) == 0, "round %d: update the text index: %s", round, err_get());
        store_stats st;
        store_get_stats(s, &st);
        CHECK(st.chunks == (round ? 16001 : 24001), "round %d: %lld chunks", round,
              (long long)st.chunks);
        char when[32];
        snprintf(when, sizeof when, "round %d", round);
        CHECK(check_text_index_consistent(path), "%s: the text index after a many-step update",
              when);
    }
    store_close(s);
}

/* The text index in its own file (format 4): a writer's search and a reader's bring it up to
 * date first; a chunk deleted or replaced before it was indexed never reaches it, one deleted
 * after leaves it; a reader whose index another connection is updating searches it as it is and
 * never returns a deleted chunk; a writer killed before its update leaves the next search to do
 * it; an index of another store, or a damaged one, is built again (a reader is told to run a
 * writer); a store of format 3 (the index inside the store's file) is searched by readers as it
 * is and upgraded by a writer. */
static void text_index_file_checks(void)
{
    char path[300], text[320];
    path_in_dir(path, sizeof path, "arrears.db");
    snprintf(text, sizeof text, "%s-text", path);
    store *w = NULL, *r = NULL;
    CHECK(store_open(path, &model, false, &w) == 0, "create: %s", err_get());
    if (!w) return;
    for (int d = 0; d < 6; d++) put_document(w, d, 2, 0);
    CHECK(store_open(path, NULL, true, &r) == 0, "a reader: %s", err_get());
    CHECK(r && bm25_finds(r, 3, 2, 0), "a reader's search indexes the new chunks and finds them");
    CHECK(bm25_finds(w, 3, 2, 0), "so does the writer's");
    /* Added, then deleted or replaced before the index sees them; and after. */
    put_document(w, 10, 3, 0);
    bool found = false;
    CHECK(store_delete_document(w, "doc-0010", &found) == 0 && found, "delete an unindexed one");
    put_document(w, 11, 2, 0);
    put_document(w, 11, 2, 5); /* replaced before the index saw it */
    put_document(w, 2, 3, 9);  /* replaces an indexed one */
    CHECK(store_delete_document(w, "doc-0004", &found) == 0 && found, "delete an indexed one");
    CHECK(store_index_text(w) == 0, "index: %s", err_get());
    CHECK(!bm25_finds(w, 10, 3, 0) && !bm25_finds(w, 4, 2, 0), "deleted ones are not found");
    CHECK(bm25_finds(w, 11, 2, 5) && bm25_finds(w, 2, 3, 9), "replacements are found");
    bool sqlite_cli = access("/usr/bin/sqlite3", X_OK) == 0;
    if (sqlite_cli)
        CHECK(check_text_index_consistent(path),
              "the text index's account after deletes and replaces");

    /* Another connection holds the index's write lock: the reader does not wait for it. */
    put_document(w, 12, 2, 0);
    CHECK(store_delete_document(w, "doc-0005", &found) == 0 && found, "delete an indexed one");
    CHECK(store_commit(w) == 0, "nothing open");
    sqlite3 *holder = NULL;
    int sq = sqlite3_open(text, &holder);
    if (sq == SQLITE_OK) sq = sqlite3_exec(holder, "BEGIN IMMEDIATE", NULL, NULL, NULL);
    CHECK(sq == SQLITE_OK, "hold the text index's lock");
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    CHECK(r && !bm25_finds(r, 12, 2, 0), "a reader searches the index as it is");
    CHECK(r && !bm25_finds(r, 5, 2, 0), "and never returns a chunk deleted since");
    clock_gettime(CLOCK_MONOTONIC, &t1);
    CHECK(t1.tv_sec - t0.tv_sec + (t1.tv_nsec - t0.tv_nsec) * 1e-9 < 2.0,
          "without waiting for the lock (it would wait 5 s)");
    sqlite3_exec(holder, "ROLLBACK", NULL, NULL, NULL);
    sqlite3_close(holder);
    CHECK(r && bm25_finds(r, 12, 2, 0), "once free, the reader's search updates it");
    store_close(r);
    r = NULL;

    /* A writer killed before it updated the index: the next search does. */
    store_close(w);
    w = NULL;
    pid_t pid = fork();
    if (pid == 0) {
        store *s = NULL;
        if (store_open(path, &model, false, &s) != 0) _exit(3);
        for (int d = 20; d < 24; d++) put_document(s, d, 2, 0);
        _exit(0); /* no close: the index stays as a crash leaves it */
    }
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the writer that crashes: %d", status);
    CHECK(store_open(path, NULL, true, &r) == 0 && bm25_finds(r, 21, 2, 0),
          "the next reader's search indexes what the crash left");
    store_close(r);
    r = NULL;
    if (sqlite_cli)
        CHECK(check_text_index_consistent(path), "the text index's account after the crash");

    /* A text file restored from an older copy, whose deletions the store has since cleared
     * from its log: it cannot follow, and is built again. */
    char command[1600];
    snprintf(command, sizeof command, "cp '%s' '%s.old'", text, text);
    CHECK(system(command) == 0, "keep a copy of the text index");
    CHECK(store_open(path, &model, false, &w) == 0, "a writer: %s", err_get());
    CHECK(w && store_delete_document(w, "doc-0022", &found) == 0 && found, "delete one");
    store_close(w); /* updates the index and clears the log */
    w = NULL;
    snprintf(command, sizeof command, "mv '%s.old' '%s' && rm -f '%s-wal' '%s-shm'", text, text,
             text, text);
    CHECK(system(command) == 0, "restore the old copy");
    CHECK(store_open(path, NULL, true, &r) == 0 && !bm25_finds(r, 22, 2, 0) &&
              bm25_finds(r, 23, 2, 0),
          "the old copy is rebuilt: %s", err_get());
    store_close(r);
    r = NULL;
    if (sqlite_cli) CHECK(check_text_index_consistent(path), "the text index after the old copy");

    /* Another store's text index beside this one, then a damaged one. */
    char other[300];
    path_in_dir(other, sizeof other, "other.db");
    store *o = NULL;
    CHECK(store_open(other, &model, false, &o) == 0, "another store: %s", err_get());
    for (int d = 40; d < 44 && o; d++) put_document(o, d, 2, 0);
    store_close(o);
    snprintf(command, sizeof command, "cp '%s-text' '%s'", other, text);
    CHECK(system(command) == 0, "copy its text index over this one's");
    CHECK(store_open(path, NULL, true, &r) == 0 && bm25_finds(r, 21, 2, 0) &&
              !bm25_finds(r, 41, 2, 0),
          "the reader builds this store's index again");
    store_close(r);
    r = NULL;
    if (sqlite_cli) CHECK(check_text_index_consistent(path), "the rebuilt index's account");
    FILE *f = fopen(text, "r+b");
    if (f) {
        fseek(f, 0, SEEK_SET);
        fputs("this is no longer a SQLite database, not at all", f);
        fclose(f);
    }
    int64_t hits[4];
    double scores[4];
    int got = 0;
    CHECK(store_open(path, NULL, true, &r) == 0, "a reader opens the store");
    int rc = r ? store_bm25(r, "dog", NULL, 4, hits, scores, &got) : 0;
    CHECK(rc == EMBEDRAG_ERR_FORMAT && strstr(err_get(), "-text") &&
              strstr(err_get(), "run embedrag index"),
          "a reader is told the text index is damaged: %s", err_get());
    store_close(r);
    r = NULL;
    CHECK(store_open(path, &model, false, &w) == 0 && bm25_finds(w, 21, 2, 0),
          "a writer builds it again: %s", err_get());
    store_close(w);
    w = NULL;
    if (sqlite_cli) CHECK(check_text_index_consistent(path), "the repaired index's account");

    /* Format 3: the index inside the store's file, kept by triggers and a queue (its schema as
     * that format wrote it); no text file. Readers search it; a writer upgrades the store. */
    bool made =
        run_sql(path, "DROP TRIGGER chunks_gone; DROP TABLE text_log; DELETE FROM meta WHERE key "
                      "IN ('chunk_high', 'text_id'); UPDATE meta SET value = '3' WHERE key = "
                      "'format'; CREATE VIRTUAL TABLE chunk_text USING fts5 (text, content = "
                      "'chunks', content_rowid = 'id'); INSERT INTO chunk_text (rowid, text) "
                      "SELECT id, text FROM chunks; CREATE TABLE text_pending (id INTEGER "
                      "PRIMARY KEY); CREATE TRIGGER chunks_indexed AFTER INSERT ON chunks BEGIN "
                      "INSERT INTO text_pending (id) VALUES (new.id); END; CREATE TRIGGER "
                      "chunks_unindexed AFTER DELETE ON chunks BEGIN INSERT INTO chunk_text "
                      "(chunk_text, rowid, text) SELECT 'delete', old.id, old.text WHERE NOT "
                      "EXISTS (SELECT 1 FROM text_pending WHERE id = old.id); DELETE FROM "
                      "text_pending WHERE id = old.id; END;");
    CHECK(made && unlink(text) == 0, "made a format-3 store");
    CHECK(store_open(path, NULL, true, &r) == 0 && bm25_finds(r, 21, 2, 0),
          "a reader searches format 3's index: %s", err_get());
    CHECK(access(text, F_OK) != 0, "and makes no text file for it");
    store_close(r);
    CHECK(store_open(path, &model, false, &w) == 0, "a writer upgrades format 3: %s", err_get());
    if (w) {
        put_document(w, 30, 2, 0);
        CHECK(store_delete_document(w, "doc-0021", &found) == 0 && found, "delete after upgrade");
        CHECK(bm25_finds(w, 30, 2, 0) && !bm25_finds(w, 21, 2, 0) && bm25_finds(w, 23, 2, 0),
              "BM25 after the upgrade");
    }
    store_close(w);
    CHECK(run_sql(path, "SELECT count(*) FROM text_log") &&
              !run_sql(path, "SELECT count(*) FROM chunk_text"),
          "the upgraded store keeps no index of its own");
    if (sqlite_cli)
        CHECK(check_text_index_consistent(path), "the text index's account after the upgrade");
}

/* The checks above handle "<store>-text" itself (holding its lock, copying, damaging it): run on
 * a store whose text index is one file, whatever EMBEDRAG_TEXT_SHARDS says for the others (each
 * shard is such a file, with the same code). */
static void test_text_index_file(void)
{
    const char *set = getenv("EMBEDRAG_TEXT_SHARDS");
    char *was = set ? strdup(set) : NULL;
    setenv("EMBEDRAG_TEXT_SHARDS", "1", 1);
    text_index_file_checks();
    if (was)
        setenv("EMBEDRAG_TEXT_SHARDS", was, 1);
    else
        unsetenv("EMBEDRAG_TEXT_SHARDS");
    free(was);
}

/* Sets the first chunk of a document to zeros behind the store's back (no new generation): a
 * load that reads SQLite's vectors then sees zeros, one made from the copy and the tracked
 * changes does not. Only this white-box trick tells the two apart. */
static void tamper(const char *path, const char *key)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    int sq = sqlite3_open(path, &db);
    if (sq == SQLITE_OK)
        sq = sqlite3_prepare_v2(db,
                                "UPDATE chunks SET vector = zeroblob(?1) WHERE id = (SELECT "
                                "min(c.id) FROM chunks c JOIN documents d ON d.id = c.document "
                                "WHERE d.key = ?2)",
                                -1, &st, NULL);
    if (sq == SQLITE_OK) {
        sqlite3_bind_int(st, 1, DIM * (int)sizeof(float));
        sqlite3_bind_text(st, 2, key, -1, SQLITE_STATIC);
        sq = sqlite3_step(st);
    }
    CHECK(sq == SQLITE_DONE && sqlite3_changes(db) == 1, "tamper with %s", key);
    sqlite3_finalize(st);
    sqlite3_close(db);
}

/* A writer that tracks its changes makes the next search copy from the last one and them:
 * exactly the rows SQLite holds (every vector checked against its chunk) through batches of
 * adds, replacements and deletions, a rolled-back batch and changes outside a batch, without
 * reading SQLite's vectors; and where it cannot be exact (a chunk added in the run is deleted
 * again) it reads SQLite instead. */
static void test_tracked_copy(void)
{
    char path[300];
    store *s = create_store("tracked.db", path, sizeof path);
    if (!s) return;
    CHECK(store_track_vectors(s, (size_t)64 << 20) == 0, "track an empty store");
    CHECK(store_begin(s) == 0, "begin");
    for (int d = 0; d < 20; d++) put_document(s, d, 1 + d % 3, 0); /* 39 chunks */
    CHECK(store_commit(s) == 0, "commit");
    tamper(path, "doc-0000");
    load_and_check(s, 39, "tracked from an empty store");
    CHECK(copy_current(s), "the tracked load writes the copy");

    /* Replace doc 0 (the tampered chunk leaves), 1 (2 -> 3 chunks), delete doc 2 (3), add 30 (2).
     */
    bool found = false;
    CHECK(store_begin(s) == 0, "begin");
    put_document(s, 0, 1, 0);
    put_document(s, 1, 3, 0);
    store_delete_document(s, "doc-0002", &found);
    put_document(s, 30, 2, 0);
    CHECK(found && store_commit(s) == 0, "commit: %s", err_get());
    tamper(path, "doc-0005");
    load_and_check(s, 39, "tracked after replacements and a deletion");

    /* A batch rolled back leaves no trace; changes outside a batch are tracked too. */
    CHECK(store_begin(s) == 0, "begin");
    put_document(s, 31, 3, 0);
    store_delete_document(s, "doc-0004", &found);
    store_rollback(s);
    put_document(s, 5, 1, 0); /* the tampered chunk leaves: 3 -> 1 */
    put_document(s, 32, 3, 0);
    store_delete_document(s, "doc-0030", &found);
    tamper(path, "doc-0007");
    load_and_check(s, 38, "tracked after a rollback and single changes");
    put_document(s, 7, 2, 0); /* untampered again */

    /* A document added in the run and replaced again: not exact, so SQLite is read. */
    CHECK(store_begin(s) == 0, "begin");
    put_document(s, 40, 1, 0);
    put_document(s, 40, 2, 0);
    CHECK(store_commit(s) == 0, "commit");
    load_and_check(s, 40, "a load after tracking stopped");
    CHECK(copy_current(s), "writes the copy");

    /* A reader that has read a chunk still sees what is committed after it (a statement left
     * on its row would hold the reader's snapshot, and the writer's checkpoints, back). */
    store *r = NULL;
    CHECK(store_open(path, NULL, true, &r) == 0, "a reader: %s", err_get());
    store_chunk_info info;
    store_stats before, after;
    int64_t id = 1;
    while (r && id < 1000 && store_get_chunk(r, id, &info) != 0) id++;
    CHECK(id < 1000 && store_get_stats(r, &before) == 0, "the reader reads a chunk");
    err_clear();
    put_document(s, 41, 3, 0);
    CHECK(r && store_get_stats(r, &after) == 0 && after.chunks == before.chunks + 3,
          "and then sees a later commit (%lld chunks, want %lld)", (long long)after.chunks,
          (long long)before.chunks + 3);
    store_close(r);
    store_close(s);
}

int main(void)
{
    if (load_sentences() != 0) {
        CHECK(false, "cannot read ../shared/data/stsb-en-dev.csv");
        return check_finish("test_store");
    }
    snprintf(dir, sizeof dir, "/tmp/test_store.XXXXXX");
    if (!mkdtemp(dir)) {
        CHECK(false, "mkdtemp");
        return check_finish("test_store");
    }
    test_round_trip();
    test_identity_and_files();
    test_batches();
    test_search_copy();
    test_tracked_copy();
    test_filters();
    test_killed_writers();
    test_out_of_space();
    test_text_index_file();
    test_text_update_steps();
    test_text_update_marks();
    test_text_shards();
    test_default_shards();
    char command[600];
    snprintf(command, sizeof command, "rm -rf '%s'", dir);
    if (system(command) != 0) fprintf(stderr, "could not remove %s\n", dir);
    for (int i = 0; i < sentence_count; i++) free(sentences[i]);
    return check_finish("test_store");
}
