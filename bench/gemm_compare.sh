#!/usr/bin/env bash
# Builds and runs bench/gemm_compare.c: our GEMM kernel against Debian's OpenBLAS (pthread
# flavour) and oneDNN at a BERT layer's shapes, one thread each. Needs libopenblas-dev and
# libdnnl-dev (apt-get install libopenblas-dev libdnnl-dev).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# The kernel files without the backend (which needs the model and engine).
kernels=$(ls src/backend/cpu/*.c | grep -v cpu_backend.c)
gcc -std=c11 -O3 -D_GNU_SOURCE -Iinclude -Isrc bench/gemm_compare.c $kernels src/util/error.c \
    src/util/cpu_features.c \
    -I/usr/include/x86_64-linux-gnu/openblas-pthread \
    -L/usr/lib/x86_64-linux-gnu/openblas-pthread -lopenblas -ldnnl -lpthread -lm \
    -o "$out/gemm_compare"
OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 DNNL_VERBOSE=0 "$out/gemm_compare"
