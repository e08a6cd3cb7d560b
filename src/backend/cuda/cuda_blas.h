/* cuBLASLt, opened at run time (dlopen) rather than linked: a build with the CUDA backend then
 * still loads and runs on the CPU on a machine without the CUDA libraries, as it does without a
 * driver (the runtime itself is linked statically). The toolkit's static cuBLASLt would avoid the
 * dlopen, but it is not in every toolkit install (this project's CI machines have only the shared
 * one) and would add about 500 MB to every link. Only the functions the backend calls are looked
 * up. */
#ifndef EMBEDRAG_CUDA_BLAS_H
#define EMBEDRAG_CUDA_BLAS_H

#include <cublasLt.h>

typedef struct cuda_blas {
    void *library;
    char path[256]; /* where it was found, for messages */
    size_t version;
    __typeof__(&cublasLtCreate) create;
    __typeof__(&cublasLtDestroy) destroy;
    __typeof__(&cublasLtGetVersion) get_version;
    __typeof__(&cublasLtGetStatusString) status_string;
    __typeof__(&cublasLtMatmulDescCreate) desc_create;
    __typeof__(&cublasLtMatmulDescDestroy) desc_destroy;
    __typeof__(&cublasLtMatmulDescSetAttribute) desc_set;
    __typeof__(&cublasLtMatrixLayoutCreate) layout_create;
    __typeof__(&cublasLtMatrixLayoutDestroy) layout_destroy;
    __typeof__(&cublasLtMatmulPreferenceCreate) preference_create;
    __typeof__(&cublasLtMatmulPreferenceDestroy) preference_destroy;
    __typeof__(&cublasLtMatmulPreferenceSetAttribute) preference_set;
    __typeof__(&cublasLtMatmulAlgoGetHeuristic) heuristic;
    __typeof__(&cublasLtMatmulAlgoCheck) algo_check;
    __typeof__(&cublasLtMatmul) matmul;
} cuda_blas;

/* Opens cuBLASLt of the major version the backend was compiled against: first by its soname
 * (the loader's search path), then in the toolkit directory CMake found at build time. Fails with
 * EMBEDRAG_ERR_UNSUPPORTED naming what was tried. */
int cuda_blas_open(cuda_blas *blas);
void cuda_blas_close(cuda_blas *blas);

#endif
