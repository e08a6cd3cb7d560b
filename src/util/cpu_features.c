/* x86 feature detection (see cpu_features.h): CPUID says what the CPU has, XCR0 what the OS saves
 * and restores, and on Linux arch_prctl grants the AMX tile state. Bit positions are from Intel's
 * Software Developer's Manual (vol. 2A, CPUID; vol. 1, 13.3 for XCR0) and Linux's
 * arch/x86/include/uapi/asm/prctl.h. */
#include "util/cpu_features.h"

#include <pthread.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* CPUID leaf 1, ECX. */
#define CPUID1_ECX_FMA (1u << 12)
#define CPUID1_ECX_OSXSAVE (1u << 27)
#define CPUID1_ECX_AVX (1u << 28)
#define CPUID1_ECX_F16C (1u << 29)
/* CPUID leaf 7 subleaf 0, EBX, ECX and EDX. */
#define CPUID7_EBX_AVX2 (1u << 5)
#define CPUID7_EBX_AVX512F (1u << 16)
#define CPUID7_EBX_AVX512DQ (1u << 17)
#define CPUID7_EBX_AVX512BW (1u << 30)
#define CPUID7_EBX_AVX512VL (1u << 31)
#define CPUID7_ECX_AVX512_VNNI (1u << 11)
#define CPUID7_ECX_AVX512_VPOPCNTDQ (1u << 14)
#define CPUID7_EDX_AMX_BF16 (1u << 22)
#define CPUID7_EDX_AMX_TILE (1u << 24)
/* CPUID leaf 7 subleaf 1, EAX. */
#define CPUID7_1_EAX_AVX512_BF16 (1u << 5)
/* XCR0 state components the OS must enable: SSE and AVX registers; AVX-512's opmask, upper
 * halves of zmm0-15 and zmm16-31; AMX's tile configuration and tile data. */
#define XCR0_AVX ((1u << 1) | (1u << 2))
#define XCR0_AVX512 ((1u << 5) | (1u << 6) | (1u << 7))
#define XCR0_AMX ((1u << 17) | (1u << 18))
/* arch_prctl request and the state component it asks for (XTILEDATA). */
#define ARCH_REQ_XCOMP_PERM_REQUEST 0x1023
#define XFEATURE_XTILEDATA_COMPONENT 18

static cpu_features features;
static pthread_once_t features_once = PTHREAD_ONCE_INIT;
static bool amx_permitted;
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;

static void detect(void)
{
#if defined(__x86_64__) || defined(__i386__)
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, NULL) < 1) return;
    __cpuid(1, a, b, c, d);
    unsigned leaf1_ecx = c;
    /* Without OSXSAVE, XGETBV faults and the OS saves no vector state beyond SSE. */
    if (!(leaf1_ecx & CPUID1_ECX_OSXSAVE) || !(leaf1_ecx & CPUID1_ECX_AVX)) return;
    unsigned xcr0_lo, xcr0_hi;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & XCR0_AVX) != XCR0_AVX) return;
    features.fma = leaf1_ecx & CPUID1_ECX_FMA;
    features.f16c = leaf1_ecx & CPUID1_ECX_F16C;
    if (__get_cpuid_max(0, NULL) < 7) return;
    __cpuid_count(7, 0, a, b, c, d);
    unsigned max_subleaf = a, leaf7_ebx = b, leaf7_ecx = c, leaf7_edx = d;
    features.avx2 = leaf7_ebx & CPUID7_EBX_AVX2;
    if ((xcr0_lo & XCR0_AVX512) == XCR0_AVX512) {
        features.avx512f = leaf7_ebx & CPUID7_EBX_AVX512F;
        features.avx512dq = features.avx512f && (leaf7_ebx & CPUID7_EBX_AVX512DQ);
        features.avx512bw = features.avx512f && (leaf7_ebx & CPUID7_EBX_AVX512BW);
        features.avx512vl = features.avx512f && (leaf7_ebx & CPUID7_EBX_AVX512VL);
        features.avx512_vnni = features.avx512f && (leaf7_ecx & CPUID7_ECX_AVX512_VNNI);
        features.avx512_vpopcntdq = features.avx512f && (leaf7_ecx & CPUID7_ECX_AVX512_VPOPCNTDQ);
        if (features.avx512f && max_subleaf >= 1) {
            __cpuid_count(7, 1, a, b, c, d);
            features.avx512_bf16 = a & CPUID7_1_EAX_AVX512_BF16;
        }
    }
    if ((xcr0_lo & XCR0_AMX) == XCR0_AMX) {
        features.amx_tile = leaf7_edx & CPUID7_EDX_AMX_TILE;
        features.amx_bf16 = features.amx_tile && (leaf7_edx & CPUID7_EDX_AMX_BF16);
    }
#endif
}

const cpu_features *cpu_features_get(void)
{
    pthread_once(&features_once, detect);
    return &features;
}

static void request_amx(void)
{
#if defined(__linux__) && defined(SYS_arch_prctl)
    if (!cpu_features_get()->amx_tile) return;
    amx_permitted =
        syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM_REQUEST, XFEATURE_XTILEDATA_COMPONENT) == 0;
#endif
}

bool cpu_features_amx_permitted(void)
{
    pthread_once(&amx_once, request_amx);
    return amx_permitted;
}
