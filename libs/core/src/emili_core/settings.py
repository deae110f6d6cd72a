"""Typed settings. Each service has exactly one class deriving from ``CommonSettings``.

Only this module reads the environment. Variables use the prefix ``EMILI_`` and ``__`` between
nested groups, e.g. ``EMILI_S3__ENDPOINT`` or ``EMILI_FER__MAX_BATCH_SIZE``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar, Literal, TypeVar

from pydantic import BaseModel, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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


class ServerSettings(BaseModel):
    """Where one service listens. Each service subclasses it to give its own default ports, so that
    setting one field from the environment (e.g. EMILI_FER__SERVER__HOST) keeps the others."""

    host: str = "127.0.0.1"
    grpc_port: int = Field(..., ge=0, le=65535)  # 0 picks a free port (tests).
    metrics_port: int = Field(..., ge=0, le=65535)  # 0 disables the metrics endpoint (tests).
    grace_seconds: float = Field(10.0, ge=0)
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)


class WorkerSettings(BaseModel):
    concurrency: int = Field(2, ge=1)
    prefetch_multiplier: int = Field(1, ge=1)
    metrics_port: int = Field(..., ge=0, le=65535)


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

    env: Literal["development", "test", "production"] = "development"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["console", "json"] = "console"
    redis_url: str = Field("redis://127.0.0.1:6379/0", pattern=r"^rediss?://")
    artifacts_dir: Path = REPO_ROOT / "var" / "artifacts"
    s3: S3Settings = S3Settings()
    auth: AuthSettings = AuthSettings()
    # A task is stopped after this long; the visibility timeout must be longer, or Redis would hand a
    # task that is still running to a second worker.
    task_time_limit_seconds: int = Field(3600, ge=1)
    visibility_timeout_seconds: int = Field(2 * 3600, ge=2)

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
