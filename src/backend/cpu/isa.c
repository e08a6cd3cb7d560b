/* Which kernels run: the instruction set of the fp32 ones and which bfloat16 GEMM, chosen once
 * from the CPU's features (util/cpu_features) and read-only afterwards. EMBEDRAG_CPU_ISA and
 * EMBEDRAG_CPU_BF16 pick another where the CPU can run it, so tests reach every path that the
 * machine they run on has. */
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

static int bf16_kernel = CPU_BF16_NONE;
static pthread_once_t bf16_kernel_once = PTHREAD_ONCE_INIT;

static void choose_bf16(void)
{
    const char *forced = getenv("EMBEDRAG_CPU_BF16");
    const cpu_features *f = cpu_features_get();
    /* What the VDPBF16PS tile compiles for (BF16_TARGET) beside the AVX-512 kernels. */
    bool dot = cpu_isa() == CPU_ISA_AVX512 && f->avx512_bf16 && f->avx512bw;
    if (forced && strcmp(forced, "none") == 0)
        bf16_kernel = CPU_BF16_NONE;
    else if (forced && strcmp(forced, "avx512bf16") == 0 && dot)
        bf16_kernel = CPU_BF16_AVX512;
    else if (cpu_amx_available())
        bf16_kernel = CPU_BF16_AMX;
    else if (dot)
        bf16_kernel = CPU_BF16_AVX512;
}

int cpu_bf16(void)
{
    pthread_once(&bf16_kernel_once, choose_bf16);
    return bf16_kernel;
}

const char *cpu_bf16_kernel(void)
{
    return cpu_bf16() == CPU_BF16_AMX ? "amx" : cpu_bf16() == CPU_BF16_AVX512 ? "avx512bf16" : NULL;
}

bool cpu_bf16_available(void)
{
    return cpu_bf16() != CPU_BF16_NONE;
}
