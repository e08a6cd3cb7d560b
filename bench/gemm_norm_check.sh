#!/usr/bin/env bash
# Builds and runs bench/gemm_norm_check.cu: the fused output product (cuda_gemm_norm, sm_90a)
# alone against a host reference, and its time. Needs nvcc and a GPU of compute capability 9.0.
#   bench/gemm_norm_check.sh [ROWS [K [fp16|bf16]]]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${EMBEDRAG_BENCH_BUILD:-/tmp/embedrag-bench}
mkdir -p "$out"
nvcc -O3 -std=c++17 --generate-code=arch=compute_90a,code=sm_90a -Isrc \
    bench/gemm_norm_check.cu src/backend/cuda/cuda_gemm_norm.cu -o "$out/gemm_norm_check"
"$out/gemm_norm_check" "$@"
