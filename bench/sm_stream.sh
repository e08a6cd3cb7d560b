#!/usr/bin/env bash
# Builds and runs bench/sm_stream.cu (how fast a multiprocessor streams global memory into its
# shared memory, by bulk copies, cp.async and plain loads, with 1 to all multiprocessors at once;
# see the file). Needs the CUDA toolkit (CUDA_HOME, else /usr/local/cuda) and a GPU. Arguments
# (block counts) go to the program.
set -euo pipefail
cd "$(dirname "$0")/.."
cuda=${CUDA_HOME:-/usr/local/cuda}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$cuda/bin/nvcc" -O3 -arch=sm_90 -Iinclude -Isrc bench/sm_stream.cu -o "$out/sm_stream"
"$out/sm_stream" "$@"
