"""Real vLLM engines (CPU, tiny random-weight Llamas) sharing prefill through a real 3-node
kvshare cluster (R=2) with KvshareConnector.

Engines run in their own processes (tests/engine_driver.py); each prompt runs alone and the
reference is an engine without any connector whose prefix cache is reset before every prompt,
so every reference output comes from a full prefill. Outputs are compared exactly: greedy
tokens and their logprobs, bit for bit.

Engines with and without a connector must compute on the same number of threads (vLLM's CPU
backend reserves an extra core when a connector is configured; conftest pins
VLLM_CPU_NUM_OF_RESERVED_CPU): threads change floating-point reduction order.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kvshare

from .conftest import Cluster, Engine, connector_config, make_llama

MAX_TOKENS = 6

# Two engine configurations: bf16 KV, GQA (4 query heads, 2 KV heads), 32-token blocks, keys
# = vLLM's own sha256_cbor block hashes; and fp16 KV, MHA, 64-token blocks, vLLM's default
# hash (sha256), so the connector keys blocks with kvshare's chained scheme.
CONFIGS: dict[str, dict[str, Any]] = {
    "bf16-gqa-b32-vllmhash": {
        "dtype": "bfloat16", "kv_heads": 2, "block_size": 32,
        "llm_kwargs": {"prefix_caching_hash_algo": "sha256_cbor"},
    },
    "fp16-mha-b64-kvsharehash": {
        "dtype": "float16", "kv_heads": 4, "block_size": 64,
        "llm_kwargs": {},
    },
}


def toks(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 1000) for _ in range(n)]


def prompts(seed: int) -> dict[str, list[int]]:
    rng = random.Random(seed)
    shared = toks(rng, 330)
    salted = toks(rng, 200)
    p: dict[str, list[int]] = {
        # pushed by engine A
        "a_doc": shared + toks(rng, 45),
        "a_salted": salted + toks(rng, 20),
        # asked by engine B
        "b_doc": shared + toks(rng, 77),  # shares 330 tokens with a_doc
        "b_short": shared[:150] + toks(rng, 60),  # shares 150
        "b_new": toks(rng, 260),  # shares nothing
        "b_salted": salted + toks(rng, 33),  # shares 200 with a_salted (same salt only)
    }
    return p


def expected_hit(shared: int, prompt_len: int, bs: int) -> int:
    """Tokens vLLM may load: whole shared blocks, and never the block of the last token."""
    return min(shared // bs, (prompt_len - 1) // bs) * bs


def engine_config(tmp: Path, name: str, connector: dict[str, Any] | None) -> dict[str, Any]:
    c = CONFIGS[name]
    model = make_llama(tmp / f"llama-{c['dtype']}-kv{c['kv_heads']}", dtype=c["dtype"],
                       num_kv_heads=c["kv_heads"])
    return {
        "model": str(model),
        "dtype": c["dtype"],
        "block_size": c["block_size"],
        "kv_transfer_config": connector,
        "llm_kwargs": c["llm_kwargs"],
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def references(workdir: Path) -> Iterator[dict[str, dict[str, Any]]]:
    """Outputs of an engine without any connector, every prompt from a full prefill."""
    refs: dict[str, dict[str, Any]] = {}
    for name in CONFIGS:
        e = Engine(engine_config(workdir, name, None), workdir / f"ref-{name}.log")
        try:
            p = prompts(1)
            if name == "bf16-gqa-b32-vllmhash":
                p.update(fault_prompts())
            names = sorted(p)
            outs = e.generate([p[n] for n in names], MAX_TOKENS, reset_prefix_cache=True)
            refs[name] = dict(zip(names, outs, strict=True))
        finally:
            e.close()
    yield refs


def same(out: dict[str, Any], ref: dict[str, Any]) -> bool:
    return bool(out["tokens"] == ref["tokens"] and out["logprobs"] == ref["logprobs"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cross_engine_reuse_is_exact(
    name: str, workdir: Path, cluster: Cluster, references: dict[str, dict[str, Any]]
) -> None:
    """Acceptance 1: engine A pushes, a fresh engine B loads the shared prefix from the tier
    and produces exactly the reference outputs; cache_salt isolates."""
    bs = CONFIGS[name]["block_size"]
    ref = references[name]
    p = prompts(1)
    conn = connector_config(cluster.endpoints, namespace_salt=f"test-{name}")
    cfg = engine_config(workdir, name, conn)

    a = Engine(cfg, workdir / f"A-{name}.log")
    try:
        out = a.generate([p["a_doc"]], MAX_TOKENS)
        out += a.generate([p["a_salted"]], MAX_TOKENS, cache_salt="tenant-1")
        assert [o["num_cached_tokens"] for o in out] == [0, 0]
    finally:
        a.close()  # shutdown flushes the pending pushes
    a_log = a.log()
    assert "kvshare: registered" in a_log, a_log[-3000:]

    b = Engine(cfg, workdir / f"B-{name}.log")
    try:
        # Each prompt alone, local prefix cache reset: every hit comes from the tier.
        def run(key: str, salt: str | None = None) -> dict[str, Any]:
            (o,) = b.generate([p[key]], MAX_TOKENS, cache_salt=salt, reset_prefix_cache=True)
            return o

        doc = run("b_doc")
        short = run("b_short")
        new = run("b_new")
        salted = run("b_salted", "tenant-1")
        other_salt = run("b_salted", "tenant-2")
        no_salt = run("b_salted")
    finally:
        b.close()
    log = b.log()

    assert doc["num_cached_tokens"] == expected_hit(330, len(p["b_doc"]), bs), log[-4000:]
    assert short["num_cached_tokens"] == expected_hit(150, len(p["b_short"]), bs)
    assert new["num_cached_tokens"] == 0
    assert salted["num_cached_tokens"] == expected_hit(200, len(p["b_salted"]), bs)
    assert other_salt["num_cached_tokens"] == 0  # another salt must not hit
    assert no_salt["num_cached_tokens"] == 0
    for key, o in [("b_doc", doc), ("b_short", short), ("b_new", new), ("b_salted", salted),
                   ("b_salted", other_salt), ("b_salted", no_salt)]:
        assert same(o, ref[key]), (key, o, ref[key])
    assert "tokens in the tier" in log and "loaded" in log


# ---------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------


def fault_prompts() -> dict[str, list[int]]:
    rng = random.Random(7)
    base = toks(rng, 40 * 32)  # 40 blocks of 32: a node loss leaves holes in the chain
    return {
        "f_down": toks(rng, 300),
        "f_push": base + toks(rng, 10),
        "f_corrupt": base[: 12 * 32] + toks(rng, 50),
        "f_kill_one": base[: 20 * 32] + toks(rng, 40),
        "f_kill_two": base + toks(rng, 30),
        "f_after": base[: 8 * 32] + toks(rng, 20),
    }


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _pb_field(num: int, value: bytes | int) -> bytes:
    if isinstance(value, int):
        return _pb_varint(num << 3) + _pb_varint(value)
    return _pb_varint((num << 3) | 2) + _pb_varint(len(value)) + value


def store_foreign_block(endpoint: str, digest: bytes, key: bytes, raw_len: int) -> None:
    """Writes, with a plain gRPC client, a block under (digest, key) whose header declares
    another KV layout (heads and head size swapped, same size) and whose bytes are garbage
    with a valid checksum: the store accepts it, a reader must reject it."""
    import grpc

    raw = bytes(random.Random(3).randrange(256) for _ in range(raw_len))
    layout = (_pb_field(1, 2) + _pb_field(2, 64) + _pb_field(3, 2) + _pb_field(4, 3)
              + _pb_field(5, 32))  # layers 2, kv heads 64, head dim 2, BF16, 32 tokens
    header = (_pb_field(1, digest) + _pb_field(2, layout) + _pb_field(3, 1)  # CODEC_NONE
              + _pb_field(4, raw_len) + _pb_field(5, kvshare.checksum(raw))
              + _pb_field(6, raw_len))
    msg = _pb_field(1, key) + _pb_field(2, header) + _pb_field(3, raw)
    with grpc.insecure_channel(endpoint) as ch:
        put = ch.stream_unary("/kvshare.v1.KvCache/Put", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
        put(iter([msg]), timeout=10)


class Barrier:
    """Answers the connector's test barrier (KVSHARE_TEST_LOAD_BARRIER): resumes each load,
    first running an action (killing a node) if one is armed."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.seen = 0
        self.action: Any = None
        self.fired = 0

    def poll(self) -> None:
        n = self.seen + 1
        if (self.dir / f"loading-{n}").exists():
            if self.action is not None:
                self.action()
                self.action = None
                self.fired += 1
            (self.dir / f"resume-{n}").write_text("go")
            self.seen = n


def test_faults_never_break_the_engine(
    workdir: Path, references: dict[str, dict[str, Any]]
) -> None:
    """Acceptance 2: tier unreachable at start, a corrupt block in the store, a node killed
    mid-load (replica serves), a second node killed mid-load (holes: recomputed). Every request
    is answered with the reference output and the connector logs what happened."""
    name = "bf16-gqa-b32-vllmhash"
    bs = 32
    ref = references[name]
    p = fault_prompts()
    cluster = Cluster()  # ports chosen, not started yet
    barrier_dir = workdir / "barrier"
    barrier_dir.mkdir()
    barrier = Barrier(barrier_dir)
    conn = connector_config(cluster.endpoints, reconnect_interval_s=1, timeout_ms=3000,
                            namespace_salt="faults")
    e = Engine(engine_config(workdir, name, conn), workdir / "faults.log",
               env={"KVSHARE_TEST_LOAD_BARRIER": str(barrier_dir)})
    try:
        def run(key: str) -> dict[str, Any]:
            (o,) = e.generate([p[key]], MAX_TOKENS, reset_prefix_cache=True,
                              on_idle=barrier.poll)
            return o

        # 1. Tier unreachable at start: plain prefill, same output.
        o = run("f_down")
        assert same(o, ref["f_down"]) and o["num_cached_tokens"] == 0
        assert "unreachable" in e.log()

        # The tier comes up; the connector reconnects on its own.
        cluster.start()
        time.sleep(1.5)
        assert same(run("f_push"), ref["f_push"])
        client = kvshare.Client(cluster.endpoints)
        keys = kvshare.hash_blocks(p["f_push"], bs, scheme="vllm")
        deadline = time.monotonic() + 30
        digest = b""
        while time.monotonic() < deadline:
            nss = [n for s in client.stats() for n in s["namespaces"] if n["blocks"]]
            if nss:
                digest = nss[0]["namespace"]
                if client.lookup(digest, keys) == len(keys):
                    break
            time.sleep(0.2)
        assert digest and client.lookup(digest, keys) == len(keys), "pushes did not land"

        # 2. A corrupt block in the store (block 5 of the chain): blocks 0-4 load, block 5 on
        # is recomputed, the bad copy is deleted and replaced by the recomputed block.
        assert client.delete(digest, [keys[5]]) == 2
        block_bytes = 2 * 2 * bs * 2 * 64 * 2  # layers * (K,V) * tokens * kv heads * dim * 2 B
        store_foreign_block(cluster.grpc[0], digest, keys[5], block_bytes)
        assert client.lookup(digest, keys) == len(keys)
        o = run("f_corrupt")
        assert same(o, ref["f_corrupt"]), (o, ref["f_corrupt"])
        log = e.log()
        assert "another namespace or layout" in log and "recomputed" in log
        assert "deleted 1 corrupt block" in log
        deadline = time.monotonic() + 30
        while client.lookup(digest, keys[:12]) < 12 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.lookup(digest, keys[:12]) == 12, "the recomputed block was not re-pushed"

        # 3. A node killed between the lookup and the fetch: the replicas serve every block.
        barrier.action = lambda: cluster.kill(0)
        o = run("f_kill_one")
        assert barrier.fired == 1
        assert same(o, ref["f_kill_one"])
        assert o["num_cached_tokens"] == 20 * bs

        # 4. A second node killed mid-load: blocks whose both replicas are gone are missing;
        # the chain is cut at the first one and the rest is recomputed.
        before = e.log().count("recomputed")
        barrier.action = lambda: cluster.kill(1)
        o = run("f_kill_two")
        assert barrier.fired == 2
        assert same(o, ref["f_kill_two"])
        assert e.log().count("recomputed") > before, e.log()[-4000:]

        # 5. The engine still serves, with one node left.
        assert same(run("f_after"), ref["f_after"])
    finally:
        e.close()
        cluster.stop()


def test_connector_tls_config_from_extra_config_then_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kvshare.vllm import _tls_config

    class Cfg:
        def __init__(self, extra: dict[str, Any]) -> None:
            self.extra = extra

        def get_from_extra_config(self, key: str, default: Any) -> Any:
            return self.extra.get(key, default)

    for k in ("KVSHARE_TLS_CA", "KVSHARE_TLS_CERT", "KVSHARE_TLS_KEY"):
        monkeypatch.delenv(k, raising=False)
    assert _tls_config(Cfg({})) == {}
    assert _tls_config(Cfg({"tls_ca": "/x/ca.pem"})) == {"tls_ca": "/x/ca.pem"}
    monkeypatch.setenv("KVSHARE_TLS_CA", "/env/ca.pem")
    monkeypatch.setenv("KVSHARE_TLS_CERT", "/env/c.pem")
    monkeypatch.setenv("KVSHARE_TLS_KEY", "/env/c.key")
    assert _tls_config(Cfg({"tls_ca": "/x/ca.pem"})) == {
        "tls_ca": "/x/ca.pem", "tls_cert": "/env/c.pem", "tls_key": "/env/c.key"}


class _ExtraConfig:
    """The part of vLLM's KVTransferConfig the connector's settings helpers read."""

    def __init__(self, extra: dict[str, Any]) -> None:
        self.extra = extra

    def get_from_extra_config(self, key: str, default: Any) -> Any:
        return self.extra.get(key, default)


def test_connector_token_from_extra_config_then_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kvshare.vllm import _token_config

    def token(extra: dict[str, Any]) -> str | None:
        return _token_config(_ExtraConfig(extra))

    monkeypatch.delenv("KVSHARE_TOKEN", raising=False)
    assert token({}) is None
    assert token({"token": ""}) is None
    assert token({"token": "cfg-tok"}) == "cfg-tok"
    monkeypatch.setenv("KVSHARE_TOKEN", "env-tok")
    assert token({"token": "cfg-tok"}) == "cfg-tok"
    assert token({}) == "env-tok"
    assert token({"token": ""}) == "env-tok"


def test_connector_client_authenticates_with_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """The connector's client against a node with --auth-file: the token from KVSHARE_TOKEN
    is sent; without one the tier counts as unreachable; a reader's refused save neither takes
    the tier down nor shows the token."""
    import numpy as np

    from kvshare.vllm import _LazyClient, _token_config

    writer, reader = "kvs-conn-writer-51e0", "kvs-conn-reader-9ab4"
    c = Cluster(n=1, replicas=1, auth=[(writer, "writer", "t"), (reader, "reader", "t")])
    c.start()
    try:
        ns = kvshare.Namespace("m-conn-auth", num_layers=1, num_kv_heads=1, head_dim=64,
                               dtype="bf16", tokens_per_block=16)
        keys = ns.block_keys(range(32))
        data = np.frombuffer(np.random.default_rng(3).bytes(2 * ns.block_bytes), dtype=np.uint8)

        def lazy(token: str | None) -> _LazyClient:
            return _LazyClient(c.endpoints, codec="none", timeout_ms=3000, interval_s=60.0,
                               token=token)

        monkeypatch.delenv("KVSHARE_TOKEN", raising=False)
        assert lazy(_token_config(_ExtraConfig({}))).get() is None  # refused: no tier

        monkeypatch.setenv("KVSHARE_TOKEN", writer)
        w = lazy(_token_config(_ExtraConfig({})))
        wc = w.get()
        assert wc is not None
        assert wc.put_blocks(ns, keys, data).stored == 2
        assert writer not in repr(wc)

        r = lazy(_token_config(_ExtraConfig({"token": reader})))
        rc = r.get()
        assert rc is not None
        assert rc.lookup(ns, keys) == 2
        with pytest.raises(kvshare.KvshareError) as ei:
            rc.put_blocks(ns, keys, data)
        assert ei.value.code == "PERMISSION_DENIED", ei.value
        assert reader not in str(ei.value)
        r.mark_down(ei.value)
        assert r.get() is rc  # a refusal is not an outage: loads keep working
    finally:
        c.stop()
