/* The fused output products (sm_90a): out = LayerNorm(x W^T + bias + residual) in one kernel, for
 * the two products of a layer whose output is the model's width, when that width is 384 (the
 * MiniLM, e5-small and bge-small family) and the element type fp16 or bf16.
 *
 * Why our own GEMM here: cuBLASLt has no epilogue that normalizes a row, so a bulk layer paid for
 * each of these products twice: the product wrote its fp16 output, and add_layer_norm_kernel read
 * it back with the residual and wrote the normalized rows (at 1000 x 128 tokens on an H200, 71 +
 * 75 us for the attention output's, 229 + 75 for the output's, bench/cuda-notes.md). Here a block
 * owns 64 whole rows, so its epilogue can add the bias and the residual and normalize before any
 * row leaves the multiprocessor.
 *
 * Structure (a persistent grid, one block a multiprocessor, 384 threads):
 *   - warp 8 loads: one lane walks the block's tiles and K in chunks of 64 (128 bytes of 16-bit
 *     values, one swizzle row) and loads each chunk's X (64 rows) and W (384 rows) into a ring of
 *     GN_STAGES slots with TMA (cp.async.bulk.tensor, 128-byte swizzle), each slot guarded by a
 *     full and an empty mbarrier;
 *   - warp 9 moves rows: it loads a tile's residual rows (TMA) into a staging area, and once the
 *     consumers have left the normalized rows there, stores them (TMA) and loads the next tile's
 *     residual; warps 10 and 11 only give their registers away (setmaxnreg);
 *   - warps 0-7 are two consumer warpgroups: warpgroup g multiplies the slot's 64 rows by columns
 *     [192 g, 192 g + 192) with wgmma (m64n192k16, 96 fp32 sums a thread), keeping one chunk's
 *     wgmma in flight and releasing a slot as soon as the wgmma that read it has completed;
 *   - after a tile's last chunk the consumers add the bias, round to the element type (where the
 *     unfused path's product rounds its output), add the staged residual, reduce each row's sum
 *     and then its squared deviations (shuffles within a warp, shared memory across the two
 *     warpgroups), and write the normalized rows over the staged residual, while the ring
 *     already holds the next tile's first chunks.
 * A row's sums depend only on that row and W (K is summed in the same order for every row and
 * tile), so a text's vector does not depend on the batch it is in. */
#include "backend/cuda/cuda_device.cuh"
#include "backend/cuda/cuda_kernels.h"

#include <cuda.h>
#include <cudaTypedefs.h>

#define GN_WIDTH 384                /* output columns (the model's width) */
#define GN_HALF (GN_WIDTH / 2)      /* a consumer warpgroup's columns */
#define GN_ROWS 64                  /* rows a tile */
#define GN_CHUNK 64                 /* K a slot, and columns a box: 128 bytes of 16-bit values */
#define GN_STAGES 3                 /* slots in the ring */
#define GN_ROW_BYTES (GN_CHUNK * 2) /* a box's row: one 128-byte swizzle row */
#define GN_BOX_BYTES (GN_ROWS * GN_ROW_BYTES) /* a 64 x 64 box: 8 KB */
#define GN_A_BYTES GN_BOX_BYTES               /* X's chunk */
#define GN_B_BYTES (GN_WIDTH * GN_ROW_BYTES)  /* W's 384 x 64 chunk: 48 KB */
#define GN_SLOT_BYTES (GN_A_BYTES + GN_B_BYTES)
#define GN_BOXES (GN_WIDTH / GN_CHUNK)             /* a tile's rows as boxes of 64 columns */
#define GN_STAGING_BYTES (GN_BOXES * GN_BOX_BYTES) /* 48 KB */
#define GN_CONSUMERS 256
/* Two consumer warpgroups and a third whose first two warps move data: whole warpgroups, so that
 * setmaxnreg can move registers from the third to the first two (each scheduler of the
 * multiprocessor holds a quarter of the warps, and 168 registers a thread is all that 3 warps a
 * scheduler get evenly). */
#define GN_THREADS (GN_CONSUMERS + 128)
/* Shared memory: the ring and the staged tile (1,024-byte aligned for the swizzle), bias, gamma
 * and beta as floats, the rows' partial sums of the two warpgroups (two arrays), the mbarriers. */
#define GN_PARAM_BYTES (3 * GN_WIDTH * 4)
#define GN_STATS_BYTES (2 * 2 * GN_ROWS * 4)
#define GN_BARRIERS (2 * GN_STAGES + 2)
#define GN_SMEM                                                                                    \
    (1024 + GN_STAGES * GN_SLOT_BYTES + GN_STAGING_BYTES + GN_PARAM_BYTES + GN_STATS_BYTES +       \
     GN_BARRIERS * 8)

template <typename T> struct gn_mma;

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GN_DEVICE 1

/* d (a warpgroup's 64 x 192 fp32 sums) += A (64 x 16, descriptor a) x B (192 x 16, descriptor b)^T;
 * accumulate 0 overwrites d instead. */
#define GN_MMA(T_, TYPE)                                                                           \
    template <> struct gn_mma<T_> {                                                                \
        static __device__ __forceinline__ void run(float *d, uint64_t a, uint64_t b,               \
                                                   int accumulate)                                 \
        {                                                                                          \
            asm volatile(                                                                          \
                "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %98, 0;\n\t"                                 \
                "wgmma.mma_async.sync.aligned.m64n192k16.f32." TYPE "." TYPE " {"                  \
                "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "           \
                "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
                "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
                "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
                "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
                "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95 "  \
                "}, %96, %97, p, 1, 1, 0, 0;\n\t}"                                                 \
                : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),          \
                  "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),        \
                  "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),    \
                  "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),    \
                  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),    \
                  "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),    \
                  "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),    \
                  "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),    \
                  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]),    \
                  "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),    \
                  "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]),    \
                  "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),    \
                  "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]),    \
                  "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]),    \
                  "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]),    \
                  "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])     \
                : "l"(a), "l"(b), "r"(accumulate));                                                \
        }                                                                                          \
    };
GN_MMA(__half, "f16")
GN_MMA(__nv_bfloat16, "bf16")
#undef GN_MMA
/* A wgmma shared-memory descriptor for a K-major tile of 128-byte rows in the 128-byte swizzle
 * that TMA writes: 8-row groups 1,024 bytes apart (the stride field), the leading field unused
 * by this layout, swizzle mode 1. A k-step of 16 values is 32 bytes further: + 2. */
__device__ __forceinline__ uint64_t gn_descriptor(uint32_t address)
{
    return (uint64_t)((address & 0x3FFFF) >> 4) | (uint64_t)1 << 16 | (uint64_t)(1024 >> 4) << 32 |
           (uint64_t)1 << 62;
}

__device__ __forceinline__ void gn_expect(uint32_t bar, unsigned bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
                 : "memory");
}

/* TMA: the box at (column x, row y) of `map` into shared memory at dst, completing on bar. */
__device__ __forceinline__ void gn_load(uint32_t dst, const CUtensorMap *map, int x, int y,
                                        uint32_t bar)
{
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes "
                 "[%0], [%1, {%2, %3}], [%4];" ::"r"(dst),
                 "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(bar)
                 : "memory");
}

/* TMA: shared memory at src to the box at (column x, row y) of `map` (rows past the map's end are
 * not written), in the issuing thread's bulk group. */
__device__ __forceinline__ void gn_store(const CUtensorMap *map, int x, int y, uint32_t src)
{
    asm volatile(
        "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];" ::"l"(
            reinterpret_cast<uint64_t>(map)),
        "r"(x), "r"(y), "r"(src)
        : "memory");
}

/* The staged tile: boxes of 64 columns, each 64 rows of 128 bytes whose 16-byte units are
 * swizzled by the row (TMA's 128-byte swizzle: unit u of row r at u ^ (r % 8)). A consumer
 * thread's pair of columns in its group j of 8 (of 24) lies, in rows r0 and r0 + 8 alike (same
 * r % 8), at `first` + gn_pair(j, lane): its warpgroup's boxes start 3 boxes apart, and lane / 4
 * is r0 % 8. */
__device__ __forceinline__ uint32_t gn_pair(int j, int lane)
{
    return (uint32_t)((j / 8) * GN_BOX_BYTES + (((j % 8) ^ (lane / 4)) << 4));
}

__device__ __forceinline__ void gn_consumers_sync()
{
    asm volatile("bar.sync 1, %0;" ::"n"(GN_CONSUMERS) : "memory");
}

/* Rows r0 and r0 + 8's totals of a = a thread's part of row r0, b of row r0 + 8: over the row's
 * four lanes (shuffles), then over the two warpgroups through `shared` (2 x 64 floats, read
 * back in the same order by both), so both warpgroups get the same bits. */
__device__ __forceinline__ void gn_row_totals(float &a, float &b, float *shared, int group, int r0,
                                              int lane)
{
    a += __shfl_xor_sync(FULL_MASK, a, 1);
    a += __shfl_xor_sync(FULL_MASK, a, 2);
    b += __shfl_xor_sync(FULL_MASK, b, 1);
    b += __shfl_xor_sync(FULL_MASK, b, 2);
    if (lane % 4 == 0) shared[group * GN_ROWS + r0] = a, shared[group * GN_ROWS + r0 + 8] = b;
    gn_consumers_sync();
    a = shared[r0] + shared[GN_ROWS + r0];
    b = shared[r0 + 8] + shared[GN_ROWS + r0 + 8];
}
#endif

/* x_map: X (rows x k, the product's input), w_map: W (384 x k), residual_map and out_map (rows x
 * 384): boxes of 64 columns by 64 rows (192 rows for W), 128-byte swizzle. rows: the product's
 * rows (tiles of 64); rows past the maps' end read as zeros and are not stored. */
template <typename T>
__global__ void __launch_bounds__(GN_THREADS, 1)
    gemm_norm_kernel(const __grid_constant__ CUtensorMap x_map,
                     const __grid_constant__ CUtensorMap w_map,
                     const __grid_constant__ CUtensorMap residual_map,
                     const __grid_constant__ CUtensorMap out_map, int rows, int chunks,
                     const T *bias, const float *gamma, const float *beta, float eps)
{
#ifdef GN_DEVICE
    extern __shared__ unsigned char gn_smem[];
    const uint32_t base = (shared_address(gn_smem) + 1023u) & ~1023u;
    unsigned char *generic = gn_smem + (base - shared_address(gn_smem));
    const uint32_t staging = base + GN_STAGES * GN_SLOT_BYTES;
    unsigned char *staged = generic + GN_STAGES * GN_SLOT_BYTES;
    float *params = reinterpret_cast<float *>(staged + GN_STAGING_BYTES); /* bias, gamma, beta */
    float *sums = params + 3 * GN_WIDTH, *squares = sums + 2 * GN_ROWS;
    const uint32_t full = staging + GN_STAGING_BYTES + GN_PARAM_BYTES + GN_STATS_BYTES,
                   empty = full + GN_STAGES * 8, residual_full = empty + GN_STAGES * 8,
                   out_ready = residual_full + 8;
    const int tiles = (rows + GN_ROWS - 1) / GN_ROWS, lane = threadIdx.x % WARP;
    if (threadIdx.x == 0) {
        for (int s = 0; s < GN_STAGES; s++) {
            barrier_init(full + 8 * s, 1);
            barrier_init(empty + 8 * s, 2); /* one thread of each consumer warpgroup */
        }
        barrier_init(residual_full, 1);
        barrier_init(out_ready, GN_CONSUMERS);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    for (int i = threadIdx.x; i < GN_WIDTH; i += blockDim.x) {
        params[i] = to_float(bias[i]);
        params[GN_WIDTH + i] = gamma[i];
        params[2 * GN_WIDTH + i] = beta[i];
    }
    __syncthreads();

    if (threadIdx.x >= GN_CONSUMERS) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 56;" ::: "memory");
        if (lane != 0) return;
        if (threadIdx.x / WARP == GN_CONSUMERS / WARP) {
            /* Warp 8: X and W chunk by chunk into the ring. */
            int stage = 0;
            unsigned phase = 0;
            for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x)
                for (int c = 0; c < chunks; c++) {
                    barrier_wait(empty + 8 * stage, phase ^ 1);
                    const uint32_t slot = base + stage * GN_SLOT_BYTES, bar = full + 8 * stage;
                    gn_expect(bar, GN_SLOT_BYTES);
                    gn_load(slot, &x_map, c * GN_CHUNK, tile * GN_ROWS, bar);
                    gn_load(slot + GN_A_BYTES, &w_map, c * GN_CHUNK, 0, bar);
                    gn_load(slot + GN_A_BYTES + GN_HALF * GN_ROW_BYTES, &w_map, c * GN_CHUNK,
                            GN_HALF, bar);
                    if (++stage == GN_STAGES) stage = 0, phase ^= 1;
                }
        } else if (threadIdx.x / WARP == GN_CONSUMERS / WARP + 1) {
            /* Warp 9: a tile's residual rows into the staging area, and the normalized rows the
             * consumers leave there back out; the next tile's residual once they are read. */
            unsigned parity = 0;
            for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
                gn_expect(residual_full, GN_STAGING_BYTES);
                for (int x = 0; x < GN_BOXES; x++)
                    gn_load(staging + x * GN_BOX_BYTES, &residual_map, x * GN_CHUNK, tile * GN_ROWS,
                            residual_full);
                barrier_wait(out_ready, parity);
                parity ^= 1;
                for (int x = 0; x < GN_BOXES; x++)
                    gn_store(&out_map, x * GN_CHUNK, tile * GN_ROWS, staging + x * GN_BOX_BYTES);
                asm volatile("cp.async.bulk.commit_group;" ::: "memory");
                asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
            }
            asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
        }
        return;
    }

    /* The consumers. */
    asm volatile("setmaxnreg.inc.sync.aligned.u32 224;" ::: "memory");
    const int group = threadIdx.x / 128, warp_in_group = (threadIdx.x % 128) / WARP;
    const bool signals = threadIdx.x % 128 == 0;
    const int r0 = warp_in_group * 16 + lane / 4; /* and r0 + 8 */
    unsigned char *const first0 =
        staged + group * (GN_BOXES / 2) * GN_BOX_BYTES + r0 * GN_ROW_BYTES + (lane % 4) * 4;
    unsigned char *const first1 = first0 + 8 * GN_ROW_BYTES;
    const float *const bias_s = params + group * GN_HALF + (lane % 4) * 2,
                       *const gamma_s = bias_s + GN_WIDTH, *const beta_s = gamma_s + GN_WIDTH;
    int stage = 0;
    unsigned phase = 0, residual_parity = 0;
    float d[96];
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        int held = -1; /* the slot whose wgmma may still be in flight */
        for (int c = 0; c < chunks; c++) {
            barrier_wait(full + 8 * stage, phase);
            const uint32_t slot = base + stage * GN_SLOT_BYTES;
            const uint64_t da = gn_descriptor(slot),
                           db = gn_descriptor(slot + GN_A_BYTES + group * GN_HALF * GN_ROW_BYTES);
            asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
            for (int k = 0; k < GN_CHUNK / 16; k++)
                gn_mma<T>::run(d, da + 2 * k, db + 2 * k, c > 0 || k > 0);
            asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
            if (held >= 0) {
                asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
                if (signals) barrier_arrive(empty + 8 * held);
            }
            held = stage;
            if (++stage == GN_STAGES) stage = 0, phase ^= 1;
        }
        asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
        if (signals) barrier_arrive(empty + 8 * held);

        /* A thread's sums are rows r0 and r0 + 8 of the tile, two adjacent columns in each of its
         * warpgroup's 24 groups of 8. The product plus bias is rounded to T (where the unfused
         * path's product stores it), then the residual added in fp32. */
        barrier_wait(residual_full, residual_parity);
        residual_parity ^= 1;
        float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
        for (int j = 0; j < GN_HALF / 8; j++) {
            const float2 b = *reinterpret_cast<const float2 *>(bias_s + 8 * j);
            const T *y0 = reinterpret_cast<const T *>(first0 + gn_pair(j, lane)),
                    *y1 = reinterpret_cast<const T *>(first1 + gn_pair(j, lane));
            /* Both of a row's pair rounded by one conversion (the same rounding as one by one). */
            const uint32_t p0 = mma_type<T>::pack(d[4 * j] + b.x, d[4 * j + 1] + b.y),
                           p1 = mma_type<T>::pack(d[4 * j + 2] + b.x, d[4 * j + 3] + b.y);
            const T *q0 = reinterpret_cast<const T *>(&p0), *q1 = reinterpret_cast<const T *>(&p1);
            d[4 * j] = to_float(q0[0]) + to_float(y0[0]);
            d[4 * j + 1] = to_float(q0[1]) + to_float(y0[1]);
            d[4 * j + 2] = to_float(q1[0]) + to_float(y1[0]);
            d[4 * j + 3] = to_float(q1[1]) + to_float(y1[1]);
            s0 += d[4 * j] + d[4 * j + 1];
            s1 += d[4 * j + 2] + d[4 * j + 3];
        }
        /* Each row's mean, then its variance about the mean (two passes, as the CPU). */
        gn_row_totals(s0, s1, sums, group, r0, lane);
        const float mean0 = s0 / (float)GN_WIDTH, mean1 = s1 / (float)GN_WIDTH;
        float q0 = 0.0f, q1 = 0.0f;
#pragma unroll
        for (int j = 0; j < GN_HALF / 8; j++) {
            float e;
            e = d[4 * j] - mean0, q0 += e * e;
            e = d[4 * j + 1] - mean0, q0 += e * e;
            e = d[4 * j + 2] - mean1, q1 += e * e;
            e = d[4 * j + 3] - mean1, q1 += e * e;
        }
        gn_row_totals(q0, q1, squares, group, r0, lane);
        const float inv0 = 1.0f / sqrtf(q0 / (float)GN_WIDTH + eps),
                    inv1 = 1.0f / sqrtf(q1 / (float)GN_WIDTH + eps);
#pragma unroll
        for (int j = 0; j < GN_HALF / 8; j++) {
            const float2 g = *reinterpret_cast<const float2 *>(gamma_s + 8 * j),
                         e = *reinterpret_cast<const float2 *>(beta_s + 8 * j);
            *reinterpret_cast<uint32_t *>(first0 + gn_pair(j, lane)) = mma_type<T>::pack(
                (d[4 * j] - mean0) * inv0 * g.x + e.x, (d[4 * j + 1] - mean0) * inv0 * g.y + e.y);
            *reinterpret_cast<uint32_t *>(first1 + gn_pair(j, lane)) =
                mma_type<T>::pack((d[4 * j + 2] - mean1) * inv1 * g.x + e.x,
                                  (d[4 * j + 3] - mean1) * inv1 * g.y + e.y);
        }
        /* The rows go out by TMA (warp 9): its proxy must see these writes. */
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        barrier_arrive(out_ready);
    }
#endif
}

/* ---- host side ---- */

/* The driver's cuTensorMapEncodeTiled, found once (the runtime links statically, the driver is
 * opened at run time); backends created on several threads may find it at once, so it is read
 * and written atomically (every thread finds the same function). */
static PFN_cuTensorMapEncodeTiled_v12000 gn_encode_fn;

static PFN_cuTensorMapEncodeTiled_v12000 gn_encode(void)
{
    return __atomic_load_n(&gn_encode_fn, __ATOMIC_ACQUIRE);
}

/* A 2-D map of a row-major rows x cols matrix of 16-bit values, boxes of 64 columns x box_rows
 * rows in the 128-byte swizzle; rows past the end read as zeros. */
static bool gn_map(CUtensorMap *map, cuda_dtype dtype, const void *p, int rows, int cols,
                   int box_rows)
{
    cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
    cuuint64_t strides[1] = {(cuuint64_t)cols * 2};
    cuuint32_t box[2] = {GN_CHUNK, (cuuint32_t)box_rows}, steps[2] = {1, 1};
    return gn_encode()(map,
                       dtype == CUDA_DTYPE_BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                       2, const_cast<void *>(p), dims, strides, box, steps,
                       CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                       CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                       CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

extern "C" int cuda_gemm_norm_prepare(cuda_dtype dtype, int n, int k)
{
    if (dtype == CUDA_DTYPE_F32 || n != GN_WIDTH || k < GN_CHUNK || k % GN_CHUNK) return 0;
    int device = 0, major = 0, minor = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess ||
        major != 9 || minor != 0) {
        cudaGetLastError();
        return 0;
    }
    if (!gn_encode()) {
        void *fn = NULL;
        cudaDriverEntryPointQueryResult found;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                             cudaEnableDefault, &found) != cudaSuccess ||
            found != cudaDriverEntryPointSuccess || !fn) {
            cudaGetLastError();
            return 0;
        }
        __atomic_store_n(&gn_encode_fn, (PFN_cuTensorMapEncodeTiled_v12000)fn, __ATOMIC_RELEASE);
    }
    cudaError_t e =
        dtype == CUDA_DTYPE_BF16
            ? cudaFuncSetAttribute(gemm_norm_kernel<__nv_bfloat16>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, GN_SMEM)
            : cudaFuncSetAttribute(gemm_norm_kernel<__half>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, GN_SMEM);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return 1;
}

extern "C" cudaError_t cuda_gemm_norm(cuda_dtype dtype, int rows, const void *x, int k,
                                      const void *weight, const void *bias, const void *residual,
                                      const float *gamma, const float *beta, float eps, void *out,
                                      int sms, cudaStream_t stream)
{
    CUtensorMap x_map, w_map, residual_map, out_map;
    if (!gn_encode() || !gn_map(&x_map, dtype, x, rows, k, GN_ROWS) ||
        !gn_map(&w_map, dtype, weight, GN_WIDTH, k, GN_HALF) ||
        !gn_map(&residual_map, dtype, residual, rows, GN_WIDTH, GN_ROWS) ||
        !gn_map(&out_map, dtype, out, rows, GN_WIDTH, GN_ROWS))
        return cudaErrorInvalidValue;
    int tiles = (rows + GN_ROWS - 1) / GN_ROWS;
    unsigned blocks = (unsigned)(tiles < sms ? tiles : sms);
    if (blocks < 1) blocks = 1;
    if (dtype == CUDA_DTYPE_BF16)
        gemm_norm_kernel<__nv_bfloat16><<<blocks, GN_THREADS, GN_SMEM, stream>>>(
            x_map, w_map, residual_map, out_map, rows, k / GN_CHUNK, (const __nv_bfloat16 *)bias,
            gamma, beta, eps);
    else
        gemm_norm_kernel<__half><<<blocks, GN_THREADS, GN_SMEM, stream>>>(
            x_map, w_map, residual_map, out_map, rows, k / GN_CHUNK, (const __half *)bias, gamma,
            beta, eps);
    return cudaGetLastError();
}
