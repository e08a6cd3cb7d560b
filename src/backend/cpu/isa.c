/* The kernels' instruction set: chosen once from the CPU's features (the EMBEDRAG_CPU_ISA
 * override lets tests run the AVX2 and portable paths on an AVX-512 machine), and whether the
 * AMX bfloat16 GEMM can run. Computed once and read-only afterwards; the features themselves come
 * from util/cpu_features. */
#include "backend/cpu/kernels_internal.h"

#include "util/cpu_features.h"

#include <pthread.h>
#include <stdlib.h>

static int kernel_isa = -1;
static pthread_once_t kernel_isa_once = PTHREAD_ONCE_INIT;

static void choose_isa(void)
{
    const char *forced = getenv("EMBEDRAG_CPU_ISA");
    const cpu_features *f = cpu_features_get();
    bool avx2 = f->avx2 && f->fma;
    /* What AVX512_TARGET compiles for. */
    bool avx512 = f->avx512f && f->avx512dq && f->fma;
    if (forced && strcmp(forced, "generic") == 0)
        kernel_isa = CPU_ISA_GENERIC;
    else if (forced && strcmp(forced, "avx2") == 0 && avx2)
        kernel_isa = CPU_ISA_AVX2;
    else if (avx512)
        kernel_isa = CPU_ISA_AVX512;
    else if (avx2)
        kernel_isa = CPU_ISA_AVX2;
    else
        kernel_isa = CPU_ISA_GENERIC;
}

int cpu_isa(void)
{
    pthread_once(&kernel_isa_once, choose_isa);
    return kernel_isa;
}

const char *cpu_kernels_isa(void)
{
    return cpu_isa() == CPU_ISA_AVX512 ? "avx512" : cpu_isa() == CPU_ISA_AVX2 ? "avx2" : "generic";
}

bool cpu_amx_available(void)
{
    /* The AMX task rounds its rows with AVX512-BF16 and finishes them with the AVX-512 code. */
    const cpu_features *f = cpu_features_get();
    return cpu_isa() == CPU_ISA_AVX512 && f->amx_tile && f->amx_bf16 && f->avx512_bf16 &&
           f->avx512bw && cpu_features_amx_permitted();
}
