#!/usr/bin/env bash
# Python interop tests: grpcio (a gRPC client that is not ours) against kvshared.
# Needs a built kvshared (target/debug/kvshared, or KVSHARED_BIN=/path/to/kvshared).
# Venv: ${KVSHARE_VENV:-<repo>/target/py-venv}; requirements reinstalled only when they change.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="${KVSHARE_VENV:-$ROOT/target/py-venv}"
REQ="tests/python/requirements.txt"
STAMP="$VENV/.requirements.sha256"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi

want="$(sha256sum "$REQ" | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQ"
  echo "$want" >"$STAMP"
fi

export KVSHARED_BIN="${KVSHARED_BIN:-$ROOT/target/debug/kvshared}"
exec "$VENV/bin/python" -m pytest -q tests/python "$@"
