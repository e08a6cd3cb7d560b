/* Quantized dense search (see quant.h): codes built in two or three passes over the matrix, a
 * first stage that scans every row's codes and keeps the best of each task's rows, and rescoring
 * stages that score only the shortlist, the last one with scan.c's exact kernels. The kernels
 * compute integers (popcounts, int8 dot products), the same on every instruction set; the floats
 * made from them are computed once, by the same portable code, so the shortlist never depends on
 * the machine or the thread count either.
 *
 * Choices, measured with bench/quant_bench.c on the Zen 4 VM (2 vCPUs), 384 dimensions, 100k
 * rows, one thread, recall@10 of the bits alone (shortlist L, then exact):
 *  - the query against the bits: 4 bits per dimension against Hamming (1 bit): clustered L = 50
 *    0.94 against 0.86, uniform L = 200 0.67 against 0.35 (2 and 3 bits in between), for 0.28
 *    against 0.18 ms per 100k rows from cache; at 1M the scan streams 48 MB from memory and the
 *    difference in time shrinks, the one in recall stays. Hence QUANT_QUERY_BITS 4.
 *  - centering and the per-row factor: no difference beyond noise on the synthetic sets
 *    (clustered, uniform, and clustered with a shared direction: e.g. 0.671 / 0.664 / 0.664 at
 *    clustered L = 20 with both / no centering / no factor). Both are kept, cheap (one
 *    subtraction at build, 4 bytes a row): centering matters where dimensions carry large
 *    offsets common to all rows, which a random shared direction does not reproduce; not
 *    measured on real embeddings here.
 *  - int8: a scale per dimension over one global scale: int8 top 10 alone 0.990 / 0.985
 *    (clustered), 0.982 / 0.977 (uniform). */
#include "store/quant.h"

#include "util/cpu_features.h"
#include "util/error.h"
#include "util/memory.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define QUANT_X86 1
#include <immintrin.h>
#endif

#define QUANT_MAGIC "EMBQUANT"
#define QUANT_VERSION 1u
/* Header flag: the int8 codes are present (beside the QUANT_BUILD_* bits). */
#define QUANT_HAS_INT8 (1u << 16)
#define QUANT_KNOWN_FLAGS                                                                          \
    (QUANT_BUILD_NO_CENTER | QUANT_BUILD_NO_ROW_FACTOR | QUANT_BUILD_INT8_GLOBAL_SCALE |           \
     QUANT_HAS_INT8)
/* Arrays start on cache lines; allocations of a huge page or more start on one. */
#define QUANT_ALIGN 64
/* The bits are stored in blocks of 8 rows, word w of the 8 rows side by side (64 bytes, one
 * AVX-512 register: 8 rows' popcounts at once). Rows are scored 64 at a time (a chunk: 8 blocks,
 * one 64-bit word of an `allowed` bitmap), then selected. */
#define QUANT_BLOCK_ROWS 8
#define QUANT_CHUNK_ROWS 64
/* Int8 rows are padded to whole 64-byte lines (a zero code is stored as 128, see below). */
#define QUANT_INT8_ROW_ALIGN 64
/* A task of a scan has at least this many rows (below that the pool's wake-up costs more than
 * the rows); a rescoring task at least this many candidates. */
#define QUANT_MIN_TASK_ROWS 16384
#define QUANT_MIN_RESCORE_TASK 256
#define QUANT_MAX_QUERY_BITS 4
/* Rescoring asks for the next group of rows while it scores one: 16 float rows of 384 are 24 KB
 * (inside L1), 64 int8 rows 24 KB too. */
#define QUANT_PREFETCH_ROWS 16
#define QUANT_PREFETCH_ROWS_INT8 64

/* The saved form's header, followed by the arrays at the offsets quant_layout gives. */
typedef struct quant_header {
    char magic[8];
    uint32_t version;
    uint32_t flags; /* QUANT_BUILD_* | QUANT_HAS_INT8 */
    uint64_t n, dim;
    uint64_t shortlist;
    double calibrated_recall;
    uint64_t bytes;
    uint8_t reserved[72];
} quant_header;
_Static_assert(sizeof(quant_header) == 128, "quant_header is 128 bytes");

struct quant_codes {
    quant_header *header; /* the allocation */
    size_t n, dim;
    size_t words; /* 64-bit words of bits per row */
    size_t dim8;  /* bytes of an int8 row */
    float *mean, *scale8, *factor;
    uint64_t *bits;
    uint8_t *int8; /* NULL without int8 codes */
};

typedef struct quant_layout {
    size_t mean, scale8, factor, bits, int8, bytes;
} quant_layout;

static size_t round_up(size_t x, size_t to)
{
    return (x + to - 1) / to * to;
}

/* Offsets of the arrays for n rows of dim; false where the sizes overflow. */
static bool layout_for(size_t n, size_t dim, bool int8, quant_layout *l)
{
    size_t words = (dim + 63) / 64, dim8 = round_up(dim, QUANT_INT8_ROW_ALIGN);
    size_t blocks = (n + QUANT_BLOCK_ROWS - 1) / QUANT_BLOCK_ROWS;
    if (dim > SIZE_MAX / 16 || n > SIZE_MAX / 16 || (blocks && words > SIZE_MAX / 64 / blocks) ||
        (int8 && n && dim8 > SIZE_MAX / 2 / n))
        return false;
    l->mean = sizeof(quant_header);
    l->scale8 = round_up(l->mean + dim * sizeof(float), QUANT_ALIGN);
    l->factor = round_up(l->scale8 + dim * sizeof(float), QUANT_ALIGN);
    l->bits = round_up(l->factor + n * sizeof(float), QUANT_ALIGN);
    l->int8 = round_up(l->bits + blocks * words * QUANT_BLOCK_ROWS * sizeof(uint64_t), QUANT_ALIGN);
    l->bytes = l->int8 + (int8 ? n * dim8 : 0);
    return l->bytes >= l->int8;
}

/* The codes' pointers into an allocation whose header is filled. */
static void point_into(quant_codes *c)
{
    quant_layout l = {0};
    c->n = c->header->n;
    c->dim = c->header->dim;
    c->words = (c->dim + 63) / 64;
    c->dim8 = round_up(c->dim, QUANT_INT8_ROW_ALIGN);
    bool int8 = c->header->flags & QUANT_HAS_INT8;
    layout_for(c->n, c->dim, int8, &l);
    char *base = (char *)c->header;
    c->mean = (float *)(base + l.mean);
    c->scale8 = (float *)(base + l.scale8);
    c->factor = (float *)(base + l.factor);
    c->bits = (uint64_t *)(base + l.bits);
    c->int8 = int8 ? (uint8_t *)(base + l.int8) : NULL;
}

/* An allocation of `bytes`, on huge pages where it is large (the scans stream it). */
static void *allocate(size_t bytes)
{
    if (bytes >= MEMORY_HUGE_PAGE_BYTES)
        return memory_alloc_huge(round_up(bytes, MEMORY_HUGE_PAGE_BYTES));
    void *p = NULL;
    return posix_memalign(&p, QUANT_ALIGN, round_up(bytes, QUANT_ALIGN)) == 0 ? p : NULL;
}

/* ---- instruction set ------------------------------------------------------------------------ */

static int chosen_isa = QUANT_ISA_GENERIC;
static pthread_once_t chosen_isa_once = PTHREAD_ONCE_INIT;

bool quant_isa_supported(int isa)
{
    const cpu_features *f = cpu_features_get();
    switch (isa) {
    case QUANT_ISA_AUTO:
    case QUANT_ISA_GENERIC:
        return true;
    case QUANT_ISA_AVX2:
        return scan_isa_supported(SCAN_ISA_AVX2);
    case QUANT_ISA_AVX512:
        return scan_isa_supported(SCAN_ISA_AVX512) && f->avx512bw;
    case QUANT_ISA_AVX512_VNNI:
        return quant_isa_supported(QUANT_ISA_AVX512) && f->avx512_vnni && f->avx512_vpopcntdq;
    default:
        return false;
    }
}

static void choose_isa(void)
{
    const char *forced = getenv("EMBEDRAG_CPU_ISA");
    int widest = QUANT_ISA_AVX512_VNNI;
    if (forced && strcmp(forced, "generic") == 0)
        widest = QUANT_ISA_GENERIC;
    else if (forced && strcmp(forced, "avx2") == 0)
        widest = QUANT_ISA_AVX2;
    else if (forced && strcmp(forced, "avx512") == 0)
        widest = QUANT_ISA_AVX512;
    while (widest > QUANT_ISA_GENERIC && !quant_isa_supported(widest)) widest--;
    chosen_isa = widest;
}

int quant_isa(void)
{
    pthread_once(&chosen_isa_once, choose_isa);
    return chosen_isa;
}

const char *quant_isa_name(int isa)
{
    switch (isa) {
    case QUANT_ISA_AUTO:
        return "auto";
    case QUANT_ISA_GENERIC:
        return "generic";
    case QUANT_ISA_AVX2:
        return "avx2";
    case QUANT_ISA_AVX512:
        return "avx512";
    case QUANT_ISA_AVX512_VNNI:
        return "avx512vnni";
    default:
        return "unknown";
    }
}

/* The exact kernels that go with a quantized set. */
static int scan_isa_for(int isa)
{
    return isa == QUANT_ISA_GENERIC ? SCAN_ISA_GENERIC
           : isa == QUANT_ISA_AVX2  ? SCAN_ISA_AVX2
                                    : SCAN_ISA_AVX512;
}

/* ---- kernels -------------------------------------------------------------------------------- */

/* Bits: for each row of n_blocks blocks, pc = popcount(row bits) and dot = sum over planes j of
 * 2^j popcount(plane j AND row bits); planes are query_bits x words words. */
typedef void (*quant_bits_fn)(const uint64_t *blocks, size_t n_blocks, size_t words,
                              const uint64_t *planes, int query_bits, int32_t *pc, int32_t *dot);

/* Int8: out[i] = sum over e < dim8 of codes[index[i] * dim8 + e] (unsigned) * q8[e] (signed);
 * q16 is q8 widened, for the kernels that multiply 16-bit lanes. */
typedef void (*quant_int8_fn)(const uint8_t *codes, size_t dim8, const size_t *index, size_t count,
                              const int8_t *q8, const int16_t *q16, int32_t *out);

static void bits_generic(const uint64_t *blocks, size_t n_blocks, size_t words,
                         const uint64_t *planes, int query_bits, int32_t *pc, int32_t *dot)
{
    for (size_t b = 0; b < n_blocks; b++)
        for (int r = 0; r < QUANT_BLOCK_ROWS; r++) {
            int32_t p = 0, d = 0;
            for (size_t w = 0; w < words; w++) {
                uint64_t x = blocks[(b * words + w) * QUANT_BLOCK_ROWS + (size_t)r];
                p += __builtin_popcountll(x);
                for (int j = 0; j < query_bits; j++)
                    d += __builtin_popcountll(x & planes[(size_t)j * words + w]) << j;
            }
            pc[b * QUANT_BLOCK_ROWS + (size_t)r] = p;
            dot[b * QUANT_BLOCK_ROWS + (size_t)r] = d;
        }
}

static void int8_generic(const uint8_t *codes, size_t dim8, const size_t *index, size_t count,
                         const int8_t *q8, const int16_t *q16, int32_t *out)
{
    for (size_t i = 0; i < count; i++) {
        const uint8_t *x = codes + index[i] * dim8;
        int32_t s = 0;
        for (size_t e = 0; e < dim8; e++) s += (int32_t)x[e] * q8[e];
        out[i] = s;
    }
}

#ifdef QUANT_X86
#define QUANT_AVX2_TARGET __attribute__((target("avx2,fma")))
#define QUANT_AVX512_TARGET __attribute__((target("avx512f,avx512dq,avx512bw")))
#define QUANT_VNNI_TARGET                                                                          \
    __attribute__((target("avx512f,avx512dq,avx512bw,avx512vnni,avx512vpopcntdq")))
#define QUANT_INLINE static inline __attribute__((always_inline))

/* Popcounts of 64-bit lanes by a 16-entry lookup of each nibble (no VPOPCNTQ). */
QUANT_INLINE QUANT_AVX2_TARGET __m256i popcount64_avx2(__m256i v)
{
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2,
                                         1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256i c =
        _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(v, low)),
                        _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low)));
    return _mm256_sad_epu8(c, _mm256_setzero_si256());
}

QUANT_INLINE QUANT_AVX512_TARGET __m512i popcount64_avx512(__m512i v)
{
    const __m512i lut =
        _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4));
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512i c =
        _mm512_add_epi8(_mm512_shuffle_epi8(lut, _mm512_and_si512(v, low)),
                        _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), low)));
    return _mm512_sad_epu8(c, _mm512_setzero_si512());
}

/* One block's 8 rows in two registers of 4 lanes. */
QUANT_INLINE QUANT_AVX2_TARGET void bits_avx2_fixed(const int B, const uint64_t *blocks,
                                                    size_t n_blocks, size_t words,
                                                    const uint64_t *planes, int32_t *pc,
                                                    int32_t *dot)
{
    for (size_t b = 0; b < n_blocks; b++) {
        const uint64_t *x = blocks + b * words * QUANT_BLOCK_ROWS;
        __m256i p[2], acc[2][QUANT_MAX_QUERY_BITS];
        for (int h = 0; h < 2; h++) {
            p[h] = _mm256_setzero_si256();
            for (int j = 0; j < B; j++) acc[h][j] = _mm256_setzero_si256();
        }
        for (size_t w = 0; w < words; w++)
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(x + w * QUANT_BLOCK_ROWS + 4 * h));
                p[h] = _mm256_add_epi64(p[h], popcount64_avx2(v));
#pragma GCC unroll 4
                for (int j = 0; j < B; j++) {
                    __m256i m = _mm256_set1_epi64x((long long)planes[(size_t)j * words + w]);
                    acc[h][j] =
                        _mm256_add_epi64(acc[h][j], popcount64_avx2(_mm256_and_si256(v, m)));
                }
            }
        for (int h = 0; h < 2; h++) {
            __m256i d = acc[h][0];
            for (int j = 1; j < B; j++) d = _mm256_add_epi64(d, _mm256_slli_epi64(acc[h][j], j));
            int64_t pl[4], dl[4];
            _mm256_storeu_si256((__m256i *)pl, p[h]);
            _mm256_storeu_si256((__m256i *)dl, d);
            for (int r = 0; r < 4; r++) {
                pc[b * QUANT_BLOCK_ROWS + (size_t)(4 * h + r)] = (int32_t)pl[r];
                dot[b * QUANT_BLOCK_ROWS + (size_t)(4 * h + r)] = (int32_t)dl[r];
            }
        }
    }
}

/* One block's 8 rows in one register; POPCNT is popcount64_avx512 or VPOPCNTQ. */
#define QUANT_BITS_AVX512_BODY(POPCNT)                                                             \
    for (size_t b = 0; b < n_blocks; b++) {                                                        \
        const uint64_t *x = blocks + b * words * QUANT_BLOCK_ROWS;                                 \
        __m512i p = _mm512_setzero_si512(), acc[QUANT_MAX_QUERY_BITS];                             \
        for (int j = 0; j < B; j++) acc[j] = _mm512_setzero_si512();                               \
        for (size_t w = 0; w < words; w++) {                                                       \
            __m512i v = _mm512_loadu_si512(x + w * QUANT_BLOCK_ROWS);                              \
            p = _mm512_add_epi64(p, POPCNT(v));                                                    \
            _Pragma("GCC unroll 4") for (int j = 0; j < B; j++) acc[j] = _mm512_add_epi64(         \
                acc[j], POPCNT(_mm512_and_si512(                                                   \
                            v, _mm512_set1_epi64((long long)planes[(size_t)j * words + w]))));     \
        }                                                                                          \
        __m512i d = acc[0];                                                                        \
        for (int j = 1; j < B; j++) d = _mm512_add_epi64(d, _mm512_slli_epi64(acc[j], j));         \
        _mm256_storeu_si256((__m256i *)(pc + b * QUANT_BLOCK_ROWS), _mm512_cvtepi64_epi32(p));     \
        _mm256_storeu_si256((__m256i *)(dot + b * QUANT_BLOCK_ROWS), _mm512_cvtepi64_epi32(d));    \
    }

QUANT_INLINE QUANT_AVX512_TARGET void
bits_avx512_fixed(const int B, const uint64_t *blocks, size_t n_blocks, size_t words,
                  const uint64_t *planes, int32_t *pc,
                  int32_t *dot){QUANT_BITS_AVX512_BODY(popcount64_avx512)}

QUANT_INLINE QUANT_VNNI_TARGET
    void bits_vnni_fixed(const int B, const uint64_t *blocks, size_t n_blocks, size_t words,
                         const uint64_t *planes, int32_t *pc,
                         int32_t *dot){QUANT_BITS_AVX512_BODY(_mm512_popcnt_epi64)}

/* The kernels for each query width, the width a constant inside (registers for its planes). */
#define QUANT_BITS_DISPATCH(NAME, TARGET, FIXED)                                                   \
    TARGET static void NAME(const uint64_t *blocks, size_t n_blocks, size_t words,                 \
                            const uint64_t *planes, int query_bits, int32_t *pc, int32_t *dot)     \
    {                                                                                              \
        switch (query_bits) {                                                                      \
        case 1:                                                                                    \
            FIXED(1, blocks, n_blocks, words, planes, pc, dot);                                    \
            break;                                                                                 \
        case 2:                                                                                    \
            FIXED(2, blocks, n_blocks, words, planes, pc, dot);                                    \
            break;                                                                                 \
        case 3:                                                                                    \
            FIXED(3, blocks, n_blocks, words, planes, pc, dot);                                    \
            break;                                                                                 \
        default:                                                                                   \
            FIXED(4, blocks, n_blocks, words, planes, pc, dot);                                    \
            break;                                                                                 \
        }                                                                                          \
    }
QUANT_BITS_DISPATCH(bits_avx2, QUANT_AVX2_TARGET, bits_avx2_fixed)
    QUANT_BITS_DISPATCH(bits_avx512, QUANT_AVX512_TARGET, bits_avx512_fixed)
        QUANT_BITS_DISPATCH(bits_vnni, QUANT_VNNI_TARGET, bits_vnni_fixed)

    /* Unsigned bytes widened to 16 bits against the widened query, pairs summed into 32 bits
     * (VPMADDWD: exact, where VPMADDUBSW would saturate 255 * 127 * 2). */
    QUANT_AVX2_TARGET
    static void int8_avx2(const uint8_t *codes, size_t dim8, const size_t *index, size_t count,
                          const int8_t *q8, const int16_t *q16, int32_t *out)
{
    for (size_t i = 0; i < count; i++) {
        const uint8_t *x = codes + index[i] * dim8;
        __m256i acc = _mm256_setzero_si256();
        for (size_t e = 0; e < dim8; e += 16) {
            __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(x + e)));
            acc = _mm256_add_epi32(
                acc, _mm256_madd_epi16(v, _mm256_loadu_si256((const __m256i *)(q16 + e))));
        }
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
        out[i] = _mm_cvtsi128_si32(s);
    }
}

QUANT_AVX512_TARGET static void int8_avx512(const uint8_t *codes, size_t dim8, const size_t *index,
                                            size_t count, const int8_t *q8, const int16_t *q16,
                                            int32_t *out)
{
    for (size_t i = 0; i < count; i++) {
        const uint8_t *x = codes + index[i] * dim8;
        __m512i acc = _mm512_setzero_si512();
        for (size_t e = 0; e < dim8; e += 32) {
            __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(x + e)));
            acc = _mm512_add_epi32(acc, _mm512_madd_epi16(v, _mm512_loadu_si512(q16 + e)));
        }
        out[i] = _mm512_reduce_add_epi32(acc);
    }
}

QUANT_VNNI_TARGET static void int8_vnni(const uint8_t *codes, size_t dim8, const size_t *index,
                                        size_t count, const int8_t *q8, const int16_t *q16,
                                        int32_t *out)
{
    for (size_t i = 0; i < count; i++) {
        const uint8_t *x = codes + index[i] * dim8;
        __m512i acc = _mm512_setzero_si512();
        for (size_t e = 0; e < dim8; e += 64)
            acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(x + e), _mm512_loadu_si512(q8 + e));
        out[i] = _mm512_reduce_add_epi32(acc);
    }
}
#endif

static quant_bits_fn bits_for(int isa)
{
#ifdef QUANT_X86
    if (isa == QUANT_ISA_AVX512_VNNI) return bits_vnni;
    if (isa == QUANT_ISA_AVX512) return bits_avx512;
    if (isa == QUANT_ISA_AVX2) return bits_avx2;
#endif
    return bits_generic;
}

static quant_int8_fn int8_for(int isa)
{
#ifdef QUANT_X86
    if (isa == QUANT_ISA_AVX512_VNNI) return int8_vnni;
    if (isa == QUANT_ISA_AVX512) return int8_avx512;
    if (isa == QUANT_ISA_AVX2) return int8_avx2;
#endif
    return int8_generic;
}

/* ---- queries -------------------------------------------------------------------------------- */

/* A query encoded for the codes. Against the bits, dimension d's value is approximated by one of
 * 2^B odd levels, q_d ~ step * (2 u_d - M) with u_d in [0, M], M = 2^B - 1, and a row's signs are
 * s_d = 2 b_d - 1, so over the D real dimensions
 *   sum_d (2 u_d - M)(2 b_d - 1) = 4 I - 2 M pc + (M D - 2 U),
 * I = sum_d u_d b_d (the planes' popcounts), pc = sum_d b_d, U = sum_d u_d: an integer, exact,
 * the same on every instruction set. */
typedef struct quant_query {
    int query_bits;
    uint64_t *planes; /* query_bits x words */
    int32_t levels;   /* M */
    int32_t constant; /* M D - 2 U */
    int8_t *q8;       /* dim8: round(q_d scale8_d / step8), 0 past dim */
    int16_t *q16;
    int32_t q8_sum;
    bool finite;
} quant_query;

static void query_free(quant_query *q)
{
    free(q->planes);
    free(q->q8);
    free(q->q16);
}

static int query_encode(const quant_codes *c, const float *query, int query_bits, bool int8,
                        quant_query *q)
{
    memset(q, 0, sizeof *q);
    q->query_bits = query_bits;
    q->planes = calloc((size_t)query_bits * c->words, sizeof(uint64_t));
    if (int8) {
        q->q8 = calloc(c->dim8, 1);
        q->q16 = calloc(c->dim8, sizeof(int16_t));
    }
    if (!q->planes || (int8 && (!q->q8 || !q->q16))) {
        query_free(q);
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "quant_search: out of memory for a query");
    }
    float most = 0, most8 = 0;
    q->finite = true;
    for (size_t d = 0; d < c->dim; d++) {
        if (!isfinite(query[d])) q->finite = false;
        float a = fabsf(query[d]), a8 = fabsf(query[d] * c->scale8[d]);
        most = a > most ? a : most;
        most8 = a8 > most8 ? a8 : most8;
    }
    if (!q->finite) return 0;
    int32_t levels = (1 << query_bits) - 1, sum = 0;
    float inverse = most > 0 ? (float)levels / most : 0.0f;
    for (size_t d = 0; d < c->dim; d++) {
        /* (level + M) / 2 rounded, level = q_d / step in [-M, M]. */
        int32_t u = (int32_t)floorf((query[d] * inverse + (float)levels) * 0.5f + 0.5f);
        u = u < 0 ? 0 : u > levels ? levels : u;
        sum += u;
        for (int j = 0; j < query_bits; j++)
            if ((u >> j) & 1) q->planes[(size_t)j * c->words + d / 64] |= 1ull << (d % 64);
    }
    q->levels = levels;
    q->constant = levels * (int32_t)c->dim - 2 * sum;
    if (int8) {
        float inverse8 = most8 > 0 ? 127.0f / most8 : 0.0f;
        for (size_t d = 0; d < c->dim; d++) {
            float v = query[d] * c->scale8[d] * inverse8;
            int32_t r = (int32_t)floorf(v + 0.5f);
            r = r < -127 ? -127 : r > 127 ? 127 : r;
            q->q8[d] = (int8_t)r;
            q->q16[d] = (int16_t)r;
            q->q8_sum += r;
        }
    }
    return 0;
}

/* ---- the first stage: every row's codes, the best `cap` per task ----------------------------- */

/* The order of results, as scan.c's: higher score first, then lower row. */
static inline bool ranks_before(scan_hit a, scan_hit b)
{
    /* Bitwise, not short-circuit: no branch (select_best's partition depends on it). */
    return (a.score > b.score) | ((a.score == b.score) & (a.row < b.row));
}

typedef struct first_job {
    const quant_codes *codes;
    const quant_query *query;
    const uint8_t *allowed;
    bool int8; /* the first stage scans the int8 codes (QUANT_MODE_INT8) */
    quant_bits_fn bits;
    quant_int8_fn int8_dots;
    size_t chunks; /* of QUANT_CHUNK_ROWS rows */
    int tasks;
    /* Selection: the best cap of each task (see first_task). */
    size_t cap;
    scan_hit *heaps; /* [task][2 cap] */
    size_t *sizes;   /* [task] */
    /* Or, at calibration, ranks: counts[task][j] = rows ranking before targets[j] (sorted best
     * first). */
    const scan_hit *targets;
    int n_targets;
    size_t *counts;
} first_job;

static size_t range_begin(size_t n, int tasks, int t)
{
    size_t per = n / (size_t)tasks, extra = n % (size_t)tasks;
    return per * (size_t)t + ((size_t)t < extra ? (size_t)t : extra);
}

/* Estimates of rows [row0, row0 + count), count <= QUANT_CHUNK_ROWS, row0 a multiple of it. Bits:
 * factor * (4 I - 2 M pc + constant), the factor NaN for rows that are not finite. Int8: the
 * integer dot product (exact as a float up to 2^24, dim <= 1040 at full scale). */
static void estimate_chunk(const first_job *job, size_t row0, size_t count, float *estimates)
{
    const quant_codes *c = job->codes;
    const quant_query *q = job->query;
    int32_t a[QUANT_CHUNK_ROWS], b[QUANT_CHUNK_ROWS];
    if (job->int8) {
        size_t index[QUANT_CHUNK_ROWS] = {0};
        for (size_t i = 0; i < count; i++) index[i] = row0 + i;
        job->int8_dots(c->int8, c->dim8, index, count, q->q8, q->q16, a);
        for (size_t i = 0; i < count; i++)
            estimates[i] = isnan(c->factor[row0 + i]) ? NAN : (float)(a[i] - 128 * q->q8_sum);
        return;
    }
    size_t blocks = (count + QUANT_BLOCK_ROWS - 1) / QUANT_BLOCK_ROWS;
    job->bits(c->bits + row0 / QUANT_BLOCK_ROWS * c->words * QUANT_BLOCK_ROWS, blocks, c->words,
              q->planes, q->query_bits, a, b);
    for (size_t i = 0; i < count; i++)
        estimates[i] = c->factor[row0 + i] * (float)(4 * b[i] - 2 * q->levels * a[i] + q->constant);
}

/* Rows of a chunk that may be returned, as bits of a word. */
static uint64_t chunk_mask(const uint8_t *allowed, size_t row0, size_t count)
{
    uint64_t mask = count == 64 ? ~0ull : (1ull << count) - 1;
    if (!allowed) return mask;
    uint64_t word = 0;
    size_t bytes = (count + 7) / 8;
    memcpy(&word, allowed + row0 / 8, bytes); /* little-endian: row0 + i is bit i */
    return word & mask;
}

/* Moves the best `keep` of a[0 .. len) (in ranks_before order) to a[0 .. keep), in no order:
 * quickselect with a median-of-three pivot. Rows are distinct, so the order is total and the
 * set kept is unique, whatever order the entries came in. */
static void select_best(scan_hit *a, size_t len, size_t keep)
{
    size_t lo = 0, hi = len;
    while (lo < keep && keep < hi && hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2, last = hi - 1;
        /* Median of a[lo], a[mid], a[last] into a[last]. */
        scan_hit t;
        if (ranks_before(a[mid], a[lo])) t = a[mid], a[mid] = a[lo], a[lo] = t;
        if (ranks_before(a[last], a[lo])) t = a[last], a[last] = a[lo], a[lo] = t;
        if (ranks_before(a[mid], a[last])) t = a[mid], a[mid] = a[last], a[last] = t;
        scan_hit pivot = a[last];
        size_t store = lo;
        /* Without a branch: the shortlist's estimates are in random order, and a mispredicted
         * compare per entry made this partition cost more than the bit scan (perf, 1M uniform
         * rows, a shortlist of 31k). [store, i) never ranks before the pivot, so the swap is
         * harmless where a[i] does not either. */
        for (size_t i = lo; i < last; i++) {
            bool before = ranks_before(a[i], pivot);
            t = a[i], a[i] = a[store], a[store] = t;
            store += before;
        }
        a[last] = a[store];
        a[store] = pivot;
        if (keep <= store)
            hi = store;
        else
            lo = store + 1;
    }
}

/* The worst of a[0 .. len), len >= 1. */
static scan_hit worst_of(const scan_hit *a, size_t len)
{
    scan_hit w = a[0];
    for (size_t i = 1; i < len; i++)
        if (ranks_before(w, a[i])) w = a[i];
    return w;
}

/* Keeps the best `cap` of the estimates offered in a buffer of 2 cap: estimates at least the
 * threshold are appended, and a full buffer is cut back to its best cap by select_best, whose
 * worst becomes the threshold. Appending costs O(1) where a heap of cap costs O(log cap) per
 * offer: a bounded heap took as long as the bit kernel itself at a shortlist of 1,000 (perf,
 * 100k rows). */
static void first_task(void *ctx, int task, int thread)
{
    const first_job *job = ctx;
    size_t n = job->codes->n;
    size_t begin = range_begin(job->chunks, job->tasks, task);
    size_t end = range_begin(job->chunks, job->tasks, task + 1);
    scan_hit *kept = job->heaps ? job->heaps + (size_t)task * 2 * job->cap : NULL;
    size_t size = 0;
    size_t *counts = job->counts ? job->counts + (size_t)task * (size_t)job->n_targets : NULL;
    float threshold = -INFINITY;
    float estimates[QUANT_CHUNK_ROWS];
    for (size_t chunk = begin; chunk < end; chunk++) {
        size_t row0 = chunk * QUANT_CHUNK_ROWS;
        size_t count = n - row0 < QUANT_CHUNK_ROWS ? n - row0 : QUANT_CHUNK_ROWS;
        uint64_t mask = chunk_mask(job->allowed, row0, count);
        if (!mask) continue;
        estimate_chunk(job, row0, count, estimates);
        if (counts) {
            /* targets are sorted best first: the last is the easiest to rank before. */
            scan_hit last = job->targets[job->n_targets - 1];
            for (; mask; mask &= mask - 1) {
                size_t i = (size_t)__builtin_ctzll(mask);
                scan_hit h = {row0 + i, estimates[i]};
                if (!ranks_before(h, last)) continue;
                for (int j = 0; j < job->n_targets; j++)
                    if (ranks_before(h, job->targets[j])) counts[j]++;
            }
            continue;
        }
        /* NaN fails >= and is never kept. */
        uint64_t good = 0;
        for (size_t i = 0; i < count; i++) good |= (uint64_t)(estimates[i] >= threshold) << i;
        for (mask &= good; mask; mask &= mask - 1) {
            size_t i = (size_t)__builtin_ctzll(mask);
            kept[size++] = (scan_hit){row0 + i, estimates[i]};
            if (size == 2 * job->cap) {
                select_best(kept, size, job->cap);
                size = job->cap;
                threshold = worst_of(kept, size).score;
            }
        }
    }
    if (kept && size > job->cap) {
        select_best(kept, size, job->cap);
        size = job->cap;
    }
    if (job->sizes) job->sizes[task] = size;
}

static void run_tasks(threadpool *pool, int tasks, threadpool_fn fn, void *ctx)
{
    if (pool && tasks > 1)
        threadpool_run(pool, tasks, fn, ctx);
    else
        for (int t = 0; t < tasks; t++) fn(ctx, t, 0);
}

static int task_count(size_t items, size_t min_per_task, threadpool *pool)
{
    int threads = pool ? threadpool_threads(pool) : 1;
    size_t most = items / min_per_task;
    if ((size_t)threads > most) return most < 1 ? 1 : (int)most;
    return threads;
}

/* The first stage: the best `cap` allowed rows by estimate, into out (room for tasks * cap...
 * returned through *shortlist, malloc'd) and *count. */
static int first_stage(const quant_codes *c, const quant_query *q, const uint8_t *allowed,
                       bool int8, int isa, threadpool *pool, size_t cap, size_t **shortlist,
                       size_t *count)
{
    first_job job = {.codes = c,
                     .query = q,
                     .allowed = allowed,
                     .int8 = int8,
                     .bits = bits_for(isa),
                     .int8_dots = int8_for(isa),
                     .chunks = (c->n + QUANT_CHUNK_ROWS - 1) / QUANT_CHUNK_ROWS,
                     .cap = cap};
    job.tasks = task_count(c->n, QUANT_MIN_TASK_ROWS, pool);
    job.heaps = malloc((size_t)job.tasks * 2 * cap * sizeof(scan_hit));
    job.sizes = calloc((size_t)job.tasks, sizeof(size_t));
    *shortlist = NULL;
    int rc = 0;
    if (!job.heaps || !job.sizes) {
        rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "quant_search: out of memory for a shortlist of %zu",
                     cap);
        goto done;
    }
    run_tasks(pool, job.tasks, first_task, &job);
    /* The tasks' heaps side by side, then the best cap of them. */
    size_t total = job.sizes[0];
    for (int t = 1; t < job.tasks; t++) {
        memmove(job.heaps + total, job.heaps + (size_t)t * 2 * cap,
                job.sizes[t] * sizeof(scan_hit));
        total += job.sizes[t];
    }
    if (total > cap) {
        select_best(job.heaps, total, cap);
        total = cap;
    }
    *shortlist = malloc((total ? total : 1) * sizeof(size_t));
    if (!*shortlist) {
        rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "quant_search: out of memory");
        goto done;
    }
    for (size_t i = 0; i < total; i++) (*shortlist)[i] = job.heaps[i].row;
    *count = total;
done:
    free(job.heaps);
    free(job.sizes);
    return rc;
}

/* ---- rescoring ------------------------------------------------------------------------------ */

typedef struct rescore_job {
    const quant_codes *codes;
    const quant_query *query;
    const float *rows;
    const float *query_floats;
    const size_t *index;
    size_t count;
    int tasks;
    bool exact; /* scan.c's kernels, else the int8 codes */
    int scan_isa;
    quant_int8_fn int8_dots;
    float *scores;
} rescore_job;

/* Asks for the rows of index[0 .. count) (each `bytes` long at base + row * stride): shortlist
 * rows are scattered, and a row's lines are fetched one after another otherwise, so a search
 * would wait on memory latency rather than bandwidth. */
static void prefetch_rows(const char *base, size_t stride, size_t bytes, const size_t *index,
                          size_t count)
{
    for (size_t i = 0; i < count; i++)
        for (size_t offset = 0; offset < bytes; offset += 64)
            __builtin_prefetch(base + index[i] * stride + offset);
}

static void rescore_task(void *ctx, int task, int thread)
{
    const rescore_job *job = ctx;
    size_t begin = range_begin(job->count, job->tasks, task);
    size_t end = range_begin(job->count, job->tasks, task + 1);
    const quant_codes *c = job->codes;
    const char *base = job->exact ? (const char *)job->rows : (const char *)c->int8;
    size_t stride = job->exact ? c->dim * sizeof(float) : c->dim8;
    size_t group = job->exact ? QUANT_PREFETCH_ROWS : QUANT_PREFETCH_ROWS_INT8;
    int32_t dots[QUANT_PREFETCH_ROWS_INT8];
    prefetch_rows(base, stride, stride, job->index + begin,
                  end - begin < group ? end - begin : group);
    for (size_t i = begin; i < end; i += group) {
        size_t m = end - i < group ? end - i : group;
        size_t next = end - (i + m) < group ? end - (i + m) : group;
        prefetch_rows(base, stride, stride, job->index + i + m, next);
        if (job->exact) {
            scan_score_rows(job->rows, c->dim, job->index + i, m, job->query_floats, job->scan_isa,
                            job->scores + i);
            continue;
        }
        job->int8_dots(c->int8, c->dim8, job->index + i, m, job->query->q8, job->query->q16, dots);
        for (size_t j = 0; j < m; j++)
            job->scores[i + j] = (float)(dots[j] - 128 * job->query->q8_sum);
    }
}

/* Scores the `count` rows of index (exactly, or by the int8 codes) and keeps the best `keep` in
 * hits, sorted. */
static int rescore(rescore_job *job, threadpool *pool, size_t keep, scan_hit *hits, size_t *n_hits)
{
    job->scores = malloc((job->count ? job->count : 1) * sizeof(float));
    if (!job->scores) return err_set(EMBEDRAG_ERR_NO_MEMORY, "quant_search: out of memory");
    job->tasks = task_count(job->count, QUANT_MIN_RESCORE_TASK, pool);
    run_tasks(pool, job->tasks, rescore_task, job);
    size_t size = 0;
    float threshold = -INFINITY;
    for (size_t i = 0; i < job->count; i++)
        if (job->scores[i] >= threshold)
            threshold =
                scan_hits_offer(hits, &size, keep, (scan_hit){job->index[i], job->scores[i]});
    scan_hits_sort(hits, size);
    *n_hits = size;
    free(job->scores);
    job->scores = NULL;
    return 0;
}

/* ---- search --------------------------------------------------------------------------------- */

quant_params quant_default_params(void)
{
    return (quant_params){.allowed = NULL,
                          .pool = NULL,
                          .isa = QUANT_ISA_AUTO,
                          .mode = QUANT_MODE_AUTO,
                          .shortlist = 0,
                          .shortlist_int8 = 0,
                          .query_bits = 0};
}

int quant_search(const quant_codes *c, const float *rows, size_t n, size_t dim, const float *query,
                 size_t k, const quant_params *params, scan_hit *hits, size_t *n_hits)
{
    quant_params p = params ? *params : quant_default_params();
    if (!c || !query || !hits || !n_hits || (!rows && n > 0))
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "quant_search: NULL argument");
    if (n != c->n || dim != c->dim)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT,
                       "quant_search: %zu x %zu rows, but the codes are of %zu x %zu", n, dim, c->n,
                       c->dim);
    int isa = p.isa == QUANT_ISA_AUTO ? quant_isa() : p.isa;
    if (!quant_isa_supported(isa))
        return err_set(EMBEDRAG_ERR_UNSUPPORTED, "quant_search: this CPU cannot run the %s kernels",
                       quant_isa_name(isa));
    int bits = p.query_bits ? p.query_bits : QUANT_QUERY_BITS;
    if (bits < 1 || bits > QUANT_MAX_QUERY_BITS)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "quant_search: %d query bits (1 to %d)", bits,
                       QUANT_MAX_QUERY_BITS);
    size_t shortlist = p.shortlist ? p.shortlist : c->header->shortlist;
    size_t shortlist8 = p.shortlist_int8 ? p.shortlist_int8 : QUANT_INT8_SHORTLIST;
    int mode = p.mode;
    if (mode == QUANT_MODE_AUTO)
        mode = c->int8 && shortlist > QUANT_CASCADE_MIN_SHORTLIST ? QUANT_MODE_CASCADE
                                                                  : QUANT_MODE_BITS;
    if (mode < QUANT_MODE_BITS || mode > QUANT_MODE_INT8)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "quant_search: mode %d", p.mode);
    if (mode != QUANT_MODE_BITS && !c->int8)
        return err_set(EMBEDRAG_ERR_UNSUPPORTED, "quant_search: the codes have no int8 part");
    *n_hits = 0;
    if (n == 0 || k == 0) return 0;
    shortlist = shortlist < k ? k : shortlist > n ? n : shortlist;
    shortlist8 = shortlist8 < k ? k : shortlist8 > n ? n : shortlist8;
    if (mode == QUANT_MODE_CASCADE && shortlist8 >= shortlist) mode = QUANT_MODE_BITS;

    quant_query q;
    int rc = query_encode(c, query, bits, mode != QUANT_MODE_BITS, &q);
    if (rc) return rc;
    size_t *candidates = NULL, count = 0;
    scan_hit *thinned = NULL;
    if (!q.finite) goto done;
    rc = first_stage(c, &q, p.allowed, mode == QUANT_MODE_INT8, isa, p.pool,
                     mode == QUANT_MODE_INT8 ? shortlist8 : shortlist, &candidates, &count);
    if (rc) goto done;
    rescore_job job = {.codes = c,
                       .query = &q,
                       .rows = rows,
                       .query_floats = query,
                       .scan_isa = scan_isa_for(isa),
                       .int8_dots = int8_for(isa)};
    if (mode == QUANT_MODE_CASCADE) {
        thinned = malloc(shortlist8 * sizeof(scan_hit));
        if (!thinned) {
            rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "quant_search: out of memory");
            goto done;
        }
        job.index = candidates;
        job.count = count;
        rc = rescore(&job, p.pool, shortlist8, thinned, &count);
        if (rc) goto done;
        for (size_t i = 0; i < count; i++) candidates[i] = thinned[i].row;
    }
    job.exact = true;
    job.index = candidates;
    job.count = count;
    rc = rescore(&job, p.pool, k, hits, n_hits);
done:
    free(thinned);
    free(candidates);
    query_free(&q);
    return rc;
}

int quant_search_batch(const quant_codes *c, const float *rows, size_t n, size_t dim,
                       const float *queries, size_t m, size_t k, const quant_params *params,
                       scan_hit *hits, size_t *n_hits)
{
    if (!queries || !hits || !n_hits)
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "quant_search_batch: NULL argument");
    if (m > 0 && (k > SIZE_MAX / m || dim > SIZE_MAX / m))
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "quant_search_batch: %zu queries", m);
    for (size_t q = 0; q < m; q++) {
        int rc =
            quant_search(c, rows, n, dim, queries + q * dim, k, params, hits + q * k, n_hits + q);
        if (rc) return rc;
    }
    return 0;
}

/* ---- building ------------------------------------------------------------------------------- */

quant_build_params quant_default_build_params(void)
{
    return (quant_build_params){.pool = NULL,
                                .isa = QUANT_ISA_AUTO,
                                .int8 = QUANT_INT8_AUTO,
                                .calibration_queries = QUANT_CALIBRATION_QUERIES,
                                .target_recall = 0.99,
                                .flags = 0};
}

/* Whether a row has no NaN or infinity: no element with an all-ones exponent (integer
 * compares, which compilers vectorize, unlike a chain of float adds). */
static bool row_finite(const float *x, size_t dim)
{
    uint32_t bad = 0;
    for (size_t d = 0; d < dim; d++) {
        uint32_t u;
        memcpy(&u, x + d, sizeof u);
        bad |= (u & 0x7f800000u) == 0x7f800000u;
    }
    return !bad;
}

/* Pass 1: per chunk of QUANT_STATS_ROWS rows, the sum, minimum and maximum of each dimension
 * over the finite rows. Chunks of a fixed size, summed in order: the mean is the same bits
 * whatever the thread count. */
#define QUANT_STATS_ROWS 32768
typedef struct stats_job {
    const float *rows;
    size_t n, dim;
    double *sums;   /* [chunk][dim] */
    float *lows;    /* [chunk][dim] */
    float *highs;   /* [chunk][dim] */
    size_t *finite; /* [chunk] */
} stats_job;

static void stats_task(void *ctx, int task, int thread)
{
    const stats_job *job = ctx;
    size_t dim = job->dim;
    double *sum = job->sums + (size_t)task * dim;
    float *low = job->lows + (size_t)task * dim, *high = job->highs + (size_t)task * dim;
    size_t finite = 0, begin = (size_t)task * QUANT_STATS_ROWS;
    size_t end = job->n - begin < QUANT_STATS_ROWS ? job->n : begin + QUANT_STATS_ROWS;
    for (size_t d = 0; d < dim; d++) sum[d] = 0, low[d] = INFINITY, high[d] = -INFINITY;
    for (size_t i = begin; i < end; i++) {
        const float *x = job->rows + i * dim;
        if (!row_finite(x, dim)) continue;
        finite++;
        for (size_t d = 0; d < dim; d++) {
            sum[d] += x[d];
            low[d] = x[d] < low[d] ? x[d] : low[d];
            high[d] = x[d] > high[d] ? x[d] : high[d];
        }
    }
    job->finite[task] = finite;
}

/* Passes 2 and 3: the bits and factors of blocks of rows, or the int8 codes. */
typedef struct encode_job {
    const float *rows;
    quant_codes *codes;
    bool row_factor;
    const float *inverse8; /* 1 / scale8, for the int8 pass; NULL for the bits */
    size_t blocks;
    int tasks;
} encode_job;

/* Row i's bits (sign of x - mean, 1 for > 0) into its block, and its factor: |x'|^2 / |x'|_1
 * (see quant.h), 0 for a row at the mean. The sums run in SCAN-like fixed lanes (element d in
 * lane d % 16, then a pairwise sum), so every build computes the same bits. */
static float encode_bits_row(const quant_codes *c, const float *x, uint64_t *block, size_t r)
{
    float squares[16] = {0}, absolutes[16] = {0}, diff[64];
    for (size_t w = 0; w < c->words; w++) {
        size_t m = c->dim - w * 64 < 64 ? c->dim - w * 64 : 64;
        const float *xw = x + w * 64, *mw = c->mean + w * 64;
        for (size_t e = 0; e < m; e++) diff[e] = xw[e] - mw[e];
        for (size_t e = m; e < 64; e++) diff[e] = 0;
        for (size_t e0 = 0; e0 < 64; e0 += 16)
            for (size_t l = 0; l < 16; l++) {
                float v = diff[e0 + l];
                float square = v * v;
                squares[l] += square;
                absolutes[l] += fabsf(v);
            }
        uint64_t word = 0;
        for (size_t byte = 0; byte < 8; byte++) {
            unsigned bits = 0;
            for (unsigned e = 0; e < 8; e++) bits |= (unsigned)(diff[byte * 8 + e] > 0) << e;
            word |= (uint64_t)bits << (8 * byte);
        }
        block[w * QUANT_BLOCK_ROWS + r] = word;
    }
    for (int width = 8; width > 0; width /= 2)
        for (int l = 0; l < width; l++) {
            squares[l] += squares[l + width];
            absolutes[l] += absolutes[l + width];
        }
    return absolutes[0] > 0 ? squares[0] / absolutes[0] : 0.0f;
}

/* Row i's int8 codes, stored + 128 as unsigned bytes (VPDPBUSD's operand; a search takes the
 * query's sum times 128 off each score), padded with zero codes (128). */
static void encode_int8_row(const quant_codes *c, const float *x, const float *inverse,
                            uint8_t *out)
{
    for (size_t d = 0; d < c->dim; d++) {
        float v = (x[d] - c->mean[d]) * inverse[d];
        v = v < -127.0f ? -127.0f : v > 127.0f ? 127.0f : v;
        out[d] = (uint8_t)(int32_t)(v + 128.5f); /* positive: truncation is floor */
    }
    memset(out + c->dim, 128, c->dim8 - c->dim);
}

static void encode_task(void *ctx, int task, int thread)
{
    const encode_job *job = ctx;
    quant_codes *c = job->codes;
    for (size_t b = range_begin(job->blocks, job->tasks, task);
         b < range_begin(job->blocks, job->tasks, task + 1); b++) {
        uint64_t *block = c->bits + b * c->words * QUANT_BLOCK_ROWS;
        for (size_t r = 0; r < QUANT_BLOCK_ROWS; r++) {
            size_t i = b * QUANT_BLOCK_ROWS + r;
            if (i >= c->n) {
                for (size_t w = 0; w < c->words; w++) block[w * QUANT_BLOCK_ROWS + r] = 0;
                continue;
            }
            const float *x = job->rows + i * c->dim;
            bool finite = row_finite(x, c->dim);
            if (job->inverse8) {
                uint8_t *out = c->int8 + i * c->dim8;
                if (finite)
                    encode_int8_row(c, x, job->inverse8, out);
                else
                    memset(out, 128, c->dim8);
                continue;
            }
            float factor = encode_bits_row(c, x, block, r);
            /* NaN for a row that is not finite: never shortlisted. */
            c->factor[i] = !finite ? NAN : job->row_factor ? factor : 1.0f;
        }
    }
}

/* The shortlist that holds `target` of the calibration rows' true neighbours (see quant.h);
 * *recall is the fraction it holds after the margin. */
static int calibrate(quant_codes *c, const float *rows, const quant_build_params *p, int isa,
                     size_t *shortlist, double *recall)
{
    size_t n = c->n, dim = c->dim;
    size_t s_max = (size_t)p->calibration_queries, k = QUANT_CALIBRATION_K;
    size_t floor_shortlist = QUANT_MIN_SHORTLIST > n / 1000 ? QUANT_MIN_SHORTLIST : n / 1000;
    *shortlist = floor_shortlist < n ? floor_shortlist : n;
    *recall = -1;
    if (s_max == 0 || n <= k + 1) return 0;
    if (s_max > n) s_max = n;
    float *queries = malloc(s_max * dim * sizeof(float));
    size_t *query_rows = malloc(s_max * sizeof(size_t));
    scan_hit *hits = malloc(s_max * (k + 1) * sizeof(scan_hit));
    size_t *n_hits = malloc(s_max * sizeof(size_t));
    size_t *needs = malloc(s_max * k * sizeof(size_t));
    first_job job = {.codes = c, .bits = bits_for(isa), .int8_dots = int8_for(isa)};
    job.chunks = (n + QUANT_CHUNK_ROWS - 1) / QUANT_CHUNK_ROWS;
    job.tasks = task_count(n, QUANT_MIN_TASK_ROWS, p->pool);
    job.counts = malloc((size_t)job.tasks * k * sizeof(size_t));
    int rc = 0;
    if (!queries || !query_rows || !hits || !n_hits || !needs || !job.counts) {
        rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "quant_codes_build: out of memory to calibrate");
        goto done;
    }
    /* Finite rows spread evenly over the matrix. */
    size_t s = 0;
    for (size_t j = 0; j < s_max; j++) {
        size_t row = (j * n + n / 2) / s_max;
        while (row < n && isnan(c->factor[row])) row++;
        if (row == n) continue;
        query_rows[s] = row;
        memcpy(queries + s * dim, rows + row * dim, dim * sizeof(float));
        s++;
    }
    scan_params sp = scan_default_params();
    sp.pool = p->pool;
    sp.isa = scan_isa_for(isa);
    rc = scan_topk_batch(rows, n, dim, queries, s, k + 1, &sp, hits, n_hits);
    if (rc) goto done;
    size_t pairs = 0;
    for (size_t j = 0; j < s; j++) {
        quant_query q;
        rc = query_encode(c, queries + j * dim, QUANT_QUERY_BITS, false, &q);
        if (rc) goto done;
        /* The true neighbours but the row itself, by their estimates, best first. */
        scan_hit targets[QUANT_CALIBRATION_K + 1];
        int count = 0;
        job.query = &q;
        for (size_t h = 0; h < n_hits[j] && (size_t)count < k; h++) {
            size_t row = hits[j * (k + 1) + h].row;
            if (row == query_rows[j]) continue;
            float estimates[QUANT_CHUNK_ROWS];
            size_t row0 = row / QUANT_CHUNK_ROWS * QUANT_CHUNK_ROWS;
            estimate_chunk(&job, row0, n - row0 < QUANT_CHUNK_ROWS ? n - row0 : QUANT_CHUNK_ROWS,
                           estimates);
            scan_hit t = {row, estimates[row - row0]};
            int at = count++;
            while (at > 0 && ranks_before(t, targets[at - 1])) targets[at] = targets[at - 1], at--;
            targets[at] = t;
        }
        job.targets = targets;
        job.n_targets = count;
        memset(job.counts, 0, (size_t)job.tasks * k * sizeof(size_t));
        if (count > 0) run_tasks(p->pool, job.tasks, first_task, &job);
        query_free(&q);
        /* A neighbour whose estimate is NaN could never be found; ranked last. */
        for (int t = 0; t < count; t++) {
            size_t before = 0;
            for (int task = 0; task < job.tasks; task++)
                before += job.counts[(size_t)task * k + (size_t)t];
            needs[pairs++] = isnan(targets[t].score) ? n : before + 1;
        }
    }
    if (pairs == 0) goto done;
    /* The smallest shortlist holding `target` of the pairs: insertion sort is enough for a few
     * hundred. */
    for (size_t i = 1; i < pairs; i++) {
        size_t v = needs[i], at = i;
        while (at > 0 && needs[at - 1] > v) needs[at] = needs[at - 1], at--;
        needs[at] = v;
    }
    size_t want = (size_t)ceil(p->target_recall * (double)pairs);
    want = want < 1 ? 1 : want > pairs ? pairs : want;
    size_t chosen = needs[want - 1] * QUANT_SHORTLIST_MARGIN;
    chosen = chosen < floor_shortlist ? floor_shortlist : chosen > n ? n : chosen;
    size_t held = 0;
    for (size_t i = 0; i < pairs; i++) held += needs[i] <= chosen;
    *shortlist = chosen;
    *recall = (double)held / (double)pairs;
done:
    free(job.counts);
    free(needs);
    free(n_hits);
    free(hits);
    free(query_rows);
    free(queries);
    return rc;
}

/* Adds the int8 codes: a larger allocation, the rest copied over, then pass 3. */
static int add_int8(quant_codes *c, const float *rows, threadpool *pool)
{
    quant_layout l;
    if (!layout_for(c->n, c->dim, true, &l))
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "quant_codes_build: int8 codes too large");
    quant_header *h = allocate(l.bytes);
    if (!h) return err_set(EMBEDRAG_ERR_NO_MEMORY, "quant_codes_build: %zu bytes", l.bytes);
    memcpy(h, c->header, l.int8);
    free(c->header);
    c->header = h;
    h->flags |= QUANT_HAS_INT8;
    h->bytes = l.bytes;
    point_into(c);
    float *inverse = malloc(c->dim * sizeof(float));
    if (!inverse) return err_set(EMBEDRAG_ERR_NO_MEMORY, "quant_codes_build: out of memory");
    for (size_t d = 0; d < c->dim; d++) inverse[d] = 1.0f / c->scale8[d];
    encode_job job = {.rows = rows, .codes = c, .inverse8 = inverse};
    job.blocks = (c->n + QUANT_BLOCK_ROWS - 1) / QUANT_BLOCK_ROWS;
    job.tasks = task_count(c->n, QUANT_MIN_TASK_ROWS, pool);
    run_tasks(pool, job.tasks, encode_task, &job);
    free(inverse);
    return 0;
}

int quant_codes_build(const float *rows, size_t n, size_t dim, const quant_build_params *params,
                      quant_codes **out)
{
    quant_build_params p = params ? *params : quant_default_build_params();
    if (!out) return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "quant_codes_build: NULL out");
    *out = NULL;
    if ((!rows && n > 0) || dim == 0 || p.calibration_queries < 0 || !(p.target_recall > 0) ||
        p.target_recall > 1 || (p.flags & ~(unsigned)(QUANT_KNOWN_FLAGS & ~QUANT_HAS_INT8)))
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "quant_codes_build: %s",
                       dim == 0 ? "dimension 0" : "bad argument");
    int isa = p.isa == QUANT_ISA_AUTO ? quant_isa() : p.isa;
    if (!quant_isa_supported(isa))
        return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                       "quant_codes_build: this CPU cannot run the %s kernels",
                       quant_isa_name(isa));
    quant_layout l;
    if (n > SIZE_MAX / sizeof(float) / dim || !layout_for(n, dim, false, &l))
        return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "quant_codes_build: %zu x %zu too large", n,
                       dim);
    quant_codes *c = calloc(1, sizeof *c);
    if (c) c->header = allocate(l.bytes);
    int tasks = task_count(n, QUANT_MIN_TASK_ROWS, p.pool);
    size_t chunks = (n + QUANT_STATS_ROWS - 1) / QUANT_STATS_ROWS, room = chunks ? chunks : 1;
    stats_job stats = {.rows = rows, .n = n, .dim = dim};
    stats.sums = malloc(room * dim * sizeof(double));
    stats.lows = malloc(room * dim * sizeof(float));
    stats.highs = malloc(room * dim * sizeof(float));
    stats.finite = malloc(room * sizeof(size_t));
    int rc = 0;
    if (!c || !c->header || !stats.sums || !stats.lows || !stats.highs || !stats.finite) {
        rc = err_set(EMBEDRAG_ERR_NO_MEMORY, "quant_codes_build: out of memory for %zu bytes",
                     l.bytes);
        goto fail;
    }
    memset(c->header, 0, sizeof(quant_header));
    memcpy(c->header->magic, QUANT_MAGIC, sizeof c->header->magic);
    c->header->version = QUANT_VERSION;
    c->header->flags = p.flags;
    c->header->n = n;
    c->header->dim = dim;
    c->header->bytes = l.bytes;
    c->header->calibrated_recall = -1;
    point_into(c);

    run_tasks(p.pool, (int)chunks, stats_task, &stats);
    size_t finite = 0;
    for (size_t t = 0; t < chunks; t++) finite += stats.finite[t];
    for (size_t d = 0; d < dim; d++) {
        double sum = 0;
        float low = INFINITY, high = -INFINITY;
        for (size_t t = 0; t < chunks; t++) {
            sum += stats.sums[t * dim + d];
            low = fminf(low, stats.lows[t * dim + d]);
            high = fmaxf(high, stats.highs[t * dim + d]);
        }
        float mean = finite ? (float)(sum / (double)finite) : 0.0f;
        c->mean[d] = p.flags & QUANT_BUILD_NO_CENTER ? 0.0f : mean;
        float reach = finite ? fmaxf(high - c->mean[d], c->mean[d] - low) : 0.0f;
        c->scale8[d] = reach > 0 ? reach / 127.0f : 1.0f;
    }
    if (p.flags & QUANT_BUILD_INT8_GLOBAL_SCALE) {
        float most = 0;
        for (size_t d = 0; d < dim; d++) most = fmaxf(most, c->scale8[d]);
        for (size_t d = 0; d < dim; d++) c->scale8[d] = most;
    }

    encode_job job = {.rows = rows,
                      .codes = c,
                      .row_factor = !(p.flags & QUANT_BUILD_NO_ROW_FACTOR),
                      .blocks = (n + QUANT_BLOCK_ROWS - 1) / QUANT_BLOCK_ROWS,
                      .tasks = tasks};
    run_tasks(p.pool, tasks, encode_task, &job);

    size_t shortlist = 0;
    double recall = -1;
    rc = calibrate(c, rows, &p, isa, &shortlist, &recall);
    if (rc) goto fail;
    c->header->shortlist = shortlist;
    c->header->calibrated_recall = recall;
    if (p.int8 == QUANT_INT8_ON ||
        (p.int8 == QUANT_INT8_AUTO && shortlist > QUANT_CASCADE_MIN_SHORTLIST)) {
        rc = add_int8(c, rows, p.pool);
        if (rc) goto fail;
    }
    *out = c;
    goto done;
fail:
    quant_codes_free(c);
done:
    free(stats.sums);
    free(stats.lows);
    free(stats.highs);
    free(stats.finite);
    return rc;
}

void quant_codes_free(quant_codes *c)
{
    if (!c) return;
    free(c->header);
    free(c);
}

void quant_codes_get_info(const quant_codes *c, quant_codes_info *info)
{
    info->n = c->n;
    info->dim = c->dim;
    info->has_int8 = c->int8 != NULL;
    info->shortlist = c->header->shortlist;
    info->calibrated_recall = c->header->calibrated_recall;
    info->flags = c->header->flags & ~QUANT_HAS_INT8;
    info->bytes = c->header->bytes;
}

void quant_codes_bytes(const quant_codes *c, const void **data, size_t *bytes)
{
    *data = c->header;
    *bytes = c->header->bytes;
}

int quant_codes_load(const void *data, size_t bytes, quant_codes **out)
{
    if (!out) return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "quant_codes_load: NULL out");
    *out = NULL;
    if (!data) return err_set(EMBEDRAG_ERR_INVALID_ARGUMENT, "quant_codes_load: NULL data");
    quant_header h;
    if (bytes < sizeof h) return err_set(EMBEDRAG_ERR_FORMAT, "quant_codes_load: %zu bytes", bytes);
    memcpy(&h, data, sizeof h);
    quant_layout l;
    if (memcmp(h.magic, QUANT_MAGIC, sizeof h.magic) != 0)
        return err_set(EMBEDRAG_ERR_FORMAT, "quant_codes_load: not quantized codes");
    if (h.version != QUANT_VERSION)
        return err_set(EMBEDRAG_ERR_FORMAT, "quant_codes_load: version %u (this build reads %u)",
                       h.version, QUANT_VERSION);
    if ((h.flags & ~(uint32_t)QUANT_KNOWN_FLAGS) || h.dim == 0 ||
        !layout_for((size_t)h.n, (size_t)h.dim, h.flags & QUANT_HAS_INT8, &l) ||
        h.bytes != l.bytes || bytes != l.bytes || h.shortlist > h.n)
        return err_set(EMBEDRAG_ERR_FORMAT, "quant_codes_load: inconsistent header");
    quant_codes *c = calloc(1, sizeof *c);
    if (c) c->header = allocate(bytes);
    if (!c || !c->header) {
        free(c);
        return err_set(EMBEDRAG_ERR_NO_MEMORY, "quant_codes_load: %zu bytes", bytes);
    }
    memcpy(c->header, data, bytes);
    point_into(c);
    *out = c;
    return 0;
}
