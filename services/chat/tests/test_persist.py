"""The session record in object storage, written from the Redis event log."""

from __future__ import annotations

import json

import pytest
import redis
import redis.asyncio as aioredis

from emili_chat.persist import persist_session
from emili_chat.store import SessionRecord, SessionStore
from emili_core.keys import session_record_keys
from emili_core.objectstore import Bucket, ObjectStore

pytestmark = pytest.mark.integration


async def test_record_is_complete_and_idempotent(redis_url: str, object_store: ObjectStore) -> None:
    client = aioredis.Redis.from_url(redis_url)
    store = SessionStore(client)
    record = SessionRecord("persist-1", "alice", "base", "scripted", False, True, {"cadence": "before_user_message"})
    await store.create(record)
    await store.append("persist-1", "user_message", {"text": "hi"})
    await store.append("persist-1", "fer_reading", {"face_found": True, "probabilities": {"happy": 0.9}})
    await store.append("persist-1", "assistant_message", {"text": "hello"})
    await client.aclose()

    sync = redis.Redis.from_url(redis_url)
    first = persist_session(sync, object_store, "persist-1")
    assert first["events"] == 3 and first["reused"] is False
    keys = session_record_keys("persist-1")
    lines = object_store.get_bytes(Bucket.SESSIONS, keys["events.jsonl"]).decode().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["user_message", "fer_reading", "assistant_message"]
    fer = object_store.get_bytes(Bucket.SESSIONS, keys["fer.jsonl"]).decode().splitlines()
    assert len(fer) == 1 and json.loads(fer[0])["probabilities"]["happy"] == 0.9
    manifest = object_store.get_json(Bucket.SESSIONS, keys["session.json"])
    assert manifest["user_id"] == "alice" and manifest["counts"] == {
        "user_message": 1,
        "fer_reading": 1,
        "assistant_message": 1,
    }
    assert persist_session(sync, object_store, "persist-1")["reused"] is True

    sync.xadd("emili:chat:events:persist-1", {"kind": "rating", "time_ms": "1", "payload": '{"empathy":5}'})
    again = persist_session(sync, object_store, "persist-1")
    assert again["reused"] is False and again["events"] == 4  # New events: the record is rewritten in place.
    assert len(object_store.list_keys(Bucket.SESSIONS, "persist-1/")) == 3
