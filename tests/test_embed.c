/* The engine end to end against sentence-transformers: every fixture vector (made by
 * tests/fixtures/make_embedding_fixtures.py) within cosine 0.99999 and 1e-4 per component, for
 * both model shapes; bit-identical vectors whatever the batch, order and thread count; options
 * (prompts, Matryoshka dimensions, no normalization, no truncation) and bad input. */
#include "embedrag.h"

#include "backend/cpu/kernels.h"
#include "check.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Accuracy bars from the issue: float32 against float32, differing only in summation order. */
#define MIN_COSINE 0.99999
#define MAX_ABS_DIFF 1e-4
/* Our bars for the opt-in bfloat16 precision against our fp32 vectors, over the fixture texts,
 * for either bf16 kernel. Measured on AMX: worst 0.99996 (6 layers) and 0.99771 (12 stacked
 * layers: one 512-token text; the next worst is 0.99985), 1st percentile 0.99987; PyTorch's own
 * bf16 autocast measured worst 0.99995 and 0.99926 on the same texts. */
#define BF16_MIN_COSINE 0.997
#define BF16_P1_COSINE 0.9998

typedef struct fixture {
    int n, dim;
    char **texts;
    size_t *lengths;
    char **prompt_names;
    float *vectors;
} fixture;

static char *read_file(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    if (buf) buf[n] = '\0';
    fclose(f);
    if (size) *size = (size_t)n;
    return buf;
}

static int load_fixture(const char *name, fixture *fx)
{
    char path[4096];
    memset(fx, 0, sizeof *fx);
    snprintf(path, sizeof path, "%s/tests/fixtures/%s/texts.jsonl", check_source_dir(), name);
    char *jsonl = read_file(path, NULL);
    if (!jsonl) return -1;
    int cap = 1024;
    fx->texts = calloc((size_t)cap, sizeof *fx->texts);
    fx->lengths = calloc((size_t)cap, sizeof *fx->lengths);
    fx->prompt_names = calloc((size_t)cap, sizeof *fx->prompt_names);
    for (char *line = strtok(jsonl, "\n"); line && fx->n < cap; line = strtok(NULL, "\n")) {
        cJSON *o = cJSON_Parse(line);
        cJSON *text = cJSON_GetObjectItem(o, "text"),
              *prompt = cJSON_GetObjectItem(o, "prompt_name");
        if (!cJSON_IsString(text)) {
            cJSON_Delete(o);
            free(jsonl);
            return -1;
        }
        fx->texts[fx->n] = strdup(text->valuestring);
        fx->lengths[fx->n] = strlen(text->valuestring);
        fx->prompt_names[fx->n] = cJSON_IsString(prompt) ? strdup(prompt->valuestring) : NULL;
        fx->n++;
        cJSON_Delete(o);
    }
    free(jsonl);
    snprintf(path, sizeof path, "%s/tests/fixtures/%s/vectors.f32", check_source_dir(), name);
    size_t size = 0;
    fx->vectors = (float *)read_file(path, &size);
    if (!fx->vectors || fx->n == 0) return -1;
    fx->dim = (int)(size / sizeof(float) / (size_t)fx->n);
    if (size != (size_t)fx->n * (size_t)fx->dim * sizeof(float)) return -1;
#ifdef CHECK_SLOW_BUILD
    /* Sanitizer builds: every third text (a third of the bytes; 13 of the 39 over 1,000 bytes)
     * and the longest (a 554-text run took 12.5 minutes there on an Intel machine); the
     * optimized build checks them all. */
    int longest = 0;
    for (int i = 1; i < fx->n; i++)
        if (fx->lengths[i] > fx->lengths[longest]) longest = i;
    int kept = 0;
    for (int i = 0; i < fx->n; i++) {
        if (i % 3 != 0 && i != longest) {
            free(fx->texts[i]);
            free(fx->prompt_names[i]);
            continue;
        }
        fx->texts[kept] = fx->texts[i];
        fx->lengths[kept] = fx->lengths[i];
        fx->prompt_names[kept] = fx->prompt_names[i];
        memmove(fx->vectors + (size_t)kept * (size_t)fx->dim,
                fx->vectors + (size_t)i * (size_t)fx->dim, (size_t)fx->dim * sizeof(float));
        kept++;
    }
    fx->n = kept;
#endif
    return 0;
}

static void free_fixture(fixture *fx)
{
    for (int i = 0; i < fx->n; i++) {
        free(fx->texts[i]);
        free(fx->prompt_names[i]);
    }
    free(fx->texts);
    free(fx->lengths);
    free(fx->prompt_names);
    free(fx->vectors);
}

static embedrag_model *open_model(const char *name, int threads, embedrag_precision precision)
{
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/models/%s", check_source_dir(), name);
    embedrag_model_params p = embedrag_model_default_params();
    p.threads = threads;
    p.precision = precision;
    embedrag_model *m = NULL;
    int rc = embedrag_model_open(dir, &p, &m);
    CHECK(rc == 0, "cannot open %s (run scripts/fetch-models.sh): %s", dir, embedrag_last_error());
    return m;
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

/* Embeds the fixture's texts grouped by prompt (one call per prompt, all texts of it in one
 * batch) and compares each with sentence-transformers' vector. */
static void test_matches_sentence_transformers(embedrag_model *m, const char *name,
                                               const fixture *fx)
{
    float *out = malloc(sizeof(float) * (size_t)fx->n * (size_t)fx->dim);
    const char **texts = malloc(sizeof(char *) * (size_t)fx->n);
    size_t *lengths = malloc(sizeof(size_t) * (size_t)fx->n);
    int *index = malloc(sizeof(int) * (size_t)fx->n);
    const char *prompts[3] = {NULL, "query", "passage"};
    int checked = 0, bad = 0;
    double worst_cos = 1, worst_diff = 0;
    for (int p = 0; p < 3; p++) {
        int k = 0;
        for (int i = 0; i < fx->n; i++) {
            const char *pn = fx->prompt_names[i];
            if ((pn == NULL) != (prompts[p] == NULL) || (pn && strcmp(pn, prompts[p]))) continue;
            texts[k] = fx->texts[i];
            lengths[k] = fx->lengths[i];
            index[k++] = i;
        }
        if (!k) continue;
        embedrag_embed_params params = embedrag_embed_default_params();
        params.prompt_name = prompts[p];
        int rc = embedrag_embed(m, texts, lengths, (size_t)k, &params, out);
        CHECK(rc == 0, "%s: embed failed: %s", name, embedrag_last_error());
        if (rc) continue;
        for (int j = 0; j < k; j++) {
            const float *ours = out + (size_t)j * fx->dim;
            const float *ref = fx->vectors + (size_t)index[j] * fx->dim;
            double c = cosine(ours, ref, fx->dim), d = 0;
            for (int t = 0; t < fx->dim; t++)
                if (fabs((double)ours[t] - ref[t]) > d) d = fabs((double)ours[t] - ref[t]);
            if (c < worst_cos) worst_cos = c;
            if (d > worst_diff) worst_diff = d;
            if (c < MIN_COSINE || d > MAX_ABS_DIFF) {
                if (bad++ < 5)
                    fprintf(stderr, "%s: text %d (prompt %s): cosine %.7f, max diff %.2g\n", name,
                            index[j], prompts[p] ? prompts[p] : "none", c, d);
            }
            checked++;
        }
    }
    printf("%s: %d vectors, worst cosine %.8f, worst abs diff %.3g\n", name, checked, worst_cos,
           worst_diff);
    CHECK(checked == fx->n, "%s: checked %d of %d vectors", name, checked, fx->n);
    CHECK(bad == 0, "%s: %d vectors outside cosine >= %g and |diff| <= %g", name, bad, MIN_COSINE,
          MAX_ABS_DIFF);
    free(out);
    free(texts);
    free(lengths);
    free(index);
}

/* A text's vector must be bit-identical alone, in a batch, in another order, with other thread
 * counts and with a small token budget (more, smaller forward passes). */
static void test_batch_invariance(embedrag_model *m1, embedrag_model *m2, const fixture *fx)
{
    int n = fx->n < 120 ? fx->n : 120, dim = fx->dim;
    float *batch = malloc(sizeof(float) * (size_t)n * dim);
    float *shuffled = malloc(sizeof(float) * (size_t)n * dim);
    float *alone = malloc(sizeof(float) * (size_t)dim);
    const char **texts = malloc(sizeof(char *) * (size_t)n);
    size_t *lengths = malloc(sizeof(size_t) * (size_t)n);
    embedrag_embed_params params = embedrag_embed_default_params();
    for (int i = 0; i < n; i++) {
        texts[i] = fx->texts[(i * 7) % fx->n];
        lengths[i] = fx->lengths[(i * 7) % fx->n];
    }
    CHECK(embedrag_embed(m2, texts, lengths, (size_t)n, &params, batch) == 0, "batch: %s",
          embedrag_last_error());
    int differ = 0;
    for (int i = 0; i < n; i += 3) {
        CHECK(embedrag_embed(m1, &texts[i], &lengths[i], 1, &params, alone) == 0, "alone");
        if (memcmp(alone, batch + (size_t)i * dim, sizeof(float) * dim)) differ++;
    }
    CHECK(differ == 0, "%d texts differ alone (1 thread) vs batched (2 threads)", differ);
    /* Reverse order, tiny budget, one thread. */
    for (int i = 0; i < n / 2; i++) {
        const char *t = texts[i];
        size_t l = lengths[i];
        texts[i] = texts[n - 1 - i];
        lengths[i] = lengths[n - 1 - i];
        texts[n - 1 - i] = t;
        lengths[n - 1 - i] = l;
    }
    params.batch_tokens = 300;
    CHECK(embedrag_embed(m1, texts, lengths, (size_t)n, &params, shuffled) == 0, "shuffled");
    differ = 0;
    for (int i = 0; i < n; i++)
        if (memcmp(shuffled + (size_t)i * dim, batch + (size_t)(n - 1 - i) * dim,
                   sizeof(float) * dim))
            differ++;
    CHECK(differ == 0, "%d texts differ in reversed order with a 300-token budget", differ);
    free(batch);
    free(shuffled);
    free(alone);
    free(texts);
    free(lengths);
}

static void test_options(embedrag_model *m, const fixture *fx)
{
    const char *text = fx->texts[5];
    int dim = fx->dim;
    float full[4096], raw[4096], small[4096];
    embedrag_embed_params p = embedrag_embed_default_params();
    CHECK(embedrag_embed(m, &text, NULL, 1, &p, full) == 0, "embed");
    double norm = 0;
    for (int i = 0; i < dim; i++) norm += (double)full[i] * full[i];
    CHECK(fabs(norm - 1.0) < 1e-5, "normalized vector has squared norm %g", norm);

    p.normalize = false;
    CHECK(embedrag_embed(m, &text, NULL, 1, &p, raw) == 0, "embed raw");
    double raw_norm = 0;
    for (int i = 0; i < dim; i++) raw_norm += (double)raw[i] * raw[i];
    CHECK(fabs(raw_norm - 1.0) > 1e-3, "unnormalized vector should not have unit norm (%g)",
          raw_norm);
    CHECK(cosine(raw, full, dim) > 0.999999, "unnormalized direction differs");

    p.normalize = true;
    p.dimensions = 128;
    CHECK(embedrag_embed_dimension(m, &p) == 128, "dimension with Matryoshka");
    CHECK(embedrag_embed(m, &text, NULL, 1, &p, small) == 0, "embed 128");
    double small_norm = 0;
    for (int i = 0; i < 128; i++) small_norm += (double)small[i] * small[i];
    CHECK(fabs(small_norm - 1.0) < 1e-5, "truncated vector renormalized (%g)", small_norm);
    CHECK(cosine(small, raw, 128) > 0.999999, "truncated vector is not the raw prefix");

    /* Token ids from embedrag_tokenize give the text's vector, bit for bit, also as a slice of
     * a larger call (offsets not from 0); truncation from the left keeps the text's end. */
    int32_t ids[1024];
    size_t count = 0;
    p = embedrag_embed_default_params();
    CHECK(embedrag_tokenize(m, text, strlen(text), &p, ids + 7, 1000, &count) == 0, "tokenize");
    size_t offsets[2] = {7, 7 + count};
    float from_ids[4096];
    CHECK(embedrag_embed_tokens(m, ids, offsets, 1, &p, from_ids) == 0, "embed tokens: %s",
          embedrag_last_error());
    CHECK(memcmp(from_ids, full, sizeof(float) * dim) == 0, "token ids give the text's vector");
    ids[8] = 1 << 30;
    CHECK(embedrag_embed_tokens(m, ids, offsets, 1, &p, from_ids) == EMBEDRAG_ERR_INVALID_ARGUMENT,
          "an id past the vocabulary is refused");
    embedrag_model_info model_info;
    embedrag_model_get_info(m, &model_info);
    size_t long_length = (size_t)model_info.max_tokens * 8;
    char *long_text = malloc(long_length + 1);
    for (size_t i = 0; i < long_length; i++) long_text[i] = "abcdefgh "[i % 9];
    memcpy(long_text + long_length - 9, " omega  z", 9);
    long_text[long_length] = '\0';
    p.truncate_left = true;
    CHECK(embedrag_tokenize(m, long_text, long_length, &p, ids, 1024, &count) == 0 &&
              count == (size_t)model_info.max_tokens,
          "left truncation keeps max_tokens ids (%zu)", count);
    const char *last = embedrag_token_text(m, ids[count - 2]);
    CHECK(last && !strcmp(last, "z"), "left truncation keeps the last word (%s)", last);
    float left[4096], right[4096];
    const char *long_texts[1] = {long_text};
    CHECK(embedrag_embed(m, long_texts, NULL, 1, &p, left) == 0, "embed truncated left");
    p.truncate_left = false;
    CHECK(embedrag_embed(m, long_texts, NULL, 1, &p, right) == 0, "embed truncated right");
    CHECK(memcmp(left, right, sizeof(float) * dim) != 0, "left and right truncation differ");
    free(long_text);

    /* A literal prompt equals the named one it spells out. */
    embedrag_model_info info;
    embedrag_model_get_info(m, &info);
    if (info.prompt_count > 0) {
        const char *name, *prompt_text;
        embedrag_model_get_prompt(m, 0, &name, &prompt_text);
        embedrag_embed_params named = embedrag_embed_default_params(), literal = named;
        named.prompt_name = name;
        literal.prompt = prompt_text;
        float a[4096], b[4096];
        CHECK(embedrag_embed(m, &text, NULL, 1, &named, a) == 0, "named prompt");
        CHECK(embedrag_embed(m, &text, NULL, 1, &literal, b) == 0, "literal prompt");
        CHECK(memcmp(a, b, sizeof(float) * dim) == 0, "named and literal prompt differ");
        CHECK(memcmp(a, full, sizeof(float) * dim) != 0, "prompt made no difference");
    }
}

static void test_bad_input(embedrag_model *m)
{
    float out[4096 * 3];
    embedrag_embed_params p = embedrag_embed_default_params();
    const char *texts[3] = {"fine", "also fine", "bad \xC3\x28 byte"};
    int rc = embedrag_embed(m, texts, NULL, 3, &p, out);
    CHECK(rc == EMBEDRAG_ERR_INVALID_UTF8, "invalid UTF-8 gives %d", rc);
    CHECK(strstr(embedrag_last_error(), "text 2") != NULL, "message names the text: %s",
          embedrag_last_error());
    CHECK(embedrag_last_error_text() == 2, "failing text index %ld, expected 2",
          embedrag_last_error_text());
    const char *with_null[2] = {"fine", NULL};
    rc = embedrag_embed(m, with_null, NULL, 2, &p, out);
    CHECK(rc == EMBEDRAG_ERR_INVALID_ARGUMENT && embedrag_last_error_text() == 1,
          "NULL text: %d, index %ld", rc, embedrag_last_error_text());

    p.prompt_name = "no-such-prompt";
    rc = embedrag_embed(m, texts, NULL, 1, &p, out);
    CHECK(rc == EMBEDRAG_ERR_INVALID_ARGUMENT && strstr(embedrag_last_error(), "no-such-prompt"),
          "unknown prompt: %d %s", rc, embedrag_last_error());
    CHECK(embedrag_last_error_text() == -1, "an error about no text names text %ld",
          embedrag_last_error_text());

    p = embedrag_embed_default_params();
    p.truncate = false;
    size_t big = 20000;
    char *long_text = malloc(big + 1);
    for (size_t i = 0; i < big; i++) long_text[i] = (i % 6 == 5) ? ' ' : 'a' + (char)(i % 5);
    long_text[big] = '\0';
    const char *lt = long_text;
    rc = embedrag_embed(m, &lt, NULL, 1, &p, out);
    CHECK(rc == EMBEDRAG_ERR_TOO_LONG, "long text without truncation gives %d", rc);
    CHECK(embedrag_last_error_text() == 0, "too-long text index %ld", embedrag_last_error_text());
    p.truncate = true;
    rc = embedrag_embed(m, &lt, NULL, 1, &p, out);
    CHECK(rc == 0, "long text with truncation: %s", embedrag_last_error());
    free(long_text);

    /* Empty, whitespace-only and NUL-holding texts are valid: [CLS] [SEP] plus what survives. */
    const char *odd[3] = {"", " \t\n ", "a\0b"};
    size_t odd_len[3] = {0, 4, 3};
    rc = embedrag_embed(m, odd, odd_len, 3, &p, out);
    CHECK(rc == 0, "empty/whitespace/NUL texts: %s", embedrag_last_error());
    int dim = embedrag_embed_dimension(m, &p);
    CHECK(memcmp(out, out + dim, sizeof(float) * dim) == 0, "empty and whitespace-only differ");
    for (int i = 0; i < 3 * dim; i++)
        if (!isfinite(out[i])) {
            CHECK(0, "non-finite component %d", i);
            break;
        }

    p.dimensions = -1;
    CHECK(embedrag_embed(m, odd, odd_len, 1, &p, out) == EMBEDRAG_ERR_INVALID_ARGUMENT,
          "negative dimensions accepted");
    CHECK(embedrag_embed(NULL, odd, odd_len, 1, NULL, out) == EMBEDRAG_ERR_INVALID_ARGUMENT,
          "NULL model accepted");
    embedrag_model *none = (embedrag_model *)1;
    CHECK(embedrag_model_open("/nonexistent/model", NULL, &none) != 0 && none == NULL,
          "opening a missing directory");
    CHECK(strstr(embedrag_last_error(), "/nonexistent/model") != NULL, "message names the dir: %s",
          embedrag_last_error());
    embedrag_model_close(NULL);
}

/* Embeds every fixture text (no prompts) with both models; returns the worst cosine between
 * them and counts the vectors that are not bit-identical and those below BF16_P1_COSINE. */
static double compare_models(embedrag_model *a, embedrag_model *b, const fixture *fx, int count,
                             int *not_identical, int *below_p1)
{
    size_t n = (size_t)count, dim = (size_t)fx->dim;
    float *va = malloc(sizeof(float) * n * dim), *vb = malloc(sizeof(float) * n * dim);
    embedrag_embed_params params = embedrag_embed_default_params();
    CHECK(embedrag_embed(a, (const char *const *)fx->texts, fx->lengths, n, &params, va) == 0,
          "embed: %s", embedrag_last_error());
    CHECK(embedrag_embed(b, (const char *const *)fx->texts, fx->lengths, n, &params, vb) == 0,
          "embed: %s", embedrag_last_error());
    double worst = 1;
    *not_identical = 0;
    *below_p1 = 0;
    for (size_t i = 0; i < n; i++) {
        double c = cosine(va + i * dim, vb + i * dim, (int)dim);
        if (c < worst) worst = c;
        if (c < BF16_P1_COSINE) (*below_p1)++;
        if (memcmp(va + i * dim, vb + i * dim, sizeof(float) * dim)) (*not_identical)++;
    }
    free(va);
    free(vb);
    return worst;
}

/* The opt-in bfloat16 precision: where a bf16 kernel runs (AMX or VDPBF16PS), vectors stay close
 * to our fp32 ones and are still identical alone or in any batch; elsewhere the model must say
 * it runs fp32 and give exactly the fp32 vectors. */
static void test_bf16(const char *name, embedrag_model *fp32, const fixture *fx)
{
    /* A precision the library does not know is refused before any file is read. */
    embedrag_model_params bad = embedrag_model_default_params();
    bad.precision = (embedrag_precision)7;
    embedrag_model *none = (embedrag_model *)&bad;
    int rc = embedrag_model_open("/nonexistent", &bad, &none);
    CHECK(rc == EMBEDRAG_ERR_INVALID_ARGUMENT && none == NULL &&
              strstr(embedrag_last_error(), "precision 7") != NULL,
          "unknown precision: rc %d, %s", rc, embedrag_last_error());

    embedrag_model *b2 = open_model(name, 2, EMBEDRAG_PRECISION_BF16),
                   *b1 = open_model(name, 1, EMBEDRAG_PRECISION_BF16);
    if (!b1 || !b2) goto close;
    embedrag_model_info info;
    CHECK(embedrag_model_get_info(b2, &info) == 0, "info");
    int not_identical = 0, below_p1 = 0;
    if (info.precision == EMBEDRAG_PRECISION_FP32) {
        /* The same code as the fp32 model: a sample shows it is not something else. */
        int sample = fx->n < 100 ? fx->n : 100;
        compare_models(fp32, b2, fx, sample, &not_identical, &below_p1);
        printf("%s: no bf16 kernel runs here (neither AMX-BF16 nor AVX512-BF16); bf16 falls back "
               "to fp32\n",
               name);
        CHECK(not_identical == 0, "%s: %d vectors differ from fp32 in the fp32 fallback", name,
              not_identical);
        goto close;
    }
    double worst = compare_models(fp32, b2, fx, fx->n, &not_identical, &below_p1);
    CHECK(info.precision == EMBEDRAG_PRECISION_BF16, "%s: precision %d", name, (int)info.precision);
    printf("%s bf16 (%s): worst cosine to our fp32 %.7f over %d texts\n", name, cpu_bf16_kernel(),
           worst, fx->n);
    CHECK(worst >= BF16_MIN_COSINE, "%s bf16: worst cosine to fp32 %.7f < %g", name, worst,
          BF16_MIN_COSINE);
    CHECK(below_p1 <= fx->n / 100, "%s bf16: %d of %d vectors below cosine %g to fp32", name,
          below_p1, fx->n, BF16_P1_COSINE);
    CHECK(not_identical > fx->n / 2,
          "%s bf16: only %d of %d vectors differ from fp32: is bf16 "
          "really running?",
          name, not_identical, fx->n);
    test_batch_invariance(b1, b2, fx);
close:
    embedrag_model_close(b1);
    embedrag_model_close(b2);
}

/* With EMBEDRAG_CPU_BF16 set (the ctest variant test_embed_avx512bf16), only the bf16 checks
 * run: the fp32 ones would repeat the default run's. */
static bool bf16_only;

static void run_model(const char *name)
{
    fixture fx;
    if (load_fixture(name, &fx) != 0) {
        CHECK(0, "cannot load fixture tests/fixtures/%s", name);
        return;
    }
    embedrag_model *m2 = open_model(name, 2, EMBEDRAG_PRECISION_FP32),
                   *m1 = open_model(name, 1, EMBEDRAG_PRECISION_FP32);
    if (m1 && m2 && !bf16_only) {
        test_matches_sentence_transformers(m2, name, &fx);
        test_batch_invariance(m1, m2, &fx);
        test_options(m2, &fx);
        test_bad_input(m2);
    }
    if (m1 && m2) test_bf16(name, m2, &fx);
    embedrag_model_close(m1);
    embedrag_model_close(m2);
    free_fixture(&fx);
}

int main(void)
{
    const char *forced = getenv("EMBEDRAG_CPU_BF16");
    bf16_only = forced != NULL;
    /* Forcing the VDPBF16PS kernel changes nothing where it is the default already. */
    if (forced && strcmp(forced, "avx512bf16") == 0 && !cpu_amx_available()) {
        printf("EMBEDRAG_CPU_BF16=avx512bf16 picks the default bf16 kernel here (%s): the default "
               "run tests it\n",
               cpu_bf16_kernel() ? cpu_bf16_kernel() : "none");
        return check_finish("test_embed");
    }
    run_model("all-MiniLM-L6-v2");
    run_model("minilm-l12-stacked");
    return check_finish("test_embed");
}
