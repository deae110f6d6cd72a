"""The conversation WebSocket against a real chat server: messages, frames, limits, blinding and reconnection."""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

from .conftest import (
    JPEG_FACE,
    REPLY,
    Joined,
    MakeClient,
    Servers,
    create_study,
    join,
    start_session,
)

pytestmark = pytest.mark.integration


def url(session_id: str, joined: Joined | None = None) -> str:
    query = f"?token={joined.token}" if joined is not None else ""
    return f"/api/v1/sessions/{session_id}/converse{query}"


def until(ws: WebSocketTestSession, kind: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Messages up to the first of ``kind``: (that message, those before it)."""
    seen = []
    while (message := ws.receive_json())["type"] != kind:
        seen.append(message)
    return message, seen


def close_code(ws: WebSocketTestSession) -> int:
    message = ws.receive()
    while message["type"] == "websocket.send":
        message = ws.receive()
    assert message["type"] == "websocket.close", message
    return int(message["code"])


def participant_with_session(client: TestClient, **study: Any) -> tuple[Joined, str]:
    joined = join(client, create_study(client, **study)["study_id"])
    return joined, start_session(client, joined)


def frame(data: bytes = JPEG_FACE) -> dict[str, Any]:
    return {"type": "frame", "jpeg_b64": base64.b64encode(data).decode(), "capture_time_ms": int(time.time() * 1000)}


def test_a_turn_streams_and_is_blinded(client: TestClient) -> None:
    joined, session_id = participant_with_session(client)
    with client.websocket_connect(url(session_id, joined)) as ws:
        ready = ws.receive_json()
        assert ready == {
            "type": "ready",
            "session_id": session_id,
            "turns": 0,
            "max_turns": 3,
            "seconds_left": None,
            "camera": True,
        }
        ws.send_json({"type": "user_message", "text": "Hi, I am a bit tired.", "client_time_ms": 5})
        message, before = until(ws, "message")
    kinds = [m["type"] for m in before]
    assert kinds[0] == "accepted" and set(kinds[1:]) == {"delta"}  # No readouts: the study does not show them.
    assert "".join(m["text"] for m in before[1:]).strip() == REPLY == message["text"]
    assert set(message) == {"type", "turn_id", "text", "unprompted", "time_ms"}  # No model id, no arm.


def test_token_as_first_message_and_readouts_when_shown(client: TestClient) -> None:
    joined, session_id = participant_with_session(client, show_readouts=True)
    with client.websocket_connect(url(session_id)) as ws:
        ws.send_json({"type": "auth", "token": joined.token})
        assert ws.receive_json()["type"] == "ready"
        ws.send_json({"type": "user_message", "text": "Hello there"})
        _, before = until(ws, "message")
    readouts = [m for m in before if m["type"] == "readout"]
    assert readouts and readouts[0]["text"] == "User is not visible right now."


@pytest.mark.parametrize(
    ("first", "code"),
    [
        ({"type": "auth", "token": "garbage"}, 4401),
        ({"type": "user_message", "text": "no token"}, 4401),
    ],
)
def test_bad_or_missing_token_closes_4401(client: TestClient, first: dict[str, Any], code: int) -> None:
    _, session_id = participant_with_session(client)
    with client.websocket_connect(url(session_id)) as ws:
        ws.send_json(first)
        error = ws.receive_json()
        assert error["type"] == "error" and error["status"] == 401 and error["detail"]
        assert close_code(ws) == code


def test_another_participants_session_closes_4403(client: TestClient) -> None:
    study = create_study(client)
    owner, other = join(client, study["study_id"]), join(client, study["study_id"])
    session_id = start_session(client, owner)
    with client.websocket_connect(url(session_id, other)) as ws:
        error = ws.receive_json()
        assert error["status"] == 403 and "another participant" in error["detail"]
        assert close_code(ws) == 4403


def test_an_ended_session_closes_4409(client: TestClient) -> None:
    joined, session_id = participant_with_session(client)
    assert client.post(f"/api/v1/sessions/{session_id}/end", headers=joined.headers).status_code == 200
    with client.websocket_connect(url(session_id, joined)) as ws:
        assert ws.receive_json()["status"] == 409
        assert close_code(ws) == 4409


def test_bad_messages_are_told_and_the_conversation_goes_on(make_client: MakeClient, servers: Servers) -> None:
    client = make_client(max_frame_bytes=2048, max_message_chars=50)
    joined, session_id = participant_with_session(client)
    streamed = servers.fer.streamed
    with client.websocket_connect(url(session_id, joined)) as ws:
        assert ws.receive_json()["type"] == "ready"
        ws.send_json({"type": "user_message", "text": "x" * 51})
        assert "under 50" in (error := ws.receive_json())["detail"] and error["status"] == 400
        ws.send_json({"type": "user_message", "text": "   "})
        assert ws.receive_json()["status"] == 400
        ws.send_json(frame(JPEG_FACE + b"x" * 3000))
        assert (error := ws.receive_json())["status"] == 413 and error["error"] == "payload_too_large"
        ws.send_json({"type": "frame", "jpeg_b64": "not base64!"})
        assert "base64" in ws.receive_json()["detail"]
        ws.send_json(frame(b"GIF89a"))
        assert "JPEG" in ws.receive_json()["detail"]
        ws.send_text("{not json")
        assert ws.receive_json()["detail"] == "each message must be JSON"
        ws.send_json({"type": "dance"})
        assert ws.receive_json()["status"] == 400
        ws.send_text("x" * 2_000_000)
        assert ws.receive_json()["status"] == 413
        ws.send_json(frame())
        ws.send_json({"type": "user_message", "text": "Still here"})
        message, _ = until(ws, "message")
        assert message["text"] == REPLY
    deadline = time.monotonic() + 5
    while servers.fer.streamed == streamed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert servers.fer.streamed > streamed  # The good frame reached FER through chat.


def test_frames_need_camera_consent(client: TestClient) -> None:
    joined = join(client, create_study(client)["study_id"])
    session_id = start_session(client, joined, camera=False)
    with client.websocket_connect(url(session_id, joined)) as ws:
        assert ws.receive_json()["camera"] is False
        ws.send_json(frame())
        error = ws.receive_json()
        assert error["status"] == 403 and "camera is off" in error["detail"]


def test_frame_and_message_rates_are_limited(make_client: MakeClient) -> None:
    client = make_client(frames_per_second=1.0, messages_per_minute=1)
    joined, session_id = participant_with_session(client)
    with client.websocket_connect(url(session_id, joined)) as ws:
        assert ws.receive_json()["type"] == "ready"
        ws.send_json(frame())
        ws.send_json(frame())
        error = ws.receive_json()
        assert error["status"] == 429 and "frames are limited to 1 per second" in error["detail"]
        ws.send_json({"type": "user_message", "text": "one"})
        until(ws, "message")
        ws.send_json({"type": "user_message", "text": "two"})
        error, _ = until(ws, "error")
        assert error["status"] == 429 and "messages" in error["detail"]


def test_turn_limit(client: TestClient) -> None:
    joined, session_id = participant_with_session(client, max_turns=2)
    with client.websocket_connect(url(session_id, joined)) as ws:
        assert ws.receive_json()["type"] == "ready"
        ws.send_json({"type": "user_message", "text": "first"})
        until(ws, "message")
        ws.send_json({"type": "user_message", "text": "second"})
        until(ws, "message")
        limit = ws.receive_json()
        assert limit["type"] == "limit" and limit["reason"] == "turns" and "survey" in limit["detail"]
        ws.send_json({"type": "user_message", "text": "third"})
        error = ws.receive_json()
        assert error["status"] == 409 and "reached its 2 messages" in error["detail"]
    with client.websocket_connect(url(session_id, joined)) as ws:
        assert ws.receive_json()["turns"] == 2
        assert ws.receive_json()["type"] == "limit"


def test_time_limit(client: TestClient, redis_url: str) -> None:
    joined, session_id = participant_with_session(client, max_turns=None, time_limit_seconds=30)
    # As if the session had started 29.5 s ago.
    started = int(time.time() * 1000) - 29_500
    redis.Redis.from_url(redis_url).hset(f"emili:gateway:session:{session_id}", "created_ms", started)
    with client.websocket_connect(url(session_id, joined)) as ws:
        ready = ws.receive_json()
        assert ready["seconds_left"] == 0 and ready["max_turns"] is None
        limit = ws.receive_json()
        assert limit["type"] == "limit" and limit["reason"] == "time"
        ws.send_json({"type": "user_message", "text": "too late"})
        assert "time" in ws.receive_json()["detail"]


def test_reconnect_continues_the_session_with_its_context(client: TestClient, servers: Servers) -> None:
    joined, session_id = participant_with_session(client)
    with client.websocket_connect(url(session_id, joined)) as ws:
        ws.receive_json()
        ws.send_json({"type": "user_message", "text": f"My cat is called Biscuit {session_id}"})
        until(ws, "message")
    with client.websocket_connect(url(session_id, joined)) as ws:
        assert ws.receive_json()["turns"] == 1
        ws.send_json({"type": "user_message", "text": f"Do you remember my cat? {session_id}"})
        until(ws, "message")
    asked = [call for call in servers.backend.calls if any(session_id in m.content for m in call[0])]
    assert any(f"Biscuit {session_id}" in m.content for m in asked[-1][0])  # Chat rebuilt the context.
    transcript = client.get(f"/api/v1/sessions/{session_id}/transcript", headers=joined.headers).json()
    assert [e["kind"] for e in transcript["entries"]].count("assistant_message") == 2


def test_a_reply_under_way_is_recorded_after_the_browser_leaves(client: TestClient) -> None:
    joined, session_id = participant_with_session(client)
    with client.websocket_connect(url(session_id, joined)) as ws:
        ws.receive_json()
        ws.send_json({"type": "user_message", "text": "I have to go now"})
        assert ws.receive_json()["type"] == "accepted"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        entries = client.get(f"/api/v1/sessions/{session_id}/transcript", headers=joined.headers).json()["entries"]
        if [e["kind"] for e in entries] == ["user_message", "assistant_message"]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the reply was not recorded: {entries}")


def test_messages_after_the_session_ended_are_refused(client: TestClient) -> None:
    joined, session_id = participant_with_session(client)
    with client.websocket_connect(url(session_id, joined)) as ws:
        assert ws.receive_json()["type"] == "ready"
        assert client.post(f"/api/v1/sessions/{session_id}/end", headers=joined.headers).status_code == 200
        ws.send_json({"type": "user_message", "text": "are you there?"})
        error = ws.receive_json()
        assert error["status"] == 409 and "ended" in error["detail"]


def test_a_newer_connection_replaces_an_older_one(client: TestClient) -> None:
    joined, session_id = participant_with_session(client)
    with client.websocket_connect(url(session_id, joined)) as old:
        assert old.receive_json()["type"] == "ready"
        with client.websocket_connect(url(session_id, joined)) as new:
            assert new.receive_json()["type"] == "ready"
            with pytest.raises(WebSocketDisconnect) as closed:
                old.receive_json()
            assert closed.value.code == 4409
            new.send_json({"type": "user_message", "text": "still works"})
            assert until(new, "message")[0]["text"] == REPLY
