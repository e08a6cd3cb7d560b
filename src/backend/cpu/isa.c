/* The kernels' instruction set: chosen once from the CPU's features (the EMBEDRAG_CPU_ISA
 * override lets tests run the AVX2 and portable paths on an AVX-512 machine), and whether the
 * AMX bfloat16 GEMM can run. Computed once and read-only afterwards. */
#include "backend/cpu/kernels_internal.h"

#include <cpuid.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

static int kernel_isa = -1;
static pthread_once_t kernel_isa_once = PTHREAD_ONCE_INIT;

static void choose_isa(void)
{
    const char *forced = getenv("EMBEDRAG_CPU_ISA");
    __builtin_cpu_init();
    bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
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

/* Linux's interface for AMX state (arch/x86/include/uapi/asm/prctl.h): a process must ask for
 * the tile data state before its first tile instruction, or that instruction faults. */
#define EMBEDRAG_ARCH_REQ_XCOMP_PERM 0x1023
#define EMBEDRAG_XFEATURE_XTILEDATA 18

static bool amx_ok;
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;

static void detect_amx(void)
{
#if defined(__linux__) && defined(SYS_arch_prctl)
    unsigned a, b, c, d;
    if (cpu_isa() != CPU_ISA_AVX512 || __get_cpuid_max(0, NULL) < 7) return;
    __cpuid_count(7, 0, a, b, c, d);
    bool amx_bf16 = d & (1u << 22), amx_tile = d & (1u << 24);
    __cpuid_count(7, 1, a, b, c, d);
    bool avx512_bf16 = a & (1u << 5);
    __cpuid(1, a, b, c, d);
    bool osxsave = c & (1u << 27);
    if (!amx_bf16 || !amx_tile || !avx512_bf16 || !osxsave) return;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return; /* the OS does not manage tile state */
    if (syscall(SYS_arch_prctl, EMBEDRAG_ARCH_REQ_XCOMP_PERM, EMBEDRAG_XFEATURE_XTILEDATA) != 0)
        return;
    amx_ok = true;
#endif
}

bool cpu_amx_available(void)
{
    pthread_once(&amx_once, detect_amx);
    return amx_ok;
}
