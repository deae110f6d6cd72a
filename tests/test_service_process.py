"""The FER server as its own process: readiness, a real call, graceful stop on SIGTERM; the token CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from emili.fer.v1 import fer_pb2, fer_pb2_grpc
from emili_core.auth import verify_token
from emili_core.grpc_client import make_channel
from emili_core.settings import REPO_ROOT
from emili_testing.plugin import TEST_SECRET, free_port, token

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


async def _status(target: str) -> int | None:
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.aio.AioRpcError:
            return None
        return int(reply.status)


async def test_server_process_serves_and_drains_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "EMILI_AUTH__SECRET": TEST_SECRET,
        "EMILI_FER__SERVER__GRPC_PORT": str(port),
        "EMILI_FER__SERVER__METRICS_PORT": str(free_port()),
    }
    log = tmp_path / "fer-server.log"
    process = subprocess.Popen(
        [str(BIN / "emili-fer-server")], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    target = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while await _status(target) != health_pb2.HealthCheckResponse.SERVING:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.1)
        face = (REPO_ROOT / "var" / "artifacts" / "samples" / "face_640x480.jpg").read_bytes()
        async with make_channel(target, token(["fer"])) as channel:
            reply = await fer_pb2_grpc.FerServiceStub(channel).Analyze(
                fer_pb2.AnalyzeRequest(frame=fer_pb2.Frame(data=face))
            )
        assert reply.reading.top_emotion == "happy"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        text = log.read_text()
        assert "stopping: draining" in text and "fer stopped" in text
    finally:
        if process.poll() is None:
            process.kill()


def test_bad_configuration_stops_the_server_with_a_clear_message() -> None:
    env = {**os.environ, "EMILI_FER__BATCHING__MAX_BATCH_SIZE": "0"}
    result = subprocess.run([str(BIN / "emili-fer-server")], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "EMILI_FER__BATCHING__MAX_BATCH_SIZE" in result.stderr


def test_production_refuses_development_secrets() -> None:
    env = {**os.environ, "EMILI_ENV": "production", "EMILI_AUTH__SECRET": "dev-only-secret-change-me-0123456789abcdef"}
    result = subprocess.run([str(BIN / "emili-fer-server")], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "refusing development secrets" in result.stderr


def test_token_create_cli() -> None:
    env = {**os.environ, "EMILI_AUTH__SECRET": TEST_SECRET}
    result = subprocess.run(
        [str(BIN / "emili"), "token", "create", "--subject", "app-7", "--scope", "chat", "--scope", "fer"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    principal = verify_token(TEST_SECRET, result.stdout.strip())
    assert principal.subject == "app-7" and principal.scopes == {"chat", "fer"}
    bad = subprocess.run(
        [str(BIN / "emili"), "token", "create", "--subject", "x", "--scope", "root"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "unknown scopes" in bad.stderr
