"""Type stubs of the Rust extension ``kvshare._native`` (crates/kvshare-py)."""

import os
from collections.abc import Sequence
from typing import Any, Final

from typing_extensions import Buffer

VLLM_DEFAULT_SEED: Final[str]
GET_OK: Final[int]
GET_MISSING: Final[int]
GET_CORRUPT: Final[int]

class KvshareError(Exception):
    """A kvshare call failed.

    ``code`` is the gRPC status name (``"UNAVAILABLE"``, ``"INVALID_ARGUMENT"``...) or None when
    the failure carries no status (connection setup, protocol, invalid input); ``code_value``
    is the status number or None.
    """

    code: str | None
    code_value: int | None

class Namespace:
    """Everything that makes two KV caches incompatible; blocks of different namespaces never
    match. ``scheme`` is ``"kvshare"`` (chained SHA-256 keys rooted at ``digest``) or ``"vllm"``
    (vLLM's ``sha256_cbor`` block hashes)."""

    def __init__(
        self,
        model: str,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: str,
        tokens_per_block: int,
        revision: str = "",
        tp_rank: int = 0,
        tp_size: int = 1,
        lora: str | None = None,
        tenant_salt: str | None = None,
        scheme: str = "kvshare",
    ) -> None: ...
    @property
    def digest(self) -> bytes:
        """32-byte namespace digest (identity on the wire, root of kvshare-scheme keys)."""
    @property
    def block_bytes(self) -> int:
        """Raw bytes of one block (all layers, K and V)."""
    @property
    def tokens_per_block(self) -> int: ...
    @property
    def scheme(self) -> str: ...
    @property
    def model(self) -> str: ...
    def block_keys(self, tokens: Sequence[int]) -> list[bytes]:
        """Keys of every full block of ``tokens`` (kvshare scheme only)."""

class PutResult:
    """Outcome of ``Client.put_blocks``."""

    @property
    def stored(self) -> int: ...
    @property
    def already_present(self) -> int: ...
    @property
    def raw_bytes(self) -> int: ...
    @property
    def wire_bytes(self) -> int: ...

class GetResult:
    """Outcome of ``Client.get_blocks``: ``status[i]`` is GET_OK, GET_MISSING or GET_CORRUPT."""

    @property
    def status(self) -> list[int]: ...
    @property
    def prefix_blocks(self) -> int:
        """Leading blocks decoded (the usable prefix)."""
    @property
    def wire_bytes(self) -> int: ...
    @property
    def raw_bytes(self) -> int: ...
    @property
    def errors(self) -> list[str]: ...

class Client:
    """Cluster-aware client: routes gets and puts straight to each key's owners.

    ``endpoints`` is ``"host:port,host:port"`` or a list. Raises KvshareError when no endpoint
    answers (``code`` ``"UNAUTHENTICATED"`` when the nodes refuse the token or its absence).
    TLS: ``tls_ca`` (path of the CA certificate(s) that sign the nodes' certificates; every
    connection then uses TLS), ``tls_cert`` and ``tls_key`` (a client certificate and key for
    nodes that require one, mTLS). ``token``: bearer token sent on every call, for nodes
    started with ``--auth-file`` (None or empty sends none; never shown by ``repr``; not read
    from ``KVSHARE_TOKEN``: pass it explicitly); a token with spaces, control or non-ASCII
    characters raises ValueError. Buffers: anything exporting the buffer protocol (bytes,
    bytearray, numpy arrays, memoryview) or a contiguous CPU torch tensor.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        codec: str = "byteplane-zstd",
        timeout_ms: int = 10000,
        connect_timeout_ms: int = 2000,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        token: str | None = None,
    ) -> None: ...
    @property
    def codec(self) -> str: ...
    def members(self) -> list[str]: ...
    def lookup(self, namespace: Namespace | bytes, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` the cluster holds (one round trip). ``namespace``: a
        Namespace or its 32-byte digest."""
    def put_blocks(
        self,
        namespace: Namespace,
        keys: Sequence[bytes],
        data: Buffer | Any,
        *,
        parent: bytes | None = None,
    ) -> PutResult:
        """Compress and upload ``len(keys)`` blocks laid back to back in ``data``."""
    def get_blocks(
        self, namespace: Namespace, keys: Sequence[bytes], out: Buffer | Any
    ) -> GetResult:
        """Fetch, verify and decode ``keys`` into ``out`` (``len(keys) * block_bytes`` bytes)."""
    def delete(self, namespace: Namespace | bytes, keys: Sequence[bytes]) -> int:
        """Delete ``keys`` from every owner; returns the number of copies that existed."""
    def stats(self) -> list[dict[str, Any]]:
        """Counters and gauges of every healthy member, one dict per node; ``namespaces`` is a
        list of ``{"namespace": digest, "blocks", "bytes", "hits"}``."""

def hash_blocks(
    tokens: Sequence[int],
    block_size: int,
    *,
    scheme: str = "kvshare",
    namespace: Namespace | None = None,
    parent: bytes | None = None,
    seed: str | None = None,
    lora: tuple[str, str | None] | None = None,
    cache_salt: str | None = None,
    first_block: int = 0,
) -> list[bytes]:
    """Keys of every full block of ``tokens``, kvshare's chained scheme or vLLM's sha256_cbor
    (seed: ``PYTHONHASHSEED`` when set, else ``"vllm-none-hash"``)."""

def vllm_none_hash(seed: str | None = None) -> bytes:
    """vLLM's NONE_HASH for ``seed`` (default: PYTHONHASHSEED, else "vllm-none-hash")."""

def checksum(data: Buffer | Any) -> int:
    """xxh3-64 of ``data``, as block headers carry it."""

def codecs() -> list[str]:
    """Codec names accepted by ``Client(codec=...)``."""
