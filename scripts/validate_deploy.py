#!/usr/bin/env python3
"""Checks of kvshare's deployment files, driven by scripts/validate-deploy.sh.

Subcommands (each prints one line per check, then `CHECKS passed=N failed=M skipped=K`, and
exits non-zero when a check failed):

  manifests RENDERED.yaml   Kubernetes schema validation (bundled schemas of the
                            kubernetes-validate package, strict: unknown fields fail) of every
                            rendered resource, the ServiceMonitor with the models of the npm
                            package @kubernetes-models/prometheus-operator (--npm-dir; via
                            validate_servicemonitor.mjs: schema, plus a TypeScript check that
                            rejects unknown fields; self-tests on broken copies), cert-manager
                            Certificates and Issuers likewise with @kubernetes-models/cert-manager
                            (validate_certmanager.mjs), TLS consistency (Secret-mounted files
                            written by a Certificate that names every pod and the peer name,
                            HTTPS probes, ServiceMonitor over mTLS), and
                            kvshare's own consistency rules: real kvshared flags and
                            KVSHARE_* variables only, memory = capacity + headroom (or a
                            limit that leaves room for one with capacity auto), probes,
                            selectors, named ports, security context, grace period > drain.
  smoke RENDERED.yaml       Starts the real kvshared with the StatefulSet's args and env (listen
                            addresses moved to 127.0.0.1 and port 0, peers pointed at a closed
                            loopback port: no traffic leaves the machine; capacity auto is
                            replaced by what the pod's memory limit gives), checks /healthz,
                            /readyz, /api/stats against the manifests, records the metric names
                            of /metrics, then stops it with SIGTERM. With TLS, the Secret's
                            files are made by scripts/dev-certs.sh, requests go over HTTPS, and
                            under mTLS only the probes answer without a client certificate.
  monitoring                Metric names used by the alert rules, their tests, the Grafana
                            dashboard and the docs exist in kvshared's /metrics; Grafana
                            structure; every dashboard query parses (promtool check rules on
                            the queries as recording rules).
  files                     Dockerfile and .dockerignore conventions; KVSHARE_* names in the
                            Dockerfile and docs exist in `kvshared --help` / `kvshare --help`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Callable

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP_LABELS = {"app.kubernetes.io/name": "kvshare", "app.kubernetes.io/component": "cache-node"}
MIB = 1024 * 1024
RUNTIME_HEADROOM = 256 * MIB


# ---------------------------------------------------------------------------------------------
# Reporting


class Report:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.passed = 0
        self.failed = 0
        self.skipped = 0

    def ok(self, name: str, detail: str = "") -> None:
        self.passed += 1
        print(f"  ok    {self.prefix}{name}" + (f" ({detail})" if detail else ""))

    def fail(self, name: str, why: str) -> None:
        self.failed += 1
        print(f"  FAIL  {self.prefix}{name}: {why}")

    def skip(self, name: str, why: str) -> None:
        self.skipped += 1
        print(f"  skip  {self.prefix}{name}: {why}")

    def check(self, name: str, cond: bool, why: str, detail: str = "") -> bool:
        if cond:
            self.ok(name, detail)
        else:
            self.fail(name, why)
        return cond

    def run(self, name: str, fn: Callable[[], str | None]) -> None:
        """Runs fn; a returned string is a failure reason, an exception too."""
        try:
            why = fn()
        except Exception as e:  # noqa: BLE001 - any error is a failed check
            why = f"{type(e).__name__}: {e}"
        if why:
            self.fail(name, why)
        else:
            self.ok(name)

    def finish(self) -> int:
        print(f"CHECKS passed={self.passed} failed={self.failed} skipped={self.skipped}")
        return 1 if self.failed else 0


# ---------------------------------------------------------------------------------------------
# Sizes and quantities


def parse_kvshare_size(s: str) -> int:
    """A kvshared size: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", s)
    if not m:
        raise ValueError(f"not a kvshared size: {s!r}")
    num = float(m.group(1))
    unit = m.group(2) or "B"
    if unit == "B":
        mult = 1
    else:
        power = "KMGT".index(unit[0]) + 1
        mult = (1024 if "i" in unit else 1000) ** power
    return int(num * mult)


def auto_capacity(memory_limit: Any, buffer_budget: str) -> int:
    """What `--capacity auto` derives under a container memory limit: limit - budget - 256MiB."""
    return int(parse_quantity(memory_limit)) - parse_kvshare_size(buffer_budget) - RUNTIME_HEADROOM


def parse_quantity(q: Any) -> float:
    """A Kubernetes resource quantity (memory or CPU) as a number of bytes / cores."""
    s = str(q).strip()
    m = re.fullmatch(r"([+-]?\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?\d+)?", s)
    if not m:
        raise ValueError(f"not a quantity: {s!r}")
    num = float(m.group(1))
    suf = m.group(2) or ""
    bin_ = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
    dec = {"k": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
    if suf in bin_:
        return num * 1024 ** bin_[suf]
    if suf in dec:
        return num * 1000 ** dec[suf]
    if suf == "m":
        return num / 1000
    if suf[:1] in ("e", "E"):
        return num * 10 ** int(suf[1:])
    return num


def mib(n: float) -> str:
    return f"{n / MIB:.0f}Mi"


# ---------------------------------------------------------------------------------------------
# kvshared --help


class Help:
    """Flags and environment variables of a binary, parsed from its --help."""

    def __init__(self, text: str):
        self.text = text
        self.flags: set[str] = set()
        self.envs: set[str] = set()
        self.flag_env: dict[str, str] = {}
        current = None
        for line in text.splitlines():
            m = re.match(r"^\s+(?:-\w, )?--([a-z0-9][a-z0-9-]*)", line)
            if m:
                current = m.group(1)
                self.flags.add(current)
            for env in re.findall(r"\[env: ([A-Z0-9_]+)=", line):
                self.envs.add(env)
                if current:
                    self.flag_env[current] = env

    @staticmethod
    def load(path: str | None) -> "Help | None":
        if not path or not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            return Help(f.read())


# ---------------------------------------------------------------------------------------------
# Manifests


def load_docs(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]


def rid(d: dict) -> str:
    return f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"


DEFS = "https://kubernetes.io/api/_definitions.json#/$defs/"
# Custom kinds in deploy/ (kubernetes-validate has no schemas for them) are validated by
# scripts/validate_servicemonitor.mjs with the models of the npm package
# @kubernetes-models/prometheus-operator (pinned and installed into --npm-dir by
# validate-deploy.sh, never committed): its compiled JSON-schema validator plus a TypeScript check
# against its IServiceMonitor interface, which rejects unknown fields at every level.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
SM_VALIDATOR = os.path.join(ROOT, "scripts/validate_servicemonitor.mjs")
# cert-manager's Certificate and Issuer (deploy/kubernetes/overlays/tls) likewise, with the npm
# package @kubernetes-models/cert-manager (scripts/validate_certmanager.mjs).
CM_KINDS = {("cert-manager.io/v1", "Certificate"), ("cert-manager.io/v1", "Issuer")}
CM_VALIDATOR = os.path.join(ROOT, "scripts/validate_certmanager.mjs")


def run_sm_validator(docs: list[dict], npm_dir: str | None, script: str = SM_VALIDATOR) -> dict:
    """Runs validate_servicemonitor.mjs (or `script`, another validator with the same interface)
    on docs; its JSON result (validator, documents[].errors, selftests[]). Raises RuntimeError
    when it cannot run."""
    what = os.path.basename(script)
    if not npm_dir:
        raise RuntimeError(f"no --npm-dir: the packages of {what} are not installed")
    node = os.environ.get("NODE", "node")
    p = subprocess.run([node, script, npm_dir], input=json.dumps(docs), capture_output=True, text=True,
                       timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"{script} exited {p.returncode}: {(p.stderr or p.stdout).strip()[-2000:]}")
    return json.loads(p.stdout)


def validate_metadata(doc: dict, k8s_version: str) -> str | None:
    """Validates a custom resource's metadata as ObjectMeta (as the API server does) with the
    strict Kubernetes definitions bundled with kubernetes-validate for k8s_version."""
    import importlib_resources
    import jsonschema
    from referencing import Registry, Resource

    version = [v for v in kv_versions() if v.rsplit(".", 1)[0] <= k8s_version][-1]
    ref = importlib_resources.files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json"
    )
    with importlib_resources.as_file(ref) as p, open(p, encoding="utf-8") as f:
        defs = json.load(f)
    registry = Resource.from_contents(defs) @ Registry()
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
              "$ref": DEFS + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    v = jsonschema.validators.Draft202012Validator(schema, registry=registry)
    errors = sorted(v.iter_errors(doc.get("metadata", {})), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        return f"metadata.{'.'.join(str(p) for p in e.path) or '<root>'}: {e.message}"
    return None


def servicemonitor_rules(doc: dict) -> str | None:
    """What the operator rejects beyond the schema: a scrape timeout longer than the interval."""
    for ep in doc["spec"].get("endpoints") or []:
        if "interval" in ep and "scrapeTimeout" in ep:
            if duration_s(ep["scrapeTimeout"]) > duration_s(ep["interval"]):
                return f"endpoint {ep.get('port')}: scrapeTimeout {ep['scrapeTimeout']} > interval {ep['interval']}"
    return None


def duration_s(s: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    total = 0.0
    for num, unit in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", s):
        total += int(num) * units[unit]
    return total


def kv_versions() -> list[str]:
    from kubernetes_validate.utils import all_versions

    return all_versions()


def check_schemas(r: Report, docs: list[dict], versions: list[str], npm_dir: str | None) -> None:
    from kubernetes_validate import utils as kvu

    custom = [d for d in docs if (d.get("apiVersion"), d.get("kind")) in CUSTOM_KINDS]
    sm_result: dict | None = None
    sm_error = ""
    if custom:
        try:
            sm_result = run_sm_validator(custom, npm_dir)
        except Exception as e:  # noqa: BLE001 - reported as failed checks below
            sm_error = f"{type(e).__name__}: {e}"
        # Self-tests: the validator must accept a valid ServiceMonitor and reject broken copies
        # of it (unknown fields, wrong type, bad enum, missing selector); one that accepts
        # everything fails here.
        if sm_result is None:
            r.fail("ServiceMonitor validator self-tests", sm_error)
        else:
            for t in sm_result["selftests"]:
                errs = t["errors"]
                r.check(f"ServiceMonitor validator self-test: {t['expect']}s {t['name']}", t["ok"],
                        "accepted it" if t["expect"] == "reject" else "; ".join(errs[:3]),
                        detail=(errs[0][:140] if errs and t["expect"] == "reject" else ""))
    cm_docs = [d for d in docs if (d.get("apiVersion"), d.get("kind")) in CM_KINDS]
    cm_result: dict | None = None
    cm_error = ""
    if cm_docs:
        try:
            cm_result = run_sm_validator(cm_docs, npm_dir, CM_VALIDATOR)
        except Exception as e:  # noqa: BLE001 - reported as failed checks below
            cm_error = f"{type(e).__name__}: {e}"
        if cm_result is None:
            r.fail("cert-manager validator self-tests", cm_error)
        else:
            for t in cm_result["selftests"]:
                errs = t["errors"]
                r.check(f"cert-manager validator self-test: {t['expect']}s {t['name']}", t["ok"],
                        "accepted it" if t["expect"] == "reject" else "; ".join(errs[:3]),
                        detail=(errs[0][:140] if errs and t["expect"] == "reject" else ""))
    for v in versions:
        for d in docs:
            name = f"schema k8s {v} {rid(d)}"
            if (d.get("apiVersion"), d.get("kind")) in CM_KINDS:
                name += f" (metadata as k8s {v} ObjectMeta; {cm_result['validator'] if cm_result else 'cert-manager validator'})"

                def cm_check(d=d, i=cm_docs.index(d), v=v) -> str | None:
                    if cm_result is None:
                        return cm_error
                    errs = cm_result["documents"][i]["errors"]
                    if errs:
                        return "; ".join(errs[:5])
                    return validate_metadata(d, v)

                r.run(name, cm_check)
                continue
            if (d.get("apiVersion"), d.get("kind")) in CUSTOM_KINDS:
                name += f" (metadata as k8s {v} ObjectMeta; {sm_result['validator'] if sm_result else 'ServiceMonitor validator'})"

                def check(d=d, i=custom.index(d), v=v) -> str | None:
                    if sm_result is None:
                        return sm_error
                    errs = sm_result["documents"][i]["errors"]
                    if errs:
                        return "; ".join(errs[:5])
                    return validate_metadata(d, v) or servicemonitor_rules(d)

                r.run(name, check)
                continue
            try:
                kvu.validate(d, v, strict=True)
                r.ok(name)
            except kvu.ValidationError as e:
                r.fail(name, f"{'.'.join(str(p) for p in e.path) or '<root>'}: {e.message}")
            except kvu.SchemaNotFoundError as e:
                r.fail(name, e.message)


def container_of(sts: dict, name: str = "kvshared") -> dict | None:
    for c in sts["spec"]["template"]["spec"].get("containers", []):
        if c.get("name") == name:
            return c
    return None


def flags_in_args(args: list[str]) -> list[tuple[str, str | None]]:
    """(flag, value) pairs of `--flag=value` / `--flag value` arguments."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(args):
        a = str(args[i])
        if a.startswith("--"):
            if "=" in a:
                f, v = a[2:].split("=", 1)
                out.append((f, v))
            elif i + 1 < len(args) and not str(args[i + 1]).startswith("-"):
                out.append((a[2:], str(args[i + 1])))
                i += 1
            else:
                out.append((a[2:], None))
        elif a.startswith("-"):
            out.append((a.lstrip("-"), None))
        i += 1
    return out


def container_env(docs: list[dict], c: dict) -> tuple[dict[str, Any], list[str]]:
    """Environment of a container: name -> value or {'fieldRef': path}; plus problems."""
    env: dict[str, Any] = {}
    problems: list[str] = []
    for src in c.get("envFrom") or []:
        ref = src.get("configMapRef")
        if not ref:
            problems.append(f"envFrom source {src} is not a configMapRef (not checked)")
            continue
        cms = find(docs, "ConfigMap", ref["name"])
        if not cms:
            if not ref.get("optional"):
                problems.append(f"envFrom ConfigMap {ref['name']!r} is not in the rendered manifests")
            continue
        for k, v in (cms[0].get("data") or {}).items():
            env[(src.get("prefix") or "") + k] = str(v)
    for e in c.get("env") or []:
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif "valueFrom" in e and "fieldRef" in e["valueFrom"]:
            env[e["name"]] = {"fieldRef": e["valueFrom"]["fieldRef"]["fieldPath"]}
        else:
            env[e["name"]] = {"other": e.get("valueFrom")}
    return env, problems


def dns_covers(pattern: str, name: str) -> bool:
    """Whether certificate DNS name `pattern` (a `*.` wildcard matches one label) covers `name`."""
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name


def check_tls(r: Report, docs: list[dict], sts: dict, c: dict, env: dict, flag_vals: dict, adv: Any) -> None:
    """TLS consistency: the files kvshared reads come from a mounted Secret that a cert-manager
    Certificate of this render writes; that Certificate names every pod (the advertised DNS
    name) and the peer name, is valid for server and client auth; probes use HTTPS and the
    ServiceMonitor scrapes over HTTPS with a client certificate."""
    ns = sts["metadata"].get("namespace", "default")
    pod = sts["spec"]["template"]["spec"]
    mounts = {m["mountPath"].rstrip("/"): m for m in c.get("volumeMounts") or []}
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    certs = {d["spec"]["secretName"]: d for d in find(docs, "Certificate")}
    node_cert = None
    for key in ("KVSHARE_TLS_CERT", "KVSHARE_TLS_KEY", "KVSHARE_TLS_CLIENT_CA", "KVSHARE_TLS_CA"):
        path = env.get(key)
        if path is None:
            continue
        if not r.check(f"TLS: {key} is a file path", isinstance(path, str), f"{key} = {path!r}"):
            continue
        d, _, f = path.rpartition("/")
        m = mounts.get(d)
        if not r.check(f"TLS: {key} ({path}) is in a mounted volume", m is not None,
                       f"no volumeMount at {d} (mounts {sorted(mounts)})"):
            continue
        r.check(f"TLS: mount {d} is read-only", m.get("readOnly") is True, f"mount {m}")
        secret = (volumes.get(m["name"], {}).get("secret") or {}).get("secretName")
        if not r.check(f"TLS: {key} comes from a Secret", secret is not None, f"volume {volumes.get(m['name'])}"):
            continue
        cert = certs.get(secret)
        r.check(f"TLS: Secret {secret} is written by a Certificate of this render", cert is not None,
                f"no Certificate with secretName {secret} (Certificates write {sorted(certs)})")
        r.check(f"TLS: {key} names a key cert-manager writes (tls.crt, tls.key, ca.crt)", f in ("tls.crt", "tls.key", "ca.crt"), f"file {f}")
        if key == "KVSHARE_TLS_CERT":
            node_cert = cert
    if node_cert is not None:
        names = node_cert["spec"].get("dnsNames") or []
        usages = set(node_cert["spec"].get("usages") or [])
        r.check("TLS: node certificate usages include server auth and client auth", {"server auth", "client auth"} <= usages,
                f"usages {sorted(usages)} (nodes present it to each other under mTLS)")
        pods = [f"{sts['metadata']['name']}-{i}.{sts['spec'].get('serviceName')}.{ns}.svc.cluster.local"
                for i in range(int(sts["spec"].get("replicas", 1)))]
        missing = [p for p in pods if not any(dns_covers(n, p) for n in names)]
        r.check("TLS: node certificate names every pod's DNS name", not missing, f"not covered: {missing} by {names}",
                detail=f"{len(pods)} pods")
        peer = env.get("KVSHARE_TLS_PEER_NAME") or flag_vals.get("tls-peer-name")
        if "peers-dns" in flag_vals or "KVSHARE_PEERS_DNS" in env:
            r.check("TLS: peers found by DNS (IPs) are verified against a name (KVSHARE_TLS_PEER_NAME)", isinstance(peer, str),
                    "set KVSHARE_TLS_PEER_NAME to a DNS name of the node certificate")
        if isinstance(peer, str):
            r.check("TLS: node certificate names KVSHARE_TLS_PEER_NAME", any(dns_covers(n, peer) for n in names),
                    f"{peer} not covered by {names}")
        issuer = node_cert["spec"].get("issuerRef") or {}
        if issuer.get("kind", "Issuer") == "Issuer":
            r.check(f"TLS: Issuer {issuer.get('name')} is in this render", bool(find(docs, "Issuer", issuer.get("name"))),
                    f"issuerRef {issuer}")
    if "KVSHARE_TLS_CLIENT_CA" in env or "tls-client-ca" in flag_vals:
        ca_path = env.get("KVSHARE_TLS_CLIENT_CA") or flag_vals.get("tls-client-ca")
        r.check("TLS: the client CA is the node Secret's ca.crt", isinstance(ca_path, str) and ca_path.endswith("/ca.crt"),
                f"{ca_path!r}")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        p = c.get(probe)
        if p:
            r.check(f"TLS: {probe} uses HTTPS", (p.get("httpGet") or {}).get("scheme") == "HTTPS",
                    f"httpGet {p.get('httpGet')} (the HTTP port speaks TLS)")
    for sm in find(docs, "ServiceMonitor"):
        for ep in sm["spec"].get("endpoints") or []:
            tc = ep.get("tlsConfig") or {}
            r.check("TLS: ServiceMonitor scrapes over https", ep.get("scheme") == "https", f"endpoint {ep}")
            if "KVSHARE_TLS_CLIENT_CA" in env:
                r.check("TLS: ServiceMonitor presents a client certificate (mTLS)", bool(tc.get("cert")) and bool(tc.get("keySecret")),
                        f"tlsConfig {tc}")
            sn = tc.get("serverName")
            if node_cert is not None:
                r.check("TLS: ServiceMonitor serverName is a name of the node certificate",
                        isinstance(sn, str) and any(dns_covers(n, sn) for n in node_cert["spec"].get("dnsNames") or []),
                        f"serverName {sn!r} (targets are pod IPs)")
            for ref in (tc.get("cert", {}).get("secret"), tc.get("ca", {}).get("secret"), tc.get("keySecret")):
                if ref:
                    r.check(f"TLS: ServiceMonitor Secret {ref.get('name')} is written by a Certificate", ref.get("name") in certs,
                            f"Certificates write {sorted(certs)}")


def check_secret_files(r: Report, docs: list[dict], sts: dict, c: dict, env: dict) -> None:
    """Auth: the auth file and the peer token file (components/auth) come from a read-only
    Secret volume, and the peer token is not in the environment."""
    pod = sts["spec"]["template"]["spec"]
    mounts = {m["mountPath"].rstrip("/"): m for m in c.get("volumeMounts") or []}
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    for key in ("KVSHARE_AUTH_FILE", "KVSHARE_PEER_TOKEN_FILE"):
        path = env.get(key)
        if not isinstance(path, str):
            continue
        m = mounts.get(path.rpartition("/")[0])
        secret = (volumes.get(m["name"], {}).get("secret") or {}) if m else {}
        r.check(f"auth: {key} ({path}) is in a read-only Secret volume",
                m is not None and m.get("readOnly") is True and bool(secret.get("secretName")),
                f"mount {m}, volume {volumes.get(m['name']) if m else None}")
    r.check("auth: the peer token is not a plain env value", not isinstance(env.get("KVSHARE_PEER_TOKEN"), str),
            "KVSHARE_PEER_TOKEN set literally in the manifest")


def check_manifests(r: Report, docs: list[dict], kvshared: Help, versions: list[str], npm_dir: str | None) -> None:
    check_schemas(r, docs, versions, npm_dir)

    ns_set = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    r.check("one namespace for every namespaced resource", len(ns_set) == 1, f"namespaces {sorted(map(str, ns_set))}",
            detail=str(next(iter(ns_set)) or "(current)"))
    for d in docs:
        if d["kind"] == "Namespace":
            continue
        labels = d["metadata"].get("labels") or {}
        r.check(f"labels {rid(d)}", labels_match(APP_LABELS, labels),
                f"metadata.labels lack {APP_LABELS} (got {labels})")

    stss = find(docs, "StatefulSet")
    if not r.check("one StatefulSet", len(stss) == 1, f"found {len(stss)}"):
        return
    sts = stss[0]
    spec = sts["spec"]
    tmpl = spec["template"]
    pod = tmpl["spec"]
    pod_labels = tmpl["metadata"].get("labels") or {}
    c = container_of(sts)
    if not r.check("container kvshared", c is not None, "no container named kvshared"):
        return

    # --- the StatefulSet ------------------------------------------------------------------------
    r.check("statefulset selector matches pod labels",
            labels_match(spec["selector"].get("matchLabels"), pod_labels) and labels_match(APP_LABELS, pod_labels),
            f"selector {spec['selector']} vs pod labels {pod_labels}")
    r.check("statefulset podManagementPolicy Parallel", spec.get("podManagementPolicy") == "Parallel",
            f"got {spec.get('podManagementPolicy')}")
    r.check("statefulset replicas >= 3", int(spec.get("replicas", 1)) >= 3, f"replicas {spec.get('replicas')}",
            detail=str(spec.get("replicas")))
    headless = find(docs, "Service", spec.get("serviceName"))
    if r.check("statefulset serviceName is a Service", bool(headless), f"no Service {spec.get('serviceName')!r}"):
        h = headless[0]["spec"]
        r.check("serviceName Service is headless", h.get("clusterIP") == "None", f"clusterIP {h.get('clusterIP')}")
        r.check("headless Service publishes not-ready pods", h.get("publishNotReadyAddresses") is True,
                "publishNotReadyAddresses must be true so starting nodes find their peers")

    ports = {p.get("name"): p for p in c.get("ports") or []}
    r.check("container port grpc 50051", ports.get("grpc", {}).get("containerPort") == 50051, f"ports {list(ports)}")
    r.check("container port http 9090", ports.get("http", {}).get("containerPort") == 9090, f"ports {list(ports)}")
    bulk_flag = [a.split("=", 1)[1] for a in c.get("args") or [] if str(a).startswith("--bulk-addr=")]
    r.check("bulk transport on a fixed port = container port bulk",
            len(bulk_flag) == 1 and bulk_flag[0].rsplit(":", 1)[-1] == str(ports.get("bulk", {}).get("containerPort")),
            f"--bulk-addr {bulk_flag}, ports {list(ports)}")

    def probe_ok(probe: dict | None, path: str) -> str | None:
        if not probe:
            return "missing"
        hg = probe.get("httpGet") or {}
        if hg.get("path") != path:
            return f"path {hg.get('path')!r}, want {path!r}"
        port = hg.get("port")
        if port not in ("http", 9090):
            return f"port {port!r}, want the http port (9090)"
        return None

    r.run("liveness probe GET /healthz on http", lambda: probe_ok(c.get("livenessProbe"), "/healthz"))
    r.run("readiness probe GET /readyz on http", lambda: probe_ok(c.get("readinessProbe"), "/readyz"))

    # Security.
    psc = pod.get("securityContext") or {}
    csc = c.get("securityContext") or {}
    r.check("runs as non-root uid 65532", (csc.get("runAsNonRoot") or psc.get("runAsNonRoot")) is True
            and (csc.get("runAsUser") or psc.get("runAsUser")) == 65532, f"pod {psc}, container {csc}")
    r.check("readOnlyRootFilesystem", csc.get("readOnlyRootFilesystem") is True, f"container securityContext {csc}")
    r.check("capabilities drop ALL", "ALL" in ((csc.get("capabilities") or {}).get("drop") or []), f"{csc.get('capabilities')}")
    r.check("no privilege escalation", csc.get("allowPrivilegeEscalation") is False, f"{csc.get('allowPrivilegeEscalation')}")
    seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
    r.check("seccomp RuntimeDefault", seccomp == "RuntimeDefault", f"seccompProfile {seccomp}")
    keys = {t.get("topologyKey") for t in pod.get("topologySpreadConstraints") or []}
    r.check("spread over zones and hosts", {"topology.kubernetes.io/zone", "kubernetes.io/hostname"} <= keys,
            f"topologyKeys {sorted(map(str, keys))}")
    for t in pod.get("topologySpreadConstraints") or []:
        r.check(f"spread constraint {t.get('topologyKey')} selects the pods",
                labels_match((t.get("labelSelector") or {}).get("matchLabels"), pod_labels), f"{t.get('labelSelector')}")
    image = str(c.get("image", ""))
    r.check("image pinned to a tag or digest", ("@" in image) or (":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")),
            f"image {image!r}", detail=image)

    # --- flags and environment against kvshared --help ---------------------------------------
    args = [str(a) for a in (c.get("args") or [])]
    if c.get("command"):
        r.fail("no command override", f"command {c['command']} bypasses the image's kvshared entrypoint")
    pairs = flags_in_args(args)
    for f, _ in pairs:
        r.check(f"arg --{f} is a kvshared flag", f in kvshared.flags,
                f"`kvshared --help` has no --{f} (flags: {', '.join(sorted(kvshared.flags))})")
    env, problems = container_env(docs, c)
    for p in problems:
        r.fail("container env", p)
    for name in sorted(env):
        if name.startswith("KVSHARE_"):
            r.check(f"env {name} is a kvshared variable", name in kvshared.envs,
                    f"`kvshared --help` lists no [env: {name}=] (known: {', '.join(sorted(kvshared.envs))})")
    for cm in find(docs, "ConfigMap"):
        for k in (cm.get("data") or {}):
            r.check(f"ConfigMap {cm['metadata']['name']} key {k} is a kvshared variable", k in kvshared.envs,
                    f"`kvshared --help` lists no [env: {k}=]; envFrom would pass it silently")
    for f, _ in pairs:
        e = kvshared.flag_env.get(f)
        if e and e in env:
            r.fail(f"--{f} set once", f"set both as an argument and as {e}: the argument silently wins")
    referenced = set()
    for a in args + [v for v in env.values() if isinstance(v, str)]:
        referenced |= set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a))
    for var in sorted(referenced):
        r.check(f"$({var}) is defined in the container env", var in env,
                f"Kubernetes leaves an undefined $({var}) in place literally")
    flag_vals = dict(pairs)
    node_id = env.get("KVSHARE_NODE_ID") if "node-id" not in flag_vals else flag_vals["node-id"]
    r.check("node id = pod name (downward API)", node_id == {"fieldRef": "metadata.name"}, f"node id source {node_id}")
    adv = flag_vals.get("advertise-addr") or env.get("KVSHARE_ADVERTISE_ADDR")
    pod_ip_vars = [k for k, v in env.items() if v == {"fieldRef": "status.podIP"}]
    tls_on = "tls-cert" in flag_vals or "KVSHARE_TLS_CERT" in env
    if tls_on:
        # With TLS, clients verify the name they dial: advertise the pod's DNS name.
        name_vars = [k for k, v in env.items() if v == {"fieldRef": "metadata.name"}]
        ns_vars = [k for k, v in env.items() if v == {"fieldRef": "metadata.namespace"}]
        want = [f"$({n}).{spec.get('serviceName')}.$({s}).svc.cluster.local:50051" for n in name_vars for s in ns_vars]
        r.check("TLS: advertise address = pod DNS name:50051", isinstance(adv, str) and adv in want,
                f"advertise address {adv!r}; want one of {want} (a name the certificate carries, not the pod IP)")
        check_tls(r, docs, sts, c, env, flag_vals, adv)
    else:
        r.check("advertise address = pod IP:50051", isinstance(adv, str) and any(adv in (f"$({k}):50051", f"[$({k})]:50051") for k in pod_ip_vars),
                f"advertise address {adv!r}; want $(POD_IP):50051 with POD_IP from status.podIP")
    check_secret_files(r, docs, sts, c, env)
    peers_dns = flag_vals.get("peers-dns") or env.get("KVSHARE_PEERS_DNS")
    hname = spec.get("serviceName")
    ok = isinstance(peers_dns, str) and re.fullmatch(rf"{re.escape(str(hname))}(\.[a-z0-9.-]+)?:50051", peers_dns) is not None
    r.check("peers DNS = headless Service:50051", ok, f"peers DNS {peers_dns!r}, headless Service {hname!r}")

    # --- memory = capacity + headroom, grace > drain ---------------------------------------
    res = c.get("resources") or {}
    req_mem = (res.get("requests") or {}).get("memory")
    lim_mem = (res.get("limits") or {}).get("memory")
    if r.check("memory request and limit set", req_mem is not None and lim_mem is not None, f"resources {res}"):
        r.check("memory request = limit", parse_quantity(req_mem) == parse_quantity(lim_mem),
                f"request {req_mem} != limit {lim_mem}")
        cap_s = flag_vals.get("capacity") or env.get("KVSHARE_CAPACITY")
        infl_s = flag_vals.get("buffer-budget") or env.get("KVSHARE_BUFFER_BUDGET") or "512MiB"
        if r.check("capacity configured", isinstance(cap_s, str), "no --capacity / KVSHARE_CAPACITY (default is 1GiB)"):
            infl = parse_kvshare_size(infl_s)
            if cap_s.strip().lower() == "auto":
                # kvshared derives capacity = memory limit - buffer budget - 256MiB.
                cap = auto_capacity(lim_mem, infl_s)
                r.check("capacity auto: memory limit > in-flight + 256MiB", cap > 0,
                        f"limit {lim_mem} leaves {mib(cap)} for the store after in-flight {infl_s} + 256MiB"
                        " (kvshared refuses to start)",
                        detail=f"{lim_mem} - {infl_s} - 256MiB = {mib(cap)} of capacity")
                cap_s = mib(cap)
            else:
                cap = parse_kvshare_size(cap_s)
            want = cap + infl + RUNTIME_HEADROOM
            have = parse_quantity(lim_mem)
            r.check("memory limit = capacity + in-flight + 256MiB",
                    want <= have <= want * 1.25,
                    f"limit {lim_mem} ({mib(have)}) but capacity {cap_s} + in-flight {infl_s} + 256MiB = {mib(want)}"
                    " (want at least that, at most 25% more)",
                    detail=f"{cap_s} + {infl_s} + 256MiB = {mib(want)}, limit {lim_mem}")
    drain = int(flag_vals.get("drain-seconds") or env.get("KVSHARE_DRAIN_SECONDS") or 20)
    pre = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
    grace = pod.get("terminationGracePeriodSeconds", 30)
    r.check("terminationGracePeriodSeconds > preStop + drain", grace > drain + int(pre),
            f"grace {grace}s <= preStop {pre}s + drain {drain}s", detail=f"{grace}s > {pre}s + {drain}s")

    # --- Services, PDB, NetworkPolicy, ServiceMonitor ----------------------------------------
    svcs = find(docs, "Service")
    names = {s["metadata"]["name"] for s in svcs}
    r.check("client Service kvshare (ClusterIP)", "kvshare" in names and find(docs, "Service", "kvshare")[0]["spec"].get("clusterIP") != "None",
            f"services {sorted(names)}")
    for s in svcs:
        sp = s["spec"]
        r.check(f"Service {s['metadata']['name']} selects the pods", labels_match(sp.get("selector"), pod_labels) and bool(sp.get("selector")),
                f"selector {sp.get('selector')} vs pod labels {pod_labels}")
        got = {(p.get("name"), p.get("port")) for p in sp.get("ports") or []}
        r.check(f"Service {s['metadata']['name']} ports grpc 50051 + bulk 50052 + http 9090",
                {("grpc", 50051), ("bulk", 50052), ("http", 9090)} <= got, f"ports {sorted(got)}")
        for p in sp.get("ports") or []:
            tp = p.get("targetPort", p.get("port"))
            r.check(f"Service {s['metadata']['name']} targetPort {tp} exists",
                    tp in ports or tp in [q.get("containerPort") for q in ports.values()], f"container ports {list(ports)}")
    pdbs = find(docs, "PodDisruptionBudget")
    if r.check("one PodDisruptionBudget", len(pdbs) == 1, f"found {len(pdbs)}"):
        ps = pdbs[0]["spec"]
        r.check("PDB maxUnavailable 1", ps.get("maxUnavailable") == 1, f"spec {ps}")
        r.check("PDB selects the pods", labels_match((ps.get("selector") or {}).get("matchLabels"), pod_labels), f"selector {ps.get('selector')}")
    nps = find(docs, "NetworkPolicy")
    if r.check("one NetworkPolicy", len(nps) == 1, f"found {len(nps)}"):
        np_ = nps[0]["spec"]
        r.check("NetworkPolicy selects the pods", labels_match((np_.get("podSelector") or {}).get("matchLabels"), pod_labels),
                f"podSelector {np_.get('podSelector')}")
        grpc_from, http_from = [], []
        for rule in np_.get("ingress") or []:
            rp = {p.get("port") for p in rule.get("ports") or []}
            for p in rp:
                r.check(f"NetworkPolicy port {p} exists on the pod", p in ports or p in (50051, 50052, 9090), f"container ports {list(ports)}")
            if rp & {"grpc", 50051}:
                grpc_from += rule.get("from") or []
                r.check("NetworkPolicy: the bulk port beside gRPC", bool(rp & {"bulk", 50052}),
                        f"ports {sorted(map(str, rp))}: clients would fall back to gRPC")
            if rp & {"http", 9090}:
                http_from += rule.get("from") or []
        r.check("NetworkPolicy: gRPC from kvshare-client=true pods",
                any(((f.get("podSelector") or {}).get("matchLabels") or {}).get("kvshare-client") == "true" for f in grpc_from),
                f"gRPC sources {grpc_from}")
        r.check("NetworkPolicy: gRPC from the kvshare pods themselves",
                any(f.get("namespaceSelector") is None and labels_match((f.get("podSelector") or {}).get("matchLabels"), pod_labels)
                    and (f.get("podSelector") or {}).get("matchLabels") for f in grpc_from),
                f"gRPC sources {grpc_from}")
        r.check("NetworkPolicy: HTTP from the monitoring namespace",
                any(((f.get("namespaceSelector") or {}).get("matchLabels") or {}).get("kubernetes.io/metadata.name") == "monitoring"
                    for f in http_from), f"HTTP sources {http_from}")
    sms = find(docs, "ServiceMonitor")
    for sm in sms:
        sp = sm["spec"]
        sel = (sp.get("selector") or {}).get("matchLabels") or {}
        matched = [s for s in svcs if labels_match(sel, s["metadata"].get("labels") or {})]
        if r.check("ServiceMonitor selects exactly one Service", len(matched) == 1,
                   f"selector {sel} matches {[s['metadata']['name'] for s in matched]} (each extra Service doubles every target)"):
            svc = matched[0]
            sports = {p.get("name") for p in svc["spec"].get("ports") or []}
            for ep in sp.get("endpoints") or []:
                r.check(f"ServiceMonitor endpoint port {ep.get('port')} exists on {svc['metadata']['name']}", ep.get("port") in sports,
                        f"service ports {sorted(map(str, sports))}")
                r.check("ServiceMonitor scrapes /metrics on http", ep.get("port") == "http" and ep.get("path", "/metrics") == "/metrics",
                        f"endpoint {ep}")
            job = (svc["metadata"].get("labels") or {}).get(sp.get("jobLabel", ""), svc["metadata"]["name"])
            r.check('ServiceMonitor job label is "kvshare" (alerts.yml expects job="kvshare")', job == "kvshare", f"job would be {job!r}")


# ---------------------------------------------------------------------------------------------
# Smoke start of the real binary with the rendered configuration


def smoke(r: Report, docs: list[dict], kvshared_bin: str, metrics_out: str | None) -> None:
    sts = find(docs, "StatefulSet")[0]
    c = container_of(sts)
    assert c is not None
    ns = sts["metadata"].get("namespace", "default")
    pod_name = f"{sts['metadata']['name']}-0"
    fields = {"metadata.name": pod_name, "metadata.namespace": ns, "status.podIP": "127.0.0.1"}
    env_spec, _ = container_env(docs, c)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSHARE_")}
    resolved: dict[str, str] = {}

    def expand(s: str) -> str:
        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: resolved.get(m.group(1), m.group(0)), s)

    for k, v in env_spec.items():
        val = fields.get(v["fieldRef"], "") if isinstance(v, dict) and "fieldRef" in v else (v if isinstance(v, str) else "")
        resolved[k] = expand(val)
    env.update(resolved)
    env["RUST_BACKTRACE"] = "0"
    if env.get("KVSHARE_CAPACITY", "").strip().lower() == "auto":
        # This machine's cgroup is not the pod's: start with what the pod's memory limit gives.
        lim = ((c.get("resources") or {}).get("limits") or {}).get("memory")
        cap = auto_capacity(lim, env.get("KVSHARE_BUFFER_BUDGET", "512MiB"))
        print(f"  ...   KVSHARE_CAPACITY=auto: starting with {cap} bytes (memory limit {lim} - budget - 256MiB)")
        env["KVSHARE_CAPACITY"] = str(cap)
    tmp = tempfile.mkdtemp(prefix="kvshare-smoke-")
    port_file = os.path.join(tmp, "ports.json")
    # TLS from mounted Secrets: the same files made locally by scripts/dev-certs.sh (node
    # certificate for 127.0.0.1, CA, client certificate), in place of tls.crt, tls.key, ca.crt.
    tls_files = {"tls.crt": "node.pem", "tls.key": "node.key", "ca.crt": "ca.pem"}
    tls_env = [k for k in ("KVSHARE_TLS_CERT", "KVSHARE_TLS_KEY", "KVSHARE_TLS_CLIENT_CA", "KVSHARE_TLS_CA") if k in env]
    certs = os.path.join(tmp, "certs")
    if tls_env:
        subprocess.run([os.path.join(ROOT, "scripts/dev-certs.sh"), certs], check=True, capture_output=True)
        for k in tls_env:
            env[k] = os.path.join(certs, tls_files.get(os.path.basename(env[k]), os.path.basename(env[k])))
        print(f"  ...   TLS: {', '.join(tls_env)} from scripts/dev-certs.sh in {certs}")
    mtls = "KVSHARE_TLS_CLIENT_CA" in env
    # Tokens from a mounted Secret (components/auth): an auth file with an admin and a peer
    # token made here; requests then carry the admin token.
    admin_token = None
    if "KVSHARE_AUTH_FILE" in env:
        import hashlib
        import secrets

        admin_token, peer_token = secrets.token_hex(16), secrets.token_hex(16)
        auth_dir = os.path.join(tmp, "auth")
        os.makedirs(auth_dir)
        with open(os.path.join(auth_dir, "auth.toml"), "w", encoding="utf-8") as f:
            for role, tok in (("admin", admin_token), ("peer", peer_token)):
                f.write(f'[[tokens]]\nrole = "{role}"\nsha256 = "{hashlib.sha256(tok.encode()).hexdigest()}"\n')
        env["KVSHARE_AUTH_FILE"] = os.path.join(auth_dir, "auth.toml")
        if "KVSHARE_PEER_TOKEN_FILE" in env:
            with open(os.path.join(auth_dir, "peer-token"), "w", encoding="utf-8") as f:
                f.write(peer_token)
            env["KVSHARE_PEER_TOKEN_FILE"] = os.path.join(auth_dir, "peer-token")
        print(f"  ...   auth: KVSHARE_AUTH_FILE (admin and peer tokens) in {auth_dir}")
    args = []
    for f, v in flags_in_args([expand(str(a)) for a in c.get("args") or []]):
        if f in ("grpc-addr", "http-addr"):
            v = "127.0.0.1:0"
        elif f == "peers-dns":
            # An IP literal resolves without DNS; nothing listens on port 1 of loopback.
            v = "127.0.0.1:1"
        args.append(f"--{f}" if v is None else f"--{f}={v}")
    for k in ("KVSHARE_GRPC_ADDR", "KVSHARE_HTTP_ADDR"):
        if k in env:
            env[k] = "127.0.0.1:0"
    if "KVSHARE_PEERS_DNS" in env:
        env["KVSHARE_PEERS_DNS"] = "127.0.0.1:1"
    args.append(f"--port-file={port_file}")
    log_path = os.path.join(tmp, "kvshared.log")
    log = open(log_path, "w")
    proc = subprocess.Popen([kvshared_bin, *args], env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"  ...   started {kvshared_bin} {' '.join(args)} (pid {proc.pid}, log {log_path})")

    def tail() -> str:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-5:])

    try:
        deadline = time.time() + 15
        ports = None
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(port_file) and os.path.getsize(port_file) > 0:
                try:
                    with open(port_file, encoding="utf-8") as f:
                        ports = json.load(f)
                    break
                except json.JSONDecodeError:
                    pass
            time.sleep(0.1)
        if not r.check("kvshared starts with the rendered args and env", ports is not None,
                       f"no port file within 15s (exit code {proc.poll()}); log: {tail()}"):
            return
        http = f"{'https' if tls_env else 'http'}://{ports['http']}"
        import ssl

        def tls_context(client_cert: bool) -> ssl.SSLContext:
            ctx = ssl.create_default_context(cafile=os.path.join(certs, "ca.pem"))
            if client_cert:
                ctx.load_cert_chain(os.path.join(certs, "client.pem"), os.path.join(certs, "client.key"))
            return ctx

        def get(path: str, client_cert: bool = True, token: str | None = None) -> tuple[int, str]:
            ctx = tls_context(client_cert) if tls_env else None
            req = urllib.request.Request(http + path)
            if token or admin_token:
                req.add_header("Authorization", f"Bearer {token or admin_token}")
            try:
                with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        if mtls:
            # kubelet's probes present no client certificate: they must still be answered,
            # and nothing else.
            for path, want in (("/healthz", 200), ("/readyz", 200), ("/metrics", 403), ("/api/stats", 403)):
                code, _ = get(path, client_cert=False)
                r.check(f"mTLS: GET {path} without a client certificate = {want}", code == want, f"status {code}")

        if admin_token:
            code, _ = get("/api/stats", token="not-a-listed-token")
            r.check("auth: GET /api/stats with an unknown token = 401", code == 401, f"status {code}")
        code, _ = get("/healthz")
        r.check("GET /healthz = 200", code == 200, f"status {code}")
        code, _ = get("/readyz")
        r.check("GET /readyz = 200", code == 200, f"status {code}")
        code, body = get("/api/stats")
        if r.check("GET /api/stats = 200", code == 200, f"status {code}"):
            stats = json.loads(body)
            r.check("node id = pod name", stats.get("node_id") == pod_name, f"node_id {stats.get('node_id')!r}, want {pod_name!r}",
                    detail=pod_name)
            cap = env.get("KVSHARE_CAPACITY")
            if cap:
                r.check("capacity_bytes = KVSHARE_CAPACITY", stats.get("capacity_bytes") == parse_kvshare_size(cap),
                        f"capacity_bytes {stats.get('capacity_bytes')} vs {cap}", detail=f"{cap} = {stats.get('capacity_bytes')}")
        code, body = get("/metrics")
        if r.check("GET /metrics = 200", code == 200, f"status {code}"):
            names = metric_names(body)
            r.check("metrics exported", len(names) > 10, f"only {sorted(names)}", detail=f"{len(names)} series names")
            if metrics_out:
                with open(metrics_out, "w", encoding="utf-8") as f:
                    json.dump(sorted(names), f, indent=1)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        drain = int(env.get("KVSHARE_DRAIN_SECONDS", "20"))
        try:
            rc = proc.wait(timeout=drain + 5)
        except subprocess.TimeoutExpired:
            rc = None
        r.check("SIGTERM: exits 0 within the drain time", rc == 0, f"exit code {rc} after {time.time() - t0:.1f}s; log: {tail()}",
                detail=f"{time.time() - t0:.1f}s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def metric_names(exposition: str) -> set[str]:
    """Series names a Prometheus scrape of this exposition can produce (from # TYPE lines, so
    label families that have no series yet count too)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            name, typ = m.groups()
            if typ == "counter":
                names.add(name if name.endswith("_total") else name + "_total")
            elif typ == "histogram":
                names |= {name + "_bucket", name + "_sum", name + "_count"}
            elif typ == "summary":
                names |= {name, name + "_sum", name + "_count"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


# ---------------------------------------------------------------------------------------------
# Monitoring: alert rules, Grafana, docs


METRIC_TOKEN = re.compile(r"(?<![\w:])(kvshare_[a-z0-9_]+)(?![\w:])")


def crate_names() -> set[str]:
    crates = os.path.join(ROOT, "crates")
    out = {"kvshare_tests"}
    if os.path.isdir(crates):
        out |= {d.replace("-", "_") for d in os.listdir(crates)}
    out.add("kvshare_server")
    return out


def grafana_queries(dash: dict) -> list[tuple[str, str]]:
    out = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            for t in p.get("targets") or []:
                if t.get("expr"):
                    out.append((f"panel {p.get('id')} {p.get('title')!r} {t.get('refId')}", t["expr"]))
            walk(p.get("panels") or [])

    walk(dash.get("panels") or [])
    return out


def all_panels(dash: dict) -> list[dict]:
    out = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            out.append(p)
            walk(p.get("panels") or [])

    walk(dash.get("panels") or [])
    return out


def grafana_to_promql(expr: str) -> str:
    for var, val in (("$__rate_interval", "1m"), ("$__interval", "1m"), ("$__range", "1h")):
        expr = expr.replace(var, val)
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)


def source_metric_names(path: str) -> set[str]:
    """Series names of the metrics registered in kvshare-server's metrics.rs (with the kvshare_
    prefix and the suffixes of each type). Label families appear in /metrics only once they have
    a series (a peer, a forwarded request...), so a single idle node cannot show them all."""
    with open(path, encoding="utf-8") as f:
        src = f.read()
    prefix = re.search(r'Registry::with_prefix\("([a-z_]+)"\)', src)
    pre = (prefix.group(1) + "_") if prefix else "kvshare_"
    field_types = dict(re.findall(r"^\s*pub (\w+): (.+),\s*$", src, re.M))
    aliases = dict(re.findall(r"type (\w+) = ([^;]+);", src))
    names: set[str] = set()
    # The `register!` table: `field: "name", "help";` per metric.
    for field, name in re.findall(r'^\s*(\w+):\s*"([a-z0-9_]+)",\s*"(?:[^"\\]|\\.)*";', src, re.M):
        t = field_types.get(field, "")
        t = aliases.get(t, t)
        full = pre + name
        if "Histogram" in t:
            names |= {full + "_bucket", full + "_sum", full + "_count"}
        elif "Counter" in t:
            names.add(full if full.endswith("_total") else full + "_total")
        elif "Gauge" in t:
            names.add(full)
        else:
            raise ValueError(f"metrics.rs: unknown type {t!r} of metric {name}")
    # Scrape-time collectors: `("name", "help", MetricType::Kind)` table entries.
    for name, kind in re.findall(r'\(\s*"([a-z0-9_]+)",\s*"(?:[^"\\]|\\.)*",\s*MetricType::(\w+),?\s*\)', src):
        full = pre + name
        if kind == "Counter":
            names.add(full if full.endswith("_total") else full + "_total")
        elif kind == "Gauge":
            names.add(full)
        else:
            raise ValueError(f"metrics.rs: unsupported collector type {kind} of metric {name}")
    return names


def check_monitoring(r: Report, metrics_file: str, promtool: str | None) -> None:
    with open(metrics_file, encoding="utf-8") as f:
        live = set(json.load(f))
    known = set(live)
    src = os.path.join(ROOT, "crates/kvshare-server/src/metrics.rs")
    if os.path.exists(src):
        declared = source_metric_names(src)
        live_kvshare = {n for n in live if n.startswith("kvshare_")}
        r.check("metrics.rs declares every metric /metrics shows", live_kvshare <= declared,
                f"in /metrics but not found in metrics.rs: {sorted(live_kvshare - declared)} (stale binary or parser)",
                detail=f"{len(declared)} declared, {len(live_kvshare)} shown by an idle node")
        known |= declared
    else:
        r.skip("metric names from metrics.rs", f"{src} not found; using /metrics of an idle node only")
    crates = crate_names()
    families = {n[: -len("_bucket")] for n in known if n.endswith("_bucket")}
    files = [
        "deploy/prometheus/alerts.yml",
        "deploy/prometheus/alerts_test.yml",
        "deploy/prometheus/prometheus.yml",
        "deploy/prometheus/prometheus-static.yml",
        "deploy/grafana/kvshare.json",
        "docs/deploy.md",
    ]
    for rel in files:
        path = os.path.join(ROOT, rel)
        if not os.path.exists(path):
            r.fail(f"metric names in {rel}", "file missing")
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read()
        used = {m for m in METRIC_TOKEN.findall(text) if m not in crates}
        # Prose may name a histogram by its family name; queries are checked strictly below.
        unknown = sorted(used - known - families)
        r.check(f"metric names in {rel} exist in /metrics", not unknown,
                f"not exported by kvshared: {', '.join(unknown)}", detail=f"{len(used)} names")

    # Alert rule names the brief asks for.
    with open(os.path.join(ROOT, "deploy/prometheus/alerts.yml"), encoding="utf-8") as f:
        rules = yaml.safe_load(f)
    alerts = {ru.get("alert") for g in rules["groups"] for ru in g["rules"] if ru.get("alert")}
    for a in ("KvshareNodeDown", "KvshareHitRateCollapse", "KvshareCapacityPressure", "KvshareReplicaLoss"):
        r.check(f"alert {a} defined", a in alerts, f"alerts: {sorted(alerts)}")
    for g in rules["groups"]:
        for ru in g["rules"]:
            if ru.get("alert"):
                r.check(f"alert {ru['alert']} has severity and summary",
                        "severity" in (ru.get("labels") or {}) and "summary" in (ru.get("annotations") or {}), f"rule {ru.get('alert')}")

    # Grafana.
    gpath = os.path.join(ROOT, "deploy/grafana/kvshare.json")
    with open(gpath, encoding="utf-8") as f:
        dash = json.load(f)
    sv = dash.get("schemaVersion", 0)
    r.check("grafana schemaVersion 36..41", 36 <= sv <= 41, f"schemaVersion {sv}", detail=str(sv))
    tvars = {v.get("name"): v for v in (dash.get("templating") or {}).get("list") or []}
    r.check("grafana datasource variable DS_PROMETHEUS",
            tvars.get("DS_PROMETHEUS", {}).get("type") == "datasource" and tvars["DS_PROMETHEUS"].get("query") == "prometheus",
            f"variables {sorted(map(str, tvars))}")
    panels = all_panels(dash)
    ids = [p.get("id") for p in panels]
    r.check("grafana panel ids unique", len(ids) == len(set(ids)) and None not in ids, f"ids {ids}")
    bad_pos = [p.get("title") for p in panels if p.get("gridPos", {}).get("x", 0) + p.get("gridPos", {}).get("w", 0) > 24]
    r.check("grafana panels fit 24 columns", not bad_pos, f"too wide: {bad_pos}")
    bad_ds = []
    for p in panels:
        if p.get("type") == "row":
            continue
        for obj in [p] + list(p.get("targets") or []):
            if (obj.get("datasource") or {}).get("uid") != "${DS_PROMETHEUS}":
                bad_ds.append(p.get("title"))
    r.check("grafana panels use ${DS_PROMETHEUS}", not bad_ds, f"other datasource in {sorted(set(map(str, bad_ds)))}")
    queries = grafana_queries(dash)
    with open(os.path.join(ROOT, "deploy/prometheus/alerts.yml"), encoding="utf-8") as f:
        rule_exprs = [ru["expr"] for g in yaml.safe_load(f)["groups"] for ru in g["rules"]]
    in_queries = {m for q in [q for _, q in queries] + rule_exprs for m in METRIC_TOKEN.findall(q)}
    unknown = sorted(in_queries - known)
    r.check("metric names in Grafana queries and alert expressions are series names", not unknown,
            f"not series of kvshared: {', '.join(unknown)}", detail=f"{len(in_queries)} names")
    per_panel = [" ".join(t.get("expr", "") for t in p.get("targets") or []) for p in panels]
    wanted = {
        "block hit rate": r"kvshare_lookup_hit_blocks_total.*/.*kvshare_lookup_blocks_total",
        "token hit rate": r"kvshare_lookup_hit_tokens_total.*/.*kvshare_lookup_tokens_total",
        "lookups/s": r"rate\(kvshare_lookups_total",
        "bytes in/out": r"kvshare_received_bytes_total.*kvshare_sent_bytes_total|kvshare_sent_bytes_total.*kvshare_received_bytes_total",
        "stored vs capacity": r"kvshare_stored_bytes.*kvshare_capacity_bytes",
        "evictions/s": r"rate\(kvshare_evictions_total",
        "compression ratio": r"kvshare_stored_raw_bytes.*/.*kvshare_stored_bytes",
        "latency p50": r"histogram_quantile\(0\.50?,[^)]*\(le, method\).*?kvshare_rpc_duration_seconds_bucket",
        "latency p99": r"histogram_quantile\(0\.99,[^)]*\(le, method\).*?kvshare_rpc_duration_seconds_bucket",
        "peer health": r"kvshare_peer_up",
        "forwarded requests": r"kvshare_forwarded_requests_total",
        "failovers": r"kvshare_failovers_total",
    }
    for what, pat in wanted.items():
        r.check(f"grafana shows {what}", any(re.search(pat, q) for q in per_panel), f"no panel's queries match {pat}")
    if promtool:
        with tempfile.TemporaryDirectory() as d:
            rules_file = os.path.join(d, "grafana-queries.yml")
            rules_doc = {"groups": [{"name": "grafana", "rules": [
                {"record": f"grafana:query_{i}", "expr": grafana_to_promql(q)} for i, (_, q) in enumerate(queries)
            ]}]}
            with open(rules_file, "w", encoding="utf-8") as f:
                yaml.safe_dump(rules_doc, f)
            p = subprocess.run([promtool, "check", "rules", rules_file], capture_output=True, text=True)
            r.check("grafana queries parse as PromQL (promtool)", p.returncode == 0, (p.stdout + p.stderr).strip()[-800:],
                    detail=f"{len(queries)} queries")
    else:
        r.skip("grafana queries parse as PromQL (promtool)", "promtool not installed")


# ---------------------------------------------------------------------------------------------
# Dockerfile, .dockerignore, KVSHARE_* in files


def check_files(r: Report, kvshared: Help, kvshare: Help | None) -> None:
    df_path = os.path.join(ROOT, "deploy/docker/Dockerfile")
    with open(df_path, encoding="utf-8") as f:
        df = f.read()
    try:
        import dockerfile  # BuildKit's own parser

        cmds = dockerfile.parse_string(df)
        r.ok("Dockerfile parses (BuildKit parser)", f"{len(cmds)} instructions")
    except ImportError:
        r.skip("Dockerfile parses (BuildKit parser)", "python package dockerfile not installed")
    except Exception as e:  # noqa: BLE001 - dockerfile.GoParseError and friends
        r.fail("Dockerfile parses (BuildKit parser)", str(e))
    # Join continuation lines, drop comments.
    logical = re.sub(r"\\\n", " ", "\n".join(l for l in df.splitlines() if not l.lstrip().startswith("#")))
    insts = [l.strip() for l in logical.splitlines() if l.strip()]
    froms = [l for l in insts if l.upper().startswith("FROM ")]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", logical, re.M))

    def resolve(s: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), s)

    images = [resolve(f.split()[1]) for f in froms]
    r.check("Dockerfile is multi-stage", len(froms) >= 2, f"FROM lines {froms}", detail=" -> ".join(images))
    m = re.match(r"rust:(\d+)(?:\.(\d+))?", images[0] if images else "")
    rv = None
    with open(os.path.join(ROOT, "Cargo.toml"), encoding="utf-8") as f:
        mm = re.search(r'^rust-version\s*=\s*"(\d+)\.(\d+)', f.read(), re.M)
        if mm:
            rv = (int(mm.group(1)), int(mm.group(2)))
    builder_ok = bool(m) and (m.group(2) is None or rv is None or (int(m.group(1)), int(m.group(2))) >= rv)
    r.check("builder image is a Rust image new enough for rust-version", builder_ok,
            f"builder {images[:1]}, workspace rust-version {rv}")
    r.check("runtime image is debian-slim or distroless",
            bool(images) and re.match(r"(debian:\S*slim|gcr\.io/distroless/cc)", images[-1]) is not None, f"runtime {images[-1:]}")
    build = [l for l in insts if "cargo build" in l]
    r.check("cargo build --release --locked -p kvshare-server -p kvshare-cli",
            any(all(t in l for t in ("--release", "--locked", "-p kvshare-server", "-p kvshare-cli")) for l in build), f"{build}")
    pkgs = {}
    for d in os.listdir(os.path.join(ROOT, "crates")):
        p = os.path.join(ROOT, "crates", d, "Cargo.toml")
        if os.path.exists(p):
            with open(p, encoding="utf-8") as f:
                t = f.read()
            name = re.search(r'^name\s*=\s*"([^"]+)"', t, re.M)
            if name:
                pkgs[name.group(1)] = set(re.findall(r'\[\[bin\]\]\s*name\s*=\s*"([^"]+)"', t))
    r.check("kvshare-server builds kvshared, kvshare-cli builds kvshare",
            "kvshared" in pkgs.get("kvshare-server", set()) and "kvshare" in pkgs.get("kvshare-cli", set()), f"packages {pkgs}")
    last = logical[logical.upper().rfind("\nFROM "):]
    r.check("runtime stage copies kvshared and kvshare only",
            sorted(re.findall(r"COPY --from=\S+ \S*/(kvshared?) ", last)) == ["kvshare", "kvshared"], "COPY --from lines of the last stage")
    r.check("runtime user 65532", re.search(r"^USER 65532(:65532)?\s*$", last, re.M) is not None, "no USER 65532 in the runtime stage")
    r.check("EXPOSE 50051 50052 9090", re.search(r"^EXPOSE 50051 50052 9090\s*$", last, re.M) is not None, "no EXPOSE 50051 50052 9090")
    r.check("ENTRYPOINT kvshared", re.search(r'^ENTRYPOINT \["[^"]*/kvshared"\]', last, re.M) is not None, "ENTRYPOINT must exec kvshared")
    di = os.path.join(ROOT, ".dockerignore")
    if r.check(".dockerignore at the build context root", os.path.exists(di), "missing /.dockerignore"):
        with open(di, encoding="utf-8") as f:
            pats = {l.strip().rstrip("/") for l in f if l.strip() and not l.startswith("#")}
        for p in ("target", ".git", "tests/python/gen"):
            r.check(f".dockerignore excludes {p}", p in pats or "/" + p in pats, f"patterns {sorted(pats)}")
        for keep in ("Cargo.toml", "Cargo.lock", "crates", "proto", "tests/support"):
            r.check(f".dockerignore keeps {keep}", keep not in pats, f"{keep} is needed by cargo build")

    # KVSHARE_* names in the image and the docs.
    known = set(kvshared.envs) | (set(kvshare.envs) if kvshare else set())
    # Settings of scripts/validate-deploy.sh itself (e.g. KVSHARE_BIN) may be named in the docs.
    with open(os.path.join(ROOT, "scripts/validate-deploy.sh"), encoding="utf-8") as f:
        script_vars = set(re.findall(r'^(KVSHARE_[A-Z0-9_]+)="\$\{\1:-', f.read(), re.M))
    for rel in ("deploy/docker/Dockerfile", "docs/deploy.md"):
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            used = set(re.findall(r"\bKVSHARE_[A-Z0-9_]+\b", f.read()))
        pool = kvshared.envs if rel.endswith("Dockerfile") else known | script_vars
        unknown = sorted(used - pool)
        r.check(f"KVSHARE_* variables in {rel} exist in --help", not unknown, f"unknown: {', '.join(unknown)}",
                detail=f"{len(used)} names")
    # Flags of kvshared quoted in the docs.
    with open(os.path.join(ROOT, "docs/deploy.md"), encoding="utf-8") as f:
        doc = f.read()
    used_flags = set()
    for line in doc.splitlines():
        for m in re.finditer(r"kvshared\b[^`\n]*", line):
            used_flags |= set(re.findall(r"(?<![\w-])--([a-z][a-z0-9-]*)", m.group(0)))
    unknown = sorted(f for f in used_flags - kvshared.flags if f not in ("help", "version"))
    r.check("kvshared flags quoted in docs/deploy.md exist", not unknown, f"unknown: {', '.join('--' + u for u in unknown)}",
            detail=f"{len(used_flags)} flags")


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description="kvshare deployment checks (see scripts/validate-deploy.sh)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("manifests")
    m.add_argument("rendered")
    m.add_argument("--name", required=True)
    m.add_argument("--kvshared-help", required=True)
    m.add_argument("--k8s-versions", default="1.30,latest")
    m.add_argument("--npm-dir", help="directory whose node_modules holds @kubernetes-models/prometheus-operator and typescript")
    s = sub.add_parser("smoke")
    s.add_argument("rendered")
    s.add_argument("--name", required=True)
    s.add_argument("--kvshared", required=True)
    s.add_argument("--metrics-out")
    mo = sub.add_parser("monitoring")
    mo.add_argument("--metrics", required=True)
    mo.add_argument("--promtool")
    fi = sub.add_parser("files")
    fi.add_argument("--kvshared-help", required=True)
    fi.add_argument("--kvshare-help")
    a = ap.parse_args()

    if a.cmd == "manifests":
        r = Report(f"[{a.name}] ")
        help_ = Help.load(a.kvshared_help)
        assert help_ is not None
        latest = kv_versions()[-1].rsplit(".", 1)[0]
        versions = [latest if v == "latest" else v for v in a.k8s_versions.split(",")]
        check_manifests(r, load_docs(a.rendered), help_, sorted(set(versions)), a.npm_dir)
        return r.finish()
    if a.cmd == "smoke":
        r = Report(f"[{a.name} smoke] ")
        smoke(r, load_docs(a.rendered), a.kvshared, a.metrics_out)
        return r.finish()
    if a.cmd == "monitoring":
        r = Report("[monitoring] ")
        check_monitoring(r, a.metrics, a.promtool)
        return r.finish()
    if a.cmd == "files":
        r = Report("[files] ")
        help_ = Help.load(a.kvshared_help)
        assert help_ is not None
        check_files(r, help_, Help.load(a.kvshare_help))
        return r.finish()
    return 2


if __name__ == "__main__":
    sys.exit(main())
