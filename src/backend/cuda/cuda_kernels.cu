/* The CUDA backend's own kernels: everything of the forward pass but the matrix products
 * (cuBLASLt). Each is written once over the activation type T (float, __half, __nv_bfloat16) and
 * instantiated per type by a template: the only C++ used, because CUDA C has no other way to
 * make one kernel per element type and head size. Arithmetic is fp32 everywhere; rows move in
 * 16-byte vectors. Token, sequence and tile counts come from the batch header in device memory,
 * so a captured graph replays for any batch within its grid's bounds. */
#include "backend/cuda/cuda_kernels.h"
#include "backend/cuda/cuda_device.cuh"

#include "embedrag.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

/* Row kernels: one warp per row, this many warps per block. */
#define ROW_WARPS 4
/* The residual + LayerNorm kernel's grid: at most this many blocks a multiprocessor. */
#define NORM_BLOCKS_PER_SM 8
/* Elementwise kernels: threads per block, and at most this many blocks (a grid-stride loop does
 * the rest; 132 multiprocessors x 16 blocks fills an H200). */
#define ELEMENT_THREADS 256
#define ELEMENT_MAX_BLOCKS 4096
/* Pooling: threads per sequence (at least the vectors of the widest row: CUDA_MAX_HIDDEN / 4). */
#define POOL_THREADS 256

/* Programmatic dependent launch (PDL, sm_90; PTX ISA "griddepcontrol"). A kernel launched with the
 * programmatic stream serialization attribute may start before the kernel ahead of it in the
 * stream has finished; grid_dependency_wait blocks until that kernel has completed and its writes
 * are visible (at once for a kernel launched the ordinary way). grid_dependency_trigger lets the
 * next kernel, if it was launched programmatically, start once every block of this one has
 * triggered or exited (no effect otherwise). Every kernel launched programmatically waits before
 * it touches what kernels ahead of it wrote, and completes only after that wait: so waiting for
 * the kernel just ahead covers all earlier ones too. */
__device__ __forceinline__ void grid_dependency_wait()
{
    asm volatile("griddepcontrol.wait;" ::: "memory");
}

__device__ __forceinline__ void grid_dependency_trigger()
{
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

/* A launch configuration, with the programmatic stream serialization attribute (PDL) when asked
 * for; `attribute` must outlive the launch call. */
static cudaLaunchConfig_t launch_config(unsigned blocks, unsigned threads, size_t shared,
                                        bool programmatic, cudaLaunchAttribute *attribute,
                                        cudaStream_t stream)
{
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(blocks);
    config.blockDim = dim3(threads);
    config.dynamicSmemBytes = shared;
    config.stream = stream;
    attribute->id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute->val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attribute;
    config.numAttrs = programmatic ? 1 : 0;
    return config;
}

/* The current device's multiprocessors, or 0 if the runtime cannot say (its error cleared, so
 * that a later cudaGetLastError reports only the launches). */
static int current_sm_count()
{
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return sms;
}

/* ---- LayerNorm rows ---- */

template <typename T>
__global__ void __launch_bounds__(ROW_WARPS *WARP)
    embed_kernel(cuda_batch_view b, const float *word, const float *position, const float *type,
                 const float *gamma, const float *beta, float eps, int hidden, T *out)
{
    constexpr int PER_LANE = CUDA_MAX_HIDDEN / (16 / sizeof(T)) / WARP;
    /* The first layer's product may start copying its weights (small-batch path). */
    grid_dependency_trigger();
    int t = blockIdx.x * ROW_WARPS + threadIdx.x / WARP;
    if (t >= b.header[CUDA_HEADER_TOKENS]) return;
    const int lane = threadIdx.x % WARP;
    int sequence = b.sequence_of[t];
    int pos = t - b.offsets[sequence];
    const float *w = word + (size_t)b.ids[t] * hidden;
    const float *p = position + (size_t)pos * hidden;
    int vectors = hidden / VEC(T);
    float v[PER_LANE][16 / sizeof(T)];
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        int c = lane + i * WARP;
        if (c >= vectors) continue;
        float pv[VEC(T)], tv[VEC(T)];
        size_t at = (size_t)c * VEC(T);
        load_floats<VEC(T)>(w + at, v[i]);
        load_floats<VEC(T)>(p + at, pv);
        load_floats<VEC(T)>(type + at, tv);
#pragma unroll
        for (int j = 0; j < VEC(T); j++) v[i][j] += pv[j] + tv[j];
    }
    layer_norm_store<T, PER_LANE>(v, vectors, hidden, gamma, beta, eps, out + (size_t)t * hidden);
}

/* One lane's share of rows t of a and residual, as loaded (16-byte vectors), or nothing past the
 * batch's tokens. */
template <typename T, int PER_LANE>
__device__ __forceinline__ void add_norm_load(const T *a, const T *residual, int t, int tokens,
                                              int hidden, int vectors, uint4 (&ra)[PER_LANE],
                                              uint4 (&rr)[PER_LANE])
{
    if (t >= tokens) return;
    const int lane = threadIdx.x % WARP;
    const uint4 *pa = reinterpret_cast<const uint4 *>(a + (size_t)t * hidden),
                *pr = reinterpret_cast<const uint4 *>(residual + (size_t)t * hidden);
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        int c = lane + i * WARP;
        if (c >= vectors) continue;
        ra[i] = pa[c];
        rr[i] = pr[c];
    }
}

/* out = LayerNorm(a + residual), a warp a row. The rows are the batch's tokens; each warp takes
 * rows w, w + W, w + 2 W, ... (W: the grid's warps; the grid is at most a few blocks per
 * multiprocessor, see cuda_add_layer_norm) and loads its next row before it reduces and stores
 * the current one, so two rows' reads are in flight a warp and no block is launched per four
 * rows. The sum for a row is the same whatever the grid: a + residual per element, then
 * layer_norm_store, as the cluster and small-batch paths do. PER_LANE: vectors a lane holds, at
 * least the row's vectors / 32. out may alias a or residual: a row is read whole before it is
 * written, and rows are apart. */
template <typename T, int PER_LANE>
__global__ void __launch_bounds__(ROW_WARPS *WARP)
    add_layer_norm_kernel(cuda_batch_view b, const T *a, const T *residual, const float *gamma,
                          const float *beta, float eps, int hidden, T *out)
{
    /* Launched programmatically: wait for the product ahead (nothing in an ordinary launch). */
    grid_dependency_wait();
    grid_dependency_trigger();
    const int tokens = b.header[CUDA_HEADER_TOKENS], vectors = hidden / VEC(T);
    const int lane = threadIdx.x % WARP, step = gridDim.x * ROW_WARPS;
    int t = blockIdx.x * ROW_WARPS + threadIdx.x / WARP;
    uint4 ra[PER_LANE], rr[PER_LANE];
    add_norm_load<T, PER_LANE>(a, residual, t, tokens, hidden, vectors, ra, rr);
    for (; t < tokens; t += step) {
        float v[PER_LANE][VEC(T)];
#pragma unroll
        for (int i = 0; i < PER_LANE; i++) {
            if (lane + i * WARP >= vectors) continue;
            const T *x = reinterpret_cast<const T *>(&ra[i]),
                    *y = reinterpret_cast<const T *>(&rr[i]);
#pragma unroll
            for (int j = 0; j < VEC(T); j++) v[i][j] = to_float(x[j]) + to_float(y[j]);
        }
        add_norm_load<T, PER_LANE>(a, residual, t + step, tokens, hidden, vectors, ra, rr);
        /* Every lane has read its whole share of the row before any lane writes it. */
        __syncwarp();
        layer_norm_store<T, PER_LANE>(v, vectors, hidden, gamma, beta, eps,
                                      out + (size_t)t * hidden);
    }
}

/* ---- bias + activation ---- */

template <typename T>
__global__ void bias_activation_kernel(cuda_batch_view b, T *x, const T *bias, int n,
                                       int activation)
{
    size_t vectors_per_row = (size_t)n / VEC(T);
    size_t total = (size_t)b.header[CUDA_HEADER_TOKENS] * vectors_per_row;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t column = (i % vectors_per_row) * VEC(T);
        float v[VEC(T)], bv[VEC(T)];
        load_vector(x + i * VEC(T), v);
        load_vector(bias + column, bv);
#pragma unroll
        for (int j = 0; j < VEC(T); j++) v[j] = activate(v[j] + bv[j], activation);
        store_vector(x + i * VEC(T), v);
    }
}

/* ---- attention, any head size: one warp per (token, head), fp32 ---- */

/* A warp walks the keys of its query's sequence 32 at a time (a key per lane), keeping a running
 * maximum and sum (online softmax) and the output in registers, a dimension per lane. Exact in
 * fp32; the path for fp32 mode and for head sizes the tensor-core kernel does not take. */
#define SIMPLE_WARPS 4

template <typename T>
__global__ void __launch_bounds__(SIMPLE_WARPS *WARP)
    attention_simple_kernel(cuda_batch_view b, const T *qkv, T *context, int hidden, int heads,
                            float scale)
{
    constexpr int PER_LANE = CUDA_MAX_HEAD / WARP;
    __shared__ float query[SIMPLE_WARPS][CUDA_MAX_HEAD];
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    size_t item = (size_t)blockIdx.x * SIMPLE_WARPS + warp;
    if (item >= (size_t)b.header[CUDA_HEADER_TOKENS] * heads) return;
    int t = (int)(item / heads), head = (int)(item % heads);
    int d = hidden / heads;
    int sequence = b.sequence_of[t];
    int start = b.offsets[sequence], len = b.offsets[sequence + 1] - start;
    size_t ld = 3 * (size_t)hidden;
    const T *q = qkv + (size_t)t * ld + (size_t)head * d;
    for (int e = lane; e < d; e += WARP) query[warp][e] = to_float(q[e]) * scale;
    __syncwarp();
    const T *keys = qkv + (size_t)start * ld + hidden + (size_t)head * d;
    const T *values = keys + hidden;
    float running_max = -INFINITY, running_sum = 0.0f, o[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) o[i] = 0.0f;
    for (int j0 = 0; j0 < len; j0 += WARP) {
        int j = j0 + lane;
        float s = -INFINITY;
        if (j < len) {
            const T *k = keys + (size_t)j * ld;
            float acc = 0.0f;
            for (int e = 0; e < d; e++) acc += query[warp][e] * to_float(k[e]);
            s = acc;
        }
        /* At least key j0 is valid, so the new maximum is finite. */
        float new_max = fmaxf(running_max, warp_max(s));
        float correction = expf(running_max - new_max);
        float p = j < len ? expf(s - new_max) : 0.0f;
        running_sum = running_sum * correction + warp_sum(p);
#pragma unroll
        for (int i = 0; i < PER_LANE; i++) o[i] *= correction;
        int n = len - j0 < WARP ? len - j0 : WARP;
        for (int jj = 0; jj < n; jj++) {
            float pj = __shfl_sync(FULL_MASK, p, jj);
            const T *v = values + (size_t)(j0 + jj) * ld;
#pragma unroll
            for (int i = 0; i < PER_LANE; i++) {
                int e = lane + i * WARP;
                if (e < d) o[i] += pj * to_float(v[e]);
            }
        }
        running_max = new_max;
    }
    T *out = context + (size_t)t * hidden + (size_t)head * d;
    float inv = 1.0f / running_sum;
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        int e = lane + i * WARP;
        if (e < d) out[e] = from_float<T>(o[i] * inv);
    }
}

/* ---- attention on tensor cores: fp16/bf16, head size 32 or 64 ---- */

/* One block per (tile of 64 queries of a sequence, head): 4 warps of 16 query rows each. Keys
 * and values come through shared memory 64 at a time; each warp computes its scores S = Q K^T
 * with mma.sync m16n8k16 (fp32 sums), keeps a running maximum and sum per row (online softmax, as
 * FlashAttention does), turns its scores into fp16/bf16 probabilities in registers (the
 * accumulator layout of S is the operand layout of P) and adds P V. Padding never exists: a
 * tile's rows and keys beyond its sequence are masked. */
#define TC_WARPS 4
#define TC_ROWS 16
#define TC_KEYS 64
/* Shared-memory rows are padded by 8 elements (16 bytes), which puts the 8 rows a fragment load
 * touches in distinct banks. */
#define TC_PAD 8

/* Two consecutive 16-bit elements as one 32-bit register (the lower index in the low half). */
template <typename T> __device__ __forceinline__ uint32_t load_pair(const T *p)
{
    return *reinterpret_cast<const uint32_t *>(p);
}

template <typename T> __device__ __forceinline__ uint32_t pair_of(T lo, T hi)
{
    uint16_t l = *reinterpret_cast<uint16_t *>(&lo), h = *reinterpret_cast<uint16_t *>(&hi);
    return (uint32_t)l | ((uint32_t)h << 16);
}

template <typename T, int D>
__global__ void __launch_bounds__(TC_WARPS *WARP)
    attention_tc_kernel(cuda_batch_view b, const T *qkv, T *context, int hidden, float scale_log2)
{
    __shared__ __align__(16) T keys[TC_KEYS][D + TC_PAD];
    __shared__ __align__(16) T values[TC_KEYS][D + TC_PAD];
    const int tile = blockIdx.x, head = blockIdx.y;
    if (tile >= b.header[CUDA_HEADER_TILES]) return; /* the whole block leaves together */
    const int sequence = b.tiles[2 * tile], q0 = b.tiles[2 * tile + 1];
    const int start = b.offsets[sequence], len = b.offsets[sequence + 1] - start;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int group = lane / 4, quad = lane % 4; /* the mma fragments' row and column parts */
    const size_t ld = 3 * (size_t)hidden;
    const T *base = qkv + (size_t)start * ld + (size_t)head * D;

    /* Q as A operands (16 x 16 per k-step): rows r0 and r0 + 8, zero beyond the sequence. */
    const int r0 = q0 + warp * TC_ROWS + group, r1 = r0 + 8;
    const bool active = q0 + warp * TC_ROWS < len;
    uint32_t qa[D / 16][4];
#pragma unroll
    for (int k = 0; k < D / 16; k++) {
        int col = k * 16 + quad * 2;
        qa[k][0] = r0 < len ? load_pair(base + (size_t)r0 * ld + col) : 0u;
        qa[k][1] = r1 < len ? load_pair(base + (size_t)r1 * ld + col) : 0u;
        qa[k][2] = r0 < len ? load_pair(base + (size_t)r0 * ld + col + 8) : 0u;
        qa[k][3] = r1 < len ? load_pair(base + (size_t)r1 * ld + col + 8) : 0u;
    }

    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float max0 = -INFINITY, max1 = -INFINITY, sum0 = 0.0f, sum1 = 0.0f;

    for (int k0 = 0; k0 < len; k0 += TC_KEYS) {
        __syncthreads(); /* the previous tile's reads are done */
        for (int c = threadIdx.x; c < TC_KEYS * (D / 8); c += TC_WARPS * WARP) {
            int row = c / (D / 8), col = (c % (D / 8)) * 8;
            uint4 k = make_uint4(0, 0, 0, 0), v = k;
            if (k0 + row < len) {
                const T *src = base + (size_t)(k0 + row) * ld + col;
                k = *reinterpret_cast<const uint4 *>(src + hidden);
                v = *reinterpret_cast<const uint4 *>(src + 2 * hidden);
            }
            *reinterpret_cast<uint4 *>(&keys[row][col]) = k;
            *reinterpret_cast<uint4 *>(&values[row][col]) = v;
        }
        __syncthreads();
        if (!active) continue;

        /* S = Q K^T: 16 rows x 64 keys, as 8 accumulators of 16 x 8. */
        float s[TC_KEYS / 8][4];
#pragma unroll
        for (int n = 0; n < TC_KEYS / 8; n++) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
            for (int k = 0; k < D / 16; k++) {
                const T *row = &keys[n * 8 + group][k * 16 + quad * 2];
                mma_type<T>::mma(s[n], qa[k], load_pair(row), load_pair(row + 8));
            }
        }
        /* Scale into log2 units and mask keys past the sequence. */
        float tile_max0 = -INFINITY, tile_max1 = -INFINITY;
#pragma unroll
        for (int n = 0; n < TC_KEYS / 8; n++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                int key = k0 + n * 8 + quad * 2 + (j & 1);
                s[n][j] = key < len ? s[n][j] * scale_log2 : -INFINITY;
                if (j < 2)
                    tile_max0 = fmaxf(tile_max0, s[n][j]);
                else
                    tile_max1 = fmaxf(tile_max1, s[n][j]);
            }
        /* A row's 64 scores live in the 4 threads of a quad. */
        tile_max0 = fmaxf(tile_max0, __shfl_xor_sync(FULL_MASK, tile_max0, 1));
        tile_max0 = fmaxf(tile_max0, __shfl_xor_sync(FULL_MASK, tile_max0, 2));
        tile_max1 = fmaxf(tile_max1, __shfl_xor_sync(FULL_MASK, tile_max1, 1));
        tile_max1 = fmaxf(tile_max1, __shfl_xor_sync(FULL_MASK, tile_max1, 2));
        /* Key k0 is valid, so both maxima are finite. */
        float new_max0 = fmaxf(max0, tile_max0), new_max1 = fmaxf(max1, tile_max1);
        float correction0 = exp2f(max0 - new_max0), correction1 = exp2f(max1 - new_max1);
        max0 = new_max0;
        max1 = new_max1;

        /* P as A operands: accumulators n = 2k and 2k + 1 hold keys 16k .. 16k + 15. */
        uint32_t pa[TC_KEYS / 16][4];
        float tile_sum0 = 0.0f, tile_sum1 = 0.0f;
#pragma unroll
        for (int k = 0; k < TC_KEYS / 16; k++) {
            float p[2][4];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                p[h][0] = exp2f(s[2 * k + h][0] - max0);
                p[h][1] = exp2f(s[2 * k + h][1] - max0);
                p[h][2] = exp2f(s[2 * k + h][2] - max1);
                p[h][3] = exp2f(s[2 * k + h][3] - max1);
                tile_sum0 += p[h][0] + p[h][1];
                tile_sum1 += p[h][2] + p[h][3];
            }
            pa[k][0] = mma_type<T>::pack(p[0][0], p[0][1]);
            pa[k][1] = mma_type<T>::pack(p[0][2], p[0][3]);
            pa[k][2] = mma_type<T>::pack(p[1][0], p[1][1]);
            pa[k][3] = mma_type<T>::pack(p[1][2], p[1][3]);
        }
        sum0 = sum0 * correction0 + tile_sum0;
        sum1 = sum1 * correction1 + tile_sum1;

        /* O = O * correction + P V: V as B operands (k = key, n = dimension). */
#pragma unroll
        for (int n = 0; n < D / 8; n++) {
            o[n][0] *= correction0;
            o[n][1] *= correction0;
            o[n][2] *= correction1;
            o[n][3] *= correction1;
#pragma unroll
            for (int k = 0; k < TC_KEYS / 16; k++) {
                int key = k * 16 + quad * 2, dim = n * 8 + group;
                uint32_t b0 = pair_of(values[key][dim], values[key + 1][dim]);
                uint32_t b1 = pair_of(values[key + 8][dim], values[key + 9][dim]);
                mma_type<T>::mma(o[n], pa[k], b0, b1);
            }
        }
    }
    if (!active) return;
    /* Each thread summed its own columns; the row's sum is the quad's. */
    sum0 += __shfl_xor_sync(FULL_MASK, sum0, 1);
    sum0 += __shfl_xor_sync(FULL_MASK, sum0, 2);
    sum1 += __shfl_xor_sync(FULL_MASK, sum1, 1);
    sum1 += __shfl_xor_sync(FULL_MASK, sum1, 2);
    float inv0 = 1.0f / sum0, inv1 = 1.0f / sum1;
    T *out = context + (size_t)start * hidden + (size_t)head * D;
#pragma unroll
    for (int n = 0; n < D / 8; n++) {
        int col = n * 8 + quad * 2;
        if (r0 < len)
            *reinterpret_cast<uint32_t *>(out + (size_t)r0 * hidden + col) =
                mma_type<T>::pack(o[n][0] * inv0, o[n][1] * inv0);
        if (r1 < len)
            *reinterpret_cast<uint32_t *>(out + (size_t)r1 * hidden + col) =
                mma_type<T>::pack(o[n][2] * inv1, o[n][3] * inv1);
    }
}

/* ---- attention on tensor cores, v2: ldmatrix fragments, cp.async double buffering ---- */

/* The work of attention_tc_kernel (a block per 64-query tile of a sequence and head, 4 warps of 16
 * query rows, keys 64 at a time, online softmax in exp2 units, fp32 sums, keys past the sequence
 * masked, rows past it never written) with less work per key tile, which is what v1 spends its
 * time on (bench/cuda-notes.md):
 * - Q, K and V reach shared memory by cp.async, 16 bytes a thread, rows past the sequence
 *   zero-filled; two key tiles are in flight: tile t + 2 is copied while tile t + 1 arrives and
 *   tile t computes, so no warp waits for a plain global load.
 * - Operand fragments come from ldmatrix, four 8 x 8 matrices an instruction: Q (A operand) and K
 *   (B operand of S = Q K^T) as stored, V (B operand of O = P V) transposed by ldmatrix.trans.
 *   v1 made 2 shared loads per K fragment and 4 16-bit loads plus packing per V fragment.
 * - The rows' sums of P come from the tensor cores: P times a 16 x 8 block of ones is one more
 *   output column tile (4 mma a key tile in place of 32 adds a thread). It sums the rounded
 *   probabilities, the ones the numerator uses.
 * - exp2 is the bare ex2.approx instruction, the scale folded into the subtraction of the row's
 *   maximum (one FFMA a score; masked scores are -inf, ex2(-inf) = 0).
 * - Key tiles wholly inside the sequence take a path without masks; the last one skips its
 *   16-key chunks past the sequence (short texts: a 16-token text does a quarter of the work).
 * - Blocks run head-fastest (block = tile * heads + head): a tile's heads run together and read
 *   whole qkv rows from DRAM, and a sequence's tiles run close together and share K and V in L2.
 * Results depend only on the query's own sequence, as v1's. */
#define TC2_STAGES 2
/* Blocks a multiprocessor should hold (registers: 80 a thread at d 32, 128 at d 64). */
#define TC2_MIN_BLOCKS(D) ((D) == 32 ? 6 : 4)

/* 16 bytes from global to shared memory, asynchronously (cp.async.cg: through L2 only); with
 * valid false nothing is read (src-size 0) and the 16 bytes become zeros. */
__device__ __forceinline__ void copy_async_16(uint32_t dst, const void *src, bool valid)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst),
                 "l"(__cvta_generic_to_global(src)), "r"(valid ? 16 : 0)
                 : "memory");
}

/* Closes this thread's group of copies issued since the last commit (an empty group is fine). */
__device__ __forceinline__ void copy_async_commit()
{
    asm volatile("cp.async.commit_group;" ::: "memory");
}

/* Waits until at most N of this thread's groups are still in flight; other threads' copies are
 * visible after a __syncthreads that follows. */
template <int N> __device__ __forceinline__ void copy_async_wait()
{
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

/* The same with .trans (each matrix read column-major): register r[m] of lane l receives, of
 * matrix m as stored, rows 2 (l % 4) and 2 (l % 4) + 1 of column l / 4 (the lower row in the low
 * half). */
__device__ __forceinline__ void load_matrix_x4_trans(uint32_t *r, uint32_t address)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address)
                 : "memory");
}

/* 2^x by the special function unit alone (ex2.approx.ftz: relative error ~2^-22, -inf gives +0). */
__device__ __forceinline__ float fast_exp2(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

/* Fragment layouts of mma.sync m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16 with
 * floating point type"); group = lane / 4, quad = lane % 4; each 32-bit register holds two 16-bit
 * elements, the lower index in the low half:
 *   A (16 x 16, row-major): a0 = A[group][2 quad, +1], a1 = A[group + 8][2 quad, +1],
 *                           a2 = A[group][2 quad + 8, +9], a3 = A[group + 8][2 quad + 8, +9]
 *   B (16 x 8, k x n):      b0 = B[2 quad, +1][group], b1 = B[2 quad + 8, +9][group]
 *   C (16 x 8, fp32):       c0, c1 = C[group][2 quad, +1], c2, c3 = C[group + 8][2 quad, +1]
 * How ldmatrix .x4 fills them, matrix m of the four from lane addresses 8 m .. 8 m + 7:
 *   Q as A: matrix m = rows 8 (m & 1) .. +7, columns 8 (m >> 1) .. +7 of the 16 x 16 block: r[m]
 *     is a_m (a0: rows 0-7 cols 0-7, a1: rows 8-15 cols 0-7, a2: rows 0-7 cols 8-15, a3: 8-15).
 *   K as B of S = Q K^T (B[k][n] = K[key n][dim k], so b0 = K[key group][dims 2 quad, +1], a row
 *     piece of K as stored): matrix m = keys 8 (m >> 1) .. +7, dims 8 (m & 1) .. +7: r[0], r[1]
 *     are b0, b1 of keys 0-7 (n tile 2c), r[2], r[3] of keys 8-15 (n tile 2c + 1).
 *   V as B of O = P V (B[k][n] = V[key k][dim n], so b0 = V[keys 2 quad, +1][dim group], a column
 *     piece: .trans): matrix m = keys 8 (m & 1) .. +7, dims 8 (m >> 1) .. +7: r[0], r[1] are b0,
 *     b1 of dims 0-7 (n tile 2 np), r[2], r[3] of dims 8-15 (n tile 2 np + 1).
 *   P as A from the S accumulators: keys 16 c .. 16 c + 15 are n tiles 2c (keys 0-7: a0 = c0, c1,
 *     a1 = c2, c3) and 2c + 1 (keys 8-15: a2 = c0, c1, a3 = c2, c3), as in v1.
 * Shared rows are D + 8 elements (80 or 144 bytes): the 8 rows of one matrix start 20 or 36 words
 * apart, in 8 distinct 4-bank groups, so every ldmatrix phase is free of bank conflicts. */
/* Copies a 64-row tile (rows `ld` elements apart in global memory, D wide) into shared memory at
 * dst (rows 2 (D + 8) bytes apart): rows < rows from src, rows up to the next multiple of 16 as
 * zeros (read by the mma of a chunk that holds keys or queries of the sequence), the rest left as
 * they are (never read). Thread i copies columns 8 (i % (D / 8)) .. +7 of rows i / (D / 8) + 128 /
 * (D / 8) j: a row's pieces come from consecutive threads. */
template <typename T, int D>
__device__ __forceinline__ void attention_tc2_copy(uint32_t dst, const T *src, size_t ld, int rows)
{
    constexpr int CHUNKS = D / 8, PASS = TC_WARPS * WARP / CHUNKS, ROW_BYTES = 2 * (D + TC_PAD);
    const int row = threadIdx.x / CHUNKS, col = (threadIdx.x % CHUNKS) * 8;
    const int wanted = (rows + 15) & ~15;
#pragma unroll
    for (int i = 0; i < TC_KEYS / PASS; i++) {
        int r = row + i * PASS;
        if (r < wanted)
            copy_async_16(dst + r * ROW_BYTES + col * 2,
                          src + (size_t)(r < rows ? r : 0) * ld + col, r < rows);
    }
}

/* One key tile of one warp: S = Q K^T for 16 rows x 16 CHUNKS keys, the online softmax update and
 * O += P V (with the row sums in o[D / 8]). The tile's first CHUNKS 16-key chunks hold keys of
 * the sequence, `keys` of them (16 CHUNKS unless MASK); the rest is skipped. A template per chunk
 * count keeps every loop unrolled and branch-free, so the registers of o stay put. q_lane, k_lane
 * and v_lane: this lane's ldmatrix addresses in the warp's Q and the tile's K and V (see the
 * caller). */
template <typename T, int D, int CHUNKS, bool MASK>
__device__ __forceinline__ void attention_tc2_tile(uint32_t q_lane, float (&o)[D / 8 + 1][4],
                                                   float &max0, float &max1, uint32_t k_lane,
                                                   uint32_t v_lane, int keys, float scale_log2)
{
    constexpr int ROW_BYTES = 2 * (D + TC_PAD);
    const int quad = threadIdx.x % 4;
    /* The warp's queries as A operands, dims 16k .. 16k + 15 in qa[k]: read again each tile from
     * shared memory (D / 16 ldmatrix) rather than held in D / 2 registers through the loop. */
    uint32_t qa[D / 16][4];
#pragma unroll
    for (int k = 0; k < D / 16; k++) load_matrix_x4(qa[k], q_lane + k * 32);

    /* S: chunk c is n tiles 2c and 2c + 1; ldmatrix c, k gives both tiles' b0, b1 for dims
     * 16k .. 16k + 15. */
    float s[2 * CHUNKS][4];
#pragma unroll
    for (int c = 0; c < CHUNKS; c++) {
#pragma unroll
        for (int j = 0; j < 4; j++) s[2 * c][j] = s[2 * c + 1][j] = 0.0f;
#pragma unroll
        for (int k = 0; k < D / 16; k++) {
            uint32_t kb[4];
            load_matrix_x4(kb, k_lane + c * 16 * ROW_BYTES + k * 32);
            mma_type<T>::mma(s[2 * c], qa[k], kb[0], kb[1]);
            mma_type<T>::mma(s[2 * c + 1], qa[k], kb[2], kb[3]);
        }
    }
    /* Keys past the sequence: -inf. s[n][j] is key 8n + 2 quad + (j & 1) of the tile. */
    if (MASK) {
        const int limit = keys - 2 * quad;
#pragma unroll
        for (int n = 0; n < 2 * CHUNKS; n++)
#pragma unroll
            for (int j = 0; j < 4; j++)
                if (n * 8 + (j & 1) >= limit) s[n][j] = -INFINITY;
    }
    /* Row maxima in raw score units (the scale is positive): rows group and group + 8, whose 64
     * scores live in the 4 lanes of a quad. Key 0 of the tile is in the sequence, so both are
     * finite (a row past the sequence has Q = 0 and scores 0). */
    float m0 = max0, m1 = max1;
#pragma unroll
    for (int n = 0; n < 2 * CHUNKS; n++) {
        m0 = fmaxf(m0, fmaxf(s[n][0], s[n][1]));
        m1 = fmaxf(m1, fmaxf(s[n][2], s[n][3]));
    }
    m0 = fmaxf(m0, __shfl_xor_sync(FULL_MASK, m0, 1));
    m1 = fmaxf(m1, __shfl_xor_sync(FULL_MASK, m1, 1));
    m0 = fmaxf(m0, __shfl_xor_sync(FULL_MASK, m0, 2));
    m1 = fmaxf(m1, __shfl_xor_sync(FULL_MASK, m1, 2));
    /* The first tile: max0 = -inf, correction ex2(-inf) = 0 on o = 0. */
    const float correction0 = fast_exp2((max0 - m0) * scale_log2);
    const float correction1 = fast_exp2((max1 - m1) * scale_log2);
    max0 = m0;
    max1 = m1;
    const float shift0 = m0 * scale_log2, shift1 = m1 * scale_log2;

    /* P = 2^(s scale - max scale) as A operands, chunk by chunk. */
    uint32_t pa[CHUNKS][4];
#pragma unroll
    for (int c = 0; c < CHUNKS; c++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const float *t = s[2 * c + h];
            pa[c][2 * h] = mma_type<T>::pack(fast_exp2(fmaf(t[0], scale_log2, -shift0)),
                                             fast_exp2(fmaf(t[1], scale_log2, -shift0)));
            pa[c][2 * h + 1] = mma_type<T>::pack(fast_exp2(fmaf(t[2], scale_log2, -shift1)),
                                                 fast_exp2(fmaf(t[3], scale_log2, -shift1)));
        }
    }

    /* O = O * correction + P V; o[D / 8] = sums * correction + P ones. */
#pragma unroll
    for (int n = 0; n <= D / 8; n++) {
        o[n][0] *= correction0;
        o[n][1] *= correction0;
        o[n][2] *= correction1;
        o[n][3] *= correction1;
    }
#pragma unroll
    for (int np = 0; np < D / 16; np++)
#pragma unroll
        for (int c = 0; c < CHUNKS; c++) {
            uint32_t vb[4];
            load_matrix_x4_trans(vb, v_lane + c * 16 * ROW_BYTES + np * 32);
            mma_type<T>::mma(o[2 * np], pa[c], vb[0], vb[1]);
            mma_type<T>::mma(o[2 * np + 1], pa[c], vb[2], vb[3]);
        }
    const uint32_t ones = mma_type<T>::pack(1.0f, 1.0f);
#pragma unroll
    for (int c = 0; c < CHUNKS; c++) mma_type<T>::mma(o[D / 8], pa[c], ones, ones);
}

/* Attention v2 for one (tile, head), `block` = tile * heads + head, by threads 0-127 (warps past
 * the fourth, in the persistent pass's blocks of 8, only take part in the barriers). */
template <typename T, int D>
__device__ __forceinline__ void attention_tc2_body(const cuda_batch_view &b, const T *qkv,
                                                   T *context, int hidden, int heads, float scale,
                                                   int block)
{
    constexpr int ROW_BYTES = 2 * (D + TC_PAD), STAGE_BYTES = TC_KEYS * ROW_BYTES;
    __shared__ __align__(16) T q_tile[CUDA_ATTENTION_TILE * (D + TC_PAD)];
    __shared__ __align__(16) T k_tiles[TC2_STAGES * TC_KEYS * (D + TC_PAD)];
    __shared__ __align__(16) T v_tiles[TC2_STAGES * TC_KEYS * (D + TC_PAD)];
    const int tile = block / heads, head = block % heads;
    if (tile >= b.header[CUDA_HEADER_TILES]) return; /* the whole block leaves together */
    const int sequence = b.tiles[2 * tile], q0 = b.tiles[2 * tile + 1];
    const int start = b.offsets[sequence], len = b.offsets[sequence + 1] - start;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const size_t ld = 3 * (size_t)hidden;
    const T *base = qkv + (size_t)start * ld + (size_t)head * D;
    const uint32_t q_smem = shared_address(q_tile), k_smem = shared_address(k_tiles),
                   v_smem = shared_address(v_tiles);

    /* Copies: the tile's queries (those of warps with rows in the sequence, zeros past it) with
     * key tile 0 as group 0, key tile 1 as group 1 (empty when there is none). K and V of a key
     * tile: rows up to the next multiple of 16 past the sequence, zero-filled. */
    const int q_rows = len - q0 < CUDA_ATTENTION_TILE ? len - q0 : CUDA_ATTENTION_TILE;
    const bool copier = threadIdx.x < TC_WARPS * WARP;
    if (copier) attention_tc2_copy<T, D>(q_smem, base + (size_t)q0 * ld, ld, q_rows);
#pragma unroll
    for (int t = 0; t < TC2_STAGES; t++) {
        if (copier && t * TC_KEYS < len) {
            int k0 = t * TC_KEYS, rows = len - k0 < TC_KEYS ? len - k0 : TC_KEYS;
            const T *keys = base + (size_t)k0 * ld + hidden;
            attention_tc2_copy<T, D>(k_smem + t * STAGE_BYTES, keys, ld, rows);
            attention_tc2_copy<T, D>(v_smem + t * STAGE_BYTES, keys + hidden, ld, rows);
        }
        copy_async_commit();
    }

    /* This lane's ldmatrix addresses (see the fragment layouts above): Q and V take matrix m =
     * rows 8 (m & 1), columns 8 (m >> 1); K takes rows 8 (m >> 1), columns 8 (m & 1). */
    const int m = lane / 8, r = lane % 8;
    const uint32_t q_lane = q_smem + (warp * TC_ROWS + r + (m & 1) * 8) * ROW_BYTES + (m >> 1) * 16;
    const uint32_t k_lane = k_smem + (r + (m >> 1) * 8) * ROW_BYTES + (m & 1) * 16;
    const uint32_t v_lane = v_smem + (r + (m & 1) * 8) * ROW_BYTES + (m >> 1) * 16;

    const bool active = warp < TC_WARPS && q0 + warp * TC_ROWS < len;
    float o[D / 8 + 1][4];
#pragma unroll
    for (int n = 0; n <= D / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float max0 = -INFINITY, max1 = -INFINITY;

    /* Key tile t is in copy group t and in stage t % 2 (stage: its byte offset there). */
    for (int k0 = 0, stage = 0; k0 < len; k0 += TC_KEYS, stage ^= STAGE_BYTES) {
        /* Groups 0 .. t + 1 are committed (t = k0 / 64): tile t has arrived once at most one
         * group is in flight, and is visible to all after the barrier. */
        copy_async_wait<TC2_STAGES - 1>();
        __syncthreads();
        if (active) {
            const uint32_t k_at = k_lane + stage, v_at = v_lane + stage;
            const int keys = len - k0;
            /* Uniform over the block: a whole tile without masks, or the last one's chunks. */
            if (keys >= TC_KEYS)
                attention_tc2_tile<T, D, 4, false>(q_lane, o, max0, max1, k_at, v_at, keys, scale);
            else if (keys > 48)
                attention_tc2_tile<T, D, 4, true>(q_lane, o, max0, max1, k_at, v_at, keys, scale);
            else if (keys > 32)
                attention_tc2_tile<T, D, 3, true>(q_lane, o, max0, max1, k_at, v_at, keys, scale);
            else if (keys > 16)
                attention_tc2_tile<T, D, 2, true>(q_lane, o, max0, max1, k_at, v_at, keys, scale);
            else
                attention_tc2_tile<T, D, 1, true>(q_lane, o, max0, max1, k_at, v_at, keys, scale);
        }
        const int k1 = k0 + TC2_STAGES * TC_KEYS;
        if (k1 < len) {
            __syncthreads(); /* every warp is done with this stage */
            const int rows = len - k1 < TC_KEYS ? len - k1 : TC_KEYS;
            const T *keys = base + (size_t)k1 * ld + hidden;
            if (copier) {
                attention_tc2_copy<T, D>(k_smem + stage, keys, ld, rows);
                attention_tc2_copy<T, D>(v_smem + stage, keys + hidden, ld, rows);
            }
        }
        copy_async_commit();
    }
    if (!active) return;
    const int first = q0 + warp * TC_ROWS;
    /* o[D / 8] holds each row's sum in all its columns, already over the whole quad. */
    const float inv0 = 1.0f / o[D / 8][0], inv1 = 1.0f / o[D / 8][2];
    const int group = lane / 4, quad = lane % 4;
    const int r0 = first + group, r1 = r0 + 8;
    T *out = context + (size_t)start * hidden + (size_t)head * D;
#pragma unroll
    for (int n = 0; n < D / 8; n++) {
        int col = n * 8 + quad * 2;
        if (r0 < len)
            *reinterpret_cast<uint32_t *>(out + (size_t)r0 * hidden + col) =
                mma_type<T>::pack(o[n][0] * inv0, o[n][1] * inv0);
        if (r1 < len)
            *reinterpret_cast<uint32_t *>(out + (size_t)r1 * hidden + col) =
                mma_type<T>::pack(o[n][2] * inv1, o[n][3] * inv1);
    }
}

template <typename T, int D>
__global__ void __launch_bounds__(TC_WARPS *WARP, TC2_MIN_BLOCKS(D))
    attention_tc2_kernel(cuda_batch_view b, const T *qkv, T *context, int hidden, int heads,
                         float scale)
{
    /* Launched programmatically (small-batch path): wait for the QKV product, and let the next
     * product start copying its weights. Neither does anything in an ordinary launch. */
    grid_dependency_wait();
    grid_dependency_trigger();
    attention_tc2_body<T, D>(b, qkv, context, hidden, heads, scale, blockIdx.x);
}

/* ---- small-batch GEMMs: at most 64 rows, fused epilogues (EMBEDRAG_CUDA_SMALL) ---- */

/* A query's products are tiny (16 rows: 12 KB of activations against 0.3 to 1.2 MB of weights), so
 * cuBLASLt's kernels take ~4.5 us each for what streaming the weights would do in well under one,
 * and the separate LayerNorm and activation kernels add their own launches (bench/cuda-notes.md).
 * This kernel does a whole product and its epilogue in one launch:
 * - A block of 8 warps per slice of BN output columns (BN = 32, 16 or 8: the widest that still
 *   gives 64 blocks, see cuda_small_gemm_columns), all rows: N / BN blocks.
 * - The block's slice of W (BN rows of K) is copied into shared memory whole by cp.async, before
 *   grid_dependency_wait: launched programmatically, that copy overlaps the kernel ahead.
 * - X (rows x K) then streams through a ring of SMALL_STAGES chunks of KC columns (KC = 256, 128
 *   or 64 for 1, 2, or 3-4 row tiles: ~8 KB a chunk), SMALL_STAGES - 1 in flight; rows past the
 *   batch's tokens and columns past K are zero-filled, never read. One barrier a chunk.
 * - mma.sync m16n8k16 with fp32 sums, fragments by ldmatrix with attention v2's layouts: X as its
 *   Q (A operand), W as its K (B operand, rows of W are columns of Y). Warps split K: warp
 *   (nw, kw) takes n tiles nw NTW .. +NTW - 1 (NTW = 2, or 1 when BN = 8) of every row tile and
 *   the 16-column k steps g with g % WK == kw, the same steps whatever the row count, so a row's
 *   sums do not depend on the other rows (a text alone gives the bits it gives in any batch this
 *   kernel takes).
 * - The WK partial sums meet in shared memory (the ring's space) and are added in a fixed order;
 *   then the epilogue, 8 columns a thread: bias, activation, or bias (rounded to the dtype, as
 *   cuBLASLt's output is) + residual into an fp32 scratch row for the LayerNorm, which the last
 *   block to finish applies to every row (a warp a row, the formula of cuda_add_layer_norm). */
#define SMALL_WARPS 8
#define SMALL_THREADS (SMALL_WARPS * WARP)
#define SMALL_STAGES 6
#define SMALL_PAD 8
/* Shared memory a block may take (2 blocks a multiprocessor up to ~113 KB each). */
#define SMALL_MAX_SHARED (160 * 1024)
/* Column slices are made narrower until there are this many blocks. */
#define SMALL_MIN_BLOCKS 64

/* ldmatrix .x2: two 8 x 8 matrices from the addresses of lanes 0-15 (the others' are ignored);
 * register r[m] of lane l holds row l / 4, columns 2 (l % 4), +1 of matrix m. */
__device__ __forceinline__ void load_matrix_x2(uint32_t *r, uint32_t address)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(address)
                 : "memory");
}

/* A 16-byte vector read at L2 (another block or the kernel ahead wrote it; never from L1). */
template <typename T> __device__ __forceinline__ void load_vector_l2(const T *p, float *out)
{
    uint4 raw = __ldcg(reinterpret_cast<const uint4 *>(p));
    const T *v = reinterpret_cast<const T *>(&raw);
#pragma unroll
    for (int i = 0; i < VEC(T); i++) out[i] = to_float(v[i]);
}

/* Columns of X a chunk for a launch of `rows` rows: ~8 KB of fp16 whatever the row tiles. */
static __host__ __device__ int small_chunk_columns(int rows)
{
    int tiles = (rows + 15) / 16;
    return tiles == 1 ? 256 : tiles == 2 ? 128 : 64;
}

/* Columns of X a stage holds: a chunk, or all of X (kp) where the kernel normalizes it. */
static __host__ __device__ int small_x_columns(int rows, int kp, bool norm_x)
{
    return norm_x ? kp : small_chunk_columns(rows);
}

/* The GPU's nanosecond clock (the same on every multiprocessor). */
__device__ __forceinline__ unsigned long long global_ns()
{
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

/* Stamp i of a trace slot, by thread 0 (no trace: nothing). */
__device__ __forceinline__ void trace_stamp(unsigned long long *trace, int i)
{
    if (trace && threadIdx.x == 0) trace[i] = global_ns();
}

template <typename T> struct small_args {
    const T *x, *w, *bias, *residual;
    T *y;
    const float *gamma, *beta;
    float *scratch;
    /* X normalized here (x_scratch non-NULL): X = LayerNorm(x_scratch rows) * x_gamma + x_beta,
     * kc = kp (all of X in one stage); block 0 also writes X to x_out (when non-NULL). */
    const float *x_scratch, *x_gamma, *x_beta;
    T *x_out;
    unsigned *counter;
    /* Or NULL: this block's 5 time stamps of the step (the persistent pass's trace): before the
     * wait, after it, X and W in shared memory, the products done, the epilogue done. */
    unsigned long long *trace;
    const int *header;
    int rows; /* the launch's rows (the header's tokens are used where fewer) */
    int n, k; /* Y is rows x n, X rows x k, W n x k */
    int kp;   /* k rounded up to 16 (zeros past k) */
    int kc;   /* columns of X a chunk */
    int activation;
    float eps;
};

/* Chunk `chunk` of X (columns chunk kc .. +kc - 1, up to kp) into shared memory at dst, rows
 * x_row bytes apart: rows past `rows` and columns past k as zeros. A row's 16-byte pieces come
 * from consecutive threads. */
template <typename T>
__device__ __forceinline__ void small_copy_x(uint32_t dst, const small_args<T> &a, int chunk,
                                             int rows, int rows_pad, int x_row)
{
    const int k0 = chunk * a.kc, width = a.kp - k0 < a.kc ? a.kp - k0 : a.kc, pieces = width / 8;
    for (int p = threadIdx.x; p < rows_pad * pieces; p += SMALL_THREADS) {
        const int r = p / pieces, c = (p % pieces) * 8;
        const bool valid = r < rows && k0 + c < a.k;
        copy_async_16(dst + r * x_row + c * 2, a.x + (valid ? (size_t)r * a.k + k0 + c : 0), valid);
    }
}

/* 8 floats of one warp's partial sums (16-byte aligned). */
__device__ __forceinline__ void small_partial(const float *p, float *out)
{
    float4 lo = reinterpret_cast<const float4 *>(p)[0], hi = reinterpret_cast<const float4 *>(p)[1];
    out[0] = lo.x;
    out[1] = lo.y;
    out[2] = lo.z;
    out[3] = lo.w;
    out[4] = hi.x;
    out[5] = hi.y;
    out[6] = hi.z;
    out[7] = hi.w;
}

/* A warp's share of one fp32 scratch row (another block or the kernel ahead wrote it, so read at
 * L2): lane's vectors lane, lane + 32, ... of 8 floats, `vectors` in the row. */
template <int PER_LANE>
__device__ __forceinline__ void small_load_row(const float *src, int vectors, float (*v)[8])
{
    const int lane = threadIdx.x % WARP;
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        int c = lane + i * WARP;
        if (c >= vectors) continue;
        float4 lo = __ldcg(reinterpret_cast<const float4 *>(src + (size_t)c * 8));
        float4 hi = __ldcg(reinterpret_cast<const float4 *>(src + (size_t)c * 8 + 4));
        v[i][0] = lo.x;
        v[i][1] = lo.y;
        v[i][2] = lo.z;
        v[i][3] = lo.w;
        v[i][4] = hi.x;
        v[i][5] = hi.y;
        v[i][6] = hi.z;
        v[i][7] = hi.w;
    }
}

/* The last block's LayerNorm: each warp takes rows warp, warp + 8, ... two at a time (both rows'
 * loads in flight together), from the fp32 scratch rows the blocks wrote. */
template <typename T>
__device__ __forceinline__ void small_norm_rows(const small_args<T> &a, int rows)
{
    constexpr int PER_LANE = CUDA_MAX_HIDDEN / VEC(T) / WARP;
    const int warp = threadIdx.x / WARP, vectors = a.n / VEC(T);
    for (int row = warp; row < rows; row += 2 * SMALL_WARPS) {
        const bool second = row + SMALL_WARPS < rows; /* uniform over the warp */
        float v[2][PER_LANE][VEC(T)];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            if (h == 1 && !second) break;
            small_load_row<PER_LANE>(a.scratch + (size_t)(row + h * SMALL_WARPS) * a.n, vectors,
                                     v[h]);
        }
        layer_norm_store<T, PER_LANE>(v[0], vectors, a.n, a.gamma, a.beta, a.eps,
                                      a.y + (size_t)row * a.n);
        if (second)
            layer_norm_store<T, PER_LANE>(v[1], vectors, a.n, a.gamma, a.beta, a.eps,
                                          a.y + (size_t)(row + SMALL_WARPS) * a.n);
    }
}

/* X of a launch that normalizes it (x_scratch): each warp takes rows warp, warp + 8, ... of the
 * fp32 rows the kernel ahead left in x_scratch (a CUDA_SMALL_SUM epilogue), normalizes them as
 * small_norm_rows does (the same formula, so the same bits), and stores them in the dtype into
 * the block's X stage at `stage` (rows x_row bytes apart), zeros past k and past `rows` up to
 * rows_pad; the first block also stores them to x_out, the residual of the next product. */
template <typename T>
__device__ __forceinline__ void small_norm_x(const small_args<T> &a, unsigned char *stage, int rows,
                                             int rows_pad, int x_row, bool first)
{
    constexpr int PER_LANE = CUDA_MAX_HIDDEN / VEC(T) / WARP;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, vectors = a.k / VEC(T);
    for (int row = warp; row < rows_pad; row += SMALL_WARPS) {
        T *dst = reinterpret_cast<T *>(stage + (size_t)row * x_row);
        if (row >= rows) {
            for (int c = lane; c < a.kp / VEC(T); c += WARP)
                reinterpret_cast<uint4 *>(dst)[c] = make_uint4(0, 0, 0, 0);
            continue;
        }
        float v[PER_LANE][VEC(T)];
        small_load_row<PER_LANE>(a.x_scratch + (size_t)row * a.k, vectors, v);
        layer_norm_store<T, PER_LANE>(v, vectors, a.k, a.x_gamma, a.x_beta, a.eps, dst);
        for (int c = vectors + lane; c < a.kp / VEC(T); c += WARP)
            reinterpret_cast<uint4 *>(dst)[c] = make_uint4(0, 0, 0, 0);
        if (first && a.x_out)
            layer_norm_store<T, PER_LANE>(v, vectors, a.k, a.x_gamma, a.x_beta, a.eps,
                                          a.x_out + (size_t)row * a.k);
    }
}

template <typename T, int BN, int EPILOGUE, typename Wait>
__device__ __forceinline__ void small_gemm_body(const small_args<T> &a, int block, int blocks,
                                                Wait wait)
{
    /* n tiles of 8 columns: a warp takes NTW of them, WN warps side by side, WK along K. */
    constexpr int NT = BN / 8, NTW = NT >= 2 ? 2 : 1, WN = NT / NTW, WK = SMALL_WARPS / WN;
    static_assert(VEC(T) == 8 && BN % 8 == 0 && WN * NTW == NT && WN * WK == SMALL_WARPS,
                  "small GEMM tiling");
    extern __shared__ __align__(16) unsigned char small_shared[];
    __shared__ int last_block;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int col0 = block * BN;
    /* Shared rows padded by 16 bytes: (kp + 8) and (kc + 8) elements are 4 words past a multiple
     * of 8 words, so an ldmatrix's 8 rows fall in 8 distinct 4-bank groups. */
    const int w_row = 2 * (a.kp + SMALL_PAD), x_row = 2 * (a.kc + SMALL_PAD);
    const uint32_t w_smem = shared_address(small_shared), x_smem = w_smem + BN * w_row;

    /* W's slice: weights, written by no kernel, so copied before the wait. Copy group 0. */
    const int w_pieces = a.kp / 8;
    for (int p = threadIdx.x; p < BN * w_pieces; p += SMALL_THREADS) {
        const int r = p / w_pieces, c = (p % w_pieces) * 8;
        const bool valid = c < a.k;
        copy_async_16(w_smem + r * w_row + c * 2, a.w + (size_t)(col0 + r) * a.k + (valid ? c : 0),
                      valid);
    }
    copy_async_commit();
    trace_stamp(a.trace, 0);
    wait();
    trace_stamp(a.trace, 1);

    int rows = a.header[CUDA_HEADER_TOKENS];
    rows = rows < a.rows ? rows : a.rows;
    const int mtiles = (rows + 15) / 16, rows_pad = 16 * mtiles, stage_bytes = rows_pad * x_row;
    const int chunks = (a.kp + a.kc - 1) / a.kc, chunk_steps = a.kc / 16, ksteps = a.kp / 16;
    /* Chunks 0 .. SMALL_STAGES - 2 as groups 1 .. SMALL_STAGES - 1 (empty past the last); or X
     * normalized here into its one stage (the loop's first barrier publishes it). */
    const bool norm_x = a.x_scratch != nullptr;
    if (norm_x) small_norm_x(a, small_shared + BN * w_row, rows, rows_pad, x_row, block == 0);
#pragma unroll
    for (int s = 0; s < SMALL_STAGES - 1; s++) {
        if (s < chunks && !norm_x)
            small_copy_x(x_smem + s * stage_bytes, a, s, rows, rows_pad, x_row);
        copy_async_commit();
    }

    /* This lane's ldmatrix addresses (attention v2's layouts): X as A, matrix m = rows 8 (m & 1),
     * columns 8 (m >> 1) of a 16 x 16 block; W as B, NTW = 2: matrix m = W rows (columns of Y)
     * 8 (m >> 1), k columns 8 (m & 1): r[0], r[1] are b0, b1 of n tile 0, r[2], r[3] of n tile 1;
     * NTW = 1 (.x2, lanes 0-15): matrix m = W rows 0-7, k columns 8 m: r[0], r[1] = b0, b1. */
    const int m = lane / 8, r8 = lane % 8, nw = warp % WN, kw = warp / WN;
    const uint32_t a_lane = (r8 + (m & 1) * 8) * x_row + (m >> 1) * 16;
    const uint32_t b_lane =
        w_smem + (nw * 8 * NTW + r8 + (NTW == 2 ? (m >> 1) * 8 : 0)) * w_row + (m & 1) * 16;

    float acc[4][NTW][4];
#pragma unroll
    for (int mt = 0; mt < 4; mt++)
#pragma unroll
        for (int t = 0; t < NTW; t++)
            acc[mt][t][0] = acc[mt][t][1] = acc[mt][t][2] = acc[mt][t][3] = 0.0f;

    for (int c = 0; c < chunks; c++) {
        /* Groups 0 .. c + SMALL_STAGES - 1 are committed: chunk c (group c + 1) and W (group 0)
         * have arrived once at most SMALL_STAGES - 2 are in flight. The barrier also tells that
         * every warp is done with chunk c - 1, whose stage the next copy refills. */
        copy_async_wait<SMALL_STAGES - 2>();
        __syncthreads();
        if (c == 0) trace_stamp(a.trace, 2);
        const int next = c + SMALL_STAGES - 1;
        if (next < chunks && !norm_x)
            small_copy_x(x_smem + (next % SMALL_STAGES) * stage_bytes, a, next, rows, rows_pad,
                         x_row);
        copy_async_commit();
        const uint32_t stage = x_smem + (c % SMALL_STAGES) * stage_bytes + a_lane;
        const int g0 = c * chunk_steps, g1 = g0 + chunk_steps < ksteps ? g0 + chunk_steps : ksteps;
        for (int g = g0 + (kw - g0 % WK + WK) % WK; g < g1; g += WK) {
            uint32_t bf[4];
            if constexpr (NTW == 2)
                load_matrix_x4(bf, b_lane + g * 32);
            else
                load_matrix_x2(bf, b_lane + g * 32);
            const uint32_t at = stage + (g - g0) * 32;
#pragma unroll
            for (int mt = 0; mt < 4; mt++) {
                if (mt >= mtiles) break;
                uint32_t af[4];
                load_matrix_x4(af, at + mt * 16 * x_row);
                mma_type<T>::mma(acc[mt][0], af, bf[0], bf[1]);
                if constexpr (NTW == 2) mma_type<T>::mma(acc[mt][1], af, bf[2], bf[3]);
            }
        }
    }

    /* Partial sums: red[kw][row][column] (fp32, rows rows_pad, BN columns), in the ring's space
     * once every warp is done with it (no copy is in flight: the groups after the last chunk's
     * are empty). Accumulator c0, c1 = rows group, columns 2 quad, +1; c2, c3 = row group + 8. */
    __syncthreads();
    trace_stamp(a.trace, 3);
    float *red = reinterpret_cast<float *>(small_shared + BN * w_row);
    const int group = lane / 4, quad = lane % 4;
#pragma unroll
    for (int mt = 0; mt < 4; mt++) {
        if (mt >= mtiles) break;
#pragma unroll
        for (int t = 0; t < NTW; t++) {
            float *p = red + ((size_t)kw * rows_pad + mt * 16 + group) * BN + (nw * NTW + t) * 8 +
                       2 * quad;
            *reinterpret_cast<float2 *>(p) = make_float2(acc[mt][t][0], acc[mt][t][1]);
            *reinterpret_cast<float2 *>(p + 8 * BN) = make_float2(acc[mt][t][2], acc[mt][t][3]);
        }
    }
    __syncthreads();

    /* The epilogue, 8 columns (16 bytes of Y) a thread. */
    constexpr int VECS = BN / 8;
    for (int v = threadIdx.x; v < rows * VECS; v += SMALL_THREADS) {
        const int row = v / VECS, c8 = (v % VECS) * 8, col = col0 + c8;
        float y[8], t[8];
        small_partial(red + (size_t)row * BN + c8, y);
#pragma unroll
        for (int kk = 1; kk < WK; kk++) {
            small_partial(red + ((size_t)kk * rows_pad + row) * BN + c8, t);
#pragma unroll
            for (int j = 0; j < 8; j++) y[j] += t[j];
        }
        load_vector(a.bias + col, t);
#pragma unroll
        for (int j = 0; j < 8; j++) y[j] += t[j];
        if constexpr (EPILOGUE == CUDA_SMALL_ACTIVATION) {
#pragma unroll
            for (int j = 0; j < 8; j++) y[j] = activate(y[j], a.activation);
        }
        if constexpr (EPILOGUE == CUDA_SMALL_NORM || EPILOGUE == CUDA_SMALL_SUM) {
            /* The product rounded to the dtype, then the residual added in fp32: what
             * cuda_add_layer_norm does with cuBLASLt's output, so that the two paths round at
             * the same places. */
#pragma unroll
            for (int j = 0; j < 8; j++) y[j] = to_float(from_float<T>(y[j]));
            load_vector_l2(a.residual + (size_t)row * a.n + col, t);
            float4 *out = reinterpret_cast<float4 *>(a.scratch + (size_t)row * a.n + col);
            out[0] = make_float4(y[0] + t[0], y[1] + t[1], y[2] + t[2], y[3] + t[3]);
            out[1] = make_float4(y[4] + t[4], y[5] + t[5], y[6] + t[6], y[7] + t[7]);
        } else {
            store_vector(a.y + (size_t)row * a.n + col, y);
        }
    }
    trace_stamp(a.trace, 4);
    if constexpr (EPILOGUE == CUDA_SMALL_NORM) {
        /* The last block to get here normalizes every row: each thread's scratch writes are
         * made visible device-wide before the block counts itself (the threadFenceReduction
         * pattern of the CUDA samples); the last one resets the counter for the next launch. */
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned ticket = atomicAdd(a.counter, 1u);
            last_block = ticket == (unsigned)blocks - 1;
            if (last_block) atomicExch(a.counter, 0u);
            __threadfence();
        }
        __syncthreads();
        if (!last_block) return;
        small_norm_rows(a, rows);
    }
}

/* What a kernel launched programmatically (PDL) waits for: the kernel ahead; then the next one
 * may start. In an ordinary launch neither does anything. */
struct small_kernel_wait {
    __device__ __forceinline__ void operator()() const
    {
        grid_dependency_wait();
        grid_dependency_trigger();
    }
};

template <typename T, int BN, int EPILOGUE>
__global__ void __launch_bounds__(SMALL_THREADS, 2) small_gemm_kernel(small_args<T> a)
{
    small_gemm_body<T, BN, EPILOGUE>(a, blockIdx.x, gridDim.x, small_kernel_wait());
}

/* ---- the persistent small pass (EMBEDRAG_CUDA_SMALL=persist) ---- */

/* The chain of small-batch kernels (each LayerNorm done by the product after it) in one launch:
 * every block runs the products of every layer in turn, as the block of that product's column
 * slice it has the index of (blocks past a product's slices only wait), and attention v2 with
 * its first 4 warps; a grid barrier stands where a kernel boundary was. So a pass of <= 64 rows
 * pays one launch and ~5 barriers a layer instead of 5 launches a layer, each launch's start and
 * grid completion, and the weights of a step are still copied before its barrier (as they were
 * before the wait of a programmatic launch). The same products in the same order on the same
 * sums: the same bits as the chain.
 *
 * Every block must be resident at once (cuda_small_pass checks the occupancy; the blocks of a
 * high-priority stream are scheduled first where other kernels hold the multiprocessors). The
 * barrier is the classic one: the block's writes, then one thread's fence and arrival on a
 * counter, its acquire spin until every block of this barrier has arrived, then the block's
 * barrier (the cooperative groups pattern); the counter grows by gridDim.x a barrier and is reset
 * by the last block to leave. What a step reads that another block wrote comes after the acquire,
 * and the kernels' copies of such data (cp.async.cg, ld.cg) go to L2 anyway. */
template <typename T> struct small_pass_args {
    const cuda_small_layer *layers;
    T *x, *x1, *qkv, *context, *hidden;
    float *scratch;
    unsigned *counters; /* the last-block LayerNorm's, the barrier's, the exits' */
    int rows, layers_count, width, intermediate, heads, activation;
    int columns[5]; /* QKV, attention output, intermediate, output (sums), last output (norm) */
    float eps, scale;
    /* Or NULL: 5 stamps (small_args' trace) per block and step, step by step (5 a layer). */
    unsigned long long *trace;
};

/* Block blockIdx.x's trace slot of step `step` (NULL without a trace). */
__device__ __forceinline__ unsigned long long *small_pass_slot(unsigned long long *trace, int step)
{
    return trace ? trace + ((size_t)step * gridDim.x + blockIdx.x) * 5 : nullptr;
}

__device__ __forceinline__ void small_pass_barrier(unsigned *count, unsigned target)
{
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(count, 1u);
        unsigned seen;
        do {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];"
                         : "=r"(seen)
                         : "l"(count)
                         : "memory");
        } while (seen < target);
    }
    __syncthreads();
}

struct small_pass_wait {
    unsigned *count;
    unsigned target;
    __device__ __forceinline__ void operator()() const
    {
        small_pass_barrier(count, target);
    }
};

struct small_no_wait {
    __device__ __forceinline__ void operator()() const {}
};

/* One product of the pass by this block (its column slice, if the product has that many). The
 * first barrier keeps the W copy out of the space the block's previous step still reads. */
template <typename T, int EPILOGUE, typename Wait>
__device__ __forceinline__ void small_pass_product(const small_args<T> &a, int columns, Wait wait)
{
    __syncthreads();
    const int blocks = a.n / columns, block = (int)blockIdx.x;
    if (block >= blocks) {
        trace_stamp(a.trace, 0);
        wait();
        trace_stamp(a.trace, 1);
        if (a.trace && threadIdx.x == 0) a.trace[2] = a.trace[3] = a.trace[4] = a.trace[1];
    } else if (columns == 32)
        small_gemm_body<T, 32, EPILOGUE>(a, block, blocks, wait);
    else if (columns == 16)
        small_gemm_body<T, 16, EPILOGUE>(a, block, blocks, wait);
    else
        small_gemm_body<T, 8, EPILOGUE>(a, block, blocks, wait);
}

template <typename T, int D>
__global__ void __launch_bounds__(SMALL_THREADS, 1)
    small_pass_kernel(cuda_batch_view b, small_pass_args<T> p)
{
    unsigned *count = p.counters + 1, step = 0;
    const unsigned blocks = gridDim.x;
    const int h = p.width;
    small_args<T> a;
    a.header = b.header;
    a.rows = p.rows;
    a.eps = p.eps;
    a.activation = p.activation;
    a.scratch = p.scratch;
    a.counter = p.counters;
    a.trace = nullptr;
    a.residual = nullptr;
    a.gamma = a.beta = nullptr;
    for (int l = 0; l < p.layers_count; l++) {
        const cuda_small_layer &layer = p.layers[l];
        const bool more = l + 1 < p.layers_count;
        a.trace = small_pass_slot(p.trace, 5 * l);
        /* QKV + bias, X normalized from the previous layer's output sums (its LayerNorm). */
        a.w = static_cast<const T *>(layer.weight[0]);
        a.bias = static_cast<const T *>(layer.bias[0]);
        a.y = p.qkv;
        a.n = 3 * h;
        a.k = h;
        a.kp = (h + 15) / 16 * 16;
        a.kc = small_x_columns(p.rows, a.kp, l > 0);
        a.x = l ? nullptr : p.x;
        a.x_scratch = l ? p.scratch : nullptr;
        a.x_gamma = l ? p.layers[l - 1].output_gamma : nullptr;
        a.x_beta = l ? p.layers[l - 1].output_beta : nullptr;
        a.x_out = l ? p.x : nullptr;
        if (l)
            small_pass_product<T, CUDA_SMALL_BIAS>(a, p.columns[0],
                                                   small_pass_wait{count, ++step * blocks});
        else
            small_pass_product<T, CUDA_SMALL_BIAS>(a, p.columns[0], small_no_wait());

        /* Attention: each block takes (tile, head) pairs blockIdx.x, + gridDim.x, ... (its first 4
         * warps do the work). */
        unsigned long long *slot = small_pass_slot(p.trace, 5 * l + 1);
        trace_stamp(slot, 0);
        small_pass_barrier(count, ++step * blocks);
        trace_stamp(slot, 1);
        trace_stamp(slot, 2);
        trace_stamp(slot, 3);
        const int pairs = b.header[CUDA_HEADER_TILES] * p.heads;
        for (int v = blockIdx.x; v < pairs; v += gridDim.x) {
            if (v != (int)blockIdx.x) __syncthreads(); /* the last pair's reads are done */
            attention_tc2_body<T, D>(b, p.qkv, p.context, h, p.heads, p.scale, v);
        }
        trace_stamp(slot, 4);

        /* Attention output + bias + residual, as fp32 sums. */
        a.w = static_cast<const T *>(layer.weight[1]);
        a.bias = static_cast<const T *>(layer.bias[1]);
        a.n = h;
        a.k = h;
        a.kp = (h + 15) / 16 * 16;
        a.kc = small_x_columns(p.rows, a.kp, false);
        a.x = p.context;
        a.x_scratch = nullptr;
        a.x_gamma = a.x_beta = nullptr;
        a.x_out = nullptr;
        a.residual = p.x;
        a.trace = small_pass_slot(p.trace, 5 * l + 2);
        small_pass_product<T, CUDA_SMALL_SUM>(a, p.columns[1],
                                              small_pass_wait{count, ++step * blocks});

        /* Intermediate + bias + activation, X normalized from those sums. */
        a.w = static_cast<const T *>(layer.weight[2]);
        a.bias = static_cast<const T *>(layer.bias[2]);
        a.y = p.hidden;
        a.n = p.intermediate;
        a.kc = small_x_columns(p.rows, a.kp, true);
        a.x = nullptr;
        a.x_scratch = p.scratch;
        a.x_gamma = layer.attention_gamma;
        a.x_beta = layer.attention_beta;
        a.x_out = p.x1;
        a.residual = nullptr;
        a.trace = small_pass_slot(p.trace, 5 * l + 3);
        small_pass_product<T, CUDA_SMALL_ACTIVATION>(a, p.columns[2],
                                                     small_pass_wait{count, ++step * blocks});

        /* Output + bias + residual: sums, or in the last layer normalized by the last block. */
        a.w = static_cast<const T *>(layer.weight[3]);
        a.bias = static_cast<const T *>(layer.bias[3]);
        a.n = h;
        a.k = p.intermediate;
        a.kp = (p.intermediate + 15) / 16 * 16;
        a.kc = small_x_columns(p.rows, a.kp, false);
        a.x = p.hidden;
        a.x_scratch = nullptr;
        a.x_gamma = a.x_beta = nullptr;
        a.x_out = nullptr;
        a.residual = p.x1;
        a.trace = small_pass_slot(p.trace, 5 * l + 4);
        if (more) {
            small_pass_product<T, CUDA_SMALL_SUM>(a, p.columns[3],
                                                  small_pass_wait{count, ++step * blocks});
        } else {
            a.y = p.x;
            a.gamma = layer.output_gamma;
            a.beta = layer.output_beta;
            small_pass_product<T, CUDA_SMALL_NORM>(a, p.columns[4],
                                                   small_pass_wait{count, ++step * blocks});
        }
    }
    /* Every block has passed every barrier once it counts itself out: the last resets both. */
    if (threadIdx.x == 0 && atomicAdd(p.counters + 2, 1u) == blocks - 1) {
        atomicExch(count, 0u);
        atomicExch(p.counters + 2, 0u);
    }
}

/* ---- pooling ---- */

/* A sequence's pooled vector, one block a sequence. The threads form `lanes` groups of one
 * 16-byte vector of the row each; lane l takes tokens first + l, first + l + lanes, ... (so each
 * thread has several independent loads in flight, where one thread per column walked the tokens
 * one dependent step at a time: 21.6 us for 100 texts of 50 tokens on an H200), and the lanes'
 * partial results are combined in lane order. The order depends only on the sequence and the
 * width, so a sequence pools to the same bits alone and in any batch. */
template <typename T>
__global__ void __launch_bounds__(POOL_THREADS)
    pool_kernel(cuda_batch_view b, const T *x, int hidden, int pooling, float *pooled)
{
    __shared__ __align__(16) float partial[POOL_THREADS * 8];
    int sequence = blockIdx.x;
    if (sequence >= b.header[CUDA_HEADER_SEQUENCES]) return;
    int start = b.offsets[sequence], end = b.offsets[sequence + 1];
    int skip = b.skip[sequence];
    int first = start + skip < end ? start + skip : start; /* never pool nothing */
    float *out = pooled + (size_t)sequence * hidden;
    if (pooling == EMBEDRAG_POOLING_CLS) {
        for (int i = threadIdx.x; i < hidden; i += POOL_THREADS)
            out[i] = to_float(x[(size_t)start * hidden + i]);
        return;
    }
    const bool use_max = pooling == EMBEDRAG_POOLING_MAX;
    const int vectors = hidden / VEC(T), lanes = POOL_THREADS / vectors;
    const int lane = threadIdx.x / vectors, v = threadIdx.x % vectors;
    if (lane < lanes) {
        float acc[VEC(T)], row[VEC(T)];
#pragma unroll
        for (int i = 0; i < VEC(T); i++) acc[i] = use_max ? -INFINITY : 0.0f;
#pragma unroll 4
        for (int t = first + lane; t < end; t += lanes) {
            load_vector(x + (size_t)t * hidden + (size_t)v * VEC(T), row);
#pragma unroll
            for (int i = 0; i < VEC(T); i++)
                acc[i] = use_max ? fmaxf(acc[i], row[i]) : acc[i] + row[i];
        }
#pragma unroll
        for (int i = 0; i < VEC(T); i++) partial[lane * hidden + v * VEC(T) + i] = acc[i];
    }
    __syncthreads();
    const int used = end - first < lanes ? end - first : lanes;
    const float scale = 1.0f / (float)(end - first);
    for (int c = threadIdx.x; c < hidden; c += POOL_THREADS) {
        float r = partial[c];
        for (int l = 1; l < used; l++)
            r = use_max ? fmaxf(r, partial[l * hidden + c]) : r + partial[l * hidden + c];
        out[c] = use_max ? r : r * scale;
    }
}

/* ---- conversion ---- */

template <typename T> __global__ void convert_kernel(const float *src, T *dst, size_t count)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = from_float<T>(src[i]);
}

/* ---- launchers ---- */

static unsigned element_blocks(size_t work)
{
    size_t blocks = (work + ELEMENT_THREADS - 1) / ELEMENT_THREADS;
    if (blocks > ELEMENT_MAX_BLOCKS) blocks = ELEMENT_MAX_BLOCKS;
    return blocks ? (unsigned)blocks : 1u;
}

static unsigned row_blocks(int rows)
{
    unsigned blocks = (unsigned)((rows + ROW_WARPS - 1) / ROW_WARPS);
    return blocks ? blocks : 1u;
}

#define DISPATCH(dtype, call)                                                                      \
    do {                                                                                           \
        switch (dtype) {                                                                           \
        case CUDA_DTYPE_F32: {                                                                     \
            typedef float T;                                                                       \
            call;                                                                                  \
            break;                                                                                 \
        }                                                                                          \
        case CUDA_DTYPE_F16: {                                                                     \
            typedef __half T;                                                                      \
            call;                                                                                  \
            break;                                                                                 \
        }                                                                                          \
        case CUDA_DTYPE_BF16: {                                                                    \
            typedef __nv_bfloat16 T;                                                               \
            call;                                                                                  \
            break;                                                                                 \
        }                                                                                          \
        }                                                                                          \
    } while (0)

extern "C" cudaError_t cuda_embed(cuda_dtype dtype, const cuda_batch_view *batch, const float *word,
                                  const float *position, const float *type, const float *gamma,
                                  const float *beta, float eps, int hidden, void *out,
                                  cudaStream_t stream)
{
    unsigned blocks = row_blocks(batch->max_tokens);
    DISPATCH(dtype, (embed_kernel<T><<<blocks, ROW_WARPS * WARP, 0, stream>>>(
                        *batch, word, position, type, gamma, beta, eps, hidden, (T *)out)));
    return cudaGetLastError();
}

/* add_layer_norm_kernel with PER_LANE = P, or T's most where that is fewer. */
template <typename T, int P>
static void launch_add_layer_norm(unsigned blocks, bool programmatic, cudaStream_t stream,
                                  cuda_batch_view b, const T *a, const T *residual,
                                  const float *gamma, const float *beta, float eps, int hidden,
                                  T *out)
{
    constexpr int MOST = CUDA_MAX_HIDDEN / VEC(T) / WARP, PER_LANE = P < MOST ? P : MOST;
    cudaLaunchAttribute attribute;
    cudaLaunchConfig_t config =
        launch_config(blocks, ROW_WARPS * WARP, 0, programmatic, &attribute, stream);
    cudaLaunchKernelEx(&config, add_layer_norm_kernel<T, PER_LANE>, b, a, residual, gamma, beta,
                       eps, hidden, out);
}

/* With the fewest vectors a lane must hold: 2 (384 wide in 16-bit types), 4, or the widest's. */
template <typename T>
static void launch_add_layer_norm(unsigned blocks, bool programmatic, cudaStream_t stream,
                                  cuda_batch_view b, const T *a, const T *residual,
                                  const float *gamma, const float *beta, float eps, int hidden,
                                  T *out)
{
    const int per_lane = (hidden / VEC(T) + WARP - 1) / WARP;
    if (per_lane <= 2)
        launch_add_layer_norm<T, 2>(blocks, programmatic, stream, b, a, residual, gamma, beta, eps,
                                    hidden, out);
    else if (per_lane <= 4)
        launch_add_layer_norm<T, 4>(blocks, programmatic, stream, b, a, residual, gamma, beta, eps,
                                    hidden, out);
    else
        launch_add_layer_norm<T, CUDA_MAX_HIDDEN / VEC(T) / WARP>(
            blocks, programmatic, stream, b, a, residual, gamma, beta, eps, hidden, out);
}

extern "C" cudaError_t cuda_add_layer_norm(cuda_dtype dtype, const cuda_batch_view *batch,
                                           const void *a, const void *residual, const float *gamma,
                                           const float *beta, float eps, int hidden, void *out,
                                           int programmatic, cudaStream_t stream)
{
    /* A grid of at most NORM_BLOCKS_PER_SM blocks a multiprocessor: each warp then walks several
     * rows (see the kernel). The count only bounds the grid, so any device answer will do. */
    int sms = current_sm_count();
    if (sms < 1) sms = 1;
    unsigned blocks = row_blocks(batch->max_tokens);
    if (blocks > (unsigned)sms * NORM_BLOCKS_PER_SM) blocks = (unsigned)sms * NORM_BLOCKS_PER_SM;
    DISPATCH(dtype,
             (launch_add_layer_norm<T>(blocks, programmatic != 0, stream, *batch, (const T *)a,
                                       (const T *)residual, gamma, beta, eps, hidden, (T *)out)));
    return cudaGetLastError();
}

extern "C" cudaError_t cuda_bias_activation(cuda_dtype dtype, const cuda_batch_view *batch, void *x,
                                            const void *bias, int n, int activation,
                                            cudaStream_t stream)
{
    size_t vectors = (size_t)batch->max_tokens * (size_t)n / (dtype == CUDA_DTYPE_F32 ? 4 : 8);
    unsigned blocks = element_blocks(vectors);
    DISPATCH(dtype, (bias_activation_kernel<T><<<blocks, ELEMENT_THREADS, 0, stream>>>(
                        *batch, (T *)x, (const T *)bias, n, activation)));
    return cudaGetLastError();
}

extern "C" int cuda_attention_has_tensor_cores(cuda_dtype dtype, int head_size)
{
    return dtype != CUDA_DTYPE_F32 && (head_size == 32 || head_size == 64);
}

template <typename T>
static void launch_attention_tc(const cuda_batch_view *batch, const T *qkv, T *context, int hidden,
                                int heads, cudaStream_t stream)
{
    int d = hidden / heads;
    /* log2(e) / sqrt(d): scores go straight into exp2. */
    float scale_log2 = 1.4426950408889634f / sqrtf((float)d);
    dim3 grid((unsigned)(batch->max_tiles > 0 ? batch->max_tiles : 1), (unsigned)heads);
    if (d == 32)
        attention_tc_kernel<T, 32>
            <<<grid, TC_WARPS * WARP, 0, stream>>>(*batch, qkv, context, hidden, scale_log2);
    else
        attention_tc_kernel<T, 64>
            <<<grid, TC_WARPS * WARP, 0, stream>>>(*batch, qkv, context, hidden, scale_log2);
}

/* v2: one block per (tile, head), heads fastest; a 1-D grid (tiles may outnumber 65535). */
template <typename T>
static cudaError_t launch_attention_tc2(const cuda_batch_view *batch, const T *qkv, T *context,
                                        int hidden, int heads, bool programmatic,
                                        cudaStream_t stream)
{
    int d = hidden / heads;
    float scale_log2 = 1.4426950408889634f / sqrtf((float)d);
    unsigned blocks = (unsigned)(batch->max_tiles > 0 ? batch->max_tiles : 1) * (unsigned)heads;
    cudaLaunchAttribute attribute;
    cudaLaunchConfig_t config =
        launch_config(blocks, TC_WARPS * WARP, 0, programmatic, &attribute, stream);
    if (d == 32)
        return cudaLaunchKernelEx(&config, attention_tc2_kernel<T, 32>, *batch, qkv, context,
                                  hidden, heads, scale_log2);
    return cudaLaunchKernelEx(&config, attention_tc2_kernel<T, 64>, *batch, qkv, context, hidden,
                              heads, scale_log2);
}

extern "C" cudaError_t cuda_attention(cuda_dtype dtype, const cuda_batch_view *batch,
                                      const void *qkv, void *context, int hidden, int heads,
                                      int kernel, int programmatic, cudaStream_t stream)
{
    int d = hidden / heads;
    if (kernel != CUDA_ATTENTION_FP32 && cuda_attention_has_tensor_cores(dtype, d)) {
        bool v2 = kernel == CUDA_ATTENTION_MMA_V2;
        cudaError_t e = cudaSuccess;
        if (dtype == CUDA_DTYPE_F16) {
            const __half *q = (const __half *)qkv;
            __half *out = (__half *)context;
            if (v2)
                e = launch_attention_tc2(batch, q, out, hidden, heads, programmatic != 0, stream);
            else
                launch_attention_tc(batch, q, out, hidden, heads, stream);
        } else {
            const __nv_bfloat16 *q = (const __nv_bfloat16 *)qkv;
            __nv_bfloat16 *out = (__nv_bfloat16 *)context;
            if (v2)
                e = launch_attention_tc2(batch, q, out, hidden, heads, programmatic != 0, stream);
            else
                launch_attention_tc(batch, q, out, hidden, heads, stream);
        }
        cudaError_t last = cudaGetLastError();
        return e != cudaSuccess ? e : last;
    }
    size_t items = (size_t)batch->max_tokens * (size_t)heads;
    unsigned blocks = (unsigned)((items + SIMPLE_WARPS - 1) / SIMPLE_WARPS);
    float scale = 1.0f / sqrtf((float)d);
    DISPATCH(dtype,
             (attention_simple_kernel<T><<<blocks ? blocks : 1, SIMPLE_WARPS * WARP, 0, stream>>>(
                 *batch, (const T *)qkv, (T *)context, hidden, heads, scale)));
    return cudaGetLastError();
}

extern "C" cudaError_t cuda_pool(cuda_dtype dtype, const cuda_batch_view *batch, const void *x,
                                 int hidden, int pooling, float *pooled, cudaStream_t stream)
{
    unsigned blocks = (unsigned)(batch->max_sequences > 0 ? batch->max_sequences : 1);
    DISPATCH(dtype, (pool_kernel<T><<<blocks, POOL_THREADS, 0, stream>>>(*batch, (const T *)x,
                                                                         hidden, pooling, pooled)));
    return cudaGetLastError();
}

extern "C" cudaError_t cuda_convert(cuda_dtype dtype, const float *src, void *dst, size_t count,
                                    cudaStream_t stream)
{
    unsigned blocks = element_blocks(count);
    DISPATCH(dtype,
             (convert_kernel<T><<<blocks, ELEMENT_THREADS, 0, stream>>>(src, (T *)dst, count)));
    return cudaGetLastError();
}

/* ---- checking cuBLASLt's candidates (cuda_backend.c, choose_algorithm) ---- */

/* A 64-bit value mixed so that nearby inputs give unrelated outputs: SplitMix64's finalizer
 * (Steele, Lea and Flood's generator, public domain), xor-shifts and two odd multipliers. */
__device__ __forceinline__ unsigned long long mix64(unsigned long long z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

template <typename T> __global__ void fill_pattern_kernel(T *x, size_t count, unsigned seed)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        unsigned long long z = mix64(((unsigned long long)seed << 40) ^ i);
        /* In [-1, 1): the size of a LayerNorm's output. */
        x[i] = from_float<T>((float)(z >> 40) * (1.0f / 8388608.0f) - 1.0f);
    }
}

/* *out += the sum over 4-byte words w at index i of mix64(i, w): an order-free digest (integer
 * sums wrap the same way whatever the order), so equal buffers give equal digests on every run
 * and a single changed bit changes it with overwhelming odds. */
__global__ void digest_kernel(const unsigned *words, size_t count, unsigned long long *out)
{
    unsigned long long sum = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        sum += mix64(((unsigned long long)i << 32) | words[i]);
#pragma unroll
    for (int offset = WARP / 2; offset > 0; offset /= 2)
        sum += __shfl_down_sync(FULL_MASK, sum, offset);
    if (threadIdx.x % WARP == 0) atomicAdd(out, sum);
}

extern "C" cudaError_t cuda_fill_pattern(cuda_dtype dtype, void *x, size_t count, unsigned seed,
                                         cudaStream_t stream)
{
    unsigned blocks = element_blocks(count);
    DISPATCH(dtype,
             (fill_pattern_kernel<T><<<blocks, ELEMENT_THREADS, 0, stream>>>((T *)x, count, seed)));
    return cudaGetLastError();
}

extern "C" cudaError_t cuda_digest(const void *x, size_t bytes, unsigned long long *digest,
                                   cudaStream_t stream)
{
    cudaError_t e = cudaMemsetAsync(digest, 0, sizeof *digest, stream);
    if (e != cudaSuccess) return e;
    size_t words = bytes / sizeof(unsigned);
    digest_kernel<<<element_blocks(words), ELEMENT_THREADS, 0, stream>>>((const unsigned *)x, words,
                                                                         digest);
    return cudaGetLastError();
}

/* ---- small-batch GEMMs ---- */

/* Shared memory of a block: W's slice, then the ring of X chunks (no more stages than chunks) or
 * the warps' partial sums, whichever is larger. */
static size_t small_shared_bytes(int columns, int rows, int k, bool norm_x)
{
    int kp = (k + 15) / 16 * 16, kc = small_x_columns(rows, kp, norm_x),
        rows_pad = (rows + 15) / 16 * 16;
    int chunks = (kp + kc - 1) / kc, stages = chunks < SMALL_STAGES ? chunks : SMALL_STAGES;
    int nt = columns / 8, wk = SMALL_WARPS / (nt >= 2 ? nt / 2 : 1);
    size_t w = (size_t)columns * 2 * (size_t)(kp + SMALL_PAD);
    size_t ring = (size_t)stages * (size_t)rows_pad * 2 * (size_t)(kc + SMALL_PAD);
    size_t partial = (size_t)wk * (size_t)rows_pad * (size_t)columns * sizeof(float);
    return w + (ring > partial ? ring : partial);
}

extern "C" int cuda_small_gemm_columns(cuda_dtype dtype, int rows, int n, int k, int epilogue,
                                       int norm_x)
{
    if (dtype == CUDA_DTYPE_F32 || rows < 1 || rows > CUDA_SMALL_MAX_ROWS || n < 8 || k < 8 ||
        n % 8 || k % 8 || (epilogue == CUDA_SMALL_NORM && n > CUDA_MAX_HIDDEN) ||
        (norm_x && k > CUDA_MAX_HIDDEN))
        return 0;
    static const int widths[] = {32, 16, 8};
    for (int i = 0; i < 3; i++) {
        int bn = widths[i];
        if (n % bn || (bn > 8 && n / bn < SMALL_MIN_BLOCKS)) continue;
        if (small_shared_bytes(bn, rows, k, norm_x != 0) <= SMALL_MAX_SHARED) return bn;
    }
    return 0;
}

template <typename T, int BN, int EPILOGUE>
static cudaError_t small_launch(const small_args<T> &a, size_t shared, bool programmatic,
                                cudaStream_t stream)
{
    cudaLaunchAttribute attribute;
    cudaLaunchConfig_t config = launch_config((unsigned)(a.n / BN), SMALL_THREADS, shared,
                                              programmatic, &attribute, stream);
    return cudaLaunchKernelEx(&config, small_gemm_kernel<T, BN, EPILOGUE>, a);
}

template <typename T, int EPILOGUE>
static cudaError_t small_launch_width(int columns, const small_args<T> &a, size_t shared,
                                      bool programmatic, cudaStream_t stream)
{
    if (columns == 32) return small_launch<T, 32, EPILOGUE>(a, shared, programmatic, stream);
    if (columns == 16) return small_launch<T, 16, EPILOGUE>(a, shared, programmatic, stream);
    return small_launch<T, 8, EPILOGUE>(a, shared, programmatic, stream);
}

template <typename T>
static cudaError_t small_gemm_typed(const cuda_batch_view *batch, const cuda_small_gemm_params *p,
                                    int columns, cudaStream_t stream)
{
    small_args<T> a;
    a.x = (const T *)p->x;
    a.w = (const T *)p->weight;
    a.bias = (const T *)p->bias;
    a.residual = (const T *)p->residual;
    a.y = (T *)p->y;
    a.gamma = p->gamma;
    a.beta = p->beta;
    a.scratch = p->scratch;
    a.x_scratch = p->x_scratch;
    a.x_gamma = p->x_gamma;
    a.x_beta = p->x_beta;
    a.x_out = (T *)p->x_out;
    a.counter = p->counter;
    a.trace = NULL;
    a.header = batch->header;
    a.rows = p->rows;
    a.n = p->n;
    a.k = p->k;
    a.kp = (p->k + 15) / 16 * 16;
    a.kc = small_x_columns(p->rows, a.kp, p->x_scratch != NULL);
    a.activation = p->activation;
    a.eps = p->eps;
    size_t shared = small_shared_bytes(columns, p->rows, p->k, p->x_scratch != NULL);
    bool programmatic = p->programmatic != 0;
    switch (p->epilogue) {
    case CUDA_SMALL_ACTIVATION:
        return small_launch_width<T, CUDA_SMALL_ACTIVATION>(columns, a, shared, programmatic,
                                                            stream);
    case CUDA_SMALL_NORM:
        return small_launch_width<T, CUDA_SMALL_NORM>(columns, a, shared, programmatic, stream);
    case CUDA_SMALL_SUM:
        return small_launch_width<T, CUDA_SMALL_SUM>(columns, a, shared, programmatic, stream);
    default:
        return small_launch_width<T, CUDA_SMALL_BIAS>(columns, a, shared, programmatic, stream);
    }
}

extern "C" cudaError_t cuda_small_gemm(cuda_dtype dtype, const cuda_batch_view *batch,
                                       const cuda_small_gemm_params *params, cudaStream_t stream)
{
    int columns = cuda_small_gemm_columns(dtype, params->rows, params->n, params->k,
                                          params->epilogue, params->x_scratch != NULL);
    if (!columns) return cudaErrorInvalidValue;
    cudaError_t e = dtype == CUDA_DTYPE_F16
                        ? small_gemm_typed<__half>(batch, params, columns, stream)
                        : small_gemm_typed<__nv_bfloat16>(batch, params, columns, stream);
    cudaError_t last = cudaGetLastError();
    return e != cudaSuccess ? e : last;
}

/* The pass's column widths (columns[5], as small_pass_args), grid and dynamic shared memory, or 0
 * where the small-batch kernel does not take a product in the chain's shape. */
static int small_pass_shape(cuda_dtype dtype, const cuda_small_pass_params *p, int *columns,
                            unsigned *blocks, size_t *shared)
{
    int h = p->hidden, in = p->intermediate, r = p->rows;
    if (p->heads < 1 || h % p->heads || (h / p->heads != 32 && h / p->heads != 64)) return 0;
    /* product: n, k, epilogue, X normalized */
    const int shape[6][4] = {{3 * h, h, CUDA_SMALL_BIAS, 1},    {h, h, CUDA_SMALL_SUM, 0},
                             {in, h, CUDA_SMALL_ACTIVATION, 1}, {h, in, CUDA_SMALL_SUM, 0},
                             {h, in, CUDA_SMALL_NORM, 0},       {3 * h, h, CUDA_SMALL_BIAS, 0}};
    *blocks = 0;
    *shared = 0;
    for (int i = 0; i < 6; i++) {
        int c =
            cuda_small_gemm_columns(dtype, r, shape[i][0], shape[i][1], shape[i][2], shape[i][3]);
        /* The first layer's QKV (X not normalized) must take QKV's width too. */
        if (!c || (i == 5 && c != columns[0])) return 0;
        if (i < 5) columns[i] = c;
        unsigned n = (unsigned)(shape[i][0] / c);
        size_t bytes = small_shared_bytes(c, r, shape[i][1], shape[i][3] != 0);
        *blocks = n > *blocks ? n : *blocks;
        *shared = bytes > *shared ? bytes : *shared;
    }
    return 1;
}

template <typename T, int D> static cudaError_t small_pass_allow()
{
    return cudaFuncSetAttribute(small_pass_kernel<T, D>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, SMALL_MAX_SHARED);
}

template <typename T> static const void *small_pass_function(int head)
{
    return head == 32 ? (const void *)small_pass_kernel<T, 32>
                      : (const void *)small_pass_kernel<T, 64>;
}

extern "C" int cuda_small_pass_takes(cuda_dtype dtype, const cuda_small_pass_params *p)
{
    int columns[5];
    unsigned blocks;
    size_t shared;
    if (dtype == CUDA_DTYPE_F32 || !small_pass_shape(dtype, p, columns, &blocks, &shared)) return 0;
    int sms = current_sm_count(), per_sm = 0;
    const void *kernel = dtype == CUDA_DTYPE_F16
                             ? small_pass_function<__half>(p->hidden / p->heads)
                             : small_pass_function<__nv_bfloat16>(p->hidden / p->heads);
    if (sms < 1 || cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, SMALL_THREADS,
                                                                 shared) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return (long)per_sm * sms >= (long)blocks;
}

template <typename T>
static cudaError_t small_pass_typed(const cuda_batch_view *batch, const cuda_small_pass_params *q,
                                    const int *columns, unsigned blocks, size_t shared,
                                    cudaStream_t stream)
{
    small_pass_args<T> p;
    p.layers = q->table;
    p.x = (T *)q->x;
    p.x1 = (T *)q->x1;
    p.qkv = (T *)q->qkv;
    p.context = (T *)q->context;
    p.hidden = (T *)q->hidden_rows;
    p.scratch = q->scratch;
    p.counters = q->counters;
    p.rows = q->rows;
    p.layers_count = q->layers;
    p.width = q->hidden;
    p.intermediate = q->intermediate;
    p.heads = q->heads;
    p.activation = q->activation;
    for (int i = 0; i < 5; i++) p.columns[i] = columns[i];
    p.eps = q->eps;
    p.trace = blocks <= CUDA_SMALL_TRACE_BLOCKS ? q->trace : NULL;
    int d = q->hidden / q->heads;
    p.scale = 1.4426950408889634f / sqrtf((float)d);
    if (d == 32)
        small_pass_kernel<T, 32><<<blocks, SMALL_THREADS, shared, stream>>>(*batch, p);
    else
        small_pass_kernel<T, 64><<<blocks, SMALL_THREADS, shared, stream>>>(*batch, p);
    return cudaGetLastError();
}

extern "C" cudaError_t cuda_small_pass(cuda_dtype dtype, const cuda_batch_view *batch,
                                       const cuda_small_pass_params *params, cudaStream_t stream)
{
    int columns[5];
    unsigned blocks;
    size_t shared;
    if (dtype == CUDA_DTYPE_F32 || !small_pass_shape(dtype, params, columns, &blocks, &shared))
        return cudaErrorInvalidValue;
    return dtype == CUDA_DTYPE_F16
               ? small_pass_typed<__half>(batch, params, columns, blocks, shared, stream)
               : small_pass_typed<__nv_bfloat16>(batch, params, columns, blocks, shared, stream);
}

extern "C" int cuda_small_trace_read(cuda_dtype dtype, const cuda_small_pass_params *p,
                                     const unsigned long long *trace, double *sums)
{
    int columns[5];
    unsigned blocks;
    size_t shared;
    if (!small_pass_shape(dtype, p, columns, &blocks, &shared) || blocks > CUDA_SMALL_TRACE_BLOCKS)
        return 0;
    const int steps = 5 * p->layers;
#define STAMP(s, b, i) ((double)trace[((size_t)(s)*blocks + (b)) * 5 + (i)])
    for (int s = 0; s < steps; s++) {
        double arrival = STAMP(s, 0, 0), release = STAMP(s, 0, 1), end = STAMP(s, 0, 4);
        unsigned last = 0;
        for (unsigned b = 1; b < blocks; b++) {
            arrival = STAMP(s, b, 0) > arrival ? STAMP(s, b, 0) : arrival;
            release = STAMP(s, b, 1) < release ? STAMP(s, b, 1) : release;
            if (STAMP(s, b, 4) > end) {
                end = STAMP(s, b, 4);
                last = b;
            }
        }
        double next = end;
        if (s + 1 < steps)
            for (unsigned b = 0; b < blocks; b++)
                next = STAMP(s + 1, b, 0) > next ? STAMP(s + 1, b, 0) : next;
        double *k = sums + 6 * (s % 5);
        k[0] += s ? release - arrival : 0.0;
        k[1] += STAMP(s, last, 1) - release;
        k[2] += STAMP(s, last, 2) - STAMP(s, last, 1);
        k[3] += STAMP(s, last, 3) - STAMP(s, last, 2);
        k[4] += STAMP(s, last, 4) - STAMP(s, last, 3);
        k[5] += next - end;
    }
#undef STAMP
    return 1;
}

template <typename T, int EPILOGUE> static cudaError_t small_allow()
{
    const int shared = SMALL_MAX_SHARED;
    cudaError_t e = cudaFuncSetAttribute(small_gemm_kernel<T, 32, EPILOGUE>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, shared);
    if (e == cudaSuccess)
        e = cudaFuncSetAttribute(small_gemm_kernel<T, 16, EPILOGUE>,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, shared);
    if (e == cudaSuccess)
        e = cudaFuncSetAttribute(small_gemm_kernel<T, 8, EPILOGUE>,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, shared);
    return e;
}

template <typename T> static cudaError_t small_allow_all()
{
    cudaError_t e = small_allow<T, CUDA_SMALL_BIAS>();
    if (e == cudaSuccess) e = small_allow<T, CUDA_SMALL_ACTIVATION>();
    if (e == cudaSuccess) e = small_allow<T, CUDA_SMALL_NORM>();
    if (e == cudaSuccess) e = small_allow<T, CUDA_SMALL_SUM>();
    return e;
}

extern "C" cudaError_t cuda_small_setup(void)
{
    cudaError_t e = small_allow_all<__half>();
    if (e == cudaSuccess) e = small_allow_all<__nv_bfloat16>();
    if (e == cudaSuccess) e = small_pass_allow<__half, 32>();
    if (e == cudaSuccess) e = small_pass_allow<__half, 64>();
    if (e == cudaSuccess) e = small_pass_allow<__nv_bfloat16, 32>();
    if (e == cudaSuccess) e = small_pass_allow<__nv_bfloat16, 64>();
    return e;
}
