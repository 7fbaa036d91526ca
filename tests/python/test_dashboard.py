"""The live dashboard in a real browser: two peered kvshared nodes get a known workload through a
third-party gRPC client, then headless Chromium renders /dashboard from one node; the numbers it
displays must equal the sum of both nodes' /api/stats, and a screenshot is saved under
target/test-output/. Killing one node must make the page say it is unreachable.

With --auth-file, the page must ask for a token, keep it in sessionStorage only, send it on its
fetches, say so when a token is refused, and show only the caller's tenant; with
--insecure-no-auth it must show a warning banner. Typing into the page is driven through the
Chrome DevTools Protocol over --remote-debugging-pipe (standard library only)."""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import xxhash

from test_interop import NUM_KV_HEADS, NUM_LAYERS, HEAD_DIM, TOKENS_PER_BLOCK, RAW_LEN, chunked_put_requests, make_header

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "target" / "test-output"
KV_BF16 = REPO / "tests" / "data" / "kv-bf16-256tok.bin"


def chromium() -> str | None:
    for c in (os.environ.get("CHROMIUM_BIN"), "/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if c and Path(c).exists():
            return c
    return shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def start_node(name: str, grpc_port: int, http_port: int, peers: list[str], tmp: Path, extra: list[str] = ()):
    binary = os.environ.get("KVSHARED_BIN", str(REPO / "target" / "debug" / "kvshared"))
    log = open(tmp / f"{name}.log", "wb")
    return subprocess.Popen(
        [binary, "--node-id", name, "--grpc-addr", f"127.0.0.1:{grpc_port}", "--http-addr", f"127.0.0.1:{http_port}",
         "--capacity", "32MiB", "--peers", ",".join(peers), "--peer-health-interval-ms", "200", *extra],
        stdout=log, stderr=subprocess.STDOUT,
    )


def stop(procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def wait_http(url: str, token: str | None = None, timeout: float = 20.0) -> int:
    """Waits until url answers an HTTP status (any); returns it."""
    deadline = time.monotonic() + timeout
    while True:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            assert time.monotonic() < deadline, f"{url} did not answer"
            time.sleep(0.1)


def browser(args: list[str], url: str, tmp: Path, budget_ms: int = 4000) -> str:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tempfile.mkdtemp(dir=tmp)}", f"--virtual-time-budget={budget_ms}", *args, url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    # The rendered document, without the page's own script source.
    return r.stdout.split("<script>")[0]


class Cdp:
    """A headless Chromium driven through the DevTools Protocol over --remote-debugging-pipe:
    commands are NUL-terminated JSON written to the browser's fd 3, answers read from its fd 4."""

    def __init__(self, tmp: Path):
        to_r, self.to_w = os.pipe()
        self.from_r, from_w = os.pipe()
        # Above the descriptors the child ends up with, so the dup2s below cannot clobber them.
        hi_r, hi_w = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)
        os.close(to_r)
        os.close(from_w)

        def pipes_to_3_and_4():
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        self.proc = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tempfile.mkdtemp(dir=tmp)}", "--remote-debugging-pipe", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pipes_to_3_and_4, close_fds=False,
        )
        os.close(hi_r)
        os.close(hi_w)
        self.buf = b""
        self.next_id = 0
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + 30
        while True:
            while b"\0" not in self.buf:
                assert time.monotonic() < deadline, f"no answer to {method}"
                chunk = os.read(self.from_r, 1 << 16)
                assert chunk, "the browser closed the pipe"
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self.next_id:
                assert "error" not in answer, answer
                return answer["result"]

    def eval(self, expression: str):
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                      self.session)
        assert "exceptionDetails" not in r, r
        return r["result"].get("value")

    def wait(self, expression: str, what: str, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        # Right after a navigation the old document, or one without a body yet, may be the one
        # evaluated: a TypeError then means "not yet", not a failure.
        guarded = f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return false; }} }})()"
        while True:
            v = self.eval(guarded)
            if v:
                return v
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    def navigate(self, url: str):
        self.call("Page.navigate", {"url": url}, self.session)

    def close(self):
        self.proc.kill()
        self.proc.wait()
        os.close(self.to_w)
        os.close(self.from_r)


# What the page shows about auth, as one JSON value.
PAGE_STATE = """JSON.stringify({
  auth: document.body.dataset.auth || "",
  ready: document.body.dataset.ready || "",
  state: document.getElementById("auth").dataset.state,
  authShown: getComputedStyle(document.getElementById("auth")).display !== "none",
  message: document.getElementById("auth-message").textContent,
  mode: document.getElementById("auth-mode").dataset.value || "",
  insecureBanner: getComputedStyle(document.getElementById("insecure-banner")).display !== "none",
  tenants: [...document.querySelectorAll("#tenants tr[data-tenant]")].map(r => ({
    tenant: r.dataset.tenant,
    blocks: Number(r.querySelector('[data-testid="tenant-blocks"]').dataset.value),
    bytes: Number(r.querySelector('[data-testid="tenant-bytes"]').dataset.value),
    quota: r.querySelector('[data-testid="tenant-quota"]').dataset.value,
  })),
  storedBlocks: document.getElementById("kpi-blocks").dataset.value || "",
  session: sessionStorage.getItem("kvshare-token"),
  localStorageItems: localStorage.length,
  cookies: document.cookie,
})"""


def screenshot(cdp: Cdp, path: Path):
    shot = cdp.call("Page.captureScreenshot", {"format": "png"}, cdp.session)["data"]
    path.write_bytes(base64.b64decode(shot))
    assert path.stat().st_size > 10_000


def page_state(cdp: Cdp) -> dict:
    return json.loads(cdp.eval(PAGE_STATE))


def shown(dom: str, testid: str) -> float:
    m = re.search(r'<[^>]*data-testid="%s"[^>]*data-value="([^"]*)"' % re.escape(testid), dom)
    assert m, f"dashboard shows no {testid}"
    return float(m.group(1))


def test_dashboard_shows_cluster_figures_in_a_real_browser(pb):
    if chromium() is None:
        pytest.skip("SKIPPED: no Chromium (scripts/test.sh installs Debian's chromium package)")
    pb2, pb2_grpc = pb
    tmp = Path(tempfile.mkdtemp(prefix="kvshare-dash-"))
    ports = [(free_port(), free_port()) for _ in range(2)]
    peers = [f"127.0.0.1:{g}" for g, _ in ports]
    procs = [start_node(f"dash-{i}", g, h, peers, tmp) for i, (g, h) in enumerate(ports)]
    try:
        http_a = f"http://127.0.0.1:{ports[0][1]}"
        deadline = time.monotonic() + 20
        while True:
            try:
                info = http_json(http_a + "/api/cluster")
                if all(n["reachable"] and n["healthy"] for n in info["nodes"]) and len(info["nodes"]) == 2:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "nodes did not see each other"
            time.sleep(0.1)

        # Known workload through node A: a 24-block chain of real bf16 K/V, then lookups.
        ch = grpc.insecure_channel(peers[0])
        stub = pb2_grpc.KvCacheStub(ch)
        ns = os.urandom(32)
        keys = [os.urandom(32) for _ in range(24)]
        data = KV_BF16.read_bytes()
        reqs = []
        for i, k in enumerate(keys):
            raw = data[i * RAW_LEN:(i + 1) * RAW_LEN]
            reqs += chunked_put_requests(pb2, k, make_header(pb2, ns, raw), raw, 2)
        resp = stub.Put(iter(reqs), timeout=10)
        assert all(o.replicas == 2 for o in resp.outcomes)
        for n in (24, 24, 12):
            stub.Lookup(pb2.LookupRequest(namespace=ns, keys=keys[:n] + [os.urandom(32) for _ in range(12)]), timeout=10)
        list(stub.Get(pb2.GetRequest(namespace=ns, keys=keys[:8]), timeout=10))
        ch.close()

        OUT.mkdir(parents=True, exist_ok=True)
        shot = OUT / "dashboard.png"
        dom = browser(["--dump-dom"], http_a + "/dashboard", tmp)
        browser([f"--screenshot={shot}", "--window-size=1400,1200", "--hide-scrollbars"], http_a + "/dashboard", tmp)
        assert shot.exists() and shot.stat().st_size > 10_000
        # No auth file on loopback: no token form, no insecure banner, the mode is shown.
        assert re.search(r'data-testid="auth-mode"[^>]*data-value="local"', dom), dom[:3000]
        assert re.search(r'<div id="auth"[^>]*data-state="ok"', dom), dom[:3000]
        assert re.search(r'<div id="insecure-banner"[^>]*style="display: none;"', dom), dom[:3000]

        stats = [http_json(f"http://127.0.0.1:{h}/api/stats") for _, h in ports]
        total = lambda k: sum(s[k] for s in stats)  # noqa: E731
        assert shown(dom, "stored-blocks") == total("stored_blocks") == 48
        assert shown(dom, "stored-bytes") == total("stored_bytes") > 0
        assert shown(dom, "capacity-bytes") == total("capacity_bytes") == 2 * 32 * 2**20
        assert shown(dom, "lookups") == total("lookups") == 3
        assert shown(dom, "evictions") == total("evictions")
        tok = total("lookup_hit_tokens") / total("lookup_tokens")
        assert abs(shown(dom, "token-hit-rate") - tok) < 1e-9 and tok == (24 + 24 + 12) / (36 + 36 + 24)
        blk = total("lookup_hit_blocks") / total("lookup_blocks")
        assert abs(shown(dom, "block-hit-rate") - blk) < 1e-9
        ratio = total("stored_raw_bytes") / total("stored_payload_bytes")
        assert abs(shown(dom, "compression-ratio") - ratio) < 1e-9
        rows = re.findall(r'<tr data-node="([^"]+)"', dom)
        assert sorted(rows) == ["dash-0", "dash-1"], rows
        node_blocks = [int(x) for x in re.findall(r'data-testid="node-blocks">(\d+)<', dom)]
        assert sorted(node_blocks) == sorted(s["stored_blocks"] for s in stats)

        # A peer that stops answering is called out.
        procs[1].kill()
        procs[1].wait()
        dom = browser(["--dump-dom"], http_a + "/dashboard", tmp, budget_ms=3000)
        m = re.search(r'<div id="banner"[^>]*>([^<]*)</div>', dom)
        assert m and "Unreachable: dash-1" in m.group(1), dom[:2000]
    finally:
        stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


def put_blocks(pb, endpoint: str, token: str, n: int) -> bytes:
    """Stores n blocks of a fresh namespace with token; returns the namespace."""
    pb2, pb2_grpc = pb
    ch = grpc.insecure_channel(endpoint)
    stub = pb2_grpc.KvCacheStub(ch)
    ns = os.urandom(32)
    data = KV_BF16.read_bytes()
    reqs = []
    for i in range(n):
        raw = data[i * RAW_LEN:(i + 1) * RAW_LEN]
        reqs += chunked_put_requests(pb2, os.urandom(32), make_header(pb2, ns, raw), raw, 1)
    resp = stub.Put(iter(reqs), timeout=10, metadata=[("authorization", f"Bearer {token}")])
    assert sum(1 for o in resp.outcomes if o.status == pb2.BlockOutcome.STORED) == n, resp
    ch.close()
    return ns


def test_dashboard_asks_for_a_token_and_warns_when_insecure(pb):
    if chromium() is None:
        pytest.skip("SKIPPED: no Chromium (scripts/test.sh installs Debian's chromium package)")
    tmp = Path(tempfile.mkdtemp(prefix="kvshare-dash-auth-"))
    sha = lambda t: hashlib.sha256(t.encode()).hexdigest()  # noqa: E731
    auth = tmp / "auth.toml"
    auth.write_text(
        '[tenants.a]\nquota = "1MiB"\n[tenants.b]\n'
        + "".join(f'[[tokens]]\nrole = "{role}"\ntenant = "{t}"\nsha256 = "{sha(tok)}"\n'
                  for tok, role, t in [("dash-reader-a", "reader", "a"), ("dash-writer-a", "writer", "a"),
                                       ("dash-writer-b", "writer", "b")]))
    (g1, h1), (g2, h2) = (free_port(), free_port()), (free_port(), free_port())
    procs = [start_node("dash-auth", g1, h1, [], tmp, ["--auth-file", str(auth)]),
             start_node("dash-open", g2, h2, [], tmp, ["--insecure-no-auth"])]
    cdp = None
    try:
        url = f"http://127.0.0.1:{h1}"
        assert wait_http(url + "/api/cluster") == 401
        assert wait_http(url + "/api/cluster", "dash-reader-a") == 200
        put_blocks(pb, f"127.0.0.1:{g1}", "dash-writer-a", 3)
        put_blocks(pb, f"127.0.0.1:{g1}", "dash-writer-b", 2)

        # Without a token the page shows the form and why.
        dom = browser(["--dump-dom"], url + "/dashboard", tmp, budget_ms=2000)
        assert re.search(r'<div id="auth"[^>]*data-state="needed"', dom), dom[:3000]
        assert '<form id="auth-form"' in dom and 'id="token-input"' in dom
        m = re.search(r'<div id="auth-message"[^>]*>([^<]*)</div>', dom)
        assert m and "requires a token (HTTP 401)" in m.group(1), dom[:3000]

        cdp = Cdp(tmp)
        cdp.navigate(url + "/dashboard")
        cdp.wait('document.body.dataset.auth === "401"', "the page to ask for a token")
        st = page_state(cdp)
        assert st["authShown"] and st["state"] == "needed" and st["session"] is None, st

        def enter(token: str):
            cdp.eval(f'document.getElementById("token-input").value = {json.dumps(token)};'
                     'document.getElementById("auth-form").requestSubmit(); true')

        # A wrong token: refused, said so, the form stays.
        enter("not-a-token")
        cdp.wait('document.getElementById("auth-message").textContent.includes("refused")', "the refusal")
        st = page_state(cdp)
        assert st["authShown"] and "unknown token" in st["message"], st
        OUT.mkdir(parents=True, exist_ok=True)
        screenshot(cdp, OUT / "dashboard-token-refused.png")
        # The reader of tenant a: data, its tenant only (3 blocks; b's 2 are not counted).
        enter("dash-reader-a")
        cdp.wait('document.body.dataset.auth === "ok" && document.body.dataset.ready === "1"', "the data")
        st = page_state(cdp)
        assert not st["authShown"] and st["mode"] == "tokens" and not st["insecureBanner"], st
        assert [t["tenant"] for t in st["tenants"]] == ["a"], st
        assert st["tenants"][0]["blocks"] == 3 and st["tenants"][0]["quota"] == str(1 << 20), st
        assert st["storedBlocks"] == "3", st
        # sessionStorage only: nothing in localStorage, no cookie.
        assert st["session"] == "dash-reader-a" and st["localStorageItems"] == 0 and st["cookies"] == "", st
        screenshot(cdp, OUT / "dashboard-token.png")
        # Forgetting the token asks again.
        cdp.eval('document.getElementById("forget-token").click(); true')
        cdp.wait('document.body.dataset.auth === "401"', "the form again")
        assert page_state(cdp)["session"] is None

        # --insecure-no-auth: the banner.
        assert wait_http(f"http://127.0.0.1:{h2}/api/cluster") == 200
        cdp.navigate(f"http://127.0.0.1:{h2}/dashboard")
        cdp.wait(f'location.port === "{h2}" && document.body.dataset.ready === "1"', "the insecure node's data")
        st = page_state(cdp)
        assert st["mode"] == "insecure-no-auth" and st["insecureBanner"] and not st["authShown"], st
        dom = browser(["--dump-dom"], f"http://127.0.0.1:{h2}/dashboard", tmp, budget_ms=2000)
        assert re.search(r'<div id="insecure-banner"[^>]*style="display: block;"', dom), dom[:3000]
    finally:
        if cdp is not None:
            cdp.close()
        stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)
