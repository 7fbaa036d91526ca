#!/usr/bin/env bash
# Builds kvshare's fuzz targets (fuzz/, see docs/fuzzing.md) and runs each for FUZZ_SECONDS
# seconds on a copy of its committed corpus plus its regression inputs; fails on any crash, leak,
# timeout or out-of-memory and prints where the input that caused it was saved.
#
#   FUZZ_SECONDS=60        seconds per target (CI, through scripts/test.sh: 30)
#   FUZZ_JOBS=2            targets run at once (one core each)
#   FUZZ_TARGETS="..."     which targets (default: all of `cargo fuzz list`)
#   FUZZ_SANITIZER=address address (default; on stable through RUSTC_BOOTSTRAP=1) or none
#   FUZZ_KEEP_CORPUS=1     merge what the run found back into fuzz/corpus/ (off: CI never
#                          grows the committed corpus)
#   FUZZ_BUILD_LOCK=FILE   hold this flock only while building (machines shared by builders)
#
# cargo-fuzz is installed at a pinned version into ~/.cache/kvshare/cargo-fuzz when missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CARGO_FUZZ_VERSION=0.13.2
SECONDS_PER_TARGET="${FUZZ_SECONDS:-60}"
JOBS="${FUZZ_JOBS:-2}"
SANITIZER="${FUZZ_SANITIZER:-address}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/kvshare"
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
# One target dir per sanitizer, so switching does not rebuild everything.
TARGET_DIR="$ROOT/fuzz/target/$SANITIZER"
BIN_DIR="$TARGET_DIR/$TRIPLE/release"
ARTIFACTS="$ROOT/fuzz/artifacts"
start=$(date +%s)

locked() {
  if [ -n "${FUZZ_BUILD_LOCK:-}" ]; then flock "$FUZZ_BUILD_LOCK" "$@"; else "$@"; fi
}

CARGO_FUZZ="$CACHE/cargo-fuzz/bin/cargo-fuzz"
if ! "$CARGO_FUZZ" --version 2>/dev/null | grep -qx "cargo-fuzz $CARGO_FUZZ_VERSION"; then
  echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION into $CACHE/cargo-fuzz"
  locked cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --quiet \
    --root "$CACHE/cargo-fuzz"
fi

# The build flags cargo-fuzz passes (-Cpasses=sancov-module, -Cllvm-args=...) are stable; only
# -Zsanitizer is not. Stable's rust-std ships the ASan runtime, so RUSTC_BOOTSTRAP=1 enables it
# without a nightly toolchain (measured on 1.95).
# CARGO_CACHE_RUSTC_INFO=0: cargo caches rustc's answers per target dir without regard to
# RUSTC_BOOTSTRAP, so one build without it would poison the cache.
build_env=(CARGO_CACHE_RUSTC_INFO=0)
case "$SANITIZER" in
  address) build_env+=(RUSTC_BOOTSTRAP=1) ;;
  none) ;;
  *) echo "fuzz: FUZZ_SANITIZER must be address or none" >&2; exit 2 ;;
esac
# fuzz/ is outside the main workspace, so `cargo fmt --all` does not see it.
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
echo "fuzz: building targets (sanitizer $SANITIZER, debug assertions and overflow checks on)"
# --locked check first: cargo-fuzz has no --locked flag of its own.
locked cargo fetch --locked --quiet --manifest-path fuzz/Cargo.toml
locked env "${build_env[@]}" "$CARGO_FUZZ" build --fuzz-dir fuzz --target-dir "$TARGET_DIR" \
  --sanitizer "$SANITIZER" --debug-assertions
built=$(date +%s)

read -r -a targets <<<"${FUZZ_TARGETS:-$("$CARGO_FUZZ" list --fuzz-dir fuzz | tr '\n' ' ')}"

# Inputs beyond these sizes reach no new code and only slow each run down.
max_len() {
  case "$1" in
    block_header) echo 1024 ;;
    codec_roundtrip) echo 16384 ;;
    *) echo 65536 ;;
  esac
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/kvshare-fuzz.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

run_target() {
  local t="$1" dir="$WORK/$1"
  mkdir -p "$dir/corpus" "$ARTIFACTS/$t"
  cp -r "fuzz/corpus/$t/." "$dir/corpus/" 2>/dev/null || true
  local extra=()
  [ -d "fuzz/regressions/$t" ] && extra+=("fuzz/regressions/$t")
  set +e
  # Malloc limit: libFuzzer enforces it per allocation (sanitizer builds only); the RSS limit
  # bounds the whole process. -timeout flags any input slower than 20 s as a hang.
  ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}" "$BIN_DIR/$t" "$dir/corpus" "${extra[@]}" \
    -max_total_time="$SECONDS_PER_TARGET" -max_len="$(max_len "$t")" \
    -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=20 \
    -artifact_prefix="$ARTIFACTS/$t/" -print_final_stats=1 >"$dir/log" 2>&1
  echo $? >"$dir/rc"
  set -e
}

echo "fuzz: running ${targets[*]} for ${SECONDS_PER_TARGET}s each, $JOBS at a time"
for t in "${targets[@]}"; do
  [ -x "$BIN_DIR/$t" ] || { echo "fuzz: no target $t in $BIN_DIR" >&2; exit 2; }
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  run_target "$t" &
done
wait

failed=0
for t in "${targets[@]}"; do
  dir="$WORK/$t"
  rc=$(cat "$dir/rc" 2>/dev/null || echo 1)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$dir/log" 2>/dev/null || true)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$dir/log" 2>/dev/null || true)
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$dir/log" 2>/dev/null || true)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9a-zA-Z]+' "$dir/log" 2>/dev/null | tail -1 || true)
  printf 'fuzz: %-16s %s  %s execs, %s/s, peak RSS %s MB, %s\n' "$t" \
    "$([ "$rc" = 0 ] && echo ok || echo FAILED)" "${execs:-?}" "${rate:-?}" "${rss:-?}" "${cov:-?}"
  if [ "$rc" != 0 ]; then
    failed=1
    echo "---- $t: what failed (exit $rc; full log: $ARTIFACTS/$t/log)"
    grep -E -A3 'panicked at|==ERROR|ERROR: libFuzzer' "$dir/log" | head -24 || true
    grep -vE '^#[0-9]+\s|^ +#[0-9]+ 0x|^ +(at |[0-9]+: )' "$dir/log" | tail -12 || true
    cp "$dir/log" "$ARTIFACTS/$t/log"
    echo "---- $t: inputs saved under $ARTIFACTS/$t/:"
    ls -1 "$ARTIFACTS/$t" | grep -v '^log$' | sed "s|^|  $ARTIFACTS/$t/|" || true
    echo "---- reproduce: $BIN_DIR/$t <input>   (docs/fuzzing.md: minimize, add as regression)"
  elif [ "${FUZZ_KEEP_CORPUS:-0}" = 1 ]; then
    "$BIN_DIR/$t" -merge=1 -max_len="$(max_len "$t")" "fuzz/corpus/$t" "$dir/corpus" >/dev/null 2>&1
    echo "fuzz: merged new inputs into fuzz/corpus/$t"
  fi
done
end=$(date +%s)
echo "fuzz: build $((built - start))s, runs $((end - built))s, total $((end - start))s"
exit "$failed"
