#!/usr/bin/python3
"""The search page of `embedrag serve` (GET /) in headless Chromium.

Starts the server on a free port with a new store, adds documents made of STS-B sentences, opens
the page, searches by pressing Enter (dense, then bm25), and checks the results, the highlighting,
the escaping of the passage text, the API-key prompt after a 401 and the server's error message
(a server without --store). Saves a screenshot, server-page.png, to $EMBEDRAG_TEST_OUTPUT (the
system's temporary directory by default).

Needs Debian's chromium, chromium-driver and python3-selenium; run with /usr/bin/python3. Where
they are missing it says so and exits 77 (a skip). Environment: EMBEDRAG_CLI (the built binary),
EMBEDRAG_SOURCE_DIR (the repository root). Prints `ok - ...` or `not ok - ...` per check and exits
1 when one failed.
"""

import csv
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
WAIT_S = 30

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException, WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError as e:
    print("skip: selenium is not importable by %s (%s); install python3-selenium" % (sys.executable, e))
    sys.exit(77)
for tool in (CHROMEDRIVER, CHROMIUM):
    if not os.access(tool, os.X_OK):
        print("skip: %s is missing; install chromium and chromium-driver" % tool)
        sys.exit(77)

checks = 0
failures = 0


def check(what, ok, detail=""):
    global checks, failures
    checks += 1
    if ok:
        print("ok - %s" % what)
    else:
        failures += 1
        print("not ok - %s%s" % (what, (": " + detail) if detail else ""))
    sys.stdout.flush()
    return ok


# Requests go straight to the server, whatever proxy the environment names.
http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def request(base, method, path, body=None, key=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", "Bearer " + key)
    try:
        with http.open(req, timeout=60) as res:
            return res.status, res.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


class Server:
    """`embedrag serve` on a free port; stdout is read on a thread so the pipe never fills."""

    def __init__(self, cli, args, log_path, env=None):
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen([cli, "serve", "--port", "0"] + args, stdout=subprocess.PIPE,
                                     stderr=self.log, env=env)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.base = None

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.decode("utf-8", "replace"))
        self.lines.put(None)

    def wait_listening(self, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                return False
            m = re.search(r"listening on (http://\S+:\d+)", line)
            if m:
                self.base = m.group(1).rstrip("/")
                return True
        return False

    def stop(self):
        """SIGTERM, then SIGKILL after 15 s; the exit status (None where it had to be killed)."""
        rc = self.proc.poll()
        if rc is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                rc = None
        self.log.close()
        return rc


# Four documents of real English text: STS-B sentences on one topic each (a sentence that names
# two topics is left out), and a fifth whose text is HTML, to check that the page escapes it.
TOPICS = [
    ("music", "Playing music", r"\b(guitar|piano|flute|violin|cello|drums?|harp|keyboard)\b"),
    ("horses", "Horses", r"\bhorses?\b"),
    ("cooking", "In the kitchen", r"\b(onions?|potato(es)?|eggs?|cooking|cooks|slices|slicing)\b"),
    ("syria", "News: Syria", r"\b(Syria|Syrian)\b"),
]


def make_documents(csv_path):
    picked = {doc_id: [] for doc_id, _, _ in TOPICS}
    seen = set()
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            for sentence in row[:2]:
                sentence = sentence.strip()
                if not sentence or sentence in seen:
                    continue
                hits = [t[0] for t in TOPICS if re.search(t[2], sentence, re.I)]
                if len(hits) == 1 and len(picked[hits[0]]) < 8:
                    picked[hits[0]].append(sentence)
                    seen.add(sentence)
    docs = [{"id": doc_id, "title": title, "text": " ".join(picked[doc_id]),
             "source": "stsb-en-dev.csv#" + doc_id, "metadata": {"topic": doc_id}}
            for doc_id, title, _ in TOPICS]
    docs.append({"id": "markup", "title": "<i>Markup</i> test", "source": "markup.html",
                 "text": "A zebra crossing drawn in <b>bold</b> markup. "
                         "<img src=x onerror=\"window.embedragPwned=1\"> "
                         "<script>window.embedragPwned=2</script> The zebra stays plain text."})
    return docs


def start_browser(tmp):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-proxy-server", "--window-size=1200,900",
                "--user-data-dir=" + os.path.join(tmp, "chromium-profile")):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_path=os.path.join(tmp, "chromedriver.log")),
                              options=opts)
    driver.set_page_load_timeout(WAIT_S)
    return driver


def page_state(driver):
    """What the page shows: the status line and each result's document and text."""
    return driver.execute_script("""
        var s = document.getElementById('status');
        return {status: s.textContent, error: s.classList.contains('error'),
                results: Array.prototype.map.call(document.querySelectorAll('#results .result'),
                    function (r) { return {document: r.getAttribute('data-document'),
                                           text: r.textContent,
                                           marks: Array.prototype.map.call(
                                               r.querySelectorAll('mark'),
                                               function (m) { return m.textContent; })}; })};""")


def wait_for(driver, what, cond):
    """Polls cond(page_state) until it holds or WAIT_S pass; the last state seen."""
    state = {}

    def probe(d):
        nonlocal state
        state = page_state(d)
        return cond(state)

    try:
        WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(probe)
        return True, state
    except TimeoutException:
        check(what, False, "timed out after %d s; page shows %s" % (WAIT_S, json.dumps(state)[:600]))
        return False, state


def search(driver, query, mode=None):
    box = driver.find_element(By.ID, "query")
    box.clear()
    box.send_keys(query)
    if mode is not None:
        Select(driver.find_element(By.ID, "mode")).select_by_value(mode)
    driver.find_element(By.ID, "query").send_keys(Keys.ENTER)


def status_done(mode):
    return lambda s: not s["error"] and re.search(r"\d+ results? in .* ms \(%s\)" % mode, s["status"])


def test_search_page(driver, base, out_dir):
    driver.get(base + "/")
    check("GET / is the search page", "embedrag" in driver.title.lower(), driver.title)
    ids = ["query", "mode", "k", "path", "search", "results", "status"]
    missing = [i for i in ids if not driver.find_elements(By.ID, i)]
    check("the page has #" + ", #".join(ids), not missing, "missing " + ", ".join(missing))
    modes = [o.get_attribute("value") for o in Select(driver.find_element(By.ID, "mode")).options]
    check("the mode switch offers dense, bm25 and hybrid", modes == ["dense", "bm25", "hybrid"], str(modes))
    external = driver.execute_script(
        "return Array.prototype.map.call(document.querySelectorAll('script[src],link[href],img[src]'),"
        " function (e) { return e.outerHTML; });")
    check("the page loads no external assets", not external, str(external))

    # Dense: the guitar sentences' document comes first, with the query's word marked.
    search(driver, "a man playing the guitar")
    done, state = wait_for(driver, "dense search shows results", status_done("dense"))
    if done:
        res = state["results"]
        check("dense search shows results", len(res) > 0, json.dumps(state)[:300])
        if res:
            check("dense: the top result is the music document", res[0]["document"] == "music",
                  "top is %r" % res[0]["document"])
            marks = [m.lower() for m in res[0]["marks"]]
            check("dense: <mark> highlights the query word 'guitar'", "guitar" in marks, str(marks))
            check("dense: only query words are marked",
                  all(m.startswith(("man", "playing", "the", "guitar")) for m in marks), str(marks))
            top = driver.find_element(By.CSS_SELECTOR, "#results .result")
            head = top.text
            check("dense: the result shows rank, 3-decimal score, source, chunk and offsets",
                  re.search(r"#1\b", head) and re.search(r"\b\d\.\d{3}\b", head)
                  and "stsb-en-dev.csv#music" in head and re.search(r"chunk \d+", head)
                  and re.search(r"bytes \d+\u2013\d+", head), head[:200])
        check("dense: the status shows the search time", re.search(r"in [\d.]+ ms", state["status"]),
              state["status"])
    shot = os.path.join(out_dir, "server-page.png")
    driver.save_screenshot(shot)
    size = os.path.getsize(shot) if os.path.exists(shot) else 0
    with open(shot, "rb") if size else open(os.devnull, "rb") as f:
        magic = f.read(8)
    check("screenshot %s is a non-empty PNG (%d bytes)" % (shot, size),
          size > 0 and magic == b"\x89PNG\r\n\x1a\n")

    # BM25: switch the mode, search again with Enter.
    search(driver, "horse riding", mode="bm25")
    done, state = wait_for(driver, "bm25 search shows the horses document first",
                           lambda s: status_done("bm25")(s) and s["results"]
                           and s["results"][0]["document"] == "horses")
    if done:
        check("bm25 search shows the horses document first", True)
        marks = [m.lower() for m in state["results"][0]["marks"]]
        check("bm25: <mark> highlights 'horse'", any(m.startswith("horse") for m in marks), str(marks))

    # Hybrid, k = 5, and a path glob that matches one source.
    Select(driver.find_element(By.ID, "k")).select_by_visible_text("5")
    path = driver.find_element(By.ID, "path")
    path.clear()
    path.send_keys("*#cooking")
    search(driver, "slicing an onion", mode="hybrid")
    done, state = wait_for(driver, "hybrid search with a path glob", status_done("hybrid"))
    if done:
        docs = [r["document"] for r in state["results"]]
        check("hybrid with path '*#cooking' returns only the cooking document",
              docs and set(docs) == {"cooking"}, str(docs))
    path.clear()

    # The passage text is text: HTML in a document is shown, not run.
    search(driver, "zebra", mode="bm25")
    done, state = wait_for(driver, "the markup document is found",
                           lambda s: status_done("bm25")(s) and s["results"]
                           and s["results"][0]["document"] == "markup")
    if done:
        injected = driver.execute_script(
            "return document.querySelectorAll('#results img, #results script, #results b, #results i').length;")
        pwned = driver.execute_script("return window.embedragPwned === undefined ? null : window.embedragPwned;")
        check("HTML in results is escaped (no elements made, no script run)",
              injected == 0 and pwned is None, "elements %s, script ran %s" % (injected, pwned))
        check("the escaped markup is shown as text", "<b>bold</b>" in state["results"][0]["text"],
              state["results"][0]["text"][:200])
        check("zebra is marked in the escaped text", "zebra" in [m.lower() for m in state["results"][0]["marks"]],
              str(state["results"][0]["marks"]))


def test_key_and_error(driver, base, key):
    """A server with --api-key and no --store: 401 asks for the key, then its 404 is shown."""
    driver.get(base + "/")
    if not check("GET / is served without the key (the page asks for it on a 401)",
                 driver.find_elements(By.ID, "query"),
                 "the browser got: " + driver.find_element(By.TAG_NAME, "body").text[:200]):
        return
    search(driver, "a man playing the guitar")
    done, state = wait_for(driver, "401 shows an error", lambda s: s["error"] and "401" in s["status"])
    if done:
        check("401 shows an error", True)
    row = driver.find_element(By.ID, "keyrow")
    check("401 shows the API key field", row.is_displayed())
    if not row.is_displayed():
        return
    box = driver.find_element(By.ID, "apikey")
    box.send_keys(key)
    box.send_keys(Keys.ENTER)
    done, state = wait_for(driver, "with the key, the no-store error is shown",
                           lambda s: s["error"] and "401" not in s["status"] and "Error" in s["status"])
    if done:
        check("with the key, the server's no-store error is shown (%s)" % state["status"][:120],
              "404" in state["status"] and "--store" in state["status"], state["status"])
    stored = driver.execute_script("return sessionStorage.getItem('embedrag.apiKey');")
    check("the key is kept in sessionStorage", stored == key, repr(stored))


def main():
    started = time.monotonic()
    cli = os.environ.get("EMBEDRAG_CLI")
    src = os.environ.get("EMBEDRAG_SOURCE_DIR")
    if not cli or not src:
        print("not ok - EMBEDRAG_CLI and EMBEDRAG_SOURCE_DIR must be set (ctest sets them)")
        return 1
    model = os.path.join(src, "models", "all-MiniLM-L6-v2")
    data = os.path.join(src, "..", "shared", "data", "stsb-en-dev.csv")
    for what, p in (("model", model), ("STS-B data", data)):
        if not os.path.exists(p):
            print("not ok - the %s is missing: %s" % (what, p))
            return 1
    tmp = tempfile.mkdtemp(prefix="embedrag-page-")
    out_dir = os.environ.get("EMBEDRAG_TEST_OUTPUT") or tempfile.gettempdir()
    os.makedirs(out_dir, exist_ok=True)
    servers = []
    driver = None
    try:
        server = Server(cli, ["--model", model, "--store", os.path.join(tmp, "s.db")],
                        os.path.join(tmp, "server.log"))
        servers.append(server)
        if not check("the server says it is listening", server.wait_listening(),
                     "see " + os.path.join(tmp, "server.log")):
            return 1
        docs = make_documents(data)
        code, body = request(server.base, "POST", "/documents", {"documents": docs})
        try:
            stored = json.loads(body).get("stored")
        except ValueError:
            stored = None
        check("POST /documents stores %d documents" % len(docs), code == 200 and stored == len(docs),
              "HTTP %d %s" % (code, body[:300]))

        key = "page-test-key"
        locked = Server(cli, ["--model", model, "--api-key", key], os.path.join(tmp, "server-key.log"))
        servers.append(locked)

        try:
            driver = start_browser(tmp)
        except WebDriverException as e:
            check("headless Chromium starts", False, str(e).strip()[:500])
            return 1
        test_search_page(driver, server.base, out_dir)
        if check("the server with --api-key says it is listening", locked.wait_listening(),
                 "see " + os.path.join(tmp, "server-key.log")):
            test_key_and_error(driver, locked.base, key)
    finally:
        if driver is not None:
            try:
                driver.quit()
            except Exception:
                pass
        for s in servers:
            rc = s.stop()
            check("the server (%s) exits 0 on SIGTERM" % (s.base or "not started"), rc == 0,
                  "exit status %r" % rc)
        if failures:
            for s in servers:
                try:
                    with open(s.log.name, "r", errors="replace") as f:
                        tail = f.read()[-2000:]
                    if tail.strip():
                        print("# %s:\n# %s" % (s.log.name, tail.replace("\n", "\n# ")))
                except OSError:
                    pass
        if failures:
            print("# logs kept in %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("# %d checks, %d failed, %.1f s" % (checks, failures, time.monotonic() - started))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
