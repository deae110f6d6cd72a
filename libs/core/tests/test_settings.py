from __future__ import annotations

from typing import ClassVar

import pytest
from pydantic import BaseModel, Field, ValidationError

from emili_core.settings import DEV_AUTH_SECRET, CommonSettings, ServerSettings, load_settings


class DemoServer(ServerSettings):
    grpc_port: int = Field(50099, ge=1, le=65535)
    metrics_port: int = Field(9199, ge=0, le=65535)


class DemoOptions(BaseModel):
    server: DemoServer = DemoServer()
    batch: int = Field(8, ge=1)


class DemoSettings(CommonSettings):
    service_name: ClassVar[str] = "demo"
    demo: DemoOptions = DemoOptions()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: pytest.TempPathFactory) -> None:
    monkeypatch.chdir(tmp_path)  # No .env file from the repository.
    import os

    for key in list(os.environ):
        if key.startswith("EMILI_"):
            monkeypatch.delenv(key)


def test_nested_environment_overrides_keep_other_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMILI_DEMO__SERVER__HOST", "0.0.0.0")
    monkeypatch.setenv("EMILI_DEMO__BATCH", "32")
    monkeypatch.setenv("EMILI_S3__ENDPOINT", "minio:9000")
    settings = DemoSettings()
    assert settings.demo.server.host == "0.0.0.0"
    assert settings.demo.server.grpc_port == 50099
    assert settings.demo.batch == 32
    assert settings.s3.endpoint == "minio:9000"
    assert settings.grpc_target() == "127.0.0.1:50099"


def test_bad_value_fails_at_start_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EMILI_DEMO__BATCH", "0")
    with pytest.raises(SystemExit) as exc:
        load_settings(DemoSettings)
    assert exc.value.code == 2
    assert "EMILI_DEMO__BATCH" in capsys.readouterr().err


def test_production_refuses_development_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMILI_ENV", "production")
    with pytest.raises(ValidationError, match="refusing development secrets"):
        DemoSettings()
    monkeypatch.setenv("EMILI_AUTH__SECRET", "x" * 40)
    monkeypatch.setenv("EMILI_S3__ACCESS_KEY", "prod-access")
    with pytest.raises(ValidationError, match="EMILI_S3__SECRET_KEY"):
        DemoSettings()
    monkeypatch.setenv("EMILI_S3__SECRET_KEY", "prod-secret")
    with pytest.raises(ValidationError, match="EMILI_TLS__ENABLED"):
        DemoSettings()
    monkeypatch.setenv("EMILI_TLS__ENABLED", "true")
    assert DemoSettings().env == "production"


def test_production_refuses_short_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMILI_ENV", "production")
    monkeypatch.setenv("EMILI_AUTH__SECRET", "short")
    monkeypatch.setenv("EMILI_S3__ACCESS_KEY", "a")
    monkeypatch.setenv("EMILI_S3__SECRET_KEY", "b")
    with pytest.raises(ValidationError, match="at least 32"):
        DemoSettings()


def test_development_accepts_defaults() -> None:
    assert DemoSettings().auth.secret.get_secret_value() == DEV_AUTH_SECRET


def test_visibility_timeout_must_outlast_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMILI_TASK_TIME_LIMIT_SECONDS", "600")
    monkeypatch.setenv("EMILI_VISIBILITY_TIMEOUT_SECONDS", "600")
    with pytest.raises(ValidationError, match="must exceed"):
        DemoSettings()
