/* kernel_timeline: a CUDA injection library that records every kernel a process runs, with the
 * GPU's own start and end timestamps, for finding where a pass's time goes between kernels.
 *
 * Why: the device machine has neither Nsight Systems nor a working nsys report, and Nsight
 * Compute serializes kernels and flushes caches, so it can neither show the gaps between kernels
 * nor the time a kernel takes inside a real pass (inputs warm in L2, neighbours overlapping).
 * CUPTI's activity API (shipped with the CUDA toolkit) gives both at little cost.
 *
 * Use (bench/kernel_timeline.sh does this):
 *   CUDA_INJECTION64_PATH=/path/libkernel_timeline.so EMBEDRAG_TIMELINE=out.csv program ...
 * The CUDA driver loads the library at cuInit and calls InitializeInjection. At exit the file
 * holds one line per kernel: start_ns,end_ns,stream,graph_id,grid,block,name (mangled). */
#include <cupti.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

enum { TIMELINE_BUFFER_BYTES = 8 << 20 };

static FILE *timeline_file;

static void CUPTIAPI buffer_requested(uint8_t **buffer, size_t *size, size_t *max_records)
{
    *buffer = aligned_alloc(8, TIMELINE_BUFFER_BYTES);
    *size = *buffer ? TIMELINE_BUFFER_BYTES : 0;
    *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext context, uint32_t stream, uint8_t *buffer,
                                      size_t size, size_t valid)
{
    (void)context;
    (void)stream;
    (void)size;
    CUpti_Activity *record = NULL;
    while (timeline_file && cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
        if (record->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL &&
            record->kind != CUPTI_ACTIVITY_KIND_KERNEL)
            continue;
        const CUpti_ActivityKernel10 *k = (const CUpti_ActivityKernel10 *)record;
        fprintf(timeline_file, "%llu,%llu,%u,%u,%dx%dx%d,%dx%dx%d,%s\n",
                (unsigned long long)k->start, (unsigned long long)k->end, k->streamId, k->graphId,
                k->gridX, k->gridY, k->gridZ, k->blockX, k->blockY, k->blockZ,
                k->name ? k->name : "?");
    }
    size_t dropped = 0;
    if (cuptiActivityGetNumDroppedRecords(context, stream, &dropped) == CUPTI_SUCCESS && dropped)
        fprintf(stderr, "kernel_timeline: %zu records dropped\n", dropped);
    free(buffer);
}

static void timeline_finish(void)
{
    cuptiActivityFlushAll(1);
    if (timeline_file) {
        fclose(timeline_file);
        timeline_file = NULL;
    }
}

int InitializeInjection(void);
int InitializeInjection(void)
{
    const char *path = getenv("EMBEDRAG_TIMELINE");
    timeline_file = fopen(path && *path ? path : "kernel_timeline.csv", "w");
    if (!timeline_file) {
        perror("kernel_timeline: cannot open the output file (EMBEDRAG_TIMELINE)");
        return 0;
    }
    if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS ||
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS) {
        fprintf(stderr, "kernel_timeline: CUPTI refused to trace kernels\n");
        return 0;
    }
    atexit(timeline_finish);
    return 1;
}
