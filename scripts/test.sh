#!/usr/bin/env bash
# Runs every test of kvshare: formatting, lints, Rust unit and integration tests, deployment
# validation, bench smoke runs, the Python interop tests (grpcio against a real kvshared) and
# the vLLM integration tests (the kvshare Python package and KvshareConnector in real CPU vLLM
# engines; the vLLM venv is created once, ~5 GB). Installs what it needs first.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Each phase's header says how far into the run it starts (CI must stay under 25 minutes).
phase() { echo "== $* (at $((SECONDS / 60))m$((SECONDS % 60))s)"; }

scripts/bootstrap.sh

# The vLLM venv (downloads, 3-4 minutes on a fresh machine) is prepared in the background while
# cargo builds; the vLLM tests at the end wait for it. Its output goes to target/vllm-env.log.
mkdir -p target
scripts/vllm-env.sh >target/vllm-env.log 2>&1 &
vllm_env_pid=$!
trap 'kill "$vllm_env_pid" 2>/dev/null || true' EXIT

phase "cargo fmt --check"
cargo fmt --all -- --check
phase "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
phase "cargo build (every binary and test)"
# Every binary first: tests/secure_cluster.rs runs kvshare-worker, whose package has no
# integration tests of its own (so cargo test would not build it). --tests keeps the feature set
# of the test build, so cargo test below rebuilds nothing.
cargo build --locked --workspace --bins --tests
phase "cargo test"
cargo test --workspace --locked
# Fuzzing runs in the background, one target at a time, while the rest runs: the vLLM tests
# below compute on one core (the engines reserve the other), so the fuzz build and runs mostly
# use a core that would be idle (this brought the vLLM tests' start from 16m29s to 12m43s on 2
# cores). 30 s per target; docs/fuzzing.md for longer runs. Its output goes to target/fuzz.log, shown at the end.
export FUZZ_SECONDS="${FUZZ_SECONDS:-30}"
phase "fuzzing starts in the background (block header, Get stream, codecs: ${FUZZ_SECONDS}s per target, 1 at a time; docs/fuzzing.md)"
# In a session of its own, so that an early exit stops its whole process group.
FUZZ_JOBS="${FUZZ_JOBS:-1}" setsid scripts/fuzz.sh >target/fuzz.log 2>&1 &
fuzz_pid=$!
trap 'kill "$vllm_env_pid" 2>/dev/null || true; kill -- -"$fuzz_pid" 2>/dev/null || true' EXIT
phase "deployment manifests, alerts, dashboards (validated against kvshared --help and schemas)"
KVSHARED_BIN="$ROOT/target/debug/kvshared" scripts/validate-deploy.sh
phase "benchmark smoke run (kvshare vs redis, tiny sizes)"
target/debug/kvshare-bench --quick --compare redis --parts throughput,lookup --sizes 64KiB --concurrency 2 --bytes-per-cell 8MiB --out-dir target/bench-smoke
phase "worker TTFT bench smoke run (two worker processes; fails unless reuse is bit-exact)"
target/debug/kvshare-bench ttft --quick
phase "python interop tests"
# kvshared was built by cargo test --workspace (kvshare-server has integration tests).
KVSHARED_BIN="$ROOT/target/debug/kvshared" scripts/python-tests.sh
phase "vLLM integration tests (kvshare Python package, KvshareConnector in real vLLM engines)"
if ! wait "$vllm_env_pid"; then
  cat target/vllm-env.log >&2
  echo "the vLLM venv could not be created (scripts/vllm-env.sh; log above)" >&2
  exit 1
fi
KVSHARED_BIN="$ROOT/target/debug/kvshared" scripts/python-vllm-tests.sh
phase "fuzzing (started after the cargo tests)"
fuzz_rc=0
wait "$fuzz_pid" || fuzz_rc=$?
cat target/fuzz.log
if [ "$fuzz_rc" != 0 ]; then
  echo "fuzzing failed (exit $fuzz_rc; scripts/fuzz.sh output above)" >&2
  exit 1
fi
phase "all tests passed"
