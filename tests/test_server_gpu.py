#!/usr/bin/env python3
"""`embedrag serve` on a GPU that fails mid-load: every request is still answered, on the CPU,
with vectors within the GPU's tolerance of the CPU's (cosine >= 0.9995), and /info names the
failed GPU. Runs where nvidia-smi sees a GPU (ctest label gpu); elsewhere it passes saying
"skipped: no CUDA device". Python's standard library only, so it runs on the GPU machine as is.

Env: EMBEDRAG_CLI (the embedrag binary), EMBEDRAG_SOURCE_DIR (the source tree; the model is
models/all-MiniLM-L6-v2 and the texts ../shared/data/stsb-en-dev.csv beside it)."""
import concurrent.futures
import json
import math
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

COSINE_MIN = 0.9995  # a GPU's fp16 vectors against the CPU's fp32 (include/embedrag.h)
FAIL_AFTER = 12      # device 0 fails every batch after its first 12 (the open's timing included)
REQUESTS = 48        # 100-text requests, 8 at a time: several times the batches before the fault

failures = 0


def check(name, ok, detail=""):
    global failures
    print(("ok - " if ok else "not ok - ") + name + ("" if ok else ": " + detail), flush=True)
    failures += not ok


def post(url, body, timeout=120):
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def main():
    try:
        gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    except OSError:
        gpu = False
    if not gpu:
        print("skipped: no CUDA device (nvidia-smi sees none)")
        return 0
    cli = os.environ["EMBEDRAG_CLI"]
    src = os.environ["EMBEDRAG_SOURCE_DIR"]
    model = os.path.join(src, "models", "all-MiniLM-L6-v2")
    data = os.path.join(src, "..", "shared", "data", "stsb-en-dev.csv")
    sentences = []
    for line in open(data, encoding="utf-8"):
        parts = line.rstrip("\n").rsplit(",", 2)
        if len(parts) == 3 and parts[0] not in sentences:
            sentences.append(parts[0])
        if len(sentences) == 400:
            break
    work = tempfile.mkdtemp(prefix="embedrag-server-gpu-")
    texts_path = os.path.join(work, "texts.txt")
    with open(texts_path, "w", encoding="utf-8") as f:
        f.write("\n".join(sentences) + "\n")
    reference = [json.loads(l) for l in subprocess.run(
        [cli, "embed", "--model", model, "--device", "cpu", "--input", texts_path],
        capture_output=True, text=True, check=True).stdout.splitlines()]

    env = dict(os.environ, EMBEDRAG_TEST_CUDA_FAIL_AFTER=str(FAIL_AFTER))
    server = subprocess.Popen([cli, "serve", "--model", model, "--port", "0", "--device", "auto"],
                              stdout=subprocess.PIPE, stderr=open(os.path.join(work, "err"), "w"),
                              text=True, env=env)
    try:
        line = server.stdout.readline()
        check("the server starts", line.startswith("listening on http://"), line)
        base = line.split()[-1]
        with urllib.request.urlopen(base + "/info") as r:
            info = json.loads(r.read())
        gpus = [b for b in info["backends"] if b["name"].startswith("cuda")]
        check("the server opened a GPU backend", bool(gpus), json.dumps(info["backends"]))

        def one(i):
            first = (i * 100) % len(sentences)
            chunk = [sentences[(first + j) % len(sentences)] for j in range(100)]
            status, body = post(base + "/embed", {"inputs": chunk})
            if status != 200:
                return i, status, str(body)[:200], 1.0
            worst = min(cosine(body[j], reference[(first + j) % len(sentences)])
                        for j in range(100))
            return i, status, "", worst

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(REQUESTS)))
        bad = [r for r in results if r[1] != 200]
        check("every request answered 200 while the GPU failed", not bad, str(bad[:3]))
        worst = min(r[3] for r in results)
        check("vectors within cosine %.4f of the CPU's (worst %.6f)" % (COSINE_MIN, worst),
              worst >= COSINE_MIN)
        with urllib.request.urlopen(base + "/info") as r:
            info = json.loads(r.read())
        failed = [b["name"] for b in info["backends"] if b.get("failed")]
        check("/info names the failed GPU (%s)" % failed, "cuda:0" in failed,
              json.dumps(info["backends"]))
        status, body = post(base + "/v1/embeddings", {"input": sentences[:3]})
        check("requests after the failure are answered (on the CPU)", status == 200, str(body))
        if status == 200:
            worst = min(cosine(d["embedding"], reference[d["index"]]) for d in body["data"])
            check("and equal the CPU's vectors (cosine %.7f)" % worst, worst >= 0.99999)
    finally:
        server.terminate()
        rc = server.wait(timeout=60)
    check("the server exits 0 on SIGTERM", rc == 0, "exit %s" % rc)
    err = open(os.path.join(work, "err")).read()
    warnings = [l for l in err.splitlines() if "warning" in l.lower()]
    check("one warning line names the failure (%d)" % len(warnings), len(warnings) == 1, err[-500:])
    print("# %d checks failed" % failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
