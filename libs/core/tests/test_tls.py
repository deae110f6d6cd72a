"""TLS on a gRPC hop with development certificates, short-lived service tokens, and where /metrics listens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import jwt
import pytest
from pydantic import ValidationError

from emili_core import stack
from emili_core.grpc_client import ServiceToken, make_channel, open_channel
from emili_core.grpc_server import start_server
from emili_core.settings import CommonSettings, ServerSettings, TLSSettings
from emili_core.tls import dev_certificates, generate_dev_certificates
from emili_testing.plugin import TEST_SECRET, token

from .test_grpc_server import Calls, _unary, build_app


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    generate_dev_certificates(directory)
    return directory


def tls_settings(directory: Path, **changes: object) -> TLSSettings:
    paths = dev_certificates(directory)
    return TLSSettings(
        enabled=True, cert_file=paths.cert_file, key_file=paths.key_file, ca_file=paths.ca_file, **changes
    )


async def _serve(tls: TLSSettings) -> AsyncIterator[str]:
    calls, startup = Calls(), asyncio.Event()
    startup.set()
    settings = CommonSettings(auth={"secret": TEST_SECRET}, tls=tls)
    running = await start_server(build_app(calls, startup), settings, ServerSettings(grpc_port=0, metrics_port=0))
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        await running.stop()


@pytest.fixture
async def tls_server(certs: Path) -> AsyncIterator[str]:
    async for target in _serve(tls_settings(certs)):
        yield target


async def test_a_client_trusting_the_ca_calls_a_tls_server(certs: Path, tls_server: str) -> None:
    async with make_channel(tls_server, token(["admin"], subject="alice"), tls=tls_settings(certs)) as channel:
        assert await _unary(channel, b"hello") == b"alice"
    # The certificate names localhost too.
    port = tls_server.rsplit(":", 1)[1]
    async with make_channel(f"localhost:{port}", token(["admin"], subject="bob"), tls=tls_settings(certs)) as channel:
        assert await _unary(channel, b"hello") == b"bob"


async def test_a_plaintext_client_cannot_talk_to_a_tls_server(tls_server: str) -> None:
    async with make_channel(tls_server, token(["admin"]), timeout=2, max_attempts=2) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await _unary(channel, b"hello")
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_that_trusts_another_ca_refuses_the_server(tmp_path: Path, tls_server: str) -> None:
    generate_dev_certificates(tmp_path)  # A different CA.
    async with make_channel(tls_server, token(["admin"]), tls=tls_settings(tmp_path), timeout=2, max_attempts=2) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await _unary(ch, b"hello")
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate(certs: Path) -> None:
    async for target in _serve(tls_settings(certs, require_client_cert=True)):
        mutual = tls_settings(certs, require_client_cert=True)
        async with make_channel(target, token(["admin"], subject="carol"), tls=mutual) as channel:
            assert await _unary(channel, b"hello") == b"carol"
        no_client_cert = tls_settings(certs)
        async with make_channel(target, token(["admin"]), tls=no_client_cert, timeout=2, max_attempts=2) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await _unary(channel, b"hello")
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_over_tls(certs: Path, tls_server: str) -> None:
    from emili_core.cli import _grpc_health

    state, _ = await _grpc_health(tls_server, tls_settings(certs))
    assert state == "SERVING"
    async with open_channel(tls_server, tls_settings(certs)) as channel:
        await channel.channel_ready()


async def test_a_missing_certificate_is_named(tmp_path: Path) -> None:
    tls = TLSSettings(enabled=True, cert_file=tmp_path / "nope.crt", key_file=tmp_path / "nope.key")
    with pytest.raises(RuntimeError, match="EMILI_TLS__CERT_FILE"):
        async for _ in _serve(tls):
            pass


def test_production_refuses_plaintext_grpc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMILI_ENV", "production")
    monkeypatch.setenv("EMILI_AUTH__SECRET", "p" * 40)
    monkeypatch.setenv("EMILI_S3__ACCESS_KEY", "prod-access")
    monkeypatch.setenv("EMILI_S3__SECRET_KEY", "prod-secret")
    with pytest.raises(ValidationError, match="EMILI_TLS__ENABLED"):
        CommonSettings()
    monkeypatch.setenv("EMILI_TLS__ENABLED", "true")
    assert CommonSettings().tls.enabled


def test_dev_certificates_are_kept_unless_overwritten(tmp_path: Path) -> None:
    first = generate_dev_certificates(tmp_path)
    ca = first.ca_file.read_bytes()
    assert generate_dev_certificates(tmp_path).ca_file.read_bytes() == ca
    assert generate_dev_certificates(tmp_path, overwrite=True).ca_file.read_bytes() != ca
    assert first.key_file.stat().st_mode & 0o077 == 0  # The key is private to its owner.


def test_stack_up_makes_missing_certificates_when_tls_is_enabled(tmp_path: Path) -> None:
    plain = CommonSettings()
    assert not stack.ensure_dev_certificates(plain)
    settings = CommonSettings(tls=tls_settings(tmp_path / "tls"))
    assert stack.ensure_dev_certificates(settings)
    assert dev_certificates(tmp_path / "tls").exist()
    assert not stack.ensure_dev_certificates(settings)  # Already there.


def test_a_service_token_is_short_lived_and_renewed_before_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_000_000.0]
    monkeypatch.setattr("emili_core.auth.time.time", lambda: now[0])  # The tokens' iat and exp.
    source = ServiceToken(TEST_SECRET, "chat-service", ["fer"], clock=lambda: now[0])
    first = source()
    claims = jwt.decode(first, TEST_SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert claims["exp"] - claims["iat"] == 15 * 60 and claims["scopes"] == ["fer"]
    now[0] += 60
    assert source() == first  # Reused while it has long to live.
    now[0] += 15 * 60 - 60 - source.refresh_before + 1
    assert source() != first  # Renewed before it expires.


def test_metrics_listen_on_the_loopback_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    assert CommonSettings().metrics_host == "127.0.0.1"
    monkeypatch.setenv("EMILI_METRICS_HOST", "0.0.0.0")
    assert CommonSettings().metrics_host == "0.0.0.0"


async def test_probes_get_plaintext_health_on_a_port_of_their_own(certs: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    calls, startup = Calls(), asyncio.Event()
    startup.set()
    settings = CommonSettings(auth={"secret": TEST_SECRET}, tls=tls_settings(certs))
    server = ServerSettings(grpc_port=0, metrics_port=0, health_port=0)
    running = await start_server(build_app(calls, startup), settings, server)
    try:
        await running.ready.wait()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.health_port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as exc:  # Nothing else is served there.
                await _unary(channel, b"hello", timeout=2)
            assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await running.stop()
