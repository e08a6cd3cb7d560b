/* `embedrag bench --search N`: dense search timed on N synthetic vectors, uniform and clustered,
 * beside the memory bandwidth measured in the same run over the same matrix: single-query
 * latency (p50/p99) and batch throughput at one thread and at every core, recall@10 against the
 * exact scan, and optionally the time to open a store of N chunks. The vectors and queries can
 * be saved so that bench/peers/search_peers.py times faiss, usearch and sqlite-vec on the very
 * same data. */
#include "cli.h"

#include "store/quant.h"
#include "store/scan.h"
#include "store/store.h"
#include "util/error.h"
#include "util/memory.h"
#include "util/threadpool.h"

#include <cjson/cJSON.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SEARCH_K 10
#define SEARCH_WARMUP 10
/* Clustered data: this many centers, and the noise around them (per vector, as a fraction of
 * the center's length): points of one cluster then have cosine about 0.8 with each other, as
 * embeddings of texts on one topic do. */
#define SEARCH_CLUSTERS 1000
#define SEARCH_CLUSTER_NOISE 0.5

static const char search_usage[] =
    "usage: embedrag bench --search N [options]\n"
    "\n"
    "Times dense search over N synthetic L2-normalized vectors, uniform (Gaussian directions,\n"
    "the hardest case for quantization) and clustered (1,000 centers with noise, like\n"
    "embeddings of texts on many topics): a single query's latency (p50, p99) and the\n"
    "throughput of a batch of queries, at one thread and at every core, with recall@10\n"
    "against the exact scan, beside the memory read bandwidth measured over the same matrix.\n"
    "\n"
    "options:\n"
    "  --dim D            vector width (default 384)\n"
    "  --queries M        queries timed (default 200, after 10 of warm-up)\n"
    "  --data KIND        uniform, clustered or both (default both)\n"
    "  --threads N        the 'every core' thread count (default: online cores)\n"
    "  --open             also time opening a store of N chunks, from the database and from its\n"
    "                     search copy (builds the store in --dir first)\n"
    "  --dir DIR          where --open builds its store (default /tmp)\n"
    "  --save PREFIX      write PREFIX-KIND-base.f32 and PREFIX-KIND-queries.f32 (raw float32,\n"
    "                     row-major) for bench/peers/search_peers.py\n"
    "  --vectors FILE     time these vectors instead (raw float32, rows of --dim; N is the\n"
    "                     file's row count, at most the N given), with --query-vectors FILE;\n"
    "                     the data is then named after the file\n"
    "  --query-vectors FILE  the queries for --vectors (the first --queries rows)\n"
    "  --seed S           generator seed (default 1)\n"
    "  --json             print JSON instead of a table\n"
    "  -h, --help         this help\n";

/* ---- data ---- */

static uint64_t next_random(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double next_gaussian(uint64_t *state)
{
    double u = ((double)(next_random(state) >> 11) + 0.5) / 9007199254740992.0;
    double v = (double)(next_random(state) >> 11) / 9007199254740992.0;
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

static void normalize(float *v, size_t dim)
{
    double sum = 0;
    for (size_t i = 0; i < dim; i++) sum += (double)v[i] * v[i];
    float scale = sum > 0 ? (float)(1.0 / sqrt(sum)) : 0.0f;
    for (size_t i = 0; i < dim; i++) v[i] *= scale;
}

/* n rows: Gaussian directions (centers NULL), or a random center plus noise. */
static void generate(float *rows, size_t n, size_t dim, const float *centers, uint64_t *state)
{
    double noise = SEARCH_CLUSTER_NOISE / sqrt((double)dim);
    for (size_t r = 0; r < n; r++) {
        float *v = rows + r * dim;
        if (centers) {
            const float *c = centers + (next_random(state) % SEARCH_CLUSTERS) * dim;
            for (size_t i = 0; i < dim; i++) v[i] = c[i] + (float)(noise * next_gaussian(state));
        } else {
            for (size_t i = 0; i < dim; i++) v[i] = (float)next_gaussian(state);
        }
        normalize(v, dim);
    }
}

static int save(const char *prefix, const char *kind, const char *what, const float *rows,
                size_t count)
{
    char path[4096];
    snprintf(path, sizeof path, "%s-%s-%s.f32", prefix, kind, what);
    FILE *f = fopen(path, "wb");
    bool ok = f && fwrite(rows, sizeof *rows, count, f) == count;
    if (f && fclose(f) != 0) ok = false;
    if (!ok) fprintf(stderr, "embedrag bench: cannot write %s\n", path);
    return ok ? 0 : 1;
}

/* How many rows of `dim` floats the file holds, capped at *rows when that is set (> 0). */
static int file_rows(const char *path, int dim, int *rows)
{
    struct stat st;
    if (stat(path, &st) != 0 || st.st_size % ((off_t)dim * 4) != 0 || st.st_size == 0) {
        fprintf(stderr, "embedrag bench: %s is not a file of float32 rows of %d\n", path, dim);
        return 1;
    }
    long long count = (long long)(st.st_size / ((off_t)dim * 4));
    if (*rows <= 0 || count < *rows) *rows = count > INT_MAX ? INT_MAX : (int)count;
    return 0;
}

static int read_rows(const char *path, float *out, size_t count)
{
    FILE *f = fopen(path, "rb");
    bool ok = f && fread(out, sizeof *out, count, f) == count;
    if (f) fclose(f);
    if (!ok) fprintf(stderr, "embedrag bench: cannot read %zu floats from %s\n", count, path);
    return ok ? 0 : 1;
}

/* ---- timing ---- */

typedef struct search_result {
    const char *mode;
    int threads;
    double p50_ms, p99_ms, batch_qps, recall;
    double bandwidth_fraction; /* of the bandwidth measured at this thread count */
} search_result;

typedef struct search_setup {
    const float *rows, *queries;
    size_t n, dim, m;
    scan_hit *exact; /* m x SEARCH_K: the reference */
    size_t *exact_found;
} search_setup;

/* Recall@10 of hits (m x k) against the exact top 10, by row. */
static double recall_at_10(const search_setup *s, const scan_hit *hits, const size_t *found)
{
    size_t hit = 0, total = 0;
    for (size_t q = 0; q < s->m; q++) {
        const scan_hit *want = s->exact + q * SEARCH_K;
        for (size_t i = 0; i < s->exact_found[q]; i++) {
            total++;
            for (size_t j = 0; j < found[q]; j++)
                if (hits[q * SEARCH_K + j].row == want[i].row) {
                    hit++;
                    break;
                }
        }
    }
    return total ? (double)hit / (double)total : 1.0;
}

/* One search of query q by `mode` (NULL codes: the exact scan). */
static int search_one(const search_setup *s, const quant_codes *codes, int mode, threadpool *pool,
                      const float *query, size_t m, scan_hit *hits, size_t *found)
{
    if (!codes) {
        scan_params p = scan_default_params();
        p.pool = pool;
        return m == 1 ? scan_topk(s->rows, s->n, s->dim, query, SEARCH_K, &p, hits, found)
                      : scan_topk_batch(s->rows, s->n, s->dim, query, m, SEARCH_K, &p, hits, found);
    }
    quant_params p = quant_default_params();
    p.pool = pool;
    p.mode = mode;
    return quant_search_batch(codes, s->rows, s->n, s->dim, query, m, SEARCH_K, &p, hits, found);
}

static int time_mode(const search_setup *s, const char *name, const quant_codes *codes, int mode,
                     threadpool *pool, int threads, double bandwidth, search_result *out)
{
    size_t runs = s->m + SEARCH_WARMUP;
    double *ms = malloc(runs * sizeof *ms);
    scan_hit *hits = malloc(s->m * SEARCH_K * sizeof *hits);
    size_t *found = malloc(s->m * sizeof *found);
    int rc = ms && hits && found ? 0 : err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory");
    for (size_t r = 0; r < runs && !rc; r++) {
        size_t q = r < SEARCH_WARMUP ? r % s->m : r - SEARCH_WARMUP;
        double t = cli_seconds();
        rc = search_one(s, codes, mode, pool, s->queries + q * s->dim, 1, hits + q * SEARCH_K,
                        &found[q]);
        ms[r] = (cli_seconds() - t) * 1e3;
    }
    double best = 0;
    for (int pass = 0; pass < 3 && !rc; pass++) {
        double t = cli_seconds();
        rc = search_one(s, codes, mode, pool, s->queries, s->m, hits, found);
        double seconds = cli_seconds() - t;
        if (seconds > 0 && (double)s->m / seconds > best) best = (double)s->m / seconds;
    }
    if (!rc) {
        double *v = ms + SEARCH_WARMUP;
        *out = (search_result){.mode = name,
                               .threads = threads,
                               .p50_ms = cli_percentile(v, (int)s->m, 0.50),
                               .p99_ms = cli_percentile(v, (int)s->m, 0.99),
                               .batch_qps = best,
                               .recall = recall_at_10(s, hits, found)};
        /* Of the exact scan only: the bytes a quantized search reads depend on its shortlist. */
        double bytes = (double)s->n * (double)s->dim * sizeof(float);
        if (!codes)
            out->bandwidth_fraction = bandwidth > 0 ? bytes / (out->p50_ms * 1e-3) / bandwidth : 0;
    }
    free(ms);
    free(hits);
    free(found);
    return rc;
}

/* ---- a store of N chunks: time to open it ---- */

typedef struct open_times {
    double build_s, from_database_s, from_copy_s;
} open_times;

static int time_open(const char *dir, const float *rows, size_t n, size_t dim, open_times *out)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/embedrag-bench-search-%ld.db", dir, (long)getpid());
    store_model model = {.name = "synthetic",
                         .dimension = (int)dim,
                         .pooling = "mean",
                         .prompt = "",
                         .precision = "fp32",
                         .weights_hash = "0",
                         .directory = ""};
    store *s = NULL;
    double t = cli_seconds();
    int rc = store_open(path, &model, false, &s);
    char key[32], text[48];
    /* Documents of 16 chunks, committed 256 documents a transaction, as the indexer does. */
    store_chunk chunks[16];
    for (size_t d = 0; !rc && d * 16 < n; d++) {
        if (d % 256 == 0) rc = store_begin(s);
        size_t count = n - d * 16 < 16 ? n - d * 16 : 16;
        for (size_t c = 0; c < count; c++) {
            int len = snprintf(text, sizeof text, "synthetic chunk %zu", d * 16 + c);
            chunks[c] = (store_chunk){.text = text,
                                      .length = (size_t)len,
                                      .end = len,
                                      .tokens = 4,
                                      .vector = rows + (d * 16 + c) * dim};
        }
        snprintf(key, sizeof key, "doc-%zu", d);
        store_document doc = {.key = key, .source = key, .content_hash = d + 1};
        if (!rc) rc = store_put_document(s, &doc, chunks, count);
        if (!rc && (d % 256 == 255 || (d + 1) * 16 >= n)) rc = store_commit(s);
    }
    store_close(s);
    s = NULL;
    out->build_s = cli_seconds() - t;
    for (int pass = 0; pass < 2 && !rc; pass++) {
        float *m = NULL;
        int64_t *ids = NULL;
        size_t count = 0;
        t = cli_seconds();
        rc = store_open(path, NULL, true, &s);
        if (!rc) rc = store_load_vectors(s, &m, &ids, &count, NULL);
        double seconds = cli_seconds() - t;
        if (!rc && count != n)
            rc = err_set(EMBEDRAG_ERR_DATABASE, "%s: %zu vectors, not %zu", path, count, n);
        *(pass ? &out->from_copy_s : &out->from_database_s) = seconds;
        store_close(s);
        s = NULL;
        free(m);
        free(ids);
    }
    static const char *const suffixes[] = {"",      "-wal",      "-shm",     "-vectors",
                                           "-text", "-text-wal", "-text-shm"};
    for (size_t i = 0; i < sizeof suffixes / sizeof *suffixes; i++) {
        char file[4200];
        snprintf(file, sizeof file, "%s%s", path, suffixes[i]);
        unlink(file);
        /* A text index split into shards (EMBEDRAG_TEXT_SHARDS): "-text.K" and their logs. */
        for (int k = 0; i >= 4 && k < STORE_TEXT_SHARDS_MAX; k++) {
            snprintf(file, sizeof file, "%s-text.%d%s", path, k, suffixes[i] + 5);
            unlink(file);
        }
    }
    return rc;
}

/* ---- the run ---- */

static void cpu_name(char *out, size_t size)
{
    snprintf(out, size, "unknown");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "model name", 10)) {
            char *colon = strchr(line, ':');
            if (colon) {
                colon += 2;
                colon[strcspn(colon, "\n")] = '\0';
                snprintf(out, size, "%s", colon);
            }
            break;
        }
    fclose(f);
}

static void print_table(const char *kind, const search_result *r, int count)
{
    printf("%s vectors:\n", kind);
    printf("  %-10s %7s %10s %10s %12s %10s %10s\n", "mode", "threads", "p50 ms", "p99 ms",
           "batch q/s", "recall@10", "of bandw.");
    for (int i = 0; i < count; i++)
        printf("  %-10s %7d %10.3f %10.3f %12.0f %10.4f %9.0f%%\n", r[i].mode, r[i].threads,
               r[i].p50_ms, r[i].p99_ms, r[i].batch_qps, r[i].recall,
               100.0 * r[i].bandwidth_fraction);
}

int cli_bench_search(int argc, char **argv)
{
    enum {
        OPTION_SEARCH = 0x400,
        OPTION_DIM,
        OPTION_QUERIES,
        OPTION_DATA,
        OPTION_THREADS,
        OPTION_OPEN,
        OPTION_DIR,
        OPTION_SAVE,
        OPTION_SEED,
        OPTION_JSON,
        OPTION_VECTORS,
        OPTION_QUERY_VECTORS
    };
    static const struct option options[] = {
        {"search", required_argument, NULL, OPTION_SEARCH},
        {"dim", required_argument, NULL, OPTION_DIM},
        {"queries", required_argument, NULL, OPTION_QUERIES},
        {"data", required_argument, NULL, OPTION_DATA},
        {"threads", required_argument, NULL, OPTION_THREADS},
        {"open", no_argument, NULL, OPTION_OPEN},
        {"dir", required_argument, NULL, OPTION_DIR},
        {"save", required_argument, NULL, OPTION_SAVE},
        {"seed", required_argument, NULL, OPTION_SEED},
        {"json", no_argument, NULL, OPTION_JSON},
        {"vectors", required_argument, NULL, OPTION_VECTORS},
        {"query-vectors", required_argument, NULL, OPTION_QUERY_VECTORS},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *vectors_file = NULL, *queries_file = NULL;
    int n = 0, dim = 384, m = 200, threads = threadpool_online_cores(), seed = 1, c;
    bool json = false, open_store = false, uniform = true, clustered = true;
    const char *dir = "/tmp", *prefix = NULL;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", options, NULL)) != -1) {
        switch (c) {
        case OPTION_SEARCH:
            if (cli_parse_int("--search", optarg, 1, &n)) return 2;
            break;
        case OPTION_DIM:
            if (cli_parse_int("--dim", optarg, 1, &dim)) return 2;
            break;
        case OPTION_QUERIES:
            if (cli_parse_int("--queries", optarg, 1, &m)) return 2;
            break;
        case OPTION_THREADS:
            if (cli_parse_int("--threads", optarg, 1, &threads)) return 2;
            break;
        case OPTION_SEED:
            if (cli_parse_int("--seed", optarg, 0, &seed)) return 2;
            break;
        case OPTION_DATA:
            uniform = !strcmp(optarg, "uniform") || !strcmp(optarg, "both");
            clustered = !strcmp(optarg, "clustered") || !strcmp(optarg, "both");
            if (!uniform && !clustered) {
                fprintf(stderr,
                        "embedrag bench: --data takes uniform, clustered or both (got '%s')\n",
                        optarg);
                return 2;
            }
            break;
        case OPTION_OPEN:
            open_store = true;
            break;
        case OPTION_DIR:
            dir = optarg;
            break;
        case OPTION_SAVE:
            prefix = optarg;
            break;
        case OPTION_JSON:
            json = true;
            break;
        case OPTION_VECTORS:
            vectors_file = optarg;
            break;
        case OPTION_QUERY_VECTORS:
            queries_file = optarg;
            break;
        case 'h':
            fputs(search_usage, stdout);
            return 0;
        default:
            fputs(search_usage, stderr);
            return 2;
        }
    }
    if (!vectors_file != !queries_file) {
        fputs("embedrag bench: --vectors and --query-vectors go together\n", stderr);
        return 2;
    }
    if (vectors_file && (file_rows(vectors_file, dim, &n) || file_rows(queries_file, dim, &m)))
        return 1;
    size_t rows_bytes = (size_t)n * (size_t)dim * sizeof(float);
    float *rows = memory_alloc_huge(rows_bytes);
    float *queries = malloc((size_t)m * (size_t)dim * sizeof *queries);
    float *centers = malloc((size_t)SEARCH_CLUSTERS * (size_t)dim * sizeof *centers);
    scan_hit *exact = malloc((size_t)m * SEARCH_K * sizeof *exact);
    size_t *exact_found = malloc((size_t)m * sizeof *exact_found);
    threadpool *pool = NULL;
    int status = 1;
    cJSON *root = json ? cJSON_CreateObject() : NULL, *kinds = NULL;
    if (!rows || !queries || !centers || !exact || !exact_found) {
        fprintf(stderr, "embedrag bench: out of memory for %d vectors of %d\n", n, dim);
        goto done;
    }
    if (threads > 1 && threadpool_create(threads, &pool) != 0) {
        fprintf(stderr, "embedrag bench: %s\n", embedrag_last_error());
        goto done;
    }
    char cpu[256];
    cpu_name(cpu, sizeof cpu);
    if (root) {
        cJSON_AddStringToObject(root, "machine", cpu);
        cJSON_AddNumberToObject(root, "n", n);
        cJSON_AddNumberToObject(root, "dim", dim);
        cJSON_AddNumberToObject(root, "queries", m);
        cJSON_AddNumberToObject(root, "k", SEARCH_K);
        cJSON_AddStringToObject(root, "isa", scan_isa_name(scan_isa()));
        kinds = cJSON_AddArrayToObject(root, "data");
    } else {
        printf("%s; %d vectors of %d floats (%.0f MB), %d queries, top %d, %s kernels\n", cpu, n,
               dim, (double)rows_bytes / 1e6, m, SEARCH_K, scan_isa_name(scan_isa()));
    }
    uint64_t state = (uint64_t)seed * 0x2545f4914f6cdd1dULL + 1;
    generate(centers, SEARCH_CLUSTERS, (size_t)dim, NULL, &state);
    for (int pass = 0; pass < 2; pass++) {
        bool is_clustered = pass == 1;
        const char *kind = is_clustered ? "clustered" : "uniform";
        if (vectors_file) {
            if (pass == 1) break;
            kind = vectors_file;
            if (read_rows(vectors_file, rows, (size_t)n * (size_t)dim) ||
                read_rows(queries_file, queries, (size_t)m * (size_t)dim))
                goto done;
        } else {
            if (is_clustered ? !clustered : !uniform) continue;
            const float *around = is_clustered ? centers : NULL;
            generate(rows, (size_t)n, (size_t)dim, around, &state);
            generate(queries, (size_t)m, (size_t)dim, around, &state);
        }
        if (prefix && (save(prefix, kind, "base", rows, (size_t)n * (size_t)dim) ||
                       save(prefix, kind, "queries", queries, (size_t)m * (size_t)dim)))
            goto done;
        /* The bandwidth over this very matrix, at each thread count. */
        double bandwidth[2] = {0, 0};
        if (rows_bytes >= 4096 &&
            (scan_measure_bandwidth(rows, rows_bytes, NULL, SCAN_ISA_AUTO, 3, &bandwidth[0]) ||
             (pool &&
              scan_measure_bandwidth(rows, rows_bytes, pool, SCAN_ISA_AUTO, 3, &bandwidth[1])))) {
            fprintf(stderr, "embedrag bench: %s\n", embedrag_last_error());
            goto done;
        }
        search_setup setup = {.rows = rows,
                              .queries = queries,
                              .n = (size_t)n,
                              .dim = (size_t)dim,
                              .m = (size_t)m,
                              .exact = exact,
                              .exact_found = exact_found};
        scan_params reference = scan_default_params();
        reference.pool = pool;
        if (scan_topk_batch(rows, (size_t)n, (size_t)dim, queries, (size_t)m, SEARCH_K, &reference,
                            exact, exact_found) != 0) {
            fprintf(stderr, "embedrag bench: %s\n", embedrag_last_error());
            goto done;
        }
        /* The codes as a store of this size builds them (with the int8 codes, so every mode can
         * run: the default builds them only where the bits' shortlist is long). */
        quant_build_params bp = quant_default_build_params();
        bp.pool = pool;
        bp.int8 = QUANT_INT8_ON;
        quant_codes *codes = NULL;
        double build_t = cli_seconds();
        if (quant_codes_build(rows, (size_t)n, (size_t)dim, &bp, &codes) != 0) {
            fprintf(stderr, "embedrag bench: %s\n", embedrag_last_error());
            goto done;
        }
        double build_s = cli_seconds() - build_t;
        quant_codes_info info;
        quant_codes_get_info(codes, &info);
        /* Which mode the default (QUANT_MODE_AUTO) runs with codes built the default way. */
        const char *auto_runs =
            info.shortlist > QUANT_CASCADE_MIN_SHORTLIST ? "1-bit->int8->exact" : "1-bit->exact";
        static const struct {
            const char *name;
            int mode;
        } modes[] = {{"exact", -1},
                     {"1-bit", QUANT_MODE_BITS},
                     {"cascade", QUANT_MODE_CASCADE},
                     {"int8", QUANT_MODE_INT8}};
        search_result results[16];
        int count = 0, thread_counts[2] = {1, threads};
        for (size_t md = 0; md < sizeof modes / sizeof *modes; md++)
            for (int t = 0; t < (pool ? 2 : 1); t++) {
                if (time_mode(&setup, modes[md].name, modes[md].mode < 0 ? NULL : codes,
                              modes[md].mode, t ? pool : NULL, thread_counts[t], bandwidth[t],
                              &results[count]) != 0) {
                    fprintf(stderr, "embedrag bench: %s\n", embedrag_last_error());
                    quant_codes_free(codes);
                    goto done;
                }
                count++;
            }
        quant_codes_free(codes);
        open_times opened = {0};
        if (open_store && time_open(dir, rows, (size_t)n, (size_t)dim, &opened) != 0) {
            fprintf(stderr, "embedrag bench: %s\n", embedrag_last_error());
            goto done;
        }
        if (root) {
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "kind", kind);
            cJSON *qo = cJSON_AddObjectToObject(o, "codes");
            cJSON_AddNumberToObject(qo, "build_s", build_s);
            cJSON_AddNumberToObject(qo, "bytes", (double)info.bytes);
            cJSON_AddNumberToObject(qo, "shortlist", (double)info.shortlist);
            cJSON_AddNumberToObject(qo, "calibrated_recall", info.calibrated_recall);
            cJSON_AddStringToObject(qo, "default_runs", auto_runs);
            cJSON_AddStringToObject(qo, "isa", quant_isa_name(quant_isa()));
            cJSON_AddNumberToObject(o, "bandwidth_gbs_1_thread", bandwidth[0] / 1e9);
            if (pool) cJSON_AddNumberToObject(o, "bandwidth_gbs_all_threads", bandwidth[1] / 1e9);
            cJSON *list = cJSON_AddArrayToObject(o, "results");
            for (int i = 0; i < count; i++) {
                cJSON *r = cJSON_CreateObject();
                cJSON_AddStringToObject(r, "mode", results[i].mode);
                cJSON_AddNumberToObject(r, "threads", results[i].threads);
                cJSON_AddNumberToObject(r, "p50_ms", results[i].p50_ms);
                cJSON_AddNumberToObject(r, "p99_ms", results[i].p99_ms);
                cJSON_AddNumberToObject(r, "batch_qps", results[i].batch_qps);
                cJSON_AddNumberToObject(r, "recall_at_10", results[i].recall);
                cJSON_AddNumberToObject(r, "fraction_of_bandwidth", results[i].bandwidth_fraction);
                cJSON_AddItemToArray(list, r);
            }
            if (open_store) {
                cJSON *op = cJSON_AddObjectToObject(o, "store");
                cJSON_AddNumberToObject(op, "build_s", opened.build_s);
                cJSON_AddNumberToObject(op, "open_from_database_s", opened.from_database_s);
                cJSON_AddNumberToObject(op, "open_from_search_copy_s", opened.from_copy_s);
            }
            cJSON_AddItemToArray(kinds, o);
        } else {
            printf("\nmemory read bandwidth over the matrix: %.1f GB/s (1 thread)",
                   bandwidth[0] / 1e9);
            if (pool) printf(", %.1f GB/s (%d threads)", bandwidth[1] / 1e9, threads);
            printf("\n");
            print_table(kind, results, count);
            printf("  codes: built in %.2f s, %.0f MB with int8; 1-bit shortlist %zu rows "
                   "(calibrated recall %.3f); a store's default search runs %s\n",
                   build_s, (double)info.bytes / 1e6, info.shortlist, info.calibrated_recall,
                   auto_runs);
            if (open_store)
                printf("  store of %d chunks: built in %.1f s; opened in %.2f s from the database, "
                       "%.2f s from its search copy\n",
                       n, opened.build_s, opened.from_database_s, opened.from_copy_s);
        }
    }
    if (root) {
        char *text = cJSON_Print(root);
        puts(text ? text : "{}");
        cJSON_free(text);
    }
    status = 0;
done:
    cJSON_Delete(root);
    threadpool_destroy(pool);
    free(rows);
    free(queries);
    free(centers);
    free(exact);
    free(exact_found);
    return status;
}
