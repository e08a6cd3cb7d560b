/* cuBLASLt through dlopen (see cuda_blas.h for why). */
#include "backend/cuda/cuda_blas.h"

#include "util/error.h"

#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#define STRINGIFY_(x) #x
#define STRINGIFY(x) STRINGIFY_(x)
/* libcublasLt.so.13 for the cuBLAS 13 headers this file was compiled with: another major version
 * may change the ABI of the functions below. */
#define CUBLASLT_SONAME "libcublasLt.so." STRINGIFY(CUBLAS_VER_MAJOR)

int cuda_blas_open(cuda_blas *blas)
{
    memset(blas, 0, sizeof *blas);
    const char *tried[2] = {CUBLASLT_SONAME, NULL};
    char toolkit_path[512] = "";
#ifdef EMBEDRAG_CUBLASLT_DIR
    snprintf(toolkit_path, sizeof toolkit_path, "%s/%s", EMBEDRAG_CUBLASLT_DIR, CUBLASLT_SONAME);
    tried[1] = toolkit_path;
#endif
    char reasons[768] = "";
    for (int i = 0; i < 2 && !blas->library; i++) {
        if (!tried[i]) continue;
        blas->library = dlopen(tried[i], RTLD_NOW | RTLD_LOCAL);
        if (blas->library) {
            snprintf(blas->path, sizeof blas->path, "%s", tried[i]);
        } else {
            const char *why = dlerror();
            size_t used = strlen(reasons);
            snprintf(reasons + used, sizeof reasons - used, "%s%s", used ? "; " : "",
                     why ? why : tried[i]);
        }
    }
    if (!blas->library)
        return err_set(EMBEDRAG_ERR_UNSUPPORTED, "cuBLASLt is not installed (%s)", reasons);

    struct {
        const char *name;
        void **slot;
    } symbols[] = {
        {"cublasLtCreate", (void **)&blas->create},
        {"cublasLtDestroy", (void **)&blas->destroy},
        {"cublasLtGetVersion", (void **)&blas->get_version},
        {"cublasLtGetStatusString", (void **)&blas->status_string},
        {"cublasLtMatmulDescCreate", (void **)&blas->desc_create},
        {"cublasLtMatmulDescDestroy", (void **)&blas->desc_destroy},
        {"cublasLtMatmulDescSetAttribute", (void **)&blas->desc_set},
        {"cublasLtMatrixLayoutCreate", (void **)&blas->layout_create},
        {"cublasLtMatrixLayoutDestroy", (void **)&blas->layout_destroy},
        {"cublasLtMatmulPreferenceCreate", (void **)&blas->preference_create},
        {"cublasLtMatmulPreferenceDestroy", (void **)&blas->preference_destroy},
        {"cublasLtMatmulPreferenceSetAttribute", (void **)&blas->preference_set},
        {"cublasLtMatmulAlgoGetHeuristic", (void **)&blas->heuristic},
        {"cublasLtMatmulAlgoCheck", (void **)&blas->algo_check},
        {"cublasLtMatmul", (void **)&blas->matmul},
    };
    for (size_t i = 0; i < sizeof symbols / sizeof symbols[0]; i++) {
        *symbols[i].slot = dlsym(blas->library, symbols[i].name);
        if (!*symbols[i].slot) {
            int rc = err_set(EMBEDRAG_ERR_UNSUPPORTED, "%s has no %s", blas->path, symbols[i].name);
            cuda_blas_close(blas);
            return rc;
        }
    }
    blas->version = blas->get_version();
    return 0;
}

void cuda_blas_close(cuda_blas *blas)
{
    if (blas->library) dlclose(blas->library);
    memset(blas, 0, sizeof *blas);
}
