#!/usr/bin/env python3
"""Retrieval quality of `embedrag index` + `embedrag search` on a data set in BEIR's layout.

A BEIR folder holds corpus.jsonl ({"_id", "title", "text"}), queries.jsonl ({"_id", "text"}) and
qrels/<split>.tsv (header `query-id corpus-id score`). This script writes the corpus as
embedrag's JSONL ({"id", "text", "title"}), indexes it into a new store (documents are chunked as
`embedrag index` always does), asks every judged query with `embedrag search --json` in each
mode (dense, bm25, hybrid), and scores the rankings:

  nDCG@10     BEIR's and MTEB's definition (pytrec_eval's ndcg_cut): gain = the qrel score,
              discount log2(rank + 1), divided by the DCG of the query's own qrels sorted best
              first; documents without a qrel score 0
  recall@k    the share of the query's relevant documents (qrel score > 0) in the first k
  MRR@10      1 / the rank of the first relevant document in the first 10 (0 if none)

each averaged over the queries that have at least one relevant document. Search ranks chunks,
so a document can come back several times: the ranking is made one of documents, each at its
best chunk's rank (MTEB scores whole documents). As in BEIR's evaluation, a returned document
whose id is the query's id is dropped (--keep-identical-ids keeps it; it matters for ArguAna and
Quora only). Also reports the index time and, per mode, the time per query (the search run's
wall time less that of a run with no queries, i.e. less loading the model and the vectors).

usage: beir_eval.py [options] BEIR_DIR      (Python 3 standard library only)
       beir_eval.py --self-test             (checks the metric code on a hand-made case)
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
MODES = ("dense", "bm25", "hybrid")
# Where the builds in README.md and scripts/test.sh put the command, first found wins.
CLI_CANDIDATES = ("build-release/embedrag", "build/embedrag")


# ---- the metrics (pure functions: the test checks them on hand-computed cases) ----


def document_ranking(chunk_documents):
    """Chunks' document ids, best first -> document ids, each once at its best chunk's rank."""
    seen = set()
    ranking = []
    for doc in chunk_documents:
        if doc not in seen:
            seen.add(doc)
            ranking.append(doc)
    return ranking


def ndcg_at(ranking, judged, k):
    """judged: {doc id: qrel score}. None where the query has no relevant document."""
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:k]
    if not ideal:
        return None
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    dcg = sum(max(judged.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(ranking[:k]))
    return dcg / idcg


def recall_at(ranking, judged, k):
    relevant = {d for d, g in judged.items() if g > 0}
    if not relevant:
        return None
    return len(relevant.intersection(ranking[:k])) / len(relevant)


def mrr_at(ranking, judged, k):
    if not any(g > 0 for g in judged.values()):
        return None
    for i, d in enumerate(ranking[:k]):
        if judged.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


METRICS = (
    ("ndcg@10", ndcg_at, 10),
    ("recall@10", recall_at, 10),
    ("recall@100", recall_at, 100),
    ("mrr@10", mrr_at, 10),
)


def score_run(rankings, qrels):
    """rankings: {query id: [doc id, ...]}, qrels: {query id: {doc id: score}} -> mean metrics
    over the queries with a relevant document (a query missing from rankings scores 0)."""
    sums = {name: 0.0 for name, _, _ in METRICS}
    counted = 0
    for qid, judged in qrels.items():
        if not any(g > 0 for g in judged.values()):
            continue
        counted += 1
        ranking = rankings.get(qid, [])
        for name, fn, k in METRICS:
            sums[name] += fn(ranking, judged, k)
    out = {name: (sums[name] / counted if counted else 0.0) for name in sums}
    out["queries"] = counted
    return out


def self_test():
    """A hand-made case, computed by hand in the comments: prints and returns failures."""
    qrels = {"q1": {"a": 2, "b": 1, "z": 0}, "q2": {"c": 1}, "q3": {"x": 0}}
    # Chunks a, a, x, b -> documents a, x, b. DCG = 2/log2(2) + 1/log2(4) = 2.5;
    # IDCG = 2 + 1/log2(3) = 2.6309; nDCG = 0.95023. recall@10 = 1, MRR = 1.
    # q2: c at document rank 3 (chunks y, y, d, c): nDCG = (1/log2(4)) / 1 = 0.5, MRR = 1/3.
    # q3 has no relevant document and is left out of the means.
    rankings = {
        "q1": document_ranking(["a", "a", "x", "b"]),
        "q2": document_ranking(["y", "y", "d", "c"]),
        "q3": ["x"],
    }
    want = {
        "ndcg@10": (0.95023 + 0.5) / 2,
        "recall@10": 1.0,
        "recall@100": 1.0,
        "mrr@10": (1 + 1 / 3) / 2,
        "queries": 2,
    }
    got = score_run(rankings, qrels)
    failures = [f"{k}: got {got[k]:.5f}, want {v:.5f}" for k, v in want.items() if abs(got[k] - v) > 1e-4]
    # Past the cut: c at document rank 11 counts for recall@100 only.
    late = {"q2": [f"n{i}" for i in range(10)] + ["c"]}
    got = score_run(late, {"q2": {"c": 1}})
    if got["ndcg@10"] != 0 or got["recall@10"] != 0 or got["recall@100"] != 1 or got["mrr@10"] != 0:
        failures.append(f"a relevant document at rank 11 scored {got}")
    for f in failures:
        print("self-test FAILED:", f, file=sys.stderr)
    print(f"self-test: {'ok' if not failures else 'FAILED'}", file=sys.stderr)
    return failures


# ---- the data set ----


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{n}: {e}")


def read_qrels(path):
    qrels = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if n == 1 and fields[0] == "query-id":
                continue
            if len(fields) < 3:
                raise SystemExit(f"{path}:{n}: want query-id, corpus-id, score")
            qrels.setdefault(fields[0], {})[fields[1]] = int(float(fields[2]))
    return qrels


def one_line(text):
    """A query as one line of --queries (search reads one question per line)."""
    return " ".join(text.split())


# ---- running embedrag ----


def find_cli(option):
    if option:
        return option
    if os.environ.get("EMBEDRAG_CLI"):
        return os.environ["EMBEDRAG_CLI"]
    for candidate in CLI_CANDIDATES:
        path = os.path.join(ROOT, candidate)
        if os.access(path, os.X_OK):
            return path
    raise SystemExit(f"no embedrag command in {', '.join(CLI_CANDIDATES)}: build it or give --cli")


def run(cmd, stdout_path=None):
    """Runs cmd, its stdout to stdout_path (else kept in proc.stdout): (proc, wall seconds)."""
    start = time.monotonic()
    if stdout_path:
        with open(stdout_path, "w", encoding="utf-8") as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc, time.monotonic() - start


def evaluate(args):
    split_path = os.path.join(args.beir_dir, "qrels", f"{args.split}.tsv")
    qrels = read_qrels(split_path)
    queries = {q["_id"]: q.get("text", "") for q in read_jsonl(os.path.join(args.beir_dir, "queries.jsonl"))}
    missing = [q for q in qrels if q not in queries]
    if missing:
        raise SystemExit(f"{split_path}: {len(missing)} query ids not in queries.jsonl (first: {missing[0]})")
    # The judged queries, in the order of queries.jsonl; --max-queries keeps the first N.
    asked = [q for q in queries if q in qrels and any(g > 0 for g in qrels[q].values())]
    if args.max_queries:
        asked = asked[: args.max_queries]
    qrels = {q: qrels[q] for q in asked}

    cli = find_cli(args.cli)
    work = args.work_dir or tempfile.mkdtemp(prefix="beir-eval-")
    os.makedirs(work, exist_ok=True)
    try:
        corpus_path = os.path.join(work, "corpus.jsonl")
        documents = 0
        with open(corpus_path, "w", encoding="utf-8") as out:
            for d in read_jsonl(os.path.join(args.beir_dir, "corpus.jsonl")):
                doc = {"id": str(d["_id"]), "text": d.get("text") or ""}
                if d.get("title"):
                    doc["title"] = d["title"]
                out.write(json.dumps(doc, ensure_ascii=False) + "\n")
                documents += 1
        queries_path = os.path.join(work, "queries.txt")
        with open(queries_path, "w", encoding="utf-8") as out:
            for q in asked:
                out.write(one_line(queries[q]) + "\n")
        empty_path = os.path.join(work, "empty.txt")
        open(empty_path, "w").close()
        store = os.path.join(work, "store.db")

        cmd = [cli, "index", "--store", store, "--json", "--quiet"]
        if args.model:
            cmd += ["--model", args.model]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc, index_wall = run(cmd + [corpus_path])
        # Exit 1 with a summary: some documents failed (named in it) and the rest are indexed.
        try:
            summary = json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise SystemExit(f"embedrag index failed ({proc.returncode}): {proc.stderr.strip()}")
        if summary.get("failed"):
            print(f"warning: {summary['failed']} documents not indexed; first: {summary.get('first_failure')}", file=sys.stderr)

        result = {
            "data_set": os.path.abspath(args.beir_dir),
            "split": args.split,
            "documents": documents,
            "queries": len(asked),
            "search_k": args.search_k,
            "index": {
                "wall_seconds": round(index_wall, 3),
                "seconds": summary.get("seconds"),
                "documents": summary.get("indexed"),
                "failed": summary.get("failed"),
                "chunks": summary.get("chunks"),
                "tokens": summary.get("tokens"),
                "tokens_per_second": round(summary.get("tokens_per_second", 0)),
            },
            "modes": {},
        }
        for mode in args.modes:
            base = [cli, "search", "--store", store, "--json", "-k", str(args.search_k), "--mode", mode]
            if args.model:
                base += ["--model", args.model]
            if args.threads:
                base += ["--threads", str(args.threads)]
            proc, startup = run(base + ["--queries", empty_path])
            if proc.returncode:
                raise SystemExit(f"embedrag search --mode {mode} failed: {proc.stderr.strip()}")
            out_path = os.path.join(work, f"results-{mode}.jsonl")
            proc, wall = run(base + ["--queries", queries_path], out_path)
            if proc.returncode:
                raise SystemExit(f"embedrag search --mode {mode} failed: {proc.stderr.strip()}")
            rankings = {}
            with open(out_path, encoding="utf-8") as f:
                lines = f.read().splitlines()
            if len(lines) != len(asked):
                raise SystemExit(f"search --mode {mode}: {len(lines)} answers for {len(asked)} queries")
            for qid, line in zip(asked, lines):
                hits = json.loads(line)["results"]
                ranking = document_ranking(h["document"] for h in hits)
                if not args.keep_identical_ids:
                    ranking = [d for d in ranking if d != qid]
                rankings[qid] = ranking
            scores = score_run(rankings, qrels)
            scores["wall_seconds"] = round(wall, 3)
            scores["ms_per_query"] = round(1000 * max(wall - startup, 0) / max(len(asked), 1), 2)
            scores["documents_per_query"] = round(sum(len(r) for r in rankings.values()) / max(len(rankings), 1), 1)
            result["modes"][mode] = scores
        return result
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def print_table(result):
    ix = result["index"]
    print(f"{result['data_set']} ({result['split']}): {result['documents']} documents, {result['queries']} queries")
    print(
        f"index: {ix['wall_seconds']:.1f} s wall ({ix['chunks']} chunks, {ix['tokens']} tokens, "
        f"{ix['tokens_per_second']} tokens/s)"
    )
    print(f"{'mode':<8} {'nDCG@10':>8} {'R@10':>7} {'R@100':>7} {'MRR@10':>7} {'ms/query':>9} {'docs/query':>11}")
    for mode, s in result["modes"].items():
        print(
            f"{mode:<8} {s['ndcg@10']:8.4f} {s['recall@10']:7.4f} {s['recall@100']:7.4f} {s['mrr@10']:7.4f} "
            f"{s['ms_per_query']:9.2f} {s['documents_per_query']:11.1f}"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("beir_dir", nargs="?", help="folder with corpus.jsonl, queries.jsonl, qrels/")
    ap.add_argument("--split", default="test", help="qrels/SPLIT.tsv (default: test)")
    ap.add_argument("--cli", help=f"the embedrag command (default: $EMBEDRAG_CLI, else {' or '.join(CLI_CANDIDATES)})")
    ap.add_argument("--model", help="model folder for index and search (default: embedrag's)")
    ap.add_argument("--threads", type=int, help="passed to index and search")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated (default: all three)")
    ap.add_argument("--search-k", type=int, default=100, help="chunks asked per query (default: 100)")
    ap.add_argument("--max-queries", type=int, default=0, help="ask only the first N judged queries")
    ap.add_argument("--keep-identical-ids", action="store_true", help="keep a result whose id is the query's")
    ap.add_argument("--work-dir", help="keep the store and the runs here (default: a temporary folder)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--self-test", action="store_true", help="check the metric code and exit")
    args = ap.parse_args()
    if args.self_test:
        sys.exit(1 if self_test() else 0)
    if not args.beir_dir:
        ap.error("give a BEIR folder")
    args.modes = [m for m in args.modes.split(",") if m]
    for m in args.modes:
        if m not in MODES:
            ap.error(f"--modes: {m} is not one of {', '.join(MODES)}")
    result = evaluate(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
