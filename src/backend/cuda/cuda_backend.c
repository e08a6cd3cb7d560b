/* The CUDA backend's place in the build, before the backend itself: it finds the GPUs through the
 * CUDA runtime and answers EMBEDRAG_ERR_UNSUPPORTED naming what it found, so that the factory,
 * `--device gpu` and `embedrag info` already work end to end. The runtime is linked statically,
 * so a machine without the NVIDIA driver runs the CPU backend and says "no CUDA device". */
#include "backend/backend.h"

#include "util/error.h"

#include <cuda_runtime_api.h>

/* 2^30: device memory is reported in GiB. */
#define CUDA_GIB 1073741824.0

int cuda_backend_create(const backend_params *params, const model_config *config,
                        const model_weights *weights, backend **out)
{
    *out = NULL;
    int driver = 0;
    if (cudaDriverGetVersion(&driver) != cudaSuccess || driver == 0)
        return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                       "no CUDA device found (no NVIDIA driver is loaded)");
    int count = 0;
    cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess || count == 0)
        return err_set(EMBEDRAG_ERR_UNSUPPORTED, "no CUDA device found (%s)",
                       status != cudaSuccess ? cudaGetErrorString(status)
                                             : "the driver lists none");
    if (params->device < 0 || params->device >= count)
        return err_set(EMBEDRAG_ERR_UNSUPPORTED, "CUDA device %d does not exist (%d found)",
                       params->device, count);
    struct cudaDeviceProp properties;
    status = cudaGetDeviceProperties(&properties, params->device);
    if (status != cudaSuccess)
        return err_set(EMBEDRAG_ERR_UNSUPPORTED, "CUDA device %d: %s", params->device,
                       cudaGetErrorString(status));
    return err_set(EMBEDRAG_ERR_UNSUPPORTED,
                   "found CUDA device %d (%s, %.0f GiB, compute capability %d.%d), but this "
                   "version of embedrag has no CUDA backend yet",
                   params->device, properties.name, (double)properties.totalGlobalMem / CUDA_GIB,
                   properties.major, properties.minor);
}
