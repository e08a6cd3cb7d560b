#!/usr/bin/env bash
# Installs the peers (sentence-transformers on PyTorch, ONNX Runtime, the exporter's onnx) from
# PyPI into .venv, at the versions in requirements.txt. Benchmarks only: the C library never
# depends on any of it. Skips the install when .venv already has them.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import sentence_transformers, onnxruntime, onnx' 2>/dev/null; then
    .venv/bin/pip install --quiet --disable-pip-version-check -r bench/peers/requirements.txt
fi
