"""The withdrawal drainer against real Redis, S3 and chat, with a stand-in for the labeler's Celery task: each
step runs once and is recorded, a retry waits for the same labeler task, and a request left half done by a
stopped drainer is finished by the next one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from emili_core.auth import create_token
from emili_core.errors import DependencyUnavailable
from emili_core.keys import session_tombstone_key
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import S3Settings
from emili_gateway.chat_client import ChatClient
from emili_gateway.settings import GatewaySettings, WithdrawalSettings
from emili_gateway.studies import StudyEngine
from emili_gateway.withdrawals import WithdrawalDrainer
from emili_testing.plugin import TEST_SECRET

from .conftest import MakeClient, Servers, admin_headers, create_study, gateway_settings, join, start_session

pytestmark = pytest.mark.integration


class LabelerStandIn:
    """labeler.forget_sessions as Celery would report it: PENDING until ``finish``, then its result."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.done = False

    async def send(self, name: str, kwargs: dict[str, Any]) -> str:
        assert name == "labeler.forget_sessions"
        self.sent.append(kwargs)
        return f"task-{len(self.sent)}"

    async def outcome(self, task_id: str) -> tuple[str, Any]:
        if not self.done:
            return "PENDING", None
        result = {"labels": 1, "datasets_withdrawn": 0, "datasets_rebuilt": 0, "user_weight_entries": 0}
        return "SUCCESS", {**result, "datasets": [], "audit_key": "audit/deletions/x.json"}


def no_drain(settings: GatewaySettings) -> GatewaySettings:
    """A gateway app that only records withdrawals: the test runs its own drainer."""
    options = settings.gateway.model_copy(
        update={"withdrawals": settings.gateway.withdrawals.model_copy(update={"drain": False})}
    )
    return settings.model_copy(update={"gateway": options})


@pytest.fixture
async def parts(
    redis_url: str, s3_settings: S3Settings, servers: Servers
) -> AsyncIterator[tuple[StudyEngine, ChatClient, aioredis.Redis]]:
    client = aioredis.Redis.from_url(redis_url)
    chat = ChatClient(servers.chat_target, 10)
    settings = gateway_settings(redis_url, s3_settings, servers)
    yield StudyEngine(settings.gateway.studies, client, ObjectStore(s3_settings)), chat, client
    await chat.close()
    await client.aclose()


def admin_token() -> str:
    return create_token(TEST_SECRET, "gateway-service", ["admin"], ttl_seconds=600)


async def test_each_step_runs_once_and_a_stopped_drainer_is_picked_up(
    make_client: MakeClient,
    redis_url: str,
    s3_settings: S3Settings,
    servers: Servers,
    object_store: ObjectStore,
    parts: tuple[StudyEngine, ChatClient, aioredis.Redis],
) -> None:
    studies, chat, client = parts
    http = make_client(settings=no_drain(gateway_settings(redis_url, s3_settings, servers)))
    study = create_study(http)
    joined = join(http, study["study_id"])
    session_id = start_session(http, joined)
    # Run the blocking TestClient calls off this loop: the gateway app's own thread talks to chat meanwhile.
    await asyncio.to_thread(http.post, "/api/v1/withdraw", json={"withdraw_code": joined.withdraw_code})
    queued = await client.lrange("emili:gateway:withdrawals", 0, -1)
    (raw,) = [r for r in queued if joined.participant_id.encode() in r]
    await client.lrem("emili:gateway:withdrawals", 1, raw)
    request = json.loads(raw)

    labeler = LabelerStandIn()
    options = WithdrawalSettings(labeler_timeout_seconds=0.5)
    drainer = WithdrawalDrainer(options, client, studies, chat, labeler, admin_token)
    with pytest.raises(DependencyUnavailable, match="did not finish"):
        await drainer.process(request)  # Chat's part is done; the labeler's task is still queued.
    record = await studies.withdrawal(study["study_id"], joined.participant_id)
    assert record is not None and not record["deleted"]
    assert record["removed"]["chat"]["sessions"] == 1 and record["progress"]["labeler_task_id"] == "task-1"
    assert labeler.sent == [
        {
            "session_ids": [session_id],
            "user_ids": [joined.participant_id],
            "requested_by": joined.participant_id,
            "reason": "participant withdrawal",
        }
    ]
    assert object_store.exists(Bucket.SESSIONS, session_tombstone_key(session_id))

    # The drainer stopped with the request on its processing list; the next one to start finishes it, waiting for
    # the same labeler task rather than sending another.
    await client.rpush(drainer.processing, raw)
    await client.delete(drainer.invalid)
    await client.rpush(drainer.queue, b"not a request")  # Set aside for an operator, not retried forever.
    labeler.done = True
    task = asyncio.create_task(drainer.run())
    try:
        for _ in range(100):
            record = await studies.withdrawal(study["study_id"], joined.participant_id)
            if record and record["deleted"] and await client.llen(drainer.invalid):
                break
            await asyncio.sleep(0.1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert record is not None and record["deleted"] and len(labeler.sent) == 1
    assert record["removed"]["chat"]["sessions"] == 1  # The first run's count, not the retry's.
    assert record["removed"]["labeler"]["labels"] == 1
    assert record["removed"]["gateway"]["session_records"] == 1
    assert await client.llen(drainer.processing) == 0
    assert await client.lrange(drainer.invalid, 0, -1) == [b"not a request"]
    assert not await client.exists(f"emili:gateway:session:{session_id}")
    assert not object_store.exists(Bucket.SESSIONS, f"studies/{study['study_id']}/sessions/{session_id}.json")
    url = f"/api/v1/studies/{study['study_id']}/progress"
    progress = (await asyncio.to_thread(http.get, url, headers=admin_headers())).json()
    assert progress["sessions"] == 1 and progress["arms"][0]["withdrawn"] == 1  # Counted, no longer recorded.

    # Delivered again: nothing more happens.
    again = await drainer.process(request)
    assert again["deleted_ms"] == record["deleted_ms"] and len(labeler.sent) == 1
