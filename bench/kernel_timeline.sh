#!/usr/bin/env bash
# Runs a command with every kernel it launches recorded on the GPU's clock (bench/kernel_timeline.c,
# through CUPTI), then prints where a pass's time went (bench/kernel_timeline.py): per kernel its
# time inside the pass, and the idle gaps between kernels. Needs the CUDA toolkit with CUPTI
# (CUDA_HOME, else /usr/local/cuda) and a GPU. Run one cell, e.g.:
#   bench/kernel_timeline.sh build-release/embedrag_backend_bench --device cuda \
#       --random 12,384,12,1536 --precision fp16 --seconds 0.5 --only 128,1000
# KERNEL_TIMELINE=file keeps the raw timeline (one line a kernel) in that file.
set -euo pipefail
cd "$(dirname "$0")/.."
cuda=${CUDA_HOME:-/usr/local/cuda}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cupti_lib=$(dirname "$(find "$cuda/" -name 'libcupti.so*' 2>/dev/null | head -1)")
cc -O2 -fPIC -shared -I"$cuda/include" -I"$cuda/extras/CUPTI/include" bench/kernel_timeline.c \
    -L"$cupti_lib" -Wl,-rpath,"$cupti_lib" -lcupti -o "$out/libkernel_timeline.so"
timeline=${KERNEL_TIMELINE:-$out/timeline.csv}
CUDA_INJECTION64_PATH="$out/libkernel_timeline.so" EMBEDRAG_TIMELINE="$timeline" "$@" > "$out/stdout"
tail -3 "$out/stdout"
python3 bench/kernel_timeline.py "$timeline"
