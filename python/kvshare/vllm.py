"""A vLLM KV connector that loads and saves KV-cache blocks through a kvshare cluster.

Load it with::

    --kv-transfer-config '{"kv_connector": "KvshareConnector",
                           "kv_connector_module_path": "kvshare.vllm",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"endpoints": "host:port,host:port"}}'

Extra config keys (all optional but ``endpoints``, which falls back to ``KVSHARE_ENDPOINTS``):
``codec`` (default ``"byteplane-huff"``), ``timeout_ms`` (default 5000), ``namespace_salt``
(isolates this deployment's blocks from others on the same cluster), ``reconnect_interval_s``
(default 10), ``max_pending_save_bytes`` (default 1 GiB), ``load_failure_policy``
(``"recompute"``, the default, or ``"fail"``). TLS: ``tls_ca`` (path of the CA certificate(s)
that sign the nodes' certificates; falls back to ``KVSHARE_TLS_CA``), ``tls_cert`` and
``tls_key`` (client certificate and key for mTLS; fall back to ``KVSHARE_TLS_CERT`` and
``KVSHARE_TLS_KEY``). Auth: ``token`` (bearer token for nodes started with ``--auth-file``;
falls back to ``KVSHARE_TOKEN``). The connector never logs the token, but ``vllm serve`` logs
its ``--kv-transfer-config`` at startup ("non-default args"), extra config included: prefer
``KVSHARE_TOKEN``.

Scheduler side: one ``Lookup`` per new request for the full prompt blocks the local prefix
cache does not hold. Keys are vLLM's own block hashes when vLLM runs
``--prefix-caching-hash-algo sha256_cbor`` (``Request.block_hashes``), otherwise kvshare's
chained SHA-256 over the token ids. The namespace covers model, revision, KV dtype, the KV
layout (layers, KV heads, head size, block size, attention backend and kernel block layout),
TP rank/size, and per request the LoRA adapter and ``cache_salt``.

Worker side: requested blocks are fetched, verified (namespace, layout, xxh3 checksum),
decompressed on Rust threads and scattered into the paged KV cache before the forward pass
(``start_load_kv``). After the forward pass, new full blocks are gathered (copied out of the
paged cache, so vLLM may free them at once) and pushed by a background thread; compression and
the network run on Rust threads without the GIL. A block that is missing, corrupt or
unreachable is reported through ``get_block_ids_with_load_errors``; vLLM then recomputes it and
everything after it (the connector sets ``kv_load_failure_policy`` to ``"recompute"``). Errors
never propagate into the engine: a tier that is down means cache misses, not failed requests.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.logger import init_logger
from vllm.v1.kv_cache_interface import AttentionSpec

import kvshare

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# Under "vllm." so that vLLM's logging configuration (handler, format, level) applies.
logger = init_logger("vllm.kvshare")

#: Version tag of how this connector lays out a block: for each layer in the order of the KV
#: cache group, the bytes of that layer's paged-cache slice of the block, as the attention
#: backend stores it. Part of every namespace.
BLOCK_FORMAT = "vllm-paged-v1"

# Byte-sized KV formats (fp8 variants, int8) all travel as "u8"; which one it is goes into the
# namespace revision (torch dtype and vLLM's cache_dtype), so they never share blocks.
_DTYPES: dict[torch.dtype, str] = {
    torch.bfloat16: "bf16",
    torch.float16: "f16",
    torch.float32: "f32",
    torch.uint8: "u8",
    torch.int8: "u8",
    **{
        d: "u8"
        for d in (getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e5m2"))
        if d is not None
    },
}

# Loads up to this size reuse one staging buffer; larger ones allocate their own.
_MAX_CACHED_STAGING = 512 << 20

#: Status codes (None: no status, e.g. no member reachable) after which the tier is skipped
#: for a while instead of every request waiting for its timeout.
_TIER_DOWN_CODES = (None, "UNAVAILABLE", "DEADLINE_EXCEEDED")

#: Namespaces kept per connector (least recently used dropped first; rebuilding one is cheap).
_MAX_CACHED_NAMESPACES = 1024

# Test hook: when set to a directory, the worker writes ``<dir>/loading-<n>`` before fetching
# the n-th load and waits (up to 60 s) for ``<dir>/resume-<n>``, so a test can kill a node
# between the scheduler's lookup and the worker's fetch.
_LOAD_BARRIER_ENV = "KVSHARE_TEST_LOAD_BARRIER"


# ---------------------------------------------------------------------------------------------
# Metadata (scheduler -> worker)
# ---------------------------------------------------------------------------------------------


@dataclass
class NsSpec:
    """What makes a request's namespace differ from the engine's base namespace."""

    lora: str | None = None
    salt: str | None = None


@dataclass
class LoadSpec:
    """Blocks to fetch for one request and the paged-cache blocks they go into."""

    req_id: str
    ns: NsSpec
    keys: list[bytes]
    block_ids: list[int]


@dataclass
class SaveSpec:
    """New full blocks of one request to push."""

    req_id: str
    ns: NsSpec
    keys: list[bytes]
    block_ids: list[int]
    parent: bytes | None


@dataclass
class KvshareConnectorMetadata(KVConnectorMetadata):
    """Loads and saves of one engine step."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Stats
# ---------------------------------------------------------------------------------------------

_STAT_KEYS = (
    "load_requests",
    "load_blocks",
    "load_tokens",
    "load_wire_bytes",
    "load_raw_bytes",
    "load_seconds",
    "load_error_blocks",
    "save_blocks",
    "save_wire_bytes",
    "save_raw_bytes",
    "save_seconds",
    "save_dropped_blocks",
    "save_failed_blocks",
)


@dataclass
class KvshareConnectorStats(KVConnectorStats):
    """Counters of one interval, summed over workers: blocks, tokens, bytes (wire = compressed,
    raw = in the KV cache) and seconds spent loading and saving, load errors, dropped saves."""

    def __post_init__(self) -> None:
        for k in _STAT_KEYS:
            self.data.setdefault(k, 0)

    def reset(self) -> None:
        self.data = dict.fromkeys(_STAT_KEYS, 0)

    def aggregate(self, other: KVConnectorStats) -> KvshareConnectorStats:
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        d: dict[str, int | float] = {k: self.data.get(k, 0) for k in _STAT_KEYS}
        raw, wire = d["load_raw_bytes"], d["load_wire_bytes"]
        d["load_compression"] = round(raw / wire, 3) if wire else 0.0
        return d

    def is_empty(self) -> bool:
        return not any(self.data.get(k, 0) for k in _STAT_KEYS)


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


class _LazyClient:
    """A ``kvshare.Client`` that connects on first use and retries at most every
    ``interval_s`` after a failure, so an unreachable tier never blocks or fails the engine."""

    def __init__(
        self,
        endpoints: str,
        codec: str,
        timeout_ms: int,
        interval_s: float,
        tls: dict[str, str] | None = None,
        token: str | None = None,
    ) -> None:
        self.endpoints = endpoints
        self.codec = codec
        # tls_ca / tls_cert / tls_key for kvshare.Client (paths), only those set.
        self.tls = tls or {}
        # Bearer token for kvshare.Client; never logged.
        self._token = token
        self.timeout_ms = timeout_ms
        self.interval_s = interval_s
        self._client: kvshare.Client | None = None
        self._next_try = 0.0
        self._lock = threading.Lock()
        self._logged_down = False

    def get(self) -> kvshare.Client | None:
        if self._client is not None:
            return self._client
        with self._lock:
            if self._client is not None:
                return self._client
            now = time.monotonic()
            if now < self._next_try:
                return None
            try:
                self._client = kvshare.Client(
                    self.endpoints,
                    codec=self.codec,
                    timeout_ms=self.timeout_ms,
                    connect_timeout_ms=min(self.timeout_ms, 2000),
                    token=self._token,
                    **self.tls,
                )
                logger.info(
                    "kvshare: connected to %s (members %s, codec %s)",
                    self.endpoints,
                    self._client.members(),
                    self.codec,
                )
                self._logged_down = False
            except Exception as e:
                self._next_try = now + self.interval_s
                if not self._logged_down:
                    logger.warning(
                        "kvshare: tier %s unreachable (%s); running without it, retrying every "
                        "%.0f s",
                        self.endpoints,
                        e,
                        self.interval_s,
                    )
                    self._logged_down = True
            return self._client

    def mark_down(self, error: BaseException) -> None:
        """Called when a call failed. When no member answered (``UNAVAILABLE``,
        ``DEADLINE_EXCEEDED``, or no status at all), drop the client and skip the tier for
        ``interval_s``: later requests then miss at once instead of each waiting for the
        timeout on every member."""
        if not isinstance(error, kvshare.KvshareError) or error.code not in _TIER_DOWN_CODES:
            return
        with self._lock:
            if self._client is None:
                return
            self._client = None
            self._next_try = time.monotonic() + self.interval_s
            self._logged_down = True
        logger.warning(
            "kvshare: tier %s did not answer (%s); skipping it for %.0f s",
            self.endpoints,
            error,
            self.interval_s,
        )


def _tls_config(cfg: Any) -> dict[str, str]:
    """``tls_ca``/``tls_cert``/``tls_key`` from the connector's extra config, else from
    ``KVSHARE_TLS_CA``/``KVSHARE_TLS_CERT``/``KVSHARE_TLS_KEY``; only those set."""
    out = {}
    for key in ("tls_ca", "tls_cert", "tls_key"):
        value = cfg.get_from_extra_config(key, None) or os.environ.get(f"KVSHARE_{key.upper()}")
        if value:
            out[key] = str(value)
    return out


def _token_config(cfg: Any) -> str | None:
    """The bearer token: ``token`` from the connector's extra config, else ``KVSHARE_TOKEN``;
    None when neither is set (or both are empty)."""
    value = cfg.get_from_extra_config("token", None) or os.environ.get("KVSHARE_TOKEN")
    return str(value) if value else None


def _layout_of(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> dict[str, Any]:
    """KV layout of the engine's single full-attention KV cache group."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(
            f"KvshareConnector supports one KV cache group (plain attention models); this model "
            f"has {len(groups)}"
        )
    spec = groups[0].kv_cache_spec
    if not isinstance(spec, AttentionSpec):
        raise ValueError(f"KvshareConnector needs an attention KV cache, got {spec!r}")
    head_size_v = getattr(spec, "head_size_v", None) or spec.head_size
    if head_size_v != spec.head_size:
        raise ValueError("KvshareConnector needs equal K and V head sizes")
    dtype = _DTYPES.get(spec.dtype)
    if dtype is None:
        raise ValueError(f"KvshareConnector: unsupported KV cache dtype {spec.dtype}")
    return {
        "layer_names": list(groups[0].layer_names),
        "num_kv_heads": int(spec.num_kv_heads),
        "head_size": int(spec.head_size),
        "dtype": dtype,
        "block_size": int(spec.block_size),
        "torch_dtype": spec.dtype,
        "num_blocks": int(kv_cache_config.num_blocks),
    }


# ---------------------------------------------------------------------------------------------
# The connector
# ---------------------------------------------------------------------------------------------


@dataclass
class _ReqState:
    """Scheduler-side state of a running request."""

    request: Request
    ns: NsSpec
    block_ids: list[int]
    saved_blocks: int  # leading blocks that are in the tier or were pushed already
    lookup_start: int = 0
    lookup_hit: int = 0


class KvshareConnector(KVConnectorBase_V1):
    """vLLM V1 KV connector backed by a kvshare cluster (see the module docs)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        cfg = self._kv_transfer_config
        endpoints = cfg.get_from_extra_config("endpoints", None) or os.environ.get(
            "KVSHARE_ENDPOINTS", ""
        )
        if not endpoints:
            raise ValueError(
                "KvshareConnector needs kv_connector_extra_config.endpoints "
                '("host:port,...") or KVSHARE_ENDPOINTS'
            )
        if isinstance(endpoints, list):
            endpoints = ",".join(endpoints)
        self._client = _LazyClient(
            str(endpoints),
            codec=str(cfg.get_from_extra_config("codec", "byteplane-huff")),
            timeout_ms=int(cfg.get_from_extra_config("timeout_ms", 5000)),
            interval_s=float(cfg.get_from_extra_config("reconnect_interval_s", 10.0)),
            tls=_tls_config(cfg),
            token=_token_config(cfg),
        )
        policy = cfg.get_from_extra_config("load_failure_policy", "recompute")
        if policy not in ("recompute", "fail"):
            raise ValueError(f"load_failure_policy must be recompute or fail, not {policy!r}")
        if role == KVConnectorRole.SCHEDULER and cfg.kv_load_failure_policy != policy:
            # Read by the scheduler right after it constructs this connector.
            logger.info("kvshare: kv_load_failure_policy=%s (failed blocks are recomputed)", policy)
            cfg.kv_load_failure_policy = policy

        layout = _layout_of(vllm_config, kv_cache_config)
        self._layer_names: list[str] = layout["layer_names"]
        self._block_size: int = layout["block_size"]
        self._torch_dtype: torch.dtype = layout["torch_dtype"]
        self._num_blocks: int = layout["num_blocks"]
        mc = vllm_config.model_config
        pc = vllm_config.parallel_config
        cache = vllm_config.cache_config
        self._tp_size = int(pc.tensor_parallel_size)
        self._tp_rank = 0
        if role == KVConnectorRole.WORKER and self._tp_size > 1:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._tp_rank = int(get_tensor_model_parallel_rank())
        # kv_role: kv_producer saves only, kv_consumer loads only, kv_both does both.
        self._do_load = bool(cfg.is_kv_consumer)
        self._do_save = bool(cfg.is_kv_producer)
        self._use_vllm_hashes = cache.prefix_caching_hash_algo == "sha256_cbor"
        backend = _attention_backend_name(vllm_config)
        kv_format = f"{layout['torch_dtype']}/{cache.cache_dtype}"
        revision = f"{mc.revision or ''}|{BLOCK_FORMAT}|{backend}|{kv_format}"
        self._ns_args: dict[str, Any] = {
            "num_layers": len(self._layer_names),
            "num_kv_heads": layout["num_kv_heads"],
            "head_dim": layout["head_size"],
            "dtype": layout["dtype"],
            "tokens_per_block": self._block_size,
            "revision": revision,
            "tp_size": self._tp_size,
            "scheme": "vllm" if self._use_vllm_hashes else "kvshare",
        }
        self._model = str(mc.model)
        self._namespace_salt = str(cfg.get_from_extra_config("namespace_salt", "") or "")
        # Namespaces by (LoRA, cache_salt, TP rank); bounded (cache_salt is often per user) and
        # shared by the engine thread and the push thread.
        self._namespaces: OrderedDict[tuple[str | None, str | None, int], kvshare.Namespace] = (
            OrderedDict()
        )
        self._namespaces_lock = threading.Lock()
        self._base_ns = self._namespace(NsSpec(), self._tp_rank)
        logger.info(
            "kvshare: %s connector, endpoints %s, keys %s, %s",
            role.name.lower(),
            endpoints,
            "vLLM sha256_cbor block hashes" if self._use_vllm_hashes else "kvshare chained SHA-256",
            self._base_ns,
        )

        # Scheduler state.
        self._reqs: dict[str, _ReqState] = {}
        self._pending_loads: dict[str, LoadSpec] = {}

        # Worker state.
        self._kv_caches: list[torch.Tensor] = []
        self._kernel_per_block = 1
        self._layer_block_bytes = 0
        self._load_errors: set[int] = set()
        self._load_buf: torch.Tensor | None = None
        # Requests whose load failed this step: this step's forward computed their later
        # tokens on top of missing KV, so their blocks are not saved (vLLM recomputes them).
        self._failed_loads: set[str] = set()
        self._stats = KvshareConnectorStats()
        self._stats_lock = threading.Lock()
        self._load_count = 0
        self._pusher: _Pusher | None = None
        if role == KVConnectorRole.WORKER and self._do_save:
            self._pusher = _Pusher(
                self,
                int(cfg.get_from_extra_config("max_pending_save_bytes", 1 << 30)),
            )

    # -- namespaces ---------------------------------------------------------------------------

    def _namespace(self, spec: NsSpec, tp_rank: int) -> kvshare.Namespace:
        k = (spec.lora, spec.salt, tp_rank)
        with self._namespaces_lock:
            ns = self._namespaces.get(k)
            if ns is not None:
                self._namespaces.move_to_end(k)
                return ns
            salt = self._namespace_salt
            if spec.salt:
                salt = f"{salt}\x00cache_salt={spec.salt}"
            ns = kvshare.Namespace(
                self._model,
                tp_rank=tp_rank,
                lora=spec.lora,
                tenant_salt=salt or None,
                **self._ns_args,
            )
            self._namespaces[k] = ns
            while len(self._namespaces) > _MAX_CACHED_NAMESPACES:
                self._namespaces.popitem(last=False)
        return ns

    @staticmethod
    def _ns_spec(request: Request) -> NsSpec:
        lora = request.lora_request
        return NsSpec(
            lora=f"{lora.lora_name}@{lora.lora_path}" if lora is not None else None,
            salt=request.cache_salt or None,
        )

    def _request_keys(self, request: Request, ns: NsSpec, n_blocks: int) -> list[bytes]:
        """Keys of the first ``n_blocks`` full blocks of the request's tokens."""
        if self._use_vllm_hashes:
            return [bytes(h) for h in request.block_hashes[:n_blocks]]
        tokens = request.all_token_ids[: n_blocks * self._block_size]
        return kvshare.hash_blocks(list(tokens), self._block_size, namespace=self._namespace(ns, 0))

    # ==========================================================================================
    # Scheduler side
    # ==========================================================================================

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        try:
            return self._matched_tokens(request, num_computed_tokens), False
        except Exception as e:  # never fail the scheduler
            logger.warning("kvshare: lookup for request %s failed: %s", request.request_id, e)
            self._client.mark_down(e)
            return 0, False

    def _matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        bs = self._block_size
        st = self._reqs.get(request.request_id)
        if st is None:
            st = _ReqState(request=request, ns=self._ns_spec(request), block_ids=[], saved_blocks=0)
            self._reqs[request.request_id] = st
        start = num_computed_tokens // bs
        st.saved_blocks = start
        if not self._do_load:
            return 0
        if request.mm_features and not self._use_vllm_hashes:
            return 0  # token ids alone do not identify multimodal prompts
        # At least one prompt token must be computed (its logits are the first output).
        end = (request.num_prompt_tokens - 1) // bs
        if self._use_vllm_hashes and len(request.block_hashes) < end:
            return 0
        if end <= start:
            return 0
        if st.lookup_start == start and st.lookup_hit:  # repeated call: no new round trip
            return st.lookup_hit * bs
        client = self._client.get()
        if client is None:
            return 0
        keys = self._request_keys(request, st.ns, end)
        t0 = time.perf_counter()
        hit = client.lookup(self._namespace(st.ns, 0), keys[start:end])
        st.lookup_start, st.lookup_hit = start, hit
        logger.info(
            "kvshare: request %s: %d prompt tokens, %d local hit, %d tokens in the tier "
            "(lookup %.1f ms)",
            request.request_id,
            request.num_prompt_tokens,
            num_computed_tokens,
            hit * bs,
            (time.perf_counter() - t0) * 1e3,
        )
        return hit * bs

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        st = self._reqs.get(request.request_id)
        if st is None or num_external_tokens <= 0:
            return
        bs = self._block_size
        n = num_external_tokens // bs
        start = st.lookup_start
        block_ids = list(blocks.get_block_ids()[0])
        try:
            keys = self._request_keys(request, st.ns, start + n)[start:]
        except Exception as e:  # never into the scheduler: with no keys, the worker reports
            # every promised block as a load error and vLLM recomputes them.
            logger.warning("kvshare: preparing the load of %s failed: %s", request.request_id, e)
            keys = []
        self._pending_loads[request.request_id] = LoadSpec(
            req_id=request.request_id,
            ns=st.ns,
            keys=keys,
            block_ids=block_ids[start : start + n],
        )
        st.saved_blocks = start + n  # loaded blocks are in the tier already

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KvshareConnectorMetadata()
        try:
            self._build_meta(scheduler_output, meta)
        except Exception as e:  # a save we skip is a future miss, never an engine error
            logger.warning("kvshare: building connector metadata failed: %s", e)
        # Loads must not be dropped once promised: vLLM counts those tokens as computed.
        meta.loads = list(self._pending_loads.values())
        self._pending_loads.clear()
        return meta

    def _build_meta(self, so: SchedulerOutput, meta: KvshareConnectorMetadata) -> None:
        bs = self._block_size
        for new in so.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            done = new.num_computed_tokens + so.num_scheduled_tokens.get(new.req_id, 0)
            self._add_save(meta, st, done // bs)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                st.block_ids.extend(new_ids[0])
            computed = cached.num_computed_tokens[i]
            # A recomputation after a failed load restarts below what was counted as saved.
            st.saved_blocks = min(st.saved_blocks, computed // bs)
            done = computed + so.num_scheduled_tokens.get(req_id, 0)
            self._add_save(meta, st, done // bs)

    def _add_save(self, meta: KvshareConnectorMetadata, st: _ReqState, full_blocks: int) -> None:
        if not self._do_save:
            return
        req = st.request
        full_blocks = min(full_blocks, len(st.block_ids), req.num_tokens // self._block_size)
        if self._use_vllm_hashes:
            full_blocks = min(full_blocks, len(req.block_hashes))
        elif req.mm_features:
            return
        start = st.saved_blocks
        if full_blocks <= start:
            return
        keys = self._request_keys(req, st.ns, full_blocks)
        meta.saves.append(
            SaveSpec(
                req_id=req.request_id,
                ns=st.ns,
                keys=keys[start:full_blocks],
                block_ids=st.block_ids[start:full_blocks],
                parent=keys[start - 1] if start > 0 else None,
            )
        )
        st.saved_blocks = full_blocks

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._reqs.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        return False, None

    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> KVConnectorStats | None:
        return KvshareConnectorStats(data=dict(data or {}))

    # ==========================================================================================
    # Worker side
    # ==========================================================================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        try:
            caches = [kv_caches[name] for name in self._layer_names]
            first = caches[0]
        except (KeyError, IndexError) as e:
            logger.error("kvshare: KV cache layer %s not registered; connector disabled", e)
            return
        if first.shape[0] % self._num_blocks != 0:
            logger.error(
                "kvshare: KV cache has %d kernel blocks for %d blocks; connector disabled",
                first.shape[0],
                self._num_blocks,
            )
            return
        self._kernel_per_block = first.shape[0] // self._num_blocks
        per_layer = first[0].numel() * first.element_size() * self._kernel_per_block
        expect = self._base_ns.block_bytes // len(caches)
        if per_layer != expect or any(c.shape != first.shape for c in caches):
            logger.error(
                "kvshare: a block of one layer holds %d bytes in the paged cache, the namespace "
                "layout says %d; connector disabled",
                per_layer,
                expect,
            )
            return
        self._layer_block_bytes = per_layer
        self._kv_caches = caches
        logger.info(
            "kvshare: registered %d KV cache layers %s (%s), %d bytes per block and layer",
            len(caches),
            tuple(first.shape),
            first.dtype,
            per_layer,
        )

    @staticmethod
    def _runs(block_ids: list[int]) -> list[tuple[int, int, int]]:
        """Runs of consecutive block ids: (index of the first, its block id, length). Copies
        per run are plain slice copies (several times faster than index_copy_ on CPU)."""
        runs: list[tuple[int, int, int]] = []
        for i, b in enumerate(block_ids):
            if runs and runs[-1][1] + runs[-1][2] == b:
                i0, b0, n = runs[-1]
                runs[-1] = (i0, b0, n + 1)
            else:
                runs.append((i, b, 1))
        return runs

    def _staging(self, n: int) -> torch.Tensor:
        """A reused buffer for ``n`` loaded blocks (fresh pages cost as much as the copy)."""
        shape = (n, len(self._kv_caches), self._layer_block_bytes)
        need = n * len(self._kv_caches) * self._layer_block_bytes
        if need > _MAX_CACHED_STAGING:
            return torch.empty(shape, dtype=torch.uint8)
        if self._load_buf is None or self._load_buf.numel() < need:
            self._load_buf = torch.empty(need, dtype=torch.uint8)
        return self._load_buf[:need].view(shape)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KvshareConnectorMetadata) or not meta.loads:
            return
        for spec in meta.loads:
            try:
                self._load(spec)
            except Exception as e:  # never fail the forward pass: recompute instead
                logger.warning(
                    "kvshare: load of %d blocks for request %s failed (%s); recomputing them",
                    len(spec.block_ids),
                    spec.req_id,
                    e,
                )
                self._load_errors.update(spec.block_ids)
                self._failed_loads.add(spec.req_id)
                self._add_stats(load_error_blocks=len(spec.block_ids))
                self._client.mark_down(e)

    def _load(self, spec: LoadSpec) -> None:
        n = len(spec.keys)
        if not self._kv_caches:
            raise RuntimeError("no registered KV cache")
        self._test_barrier()
        client = self._client.get()
        if client is None:
            raise RuntimeError("tier unreachable")
        ns = self._namespace(spec.ns, self._tp_rank)
        t0 = time.perf_counter()
        staging = self._staging(n)
        res = client.get_blocks(ns, spec.keys, staging)
        ok = res.prefix_blocks
        if ok > 0:
            r = self._kernel_per_block
            runs = self._runs(spec.block_ids[:ok])
            for layer, kv in enumerate(self._kv_caches):
                src = staging[:ok, layer].view(kv.dtype)
                for i0, b0, cnt in runs:
                    kv[b0 * r : (b0 + cnt) * r].copy_(
                        src[i0 : i0 + cnt].reshape(cnt * r, *kv.shape[1:])
                    )
        dt = time.perf_counter() - t0
        failed = spec.block_ids[ok:]
        if failed:
            self._load_errors.update(failed)
            self._failed_loads.add(spec.req_id)
            corrupt = [
                k for k, s in zip(spec.keys, res.status, strict=True) if s == kvshare.GET_CORRUPT
            ]
            logger.warning(
                "kvshare: request %s: %d of %d blocks usable; block %d and the %d after it are "
                "recomputed (%s)",
                spec.req_id,
                ok,
                n,
                ok,
                len(failed) - 1,
                "; ".join(res.errors[:3]),
            )
            if corrupt:
                # Drop the bad copies so the recomputed blocks replace them.
                try:
                    removed = client.delete(ns, corrupt)
                    logger.warning(
                        "kvshare: deleted %d corrupt block(s) (%d copies) from the tier",
                        len(corrupt),
                        removed,
                    )
                except Exception as e:
                    logger.warning("kvshare: deleting corrupt blocks failed: %s", e)
        logger.info(
            "kvshare: request %s: loaded %d blocks (%d tokens), %d bytes on the wire for %d raw "
            "(%.2fx), %.1f ms",
            spec.req_id,
            ok,
            ok * self._block_size,
            res.wire_bytes,
            res.raw_bytes,
            res.raw_bytes / res.wire_bytes if res.wire_bytes else 0.0,
            dt * 1e3,
        )  # bytes: every block received and decoded, including any after a failed one
        self._add_stats(
            load_requests=1,
            load_blocks=ok,
            load_tokens=ok * self._block_size,
            load_wire_bytes=res.wire_bytes,
            load_raw_bytes=res.raw_bytes,
            load_seconds=dt,
            load_error_blocks=len(failed),
        )

    def _test_barrier(self) -> None:
        d = os.environ.get(_LOAD_BARRIER_ENV)
        if not d:
            return
        self._load_count += 1
        n = self._load_count
        with open(os.path.join(d, f"loading-{n}"), "w") as f:
            f.write(str(os.getpid()))
        resume = os.path.join(d, f"resume-{n}")
        deadline = time.monotonic() + 60
        while not os.path.exists(resume) and time.monotonic() < deadline:
            time.sleep(0.02)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv, before the forward pass

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return  # blocks are gathered once per step, in wait_for_save

    def wait_for_save(self) -> None:
        failed, self._failed_loads = self._failed_loads, set()
        meta = self._connector_metadata
        if not isinstance(meta, KvshareConnectorMetadata) or not meta.saves:
            return
        if not self._kv_caches or self._pusher is None:
            return
        for spec in meta.saves:
            if spec.req_id in failed:
                logger.info(
                    "kvshare: request %s: not saving %d blocks computed over a failed load",
                    spec.req_id,
                    len(spec.keys),
                )
                continue
            try:
                n = len(spec.block_ids)
                r = self._kernel_per_block
                runs = self._runs(spec.block_ids)
                staging = torch.empty(
                    (n, len(self._kv_caches), self._layer_block_bytes), dtype=torch.uint8
                )
                for layer, kv in enumerate(self._kv_caches):
                    dst = staging[:, layer]
                    for i0, b0, cnt in runs:
                        blocks = kv[b0 * r : (b0 + cnt) * r].view(torch.uint8)
                        dst[i0 : i0 + cnt].copy_(blocks.reshape(cnt, -1))
                self._pusher.submit(spec, staging)
            except Exception as e:
                logger.warning("kvshare: gathering blocks of request %s failed: %s", spec.req_id, e)

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        with self._stats_lock:
            if self._stats.is_empty():
                return None
            out, self._stats = self._stats, KvshareConnectorStats()
        return out

    def _add_stats(self, **kw: float) -> None:
        with self._stats_lock:
            for k, v in kw.items():
                self._stats.data[k] = self._stats.data.get(k, 0) + v

    def shutdown(self) -> None:
        if self._pusher is not None:
            self._pusher.close(timeout_s=30.0)
            self._pusher = None


class _Pusher:
    """Background thread that compresses and uploads gathered blocks (GIL released inside)."""

    def __init__(self, conn: KvshareConnector, max_pending_bytes: int) -> None:
        self._conn = conn
        self._max = max_pending_bytes
        self._pending = 0
        self._lock = threading.Lock()
        self._q: queue.Queue[tuple[SaveSpec, torch.Tensor] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="kvshare-push", daemon=True)
        self._thread.start()

    def submit(self, spec: SaveSpec, data: torch.Tensor) -> None:
        size = data.numel()
        with self._lock:
            if self._pending + size > self._max:
                logger.warning(
                    "kvshare: %d bytes of saves pending; dropping %d blocks of request %s",
                    self._pending,
                    len(spec.keys),
                    spec.req_id,
                )
                self._conn._add_stats(save_dropped_blocks=len(spec.keys))
                return
            self._pending += size
        self._q.put((spec, data))

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            spec, data = item
            try:
                self._push(spec, data)
            except BaseException as e:  # incl. a Rust panic: the thread must keep serving
                logger.warning(
                    "kvshare: push of %d blocks of request %s failed: %s",
                    len(spec.keys),
                    spec.req_id,
                    e,
                )
                self._conn._add_stats(save_failed_blocks=len(spec.keys))
            finally:
                with self._lock:
                    self._pending -= data.numel()

    def _push(self, spec: SaveSpec, data: torch.Tensor) -> None:
        conn = self._conn
        client = conn._client.get()
        if client is None:
            conn._add_stats(save_failed_blocks=len(spec.keys))
            return
        ns = conn._namespace(spec.ns, conn._tp_rank)
        t0 = time.perf_counter()
        res = client.put_blocks(ns, spec.keys, data, parent=spec.parent)
        dt = time.perf_counter() - t0
        logger.debug(
            "kvshare: pushed %d blocks of request %s (%d new), %d -> %d bytes, %.1f ms",
            len(spec.keys),
            spec.req_id,
            res.stored,
            res.raw_bytes,
            res.wire_bytes,
            dt * 1e3,
        )
        conn._add_stats(
            save_blocks=len(spec.keys),
            save_wire_bytes=res.wire_bytes,
            save_raw_bytes=res.raw_bytes,
            save_seconds=dt,
        )

    def flush(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self._pending == 0 and self._q.empty():
                    return True
            time.sleep(0.01)
        return False

    def close(self, timeout_s: float) -> None:
        if not self.flush(timeout_s):
            logger.warning("kvshare: saves still pending at shutdown were dropped")
        self._q.put(None)
        self._thread.join(timeout=1.0)


def _attention_backend_name(vllm_config: VllmConfig) -> str:
    """A name for the attention backend's paged-cache memory layout (part of the namespace)."""
    try:
        from vllm.platforms import current_platform

        plat = str(current_platform.device_type or "unknown")
    except Exception:
        plat = "unknown"
    backend = (
        getattr(vllm_config.attention_config, "backend", None)
        if hasattr(vllm_config, "attention_config")
        else None
    )
    return f"{plat}:{backend or 'default'}"
