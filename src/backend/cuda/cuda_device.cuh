/* Device helpers shared by the CUDA backend's kernel files (cuda_kernels.cu, cuda_cluster.cu):
 * element conversions, 16-byte row vectors, warp reductions, the activations, mma.sync and
 * ldmatrix. Included by .cu files only. */
#ifndef EMBEDRAG_CUDA_DEVICE_CUH
#define EMBEDRAG_CUDA_DEVICE_CUH

#include "backend/cuda/cuda_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define WARP 32
#define FULL_MASK 0xffffffffu

/* ---- element types ---- */

__device__ __forceinline__ float to_float(float x)
{
    return x;
}
__device__ __forceinline__ float to_float(__half x)
{
    return __half2float(x);
}
__device__ __forceinline__ float to_float(__nv_bfloat16 x)
{
    return __bfloat162float(x);
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x)
{
    return x;
}
template <> __device__ __forceinline__ __half from_float<__half>(float x)
{
    return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x)
{
    return __float2bfloat16_rn(x);
}

/* Elements of T in one 16-byte vector. */
#define VEC(T) ((int)(16 / sizeof(T)))

template <typename T> __device__ __forceinline__ void load_vector(const T *p, float *out)
{
    uint4 raw = *reinterpret_cast<const uint4 *>(p);
    const T *v = reinterpret_cast<const T *>(&raw);
#pragma unroll
    for (int i = 0; i < VEC(T); i++) out[i] = to_float(v[i]);
}

template <typename T> __device__ __forceinline__ void store_vector(T *p, const float *in)
{
    uint4 raw;
    T *v = reinterpret_cast<T *>(&raw);
#pragma unroll
    for (int i = 0; i < VEC(T); i++) v[i] = from_float<T>(in[i]);
    *reinterpret_cast<uint4 *>(p) = raw;
}

/* N floats (a multiple of 4, 16-byte aligned) in float4 loads. */
template <int N> __device__ __forceinline__ void load_floats(const float *p, float *out)
{
#pragma unroll
    for (int i = 0; i < N / 4; i++) {
        float4 v = reinterpret_cast<const float4 *>(p)[i];
        out[4 * i] = v.x;
        out[4 * i + 1] = v.y;
        out[4 * i + 2] = v.z;
        out[4 * i + 3] = v.w;
    }
}

__device__ __forceinline__ float warp_sum(float x)
{
#pragma unroll
    for (int o = WARP / 2; o > 0; o /= 2) x += __shfl_xor_sync(FULL_MASK, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x)
{
#pragma unroll
    for (int o = WARP / 2; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(FULL_MASK, x, o));
    return x;
}

/* ---- LayerNorm rows ---- */

/* Normalizes the row a warp holds (v: its lanes' vectors, `vectors` of them in the row) with
 * a two-pass variance, as the CPU does, and stores it. */
template <typename T, int PER_LANE>
__device__ __forceinline__ void layer_norm_store(float (*v)[16 / sizeof(T)], int vectors,
                                                 int hidden, const float *gamma, const float *beta,
                                                 float eps, T *out)
{
    const int lane = threadIdx.x % WARP;
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < PER_LANE; i++)
        if (lane + i * WARP < vectors)
#pragma unroll
            for (int j = 0; j < VEC(T); j++) sum += v[i][j];
    float mean = warp_sum(sum) / (float)hidden;
    float deviation = 0.0f;
#pragma unroll
    for (int i = 0; i < PER_LANE; i++)
        if (lane + i * WARP < vectors)
#pragma unroll
            for (int j = 0; j < VEC(T); j++) {
                float d = v[i][j] - mean;
                deviation += d * d;
            }
    float inv = 1.0f / sqrtf(warp_sum(deviation) / (float)hidden + eps);
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        int c = lane + i * WARP;
        if (c >= vectors) continue;
        float y[VEC(T)], g[VEC(T)], b[VEC(T)];
        load_floats<VEC(T)>(gamma + (size_t)c * VEC(T), g);
        load_floats<VEC(T)>(beta + (size_t)c * VEC(T), b);
#pragma unroll
        for (int j = 0; j < VEC(T); j++) y[j] = (v[i][j] - mean) * inv * g[j] + b[j];
        store_vector(out + (size_t)c * VEC(T), y);
    }
}

/* ---- activations ---- */

__device__ __forceinline__ float activate(float x, int activation)
{
    switch (activation) {
    case CUDA_ACT_GELU:
        /* BERT's exact GELU; M_SQRT1_2 = 1/sqrt(2). */
        return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case CUDA_ACT_GELU_TANH: {
        /* sqrt(2/pi) and 0.044715: the tanh approximation of Hendrycks and Gimpel. */
        float inner = 0.79788456080286536f * (x + 0.044715f * x * x * x);
        return 0.5f * x * (1.0f + tanhf(inner));
    }
    case CUDA_ACT_RELU:
        return x > 0.0f ? x : 0.0f;
    }
    return x;
}

/* The fp16 and bf16 flavours of packing two floats into one register and of mma.sync m16n8k16
 * with fp32 sums (A row-major 16 x 16, B column-major 16 x 8, C 16 x 8). */
template <typename T> struct mma_type;
#define MMA_TYPE(T, PAIR, CONVERT, PTX)                                                            \
    template <> struct mma_type<T> {                                                               \
        static __device__ __forceinline__ uint32_t pack(float lo, float hi)                        \
        {                                                                                          \
            PAIR h = CONVERT(lo, hi);                                                              \
            return *reinterpret_cast<uint32_t *>(&h);                                              \
        }                                                                                          \
        static __device__ __forceinline__ void mma(float *c, const uint32_t *a, uint32_t b0,       \
                                                   uint32_t b1)                                    \
        {                                                                                          \
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX "." PTX ".f32 "              \
                         "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"                   \
                         : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                          \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));          \
        }                                                                                          \
    };
MMA_TYPE(__half, __half2, __floats2half2_rn, "f16")
MMA_TYPE(__nv_bfloat16, __nv_bfloat162, __floats2bfloat162_rn, "bf16")

__device__ __forceinline__ uint32_t shared_address(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

/* ldmatrix .x4: four 8 x 8 matrices of 16-bit elements. Lane i supplies the shared address of row
 * i % 8 of matrix i / 8 (16 bytes, 16-byte aligned). Register r[m] of lane l receives, of matrix
 * m, row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 (PTX ISA, "Warp-level matrix load
 * instruction: ldmatrix", figure "ldmatrix fragment layout for one 8x8 matrix"); the lower column
 * in the low half, as a 32-bit load of the two would give. */
__device__ __forceinline__ void load_matrix_x4(uint32_t *r, uint32_t address)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address)
                 : "memory");
}

/* ---- mbarriers and bulk copies (sm_90) ---- */

__device__ __forceinline__ void barrier_init(uint32_t bar, unsigned count)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void barrier_arrive(uint32_t bar)
{
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void barrier_wait(uint32_t bar, unsigned parity)
{
    uint32_t done = 0;
    while (!done)
        asm volatile("{\n\t.reg .pred p;\n\t"
                     "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
                     "selp.u32 %0, 1, 0, p;\n\t}"
                     : "=r"(done)
                     : "r"(bar), "r"(parity)
                     : "memory");
}

/* Thread 0: `bytes` (a multiple of 16) from global memory to shared memory, completing on bar
 * (which this arrival also tells to expect them). */
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void *src, unsigned bytes,
                                          uint32_t bar)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
                 : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, "
        "[%3];" ::"r"(dst),
        "l"(__cvta_generic_to_global(src)), "r"(bytes), "r"(bar)
        : "memory");
}

#endif
