#!/usr/bin/env bash
# Runs on a GPU machine from a folder made by scripts/gpu-bundle.sh (this script is
# BUNDLE/src/scripts/gpu-run.sh): unpacks the carried packages into a private prefix, builds with
# the CUDA backend, then runs the steps named (default: all of them):
#   test      ctest's test_backend and test_backend_gpu (labelled gpu), test_engine on the
#             bundle's F16 model (the engine routing between the CPU and the GPU), and
#             test_stsb's GPU part (STS-B Spearman through the GPU against the CPU's), then
#             test_backend with each small-batch variant (1, nopdl, lastnorm, persist, cluster);
#             EMBEDRAG_GPU_TESTS (a ctest regex) picks the tests, EMBEDRAG_GPU_TEST_TIMEOUT
#             (seconds, default 900) ends a run that hangs
#   model     the fixture texts through `embedrag embed` on the F16 model: the GPU in fp16, bf16
#             and fp32 against the CPU, cosines per text
#   bench     embedrag_backend_bench on random weights of the GPU issue's shapes, and
#             `embedrag bench --device gpu` on the F16 model (every cell also on the CPU, and
#             16-token queries during a 100,000-text bulk job)
#   peers     PyTorch on the GPU (bench/peers/gpu_peers.py: eager fp16 and torch.compile),
#             the same shapes and cells as embedrag_backend_bench
#   scale     bulk scaling over 1..all visible GPUs (issue 12): `embedrag embed` of 200,000
#             128-token and 200,000 mixed 32-256-token texts through a 12-layer 384-wide model
#             (the F16 MiniLM-L6 with each layer twice), tokens/s, the CPU cores used, vectors
#             against one GPU's, and a run where GPU 0 fails mid-run
#   rss       memory over time while `embedrag embed --device gpu` streams 1,000,000 texts
#             (the default model), sampled every 0.25 s
#   store     the document store on the GPU (bench/store_bench.py): `embedrag index` of 20,000
#             documents against `embedrag embed` of the same chunks (with and without the
#             indexer's pipeline; EMBEDRAG_STORE_PIPELINES=1 runs it with only), and questions
#             answered over 100,000 chunks
#   storecmp  indexing against a base commit in the same call (the bundle's base-src, made by
#             `scripts/gpu-bundle.sh DEST COMMIT`): `bench/store_bench.py --skip query` of
#             EMBEDRAG_STORE_DOCUMENTS (default 200,000) documents, this tree and the base in
#             turn, EMBEDRAG_STORE_ROUNDS rounds (default 2); EMBEDRAG_STORECMP_SHARDS="1 3"
#             runs this tree once with each number of text index files (EMBEDRAG_TEXT_SHARDS)
#   realvec   quantized search on real embeddings: a million texts (pairs of STS-B sentences)
#             and 1,000 questions (single sentences) embedded on the GPU, then
#             `embedrag bench --search --vectors` on them (recall@10 against exact, every mode)
#   serve     `embedrag serve` on the GPU: tests/test_server_gpu.py (a GPU failing mid-load,
#             every request still answered), then bench/server_load.py: 64 clients mixing
#             16-token queries and 100-text batches, and batches alone against `embedrag embed`
#             of the same texts
#   sanitize  compute-sanitizer memcheck and racecheck on test_backend
#   profile   Nsight Compute's kernel durations over one bulk call (1000 x 128 tokens, 12 x 384,
#             fp16) and one query (1 x 16); EMBEDRAG_PROFILE_CELLS, _VARIANTS and _DETAIL below
# $OUT (else BUNDLE/out) receives few files (the device tool brings back at most 8): summary.txt,
# logs.txt (every log, one after another), bench.json and machine.txt; a summary is printed last.
set -uo pipefail
bundle=$(cd "$(dirname "$0")/../.." && pwd)
src=$bundle/src
out=${OUT:-$bundle/out}
build=${EMBEDRAG_GPU_BUILD:-/tmp/embedrag-build}
deps=/tmp/embedrag-deps
steps=${*:-test model sanitize bench}
logs=/tmp/embedrag-logs
rm -rf "$logs"
mkdir -p "$out" "$logs"
summary=$out/summary.txt
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }

# ---- packages and build ----
mkdir -p "$deps"
for f in "$bundle"/debs/*.deb; do dpkg -x "$f" "$deps"; done
lib=$deps/usr/lib/x86_64-linux-gnu
sed -i "s|=/usr|=$deps/usr|" "$lib"/pkgconfig/*.pc
# libmicrohttpd links the machine's own GnuTLS (libgnutls30 is in every Ubuntu), whose
# development files are not there: its pkg-config file must not ask for them.
sed -i '/^Requires.private: gnutls/d' "$lib"/pkgconfig/libmicrohttpd.pc
export PKG_CONFIG_PATH=$lib/pkgconfig
export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
pkgconfig=$(command -v pkg-config || echo "$deps/usr/bin/pkgconf")
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    nvcc --version | tail -2
    cmake --version | head -1
    nproc
} >"$out/machine.txt" 2>&1
note "machine: $(sed -n 2p "$out/machine.txt"); $(grep -o 'release [0-9.]*' "$out/machine.txt")"
start=$(date +%s)
if ! { cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release \
        -DPKG_CONFIG_EXECUTABLE="$pkgconfig" &&
       cmake --build "$build" -j"$(nproc)"; } >"$logs/build.log" 2>&1; then
    tail -40 "$logs/build.log"
    note "build FAILED (build.log)"
    exit 1
fi
note "build: $(($(date +%s) - start)) s; $(grep 'CUDA backend' "$logs/build.log")"

run_step() { [[ " $steps " == *" $1 "* ]]; }

# ---- tests ----
if run_step test; then
    (cd "$build" && EMBEDRAG_TEST_STSB=gpu ctest -V -R "${EMBEDRAG_GPU_TESTS:-test_backend|test_engine|test_stsb}" \
        --timeout "${EMBEDRAG_GPU_TEST_TIMEOUT:-900}") >"$logs/tests.log" 2>&1
    grep -E 'tests passed|Passed|Failed|\*\*\*' "$logs/tests.log" | tee -a "$summary"
    grep -E 'cuda.*(against|worst)|skipped|Spearman on the GPU' "$logs/tests.log" | grep -v 'check failed' |
        sed 's/^[0-9]*: //' >>"$summary"
    grep -E 'check failed' "$logs/tests.log" | head -20 | tee -a "$summary"
    # The small-batch kernels on test_backend's tiny shapes (widths 40 to 128), with and without
    # programmatic dependent launch; a failed graph capture would say so on stderr.
    for v in 1 nopdl lastnorm persist cluster; do
        EMBEDRAG_CUDA_SMALL=$v timeout "${EMBEDRAG_GPU_TEST_TIMEOUT:-900}" "$build/test_backend" \
            >"$logs/tests-small-$v.log" 2>&1
        note "test_backend with EMBEDRAG_CUDA_SMALL=$v: exit $? ($(tail -1 "$logs/tests-small-$v.log"))"
        grep -E 'without CUDA graphs|check failed' "$logs/tests-small-$v.log" | head -5 |
            tee -a "$summary"
    done
    grep -h 'without CUDA graphs' "$logs/tests.log" | head -3 | tee -a "$summary"
fi

# ---- the real model through the CLI ----
if run_step model; then
    model=$src/models/all-MiniLM-L6-v2
    python3 -c 'import json,sys
for line in open(sys.argv[1]):
    print(" ".join(json.loads(line)["text"].split()))' \
        "$src/tests/fixtures/all-MiniLM-L6-v2/texts.jsonl" >"$logs/texts.txt"
    cli=$build/embedrag
    "$cli" embed --model "$model" --device cpu --format f32 --quiet <"$logs/texts.txt" \
        >/tmp/cpu.f32 2>"$logs/model.log"
    for p in fp16 bf16 fp32; do
        "$cli" embed --model "$model" --device gpu --precision $p --format f32 --quiet \
            <"$logs/texts.txt" >/tmp/gpu-$p.f32 2>>"$logs/model.log"
    done
    # BERT's exact erf GELU in fp16 (the default there is cuBLASLt's tanh epilogue).
    EMBEDRAG_CUDA_GELU=erf "$cli" embed --model "$model" --device gpu --precision fp16 \
        --format f32 --quiet <"$logs/texts.txt" >/tmp/gpu-fp16-erf.f32 2>>"$logs/model.log"
    python3 - "$logs/texts.txt" >>"$summary" 2>&1 <<'PY'
import sys, numpy as np
n = open(sys.argv[1], "rb").read().count(b"\n")
cpu = np.fromfile("/tmp/cpu.f32", dtype=np.float32).reshape(n, -1).astype(np.float64)
for p in ("fp16", "fp16-erf", "bf16", "fp32"):
    try:
        gpu = np.fromfile("/tmp/gpu-%s.f32" % p, dtype=np.float32).reshape(n, -1).astype(np.float64)
    except ValueError as e:
        print("model: gpu %s: no vectors (%s)" % (p, e)); continue
    cos = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
    print("model F16 MiniLM-L6, %d fixture texts: gpu %s against cpu: worst cosine %.7f, mean %.8f, max |diff| %.2e"
          % (n, p, cos.min(), cos.mean(), np.abs(cpu - gpu).max()))
PY
fi

# ---- benchmarks ----
if run_step bench; then
    bench=$build/embedrag_backend_bench
    seconds=${EMBEDRAG_BENCH_SECONDS:-0.3}
    runs=(
        "12x384-fp16 --random 12,384,12,1536 --precision fp16"
        "6x384-fp16 --random 6,384,12,1536 --precision fp16"
        "12x768-fp16 --random 12,768,12,3072 --precision fp16"
        "12x384-bf16 --random 12,384,12,1536 --precision bf16"
        "12x384-fp32 --random 12,384,12,1536 --precision fp32"
    )
    # EMBEDRAG_BENCH_RUNS="12x384-fp16 ..." keeps only the runs named (e2e: embedrag bench).
    only=${EMBEDRAG_BENCH_RUNS:-}
    wanted() { [ -z "$only" ] || [[ " $only " == *" $1 "* ]]; }
    for r in "${runs[@]}"; do
        name=${r%% *}
        wanted "$name" || continue
        # shellcheck disable=SC2086 # the options are words
        "$bench" --device cuda --seconds "$seconds" --json ${r#* } >"$logs/bench-$name.json" \
            2>>"$logs/bench.log"
    done
    wanted 12x384-fp16-erf && EMBEDRAG_CUDA_GELU=erf "$bench" --device cuda --seconds "$seconds" \
        --json --random 12,384,12,1536 --precision fp16 >"$logs/bench-12x384-fp16-erf.json" \
        2>>"$logs/bench.log"
    # The first attention kernel (EMBEDRAG_CUDA_ATTENTION=v1), for comparison with v2.
    for shape in 12x384:12,384,12,1536 6x384:6,384,12,1536 12x768:12,768,12,3072; do
        wanted "${shape%%:*}-fp16-attv1" || continue
        EMBEDRAG_CUDA_ATTENTION=v1 "$bench" --device cuda --seconds "$seconds" --json \
            --random "${shape#*:}" --precision fp16 >"$logs/bench-${shape%%:*}-fp16-attv1.json" \
            2>>"$logs/bench.log"
    done
    # The small-batch kernels (EMBEDRAG_CUDA_SMALL=1, without dependent launch: nopdl, with the
    # first version's LayerNorms in a last block: lastnorm, the chain in one persistent kernel:
    # persist).
    for shape in 12x384:12,384,12,1536 6x384:6,384,12,1536 12x768:12,768,12,3072; do
        for v in small:1 nopdl:nopdl lastnorm:lastnorm persist:persist cluster:cluster; do
            wanted "${shape%%:*}-fp16-${v%%:*}" || continue
            EMBEDRAG_CUDA_SMALL=${v#*:} "$bench" --device cuda --seconds "$seconds" --json \
                --random "${shape#*:}" --precision fp16 \
                >"$logs/bench-${shape%%:*}-fp16-${v%%:*}.json" 2>>"$logs/bench.log"
        done
    done
    # cuBLASLt's first algorithm everywhere (EMBEDRAG_CUDA_TUNE=0), for comparison with the
    # timed choice.
    for shape in 12x384:12,384,12,1536 6x384:6,384,12,1536 12x768:12,768,12,3072; do
        wanted "${shape%%:*}-fp16-notune" || continue
        EMBEDRAG_CUDA_TUNE=0 "$bench" --device cuda --seconds "$seconds" --json \
            --random "${shape#*:}" --precision fp16 >"$logs/bench-${shape%%:*}-fp16-notune.json" \
            2>>"$logs/bench.log"
    done
    wanted 12x384-fp16-nographs && EMBEDRAG_CUDA_GRAPHS=0 "$bench" --device cuda \
        --seconds "$seconds" --json --random 12,384,12,1536 --precision fp16 \
        >"$logs/bench-12x384-fp16-nographs.json" 2>>"$logs/bench.log"
    python3 - "$logs" "$out/bench.json" >>"$summary" 2>&1 <<'PY'
import glob, json, os, sys
rows, everything = {}, {}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "bench-*.json"))):
    name = os.path.basename(path)[6:-5]
    try:
        everything[name] = json.load(open(path))
        rows[name] = {(r["length"], r["texts"]): r for r in everything[name]}
    except Exception as e:
        print("bench %s: %s" % (name, e))
json.dump(everything, open(sys.argv[2], "w"), indent=1)
cells = [("16", 1), ("16", 10), ("50", 100), ("128", 1000), ("32-256", 1000)]
print("device ms (CUDA events) / wall ms per call; M tok/s for the 1000-text cells")
print("%-22s" % "run" + "".join("%18s" % ("%sx%s" % (t, l)) for l, t in cells))
for name, r in rows.items():
    line = "%-22s" % name
    for c in cells:
        x = r.get(c)
        if not x:
            line += "%18s" % "-"
        elif c[1] == 1000:
            line += "%18s" % ("%.2f M/s" % (x["device_tokens_per_s"] / 1e6))
        else:
            line += "%18s" % ("%.3f/%.3f" % (x["device_ms_p50"], x["wall_ms_p50"]))
    print(line)
PY
    # EMBEDRAG_E2E_ENV="NAME=VALUE ...": settings for the end-to-end run only.
    # shellcheck disable=SC2086 # the settings are words
    wanted e2e && env ${EMBEDRAG_E2E_ENV:-} "$build/embedrag" bench \
        --model "$src/models/all-MiniLM-L6-v2" --device gpu --seconds "${EMBEDRAG_E2E_SECONDS:-1}" \
        --precision fp16 --data "$bundle/shared/data/stsb-en-dev.csv" \
        --concurrent-texts 100000 --query-gap-ms 1 --json >"$out/embedrag-bench-gpu-fp16.json" \
        2>>"$logs/bench.log"
    wanted e2e && python3 - "$out/embedrag-bench-gpu-fp16.json" >>"$summary" 2>&1 <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("embedrag bench --device gpu fp16 (F16 MiniLM-L6 on %s; CPU %s): query p50 %.3f ms p99 %.3f ms"
      % (r["device"], r["cpu_device"], r["query_16_tokens"]["p50_ms"], r["query_16_tokens"]["p99_ms"]))
print("  %7s %5s %9s %9s %9s %9s %8s %10s %8s" % ("tokens", "batch", "tok ms", "model ms", "device ms", "e2e ms", "of peak", "cpu e2e ms", "speedup"))
for p in r["throughput"]:
    print("  %7s %5d %9.3f %9.3f %9.3f %9.3f %7.1f%% %10.3f %7.1fx" % (p["tokens_per_text"], p["batch"], p["tokenize_ms"], p["model_ms"], p["device_ms"], p["end_to_end_ms"], 100 * p["fraction_of_peak"], p["cpu_end_to_end_ms"], p["speedup_end_to_end"]))
print("  crossover (smallest batch faster end to end on the GPU):", r.get("crossover_batch"))
c = r.get("concurrent")
if c:
    print("  %d-text bulk job: %.2f s alone, %.2f s with %d queries; query p50 %.3f ms, p99 %.3f ms, max %.3f ms"
          % (c["bulk_texts"], c["bulk_alone_s"], c["bulk_with_queries_s"], c["queries"], c["query_p50_ms"], c["query_p99_ms"], c["query_max_ms"]))
PY
fi
# ---- PyTorch on the GPU, same run ----
if run_step peers; then
    PYTHONUNBUFFERED=1 timeout 400 python3 "$src/bench/peers/gpu_peers.py" \
        --json "$out/peers-gpu.json" >"$logs/peers.log" 2>&1
    note "gpu_peers.py: exit $?"
    grep -E ' ms ' "$logs/peers.log" | sed 's/^/  peer /' >>"$summary"
fi
# ---- several GPUs ----
if run_step scale; then
    l12=/tmp/minilm-l12-f16
    [ -d "$l12" ] || python3 "$src/scripts/make_stacked_model.py" "$src/models/all-MiniLM-L6-v2" \
        "$l12" >"$logs/scale.log" 2>&1
    "$build/embedrag" bench --model "$l12" --device cpu --query-only --quick \
        --data "$bundle/shared/data/stsb-en-dev.csv" --dump-texts /tmp/scale-texts \
        >>"$logs/scale.log" 2>&1
    PYTHONUNBUFFERED=1 python3 - "$build/embedrag" "$l12" /tmp/scale-texts "$out/scale.json" \
        >>"$summary" 2>>"$logs/scale.log" <<'PY'
import json, os, resource, subprocess, sys, time
import numpy as np
cli, model, texts, out = sys.argv[1:5]
gpus = int(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.count("GPU "))
copies = int(os.environ.get("EMBEDRAG_SCALE_COPIES", "1000"))
sets = {}
for name, tokens in (("t128", 128 * 1000), ("mixed", sum(32 + (97 * i) % 225 for i in range(1000)))):
    lines = open(os.path.join(texts, name + ".txt")).read().splitlines()
    path = "/tmp/scale-%s.txt" % name
    with open(path, "w") as f:
        for _ in range(copies):
            f.write("\n".join(lines) + "\n")
    sets[name] = (path, tokens * copies, len(lines) * copies)
def run(n, path, env_extra=None, keep=None, device="gpu"):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(n)))
    env.update(env_extra or {})
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    with open(path) as f, open(keep or os.devnull, "wb") as o:
        p = subprocess.run([cli, "embed", "--model", model, "--device", device, "--format", "f32",
                            "--quiet"], stdin=f, stdout=o, stderr=subprocess.PIPE, env=env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    global peak_rss_mb
    peak_rss_mb = after.ru_maxrss / 1024.0  # the largest child so far
    return p.returncode, wall, cpu, p.stderr.decode()[-400:]
peak_rss_mb = 0.0
results = {"gpus": gpus, "copies": copies, "runs": []}
counts = [n for n in (1, 2, 4, 8) if n <= gpus]
print("scale: %d GPUs visible; embed of %d texts per set through the 12-layer F16 model; tokens/s past start-up" % (gpus, sets["t128"][2]))
# Start-up (driver, weights to every GPU, the calibration at open): one text, subtracted below.
one = "/tmp/scale-one.txt"
with open(one, "w") as f:
    f.write("a single line\n")
startup = {}
for n in counts:
    run(n, one)
    startup[n] = min(run(n, one)[1] for _ in range(2))
    print("scale: start-up with %d GPU%s (one text): %.2f s" % (n, "s" if n > 1 else "", startup[n]))
results["startup_s"] = startup
for name, (path, tokens, lines) in sets.items():
    run(1, one)  # the driver warm
    with open(path, "rb") as f:  # the page cache warm
        while f.read(1 << 24):
            pass
    base = None
    for n in counts:
        keep = "/tmp/scale-out-%s-%d.f32" % (name, n)
        rc, wall, cpu, err = run(n, path, keep=keep)
        rate = tokens / (wall - startup[n])
        base = base or rate
        v = np.fromfile(keep, dtype=np.float32).reshape(lines, -1)
        ref = np.fromfile("/tmp/scale-out-%s-1.f32" % name, dtype=np.float32).reshape(lines, -1)
        worst = float(((v * ref).sum(1) / np.linalg.norm(v, axis=1) / np.linalg.norm(ref, axis=1)).min())
        results["runs"].append({"set": name, "gpus": n, "rc": rc, "wall_s": wall, "tokens_per_s": rate,
                                "peak_rss_mb_so_far": peak_rss_mb,
                                "scaling": rate / base, "cpu_cores_used": cpu / wall, "worst_cosine_vs_1": worst})
        print("scale %-6s %d GPU%s: rc %d, %.2f s (%.2f s past start-up), %.2f M tok/s (x%.2f of 1 GPU), %.1f CPU cores busy, worst cosine vs 1 GPU %.7f"
              % (name, n, "s" if n > 1 else "", rc, wall, wall - startup[n], rate / 1e6, rate / base, cpu / wall, worst))
        if rc:
            print("  stderr: " + err)
# A GPU failing mid-run: with several GPUs its work goes to the others, with one to the CPU
# (5,000 texts; the engine's calibration at open takes 5 batches, so 8 fails on the 3rd of the run).
small = "/tmp/scale-small.txt"
with open(sets["t128"][0]) as f, open(small, "w") as o:
    for i, line in zip(range(5000), f):
        o.write(line)
results["failure_runs"] = []
for n in sorted(set([1, gpus])):
    keep, ref_path = "/tmp/scale-out-fail-%d.f32" % n, "/tmp/scale-out-small-%d.f32" % n
    run(n, small, keep=ref_path)
    # --device auto: a call pinned to the GPU has nowhere else to go when its only GPU fails.
    rc, wall, cpu, err = run(n, small, {"EMBEDRAG_TEST_CUDA_FAIL_AFTER": "8"}, keep=keep,
                             device="auto")
    v = np.fromfile(keep, dtype=np.float32)
    ref = np.fromfile(ref_path, dtype=np.float32).reshape(5000, -1)
    worst = float("nan")
    if v.size == ref.size:
        v = v.reshape(5000, -1)
        worst = float(((v * ref).sum(1) / np.linalg.norm(v, axis=1) / np.linalg.norm(ref, axis=1)).min())
    warnings = [l for l in err.splitlines() if "warning" in l]
    results["failure_runs"].append({"gpus": n, "rc": rc, "wall_s": wall, "worst_cosine": worst, "stderr": err})
    print("scale: GPU 0 of %d fails after 8 batches: rc %d, %.2f s, worst cosine vs no failure %.7f, %d warning line(s): %s"
          % (n, rc, wall, worst, len(warnings), warnings[:1]))
print("scale: the largest embed process's peak RSS: %.0f MB (inputs of %d texts, %.0f MB of vectors out)"
      % (peak_rss_mb, sets["t128"][2], sets["t128"][2] * 384 * 4 / 1e6))
json.dump(results, open(out, "w"), indent=1)
PY
fi
# ---- memory while streaming ----
if run_step rss; then
    "$build/embedrag" bench --model "$src/models/all-MiniLM-L6-v2" --device cpu --query-only \
        --quick --data "$bundle/shared/data/stsb-en-dev.csv" --dump-texts /tmp/rss-texts \
        >"$logs/rss.log" 2>&1
    PYTHONUNBUFFERED=1 python3 - "$build/embedrag" "$src/models/all-MiniLM-L6-v2" \
        /tmp/rss-texts/t128.txt "$out/rss.json" >>"$summary" 2>>"$logs/rss.log" <<'PY'
import json, subprocess, sys, time
cli, model, texts, out = sys.argv[1:5]
lines = open(texts).read().splitlines()
path = "/tmp/rss-1m.txt"
with open(path, "w") as f:
    for _ in range(1000):
        f.write("\n".join(lines) + "\n")
samples = []
t0 = time.perf_counter()
with open(path) as f, open("/dev/null", "wb") as o:
    p = subprocess.Popen([cli, "embed", "--model", model, "--device", "gpu", "--format", "f32",
                          "--quiet"], stdin=f, stdout=o, stderr=subprocess.PIPE)
    while p.poll() is None:
        try:
            for l in open("/proc/%d/status" % p.pid):
                if l.startswith("VmRSS:"):
                    samples.append((time.perf_counter() - t0, int(l.split()[1]) / 1024.0))
        except OSError:
            pass
        time.sleep(0.25)
    err = p.stderr.read().decode()
wall = time.perf_counter() - t0
mb = [m for _, m in samples]
n = len(mb)
q = lambda a, b: max(mb[int(a * n):max(int(b * n), int(a * n) + 1)])
print("rss: 1,000,000 texts of 128 tokens through embed --device gpu (MiniLM-L6 F16): rc %d, %.1f s, "
      "%d samples; RSS max %.0f MB; max over each fifth of the run: %s MB"
      % (p.returncode, wall, n, max(mb) if mb else 0,
         ", ".join("%.0f" % q(i / 5, (i + 1) / 5) for i in range(5)) if n >= 5 else "-"))
if p.returncode:
    print("rss: stderr " + err[-300:])
json.dump({"wall_s": wall, "rc": p.returncode, "samples": samples}, open(out, "w"))
PY
fi
# ---- compute-sanitizer ----
if run_step store; then
    model=$src/models/all-MiniLM-L6-v2
    for pipeline in ${EMBEDRAG_STORE_PIPELINES:-1 0}; do
        EMBEDRAG_INDEX_PIPELINE=$pipeline python3 "$src/bench/store_bench.py" --cli "$build/embedrag" \
            --model "$model" --data "$bundle/shared/data/stsb-en-dev.csv" --threads "$(nproc)" \
            --documents "${EMBEDRAG_STORE_DOCUMENTS:-20000}" --chunks 100000 --queries 200 \
            $([ "$pipeline" = 0 ] && echo --skip query) --json \
            >"$logs/store-$pipeline.json" 2>"$logs/store-$pipeline.log"
        python3 - "$logs/store-$pipeline.json" "$pipeline" <<'PY' | tee -a "$summary"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print("store (pipeline %s): no result (%s)" % (sys.argv[2], e)); sys.exit()
i = r["indexing"]
print("store (pipeline %s): index %d docs, %d chunks, %d tokens: %.0f tok/s; embed %.0f tok/s; "
      "index/embed %.0f%% (index model time %.1f of %.1f s)" % (sys.argv[2], i["documents"],
      i["chunks"], i["tokens"], i["index_tokens_per_second"], i["embed_tokens_per_second"],
      100 * i["ratio"], i["index_model_seconds"] or 0, i["index_seconds"]))
if i.get("index_stage_seconds"):
    print("store (pipeline %s): stage seconds: %s" % (sys.argv[2], ", ".join(
        "%s %.2f" % kv for kv in i["index_stage_seconds"].items())))
q = r.get("query")
if q:
    for mode in ("dense", "hybrid", "bm25"):
        print("store: query over %d chunks, %s: p50 %.2f ms, p99 %.2f ms" % (q["chunks"], mode,
              q[mode]["p50_ms"], q[mode]["p99_ms"]))
PY
    done
fi

if run_step storecmp; then
    base=/tmp/embedrag-base-build
    if [ ! -d "$bundle/base-src" ]; then
        note "storecmp: no base-src in the bundle (scripts/gpu-bundle.sh DEST COMMIT)"
    elif ! { cmake -S "$bundle/base-src" -B "$base" -DCMAKE_BUILD_TYPE=Release \
                 -DPKG_CONFIG_EXECUTABLE="$pkgconfig" &&
             cmake --build "$base" -j"$(nproc)" --target embedrag_cli; } >"$logs/base-build.log" 2>&1; then
        note "storecmp: the base did not build (base-build.log)"
    else
        label="base $(cat "$bundle/base-commit" 2>/dev/null)"
        for round in $(seq "${EMBEDRAG_STORE_ROUNDS:-2}"); do
            # This tree once per value of EMBEDRAG_STORECMP_SHARDS (the text index's files,
            # e.g. "1 3"; unset: as the environment says), then the base.
            for which in ${EMBEDRAG_STORECMP_SHARDS:-this} base; do
                cli=$build/embedrag
                [ "$which" = base ] && cli=$base/embedrag
                name="this tree"
                [ "$which" = base ] && name=$label
                shards=${EMBEDRAG_TEXT_SHARDS:-}
                if [ "$which" != base ] && [ "$which" != this ]; then
                    shards=$which
                    name="this tree, $which text shards"
                fi
                EMBEDRAG_TEXT_SHARDS=$shards python3 "$src/bench/store_bench.py" --cli "$cli" \
                    --model "$src/models/all-MiniLM-L6-v2" \
                    --data "$bundle/shared/data/stsb-en-dev.csv" --threads "$(nproc)" \
                    --documents "${EMBEDRAG_STORE_DOCUMENTS:-200000}" --skip query --json \
                    >"$logs/storecmp-$round-$which.json" 2>"$logs/storecmp-$round-$which.log"
                python3 - "$logs/storecmp-$round-$which.json" "$round" "$name" <<'PY' | tee -a "$summary"
import json, sys
try:
    i = json.load(open(sys.argv[1]))["indexing"]
except Exception as e:
    print("storecmp round %s, %s: no result (%s)" % (sys.argv[2], sys.argv[3], e)); sys.exit()
print("storecmp round %s, %s: index %.2f s (run %.2f), embed %.2f s, index/embed %.1f%%; %s" % (
      sys.argv[2], sys.argv[3], i["index_seconds"], i.get("index_run_seconds") or -1,
      i["embed_seconds"], 100 * i["ratio"],
      ", ".join("%s %.2f" % kv for kv in (i.get("index_stage_seconds") or {}).items())))
if i.get("index_stderr"):
    print("storecmp round %s, %s: stderr: %s" % (sys.argv[2], sys.argv[3], i["index_stderr"]))
PY
            done
        done
    fi
fi

if run_step serve; then
    EMBEDRAG_CLI=$build/embedrag EMBEDRAG_SOURCE_DIR=$src python3 "$src/tests/test_server_gpu.py" \
        >"$logs/serve-gpu.log" 2>&1
    note "serve: GPU failure mid-load: $(grep -c '^ok' "$logs/serve-gpu.log") ok, $(grep -c '^not ok' "$logs/serve-gpu.log") not ok"
    grep -E '^not ok|skipped' "$logs/serve-gpu.log" | tee -a "$summary"
    model=$src/models/all-MiniLM-L6-v2
    counts=/tmp/serve-counts.json
    duration=${EMBEDRAG_SERVE_DURATION:-30}
    # Runs (EMBEDRAG_SERVE_RUNS): mix = 32 closed-loop query clients beside 32 batch clients;
    # paced = the query clients at 500 queries/s in all; ratio = batch clients only, against
    # `embedrag embed` of the same texts; memory = 1,000,000 requests, RSS sampled.
    for run in ${EMBEDRAG_SERVE_RUNS:-mix paced ratio memory}; do
        case $run in
        mix) args=(--duration "$duration" --mix 0.5) ;;
        paced) args=(--duration "$duration" --mix 0.5 --query-rate 500) ;;
        ratio) args=(--duration "$duration" --mix 0 --baseline-embed) ;;
        memory) args=(--requests 1000000 --mix 0.9) ;;
        esac
        python3 "$src/bench/server_load.py" --cli "$build/embedrag" --model "$model" \
            --clients 64 --token-counts "$counts" "${args[@]}" \
            --json "$logs/serve-$run.json" >"$logs/serve-$run.log" 2>&1
        tail -n 14 "$logs/serve-$run.log" | sed "s/^/serve ($run): /" | tee -a "$summary"
    done
fi

if run_step realvec; then
    model=$src/models/all-MiniLM-L6-v2
    rv=/tmp/realvec
    mkdir -p "$rv"
    python3 - "$bundle/shared/data/stsb-en-dev.csv" "$rv" "${EMBEDRAG_REALVEC_N:-1000000}" <<'PY'
import random, sys
rows = [l.rstrip("\n").rsplit(",", 2) for l in open(sys.argv[1], encoding="utf-8")]
sents = sorted({r[i] for r in rows if len(r) == 3 for i in (0, 1)})
rng = random.Random(1)
rng.shuffle(sents)
held = sents[:1000]       # questions: sentences that no passage contains
pool = sents[1000:]
with open(sys.argv[2] + "/texts.txt", "w", encoding="utf-8") as f:
    for _ in range(int(sys.argv[3])):
        f.write(rng.choice(pool) + " " + rng.choice(pool) + "\n")
with open(sys.argv[2] + "/queries.txt", "w", encoding="utf-8") as f:
    f.write("\n".join(held) + "\n")
PY
    start_rv=$(date +%s)
    "$build/embedrag" embed --model "$model" --input "$rv/texts.txt" --format f32 --quiet \
        --output "$rv/base.f32" 2>"$logs/realvec-embed.log" &&
    "$build/embedrag" embed --model "$model" --input "$rv/queries.txt" --format f32 --quiet \
        --output "$rv/queries.f32" 2>>"$logs/realvec-embed.log"
    note "realvec: embedded $(wc -l <"$rv/texts.txt") texts and 1000 questions in $(($(date +%s) - start_rv)) s"
    for threads in ${EMBEDRAG_REALVEC_THREADS:-2 $(nproc)}; do
        "$build/embedrag" bench --search "${EMBEDRAG_REALVEC_N:-1000000}" --vectors "$rv/base.f32" \
            --query-vectors "$rv/queries.f32" --queries "${EMBEDRAG_REALVEC_QUERIES:-300}" \
            --threads "$threads" --json \
            >"$logs/realvec-$threads.json" 2>"$logs/realvec-$threads.log"
        python3 - "$logs/realvec-$threads.json" <<'PY' | tee -a "$summary"
import json, sys
try:
    d = json.load(open(sys.argv[1]))["data"][0]
except Exception as e:
    print("realvec: no result (%s)" % e); sys.exit()
c = d["codes"]
print("realvec: codes %.2f s, shortlist %d (calibrated %.3f), default %s" % (c["build_s"], c["shortlist"], c["calibrated_recall"], c["default_runs"]))
for r in d["results"]:
    print("realvec: %-8s %2d threads p50 %7.3f ms p99 %7.3f ms batch %6.0f q/s recall@10 %.4f" % (r["mode"], r["threads"], r["p50_ms"], r["p99_ms"], r["batch_qps"], r["recall_at_10"]))
PY
    done
fi

if run_step sanitize; then
    # EMBEDRAG_SANITIZE_RUNS="tool:small ..." runs only those.
    for run in ${EMBEDRAG_SANITIZE_RUNS:-memcheck:0 memcheck:1 memcheck:lastnorm memcheck:persist racecheck:1 racecheck:persist synccheck:1 synccheck:persist}; do
        tool=${run%%:*} small=${run#*:}
        {
            EMBEDRAG_CUDA_SMALL=$small timeout 150 compute-sanitizer --tool "$tool" \
                --error-exitcode 9 "$build/test_backend" >"$logs/sanitize-$tool-$small.log" 2>&1
            note "compute-sanitizer $tool on test_backend (EMBEDRAG_CUDA_SMALL=$small): exit $? ($(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|SYNCCHECK SUMMARY' "$logs/sanitize-$tool-$small.log" | tail -1))"
        }
    done
fi

# ---- kernel durations ----
if run_step profile; then
    # EMBEDRAG_PROFILE_CELLS (length,texts ...) under each of EMBEDRAG_PROFILE_VARIANTS: default,
    # small (EMBEDRAG_CUDA_SMALL=1), nopdl, lastnorm or persist (EMBEDRAG_CUDA_SMALL=that); with
    # EMBEDRAG_PROFILE_DETAIL=REGEX also ncu's speed-of-light, occupancy, launch, warp-state and
    # memory sections for the first 8 kernels matching REGEX (in each variant, the last cell).
    for variant in ${EMBEDRAG_PROFILE_VARIANTS:-default}; do
        small=
        [ "$variant" = small ] && small=1
        [ "$variant" = nopdl ] && small=nopdl
        [ "$variant" = lastnorm ] && small=lastnorm
        [ "$variant" = persist ] && small=persist
        for cell in ${EMBEDRAG_PROFILE_CELLS:-128,1000 16,1}; do
            # Past the weight conversions at load (~150 kernels) and the warm-up calls (3 of ~90
            # kernels), a little over one of the 10 timed calls.
            skip=600
            EMBEDRAG_CUDA_SMALL=$small timeout 200 ncu --clock-control none \
                --metrics gpu__time_duration.sum --launch-skip "$skip" --launch-count 100 \
                --print-summary per-kernel "$build/embedrag_backend_bench" --device cuda \
                --random 12,384,12,1536 --precision fp16 --only "$cell" --seconds 0 \
                >"$logs/profile-$variant-$cell.log" 2>&1
            note "ncu $variant $cell: exit $?"
            python3 - "$logs/profile-$variant-$cell.log" >>"$summary" 2>&1 <<'PY'
import re, sys
text = open(sys.argv[1]).read()
# Per-kernel summary blocks: a kernel's name line, then "gpu__time_duration.sum ... min max avg".
rows = []
for block in re.split(r"\n(?=  \S)", text):
    name = block.strip().splitlines()[0][:90] if block.strip() else ""
    m = re.search(r"gpu__time_duration\.sum\s+(\S+)\s+([\d.,]+)\s+([\d.,]+)\s+([\d.,]+)", block)
    n = re.search(r"(\d+) kernel", block)
    if m:
        rows.append((name, m.group(1), m.group(4), n.group(1) if n else "?"))
print("ncu %s: kernel, unit, average, launches among the 100 profiled" % sys.argv[1].split("/")[-1])
for r in rows:
    print("  %-90s %4s %10s %5s" % r)
PY
        done
        if [ -n "${EMBEDRAG_PROFILE_DETAIL:-}" ]; then
            EMBEDRAG_CUDA_SMALL=$small timeout 200 ncu --clock-control none \
                --section SpeedOfLight --section Occupancy --section LaunchStats \
                --section WarpStateStats --section MemoryWorkloadAnalysis \
                -k "regex:$EMBEDRAG_PROFILE_DETAIL" --launch-skip 60 --launch-count 8 \
                "$build/embedrag_backend_bench" --device cuda --random 12,384,12,1536 \
                --precision fp16 --only "$cell" --seconds 0 >"$out/detail-$variant.txt" 2>&1
            note "ncu detail $variant $cell ($EMBEDRAG_PROFILE_DETAIL): exit $? (detail-$variant.txt)"
        fi
    done
fi

for f in "$logs"/*; do
    echo "==== $(basename "$f")"
    cat "$f"
done >"$out/logs.txt"
echo "==== summary"
cat "$summary"
