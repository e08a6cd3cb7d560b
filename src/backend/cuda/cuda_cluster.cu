/* The cluster pass (EMBEDRAG_CUDA_SMALL=cluster): every layer of a pass of at most
 * CUDA_CLUSTER_MAX_ROWS rows in one launch of one thread-block cluster, one block per attention
 * head (sm_90).
 *
 * Why: a 16-token query is ~86 short kernels on the default path (~3.1 us each in a graph), and
 * the earlier attempts at fewer kernels (the chain of small-batch kernels, the persistent pass
 * over 96 blocks with grid barriers in global memory) spent ~5 us a step in each block fetching
 * its X from L2 and normalizing it again (bench/cuda-notes.md). Here the blocks of one cluster
 * keep every activation in their own shared memory and hand each other the slices they compute
 * through distributed shared memory, so a step's inputs are always local; the steps are separated
 * by the cluster's hardware barrier; and the weights, the only data that must come from L2 or
 * memory, stream into each block through a ring of bulk copies (cp.async.bulk) that runs ahead of
 * the arithmetic across steps and layers.
 *
 * Work of block c (c = its rank in the cluster, c < heads) in each layer, 16 rows in m16n8k16
 * tensor-core products with fp32 sums:
 *   S0  Q, K and V of head c (3 x head columns, K = hidden), + bias, rounded to the dtype; then
 *       the head's attention over each row's own sequence (fp32, one warp a query row); its
 *       context columns go to every block's context rows.
 *   S1  the attention output's columns [c H/C, (c+1) H/C) + bias, rounded, to every block;
 *       then every block adds the residual and normalizes all rows itself (same sums, same
 *       formula as cuda_add_layer_norm, so every block holds the same X).
 *   S2  the intermediate columns [c I/C, ...) + bias, activation, rounded, to every block.
 *   S3  the output's columns [c H/C, ...) + bias, rounded, to every block; residual + LayerNorm
 *       as after S1.
 * A cluster barrier (barrier.cluster, release/acquire) follows each hand-over: 4 a layer.
 *
 * Weights: cuda_cluster_pack writes, once at load time, each block's weights of every layer as
 * one stream in the order the block consumes them, already in mma.sync's B-fragment order (lane
 * l's 16 bytes are its two k-steps' b0 and b1 registers), cut into chunks of CUDA_CLUSTER_CHUNK
 * bytes. A chunk holds whole k-pairs (32 columns of K) of one step for all of the step's n-tiles.
 * Thread 0 refills a slot of the ring as soon as every warp has released it (mbarrier
 * "full"/"empty" pairs, as in a TMA pipeline); every warp waits for every chunk and releases it,
 * whether it used it or not. The biases (in each block's column order) and the LayerNorm
 * parameters of a layer come as one more bulk copy into one of two parameter buffers.
 *
 * A row's sums depend only on that row: a text gives the same bits alone and in any batch this
 * pass takes (not the default path's bits: the products are summed in another order). */
#include "backend/cuda/cuda_device.cuh"
#include "backend/cuda/cuda_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

/* 16 warps: the products, attention and LayerNorms are chains of dependent latencies, and
 * twice the warps of the first version halved each warp's chain. */
#define CL_WARPS 16
/* n-tiles a warp owns at most (a step's nt is at most 2 x CL_WARPS). */
#define CL_MAX_TILES 2
#define CL_THREADS (CL_WARPS * WARP)
#define CL_ROWS CUDA_CLUSTER_MAX_ROWS
#define CL_UNIT 512 /* bytes of one fragment unit: an n-tile's two k-steps, 16 bytes a lane */
#define CL_PAD 8    /* elements added to each activation row: conflict-free ldmatrix */
#define CL_MAX_SLOTS 8
#define CL_MAX_CLUSTER 16 /* the largest cluster sm_90 runs (a non-portable size above 8) */
#define CL_MAX_HIDDEN 1024
#define CL_LN_VECTORS (CL_MAX_HIDDEN / 8 / WARP) /* 16-byte vectors a lane holds in LayerNorm */

/* Where everything of a model sits in the packed stream and in each step, the same for every
 * block and every layer. */
typedef struct cluster_layout {
    int blocks, head, hidden, inter, layers;
    int nt[4], kp[4], kpc[4], chunks[4], first[4]; /* per step */
    int split[4], nt_log[4]; /* warps sharing an n-tile's k-pairs (1, 2, 4 or 8), log2 nt then */
    int per_layer;           /* chunks a layer */
    int bias[4];             /* element offsets of each step's bias slice in the parameter block */
    int norm_offset;         /* bytes to the four LayerNorm vectors (fp32, hidden each) */
    int param_bytes;
    size_t chunk_bytes_total; /* the weights' part of the stream */
} cluster_layout;

static __device__ int cluster_min(int a, int b)
{
    return a < b ? a : b;
}

/* Fills the layout; false where the pass cannot take the model. */
static bool cluster_layout_make(int layers, int hidden, int inter, int heads, cluster_layout *L)
{
    if (heads < 1 || heads > CL_MAX_CLUSTER || hidden % heads || hidden > CL_MAX_HIDDEN)
        return false;
    int c = heads, d = hidden / heads;
    if ((d != 32 && d != 64) || hidden % 32 || inter % 32 || hidden % (8 * c) || inter % (8 * c))
        return false;
    L->blocks = c;
    L->head = d;
    L->hidden = hidden;
    L->inter = inter;
    L->layers = layers;
    int n[4] = {3 * d, hidden / c, inter / c, hidden / c}, k[4] = {hidden, hidden, hidden, inter};
    int chunk = 0;
    for (int s = 0; s < 4; s++) {
        L->nt[s] = n[s] / 8;
        L->kp[s] = k[s] / 32;
        L->kpc[s] = CUDA_CLUSTER_CHUNK / (L->nt[s] * CL_UNIT);
        if (L->kpc[s] < 1 || L->nt[s] > CL_MAX_TILES * CL_WARPS) return false;
        L->chunks[s] = (L->kp[s] + L->kpc[s] - 1) / L->kpc[s];
        L->split[s] = L->nt[s] < CL_WARPS && CL_WARPS % L->nt[s] == 0 ? CL_WARPS / L->nt[s] : 1;
        L->nt_log[s] = 0;
        while ((1 << L->nt_log[s]) < L->nt[s]) L->nt_log[s]++;
        L->first[s] = chunk;
        chunk += L->chunks[s];
    }
    L->per_layer = chunk;
    int element = 2, offset = 0;
    for (int s = 0; s < 4; s++) {
        L->bias[s] = offset;
        offset += n[s];
    }
    L->norm_offset = (offset * element + 15) / 16 * 16;
    L->param_bytes = L->norm_offset + 4 * hidden * (int)sizeof(float);
    L->chunk_bytes_total = (size_t)c * layers * chunk * CUDA_CLUSTER_CHUNK;
    return true;
}

/* Bytes of chunk q (0 .. per_layer - 1) of a layer that hold weights. */
static __device__ unsigned cluster_chunk_used(const cluster_layout &L, int q)
{
    int s = 0;
    while (s < 3 && q >= L.first[s + 1]) s++;
    int j = q - L.first[s];
    return (unsigned)(cluster_min(L.kpc[s], L.kp[s] - j * L.kpc[s]) * L.nt[s] * CL_UNIT);
}

/* Shared memory of a block: the ring, then the activations (CL_ROWS rows each), the head's QKV
 * rows in fp32, the k-split partial sums, two parameter buffers, the mbarriers and the rows'
 * sequence bounds. */
typedef struct cluster_smem {
    size_t x, ctx, exch, inter, qkv, partial, params, bars, rows, total;
    int x_stride, inter_stride, qkv_stride;
} cluster_smem;

static __host__ __device__ cluster_smem cluster_smem_make(const cluster_layout &L, int slots)
{
    cluster_smem m;
    m.x_stride = L.hidden + CL_PAD;
    m.inter_stride = L.inter + CL_PAD;
    /* 16-byte rows whose starts fall in distinct 16-byte bank groups, 8 lanes at a time: a warp's
     * lanes read one row each in float4s without conflicts. */
    m.qkv_stride = 3 * L.head + 4;
    size_t at = (size_t)slots * CUDA_CLUSTER_CHUNK;
    size_t act = (size_t)CL_ROWS * m.x_stride * 2;
    m.x = at;
    m.ctx = (at += act);
    m.exch = (at += act);
    m.inter = (at += act);
    m.qkv = (at += (size_t)CL_ROWS * m.inter_stride * 2);
    m.partial = (at += ((size_t)CL_ROWS * m.qkv_stride * sizeof(float) + 15) / 16 * 16);
    m.params = (at += (size_t)CL_THREADS * 4 * sizeof(float));
    m.bars = (at += 2 * (size_t)L.param_bytes);
    m.rows = (at += (size_t)(2 * slots + 2) * 8);
    m.total = at + 2 * CL_ROWS * sizeof(int);
    return m;
}

struct cluster_args {
    cluster_layout L;
    cluster_smem m;
    int slots, activation;
    float eps;
    const unsigned char *stream; /* cuda_cluster_pack's */
    void *x;                   /* rows x hidden: the embedding's output in, the last layer's out */
    unsigned long long *trace; /* or NULL: CUDA_CLUSTER_TRACE_PHASES sums (ns) */
};

/* The trace (EMBEDRAG_CUDA_CLUSTER_TRACE): thread 0 of block 0 adds the nanoseconds since its
 * last stamp to phase i's sum. */
struct cluster_clock {
    unsigned long long *sums, last;
    __device__ __forceinline__ static unsigned long long now()
    {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        return t;
    }
    __device__ __forceinline__ void stamp(int i)
    {
        if (!sums) return;
        unsigned long long t = now();
        atomicAdd(sums + i, t - last);
        last = t;
    }
};

/* ---- PTX: cluster, mbarrier, bulk copies ---- */

__device__ __forceinline__ unsigned cluster_rank()
{
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

/* Every thread of every block of the cluster: what each wrote to shared memory (its own or a
 * peer's) before is visible to all after. */
__device__ __forceinline__ void cluster_sync()
{
    __syncwarp(); /* .aligned: the warp's threads together */
    asm volatile("barrier.cluster.arrive.release.aligned;\n\t"
                 "barrier.cluster.wait.acquire.aligned;" ::
                     : "memory");
}

/* 16 bytes to the same shared-memory offset in block `rank` of the cluster. */
__device__ __forceinline__ void store_peer(uint32_t local, unsigned rank, uint4 v)
{
    uint32_t remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
    asm volatile("st.shared::cluster.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(remote), "r"(v.x),
                 "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

/* ---- the kernel's parts ---- */

struct cluster_ring {
    uint32_t base, full, empty; /* shared addresses: slot 0, full[0], empty[0] */
    unsigned slots, total;      /* chunks in the whole pass */
    const unsigned char *src;   /* this block's stream */
};

/* Where a thread is in the ring: the pass's chunk g, its slot and the parity of the slot's use. */
struct cluster_cursor {
    unsigned g, slot, phase;
};

/* Thread 0: chunk g of the pass into `slot`. */
__device__ __forceinline__ void ring_fill(const cluster_ring &r, const cluster_layout &L,
                                          unsigned g, unsigned slot)
{
    bulk_copy(r.base + slot * CUDA_CLUSTER_CHUNK, r.src + (size_t)g * CUDA_CLUSTER_CHUNK,
              cluster_chunk_used(L, (int)(g % (unsigned)L.per_layer)), r.full + slot * 8);
}

/* One k-pair (two k-steps) of the product into acc: A fragments from `a_kp`, B fragments from
 * `w` (this warp's first n-tile), `tiles` n-tiles CL_WARPS apart. */
template <typename T>
__device__ __forceinline__ void cluster_kpair(uint32_t a_kp, uint32_t w, int tiles,
                                              float (&acc)[CL_MAX_TILES][4])
{
    uint32_t a0[4], a1[4];
    load_matrix_x4(a0, a_kp);
    load_matrix_x4(a1, a_kp + 32);
#pragma unroll
    for (int t = 0; t < CL_MAX_TILES; t++) {
        if (t >= tiles) break;
        uint4 b;
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(b.x), "=r"(b.y), "=r"(b.z), "=r"(b.w)
                     : "r"(w + t * CL_WARPS * CL_UNIT));
        mma_type<T>::mma(acc[t], a0, b.x, b.y);
        mma_type<T>::mma(acc[t], a1, b.z, b.w);
    }
}

/* One step's product over this block's columns: acc (per warp: its n-tiles, or with a k-split
 * its n-tile's share of K, summed into the owner warp in a fixed order) = A W^T, A the CL_ROWS x
 * K activations at `a` (row stride `stride` elements). Alternate k-pairs go to two sets of sums,
 * added at the end, so that two mma chains are in flight. c is the ring position. Returns
 * whether this warp owns results (and which n-tiles: first + CL_WARPS t, t < *count). */
template <typename T>
__device__ __forceinline__ bool cluster_product(const cluster_layout &L, const cluster_ring &r,
                                                int s, const T *a, int stride,
                                                float (&acc)[CL_MAX_TILES][4], cluster_cursor &c,
                                                float *partial, int *first, int *count)
{
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int nt = L.nt[s], kpc = L.kpc[s], split = L.split[s];
    /* With a k-split (nt divides the warps, a power of two): n-tile warp % nt, k-pairs kp with
     * kp % split == warp / nt. */
    const int tile0 = split > 1 ? warp & (nt - 1) : warp,
              group = split > 1 ? warp >> L.nt_log[s] : 0;
    const int tiles = split > 1 ? 1 : (nt - warp + CL_WARPS - 1) / CL_WARPS;
    float other[CL_MAX_TILES][4];
#pragma unroll
    for (int t = 0; t < CL_MAX_TILES; t++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[t][i] = other[t][i] = 0.0f;
    /* ldmatrix rows: lanes 0-15 rows 0-15 at k, lanes 16-31 the same rows at k + 8. */
    const uint32_t a_lane = shared_address(a + (size_t)(lane % 16) * stride + (lane / 16) * 8);
    const uint32_t w_lane = lane * 16 + tile0 * CL_UNIT;
    for (int j = 0, kp0 = 0; j < L.chunks[s]; j++, kp0 += kpc) {
        barrier_wait(r.full + c.slot * 8, c.phase);
        __syncwarp(); /* the lanes leave the wait apart; ldmatrix and mma need them together */
        const int kps = cluster_min(kpc, L.kp[s] - kp0);
        const uint32_t chunk = r.base + c.slot * CUDA_CLUSTER_CHUNK + w_lane;
        if (tiles > 0) {
            int q = (group - kp0) & (split - 1);
            for (; q + split < kps; q += 2 * split) {
                cluster_kpair<T>(a_lane + (kp0 + q) * 64, chunk + (uint32_t)(q * nt * CL_UNIT),
                                 tiles, acc);
                cluster_kpair<T>(a_lane + (kp0 + q + split) * 64,
                                 chunk + (uint32_t)((q + split) * nt * CL_UNIT), tiles, other);
            }
            if (q < kps)
                cluster_kpair<T>(a_lane + (kp0 + q) * 64, chunk + (uint32_t)(q * nt * CL_UNIT),
                                 tiles, acc);
        }
        __syncwarp();
        if (lane == 0) barrier_arrive(r.empty + c.slot * 8);
        /* The slot is refilled with chunk g + slots as soon as every warp has released it (warp
         * 0 waits for the others here). The release orders the warps' reads of the slot before
         * the copy's writes; no proxy fence is needed (TMA pipelines do the same). */
        if (threadIdx.x == 0 && c.g + r.slots < r.total) {
            barrier_wait(r.empty + c.slot * 8, c.phase);
            ring_fill(r, L, c.g + r.slots, c.slot);
        }
        __syncwarp();
        c.g++;
        if (++c.slot == r.slots) {
            c.slot = 0;
            c.phase ^= 1;
        }
    }
#pragma unroll
    for (int t = 0; t < CL_MAX_TILES; t++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[t][i] += other[t][i];
    if (split > 1) {
        if (group > 0)
#pragma unroll
            for (int i = 0; i < 4; i++) partial[(warp * WARP + lane) * 4 + i] = acc[0][i];
        __syncthreads();
        if (group == 0)
            for (int h = 1; h < split; h++)
#pragma unroll
                for (int i = 0; i < 4; i++)
                    acc[0][i] += partial[((warp + h * nt) * WARP + lane) * 4 + i];
    }
    *first = tile0;
    *count = tiles;
    return group == 0 && tiles > 0;
}

/* Copies this block's columns [col, col + cols) of CL_ROWS rows of `buf` (row stride `stride`
 * elements) to the same place in every other block of the cluster. */
template <typename T>
__device__ __forceinline__ void cluster_share(const T *buf, int stride, int col, int cols,
                                              int blocks, unsigned rank)
{
    const int vectors = cols / VEC(T);
    for (int i = threadIdx.x; i < CL_ROWS * vectors; i += CL_THREADS) {
        const T *p = buf + (size_t)(i / vectors) * stride + col + (i % vectors) * VEC(T);
        const uint4 v = *reinterpret_cast<const uint4 *>(p);
        const uint32_t local = shared_address(p);
        for (int peer = 0; peer < blocks; peer++)
            if (peer != (int)rank) store_peer(local, (unsigned)peer, v);
    }
}

/* x = LayerNorm(exch + x) for the rows of the batch, a warp a row (cuda_add_layer_norm's
 * formula, layer_norm_store). */
template <typename T>
__device__ __forceinline__ void cluster_norm(T *x, const T *exch, int stride, int hidden,
                                             int tokens, const float *gamma, const float *beta,
                                             float eps)
{
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int vectors = hidden / VEC(T);
    for (int row = warp; row < tokens; row += CL_WARPS) {
        float v[CL_LN_VECTORS][VEC(T)];
#pragma unroll
        for (int i = 0; i < CL_LN_VECTORS; i++) {
            int c = lane + i * WARP;
            if (c >= vectors) break;
            float r[VEC(T)];
            load_vector(exch + (size_t)row * stride + c * VEC(T), v[i]);
            load_vector(x + (size_t)row * stride + c * VEC(T), r);
#pragma unroll
            for (int e = 0; e < VEC(T); e++) v[i][e] += r[e];
        }
        __syncwarp(); /* the row is read whole before it is overwritten */
        layer_norm_store<T, CL_LN_VECTORS>(v, vectors, hidden, gamma, beta, eps,
                                           x + (size_t)row * stride);
    }
}

/* The head's attention for every row of the batch, a warp a query row: scores of the row's
 * sequence's keys a lane each (sequences of at most CL_ROWS tokens fit a warp), softmax in fp32,
 * then each lane sums P V for its columns. Writes this block's context columns. */
template <typename T>
__device__ __forceinline__ void cluster_attention(const float *qkv, int qs, int d, T *ctx,
                                                  int stride, unsigned rank, int tokens,
                                                  const int *starts, const int *ends)
{
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const float scale = 1.0f / sqrtf((float)d);
    for (int row = warp; row < tokens; row += CL_WARPS) {
        int start = starts[row], n = ends[row] - start;
        float score = -INFINITY;
        if (lane < n) {
            const float4 *q = reinterpret_cast<const float4 *>(qkv + (size_t)row * qs);
            const float4 *k =
                reinterpret_cast<const float4 *>(qkv + (size_t)(start + lane) * qs + d);
            float dot[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int e = 0; e < d / 4; e++) {
                float4 qv = q[e], kv = k[e];
                dot[0] += qv.x * kv.x;
                dot[1] += qv.y * kv.y;
                dot[2] += qv.z * kv.z;
                dot[3] += qv.w * kv.w;
            }
            score = ((dot[0] + dot[1]) + (dot[2] + dot[3])) * scale;
        }
        float top = warp_max(score);
        float p = lane < n ? expf(score - top) : 0.0f;
        float inv = 1.0f / warp_sum(p);
        for (int e0 = 0; e0 < d; e0 += WARP) {
            int e = e0 + lane;
            float o = 0.0f;
            for (int j = 0; j < n; j++) {
                float pj = __shfl_sync(FULL_MASK, p, j);
                o += pj * qkv[(size_t)(start + j) * qs + 2 * d + e];
            }
            ctx[(size_t)row * stride + rank * d + e] = from_float<T>(o * inv);
        }
    }
}

/* The owner warps' results of a product, + bias (this block's slice, in its column order):
 * store(row, column, value) for each. */
template <typename T, typename Store>
__device__ __forceinline__ void cluster_epilogue(const float (&acc)[CL_MAX_TILES][4], int first,
                                                 int count, const T *bias, Store store)
{
    const int lane = threadIdx.x % WARP;
#pragma unroll
    for (int t = 0; t < CL_MAX_TILES; t++)
#pragma unroll
        for (int h = 0; h < 2 && t < count; h++) {
            int row = lane / 4 + 8 * h, col = (first + t * CL_WARPS) * 8 + (lane % 4) * 2;
#pragma unroll
            for (int e = 0; e < 2; e++)
                store(row, col + e, acc[t][2 * h + e] + to_float(bias[col + e]));
        }
}

/* Hands this block's columns [col, col + cols) of `buf` to every block, then the cluster's
 * barrier (trace stamps i and i + 1). */
template <typename T>
__device__ __forceinline__ void cluster_hand_over(const T *buf, int stride, int col, int cols,
                                                  int blocks, unsigned rank, cluster_clock &clock,
                                                  int i)
{
    __syncthreads();
    cluster_share<T>(buf, stride, col, cols, blocks, rank);
    clock.stamp(i);
    cluster_sync();
    clock.stamp(i + 1);
}

/* After S1 and S3: this block's slice of exch to every block, the barrier, then residual +
 * LayerNorm of every row, in every block (trace stamps i, i + 1 and i + 2). */
template <typename T>
__device__ __forceinline__ void cluster_residual_norm(T *x, const T *exch, int xs, int hidden,
                                                      int blocks, unsigned rank, int tokens,
                                                      const float *gamma, const float *beta,
                                                      float eps, cluster_clock &clock, int i)
{
    const int hc = hidden / blocks;
    cluster_hand_over<T>(exch, xs, rank * hc, hc, blocks, rank, clock, i);
    cluster_norm<T>(x, exch, xs, hidden, tokens, gamma, beta, eps);
    __syncthreads();
    clock.stamp(i + 2);
}

template <typename T>
__global__ void __launch_bounds__(CL_THREADS, 1)
    cluster_pass_kernel(cuda_batch_view b, cluster_args a)
{
    extern __shared__ __align__(128) unsigned char smem[];
    const cluster_layout &L = a.L;
    const cluster_smem &m = a.m;
    const int tid = threadIdx.x;
    const unsigned rank = cluster_rank();
    const int blocks = L.blocks, H = L.hidden, d = L.head;
    T *x = reinterpret_cast<T *>(smem + m.x), *ctx = reinterpret_cast<T *>(smem + m.ctx);
    T *exch = reinterpret_cast<T *>(smem + m.exch), *inter = reinterpret_cast<T *>(smem + m.inter);
    float *qkv = reinterpret_cast<float *>(smem + m.qkv);
    float *partial = reinterpret_cast<float *>(smem + m.partial);
    unsigned char *params = smem + m.params;
    int *starts = reinterpret_cast<int *>(smem + m.rows), *ends = starts + CL_ROWS;
    const int xs = m.x_stride, is = m.inter_stride, qs = m.qkv_stride;
    cluster_clock clock = {rank == 0 && tid == 0 ? a.trace : NULL, 0};
    if (clock.sums) clock.last = cluster_clock::now();

    cluster_ring r;
    r.base = shared_address(smem);
    r.full = shared_address(smem + m.bars);
    r.empty = r.full + a.slots * 8;
    r.slots = (unsigned)a.slots;
    r.total = (unsigned)(L.layers * L.per_layer);
    r.src = a.stream + (size_t)rank * L.layers * L.per_layer * CUDA_CLUSTER_CHUNK;
    const uint32_t param_bar = r.empty + a.slots * 8;
    const unsigned char *param_src =
        a.stream + L.chunk_bytes_total + (size_t)rank * L.layers * L.param_bytes;

    if (tid == 0) {
        for (int i = 0; i < a.slots; i++) {
            barrier_init(r.full + i * 8, 1);
            barrier_init(r.empty + i * 8, CL_WARPS);
        }
        barrier_init(param_bar, 1);
        barrier_init(param_bar + 8, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (tid == 0) {
        for (int l = 0; l < 2 && l < L.layers; l++)
            bulk_copy(shared_address(params + l * L.param_bytes),
                      param_src + (size_t)l * L.param_bytes, (unsigned)L.param_bytes,
                      param_bar + l * 8);
        for (unsigned g = 0; g < r.slots && g < r.total; g++) ring_fill(r, L, g, g);
    }
    int tokens = b.header[CUDA_HEADER_TOKENS];
    if (tokens > CL_ROWS) tokens = CL_ROWS;
    if (tid < CL_ROWS) {
        int start = 0, end = 0;
        if (tid < tokens) {
            int seq = b.sequence_of[tid];
            start = b.offsets[seq];
            end = b.offsets[seq + 1];
        }
        starts[tid] = start;
        ends[tid] = end;
    }
    /* X: the batch's rows, zeros past them (they stay zero: LayerNorm skips them); the context
     * rows zero (attention writes only the batch's rows). */
    const T *xin = static_cast<const T *>(a.x);
    const int hv = H / VEC(T);
    for (int i = tid; i < CL_ROWS * hv; i += CL_THREADS) {
        int row = i / hv, c = (i % hv) * VEC(T);
        uint4 v = make_uint4(0, 0, 0, 0);
        if (row < tokens) v = *reinterpret_cast<const uint4 *>(xin + (size_t)row * H + c);
        *reinterpret_cast<uint4 *>(x + (size_t)row * xs + c) = v;
        *reinterpret_cast<uint4 *>(ctx + (size_t)row * xs + c) = make_uint4(0, 0, 0, 0);
    }
    /* Every block has started (its shared memory exists) before any peer writes to it. */
    cluster_sync();
    clock.stamp(0);

    cluster_cursor cursor = {0, 0, 0};
    const int hc = H / blocks, ic = L.inter / blocks;
    /* S1 and S3 leave their columns, rounded to the dtype, in exch. */
    auto to_exch = [&](int row, int col, float v) {
        exch[(size_t)row * xs + rank * hc + col] = from_float<T>(v);
    };
    for (int l = 0; l < L.layers; l++) {
        const unsigned char *P = params + (l & 1) * L.param_bytes;
        const T *bias = reinterpret_cast<const T *>(P);
        const float *norms = reinterpret_cast<const float *>(P + L.norm_offset);
        float acc[CL_MAX_TILES][4];
        int first, count;

        /* S0: this head's Q, K, V; then its attention. */
        bool own = cluster_product<T>(L, r, 0, x, xs, acc, cursor, partial, &first, &count);
        clock.stamp(1);
        barrier_wait(param_bar + (l & 1) * 8, (l >> 1) & 1);
        if (own)
            cluster_epilogue(acc, first, count, bias + L.bias[0], [&](int row, int col, float v) {
                qkv[(size_t)row * qs + col] = to_float(from_float<T>(v));
            });
        __syncthreads();
        cluster_attention<T>(qkv, qs, d, ctx, xs, rank, tokens, starts, ends);
        cluster_hand_over<T>(ctx, xs, rank * d, d, blocks, rank, clock, 2);

        /* S1: attention output columns; residual + LayerNorm in every block. */
        own = cluster_product<T>(L, r, 1, ctx, xs, acc, cursor, partial, &first, &count);
        clock.stamp(4);
        if (own) cluster_epilogue(acc, first, count, bias + L.bias[1], to_exch);
        cluster_residual_norm<T>(x, exch, xs, H, blocks, rank, tokens, norms, norms + H, a.eps,
                                 clock, 5);

        /* S2: intermediate columns with the activation. */
        own = cluster_product<T>(L, r, 2, x, xs, acc, cursor, partial, &first, &count);
        clock.stamp(8);
        if (own)
            cluster_epilogue(acc, first, count, bias + L.bias[2], [&](int row, int col, float v) {
                inter[(size_t)row * is + rank * ic + col] =
                    from_float<T>(activate(v, a.activation));
            });
        cluster_hand_over<T>(inter, is, rank * ic, ic, blocks, rank, clock, 9);

        /* S3: output columns; residual + LayerNorm in every block. */
        own = cluster_product<T>(L, r, 3, inter, is, acc, cursor, partial, &first, &count);
        clock.stamp(11);
        if (own) cluster_epilogue(acc, first, count, bias + L.bias[3], to_exch);
        cluster_residual_norm<T>(x, exch, xs, H, blocks, rank, tokens, norms + 2 * H, norms + 3 * H,
                                 a.eps, clock, 12);
        /* This layer's parameter buffer is free: the layer after next's parameters into it. */
        if (tid == 0 && l + 2 < L.layers)
            bulk_copy(shared_address(params + (l & 1) * L.param_bytes),
                      param_src + (size_t)(l + 2) * L.param_bytes, (unsigned)L.param_bytes,
                      param_bar + (l & 1) * 8);
    }
    /* The last layer's rows back to global memory, each block its columns. */
    T *xout = static_cast<T *>(a.x);
    const int vectors = hc / VEC(T);
    for (int i = tid; i < tokens * vectors; i += CL_THREADS) {
        int row = i / vectors, c = rank * hc + (i % vectors) * VEC(T);
        *reinterpret_cast<uint4 *>(xout + (size_t)row * H + c) =
            *reinterpret_cast<const uint4 *>(x + (size_t)row * xs + c);
    }
    clock.stamp(15);
    if (clock.sums) atomicAdd(clock.sums + CUDA_CLUSTER_TRACE_PHASES - 1, 1ull);
}

/* ---- packing ---- */

/* One thread per lane of a fragment unit of block c's step s: the 16 bytes lane l of the warp
 * using the unit (n-tile nt, k-pair kp) loads, b0 and b1 of k-step 2 kp, then of 2 kp + 1. */
template <typename T>
__global__ void cluster_pack_kernel(cluster_layout L, int layer, const T *w0, const T *w1,
                                    const T *w2, const T *w3, unsigned char *stream)
{
    size_t per_block = 0;
    for (int s = 0; s < 4; s++) per_block += (size_t)L.kp[s] * L.nt[s] * WARP;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= per_block * L.blocks) return;
    int c = (int)(i / per_block);
    size_t rem = i % per_block;
    int s = 0;
    while ((size_t)L.kp[s] * L.nt[s] * WARP <= rem) {
        rem -= (size_t)L.kp[s] * L.nt[s] * WARP;
        s++;
    }
    const int lane = (int)(rem % WARP), unit = (int)(rem / WARP);
    const int nt = unit % L.nt[s], kp = unit / L.nt[s];
    const int d = L.head, H = L.hidden;
    const int n_local = nt * 8 + lane / 4;
    int n, k_total;
    const T *w;
    switch (s) {
    case 0:
        n = (n_local / d) * H + c * d + n_local % d;
        w = w0;
        k_total = H;
        break;
    case 1:
        n = c * (H / L.blocks) + n_local;
        w = w1;
        k_total = H;
        break;
    case 2:
        n = c * (L.inter / L.blocks) + n_local;
        w = w2;
        k_total = H;
        break;
    default:
        n = c * (H / L.blocks) + n_local;
        w = w3;
        k_total = L.inter;
        break;
    }
    const T *row = w + (size_t)n * k_total + kp * 32 + (lane % 4) * 2;
    __align__(16) T v[8] = {row[0], row[1], row[8], row[9], row[16], row[17], row[24], row[25]};
    size_t chunk = ((size_t)c * L.layers + layer) * L.per_layer + L.first[s] + kp / L.kpc[s];
    unsigned char *dst = stream + chunk * CUDA_CLUSTER_CHUNK +
                         (size_t)((kp % L.kpc[s]) * L.nt[s] + nt) * CL_UNIT + lane * 16;
    *reinterpret_cast<uint4 *>(dst) = *reinterpret_cast<const uint4 *>(v);
}

/* Block c's parameter block of a layer: its bias slices in its column order, then both
 * LayerNorms' gamma and beta (fp32, whole). One thread per element of either part. */
template <typename T>
__global__ void cluster_params_kernel(cluster_layout L, int layer, const T *b0, const T *b1,
                                      const T *b2, const T *b3, const float *g1, const float *e1,
                                      const float *g2, const float *e2, unsigned char *stream)
{
    const int d = L.head, H = L.hidden, hc = H / L.blocks, ic = L.inter / L.blocks;
    const int biases = 3 * d + 2 * hc + ic, per_block = biases + 4 * H;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= per_block * L.blocks) return;
    int c = i / per_block, e = i % per_block;
    unsigned char *block =
        stream + L.chunk_bytes_total + ((size_t)c * L.layers + layer) * (size_t)L.param_bytes;
    if (e < biases) {
        T v;
        if (e < 3 * d)
            v = b0[(e / d) * H + c * d + e % d];
        else if (e < 3 * d + hc)
            v = b1[c * hc + e - 3 * d];
        else if (e < 3 * d + hc + ic)
            v = b2[c * ic + e - 3 * d - hc];
        else
            v = b3[c * hc + e - 3 * d - hc - ic];
        reinterpret_cast<T *>(block)[e] = v;
        return;
    }
    e -= biases;
    const float *src[4] = {g1, e1, g2, e2};
    reinterpret_cast<float *>(block + L.norm_offset)[e] = src[e / H][e % H];
}

/* ---- host side ---- */

extern "C" const char *const cuda_cluster_trace_names[] = {"start",
                                                           "S0 product",
                                                           "S0 bias, attention, share",
                                                           "S0 barrier",
                                                           "S1 product",
                                                           "S1 bias, share",
                                                           "S1 barrier",
                                                           "S1 LayerNorm",
                                                           "S2 product",
                                                           "S2 activation, share",
                                                           "S2 barrier",
                                                           "S3 product",
                                                           "S3 bias, share",
                                                           "S3 barrier",
                                                           "S3 LayerNorm",
                                                           "rows out"};

template <typename T> static void *cluster_kernel()
{
    return reinterpret_cast<void *>(cluster_pass_kernel<T>);
}

static void *kernel_of(cuda_dtype dtype)
{
    return dtype == CUDA_DTYPE_BF16 ? cluster_kernel<__nv_bfloat16>() : cluster_kernel<__half>();
}

/* The ring's slots that fit beside the rest on this device, or 0. */
static int cluster_slots(const cluster_layout &L, size_t *shared)
{
    int device, limit;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
            cudaSuccess)
        return 0;
    cluster_smem none = cluster_smem_make(L, 0);
    if (none.total + 2 * CUDA_CLUSTER_CHUNK > (size_t)limit) return 0;
    int slots = (int)(((size_t)limit - none.total) / (CUDA_CLUSTER_CHUNK + 16));
    if (slots > CL_MAX_SLOTS) slots = CL_MAX_SLOTS;
    *shared = cluster_smem_make(L, slots).total;
    return slots;
}

static cudaLaunchConfig_t cluster_config(const cluster_layout &L, size_t shared,
                                         cudaStream_t stream, cudaLaunchAttribute *attribute)
{
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3((unsigned)L.blocks);
    config.blockDim = dim3(CL_THREADS);
    config.dynamicSmemBytes = shared;
    config.stream = stream;
    attribute->id = cudaLaunchAttributeClusterDimension;
    attribute->val.clusterDim.x = (unsigned)L.blocks;
    attribute->val.clusterDim.y = 1;
    attribute->val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
    return config;
}

extern "C" size_t cuda_cluster_stream_bytes(cuda_dtype dtype, const cuda_cluster_model *model)
{
    cluster_layout L;
    if (dtype == CUDA_DTYPE_F32 ||
        !cluster_layout_make(model->layers, model->hidden, model->intermediate, model->heads, &L))
        return 0;
    return L.chunk_bytes_total + (size_t)L.blocks * model->layers * L.param_bytes;
}

extern "C" int cuda_cluster_takes(cuda_dtype dtype, const cuda_cluster_model *model)
{
    cluster_layout L;
    if (!cuda_cluster_stream_bytes(dtype, model) ||
        !cluster_layout_make(model->layers, model->hidden, model->intermediate, model->heads, &L))
        return 0;
    size_t shared;
    if (!cluster_slots(L, &shared)) return 0;
    void *kernel = kernel_of(dtype);
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared) !=
            cudaSuccess ||
        (L.blocks > 8 &&
         cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) !=
             cudaSuccess)) {
        cudaGetLastError();
        return 0;
    }
    cudaLaunchAttribute attribute;
    cudaLaunchConfig_t config = cluster_config(L, shared, 0, &attribute);
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return clusters > 0;
}

template <typename T>
static cudaError_t pack_typed(const cluster_layout &L, int layer, const cuda_small_layer *w,
                              void *stream, cudaStream_t st)
{
    size_t units = 0;
    for (int s = 0; s < 4; s++) units += (size_t)L.kp[s] * L.nt[s] * WARP;
    units *= L.blocks;
    unsigned threads = 256;
    cluster_pack_kernel<T><<<(unsigned)((units + threads - 1) / threads), threads, 0, st>>>(
        L, layer, static_cast<const T *>(w->weight[0]), static_cast<const T *>(w->weight[1]),
        static_cast<const T *>(w->weight[2]), static_cast<const T *>(w->weight[3]),
        static_cast<unsigned char *>(stream));
    int d = L.head, hc = L.hidden / L.blocks, ic = L.inter / L.blocks;
    size_t elements = (size_t)(3 * d + 2 * hc + ic + 4 * L.hidden) * L.blocks;
    cluster_params_kernel<T><<<(unsigned)((elements + threads - 1) / threads), threads, 0, st>>>(
        L, layer, static_cast<const T *>(w->bias[0]), static_cast<const T *>(w->bias[1]),
        static_cast<const T *>(w->bias[2]), static_cast<const T *>(w->bias[3]), w->attention_gamma,
        w->attention_beta, w->output_gamma, w->output_beta, static_cast<unsigned char *>(stream));
    return cudaGetLastError();
}

extern "C" cudaError_t cuda_cluster_pack(cuda_dtype dtype, const cuda_cluster_model *model,
                                         int layer, const cuda_small_layer *weights, void *stream,
                                         cudaStream_t st)
{
    cluster_layout L;
    if (dtype == CUDA_DTYPE_F32 ||
        !cluster_layout_make(model->layers, model->hidden, model->intermediate, model->heads, &L))
        return cudaErrorInvalidValue;
    if (dtype == CUDA_DTYPE_BF16) return pack_typed<__nv_bfloat16>(L, layer, weights, stream, st);
    return pack_typed<__half>(L, layer, weights, stream, st);
}

extern "C" cudaError_t cuda_cluster_pass(cuda_dtype dtype, const cuda_batch_view *batch,
                                         const cuda_cluster_model *model, const void *stream,
                                         void *x, unsigned long long *trace, cudaStream_t st)
{
    cluster_args a;
    if (dtype == CUDA_DTYPE_F32 ||
        !cluster_layout_make(model->layers, model->hidden, model->intermediate, model->heads, &a.L))
        return cudaErrorInvalidValue;
    size_t shared;
    a.slots = cluster_slots(a.L, &shared);
    if (!a.slots) return cudaErrorInvalidValue;
    a.m = cluster_smem_make(a.L, a.slots);
    a.activation = model->activation;
    a.eps = model->eps;
    a.stream = static_cast<const unsigned char *>(stream);
    a.x = x;
    a.trace = trace;
    cudaLaunchAttribute attribute;
    cudaLaunchConfig_t config = cluster_config(a.L, shared, st, &attribute);
    if (dtype == CUDA_DTYPE_BF16)
        return cudaLaunchKernelEx(&config, cluster_pass_kernel<__nv_bfloat16>, *batch, a);
    return cudaLaunchKernelEx(&config, cluster_pass_kernel<__half>, *batch, a);
}
