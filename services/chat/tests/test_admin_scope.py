"""The admin scope reads people's sessions but never writes into them (turns, surveys, ratings, EndSession)."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from emili_chat.io_types import SessionOptions, UserText
from emili_core.auth import Principal
from emili_core.errors import PermissionDenied

from .conftest import make_engine, make_settings
from .test_engine import collect, script

pytestmark = pytest.mark.integration

ALICE = Principal("alice", frozenset({"chat"}))
ADMIN = Principal("ops", frozenset({"admin"}))
SURVEY = {"current_feelings": [], "desired_feelings": [], "text": "fine"}
RATINGS = {"empathy": 4, "relevance": 4, "fluency": 4}


async def test_an_admin_reads_a_session_but_may_not_write_into_it(redis_url: str, redis_client: aioredis.Redis) -> None:
    engine = make_engine(make_settings(redis_url), redis_client)
    session = await engine.create_session(
        ALICE, store_frames=False, use_for_training=False, arm="", options=SessionOptions()
    )
    sid = session.session_id

    record, events = await engine.transcript(ADMIN, sid)  # Reading is allowed.
    assert record.user_id == "alice" and events

    writes = {
        "pre-survey": lambda: engine.submit_survey(ADMIN, sid, "pre", SURVEY),
        "post-survey": lambda: engine.submit_survey(ADMIN, sid, "post", SURVEY),
        "rating": lambda: engine.submit_rating(ADMIN, sid, RATINGS, "written by an admin"),
        "end": lambda: engine.end_session(ADMIN, sid),
        "converse": lambda: collect(engine.converse(ADMIN, sid, script(UserText("hello from ops")))),
    }
    for name, write in writes.items():
        with pytest.raises(PermissionDenied, match="may not write into them") as exc:
            await write()
        assert sid in str(exc.value), name

    _, after = await engine.transcript(ALICE, sid)
    assert [e.kind for e in after] == [e.kind for e in events]  # Nothing reached the record.
    await engine.submit_rating(ALICE, sid, RATINGS, "")  # The owner still writes.
    await engine.end_session(ALICE, sid)
