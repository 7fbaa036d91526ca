"""The live dashboard in a real browser: two peered kvshared nodes get a known workload through a
third-party gRPC client, then headless Chromium renders /dashboard from one node; the numbers it
displays must equal the sum of both nodes' /api/stats, and a screenshot is saved under
target/test-output/. Killing one node must make the page say it is unreachable."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
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


def start_node(name: str, grpc_port: int, http_port: int, peers: list[str], tmp: Path):
    binary = os.environ.get("KVSHARED_BIN", str(REPO / "target" / "debug" / "kvshared"))
    log = open(tmp / f"{name}.log", "wb")
    return subprocess.Popen(
        [binary, "--node-id", name, "--grpc-addr", f"127.0.0.1:{grpc_port}", "--http-addr", f"127.0.0.1:{http_port}",
         "--capacity", "32MiB", "--peers", ",".join(peers), "--peer-health-interval-ms", "200"],
        stdout=log, stderr=subprocess.STDOUT,
    )


def browser(args: list[str], url: str, tmp: Path, budget_ms: int = 4000) -> str:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tempfile.mkdtemp(dir=tmp)}", f"--virtual-time-budget={budget_ms}", *args, url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    # The rendered document, without the page's own script source.
    return r.stdout.split("<script>")[0]


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
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
