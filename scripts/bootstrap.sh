#!/usr/bin/env bash
# Installs what building and testing kvshare needs on a fresh Debian machine with rustup and
# Python 3: the rustfmt and clippy components, and Python's venv module. Idempotent.
set -euo pipefail

if command -v rustup >/dev/null 2>&1; then
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
  done
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }

if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq python3 python3-venv python3-pip >/dev/null
  else
    echo "python3 with venv is required for the interop tests" >&2
    exit 1
  fi
fi
