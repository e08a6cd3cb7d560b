/* Measures the GEMM shapes of a 384-wide BERT layer with our packed kernel, Debian's OpenBLAS
 * and oneDNN, one thread each, so the choice of GEMM stays a measured one. Built by
 * bench/gemm_compare.sh (not part of the library build: it links the libraries it compares).
 * Also checks each library's batch invariance: row 0 of an M-row product against the same row
 * computed alone (M = 1), bit for bit. */
#include "backend/cpu/kernels.h"

#include <cblas.h>
#include <dnnl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

enum { OURS, OPENBLAS, ONEDNN };

/* Per-thread GEMM scratch, sized by the library for the widest k measured. */
static float *scratch;

static void run(int which, int m, int n, int k, const float *A, const float *W,
                const cpu_packed *packed, float *C)
{
    if (which == OURS) {
        cpu_gemm_plan plan = cpu_gemm_plan_make(m, packed, 1);
        for (int t = 0; t < cpu_gemm_plan_tasks(&plan); t++)
            cpu_gemm_task(&plan, t, A, (size_t)k, packed, CPU_EPILOGUE_BIAS, NULL, C, (size_t)n,
                          scratch);
    } else if (which == OPENBLAS) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, A, k, W, k, 0.0f, C, n);
    } else {
        dnnl_sgemm('N', 'T', m, n, k, 1.0f, A, k, W, k, 0.0f, C, n);
    }
}

int main(void)
{
    scratch = malloc(sizeof(float) * cpu_gemm_scratch_floats(1536));
    static const int shapes[][3] = {{1, 384, 384},     {16, 384, 1152},   {16, 1536, 384},
                                    {16, 384, 1536},   {128, 384, 1152},  {128, 1536, 384},
                                    {2048, 384, 1152}, {2048, 384, 1536}, {2048, 1536, 384}};
    static const char *const names[] = {"embedrag", "OpenBLAS", "oneDNN"};
    printf("%5s %5s %5s  %10s %10s %10s   (GFLOP/s, one thread)\n", "M", "K", "N", names[0],
           names[1], names[2]);
    int invariant[3] = {1, 1, 1};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int m = shapes[s][0], k = shapes[s][1], n = shapes[s][2];
        float *A = malloc(sizeof(float) * (size_t)m * k),
              *W = malloc(sizeof(float) * (size_t)n * k);
        float *C = malloc(sizeof(float) * (size_t)m * n), *one = malloc(sizeof(float) * (size_t)n);
        float *bias = calloc((size_t)n, sizeof(float));
        for (size_t i = 0; i < (size_t)m * k; i++) A[i] = (float)((i * 7919) % 1000) * 1e-3f - 0.5f;
        for (size_t i = 0; i < (size_t)n * k; i++)
            W[i] = (float)((i * 104729) % 1000) * 1e-3f - 0.5f;
        cpu_packed packed;
        const float *ws[1] = {W}, *bs[1] = {bias};
        cpu_pack(&packed, 1, ws, bs, &n, k, false);
        printf("%5d %5d %5d ", m, k, n);
        for (int which = 0; which < 3; which++) {
            int reps = m <= 128 ? 300 : 10;
            double best = 1e30;
            run(which, m, n, k, A, W, &packed, C);
            for (int r = 0; r < 3; r++) {
                double t = now_seconds();
                for (int i = 0; i < reps; i++) run(which, m, n, k, A, W, &packed, C);
                t = (now_seconds() - t) / reps;
                if (t < best) best = t;
            }
            printf(" %10.1f", 2.0 * m * n * k / best / 1e9);
            run(which, 1, n, k, A, W, &packed, one);
            run(which, m, n, k, A, W, &packed, C);
            if (memcmp(one, C, sizeof(float) * (size_t)n) != 0) invariant[which] = 0;
        }
        printf("\n");
        cpu_packed_free(&packed);
        free(A);
        free(W);
        free(C);
        free(one);
        free(bias);
    }
    for (int which = 0; which < 3; which++)
        printf("%s: row 0 alone %s row 0 of the batch in every shape\n", names[which],
               invariant[which] ? "equals" : "DIFFERS from");
    free(scratch);
    return 0;
}
