#!/usr/bin/env bash
# `embedrag serve` beside infinity (infinity_emb v2, torch on the CPU), one after the other under the
# same load from bench/server_load.py: same clients, duration, mix, batch size, texts and token
# counts, the OpenAI route of each (embedrag POST /v1/embeddings, infinity POST /embeddings), both
# serving the same local model directory with 2 threads (embedrag --threads 2; torch through
# OMP_NUM_THREADS / MKL_NUM_THREADS=2). Each run, infinity's start-up and warm-up included, holds
# flock /tmp/embedrag-bench.lock, so no other benchmark overlaps it. Prints both tables and a
# summary; the JSON goes to OUT_DIR (default bench-results/server).
#   bench/server_compare.sh [server_load.py options, e.g. --clients 64 --duration 30 --mix 0.5]
# Environment: THREADS (2), MODEL (models/all-MiniLM-L6-v2), EMBEDRAG_CLI (build-release/embedrag),
# OUT_DIR, PEERS=embedrag,infinity (either or both), INFINITY_ARGS (extra infinity_emb v2 flags,
# e.g. --no-bettertransformer), EMBED_BASELINE=1 (the embedrag run also times `embedrag embed`
# on the batch texts; the ratio means something with --mix 0).
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-2}
model=$(realpath "${MODEL:-models/all-MiniLM-L6-v2}")
cli=${EMBEDRAG_CLI:-build-release/embedrag}
out=${OUT_DIR:-bench-results/server}
peers=${PEERS:-embedrag,infinity}
lock=/tmp/embedrag-bench.lock
name=$(basename "$model")
venv=bench/peers/.venv-server
[ -x "$cli" ] || cmake --build build-release -j2
mkdir -p "$out"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
counts=$out/token-counts.json
(date -u; git rev-parse HEAD; lscpu | grep -E 'Model name|^CPU\(s\)|L3'; echo "args: $*") >"$out/machine-$stamp.txt"
jsons=()
status=0  # 1 when a run saw errors (server_load.py's exit status); the other runs still go on

if [ ! -f "$counts" ]; then
    # Exact token counts of every candidate text, from an embedrag server started briefly; both
    # runs then pick the very same texts from them.
    flock "$lock" python3 bench/server_load.py --cli "$cli" --model "$model" --threads "$threads" \
        --token-counts "$counts" "$@" --counts-only
fi

if [[ ,$peers, == *,embedrag,* ]]; then
    extra=()
    [ "${EMBED_BASELINE:-0}" = 1 ] && extra=(--baseline-embed)
    flock "$lock" python3 bench/server_load.py --label embedrag --cli "$cli" --model "$model" \
        --threads "$threads" --token-counts "$counts" --json "$out/embedrag-$stamp.json" \
        ${extra[@]+"${extra[@]}"} "$@" || status=1
    [ -f "$out/embedrag-$stamp.json" ] && jsons+=("$out/embedrag-$stamp.json")
fi

if [[ ,$peers, == *,infinity,* ]]; then
    bench/peers/setup-server-peers.sh >/dev/null
    (
        flock 9
        port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        log=$out/infinity-$stamp.log
        # Offline: the model is the local directory; no hub, no telemetry.
        HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DO_NOT_TRACK=1 \
            INFINITY_ANONYMOUS_USAGE_STATS=0 OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads \
            OPENBLAS_NUM_THREADS=$threads \
            "$venv/bin/infinity_emb" v2 --model-id "$model" --served-model-name "$name" \
            --host 127.0.0.1 --port "$port" --engine torch --device cpu --log-level warning \
            ${INFINITY_ARGS:-} >"$log" 2>&1 9>&- &
        pid=$!
        trap 'rc=$?; kill $pid 2>/dev/null; wait $pid 2>/dev/null || true; exit $rc' EXIT
        t0=$SECONDS
        until curl -fsS -o /dev/null "http://127.0.0.1:$port/health" 2>/dev/null; do
            if ! kill -0 "$pid" 2>/dev/null || ((SECONDS - t0 > 600)); then
                echo "infinity did not start; its log:" >&2
                tail -30 "$log" >&2
                exit 1
            fi
            sleep 0.5
        done
        echo "infinity ready after $((SECONDS - t0)) s (model load and its warm-up)"
        python3 bench/server_load.py --label infinity --url "http://127.0.0.1:$port" \
            --path /embeddings --model-name "$name" --pid "$pid" --model "$model" --cli "$cli" \
            --token-counts "$counts" --json "$out/infinity-$stamp.json" "$@"
    ) 9>"$lock" || status=1
    [ -f "$out/infinity-$stamp.json" ] && jsons+=("$out/infinity-$stamp.json")
fi

echo "== summary ($out/*-$stamp.json)"
python3 - ${jsons[@]+"${jsons[@]}"} <<'PY'
import json, sys
f = lambda v, s="%.1f": "-" if v is None else s % v
print("%-9s %-5s %7s %9s %10s %8s %8s %8s %6s %6s %9s" % (
    "server", "class", "reqs", "texts/s", "tokens/s", "p50 ms", "p99 ms", "max ms", "429", "errors", "RSS max"))
for path in sys.argv[1:]:
    r = json.load(open(path))
    rss = r["load"].get("rss") or {}
    for cls in ("query", "batch"):
        d = r["load"][cls]
        if d["requests"]:
            print("%-9s %-5s %7d %9.1f %10.0f %8s %8s %8s %6d %6d %9s" % (
                r["label"], cls, d["requests"], d["texts_per_s"], d["tokens_per_s"], f(d["p50_ms"]),
                f(d["p99_ms"]), f(d["max_ms"]), d["status_429"], sum(d["errors"].values()),
                f(rss.get("max_mib"), "%.0f MiB")))
    i = r.get("idle") or {}
    print("%-9s idle query p50 %s ms, p99 %s ms; total %.0f tokens/s" % (
        r["label"], f(i.get("p50_ms"), "%.2f"), f(i.get("p99_ms"), "%.2f"), r["load"]["total"]["tokens_per_s"]))
PY
exit $status
