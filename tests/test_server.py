#!/usr/bin/env python3
"""`embedrag serve` end to end: the real binary on a free port, spoken to over HTTP.

Run by ctest as `python tests/test_server.py` with EMBEDRAG_CLI (the built `embedrag`) and
EMBEDRAG_SOURCE_DIR (the repository root) set. Needs the stdlib and the `openai` package.
Prints `ok - NAME` or `not ok - NAME: why` per check and exits 1 if any failed.

The reference vectors come from `embedrag embed` (the same engine, CPU fp32): the server's must
be equal to them, bit for bit through base64 and within 1e-6 through JSON floats. The costly
checks (10,000 inputs, a 5,000-text request dropped by its client) are sized from a measured
per-text time so that a sanitizer build stays within its budget; a line starting `#` says so.
"""
import base64
import csv
import http.client
import json
import math
import os
import queue
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse

CLI = os.environ.get("EMBEDRAG_CLI", "")
SRC = os.environ.get("EMBEDRAG_SOURCE_DIR", "")
MODEL = os.path.join(SRC, "models", "all-MiniLM-L6-v2")
MODEL_NAME = "all-MiniLM-L6-v2"
DATA = os.path.normpath(os.path.join(SRC, "..", "shared", "data", "stsb-en-dev.csv"))
DIM = 384
START_TIMEOUT = 120  # seconds for a server to print its listening line (model load under ASan)

# The servers run on the loopback: no proxy may stand in between (httpx honours these).
for _var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
    os.environ.pop(_var, None)
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost,::1"

try:
    import openai
except ImportError:  # the checks that need it fail and say why; the rest still run
    openai = None

TMP = tempfile.mkdtemp(prefix="embedrag-serve-test-")
SERVERS = []
failures = []
checks = 0
T_START = time.monotonic()


# ---------------------------------------------------------------- the runner

class CheckFailed(Exception):
    pass


def expect(cond, why):
    if not cond:
        raise CheckFailed(why)


def check(name, fn, *args):
    """Runs fn(*args); any exception fails the check and is named, the run goes on."""
    global checks
    checks += 1
    t0 = time.monotonic()
    try:
        fn(*args)
    except CheckFailed as e:
        failures.append(name)
        print(f"not ok - {name}: {e}", flush=True)
    except Exception as e:  # a test's own crash or a transport error: where and what
        failures.append(name)
        tb = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == __file__]
        where = f"line {tb[-1].lineno}" if tb else "?"
        print(f"not ok - {name}: {type(e).__name__} at {where}: {str(e)[:600]}", flush=True)
    else:
        print(f"ok - {name} ({time.monotonic() - t0:.1f} s)", flush=True)


def note(text):
    print(f"# {text}", flush=True)


def clip(b, n=400):
    if isinstance(b, bytes):
        b = b.decode("utf-8", "replace")
    return b if len(b) <= n else b[:n] + f"... ({len(b)} chars)"


# ---------------------------------------------------------------- servers

try:  # loaded here, not after fork: the child only calls it
    import ctypes
    _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
except Exception:
    _prctl = None


def _die_with_parent():
    if _prctl:  # the server must not outlive this script, even when ctest kills it
        _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Server:
    def __init__(self, name, args=(), store=None, env_extra=None):
        self.name = name
        self.args = list(args)
        self.store = store
        self.env_extra = env_extra or {}
        self.proc = None
        self.host = self.port = None
        self.lines = queue.Queue()

    def start(self):
        cmd = [CLI, "serve", "--port", "0", "--model", MODEL, "--device", "cpu"]
        if self.store:
            cmd += ["--store", self.store]
        cmd += self.args
        env = dict(os.environ)
        for var in ("EMBEDRAG_API_KEY", "EMBEDRAG_STORE", "EMBEDRAG_DEVICE"):
            env.pop(var, None)
        env.update(self.env_extra)
        self.stderr_path = os.path.join(TMP, f"{self.name}-{len(SERVERS)}.stderr")
        self.errf = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.errf, env=env, preexec_fn=_die_with_parent)
        SERVERS.append(self)
        threading.Thread(target=self._read_stdout, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        seen = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise CheckFailed(f"{self.name}: no 'listening on' line in {START_TIMEOUT} s; "
                                  f"stdout {seen!r}; stderr {self.stderr_tail()!r}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait()
                raise CheckFailed(f"{self.name}: exited {self.proc.returncode} before listening; "
                                  f"stdout {seen!r}; stderr {self.stderr_tail()!r}")
            seen.append(line)
            m = re.search(r"listening on http://(\[[^\]]*\]|[^:/\s]+):(\d+)", line)
            if m:
                self.host = m.group(1).strip("[]")
                self.port = int(m.group(2))
                return self

    def _read_stdout(self):
        for raw in self.proc.stdout:
            self.lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self.lines.put(None)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=60):
        """SIGTERM, wait; returns the exit status (None if it had to be killed)."""
        if not self.alive():
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self):
        if self.alive():
            self.proc.kill()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def stderr_tail(self, n=600):
        try:
            with open(self.stderr_path, "rb") as f:
                data = f.read()
            return data[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def url(self, path=""):
        return f"http://{self.host}:{self.port}{path}"


def cleanup():
    for s in SERVERS:
        s.kill()
    if os.environ.get("EMBEDRAG_TEST_KEEP"):
        print(f"# kept {TMP} (stores and server stderr)", flush=True)
    else:
        shutil.rmtree(TMP, ignore_errors=True)


class Resp:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise CheckFailed(f"response is not JSON ({e}): {clip(self.body)}")

    def __repr__(self):
        return f"{self.status} {clip(self.body, 300)}"


def req(srv, method, path, js=None, raw=None, headers=None, timeout=60):
    """One request on a fresh connection; returns Resp (status, lower-cased headers, body)."""
    h = dict(headers or {})
    body = raw
    if js is not None:
        body = json.dumps(js).encode()
    if body is not None:
        h.setdefault("Content-Type", "application/json")
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
    finally:
        conn.close()


def want(resp, status, what):
    expect(resp.status == status, f"{what}: expected {status}, got {resp!r}")
    return resp


def client(srv, key="x"):
    if openai is None:
        raise CheckFailed("the openai package is not installed in this interpreter")
    return openai.OpenAI(base_url=srv.url("/v1"), api_key=key, max_retries=0, timeout=120)


# ---------------------------------------------------------------- vectors

def cli_run(sub, texts, *extra):
    for t in texts:
        assert "\n" not in t and "\r" not in t
    p = subprocess.run([CLI, sub, "--model", MODEL, *extra], input="\n".join(texts).encode() + b"\n",
                       capture_output=True, timeout=600)
    if p.returncode != 0:
        raise CheckFailed(f"embedrag {sub} exited {p.returncode}: {clip(p.stderr)}")
    lines = p.stdout.decode().splitlines()
    if len(lines) != len(texts):
        raise CheckFailed(f"embedrag {sub}: {len(lines)} lines for {len(texts)} texts")
    return [json.loads(line) for line in lines]


def f32(v):
    return list(struct.unpack(f"<{len(v)}f", struct.pack(f"<{len(v)}f", *v)))


def unb64(s):
    raw = base64.b64decode(s)
    expect(len(raw) % 4 == 0, f"base64 payload of {len(raw)} bytes is not float32s")
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def norm(v):
    return math.sqrt(sum(x * x for x in v))


def maxdiff(a, b):
    if len(a) != len(b):
        return math.inf
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def same_f32(got, ref, what):
    """Exact: the server's float32 against the CLI's value (9 digits round-trip a float32)."""
    expect(len(got) == len(ref), f"{what}: {len(got)} components, expected {len(ref)}")
    r = f32(ref)
    if got != r:
        i = next(i for i in range(len(r)) if got[i] != r[i])
        raise CheckFailed(f"{what}: not bit-equal to the CLI's vector (component {i}: {got[i]!r} vs "
                          f"{r[i]!r}; max diff {maxdiff(got, r):.3g})")


def close(got, ref, what, tol=1e-6):
    d = maxdiff(got, ref)
    expect(d <= tol, f"{what}: max abs diff {d:.3g} > {tol} ({len(got)} vs {len(ref)} components)")


def mentions(text, *words):
    return all(re.search(rf"(?<![\w.]){re.escape(str(w))}(?![\w])", text) for w in words)


# ---------------------------------------------------------------- test data

TEXTS = ["The cat sits on the mat.", "A man is playing a guitar.",
         "Quantum computers use qubits.", "Ein Hund läuft über die Wiese."]
LONG = "hello world " * 400                       # 802 tokens: past MiniLM's limit (256)
LONG_TWO = "the cat sat on the mat " * 100 + "stock markets fell sharply today " * 100


def many_spots(n):
    return [0, 1, n // 2 + 7, n - 2, n - 1]


def many_texts(n):
    return [f"item {i}" for i in range(n)]


def load_documents():
    """Six paragraphs of six real sentences each (STS-B dev: captions, forums, news) and, per
    paragraph, a question made from one of its sentences (chosen so that dense, BM25 and hybrid
    search all rank their own paragraph first)."""
    if not os.path.exists(DATA):
        raise CheckFailed(f"{DATA} is missing (the shared data set; see its README)")
    with open(DATA, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    kinds = ["captions", "captions", "captions", "forum", "news", "news"]
    question_row = [2, 0, 0, 1, 1, 0]
    docs = []
    for j in range(6):
        start = j * 250 + 100
        sents = [r[0] for r in rows[start:start + 6]]
        q = sents[question_row[j]].rstrip(".,") + "?"
        docs.append({"id": f"doc{j}", "text": " ".join(sents), "title": f"Paragraph {j}",
                     "metadata": {"lang": "en", "year": 2020 + j, "kind": kinds[j]},
                     "source": f"/corpus/{kinds[j]}/doc{j}.txt", "question": q})
    return docs


def store_doc(d):
    return {k: v for k, v in d.items() if k != "question"}


# ---------------------------------------------------------------- 1. OpenAI route

def check_openai_base64(ctx):
    srv, ref = ctx["M"], ctx["ref"]
    r = client(srv).embeddings.create(model=MODEL_NAME, input=TEXTS)
    expect(len(r.data) == len(TEXTS), f"{len(r.data)} vectors for {len(TEXTS)} inputs")
    for i, d in enumerate(r.data):
        expect(d.index == i, f"data[{i}].index is {d.index}")
        same_f32(d.embedding, ref[i], f"input {i} (client, base64)")
    expect(r.usage.prompt_tokens > 0, f"usage.prompt_tokens is {r.usage.prompt_tokens}")
    expect(r.usage.prompt_tokens == ctx["ntokens"],
           f"usage.prompt_tokens {r.usage.prompt_tokens}, the CLI counts {ctx['ntokens']} "
           f"([CLS] and [SEP] included)")
    expect(r.model and MODEL_NAME in r.model, f"model is {r.model!r}")
    # The same request by hand: the payload is a base64 string of little-endian float32.
    raw = want(req(srv, "POST", "/v1/embeddings",
                   {"input": TEXTS, "encoding_format": "base64"}), 200, "base64 by hand").json()
    expect(raw.get("object") == "list", f"object is {raw.get('object')!r}")
    for i, d in enumerate(raw["data"]):
        expect(isinstance(d["embedding"], str), f"data[{i}].embedding is not a base64 string")
        expect(d.get("object") == "embedding", f"data[{i}].object is {d.get('object')!r}")
        same_f32(unb64(d["embedding"]), ref[i], f"input {i} (by hand, base64)")
    expect(raw["usage"]["total_tokens"] == raw["usage"]["prompt_tokens"], f"usage {raw['usage']}")


def check_openai_float(ctx):
    srv, ref = ctx["M"], ctx["ref"]
    r = client(srv).embeddings.create(model=MODEL_NAME, input=TEXTS, encoding_format="float")
    for i, d in enumerate(r.data):
        expect(isinstance(d.embedding, list), f"data[{i}].embedding is {type(d.embedding)}")
        close(d.embedding, ref[i], f"input {i} (float)")
        expect(abs(norm(d.embedding) - 1) < 1e-5, f"input {i}: norm {norm(d.embedding)}")


def check_openai_dimensions(ctx):
    srv = ctx["M"]
    r = client(srv).embeddings.create(model=MODEL_NAME, input=TEXTS, dimensions=64)
    for i, d in enumerate(r.data):
        expect(len(d.embedding) == 64, f"input {i}: {len(d.embedding)} components, asked 64")
        expect(abs(norm(d.embedding) - 1) < 1e-5, f"input {i}: norm {norm(d.embedding)}")
        same_f32(d.embedding, ctx["ref64"][i], f"input {i} vs embed --dimensions 64")


def check_openai_single(ctx):
    srv, ref = ctx["M"], ctx["ref"]
    r = client(srv).embeddings.create(model=MODEL_NAME, input=TEXTS[1])
    expect(len(r.data) == 1, f"{len(r.data)} vectors for one string")
    same_f32(r.data[0].embedding, ref[1], "single string")
    # `model` may be left out, or carry an owner prefix.
    for body in ({"input": TEXTS[1]}, {"input": TEXTS[1], "model": "sentence-transformers/" + MODEL_NAME}):
        d = want(req(srv, "POST", "/v1/embeddings", body), 200, json.dumps(body)[:80]).json()
        close(d["data"][0]["embedding"], ref[1], f"{list(body)}")


def check_openai_token_ids(ctx):
    srv, ref = ctx["M"], ctx["ref"]
    tok = want(req(srv, "POST", "/tokenize", {"inputs": TEXTS[:2]}), 200, "/tokenize").json()
    ids = [[t["id"] for t in seq] for seq in tok]
    expect(ids[0] == ctx["cli_ids"][0], f"/tokenize ids {ids[0]} vs the CLI's {ctx['cli_ids'][0]}")
    d = want(req(srv, "POST", "/v1/embeddings", {"input": ids[0]}), 200, "one id list").json()
    expect(len(d["data"]) == 1, f"{len(d['data'])} vectors for one id list")
    close(d["data"][0]["embedding"], ref[0], "ids of text 0")
    d = want(req(srv, "POST", "/v1/embeddings", {"input": ids}), 200, "two id lists").json()
    expect(len(d["data"]) == 2, f"{len(d['data'])} vectors for two id lists")
    close(d["data"][0]["embedding"], ref[0], "ids[0]")
    close(d["data"][1]["embedding"], ref[1], "ids[1]")
    expect(d["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1]),
           f"usage {d['usage']} for {len(ids[0])} + {len(ids[1])} ids")
    r = client(srv).embeddings.create(model=MODEL_NAME, input=ids[1])
    same_f32(r.data[0].embedding, ref[1], "ids through the client")


def check_openai_model_not_found(ctx):
    srv = ctx["M"]
    r = want(req(srv, "POST", "/v1/embeddings", {"input": "x", "model": "other-model"}), 404,
             "model other-model")
    err = r.json().get("error")
    expect(isinstance(err, dict), f"error is not OpenAI's object: {r!r}")
    expect(err.get("code") == "model_not_found", f"error.code {err.get('code')!r}")
    expect(err.get("message") and err.get("type"), f"error lacks message/type: {err}")
    if openai is None:
        raise CheckFailed("openai not installed")
    try:
        client(srv).embeddings.create(model="other-model", input="x")
    except openai.NotFoundError as e:
        expect(e.code == "model_not_found", f"client sees code {e.code!r}")
    else:
        raise CheckFailed("the client got no error for other-model")


# ---------------------------------------------------------------- 2. TEI routes

def check_tei_embed(ctx):
    srv, ref = ctx["M"], ctx["ref"]
    r = want(req(srv, "POST", "/embed", {"inputs": TEXTS[2]}), 200, "one string")
    v = r.json()
    expect(isinstance(v, list) and len(v) == 1 and isinstance(v[0], list),
           f"one string should give [[...]]: {clip(r.body, 80)}")
    close(v[0], ref[2], "one string")
    v = want(req(srv, "POST", "/embed", {"inputs": TEXTS}), 200, "a list").json()
    expect(len(v) == len(TEXTS), f"{len(v)} vectors for {len(TEXTS)}")
    for i in range(len(TEXTS)):
        close(v[i], ref[i], f"input {i}")
    for h in ("x-total-time", "x-tokenization-time", "x-queue-time", "x-inference-time"):
        expect(h in r.headers, f"no {h} header (headers: {sorted(r.headers)})")
        try:
            float(r.headers[h])
        except ValueError:
            raise CheckFailed(f"{h}: {r.headers[h]!r} is not a number")
    # The engine's time splits into queue and inference (whole ms each, so the sum may pass the
    # total by a rounding). On an idle server a request of many texts is almost all inference.
    reps = 512 // max(1, ctx["ntokens"]) + 2
    r = want(req(srv, "POST", "/embed", {"inputs": TEXTS * reps}), 200, "a bulk request")
    total, queue, inference = (int(r.headers[h]) for h in
                               ("x-total-time", "x-queue-time", "x-inference-time"))
    expect(0 <= queue and 1 <= inference and queue + inference <= total + 1,
           f"x-total-time {total}, x-queue-time {queue}, x-inference-time {inference}")
    expect(queue <= max(2, inference // 4),
           f"an idle server queued a request {queue} ms against {inference} ms of inference")


def check_tei_normalize(ctx):
    srv, ref = ctx["M"], ctx["ref"]
    v = want(req(srv, "POST", "/embed", {"inputs": TEXTS[:2], "normalize": False}), 200,
             "normalize false").json()
    for i in range(2):
        n = norm(v[i])
        expect(abs(n - 1) > 1e-3, f"input {i}: norm {n} with normalize false")
        close([x / n for x in v[i]], ref[i], f"input {i} normalized by hand", 1e-5)


def check_tei_truncate(ctx):
    srv = ctx["M"]
    r = want(req(srv, "POST", "/embed", {"inputs": ["short", LONG], "truncate": False}), 413,
             "truncate false, 802 tokens")
    e = r.json()
    expect(isinstance(e, dict) and isinstance(e.get("error"), str) and "error_type" in e,
           f"not TEI's error shape: {r!r}")
    expect(mentions(e["error"], 1), f"the message does not name input 1: {e['error']!r}")
    expect(mentions(e["error"], 802) or mentions(e["error"], 800),
           f"the message does not give the token count (802): {e['error']!r}")
    v = want(req(srv, "POST", "/embed", {"inputs": ["short", LONG]}), 200, "truncate default").json()
    expect(len(v) == 2 and len(v[1]) == DIM, "two vectors")
    expect(abs(norm(v[1]) - 1) < 1e-5, f"norm {norm(v[1])}")


def check_tei_direction(ctx):
    srv = ctx["M"]
    out = {}
    for k, body in (("default", {}), ("Right", {"truncation_direction": "Right"}),
                    ("Left", {"truncation_direction": "Left"})):
        out[k] = want(req(srv, "POST", "/embed", {"inputs": LONG_TWO, **body}), 200, k).json()[0]
    expect(out["Right"] == out["default"], f"Right differs from the default "
                                           f"(max diff {maxdiff(out['Right'], out['default']):.3g})")
    d = maxdiff(out["Left"], out["Right"])
    expect(d > 1e-2, f"Left and Right agree (max diff {d:.3g}) on a text whose ends differ")


def check_tei_prompt_name(ctx):
    srv = ctx["M"]
    info = want(req(srv, "GET", "/info"), 200, "/info").json()
    prompts = info.get("prompts")
    expect(isinstance(prompts, dict), f"/info prompts is {prompts!r}")
    r = req(srv, "POST", "/embed", {"inputs": "x", "prompt_name": "no-such-prompt"})
    want(r, 422, "unknown prompt_name")
    expect(r.json().get("error"), f"no message: {r!r}")
    if "query" in prompts:
        note("the model has a 'query' prompt: checked only the unknown name")
    else:
        want(req(srv, "POST", "/embed", {"inputs": "x", "prompt_name": "query"}), 422,
             "prompt_name query on a model without prompts")


def check_tei_tokenize(ctx):
    srv = ctx["M"]
    t = want(req(srv, "POST", "/tokenize", {"inputs": TEXTS[0]}), 200, "/tokenize").json()
    expect(isinstance(t, list) and len(t) == 1, f"one string should give [[...]]: {t!r:.200}")
    seq = t[0]
    expect(seq[0] == {"id": 101, "text": "[CLS]", "special": True} or
           (seq[0]["id"] == 101 and seq[0]["text"] == "[CLS]" and seq[0]["special"] is True),
           f"first token {seq[0]}")
    expect(seq[-1]["id"] == 102 and seq[-1]["special"] is True, f"last token {seq[-1]}")
    expect(all(x["special"] is False for x in seq[1:-1]), "a middle token is marked special")
    expect([x["id"] for x in seq] == ctx["cli_ids"][0], "ids differ from `embedrag tokenize`")
    expect([x["text"] for x in seq[1:-1]] == ctx["cli_tokens"][0][1:-1],
           f"texts {[x['text'] for x in seq]} vs {ctx['cli_tokens'][0]}")
    t = want(req(srv, "POST", "/tokenize", {"inputs": TEXTS[:2], "add_special_tokens": False}),
             200, "add_special_tokens false").json()
    expect(len(t) == 2 and [x["id"] for x in t[0]] == ctx["cli_ids"][0][1:-1],
           f"without specials: {[x['id'] for x in t[0]]}")


def check_info(ctx):
    srv = ctx["M"]
    i = want(req(srv, "GET", "/info"), 200, "/info").json()
    for k in ("model_id", "model_dtype", "model_type", "dimension", "max_input_length",
              "max_batch_tokens", "max_client_batch_size", "max_queue", "prompts", "backends",
              "version", "store"):
        expect(k in i, f"/info lacks {k}: {sorted(i)}")
    expect(MODEL_NAME in str(i["model_id"]), f"model_id {i['model_id']!r}")
    expect(i["dimension"] == DIM, f"dimension {i['dimension']}")
    expect(i["max_input_length"] == ctx["max_tokens"],
           f"max_input_length {i['max_input_length']}, `embedrag info` says {ctx['max_tokens']}")
    expect(i["model_type"] == {"embedding": {"pooling": "mean"}}, f"model_type {i['model_type']}")
    expect(isinstance(i["backends"], list) and i["backends"] and
           all({"name", "device", "precision"} <= set(b) for b in i["backends"]),
           f"backends {i['backends']}")
    expect(i["max_queue"] == 4096, f"max_queue {i['max_queue']} (default 4096)")
    st = i["store"]
    expect(isinstance(st, dict) and {"path", "documents", "chunks", "read_only"} <= set(st),
           f"store {st}")
    expect(st["read_only"] is False, f"store.read_only {st['read_only']}")
    r = want(req(srv, "GET", "/health"), 200, "/health")
    expect(r.body == b"", f"/health body {r.body!r}")


def check_page_and_openapi(ctx):
    srv = ctx["M"]
    r = want(req(srv, "GET", "/"), 200, "GET /")
    expect(b"<html" in r.body.lower() and "text/html" in r.headers.get("content-type", ""),
           f"GET / is not HTML: {r.headers.get('content-type')}")
    expect(not re.search(rb"""(src|href)\s*=\s*["']https?://""", r.body), "the page loads external assets")
    o = want(req(srv, "GET", "/openapi.json"), 200, "/openapi.json").json()
    expect(str(o.get("openapi", "")).startswith("3.0"), f"openapi {o.get('openapi')!r}")
    for p in ("/v1/embeddings", "/embed", "/tokenize", "/info", "/health", "/search", "/documents",
              "/metrics"):
        expect(p in o.get("paths", {}), f"openapi.json has no {p}")


# ---------------------------------------------------------------- 3. errors

def check_malformed_json(ctx):
    srv = ctx["M"]
    r = want(req(srv, "POST", "/embed", raw=b'{"inputs": ["a",'), 422, "/embed truncated JSON")
    expect(r.json().get("error"), f"no message: {r!r}")
    r = want(req(srv, "POST", "/v1/embeddings", raw=b'{"input": nope}'), 422,
             "/v1/embeddings malformed JSON")
    expect(r.json().get("error", {}).get("message"), f"no error.message: {r!r}")


def check_wrong_type(ctx):
    srv = ctx["M"]
    r = want(req(srv, "POST", "/v1/embeddings", {"input": 5}), 422, '{"input": 5}')
    e = r.json().get("error", {})
    expect(e.get("param") == "input" or mentions(e.get("message", ""), "input"),
           f"the error does not name `input`: {r!r}")
    r = want(req(srv, "POST", "/embed", {"inputs": "x", "normalize": "yes"}), 422,
             '{"normalize": "yes"}')
    expect("normalize" in r.json().get("error", ""), f"does not name `normalize`: {r!r}")
    want(req(srv, "POST", "/v1/embeddings", {"input": "x", "dimensions": "64"}), 422,
         '{"dimensions": "64"}')


def check_empty_input(ctx):
    srv = ctx["M"]
    for body in ({"input": ""}, {"input": []}):
        want(req(srv, "POST", "/v1/embeddings", body), 400, json.dumps(body))
    for body in ({"inputs": ""}, {"inputs": []}):
        want(req(srv, "POST", "/embed", body), 400, json.dumps(body))


def check_invalid_utf8(ctx):
    srv = ctx["M"]
    r = want(req(srv, "POST", "/v1/embeddings", raw=b'{"input": ["ok", "bad \xff"]}'), 422,
             "raw byte 0xff in input 1")
    msg = r.json().get("error", {}).get("message", "")
    expect(mentions(msg, 1), f"the message does not name index 1: {msg!r}")
    expect(mentions(msg, 4), f"the message does not name byte offset 4: {msg!r}")
    r = want(req(srv, "POST", "/embed", raw=b'{"inputs": ["ok", "bad \xc3"]}'), 422,
             "/embed truncated UTF-8 sequence in input 1")
    expect(mentions(r.json().get("error", ""), 1), f"does not name index 1: {r!r}")


def raw_send(srv, head, body, chunk=65536, timeout=60):
    """Sends head then body in chunks, stopping early if the server answers; returns
    (status or None, response bytes, bytes of body sent, error text)."""
    s = socket.create_connection((srv.host, srv.port), timeout=timeout)
    sent, err = 0, ""
    try:
        s.sendall(head)
        while sent < len(body):
            rd, _, _ = select.select([s], [], [], 0)
            if rd:
                break
            try:
                sent += s.send(body[sent:sent + chunk])
            except OSError as e:
                err = f"send: {e}"
                break
        data = b""
        s.settimeout(timeout)
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                data += b
                if b"\r\n\r\n" in data and _complete(data):
                    break
        except OSError as e:
            err += f" recv: {e}"
        m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
        return (int(m.group(1)) if m else None), data, sent, err
    finally:
        s.close()


def _complete(data):
    head, _, rest = data.partition(b"\r\n\r\n")
    m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    return m is not None and len(rest) >= int(m.group(1))


def check_body_too_large(ctx):
    srv = ctx["B"]
    body = json.dumps({"inputs": "a " * (1024 * 1024)}).encode()  # 2 MiB against --max-body-mb 1
    head = (f"POST /embed HTTP/1.1\r\nHost: {srv.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    status, data, sent, err = raw_send(srv, head, body)
    expect(status == 413, f"2 MiB body against --max-body-mb 1: status {status} after sending "
                          f"{sent} bytes ({err}); response {clip(data, 200)!r}")
    want(req(srv, "GET", "/health"), 200, "/health afterwards")


def check_unknown_route_and_method(ctx):
    srv = ctx["M"]
    want(req(srv, "GET", "/no/such/route"), 404, "GET /no/such/route")
    want(req(srv, "POST", "/v2/embeddings", {"input": "x"}), 404, "POST /v2/embeddings")
    want(req(srv, "GET", "/embed"), 405, "GET /embed")
    want(req(srv, "DELETE", "/v1/embeddings"), 405, "DELETE /v1/embeddings")


def check_ten_megabytes(ctx):
    srv = ctx["M"]
    big = "hello world " * (10_000_000 // 12)
    r = want(req(srv, "POST", "/embed", {"inputs": big}, timeout=300), 200, "a 10 MB string")
    v = r.json()[0]
    short = want(req(srv, "POST", "/embed", {"inputs": LONG}), 200, "800 tokens").json()[0]
    expect(v == short, f"the 10 MB string's vector is not that of its first tokens "
                       f"(max diff {maxdiff(v, short):.3g})")


def check_many_inputs(ctx):
    srv, n = ctx["M"], ctx["n_many"]
    texts = many_texts(n)
    t0 = time.monotonic()
    r = want(req(srv, "POST", "/v1/embeddings", {"input": texts, "encoding_format": "base64"},
                 timeout=600), 200, f"{n} inputs")
    dt = time.monotonic() - t0
    d = r.json()["data"]
    expect(len(d) == n, f"{len(d)} vectors for {n} inputs")
    expect(all(x["index"] == i for i, x in enumerate(d)), "data out of input order")
    for k, i in enumerate(many_spots(n)):
        same_f32(unb64(d[i]["embedding"]), ctx["ref_many"][k], f"input {i}")
    note(f"{n} inputs in {dt:.1f} s")


# ---------------------------------------------------------------- 4. auth

def check_auth(ctx):
    srv = ctx["A"]
    cmdline = open(f"/proc/{srv.proc.pid}/cmdline", "rb").read()
    expect(b"secret" not in cmdline, "the key is on the command line")
    r = want(req(srv, "GET", "/health"), 200, "/health without a key")
    body = {"inputs": "x"}
    r = want(req(srv, "POST", "/embed", body), 401, "/embed without a key")
    want(req(srv, "POST", "/embed", body, headers={"Authorization": "Bearer wrong"}), 401,
         "/embed with a wrong key")
    want(req(srv, "POST", "/embed", body, headers={"Authorization": "secret"}), 401,
         "/embed with the key but no Bearer")
    want(req(srv, "GET", "/info"), 401, "/info without a key")
    want(req(srv, "GET", "/metrics"), 401, "/metrics without a key")
    v = want(req(srv, "POST", "/embed", body, headers={"Authorization": "Bearer secret"}), 200,
             "/embed with the key").json()
    expect(len(v) == 1 and len(v[0]) == DIM, "one vector")


def check_auth_openai(ctx):
    srv = ctx["A"]
    r = client(srv, "secret").embeddings.create(model=MODEL_NAME, input=TEXTS[:2])
    same_f32(r.data[0].embedding, ctx["ref"][0], "with the key")
    try:
        client(srv, "wrong").embeddings.create(model=MODEL_NAME, input="x")
    except openai.AuthenticationError:
        pass
    else:
        raise CheckFailed("the client with a wrong key got no 401")


# ---------------------------------------------------------------- 5. store

def search(srv, body, what):
    return want(req(srv, "POST", "/search", body), 200, what).json()


def check_store_add(ctx):
    srv, docs = ctx["M"], ctx["docs"]
    r = want(req(srv, "POST", "/documents", store_doc(docs[0])), 200, "one document").json()
    expect(r.get("stored") == 1 and r.get("failed") == 0, f"response {r}")
    expect(r["documents"] == [{"id": "doc0", "status": "stored"}], f"documents {r['documents']}")
    r = want(req(srv, "POST", "/documents", {"documents": [store_doc(d) for d in docs[1:]]}), 200,
             "five documents").json()
    expect(r.get("stored") == 5 and r.get("failed") == 0, f"response {r}")
    expect([x["id"] for x in r["documents"]] == [d["id"] for d in docs[1:]], f"ids {r['documents']}")
    # an odd id: percent-decoded from the path
    r = want(req(srv, "POST", "/documents", {"id": "odd/id x%", "text": "An odd identifier."}),
             200, "odd id").json()
    want(req(srv, "GET", "/documents/" + urllib.parse.quote("odd/id x%", safe="")), 200,
         "GET of a percent-encoded id")
    want(req(srv, "DELETE", "/documents/" + urllib.parse.quote("odd/id x%", safe="")), 200,
         "DELETE of a percent-encoded id")
    # a document the store refuses (text not UTF-8) fails alone; a malformed one fails the request
    r = want(req(srv, "POST", "/documents",
                 raw=b'{"documents": [{"id": "ok1", "text": "fine"}, {"id": "bad1", "text": "bad \xff"}]}'),
             200, "one good document, one with invalid UTF-8").json()
    expect(r.get("stored") == 1 and r.get("failed") == 1 and r["documents"][1]["id"] == "bad1"
           and r["documents"][1]["status"] == "error" and r["documents"][1].get("error"),
           f"response {r}")
    want(req(srv, "POST", "/documents", raw=b'{"documents": [{"id": "bad2", "text": "bad \xff"}]}'),
         422, "every document failed")
    want(req(srv, "GET", "/documents/bad1"), 404, "the failed document is not stored")
    want(req(srv, "POST", "/documents", {"documents": [{"id": "x"}]}), 422, "a document without text")
    want(req(srv, "POST", "/documents", {"text": "no id"}), 422, "a document without id")
    want(req(srv, "DELETE", "/documents/ok1"), 200, "DELETE ok1")
    info = want(req(srv, "GET", "/info"), 200, "/info").json()
    expect(info["store"]["documents"] == 6, f"store {info['store']}")


def check_store_get(ctx):
    srv, docs = ctx["M"], ctx["docs"]
    for d in docs[:3]:
        g = want(req(srv, "GET", f"/documents/{d['id']}"), 200, f"GET {d['id']}").json()
        expect(g["id"] == d["id"] and g["source"] == d["source"] and g["title"] == d["title"],
               f"{d['id']}: {clip(json.dumps(g), 300)}")
        expect(g["metadata"] == d["metadata"], f"metadata {g['metadata']} vs {d['metadata']}")
        expect(isinstance(g["chunks"], list) and g["chunks"], f"no chunks: {g}")
        raw = d["text"].encode()
        for c in g["chunks"]:
            expect({"chunk", "start", "end", "tokens", "text"} <= set(c), f"chunk fields {sorted(c)}")
            expect(raw[c["start"]:c["end"]].decode() == c["text"],
                   f"chunk {c['chunk']}: text is not the document's bytes {c['start']}..{c['end']}")
            expect(c["tokens"] > 0, f"chunk tokens {c['tokens']}")
    want(req(srv, "GET", "/documents/no-such-doc"), 404, "GET of an unknown id")


def check_store_search(ctx):
    srv, docs = ctx["M"], ctx["docs"]
    bad = []
    for mode in ("dense", "bm25", "hybrid"):
        for d in docs:
            s = search(srv, {"query": d["question"], "k": 3, "mode": mode}, f"{mode} search")
            expect(s.get("mode") == mode and s.get("query") == d["question"] and "took_ms" in s,
                   f"response head {clip(json.dumps(s), 200)}")
            res = s["results"]
            if not res or res[0]["document"] != d["id"]:
                bad.append(f"{mode} {d['question'][:40]!r} -> {[x['document'] for x in res]}")
                continue
            top = res[0]
            for k in ("rank", "score", "document", "source", "title", "chunk", "start", "end", "text",
                      "metadata"):
                expect(k in top, f"result lacks {k}: {sorted(top)}")
            expect(top["rank"] == 1 and top["source"] == d["source"]
                   and top["metadata"] == d["metadata"], f"result {clip(json.dumps(top), 300)}")
    expect(not bad, "wrong first document: " + "; ".join(bad))


def check_store_filters(ctx):
    srv, docs = ctx["M"], ctx["docs"]
    q = docs[0]["question"]
    for mode in ("dense", "bm25", "hybrid"):
        s = search(srv, {"query": q, "k": 10, "mode": mode, "where": {"year": 2021}}, "where year")
        got = {x["document"] for x in s["results"]}
        expect(got <= {"doc1"}, f"{mode} where year=2021 gave {got}")
        if mode == "dense":
            expect(got == {"doc1"}, f"dense where year=2021 gave nothing")
    s = search(srv, {"query": q, "k": 10, "where": {"kind": "news", "lang": "en"}}, "where kind+lang")
    got = {x["document"] for x in s["results"]}
    expect(got == {"doc4", "doc5"}, f"where kind=news, lang=en gave {got}")
    s = search(srv, {"query": q, "k": 10, "where": {"kind": "news", "year": 2020}}, "where, no match")
    expect(s["results"] == [], f"where kind=news year=2020 gave {[x['document'] for x in s['results']]}")
    s = search(srv, {"query": q, "k": 10, "path": "/corpus/news/*"}, "path glob")
    got = {x["document"] for x in s["results"]}
    expect(got == {"doc4", "doc5"}, f"path /corpus/news/* gave {got}")
    s = search(srv, {"query": q, "k": 10, "path": "*/doc[03].txt"}, "path glob with a class")
    got = {x["document"] for x in s["results"]}
    expect(got == {"doc0", "doc3"}, f"path */doc[03].txt gave {got}")
    for body in ({"query": q, "k": 0}, {"query": q, "k": 1001}, {"query": q, "mode": "fuzzy"},
                 {"k": 3}):
        r = req(srv, "POST", "/search", body)
        expect(r.status in (400, 422), f"{json.dumps(body)[-30:]}: {r!r}")


def check_store_delete(ctx):
    srv, docs = ctx["M"], ctx["docs"]
    d = docs[2]
    r = want(req(srv, "DELETE", f"/documents/{d['id']}"), 200, "DELETE").json()
    expect(r == {"id": d["id"], "deleted": True}, f"response {r}")
    want(req(srv, "GET", f"/documents/{d['id']}"), 404, "GET after DELETE")
    want(req(srv, "DELETE", f"/documents/{d['id']}"), 404, "DELETE again")
    for mode in ("dense", "bm25", "hybrid"):
        s = search(srv, {"query": d["question"], "k": 10, "mode": mode}, mode)
        got = [x["document"] for x in s["results"]]
        expect(d["id"] not in got, f"{mode} still returns the deleted {d['id']}: {got}")


def check_read_only(ctx):
    srv = ctx["R"]
    r = want(req(srv, "POST", "/documents", {"id": "new", "text": "New text."}), 403,
             "POST /documents on --read-only")
    want(req(srv, "DELETE", "/documents/doc0"), 403, "DELETE on --read-only")
    want(req(srv, "GET", "/documents/doc0"), 200, "GET still works on --read-only")
    s = search(srv, {"query": ctx["docs"][1]["question"], "k": 1}, "search on --read-only")
    expect(s["results"] and s["results"][0]["document"] == "doc1", f"results {s['results']}")
    info = want(req(srv, "GET", "/info"), 200, "/info").json()
    expect(info["store"]["read_only"] is True, f"store {info['store']}")


def check_no_store(ctx):
    srv = ctx["B"]
    for method, path, body in (("POST", "/search", {"query": "x"}), ("GET", "/documents/doc0", None),
                               ("POST", "/documents", {"id": "a", "text": "b"})):
        r = want(req(srv, method, path, body), 404, f"{method} {path} without --store")
        expect("--store" in r.body.decode("utf-8", "replace"),
               f"{method} {path}: the message does not mention --store: {r!r}")
    info = want(req(srv, "GET", "/info"), 200, "/info").json()
    expect(info.get("store", "absent") is None, f"/info store is {info.get('store', 'absent')!r}")


# ---------------------------------------------------------------- 6. faults

def served_while(srv, seconds, label):
    """Requests on fresh connections for `seconds`; returns the slowest latency."""
    worst, n, end = 0.0, 0, time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        want(req(srv, "GET", "/health", timeout=10), 200, f"/health during {label}")
        v = want(req(srv, "POST", "/embed", {"inputs": ["during"]}, timeout=10), 200,
                 f"/embed during {label}").json()
        expect(len(v) == 1, "one vector")
        worst = max(worst, time.monotonic() - t0)
        n += 1
        time.sleep(0.2)
    return worst, n


def check_stalled_body(ctx):
    srv, timeout = ctx["B"], 2
    s = socket.create_connection((srv.host, srv.port), timeout=30)
    try:
        s.sendall(f"POST /embed HTTP/1.1\r\nHost: {srv.host}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: 100\r\n\r\n".encode() + b'{"inputs": "')
        t_stall = time.monotonic()
        worst, n = served_while(srv, 1.5, "a stalled body")
        expect(worst < 5, f"other clients took up to {worst:.1f} s while a body stalled")
        data = b""
        try:
            while True:
                b = s.recv(4096)
                if not b:
                    break
                data += b
        except socket.timeout:
            raise CheckFailed(f"the stalled connection was still open after "
                              f"{time.monotonic() - t_stall:.0f} s (--timeout {timeout})")
        except ConnectionResetError:
            pass
        waited = time.monotonic() - t_stall
        expect(timeout - 0.5 <= waited <= timeout + 6,
               f"closed after {waited:.1f} s with --timeout {timeout} (response {clip(data, 100)!r})")
        note(f"stalled body closed after {waited:.1f} s; {n} rounds served meanwhile, "
             f"slowest {worst:.2f} s")
    finally:
        s.close()


def check_slowloris(ctx):
    srv = ctx["B"]
    head = (f"POST /embed HTTP/1.1\r\nHost: {srv.host}\r\nContent-Type: application/json\r\n"
            f"X-Padding: {'p' * 64}\r\nContent-Length: 20\r\n\r\n").encode()
    stop = threading.Event()
    state = {"sent": 0, "closed_at": None}

    def dribble():
        s = socket.create_connection((srv.host, srv.port), timeout=30)
        try:
            for i in range(len(head)):
                if stop.is_set():
                    return
                try:
                    s.send(head[i:i + 1])
                except OSError:
                    state["closed_at"] = i
                    return
                state["sent"] = i + 1
                time.sleep(0.5)
        finally:
            s.close()

    t = threading.Thread(target=dribble, daemon=True)
    t.start()
    try:
        time.sleep(0.6)
        worst, n = served_while(srv, 3.0, "slowloris")
        expect(worst < 5, f"other clients took up to {worst:.1f} s during slowloris")
        expect(state["sent"] >= 3, f"the slowloris client sent only {state['sent']} bytes")
        note(f"slowloris: {state['sent']} header bytes dribbled, {n} rounds served, "
             f"slowest {worst:.2f} s")
    finally:
        stop.set()
        t.join(5)


def check_disconnect(ctx):
    """Twice: the client closes at once after sending, then after a third of the work."""
    srv, n = ctx["M"], ctx["n_disconnect"]
    full = ctx["per_text"] * n
    route_done = lambda t: sum(float(x) for x in re.findall(
        r'^embedrag_requests_total\{[^}]*route="/v1/embeddings"[^}]*\} (\S+)$', t, re.M))
    ctx["disconnect_done_s"], ctx["disconnect_gauge"] = [], []
    for delay in (0.0, min(full / 3, 3.0)):
        done0 = route_done(want(req(srv, "GET", "/metrics"), 200, "/metrics").body.decode())
        body = json.dumps({"input": many_texts(n)}).encode()
        head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: {srv.host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        s = socket.create_connection((srv.host, srv.port), timeout=30)
        s.sendall(head + body)
        time.sleep(delay)
        s.close()
        t0 = time.monotonic()
        # The server is done with it when embedrag_requests_total counts it (whatever its
        # status): soon if it dropped the texts, after the rest of `full` if it embedded them all
        # for nobody. Then the queue gauge must be back to 0.
        counted, done_at, gauge = False, None, None
        while time.monotonic() - t0 < 2 * full + 30:
            t = want(req(srv, "GET", "/metrics"), 200, "/metrics").body.decode()
            if route_done(t) > done0:
                counted, done_at = True, time.monotonic() - t0
                break
            time.sleep(0.05)
        while counted and time.monotonic() - t0 < done_at + 3:
            gauge = metric(want(req(srv, "GET", "/metrics"), 200, "/metrics").body.decode(),
                           "embedrag_queue_texts")
            if gauge == 0:
                break
            time.sleep(0.1)
        ctx["disconnect_gauge"].append((delay, gauge))
        v = want(req(srv, "POST", "/embed", {"inputs": [TEXTS[0]]}, timeout=600), 200,
                 "the next request").json()
        close(v[0], ctx["ref"][0], "the next request's vector")
        want(req(srv, "GET", "/health"), 200, "/health")
        expect(srv.alive(), "the server died")
        expect(counted, "embedrag_requests_total never counted the abandoned request")
        ctx["disconnect_done_s"].append((delay, done_at))
        note(f"{n}-text request, client gone {delay:.1f} s after sending: answered "
             f"{done_at:.2f} s later (the whole request takes ~{full:.1f} s); "
             f"embedrag_queue_texts then {gauge}")


def check_disconnect_drops_work(ctx):
    full = ctx["per_text"] * ctx["n_disconnect"]
    runs = ctx.get("disconnect_done_s")
    expect(runs and len(runs) == 2, "the disconnect check did not get that far")
    for delay, dt in runs:
        expect(dt < 0.5 * (full - delay) + 0.5,
               f"client gone after {delay:.1f} s: the abandoned {ctx['n_disconnect']} texts left "
               f"the queue {dt:.1f} s later, about as long as finishing them (~{full - delay:.1f} s)")


def check_disconnect_gauge(ctx):
    runs = ctx.get("disconnect_gauge")
    expect(runs and len(runs) == 2, "the disconnect check did not get that far")
    for delay, gauge in runs:
        expect(gauge == 0, f"client gone after {delay:.1f} s: embedrag_queue_texts stays at {gauge} "
                           f"once the request is answered (texts admitted and not answered: 0)")


def metric(text, name):
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None


def check_metrics(ctx):
    srv = ctx["M"]
    r1 = want(req(srv, "GET", "/metrics"), 200, "/metrics")
    expect(r1.headers.get("content-type", "").startswith("text/plain"),
           f"content-type {r1.headers.get('content-type')}")
    t1 = r1.body.decode()
    for name in ("embedrag_requests_total", "embedrag_tokens_total", "embedrag_texts_total",
                 "embedrag_request_duration_seconds_bucket", "embedrag_backend_info"):
        expect(metric(t1, name) is not None, f"no {name} series")
    expect(re.search(r'embedrag_requests_total\{[^}]*route="[^"]+"[^}]*status="\d+"', t1) or
           re.search(r'embedrag_requests_total\{[^}]*status="\d+"[^}]*route="[^"]+"', t1),
           "embedrag_requests_total has no {route, status} labels")
    want(req(srv, "POST", "/embed", {"inputs": TEXTS}), 200, "/embed")
    t2 = want(req(srv, "GET", "/metrics"), 200, "/metrics").body.decode()
    for name, grow in (("embedrag_requests_total", 1), ("embedrag_tokens_total", ctx["ntokens"]),
                       ("embedrag_texts_total", len(TEXTS))):
        a, b = metric(t1, name), metric(t2, name)
        expect(b - a >= grow, f"{name} went {a} -> {b}, expected +{grow} or more")
    # Every embedding request lands in the queue and compute histograms as in the total's, and
    # their sums make the total's.
    counts = {n: metric(t2, f"embedrag_{n}_seconds_count") for n in ("inference", "queue", "compute")}
    expect(None not in counts.values() and counts["inference"] >= 1 and
           counts["queue"] == counts["inference"] == counts["compute"], f"histogram counts {counts}")
    sums = {n: metric(t2, f"embedrag_{n}_seconds_sum") for n in ("inference", "queue", "compute")}
    expect(abs(sums["queue"] + sums["compute"] - sums["inference"]) <= 1e-6 * max(1.0, sums["inference"]),
           f"queue + compute sums {sums['queue']} + {sums['compute']} against {sums['inference']}")


def check_metrics_backend_info(ctx):
    t = want(req(ctx["M"], "GET", "/metrics"), 200, "/metrics").body.decode()
    found = re.findall(r"^embedrag_backend_info\{([^}]*)\}", t, re.M)
    expect(found, "no embedrag_backend_info series")
    for m in found:
        labels = set(re.findall(r'(\w+)="', m))
        expect({"name", "device", "precision"} <= labels,
               f"embedrag_backend_info has labels {sorted(labels)}; ROUTES.md names name, device, "
               f"precision: {{{m}}}")


def backend_work(text):
    """{(series, backend, lane): value} of the embedrag_backend_*_total counters."""
    found = {}
    for m in re.finditer(r'^(embedrag_backend_\w+_total)\{backend="([^"]+)",lane="(\w+)"\} (\S+)$',
                         text, re.M):
        found[(m.group(1), m.group(2), m.group(3))] = float(m.group(4))
    return found


def check_metrics_backend_work(ctx):
    """Where the engine sent the work: a one-text request is counted on the CPU's latency lane,
    a request past 512 tokens on its bulk lane, each text and token exactly once."""
    srv = ctx["M"]
    reps = 512 // max(1, ctx["ntokens"]) + 2
    for inputs, lane in ((TEXTS[:1], "latency"), (TEXTS * reps, "bulk")):
        tokens = len(ctx["cli_ids"][0]) if len(inputs) == 1 else ctx["ntokens"] * reps
        before = backend_work(want(req(srv, "GET", "/metrics"), 200, "/metrics").body.decode())
        expect(("embedrag_backend_texts_total", "cpu", lane) in before,
               f"no embedrag_backend_texts_total{{backend=\"cpu\",lane=\"{lane}\"}}")
        want(req(srv, "POST", "/embed", {"inputs": inputs}), 200, f"/embed ({lane})")
        after = backend_work(want(req(srv, "GET", "/metrics"), 200, "/metrics").body.decode())
        for key in after:
            grew = after[key] - before.get(key, 0.0)
            series, backend, on = key
            want_grew = {"embedrag_backend_texts_total": len(inputs),
                         "embedrag_backend_tokens_total": tokens}.get(series)
            if backend != "cpu" or on != lane:
                expect(grew == 0, f"{series} on {backend}/{on} grew by {grew} after a {lane} request")
            elif want_grew is not None:
                expect(grew == want_grew, f"{series} on cpu/{lane} grew by {grew}, want {want_grew}")
            else:
                expect(grew > 0, f"{series} on cpu/{lane} did not grow")


def check_sigterm(ctx):
    srv, n = ctx["M"], ctx["n_sigterm"]
    texts = [f"sentence number {i} about a long and winding road" for i in range(n)]
    out = {}

    def run():
        try:
            out["r"] = req(srv, "POST", "/embed", {"inputs": texts}, timeout=300)
        except Exception as e:
            out["e"] = e

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.3)
    expect("r" not in out, "the request finished before SIGTERM; enlarge it")
    srv.proc.send_signal(signal.SIGTERM)
    t.join(300)
    try:
        rc = srv.proc.wait(60)
    except subprocess.TimeoutExpired:
        srv.kill()
        raise CheckFailed("the server did not exit within 60 s of SIGTERM")
    expect("e" not in out, f"the in-flight request failed: {out.get('e')!r}")
    r = want(out["r"], 200, "the request in flight at SIGTERM")
    expect(len(r.json()) == n, f"{len(r.json())} vectors for {n}")
    expect(rc == 0, f"exit status {rc} after SIGTERM; stderr {srv.stderr_tail()!r}")


def check_sigkill_store(ctx):
    store = os.path.join(TMP, "k.db")
    srv = Server("kill", store=store).start()
    docs = ctx["docs"]
    acked, errors = [], []

    def post():
        i = 0
        while True:
            d = dict(store_doc(docs[i % len(docs)]), id=f"k{i}")
            d["text"] += f" Copy {i}."
            try:
                r = req(srv, "POST", "/documents", d, timeout=60)
            except Exception:
                return
            if r.status == 200 and r.json().get("stored") == 1:
                acked.append(d["id"])
            else:
                errors.append(repr(r))
                return
            i += 1

    t = threading.Thread(target=post, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    t0 = time.monotonic()
    while (len(acked) < 8 or time.monotonic() - t0 < 1.0) and time.monotonic() < deadline and \
            t.is_alive():
        time.sleep(0.05)
    srv.proc.kill()
    srv.proc.wait(10)
    t.join(30)
    expect(not errors, f"a POST /documents failed before the kill: {errors[:1]}")
    expect(len(acked) >= 3, f"only {len(acked)} documents acknowledged before the kill")
    sqlite = shutil.which("sqlite3")
    expect(sqlite, "the sqlite3 CLI is not installed")
    p = subprocess.run([sqlite, store, "PRAGMA integrity_check"], capture_output=True, timeout=60)
    expect(p.stdout.strip() == b"ok", f"integrity_check: {clip(p.stdout + p.stderr)}")
    srv2 = Server("kill-restart", store=store).start()
    try:
        missing = [i for i in acked
                   if req(srv2, "GET", "/documents/" + i, timeout=30).status != 200]
        expect(not missing, f"{len(missing)} of {len(acked)} acknowledged documents lost: {missing[:5]}")
        note(f"SIGKILL after {len(acked)} acknowledged documents; all found after the restart")
    finally:
        srv2.stop()


def check_queue_429(ctx):
    srv = ctx["B"]
    words = 40
    tally = []
    for attempt in range(5):
        texts = [("word%d " % i) * words for i in range(8)]
        barrier = threading.Barrier(6)
        results = [None] * 6

        def fire(k):
            barrier.wait()
            try:
                results[k] = req(srv, "POST", "/embed", {"inputs": texts}, timeout=120)
            except Exception as e:
                results[k] = e

        ts = [threading.Thread(target=fire, args=(k,)) for k in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(180)
        bad = [r for r in results if not isinstance(r, Resp) or r.status not in (200, 429)]
        if bad:
            raise CheckFailed(f"a request got neither 200 nor 429: {bad[0]!r}")
        ok = [r for r in results if r.status == 200]
        busy = [r for r in results if r.status == 429]
        tally.append(f"{len(ok)}x200/{len(busy)}x429 at {words} words")
        if ok and busy:
            b = busy[0]
            expect(b.headers.get("retry-after") == "1", f"Retry-After {b.headers.get('retry-after')!r}")
            e = b.json()
            expect(isinstance(e, dict) and e.get("error_type") == "Overloaded",
                   f"429 body {b!r}")
            for r in ok:
                expect(len(r.json()) == 8, "8 vectors")
            note("429: " + ", ".join(tally))
            # a single request larger than the queue is split, never refused for its size
            v = want(req(srv, "POST", "/embed", {"inputs": [f"t{i}" for i in range(20)]}), 200,
                     "20 texts alone against --max-queue 8").json()
            expect(len(v) == 20, f"{len(v)} vectors for 20")
            return
        expect(ok, f"no request got 200: {tally}")
        words *= 2
        words = min(words, 400)
    raise CheckFailed("no 429 with 6 concurrent requests of 8 texts against --max-queue 8: " +
                      ", ".join(tally))


# ---------------------------------------------------------------- the run

def calibrate(srv):
    """Seconds per short text on this build and machine (a sanitizer build is many times slower)."""
    texts = many_texts(64)
    want(req(srv, "POST", "/embed", {"inputs": texts[:4]}), 200, "warm-up")
    t0 = time.monotonic()
    want(req(srv, "POST", "/embed", {"inputs": texts}), 200, "calibration")
    return (time.monotonic() - t0) / 64


def check_exit(srv):
    rc = srv.stop()
    check(f"the {srv.name} server exits 0 on SIGTERM", lambda: expect(
        rc == 0, f"exit status {rc}; stderr {srv.stderr_tail()!r}"))


def check_sanitizer_reports():
    bad = []
    for srv in SERVERS:
        try:
            with open(srv.stderr_path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        m = re.search(r"(ERROR: (Address|Leak|Thread)Sanitizer.*|.*runtime error:.*)", text)
        if m:
            bad.append(f"{srv.name}: {m.group(0)[:300]}")
    expect(not bad, "; ".join(bad))


def group(name, fn):
    """A step outside any check (starting a server): its failure is one failed check."""
    try:
        return fn()
    except Exception as e:
        global checks
        checks += 1
        failures.append(name)
        print(f"not ok - {name}: {e}", flush=True)
        return None


def main():
    if not CLI or not os.access(CLI, os.X_OK) or not os.path.isdir(MODEL):
        print(f"not ok - setup: EMBEDRAG_CLI={CLI!r} and EMBEDRAG_SOURCE_DIR={SRC!r} must name the "
              f"binary and the repository (with {MODEL})")
        return 1
    ctx = {}
    # The CLI's vectors and tokens for everything compared below.
    ctx["ref"] = cli_run("embed", TEXTS, "--device", "cpu", "--quiet")
    ctx["ref64"] = cli_run("embed", TEXTS, "--device", "cpu", "--quiet", "--dimensions", "64")
    tok = cli_run("tokenize", TEXTS)
    ctx["cli_ids"] = [t["ids"] for t in tok]
    ctx["cli_tokens"] = [t["tokens"] for t in tok]
    ctx["ntokens"] = sum(len(i) for i in ctx["cli_ids"])
    p = subprocess.run([CLI, "info", "--model", MODEL], capture_output=True, timeout=120)
    ctx["max_tokens"] = json.loads(p.stdout)["max_tokens"]  # MiniLM: 256, its sentence-transformers limit
    docs = group("load documents", load_documents)
    ctx["docs"] = docs or []

    M = group("start the main server", lambda: Server("main", store=os.path.join(TMP, "s.db")).start())
    if M:
        ctx["M"] = M
        per_text = calibrate(M)
        ctx["per_text"] = per_text
        ctx["n_many"] = 10000 if per_text * 10000 <= 15 else max(1000, int(15 / per_text) // 100 * 100)
        ctx["n_disconnect"] = 5000  # costly only where the server fails to drop the work
        ctx["n_sigterm"] = max(40, min(4000, int(2.0 / per_text)))
        note(f"{per_text * 1000:.2f} ms per short text: {ctx['n_many']} inputs in one request, "
             f"{ctx['n_disconnect']} dropped by their client, {ctx['n_sigterm']} in flight at SIGTERM")
        many = many_texts(ctx["n_many"])
        ctx["ref_many"] = cli_run("embed", [many[i] for i in many_spots(len(many))], "--device",
                                  "cpu", "--quiet")

        check("openai client: base64 (its default) equals the CLI, order, usage", check_openai_base64, ctx)
        check("openai client: encoding_format float", check_openai_float, ctx)
        check("openai client: dimensions=64", check_openai_dimensions, ctx)
        check("openai client: a single string; model optional or prefixed", check_openai_single, ctx)
        check("token ids from /tokenize give the text's vector", check_openai_token_ids, ctx)
        check("model other-model: 404 model_not_found", check_openai_model_not_found, ctx)
        check("TEI /embed: string and list, timing headers", check_tei_embed, ctx)
        check("TEI /embed: normalize false", check_tei_normalize, ctx)
        check("TEI /embed: truncate false -> 413 naming the input; default truncates",
              check_tei_truncate, ctx)
        check("TEI /embed: truncation_direction", check_tei_direction, ctx)
        check("TEI /embed: prompt_name unknown -> 422", check_tei_prompt_name, ctx)
        check("TEI /tokenize", check_tei_tokenize, ctx)
        check("/info and /health", check_info, ctx)
        check("GET / and /openapi.json", check_page_and_openapi, ctx)
        check("malformed JSON -> 422", check_malformed_json, ctx)
        check("a field of the wrong type -> 422 naming it", check_wrong_type, ctx)
        check("empty input -> 400", check_empty_input, ctx)
        check("invalid UTF-8 -> 422 naming index and offset", check_invalid_utf8, ctx)
        check("unknown route 404, wrong method 405", check_unknown_route_and_method, ctx)
        check("a 10 MB string -> 200, truncated", check_ten_megabytes, ctx)
        check(f"{ctx['n_many']} inputs in one request", check_many_inputs, ctx)
        if docs:
            check("POST /documents: one, many, partial failure", check_store_add, ctx)
            check("GET /documents/{id}", check_store_get, ctx)
            check("POST /search dense, bm25, hybrid find the document", check_store_search, ctx)
            check("POST /search where and path filters", check_store_filters, ctx)
            check("DELETE /documents/{id}", check_store_delete, ctx)
        check("/metrics counters grow", check_metrics, ctx)
        check("/metrics embedrag_backend_info{name,device,precision}", check_metrics_backend_info, ctx)
        check("/metrics embedrag_backend_*_total count the work where it ran", check_metrics_backend_work, ctx)
        check("a client that disconnects mid-request leaves the server healthy", check_disconnect, ctx)
        check("its remaining work is dropped", check_disconnect_drops_work, ctx)
        check("embedrag_queue_texts is back to 0 after the disconnects", check_disconnect_gauge, ctx)
        check("SIGTERM: the request in flight gets 200, exit 0", check_sigterm, ctx)
        M.kill()

    B = group("start a server with --max-body-mb 1 --timeout 2 --max-queue 8",
              lambda: Server("limits", ["--max-body-mb", "1", "--timeout", "2", "--max-queue", "8"]).start())
    if B:
        ctx["B"] = B
        check("a body over --max-body-mb -> 413", check_body_too_large, ctx)
        check("without --store the store routes 404 naming --store", check_no_store, ctx)
        check("a stalled body is closed after --timeout; others served meanwhile",
              check_stalled_body, ctx)
        check("slowloris does not block other clients", check_slowloris, ctx)
        check("--max-queue 8: 429 with Retry-After under a burst", check_queue_429, ctx)
        check_exit(B)

    A = group("start a server with $EMBEDRAG_API_KEY",
              lambda: Server("auth", env_extra={"EMBEDRAG_API_KEY": "secret"}).start())
    if A:
        ctx["A"] = A
        check("API key: 401 without or with a wrong key, /health open", check_auth, ctx)
        check("API key: the openai client", check_auth_openai, ctx)
        check_exit(A)

    if M and docs:
        R = group("start a --read-only server on the main store",
                  lambda: Server("read-only", ["--read-only"], store=os.path.join(TMP, "s.db")).start())
        if R:
            ctx["R"] = R
            check("--read-only refuses writes with 403", check_read_only, ctx)
            check_exit(R)
    if docs:
        check("SIGKILL during POST /documents loses no acknowledged document", check_sigkill_store, ctx)

    check("no sanitizer report in any server's stderr", check_sanitizer_reports)
    print(f"# {checks - len(failures)} of {checks} checks passed in "
          f"{time.monotonic() - T_START:.0f} s", flush=True)
    if failures:
        print("# failed: " + "; ".join(failures), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
    try:
        code = main()
    except CheckFailed as e:
        print(f"not ok - setup: {e}", flush=True)
        code = 1
    except Exception:
        print("not ok - the test itself crashed:", flush=True)
        traceback.print_exc()
        code = 1
    finally:
        cleanup()
    sys.exit(code)
