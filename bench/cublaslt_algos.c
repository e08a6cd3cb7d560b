/* Times every algorithm cuBLASLt's heuristic offers for a BERT layer's four products, at the
 * row counts of the GPU issue's cells, beside the one the CUDA backend runs (the heuristic's
 * first). Same descriptors as src/backend/cuda/cuda_backend.c: W [N x K] row-major transposed by
 * the product, fp32 sums, bias epilogue (GELU + bias on the intermediate product), fp16 or bf16.
 * Also times the two residual products (attention output, output) with the residual added by the
 * product (beta = 1, C = the residual) instead of by the LayerNorm kernel after it.
 *
 * GPU times from CUDA events over back-to-back launches after warm-up; inputs random (the power
 * a product draws, and so the clock, depends on its data). A tool for deciding, not a test.
 *
 *   bench/cublaslt_algos.sh [--hidden 384] [--rows 5000,128000] [--dtype fp16|bf16]
 *                           [--count 32] [--reps 20] */
#include <cublasLt.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK_CUDA(x)                                                                              \
    do {                                                                                           \
        cudaError_t e_ = (x);                                                                      \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));    \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)
#define CHECK_BLAS(x)                                                                              \
    do {                                                                                           \
        cublasStatus_t s_ = (x);                                                                   \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                         \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x,                             \
                    cublasLtGetStatusString(s_));                                                  \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

#define MAX_ALGOS 64
#define WORKSPACE ((size_t)32 << 20) /* the backend's CUDA_WORKSPACE_BYTES */

enum { QKV, ATTENTION_OUT, INTERMEDIATE, OUTPUT, KINDS };
static const char *kind_names[KINDS] = {"qkv", "attention-out", "intermediate", "output"};

typedef struct {
    cublasLtHandle_t lt;
    cudaStream_t stream;
    cudaEvent_t start, stop;
    void *workspace;
    cudaDataType_t type;
    int reps;
} bench;

/* Random values in [-1, 1) as fp16 or bf16 bits (a xorshift; the values only set the power). */
static void fill_random(void *device, size_t count, cudaDataType_t type)
{
    uint16_t *host = malloc(count * sizeof *host);
    if (!host) {
        fprintf(stderr, "out of host memory\n");
        exit(1);
    }
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < count; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        float f = (float)((x >> 40) & 0xFFFF) / 32768.0f - 1.0f;
        f *= 0.5f;
        uint32_t bits;
        memcpy(&bits, &f, sizeof bits);
        if (type == CUDA_R_16BF) {
            host[i] = (uint16_t)(bits >> 16);
        } else {
            /* fp16 of a value in [-0.5, 0.5): sign, exponent rebiased, 10 mantissa bits. */
            uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
            int exponent = (int)((bits >> 23) & 0xFF) - 127 + 15;
            uint16_t mantissa = (uint16_t)((bits >> 13) & 0x3FFu);
            host[i] = exponent <= 0 ? sign : (uint16_t)(sign | (exponent << 10) | mantissa);
        }
    }
    CHECK_CUDA(cudaMemcpy(device, host, count * sizeof *host, cudaMemcpyHostToDevice));
    free(host);
}

/* Microseconds a product takes, averaged over reps launches after 3 unrecorded ones; -1 when
 * the algorithm fails to launch. */
static double time_product(bench *b, cublasLtMatmulDesc_t desc, const cublasLtMatmulAlgo_t *algo,
                           const void *w, cublasLtMatrixLayout_t wl, const void *x,
                           cublasLtMatrixLayout_t xl, const void *c, float beta, void *d,
                           cublasLtMatrixLayout_t dl)
{
    const float one = 1.0f;
    for (int i = 0; i < 3 + b->reps; i++) {
        if (i == 3) CHECK_CUDA(cudaEventRecord(b->start, b->stream));
        cublasStatus_t st = cublasLtMatmul(b->lt, desc, &one, w, wl, x, xl, &beta, c, dl, d, dl,
                                           algo, b->workspace, WORKSPACE, b->stream);
        if (st != CUBLAS_STATUS_SUCCESS) return -1.0;
    }
    CHECK_CUDA(cudaEventRecord(b->stop, b->stream));
    CHECK_CUDA(cudaEventSynchronize(b->stop));
    float ms = 0.0f;
    CHECK_CUDA(cudaEventElapsedTime(&ms, b->start, b->stop));
    return 1000.0 * ms / b->reps;
}

static void describe(const cublasLtMatmulAlgo_t *algo, char *out, size_t size)
{
    int id = 0, tile = 0, stages = 0, splitk = 0, swizzle = 0;
    uint16_t cluster = 0;
    size_t written;
    cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_ID, &id, sizeof id, &written);
    cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof tile,
                                         &written);
    cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages,
                                         sizeof stages, &written);
    cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk,
                                         sizeof splitk, &written);
    cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, &swizzle,
                                         sizeof swizzle, &written);
    cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cluster,
                                         sizeof cluster, &written);
    snprintf(out, size, "algo %d tile %d stages %d splitk %d swizzle %d cluster %u", id, tile,
             stages, splitk, swizzle, (unsigned)cluster);
}

static int parse_list(const char *s, int *out, int max)
{
    int n = 0;
    while (*s && n < max) {
        out[n++] = atoi(s);
        const char *comma = strchr(s, ',');
        if (!comma) break;
        s = comma + 1;
    }
    return n;
}

int main(int argc, char **argv)
{
    int hidden = 384, rows_list[8] = {5000, 128000}, row_counts = 2, count = 32;
    bench b = {.type = CUDA_R_16F, .reps = 20};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--hidden") && v)
            hidden = atoi(v), i++;
        else if (!strcmp(a, "--rows") && v)
            row_counts = parse_list(v, rows_list, 8), i++;
        else if (!strcmp(a, "--count") && v)
            count = atoi(v), i++;
        else if (!strcmp(a, "--reps") && v)
            b.reps = atoi(v), i++;
        else if (!strcmp(a, "--dtype") && v) {
            b.type = !strcmp(v, "bf16") ? CUDA_R_16BF : CUDA_R_16F;
            i++;
        } else {
            fprintf(stderr,
                    "usage: %s [--hidden H] [--rows M,M...] [--dtype fp16|bf16] [--count N] "
                    "[--reps R]\n",
                    argv[0]);
            return 2;
        }
    }
    if (count < 1 || count > MAX_ALGOS || hidden < 64 || b.reps < 1) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    int inter = 4 * hidden, max_rows = 0;
    for (int i = 0; i < row_counts; i++)
        if (rows_list[i] > max_rows) max_rows = rows_list[i];
    const int dims[KINDS][2] = {
        {3 * hidden, hidden}, {hidden, hidden}, {inter, hidden}, {hidden, inter}}; /* N, K */

    CHECK_BLAS(cublasLtCreate(&b.lt));
    CHECK_CUDA(cudaStreamCreate(&b.stream));
    CHECK_CUDA(cudaEventCreate(&b.start));
    CHECK_CUDA(cudaEventCreate(&b.stop));
    CHECK_CUDA(cudaMalloc(&b.workspace, WORKSPACE));
    void *w[KINDS], *bias[KINDS], *x, *d, *residual;
    for (int k = 0; k < KINDS; k++) {
        CHECK_CUDA(cudaMalloc(&w[k], (size_t)dims[k][0] * dims[k][1] * 2));
        fill_random(w[k], (size_t)dims[k][0] * dims[k][1], b.type);
        CHECK_CUDA(cudaMalloc(&bias[k], (size_t)dims[k][0] * 2));
        fill_random(bias[k], (size_t)dims[k][0], b.type);
    }
    CHECK_CUDA(cudaMalloc(&x, (size_t)max_rows * inter * 2));
    fill_random(x, (size_t)max_rows * inter, b.type);
    CHECK_CUDA(cudaMalloc(&d, (size_t)max_rows * inter * 2));
    CHECK_CUDA(cudaMalloc(&residual, (size_t)max_rows * hidden * 2));
    fill_random(residual, (size_t)max_rows * hidden, b.type);

    int version = (int)cublasLtGetVersion();
    struct cudaDeviceProp prop;
    CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
    printf("# %s, cuBLASLt %d, %s, hidden %d, up to %d candidates, %d reps\n", prop.name, version,
           b.type == CUDA_R_16BF ? "bf16" : "fp16", hidden, count, b.reps);

    for (int ri = 0; ri < row_counts; ri++) {
        int m = rows_list[ri];
        double layer_first = 0, layer_best = 0;
        for (int k = 0; k < KINDS; k++) {
            int n = dims[k][0], inner = dims[k][1];
            cublasLtMatmulDesc_t desc;
            CHECK_BLAS(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
            cublasOperation_t transpose = CUBLAS_OP_T, keep = CUBLAS_OP_N;
            cublasLtEpilogue_t epilogue =
                k == INTERMEDIATE ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_BIAS;
            CHECK_BLAS(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &transpose,
                                                      sizeof transpose));
            CHECK_BLAS(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &keep,
                                                      sizeof keep));
            CHECK_BLAS(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE,
                                                      &epilogue, sizeof epilogue));
            CHECK_BLAS(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                                      &bias[k], sizeof bias[k]));
            cublasLtMatrixLayout_t wl, xl, dl;
            CHECK_BLAS(cublasLtMatrixLayoutCreate(&wl, b.type, (uint64_t)inner, (uint64_t)n,
                                                  (int64_t)inner));
            CHECK_BLAS(cublasLtMatrixLayoutCreate(&xl, b.type, (uint64_t)inner, (uint64_t)m,
                                                  (int64_t)inner));
            CHECK_BLAS(
                cublasLtMatrixLayoutCreate(&dl, b.type, (uint64_t)n, (uint64_t)m, (int64_t)n));
            cublasLtMatmulPreference_t pref;
            CHECK_BLAS(cublasLtMatmulPreferenceCreate(&pref));
            size_t ws = WORKSPACE;
            CHECK_BLAS(cublasLtMatmulPreferenceSetAttribute(
                pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
            cublasLtMatmulHeuristicResult_t results[MAX_ALGOS];
            int found = 0;
            CHECK_BLAS(cublasLtMatmulAlgoGetHeuristic(b.lt, desc, wl, xl, dl, dl, pref, count,
                                                      results, &found));
            double flop = 2.0 * m * n * inner;
            double first = -1, best = -1;
            int best_i = -1;
            for (int i = 0; i < found; i++) {
                double us =
                    time_product(&b, desc, &results[i].algo, w[k], wl, x, xl, d, 0.0f, d, dl);
                char what[160];
                describe(&results[i].algo, what, sizeof what);
                printf("rows %6d %-13s cand %2d  %9.2f us  %6.1f TFLOP/s  %s\n", m, kind_names[k],
                       i, us, us > 0 ? flop / us / 1e6 : 0.0, what);
                if (i == 0) first = us;
                if (us > 0 && (best < 0 || us < best)) best = us, best_i = i;
            }
            if (found == 0) {
                printf("rows %6d %-13s no algorithm\n", m, kind_names[k]);
                continue;
            }
            layer_first += first;
            layer_best += best;
            printf("rows %6d %-13s first %.2f us, best %.2f us (candidate %d of %d): %.1f%% less\n",
                   m, kind_names[k], first, best, best_i, found, 100.0 * (first - best) / first);
            if (k == ATTENTION_OUT || k == OUTPUT) {
                /* The residual added by the product: C = residual, beta = 1. */
                double fused = time_product(&b, desc, &results[0].algo, w[k], wl, x, xl, residual,
                                            1.0f, d, dl);
                printf("rows %6d %-13s first with the residual as C: %.2f us (%+.2f us)\n", m,
                       kind_names[k], fused, fused - first);
            }
            cublasLtMatmulPreferenceDestroy(pref);
            cublasLtMatrixLayoutDestroy(wl);
            cublasLtMatrixLayoutDestroy(xl);
            cublasLtMatrixLayoutDestroy(dl);
            cublasLtMatmulDescDestroy(desc);
        }
        printf("rows %6d layer's four products: first %.1f us, best %.1f us (%.1f%% less)\n", m,
               layer_first, layer_best, 100.0 * (layer_first - layer_best) / layer_first);
    }
    return 0;
}
