"""``emili-gateway-server`` as its own process (uvicorn, real sockets): a participant's visit over HTTP and a
WebSocket, a reply recorded after the browser drops, /metrics on its own port, tokens kept out of the log, and
a clean stop on SIGTERM."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest
from websockets.sync.client import connect

from .conftest import GatewayProcess, admin_headers, study_spec

pytestmark = pytest.mark.integration


def test_gateway_process(gateway_process: GatewayProcess) -> None:
    base, process, log = gateway_process.url, gateway_process.process, gateway_process.log
    with httpx.Client(base_url=base, timeout=10) as http:
        created = http.post("/api/v1/studies", json=study_spec(), headers=admin_headers())
        assert created.status_code == 201, created.text
        study = created.json()
        invites = http.post(f"/api/v1/studies/{study['study_id']}/invites", json={}, headers=admin_headers())
        assert invites.json()["invites"][0]["url"].startswith(f"{base}/join/")
        redeemed = http.post(f"/api/v1/invites/{invites.json()['invites'][0]['code']}/redeem").json()
        headers = {"Authorization": f"Bearer {redeemed['token']}"}
        session = http.post("/api/v1/sessions", json={"consent": {"agree": True, "camera": True}}, headers=headers)
        session_id = session.json()["session_id"]

        ws_url = f"ws://127.0.0.1:{base.rsplit(':', 1)[1]}/api/v1/sessions/{session_id}/converse"
        with connect(f"{ws_url}?token={redeemed['token']}") as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "ready"
        with connect(ws_url) as ws:
            ws.send(json.dumps({"type": "auth", "token": redeemed["token"]}))
            assert json.loads(ws.recv(timeout=10))["type"] == "ready"
            ws.send(json.dumps({"type": "user_message", "text": "Hello from a real socket"}))
            while json.loads(ws.recv(timeout=10))["type"] != "message":
                pass
            ws.send(json.dumps({"type": "user_message", "text": "Bye"}))
            assert json.loads(ws.recv(timeout=10))["type"] == "accepted"
        # The browser dropped mid-reply: the gateway lets chat finish and record it.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            entries = http.get(f"/api/v1/sessions/{session_id}/transcript", headers=headers).json()["entries"]
            if len(entries) == 4:
                break
            time.sleep(0.1)
        assert [e["kind"] for e in entries] == ["user_message", "assistant_message"] * 2

        metrics = httpx.get(f"http://127.0.0.1:{gateway_process.metrics_port}/metrics").text
        assert "emili_gateway_websocket_messages_total" in metrics
        assert http.get("/metrics").status_code == 404  # Not on the participants' port.
    process.send_signal(signal.SIGTERM)
    # uvicorn drains, then re-raises the signal so that the exit status says why the process ended.
    assert process.wait(30) in (0, -signal.SIGTERM), log.read_text()
    text = log.read_text()
    assert "Application shutdown complete" in text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert any("converse?token=[redacted]" in line["msg"] for line in lines)
    assert redeemed["token"] not in text  # Tokens never reach the log.
