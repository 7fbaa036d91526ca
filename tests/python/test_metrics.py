"""Prometheus conventions on a live node: `promtool check metrics` passes on /metrics after a
workload, and the OpenMetrics variant is served to scrapers that ask for it."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request

import pytest

from test_interop import chunked_put_requests, make_header, real_kv_bytes


def fetch(url: str, accept: str | None = None) -> tuple[str, str]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.headers.get("Content-Type", ""), r.read().decode()


def test_promtool_accepts_live_metrics(pb, stub, server):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("SKIPPED: promtool not installed (scripts/test.sh installs Debian's prometheus package)")
    pb2, _ = pb
    ns, key, raw = os.urandom(32), os.urandom(32), real_kv_bytes(3)
    stub.Put(iter(chunked_put_requests(pb2, key, make_header(pb2, ns, raw), raw, 2)), timeout=10)
    stub.Lookup(pb2.LookupRequest(namespace=ns, keys=[key, os.urandom(32)]), timeout=10)
    list(stub.Get(pb2.GetRequest(namespace=ns, keys=[key]), timeout=10))

    ctype, body = fetch(f"http://{server['http']}/metrics")
    assert ctype.startswith("text/plain; version=0.0.4"), ctype
    r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"promtool: {r.stdout}{r.stderr}"
    for name in ("kvshare_lookups_total", "kvshare_hits_total", "kvshare_put_blocks_total", "kvshare_stored_bytes",
                 "kvshare_evictions_total", "kvshare_rpc_duration_seconds_bucket", "kvshare_received_bytes_total"):
        assert name in body, name
    import re

    assert re.search(r'^kvshare_put_blocks_total\{outcome="stored"\} [1-9]\d*$', body, re.M), body

    ctype, om = fetch(f"http://{server['http']}/metrics", "application/openmetrics-text;version=1.0.0")
    assert ctype.startswith("application/openmetrics-text"), ctype
    assert om.rstrip().endswith("# EOF")
