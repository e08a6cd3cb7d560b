/* CPU kernels against straightforward double-precision references: the GEMM with each epilogue,
 * LayerNorm, attention; and the property the engine's batch invariance rests on: a row's GEMM
 * result is bit-identical whatever the row count, its position and the thread split. */
#include "backend/cpu/kernels.h"

#include "check.h"

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static float uniform(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

static void fill(float *x, size_t n)
{
    for (size_t i = 0; i < n; i++) x[i] = uniform();
}

/* When set, GEMM weights are packed as half precision; the tests then draw weights that half
 * precision holds exactly (multiples of 1/1024 below 1), as an F16 checkpoint's are. */
static bool half;
/* When set, weights are packed for the bfloat16 GEMM that runs (AMX or VDPBF16PS), and the
 * reference rounds A and W to bfloat16 (nearest even) before summing exactly: the GEMM must then
 * agree up to its fp32 summation. */
static bool bf16;

static double round_bf16(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    uint32_t lsb = (u >> 16) & 1u;
    u = (u + 0x7FFFu + lsb) & 0xFFFF0000u;
    float r;
    memcpy(&r, &u, sizeof r);
    return r;
}

static double operand(float x)
{
    return bf16 ? round_bf16(x) : (double)x;
}

static int pack(cpu_packed *p, const float *const *ws, const float *const *bs, int *n, int k)
{
    return bf16 ? cpu_pack_bf16(p, 1, ws, bs, n, k) : cpu_pack(p, 1, ws, bs, n, k, half);
}

static void fill_weights(float *x, size_t n)
{
    fill(x, n);
    if (half)
        for (size_t i = 0; i < n; i++) x[i] = roundf(x[i] * 1024.0f) / 1024.0f;
}

/* Runs every task of the plan in order (the thread split never changes results; the pool test
 * below checks that claim separately through different plans). */
static void gemm_all(int m, const float *A, const cpu_packed *p, cpu_epilogue e, const float *R,
                     float *C, int threads)
{
    cpu_gemm_plan plan = cpu_gemm_plan_make(m, p, threads);
    float *scratch = malloc(sizeof(float) * cpu_gemm_scratch_floats(p->k));
    for (int t = cpu_gemm_plan_tasks(&plan) - 1; t >= 0; t--)
        cpu_gemm_task(&plan, t, A, (size_t)p->k, p, e, R, C, (size_t)p->n, scratch);
    free(scratch);
}

static double gelu_reference(double x)
{
    return 0.5 * x * (1.0 + erf(x / sqrt(2.0)));
}

static void test_gemm_matches_reference(int m, int n, int k, cpu_epilogue e)
{
    float *A = malloc(sizeof(float) * (size_t)m * (size_t)k);
    float *W = malloc(sizeof(float) * (size_t)n * (size_t)k);
    float *b = malloc(sizeof(float) * (size_t)n);
    float *R = malloc(sizeof(float) * (size_t)m * (size_t)n);
    float *C = malloc(sizeof(float) * (size_t)m * (size_t)n);
    fill(A, (size_t)m * (size_t)k);
    fill_weights(W, (size_t)n * (size_t)k);
    fill(b, (size_t)n);
    fill(R, (size_t)m * (size_t)n);
    cpu_packed p;
    const float *ws[1] = {W}, *bs[1] = {b};
    CHECK(pack(&p, ws, bs, &n, k) == 0, "pack");
    gemm_all(m, A, &p, e, R, C, 2);
    double worst = 0;
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double s = 0;
            for (int kk = 0; kk < k; kk++)
                s += operand(A[(size_t)i * k + kk]) * operand(W[(size_t)j * k + kk]);
            s += b[j];
            if (e == CPU_EPILOGUE_BIAS_RESIDUAL) s += R[(size_t)i * n + j];
            if (e == CPU_EPILOGUE_BIAS_GELU) s = gelu_reference(s);
            if (e == CPU_EPILOGUE_BIAS_GELU_TANH)
                s = 0.5 * s * (1.0 + tanh(sqrt(2.0 / M_PI) * (s + 0.044715 * s * s * s)));
            if (e == CPU_EPILOGUE_BIAS_RELU) s = s > 0 ? s : 0;
            double d = fabs(s - C[(size_t)i * n + j]);
            if (d > worst) worst = d;
        }
    /* float accumulation over k terms of size ~1: error grows like sqrt(k) * 6e-8 * |terms|. */
    CHECK(worst < 2e-5 * sqrt((double)k), "m=%d n=%d k=%d epilogue=%d: max error %g", m, n, k,
          (int)e, worst);
    cpu_packed_free(&p);
    free(A);
    free(W);
    free(b);
    free(R);
    free(C);
}

/* n = 800 gives 25 panels: one thread covers them all and interleaves rows, eight threads split
 * them and do not; both must agree bit for bit. */
static void test_gemm_rows_are_batch_invariant(int n)
{
    const int k = 1000, m_max = 300; /* k spans several of the GEMM's k slices */
    float *A = malloc(sizeof(float) * m_max * k), *W = malloc(sizeof(float) * n * k);
    float *b = malloc(sizeof(float) * n);
    float *alone = malloc(sizeof(float) * n), *C = malloc(sizeof(float) * m_max * n);
    fill(A, (size_t)m_max * k);
    fill_weights(W, (size_t)n * k);
    fill(b, n);
    cpu_packed p;
    const float *ws[1] = {W}, *bs[1] = {b};
    int nn = n;
    CHECK(pack(&p, ws, bs, &nn, k) == 0, "pack");
    /* The fp32 AVX-512 and the VDPBF16PS layouts are sliced along k (AMX's is not). */
    if (strcmp(cpu_kernels_isa(), "avx512") == 0 && p.data_amx == NULL)
        CHECK(p.slice_k < k, "k = %d fits one slice (%d): the test would not cover slicing", k,
              p.slice_k);
    int mismatches = 0;
    static const int ms[] = {1, 2, 13, 14, 15, 16, 29, 111, 112, 113, 300};
    static const int threads[] = {1, 2, 3, 8};
    for (size_t mi = 0; mi < sizeof ms / sizeof *ms; mi++)
        for (size_t ti = 0; ti < sizeof threads / sizeof *threads; ti++) {
            int m = ms[mi];
            gemm_all(m, A, &p, CPU_EPILOGUE_BIAS_GELU, NULL, C, threads[ti]);
            /* Each row computed alone (m = 1 from the row's own data) must match bit for bit. */
            for (int r = 0; r < m; r += (m > 20 ? 7 : 1)) {
                gemm_all(1, A + (size_t)r * k, &p, CPU_EPILOGUE_BIAS_GELU, NULL, alone, 1);
                if (memcmp(alone, C + (size_t)r * n, sizeof(float) * n) != 0) mismatches++;
            }
        }
    CHECK(mismatches == 0, "%d rows differ between a batch and alone", mismatches);
    cpu_packed_free(&p);
    free(A);
    free(W);
    free(b);
    free(alone);
    free(C);
}

static void test_layer_norm(void)
{
    float x[384], y[384], g[384], b[384];
    fill(x, 384);
    fill(g, 384);
    fill(b, 384);
    for (int i = 0; i < 384; i++) x[i] = x[i] * 3.0f + 0.5f;
    cpu_layer_norm(y, x, 384, g, b, 1e-12f);
    double mean = 0, var = 0;
    for (int i = 0; i < 384; i++) mean += x[i];
    mean /= 384;
    for (int i = 0; i < 384; i++) var += (x[i] - mean) * (x[i] - mean);
    var /= 384;
    double worst = 0;
    for (int i = 0; i < 384; i++) {
        double r = (x[i] - mean) / sqrt(var + 1e-12) * g[i] + b[i];
        if (fabs(r - y[i]) > worst) worst = fabs(r - y[i]);
    }
    CHECK(worst < 1e-5, "layer norm max error %g", worst);
}

typedef void (*attention_fn)(const float *, const float *, const float *, size_t, int, int, float,
                             float *, size_t, float *, float *);

/* One attention head against a double-precision reference. The fp32 kernel: within 2e-5. The
 * bfloat16 kernel, where it runs: against a reference that rounds as it does (queries times the
 * scale, keys, values and the exponentials rounded to bfloat16, nearest even), within
 * BF16_ATTENTION_ROUNDED of the values' range (its own fp32 sums and exponential, and the
 * occasional exponential rounded the other way); against the exact one within
 * BF16_ATTENTION_EXACT (what rounding to 8 significant bits costs on these peaky scores); and
 * never identical to fp32 in every row. */
#define BF16_ATTENTION_ROUNDED 1e-3
#define BF16_ATTENTION_EXACT 0.03
static double attention_reference(const float *qkv, size_t ld, int h, int len, int d, float scale,
                                  bool rounded, const float *out, double *p)
{
    double worst = 0;
    for (int i = 0; i < len; i++) {
        double m = -1e300, s = 0;
        for (int j = 0; j < len; j++) {
            double dot = 0;
            for (int dd = 0; dd < d; dd++) {
                float q = qkv[i * ld + dd], k = qkv[j * ld + h + dd];
                dot += rounded ? round_bf16(q * scale) * round_bf16(k) : (double)q * k * scale;
            }
            p[j] = dot;
            if (p[j] > m) m = p[j];
        }
        for (int j = 0; j < len; j++) {
            double e = exp(p[j] - m);
            s += (p[j] = rounded ? round_bf16((float)e) : e);
        }
        for (int dd = 0; dd < d; dd++) {
            double o = 0;
            for (int j = 0; j < len; j++) {
                float v = qkv[j * ld + 2 * h + dd];
                o += p[j] / s * (rounded ? round_bf16(v) : (double)v);
            }
            double e = fabs(o - out[(size_t)i * h + dd]);
            if (!(e <= worst)) worst = isnan(e) ? INFINITY : e;
        }
    }
    return worst;
}

static void test_attention_with(int len, int d, bool bf16_kernel)
{
    int h = d * 2; /* two heads side by side, we test the first */
    size_t ld = 3 * (size_t)h;
    float *qkv = malloc(sizeof(float) * (size_t)len * ld),
          *out = malloc(sizeof(float) * (size_t)len * h);
    float *scores = malloc(sizeof(float) * CPU_ATTENTION_SCORES(len));
    float *head = malloc(sizeof(float) * CPU_ATTENTION_HEAD(len, d));
    fill(qkv, (size_t)len * ld);
    for (size_t i = 0; i < (size_t)len * ld; i++) qkv[i] *= 4.0f; /* peaky softmax */
    float scale = 1.0f / sqrtf((float)d);
    attention_fn fn = bf16_kernel ? cpu_attention_head_bf16 : cpu_attention_head;
    for (size_t i = 0; i < (size_t)len * h; i++) out[i] = NAN; /* every output written */
    fn(qkv, qkv + h, qkv + 2 * h, ld, len, d, scale, out, (size_t)h, scores, head);
    double range = 0;
    for (int j = 0; j < len; j++)
        for (int dd = 0; dd < d; dd++) range = fmax(range, fabs(qkv[j * ld + 2 * h + dd]));
    double *p = malloc(sizeof(double) * len);
    double worst = attention_reference(qkv, ld, h, len, d, scale, false, out, p);
    if (!bf16_kernel || !cpu_attention_bf16_available(d)) {
        CHECK(worst < 2e-5, "attention%s len=%d d=%d max error %g", bf16_kernel ? " (bf16)" : "",
              len, d, worst);
    } else {
        double rounded = attention_reference(qkv, ld, h, len, d, scale, true, out, p);
        float *exact = malloc(sizeof(float) * (size_t)len * h);
        cpu_attention_head(qkv, qkv + h, qkv + 2 * h, ld, len, d, scale, exact, (size_t)h, scores,
                           head);
        int same = 0;
        for (int i = 0; i < len; i++)
            same += !memcmp(exact + (size_t)i * h, out + (size_t)i * h, sizeof(float) * d);
        CHECK(same < len, "bf16 attention len=%d d=%d equals fp32 in every row", len, d);
        free(exact);
        printf("bf16 attention len=%d d=%d: max error %.2e to the rounded reference, %.2e to the "
               "exact one, values within %.2f\n",
               len, d, rounded, worst, range);
        CHECK(rounded < BF16_ATTENTION_ROUNDED * range,
              "bf16 attention len=%d d=%d: max error %g to the rounded reference", len, d, rounded);
        CHECK(worst < BF16_ATTENTION_EXACT * range,
              "bf16 attention len=%d d=%d: max error %g to the exact reference", len, d, worst);
    }
    free(p);
    free(qkv);
    free(out);
    free(scores);
    free(head);
}

static void test_attention(int len, int d)
{
    test_attention_with(len, d, false);
    /* Everywhere: where the bf16 kernel cannot run, the fp32 one answers. */
    test_attention_with(len, d, true);
}

static void test_gemm_kernels(void)
{
    test_gemm_matches_reference(1, 384, 384, CPU_EPILOGUE_BIAS);
    test_gemm_matches_reference(16, 1152, 384, CPU_EPILOGUE_BIAS);
    test_gemm_matches_reference(37, 100, 97, CPU_EPILOGUE_BIAS_RESIDUAL);
    test_gemm_matches_reference(130, 1536, 384, CPU_EPILOGUE_BIAS_GELU);
    test_gemm_matches_reference(20, 384, 1536, CPU_EPILOGUE_BIAS_RESIDUAL);
    test_gemm_rows_are_batch_invariant(72);
    test_gemm_rows_are_batch_invariant(800);
    test_gemm_matches_reference(200, 800, 384, CPU_EPILOGUE_BIAS_GELU);
    test_gemm_matches_reference(3, 800, 64, CPU_EPILOGUE_BIAS_RESIDUAL);
    test_gemm_matches_reference(50, 100, 384, CPU_EPILOGUE_BIAS_GELU_TANH);
    test_gemm_matches_reference(50, 100, 384, CPU_EPILOGUE_BIAS_RELU);
}

/* The bfloat16 GEMM that runs here (EMBEDRAG_CPU_BF16 picks another where it can run: the ctest
 * variants test_kernels_avx512bf16 and test_kernels_bf16_none), or, where none can, that packing
 * for it refuses rather than pack for a crash. */
static void test_bf16_gemm(void)
{
    const char *kernel = cpu_bf16_kernel();
    float w[64 * 32] = {0}, b[64] = {0};
    const float *ws[1] = {w}, *bs[1] = {b};
    int n = 64;
    cpu_packed p;
    int rc = cpu_pack_bf16(&p, 1, ws, bs, &n, 32);
    CHECK(cpu_bf16_available() == (kernel != NULL), "cpu_bf16_available disagrees");
    if (!kernel) {
        printf("bfloat16 GEMM: none runs here; checking that packing refuses\n");
        CHECK(rc != 0 && p.data_amx == NULL && p.data_bf16 == NULL,
              "cpu_pack_bf16 packed with no bf16 kernel");
        return;
    }
    bool amx = strcmp(kernel, "amx") == 0;
    CHECK(amx || strcmp(kernel, "avx512bf16") == 0, "unknown bf16 kernel %s", kernel);
    CHECK(!amx || cpu_amx_available(), "the AMX kernel runs where AMX is not available");
    CHECK(rc == 0 && (amx ? p.data_amx != NULL : p.data_bf16 != NULL) && p.data == NULL &&
              p.data16 == NULL,
          "cpu_pack_bf16 did not pack for the %s kernel", kernel);
    cpu_packed_free(&p);
    printf("bfloat16 GEMM (%s): tested\n", kernel);
    bf16 = true;
    test_gemm_kernels();
    bf16 = false;
}

int main(void)
{
    printf("kernels: %s\n", cpu_kernels_isa());
    for (int h = 0; h < 2; h++) {
        half = h == 1;
        test_gemm_kernels();
    }
    half = false;
    test_bf16_gemm();
    test_layer_norm();
    test_attention(1, 32);
    test_attention(17, 32);
    test_attention(128, 64);
    test_attention(5, 24);
    test_attention(200, 32);
    test_attention(33, 128);
    test_attention(64, 16);
    test_attention(2, 64);
    test_attention(511, 32);
    test_attention(512, 64);
    return check_finish("test_kernels");
}
