"""The gateway's REST API against real Redis, S3 and chat (scripted model): every endpoint and its errors."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import uuid
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from emili.chat.v1 import chat_pb2, chat_pb2_grpc
from emili_core.grpc_client import make_channel
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import S3Settings
from emili_gateway.models import DEFAULT_CURRENT_FEELINGS, DEFAULT_DESIRED_FEELINGS
from emili_testing.plugin import token

from .conftest import (
    JPEG_FACE,
    JPEG_NO_FACE,
    Joined,
    MakeClient,
    Servers,
    admin_headers,
    bearer,
    create_invite,
    create_study,
    gateway_settings,
    join,
    register_model_version,
    start_session,
    study_spec,
    unused_target,
)

pytestmark = pytest.mark.integration


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and body["detail"], body
    return dict(body)


def converse_once(client: TestClient, joined: Joined, session_id: str, text: str) -> str:
    with client.websocket_connect(f"/api/v1/sessions/{session_id}/converse?token={joined.token}") as ws:
        assert ws.receive_json()["type"] == "ready"
        ws.send_json({"type": "user_message", "text": text, "client_time_ms": 1})
        while (message := ws.receive_json())["type"] != "message":
            assert message["type"] in {"accepted", "delta", "readout"}, message
        return str(message["text"])


# --- health, docs, web app ----------------------------------------------------------------------------------


def test_health_ready_docs_and_web_app(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"redis": "ok", "s3": "ok", "chat": "ok"}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert "/api/v1/studies" in paths and "/api/v1/invites/{code}/redeem" in paths
    for page in ("/", "/join/abcdefgh1234", "/withdraw"):
        html = client.get(page)
        assert html.status_code == 200 and "text/html" in html.headers["content-type"]
        for element in ('id="consent-camera"', 'id="face-status"', 'id="chat-input"', 'id="send"'):
            assert element in html.text
        for element in ('id="post-survey-submit"', 'id="rating-submit"', 'id="withdraw-code"'):
            assert element in html.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200


def test_readyz_names_what_is_down(
    make_client: MakeClient, redis_url: str, s3_settings: S3Settings, servers: Servers
) -> None:
    settings = gateway_settings(redis_url, s3_settings, servers)
    settings.gateway.chat_target = unused_target()
    client = make_client(settings)
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["down"] == ["chat"] and "UNAVAILABLE" in body["checks"]["chat"]


def test_unknown_route_and_method_are_json_errors(client: TestClient) -> None:
    assert error_of(client.get("/api/v1/nothing"), 404)["error"] == "not_found"
    assert error_of(client.put("/api/v1/studies"), 405)["error"] == "method_not_allowed"


# --- studies ------------------------------------------------------------------------------------------------


def test_create_list_and_get_studies(client: TestClient) -> None:
    study = create_study(client, name="Feelings pilot", show_readouts=True)
    assert study["study_id"].startswith("st-") and study["created_by"] == "researcher-1"
    assert study["current_feelings"] == list(DEFAULT_CURRENT_FEELINGS)
    assert study["desired_feelings"] == list(DEFAULT_DESIRED_FEELINGS)
    listed = client.get("/api/v1/studies", headers=admin_headers()).json()["studies"]
    assert study["study_id"] in [s["study_id"] for s in listed]
    got = client.get(f"/api/v1/studies/{study['study_id']}", headers=admin_headers())
    assert got.json() == study
    assert (
        "not exist" in error_of(client.get("/api/v1/studies/st-000000000000", headers=admin_headers()), 404)["detail"]
    )
    assert error_of(client.get("/api/v1/studies/nonsense", headers=admin_headers()), 404)


def test_study_is_durable_in_object_storage(client: TestClient, object_store: ObjectStore) -> None:
    study = create_study(client)
    stored = object_store.get_json(Bucket.SESSIONS, f"studies/{study['study_id']}/study.json")
    assert stored == study


def test_studies_need_an_admin_token(client: TestClient) -> None:
    assert error_of(client.get("/api/v1/studies"), 401)["error"] == "unauthenticated"
    assert error_of(client.get("/api/v1/studies", headers=bearer("not-a-token")), 401)
    wrong_secret = token(["admin"], "x", secret="another-secret-0123456789abcdef0123456789")
    assert error_of(client.get("/api/v1/studies", headers=bearer(wrong_secret)), 401)
    participant = bearer(token(["chat"], "someone"))
    assert "admin" in error_of(client.post("/api/v1/studies", json=study_spec(), headers=participant), 403)["detail"]


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"arms": []}, "arms"),
        ({"arms": [{"arm": "base"}, {"arm": "base"}]}, "arms must not repeat"),
        ({"arms": [{"arm": "../etc"}]}, "arms.0.arm"),
        ({"arms": [{"arm": "base", "weight": 0}]}, "weight"),
        ({"max_turns": None}, "max_turns or time_limit_seconds"),
        ({"current_feelings": ["Happy", "happy"]}, "current_feelings must not repeat"),
        ({"consent_text": ""}, "consent_text"),
        ({"surprise": 1}, "surprise"),
        ({"arms": [{"arm": "v-not-registered"}]}, "registered model version"),
    ],
)
def test_invalid_studies_are_refused_with_the_field(client: TestClient, changes: dict[str, Any], fragment: str) -> None:
    response = client.post("/api/v1/studies", json=study_spec(**changes), headers=admin_headers())
    assert fragment in error_of(response, 400)["detail"]


def test_malformed_json_is_a_400(client: TestClient) -> None:
    response = client.post(
        "/api/v1/studies", content=b"{not json", headers={**admin_headers(), "Content-Type": "application/json"}
    )
    assert error_of(response, 400)["error"] == "invalid_input"


# --- invites ------------------------------------------------------------------------------------------------


def test_invites_redeem_to_a_participant_token_without_revealing_arms(client: TestClient) -> None:
    study = create_study(client)
    response = client.post(
        f"/api/v1/studies/{study['study_id']}/invites", json={"count": 3, "max_uses": 2}, headers=admin_headers()
    )
    invites = response.json()["invites"]
    assert len(invites) == 3 and all(i["url"].endswith(f"/join/{i['code']}") for i in invites)
    redeemed = client.post(f"/api/v1/invites/{invites[0]['code']}/redeem")
    assert redeemed.status_code == 200, redeemed.text
    body = redeemed.json()
    assert body["participant_id"].startswith("p-") and len(body["withdraw_code"]) == 19
    assert "arms" not in body["study"] and "base" not in json.dumps(body["study"])
    assert body["study"]["rating_questions"][0]["question"].endswith("did the responses show understanding?")
    me = client.get("/api/v1/me", headers=bearer(body["token"])).json()
    assert me["participant_id"] == body["participant_id"] and me["sessions"] == []
    listed = client.get(f"/api/v1/studies/{study['study_id']}/invites", headers=admin_headers()).json()["invites"]
    assert {i["code"]: i["uses"] for i in listed}[invites[0]["code"]] == 1


def test_used_up_and_unknown_invites_say_what_to_do(client: TestClient) -> None:
    study = create_study(client)
    code = create_invite(client, study["study_id"])
    assert client.post(f"/api/v1/invites/{code}/redeem").status_code == 200
    used = error_of(client.post(f"/api/v1/invites/{code}/redeem"), 409)
    assert "already been used once" in used["detail"] and "new link" in used["detail"]
    shared = create_invite(client, study["study_id"], max_uses=2)
    for _ in range(2):
        assert client.post(f"/api/v1/invites/{shared}/redeem").status_code == 200
    assert "2 times" in error_of(client.post(f"/api/v1/invites/{shared}/redeem"), 409)["detail"]
    assert "does not exist" in error_of(client.post("/api/v1/invites/unknown-code-123/redeem"), 404)["detail"]
    assert error_of(client.post("/api/v1/invites/x/redeem"), 404)


def test_expired_invite_is_gone(client: TestClient, redis_url: str) -> None:
    study = create_study(client)
    code = create_invite(client, study["study_id"], expires_in_seconds=60)
    redis.Redis.from_url(redis_url).hset(f"emili:gateway:invite:{code}", "expires_ms", 1_000_000)
    body = error_of(client.post(f"/api/v1/invites/{code}/redeem"), 410)
    assert body["error"] == "gone" and "expired on 1970-01-01" in body["detail"]


# --- sessions -----------------------------------------------------------------------------------------------


def test_consent_rules(client: TestClient) -> None:
    study = create_study(client, without_camera="stop")
    joined = join(client, study["study_id"])

    def create(**consent: Any) -> Any:
        body = {"agree": True} | consent
        return client.post("/api/v1/sessions", json={"consent": body}, headers=joined.headers)

    assert "nothing has been stored" in error_of(create(agree=False, camera=True), 400)["detail"]
    assert "store_frames needs camera" in error_of(create(camera=False, store_frames=True), 400)["detail"]
    assert "needs your camera" in error_of(create(camera=False), 409)["detail"]
    assert error_of(client.post("/api/v1/sessions", json={}, headers=joined.headers), 400)
    created = create(camera=True, store_frames=True)
    assert created.status_code == 201, created.text
    view = created.json()
    assert view["camera"] and view["store_frames"] and not view["use_for_training"] and view["max_turns"] == 3
    assert "arm" not in view
    again = error_of(create(camera=True), 409)
    assert "already started" in again["detail"]


def test_without_camera_the_study_can_go_on(client: TestClient) -> None:
    study = create_study(client)
    joined = join(client, study["study_id"])
    session_id = start_session(client, joined, camera=False)
    assert client.get(f"/api/v1/sessions/{session_id}", headers=joined.headers).json()["camera"] is False


def test_a_plain_chat_token_is_not_a_participant(client: TestClient) -> None:
    response = client.post("/api/v1/sessions", json={"consent": {"agree": True}}, headers=bearer(token(["chat"])))
    assert "invite link" in error_of(response, 403)["detail"]
    assert error_of(client.get("/api/v1/me", headers=bearer(token(["fer"]))), 403)


def test_survey_rating_end_and_transcript(client: TestClient) -> None:
    study = create_study(client, current_feelings=["Tired", "Calm"])
    joined = join(client, study["study_id"])
    session_id = start_session(client, joined)
    base = f"/api/v1/sessions/{session_id}"

    bad = client.post(f"{base}/pre-survey", json={"current_feelings": ["Elated"], "text": "ok"}, headers=joined.headers)
    detail = error_of(bad, 400)["detail"]
    assert "Elated" in detail and "Tired" in detail
    bad = client.post(f"{base}/pre-survey", json={"desired_feelings": ["Tired"]}, headers=joined.headers)
    assert "desired feelings" in error_of(bad, 400)["detail"]
    ok = client.post(
        f"{base}/pre-survey",
        json={"current_feelings": ["tired"], "desired_feelings": ["Proud"], "text": "Long week."},
        headers=joined.headers,
    )
    assert ok.json() == {"ok": True}

    assert converse_once(client, joined, session_id, "I had a long week.").strip()
    transcript = client.get(f"{base}/transcript", headers=joined.headers).json()
    kinds = [e["kind"] for e in transcript["entries"]]
    assert kinds == ["user_message", "assistant_message"]  # No readouts: this study does not show them.
    assert "scripted" not in json.dumps(transcript)

    post = client.post(
        f"{base}/post-survey", json={"current_feelings": ["Calm"], "text": "Better."}, headers=joined.headers
    )
    assert post.status_code == 200, post.text
    assert error_of(
        client.post(f"{base}/rating", json={"empathy": 6, "relevance": 3, "fluency": 3}, headers=joined.headers), 400
    )
    assert error_of(client.post(f"{base}/rating", json={"empathy": 4}, headers=joined.headers), 400)
    rated = client.post(
        f"{base}/rating", json={"empathy": 4, "relevance": 5, "fluency": 3, "comment": "Kind."}, headers=joined.headers
    )
    assert rated.status_code == 200, rated.text
    ended = client.post(f"{base}/end", headers=joined.headers)
    assert ended.json()["state"] == "ended" and ended.json()["rated"] and ended.json()["turns"] == 1
    assert client.post(f"{base}/end", headers=joined.headers).json()["state"] == "ended"
    late = client.post(f"{base}/pre-survey", json={"text": "again"}, headers=joined.headers)
    assert "ended" in error_of(late, 409)["detail"]


def test_text_limits(make_client: MakeClient) -> None:
    client = make_client(max_survey_chars=20, max_comment_chars=5)
    study = create_study(client)
    joined = join(client, study["study_id"])
    session_id = start_session(client, joined)
    base = f"/api/v1/sessions/{session_id}"
    long_text = client.post(f"{base}/pre-survey", json={"text": "x" * 21}, headers=joined.headers)
    assert "under 20" in error_of(long_text, 400)["detail"]
    long_comment = client.post(
        f"{base}/rating", json={"empathy": 1, "relevance": 1, "fluency": 1, "comment": "abcdef"}, headers=joined.headers
    )
    assert "under 5" in error_of(long_comment, 400)["detail"]


def test_another_participants_session_is_forbidden(client: TestClient) -> None:
    study = create_study(client)
    owner, other = join(client, study["study_id"]), join(client, study["study_id"])
    session_id = start_session(client, owner)
    base = f"/api/v1/sessions/{session_id}"
    rating = {"empathy": 3, "relevance": 3, "fluency": 3}
    for response in (
        client.get(base, headers=other.headers),
        client.post(f"{base}/pre-survey", json={"text": "hi"}, headers=other.headers),
        client.post(f"{base}/post-survey", json={"text": "hi"}, headers=other.headers),
        client.post(f"{base}/rating", json=rating, headers=other.headers),
        client.post(f"{base}/end", headers=other.headers),
        client.get(f"{base}/transcript", headers=other.headers),
    ):
        assert "another participant" in error_of(response, 403)["detail"]
    assert error_of(client.get("/api/v1/sessions/no-such-session", headers=owner.headers), 404)


def test_arms_are_balanced_by_weight_and_given_to_chat(
    client: TestClient, object_store: ObjectStore, servers: Servers
) -> None:
    register_model_version(object_store, "v-gw-1")
    study = create_study(client, arms=[{"arm": "base", "weight": 1}, {"arm": "v-gw-1", "weight": 2}])
    sessions = []
    for _ in range(9):
        joined = join(client, study["study_id"])
        sessions.append((joined, start_session(client, joined)))
    progress = client.get(f"/api/v1/studies/{study['study_id']}/progress", headers=admin_headers()).json()
    by_arm = {a["arm"]: a for a in progress["arms"]}
    assert by_arm["base"]["assigned"] == 3 and by_arm["v-gw-1"]["assigned"] == 6
    assert by_arm["base"]["active"] == 3 and by_arm["v-gw-1"]["active"] == 6
    assert progress["participants"] == 9 and progress["sessions"] == 9 and progress["invite_uses"] == 9

    rows = [
        json.loads(line)
        for line in client.get(f"/api/v1/studies/{study['study_id']}/export", headers=admin_headers()).text.splitlines()
    ]
    arm_of = {r["session_id"]: r["arm"] for r in rows}

    async def chat_arms() -> dict[str, str]:
        async with make_channel(servers.chat_target, token(["admin"], "auditor")) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            result = {}
            for _, session_id in sessions:
                reply = await stub.GetTranscript(chat_pb2.GetTranscriptRequest(session_id=session_id))
                result[session_id] = reply.session.model_arm
            return result

    assert asyncio.run(chat_arms()) == arm_of


def test_chat_down_is_a_503_and_releases_the_session_start(
    make_client: MakeClient, redis_url: str, s3_settings: S3Settings, servers: Servers
) -> None:
    working = make_client()
    study = create_study(working)
    joined = join(working, study["study_id"])
    settings = gateway_settings(redis_url, s3_settings, servers)
    settings.gateway.chat_target = unused_target()
    broken = make_client(settings)
    body = error_of(broken.post("/api/v1/sessions", json={"consent": {"agree": True}}, headers=joined.headers), 503)
    assert body["error"] == "unavailable" and "try again" in body["detail"]
    assert start_session(working, joined)  # The failed attempt did not use up the participant's one session.


# --- camera check -------------------------------------------------------------------------------------------


def test_camera_check(make_client: MakeClient, servers: Servers) -> None:
    client = make_client(max_frame_bytes=4096, camera_checks_per_minute=3)
    study = create_study(client)
    joined = join(client, study["study_id"])
    jpeg = {**joined.headers, "Content-Type": "image/jpeg"}
    assert client.post("/api/v1/camera-check", content=JPEG_FACE, headers=jpeg).json() == {"face_found": True}
    assert client.post("/api/v1/camera-check", content=JPEG_NO_FACE, headers=jpeg).json() == {"face_found": False}
    assert "JPEG" in error_of(client.post("/api/v1/camera-check", content=b"GIF89a", headers=jpeg), 400)["detail"]
    too_big = JPEG_FACE + b"x" * 5000
    assert (
        error_of(client.post("/api/v1/camera-check", content=too_big, headers=jpeg), 413)["error"]
        == "payload_too_large"
    )
    limited = client.post("/api/v1/camera-check", content=JPEG_FACE, headers=jpeg)
    assert error_of(limited, 429)["error"] == "rate_limited" and int(limited.headers["Retry-After"]) >= 1
    assert error_of(client.post("/api/v1/camera-check", content=JPEG_FACE), 401)


def test_fer_down_is_a_503(make_client: MakeClient, redis_url: str, s3_settings: S3Settings, servers: Servers) -> None:
    settings = gateway_settings(redis_url, s3_settings, servers)
    settings.gateway.fer_target = unused_target()
    client = make_client(settings)
    study = create_study(client)
    joined = join(client, study["study_id"])
    response = client.post("/api/v1/camera-check", content=JPEG_FACE, headers=joined.headers)
    assert "face recognition" in error_of(response, 503)["detail"]


# --- limits -------------------------------------------------------------------------------------------------


def test_request_bodies_over_the_limit_are_413(make_client: MakeClient) -> None:
    client = make_client(max_body_bytes=4096)
    body = json.dumps(study_spec(consent_text="x" * 5000)).encode()
    response = client.post(
        "/api/v1/studies", content=body, headers={**admin_headers(), "Content-Type": "application/json"}
    )
    assert error_of(response, 413)["error"] == "payload_too_large"

    def chunks() -> Any:
        yield body[:3000]
        yield body[3000:]

    streamed = client.post(
        "/api/v1/studies", content=chunks(), headers={**admin_headers(), "Content-Type": "application/json"}
    )
    assert error_of(streamed, 413)


def test_participant_requests_are_rate_limited(make_client: MakeClient) -> None:
    client = make_client(requests_per_minute=3)
    study = create_study(client)
    joined = join(client, study["study_id"])
    for _ in range(3):
        assert client.get("/api/v1/me", headers=joined.headers).status_code == 200
    response = client.get("/api/v1/me", headers=joined.headers)
    assert "at most 3 per 60 s" in error_of(response, 429)["detail"]
    assert response.headers["Retry-After"]


def test_redeeming_is_rate_limited_per_address(
    make_client: MakeClient, redis_url: str, s3_settings: S3Settings, servers: Servers
) -> None:
    settings = gateway_settings(redis_url, s3_settings, servers, redeem_per_minute=2)
    # Its own Redis prefix, so that other tests' redemptions from the same test address do not count.
    settings.gateway.studies.redis_prefix = f"emili:gwtest:{uuid.uuid4().hex[:8]}"
    client = make_client(settings)
    study = create_study(client)
    for _ in range(2):
        assert error_of(client.post("/api/v1/invites/guess-guess-guess/redeem"), 404)
    limited = client.post(f"/api/v1/invites/{create_invite(client, study['study_id'])}/redeem")
    assert "invite attempts" in error_of(limited, 429)["detail"]


# --- researchers --------------------------------------------------------------------------------------------


def finish_session(client: TestClient, joined: Joined, session_id: str, comment: str = "") -> None:
    base = f"/api/v1/sessions/{session_id}"
    assert (
        client.post(
            f"{base}/pre-survey", json={"current_feelings": ["Sad"], "text": "Low."}, headers=joined.headers
        ).status_code
        == 200
    )
    converse_once(client, joined, session_id, "Hello EMILI")
    assert (
        client.post(
            f"{base}/post-survey", json={"current_feelings": ["Happy"], "text": "Good."}, headers=joined.headers
        ).status_code
        == 200
    )
    rating = {"empathy": 5, "relevance": 4, "fluency": 3, "comment": comment}
    assert client.post(f"{base}/rating", json=rating, headers=joined.headers).status_code == 200
    assert client.post(f"{base}/end", headers=joined.headers).status_code == 200


def test_progress_and_export(client: TestClient) -> None:
    study = create_study(client)
    study_id = study["study_id"]
    done = join(client, study_id)
    done_session = start_session(client, done, store_frames=True)
    finish_session(client, done, done_session, comment='=HYPERLINK("x")')
    started = join(client, study_id)
    start_session(client, started, camera=False, use_for_training=False)

    progress = client.get(f"/api/v1/studies/{study_id}/progress", headers=admin_headers()).json()
    assert progress["arms"] == [
        {"arm": "base", "weight": 1.0, "assigned": 2, "active": 1, "completed": 1, "abandoned": 0, "withdrawn": 0}
    ]

    jsonl = client.get(f"/api/v1/studies/{study_id}/export", headers=admin_headers())
    assert jsonl.headers["content-type"].startswith("application/x-ndjson")
    rows = {r["session_id"]: r for r in map(json.loads, jsonl.text.splitlines())}
    row = rows[done_session]
    assert row["arm"] == "base" and row["model_ids"] == ["scripted"] and row["participant_id"] == done.participant_id
    assert row["synthetic"] is False
    assert row["consent"] == {"camera": True, "store_frames": True, "use_for_training": True}
    assert row["pre_survey"]["current_feelings"] == ["Sad"] and row["post_survey"]["text"] == "Good."
    assert row["rating"]["empathy"] == 5 and row["turns"] == 1
    assert [t["kind"] for t in row["transcript"]] == ["readout_injected", "user_message", "assistant_message"]

    exported = client.get(f"/api/v1/studies/{study_id}/export?format=csv", headers=admin_headers())
    assert exported.headers["content-type"].startswith("text/csv")
    table = {r["session_id"]: r for r in csv.DictReader(io.StringIO(exported.text))}
    assert table[done_session]["empathy"] == "5" and table[done_session]["pre_current_feelings"] == "Sad"
    assert table[done_session]["comment"].startswith("'=")  # Not a formula in a spreadsheet.
    assert json.loads(table[done_session]["transcript_json"])[1]["text"] == "Hello EMILI"
    assert error_of(client.get(f"/api/v1/studies/{study_id}/export?format=xml", headers=admin_headers()), 400)
    assert error_of(client.get(f"/api/v1/studies/{study_id}/export", headers=done.headers), 403)


def test_a_synthetic_study_says_so_and_marks_its_sessions(client: TestClient) -> None:
    """Simulated participants' studies: participants are told, and every session is recorded as synthetic (chat
    is asked for it: tests/test_gateway_participant.py checks chat's record)."""
    study = create_study(client, synthetic=True)
    assert study["synthetic"] is True
    assert create_study(client)["synthetic"] is False
    joined = join(client, study["study_id"])
    assert joined.study["synthetic"] is True
    session_id = start_session(client, joined)
    exported = client.get(f"/api/v1/studies/{study['study_id']}/export", headers=admin_headers())
    assert [json.loads(line)["synthetic"] for line in exported.text.splitlines()] == [True]
    table = client.get(f"/api/v1/studies/{study['study_id']}/export?format=csv", headers=admin_headers())
    rows = [r for r in csv.DictReader(io.StringIO(table.text)) if r["session_id"] == session_id]
    assert [r["synthetic"] for r in rows] == ["True"]


def test_withdrawal(client: TestClient, object_store: ObjectStore) -> None:
    study = create_study(client)
    joined = join(client, study["study_id"])
    session_id = start_session(client, joined)
    unknown = error_of(client.post("/api/v1/withdraw", json={"withdraw_code": "AAAA-BBBB-CCCC-DDDD"}), 404)
    assert "not known" in unknown["detail"]
    # Codes are read forgivingly: lower case, without dashes.
    code = joined.withdraw_code.lower().replace("-", " ")
    response = client.post("/api/v1/withdraw", json={"withdraw_code": code})
    assert response.status_code == 200, response.text
    assert response.json()["withdrawn"] is True and response.json()["sessions"] == 1
    assert client.post("/api/v1/withdraw", json={"withdraw_code": joined.withdraw_code}).json()["withdrawn"]
    assert "withdrawn" in error_of(client.get("/api/v1/me", headers=joined.headers), 403)["detail"]
    assert client.get(f"/api/v1/studies/{study['study_id']}/export", headers=admin_headers()).text == ""
    progress = client.get(f"/api/v1/studies/{study['study_id']}/progress", headers=admin_headers()).json()
    assert progress["arms"][0]["withdrawn"] == 1
    request = object_store.get_json(
        Bucket.SESSIONS, f"studies/{study['study_id']}/withdrawals/{joined.participant_id}.json"
    )
    assert request["session_ids"] == [session_id] and request["deleted"] is False
    record = object_store.get_json(Bucket.SESSIONS, f"studies/{study['study_id']}/sessions/{session_id}.json")
    assert record["withdrawn"] and record["state"] == "ended"  # Its chat session was ended too.
    # The withdraw page polls the deletion; with no labeler worker here it stays under way (tests/test_withdrawal.py
    # runs it to the end).
    status = client.post("/api/v1/withdraw/status", json={"withdraw_code": joined.withdraw_code})
    assert status.status_code == 200, status.text
    assert status.json()["withdrawn"] and status.json()["sessions"] == 1
    assert status.json()["deleted"] is False and status.json()["removed"] is None
    still_in = join(client, study["study_id"])
    body = {"withdraw_code": still_in.withdraw_code}
    assert "not withdrawn" in error_of(client.post("/api/v1/withdraw/status", json=body), 409)["detail"]
    error_of(client.post("/api/v1/withdraw/status", json={"withdraw_code": "AAAA-BBBB-CCCC-DDDD"}), 404)


def test_metrics_count_routes_sessions_and_websockets(client: TestClient) -> None:
    study = create_study(client)
    joined = join(client, study["study_id"])
    start_session(client, joined)
    text = client.get("/metrics").text
    assert 'emili_gateway_http_requests_total{method="POST",route="/api/v1/sessions",status="201"}' in text
    assert f'emili_gateway_sessions_created_total{{arm="base",study="{study["study_id"]}"}} 1.0' in text
    assert "emili_gateway_websocket_connections" in text
    assert 'route="/api/v1/invites/{code}/redeem"' in text  # The template, not each code.
