"""Delete-my-data end to end: a participant withdraws through the gateway, and nothing of their session is left.

Real Redis and S3, a real chat gRPC server (scripted model), the gateway, a chat worker and a labeler worker as
their own processes. The participant's session has stored frames, a persisted record, a label, a place in an SFT
dataset and in the per-user weights; after the withdrawal no Redis key or value and no object key names the session
except its tombstone (the audit records name it inside), none of its words are in any object, the dataset is
marked withdrawn (the trainer refuses it) and rebuilt without it, and the withdraw page's status says what went.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from celery import Celery

from emili.chat.v1 import chat_pb2, chat_pb2_grpc
from emili_chat.main import build_app as build_chat
from emili_chat.settings import ChatSettings
from emili_chat.store import SessionStore
from emili_core.errors import FailedPrecondition
from emili_core.grpc_client import make_channel
from emili_core.grpc_server import RunningServer, start_server
from emili_core.keys import (
    DELETION_AUDIT_PREFIX,
    frame_key,
    model_registry_key,
    session_record_keys,
    session_tombstone_key,
)
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.records import dataset_manifest, dataset_withdrawal
from emili_core.settings import CommonSettings
from emili_core.tasks import create_celery_app
from emili_session.events import (
    AssistantMessage,
    FerReading,
    FrameStored,
    PostSurvey,
    PreSurvey,
    UserMessage,
)
from emili_session.registry import model_withdrawal
from emili_testing.chat import ScriptedBackend
from emili_testing.plugin import EntryPointProcess, Stack, free_port, token
from emili_testing.traces import objects_naming, redis_mentions
from emili_trainer.jobs import check_not_withdrawn

pytestmark = [pytest.mark.integration, pytest.mark.slow]
HAPPY = {"angry": 0.0, "disgust": 0.0, "fear": 0.0, "happy": 0.9, "sad": 0.0, "surprise": 0.0, "neutral": 0.1}
NEUTRAL = {"angry": 0.0, "disgust": 0.0, "fear": 0.0, "happy": 0.1, "sad": 0.1, "surprise": 0.0, "neutral": 0.8}
SECRET_WORDS = "my hamster Biscuit ran away"  # Only in the withdrawing participant's conversation.


def admin() -> dict[str, str]:
    """Minted when used: tokens live ten minutes, and a full test run can reach this test later than that."""
    return {"Authorization": f"Bearer {token(['admin'], 'researcher-1')}"}


@pytest.fixture
async def chat_server(stack: Stack, stack_env: dict[str, str], tmp_path: Path) -> AsyncIterator[RunningServer]:
    settings = ChatSettings(artifacts_dir=tmp_path)
    options = settings.chat.model_copy(
        update={
            "server": settings.chat.server.model_copy(update={"grpc_port": 0, "metrics_port": 0}),
            "fer_target": f"127.0.0.1:{free_port()}",
        }
    )
    settings = settings.model_copy(update={"chat": options})
    backend = ScriptedBackend("Oh no. How are you holding up?")
    server = await start_server(build_chat(settings, backend), settings, options.server)
    await asyncio.wait_for(server.ready.wait(), 60)
    yield server
    await server.stop()


@pytest.fixture
def workers(stack: Stack, tmp_path: Path) -> Iterator[list[EntryPointProcess]]:
    env = {**os.environ, **stack.env()}
    chat = EntryPointProcess(
        "emili-chat-worker", {**env, "EMILI_CHAT__WORKER__METRICS_PORT": "0"}, tmp_path / "chat-worker.log"
    )
    labeler = EntryPointProcess(
        "emili-labeler-worker",
        # The lexicon alone (no embedding model): quick to start, and labels do not depend on it here.
        {**env, "EMILI_LABELER__WORKER__METRICS_PORT": "0", "EMILI_LABELER__OOV_METHOD": "none"},
        tmp_path / "labeler-worker.log",
    )
    processes = [chat, labeler]
    yield processes
    for process in processes:
        process.stop()


@pytest.fixture
def gateway(stack: Stack, chat_server: RunningServer, tmp_path: Path) -> Iterator[tuple[str, EntryPointProcess]]:
    port = free_port()
    env = {
        **os.environ,
        **stack.env(),
        "EMILI_GATEWAY__SERVER__HTTP_PORT": str(port),
        "EMILI_GATEWAY__SERVER__METRICS_PORT": str(free_port()),
        "EMILI_GATEWAY__CHAT_TARGET": f"127.0.0.1:{chat_server.port}",
        "EMILI_GATEWAY__FER_TARGET": f"127.0.0.1:{free_port()}",
        "EMILI_GATEWAY__WITHDRAWALS__LABELER_TIMEOUT_SECONDS": "120",
    }
    process = EntryPointProcess("emili-gateway-server", env, tmp_path / "gateway.log")
    yield f"http://127.0.0.1:{port}", process
    process.stop()


@pytest.fixture
def producer(stack_env: dict[str, str]) -> Iterator[Celery]:
    app = create_celery_app("tests", CommonSettings())
    yield app
    app.close()


async def until(what: str, check: Any, seconds: float, *logs: EntryPointProcess) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.log.name}\n{p.tail()}" for p in logs)
            pytest.fail(f"{what} did not happen in {seconds} s\n{tails}")
        await asyncio.sleep(0.3)


async def record_conversation(redis_url: str, store: ObjectStore, session_id: str, words: str) -> None:
    """What a conversation with the camera on records (as chat's store writes it): stored frames, face readings, a
    message and the reply the user smiles at, the surveys."""
    client = aioredis.Redis.from_url(redis_url)
    events = SessionStore(client)
    base = int(time.time() * 1000)

    def reading(at: int, probabilities: dict[str, float]) -> FerReading:
        return FerReading(capture_time_ms=at, face_found=True, probabilities=probabilities, source="client")

    await events.record(session_id, PreSurvey(("Sad",), (), "I feel sad and tired."), base + 100)
    for at in (base + 500, base + 2500):
        key = frame_key(session_id, at)
        store.put_bytes(Bucket.FRAMES, key, b"\xff\xd8\xff a face", "image/jpeg")
        await events.record(session_id, FrameStored(key=key, capture_time_ms=at), at)
    await events.record(session_id, reading(base + 900, NEUTRAL), base + 900)
    await events.record(session_id, UserMessage(text=words), base + 1000)
    reply = AssistantMessage(text="Oh no. How are you holding up?", turn_id="t1", model_id="scripted")
    await events.record(session_id, reply, base + 3000)
    await events.record(session_id, reading(base + 3500, HAPPY), base + 3500)
    await events.record(session_id, PostSurvey(("Happy",), (), "I feel happy and calm."), base + 20000)
    await client.aclose()


def objects_containing(store: ObjectStore, words: str) -> list[str]:
    return sorted(
        f"{b.value}/{k}"
        for b in Bucket
        for k in store.list_keys(b, "")
        if not k.endswith((".npy", ".jpg", ".csv")) and words.encode() in store.get_bytes(b, k, 512 * 1024 * 1024)
    )


async def test_a_withdrawn_participants_data_are_deleted_everywhere(
    stack: Stack,
    object_store: ObjectStore,
    chat_server: RunningServer,
    workers: list[EntryPointProcess],
    gateway: tuple[str, EntryPointProcess],
    producer: Celery,
) -> None:
    url, gateway_process = gateway
    processes = [*workers, gateway_process]
    sync = redis.Redis.from_url(stack.redis_url)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:

        async def ready() -> bool:
            try:
                return (await http.get("/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        await until("the gateway getting ready", ready, 60, gateway_process)

        # A participant joins a study and has a conversation with the camera on and frames kept.
        spec = {"name": "Withdrawal", "arms": [{"arm": "base", "weight": 1}], "consent_text": "Chat with an AI."}
        created = await http.post("/api/v1/studies", json=spec, headers=admin())
        assert created.status_code == 201, created.text
        study = created.json()
        invite = await http.post(f"/api/v1/studies/{study['study_id']}/invites", json={}, headers=admin())
        joined = (await http.post(f"/api/v1/invites/{invite.json()['invites'][0]['code']}/redeem")).json()
        participant = {"Authorization": f"Bearer {joined['token']}"}
        consent = {"agree": True, "camera": True, "store_frames": True, "use_for_training": True}
        created = await http.post("/api/v1/sessions", json={"consent": consent}, headers=participant)
        assert created.status_code == 201, created.text
        session_id = created.json()["session_id"]
        await record_conversation(stack.redis_url, object_store, session_id, SECRET_WORDS)
        assert (await http.post(f"/api/v1/sessions/{session_id}/end", headers=participant)).status_code == 200

        # Someone else's session, straight through chat: it stays, and the rebuilt dataset is made of it.
        async with make_channel(f"127.0.0.1:{chat_server.port}", token(["chat"], "bob")) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            request = chat_pb2.CreateSessionRequest(consent=chat_pb2.Consent(use_for_training=True))
            other = (await stub.CreateSession(request)).session.session_id
            await record_conversation(stack.redis_url, object_store, other, "I failed my driving test today.")
            await stub.EndSession(chat_pb2.EndSessionRequest(session_id=other))

        # The chat worker persists both records; the labeler worker labels them and builds an SFT dataset.
        async def persisted() -> bool:
            return all(
                object_store.exists(Bucket.SESSIONS, session_record_keys(s)["session.json"])
                for s in (session_id, other)
            )

        await until("the chat worker persisting the sessions", persisted, 120, *processes)

        def run(name: str, *args: Any) -> Any:
            return producer.send_task(name, args=list(args)).get(timeout=180)

        label = await asyncio.to_thread(run, "labeler.label_session", session_id)
        assert label["turns"][0]["flagged"] is True
        await asyncio.to_thread(run, "labeler.label_session", other)
        sft = await asyncio.to_thread(run, "labeler.build_sft_dataset", [session_id, other])
        assert sorted(sft["source_sessions"]) == sorted([session_id, other])
        weights = await asyncio.to_thread(run, "labeler.fit_user_weights", [session_id, other])
        assert weights["users"] == 2
        assert objects_containing(object_store, SECRET_WORDS)  # In the record and in the dataset.
        # A version the trainer registered from that dataset (the lineage it records: the dataset's sessions).
        lineage = {"datasets": [{"id": sft["id"], "kind": "sft"}], "sessions": sorted(sft["source_sessions"])}
        entry = {"version": "wd-sft", "adapter_prefix": "adapters/wd-sft/", "lineage": lineage}
        object_store.put_json(Bucket.MODELS, model_registry_key("wd-sft"), entry)

        # The participant withdraws; the page polls the status until the data are deleted.
        withdrawn = await http.post("/api/v1/withdraw", json={"withdraw_code": joined["withdraw_code"]})
        assert withdrawn.status_code == 200 and withdrawn.json()["sessions"] == 1

        async def deleted() -> dict[str, Any] | None:
            response = await http.post("/api/v1/withdraw/status", json={"withdraw_code": joined["withdraw_code"]})
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            return body if body["deleted"] else None

        status = await until("the deletion finishing", deleted, 180, *processes)
        assert status["sessions"] == 1 and "deleted" in status["detail"]
        assert status["removed"] == {
            "conversations": 1,
            "events": 10,  # session_created, pre-survey, 2 frames, 2 readings, message, reply, post-survey, ended.
            "stored_objects": 3,  # events.jsonl, fer.jsonl, session.json.
            "face_frames": 2,
            "labels": 1,
            "datasets_withdrawn": 1,
            "datasets_rebuilt": 1,
            "models_marked": 1,
            "models_retired": 0,  # The default policy marks and keeps serving.
            "study_records": 1,
        }

        # Progress still counts the withdrawn session, now that the gateway's record of it is gone too.
        progress = (await http.get(f"/api/v1/studies/{study['study_id']}/progress", headers=admin())).json()
        assert progress["arms"][0]["withdrawn"] == 1 and progress["sessions"] == 1

    # Nothing in Redis names the session, and no object but its tombstone; none of its words are anywhere.
    assert redis_mentions(sync, session_id) == []
    assert objects_naming(object_store, session_id) == [f"sessions/{session_tombstone_key(session_id)}"]
    assert objects_containing(object_store, SECRET_WORDS) == []
    assert object_store.exists(Bucket.SESSIONS, session_record_keys(other)["session.json"])  # Bob's stays.
    assert redis_mentions(sync, other)

    # The dataset is withdrawn (the trainer refuses it), and rebuilt from bob's session alone.
    withdrawal = dataset_withdrawal(object_store, sft["id"])
    assert withdrawal is not None and withdrawal["withdrawn_sessions"] == [session_id]
    assert dataset_manifest(object_store, withdrawal["replacement"])["source_sessions"] == [other]
    with pytest.raises(FailedPrecondition, match="withdrawn"):
        check_not_withdrawn(object_store, sft["id"])
    check_not_withdrawn(object_store, withdrawal["replacement"])
    model_mark = model_withdrawal(object_store, "wd-sft")
    assert model_mark is not None and model_mark["withdrawn_sessions"] == [session_id] and not model_mark["retired"]
    assert set(object_store.get_json(Bucket.DATASETS, "user_weights/latest.json")["users"]) == {"bob"}

    # The audit log: one record from each of chat, the labeler and the gateway, naming the session.
    audits = [
        object_store.get_json(Bucket.SESSIONS, k)
        for k in object_store.list_keys(Bucket.SESSIONS, DELETION_AUDIT_PREFIX)
    ]
    mine = {a["service"]: a for a in audits if session_id in a["session_ids"]}
    assert set(mine) == {"chat", "labeler", "gateway"}
    assert mine["chat"]["requested_by"] == "gateway-service" and mine["chat"]["removed"]["frames"] == 2
    assert mine["gateway"]["requested_by"] == joined["participant_id"]
    record = object_store.get_json(
        Bucket.SESSIONS, f"studies/{study['study_id']}/withdrawals/{joined['participant_id']}.json"
    )
    assert record["deleted"] is True and record["removed"]["labeler"]["replacement_datasets"] == [
        withdrawal["replacement"]
    ]
    assert sync.llen("emili:gateway:withdrawals") == 0 and sync.llen("emili:gateway:withdrawals:processing") == 0
