#!/usr/bin/env bash
# Makes a folder from which embedrag builds and runs its GPU tests and benchmarks on a machine
# with the CUDA toolkit but no package registry (the GPU test machine: Ubuntu 24.04 with nvcc and
# CMake, without utf8proc, cJSON, pkg-config or network). Run here; then there, run
# DEST/src/scripts/gpu-run.sh. Nothing is installed on either machine.
#   DEST/src      this working tree (tracked files and untracked ones git does not ignore)
#   DEST/src/models/all-MiniLM-L6-v2
#                 the default model with F16 weights (45 MB instead of 91), made from
#                 models/all-MiniLM-L6-v2 by scripts/make_stacked_model.py with each layer once
#   DEST/shared   ../shared/data (STS-B dev sentences: benchmarks and test_engine read them)
#   DEST/debs     Debian 12 packages of utf8proc, cJSON, SQLite, libmicrohttpd and pkgconf,
#                 which gpu-run.sh unpacks into a private prefix (their libraries run on newer
#                 glibc too)
#   DEST/base-src with COMMIT: that commit's tree (without tests/fixtures), which gpu-run.sh's
#                 storecmp step builds and measures beside this tree in the same call
# Usage: scripts/gpu-bundle.sh DEST [COMMIT]
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:?usage: scripts/gpu-bundle.sh DEST [COMMIT]}
base=${2:-}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
rm -rf "$dest/src" "$dest/shared" "$dest/base-src" "$dest/base-commit"
mkdir -p "$dest/src" "$dest/shared/data" "$dest/debs"
(cd "$src" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) |
    tar -xf - -C "$dest/src"
cp "$src/../shared/data/stsb-en-dev.csv" "$dest/shared/data/"
if [ -n "$base" ]; then
    mkdir -p "$dest/base-src"
    (cd "$src" && git archive "$base" -- . ':!tests/fixtures') | tar -xf - -C "$dest/base-src"
    (cd "$src" && git rev-parse --short "$base") >"$dest/base-commit"
fi

packages=(libutf8proc-dev libutf8proc2 libcjson-dev libcjson1 libsqlite3-dev libsqlite3-0
          libmicrohttpd-dev libmicrohttpd12 pkgconf-bin libpkgconf3)
for p in "${packages[@]}"; do
    compgen -G "$dest/debs/${p}_*.deb" >/dev/null || (cd "$dest/debs" && apt-get download "$p")
done

model=models/all-MiniLM-L6-v2
if [ -f "$src/$model/model.safetensors" ]; then
    # make_stacked_model.py with one copy of each layer: an F16 copy with the same tokenizer and
    # sentence-transformers files (it also adds e5's prompts, used only when asked for by name).
    python3 - "$src/$model" "$dest/src/$model" <<'PY'
import os, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(sys.argv[1].rstrip("/"))), "scripts"))
import make_stacked_model
make_stacked_model.REPEAT = 1
sys.exit(make_stacked_model.main(["make_stacked_model", sys.argv[1], sys.argv[2]]))
PY
else
    echo "gpu-bundle: $src/$model is missing (scripts/fetch-models.sh): no model in the bundle" >&2
fi
du -sh "$dest"
