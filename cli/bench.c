/* `embedrag bench`: single-query latency and batch throughput on the CPU, with tokenization,
 * model and end-to-end time reported apart, the machine's fp32 FMA peak measured in the same run,
 * and peak RSS. Texts of exact token counts are built from real sentences (STS-B). */
#include "cli.h"

#include "engine/engine.h"

#include <cjson/cJSON.h>
#include <getopt.h>
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef EMBEDRAG_BENCH_DATA
#define EMBEDRAG_BENCH_DATA "../shared/data/stsb-en-dev.csv"
#endif

/* Texts per length: enough for the largest batch. */
#define BENCH_TEXTS 1000
/* Each throughput point repeats until it has run this long (after one warm-up call). */
#define BENCH_MIN_SECONDS 1.0
#define QUERY_RUNS 300
#define QUERY_WARMUP 30

static const char bench_usage[] =
    "usage: embedrag bench [options]\n"
    "\n"
    "Measures a 16-token query's latency (p50/p99) and tokens/s at batch 1, 2, 10, 50, 100 and\n"
    "1000 for 50- and 128-token texts, tokenization apart, beside the measured fp32 FMA peak.\n"
    "On a GPU (--device gpu, or auto when one opens) also 16-token and mixed 32-256-token\n"
    "texts, the GPU's own time from CUDA events and its fraction of the GPU's dense peak, and\n"
    "every cell on the CPU too: the speedup per cell and the smallest batch the GPU wins.\n"
    "\n"
    "With --concurrent, also embeds 20,000 50-token texts on one thread, alone and then while\n"
    "another thread sends a 16-token query every 10 ms, and reports the queries' latency and\n"
    "the bulk job's slowdown.\n"
    "\n"
    "With --search N, times dense search over N synthetic vectors instead (see\n"
    "embedrag bench --search 1 --help).\n"
    "\n"
    "options:\n" CLI_MODEL_OPTIONS_HELP
    "                     (bf16: fractions of peak stay of the fp32 peak)\n"
    "  --data FILE        sentences to build texts from (default: " EMBEDRAG_BENCH_DATA ")\n"
    "  --dump-texts DIR   also write the texts used (q16.txt, t50.txt, t128.txt, mixed.txt)\n"
    "  --quick            fewer repetitions and no batch 1000 (a smoke run)\n"
    "  --query-only       measure only the single-query latency\n"
    "  --concurrent       also measure queries during a bulk job (see above)\n"
    "  --concurrent-texts N  texts of that bulk job (default 20000; implies --concurrent)\n"
    "  --query-gap-ms MS  pause between its queries (default 10)\n"
    "  --seconds S        time each throughput point at least this long (default 1; --quick 0.2)\n"
    "  --json             print JSON instead of a table\n"
    "  -h, --help         this help\n";

#define now_seconds cli_seconds

/* ---- fp32 FMA peak: independent register-only FMA chains, on every thread at once ---- */

#define PEAK_ITERATIONS 20000000L
/* FLOPs of one fma_loop_avx512 run (an AVX2 run does half as many). */
/* Peak measurements taken at the start and again at the end of a run; the best counts. */
#define PEAK_TRIES 3
#define PEAK_FLOPS_PER_THREAD (2.0 * 16.0 * 12.0 * (double)PEAK_ITERATIONS)

/* Twelve independent accumulators in named variables (an array would live on the stack across
 * the timer calls); the empty asm keeps each FMA inside the timed loop without adding work. */
#define FMA_STEP(fma, x)                                                                           \
    do {                                                                                           \
        x = fma(x, a, b);                                                                          \
        __asm__ volatile("" : "+v"(x));                                                            \
    } while (0)
#define FMA_TWELVE(fma)                                                                            \
    do {                                                                                           \
        FMA_STEP(fma, c0);                                                                         \
        FMA_STEP(fma, c1);                                                                         \
        FMA_STEP(fma, c2);                                                                         \
        FMA_STEP(fma, c3);                                                                         \
        FMA_STEP(fma, c4);                                                                         \
        FMA_STEP(fma, c5);                                                                         \
        FMA_STEP(fma, c6);                                                                         \
        FMA_STEP(fma, c7);                                                                         \
        FMA_STEP(fma, c8);                                                                         \
        FMA_STEP(fma, c9);                                                                         \
        FMA_STEP(fma, c10);                                                                        \
        FMA_STEP(fma, c11);                                                                        \
    } while (0)

__attribute__((target("avx512f"))) static double fma_loop_avx512(void)
{
    __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
    __m512 c0 = b, c1 = b, c2 = b, c3 = b, c4 = b, c5 = b, c6 = b, c7 = b, c8 = b, c9 = b, c10 = b,
           c11 = b;
    double t = now_seconds();
    for (long it = 0; it < PEAK_ITERATIONS; it++) FMA_TWELVE(_mm512_fmadd_ps);
    t = now_seconds() - t;
    __m512 sum = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3)),
                               _mm512_add_ps(_mm512_add_ps(c4, c5), _mm512_add_ps(c6, c7)));
    sum = _mm512_add_ps(sum, _mm512_add_ps(_mm512_add_ps(c8, c9), _mm512_add_ps(c10, c11)));
    if (_mm512_reduce_add_ps(sum) == 12345.0f) fputs("", stderr); /* uses the results */
    return 2.0 * 16.0 * 12.0 * (double)PEAK_ITERATIONS / t;
}

__attribute__((target("avx2,fma"))) static double fma_loop_avx2(void)
{
    __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
    __m256 c0 = b, c1 = b, c2 = b, c3 = b, c4 = b, c5 = b, c6 = b, c7 = b, c8 = b, c9 = b, c10 = b,
           c11 = b;
    double t = now_seconds();
    for (long it = 0; it < PEAK_ITERATIONS; it++) FMA_TWELVE(_mm256_fmadd_ps);
    t = now_seconds() - t;
    __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)),
                               _mm256_add_ps(_mm256_add_ps(c4, c5), _mm256_add_ps(c6, c7)));
    sum = _mm256_add_ps(sum, _mm256_add_ps(_mm256_add_ps(c8, c9), _mm256_add_ps(c10, c11)));
    float lanes[8], total = 0;
    _mm256_storeu_ps(lanes, sum);
    for (int l = 0; l < 8; l++) total += lanes[l];
    if (total == 12345.0f) fputs("", stderr);
    return 2.0 * 8.0 * 12.0 * (double)PEAK_ITERATIONS / t;
}

static void *peak_thread(void *arg)
{
    double *out = arg;
    *out = __builtin_cpu_supports("avx512f") ? fma_loop_avx512()
           : __builtin_cpu_supports("fma")   ? fma_loop_avx2()
                                             : 0.0;
    return NULL;
}

/* FLOP/s of `threads` threads running the FMA loop together: total FLOPs over the wall time from
 * the first start to the last finish (summing per-thread rates would overstate a machine whose
 * cores cannot all run at once, e.g. a throttled virtual machine). */
static double measure_peak(int threads)
{
    pthread_t tids[256];
    double rates[256] = {0};
    if (threads > 256) threads = 256;
    double t = now_seconds();
    for (int i = 1; i < threads; i++) pthread_create(&tids[i], NULL, peak_thread, &rates[i]);
    peak_thread(&rates[0]);
    for (int i = 1; i < threads; i++) pthread_join(tids[i], NULL);
    t = now_seconds() - t;
    double per_thread =
        __builtin_cpu_supports("avx512f") ? PEAK_FLOPS_PER_THREAD : PEAK_FLOPS_PER_THREAD / 2.0;
    return rates[0] > 0 ? (double)threads * per_thread / t : 0.0;
}

/* Raises *one and *all to the best of PEAK_TRIES measurements on 1 and `threads` threads. */
static void update_peak(double *one, double *all, int threads)
{
    for (int i = 0; i < PEAK_TRIES; i++) {
        double o = measure_peak(1), a = measure_peak(threads);
        if (o > *one) *one = o;
        if (a > *all) *all = a;
    }
}

/* ---- texts of exact token counts ---- */

typedef struct text_set {
    char *text[BENCH_TEXTS];
    int tokens;              /* each text's token count; 0 for mixed lengths */
    int length[BENCH_TEXTS]; /* text i's token count */
} text_set;

/* Mixed lengths: text i has 32 + (97 i mod 225) tokens, 32 to 256 spread evenly. */
#define MIXED_MIN 32
#define MIXED_SPAN 225

/* Reads the sentences of a sentence1,sentence2,score CSV into one space-joined string of words. */
static char *read_words(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 20, len = 0;
    char *words = malloc(cap), *line = NULL;
    size_t line_cap = 0;
    long n;
    while (words && (n = cli_read_line(f, &line, &line_cap)) >= 0) {
        char *comma = strrchr(line, ',');
        if (comma) *comma = '\0'; /* drop the score */
        for (char *p = line; *p; p++)
            if (*p == '"') *p = ' ';
        size_t l = strlen(line);
        if (len + l + 2 > cap) {
            char *grown = realloc(words, cap *= 2);
            if (!grown) {
                free(words);
                words = NULL;
                break;
            }
            words = grown;
        }
        for (size_t i = 0; i < l; i++) words[len++] = line[i] == ',' ? ' ' : line[i];
        words[len++] = ' ';
    }
    if (words) words[len] = '\0';
    free(line);
    fclose(f);
    return words;
}

/* Builds BENCH_TEXTS texts of exactly `tokens` tokens ([CLS] and [SEP] included; 0: mixed
 * lengths of MIXED_MIN to MIXED_MIN + MIXED_SPAN - 1, at most the model's limit) by adding words
 * from successive places in the corpus until the count is reached; a word that would overshoot
 * is skipped. */
static int make_texts(embedrag_model *model, const char *words, int fixed, text_set *set)
{
    size_t total = strlen(words);
    int32_t ids[1024];
    set->tokens = fixed;
    size_t cursor = 0;
    embedrag_model_info info;
    embedrag_model_get_info(model, &info);
    for (int t = 0; t < BENCH_TEXTS; t++) {
        int tokens = fixed ? fixed : MIXED_MIN + (97 * t) % MIXED_SPAN;
        if (tokens > info.max_tokens) tokens = info.max_tokens;
        set->length[t] = tokens;
        size_t cap = 4096, len = 0;
        char *text = malloc(cap);
        if (!text) return -1;
        text[0] = '\0';
        int count = 2, guard = 0;
        while (count < tokens && guard++ < 100000) {
            while (cursor < total && words[cursor] == ' ') cursor++;
            if (cursor >= total) cursor = 0;
            size_t end = cursor;
            while (end < total && words[end] != ' ') end++;
            size_t wl = end - cursor;
            if (len + wl + 2 > cap) break;
            size_t old = len;
            if (len) text[len++] = ' ';
            memcpy(text + len, words + cursor, wl);
            len += wl;
            text[len] = '\0';
            cursor = end;
            size_t got = 0;
            embedrag_embed_params p = embedrag_embed_default_params();
            if (embedrag_tokenize(model, text, len, &p, ids, 1024, &got) != 0) return -1;
            if ((int)got > tokens) {
                len = old;
                text[len] = '\0';
            } else {
                count = (int)got;
            }
        }
        if (count != tokens) {
            free(text);
            return -1;
        }
        set->text[t] = text;
    }
    return 0;
}

static void free_texts(text_set *set)
{
    for (int i = 0; i < BENCH_TEXTS; i++) free(set->text[i]);
}

static int dump_texts(const char *dir, const char *name, const text_set *set)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    for (int i = 0; i < BENCH_TEXTS; i++) fprintf(f, "%s\n", set->text[i]);
    return fclose(f);
}

/* ---- measurements ---- */

/* The device every measured call asks for (--device). */
static embedrag_device bench_device = EMBEDRAG_DEVICE_AUTO;

static embedrag_embed_params bench_params(void)
{
    embedrag_embed_params p = embedrag_embed_default_params();
    p.device = bench_device;
    return p;
}

typedef struct point {
    int tokens, batch; /* tokens per text (0: mixed) */
    long total_tokens;
    double tokenize_s, model_s, end_to_end_s; /* per call */
    double device_s; /* per call: the device's own time (CUDA events on a GPU) */
    /* On the CPU too, when the measured device is a GPU (--device auto or gpu). */
    double cpu_model_s, cpu_end_to_end_s;
} point;

/* Times one (length, batch) point on `device`: tokenization alone, the model on pre-tokenized
 * ids (wall time and the device's own), and embedrag_embed end to end; each the mean over
 * repetitions after a warm-up call. */
static int time_point(embedrag_model *model, const text_set *set, int batch, double min_seconds,
                      int dim, embedrag_device device, point *out)
{
    embedrag_embed_params params = bench_params();
    params.device = device;
    size_t lengths[BENCH_TEXTS];
    long total_tokens = 0;
    for (int i = 0; i < batch; i++) total_tokens += set->length[i];
    int32_t *ids = malloc((size_t)total_tokens * sizeof *ids);
    int *offsets = malloc((size_t)(batch + 1) * sizeof *offsets);
    float *vectors = malloc((size_t)batch * (size_t)dim * sizeof *vectors);
    int rc = -1;
    if (!ids || !offsets || !vectors) goto done;
    for (int i = 0; i < batch; i++) lengths[i] = strlen(set->text[i]);

    int reps = 0;
    double t0 = now_seconds(), t;
    do {
        offsets[0] = 0;
        for (int i = 0; i < batch; i++) {
            size_t count = 0;
            if (embedrag_tokenize(model, set->text[i], lengths[i], &params, ids + offsets[i],
                                  (size_t)set->length[i], &count) != 0)
                goto done;
            offsets[i + 1] = offsets[i] + (int)count;
        }
        reps++;
    } while ((t = now_seconds() - t0) < min_seconds / 4);
    out->tokenize_s = t / reps;

    if (engine_embed_tokens(model, ids, offsets, batch, NULL, &params, vectors) != 0) goto done;
    reps = 0;
    double device_total = 0.0, call_device = 0.0;
    t0 = now_seconds();
    do {
        if (engine_embed_tokens_timed(model, ids, offsets, batch, NULL, &params, vectors,
                                      &call_device) != 0)
            goto done;
        device_total += call_device;
        reps++;
    } while ((t = now_seconds() - t0) < min_seconds);
    out->model_s = t / reps;
    out->device_s = device_total / reps;

    reps = 0;
    t0 = now_seconds();
    do {
        if (embedrag_embed(model, (const char *const *)set->text, lengths, (size_t)batch, &params,
                           vectors) != 0)
            goto done;
        reps++;
    } while ((t = now_seconds() - t0) < min_seconds);
    out->end_to_end_s = t / reps;
    out->tokens = set->tokens;
    out->batch = batch;
    out->total_tokens = total_tokens;
    rc = 0;
done:
    free(ids);
    free(offsets);
    free(vectors);
    return rc;
}

/* ---- a query while a bulk job runs ---- */

/* Texts of the bulk job (--concurrent): 20,000 of the 50-token texts, as the architecture issue's
 * target asks; --quick takes a tenth. */
#define CONCURRENT_TEXTS 20000
/* Pause between two queries of the query thread: a steady stream of queries (about 50 a second
 * with the query time), not a flood that would take the machine from the bulk job. */
#define CONCURRENT_QUERY_GAP_SECONDS 0.010
#define CONCURRENT_MAX_QUERIES 100000

typedef struct bulk_job {
    embedrag_model *model;
    const char **texts;
    int count, dim;
    float *vectors;
    double seconds;
    int rc;
    atomic_int done;
} bulk_job;

static void *bulk_thread(void *arg)
{
    bulk_job *job = arg;
    embedrag_embed_params params = bench_params();
    double t = now_seconds();
    job->rc =
        embedrag_embed(job->model, job->texts, NULL, (size_t)job->count, &params, job->vectors);
    job->seconds = now_seconds() - t;
    atomic_store(&job->done, 1);
    return NULL;
}

typedef struct concurrent_result {
    int texts, queries;
    double bulk_alone_s, bulk_shared_s;
    double query_p50, query_p99, query_max;
} concurrent_result;

/* Embeds `count` bulk texts on one thread, first alone, then again while this thread sends a
 * 16-token query every CONCURRENT_QUERY_GAP_SECONDS and times each, through the public API. */
static int run_concurrent(embedrag_model *model, const text_set *bulk, const text_set *queries,
                          int count, double gap_seconds, int dim, concurrent_result *out)
{
    const char **texts = malloc((size_t)count * sizeof *texts);
    float *vectors = malloc((size_t)count * (size_t)dim * sizeof *vectors);
    double *latencies = malloc(CONCURRENT_MAX_QUERIES * sizeof *latencies);
    float *query_vector = malloc((size_t)dim * sizeof *query_vector);
    int rc = -1;
    if (!texts || !vectors || !latencies || !query_vector) goto done;
    for (int i = 0; i < count; i++) texts[i] = bulk->text[i % BENCH_TEXTS];
    bulk_job job = {.model = model, .texts = texts, .count = count, .dim = dim, .vectors = vectors};
    bulk_thread(&job);
    if (job.rc) goto done;
    out->bulk_alone_s = job.seconds;

    atomic_store(&job.done, 0);
    pthread_t tid;
    if (pthread_create(&tid, NULL, bulk_thread, &job) != 0) goto done;
    embedrag_embed_params params = bench_params();
    int n = 0, failed = 0;
    while (!atomic_load(&job.done) && n < CONCURRENT_MAX_QUERIES) {
        struct timespec gap = {(time_t)gap_seconds,
                               (long)((gap_seconds - (double)(time_t)gap_seconds) * 1e9)};
        nanosleep(&gap, NULL);
        const char *q = queries->text[n % BENCH_TEXTS];
        double t = now_seconds();
        failed |= embedrag_embed(model, &q, NULL, 1, &params, query_vector) != 0;
        latencies[n++] = now_seconds() - t;
    }
    pthread_join(tid, NULL);
    if (job.rc || failed || n == 0) goto done;
    out->texts = count;
    out->queries = n;
    out->bulk_shared_s = job.seconds;
    out->query_p50 = cli_percentile(latencies, n, 0.50);
    out->query_p99 = cli_percentile(latencies, n, 0.99);
    out->query_max = latencies[n - 1]; /* sorted by percentile */
    rc = 0;
done:
    free(texts);
    free(vectors);
    free(latencies);
    free(query_vector);
    return rc;
}

static double flops_per_token(const embedrag_model_info *info, int intermediate, int len)
{
    double h = info->hidden;
    double linear = 2.0 * (4.0 * h * h + 2.0 * h * intermediate);
    double attention = 4.0 * (double)len * h;
    return (double)info->layers * (linear + attention);
}

/* FLOPs of one call of a point: per text, at its own length. */
static double point_flops(const embedrag_model_info *info, int intermediate,
                          const text_set *const *sets, int n_sets, const point *p)
{
    const text_set *set = NULL;
    for (int s = 0; s < n_sets && !set; s++)
        if (sets[s]->tokens == p->tokens) set = sets[s];
    double flops = 0.0;
    for (int i = 0; set && i < p->batch; i++)
        flops += set->length[i] * flops_per_token(info, intermediate, set->length[i]);
    return flops;
}

int cli_bench(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--search") || !strncmp(argv[i], "--search=", 9))
            return cli_bench_search(argc, argv);
    enum {
        OPTION_DATA = 0x200,
        OPTION_DUMP,
        OPTION_QUICK,
        OPTION_JSON,
        OPTION_QUERY_ONLY,
        OPTION_CONCURRENT,
        OPTION_CONCURRENT_TEXTS,
        OPTION_QUERY_GAP,
        OPTION_SECONDS,
    };
    static const struct option options[] = {
        CLI_MODEL_OPTIONS,
        {"data", required_argument, NULL, OPTION_DATA},
        {"dump-texts", required_argument, NULL, OPTION_DUMP},
        {"quick", no_argument, NULL, OPTION_QUICK},
        {"json", no_argument, NULL, OPTION_JSON},
        {"query-only", no_argument, NULL, OPTION_QUERY_ONLY},
        {"concurrent", no_argument, NULL, OPTION_CONCURRENT},
        {"concurrent-texts", required_argument, NULL, OPTION_CONCURRENT_TEXTS},
        {"query-gap-ms", required_argument, NULL, OPTION_QUERY_GAP},
        {"seconds", required_argument, NULL, OPTION_SECONDS},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    cli_model_options model_options = cli_model_defaults();
    const char *data = EMBEDRAG_BENCH_DATA, *dump = NULL;
    int quick = 0, json = 0, query_only = 0, concurrent = 0, concurrent_texts = 0, c;
    double gap_ms = CONCURRENT_QUERY_GAP_SECONDS * 1e3, point_seconds = 0.0;
    char *end;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", options, NULL)) != -1) {
        int shared = cli_model_option(c, optarg, &model_options);
        if (shared < 0) return 2;
        if (shared) continue;
        switch (c) {
        case OPTION_DATA:
            data = optarg;
            break;
        case OPTION_DUMP:
            dump = optarg;
            break;
        case OPTION_QUICK:
            quick = 1;
            break;
        case OPTION_JSON:
            json = 1;
            break;
        case OPTION_QUERY_ONLY:
            query_only = 1;
            break;
        case OPTION_CONCURRENT:
            concurrent = 1;
            break;
        case OPTION_CONCURRENT_TEXTS:
            concurrent = 1;
            concurrent_texts = (int)strtol(optarg, &end, 10);
            if (*end || concurrent_texts < 1 || concurrent_texts > 10000000) {
                fprintf(stderr, "embedrag bench: --concurrent-texts wants 1 to 10000000, not %s\n",
                        optarg);
                return 2;
            }
            break;
        case OPTION_SECONDS:
            point_seconds = strtod(optarg, &end);
            if (*end || !(point_seconds > 0.0 && point_seconds <= 600.0)) {
                fprintf(stderr, "embedrag bench: --seconds wants more than 0 to 600, not %s\n",
                        optarg);
                return 2;
            }
            break;
        case OPTION_QUERY_GAP:
            gap_ms = strtod(optarg, &end);
            if (*end || !(gap_ms >= 0.0 && gap_ms <= 10000.0)) {
                fprintf(stderr, "embedrag bench: --query-gap-ms wants 0 to 10000, not %s\n",
                        optarg);
                return 2;
            }
            break;
        case 'h':
            fputs(bench_usage, stdout);
            return 0;
        default:
            fputs(bench_usage, stderr);
            return 2;
        }
    }
    int threads = model_options.threads;
    bench_device = model_options.device;
    embedrag_model *model = cli_open_model(&model_options);
    if (!model) return 1;
    int status = 1;
    char *words = read_words(data);
    text_set q16 = {0}, t50 = {0}, t128 = {0}, mixed_set = {0};
    if (point_seconds == 0.0) point_seconds = quick ? 0.2 : BENCH_MIN_SECONDS;
    if (!concurrent_texts) concurrent_texts = quick ? CONCURRENT_TEXTS / 10 : CONCURRENT_TEXTS;
    if (!words) {
        fprintf(stderr, "embedrag bench: cannot read %s\n", data);
        goto close_model;
    }
    if (make_texts(model, words, 16, &q16) || make_texts(model, words, 50, &t50) ||
        make_texts(model, words, 128, &t128) || make_texts(model, words, 0, &mixed_set)) {
        fprintf(stderr, "embedrag bench: could not build texts of exact token counts from %s\n",
                data);
        goto free_texts;
    }
    if (dump) {
        mkdir(dump, 0755);
        if (dump_texts(dump, "q16.txt", &q16) || dump_texts(dump, "t50.txt", &t50) ||
            dump_texts(dump, "t128.txt", &t128) || dump_texts(dump, "mixed.txt", &mixed_set)) {
            fprintf(stderr, "embedrag bench: cannot write texts to %s\n", dump);
            goto free_texts;
        }
    }
    embedrag_model_info info;
    embedrag_model_get_info(model, &info);
    int used_threads = threads > 0 ? threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
    int intermediate = info.intermediate;
    int dim = info.dimension;

    /* The peak is the best of several tries, before the run and after it: on a shared or
     * throttled machine one try can read low, which would flatter every fraction of it. */
    double peak_one = 0, peak_all = 0;
    update_peak(&peak_one, &peak_all, used_threads);

    /* Query latency, end to end (tokenize + model + pooling + normalize). */
    embedrag_embed_params params = bench_params();
    float *vector = malloc((size_t)dim * sizeof *vector);
    double latencies[QUERY_RUNS];
    int runs = quick ? 50 : QUERY_RUNS;
    for (int i = 0; i < QUERY_WARMUP + runs; i++) {
        const char *q = q16.text[i % BENCH_TEXTS];
        double t = now_seconds();
        if (embedrag_embed(model, &q, NULL, 1, &params, vector) != 0) {
            fprintf(stderr, "embedrag bench: %s\n", embedrag_last_error());
            free(vector);
            goto free_texts;
        }
        if (i >= QUERY_WARMUP) latencies[i - QUERY_WARMUP] = now_seconds() - t;
    }
    free(vector);
    double p50 = cli_percentile(latencies, runs, 0.50), p99 = cli_percentile(latencies, runs, 0.99);

    /* The backend the measured calls run on: the CPU for --device cpu or when no GPU opened,
     * else the first GPU that works (auto sends calls there once it is faster). */
    embedrag_backend_info cpu, used;
    embedrag_model_get_backend(model, 0, &cpu);
    used = cpu;
    bool on_gpu = false;
    for (int i = 1; bench_device != EMBEDRAG_DEVICE_CPU && i < info.backend_count; i++) {
        embedrag_backend_info b;
        if (embedrag_model_get_backend(model, i, &b) == 0 && !b.failure) {
            used = b;
            on_gpu = true;
            break;
        }
    }
    /* On a GPU: 16-, 50-, 128-token and mixed 32-256-token texts, each also on the CPU (the
     * speedup per cell and the crossover); on the CPU alone, 50 and 128 tokens as before. */
    static const int batches[] = {1, 2, 10, 50, 100, 1000};
    int n_batches = query_only ? 0 : quick ? 5 : 6;
    point points[24];
    int n_points = 0;
    const text_set *sets[4] = {&t50, &t128, &q16, &mixed_set};
    int n_sets = on_gpu ? 4 : 2;
    for (int s = 0; s < n_sets; s++)
        for (int b = 0; b < n_batches; b++) {
            point *pt = &points[n_points];
            if (time_point(model, sets[s], batches[b], point_seconds, dim,
                           on_gpu ? EMBEDRAG_DEVICE_GPU : bench_device, pt) != 0) {
                fprintf(stderr, "embedrag bench: %s\n", embedrag_last_error());
                goto free_texts;
            }
            if (on_gpu) {
                point on_cpu;
                if (time_point(model, sets[s], batches[b], point_seconds / 4, dim,
                               EMBEDRAG_DEVICE_CPU, &on_cpu) != 0) {
                    fprintf(stderr, "embedrag bench: %s\n", embedrag_last_error());
                    goto free_texts;
                }
                pt->cpu_model_s = on_cpu.model_s;
                pt->cpu_end_to_end_s = on_cpu.end_to_end_s;
            }
            n_points++;
        }
    concurrent_result mixed = {0};
    if (concurrent &&
        run_concurrent(model, &t50, &q16, concurrent_texts, gap_ms * 1e-3, dim, &mixed) != 0) {
        fprintf(stderr, "embedrag bench: concurrent run failed: %s\n", embedrag_last_error());
        goto free_texts;
    }
    update_peak(&peak_one, &peak_all, used_threads);
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    double peak_rss_mb = (double)usage.ru_maxrss / 1024.0;
    /* Fractions of peak: of the GPU's dense tensor peak for a GPU's device time, else of the
     * measured fp32 FMA peak of the CPU threads. */
    double peak = on_gpu ? used.peak_flops : peak_all;

    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "model", info.name);
    cJSON_AddNumberToObject(root, "layers", info.layers);
    cJSON_AddNumberToObject(root, "hidden", info.hidden);
    cJSON_AddNumberToObject(root, "threads", used_threads);
    cJSON_AddStringToObject(root, "backend", used.name);
    cJSON_AddStringToObject(root, "device", used.device);
    cJSON_AddStringToObject(root, "kernels", used.kernels);
    cJSON_AddStringToObject(root, "cpu_device", cpu.device);
    cJSON_AddStringToObject(root, "cpu_kernels", cpu.kernels);
    cJSON_AddStringToObject(root, "precision", cli_precision_name(used.precision));
    cJSON_AddNumberToObject(root, "fma_peak_gflops_one_thread", peak_one / 1e9);
    cJSON_AddNumberToObject(root, "fma_peak_gflops", peak_all / 1e9);
    if (on_gpu) cJSON_AddNumberToObject(root, "gpu_peak_tflops", used.peak_flops / 1e12);
    cJSON *query = cJSON_AddObjectToObject(root, "query_16_tokens");
    cJSON_AddNumberToObject(query, "p50_ms", p50 * 1e3);
    cJSON_AddNumberToObject(query, "p99_ms", p99 * 1e3);
    cJSON_AddNumberToObject(query, "runs", runs);
    cJSON *arr = cJSON_AddArrayToObject(root, "throughput");
    for (int i = 0; i < n_points; i++) {
        const point *p = &points[i];
        double tokens = (double)p->total_tokens;
        double flops = point_flops(&info, intermediate, sets, n_sets, p);
        double timed = on_gpu ? p->device_s : p->model_s;
        cJSON *o = cJSON_CreateObject();
        if (p->tokens)
            cJSON_AddNumberToObject(o, "tokens_per_text", p->tokens);
        else
            cJSON_AddStringToObject(o, "tokens_per_text", "32-256");
        cJSON_AddNumberToObject(o, "batch", p->batch);
        cJSON_AddNumberToObject(o, "tokens", tokens);
        cJSON_AddNumberToObject(o, "tokenize_ms", p->tokenize_s * 1e3);
        cJSON_AddNumberToObject(o, "model_ms", p->model_s * 1e3);
        cJSON_AddNumberToObject(o, "device_ms", p->device_s * 1e3);
        cJSON_AddNumberToObject(o, "end_to_end_ms", p->end_to_end_s * 1e3);
        cJSON_AddNumberToObject(o, "model_tokens_per_s", tokens / p->model_s);
        cJSON_AddNumberToObject(o, "device_tokens_per_s", tokens / p->device_s);
        cJSON_AddNumberToObject(o, "end_to_end_tokens_per_s", tokens / p->end_to_end_s);
        cJSON_AddNumberToObject(o, "tokenize_tokens_per_s", tokens / p->tokenize_s);
        cJSON_AddNumberToObject(o, "model_gflops", flops / timed / 1e9);
        cJSON_AddNumberToObject(o, "fraction_of_peak", peak > 0 ? flops / timed / peak : 0.0);
        if (on_gpu) {
            cJSON_AddNumberToObject(o, "cpu_model_ms", p->cpu_model_s * 1e3);
            cJSON_AddNumberToObject(o, "cpu_end_to_end_ms", p->cpu_end_to_end_s * 1e3);
            cJSON_AddNumberToObject(o, "speedup_model", p->cpu_model_s / p->model_s);
            cJSON_AddNumberToObject(o, "speedup_end_to_end", p->cpu_end_to_end_s / p->end_to_end_s);
        }
        cJSON_AddItemToArray(arr, o);
    }
    if (on_gpu) {
        /* Measured crossover: per length, the smallest batch whose end-to-end time is shorter on
         * the GPU (0: none of the batches measured). */
        cJSON *cross = cJSON_AddObjectToObject(root, "crossover_batch");
        for (int s = 0; s < n_sets; s++) {
            int at = 0;
            for (int i = 0; i < n_points && !at; i++)
                if (points[i].tokens == sets[s]->tokens &&
                    points[i].end_to_end_s < points[i].cpu_end_to_end_s)
                    at = points[i].batch;
            char key[32];
            snprintf(key, sizeof key, sets[s]->tokens ? "%d_tokens" : "mixed_32_256",
                     sets[s]->tokens);
            cJSON_AddNumberToObject(cross, key, at);
        }
    }
    if (concurrent) {
        cJSON *o = cJSON_AddObjectToObject(root, "concurrent");
        cJSON_AddNumberToObject(o, "bulk_texts", mixed.texts);
        cJSON_AddNumberToObject(o, "bulk_alone_s", mixed.bulk_alone_s);
        cJSON_AddNumberToObject(o, "bulk_with_queries_s", mixed.bulk_shared_s);
        cJSON_AddNumberToObject(o, "bulk_slowdown", mixed.bulk_shared_s / mixed.bulk_alone_s);
        cJSON_AddNumberToObject(o, "queries", mixed.queries);
        cJSON_AddNumberToObject(o, "query_p50_ms", mixed.query_p50 * 1e3);
        cJSON_AddNumberToObject(o, "query_p99_ms", mixed.query_p99 * 1e3);
        cJSON_AddNumberToObject(o, "query_max_ms", mixed.query_max * 1e3);
    }
    cJSON_AddNumberToObject(root, "peak_rss_mb", peak_rss_mb);
    if (json) {
        char *text = cJSON_Print(root);
        puts(text ? text : "{}");
        cJSON_free(text);
    } else {
        printf("model %s (%d layers x %d), %d threads, kernels %s, precision %s\n", info.name,
               info.layers, info.hidden, used_threads, used.kernels,
               cli_precision_name(used.precision));
        printf("device: %s (%s)\n", used.device, used.name);
        printf("fp32 FMA peak: %.1f GFLOP/s on one thread, %.1f on %d\n", peak_one / 1e9,
               peak_all / 1e9, used_threads);
        if (on_gpu)
            printf("GPU peak (dense, at the highest clock): %.0f TFLOP/s; device ms from CUDA "
                   "events; the CPU columns are the CPU backend on the same texts\n",
                   used.peak_flops / 1e12);
        printf("16-token query, end to end: p50 %.3f ms, p99 %.3f ms\n", p50 * 1e3, p99 * 1e3);
        printf("%6s %6s %11s %10s %10s %10s %12s %8s%s\n", "tokens", "batch", "tokenize ms",
               "model ms", on_gpu ? "device ms" : "", "e2e ms", "model tok/s", "of peak",
               on_gpu ? "   cpu e2e ms  speedup" : "");
        for (int i = 0; i < n_points; i++) {
            const point *p = &points[i];
            double flops = point_flops(&info, intermediate, sets, n_sets, p);
            double timed = on_gpu ? p->device_s : p->model_s;
            char length[16], device_ms[16] = "";
            snprintf(length, sizeof length, p->tokens ? "%d" : "32-256", p->tokens);
            if (on_gpu) snprintf(device_ms, sizeof device_ms, "%.3f", p->device_s * 1e3);
            printf("%6s %6d %11.3f %10.3f %10s %10.3f %12.0f %7.1f%%", length, p->batch,
                   p->tokenize_s * 1e3, p->model_s * 1e3, device_ms, p->end_to_end_s * 1e3,
                   (double)p->total_tokens / p->model_s,
                   peak > 0 ? 100.0 * flops / timed / peak : 0.0);
            if (on_gpu)
                printf(" %13.3f %7.1fx", p->cpu_end_to_end_s * 1e3,
                       p->cpu_end_to_end_s / p->end_to_end_s);
            printf("\n");
        }
        if (concurrent)
            printf("%d bulk texts: %.2f s alone, %.2f s with %d queries (x%.3f); query p50 %.2f "
                   "ms, p99 %.2f ms, max %.2f ms\n",
                   mixed.texts, mixed.bulk_alone_s, mixed.bulk_shared_s, mixed.queries,
                   mixed.bulk_shared_s / mixed.bulk_alone_s, mixed.query_p50 * 1e3,
                   mixed.query_p99 * 1e3, mixed.query_max * 1e3);
        printf("peak RSS %.1f MB\n", peak_rss_mb);
    }
    cJSON_Delete(root);
    status = 0;
free_texts:
    free_texts(&q16);
    free_texts(&t50);
    free_texts(&t128);
    free_texts(&mixed_set);
    free(words);
close_model:
    embedrag_model_close(model);
    return status;
}
