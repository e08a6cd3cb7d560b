/* The x86 instruction-set features this project's kernels use, detected once per process and
 * read-only afterwards, counting only what both the CPU and the operating system support (the
 * OS must save the wider registers on a context switch). Shared by the CPU backend's GEMMs and,
 * later, the document store's distance kernels. */
#ifndef EMBEDRAG_UTIL_CPU_FEATURES_H
#define EMBEDRAG_UTIL_CPU_FEATURES_H

#include <stdbool.h>

typedef struct cpu_features {
    bool avx2, fma, f16c;
    bool avx512f, avx512dq, avx512bw, avx512vl;
    bool avx512_bf16;      /* VDPBF16PS and the fp32 -> bfloat16 conversions */
    bool avx512_vnni;      /* VPDPBUSD: u8 x s8 dot products into int32 (the int8 codes' scan) */
    bool avx512_vpopcntdq; /* VPOPCNTQ: popcount of 64-bit lanes (the 1-bit codes' scan) */
    /* AMX tiles and their bfloat16 multiply, with the tile state enabled by the OS. On Linux a
     * process must still ask for that state before its first tile instruction:
     * cpu_features_amx_permitted(). */
    bool amx_tile, amx_bf16;
} cpu_features;

/* This machine's features (all false on other architectures). Thread-safe; the pointer is to
 * static storage, valid for the life of the process. */
const cpu_features *cpu_features_get(void);

/* Whether this process may run AMX tile instructions: the CPU and OS support them, and (Linux)
 * the kernel granted the tile data state when asked, which happens once, on the first call.
 * Asking is kept apart from cpu_features_get because, once granted, Linux requires every
 * alternate signal stack of the process to have room for the 8 KiB tile state: only code that
 * will run tiles should ask. Thread-safe. */
bool cpu_features_amx_permitted(void);

#endif
