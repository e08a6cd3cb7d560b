/* Repacking weight matrices once at load into the layouts the GEMMs read (see kernels.h): fp32
 * or half-precision panels cut into k slices for the fp32 kernels, bfloat16 pairs for VDPBF16PS
 * and tile blocks for AMX; all of them in arenas of huge pages. */
#include "backend/cpu/kernels_internal.h"

#include "util/cpu_features.h"
#include "util/error.h"

#include <pthread.h>
#include <stdlib.h>
#include <sys/mman.h>

/* Bytes of one k slice of all panels: a task sweeps a slice once per micro-tile, so it should
 * stay in L2 (2 MB per core here) beside the A block. Measured one thread, 2048 x 384 x 1152:
 * slicing plus tile-outer order took the GEMM from 104 to 157-163 GFLOP/s (bench/gemm_compare). */
#define GEMM_SLICE_BYTES (1024 * 1024)
/* Slice bounds in k rows: long enough to amortize loading and storing the partial sums. */
#define GEMM_SLICE_MIN_K 64
#define GEMM_SLICE_MAX_K 384
/* The bfloat16 (VDPBF16PS) tile sums twice as fast, so its partial sums cost twice as much per
 * k step: twice the steps, the same bytes. Measured one thread, 2048 x 1536 x 384: 184-188
 * GFLOP/s with 384 steps, 186-191 with 768 (best of 40, shared machine). */
#define BF16_SLICE_MAX_K (2 * GEMM_SLICE_MAX_K)

/* Packed weights live in arenas of transparent huge pages, one matrix after the other in packing
 * order, which is the order a forward pass reads them: a query streams them from memory, and
 * with 4 KiB pages that stream took a TLB miss every 4 KiB. Measured one thread, 16 x 384 x
 * 1536 against 40 matrices (more than L3): 88-92 -> 106 GFLOP/s fp32, 172-177 -> 198-200 bf16,
 * about what the same GEMM reaches with its weights in cache; 16-token query, one thread, 6
 * layers fp32: 4.0 -> 3.5 ms. An arena is unmapped when the last matrix in it is freed; where
 * the kernel gives no huge pages the advice is ignored. */
#define PACK_HUGE_PAGE ((size_t)2 << 20)
/* Address space per arena (only the pages written take memory): a small model's matrices fit
 * in one, so at most part of one huge page is left over. */
#define PACK_ARENA_BYTES ((size_t)64 << 20)
/* Alignment of each matrix in an arena: a cache line, as the GEMMs' aligned loads need. */
#define PACK_ALIGN 64

typedef struct pack_arena {
    char *mapping, *base; /* the mapping, and its first huge-page boundary */
    size_t mapped, size, used;
    int matrices; /* matrices not yet freed */
} pack_arena;

static pthread_mutex_t arena_lock = PTHREAD_MUTEX_INITIALIZER;
static pack_arena *arena_current; /* where the next matrix goes, or NULL */

static void arena_unmap(pack_arena *a)
{
    munmap(a->mapping, a->mapped);
    free(a);
}

/* Room for `bytes`, PACK_ALIGN-aligned, from the current arena or a new one; *arena is set to
 * the arena for arena_release. Thread-safe (models may be opened on several threads). */
static void *arena_alloc(size_t bytes, pack_arena **arena)
{
    bytes = (bytes + PACK_ALIGN - 1) / PACK_ALIGN * PACK_ALIGN;
    pthread_mutex_lock(&arena_lock);
    pack_arena *a = arena_current;
    if (!a || a->size - a->used < bytes) {
        size_t size = bytes > PACK_ARENA_BYTES
                          ? (bytes + PACK_HUGE_PAGE - 1) / PACK_HUGE_PAGE * PACK_HUGE_PAGE
                          : PACK_ARENA_BYTES;
        a = calloc(1, sizeof *a);
        void *mapping = a ? mmap(NULL, size + PACK_HUGE_PAGE, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
                          : MAP_FAILED;
        if (mapping == MAP_FAILED) {
            free(a);
            pthread_mutex_unlock(&arena_lock);
            return NULL;
        }
        a->mapping = mapping;
        a->mapped = size + PACK_HUGE_PAGE;
        a->base = (char *)(((uintptr_t)mapping + PACK_HUGE_PAGE - 1) & ~(PACK_HUGE_PAGE - 1));
        a->size = size;
#ifdef MADV_HUGEPAGE
        madvise(a->base, size, MADV_HUGEPAGE);
#endif
        /* The previous arena stays mapped until its last matrix is freed. */
        arena_current = a;
    }
    void *p = a->base + a->used;
    a->used += bytes;
    a->matrices++;
    *arena = a;
    pthread_mutex_unlock(&arena_lock);
    return p;
}

static void arena_release(pack_arena *a)
{
    pthread_mutex_lock(&arena_lock);
    if (--a->matrices == 0) {
        if (a == arena_current) arena_current = NULL;
        arena_unmap(a);
    }
    pthread_mutex_unlock(&arena_lock);
}

/* fp32 -> IEEE half, rounding to nearest (exact for values that came from half precision). */
__attribute__((target("f16c"))) static uint16_t to_half(float x)
{
    return (uint16_t)_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);
}

/* k steps per slice (see cpu_packed) when a row of all panels takes row_bytes. */
static int slice_steps(size_t row_bytes, int k, int max_k)
{
    size_t fit = GEMM_SLICE_BYTES / row_bytes / 16 * 16;
    int slice_k = fit < GEMM_SLICE_MIN_K ? GEMM_SLICE_MIN_K
                  : fit > (size_t)max_k  ? max_k
                                         : (int)fit;
    return slice_k > k ? k : slice_k;
}

/* Sets out's shape and bias (zero beyond n) and allocates its weights: zeroed, 64-byte aligned,
 * k_stored steps of every panel column, of element_size bytes each. */
static int pack_start(cpu_packed *out, int count, const float *const *biases, const int *rows,
                      int k, int k_stored, size_t element_size, void **data)
{
    memset(out, 0, sizeof *out);
    int n = 0;
    for (int i = 0; i < count; i++) n += rows[i];
    int panels = (n + CPU_PANEL_WIDTH - 1) / CPU_PANEL_WIDTH;
    size_t bytes = (size_t)panels * (size_t)k_stored * CPU_PANEL_WIDTH * element_size;
    pack_arena *arena = NULL;
    float *bias = calloc((size_t)panels * CPU_PANEL_WIDTH, sizeof(float));
    *data = bias ? arena_alloc(bytes, &arena) : NULL;
    if (!*data) {
        free(bias);
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "out of memory packing a %d x %d weight", n, k);
    }
    memset(*data, 0, bytes);
    for (int i = 0, col = 0; i < count; i++)
        for (int r = 0; r < rows[i]; r++, col++) bias[col] = biases[i] ? biases[i][r] : 0.0f;
    out->n = n;
    out->k = k;
    out->panels = panels;
    out->slice_k = k;
    out->bias = bias;
    out->arena = arena;
    return 0;
}

int cpu_pack(cpu_packed *out, int count, const float *const *weights, const float *const *biases,
             const int *rows, int k, bool half)
{
    /* The half-precision tile widens with F16C's conversion, which every AVX-512 CPU has. */
    half = half && cpu_isa() == CPU_ISA_AVX512 && cpu_features_get()->f16c;
    size_t element_size = half ? sizeof(uint16_t) : sizeof(float);
    void *data;
    int rc = pack_start(out, count, biases, rows, k, k, element_size, &data);
    if (rc) return rc;
    int panels = out->panels;
    /* Only the AVX-512 tile continues partial sums across slices; the others take k whole. */
    int slice_k = k;
    if (cpu_isa() == CPU_ISA_AVX512)
        slice_k = slice_steps((size_t)panels * CPU_PANEL_WIDTH * element_size, k, GEMM_SLICE_MAX_K);
    int col = 0;
    for (int i = 0; i < count; i++) {
        for (int r = 0; r < rows[i]; r++, col++) {
            const float *src = weights[i] + (size_t)r * (size_t)k;
            for (int ks = 0; ks < k; ks += slice_k) {
                int kn = k - ks < slice_k ? k - ks : slice_k;
                size_t base = (size_t)ks * (size_t)panels * CPU_PANEL_WIDTH +
                              (size_t)(col / CPU_PANEL_WIDTH) * (size_t)kn * CPU_PANEL_WIDTH +
                              (size_t)(col % CPU_PANEL_WIDTH);
                if (half)
                    for (int kk = 0; kk < kn; kk++)
                        ((uint16_t *)data)[base + (size_t)kk * CPU_PANEL_WIDTH] =
                            to_half(src[ks + kk]);
                else
                    for (int kk = 0; kk < kn; kk++)
                        ((float *)data)[base + (size_t)kk * CPU_PANEL_WIDTH] = src[ks + kk];
            }
        }
    }
    out->slice_k = slice_k;
    if (half)
        out->data16 = data;
    else
        out->data = data;
    return 0;
}

void cpu_packed_free(cpu_packed *packed)
{
    if (!packed) return;
    if (packed->arena) arena_release(packed->arena);
    free(packed->bias);
    memset(packed, 0, sizeof *packed);
}

/* fp32 -> bfloat16, rounding to nearest even (what the GEMMs do to activations too); NaN stays a
 * quiet NaN. */
static uint16_t to_bf16(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Where step kk of column col goes in the AMX layout (see kernels.h). */
static size_t amx_index(int col, int kk, int blocks)
{
    int p = col / CPU_PANEL_WIDTH, t = col % CPU_PANEL_WIDTH / 16, j = col % 16;
    int kb = kk / 32, kp = kk % 32 / 2, e = kk % 2;
    return (((size_t)p * (size_t)blocks + (size_t)kb) * 2 + (size_t)t) * (AMX_BLOCK_ELEMENTS / 2) +
           (size_t)kp * 32 + (size_t)j * 2 + (size_t)e;
}

int cpu_pack_bf16(cpu_packed *out, int count, const float *const *weights,
                  const float *const *biases, const int *rows, int k)
{
    int kernel = cpu_bf16();
    if (kernel == CPU_BF16_NONE) {
        memset(out, 0, sizeof *out);
        return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                       "this CPU cannot run a bfloat16 GEMM (it needs AMX-BF16 or AVX512-BF16)");
    }
    bool amx = kernel == CPU_BF16_AMX;
    /* AMX multiplies blocks of 32 k steps, VDPBF16PS pairs of them; zeros pad k to either. */
    int k_pad = amx ? (k + 31) / 32 * 32 : (k + 1) / 2 * 2;
    uint16_t *data;
    int rc = pack_start(out, count, biases, rows, k, k_pad, sizeof(uint16_t), (void **)&data);
    if (rc) return rc;
    int panels = out->panels;
    /* VDPBF16PS: slices of the padded k, like the fp32 layout's, each a whole number of pairs. */
    int slice_k = amx ? k_pad
                      : slice_steps((size_t)panels * CPU_PANEL_WIDTH * sizeof(uint16_t), k_pad,
                                    BF16_SLICE_MAX_K);
    int col = 0;
    for (int i = 0; i < count; i++)
        for (int r = 0; r < rows[i]; r++, col++) {
            const float *src = weights[i] + (size_t)r * (size_t)k;
            for (int ks = 0; ks < k; ks += slice_k) {
                int kn = k_pad - ks < slice_k ? k_pad - ks : slice_k,
                    end = k < ks + kn ? k : ks + kn;
                size_t base = (size_t)ks * (size_t)panels * CPU_PANEL_WIDTH +
                              (size_t)(col / CPU_PANEL_WIDTH) * (size_t)kn * CPU_PANEL_WIDTH +
                              (size_t)(col % CPU_PANEL_WIDTH) * 2;
                for (int kk = ks; kk < end; kk++) {
                    int e = kk % 2;
                    size_t at = amx ? amx_index(col, kk, k_pad / 32)
                                    : base + (size_t)(kk - ks - e) * CPU_PANEL_WIDTH + (size_t)e;
                    data[at] = to_bf16(src[kk]);
                }
            }
        }
    out->k_pad = k_pad;
    if (amx) {
        out->data_amx = data;
    } else {
        out->slice_k = slice_k;
        out->data_bf16 = data;
    }
    return 0;
}
