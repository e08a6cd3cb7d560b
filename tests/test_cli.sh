#!/usr/bin/env bash
# The `embedrag` command as a user meets it: help, the three output formats, prompts and
# dimensions, tokenize and info, and one-line errors with a non-zero exit on bad input.
set -u
cli=${EMBEDRAG_CLI:?set by ctest}
src=${EMBEDRAG_SOURCE_DIR:?set by ctest}
model=$src/models/all-MiniLM-L6-v2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# shellcheck source=check.sh
. "$src/tests/check.sh"

printf 'first line\nsecond line, a bit longer\n\nthird\n' >"$tmp/in.txt"

check "--help exits 0" "$cli" --help
check "embed --help exits 0" "$cli" embed --help
"$cli" embed --model "$model" --input "$tmp/in.txt" >"$tmp/out.json"
check "embed exits 0" test $? -eq 0
check "one JSON line per input line" test "$(wc -l <"$tmp/out.json")" -eq 4
check "384 numbers per line" test "$(head -n 1 "$tmp/out.json" | tr ',' '\n' | wc -l)" -eq 384
"$cli" embed --model "$model" --format f32 <"$tmp/in.txt" >"$tmp/out.f32"
check "f32 output size" test "$(stat -c %s "$tmp/out.f32")" -eq $((4 * 384 * 4))
"$cli" embed --model "$model" --format tsv --dimensions 64 <"$tmp/in.txt" >"$tmp/out.tsv"
check "tsv with 64 dimensions" test "$(head -n 1 "$tmp/out.tsv" | awk -F'\t' '{print NF}')" -eq 64
# JSON and f32 carry the same numbers: compare the first component.
first_json=$(head -c 200 "$tmp/out.json" | sed -E 's/^\[([^,]*),.*/\1/')
first_f32=$(od -An -tf4 -N4 -v "$tmp/out.f32" | tr -d ' ')
check "json and f32 agree ($first_json vs $first_f32)" \
    python3 -c "import sys; a,b=map(float,sys.argv[1:]); sys.exit(abs(a-b)>1e-6)" "$first_json" "$first_f32"

printf 'good\nbad \xff byte\nalso good\n' >"$tmp/bad.txt"
"$cli" embed --model "$model" --input "$tmp/bad.txt" >"$tmp/bad.json" 2>"$tmp/err.txt"
check "invalid UTF-8 exits non-zero" test $? -ne 0
check "error names line 2 and the offset" grep -q "line 2: invalid UTF-8 at byte offset 4" "$tmp/err.txt"
check "error is one line" test "$(wc -l <"$tmp/err.txt")" -eq 1
# The README's promise: the vectors of the lines before the bad one are written.
check "line 1's vector is written before the error" test "$(wc -l <"$tmp/bad.json")" -eq 1
printf 'good\n' | "$cli" embed --model "$model" >"$tmp/good.json"
check "and it is line 1's vector" cmp -s "$tmp/good.json" "$tmp/bad.json"
# --on-error skip: output stays aligned with the input, bad lines are counted.
"$cli" embed --model "$model" --input "$tmp/bad.txt" --on-error skip >"$tmp/skip.json" 2>"$tmp/err.txt"
check "skip mode exits 0" test $? -eq 0
check "skip mode keeps one output line per input line" test "$(wc -l <"$tmp/skip.json")" -eq 3
check "the bad line is null" test "$(sed -n 2p "$tmp/skip.json")" = null
check "line 3 still embeds" test "$(sed -n 3p "$tmp/skip.json" | tr ',' '\n' | wc -l)" -eq 384
check "skip mode names the first bad line" grep -q "line 2: invalid UTF-8" "$tmp/err.txt"
check "skip mode counts what it skipped" grep -q "skipped 1 of 3 lines (1 invalid UTF-8, 0 too long)" "$tmp/err.txt"
"$cli" embed --model "$model" --input "$tmp/bad.txt" --on-error skip --format f32 >"$tmp/skip.f32" 2>/dev/null
check "f32 skip keeps alignment (NaN row)" test "$(stat -c %s "$tmp/skip.f32")" -eq $((3 * 384 * 4))
check "the f32 row of the bad line is NaN" \
    python3 -c "import struct,sys,math; d=open(sys.argv[1],'rb').read(); r=struct.unpack('384f', d[1536:3072]); sys.exit(not all(math.isnan(x) for x in r))" "$tmp/skip.f32"
"$cli" embed --model "$model" --input "$tmp/bad.txt" --on-error maybe </dev/null >/dev/null 2>"$tmp/err.txt"
check "bad --on-error exits 2" test $? -eq 2

# Devices: info lists the backends; asking for a GPU where there is none is one clear error.
"$cli" info --model "$model" >"$tmp/info-dev.json"
check "info lists the CPU backend" grep -q '"name":[[:space:]]*"cpu"' "$tmp/info-dev.json"
if grep -q '"gpu_unavailable":[[:space:]]*"' "$tmp/info-dev.json"; then
    "$cli" embed --model "$model" --device gpu <"$tmp/in.txt" >/dev/null 2>"$tmp/err.txt"
    check "--device gpu without a GPU exits non-zero" test $? -ne 0
    check "--device gpu says why" grep -qi "gpu\|cuda" "$tmp/err.txt"
    check "--device gpu error is one line" test "$(wc -l <"$tmp/err.txt")" -eq 1
else
    "$cli" embed --model "$model" --device gpu <"$tmp/in.txt" >"$tmp/gpu.json"
    check "--device gpu embeds on the GPU" test "$(wc -l <"$tmp/gpu.json")" -eq 4
fi
"$cli" embed --model "$model" --device tpu </dev/null >/dev/null 2>"$tmp/err.txt"
check "bad --device exits 2" test $? -eq 2

"$cli" embed --model "$tmp/no-such-model" </dev/null >/dev/null 2>"$tmp/err.txt"
check "missing model exits non-zero" test $? -ne 0
check "error names the model directory" grep -q "no-such-model" "$tmp/err.txt"

"$cli" embed --model "$model" --dimensions abc </dev/null >/dev/null 2>"$tmp/err.txt"
check "bad --dimensions exits 2" test $? -eq 2
"$cli" embed --model "$model" --prompt nope <"$tmp/in.txt" >/dev/null 2>"$tmp/err.txt"
check "unknown prompt exits non-zero" test $? -ne 0
check "unknown prompt is named" grep -q "nope" "$tmp/err.txt"

echo "Hello, World!" | "$cli" tokenize --model "$model" >"$tmp/tok.json"
check "tokenize ids" grep -q '"ids":\[101,7592,1010,2088,999,102\]' "$tmp/tok.json"
check "tokenize tokens" grep -q '"tokens":\["\[CLS\]","hello",",","world","!","\[SEP\]"\]' "$tmp/tok.json"

"$cli" info --model "$model" >"$tmp/info.json"
check "info reports 6 layers" grep -q '"layers":[[:space:]]*6' "$tmp/info.json"
check "info reports mean pooling" grep -q '"pooling":[[:space:]]*"mean"' "$tmp/info.json"

# A full disk: the write error is reported and the exit status is non-zero.
"$cli" embed --model "$model" --input "$tmp/in.txt" >/dev/full 2>"$tmp/err.txt"
check "writing to a full disk exits non-zero" test $? -ne 0
check "the error says why" grep -qi "no space" "$tmp/err.txt"

# A 10 MB line is cut to the model's limit, not a crash.
python3 -c "import sys; sys.stdout.write('word ' * 2000000 + '\n')" >"$tmp/huge.txt"
"$cli" embed --model "$model" --input "$tmp/huge.txt" --format f32 >"$tmp/huge.f32"
check "10 MB line embeds" test "$(stat -c %s "$tmp/huge.f32")" -eq $((384 * 4))
"$cli" embed --model "$model" --input "$tmp/huge.txt" --no-truncate >/dev/null 2>"$tmp/err.txt"
check "10 MB line without truncation is refused" test $? -ne 0
check "refusal names line 1 and the limit" grep -q "line 1: .*at most 256" "$tmp/err.txt"

# --precision: a bad value is refused; bf16 runs where the CPU has a bf16 kernel (AVX512-BF16
# with the AVX-512 kernels; every AMX-BF16 CPU has it too), and says it runs fp32 where it has
# not, or where EMBEDRAG_CPU_BF16=none turns the bf16 kernels off; either way `info` reports what
# runs and `embed` gives 384 numbers.
"$cli" embed --model "$model" --precision fp64 </dev/null 2>"$tmp/err.txt"
check "bad --precision exits 2" test $? -eq 2
check "bad --precision is named" grep -q "fp32, bf16 or fp16" "$tmp/err.txt"
# fp16 is a GPU precision: the CPU says it runs fp32.
"$cli" info --model "$model" --device cpu --precision fp16 >"$tmp/info-fp16.json" 2>"$tmp/err.txt"
check "fp16 on the CPU runs fp32" grep -q '"precision":[[:space:]]*"fp32"' "$tmp/info-fp16.json"
check "fp16 on the CPU is announced" grep -q "runs fp16 as fp32" "$tmp/err.txt"
cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
bf16_runs=yes
for flag in avx512f avx512dq avx512bw avx512_bf16; do
    [[ "$cpu_flags" == *" $flag "* ]] || bf16_runs=no
done
"$cli" info --model "$model" --precision bf16 >"$tmp/info16.json" 2>"$tmp/err.txt"
if [ "$bf16_runs" = yes ]; then
    check "info reports bf16 on a CPU with a bf16 kernel" \
        grep -q '"precision":[[:space:]]*"bf16"' "$tmp/info16.json"
else
    check "info reports the fp32 fallback" grep -q '"precision":[[:space:]]*"fp32"' "$tmp/info16.json"
    check "the fallback is announced" grep -q "running fp32 instead" "$tmp/err.txt"
fi
EMBEDRAG_CPU_BF16=none "$cli" info --model "$model" --precision bf16 >"$tmp/info16.json" \
    2>"$tmp/err.txt"
check "info reports the fp32 fallback with the bf16 kernels off" \
    grep -q '"precision":[[:space:]]*"fp32"' "$tmp/info16.json"
check "the fallback names both bf16 kernels" grep -q "needs AMX-BF16 or AVX512-BF16" "$tmp/err.txt"
"$cli" embed --model "$model" --precision bf16 --input "$tmp/in.txt" --format f32 >"$tmp/bf16.f32"
check "bf16 f32 output size" test "$(stat -c %s "$tmp/bf16.f32")" -eq $((4 * 384 * 4))

# bench and the device options: bad values are one line and exit 2; a GPU pinned where there is
# none is one clear error; info carries the estimates (and, with stand-in GPUs, the crossover).
"$cli" bench --model "$model" --seconds 0 >/dev/null 2>"$tmp/err.txt"
check "bench --seconds 0 exits 2" test $? -eq 2
check "bench --seconds 0 says why" grep -q "seconds wants" "$tmp/err.txt"
"$cli" bench --model "$model" --concurrent-texts lots >/dev/null 2>"$tmp/err.txt"
check "bench --concurrent-texts lots exits 2" test $? -eq 2
"$cli" embed --model "$model" --device tpu <"$tmp/in.txt" >/dev/null 2>"$tmp/err.txt"
check "--device tpu exits 2" test $? -eq 2
check "--device tpu names the choices" grep -q "auto, cpu, gpu or cuda" "$tmp/err.txt"
EMBEDRAG_DEVICE=tpu "$cli" embed --model "$model" <"$tmp/in.txt" >/dev/null 2>"$tmp/err.txt"
check "EMBEDRAG_DEVICE=tpu fails" test $? -ne 0
check "EMBEDRAG_DEVICE=tpu is named" grep -q "EMBEDRAG_DEVICE" "$tmp/err.txt"
"$cli" info --model "$model" >"$tmp/info-est.json"
check "info estimates a query" grep -q '"estimated_query_ms"' "$tmp/info-est.json"
EMBEDRAG_TEST_FAKE_GPUS=1 "$cli" info --model "$model" --threads 1 >"$tmp/info-fake.json"
check "info gives the crossover with a GPU" grep -q '"texts_of_128_tokens"' "$tmp/info-fake.json"
# (out.f32 came from --device auto, which is a real GPU where there is one: compare with the CPU.)
"$cli" embed --model "$model" --device cpu --format f32 <"$tmp/in.txt" >"$tmp/cpu.f32"
EMBEDRAG_TEST_FAKE_GPUS=1 "$cli" embed --model "$model" --device cuda --format f32 \
    <"$tmp/in.txt" >"$tmp/fake.f32"
check "embed on a (stand-in) GPU: the CPU's bytes" cmp -s "$tmp/fake.f32" "$tmp/cpu.f32"

# The store: index a folder and a JSONL file, search in every mode, stats; a second run does no
# model work; errors are one line with a non-zero exit.
mkdir -p "$tmp/docs"
printf '# Music\n\nA man is playing a guitar on the stage.\n\nThe band plays loud rock music.\n' \
    >"$tmp/docs/music.md"
printf 'A cat sleeps on the warm windowsill.\nThe kitten chases a ball of yarn.\n' >"$tmp/docs/cats.txt"
printf '{"id": "d1", "title": "Cooking", "text": "Slice the onions and fry them in butter.", "metadata": {"lang": "en"}}\n' \
    >"$tmp/docs.jsonl"
printf '{"id": "d2", "text": "A woman is playing the violin in a concert hall.", "metadata": {"lang": "fr", "year": 2021}}\n' \
    >>"$tmp/docs.jsonl"
"$cli" index --model "$model" --store "$tmp/s.db" --json "$tmp/docs" "$tmp/docs.jsonl" \
    >"$tmp/index.json" 2>"$tmp/err.txt"
check "index exits 0" test $? -eq 0
check "index indexes 4 documents" grep -q '"indexed":[[:space:]]*4' "$tmp/index.json"
"$cli" index --model "$model" --store "$tmp/s.db" --json "$tmp/docs" "$tmp/docs.jsonl" \
    >"$tmp/index2.json" 2>"$tmp/err.txt"
check "a second index run embeds nothing" grep -q '"tokens":[[:space:]]*0' "$tmp/index2.json"
check "... and finds 4 unchanged" grep -q '"unchanged":[[:space:]]*4' "$tmp/index2.json"
"$cli" search --store "$tmp/s.db" -k 1 "someone plays the guitar" >"$tmp/search.txt"
check "dense search finds the guitar" grep -q "music.md" "$tmp/search.txt"
"$cli" search --store "$tmp/s.db" -k 1 --mode bm25 --json "kitten" >"$tmp/search.json"
check "bm25 search finds the kitten" grep -q '"source":"[^"]*cats.txt"' "$tmp/search.json"
"$cli" search --store "$tmp/s.db" -k 1 --mode hybrid --json "frying onions" >"$tmp/search.json"
check "hybrid search finds the onions, with metadata" grep -q '"lang":"en"' "$tmp/search.json"
"$cli" stats --store "$tmp/s.db" --json >"$tmp/stats.json"
check "stats counts 4 documents" grep -q '"documents":[[:space:]]*4' "$tmp/stats.json"
check "stats: the search copy is current after index" \
    grep -q '"search_copies_current":[[:space:]]*true' "$tmp/stats.json"
# The same documents into a store whose text index is split in two (EMBEDRAG_TEXT_SHARDS):
# stats says so, and BM25 ranks and scores as over one file.
EMBEDRAG_TEXT_SHARDS=2 "$cli" index --model "$model" --store "$tmp/s2.db" --quiet "$tmp/docs" \
    "$tmp/docs.jsonl" 2>"$tmp/err.txt"
check "index into a store of two text files exits 0" test $? -eq 0
"$cli" stats --store "$tmp/s2.db" --json >"$tmp/stats2.json"
check "stats counts two text index files" grep -q '"text_index_files":[[:space:]]*2' "$tmp/stats2.json"
check "... which are there" test -f "$tmp/s2.db-text.0" -a -f "$tmp/s2.db-text.1" -a ! -e "$tmp/s2.db-text"
for q in "playing music" "the kitten and the cat" "onions in butter"; do
    "$cli" search --store "$tmp/s.db" -k 5 --mode bm25 --json "$q" >"$tmp/one.json"
    "$cli" search --store "$tmp/s2.db" -k 5 --mode bm25 --json "$q" >"$tmp/two.json"
    check "bm25 '$q': two files rank and score as one" \
        python3 -c "import json,sys; a,b=(json.load(open(f))['results'] for f in sys.argv[1:]); sys.exit(not a or [(x['document'],x['chunk'],round(x['score'],9)) for x in a] != [(x['document'],x['chunk'],round(x['score'],9)) for x in b])" \
        "$tmp/one.json" "$tmp/two.json"
done
# Filters: by source glob and by metadata field, in every mode.
"$cli" search --store "$tmp/s.db" -k 3 --json --path '*.jsonl:*' "someone plays music" \
    >"$tmp/f.json"
check "--path keeps only JSONL documents" \
    python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results']; sys.exit(not r or any(not x['source'].startswith(sys.argv[2]) for x in r))" \
    "$tmp/f.json" "$tmp/docs.jsonl:"
for mode in dense bm25 hybrid; do
    "$cli" search --store "$tmp/s.db" -k 5 --json --mode $mode --where lang=fr \
        "playing the violin and the guitar" >"$tmp/f.json"
    check "--where lang=fr ($mode): the violin only" \
        python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results']; sys.exit([x['document'] for x in r] != ['d2'])" "$tmp/f.json"
done
"$cli" search --store "$tmp/s.db" -k 5 --json --where year=2021 --where lang=fr "violin" >"$tmp/f.json"
check "--where on a number, twice (AND)" grep -q '"document":"d2"' "$tmp/f.json"
"$cli" search --store "$tmp/s.db" -k 5 --json --where year=2020 "violin" >"$tmp/f.json"
check "--where that nothing passes: no results" grep -q '"results":\[\]' "$tmp/f.json"
"$cli" search --store "$tmp/s.db" --where lang "x" >/dev/null 2>"$tmp/err.txt"
check "--where without = exits 2" test $? -eq 2
printf 'guitar\nonions\n' | "$cli" search --store "$tmp/s.db" --queries - --timings -k 1 \
    >/dev/null 2>"$tmp/timings.txt"
check "--timings prints percentiles" grep -q "2 queries over .* p50" "$tmp/timings.txt"
"$cli" search --store "$tmp/nothing.db" "x" >/dev/null 2>"$tmp/err.txt"
check "search of a missing store exits 1" test $? -eq 1
check "... naming it" grep -q "nothing.db: no such store" "$tmp/err.txt"
"$cli" search --store "$tmp/s.db" --mode fuzzy "x" >/dev/null 2>"$tmp/err.txt"
check "--mode fuzzy exits 2" test $? -eq 2
"$cli" index --model "$model" --store "$tmp/in.txt" "$tmp/docs" >/dev/null 2>"$tmp/err.txt"
check "indexing into a file that is no store exits 1" test $? -eq 1
check "... saying so" grep -q "not an embedrag store" "$tmp/err.txt"

# examples/ask.c: the library API end to end (index a folder, ask, ask again without work).
ask="$(dirname "$cli")/ask"
if [ -x "$ask" ]; then
    "$ask" "$model" "$tmp/ask.db" "who plays the guitar?" "$tmp/docs" >"$tmp/ask.txt" 2>"$tmp/err.txt"
    check "ask exits 0" test $? -eq 0
    check "ask finds the guitar first" bash -c "head -1 '$tmp/ask.txt' | grep -q music.md"
    "$ask" "$model" "$tmp/ask.db" "a kitten" >"$tmp/ask2.txt" 2>"$tmp/err.txt"
    check "ask again, from the store alone" bash -c "head -1 '$tmp/ask2.txt' | grep -q cats.txt"
    "$ask" "$model" "$tmp/in.txt" "x" >/dev/null 2>"$tmp/err.txt"
    check "ask on a file that is no store exits 1" test $? -eq 1
    check "... saying so" grep -q 'not an embedrag store' "$tmp/err.txt"
fi

# bench --search: a small run in JSON, with the store's open timed.
"$cli" bench --search 3000 --queries 20 --dim 64 --open --dir "$tmp" --json >"$tmp/bs.json" \
    2>"$tmp/err.txt"
check "bench --search exits 0" test $? -eq 0
check "bench --search: exact recall 1, both data kinds, open times" python3 -c "
import json, sys
o = json.load(open(sys.argv[1]))
kinds = [d['kind'] for d in o['data']]
exact = [r for d in o['data'] for r in d['results'] if r['mode'] == 'exact']
ok = kinds == ['uniform', 'clustered'] and exact and all(r['recall_at_10'] == 1.0 and r['p50_ms'] > 0 for r in exact)
ok = ok and all(d['store']['open_from_search_copy_s'] > 0 for d in o['data'])
sys.exit(not ok)" "$tmp/bs.json"
check "bench --search leaves no store behind" test -z "$(ls "$tmp" | grep embedrag-bench-search)"

# serve with a store and no --model runs the store's model, as search does (a store made with
# the 12-layer test model here); `serve --help` works in any build.
check "serve --help exits 0" "$cli" serve --help
if "$cli" serve --help | grep -q -- --store && [ -d "$src/models/minilm-l12-stacked" ]; then
    printf 'a short note about serving\n' >"$tmp/note.txt"
    "$cli" index --model "$src/models/minilm-l12-stacked" --store "$tmp/l12.db" --quiet \
        "$tmp/note.txt" >/dev/null
    "$cli" serve --port 0 --store "$tmp/l12.db" --quiet >"$tmp/serve.out" 2>"$tmp/serve.err" &
    serve_pid=$!
    for _ in $(seq 100); do grep -q listening "$tmp/serve.out" && break; sleep 0.1; done
    url=$(sed -n 's/^listening on //p' "$tmp/serve.out")
    check "serve runs the store's model" python3 -c "
import json, sys, urllib.request
info = json.load(urllib.request.urlopen(sys.argv[1] + '/info'))
sys.exit(info['model_id'] != 'minilm-l12-stacked')" "$url"
    kill -TERM "$serve_pid"
    wait "$serve_pid"
    check "serve exits 0 on SIGTERM" test $? -eq 0
fi

# Streaming: many lines through one process, output line count matches.
python3 -c "
for i in range(3000): print('line number', i, 'of a longer stream')" >"$tmp/many.txt"
"$cli" embed --model "$model" --input "$tmp/many.txt" --format f32 --quiet >"$tmp/many.f32"
check "3000 streamed lines" test "$(stat -c %s "$tmp/many.f32")" -eq $((3000 * 384 * 4))

echo "$((checks - failures)) passed, $failures failed"
[ "$failures" -eq 0 ]
