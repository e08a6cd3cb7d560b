#!/usr/bin/env python3
"""Times the vector-search peers embedrag is measured against (faiss, usearch, sqlite-vec, numpy)
on the same vectors as `embedrag bench --search N --dim D`: the latency of one query, throughput
with all queries in one call, and recall@10 against the exact top 10. See bench/peers/README.md.

    python bench/peers/search_peers.py --generate clustered --n 100000 --dim 384 --out /tmp/c100k
    python bench/peers/search_peers.py --vectors /tmp/c100k.vectors.f32 \
        --queries /tmp/c100k.queries.f32 --dim 384 --threads 1,2 --json out.json

Vector files are raw little-endian float32, row-major, n x dim, no header. Every thread count runs
in its own worker process (OMP_NUM_THREADS / OPENBLAS_NUM_THREADS set before numpy and faiss are
loaded, faiss.omp_set_num_threads and usearch's `threads=` set too), and inside it the peers run
one after the other. This is only a driver of the peers' public Python APIs.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PEERS = ["faiss", "usearch", "sqlite-vec", "numpy"]
CANDIDATES = [100, 1000, 3000]  # 1-bit codes: Hamming candidates rescored in float32
WARMUP = 20  # queries before the timed single queries (taken from the end of the query file)
SINGLE_QUERIES = 200
BATCH_QUERIES = 1000
# A peer whose single queries are slow (sqlite-vec at 1M) stops after this many seconds of them
# (but never before MIN_SINGLE queries); its batch is cut so that one call takes about MAX_BATCH_S.
MAX_SINGLE_S = 60.0
MIN_SINGLE = 30
MAX_BATCH_S = 30.0
BATCH_REPS = 3  # a batch call shorter than BATCH_REPEAT_BELOW_S is timed this many times (median)
BATCH_REPEAT_BELOW_S = 3.0
HNSW_MAX_N = 100_000  # usearch's HNSW index is built only up to this many vectors
GT_K = 10
CLUSTERS = 1000
SPREAD = 1.0  # clustered: |noise| / |center|; two points of one cluster have a cosine of ~0.5


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def read_f32(path, dim):
    import numpy as np

    size = os.path.getsize(path)
    if size % (4 * dim):
        sys.exit(f"{path}: {size} bytes is not a whole number of {dim}-float32 rows")
    return np.fromfile(path, dtype="<f4").reshape(-1, dim)


# ---------------------------------------------------------------- synthetic vectors


def generate(args):
    """Writes PREFIX.vectors.f32 (n x dim) and PREFIX.queries.f32 (queries_n x dim).

    uniform: standard gaussian rows, L2-normalized (uniform on the unit sphere).
    clustered: CLUSTERS centers uniform on the unit sphere; a row is a center picked uniformly at
    random plus gaussian noise of norm ~SPREAD (per coordinate sd SPREAD/sqrt(dim)), normalized.
    Queries are drawn the same way with their own random numbers: never copies of corpus rows.
    """
    import numpy as np

    rng = np.random.default_rng(args.seed)
    dim = args.dim

    def normalized(a):
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        return a

    centers = None
    if args.generate == "clustered":
        centers = normalized(rng.standard_normal((CLUSTERS, dim), dtype=np.float32))

    def rows(count):
        if centers is None:
            return normalized(rng.standard_normal((count, dim), dtype=np.float32))
        pick = rng.integers(0, len(centers), count)
        noise = rng.standard_normal((count, dim), dtype=np.float32)
        noise *= np.float32(args.spread / np.sqrt(dim))
        return normalized(centers[pick] + noise)

    paths = {}
    for name, count in (("vectors", args.n), ("queries", args.queries_n)):
        path = f"{args.out}.{name}.f32"
        with open(path, "wb") as f:
            for start in range(0, count, 65536):
                f.write(rows(min(65536, count - start)).astype("<f4").tobytes())
        paths[name] = path
        print(f"wrote {path}: {count} x {dim} float32 ({args.generate}, seed {args.seed})")
    return paths


# ---------------------------------------------------------------- exact top 10


def exact_top_k(X, Q, k):
    """The exact top-k inner products of every query, in float64 (numpy), so that the reference
    does not share float32 rounding with any peer. Returns an m x k int64 array, best first."""
    import numpy as np

    Q64 = Q.astype(np.float64)
    best_s = np.full((len(Q), k), -np.inf)
    best_i = np.zeros((len(Q), k), dtype=np.int64)
    step = 65536
    for start in range(0, len(X), step):
        S = Q64 @ X[start : start + step].astype(np.float64).T  # m x chunk
        kk = min(k, S.shape[1])
        part = np.argpartition(-S, kk - 1, axis=1)[:, :kk]
        s = np.concatenate([best_s, np.take_along_axis(S, part, axis=1)], axis=1)
        i = np.concatenate([best_i, part + start], axis=1)
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(s, top, axis=1)
        best_i = np.take_along_axis(i, top, axis=1)
    return best_i


def recall_at_k(found, truth, k=GT_K):
    hits = sum(len(set(map(int, f[:k])) & set(map(int, t[:k]))) for f, t in zip(found, truth))
    return hits / (k * len(truth))


# ---------------------------------------------------------------- peers
#
# Every setup returns (build_s, single, batch, info): single(q) takes one query (dim,) and returns
# its top-10 row numbers; batch(Q) takes an m x dim array and returns m x 10 row numbers.


def top_k_of_scores(scores, k):
    import numpy as np

    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part])]


def setup_numpy(X, k, threads):
    import numpy as np

    def single(q):
        return top_k_of_scores(X @ q, k)

    def batch(Q):
        out = np.empty((len(Q), k), dtype=np.int64)
        for s in range(0, len(Q), 64):  # 64 x 1M float32 scores is 256 MB
            S = Q[s : s + 64] @ X.T
            part = np.argpartition(-S, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(S, part, axis=1), axis=1)
            out[s : s + 64] = np.take_along_axis(part, order, axis=1)
        return out

    yield "matvec-argpartition", None, 0.0, single, batch, {}


def setup_faiss(X, k, threads):
    import faiss
    import numpy as np

    faiss.omp_set_num_threads(threads)
    dim = X.shape[1]

    t = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(X)
    build = time.perf_counter() - t
    yield (
        "flat-ip",
        None,
        build,
        lambda q: flat.search(q[None, :], k)[1][0],
        lambda Q: flat.search(Q, k)[1],
        {},
    )
    del flat

    t = time.perf_counter()
    sq = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    sq.train(X)
    sq.add(X)
    build = time.perf_counter() - t
    yield (
        "sq8-ip",
        None,
        build,
        lambda q: sq.search(q[None, :], k)[1][0],
        lambda Q: sq.search(Q, k)[1],
        {"memory_mb": sq.ntotal * sq.code_size / 2**20},
    )
    del sq

    # 1-bit codes: the sign of every coordinate (of the vector, or of the vector minus the corpus
    # mean), Hamming distance in IndexBinaryFlat for C candidates, then the candidates' exact
    # float32 inner products in numpy. The timed call is the whole pipeline, query packing included.
    mean = X.mean(axis=0, dtype=np.float64).astype(np.float32)
    for variant, center in (("binary-sign", None), ("binary-centered", mean)):
        t = time.perf_counter()
        codes = faiss.IndexBinaryFlat(dim)
        for s in range(0, len(X), 65536):
            rows = X[s : s + 65536] if center is None else X[s : s + 65536] - center
            codes.add(np.packbits(rows > 0, axis=1))
        build = time.perf_counter() - t

        def pack(Q, center=center):
            return np.packbits((Q if center is None else Q - center) > 0, axis=1)

        for c in CANDIDATES:
            if c >= len(X):
                continue

            def single(q, codes=codes, c=c, pack=pack):
                cand = codes.search(pack(q[None, :]), c)[1][0]
                return cand[top_k_of_scores(X[cand] @ q, k)]

            def batch(Q, codes=codes, c=c, pack=pack):
                cand = codes.search(pack(Q), c)[1]
                out = np.empty((len(Q), k), dtype=np.int64)
                step = max(1, 16384 // c)  # step x c x dim float32 gathered at once
                for s in range(0, len(Q), step):
                    I = cand[s : s + step]
                    S = np.matmul(X[I], Q[s : s + step, :, None])[:, :, 0]
                    part = np.argpartition(-S, k - 1, axis=1)[:, :k]
                    order = np.argsort(-np.take_along_axis(S, part, axis=1), axis=1)
                    out[s : s + step] = np.take_along_axis(I, np.take_along_axis(part, order, 1), 1)
                return out

            yield variant, c, build, single, batch, {"memory_mb": len(X) * dim / 8 / 2**20}
        del codes


def quantize_i8(A):
    """Per-row scale so the largest |coordinate| is 127. Cosine does not see the scale."""
    import numpy as np

    A = np.atleast_2d(A)
    scale = np.float32(127.0) / np.maximum(np.abs(A).max(axis=1, keepdims=True), 1e-30)
    return np.rint(A * scale).astype(np.int8)


def setup_usearch(X, k, threads, hnsw_max_n=HNSW_MAX_N):
    from usearch.index import Index, MetricKind, search

    yield (
        "exact-f32-ip",
        None,
        0.0,
        lambda q: search(X, q, k, MetricKind.IP, exact=True, threads=threads).keys,
        lambda Q: search(X, Q, k, MetricKind.IP, exact=True, threads=threads).keys,
        {},
    )

    # int8: usearch's exact search takes the int8 rows as given, so they are quantized here
    # (per-row scale to +-127) and compared by cosine; the query's quantization is timed.
    t = time.perf_counter()
    Xi = quantize_i8(X)
    build = time.perf_counter() - t
    yield (
        "exact-i8-cos",
        None,
        build,
        lambda q: search(Xi, quantize_i8(q), k, MetricKind.Cos, exact=True, threads=threads).keys[0],
        lambda Q: search(Xi, quantize_i8(Q), k, MetricKind.Cos, exact=True, threads=threads).keys,
        {"memory_mb": Xi.nbytes / 2**20},
    )
    del Xi

    if len(X) <= hnsw_max_n:
        import numpy as np

        # HNSW with usearch's defaults (connectivity 16, expansion_add 128, expansion_search 64).
        t = time.perf_counter()
        index = Index(ndim=X.shape[1], metric="ip", dtype="f32")
        index.add(np.arange(len(X)), X, threads=threads)
        build = time.perf_counter() - t
        yield (
            "hnsw-f32-ip",
            None,
            build,
            lambda q: index.search(q, k, threads=threads).keys,
            lambda Q: index.search(Q, k, threads=threads).keys,
            {"memory_mb": index.memory_usage / 2**20, "isa": index.hardware_acceleration},
        )
        del index


def sqlite_connection():
    """A connection that can load sqlite-vec: the standard library's sqlite3 when this Python was
    built with extension loading, otherwise apsw (PyPI; it bundles its own SQLite)."""
    import sqlite3

    import sqlite_vec

    con = sqlite3.connect(":memory:")
    if hasattr(con, "enable_load_extension"):
        con.enable_load_extension(True)
        sqlite_vec.load(con)
        con.enable_load_extension(False)
        return con, "sqlite3 (stdlib)", sqlite3.sqlite_version
    import apsw

    con = apsw.Connection(":memory:")
    con.enable_load_extension(True)
    con.load_extension(sqlite_vec.loadable_path())
    return con, f"apsw {apsw.apsw_version()}", apsw.sqlite_lib_version()


def setup_sqlite_vec(X, k, threads):
    import numpy as np

    con, binding, version = sqlite_connection()
    (debug,) = con.execute("select vec_debug()").fetchone()
    flags = next((ln.split(":", 1)[1].strip() for ln in debug.splitlines() if "flags" in ln), "")
    info = {
        "binding": binding,
        "sqlite": version,
        "build_flags": flags or "none (no SIMD)",
    }
    dim = X.shape[1]
    t = time.perf_counter()
    con.execute(f"create virtual table v using vec0(embedding float[{dim}])")  # L2 distance
    con.execute("begin")
    for s in range(0, len(X), 10000):
        con.executemany(
            "insert into v(rowid, embedding) values (?, ?)",
            ((s + i, r.tobytes()) for i, r in enumerate(X[s : s + 10000])),
        )
    con.execute("commit")
    build = time.perf_counter() - t
    sql = "select rowid from v where embedding match ? and k = ? order by distance"

    def single(q):
        return np.array([r[0] for r in con.execute(sql, (q.astype("<f4").tobytes(), k))])

    # No batch query: vec0 answers one KNN query per statement.
    yield "vec0-knn-l2", None, build, single, None, info
    con.close()


SETUPS = {
    "faiss": setup_faiss,
    "usearch": setup_usearch,
    "sqlite-vec": setup_sqlite_vec,
    "numpy": setup_numpy,
}


# ---------------------------------------------------------------- measurement


class ForeignLoad:
    """How many CPUs other processes kept busy meanwhile: the machine's busy time (/proc/stat)
    less this process's own (os.times), over the wall time. The lock in the README keeps other
    benchmarks out, not builds and tests; on the 2-vCPU VM a figure near 1 means the second
    thread had no core of its own."""

    @staticmethod
    def _busy():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait

    def __init__(self):
        t = os.times()
        self.start = (self._busy(), t.user + t.system, time.perf_counter())

    def cpus(self):
        busy0, own0, wall0 = self.start
        busy1 = self._busy()
        if busy0 is None or busy1 is None:
            return None
        t = os.times()
        return max(0.0, (busy1 - busy0 - (t.user + t.system - own0)) / (time.perf_counter() - wall0))


def measure(single, batch, Q, truth, args):
    import numpy as np

    m = len(Q)
    load = ForeignLoad()
    n_single = min(args.single, m)
    for q in Q[m - min(WARMUP, m) :]:
        single(q)
    times, found = [], []
    start = time.perf_counter()
    for i in range(n_single):
        t = time.perf_counter()
        found.append(single(Q[i]))
        times.append(time.perf_counter() - t)
        if i + 1 >= MIN_SINGLE and time.perf_counter() - start > args.max_single_s:
            break
    ms = np.array(times) * 1e3
    row = {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "single_n": len(times),
        "batch_qps": None,
        "batch_n": None,
    }
    if batch is None:
        row["recall_at_10"] = recall_at_k(found, truth[: len(found)])
        row["foreign_cpus"] = load.cpus()
        return row
    nb = min(args.batch, m)
    if np.median(times) * nb > args.max_batch_s:
        nb = max(MIN_SINGLE, int(args.max_batch_s / np.median(times)))
    B = np.ascontiguousarray(Q[:nb])
    batch(np.ascontiguousarray(Q[m - min(WARMUP, m) :]))  # warm-up
    calls, result = [], None
    while True:
        t = time.perf_counter()
        result = batch(B)
        calls.append(time.perf_counter() - t)
        if len(calls) >= BATCH_REPS or calls[0] >= BATCH_REPEAT_BELOW_S:
            break
    row["batch_qps"] = nb / float(np.median(calls))
    row["batch_n"] = nb
    row["recall_at_10"] = recall_at_k(np.asarray(result), truth[:nb])
    row["foreign_cpus"] = load.cpus()
    return row


def worker(args):
    """Runs every chosen peer at one thread count; writes a JSON list of result rows."""
    import numpy as np

    X = read_f32(args.vectors, args.dim)
    Q = read_f32(args.queries, args.dim)
    truth = np.load(args.worker_truth)
    rows = []
    for peer in args.only:
        if peer == "sqlite-vec" and args.worker_threads != args.threads[0]:
            continue  # single-threaded: timed once, at the first thread count
        kwargs = {"hnsw_max_n": args.hnsw_max_n} if peer == "usearch" else {}
        try:
            for mode, cand, build, single, batch, info in SETUPS[peer](
                X, args.k, args.worker_threads, **kwargs
            ):
                row = {"peer": peer, "mode": mode, "threads": args.worker_threads,
                       "candidates": cand, "build_s": build}
                row.update(measure(single, batch, Q, truth, args))
                row.update(info)
                rows.append(row)
                print(format_row(row), file=sys.stderr, flush=True)
        except ImportError as e:
            print(f"{peer}: not installed ({e})", file=sys.stderr)
    with open(args.worker_out, "w") as f:
        json.dump(rows, f)


def versions():
    from importlib import metadata

    import numpy as np

    out = {}
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        out["numpy_blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception:
        pass
    try:
        import faiss

        out["faiss_compile_options"] = faiss.get_compile_options()
    except ImportError:
        pass
    for name in ("numpy", "faiss-cpu", "usearch", "sqlite-vec", "apsw"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------- report

HEADER = (f"{'peer':<11} {'mode':<21} {'thr':>3} {'C':>5} {'p50 ms':>9} {'p99 ms':>9} "
          f"{'batch q/s':>10} {'recall@10':>9} {'build s':>8} {'other':>5}")


def format_row(r):
    def num(v, fmt):
        return format(v, fmt) if v is not None else "-"

    text = (f"{r['peer']:<11} {r['mode']:<21} {r['threads']:>3} {num(r['candidates'], 'd'):>5} "
            f"{r['p50_ms']:>9.3f} {r['p99_ms']:>9.3f} {num(r['batch_qps'], '.0f'):>10} "
            f"{r['recall_at_10']:>9.4f} {num(r['build_s'], '.2f'):>8} "
            f"{num(r.get('foreign_cpus'), '.2f'):>5}")
    notes = []
    if r.get("single_n") is not None and r["single_n"] < SINGLE_QUERIES:
        notes.append(f"{r['single_n']} single")
    if r.get("batch_n") is not None and r["batch_n"] < BATCH_QUERIES:
        notes.append(f"batch of {r['batch_n']}")
    if r["peer"] == "sqlite-vec":
        notes.append("no batch call")
    return text + (f"  ({', '.join(notes)})" if notes else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", help="corpus: raw float32, n x dim")
    ap.add_argument("--queries", help="queries: raw float32, m x dim (not rows of the corpus)")
    ap.add_argument("--dim", type=int, required=True)
    ap.add_argument("--k", type=int, default=GT_K)
    ap.add_argument("--threads", default="1,2", help="comma list, one worker process each")
    ap.add_argument("--only", default=",".join(PEERS), help="comma list of " + ",".join(PEERS))
    ap.add_argument("--json", nargs="?", const="-", metavar="FILE",
                    help="write the results as JSON to FILE (or stdout without FILE)")
    ap.add_argument("--single", type=int, default=SINGLE_QUERIES, help="timed single queries")
    ap.add_argument("--batch", type=int, default=BATCH_QUERIES, help="queries in the batch call")
    ap.add_argument("--max-single-s", type=float, default=MAX_SINGLE_S)
    ap.add_argument("--max-batch-s", type=float, default=MAX_BATCH_S)
    ap.add_argument("--hnsw-max-n", type=int, default=HNSW_MAX_N,
                    help="build usearch's HNSW index only up to this many vectors (0: never)")
    gen = ap.add_argument_group("generate vectors instead of timing")
    gen.add_argument("--generate", choices=["uniform", "clustered"])
    gen.add_argument("--n", type=int, default=100_000)
    gen.add_argument("--queries-n", type=int, default=BATCH_QUERIES + WARMUP)
    gen.add_argument("--seed", type=int, default=1)
    gen.add_argument("--spread", type=float, default=SPREAD)
    gen.add_argument("--out", help="file prefix: writes PREFIX.vectors.f32, PREFIX.queries.f32")
    ap.add_argument("--worker-threads", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--worker-truth", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.threads = [int(t) for t in str(args.threads).split(",") if t]
    args.only = [p for p in args.only.split(",") if p]
    for p in args.only:
        if p not in SETUPS:
            ap.error(f"unknown peer {p!r}; known: {', '.join(PEERS)}")

    if args.generate:
        if not args.out:
            ap.error("--generate needs --out PREFIX")
        generate(args)
        return
    if not args.vectors or not args.queries:
        ap.error("--vectors and --queries are needed (or --generate)")
    if args.worker_threads:
        worker(args)
        return

    import numpy as np

    X = read_f32(args.vectors, args.dim)
    Q = read_f32(args.queries, args.dim)
    t = time.perf_counter()
    truth = exact_top_k(X, Q, args.k)
    truth_s = time.perf_counter() - t
    n, m = len(X), len(Q)
    del X
    print(f"{cpu_model()}, {os.cpu_count()} CPUs; n {n}, m {m} queries, dim {args.dim}; "
          f"exact top-{args.k} in float64 numpy ({truth_s:.1f} s)", file=sys.stderr)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        truth_path = os.path.join(tmp, "truth.npy")
        np.save(truth_path, truth)
        print(HEADER, file=sys.stderr)
        for threads in args.threads:
            env = dict(os.environ)
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                env[var] = str(threads)
            out = os.path.join(tmp, f"rows-{threads}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--vectors", args.vectors,
                   "--queries", args.queries, "--dim", str(args.dim), "--k", str(args.k),
                   "--threads", ",".join(map(str, args.threads)), "--only", ",".join(args.only),
                   "--single", str(args.single), "--batch", str(args.batch),
                   "--max-single-s", str(args.max_single_s), "--max-batch-s",
                   str(args.max_batch_s), "--hnsw-max-n", str(args.hnsw_max_n),
                   "--worker-threads", str(threads), "--worker-truth", truth_path,
                   "--worker-out", out]
            subprocess.run(cmd, env=env, check=True)
            with open(out) as f:
                results.extend(json.load(f))

    table = sys.stderr if args.json == "-" else sys.stdout  # keep stdout for the JSON
    print(HEADER, file=table)
    for r in results:
        print(format_row(r), file=table)
    report = {
        "machine": cpu_model(),
        "cpus": os.cpu_count(),
        "simd": [f for f in cpu_flags() if f.startswith(("avx", "amx")) or f == "fma"],
        "n": n,
        "dim": args.dim,
        "k": args.k,
        "queries": m,
        "data": {"vectors": os.path.basename(args.vectors),
                 "queries": os.path.basename(args.queries)},
        "ground_truth": "exact top-k by inner product, float64 numpy",
        "versions": versions(),
        "python": sys.version.split()[0],
        "results": results,
    }
    if args.json == "-":
        json.dump(report, sys.stdout, indent=1)
        print()
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
