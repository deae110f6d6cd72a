"""Sessions made by the user simulator are marked synthetic in every record: Redis, the event log, S3."""

from __future__ import annotations

import pytest
import redis
import redis.asyncio as aioredis

from emili.chat.v1 import chat_pb2
from emili_chat import codec
from emili_chat.io_types import SessionOptions
from emili_chat.persist import persist_session
from emili_chat.store import SessionRecord
from emili_core.auth import Principal
from emili_core.keys import session_record_keys
from emili_core.objectstore import Bucket, ObjectStore

from .conftest import make_engine, make_settings

SIMULATOR = Principal("sim-user-1", frozenset({"chat"}))


def test_session_message_carries_the_flag() -> None:
    options = {"cadence": "before_user_message", "speak_on_change": True, "post_response_reading_s": 5.0}
    record = SessionRecord("s1", "sim", "base", "scripted", False, True, options, synthetic=True)
    assert codec.session_to_pb(record).synthetic is True
    assert codec.session_to_pb(SessionRecord(**{**vars(record), "synthetic": False})).synthetic is False


def test_a_record_written_before_the_flag_existed_reads_as_not_synthetic() -> None:
    record = SessionRecord("s2", "alice", "base", "scripted", False, True, {})
    raw = {k.encode(): v.encode() for k, v in record.to_redis().items() if k != "synthetic"}
    assert SessionRecord.from_redis(raw).synthetic is False


@pytest.mark.integration
async def test_synthetic_session_is_recorded_everywhere(
    redis_url: str, redis_client: aioredis.Redis, object_store: ObjectStore
) -> None:
    engine = make_engine(make_settings(redis_url), redis_client)
    synthetic = await engine.create_session(
        SIMULATOR, store_frames=False, use_for_training=True, arm="", options=SessionOptions(), synthetic=True
    )
    person = await engine.create_session(
        SIMULATOR, store_frames=False, use_for_training=True, arm="", options=SessionOptions()
    )
    assert (await engine.store.get(synthetic.session_id)).synthetic is True
    assert (await engine.store.get(person.session_id)).synthetic is False
    created = (await engine.store.events(synthetic.session_id))[0]
    assert created.kind == "session_created" and created.payload["synthetic"] is True
    assert (await engine.store.events(person.session_id))[0].payload["synthetic"] is False

    await engine.end_session(SIMULATOR, synthetic.session_id)
    persist_session(redis.Redis.from_url(redis_url), object_store, synthetic.session_id)
    manifest = object_store.get_json(Bucket.SESSIONS, session_record_keys(synthetic.session_id)["session.json"])
    assert manifest["synthetic"] is True


def test_create_session_request_has_the_flag() -> None:
    assert chat_pb2.CreateSessionRequest(synthetic=True).synthetic is True
