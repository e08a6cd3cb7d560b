/* Checks and times the fused output product (cuda_gemm_norm, src/backend/cuda/cuda_gemm_norm.cu)
 * alone, on random data: out = LayerNorm(x W^T + bias + residual), 384 wide, against a reference
 * computed here on the host in double (the product rounded to the element type first, as the
 * kernel and the unfused path do). Prints the largest difference, where it is, and the kernel's
 * time from CUDA events over back-to-back launches after warm-up.
 *   usage: gemm_norm_check [ROWS [K [fp16|bf16]]]   (default 128000 384 fp16) */
#include "backend/cuda/cuda_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>

#define WIDTH 384

static uint64_t state = 0x9E3779B97F4A7C15ull;
static float uniform(float lo, float hi)
{
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return lo + (hi - lo) * (float)(state >> 40) / (float)(1u << 24);
}

static bool bf16;
static uint16_t to_bits(float f)
{
    if (bf16) {
        __nv_bfloat16 h = __float2bfloat16(f);
        uint16_t u;
        memcpy(&u, &h, 2);
        return u;
    }
    __half h = __float2half(f);
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
}
static float from_bits(uint16_t u)
{
    if (bf16) {
        __nv_bfloat16 h;
        memcpy(&h, &u, 2);
        return __bfloat162float(h);
    }
    __half h;
    memcpy(&h, &u, 2);
    return __half2float(h);
}

#define CHECK(call)                                                                                \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "%s: %s\n", #call, cudaGetErrorString(e_));                            \
            return 1;                                                                              \
        }                                                                                          \
    } while (0)

int main(int argc, char **argv)
{
    int rows = argc > 1 ? atoi(argv[1]) : 128000, k = argc > 2 ? atoi(argv[2]) : 384;
    bf16 = argc > 3 && !strcmp(argv[3], "bf16");
    cuda_dtype dtype = bf16 ? CUDA_DTYPE_BF16 : CUDA_DTYPE_F16;
    if (!cuda_gemm_norm_prepare(dtype, WIDTH, k)) {
        fprintf(stderr, "gemm_norm_check: the fused kernel does not take this device or shape\n");
        return 2;
    }
    std::vector<uint16_t> x((size_t)rows * k), w((size_t)WIDTH * k), bias(WIDTH),
        residual((size_t)rows * WIDTH), out((size_t)rows * WIDTH, 0xFFFF);
    std::vector<float> gamma(WIDTH), beta(WIDTH);
    float scale = 1.0f / sqrtf((float)k);
    for (auto &v : x) v = to_bits(uniform(-1, 1));
    for (auto &v : w) v = to_bits(uniform(-2 * scale, 2 * scale));
    for (auto &v : bias) v = to_bits(uniform(-0.1f, 0.1f));
    for (auto &v : residual) v = to_bits(uniform(-1, 1));
    for (int i = 0; i < WIDTH; i++) gamma[i] = uniform(0.8f, 1.2f), beta[i] = uniform(-0.1f, 0.1f);

    void *dx, *dw, *dbias, *dres, *dout;
    float *dgamma, *dbeta;
    CHECK(cudaMalloc(&dx, x.size() * 2));
    CHECK(cudaMalloc(&dw, w.size() * 2));
    CHECK(cudaMalloc(&dbias, WIDTH * 2));
    CHECK(cudaMalloc(&dres, residual.size() * 2));
    CHECK(cudaMalloc(&dout, out.size() * 2));
    CHECK(cudaMalloc(&dgamma, WIDTH * 4));
    CHECK(cudaMalloc(&dbeta, WIDTH * 4));
    CHECK(cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dw, w.data(), w.size() * 2, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dbias, bias.data(), WIDTH * 2, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dres, residual.data(), residual.size() * 2, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dout, out.data(), out.size() * 2, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dgamma, gamma.data(), WIDTH * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dbeta, beta.data(), WIDTH * 4, cudaMemcpyHostToDevice));
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    float eps = 1e-12f;
    CHECK(cuda_gemm_norm(dtype, rows, dx, k, dw, dbias, dres, dgamma, dbeta, eps, dout, sms, 0));
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaMemcpy(out.data(), dout, out.size() * 2, cudaMemcpyDeviceToHost));

    /* The reference on every row up to 4,096, else on every 61st row and the last 64. */
    double worst = 0;
    int worst_row = -1, worst_col = -1, bad_rows = 0, checked = 0;
    std::vector<double> v(WIDTH);
    for (int r = 0; r < rows; r++) {
        if (rows > 4096 && r % 61 && r < rows - 64) continue;
        checked++;
        for (int c = 0; c < WIDTH; c++) {
            double s = 0;
            for (int i = 0; i < k; i++)
                s += (double)from_bits(x[(size_t)r * k + i]) * from_bits(w[(size_t)c * k + i]);
            v[c] = from_bits(to_bits((float)(s + from_bits(bias[c])))) +
                   from_bits(residual[(size_t)r * WIDTH + c]);
        }
        double mean = 0, var = 0;
        for (int c = 0; c < WIDTH; c++) mean += v[c];
        mean /= WIDTH;
        for (int c = 0; c < WIDTH; c++) var += (v[c] - mean) * (v[c] - mean);
        double inv = 1 / sqrt(var / WIDTH + eps);
        bool bad = false;
        for (int c = 0; c < WIDTH; c++) {
            double want = (v[c] - mean) * inv * gamma[c] + beta[c];
            double got = from_bits(out[(size_t)r * WIDTH + c]);
            double diff = fabs(got - want);
            if (!(diff <= worst)) worst = diff, worst_row = r, worst_col = c;
            if (!(diff <= 0.05)) bad = true;
        }
        bad_rows += bad;
    }
    printf("gemm_norm_check %s rows %d k %d: %d rows checked, largest difference %.5f (row %d, "
           "column %d), %d rows off by more than 0.05\n",
           bf16 ? "bf16" : "fp16", rows, k, checked, worst, worst_row, worst_col, bad_rows);

    cudaEvent_t start, stop;
    CHECK(cudaEventCreate(&start));
    CHECK(cudaEventCreate(&stop));
    for (int i = 0; i < 3; i++)
        cuda_gemm_norm(dtype, rows, dx, k, dw, dbias, dres, dgamma, dbeta, eps, dout, sms, 0);
    const int runs = 20;
    CHECK(cudaEventRecord(start));
    for (int i = 0; i < runs; i++)
        cuda_gemm_norm(dtype, rows, dx, k, dw, dbias, dres, dgamma, dbeta, eps, dout, sms, 0);
    CHECK(cudaEventRecord(stop));
    CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    double us = 1000.0 * ms / runs;
    printf("gemm_norm_check %s rows %d k %d: %.1f us a call, %.0f TFLOP/s\n",
           bf16 ? "bf16" : "fp16", rows, k, us, 2.0 * rows * WIDTH * k / (us * 1e-6) / 1e12);
    return bad_rows ? 1 : 0;
}
