"""Render the kustomize overlays and validate every object strictly against the Kubernetes API schemas.

The schemas come offline with the pinned ``kubernetes-validate`` (strict: unknown fields are errors). Objects of
cluster add-ons' CRDs (KEDA, the Prometheus Operator) are not in those schemas: they are skipped by kind, listed
in ``CRD_KINDS`` (any other kind without a schema is an error), and tests/test_k8s_manifests.py checks their shape.

    python deploy/k8s/validate.py            # every overlay, every supported Kubernetes version
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

K8S = Path(__file__).resolve().parent
OVERLAYS = ("overlays/dev", "overlays/prod")
# Applied by hand, outside the overlays (deploy/k8s/cluster): validated as files.
CLUSTER_FILES = tuple(sorted((K8S / "cluster").glob("*.yaml")))
# The Kubernetes minor versions the manifests support.
KUBERNETES_VERSIONS = ("1.30.0", "1.31.0", "1.32.0", "1.33.0")
# Custom resources of add-ons the manifests use; skipped here (no schema), checked by the policy tests.
CRD_KINDS = frozenset(
    {
        ("keda.sh/v1alpha1", "ScaledObject"),
        ("keda.sh/v1alpha1", "TriggerAuthentication"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("monitoring.coreos.com/v1", "PodMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
    }
)

Doc = dict[str, Any]


def renderer() -> list[str]:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    raise SystemExit("neither kustomize nor kubectl is installed")


def render(overlay: str) -> list[Doc]:
    proc = subprocess.run([*renderer(), str(K8S / overlay)], capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{overlay}: kustomize failed: {proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def problems(docs: list[Doc], version: str) -> list[str]:
    """Every object that does not validate against ``version``'s strict schema (CRD kinds skipped)."""
    found = []
    for doc in docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if (doc.get("apiVersion"), doc.get("kind")) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            found.append(f"{name}: {'.'.join(str(p) for p in exc.absolute_path)}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            found.append(f"{name}: no schema for {doc.get('apiVersion')} in Kubernetes {version}, and not a CRD kind")
    return found


def main() -> int:
    sources = {overlay: render(overlay) for overlay in OVERLAYS}
    for path in CLUSTER_FILES:
        with path.open(encoding="utf-8") as fh:
            sources[str(path.relative_to(K8S))] = [d for d in yaml.safe_load_all(fh) if d]
    failed = False
    for version in KUBERNETES_VERSIONS:
        for source, docs in sources.items():
            for problem in problems(docs, version):
                failed = True
                print(f"{source} (Kubernetes {version}): {problem}", file=sys.stderr)
    if not failed:
        counted = sum(len(d) for d in sources.values())
        print(f"{counted} objects valid for Kubernetes {', '.join(KUBERNETES_VERSIONS)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
