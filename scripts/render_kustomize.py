#!/usr/bin/env python3
"""Renders a kustomization directory, like `kustomize build DIR`, for the subset kvshare uses.

scripts/validate-deploy.sh uses it when neither `kustomize` nor `kubectl kustomize` is installed
(and, when one of them is, compares its output with theirs). Supported kustomization fields:

  resources            files and directories (a directory is built as a kustomization itself)
  namespace            set on every namespaced resource
  labels               pairs added to metadata.labels; includeTemplates adds them to pod
                       templates too; includeSelectors is refused (selectors are immutable)
  images               name -> newName / newTag / digest on containers and initContainers
  replicas             name -> count on Deployment / StatefulSet / ReplicaSet
  patches              strategic-merge patches, from `path:` or inline `patch:`, matched to a
                       resource by apiVersion group, kind and name (no `target:`, no JSON 6902)
  patchesStrategicMerge  the older spelling of the same

Anything else (generators, commonLabels, name prefixes, components, ...) is an error rather than
silently ignored. Output: the resources as one YAML stream, in kustomize's default (legacy) order.

Usage: render_kustomize.py DIR [-o OUT]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Any

import yaml

SUPPORTED = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "images",
    "replicas",
    "patches",
    "patchesStrategicMerge",
}

# Kinds that are not namespaced (the namespace transformer leaves them alone).
CLUSTER_SCOPED = {
    "Namespace",
    "Node",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "APIService",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "IngressClass",
    "RuntimeClass",
    "CSIDriver",
    "VolumeAttachment",
}

# kustomize's legacy output order (api/resid/gvk.go): these kinds first, in this order, then all
# other kinds ordered by group, version and kind, then the webhook configurations last.
ORDER_FIRST = [
    "Namespace",
    "ResourceQuota",
    "StorageClass",
    "CustomResourceDefinition",
    "ServiceAccount",
    "PodSecurityPolicy",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "Service",
    "LimitRange",
    "PriorityClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Deployment",
    "StatefulSet",
    "CronJob",
    "PodDisruptionBudget",
]
ORDER_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
SCALABLE = {"Deployment", "StatefulSet", "ReplicaSet", "ReplicationController"}

# Strategic-merge keys of the lists kvshare's patches can touch (by field name). Lists not named
# here are replaced by the patch, as the Kubernetes API's "atomic" lists are.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
    "volumeClaimTemplates": None,  # atomic
}


class RenderError(Exception):
    pass


def load_yaml_docs(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def group_of(api_version: str) -> str:
    return api_version.split("/")[0] if "/" in api_version else ""


def same_target(a: dict, b: dict) -> bool:
    return (
        a.get("kind") == b.get("kind")
        and a.get("metadata", {}).get("name") == b.get("metadata", {}).get("name")
        and group_of(a.get("apiVersion", "")) == group_of(b.get("apiVersion", ""))
    )


def smp(base: Any, patch: Any, field: str | None = None) -> Any:
    """Strategic merge of `patch` into `base` (both already plain YAML data)."""
    if isinstance(patch, dict):
        for directive in ("$patch", "$setElementOrder", "$retainKeys", "$deleteFromPrimitiveList"):
            if any(k.startswith(directive) for k in patch):
                raise RenderError(f"strategic-merge directive {directive} is not supported")
        if not isinstance(base, dict):
            return copy.deepcopy(patch)
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = smp(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(patch, list):
        key = MERGE_KEYS.get(field or "")
        if field == "ports" and patch and isinstance(patch[0], dict):
            key = "containerPort" if "containerPort" in patch[0] else "port"
        if key is None or not isinstance(base, list):
            return copy.deepcopy(patch)
        out = copy.deepcopy(base)
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise RenderError(f"patch list item under {field!r} lacks its merge key {key!r}")
            for i, existing in enumerate(out):
                if isinstance(existing, dict) and existing.get(key) == item[key]:
                    out[i] = smp(existing, item, None)
                    break
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def pod_specs(res: dict) -> list[dict]:
    kind = res.get("kind")
    spec = res.get("spec") or {}
    if kind in WORKLOADS:
        return [((spec.get("template") or {}).get("spec")) or {}]
    if kind == "CronJob":
        return [(((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}]
    if kind == "Pod":
        return [spec]
    return []


def pod_template_metas(res: dict) -> list[dict]:
    kind = res.get("kind")
    spec = res.get("spec") or {}
    if kind in WORKLOADS:
        return [spec.setdefault("template", {}).setdefault("metadata", {})]
    if kind == "CronJob":
        jt = spec.setdefault("jobTemplate", {}).setdefault("spec", {})
        return [jt.setdefault("template", {}).setdefault("metadata", {})]
    return []


def split_image(image: str) -> tuple[str, str, str]:
    """(name, tag, digest) of an image reference."""
    digest = ""
    if "@" in image:
        image, digest = image.split("@", 1)
    tag = ""
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        image, tag = image[:colon], image[colon + 1 :]
    return image, tag, digest


def apply_images(resources: list[dict], images: list[dict]) -> None:
    for res in resources:
        for ps in pod_specs(res):
            for field in ("containers", "initContainers"):
                for c in ps.get(field) or []:
                    name, tag, digest = split_image(c.get("image", ""))
                    for img in images:
                        if img.get("name") != name:
                            continue
                        new_name = img.get("newName", name)
                        if img.get("digest"):
                            c["image"] = f"{new_name}@{img['digest']}"
                        elif "newTag" in img:
                            c["image"] = f"{new_name}:{img['newTag']}"
                        elif digest:
                            c["image"] = f"{new_name}@{digest}"
                        elif tag:
                            c["image"] = f"{new_name}:{tag}"
                        else:
                            c["image"] = new_name
                        break


def build(path: str) -> list[dict]:
    path = os.path.abspath(path)
    kfile = None
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if os.path.isfile(os.path.join(path, name)):
            kfile = os.path.join(path, name)
            break
    if kfile is None:
        raise RenderError(f"{path}: no kustomization.yaml")
    with open(kfile, encoding="utf-8") as f:
        k = yaml.safe_load(f) or {}
    unsupported = sorted(set(k) - SUPPORTED)
    if unsupported:
        raise RenderError(f"{kfile}: fields not supported by render_kustomize.py: {', '.join(unsupported)}")

    resources: list[dict] = []
    for entry in k.get("resources") or []:
        p = os.path.join(path, entry)
        if os.path.isdir(p):
            resources.extend(build(p))
        elif os.path.isfile(p):
            resources.extend(load_yaml_docs(p))
        else:
            raise RenderError(f"{kfile}: resource {entry!r} not found (remote resources are not supported)")

    seen = set()
    for r in resources:
        rid = (r.get("apiVersion"), r.get("kind"), r.get("metadata", {}).get("namespace"), r.get("metadata", {}).get("name"))
        if rid in seen:
            raise RenderError(f"{kfile}: duplicate resource {rid}")
        seen.add(rid)

    # Patches (before the namespace and the other transformers, as kustomize does).
    patch_docs: list[dict] = []
    for entry in k.get("patchesStrategicMerge") or []:
        if isinstance(entry, str) and os.path.isfile(os.path.join(path, entry)):
            patch_docs.extend(load_yaml_docs(os.path.join(path, entry)))
        else:
            patch_docs.extend(d for d in yaml.safe_load_all(entry) if d)
    for entry in k.get("patches") or []:
        if "target" in entry or "options" in entry:
            raise RenderError(f"{kfile}: patches with target/options are not supported")
        if "path" in entry:
            patch_docs.extend(load_yaml_docs(os.path.join(path, entry["path"])))
        elif "patch" in entry:
            patch_docs.extend(d for d in yaml.safe_load_all(entry["patch"]) if d)
        else:
            raise RenderError(f"{kfile}: a patch needs path or patch")
    for pd in patch_docs:
        if isinstance(pd, list):
            raise RenderError(f"{kfile}: JSON 6902 patches are not supported")
        matches = [i for i, r in enumerate(resources) if same_target(r, pd)]
        if len(matches) != 1:
            raise RenderError(
                f"{kfile}: patch for {pd.get('kind')}/{pd.get('metadata', {}).get('name')} matches {len(matches)} resources"
            )
        resources[matches[0]] = smp(resources[matches[0]], pd)

    ns = k.get("namespace")
    if ns:
        for r in resources:
            if r.get("kind") not in CLUSTER_SCOPED:
                r.setdefault("metadata", {})["namespace"] = ns

    for lab in k.get("labels") or []:
        if lab.get("includeSelectors"):
            raise RenderError(f"{kfile}: labels.includeSelectors is not supported")
        pairs = {str(a): str(b) for a, b in (lab.get("pairs") or {}).items()}
        for r in resources:
            r.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
            if lab.get("includeTemplates"):
                for meta in pod_template_metas(r):
                    meta.setdefault("labels", {}).update(pairs)

    for rep in k.get("replicas") or []:
        hit = False
        for r in resources:
            if r.get("kind") in SCALABLE and r.get("metadata", {}).get("name") == rep["name"]:
                r.setdefault("spec", {})["replicas"] = int(rep["count"])
                hit = True
        if not hit:
            raise RenderError(f"{kfile}: replicas: no workload named {rep['name']!r}")

    if k.get("images"):
        apply_images(resources, k["images"])
    return resources


def sort_key(r: dict) -> tuple:
    kind = r.get("kind", "")
    if kind in ORDER_FIRST:
        rank = (0, ORDER_FIRST.index(kind), "")
    elif kind in ORDER_LAST:
        rank = (2, ORDER_LAST.index(kind), "")
    else:
        # Other kinds by their GVK string, group first ("monitoring.coreos.com_v1_ServiceMonitor").
        api = r.get("apiVersion", "")
        group, _, version = api.rpartition("/")
        rank = (1, 0, f"{group}_{version}_{kind}")
    md = r.get("metadata", {})
    return rank + (r.get("apiVersion", ""), md.get("namespace", ""), md.get("name", ""))


def render(path: str) -> str:
    resources = sorted(build(path), key=sort_key)
    return yaml.safe_dump_all(resources, sort_keys=True, default_flow_style=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("-o", "--output")
    args = ap.parse_args()
    try:
        out = render(args.dir)
    except RenderError as e:
        print(f"render_kustomize: {e}", file=sys.stderr)
        return 1
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(out)
    else:
        sys.stdout.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
