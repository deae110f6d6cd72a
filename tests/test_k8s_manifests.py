"""Static checks of the Kubernetes manifests under deploy/k8s.

No cluster and no container engine are needed. The rendering tests run
`kustomize build` (or `kubectl kustomize`) when one of them is installed and
are skipped otherwise.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from emili_core.queues import Queue

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"

# gRPC services, each a server and a Celery worker: service -> (gRPC port, server metrics port)
SERVICES: dict[str, tuple[int, int]] = {
    "fer": (50051, 9101),
    "chat": (50052, 9102),
    "labeler": (50053, 9103),
    "trainer": (50054, 9104),
}
# service -> Celery worker metrics port (WorkerSettings defaults in each service)
WORKER_METRICS = {"fer": 9111, "chat": 9112, "labeler": 9113, "trainer": 9114}
# HTTP services, a server and no worker: service -> (HTTP port, metrics port)
HTTP_SERVICES: dict[str, tuple[int, int]] = {"gateway": (8080, 9105)}
SERVERS = sorted(SERVICES.keys() | HTTP_SERVICES.keys())
DEPLOYMENTS = sorted([*SERVERS, *(f"{s}-worker" for s in SERVICES)])
# Deployments of third-party servers (components/vllm), not of an EMILI image.
THIRD_PARTY_DEPLOYMENTS = {"vllm"}
# components/loop: `emili loop run`, one pod of a service's image (the labeler's holds emili-pipeline).
LOOP, LOOP_IMAGE = "loop", "emili-labeler"
# Every EMILI container reads these from the Secret `emili-secrets`.
SECRET_KEYS = {
    "EMILI_AUTH__SECRET": "auth-secret",
    "EMILI_S3__ACCESS_KEY": "s3-access-key",
    "EMILI_S3__SECRET_KEY": "s3-secret-key",
    "EMILI_REDIS_URL": "redis-url",
}
# Every key of `emili-secrets` that some manifest reads (base/secret.example.yaml documents exactly these).
ALL_SECRET_KEYS = {*SECRET_KEYS.values(), "redis-address", "redis-password", "llm-api-key"}
# components/gpu: deployment -> (device setting, GPU resource): FER shares one time-sliced GPU, the trainer a whole one.
GPU_TARGETS = {
    "fer": ("EMILI_FER__DEVICE", "nvidia.com/gpu.shared"),
    "fer-worker": ("EMILI_FER__DEVICE", "nvidia.com/gpu.shared"),
    "trainer-worker": ("EMILI_TRAINER__DEVICE", "nvidia.com/gpu"),
}
# The pods meant to have a GPU (or a slice of one) in production, and which resource.
PROD_GPU_PODS = {**{name: resource for name, (_, resource) in GPU_TARGETS.items()}, "vllm": "nvidia.com/gpu"}
GPU_RESOURCES = ("nvidia.com/gpu", "nvidia.com/gpu.shared")
# The plaintext gRPC health-only port of every gRPC server (probes), and where the Secret `emili-tls` is mounted.
HEALTH_PORT = 50060
TLS_DIR = "/etc/emili/tls"
KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")

Doc = dict[str, Any]


# --------------------------------------------------------------------------- #
# helpers


def _load(path: Path) -> list[Doc]:
    with path.open(encoding="utf-8") as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def _yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml"))


def _kustomization_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.is_file() and p.name in KUSTOMIZATION_NAMES)


def _is_remote(ref: str) -> bool:
    return "://" in ref or ref.startswith(("github.com/", "git@")) or "?ref=" in ref


def _refs(kfile: Path) -> Iterator[tuple[str, str]]:
    """Yield (field, local path) for every path a kustomization refers to."""
    (k,) = _load(kfile)
    for field in (
        "resources",
        "components",
        "bases",
        "crds",
        "patchesStrategicMerge",
        "generators",
        "transformers",
        "validators",
        "configurations",
    ):
        for ref in k.get(field) or []:
            # inline patches/transformers are mappings or multi-line strings
            if isinstance(ref, str) and "\n" not in ref and not _is_remote(ref):
                yield field, ref
    for field in ("patches", "patchesJson6902", "replacements"):
        for item in k.get(field) or []:
            if isinstance(item, dict) and item.get("path"):
                yield field, item["path"]
    for field in ("configMapGenerator", "secretGenerator"):
        for gen in k.get(field) or []:
            for entry in gen.get("files") or []:
                yield field, entry.split("=", 1)[-1]
            for entry in gen.get("envs") or []:
                yield field, entry
            if gen.get("env"):
                yield field, gen["env"]


def _resolved(kfile: Path, ref: str) -> Path:
    return (kfile.parent / ref).resolve()


def _resource_files(kdir: Path, seen: set[Path] | None = None) -> list[Path]:
    """Files that a kustomization (recursively, with components) emits as resources."""
    seen = set() if seen is None else seen
    kfile = next(kdir / n for n in KUSTOMIZATION_NAMES if (kdir / n).is_file())
    out: list[Path] = []
    for field, ref in _refs(kfile):
        if field not in ("resources", "components", "bases"):
            continue
        target = _resolved(kfile, ref)
        if target in seen:
            continue
        seen.add(target)
        out.extend(_resource_files(target, seen) if target.is_dir() else [target])
    return out


def _all_resource_docs() -> list[tuple[Path, Doc]]:
    files: set[Path] = set()
    for kfile in _kustomization_files():
        files.update(_resource_files(kfile.parent))
    return [(f, d) for f in sorted(files) for d in _load(f)]


def _deployments() -> dict[str, Doc]:
    """EMILI's own services' Deployments, from every manifest file (the loop's is tested on its own)."""
    return {
        d["metadata"]["name"]: d
        for _, d in _all_resource_docs()
        if d["kind"] == "Deployment" and d["metadata"]["name"] not in THIRD_PARTY_DEPLOYMENTS | {LOOP}
    }


def _by_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == kind}


def _env(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env") or []}


def _svc_of(deployment_name: str) -> str:
    return deployment_name.removesuffix("-worker")


# --------------------------------------------------------------------------- #
# files and kustomizations


def test_yaml_files_parse() -> None:
    files = _yaml_files()
    assert files, f"no YAML under {K8S}"
    for path in files:
        docs = _load(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: document is not a mapping"
            if path.name not in KUSTOMIZATION_NAMES:
                assert doc.get("apiVersion") and doc.get("kind"), f"{path}: apiVersion/kind missing"


@pytest.mark.parametrize("kfile", _kustomization_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_paths_exist(kfile: Path) -> None:
    (k,) = _load(kfile)
    assert k.get("kind") in ("Kustomization", "Component"), kfile
    for field, ref in _refs(kfile):
        target = _resolved(kfile, ref)
        assert target.exists(), f"{kfile.relative_to(REPO)}: {field} entry {ref!r} does not exist"
        if field in ("resources", "bases") and target.is_dir():
            assert any((target / n).is_file() for n in KUSTOMIZATION_NAMES), target
        if field == "components":
            assert target.is_dir(), f"component {ref!r} must be a directory"
            (comp,) = _load(next(target / n for n in KUSTOMIZATION_NAMES if (target / n).is_file()))
            assert comp["kind"] == "Component", f"{ref!r} is not a kustomize Component"


def test_expected_layout() -> None:
    for rel in ("base", "components/gpu", "components/local-deps", "overlays/dev", "overlays/prod"):
        assert (K8S / rel / "kustomization.yaml").is_file(), rel
    (base,) = _load(K8S / "base" / "kustomization.yaml")
    assert base["namespace"] == "emili"
    part_of = dict(base.get("commonLabels") or {})
    for entry in base.get("labels") or []:
        part_of.update(entry.get("pairs") or {})
    assert part_of.get("app.kubernetes.io/part-of") == "emili"
    base_refs = {ref for _, ref in _refs(K8S / "base" / "kustomization.yaml")}
    assert not any("local-deps" in r or "gpu" in r for r in base_refs), "base must not pull components"
    (dev,) = _load(K8S / "overlays" / "dev" / "kustomization.yaml")
    (prod,) = _load(K8S / "overlays" / "prod" / "kustomization.yaml")
    assert "../../components/local-deps" in dev["components"]
    assert not {"../../components/gpu", "../../components/vllm"} & set(dev["components"]), "dev is CPU-only"
    assert "../../components/local-deps" not in prod["components"]
    for component in ("gpu", "vllm", "ingress", "autoscaling"):
        assert f"../../components/{component}" in prod["components"], component


def test_every_yaml_file_is_used() -> None:
    used: set[Path] = set()
    for kfile in _kustomization_files():
        used.add(kfile.resolve())
        used.update(_resolved(kfile, ref) for _, ref in _refs(kfile))
    # Applied by hand, not by an overlay: the example Secret, and cluster-wide add-on configuration (cluster/).
    unlisted = [p for p in _yaml_files() if p.name == "secret.example.yaml" or p.parent == K8S / "cluster"]
    orphans = [p.relative_to(K8S) for p in _yaml_files() if p.resolve() not in used and p not in unlisted]
    assert not orphans, f"YAML files not referenced by any kustomization: {orphans}"


def test_secret_only_as_example() -> None:
    example = K8S / "base" / "secret.example.yaml"
    assert example.is_file()
    text = example.read_text(encoding="utf-8")
    assert "kubectl" in text and "NOT" in text, "example must explain how to create the real Secret"
    (secret,) = _load(example)
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "emili-secrets"
    assert set(secret["stringData"]) == ALL_SECRET_KEYS
    for key in ALL_SECRET_KEYS:
        assert f"# {key}:" in text, f"secret.example.yaml must explain {key}"
    for kfile in _kustomization_files():
        for _, ref in _refs(kfile):
            assert _resolved(kfile, ref) != example.resolve(), f"{kfile} references the example Secret"
        (k,) = _load(kfile)
        assert not k.get("secretGenerator"), f"{kfile}: secrets must not be generated from git"
    for path, doc in _all_resource_docs():
        assert doc["kind"] != "Secret", f"{path}: no Secret may be shipped as a resource"


def test_configmap_has_non_secret_settings_only() -> None:
    (cm,) = _load(K8S / "base" / "configmap.yaml")
    assert cm["metadata"]["name"] == "emili-config"
    data = cm["data"]
    for key in (
        "EMILI_ENV",
        "EMILI_S3__ENDPOINT",
        "EMILI_S3__REGION",
        "EMILI_S3__SECURE",
        "EMILI_LOG_FORMAT",
        "EMILI_ARTIFACTS_DIR",
        "EMILI_FER__DEVICE",
        "EMILI_TRAINER__DEVICE",
    ):
        assert key in data, key
    assert all(k.startswith("EMILI_") for k in data)
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    assert not set(data) & set(SECRET_KEYS), "the Redis URL carries a password: Secret key redis-url"
    assert data["EMILI_LOG_FORMAT"] == "json"
    assert data["EMILI_ARTIFACTS_DIR"] == "/opt/emili/artifacts"
    assert data["EMILI_S3__SECURE"] in ("true", "false")
    # Production needs TLS on every gRPC hop (the settings refuse plaintext with EMILI_ENV=production).
    assert data["EMILI_ENV"] != "production" or data["EMILI_TLS__ENABLED"] == "true"
    for name in ("CERT_FILE", "KEY_FILE", "CA_FILE"):
        assert data[f"EMILI_TLS__{name}"].startswith(TLS_DIR + "/"), name
    # Metrics listen on the loopback unless configured; Prometheus scrapes the pod IP.
    assert data["EMILI_METRICS_HOST"] == "0.0.0.0"


# --------------------------------------------------------------------------- #
# workloads


def test_all_deployments_present() -> None:
    # Every service package has its server; gRPC services a worker too, HTTP services none.
    assert sorted(p.parent.name for p in REPO.glob("services/*/pyproject.toml")) == SERVERS
    assert not SERVICES.keys() & HTTP_SERVICES.keys()
    assert sorted(_deployments()) == DEPLOYMENTS


def test_ports_are_unique() -> None:
    ports = [p for s in SERVICES.values() for p in s] + list(WORKER_METRICS.values())
    ports += [p for s in HTTP_SERVICES.values() for p in s]
    assert len(ports) == len(set(ports)), ports


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_hardened(name: str) -> None:
    dep = _deployments()[name]
    svc = _svc_of(name)
    pod = dep["spec"]["template"]["spec"]
    pod_sc = pod.get("securityContext") or {}
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert pod.get("automountServiceAccountToken") is False
    assert pod_sc.get("runAsUser") == 10001
    assert (pod_sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault"
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    assert pod["containers"], name
    for c in pod["containers"]:
        where = f"{name}/{c['name']}"
        sc = c.get("securityContext") or {}
        limits = (c.get("resources") or {}).get("limits") or {}
        requests = (c.get("resources") or {}).get("requests") or {}
        assert {"cpu", "memory"} <= limits.keys(), f"{where}: resources.limits"
        assert {"cpu", "memory"} <= requests.keys(), f"{where}: resources.requests"
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
        assert sc.get("runAsUser", pod_sc.get("runAsUser")) == 10001, f"{where}: runAsUser"
        assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
        assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
        assert "ALL" in ((sc.get("capabilities") or {}).get("drop") or []), f"{where}: drop ALL"
        assert "livenessProbe" in c, f"{where}: livenessProbe"
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
        for path in ("/tmp", "/home/emili/.cache"):
            assert path in mounts, f"{where}: no volume at {path}"
            assert "emptyDir" in volumes[mounts[path]], f"{where}: {path} must be an emptyDir"
        assert c["image"] == f"emili-{svc}", f"{where}: image"
        assert {"configMapRef": {"name": "emili-config"}} in (c.get("envFrom") or [])
        env = _env(c)
        for var, key in SECRET_KEYS.items():
            ref = ((env.get(var) or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            assert ref == {"name": "emili-secrets", "key": key}, f"{where}: {var}"


def _assert_tls_mounted(tmpl: Doc, c: Doc, svc: str) -> None:
    volumes = {v["name"]: v for v in tmpl["spec"].get("volumes") or []}
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
    assert TLS_DIR in mounts, f"{svc}: the TLS Secret must be mounted at {TLS_DIR}"
    assert volumes[mounts[TLS_DIR]].get("secret", {}).get("secretName") == "emili-tls", f"{svc}: TLS volume"


@pytest.mark.parametrize("svc", sorted(SERVICES))
def test_server_deployment(svc: str) -> None:
    grpc_port, metrics_port = SERVICES[svc]
    dep = _deployments()[svc]
    tmpl = dep["spec"]["template"]
    assert tmpl["metadata"]["labels"]["app.kubernetes.io/component"] == "server"
    ann = tmpl["metadata"].get("annotations") or {}
    assert ann.get("prometheus.io/scrape") == "true"
    assert ann.get("prometheus.io/port") == str(metrics_port)
    assert ann.get("prometheus.io/path") == "/metrics"
    (c,) = tmpl["spec"]["containers"]
    assert "command" not in c, "servers use the image ENTRYPOINT (emili-<svc>-server)"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": metrics_port, "health": HEALTH_PORT}
    env = _env(c)
    prefix = f"EMILI_{svc.upper()}__SERVER__"
    # The settings default host is 127.0.0.1; a partial nested override fails validation.
    assert env[prefix + "HOST"]["value"] == "0.0.0.0"
    assert env[prefix + "GRPC_PORT"]["value"] == str(grpc_port)
    assert env[prefix + "METRICS_PORT"]["value"] == str(metrics_port)
    # The gRPC port speaks TLS, which the kubelet's gRPC probe cannot: probes ask the plaintext health-only port.
    assert env[prefix + "HEALTH_PORT"]["value"] == str(HEALTH_PORT)
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe].get("grpc", {}).get("port") == HEALTH_PORT, f"{svc}: {probe} must be grpc on the health port"
    _assert_tls_mounted(tmpl, c, svc)
    startup = c["startupProbe"]
    budget = startup.get("failureThreshold", 3) * startup.get("periodSeconds", 10)
    assert budget >= 120, f"{svc}: startupProbe allows only {budget}s for model loading"
    if svc == "fer":
        assert tmpl["spec"]["terminationGracePeriodSeconds"] == 30


@pytest.mark.parametrize("svc", sorted(HTTP_SERVICES))
def test_http_server_deployment(svc: str) -> None:
    http_port, metrics_port = HTTP_SERVICES[svc]
    dep = _deployments()[svc]
    tmpl = dep["spec"]["template"]
    assert tmpl["metadata"]["labels"]["app.kubernetes.io/component"] == "server"
    ann = tmpl["metadata"].get("annotations") or {}
    assert ann.get("prometheus.io/scrape") == "true"
    assert ann.get("prometheus.io/port") == str(metrics_port)
    assert ann.get("prometheus.io/path") == "/metrics"
    (c,) = tmpl["spec"]["containers"]
    assert "command" not in c, "servers use the image ENTRYPOINT (emili-<svc>-server)"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": http_port, "metrics": metrics_port}
    env = _env(c)
    prefix = f"EMILI_{svc.upper()}__SERVER__"
    assert env[prefix + "HOST"]["value"] == "0.0.0.0"
    assert env[prefix + "HTTP_PORT"]["value"] == str(http_port)
    assert env[prefix + "METRICS_PORT"]["value"] == str(metrics_port)
    paths = {"startupProbe": "/healthz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in paths.items():
        get = c[probe].get("httpGet") or {}
        assert get.get("path") == path, f"{svc}: {probe} must GET {path}"
        assert get.get("port") in ("http", http_port), f"{svc}: {probe} must use the http port"
    assert c["startupProbe"].get("failureThreshold", 3) * c["startupProbe"].get("periodSeconds", 10) >= 60
    _assert_tls_mounted(tmpl, c, svc)  # The gateway calls chat and FER over TLS: it needs the CA.
    assert tmpl["spec"].get("terminationGracePeriodSeconds", 30) >= 15


def test_gateway_reaches_chat_and_fer_through_their_services() -> None:
    from emili_gateway.settings import GatewaySettings

    (c,) = _deployments()["gateway"]["spec"]["template"]["spec"]["containers"]
    env = _env(c)
    assert env["EMILI_GATEWAY__CHAT_TARGET"]["value"] == f"chat:{SERVICES['chat'][0]}"
    assert env["EMILI_GATEWAY__FER_TARGET"]["value"] == f"fer:{SERVICES['fer'][0]}"
    server = GatewaySettings().gateway.server  # The manifests repeat the settings' default ports.
    assert (server.http_port, server.metrics_port) == HTTP_SERVICES["gateway"]


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_overlays_tag_every_image(overlay: str) -> None:
    (k,) = _load(K8S / "overlays" / overlay / "kustomization.yaml")
    tagged = [i["name"] for i in k.get("images") or [] if i.get("newTag")]
    assert {f"emili-{s}" for s in SERVERS} <= set(tagged), f"overlays/{overlay}: images"
    assert len(tagged) == len(set(tagged))


@pytest.mark.parametrize("svc", sorted(SERVICES))
def test_worker_deployment(svc: str) -> None:
    dep = _deployments()[f"{svc}-worker"]
    tmpl = dep["spec"]["template"]
    assert tmpl["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
    (c,) = tmpl["spec"]["containers"]
    assert c["command"] == [f"emili-{svc}-worker"]
    assert c["livenessProbe"]["exec"]["command"] == [f"emili-{svc}-worker", "--live"]  # Waiting is not dead.
    assert c["readinessProbe"]["exec"]["command"] == [f"emili-{svc}-worker", "--check"]
    assert {p["name"]: p["containerPort"] for p in c.get("ports") or []} == {"metrics": WORKER_METRICS[svc]}
    ann = tmpl["metadata"].get("annotations") or {}
    assert ann.get("prometheus.io/scrape") == "true"
    assert ann.get("prometheus.io/port") == str(WORKER_METRICS[svc])
    assert ann.get("prometheus.io/path") == "/metrics"
    if svc == "trainer":
        assert dep["spec"]["replicas"] == 1
        assert dep["spec"]["strategy"] == {"type": "Recreate"}
        assert tmpl["spec"]["terminationGracePeriodSeconds"] >= 120


def test_memory_sizing() -> None:
    def gib(q: str) -> float:
        units = {"Mi": 1 / 1024, "Gi": 1.0}
        return float(q[:-2]) * units[q[-2:]]

    deps = _deployments()

    def mem(name: str, kind: str) -> float:
        (c,) = deps[name]["spec"]["template"]["spec"]["containers"]
        return gib(c["resources"][kind]["memory"])

    assert mem("chat", "requests") >= 2
    assert mem("trainer-worker", "requests") >= 8
    assert mem("fer", "requests") >= 1
    for name in deps:
        assert mem(name, "limits") >= mem(name, "requests"), name


@pytest.mark.parametrize("svc", SERVERS)
def test_service_and_pdb(svc: str) -> None:
    protocol, (port, metrics_port) = ("grpc", SERVICES[svc]) if svc in SERVICES else ("http", HTTP_SERVICES[svc])
    docs = [d for _, d in _all_resource_docs()]
    service = _by_kind(docs, "Service")[svc]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {protocol: (port, protocol), "metrics": (metrics_port, "metrics")}
    pod_labels = _deployments()[svc]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    pdb = _by_kind(docs, "PodDisruptionBudget")[svc]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    if svc in SERVICES:
        worker_labels = _deployments()[f"{svc}-worker"]["spec"]["template"]["metadata"]["labels"]
        assert not service["spec"]["selector"].items() <= worker_labels.items(), "Service must not select workers"
        assert not pdb["spec"]["selector"]["matchLabels"].items() <= worker_labels.items()


def test_local_deps_component() -> None:
    docs = [
        d
        for f in (K8S / "components" / "local-deps").glob("*.yaml")
        if f.name not in KUSTOMIZATION_NAMES
        for d in _load(f)
    ]
    sts = _by_kind(docs, "StatefulSet")
    services = _by_kind(docs, "Service")
    assert set(sts) == {"redis", "minio"} and {"redis", "minio"} <= set(services)
    redis_cmd = " ".join(
        sts["redis"]["spec"]["template"]["spec"]["containers"][0].get("command", [])
        + sts["redis"]["spec"]["template"]["spec"]["containers"][0].get("args", [])
    )
    assert re.search(r"--appendonly\s+yes", redis_cmd), redis_cmd
    assert {p["port"] for p in services["redis"]["spec"]["ports"]} == {6379}
    assert 9000 in {p["port"] for p in services["minio"]["spec"]["ports"]}
    for s in sts.values():
        for c in s["spec"]["template"]["spec"]["containers"]:
            assert "limits" in c["resources"] and c["securityContext"]["allowPrivilegeEscalation"] is False


def test_gpu_component_patches() -> None:
    comp = K8S / "components" / "gpu"
    patches = {}
    for field, ref in _refs(comp / "kustomization.yaml"):
        for d in _load(comp / ref):
            if field == "patches":
                patches[d["metadata"]["name"]] = d
    assert set(patches) == set(GPU_TARGETS)
    deps = _deployments()
    for name, (var, resource) in GPU_TARGETS.items():
        pod = patches[name]["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        (c,) = pod["containers"]
        (base_c,) = deps[name]["spec"]["template"]["spec"]["containers"]
        assert c["name"] == base_c["name"], f"{name}: patch must target container {base_c['name']!r}"
        assert {k: str(v) for k, v in c["resources"]["limits"].items() if k in GPU_RESOURCES} == {resource: "1"}
        assert _env(c)[var]["value"] == "cuda"
        assert c["image"] == f"emili-{_svc_of(name)}-gpu"


# --------------------------------------------------------------------------- #
# Dockerfiles agree with the manifests


def test_one_dockerfile_builds_every_service() -> None:
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    allowed = re.search(r'case "\$\{SERVICE:-\}" in ([a-z|]+)\)', text)
    assert allowed and set(allowed.group(1).split("|")) == set(SERVERS)
    assert not list(REPO.glob("services/*/Dockerfile")), "one Dockerfile (ARG SERVICE) serves every service"
    assert re.search(r'^ENTRYPOINT \["emili-server"\]\s*$', text, re.M)
    assert 'ln -s "/opt/venv/bin/emili-${SERVICE}-server" /opt/venv/bin/emili-server' in text
    assert re.search(r"^USER 10001(:10001)?\s*$", text, re.M)
    assert 'scripts/fetch_artifacts.py --service "$SERVICE" --dest /opt/emili/artifacts' in text
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage build expected"


# --------------------------------------------------------------------------- #
# rendering (needs kustomize or kubectl; no cluster)


def _renderer() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def _render(rel: str) -> list[Doc]:
    cmd = _renderer()
    if cmd is None:
        pytest.skip("neither kustomize nor kubectl is installed")
    return copy.deepcopy(_rendered(tuple(cmd), rel))


@functools.cache
def _rendered(cmd: tuple[str, ...], rel: str) -> list[Doc]:
    proc = subprocess.run([*cmd, str(K8S / rel)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _container(docs: list[Doc], deployment: str) -> Doc:
    (c,) = _by_kind(docs, "Deployment")[deployment]["spec"]["template"]["spec"]["containers"]
    assert isinstance(c, dict)
    return c


@pytest.mark.parametrize("rel", ["base", "overlays/dev", "overlays/prod"])
def test_render(rel: str) -> None:
    docs = _render(rel)
    for d in docs:
        labels = d["metadata"].get("labels") or {}
        assert labels.get("app.kubernetes.io/part-of") == "emili", f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "Namespace":
            assert d["metadata"]["name"] == "emili"
        else:
            assert d["metadata"].get("namespace") == "emili", f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet"):
            tmpl_labels = d["spec"]["template"]["metadata"]["labels"]
            assert tmpl_labels.get("app.kubernetes.io/part-of") == "emili"
    assert not _by_kind(docs, "Secret")
    assert sorted(set(_by_kind(docs, "Deployment")) - THIRD_PARTY_DEPLOYMENTS - {LOOP}) == DEPLOYMENTS
    assert (LOOP in _by_kind(docs, "Deployment")) == (rel != "base"), "the overlays run the loop"


def test_render_dev() -> None:
    docs = _render("overlays/dev")
    assert set(_by_kind(docs, "StatefulSet")) == {"redis", "minio"}
    assert _by_kind(docs, "ConfigMap")["emili-config"]["data"]["EMILI_ENV"] == "development"
    assert not THIRD_PARTY_DEPLOYMENTS & set(_by_kind(docs, "Deployment")), "dev runs the LLM in-process, on CPU"
    for name in _by_kind(docs, "Deployment"):
        c = _container(docs, name)
        assert not GPU_RESOURCES & c["resources"]["limits"].keys()
        assert not c["image"].endswith("-gpu")


def test_render_prod() -> None:
    docs = _render("overlays/prod")
    assert not _by_kind(docs, "StatefulSet"), "prod uses managed Redis/S3"
    assert _by_kind(docs, "ConfigMap")["emili-config"]["data"]["EMILI_ENV"] == "production"
    deps = _by_kind(docs, "Deployment")
    assert deps["fer"]["spec"]["replicas"] == 2
    assert deps["chat"]["spec"]["replicas"] == 2
    assert deps["trainer-worker"]["spec"]["replicas"] == 1
    for name in set(deps) - THIRD_PARTY_DEPLOYMENTS:
        c = _container(docs, name)
        repo, _, tag = c["image"].rpartition(":")
        assert repo, f"{name}: image {c['image']!r} has no tag"
        assert repo.endswith(LOOP_IMAGE if name == LOOP else f"emili-{_svc_of(name)}"), f"{name}: {c['image']}"
        if name in GPU_TARGETS:
            var, resource = GPU_TARGETS[name]
            assert tag.endswith("-gpu"), f"{name}: {c['image']}"
            assert str(c["resources"]["limits"][resource]) == "1"
            assert _env(c)[var]["value"] == "cuda"
            assert deps[name]["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        else:
            assert not tag.endswith("-gpu"), f"{name}: {c['image']}"
            assert not GPU_RESOURCES & c["resources"]["limits"].keys()
        # the GPU patch must not have dropped the base hardening
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert "memory" in c["resources"]["limits"]


# --------------------------------------------------------------------------- #
# schemas: every rendered object against the Kubernetes API (deploy/k8s/validate.py, also run by `make lint`)


def _validator() -> Any:
    spec = importlib.util.spec_from_file_location("emili_k8s_validate", K8S / "validate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


VALIDATOR = _validator()
OVERLAYS = ["overlays/dev", "overlays/prod"]


@pytest.mark.parametrize("version", VALIDATOR.KUBERNETES_VERSIONS)
@pytest.mark.parametrize("rel", OVERLAYS)
def test_overlay_validates_strictly_against_kubernetes_schemas(rel: str, version: str) -> None:
    assert VALIDATOR.problems(_render(rel), version) == []


def test_cluster_files_validate_and_the_validator_catches_mistakes() -> None:
    for path in VALIDATOR.CLUSTER_FILES:
        assert VALIDATOR.problems(_load(path), VALIDATOR.KUBERNETES_VERSIONS[-1]) == [], path
    version = VALIDATOR.KUBERNETES_VERSIONS[0]
    typo = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"port": [80]}}
    assert VALIDATOR.problems([typo], version), "strict: unknown fields are errors"
    unknown = {"apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": {"name": "x"}}
    assert VALIDATOR.problems([unknown], version), "a kind without a schema must be listed as a CRD kind"


@pytest.mark.parametrize("rel", OVERLAYS)
def test_custom_resources_are_only_the_listed_crd_kinds(rel: str) -> None:
    docs = _render(rel)
    deployments = _by_kind(docs, "Deployment")
    for d in docs:
        if "." in d["apiVersion"].split("/")[0] and not d["apiVersion"].split("/")[0].endswith(".k8s.io"):
            assert (d["apiVersion"], d["kind"]) in VALIDATOR.CRD_KINDS, f"{d['kind']}/{d['metadata']['name']}"
    auths = _by_kind(docs, "TriggerAuthentication")
    for name, scaled in _by_kind(docs, "ScaledObject").items():
        target = scaled["spec"]["scaleTargetRef"]["name"]
        assert name == target and target in deployments and target.endswith("-worker"), name
        assert target != "trainer-worker", "a queue-length scaler would stop a running training run"
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["listName"] == Queue(_svc_of(target)).value  # Celery's list is the queue name.
        assert int(trigger["metadata"]["listLength"]) >= 1
        assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
        auth = auths[trigger["authenticationRef"]["name"]]
        refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
        assert refs == {"address": ("emili-secrets", "redis-address"), "password": ("emili-secrets", "redis-password")}
    hpas = _by_kind(docs, "HorizontalPodAutoscaler")
    for name, hpa in hpas.items():
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", name) and name in SERVERS, name
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], name
    if rel.endswith("prod"):
        assert set(hpas) == set(SERVERS), "every server scales on load"
        assert set(_by_kind(docs, "ScaledObject")) == {f"{s}-worker" for s in SERVICES} - {"trainer-worker"}


# --------------------------------------------------------------------------- #
# policies over the rendered objects


def _pods(docs: list[Doc]) -> dict[str, Doc]:
    """Pod templates of every workload, by ``Kind/name``."""
    return {
        f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]["spec"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")
    }


@pytest.mark.parametrize("rel", OVERLAYS)
def test_every_pod_is_hardened_and_sized(rel: str) -> None:
    pods = _pods(_render(rel))
    assert pods
    for name, pod in pods.items():
        pod_sc = pod.get("securityContext") or {}
        assert pod.get("automountServiceAccountToken") is False, name
        assert (pod_sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", name
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            where = f"{name}/{c['name']}"
            sc = c.get("securityContext") or {}
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) != 0, f"{where}: runs as root"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            assert (sc.get("capabilities") or {}).get("drop") == ["ALL"], f"{where}: capabilities"
            resources = c.get("resources") or {}
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= (resources.get(kind) or {}).keys(), f"{where}: resources.{kind}"


def _secret_refs(docs: list[Doc]) -> set[tuple[str, str]]:
    """(Secret, key) of every secretKeyRef, and of KEDA's secretTargetRefs."""
    refs: set[tuple[str, str]] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            ref = node.get("secretKeyRef")
            if isinstance(ref, dict):
                refs.add((ref["name"], ref["key"]))
            for item in node.get("secretTargetRef") or []:
                refs.add((item["name"], item["key"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(docs)
    return refs


@pytest.mark.parametrize("rel", OVERLAYS)
def test_every_secret_key_referenced_is_documented(rel: str) -> None:
    (example,) = _load(K8S / "base" / "secret.example.yaml")
    refs = _secret_refs(_render(rel))
    assert {name for name, _ in refs} == {"emili-secrets"}, "one Secret, created out of band"
    assert {key for _, key in refs} <= set(example["stringData"])
    if rel.endswith("prod"):
        assert {key for _, key in refs} == ALL_SECRET_KEYS, "every documented key is used in production"


SECRET_NAME = re.compile(r"(?i)(password|secret|token|api_?key|access_?key|private_?key|credential)")
CREDENTIAL_IN_URL = re.compile(r"://[^/\s:@]+:[^/\s@]+@|://:[^/\s@]+@")


@pytest.mark.parametrize("rel", OVERLAYS)
def test_nothing_secret_in_config_maps(rel: str) -> None:
    docs = _render(rel)
    for name, cm in _by_kind(docs, "ConfigMap").items():
        for key, value in (cm.get("data") or {}).items():
            assert not SECRET_NAME.search(key), f"ConfigMap/{name}: {key} looks like a credential"
            assert not CREDENTIAL_IN_URL.search(value), f"ConfigMap/{name}: {key} has a URL with a password"
    for name, pod in _pods(docs).items():
        for c in pod["containers"]:
            for var in c.get("env") or []:
                if SECRET_NAME.search(var["name"]):
                    assert "valueFrom" in var, f"{name}: {var['name']} must come from a Secret"


@pytest.mark.parametrize("rel", OVERLAYS)
def test_gpu_requests_only_where_meant(rel: str) -> None:
    docs = _render(rel)
    found = {}
    for name, pod in _pods(docs).items():
        for c in pod["containers"]:
            limits = (c.get("resources") or {}).get("limits") or {}
            requests = (c.get("resources") or {}).get("requests") or {}
            gpu = {k for k in (*limits, *requests) if k.startswith("nvidia.com/")}
            if gpu:
                (resource,) = gpu
                found[name.split("/", 1)[1]] = resource
                assert str(limits[resource]) == "1", f"{name}: one GPU (or slice) per pod"
    assert found == (PROD_GPU_PODS if rel.endswith("prod") else {})


# --------------------------------------------------------------------------- #
# vLLM: the chat model on a GPU, adapters by name through a shared volume


def _mounts(pod: Doc, container: Doc) -> dict[str, str]:
    """mountPath -> PVC claim name, for the container's PVC mounts."""
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
    }
    return {m["mountPath"]: claims[m["name"]] for m in container.get("volumeMounts") or [] if m["name"] in claims}


def test_prod_chat_uses_vllm_by_adapter_name_and_is_cpu_only() -> None:
    from emili_chat.settings import LLMSettings

    docs = _render("overlays/prod")
    deps = _by_kind(docs, "Deployment")
    vllm_pod = deps["vllm"]["spec"]["template"]["spec"]
    (vllm,) = vllm_pod["containers"]
    args = dict(a.removeprefix("--").partition("=")[::2] for a in vllm["args"])
    env = _env(vllm)
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]["value"] == "true"
    assert "enable-lora" in args
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "emili-secrets", "key": "llm-api-key"}
    vllm_mounts = _mounts(vllm_pod, vllm)
    weights = next(path for path, claim in vllm_mounts.items() if claim == "emili-models")
    assert args["model"].startswith(weights + "/"), "base weights come from the volume, not the image"
    assert all(p["name"] != "http" or p["containerPort"] == 8000 for p in vllm["ports"])

    chat_pod = deps["chat"]["spec"]["template"]["spec"]
    chat = _container(docs, "chat")
    chat_env = {k: str(v.get("value")) for k, v in _env(chat).items()}
    assert chat_env["EMILI_CHAT__LLM__BACKEND"] == "openai"
    assert chat_env["EMILI_CHAT__LLM__BASE_URL"] == "http://vllm:8000/v1"
    assert _by_kind(docs, "Service")["vllm"]["spec"]["ports"][0]["port"] == 8000
    assert chat_env["EMILI_CHAT__LLM__MODEL"] == args["served-model-name"]
    assert _env(chat)["EMILI_CHAT__LLM__API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "llm-api-key"
    # The chat server downloads adapters into the shared volume; vLLM sees the same folder as LORA_DIR.
    chat_mounts = _mounts(chat_pod, chat)
    assert chat_mounts[chat_env["EMILI_CHAT__ADAPTER_CACHE"]] == "emili-adapters"
    assert vllm_mounts[chat_env["EMILI_CHAT__LLM__LORA_DIR"]] == "emili-adapters"
    pvcs = _by_kind(docs, "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvcs["emili-adapters"]["spec"]["accessModes"], "chat servers on several nodes write"
    llm_vars = [name for name in chat_env if name.startswith("EMILI_CHAT__LLM__")]
    assert {n.removeprefix("EMILI_CHAT__LLM__").lower() for n in llm_vars} <= LLMSettings.model_fields.keys()
    # CPU-only, and small: the model is not in the process any more.
    assert not GPU_RESOURCES & chat["resources"]["limits"].keys()
    assert "nodeSelector" not in chat_pod
    assert chat["resources"]["limits"]["memory"] in ("512Mi", "1Gi")


def test_prod_trainer_reads_7b_base_weights_from_the_volume() -> None:
    docs = _render("overlays/prod")
    pod = _by_kind(docs, "Deployment")["trainer-worker"]["spec"]["template"]["spec"]
    c = _container(docs, "trainer-worker")
    recipe = yaml.safe_load((REPO / "services/trainer/src/emili_trainer/recipes/empo-7b-sft.yaml").read_text())
    artifacts = _by_kind(docs, "ConfigMap")["emili-config"]["data"]["EMILI_ARTIFACTS_DIR"]
    model_dir = f"{artifacts}/{recipe['model']['path']}"
    mounts = _mounts(pod, c)
    assert any(model_dir.startswith(path + "/") and claim == "emili-models" for path, claim in mounts.items())
    assert float(c["resources"]["limits"]["memory"].removesuffix("Gi")) >= 32, "7B weights pass through host memory"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1


# --------------------------------------------------------------------------- #
# reaching the cluster: Ingress with TLS; NetworkPolicies allow exactly the architecture's paths


def test_prod_ingress_with_tls_for_gateway_and_chat_grpc() -> None:
    docs = _render("overlays/prod")
    ingresses = _by_kind(docs, "Ingress")
    backends = {}
    for name, ing in ingresses.items():
        hosts_with_tls = {h for t in ing["spec"]["tls"] for h in t["hosts"]}
        for rule in ing["spec"]["rules"]:
            assert rule["host"] in hosts_with_tls, f"{name}: {rule['host']} without TLS"
            for path in rule["http"]["paths"]:
                service = path["backend"]["service"]
                backends[service["name"]] = (service["port"]["name"], ing["metadata"].get("annotations") or {})
    assert backends["gateway"][0] == "http"
    assert int(backends["gateway"][1]["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600, "WebSockets"
    assert backends["chat"][0] == "grpc"
    assert backends["chat"][1]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPCS"
    gateway_env = _env(_container(docs, "gateway"))
    assert gateway_env["EMILI_GATEWAY__SERVER__PUBLIC_BASE_URL"]["value"].startswith("https://")


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    if not selector:
        return True
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions") or []:
        value = labels.get(expr["key"])
        if expr["operator"] == "In" and value not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and value in expr["values"]:
            return False
        if expr["operator"] == "Exists" and value is None:
            return False
    return True


def _port_matches(rule_ports: list[Doc] | None, port: int, named: dict[str, int]) -> bool:
    """Whether a rule's ports take ``port``; a named port is looked up in the destination pod's ``named``."""
    names = {n for n, number in named.items() if number == port}
    return not rule_ports or any(p.get("port") == port or p.get("port") in names for p in rule_ports)


def _peer_matches(peers: list[Doc] | None, labels: dict[str, str] | None, namespace: str) -> bool:
    """Whether a rule's peers take a pod with ``labels`` in ``namespace``; ``labels`` None: a pod of another
    namespace whose labels are unknown (the ingress controller, Prometheus), which only a bare namespaceSelector
    takes."""
    if not peers:
        return True
    for peer in peers:
        ns_selector, pod_selector = peer.get("namespaceSelector"), peer.get("podSelector")
        if ns_selector is None:
            ns_ok = namespace == "emili"
        else:
            ns_ok = _selects(ns_selector, {"kubernetes.io/metadata.name": namespace})
        if ns_ok and (pod_selector is None or _selects(pod_selector, labels or {})):
            return True
    return False


class Network:
    """Evaluates the rendered NetworkPolicies for one connection (the workloads in namespace `emili`)."""

    def __init__(self, docs: list[Doc]) -> None:
        self.policies = list(_by_kind(docs, "NetworkPolicy").values())
        self.pods: dict[str, tuple[dict[str, str], dict[str, int]]] = {}
        for kind in ("Deployment", "StatefulSet"):
            for name, d in _by_kind(docs, kind).items():
                tmpl = d["spec"]["template"]
                containers = tmpl["spec"]["containers"]
                named = {p["name"]: p["containerPort"] for c in containers for p in c.get("ports") or []}
                self.pods[name] = (tmpl["metadata"]["labels"], named)

    def _allowed(self, direction: str, pod: str, peer: dict[str, str] | None, ns: str, port: int, dst: str) -> bool:
        labels = self.pods[pod][0]
        selecting = [
            p
            for p in self.policies
            if _selects(p["spec"]["podSelector"], labels) and direction.capitalize() in p["spec"]["policyTypes"]
        ]
        key = "from" if direction == "ingress" else "to"
        return not selecting or any(
            _peer_matches(rule.get(key), peer, ns) and _port_matches(rule.get("ports"), port, self.pods[dst][1])
            for p in selecting
            for rule in p["spec"].get(direction) or []
        )

    def can(self, src: str | None, dst: str, port: int, src_ns: str = "emili") -> bool:
        """Can workload ``src`` (None: a pod of namespace ``src_ns``) reach workload ``dst`` on ``port``?"""
        src_labels = self.pods[src][0] if src else None
        egress_ok = src is None or self._allowed("egress", src, self.pods[dst][0], "emili", port, dst)
        return egress_ok and self._allowed("ingress", dst, src_labels, src_ns, port, dst)


def test_network_policies_deny_by_default_and_allow_the_architecture() -> None:
    docs = _render("overlays/prod")
    deny = _by_kind(docs, "NetworkPolicy")["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert not deny.get("ingress") and not deny.get("egress")
    net = Network(docs)
    allowed = [
        ("gateway", "chat", 50052),
        ("gateway", "fer", 50051),
        ("gateway", "labeler", 50053),
        ("chat", "fer", 50051),
        ("chat", "vllm", 8000),
        ("loop", "gateway", 8080),
        ("loop", "trainer", 50054),
    ]
    for src, dst, port in allowed:
        assert net.can(src, dst, port), f"{src} -> {dst}:{port} must be allowed"
    denied = [
        ("fer", "chat", 50052),
        ("gateway", "vllm", 8000),
        ("chat-worker", "vllm", 8000),
        ("labeler", "vllm", 8000),
        ("trainer-worker", "chat", 50052),
        ("vllm", "chat", 50052),
        ("fer", "gateway", 8080),
        ("loop", "chat", 50052),
        ("loop", "labeler", 50053),
        ("chat", "trainer", 50054),
    ]
    for src, dst, port in denied:
        assert not net.can(src, dst, port), f"{src} -> {dst}:{port} must be denied"
    assert net.can(None, "gateway", 8080, src_ns="ingress-nginx")
    assert net.can(None, "chat", 50052, src_ns="ingress-nginx")
    assert not net.can(None, "fer", 50051, src_ns="ingress-nginx")
    assert not net.can(None, "gateway", 8080, src_ns="default")
    for name in [*DEPLOYMENTS, LOOP]:
        metrics = net.pods[name][1]["metrics"]
        assert net.can(None, name, metrics, src_ns="monitoring"), f"prometheus -> {name}:{metrics}"
        assert not net.can(None, name, metrics, src_ns="default")
    assert net.can(None, "vllm", 8000, src_ns="monitoring")
    assert not net.can("chat", "labeler", 50053), "only the gateway reaches the labeler's API"


def test_dev_network_policies_let_services_reach_redis_and_minio_only() -> None:
    net = Network(_render("overlays/dev"))
    for name in [*DEPLOYMENTS, LOOP]:
        assert net.can(name, "redis", 6379), name
        assert net.can(name, "minio", 9000), name
    assert not net.can(None, "redis", 6379, src_ns="default")
    assert not net.can(None, "minio", 9000, src_ns="default")


def test_prod_trainer_evaluates_on_the_eval_data_volume() -> None:
    docs = _render("overlays/prod")
    worker = _by_kind(docs, "Deployment")["trainer-worker"]["spec"]["template"]["spec"]
    (c,) = worker["containers"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["eval-data"]["mountPath"] == "/data/eval" and mounts["eval-data"]["readOnly"] is True
    assert mounts["models"]["mountPath"] == "/opt/emili/artifacts/models"  # The gpu component's mount is kept.
    env = _env(c)
    assert env["EMILI_TRAINER__EMPATHETIC_DIALOGUES"]["value"].startswith("/data/eval/")
    assert env["EMILI_TRAINER__MMLU_PATH"]["value"].startswith("/data/eval/")
    volumes = {v["name"]: v for v in worker["volumes"]}
    assert volumes["eval-data"]["persistentVolumeClaim"] == {"claimName": "emili-eval-data", "readOnly": True}
    assert _by_kind(docs, "PersistentVolumeClaim")["emili-eval-data"]["spec"]["accessModes"] == ["ReadOnlyMany"]


@pytest.mark.parametrize("rel", OVERLAYS)
def test_the_loop_runs_once_with_its_policy_and_secrets_from_the_secret(rel: str) -> None:
    docs = _render(rel)
    dep = _by_kind(docs, "Deployment")[LOOP]
    # One pod, and the old one gone before a new one starts; the Redis lease covers what Kubernetes cannot.
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    c = _container(docs, LOOP)
    assert c["command"] == ["emili", "loop", "run"] and c["image"].rpartition(":")[0].endswith(LOOP_IMAGE)
    assert c["livenessProbe"]["exec"]["command"] == ["emili", "loop", "live"]
    # Nothing connects to the loop but Prometheus, for its metrics (emili_loop_*).
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [("metrics", 9106)]
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9106" and _env(c)["EMILI_LOOP_METRICS_PORT"]["value"] == "9106"
    env = _env(c)
    for var, key in SECRET_KEYS.items():
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "emili-secrets", "key": key}, var
    assert env["EMILI_LOOP_GATEWAY_URL"]["value"] == f"http://gateway:{HTTP_SERVICES['gateway'][0]}"
    assert env["EMILI_LOOP_TRAINER_TARGET"]["value"] == f"trainer:{SERVICES['trainer'][0]}"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    policy = Path(env["EMILI_LOOP_POLICY"]["value"])
    config = volumes[mounts[str(policy.parent)]]["configMap"]["name"]
    data = _by_kind(docs, "ConfigMap")[config]["data"]
    from emili_pipeline.config import PipelineConfig
    from emili_pipeline.loop import LoopPolicy

    loaded = LoopPolicy.model_validate(yaml.safe_load(data[policy.name])["loop"])  # Both files are valid.
    assert loaded.enabled and PipelineConfig.model_validate(yaml.safe_load(data[str(loaded.pipeline)]))
    assert volumes[mounts[TLS_DIR]]["secret"]["secretName"] == "emili-tls"
