/* The engine through the public API only, with threads: a query sent while a bulk call runs is
 * answered before the bulk call ends, with the vector it has alone; concurrent calls with
 * different options share lanes and still get exactly their own vectors; one call's bad text
 * fails only that call; statuses let a call go on past bad texts; the per-model error record,
 * status texts, devices and lanes. These run on the CPU backend (the model opened CPU-only),
 * whose vectors are bit-exact whatever the batch; where a GPU backend opens, routing between the
 * two is checked against the CPU's vectors with the GPU's bar. Uses all-MiniLM-L6-v2
 * (scripts/fetch-models.sh). */
#include "embedrag.h"
#include "engine/engine.h"

#include "check.h"

#include <math.h>
#include <stdlib.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

/* Sanitizer builds run several times slower: smaller jobs keep the test short there while the
 * bulk call still lasts far longer than a query. */
#ifdef CHECK_SLOW_BUILD
#define BULK_TEXTS 400
#define CONCURRENT_CALLS 4
#else
#define BULK_TEXTS 3000
#define CONCURRENT_CALLS 16
#endif
#define MAX_SENTENCES 3000
/* The tokenizer-thread model's window (EMBEDRAG_WINDOW_TEXTS), below the 300 texts of that test
 * so that they span windows too. */
#define WINDOW_TEXTS 256

static char *sentences[MAX_SENTENCES];
static int sentence_count;
static int dim;

static double now_seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* The first sentence of each STS-B dev pair (real text of 5 to 40 tokens). */
static int load_sentences(void)
{
    sentence_count = check_stsb_sentences(sentences, MAX_SENTENCES);
    return sentence_count > 100 ? 0 : -1;
}

/* A GPU's fp16 vectors against the CPU's fp32 (the CUDA backend's issue). */
#define GPU_MIN_COSINE 0.9995

static embedrag_model *open_model(embedrag_device device)
{
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/models/all-MiniLM-L6-v2", check_source_dir());
    embedrag_model_params p = embedrag_model_default_params();
    p.threads = 2;
    p.device = device;
    embedrag_model *m = NULL;
    int rc = embedrag_model_open(dir, &p, &m);
    CHECK(rc == 0, "open %s: %s (run scripts/fetch-models.sh)", dir, embedrag_last_error());
    return m;
}

/* ---- a query during a bulk call ---- */

typedef struct bulk_call {
    embedrag_model *m;
    float *out;
    int rc;
    atomic_int done;
    double seconds;
} bulk_call;

static void *bulk_thread(void *arg)
{
    bulk_call *b = arg;
    const char **texts = malloc(BULK_TEXTS * sizeof *texts);
    for (int i = 0; i < BULK_TEXTS; i++) texts[i] = sentences[i % sentence_count];
    double t = now_seconds();
    b->rc = embedrag_embed(b->m, texts, NULL, BULK_TEXTS, NULL, b->out);
    b->seconds = now_seconds() - t;
    atomic_store(&b->done, 1);
    free(texts);
    return NULL;
}

static void test_query_is_served_during_a_bulk_call(embedrag_model *m)
{
    const char *query = "how do I reset my password";
    float alone[384], during[384];
    CHECK(embedrag_embed(m, &query, NULL, 1, NULL, alone) == 0, "query alone: %s",
          embedrag_last_error());
    bulk_call bulk = {.m = m, .out = malloc((size_t)BULK_TEXTS * dim * sizeof(float))};
    pthread_t thread;
    pthread_create(&thread, NULL, bulk_thread, &bulk);
    /* Let the bulk call tokenize its first window and start its batches. */
    struct timespec pause = {0, 300 * 1000 * 1000};
    nanosleep(&pause, NULL);
    bool bulk_running = !atomic_load(&bulk.done);
    double t = now_seconds();
    int rc = embedrag_embed(m, &query, NULL, 1, NULL, during);
    double query_seconds = now_seconds() - t;
    bool bulk_still_running = !atomic_load(&bulk.done);
    pthread_join(thread, NULL);
    CHECK(rc == 0 && bulk.rc == 0, "calls failed: %s", embedrag_last_error());
    CHECK(bulk_running, "the bulk call (%d texts) ended within 300 ms: the test proves nothing",
          BULK_TEXTS);
    CHECK(bulk_still_running && query_seconds < bulk.seconds / 4,
          "the query took %.3f s of the bulk call's %.3f s: it waited for the bulk call",
          query_seconds, bulk.seconds);
    CHECK(memcmp(alone, during, sizeof alone) == 0,
          "the query's vector during the bulk call differs from the one alone");
    printf("query during a %d-text bulk call: %.1f ms (bulk call %.2f s)\n", BULK_TEXTS,
           query_seconds * 1e3, bulk.seconds);
    /* The bulk call's vectors are the ones each text has alone. */
    int wrong = 0;
    for (int i = 0; i < BULK_TEXTS; i += 97) {
        const char *text = sentences[i % sentence_count];
        float one[384];
        embedrag_embed(m, &text, NULL, 1, NULL, one);
        wrong += memcmp(one, bulk.out + (size_t)i * dim, sizeof one) != 0;
    }
    CHECK(wrong == 0, "%d sampled bulk vectors differ from the text alone", wrong);
    free(bulk.out);
}

/* ---- concurrent calls with different options ---- */

typedef struct call {
    embedrag_model *m;
    embedrag_embed_params params;
    const char *texts[8];
    int count;
    float *expected, *got;
    int rc;
    bool bad; /* holds an invalid text: must fail, alone */
} call;

static void *call_thread(void *arg)
{
    call *c = arg;
    for (int round = 0; round < 3 && c->rc == 0; round++) {
        c->rc = embedrag_embed(c->m, c->texts, NULL, (size_t)c->count, &c->params, c->got);
        if (c->bad) {
            c->rc = c->rc == EMBEDRAG_ERR_INVALID_UTF8 && embedrag_last_error_index() == 1 ? 0 : -1;
            if (c->rc) break;
        } else if (c->rc == 0 &&
                   memcmp(c->got, c->expected, (size_t)c->count * 384 * sizeof(float)) != 0) {
            c->rc = -2;
        }
    }
    return NULL;
}

static void test_concurrent_calls_get_their_own_vectors(embedrag_model *m)
{
    call calls[CONCURRENT_CALLS];
    for (int i = 0; i < CONCURRENT_CALLS; i++) {
        call *c = &calls[i];
        memset(c, 0, sizeof *c);
        c->m = m;
        c->params = embedrag_embed_default_params();
        c->params.normalize = i % 2 == 0;
        c->params.dimensions = i % 3 == 0 ? 64 : 0;
        c->params.prompt = i % 4 == 1 ? "query: " : NULL;
        c->params.lane = i % 5 == 4 ? EMBEDRAG_LANE_BULK : EMBEDRAG_LANE_AUTO;
        c->count = 1 + i % 8;
        for (int t = 0; t < c->count; t++)
            c->texts[t] = sentences[(i * 31 + t * 7) % sentence_count];
        c->bad = i % 6 == 5 && c->count > 1;
        if (c->bad) c->texts[1] = "broken \xff text";
        c->expected = calloc((size_t)c->count * 384, sizeof(float));
        c->got = calloc((size_t)c->count * 384, sizeof(float));
        if (!c->bad)
            CHECK(embedrag_embed(m, c->texts, NULL, (size_t)c->count, &c->params, c->expected) == 0,
                  "call %d alone: %s", i, embedrag_last_error());
    }
    pthread_t threads[CONCURRENT_CALLS];
    for (int i = 0; i < CONCURRENT_CALLS; i++)
        pthread_create(&threads[i], NULL, call_thread, &calls[i]);
    for (int i = 0; i < CONCURRENT_CALLS; i++) pthread_join(threads[i], NULL);
    for (int i = 0; i < CONCURRENT_CALLS; i++) {
        CHECK(calls[i].rc == 0, "call %d (%d texts, normalize %d, dimensions %d%s): %s", i,
              calls[i].count, calls[i].params.normalize, calls[i].params.dimensions,
              calls[i].bad ? ", one bad text" : "",
              calls[i].rc == -2 ? "vectors differ from the call alone" : "failed");
        free(calls[i].expected);
        free(calls[i].got);
    }
}

/* ---- statuses, errors, devices, lanes ---- */

static void test_statuses_go_on_past_bad_texts(embedrag_model *m)
{
    const char *texts[4] = {"first good text", "bad \xc3\x28 text", "second good text", NULL};
    int statuses[4] = {-99, -99, -99, -99};
    float out[4 * 384], alone[384];
    embedrag_embed_params p = embedrag_embed_default_params();
    p.statuses = statuses;
    int rc = embedrag_embed(m, texts, NULL, 4, &p, out);
    CHECK(rc == 0, "a call with statuses returns 0: %d %s", rc, embedrag_last_error());
    CHECK(statuses[0] == 0 && statuses[1] == EMBEDRAG_ERR_INVALID_UTF8 && statuses[2] == 0 &&
              statuses[3] == EMBEDRAG_ERR_INVALID_ARGUMENT,
          "statuses %d %d %d %d", statuses[0], statuses[1], statuses[2], statuses[3]);
    CHECK(isnan(out[384]) && isnan(out[2 * 384 - 1]) && isnan(out[3 * 384]),
          "bad texts' rows are NaN");
    CHECK(embedrag_last_error_index() == 1 && strstr(embedrag_last_error(), "byte offset 4"),
          "the first bad text is described: %ld %s", embedrag_last_error_index(),
          embedrag_last_error());
    for (int i = 0; i < 3; i += 2) {
        embedrag_embed(m, &texts[i], NULL, 1, NULL, alone);
        CHECK(memcmp(alone, out + i * 384, sizeof alone) == 0, "text %d differs from alone", i);
    }
}

static void test_errors_statuses_devices_and_lanes(embedrag_model *m)
{
    /* Every status has a name; unknown ones say so. */
    static const int codes[] = {EMBEDRAG_OK,
                                EMBEDRAG_ERR_INVALID_ARGUMENT,
                                EMBEDRAG_ERR_IO,
                                EMBEDRAG_ERR_FORMAT,
                                EMBEDRAG_ERR_UNSUPPORTED,
                                EMBEDRAG_ERR_NO_MEMORY,
                                EMBEDRAG_ERR_INVALID_UTF8,
                                EMBEDRAG_ERR_TOO_LONG,
                                EMBEDRAG_ERR_BUSY,
                                EMBEDRAG_ERR_NOT_FOUND,
                                EMBEDRAG_ERR_DEVICE,
                                EMBEDRAG_ERR_DATABASE,
                                EMBEDRAG_ERR_MODEL_MISMATCH};
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++)
        for (size_t j = 0; j < i; j++)
            CHECK(strcmp(embedrag_status_text(codes[i]), embedrag_status_text(codes[j])) != 0,
                  "statuses %d and %d share the text '%s'", codes[i], codes[j],
                  embedrag_status_text(codes[i]));
    CHECK(!strcmp(embedrag_status_text(-1000), "unknown status") &&
              !strcmp(embedrag_status_text(EMBEDRAG_ERR_INVALID_UTF8), "invalid UTF-8"),
          "status texts");

    /* A failure on another thread is the model's latest error; the alias agrees. */
    char message[256];
    const char *bad = "x \xff";
    call c = {.m = m, .params = embedrag_embed_default_params(), .count = 2, .bad = true};
    c.texts[0] = "fine";
    c.texts[1] = bad;
    c.got = calloc(2 * 384, sizeof(float));
    pthread_t thread;
    pthread_create(&thread, NULL, call_thread, &c);
    pthread_join(thread, NULL);
    free(c.got);
    CHECK(embedrag_model_last_error(m, message, sizeof message) == EMBEDRAG_ERR_INVALID_UTF8 &&
              strstr(message, "text 1"),
          "the model records the other thread's failure: '%s'", message);
    CHECK(embedrag_model_last_error(m, NULL, 0) == EMBEDRAG_ERR_INVALID_UTF8, "size 0 is allowed");
    embedrag_embed(m, &bad, NULL, 1, NULL, (float[384]){0});
    CHECK(embedrag_last_error_index() == 0 && embedrag_last_error_text() == 0,
          "embedrag_last_error_text is the index's old name");

    /* Devices: the CPU is backend 0; a GPU call without a GPU says why. */
    embedrag_model_info info;
    embedrag_backend_info cpu;
    CHECK(embedrag_model_get_info(m, &info) == 0 && info.backend_count >= 1 &&
              embedrag_model_get_backend(m, 0, &cpu) == 0 && cpu.kind == EMBEDRAG_DEVICE_CPU &&
              !strcmp(cpu.name, "cpu") && cpu.batch_tokens > 0,
          "backend facts");
    CHECK(embedrag_model_get_backend(m, info.backend_count, &cpu) == EMBEDRAG_ERR_INVALID_ARGUMENT,
          "no backend past the count");
    const char *text = "a text";
    float v[384], w[384];
    embedrag_embed_params p = embedrag_embed_default_params();
    p.device = EMBEDRAG_DEVICE_GPU;
    CHECK(info.backend_count == 1 &&
              embedrag_embed(m, &text, NULL, 1, &p, v) == EMBEDRAG_ERR_UNSUPPORTED &&
              strstr(embedrag_last_error(), "GPU") && embedrag_model_gpu_unavailable(m),
          "a GPU call on a CPU-only model: %s", embedrag_last_error());
    p.device = (embedrag_device)7;
    CHECK(embedrag_embed(m, &text, NULL, 1, &p, v) == EMBEDRAG_ERR_INVALID_ARGUMENT,
          "unknown device");
    p.device = EMBEDRAG_DEVICE_CPU;
    p.lane = (embedrag_lane)9;
    CHECK(embedrag_embed(m, &text, NULL, 1, &p, v) == EMBEDRAG_ERR_INVALID_ARGUMENT,
          "unknown lane");

    /* Every lane and batch size gives the same bits; a budget past the backend's limit is cut to
     * it, and one larger than the default grows the lane. */
    p = embedrag_embed_default_params();
    CHECK(embedrag_embed(m, &text, NULL, 1, &p, v) == 0, "auto lane");
    embedrag_lane lanes[2] = {EMBEDRAG_LANE_LATENCY, EMBEDRAG_LANE_BULK};
    int budgets[3] = {0, 8192, 1 << 30};
    int32_t text_ids[16];
    size_t text_tokens = 0;
    CHECK(embedrag_tokenize(m, text, strlen(text), NULL, text_ids, 16, &text_tokens) == 0 &&
              text_tokens > 2,
          "tokenize: %s", embedrag_last_error());
    for (int l = 0; l < 2; l++)
        for (int b = 0; b < 3; b++) {
            p.lane = lanes[l];
            p.batch_tokens = budgets[b];
            embedrag_backend_work before[2], after[2];
            for (int k = 0; k < 2; k++) embedrag_model_get_backend_work(m, 0, lanes[k], &before[k]);
            CHECK(embedrag_embed(m, &text, NULL, 1, &p, w) == 0 && memcmp(v, w, sizeof v) == 0,
                  "lane %d, batch_tokens %d: %s", lanes[l], budgets[b], embedrag_last_error());
            /* The work is counted on the lane that ran it, and only there. */
            for (int k = 0; k < 2; k++) {
                embedrag_model_get_backend_work(m, 0, lanes[k], &after[k]);
                uint64_t grew = k == l;
                CHECK(after[k].batches - before[k].batches == grew &&
                          after[k].texts - before[k].texts == grew &&
                          after[k].tokens - before[k].tokens == grew * text_tokens &&
                          (after[k].seconds > before[k].seconds) == (bool)grew,
                      "lane %d's work after a call on lane %d: %llu batches, %llu texts, %llu "
                      "tokens more",
                      lanes[k], lanes[l],
                      (unsigned long long)(after[k].batches - before[k].batches),
                      (unsigned long long)(after[k].texts - before[k].texts),
                      (unsigned long long)(after[k].tokens - before[k].tokens));
            }
        }
    embedrag_backend_work both, latency, bulk;
    CHECK(embedrag_model_get_backend_work(m, 0, EMBEDRAG_LANE_AUTO, &both) == 0 &&
              embedrag_model_get_backend_work(m, 0, EMBEDRAG_LANE_LATENCY, &latency) == 0 &&
              embedrag_model_get_backend_work(m, 0, EMBEDRAG_LANE_BULK, &bulk) == 0 &&
              both.texts == latency.texts + bulk.texts &&
              both.tokens == latency.tokens + bulk.tokens,
          "AUTO sums the lanes");
    CHECK(embedrag_model_get_backend_work(m, info.backend_count, EMBEDRAG_LANE_AUTO, &both) ==
                  EMBEDRAG_ERR_INVALID_ARGUMENT &&
              embedrag_model_get_backend_work(m, 0, (embedrag_lane)9, &both) ==
                  EMBEDRAG_ERR_INVALID_ARGUMENT,
          "work of no backend or no lane");

    /* Pre-tokenized ids are checked once, in the engine. */
    int32_t ids[3] = {101, 30522, 102};
    int offsets[2] = {0, 3};
    CHECK(engine_embed_tokens(m, ids, offsets, 1, NULL, NULL, v) == EMBEDRAG_ERR_INVALID_ARGUMENT &&
              strstr(embedrag_last_error(), "30522"),
          "an id past the vocabulary: %s", embedrag_last_error());
    int empty[2] = {0, 0};
    CHECK(engine_embed_tokens(m, ids, empty, 1, NULL, NULL, v) == EMBEDRAG_ERR_INVALID_ARGUMENT,
          "an empty sequence");
}

static double cosine(const float *a, const float *b, int n)
{
    double ab = 0, aa = 0, bb = 0;
    for (int i = 0; i < n; i++) {
        ab += (double)a[i] * b[i];
        aa += (double)a[i] * a[i];
        bb += (double)b[i] * b[i];
    }
    return ab / sqrt(aa * bb);
}

/* A model opened on every device: where a GPU backend opens, calls routed to it (explicitly,
 * and by the router) agree with the CPU's within the GPU's bar; where none does, the model says
 * why and runs on the CPU. */
static void test_routing_between_devices(embedrag_model *cpu_model)
{
    embedrag_model *m = open_model(EMBEDRAG_DEVICE_AUTO);
    if (!m) return;
    embedrag_model_info info;
    embedrag_model_get_info(m, &info);
    if (info.backend_count == 1) {
        CHECK(embedrag_model_gpu_unavailable(m) != NULL, "no GPU and no reason given");
        printf("skipped GPU routing: %s\n", embedrag_model_gpu_unavailable(m));
        embedrag_model_close(m);
        return;
    }
    enum { TEXTS = 200 };
    const char *texts[TEXTS];
    for (int i = 0; i < TEXTS; i++) texts[i] = sentences[i % sentence_count];
    float *reference = malloc((size_t)TEXTS * dim * sizeof(float));
    float *got = malloc((size_t)TEXTS * dim * sizeof(float));
    embedrag_embed(cpu_model, texts, NULL, TEXTS, NULL, reference);
    embedrag_device devices[2] = {EMBEDRAG_DEVICE_GPU, EMBEDRAG_DEVICE_AUTO};
    for (int d = 0; d < 2; d++) {
        embedrag_embed_params p = embedrag_embed_default_params();
        p.device = devices[d];
        int rc = embedrag_embed(m, texts, NULL, TEXTS, &p, got);
        double worst = 1.0;
        for (int i = 0; rc == 0 && i < TEXTS; i++)
            worst = fmin(worst, cosine(got + (size_t)i * dim, reference + (size_t)i * dim, dim));
        CHECK(rc == 0 && worst >= GPU_MIN_COSINE, "device %d: rc %d, worst cosine %.7f (%s)",
              devices[d], rc, worst, embedrag_last_error());
        printf("device %d against the CPU: worst cosine %.7f\n", devices[d], worst);
    }
    free(reference);
    free(got);
    embedrag_model_close(m);
}

/* ---- several GPUs, failures and memory limits (fake GPUs: BACKEND_FAKE_GPU) ---- */

/* Opens the model with EMBEDRAG_TEST_FAKE_GPUS=spec: CPU backends of one thread that pose as
 * GPUs (the router prefers them), may fail mid-run and may refuse large reservations. Their
 * vectors are the CPU's bits, so every check below is exact. A fault count includes the 5 test
 * batches each backend runs at open (the engine's calibration). */
#define CALIBRATION_BATCHES 5
static embedrag_model *open_with_fake_gpus(const char *format, int fail_after,
                                           embedrag_device device)
{
    char spec[64];
    snprintf(spec, sizeof spec, format, fail_after < 0 ? -1 : CALIBRATION_BATCHES + fail_after);
    setenv("EMBEDRAG_TEST_FAKE_GPUS", spec, 1);
    embedrag_model *m = open_model(device);
    unsetenv("EMBEDRAG_TEST_FAKE_GPUS");
    return m;
}

/* Embeds `n` texts on m with these params and compares every row bit for bit with reference;
 * returns the call's status. */
static int embed_and_compare(embedrag_model *m, const char *const *texts, int n,
                             const embedrag_embed_params *p, const float *reference,
                             const char *what)
{
    float *got = malloc((size_t)n * dim * sizeof(float));
    for (size_t i = 0; i < (size_t)n * dim; i++) got[i] = NAN;
    int rc = embedrag_embed(m, texts, NULL, (size_t)n, p, got);
    int differ = 0;
    for (int i = 0; rc == 0 && i < n; i++)
        differ += memcmp(got + (size_t)i * dim, reference + (size_t)i * dim,
                         (size_t)dim * sizeof(float)) != 0;
    CHECK(rc != 0 || differ == 0, "%s: %d of %d vectors differ from the CPU's", what, differ, n);
    free(got);
    return rc;
}

static int failed_backends(embedrag_model *m)
{
    embedrag_model_info info;
    embedrag_model_get_info(m, &info);
    int failed = 0;
    for (int i = 0; i < info.backend_count; i++) {
        embedrag_backend_info b;
        embedrag_model_get_backend(m, i, &b);
        failed += b.failure != NULL;
    }
    return failed;
}

/* Texts and tokens all of a model's backends have finished, and those of one backend. */
static void work_done(embedrag_model *m, int only, uint64_t *texts, uint64_t *tokens)
{
    embedrag_model_info info;
    embedrag_model_get_info(m, &info);
    *texts = *tokens = 0;
    for (int i = 0; i < info.backend_count; i++) {
        embedrag_backend_work w;
        if (only >= 0 && i != only) continue;
        embedrag_model_get_backend_work(m, i, EMBEDRAG_LANE_AUTO, &w);
        *texts += w.texts;
        *tokens += w.tokens;
    }
}

static void test_fake_gpus(embedrag_model *cpu_model)
{
    enum { TEXTS = 120 };
    const char *texts[TEXTS];
    for (int i = 0; i < TEXTS; i++) texts[i] = sentences[(i * 7) % sentence_count];
    float *reference = malloc((size_t)TEXTS * dim * sizeof(float));
    CHECK(embedrag_embed(cpu_model, texts, NULL, TEXTS, NULL, reference) == 0, "reference: %s",
          embedrag_last_error());
    embedrag_embed_params bulk = embedrag_embed_default_params();
    bulk.batch_tokens = 256; /* many batches, so that the work is shared and faults hit mid-call */
    bulk.lane = EMBEDRAG_LANE_BULK;

    /* Two GPUs share a bulk call; the vectors are the CPU's. */
    embedrag_model *m = open_with_fake_gpus("2:%d", -1, EMBEDRAG_DEVICE_AUTO);
    size_t call_tokens = 0;
    for (int i = 0; i < TEXTS; i++) {
        size_t count = 0;
        embedrag_tokenize(cpu_model, texts[i], strlen(texts[i]), NULL, NULL, 0, &count);
        call_tokens += count;
    }
    if (m) {
        embedrag_model_info info;
        embedrag_model_get_info(m, &info);
        CHECK(info.backend_count == 3, "two fake GPUs and the CPU: %d backends",
              info.backend_count);
        uint64_t texts0, tokens0, texts1, tokens1, cpu0, cpu1, unused;
        work_done(m, -1, &texts0, &tokens0);
        work_done(m, 0, &cpu0, &unused);
        CHECK(embed_and_compare(m, texts, TEXTS, &bulk, reference, "two GPUs") == 0, "%s",
              embedrag_last_error());
        /* The routing, as counted: every text once, all on the (faster) GPUs. */
        work_done(m, -1, &texts1, &tokens1);
        work_done(m, 0, &cpu1, &unused);
        CHECK(texts1 - texts0 == TEXTS && tokens1 - tokens0 == call_tokens && cpu1 == cpu0,
              "work counted: %llu texts and %llu tokens (want %d and %zu), %llu on the CPU",
              (unsigned long long)(texts1 - texts0), (unsigned long long)(tokens1 - tokens0), TEXTS,
              call_tokens, (unsigned long long)(cpu1 - cpu0));
        embedrag_embed_params query = embedrag_embed_default_params();
        CHECK(embed_and_compare(m, texts, 1, &query, reference, "a query") == 0, "%s",
              embedrag_last_error());
        double cpu_s = 0, gpu_s = 0;
        CHECK(embedrag_model_estimate_seconds(m, 0, 1000, 128, &cpu_s) == 0 &&
                  embedrag_model_estimate_seconds(m, 1, 1000, 128, &gpu_s) == 0 && cpu_s > 0 &&
                  gpu_s > 0 && gpu_s < cpu_s,
              "estimates: cpu %g s, fake GPU %g s (it claims to be faster)", cpu_s, gpu_s);
        CHECK(embedrag_model_estimate_seconds(m, 3, 1, 16, &cpu_s) != 0, "no backend 3");
        CHECK(failed_backends(m) == 0, "no backend failed");
        embedrag_model_close(m);
    }

    /* GPU 0 fails after 2 batches of the call: its work is redone on GPU 1; nothing is lost or
     * wrong, the failure is reported, and later calls still run (on GPU 1). */
    m = open_with_fake_gpus("2:%d", 2, EMBEDRAG_DEVICE_AUTO);
    if (m) {
        uint64_t texts0, tokens0, texts1, tokens1;
        work_done(m, -1, &texts0, &tokens0);
        CHECK(embed_and_compare(m, texts, TEXTS, &bulk, reference, "a GPU fails mid-call") == 0,
              "%s", embedrag_last_error());
        /* The failed batches are not counted, their redone work is: each text once. */
        work_done(m, -1, &texts1, &tokens1);
        CHECK(texts1 - texts0 == TEXTS && tokens1 - tokens0 == call_tokens,
              "work counted with a failure: %llu texts and %llu tokens (want %d and %zu)",
              (unsigned long long)(texts1 - texts0), (unsigned long long)(tokens1 - tokens0), TEXTS,
              call_tokens);
        embedrag_backend_info b;
        embedrag_model_get_backend(m, 1, &b);
        CHECK(b.failure != NULL && strstr(b.failure, "fake-gpu:0"),
              "GPU 0's failure is reported: %s", b.failure ? b.failure : "(none)");
        CHECK(failed_backends(m) == 1, "only GPU 0 failed");
        embedrag_embed_params gpu_only = bulk;
        gpu_only.device = EMBEDRAG_DEVICE_GPU;
        CHECK(embed_and_compare(m, texts, TEXTS, &gpu_only, reference, "after the failure") == 0,
              "%s", embedrag_last_error());
        embedrag_model_close(m);
    }

    /* The only GPU fails mid-call: the call finishes on the CPU; a call pinned to the GPU then
     * fails with a message naming it, and unpinned calls keep working. */
    m = open_with_fake_gpus("1:%d", 3, EMBEDRAG_DEVICE_AUTO);
    if (m) {
        CHECK(embed_and_compare(m, texts, TEXTS, &bulk, reference, "the GPU fails") == 0, "%s",
              embedrag_last_error());
        CHECK(failed_backends(m) == 1, "the GPU is marked failed");
        embedrag_embed_params gpu_only = bulk;
        gpu_only.device = EMBEDRAG_DEVICE_GPU;
        int rc = embed_and_compare(m, texts, 4, &gpu_only, reference, "pinned to a failed GPU");
        CHECK(rc == EMBEDRAG_ERR_DEVICE && strstr(embedrag_last_error(), "fake-gpu:0"),
              "pinned to the failed GPU: rc %d, %s", rc, embedrag_last_error());
        embedrag_embed_params query = embedrag_embed_default_params();
        CHECK(embed_and_compare(m, texts, TEXTS, &query, reference, "after the failure") == 0, "%s",
              embedrag_last_error());
        embedrag_model_close(m);
    }

    /* A GPU that fails at open (its test batch) is not used; the model still opens. */
    m = open_with_fake_gpus("1:0", 0, EMBEDRAG_DEVICE_AUTO);
    CHECK(m != NULL, "a GPU failing its test batch does not stop the open");
    if (m) {
        CHECK(failed_backends(m) == 1, "the GPU that failed at open is marked");
        CHECK(embed_and_compare(m, texts, TEXTS, &bulk, reference, "GPU failed at open") == 0, "%s",
              embedrag_last_error());
        embedrag_model_close(m);
    }

    /* A GPU whose memory holds 700 tokens a batch (less than its lanes prefer): a request for
     * 4,096-token batches is split to what fits, never refused. */
    m = open_with_fake_gpus("1:%d:700", -1, EMBEDRAG_DEVICE_GPU);
    if (m) {
        embedrag_embed_params big = bulk;
        big.batch_tokens = 4096;
        big.device = EMBEDRAG_DEVICE_GPU;
        CHECK(embed_and_compare(m, texts, TEXTS, &big, reference, "batches beyond memory") == 0,
              "%s", embedrag_last_error());
        embedrag_model_close(m);
    }

    /* EMBEDRAG_DEVICE stands in for a model's automatic choice. */
    setenv("EMBEDRAG_DEVICE", "cpu", 1);
    m = open_with_fake_gpus("2:%d", -1, EMBEDRAG_DEVICE_AUTO);
    if (m) {
        embedrag_model_info info;
        embedrag_model_get_info(m, &info);
        CHECK(info.backend_count == 1, "EMBEDRAG_DEVICE=cpu: %d backends", info.backend_count);
        embedrag_model_close(m);
    }
    setenv("EMBEDRAG_DEVICE", "tpu", 1);
    embedrag_model *none = NULL;
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/models/all-MiniLM-L6-v2", check_source_dir());
    int rc = embedrag_model_open(dir, NULL, &none);
    CHECK(rc == EMBEDRAG_ERR_INVALID_ARGUMENT && none == NULL &&
              strstr(embedrag_last_error(), "EMBEDRAG_DEVICE"),
          "EMBEDRAG_DEVICE=tpu: rc %d, %s", rc, embedrag_last_error());
    unsetenv("EMBEDRAG_DEVICE");
    free(reference);
}

/* Tokenizing on several threads (EMBEDRAG_TOKENIZER_THREADS; a GPU model's default): the same
 * vectors, statuses and first error as on the calling thread. */
static void test_tokenizer_threads(embedrag_model *cpu_model)
{
    enum { TEXTS = 300 };
    const char *texts[TEXTS];
    for (int i = 0; i < TEXTS; i++) texts[i] = sentences[(i * 11) % sentence_count];
    texts[77] = "bad \xc3\x28 text";
    texts[140] = NULL;
    texts[250] = "also \xff bad";
    int expected[TEXTS], statuses[TEXTS], again[TEXTS];
    float *reference = malloc((size_t)TEXTS * dim * sizeof(float));
    float *got = malloc((size_t)TEXTS * dim * sizeof(float));
    embedrag_embed_params p = embedrag_embed_default_params();
    p.statuses = expected;
    CHECK(embedrag_embed(cpu_model, texts, NULL, TEXTS, &p, reference) == 0, "reference");
    setenv("EMBEDRAG_TOKENIZER_THREADS", "3", 1);
    char window[16];
    snprintf(window, sizeof window, "%d", WINDOW_TEXTS);
    setenv("EMBEDRAG_WINDOW_TEXTS", window, 1);
    embedrag_model *m = open_model(EMBEDRAG_DEVICE_CPU);
    unsetenv("EMBEDRAG_TOKENIZER_THREADS");
    unsetenv("EMBEDRAG_WINDOW_TEXTS");
    if (!m) goto done;
    p.statuses = statuses;
    int rc = embedrag_embed(m, texts, NULL, TEXTS, &p, got);
    CHECK(rc == 0 && memcmp(statuses, expected, sizeof statuses) == 0,
          "statuses as on one thread (rc %d)", rc);
    CHECK(embedrag_last_error_index() == 77 && strstr(embedrag_last_error(), "text 77"),
          "the first bad text is reported: %ld %s", embedrag_last_error_index(),
          embedrag_last_error());
    int differ = 0;
    for (int i = 0; i < TEXTS; i++)
        if (!expected[i])
            differ += memcmp(got + (size_t)i * dim, reference + (size_t)i * dim,
                             (size_t)dim * sizeof(float)) != 0;
    CHECK(differ == 0, "%d vectors differ with tokenizer threads", differ);
    rc = embedrag_embed(m, texts, NULL, TEXTS, NULL, got);
    CHECK(rc == EMBEDRAG_ERR_INVALID_UTF8 && embedrag_last_error_index() == 77,
          "without statuses the first bad text fails the call: rc %d, index %ld", rc,
          embedrag_last_error_index());
    p.statuses = again;
    for (int round = 0; round < 3; round++) {
        rc = embedrag_embed(m, texts, NULL, TEXTS, &p, got);
        CHECK(rc == 0 && memcmp(again, expected, sizeof again) == 0, "round %d", round);
    }

    /* Over two windows the second is tokenized while the first runs: the same again, with bad
     * texts in the second window (one of them its last text). The model has windows of
     * WINDOW_TEXTS texts, not the default 4,096 (three calls of 4,156 texts took most of this
     * test's ten minutes under the sanitizers). */
    enum { MANY = WINDOW_TEXTS + 60 };
    char(*short_texts)[32] = malloc(MANY * sizeof *short_texts);
    const char **many = malloc(MANY * sizeof *many);
    int *many_expected = malloc(MANY * sizeof *many_expected);
    int *many_statuses = malloc(MANY * sizeof *many_statuses);
    float *many_reference = malloc((size_t)MANY * dim * sizeof(float));
    float *many_got = malloc((size_t)MANY * dim * sizeof(float));
    for (int i = 0; i < MANY; i++) {
        snprintf(short_texts[i], sizeof short_texts[i], "text number %d of many", i);
        many[i] = short_texts[i];
    }
    int bad1 = WINDOW_TEXTS + 17, bad2 = MANY - 1;
    many[bad1] = "bad \xc3\x28 text";
    many[bad2] = NULL;
    p.statuses = many_expected;
    CHECK(embedrag_embed(cpu_model, many, NULL, MANY, &p, many_reference) == 0, "reference");
    p.statuses = many_statuses;
    rc = embedrag_embed(m, many, NULL, MANY, &p, many_got);
    CHECK(rc == 0 && memcmp(many_statuses, many_expected, MANY * sizeof(int)) == 0 &&
              many_statuses[bad1] == EMBEDRAG_ERR_INVALID_UTF8 &&
              many_statuses[bad2] == EMBEDRAG_ERR_INVALID_ARGUMENT,
          "statuses over windows (rc %d)", rc);
    CHECK(embedrag_last_error_index() == bad1, "the first bad text over windows: %ld",
          embedrag_last_error_index());
    differ = 0;
    for (int i = 0; i < MANY; i++)
        if (!many_expected[i])
            differ += memcmp(many_got + (size_t)i * dim, many_reference + (size_t)i * dim,
                             (size_t)dim * sizeof(float)) != 0;
    CHECK(differ == 0, "%d vectors differ over windows", differ);
    rc = embedrag_embed(m, many, NULL, MANY, NULL, many_got);
    CHECK(rc == EMBEDRAG_ERR_INVALID_UTF8 && embedrag_last_error_index() == bad1,
          "over windows without statuses: rc %d, index %ld", rc, embedrag_last_error_index());
    free(short_texts);
    free(many);
    free(many_expected);
    free(many_statuses);
    free(many_reference);
    free(many_got);
    embedrag_model_close(m);
done:
    free(reference);
    free(got);
}

/* A batch holds at most 16,384 sequences (the lane stages pooled rows for that many): 20,000
 * two- and three-token sequences in one call (below the window of embedrag_embed) with a budget
 * of 65,536 tokens run as two batches, and every row is its text's vector alone. */
static void test_many_tiny_sequences(embedrag_model *m)
{
    enum { TINY = 20000 };
    int32_t *ids = malloc(3 * TINY * sizeof *ids);
    int *offsets = malloc((TINY + 1) * sizeof *offsets);
    float *got = malloc((size_t)TINY * dim * sizeof(float));
    float alone[2][384];
    int32_t kind_ids[2][3];
    size_t kind_len[2];
    const char *kinds[2] = {"", "a"};
    for (int k = 0; k < 2; k++) {
        embedrag_embed(m, &kinds[k], NULL, 1, NULL, alone[k]);
        embedrag_tokenize(m, kinds[k], strlen(kinds[k]), NULL, kind_ids[k], 3, &kind_len[k]);
    }
    offsets[0] = 0;
    for (int i = 0; i < TINY; i++) {
        memcpy(ids + offsets[i], kind_ids[i % 2], kind_len[i % 2] * sizeof *ids);
        offsets[i + 1] = offsets[i] + (int)kind_len[i % 2];
    }
    embedrag_embed_params p = embedrag_embed_default_params();
    p.batch_tokens = 65536;
    p.lane = EMBEDRAG_LANE_BULK;
    int rc = engine_embed_tokens(m, ids, offsets, TINY, NULL, &p, got);
    int differ = 0;
    for (int i = 0; rc == 0 && i < TINY; i++)
        differ += memcmp(got + (size_t)i * dim, alone[i % 2], (size_t)dim * sizeof(float)) != 0;
    CHECK(kind_len[0] == 2 && kind_len[1] == 3, "token counts %zu %zu", kind_len[0], kind_len[1]);
    CHECK(rc == 0 && differ == 0, "20,000 tiny sequences: rc %d, %d rows differ from alone (%s)",
          rc, differ, embedrag_last_error());
    free(ids);
    free(offsets);
    free(got);
}

/* Runs one part and prints how long it took (the sanitizer suite's longest test is this one). */
static void timed(const char *name, void (*part)(embedrag_model *), embedrag_model *m)
{
    double t = now_seconds();
    part(m);
    printf("%s: %.1f s\n", name, now_seconds() - t);
}

int main(void)
{
    if (load_sentences() != 0) {
        CHECK(false, "cannot read ../shared/data/stsb-en-dev.csv");
        return check_finish("test_engine");
    }
    embedrag_model *m = open_model(EMBEDRAG_DEVICE_CPU);
    if (m) {
        dim = embedrag_embed_dimension(m, NULL);
        timed("a query during a bulk call", test_query_is_served_during_a_bulk_call, m);
        timed("concurrent calls", test_concurrent_calls_get_their_own_vectors, m);
        timed("statuses", test_statuses_go_on_past_bad_texts, m);
        timed("errors, devices and lanes", test_errors_statuses_devices_and_lanes, m);
        timed("routing between devices", test_routing_between_devices, m);
        timed("stand-in GPUs", test_fake_gpus, m);
        timed("tokenizer threads", test_tokenizer_threads, m);
        timed("many tiny sequences", test_many_tiny_sequences, m);
        embedrag_model_close(m);
    }
    for (int i = 0; i < sentence_count; i++) free(sentences[i]);
    return check_finish("test_engine");
}
