"""The local stack: Redis, the S3 server, each service's server and worker, Prometheus and Flower under supervisord,
and the processes other packages add (``emili.stack`` entry points: the pipeline's loop when its policy is enabled).

Everything lives in ``var/`` (git-ignored): data in ``var/redis``, ``var/s3`` and ``var/prometheus``, logs in
``var/log``, the generated supervisord and Prometheus configs and the socket in ``var/run``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from urllib.parse import urlparse

from emili_core.settings import REPO_ROOT, CommonSettings, service_settings_classes

VAR = REPO_ROOT / "var"
RUN_DIR, LOG_DIR = VAR / "run", VAR / "log"
CONFIG = RUN_DIR / "supervisord.conf"
SOCKET = RUN_DIR / "supervisor.sock"
PROMETHEUS_CONFIG = RUN_DIR / "prometheus.yml"
PROMETHEUS_DATA = VAR / "prometheus"
# The rules Kubernetes loads too (deploy/k8s/components/monitoring wraps the same file).
RULES_FILE = REPO_ROOT / "deploy" / "monitoring" / "rules" / "emili.rules.yaml"
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
RESERVED_PORTS_FILE = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")

# Services started by `make up`, in start order. A service joins this list when its code lands. Each runs its
# server and, when its settings class says it has one (``has_worker``), its Celery worker.
LOCAL_SERVICES: tuple[str, ...] = ("fer", "chat", "labeler", "trainer", "gateway")
# Every process of the local stack shares a few cores. OpenMP threads that spin while waiting (the default)
# starve the other processes' threads: SmolLM2 on 2 busy cores made 0.6 tokens/s with spinning threads and
# 8.3 with passive ones.
PROGRAM_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}
# Development data beside the checkout (never committed): when it is there and nothing else is configured, the
# labeler builds EmPO pairs from it (the pipeline's DPO fallback when the users' reactions give no pairs) and the
# trainer's evaluation computes the reply metrics as EmPO does (ED counts for NIDF, the NRC lexicons).
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SHARED_EMPATHETIC_DIALOGUES = SHARED_DATA / "empatheticdialogues"
SHARED_INPUTS: dict[str, dict[str, Path]] = {
    "labeler": {"EMILI_LABELER__EMPATHETIC_DIALOGUES": SHARED_EMPATHETIC_DIALOGUES},
    "trainer": {
        "EMILI_TRAINER__ED_COUNTS": SHARED_EMPATHETIC_DIALOGUES / "ed_train_val_counts.json",
        "EMILI_TRAINER__DISTANCE_LEXICON": SHARED_DATA / "nrc-vad-v1" / "NRC-VAD-Lexicon.txt",
        "EMILI_TRAINER__EMPATHETIC_DIALOGUES": SHARED_EMPATHETIC_DIALOGUES,
        "EMILI_TRAINER__INTENSITY_LEXICON": SHARED_DATA
        / "nrc-emotion-intensity"
        / "NRC-Emotion-Intensity-Lexicon-v1.txt",
    },
}


@dataclass(frozen=True)
class Program:
    name: str
    command: str
    priority: int
    # Workers start only once the servers have bound their ports (see start_workers).
    autostart: bool = True
    stopwaitsecs: int = 30
    environment: dict[str, str] = field(default_factory=lambda: dict(PROGRAM_ENVIRONMENT))
    metrics_port: int = 0  # An extension program's /metrics (scraped as service=<name>); 0: none.


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def emili_command() -> str:
    """The ``emili`` command of this environment (for programs that run one of its sub-commands)."""
    return _bin("emili")


def _configured(variable: str) -> bool:
    dotenv = REPO_ROOT / ".env"
    return variable in os.environ or (dotenv.is_file() and f"{variable}=" in dotenv.read_text())


def environment(service: str) -> dict[str, str]:
    """Extra environment of a service's processes in the local stack."""
    env = dict(PROGRAM_ENVIRONMENT)
    for variable, path in SHARED_INPUTS.get(service, {}).items():
        present = (path / "valid.csv").is_file() if path == SHARED_EMPATHETIC_DIALOGUES else path.is_file()
        if present and not _configured(variable):
            env[variable] = str(path)
    return env


def has_worker(service: str, classes: dict[str, type[CommonSettings]]) -> bool:
    """Whether a service runs a Celery worker, as its settings class declares (assumed when it is not installed)."""
    cls = classes.get(service)
    return cls is None or cls.has_worker


def programs(
    settings: CommonSettings,
    services: tuple[str, ...] = LOCAL_SERVICES,
    classes: dict[str, type[CommonSettings]] | None = None,
) -> list[Program]:
    """Redis, the S3 server, then each service's server and (if it has one) worker; ``classes`` are the
    services' settings classes (default: the installed ones)."""
    classes = service_settings_classes() if classes is None else classes
    redis_port = urlparse(settings.redis_url).port or 6379
    s3_addr = settings.s3.endpoint
    s3_keys = f"{settings.s3.access_key.get_secret_value()},{settings.s3.secret_key.get_secret_value()}"
    result = [
        Program(
            "redis",
            f"{_bin('redis-server')} --bind 127.0.0.1 --port {redis_port} --dir {VAR / 'redis'} "
            "--appendonly yes --appendfsync everysec --daemonize no --protected-mode yes",
            priority=10,
        ),
        Program(
            "s3",
            f"{_bin('rclone')} serve s3 {VAR / 's3'} --addr {s3_addr} --auth-key {s3_keys} "
            "--force-path-style=true --log-level NOTICE",
            priority=10,
        ),
    ]
    for service in services:
        env = environment(service)
        result.append(Program(f"{service}-server", _bin(f"emili-{service}-server"), priority=20, environment=env))
        if has_worker(service, classes):
            worker = Program(f"{service}-worker", _bin(f"emili-{service}-worker"), 30, autostart=False, environment=env)
            result.append(worker)
    return result


@dataclass(frozen=True)
class ScrapeTarget:
    """One process's /metrics, with the labels the rules and dashboards group by (as in Kubernetes)."""

    address: str
    service: str
    component: str  # "server" or "worker"


def _local_host(host: str) -> str:
    return "127.0.0.1" if host in {"0.0.0.0", "::", ""} else host


def scrape_targets(
    settings: CommonSettings,
    services: tuple[str, ...] = LOCAL_SERVICES,
    classes: dict[str, type[CommonSettings]] | None = None,
    extensions: Sequence[Program] = (),
) -> list[ScrapeTarget]:
    """Every server's and worker's metrics endpoint in the local stack (a port of 0 serves none), and those of the
    ``extensions`` (:func:`extension_programs`) that serve metrics, as service ``<name>``."""
    classes = service_settings_classes() if classes is None else classes
    host = _local_host(settings.metrics_host)
    targets = []
    for service in services:
        if service not in classes:
            continue
        options = getattr(classes[service](), service, None)
        server_port = getattr(getattr(options, "server", None), "metrics_port", 0)
        if server_port:
            targets.append(ScrapeTarget(f"{host}:{server_port}", service, "server"))
        worker_port = getattr(getattr(options, "worker", None), "metrics_port", 0)
        if classes[service].has_worker and worker_port:
            targets.append(ScrapeTarget(f"{host}:{worker_port}", service, "worker"))
    targets += [ScrapeTarget(f"{host}:{p.metrics_port}", p.name, "server") for p in extensions if p.metrics_port]
    return targets


def prometheus_config(settings: CommonSettings, targets: list[ScrapeTarget], rules: Path = RULES_FILE) -> str:
    """The local Prometheus's configuration (JSON, which is YAML): every process as job "emili" and the rules
    Kubernetes loads."""
    static_configs = [
        {"targets": [t.address], "labels": {"service": t.service, "component": t.component}} for t in targets
    ]
    monitoring = settings.monitoring
    config = {
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "rule_files": [str(rules)] if rules.is_file() else [],
        "scrape_configs": [
            {"job_name": "emili", "static_configs": static_configs},
            # Flower's own metrics (Celery events as Flower sees them).
            {"job_name": "flower", "static_configs": [{"targets": [f"127.0.0.1:{monitoring.flower_port}"]}]},
            {"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{monitoring.prometheus_port}"]}]},
        ],
    }
    return json.dumps(config, indent=2) + "\n"


@dataclass(frozen=True)
class MonitoringTool:
    """Prometheus or Flower in the local stack: where people open it, and whether it is installed."""

    name: str
    title: str
    url: str
    health_url: str
    installed: bool
    install_hint: str


def monitoring_tools(settings: CommonSettings) -> list[MonitoringTool]:
    ports = settings.monitoring
    prometheus_url, flower_url = f"http://127.0.0.1:{ports.prometheus_port}", f"http://127.0.0.1:{ports.flower_port}"
    return [
        MonitoringTool(
            "prometheus",
            "Prometheus",
            prometheus_url,
            f"{prometheus_url}/-/ready",
            shutil.which("prometheus") is not None,
            "Prometheus is not installed (apt-get install prometheus; scripts/setup.sh does it)",
        ),
        MonitoringTool(
            "flower",
            "Flower",
            flower_url,
            f"{flower_url}/healthcheck",
            (Path(sys.executable).parent / "celery").exists() or shutil.which("celery") is not None,
            "Flower is not installed (make setup)",
        ),
    ]


def monitoring_programs(settings: CommonSettings) -> list[Program]:
    """Prometheus (when its binary is installed) and Flower; started after the services (higher priority)."""
    installed = {tool.name for tool in monitoring_tools(settings) if tool.installed}
    ports = settings.monitoring
    result = []
    if "prometheus" in installed:
        result.append(
            Program(
                "prometheus",
                f"{shutil.which('prometheus')} --config.file={PROMETHEUS_CONFIG} --storage.tsdb.path={PROMETHEUS_DATA} "
                f"--storage.tsdb.retention.time={ports.prometheus_retention} "
                f"--web.listen-address=127.0.0.1:{ports.prometheus_port}",
                priority=40,
            )
        )
    if "flower" in installed:
        # The broker URL goes by environment (CELERY_BROKER_URL), not the command line that `ps` shows. Flower
        # turns the workers' task events on itself (its --enable_events, every few seconds), so the workers need
        # no -E.
        result.append(
            Program(
                "flower",
                f"{_bin('celery')} flower --address=127.0.0.1 --port={ports.flower_port} --purge_offline_workers=300",
                priority=40,
                environment={**PROGRAM_ENVIRONMENT, "CELERY_BROKER_URL": settings.redis_url},
            )
        )
    return result


def extension_programs(settings: CommonSettings) -> list[Program]:
    """Processes other packages add to the local stack: each ``emili.stack`` entry point is a function of the
    settings returning its programs (the pipeline's loop, only when its policy is enabled)."""
    result: list[Program] = []
    for ep in entry_points(group="emili.stack"):
        result.extend(ep.load()(settings))
    return result


def render_config(progs: list[Program]) -> str:
    sections = [
        f"[unix_http_server]\nfile={SOCKET}\n",
        f"[supervisord]\nlogfile={LOG_DIR / 'supervisord.log'}\npidfile={RUN_DIR / 'supervisord.pid'}\n"
        f"directory={REPO_ROOT}\nnodaemon=false\n",
        "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n",
        f"[supervisorctl]\nserverurl=unix://{SOCKET}\n",
    ]
    for p in progs:
        env = ",".join(f'{k}="{v}"' for k, v in sorted(p.environment.items()))
        sections.append(
            f"[program:{p.name}]\ncommand={p.command}\npriority={p.priority}\nautostart={str(p.autostart).lower()}\n"
            "autorestart=true\n"
            f"startsecs=2\nstopsignal=TERM\nstopwaitsecs={p.stopwaitsecs}\nstopasgroup=true\nkillasgroup=true\n"
            f"redirect_stderr=true\nstdout_logfile={LOG_DIR / p.name}.log\nstdout_logfile_maxbytes=20MB\n"
            f"stdout_logfile_backups=3\nenvironment={env}\n"
        )
    return "\n".join(sections)


# The servers' fixed ports lie in the kernel's ephemeral range: a connection made before a slow server (the trainer
# imports torch first) has bound could take that port as its source port, and the server then never binds. Seen on
# a fresh machine: the gateway server's Redis connection took the trainer's 50054. So `emili stack up` reserves the
# servers' ports where the kernel lets it (reserve_ports), and starts the workers only once every server answers.
def start_workers() -> None:
    names = [p for p in program_states() if p.endswith("-worker")]
    if names:
        supervisorctl("start", *names)


def supervisorctl(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_bin("supervisorctl"), "-c", str(CONFIG), *args], capture_output=True, text=True, check=check
    )


def is_running() -> bool:
    return SOCKET.exists() and supervisorctl("pid").returncode == 0


def ensure_dev_certificates(settings: CommonSettings) -> bool:
    """With TLS enabled and the configured certificate files missing, make development ones (a local CA and a
    certificate for 127.0.0.1/localhost) there; True when it made them."""
    from emili_core.tls import generate_dev_certificates

    tls = settings.tls
    if not tls.enabled or (tls.cert_file.is_file() and tls.key_file.is_file()):
        return False
    made = generate_dev_certificates(tls.cert_file.parent)
    if (made.cert_file, made.key_file) != (tls.cert_file, tls.key_file) or (
        tls.ca_file is not None and tls.ca_file != made.ca_file
    ):
        raise RuntimeError(
            f"development certificates are made as {made.cert_file.name}, {made.key_file.name} and "
            f"{made.ca_file.name} in one folder; EMILI_TLS__* name other files: run `emili stack certs --dir DIR` "
            "and point EMILI_TLS__CERT_FILE, EMILI_TLS__KEY_FILE and EMILI_TLS__CA_FILE at them"
        )
    return True


_PORT_FIELDS = ("grpc_port", "http_port", "metrics_port", "health_port")


def listening_ports(settings: CommonSettings, classes: dict[str, type[CommonSettings]] | None = None) -> list[int]:
    """Every fixed port the local stack's programs listen on (0, a free port, is left out)."""
    classes = service_settings_classes() if classes is None else classes
    s3 = settings.s3.endpoint
    ports = {urlparse(settings.redis_url).port or 6379, urlparse(s3 if "//" in s3 else f"//{s3}").port or 0}
    ports |= {settings.monitoring.prometheus_port, settings.monitoring.flower_port}
    for service in LOCAL_SERVICES:
        if service not in classes:
            continue
        options = getattr(classes[service](), service, None)
        for part in ("server", "worker"):
            section = getattr(options, part, None)
            ports |= {getattr(section, name, 0) or 0 for name in _PORT_FIELDS}
    return sorted(p for p in ports if p)


def _parse_ports(text: str) -> set[int]:
    ports: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if part:
            low, _, high = part.partition("-")
            ports.update(range(int(low), int(high or low) + 1))
    return ports


def _format_ports(ports: set[int]) -> str:
    ranges: list[str] = []
    for port in sorted(ports):
        if ranges and int(ranges[-1].rpartition("-")[2]) == port - 1:
            ranges[-1] = f"{ranges[-1].partition('-')[0]}-{port}"
        else:
            ranges.append(str(port))
    return ",".join(ranges)


def reserve_ports(
    ports: Sequence[int], reserved: Path = RESERVED_PORTS_FILE, port_range: Path = EPHEMERAL_RANGE_FILE
) -> tuple[list[int], list[int]]:
    """Keep the kernel from giving ``ports`` that lie in its ephemeral range to outgoing connections, by adding
    them to ``ip_local_reserved_ports`` (kept with what is there; servers can still listen on them). Returns
    (ports in the range now reserved, ports in the range it could not reserve: not Linux, or not allowed)."""
    try:
        low, high = (int(x) for x in port_range.read_text().split())
    except (OSError, ValueError):
        return [], []  # No such kernel setting: nothing known to collide.
    at_risk = {p for p in ports if low <= p <= high}
    if not at_risk:
        return [], []
    try:
        current = _parse_ports(reserved.read_text().strip())
        if not at_risk <= current:
            reserved.write_text(_format_ports(current | at_risk) + "\n")
    except (OSError, ValueError):
        return [], sorted(at_risk)
    return sorted(at_risk), []


def up(settings: CommonSettings) -> list[int]:
    """Start (or update) the stack under supervisord; returns the servers' ports in the kernel's ephemeral range
    that could not be reserved (see :func:`reserve_ports`)."""
    for folder in (RUN_DIR, LOG_DIR, VAR / "redis", VAR / "s3", PROMETHEUS_DATA):
        folder.mkdir(parents=True, exist_ok=True)
    _, unreserved = reserve_ports(listening_ports(settings))
    ensure_dev_certificates(settings)
    extensions = extension_programs(settings)
    PROMETHEUS_CONFIG.write_text(prometheus_config(settings, scrape_targets(settings, extensions=extensions)))
    CONFIG.write_text(render_config(programs(settings) + monitoring_programs(settings) + extensions))
    if is_running():
        supervisorctl("update", check=True)
        supervisorctl("start", "all")
        supervisorctl("signal", "HUP", "prometheus")  # Reloads its configuration and rules (if it runs).
        return unreserved
    subprocess.run([_bin("supervisord"), "-c", str(CONFIG)], check=True, env=os.environ.copy())
    return unreserved


def down(timeout: float = 60.0) -> bool:
    if not is_running():
        return False
    pid_file = RUN_DIR / "supervisord.pid"
    pid = int(pid_file.read_text()) if pid_file.exists() else None
    supervisorctl("shutdown")
    deadline = time.monotonic() + timeout
    while pid is not None and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    return True


def program_states() -> dict[str, str]:
    if not is_running():
        return {}
    states = {}
    for line in supervisorctl("status").stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            states[parts[0]] = parts[1]
    return states


def log_tail(program: str, lines: int = 20) -> str:
    path = LOG_DIR / f"{program}.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"
