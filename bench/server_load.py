#!/usr/bin/env python3
"""Load client for embedding HTTP servers: `embedrag serve` or a peer (infinity, TEI, ...).

Python 3 standard library only. Every client is one asyncio task with its own raw keep-alive
HTTP/1.1 connection (asyncio streams), sending one request at a time (a closed loop):
round(clients * mix) clients send single queries, the rest send batches of --batch texts.

    # start embedrag itself, 64 clients for 30 s, half of them queries
    bench/server_load.py --cli build-release/embedrag --threads 2 --json out.json
    # a server that is already running (a peer): token counts from a file made before
    bench/server_load.py --url http://127.0.0.1:7997 --path /embeddings --pid PID \
        --token-counts counts.json --json peer.json
    # server batch throughput against `embedrag embed` on the very same batch texts
    bench/server_load.py --cli build-release/embedrag --threads 2 --mix 0 --baseline-embed

Texts: real sentences of the STS Benchmark (../shared/data/stsb-en-dev.csv, relative to the
repository), picked with --seed. Queries are single sentences of --query-tokens (+-2) tokens;
batch texts are sentences joined up to --batch-tokens (+-3) tokens. Token counts are exact (the
model's WordPiece tokens, [CLS] and [SEP] included), asked once per distinct text from an
embedrag server's POST /tokenize: the one this script starts (--cli), or read from
--token-counts FILE (written there when the file does not exist yet and --cli is given).

Throughput of a class is its completed texts (tokens) divided by the time from the start of the
load to that class's last completion: after --duration no client sends a new request, the
requests in flight are waited for (so the batch class also counts its drain). The figures over
completions inside the --duration window alone are in the JSON too (`in_window`). A 429 is
counted apart from the other errors and its client waits Retry-After (at most 1 s) before the
next request, as a real client would.
"""
import argparse
import asyncio
import csv
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- HTTP/1.1 over asyncio streams

class HTTPError(Exception):
    pass


class Conn:
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def open(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    def close(self):
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:
                pass
        self.reader = self.writer = None

    async def request(self, raw):
        """Sends the prebuilt request bytes; returns (status, headers, body)."""
        if self.writer is None:
            await self.open()
        self.writer.write(raw)
        await self.writer.drain()
        line = await self.reader.readline()
        if not line:
            raise HTTPError("connection closed")
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HTTPError("bad status line %r" % line[:80])
        status = int(parts[1])
        headers = {}
        while True:
            line = await self.reader.readline()
            if not line:
                raise HTTPError("connection closed in headers")
            if line in (b"\r\n", b"\n"):
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    while (await self.reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            body = b"".join(chunks)
        elif "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        else:  # no length: the body runs to the end of the connection
            body = await self.reader.read()
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body


def build_request(host, port, path, payload, api_key=None):
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    head = ("POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            "Accept: application/json\r\nContent-Length: %d\r\n" % (path, host, port, len(body)))
    if api_key:
        head += "Authorization: Bearer %s\r\n" % api_key
    return (head + "\r\n").encode() + body


async def one_request(host, port, path, payload, timeout=120):
    c = Conn(host, port)
    try:
        return await asyncio.wait_for(c.request(build_request(host, port, path, payload)), timeout)
    finally:
        c.close()


# ---------------------------------------------------------------- the embedrag server

class Server:
    """`embedrag serve --port 0 --quiet`, started and stopped by this script."""

    def __init__(self, cli, model, threads=None, extra=()):
        self.cmd = [cli, "serve", "--port", "0", "--model", model, "--quiet"]
        if threads:
            self.cmd += ["--threads", str(threads)]
        self.cmd += list(extra)
        self.proc = None
        self.host = self.port = None
        self.exit_code = None

    def start(self, timeout=180):
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        deadline = time.time() + timeout
        line = b""
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            text = line.decode(errors="replace").strip()
            if text.startswith("listening on http://"):
                u = urllib.parse.urlsplit(text.split()[-1])
                self.host, self.port = u.hostname, u.port
                # drain whatever else it prints so that it never blocks on a full pipe
                threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
                return self
        self.stop()
        raise SystemExit("embedrag serve did not say where it listens (last line %r): %s"
                         % (line, " ".join(self.cmd)))

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            self.exit_code = None if self.proc is None else self.proc.returncode
            return self.exit_code
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.exit_code = self.proc.wait()
        return self.exit_code


# ---------------------------------------------------------------- texts and token counts

def read_sentences(path):
    seen, out = set(), []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            for s in row[:2]:
                s = " ".join(s.split())
                if s and s not in seen:
                    seen.add(s)
                    out.append(s)
    return out


async def tokenize_counts(host, port, texts, chunk=256):
    counts = {}
    for i in range(0, len(texts), chunk):
        part = texts[i:i + chunk]
        status, _, body = await one_request(host, port, "/tokenize", {"inputs": part})
        if status != 200:
            raise SystemExit("POST /tokenize: %d %s" % (status, body[:200]))
        for t, toks in zip(part, json.loads(body)):
            counts[t] = len(toks)
    return counts


def pick_texts(sentences, counts, args):
    """Deterministic (seeded) query pool and batch-text pool; batch texts still need counting."""
    rng = random.Random(args.seed)
    q = args.query_tokens
    queries = [s for s in sentences if abs(counts[s] - q) <= 2]
    rng.shuffle(queries)
    queries = queries[:args.query_pool]
    if len(queries) < 10:
        raise SystemExit("only %d sentences of %d+-2 tokens" % (len(queries), q))

    # batch texts: sentences joined with a space; a sentence of c tokens adds c - 2 ([CLS] and
    # [SEP] come once per text). Exact counts are asked again for the joined texts.
    target, lo, hi = args.batch_tokens, args.batch_tokens - 3, args.batch_tokens + 3
    n = -(-args.batch_pool // args.batch) * args.batch  # a whole number of batches
    out, seen = [], set()
    for _ in range(50):
        order = sentences[:]
        rng.shuffle(order)
        cur, ntok, pending = [], 2, []
        for s in order:
            c = counts[s] - 2
            if ntok + c > hi:
                pending.append(s)
                if len(pending) > 50:
                    pending.pop(0)
                # try a shorter leftover that fits
                for j, p in enumerate(pending):
                    if ntok + counts[p] - 2 <= hi:
                        cur.append(pending.pop(j))
                        ntok += counts[cur[-1]] - 2
                        break
            else:
                cur.append(s)
                ntok += c
            if ntok >= lo:
                text = " ".join(cur)
                if text not in seen:
                    seen.add(text)
                    out.append(text)
                if len(out) == n:
                    return queries, out
                cur, ntok = [], 2
    raise SystemExit("could not build %d batch texts of %d tokens" % (n, target))


async def prepare_texts(args, host, port):
    sentences = read_sentences(args.data)
    counts = None
    if args.token_counts and os.path.exists(args.token_counts):
        with open(args.token_counts) as f:
            counts = json.load(f)["counts"]
    need_server = counts is None or any(s not in counts for s in sentences)
    brief = None
    if need_server:
        if host is None:
            if not args.cli:
                raise SystemExit("token counts: give --cli (an embedrag to ask) or --token-counts FILE")
            brief = Server(args.cli, args.model, args.threads).start()
            host, port = brief.host, brief.port
        counts = dict(counts or {})
        counts.update(await tokenize_counts(host, port, [s for s in sentences if s not in counts]))
    queries, batch_texts = pick_texts(sentences, counts, args)
    missing = [t for t in batch_texts if t not in counts]
    if missing:
        if host is None:
            if not args.cli:
                raise SystemExit("%s lacks the batch texts' counts; give --cli" % args.token_counts)
            brief = Server(args.cli, args.model, args.threads).start()
            host, port = brief.host, brief.port
        counts.update(await tokenize_counts(host, port, missing))
    if brief is not None:
        brief.stop()
    if args.token_counts and (need_server or missing):
        with open(args.token_counts, "w") as f:
            json.dump({"source": os.path.abspath(args.data), "counts": counts}, f, ensure_ascii=False)
    return queries, batch_texts, counts


# ---------------------------------------------------------------- RSS

def rss_kib(pid, field="VmRSS"):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler:
    def __init__(self, pid):
        self.pid = pid
        self.samples = []  # (t, KiB)
        self.task = None

    def sample(self):
        v = rss_kib(self.pid) if self.pid else None
        if v is not None:
            self.samples.append((time.perf_counter(), v))
        return v

    async def run(self):
        while True:
            self.sample()
            await asyncio.sleep(1.0)

    def start(self):
        if self.pid:
            self.task = asyncio.ensure_future(self.run())

    async def stop(self):
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass


# ---------------------------------------------------------------- statistics

def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = (len(sorted_vals) - 1) * p / 100.0
    f = int(k)
    c = min(f + 1, len(sorted_vals) - 1)
    return sorted_vals[f] + (sorted_vals[c] - sorted_vals[f]) * (k - f)


def lat_summary(lat_s):
    v = sorted(x * 1000.0 for x in lat_s)
    if not v:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    return {"p50_ms": pct(v, 50), "p90_ms": pct(v, 90), "p99_ms": pct(v, 99), "max_ms": v[-1],
            "mean_ms": statistics.fmean(v)}


# ---------------------------------------------------------------- the load

class Plan:
    """What each request sends: prebuilt request bytes, cycled by a shared cursor per class."""

    def __init__(self, reqs):
        self.reqs = reqs  # list of (raw bytes, texts, tokens)
        self.i = 0

    def next(self):
        r = self.reqs[self.i % len(self.reqs)]
        self.i += 1
        return r


def make_payload(api, texts, model_name):
    if api == "openai":
        p = {"input": texts, "encoding_format": "float"}
        if model_name:
            p["model"] = model_name
        return p
    return {"inputs": texts}


def check_body(api, body, n):
    d = json.loads(body)
    vecs = [x["embedding"] for x in d["data"]] if api == "openai" else d
    if len(vecs) != n or not all(isinstance(v, list) and len(v) > 0 for v in vecs):
        raise SystemExit("response holds %d vectors for %d texts" % (len(vecs), n))
    return len(vecs[0])


async def idle_baseline(host, port, plan, api, n, warmup_batches):
    conn = Conn(host, port)
    lats = []
    dim = None
    try:
        for k in range(5 + n):
            raw, nt, _ = plan["query"].next()
            t0 = time.perf_counter()
            status, _, body = await conn.request(raw)
            dt = time.perf_counter() - t0
            if status != 200:
                raise SystemExit("idle query: HTTP %d %s" % (status, body[:300]))
            if k == 0:
                dim = check_body(api, body, nt)
            if k >= 5:
                lats.append(dt)
        for k in range(warmup_batches):
            raw, nt, _ = plan["batch"].next()
            status, _, body = await conn.request(raw)
            if status != 200:
                raise SystemExit("warm-up batch: HTTP %d %s" % (status, body[:300]))
            if k == 0:
                check_body(api, body, nt)
    finally:
        conn.close()
    s = lat_summary(lats)
    s["queries"] = len(lats)
    s["dimension"] = dim
    return s


async def run_load(args, host, port, plan, pid):
    nq = int(round(args.clients * args.mix))
    classes = ["query"] * nq + ["batch"] * (args.clients - nq)
    recs = {"query": [], "batch": []}  # (t_done, latency, status, texts, tokens)
    errors = {"query": {}, "batch": {}}
    issued = [0]
    sampler = RssSampler(pid)
    t_start = time.perf_counter()
    deadline = None if args.requests else t_start + args.duration

    def more():
        if args.requests:
            if issued[0] >= args.requests:
                return False
            issued[0] += 1
            return True
        return time.perf_counter() < deadline

    # --query-rate R: the query clients together send R queries per second at most (each waits
    # nq / R seconds from one send to its next), as users asking questions while a bulk job runs,
    # rather than a closed loop that alone saturates the machine.
    query_period = nq / args.query_rate if args.query_rate and nq else 0.0

    async def client(cls):
        conn = Conn(host, port)
        if cls == "query" and query_period:
            await asyncio.sleep(random.random() * query_period)  # spread the clients out
        try:
            while more():
                raw, nt, ntok = plan[cls].next()
                t0 = time.perf_counter()
                if cls == "query" and query_period:
                    next_send = t0 + query_period
                try:
                    status, headers, _ = await asyncio.wait_for(conn.request(raw), args.request_timeout)
                except asyncio.TimeoutError:
                    errors[cls]["timeout"] = errors[cls].get("timeout", 0) + 1
                    conn.close()
                    continue
                except (OSError, HTTPError, asyncio.IncompleteReadError, ValueError) as e:
                    key = "conn:" + type(e).__name__
                    errors[cls][key] = errors[cls].get(key, 0) + 1
                    conn.close()
                    await asyncio.sleep(0.05)
                    continue
                t1 = time.perf_counter()
                # The server's own view where it sends one (TEI's x-total-time, in ms): what the
                # client's latency adds beyond it is the wake-up, the socket and this client.
                # Its split (x-queue-time: waiting in the engine, for a lane, the device or the
                # CPU's threads; x-inference-time: the batches' own time) says where a tail is.
                def header_s(name):
                    try:
                        return float(headers[name]) / 1e3
                    except (KeyError, ValueError):
                        return None
                recs[cls].append((t1, t1 - t0, status, nt, ntok, header_s("x-total-time"),
                                  header_s("x-queue-time"), header_s("x-inference-time")))
                if cls == "query" and query_period and next_send > t1:
                    await asyncio.sleep(next_send - t1)
                if status == 429:
                    try:
                        wait = float(headers.get("retry-after", "1"))
                    except ValueError:
                        wait = 1.0
                    await asyncio.sleep(min(max(wait, 0.0), 1.0))
        finally:
            conn.close()

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    rss_start = sampler.sample()
    sampler.start()
    await asyncio.gather(*(client(c) for c in classes))
    t_end = time.perf_counter()
    await sampler.stop()
    rss_end = sampler.sample()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    elapsed = t_end - t_start

    out = {"clients": {"query": nq, "batch": args.clients - nq}, "elapsed_s": elapsed,
           "client_cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)}
    tot_texts = tot_tokens = 0
    for cls in ("query", "batch"):
        r = recs[cls]
        ok = [x for x in r if x[2] == 200]
        by_status = {}
        for x in r:
            if x[2] != 200:
                by_status[str(x[2])] = by_status.get(str(x[2]), 0) + 1
        by_status.update(errors[cls])
        texts = sum(x[3] for x in ok)
        tokens = sum(x[4] for x in ok)
        tot_texts += texts
        tot_tokens += tokens
        last = max((x[0] for x in r), default=t_start)
        span = max(last - t_start, 1e-9)
        d = {"requests": len(r), "ok": len(ok), "texts": texts, "tokens": tokens,
             "span_s": span if r else 0.0,
             "texts_per_s": texts / span if r else 0.0,
             "tokens_per_s": tokens / span if r else 0.0,
             "requests_per_s": len(ok) / span if r else 0.0,
             "status_429": by_status.pop("429", 0),
             "errors": by_status}
        d.update(lat_summary([x[1] for x in ok]))
        for key, i in (("server_total", 5), ("server_queue", 6), ("server_inference", 7)):
            server_side = [x[i] for x in ok if x[i] is not None]
            if server_side:
                d[key] = lat_summary(server_side)
        if deadline is not None:
            w = [x for x in ok if x[0] <= deadline]
            d["in_window"] = {"requests": len(w), "texts_per_s": sum(x[3] for x in w) / args.duration,
                              "tokens_per_s": sum(x[4] for x in w) / args.duration}
        out[cls] = d
    out["total"] = {"texts": tot_texts, "tokens": tot_tokens, "texts_per_s": tot_texts / elapsed,
                    "tokens_per_s": tot_tokens / elapsed}
    if pid:
        vals = [v for _, v in sampler.samples]
        out["rss"] = {"pid": pid, "samples": len(vals),
                      "start_mib": rss_start / 1024 if rss_start else None,
                      "end_mib": rss_end / 1024 if rss_end else None,
                      "max_mib": max(vals) / 1024 if vals else None,
                      "hwm_mib": (rss_kib(pid, "VmHWM") or 0) / 1024 or None,
                      "series_mib": [[round(t - t_start, 2), round(v / 1024, 1)] for t, v in sampler.samples]}
    return out


# ---------------------------------------------------------------- `embedrag embed` baseline

def baseline_embed(args, batch_texts, counts, volume):
    # The same volume of text the server embedded in the load (the batch texts cycled), so that
    # the command's start-up and its pipeline's ramp weigh as little as in the server's run: on
    # a GPU the 1000 distinct texts alone are a fraction of a second.
    batch_texts = [batch_texts[i % len(batch_texts)] for i in range(max(volume, len(batch_texts)))]
    tokens = sum(counts[t] for t in batch_texts)
    with tempfile.TemporaryDirectory() as d:
        big = os.path.join(d, "batch.txt")
        one = os.path.join(d, "one.txt")
        with open(big, "w", encoding="utf-8") as f:
            f.write("".join(t.replace("\n", " ") + "\n" for t in batch_texts))
        with open(one, "w", encoding="utf-8") as f:
            f.write(batch_texts[0] + "\n")

        def run(path):
            cmd = [args.cli, "embed", "--model", args.model, "--format", "f32", "--input", path, "--quiet"]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            t0 = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
            return time.perf_counter() - t0, cmd

        startup = min(run(one)[0] for _ in range(3))
        walls = []
        for _ in range(args.baseline_runs):
            w, cmd = run(big)
            walls.append(w)
    wall = statistics.median(walls)
    net = max(wall - startup, 1e-9)
    return {"command": " ".join(cmd).replace(big, "BATCH_TEXTS_FILE") + " > /dev/null",
            "texts": len(batch_texts), "tokens": tokens, "runs_s": walls, "wall_s": wall,
            "startup_s": startup,
            "texts_per_s": len(batch_texts) / net, "tokens_per_s": tokens / net,
            "texts_per_s_raw": len(batch_texts) / wall, "tokens_per_s_raw": tokens / wall}


# ---------------------------------------------------------------- report

def fmt(v, spec="%.1f"):
    return "-" if v is None else spec % v


def print_report(res):
    lab = res.get("label") or ""
    print("== %s %s, %d clients (%d query, %d batch of %d), %s" % (
        lab, res["target"], res["config"]["clients"], res["load"]["clients"]["query"],
        res["load"]["clients"]["batch"], res["config"]["batch"],
        "%d requests" % res["config"]["requests"] if res["config"]["requests"]
        else "%g s" % res["config"]["duration"]))
    print("%-6s %7s %9s %10s %8s %8s %8s %9s %6s %s" % (
        "class", "reqs", "texts/s", "tokens/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "429", "errors"))
    for cls in ("query", "batch"):
        d = res["load"][cls]
        if not d["requests"]:
            continue
        print("%-6s %7d %9.1f %10.0f %8s %8s %8s %9s %6d %s" % (
            cls, d["requests"], d["texts_per_s"], d["tokens_per_s"], fmt(d["p50_ms"]),
            fmt(d["p90_ms"]), fmt(d["p99_ms"]), fmt(d["max_ms"]), d["status_429"],
            ",".join("%s:%d" % kv for kv in sorted(d["errors"].items())) or "0"))
    for cls in ("query", "batch"):
        for key, header in (("server_total", "x-total-time"), ("server_queue", "x-queue-time"),
                            ("server_inference", "x-inference-time")):
            st = res["load"][cls].get(key)
            if st:
                print("%-6s server's %s (whole ms): p50 %s, p90 %s, p99 %s, max %s" % (
                    cls, header, fmt(st["p50_ms"]), fmt(st["p90_ms"]), fmt(st["p99_ms"]),
                    fmt(st["max_ms"])))
    t = res["load"]["total"]
    print("%-6s %7s %9.1f %10.0f   (over %.1f s; client CPU %.1f s)" % (
        "total", "", t["texts_per_s"], t["tokens_per_s"], res["load"]["elapsed_s"], res["load"]["client_cpu_s"]))
    i = res.get("idle")
    if i:
        print("idle: %d sequential queries p50 %s ms, p99 %s ms" % (i["queries"], fmt(i["p50_ms"], "%.2f"), fmt(i["p99_ms"], "%.2f")))
    r = res["load"].get("rss")
    if r:
        print("RSS MiB (pid %d): start %s, end %s, max %s (kernel peak %s)" % (
            r["pid"], fmt(r["start_mib"]), fmt(r["end_mib"]), fmt(r["max_mib"]), fmt(r["hwm_mib"])))
    b = res.get("baseline_embed")
    if b:
        print("embedrag embed on the %d batch texts: %.1f texts/s, %.0f tokens/s (median of %d, %.3f s startup taken off; raw %.0f tokens/s)" % (
            b["texts"], b["texts_per_s"], b["tokens_per_s"], len(b["runs_s"]), b["startup_s"], b["tokens_per_s_raw"]))
        if res.get("server_vs_embed") is not None:
            print("server batch tokens/s / embed tokens/s = %.3f%s" % (
                res["server_vs_embed"], "" if res["config"]["mix"] == 0 else "  (mixed load: use --mix 0 for the comparison)"))


# ---------------------------------------------------------------- main

async def amain(args):
    if args.counts_only:
        pass
    elif args.url:
        u = urllib.parse.urlsplit(args.url)
        host, port = u.hostname, u.port or 80
        target = args.url
        server = None
        pid = args.pid
    elif args.cli:
        server = None
        host = port = None
        pid = None
    else:
        raise SystemExit("give --cli PATH (start embedrag serve) or --url http://HOST:PORT")

    if args.counts_only:
        if not args.token_counts:
            raise SystemExit("--counts-only needs --token-counts FILE")
        queries, batch_texts, counts = await prepare_texts(args, None, None)
        print("%s: %d queries, %d batch texts, %d counts" % (args.token_counts, len(queries), len(batch_texts), len(counts)))
        return None
    res = {"label": args.label, "config": {k: v for k, v in vars(args).items()},
           "machine": {"nproc": os.cpu_count(), "loadavg_before": os.getloadavg()}}
    try:
        if not args.url:
            server = Server(args.cli, args.model, args.threads, args.serve_arg).start()
            host, port, pid = server.host, server.port, server.proc.pid
            target = "embedrag serve %s" % " ".join(server.cmd[2:])
            res["server_command"] = " ".join(server.cmd)
            res["rss_ready_mib"] = (rss_kib(pid) or 0) / 1024
            queries, batch_texts, counts = await prepare_texts(args, host, port)
        else:
            queries, batch_texts, counts = await prepare_texts(args, None, None)
        res["target"] = target
        path = args.path or ("/v1/embeddings" if args.api == "openai" else "/embed")
        model_name = args.model_name
        if model_name is None and args.api == "openai":
            model_name = os.path.basename(os.path.normpath(args.model))
        res["config"]["path"] = path
        res["config"]["model_name"] = model_name
        qreqs = [(build_request(host, port, path, make_payload(args.api, [q], model_name), args.api_key),
                  1, counts[q]) for q in queries]
        breqs = []
        for i in range(0, len(batch_texts), args.batch):
            part = batch_texts[i:i + args.batch]
            breqs.append((build_request(host, port, path, make_payload(args.api, part, model_name), args.api_key),
                          len(part), sum(counts[t] for t in part)))
        plan = {"query": Plan(qreqs), "batch": Plan(breqs)}
        res["texts"] = {
            "source": os.path.relpath(os.path.abspath(args.data), ROOT), "seed": args.seed,
            "queries": len(queries), "query_tokens_mean": statistics.fmean(counts[q] for q in queries),
            "batch_texts": len(batch_texts),
            "batch_tokens_mean": statistics.fmean(counts[t] for t in batch_texts),
            "batch_tokens_min": min(counts[t] for t in batch_texts),
            "batch_tokens_max": max(counts[t] for t in batch_texts),
            "query_example": queries[0], "batch_example": batch_texts[0]}
        if args.idle_queries:
            res["idle"] = await idle_baseline(host, port, plan, args.api, args.idle_queries,
                                              2 if args.mix < 1 else 0)
        res["load"] = await run_load(args, host, port, plan, pid)
    finally:
        if server is not None:
            res["server_exit_code"] = server.stop()
    res["machine"]["loadavg_after"] = os.getloadavg()
    if args.baseline_embed:
        if not args.cli:
            raise SystemExit("--baseline-embed needs --cli")
        b = res["load"]["batch"]
        res["baseline_embed"] = baseline_embed(args, batch_texts, counts,
                                               b["texts"])
        res["server_vs_embed"] = (b["tokens_per_s"] / res["baseline_embed"]["tokens_per_s"]
                                  if b["requests"] else None)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cli", help="embedrag binary: starts `CLI serve --port 0 --model DIR --quiet` (unless --url), "
                    "asks it for token counts, runs --baseline-embed")
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "all-MiniLM-L6-v2"), help="model directory")
    ap.add_argument("--threads", type=int, help="--threads for embedrag serve and embed (default: theirs)")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra argument for embedrag serve (repeatable)")
    ap.add_argument("--url", help="target a running server, http://HOST:PORT")
    ap.add_argument("--pid", type=int, help="sample this process's RSS (a server this script did not start)")
    ap.add_argument("--api", choices=["openai", "tei"], default="openai")
    ap.add_argument("--path", help="route (default /v1/embeddings for openai, /embed for tei; infinity: /embeddings)")
    ap.add_argument("--model-name", help="openai `model` field (default: the model directory's name)")
    ap.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    ap.add_argument("--requests", type=int, help="stop after N requests in all instead of --duration")
    ap.add_argument("--mix", type=float, default=0.5, help="share of clients sending single queries")
    ap.add_argument("--batch", type=int, default=100, help="texts per batch request")
    ap.add_argument("--query-tokens", type=int, default=16)
    ap.add_argument("--batch-tokens", type=int, default=50)
    ap.add_argument("--query-pool", type=int, default=1000, help="distinct queries (at most)")
    ap.add_argument("--batch-pool", type=int, default=1000, help="distinct batch texts (rounded up to whole batches)")
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "stsb-en-dev.csv"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--token-counts", help="JSON of exact token counts: read if present, else written")
    ap.add_argument("--counts-only", action="store_true",
                    help="only write --token-counts FILE for these text options (with --cli), no load")
    ap.add_argument("--idle-queries", type=int, default=200, help="sequential queries on the idle server first (0: none)")
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--query-rate", type=float, default=0,
                    help="queries per second of all query clients together (default 0: each "
                         "sends its next query as soon as the last is answered)")
    ap.add_argument("--baseline-embed", action="store_true",
                    help="after the load, time `CLI embed --format f32` on exactly the batch texts")
    ap.add_argument("--baseline-runs", type=int, default=3)
    ap.add_argument("--label", default="")
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args()
    if not 0 <= args.mix <= 1:
        ap.error("--mix is a share, 0..1")
    if args.cli:
        args.cli = os.path.abspath(args.cli)
    res = asyncio.run(amain(args))
    if res is None:
        return 0
    print_report(res)
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, ensure_ascii=False)
    bad = sum(sum(res["load"][c]["errors"].values()) for c in ("query", "batch"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
