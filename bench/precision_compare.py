#!/usr/bin/env python3
"""Compares `embedrag bench` runs of several configurations, interleaved.

This machine's speed drifts by several percent over minutes, so a ratio between two runs made
one after the other says as much about the drift as about the code. This runs every
configuration once per round, for several rounds, and reports each cell's median tokens/s and
the ratios between configurations, with each round's ratio range.

    bench/precision_compare.py --cli build-release/embedrag --model models/all-MiniLM-L6-v2 \\
        --config fp32:precision=fp32 --config bf16:precision=bf16 \\
        --config bf16-fp32-attention:precision=bf16,EMBEDRAG_CPU_ATTENTION=fp32 --rounds 3

A configuration is NAME:KEY=VALUE,...; `precision`, `threads` and `model` become bench options,
other keys environment variables. Ratios are against the first configuration. --json FILE
writes every run's output.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys


def parse_config(text):
    name, _, rest = text.partition(":")
    options, env = [], {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key in ("precision", "threads", "model"):
            options += [f"--{key}", value]
        else:
            env[key] = value
    return {"name": name, "options": options, "env": env}


def run_bench(args, config):
    command = [args.cli, "bench", "--json", "--model", args.model] + config["options"]
    if args.data:
        command += ["--data", args.data]
    if args.seconds:
        command += ["--seconds", str(args.seconds)]
    env = dict(os.environ, **config["env"])
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cli", required=True, help="the embedrag executable")
    ap.add_argument("--model", required=True, help="model directory")
    ap.add_argument("--config", action="append", required=True, help="NAME:KEY=VALUE,...")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", help="passed to bench --data")
    ap.add_argument("--seconds", type=float, help="passed to bench --seconds")
    ap.add_argument("--json", help="write every run's output here")
    args = ap.parse_args()
    configs = [parse_config(c) for c in args.config]
    runs = {c["name"]: [] for c in configs}
    for r in range(args.rounds):
        for c in configs:
            out = run_bench(args, c)
            runs[c["name"]].append(out)
            print(f"round {r + 1}: {c['name']} ({out.get('kernels')}, {out.get('precision')}) "
                  f"query p50 {out['query_16_tokens']['p50_ms']:.2f} ms", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"configs": args.config, "runs": runs}, f, indent=1)

    names = [c["name"] for c in configs]
    first = runs[names[0]][0]
    print(f"model {first['model']} ({first['layers']} layers), {first['threads']} threads, "
          f"{first['device']}; {args.rounds} interleaved rounds, median tokens/s")
    cells = [(t["tokens_per_text"], t["batch"]) for t in first["throughput"]]

    def rate(run, cell):
        for t in run["throughput"]:
            if (t["tokens_per_text"], t["batch"]) == cell:
                return t["model_tokens_per_s"]
        return float("nan")

    header = "| tokens x batch | " + " | ".join(names)
    header += "".join(f" | {n} / {names[0]} (rounds)" for n in names[1:])
    print(header + " |")
    print("|---" * (1 + len(names) + len(names) - 1) + "|")
    worst = {n: float("inf") for n in names[1:]}
    for cell in cells:
        medians = {n: statistics.median(rate(run, cell) for run in runs[n]) for n in names}
        row = f"| {cell[0]} x {cell[1]} | " + " | ".join(f"{medians[n]:,.0f}" for n in names)
        for n in names[1:]:
            ratio = medians[n] / medians[names[0]]
            per_round = [rate(b, cell) / rate(a, cell) for a, b in zip(runs[names[0]], runs[n])]
            worst[n] = min(worst[n], ratio)
            row += f" | {ratio:.2f}x ({min(per_round):.2f}-{max(per_round):.2f})"
        print(row + " |")
    for n in names:
        q = [run["query_16_tokens"]["p50_ms"] for run in runs[n]]
        print(f"{n}: 16-token query p50 per round " + ", ".join(f"{x:.2f}" for x in q) + " ms")
    for n in names[1:]:
        print(f"{n} / {names[0]}: lowest cell {worst[n]:.2f}x")


if __name__ == "__main__":
    main()
