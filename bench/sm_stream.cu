/* How fast one multiprocessor streams bytes from global memory into its shared memory, and how
 * that changes with the number of multiprocessors streaming at once: the number that bounds a
 * pass whose weights are read by a few blocks (the cluster pass of bench/cuda-notes.md reads a
 * 12 x 384 layer's 3.5 MB through 12 blocks). Each block streams its own region in chunks, with a
 * fixed number of chunks in flight, by one of three means:
 *   bulk     thread 0 issues cp.async.bulk (the copy engine) into a ring of slots, full/empty
 *            mbarriers, every warp waits for each chunk and releases it (the cluster pass's ring)
 *   cpasync  every thread copies 16 bytes at a time with cp.async.cg; groups committed per chunk,
 *            cp.async.wait_group keeps `inflight` chunks in flight
 *   load     every thread loads 16 bytes at a time into registers (ld.global.cg), `inflight`
 *            loads a thread in flight, XOR-folded so that nothing is optimized away
 * The region is either small enough for every block's to stay in L2 (resident) or large (memory).
 * Prints one line per configuration: GB/s per block and over all blocks (CUDA events, the median
 * of 5 launches after 2).
 * Build and run: bench/sm_stream.sh [blocks ...] */
#include "backend/cuda/cuda_device.cuh"

#include <cuda_runtime.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define THREADS 256
#define CHECK(call)                                                                                \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e_));            \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

enum { MODE_BULK, MODE_CPASYNC, MODE_LOAD };
static const char *const mode_names[] = {"bulk", "cpasync", "load"};

/* Block b streams `chunks` chunks of `chunk` bytes from region b (region bytes long, read
 * cyclically). */
__global__ void __launch_bounds__(THREADS, 1)
    stream_kernel(const unsigned char *src, size_t region, unsigned chunk, int chunks, int inflight,
                  int mode, unsigned *sink)
{
    extern __shared__ __align__(128) unsigned char smem[];
    const unsigned char *base = src + (size_t)blockIdx.x * region;
    const int tid = threadIdx.x, lane = tid % 32;
    const size_t per_region = region / chunk;
    unsigned fold = 0;
    if (mode == MODE_BULK) {
        uint64_t *bars = reinterpret_cast<uint64_t *>(smem + (size_t)inflight * chunk);
        uint32_t full = shared_address(bars), empty = full + inflight * 8;
        if (tid == 0) {
            for (int i = 0; i < inflight; i++) {
                barrier_init(full + i * 8, 1);
                barrier_init(empty + i * 8, THREADS / 32);
            }
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        }
        __syncthreads();
        if (tid == 0)
            for (int g = 0; g < inflight && g < chunks; g++)
                bulk_copy(shared_address(smem + (size_t)g * chunk), base + (g % per_region) * chunk,
                          chunk, full + g * 8);
        for (int g = 0; g < chunks; g++) {
            unsigned slot = g % inflight, phase = (g / inflight) & 1;
            barrier_wait(full + slot * 8, phase);
            __syncwarp();
            fold ^= reinterpret_cast<const unsigned *>(smem + (size_t)slot * chunk)[tid];
            __syncwarp();
            if (lane == 0) barrier_arrive(empty + slot * 8);
            if (tid == 0 && g + inflight < chunks) {
                barrier_wait(empty + slot * 8, phase);
                bulk_copy(shared_address(smem + (size_t)slot * chunk),
                          base + ((g + inflight) % per_region) * chunk, chunk, full + slot * 8);
            }
            __syncwarp();
        }
    } else if (mode == MODE_CPASYNC) {
        for (int g = 0; g < chunks + inflight - 1; g++) {
            if (g < chunks) {
                unsigned slot = g % inflight;
                const unsigned char *from = base + (g % per_region) * chunk;
                for (unsigned o = tid * 16; o < chunk; o += THREADS * 16)
                    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(
                                     shared_address(smem + (size_t)slot * chunk + o)),
                                 "l"(__cvta_generic_to_global(from + o))
                                 : "memory");
            }
            asm volatile("cp.async.commit_group;" ::: "memory");
            if (g >= inflight - 1) {
                /* chunk g - inflight + 1 is complete when at most inflight - 1 groups remain */
                if (g >= chunks)
                    asm volatile("cp.async.wait_group 0;" ::: "memory");
                else if (inflight >= 6)
                    asm volatile("cp.async.wait_group 5;" ::: "memory");
                else if (inflight >= 4)
                    asm volatile("cp.async.wait_group 3;" ::: "memory");
                else
                    asm volatile("cp.async.wait_group 1;" ::: "memory");
                __syncthreads();
                fold ^= reinterpret_cast<const unsigned *>(
                    smem + (size_t)((g - inflight + 1) % inflight) * chunk)[tid];
                __syncthreads();
            }
        }
    } else {
        /* inflight 16-byte loads a thread in flight per step */
        const size_t step = (size_t)THREADS * 16;
        size_t total = (size_t)chunks * chunk, pos = (size_t)tid * 16;
        while (pos < total) {
            uint4 v[8];
            int n = 0;
#pragma unroll
            for (int i = 0; i < 8; i++)
                if (i < inflight && pos + i * step < total) {
                    size_t at = (pos + i * step) % region;
                    asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];"
                                 : "=r"(v[i].x), "=r"(v[i].y), "=r"(v[i].z), "=r"(v[i].w)
                                 : "l"(base + at));
                    n = i + 1;
                }
#pragma unroll
            for (int i = 0; i < 8; i++)
                if (i < n) fold ^= v[i].x ^ v[i].y ^ v[i].z ^ v[i].w;
            pos += (size_t)n * step;
        }
    }
    if (fold == 0x9e3779b9u) sink[blockIdx.x] = fold; /* practically never: keeps the loads */
}

static double run(const unsigned char *src, size_t region, unsigned chunk, int chunks, int inflight,
                  int mode, int blocks, unsigned *sink)
{
    size_t shared = mode == MODE_LOAD ? 0 : (size_t)inflight * chunk + 2 * inflight * 8;
    CHECK(cudaFuncSetAttribute(stream_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               (int)shared));
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    float ms[7];
    for (int r = 0; r < 7; r++) {
        CHECK(cudaEventRecord(a));
        stream_kernel<<<blocks, THREADS, shared>>>(src, region, chunk, chunks, inflight, mode,
                                                   sink);
        CHECK(cudaEventRecord(b));
        CHECK(cudaEventSynchronize(b));
        CHECK(cudaGetLastError());
        CHECK(cudaEventElapsedTime(&ms[r], a, b));
    }
    /* median of the last 5 */
    for (int i = 2; i < 7; i++)
        for (int j = i + 1; j < 7; j++)
            if (ms[j] < ms[i]) {
                float t = ms[i];
                ms[i] = ms[j];
                ms[j] = t;
            }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return ms[4] / 1e3;
}

int main(int argc, char **argv)
{
    int device_blocks[16] = {1, 12, 66, 132}, nblocks = 4;
    if (argc > 1) {
        nblocks = 0;
        for (int i = 1; i < argc && nblocks < 16; i++) device_blocks[nblocks++] = atoi(argv[i]);
    }
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    printf("%s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
    const size_t big = (size_t)64 << 20, small = (size_t)128 << 10; /* region per block */
    unsigned char *src;
    unsigned *sink;
    CHECK(cudaMalloc(&src, big * 132));
    CHECK(cudaMemset(src, 1, big * 132));
    CHECK(cudaMalloc(&sink, 1024 * sizeof(unsigned)));
    printf("%-8s %-8s %6s %6s %8s %10s %10s\n", "mode", "data", "blocks", "chunk", "inflight",
           "GB/s/SM", "GB/s all");
    const unsigned chunks_kb[] = {16, 32};
    for (int mode = 0; mode < 3; mode++)
        for (int where = 0; where < 2; where++)
            for (int bi = 0; bi < nblocks; bi++)
                for (int ci = 0; ci < 2; ci++)
                    for (int k = 0; k < 3; k++) {
                        /* chunks in flight (bulk, cpasync), or 16-byte loads a thread (load) */
                        static const int ring[] = {2, 4, 6}, loads[] = {1, 4, 8};
                        int inflight = mode == MODE_LOAD ? loads[k] : ring[k];
                        int blocks = device_blocks[bi];
                        unsigned chunk = chunks_kb[ci] << 10;
                        if (mode == MODE_LOAD && ci == 1) continue;
                        size_t region = where ? big : small;
                        /* from memory every byte once (more than L2 holds even for one block);
                         * from L2 8 MB a block, its region over and over */
                        int chunks = (int)((where ? big : ((size_t)8 << 20)) / chunk);
                        double s = run(src, region, chunk, chunks, inflight, mode, blocks, sink);
                        double per = (double)chunks * chunk / s / 1e9;
                        printf("%-8s %-8s %6d %5uK %8d %10.1f %10.1f\n", mode_names[mode],
                               where ? "memory" : "L2", blocks,
                               mode == MODE_LOAD ? 4u : chunk >> 10, inflight, per, per * blocks);
                        fflush(stdout);
                    }
    return 0;
}
