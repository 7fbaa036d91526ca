"""The extension alone: hashing against vLLM's own code, and the client against a real cluster
(no engine). Fast: a few seconds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import kvshare

from .conftest import REPO, Cluster


def test_kvshare_scheme_published_vector() -> None:
    # docs/design.md: root = 32 zero bytes, tokens 0..31, 16 per block.
    keys = kvshare.hash_blocks(list(range(32)), 16, parent=bytes(32))
    assert [k.hex() for k in keys] == [
        "a841d401cab294cf85356f0c992cb370d3f8a391c87ee6a8e4683948232ce47d",
        "f37724bb74b27d6aee8c424175eb01c28adc1f90cfc5ea28f120f663c3497d80",
    ]
    # ...and by hand with hashlib.
    h = hashlib.sha256(b"kvshare/block/v1" + bytes(32) + np.arange(16, dtype="<u4").tobytes())
    assert keys[0] == h.digest()
    # A namespace roots the chain at its digest; a trailing partial block is not keyed.
    ns = kvshare.Namespace("m", num_layers=2, num_kv_heads=2, head_dim=8, dtype="bf16",
                           tokens_per_block=16)
    assert kvshare.hash_blocks(list(range(40)), 16, namespace=ns) == ns.block_keys(range(40))
    assert kvshare.hash_blocks(list(range(40)), 16, parent=ns.digest) == ns.block_keys(range(40))
    assert len(ns.block_keys(range(40))) == 2


def test_repository_vllm_vectors() -> None:
    cases = json.loads((REPO / "tests" / "data" / "vllm-sha256-cbor.json").read_text())["cases"]
    for case in cases:
        keys = kvshare.hash_blocks(case["token_ids"], case["block_size"], scheme="vllm",
                                   seed=case["pythonhashseed"])
        assert [k.hex() for k in keys] == case["block_hashes"], case["name"]
        assert kvshare.vllm_none_hash(case["pythonhashseed"]).hex() == case["none_hash"]


_VLLM_PROBE = r"""
import json, sys
from vllm.lora.request import LoRARequest
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256_cbor
from vllm.v1.core import kv_cache_utils as k
from vllm.v1.request import Request

k.init_none_hash(sha256_cbor)
out = {"seed": k.get_none_hash_seed(), "none_hash": bytes(k.NONE_HASH).hex(), "cases": []}
tokens = [(i * 7919) % 50000 for i in range(100)]
for salt, lora in [(None, None), ("tenant-a", None), (None, ("adapter", "/p/a")),
                   ("s", ("adapter", "/p/a"))]:
    req = Request("r", tokens, SamplingParams(max_tokens=1), None, cache_salt=salt,
                  lora_request=LoRARequest(lora[0], 1, lora[1]) if lora else None,
                  block_hasher=k.get_request_block_hasher(16, sha256_cbor))
    out["cases"].append({"salt": salt, "lora": lora,
                         "hashes": [bytes(h).hex() for h in req.block_hashes]})
print(json.dumps(out))
"""


@pytest.mark.parametrize("seed", [None, "0", "12345"])
def test_vllm_sha256_cbor_matches_vllm(seed: str | None) -> None:
    """vLLM's own block hasher (fresh process: NONE_HASH is process state) against
    hash_blocks, with vLLM 0.32's seed rule and tagged extra keys (cache_salt, LoRA)."""
    env = dict(os.environ)
    env.pop("PYTHONHASHSEED", None)
    if seed is not None:
        env["PYTHONHASHSEED"] = seed
    res = subprocess.run([sys.executable, "-c", _VLLM_PROBE], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    want_seed = seed if seed is not None else kvshare.VLLM_DEFAULT_SEED
    assert got["seed"] == want_seed
    assert kvshare.vllm_none_hash(want_seed).hex() == got["none_hash"]
    tokens = [(i * 7919) % 50000 for i in range(100)]
    for case in got["cases"]:
        lora = tuple(case["lora"]) if case["lora"] else None
        keys = kvshare.hash_blocks(tokens, 16, scheme="vllm", seed=want_seed,
                                   cache_salt=case["salt"], lora=lora)
        assert [k.hex() for k in keys] == case["hashes"], case
    # Continuing a chain from a parent gives the same keys (salt only on absolute block 0).
    full = kvshare.hash_blocks(tokens, 16, scheme="vllm", seed=want_seed, cache_salt="s")
    tail = kvshare.hash_blocks(tokens[32:], 16, scheme="vllm", parent=full[1], cache_salt="s",
                               first_block=2)
    assert tail == full[2:]


def test_client_roundtrip_buffers_and_errors() -> None:
    c = Cluster().start()
    try:
        client = kvshare.Client(c.endpoints, codec="byteplane-zstd", timeout_ms=5000)
        assert sorted(client.members()) == ["node-0", "node-1", "node-2"]
        ns = kvshare.Namespace("m", num_layers=2, num_kv_heads=2, head_dim=64, dtype="bf16",
                               tokens_per_block=16)
        keys = ns.block_keys(range(16 * 6))
        data = torch.randn(6, ns.block_bytes // 2).to(torch.bfloat16)  # CPU torch tensor
        assert client.lookup(ns, keys) == 0
        put = client.put_blocks(ns, keys, data)
        assert (put.stored, put.raw_bytes) == (6, 6 * ns.block_bytes)
        assert 0 < put.wire_bytes < put.raw_bytes
        assert client.put_blocks(ns, keys, data).already_present == 6
        assert client.lookup(ns, keys) == 6
        assert client.lookup(ns.digest, keys) == 6  # by digest too

        out = torch.zeros_like(data)
        res = client.get_blocks(ns, keys, out)
        assert res.status == [kvshare.GET_OK] * 6 and res.prefix_blocks == 6
        assert torch.equal(out, data)
        # numpy in, numpy out; bytes in.
        arr = np.frombuffer(data.view(torch.uint8).numpy().tobytes(), dtype=np.uint8).copy()
        out_np = np.zeros_like(arr)
        assert client.get_blocks(ns, keys, out_np).prefix_blocks == 6
        assert np.array_equal(out_np, arr)
        keys2 = ns.block_keys(range(1000, 1000 + 16))
        assert client.put_blocks(ns, keys2, bytes(ns.block_bytes)).stored == 1

        # Missing keys are reported, not raised; the usable prefix ends at the first gap.
        out3 = bytearray(3 * ns.block_bytes)
        res = client.get_blocks(ns, [keys[0], b"\x07" * 32, keys[2]], out3)
        assert res.status == [kvshare.GET_OK, kvshare.GET_MISSING, kvshare.GET_OK]
        assert res.prefix_blocks == 1 and "missing" in res.errors[0]

        # Wrong sizes are caller errors.
        with pytest.raises(ValueError, match="bytes"):
            client.put_blocks(ns, keys, b"123")
        with pytest.raises(BufferError):
            client.get_blocks(ns, keys, bytes(6 * ns.block_bytes))  # read-only buffer

        stats = client.stats()
        assert len(stats) == 3
        assert sum(s["stored_blocks"] for s in stats) == 2 * 7  # R = 2
        assert any(n["namespace"] == ns.digest for s in stats for n in s["namespaces"])

        assert client.delete(ns, keys[:1]) == 2
        assert client.lookup(ns, keys) == 0

        # The GIL is released while the client works: another thread keeps running.
        big = torch.randn(64, ns.block_bytes // 2).to(torch.bfloat16)
        bkeys = ns.block_keys(range(5000, 5000 + 64 * 16))
        ticks = 0
        stop = threading.Event()

        def spin() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                time.sleep(0.0005)

        t = threading.Thread(target=spin)
        t.start()
        t0, before = time.perf_counter(), ticks
        client.put_blocks(ns, bkeys, big)
        client.get_blocks(ns, bkeys, torch.empty_like(big))
        elapsed, during = time.perf_counter() - t0, ticks - before
        stop.set()
        t.join()
        assert elapsed < 0.005 or during > 0

        # A node down: gets fall over to the other replica.
        c.kill(0)
        out4 = torch.zeros_like(data)
        res = client.get_blocks(ns, keys[1:], out4[1:])
        assert res.prefix_blocks == 5 and torch.equal(out4[1:], data[1:])
    finally:
        c.stop()


def test_unreachable_raises_kvshare_error() -> None:
    with pytest.raises(kvshare.KvshareError) as ei:
        kvshare.Client("127.0.0.1:9", connect_timeout_ms=500)
    assert "127.0.0.1:9" in str(ei.value)
    assert ei.value.code is None


def test_rejection_carries_grpc_status() -> None:
    c = Cluster(n=1, replicas=1).start()
    try:
        # Blocks over the node's --max-block-size are rejected with RESOURCE_EXHAUSTED.
        client = kvshare.Client(c.endpoints, codec="none")
        assert "token" not in repr(client)
        ns = kvshare.Namespace("big", num_layers=64, num_kv_heads=32, head_dim=128,
                               dtype="f32", tokens_per_block=64)  # 128 MiB > 64 MiB default
        data = np.zeros(ns.block_bytes, dtype=np.uint8)
        with pytest.raises(kvshare.KvshareError) as ei:
            client.put_blocks(ns, ns.block_keys(range(64)), data)
        assert ei.value.code == "RESOURCE_EXHAUSTED"
        assert ei.value.code_value == 8
    finally:
        c.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="scripts/dev-certs.sh needs openssl")
def test_client_over_mtls(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    subprocess.run([str(REPO / "scripts" / "dev-certs.sh"), str(certs)], check=True,
                   capture_output=True)
    c = Cluster(n=2, replicas=2, tls=certs).start()
    try:
        client = kvshare.Client(c.endpoints, timeout_ms=5000, tls_ca=certs / "ca.pem",
                                tls_cert=certs / "client.pem",
                                tls_key=str(certs / "client.key"))
        assert sorted(client.members()) == ["node-0", "node-1"]
        ns = kvshare.Namespace("m-tls", num_layers=2, num_kv_heads=2, head_dim=64, dtype="bf16",
                               tokens_per_block=16)
        keys = ns.block_keys(range(16 * 4))
        data = np.frombuffer(np.random.default_rng(1).bytes(4 * ns.block_bytes), dtype=np.uint8)
        assert client.put_blocks(ns, keys, data).stored == 4
        out = np.zeros_like(data)
        assert client.get_blocks(ns, keys, out).prefix_blocks == 4
        assert np.array_equal(out, data)

        # The CA but no client certificate: the error says the nodes require one.
        with pytest.raises(kvshare.KvshareError) as ei:
            kvshare.Client(c.endpoints, tls_ca=certs / "ca.pem", connect_timeout_ms=1000)
        assert "requires a client certificate" in str(ei.value)
        # No TLS at all against TLS nodes: no member answers.
        with pytest.raises(kvshare.KvshareError):
            kvshare.Client(c.endpoints, connect_timeout_ms=1000, timeout_ms=1000)
        # A certificate without its key, or without a CA: refused before connecting.
        with pytest.raises(ValueError):
            kvshare.Client(c.endpoints, tls_ca=certs / "ca.pem", tls_cert=certs / "client.pem")
        with pytest.raises(ValueError):
            kvshare.Client(c.endpoints, tls_cert=certs / "client.pem",
                           tls_key=certs / "client.key")
        with pytest.raises(kvshare.KvshareError) as ei:
            kvshare.Client(c.endpoints, tls_ca=tmp_path / "missing.pem")
        assert "missing.pem" in str(ei.value)
    finally:
        c.stop()


WRITER_TOKEN = "kvs-writer-3f9c1e7a"
READER_TOKEN = "kvs-reader-b72d04e1"
AUTH = [(WRITER_TOKEN, "writer", "team-a"), (READER_TOKEN, "reader", "team-a")]


def _blocks(model: str, n: int) -> tuple[kvshare.Namespace, list[bytes], np.ndarray]:
    ns = kvshare.Namespace(model, num_layers=2, num_kv_heads=2, head_dim=64, dtype="bf16",
                           tokens_per_block=16)
    keys = ns.block_keys(range(16 * n))
    data = np.frombuffer(np.random.default_rng(7).bytes(n * ns.block_bytes), dtype=np.uint8)
    return ns, keys, data


def test_client_bearer_token_and_roles() -> None:
    c = Cluster(n=2, replicas=2, auth=AUTH).start()
    try:
        ns, keys, data = _blocks("m-auth", 4)

        # No token: refused from the first call (ClusterInfo, to learn the membership).
        with pytest.raises(kvshare.KvshareError) as ei:
            kvshare.Client(c.endpoints, timeout_ms=5000)
        assert ei.value.code == "UNAUTHENTICATED", ei.value
        assert "refused this client" in str(ei.value)
        assert "authorization" in str(ei.value) and "token=" in str(ei.value)
        # A token the auth file does not list: the same, and the error does not repeat it.
        with pytest.raises(kvshare.KvshareError) as ei:
            kvshare.Client(c.endpoints, timeout_ms=5000, token="kvs-not-listed")
        assert ei.value.code == "UNAUTHENTICATED", ei.value
        assert "kvs-not-listed" not in str(ei.value)

        # Writer: put, lookup, get, stats of its tenant.
        writer = kvshare.Client(c.endpoints, timeout_ms=5000, token=WRITER_TOKEN)
        assert writer.put_blocks(ns, keys, data).stored == 4
        assert writer.lookup(ns, keys) == 4
        out = np.zeros_like(data)
        assert writer.get_blocks(ns, keys, out).prefix_blocks == 4
        assert np.array_equal(out, data)
        assert sum(s["stored_blocks"] for s in writer.stats()) == 8  # 4 blocks, R=2

        # Reader of the same tenant: reads what the writer stored, may not write or delete.
        reader = kvshare.Client(c.endpoints, timeout_ms=5000, token=READER_TOKEN)
        assert reader.lookup(ns, keys) == 4
        out = np.zeros_like(data)
        assert reader.get_blocks(ns, keys, out).prefix_blocks == 4
        assert np.array_equal(out, data)
        ns2, keys2, data2 = _blocks("m-auth-reader", 2)
        with pytest.raises(kvshare.KvshareError) as ei:
            reader.put_blocks(ns2, keys2, data2)
        assert ei.value.code == "PERMISSION_DENIED", ei.value
        assert "writer" in str(ei.value)
        with pytest.raises(kvshare.KvshareError) as ei:
            reader.delete(ns, keys)
        assert ei.value.code == "PERMISSION_DENIED", ei.value
        assert writer.lookup(ns, keys) == 4

        # The token is in no repr and no error.
        for client in (writer, reader):
            assert WRITER_TOKEN not in repr(client) and READER_TOKEN not in repr(client)
            assert "token=<redacted>" in repr(client)
        with pytest.raises(ValueError) as vi:
            kvshare.Client(c.endpoints, token="kvs secret with spaces")
        assert "secret" not in str(vi.value)
    finally:
        c.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="scripts/dev-certs.sh needs openssl")
def test_client_token_over_mtls(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    subprocess.run([str(REPO / "scripts" / "dev-certs.sh"), str(certs)], check=True,
                   capture_output=True)
    c = Cluster(n=2, replicas=2, tls=certs, auth=AUTH).start()
    try:
        ca, cert, key = certs / "ca.pem", certs / "client.pem", certs / "client.key"
        ns, keys, data = _blocks("m-auth-tls", 4)
        # A client certificate is not enough: the token is still required.
        with pytest.raises(kvshare.KvshareError) as ei:
            kvshare.Client(c.endpoints, timeout_ms=5000, tls_ca=ca, tls_cert=cert, tls_key=key)
        assert ei.value.code == "UNAUTHENTICATED", ei.value

        client = kvshare.Client(c.endpoints, timeout_ms=5000, token=WRITER_TOKEN, tls_ca=ca,
                                tls_cert=cert, tls_key=key)
        assert sorted(client.members()) == ["node-0", "node-1"]
        assert client.put_blocks(ns, keys, data).stored == 4
        out = np.zeros_like(data)
        assert client.get_blocks(ns, keys, out).prefix_blocks == 4
        assert np.array_equal(out, data)
        # Stored on both nodes (replicas=2): peers forward and replicate over mTLS with the
        # peer token too.
        assert sorted(s["stored_blocks"] for s in client.stats()) == [4, 4]
        reader = kvshare.Client(c.endpoints, timeout_ms=5000, token=READER_TOKEN, tls_ca=ca,
                                tls_cert=cert, tls_key=key)
        assert reader.lookup(ns, keys) == 4
    finally:
        c.stop()


def test_checksum_is_xxh3() -> None:
    assert kvshare.checksum(b"") == 0x2D06800538D394C2  # XXH3_64bits("")
    assert "byteplane-zstd" in kvshare.codecs()
    assert Path(kvshare.__file__).with_name("py.typed").exists()
