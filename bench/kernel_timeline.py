#!/usr/bin/env python3
"""Summarize a kernel timeline written by bench/kernel_timeline.c.

A pass is the kernels from one embed_kernel to the next. Only passes with the most common kernel
count are kept (the timed repetitions of one cell; warm-up, calibration and algorithm timing
differ). For those, it prints per pass: the span from the first kernel's start to the last one's
end, the time some kernel was running (busy), the idle gaps between them, and each kernel kind's
time, as medians over the passes.

usage: kernel_timeline.py TIMELINE.csv [--last N]   (N: keep the last N passes; default all)
"""
import statistics
import sys
from collections import Counter, defaultdict


def short_name(mangled):
    """A readable kernel name from an Itanium-mangled one, without a demangler."""
    if not mangled.startswith("_Z"):
        return mangled[:60]
    parts = []
    i = 2
    if mangled[i:i + 1] == "N":
        i += 1
    while i < len(mangled) and mangled[i].isdigit():
        j = i
        while mangled[j].isdigit():
            j += 1
        n = int(mangled[i:j])
        parts.append(mangled[j:j + n])
        i = j + n
        if mangled[i:i + 1] != "" and not mangled[i].isdigit():
            break
    name = "::".join(p for p in parts if p not in ("cute", "cutlass", "cublasLt"))
    return (name or mangled)[:60]


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            fields = line.rstrip("\n").split(",", 6)
            if len(fields) < 7:
                continue
            start, end = int(fields[0]), int(fields[1])
            rows.append((start, end, fields[4], short_name(fields[6])))
    rows.sort()
    return rows


def passes_of(rows):
    out, current = [], []
    for r in rows:
        if r[3].startswith("embed_kernel") and current:
            out.append(current)
            current = []
        current.append(r)
    if current:
        out.append(current)
    return [p for p in out if p[0][3].startswith("embed_kernel")]


def busy_time(kernels):
    total, end = 0, None
    for s, e, _, _ in kernels:
        if end is None or s >= end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def main():
    try:
        summarize()
    except BrokenPipeError:  # piped into head
        pass


def summarize():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    last = None
    if "--last" in sys.argv:
        last = int(sys.argv[sys.argv.index("--last") + 1])
    rows = load(sys.argv[1])
    passes = passes_of(rows)
    if not passes:
        sys.exit("no pass found (no embed_kernel in the timeline)")
    common = Counter(len(p) for p in passes).most_common(1)[0][0]
    kept = [p for p in passes if len(p) == common]
    if last:
        kept = kept[-last:]
    spans = [(p[-1][1] - p[0][0]) / 1e3 for p in kept]
    busy = [busy_time(p) / 1e3 for p in kept]
    per_kind = defaultdict(list)
    counts = Counter(r[3] for r in kept[0])
    for p in kept:
        sums = defaultdict(float)
        for s, e, _, name in p:
            sums[name] += (e - s) / 1e3
        for name, v in sums.items():
            per_kind[name].append(v)
    med = statistics.median
    print(f"{len(kept)} passes of {common} kernels (of {len(passes)} passes)")
    print(f"span {med(spans):.1f} us, busy {med(busy):.1f} us, idle {med(spans) - med(busy):.1f} us "
          f"(medians a pass)")
    print(f"{'kernel':60s} {'n':>4s} {'us a pass':>10s} {'us each':>8s} {'share':>6s}")
    total = med(spans)
    for name, values in sorted(per_kind.items(), key=lambda kv: -med(kv[1])):
        m = med(values)
        print(f"{name:60s} {counts[name]:4d} {m:10.1f} {m / counts[name]:8.2f} {100 * m / total:5.1f}%")
    # one pass's first kernels in order, with the idle time before each: which product is which
    sample = kept[len(kept) // 2]
    print("\nthe middle pass's first kernels: idle before, time, grid, name")
    previous_end = sample[0][0]
    for s, e, grid, name in sample[:16]:
        print(f"{max(0, s - previous_end) / 1e3:8.2f} {(e - s) / 1e3:8.2f}  {grid:>12s}  {name}")
        previous_end = max(previous_end, e)


if __name__ == "__main__":
    main()
