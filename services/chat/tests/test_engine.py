"""The conversation engine against a real Redis server, with a scripted model."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from emili_chat.engine import ChatEngine
from emili_chat.io_types import (
    Accepted,
    AssistantReply,
    ClientReading,
    ConverseInput,
    ConverseOutput,
    Delta,
    Readout,
    SessionOptions,
    UserText,
)
from emili_chat.store import SessionStore
from emili_core.auth import Principal
from emili_core.errors import FailedPrecondition, InvalidInput, NotFound, PermissionDenied
from emili_core.objectstore import Bucket, ObjectStore
from emili_testing.chat import ScriptedBackend

from .conftest import collect, make_engine, make_settings, reading, script

pytestmark = pytest.mark.integration

ALICE = Principal("alice", frozenset({"chat"}))
BOB = Principal("bob", frozenset({"chat"}))


def kinds(outputs: Sequence[ConverseOutput]) -> list[str]:
    names = []
    for o in outputs:
        name = type(o).__name__
        if not names or names[-1] != name or name != "Delta":
            names.append(name)
    return names


async def test_readout_before_each_user_message(redis_url: str, redis_client: aioredis.Redis) -> None:
    backend = ScriptedBackend("Nice!")
    engine = make_engine(make_settings(redis_url, post_response_reading_s=0.0), redis_client, backend)
    session = await engine.create_session(
        ALICE, store_frames=False, use_for_training=True, arm="", options=SessionOptions()
    )
    outputs = await collect(
        engine.converse(
            ALICE,
            session.session_id,
            script(reading(happy=46, neutral=28, sad=26), 0.6, UserText("I got the job today!")),
        )
    )
    assert kinds(outputs) == ["Readout", "Accepted", "Delta", "AssistantReply"]
    readout = outputs[0]
    assert isinstance(readout, Readout) and readout.cadence == "before_user_message"
    assert readout.text == "Right now, user looks HAPPY (46) Neutral (28) Melancholy (26)"
    reply = outputs[-1]
    assert isinstance(reply, AssistantReply) and reply.text == "Nice!" and not reply.unprompted
    messages, params, _ = backend.calls[0]
    assert [m.role for m in messages] == ["system", "system", "user"]
    assert messages[1].content == readout.text and messages[2].content == "I got the job today!"
    assert params.temperature == 1.0 and params.max_new_tokens == 160
    events = await engine.store.events(session.session_id)
    assert [e.kind for e in events] == [
        "session_created",
        "fer_reading",
        "readout_injected",
        "user_message",
        "assistant_message",
    ]
    assert events[-1].payload["model_id"] == "scripted" and events[-1].payload["params"]["max_new_tokens"] == 160
    assert events[-1].payload["at_limit"] is False  # The backend said how the reply ended: the model ended it.


async def test_not_visible_without_readings_and_short_message_reminder(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    backend = ScriptedBackend("Hi!")
    engine = make_engine(make_settings(redis_url, post_response_reading_s=0.0), redis_client, backend)
    session = await engine.create_session(
        ALICE, store_frames=False, use_for_training=False, arm="base", options=SessionOptions()
    )
    outputs = await collect(engine.converse(ALICE, session.session_id, script(UserText("hey"))))
    assert isinstance(outputs[0], Readout) and outputs[0].text == "User is not visible right now."
    roles = [m.role for m in backend.calls[0][0]]
    assert roles == ["system", "system", "user", "system"]  # Prompt, readout, message, short-message reminder.
    assert "act out" in backend.calls[0][0][3].content


async def test_large_change_uses_the_three_line_form(redis_url: str, redis_client: aioredis.Redis) -> None:
    settings = make_settings(
        redis_url, post_response_reading_s=0.0, speak_on_change=False, change_block_before_user_message=True
    )
    engine = make_engine(settings, redis_client)
    session = await engine.create_session(
        ALICE, store_frames=False, use_for_training=False, arm="", options=SessionOptions()
    )
    outputs = await collect(
        engine.converse(
            ALICE,
            session.session_id,
            script(
                reading(neutral=90, happy=10),
                0.6,
                UserText("hello there"),
                *[step for _ in range(4) for step in (reading(sad=85, neutral=15), 0.5)],
                UserText("now I feel worse"),
            ),
        )
    )
    readouts = [o.text for o in outputs if isinstance(o, Readout)]
    assert readouts[0] == "Right now, user looks TOTALLY ZEN (90)"  # happy 10 does not exceed its first threshold.
    first, middle, last = readouts[1].split("\n")
    assert first == "Previously, user looked TOTALLY ZEN (90)"
    assert middle == "Change in emotions detected!"
    assert last.split(" (")[0] in {"Right now, user looks ANGUISHED", "Right now, user looks DESPONDENT"}


async def test_fixed_interval_cadence(redis_url: str, redis_client: aioredis.Redis) -> None:
    engine = make_engine(make_settings(redis_url, post_response_reading_s=0.0, speak_on_change=False), redis_client)
    session = await engine.create_session(
        ALICE, store_frames=False, use_for_training=False, arm="", options=SessionOptions(cadence="fixed_interval")
    )
    started = time.monotonic()
    outputs = await collect(engine.converse(ALICE, session.session_id, script(reading(happy=80, neutral=20), 3.2)))
    readouts = [o for o in outputs if isinstance(o, Readout)]
    assert all(r.cadence == "fixed_interval" for r in readouts)
    assert 2 <= len(readouts) <= 4 and time.monotonic() - started >= 3  # About one per second.
    assert readouts[0].text == "Right now, user looks ELATED (80) Neutral (20)"


async def test_change_trigger_speaks_unprompted(redis_url: str, redis_client: aioredis.Redis) -> None:
    backend = ScriptedBackend("You look happier all of a sudden!")
    engine = make_engine(make_settings(redis_url, post_response_reading_s=0.0), redis_client, backend)
    session = await engine.create_session(
        ALICE, store_frames=False, use_for_training=False, arm="", options=SessionOptions(cadence="on_change")
    )
    steps: list[ConverseInput | float] = []
    for _ in range(3):
        steps += [reading(neutral=95, happy=5), 1.0]
    for _ in range(3):
        steps += [reading(happy=95, neutral=5), 1.0]
    outputs = await collect(engine.converse(ALICE, session.session_id, script(*steps)))
    unprompted = [o for o in outputs if isinstance(o, AssistantReply)]
    assert len(unprompted) == 1 and unprompted[0].unprompted
    readout = next(o for o in outputs if isinstance(o, Readout))
    assert readout.cadence == "on_change" and "Change in emotions detected!" in readout.text
    assert backend.calls[0][1].max_new_tokens == 40  # EMILI's limit when speaking unprompted.


async def test_post_response_reading_is_recorded_not_sent(redis_url: str, redis_client: aioredis.Redis) -> None:
    engine = make_engine(make_settings(redis_url, post_response_reading_s=0.5, speak_on_change=False), redis_client)
    session = await engine.create_session(
        ALICE, store_frames=False, use_for_training=False, arm="", options=SessionOptions()
    )
    outputs = await collect(
        engine.converse(ALICE, session.session_id, script(reading(happy=60, neutral=40), UserText("hello there"), 1.2))
    )
    assert not any(isinstance(o, Readout) and "post" in o.cadence for o in outputs)
    events = await engine.store.events(session.session_id)
    post = [e for e in events if e.kind == "post_response_reading"]
    reply = next(e for e in events if e.kind == "assistant_message")
    assert len(post) == 1 and post[0].payload["turn_id"] == reply.payload["turn_id"]
    assert post[0].time_ms - reply.time_ms >= 450 and post[0].payload["scores"]["happy"] > 0


async def test_bad_input_and_ownership(redis_url: str, redis_client: aioredis.Redis) -> None:
    engine = make_engine(make_settings(redis_url), redis_client)
    session = await engine.create_session(
        ALICE, store_frames=False, use_for_training=False, arm="", options=SessionOptions()
    )
    sid = session.session_id
    with pytest.raises(InvalidInput, match="empty"):
        await collect(engine.converse(ALICE, sid, script(UserText("   "))))
    with pytest.raises(InvalidInput, match="over the 4000 limit"):
        await collect(engine.converse(ALICE, sid, script(UserText("x" * 5000))))
    with pytest.raises(InvalidInput, match="probabilities"):
        await collect(engine.converse(ALICE, sid, script(ClientReading(True, {"joy": 1.0}, 0))))
    with pytest.raises(PermissionDenied, match="another user"):
        await collect(engine.converse(BOB, sid, script(UserText("hi there"))))
    with pytest.raises(PermissionDenied):
        await engine.transcript(BOB, sid)
    with pytest.raises(NotFound):
        await engine.transcript(ALICE, "no-such-session")
    with pytest.raises(InvalidInput, match="Likert"):
        await engine.submit_rating(ALICE, sid, {"empathy": 6, "relevance": 3, "fluency": 3}, "")
    with pytest.raises(InvalidInput, match="cadence"):
        await engine.create_session(
            ALICE, store_frames=False, use_for_training=False, arm="", options=SessionOptions(cadence="hourly")
        )
    with pytest.raises(NotFound, match="model arm"):
        await engine.create_session(
            ALICE, store_frames=False, use_for_training=False, arm="v-missing", options=SessionOptions()
        )
    await engine.end_session(ALICE, sid)
    with pytest.raises(FailedPrecondition, match="ended"):
        await collect(engine.converse(ALICE, sid, script(UserText("hello again"))))
    with pytest.raises(FailedPrecondition):
        await engine.end_session(ALICE, sid)


async def test_restart_loses_nothing_and_keeps_the_history(redis_url: str, redis_client: aioredis.Redis) -> None:
    settings = make_settings(redis_url, post_response_reading_s=0.0, speak_on_change=False)
    first = make_engine(settings, redis_client)
    session = await first.create_session(
        ALICE, store_frames=False, use_for_training=True, arm="", options=SessionOptions()
    )
    await first.submit_survey(
        ALICE, session.session_id, "pre", {"current_feelings": ["Tired"], "desired_feelings": [], "text": "long day"}
    )
    outputs = await collect(first.converse(ALICE, session.session_id, script(UserText("I had a long day"))))
    accepted = [o for o in outputs if isinstance(o, Accepted)]
    assert accepted
    # A new engine with a new Redis connection: what the first acknowledged is all there.
    fresh_client = aioredis.Redis.from_url(redis_url)
    backend = ScriptedBackend("Tell me more.")
    second = make_engine(settings, fresh_client, backend)
    _record, events = await second.transcript(ALICE, session.session_id)
    assert accepted[0].event_id in [e.event_id for e in events]
    assert [e.kind for e in events].count("pre_survey") == 1
    await collect(second.converse(ALICE, session.session_id, script(UserText("work was hard"))))
    contents = [m.content for m in backend.calls[0][0]]
    assert "I had a long day" in contents and "work was hard" in contents
    assert any(isinstance(o, Delta) for o in outputs)
    await fresh_client.aclose()


async def test_model_versions_load_from_object_storage_and_serve_side_by_side(
    redis_url: str, redis_client: aioredis.Redis, object_store: ObjectStore, tmp_path: Path
) -> None:
    for version in ("v-alpha", "v-beta"):
        object_store.put_bytes(Bucket.MODELS, f"adapters/{version}/adapter_config.json", b'{"r": 4}')
        object_store.put_bytes(Bucket.MODELS, f"adapters/{version}/adapter_model.safetensors", version.encode())
        object_store.put_json(Bucket.MODELS, f"registry/{version}.json", {"adapter_prefix": f"adapters/{version}/"})
    backend = ScriptedBackend("ok")
    settings = make_settings(redis_url, post_response_reading_s=0.0, speak_on_change=False)
    settings = settings.model_copy(update={"artifacts_dir": tmp_path})
    engine = ChatEngine(settings, backend, SessionStore(redis_client), objects=object_store)
    alpha = await engine.create_session(
        ALICE, store_frames=False, use_for_training=True, arm="v-alpha", options=SessionOptions()
    )
    beta = await engine.create_session(
        ALICE, store_frames=False, use_for_training=True, arm="v-beta", options=SessionOptions()
    )
    base = await engine.create_session(
        ALICE, store_frames=False, use_for_training=True, arm="base", options=SessionOptions()
    )
    assert backend.adapters() == ["v-alpha", "v-beta"]  # Loaded once each, without a restart.
    assert (alpha.model_id, beta.model_id, base.model_id) == ("scripted+v-alpha", "scripted+v-beta", "scripted")
    assert (tmp_path / "chat" / "adapters" / "v-beta" / "adapter_model.safetensors").read_bytes() == b"v-beta"
    for session in (alpha, beta, base):
        await collect(engine.converse(ALICE, session.session_id, script(UserText("hello there"))))
    assert [adapter for _, _, adapter in backend.calls] == ["v-alpha", "v-beta", None]
    with pytest.raises(InvalidInput, match="invalid model arm"):
        await engine.create_session(
            ALICE, store_frames=False, use_for_training=True, arm="../etc", options=SessionOptions()
        )
