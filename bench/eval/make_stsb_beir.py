#!/usr/bin/env python3
"""Builds a small retrieval set in BEIR's layout from the STS Benchmark dev set.

The STS-B csv (no header: sentence1, sentence2, score 0-5) pairs sentences that human raters
scored for sameness of meaning. A pair scored 4.0 or more says "these two mean (nearly) the
same": that is a query and its answer. The set, built the same way from the same file every time:

  queries   every distinct sentence1 of a pair scored >= --min-score (4.0) whose sentence2 is a
            different string; ids q0001, q0002, ... in the order of first appearance in the file.
  corpus    every distinct sentence of the file (either column) that is not a query's text, so a
            query cannot find itself; ids d0001, d0002, ... in order of first appearance. The
            other ~2,600 sentences are the distractors, many on the same topics (STS-B pairs
            are drawn from news, captions and forums, and pairs share subjects).
  qrels     for each query, the sentence2 of each of its pairs scored >= --min-score, graded
            2 where the pair scored >= 4.5 (raters: equivalent) and 1 below (mostly equivalent).
            A pair whose sentence2 is itself a query text (so not in the corpus) is dropped.

`title` is empty. Sentences of other pairs that also mean the same are unjudged and so count as
misses: this set measures a retriever against the raters' pairs, it is no substitute for a
published benchmark. --pairs N uses only the first N rows of the csv (a smaller corpus for slow
builds); the rules above then apply to those rows.

usage: make_stsb_beir.py [--csv FILE] [--pairs N] [--min-score S] OUTDIR
Writes OUTDIR/corpus.jsonl, OUTDIR/queries.jsonl and OUTDIR/qrels/test.tsv, and prints counts.
Python 3 standard library only.
"""

import argparse
import csv
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# The shared data folder sits beside the project's checkout (see shared/data/README.md).
DEFAULT_CSV = os.path.join(HERE, "..", "..", "..", "shared", "data", "stsb-en-dev.csv")
# STS-B's scale: 5 = completely equivalent, 4 = mostly equivalent (unimportant details differ).
DEFAULT_MIN_SCORE = 4.0
HIGH_GRADE_SCORE = 4.5


def read_pairs(path, limit):
    pairs = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            if len(row) != 3:
                raise SystemExit(f"{path}: line {len(pairs) + 1}: want 3 fields, got {len(row)}")
            pairs.append((row[0].strip(), row[1].strip(), float(row[2])))
            if limit and len(pairs) >= limit:
                break
    return pairs


def build(pairs, min_score):
    query_ids = {}  # text -> id
    for s1, s2, score in pairs:
        if score >= min_score and s1 != s2 and s1 not in query_ids:
            query_ids[s1] = f"q{len(query_ids) + 1:04d}"
    doc_ids = {}
    for s1, s2, _ in pairs:
        for s in (s1, s2):
            if s and s not in query_ids and s not in doc_ids:
                doc_ids[s] = f"d{len(doc_ids) + 1:04d}"
    qrels = {}  # query id -> {doc id: grade}
    dropped = 0
    for s1, s2, score in pairs:
        if s1 not in query_ids or score < min_score or s1 == s2:
            continue
        if s2 not in doc_ids:
            dropped += 1
            continue
        grade = 2 if score >= HIGH_GRADE_SCORE else 1
        judged = qrels.setdefault(query_ids[s1], {})
        judged[doc_ids[s2]] = max(grade, judged.get(doc_ids[s2], 0))
    return query_ids, doc_ids, qrels, dropped


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--csv", default=DEFAULT_CSV, help="the STS-B csv (default: %(default)s)")
    ap.add_argument("--pairs", type=int, default=0, help="use only the first N rows (0: all)")
    ap.add_argument("--min-score", type=float, default=DEFAULT_MIN_SCORE)
    args = ap.parse_args()

    pairs = read_pairs(args.csv, args.pairs)
    query_ids, doc_ids, qrels, dropped = build(pairs, args.min_score)
    os.makedirs(os.path.join(args.outdir, "qrels"), exist_ok=True)
    with open(os.path.join(args.outdir, "corpus.jsonl"), "w", encoding="utf-8") as f:
        for text, did in doc_ids.items():
            f.write(json.dumps({"_id": did, "title": "", "text": text}) + "\n")
    with open(os.path.join(args.outdir, "queries.jsonl"), "w", encoding="utf-8") as f:
        for text, qid in query_ids.items():
            if qid in qrels:
                f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    with open(os.path.join(args.outdir, "qrels", "test.tsv"), "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid in sorted(qrels):
            for did, grade in sorted(qrels[qid].items()):
                f.write(f"{qid}\t{did}\t{grade}\n")
    judgments = sum(len(j) for j in qrels.values())
    print(
        f"{args.outdir}: {len(pairs)} pairs -> {len(qrels)} queries, {len(doc_ids)} documents, "
        f"{judgments} judgments ({dropped} pairs dropped: answer is itself a query)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
