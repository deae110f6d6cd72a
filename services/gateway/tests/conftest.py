"""Gateway test set-up: real Redis and S3 (the repository's fixtures), a real chat gRPC server with a scripted
model, and a FER stand-in, all in one background event loop, so the gateway's TestClient (which runs the app in
its own thread) talks to them over real sockets.

The FER stand-in (:mod:`emili_testing.servers`) finds a face unless the frame's bytes contain ``NOFACE``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from fastapi.testclient import TestClient

from emili_core.keys import model_registry_key
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import AuthSettings, S3Settings
from emili_gateway.app import create_app
from emili_gateway.settings import GatewaySettings
from emili_testing.chat import ScriptedBackend
from emili_testing.plugin import TEST_SECRET, Stack, free_port, token
from emili_testing.servers import ChatAndFer, chat_and_fer

T = TypeVar("T")

REPLY = "I hear you. What would make today a little better?"
JPEG_FACE = b"\xff\xd8\xff\xe0" + b"a face " * 40
JPEG_NO_FACE = b"\xff\xd8\xff\xe0" + b"NOFACE " * 40
ADMIN = "researcher-1"


Servers = ChatAndFer[ScriptedBackend]


@pytest.fixture(scope="session")
def servers(redis_url: str, s3_settings: S3Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    def calm_too(chat: Any) -> dict[str, Any]:
        # A study's own survey words must be in chat's vocabulary: test_api's study offers "Calm".
        surveys = chat.surveys
        return {"surveys": surveys.model_copy(update={"current_feelings": (*surveys.current_feelings, "Calm")})}

    artifacts = tmp_path_factory.mktemp("chat")
    with chat_and_fer(redis_url, s3_settings, artifacts, ScriptedBackend(REPLY), chat_options=calm_too) as running:
        yield running


def gateway_settings(redis_url: str, s3: S3Settings, servers: Servers, **limits: Any) -> GatewaySettings:
    settings = GatewaySettings(
        env="test",
        redis_url=redis_url,
        s3=s3,
        auth=AuthSettings(secret=TEST_SECRET),  # type: ignore[arg-type]
    )
    base = settings.gateway
    # Generous limits by default: every test redeems from the same address; rate-limit tests set their own.
    limit_values = {"redeem_per_minute": 100000, "requests_per_minute": 100000, "messages_per_minute": 1000}
    limit_values |= {"admin_requests_per_minute": 100000}
    limit_values |= {"camera_checks_per_minute": 100000, "frames_per_second": 30.0} | limits
    options = base.model_copy(
        update={
            "chat_target": servers.chat_target,
            "fer_target": servers.fer_target,
            "drain_seconds": 5.0,
            "server": base.server.model_copy(update={"metrics_port": 0}),
            "limits": base.limits.model_copy(update=limit_values),
        }
    )
    return settings.model_copy(update={"gateway": options})


MakeClient = Callable[..., TestClient]


@pytest.fixture
def make_client(redis_url: str, s3_settings: S3Settings, servers: Servers) -> Iterator[MakeClient]:
    """A started gateway app's TestClient; keyword arguments override limits, ``settings=`` replaces all."""
    clients: list[TestClient] = []

    def make(settings: GatewaySettings | None = None, **limits: Any) -> TestClient:
        client = TestClient(create_app(settings or gateway_settings(redis_url, s3_settings, servers, **limits)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: MakeClient) -> TestClient:
    return make_client()


def admin_headers(subject: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(['admin'], subject)}"}


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def study_spec(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "Pilot",
        "arms": [{"arm": "base", "weight": 1}],
        "consent_text": "You will chat with an AI for ten minutes.\nYou may stop at any time.",
        "max_turns": 3,
    }
    return spec | changes


def create_study(client: TestClient, **changes: Any) -> dict[str, Any]:
    response = client.post("/api/v1/studies", json=study_spec(**changes), headers=admin_headers())
    assert response.status_code == 201, response.text
    return dict(response.json())


def create_invite(client: TestClient, study_id: str, **request: Any) -> str:
    response = client.post(f"/api/v1/studies/{study_id}/invites", json=request, headers=admin_headers())
    assert response.status_code == 201, response.text
    return str(response.json()["invites"][0]["code"])


@dataclass
class Joined:
    headers: dict[str, str]
    token: str
    participant_id: str
    withdraw_code: str
    study: dict[str, Any]


def join(client: TestClient, study_id: str) -> Joined:
    code = create_invite(client, study_id)
    response = client.post(f"/api/v1/invites/{code}/redeem")
    assert response.status_code == 200, response.text
    body = response.json()
    return Joined(bearer(body["token"]), body["token"], body["participant_id"], body["withdraw_code"], body["study"])


def start_session(client: TestClient, joined: Joined, **consent: Any) -> str:
    body = {"agree": True, "camera": True, "store_frames": False, "use_for_training": True} | consent
    response = client.post("/api/v1/sessions", json={"consent": body}, headers=joined.headers)
    assert response.status_code == 201, response.text
    return str(response.json()["session_id"])


def register_model_version(store: ObjectStore, version: str) -> None:
    """A model version as the trainer registers it; the scripted model 'loads' its adapter without reading it."""
    store.put_bytes(Bucket.MODELS, f"adapters/{version}/adapter_config.json", b"{}")
    store.put_json(
        Bucket.MODELS, model_registry_key(version), {"version": version, "adapter_prefix": f"adapters/{version}/"}
    )


@dataclass
class GatewayProcess:
    url: str
    metrics_port: int
    log: Path
    process: subprocess.Popen[bytes]


@pytest.fixture
def gateway_process(stack: Stack, servers: Servers, tmp_path: Path) -> Iterator[GatewayProcess]:
    """``emili-gateway-server`` as its own process (uvicorn, real sockets), ready when this returns."""
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        **stack.env(),
        "EMILI_GATEWAY__SERVER__HTTP_PORT": str(port),
        "EMILI_GATEWAY__SERVER__METRICS_PORT": str(metrics_port),
        "EMILI_GATEWAY__CHAT_TARGET": servers.chat_target,
        "EMILI_GATEWAY__FER_TARGET": servers.fer_target,
        "EMILI_LOG_FORMAT": "json",
    }
    log = tmp_path / "gateway.log"
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "emili-gateway-server")],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield GatewayProcess(url, metrics_port, log, process)
    finally:
        if process.poll() is None:
            # Stopped as an orchestrator stops it: it hands its canary monitor's lock over on the way out, so the
            # next test's monitor is not locked out for the lock's TTL.
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def unused_target() -> str:
    return f"127.0.0.1:{free_port()}"
