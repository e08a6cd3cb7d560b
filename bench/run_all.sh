#!/usr/bin/env bash
# Runs every CPU benchmark recorded in BENCHMARKS.md, in one go on one machine: the GEMM choice
# (bench/gemm_compare.sh), `embedrag bench --json` for both model shapes (and in bf16 where a bf16
# kernel runs: AMX-BF16 or AVX512-BF16), and the peers
# (bench/peers/run_peers.py: embedrag through libembedrag.so, sentence-transformers on PyTorch,
# ONNX Runtime) interleaved on the same texts. Results go to OUT_DIR (default bench-results/).
# The peers are installed from PyPI into .venv by bench/peers/setup.sh (skipped when PYTHON names
# another interpreter that has them).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-results}
if [ -z "${PYTHON:-}" ]; then
    bench/peers/setup.sh
fi
python=${PYTHON:-.venv/bin/python}
threads=${THREADS:-2}
mkdir -p "$out"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" >/dev/null
scripts/fetch-models.sh
(date -u; git rev-parse HEAD; lscpu | grep -E 'Model name|^Model:|^CPU\(s\)|L3') >"$out/machine.txt"
bench/gemm_compare.sh | tee "$out/gemm.txt"
for model in all-MiniLM-L6-v2 minilm-l12-stacked; do
    build/embedrag bench --model "models/$model" --threads "$threads" --json \
        --dump-texts "$out/texts-$model" | tee "$out/bench-$model.json"
    # What `info` reports running is what the bench would time.
    info=$(build/embedrag info --model "models/$model" --precision bf16 2>/dev/null || true)
    if [[ "$info" =~ \"precision\":[[:space:]]*\"bf16\" ]]; then
        build/embedrag bench --model "models/$model" --threads "$threads" --json \
            --precision bf16 | tee "$out/bench-$model-bf16.json"
    fi
    "$python" bench/peers/run_peers.py --model "models/$model" --threads "$threads" \
        --texts "$out/texts-$model" --json "$out/peers-$model.json" | tee "$out/peers-$model.txt"
done
