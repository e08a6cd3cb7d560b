#!/usr/bin/env bash
# Builds and runs bench/cublaslt_algos.c (every algorithm cuBLASLt offers for a layer's products,
# timed; see the file). Needs the CUDA toolkit (CUDA_HOME, else /usr/local/cuda) and a GPU.
# Arguments go to the program.
set -euo pipefail
cd "$(dirname "$0")/.."
cuda=${CUDA_HOME:-/usr/local/cuda}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
gcc -std=c11 -O2 -Wall -Wextra bench/cublaslt_algos.c -I"$cuda/include" -L"$cuda/lib64" \
    -Wl,-rpath,"$cuda/lib64" -lcublasLt -lcudart -o "$out/cublaslt_algos"
"$out/cublaslt_algos" "$@"
