/* Measures the GEMM shapes of a 384-wide BERT layer with our packed kernel, Debian's OpenBLAS
 * and oneDNN, one thread each, so the choice of GEMM stays a measured one. Built by
 * bench/gemm_compare.sh (not part of the library build: it links the libraries it compares).
 * Also checks each library's batch invariance: row 0 of an M-row product against the same row
 * computed alone (M = 1), bit for bit. On CPUs with a bfloat16 GEMM (AMX-BF16 or AVX512-BF16) it
 * does the same for the one that runs against oneDNN's bf16 matmul. */
#include "backend/cpu/kernels.h"

#include <cblas.h>
#include <dnnl.h>
#include <stdint.h>
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

/* ---- bfloat16: our bf16 GEMM (AMX or VDPBF16PS) against oneDNN's bf16 matmul (weights reordered
 * once into the layout oneDNN picks; its A is given already rounded to bf16, ours converts A
 * itself). ---- */

static uint16_t bf16_of(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

typedef struct onednn_bf16 {
    dnnl_engine_t engine;
    dnnl_stream_t stream;
    dnnl_primitive_t matmul;
    dnnl_memory_t a, w, c;
} onednn_bf16;

#define DNNL_OK(call)                                                                              \
    do {                                                                                           \
        if ((call) != dnnl_success) {                                                              \
            fprintf(stderr, "gemm_compare: %s failed\n", #call);                                   \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

/* A matmul of m rows of A16 (m x k, bf16) by W^T (W n x k, bf16) into C (m x n, f32). */
static void onednn_bf16_make(onednn_bf16 *o, int m, int n, int k, uint16_t *a16,
                             const uint16_t *w16, float *C)
{
    DNNL_OK(dnnl_engine_create(&o->engine, dnnl_cpu, 0));
    DNNL_OK(dnnl_stream_create(&o->stream, o->engine, dnnl_stream_default_flags));
    dnnl_dims_t a_dims = {m, k}, w_dims = {k, n}, c_dims = {m, n};
    dnnl_memory_desc_t a_md, w_any, w_plain, c_md;
    DNNL_OK(dnnl_memory_desc_init_by_tag(&a_md, 2, a_dims, dnnl_bf16, dnnl_ab));
    DNNL_OK(dnnl_memory_desc_init_by_tag(&w_any, 2, w_dims, dnnl_bf16, dnnl_format_tag_any));
    DNNL_OK(dnnl_memory_desc_init_by_tag(&w_plain, 2, w_dims, dnnl_bf16, dnnl_ba));
    DNNL_OK(dnnl_memory_desc_init_by_tag(&c_md, 2, c_dims, dnnl_f32, dnnl_ab));
    dnnl_matmul_desc_t desc;
    DNNL_OK(dnnl_matmul_desc_init(&desc, &a_md, &w_any, NULL, &c_md));
    dnnl_primitive_desc_t pd;
    DNNL_OK(dnnl_primitive_desc_create(&pd, &desc, NULL, o->engine, NULL));
    DNNL_OK(dnnl_primitive_create(&o->matmul, pd));
    const dnnl_memory_desc_t *w_md = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    DNNL_OK(dnnl_memory_create(&o->a, &a_md, o->engine, a16));
    DNNL_OK(dnnl_memory_create(&o->c, &c_md, o->engine, C));
    DNNL_OK(dnnl_memory_create(&o->w, w_md, o->engine, DNNL_MEMORY_ALLOCATE));
    dnnl_memory_t plain;
    DNNL_OK(dnnl_memory_create(&plain, &w_plain, o->engine, (void *)w16));
    dnnl_primitive_desc_t rpd;
    DNNL_OK(dnnl_reorder_primitive_desc_create(&rpd, &w_plain, o->engine, w_md, o->engine, NULL));
    dnnl_primitive_t reorder;
    DNNL_OK(dnnl_primitive_create(&reorder, rpd));
    dnnl_exec_arg_t args[2] = {{DNNL_ARG_FROM, plain}, {DNNL_ARG_TO, o->w}};
    DNNL_OK(dnnl_primitive_execute(reorder, o->stream, 2, args));
    DNNL_OK(dnnl_stream_wait(o->stream));
    dnnl_primitive_destroy(reorder);
    dnnl_primitive_desc_destroy(rpd);
    dnnl_memory_destroy(plain);
    dnnl_primitive_desc_destroy(pd);
}

static void onednn_bf16_run(onednn_bf16 *o)
{
    dnnl_exec_arg_t args[3] = {
        {DNNL_ARG_SRC, o->a}, {DNNL_ARG_WEIGHTS, o->w}, {DNNL_ARG_DST, o->c}};
    DNNL_OK(dnnl_primitive_execute(o->matmul, o->stream, 3, args));
    DNNL_OK(dnnl_stream_wait(o->stream));
}

static void onednn_bf16_free(onednn_bf16 *o)
{
    dnnl_primitive_destroy(o->matmul);
    dnnl_memory_destroy(o->a);
    dnnl_memory_destroy(o->w);
    dnnl_memory_destroy(o->c);
    dnnl_stream_destroy(o->stream);
    dnnl_engine_destroy(o->engine);
}

static double best_of(void (*fn)(void *), void *arg, int reps)
{
    double best = 1e30;
    fn(arg);
    for (int r = 0; r < 3; r++) {
        double t = now_seconds();
        for (int i = 0; i < reps; i++) fn(arg);
        t = (now_seconds() - t) / reps;
        if (t < best) best = t;
    }
    return best;
}

typedef struct ours_bf16 {
    int m, n, k;
    const float *A;
    const cpu_packed *packed;
    float *C;
} ours_bf16;

static void ours_bf16_run(void *arg)
{
    ours_bf16 *o = arg;
    cpu_gemm_plan plan = cpu_gemm_plan_make(o->m, o->packed, 1);
    for (int t = 0; t < cpu_gemm_plan_tasks(&plan); t++)
        cpu_gemm_task(&plan, t, o->A, (size_t)o->k, o->packed, CPU_EPILOGUE_BIAS, NULL, o->C,
                      (size_t)o->n, scratch);
}

static void onednn_bf16_call(void *arg)
{
    onednn_bf16_run(arg);
}

static void compare_bf16(const int (*shapes)[3], size_t count)
{
    printf("\nbfloat16 (%s), one thread:\n%5s %5s %5s  %10s %10s   (GFLOP/s)\n", cpu_bf16_kernel(),
           "M", "K", "N", "embedrag", "oneDNN");
    int invariant[2] = {1, 1};
    for (size_t s = 0; s < count; s++) {
        int m = shapes[s][0], k = shapes[s][1], n = shapes[s][2];
        float *A = malloc(sizeof(float) * (size_t)m * k),
              *W = malloc(sizeof(float) * (size_t)n * k);
        uint16_t *a16 = malloc(2 * (size_t)m * k), *w16 = malloc(2 * (size_t)n * k);
        float *C = malloc(sizeof(float) * (size_t)m * n), *one = malloc(sizeof(float) * (size_t)n);
        float *bias = calloc((size_t)n, sizeof(float));
        for (size_t i = 0; i < (size_t)m * k; i++) A[i] = (float)((i * 7919) % 1000) * 1e-3f - 0.5f;
        for (size_t i = 0; i < (size_t)n * k; i++)
            W[i] = (float)((i * 104729) % 1000) * 1e-3f - 0.5f;
        for (size_t i = 0; i < (size_t)m * k; i++) a16[i] = bf16_of(A[i]);
        for (size_t i = 0; i < (size_t)n * k; i++) w16[i] = bf16_of(W[i]);
        cpu_packed packed;
        const float *ws[1] = {W}, *bs[1] = {bias};
        cpu_pack_bf16(&packed, 1, ws, bs, &n, k);
        int reps = m <= 128 ? 300 : 20;
        ours_bf16 ours = {m, n, k, A, &packed, C}, ours_one = {1, n, k, A, &packed, one};
        double t_ours = best_of(ours_bf16_run, &ours, reps);
        ours_bf16_run(&ours_one);
        ours_bf16_run(&ours);
        if (memcmp(one, C, sizeof(float) * (size_t)n) != 0) invariant[0] = 0;
        onednn_bf16 dn, dn_one;
        onednn_bf16_make(&dn, m, n, k, a16, w16, C);
        onednn_bf16_make(&dn_one, 1, n, k, a16, w16, one);
        double t_dnn = best_of(onednn_bf16_call, &dn, reps);
        onednn_bf16_run(&dn_one);
        onednn_bf16_run(&dn);
        if (memcmp(one, C, sizeof(float) * (size_t)n) != 0) invariant[1] = 0;
        printf("%5d %5d %5d  %10.1f %10.1f\n", m, k, n, 2.0 * m * n * k / t_ours / 1e9,
               2.0 * m * n * k / t_dnn / 1e9);
        onednn_bf16_free(&dn);
        onednn_bf16_free(&dn_one);
        cpu_packed_free(&packed);
        free(A);
        free(W);
        free(a16);
        free(w16);
        free(C);
        free(one);
        free(bias);
    }
    printf("embedrag bf16: row 0 alone %s row 0 of the batch in every shape\n",
           invariant[0] ? "equals" : "DIFFERS from");
    printf("oneDNN bf16: row 0 alone %s row 0 of the batch in every shape\n",
           invariant[1] ? "equals" : "DIFFERS from");
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
    if (cpu_bf16_available())
        compare_bf16(shapes, sizeof shapes / sizeof *shapes);
    else
        printf("bfloat16: this CPU has neither AMX-BF16 nor AVX512-BF16, nothing to compare\n");
    free(scratch);
    return 0;
}
