#!/usr/bin/env bash
# Installs the vector-search peers (faiss-cpu, usearch, sqlite-vec, numpy, apsw) from PyPI into
# .venv, at the versions in requirements-search.txt. Benchmarks only: the C library never depends
# on any of it. The same .venv as setup.sh (both pin the same numpy); skips the install when .venv
# already has them at those versions.
set -euo pipefail
cd "$(dirname "$0")/../.."
req=bench/peers/requirements-search.txt
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python - "$req" 2>/dev/null <<'PY'
import sys
from importlib import metadata
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line:
        name, version = line.split("==")
        assert metadata.version(name) == version, name
PY
then
    .venv/bin/pip install --quiet --disable-pip-version-check -r "$req"
fi
