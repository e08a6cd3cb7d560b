#!/usr/bin/env bash
# The one command for a fresh Debian 12 machine: installs system packages, builds embedrag
# (build/), fetches the default model (models/), and runs the main job: embeds a few sample
# texts and prints their similarities.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)"
scripts/fetch-models.sh
echo
echo "== embedrag info"
build/embedrag info
echo
echo "== similarities of examples/sample.txt (cosine of normalized embeddings)"
build/similarity models/all-MiniLM-L6-v2 < examples/sample.txt
