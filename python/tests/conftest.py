"""Fixtures: real kvshared clusters, tiny random-weight Llama models, vLLM engines in
subprocesses (tests/engine_driver.py)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().parent / "engine_driver.py"
MARK = "@@kvshare@@ "
ENGINE_TIMEOUT_S = float(os.environ.get("KVSHARE_ENGINE_TIMEOUT_S", "600"))


def kvshared_bin() -> Path:
    return Path(os.environ.get("KVSHARED_BIN", str(REPO / "target" / "debug" / "kvshared")))


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Cluster:
    """N kvshared processes on 127.0.0.1 with static peers and R replicas."""

    def __init__(
        self,
        n: int = 3,
        replicas: int = 2,
        capacity: str = "512MiB",
        tls: Path | None = None,
        auth: Sequence[tuple[str, str, str | None]] | None = None,
    ) -> None:
        self.n, self.replicas, self.capacity = n, replicas, capacity
        # tls: a scripts/dev-certs.sh directory; the nodes then serve mTLS with node.pem.
        self.tls = tls
        # auth: (token, role, tenant) triples; the nodes then run with --auth-file listing
        # their digests, plus a generated peer token (role peer) they send to each other.
        self.auth = auth
        ports = free_ports(2 * n)
        self.grpc = [f"127.0.0.1:{p}" for p in ports[:n]]
        self.http = [f"127.0.0.1:{p}" for p in ports[n:]]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n
        self.dir = Path(tempfile.mkdtemp(prefix="kvshare-cluster-"))

    @property
    def endpoints(self) -> str:
        return ",".join(self.grpc)

    def start(self) -> Cluster:
        binary = kvshared_bin()
        if not binary.is_file():
            raise RuntimeError(f"kvshared not found at {binary} (cargo build -p kvshare-server)")
        if self.auth is not None:
            self.write_auth_files()
        for i in range(self.n):
            log = open(self.dir / f"node-{i}.log", "wb")  # noqa: SIM115 (outlives the call)
            self.procs[i] = subprocess.Popen(
                [
                    str(binary),
                    "--node-id", f"node-{i}",
                    "--grpc-addr", self.grpc[i],
                    "--http-addr", self.http[i],
                    "--peers", self.endpoints,
                    "--replicas", str(self.replicas),
                    "--capacity", self.capacity,
                    "--peer-health-interval-ms", "200",
                    "--drain-seconds", "0",
                    "--port-file", str(self.dir / f"ports-{i}.json"),
                    *self.tls_args(),
                    *self.auth_args(),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        for i in range(self.n):
            while not (self.dir / f"ports-{i}.json").exists():
                proc = self.procs[i]
                assert proc is not None
                if proc.poll() is not None:
                    raise RuntimeError(f"kvshared node-{i} exited: {self.log(i)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"kvshared node-{i} did not start: {self.log(i)}")
                time.sleep(0.05)
        time.sleep(0.6)  # a few health rounds: every node sees every peer
        return self

    def tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        return [
            "--tls-cert", str(self.tls / "node.pem"),
            "--tls-key", str(self.tls / "node.key"),
            "--tls-client-ca", str(self.tls / "ca.pem"),
        ]

    def write_auth_files(self) -> None:
        """auth.toml (docs/security.md: only SHA-256 digests of the tokens) and peer-token."""
        assert self.auth is not None
        peer_token = secrets.token_urlsafe(24)
        (self.dir / "peer-token").write_text(peer_token + "\n")
        tenants = sorted({t for _, _, t in self.auth if t is not None})
        lines = [f'[tenants."{t}"]' for t in tenants]
        for token, role, tenant in [*self.auth, (peer_token, "peer", None)]:
            lines.append("[[tokens]]")
            if tenant is not None:
                lines.append(f'tenant = "{tenant}"')
            lines.append(f'role = "{role}"')
            lines.append(f'sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"')
        (self.dir / "auth.toml").write_text("\n".join(lines) + "\n")

    def auth_args(self) -> list[str]:
        if self.auth is None:
            return []
        return [
            "--auth-file", str(self.dir / "auth.toml"),
            "--peer-token-file", str(self.dir / "peer-token"),
        ]

    def log(self, i: int) -> str:
        try:
            return (self.dir / f"node-{i}.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            if proc is not None:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def cluster_factory() -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(**kw: Any) -> Cluster:
        c = Cluster(**kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster().start()
    yield c
    c.stop()


def make_llama(path: Path, *, dtype: str, num_kv_heads: int, layers: int = 2,
               hidden: int = 256, heads: int = 4, vocab: int = 1024, seed: int = 0) -> Path:
    """A random-weight Llama saved like a Hugging Face checkpoint (no tokenizer)."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=8192,
        torch_dtype=dtype,
    )
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(path)
    return path


class Engine:
    """A vLLM engine in a subprocess (engine_driver.py), driven over stdin/stdout."""

    def __init__(self, config: dict[str, Any], log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        cfg_path = log_path.with_suffix(".json")
        cfg_path.write_text(json.dumps(config))
        full_env = dict(os.environ)
        full_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # vLLM's CPU backend reserves one more core when any KV connector is configured, so
        # engines with and without a connector would compute on different thread counts (and
        # round differently). Pin the reservation: every engine uses the same cores.
        full_env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
        full_env.update(env or {})
        self._stderr = open(log_path, "ab")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, str(DRIVER), str(cfg_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=full_env,
        )
        self._buf = b""
        self.other_stdout: list[str] = []
        ready = self.read(ENGINE_TIMEOUT_S)
        self.startup_seconds = ready.get("startup_seconds", 0.0)

    def log(self) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        return self.log_path.read_text(errors="replace")

    def read(self, timeout: float, on_idle: Callable[[], None] | None = None) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith(MARK):
                    result: dict[str, Any] = json.loads(text[len(MARK):])
                    return result
                self.other_stdout.append(text)
                self._stderr.write(line + b"\n")
                self._stderr.flush()
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine did not answer in {timeout}s\n{self.log()[-5000:]}")
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"engine exited with {code}\n{self.log()[-8000:]}")
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                chunk = os.read(fd, 65536)
                self._buf += chunk
            elif on_idle is not None:
                on_idle()

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def generate(self, prompts: list[list[int]], max_tokens: int = 8,
                 cache_salt: str | None = None, reset_prefix_cache: bool = False,
                 on_idle: Callable[[], None] | None = None) -> list[dict[str, Any]]:
        self.send({"op": "generate", "prompts": prompts, "max_tokens": max_tokens,
                   "cache_salt": cache_salt, "reset_prefix_cache": reset_prefix_cache})
        res = self.read(ENGINE_TIMEOUT_S, on_idle)
        if "error" in res:
            raise RuntimeError(res["error"])
        outputs: list[dict[str, Any]] = res["outputs"]
        return outputs

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"op": "exit"})
                self.proc.wait(timeout=60)
            except Exception:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._stderr.close()


def connector_config(endpoints: str, **extra: Any) -> dict[str, Any]:
    return {
        "kv_connector": "KvshareConnector",
        "kv_connector_module_path": "kvshare.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"endpoints": endpoints, **extra},
    }
