"""Retention of a session's Redis data: once its record is persisted, its event stream and hash expire (the
record in object storage stays); a session never ended gets the idle period; the sweeper gives an expiry to
sessions without one, never to an ended session whose record is not persisted yet."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from emili_chat import tasks
from emili_chat.persist import persist_session
from emili_chat.retention import DAY_S, apply_retention, retention_sweep, sweep_redis
from emili_chat.store import ENDED, SessionRecord, SessionStore, events_key, session_key
from emili_core.keys import session_record_keys
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.queues import TASK_ROUTES, Queue
from emili_core.records import CHAT_SESSION_HASH
from emili_core.settings import RetentionSettings

pytestmark = pytest.mark.integration


def test_the_consent_readers_key_is_chats_session_key() -> None:
    assert CHAT_SESSION_HASH.format("abc") == session_key("abc")
    assert (
        TASK_ROUTES["chat.retention_sweep"] == Queue.CHAT and tasks.retention_sweep_task.name == "chat.retention_sweep"
    )


async def _session(redis_url: str, session_id: str, *, ended: bool) -> None:
    client = aioredis.Redis.from_url(redis_url)
    store = SessionStore(client)
    record = SessionRecord(session_id, "alice", "base", "scripted", False, True, {})
    await store.create(record)
    await store.append(session_id, "user_message", {"text": "hi"})
    if ended:
        await store.end(record)
    await client.aclose()


def _ttls(client: redis.Redis, session_id: str) -> tuple[Any, Any]:
    return client.ttl(session_key(session_id)), client.ttl(events_key(session_id))


async def test_streams_expire_after_persist_and_the_record_stays(redis_url: str, object_store: ObjectStore) -> None:
    await _session(redis_url, "ret-ended", ended=True)
    sync = redis.Redis.from_url(redis_url)
    result = persist_session(sync, object_store, "ret-ended", RetentionSettings(event_stream_days=1))
    assert result["expires_in_s"] == DAY_S
    for ttl in _ttls(sync, "ret-ended"):
        assert DAY_S - 5 <= ttl <= DAY_S
    # A tiny period: the live data go, the record in object storage stays.
    assert apply_retention(sync, "ret-ended", RetentionSettings(), seconds=1) == 1
    await asyncio.sleep(1.5)
    assert sync.exists(session_key("ret-ended"), events_key("ret-ended")) == 0
    assert object_store.exists(Bucket.SESSIONS, session_record_keys("ret-ended")["session.json"])


async def test_a_session_never_ended_gets_the_idle_period(redis_url: str, object_store: ObjectStore) -> None:
    await _session(redis_url, "ret-active", ended=False)
    sync = redis.Redis.from_url(redis_url)
    persist_session(sync, object_store, "ret-active", RetentionSettings(event_stream_days=1, idle_session_days=3))
    for ttl in _ttls(sync, "ret-active"):
        assert 3 * DAY_S - 10 <= ttl <= 3 * DAY_S
    await _session(redis_url, "ret-keep", ended=True)
    assert (
        persist_session(sync, object_store, "ret-keep", RetentionSettings(event_stream_days=0))["expires_in_s"] is None
    )
    assert _ttls(sync, "ret-keep") == (-1, -1)  # 0 keeps it forever.


async def test_the_sweeper_gives_an_expiry_only_where_it_is_safe(
    isolated_redis_url: str, object_store: ObjectStore
) -> None:
    redis_url = isolated_redis_url
    sync = redis.Redis.from_url(redis_url)
    await _session(redis_url, "ret-sw-persisted", ended=True)
    persist_session(sync, object_store, "ret-sw-persisted")  # Persisted before retention existed: no expiry.
    await _session(redis_url, "ret-sw-unpersisted", ended=True)
    await _session(redis_url, "ret-sw-live", ended=False)
    assert _ttls(sync, "ret-sw-persisted") == (-1, -1)
    settings = RetentionSettings(event_stream_days=2, idle_session_days=5)
    sync.hset(session_key("ret-sw-stray"), mapping={"store_frames": "true"})  # Not a record chat wrote.
    counts = sweep_redis(sync, object_store, settings)
    assert counts["sessions_given_expiry"] == 2 and counts["malformed_skipped"] == 1
    assert DAY_S * 2 - 10 <= _ttls(sync, "ret-sw-persisted")[0] <= 2 * DAY_S
    assert _ttls(sync, "ret-sw-unpersisted") == (-1, -1)  # Its only copy: never expired.
    assert 5 * DAY_S - 10 <= _ttls(sync, "ret-sw-live")[1] <= 5 * DAY_S
    client = aioredis.Redis.from_url(redis_url)
    assert (await SessionStore(client).get("ret-sw-unpersisted")).state == ENDED
    await client.aclose()
    summary = retention_sweep(sync, object_store, settings)
    assert set(summary) == {"frames", "fer_readings", "redis"} and summary["frames"]["by_lifecycle"] is False
