"""Static checks of the Kubernetes manifests under deploy/k8s.

No cluster and no container engine are needed. The rendering tests run
`kustomize build` (or `kubectl kustomize`) when one of them is installed and
are skipped otherwise.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

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
SECRET_KEYS = {
    "EMILI_AUTH__SECRET": "auth-secret",
    "EMILI_S3__ACCESS_KEY": "s3-access-key",
    "EMILI_S3__SECRET_KEY": "s3-secret-key",
}
GPU_TARGETS = {"fer": "EMILI_FER__DEVICE", "fer-worker": "EMILI_FER__DEVICE", "trainer-worker": "EMILI_TRAINER__DEVICE"}
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
    return {d["metadata"]["name"]: d for _, d in _all_resource_docs() if d["kind"] == "Deployment"}


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
    assert dev["components"] == ["../../components/local-deps"]
    assert prod["components"] == ["../../components/gpu"]


def test_every_yaml_file_is_used() -> None:
    used: set[Path] = set()
    for kfile in _kustomization_files():
        used.add(kfile.resolve())
        used.update(_resolved(kfile, ref) for _, ref in _refs(kfile))
    orphans = [p.relative_to(K8S) for p in _yaml_files() if p.resolve() not in used and p.name != "secret.example.yaml"]
    assert not orphans, f"YAML files not referenced by any kustomization: {orphans}"


def test_secret_only_as_example() -> None:
    example = K8S / "base" / "secret.example.yaml"
    assert example.is_file()
    text = example.read_text(encoding="utf-8")
    assert "kubectl" in text and "NOT" in text, "example must explain how to create the real Secret"
    (secret,) = _load(example)
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "emili-secrets"
    assert set(secret["stringData"]) == set(SECRET_KEYS.values())
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
        "EMILI_REDIS_URL",
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
    assert not set(data) & set(SECRET_KEYS)
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
    for _, ref in _refs(comp / "kustomization.yaml"):
        for d in _load(comp / ref):
            patches[d["metadata"]["name"]] = d
    assert set(patches) == set(GPU_TARGETS)
    deps = _deployments()
    for name, var in GPU_TARGETS.items():
        pod = patches[name]["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        (c,) = pod["containers"]
        (base_c,) = deps[name]["spec"]["template"]["spec"]["containers"]
        assert c["name"] == base_c["name"], f"{name}: patch must target container {base_c['name']!r}"
        assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
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
    assert sorted(_by_kind(docs, "Deployment")) == DEPLOYMENTS


def test_render_dev() -> None:
    docs = _render("overlays/dev")
    assert set(_by_kind(docs, "StatefulSet")) == {"redis", "minio"}
    assert _by_kind(docs, "ConfigMap")["emili-config"]["data"]["EMILI_ENV"] == "development"
    for name in _by_kind(docs, "Deployment"):
        c = _container(docs, name)
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
        assert not c["image"].endswith("-gpu")


def test_render_prod() -> None:
    docs = _render("overlays/prod")
    assert not _by_kind(docs, "StatefulSet"), "prod uses managed Redis/S3"
    assert _by_kind(docs, "ConfigMap")["emili-config"]["data"]["EMILI_ENV"] == "production"
    deps = _by_kind(docs, "Deployment")
    assert deps["fer"]["spec"]["replicas"] == 2
    assert deps["chat"]["spec"]["replicas"] == 2
    assert deps["trainer-worker"]["spec"]["replicas"] == 1
    for name in deps:
        c = _container(docs, name)
        repo, _, tag = c["image"].rpartition(":")
        assert repo, f"{name}: image {c['image']!r} has no tag"
        assert repo.endswith(f"emili-{_svc_of(name)}"), f"{name}: {c['image']}"
        if name in GPU_TARGETS:
            assert tag.endswith("-gpu"), f"{name}: {c['image']}"
            assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
            assert _env(c)[GPU_TARGETS[name]]["value"] == "cuda"
            assert deps[name]["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        else:
            assert not tag.endswith("-gpu"), f"{name}: {c['image']}"
            assert "nvidia.com/gpu" not in c["resources"]["limits"]
        # the GPU patch must not have dropped the base hardening
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert "memory" in c["resources"]["limits"]
