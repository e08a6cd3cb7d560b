#!/usr/bin/env bash
# The retrieval evaluation harness (bench/eval): its metrics against cases computed by hand, its
# plumbing through `embedrag index` + `search` on a tiny hand-made BEIR folder, and the quality
# of index + search on the STS-B-derived set (bench/eval/make_stsb_beir.py) in every mode,
# against bars measured on 2026-11-29 (bench/eval/README.md) less a margin.
set -u
cli=${EMBEDRAG_CLI:?set by ctest}
src=${EMBEDRAG_SOURCE_DIR:?set by ctest}
model=$src/models/all-MiniLM-L6-v2
eval_dir=$src/bench/eval
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# shellcheck source=check.sh
. "$src/tests/check.sh"
# json_at FILE EXPRESSION: a value of the JSON object in FILE, as Python writes it (r is the object).
json_at() {
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$1" "$2"
}
# near A B: |A - B| < 1e-4.
near() { python3 -c "import sys; sys.exit(abs(float(sys.argv[1]) - float(sys.argv[2])) >= 1e-4)" "$1" "$2"; }
# at_least A B: A >= B.
at_least() { python3 -c "import sys; sys.exit(not float(sys.argv[1]) >= float(sys.argv[2]))" "$1" "$2"; }

check "the script's own metric self-test" python3 "$eval_dir/beir_eval.py" --self-test

# (a) The metrics on rankings computed by hand here.
# q1: relevant d1, d2, d3 (grade 1); chunks d4 d2 d2 d5 d1 -> documents d4 d2 d5 d1.
#     DCG = 1/log2(3) + 1/log2(5) = 1.06161; IDCG = 1 + 1/log2(3) + 1/log2(4) = 2.13093;
#     nDCG@10 = 0.49819; recall@10 = 2/3; MRR@10 = 1/2.
# q2: d1 grade 3, d2 grade 1; ranking d2 d1. DCG = 1 + 3/log2(3) = 2.89279;
#     IDCG = 3 + 1/log2(3) = 3.63093; nDCG@10 = 0.79671; recall 1; MRR 1.
# q3: only a grade-0 judgment: left out. Means over 2 queries: nDCG@10 0.64745, recall@10
#     0.83333, recall@100 0.83333, MRR@10 0.75.
python3 - "$eval_dir" >"$tmp/hand.json" <<'EOF'
import json, sys
sys.path.insert(0, sys.argv[1])
import beir_eval as be
qrels = {"q1": {"d1": 1, "d2": 1, "d3": 1}, "q2": {"d1": 3, "d2": 1}, "q3": {"d9": 0}}
rankings = {"q1": be.document_ranking(["d4", "d2", "d2", "d5", "d1"]), "q2": ["d2", "d1"], "q3": ["d9"]}
print(json.dumps(be.score_run(rankings, qrels)))
EOF
check "hand case: 2 queries counted" test "$(json_at "$tmp/hand.json" 'r["queries"]')" -eq 2
check "hand case: nDCG@10" near "$(json_at "$tmp/hand.json" 'r["ndcg@10"]')" 0.64745
check "hand case: recall@10" near "$(json_at "$tmp/hand.json" 'r["recall@10"]')" 0.83333
check "hand case: recall@100" near "$(json_at "$tmp/hand.json" 'r["recall@100"]')" 0.83333
check "hand case: MRR@10" near "$(json_at "$tmp/hand.json" 'r["mrr@10"]')" 0.75

# (b) Plumbing: a tiny BEIR folder through index + search (bm25, whose ranking here is plain:
# each query's words are in its answer). "music" is long enough for several chunks, which must
# count as one document; document "q3" has the id of query q3 and is dropped from its ranking
# as BEIR does, unless --keep-identical-ids.
mkdir -p "$tmp/tiny/qrels"
python3 - "$tmp/tiny" <<'EOF'
import json, sys
d = sys.argv[1]
music = "\n\n".join(f"Paragraph {i} about guitars, amplifiers and the loud rock band on the stage. " * 6 for i in range(6))
docs = [
    {"_id": "cats", "title": "Cats", "text": "A kitten chases a ball of yarn across the warm kitchen floor."},
    {"_id": "music", "title": "Music", "text": music},
    {"_id": "cook", "title": "", "text": "Slice the onions and fry them slowly until golden."},
    {"_id": "q3", "title": "", "text": "Onions in butter: a kitchen note about frying onions."},
]
queries = [{"_id": "q1", "text": "kitten yarn"}, {"_id": "q2", "text": "guitars amplifiers band"},
           {"_id": "q3", "text": "frying onions in butter"}, {"_id": "q4", "text": "unjudged"}]
with open(f"{d}/corpus.jsonl", "w") as f:
    f.writelines(json.dumps(x) + "\n" for x in docs)
with open(f"{d}/queries.jsonl", "w") as f:
    f.writelines(json.dumps(x) + "\n" for x in queries)
with open(f"{d}/qrels/test.tsv", "w") as f:
    f.write("query-id\tcorpus-id\tscore\nq1\tcats\t1\nq2\tmusic\t2\nq3\tcook\t1\n")
EOF
python3 "$eval_dir/beir_eval.py" --cli "$cli" --model "$model" --modes bm25 --json "$tmp/tiny" \
    >"$tmp/tiny.json"
check "tiny set: evaluates" test $? -eq 0
check "tiny set: the judged queries only" test "$(json_at "$tmp/tiny.json" 'r["queries"]')" -eq 3
check "tiny set: music is cut into several chunks" \
    at_least "$(json_at "$tmp/tiny.json" 'r["index"]["chunks"]')" 6
check "tiny set: each query's answer first (nDCG@10 1)" \
    near "$(json_at "$tmp/tiny.json" 'r["modes"]["bm25"]["ndcg@10"]')" 1
check "tiny set: one document per query after merging chunks and dropping q3" \
    near "$(json_at "$tmp/tiny.json" 'r["modes"]["bm25"]["documents_per_query"]')" 1
# Kept, document q3 is first for q3 and cook second: nDCG 1/log2(3) and MRR 1/2 for q3.
python3 "$eval_dir/beir_eval.py" --cli "$cli" --model "$model" --modes bm25 --json \
    --keep-identical-ids "$tmp/tiny" >"$tmp/tiny-kept.json"
check "tiny set, identical ids kept: nDCG@10 (2 + 1/log2(3)) / 3" \
    near "$(json_at "$tmp/tiny-kept.json" 'r["modes"]["bm25"]["ndcg@10"]')" 0.87698
check "tiny set, identical ids kept: MRR@10 2.5 / 3" \
    near "$(json_at "$tmp/tiny-kept.json" 'r["modes"]["bm25"]["mrr@10"]')" 0.83333

# (c) Quality on the STS-B-derived set, every mode. Measured 2026-11-29 (Zen 4, fp32):
# dense 0.9553, bm25 0.9096, hybrid 0.9373 nDCG@10; dense recall@10 1.0. The bars are those less
# 0.015 (about ten of the 260 queries' answers falling from rank 1 to rank 2).
python3 "$eval_dir/make_stsb_beir.py" "$tmp/stsb" 2>"$tmp/make.txt"
check "STS-B set: built" grep -q "260 queries, 2648 documents" "$tmp/make.txt"
python3 "$eval_dir/beir_eval.py" --cli "$cli" --model "$model" --json "$tmp/stsb" >"$tmp/stsb.json"
check "STS-B set: evaluates" test $? -eq 0
cat "$tmp/stsb.json"
check "STS-B: every document indexed, one chunk each" \
    test "$(json_at "$tmp/stsb.json" 'r["index"]["chunks"]')" -eq 2648
check "STS-B: dense nDCG@10 >= 0.940" \
    at_least "$(json_at "$tmp/stsb.json" 'r["modes"]["dense"]["ndcg@10"]')" 0.940
check "STS-B: dense recall@10 >= 0.985" \
    at_least "$(json_at "$tmp/stsb.json" 'r["modes"]["dense"]["recall@10"]')" 0.985
check "STS-B: bm25 nDCG@10 >= 0.895" \
    at_least "$(json_at "$tmp/stsb.json" 'r["modes"]["bm25"]["ndcg@10"]')" 0.895
check "STS-B: hybrid nDCG@10 >= 0.922" \
    at_least "$(json_at "$tmp/stsb.json" 'r["modes"]["hybrid"]["ndcg@10"]')" 0.922
check "STS-B: every metric at most 1" \
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); sys.exit(not all(v <= 1 for m in r['modes'].values() for k, v in m.items() if '@' in k))" \
    "$tmp/stsb.json"

echo "$((checks - failures)) passed, $failures failed"
[ "$failures" -eq 0 ]
