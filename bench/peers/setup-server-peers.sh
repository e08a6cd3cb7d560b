#!/usr/bin/env bash
# Installs the HTTP-server peer, infinity (michaelfeil/infinity, `infinity_emb v2`), from PyPI into
# bench/peers/.venv-server, for bench/server_compare.sh. Benchmarks only: the C library never
# depends on any of it. Skips the install when the venv already has these versions.
#
# Pins (Python 3.11, x86-64 Linux):
# - infinity-emb[all]==0.0.78: the last release; it needs numpy<2 and sentence-transformers<4,
#   so it cannot share the repository's .venv (numpy 2, sentence-transformers 6).
# - transformers==4.47.1: what pip resolves anyway (colpali-engine 0.3.8, pulled in by [all]).
# - optimum[onnxruntime]==1.27.0: optimum 2.x dropped BetterTransformer, which infinity applies
#   to BERT models by default (--bettertransformer, the fused encoder-layer fast path of torch);
#   optimum 1.x keeps it, and BetterTransformer needs transformers<4.49, which 4.47.1 is.
# - torch==2.15.0: the same torch as the sentence-transformers peer in bench/peers/requirements.txt.
#   The CPU-only wheel index (download.pytorch.org/whl/cpu) is used when it answers; otherwise
#   PyPI's wheel (the CUDA build, about 3 GB with its nvidia-* packages; only its CPU kernels run).
# - numpy==1.26.4 (infinity needs numpy<2) and pyarrow==23.0.1: optimum 1.x pulls in datasets,
#   which imports pyarrow, and pyarrow 26 (what pip picks, since its wheels declare no numpy
#   requirement) refuses numpy 1.x at import ("pyarrow requires NumPy 2.0 or newer").
#
# Set SERVER_PEERS_VENV to put the venv elsewhere.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${SERVER_PEERS_VENV:-bench/peers/.venv-server}
pins=(
    "infinity-emb[all]==0.0.78"
    "torch==2.15.0"
    "transformers==4.47.1"
    "sentence-transformers==3.4.1"
    "optimum[onnxruntime]==1.27.0"
    "numpy==1.26.4"
    "pyarrow==23.0.1"
)
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -U pip
fi
if ! "$venv/bin/python" - "${pins[@]}" 2>/dev/null <<'PY'
import sys
from importlib import metadata
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    name = name.split("[")[0]
    assert metadata.version(name).split("+")[0] == version, name
PY
then
    if curl -fsS --max-time 10 -o /dev/null https://download.pytorch.org/whl/cpu/torch/ 2>/dev/null; then
        # CPU-only torch from its own index, everything else from PyPI.
        "$venv/bin/pip" install --quiet --disable-pip-version-check \
            --index-url https://download.pytorch.org/whl/cpu "torch==2.15.0"
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}"
fi
"$venv/bin/infinity_emb" v2 --help >/dev/null
echo "$venv: infinity-emb $("$venv/bin/python" -c 'from importlib import metadata as m; print(m.version("infinity-emb"), "torch", m.version("torch"))')"
