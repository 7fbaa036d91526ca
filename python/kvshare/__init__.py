"""kvshare: Python client of the kvshare KV-cache sharing tier.

The transport, codecs, checksums and hashing are the Rust implementation (``kvshare._native``,
built from ``crates/kvshare-py``); this package adds the typed surface and engine adapters
(``kvshare.vllm``: a vLLM KV connector).

    >>> import kvshare
    >>> ns = kvshare.Namespace("my-model", num_layers=2, num_kv_heads=2, head_dim=8,
    ...                        dtype="bf16", tokens_per_block=16)
    >>> keys = kvshare.hash_blocks(list(range(64)), 16, namespace=ns)
    >>> client = kvshare.Client("127.0.0.1:50051")          # doctest: +SKIP
    >>> client.lookup(ns, keys)                              # doctest: +SKIP
    0
"""

from kvshare._native import (
    GET_CORRUPT,
    GET_MISSING,
    GET_OK,
    VLLM_DEFAULT_SEED,
    Client,
    GetResult,
    KvshareError,
    Namespace,
    PutResult,
    checksum,
    codecs,
    hash_blocks,
    vllm_none_hash,
)

__all__ = [
    "GET_CORRUPT",
    "GET_MISSING",
    "GET_OK",
    "VLLM_DEFAULT_SEED",
    "Client",
    "GetResult",
    "KvshareError",
    "Namespace",
    "PutResult",
    "checksum",
    "codecs",
    "hash_blocks",
    "vllm_none_hash",
]
