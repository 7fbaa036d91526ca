"""Interop tests: kvshared against a third-party gRPC client (grpcio, stubs generated from the
repository's proto at test time)."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
import xxhash
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
KV_F16 = REPO / "tests" / "data" / "kv-f16-256tok.bin"

RPC_TIMEOUT = 10.0

# 2 layers x {K,V} x 16 tokens x 4 kv heads x 16 head_dim x f16 (2 bytes) = 8192 bytes: the
# server requires raw_len to equal exactly this product.
NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, TOKENS_PER_BLOCK, DTYPE_SIZE = 2, 4, 16, 16, 2
RAW_LEN = NUM_LAYERS * 2 * TOKENS_PER_BLOCK * NUM_KV_HEADS * HEAD_DIM * DTYPE_SIZE
assert RAW_LEN == 8192


def rand32() -> bytes:
    return os.urandom(32)


def real_kv_bytes(offset_blocks: int = 0) -> bytes:
    data = KV_F16.read_bytes()
    start = offset_blocks * RAW_LEN
    raw = data[start : start + RAW_LEN]
    assert len(raw) == RAW_LEN, f"{KV_F16} too short"
    return raw


def make_header(pb2, namespace: bytes, raw: bytes, checksum: int | None = None):
    return pb2.BlockHeader(
        namespace=namespace,
        layout=pb2.KvLayout(
            num_layers=NUM_LAYERS,
            num_kv_heads=NUM_KV_HEADS,
            head_dim=HEAD_DIM,
            dtype=pb2.DTYPE_F16,
            tokens_per_block=TOKENS_PER_BLOCK,
        ),
        codec=pb2.CODEC_NONE,
        raw_len=len(raw),
        checksum=xxhash.xxh3_64_intdigest(raw) if checksum is None else checksum,
        payload_len=len(raw),
    )


def chunked_put_requests(pb2, key: bytes, header, payload: bytes, n_chunks: int):
    """PutRequests for one block split into n_chunks; the header rides on the first only."""
    step = -(-len(payload) // n_chunks)
    reqs = []
    for i in range(n_chunks):
        part = payload[i * step : (i + 1) * step]
        req = pb2.PutRequest(key=key, data=part)
        if i == 0:
            req.header.CopyFrom(header)
        reqs.append(req)
    assert b"".join(r.data for r in reqs) == payload
    return reqs


def put_block(pb2, stub, namespace, key, raw, n_chunks=3, checksum=None):
    header = make_header(pb2, namespace, raw, checksum)
    reqs = chunked_put_requests(pb2, key, header, raw, n_chunks)
    return stub.Put(iter(reqs), timeout=RPC_TIMEOUT)


def put_bad_checksum(pb2, stub):
    """A put whose checksum is wrong; returns (namespace, key, raw, the grpc.RpcError)."""
    namespace, key, raw = rand32(), rand32(), real_kv_bytes(1)
    bad = (xxhash.xxh3_64_intdigest(raw) + 1) & 0xFFFFFFFFFFFFFFFF
    with pytest.raises(grpc.RpcError) as ei:
        put_block(pb2, stub, namespace, key, raw, n_chunks=2, checksum=bad)
    return namespace, key, raw, ei.value


def get_blocks(stub, pb2, namespace, keys):
    """Reassembles a Get stream: {index: {"key", "found", "header", "data"}}."""
    out: dict[int, dict] = {}
    for msg in stub.Get(pb2.GetRequest(namespace=namespace, keys=keys), timeout=RPC_TIMEOUT):
        entry = out.setdefault(msg.index, {"key": msg.key, "found": msg.found, "header": None,
                                           "data": bytearray(), "last": False, "chunks": 0})
        assert entry["key"] == msg.key
        if not msg.found:
            assert not msg.HasField("header") and not msg.data
            entry["found"] = False
            continue
        assert not entry["last"], "chunk after the block's last chunk"
        if entry["chunks"] == 0:
            assert msg.HasField("header"), "first chunk of a found block must carry the header"
            entry["header"] = msg.header
        assert msg.offset == len(entry["data"]), "chunk offsets must be contiguous"
        entry["data"] += msg.data
        entry["chunks"] += 1
        entry["last"] = msg.last
    return out


# --- (a) health -----------------------------------------------------------------------------

@pytest.mark.parametrize("service", ["", "kvshare.v1.KvCache"])
def test_health_serving(channel, service):
    health = health_pb2_grpc.HealthStub(channel)
    resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


# --- (b) put / put again / lookup / get -----------------------------------------------------

def test_put_lookup_get_roundtrip(pb, stub):
    pb2, _ = pb
    namespace, key, other = rand32(), rand32(), rand32()
    raw = real_kv_bytes(0)

    resp = put_block(pb2, stub, namespace, key, raw, n_chunks=3)
    assert len(resp.outcomes) == 1
    o = resp.outcomes[0]
    assert o.key == key
    assert o.status == pb2.BlockOutcome.STORED, pb2.BlockOutcome.Status.Name(o.status)
    assert o.replicas == 1

    resp2 = put_block(pb2, stub, namespace, key, raw, n_chunks=3)
    assert [x.status for x in resp2.outcomes] == [pb2.BlockOutcome.ALREADY_PRESENT]
    assert resp2.outcomes[0].key == key

    lk = stub.Lookup(pb2.LookupRequest(namespace=namespace, keys=[key, other]), timeout=RPC_TIMEOUT)
    assert lk.hit_blocks == 1
    assert list(lk.nodes) == ["py-node"]

    # A different namespace never matches, even with the same key.
    lk_other_ns = stub.Lookup(pb2.LookupRequest(namespace=rand32(), keys=[key]), timeout=RPC_TIMEOUT)
    assert lk_other_ns.hit_blocks == 0

    blocks = get_blocks(stub, pb2, namespace, [key, other])
    assert sorted(blocks) == [0, 1]

    got = blocks[0]
    assert got["found"] and got["last"]
    assert got["key"] == key
    assert bytes(got["data"]) == raw
    h = got["header"]
    assert h.namespace == namespace
    assert h.codec == pb2.CODEC_NONE
    assert h.raw_len == RAW_LEN
    assert h.payload_len == RAW_LEN
    assert h.checksum == xxhash.xxh3_64_intdigest(raw)
    assert (h.layout.num_layers, h.layout.num_kv_heads, h.layout.head_dim,
            h.layout.tokens_per_block, h.layout.dtype) == (
        NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, TOKENS_PER_BLOCK, pb2.DTYPE_F16)

    missing = blocks[1]
    assert missing["key"] == other
    assert missing["found"] is False


# --- (c) wrong checksum ---------------------------------------------------------------------

def test_put_bad_checksum_rejected(pb, stub):
    pb2, _ = pb
    namespace, key, _, err = put_bad_checksum(pb2, stub)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert "checksum" in err.details().lower(), err.details()

    # The server still answers, and the rejected block is not visible.
    lk = stub.Lookup(pb2.LookupRequest(namespace=namespace, keys=[key]), timeout=RPC_TIMEOUT)
    assert lk.hit_blocks == 0


# --- (d) empty key list ---------------------------------------------------------------------

def test_lookup_empty_keys_invalid(pb, stub):
    pb2, _ = pb
    with pytest.raises(grpc.RpcError) as ei:
        stub.Lookup(pb2.LookupRequest(namespace=rand32(), keys=[]), timeout=RPC_TIMEOUT)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (ei.value.code(), ei.value.details())


# --- (e) stats ------------------------------------------------------------------------------

def test_stats(pb, stub):
    pb2, _ = pb
    # Store a block of our own so this test does not depend on the others' order.
    resp = put_block(pb2, stub, rand32(), rand32(), real_kv_bytes(2), n_chunks=1)
    assert resp.outcomes[0].status == pb2.BlockOutcome.STORED

    st = stub.Stats(pb2.StatsRequest(), timeout=RPC_TIMEOUT)
    assert st.node_id == "py-node"
    assert st.stored_blocks >= 1
    assert st.capacity_bytes == 64 * 1024 * 1024
    assert st.stored_bytes >= RAW_LEN
    assert st.puts_stored >= 1


# --- (f) status details of a rejected put ---------------------------------------------------

def test_rejected_put_status_details(pb, stub):
    pb2, _ = pb
    _, key, _, err = put_bad_checksum(pb2, stub)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT

    # The standard google.rpc.Status in grpc-status-details-bin, read with grpcio-status,
    # carrying the PutResponse packed in an Any.
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)
    assert status is not None, "no google.rpc.Status in the trailers"
    assert status.code == 3
    assert "checksum" in status.message.lower(), status.message
    anys = [d for d in status.details if d.Is(pb2.PutResponse.DESCRIPTOR)]
    assert len(anys) == 1, [d.type_url for d in status.details]
    put_resp = pb2.PutResponse()
    anys[0].Unpack(put_resp)
    assert len(put_resp.outcomes) == 1
    o = put_resp.outcomes[0]
    assert o.key == key
    assert o.status == pb2.BlockOutcome.REJECTED, pb2.BlockOutcome.Status.Name(o.status)
    assert o.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] == 3
    assert "checksum" in o.reason.lower(), o.reason
    assert o.replicas == 0
