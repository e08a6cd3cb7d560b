/* Tests of the shared helpers in src/util: whole-file reads (missing, empty, oversized and
 * unreadable files), path joining, the JSON helpers' parsing, typed getters and messages, and the
 * thread pool (every task once per run, per-thread scratch never shared, bulk scheduling mode
 * followed by the workers), and the follower thread (called every N changes, on after a failed
 * call, a last call for the rest, stopped without one). Runs under ThreadSanitizer too. */
#include "check.h"

#include "util/error.h"
#include "util/file.h"
#include "util/follower.h"
#include "util/json.h"
#include "util/threadpool.h"

#include "embedrag.h"

#include <cjson/cJSON.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
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

/* Parses `text`, expecting failure with a message that holds `needle`. */
static void expect_parse_error(const char *text, const char *needle)
{
    cJSON *root = (cJSON *)1;
    int rc = json_parse(text, strlen(text), "test.json", &root);
    CHECK(rc == EMBEDRAG_ERR_FORMAT && root == NULL && strstr(err_get(), "test.json") &&
              strstr(err_get(), needle),
          "'%s': %d, message \"%s\" should hold \"%s\"", text, rc, err_get(), needle);
}

static void test_json_parse_points_at_the_error(void)
{
    cJSON *root = NULL;
    const char *text = "{\"a\": [1, 2]}  \n\t";
    CHECK(json_parse(text, strlen(text), "test.json", &root) == 0 && cJSON_IsObject(root),
          "valid JSON with trailing whitespace: %s", err_get());
    cJSON_Delete(root);

    /* The bad token on line 3: the column counts characters, so the two-byte e-acute is one. */
    expect_parse_error("{\n  \"a\": 1,\n  \"\xC3\xA9\": x\n}",
                       "not valid JSON at line 3, column 8");
    expect_parse_error("{\"a\": 1} {}", "extra text after the JSON value at line 1, column 10 "
                                        "(byte 9 of 11)");
    expect_parse_error("", "not valid JSON");
    expect_parse_error("{\"a\": ", "not valid JSON");

    /* Only `length` bytes count, whatever follows them. */
    text = "{\"a\": 1}garbage";
    CHECK(json_parse(text, 8, "test.json", &root) == 0, "a prefix of a buffer: %s", err_get());
    cJSON_Delete(root);
}

static void test_json_getters_name_file_and_field(void)
{
    const char *text = "{\"n\": 12, \"big\": 3e9, \"half\": 2.5, \"s\": \"x\", \"t\": true, "
                       "\"null\": null, \"inner\": {\"flag\": 1}}";
    cJSON *root = NULL;
    if (json_parse(text, strlen(text), "f.json", &root) != 0) {
        CHECK(0, "parse: %s", err_get());
        return;
    }
    int n = -1;
    CHECK(json_get_int(root, "f.json", NULL, "n", true, 1, 100, &n) == 0 && n == 12, "int: %d", n);
    n = 7;
    CHECK(json_get_int(root, "f.json", NULL, "absent", false, 1, 100, &n) == 0 && n == 7,
          "an absent optional int leaves the value");
    CHECK(json_get_int(root, "f.json", NULL, "null", false, 1, 100, &n) == 0 && n == 7,
          "a null optional int leaves the value");
    CHECK(json_get_int(root, "f.json", NULL, "absent", true, 1, 100, &n) == EMBEDRAG_ERR_FORMAT &&
              strstr(err_get(), "f.json: required field absent is missing"),
          "required: %s", err_get());
    CHECK(json_get_int(root, "f.json", NULL, "n", true, 1, 10, &n) == EMBEDRAG_ERR_FORMAT &&
              strstr(err_get(), "f.json: n is 12, expected an integer from 1 to 10"),
          "range: %s", err_get());
    CHECK(json_get_int(root, "f.json", NULL, "big", true, 0, 2147483647, &n) == EMBEDRAG_ERR_FORMAT,
          "beyond int: %s", err_get());
    CHECK(json_get_int(root, "f.json", NULL, "half", true, 0, 10, &n) == EMBEDRAG_ERR_FORMAT &&
              strstr(err_get(), "half is 2.5"),
          "fraction: %s", err_get());

    bool flag = false;
    CHECK(json_get_bool(root, "f.json", NULL, "t", &flag) == 0 && flag, "bool");
    const cJSON *inner = cJSON_GetObjectItemCaseSensitive(root, "inner");
    CHECK(json_get_bool(inner, "f.json", "inner", "flag", &flag) == EMBEDRAG_ERR_FORMAT &&
              strstr(err_get(), "f.json: inner.flag is 1, expected true or false"),
          "bool message names the parent: %s", err_get());

    const char *string = NULL;
    CHECK(json_get_string(root, "f.json", NULL, "s", &string) == 0 && string &&
              strcmp(string, "x") == 0,
          "string");
    CHECK(json_get_string(root, "f.json", NULL, "null", &string) == 0 && string == NULL,
          "a null string is NULL");
    CHECK(json_get_string(root, "f.json", NULL, "n", &string) == EMBEDRAG_ERR_FORMAT &&
              strstr(err_get(), "n is 12, expected a string"),
          "string message: %s", err_get());
    cJSON_Delete(root);
}

static void test_json_integer_and_value_text(void)
{
    const char *text = "[0, -3, 9007199254740992, 9007199254740994, 1.5, \"1\"]";
    cJSON *root = NULL;
    if (json_parse(text, strlen(text), "a.json", &root) != 0) {
        CHECK(0, "parse: %s", err_get());
        return;
    }
    int64_t v = -1;
    CHECK(json_integer(cJSON_GetArrayItem(root, 0), 0, 10, &v) && v == 0, "zero");
    CHECK(!json_integer(cJSON_GetArrayItem(root, 1), 0, 10, &v), "below min");
    CHECK(json_integer(cJSON_GetArrayItem(root, 1), -5, 10, &v) && v == -3, "negative");
    CHECK(json_integer(cJSON_GetArrayItem(root, 2), 0, INT64_MAX, &v) &&
              v == JSON_MAX_EXACT_INTEGER,
          "2^53 is still exact");
    CHECK(!json_integer(cJSON_GetArrayItem(root, 3), 0, INT64_MAX, &v), "past 2^53");
    CHECK(!json_integer(cJSON_GetArrayItem(root, 4), 0, 10, &v), "fraction");
    CHECK(!json_integer(cJSON_GetArrayItem(root, 5), 0, 10, &v), "string");
    CHECK(!json_integer(NULL, 0, 10, &v), "no item");

    char buffer[16];
    CHECK(strcmp(json_value_text(cJSON_GetArrayItem(root, 5), buffer, sizeof buffer), "\"1\"") == 0,
          "string value: %s", buffer);
    json_value_text(root, buffer, sizeof buffer);
    CHECK(strlen(buffer) == sizeof buffer - 1 && strncmp(buffer, "[0,-3,", 6) == 0,
          "a long value is cut to the buffer: %s", buffer);
    cJSON_Delete(root);
}

static void test_json_read_file(void)
{
    char *path = temp_file("absent.json");
    cJSON *root = (cJSON *)1;
    bool missing = false;
    CHECK(json_read_file(path, 100, &missing, &root) == 0 && missing && root == NULL,
          "a missing optional file");
    CHECK(json_read_file(path, 100, NULL, &root) == EMBEDRAG_ERR_IO && root == NULL,
          "a missing required file: %s", err_get());
    free(path);

    path = temp_file("bad.json");
    write_file(path, "{\n\"a\": tru}", 12);
    CHECK(json_read_file(path, 100, &missing, &root) == EMBEDRAG_ERR_FORMAT && !missing &&
              root == NULL && strstr(err_get(), "bad.json: not valid JSON at line 2"),
          "a bad file names itself and the line: %s", err_get());
    free(path);
}

/* ---- the thread pool ---- */

#define POOL_MAX_TASKS 96
#define POOL_THREADS 4

typedef struct pool_check {
    atomic_int runs_of[POOL_MAX_TASKS];   /* how often each task ran in this run */
    atomic_int busy[POOL_THREADS];        /* tasks running on each thread index right now */
    atomic_int bad_thread, shared_thread; /* thread index out of range; two tasks on one index */
    atomic_int wrong_policy;              /* tasks that ran under a policy other than `want` */
    int want_policy;                      /* -1: do not check */
} pool_check;

static void pool_task(void *ctx, int task, int thread)
{
    pool_check *c = ctx;
    if (thread < 0 || thread >= POOL_THREADS) {
        atomic_fetch_add(&c->bad_thread, 1);
        return;
    }
    if (atomic_fetch_add(&c->busy[thread], 1) != 0) atomic_fetch_add(&c->shared_thread, 1);
    /* Uneven tasks, so that runs end while a worker is still inside the previous one. */
    volatile unsigned spin = 0;
    for (int i = 0; i < (task % 7) * 50; i++) spin = spin + (unsigned)i;
    (void)spin;
    atomic_fetch_add(&c->runs_of[task], 1);
    if (c->want_policy >= 0 && sched_getscheduler(0) != c->want_policy)
        atomic_fetch_add(&c->wrong_policy, 1);
    atomic_fetch_sub(&c->busy[thread], 1);
}

/* Thousands of runs of 2 to 96 tasks on a pool of more threads than this machine may have cores:
 * each task runs exactly once per run, every index is in range, and no two tasks ever share a
 * thread index at once (the per-thread scratch the forward pass relies on). */
static void test_threadpool_runs_each_task_once(void)
{
    threadpool *p = NULL;
    CHECK(threadpool_create(POOL_THREADS, &p) == 0 && p, "threadpool_create: %s",
          embedrag_last_error());
    if (!p) return;
    CHECK(threadpool_threads(p) == POOL_THREADS, "threads %d", threadpool_threads(p));
    static pool_check c;
    int wrong = 0, first_wrong_run = -1;
    for (int run = 0; run < 4000; run++) {
        int n = 2 + (int)(check_random() % (POOL_MAX_TASKS - 1));
        for (int t = 0; t < POOL_MAX_TASKS; t++) atomic_store(&c.runs_of[t], 0);
        c.want_policy = -1;
        threadpool_run(p, n, pool_task, &c);
        for (int t = 0; t < POOL_MAX_TASKS; t++) {
            int got = atomic_load(&c.runs_of[t]), want = t < n ? 1 : 0;
            if (got != want) {
                wrong++;
                if (first_wrong_run < 0) first_wrong_run = run;
            }
        }
    }
    CHECK(wrong == 0,
          "%d task counts wrong (first in run %d): a task ran twice, never, or in "
          "another run",
          wrong, first_wrong_run);
    CHECK(atomic_load(&c.bad_thread) == 0, "%d tasks got a thread index out of range",
          atomic_load(&c.bad_thread));
    CHECK(atomic_load(&c.shared_thread) == 0, "%d times two tasks ran on one thread index",
          atomic_load(&c.shared_thread));
    threadpool_destroy(p);
}

/* threadpool_bulk_enter makes the calling thread SCHED_BATCH until leave, nested calls change
 * nothing, and the workers run a bulk caller's tasks as SCHED_BATCH and a normal caller's as
 * SCHED_OTHER. Where the policy cannot be changed here (a sandbox refusing sched_setattr), enter
 * reports no change and the tasks must all stay SCHED_OTHER. */
static void test_threadpool_bulk_mode(void)
{
    int before = sched_getscheduler(0);
    CHECK(before == SCHED_OTHER, "the test thread starts as policy %d", before);
    threadpool_sched outer, inner;
    threadpool_bulk_enter(&outer);
    bool changed = outer.changed != 0;
    if (!changed)
        printf("test_util: note: this system refused SCHED_BATCH; checking that nothing changed\n");
    int in_bulk = changed ? SCHED_BATCH : SCHED_OTHER;
    CHECK(sched_getscheduler(0) == in_bulk, "after enter: policy %d, want %d",
          sched_getscheduler(0), in_bulk);
    threadpool_bulk_enter(&inner);
    CHECK(!inner.changed, "a nested enter changed the policy again");

    threadpool *p = NULL;
    CHECK(threadpool_create(POOL_THREADS, &p) == 0 && p, "threadpool_create: %s",
          embedrag_last_error());
    if (!p) return;
    static pool_check c;
    for (int round = 0; round < 3; round++) {
        /* Bulk caller, then a normal one, then bulk again: the workers follow each time. */
        for (int phase = 0; phase < 2; phase++) {
            bool bulk_phase = phase == 0;
            if (!bulk_phase) threadpool_bulk_leave(&outer);
            c.want_policy = bulk_phase ? in_bulk : SCHED_OTHER;
            atomic_store(&c.wrong_policy, 0);
            for (int run = 0; run < 200; run++) {
                for (int t = 0; t < POOL_MAX_TASKS; t++) atomic_store(&c.runs_of[t], 0);
                threadpool_run(p, 64, pool_task, &c);
            }
            CHECK(atomic_load(&c.wrong_policy) == 0,
                  "round %d, %s caller: %d tasks ran under the wrong policy", round,
                  bulk_phase ? "bulk" : "normal", atomic_load(&c.wrong_policy));
            if (!bulk_phase) {
                threadpool_bulk_enter(&outer);
                CHECK(sched_getscheduler(0) == in_bulk, "re-enter: policy %d",
                      sched_getscheduler(0));
            }
        }
    }
    threadpool_bulk_leave(&inner); /* nested: nothing to undo */
    CHECK(sched_getscheduler(0) == in_bulk, "a nested leave undid the outer enter");
    threadpool_bulk_leave(&outer);
    CHECK(sched_getscheduler(0) == SCHED_OTHER, "after leave: policy %d", sched_getscheduler(0));
    threadpool_destroy(p);
}

/* What a follower's run sees: the changes noted when it was called, and which call fails. */
typedef struct follow_log {
    pthread_mutex_t lock;
    int calls;
    long saw[8];   /* the follower's `seen` at each call */
    int fail_call; /* this call (1-based) fails */
    follower *f;
} follow_log;

static int follow_run(void *ctx)
{
    follow_log *log = ctx;
    pthread_mutex_lock(&log->lock);
    int call = ++log->calls;
    pthread_mutex_unlock(&log->lock);
    pthread_mutex_lock(&log->f->lock);
    long seen = log->f->seen;
    pthread_mutex_unlock(&log->f->lock);
    if (call <= 8) log->saw[call - 1] = seen;
    usleep(5000); /* a call that takes time, asleep: its wall time counts, not its CPU time */
    if (call == log->fail_call)
        return err_set(EMBEDRAG_ERR_IO, "update %d failed on purpose (disk full)", call);
    return 0;
}

/* Waits (at most 10 s) until the follower has made `calls` calls and is idle. */
static bool follow_wait(follow_log *log, int calls)
{
    for (int i = 0; i < 10000; i++) {
        pthread_mutex_lock(&log->lock);
        int n = log->calls;
        pthread_mutex_unlock(&log->lock);
        if (n >= calls) {
            follower_settle(log->f, false, false); /* the call in progress ends */
            return true;
        }
        usleep(1000);
    }
    return false;
}

static int follow_calls(follow_log *log)
{
    pthread_mutex_lock(&log->lock);
    int n = log->calls;
    pthread_mutex_unlock(&log->lock);
    return n;
}

/* A follower calls every 100 changes; its second call fails, and it goes on: the third comes at
 * 300 changes (the indexer's text thread once stopped at its first failure, leaving the whole
 * rest of a run to the writer's last update). Fewer than 100 more changes wait for the last
 * call, which takes them; a stopped follower makes no last call. */
static void test_follower(void)
{
    follower f;
    follow_log log = {.fail_call = 2, .f = &f};
    pthread_mutex_init(&log.lock, NULL);
    CHECK(follower_start(&f, 100, follow_run, &log), "the follower's thread starts");
    follower_note(&f, 99);
    usleep(20000);
    CHECK(follow_calls(&log) == 0, "no call before 100 changes: %d", follow_calls(&log));
    follower_note(&f, 100);
    CHECK(follow_wait(&log, 1), "a call at 100 changes");
    follower_note(&f, 250);
    CHECK(follow_wait(&log, 2), "a call at 250 changes (which fails)");
    follower_note(&f, 300);
    usleep(20000);
    CHECK(follow_calls(&log) == 2, "300 is 50 past the last call: no call yet (%d calls)",
          follow_calls(&log));
    follower_note(&f, 360);
    CHECK(follow_wait(&log, 3), "the follower goes on after a failed call: a call at 360 changes");
    follower_note(&f, 400);
    follower_settle(&f, true, false);
    follower_end(&f);
    CHECK(follow_calls(&log) == 4, "a last call for the 40 changes left: %d calls in all",
          follow_calls(&log));
    CHECK(log.saw[0] == 100 && log.saw[1] == 250 && log.saw[2] == 360 && log.saw[3] == 400,
          "the calls saw %ld, %ld, %ld, %ld changes", log.saw[0], log.saw[1], log.saw[2],
          log.saw[3]);
    CHECK(f.failures == 1 && strstr(f.failure, "update 2 failed on purpose"),
          "one failure, its message kept: %ld, \"%s\"", f.failures, f.failure);
    CHECK(f.seconds >= 0.018 && f.cpu_seconds < 0.5 * f.seconds && !f.on,
          "4 calls of 5 ms asleep: %.4f s, %.4f s of CPU; thread ended", f.seconds, f.cpu_seconds);

    /* Stopped: no last call, whatever changed since. */
    follow_log quiet = {.fail_call = 0, .f = &f};
    pthread_mutex_init(&quiet.lock, NULL);
    CHECK(follower_start(&f, 100, follow_run, &quiet), "a second follower starts");
    follower_note(&f, 50);
    follower_settle(&f, false, true);
    follower_end(&f);
    CHECK(follow_calls(&quiet) == 0 && f.failures == 0, "stopped: %d calls, %ld failures",
          follow_calls(&quiet), f.failures);
    pthread_mutex_destroy(&log.lock);
    pthread_mutex_destroy(&quiet.lock);
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
    test_json_parse_points_at_the_error();
    test_json_getters_name_file_and_field();
    test_json_integer_and_value_text();
    test_json_read_file();
    test_threadpool_runs_each_task_once();
    test_threadpool_bulk_mode();
    test_follower();

    static const char *const created[] = {"bytes.bin", "empty.txt", "bad.json"};
    for (size_t i = 0; i < sizeof created / sizeof created[0]; i++) {
        char *path = temp_file(created[i]);
        unlink(path);
        free(path);
    }
    rmdir(temp_root);
    return check_finish("test_util");
}
