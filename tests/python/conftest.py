"""Fixtures for the Python interop tests.

The stubs are generated from the repository's proto file at test time with grpcio-tools, so
these tests exercise the published contract with a gRPC client that is not ours.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PROTO_FILE = "kvshare/v1/kvshare.proto"
GEN_DIR = Path(__file__).resolve().parent / "gen"  # git-ignored

PORT_FILE_TIMEOUT_S = 20.0


def _generate_stubs() -> Path:
    if GEN_DIR.exists():
        shutil.rmtree(GEN_DIR)
    GEN_DIR.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={GEN_DIR}",
        f"--grpc_python_out={GEN_DIR}",
        PROTO_FILE,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"protoc failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout}\n{res.stderr}")
    # Make kvshare/ and kvshare/v1/ importable as regular packages.
    for d in (GEN_DIR / "kvshare", GEN_DIR / "kvshare" / "v1"):
        (d / "__init__.py").touch()
    return GEN_DIR


@pytest.fixture(scope="session")
def pb():
    """The generated modules: returns (kvshare_pb2, kvshare_pb2_grpc)."""
    gen = _generate_stubs()
    if str(gen) not in sys.path:
        sys.path.insert(0, str(gen))
    from kvshare.v1 import kvshare_pb2, kvshare_pb2_grpc  # noqa: E402

    return kvshare_pb2, kvshare_pb2_grpc


def _server_bin() -> Path:
    return Path(os.environ.get("KVSHARED_BIN", str(REPO / "target" / "debug" / "kvshared")))


@pytest.fixture(scope="session")
def server():
    """Starts kvshared on ephemeral ports; yields the parsed port file ({"grpc", "http", "node_id"})."""
    binary = _server_bin()
    if not binary.is_file():
        pytest.fail(f"kvshared binary not found at {binary} (build it or set KVSHARED_BIN)")

    tmp = Path(tempfile.mkdtemp(prefix="kvshare-py-"))
    port_file = tmp / "ports.json"
    log_path = tmp / "kvshared.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [
            str(binary),
            "--grpc-addr", "127.0.0.1:0",
            "--http-addr", "127.0.0.1:0",
            "--capacity", "64MiB",
            "--node-id", "py-node",
            "--port-file", str(port_file),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def server_log() -> str:
        log.flush()
        try:
            return log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    try:
        info = None
        deadline = time.monotonic() + PORT_FILE_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"kvshared exited early with code {proc.returncode}:\n{server_log()}")
            if port_file.exists():
                try:
                    info = json.loads(port_file.read_text())
                    if info.get("grpc"):
                        break
                except (json.JSONDecodeError, OSError):
                    pass  # partially written; retry
                info = None
            time.sleep(0.05)
        if info is None:
            raise RuntimeError(f"kvshared wrote no port file within {PORT_FILE_TIMEOUT_S}s:\n{server_log()}")
        yield info
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def channel(server):
    import grpc

    ch = grpc.insecure_channel(server["grpc"])
    grpc.channel_ready_future(ch).result(timeout=10)
    yield ch
    ch.close()


@pytest.fixture(scope="session")
def stub(pb, channel):
    _, kvshare_pb2_grpc = pb
    return kvshare_pb2_grpc.KvCacheStub(channel)
