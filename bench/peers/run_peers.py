#!/usr/bin/env python3
"""Times the peers embedrag is measured against, on this CPU: sentence-transformers on PyTorch
(fp32, and bf16 autocast) and ONNX Runtime (fp32, CPUExecutionProvider, plain and with its BERT
fusions) on the same checkpoint, beside embedrag in fp32 and bf16: a 16-token query's latency, and
throughput at fixed batch sizes and text lengths.
See bench/peers/README.md.

    python bench/peers/run_peers.py --model models/all-MiniLM-L6-v2 --json peers.json
    python bench/peers/run_peers.py --model models/all-MiniLM-L6-v2 --make-texts DIR

Each peer lives in its own worker process (its own peak RSS, thread pools and allocator), and the
peers take turns in slices of about half a second within every measurement, because the shared
development VM's CPU capacity changes from minute to minute: measured one after the other, peers
would be compared across different machines.
"""

import argparse
import csv
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a benchmark must never download anything
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_STSB = os.path.join(REPO, "..", "shared", "data", "stsb-en-dev.csv")
DEFAULT_ONNX_CACHE = os.path.join(REPO, "models", "onnx-cache")  # models/ is ignored by git

# Text files the C bench writes too: name -> exact token count, [CLS] and [SEP] included.
TEXT_FILES = {"q16": 16, "t50": 50, "t128": 128}
TEXT_LINES = 1000  # enough distinct texts for the largest batch
BATCHES = [1, 2, 10, 50, 100, 1000]
THROUGHPUT_FILES = ["t50", "t128"]
LATENCY_RUNS = 200
LATENCY_WARMUP = 20
LATENCY_SLICE = 20  # queries a peer runs before the next peer's turn
# Each throughput cell gives every peer about CELL_BUDGET_S of timed calls, at least MIN_REPS,
# in turns of about SLICE_S. The largest batch gets MIN_REPS_LARGEST calls and no warm-up (it
# follows a warm 100-batch of the same length; one call of 1000 x 128 tokens takes seconds here),
# so a whole run of three peers stays under ~10 minutes on the 2-core development machine.
CELL_BUDGET_S = 3.0
SLICE_S = 0.5
MIN_REPS = 3
MIN_REPS_LARGEST = 2
MAX_REPS = 500
# A cell whose median call is this much slower than its fastest was disturbed (by other load, or
# by spin-waiting threads on shared cores, which stalled PyTorch calls for ~0.5 s here).
UNSTEADY = 1.5
CHECK_TEXTS = 8  # texts every peer embeds, to confirm they compute the same thing
ONNX_OPSET = 18

ENGINE_NAMES = {
    "embedrag": "embedrag (libembedrag.so, fp32)",
    "torch": "sentence-transformers (PyTorch fp32)",
    "onnxruntime": "ONNX Runtime fp32",
    "onnxruntime-fused": "ONNX Runtime fp32, BERT fusions",
    "embedrag-bf16": "embedrag (libembedrag.so, bf16: AMX or AVX512-BF16)",
    "torch-bf16": "sentence-transformers (PyTorch bf16 autocast)",
}
# Engines that round to bfloat16: they are compared with the fp32 ones by cosine, not bits, and
# run only where the CPU has bfloat16 arithmetic, AVX512-BF16 (which every AMX-BF16 CPU has too;
# otherwise embedrag would fall back to fp32 and PyTorch to a slower path).
BF16_ENGINES = {"embedrag-bf16", "torch-bf16"}


# ---------------------------------------------------------------- texts of exact token counts


def load_tokenizer(model_dir, max_length=None):
    """tokenizers.Tokenizer from tokenizer.json, with the file's own padding/truncation removed
    (all-MiniLM-L6-v2's pads and truncates to 128) and our truncation set if asked."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    if max_length:
        tok.enable_truncation(max_length=max_length)
    return tok


def max_seq_length(model_dir):
    limit = None
    path = os.path.join(model_dir, "sentence_bert_config.json")
    if os.path.exists(path):
        with open(path) as f:
            limit = json.load(f).get("max_seq_length")
    with open(os.path.join(model_dir, "config.json")) as f:
        positions = json.load(f).get("max_position_embeddings", 512)
    return min(limit or positions, positions)


def make_texts(model_dir, out_dir, stsb_path):
    """Writes q16.txt, t50.txt, t128.txt: TEXT_LINES texts each, of exactly that many tokens.

    Words are taken in order from the STS Benchmark sentences, skipping any word whose pieces
    would overshoot the count. BERT's pre-tokenizer splits on whitespace first, so a text's token
    count is the sum of its words' counts, and the result is checked against the full tokenizer.
    """
    tok = load_tokenizer(model_dir)
    with open(stsb_path, newline="", encoding="utf-8") as f:
        sentences = [s for row in csv.reader(f) for s in (row[0], row[1])]
    words = [w for s in sentences for w in s.split()]
    pieces = {}

    def count(w):
        if w not in pieces:
            pieces[w] = len(tok.encode(w, add_special_tokens=False).ids)
        return pieces[w]

    specials = len(tok.encode("", add_special_tokens=True).ids)
    os.makedirs(out_dir, exist_ok=True)
    for stride, (name, target) in enumerate(TEXT_FILES.items(), start=7):
        need = target - specials
        lines = []
        for i in range(TEXT_LINES):
            pos = (i * stride * 13) % len(words)  # different start points per file and line
            picked, have = [], 0
            for k in range(len(words)):
                w = words[(pos + k) % len(words)]
                c = count(w)
                if 0 < c and have + c <= need:
                    picked.append(w)
                    have += c
                    if have == need:
                        break
            text = " ".join(picked)
            got = len(tok.encode(text, add_special_tokens=True).ids)
            if got != target:
                raise SystemExit("make_texts: line %d of %s has %d tokens, not %d" % (i, name, got, target))
            lines.append(text)
        with open(os.path.join(out_dir, name + ".txt"), "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines) + "\n")
    return out_dir


def read_texts(texts_dir):
    out = {}
    for name in TEXT_FILES:
        with open(os.path.join(texts_dir, name + ".txt"), encoding="utf-8") as f:
            out[name] = [line for line in f.read().split("\n") if line]
    return out


# ---------------------------------------------------------------- peers (in worker processes)
#
# Each returns (encode, tokens_of, stages, info): encode(list of texts) -> embeddings; tokens_of
# (text) -> its token count after truncation; stages, a dict where encode leaves the seconds of
# each stage of its last call (or None); info, versions and settings for the report.


def setup_torch(args):
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    import sentence_transformers
    import transformers
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(args.model, device="cpu", local_files_only=True)
    model.to(torch.float32)  # fp32 even for an F16 checkpoint (the upcast is exact)
    model.eval()
    tok = model.tokenizer
    bf16 = args.child == "torch-bf16"

    def tokens_of(text):
        return len(tok(text, truncation=True, max_length=model.max_seq_length)["input_ids"])

    def encode(items):
        # batch_size = len(items): each timed call is one forward pass of that batch.
        if not bf16:
            return model.encode(items, batch_size=len(items), convert_to_numpy=True, show_progress_bar=False)
        # PyTorch's own mixed precision: linear layers and matmuls in bfloat16 (oneDNN, AMX or
        # AVX512-BF16 where present), LayerNorm and softmax in fp32.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.encode(items, batch_size=len(items), convert_to_tensor=True, show_progress_bar=False)
        return out.float().numpy()

    info = {
        "versions": {"sentence_transformers": sentence_transformers.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "settings": "SentenceTransformer.encode(batch_size=len(texts)), %s, torch.set_num_threads(%d)%s"
                    % ("torch.autocast(cpu, bfloat16)" if bf16 else "fp32", args.threads,
                       ", OMP_WAIT_POLICY=PASSIVE" if args.no_spin else ""),
    }
    return encode, tokens_of, None, info


def setup_onnxruntime(args):
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if args.no_spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(args.onnx, options, providers=["CPUExecutionProvider"])
    tok = load_tokenizer(args.model, max_length=max_seq_length(args.model))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in the batch, as ST does
    stages = {}

    def encode(items):
        # Tokenize, run, mean-pool over real tokens, L2-normalize: what sentence-transformers does.
        t0 = time.perf_counter()
        encodings = tok.encode_batch(items)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        t1 = time.perf_counter()
        hidden = session.run(["last_hidden_state"], {
            "input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
        t2 = time.perf_counter()
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        t3 = time.perf_counter()
        stages["tokenize"] = t1 - t0
        stages["model"] = t2 - t1
        stages["pool"] = t3 - t2
        return pooled

    def tokens_of(text):
        return len(tok.encode(text).ids)

    info = {
        "versions": {"onnxruntime": ort.__version__},
        "settings": "CPUExecutionProvider, ORT_ENABLE_ALL, intra_op_num_threads=%d, inter_op_num_threads=1%s; "
                    "tokenizers + numpy mean pooling; %s" % (
                        args.threads, ", allow_spinning=0" if args.no_spin else "", os.path.basename(args.onnx)),
    }
    return encode, tokens_of, stages, info


def setup_embedrag(args):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from embedrag_peer import setup_embedrag as setup

    return setup(args)


SETUPS = {"embedrag": setup_embedrag, "torch": setup_torch, "onnxruntime": setup_onnxruntime,
          "onnxruntime-fused": setup_onnxruntime, "embedrag-bf16": setup_embedrag, "torch-bf16": setup_torch}


def batch_of(texts, n):
    return [texts[i % len(texts)] for i in range(n)]


def worker_main(args):
    """Serves timing requests, one JSON line in, one JSON line out, until stdin closes."""
    # Libraries print progress to stdout; only our replies may go there, so everything else
    # (Python and C level) is sent to stderr and replies use a saved copy of the original fd.
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    texts = read_texts(args.texts)
    encode, tokens_of, stages, info = SETUPS[args.child](args)
    reply.write(json.dumps({"ready": True}) + "\n")
    reply.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        out = {}
        if cmd["op"] == "latency":
            queries = texts["q16"]
            times = []
            for i in range(cmd["start"], cmd["start"] + cmd["count"]):
                q = [queries[i % len(queries)]]
                t0 = time.perf_counter()
                encode(q)
                times.append(time.perf_counter() - t0)
            out["times"] = times
        elif cmd["op"] == "cell":
            items = batch_of(texts[cmd["texts"]], cmd["batch"])
            if cmd["warmup"]:
                encode(items)
            times, stage_list = [], []
            for _ in range(cmd["reps"]):
                t0 = time.perf_counter()
                encode(items)
                times.append(time.perf_counter() - t0)
                if stages is not None:
                    stage_list.append(dict(stages))
            out["times"] = times
            out["stages"] = stage_list
            if cmd.get("count_tokens"):
                out["tokens"] = sum(tokens_of(t) for t in items)
        elif cmd["op"] == "check":
            out["vectors"] = [[float(x) for x in row] for row in encode(texts["t50"][:CHECK_TEXTS])]
        elif cmd["op"] == "finish":
            out = dict(info)
            out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
        reply.write(json.dumps(out) + "\n")
        reply.flush()
    return 0


class Worker:
    """A peer in its own interpreter, driven over a pipe."""

    def __init__(self, args, engine, texts_dir, onnx=None):
        env = dict(os.environ)
        # Pin every thread pool the peer might use to the count we give ours.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
            env[var] = str(args.threads)
        if args.no_spin:
            env["OMP_WAIT_POLICY"] = "PASSIVE"  # libgomp's idle threads sleep instead of spinning
        cmd = [sys.executable, os.path.abspath(__file__), "--child", engine, "--model", args.model,
               "--texts", texts_dir, "--threads", str(args.threads)] + (["--onnx", onnx] if onnx else [])
        cmd += ["--no-spin"] if args.no_spin else []
        self.engine = engine
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()  # {"ready": true} once the model is loaded

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("peers: the %s worker exited (status %s)" % (self.engine, self.proc.wait()))
        return json.loads(line)

    def ask(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


# ---------------------------------------------------------------- the schedule


def percentile(sorted_values, q):
    # Linear interpolation between closest ranks (numpy's default), without importing numpy here.
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def measure_latency(workers):
    times = {k: [] for k in workers}
    for k, w in workers.items():
        w.ask(op="latency", start=0, count=LATENCY_WARMUP)
    for s in range(0, LATENCY_RUNS, LATENCY_SLICE):
        for k, w in workers.items():
            times[k] += w.ask(op="latency", start=LATENCY_WARMUP + s, count=LATENCY_SLICE)["times"]
    out = {}
    for k, t in times.items():
        t.sort()
        out[k] = {"tokens": TEXT_FILES["q16"], "runs": len(t), "p50": 1e3 * percentile(t, 0.5),
                  "p99": 1e3 * percentile(t, 0.99), "min": 1e3 * t[0]}
    return out


def measure_cell(workers, name, batch):
    """One (texts, batch) cell for every peer, the peers taking turns."""
    largest = batch == max(BATCHES)
    min_reps = MIN_REPS_LARGEST if largest else MIN_REPS
    times = {k: [] for k in workers}
    stages = {k: [] for k in workers}
    tokens = {}
    per_slice = {}
    for k, w in workers.items():
        r = w.ask(op="cell", texts=name, batch=batch, reps=1, warmup=not largest, count_tokens=True)
        times[k] += r["times"]
        stages[k] += r["stages"]
        tokens[k] = r["tokens"]
        per_slice[k] = max(1, int(SLICE_S / max(r["times"][0], 1e-6)))

    def wants_more(k):
        n = len(times[k])
        return n < min_reps or (not largest and sum(times[k]) < CELL_BUDGET_S and n < MAX_REPS)

    while any(wants_more(k) for k in workers):
        for k, w in workers.items():
            if wants_more(k):
                reps = min(per_slice[k], MAX_REPS - len(times[k]))
                r = w.ask(op="cell", texts=name, batch=batch, reps=max(reps, 1), warmup=False)
                times[k] += r["times"]
                stages[k] += r["stages"]

    out = {}
    for k in workers:
        t = sorted(times[k])
        cell = {"texts": name, "batch": batch, "tokens": tokens[k], "reps": len(t), "median_s": percentile(t, 0.5),
                "min_s": t[0], "tokens_per_s": tokens[k] / percentile(t, 0.5), "best_tokens_per_s": tokens[k] / t[0]}
        if stages[k]:
            # Medians per stage, like the end-to-end figure, so the two compare.
            for stage in sorted(stages[k][0]):
                cell[stage + "_median_s"] = percentile(sorted(x[stage] for x in stages[k]), 0.5)
            cell["model_only_tokens_per_s"] = tokens[k] / cell["model_median_s"]
        out[k] = cell
    print("  %-5s batch %4d: %s" % (name, batch, "  ".join(
        "%s %.0f" % (k, c["tokens_per_s"]) for k, c in out.items())), file=sys.stderr, flush=True)
    return out


def run_export(args, texts_dir):
    """The ONNX export, in a child of its own so torch's memory never counts against a peer."""
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "export", "--model", args.model,
               "--texts", texts_dir, "--onnx-cache", args.onnx_cache, "--json", out]
        subprocess.run(cmd, check=True)
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)



# ---------------------------------------------------------------- ONNX export


def onnx_paths(args):
    """Cache locations of the plain and the fused graph, keyed by the checkpoint's bytes and the
    versions of the tools that made them, so a stale export is never reused."""
    import onnxruntime
    import torch
    import transformers

    h = hashlib.sha256()
    with open(os.path.join(args.model, "model.safetensors"), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(("torch %s transformers %s onnxruntime %s opset %d" % (
        torch.__version__, transformers.__version__, onnxruntime.__version__, ONNX_OPSET)).encode())
    name = os.path.basename(os.path.normpath(args.model))
    folder = os.path.join(args.onnx_cache, "%s-%s" % (name, h.hexdigest()[:12]))
    return os.path.join(folder, "model.onnx"), os.path.join(folder, "model-fused.onnx")


def child_export(args):
    """Exports the BertModel (last_hidden_state) to ONNX with dynamic batch and sequence axes, and
    a copy with ONNX Runtime's BERT fusions applied.

    Why the TorchScript exporter with eager attention: it gives the graph ONNX Runtime's BERT
    optimizer recognises (Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu
    fused), and ran 100 x 128 tokens three times faster here than the dynamo export of the SDPA
    model (torch 2.15, transformers 5.24). Both agree with PyTorch to ~5e-6.
    """
    import warnings

    import torch
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoModel

    plain, fused = onnx_paths(args)
    if os.path.exists(plain) and os.path.exists(fused):
        return {"onnx": plain, "onnx_fused": fused, "exported": False}

    class LastHidden(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    bert = AutoModel.from_pretrained(args.model, local_files_only=True, dtype=torch.float32,
                                     attn_implementation="eager")
    wrapper = LastHidden(bert.float()).eval()
    example = torch.full((2, 16), 1000, dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names + ["last_hidden_state"]}
    os.makedirs(os.path.dirname(plain), exist_ok=True)
    started = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python conditions on shapes in transformers' mask code; they
        # hold for any input whose mask is as long as its ids, which is all we feed.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example, torch.ones_like(example), torch.zeros_like(example)),
            plain + ".partial",
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    os.replace(plain + ".partial", plain)
    config = bert.config
    optimized = optimize_model(plain, model_type="bert", num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size, opt_level=0)
    optimized.save_model_to_file(fused + ".partial")
    os.replace(fused + ".partial", fused)
    return {
        "onnx": plain,
        "onnx_fused": fused,
        "exported": True,
        "export_s": time.perf_counter() - started,
        "fused_operators": {k: v for k, v in optimized.get_fused_operator_statistics().items() if v},
    }


# ---------------------------------------------------------------- is the machine all ours?

# One thread's SGEMM rate for a second: run once alone, then `threads` copies at once. On a
# shared VM the vCPUs are not always independent cores (we saw two copies each run at half speed
# while the host was busy); then every multi-threaded figure of that stretch is low, and thread
# pools that spin-wait (ONNX Runtime's) can fall below their one-thread speed.
PROBE = (
    "import numpy, time\n"
    "a = numpy.ones((512, 512), numpy.float32); a @ a; n = 0; t = time.perf_counter()\n"
    "while time.perf_counter() - t < 1.0: a @ a; n += 1\n"
    "print(n * 2 * 512 ** 3 / (time.perf_counter() - t) / 1e9)\n"
)
PROBE_SCALING_WARN = 0.75  # of perfect scaling; below this the cores are evidently shared


def core_probe(threads, label):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def run(copies):
        procs = [subprocess.Popen([sys.executable, "-c", PROBE], env=env, stdout=subprocess.PIPE, text=True)
                 for _ in range(copies)]
        return sum(float(p.communicate()[0]) for p in procs)

    alone = run(1)
    together = run(threads)
    probe = {"when": label, "time": time.strftime("%H:%M:%S"), "sgemm_gflops_1_thread": alone,
             "sgemm_gflops_%d_threads" % threads: together, "scaling": together / alone}
    note = ""
    if together / alone < PROBE_SCALING_WARN * threads:
        note = "  <- cores shared with something else now; figures of this stretch are low"
    print("peers: core probe (%s): 1 thread %.0f GFLOP/s, %d at once %.0f GFLOP/s (x%.2f)%s"
          % (label, alone, threads, together, together / alone, note), file=sys.stderr, flush=True)
    return probe


# ---------------------------------------------------------------- report


def machine_info():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_at_start": list(os.getloadavg())}


def print_table(report):
    print("model %s, %d threads%s, %s" % (report["model"], report["threads"],
                                          ", no spin-waiting" if report["no_spin"] else "", report["machine"]["cpu"]))
    print("%-38s %8s %8s %8s" % ("peer", "q16 p50", "q16 p99", "RSS MiB"))
    for key, result in report["engines"].items():
        lat = result["query_latency_ms"]
        print("%-38s %6.2fms %6.2fms %8.0f" % (ENGINE_NAMES[key], lat["p50"], lat["p99"], result["peak_rss_mib"]))
    print("\nthroughput, tokens/s: median call, end to end (ONNX Runtime model-only in parentheses);")
    print("~ marks a cell whose median call took over %.1fx its fastest: disturbed, rerun it" % UNSTEADY)
    print("%-6s %6s " % ("texts", "batch") + " ".join("%20s" % k for k in report["engines"]))
    for name in THROUGHPUT_FILES:
        for batch in BATCHES:
            row = "%-6s %6d " % (name, batch)
            for result in report["engines"].values():
                cell = next(c for c in result["throughput"] if c["texts"] == name and c["batch"] == batch)
                text = "%.0f" % cell["tokens_per_s"]
                if "model_only_tokens_per_s" in cell:
                    text += " (%.0f)" % cell["model_only_tokens_per_s"]
                if cell["median_s"] > UNSTEADY * cell["min_s"]:
                    text = "~" + text
                row += "%20s " % text
            print(row)


def default_engines():
    """Every engine, less the bf16 ones where the CPU has no AVX512-BF16."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    bf16 = "avx512_bf16" in flags
    return [e for e in ENGINE_NAMES if bf16 or e not in BF16_ENGINES]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face / sentence-transformers model directory")
    parser.add_argument("--texts", help="folder with q16.txt, t50.txt, t128.txt (default: made in a temp dir)")
    parser.add_argument("--make-texts", metavar="DIR", help="write q16/t50/t128.txt into DIR and exit")
    parser.add_argument("--stsb", default=DEFAULT_STSB, help="STS Benchmark CSV the texts are built from")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the full results here")
    parser.add_argument("--engines", default=None,
                        help="comma-separated, from: " + ", ".join(ENGINE_NAMES) +
                        " (default: all; the bf16 ones only where the CPU has AVX512-BF16)")
    parser.add_argument("--onnx-cache", default=DEFAULT_ONNX_CACHE)
    parser.add_argument("--no-spin", action="store_true",
                        help="idle worker threads sleep instead of spin-waiting (OMP_WAIT_POLICY=PASSIVE, "
                             "ONNX Runtime allow_spinning=0): steadier when the cores are shared")
    parser.add_argument("--child", choices=["export"] + sorted(SETUPS), help=argparse.SUPPRESS)
    # The exported file, handed to an ONNX Runtime worker so that it never imports torch (which
    # would count in its peak RSS).
    parser.add_argument("--onnx", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = os.path.abspath(args.model)

    if args.child == "export":
        with open(args.json, "w") as f:
            json.dump(child_export(args), f)
        return 0
    if args.child:
        return worker_main(args)

    if args.make_texts:
        make_texts(args.model, args.make_texts, args.stsb)
        print("wrote %s" % ", ".join(os.path.join(args.make_texts, n + ".txt") for n in TEXT_FILES))
        return 0

    engines = args.engines.split(",") if args.engines else default_engines()
    unknown = [e for e in engines if e not in ENGINE_NAMES]
    if unknown:
        parser.error("unknown engine(s) %s; choose from %s" % (", ".join(unknown), ", ".join(ENGINE_NAMES)))

    tmp_texts = None
    texts_dir = args.texts
    if not texts_dir:
        tmp_texts = tempfile.mkdtemp(prefix="peers-texts-")
        texts_dir = make_texts(args.model, tmp_texts, args.stsb)
    workers = {}
    try:
        report = {
            "model": os.path.relpath(args.model, REPO) if args.model.startswith(REPO + os.sep) else args.model,
            "threads": args.threads,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(),
            "texts": {n: {"tokens": TEXT_FILES[n], "lines": len(v)} for n, v in read_texts(texts_dir).items()},
            "schedule": "peers take turns within each measurement (slices of ~%.1f s)" % SLICE_S,
            "no_spin": args.no_spin,
            "core_probes": [],
            "engines": {},
        }
        started = time.perf_counter()
        onnx = {}
        if any(e.startswith("onnxruntime") for e in engines):
            print("peers: ONNX export", file=sys.stderr, flush=True)
            export = run_export(args, texts_dir)
            onnx = {"onnxruntime": export["onnx"], "onnxruntime-fused": export["onnx_fused"]}
            report["onnx_export"] = dict(export, onnx=os.path.relpath(export["onnx"], REPO),
                                         onnx_fused=os.path.relpath(export["onnx_fused"], REPO))
        report["core_probes"].append(core_probe(args.threads, "start"))
        for engine in engines:
            print("peers: loading %s" % ENGINE_NAMES[engine], file=sys.stderr, flush=True)
            workers[engine] = Worker(args, engine, texts_dir, onnx.get(engine))

        print("peers: query latency", file=sys.stderr, flush=True)
        latency = measure_latency(workers)
        cells = {k: [] for k in workers}
        for name in THROUGHPUT_FILES:
            report["core_probes"].append(core_probe(args.threads, "before " + name))
            print("peers: throughput, %s" % name, file=sys.stderr, flush=True)
            for batch in BATCHES:
                for k, cell in measure_cell(workers, name, batch).items():
                    cells[k].append(cell)
        checks = {k: w.ask(op="check")["vectors"] for k, w in workers.items()}
        for k, w in workers.items():
            report["engines"][k] = dict(w.ask(op="finish"), query_latency_ms=latency[k], throughput=cells[k])
            w.close()
        report["core_probes"].append(core_probe(args.threads, "end"))
        report["wall_s"] = time.perf_counter() - started
    finally:
        for w in workers.values():
            w.close()
        if tmp_texts:
            shutil.rmtree(tmp_texts, ignore_errors=True)

    vectors = [v for k, v in checks.items() if k not in BF16_ENGINES]
    if len(vectors) >= 2:
        # The peers must embed the same texts to the same vectors, or the comparison is moot.
        report["max_abs_diff_between_peers"] = max(
            abs(a - b) for other in vectors[1:] for ra, rb in zip(vectors[0], other) for a, b in zip(ra, rb))
    if vectors:
        # bfloat16 engines: their worst cosine to the first fp32 engine's vectors.
        def cos(a, b):
            return sum(x * y for x, y in zip(a, b)) / (sum(x * x for x in a) * sum(y * y for y in b)) ** 0.5
        report["bf16_worst_cosine_to_fp32"] = {
            k: min(cos(a, b) for a, b in zip(vectors[0], v)) for k, v in checks.items() if k in BF16_ENGINES}
    print_table(report)
    if "max_abs_diff_between_peers" in report:
        print("\nmax |difference| between the peers' embeddings: %.2e" % report["max_abs_diff_between_peers"])
    for k, c in report.get("bf16_worst_cosine_to_fp32", {}).items():
        print("%s: worst cosine to fp32 %.6f" % (ENGINE_NAMES[k], c))
    print("core scaling during the run (%d threads; 1.0 per independent core): %s" % (
        args.threads, ", ".join("%.2f" % p["scaling"] for p in report["core_probes"])))
    print("wall time %.0f s" % report["wall_s"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
