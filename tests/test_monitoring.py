"""Monitoring as code: the rules (promtool), the generated dashboards and Kubernetes objects, the local Prometheus
and Flower, and that every metric a dashboard or rule queries is exported by a running process of the stack."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from emili_core import cli
from emili_core import stack as local_stack
from emili_core.objectstore import ObjectStore
from emili_core.settings import REPO_ROOT, CommonSettings, service_settings_classes
from emili_testing.plugin import EntryPointProcess, Stack, free_port

MONITORING = REPO_ROOT / "deploy" / "monitoring"
RULES = MONITORING / "rules" / "emili.rules.yaml"
RULE_TESTS = MONITORING / "rules" / "emili.rules.test.yaml"
COMPONENT = REPO_ROOT / "deploy" / "k8s" / "components" / "monitoring"
OVERLAYS = REPO_ROOT / "deploy" / "k8s" / "overlays"

# Series no EMILI process exports, each for a stated reason; everything else a query names must be scraped.
NOT_EXPORTED_BY_EMILI = {
    "up": "Prometheus's own, one per target",
    "kubelet_volume_stats_available_bytes": "the kubelet's (emili.infrastructure group, Kubernetes only)",
    "kubelet_volume_stats_capacity_bytes": "the kubelet's (emili.infrastructure group, Kubernetes only)",
}


def _load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("emili_monitoring_build", MONITORING / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build = _load_builder()


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: scripts/setup.sh installs it (Debian package `prometheus`)"
    return path


def rules() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return loaded


def all_rules() -> list[dict[str, Any]]:
    return [rule for group in rules()["groups"] for rule in group["rules"]]


def dashboard_exprs() -> dict[str, list[str]]:
    exprs: dict[str, list[str]] = {}
    for path in sorted((MONITORING / "dashboards").glob("*.json")):
        document = json.loads(path.read_text())
        exprs[path.stem] = [t["expr"] for p in document["panels"] for t in p.get("targets", [])]
    return exprs


# --- PromQL: the metric names an expression reads -------------------------------------------------------------

KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
KEYWORDS |= {"inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects (not functions, aggregations, labels, keywords or strings)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # String literals (label values, regexes).
    text = re.sub(r"\{[^}]*\}", " ", text)  # Label matchers.
    text = re.sub(r"\[[^\]]*\]", " ", text)  # Ranges and subqueries.
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)", text):
        followed_by_call = re.match(r"\s*\(", text[match.end() :]) is not None
        if not followed_by_call and match.group(1).lower() not in KEYWORDS:
            names.add(match.group(1))
    return names


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'sum by (le, arm) (rate(emili_chat_time_to_first_token_seconds_bucket{arm=~"a|b"}[5m])) '
        "/ on (arm) group_left emili:x:rate5m > 4 * 3600 or vector(0) unless time() - up offset 5m"
    )
    assert metric_names(expr) == {"emili_chat_time_to_first_token_seconds_bucket", "emili:x:rate5m", "up"}


def queried_names() -> dict[str, set[str]]:
    """Metric name -> where it is queried (dashboard or rule), recording rules' own names left out."""
    recorded = {rule["record"] for rule in all_rules() if "record" in rule}
    where: dict[str, set[str]] = {}
    for dashboard, exprs in dashboard_exprs().items():
        for expr in exprs:
            for name in metric_names(expr):
                where.setdefault(name, set()).add(f"dashboard {dashboard}")
    for rule in all_rules():
        for name in metric_names(rule["expr"]):
            where.setdefault(name, set()).add(f"rule {rule.get('alert') or rule.get('record')}")
    return {name: places for name, places in where.items() if name not in recorded}


def test_dashboards_query_only_recording_rules_that_exist() -> None:
    recorded = {rule["record"] for rule in all_rules() if "record" in rule}
    used = {name for name in queried_names() if ":" in name}
    assert used == set(), f"queries name recording rules that emili.rules.yaml does not define: {used}"
    assert recorded, "the rules file defines no recording rules"


# --- Rules --------------------------------------------------------------------------------------------------


def test_rules_pass_promtool_check() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_unit_tests_pass() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested_and_says_how_bad_it_is() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    }
    alerts = [rule for rule in all_rules() if "alert" in rule]
    untested = {rule["alert"] for rule in alerts} - tested
    assert untested == set(), f"alerts without a promtool unit test in {RULE_TESTS.name}: {sorted(untested)}"
    for rule in alerts:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_the_alerts_the_issues_ask_for_exist() -> None:
    by_name = {rule["alert"]: rule["expr"] for rule in all_rules() if "alert" in rule}
    wanted = {
        "EmiliTargetDown": "up",
        "EmiliSessionNotPersisted": "emili_chat_oldest_unpersisted_session_seconds",
        "EmiliWorkerHeartbeatStale": "emili_worker_heartbeat_timestamp_seconds",
        "EmiliQueueOldestTaskTooOld": "emili_queue_oldest_task_age_seconds",
        "EmiliQueueGrowing": "emili_queue_depth",
        "EmiliTrainingRunFailed": "emili_trainer_runs_total",
        "EmiliTrainingRunStalled": "emili_trainer_run_progress_ratio",
        "EmiliServiceNotServing": "emili_server_serving",
        "EmiliObjectStoreFailing": "emili_objectstore_errors_total",
        "EmiliCanaryRolledBack": "emili_gateway_canary_decisions_total",
    }
    for alert, metric in wanted.items():
        assert alert in by_name and metric in metric_names(by_name[alert]), alert


# --- Generated files: one source of truth ---------------------------------------------------------------------


def test_generated_dashboards_and_kubernetes_objects_are_current() -> None:
    stale = [str(path.relative_to(REPO_ROOT)) for path in build.stale_files()]
    assert stale == [], f"run `python deploy/monitoring/build.py`: stale {stale}"


def test_the_prometheus_rule_holds_exactly_the_rules_file() -> None:
    (rule,) = yaml.safe_load_all((COMPONENT / "prometheus-rule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == rules()["groups"]


def test_an_overview_and_one_dashboard_per_service() -> None:
    exprs = dashboard_exprs()
    assert set(exprs) == {"overview", *local_stack.LOCAL_SERVICES}
    overview = " ".join(exprs["overview"])
    for topic in (
        "emili_chat_active_conversations",
        "emili_chat_turns_total",
        "emili:chat_time_to_first_token_seconds:p99_5m",
        "emili_fer_frames_total",
        "emili:fer_face_found:ratio_rate5m",
        "emili_queue_depth",
        "emili_queue_oldest_task_age_seconds",
        "emili:tasks:rate5m",
        "emili_trainer_run_progress_ratio",
        "emili:grpc_errors:ratio_rate5m",
        "process_cpu_seconds_total",
    ):
        assert topic in overview, topic
    uids = [json.loads(p.read_text())["uid"] for p in (MONITORING / "dashboards").glob("*.json")]
    assert len(uids) == len(set(uids))


def test_every_panel_queries_prometheus_through_the_datasource_variable() -> None:
    for path in (MONITORING / "dashboards").glob("*.json"):
        document = json.loads(path.read_text())
        assert [v["name"] for v in document["templating"]["list"]] == ["datasource"]
        ids = [p["id"] for p in document["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for p in document["panels"]:
            if p["type"] == "row":
                continue
            assert p["targets"] and all(t["expr"] for t in p["targets"]), (path.name, p["title"])
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24


# --- The gateway's serving gauge -------------------------------------------------------------------------------


async def test_the_gateway_exports_what_readyz_answers_and_asks_itself_when_nobody_does() -> None:
    import asyncio

    import httpx
    from prometheus_client import REGISTRY
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from emili_gateway.serving import ReadinessGauge

    ready = {"now": False, "asked": 0}

    async def readyz(request: Any) -> JSONResponse:
        ready["asked"] += 1
        return JSONResponse({}, status_code=200 if ready["now"] else 503)

    def serving() -> float | None:
        return REGISTRY.get_sample_value("emili_server_serving", {"service": "gatewaytest"})

    wrapped = ReadinessGauge(Starlette(routes=[Route("/readyz", readyz)]), service="gatewaytest", interval_s=0.05)
    assert serving() == 0.0
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="http://gw") as client:
        ready["now"] = True
        assert (await client.get("/readyz")).status_code == 200
        assert serving() == 1.0
        ready["now"] = False
        await client.get("/readyz")
        assert serving() == 0.0

    # The lifespan, as uvicorn drives it: after startup the gauge follows readiness with no outside prober;
    # from shutdown on it reads 0.
    to_app: asyncio.Queue[Any] = asyncio.Queue()
    from_app: asyncio.Queue[Any] = asyncio.Queue()
    lifespan = asyncio.create_task(wrapped({"type": "lifespan", "asgi": {"version": "3.0"}}, to_app.get, from_app.put))
    await to_app.put({"type": "lifespan.startup"})
    assert (await asyncio.wait_for(from_app.get(), 5))["type"] == "lifespan.startup.complete"
    ready["now"] = True
    asked = ready["asked"]
    await asyncio.sleep(0.5)  # Ten intervals.
    assert ready["asked"] > asked
    assert serving() == 1.0
    await to_app.put({"type": "lifespan.shutdown"})
    assert (await asyncio.wait_for(from_app.get(), 5))["type"] == "lifespan.shutdown.complete"
    await lifespan
    assert serving() == 0.0


# --- Kubernetes -----------------------------------------------------------------------------------------------


def kustomize(overlay: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels, and matchExpressions with In) against a pod's labels."""
    expressions = selector.get("matchExpressions", [])
    assert all(e["operator"] == "In" for e in expressions)
    return matches(selector.get("matchLabels", {}), labels) and all(
        labels.get(e["key"]) in e["values"] for e in expressions
    )


def test_the_prod_overlay_ships_the_monitoring_component() -> None:
    objects = kustomize(OVERLAYS / "prod")
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {("ServiceMonitor", "emili-servers"), ("PodMonitor", "emili-workers"), ("PrometheusRule", "emili")} <= kinds
    dashboards = [
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("emili-dashboard-")
    ]
    assert {o["metadata"]["name"].removeprefix("emili-dashboard-") for o in dashboards} == {
        "overview",
        *local_stack.LOCAL_SERVICES,
    }
    for configmap in dashboards:
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        (document,) = configmap["data"].values()
        assert json.loads(document)["uid"] == f"emili-{configmap['metadata']['name'].removeprefix('emili-dashboard-')}"
    assert {o["metadata"]["namespace"] for o in objects if o["kind"] in {"ServiceMonitor", "PodMonitor"}} == {"emili"}


def test_the_monitors_select_every_server_and_worker_by_their_metrics_port() -> None:
    objects = kustomize(OVERLAYS / "prod")
    (service_monitor,) = [o for o in objects if o["kind"] == "ServiceMonitor"]
    (pod_monitor,) = [o for o in objects if o["kind"] == "PodMonitor"]
    services = [o for o in objects if o["kind"] == "Service"]
    selected_services = [
        s for s in services if matches(service_monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert {s["metadata"]["name"] for s in selected_services} == set(local_stack.LOCAL_SERVICES)
    for service in selected_services:
        assert "metrics" in {port["name"] for port in service["spec"]["ports"]}, service["metadata"]["name"]

    workers = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-worker")]
    assert {w["metadata"]["name"] for w in workers} == {
        f"{name}-worker" for name, cls in service_settings_classes().items() if cls.has_worker
    }
    # The workers and the loop have no Service: the PodMonitor scrapes them.
    (loop,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "loop"]
    for pod in [*workers, loop]:
        template = pod["spec"]["template"]
        assert selects(pod_monitor["spec"]["selector"], template["metadata"]["labels"]), pod["metadata"]["name"]
        ports = {port.get("name") for c in template["spec"]["containers"] for port in c.get("ports", [])}
        assert "metrics" in ports, pod["metadata"]["name"]
    # Servers are scraped through their Services only: the PodMonitor must not take them a second time.
    servers = [
        o
        for o in objects
        if o["kind"] == "Deployment" and not o["metadata"]["name"].endswith("-worker") and o is not loop
    ]
    assert servers and not any(
        selects(pod_monitor["spec"]["selector"], s["spec"]["template"]["metadata"]["labels"]) for s in servers
    )
    for monitor, endpoints in ((service_monitor, "endpoints"), (pod_monitor, "podMetricsEndpoints")):
        relabeled = {r["targetLabel"] for e in monitor["spec"][endpoints] for r in e["relabelings"]}
        assert {"job", "service", "component"} <= relabeled


# --- The local stack: Prometheus and Flower ---------------------------------------------------------------------


def test_the_local_prometheus_scrapes_every_process_and_loads_the_rules(tmp_path: Path) -> None:
    settings = CommonSettings()
    targets = local_stack.scrape_targets(settings)
    expected = {(name, "server") for name in local_stack.LOCAL_SERVICES}
    expected |= {(name, "worker") for name, cls in service_settings_classes().items() if cls.has_worker}
    assert {(t.service, t.component) for t in targets} == expected
    assert len({t.address for t in targets}) == len(targets)

    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(local_stack.prometheus_config(settings, targets))
    result = subprocess.run([promtool(), "check", "config", str(config_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout
    config = yaml.safe_load(config_file.read_text())
    (emili_job,) = [job for job in config["scrape_configs"] if job["job_name"] == "emili"]
    scraped = {(c["labels"]["service"], c["labels"]["component"]): c["targets"] for c in emili_job["static_configs"]}
    assert scraped == {(t.service, t.component): [t.address] for t in targets}


def test_the_local_ports_are_fixed_and_below_the_ephemeral_range() -> None:
    settings = CommonSettings()
    ports = [settings.monitoring.prometheus_port, settings.monitoring.flower_port]
    ports += [int(t.address.rsplit(":", 1)[1]) for t in local_stack.scrape_targets(settings)]
    assert all(0 < port < 32768 for port in ports)
    assert len(set(ports)) == len(ports)


def test_prometheus_and_flower_run_in_the_stack_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = CommonSettings(redis_url="redis://127.0.0.1:6390/0")
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    programs = {p.name: p for p in local_stack.monitoring_programs(settings)}
    assert set(programs) == {"prometheus", "flower"}
    assert f"--config.file={local_stack.PROMETHEUS_CONFIG}" in programs["prometheus"].command
    assert f"127.0.0.1:{settings.monitoring.prometheus_port}" in programs["prometheus"].command
    assert f"--port={settings.monitoring.flower_port}" in programs["flower"].command
    # The broker is named in the environment, never on a command line anyone can read with ps.
    assert programs["flower"].environment["CELERY_BROKER_URL"] == settings.redis_url
    assert settings.redis_url not in programs["flower"].command
    config = local_stack.render_config(local_stack.programs(settings, (), {}) + list(programs.values()))
    assert "[program:prometheus]" in config and "[program:flower]" in config


def test_without_prometheus_the_stack_starts_and_status_says_it_is_not_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "prometheus" else real_which(name))
    settings = cli.CliSettings()
    assert "prometheus" not in {p.name for p in local_stack.monitoring_programs(settings)}
    rows = {row.name: row for row in cli.monitoring_status(settings)}
    assert rows["prometheus"].state == "NOT INSTALLED"
    assert "Prometheus is not installed" in rows["prometheus"].detail
    assert "Prometheus" not in cli.monitoring_links(settings, list(rows.values()))


def test_status_prints_the_monitoring_urls_and_their_state(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = cli.CliSettings()
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    answers = {local_stack.monitoring_tools(settings)[0].health_url: ("SERVING", "")}
    monkeypatch.setattr(cli, "_http_health", lambda url: answers.get(url, ("UNREACHABLE", url)))
    rows = cli.monitoring_status(settings)
    states = {row.name: row.state for row in rows}
    assert states == {"prometheus": "OK", "flower": "UNREACHABLE"}
    links = cli.monitoring_links(settings, rows)
    assert links == {"Prometheus": f"http://127.0.0.1:{settings.monitoring.prometheus_port}"}


# --- Drift: every queried metric is exported by a running process ------------------------------------------------


def exported_names(exposition: str) -> set[str]:
    """Sample names a /metrics page exports, including those of families that have no sample yet (a labelled
    metric nobody has used still has its HELP/TYPE lines)."""
    suffixes = {
        "counter": ("", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gauge": ("",),
        "untyped": ("",),
        "info": ("_info",),
    }
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()
            for suffix in suffixes.get(kind, ("",)):
                names.add(family.removesuffix("_total") + suffix if suffix == "_created" else family + suffix)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def test_exported_names_cover_families_without_samples() -> None:
    page = (
        "# HELP a_total x\n# TYPE a_total counter\n# HELP b_seconds y\n# TYPE b_seconds histogram\n"
        '# HELP c z\n# TYPE c gauge\nc{q="1"} 0.0\n'
    )
    names = exported_names(page)
    assert {"a_total", "b_seconds_bucket", "b_seconds_count", "c"} <= names
    assert "b_seconds" not in names


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as response:
            return str(response.read().decode())
    except (OSError, urllib.error.URLError):
        return None


@pytest.fixture(scope="module")
def stack_processes(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """Every server and worker of the local stack as its own process; yields program name -> metrics port."""
    logs = tmp_path_factory.mktemp("monitoring-logs")
    classes = service_settings_classes()
    grpc_ports = {service: free_port() for service in stack_services()}
    env = {**os.environ, **stack.env(), "OMP_WAIT_POLICY": "PASSIVE", "EMILI_LABELER__OOV_METHOD": "none"}
    metrics_ports: dict[str, int] = {}
    for service in stack_services():
        prefix = f"EMILI_{service.upper()}__"
        metrics_ports[f"{service}-server"] = free_port()
        env[f"{prefix}SERVER__METRICS_PORT"] = str(metrics_ports[f"{service}-server"])
        port_variable = "HTTP_PORT" if service == "gateway" else "GRPC_PORT"
        env[f"{prefix}SERVER__{port_variable}"] = str(grpc_ports[service])
        if classes[service].has_worker:
            metrics_ports[f"{service}-worker"] = free_port()
            env[f"{prefix}WORKER__METRICS_PORT"] = str(metrics_ports[f"{service}-worker"])
    env["EMILI_CHAT__FER_TARGET"] = f"127.0.0.1:{grpc_ports['fer']}"
    env["EMILI_GATEWAY__CHAT_TARGET"] = f"127.0.0.1:{grpc_ports['chat']}"
    env["EMILI_GATEWAY__FER_TARGET"] = f"127.0.0.1:{grpc_ports['fer']}"
    # Made before the processes start: workers making them at the same moment can race (BucketAlreadyExists).
    ObjectStore(stack.s3).ensure_buckets()
    processes = {name: EntryPointProcess(f"emili-{name}", env, logs / f"{name}.log") for name in metrics_ports}
    try:
        yield metrics_ports
    finally:
        for process in processes.values():
            process.stop()
        for name, process in processes.items():
            if process.process.returncode not in (0, -15, None):
                print(f"{name} exited with {process.process.returncode}:\n{process.tail()}")


def stack_services() -> tuple[str, ...]:
    return tuple(service for service in local_stack.LOCAL_SERVICES if service in service_settings_classes())


def run_in_progress_exposition() -> str:
    """The trainer's gauges of the run in hand exist only while a run is in progress (a finished run stops
    reporting): the trainer's own collector, in this process, with a run in hand."""
    from prometheus_client import CollectorRegistry, generate_latest

    from emili_trainer.metrics import TrainingMetrics
    from emili_trainer.training import Progress

    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry)
    metrics.started("sft-monitoring")
    progress = Progress(step=1, total_steps=4, epoch=0.25, loss=1.5, learning_rate=1e-4, tokens_per_second=10.0)
    metrics.observe("sft-monitoring", progress)
    return str(generate_latest(registry).decode())


def loop_exposition() -> str:
    """The loop process's families (``emili loop run`` is not a service of this stack; tests/test_loop_process.py
    scrapes a real one): its metrics as the process registers them."""
    from prometheus_client import REGISTRY, generate_latest

    from emili_pipeline.loop_metrics import loop_metrics

    loop_metrics().ticked("acted")
    return str(generate_latest(REGISTRY).decode())


@pytest.mark.integration
@pytest.mark.slow
def test_every_metric_a_dashboard_or_rule_queries_is_exported(stack_processes: dict[str, int]) -> None:
    wanted = {name: places for name, places in queried_names().items() if name not in NOT_EXPORTED_BY_EMILI}
    # Processes register some families only once ready (workers) or once elected (the queue exporter), and each opens
    # its metrics port only after loading its models: scrape until every process answers and nothing is missing, or
    # the processes had their time to start.
    while_training = exported_names(run_in_progress_exposition()) | exported_names(loop_exposition())
    deadline = time.monotonic() + 180
    while True:
        pages = {name: scrape(port) for name, port in stack_processes.items()}
        exported = while_training.union(*(exported_names(page) for page in pages.values() if page))
        missing = sorted(set(wanted) - exported)
        silent = sorted(name for name, page in pages.items() if page is None)
        if (not missing and not silent) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert silent == [], f"no /metrics from {silent}"
    report = "\n".join(f"  {name}: queried by {', '.join(sorted(wanted[name]))}" for name in missing)
    assert missing == [], f"queried but exported by no process of the stack:\n{report}"


def serving_values(page: str) -> list[float]:
    return [float(v) for v in re.findall(r"^emili_server_serving\{[^}]*\} (\S+)$", page, flags=re.MULTILINE)]


@pytest.mark.integration
@pytest.mark.slow
def test_every_server_reports_serving_once_started(stack_processes: dict[str, int]) -> None:
    """The gRPC servers from their health servicer, the gateway from /readyz (which it asks itself when no
    prober does): each server exports emili_server_serving, 1 once ready; workers export none."""
    servers = {name: port for name, port in stack_processes.items() if name.endswith("-server")}
    deadline = time.monotonic() + 180
    while True:
        values = {name: serving_values(scrape(port) or "") for name, port in servers.items()}
        if all(v == [1.0] for v in values.values()) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert values == {name: [1.0] for name in servers}
    for name, port in stack_processes.items():
        if name.endswith("-worker"):
            assert serving_values(scrape(port) or "") == [], name


def get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return json.loads(response.read().decode())
    except (OSError, urllib.error.URLError, ValueError):
        return None


def wait_for(probe: Any, done: Any, what: str, process: subprocess.Popen[bytes], timeout: float = 120.0) -> Any:
    """Probe until ``done(value)``; failing, say what the last probe saw."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        assert process.poll() is None, f"{what}: the process exited with {process.returncode}"
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s; last seen: {value!r}"
        time.sleep(1)


@pytest.mark.integration
@pytest.mark.slow
def test_the_local_prometheus_scrapes_the_stack_and_evaluates_the_rules(
    stack_processes: dict[str, int], tmp_path: Path
) -> None:
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus is missing: scripts/setup.sh installs it (Debian package `prometheus`)"
    targets = [
        local_stack.ScrapeTarget(f"127.0.0.1:{port}", *name.rsplit("-", 1)) for name, port in stack_processes.items()
    ]
    port = free_port()
    settings = CommonSettings.model_validate({"monitoring": {"prometheus_port": port}})
    config = tmp_path / "prometheus.yml"
    config.write_text(local_stack.prometheus_config(settings, targets))
    (program,) = [p for p in local_stack.monitoring_programs(settings) if p.name == "prometheus"]
    command = program.command.replace(str(local_stack.PROMETHEUS_CONFIG), str(config))
    command = command.replace(str(local_stack.PROMETHEUS_DATA), str(tmp_path / "data"))
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(command.split(), stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api/v1"
    try:

        def emili_targets() -> list[dict[str, Any]]:
            answer = get_json(f"{api}/targets?state=active") or {}
            return [t for t in answer.get("data", {}).get("activeTargets", []) if t["labels"]["job"] == "emili"]

        def all_up(found: list[dict[str, Any]]) -> bool:
            return len(found) == len(targets) and all(t["health"] == "up" for t in found)

        scraped = wait_for(emili_targets, all_up, "every process scraped", process)
        assert {(t["labels"]["service"], t["labels"]["component"]) for t in scraped} == {
            (t.service, t.component) for t in targets
        }
        rules = wait_for(lambda: get_json(f"{api}/rules"), bool, "the rules", process)
        groups = {group["name"] for group in rules["data"]["groups"]}
        assert groups == {group["name"] for group in yaml.safe_load(RULES.read_text())["groups"]}
        assert all(rule["health"] != "err" for g in rules["data"]["groups"] for rule in g["rules"])
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.integration
@pytest.mark.slow
def test_flower_sees_the_stack_s_workers(stack_processes: dict[str, int], stack: Stack, tmp_path: Path) -> None:
    port = free_port()
    settings = CommonSettings.model_validate({"redis_url": stack.redis_url, "monitoring": {"flower_port": port}})
    (program,) = [p for p in local_stack.monitoring_programs(settings) if p.name == "flower"]
    log = (tmp_path / "flower.log").open("wb")
    env = {**os.environ, **program.environment}
    process = subprocess.Popen(program.command.split(), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        (tool,) = [t for t in local_stack.monitoring_tools(settings) if t.name == "flower"]
        wait_for(lambda: cli._http_health(tool.health_url)[0], "SERVING".__eq__, "Flower's health check", process)

        # Flower knows a worker is online from the worker's heartbeat events: seeing every worker here also shows
        # that Flower turned the workers' events on. (Its /api needs authentication; its /metrics does not.)
        def workers() -> set[str]:
            page = scrape(port) or ""
            online = re.findall(r'^flower_worker_online\{worker="([^"]+)"\} 1\.0$', page, flags=re.MULTILINE)
            return {name.split("-", 1)[0] for name in online}

        expected = {name.removesuffix("-worker") for name in stack_processes if name.endswith("-worker")}
        wait_for(workers, expected.issubset, "every worker listed", process)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:  # Flower's SIGTERM handler can be lost in a weakref callback.
            process.kill()
            process.wait(30)
