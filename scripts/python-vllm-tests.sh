#!/usr/bin/env bash
# vLLM integration tests: builds the kvshare Python package (crates/kvshare-py + python/) into
# the vLLM venv (scripts/vllm-env.sh), lints it (ruff, mypy --strict) and runs python/tests:
# the extension against a real 3-node kvshared cluster, and real vLLM engines (CPU, tiny
# random-weight Llamas) sharing prefill through it, exact outputs and faults included.
#
# Needs a built kvshared (target/debug/kvshared, or KVSHARED_BIN=/path/to/kvshared).
# Every cargo/maturin build runs under `flock` when KVSHARE_BUILD_LOCK names a lock file.
# Extra arguments go to pytest (e.g. -k native).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$(scripts/vllm-env.sh)"
PY="$VENV/bin/python"
lock=()
if [ -n "${KVSHARE_BUILD_LOCK:-}" ]; then
  lock=(flock "$KVSHARE_BUILD_LOCK")
fi

echo "== kvshare Python package: maturin develop into $VENV"
(cd python && VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" "${lock[@]}" "$VENV/bin/maturin" develop --quiet)

echo "== ruff"
"$VENV/bin/ruff" check python/kvshare python/tests python/bench
"$VENV/bin/ruff" format --check python/kvshare
# mypy (about 50 s of one core: it reads vLLM's and torch's annotations) runs beside pytest,
# whose engines compute on the other core; its verdict is checked after the tests.
echo "== mypy --strict (in the background, beside pytest)"
mypy_log="$(mktemp)"
trap 'rm -f "$mypy_log"' EXIT
(cd python && "$VENV/bin/mypy" --strict kvshare) >"$mypy_log" 2>&1 &
mypy_pid=$!

export KVSHARED_BIN="${KVSHARED_BIN:-$ROOT/target/debug/kvshared}"
if [ ! -x "$KVSHARED_BIN" ]; then
  "${lock[@]}" cargo build --locked -p kvshare-server
fi
echo "== pytest python/tests"
(cd python && "$PY" -m pytest -q -p no:cacheprovider tests "$@")
echo "== mypy --strict"
mypy_rc=0
wait "$mypy_pid" || mypy_rc=$?
cat "$mypy_log"
exit "$mypy_rc"
