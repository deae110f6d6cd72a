"""Deleting a person's data through chat's gRPC API (DeleteSessionData, DeleteUserData), against real Redis and S3:
who may delete, what goes, what stays (the tombstone, labels for the labeler, the audit record), idempotence, and
that jobs queued before a deletion cannot bring the data back."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import redis.asyncio as aioredis

from emili.chat.v1 import chat_pb2, chat_pb2_grpc
from emili_chat.main import build_app
from emili_chat.persist import persist_session
from emili_chat.settings import ChatSettings
from emili_chat.store import SessionStore, events_key, session_key, user_sessions_key
from emili_core.deletion import session_deleted, write_tombstone
from emili_core.errors import NotFound
from emili_core.grpc_client import make_channel
from emili_core.grpc_server import start_server
from emili_core.keys import DELETION_AUDIT_PREFIX, fer_readings_key, frame_key, session_record_keys
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import AuthSettings, S3Settings
from emili_session.events import FrameStored, UserMessage
from emili_testing.chat import ScriptedBackend
from emili_testing.plugin import TEST_SECRET, free_port, token

pytestmark = pytest.mark.integration


@dataclass
class Chat:
    target: str
    redis_url: str
    redis: redis.Redis
    store: ObjectStore
    channels: list[grpc.aio.Channel]

    def stub(self, subject: str, scopes: list[str] | None = None) -> Any:
        channel = make_channel(self.target, token(scopes or ["chat"], subject), timeout=30)
        self.channels.append(channel)
        return chat_pb2_grpc.ChatServiceStub(channel)


@pytest.fixture
async def chat(
    redis_url: str, s3_settings: S3Settings, object_store: ObjectStore, tmp_path: Path
) -> AsyncIterator[Chat]:
    settings = ChatSettings(
        env="test",
        redis_url=redis_url,
        s3=s3_settings,
        auth=AuthSettings(secret=TEST_SECRET),  # type: ignore[arg-type]
        artifacts_dir=tmp_path,
    )
    options = settings.chat.model_copy(
        update={
            "server": settings.chat.server.model_copy(update={"grpc_port": 0, "metrics_port": 0}),
            "fer_target": f"127.0.0.1:{free_port()}",
        }
    )
    settings = settings.model_copy(update={"chat": options})
    server = await start_server(build_app(settings, ScriptedBackend()), settings, options.server)
    await server.ready.wait()
    client = Chat(f"127.0.0.1:{server.port}", redis_url, redis.Redis.from_url(redis_url), object_store, [])
    yield client
    for channel in client.channels:
        await channel.close()
    client.redis.close()
    await server.stop()


async def recorded_session(chat: Chat, owner: str) -> str:
    """A session with a message, two stored frames, a persisted record, FER readings and a label."""
    stub = chat.stub(owner)
    request = chat_pb2.CreateSessionRequest(consent=chat_pb2.Consent(store_frames=True, use_for_training=True))
    session_id: str = (await stub.CreateSession(request)).session.session_id
    client = aioredis.Redis.from_url(chat.redis_url)
    store = SessionStore(client)
    await store.record(session_id, UserMessage(text="I failed my driving test today."))
    for at in (1000, 2000):
        key = frame_key(session_id, at)
        chat.store.put_bytes(Bucket.FRAMES, key, b"\xff\xd8\xff a face", "image/jpeg")
        await store.record(session_id, FrameStored(key=key, capture_time_ms=at))
    await client.aclose()
    await stub.EndSession(chat_pb2.EndSessionRequest(session_id=session_id))
    persist_session(chat.redis, chat.store, session_id)
    chat.store.put_bytes(Bucket.SESSIONS, fer_readings_key(session_id, "abc"), b'{"face_found":true}\n')
    chat.store.put_json(Bucket.SESSIONS, f"{session_id}/labels/settings1.json", {"user_id": owner})
    return session_id


def redis_keys_naming(client: redis.Redis, session_id: str) -> list[str]:
    return sorted(k.decode() for k in client.scan_iter(match=f"*{session_id}*"))


def objects_naming(store: ObjectStore, session_id: str) -> dict[str, list[str]]:
    found = {b.value: [k for k in store.list_keys(b, "") if session_id in k] for b in Bucket}
    return {bucket: keys for bucket, keys in found.items() if keys}


def audit_record(store: ObjectStore, key: str) -> dict[str, Any]:
    assert key.startswith(DELETION_AUDIT_PREFIX)
    return dict(store.get_json(Bucket.SESSIONS, key))


async def test_owner_deletes_a_session_and_only_the_tombstone_and_labels_stay(chat: Chat) -> None:
    session_id = await recorded_session(chat, "alice")
    assert len(objects_naming(chat.store, session_id)["frames"]) == 2
    assert chat.redis.sismember(user_sessions_key("alice"), session_id)

    reply = await chat.stub("alice").DeleteSessionData(
        chat_pb2.DeleteSessionDataRequest(session_id=session_id, reason="user request")
    )
    deleted = reply.deleted
    assert deleted.session_id == session_id and not deleted.already_deleted
    assert sorted(deleted.redis_keys) == sorted([session_key(session_id), events_key(session_id)])
    assert deleted.events == 5  # session_created, the message, two frames, session_ended.
    assert deleted.record_objects == 4  # events.jsonl, fer.jsonl, session.json, the FER readings.
    assert deleted.frames == 2 and deleted.deleted_ms > 0
    assert redis_keys_naming(chat.redis, session_id) == []
    assert not chat.redis.sismember(user_sessions_key("alice"), session_id)
    # Left: the tombstone, and the label (the labeler's, removed by labeler.forget_sessions).
    assert objects_naming(chat.store, session_id) == {
        "sessions": [f"{session_id}/labels/settings1.json", deleted.tombstone_key]
    }
    assert chat.store.get_json(Bucket.SESSIONS, deleted.tombstone_key).keys() == {"session_id", "deleted_ms"}

    audit = audit_record(chat.store, reply.audit_key)
    assert audit["service"] == "chat" and audit["action"] == "delete_session_data"
    assert audit["requested_by"] == "alice" and audit["session_ids"] == [session_id]
    assert audit["removed"]["frames"] == 2 and audit["removed"]["events"] == 5 and audit["reason"] == "user request"
    assert "driving" not in json.dumps(audit)

    # Idempotent: again, nothing is left to remove, and it says the session was deleted before.
    again = await chat.stub("alice").DeleteSessionData(chat_pb2.DeleteSessionDataRequest(session_id=session_id))
    assert again.deleted.already_deleted and again.deleted.redis_keys == []
    assert (again.deleted.events, again.deleted.record_objects, again.deleted.frames) == (0, 0, 0)
    assert again.audit_key != reply.audit_key  # Each request is audited.


async def test_another_user_may_not_delete_a_session_and_an_admin_may(chat: Chat) -> None:
    session_id = await recorded_session(chat, "alice")
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await chat.stub("mallory").DeleteSessionData(chat_pb2.DeleteSessionDataRequest(session_id=session_id))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert chat.redis.exists(session_key(session_id)) and not session_deleted(chat.store, session_id)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await chat.stub("mallory").DeleteSessionData(chat_pb2.DeleteSessionDataRequest(session_id="never-was"))
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await chat.stub("alice").DeleteSessionData(chat_pb2.DeleteSessionDataRequest(session_id="a/b"))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    reply = await chat.stub("ops", ["admin"]).DeleteSessionData(
        chat_pb2.DeleteSessionDataRequest(session_id=session_id)
    )
    assert reply.deleted.frames == 2 and not reply.deleted.already_deleted
    assert audit_record(chat.store, reply.audit_key)["requested_by"] == "ops"
    assert redis_keys_naming(chat.redis, session_id) == []


async def test_a_session_only_in_object_storage_is_found_through_its_record(chat: Chat) -> None:
    session_id = await recorded_session(chat, "alice")
    chat.redis.delete(session_key(session_id), events_key(session_id))  # E.g. Redis was reset since.
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await chat.stub("bob").DeleteSessionData(chat_pb2.DeleteSessionDataRequest(session_id=session_id))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED  # The persisted record names alice.
    reply = await chat.stub("alice").DeleteSessionData(chat_pb2.DeleteSessionDataRequest(session_id=session_id))
    assert reply.deleted.redis_keys == [] and reply.deleted.record_objects == 4 and reply.deleted.frames == 2


async def test_delete_user_data(chat: Chat) -> None:
    first, second = await recorded_session(chat, "carol"), await recorded_session(chat, "carol")
    other = await recorded_session(chat, "dave")
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await chat.stub("dave").DeleteUserData(chat_pb2.DeleteUserDataRequest(user_id="carol"))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as exc:  # Someone else's session among one's own: nothing deleted.
        await chat.stub("carol").DeleteUserData(chat_pb2.DeleteUserDataRequest(session_ids=[other]))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert chat.redis.exists(session_key(first), session_key(other)) == 2

    reply = await chat.stub("carol").DeleteUserData(chat_pb2.DeleteUserDataRequest())  # Empty: the caller.
    assert reply.user_id == "carol"
    assert sorted(s.session_id for s in reply.sessions) == sorted([first, second])
    assert all(s.frames == 2 and s.record_objects == 4 for s in reply.sessions)
    assert not chat.redis.exists(user_sessions_key("carol"))
    assert chat.redis.exists(session_key(other))  # Dave's is untouched.
    audit = audit_record(chat.store, reply.audit_key)
    assert audit["action"] == "delete_user_data" and audit["session_ids"] == sorted([first, second])

    # An admin (the gateway) deletes a user's data, naming sessions it knows of that chat has no index entry for.
    admin = chat.stub("gateway-service", ["admin"])
    chat.redis.srem(user_sessions_key("dave"), other)
    reply = await admin.DeleteUserData(
        chat_pb2.DeleteUserDataRequest(user_id="dave", session_ids=[other, "gone-long-ago"], reason="withdrawal")
    )
    by_id = {s.session_id: s for s in reply.sessions}
    assert by_id[other].frames == 2 and by_id["gone-long-ago"].events == 0
    assert session_deleted(chat.store, "gone-long-ago")  # Tombstoned all the same: nothing can write it later.
    hanks = await recorded_session(chat, "hank")
    with pytest.raises(grpc.aio.AioRpcError) as exc:  # Named for the wrong user, even by an admin: refused.
        await admin.DeleteUserData(chat_pb2.DeleteUserDataRequest(user_id="erin", session_ids=[hanks]))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and chat.redis.exists(session_key(hanks))


async def test_a_tombstone_stops_persist_session_from_writing(chat: Chat, object_store: ObjectStore) -> None:
    stub = chat.stub("frank")
    session_id = (await stub.CreateSession(chat_pb2.CreateSessionRequest())).session.session_id
    await stub.EndSession(chat_pb2.EndSessionRequest(session_id=session_id))
    await stub.DeleteSessionData(chat_pb2.DeleteSessionDataRequest(session_id=session_id))
    # The chat.persist_session job queued by EndSession runs after the deletion: it writes nothing.
    result = persist_session(chat.redis, object_store, session_id)
    assert result["deleted"] is True
    assert not object_store.list_keys(Bucket.SESSIONS, f"{session_id}/")

    # Deleted while the job ran (after its first check): what it wrote is removed again.
    other = (await stub.CreateSession(chat_pb2.CreateSessionRequest())).session.session_id
    put_json = object_store.put_json

    def delete_midway(bucket: Bucket, key: str, value: Any) -> str:
        digest = put_json(bucket, key, value)
        if key == session_record_keys(other)["session.json"]:
            write_tombstone(object_store, other)
        return digest

    object_store.put_json = delete_midway  # type: ignore[method-assign]
    assert persist_session(chat.redis, object_store, other)["deleted"] is True
    object_store.put_json = put_json  # type: ignore[method-assign]
    assert not object_store.list_keys(Bucket.SESSIONS, f"{other}/")


async def test_a_conversation_still_streaming_cannot_recreate_a_deleted_session(chat: Chat) -> None:
    stub = chat.stub("gina")
    session_id = (await stub.CreateSession(chat_pb2.CreateSessionRequest())).session.session_id
    await chat.stub("gina").DeleteSessionData(chat_pb2.DeleteSessionDataRequest(session_id=session_id))
    client = aioredis.Redis.from_url(chat.redis_url)
    store = SessionStore(client)
    try:
        with pytest.raises(NotFound, match="deleted"):
            await store.record(session_id, UserMessage(text="still typing"))
    finally:
        await client.aclose()
    assert redis_keys_naming(chat.redis, session_id) == []
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.SubmitRating(chat_pb2.SubmitRatingRequest(session_id=session_id, empathy=5, relevance=5, fluency=5))
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_cli_deletes_a_session_and_a_users_data(chat: Chat, stack_env: dict[str, str]) -> None:
    first, second = await recorded_session(chat, "ivy"), await recorded_session(chat, "ivy")

    async def emili(*args: str) -> dict[str, Any]:
        # A subprocess that does not block this loop: the chat server answering it runs here.
        process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "emili"),
            "chat",
            *args,
            "--target",
            chat.target,
            "--no-labels",
            "--json",
            env={**os.environ, **stack_env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 0, err.decode()
        return dict(json.loads(out))

    one = await emili("delete-session", first)
    assert [s["session_id"] for s in one["chat"]["sessions"]] == [first] and one["labeler"] is None
    assert one["chat"]["sessions"][0]["frames"] == 2 and one["chat"]["audit_key"].startswith(DELETION_AUDIT_PREFIX)
    everything = await emili("delete-user", "ivy")
    assert everything["chat"]["user_id"] == "ivy"
    assert [s["session_id"] for s in everything["chat"]["sessions"]] == [second]
    assert redis_keys_naming(chat.redis, first) == redis_keys_naming(chat.redis, second) == []
