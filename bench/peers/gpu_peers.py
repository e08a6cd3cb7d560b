#!/usr/bin/env python3
"""PyTorch on the GPU, for the CUDA backend's table: GPU time of a BERT encoder forward pass.

transformers' BertModel with SDPA attention in fp16, random weights of the shapes the GPU issue
names (12 x 384, 6 x 384, 12 x 768), eager and, for the 12 x 384 shape, compiled with
torch.compile(mode="reduce-overhead") (CUDA graphs). Inputs are already on the GPU, so the time
is the forward pass alone, from CUDA events, median of repeated calls after warm-up. Mixed
lengths are padded to the batch's longest text, as a tokenizer with padding=True does; tokens/s
counts real tokens. Run by scripts/gpu-run.sh in the same call as embedrag_backend_bench.

usage: gpu_peers.py [--json FILE] [--quick] [--no-compile]
"""
import argparse
import json
import statistics
import sys
import time

import torch
from transformers import BertConfig, BertModel

SHAPES = {  # name: (layers, hidden, heads)
    "12x384": (12, 384, 12),
    "6x384": (6, 384, 12),
    "12x768": (12, 768, 12),
}
# (texts, tokens per text; 0 = mixed 32-256)
CELLS = [(1, 16), (10, 16), (100, 50), (1000, 128), (1000, 0)]
COMPILED_CELLS = [(1, 16), (100, 50), (1000, 128)]


def mixed_lengths(n):
    """The lengths embedrag bench uses for mixed texts: 32 + (97 i mod 225)."""
    return [32 + (97 * i) % 225 for i in range(n)]


def inputs(texts, tokens, vocab, device):
    lengths = [tokens] * texts if tokens else mixed_lengths(texts)
    width = max(lengths)
    g = torch.Generator().manual_seed(texts * 1000 + tokens)
    ids = torch.randint(1000, vocab, (texts, width), generator=g)
    mask = torch.zeros(texts, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids * mask
    return ids.to(device), mask.to(device), sum(lengths)


def gpu_time(fn, min_seconds, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    start_wall = time.perf_counter()
    while len(times) < 10 or (time.perf_counter() - start_wall < min_seconds and len(times) < 2000):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times), len(times)


def model_for(shape, device):
    layers, hidden, heads = SHAPES[shape]
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden,
                        max_position_embeddings=512, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = BertModel(config, add_pooling_layer=False).eval().half().to(device)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="shorter timing")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    args = parser.parse_args()
    device = torch.device("cuda")
    min_seconds = 0.2 if args.quick else 0.5
    results = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cells": [],
    }
    for shape in SHAPES:
        model = model_for(shape, device)
        variants = [("eager", model)]
        if shape == "12x384" and not args.no_compile:
            variants.append(("compiled", torch.compile(model, mode="reduce-overhead")))
        for label, m in variants:
            for texts, tokens in CELLS:
                if label == "compiled" and (texts, tokens) not in COMPILED_CELLS:
                    continue
                ids, mask, real = inputs(texts, tokens, 30522, device)
                started = time.perf_counter()
                with torch.inference_mode():
                    seconds, reps = gpu_time(lambda: m(input_ids=ids, attention_mask=mask),
                                             min_seconds, warmup=5 if label == "compiled" else 3)
                cell = {"shape": shape, "variant": label, "texts": texts,
                        "tokens_per_text": tokens or "32-256", "tokens": real,
                        "gpu_ms": seconds * 1e3, "tokens_per_s": real / seconds, "reps": reps,
                        "wall_s_with_warmup": time.perf_counter() - started}
                results["cells"].append(cell)
                print(f"{shape:7s} {label:8s} {texts:5d} x {str(tokens or '32-256'):>6s}: "
                      f"{seconds * 1e3:9.3f} ms  {real / seconds / 1e6:7.2f} M tok/s", flush=True)
        del model, variants
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
