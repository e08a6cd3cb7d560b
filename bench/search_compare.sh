#!/usr/bin/env bash
# Dense search beside its peers on the very same vectors, one after the other in one run:
# `embedrag bench --search` (exact scan, 1-bit, cascade, int8) and bench/peers/search_peers.py
# (faiss flat / SQ8 / 1-bit + rescoring, usearch, sqlite-vec, numpy), for each corpus size given
# (default 100000 and 1000000) and each kind of data (uniform, clustered), 384 dimensions.
# The vectors come from search_peers.py --generate (seed 1) into DATA_DIR (default
# /tmp/embedrag-search-data, about 3.4 GB for 1M); results go to OUT_DIR (default
# bench-results/search). Runs under flock /tmp/embedrag-bench.lock so no other benchmark overlaps.
#   bench/search_compare.sh [N...]
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=("${@:-100000 1000000}")
data=${DATA_DIR:-/tmp/embedrag-search-data}
out=${OUT_DIR:-bench-results/search}
python=${PYTHON:-.venv/bin/python}
[ -n "${PYTHON:-}" ] || bench/peers/setup-search.sh >/dev/null
mkdir -p "$data" "$out"
cli=${EMBEDRAG_CLI:-build-release/embedrag}
(date -u; git rev-parse HEAD; lscpu | grep -E 'Model name|^CPU\(s\)|L3') >"$out/machine.txt"
for n in ${sizes[@]}; do
    for kind in uniform clustered; do
        prefix=$data/$kind-$n
        [ -f "$prefix.vectors.f32" ] ||
            "$python" bench/peers/search_peers.py --generate "$kind" --n "$n" --dim 384 \
                --queries-n 230 --seed 1 --out "$prefix" >/dev/null
        flock /tmp/embedrag-bench.lock "$cli" bench --search "$n" --vectors "$prefix.vectors.f32" \
            --query-vectors "$prefix.queries.f32" --queries 200 --json >"$out/embedrag-$kind-$n.json"
        flock /tmp/embedrag-bench.lock "$python" bench/peers/search_peers.py \
            --vectors "$prefix.vectors.f32" --queries "$prefix.queries.f32" --dim 384 \
            --threads 1,2 --single 200 --batch 200 --hnsw-max-n 0 \
            --json "$out/peers-$kind-$n.json" >"$out/peers-$kind-$n.txt"
        echo "== $kind $n"
        python3 - "$out/embedrag-$kind-$n.json" "$out/peers-$kind-$n.json" <<'PY'
import json, sys
e = json.load(open(sys.argv[1])); p = json.load(open(sys.argv[2]))
print("%-34s %3s %9s %9s %10s %9s" % ("engine / mode", "thr", "p50 ms", "p99 ms", "batch q/s", "recall"))
for r in e["data"][0]["results"]:
    print("%-34s %3d %9.3f %9.3f %10.0f %9.4f" % ("embedrag " + r["mode"], r["threads"], r["p50_ms"], r["p99_ms"], r["batch_qps"], r["recall_at_10"]))
for r in p["results"]:
    name = "%s %s%s" % (r["peer"], r["mode"], " C=%d" % r["candidates"] if r.get("candidates") else "")
    print("%-34s %3d %9.3f %9.3f %10s %9.4f" % (name, r["threads"], r["p50_ms"], r["p99_ms"], "%.0f" % r["batch_qps"] if r.get("batch_qps") else "-", r["recall_at_10"]))
PY
    done
done
