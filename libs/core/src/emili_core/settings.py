"""Typed settings. Each service has exactly one class deriving from ``CommonSettings``.

Only this module reads the environment. Variables use the prefix ``EMILI_`` and ``__`` between
nested groups, e.g. ``EMILI_S3__ENDPOINT`` or ``EMILI_FER__MAX_BATCH_SIZE``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import ClassVar, Literal, TypeVar

from pydantic import BaseModel, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from emili_core.queues import REDELIVERY, Queue, Redelivery

# Development defaults, published in .env.example; a production deployment must replace them.
DEV_AUTH_SECRET = "dev-only-secret-change-me-0123456789abcdef"
DEV_S3_ACCESS_KEY = "emili-dev"
DEV_S3_SECRET_KEY = "emili-dev-secret"
MIN_SECRET_LENGTH = 32

REPO_ROOT = Path(__file__).resolve().parents[4]


class S3Settings(BaseModel):
    endpoint: str = "127.0.0.1:9000"
    access_key: SecretStr = SecretStr(DEV_S3_ACCESS_KEY)
    secret_key: SecretStr = SecretStr(DEV_S3_SECRET_KEY)
    # rclone's S3 server cannot answer GetBucketLocation: the region must be given.
    region: str = "us-east-1"
    secure: bool = False
    bucket_prefix: str = Field("emili-", pattern=r"^[a-z0-9][a-z0-9.-]{0,40}$")
    max_attempts: int = Field(5, ge=1, le=20)


class AuthSettings(BaseModel):
    secret: SecretStr = SecretStr(DEV_AUTH_SECRET)
    issuer: str = "emili"
    default_ttl_seconds: int = Field(24 * 3600, gt=0)


class TLSSettings(BaseModel):
    """TLS on every gRPC hop (``EMILI_TLS__*``); required with ``EMILI_ENV=production``.

    A server presents ``cert_file``/``key_file``; a client trusts ``ca_file`` (the system roots when empty). With
    ``require_client_cert`` a server also asks each client for a certificate signed by ``ca_file`` (mutual TLS),
    and clients present ``cert_file``/``key_file``. ``emili stack certs`` makes development ones under var/tls.
    """

    enabled: bool = False
    cert_file: Path = REPO_ROOT / "var" / "tls" / "server.crt"
    key_file: Path = REPO_ROOT / "var" / "tls" / "server.key"
    ca_file: Path | None = REPO_ROOT / "var" / "tls" / "ca.crt"
    require_client_cert: bool = False
    # The name the server's certificate is checked against when it differs from the target's host.
    server_name_override: str = ""

    @model_validator(mode="after")
    def _client_certs_need_a_ca(self) -> TLSSettings:
        if self.enabled and self.require_client_cert and self.ca_file is None:
            raise ValueError("EMILI_TLS__REQUIRE_CLIENT_CERT needs EMILI_TLS__CA_FILE to verify clients with")
        return self


class QueueSettings(BaseModel):
    """One queue's redelivery numbers (``EMILI_QUEUES__<QUEUE>__VISIBILITY_TIMEOUT_S`` ...); defaults in
    :data:`emili_core.queues.REDELIVERY`. The visibility timeout must exceed the task time limit."""

    visibility_timeout_s: int = Field(..., ge=2)
    task_time_limit_s: int = Field(..., ge=1)

    @model_validator(mode="after")
    def _visibility_outlasts_tasks(self) -> QueueSettings:
        Redelivery(self.visibility_timeout_s, self.task_time_limit_s)  # Raises ValueError when it does not.
        return self


class ServerSettings(BaseModel):
    """Where one service listens. Each service subclasses it to give its own default ports, so that
    setting one field from the environment (e.g. EMILI_FER__SERVER__HOST) keeps the others."""

    host: str = "127.0.0.1"
    grpc_port: int = Field(..., ge=0, le=65535)  # 0 picks a free port (tests).
    metrics_port: int = Field(..., ge=0, le=65535)  # 0 disables the metrics endpoint (tests).
    # Plaintext gRPC health only (probes that cannot speak TLS, like the kubelet's); None: not served; 0: any port.
    health_port: int | None = Field(None, ge=0, le=65535)
    grace_seconds: float = Field(10.0, ge=0)
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)


class WorkerSettings(BaseModel):
    concurrency: int = Field(2, ge=1)
    prefetch_multiplier: int = Field(1, ge=1)
    metrics_port: int = Field(..., ge=0, le=65535)
    # Liveness: the worker rewrites this file every ``heartbeat_interval_s`` while its consumer loop runs and no
    # task overran its time limit; ``--live`` fails when the file is older than ``liveness_max_age_s``. Default:
    # ``<temp dir>/emili-<service>-worker.heartbeat`` (in the pod, /tmp is the container's own).
    heartbeat_file: Path | None = None
    heartbeat_interval_s: float = Field(10.0, gt=0)
    liveness_max_age_s: float = Field(120.0, gt=0)


class RetentionSettings(BaseModel):
    """How long raw data are kept (``EMILI_RETENTION__<FIELD>``); 0 keeps them forever.

    Production defaults: face frames 30 days, a session's Redis event stream and hash 7 days after its record is
    persisted to object storage (the record stays), a session never ended 30 days after its last write, offline
    FER readings 90 days. Frames expire by an S3 lifecycle rule where the store supports one, else by the sweeper
    (``chat.retention_sweep``, ``emili retention sweep``)."""

    frames_days: int = Field(30, ge=0)
    event_stream_days: int = Field(7, ge=0)  # After chat.persist_session has stored the record.
    idle_session_days: int = Field(30, ge=0)  # A session never ended: after its last write.
    fer_readings_days: int = Field(90, ge=0)  # Offline FER readings (``<session>/fer/`` in the sessions bucket).
    # What a withdrawal does to the model versions that learned from the withdrawn sessions: "mark" records it in
    # their lineage (they keep serving until a researcher retrains); "retire" also stops chat serving them and the
    # trainer building on them.
    withdrawn_models: Literal["mark", "retire"] = "mark"


class MonitoringSettings(BaseModel):
    """Prometheus and Flower of the local stack (``EMILI_MONITORING__*``). Fixed ports below the kernel's ephemeral
    range (32768 and up), away from the defaults of a system-wide Prometheus (9090) that Debian's package starts."""

    prometheus_port: int = Field(9190, ge=1, le=65535)
    flower_port: int = Field(5555, ge=1, le=65535)
    prometheus_retention: str = Field("15d", pattern=r"^[0-9]+[smhdwy]$")


@dataclass(frozen=True)
class HealthCheck:
    """How a service's server tells whether it is ready (``emili status``, ``emili stack up``).

    ``grpc``: ``target`` is host:port, asked with the standard ``grpc.health.v1`` Check; ``http``: ``target`` is a
    URL that answers 200 when the server is ready (anything else, e.g. 503 naming what is down, is not ready).
    """

    kind: Literal["grpc", "http"]
    target: str


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="EMILI_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
        validate_default=True,
    )

    # The service's one name; its own options live in the field of that name (e.g. ``fer``).
    service_name: ClassVar[str] = ""
    # Whether the service runs a Celery worker (``emili-<name>-worker``) beside its server; the local stack and
    # ``emili status`` follow it. A service with no background jobs (the gateway) sets it to False.
    has_worker: ClassVar[bool] = True

    env: Literal["development", "test", "production"] = "development"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["console", "json"] = "console"
    redis_url: str = Field("redis://127.0.0.1:6379/0", pattern=r"^rediss?://")
    artifacts_dir: Path = REPO_ROOT / "var" / "artifacts"
    s3: S3Settings = S3Settings()
    auth: AuthSettings = AuthSettings()
    retention: RetentionSettings = RetentionSettings()
    tls: TLSSettings = TLSSettings()
    monitoring: MonitoringSettings = MonitoringSettings()  # The local stack only.
    # Where /metrics listens: the loopback unless configured (the k8s ConfigMap sets 0.0.0.0 so that Prometheus
    # scrapes the pod); the endpoint has no authentication.
    metrics_host: str = "127.0.0.1"
    # A task is stopped after this long; the visibility timeout must be longer, or Redis would hand a
    # task that is still running to a second worker.
    task_time_limit_seconds: int = Field(3600, ge=1)
    visibility_timeout_seconds: int = Field(2 * 3600, ge=2)
    # Per-queue redelivery, overriding the catalogue (emili_core.queues.REDELIVERY); the two numbers above are
    # for a Celery app of no known queue.
    queues: dict[Queue, QueueSettings] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _visibility_timeout_outlasts_tasks(self) -> CommonSettings:
        if self.visibility_timeout_seconds <= self.task_time_limit_seconds:
            raise ValueError(
                f"EMILI_VISIBILITY_TIMEOUT_SECONDS ({self.visibility_timeout_seconds}) must exceed "
                f"EMILI_TASK_TIME_LIMIT_SECONDS ({self.task_time_limit_seconds})"
            )
        return self

    @model_validator(mode="after")
    def _refuse_development_secrets_in_production(self) -> CommonSettings:
        if self.env != "production":
            return self
        problems = []
        secret = self.auth.secret.get_secret_value()
        if secret == DEV_AUTH_SECRET or len(secret) < MIN_SECRET_LENGTH:
            problems.append(f"EMILI_AUTH__SECRET must be a new secret of at least {MIN_SECRET_LENGTH} characters")
        if self.s3.access_key.get_secret_value() == DEV_S3_ACCESS_KEY:
            problems.append("EMILI_S3__ACCESS_KEY is the development key")
        if self.s3.secret_key.get_secret_value() == DEV_S3_SECRET_KEY:
            problems.append("EMILI_S3__SECRET_KEY is the development key")
        if problems:
            raise ValueError("refusing development secrets with EMILI_ENV=production: " + "; ".join(problems))
        return self

    @model_validator(mode="after")
    def _production_needs_tls(self) -> CommonSettings:
        if self.env == "production" and not self.tls.enabled:
            raise ValueError(
                "refusing plaintext gRPC with EMILI_ENV=production: set EMILI_TLS__ENABLED=true and "
                "EMILI_TLS__CERT_FILE, EMILI_TLS__KEY_FILE, EMILI_TLS__CA_FILE (see deploy/k8s/README.md)"
            )
        return self

    def redelivery(self, queue: str) -> Redelivery:
        """The visibility timeout and task time limit of ``queue``'s consumers: ``queues[queue]`` if set, else the
        two global numbers if either was set explicitly (``EMILI_VISIBILITY_TIMEOUT_SECONDS``, as before per-queue
        numbers existed), else the catalogue's."""
        known = Queue(queue) if queue in {q.value for q in Queue} else None
        if known is not None and known in self.queues:
            return Redelivery(self.queues[known].visibility_timeout_s, self.queues[known].task_time_limit_s)
        explicit = {"visibility_timeout_seconds", "task_time_limit_seconds"} & self.model_fields_set
        if known is None or explicit:
            return Redelivery(self.visibility_timeout_seconds, self.task_time_limit_seconds)
        return REDELIVERY[known]

    def server_settings(self) -> ServerSettings:
        options = getattr(self, self.service_name, None)
        if not isinstance(getattr(options, "server", None), ServerSettings):
            raise TypeError(f"{type(self).__name__} has no `{self.service_name}.server` settings")
        return options.server  # type: ignore[union-attr, no-any-return]

    def worker_settings(self) -> WorkerSettings:
        options = getattr(self, self.service_name, None)
        if not isinstance(getattr(options, "worker", None), WorkerSettings):
            raise TypeError(f"{type(self).__name__} has no `{self.service_name}.worker` settings")
        return options.worker  # type: ignore[union-attr, no-any-return]

    def artifact(self, path: Path) -> Path:
        """A configured artefact path: relative paths are under ``artifacts_dir``."""
        return path if path.is_absolute() else self.artifacts_dir / path

    def grpc_target(self) -> str:
        server = self.server_settings()
        host = "127.0.0.1" if server.host in {"0.0.0.0", "::", ""} else server.host
        return f"{host}:{server.grpc_port}"

    def health_check(self) -> HealthCheck:
        """How to check this service's server: gRPC health on its gRPC port, unless the service says otherwise."""
        return HealthCheck("grpc", self.grpc_target())

    def http_url(self) -> str | None:
        """Where a local client reaches the service's HTTP API (``http://host:port``); None for gRPC-only ones."""
        return None

    def links(self) -> dict[str, str]:
        """Addresses a person opens in a browser, by what they are (``emili status`` prints them)."""
        return {}


def service_settings_classes() -> dict[str, type[CommonSettings]]:
    """Each installed service's settings class, from the ``emili.services`` entry points."""
    return {ep.name: ep.load() for ep in entry_points(group="emili.services")}


SettingsT = TypeVar("SettingsT", bound=CommonSettings)


def load_settings(cls: type[SettingsT]) -> SettingsT:
    """Build settings at process start; on bad config print what to fix and exit with status 2."""
    try:
        return cls()
    except ValidationError as exc:
        lines = [f"invalid configuration for {cls.__name__}:"]
        for error in exc.errors():
            path = "__".join(str(part) for part in error["loc"]).upper()
            lines.append(f"  EMILI_{path}: {error['msg']}" if path else f"  {error['msg']}")
        print("\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None
